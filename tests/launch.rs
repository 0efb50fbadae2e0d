//! Jobs run as users run them: `coca launch`, `coca coordinator` +
//! `coca worker` processes on loopback, `coca status`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DEMO: &str = include_str!("../deploy/local/demo.toml");

fn coca() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_coca"));
    command.env_remove("COCA_JOB_TOKEN");
    command
}

/// The demo manifest with every port chosen by the system, heartbeats
/// tuned by the test, in `dir` (its relative paths resolve there).
fn manifest(dir: &Path, heartbeat_ms: u64, timeout_ms: u64) -> std::path::PathBuf {
    let text = DEMO
        .replace("coordinator = \"127.0.0.1:7070\"", "coordinator = \"127.0.0.1:0\"")
        .replace("bind = \"127.0.0.1:7071\"", "bind = \"127.0.0.1:0\"")
        .replace("heartbeat_ms = 500", &format!("heartbeat_ms = {heartbeat_ms}"))
        .replace(
            "heartbeat_timeout_ms = 10000",
            &format!("heartbeat_timeout_ms = {timeout_ms}"),
        );
    let path = dir.join("job.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Replaces `from` (which must be there) by `to` in the manifest at `job`.
fn edit(job: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(job).unwrap();
    assert!(text.contains(from), "{} has `{from}`", job.display());
    std::fs::write(job, text.replace(from, to)).unwrap();
}

fn http_get(address: &str, path: &str) -> Option<String> {
    ureq::get(&format!("http://{address}{path}"))
        .call()
        .ok()?
        .into_string()
        .ok()
}

fn status(address: &str) -> Option<serde_json::Value> {
    serde_json::from_str(&http_get(address, "/status")?).ok()
}

/// Reads `child`'s stdout until a line starting with `prefix`; returns the
/// address after "http://" in it, and the rest of its stdout once it ends.
fn address_from(child: &mut Child, prefix: &str) -> (String, std::thread::JoinHandle<String>) {
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = lines
        .by_ref()
        .map(Result::unwrap)
        .find(|line| line.starts_with(prefix))
        .expect("the announced line");
    let rest = std::thread::spawn(move || lines.map_while(Result::ok).map(|line| line + "\n").collect());
    let start = line.rfind("http://").unwrap() + "http://".len();
    (line[start..].trim_end_matches('/').to_string(), rest)
}

#[test]
fn launch_runs_the_demo_and_the_loss_falls() {
    let dir = tempfile::tempdir().unwrap();
    let job = manifest(dir.path(), 200, 10_000);
    // A trial shorter than the manifest's 10 warm-up steps says how to proceed...
    let short = coca()
        .args(["launch", job.to_str().unwrap(), "--steps", "8"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!short.status.success());
    assert!(
        String::from_utf8_lossy(&short.stderr).contains(
            "train.warmup_steps: 10 must be less than job.steps = 8 (set by --steps); \
             add --warmup-steps N with N below it to shorten the warm-up for this run"
        ),
        "{}",
        String::from_utf8_lossy(&short.stderr)
    );
    // ... and this run takes that advice.
    let mut child = coca()
        .args([
            "launch",
            job.to_str().unwrap(),
            "--steps",
            "20",
            "--warmup-steps",
            "4",
            "--linger",
            "5",
        ])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (address, stdout) = address_from(&mut child, "job demo: status on");
    let last: Arc<Mutex<Option<serde_json::Value>>> = Arc::default();
    let watcher = {
        let last = last.clone();
        let address = address.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(120) {
                if let Some(report) = status(&address) {
                    let done = report["state"] == "completed";
                    *last.lock().unwrap() = Some(report);
                    if done {
                        return;
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    watcher.join().unwrap();
    let metrics = http_get(&address, "/metrics").unwrap();
    let page = http_get(&address, "/").unwrap();
    let told = coca().args(["status", &address]).output().unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    // The end names the evaluation of the last step, as metrics.jsonl holds it; so does `coca status`.
    let steps = std::fs::read_to_string(dir.path().join("runs/demo/metrics.jsonl")).unwrap();
    let final_step: serde_json::Value = serde_json::from_str(steps.lines().last().unwrap()).unwrap();
    let results = final_step["evals"].as_object().expect("step 20 was evaluated");
    assert!(results.contains_key("zeroshot_top1"), "{final_step}");
    let results: Vec<String> = results
        .iter()
        .map(|(metric, value)| format!("{metric} {:.4}", value.as_f64().unwrap()))
        .collect();
    let evaluation = format!("evaluation at step 20: {}", results.join(", "));
    let stdout = stdout.join().unwrap();
    assert!(stdout.contains(&format!("\n{evaluation}\n")), "{stdout}");
    let told = String::from_utf8_lossy(&told.stdout);
    assert!(told.contains(&format!("eval   {evaluation}\n")), "{told}");
    let report = last.lock().unwrap().clone().expect("/status answered");
    assert_eq!(report["state"], "completed", "{report}");
    assert_eq!(report["step"], 20);
    let history = report["history"].as_array().unwrap();
    let (first, final_point) = (&history[0], history.last().unwrap());
    assert_eq!(final_point["step"], 20);
    assert!(
        final_point["loss"].as_f64().unwrap() < first["loss"].as_f64().unwrap(),
        "loss at step {} = {}, at step 20 = {}",
        first["step"],
        first["loss"],
        final_point["loss"]
    );
    assert!(metrics.contains("coca_train_loss{kind=\"contrastive\"}"), "{metrics}");
    assert!(metrics.contains("coca_train_gradient_norm "), "{metrics}");
    // Each source's progress, and what each rank fetched of it: the demo's 4
    // shards per source split between the 2 ranks' streams, each fetched once.
    let sources = report["sources"].as_array().unwrap();
    assert_eq!(sources.len(), 2, "{report}");
    for source in sources {
        assert_eq!(source["samples"], 20 * 16, "{source}");
        assert_eq!(source["shards_fetched"], 4, "{source}");
        let ranks = source["ranks"].as_array().unwrap();
        assert_eq!(ranks.len(), 2, "{source}");
        assert!(ranks.iter().all(|rank| rank["shards"] == 2), "{source}");
    }
    assert!(metrics.contains("coca_data_fetched_bytes{source=\"0\"}"), "{metrics}");
    assert!(metrics.contains("coca_data_rank_fetched_bytes{"), "{metrics}");
    // Every metric the Grafana dashboard queries is one the coordinator serves.
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../deploy/grafana/coca.json")).expect("the dashboard is JSON");
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let name = target["expr"]
                .as_str()
                .unwrap()
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .next()
                .unwrap();
            // A histogram's series share its TYPE line.
            let name = ["_sum", "_count", "_bucket"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            // These appear only while there is something to say: bad records met, a running job's ETA.
            if !["coca_data_bad_records", "coca_eta_seconds"].contains(&name) {
                assert!(
                    metrics.contains(&format!("# TYPE {name} ")),
                    "the dashboard queries {name}, not in\n{metrics}"
                );
            }
            queried += 1;
        }
    }
    assert!(queried >= 10);
    assert!(metrics.contains("coca_job_state{state=\"completed\"} 1"), "{metrics}");
    assert!(page.contains("<canvas id=\"losses\""));
    // Four warm-up steps: the fourth step runs at the peak rate (the manifest's ten would give 4e-4).
    let steps = std::fs::read_to_string(dir.path().join("runs/demo/metrics.jsonl")).unwrap();
    let fourth: serde_json::Value = serde_json::from_str(steps.lines().nth(3).unwrap()).unwrap();
    assert_eq!(
        (fourth["step"].as_u64(), fourth["learning_rate"].as_f64()),
        (Some(4), Some(1e-3)),
        "{fourth}"
    );
    assert!(
        fourth["gradient_norm"].as_f64().is_some_and(|norm| norm > 0.0),
        "{fourth}"
    );
    let journal = std::fs::read_to_string(dir.path().join("runs/demo/journal.jsonl")).unwrap();
    assert!(journal.contains("\"state\":\"completed\""), "{journal}");
    // The demo data was written on first launch.
    assert!(dir.path().join("data/demo/tokenizer.json").exists());
}

/// `coca coordinator` with its token; returns the process, its gRPC and
/// status addresses, and its later stdout lines.
fn start_coordinator(dir: &Path, job: &Path) -> (Child, String, String, std::sync::mpsc::Receiver<String>) {
    let mut child = coca()
        .args(["coordinator", job.to_str().unwrap()])
        .current_dir(dir)
        .env("COCA_JOB_TOKEN", "the-token")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = lines
        .by_ref()
        .map(Result::unwrap)
        .find(|line| line.contains("gRPC on"))
        .unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(|line| drop(sender.send(line))));
    let grpc = line
        .split("gRPC on ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_string();
    let status = line.rsplit("://").next().unwrap().trim_end_matches('/').to_string();
    (child, grpc, status, receiver)
}

fn start_worker(dir: &Path, grpc: &str, token: &str) -> Child {
    coca()
        .args([
            "worker",
            "--coordinator",
            &format!("http://{grpc}"),
            "--connect-timeout",
            "10",
        ])
        .current_dir(dir)
        .env("COCA_JOB_TOKEN", token)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for(address: &str, what: &str, predicate: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    wait_for_within(address, what, Duration::from_secs(120), predicate)
}

fn wait_for_within(
    address: &str,
    what: &str,
    patience: Duration,
    predicate: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let started = Instant::now();
    loop {
        if let Some(report) = status(address) {
            if predicate(&report) {
                return report;
            }
        }
        assert!(
            started.elapsed() < patience,
            "timed out waiting for {what}: {:?}",
            status(address)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `coca launch` of the test manifest with `from` replaced by `to`, which
/// must fail: its stderr.
fn launch_fails(from: &str, to: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = manifest(dir.path(), 200, 2000);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "the manifest has `{from}`");
    std::fs::write(&path, text.replace(from, to)).unwrap();
    let output = coca()
        .current_dir(dir.path())
        .args(["launch", "job.toml"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    stderr
}

#[test]
fn an_nccl_job_on_a_build_without_cuda_fails_saying_so() {
    if cfg!(feature = "cuda") {
        return; // a CUDA build makes the id; the GPU check runs that job.
    }
    let stderr = launch_fails(
        "backend = \"cpu\"\ncollective = \"tcp\"",
        "backend = \"cuda\"\ncollective = \"nccl\"",
    );
    assert!(
        stderr.contains("cluster.collective = \"nccl\": this coca was built without CUDA"),
        "{stderr}"
    );
}

/// A worker that cannot set up says which field failed and why, with the
/// cause under it (the templates file is read by the workers only).
#[test]
fn a_workers_setup_error_names_the_field_and_its_cause() {
    let stderr = launch_fails("templates = \"clip80\"", "templates = \"data/missing-templates.txt\"");
    assert!(
        stderr.contains("data.source[1].templates: cannot read the templates file: ")
            && stderr.contains("missing-templates.txt"),
        "{stderr}"
    );
}

#[test]
fn a_wrong_token_is_refused_and_a_killed_worker_is_named() {
    let dir = tempfile::tempdir().unwrap();
    // Data first, as `coca launch` would.
    let data = dir.path().join("data/demo");
    let made = coca()
        .args(["data", "demo", "--out", data.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(made.status.success());
    let job = manifest(dir.path(), 200, 3000);
    // A restart budget of 0: the first loss fails the job, naming the lost worker.
    let mut text = std::fs::read_to_string(&job).unwrap();
    text.push_str("\n[recovery]\nmax_restarts = 0\n");
    std::fs::write(&job, text).unwrap();
    let (mut coordinator, grpc, address, said) = start_coordinator(dir.path(), &job);

    let intruder = start_worker(dir.path(), &grpc, "not-the-token")
        .wait_with_output()
        .unwrap();
    assert!(!intruder.status.success());
    let message = String::from_utf8_lossy(&intruder.stderr);
    assert!(
        message.contains("the coordinator refused registration: the job token does not match this job's"),
        "{message}"
    );
    assert_eq!(
        wait_for(&address, "the refusal", |r| r["refused_calls"] == 1)["state"],
        "pending"
    );

    let mut workers = [
        start_worker(dir.path(), &grpc, "the-token"),
        start_worker(dir.path(), &grpc, "the-token"),
    ];
    wait_for(&address, "training", |r| r["step"].as_u64().unwrap_or(0) >= 3);
    let killed_at = Instant::now();
    workers[1].kill().unwrap();
    let exit = coordinator.wait().unwrap();
    let detected = killed_at.elapsed();
    assert_eq!(exit.code(), Some(1), "a failed job exits 1");
    // The victim said who it was when it started.
    let victim_said = workers[1].wait_with_output_lossy();
    let victim = victim_said
        .lines()
        .find_map(|line| Some(format!("w-{}", line.split_once("worker w-")?.1.split(':').next()?)))
        .expect("the victim's introduction, `worker w-N: rank ...`");
    // Everything it printed: the reader ends at the closed pipe, after the last line.
    let last = said.iter().last().expect("the coordinator's last word");
    assert!(last.starts_with(&format!("job demo: failed at step ")), "{last}");
    assert!(
        last.contains(&format!("(worker {victim} (rank ")) && last.contains(") lost: no heartbeat for"),
        "{last} / {victim_said}"
    );
    assert!(detected < Duration::from_secs(10), "declared lost after {detected:?}");
    let _ = workers[0].kill();
    let _ = workers[0].wait();
    let journal = std::fs::read_to_string(dir.path().join("runs/demo/journal.jsonl")).unwrap();
    assert!(journal.contains(&format!("worker {victim} (rank ")), "{journal}");
}

trait StderrText {
    fn wait_with_output_lossy(&mut self) -> String;
}

impl StderrText for Child {
    fn wait_with_output_lossy(&mut self) -> String {
        use std::io::Read;
        let _ = self.wait();
        let mut text = String::new();
        if let Some(mut stderr) = self.stderr.take() {
            let _ = stderr.read_to_string(&mut text);
        }
        text
    }
}

#[test]
fn ctrl_c_stops_the_job_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let job = manifest(dir.path(), 200, 10_000);
    let mut child = coca()
        .args(["launch", job.to_str().unwrap(), "--steps", "100000"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (address, _) = address_from(&mut child, "job demo: status on");
    wait_for(&address, "training", |r| r["step"].as_u64().unwrap_or(0) >= 2);
    let text = coca().args(["status", &format!("http://{address}")]).output().unwrap();
    let shown = String::from_utf8_lossy(&text.stdout);
    assert!(
        shown.contains("job    demo  running") && shown.contains("rank 0"),
        "{shown}"
    );
    // Each source's progress and fetches, and the ring.
    assert!(shown.contains("source 1: ") && shown.contains(" shards, "), "{shown}");
    assert!(shown.contains("ring   generation "), "{shown}");
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let exit = child.wait().unwrap();
    assert_eq!(exit.code(), Some(130), "stopped jobs exit 130");
    let journal = std::fs::read_to_string(dir.path().join("runs/demo/journal.jsonl")).unwrap();
    assert!(journal.contains("\"state\":\"stopped\""), "{journal}");
    // The step it stopped at was saved and committed before the exit...
    let events: Vec<serde_json::Value> = journal.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let stopped = events
        .iter()
        .rev()
        .find(|e| e["state"] == "stopped")
        .and_then(|e| {
            e["reason"]
                .as_str()?
                .strip_prefix("stopped at step ")?
                .parse::<u64>()
                .ok()
        })
        .expect("the stop step in the journal");
    let saved = events.iter().rev().find(|e| e["event"] == "checkpoint").unwrap()["step"].as_u64();
    assert_eq!(saved, Some(stopped), "{journal}");
    // ... and the job goes on from it (past the 10 warmup steps the manifest needs).
    let resumed = coca()
        .args(["launch", job.to_str().unwrap(), "--steps", &(stopped + 12).to_string()])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("(step {stopped}, saved by 2 workers)")),
        "{stderr}"
    );
}

/// The page's DOM after headless Chromium ran its script for a few seconds.
fn rendered(url: &str, profile: &Path) -> String {
    let output = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            &format!("--user-data-dir={}", profile.display()),
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ])
        .output()
        .expect("chromium runs: run scripts/test-deps.sh");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn the_status_page_draws_its_charts_from_live_data_in_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    let job = manifest(dir.path(), 200, 10_000);
    let mut child = coca()
        .args(["launch", job.to_str().unwrap(), "--steps", "12", "--linger", "60"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (address, _) = address_from(&mut child, "job demo: status on");
    wait_for(&address, "the end of the job", |r| r["state"] == "completed");
    let dom = rendered(&format!("http://{address}/"), &dir.path().join("chromium"));
    let _ = child.kill();
    let _ = child.wait();
    let text_of = |id: &str| {
        let start = dom
            .find(&format!("id=\"{id}\""))
            .unwrap_or_else(|| panic!("#{id} in {dom}"));
        let open = start + dom[start..].find('>').unwrap() + 1;
        dom[open..open + dom[open..].find('<').unwrap()].to_string()
    };
    assert_eq!(text_of("job"), "demo");
    assert_eq!(text_of("step"), "12 / 12");
    assert_eq!(text_of("state"), "completed");
    assert!(
        text_of("checkpoint").starts_with("step 12 ("),
        "{}",
        text_of("checkpoint")
    );
    // The charts drew the job's points (the script records how many).
    for chart in ["losses", "throughput-chart"] {
        let tag = &dom[dom.find(&format!("id=\"{chart}\"")).unwrap()..];
        let tag = &tag[..tag.find('>').unwrap()];
        let points: usize = tag
            .split("data-points=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap()
            .parse()
            .unwrap();
        assert!(points >= 2, "{chart}: {tag}");
    }
    // The [eval] chart: the demo evaluates at its last step.
    let tag = &dom[dom.find("id=\"evals\"").unwrap()..];
    assert!(tag[..tag.find('>').unwrap()].contains("data-points=\"1\""), "{tag}");
    assert!(
        text_of("eval-legend").contains("zeroshot_top1") || dom.contains("■ zeroshot_top1"),
        "{dom}"
    );
}

#[test]
fn the_data_settings_are_checked_against_the_shards_the_workers_and_the_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = manifest(dir.path(), 200, 10_000);
    let launch = |extra: &str, steps: &str| {
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("loader_threads = 1", &format!("loader_threads = 1\n{extra}"));
        std::fs::write(dir.path().join("streams.toml"), text).unwrap();
        coca()
            .current_dir(dir.path())
            .args(["launch", "streams.toml", "--steps", steps, "--warmup-steps", "2"])
            .output()
            .unwrap()
    };
    let with_data = |extra: &str| {
        // Each run starts over: another stream count is another sample order.
        let _ = std::fs::remove_dir_all(dir.path().join("runs"));
        launch(extra, "12")
    };
    // The demo's sources have 4 shards each: 8 streams cannot be dealt.
    let refused = with_data("streams = 8");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("data.streams: data source 0 has 4 shards with rows, fewer than its 8 streams"),
        "{stderr}"
    );
    // Memory for less than a shard: refused at the start, naming the field, unless re-fetching is accepted.
    let refused = with_data("shard_memory_bytes = 1000");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains(
            "data.shard_memory_bytes: 1000 bytes cannot hold what a worker reads at once under any stream layout"
        ),
        "{stderr}"
    );
    let refused = with_data("streams = 4\nshard_memory_bytes = 1000");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("data.streams: 4 streams make each of 2 workers hold about "),
        "{stderr}"
    );
    // One stream for two workers, re-fetching accepted: it runs, and says what it costs.
    let warned = with_data("streams = 1\nshard_memory_bytes = 1000\naccept_refetching = true");
    let stderr = String::from_utf8_lossy(&warned.stderr);
    assert!(warned.status.success(), "{stderr}");
    assert!(
        stderr.contains("2 workers do not divide the 1 data streams: every worker reads every stream's shards"),
        "{stderr}"
    );
    assert!(
        stderr.contains("a worker's shards do not fit data.shard_memory_bytes: shards will be fetched more than once"),
        "{stderr}"
    );
    // Without data.streams, the coordinator says what it chose and why.
    let chosen = with_data("");
    let stderr = String::from_utf8_lossy(&chosen.stderr);
    assert!(chosen.status.success(), "{stderr}");
    assert!(
        stderr.contains("data.streams: 4 chosen: the most that every worker reads on its own and that fit its memory"),
        "{stderr}"
    );
    // A job resumes under the stream count its checkpoints were written with, not a new choice.
    assert!(with_data("streams = 2").status.success());
    let resumed = launch("", "24");
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(
        stderr.contains("data.streams: 2, the count this job's checkpoints were written with"),
        "{stderr}"
    );
    assert!(stderr.contains("resuming from"), "{stderr}");
    // Shards are kept on disk only when asked, in data.cache_dir.
    let cached = with_data("cache_dir = \"shard-cache\"");
    assert!(cached.status.success(), "{}", String::from_utf8_lossy(&cached.stderr));
    let kept = std::fs::read_dir(dir.path().join("shard-cache")).unwrap().count();
    assert_eq!(kept, 8, "the demo's 8 shards, each once");
    let unusable = with_data("cache_dir = \"streams.toml/cache\"");
    let stderr = String::from_utf8_lossy(&unusable.stderr);
    assert!(!unusable.status.success());
    assert!(stderr.contains("data.cache_dir: "), "{stderr}");
}

/// The final parameters of a job's last committed step, by tensor.
fn exported(dir: &Path, checkpoint: &str) -> std::collections::BTreeMap<String, Vec<f32>> {
    let out = dir.join("export.safetensors");
    let status = coca()
        .args(["export", "--checkpoint", checkpoint, "--out", out.to_str().unwrap()])
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(status.success());
    let bytes = std::fs::read(&out).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .map(|(name, view)| (name, bytemuck::pod_collect_to_vec(view.data())))
        .collect()
}

/// One worker of two replicas trains what two workers train: the replicas
/// are ranks of the job; so do two workers each accumulating 4 chunks, and
/// with patch dropout (each sample keeps its own patches on any layout).
/// Two workers sharding AdamW's moments, or computing the towers' blocks
/// again in the backward pass, save the very checkpoint two workers
/// without either write. Twice the same layout gives the same bits.
#[test]
fn replicas_in_one_worker_train_what_two_workers_train() {
    let run_with = |workers: usize, replicas: usize, train: &str| {
        let dir = tempfile::tempdir().unwrap();
        let job = manifest(dir.path(), 500, 10_000);
        let text = std::fs::read_to_string(&job)
            .unwrap()
            .replace("steps = 300", "steps = 20")
            .replace("lambda_cap = 2.0", &format!("lambda_cap = 2.0\n{train}"))
            .replace("workers = 2", &format!("workers = {workers}\nreplicas = {replicas}"));
        let text = text[..text.find("[eval]").unwrap()].to_string() + &text[text.find("[status]").unwrap()..];
        std::fs::write(&job, text).unwrap();
        let output = coca().arg("launch").arg(&job).current_dir(dir.path()).output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let log = String::from_utf8_lossy(&output.stderr).to_string();
        let step = dir.path().join("runs/demo/checkpoints/step-00000020");
        let shards: Vec<Vec<u8>> = (0..workers)
            .map(|rank| std::fs::read(step.join(format!("rank-{rank:05}-of-{workers:05}.safetensors"))).unwrap())
            .collect();
        (exported(dir.path(), "runs/demo/checkpoints"), log, shards)
    };
    let run = |workers: usize, replicas: usize| run_with(workers, replicas, "");
    let (workers, _, shards) = run(2, 1);
    let (_, _, sharded) = run_with(2, 1, "shard_optimizer = true");
    assert!(sharded == shards, "the sharded optimizer saved another step 20");
    let (_, _, recomputed) = run_with(2, 1, "activation_checkpointing = true");
    assert!(recomputed == shards, "activation checkpointing saved another step 20");
    let (replicas, log, _) = run(1, 2);
    assert!(log.contains("2 model replicas per worker"), "{log}");
    // The sums run in another order (see model/tests/data_parallel.rs).
    let worst_against = |actual: &std::collections::BTreeMap<String, Vec<f32>>,
                         reference: &std::collections::BTreeMap<String, Vec<f32>>| {
        let mut worst = 0.0f64;
        for (name, expected) in reference {
            let norm = |values: &mut dyn Iterator<Item = f32>| values.map(|v| f64::from(v).powi(2)).sum::<f64>().sqrt();
            let difference = norm(&mut actual[name].iter().zip(expected).map(|(a, b)| a - b));
            worst = worst.max(difference / norm(&mut expected.iter().copied()).max(1e-6));
        }
        worst
    };
    let worst = |actual| worst_against(actual, &workers);
    assert!(
        worst(&replicas) < 1e-3,
        "worst relative difference {:e}",
        worst(&replicas)
    );
    let (accumulated, _, _) = run_with(2, 1, "accumulation = 4");
    assert!(
        worst(&accumulated) < 1e-3,
        "accumulated: worst relative difference {:e}",
        worst(&accumulated)
    );
    assert!(accumulated != workers, "the chunks sum in another order: other bits");
    let (dropped, _, _) = run_with(2, 1, "patch_dropout = 0.5");
    let (dropped_replicas, _, _) = run_with(1, 2, "patch_dropout = 0.5");
    let difference = worst_against(&dropped_replicas, &dropped);
    assert!(
        difference < 1e-3,
        "patch dropout: worst relative difference {difference:e}"
    );
    assert!(worst(&dropped) > 1e-2, "half the patches dropped trains another model");
    // The image tower locked but its head: on either layout its blocks keep
    // their initial bits, so the two runs agree on them exactly.
    let lock = "lock_image = true\nlock_image_unlocked_groups = 1";
    let (locked, log, _) = run_with(2, 1, lock);
    assert!(log.contains("parameters train; the gradient all-reduce moves"), "{log}");
    let (locked_replicas, _, _) = run_with(1, 2, lock);
    let block = |name: &String| name.starts_with("image_encoder.blocks.");
    assert!(locked.keys().filter(|name| block(name)).count() > 0);
    for name in locked.keys().filter(|name| block(name)) {
        assert!(locked[name] == locked_replicas[name], "{name} is locked but moved");
        assert!(locked[name] != workers[name], "{name}: the unlocked job trains it");
    }
    let (again, _, _) = run(1, 2);
    assert!(again == replicas, "the same layout gave other bits");
}

/// The demo job cut down for a GPU of the wgpu backend on Mesa's lavapipe (a
/// Vulkan driver on the CPU, installed by scripts/test-deps.sh): one worker
/// at batch 4, a constant rate (so the job stopped at step 2 and resumed is
/// the straight one), no evaluation, a checkpoint every 2 steps, and a
/// kernel cache shared by every job run in `dir`.
fn small_job(dir: &Path, name: &str, backend: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(manifest(dir, 500, 10_000)).unwrap();
    let text = text[..text.find("[eval]").unwrap()].to_string() + &text[text.find("[status]").unwrap()..];
    let text = text
        .replace("name = \"demo\"", &format!("name = \"{name}\""))
        .replace("runs/demo", &format!("runs/{name}"))
        .replace("steps = 300", "steps = 4")
        .replace("global_batch = 32", "global_batch = 4")
        .replace("warmup_steps = 10", "warmup_steps = 1")
        .replace("schedule = \"cosine\"", "schedule = \"constant\"")
        .replace("workers = 2", "workers = 1")
        .replace("backend = \"cpu\"", &format!("backend = \"{backend}\""))
        .replace("every = 100", "every = 2")
        + "\n[gpu]\nkernel_cache = \"kernels\"\n";
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// The total loss of each step, from the job's metrics.jsonl.
fn losses(dir: &Path, name: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join(format!("runs/{name}/metrics.jsonl")))
        .unwrap()
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// What the worker's log says its first step compiled.
fn first_step_kernels(log: &str) -> u64 {
    let line = log
        .lines()
        .find(|line| line.contains("first step in"))
        .unwrap_or_else(|| panic!("no first step in\n{log}"));
    let count = line.rsplit("(kernels: ").next().unwrap();
    count
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{line}"))
}

/// A job on the wgpu backend: `coca kernels warm` fills its kernel cache so
/// that its worker starts warm, it trains what the CPU trains, and stopped
/// and resumed it ends bit for bit where the straight job ends.
#[test]
fn a_wgpu_job_starts_warm_trains_as_the_cpu_does_and_resumes() {
    assert!(
        std::fs::read_dir("/usr/share/vulkan/icd.d")
            .map(|entries| entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("lvp_icd")))
            .unwrap_or(false),
        "no lavapipe Vulkan driver: run scripts/test-deps.sh (Debian's mesa-vulkan-drivers)"
    );
    let dir = tempfile::tempdir().unwrap();
    let launch = |name: &str, backend: &str, extra: &[&str]| {
        let job = small_job(dir.path(), name, backend);
        let output = coca()
            .arg("launch")
            .arg(&job)
            .args(extra)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&output.stderr).to_string();
        assert!(output.status.success(), "{name}: {log}");
        log
    };
    launch("cpu", "cpu", &[]);

    // `coca kernels warm` compiles the job's kernels at its shapes, on an
    // empty cache, and shares them...
    let job = small_job(dir.path(), "first", "wgpu");
    let output = coca()
        .args(["kernels", "warm", job.to_str().unwrap()])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let count = |what: &str| -> u64 {
        let before = said.split(what).next().unwrap();
        before
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("{said}"))
    };
    let (cold, shared) = (count(" kernels compiled"), count(" files shared"));
    assert!(
        said.contains("llvmpipe") && said.contains(": 0 files there before"),
        "{said}"
    );
    assert!(cold > 100 && shared > 0, "{said}");

    // ... so the job's worker starts warm, and /status names the adapter.
    let mut child = coca()
        .args(["launch", job.to_str().unwrap(), "--linger", "3"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (address, _) = address_from(&mut child, "job first: status on");
    // A warm lavapipe first step takes 65-90 s on 2 busy cores.
    let report = wait_for_within(
        &address,
        "the wgpu job to complete",
        Duration::from_secs(600),
        |report| report["state"] == "completed",
    );
    let output = child.wait_with_output().unwrap();
    let first_log = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "{first_log}");
    let device = report["workers"][0]["device"].as_str().unwrap().to_string();
    assert!(device.starts_with("wgpu:0 llvmpipe"), "{report}");
    assert!(
        first_log.contains(&format!("kernel cache kernels: {shared} files")),
        "{first_log}"
    );
    let warm = first_step_kernels(&first_log);
    assert!(
        warm * 10 < cold,
        "the warmed job compiled {warm} kernels, the warm-up {cold}"
    );

    // The same first step as the CPU's (the forward pass, from the same
    // initial values, in another order of the sums: f32 rounding apart).
    // After it, AdamW's first update, about +-lr on every parameter
    // whatever its gradient's size, turns a flipped sign of a near-zero
    // gradient into a whole step, so the backends part by up to 2% (0.4%
    // seen). A wrong kernel is off by far more.
    let (cpu, wgpu) = (losses(dir.path(), "cpu"), losses(dir.path(), "first"));
    assert_eq!((cpu.len(), wgpu.len()), (4, 4));
    assert!(
        (cpu[0] - wgpu[0]).abs() <= 1e-4 * cpu[0],
        "step 1: cpu {}, wgpu {}",
        cpu[0],
        wgpu[0]
    );
    close(&cpu, &wgpu, "cpu", "wgpu");
    assert!(wgpu[3] < wgpu[0], "the loss falls on wgpu: {wgpu:?}");

    // Stopped at step 2 and resumed to 4, the job ends with the straight
    // job's parameters bit for bit: runs that share a kernel cache run the
    // kernels its autotune results chose (a run that tunes on its own may
    // choose kernels that sum in other orders).
    let straight_log = launch("straight", "wgpu", &[]);
    launch("resumed", "wgpu", &["--steps", "2"]);
    let resumed_log = launch("resumed", "wgpu", &[]);
    assert!(resumed_log.contains("resuming from"), "{resumed_log}");
    let shard = |name: &str| {
        std::fs::read(dir.path().join(format!(
            "runs/{name}/checkpoints/step-00000004/rank-00000-of-00001.safetensors"
        )))
        .unwrap()
    };
    assert!(
        shard("straight") == shard("resumed"),
        "the resumed wgpu job's step 4 differs from the straight one's (kernels compiled in their \
         first steps: {} straight, {} resumed)",
        first_step_kernels(&straight_log),
        first_step_kernels(&resumed_log)
    );
    assert_eq!(losses(dir.path(), "straight"), losses(dir.path(), "resumed"));
}

/// Two runs' losses agree step by step to 2%.
fn close(a: &[f64], b: &[f64], a_name: &str, b_name: &str) {
    for (step, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 2e-2 * x.abs(),
            "step {}: {a_name} {x}, {b_name} {y}",
            step + 1
        );
    }
}

/// A client holding the job's token but not following the protocol, during
/// a live job of two workers: a thousand registrations, heartbeats for a
/// real rank with steps beyond the job and going back and with sources the
/// job does not have, a checkpoint report naming a file outside the step,
/// a garbage listening address, a stranger reporting failure. Each is
/// refused or harmless; the job ends with the parameters of the same job
/// left alone, bit for bit.
#[test]
fn a_hostile_client_with_the_token_leaves_a_live_job_undisturbed() {
    use proto::coordinator_client::CoordinatorClient;
    use proto::{CheckpointShard, FinishRequest, HeartbeatRequest, RegisterRequest, RendezvousRequest, StepMetrics};

    let (quiet, busy) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for dir in [quiet.path(), busy.path()] {
        let job = manifest(dir, 200, 5000);
        edit(&job, "steps = 300", "steps = 20");
        edit(
            &job,
            "url = \"runs/demo/checkpoints\"\nevery = 100",
            "url = \"runs/demo/checkpoints\"\nevery = 10",
        );
        let made = coca()
            .args(["data", "demo", "--out", "data/demo"])
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(made.status.success());
    }
    let alone = coca()
        .args(["launch", "job.toml"])
        .current_dir(quiet.path())
        .output()
        .unwrap();
    assert!(alone.status.success(), "{}", String::from_utf8_lossy(&alone.stderr));

    let (mut coordinator, grpc, address, _said) = start_coordinator(busy.path(), &busy.path().join("job.toml"));
    let mut workers = [
        start_worker(busy.path(), &grpc, "the-token"),
        start_worker(busy.path(), &grpc, "the-token"),
    ];
    let report = wait_for(&address, "training", |r| r["step"].as_u64().unwrap_or(0) >= 2);
    let generation = report["generation"].as_u64().unwrap();
    let rank0 = report["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["rank"] == 0)
        .map(|w| w["id"].as_str().unwrap().to_string())
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refusals = runtime.block_on(async {
        let bearer = proto::auth::Bearer::new(&proto::auth::Token::new("the-token")).unwrap();
        let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = CoordinatorClient::with_interceptor(channel, bearer);
        let mut refusals = Vec::new();
        let mut stranger = String::new();
        for _ in 0..1000 {
            let request = RegisterRequest {
                protocol_version: proto::PROTOCOL_VERSION,
                host: "intruder".into(),
                device: "cpu".into(),
                preferred_rank: Some(0),
            };
            match client.register(request).await {
                Ok(reply) => stranger = reply.into_inner().worker_id,
                Err(status) => {
                    refusals.push(status.message().to_string());
                    break;
                }
            }
        }
        let beat = |step: u64, metrics: Vec<StepMetrics>| HeartbeatRequest {
            worker_id: rank0.clone(),
            step,
            metrics,
            generation,
            ..Default::default()
        };
        let foreign = StepMetrics {
            step: 20,
            source_epochs: vec![0.5; 9],
            ..Default::default()
        };
        for request in [beat(1_000_000, vec![]), beat(0, vec![]), beat(20, vec![foreign])] {
            refusals.push(client.heartbeat(request).await.unwrap_err().message().to_string());
        }
        let shard = CheckpointShard {
            worker_id: rank0.clone(),
            step: 10,
            file: "../../job.toml".into(),
            bytes: 1,
            sha256: "0".repeat(64),
            seconds: 0.0,
            generation,
        };
        refusals.push(client.report_checkpoint(shard).await.unwrap_err().message().to_string());
        let join = RendezvousRequest {
            worker_id: stranger.clone(),
            collective_address: "nowhere".into(),
            ..Default::default()
        };
        refusals.push(client.rendezvous(join).await.unwrap_err().message().to_string());
        let failed = FinishRequest {
            worker_id: stranger,
            step: 3,
            ok: false,
            message: "pretending the job broke".into(),
        };
        client.finish(failed).await.unwrap();
        refusals
    });
    assert_eq!(refusals.len(), 6, "{refusals:?}");
    for (refusal, says) in refusals.iter().zip([
        "workers are registered, the most this job takes",
        "step 1000000 is beyond the job's 20 steps",
        "is behind step",
        // (or, had rank 0 already reported step 20, that its metrics are not after it)
        "source_epochs has 9 values for the job's 2 sources",
        "file `../../job.toml` is not rank 0's shard of a world of 2",
        "collective_address `nowhere` is not an IP address and port",
    ]) {
        let late = says.starts_with("source_epochs") && refusal.contains("metrics of step 20 are outside");
        assert!(refusal.contains(says) || late, "`{refusal}` lacks `{says}`");
    }
    assert_eq!(coordinator.wait().unwrap().code(), Some(0), "the job completed");
    for worker in &mut workers {
        let _ = worker.wait();
    }
    let committed = |dir: &Path| {
        let path = dir.join("runs/demo/checkpoints/step-00000020/COMMITTED");
        let value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        value["shards"].clone()
    };
    assert_eq!(
        committed(quiet.path()),
        committed(busy.path()),
        "the disturbed job trained otherwise"
    );
}

/// gRPC over TLS with certificates made here by `openssl`: a CA, and the
/// coordinator's certificate it signed for 127.0.0.1. `coca launch` of a
/// job with `auth.tls_*` trains over TLS; a worker trusting another CA, or
/// facing an expired certificate, is refused at once, naming the problem; a
/// plain-HTTP worker is told to use https; beyond loopback the status
/// endpoint speaks TLS too; a key file without a key is refused at start.
#[test]
fn grpc_over_tls_verifies_the_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let openssl = |args: &str| {
        let output = Command::new("openssl")
            .args(args.split_whitespace())
            .current_dir(dir.path())
            .output()
            .expect("openssl runs");
        assert!(
            output.status.success(),
            "openssl {args}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    openssl(&format!(
        "req -x509 {key} -keyout ca.key -out ca.pem -days 2 -subj /CN=coca-test-ca"
    ));
    openssl(&format!(
        "req -x509 {key} -keyout other.key -out other.pem -days 2 -subj /CN=someone-else"
    ));
    openssl(&format!(
        "req {key} -keyout coordinator.key -out coordinator.csr -subj /CN=coordinator"
    ));
    std::fs::write(
        dir.path().join("san.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl("x509 -req -in coordinator.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out coordinator.pem -days 2 -extfile san.cnf");
    let job = manifest(dir.path(), 200, 5000);
    let with_tls = |key: &str| {
        let text = std::fs::read_to_string(&job).unwrap();
        let text = text.split("\n[auth]").next().unwrap().to_string();
        let auth = format!("\n[auth]\ntls_cert = \"coordinator.pem\"\ntls_key = \"{key}\"\ntls_ca = \"ca.pem\"\n");
        std::fs::write(&job, text + &auth).unwrap();
    };
    with_tls("coordinator.key");
    let trained = coca()
        .args(["launch", "job.toml", "--steps", "20"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(trained.status.success(), "{}", String::from_utf8_lossy(&trained.stderr));
    let metrics = std::fs::read_to_string(dir.path().join("runs/demo/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 20);

    // Another CA, and plain HTTP, against a coordinator serving TLS.
    let (mut coordinator, grpc, _, _) = start_coordinator(dir.path(), &job);
    let worker = |url: &str, ca: &str| {
        let mut command = coca();
        command
            .args(["worker", "--coordinator", url, "--connect-timeout", "3"])
            .current_dir(dir.path())
            .env("COCA_JOB_TOKEN", "the-token");
        if !ca.is_empty() {
            command.args(["--ca", ca]);
        }
        command.output().unwrap()
    };
    let started = Instant::now();
    let untrusted = worker(&format!("https://{grpc}"), "other.pem");
    let said = String::from_utf8_lossy(&untrusted.stderr);
    assert!(!untrusted.status.success());
    assert!(
        said.contains(&format!("TLS to the coordinator at https://{grpc}: the coordinator's certificate does not verify against --ca other.pem"))
            && said.contains("UnknownIssuer"),
        "{said}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a bad certificate is not retried"
    );
    let plain = worker(&format!("http://{grpc}"), "");
    assert!(!plain.status.success());
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains("speaks TLS: use https:// and --ca"),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    let no_ca = worker(&format!("https://{grpc}"), "");
    assert!(String::from_utf8_lossy(&no_ca.stderr).contains("--ca FILE is needed"));
    let _ = coordinator.kill();
    let _ = coordinator.wait();

    // Bound beyond loopback, the status endpoint speaks TLS with the same certificate.
    edit(&job, "bind = \"127.0.0.1:0\"", "bind = \"0.0.0.0:0\"");
    let (mut coordinator, _, address, _) = start_coordinator(dir.path(), &job);
    let port = address.rsplit(':').next().unwrap();
    let status = |url: String, ca: Option<&str>| {
        let mut command = coca();
        command
            .args(["status", &url])
            .env("COCA_JOB_TOKEN", "the-token")
            .current_dir(dir.path());
        if let Some(ca) = ca {
            command.args(["--ca", ca]);
        }
        command.output().unwrap()
    };
    let over_tls = status(format!("https://127.0.0.1:{port}"), Some("ca.pem"));
    assert!(
        over_tls.status.success(),
        "{}",
        String::from_utf8_lossy(&over_tls.stderr)
    );
    for (url, ca, says) in [
        (format!("https://127.0.0.1:{port}"), Some("other.pem"), "UnknownIssuer"),
        (format!("https://127.0.0.1:{port}"), None, "--ca FILE is needed"),
        (format!("http://127.0.0.1:{port}"), None, "cannot reach"),
    ] {
        let refused = status(url, ca);
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success() && said.contains(says), "{says}: {said}");
    }
    let _ = coordinator.kill();
    let _ = coordinator.wait();

    // A certificate that expired yesterday is named as such.
    openssl("x509 -req -in coordinator.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out expired.pem -days -1 -extfile san.cnf");
    edit(&job, "tls_cert = \"coordinator.pem\"", "tls_cert = \"expired.pem\"");
    let (mut coordinator, grpc, _, _) = start_coordinator(dir.path(), &job);
    let expired = worker(&format!("https://{grpc}"), "ca.pem");
    let said = String::from_utf8_lossy(&expired.stderr);
    assert!(
        said.contains("does not verify against --ca ca.pem") && said.contains("Expired"),
        "{said}"
    );
    let _ = coordinator.kill();
    let _ = coordinator.wait();
    edit(&job, "tls_cert = \"expired.pem\"", "tls_cert = \"coordinator.pem\"");

    with_tls("ca.pem");
    let refused = coca()
        .args(["launch", "job.toml", "--steps", "30"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("auth.tls_key (ca.pem): no PEM private key in it"),
        "{said}"
    );
}

/// A status endpoint bound beyond loopback serves what the job says only
/// to those holding its token (header, or `?token=` for a browser), unless
/// the manifest makes it public; /healthz stays open for probes.
#[test]
fn a_status_endpoint_beyond_loopback_asks_for_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let made = coca()
        .args(["data", "demo", "--out", "data/demo"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(made.status.success());
    let job = manifest(dir.path(), 200, 5000);
    edit(&job, "bind = \"127.0.0.1:0\"", "bind = \"0.0.0.0:0\"");
    let (mut coordinator, _, address, _) = start_coordinator(dir.path(), &job);
    let status = |address: &str, token: Option<&str>| {
        let mut command = coca();
        command.args(["status", &format!("http://{address}")]);
        if let Some(token) = token {
            command.env("COCA_JOB_TOKEN", token);
        }
        command.output().unwrap()
    };
    let refused = status(&address, None);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("HTTP 401 Unauthorized: no job token")
            && said.contains("is beyond loopback, so reads present the job token")
            && said.contains("unless status.public = true"),
        "{said}"
    );
    let wrong = status(&address, Some("not-the-token"));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("the job token does not match this job's"));
    let allowed = status(&address, Some("the-token"));
    assert!(allowed.status.success(), "{}", String::from_utf8_lossy(&allowed.stderr));
    assert!(
        String::from_utf8_lossy(&allowed.stdout).contains("demo"),
        "{}",
        String::from_utf8_lossy(&allowed.stdout)
    );
    assert!(http_get(&address, "/status?token=the-token").is_some_and(|body| body.contains("\"state\"")));
    assert!(http_get(&address, "/metrics").is_none());
    assert_eq!(http_get(&address, "/healthz").as_deref(), Some("ok\n"));
    let _ = coordinator.kill();
    let _ = coordinator.wait();

    edit(&job, "bind = \"0.0.0.0:0\"", "bind = \"0.0.0.0:0\"\npublic = true");
    let (mut coordinator, _, address, _) = start_coordinator(dir.path(), &job);
    assert!(status(&address, None).status.success(), "public");
    let _ = coordinator.kill();
    let _ = coordinator.wait();
}
