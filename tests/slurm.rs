//! deploy/slurm/coca.sbatch on a real one-node Slurm cluster: munged,
//! slurmctld and slurmd (Debian's slurm-wlm and munge, installed by
//! scripts/test-deps.sh) started by the test with its own slurm.conf on
//! free ports, and stopped when it ends.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::free_port;

const DEMO: &str = include_str!("../deploy/local/demo.toml");

/// The daemons of a one-node cluster; killed on drop.
struct Cluster {
    dir: PathBuf,
    daemons: Vec<Child>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for daemon in &mut self.daemons {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
    }
}

fn short_hostname() -> String {
    let output = Command::new("hostname").arg("-s").output().expect("hostname");
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

fn daemon(program: &str, args: &[&str], dir: &Path, log: &str) -> Child {
    let log = std::fs::File::create(dir.join(log)).unwrap();
    Command::new(program)
        .args(args)
        .env("SLURM_CONF", dir.join("slurm.conf"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program} ({e}); run scripts/test-deps.sh"))
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        let host = short_hostname();
        let cpus = std::thread::available_parallelism().map_or(2, usize::from).max(2);
        for sub in ["state", "spool"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let key: Vec<u8> = (0..1024).map(|i| (i * 7919 % 251) as u8).collect();
        let key_file = dir.join("munge.key");
        std::fs::write(&key_file, key).unwrap();
        std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let d = dir.display();
        let config = format!(
            "ClusterName=cocatest\n\
             SlurmctldHost={host}(127.0.0.1)\n\
             SlurmUser=root\nSlurmdUser=root\n\
             AuthType=auth/munge\nAuthInfo=socket={d}/munge.sock\nCredType=cred/munge\n\
             SlurmctldPort={}\nSlurmdPort={}\n\
             StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\n\
             SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd.pid\n\
             ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
             SelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\n\
             ReturnToService=2\nMpiDefault=none\n\
             JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n\
             NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN\n\
             PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP\n",
            free_port(),
            free_port()
        );
        std::fs::write(dir.join("slurm.conf"), config).unwrap();
        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            daemons: Vec::new(),
        };
        let munge_args = [
            "--foreground".to_string(),
            "--force".into(),
            format!("--key-file={d}/munge.key"),
            format!("--socket={d}/munge.sock"),
            format!("--pid-file={d}/munged.pid"),
            format!("--log-file={d}/munged.log"),
            format!("--seed-file={d}/munged.seed"),
        ];
        let munge_args: Vec<&str> = munge_args.iter().map(String::as_str).collect();
        cluster.daemons.push(daemon("munged", &munge_args, dir, "munged.out"));
        cluster.wait_for("munge's socket", || dir.join("munge.sock").exists());
        cluster
            .daemons
            .push(daemon("slurmctld", &["-D", "-i"], dir, "slurmctld.out"));
        cluster
            .daemons
            .push(daemon("slurmd", &["-D", "-N", &host], dir, "slurmd.out"));
        cluster.wait_for("the node to be idle", || {
            cluster
                .command("sinfo")
                .args(["-h", "-o", "%T"])
                .output()
                .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "idle")
        });
        cluster
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.env("SLURM_CONF", self.dir.join("slurm.conf"));
        command
    }

    fn wait_for(&self, what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready() {
            assert!(
                Instant::now() < deadline,
                "the test cluster never got {what}; daemon logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn logs(&self) -> String {
        ["munged.out", "slurmctld.out", "slurmd.out"]
            .iter()
            .map(|name| {
                let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                format!("== {name}\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The demo manifest for a Slurm job of `steps` steps in `job_dir`.
fn slurm_job(job_dir: &Path, steps: u64) {
    std::fs::create_dir_all(job_dir).unwrap();
    // Workers find the coordinator on the first node's port 7070, whatever
    // address the hostname resolves to.
    let manifest = DEMO
        .replace("coordinator = \"127.0.0.1:7070\"", "coordinator = \"0.0.0.0:7070\"")
        .replace("bind = \"127.0.0.1:7071\"", "bind = \"127.0.0.1:0\"")
        .replace("steps = 300", &format!("steps = {steps}"))
        .replace("workers = 2", "workers = 1")
        .replace("heartbeat_timeout_ms = 10000", "heartbeat_timeout_ms = 3000");
    std::fs::write(job_dir.join("job.toml"), manifest).unwrap();
}

/// Submits deploy/slurm/coca.sbatch for the job in `job_dir` with two tasks.
fn sbatch(cluster: &Cluster, job_dir: &Path) -> Child {
    let logs = job_dir.join("logs");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/slurm/coca.sbatch");
    cluster
        .command("sbatch")
        .args(["--wait", "--ntasks=2", "--time=5"])
        .arg(format!("--chdir={}", job_dir.display()))
        .arg(format!(
            "--export=ALL,COCA={},COCA_LOGS={}",
            env!("CARGO_BIN_EXE_coca"),
            logs.display()
        ))
        .arg(&script)
        .arg("job.toml")
        .env_remove("COCA_JOB_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `sbatch --wait` to end; its status.
fn ended(cluster: &Cluster, mut sbatch: Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        if let Some(status) = sbatch.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = cluster.command("scancel").arg("--user=root").status();
            let _ = sbatch.kill();
            panic!("the Slurm job did not end in 240 s; daemon logs:\n{}", cluster.logs());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The `coca worker` process of Slurm task `task` whose working directory is `job_dir`.
fn worker_task(job_dir: &Path, task: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_worker = args.len() >= 2 && args[0].ends_with(b"/coca") && args[1] == b"worker";
        let procid = format!("SLURM_PROCID={task}");
        let is_task = environ.split(|&b| b == 0).any(|var| var == procid.as_bytes());
        (is_worker && is_task && cwd == job_dir).then_some(pid)
    })
}

#[test]
fn sbatch_runs_the_demo_with_two_worker_tasks_to_completion_and_restarts_a_killed_one() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(&dir.path().join("slurm"));
    let job_dir = dir.path().join("job");
    slurm_job(&job_dir, 12);
    let logs = job_dir.join("logs");
    let status = ended(&cluster, sbatch(&cluster, &job_dir));
    let read = |name: &str| std::fs::read_to_string(logs.join(name)).unwrap_or_else(|e| format!("({name}: {e})"));
    let all_logs = || {
        ["coordinator.log", "worker-0.log", "worker-1.log"]
            .map(|name| format!("== {name}\n{}", read(name)))
            .join("\n")
    };
    assert!(status.success(), "sbatch --wait failed: {status}\n{}", all_logs());

    // The manifest said one worker; the script made it the number of tasks.
    let coordinator = read("coordinator.log");
    assert!(
        coordinator.contains("job demo: completed at step 12/12"),
        "{}",
        all_logs()
    );
    // Each task's log is its own, and the task index became the rank.
    for task in 0..2 {
        let log = read(&format!("worker-{task}.log"));
        assert!(log.contains(&format!("task {task} of 2 from SLURM_PROCID")), "{log}");
        assert!(log.contains(&format!(": rank {task} of 2, steps 0..12")), "{log}");
        assert!(log.contains("worker: done at step 12"), "{log}");
    }
    // The coordinator's journal says how the job ended.
    let journal = std::fs::read_to_string(job_dir.join("runs/demo/journal.jsonl")).unwrap();
    let last_state = journal
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event.get("state").is_some())
        .last()
        .unwrap();
    assert_eq!(last_state["state"], "completed", "{journal}");

    // A worker task killed mid-job is started again in place, as rank 1 again.
    let healing = dir.path().join("healing");
    slurm_job(&healing, 400);
    let job = sbatch(&cluster, &healing);
    let deadline = Instant::now() + Duration::from_secs(120);
    let victim = loop {
        let log = std::fs::read_to_string(healing.join("logs/worker-1.log")).unwrap_or_default();
        if let Some(pid) = worker_task(&healing, 1).filter(|_| log.contains(": rank 1 of 2")) {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "task 1 never trained; daemon logs:\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    Command::new("kill").args(["-9", &victim.to_string()]).status().unwrap();
    let status = ended(&cluster, job);
    let read = |name: &str| std::fs::read_to_string(healing.join("logs").join(name)).unwrap_or_default();
    assert!(
        status.success(),
        "{status}\n{}\n{}",
        read("coordinator.log"),
        read("worker-1.log")
    );
    let worker = read("worker-1.log");
    assert!(
        worker.contains("coca: worker task 1 died (exit 137); starting it again"),
        "{worker}"
    );
    assert_eq!(worker.matches(": rank 1 of 2").count(), 2, "{worker}");
    assert!(read("coordinator.log").contains("job demo: completed at step 400/400"));
    drop(cluster);
}
