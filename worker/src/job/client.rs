//! The worker's line to the coordinator: connecting with backoff, the
//! heartbeat thread, and the progress it reports.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::auth::Bearer;
use proto::coordinator_client::CoordinatorClient;
use proto::{
    Assignment, CollectiveKind, Command, FinishRequest, HeartbeatRequest, RegisterRequest, RendezvousRequest,
    StepMetrics, WorkerPhase, PROTOCOL_VERSION,
};
use retry::RetryPolicy;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::Code;

use super::{WorkerError, WorkerOptions};

pub(super) type Client = CoordinatorClient<InterceptedService<Channel, Bearer>>;

/// What the heartbeat thread and the training loop tell each other.
#[derive(Default)]
pub(super) struct Signals {
    /// The coordinator said stop: every rank stops at the same step.
    pub stop: AtomicBool,
    /// Why this generation must end (the coordinator recovers, or is
    /// lost): every rank drops the step and rendezvous again.
    pub regroup: Mutex<Option<String>>,
    /// The coordinator does not know this worker (it restarted, or gave it
    /// up for lost), or cannot be reached: register again before rejoining.
    pub register_again: AtomicBool,
    /// The worker has ended: the heartbeat thread ends too.
    pub done: AtomicBool,
    /// Heartbeat now, not at the next beat: a generation's first step is
    /// done (the coordinator times a recovery up to it).
    pub report_now: AtomicBool,
    /// Ends the ring's blocked operations, while a generation trains: a
    /// regroup does not wait for a hung peer's timeout.
    pub interrupt: Mutex<Option<collective::Interrupt>>,
}

impl Signals {
    fn regroup(&self, why: String) {
        self.regroup.lock().expect("signals").get_or_insert(why);
    }
}

/// Latest progress, shared between the training loop and the heartbeat thread.
#[derive(Default)]
pub(super) struct Progress {
    /// The id the coordinator gave this worker (a new one after registering again).
    pub id: String,
    /// The generation it trains in (0 while it waits for its first).
    pub generation: u64,
    pub step: u64,
    /// Steps completed since the last heartbeat.
    pub metrics: Vec<StepMetrics>,
    pub phase: WorkerPhase,
    /// Empty until the backend is known to be other than the registered `cpu`.
    pub device: String,
}

/// How a rendezvous ended when it gave no assignment.
pub(super) enum NoAssignment {
    /// The coordinator does not know this worker or cannot be reached.
    RegisterAgain(String),
    /// The job ended while this worker waited (a spare, or a late rank).
    JobOver {
        completed: bool,
        message: String,
    },
    Failed(WorkerError),
}

pub(super) async fn connect(options: &WorkerOptions) -> Result<Client, WorkerError> {
    let bearer = Bearer::new(&options.token)?;
    let url = options.coordinator.clone();
    let mut endpoint = Channel::from_shared(url.clone()).map_err(|e| WorkerError::Unreachable {
        url: url.clone(),
        seconds: 0,
        message: e.to_string(),
    })?;
    let tls_failed = |message: String| WorkerError::Tls {
        url: url.clone(),
        message,
    };
    if url.starts_with("https://") {
        let Some(ca) = &options.ca else {
            return Err(tls_failed(
                "--ca FILE is needed: the CA certificate (PEM) that signed the coordinator's".into(),
            ));
        };
        let pem = std::fs::read(ca).map_err(|e| tls_failed(format!("--ca {}: {e}", ca.display())))?;
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| tls_failed(store::error_chain(&e)))?;
    }
    let deadline = Instant::now() + options.connect_timeout;
    let patience = RetryPolicy::until_deadline(Duration::from_millis(100), Duration::from_secs(2));
    // A certificate that does not verify will not verify later either.
    let transient = |error: &tonic::transport::Error| !store::error_chain(error).contains("certificate");
    match retry::retry(&patience, Some(deadline), transient, || endpoint.connect()).await {
        Ok(channel) => Ok(CoordinatorClient::with_interceptor(channel, bearer)),
        Err(gave_up) if !transient(&gave_up.error) => Err(tls_failed(format!(
            "the coordinator's certificate does not verify against --ca {}: {}",
            options
                .ca
                .as_ref()
                .map_or_else(String::new, |ca| ca.display().to_string()),
            store::error_chain(&gave_up.error)
        ))),
        Err(gave_up) => Err(WorkerError::Unreachable {
            url: options.coordinator.clone(),
            seconds: options.connect_timeout.as_secs(),
            message: std::error::Error::source(&gave_up.error).map_or(gave_up.error.to_string(), |s| s.to_string()),
        }),
    }
}

pub(super) struct Registered {
    pub id: String,
    pub collective: CollectiveKind,
    pub heartbeat: Duration,
}

async fn register_call(mut client: Client, options: &WorkerOptions) -> Result<Registered, tonic::Status> {
    let reply = client
        .register(RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            host: options.host.clone(),
            device: "cpu".into(),
            preferred_rank: options.preferred_rank,
        })
        .await?
        .into_inner();
    Ok(Registered {
        collective: reply.collective(),
        id: reply.worker_id,
        heartbeat: Duration::from_millis(reply.heartbeat_ms.max(10)),
    })
}

/// Registers (as `cpu` until the backend is known; heartbeats correct
/// it): the worker's id, its collective and how often to heartbeat. Tries
/// while the coordinator cannot be reached (it may be starting, or starting
/// again) until `options.connect_timeout`; a refusal ends it at once.
pub(super) async fn register(client: &Client, options: &WorkerOptions) -> Result<Registered, WorkerError> {
    let deadline = Instant::now() + options.connect_timeout;
    let patience = RetryPolicy::until_deadline(Duration::from_millis(100), Duration::from_secs(1));
    let unreachable =
        |status: &tonic::Status| matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled);
    retry::retry(&patience, Some(deadline), unreachable, || {
        register_call(client.clone(), options)
    })
    .await
    .map_err(|gave_up| match gave_up.error.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled => WorkerError::Unreachable {
            url: options.coordinator.clone(),
            seconds: options.connect_timeout.as_secs(),
            message: gave_up.error.message().to_string(),
        },
        // What a coordinator serving TLS makes of a plain-HTTP call.
        _ if options.coordinator.starts_with("http://") && gave_up.error.message().contains("h2 protocol error") => {
            WorkerError::Tls {
                url: options.coordinator.clone(),
                message: format!(
                    "{} (a coordinator with auth.tls_cert speaks TLS: use https:// and --ca)",
                    gave_up.error.message()
                ),
            }
        }
        _ => WorkerError::Refused {
            call: "registration",
            message: gave_up.error.message().to_string(),
        },
    })
}

/// The generation a worker trained in and left: the steps it had
/// completed there, and why it left.
#[derive(Debug, Clone)]
pub(super) struct LeftRing {
    pub generation: u64,
    pub step: u64,
    pub because: String,
}

/// Asks to join the coming generation, listening at `collective_address`,
/// after leaving generation `left`, and waits for the
/// assignment. In an NCCL job every worker sends a unique id; rank 0's
/// reaches every rank.
pub(super) async fn rendezvous(
    client: &mut Client,
    registered: &Registered,
    collective_address: SocketAddr,
    left: Option<LeftRing>,
) -> Result<Assignment, NoAssignment> {
    let nccl_unique_id = match registered.collective {
        CollectiveKind::Tcp => Vec::new(),
        CollectiveKind::Nccl => match nccl_unique_id() {
            Ok(nccl_unique_id) => nccl_unique_id,
            Err(error) => {
                // Said to the coordinator too, so the job fails with the cause, not a lost worker.
                let finish = FinishRequest {
                    worker_id: registered.id.clone(),
                    step: 0,
                    ok: false,
                    message: error.to_string(),
                };
                let _ = client.finish(finish).await;
                return Err(NoAssignment::Failed(error));
            }
        },
    };
    let request = RendezvousRequest {
        worker_id: registered.id.clone(),
        nccl_unique_id,
        collective_address: collective_address.to_string(),
        left_generation: left.as_ref().map_or(0, |left| left.generation),
        left_at_step: left.as_ref().map_or(0, |left| left.step),
        left_because: left.map(|left| left.because).unwrap_or_default(),
    };
    match client.rendezvous(request).await {
        Ok(assignment) => Ok(assignment.into_inner()),
        Err(status) => Err(match status.code() {
            Code::NotFound | Code::Unavailable | Code::Unknown | Code::Cancelled => {
                NoAssignment::RegisterAgain(status.message().to_string())
            }
            Code::Aborted => NoAssignment::JobOver {
                completed: ["completed", "stopped"]
                    .iter()
                    .any(|state| status.message().ends_with(state)),
                message: status.message().to_string(),
            },
            _ => NoAssignment::Failed(WorkerError::Refused {
                call: "rendezvous",
                message: status.message().to_string(),
            }),
        }),
    }
}

/// A new NCCL unique id, as bytes.
#[cfg(feature = "cuda")]
fn nccl_unique_id() -> Result<Vec<u8>, WorkerError> {
    Ok(collective::nccl::NcclCollective::unique_id()?)
}

#[cfg(not(feature = "cuda"))]
fn nccl_unique_id() -> Result<Vec<u8>, WorkerError> {
    Err(super::NCCL_WITHOUT_CUDA)
}

/// Heartbeats every `every` until the worker is done, through every
/// generation and every registration; turns the coordinator's commands
/// (and its silence) into signals for the training loop.
pub(super) fn spawn_heartbeat(
    runtime: tokio::runtime::Handle,
    mut client: Client,
    every: Duration,
    progress: Arc<Mutex<Progress>>,
    signals: Arc<Signals>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut failures = 0;
        loop {
            let id = progress.lock().expect("progress").id.clone();
            let sent = send_heartbeat(&runtime, &mut client, &progress);
            if sent.is_ok() {
                failures = 0;
            }
            match sent {
                Ok(Command::Stop) => signals.stop.store(true, Ordering::SeqCst),
                Ok(Command::Regroup) => {
                    signals.regroup("the coordinator is recovering the job".into());
                    if let Some(interrupt) = signals.interrupt.lock().expect("signals").take() {
                        interrupt();
                    }
                }
                Ok(Command::Continue) => {}
                Err(status) if status.code() == Code::NotFound => {
                    // Only if no newer registration has replaced the id meanwhile.
                    if progress.lock().expect("progress").id == id {
                        signals.register_again.store(true, Ordering::SeqCst);
                        signals.regroup(format!(
                            "the coordinator does not know this worker: {}",
                            status.message()
                        ));
                    }
                }
                Err(status) => {
                    failures += 1;
                    if failures >= 5 {
                        signals.register_again.store(true, Ordering::SeqCst);
                        signals.regroup(format!("lost the coordinator: {}", status.message()));
                    }
                }
            }
            let wake = Instant::now() + every;
            while Instant::now() < wake && !signals.report_now.swap(false, Ordering::SeqCst) {
                if signals.done.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    })
}

/// One heartbeat with the latest progress; returns the coordinator's command.
pub(super) fn send_heartbeat(
    runtime: &tokio::runtime::Handle,
    client: &mut Client,
    progress: &Mutex<Progress>,
) -> Result<Command, tonic::Status> {
    let request = {
        let mut progress = progress.lock().expect("progress");
        HeartbeatRequest {
            worker_id: progress.id.clone(),
            step: progress.step,
            metrics: std::mem::take(&mut progress.metrics),
            phase: progress.phase as i32,
            device: progress.device.clone(),
            generation: progress.generation,
        }
    };
    let reply = runtime.block_on(client.heartbeat(request))?;
    Ok(Command::try_from(reply.get_ref().command).unwrap_or(Command::Continue))
}
