//! The job as the coordinator sees it: its state machine, its workers, and
//! what they report. One value behind a mutex, shared by the gRPC service,
//! the status endpoint and the launcher.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use checkpoint::layout::ShardRecord;
use contract::status::{CheckpointStatus, EvalPoint, JobState, Phase, Point, Recovered, Restart, Transition};
use proto::{Command, StepMetrics};
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
    pub phase: Phase,
    #[serde(skip)]
    pub last_heartbeat: Instant,
    /// Set by Finish: whether it ended well, and its message.
    pub finished: Option<(bool, String)>,
    /// NCCL jobs: the unique id it sent in its rendezvous request.
    #[serde(skip)]
    pub nccl_unique_id: Vec<u8>,
    /// The generation it waits to join (its rendezvous request) or trains in.
    pub joining: Option<u64>,
}

impl Worker {
    fn describe(&self) -> String {
        format!(
            "worker {} (rank {}, {})",
            self.id,
            self.rank.map_or("-".into(), |r| r.to_string()),
            self.host
        )
    }
}

const HISTORY: usize = 2000;

/// What a recovery may do: the manifest's `[recovery]` with the facts of
/// `[cluster]` and `[train]` it needs.
#[derive(Debug, Clone)]
pub struct RecoveryPolicy {
    pub max_restarts: u32,
    /// cluster.workers: the world every generation asks for.
    pub target_world: usize,
    pub min_workers: usize,
    pub replacement_timeout: Duration,
    pub heartbeat_timeout: Duration,
    /// The global batch, which every world must split evenly.
    pub global_batch: usize,
}

impl RecoveryPolicy {
    pub fn of(manifest: &contract::manifest::Manifest) -> Self {
        Self {
            max_restarts: manifest.recovery.max_restarts,
            target_world: manifest.cluster.workers,
            min_workers: manifest.recovery.min_workers,
            replacement_timeout: Duration::from_millis(manifest.recovery.replacement_timeout_ms),
            heartbeat_timeout: Duration::from_millis(manifest.cluster.heartbeat_timeout_ms),
            global_batch: manifest.train.global_batch,
        }
    }

    /// The largest world of at most `ready` workers the job may go on with
    /// before replacements come: at least `min_workers`, splitting the batch.
    fn reduced_world(&self, ready: usize) -> Option<usize> {
        (self.min_workers..=ready.min(self.target_world))
            .rev()
            .find(|&world| self.global_batch % world == 0)
    }
}

/// What a decision changed besides the job's state (whose transitions
/// the coordinator journals as they come), to log and journal.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Recovering(Restart),
    /// A generation got its ranks and starts at `step`.
    Assigned {
        generation: u64,
        step: u64,
        world: usize,
    },
    /// A rank of the ring that `generation` replaced said it had reached
    /// `step`, further than its restart record knew.
    Reached {
        generation: u64,
        step: u64,
    },
    /// The generation's first step after a recovery completed.
    TrainingAgain {
        generation: u64,
        step: u64,
        /// From the loss.
        seconds: f64,
    },
    /// Workers that fell silent without a rank in the ring, dropped.
    Dropped(Vec<String>),
}

/// What a worker asking to join says of the generation it trained in.
#[derive(Debug, Clone, PartialEq)]
pub struct Left {
    pub generation: u64,
    /// Steps it had completed when it left.
    pub step: u64,
    /// A broken ring, or a regroup the coordinator asked for.
    pub because: String,
}

#[derive(Debug)]
pub struct Job {
    pub name: String,
    /// The current generation's world (fewer than the policy's target after
    /// a recovery that found no replacement).
    pub world_size: usize,
    pub total_steps: u64,
    /// Where the current generation started (or the next one will).
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
    /// What each worker fetched in each generation (its loader starts anew
    /// with each): (generation, worker, source) -> (rank, shards, bytes).
    traffic: BTreeMap<(u64, String, u32), (Option<usize>, u64, u64)>,
    pub refused_calls: u64,
    pub checkpoint: CheckpointStatus,
    /// Shards reported per step not yet committed: rank -> (shard, seconds).
    checkpoint_reports: BTreeMap<u64, BTreeMap<usize, (ShardRecord, f64)>>,
    /// A worker's reported failure, held while the watchdog looks for a
    /// silent peer behind it (a dead worker breaks its peers' collectives first).
    pub pending_failure: Option<(String, Instant)>,
    /// What the journal said when this coordinator started.
    pub previous: Option<Recovered>,
    pub policy: RecoveryPolicy,
    /// The ring's incarnation; calls from an older one are told apart.
    pub generation: u64,
    /// The current generation's collective addresses, by rank (set once
    /// when ranks are assigned: each rendezvous reply takes two of them).
    pub ring: Vec<String>,
    /// Workers waiting for the current generation, as last counted: exact
    /// after every watchdog run, counted up by joins in between.
    joined: usize,
    /// This coordinator's first generation.
    first_generation: u64,
    /// Every recovery over the job's life, earlier coordinators' included.
    pub restarts: Vec<Restart>,
    /// When the current recovery began, until its first step is trained.
    recovering_since: Option<Instant>,
    /// The newest committed step (and its URL): where a recovery rewinds to.
    pub newest_commit: Option<(u64, String)>,
    /// Ids continue across coordinators, so a worker of an earlier one is never taken for a new one.
    next_worker: u64,
    started: Instant,
    running_since: Option<(Instant, u64)>,
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Job {
    /// A job whose first generation is `generation`, with what earlier
    /// coordinators of the same job left in the journal.
    pub fn new(name: &str, total_steps: u64, policy: RecoveryPolicy, previous: Option<Recovered>) -> Self {
        let earlier = previous.clone().unwrap_or_default();
        Self {
            name: name.to_string(),
            world_size: policy.target_world,
            ring: Vec::new(),
            joined: 0,
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
            traffic: BTreeMap::new(),
            refused_calls: 0,
            checkpoint: CheckpointStatus::default(),
            checkpoint_reports: BTreeMap::new(),
            pending_failure: None,
            previous,
            policy,
            generation: earlier.generation + 1,
            first_generation: earlier.generation + 1,
            restarts: earlier.restarts,
            recovering_since: None,
            newest_commit: None,
            next_worker: earlier.workers,
            started: Instant::now(),
            running_since: None,
        }
    }

    /// When the journal says an earlier coordinator of this job died while
    /// it ran, this start is a recovery: returns its record, which counts
    /// against the budget. A job that had ended (relaunched by a person)
    /// starts with its whole budget.
    pub fn coordinator_restarted(&mut self, now: Instant) -> Option<Restart> {
        let previous = self.previous.as_ref()?;
        let state = previous.state.as_deref().unwrap_or("pending");
        let ended = JobState::ALL.iter().any(|s| s.name() == state && s.is_terminal());
        if ended {
            self.restarts.clear();
            return None;
        }
        let restart = Restart {
            generation: self.generation,
            at: unix_now(),
            cause: format!(
                "the coordinator restarted (the journal says {state} at step {})",
                previous.step
            ),
            reached_step: previous.step.max(self.start_step),
            resumed_step: None,
            world: None,
            ranks_after_seconds: None,
            training_after_seconds: None,
        };
        self.restarts.push(restart.clone());
        self.recovering_since = Some(now);
        Some(restart)
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

    /// Recoveries left.
    pub fn restarts_left(&self) -> u32 {
        self.policy.max_restarts.saturating_sub(self.restarts.len() as u32)
    }

    /// Takes a new worker at any time before the end: it waits for the next
    /// generation (a replacement) or the first. Returns its id.
    pub fn register(&mut self, host: String, device: String, preferred_rank: Option<usize>, now: Instant) -> String {
        let id = format!("w-{}", self.next_worker);
        self.next_worker += 1;
        let worker = Worker {
            id: id.clone(),
            rank: None,
            host,
            device,
            collective_address: String::new(),
            preferred_rank,
            step: self.start_step,
            phase: Phase::Starting,
            last_heartbeat: now,
            finished: None,
            nccl_unique_id: Vec::new(),
            joining: None,
        };
        self.workers.insert(id.clone(), worker);
        id
    }

    /// Worker `id` asks to join the coming generation at `address`; when
    /// it left the current one (its ring broke), that begins a recovery.
    /// The step it reached counts for the recovery of the ring it left.
    pub fn ask_to_join(
        &mut self,
        id: &str,
        address: String,
        nccl_unique_id: Vec<u8>,
        left: Option<Left>,
        now: Instant,
    ) -> Vec<Change> {
        let generation = self.generation;
        let Some(worker) = self.workers.get_mut(id) else {
            return Vec::new();
        };
        worker.collective_address = address;
        worker.nccl_unique_id = nccl_unique_id;
        worker.last_heartbeat = now;
        let broke = match &left {
            Some(left) if left.generation == generation && worker.rank.is_some() => {
                Some(format!("{}: {}", worker.describe(), left.because))
            }
            _ => None,
        };
        let mut changes = Vec::new();
        match broke {
            Some(cause) if self.state == JobState::Running => {
                if self.restarts_left() > 0 {
                    changes.push(self.recover(now, cause));
                } else {
                    // As without healing: the watchdog names the silent peer behind it.
                    self.pending_failure.get_or_insert((cause.clone(), now));
                    self.transition(JobState::Stopping, Some(cause));
                }
            }
            _ => {}
        }
        let generation = self.generation;
        if let Some(worker) = self.workers.get_mut(id) {
            let newly = worker.joining != Some(generation) && worker.finished.is_none();
            worker.rank = None;
            worker.joining = Some(generation);
            self.joined += usize::from(newly);
        }
        changes.extend(left.and_then(|left| self.reached(left.generation, left.step)));
        // The whole watchdog only once the count says the world may be
        // complete: running it on every join made a rendezvous of N workers
        // cost N^2 (its periodic run assigns ranks too, e.g. to a reduced world).
        if self.joined >= self.policy.target_world {
            changes.extend(self.tick(now));
        }
        changes
    }

    /// A rank of `generation` completed `step`: the recovery that replaced
    /// that ring counts its steps trained again from there, if further.
    fn reached(&mut self, generation: u64, step: u64) -> Option<Change> {
        let restart = self
            .restarts
            .iter_mut()
            .rev()
            .find(|r| r.generation == generation + 1)
            .filter(|r| step > r.reached_step)?;
        restart.reached_step = step;
        Some(Change::Reached {
            generation: restart.generation,
            step,
        })
    }

    /// A rank of the current ring reported `step` done: the first step
    /// after a recovery ends it (returns the change to journal).
    pub fn completed_step(&mut self, step: u64, now: Instant) -> Option<Change> {
        if step <= self.start_step || self.state != JobState::Running {
            return None;
        }
        let generation = self.generation;
        let restart = self
            .restarts
            .last_mut()
            .filter(|r| r.generation == generation && r.resumed_step.is_some())?;
        let since = self.recovering_since.take()?;
        let seconds = now.saturating_duration_since(since).as_secs_f64();
        restart.training_after_seconds = Some(seconds);
        Some(Change::TrainingAgain {
            generation,
            step,
            seconds,
        })
    }

    /// What the watchdog decides at `now`: silent workers are lost (a
    /// recovery, or the job's failure when no restart is left), a recovery
    /// gives up waiting for replacements, a complete world gets its ranks.
    pub fn tick(&mut self, now: Instant) -> Vec<Change> {
        let timeout = self.policy.heartbeat_timeout;
        let mut changes = Vec::new();
        if self.state.is_terminal() {
            return changes;
        }
        let silent = |w: &Worker| w.finished.is_none() && now.saturating_duration_since(w.last_heartbeat) > timeout;
        let training = matches!(self.state, JobState::Running | JobState::Stopping);
        // Silent workers outside a training ring (spares, or any while no ring trains) just leave.
        let dropped: Vec<String> = self
            .workers
            .values()
            .filter(|w| silent(w) && (w.rank.is_none() || !training))
            .map(|w| w.id.clone())
            .collect();
        if !dropped.is_empty() {
            self.workers.retain(|id, _| !dropped.contains(id));
            changes.push(Change::Dropped(dropped));
        }
        let lost: Vec<String> = self
            .workers
            .values()
            .filter(|w| silent(w))
            .map(|w| {
                format!(
                    "{} lost: no heartbeat for {:.1} s (timeout {:.1} s), last at step {}",
                    w.describe(),
                    now.saturating_duration_since(w.last_heartbeat).as_secs_f64(),
                    timeout.as_secs_f64(),
                    w.step
                )
            })
            .collect();
        if training && !lost.is_empty() {
            let mut cause = lost.join("; ");
            if let Some((failure, _)) = &self.pending_failure {
                cause = format!("{cause}; then {failure}");
            }
            if self.state == JobState::Running && self.restarts_left() > 0 {
                changes.push(self.recover(now, cause));
            } else {
                self.fail(cause);
            }
            return changes;
        }
        if training {
            if let Some((failure, since)) = &self.pending_failure {
                if now.saturating_duration_since(*since) > timeout {
                    let failure = failure.clone();
                    self.fail(failure);
                }
            }
            return changes;
        }
        if let Some(world) = self.ready_world(now) {
            changes.push(self.assign_ranks(now, world));
        }
        changes
    }

    /// Fails the job; after recoveries, the reason lists every one.
    fn fail(&mut self, cause: String) {
        let reason = if self.restarts.is_empty() || self.policy.max_restarts == 0 {
            cause
        } else {
            let mut reason = format!(
                "{cause}; no restart left (recovery.max_restarts = {})",
                self.policy.max_restarts
            );
            for (i, restart) in self.restarts.iter().enumerate() {
                let _ = write!(
                    reason,
                    "; restart {} at step {}: {}",
                    i + 1,
                    restart.reached_step,
                    restart.cause
                );
            }
            reason
        };
        self.transition(JobState::Failed, Some(reason));
    }

    /// Begins a recovery: a new generation that every worker must join
    /// again, from the newest committed step. Lost workers leave the table.
    /// The ring had reached the furthest step a rank reported, until a
    /// survivor says it went further.
    fn recover(&mut self, now: Instant, cause: String) -> Change {
        let timeout = self.policy.heartbeat_timeout;
        let reached_step = self
            .workers
            .values()
            .filter(|w| w.rank.is_some())
            .map(|w| w.step)
            .max()
            .unwrap_or(self.start_step);
        self.workers
            .retain(|_, w| w.finished.is_some() || now.saturating_duration_since(w.last_heartbeat) <= timeout);
        self.generation += 1;
        for worker in self.workers.values_mut() {
            // Survivors ask again with a new listener; replacements already waiting move on.
            let waiting = worker.rank.is_none() && worker.joining.is_some();
            worker.joining = waiting.then_some(self.generation);
            worker.rank = None;
        }
        self.joined = self.ready().count();
        self.pending_failure = None;
        self.recovering_since = Some(now);
        self.start_step = self.newest_commit.as_ref().map_or(self.start_step, |(step, _)| *step);
        if let Some((_, url)) = &self.newest_commit {
            self.checkpoint.resumed_from = Some(url.clone());
        }
        let restart = Restart {
            generation: self.generation,
            at: unix_now(),
            cause: cause.clone(),
            reached_step,
            resumed_step: None,
            world: None,
            ranks_after_seconds: None,
            training_after_seconds: None,
        };
        self.restarts.push(restart.clone());
        self.transition(JobState::Recovering, Some(cause));
        Change::Recovering(restart)
    }

    /// The world the current generation can start with now, if any: the
    /// whole target once that many workers asked, or fewer (at least
    /// min_workers) once a recovery has waited replacement_timeout.
    fn ready_world(&mut self, now: Instant) -> Option<usize> {
        let ready = self.ready().count();
        self.joined = ready;
        if ready >= self.policy.target_world {
            return Some(self.policy.target_world);
        }
        let waited = self
            .recovering_since
            .is_some_and(|since| now.saturating_duration_since(since) >= self.policy.replacement_timeout);
        if self.state == JobState::Recovering && waited {
            return self.policy.reduced_world(ready);
        }
        None
    }

    fn ready(&self) -> impl Iterator<Item = &Worker> {
        self.workers
            .values()
            .filter(|w| w.joining == Some(self.generation) && w.finished.is_none())
    }

    /// Gives `world` of the workers waiting for this generation their
    /// ranks: the engine's indexes when they name every rank once (log files
    /// then match ranks), otherwise a stable order by (host, collective
    /// address), so the same world gets the same ranks. Heartbeats count
    /// from `now`; the generation starts at the newest committed step.
    fn assign_ranks(&mut self, now: Instant, world: usize) -> Change {
        let mut order: Vec<(String, String, String)> = self
            .ready()
            .map(|w| (w.host.clone(), w.collective_address.clone(), w.id.clone()))
            .collect();
        order.sort();
        order.truncate(world);
        let mut preferred: Vec<usize> = order
            .iter()
            .filter_map(|(_, _, id)| self.workers[id].preferred_rank)
            .collect();
        preferred.sort_unstable();
        let use_preferred = preferred.len() == world && preferred.iter().copied().eq(0..world);
        for (fallback_rank, (_, _, id)) in order.into_iter().enumerate() {
            if let Some(worker) = self.workers.get_mut(&id) {
                worker.rank = Some(match (use_preferred, worker.preferred_rank) {
                    (true, Some(rank)) => rank,
                    _ => fallback_rank,
                });
                worker.last_heartbeat = now;
                worker.step = self.start_step;
            }
        }
        self.world_size = world;
        let mut ring: Vec<(usize, String)> = self
            .workers
            .values()
            .filter_map(|w| w.rank.map(|rank| (rank, w.collective_address.clone())))
            .collect();
        ring.sort();
        self.ring = ring.into_iter().map(|(_, address)| address).collect();
        self.checkpoint_reports.clear();
        let start = self.start_step;
        // The chart shows each step once: what is trained again replaces it.
        self.history.retain(|point| point.step <= start);
        self.evals.retain(|point| point.step <= start);
        if let Some(since) = self.recovering_since {
            if let Some(restart) = self.restarts.last_mut() {
                restart.resumed_step = Some(start);
                restart.world = Some(world);
                restart.ranks_after_seconds = Some(now.saturating_duration_since(since).as_secs_f64());
            }
        }
        let reason = match self.restarts.last().filter(|r| r.generation == self.generation) {
            Some(restart) => format!(
                "generation {}: {world} workers from step {start} ({} steps trained again)",
                self.generation,
                restart.steps_trained_again()
            ),
            None => format!("{world} workers, ranks assigned"),
        };
        self.transition(JobState::Running, Some(reason));
        Change::Assigned {
            generation: self.generation,
            step: start,
            world,
        }
    }

    /// Whether a call naming `generation` comes from a ring this
    /// coordinator never formed (an earlier coordinator's, whose worker ids
    /// it may reuse when its journal was lost): such a worker registers again.
    pub fn is_foreign(&self, generation: u64) -> bool {
        generation > self.generation || (generation > 0 && generation < self.first_generation)
    }

    /// What a heartbeat from worker `id`, training in `generation`, is told.
    pub fn command_for(&self, id: &str, generation: u64) -> Command {
        if matches!(self.state, JobState::Stopping | JobState::Stopped | JobState::Failed) {
            return Command::Stop;
        }
        let joining = self.workers.get(id).and_then(|w| w.joining);
        // A ring older than the current one stops and asks to join again.
        if generation != 0 && generation < self.generation && joining != Some(self.generation) {
            return Command::Regroup;
        }
        Command::Continue
    }

    /// Whether a checkpoint shard written by `generation` may still count:
    /// the current generation's, and the previous one's until the next has
    /// its ranks (the survivors' saves finish before they rejoin).
    pub fn accepts_shard_of(&self, generation: u64) -> bool {
        generation == self.generation || (self.state == JobState::Recovering && generation + 1 == self.generation)
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

    /// Worker `id` is done: completed its steps, stopped, or failed (the
    /// job then stops, and fails once every rank has said goodbye).
    pub fn finish(&mut self, id: &str, step: u64, ok: bool, message: String, now: Instant) {
        let Some(worker) = self.workers.get_mut(id) else { return };
        if self.state == JobState::Running && worker.rank.is_none() {
            // Not in the training ring (a spare, or a caller that never
            // joined): it leaves, and the ring goes on whatever it says.
            self.workers.remove(id);
            return;
        }
        worker.step = worker.step.max(step);
        worker.finished = Some((ok, message.clone()));
        let failure = (!ok).then(|| format!("{} failed at step {step}: {message}", worker.describe()));
        if let Some(failure) = &failure {
            self.pending_failure.get_or_insert((failure.clone(), now));
        }
        // The ring decides; a replacement still waiting for a rank does not.
        let ring = || {
            self.workers
                .values()
                .filter(|w| w.rank.is_some() || w.finished.is_some())
        };
        let all_finished = ring().all(|w| w.finished.is_some());
        let all_ok = ring().all(|w| w.finished.as_ref().is_some_and(|(ok, _)| *ok));
        let step = self.step();
        let total = self.total_steps;
        let pending = self.pending_failure.as_ref().map(|(reason, _)| reason.clone());
        if let Some(failure) = failure {
            // A failing worker often only saw a dead peer: the watchdog names it, if any.
            let next = if all_finished {
                JobState::Failed
            } else {
                JobState::Stopping
            };
            self.transition(next, Some(failure));
        } else if let (true, Some(pending)) = (all_finished, pending) {
            self.transition(JobState::Failed, Some(pending));
        } else if all_finished {
            let (state, reason) = match self.state {
                JobState::Stopping => (JobState::Stopped, format!("stopped at step {step}")),
                _ if all_ok && step >= total => (JobState::Completed, format!("{step} steps")),
                _ => (
                    JobState::Failed,
                    format!("workers finished at step {step} of {total} without being told to stop"),
                ),
            };
            self.transition(state, Some(reason));
        }
    }

    /// Steps completed by the whole job (the slowest rank of the ring).
    pub fn step(&self) -> u64 {
        self.workers
            .values()
            .filter(|w| w.rank.is_some())
            .map(|w| w.step)
            .min()
            .unwrap_or(self.start_step)
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
        for fetched in &metrics.traffic {
            let key = (self.generation, worker.to_string(), fetched.source);
            self.traffic.insert(key, (rank, fetched.shards, fetched.bytes));
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

    /// Per source: shards and bytes fetched by every worker in every
    /// generation, and by each rank of the current ring.
    pub fn traffic_by_source(&self) -> BTreeMap<u32, (u64, u64, BTreeMap<usize, (u64, u64)>)> {
        let mut totals: BTreeMap<u32, (u64, u64, BTreeMap<usize, (u64, u64)>)> = BTreeMap::new();
        for ((generation, _, source), (rank, shards, bytes)) in &self.traffic {
            let total = totals.entry(*source).or_default();
            total.0 += shards;
            total.1 += bytes;
            if let (true, Some(rank)) = (*generation == self.generation, rank) {
                let by_rank = total.2.entry(*rank).or_default();
                by_rank.0 += shards;
                by_rank.1 += bytes;
            }
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

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn policy(max_restarts: u32, target_world: usize, min_workers: usize) -> RecoveryPolicy {
        RecoveryPolicy {
            max_restarts,
            target_world,
            min_workers,
            replacement_timeout: Duration::from_secs(60),
            heartbeat_timeout: TIMEOUT,
            global_batch: 12,
        }
    }

    fn secs(start: Instant, seconds: u64) -> Instant {
        start + Duration::from_secs(seconds)
    }

    /// A job whose workers `w-0..` registered from `hosts` and asked to
    /// join at `start`, with the engine's indexes `preferred`.
    fn job_of(policy: RecoveryPolicy, hosts: &[(&str, Option<usize>)], start: Instant) -> Job {
        let mut job = Job::new("test", 100, policy, None);
        for (i, (host, preferred)) in hosts.iter().enumerate() {
            let id = job.register(host.to_string(), "cpu".into(), *preferred, start);
            job.ask_to_join(&id, format!("10.0.0.{i}:1"), Vec::new(), None, start);
        }
        job
    }

    fn ranks(job: &Job) -> Vec<Option<usize>> {
        job.workers.values().map(|w| w.rank).collect()
    }

    /// Every worker but `silent` heartbeats at `at`.
    fn heartbeats(job: &mut Job, silent: &[&str], at: Instant) {
        for worker in job.workers.values_mut().filter(|w| !silent.contains(&w.id.as_str())) {
            worker.last_heartbeat = at;
        }
    }

    /// Worker `id` asks to join, having left generation `left` at the step
    /// the coordinator knows of it.
    fn join(job: &mut Job, id: &str, left: Option<u64>, at: Instant) -> Vec<Change> {
        let step = job.workers.get(id).map_or(0, |w| w.step);
        join_from(job, id, left.map(|generation| (generation, step)), at)
    }

    fn join_from(job: &mut Job, id: &str, left: Option<(u64, u64)>, at: Instant) -> Vec<Change> {
        let left = left.map(|(generation, step)| Left {
            generation,
            step,
            because: "ring broken".into(),
        });
        job.ask_to_join(id, format!("{id}:2"), Vec::new(), left, at)
    }

    #[test]
    fn ranks_follow_the_engines_indexes_only_when_they_name_every_rank_once() {
        let start = Instant::now();
        let job = job_of(policy(0, 2, 2), &[("b", Some(0)), ("a", Some(1))], start);
        assert_eq!(ranks(&job), [Some(0), Some(1)]);
        assert_eq!(job.state, JobState::Running);
        // Two workers asking for rank 0: the (host, address) order decides.
        let job = job_of(policy(0, 2, 2), &[("b", Some(0)), ("a", Some(0))], start);
        assert_eq!(ranks(&job), [Some(1), Some(0)]);
    }

    #[test]
    fn without_a_restart_budget_a_silent_worker_fails_the_job_after_the_timeout() {
        let start = Instant::now();
        let mut job = job_of(policy(0, 2, 2), &[("a", None), ("b", None)], start);
        heartbeats(&mut job, &["w-1"], secs(start, 8));
        assert_eq!(job.tick(secs(start, 9)), []);
        job.tick(secs(start, 11));
        assert_eq!(job.state, JobState::Failed);
        let reason = job.reason().unwrap();
        assert!(
            reason.starts_with("worker w-1 (rank 1, b) lost: no heartbeat for 11.0 s"),
            "{reason}"
        );
        // A peer's broken ring waits for the silent worker behind it, then both are named.
        let mut job = job_of(policy(0, 2, 2), &[("a", None), ("b", None)], start);
        let generation = job.generation;
        join(&mut job, "w-0", Some(generation), secs(start, 9));
        assert_eq!(job.state, JobState::Stopping);
        heartbeats(&mut job, &["w-1"], secs(start, 9));
        job.tick(secs(start, 12));
        let reason = job.reason().unwrap();
        assert!(
            reason.starts_with("worker w-1 (rank 1, b) lost")
                && reason.ends_with("; then worker w-0 (rank 0, a): ring broken"),
            "{reason}"
        );
    }

    #[test]
    fn a_lost_worker_begins_a_recovery_that_resumes_from_the_newest_commit_once_a_replacement_joins() {
        let start = Instant::now();
        let mut job = job_of(policy(3, 2, 2), &[("a", None), ("b", None)], start);
        let first = job.generation;
        job.newest_commit = Some((40, "ckpt/step-00000040".into()));
        assert_eq!(job.completed_step(47, start), None, "no recovery to end");
        // The last step reports: the silent worker had gone furthest.
        for (worker, step) in job.workers.values_mut().zip([46, 47]) {
            worker.step = step;
        }
        heartbeats(&mut job, &["w-1"], secs(start, 8));
        let changes = job.tick(secs(start, 11));
        let [Change::Recovering(restart)] = changes.as_slice() else {
            panic!("{changes:?}")
        };
        assert_eq!((restart.generation, restart.reached_step), (first + 1, 47));
        assert!(
            restart.cause.starts_with("worker w-1 (rank 1, b) lost"),
            "{}",
            restart.cause
        );
        assert_eq!(job.state, JobState::Recovering);
        assert_eq!(
            job.workers.keys().collect::<Vec<_>>(),
            ["w-0"],
            "the lost worker leaves"
        );
        // The survivor's old ring is told to regroup; its new request is not.
        // The survivor says it had completed step 48 (after its last report).
        assert_eq!(job.command_for("w-0", first), Command::Regroup);
        assert_eq!(
            join_from(&mut job, "w-0", Some((first, 48)), secs(start, 12)),
            [Change::Reached {
                generation: first + 1,
                step: 48
            }]
        );
        assert_eq!(job.command_for("w-0", first), Command::Continue);
        assert_eq!(job.reached(first, 45), None, "a lower step changes nothing");
        // A replacement arrives: the world is whole, from step 40.
        let id = job.register("c".into(), "cpu".into(), None, secs(start, 15));
        let changes = join(&mut job, &id, None, secs(start, 15));
        assert_eq!(
            changes,
            [Change::Assigned {
                generation: first + 1,
                step: 40,
                world: 2
            }]
        );
        assert_eq!(job.state, JobState::Running);
        assert_eq!((job.start_step, job.step()), (40, 40));
        assert_eq!(job.checkpoint.resumed_from.as_deref(), Some("ckpt/step-00000040"));
        let restart = &job.restarts[0];
        assert_eq!(
            (restart.resumed_step, restart.world, restart.steps_trained_again()),
            (Some(40), Some(2), 8)
        );
        assert_eq!(restart.ranks_after_seconds, Some(4.0));
        // Training again: the new ring's first completed step, checkpoint load included.
        assert_eq!(job.completed_step(40, secs(start, 17)), None);
        assert_eq!(
            job.completed_step(41, secs(start, 18)),
            Some(Change::TrainingAgain {
                generation: first + 1,
                step: 41,
                seconds: 7.0
            })
        );
        assert_eq!(job.completed_step(42, secs(start, 19)), None, "only the first step");
        assert_eq!(job.restarts[0].training_after_seconds, Some(7.0));
    }

    #[test]
    fn a_worker_lost_during_the_rendezvous_is_dropped_and_the_rest_wait_for_a_replacement() {
        let start = Instant::now();
        let mut job = job_of(policy(3, 2, 2), &[("a", None), ("b", None)], start);
        let first = job.generation;
        join(&mut job, "w-0", Some(first), secs(start, 1));
        assert_eq!(job.state, JobState::Recovering);
        // w-1 never rejoins and falls silent: dropped, not a second restart.
        heartbeats(&mut job, &["w-1"], secs(start, 11));
        assert_eq!(job.tick(secs(start, 12)), [Change::Dropped(vec!["w-1".into()])]);
        assert_eq!((job.restarts.len(), job.state), (1, JobState::Recovering));
        // Its replacement, too, dies before it asked to join; the next one completes the world.
        let late = job.register("c".into(), "cpu".into(), None, secs(start, 12));
        heartbeats(&mut job, &[&late], secs(start, 23));
        assert_eq!(job.tick(secs(start, 23)), [Change::Dropped(vec![late])]);
        let next = job.register("d".into(), "cpu".into(), None, secs(start, 24));
        let changes = join(&mut job, &next, None, secs(start, 24));
        assert!(
            matches!(changes[..], [Change::Assigned { world: 2, .. }]),
            "{changes:?}"
        );
        assert_eq!(job.restarts.len(), 1);
    }

    #[test]
    fn two_losses_at_once_are_one_restart_naming_both() {
        let start = Instant::now();
        let mut job = job_of(policy(3, 3, 3), &[("a", None), ("b", None), ("c", None)], start);
        heartbeats(&mut job, &["w-1", "w-2"], secs(start, 5));
        let changes = job.tick(secs(start, 11));
        let [Change::Recovering(restart)] = changes.as_slice() else {
            panic!("{changes:?}")
        };
        assert!(
            restart.cause.contains("worker w-1 (rank 1, b) lost")
                && restart.cause.contains("worker w-2 (rank 2, c) lost"),
            "{}",
            restart.cause
        );
        assert_eq!(job.workers.len(), 1);
    }

    #[test]
    fn with_no_replacement_the_job_goes_on_with_the_largest_world_that_splits_the_batch() {
        let start = Instant::now();
        let mut policy = policy(3, 4, 1);
        policy.global_batch = 12;
        let mut job = job_of(policy, &[("a", None), ("b", None), ("c", None), ("d", None)], start);
        let first = job.generation;
        join(&mut job, "w-0", Some(first), secs(start, 1));
        join(&mut job, "w-1", Some(first), secs(start, 1));
        join(&mut job, "w-2", Some(first), secs(start, 1));
        heartbeats(&mut job, &["w-3"], secs(start, 30));
        job.tick(secs(start, 30));
        assert_eq!(job.state, JobState::Recovering, "waits for a replacement first");
        heartbeats(&mut job, &[], secs(start, 61));
        let changes = job.tick(secs(start, 61));
        assert!(
            matches!(changes[..], [Change::Assigned { world: 3, .. }]),
            "{changes:?}"
        );
        assert_eq!(job.world_size, 3);
        // A late replacement waits as a spare; it does not hold the ring up.
        let spare = job.register("e".into(), "cpu".into(), None, secs(start, 62));
        join(&mut job, &spare, None, secs(start, 62));
        assert_eq!((job.state, job.workers[&spare].rank), (JobState::Running, None));
        // The world must split the batch and keep min_workers: 12 over 2 does;
        // 8 over 3 does not, and below 3 is not allowed.
        assert_eq!(job.policy.reduced_world(2), Some(2));
        let strict = RecoveryPolicy {
            min_workers: 3,
            global_batch: 8,
            ..job.policy.clone()
        };
        assert_eq!(strict.reduced_world(3), None, "3 does not split 8");
    }

    #[test]
    fn when_the_budget_is_spent_the_job_fails_listing_every_restart() {
        let start = Instant::now();
        let mut job = job_of(policy(2, 2, 2), &[("a", None), ("b", None)], start);
        let mut at = 0;
        for _ in 0..2 {
            let generation = job.generation;
            let survivor = job.workers.values().find(|w| w.rank == Some(0)).unwrap().id.clone();
            let other = job.workers.values().find(|w| w.rank == Some(1)).unwrap().id.clone();
            join(&mut job, &survivor, Some(generation), secs(start, at));
            join(&mut job, &other, Some(generation), secs(start, at));
            assert_eq!(job.state, JobState::Running);
            at += 1;
        }
        assert_eq!(job.restarts_left(), 0);
        heartbeats(&mut job, &["w-1"], secs(start, at));
        job.tick(secs(start, at + 11));
        assert_eq!(job.state, JobState::Failed);
        let reason = job.reason().unwrap();
        assert!(
            reason.contains("no restart left (recovery.max_restarts = 2)"),
            "{reason}"
        );
        assert!(
            reason.contains("; restart 1 at step 0: worker w-0 (rank 0, a): ring broken; restart 2 at step 0:"),
            "{reason}"
        );
    }

    #[test]
    fn calls_from_an_older_ring_are_told_apart_by_their_generation() {
        let start = Instant::now();
        let mut job = job_of(policy(3, 2, 2), &[("a", None), ("b", None)], start);
        let first = job.generation;
        let shard = |rank: usize| ShardRecord {
            file: checkpoint::layout::shard_file(rank, 2),
            bytes: 10,
            sha256: "00".into(),
        };
        // Rank 0 saved step 5, then its ring broke: its shard still counts
        // while the next ring forms, so a step every rank wrote is not lost.
        assert_eq!(job.record_shard(5, 0, shard(0), 0.1), None);
        join(&mut job, "w-1", Some(first), secs(start, 1));
        assert!(job.accepts_shard_of(first) && job.accepts_shard_of(first + 1));
        let complete = job.record_shard(5, 1, shard(1), 0.2).unwrap();
        assert_eq!(complete, vec![(shard(0), 0.1), (shard(1), 0.2)]);
        join(&mut job, "w-0", Some(first), secs(start, 1));
        assert_eq!(job.state, JobState::Running);
        // Once the new ring has its ranks, the old one's saves and steps no longer count.
        assert!(!job.accepts_shard_of(first));
        assert_eq!(
            job.command_for("w-0", first),
            Command::Continue,
            "it asked to join already"
        );
        let stray = job.register("z".into(), "cpu".into(), None, secs(start, 2));
        assert_eq!(
            job.command_for(&stray, 0),
            Command::Continue,
            "a new worker has no ring yet"
        );
        job.workers.get_mut(&stray).unwrap().joining = Some(first);
        assert_eq!(job.command_for(&stray, first), Command::Regroup);
        // A generation this coordinator never formed: an earlier coordinator's worker.
        assert!(!job.is_foreign(first) && !job.is_foreign(0));
        assert!(job.is_foreign(first + 2));
        let mut restarted = Job::new("test", 100, policy(3, 2, 2), None);
        restarted.generation = 7;
        restarted.first_generation = 7;
        assert!(
            restarted.is_foreign(3),
            "a ring of a coordinator whose journal was lost"
        );
    }

    #[test]
    fn a_checkpoint_step_is_complete_when_every_rank_reported_its_shard() {
        let start = Instant::now();
        let mut job = job_of(policy(0, 2, 2), &[("a", None), ("b", None)], start);
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

    #[test]
    fn a_restarted_coordinator_counts_a_restart_unless_the_job_had_ended() {
        let journal = |state: &str| Recovered {
            state: Some(state.into()),
            step: 30,
            events: 5,
            generation: 4,
            workers: 6,
            ..Recovered::default()
        };
        let mut job = Job::new("test", 100, policy(3, 2, 2), Some(journal("running")));
        let restart = job.coordinator_restarted(Instant::now()).unwrap();
        assert_eq!((restart.generation, restart.reached_step), (5, 30));
        // A worker of the lost coordinator's ring (generation 4) went further.
        assert_eq!(
            job.reached(4, 33),
            Some(Change::Reached {
                generation: 5,
                step: 33
            })
        );
        assert_eq!(job.restarts_left(), 2);
        assert_eq!(job.register("a".into(), "cpu".into(), None, Instant::now()), "w-6");
        let mut job = Job::new("test", 100, policy(3, 2, 2), Some(journal("failed")));
        assert_eq!(job.coordinator_restarted(Instant::now()), None);
        assert_eq!(job.restarts_left(), 3);
    }
}
