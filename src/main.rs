//! `coca`: pretrain CoCa across many machines. The binary is a thin CLI over
//! the workspace's crates (README, "Architecture").

mod cli;

// glibc's malloc hands large buffers (decoded images, activations) back to
// the kernel and page-faults them in again on every use; mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

use std::process::ExitCode;

fn main() -> ExitCode {
    init_logging();
    match cli::Cli::parse().run() {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            // `{:#}` prints the whole chain of causes on one line.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr through `tracing`, `info` and above unless `RUST_LOG`
/// says otherwise (e.g. `RUST_LOG=coordinator=debug,info`). Set as the
/// global subscriber only: the `log` crate's logger stays free for the GPU
/// worker's kernel-compilation counter.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .finish();
    let _ = tracing::subscriber::set_global_default(subscriber);
}
