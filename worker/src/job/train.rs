//! The training loop: one step after another until the last step or until
//! any rank is told to stop, evaluating and checkpointing on schedule.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ElementConversion;
use collective::Collective;
use contract::rpc::{BadRecordCount, EvalMetric, StepMetrics, WorkerPhase};
use datasets::loader::BadRecords;
use model::state::SavedShard;
use model::CocaModel;

use super::client::{Progress, Signals};
use super::setup::JobSetup;
use super::{WorkerError, WorkerOutcome};
use crate::kernels::Kernels;

/// How the loop hears from and speaks to the coordinator.
pub(super) struct Reporting<'a> {
    pub progress: &'a Mutex<Progress>,
    /// From the heartbeat thread: stop, and whether the coordinator is lost.
    pub signals: &'a Signals,
    /// Tells the coordinator a shard is written; true when that committed the step.
    pub report: &'a dyn Fn(u64, &SavedShard) -> Result<bool, String>,
}

/// Trains `job` on backend `B`. Gradients and embeddings cross the
/// collective through host buffers (NCCL stages them on the GPU), so one
/// loop serves CPU and CUDA workers and every world size.
pub(super) fn train<B: AutodiffBackend>(
    mut job: JobSetup<B>,
    manifest: &contract::manifest::Manifest,
    reporting: &Reporting,
    mut kernels: Option<&mut Kernels>,
) -> Result<WorkerOutcome, WorkerError>
where
    CocaModel<B>: AutodiffModule<B, InnerModule = CocaModel<B::InnerBackend>>,
{
    let started = Instant::now();
    let total = job.total_steps;
    let mut step = job.start_step;
    reporting.progress.lock().expect("progress").phase = match kernels {
        Some(_) => WorkerPhase::Compiling,
        None => WorkerPhase::Training,
    };
    let failed = |step: u64, message: String| WorkerError::Step { step, message };
    while step < total {
        if stop_agreed(job.collective.as_mut(), &reporting.signals.stop).map_err(|e| failed(step, e.to_string()))? {
            if let Some(message) = reporting.signals.coordinator_lost.lock().expect("lost").clone() {
                return Err(WorkerError::CoordinatorLost(message));
            }
            // Asked to stop: keep what was trained since the last save.
            if let Some(checkpointing) = job
                .checkpointing
                .as_ref()
                .filter(|c| step > job.start_step && !c.due(step, total))
            {
                checkpointing.save(step, &job.model, &job.trainer, &job.order, reporting.report)?;
            }
            return Ok(WorkerOutcome::Stopped { step });
        }
        let step_started = Instant::now();
        let batch = job.loader.next_batch().map_err(|e| failed(step, e.to_string()))?;
        let batch = batch.to_device::<B>(&job.device);
        let learning_rate = manifest.train.learning_rate_at(step, total);
        let (next, report) = job
            .trainer
            .step(job.model, &batch, learning_rate, job.collective.as_mut())
            .map_err(|e| failed(step, e.to_string()))?;
        job.model = next;
        step += 1;
        let elapsed = step_started.elapsed().as_secs_f64();
        if let Some(kernels) = kernels.as_deref_mut() {
            let first = step == job.start_step + 1;
            kernels.after_step(job.rank, step, first, elapsed);
            if first {
                reporting.progress.lock().expect("progress").phase = WorkerPhase::Training;
            }
        }
        let mut metrics = StepMetrics {
            step,
            loss: f64::from(report.losses.total),
            contrastive: report.losses.contrastive.map_or(0.0, f64::from),
            captioning: report.losses.captioning.map_or(0.0, f64::from),
            learning_rate,
            logit_scale: f64::from(job.model.logit_scale().into_scalar().elem::<f32>()),
            samples_per_second: manifest.train.global_batch as f64 / elapsed.max(1e-9),
            data_wait_share: job.loader.waited().as_secs_f64() / started.elapsed().as_secs_f64().max(1e-9),
            bad_records: bad_record_counts(&job.loader.bad_records()),
            source_epochs: job.order.epochs_after(step),
            evals: Vec::new(),
        };
        if let Some(eval) = job.eval.as_mut().filter(|e| e.due(step, total)) {
            let results = eval
                .run(job.model.valid(), step)
                .map_err(|e| failed(step, format!("eval: {e}")))?;
            metrics.evals = results
                .into_iter()
                .map(|(name, value)| EvalMetric { name, value })
                .collect();
        }
        {
            let mut progress = reporting.progress.lock().expect("progress");
            progress.step = step;
            progress.metrics.push(metrics);
        }
        if let Some(checkpointing) = job.checkpointing.as_ref().filter(|c| c.due(step, total)) {
            checkpointing.save(step, &job.model, &job.trainer, &job.order, reporting.report)?;
        }
    }
    Ok(WorkerOutcome::Completed { step })
}

/// Every rank stops at the same step: a stop any rank heard is summed in.
fn stop_agreed(collective: &mut dyn Collective, stop: &AtomicBool) -> Result<bool, collective::CollectiveError> {
    let mut flag = [f32::from(u8::from(stop.load(Ordering::SeqCst)))];
    collective.all_reduce_sum(&mut flag)?;
    Ok(flag[0] > 0.0)
}

/// The loader's bad-record counts as the coordinator receives them.
fn bad_record_counts(bad: &BadRecords) -> Vec<BadRecordCount> {
    bad.sources
        .iter()
        .enumerate()
        .flat_map(|(source, report)| {
            report.by_reason.iter().map(move |(reason, count)| BadRecordCount {
                source: source as u32,
                reason: reason.clone(),
                count: *count,
            })
        })
        .collect()
}
