//! The pre-LayerNorm transformer block shared by the image encoder and the
//! unimodal text decoder, and its MLP.

use burn::module::Module;
use burn::nn::LayerNorm;
use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::attention::Attention;
use super::dense::Dense;
use super::init::{fan_in_std, Init};

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub fc: Dense<B>,
    pub proj: Dense<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn new(init: &Init<B>, width: usize, hidden: usize, residual_std_scale: f64) -> Self {
        Self {
            fc: init.linear("fc", width, hidden, fan_in_std(width), true),
            proj: init.linear("proj", hidden, width, fan_in_std(hidden) * residual_std_scale, true),
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.proj.forward(gelu(self.fc.forward(x)))
    }
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

impl<B: Backend> Block<B> {
    pub fn new(init: &Init<B>, width: usize, heads: usize, mlp: usize, layers: usize, eps: f64) -> Self {
        let scale = residual_std_scale(layers);
        Self {
            ln_attn: init.layer_norm(width, eps),
            attn: Attention::new(&init.child("attn"), width, width, heads, scale),
            ln_mlp: init.layer_norm(width, eps),
            mlp: Mlp::new(&init.child("mlp"), width, mlp, scale),
        }
    }

    /// `bias`: the attention bias (causal, padding), or none for full attention.
    pub fn forward(&self, x: Tensor<B, 3>, bias: Option<Tensor<B, 4>>) -> Tensor<B, 3> {
        let normed = self.ln_attn.forward(x.clone());
        let x = x + self.attn.forward(normed.clone(), normed, bias);
        x.clone() + self.mlp.forward(self.ln_mlp.forward(x))
    }
}
