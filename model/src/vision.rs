//! The ViT image encoder: patches -> linear embedding + learned positions ->
//! pre-LN transformer blocks -> final LayerNorm. open_clip's layout adds a
//! class token in front and a LayerNorm before the blocks.

use burn::module::{Module, Param};
use burn::nn::LayerNorm;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use contract::{Architecture, ModelConfig};

use super::block::{layer_norm, Block, BlockConfig, BlockStack, Straight};
use super::dense::Dense;
use super::init::{fan_in_std, Init};

#[derive(Module, Debug)]
pub struct VisionTransformer<B: Backend> {
    pub patch_embedding: Dense<B>,
    /// open_clip's class token, prepended to the patches.
    pub class_token: Option<Param<Tensor<B, 1>>>,
    pub position_embedding: Param<Tensor<B, 2>>,
    /// open_clip's LayerNorm before the blocks.
    pub ln_pre: Option<LayerNorm<B>>,
    pub blocks: Vec<Block<B>>,
    pub ln_final: LayerNorm<B>,
    pub patch_size: usize,
}

impl<B: Backend> VisionTransformer<B> {
    pub fn new(init: &Init<B>, config: &ModelConfig) -> Self {
        let patch_dim = config.channels * config.patch_size * config.patch_size;
        let width = config.vision_width;
        let open_clip = config.architecture == Architecture::OpenClip;
        Self {
            patch_embedding: init.linear("patch_embedding", patch_dim, width, fan_in_std(patch_dim), !open_clip),
            class_token: open_clip.then(|| init.normal("class_token", [width], 0.02)),
            position_embedding: init.normal("position_embedding", [config.image_positions(), width], 0.02),
            ln_pre: open_clip.then(|| init.layer_norm(width, config.layer_norm_eps)),
            blocks: (0..config.vision_layers)
                .map(|i| {
                    let init = init.child("blocks").child(i);
                    BlockConfig {
                        width,
                        heads: config.vision_heads,
                        mlp: config.vision_mlp,
                        layers: config.vision_layers,
                        eps: config.layer_norm_eps,
                        key_bias: config.key_bias(),
                    }
                    .init(&init)
                })
                .collect(),
            ln_final: init.layer_norm(width, config.layer_norm_eps),
            patch_size: config.patch_size,
        }
    }

    /// `images`: [batch, channels, height, width] -> tokens [batch, positions, vision_width].
    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 3> {
        self.forward_kept(images, None)
    }

    /// [`forward`](Self::forward) on the patches each image keeps (`kept`:
    /// [batch, kept], patch dropout in training), after their positions
    /// are added; a class token stays.
    pub fn forward_kept(&self, images: Tensor<B, 4>, kept: Option<&Tensor<B, 2, Int>>) -> Tensor<B, 3> {
        self.forward_with(images, kept, &mut Straight)
    }

    /// [`forward_kept`](Self::forward_kept), the blocks run by `stack`.
    pub fn forward_with(
        &self,
        images: Tensor<B, 4>,
        kept: Option<&Tensor<B, 2, Int>>,
        stack: &mut dyn BlockStack<B>,
    ) -> Tensor<B, 3> {
        let x = self.patch_embedding.forward(patchify(images, self.patch_size));
        let [batch, patches, width] = x.dims();
        let positions = self.position_embedding.val().cast(x.dtype());
        // open_clip's class token has the first position.
        let first_patch = usize::from(self.class_token.is_some());
        let mut x = x + positions.clone().narrow(0, first_patch, patches).unsqueeze::<3>();
        if let Some(kept) = kept {
            let [_, count] = kept.dims();
            x = x.gather(1, kept.clone().unsqueeze_dim::<3>(2).expand([batch, count, width]));
        }
        if let Some(token) = &self.class_token {
            let token = token.val().cast(x.dtype()).reshape([1, width]) + positions.narrow(0, 0, 1);
            x = Tensor::cat(vec![token.reshape([1, 1, width]).expand([batch, 1, width]), x], 1);
        }
        let x = match &self.ln_pre {
            Some(ln) => layer_norm(ln, x),
            None => x,
        };
        layer_norm(&self.ln_final, stack.run(&self.blocks, x, None))
    }
}

/// Non-overlapping p x p patches flattened channel-major, the same values a
/// stride-p convolution would see: [b, c, h, w] -> [b, (h/p)(w/p), c*p*p].
fn patchify<B: Backend>(images: Tensor<B, 4>, p: usize) -> Tensor<B, 3> {
    let [batch, channels, height, width] = images.dims();
    let (rows, cols) = (height / p, width / p);
    images
        .reshape([batch, channels, rows, p, cols, p])
        .permute([0, 2, 4, 1, 3, 5])
        .reshape([batch, rows * cols, channels * p * p])
}
