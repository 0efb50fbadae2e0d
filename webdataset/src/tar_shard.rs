//! The samples of one WebDataset tar, as webdataset groups them: files in
//! a row whose names share a key (the name up to the first dot of its last
//! part: `00012/000123.jpg` and `00012/000123.txt` are sample
//! `00012/000123`) make one sample, keyed by extension. An image is a
//! `.jpg`, `.jpeg`, `.png` or `.webp`; a caption a `.txt`, else a `.json`'s
//! `caption` or `text`; a class a `.cls` (ids, or a class name), else a
//! `.json`'s `label`, `labels`, `cls` or `class`.
//!
//! Reading never fails: a tar cut short keeps the samples before the cut
//! and says where it was cut, so the index builder and every later read
//! agree on the samples of the same bytes.

use std::io::Cursor;
use std::ops::Range;

use bytes::Bytes;

/// A sample's class, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Label {
    /// Class indices.
    Ids(Vec<i64>),
    /// A class name, looked up in the dataset's class list.
    Name(String),
}

/// One sample: its key and what its files say; a missing part is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarSample {
    pub key: String,
    image: Option<Range<usize>>,
    pub text: Option<String>,
    pub label: Option<Label>,
    /// Each file's extension, as stored (named in errors).
    pub extensions: Vec<String>,
}

/// A parsed tar: its bytes (images are slices of them) and its samples.
#[derive(Debug, Clone)]
pub struct TarShard {
    bytes: Bytes,
    samples: Vec<TarSample>,
    /// Why reading stopped before the end of the archive, if it did.
    truncated: Option<String>,
}

impl TarShard {
    pub fn parse(bytes: Bytes) -> Self {
        let mut samples: Vec<TarSample> = Vec::new();
        let mut truncated = None;
        let len = bytes.len();
        let mut archive = tar::Archive::new(Cursor::new(&bytes[..]));
        let entries = match archive.entries() {
            Ok(entries) => entries,
            Err(error) => {
                return Self {
                    bytes: bytes.clone(),
                    samples,
                    truncated: Some(error.to_string()),
                }
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(error) => {
                    truncated = Some(error.to_string());
                    break;
                }
            };
            let start = entry.raw_file_position() as usize;
            let size = entry.size() as usize;
            if start.checked_add(size).is_none_or(|end| end > len) {
                truncated = Some(format!("a file's {size} bytes run past the tar's end at byte {len}"));
                break;
            }
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let Ok(path) = entry.path() else { continue };
            let name = path.to_string_lossy().to_string();
            let Some((key, extension)) = split_key(&name) else {
                continue;
            };
            let data = start..start + size;
            let same_key = samples.last().is_some_and(|last| last.key == key);
            if !same_key {
                samples.push(TarSample {
                    key: key.to_string(),
                    image: None,
                    text: None,
                    label: None,
                    extensions: Vec::new(),
                });
            }
            let sample = samples.last_mut().expect("pushed above");
            sample.extensions.push(extension.to_string());
            sample.add(&extension.to_ascii_lowercase(), &bytes[data.clone()], data);
        }
        Self {
            bytes: bytes.clone(),
            samples,
            truncated,
        }
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn sample(&self, index: usize) -> &TarSample {
        &self.samples[index]
    }

    /// The image bytes of sample `index`, if it has an image.
    pub fn image(&self, index: usize) -> Option<&[u8]> {
        self.samples[index].image.clone().map(|range| &self.bytes[range])
    }

    pub fn truncated(&self) -> Option<&str> {
        self.truncated.as_deref()
    }

    pub fn samples(&self) -> &[TarSample] {
        &self.samples
    }
}

impl TarSample {
    /// What a sample is missing for `needs` (a caption or a class), named.
    pub fn missing(&self, needs_text: bool) -> Option<String> {
        let has = self.extensions.join(", .");
        let files = if has.is_empty() {
            "no files".to_string()
        } else {
            format!("only .{has}")
        };
        if self.image.is_none() {
            return Some(format!("no image file ({files})"));
        }
        if needs_text && self.text.is_none() {
            return Some(format!("no caption file, .txt or .json with `caption` ({files})"));
        }
        if !needs_text && self.label.is_none() {
            return Some(format!("no class file, .cls or .json with `label` ({files})"));
        }
        None
    }

    fn add(&mut self, extension: &str, data: &[u8], range: Range<usize>) {
        match extension {
            "jpg" | "jpeg" | "png" | "webp" => {
                self.image.get_or_insert(range);
            }
            "txt" => self.text = Some(String::from_utf8_lossy(data).into_owned()),
            "cls" => self.label = label_of_text(&String::from_utf8_lossy(data)),
            "json" => {
                let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
                    return;
                };
                if self.text.is_none() {
                    self.text = ["caption", "text"]
                        .iter()
                        .find_map(|field| value.get(field)?.as_str().map(str::to_string));
                }
                if self.label.is_none() {
                    self.label = ["label", "labels", "cls", "class"]
                        .iter()
                        .find_map(|field| label_of_json(value.get(field)?));
                }
            }
            _ => {}
        }
    }
}

/// `dir/000123.jpg` -> (`dir/000123`, `jpg`): the key ends at the first dot
/// of the last part of the name; names without one are no sample's.
fn split_key(name: &str) -> Option<(&str, &str)> {
    let start = name.rfind('/').map_or(0, |slash| slash + 1);
    let dot = start + name[start..].find('.')?;
    (dot > start).then(|| (&name[..dot], &name[dot + 1..]))
}

/// A `.cls` file: class ids (whitespace or comma separated), else one class name.
fn label_of_text(text: &str) -> Option<Label> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let ids: Result<Vec<i64>, _> = text
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|part| !part.is_empty())
        .map(str::parse)
        .collect();
    Some(match ids {
        Ok(ids) => Label::Ids(ids),
        Err(_) => Label::Name(text.to_string()),
    })
}

fn label_of_json(value: &serde_json::Value) -> Option<Label> {
    match value {
        serde_json::Value::Number(number) => number.as_i64().map(|id| Label::Ids(vec![id])),
        serde_json::Value::String(text) => label_of_text(text),
        serde_json::Value::Array(items) => items
            .iter()
            .map(serde_json::Value::as_i64)
            .collect::<Option<Vec<i64>>>()
            .filter(|ids| !ids.is_empty())
            .map(Label::Ids),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar of `files` (name, contents), in order, as `tar` writes it.
    pub(crate) fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn files_in_a_row_with_one_key_make_a_sample() {
        let bytes = tar_of(&[
            ("a/0001.jpg", b"JPEG1"),
            ("a/0001.txt", b"a cat"),
            (
                "a/0001.json",
                br#"{"caption": "ignored, the txt came first", "label": 3}"#,
            ),
            ("a/0002.PNG", b"PNG2"),
            ("a/0002.json", br#"{"caption": "a dog"}"#),
            ("a/0003.txt", b"no image"),
            ("a/0004.webp", b"W"),
            ("a/0004.cls", b"tabby cat\n"),
            ("a/0005.jpg", b"J"),
            ("a/0005.cls", b"1, 7"),
            ("README", b"not a sample"),
        ]);
        let shard = TarShard::parse(Bytes::from(bytes));
        assert_eq!(shard.truncated(), None);
        let keys: Vec<&str> = shard.samples().iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, ["a/0001", "a/0002", "a/0003", "a/0004", "a/0005"]);
        assert_eq!(shard.image(0), Some(&b"JPEG1"[..]));
        assert_eq!(shard.sample(0).text.as_deref(), Some("a cat"));
        assert_eq!(shard.sample(0).label, Some(Label::Ids(vec![3])));
        assert_eq!(shard.image(1), Some(&b"PNG2"[..]));
        assert_eq!(shard.sample(1).text.as_deref(), Some("a dog"));
        assert_eq!(shard.sample(1).missing(true), None);
        assert_eq!(shard.sample(2).missing(true).unwrap(), "no image file (only .txt)");
        assert_eq!(
            shard.sample(3).missing(true).unwrap(),
            "no caption file, .txt or .json with `caption` (only .webp, .cls)"
        );
        assert_eq!(shard.sample(3).label, Some(Label::Name("tabby cat".into())));
        assert_eq!(shard.sample(4).label, Some(Label::Ids(vec![1, 7])));
        assert_eq!(shard.sample(4).missing(false), None);
    }

    #[test]
    fn a_cut_tar_keeps_the_samples_before_the_cut() {
        let bytes = tar_of(&[
            ("0.jpg", &[1; 600]),
            ("0.txt", b"zero"),
            ("1.jpg", &[2; 600]),
            ("1.txt", b"one"),
        ]);
        let whole = TarShard::parse(Bytes::from(bytes.clone()));
        assert_eq!(whole.len(), 2);
        // Cut inside 1.jpg's data: sample 0 whole, sample 1 gone.
        let cut = TarShard::parse(Bytes::from(bytes[..3072 + 100].to_vec()));
        assert_eq!(cut.len(), 1);
        assert_eq!(cut.sample(0).missing(true), None);
        assert!(
            cut.truncated().unwrap().contains("run past the tar's end"),
            "{:?}",
            cut.truncated()
        );
        // Cut inside 0.txt: sample 0 has its image and no caption.
        let cut = TarShard::parse(Bytes::from(bytes[..1536 + 512 + 2].to_vec()));
        assert_eq!(cut.len(), 1);
        assert!(cut.sample(0).missing(true).is_some());
        // Not a tar at all.
        let garbage = TarShard::parse(Bytes::from(vec![0x5a; 1000]));
        assert!(garbage.is_empty());
        assert!(garbage.truncated().is_some());
    }
}
