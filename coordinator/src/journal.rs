//! The coordinator's journal: one JSON line per event (state changes, steps
//! reached, checkpoints committed, workers, recoveries and the ranks each
//! generation got) in the job directory, so a restarted coordinator knows
//! where the job stood, which generation comes next and what its restart
//! budget has left.

use contract::status::{Recovered, Restart};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const FILE: &str = "journal.jsonl";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    State {
        state: String,
        at: f64,
        reason: Option<String>,
    },
    Step {
        step: u64,
        at: f64,
    },
    Checkpoint {
        step: u64,
        at: f64,
    },
    /// A worker registered.
    Worker {
        id: String,
        host: String,
        at: f64,
    },
    /// A recovery began.
    Restart(Restart),
    /// A generation got its ranks and starts at `step`.
    Assigned {
        generation: u64,
        step: u64,
        world: usize,
        at: f64,
    },
    /// A rank of the ring `generation` replaced had reached `step`.
    Reached {
        generation: u64,
        step: u64,
    },
    /// The first step after the recovery that began `generation` is done.
    TrainingAgain {
        generation: u64,
        step: u64,
        at: f64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("journal {path}, line {line}: {message}")]
    Line { path: String, line: usize, message: String },
}

pub struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Opens (creating) the journal in `dir` and reads what it already holds.
    pub fn open(dir: &Path) -> Result<(Self, Recovered), JournalError> {
        let path = dir.join(FILE);
        let io = |source| JournalError::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let recovered = if path.exists() {
            read(&path)?
        } else {
            Recovered::default()
        };
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io)?;
        Ok((Self { path, file }, recovered))
    }

    pub fn append(&mut self, event: &Event) -> Result<(), JournalError> {
        let mut line = serde_json::to_string(event).expect("events serialise");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(|source| JournalError::Io {
                path: self.path.display().to_string(),
                source,
            })
    }
}

/// Replays a journal. A torn last line (a crash mid-write) is ignored;
/// damage anywhere else is an error naming the line.
pub fn read(path: &Path) -> Result<Recovered, JournalError> {
    let file = File::open(path).map_err(|source| JournalError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let lines: Vec<String> = BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .map_err(|source| JournalError::Io {
            path: path.display().to_string(),
            source,
        })?;
    let mut recovered = Recovered::default();
    for (number, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let event: Event = match serde_json::from_str(line) {
            Ok(event) => event,
            Err(_) if number + 1 == lines.len() => break,
            Err(error) => {
                return Err(JournalError::Line {
                    path: path.display().to_string(),
                    line: number + 1,
                    message: error.to_string(),
                })
            }
        };
        recovered.events += 1;
        match event {
            Event::State { state, reason, .. } => {
                recovered.state = Some(state);
                recovered.reason = reason;
            }
            Event::Step { step, .. } => recovered.step = recovered.step.max(step),
            Event::Checkpoint { step, .. } => recovered.last_checkpoint = Some(step),
            Event::Worker { .. } => recovered.workers += 1,
            Event::Restart(restart) => {
                recovered.generation = recovered.generation.max(restart.generation);
                recovered.restarts.push(restart);
            }
            Event::Assigned {
                generation,
                step,
                world,
                at,
            } => {
                recovered.generation = recovered.generation.max(generation);
                if let Some(restart) = restart_of(&mut recovered, generation) {
                    restart.resumed_step = Some(step);
                    restart.world = Some(world);
                    restart.ranks_after_seconds = Some(at - restart.at);
                }
            }
            Event::Reached { generation, step } => {
                if let Some(restart) = restart_of(&mut recovered, generation) {
                    restart.reached_step = restart.reached_step.max(step);
                }
            }
            Event::TrainingAgain { generation, at, .. } => {
                if let Some(restart) = restart_of(&mut recovered, generation) {
                    restart.training_after_seconds = Some(at - restart.at);
                }
            }
        }
    }
    Ok(recovered)
}

/// The newest recovery, when it began `generation`.
fn restart_of(recovered: &mut Recovered, generation: u64) -> Option<&mut Restart> {
    recovered.restarts.last_mut().filter(|r| r.generation == generation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_replays_where_the_job_stood_and_tolerates_a_torn_tail() {
        let dir = std::env::temp_dir().join(format!("coca-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (mut journal, recovered) = Journal::open(&dir).unwrap();
        assert_eq!(recovered, Recovered::default());
        for event in [
            Event::State {
                state: "running".into(),
                at: 1.0,
                reason: None,
            },
            Event::Step { step: 40, at: 2.0 },
            Event::Checkpoint { step: 40, at: 2.5 },
            Event::Step { step: 50, at: 3.0 },
            Event::Worker {
                id: "w-0".into(),
                host: "a".into(),
                at: 3.1,
            },
            Event::Restart(Restart {
                generation: 2,
                at: 3.2,
                cause: "worker w-1 lost".into(),
                reached_step: 50,
                resumed_step: None,
                world: None,
                ranks_after_seconds: None,
                training_after_seconds: None,
            }),
            Event::Reached {
                generation: 2,
                step: 52,
            },
            Event::Reached {
                generation: 2,
                step: 51,
            },
            Event::Assigned {
                generation: 2,
                step: 40,
                world: 1,
                at: 3.7,
            },
            Event::TrainingAgain {
                generation: 2,
                step: 41,
                at: 4.7,
            },
            Event::State {
                state: "failed".into(),
                at: 4.0,
                reason: Some("worker w-1 lost".into()),
            },
        ] {
            journal.append(&event).unwrap();
        }
        drop(journal);
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join(FILE))
            .unwrap()
            .write_all(b"{\"event\": \"st")
            .unwrap();
        let (_, recovered) = Journal::open(&dir).unwrap();
        assert_eq!(recovered.state.as_deref(), Some("failed"));
        assert_eq!(recovered.reason.as_deref(), Some("worker w-1 lost"));
        assert_eq!(
            (recovered.step, recovered.last_checkpoint, recovered.events),
            (50, Some(40), 11)
        );
        assert_eq!((recovered.generation, recovered.workers), (2, 1));
        let restart = &recovered.restarts[0];
        assert_eq!(
            (restart.resumed_step, restart.world, restart.steps_trained_again()),
            (Some(40), Some(1), 12)
        );
        assert!((restart.ranks_after_seconds.unwrap() - 0.5).abs() < 1e-9);
        assert!((restart.training_after_seconds.unwrap() - 1.5).abs() < 1e-9);
        // Damage before the last line is an error with its line number.
        std::fs::write(dir.join(FILE), "garbage\n{\"event\":\"step\",\"step\":1,\"at\":0}\n").unwrap();
        let error = read(&dir.join(FILE)).unwrap_err().to_string();
        assert!(error.contains("journal.jsonl, line 1:"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
