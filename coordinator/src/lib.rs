//! coca's control plane: the job state machine, rendezvous, heartbeats,
//! the journal and the status endpoint. Never links the tensor library.

pub mod job;
pub mod journal;
pub mod local_workers;
mod service;
pub mod status;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use contract::dataset::{DatasetIndex, DatasetKind, INDEX_FILE};
use contract::manifest::Manifest;
use contract::rpc::coordinator_server::CoordinatorServer;
use contract::sample_order::SampleOrder;
use store::{Store, StoreOptions};
use tokio::sync::watch;

use checkpoint::layout::ResumeFields;
pub use checkpoint::Resume;
use contract::auth::{Guard, Token};
use contract::status::JobState;
use job::Job;
use journal::{Event, Journal};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("data.source[{index}] ({url}): {message}")]
    Dataset { index: usize, url: String, message: String },
    #[error("{field} ({url}): {message}")]
    Eval {
        field: &'static str,
        url: String,
        message: String,
    },
    #[error("cannot listen on {address} ({what}): {source}")]
    Bind {
        address: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error("resume: {0}")]
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

/// State shared by the gRPC service, the status endpoint and the watchdog.
pub struct Shared {
    pub job: Mutex<Job>,
    pub manifest: Manifest,
    /// The pinned dataset indexes (JSON), one per source.
    pub indexes: Vec<String>,
    journal: Mutex<Journal>,
    /// `<job.dir>/metrics.jsonl`: every step's metrics, appended across resumes.
    metrics_log: Mutex<Option<std::fs::File>>,
    /// Bumped when ranks are assigned and when the job ends.
    ready: watch::Sender<bool>,
    guard: Guard,
}

impl Shared {
    /// Moves the job to `state`, logs and journals it.
    pub fn transition(&self, state: JobState, reason: Option<String>) {
        let moved = self.job.lock().expect("job state").transition(state, reason.clone());
        if moved {
            match &reason {
                Some(reason) => eprintln!("coordinator: job {} ({reason})", state.name()),
                None => eprintln!("coordinator: job {}", state.name()),
            }
            self.journal(Event::State {
                state: state.name().to_string(),
                at: job::unix_now(),
                reason,
            });
            if state.is_terminal() {
                let _ = self.ready.send(true);
            }
        }
    }

    /// Appends rank 0's step metrics (the job's) to metrics.jsonl.
    fn log_metrics(&self, metrics: &[contract::rpc::StepMetrics]) {
        use std::io::Write;
        let mut log = self.metrics_log.lock().expect("metrics log");
        let Some(file) = log.as_mut() else { return };
        let mut lines = String::new();
        for m in metrics {
            let mut line = serde_json::json!({
                "step": m.step,
                "loss": m.loss,
                "contrastive": m.contrastive,
                "captioning": m.captioning,
                "learning_rate": m.learning_rate,
                "logit_scale": m.logit_scale,
                "samples_per_second": m.samples_per_second,
                "data_wait_share": m.data_wait_share,
            });
            if !m.evals.is_empty() {
                line["evals"] = m
                    .evals
                    .iter()
                    .map(|e| (e.name.clone(), serde_json::json!(e.value)))
                    .collect();
            }
            lines.push_str(&format!("{line}\n"));
        }
        if let Err(error) = file.write_all(lines.as_bytes()) {
            eprintln!("coordinator: cannot append to {METRICS_FILE}: {error}");
            *log = None;
        }
    }

    fn journal(&self, event: Event) {
        if let Err(error) = self.journal.lock().expect("journal").append(&event) {
            eprintln!("coordinator: {error}");
        }
    }

    /// Ranks by (host, collective address): the same world gets the same ranks.
    fn assign_ranks(&self) {
        let mut job = self.job.lock().expect("job state");
        let world = job.world_size;
        // The engine's indexes when they name every rank once (log files
        // then match ranks); otherwise a stable order by host and address.
        let mut preferred: Vec<usize> = job.workers.values().filter_map(|w| w.preferred_rank).collect();
        preferred.sort_unstable();
        let use_preferred = preferred.len() == world && preferred.iter().copied().eq(0..world);
        let mut order: Vec<(String, String, String)> = job
            .workers
            .values()
            .map(|w| (w.host.clone(), w.collective_address.clone(), w.id.clone()))
            .collect();
        order.sort();
        for (fallback_rank, (_, _, id)) in order.into_iter().enumerate() {
            if let Some(worker) = job.workers.get_mut(&id) {
                worker.rank = Some(match (use_preferred, worker.preferred_rank) {
                    (true, Some(rank)) => rank,
                    _ => fallback_rank,
                });
                worker.last_heartbeat = std::time::Instant::now();
            }
        }
        let world = job.world_size;
        drop(job);
        self.transition(JobState::Running, Some(format!("{world} workers, ranks assigned")));
        let _ = self.ready.send(true);
    }

    /// Asks the workers to stop after their current step.
    pub fn request_stop(&self, reason: &str) {
        let state = self.job.lock().expect("job state").state;
        match state {
            JobState::Running | JobState::Rendezvous => self.transition(JobState::Stopping, Some(reason.to_string())),
            JobState::Pending => self.transition(JobState::Stopped, Some(reason.to_string())),
            _ => {}
        }
    }

    pub fn refused_calls(&self) -> u64 {
        self.guard.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Declares workers silent for longer than the timeout lost.
    fn check_heartbeats(&self, timeout: Duration) {
        let job = self.job.lock().expect("job state");
        if !matches!(job.state, JobState::Running | JobState::Stopping) {
            return;
        }
        let lost = job
            .workers
            .values()
            .find(|w| w.finished.is_none() && w.last_heartbeat.elapsed() > timeout)
            .map(|w| {
                format!(
                    "worker {} (rank {}, {}) lost: no heartbeat for {:.1} s (timeout {:.1} s), last at step {}",
                    w.id,
                    w.rank.map_or("-".into(), |r| r.to_string()),
                    w.host,
                    w.last_heartbeat.elapsed().as_secs_f64(),
                    timeout.as_secs_f64(),
                    w.step
                )
            });
        let pending = job.pending_failure.clone();
        drop(job);
        if let Some(reason) = lost {
            let reason = match pending {
                Some((failure, _)) => format!("{reason}; then {failure}"),
                None => reason,
            };
            self.transition(JobState::Failed, Some(reason));
        } else if let Some((failure, since)) = pending {
            // No silent peer within the timeout: the reported failure is the cause.
            if since.elapsed() > timeout {
                self.transition(JobState::Failed, Some(failure));
            }
        }
    }
}

/// A running coordinator: the gRPC service, the status endpoint, the watchdog.
pub struct Coordinator {
    pub shared: Arc<Shared>,
    grpc: SocketAddr,
    status: SocketAddr,
    /// Ends the gRPC server once the job is over, after in-flight replies.
    grpc_shutdown: Mutex<Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>)>>,
}

impl Coordinator {
    /// Reads and pins the datasets' indexes, opens the journal, binds both
    /// listeners and starts serving. Must run inside a tokio runtime.
    pub async fn start(manifest: Manifest, token: Token, resume: Resume) -> Result<Self, CoordinatorError> {
        let reading = manifest.clone();
        let indexes = tokio::task::spawn_blocking(move || read_indexes(&reading))
            .await
            .expect("index reading does not panic")?;
        let parsed: Vec<DatasetIndex> = indexes
            .iter()
            .map(|json| DatasetIndex::parse(json, "pinned index").expect("validated when read"))
            .collect();
        let order = SampleOrder::for_job(&manifest, &parsed).expect("the manifest's mix was validated");
        let total_steps = manifest.total_steps(parsed[0].rows(), order.counts_per_batch()[0]);
        let choosing = manifest.clone();
        let chosen = tokio::task::spawn_blocking(move || choose_start(&choosing, &parsed, &resume))
            .await
            .expect("choosing a checkpoint does not panic")?;
        if let Some(chosen) = &chosen {
            for skipped in &chosen.skipped {
                eprintln!("coordinator: skipping {skipped}");
            }
            if chosen.step >= total_steps {
                return Err(CoordinatorError::Complete {
                    url: chosen.url.clone(),
                    step: chosen.step,
                    total: total_steps,
                });
            }
            eprintln!(
                "coordinator: resuming from {} (step {}, saved by {} workers)",
                chosen.url, chosen.step, chosen.meta.world_size
            );
        }

        let (journal, recovered) = Journal::open(Path::new(&manifest.job.dir))?;
        if recovered.events > 0 {
            eprintln!(
                "coordinator: the journal in {} says the job was {} at step {}",
                manifest.job.dir,
                recovered.state.as_deref().unwrap_or("started"),
                recovered.step
            );
        }
        let mut job = Job::new(&manifest.job.name, manifest.cluster.workers, total_steps);
        if let Some(chosen) = chosen {
            job.start_step = chosen.step;
            job.checkpoint.resumed_from = Some(chosen.url);
        }
        job.previous = (recovered.events > 0).then_some(recovered);

        let grpc_listener = bind(manifest.cluster.coordinator, "cluster.coordinator").await?;
        let status_listener = bind(manifest.status.bind, "status.bind").await?;
        let grpc = grpc_listener.local_addr().expect("a bound listener has an address");
        let status = status_listener.local_addr().expect("a bound listener has an address");

        let metrics_log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(Path::new(&manifest.job.dir).join(METRICS_FILE))
            .map_err(|e| eprintln!("coordinator: no {METRICS_FILE} in {}: {e}", manifest.job.dir))
            .ok();
        let guard = Guard::new(token);
        let shared = Arc::new(Shared {
            job: Mutex::new(job),
            manifest,
            indexes,
            journal: Mutex::new(journal),
            metrics_log: Mutex::new(metrics_log),
            ready: watch::channel(false).0,
            guard: guard.clone(),
        });
        shared.journal(Event::State {
            state: "pending".into(),
            at: job::unix_now(),
            reason: None,
        });

        let service = service::Service { shared: shared.clone() };
        let interceptor = move |request| guard.check(request);
        let (stop, stop_serving) = tokio::sync::oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .add_service(CoordinatorServer::with_interceptor(service, interceptor))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
                async move {
                    let _ = stop_serving.await;
                },
            );
        let serving = tokio::spawn(async move {
            if let Err(error) = server.await {
                eprintln!("coordinator: the gRPC server stopped: {error}");
            }
        });
        let app = status::router(shared.clone());
        tokio::spawn(async move {
            if let Err(error) = axum::serve(status_listener, app).await {
                eprintln!("coordinator: the status server stopped: {error}");
            }
        });
        let watchdog = shared.clone();
        let timeout = Duration::from_millis(watchdog.manifest.cluster.heartbeat_timeout_ms);
        let tick = Duration::from_millis(watchdog.manifest.cluster.heartbeat_ms.max(50) / 2);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(tick).await;
                watchdog.check_heartbeats(timeout);
                if watchdog.job.lock().expect("job state").state.is_terminal() {
                    return;
                }
            }
        });
        eprintln!(
            "coordinator: job {} on {grpc} (gRPC), status on http://{status}/",
            shared.manifest.job.name
        );
        Ok(Self {
            shared,
            grpc,
            status,
            grpc_shutdown: Mutex::new(Some((stop, serving))),
        })
    }

    /// Stops the job after the current step on Ctrl-C, and on SIGTERM (what
    /// Slurm's scancel and Kubernetes' pod deletion send). Needs the tokio runtime.
    pub fn stop_on_signals(&self) {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("coordinator: Ctrl-C: stopping after the current step");
                shared.request_stop("interrupted (Ctrl-C)");
            }
        });
        let shared = self.shared.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            if let Ok(mut terminate) = signal(SignalKind::terminate()) {
                if terminate.recv().await.is_some() {
                    eprintln!("coordinator: SIGTERM: stopping after the current step");
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

/// Every source's index, read once and checked against the manifest.
/// The checkpoint the job starts from, after checking that the manifest
/// and the tokenizer still match what wrote it.
fn choose_start(
    manifest: &Manifest,
    indexes: &[DatasetIndex],
    resume: &Resume,
) -> Result<Option<checkpoint::Chosen>, CoordinatorError> {
    let options = manifest.data.store_options();
    let root = match (&manifest.checkpoint, resume) {
        (Some(checkpoint), _) => Store::open(&checkpoint.url, &options).map_err(checkpoint::CheckpointError::from)?,
        // --from reads a step wherever it is; without a location there is nothing else to resume.
        (None, Resume::From(url)) => Store::open(url, &options).map_err(checkpoint::CheckpointError::from)?,
        (None, _) => return Ok(None),
    };
    let fields = ResumeFields::of(manifest, indexes);
    let Some(chosen) = checkpoint::choose(&root, &options, resume, &fields)? else {
        return Ok(None);
    };
    let (store, name) =
        Store::open_object(&manifest.data.tokenizer, &options).map_err(checkpoint::CheckpointError::from)?;
    let tokenizer = store::sha256_hex(&store.get(&name).map_err(checkpoint::CheckpointError::from)?);
    if tokenizer != chosen.meta.tokenizer_sha256 {
        return Err(checkpoint::CheckpointError::Changed {
            url: chosen.url,
            field: "data.tokenizer".into(),
            was: format!("a tokenizer with SHA-256 {}", chosen.meta.tokenizer_sha256),
            is: format!("{} with SHA-256 {tokenizer}", manifest.data.tokenizer),
        }
        .into());
    }
    Ok(Some(chosen))
}

fn read_indexes(manifest: &Manifest) -> Result<Vec<String>, CoordinatorError> {
    let options = manifest.data.store_options();
    let mut indexes = Vec::new();
    for (index, source) in manifest.data.sources.iter().enumerate() {
        let failed = |message: String| CoordinatorError::Dataset {
            index,
            url: source.url.clone(),
            message,
        };
        let (json, parsed) = read_index(&source.url, &options).map_err(failed)?;
        if parsed.kind != source.kind {
            return Err(failed(format!(
                "the dataset is {}, but the manifest says kind = \"{}\"",
                parsed.kind, source.kind
            )));
        }
        indexes.push(json);
    }
    // The [eval] datasets: rank 0 reads them mid-job, so check them now.
    let evals = manifest.eval.iter().flat_map(|eval| {
        [
            ("eval.zeroshot", eval.zeroshot.as_deref(), DatasetKind::Jft),
            ("eval.retrieval", eval.retrieval.as_deref(), DatasetKind::Align),
        ]
    });
    for (field, url, kind) in evals {
        let Some(url) = url else { continue };
        let failed = |message: String| CoordinatorError::Eval {
            field,
            url: url.to_string(),
            message,
        };
        let (_, parsed) = read_index(url, &options).map_err(failed)?;
        if parsed.kind != kind {
            return Err(failed(format!(
                "the dataset is {}; {field} needs a {kind} dataset",
                parsed.kind
            )));
        }
    }
    Ok(indexes)
}

/// A dataset's index.json: its text (to pin) and what it says.
fn read_index(url: &str, options: &StoreOptions) -> Result<(String, DatasetIndex), String> {
    let store = Store::open(url, options).map_err(|e| e.to_string())?;
    let bytes = store.get(INDEX_FILE).map_err(|e| match e {
        store::StoreError::NotFound { .. } => format!("no dataset here (no {INDEX_FILE})"),
        other => other.to_string(),
    })?;
    let json = String::from_utf8(bytes.to_vec()).map_err(|_| format!("{INDEX_FILE} is not UTF-8"))?;
    let parsed = DatasetIndex::parse(&json, &store.object_url(INDEX_FILE)).map_err(|e| e.to_string())?;
    Ok((json, parsed))
}
