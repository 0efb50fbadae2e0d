//! The job as the coordinator sees it: its state machine, its workers, and
//! what they report. One value behind a mutex, shared by the gRPC service,
//! the status endpoint and the launcher.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use checkpoint::layout::ShardRecord;
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
    /// NCCL jobs: the unique id it sent in its rendezvous request.
    #[serde(skip)]
    pub nccl_unique_id: Vec<u8>,
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
    checkpoint_reports: BTreeMap<u64, BTreeMap<usize, (ShardRecord, f64)>>,
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

    /// Gives every registered worker its rank, once the world is complete:
    /// the engine's indexes when they name every rank once (log files then
    /// match ranks), otherwise a stable order by (host, collective address),
    /// so the same world gets the same ranks. Heartbeats count from `now`.
    pub fn assign_ranks(&mut self, now: Instant) {
        let world = self.world_size;
        let mut preferred: Vec<usize> = self.workers.values().filter_map(|w| w.preferred_rank).collect();
        preferred.sort_unstable();
        let use_preferred = preferred.len() == world && preferred.iter().copied().eq(0..world);
        let mut order: Vec<(String, String, String)> = self
            .workers
            .values()
            .map(|w| (w.host.clone(), w.collective_address.clone(), w.id.clone()))
            .collect();
        order.sort();
        for (fallback_rank, (_, _, id)) in order.into_iter().enumerate() {
            if let Some(worker) = self.workers.get_mut(&id) {
                worker.rank = Some(match (use_preferred, worker.preferred_rank) {
                    (true, Some(rank)) => rank,
                    _ => fallback_rank,
                });
                worker.last_heartbeat = now;
            }
        }
    }

    /// Why the job has failed at `now`, if it has: a worker silent for longer
    /// than `timeout` (with the failure a peer reported before, which a dead
    /// worker usually causes), or a reported failure with no silent peer
    /// behind it once `timeout` has passed.
    pub fn failure(&self, now: Instant, timeout: Duration) -> Option<String> {
        if !matches!(self.state, JobState::Running | JobState::Stopping) {
            return None;
        }
        let silent = |w: &&Worker| w.finished.is_none() && now.saturating_duration_since(w.last_heartbeat) > timeout;
        let lost = self.workers.values().find(silent).map(|w| {
            format!(
                "worker {} (rank {}, {}) lost: no heartbeat for {:.1} s (timeout {:.1} s), last at step {}",
                w.id,
                w.rank.map_or("-".into(), |r| r.to_string()),
                w.host,
                now.saturating_duration_since(w.last_heartbeat).as_secs_f64(),
                timeout.as_secs_f64(),
                w.step
            )
        });
        match (lost, &self.pending_failure) {
            (Some(lost), Some((failure, _))) => Some(format!("{lost}; then {failure}")),
            (Some(lost), None) => Some(lost),
            (None, Some((failure, since))) if now.saturating_duration_since(*since) > timeout => Some(failure.clone()),
            (None, _) => None,
        }
    }

    /// NCCL jobs: the unique id every rank joins, rank 0's, once it sent one.
    pub fn nccl_unique_id(&self) -> Option<&[u8]> {
        self.workers
            .values()
            .find(|w| w.rank == Some(0))
            .map(|w| w.nccl_unique_id.as_slice())
            .filter(|id| !id.is_empty())
    }

    /// Records rank `rank`'s shard of `step`; returns every rank's shard
    /// (and save seconds) once the last one is in: the step can be committed.
    pub fn record_shard(
        &mut self,
        step: u64,
        rank: usize,
        shard: ShardRecord,
        seconds: f64,
    ) -> Option<Vec<(ShardRecord, f64)>> {
        let reports = self.checkpoint_reports.entry(step).or_default();
        reports.insert(rank, (shard, seconds));
        if reports.len() < self.world_size {
            return None;
        }
        self.checkpoint_reports
            .remove(&step)
            .map(|reports| reports.into_values().collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job_of(workers: &[(&str, &str, Option<usize>)]) -> Job {
        let mut job = Job::new("test", workers.len(), 100);
        for (i, (host, address, preferred)) in workers.iter().enumerate() {
            let id = format!("w-{i}");
            job.workers.insert(
                id.clone(),
                Worker {
                    id,
                    rank: None,
                    host: host.to_string(),
                    device: "cpu".into(),
                    collective_address: address.to_string(),
                    preferred_rank: *preferred,
                    step: 0,
                    phase: WorkerPhase::Starting,
                    last_heartbeat: Instant::now(),
                    finished: None,
                    nccl_unique_id: Vec::new(),
                },
            );
        }
        job
    }

    fn ranks(job: &Job) -> Vec<Option<usize>> {
        job.workers.values().map(|w| w.rank).collect()
    }

    #[test]
    fn ranks_follow_the_engines_indexes_only_when_they_name_every_rank_once() {
        let mut job = job_of(&[("b", "1", Some(0)), ("a", "2", Some(1))]);
        job.assign_ranks(Instant::now());
        assert_eq!(ranks(&job), [Some(0), Some(1)]);
        // Two workers asking for rank 0: the (host, address) order decides.
        let mut job = job_of(&[("b", "1", Some(0)), ("a", "2", Some(0))]);
        job.assign_ranks(Instant::now());
        assert_eq!(ranks(&job), [Some(1), Some(0)]);
    }

    #[test]
    fn a_silent_worker_is_lost_only_after_the_timeout() {
        let mut job = job_of(&[("a", "1", None), ("b", "2", None)]);
        let start = Instant::now();
        job.assign_ranks(start);
        job.transition(JobState::Running, None);
        let timeout = Duration::from_secs(10);
        job.workers.get_mut("w-0").unwrap().last_heartbeat = start + Duration::from_secs(8);
        assert_eq!(job.failure(start + Duration::from_secs(9), timeout), None);
        let failure = job.failure(start + Duration::from_secs(11), timeout).unwrap();
        assert!(
            failure.starts_with("worker w-1 (rank 1, b) lost: no heartbeat for 11.0 s"),
            "{failure}"
        );
        // A peer's reported failure waits for the silent worker behind it.
        job.workers.get_mut("w-1").unwrap().last_heartbeat = start + Duration::from_secs(8);
        job.pending_failure = Some(("rank 0: ring broken".into(), start + Duration::from_secs(9)));
        assert_eq!(job.failure(start + Duration::from_secs(12), timeout), None);
        let failure = job.failure(start + Duration::from_secs(20), timeout).unwrap();
        assert!(
            failure.contains("lost") && failure.ends_with("; then rank 0: ring broken"),
            "{failure}"
        );
    }

    #[test]
    fn a_checkpoint_step_is_complete_when_every_rank_reported_its_shard() {
        let mut job = job_of(&[("a", "1", None), ("b", "2", None)]);
        let shard = |rank: usize| ShardRecord {
            file: checkpoint::layout::shard_file(rank, 2),
            bytes: 10,
            sha256: "00".into(),
        };
        assert_eq!(job.record_shard(5, 1, shard(1), 0.5), None);
        assert_eq!(job.record_shard(6, 0, shard(0), 0.1), None);
        let complete = job.record_shard(5, 0, shard(0), 0.2).unwrap();
        assert_eq!(complete, vec![(shard(0), 0.2), (shard(1), 0.5)]);
        // Step 6 still waits for rank 1.
        assert_eq!(job.record_shard(6, 0, shard(0), 0.1), None);
    }
}
