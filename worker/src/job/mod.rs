//! The worker's side of a job: register with the coordinator, rendezvous,
//! join the collective ring, then train on the job's data until the last
//! step or until told to stop, heartbeating all along.

mod client;
pub(crate) mod setup;
mod train;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burn::tensor::backend::{Device as _, DeviceId};
use collective::tcp::RingListener;
use contract::manifest::Backend;
use contract::plan::{JobPlan, StorePlan};
use model::backend::{CpuTrain, WgpuTrain};
use model::state::SavedShard;
use proto::auth::Token;
use proto::{Assignment, CheckpointShard, FinishRequest, WorkerPhase};

use client::{
    connect, register, rendezvous, send_heartbeat, spawn_heartbeat, Client, LeftRing, NoAssignment, Progress,
    Registered, Signals,
};
use setup::JobSetup;
use train::{train, Reporting};

use crate::kernels::Kernels;

#[cfg(not(feature = "cuda"))]
const NCCL_WITHOUT_CUDA: WorkerError = WorkerError::WithoutCuda {
    setting: "cluster.collective = \"nccl\"",
};

/// What a worker is told on its command line.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// e.g. `http://127.0.0.1:7070`, or `https://...` (TLS, verified against `ca`).
    pub coordinator: String,
    /// The CA certificate (PEM) an `https://` coordinator's certificate must be signed by.
    pub ca: Option<std::path::PathBuf>,
    pub token: Token,
    /// The address peers reach this worker's collective listener on.
    pub listen: IpAddr,
    /// How this worker names its host on the status page.
    pub host: String,
    /// How long to keep trying to reach the coordinator.
    pub connect_timeout: Duration,
    /// The accelerator's ordinal (CUDA); the CPU backend has one device.
    pub device: usize,
    /// The engine's index for this worker, asked for as its rank.
    pub preferred_rank: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot reach the coordinator at {url} within {seconds} s: {message}")]
    Unreachable { url: String, seconds: u64, message: String },
    #[error("TLS to the coordinator at {url}: {message}")]
    Tls { url: String, message: String },
    #[error("the coordinator refused {call}: {message}")]
    Refused { call: &'static str, message: String },
    #[error("{setting}: this coca was built without CUDA (cargo build --features cuda)")]
    WithoutCuda { setting: &'static str },
    #[error("{0}")]
    Device(String),
    #[error("data.tokenizer: {url} has {tokens} tokens, more than model.vocab_size = {vocab_size}")]
    TokenizerTooLarge {
        url: String,
        tokens: usize,
        vocab_size: usize,
    },
    #[error("the coordinator named the peer address `{0}`, which is not an address")]
    PeerAddress(String),
    #[error("{url} holds step {found}, the coordinator said step {expected}")]
    ResumedStep { url: String, found: u64, expected: u64 },
    #[error("the checkpoint writer panicked")]
    WriterPanicked,
    #[error("cannot start the RPC runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Auth(#[from] proto::auth::AuthError),
    #[error("the coordinator's job plan")]
    Plan(#[from] contract::plan::PlanError),
    /// A store the job names (its field first) cannot be opened or read.
    #[error("{field}")]
    Store { field: String, source: store::StoreError },
    #[error("{field}")]
    Dataset {
        field: String,
        source: datasets::dataset::DatasetError,
    },
    #[error("{field}")]
    Templates {
        field: String,
        source: datasets::prompt::PromptError,
    },
    #[error("data.tokenizer")]
    Tokenizer(#[source] datasets::tokenizer::TokenizerError),
    #[error("the data loader")]
    Loader(#[from] datasets::loader::LoaderError),
    #[error("resuming from {url}")]
    Resume {
        url: String,
        source: checkpoint::CheckpointError,
    },
    #[error("the collective")]
    Collective(#[from] collective::CollectiveError),
    #[error("the GPU's kernels")]
    Kernels(#[from] crate::kernels::KernelError),
    #[error("step {step}")]
    Step {
        step: u64,
        #[source]
        source: StepError,
    },
    /// This generation of the ring ended (a peer is gone, the coordinator
    /// recovers or is lost): not this worker's failure, it joins the next.
    #[error("left the ring: {0}")]
    Regroup(String),
}

/// What failed within a training step, other than the collective.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("its batch")]
    Batch(#[source] datasets::loader::LoaderError),
    #[error("evaluation")]
    Eval(#[source] model::eval::tasks::EvalError),
    #[error("writing its checkpoint")]
    Checkpoint(#[source] checkpoint::CheckpointError),
}

/// How the worker's part ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerOutcome {
    Completed { step: u64 },
    Stopped { step: u64 },
}

/// The worker's whole part in a job: connect, register, then join and
/// train one generation of the ring after another (a recovery or a
/// restarted coordinator starts the next) until the job ends; say goodbye.
pub fn run(options: &WorkerOptions) -> Result<WorkerOutcome, WorkerError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(WorkerError::Runtime)?;
    let mut client = runtime.block_on(connect(options))?;
    let mut registered = runtime.block_on(register(&client, options))?;
    let progress = Arc::new(Mutex::new(Progress {
        id: registered.id.clone(),
        ..Progress::default()
    }));
    let signals = Arc::new(Signals::default());
    let heartbeat = spawn_heartbeat(
        runtime.handle().clone(),
        client.clone(),
        registered.heartbeat,
        progress.clone(),
        signals.clone(),
    );
    let mut generations = Generations {
        runtime: &runtime,
        client: &client,
        options,
        progress: &progress,
        signals: &signals,
        gpu: None,
    };
    let result = generations.run(&mut registered);
    signals.done.store(true, Ordering::SeqCst);
    let _ = heartbeat.join();
    // The last step's metrics, before saying goodbye.
    let _ = send_heartbeat(runtime.handle(), &mut client, &progress);
    let step = progress.lock().expect("progress").step;
    let (ok, message) = match &result {
        Ok(_) => (true, String::new()),
        // The coordinator is told the error with its causes.
        Err(error) => (false, store::error_chain(error)),
    };
    let finished = runtime.block_on(client.finish(FinishRequest {
        worker_id: registered.id,
        step,
        ok,
        message,
    }));
    if let (Err(status), Ok(_)) = (&finished, &result) {
        tracing::warn!("could not report the end to the coordinator: {}", status.message());
    }
    result
}

/// One worker's succession of rings.
struct Generations<'a> {
    runtime: &'a tokio::runtime::Runtime,
    client: &'a Client,
    options: &'a WorkerOptions,
    progress: &'a Arc<Mutex<Progress>>,
    signals: &'a Arc<Signals>,
    /// A GPU worker's kernels and device, prepared in its first generation.
    gpu: Option<PreparedGpu>,
}

impl Generations<'_> {
    fn run(&mut self, registered: &mut Registered) -> Result<WorkerOutcome, WorkerError> {
        // Said in every rendezvous until the next generation ends, to a
        // coordinator registered with again too: it counts the steps trained again.
        let mut left: Option<LeftRing> = None;
        loop {
            if self.signals.register_again.swap(false, Ordering::SeqCst) {
                *registered = self.runtime.block_on(register(self.client, self.options))?;
                self.progress.lock().expect("progress").id = registered.id.clone();
                tracing::info!("worker {}: registered again", registered.id);
            }
            let listener = RingListener::bind(SocketAddr::new(self.options.listen, 0))?;
            let joined = self.runtime.block_on(rendezvous(
                &mut self.client.clone(),
                registered,
                listener.local_addr(),
                left.clone(),
            ));
            let assignment = match joined {
                Ok(assignment) => assignment,
                Err(NoAssignment::RegisterAgain(why)) => {
                    tracing::info!("worker {}: {why}; registering again", registered.id);
                    self.signals.register_again.store(true, Ordering::SeqCst);
                    continue;
                }
                Err(NoAssignment::JobOver { completed: true, .. }) => {
                    let step = self.progress.lock().expect("progress").step;
                    return Ok(WorkerOutcome::Stopped { step });
                }
                Err(NoAssignment::JobOver { message, .. }) => {
                    return Err(WorkerError::Refused {
                        call: "rendezvous",
                        message,
                    })
                }
                Err(NoAssignment::Failed(error)) => return Err(error),
            };
            let generation = assignment.generation;
            match self.train(&registered.id, &assignment, listener) {
                Err(WorkerError::Regroup(why)) => {
                    tracing::warn!("worker {}: generation {generation} ended: {why}", registered.id);
                    left = Some(LeftRing {
                        generation,
                        step: self.progress.lock().expect("progress").step,
                        because: why,
                    });
                }
                ended => return ended,
            }
        }
    }

    /// Trains one generation: its assignment, from its start step.
    fn train(
        &mut self,
        id: &str,
        assignment: &Assignment,
        listener: RingListener,
    ) -> Result<WorkerOutcome, WorkerError> {
        let plan = assignment.job_plan()?;
        tracing::info!(
            "worker {id}: rank {} of {}, steps {}..{} (generation {})",
            assignment.rank,
            assignment.world_size,
            assignment.start_step,
            plan.total_steps,
            assignment.generation
        );
        {
            let mut progress = self.progress.lock().expect("progress");
            progress.generation = assignment.generation;
            progress.step = assignment.start_step;
            progress.phase = WorkerPhase::Starting;
            progress.metrics.clear();
        }
        *self.signals.regroup.lock().expect("signals") = None;
        let report = |step: u64, saved: &SavedShard| -> Result<bool, String> {
            let shard = CheckpointShard {
                worker_id: id.to_string(),
                step,
                file: saved.record.file.clone(),
                bytes: saved.record.bytes,
                sha256: saved.record.sha256.clone(),
                seconds: saved.seconds,
                generation: assignment.generation,
            };
            self.runtime
                .block_on(self.client.clone().report_checkpoint(shard))
                .map(|reply| reply.into_inner().committed)
                .map_err(|status| status.message().to_string())
        };
        let reporting = Reporting {
            progress: self.progress,
            signals: self.signals,
            report: &report,
        };
        train_on_backend(
            &plan,
            assignment,
            self.options.device,
            listener,
            &reporting,
            &mut self.gpu,
        )
    }
}

/// Builds the job on the plan's backend and trains it. A GPU worker
/// prepares its kernels (cache, cubecl settings) and opens its device in its
/// first generation and keeps both for the next: cubecl is configured once
/// per process.
fn train_on_backend(
    plan: &JobPlan,
    assignment: &Assignment,
    ordinal: usize,
    listener: RingListener,
    reporting: &Reporting,
    gpu: &mut Option<PreparedGpu>,
) -> Result<WorkerOutcome, WorkerError> {
    let options = store_options(&plan.store);
    match plan.cluster.backend {
        Backend::Cpu => JobSetup::<CpuTrain>::build(plan, assignment, &options, ordinal, &Default::default(), listener)
            .and_then(|job| train(job, reporting, None)),
        Backend::Wgpu => {
            if gpu.is_none() {
                let (kernels, adapter) = Kernels::prepare_wgpu(&plan.gpu, &options, ordinal)?;
                reporting.progress.lock().expect("progress").device = format!("wgpu:{ordinal} {}", adapter.name);
                *gpu = Some(PreparedGpu {
                    kernels,
                    device: adapter.device.to_id(),
                });
            }
            let PreparedGpu { kernels, device } = gpu.as_mut().expect("prepared above");
            let device = burn::backend::wgpu::WgpuDevice::from_id(*device);
            train_on_gpu::<WgpuTrain>(plan, assignment, ordinal, &device, listener, reporting, kernels)
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda => {
            if gpu.is_none() {
                let (kernels, name) = Kernels::prepare_cuda(&plan.gpu, &options, ordinal)?;
                reporting.progress.lock().expect("progress").device = format!("cuda:{ordinal} {name}");
                let device =
                    model::backend::device::<model::backend::CudaTrain>(ordinal).map_err(WorkerError::Device)?;
                *gpu = Some(PreparedGpu {
                    kernels,
                    device: device.to_id(),
                });
            }
            let PreparedGpu { kernels, device } = gpu.as_mut().expect("prepared above");
            let device = burn::backend::cuda::CudaDevice::from_id(*device);
            train_on_gpu::<model::backend::CudaTrain>(plan, assignment, ordinal, &device, listener, reporting, kernels)
        }
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda => Err(WorkerError::WithoutCuda {
            setting: "cluster.backend = \"cuda\"",
        }),
    }
}

/// How the job's stores are reached (data, checkpoints, kernel cache).
pub(crate) fn store_options(store: &StorePlan) -> store::StoreOptions {
    store::StoreOptions::with_s3(store.s3_endpoint.clone(), store.s3_region.clone())
}

/// A GPU worker's kernels and device (the backend's device, as an id both
/// GPU backends' devices convert from), prepared in its first generation.
struct PreparedGpu {
    kernels: Kernels,
    device: DeviceId,
}

/// Trains one generation on a GPU backend; rank 0 then shares what the run
/// compiled so far, evaluation included, for the next start.
fn train_on_gpu<B: burn::tensor::backend::AutodiffBackend>(
    plan: &JobPlan,
    assignment: &Assignment,
    ordinal: usize,
    device: &B::Device,
    listener: RingListener,
    reporting: &Reporting,
    kernels: &mut Kernels,
) -> Result<WorkerOutcome, WorkerError>
where
    model::CocaModel<B>: burn::module::AutodiffModule<B, InnerModule = model::CocaModel<B::InnerBackend>>,
{
    let options = store_options(&plan.store);
    let result = JobSetup::<B>::build(plan, assignment, &options, ordinal, device, listener)
        .and_then(|job| train(job, reporting, Some(&mut *kernels)));
    if assignment.rank == 0 {
        kernels.publish();
    }
    result
}
