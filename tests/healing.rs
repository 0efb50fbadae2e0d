//! Self-healing end to end, with real processes on loopback: a chaos run
//! (workers and the coordinator killed with SIGKILL at random times, during
//! training, saves and rendezvous) completes on its own with the same
//! parameters, bit for bit, as an undisturbed run; with no replacement the
//! job goes on with fewer workers, as a run resumed on that world would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{children, free_port};

const DEMO: &str = include_str!("../deploy/local/demo.toml");
const TOKEN: &str = "healing-test-token";

struct Job {
    dir: PathBuf,
    grpc: u16,
    status: u16,
}

/// The demo manifest: `steps` steps at a constant rate, a checkpoint
/// every `every` (all kept), no eval, fast heartbeats, fixed ports
/// (a restarted coordinator must be found where the first one was), the
/// demo data shared with the other runs.
fn job(dir: &Path, data: &Path, steps: u64, every: u64, recovery: &str) -> Job {
    let (grpc, status) = (free_port(), free_port());
    let eval = DEMO.find("# Zero-shot classification").unwrap();
    let status_section = DEMO.find("[status]").unwrap();
    let text = format!("{}{}", &DEMO[..eval], &DEMO[status_section..])
        .replace("steps = 300", &format!("steps = {steps}"))
        .replace("warmup_steps = 10", "warmup_steps = 2")
        .replace("schedule = \"cosine\"", "schedule = \"constant\"")
        .replace("every = 100", &format!("every = {every}"))
        .replace("keep = 2", "keep = 1000")
        .replace("heartbeat_ms = 500", "heartbeat_ms = 200")
        .replace("heartbeat_timeout_ms = 10000", "heartbeat_timeout_ms = 2000")
        .replace("127.0.0.1:7070", &format!("127.0.0.1:{grpc}"))
        .replace("127.0.0.1:7071", &format!("127.0.0.1:{status}"))
        .replace("\"data/demo", &format!("\"{}", data.display()))
        .replace("demo = \"", "# demo = \"")
        + &format!("\n[recovery]\n{recovery}\n");
    std::fs::write(dir.join("job.toml"), text).unwrap();
    Job {
        dir: dir.to_path_buf(),
        grpc,
        status,
    }
}

fn coca(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_coca"));
    command
        .current_dir(dir)
        .env("COCA_JOB_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

impl Job {
    fn coordinator(&self) -> Child {
        coca(&self.dir).args(["coordinator", "job.toml"]).spawn().unwrap()
    }

    fn worker(&self) -> Child {
        let url = format!("http://127.0.0.1:{}", self.grpc);
        coca(&self.dir)
            .args([
                "worker",
                "--coordinator",
                &url,
                "--listen",
                "127.0.0.1",
                "--connect-timeout",
                "30",
            ])
            .spawn()
            .unwrap()
    }

    fn status(&self) -> Option<serde_json::Value> {
        let url = format!("http://127.0.0.1:{}/status", self.status);
        let body = ureq::get(&url)
            .timeout(Duration::from_secs(2))
            .call()
            .ok()?
            .into_string()
            .ok()?;
        serde_json::from_str(&body).ok()
    }

    /// COMMITTED of step `step`: its shards' names, sizes and SHA-256.
    fn shards(&self, step: u64) -> serde_json::Value {
        let path = self.dir.join(format!("runs/demo/checkpoints/step-{step:08}/COMMITTED"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["shards"].clone()
    }

    fn journal(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("runs/demo/journal.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// A step directory with a shard written and no COMMITTED yet: a save in progress.
    fn saving(&self) -> bool {
        let Ok(steps) = std::fs::read_dir(self.dir.join("runs/demo/checkpoints")) else {
            return false;
        };
        steps.filter_map(Result::ok).any(|step| {
            let path = step.path();
            !path.join("COMMITTED").exists()
                && std::fs::read_dir(&path).is_ok_and(|mut files| {
                    files.any(|f| f.is_ok_and(|f| f.file_name().to_string_lossy().starts_with("rank-")))
                })
        })
    }
}

fn demo_data(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    let made = Command::new(env!("CARGO_BIN_EXE_coca"))
        .args(["data", "demo", "--out", data.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    data
}

/// The undisturbed run: `coca launch` of the same manifest.
fn undisturbed(job: &Job) {
    let output = coca(&job.dir)
        .args(["launch", "job.toml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Draws from a fixed sequence, so a failing run can be told again.
struct Draws(u64);

impl Draws {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

#[test]
fn a_job_under_random_kills_heals_itself_to_the_undisturbed_runs_parameters() {
    let root = tempfile::tempdir().unwrap();
    let data = demo_data(root.path());
    // Long enough to outlast the kills (the tiny model trains ~25 steps/s here).
    let steps = 800;
    let recovery = "max_restarts = 100";
    let (calm_dir, chaos_dir) = (root.path().join("calm"), root.path().join("chaos"));
    std::fs::create_dir_all(&calm_dir).unwrap();
    std::fs::create_dir_all(&chaos_dir).unwrap();
    let calm = job(&calm_dir, &data, steps, 10, recovery);
    let chaos = job(&chaos_dir, &data, steps, 10, recovery);
    undisturbed(&calm);

    let mut coordinator = chaos.coordinator();
    let mut workers = [chaos.worker(), chaos.worker()];
    let mut draws = Draws(2026);
    let (mut worker_kills, mut coordinator_kills, mut during_saves) = (0, 0, 0);
    let mut to_training = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    // A worker process that exits is replaced, as Kubernetes would.
    let replace_exited = |workers: &mut [Child; 2]| {
        for worker in workers.iter_mut() {
            if worker.try_wait().unwrap().is_some() {
                *worker = chaos.worker();
            }
        }
    };
    let training_after = |generation: u64, workers: &mut [Child; 2]| {
        while Instant::now() < deadline {
            replace_exited(workers);
            if let Some(status) = chaos.status() {
                let resumed = status["restarts"]
                    .as_array()
                    .and_then(|r| r.last())
                    .and_then(|r| r["resumed_step"].as_u64());
                if status["generation"].as_u64() > Some(generation)
                    && status["state"] == "running"
                    && resumed.is_some_and(|resumed| status["step"].as_u64() > Some(resumed))
                {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the job did not train again");
    };
    // Training first, then 12 kills: the coordinator 5th and 10th, the rest workers.
    while chaos.status().is_none_or(|s| s["step"].as_u64() < Some(3)) {
        assert!(Instant::now() < deadline, "the chaos job never trained");
        std::thread::sleep(Duration::from_millis(50));
    }
    for round in 0..12 {
        if round == 4 || round == 9 {
            kill(&mut coordinator);
            coordinator_kills += 1;
            std::thread::sleep(Duration::from_millis(300 + draws.next(700)));
            coordinator = chaos.coordinator();
        } else {
            // Some while a checkpoint is being written, some at once after the last kill
            // (during the rendezvous or the setup), the rest at a random time.
            match draws.next(3) {
                0 => {
                    let wait = Instant::now() + Duration::from_secs(5);
                    while !chaos.saving() && Instant::now() < wait {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    during_saves += u32::from(chaos.saving());
                }
                1 => std::thread::sleep(Duration::from_millis(100 + draws.next(400))),
                _ => std::thread::sleep(Duration::from_millis(draws.next(2000))),
            }
            let victim = draws.next(2) as usize;
            let generation = chaos.status().and_then(|s| s["generation"].as_u64()).unwrap_or(0);
            let killed_at = Instant::now();
            kill(&mut workers[victim]);
            worker_kills += 1;
            // Its replacement starts at once, as a restarted pod would.
            workers[victim] = chaos.worker();
            if draws.next(2) == 0 {
                training_after(generation, &mut workers);
                to_training.push(killed_at.elapsed().as_secs_f64());
            }
        }
    }
    let exit = loop {
        if let Some(exit) = coordinator.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "the chaos job did not complete");
        // Until the job has ended, a worker that exits is replaced.
        if chaos.status().is_some_and(|status| status["state"] != "completed") {
            replace_exited(&mut workers);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for worker in &mut workers {
        let _ = worker.wait();
    }
    assert!(exit.success(), "the chaos job failed: {exit:?}");
    assert!(worker_kills >= 10 && coordinator_kills == 2);

    // The same parameters and AdamW moments, byte for byte.
    assert_eq!(chaos.shards(steps), calm.shards(steps));
    let journal = chaos.journal();
    let restarts: Vec<&serde_json::Value> = journal.iter().filter(|e| e["event"] == "restart").collect();
    let coordinator_restarts = restarts
        .iter()
        .filter(|r| r["cause"].as_str().unwrap().starts_with("the coordinator restarted"))
        .count();
    assert_eq!(coordinator_restarts, 2, "{restarts:#?}");
    assert!(restarts.len() >= 6, "{restarts:#?}");
    // What the journal says of each recovery: how far its ring had gone,
    // where it went on from, how long until the next ring trained.
    let recovered = coordinator::journal::read(&chaos.dir.join("runs/demo/journal.jsonl")).unwrap();
    let lost: Vec<u64> = recovered.restarts.iter().map(|r| r.steps_trained_again()).collect();
    let training_again: Vec<f64> = recovered
        .restarts
        .iter()
        .filter_map(|r| r.training_after_seconds)
        .collect();
    for restart in &recovered.restarts {
        if let (Some(ranks), Some(training)) = (restart.ranks_after_seconds, restart.training_after_seconds) {
            assert!(training >= ranks, "{restart:?}");
        }
    }
    to_training.sort_by(f64::total_cmp);
    eprintln!(
        "{worker_kills} worker kills ({during_saves} during a save), {coordinator_kills} coordinator kills, {} restarts; \
         kill to training again (seen from outside): median {:.1} s of {:?}; training again after (journal): {:?}; \
         steps trained again per restart: {lost:?}",
        restarts.len(),
        to_training.get(to_training.len() / 2).copied().unwrap_or(f64::NAN),
        to_training,
        training_again
    );
}

#[test]
fn with_no_replacement_the_job_finishes_on_fewer_workers_as_a_resumed_run_would() {
    let root = tempfile::tempdir().unwrap();
    let data = demo_data(root.path());
    let steps = 200;
    let recovery = "min_workers = 1\nreplacement_timeout_ms = 1000";
    let (shrunk_dir, resumed_dir) = (root.path().join("shrunk"), root.path().join("resumed"));
    std::fs::create_dir_all(&shrunk_dir).unwrap();
    std::fs::create_dir_all(&resumed_dir).unwrap();
    let shrunk = job(&shrunk_dir, &data, steps, 5, recovery);
    let resumed = job(&resumed_dir, &data, steps, 5, recovery);

    let mut coordinator = shrunk.coordinator();
    let mut workers = [shrunk.worker(), shrunk.worker()];
    let deadline = Instant::now() + Duration::from_secs(300);
    while shrunk
        .status()
        .is_none_or(|s| s["checkpoint"]["last_committed_step"].as_u64() < Some(5))
    {
        assert!(Instant::now() < deadline, "nothing committed");
        std::thread::sleep(Duration::from_millis(20));
    }
    kill(&mut workers[1]);
    let exit = coordinator.wait().unwrap();
    let _ = workers[0].wait();
    assert!(exit.success(), "the shrunk job failed: {exit:?}");
    let journal = shrunk.journal();
    let assigned = journal.iter().filter(|e| e["event"] == "assigned").last().unwrap();
    assert_eq!(assigned["world"], 1, "{journal:#?}");
    let from = assigned["step"].as_u64().unwrap();
    assert!(from >= 5 && from % 5 == 0, "{assigned}");

    // The same step resumed on one worker, by a person.
    let step_dir = shrunk.dir.join(format!("runs/demo/checkpoints/step-{from:08}"));
    let output = coca(&resumed.dir)
        .args([
            "launch",
            "job.toml",
            "--workers",
            "1",
            "--from",
            step_dir.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
    let shards = shrunk.shards(steps);
    assert_eq!(shards[0]["file"], "rank-00000-of-00001.safetensors");
    assert_eq!(shards, resumed.shards(steps));
}

#[test]
fn coca_launch_replaces_a_dead_worker_and_says_so() {
    let root = tempfile::tempdir().unwrap();
    let data = demo_data(root.path());
    let job = job(root.path(), &data, 400, 10, "");
    let launch = coca(&job.dir)
        .args(["launch", "job.toml"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed between two saves (every 10 steps): the steps since the last are trained again.
    let deadline = Instant::now() + Duration::from_secs(120);
    while job.status().is_none_or(|s| {
        s["checkpoint"]["last_committed_step"].as_u64() < Some(20)
            || s["step"].as_u64().is_none_or(|step| step % 10 != 5)
    }) {
        assert!(Instant::now() < deadline, "the job never committed step 20");
        std::thread::sleep(Duration::from_millis(5));
    }
    let workers = children(launch.id());
    assert_eq!(workers.len(), 2, "{workers:?}");
    Command::new("kill")
        .args(["-9", &workers[1].to_string()])
        .status()
        .unwrap();
    let output = launch.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("launch: worker process 1 exited with signal: 9 (SIGKILL); starting a replacement"),
        "{stdout}"
    );
    // `recovery 1: worker w-0 (rank 0, HOST): step N: lost rank 1 ...; reached step R,
    // resumed from step S on 2 workers (L steps trained again); ranks after A s, training again after B s`
    let recovery = stdout
        .lines()
        .find(|l| l.starts_with("recovery 1: worker w-"))
        .expect(&stdout);
    let number_after = |text: &str, before: &str| -> f64 {
        let start = recovery
            .find(before)
            .unwrap_or_else(|| panic!("no {before:?} in {recovery}"))
            + before.len();
        let digits: String = recovery[start..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        digits
            .parse()
            .unwrap_or_else(|_| panic!("{text}: no number after {before:?} in {recovery}"))
    };
    let survivor_at = number_after("the survivor's step", "): step ") as u64;
    let reached = number_after("the reached step", "; reached step ") as u64;
    let resumed = number_after("the resumed step", "resumed from step ") as u64;
    let trained_again = number_after("the steps trained again", " on 2 workers (") as u64;
    let ranks_after = number_after("the ranks' time", "ranks after ");
    let training_after = number_after("the training time", "training again after ");
    assert!(recovery.contains(" steps trained again); "), "{recovery}");
    assert!(reached >= survivor_at && resumed <= survivor_at, "{recovery}");
    assert_eq!(trained_again, reached - resumed, "{recovery}");
    assert!(trained_again > 0, "killed between two saves: {recovery}");
    assert!(training_after >= ranks_after, "{recovery}");
    assert!(stdout.contains("job demo: completed at step 400/400"), "{stdout}");
}

#[test]
fn a_hung_worker_is_replaced_without_waiting_out_the_rings_timeout() {
    let root = tempfile::tempdir().unwrap();
    let data = demo_data(root.path());
    let job = job(root.path(), &data, 400, 10, "");
    let mut coordinator = job.coordinator();
    let mut workers = vec![job.worker(), job.worker()];
    let deadline = Instant::now() + Duration::from_secs(120);
    while job.status().is_none_or(|s| s["step"].as_u64() < Some(20)) {
        assert!(Instant::now() < deadline, "the job never trained");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Alive but silent (SIGSTOP): its peer blocks in the ring, which would wait 60 s.
    let hung = workers[1].id();
    Command::new("kill")
        .args(["-STOP", &hung.to_string()])
        .status()
        .unwrap();
    let stopped_at = Instant::now();
    workers.push(job.worker());
    let generation = |status: &serde_json::Value| status["generation"].as_u64().unwrap_or(0);
    let first = job.status().map_or(0, |s| generation(&s));
    loop {
        let status = job.status().expect("the coordinator answers");
        let resumed = status["restarts"]
            .as_array()
            .and_then(|r| r.last())
            .and_then(|r| r["resumed_step"].as_u64());
        if generation(&status) > first && resumed.is_some_and(|resumed| status["step"].as_u64() > Some(resumed)) {
            eprintln!(
                "hung worker to training again: {:.1} s",
                stopped_at.elapsed().as_secs_f64()
            );
            break;
        }
        // The heartbeat timeout (2 s) finds the hung worker; the ring is then interrupted.
        assert!(
            stopped_at.elapsed() < Duration::from_secs(30),
            "still not training: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    kill(&mut workers[1]);
    let exit = coordinator.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
    for worker in &mut workers {
        let _ = worker.wait();
    }
}
