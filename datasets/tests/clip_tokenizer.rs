//! CLIP's tokenizer against the ids open_clip 3.3.0 gives (the fixture made
//! by scripts/make_openclip_fixture.py): emoji, accents, punctuation, HTML
//! entities, curly quotes, ligatures, full-width letters, long texts cut
//! as open_clip cuts them.

use datasets::clip_tokenizer::CONTEXT_LENGTH;
use datasets::tokenizer::TextTokenizer;

#[derive(serde::Deserialize)]
struct Captions {
    context_length: usize,
    captions: Vec<Caption>,
}

#[derive(serde::Deserialize)]
struct Caption {
    text: String,
    ids: Vec<u32>,
}

#[test]
fn ids_equal_open_clips() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/open_clip/captions.json");
    let fixture: Captions = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(fixture.context_length, CONTEXT_LENGTH);
    let tokenizer = TextTokenizer::clip().unwrap();
    let mut differ = Vec::new();
    for caption in &fixture.captions {
        let ids = tokenizer.encode(&caption.text, fixture.context_length).unwrap();
        if ids != caption.ids {
            differ.push(format!(
                "{:?}\n  ours      {ids:?}\n  open_clip {:?}",
                caption.text, caption.ids
            ));
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
    assert!(fixture.captions.len() >= 10);
    // The long caption is cut: no padding, <end_of_text> last.
    let long = fixture.captions.iter().find(|c| c.text.len() > 300).unwrap();
    assert_eq!((long.ids[0], long.ids[CONTEXT_LENGTH - 1]), (49406, 49407));
    assert!(!long.ids.contains(&0));
}
