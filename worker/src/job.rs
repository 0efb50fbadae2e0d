//! The worker's side of a job: register with the coordinator, rendezvous,
//! join the collective ring, then train on the job's data until the last
//! step or until told to stop, heartbeating all along.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::module::AutodiffModule;
use burn::optim::AdamWConfig;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ElementConversion;
use checkpoint::layout::{self as checkpoint_layout, ResumeFields};
use contract::dataset::DatasetIndex;
use contract::manifest::{Backend, Contrastive, Manifest};
use contract::rpc::coordinator_client::CoordinatorClient;
use contract::rpc::{
    Assignment, BadRecordCount, CheckpointShard, Command, EvalMetric, FinishRequest, HeartbeatRequest, RegisterRequest,
    RendezvousRequest, StepMetrics, WorkerPhase, PROTOCOL_VERSION,
};
use contract::sample_order::{SampleOrder, SourceSize};
use store::{RetryPolicy, Store, StoreOptions};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::kernels::Kernels;
use collective::tcp::RingListener;
use collective::Collective;
use data::dataset::Dataset;
use data::loader::{BatchAssembler, Loader, LoaderConfig, LoaderSource};
use data::prompt::PromptTemplates;
use data::tokenizer::TextTokenizer;
use model::backend::CpuTrain;
use model::eval::periodic::PeriodicEval;
use model::loss::LossWeights;
use model::state::{self, JobFacts, SavedShard, StateLayout};
use model::train::contrastive::ContrastiveMode;
use model::train::step::TrainStep;
use model::CocaModel;

/// What a worker is told on its command line.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// e.g. `http://127.0.0.1:7070`.
    pub coordinator: String,
    pub token: String,
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
    #[error("the coordinator refused {call}: {message}")]
    Refused { call: &'static str, message: String },
    #[error("{0}")]
    Setup(String),
    #[error("step {step}: {message}")]
    Step { step: u64, message: String },
    #[error("lost the coordinator: {0}")]
    CoordinatorLost(String),
}

/// How the worker's part ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerOutcome {
    Completed { step: u64 },
    Stopped { step: u64 },
}

type Client = CoordinatorClient<InterceptedService<Channel, Bearer>>;

/// Adds the job token to every call.
#[derive(Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl Bearer {
    pub fn new(token: &str) -> Result<Self, WorkerError> {
        format!("Bearer {token}")
            .parse()
            .map(Self)
            .map_err(|_| WorkerError::Setup("the job token holds characters that cannot travel in a header".into()))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// Latest progress, shared between the training loop and the heartbeat thread.
#[derive(Default)]
struct Progress {
    step: u64,
    /// Steps completed since the last heartbeat.
    metrics: Vec<StepMetrics>,
    phase: WorkerPhase,
    /// Empty until the backend is known to be other than the registered `cpu`.
    device: String,
}

pub fn run(options: &WorkerOptions) -> Result<WorkerOutcome, WorkerError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| WorkerError::Setup(format!("cannot start the RPC runtime: {e}")))?;
    let mut client = runtime.block_on(connect(options))?;
    let listener =
        RingListener::bind(SocketAddr::new(options.listen, 0)).map_err(|e| WorkerError::Setup(e.to_string()))?;
    let registered = runtime
        .block_on(client.register(RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            host: options.host.clone(),
            device: "cpu".into(),
            collective_address: listener.local_addr().to_string(),
            preferred_rank: options.preferred_rank,
        }))
        .map_err(|status| WorkerError::Refused {
            call: "registration",
            message: status.message().to_string(),
        })?
        .into_inner();
    let id = registered.worker_id;
    let assignment = runtime
        .block_on(client.rendezvous(RendezvousRequest { worker_id: id.clone() }))
        .map_err(|status| WorkerError::Refused {
            call: "rendezvous",
            message: status.message().to_string(),
        })?
        .into_inner();
    eprintln!(
        "worker {id}: rank {} of {}, steps {}..{}",
        assignment.rank, assignment.world_size, assignment.start_step, assignment.total_steps
    );

    let manifest = Manifest::parse(&assignment.manifest_toml, "the coordinator's manifest")
        .map_err(|e| WorkerError::Setup(e.to_string()))?;
    let progress = Arc::new(Mutex::new(Progress {
        step: assignment.start_step,
        ..Progress::default()
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let coordinator_lost = Arc::new(Mutex::new(None::<String>));
    let heartbeat = spawn_heartbeat(
        runtime.handle().clone(),
        client.clone(),
        id.clone(),
        Duration::from_millis(manifest.cluster.heartbeat_ms),
        progress.clone(),
        stop.clone(),
        done.clone(),
        coordinator_lost.clone(),
    );

    let report = |step: u64, saved: &SavedShard| -> Result<bool, String> {
        let shard = CheckpointShard {
            worker_id: id.clone(),
            step,
            file: saved.record.file.clone(),
            bytes: saved.record.bytes,
            sha256: saved.record.sha256.clone(),
            seconds: saved.seconds,
        };
        runtime
            .block_on(client.clone().report_checkpoint(shard))
            .map(|reply| reply.into_inner().committed)
            .map_err(|status| status.message().to_string())
    };
    let store_options = manifest.data.store_options();
    let job = TrainJob {
        manifest: &manifest,
        store_options: &store_options,
        assignment: &assignment,
        device: options.device,
        progress: &progress,
        stop: &stop,
        coordinator_lost: &coordinator_lost,
        report: &report,
    };
    let result = match manifest.cluster.backend {
        Backend::Cpu => train::<CpuTrain>(&job, listener, None),
        #[cfg(feature = "cuda")]
        Backend::Cuda => {
            prepare_kernels(&manifest, &store_options, options.device, &progress).and_then(|mut kernels| {
                let result = train::<model::backend::CudaTrain>(&job, listener, Some(&mut kernels));
                // What the whole run compiled, evaluation included, for the next start.
                if assignment.rank == 0 {
                    kernels.publish();
                }
                result
            })
        }
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda => Err(WorkerError::Setup(
            "cluster.backend = \"cuda\": this coca was built without CUDA (cargo build --features cuda)".into(),
        )),
    };
    done.store(true, Ordering::SeqCst);
    let _ = heartbeat.join();
    // The last step's metrics, before saying goodbye.
    let _ = send_heartbeat(runtime.handle(), &mut client, &id, &progress);
    let step = progress.lock().expect("progress").step;
    let (ok, message) = match &result {
        Ok(_) => (true, String::new()),
        Err(error) => (false, error.to_string()),
    };
    let finished = runtime.block_on(client.finish(FinishRequest {
        worker_id: id,
        step,
        ok,
        message,
    }));
    if let (Err(status), Ok(_)) = (&finished, &result) {
        eprintln!(
            "worker: could not report the end to the coordinator: {}",
            status.message()
        );
    }
    result
}

async fn connect(options: &WorkerOptions) -> Result<Client, WorkerError> {
    let bearer = Bearer::new(&options.token)?;
    let endpoint = Channel::from_shared(options.coordinator.clone()).map_err(|e| WorkerError::Unreachable {
        url: options.coordinator.clone(),
        seconds: 0,
        message: e.to_string(),
    })?;
    let deadline = Instant::now() + options.connect_timeout;
    let patience = RetryPolicy::until_deadline(Duration::from_millis(100), Duration::from_secs(2));
    match store::retry(&patience, Some(deadline), |_| true, || endpoint.connect()).await {
        Ok(channel) => Ok(CoordinatorClient::with_interceptor(channel, bearer)),
        Err(gave_up) => Err(WorkerError::Unreachable {
            url: options.coordinator.clone(),
            seconds: options.connect_timeout.as_secs(),
            message: std::error::Error::source(&gave_up.error).map_or(gave_up.error.to_string(), |s| s.to_string()),
        }),
    }
}

fn spawn_heartbeat(
    runtime: tokio::runtime::Handle,
    mut client: Client,
    id: String,
    every: Duration,
    progress: Arc<Mutex<Progress>>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    lost: Arc<Mutex<Option<String>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut failures = 0;
        loop {
            match send_heartbeat(&runtime, &mut client, &id, &progress) {
                Ok(Command::Stop) => stop.store(true, Ordering::SeqCst),
                Ok(Command::Continue) => failures = 0,
                Err(message) => {
                    failures += 1;
                    if failures >= 5 {
                        *lost.lock().expect("lost") = Some(message);
                        stop.store(true, Ordering::SeqCst);
                    }
                }
            }
            let wake = Instant::now() + every;
            while Instant::now() < wake {
                if done.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    })
}

/// One heartbeat with the latest progress; returns the coordinator's command.
fn send_heartbeat(
    runtime: &tokio::runtime::Handle,
    client: &mut Client,
    id: &str,
    progress: &Mutex<Progress>,
) -> Result<Command, String> {
    let request = {
        let mut progress = progress.lock().expect("progress");
        HeartbeatRequest {
            worker_id: id.to_string(),
            step: progress.step,
            metrics: std::mem::take(&mut progress.metrics),
            phase: progress.phase as i32,
            device: progress.device.clone(),
        }
    };
    let reply = runtime.block_on(client.heartbeat(request));
    match reply {
        Ok(reply) if reply.get_ref().command == Command::Stop as i32 => Ok(Command::Stop),
        Ok(_) => Ok(Command::Continue),
        Err(status) => Err(status.message().to_string()),
    }
}

/// Points cubecl at the job's kernel cache and settings for CUDA device
/// `device`; tells the status page which GPU this worker runs on.
#[cfg(feature = "cuda")]
fn prepare_kernels(
    manifest: &Manifest,
    options: &StoreOptions,
    device: usize,
    progress: &Mutex<Progress>,
) -> Result<Kernels, WorkerError> {
    let name = model::backend::cuda_device_name(device).map_err(WorkerError::Setup)?;
    progress.lock().expect("progress").device = format!("cuda:{device} {name}");
    let kernels =
        Kernels::prepare(&manifest.gpu, options, device, &name).map_err(|e| WorkerError::Setup(e.to_string()))?;
    eprintln!(
        "worker: {name} (device {device}), autotune {:?}; kernel cache {}: {} files in {:.1} s",
        manifest.gpu.autotune,
        manifest.gpu.kernel_cache,
        kernels.fetched,
        kernels.prepared_at.elapsed().as_secs_f64()
    );
    Ok(kernels)
}

/// What the training loop works from and reports to.
struct TrainJob<'a> {
    manifest: &'a Manifest,
    store_options: &'a StoreOptions,
    assignment: &'a Assignment,
    device: usize,
    progress: &'a Mutex<Progress>,
    stop: &'a AtomicBool,
    coordinator_lost: &'a Mutex<Option<String>>,
    /// Tells the coordinator a shard is written; true when that committed the step.
    report: &'a dyn Fn(u64, &SavedShard) -> Result<bool, String>,
}

/// Saving this job's checkpoints.
struct Checkpointing {
    root: Store,
    every: u64,
    resume: ResumeFields,
    tokenizer_sha256: String,
    /// tokenizer.json, copied into every step.
    tokenizer: store::Bytes,
}

/// The training loop on backend `B`. Gradients and embeddings cross the
/// TCP ring through host memory, so it serves CPU and CUDA workers alike.
fn train<B: AutodiffBackend>(
    job: &TrainJob,
    listener: RingListener,
    mut kernels: Option<&mut Kernels>,
) -> Result<WorkerOutcome, WorkerError>
where
    CocaModel<B>: AutodiffModule<B, InnerModule = CocaModel<B::InnerBackend>>,
{
    let TrainJob {
        manifest,
        store_options: options,
        assignment,
        device,
        progress,
        stop,
        coordinator_lost,
        report,
    } = *job;
    let setup = WorkerError::Setup;
    let (rank, world) = (assignment.rank as usize, assignment.world_size as usize);
    let mut sources = Vec::new();
    let mut sizes = Vec::new();
    let mut indexes = Vec::new();
    for ((source, json), i) in manifest.data.sources.iter().zip(&assignment.dataset_indexes).zip(0..) {
        let index =
            DatasetIndex::parse(json, &format!("data.source[{i}] pinned index")).map_err(|e| setup(e.to_string()))?;
        let store = Store::open(&source.url, options).map_err(|e| setup(e.to_string()))?;
        sizes.push(SourceSize {
            samples: index.rows(),
            weight: source.weight,
        });
        indexes.push(index.clone());
        sources.push(LoaderSource {
            dataset: Dataset::with_index(store, index),
            templates: PromptTemplates::open(&source.templates, options)
                .map_err(|e| setup(format!("data.source[{i}].templates: {e}")))?,
        });
    }
    let (store, name) =
        Store::open_object(&manifest.data.tokenizer, options).map_err(|e| setup(format!("data.tokenizer: {e}")))?;
    let json = store.get(&name).map_err(|e| setup(format!("data.tokenizer: {e}")))?;
    let tokenizer = TextTokenizer::from_json(&String::from_utf8_lossy(&json), &manifest.data.tokenizer)
        .map_err(|e| setup(e.to_string()))?;
    if tokenizer.vocab_size() > manifest.model.vocab_size {
        return Err(setup(format!(
            "data.tokenizer: {} has {} tokens, more than model.vocab_size = {}",
            manifest.data.tokenizer,
            tokenizer.vocab_size(),
            manifest.model.vocab_size
        )));
    }
    let order =
        SampleOrder::new(manifest.job.seed, &sizes, manifest.train.global_batch).map_err(|e| setup(e.to_string()))?;
    let counts = order.counts_per_batch().to_vec();
    // Per source: epochs completed after `step` steps.
    let epochs_at = |step: u64| -> Vec<f64> {
        counts
            .iter()
            .zip(&sizes)
            .map(|(&count, size)| (step * count as u64) as f64 / size.samples as f64)
            .collect()
    };
    let config = LoaderConfig {
        threads: manifest.data.loader_threads,
        prefetch_batches: manifest.data.prefetch_batches,
        max_bad_fraction: manifest.data.max_bad_fraction,
        ..LoaderConfig::new(manifest.model.image_size as u32, manifest.model.context_length)
    };
    // Rank 0 evaluates on held-out data, with a tokenizer of its own.
    let mut periodic_eval = match (&manifest.eval, rank) {
        (Some(eval), 0) => {
            let open = |field: &str, url: &str| {
                Store::open(url, options)
                    .map_err(|e| e.to_string())
                    .and_then(|store| Dataset::open(store).map_err(|e| e.to_string()))
                    .map_err(|e| setup(format!("{field}: {e}")))
            };
            let zeroshot = match &eval.zeroshot {
                Some(url) => Some((
                    open("eval.zeroshot", url)?,
                    PromptTemplates::open(&eval.templates, options)
                        .map_err(|e| setup(format!("eval.templates: {e}")))?,
                )),
                None => None,
            };
            let retrieval = eval
                .retrieval
                .as_deref()
                .map(|url| open("eval.retrieval", url))
                .transpose()?;
            let tokenizer = TextTokenizer::from_json(&String::from_utf8_lossy(&json), &manifest.data.tokenizer)
                .map_err(|e| setup(e.to_string()))?;
            Some(PeriodicEval::new(
                eval,
                zeroshot,
                retrieval,
                manifest.model.clone(),
                tokenizer,
            ))
        }
        _ => None,
    };
    let assembler = BatchAssembler::new(sources, order, tokenizer, config, manifest.job.seed, rank, world)
        .map_err(|e| setup(e.to_string()))?;
    let mut loader = Loader::start(assembler, assignment.start_step).map_err(|e| setup(e.to_string()))?;

    let peers: Vec<SocketAddr> = assignment
        .peers
        .iter()
        .map(|peer| {
            peer.parse()
                .map_err(|_| setup(format!("peer address `{peer}` is not an address")))
        })
        .collect::<Result<_, _>>()?;
    let mut ring = listener
        .connect(rank, &peers, Duration::from_secs(60))
        .map_err(|e| setup(e.to_string()))?;

    let device = model::backend::device::<B>(device).map_err(setup)?;
    let mut model = CocaModel::<B>::new(&manifest.model, manifest.job.seed, &device);
    let train = &manifest.train;
    let optimizer = AdamWConfig::new()
        .with_beta_1(train.beta1 as f32)
        .with_beta_2(train.beta2 as f32)
        .with_epsilon(train.eps as f32)
        .with_weight_decay(train.weight_decay as f32);
    let weights = LossWeights {
        contrastive: train.lambda_con as f32,
        captioning: train.lambda_cap as f32,
    };
    let mode = match train.contrastive {
        Contrastive::Local => ContrastiveMode::Local,
        Contrastive::Full => ContrastiveMode::Full,
    };
    let mut trainer = TrainStep::<B>::new(&optimizer, weights, mode);
    if !assignment.resume_from.is_empty() {
        let dir = Store::open(&assignment.resume_from, options).map_err(|e| setup(e.to_string()))?;
        let (loaded, record, meta) = state::load(&dir, model).map_err(|e| setup(e.to_string()))?;
        if meta.step != assignment.start_step {
            return Err(setup(format!(
                "{} holds step {}, the coordinator said step {}",
                assignment.resume_from, meta.step, assignment.start_step
            )));
        }
        model = loaded;
        trainer = trainer.with_optimizer_record(record);
        if rank == 0 {
            eprintln!(
                "worker: resumed from {} (step {}, saved by {} workers)",
                assignment.resume_from, meta.step, meta.world_size
            );
        }
    }
    let checkpointing = match &manifest.checkpoint {
        Some(checkpoint) => Some(Checkpointing {
            root: Store::open(&checkpoint.url, options).map_err(|e| setup(format!("checkpoint.url: {e}")))?,
            every: checkpoint.every,
            resume: ResumeFields::of(manifest, &indexes),
            tokenizer_sha256: store::sha256_hex(&json),
            tokenizer: json.clone(),
        }),
        None => None,
    };
    let save = |step: u64, model: &CocaModel<B>, trainer: &TrainStep<B>| -> Result<(), WorkerError> {
        let Some(checkpointing) = &checkpointing else {
            return Ok(());
        };
        let failed = |message: String| WorkerError::Step {
            step,
            message: format!("checkpoint: {message}"),
        };
        let record = trainer.optimizer_record();
        let saved = state::save_shard(&checkpointing.root, step, rank, world, model, &record)
            .map_err(|e| failed(e.to_string()))?;
        if rank == 0 {
            let facts = JobFacts {
                source_samples: counts.iter().map(|&count| step * count as u64).collect(),
                source_epochs: epochs_at(step),
                seed: manifest.job.seed,
                resume: checkpointing.resume.clone(),
                tokenizer_sha256: checkpointing.tokenizer_sha256.clone(),
            };
            let meta = StateLayout::of(model, &record).meta(step, world, facts);
            checkpoint::write_meta(&checkpointing.root, &meta).map_err(|e| failed(e.to_string()))?;
            checkpointing
                .root
                .at(&checkpoint_layout::step_dir(step))
                .put(checkpoint_layout::TOKENIZER, checkpointing.tokenizer.clone())
                .map_err(|e| failed(e.to_string()))?;
        }
        report(step, &saved).map_err(failed)?;
        Ok(())
    };

    let started = Instant::now();
    let total = assignment.total_steps;
    let mut step = assignment.start_step;
    progress.lock().expect("progress").phase = match kernels {
        Some(_) => WorkerPhase::Compiling,
        None => WorkerPhase::Training,
    };
    while step < total {
        // Every rank stops at the same step: a stop anyone heard is summed in.
        let mut flag = [f32::from(u8::from(stop.load(Ordering::SeqCst)))];
        ring.all_reduce_sum(&mut flag).map_err(|e| WorkerError::Step {
            step,
            message: e.to_string(),
        })?;
        if flag[0] > 0.0 {
            if let Some(message) = coordinator_lost.lock().expect("lost").clone() {
                return Err(WorkerError::CoordinatorLost(message));
            }
            // Asked to stop: keep what was trained since the last save.
            if step > assignment.start_step && checkpointing.as_ref().is_some_and(|c| step % c.every != 0) {
                save(step, &model, &trainer)?;
            }
            return Ok(WorkerOutcome::Stopped { step });
        }
        let step_started = Instant::now();
        let batch = loader.next_batch().map_err(|e| WorkerError::Step {
            step,
            message: e.to_string(),
        })?;
        let batch = batch.to_device::<B>(&device);
        let learning_rate = train.learning_rate_at(step, total);
        let (next, report) = trainer
            .step(model, &batch, learning_rate, &mut ring)
            .map_err(|e| WorkerError::Step {
                step,
                message: e.to_string(),
            })?;
        model = next;
        step += 1;
        let elapsed = step_started.elapsed().as_secs_f64();
        if let Some(kernels) = kernels.as_deref_mut() {
            let first = step == assignment.start_step + 1;
            kernels.after_step(rank, step, first, elapsed);
            if first {
                progress.lock().expect("progress").phase = WorkerPhase::Training;
            }
        }
        let bad = loader.bad_records();
        let mut metrics = StepMetrics {
            step,
            loss: f64::from(report.losses.total),
            contrastive: report.losses.contrastive.map_or(0.0, f64::from),
            captioning: report.losses.captioning.map_or(0.0, f64::from),
            learning_rate,
            logit_scale: f64::from(model.logit_scale().into_scalar().elem::<f32>()),
            samples_per_second: train.global_batch as f64 / elapsed.max(1e-9),
            data_wait_share: loader.waited().as_secs_f64() / started.elapsed().as_secs_f64().max(1e-9),
            bad_records: bad
                .sources
                .iter()
                .enumerate()
                .flat_map(|(source, report)| {
                    report.by_reason.iter().map(move |(reason, count)| BadRecordCount {
                        source: source as u32,
                        reason: reason.clone(),
                        count: *count,
                    })
                })
                .collect(),
            source_epochs: epochs_at(step),
            evals: Vec::new(),
        };
        if let Some(eval) = periodic_eval.as_mut().filter(|e| e.due(step, total)) {
            let results = eval.run(model.valid(), step).map_err(|e| WorkerError::Step {
                step,
                message: format!("eval: {e}"),
            })?;
            metrics.evals = results
                .into_iter()
                .map(|(name, value)| EvalMetric { name, value })
                .collect();
        }
        {
            let mut shared = progress.lock().expect("progress");
            shared.step = step;
            shared.metrics.push(metrics);
        }
        if checkpointing
            .as_ref()
            .is_some_and(|c| step % c.every == 0 || step == total)
        {
            save(step, &model, &trainer)?;
        }
    }
    Ok(WorkerOutcome::Completed { step })
}
