//! coca's control plane, burn-free: where a job starts (`plan`), the job
//! as the coordinator sees it with its decisions as pure functions of the
//! time ([`job`]), the state the servers share ([`Shared`]), the gRPC
//! service workers call (`service`), the journal a restarted coordinator
//! reads ([`journal`]), the status endpoint ([`status`]) and worker
//! processes on this machine for `coca launch` ([`local_workers`]).

mod bounds;
pub mod job;
pub mod journal;
pub mod local_workers;
mod plan;
mod service;
mod shared;
pub mod status;
mod tensorboard;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use checkpoint::Resume;
use contract::manifest::Manifest;
use contract::status::JobState;
use proto::auth::{Guard, Token};
use proto::coordinator_server::CoordinatorServer;
use tokio::sync::watch;

use job::{Job, RecoveryPolicy};
use journal::{Event, Journal};
pub use plan::IndexError;
use plan::JobStart;
pub use shared::Shared;
use store::Store;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("data.source[{index}] ({url})")]
    Dataset {
        index: usize,
        url: String,
        source: plan::IndexError,
    },
    #[error(transparent)]
    Plan(#[from] contract::plan::PlanError),
    #[error("{field} ({url})")]
    Eval {
        field: &'static str,
        url: String,
        source: plan::IndexError,
    },
    // The cause follows as the error's source (the CLI prints the chain).
    #[error("cannot listen on {address} ({what})")]
    Bind {
        address: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{field} ({path}): {message}")]
    Tls {
        field: &'static str,
        path: String,
        message: String,
    },
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error("logging.tensorboard ({url})")]
    TensorBoard { url: String, source: store::StoreError },
    #[error("resume")]
    Checkpoint(#[from] checkpoint::CheckpointError),
    /// Not a failure: the checkpoint is the job's last step.
    #[error(
        "the job is complete: its newest checkpoint, {url}, is step {step} of {total}. Raise job.steps \
         (or --steps) to train further, or give it another checkpoint.url to start over"
    )]
    Complete { url: String, step: u64, total: u64 },
}

/// Every step's metrics, one JSON object per line, in the job's directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// A running coordinator: the gRPC service, the status endpoint, the watchdog.
pub struct Coordinator {
    pub shared: Arc<Shared>,
    grpc: SocketAddr,
    status: SocketAddr,
    status_scheme: &'static str,
    /// Ends the gRPC server once the job is over, after in-flight replies.
    grpc_shutdown: Mutex<Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>)>>,
}

impl Coordinator {
    /// Reads and pins the datasets' indexes, opens the journal, binds both
    /// listeners and starts serving. Must run inside a tokio runtime.
    pub async fn start(manifest: Manifest, token: Token, resume: Resume) -> Result<Self, CoordinatorError> {
        let reading = manifest.clone();
        let start = tokio::task::spawn_blocking(move || JobStart::read(&reading, &resume))
            .await
            .expect("planning the job does not panic")?;
        if let Some(chosen) = &start.chosen {
            for skipped in &chosen.skipped {
                tracing::info!("skipping {skipped}");
            }
            tracing::info!(
                "resuming from {} (step {}, saved by {} workers)",
                chosen.url,
                chosen.step,
                chosen.meta.world_size
            );
        }
        let (journal, recovered) = Journal::open(Path::new(&manifest.job.dir))?;
        if recovered.events > 0 {
            tracing::info!(
                "the journal in {} says the job was {} at step {}",
                manifest.job.dir,
                recovered.state.as_deref().unwrap_or("started"),
                recovered.step
            );
        }
        let previous = (recovered.events > 0).then_some(recovered);
        let mut job = Job::new(
            &manifest.job.name,
            start.plan.total_steps,
            RecoveryPolicy::of(&manifest),
            previous,
        );
        if let Some(chosen) = start.chosen {
            job.start_step = chosen.step;
            job.checkpoint.resumed_from = Some(chosen.url.clone());
            job.newest_commit = Some((chosen.step, chosen.url));
        }
        let restarted = job
            .coordinator_restarted(std::time::Instant::now())
            .map(|restart| (restart, job.start_step));
        let pem = manifest.auth.tls.as_ref().map(TlsPem::read).transpose()?;
        let identity = pem.as_ref().map(TlsPem::identity);
        // The status endpoint speaks TLS where it is reached from beyond this machine.
        let status_tls = match (&pem, &manifest.auth.tls) {
            (Some(pem), Some(tls)) if !manifest.status.bind.ip().is_loopback() => Some(pem.acceptor(tls)?),
            _ => None,
        };
        let status_scheme = if status_tls.is_some() { "https" } else { "http" };
        let grpc_listener = bind(manifest.cluster.coordinator, "cluster.coordinator").await?;
        let status_listener = bind(manifest.status.bind, "status.bind").await?;
        let grpc = grpc_listener.local_addr().expect("a bound listener has an address");
        let status = status_listener.local_addr().expect("a bound listener has an address");
        let metrics_log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(Path::new(&manifest.job.dir).join(METRICS_FILE))
            .map_err(|e| tracing::warn!("no {METRICS_FILE} in {}: {e}", manifest.job.dir))
            .ok();
        // The event file is written once now, so a store that refuses it
        // fails the job before it trains.
        let tensorboard = match &manifest.logging.tensorboard {
            Some(url) => {
                let failed = |source| CoordinatorError::TensorBoard {
                    url: url.clone(),
                    source,
                };
                let store = Store::open(url, &plan::store_options(&start.plan.store)).map_err(failed)?;
                let mut log = tensorboard::EventLog::new(store, job.start_step, job::unix_now());
                let (log, flushed) = tokio::task::spawn_blocking(move || {
                    let flushed = log.flush();
                    (log, flushed)
                })
                .await
                .expect("the first TensorBoard flush does not panic");
                flushed.map_err(failed)?;
                tracing::info!("TensorBoard events: {}", log.url());
                Some(log)
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            job: Mutex::new(job),
            tensorboard: Mutex::new(tensorboard),
            manifest,
            plan_json: start.plan.to_json(),
            plan: start.plan,
            journal: Mutex::new(journal),
            metrics_log: Mutex::new(metrics_log),
            ready: watch::channel(false).0,
            guard: Guard::new(token),
        });
        shared.journal(Event::State {
            state: JobState::Pending.name().into(),
            at: job::unix_now(),
            reason: None,
        });
        if let Some((restart, from)) = restarted {
            tracing::warn!("{}: the job goes on from step {from}", restart.cause);
            shared.journal(Event::Restart(restart));
        }
        let grpc_shutdown = serve_grpc(&shared, grpc_listener, identity)?;
        serve_status(&shared, status_listener, status_tls);
        spawn_watchdog(&shared);
        tracing::info!(
            "job {} on {grpc} (gRPC), status on {status_scheme}://{status}/",
            shared.manifest.job.name
        );
        Ok(Self {
            shared,
            grpc,
            status,
            status_scheme,
            grpc_shutdown: Mutex::new(Some(grpc_shutdown)),
        })
    }

    /// Stops the job after the current step on Ctrl-C, and on SIGTERM (what
    /// Slurm's scancel and Kubernetes' pod deletion send). Needs the tokio runtime.
    pub fn stop_on_signals(&self) {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!("Ctrl-C: stopping after the current step");
                shared.request_stop("interrupted (Ctrl-C)");
            }
        });
        let shared = self.shared.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            if let Ok(mut terminate) = signal(SignalKind::terminate()) {
                if terminate.recv().await.is_some() {
                    tracing::info!("SIGTERM: stopping after the current step");
                    shared.request_stop("terminated (SIGTERM)");
                }
            }
        });
    }

    pub fn grpc_address(&self) -> SocketAddr {
        self.grpc
    }

    pub fn status_address(&self) -> SocketAddr {
        self.status
    }

    /// `http://` or (TLS beyond loopback) `https://`, the address, `/`.
    pub fn status_url(&self) -> String {
        format!("{}://{}/", self.status_scheme, self.status)
    }

    /// Waits until the job has ended and every worker has said goodbye (or
    /// `grace` has passed since it ended); returns the final state.
    pub async fn finished(&self, grace: Duration) -> JobState {
        let mut ready = self.shared.ready.subscribe();
        loop {
            let state = self.shared.job.lock().expect("job state").state;
            if state.is_terminal() {
                let deadline = tokio::time::Instant::now() + grace;
                loop {
                    // Lost workers will never say goodbye.
                    let timeout = Duration::from_millis(self.shared.manifest.cluster.heartbeat_timeout_ms);
                    let all_done = self
                        .shared
                        .job
                        .lock()
                        .expect("job state")
                        .workers
                        .values()
                        .all(|w| w.finished.is_some() || w.last_heartbeat.elapsed() > timeout);
                    if all_done || tokio::time::Instant::now() >= deadline {
                        self.stop_grpc().await;
                        let shared = self.shared.clone();
                        let _ = tokio::task::spawn_blocking(move || shared.flush_tensorboard()).await;
                        return state;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), ready.changed()).await;
        }
    }
}

impl Coordinator {
    /// Lets the last replies (the workers' Finish) reach their workers
    /// before the process exits; a worker that keeps its connection open
    /// does not hold the exit up for more than two seconds.
    async fn stop_grpc(&self) {
        let shutdown = self.grpc_shutdown.lock().expect("grpc shutdown").take();
        if let Some((stop, serving)) = shutdown {
            let _ = stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(2), serving).await;
        }
    }
}

async fn bind(address: SocketAddr, what: &'static str) -> Result<tokio::net::TcpListener, CoordinatorError> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| CoordinatorError::Bind { address, what, source })
}

/// A server task that ends with an error fails the job: a dead listener is
/// noticed, not left behind a coordinator that looks alive.
fn supervise(shared: Arc<Shared>, what: &'static str, outcome: Result<(), String>) {
    if let Err(error) = outcome {
        tracing::error!("the {what} stopped: {error}");
        if !shared.job.lock().expect("job state").state.is_terminal() {
            shared.transition(JobState::Failed, Some(format!("the {what} stopped: {error}")));
        }
    }
}

/// Serves the workers' gRPC calls until the returned sender says stop.
fn serve_grpc(
    shared: &Arc<Shared>,
    listener: tokio::net::TcpListener,
    identity: Option<tonic::transport::Identity>,
) -> Result<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>), CoordinatorError> {
    let service = service::Service { shared: shared.clone() };
    let guard = shared.guard.clone();
    let interceptor = move |request| guard.check(request);
    let (stop, stop_serving) = tokio::sync::oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder();
    if let Some(identity) = identity {
        let tls = tonic::transport::ServerTlsConfig::new().identity(identity);
        builder = builder.tls_config(tls).map_err(|error| CoordinatorError::Tls {
            field: "auth.tls_cert",
            path: shared
                .manifest
                .auth
                .tls
                .as_ref()
                .map_or_else(String::new, |tls| tls.cert.clone()),
            message: store::error_chain(&error),
        })?;
    }
    let server = builder
        .add_service(CoordinatorServer::with_interceptor(service, interceptor))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async move {
            let _ = stop_serving.await;
        });
    let shared = shared.clone();
    let serving = tokio::spawn(async move {
        let outcome = server.await.map_err(|e| e.to_string());
        supervise(shared, "gRPC server", outcome);
    });
    Ok((stop, serving))
}

/// The coordinator's certificate and key as PEM, read once for the gRPC
/// server and the status endpoint.
struct TlsPem {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl TlsPem {
    fn read(tls: &contract::manifest::Tls) -> Result<Self, CoordinatorError> {
        let read = |field: &'static str, path: &str, marker: &str, what: &str| {
            let failed = |message: String| CoordinatorError::Tls {
                field,
                path: path.to_string(),
                message,
            };
            let pem = std::fs::read(path).map_err(|error| failed(error.to_string()))?;
            if !String::from_utf8_lossy(&pem).contains(marker) {
                return Err(failed(format!("no PEM {what} in it")));
            }
            Ok(pem)
        };
        Ok(Self {
            cert: read("auth.tls_cert", &tls.cert, "-----BEGIN CERTIFICATE-----", "certificate")?,
            key: read("auth.tls_key", &tls.key, "PRIVATE KEY-----", "private key")?,
        })
    }

    fn identity(&self) -> tonic::transport::Identity {
        tonic::transport::Identity::from_pem(&self.cert, &self.key)
    }

    /// The status endpoint's TLS; `tls` names the files in errors.
    fn acceptor(&self, tls: &contract::manifest::Tls) -> Result<tokio_rustls::TlsAcceptor, CoordinatorError> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let failed = |field: &'static str, path: &str, message: String| CoordinatorError::Tls {
            field,
            path: path.to_string(),
            message,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<_, _>>()
            .map_err(|e| failed("auth.tls_cert", &tls.cert, e.to_string()))?;
        let key =
            PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| failed("auth.tls_key", &tls.key, e.to_string()))?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|builder| builder.with_no_client_auth().with_single_cert(certs, key))
            .map_err(|e| failed("auth.tls_cert", &tls.cert, e.to_string()))?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

/// Serves /status, /metrics and the page for as long as the process lives.
fn serve_status(shared: &Arc<Shared>, listener: tokio::net::TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) {
    let app = status::router(shared.clone());
    let shared = shared.clone();
    tokio::spawn(async move {
        let outcome = match tls {
            Some(acceptor) => serve_tls(listener, app, acceptor).await,
            None => axum::serve(listener, app).await.map_err(|e| e.to_string()),
        };
        supervise(shared, "status server", outcome);
    });
}

/// Serves `app` over TLS: each connection's handshake, then HTTP/1.1.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    acceptor: tokio_rustls::TlsAcceptor,
) -> Result<(), String> {
    loop {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            // A client that fails the handshake (plain HTTP, another CA) is only refused.
            let Ok(stream) = acceptor.accept(tcp).await else { return };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Checks the heartbeats every half heartbeat until the job has ended.
fn spawn_watchdog(shared: &Arc<Shared>) {
    let watchdog = shared.clone();
    let tick = Duration::from_millis(watchdog.manifest.cluster.heartbeat_ms.max(50) / 2);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(tick).await;
            watchdog.check_heartbeats();
            if watchdog.job.lock().expect("job state").state.is_terminal() {
                return;
            }
        }
    });
}
