//! `coca kernels warm`: a job's kernel cache filled before its workers start.

use clap::Subcommand;
use contract::manifest::Overrides;

use super::job::read_manifest;

#[derive(Debug, Subcommand)]
pub enum KernelsCommand {
    /// Compile and tune a job's GPU kernels at its own shapes on this
    /// machine's GPU and share them in its kernel cache (gpu.kernel_cache),
    /// so that every worker of the job starts warm.
    Warm {
        manifest: std::path::PathBuf,
        #[command(flatten)]
        overrides: Overrides,
        /// The GPU ordinal.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// Training steps to run (the optimizer's kernels come in the second).
        #[arg(long, default_value_t = 3)]
        warm_steps: usize,
    },
}

impl KernelsCommand {
    pub fn run(self) -> anyhow::Result<()> {
        let KernelsCommand::Warm {
            manifest,
            overrides,
            device,
            warm_steps,
        } = self;
        let manifest = read_manifest(&manifest, &overrides)?;
        let warmed = worker::kernels::warm::warm(&manifest, device, warm_steps)?;
        let compiled = warmed
            .compiled
            .map_or("kernels not counted".into(), |n| format!("{n} kernels compiled"));
        println!(
            "kernels warm: {} for job {} ({} workers of {} samples): {} files there before, first step {:.1} s, {compiled}, {} files shared to {}",
            warmed.device,
            manifest.job.name,
            manifest.cluster.workers,
            manifest.train.global_batch / manifest.cluster.workers,
            warmed.fetched,
            warmed.first_step.as_secs_f64(),
            warmed.shared,
            manifest.gpu.kernel_cache
        );
        Ok(())
    }
}
