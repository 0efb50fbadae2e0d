//! A dataset's index: what a prefix of Arrow shards (or a source of
//! WebDataset tars) holds. Written last by every writer, so a dataset
//! without one is unfinished; read once by the coordinator, validated, and
//! pinned by its fingerprint.

use serde::{Deserialize, Serialize};

/// The index's object name under a dataset's prefix.
pub const INDEX_FILE: &str = "index.json";
pub const FORMAT: &str = "coca-dataset";
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    /// Images with (noisy) alt-text: a `text` column.
    Align,
    /// Labelled images: a `labels` column of class indices.
    Jft,
}

impl std::fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DatasetKind::Align => "align",
            DatasetKind::Jft => "jft",
        })
    }
}

/// How a dataset's shards are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Container {
    /// Arrow IPC files, as coca writes them.
    #[default]
    Arrow,
    /// WebDataset tars read in place: a shard's rows are its samples in tar order.
    Tar,
}

impl Container {
    fn is_arrow(&self) -> bool {
        *self == Container::Arrow
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// Object name relative to the dataset prefix.
    pub file: String,
    pub rows: u64,
    pub bytes: u64,
    /// Hex SHA-256 of the whole object.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassName {
    pub name: String,
    /// A broader name said along with it ("cat, animal").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

impl ClassName {
    /// A class-name list: one name per line, optionally `name<TAB>parent`;
    /// blank lines and `#` comments are ignored. An error gives the line
    /// (1-based) where there is one.
    pub fn parse_list(text: &str) -> Result<Vec<ClassName>, (Option<u64>, &'static str)> {
        let mut classes = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, parent) = match line.split_once('\t') {
                Some((name, parent)) => (name.trim(), Some(parent.trim().to_string()).filter(|p| !p.is_empty())),
                None => (line, None),
            };
            if name.is_empty() {
                return Err((Some(number as u64 + 1), "empty class name"));
            }
            classes.push(ClassName {
                name: name.to_string(),
                parent,
            });
        }
        if classes.is_empty() {
            return Err((None, "no class names"));
        }
        Ok(classes)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetIndex {
    pub format: String,
    pub version: u32,
    pub kind: DatasetKind,
    /// Absent in Arrow datasets' indexes (as before tar sources existed).
    #[serde(default, skip_serializing_if = "Container::is_arrow")]
    pub container: Container,
    pub shards: Vec<ShardEntry>,
    /// Class names by label index (jft only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<ClassName>,
    /// Records the writer refused, by reason (e.g. "undecodable image").
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub skipped: std::collections::BTreeMap<String, u64>,
    /// What wrote it, for people.
    #[serde(default)]
    pub source: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DatasetIndexError {
    #[error("{origin}: not a dataset index: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}: {field}: {message}")]
    Invalid {
        origin: String,
        field: String,
        message: String,
    },
}

impl DatasetIndex {
    pub fn new(kind: DatasetKind, classes: Vec<ClassName>, source: &str) -> Self {
        Self {
            format: FORMAT.to_string(),
            version: VERSION,
            kind,
            container: Container::Arrow,
            shards: Vec::new(),
            classes,
            skipped: Default::default(),
            source: source.to_string(),
        }
    }

    /// Parses and validates; `origin` (the index's URL) starts every message.
    pub fn parse(json: &str, origin: &str) -> Result<Self, DatasetIndexError> {
        let index: Self = serde_json::from_str(json).map_err(|error| DatasetIndexError::Parse {
            origin: origin.to_string(),
            message: error.to_string(),
        })?;
        index.validate(origin)?;
        Ok(index)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("an index always serialises") + "\n"
    }

    pub fn validate(&self, origin: &str) -> Result<(), DatasetIndexError> {
        let invalid = |field: String, message: String| DatasetIndexError::Invalid {
            origin: origin.to_string(),
            field,
            message,
        };
        if self.format != FORMAT {
            return Err(invalid("format".into(), format!("`{}` is not `{FORMAT}`", self.format)));
        }
        if self.version != VERSION {
            return Err(invalid(
                "version".into(),
                format!(
                    "version {} is not supported (this coca reads version {VERSION})",
                    self.version
                ),
            ));
        }
        if self.shards.is_empty() {
            return Err(invalid("shards".into(), "the dataset has no shards".into()));
        }
        let mut files = std::collections::HashSet::new();
        for (i, shard) in self.shards.iter().enumerate() {
            let field = |name: &str| format!("shards[{i}].{name}");
            let file = &shard.file;
            if file.is_empty() || file.starts_with('/') || file.split('/').any(|part| part == ".." || part.is_empty()) {
                return Err(invalid(
                    field("file"),
                    format!("`{file}` is not a relative object name"),
                ));
            }
            if !files.insert(file.as_str()) {
                return Err(invalid(field("file"), format!("`{file}` is listed twice")));
            }
            if shard.rows == 0 {
                return Err(invalid(field("rows"), "a shard holds at least one row".into()));
            }
            if shard.sha256.len() != 64 || !shard.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(
                    field("sha256"),
                    format!("`{}` is not a hex SHA-256", shard.sha256),
                ));
            }
        }
        match self.kind {
            DatasetKind::Jft if self.classes.is_empty() => {
                Err(invalid("classes".into(), "a jft dataset needs its class names".into()))
            }
            DatasetKind::Align if !self.classes.is_empty() => Err(invalid(
                "classes".into(),
                "an align dataset has texts, not classes".into(),
            )),
            _ => match self.classes.iter().position(|class| class.name.trim().is_empty()) {
                Some(i) => Err(invalid(format!("classes[{i}].name"), "a class name is empty".into())),
                None => Ok(()),
            },
        }
    }

    pub fn rows(&self) -> u64 {
        self.shards.iter().map(|shard| shard.rows).sum()
    }

    /// Which shard holds global row `row`, and the row within it.
    /// `starts` is [`DatasetIndex::shard_starts`].
    pub fn locate(starts: &[u64], row: u64) -> (usize, u64) {
        let shard = starts.partition_point(|&start| start <= row) - 1;
        (shard, row - starts[shard])
    }

    /// The first global row of every shard.
    pub fn shard_starts(&self) -> Vec<u64> {
        self.shards
            .iter()
            .scan(0, |next, shard| {
                let start = *next;
                *next += shard.rows;
                Some(start)
            })
            .collect()
    }

    /// The names a label is said with: its own, then its parent's.
    pub fn class_names(&self, label: usize) -> Option<Vec<&str>> {
        let class = self.classes.get(label)?;
        Some(
            std::iter::once(class.name.as_str())
                .chain(class.parent.as_deref())
                .collect(),
        )
    }

    /// A stable content hash (FNV-1a of the canonical JSON), to pin the
    /// dataset a job planned from.
    pub fn fingerprint(&self) -> u64 {
        crate::rng::fnv1a(&serde_json::to_string(self).expect("an index always serialises"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(file: &str, rows: u64) -> ShardEntry {
        ShardEntry {
            file: file.into(),
            rows,
            bytes: 10,
            sha256: "ab".repeat(32),
        }
    }

    fn jft() -> DatasetIndex {
        let mut index = DatasetIndex::new(
            DatasetKind::Jft,
            vec![ClassName {
                name: "cat".into(),
                parent: Some("animal".into()),
            }],
            "test",
        );
        index.shards = vec![shard("shard-0.arrow", 3), shard("shard-1.arrow", 2)];
        index
    }

    #[test]
    fn an_index_round_trips_through_json() {
        let index = jft();
        assert_eq!(DatasetIndex::parse(&index.to_json(), "x").unwrap(), index);
        assert_eq!(index.rows(), 5);
        assert_eq!(index.class_names(0).unwrap(), ["cat", "animal"]);
        assert_ne!(
            index.fingerprint(),
            DatasetIndex {
                source: "other".into(),
                ..jft()
            }
            .fingerprint()
        );
    }

    #[test]
    fn rows_locate_their_shard() {
        let starts = jft().shard_starts();
        assert_eq!(starts, [0, 3]);
        let located: Vec<_> = (0..5).map(|row| DatasetIndex::locate(&starts, row)).collect();
        assert_eq!(located, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]);
    }

    #[test]
    fn every_rule_names_its_field() {
        let cases: Vec<(Box<dyn Fn(&mut DatasetIndex)>, &str)> = vec![
            (
                Box::new(|i| i.format = "x".into()),
                "idx: format: `x` is not `coca-dataset`",
            ),
            (
                Box::new(|i| i.version = 9),
                "idx: version: version 9 is not supported (this coca reads version 1)",
            ),
            (Box::new(|i| i.shards.clear()), "idx: shards: the dataset has no shards"),
            (
                Box::new(|i| i.shards[1].file = "../x".into()),
                "idx: shards[1].file: `../x` is not a relative object name",
            ),
            (
                Box::new(|i| i.shards[1].file = "shard-0.arrow".into()),
                "idx: shards[1].file: `shard-0.arrow` is listed twice",
            ),
            (
                Box::new(|i| i.shards[0].rows = 0),
                "idx: shards[0].rows: a shard holds at least one row",
            ),
            (
                Box::new(|i| i.shards[0].sha256 = "zz".into()),
                "idx: shards[0].sha256: `zz` is not a hex SHA-256",
            ),
            (
                Box::new(|i| i.classes.clear()),
                "idx: classes: a jft dataset needs its class names",
            ),
            (
                Box::new(|i| i.kind = DatasetKind::Align),
                "idx: classes: an align dataset has texts, not classes",
            ),
            (
                Box::new(|i| i.classes[0].name = " ".into()),
                "idx: classes[0].name: a class name is empty",
            ),
        ];
        for (break_it, message) in cases {
            let mut index = jft();
            break_it(&mut index);
            assert_eq!(
                DatasetIndex::parse(&index.to_json(), "idx").unwrap_err().to_string(),
                message
            );
        }
        let error = DatasetIndex::parse("{\"format\": 1}", "s3://b/index.json")
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("s3://b/index.json: not a dataset index:"), "{error}");
    }
}
