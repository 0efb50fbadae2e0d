//! CoCa's objective: lambda_con * contrastive + lambda_cap * captioning.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, ElementConversion, Int, Tensor};

/// The paper's weights: lambda_con = 1, lambda_cap = 2. A zero weight turns
/// its head off entirely (no forward, no gradient).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossWeights {
    pub contrastive: f32,
    pub captioning: f32,
}

impl Default for LossWeights {
    fn default() -> Self {
        Self {
            contrastive: 1.0,
            captioning: 2.0,
        }
    }
}

/// Which heads a forward pass computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub contrastive: bool,
    pub captioning: bool,
}

impl LossWeights {
    pub fn heads(&self) -> Heads {
        Heads {
            contrastive: self.contrastive != 0.0,
            captioning: self.captioning != 0.0,
        }
    }
}

/// The loss terms of one step; a term is absent when its weight is zero.
#[derive(Debug, Clone)]
pub struct Losses<B: Backend> {
    pub total: Tensor<B, 1>,
    pub contrastive: Option<Tensor<B, 1>>,
    pub captioning: Option<Tensor<B, 1>>,
}

impl LossWeights {
    pub fn combine<B: Backend>(
        &self,
        contrastive: Option<Tensor<B, 1>>,
        captioning: Option<Tensor<B, 1>>,
    ) -> Losses<B> {
        let weighted = [
            contrastive.clone().map(|loss| loss * self.contrastive),
            captioning.clone().map(|loss| loss * self.captioning),
        ];
        let total = weighted
            .into_iter()
            .flatten()
            .reduce(|a, b| a + b)
            .expect("at least one loss weight is non-zero");
        Losses {
            total,
            contrastive,
            captioning,
        }
    }
}

/// Symmetric InfoNCE (image->text and text->image cross-entropy, averaged).
///
/// Rows are this rank's samples (`image`, `text`: [rows, dim], normalised);
/// columns are the whole global batch (`image_columns`, `text_columns`:
/// [global, dim]), in which this rank's samples start at `first_row`. On one
/// rank the columns are the rows themselves and `first_row` is 0.
pub fn contrastive_loss<B: Backend>(
    image: Tensor<B, 2>,
    text: Tensor<B, 2>,
    image_columns: Tensor<B, 2>,
    text_columns: Tensor<B, 2>,
    first_row: usize,
    logit_scale: Tensor<B, 1>,
) -> Tensor<B, 1> {
    let [rows, _] = image.dims();
    let scale = logit_scale.reshape([1, 1]);
    let targets =
        Tensor::<B, 1, Int>::arange(first_row as i64..(first_row + rows) as i64, &image.device()).reshape([rows, 1]);
    let image_to_text = image.matmul(text_columns.transpose()) * scale.clone();
    let text_to_image = text.matmul(image_columns.transpose()) * scale;
    (cross_entropy(image_to_text, targets.clone()) + cross_entropy(text_to_image, targets)) / 2.0
}

/// Mean over rows of -log softmax(logits)[target]. `targets`: [rows, 1].
fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    log_softmax(logits, 1).gather(1, targets).mean().neg()
}

/// Next-token cross-entropy, averaged over the positions that are not
/// padding. `logits`: [batch, len, vocab] predicting `targets`: [batch, len];
/// `ignore`: [batch, len], true at padding.
pub fn captioning_loss<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    ignore: Tensor<B, 2, Bool>,
) -> Tensor<B, 1> {
    let count = ignore.clone().bool_not().int().sum().into_scalar().elem::<f32>();
    captioning_loss_sum(logits, targets, ignore) / count.max(1.0)
}

/// The summed next-token negative log-likelihood over positions that are not
/// padding; divide by the token count (local, or global across ranks).
pub fn captioning_loss_sum<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    ignore: Tensor<B, 2, Bool>,
) -> Tensor<B, 1> {
    let picked = log_softmax(logits, 2)
        .gather(2, targets.unsqueeze_dim(2))
        .squeeze_dim::<2>(2);
    (picked * ignore.bool_not().float()).sum().neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use burn::tensor::TensorData;

    fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<Cpu, D> {
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    fn scalar(t: Tensor<Cpu, 1>) -> f64 {
        t.into_scalar() as f64
    }

    #[test]
    fn contrastive_loss_matches_hand_computation() {
        // Two pairs; image i and text j have cosine similarity s_ij.
        let image = tensor(vec![1.0, 0.0, 0.0, 1.0], [2, 2]);
        let text = tensor(vec![0.6, 0.8, 0.0, 1.0], [2, 2]);
        let scale = tensor(vec![2.0], [1]);
        let loss = scalar(contrastive_loss(image.clone(), text.clone(), image, text, 0, scale));
        // logits = 2 * s: image->text rows [1.2, 0], [1.6, 2]; text->image rows [1.2, 1.6], [0, 2].
        let ce = |row: [f64; 2], target: usize| -(row[target] - (row[0].exp() + row[1].exp()).ln());
        let i2t = (ce([1.2, 0.0], 0) + ce([1.6, 2.0], 1)) / 2.0;
        let t2i = (ce([1.2, 1.6], 0) + ce([0.0, 2.0], 1)) / 2.0;
        assert!((loss - (i2t + t2i) / 2.0).abs() < 1e-6, "{loss}");
    }

    #[test]
    fn contrastive_rows_against_global_columns_equal_the_full_batch() {
        let image = tensor(vec![1.0, 0.0, 0.0, 1.0, 0.6, 0.8], [3, 2]);
        let text = tensor(vec![0.8, 0.6, 0.0, 1.0, -0.6, 0.8], [3, 2]);
        let scale = tensor(vec![3.0], [1]);
        let full = scalar(contrastive_loss(
            image.clone(),
            text.clone(),
            image.clone(),
            text.clone(),
            0,
            scale.clone(),
        ));
        // Rank 0 holds row 0, rank 1 holds rows 1..3; the mean of their
        // row-weighted losses is the full-batch loss.
        let rank0 = scalar(contrastive_loss(
            image.clone().narrow(0, 0, 1),
            text.clone().narrow(0, 0, 1),
            image.clone(),
            text.clone(),
            0,
            scale.clone(),
        ));
        let rank1 = scalar(contrastive_loss(
            image.clone().narrow(0, 1, 2),
            text.clone().narrow(0, 1, 2),
            image,
            text,
            1,
            scale,
        ));
        assert!((full - (rank0 + 2.0 * rank1) / 3.0).abs() < 1e-6);
    }

    #[test]
    fn captioning_loss_matches_hand_computation_and_ignores_padding() {
        // One sequence of 3 positions over a vocabulary of 2; the last is padding.
        let logits = tensor(vec![0.0, 1.0, 2.0, 0.0, 5.0, -5.0], [1, 3, 2]);
        let targets = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(vec![1i32, 0, 1], [1, 3]), &Default::default());
        let ignore =
            Tensor::<Cpu, 2, Bool>::from_bool(TensorData::new(vec![false, false, true], [1, 3]), &Default::default());
        let loss = scalar(captioning_loss(logits, targets, ignore));
        let nll = |a: f64, b: f64, target: f64| -(target - (a.exp() + b.exp()).ln());
        let expected = (nll(0.0, 1.0, 1.0) + nll(2.0, 0.0, 2.0)) / 2.0;
        assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
    }

    #[test]
    fn weights_combine_and_switch_heads() {
        let weights = LossWeights::default();
        let losses = weights.combine(Some(tensor(vec![0.5], [1])), Some(tensor(vec![0.25], [1])));
        assert!((scalar(losses.total) - 1.0).abs() < 1e-7);
        let clip = LossWeights {
            contrastive: 1.0,
            captioning: 0.0,
        };
        assert_eq!(
            clip.heads(),
            Heads {
                contrastive: true,
                captioning: false
            }
        );
        let simvlm = LossWeights {
            contrastive: 0.0,
            captioning: 1.0,
        };
        assert_eq!(
            simvlm.heads(),
            Heads {
                contrastive: false,
                captioning: true
            }
        );
    }
}
