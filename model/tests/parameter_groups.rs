//! Tower locking and layer-wise learning-rate decay, seen in the
//! parameters a few AdamW steps leave.

use burn::optim::AdamWConfig;
use collective::Solo;
use contract::Preset;
use model::backend::CpuTrain;
use model::loss::LossWeights;
use model::parameters::parameter_values;
use model::state::{tensor_index, Moments, StateLayout};
use model::train::contrastive::ContrastiveMode;
use model::train::parameter_groups::{ParameterGroups, TowerTraining};
use model::train::step::TrainStep;
use model::train::synthetic::synthetic_batch;
use model::CocaModel;

type B = CpuTrain;

fn model() -> CocaModel<B> {
    CocaModel::new(&Preset::Tiny.config(), 5, &Default::default())
}

/// Each parameter tensor's path and values, in visiting order.
fn tensors(model: &CocaModel<B>) -> Vec<(String, Vec<f32>)> {
    let (entries, _) = tensor_index(model, &Moments::Whole(Default::default()));
    let values = parameter_values(model);
    entries
        .into_iter()
        .map(|entry| {
            let at = entry.offset as usize;
            (entry.path.clone(), values[at..at + entry.len() as usize].to_vec())
        })
        .collect()
}

/// `steps` steps at learning rate 1e-3 without weight decay; the trained
/// model and the trainer.
fn train(groups: ParameterGroups, sharded: bool, steps: u64) -> (CocaModel<B>, TrainStep<B>) {
    let config = Preset::Tiny.config();
    // A tiny epsilon: AdamW's first update is then +-1 of the rate wherever
    // a gradient is not tiny.
    let optimizer = AdamWConfig::new().with_weight_decay(0.0).with_epsilon(1e-12);
    let mut trainer = TrainStep::new(&optimizer, LossWeights::default(), ContrastiveMode::Local)
        .with_parameter_groups(groups)
        .with_sharded_optimizer(sharded);
    let mut model = groups.lock(model());
    for step in 0..steps {
        let batch = synthetic_batch::<B>(&config, 4, 40 + step, &Default::default());
        model = trainer.step(model, &batch, 1e-3, &mut Solo).unwrap().0;
    }
    (model, trainer)
}

fn locked(unlocked_groups: usize) -> TowerTraining {
    TowerTraining {
        locked: true,
        unlocked_groups,
        ..TowerTraining::default()
    }
}

/// The image tower locked but its head, the text tower locked whole:
/// their parameters keep their bits, have no AdamW state, and everything
/// else trains; the sharded optimizer does the same bit for bit.
#[test]
fn locked_parameters_keep_their_bits_and_get_no_optimizer_state() {
    let groups = ParameterGroups {
        image: locked(1),
        text: locked(0),
    };
    let before = tensors(&model());
    let (mut trained, mut trainer) = train(groups, false, 2);
    let after = tensors(&trained);
    let is_locked = |path: &str| {
        let image_head = [
            "image_encoder.ln_final",
            "contrastive_pooler",
            "caption_pooler",
            "image_projection",
        ]
        .iter()
        .any(|prefix| path.starts_with(prefix));
        (path.starts_with("image_encoder.") && !image_head)
            || path.starts_with("text_embedding.")
            || path.starts_with("unimodal.")
    };
    let moments = trainer.moments(&trained, &mut Solo).unwrap();
    let layout = StateLayout::of(&trained, &moments);
    let mut counted = [0, 0];
    for (((path, was), (_, is)), entry) in before.iter().zip(&after).zip(&layout.tensors) {
        if is_locked(path) {
            assert!(was == is, "{path} is locked but changed");
            assert!(!entry.optimizer_state, "{path} is locked but has AdamW state");
            counted[0] += 1;
        } else {
            assert!(was != is, "{path} trains but did not change");
            assert!(entry.optimizer_state, "{path} trains but has no AdamW state");
            counted[1] += 1;
        }
    }
    assert!(counted[0] > 10 && counted[1] > 10, "{counted:?}");
    assert!(groups
        .describe(&trained)
        .contains(" parameters train; the gradient all-reduce moves"));

    let (sharded, _) = train(groups, true, 2);
    let bits = |values: Vec<f32>| values.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    assert!(bits(parameter_values(&sharded)) == bits(parameter_values(&trained)));
    trained = groups.lock(trained);
    assert_eq!(tensors(&trained), after, "locking changes no value");
}

/// Image layer decay 0.5 on one step: each group's largest update is the
/// rate times 0.5 per group below the head; the text tower and the rest at
/// the full rate. The sharded optimizer scales alike.
#[test]
fn layer_decay_scales_each_groups_learning_rate() {
    let groups = ParameterGroups {
        image: TowerTraining {
            layer_decay: 0.5,
            ..TowerTraining::default()
        },
        ..ParameterGroups::default()
    };
    let blocks = Preset::Tiny.config().vision_layers;
    let before = tensors(&model());
    for sharded in [false, true] {
        let (trained, _) = train(groups, sharded, 1);
        let largest_update = |wanted: &str| {
            let ((_, was), (_, is)) = before
                .iter()
                .zip(tensors(&trained))
                .find(|((path, _), _)| path == wanted)
                .unwrap_or_else(|| panic!("no tensor {wanted}"));
            was.iter()
                .zip(&is)
                .map(|(a, b)| f64::from((a - b).abs()))
                .fold(0.0, f64::max)
        };
        let mut expected = vec![
            (
                "image_encoder.patch_embedding.weight".to_string(),
                0.5f64.powi(blocks as i32 + 1),
            ),
            ("image_projection.weight".to_string(), 1.0),
            ("unimodal.blocks.0.mlp.fc.weight".to_string(), 1.0),
            ("multimodal.blocks.0.mlp.fc.weight".to_string(), 1.0),
        ];
        for block in 0..blocks {
            expected.push((
                format!("image_encoder.blocks.{block}.mlp.fc.weight"),
                0.5f64.powi((blocks - block) as i32),
            ));
        }
        for (path, scale) in expected {
            let update = largest_update(&path);
            let want = 1e-3 * scale;
            assert!(
                (update - want).abs() <= 1e-3 * want,
                "sharded {sharded}: {path} moved at most {update:e}, the decayed rate is {want:e}"
            );
        }
    }
}
