//! A manifest error names the file, the field path, what is wrong, and
//! where the field is written (`path:line:column`, as compilers do).

use std::fmt;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ManifestError {
    /// The manifest's path, or what its text came from.
    pub origin: String,
    /// The field path, e.g. `data.source[1].weight`; empty for a syntax error.
    pub field: String,
    pub message: String,
    /// Where the field's value (else its nearest written table) is in the text.
    pub location: Option<Location>,
}

/// 1-based, counted in characters, as editors show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(Location { line, column }) = self.location {
            write!(f, ":{line}:{column}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl Location {
    /// The location of byte `offset` of `text`.
    pub(super) fn at(text: &str, offset: usize) -> Self {
        let before = text.get(..offset).unwrap_or(text);
        let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
        Self {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }

    /// Where `field` (`data.source[1].weight`) is written in `text`: its
    /// value, else the nearest table on its path that is written.
    pub(super) fn of_field(text: &str, field: &str) -> Option<Self> {
        let document = toml_edit::ImDocument::parse(text).ok()?;
        let mut item = document.as_item();
        let mut span = None;
        for part in field.split('.') {
            let (key, index) = match part.split_once('[') {
                Some((key, index)) => (key, index.trim_end_matches(']').parse::<usize>().ok()),
                None => (part, None),
            };
            let Some(next) = item.get(key) else { break };
            item = next;
            span = item.span().or(span);
            if let Some(index) = index {
                let Some(next) = item.get(index) else { break };
                item = next;
                span = item.span().or(span);
            }
        }
        span.map(|span| Self::at(text, span.start))
    }
}
