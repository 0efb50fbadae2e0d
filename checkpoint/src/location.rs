//! A checkpoint location as a whole: its steps, which one a job resumes
//! from (checked shard by shard, falling back past damaged ones), committing
//! a step once every rank reported its shard, and retention.

use store::Store;

use crate::layout::{self, Committed, Meta, ResumeFields, ShardRecord};
use crate::step::{read_state, verify};
use crate::CheckpointError;

/// Where a job starts, as its command line asked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Resume {
    /// The newest committed step, if the location has one.
    #[default]
    Latest,
    /// From step 0; refused when the location already holds a committed step.
    Fresh,
    /// This step directory (`<checkpoint url>/step-N`).
    From(String),
}

/// A committed step chosen to resume from.
#[derive(Debug, Clone, PartialEq)]
pub struct Chosen {
    pub step: u64,
    pub url: String,
    pub meta: Meta,
    /// Newer steps passed over, each with why.
    pub skipped: Vec<String>,
}

/// Committed steps under `root`, newest first, and step directories
/// without COMMITTED (a save that never finished).
pub fn steps(root: &Store) -> Result<(Vec<u64>, Vec<u64>), CheckpointError> {
    let mut committed = Vec::new();
    let mut unfinished = Vec::new();
    let objects = root.list("")?;
    let mut seen = std::collections::BTreeSet::new();
    for object in &objects {
        if let Some((dir, _)) = object.name.split_once('/') {
            if let Some(step) = layout::parse_step_dir(dir) {
                seen.insert(step);
            }
        }
    }
    for step in seen.into_iter().rev() {
        let marker = format!("{}/{}", layout::step_dir(step), layout::COMMITTED);
        if objects.iter().any(|o| o.name == marker) {
            committed.push(step);
        } else {
            unfinished.push(step);
        }
    }
    Ok((committed, unfinished))
}

/// The step a job starts from: `None` for step 0.
pub fn choose(
    root: &Store,
    options: &store::StoreOptions,
    resume: &Resume,
    now: &ResumeFields,
) -> Result<Option<Chosen>, CheckpointError> {
    let check = |url: &str, meta: &Meta| {
        meta.resume
            .check(now)
            .map_err(|(field, was, is)| CheckpointError::Changed {
                url: url.to_string(),
                field,
                was,
                is,
            })
    };
    match resume {
        Resume::Fresh => match steps(root)?.0.first() {
            Some(&step) => Err(CheckpointError::NotFresh {
                url: root.object_url(""),
                step,
            }),
            None => Ok(None),
        },
        Resume::From(url) => {
            let name = url.trim_end_matches('/').rsplit('/').next().unwrap_or_default();
            let step = layout::parse_step_dir(name).ok_or_else(|| {
                CheckpointError::Other(format!("--from {url}: not a step directory (…/step-NNNNNNNN)"))
            })?;
            let dir = Store::open(url, options).map_err(CheckpointError::Store)?;
            let meta = verify(&dir)?;
            check(url, &meta)?;
            Ok(Some(Chosen {
                step,
                url: url.trim_end_matches('/').to_string(),
                meta,
                skipped: Vec::new(),
            }))
        }
        Resume::Latest => {
            let (committed, unfinished) = steps(root)?;
            let any_committed = !committed.is_empty();
            let mut skipped: Vec<String> = unfinished
                .iter()
                .filter(|&&step| committed.first().is_none_or(|&newest| step > newest))
                .map(|&step| format!("{}: no COMMITTED (a save that did not finish)", layout::step_dir(step)))
                .collect();
            let found = newest_whole(root, &committed, &mut skipped, |step, dir| {
                let meta = verify(&dir)?;
                check(&dir.object_url(""), &meta)?;
                Ok((step, dir, meta))
            })?;
            if let Some((step, _, meta)) = found {
                return Ok(Some(Chosen {
                    step,
                    url: step_url(root, step),
                    meta,
                    skipped,
                }));
            }
            // Nothing was ever committed (at most a first save that did not
            // finish): a fresh start loses nothing.
            if skipped.is_empty() || !any_committed {
                Ok(None)
            } else {
                Err(CheckpointError::Other(format!(
                    "{} holds no usable checkpoint: {}; start over with --fresh on another checkpoint.url",
                    root.object_url(""),
                    skipped.join("; ")
                )))
            }
        }
    }
}

/// Writes COMMITTED for `step` (every shard is durable), then keeps the
/// `keep` newest committed steps and drops unfinished saves older than
/// this one. Returns the bytes the step holds.
///
/// `committed_at` (Unix seconds) is recorded in COMMITTED.
/// The URL of step `step`'s directory under `root`, as assignments name it.
pub fn step_url(root: &Store, step: u64) -> String {
    root.at(&layout::step_dir(step))
        .object_url("")
        .trim_end_matches('/')
        .to_string()
}

pub fn commit(
    root: &Store,
    step: u64,
    shards: Vec<ShardRecord>,
    keep: usize,
    committed_at: f64,
) -> Result<u64, CheckpointError> {
    let bytes = shards.iter().map(|s| s.bytes).sum();
    // Never a step with a missing or partial shard: what the ranks
    // reported must be there, at its size, with the step's meta.json.
    let dir = root.at(&layout::step_dir(step));
    let present: std::collections::HashMap<String, u64> = dir
        .list("")?
        .into_iter()
        .map(|object| (object.name, object.bytes))
        .collect();
    let expected = shards
        .iter()
        .map(|shard| (shard.file.as_str(), Some(shard.bytes)))
        .chain([(layout::META, None)]);
    for (file, bytes) in expected {
        let problem = match (present.get(file), bytes) {
            (None, _) => "missing".to_string(),
            (Some(&found), Some(reported)) if found != reported => {
                format!("{found} bytes, its rank reported {reported}")
            }
            _ => continue,
        };
        return Err(CheckpointError::Damaged {
            url: dir.object_url(file),
            message: format!("{problem}; step {step} is not committed"),
        });
    }
    let committed = Committed {
        step,
        committed_at,
        shards,
    };
    let json = serde_json::to_vec_pretty(&committed).expect("COMMITTED serializes");
    root.at(&layout::step_dir(step)).put(layout::COMMITTED, json.into())?;
    let (committed, unfinished) = steps(root)?;
    let drop: Vec<u64> = committed
        .iter()
        .skip(keep)
        .chain(unfinished.iter().filter(|&&s| s < step))
        .copied()
        .collect();
    for old in drop {
        let name = layout::step_dir(old);
        // COMMITTED first: a half-deleted step is never taken for whole.
        root.at(&name).delete(layout::COMMITTED)?;
        for object in root.list(&name)? {
            root.delete(&object.name)?;
        }
    }
    Ok(bytes)
}

/// A committed step's state, read from what a user named.
#[derive(Debug)]
pub struct NamedState {
    pub dir: Store,
    pub meta: Meta,
    pub values: Vec<f32>,
    /// Newer committed steps passed over because they are damaged, each with why.
    pub skipped: Vec<String>,
}

/// The state `url` names: a step directory, `step` under a location, or
/// the location's newest committed step whose shards are all whole.
pub fn read_named(url: &str, root: Store, step: Option<u64>) -> Result<NamedState, CheckpointError> {
    let last = url.trim_end_matches('/').rsplit('/').next().unwrap_or_default();
    let read = |dir: Store| {
        read_state(&dir).map(|(meta, values)| NamedState {
            dir,
            meta,
            values,
            skipped: Vec::new(),
        })
    };
    match (layout::parse_step_dir(last), step) {
        (Some(_), None) => read(root),
        (_, Some(step)) => read(root.at(&layout::step_dir(step))),
        (None, None) => {
            let mut skipped = Vec::new();
            let committed = steps(&root)?.0;
            match newest_whole(&root, &committed, &mut skipped, |_, dir| read(dir))? {
                Some(state) => Ok(NamedState { skipped, ..state }),
                None => Err(CheckpointError::Other(format!("{url}: no committed checkpoint here"))),
            }
        }
    }
}

/// The first of `committed` (newest first) that `read` accepts, passing
/// over damaged steps, each named in `skipped`; `None` when all are damaged.
/// Any other error ends the search.
fn newest_whole<T>(
    root: &Store,
    committed: &[u64],
    skipped: &mut Vec<String>,
    read: impl Fn(u64, Store) -> Result<T, CheckpointError>,
) -> Result<Option<T>, CheckpointError> {
    for &step in committed {
        match read(step, root.at(&layout::step_dir(step))) {
            Err(CheckpointError::Damaged { url, message }) => skipped.push(format!("{url}: {message}")),
            read => return read.map(Some),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> ResumeFields {
        ResumeFields {
            model: "{}".into(),
            sources: vec![],
            datasets: vec![],
            seed: 0,
            global_batch: 1,
            order: "test order".into(),
            imported: None,
            ema_decay: None,
        }
    }

    #[test]
    fn a_location_with_only_an_unfinished_first_save_starts_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let options = store::StoreOptions::default();
        let root = Store::open(&dir.path().display().to_string(), &options).unwrap();
        assert_eq!(choose(&root, &options, &Resume::Latest, &fields()).unwrap(), None);
        root.put(
            "step-00000005/rank-00000-of-00001.safetensors",
            b"partial".to_vec().into(),
        )
        .unwrap();
        assert_eq!(steps(&root).unwrap(), (vec![], vec![5]));
        assert_eq!(choose(&root, &options, &Resume::Latest, &fields()).unwrap(), None);
        assert_eq!(choose(&root, &options, &Resume::Fresh, &fields()).unwrap(), None);
        // A committed step that is damaged is never silently replaced by step 0.
        root.put("step-00000003/COMMITTED", b"{}".to_vec().into()).unwrap();
        let error = choose(&root, &options, &Resume::Latest, &fields())
            .unwrap_err()
            .to_string();
        assert!(error.contains("holds no usable checkpoint"), "{error}");
        assert!(error.contains("step-00000003/COMMITTED: missing field"), "{error}");
    }

    /// Writes committed step `step`: one tensor `w` of two values, `value`
    /// everywhere, in one shard.
    fn save(root: &Store, step: u64, value: f32) {
        let tensors = vec![layout::TensorEntry {
            path: "w".into(),
            shape: vec![2],
            dtype: "F32".into(),
            offset: 0,
            optimizer_state: true,
        }];
        let range = (0, 6);
        let bytes = crate::shard::encode(&tensors, 2, range, step, |data| {
            data.chunks_mut(4).for_each(|c| c.copy_from_slice(&value.to_le_bytes()))
        });
        let record = crate::write_shard(root, step, 0, 1, bytes.into()).unwrap();
        let meta = Meta {
            format: layout::FORMAT.into(),
            version: layout::VERSION,
            step,
            world_size: 1,
            optimizer_steps: step,
            source_samples: vec![],
            source_epochs: vec![],
            rng: layout::RngState {
                seed: 0,
                scheme: "test".into(),
            },
            resume: fields(),
            tokenizer_sha256: String::new(),
            software: "test".into(),
            section_len: 2,
            tensors,
            shards: vec![layout::ShardRange {
                file: record.file.clone(),
                start: range.0,
                end: range.1,
            }],
            ema: None,
        };
        crate::write_meta(root, &meta).unwrap();
        commit(root, step, vec![record], 10, 0.0).unwrap();
    }

    #[test]
    fn a_named_location_reads_its_newest_whole_step_and_says_what_it_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().display().to_string();
        let root = Store::open(&url, &store::StoreOptions::default()).unwrap();
        let error = read_named(&url, root.clone(), None).unwrap_err().to_string();
        assert!(error.ends_with("no committed checkpoint here"), "{error}");
        save(&root, 10, 1.0);
        save(&root, 20, 2.0);
        let newest = read_named(&url, root.clone(), None).unwrap();
        assert_eq!((newest.meta.step, newest.values[0], newest.skipped.len()), (20, 2.0, 0));
        // Damage step 20's shard: step 10 is read, and the damage is named.
        let shard = "step-00000020/rank-00000-of-00001.safetensors";
        let mut bytes = root.get(shard).unwrap().to_vec();
        *bytes.last_mut().unwrap() ^= 1;
        root.put(shard, bytes.into()).unwrap();
        let fallback = read_named(&url, root.clone(), None).unwrap();
        assert_eq!((fallback.meta.step, fallback.values[5]), (10, 1.0));
        assert_eq!(fallback.skipped.len(), 1);
        assert!(fallback.skipped[0].contains(shard) && fallback.skipped[0].contains("checksum mismatch"));
        // A step asked for by number is read as it is: damaged, it is an error.
        assert!(matches!(
            read_named(&url, root.clone(), Some(20)),
            Err(CheckpointError::Damaged { .. })
        ));
        let step_url = format!("{url}/step-00000010");
        let named = read_named(&step_url, root.at("step-00000010"), None).unwrap();
        assert_eq!(named.meta.step, 10);
    }
}
