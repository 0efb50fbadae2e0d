//! Everything a rank trains with, built once from the coordinator's
//! assignment: its share of the data, the ring to its peers, the model
//! (fresh or resumed), the optimizer, periodic evaluation and checkpointing.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use burn::module::AutodiffModule;
use burn::optim::AdamWConfig;
use burn::tensor::backend::AutodiffBackend;
use checkpoint::layout::{self, ResumeFields};
use collective::tcp::{Neighbours, RingListener, TcpRing};
use collective::Collective;
use contract::manifest::{CollectiveKind, Eval, Train};
use contract::plan::JobPlan;
use contract::sample_order::SampleOrder;
use datasets::dataset::Dataset;
use datasets::loader::{BatchAssembler, Loader, LoaderConfig, LoaderSource};
use datasets::patch_dropout::PatchDropout;
use datasets::prompt::PromptTemplates;
use datasets::tokenizer::TextTokenizer;
use model::eval::periodic::PeriodicEval;
use model::loss::LossWeights;
use model::state::{self, JobFacts, Moments, SavedShard, StateLayout};
use model::train::contrastive::ContrastiveMode;
use model::train::parameter_groups::ParameterGroups;
use model::train::replicas::ReplicatedStep;
use model::train::step::{compute_dtype, TrainStep};
use model::CocaModel;
use proto::Assignment;
use store::{LocalCache, Store, StoreOptions};

use super::{StepError, WorkerError};

/// A store error, on the field that named the store.
fn store_error(field: impl Into<String>) -> impl FnOnce(store::StoreError) -> WorkerError {
    let field = field.into();
    move |source| WorkerError::Store { field, source }
}

/// A rank's training job, ready to run.
pub(super) struct JobSetup<B: AutodiffBackend> {
    pub rank: usize,
    pub start_step: u64,
    pub total_steps: u64,
    /// The optimizer's settings and the learning-rate schedule.
    pub train: Train,
    pub order: SampleOrder,
    pub loader: Loader,
    /// The ring to the other ranks (TCP, or NCCL on CUDA jobs that ask).
    pub collective: Box<dyn Collective>,
    pub device: B::Device,
    pub model: CocaModel<B>,
    pub trainer: ReplicatedStep<B>,
    /// Rank 0's held-out evaluation, when the manifest asks for one.
    pub eval: Option<PeriodicEval>,
    pub checkpointing: Option<Checkpointing>,
}

/// What the job's data sources resolve to.
struct JobData {
    sources: Vec<LoaderSource>,
    order: SampleOrder,
    /// tokenizer.json as stored, and parsed.
    tokenizer_json: store::Bytes,
    tokenizer: TextTokenizer,
}

impl<B: AutodiffBackend> JobSetup<B>
where
    CocaModel<B>: AutodiffModule<B, InnerModule = CocaModel<B::InnerBackend>>,
{
    pub fn build(
        plan: &JobPlan,
        assignment: &Assignment,
        options: &StoreOptions,
        ordinal: usize,
        device: &B::Device,
        listener: RingListener,
    ) -> Result<Self, WorkerError> {
        let (rank, world) = (assignment.rank as usize, assignment.world_size as usize);
        let data = open_data(plan, options)?;
        let eval = match (&plan.eval, rank) {
            (Some(eval), 0) => Some(periodic_eval(plan, eval, &data.tokenizer_json, options)?),
            _ => None,
        };
        let checkpointing = match &plan.checkpoint {
            Some(checkpoint) => Some(Checkpointing {
                root: Store::open(&checkpoint.url, options).map_err(store_error("checkpoint.url"))?,
                every: checkpoint.every,
                save_retry: Duration::from_secs(checkpoint.save_retry_seconds),
                resume: ResumeFields::of(plan, &data.order),
                seed: plan.seed,
                tokenizer_sha256: store::sha256_hex(&data.tokenizer_json),
                tokenizer: data.tokenizer_json.clone(),
                rank,
                world,
            }),
            None => None,
        };
        let config = LoaderConfig {
            threads: plan.loader.threads,
            prefetch_batches: plan.loader.prefetch_batches,
            max_bad_fraction: plan.loader.max_bad_fraction,
            max_image_pixels: plan.loader.max_image_pixels,
            shard_memory_bytes: plan.loader.shard_memory_bytes,
            fetch_ahead_bytes: plan.loader.fetch_ahead_bytes,
            patch_dropout: PatchDropout::new(plan.model.image_tokens(), plan.train.patch_dropout),
            ..LoaderConfig::new(plan.model.image_size as u32, plan.model.context_length)
        };
        let order = data.order.clone();
        let assembler = BatchAssembler::new(data.sources, data.order, data.tokenizer, config, plan.seed, rank, world)?;
        let loader = Loader::start(assembler, assignment.start_step)?;
        let collective = join_collective(plan, assignment, listener, ordinal)?;
        let device = device.clone();
        let (model, trainer) = model_and_trainer(plan, assignment, options, &device)?;
        let replicas = plan.replicas_for(world);
        if rank == 0 && replicas > 1 {
            tracing::info!("{replicas} model replicas per worker, a thread each");
        }
        let trainer = ReplicatedStep::new(trainer, &model, replicas);
        Ok(Self {
            rank,
            start_step: assignment.start_step,
            total_steps: plan.total_steps,
            train: plan.train.clone(),
            order,
            loader,
            collective,
            device,
            model,
            trainer,
            eval,
            checkpointing,
        })
    }
}

/// The sources at their pinned indexes, their sample order and the tokenizer.
fn open_data(plan: &JobPlan, options: &StoreOptions) -> Result<JobData, WorkerError> {
    let mut sources = Vec::new();
    for (source, i) in plan.sources.iter().zip(0..) {
        let store = Store::open(&source.shards_url(), options).map_err(store_error(format!("data.source[{i}]")))?;
        let mut dataset = Dataset::with_index(store, source.index.clone());
        if let Some(dir) = &plan.loader.cache_dir {
            let cache = LocalCache::new(dir, plan.loader.cache_bytes).map_err(store_error("data.cache_dir"))?;
            dataset = dataset.with_cache(cache);
        }
        sources.push(LoaderSource {
            dataset,
            templates: PromptTemplates::open(&source.templates, options).map_err(|source| WorkerError::Templates {
                field: format!("data.source[{i}].templates"),
                source,
            })?,
        });
    }
    let order = plan.sample_order().map_err(contract::plan::PlanError::from)?;
    let (store, name) = Store::open_object(&plan.tokenizer, options).map_err(store_error("data.tokenizer"))?;
    let tokenizer_json = store.get(&name).map_err(store_error("data.tokenizer"))?;
    let tokenizer = parse_tokenizer(plan, &tokenizer_json)?;
    if tokenizer.vocab_size() > plan.model.vocab_size {
        return Err(WorkerError::TokenizerTooLarge {
            url: plan.tokenizer.clone(),
            tokens: tokenizer.vocab_size(),
            vocab_size: plan.model.vocab_size,
        });
    }
    Ok(JobData {
        sources,
        order,
        tokenizer_json,
        tokenizer,
    })
}

fn parse_tokenizer(plan: &JobPlan, json: &[u8]) -> Result<TextTokenizer, WorkerError> {
    TextTokenizer::from_json(&String::from_utf8_lossy(json), &plan.tokenizer).map_err(WorkerError::Tokenizer)
}

/// Rank 0's evaluation on held-out data, with a tokenizer of its own.
fn periodic_eval(
    plan: &JobPlan,
    eval: &Eval,
    tokenizer_json: &[u8],
    options: &StoreOptions,
) -> Result<PeriodicEval, WorkerError> {
    let open = |field: &str, url: &str| {
        let store = Store::open(url, options).map_err(store_error(field))?;
        Dataset::open(store).map_err(|source| WorkerError::Dataset {
            field: field.to_string(),
            source,
        })
    };
    let zeroshot = match &eval.zeroshot {
        Some(url) => Some((
            open("eval.zeroshot", url)?,
            PromptTemplates::open(&eval.templates, options).map_err(|source| WorkerError::Templates {
                field: "eval.templates".into(),
                source,
            })?,
        )),
        None => None,
    };
    let retrieval = eval
        .retrieval
        .as_deref()
        .map(|url| open("eval.retrieval", url))
        .transpose()?;
    let tokenizer = parse_tokenizer(plan, tokenizer_json)?;
    Ok(PeriodicEval::new(
        eval,
        zeroshot,
        retrieval,
        plan.model.clone(),
        tokenizer,
    ))
}

/// Joins the job's collective: the TCP ring of the assignment's peers, or
/// the NCCL communicator of rank 0's unique id on GPU `device`.
fn join_collective(
    plan: &JobPlan,
    assignment: &Assignment,
    listener: RingListener,
    device: usize,
) -> Result<Box<dyn Collective>, WorkerError> {
    match plan.cluster.collective {
        CollectiveKind::Tcp => {
            // A neighbour that has not come within two heartbeat timeouts is gone.
            let patience = Duration::from_millis(2 * plan.cluster.heartbeat_timeout_ms);
            Ok(Box::new(join_ring(assignment, listener, patience)?))
        }
        CollectiveKind::Nccl => join_nccl(assignment, device),
    }
}

#[cfg(feature = "cuda")]
fn join_nccl(assignment: &Assignment, device: usize) -> Result<Box<dyn Collective>, WorkerError> {
    let (rank, world) = (assignment.rank as usize, assignment.world_size as usize);
    let nccl = collective::nccl::NcclCollective::new(device, rank, world, &assignment.nccl_unique_id)?;
    Ok(Box::new(nccl))
}

#[cfg(not(feature = "cuda"))]
fn join_nccl(_: &Assignment, _: usize) -> Result<Box<dyn Collective>, WorkerError> {
    Err(super::NCCL_WITHOUT_CUDA)
}

/// Joins the TCP ring between the assignment's two neighbours.
fn join_ring(assignment: &Assignment, listener: RingListener, patience: Duration) -> Result<TcpRing, WorkerError> {
    let address = |peer: &String| -> Result<SocketAddr, WorkerError> {
        peer.parse().map_err(|_| WorkerError::PeerAddress(peer.clone()))
    };
    let neighbours = Neighbours {
        rank: assignment.rank as usize,
        world: assignment.world_size as usize,
        prev: address(&assignment.prev_peer)?,
        next: address(&assignment.next_peer)?,
    };
    listener
        .connect_within(neighbours, patience, Duration::from_secs(60))
        .map_err(|e| WorkerError::Regroup(e.to_string()))
}

/// The training step a job's `[train]` section describes.
pub(crate) fn train_step<B: AutodiffBackend>(train: &Train) -> TrainStep<B> {
    let optimizer = AdamWConfig::new()
        .with_beta_1(train.beta1 as f32)
        .with_beta_2(train.beta2 as f32)
        .with_epsilon(train.eps as f32)
        .with_weight_decay(train.weight_decay as f32);
    let weights = LossWeights {
        contrastive: train.lambda_con as f32,
        captioning: train.lambda_cap as f32,
    };
    TrainStep::<B>::new(&optimizer, weights, ContrastiveMode::from(train.contrastive))
        .with_compute(compute_dtype(train.precision))
        .with_accumulation(train.accumulation)
        .with_clip_norm(train.grad_clip_norm.map(|norm| norm as f32))
        .with_sharded_optimizer(train.shard_optimizer)
        .with_activation_checkpointing(train.activation_checkpointing)
        .with_parameter_groups(ParameterGroups::of(train))
        .with_ema(train.ema_decay)
}

/// The model and its training step, from the job's seed or from the
/// checkpoint the coordinator chose.
fn model_and_trainer<B: AutodiffBackend>(
    plan: &JobPlan,
    assignment: &Assignment,
    options: &StoreOptions,
    device: &B::Device,
) -> Result<(CocaModel<B>, TrainStep<B>), WorkerError>
where
    CocaModel<B>: AutodiffModule<B>,
{
    // A resumed job's parameters all come from the checkpoint: drawing
    // initial ones would only delay the restart.
    let model = if assignment.resume_from.is_empty() {
        CocaModel::<B>::new(&plan.model, plan.seed, device)
    } else {
        CocaModel::<B>::placeholder(&plan.model, device)
    };
    let trainer = train_step::<B>(&plan.train);
    let groups = ParameterGroups::of(&plan.train);
    if assignment.rank == 0 && !groups.is_plain() {
        tracing::info!("train: {}", groups.describe(&model));
    }
    if assignment.resume_from.is_empty() {
        return Ok((groups.lock(model), trainer));
    }
    let dir = Store::open(&assignment.resume_from, options).map_err(store_error("the resumed step"))?;
    let resume_failed = |source| WorkerError::Resume {
        url: assignment.resume_from.clone(),
        source,
    };
    // A sharded optimizer reads only its segment's moments.
    let (model, moments, meta) = if trainer.is_sharded() {
        let (rank, world) = (assignment.rank as usize, assignment.world_size as usize);
        let segment = TrainStep::segment(&model, rank, world);
        let (model, moments, meta) = state::load_gathered(&dir, model, segment).map_err(resume_failed)?;
        (model, Moments::Gathered(moments), meta)
    } else {
        let (model, record, meta) = state::load(&dir, model).map_err(resume_failed)?;
        (model, Moments::Whole(record), meta)
    };
    if meta.step != assignment.start_step {
        return Err(WorkerError::ResumedStep {
            url: assignment.resume_from.clone(),
            found: meta.step,
            expected: assignment.start_step,
        });
    }
    // The moving average goes on from the step's; a job started from an
    // import (which binds only the model) starts its own.
    let ema = checkpoint::ema::read(&dir, &meta).map_err(resume_failed)?;
    let trainer = match ema {
        Some(values) if plan.train.ema_decay.is_some() => trainer.with_ema_values(values),
        _ => trainer,
    };
    if assignment.rank == 0 {
        tracing::info!(
            "resumed from {} (step {}, saved by {} workers)",
            assignment.resume_from,
            meta.step,
            meta.world_size
        );
    }
    Ok((groups.lock(model), trainer.with_moments(moments)))
}

/// Saving this job's checkpoints.
pub(super) struct Checkpointing {
    root: Store,
    every: u64,
    save_retry: Duration,
    resume: ResumeFields,
    seed: u64,
    tokenizer_sha256: String,
    /// tokenizer.json, copied into every step.
    tokenizer: store::Bytes,
    rank: usize,
    world: usize,
}

impl Checkpointing {
    /// Whether the step just trained is saved: every `checkpoint.every` steps and the last.
    pub fn due(&self, step: u64, total: u64) -> bool {
        step % self.every == 0 || step == total
    }

    /// Copies this rank's shard of `step` (and rank 0's meta.json) out of
    /// the model: training may go on while [`Snapshot::write`] writes it.
    /// Every rank calls it at the same step (a sharded optimizer gathers
    /// the shard's moments over `collective`).
    pub fn snapshot<B: AutodiffBackend>(
        &self,
        step: u64,
        model: &CocaModel<B>,
        trainer: &mut ReplicatedStep<B>,
        order: &SampleOrder,
        collective: &mut dyn Collective,
    ) -> Result<Snapshot, collective::CollectiveError>
    where
        CocaModel<B>: AutodiffModule<B, InnerModule = CocaModel<B::InnerBackend>>,
    {
        let started = Instant::now();
        let moments = trainer.moments(model, collective)?;
        let bytes = state::encode_shard(step, self.rank, self.world, model, &moments);
        let meta = (self.rank == 0).then(|| {
            let facts = JobFacts {
                source_samples: order.samples_after(step),
                source_epochs: order.epochs_after(step),
                seed: self.seed,
                resume: self.resume.clone(),
                tokenizer_sha256: self.tokenizer_sha256.clone(),
            };
            StateLayout::of(model, &moments).meta(step, self.world, facts)
        });
        let ema = (self.rank == 0)
            .then(|| trainer.ema())
            .flatten()
            .map(|(decay, values)| {
                let tensors = meta.as_ref().map_or(&[][..], |meta| &meta.tensors[..]);
                (decay, checkpoint::ema::encode(tensors, values).into())
            });
        Ok(Snapshot {
            root: self.root.clone(),
            save_retry: self.save_retry,
            step,
            rank: self.rank,
            world: self.world,
            bytes: bytes.into(),
            meta,
            ema,
            tokenizer: self.tokenizer.clone(),
            started,
        })
    }
}

/// One rank's checkpoint of one step, in memory, to be written.
pub(super) struct Snapshot {
    root: Store,
    save_retry: Duration,
    step: u64,
    rank: usize,
    world: usize,
    bytes: store::Bytes,
    /// Rank 0's meta.json.
    meta: Option<checkpoint::layout::Meta>,
    /// Rank 0's EMA file, and the decay it was kept with.
    ema: Option<(f64, store::Bytes)>,
    tokenizer: store::Bytes,
    started: Instant,
}

impl Snapshot {
    pub fn step(&self) -> u64 {
        self.step
    }

    /// How long the copy took: what a save costs the training thread.
    pub fn copied(&self) -> Duration {
        self.started.elapsed()
    }

    /// Writes the shard (rank 0 also meta.json and the tokenizer) and
    /// reports it through `report`. A store that fails (an S3 server away,
    /// a full disk) is retried for `checkpoint.save_retry_seconds`, training
    /// going on meanwhile up to the next save; then the write fails the
    /// worker, naming the store. A report that does not reach the
    /// coordinator ends the generation.
    pub fn write(self, report: &dyn Fn(u64, &SavedShard) -> Result<bool, String>) -> Result<(), WorkerError> {
        let step = self.step;
        let record = checkpoint::save_retry::retry_failing_store(
            self.save_retry,
            || self.write_files(),
            |error, wait| {
                tracing::warn!(
                    "step {step}: saving the checkpoint failed ({error}); trying again in {:.1} s \
                     (checkpoint.save_retry_seconds = {})",
                    wait.as_secs_f64(),
                    self.save_retry.as_secs()
                )
            },
        )
        .map_err(|error| WorkerError::Step {
            step,
            source: StepError::Checkpoint(error),
        })?;
        let saved = SavedShard {
            record,
            seconds: self.started.elapsed().as_secs_f64(),
        };
        report(step, &saved).map_err(|message| WorkerError::Regroup(format!("step {step}'s shard: {message}")))?;
        Ok(())
    }

    /// The step's files, written whole or not at all (each object is).
    fn write_files(&self) -> Result<checkpoint::layout::ShardRecord, checkpoint::CheckpointError> {
        let step = self.step;
        let record = checkpoint::write_shard(&self.root, step, self.rank, self.world, self.bytes.clone())?;
        if let Some(meta) = &self.meta {
            let mut meta = meta.clone();
            if let Some((decay, bytes)) = &self.ema {
                meta.ema = Some(checkpoint::ema::write(&self.root, step, *decay, bytes.clone())?);
            }
            checkpoint::write_meta(&self.root, &meta)?;
            self.root
                .at(&layout::step_dir(step))
                .put(layout::TOKENIZER, self.tokenizer.clone())?;
        }
        Ok(record)
    }
}
