//! The manifest's `[eval]`: zero-shot and retrieval on held-out data every
//! N steps during training, on rank 0; results travel with the step's
//! metrics to /status and /metrics.

use burn::tensor::backend::Backend;
use contract::manifest::Eval;
use contract::ModelConfig;

use super::tasks::{retrieval, zero_shot, EvalError, Labelled};
use crate::inference::Loaded;
use crate::CocaModel;
use datasets::dataset::Dataset;
use datasets::prompt::PromptTemplates;
use datasets::tokenizer::TextTokenizer;

pub struct PeriodicEval {
    every: u64,
    limit: u64,
    zeroshot: Option<(Dataset, PromptTemplates)>,
    retrieval: Option<Dataset>,
    config: ModelConfig,
    /// Lent to each evaluation's `Loaded`, then taken back.
    tokenizer: Option<TextTokenizer>,
}

impl PeriodicEval {
    pub fn new(
        eval: &Eval,
        zeroshot: Option<(Dataset, PromptTemplates)>,
        retrieval: Option<Dataset>,
        config: ModelConfig,
        tokenizer: TextTokenizer,
    ) -> Self {
        Self {
            every: eval.every,
            limit: eval.limit,
            zeroshot,
            retrieval,
            config,
            tokenizer: Some(tokenizer),
        }
    }

    pub fn due(&self, step: u64, total: u64) -> bool {
        step % self.every == 0 || step == total
    }

    /// Named results, e.g. `zeroshot_top1`, `retrieval_image_to_text_r1`.
    pub fn run<B: Backend>(&mut self, model: CocaModel<B>, step: u64) -> Result<Vec<(String, f64)>, EvalError> {
        let loaded = Loaded {
            model,
            config: self.config.clone(),
            tokenizer: self
                .tokenizer
                .take()
                .expect("the tokenizer is back after each evaluation"),
            step,
            origin: format!("step {step}"),
        };
        let quiet = |_: u64| {};
        let mut results = Vec::new();
        let mut outcome = Ok(());
        if let Some((dataset, templates)) = &self.zeroshot {
            match zero_shot(
                &loaded,
                Labelled::Dataset(dataset),
                templates,
                64,
                Some(self.limit),
                &quiet,
            ) {
                Ok(report) => {
                    results.push(("zeroshot_top1".to_string(), report.top1));
                    results.push(("zeroshot_top5".to_string(), report.top5));
                }
                Err(error) => outcome = Err(error),
            }
        }
        if let (Some(dataset), Ok(())) = (&self.retrieval, &outcome) {
            match retrieval(&loaded, dataset, 64, Some(self.limit), &quiet) {
                Ok(report) => {
                    for (direction, recalls) in [
                        ("image_to_text", report.image_to_text),
                        ("text_to_image", report.text_to_image),
                    ] {
                        for (k, recall) in [1, 5, 10].into_iter().zip(recalls) {
                            results.push((format!("retrieval_{direction}_r{k}"), recall));
                        }
                    }
                }
                Err(error) => outcome = Err(error),
            }
        }
        self.tokenizer = Some(loaded.tokenizer);
        outcome.map(|()| results)
    }
}
