//! Where a training step's time goes, part by part: each part of the
//! network run forward and backward on its own, its inputs cut from the
//! graph (`coca bench step --profile`). The parts' times add up to about a
//! step's forward and backward; what they leave out is the step's
//! bookkeeping (the gradient all-reduce, AdamW).

use std::time::{Duration, Instant};

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

use crate::loss::{captioning_loss, contrastive_loss, Heads};
use crate::{l2_normalize, CocaBatch, CocaModel};

/// One part's median times.
#[derive(Debug, Clone, PartialEq)]
pub struct PartTiming {
    pub part: &'static str,
    pub forward: Duration,
    pub backward: Duration,
}

/// A tensor as a new leaf of the graph: what a part receives from the one
/// before it, without the earlier parts' backward.
fn leaf<B: AutodiffBackend, const D: usize>(tensor: Tensor<B, D>) -> Tensor<B, D> {
    Tensor::from_inner(tensor.inner()).require_grad()
}

/// A scalar whose gradient with respect to `output` is all ones: a part's
/// backward costs the same whatever gradient reaches it.
fn against<B: AutodiffBackend, const D: usize>(output: Tensor<B, D>) -> Tensor<B, 1> {
    output.sum()
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Times `part` (forward to a scalar, then its backward) `repeats` times.
fn time<B: AutodiffBackend>(
    name: &'static str,
    repeats: usize,
    device: &B::Device,
    part: impl Fn() -> Tensor<B, 1>,
) -> PartTiming {
    let (mut forwards, mut backwards) = (Vec::new(), Vec::new());
    for _ in 0..repeats.max(1) {
        let started = Instant::now();
        let scalar = part();
        let _ = B::sync(device);
        let forward_done = Instant::now();
        let _ = scalar.backward();
        let _ = B::sync(device);
        forwards.push(forward_done - started);
        backwards.push(forward_done.elapsed());
    }
    PartTiming {
        part: name,
        forward: median(forwards),
        backward: median(backwards),
    }
}

/// The median forward and backward time of each part of `model` on
/// `batch`, over `repeats` runs.
pub fn profile_parts<B: AutodiffBackend>(model: &CocaModel<B>, batch: &CocaBatch<B>, repeats: usize) -> Vec<PartTiming>
where
    CocaModel<B>: AutodiffModule<B>,
{
    let device = batch.images.device();
    let both = Heads {
        contrastive: true,
        captioning: true,
    };
    // Each part's inputs, computed once without a graph.
    let image_tokens = model
        .image_encoder
        .forward_kept(batch.images.clone(), batch.kept_patches.as_ref())
        .detach();
    let (contrastive_token, caption_tokens) = model.pool(image_tokens.clone(), both);
    let (contrastive_token, caption_tokens) = (
        contrastive_token.expect("asked for").detach(),
        caption_tokens.expect("asked for").detach(),
    );
    let cls_position = model.cls_position(&batch.tokens);
    let embedded = model.text_embedding.forward(batch.tokens.clone());
    let unimodal = model
        .unimodal
        .forward(embedded, batch.padding.clone(), cls_position.clone());
    let [_, len, _] = unimodal.states.dims();
    let states = unimodal.states.narrow(1, 0, len - 1).detach();
    let text = l2_normalize(unimodal.cls).detach();
    let [rows, _, width] = contrastive_token.dims();
    let image = l2_normalize(
        model
            .image_projection
            .forward(contrastive_token.clone().reshape([rows, width])),
    )
    .detach();
    let logits = model
        .vocab_projection
        .forward(
            model.multimodal.forward(states.clone(), caption_tokens.clone()),
            model.text_embedding.token.val(),
        )
        .detach();

    vec![
        time("image encoder", repeats, &device, || {
            against(
                model
                    .image_encoder
                    .forward_kept(leaf(batch.images.clone()), batch.kept_patches.as_ref()),
            )
        }),
        time("poolers, image projection", repeats, &device, || {
            let (token, caption) = model.pool(leaf(image_tokens.clone()), both);
            let token = token.expect("asked for");
            let [rows, _, width] = token.dims();
            against(model.image_projection.forward(token.reshape([rows, width]))) + against(caption.expect("asked for"))
        }),
        time("text embedding, unimodal decoder", repeats, &device, || {
            let embedded = model.text_embedding.forward(batch.tokens.clone());
            let out = model
                .unimodal
                .forward(embedded, batch.padding.clone(), cls_position.clone());
            against(out.states) + against(out.cls)
        }),
        time("multimodal decoder", repeats, &device, || {
            against(
                model
                    .multimodal
                    .forward(leaf(states.clone()), leaf(caption_tokens.clone())),
            )
        }),
        time("vocabulary projection", repeats, &device, || {
            // The decoder's output has the shape of its input states.
            against(
                model
                    .vocab_projection
                    .forward(leaf(states.clone()), model.text_embedding.token.val()),
            )
        }),
        time("losses", repeats, &device, || {
            let (image, text) = (leaf(image.clone()), leaf(text.clone()));
            let contrastive = contrastive_loss(image.clone(), text.clone(), image, text, 0, model.logit_scale());
            let [_, len] = batch.tokens.dims();
            let captioning = captioning_loss(
                leaf(logits.clone()),
                batch.tokens.clone().narrow(1, 1, len - 1),
                batch.padding.clone().narrow(1, 1, len - 1),
            );
            contrastive + captioning * 2.0
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuTrain;
    use crate::train::synthetic::synthetic_batch;
    use contract::Preset;

    #[test]
    fn every_part_is_timed_forward_and_backward() {
        let config = Preset::Tiny.config();
        let device = Default::default();
        let model = CocaModel::<CpuTrain>::new(&config, 1, &device);
        let batch = synthetic_batch::<CpuTrain>(&config, 4, 1, &device);
        let parts = profile_parts(&model, &batch, 1);
        let names: Vec<&str> = parts.iter().map(|p| p.part).collect();
        assert_eq!(
            names,
            [
                "image encoder",
                "poolers, image projection",
                "text embedding, unimodal decoder",
                "multimodal decoder",
                "vocabulary projection",
                "losses"
            ]
        );
        assert!(parts
            .iter()
            .all(|p| p.forward > Duration::ZERO && p.backward > Duration::ZERO));
    }
}
