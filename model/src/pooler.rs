//! Attentional pooling (Lee et al. 2019, as in the CoCa paper): learned
//! queries cross-attend to the image tokens, followed by LayerNorm.

use burn::module::{Module, Param};
use burn::nn::LayerNorm;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::attention::{Attention, AttentionConfig};
use super::block::layer_norm;
use super::init::Init;

#[derive(Module, Debug)]
pub struct AttentionalPooler<B: Backend> {
    pub queries: Param<Tensor<B, 2>>,
    pub attn: Attention<B>,
    pub ln: LayerNorm<B>,
}

/// The shape of an [`AttentionalPooler`].
#[derive(Debug, Clone, Copy)]
pub struct PoolerConfig {
    /// Learned queries: the pooler's outputs.
    pub queries: usize,
    pub width: usize,
    pub heads: usize,
    /// LayerNorm epsilon.
    pub eps: f64,
}

impl PoolerConfig {
    pub fn init<B: Backend>(&self, init: &Init<B>) -> AttentionalPooler<B> {
        let attn = AttentionConfig {
            width: self.width,
            context_width: self.width,
            heads: self.heads,
            residual_std_scale: 1.0,
        };
        AttentionalPooler {
            queries: init.normal("queries", [self.queries, self.width], 0.02),
            attn: attn.init(&init.child("attn")),
            ln: init.layer_norm(self.width, self.eps),
        }
    }
}

impl<B: Backend> AttentionalPooler<B> {
    /// `image_tokens`: [batch, tokens, width] -> [batch, queries, width].
    pub fn forward(&self, image_tokens: Tensor<B, 3>) -> Tensor<B, 3> {
        let queries = self.queries.val().cast(image_tokens.dtype()).unsqueeze::<3>();
        layer_norm(&self.ln, self.attn.forward(queries, image_tokens, None))
    }
}
