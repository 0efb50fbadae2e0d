//! `coca bench step`: median time of a full training step.

use std::time::Duration;

use clap::Subcommand;
use worker::bench::bench_step;

use super::ModelArgs;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Median ms per training step (forward, both losses, backward, AdamW)
    /// on synthetic data, on the CPU backend.
    Step {
        #[command(flatten)]
        model: ModelArgs,
        /// Samples per step.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Measured steps (the median is over these).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Unmeasured steps first.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

impl BenchCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            BenchCommand::Step {
                model,
                batch,
                steps,
                warmup,
                seed,
            } => {
                anyhow::ensure!(steps >= 1, "--steps must be at least 1");
                anyhow::ensure!(batch >= 1, "--batch must be at least 1");
                let config = model.resolve()?;
                let device = Default::default();
                let report = bench_step::<worker::backend::CpuTrain>(&config, batch, warmup, steps, seed, &device);
                let ms = |duration: Duration| duration.as_secs_f64() * 1e3;
                println!(
                    "bench step: preset {} batch {batch}, {steps} steps after {warmup} warm-up, {} threads (cpu)",
                    model.preset, report.threads
                );
                println!("  median step   {:8.1} ms", ms(report.median(|t| t.total())));
                println!("    forward     {:8.1} ms", ms(report.median(|t| t.forward)));
                println!("    backward    {:8.1} ms", ms(report.median(|t| t.backward)));
                println!("    optimizer   {:8.1} ms", ms(report.median(|t| t.optimizer)));
                let totals: Vec<f64> = report.steps.iter().map(|t| ms(t.total())).collect();
                let (min, max) = totals
                    .iter()
                    .fold((f64::MAX, 0f64), |(lo, hi), &t| (lo.min(t), hi.max(t)));
                println!("  min / max     {min:8.1} / {max:.1} ms");
                println!("  loss          {:.4} -> {:.4}", report.first_loss, report.last_loss);
                Ok(())
            }
        }
    }
}
