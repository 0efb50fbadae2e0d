//! Running jobs: `coca launch` (one machine: the coordinator in-process and
//! N worker processes), `coca coordinator` and `coca worker` (clusters),
//! `coca status`.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use contract::manifest::{Manifest, Overrides};
use contract::status::{JobState, StatusReport};
use coordinator::local_workers::LocalWorkers;
use coordinator::Coordinator;
use datasets::demo::{self, DemoSpec};
use indicatif::{ProgressBar, ProgressStyle};
use proto::auth::Token;
use store::Store;
use worker::job::{WorkerOptions, WorkerOutcome};

pub fn read_manifest(path: &Path, overrides: &Overrides) -> anyhow::Result<Manifest> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the manifest {}", path.display()))?;
    Manifest::parse_with(&text, &path.display().to_string(), overrides).map_err(|error| {
        // A trial run shortened with --steps is the usual way to meet this rule.
        if error.field == "train.warmup_steps" && overrides.steps.is_some() && overrides.warmup_steps.is_none() {
            anyhow::anyhow!(
                "{error} (set by --steps); add --warmup-steps N with N below it to shorten the warm-up for this run"
            )
        } else {
            error.into()
        }
    })
}

/// The job token: from `auth.token_file`, else the `auth.token_env` variable.
fn job_token(manifest: &Manifest, generate: bool) -> anyhow::Result<String> {
    if let Some(file) = &manifest.auth.token_file {
        let token = std::fs::read_to_string(file).with_context(|| format!("auth.token_file: cannot read {file}"))?;
        return Ok(token.trim().to_string());
    }
    match std::env::var(&manifest.auth.token_env) {
        Ok(token) if !token.is_empty() => Ok(token),
        _ if generate => {
            let mut bytes = [0u8; 24];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut random| random.read_exact(&mut bytes))
                .context("cannot draw a random job token")?;
            Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
        }
        _ => bail!(
            "no job token: set {} (auth.token_env) or auth.token_file",
            manifest.auth.token_env
        ),
    }
}

/// Writes the demo datasets where `[data] demo` points, unless they are there.
fn ensure_demo_data(manifest: &Manifest) -> anyhow::Result<()> {
    let Some(url) = &manifest.data.demo else { return Ok(()) };
    let options = store::StoreOptions::with_s3(manifest.data.s3_endpoint.clone(), manifest.data.s3_region.clone());
    let root = Store::open(url, &options)?;
    if root.exists(demo::TOKENIZER)? {
        return Ok(());
    }
    tracing::info!("launch: writing the demo datasets to {}", root.url());
    demo::write(&root, &DemoSpec::default()).with_context(|| format!("writing the demo datasets to {}", root.url()))?;
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Exit code of a finished job: 0 completed, 1 failed, 130 stopped.
fn exit_code(state: JobState) -> u8 {
    match state {
        JobState::Completed => 0,
        JobState::Stopped => 130,
        _ => 1,
    }
}

/// A coordinator running in this process, on its own runtime.
struct Started {
    manifest: Manifest,
    token: Token,
    runtime: tokio::runtime::Runtime,
    coordinator: Coordinator,
}

/// What `launch` and `coordinator` share: read the manifest, get the token
/// (`launch` draws one when none is set), write the demo data if asked,
/// start the coordinator and stop it on Ctrl-C and SIGTERM. `Err(code)`
/// when there is nothing to run.
fn start(
    path: &Path,
    overrides: &Overrides,
    resume: coordinator::Resume,
    draw_token: bool,
) -> anyhow::Result<Result<Started, u8>> {
    let manifest = read_manifest(path, overrides)?;
    let token = Token::new(&job_token(&manifest, draw_token)?);
    ensure_demo_data(&manifest)?;
    let runtime = runtime()?;
    let coordinator = match runtime.block_on(Coordinator::start(manifest.clone(), token.clone(), resume)) {
        Err(done @ coordinator::CoordinatorError::Complete { .. }) => {
            println!("job {}: {done}", manifest.job.name);
            return Ok(Err(0));
        }
        started => started?,
    };
    runtime.block_on(async { coordinator.stop_on_signals() });
    Ok(Ok(Started {
        manifest,
        token,
        runtime,
        coordinator,
    }))
}

pub fn launch(path: &Path, overrides: &Overrides, linger: u64, resume: coordinator::Resume) -> anyhow::Result<u8> {
    let Started {
        manifest,
        token,
        runtime,
        coordinator,
    } = match start(path, overrides, resume, true)? {
        Ok(started) => started,
        Err(code) => return Ok(code),
    };
    println!("job {}: status on {}", manifest.job.name, coordinator.status_url());
    // With TLS, local workers verify the coordinator as remote ones do.
    let (scheme, ca) = match &manifest.auth.tls {
        Some(tls) => ("https", Some(tls.ca.as_str())),
        None => ("http", None),
    };
    let mut workers = LocalWorkers::spawn(
        &std::env::current_exe()?,
        manifest.cluster.workers,
        &format!("{scheme}://{}", coordinator.grpc_address()),
        ca,
        manifest.cluster.worker_host,
        &manifest.auth.token_env,
        &token,
    )
    .context("cannot start a worker process")?;
    let shared = coordinator.shared.clone();
    let bar = ProgressBar::new(1)
        .with_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("a valid template"));
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    // A dead worker process is replaced while the job may heal, at most
    // recovery.max_restarts times; otherwise the job stops.
    let mut replacements_left = manifest.recovery.max_restarts;
    let mut recoveries_told = coordinator::status::report(&shared).restarts.len();
    let state = runtime.block_on(async {
        let finished = coordinator.finished(Duration::from_secs(10));
        tokio::pin!(finished);
        loop {
            tokio::select! {
                state = &mut finished => break state,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {
                    let report = coordinator::status::report(&shared);
                    bar.set_length(report.total_steps);
                    bar.set_position(report.step);
                    bar.set_message(progress_line(&report));
                    for (i, restart) in report.restarts.iter().enumerate().skip(recoveries_told) {
                        // Told once the new ring trains, or never will (a later loss, the end).
                        let later = i + 1 < report.restarts.len();
                        if restart.training_after_seconds.is_none() && !later && !report.state.is_terminal() {
                            break;
                        }
                        recoveries_told += 1;
                        bar.suspend(|| println!("{}", recovery_line(recoveries_told, restart)));
                    }
                    let heals = matches!(report.state, JobState::Rendezvous | JobState::Running | JobState::Recovering);
                    if let Some((i, status)) = workers.failed().filter(|_| !report.state.is_terminal()) {
                        if heals && replacements_left > 0 {
                            replacements_left -= 1;
                            bar.suspend(|| println!("launch: worker process {i} exited with {status}; starting a replacement"));
                            if let Err(error) = workers.replace(i) {
                                shared.request_stop(&format!("cannot start a replacement worker process: {error}"));
                            }
                        } else {
                            shared.request_stop(&format!("worker process {i} exited with {status}"));
                        }
                    }
                }
            }
        }
    });
    bar.finish_and_clear();
    workers.reap(Duration::from_secs(5));
    let report = coordinator::status::report(&shared);
    for (i, restart) in report.restarts.iter().enumerate().skip(recoveries_told) {
        println!("{}", recovery_line(i + 1, restart));
    }
    print_outcome(&report);
    if let Some(loss) = &report.loss {
        println!(
            "loss {:.4} (contrastive {:.4}, captioning {:.4})",
            loss.total, loss.contrastive, loss.captioning
        );
    }
    for line in evaluation_lines(&report) {
        println!("{line}");
    }
    std::thread::sleep(Duration::from_secs(linger));
    Ok(exit_code(state))
}

/// `job NAME: STATE at step S/T (why)`.
fn print_outcome(report: &StatusReport) {
    println!(
        "job {}: {} at step {}/{}{}",
        report.job,
        report.state.name(),
        report.step,
        report.total_steps,
        report.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
    );
}

/// `recovery N: CAUSE; reached step R, resumed from step S on W workers (L
/// steps trained again); ranks after T s, training again after U s`.
fn recovery_line(number: usize, restart: &contract::status::Restart) -> String {
    let mut line = format!(
        "recovery {number}: {}; reached step {}",
        restart.cause, restart.reached_step
    );
    let (Some(resumed), Some(world)) = (restart.resumed_step, restart.world) else {
        return line + ", no ring formed after it";
    };
    line += &format!(
        ", resumed from step {resumed} on {world} workers ({} steps trained again); ranks after {:.1} s",
        restart.steps_trained_again(),
        restart.ranks_after_seconds.unwrap_or(0.0)
    );
    match restart.training_after_seconds {
        Some(seconds) => line + &format!(", training again after {seconds:.1} s"),
        None => line + ", no step trained after it",
    }
}

/// `evaluation at step S: METRIC VALUE, ...`: each metric's last result.
fn evaluation_lines(report: &StatusReport) -> Vec<String> {
    contract::status::last_evaluations(&report.evals)
        .into_iter()
        .map(|(step, results)| {
            let results: Vec<String> = results
                .iter()
                .map(|(metric, value)| format!("{metric} {value:.4}"))
                .collect();
            format!("evaluation at step {step}: {}", results.join(", "))
        })
        .collect()
}

fn progress_line(report: &StatusReport) -> String {
    let mut line = report.state.name().to_string();
    if let Some(loss) = &report.loss {
        line += &format!(
            " loss {:.3} (con {:.3} cap {:.3})",
            loss.total, loss.contrastive, loss.captioning
        );
    }
    if let Some(rate) = report.samples_per_second {
        line += &format!(" {rate:.0} samples/s");
    }
    if let Some(eta) = report.eta_seconds {
        line += &format!(" eta {eta:.0}s");
    }
    line
}

pub fn coordinator(path: &Path, overrides: &Overrides, resume: coordinator::Resume) -> anyhow::Result<u8> {
    let Started {
        manifest,
        runtime,
        coordinator,
        ..
    } = match start(path, overrides, resume, false)? {
        Ok(started) => started,
        Err(code) => return Ok(code),
    };
    println!(
        "job {}: gRPC on {}, status on {}",
        manifest.job.name,
        coordinator.grpc_address(),
        coordinator.status_url()
    );
    let state = runtime.block_on(coordinator.finished(Duration::from_secs(30)));
    print_outcome(&coordinator::status::report(&coordinator.shared));
    Ok(exit_code(state))
}

pub fn worker(
    coordinator: Option<&str>,
    listen: Option<std::net::IpAddr>,
    token_env: &str,
    ca: Option<std::path::PathBuf>,
    connect_timeout: u64,
    device: Option<usize>,
    cores: Option<usize>,
) -> anyhow::Result<u8> {
    let environment: std::collections::HashMap<String, String> = std::env::vars().collect();
    let found = worker::discovery::discover(coordinator, &environment)?;
    let (device, device_origin) = worker::discovery::pick_device(device, &environment)?;
    for origin in found.origins.iter().chain([&device_origin]) {
        tracing::info!("worker: {origin}");
    }
    let listen = match listen {
        Some(address) => {
            tracing::info!("worker: listening on {address} from --listen");
            address
        }
        None => {
            let address = worker::discovery::route_to(&found.coordinator)?;
            tracing::info!("worker: listening on {address}, the interface that reaches the coordinator");
            address
        }
    };
    let token = std::env::var(token_env).with_context(|| format!("no job token: set {token_env}"))?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "localhost".into(), |h| h.trim().to_string());
    let cores = cores
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    // Every op's threads stay within this worker's share of the machine:
    // two workers of one host each using every core run slower than one.
    if rayon::ThreadPoolBuilder::new()
        .num_threads(cores)
        .build_global()
        .is_ok()
    {
        tracing::info!("worker: {cores} cores");
    }
    let options = WorkerOptions {
        coordinator: found.coordinator.clone(),
        ca,
        token: Token::new(&token),
        listen,
        host,
        connect_timeout: Duration::from_secs(connect_timeout),
        device,
        preferred_rank: found.index.and_then(|index| u32::try_from(index).ok()),
    };
    match worker::job::run(&options)? {
        WorkerOutcome::Completed { step } => tracing::info!("worker: done at step {step}"),
        WorkerOutcome::Stopped { step } => tracing::info!("worker: stopped at step {step}"),
    }
    Ok(0)
}

/// Fetches `path` from a status endpoint: `http://host:port`, or
/// `https://host:port` verified against `ca` (PEM).
fn http_get(base: &str, path: &str, token: Option<&str>, ca: Option<&std::path::Path>) -> anyhow::Result<String> {
    let base = base.trim_end_matches('/');
    let (scheme, address) = match base.split_once("://") {
        Some((scheme @ ("http" | "https"), address)) => (scheme, address),
        _ => ("http", base),
    };
    ensure!(
        !address.contains('/'),
        "{base}: give the status endpoint as http://host:port (or https://)"
    );
    let url = format!("{scheme}://{address}{path}");
    let agent = match scheme {
        "https" => {
            let ca = ca.with_context(|| {
                format!("{base}: --ca FILE is needed, the CA certificate that signed the endpoint's")
            })?;
            ureq::AgentBuilder::new().tls_config(client_tls(ca)?).build()
        }
        _ => ureq::agent(),
    };
    let mut request = agent.get(&url).timeout(Duration::from_secs(10));
    if let Some(token) = token {
        request = request.set("authorization", &format!("Bearer {token}"));
    }
    let response = request.call().map_err(|error| match error {
        ureq::Error::Status(code, response) => {
            let reason = response.status_text().to_string();
            let said = response.into_string().unwrap_or_default();
            let said = said.trim();
            match said.is_empty() {
                true => anyhow::anyhow!("{url}: HTTP {code} {reason}"),
                false => anyhow::anyhow!("{url}: HTTP {code} {reason}: {said}"),
            }
        }
        ureq::Error::Transport(transport) => anyhow::anyhow!("cannot reach {base}: {transport}"),
    })?;
    response
        .into_string()
        .with_context(|| format!("{url}: an unreadable response"))
}

/// A TLS client trusting only the CA certificate(s) in `ca`.
fn client_tls(ca: &std::path::Path) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).with_context(|| format!("--ca {}", ca.display()))? {
        roots
            .add(cert.with_context(|| format!("--ca {}", ca.display()))?)
            .with_context(|| format!("--ca {}", ca.display()))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

pub fn status(url: &str, token_env: &str, ca: Option<&std::path::Path>, json: bool, watch: bool) -> anyhow::Result<u8> {
    // An endpoint beyond loopback asks for the job token; one on loopback ignores it.
    let token = std::env::var(token_env).ok();
    loop {
        let body = http_get(url, "/status", token.as_deref(), ca)?;
        let report: StatusReport =
            serde_json::from_str(&body).with_context(|| format!("{url}/status: not a coca status document"))?;
        if json {
            println!("{body}");
        } else {
            print_status(&report);
        }
        if !watch || report.state.is_terminal() {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn print_status(report: &StatusReport) {
    println!("job    {}  {}", report.job, report.state.name());
    if let Some(reason) = &report.reason {
        println!("why    {reason}");
    }
    println!("step   {} / {}", report.step, report.total_steps);
    if let Some(loss) = &report.loss {
        println!(
            "loss   {:.4} (contrastive {:.4}, captioning {:.4})",
            loss.total, loss.contrastive, loss.captioning
        );
    }
    if let Some(norm) = report.gradient_norm {
        let clip = report
            .grad_clip_norm
            .map_or_else(String::new, |max| format!(", clipped to {max}"));
        let sharded = if report.shard_optimizer {
            "; optimizer sharded"
        } else {
            ""
        };
        println!(
            "grad   norm {norm:.3}{clip}; {} chunks per rank{sharded}",
            report.accumulation
        );
    }
    for line in evaluation_lines(report) {
        println!("eval   {line}");
    }
    if let Some(rate) = report.samples_per_second {
        println!(
            "speed  {rate:.1} samples/s, data wait {:.1}%",
            100.0 * report.data_wait_share.unwrap_or(0.0)
        );
    }
    if let Some(eta) = report.eta_seconds {
        println!("eta    {eta:.0} s");
    }
    for source in &report.sources {
        let ranks: Vec<String> = source
            .ranks
            .iter()
            .map(|rank| format!("rank {} {:.1} MB", rank.rank, rank.bytes as f64 / 1e6))
            .collect();
        println!(
            "source {}: {} samples ({:.2} epochs); {} shards, {:.1} MB fetched{}",
            source.source,
            source.samples,
            source.epochs,
            source.shards_fetched,
            source.bytes_fetched as f64 / 1e6,
            if ranks.is_empty() {
                String::new()
            } else {
                format!(" ({})", ranks.join(", "))
            }
        );
    }
    let trained_again: u64 = report.restarts.iter().map(|r| r.steps_trained_again()).sum();
    println!(
        "ring   generation {}, {} workers; {} restarts ({trained_again} steps trained again), {} left",
        report.generation,
        report.world_size,
        report.restarts.len(),
        report.restarts_left
    );
    for (i, restart) in report.restarts.iter().enumerate() {
        println!("{}", recovery_line(i + 1, restart));
    }
    for worker in &report.workers {
        let rank = worker.rank.map_or_else(|| "-".to_string(), |rank| rank.to_string());
        println!(
            "worker {} rank {rank} on {}: step {} ({}), heartbeat {:.1} s ago",
            worker.id, worker.host, worker.step, worker.phase, worker.last_heartbeat_seconds_ago
        );
    }
}
