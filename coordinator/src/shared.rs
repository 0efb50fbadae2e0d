//! The coordinator's state, shared by the gRPC service, the status
//! endpoint, the watchdog and the launcher: the job behind a mutex, the
//! journal, the metrics log, and what happens on every state change.

use std::sync::Mutex;

use contract::manifest::Manifest;
use contract::plan::JobPlan;
use contract::status::JobState;
use proto::auth::Guard;
use tokio::sync::watch;

use crate::job::{self, Change, Job};
use crate::journal::{Event, Journal};
use crate::tensorboard::EventLog;
use crate::METRICS_FILE;

/// State shared by the gRPC service, the status endpoint and the watchdog.
pub struct Shared {
    pub job: Mutex<Job>,
    pub manifest: Manifest,
    /// What every rank receives, and its wire form.
    pub plan: JobPlan,
    pub plan_json: String,
    pub(crate) journal: Mutex<Journal>,
    /// `<job.dir>/metrics.jsonl`: every step's metrics, appended across resumes.
    pub(crate) metrics_log: Mutex<Option<std::fs::File>>,
    /// `[logging] tensorboard`: the same metrics as TensorBoard events.
    pub(crate) tensorboard: Mutex<Option<EventLog>>,
    /// Bumped when ranks are assigned and when the job ends.
    pub(crate) ready: watch::Sender<bool>,
    pub(crate) guard: Guard,
}

impl Shared {
    /// Moves the job to `state`, logs and journals it.
    pub fn transition(&self, state: JobState, reason: Option<String>) {
        self.decide(|job| {
            job.transition(state, reason);
            Vec::new()
        });
    }

    /// Runs a decision on the job, then logs and journals what it changed:
    /// its state transitions, recoveries and rank assignments.
    pub(crate) fn decide(&self, decision: impl FnOnce(&mut Job) -> Vec<Change>) {
        let mut job = self.job.lock().expect("job state");
        let before = job.transitions.len();
        let changes = decision(&mut job);
        let transitions = job.transitions[before..].to_vec();
        drop(job);
        // Rendezvous calls waiting for ranks, or for the end, look again
        // only when either may have come: waking thousands of them on every
        // join made a rendezvous quadratic in the world.
        let wake = !transitions.is_empty()
            || changes
                .iter()
                .any(|change| matches!(change, Change::Assigned { .. } | Change::Dropped(_)));
        self.announce(changes);
        let mut ended = false;
        for transition in transitions {
            let state = transition.state;
            match &transition.reason {
                Some(reason) => tracing::info!("job {} ({reason})", state.name()),
                None => tracing::info!("job {}", state.name()),
            }
            ended |= state.is_terminal();
            self.journal(Event::State {
                state: state.name().to_string(),
                at: transition.at,
                reason: transition.reason,
            });
        }
        if wake {
            let _ = self.ready.send(ended);
        }
    }

    /// Logs and journals what a decision changed besides the job's state.
    pub(crate) fn announce(&self, changes: Vec<Change>) {
        for change in changes {
            match change {
                Change::Recovering(restart) => {
                    tracing::warn!(
                        "recovering (generation {}, restart {}): {}",
                        restart.generation,
                        self.job.lock().expect("job state").restarts.len(),
                        restart.cause
                    );
                    self.journal(Event::Restart(restart));
                }
                Change::Assigned {
                    generation,
                    step,
                    world,
                } => {
                    // Steps after the one the ring goes on from are trained again.
                    if let Some(log) = self.tensorboard.lock().expect("tensorboard").as_mut() {
                        log.resumed_from(step);
                    }
                    self.journal(Event::Assigned {
                        generation,
                        step,
                        world,
                        at: job::unix_now(),
                    })
                }
                Change::Reached { generation, step } => self.journal(Event::Reached { generation, step }),
                Change::TrainingAgain {
                    generation,
                    step,
                    seconds,
                } => {
                    tracing::info!(
                        "training again at step {step} (generation {generation}), {seconds:.1} s after the loss"
                    );
                    self.journal(Event::TrainingAgain {
                        generation,
                        step,
                        at: job::unix_now(),
                    })
                }
                Change::Dropped(ids) => tracing::info!("dropped silent workers {}", ids.join(", ")),
            }
        }
    }

    /// Appends rank 0's step metrics (the job's) to metrics.jsonl.
    pub(crate) fn log_metrics(&self, metrics: &[proto::StepMetrics]) {
        use std::io::Write;
        let mut log = self.metrics_log.lock().expect("metrics log");
        let Some(file) = log.as_mut() else { return };
        let mut lines = String::new();
        for m in metrics {
            let mut line = serde_json::json!({
                "step": m.step,
                "loss": m.loss,
                "contrastive": m.contrastive,
                "captioning": m.captioning,
                "learning_rate": m.learning_rate,
                "logit_scale": m.logit_scale,
                "samples_per_second": m.samples_per_second,
                "data_wait_share": m.data_wait_share,
                "gradient_norm": m.gradient_norm,
            });
            if !m.evals.is_empty() {
                line["evals"] = m
                    .evals
                    .iter()
                    .map(|e| (e.name.clone(), serde_json::json!(e.value)))
                    .collect();
            }
            lines.push_str(&format!("{line}\n"));
        }
        if let Err(error) = file.write_all(lines.as_bytes()) {
            tracing::warn!("cannot append to {METRICS_FILE}: {error}");
            *log = None;
        }
        drop(log);
        if let Some(events) = self.tensorboard.lock().expect("tensorboard").as_mut() {
            let now = job::unix_now();
            for m in metrics {
                events.record(m, now);
            }
        }
    }

    /// Puts the TensorBoard file (on checkpoint commits and at the end);
    /// a store that fails is logged, and the next flush tries again.
    /// Blocks on the store: not from the async runtime's threads.
    pub(crate) fn flush_tensorboard(&self) {
        if let Some(events) = self.tensorboard.lock().expect("tensorboard").as_mut() {
            if let Err(error) = events.flush() {
                tracing::warn!("cannot write {}: {error}", events.url());
            }
        }
    }

    pub(crate) fn journal(&self, event: Event) {
        if let Err(error) = self.journal.lock().expect("journal").append(&event) {
            tracing::error!("{error}");
        }
    }

    /// Asks the workers to stop after their current step.
    pub fn request_stop(&self, reason: &str) {
        let state = self.job.lock().expect("job state").state;
        match state {
            JobState::Running => self.transition(JobState::Stopping, Some(reason.to_string())),
            // No ring trains: the newest committed step is where the job stands.
            JobState::Pending | JobState::Rendezvous | JobState::Recovering => {
                self.transition(JobState::Stopped, Some(reason.to_string()))
            }
            _ => {}
        }
    }

    pub fn refused_calls(&self) -> u64 {
        self.guard.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The watchdog's look at the heartbeats: losses, recoveries, new ranks.
    pub(crate) fn check_heartbeats(&self) {
        self.decide(|job| job.tick(std::time::Instant::now()));
    }
}
