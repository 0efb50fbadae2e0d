//! CLIP's BPE tokenizer as open_clip uses it (49,408 tokens,
//! `<start_of_text>`/`<end_of_text>`, padding with id 0), as a `tokenizers`
//! JSON: what `coca import open-clip` puts in a checkpoint.
//!
//! open_clip cleans a text with ftfy and HTML unescaping, collapses
//! whitespace, lower-cases it, splits it with CLIP's pattern and runs a BPE
//! whose words end in `</w>`. The JSON reproduces that with normalizers:
//! NFC, ftfy's fixes that apply to well-formed text (curly quotes, Latin
//! ligatures, full-width characters), the common HTML entities (twice, as
//! open_clip unescapes twice), whitespace, lower case. Not reproduced:
//! ftfy's repair of mojibake (text decoded with the wrong codec) and HTML
//! entities other than those listed in `HTML_ENTITIES`.

use std::io::Read;

use serde_json::{json, Value};

/// open_clip's `bpe_simple_vocab_16e6.txt.gz` (OpenAI CLIP, MIT licence).
const BPE_MERGES: &[u8] = include_bytes!("clip_bpe_simple_vocab_16e6.txt.gz");
/// Merges open_clip reads from that file (the rest are unused).
const MERGES: usize = 49152 - 256 - 2;
pub const START_OF_TEXT: &str = "<start_of_text>";
pub const END_OF_TEXT: &str = "<end_of_text>";
/// open_clip pads with id 0 (the token `!`), and its losses and masks treat
/// id 0 as padding wherever it occurs.
pub const PAD_ID: u32 = 0;
/// CLIP's context: 77 positions, 76 of them text in open_clip's CoCa.
pub const CONTEXT_LENGTH: usize = 76;

/// The entities `html.unescape` turns back into characters that CLIP
/// captions use; `&amp;` last, so `&amp;lt;` becomes `&lt;` and the second
/// round `<`, as two rounds of `html.unescape` do.
const HTML_ENTITIES: [(&str, &str); 8] = [
    ("&lt;", "<"),
    ("&gt;", ">"),
    ("&quot;", "\""),
    ("&#34;", "\""),
    ("&#39;", "'"),
    ("&apos;", "'"),
    ("&nbsp;", "\u{a0}"),
    ("&amp;", "&"),
];

/// ftfy's `uncurl_quotes` and `fix_latin_ligatures`.
const FTFY_REPLACEMENTS: [(&str, &str); 15] = [
    ("\u{2018}", "'"),
    ("\u{2019}", "'"),
    ("\u{201a}", "'"),
    ("\u{201b}", "'"),
    ("\u{201c}", "\""),
    ("\u{201d}", "\""),
    ("\u{201e}", "\""),
    ("\u{201f}", "\""),
    ("\u{fb00}", "ff"),
    ("\u{fb01}", "fi"),
    ("\u{fb02}", "fl"),
    ("\u{fb03}", "ffi"),
    ("\u{fb04}", "ffl"),
    ("\u{fb05}", "st"),
    ("\u{fb06}", "st"),
];

/// CLIP's pre-tokenization pattern (open_clip's, after lower-casing).
const PATTERN: &str = r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// GPT-2's reversible map of bytes to printable characters, in CLIP's
/// vocabulary order.
fn bytes_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xa1..=0xac)
        .chain(0xae..=0xff)
        .collect();
    let mut chars = printable.clone();
    let mut extra = 0;
    for byte in 0..256u32 {
        if !printable.contains(&byte) {
            printable.push(byte);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    chars
        .into_iter()
        .map(|c| char::from_u32(c).expect("a valid code point"))
        .collect()
}

fn replace(from: &str, to: &str) -> Value {
    json!({"type": "Replace", "pattern": {"String": from}, "content": to})
}

/// The tokenizer JSON, built from the embedded merges.
pub fn clip_tokenizer_json() -> String {
    let mut text = String::new();
    flate2::read::GzDecoder::new(BPE_MERGES)
        .read_to_string(&mut text)
        .expect("the embedded CLIP merges are valid gzip'd UTF-8");
    let merges: Vec<&str> = text.split('\n').skip(1).take(MERGES).collect();
    let bytes = bytes_to_unicode();
    let mut vocab: Vec<String> = bytes.iter().map(char::to_string).collect();
    vocab.extend(bytes.iter().map(|c| format!("{c}</w>")));
    vocab.extend(merges.iter().map(|merge| merge.replace(' ', "")));
    vocab.extend([START_OF_TEXT.to_string(), END_OF_TEXT.to_string()]);
    let vocab: serde_json::Map<String, Value> = vocab
        .into_iter()
        .enumerate()
        .map(|(id, token)| (token, json!(id)))
        .collect();
    let special = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    let mut normalizers = vec![json!({"type": "NFC"})];
    normalizers.extend(FTFY_REPLACEMENTS.iter().map(|(from, to)| replace(from, to)));
    // ftfy's `fix_character_width`: full-width ASCII and the ideographic space.
    normalizers.extend((0xff01u32..=0xff5e).map(|wide| {
        let narrow = char::from_u32(wide - 0xff01 + 0x21).expect("ASCII");
        replace(
            &char::from_u32(wide).expect("a valid code point").to_string(),
            &narrow.to_string(),
        )
    }));
    normalizers.push(replace("\u{3000}", " "));
    for _ in 0..2 {
        normalizers.extend(HTML_ENTITIES.iter().map(|(from, to)| replace(from, to)));
    }
    normalizers.extend([
        json!({"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "}),
        json!({"type": "Strip", "strip_left": true, "strip_right": true}),
        json!({"type": "Lowercase"}),
    ]);
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(MERGES + 512, START_OF_TEXT), special(MERGES + 513, END_OF_TEXT)],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PATTERN}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]},
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
            {"type": "Replace", "pattern": {"String": "</w>"}, "content": " "}
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    });
    tokenizer.to_string()
}
