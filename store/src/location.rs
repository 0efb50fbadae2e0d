//! The one place a store URL is parsed.

use std::path::{Path, PathBuf};

use crate::StoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    File,
    Memory,
    S3,
    Gcs,
    Azure,
    Http,
    Https,
}

/// A parsed store URL: a scheme, the bucket (or host) and a prefix inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub scheme: Scheme,
    /// Bucket, container, host, or the memory store's name; empty for files.
    pub authority: String,
    /// The prefix, without leading or trailing `/`. For files, the absolute directory.
    pub prefix: String,
}

impl Location {
    /// Parses `url`. A URL without a scheme is a local path, resolved
    /// against `cwd` when relative.
    pub fn parse(url: &str, cwd: &Path) -> Result<Self, StoreError> {
        let bad = |reason: &str| StoreError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        if url.trim().is_empty() {
            return Err(bad("it is empty"));
        }
        let Some((scheme, rest)) = url.split_once("://") else {
            return Ok(Self::file(cwd.join(url)));
        };
        let scheme = match scheme {
            "file" => {
                if !rest.starts_with('/') {
                    return Err(bad(
                        "a file URL needs an absolute path (file:///data/x), or give a plain path",
                    ));
                }
                return Ok(Self::file(PathBuf::from(rest)));
            }
            "memory" => Scheme::Memory,
            "s3" | "s3a" => Scheme::S3,
            "gs" => Scheme::Gcs,
            "az" | "abfs" | "abfss" => Scheme::Azure,
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            other => {
                return Err(bad(&format!(
                    "unknown scheme `{other}`; use file, memory, s3, gs, az, http or https"
                )))
            }
        };
        let (authority, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.is_empty() && scheme != Scheme::Memory {
            return Err(bad("it names no bucket or host"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|part| part == "..") {
            return Err(bad("`..` is not allowed in a store path"));
        }
        Ok(Self {
            scheme,
            authority: authority.to_string(),
            prefix: prefix.to_string(),
        })
    }

    fn file(path: PathBuf) -> Self {
        // Lexical clean-up only: the directory may not exist yet.
        let mut clean = PathBuf::new();
        for part in path.components() {
            match part {
                std::path::Component::ParentDir => {
                    clean.pop();
                }
                std::path::Component::CurDir => {}
                other => clean.push(other),
            }
        }
        Self {
            scheme: Scheme::File,
            authority: String::new(),
            prefix: clean.to_string_lossy().trim_end_matches('/').to_string(),
        }
    }

    /// The URL in canonical form (`file:///abs/dir`, `s3://bucket/prefix`).
    pub fn url(&self) -> String {
        let scheme = match self.scheme {
            Scheme::File => return format!("file://{}", self.prefix),
            Scheme::Memory => "memory",
            Scheme::S3 => "s3",
            Scheme::Gcs => "gs",
            Scheme::Azure => "az",
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        if self.prefix.is_empty() {
            format!("{scheme}://{}", self.authority)
        } else {
            format!("{scheme}://{}/{}", self.authority, self.prefix)
        }
    }

    /// The location of `name` under this one (a sub-prefix).
    pub fn join(&self, name: &str) -> Self {
        let name = name.trim_matches('/');
        let mut joined = self.clone();
        joined.prefix = match (self.prefix.is_empty(), name.is_empty()) {
            (_, true) => self.prefix.clone(),
            (true, false) => name.to_string(),
            (false, false) => format!("{}/{name}", self.prefix),
        };
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<Location, StoreError> {
        Location::parse(url, Path::new("/work/here"))
    }

    #[test]
    fn urls_of_every_scheme_parse() {
        let cases = [
            ("s3://bucket/a/b/", Scheme::S3, "bucket", "a/b"),
            ("s3://bucket", Scheme::S3, "bucket", ""),
            ("gs://b/p", Scheme::Gcs, "b", "p"),
            ("az://container/p/q", Scheme::Azure, "container", "p/q"),
            ("https://host:8080/data", Scheme::Https, "host:8080", "data"),
            ("memory://", Scheme::Memory, "", ""),
            ("memory://name/x", Scheme::Memory, "name", "x"),
        ];
        for (url, scheme, authority, prefix) in cases {
            let location = parse(url).unwrap();
            assert_eq!(
                (location.scheme, location.authority.as_str(), location.prefix.as_str()),
                (scheme, authority, prefix),
                "{url}"
            );
        }
    }

    #[test]
    fn plain_paths_are_files_resolved_against_the_working_directory() {
        assert_eq!(parse("data/demo").unwrap().url(), "file:///work/here/data/demo");
        assert_eq!(parse("./data/../x/").unwrap().url(), "file:///work/here/x");
        assert_eq!(parse("/abs/dir").unwrap().url(), "file:///abs/dir");
        assert_eq!(parse("file:///abs/dir/").unwrap().url(), "file:///abs/dir");
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        let message = |url: &str| parse(url).unwrap_err().to_string();
        assert!(
            message("ftp://x/y").contains("unknown scheme `ftp`"),
            "{}",
            message("ftp://x/y")
        );
        assert!(message("s3:///prefix").contains("no bucket"));
        assert!(message("file://relative/x").contains("absolute path"));
        assert!(message("s3://b/a/../../etc").contains("`..`"));
        assert!(message("").contains("empty"));
    }

    #[test]
    fn join_appends_a_sub_prefix() {
        let root = parse("s3://bucket").unwrap();
        assert_eq!(root.join("ckpt/step-1/").url(), "s3://bucket/ckpt/step-1");
        assert_eq!(parse("s3://bucket/a").unwrap().join("b").url(), "s3://bucket/a/b");
    }
}
