//! The worker's line to the coordinator: connecting with backoff, the
//! heartbeat thread, and the progress it reports.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use contract::auth::Bearer;
use contract::rpc::coordinator_client::CoordinatorClient;
use contract::rpc::{
    Assignment, CollectiveKind, Command, FinishRequest, HeartbeatRequest, RegisterRequest, RendezvousRequest,
    StepMetrics, WorkerPhase, PROTOCOL_VERSION,
};
use store::RetryPolicy;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::{WorkerError, WorkerOptions};

pub(super) type Client = CoordinatorClient<InterceptedService<Channel, Bearer>>;

/// What the heartbeat thread and the training loop tell each other.
#[derive(Default)]
pub(super) struct Signals {
    /// The coordinator said stop, or is lost: every rank stops at the same step.
    pub stop: AtomicBool,
    /// The training loop has ended: the heartbeat thread ends too.
    pub done: AtomicBool,
    /// Why the coordinator counts as lost (five heartbeats in a row failed).
    pub coordinator_lost: Mutex<Option<String>>,
}

/// Latest progress, shared between the training loop and the heartbeat thread.
#[derive(Default)]
pub(super) struct Progress {
    pub step: u64,
    /// Steps completed since the last heartbeat.
    pub metrics: Vec<StepMetrics>,
    pub phase: WorkerPhase,
    /// Empty until the backend is known to be other than the registered `cpu`.
    pub device: String,
}

pub(super) async fn connect(options: &WorkerOptions) -> Result<Client, WorkerError> {
    let bearer = Bearer::new(&options.token).map_err(|e| WorkerError::Setup(e.to_string()))?;
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

/// Registers (as `cpu` until the backend is known; heartbeats correct it)
/// and waits for the rendezvous: the worker's id and its assignment. In an
/// NCCL job every worker sends a unique id; rank 0's reaches every rank.
pub(super) async fn join(
    client: &mut Client,
    options: &WorkerOptions,
    collective_address: SocketAddr,
) -> Result<(String, Assignment), WorkerError> {
    let refused = |call: &'static str| {
        move |status: tonic::Status| WorkerError::Refused {
            call,
            message: status.message().to_string(),
        }
    };
    let registered = client
        .register(RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            host: options.host.clone(),
            device: "cpu".into(),
            collective_address: collective_address.to_string(),
            preferred_rank: options.preferred_rank,
        })
        .await
        .map_err(refused("registration"))?
        .into_inner();
    let collective = registered.collective();
    let id = registered.worker_id;
    let nccl_unique_id = match collective {
        CollectiveKind::Tcp => Vec::new(),
        CollectiveKind::Nccl => match nccl_unique_id() {
            Ok(nccl_unique_id) => nccl_unique_id,
            Err(error) => {
                // Said to the coordinator too, so the job fails with the cause, not a lost worker.
                let finish = FinishRequest {
                    worker_id: id,
                    step: 0,
                    ok: false,
                    message: error.to_string(),
                };
                let _ = client.finish(finish).await;
                return Err(error);
            }
        },
    };
    let assignment = client
        .rendezvous(RendezvousRequest {
            worker_id: id.clone(),
            nccl_unique_id,
        })
        .await
        .map_err(refused("rendezvous"))?
        .into_inner();
    Ok((id, assignment))
}

/// A new NCCL unique id, as bytes.
#[cfg(feature = "cuda")]
fn nccl_unique_id() -> Result<Vec<u8>, WorkerError> {
    collective::nccl::NcclCollective::unique_id().map_err(|e| WorkerError::Setup(e.to_string()))
}

#[cfg(not(feature = "cuda"))]
fn nccl_unique_id() -> Result<Vec<u8>, WorkerError> {
    Err(WorkerError::Setup(super::NCCL_WITHOUT_CUDA.into()))
}

pub(super) fn spawn_heartbeat(
    runtime: tokio::runtime::Handle,
    mut client: Client,
    id: String,
    every: Duration,
    progress: Arc<Mutex<Progress>>,
    signals: Arc<Signals>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut failures = 0;
        loop {
            match send_heartbeat(&runtime, &mut client, &id, &progress) {
                Ok(Command::Stop) => signals.stop.store(true, Ordering::SeqCst),
                Ok(Command::Continue) => failures = 0,
                Err(message) => {
                    failures += 1;
                    if failures >= 5 {
                        *signals.coordinator_lost.lock().expect("lost") = Some(message);
                        signals.stop.store(true, Ordering::SeqCst);
                    }
                }
            }
            let wake = Instant::now() + every;
            while Instant::now() < wake {
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
