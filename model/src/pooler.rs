//! Attentional pooling (Lee et al. 2019, as in the CoCa paper): learned
//! queries cross-attend to the image tokens, followed by LayerNorm
//! (open_clip's layout normalises the queries too).

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
    /// open_clip's LayerNorm of the queries.
    pub query_norm: Option<LayerNorm<B>>,
    pub attn: Attention<B>,
    pub ln: LayerNorm<B>,
}

/// The shape of an [`AttentionalPooler`].
#[derive(Debug, Clone, Copy)]
pub struct PoolerConfig {
    /// Learned queries: the pooler's outputs.
    pub queries: usize,
    /// Width of the queries and outputs.
    pub width: usize,
    /// Width of the image tokens.
    pub context_width: usize,
    pub heads: usize,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// open_clip's layout: normalised queries, a key bias.
    pub open_clip: bool,
}

impl PoolerConfig {
    pub fn init<B: Backend>(&self, init: &Init<B>) -> AttentionalPooler<B> {
        let attn = AttentionConfig {
            width: self.width,
            context_width: self.context_width,
            heads: self.heads,
            residual_std_scale: 1.0,
            key_bias: self.open_clip,
        };
        AttentionalPooler {
            queries: init.normal("queries", [self.queries, self.width], 0.02),
            query_norm: self.open_clip.then(|| init.layer_norm(self.width, self.eps)),
            attn: attn.init(&init.child("attn")),
            ln: init.layer_norm(self.width, self.eps),
        }
    }
}

impl<B: Backend> AttentionalPooler<B> {
    /// `image_tokens`: [batch, tokens, context_width] -> [batch, queries, width].
    pub fn forward(&self, image_tokens: Tensor<B, 3>) -> Tensor<B, 3> {
        let queries = self.queries.val();
        let queries = match &self.query_norm {
            Some(ln) => layer_norm(ln, queries),
            None => queries,
        };
        let queries = queries.cast(image_tokens.dtype()).unsqueeze::<3>();
        layer_norm(&self.ln, self.attn.forward(queries, image_tokens, None))
    }
}
