//! Which parameters train, and at what share of the learning rate: a
//! tower locked (open_clip's `--lock-image` / `--lock-text`, with its last
//! groups left trainable) and layer-wise learning-rate decay per tower.
//!
//! Each tower is a list of groups, as open_clip groups a tower it locks:
//! its stem (embeddings, and the image encoder's LayerNorm before the
//! blocks), one group per block, and its head (the final LayerNorm and what
//! turns the tower's output into embeddings: the image side's poolers and
//! projection, the text side's projection). The multimodal decoder, the
//! output projection and the logit scale belong to neither tower. Group
//! `g` of `G` trains at `decay^(G - 1 - g)` of the learning rate: the head
//! at the full rate, each group below it at `decay` times the one above.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use contract::manifest::Train;

use crate::parameters::parameter_layout;
use crate::CocaModel;

/// How one tower trains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TowerTraining {
    /// The tower's groups are locked, but the last `unlocked_groups`.
    pub locked: bool,
    pub unlocked_groups: usize,
    /// Each group's learning rate is this times the next one's; 1: off.
    pub layer_decay: f64,
}

impl Default for TowerTraining {
    fn default() -> Self {
        Self {
            locked: false,
            unlocked_groups: 0,
            layer_decay: 1.0,
        }
    }
}

/// How both towers train.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ParameterGroups {
    pub image: TowerTraining,
    pub text: TowerTraining,
}

/// Where a parameter sits: its tower's training, its group and the
/// tower's group count.
struct Place {
    tower: TowerTraining,
    group: usize,
    groups: usize,
}

impl ParameterGroups {
    /// The manifest's `[train]` locking and layer-decay fields.
    pub fn of(train: &Train) -> Self {
        Self {
            image: TowerTraining {
                locked: train.lock_image,
                unlocked_groups: train.lock_image_unlocked_groups,
                layer_decay: train.image_layer_decay,
            },
            text: TowerTraining {
                locked: train.lock_text,
                unlocked_groups: train.lock_text_unlocked_groups,
                layer_decay: train.text_layer_decay,
            },
        }
    }

    /// Whether every parameter trains at the full rate.
    pub fn is_plain(&self) -> bool {
        *self == Self::default()
    }

    fn place(&self, path: &str, image_blocks: usize, text_blocks: usize) -> Option<Place> {
        let block = |rest: &str| rest.split('.').next().and_then(|index| index.parse::<usize>().ok());
        let (tower, blocks, group) = if let Some(rest) = path.strip_prefix("image_encoder.") {
            let group = match rest.strip_prefix("blocks.") {
                Some(rest) => 1 + block(rest)?,
                None if rest.starts_with("ln_final") => image_blocks + 1,
                None => 0,
            };
            (self.image, image_blocks, group)
        } else if ["contrastive_pooler.", "caption_pooler.", "image_projection."]
            .iter()
            .any(|prefix| path.starts_with(prefix))
        {
            (self.image, image_blocks, image_blocks + 1)
        } else if path.starts_with("text_embedding.") || path == "unimodal.cls" {
            (self.text, text_blocks, 0)
        } else if let Some(rest) = path.strip_prefix("unimodal.") {
            let group = match rest.strip_prefix("blocks.") {
                Some(rest) => 1 + block(rest)?,
                None => text_blocks + 1,
            };
            (self.text, text_blocks, group)
        } else {
            return None;
        };
        Some(Place {
            tower,
            group,
            groups: blocks + 2,
        })
    }

    /// Per parameter tensor, in visiting order: its share of the learning
    /// rate, or `None` when it is locked.
    pub fn learning_rate_scales<B: Backend>(&self, model: &CocaModel<B>) -> Vec<Option<f64>> {
        let (image_blocks, text_blocks) = (model.image_encoder.blocks.len(), model.unimodal.blocks.len());
        parameter_layout(model)
            .iter()
            .map(|(path, _)| match self.place(path, image_blocks, text_blocks) {
                None => Some(1.0),
                Some(Place { tower, group, groups }) => {
                    let locked = tower.locked && group + tower.unlocked_groups < groups;
                    (!locked).then(|| tower.layer_decay.powi((groups - 1 - group) as i32))
                }
            })
            .collect()
    }

    /// `model` with its locked parameters out of the autodiff graph: they
    /// get no gradient, so no all-reduce traffic and no optimizer state.
    pub fn lock<B: AutodiffBackend>(&self, model: CocaModel<B>) -> CocaModel<B> {
        struct Lock<'a> {
            scales: std::slice::Iter<'a, Option<f64>>,
        }
        impl<B: AutodiffBackend> ModuleMapper<B> for Lock<'_> {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
                match self.scales.next() {
                    Some(None) => {
                        let (id, tensor, mapper) = param.consume();
                        Param::from_mapped_value(id, tensor.set_require_grad(false), mapper)
                    }
                    _ => param,
                }
            }
        }
        let scales = self.learning_rate_scales(&model);
        model.map(&mut Lock { scales: scales.iter() })
    }

    /// What trains, for the job's log: parameters trainable of all, and the
    /// bytes the gradient all-reduce moves each step.
    pub fn describe<B: Backend>(&self, model: &CocaModel<B>) -> String {
        let layout = parameter_layout(model);
        let scales = self.learning_rate_scales(model);
        let all: usize = layout.iter().map(|(_, size)| size).sum();
        let trainable: usize = layout
            .iter()
            .zip(&scales)
            .filter(|(_, scale)| scale.is_some())
            .map(|((_, size), _)| size)
            .sum();
        let mb = |elements: usize| (4 * elements) as f64 / 1e6;
        format!(
            "{trainable} of {all} parameters train; the gradient all-reduce moves {:.1} MB a step instead of {:.1} MB",
            mb(trainable),
            mb(all)
        )
    }
}
