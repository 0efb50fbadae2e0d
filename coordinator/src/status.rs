//! The status endpoint: GET /status (JSON), /metrics (Prometheus text),
//! / (a self-contained HTML page with live charts), /healthz. Read-only.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Json};
use axum::routing::get;
use axum::Router;
use contract::status::{phase_name, BadRecords, JobState, Losses, StatusReport, WorkerReport};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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
        source_epochs: latest.map(|m| m.source_epochs.clone()).unwrap_or_default(),
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
                phase: phase_name(w.phase).to_string(),
                last_heartbeat_seconds_ago: w.last_heartbeat.elapsed().as_secs_f64(),
                finished: w.finished.as_ref().map(|(ok, _)| *ok),
                message: w
                    .finished
                    .as_ref()
                    .map(|(_, message)| message.clone())
                    .filter(|m| !m.is_empty()),
            })
            .collect(),
        checkpoint: job.checkpoint.clone(),
        eta_seconds: job.eta_seconds(),
        uptime_seconds: job.uptime().as_secs_f64(),
        refused_calls: shared.refused_calls(),
        previous: job.previous.clone(),
        history: job.history.clone(),
        evals: job.evals.clone(),
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route(
            "/status",
            get(|State(shared): State<Arc<Shared>>| async move { Json(report(&shared)) }),
        )
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(shared)
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
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: f64| {
        let metric = Gauge::<f64, AtomicU64>::default();
        metric.set(value);
        registry.register(name, help, metric);
    };
    gauge(
        &mut registry,
        "train_step",
        "Steps completed by the whole job",
        status.step as f64,
    );
    gauge(
        &mut registry,
        "train_total_steps",
        "Steps the job runs",
        status.total_steps as f64,
    );
    if let Some(loss) = &status.loss {
        let family = Family::<Vec<(String, String)>, Gauge<f64, AtomicU64>>::default();
        for (kind, value) in [
            ("total", loss.total),
            ("contrastive", loss.contrastive),
            ("captioning", loss.captioning),
        ] {
            family
                .get_or_create(&vec![("kind".to_string(), kind.to_string())])
                .set(value);
        }
        registry.register("train_loss", "Loss of the latest step, by kind", family);
    }
    for (name, help, value) in [
        (
            "train_learning_rate",
            "Learning rate of the latest step",
            status.learning_rate,
        ),
        ("train_logit_scale", "Contrastive logit scale", status.logit_scale),
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
    ] {
        if let Some(value) = value {
            gauge(&mut registry, name, help, value);
        }
    }
    if let Some(latest) = status.evals.last() {
        let evals = Family::<Vec<(String, String)>, Gauge<f64, AtomicU64>>::default();
        for (metric, value) in &latest.values {
            evals
                .get_or_create(&vec![("metric".to_string(), metric.clone())])
                .set(*value);
        }
        registry.register("eval", "The latest [eval] results, by metric", evals);
    }
    let bad = Family::<Vec<(String, String)>, Gauge<f64, AtomicU64>>::default();
    for record in &status.bad_records {
        bad.get_or_create(&vec![
            ("source".into(), record.source.to_string()),
            ("reason".into(), record.reason.clone()),
        ])
        .set(record.count as f64);
    }
    registry.register("data_bad_records", "Bad records met, by source and reason", bad);
    let workers = Family::<Vec<(String, String)>, Gauge<f64, AtomicU64>>::default();
    for worker in &status.workers {
        workers
            .get_or_create(&vec![("worker".into(), worker.id.clone())])
            .set(worker.last_heartbeat_seconds_ago);
    }
    registry.register(
        "worker_heartbeat_age_seconds",
        "Seconds since each worker's last heartbeat",
        workers,
    );
    let lost = status.state == JobState::Failed && status.reason.as_deref().is_some_and(|r| r.contains(" lost:"));
    gauge(
        &mut registry,
        "workers_compiling",
        "Workers in their first GPU step, compiling and tuning kernels",
        status.workers.iter().filter(|w| w.phase == "compiling").count() as f64,
    );
    gauge(
        &mut registry,
        "workers_lost",
        "Workers declared lost",
        f64::from(u8::from(lost)),
    );
    gauge(
        &mut registry,
        "rpc_refused_calls",
        "Worker calls refused for a missing or wrong token",
        status.refused_calls as f64,
    );
    let states = Family::<Vec<(String, String)>, Gauge<f64, AtomicU64>>::default();
    for state in JobState::ALL {
        let value = f64::from(u8::from(status.state == state));
        states
            .get_or_create(&vec![("state".into(), state.name().into())])
            .set(value);
    }
    registry.register("job_state", "1 for the job's current state", states);
    let mut text = String::new();
    encode(&mut text, &registry).expect("writing to a String cannot fail");
    let _ = writeln!(text);
    text
}
