//! The status document: what `GET /status` serves and `coca status` reads,
//! typed on both sides.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Pending,
    Rendezvous,
    Running,
    /// A worker was lost: the ring regroups and rewinds to the newest checkpoint.
    Recovering,
    Stopping,
    Completed,
    Stopped,
    Failed,
}

impl JobState {
    pub const ALL: [JobState; 8] = [
        JobState::Pending,
        JobState::Rendezvous,
        JobState::Running,
        JobState::Recovering,
        JobState::Stopping,
        JobState::Completed,
        JobState::Stopped,
        JobState::Failed,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Completed | JobState::Stopped | JobState::Failed)
    }

    pub fn name(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Rendezvous => "rendezvous",
            JobState::Running => "running",
            JobState::Recovering => "recovering",
            JobState::Stopping => "stopping",
            JobState::Completed => "completed",
            JobState::Stopped => "stopped",
            JobState::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Transition {
    pub state: JobState,
    /// Seconds since the Unix epoch.
    pub at: f64,
    pub reason: Option<String>,
}

/// One point of the charts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    pub step: u64,
    pub loss: f64,
    pub contrastive: f64,
    pub captioning: f64,
    pub samples_per_second: f64,
}

/// One evaluation: `{"step": 100, "zeroshot_top1": 0.31, ...}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalPoint {
    pub step: u64,
    #[serde(flatten)]
    pub values: BTreeMap<String, f64>,
}

/// Saves and commits, as the status endpoint shows them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckpointStatus {
    /// The step this job resumed from (its URL), if any.
    pub resumed_from: Option<String>,
    pub last_committed_step: Option<u64>,
    /// The slowest rank's save of the last committed step.
    pub last_save_seconds: Option<f64>,
    pub last_bytes: Option<u64>,
    pub committed: u64,
}

/// One recovery: why the ring was lost, how far it had trained, where it
/// went on from and how long that took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Restart {
    /// The generation the recovery started.
    pub generation: u64,
    /// When the coordinator learned of the loss, in seconds since the Unix epoch.
    pub at: f64,
    pub cause: String,
    /// The highest step a rank of the lost ring completed: what the
    /// survivors said when they left it, else the ranks' last step reports.
    #[serde(alias = "lost_at_step")]
    pub reached_step: u64,
    /// Where it resumed (the newest committed step), once ranks were assigned.
    pub resumed_step: Option<u64>,
    /// The world it resumed on.
    pub world: Option<usize>,
    /// From the loss to the new ranks being handed out.
    #[serde(alias = "seconds")]
    pub ranks_after_seconds: Option<f64>,
    /// From the loss to the new ring's first completed step (the
    /// checkpoint's load and the first step included).
    #[serde(default)]
    pub training_after_seconds: Option<f64>,
}

impl Restart {
    /// Steps trained again because of this recovery.
    pub fn steps_trained_again(&self) -> u64 {
        self.resumed_step
            .map_or(0, |resumed| self.reached_step.saturating_sub(resumed))
    }
}

/// Where the job stood, as the journal tells it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Recovered {
    pub state: Option<String>,
    pub reason: Option<String>,
    pub step: u64,
    pub last_checkpoint: Option<u64>,
    pub events: usize,
    /// The newest generation a coordinator of this job started.
    #[serde(default)]
    pub generation: u64,
    /// Workers registered over the job's life (new ids continue from here).
    #[serde(default)]
    pub workers: u64,
    #[serde(default)]
    pub restarts: Vec<Restart>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub job: String,
    pub state: JobState,
    pub reason: Option<String>,
    pub transitions: Vec<Transition>,
    pub step: u64,
    pub total_steps: u64,
    pub loss: Option<Losses>,
    pub learning_rate: Option<f64>,
    pub logit_scale: Option<f64>,
    pub samples_per_second: Option<f64>,
    pub data_wait_share: Option<f64>,
    /// The latest step's reduced gradient norm, before clipping.
    pub gradient_norm: Option<f64>,
    /// train.grad_clip_norm: the norm gradients are clipped to, if any.
    pub grad_clip_norm: Option<f64>,
    /// train.accumulation: the chunks each rank's rows are processed in.
    pub accumulation: usize,
    /// train.shard_optimizer: AdamW's moments sharded between the ranks.
    #[serde(default)]
    pub shard_optimizer: bool,
    /// train.activation_checkpointing: the towers' blocks computed again.
    #[serde(default)]
    pub activation_checkpointing: bool,
    /// Epochs of each source completed (fractional).
    pub source_epochs: Vec<f64>,
    /// Each source's progress and what the workers fetched from it.
    pub sources: Vec<SourceProgress>,
    pub bad_records: Vec<BadRecords>,
    pub workers: Vec<WorkerReport>,
    /// The ring's incarnation and its world (fewer than cluster.workers
    /// after a recovery that found no replacement).
    pub generation: u64,
    pub world_size: usize,
    /// Every recovery over the job's life, previous coordinators' included.
    pub restarts: Vec<Restart>,
    /// Recoveries left (recovery.max_restarts minus those used).
    pub restarts_left: u32,
    pub checkpoint: CheckpointStatus,
    pub eta_seconds: Option<f64>,
    pub uptime_seconds: f64,
    pub refused_calls: u64,
    pub previous: Option<Recovered>,
    pub history: Vec<Point>,
    pub evals: Vec<EvalPoint>,
}

/// The last result of each evaluation metric, grouped by the step that
/// measured it (oldest first): what the end of a job reports.
pub fn last_evaluations(evals: &[EvalPoint]) -> Vec<(u64, Vec<(&str, f64)>)> {
    let mut last: BTreeMap<&str, (u64, f64)> = BTreeMap::new();
    for point in evals {
        for (metric, value) in &point.values {
            last.insert(metric, (point.step, *value));
        }
    }
    let mut by_step: BTreeMap<u64, Vec<(&str, f64)>> = BTreeMap::new();
    for (metric, (step, value)) in last {
        by_step.entry(step).or_default().push((metric, value));
    }
    by_step.into_iter().collect()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceProgress {
    pub source: u32,
    /// Samples the job has drawn from it.
    pub samples: u64,
    pub epochs: f64,
    /// Shards and bytes fetched from its store, every worker and generation.
    pub shards_fetched: u64,
    pub bytes_fetched: u64,
    /// The current ring's ranks: what each has fetched since the ring formed.
    pub ranks: Vec<RankTraffic>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RankTraffic {
    pub rank: usize,
    pub shards: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Losses {
    pub total: f64,
    pub contrastive: f64,
    pub captioning: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BadRecords {
    pub source: u32,
    pub reason: String,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerReport {
    pub id: String,
    pub rank: Option<usize>,
    pub host: String,
    pub device: String,
    pub step: u64,
    pub phase: Phase,
    pub last_heartbeat_seconds_ago: f64,
    pub finished: Option<bool>,
    pub message: Option<String>,
}

/// What a worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Loading data and the model, joining the ring: no step begun.
    #[default]
    Starting,
    /// In its first step on a GPU: compiling and tuning kernels.
    Compiling,
    Training,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Starting => "starting",
            Phase::Compiling => "compiling",
            Phase::Training => "training",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(step: u64, values: &[(&str, f64)]) -> EvalPoint {
        EvalPoint {
            step,
            values: values.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn the_last_evaluations_are_each_metrics_newest_result_with_its_step() {
        let evals = [
            point(100, &[("zeroshot_top1", 0.1), ("retrieval_r1", 0.2)]),
            point(200, &[("zeroshot_top1", 0.3)]),
            point(300, &[("zeroshot_top1", 0.4), ("caption_loss", 2.5)]),
        ];
        assert_eq!(
            last_evaluations(&evals),
            [
                (100, vec![("retrieval_r1", 0.2)]),
                (300, vec![("caption_loss", 2.5), ("zeroshot_top1", 0.4)]),
            ]
        );
        assert!(last_evaluations(&[]).is_empty());
    }

    #[test]
    fn a_journal_of_an_earlier_release_reads_its_restarts() {
        let line =
            r#"{"generation":2,"at":3.2,"cause":"lost","lost_at_step":50,"resumed_step":40,"world":1,"seconds":0.5}"#;
        let restart: Restart = serde_json::from_str(line).unwrap();
        assert_eq!((restart.reached_step, restart.steps_trained_again()), (50, 10));
        assert_eq!(
            (restart.ranks_after_seconds, restart.training_after_seconds),
            (Some(0.5), None)
        );
    }
}
