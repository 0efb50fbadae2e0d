//! `coca`: pretrain CoCa across many machines. The binary is a thin CLI over
//! the `proto`, `coordinator` and `worker` crates.

mod cli;

use clap::Parser;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::Cli::parse().run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the whole chain of causes on one line.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
