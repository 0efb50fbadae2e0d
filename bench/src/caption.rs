//! Caption generation with and without the key/value cache (`coca bench caption`).

use std::time::Instant;

use contract::ModelConfig;
use model::train::synthetic::synthetic_batch;
use model::CocaModel;

/// Seconds to generate one caption of exactly `max_len` tokens with
/// `beams` beams: (with the key/value cache, recomputing the prefix).
pub fn bench_caption<B: burn::tensor::backend::Backend>(
    config: &ModelConfig,
    beams: usize,
    max_len: usize,
) -> (f64, f64) {
    use model::generate::{generate, Generation, Strategy};
    let device = Default::default();
    let model = CocaModel::<B>::new(config, 0, &device);
    let images = synthetic_batch::<B>(config, 1, 0, &device).images;
    let image_tokens = model.caption_image_tokens(images);
    let time = |cache: bool| {
        let strategy = if beams > 1 {
            Strategy::Beam(beams)
        } else {
            Strategy::Greedy
        };
        // No token ends the caption: every run generates max_len tokens.
        let generation = Generation {
            cache,
            ..Generation::new(strategy, max_len, 1, u32::MAX)
        };
        let started = Instant::now();
        let tokens = generate(&model, image_tokens.clone(), &generation);
        assert_eq!(tokens.len(), max_len.min(config.context_length - 1));
        started.elapsed().as_secs_f64()
    };
    // One unmeasured run of each warms the allocator and kernels.
    time(true);
    time(false);
    (time(true), time(false))
}
