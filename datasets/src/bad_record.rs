//! What makes a stored record unusable, checked and named the same way by
//! the loader (its counts reach /status) and by `coca data inspect`.

use contract::dataset::{DatasetIndex, DatasetKind};

use crate::shard::RecordRef;

/// Why a record cannot be trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BadRecord {
    /// Its shard could not be read or decoded.
    FailedShard,
    EmptyText,
    /// A label that names no class of the dataset.
    BadLabel,
    NoLabels,
    UndecodableImage,
    UntokenizableText,
    /// A tar sample without its image, caption or class file.
    IncompleteSample,
}

impl BadRecord {
    /// The reason as counted and shown.
    pub fn name(self) -> &'static str {
        match self {
            BadRecord::FailedShard => "row in a failed shard",
            BadRecord::EmptyText => "empty text",
            BadRecord::BadLabel => "bad label",
            BadRecord::NoLabels => "no labels",
            BadRecord::UndecodableImage => "undecodable image",
            BadRecord::UntokenizableText => "untokenizable text",
            BadRecord::IncompleteSample => "incomplete sample",
        }
    }
}

/// What a record says about its image: its alt-text (align), or the class
/// names of its labels, each once, in label order (jft).
#[derive(Debug, Clone, PartialEq)]
pub enum Caption<'a> {
    Text(&'a str),
    Classes(Vec<&'a str>),
}

/// A record's caption, or why it has none (with the detail to log).
pub fn caption<'a>(record: &RecordRef<'a>, index: &'a DatasetIndex) -> Result<Caption<'a>, (BadRecord, String)> {
    if let Some(problem) = &record.problem {
        return Err(problem.clone());
    }
    match index.kind {
        DatasetKind::Align => {
            let text = record.text.unwrap_or_default().trim();
            if text.is_empty() {
                return Err((BadRecord::EmptyText, "empty text".into()));
            }
            Ok(Caption::Text(text))
        }
        DatasetKind::Jft => {
            let mut names: Vec<&str> = Vec::new();
            for &label in record.labels.as_deref().unwrap_or_default() {
                let Some(class) = usize::try_from(label).ok().and_then(|l| index.class_names(l)) else {
                    return Err((BadRecord::BadLabel, format!("label {label} is not a class")));
                };
                for name in class {
                    if !names.contains(&name) {
                        names.push(name);
                    }
                }
            }
            if names.is_empty() {
                return Err((BadRecord::NoLabels, "no labels".into()));
            }
            Ok(Caption::Classes(names))
        }
    }
}
