//! The unimodal text decoder: token and position embeddings, causal
//! self-attention blocks, and a learned CLS token appended at the end whose
//! output is the text embedding.

use burn::module::{Module, Param};
use burn::nn::LayerNorm;
use burn::tensor::backend::Backend;
use burn::tensor::module::embedding;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use contract::{Architecture, ModelConfig};

use super::attention::causal_padding_bias;
use super::block::{layer_norm, Block, BlockConfig, BlockStack, Straight};
use super::dense::Dense;
use super::init::{fan_in_std, Init};

/// Token and position embeddings; the token table doubles as the
/// vocabulary projection when embeddings are tied.
#[derive(Module, Debug)]
pub struct TextEmbedding<B: Backend> {
    pub token: Param<Tensor<B, 2>>,
    pub position: Param<Tensor<B, 2>>,
}

impl<B: Backend> TextEmbedding<B> {
    pub fn new(init: &Init<B>, config: &ModelConfig) -> Self {
        Self {
            token: init.normal("token", [config.vocab_size, config.text_width], 0.02),
            position: init.normal("position", [config.text_positions(), config.text_width], 0.01),
        }
    }

    /// [batch, len] ids -> [batch, len, width].
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [_, len] = tokens.dims();
        let positions = self.position.val().narrow(0, 0, len).unsqueeze::<3>();
        embedding(self.token.val(), tokens) + positions
    }
}

#[derive(Module, Debug)]
pub struct UnimodalDecoder<B: Backend> {
    pub cls: Param<Tensor<B, 1>>,
    pub blocks: Vec<Block<B>>,
    pub ln_final: LayerNorm<B>,
    pub projection: Dense<B>,
    /// open_clip's layout: the CLS has a position, padding is masked one
    /// key to the right, and the states handed on skip `ln_final`.
    pub open_clip: bool,
}

/// What the unimodal decoder hands on.
pub struct UnimodalOutput<B: Backend> {
    /// Per-token states for the multimodal decoder: [batch, len, width].
    pub states: Tensor<B, 3>,
    /// The CLS output, projected (not yet normalised): [batch, embed_dim].
    pub cls: Tensor<B, 2>,
}

impl<B: Backend> UnimodalDecoder<B> {
    pub fn new(init: &Init<B>, config: &ModelConfig) -> Self {
        let width = config.text_width;
        Self {
            cls: init.normal("cls", [width], 0.02),
            blocks: (0..config.unimodal_layers)
                .map(|i| {
                    let init = init.child("blocks").child(i);
                    BlockConfig {
                        width,
                        heads: config.text_heads,
                        mlp: config.text_mlp,
                        layers: config.unimodal_layers,
                        eps: config.layer_norm_eps,
                        key_bias: config.key_bias(),
                    }
                    .init(&init)
                })
                .collect(),
            ln_final: init.layer_norm(width, config.layer_norm_eps),
            projection: init.linear("projection", width, config.embed_dim, fan_in_std(width), false),
            open_clip: config.architecture == Architecture::OpenClip,
        }
    }

    /// `embedded`: [batch, len, width]; `padding`: [batch, len], true at pad
    /// tokens; `cls_position`: the CLS's position embedding, if it has one.
    /// In the paper's layout the CLS carries no position embedding and pad
    /// keys are masked, so neither the content nor the amount of padding
    /// reaches it. open_clip's mask is shifted: key 0 is always seen, key
    /// t + 1 is hidden when token t is padding (the CLS itself included).
    pub fn forward(
        &self,
        embedded: Tensor<B, 3>,
        padding: Tensor<B, 2, Bool>,
        cls_position: Option<Tensor<B, 1>>,
    ) -> UnimodalOutput<B> {
        self.forward_with(embedded, padding, cls_position, &mut Straight)
    }

    /// [`forward`](Self::forward), the blocks run by `stack`.
    pub fn forward_with(
        &self,
        embedded: Tensor<B, 3>,
        padding: Tensor<B, 2, Bool>,
        cls_position: Option<Tensor<B, 1>>,
        stack: &mut dyn BlockStack<B>,
    ) -> UnimodalOutput<B> {
        let [batch, len, width] = embedded.dims();
        let device = embedded.device();
        let cls = match cls_position {
            Some(position) => self.cls.val() + position,
            None => self.cls.val(),
        };
        let cls = cls
            .cast(embedded.dtype())
            .reshape([1, 1, width])
            .expand([batch, 1, width]);
        let x = Tensor::cat(vec![embedded, cls], 1);
        let seen = Tensor::<B, 2, Bool>::from_bool(TensorData::new(vec![false; batch], [batch, 1]), &device);
        let hidden_keys = if self.open_clip {
            Tensor::cat(vec![seen, padding], 1)
        } else {
            Tensor::cat(vec![padding, seen], 1)
        };
        let bias = causal_padding_bias(hidden_keys);
        let x = stack.run(&self.blocks, x, Some(bias));
        let normed = layer_norm(&self.ln_final, x.clone());
        let states = if self.open_clip { x } else { normed.clone() }.narrow(1, 0, len);
        let cls = normed.narrow(1, len, 1).reshape([batch, width]);
        UnimodalOutput {
            states,
            cls: self.projection.forward(cls),
        }
    }
}
