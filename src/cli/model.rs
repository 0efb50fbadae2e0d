//! `coca model info`: parameter counts per part.

use clap::Subcommand;
use contract::PoolerLayout;

use super::ModelArgs;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Parameter counts per part of a preset (with overrides).
    Info {
        #[command(flatten)]
        model: ModelArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

impl ModelCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            ModelCommand::Info { model, json } => {
                let config = model.resolve()?;
                let counts = config.param_counts();
                if json {
                    let report = serde_json::json!({
                        "preset": model.preset,
                        "config": config,
                        "parameters": counts,
                        "total": counts.total(),
                    });
                    println!("{}", serde_json::to_string_pretty(&report)?);
                    return Ok(());
                }
                let side = config.image_size / config.patch_size;
                let pooling = match config.pooler_layout {
                    PoolerLayout::Parallel => {
                        format!("1-query contrastive + {}-query caption pooler", config.caption_queries)
                    }
                    PoolerLayout::Shared => format!("one shared pooler of 1 + {} queries", config.caption_queries),
                };
                let rows = [
                    (
                        "image encoder",
                        counts.image_encoder,
                        format!(
                            "ViT {} layers x {}, {}x{} patches of {}px",
                            config.vision_layers, config.vision_width, side, side, config.patch_size
                        ),
                    ),
                    ("poolers", counts.poolers, pooling),
                    (
                        "unimodal decoder",
                        counts.unimodal,
                        format!(
                            "{} causal layers x {}, CLS appended",
                            config.unimodal_layers, config.text_width
                        ),
                    ),
                    (
                        "multimodal decoder",
                        counts.multimodal,
                        format!(
                            "{} layers x {} with cross-attention",
                            config.multimodal_layers, config.text_width
                        ),
                    ),
                    (
                        "embeddings",
                        counts.embeddings,
                        format!(
                            "vocab {}, context {}, {}",
                            config.vocab_size,
                            config.context_length,
                            if config.tie_embeddings { "tied" } else { "untied" }
                        ),
                    ),
                ];
                match config.architecture {
                    contract::Architecture::Paper => println!("CoCa `{}`", model.preset),
                    contract::Architecture::OpenClip => println!("CoCa `{}` (open_clip's layout)", model.preset),
                }
                for (part, count, detail) in rows {
                    println!("  {part:<19} {:>15}  {:>8}  {detail}", grouped(count), human(count));
                }
                println!(
                    "  {:<19} {:>15}  {:>8}",
                    "total",
                    grouped(counts.total()),
                    human(counts.total())
                );
                Ok(())
            }
        }
    }
}

/// 383123456 -> "383,123,456"
fn grouped(count: usize) -> String {
    let digits = count.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// 383123456 -> "383.1M"
fn human(count: usize) -> String {
    match count {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}
