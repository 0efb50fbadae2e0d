//! Worker processes on this machine, as `coca launch` runs them: started in
//! their own process group (a Ctrl-C reaches the launcher, which stops the
//! job cleanly), watched for an early death, replaced when one dies while
//! the job heals, reaped at the end.

use std::net::IpAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use proto::auth::Token;

pub struct LocalWorkers {
    children: Vec<Child>,
    program: std::path::PathBuf,
    args: Vec<String>,
    token_env: String,
    token: Token,
}

impl LocalWorkers {
    /// Starts `count` `<program> worker` processes against the coordinator
    /// at `coordinator` (its gRPC URL; an https one verified against `ca`),
    /// the token in `token_env`.
    pub fn spawn(
        program: &Path,
        count: usize,
        coordinator: &str,
        ca: Option<&str>,
        listen: IpAddr,
        token_env: &str,
        token: &Token,
    ) -> std::io::Result<Self> {
        let mut workers = Self {
            children: Vec::with_capacity(count),
            program: program.to_path_buf(),
            // The machine's cores shared out: workers that each spread every
            // op over all of them only get in each other's way.
            args: [
                "worker",
                "--coordinator",
                coordinator,
                "--listen",
                &listen.to_string(),
                "--cores",
                &(std::thread::available_parallelism().map_or(1, |n| n.get()) / count.max(1))
                    .max(1)
                    .to_string(),
            ]
            .map(String::from)
            .into_iter()
            .chain(ca.into_iter().flat_map(|ca| ["--ca".to_string(), ca.to_string()]))
            .collect(),
            token_env: token_env.to_string(),
            token: token.clone(),
        };
        for _ in 0..count {
            let child = workers.start()?;
            workers.children.push(child);
        }
        Ok(workers)
    }

    fn start(&self) -> std::io::Result<Child> {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .env(&self.token_env, self.token.secret())
            .env("COCA_TOKEN_ENV", &self.token_env);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        command.spawn()
    }

    /// Starts a new worker process in place of process `index` (which has exited).
    pub fn replace(&mut self, index: usize) -> std::io::Result<()> {
        let child = self.start()?;
        let mut old = std::mem::replace(&mut self.children[index], child);
        let _ = old.wait();
        Ok(())
    }

    /// The first worker process that has exited unsuccessfully: its index and status.
    pub fn failed(&mut self) -> Option<(usize, ExitStatus)> {
        self.children
            .iter_mut()
            .enumerate()
            .find_map(|(i, child)| match child.try_wait() {
                Ok(Some(status)) if !status.success() => Some((i, status)),
                _ => None,
            })
    }

    /// Waits up to `grace` for the workers to end by themselves (they do
    /// once the job has), then kills what is left.
    pub fn reap(mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        for child in &mut self.children {
            while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
