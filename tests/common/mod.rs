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
