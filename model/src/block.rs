//! The pre-LayerNorm transformer block shared by the image encoder and the
//! unimodal text decoder, and its MLP.

use burn::module::Module;
use burn::nn::LayerNorm;
use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Tensor};

use super::attention::{Attention, AttentionConfig};
use super::dense::Dense;
use super::init::{fan_in_std, Init};

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub fc: Dense<B>,
    pub proj: Dense<B>,
}

/// The shape of an [`Mlp`]: width -> hidden -> width, GELU between.
#[derive(Debug, Clone, Copy)]
pub struct MlpConfig {
    pub width: usize,
    pub hidden: usize,
    /// As [`AttentionConfig::residual_std_scale`], for the output projection.
    pub residual_std_scale: f64,
}

impl MlpConfig {
    pub fn init<B: Backend>(&self, init: &Init<B>) -> Mlp<B> {
        let Self {
            width,
            hidden,
            residual_std_scale,
        } = *self;
        Mlp {
            fc: init.linear("fc", width, hidden, fan_in_std(width), true),
            proj: init.linear("proj", hidden, width, fan_in_std(hidden) * residual_std_scale, true),
        }
    }
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.proj.forward(gelu(self.fc.forward(x)))
    }
}

/// LayerNorm computed in f32 whatever the activations' precision, its
/// result in theirs (bf16 statistics over a wide row lose too much).
pub fn layer_norm<B: Backend, const D: usize>(ln: &LayerNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let dtype = x.dtype();
    ln.forward(x.cast(FloatDType::F32)).cast(dtype)
}

/// x + attn(ln(x)), then x + mlp(ln(x)).
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub ln_attn: LayerNorm<B>,
    pub attn: Attention<B>,
    pub ln_mlp: LayerNorm<B>,
    pub mlp: Mlp<B>,
}

/// Scale of residual-branch output projections for a stack of `layers`.
pub fn residual_std_scale(layers: usize) -> f64 {
    (2.0 * layers.max(1) as f64).powf(-0.5)
}

/// The shape of a [`Block`] in a stack of `layers`.
#[derive(Debug, Clone, Copy)]
pub struct BlockConfig {
    pub width: usize,
    pub heads: usize,
    /// The MLP's hidden width.
    pub mlp: usize,
    /// Blocks in the stack: deeper stacks start with smaller output projections.
    pub layers: usize,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// See [`AttentionConfig::key_bias`].
    pub key_bias: bool,
}

impl BlockConfig {
    pub fn init<B: Backend>(&self, init: &Init<B>) -> Block<B> {
        let Self {
            width,
            heads,
            mlp,
            layers,
            eps,
            key_bias,
        } = *self;
        let residual_std_scale = residual_std_scale(layers);
        let attn = AttentionConfig {
            width,
            context_width: width,
            heads,
            residual_std_scale,
            key_bias,
        };
        let mlp = MlpConfig {
            width,
            hidden: mlp,
            residual_std_scale,
        };
        Block {
            ln_attn: init.layer_norm(width, eps),
            attn: attn.init(&init.child("attn")),
            ln_mlp: init.layer_norm(width, eps),
            mlp: mlp.init(&init.child("mlp")),
        }
    }
}

/// How a tower runs its stack of blocks: straight through ([`Straight`]),
/// or keeping only each block's input, to compute the rest again in the
/// backward pass (activation checkpointing, `train::checkpointing`).
pub trait BlockStack<B: Backend> {
    fn run(&mut self, blocks: &[Block<B>], x: Tensor<B, 3>, bias: Option<Tensor<B, 4>>) -> Tensor<B, 3>;
}

/// Each block after the other, every activation in the autodiff graph.
pub struct Straight;

impl<B: Backend> BlockStack<B> for Straight {
    fn run(&mut self, blocks: &[Block<B>], x: Tensor<B, 3>, bias: Option<Tensor<B, 4>>) -> Tensor<B, 3> {
        blocks.iter().fold(x, |x, block| block.forward(x, bias.clone()))
    }
}

impl<B: Backend> Block<B> {
    /// `bias`: the attention bias (causal, padding), or none for full attention.
    pub fn forward(&self, x: Tensor<B, 3>, bias: Option<Tensor<B, 4>>) -> Tensor<B, 3> {
        let normed = layer_norm(&self.ln_attn, x.clone());
        let x = x + self.attn.forward(normed.clone(), normed, bias);
        x.clone() + self.mlp.forward(layer_norm(&self.ln_mlp, x))
    }
}
