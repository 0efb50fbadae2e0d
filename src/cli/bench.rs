//! `coca bench step` (a training step), `coca bench allreduce` (the
//! gradient all-reduce between local processes) and `coca bench data` (the loader).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context};
use bench::all_reduce::{all_reduce_bandwidth, bench_all_reduce, memcpy_bandwidth};
use bench::local_ranks;
use bench::step::{bench_step, StepBenchmark, StepBenchmarkPlan};
use clap::Subcommand;
use collective::{Collective, Solo};
use contract::manifest::{AutotuneLevel, Backend, CollectiveKind, Contrastive, Precision};
use contract::ModelConfig;
use datasets::corpus;
use datasets::prompt::PromptTemplates;
use datasets::tokenizer::TextTokenizer;
use model::backend::CpuTrain;
use model::train::step::TrainStep;
use model::CocaModel;

use super::ModelArgs;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Median ms per training step (forward, both losses, backward, AdamW)
    /// on synthetic data: time to the first step, samples/s and FLOP/s.
    Step(StepArgs),
    /// All-reduce bus bandwidth (as nccl-tests defines it) between local
    /// processes over the TCP ring, beside this machine's memcpy bandwidth.
    Allreduce {
        /// Processes (ranks); with nccl, rank r uses GPU r.
        #[arg(long, default_value_t = 2)]
        world: usize,
        /// `tcp` (the ring over loopback), or `nccl` (a build with
        /// `--features cuda`; world 1 runs in this process).
        #[arg(long, value_enum, default_value_t = CollectiveKind::Tcp)]
        collective: CollectiveKind,
        /// Buffer size in MiB of f32.
        #[arg(long, default_value_t = 64)]
        mib: usize,
        /// Measured all-reduces (the median is over these).
        #[arg(long, default_value_t = 10)]
        iterations: usize,
        /// Unmeasured all-reduces first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[command(flatten)]
        local_rank: LocalRank,
    },
    /// RPC latency and coordinator CPU with many simulated workers
    /// registering, heartbeating and reporting metrics over loopback.
    Coordinator {
        #[arg(long, default_value_t = 4096)]
        workers: usize,
        #[arg(long, default_value_t = 1000)]
        heartbeat_ms: u64,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Checkpoint save throughput with N ranks saving at once (their
    /// shards of parameters and AdamW moments) and load throughput, to a
    /// local directory, beside plain file writes of the same sizes.
    Checkpoint {
        #[command(flatten)]
        model: ModelArgs,
        /// Ranks saving at once (threads of this process).
        #[arg(long, default_value_t = 1)]
        world: usize,
        /// Where to write (default: a temporary directory under the system's).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Generated tokens per second with and without the decoder's
    /// key/value cache (beam search, every caption max-len tokens long).
    Caption {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value_t = 4)]
        beam: usize,
        #[arg(long, default_value_t = 32)]
        max_len: usize,
    },
    /// Training samples per second (decode, random resized crop,
    /// normalise, tokenize) from a dataset's shards, and per loader thread.
    Data {
        /// The dataset (a path or a store URL): Arrow shards, or WebDataset
        /// tars (a brace pattern, one tar, or a prefix with a tar index).
        /// Repeat to compare: each is run in turn, the first the baseline.
        #[arg(long = "url", required = true)]
        urls: Vec<String>,
        #[arg(long, default_value_t = 224)]
        image_size: u32,
        /// Loader threads (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Measured batches.
        #[arg(long, default_value_t = 10)]
        batches: usize,
        #[command(flatten)]
        store: super::StoreArgs,
    },
}

#[derive(Debug, clap::Args)]
pub struct StepArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// `cpu`, `cuda` (a build with `--features cuda`) or `wgpu` (Vulkan or Metal); a GPU runs one process.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub backend: Backend,
    /// The GPU ordinal (cuda, wgpu).
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// cuda, wgpu: how hard cubecl tunes kernels (as the manifest's gpu.autotune).
    #[arg(long, value_enum, default_value_t = AutotuneLevel::Minimal)]
    pub autotune: AutotuneLevel,
    /// cuda, wgpu: where compiled kernels and autotune results are kept between
    /// runs (a directory or object-store URL; as gpu.kernel_cache).
    #[arg(long, default_value = "coca-kernel-cache")]
    pub kernel_cache: String,
    /// Samples per step (the global batch when --world > 1).
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Measured steps (the median is over these).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Unmeasured steps first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Data-parallel ranks, each a local process on the TCP ring,
    /// splitting the batch between them.
    #[arg(long, default_value_t = 1)]
    pub world: usize,
    /// Model replicas in each process, a thread and a core each, splitting
    /// its share of the batch (as the manifest's cluster.replicas).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Then time each part of the network, forward and backward, on its
    /// own (median of 5), on this process's thread pool.
    #[arg(long)]
    pub profile: bool,
    /// How contrastive negatives span the ranks: `local` (each rank's
    /// rows against all columns) or `full` (the whole matrix on every rank).
    #[arg(long, value_enum, default_value_t = Contrastive::Local)]
    pub negatives: Contrastive,
    /// `f32`, or `bf16` (mixed precision, as the manifest's train.precision).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// Process each replica's rows in this many chunks, negatives from the
    /// whole batch (as the manifest's train.accumulation).
    #[arg(long, default_value_t = 1)]
    pub accumulation: usize,
    /// Clip the gradient's L2 norm to this (as train.grad_clip_norm).
    #[arg(long, value_name = "NORM")]
    pub grad_clip_norm: Option<f32>,
    /// Drop this share of each image's patches (as train.patch_dropout).
    #[arg(long, default_value_t = 0.0, value_name = "SHARE")]
    pub patch_dropout: f64,
    /// Shard AdamW's moments between the --world ranks (as
    /// train.shard_optimizer).
    #[arg(long)]
    pub shard_optimizer: bool,
    /// Compute the towers' blocks again in the backward pass instead of
    /// keeping their activations (as train.activation_checkpointing).
    #[arg(long)]
    pub activation_checkpointing: bool,
    /// Write the final parameters here (f32 little-endian, in module
    /// visiting order), to compare runs.
    #[arg(long, value_name = "FILE")]
    pub parameters_out: Option<PathBuf>,
    #[command(flatten)]
    pub local_rank: LocalRank,
}

/// Internal: how `--world N` starts its ranks, each a process of this
/// binary joined into a TCP ring at loopback addresses the parent chose.
#[derive(Debug, Clone, clap::Args)]
pub struct LocalRank {
    /// This process's rank.
    #[arg(long, hide = true, requires = "peers")]
    child_rank: Option<usize>,
    /// Every rank's ring address, in rank order.
    #[arg(long, hide = true, value_delimiter = ',')]
    peers: Vec<SocketAddr>,
    /// NCCL: the unique id the parent made, in hex.
    #[arg(long, hide = true)]
    nccl_id: Option<String>,
}

impl LocalRank {
    /// This process's place in the ring (or the NCCL communicator, on GPU
    /// `rank`), when it is a child rank.
    fn join(&self, nccl: bool) -> anyhow::Result<Option<Box<dyn Collective>>> {
        let Some(rank) = self.child_rank else { return Ok(None) };
        if nccl {
            let id = self.nccl_id.as_deref().context("--collective nccl: no --nccl-id")?;
            return Ok(Some(local_ranks::join_nccl(rank, self.peers.len(), id)?));
        }
        Ok(Some(local_ranks::join_ring(rank, &self.peers)?))
    }
}

/// This binary, which `--world N` starts N times.
fn this_program() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("cannot find the running coca binary")
}

/// How a choice is spelled on the command line.
fn value_name(value: impl clap::ValueEnum) -> String {
    let value = value.to_possible_value().expect("no skipped variants");
    value.get_name().to_string()
}

/// The process's peak resident memory (Linux), for what a step holds at once.
fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kilobytes: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kilobytes * 1024)
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

impl BenchCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            BenchCommand::Caption { model, beam, max_len } => caption(model, beam, max_len),
            BenchCommand::Checkpoint { model, world, dir } => checkpoint(model, world, dir),
            BenchCommand::Coordinator {
                workers,
                heartbeat_ms,
                seconds,
            } => coordinator(workers, heartbeat_ms, seconds),
            BenchCommand::Data {
                urls,
                image_size,
                threads,
                batch,
                batches,
                store,
            } => data(urls, image_size, threads, batch, batches, store),
            BenchCommand::Step(args) => step(args),
            BenchCommand::Allreduce {
                world,
                collective,
                mib,
                iterations,
                warmup,
                local_rank,
            } => allreduce(world, collective, mib, iterations, warmup, local_rank),
        }
    }
}

fn caption(model: ModelArgs, beam: usize, max_len: usize) -> anyhow::Result<()> {
    ensure!(beam >= 1 && max_len >= 1, "--beam and --max-len must be at least 1");
    let config = model.resolve()?;
    let max_len = max_len.min(config.context_length - 1);
    let (cached, uncached) = bench::caption::bench_caption::<model::backend::Cpu>(&config, beam, max_len);
    let rate = |seconds: f64| max_len as f64 / seconds;
    println!("caption: {max_len} tokens, beam {beam}, preset weights at random");
    println!("with the key/value cache: {cached:.3} s = {:.1} tokens/s", rate(cached));
    println!(
        "recomputing the prefix:   {uncached:.3} s = {:.1} tokens/s",
        rate(uncached)
    );
    println!("the cache is {:.1}x faster", uncached / cached);
    Ok(())
}

fn checkpoint(model: ModelArgs, world: usize, dir: Option<PathBuf>) -> anyhow::Result<()> {
    ensure!(world >= 1, "--world must be at least 1");
    let config = model.resolve()?;
    let scratch = match &dir {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir()?,
    };
    let report = bench::checkpoint::bench_checkpoint::<CpuTrain>(&config, world, scratch.path())?;
    let gb = |bytes: u64, seconds: f64| bytes as f64 / seconds.max(1e-9) / 1e9;
    let total = report.total_bytes;
    println!(
        "checkpoint: {:.2} GB of parameters and AdamW moments, {world} ranks, in {}",
        total as f64 / 1e9,
        scratch.path().display()
    );
    for (rank, (bytes, seconds)) in report.saves.iter().enumerate() {
        println!(
            "  rank {rank}: saved {:.3} GB in {seconds:.2} s = {:.2} GB/s",
            *bytes as f64 / 1e9,
            gb(*bytes, *seconds)
        );
    }
    println!(
        "save: {:.2} s for all ranks, {:.2} GB/s per rank",
        report.save_seconds,
        gb(total / world as u64, report.save_seconds)
    );
    println!(
        "load (one rank reads every shard, checks SHA-256): {:.2} s = {:.2} GB/s",
        report.load_seconds,
        gb(total, report.load_seconds)
    );
    println!(
            "ceiling (plain writes of the same sizes, {world} at once, synced): {:.2} s = {:.2} GB/s per rank; save reaches {:.0}% of it",
            report.baseline_seconds,
            gb(total / world as u64, report.baseline_seconds),
            100.0 * report.baseline_seconds / report.save_seconds
        );
    Ok(())
}

fn coordinator(workers: usize, heartbeat_ms: u64, seconds: u64) -> anyhow::Result<()> {
    ensure!(
        workers >= 1 && heartbeat_ms >= 1 && seconds >= 1,
        "--workers, --heartbeat-ms and --seconds must be at least 1"
    );
    let dir = tempfile::tempdir()?;
    let report = bench::swarm::run(&this_program()?, dir.path(), workers, heartbeat_ms, seconds)?;
    println!(
        "coordinator: {workers} simulated workers registered and met in {:.2} s",
        report.registered_in.as_secs_f64()
    );
    println!(
        "heartbeats: {} in {seconds} s, latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        report.heartbeats,
        ms(report.p50),
        ms(report.p99),
        ms(report.max)
    );
    println!("coordinator CPU: {:.2} cores", report.coordinator_cores);
    let recovery = &report.recovery;
    if let (Some(first), Some(last)) = (recovery.first(), recovery.last()) {
        println!(
            "recovery: one worker lost, its neighbour reports the broken ring; {} assignments of the new ring \
             (the survivors and a spare) handed out in {:.2} s (first {:.2} s, median {:.2} s)",
            recovery.len(),
            last.as_secs_f64(),
            first.as_secs_f64(),
            recovery[recovery.len() / 2].as_secs_f64()
        );
    }
    Ok(())
}

fn data(
    urls: Vec<String>,
    image_size: u32,
    threads: Option<usize>,
    batch: usize,
    batches: usize,
    store: super::StoreArgs,
) -> anyhow::Result<()> {
    ensure!(batch >= 1 && batches >= 1, "--batch and --batches must be at least 1");
    let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut baseline = None;
    for url in &urls {
        let dataset = super::data::open_any(url, &store)?;
        let (rows, bytes) = (
            dataset.index().rows(),
            dataset.index().shards.iter().map(|s| s.bytes).sum::<u64>(),
        );
        // Tokenizing is part of the work measured; any trained tokenizer does.
        let texts = corpus::texts(&dataset, &PromptTemplates::clip80())?;
        let tokenizer = TextTokenizer::train(texts.iter().take(20_000), 1000)?;
        let report = bench::data::bench_data(dataset, tokenizer, image_size, threads, batch, batches)?;
        let per_core = report.per_core();
        let versus = baseline.map_or(String::new(), |first: f64| {
            format!(", {:.2}x the first", per_core / first)
        });
        baseline.get_or_insert(per_core);
        println!(
            "data {url}: {} samples at {image_size}px in {:.2} s: {:.1} samples/s, {per_core:.1} per core ({threads} threads){versus}",
            report.samples,
            report.seconds,
            report.samples_per_second(),
        );
        let read = (batch * (batches + 1)) as f64 / rows as f64;
        println!(
            "  fetched {:.1} MB of the dataset's {:.1} MB ({:.3}x) reading {:.2} epochs' samples",
            report.fetched_bytes as f64 / 1e6,
            bytes as f64 / 1e6,
            report.fetched_bytes as f64 / bytes as f64,
            read
        );
    }
    Ok(())
}

fn step(args: StepArgs) -> anyhow::Result<()> {
    let StepArgs {
        model,
        backend,
        device: ordinal,
        autotune,
        kernel_cache,
        batch,
        steps,
        warmup,
        seed,
        world,
        negatives,
        precision,
        replicas,
        profile,
        accumulation,
        grad_clip_norm,
        patch_dropout,
        shard_optimizer,
        activation_checkpointing,
        parameters_out,
        local_rank,
    } = args;
    ensure!(steps >= 1, "--steps must be at least 1");
    ensure!(world >= 1, "--world must be at least 1");
    ensure!(
        batch >= world && batch % world == 0,
        "--batch {batch} does not split evenly between --world {world} ranks"
    );
    ensure!(
        backend == Backend::Cpu || (world == 1 && local_rank.child_rank.is_none()),
        "--backend {} runs one process: leave out --world",
        value_name(backend)
    );
    ensure!(
        replicas >= 1 && (batch / world) % replicas == 0,
        "--replicas {replicas} does not split each rank's {} samples evenly",
        batch / world
    );
    ensure!(
        backend == Backend::Cpu || replicas == 1,
        "--replicas is for the cpu backend"
    );
    ensure!(
        !shard_optimizer || replicas == 1,
        "--shard-optimizer shards between --world ranks: leave out --replicas"
    );
    let rows = batch / world / replicas;
    ensure!(
        (1..=rows).contains(&accumulation),
        "--accumulation {accumulation} must be between 1 and the {rows} samples each replica steps on"
    );
    ensure!(
        grad_clip_norm.is_none_or(|norm| norm > 0.0 && norm.is_finite()),
        "--grad-clip-norm must be a positive number"
    );
    ensure!(
        (0.0..1.0).contains(&patch_dropout),
        "--patch-dropout must be in [0, 1): the share of patches dropped"
    );
    let config = model.resolve()?;
    let plan = StepBenchmarkPlan {
        batch,
        warmup,
        steps,
        seed,
        mode: negatives.into(),
        precision,
        replicas,
        profile: if profile { 5 } else { 0 },
        accumulation,
        clip_norm: grad_clip_norm,
        patch_dropout,
        shard_optimizer,
        activation_checkpointing,
    };
    let gpu = contract::manifest::Gpu {
        autotune,
        kernel_cache,
        log_compilations: true,
    };
    if backend != Backend::Cpu {
        let on_gpu = match backend {
            Backend::Cuda => bench::gpu::cuda(&config, plan, &gpu, ordinal),
            _ => bench::gpu::wgpu(&config, plan, &gpu, ordinal),
        }
        .with_context(|| format!("--backend {}", value_name(backend)))?;
        print_step(&model, plan, &config, &on_gpu.report, &on_gpu.device);
        let kernels = on_gpu
            .kernels_compiled
            .map_or("not counted".into(), |n| format!("{n} compiled"));
        println!("  kernels       {kernels}");
        return Ok(());
    }
    let device = Default::default();
    let run = |collective: &mut dyn Collective| -> anyhow::Result<StepBenchmark> {
        let report = bench_step::<CpuTrain>(&config, plan, collective, &device)?;
        if let (Some(path), 0) = (&parameters_out, collective.rank()) {
            let bytes: Vec<u8> = report.parameters.iter().flat_map(|value| value.to_le_bytes()).collect();
            std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(report)
    };
    if let Some(mut ring) = local_rank.join(false)? {
        let report = run(ring.as_mut())?;
        println!("{}", local_ranks::report(report.median_wall()));
        if let Some(peak) = peak_resident_bytes() {
            eprintln!(
                "  rank {} peak memory {:8.1} MB  (resident: VmHWM)",
                ring.rank(),
                peak as f64 / 1e6
            );
        }
        return Ok(());
    }
    if world > 1 {
        return step_on_local_ranks(&model, plan, world, parameters_out.as_deref(), negatives);
    }
    let report = run(&mut Solo)?;
    let on = match replicas {
        1 => format!("{} threads (cpu)", report.threads),
        _ => format!("{replicas} replicas, a thread each (cpu)"),
    };
    print_step(&model, plan, &config, &report, &on);
    print_moments(&model, shard_optimizer, 1)
}

/// `--world N`: the same benchmark in N processes on the TCP ring.
fn step_on_local_ranks(
    model: &ModelArgs,
    plan: StepBenchmarkPlan,
    world: usize,
    parameters_out: Option<&Path>,
    negatives: Contrastive,
) -> anyhow::Result<()> {
    let StepBenchmarkPlan {
        batch,
        warmup,
        steps,
        seed,
        ..
    } = plan;
    let mut args: Vec<String> = ["bench", "step", "--preset", model.preset.name()]
        .into_iter()
        .map(String::from)
        .collect();
    for assignment in &model.overrides {
        args.extend(["--set".to_string(), assignment.clone()]);
    }
    for (flag, value) in [("--batch", batch), ("--steps", steps), ("--warmup", warmup)] {
        args.extend([flag.to_string(), value.to_string()]);
    }
    args.extend(["--seed".to_string(), seed.to_string()]);
    args.extend(["--replicas".to_string(), plan.replicas.to_string()]);
    args.extend(["--negatives".to_string(), value_name(negatives)]);
    if plan.precision == Precision::Bf16 {
        args.extend(["--precision".to_string(), "bf16".to_string()]);
    }
    args.extend(["--accumulation".to_string(), plan.accumulation.to_string()]);
    args.extend(["--patch-dropout".to_string(), plan.patch_dropout.to_string()]);
    if plan.shard_optimizer {
        args.push("--shard-optimizer".to_string());
    }
    if plan.activation_checkpointing {
        args.push("--activation-checkpointing".to_string());
    }
    if let Some(norm) = plan.clip_norm {
        args.extend(["--grad-clip-norm".to_string(), norm.to_string()]);
    }
    if let Some(path) = &parameters_out {
        args.extend(["--parameters-out".to_string(), path.display().to_string()]);
    }
    let median = local_ranks::run(&this_program()?, &args, world)?;
    println!(
        "bench step: preset {} global batch {batch} on {world} processes (TCP ring), \
             {steps} steps after {warmup} warm-up",
        model.preset
    );
    println!("  median step   {:8.1} ms  (slowest rank)", ms(median));
    print_moments(model, plan.shard_optimizer, world)
}

/// The bytes of AdamW's moments each rank holds: all of them, or with
/// --shard-optimizer the largest rank's segment.
fn print_moments(model: &ModelArgs, sharded: bool, world: usize) -> anyhow::Result<()> {
    let config = model.resolve()?;
    let parameters = CocaModel::<CpuTrain>::placeholder(&config, &Default::default());
    let whole = TrainStep::<CpuTrain>::segment(&parameters, 0, 1).end;
    let held = if sharded {
        let largest = TrainStep::<CpuTrain>::segment(&parameters, 0, world);
        largest.end - largest.start
    } else {
        whole
    };
    let mb = |elements: u64| (2 * 4 * elements) as f64 / 1e6;
    let how = if sharded { "sharded" } else { "whole on every rank" };
    println!(
        "  AdamW moments {:8.1} MB per rank ({how}; {:.1} MB in all)",
        mb(held),
        mb(whole)
    );
    Ok(())
}

fn allreduce(
    world: usize,
    collective: CollectiveKind,
    mib: usize,
    iterations: usize,
    warmup: usize,
    local_rank: LocalRank,
) -> anyhow::Result<()> {
    let nccl = collective == CollectiveKind::Nccl;
    ensure!(world >= 2 || nccl, "--world must be at least 2");
    ensure!(mib >= 1 && iterations >= 1, "--mib and --iterations must be at least 1");
    let bytes = mib << 20;
    if let Some(mut ring) = local_rank.join(nccl)? {
        let report = bench_all_reduce(ring.as_mut(), bytes, warmup, iterations)?;
        println!("{}", local_ranks::report(report.median()));
        return Ok(());
    }
    let mut on_device = None;
    let median = if nccl && world == 1 {
        let mut communicator = local_ranks::nccl_unique_id()
            .and_then(|id| local_ranks::join_nccl(0, 1, &id))
            .context("--collective nccl")?;
        let staged = bench_all_reduce(communicator.as_mut(), bytes, warmup, iterations)?.median();
        on_device = Some(device_all_reduce(communicator.as_mut(), bytes, warmup, iterations)?);
        staged
    } else {
        let mut args: Vec<String> = [
            "bench",
            "allreduce",
            "--mib",
            &mib.to_string(),
            "--warmup",
            &warmup.to_string(),
        ]
        .into_iter()
        .map(String::from)
        .chain(["--iterations".to_string(), iterations.to_string()])
        .collect();
        if nccl {
            args.extend([
                "--collective".into(),
                "nccl".into(),
                "--nccl-id".into(),
                local_ranks::nccl_unique_id().context("--collective nccl")?,
            ]);
        }
        local_ranks::run(&this_program()?, &args, world)?
    };
    let (algorithm, bus) = all_reduce_bandwidth(bytes, world, median);
    let gb = |bytes_per_second: f64| bytes_per_second / 1e9;
    let over = match collective {
        CollectiveKind::Tcp => "processes on loopback (TCP ring)",
        CollectiveKind::Nccl => "ranks on NCCL, host buffers staged through GPU memory",
    };
    println!("bench allreduce: {world} {over}, {mib} MiB of f32, {iterations} iterations after {warmup} warm-up");
    println!("  median time   {:8.1} ms  (slowest rank)", ms(median));
    println!("  algorithm bw  {:8.2} GB/s", gb(algorithm));
    println!(
        "  bus bw        {:8.2} GB/s  (algorithm bw x 2(n-1)/n, as nccl-tests)",
        gb(bus)
    );
    println!(
        "  memcpy bw     {:8.2} GB/s  (one thread, same buffer: the ceiling)",
        gb(memcpy_bandwidth(bytes, 10))
    );
    if let Some((device_median, buckets)) = on_device {
        println!(
            "  on the device {:8.1} ms  (the gradients' path: NCCL on the tensor's GPU memory, no staging; \
             {:.2}x the staged time)",
            ms(device_median),
            device_median.as_secs_f64() / median.as_secs_f64()
        );
        println!("  results land  ok (0..n sent into zeros in {buckets} buckets, read back through burn)");
    }
    Ok(())
}

/// The gradients' all-reduce on GPU memory (median time), after checking
/// that NCCL's results land in the tensors it names (buckets checked).
#[cfg(feature = "cuda")]
fn device_all_reduce(
    collective: &mut dyn Collective,
    bytes: usize,
    warmup: usize,
    iterations: usize,
) -> anyhow::Result<(Duration, usize)> {
    let len = bytes / size_of::<f32>();
    // Values up to 2^24 are whole f32s; buckets of an odd length cross the buffer unevenly.
    let checked = len.min(1 << 24);
    let buckets = bench::all_reduce::check_device_results_land(collective, checked, checked / 5 + 3, 0)?;
    let report = bench::all_reduce::bench_device_reduce_mean(collective, bytes, warmup, iterations, 0)?;
    Ok((report.median(), buckets))
}

#[cfg(not(feature = "cuda"))]
fn device_all_reduce(_: &mut dyn Collective, _: usize, _: usize, _: usize) -> anyhow::Result<(Duration, usize)> {
    anyhow::bail!(local_ranks::LocalRanksError::WithoutCuda)
}

/// One process's step benchmark, printed.
fn print_step(model: &ModelArgs, plan: StepBenchmarkPlan, config: &ModelConfig, report: &StepBenchmark, on: &str) {
    let (batch, median) = (plan.batch, report.median_wall());
    let precision = match plan.precision {
        Precision::F32 => "f32",
        Precision::Bf16 => "bf16 mixed precision",
    };
    let mut accumulation = match plan.accumulation {
        1 => String::new(),
        chunks => format!(", {chunks} accumulated chunks"),
    };
    if plan.patch_dropout > 0.0 {
        accumulation += &format!(", patch dropout {}", plan.patch_dropout);
    }
    if plan.activation_checkpointing {
        accumulation += ", activation checkpointing";
    }
    println!(
        "bench step: preset {} batch {batch}, {} steps after {} warm-up, {precision}{accumulation}, {on}",
        model.preset, plan.steps, plan.warmup
    );
    println!(
        "  first step    {:8.1} s   (from start: build, compile, tune)",
        report.first_step.as_secs_f64()
    );
    println!("  median step   {:8.1} ms  (wall)", ms(median));
    println!("    forward     {:8.1} ms", ms(report.median(|t| t.forward)));
    println!("    backward    {:8.1} ms", ms(report.median(|t| t.backward)));
    println!("    optimizer   {:8.1} ms", ms(report.median(|t| t.optimizer)));
    let totals: Vec<f64> = report.walls.iter().map(|&t| ms(t)).collect();
    let (min, max) = totals
        .iter()
        .fold((f64::MAX, 0f64), |(lo, hi), &t| (lo.min(t), hi.max(t)));
    println!("  min / max     {min:8.1} / {max:.1} ms");
    println!("  samples/s     {:8.1}", batch as f64 / median.as_secs_f64());
    let flops = config.training_flops(batch);
    println!(
        "  model FLOP/s  {:.3e}  ({flops:.3e} FLOP a step)",
        flops / median.as_secs_f64()
    );
    println!("  loss          {:.4} -> {:.4}", report.first_loss, report.last_loss);
    if let Some(peak) = peak_resident_bytes() {
        println!(
            "  peak memory   {:8.1} MB  (resident, this process: VmHWM)",
            peak as f64 / 1e6
        );
    }
    if !report.parts.is_empty() {
        println!(
            "  per part, on its own ({} threads, median of {}):",
            report.threads, plan.profile
        );
        println!("    {:34} {:>9} {:>9}", "part", "forward", "backward");
        let (mut forward, mut backward) = (0.0, 0.0);
        for part in &report.parts {
            println!(
                "    {:34} {:6.1} ms {:6.1} ms",
                part.part,
                ms(part.forward),
                ms(part.backward)
            );
            forward += ms(part.forward);
            backward += ms(part.backward);
        }
        println!("    {:34} {forward:6.1} ms {backward:6.1} ms", "sum");
    }
}
