//! The status endpoint: GET /status (JSON), /metrics (Prometheus text),
//! / (a self-contained HTML page with live charts), /healthz. Read-only.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Json};
use axum::routing::get;
use axum::Router;
use contract::status::{BadRecords, JobState, Losses, Phase, RankTraffic, SourceProgress, StatusReport, WorkerReport};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::Shared;

const PAGE: &str = include_str!("status.html");

pub fn report(shared: &Shared) -> StatusReport {
    let job = shared.job.lock().expect("job state");
    let latest = job.latest.as_ref();
    StatusReport {
        job: job.name.clone(),
        state: job.state,
        reason: job.reason().map(str::to_string),
        transitions: job.transitions.clone(),
        step: job.step(),
        total_steps: job.total_steps,
        loss: latest.map(|m| Losses {
            total: m.loss,
            contrastive: m.contrastive,
            captioning: m.captioning,
        }),
        learning_rate: latest.map(|m| m.learning_rate),
        logit_scale: latest.map(|m| m.logit_scale),
        samples_per_second: latest.map(|m| m.samples_per_second),
        data_wait_share: latest.map(|m| m.data_wait_share),
        gradient_norm: latest.map(|m| m.gradient_norm),
        grad_clip_norm: shared.plan.train.grad_clip_norm,
        accumulation: shared.plan.train.accumulation,
        shard_optimizer: shared.plan.train.shard_optimizer,
        activation_checkpointing: shared.plan.train.activation_checkpointing,
        source_epochs: latest.map(|m| m.source_epochs.clone()).unwrap_or_default(),
        sources: source_progress(&job),
        bad_records: job
            .bad_record_totals()
            .into_iter()
            .map(|((source, reason), count)| BadRecords { source, reason, count })
            .collect(),
        workers: job
            .workers
            .values()
            .map(|w| WorkerReport {
                id: w.id.clone(),
                rank: w.rank,
                host: w.host.clone(),
                device: w.device.clone(),
                step: w.step,
                phase: w.phase,
                last_heartbeat_seconds_ago: w.last_heartbeat.elapsed().as_secs_f64(),
                finished: w.finished.as_ref().map(|(ok, _)| *ok),
                message: w
                    .finished
                    .as_ref()
                    .map(|(_, message)| message.clone())
                    .filter(|m| !m.is_empty()),
            })
            .collect(),
        generation: job.generation,
        world_size: job.world_size,
        restarts: job.restarts.clone(),
        restarts_left: job.restarts_left(),
        checkpoint: job.checkpoint.clone(),
        eta_seconds: job.eta_seconds(),
        uptime_seconds: job.uptime().as_secs_f64(),
        refused_calls: shared.refused_calls(),
        previous: job.previous.clone(),
        history: job.history.clone(),
        evals: job.evals.clone(),
    }
}

/// Each source's samples and epochs (rank 0's latest step) and fetches.
fn source_progress(job: &crate::job::Job) -> Vec<SourceProgress> {
    let latest = job.latest.as_ref();
    let traffic = job.traffic_by_source();
    let count = latest.map_or(0, |m| m.source_samples.len()).max(traffic.len());
    (0..count as u32)
        .map(|source| {
            let (shards, bytes, ranks) = traffic.get(&source).cloned().unwrap_or_default();
            SourceProgress {
                source,
                samples: latest
                    .and_then(|m| m.source_samples.get(source as usize).copied())
                    .unwrap_or(0),
                epochs: latest
                    .and_then(|m| m.source_epochs.get(source as usize).copied())
                    .unwrap_or(0.0),
                shards_fetched: shards,
                bytes_fetched: bytes,
                ranks: ranks
                    .into_iter()
                    .map(|(rank, (shards, bytes))| RankTraffic { rank, shards, bytes })
                    .collect(),
            }
        })
        .collect()
}

pub fn router(shared: Arc<Shared>) -> Router {
    let reads = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route(
            "/status",
            get(|State(shared): State<Arc<Shared>>| async move { Json(report(&shared)) }),
        )
        .route("/metrics", get(metrics));
    // Beyond loopback, what a job says is for those holding its token
    // (`Authorization: Bearer`, or `?token=` from a browser), unless public.
    let reads = match shared.manifest.status.needs_token() {
        true => reads.layer(axum::middleware::from_fn_with_state(shared.clone(), token_required)),
        false => reads,
    };
    reads.route("/healthz", get(|| async { "ok\n" })).with_state(shared)
}

async fn token_required(
    State(shared): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let query = request
        .uri()
        .query()
        .and_then(|query| query.split('&').find_map(|pair| pair.strip_prefix("token=")));
    match shared.guard.accepts(bearer.or(query)) {
        Ok(()) => next.run(request).await,
        Err(why) => (
            axum::http::StatusCode::UNAUTHORIZED,
            format!(
                "{why}: status.bind = {} is beyond loopback, so reads present the job token \
                 (Authorization: Bearer, or ?token= in a browser), unless status.public = true\n",
                shared.manifest.status.bind
            ),
        )
            .into_response(),
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let status = report(&shared);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        prometheus_text(&status),
    )
}

/// The report in Prometheus' text format, names in its style.
pub fn prometheus_text(status: &StatusReport) -> String {
    let mut registry = Registry::with_prefix("coca");
    for (name, help, value) in scalars(status) {
        if let Some(value) = value {
            let metric = Gauge::<f64, AtomicU64>::default();
            metric.set(value);
            registry.register(name, help, metric);
        }
    }
    let label =
        |pairs: &[(&str, String)]| -> Labels { pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect() };
    if let Some(loss) = &status.loss {
        let kinds = [
            ("total", loss.total),
            ("contrastive", loss.contrastive),
            ("captioning", loss.captioning),
        ];
        let points = kinds.map(|(kind, value)| (label(&[("kind", kind.into())]), value));
        family(&mut registry, "train_loss", "Loss of the latest step, by kind", points);
    }
    if let Some(latest) = status.evals.last() {
        let points = latest
            .values
            .iter()
            .map(|(metric, value)| (label(&[("metric", metric.clone())]), *value));
        family(&mut registry, "eval", "The latest [eval] results, by metric", points);
    }
    let points = status.bad_records.iter().map(|record| {
        let labels = label(&[("source", record.source.to_string()), ("reason", record.reason.clone())]);
        (labels, record.count as f64)
    });
    family(
        &mut registry,
        "data_bad_records",
        "Bad records met, by source and reason",
        points,
    );
    let per_source = |value: fn(&SourceProgress) -> f64| {
        let label = label;
        status
            .sources
            .iter()
            .map(move |source| (label(&[("source", source.source.to_string())]), value(source)))
    };
    family(
        &mut registry,
        "data_samples",
        "Samples drawn, by source",
        per_source(|s| s.samples as f64),
    );
    family(
        &mut registry,
        "data_fetched_shards",
        "Shards fetched by every worker, by source",
        per_source(|s| s.shards_fetched as f64),
    );
    family(
        &mut registry,
        "data_fetched_bytes",
        "Bytes fetched by every worker, by source",
        per_source(|s| s.bytes_fetched as f64),
    );
    let points = status.sources.iter().flat_map(|source| {
        source.ranks.iter().map(move |rank| {
            let labels = label(&[("source", source.source.to_string()), ("rank", rank.rank.to_string())]);
            (labels, rank.bytes as f64)
        })
    });
    family(
        &mut registry,
        "data_rank_fetched_bytes",
        "Bytes each rank of the current ring fetched since it formed, by source",
        points,
    );
    let points = status.workers.iter().map(|worker| {
        (
            label(&[("worker", worker.id.clone())]),
            worker.last_heartbeat_seconds_ago,
        )
    });
    family(
        &mut registry,
        "worker_heartbeat_age_seconds",
        "Seconds since each worker's last heartbeat",
        points,
    );
    // Seconds from a loss to the new ring's first step, one observation per recovery.
    let training_again = Histogram::new(TRAINING_AGAIN_BUCKETS);
    for seconds in status.restarts.iter().filter_map(|r| r.training_after_seconds) {
        training_again.observe(seconds);
    }
    registry.register(
        "recovery_training_after_seconds",
        "Seconds from the loss of a ring to the first step trained by the next",
        training_again,
    );
    let points = JobState::ALL.map(|state| {
        let current = f64::from(u8::from(status.state == state));
        (label(&[("state", state.name().into())]), current)
    });
    family(&mut registry, "job_state", "1 for the job's current state", points);
    let mut text = String::new();
    encode(&mut text, &registry).expect("writing to a String cannot fail");
    let _ = writeln!(text);
    text
}

/// From a healthy sub-second CPU recovery to a GPU job reloading many GB.
const TRAINING_AGAIN_BUCKETS: [f64; 10] = [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0];

type Labels = Vec<(String, String)>;

/// A gauge with labels, one value per label set.
fn family(registry: &mut Registry, name: &str, help: &str, points: impl IntoIterator<Item = (Labels, f64)>) {
    let family = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    for (labels, value) in points {
        family.get_or_create(&labels).set(value);
    }
    registry.register(name, help, family);
}

/// The unlabelled gauges: name, help, value (absent ones are left out).
fn scalars(status: &StatusReport) -> [(&'static str, &'static str, Option<f64>); 18] {
    let lost = status.state == JobState::Failed && status.reason.as_deref().is_some_and(|r| r.contains(" lost:"));
    [
        (
            "train_step",
            "Steps completed by the whole job",
            Some(status.step as f64),
        ),
        (
            "train_total_steps",
            "Steps the job runs",
            Some(status.total_steps as f64),
        ),
        (
            "train_learning_rate",
            "Learning rate of the latest step",
            status.learning_rate,
        ),
        ("train_logit_scale", "Contrastive logit scale", status.logit_scale),
        (
            "train_gradient_norm",
            "L2 norm of the latest step's reduced gradient, before clipping",
            status.gradient_norm,
        ),
        (
            "train_samples_per_second",
            "Global samples per second",
            status.samples_per_second,
        ),
        (
            "data_wait_share",
            "Share of wall time spent waiting for data",
            status.data_wait_share,
        ),
        ("eta_seconds", "Seconds left at the current pace", status.eta_seconds),
        (
            "checkpoint_last_step",
            "Step of the last committed checkpoint",
            status.checkpoint.last_committed_step.map(|s| s as f64),
        ),
        (
            "checkpoint_save_seconds",
            "Seconds the slowest rank took to save the last committed checkpoint",
            status.checkpoint.last_save_seconds,
        ),
        (
            "checkpoint_bytes",
            "Bytes of the last committed checkpoint, all shards",
            status.checkpoint.last_bytes.map(|b| b as f64),
        ),
        (
            "workers_compiling",
            "Workers in their first GPU step, compiling and tuning kernels",
            Some(status.workers.iter().filter(|w| w.phase == Phase::Compiling).count() as f64),
        ),
        ("workers_lost", "Workers declared lost", Some(f64::from(u8::from(lost)))),
        (
            "world_size",
            "Ranks in the current generation's ring",
            Some(status.world_size as f64),
        ),
        (
            "generation",
            "The ring's incarnation, bumped by every recovery",
            Some(status.generation as f64),
        ),
        (
            "restarts",
            "Recoveries over the job's life",
            Some(status.restarts.len() as f64),
        ),
        (
            "steps_lost",
            "Steps trained again after recoveries",
            Some(status.restarts.iter().map(|r| r.steps_trained_again() as f64).sum()),
        ),
        (
            "rpc_refused_calls",
            "Worker calls refused for a missing or wrong token",
            Some(status.refused_calls as f64),
        ),
    ]
}
