//! The CoCa model's contract on the CPU backend: shapes, loss modes,
//! causality, CLS masking, gradients, learning, parameter counts, seeding.

use burn::module::{Module, Param};
use burn::optim::AdamWConfig;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use collective::Solo;
use contract::{Architecture, ModelConfig, PoolerLayout, Preset};
use model::backend::{Cpu, CpuTrain};
use model::loss::{Heads, LossWeights};
use model::parameters::parameter_values;
use model::train::contrastive::ContrastiveMode;
use model::train::step::TrainStep;
use model::train::synthetic::{synthetic_batch, PAD};
use model::{CocaBatch, CocaModel};

const SEED: u64 = 17;

fn tiny() -> ModelConfig {
    Preset::Tiny.config()
}

fn values<const D: usize, B: Backend>(tensor: Tensor<B, D>) -> Vec<f32> {
    tensor.into_data().convert::<f32>().to_vec().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A batch from explicit token rows (PAD marks padding).
fn batch_with_tokens<B: Backend>(images: Tensor<B, 4>, rows: &[Vec<i32>]) -> CocaBatch<B> {
    let device = images.device();
    let len = rows[0].len();
    let flat: Vec<i32> = rows.concat();
    let padding: Vec<bool> = flat.iter().map(|&id| id == PAD).collect();
    CocaBatch {
        images,
        tokens: Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [rows.len(), len]), &device),
        padding: Tensor::<B, 2, Bool>::from_bool(TensorData::new(padding, [rows.len(), len]), &device),
        kept_patches: None,
    }
}

const BOTH: Heads = Heads {
    contrastive: true,
    captioning: true,
};

#[test]
fn every_part_has_the_expected_shape() {
    let config = tiny();
    let device = Default::default();
    let model = CocaModel::<Cpu>::new(&config, SEED, &device);
    let batch = synthetic_batch::<Cpu>(&config, 3, 1, &device);
    let (width, queries) = (config.vision_width, config.caption_queries);

    let image_tokens = model.image_encoder.forward(batch.images.clone());
    assert_eq!(image_tokens.dims(), [3, config.image_tokens(), width]);
    let contrastive = model.contrastive_pooler.as_ref().unwrap().forward(image_tokens.clone());
    assert_eq!(contrastive.dims(), [3, 1, width]);
    assert_eq!(model.caption_pooler.forward(image_tokens).dims(), [3, queries, width]);

    let embedded = model.text_embedding.forward(batch.tokens.clone());
    let unimodal = model.unimodal.forward(embedded, batch.padding.clone(), None);
    assert_eq!(unimodal.states.dims(), [3, config.context_length, config.text_width]);
    assert_eq!(unimodal.cls.dims(), [3, config.embed_dim]);

    let output = model.forward(&batch, BOTH);
    let logits = output.caption_logits.unwrap();
    assert_eq!(logits.dims(), [3, config.context_length - 1, config.vocab_size]);
    for embedding in [output.image_embedding.unwrap(), output.text_embedding.unwrap()] {
        assert_eq!(embedding.dims(), [3, config.embed_dim]);
        for norm in values(embedding.square().sum_dim(1).sqrt()) {
            assert!((norm - 1.0).abs() < 1e-5, "embedding norm {norm}");
        }
    }
    let scale = values(model.logit_scale())[0];
    assert!((scale - 1.0 / 0.07).abs() < 1e-3, "initial logit scale {scale}");
}

#[test]
fn shared_pooler_layout_splits_its_queries_between_the_heads() {
    let mut config = tiny();
    config.pooler_layout = PoolerLayout::Shared;
    let device = Default::default();
    let model = CocaModel::<Cpu>::new(&config, SEED, &device);
    assert!(model.contrastive_pooler.is_none());
    let batch = synthetic_batch::<Cpu>(&config, 2, 1, &device);
    let output = model.forward(&batch, BOTH);
    assert_eq!(output.image_embedding.unwrap().dims(), [2, config.embed_dim]);
    assert_eq!(
        output.caption_logits.unwrap().dims(),
        [2, config.context_length - 1, config.vocab_size]
    );
}

#[test]
fn the_three_loss_modes_compute_only_their_heads() {
    let config = tiny();
    let device = Default::default();
    let model = CocaModel::<Cpu>::new(&config, SEED, &device);
    let batch = synthetic_batch::<Cpu>(&config, 4, 2, &device);

    let coca = model.losses(&batch, LossWeights::default());
    let (con, cap) = (
        values(coca.contrastive.unwrap())[0],
        values(coca.captioning.unwrap())[0],
    );
    assert!((values(coca.total)[0] - (con + 2.0 * cap)).abs() < 1e-5);
    // Untrained: captioning near ln(vocab) (small logits, near-uniform).
    assert!(con.is_finite() && con > 0.0, "contrastive {con}");
    assert!((cap - (config.vocab_size as f32).ln()).abs() < 1.0, "captioning {cap}");

    let clip = LossWeights {
        contrastive: 1.0,
        captioning: 0.0,
    };
    let output = model.forward(&batch, clip.heads());
    assert!(output.caption_logits.is_none() && output.image_embedding.is_some());
    let losses = model.losses(&batch, clip);
    assert!(losses.captioning.is_none());
    assert_eq!(values(losses.total)[0], con);

    let simvlm = LossWeights {
        contrastive: 0.0,
        captioning: 1.0,
    };
    let output = model.forward(&batch, simvlm.heads());
    assert!(output.image_embedding.is_none() && output.text_embedding.is_none());
    let losses = model.losses(&batch, simvlm);
    assert!(losses.contrastive.is_none());
    assert_eq!(values(losses.total)[0], cap);
}

#[test]
fn changing_a_token_never_changes_earlier_positions() {
    let config = tiny();
    let device = Default::default();
    let model = CocaModel::<Cpu>::new(&config, SEED, &device);
    let batch = synthetic_batch::<Cpu>(&config, 2, 3, &device);
    let len = config.context_length;
    let tokens: Vec<i32> = values(batch.tokens.clone().float()).iter().map(|&t| t as i32).collect();
    let rows: Vec<Vec<i32>> = tokens
        .chunks(len)
        .map(|row| row.iter().map(|&t| t.max(5)).collect())
        .collect();
    let reference = batch_with_tokens(batch.images.clone(), &rows);
    let base = model.forward(&reference, BOTH).caption_logits.unwrap();
    let base_states = model
        .unimodal
        .forward(
            model.text_embedding.forward(reference.tokens.clone()),
            reference.padding.clone(),
            None,
        )
        .states;

    for t in [1, len / 2, len - 1] {
        let mut changed = rows.clone();
        for row in &mut changed {
            row[t] = (row[t] + 7) % config.vocab_size as i32;
            row[t] = row[t].max(3);
        }
        let changed = batch_with_tokens(batch.images.clone(), &changed);
        let logits = model.forward(&changed, BOTH).caption_logits.unwrap();
        let states = model
            .unimodal
            .forward(
                model.text_embedding.forward(changed.tokens.clone()),
                changed.padding.clone(),
                None,
            )
            .states;
        // Logit position p reads tokens 0..=p, so positions < t are untouched...
        let before = |x: Tensor<Cpu, 3>| values(x.narrow(1, 0, t));
        assert!(
            max_abs_diff(&before(logits.clone()), &before(base.clone())) < 1e-6,
            "multimodal leaks token {t}"
        );
        assert!(
            max_abs_diff(&before(states.clone()), &before(base_states.clone())) < 1e-6,
            "unimodal leaks token {t}"
        );
        // ...and position t itself does change (the test can fail).
        let at = |x: Tensor<Cpu, 3>| values(x.narrow(1, t, 1));
        assert!(max_abs_diff(&at(states), &at(base_states.clone())) > 1e-4);
        if t < len - 1 {
            assert!(max_abs_diff(&at(logits), &at(base.clone())) > 1e-4);
        }
    }
}

#[test]
fn padding_never_reaches_the_text_embedding() {
    let config = tiny();
    let device = Default::default();
    let model = CocaModel::<Cpu>::new(&config, SEED, &device);
    let images = synthetic_batch::<Cpu>(&config, 2, 4, &device).images;
    let text_embedding = |rows: &[Vec<i32>]| {
        let batch = batch_with_tokens(images.clone(), rows);
        values(model.forward(&batch, BOTH).text_embedding.unwrap())
    };
    let base = text_embedding(&[vec![1, 40, 41, 42, 2, 0, 0, 0], vec![1, 50, 2, 0, 0, 0, 0, 0]]);

    // More padding (a longer sequence) changes nothing.
    let longer = text_embedding(&[
        vec![1, 40, 41, 42, 2, 0, 0, 0, 0, 0, 0, 0],
        vec![1, 50, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ]);
    assert!(max_abs_diff(&base, &longer) < 1e-5, "{}", max_abs_diff(&base, &longer));

    // Different ids under the padding mask change nothing.
    let ids = |rows: &[Vec<i32>]| -> Vec<f32> {
        let mut batch = batch_with_tokens(
            images.clone(),
            &[vec![1, 40, 41, 42, 2, 0, 0, 0], vec![1, 50, 2, 0, 0, 0, 0, 0]],
        );
        batch.tokens = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(rows.concat(), [2, 8]), &device);
        values(model.forward(&batch, BOTH).text_embedding.unwrap())
    };
    let garbage = ids(&[vec![1, 40, 41, 42, 2, 9, 99, 300], vec![1, 50, 2, 7, 7, 7, 7, 7]]);
    assert!(max_abs_diff(&base, &garbage) < 1e-5);

    // A real token where padding was does change it (the test can fail).
    let extended = text_embedding(&[vec![1, 40, 41, 42, 43, 2, 0, 0], vec![1, 50, 2, 0, 0, 0, 0, 0]]);
    assert!(max_abs_diff(&base[..config.embed_dim], &extended[..config.embed_dim]) > 1e-4);
}

#[test]
fn same_seed_gives_bit_identical_parameters() {
    let config = tiny();
    let device = Default::default();
    let a = parameter_values(&CocaModel::<Cpu>::new(&config, SEED, &device));
    let b = parameter_values(&CocaModel::<Cpu>::new(&config, SEED, &device));
    let other = parameter_values(&CocaModel::<Cpu>::new(&config, SEED + 1, &device));
    assert_eq!(a.len(), b.len());
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    assert!(a.iter().zip(&other).filter(|(x, y)| x != y).count() > a.len() / 2);
}

#[test]
fn built_parameter_counts_equal_the_config_arithmetic() {
    let mut variants = vec![tiny(), Preset::Bench.config()];
    let mut shared = tiny();
    shared.pooler_layout = PoolerLayout::Shared;
    let mut tied = tiny();
    tied.tie_embeddings = true;
    let mut asymmetric = tiny();
    (asymmetric.vision_width, asymmetric.text_width, asymmetric.embed_dim) = (48, 32, 24);
    (
        asymmetric.unimodal_layers,
        asymmetric.multimodal_layers,
        asymmetric.channels,
    ) = (1, 3, 1);
    let mut open_clip = tiny();
    open_clip.architecture = Architecture::OpenClip;
    open_clip.pooler_layout = PoolerLayout::Shared;
    open_clip.vision_width = 48;
    open_clip.validate().unwrap();
    variants.extend([shared, tied, asymmetric, open_clip]);
    for config in variants {
        let model = CocaModel::<Cpu>::new(&config, SEED, &Default::default());
        assert_eq!(model.param_counts(), config.param_counts(), "{config:?}");
        assert_eq!(model.num_params(), config.param_counts().total());
    }
}

#[test]
fn gradients_match_finite_differences() {
    let config = tiny();
    let device = Default::default();
    let model = CocaModel::<CpuTrain>::new(&config, SEED, &device);
    let batch = synthetic_batch::<CpuTrain>(&config, 4, 5, &device);
    let weights = LossWeights::default();
    let loss = model.losses(&batch, weights).total;
    let gradients = loss.backward();

    // A few parameters from different parts of the model.
    let probes: Vec<(&str, Tensor<CpuTrain, 2>)> = vec![
        (
            "image_encoder.patch_embedding",
            model.image_encoder.patch_embedding.weight.val(),
        ),
        ("caption_pooler.queries", model.caption_pooler.queries.val()),
        ("unimodal.blocks.0.attn.q", model.unimodal.blocks[0].attn.q.weight.val()),
        (
            "multimodal.blocks.1.cross_attn.k",
            model.multimodal.blocks[1].cross_attn.k.weight.val(),
        ),
        ("image_projection", model.image_projection.weight.val()),
    ];
    let inner_batch = CocaBatch::<Cpu> {
        images: batch.images.clone().inner(),
        tokens: batch.tokens.clone().inner(),
        padding: batch.padding.clone().inner(),
        kept_patches: None,
    };
    for (name, param) in probes {
        let analytic = values(param.grad(&gradients).unwrap());
        // Check the three entries with the largest gradient: their
        // finite differences stand well above float rounding.
        let mut order: Vec<usize> = (0..analytic.len()).collect();
        order.sort_by(|&a, &b| analytic[b].abs().total_cmp(&analytic[a].abs()));
        for &index in &order[..3] {
            let eps = 1e-2;
            let perturbed = |delta: f32| {
                let inner = CocaModel::<Cpu>::new(&config, SEED, &device);
                let bumped = nudge(inner, name, index, delta);
                values(bumped.losses(&inner_batch, weights).total)[0] as f64
            };
            let (up, down) = (perturbed(eps), perturbed(-eps));
            let numeric = (up - down) / (2.0 * eps as f64);
            let exact = analytic[index] as f64;
            // The f32 loss rounds to a few ulps whatever the kernels' order
            // of summation (it differs between CPUs), which bounds what the
            // difference quotient can resolve: below that a gradient is noise.
            let resolution = 4.0 * f64::from(f32::EPSILON) * up.abs() / (2.0 * eps as f64);
            assert!(
                (numeric - exact).abs() < 0.05 * exact.abs().max(1e-3) + resolution,
                "{name}[{index}]: analytic {exact} vs numeric {numeric} (resolution {resolution:.1e})"
            );
        }
    }
}

/// Adds `delta` to one entry of the named 2-D parameter.
fn nudge(model: CocaModel<Cpu>, name: &str, index: usize, delta: f32) -> CocaModel<Cpu> {
    let bump = |param: Param<Tensor<Cpu, 2>>| {
        param.map(|tensor| {
            let shape = tensor.dims();
            let mut data = values(tensor.clone());
            data[index] += delta;
            Tensor::from_data(TensorData::new(data, shape), &tensor.device())
        })
    };
    let mut model = model;
    match name {
        "image_encoder.patch_embedding" => {
            model.image_encoder.patch_embedding.weight = bump(model.image_encoder.patch_embedding.weight)
        }
        "caption_pooler.queries" => model.caption_pooler.queries = bump(model.caption_pooler.queries),
        "unimodal.blocks.0.attn.q" => {
            model.unimodal.blocks[0].attn.q.weight = bump(model.unimodal.blocks[0].attn.q.weight.clone())
        }
        "multimodal.blocks.1.cross_attn.k" => {
            model.multimodal.blocks[1].cross_attn.k.weight =
                bump(model.multimodal.blocks[1].cross_attn.k.weight.clone())
        }
        "image_projection" => model.image_projection.weight = bump(model.image_projection.weight),
        other => panic!("no probe named {other}"),
    }
    model
}

#[test]
fn tiny_model_overfits_eight_pairs() {
    let config = tiny();
    let device = Default::default();
    let mut model = CocaModel::<CpuTrain>::new(&config, SEED, &device);
    let batch = synthetic_batch::<CpuTrain>(&config, 8, 6, &device);
    let mut trainer = TrainStep::new(&AdamWConfig::new(), LossWeights::default(), ContrastiveMode::Local);
    let mut losses = Vec::new();
    for _ in 0..150 {
        let (next, step) = trainer.step(model, &batch, 2e-3, &mut Solo).unwrap();
        model = next;
        losses.push(step.losses.total);
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last <= 0.1 * first, "loss went from {first} to {last}");
}

/// Mixed precision (bf16 towers, f32 parameters and optimizer) against f32,
/// over a few steps from the same start on the same batch.
#[test]
fn a_bf16_step_agrees_with_the_f32_step() {
    let config = tiny();
    let device = Default::default();
    let batch = synthetic_batch::<CpuTrain>(&config, 8, 6, &device);
    let run = |compute: burn::tensor::FloatDType| {
        let mut model = CocaModel::<CpuTrain>::new(&config, SEED, &device);
        let before = parameter_values(&model);
        let mut trainer =
            TrainStep::new(&AdamWConfig::new(), LossWeights::default(), ContrastiveMode::Local).with_compute(compute);
        let mut losses = Vec::new();
        for _ in 0..3 {
            let (next, step) = trainer.step(model, &batch, 1e-3, &mut Solo).unwrap();
            model = next;
            losses.push(step.losses.total);
        }
        let after = parameter_values(&model);
        // The parameters stay f32: the master copy is never rounded to bf16.
        let update: Vec<f32> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        (losses, update)
    };
    let (f32_losses, f32_update) = run(burn::tensor::FloatDType::F32);
    let (bf16_losses, bf16_update) = run(burn::tensor::FloatDType::BF16);
    // bf16 rounds each value by up to 2^-9 (0.2%); a loss averages many of
    // them, so it moves far less (0.06% measured). 0.5% is the tolerance.
    for (a, b) in f32_losses.iter().zip(&bf16_losses) {
        assert!(
            (a - b).abs() <= 0.005 * a.abs(),
            "f32 {f32_losses:?} vs bf16 {bf16_losses:?}"
        );
    }
    let dot: f32 = f32_update.iter().zip(&bf16_update).map(|(a, b)| a * b).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let cosine = dot / (norm(&f32_update) * norm(&bf16_update));
    // AdamW's early updates are about lr * sign(gradient): only gradients
    // near zero can flip under bf16 rounding (cosine 0.998 measured).
    assert!(cosine >= 0.99, "the bf16 update points elsewhere: cosine {cosine}");
}

/// Patch dropout gathers tokens after their positions are added: keeping
/// every patch in order is the plain forward bit for bit, keeping them in
/// reverse order reverses the output (the blocks do not see order but
/// through positions), a subset keeps as many tokens; open_clip's class
/// token stays in front.
#[test]
fn kept_patches_are_gathered_after_their_positions() {
    let device = Default::default();
    let open_clip = ModelConfig {
        architecture: Architecture::OpenClip,
        ..tiny()
    };
    for config in [tiny(), open_clip] {
        let model = CocaModel::<Cpu>::new(&config, SEED, &device);
        let images = synthetic_batch::<Cpu>(&config, 2, 1, &device).images;
        let patches = config.image_tokens();
        let class = config.image_positions() - patches;
        let indices = |order: Vec<i32>| {
            let count = order.len();
            let rows = [order.clone(), order].concat();
            Tensor::<Cpu, 2, Int>::from_data(TensorData::new(rows, [2, count]), &device)
        };
        let plain = model.image_encoder.forward(images.clone());
        let all = model
            .image_encoder
            .forward_kept(images.clone(), Some(&indices((0..patches as i32).collect())));
        assert_eq!(values(all), values(plain.clone()), "every patch in order");
        let reversed = model
            .image_encoder
            .forward_kept(images.clone(), Some(&indices((0..patches as i32).rev().collect())));
        let flipped = plain.clone().narrow(1, class, patches).flip([1]);
        let expected = match class {
            0 => flipped,
            _ => Tensor::cat(vec![plain.clone().narrow(1, 0, class), flipped], 1),
        };
        assert!(max_abs_diff(&values(reversed), &values(expected)) < 1e-4, "reversed");
        let half = model
            .image_encoder
            .forward_kept(images, Some(&indices((0..patches as i32).step_by(2).collect())));
        assert_eq!(half.dims(), [2, class + patches.div_ceil(2), config.vision_width]);
    }
}
