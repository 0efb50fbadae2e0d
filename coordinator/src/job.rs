//! The job as the coordinator sees it: its state machine, its workers, and
//! what they report. One value behind a mutex, shared by the gRPC service,
//! the status endpoint and the launcher.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use contract::rpc::{StepMetrics, WorkerPhase};
use contract::status::{CheckpointStatus, EvalPoint, JobState, Point, Recovered, Transition};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Worker {
    pub id: String,
    pub rank: Option<usize>,
    pub host: String,
    pub device: String,
    pub collective_address: String,
    #[serde(skip)]
    pub preferred_rank: Option<usize>,
    pub step: u64,
    #[serde(skip)]
    pub phase: WorkerPhase,
    #[serde(skip)]
    pub last_heartbeat: Instant,
    /// Set by Finish: whether it ended well, and its message.
    pub finished: Option<(bool, String)>,
}

const HISTORY: usize = 2000;

#[derive(Debug)]
pub struct Job {
    pub name: String,
    pub world_size: usize,
    pub total_steps: u64,
    pub start_step: u64,
    pub state: JobState,
    pub transitions: Vec<Transition>,
    pub workers: BTreeMap<String, Worker>,
    pub latest: Option<StepMetrics>,
    pub history: Vec<Point>,
    /// The manifest's [eval] results, one point per evaluated step.
    pub evals: Vec<EvalPoint>,
    /// Each worker's latest cumulative bad-record counts, by (worker, source, reason).
    bad_records: BTreeMap<(String, u32, String), u64>,
    pub refused_calls: u64,
    pub checkpoint: CheckpointStatus,
    /// Shards reported per step not yet committed: rank -> (shard, seconds).
    pub checkpoint_reports: BTreeMap<u64, BTreeMap<usize, (checkpoint::layout::ShardRecord, f64)>>,
    /// A worker's reported failure, held while the watchdog looks for a
    /// silent peer behind it (a dead worker breaks its peers' collectives first).
    pub pending_failure: Option<(String, Instant)>,
    /// What the journal said when this coordinator started.
    pub previous: Option<Recovered>,
    started: Instant,
    running_since: Option<(Instant, u64)>,
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Job {
    pub fn new(name: &str, world_size: usize, total_steps: u64) -> Self {
        Self {
            name: name.to_string(),
            world_size,
            total_steps,
            start_step: 0,
            state: JobState::Pending,
            transitions: vec![Transition {
                state: JobState::Pending,
                at: unix_now(),
                reason: None,
            }],
            workers: BTreeMap::new(),
            latest: None,
            history: Vec::new(),
            evals: Vec::new(),
            bad_records: BTreeMap::new(),
            refused_calls: 0,
            checkpoint: CheckpointStatus::default(),
            checkpoint_reports: BTreeMap::new(),
            pending_failure: None,
            previous: None,
            started: Instant::now(),
            running_since: None,
        }
    }

    /// Moves to `state` unless the job has ended; returns whether it moved.
    pub fn transition(&mut self, state: JobState, reason: Option<String>) -> bool {
        if self.state.is_terminal() || self.state == state {
            return false;
        }
        if state == JobState::Running {
            self.running_since = Some((Instant::now(), self.step()));
        }
        self.state = state;
        self.transitions.push(Transition {
            state,
            at: unix_now(),
            reason,
        });
        true
    }

    /// Steps completed by the whole job (the slowest rank).
    pub fn step(&self) -> u64 {
        self.workers.values().map(|w| w.step).min().unwrap_or(self.start_step)
    }

    pub fn reason(&self) -> Option<&str> {
        self.transitions.last().and_then(|t| t.reason.as_deref())
    }

    pub fn record_metrics(&mut self, worker: &str, rank: Option<usize>, metrics: StepMetrics) {
        // Losses are global (every rank reports the same); rank 0 speaks for the job.
        if rank == Some(0) {
            self.history.push(Point {
                step: metrics.step,
                loss: metrics.loss,
                contrastive: metrics.contrastive,
                captioning: metrics.captioning,
                samples_per_second: metrics.samples_per_second,
            });
            if self.history.len() > HISTORY {
                // Keep every other old point: the chart spans the whole run.
                let old: Vec<Point> = self.history.drain(..HISTORY / 2).step_by(2).collect();
                self.history.splice(0..0, old);
            }
            if !metrics.evals.is_empty() {
                self.evals.push(EvalPoint {
                    step: metrics.step,
                    values: metrics.evals.iter().map(|e| (e.name.clone(), e.value)).collect(),
                });
            }
            self.latest = Some(metrics.clone());
        }
        for bad in &metrics.bad_records {
            self.bad_records
                .insert((worker.to_string(), bad.source, bad.reason.clone()), bad.count);
        }
    }

    /// Bad records met so far, by source and reason, summed over workers.
    pub fn bad_record_totals(&self) -> BTreeMap<(u32, String), u64> {
        let mut totals = BTreeMap::new();
        for ((_, source, reason), count) in &self.bad_records {
            *totals.entry((*source, reason.clone())).or_default() += count;
        }
        totals
    }

    /// Seconds left at the current pace.
    pub fn eta_seconds(&self) -> Option<f64> {
        let (since, first_step) = self.running_since?;
        let done = self.step().checked_sub(first_step)?;
        if done == 0 || self.state != JobState::Running {
            return None;
        }
        let per_step = since.elapsed().as_secs_f64() / done as f64;
        Some(per_step * self.total_steps.saturating_sub(self.step()) as f64)
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}
