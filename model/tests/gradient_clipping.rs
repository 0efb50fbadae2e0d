//! The gradient norm a step reports, against one computed by hand from
//! the loss's own backward pass, and clipping to a smaller norm, seen in
//! AdamW's first moment (the update itself hides a scaled gradient).

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::AdamWConfig;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;
use collective::Solo;
use contract::Preset;
use model::backend::CpuTrain;
use model::loss::LossWeights;
use model::state::{read_range, StateLayout};
use model::train::contrastive::ContrastiveMode;
use model::train::step::TrainStep;
use model::train::synthetic::synthetic_batch;
use model::{CocaBatch, CocaModel};

type B = CpuTrain;

fn model() -> CocaModel<B> {
    CocaModel::new(&Preset::Tiny.config(), 5, &Default::default())
}

fn batch() -> CocaBatch<B> {
    synthetic_batch::<B>(&Preset::Tiny.config(), 4, 17, &Default::default())
}

/// Sum of the squared gradients of every parameter, in f64.
struct SquaredGradients<'a> {
    gradients: &'a <B as AutodiffBackend>::Gradients,
    sum: f64,
}

impl ModuleVisitor<B> for SquaredGradients<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let gradient = param.val().grad(self.gradients).expect("every parameter takes part");
        let values = gradient.into_data().convert::<f32>().to_vec::<f32>().unwrap();
        self.sum += values.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>();
    }
}

/// One step; returns the reported gradient norm and AdamW's first moments.
fn step(clip_norm: Option<f32>) -> (f32, Vec<f32>) {
    let mut trainer =
        TrainStep::new(&AdamWConfig::new(), LossWeights::default(), ContrastiveMode::Local).with_clip_norm(clip_norm);
    let (model, report) = trainer.step(model(), &batch(), 1e-3, &mut Solo).unwrap();
    let moments = trainer.moments(&model, &mut Solo).unwrap();
    let layout = StateLayout::of(&model, &moments);
    let first_moments = read_range(
        &model,
        &moments,
        layout.section_len,
        layout.section_len,
        2 * layout.section_len,
    );
    (report.gradient_norm, first_moments)
}

#[test]
fn the_reported_norm_is_the_losss_gradient_norm_and_clipping_scales_the_gradient_to_it() {
    let model = model();
    let gradients = model.losses(&batch(), LossWeights::default()).total.backward();
    let mut squares = SquaredGradients {
        gradients: &gradients,
        sum: 0.0,
    };
    model.visit(&mut squares);
    let by_hand = squares.sum.sqrt();

    let (norm, unclipped) = step(None);
    assert!(
        (f64::from(norm) - by_hand).abs() <= 1e-4 * by_hand,
        "reported {norm}, by hand {by_hand}"
    );
    // A limit above the norm changes nothing, bit for bit.
    let (_, above) = step(Some(norm * 2.0));
    assert!(above.iter().zip(&unclipped).all(|(a, b)| a.to_bits() == b.to_bits()));
    // A quarter of the norm: every first moment (0.1 x gradient) scales by a quarter.
    let (reported, clipped) = step(Some(norm / 4.0));
    assert_eq!(reported, norm, "the norm is reported before clipping");
    let factor = (norm / 4.0) / (norm + 1e-6);
    let scale = unclipped.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    for (clipped, unclipped) in clipped.iter().zip(&unclipped) {
        assert!(
            (clipped - unclipped * factor).abs() <= 1e-6 * scale,
            "{clipped} vs {} (x {factor})",
            unclipped * factor
        );
    }
}
