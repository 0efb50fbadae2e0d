//! `coca bench coordinator`: a swarm of simulated workers (tasks, not
//! processes) registering, heartbeating and reporting metrics against a
//! real `coca coordinator` process over loopback, whose CPU time is read
//! from /proc; then one worker is lost, its ring neighbour reports the
//! broken ring, and every other worker (and a spare that replaces the lost
//! one) regroups: the recovery is timed until the last assignment arrives.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use contract::manifest::{Manifest, ManifestError};
use proto::auth::{AuthError, Bearer, Token};
use proto::coordinator_client::CoordinatorClient;
use proto::{
    Command as Reply, HeartbeatRequest, RegisterRequest, RendezvousRequest, StepMetrics, WorkerPhase, PROTOCOL_VERSION,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Client = CoordinatorClient<InterceptedService<Channel, Bearer>>;

#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    #[error("cannot write the swarm's demo dataset")]
    Demo(#[from] datasets::demo::DemoError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("the swarm's manifest")]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("cannot start the coordinator ({program})")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the coordinator ({program}) did not start")]
    CoordinatorDidNotStart { program: String },
    #[error("the coordinator said it listens on `{0}`, which is not an address")]
    Address(String),
    #[error("cannot read the coordinator's CPU time: {0}")]
    Proc(String),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("cannot connect to the coordinator")]
    Connect(#[from] tonic::transport::Error),
    #[error("the coordinator refused a call")]
    Call(#[from] tonic::Status),
    #[error("a simulated worker failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("no heartbeat succeeded")]
    NoHeartbeat,
    #[error("the recovery did not hand out every assignment within {0:?}")]
    RecoveryTimeout(Duration),
}

pub struct SwarmReport {
    pub registered_in: Duration,
    pub heartbeats: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// Coordinator CPU seconds per wall second while heartbeating.
    pub coordinator_cores: f64,
    /// From the broken ring's report to each new assignment's arrival
    /// (every survivor's and the spare's), sorted.
    pub recovery: Vec<Duration>,
}

/// CPU seconds a process has used (user + system), from /proc.
fn cpu_seconds(pid: u32) -> Result<f64, SwarmError> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path)?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, fields)| fields.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime, in clock ticks (100 a second on Linux).
    let ticks = |at: usize| fields.get(at).and_then(|field| field.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(user), Some(system)) => Ok((user + system) / 100.0),
        _ => Err(SwarmError::Proc(format!("{path} is malformed"))),
    }
}

/// Runs `program coordinator` on a manifest in `dir` and a swarm of
/// `workers` against it for `seconds` after they met.
pub fn run(
    program: &Path,
    dir: &Path,
    workers: usize,
    heartbeat_ms: u64,
    seconds: u64,
) -> Result<SwarmReport, SwarmError> {
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
    let mut coordinator = Command::new(program)
        .args(["coordinator", &manifest.display().to_string()])
        .env("COCA_JOB_TOKEN", "swarm")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| SwarmError::Spawn {
            program: program.display().to_string(),
            source,
        })?;
    let pid = coordinator.id();
    let stdout = coordinator.stdout.take().expect("stdout is piped");
    // The coordinator's first lines say where it listens: "gRPC on ADDRESS, ...".
    // The pipe stays open until the coordinator is killed, so that what it
    // prints later does not fail on a closed pipe.
    let mut lines = BufReader::new(stdout).lines();
    let grpc = lines.by_ref().map_while(Result::ok).find_map(|line| {
        let rest = line.split("gRPC on ").nth(1)?;
        rest.split(',').next().map(str::to_string)
    });
    let Some(grpc) = grpc else {
        let _ = coordinator.kill();
        return Err(SwarmError::CoordinatorDidNotStart {
            program: program.display().to_string(),
        });
    };

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
fn swarm_manifest(dir: &Path, data: &Path, workers: usize, heartbeat_ms: u64) -> Result<String, ManifestError> {
    let quoted = |text: String| toml::Value::String(text).to_string();
    let text = format!(
        r#"[job]
name = "swarm"
steps = 1000000000
dir = {run}

[model]
preset = "tiny"

[data]
tokenizer = {tokenizer}

[[data.source]]
url = {align}
kind = "align"

[train]
global_batch = {workers}

[cluster]
workers = {workers}
coordinator = "127.0.0.1:0"
heartbeat_ms = {heartbeat_ms}
heartbeat_timeout_ms = {timeout_ms}

[status]
bind = "127.0.0.1:0"
"#,
        run = quoted(format!("{}/run", dir.display())),
        tokenizer = quoted(format!("{}/tokenizer.json", data.display())),
        align = quoted(format!("{}/align", data.display())),
        timeout_ms = heartbeat_ms * 30,
    );
    // Checked here, so a mistake shows as a manifest error, not a silent coordinator.
    Manifest::parse(&text, "the swarm manifest")?;
    Ok(text)
}

/// Registers every simulated worker and waits for the rendezvous: their
/// ids and the generation they train in.
async fn meet(channels: &[Client], workers: usize) -> Result<(Vec<String>, u64), SwarmError> {
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
                    ..Default::default()
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

/// Asks for a rank and waits for it, heartbeating meanwhile (from the
/// ring it left, `generation`) as a real worker does, so that a long
/// rendezvous does not make it silent.
async fn join(
    client: &mut Client,
    request: RendezvousRequest,
    generation: u64,
    heartbeat_ms: u64,
) -> Result<(), tonic::Status> {
    let mut beating = client.clone();
    let heartbeat = HeartbeatRequest {
        worker_id: request.worker_id.clone(),
        phase: WorkerPhase::Starting as i32,
        generation,
        ..Default::default()
    };
    let rendezvous = client.rendezvous(request);
    tokio::pin!(rendezvous);
    loop {
        tokio::select! {
            reply = &mut rendezvous => return reply.map(|_| ()),
            () = tokio::time::sleep(Duration::from_millis(heartbeat_ms)) => {
                beating.heartbeat(heartbeat.clone()).await?;
            }
        }
    }
}

async fn swarm(
    grpc: &str,
    workers: usize,
    heartbeat_ms: u64,
    seconds: u64,
    pid: u32,
) -> Result<SwarmReport, SwarmError> {
    // Real workers each hold one HTTP/2 connection; 16 simulated workers share one here.
    let bearer = Bearer::new(&Token::new("swarm"))?;
    let mut channels = Vec::new();
    for _ in 0..workers.div_ceil(16) {
        let channel = Channel::from_shared(format!("http://{grpc}"))
            .map_err(|_| SwarmError::Address(grpc.to_string()))?
            .connect()
            .await?;
        channels.push(CoordinatorClient::with_interceptor(channel, bearer.clone()));
    }
    let started = Instant::now();
    let (ids, generation) = meet(&channels, workers).await?;
    let registered_in = started.elapsed();

    // The spare that replaces the lost worker waits for the next generation.
    let mut spare_client = channels[0].clone();
    let spare_id = spare_client
        .register(RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            host: "sim-spare".into(),
            device: "simulated".into(),
            preferred_rank: None,
        })
        .await?
        .into_inner()
        .worker_id;

    let latencies = Arc::new(Mutex::new(Vec::new()));
    let assigned = Arc::new(Mutex::new(Vec::new()));
    let broken_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let cpu_before = cpu_seconds(pid)?;
    let window = Instant::now();
    let deadline = window + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    {
        let assigned = assigned.clone();
        tasks.push(tokio::spawn(async move {
            let request = RendezvousRequest {
                worker_id: spare_id,
                collective_address: "10.255.255.255:29500".into(),
                ..Default::default()
            };
            join(&mut spare_client, request, 0, heartbeat_ms).await?;
            assigned.lock().expect("assigned").push(Instant::now());
            Ok::<(), tonic::Status>(())
        }));
    }
    for (i, id) in ids.into_iter().enumerate() {
        let mut client = channels[i % channels.len()].clone();
        let (latencies, assigned, broken_at) = (latencies.clone(), assigned.clone(), broken_at.clone());
        // Spread the heartbeats over the period, as independent workers do.
        let offset = Duration::from_millis(heartbeat_ms * i as u64 / workers as u64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let mut step = 0;
            let mut mine = Vec::new();
            let regroup = loop {
                if Instant::now() >= deadline {
                    match i {
                        // Worker 0 is lost: silent from the deadline on.
                        0 => return Ok(()),
                        // Its ring neighbour reports the broken ring.
                        1 => {
                            *broken_at.lock().expect("broken_at") = Some(Instant::now());
                            break "ring broke: rank 0 lost (simulated)";
                        }
                        _ => {}
                    }
                }
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
                    gradient_norm: 1.0,
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
                if let Ok(reply) = &reply {
                    if sent < deadline {
                        mine.push(sent.elapsed());
                    }
                    if reply.get_ref().command == Reply::Regroup as i32 {
                        break "regroup";
                    }
                }
                tokio::time::sleep(Duration::from_millis(heartbeat_ms).saturating_sub(sent.elapsed())).await;
            };
            latencies.lock().expect("latencies").extend(mine);
            let request = RendezvousRequest {
                worker_id: id,
                collective_address: format!("10.{}.{}.{}:29501", i >> 16, (i >> 8) & 255, i & 255),
                left_generation: generation,
                left_because: regroup.into(),
                left_at_step: step,
                ..Default::default()
            };
            join(&mut client, request, generation, heartbeat_ms).await?;
            assigned.lock().expect("assigned").push(Instant::now());
            Ok(())
        }));
    }
    tokio::time::sleep_until(deadline.into()).await;
    let wall = window.elapsed().as_secs_f64();
    let coordinator_cores = (cpu_seconds(pid)? - cpu_before) / wall;
    let limit = Duration::from_secs(60) + Duration::from_millis(heartbeat_ms);
    let recovered = tokio::time::timeout(limit, async {
        for task in tasks {
            task.await??;
        }
        Ok::<(), SwarmError>(())
    });
    recovered.await.map_err(|_| SwarmError::RecoveryTimeout(limit))??;
    let broken_at = broken_at
        .lock()
        .expect("broken_at")
        .expect("worker 1 reported the broken ring");
    let mut recovery: Vec<Duration> = assigned
        .lock()
        .expect("assigned")
        .iter()
        .map(|at| at.saturating_duration_since(broken_at))
        .collect();
    recovery.sort();
    let mut latencies = std::mem::take(&mut *latencies.lock().expect("latencies"));
    if latencies.is_empty() {
        return Err(SwarmError::NoHeartbeat);
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
        recovery,
    })
}
