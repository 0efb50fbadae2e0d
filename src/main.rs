//! `coca`: pretrain CoCa across many machines. The binary is a thin CLI over
//! the `proto`, `coordinator` and `worker` crates.

mod cli;

// glibc's malloc hands large buffers (decoded images, activations) back to
// the kernel and page-faults them in again on every use; mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::Cli::parse().run() {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            // `{:#}` prints the whole chain of causes on one line.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
