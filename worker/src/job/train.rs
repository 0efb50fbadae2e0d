//! The training loop: one step after another until the last step or until
//! any rank is told to stop, evaluating and checkpointing on schedule.

use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ElementConversion;
use collective::Collective;
use datasets::loader::{BadRecords, Traffic};
use model::state::SavedShard;
use model::CocaModel;
use proto::{BadRecordCount, EvalMetric, SourceTraffic, StepMetrics, WorkerPhase};

use super::client::{Progress, Signals};
use super::setup::{JobSetup, Snapshot};
use super::{StepError, WorkerError, WorkerOutcome};
use crate::kernels::Kernels;

/// How the loop hears from and speaks to the coordinator.
pub(super) struct Reporting<'a> {
    pub progress: &'a Mutex<Progress>,
    /// From the heartbeat thread: stop, or end this generation.
    pub signals: &'a Signals,
    /// Tells the coordinator a shard is written; true when that committed
    /// the step. Called from the thread that writes the checkpoint.
    pub report: &'a (dyn Fn(u64, &SavedShard) -> Result<bool, String> + Sync),
}

/// Trains `job` on backend `B`. Gradients and embeddings cross the
/// collective through host buffers (NCCL stages them on the GPU), so one
/// loop serves CPU and CUDA workers and every world size. Checkpoints are
/// written on another thread while training goes on (one at a time); every
/// save has ended, and its error is this function's, when it returns.
pub(super) fn train<B: AutodiffBackend>(
    job: JobSetup<B>,
    reporting: &Reporting,
    kernels: Option<&mut Kernels>,
) -> Result<WorkerOutcome, WorkerError>
where
    CocaModel<B>: AutodiffModule<B, InnerModule = CocaModel<B::InnerBackend>>,
{
    *reporting.signals.interrupt.lock().expect("signals") = job.collective.interrupt();
    std::thread::scope(|scope| {
        let mut saves = Saves { scope, writing: None };
        let trained = train_steps(job, reporting, kernels, &mut saves);
        *reporting.signals.interrupt.lock().expect("signals") = None;
        let saved = saves.wait();
        // The loop's own error says more than a save it cut short.
        match (trained, saved) {
            (Err(error), _) => Err(error),
            (Ok(_), Err(error)) => Err(error),
            (Ok(outcome), Ok(())) => Ok(outcome),
        }
    })
}

/// The checkpoint being written, if any.
struct Saves<'scope, 'env> {
    scope: &'scope std::thread::Scope<'scope, 'env>,
    writing: Option<std::thread::ScopedJoinHandle<'scope, Result<(), WorkerError>>>,
}

impl<'scope, 'env> Saves<'scope, 'env> {
    /// Waits for the save being written; its outcome.
    fn wait(&mut self) -> Result<(), WorkerError> {
        match self.writing.take() {
            Some(writing) => writing.join().unwrap_or_else(|_| Err(WorkerError::WriterPanicked)),
            None => Ok(()),
        }
    }

    /// Writes `snapshot` on another thread, after the previous save.
    fn start(
        &mut self,
        snapshot: Snapshot,
        report: &'env (dyn Fn(u64, &SavedShard) -> Result<bool, String> + Sync),
    ) -> Result<(), WorkerError> {
        let copied = snapshot.copied();
        let waited = Instant::now();
        self.wait()?;
        tracing::debug!(
            "step {}: checkpoint copied in {:.1} ms, then {:.1} ms waiting for the previous save",
            snapshot.step(),
            copied.as_secs_f64() * 1e3,
            waited.elapsed().as_secs_f64() * 1e3
        );
        self.writing = Some(self.scope.spawn(move || snapshot.write(report)));
        Ok(())
    }
}

/// What every rank agreed on before a step.
enum Agreed {
    Train,
    Stop,
    Regroup,
}

fn train_steps<'env, B: AutodiffBackend>(
    mut job: JobSetup<B>,
    reporting: &Reporting<'env>,
    mut kernels: Option<&mut Kernels>,
    saves: &mut Saves<'_, 'env>,
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
    // A collective that fails means a peer (or the link to it) is gone.
    let ring_broken =
        |step: u64, error: collective::CollectiveError| WorkerError::Regroup(format!("step {step}: {error}"));
    while step < total {
        match agree(job.collective.as_mut(), reporting.signals).map_err(|e| ring_broken(step, e))? {
            Agreed::Train => {}
            Agreed::Regroup => {
                let why = reporting.signals.regroup.lock().expect("signals").clone();
                return Err(WorkerError::Regroup(
                    why.unwrap_or_else(|| "a peer left the ring".into()),
                ));
            }
            Agreed::Stop => {
                // Asked to stop: keep what was trained since the last save.
                if let Some(checkpointing) = job
                    .checkpointing
                    .as_ref()
                    .filter(|c| step > job.start_step && !c.due(step, total))
                {
                    let snapshot = checkpointing
                        .snapshot(step, &job.model, &mut job.trainer, &job.order, job.collective.as_mut())
                        .map_err(|e| ring_broken(step, e))?;
                    saves.start(snapshot, reporting.report)?;
                }
                return Ok(WorkerOutcome::Stopped { step });
            }
        }
        let step_started = Instant::now();
        let batch = job
            .loader
            .next_batch()
            .map_err(|e| step_failed(step, StepError::Batch(e)))?;
        let batch = batch.to_device::<B>(&job.device);
        let learning_rate = job.train.learning_rate_at(step, total);
        let (next, report) = job
            .trainer
            .step(job.model, &batch, learning_rate, job.collective.as_mut())
            .map_err(|e| ring_broken(step, e))?;
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
            samples_per_second: job.train.global_batch as f64 / elapsed.max(1e-9),
            data_wait_share: job.loader.waited().as_secs_f64() / started.elapsed().as_secs_f64().max(1e-9),
            bad_records: bad_record_counts(&job.loader.bad_records()),
            source_epochs: job.order.epochs_after(step),
            evals: Vec::new(),
            source_samples: job.order.samples_after(step),
            traffic: source_traffic(&job.loader.traffic()),
            gradient_norm: f64::from(report.gradient_norm),
        };
        if let Some(eval) = job.eval.as_mut().filter(|e| e.due(step, total)) {
            let results = eval
                .run(job.model.valid(), step)
                .map_err(|e| step_failed(step, StepError::Eval(e)))?;
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
        if step == job.start_step + 1 {
            reporting.signals.report_now.store(true, Ordering::SeqCst);
        }
        if let Some(checkpointing) = job.checkpointing.as_ref().filter(|c| c.due(step, total)) {
            let snapshot = checkpointing
                .snapshot(step, &job.model, &mut job.trainer, &job.order, job.collective.as_mut())
                .map_err(|e| ring_broken(step, e))?;
            saves.start(snapshot, reporting.report)?;
        }
    }
    Ok(WorkerOutcome::Completed { step })
}

/// Every rank stops, or leaves the ring, at the same step: what any rank
/// heard is summed in.
fn agree(collective: &mut dyn Collective, signals: &Signals) -> Result<Agreed, collective::CollectiveError> {
    let stop = signals.stop.load(Ordering::SeqCst);
    let regroup = signals.regroup.lock().expect("signals").is_some();
    let mut flags = [f32::from(u8::from(stop)), f32::from(u8::from(regroup))];
    collective.all_reduce_sum(&mut flags)?;
    Ok(if flags[1] > 0.0 {
        Agreed::Regroup
    } else if flags[0] > 0.0 {
        Agreed::Stop
    } else {
        Agreed::Train
    })
}

/// The loader's fetches as the coordinator receives them.
fn source_traffic(traffic: &Traffic) -> Vec<SourceTraffic> {
    traffic
        .shards
        .iter()
        .zip(&traffic.bytes)
        .enumerate()
        .map(|(source, (&shards, &bytes))| SourceTraffic {
            source: source as u32,
            shards,
            bytes,
        })
        .collect()
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

fn step_failed(step: u64, source: StepError) -> WorkerError {
    WorkerError::Step { step, source }
}
