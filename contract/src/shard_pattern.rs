//! Where a WebDataset source's tar shards are, as its URL says: a prefix holding
//! `.tar` objects (`s3://b/laion/`), one tar (`shards/00000.tar`), or a
//! brace pattern as webdataset users write them
//! (`s3://b/laion/{00000..41407}.tar`, `{train,val}/{000..009}.tar`).

/// More shard names than this in one pattern is a typo, not a dataset.
const MAX_NAMES: u64 = 10_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("{url}: {message}")]
    Invalid { url: String, message: String },
}

/// A tar source: the store its shards are in, and which of its objects they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarSource {
    /// The URL as written.
    pub url: String,
    /// The store URL every shard name is relative to.
    pub base: String,
    /// The shards' names under `base` as a pattern (braces expanded by
    /// [`TarSource::names`]); `None`: every `.tar` object under `base`.
    pub pattern: Option<String>,
}

impl TarSource {
    pub fn parse(url: &str) -> Result<Self, PatternError> {
        let invalid = |message: &str| PatternError::Invalid {
            url: url.to_string(),
            message: message.to_string(),
        };
        let trimmed = url.trim_end_matches('/');
        let is_pattern = url.contains('{') || trimmed.ends_with(".tar");
        if !is_pattern {
            return Ok(Self {
                url: url.to_string(),
                base: url.to_string(),
                pattern: None,
            });
        }
        if url.ends_with('/') {
            return Err(invalid("a shard pattern names files, not a folder"));
        }
        // The base ends at the last `/` before the first brace.
        let first_brace = url.find('{').unwrap_or(url.len());
        let scheme_end = url.find("://").map_or(0, |at| at + 3);
        let (base, pattern) = match url[..first_brace].rfind('/').filter(|&slash| slash >= scheme_end) {
            Some(slash) => (&url[..slash], &url[slash + 1..]),
            None if scheme_end > 0 => return Err(invalid("a shard pattern needs a bucket or host before it")),
            None => (".", url),
        };
        let source = Self {
            url: url.to_string(),
            base: if base.is_empty() {
                "/".to_string()
            } else {
                base.to_string()
            },
            pattern: Some(pattern.to_string()),
        };
        source.names()?;
        Ok(source)
    }

    /// The shard names the pattern spells, in its order; `None` for a prefix.
    pub fn names(&self) -> Result<Option<Vec<String>>, PatternError> {
        let Some(pattern) = &self.pattern else { return Ok(None) };
        let names = expand(pattern).map_err(|message| PatternError::Invalid {
            url: self.url.clone(),
            message,
        })?;
        Ok(Some(names))
    }

    /// The index's object name beside the shards: one per pattern, so that
    /// two patterns over one folder keep two indexes.
    pub fn index_name(&self) -> String {
        match &self.pattern {
            None => "coca-tar-index.json".to_string(),
            Some(pattern) => format!("coca-tar-index-{:016x}.json", crate::rng::fnv1a(pattern)),
        }
    }
}

/// Expands every `{a..b}` (a numeric range, zero-padded when a bound is)
/// and `{x,y,z}` (alternatives) in `pattern`, left to right.
pub fn expand(pattern: &str) -> Result<Vec<String>, String> {
    let mut names = vec![String::new()];
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        let close = rest[open..]
            .find('}')
            .map(|at| open + at)
            .ok_or_else(|| format!("`{{` at `{}` is never closed", &rest[open..]))?;
        let inside = &rest[open + 1..close];
        if inside.contains('{') {
            return Err(format!("nested braces in `{{{inside}}}` are not supported"));
        }
        let choices = choices(inside)?;
        if names.len() as u64 * choices.len() as u64 > MAX_NAMES {
            return Err(format!("more than {MAX_NAMES} shard names"));
        }
        let literal = &rest[..open];
        names = names
            .iter()
            .flat_map(|name| choices.iter().map(move |choice| format!("{name}{literal}{choice}")))
            .collect();
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return Err(format!("`}}` in `{rest}` closes no brace"));
    }
    for name in &mut names {
        name.push_str(rest);
    }
    Ok(names)
}

fn choices(inside: &str) -> Result<Vec<String>, String> {
    if let Some((from, to)) = inside.split_once("..") {
        let bound = |text: &str| {
            text.parse::<u64>()
                .map_err(|_| format!("`{{{inside}}}`: `{text}` is not a whole number"))
        };
        let (start, end) = (bound(from)?, bound(to)?);
        if start > end {
            return Err(format!("`{{{inside}}}` counts down"));
        }
        if end - start >= MAX_NAMES {
            return Err(format!("`{{{inside}}}` spells more than {MAX_NAMES} shard names"));
        }
        let padded = |text: &str| text.len() > 1 && text.starts_with('0');
        let width = if padded(from) || padded(to) {
            from.len().max(to.len())
        } else {
            0
        };
        return Ok((start..=end).map(|n| format!("{n:0width$}")).collect());
    }
    if !inside.contains(',') {
        return Err(format!(
            "`{{{inside}}}` is neither a range (a..b) nor alternatives (a,b)"
        ));
    }
    Ok(inside.split(',').map(str::to_string).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_expand_as_webdataset_users_write_them() {
        assert_eq!(expand("{00..02}.tar").unwrap(), ["00.tar", "01.tar", "02.tar"]);
        assert_eq!(expand("s{8..10}.tar").unwrap(), ["s8.tar", "s9.tar", "s10.tar"]);
        assert_eq!(
            expand("{train,val}/{0..1}.tar").unwrap(),
            ["train/0.tar", "train/1.tar", "val/0.tar", "val/1.tar"]
        );
        assert_eq!(expand("plain.tar").unwrap(), ["plain.tar"]);
        for (bad, message) in [
            ("{0..", "`{` at `{0..` is never closed"),
            ("{3..1}.tar", "`{3..1}` counts down"),
            ("{a..b}", "`{a..b}`: `a` is not a whole number"),
            ("{x}", "`{x}` is neither a range (a..b) nor alternatives (a,b)"),
            ("{{0..1}}", "nested braces in `{{0..1}` are not supported"),
            (
                "{0..99999999999}",
                "`{0..99999999999}` spells more than 10000000 shard names",
            ),
            ("a}.tar", "`}` in `a}.tar` closes no brace"),
        ] {
            assert_eq!(expand(bad).unwrap_err(), message, "{bad}");
        }
    }

    #[test]
    fn the_base_ends_before_the_first_brace() {
        let source = TarSource::parse("s3://b/laion/{00000..00002}.tar").unwrap();
        assert_eq!(source.base, "s3://b/laion");
        assert_eq!(
            source.names().unwrap().unwrap(),
            ["00000.tar", "00001.tar", "00002.tar"]
        );
        let source = TarSource::parse("http://host/{a,b}/0.tar").unwrap();
        assert_eq!(source.base, "http://host");
        assert_eq!(source.names().unwrap().unwrap(), ["a/0.tar", "b/0.tar"]);
        let single = TarSource::parse("data/shards/00000.tar").unwrap();
        assert_eq!(
            (single.base.as_str(), single.pattern.as_deref()),
            ("data/shards", Some("00000.tar"))
        );
        let relative = TarSource::parse("{0..1}.tar").unwrap();
        assert_eq!(relative.base, ".");
        let prefix = TarSource::parse("s3://b/laion/").unwrap();
        assert_eq!(
            (prefix.base.as_str(), prefix.pattern.as_deref()),
            ("s3://b/laion/", None)
        );
        assert_eq!(prefix.index_name(), "coca-tar-index.json");
        assert_ne!(source.index_name(), single.index_name());
        assert_eq!(
            TarSource::parse("s3://{a,b}/0.tar").unwrap_err().to_string(),
            "s3://{a,b}/0.tar: a shard pattern needs a bucket or host before it"
        );
        assert_eq!(
            TarSource::parse("d/{0..}.tar").unwrap_err().to_string(),
            "d/{0..}.tar: `{0..}`: `` is not a whole number"
        );
    }
}
