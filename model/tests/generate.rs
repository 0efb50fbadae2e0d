//! The cached decoder against the training forward, and the generation
//! strategies against each other.

use burn::tensor::{Bool, Int, Tensor, TensorData};
use contract::Preset;
use model::backend::Cpu;
use model::generate::{generate, Generation, Strategy};
use model::loss::Heads;
use model::train::synthetic::synthetic_batch;
use model::{CocaBatch, CocaModel};

type B = Cpu;

fn model() -> CocaModel<B> {
    CocaModel::<B>::new(&Preset::Tiny.config(), 5, &Default::default())
}

fn values(tensor: Tensor<B, 3>) -> Vec<f32> {
    tensor.into_data().convert::<f32>().into_vec().unwrap()
}

#[test]
fn the_cached_decoder_gives_the_training_forwards_logits() {
    let config = Preset::Tiny.config();
    let model = model();
    let device = Default::default();
    let batch = synthetic_batch::<B>(&config, 3, 11, &device);
    let [rows, len] = batch.tokens.dims();
    // Captions without padding: every position is a real token.
    let ids: Vec<i64> = (0..rows * len).map(|i| 3 + (i as i64 * 7) % 200).collect();
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [rows, len]), &device);
    let padding = Tensor::<B, 2, Bool>::from_bool(TensorData::new(vec![false; rows * len], [rows, len]), &device);
    let full = CocaBatch {
        images: batch.images.clone(),
        tokens: tokens.clone(),
        padding,
        kept_patches: None,
    };
    let heads = Heads {
        contrastive: false,
        captioning: true,
    };
    let expected = model.forward(&full, heads).caption_logits.unwrap();
    let vocab = expected.dims()[2];

    // One token at a time, then a block of three after one.
    let image_tokens = model.caption_image_tokens(batch.images.clone());
    let mut state = model.begin_decoding(image_tokens.clone());
    for t in 0..len - 1 {
        let logits = model.decode(tokens.clone().narrow(1, t, 1), &mut state);
        let want = values(expected.clone().narrow(1, t, 1));
        let got = values(logits);
        let worst = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(worst < 1e-5, "position {t}: logits differ by {worst}");
    }
    let mut state = model.begin_decoding(image_tokens);
    model.decode(tokens.clone().narrow(1, 0, 1), &mut state);
    let block = values(model.decode(tokens.narrow(1, 1, 3), &mut state));
    let want = values(expected.narrow(1, 1, 3));
    assert_eq!(block.len(), rows * 3 * vocab);
    let worst = want.iter().zip(&block).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(worst < 1e-5, "a block of three: logits differ by {worst}");
}

#[test]
fn beam_one_is_greedy_and_the_cache_changes_nothing() {
    let config = Preset::Tiny.config();
    let model = model();
    let batch = synthetic_batch::<B>(&config, 4, 3, &Default::default());
    let run = |strategy, cache, image: usize| {
        let tokens = model.caption_image_tokens(batch.images.clone().narrow(0, image, 1));
        let generation = Generation {
            cache,
            ..Generation::new(strategy, 12, 1, 2)
        };
        generate(&model, tokens, &generation)
    };
    for image in 0..4 {
        let greedy = run(Strategy::Greedy, true, image);
        assert!(!greedy.is_empty());
        assert_eq!(run(Strategy::Beam(1), true, image), greedy, "image {image}");
        assert_eq!(run(Strategy::Greedy, false, image), greedy, "image {image}");
        assert_eq!(
            run(Strategy::Beam(3), false, image),
            run(Strategy::Beam(3), true, image)
        );
        let sample = Strategy::Sample {
            temperature: 1.0,
            top_p: 0.9,
            top_k: None,
            seed: 7,
        };
        assert_eq!(
            run(sample, true, image),
            run(sample, true, image),
            "seeded sampling repeats"
        );
    }
}

/// open_clip's generation options, each against plain greedy decoding of a
/// fixed model with no `<eos>` (12 tokens, some repeated).
#[test]
fn each_generation_option_does_what_it_says() {
    let config = Preset::Tiny.config();
    let model = model();
    let images = synthetic_batch::<B>(&config, 1, 3, &Default::default()).images;
    let image_tokens = model.caption_image_tokens(images);
    let caption = |generation: Generation| generate(&model, image_tokens.clone(), &generation);
    let plain = Generation::new(Strategy::Greedy, 12, 1, u32::MAX);
    let greedy = caption(plain);
    assert_eq!(greedy.len(), 12);

    // A token first generated at `at`: a stop there keeps it and ends.
    let at = (2..greedy.len())
        .find(|&i| !greedy[..i].contains(&greedy[i]))
        .expect("a token new at some position");
    let stop = Generation {
        stop: Some(greedy[at]),
        ..plain
    };
    assert_eq!(caption(stop), greedy[..=at]);
    // As <eos> it ends the caption before it; a minimum length holds both off.
    let eos = Generation {
        eos: greedy[at],
        ..plain
    };
    assert_eq!(caption(eos), greedy[..at]);
    for ended in [eos, stop] {
        let long = caption(Generation {
            min_len: at + 3,
            ..ended
        });
        assert!(long.len() >= at + 3, "{long:?}");
        assert!(!long[..at + 3].contains(&greedy[at]), "{long:?}");
    }

    // A repetition penalty: fewer repeated tokens.
    let repeats = |tokens: &[u32]| tokens.len() - tokens.iter().collect::<std::collections::HashSet<_>>().len();
    let penalized = caption(Generation {
        repetition_penalty: 100.0,
        ..plain
    });
    assert!(repeats(&greedy) > 0, "{greedy:?}");
    assert!(
        repeats(&penalized) < repeats(&greedy),
        "{penalized:?} against {greedy:?}"
    );

    // Top-k: k = 1 is greedy at any temperature and seed; at a high
    // temperature k = 2 draws the first token from 2, without it from many.
    let sample = |top_k, seed| Generation {
        strategy: Strategy::Sample {
            temperature: 50.0,
            top_p: 1.0,
            top_k,
            seed,
        },
        ..plain
    };
    for seed in 0..3 {
        assert_eq!(caption(sample(Some(1), seed)), greedy, "seed {seed}");
    }
    let first_tokens = |top_k| {
        (0..24)
            .map(|seed| {
                caption(Generation {
                    max_len: 1,
                    ..sample(top_k, seed)
                })[0]
            })
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    assert_eq!(first_tokens(Some(2)), 2);
    assert!(first_tokens(None) > 10);
}
