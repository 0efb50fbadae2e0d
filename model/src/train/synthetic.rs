//! Seeded random batches of the model's shape, for benchmarks and tests
//! that need data but not a dataset.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use contract::ModelConfig;

use crate::CocaBatch;
use contract::rng::SplitMix64;
use datasets::patch_dropout::PatchDropout;

/// Token ids the synthetic captions use for padding, start and end.
pub const PAD: i32 = 0;
pub const BOS: i32 = 1;
pub const EOS: i32 = 2;

/// `batch` samples: uniform pixels in [-1, 1) and captions of random length
/// (at least half the context) of random tokens, framed by BOS/EOS and
/// right-padded.
pub fn synthetic_batch<B: Backend>(config: &ModelConfig, batch: usize, seed: u64, device: &B::Device) -> CocaBatch<B> {
    let mut rng = SplitMix64::new(seed);
    let pixels = batch * config.channels * config.image_size * config.image_size;
    let images: Vec<f32> = (0..pixels).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect();

    let context = config.context_length;
    let mut tokens = Vec::with_capacity(batch * context);
    for _ in 0..batch {
        let min_len = (context / 2).max(2);
        let len = min_len + (rng.next_u64() as usize) % (context - min_len + 1);
        tokens.push(BOS);
        for _ in 1..len - 1 {
            let id = 3 + rng.next_u64() % (config.vocab_size as u64 - 3);
            tokens.push(id as i32);
        }
        tokens.push(EOS);
        tokens.extend(std::iter::repeat_n(PAD, context - len));
    }
    let padding: Vec<bool> = tokens.iter().map(|&id| id == PAD).collect();
    let shape = [batch, context];
    CocaBatch {
        images: Tensor::from_data(
            TensorData::new(images, [batch, config.channels, config.image_size, config.image_size]),
            device,
        ),
        tokens: Tensor::<B, 2, Int>::from_data(TensorData::new(tokens, shape), device),
        padding: Tensor::<B, 2, Bool>::from_bool(TensorData::new(padding, shape), device),
        kept_patches: None,
    }
}

/// `batch` with each image keeping the patches `dropout` draws for it
/// (row `i` from `seed` and `i`), as the loader's batches do in training.
pub fn with_patch_dropout<B: Backend>(batch: CocaBatch<B>, dropout: PatchDropout, seed: u64) -> CocaBatch<B> {
    let [rows, ..] = batch.images.dims();
    let kept: Vec<i32> = (0..rows as u64)
        .flat_map(|row| dropout.kept_patches(SplitMix64::new(seed ^ row).next_u64()))
        .map(|patch| patch as i32)
        .collect();
    let device = batch.images.device();
    CocaBatch {
        kept_patches: Some(Tensor::from_data(TensorData::new(kept, [rows, dropout.kept]), &device)),
        ..batch
    }
}
