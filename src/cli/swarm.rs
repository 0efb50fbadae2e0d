//! `coca bench coordinator`: a swarm of simulated workers (tasks, not
//! processes) registering, heartbeating and reporting metrics against a
//! real `coca coordinator` process over loopback.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use contract::manifest::Manifest;
use proto::auth::{Bearer, Token};
use proto::coordinator_client::CoordinatorClient;
use proto::{HeartbeatRequest, RegisterRequest, RendezvousRequest, StepMetrics, WorkerPhase, PROTOCOL_VERSION};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Client = CoordinatorClient<InterceptedService<Channel, Bearer>>;

pub struct SwarmReport {
    pub registered_in: Duration,
    pub heartbeats: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// Coordinator CPU seconds per wall second while heartbeating.
    pub coordinator_cores: f64,
}

/// CPU seconds a process has used (user + system), from /proc.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("a malformed /proc stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

pub fn run(dir: &Path, workers: usize, heartbeat_ms: u64, seconds: u64) -> anyhow::Result<SwarmReport> {
    let data = dir.join("data");
    datasets::demo::write(
        &store::Store::open(&data.display().to_string(), &Default::default())?,
        &datasets::demo::DemoSpec {
            align_rows: 64,
            jft_rows: 64,
            heldout_rows: 8,
            vocab_size: 300,
            ..Default::default()
        },
    )?;
    let manifest = dir.join("swarm.toml");
    std::fs::write(&manifest, swarm_manifest(dir, &data, workers, heartbeat_ms)?)?;
    let mut coordinator = Command::new(std::env::current_exe()?)
        .args(["coordinator", &manifest.display().to_string()])
        .env("COCA_JOB_TOKEN", "swarm")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = coordinator.id();
    let mut lines = BufReader::new(coordinator.stdout.take().context("the coordinator's stdout")?).lines();
    let Some(Ok(line)) = lines.find(|line| line.as_ref().is_ok_and(|l| l.contains("gRPC on"))) else {
        let _ = coordinator.kill();
        bail!("the coordinator did not start");
    };
    let grpc = line
        .split("gRPC on ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .context("its address")?
        .to_string();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(swarm(&grpc, workers, heartbeat_ms, seconds, pid));
    let _ = coordinator.kill();
    let _ = coordinator.wait();
    result
}

/// The swarm's manifest: the tiny model on a demo dataset, as many
/// workers as simulated, a job too long to end during the measurement.
fn swarm_manifest(dir: &Path, data: &Path, workers: usize, heartbeat_ms: u64) -> anyhow::Result<String> {
    let table = |pairs: &[(&str, toml::Value)]| -> toml::Value {
        toml::Value::Table(pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())
    };
    let text = |value: String| toml::Value::String(value);
    let int = |value: u64| toml::Value::Integer(value as i64);
    let manifest = table(&[
        (
            "job",
            table(&[
                ("name", text("swarm".into())),
                ("steps", int(1_000_000_000)),
                ("dir", text(format!("{}/run", dir.display()))),
            ]),
        ),
        ("model", table(&[("preset", text("tiny".into()))])),
        (
            "data",
            table(&[
                ("tokenizer", text(format!("{}/tokenizer.json", data.display()))),
                (
                    "source",
                    toml::Value::Array(vec![table(&[
                        ("url", text(format!("{}/align", data.display()))),
                        ("kind", text("align".into())),
                    ])]),
                ),
            ]),
        ),
        ("train", table(&[("global_batch", int(workers as u64))])),
        (
            "cluster",
            table(&[
                ("workers", int(workers as u64)),
                ("coordinator", text("127.0.0.1:0".into())),
                ("heartbeat_ms", int(heartbeat_ms)),
                ("heartbeat_timeout_ms", int(heartbeat_ms * 30)),
            ]),
        ),
        ("status", table(&[("bind", text("127.0.0.1:0".into()))])),
    ]);
    let text = toml::to_string(&manifest)?;
    // Checked here, so a mistake shows as a manifest error, not a silent coordinator.
    Manifest::parse(&text, "the swarm manifest")?;
    Ok(text)
}

/// Registers every simulated worker and waits for the rendezvous: their
/// ids and the generation they train in.
async fn meet(channels: &[Client], workers: usize) -> anyhow::Result<(Vec<String>, u64)> {
    let mut ids = Vec::new();
    for i in 0..workers {
        let mut client = channels[i % channels.len()].clone();
        let reply = client
            .register(RegisterRequest {
                protocol_version: PROTOCOL_VERSION,
                host: format!("sim-{}", i / 8),
                device: "simulated".into(),
                preferred_rank: Some(i as u32),
            })
            .await?;
        ids.push(reply.into_inner().worker_id);
    }
    let mut waits = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let mut client = channels[i % channels.len()].clone();
        let id = id.clone();
        waits.push(tokio::spawn(async move {
            client
                .rendezvous(RendezvousRequest {
                    worker_id: id,
                    nccl_unique_id: Vec::new(),
                    collective_address: format!("10.{}.{}.{}:29500", i >> 16, (i >> 8) & 255, i & 255),
                    left_generation: 0,
                    left_because: String::new(),
                })
                .await
        }));
    }
    let mut generation = 0;
    for wait in waits {
        generation = wait.await??.into_inner().generation;
    }
    Ok((ids, generation))
}

async fn swarm(grpc: &str, workers: usize, heartbeat_ms: u64, seconds: u64, pid: u32) -> anyhow::Result<SwarmReport> {
    // Real workers each hold one HTTP/2 connection; 16 simulated workers share one here.
    let bearer = Bearer::new(&Token::new("swarm"))?;
    let mut channels = Vec::new();
    for _ in 0..workers.div_ceil(16) {
        let channel = Channel::from_shared(format!("http://{grpc}"))?.connect().await?;
        channels.push(CoordinatorClient::with_interceptor(channel, bearer.clone()));
    }
    let started = Instant::now();
    let (ids, generation) = meet(&channels, workers).await?;
    let registered_in = started.elapsed();

    let latencies = Arc::new(Mutex::new(Vec::new()));
    let cpu_before = cpu_seconds(pid)?;
    let window = Instant::now();
    let deadline = window + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for (i, id) in ids.into_iter().enumerate() {
        let mut client = channels[i % channels.len()].clone();
        let latencies = latencies.clone();
        // Spread the heartbeats over the period, as independent workers do.
        let offset = Duration::from_millis(heartbeat_ms * i as u64 / workers as u64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let mut step = 0;
            let mut mine = Vec::new();
            while Instant::now() < deadline {
                step += 1;
                let metrics = StepMetrics {
                    step,
                    loss: 5.0,
                    contrastive: 2.0,
                    captioning: 1.5,
                    learning_rate: 1e-4,
                    logit_scale: 14.0,
                    samples_per_second: 1000.0,
                    data_wait_share: 0.01,
                    bad_records: Vec::new(),
                    source_epochs: vec![0.1],
                    evals: Vec::new(),
                    source_samples: vec![step * 32],
                    traffic: Vec::new(),
                };
                let sent = Instant::now();
                let reply = client
                    .heartbeat(HeartbeatRequest {
                        worker_id: id.clone(),
                        step,
                        metrics: vec![metrics],
                        phase: WorkerPhase::Training as i32,
                        device: String::new(),
                        generation,
                    })
                    .await;
                if reply.is_ok() {
                    mine.push(sent.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(heartbeat_ms).saturating_sub(sent.elapsed())).await;
            }
            latencies.lock().expect("latencies").extend(mine);
        }));
    }
    for task in tasks {
        task.await?;
    }
    let wall = window.elapsed().as_secs_f64();
    let coordinator_cores = (cpu_seconds(pid)? - cpu_before) / wall;
    let mut latencies = std::mem::take(&mut *latencies.lock().expect("latencies"));
    if latencies.is_empty() {
        bail!("no heartbeat succeeded");
    }
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    Ok(SwarmReport {
        registered_in,
        heartbeats: latencies.len(),
        p50: at(0.5),
        p99: at(0.99),
        max: *latencies.last().expect("not empty"),
        coordinator_cores,
    })
}
