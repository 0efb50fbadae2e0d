//! The contrastive loss over the global batch, across ranks.
//!
//! The loss is computed on its own small autodiff graph whose leaves are
//! this rank's embeddings (and the logit scale); the gradients it returns
//! are then pushed through the towers in the one backward pass of the step.
//! This is what an all-gather with a gradient-returning backward computes,
//! without needing a collective inside burn's autodiff.

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor, TensorData};

use crate::logit_scale_from;
use crate::loss::contrastive_loss;
use collective::{Collective, CollectiveError};

/// How the contrastive negatives span the global batch of N samples over
/// ranks of B rows each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContrastiveMode {
    /// Each rank scores its own rows against every column of the global
    /// batch (open_clip's `--local-loss --gather-with-grad`): B x N logits
    /// and O(B N) memory per rank; column gradients are summed across ranks
    /// and each rank keeps those of its own samples. Scales; the default.
    #[default]
    Local,
    /// Every rank computes the whole N x N logits matrix, its gathered copy
    /// of its own rows replaced by the rows with gradient: O(N^2) compute and
    /// memory per rank, no gradient exchange. A reference for `Local`.
    Full,
}

impl From<contract::manifest::Contrastive> for ContrastiveMode {
    fn from(contrastive: contract::manifest::Contrastive) -> Self {
        match contrastive {
            contract::manifest::Contrastive::Local => Self::Local,
            contract::manifest::Contrastive::Full => Self::Full,
        }
    }
}

/// What the contrastive loss hands back to the step, already multiplied
/// by its loss weight, on the inner (non-autodiff) backend.
pub struct ContrastiveGradients<B: AutodiffBackend> {
    /// The loss over the global batch (unweighted), equal on every rank.
    pub loss: f32,
    /// d loss / d this rank's image embeddings, such that the mean of the
    /// parameter gradients over ranks is the global gradient.
    pub image: Tensor<B::InnerBackend, 2>,
    pub text: Tensor<B::InnerBackend, 2>,
    /// d loss / d raw logit scale, with the same convention.
    pub logit_scale: Tensor<B::InnerBackend, 1>,
}

/// `image`, `text`: this rank's normalised embeddings [rows, dim]; every
/// rank holds the same number of rows, ranks in sample order.
/// `raw_logit_scale`: the logit scale parameter's value.
///
/// One function on purpose (about 90 lines): the forward and its
/// hand-written backward share every intermediate and read best side by side.
pub fn contrastive_gradients<B: AutodiffBackend>(
    image: Tensor<B, 2>,
    text: Tensor<B, 2>,
    raw_logit_scale: Tensor<B, 1>,
    weight: f32,
    mode: ContrastiveMode,
    collective: &mut dyn Collective,
) -> Result<ContrastiveGradients<B>, CollectiveError> {
    let (rank, world) = (collective.rank(), collective.world_size());
    let [rows, dim] = image.dims();
    let device = image.device();
    let image = image.detach().require_grad();
    let text = text.detach().require_grad();
    let raw_logit_scale = raw_logit_scale.detach().require_grad();
    let scale = logit_scale_from(raw_logit_scale.clone());

    let mut gather = |local: &Tensor<B, 2>| -> Result<Tensor<B, 2>, CollectiveError> {
        let all = collective.all_gather(&values(local.clone()))?;
        Ok(Tensor::from_data(TensorData::new(all, [rows * world, dim]), &device))
    };
    let (image_all, text_all) = (gather(&image)?, gather(&text)?);

    match mode {
        ContrastiveMode::Local => {
            let image_columns = image_all.require_grad();
            let text_columns = text_all.require_grad();
            let loss = contrastive_loss(
                image.clone(),
                text.clone(),
                image_columns.clone(),
                text_columns.clone(),
                rank * rows,
                scale,
            );
            let gradients = (loss.clone() * weight).backward();
            // Every rank's loss has a column for each of this rank's samples.
            let mut own_columns = |columns: &Tensor<B, 2>| -> Result<Tensor<B::InnerBackend, 2>, CollectiveError> {
                let mut summed = values(columns.grad(&gradients).expect("columns take part in the loss"));
                collective.all_reduce_sum(&mut summed)?;
                let own = summed[rank * rows * dim..(rank + 1) * rows * dim].to_vec();
                Ok(Tensor::from_data(TensorData::new(own, [rows, dim]), &device))
            };
            let image_columns = own_columns(&image_columns)?;
            let text_columns = own_columns(&text_columns)?;
            let mut loss_value = [loss.into_scalar().elem::<f32>()];
            collective.all_reduce_mean(&mut loss_value)?;
            Ok(ContrastiveGradients {
                loss: loss_value[0],
                image: image.grad(&gradients).expect("rows take part in the loss") + image_columns,
                text: text.grad(&gradients).expect("rows take part in the loss") + text_columns,
                logit_scale: raw_logit_scale
                    .grad(&gradients)
                    .expect("the scale takes part in the loss"),
            })
        }
        ContrastiveMode::Full => {
            let splice = |all: Tensor<B, 2>, own: Tensor<B, 2>| {
                let mut parts = Vec::with_capacity(3);
                if rank > 0 {
                    parts.push(all.clone().narrow(0, 0, rank * rows));
                }
                parts.push(own);
                if rank + 1 < world {
                    parts.push(all.narrow(0, (rank + 1) * rows, (world - rank - 1) * rows));
                }
                Tensor::cat(parts, 0)
            };
            let image_global = splice(image_all, image.clone());
            let text_global = splice(text_all, text.clone());
            let loss = contrastive_loss(
                image_global.clone(),
                text_global.clone(),
                image_global,
                text_global,
                0,
                scale,
            );
            let gradients = (loss.clone() * weight).backward();
            // Each rank holds the gradient of the global loss for its own rows
            // only; the mean over ranks that follows must come out as the sum.
            let spread = world as f32;
            Ok(ContrastiveGradients {
                loss: loss.into_scalar().elem::<f32>(),
                image: image.grad(&gradients).expect("rows take part in the loss") * spread,
                text: text.grad(&gradients).expect("rows take part in the loss") * spread,
                logit_scale: raw_logit_scale
                    .grad(&gradients)
                    .expect("the scale takes part in the loss"),
            })
        }
    }
}

fn values<B: burn::tensor::backend::Backend, const D: usize>(tensor: Tensor<B, D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 data after convert")
}
