//! Text to token ids: a byte-level BPE (the `tokenizers` crate) trained on
//! the dataset texts, with `<pad>`, `<bos>` and `<eos>` as ids 0, 1, 2.
//! Sequences are framed by `<bos>`/`<eos>` and truncated or right-padded
//! to the model's context length; the CLS token is the model's own.

use std::collections::HashSet;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::utils::Lowercase;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use contract::rng::fnv1a;

use super::clip_tokenizer;

pub const PAD: &str = "<pad>";
pub const BOS: &str = "<bos>";
pub const EOS: &str = "<eos>";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("vocabulary size {0} is too small: byte-level BPE needs at least 259 (256 bytes and 3 special tokens)")]
    VocabularyTooSmall(usize),
    #[error("training the tokenizer failed: {0}")]
    Train(String),
    #[error("{origin}: not a tokenizer: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}: the tokenizer has no `{token}` token")]
    MissingSpecial { origin: String, token: &'static str },
    #[error("cannot tokenize `{text}`: {message}")]
    Encode { text: String, message: String },
    #[error("`{text}` is {count} tokens of this tokenizer, not one")]
    NotOneToken { text: String, count: usize },
}

pub struct TextTokenizer {
    inner: Tokenizer,
    pad: u32,
    bos: u32,
    eos: u32,
}

impl TextTokenizer {
    /// CLIP's tokenizer, framed as open_clip frames it.
    pub fn clip() -> Result<Self, TokenizerError> {
        Self::from_json(&clip_tokenizer::clip_tokenizer_json(), "CLIP's BPE tokenizer")
    }

    /// Trains a byte-level BPE of at most `vocab_size` tokens on `texts`.
    pub fn train<I, S>(texts: I, vocab_size: usize) -> Result<Self, TokenizerError>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        if vocab_size < 259 {
            return Err(TokenizerError::VocabularyTooSmall(vocab_size));
        }
        let specials = [PAD, BOS, EOS].map(|token| AddedToken::from(token, true)).to_vec();
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect::<HashSet<char>>())
            .build()
            .into();
        let mut inner = Tokenizer::new(BPE::default());
        inner
            .with_normalizer(Some(Lowercase))
            .map_err(|error| TokenizerError::Train(error.to_string()))?;
        inner.with_pre_tokenizer(Some(ByteLevel::default()));
        inner.with_decoder(Some(ByteLevel::default()));
        inner
            .train(&mut trainer, texts)
            .map_err(|error| TokenizerError::Train(error.to_string()))?;
        Self::wrap(inner, "the trained tokenizer")
    }

    /// Reads a tokenizer.json; `origin` names it in errors.
    pub fn from_json(json: &str, origin: &str) -> Result<Self, TokenizerError> {
        let inner: Tokenizer = json.parse().map_err(|error: tokenizers::Error| TokenizerError::Parse {
            origin: origin.to_string(),
            message: error.to_string(),
        })?;
        Self::wrap(inner, origin)
    }

    /// Finds the framing tokens: coca's own (`<pad>`, `<bos>`, `<eos>`),
    /// or CLIP's (`<start_of_text>`, `<end_of_text>`, padding with id 0 as
    /// open_clip does).
    fn wrap(inner: Tokenizer, origin: &str) -> Result<Self, TokenizerError> {
        let id = |token: &'static str| {
            inner.token_to_id(token).ok_or_else(|| TokenizerError::MissingSpecial {
                origin: origin.to_string(),
                token,
            })
        };
        if inner.token_to_id(PAD).is_none() && inner.token_to_id(clip_tokenizer::START_OF_TEXT).is_some() {
            return Ok(Self {
                pad: clip_tokenizer::PAD_ID,
                bos: id(clip_tokenizer::START_OF_TEXT)?,
                eos: id(clip_tokenizer::END_OF_TEXT)?,
                inner,
            });
        }
        Ok(Self {
            pad: id(PAD)?,
            bos: id(BOS)?,
            eos: id(EOS)?,
            inner,
        })
    }

    /// tokenizer.json text.
    pub fn to_json(&self) -> String {
        self.inner.to_string(false).expect("a tokenizer serialises")
    }

    /// A fingerprint of the tokenizer, to refuse resuming with another one.
    pub fn fingerprint(&self) -> u64 {
        fnv1a(&self.to_json())
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// Exactly `context` ids: `<bos>`, the text's tokens (truncated so the
    /// frame fits), `<eos>`, then `<pad>`.
    pub fn encode(&self, text: &str, context: usize) -> Result<Vec<u32>, TokenizerError> {
        assert!(context >= 2, "a context holds at least <bos> and <eos>");
        let encoding = self.inner.encode(text, false).map_err(|error| TokenizerError::Encode {
            text: text.chars().take(80).collect(),
            message: error.to_string(),
        })?;
        let body = encoding.get_ids();
        let body = &body[..body.len().min(context - 2)];
        let mut ids = Vec::with_capacity(context);
        ids.push(self.bos);
        ids.extend_from_slice(body);
        ids.push(self.eos);
        ids.resize(context, self.pad);
        Ok(ids)
    }

    /// The one token `text` is (as a word in a caption is encoded).
    pub fn single_token(&self, text: &str) -> Result<u32, TokenizerError> {
        let encoding = self.inner.encode(text, false).map_err(|error| TokenizerError::Encode {
            text: text.chars().take(80).collect(),
            message: error.to_string(),
        })?;
        match encoding.get_ids() {
            [id] => Ok(*id),
            ids => Err(TokenizerError::NotOneToken {
                text: text.chars().take(80).collect(),
                count: ids.len(),
            }),
        }
    }

    /// The text of `ids`, without special tokens and padding.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        // CLIP's padding id is an ordinary token (`!`), not a special one.
        let ids: Vec<u32> = ids.iter().copied().filter(|&id| id != self.pad).collect();
        self.inner.decode(&ids, true).map_err(|error| TokenizerError::Encode {
            text: format!("{ids:?}"),
            message: error.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_word_is_one_token_or_an_error_naming_it() {
        let clip = TextTokenizer::clip().unwrap();
        let full_stop = clip.single_token(".").unwrap();
        let framed = clip.encode("a dog.", 8).unwrap();
        assert_eq!(framed[3], full_stop, "{framed:?}");
        let error = clip.single_token("a dog").unwrap_err().to_string();
        assert_eq!(error, "`a dog` is 2 tokens of this tokenizer, not one");
    }

    fn corpus() -> Vec<String> {
        let colours = ["red", "green", "blue", "yellow", "purple", "orange"];
        let shapes = ["circle", "square", "triangle", "star"];
        let places = ["above", "below", "left of", "right of"];
        let mut texts = Vec::new();
        for (i, colour) in colours.iter().enumerate() {
            for (j, shape) in shapes.iter().enumerate() {
                let other = shapes[(i + j + 1) % shapes.len()];
                texts.push(format!(
                    "A {colour} {shape} {} a small {other}",
                    places[(i * j) % places.len()]
                ));
            }
        }
        texts
    }

    fn trained() -> TextTokenizer {
        TextTokenizer::train(corpus().iter(), 400).unwrap()
    }

    #[test]
    fn trains_a_byte_level_bpe_with_the_special_tokens_first() {
        let tokenizer = trained();
        assert_eq!((tokenizer.pad_id(), tokenizer.bos_id(), tokenizer.eos_id()), (0, 1, 2));
        let size = tokenizer.vocab_size();
        assert!((259..=400).contains(&size), "vocabulary of {size}");
        // Merges were learned: a frequent word is one token.
        let ids = tokenizer.encode("circle", 8).unwrap();
        assert_eq!(&ids[..3], &[1, ids[1], 2], "{ids:?}");
    }

    #[test]
    fn encodes_framed_padded_and_truncated_sequences() {
        let tokenizer = trained();
        let ids = tokenizer.encode("A red circle above a small square", 16).unwrap();
        assert_eq!(ids.len(), 16);
        assert_eq!(ids[0], 1);
        let end = ids.iter().position(|&id| id == 2).expect("an <eos>");
        assert!(ids[end + 1..].iter().all(|&id| id == 0));
        assert_eq!(
            tokenizer.decode(&ids).unwrap().trim(),
            "a red circle above a small square"
        );
        // Text the BPE never saw still encodes, byte by byte.
        let unseen = tokenizer.encode("zebra ünïcödé 🦓", 64).unwrap();
        assert_eq!(tokenizer.decode(&unseen).unwrap().trim(), "zebra ünïcödé 🦓");
        // Too long: cut to fit, still framed.
        let long = tokenizer.encode(&"blue star ".repeat(40), 10).unwrap();
        assert_eq!(long.len(), 10);
        assert_eq!((long[0], long[9]), (1, 2));
        assert!(!long.contains(&0));
        assert_eq!(tokenizer.encode("", 4).unwrap(), vec![1, 2, 0, 0]);
    }

    #[test]
    fn round_trips_through_json() {
        let tokenizer = trained();
        let again = TextTokenizer::from_json(&tokenizer.to_json(), "tokenizer.json").unwrap();
        let text = "a purple star below a small circle";
        assert_eq!(again.encode(text, 20).unwrap(), tokenizer.encode(text, 20).unwrap());
        assert_eq!(again.fingerprint(), tokenizer.fingerprint());
        // The same corpus trains the same tokenizer.
        assert_eq!(trained().fingerprint(), tokenizer.fingerprint());
    }

    #[test]
    fn bad_tokenizers_are_clear_errors() {
        let error = TextTokenizer::from_json("{not json", "s3://bucket/tokenizer.json")
            .err()
            .unwrap();
        assert!(
            error
                .to_string()
                .starts_with("s3://bucket/tokenizer.json: not a tokenizer:"),
            "{error}"
        );
        // A valid tokenizer without our special tokens.
        let plain = Tokenizer::new(BPE::default()).to_string(false).unwrap();
        let error = TextTokenizer::from_json(&plain, "other.json").err().unwrap();
        assert_eq!(error.to_string(), "other.json: the tokenizer has no `<pad>` token");
        let error = TextTokenizer::train(corpus().iter(), 100).err().unwrap();
        assert!(
            error.to_string().starts_with("vocabulary size 100 is too small"),
            "{error}"
        );
    }

    #[test]
    fn has_clips_vocabulary_and_framing() {
        let tokenizer = TextTokenizer::clip().unwrap();
        assert_eq!(tokenizer.vocab_size(), 49408);
        assert_eq!(
            (tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()),
            (49406, 49407, 0)
        );
        // open_clip: tokenizer("a photo of a cat.")
        let ids = tokenizer.encode("A photo of a CAT.", 10).unwrap();
        assert_eq!(ids, vec![49406, 320, 1125, 539, 320, 2368, 269, 49407, 0, 0]);
        assert_eq!(tokenizer.decode(&ids).unwrap().trim(), "a photo of a cat .");
    }
}
