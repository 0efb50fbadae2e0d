//! Attentional pooling (Lee et al. 2019, as in the CoCa paper): learned
//! queries cross-attend to the image tokens, followed by LayerNorm.

use burn::module::{Module, Param};
use burn::nn::LayerNorm;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::attention::Attention;
use super::init::Init;

#[derive(Module, Debug)]
pub struct AttentionalPooler<B: Backend> {
    pub queries: Param<Tensor<B, 2>>,
    pub attn: Attention<B>,
    pub ln: LayerNorm<B>,
}

impl<B: Backend> AttentionalPooler<B> {
    pub fn new(init: &Init<B>, queries: usize, width: usize, heads: usize, eps: f64) -> Self {
        Self {
            queries: init.normal("queries", [queries, width], 0.02),
            attn: Attention::new(&init.child("attn"), width, width, heads, 1.0),
            ln: init.layer_norm(width, eps),
        }
    }

    /// `image_tokens`: [batch, tokens, width] -> [batch, queries, width].
    pub fn forward(&self, image_tokens: Tensor<B, 3>) -> Tensor<B, 3> {
        let queries = self.queries.val().unsqueeze::<3>();
        self.ln.forward(self.attn.forward(queries, image_tokens, None))
    }
}
