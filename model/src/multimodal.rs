//! The multimodal text decoder: causal self-attention, cross-attention to the
//! captioning pooler's outputs, MLP; then LayerNorm and vocabulary logits.

use burn::module::Module;
use burn::nn::LayerNorm;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use contract::{Architecture, ModelConfig};

use super::attention::{causal_bias, Attention, AttentionConfig};
use super::block::{layer_norm, residual_std_scale, Mlp, MlpConfig};
use super::dense::Dense;
use super::init::Init;

/// Causal self-attention, cross-attention to the image tokens, MLP (each
/// pre-LN and residual). open_clip's layout adds an MLP after the
/// self-attention and a LayerNorm on the image tokens.
#[derive(Module, Debug)]
pub struct MultimodalBlock<B: Backend> {
    pub ln_self: LayerNorm<B>,
    pub self_attn: Attention<B>,
    pub ln_self_mlp: Option<LayerNorm<B>>,
    pub self_mlp: Option<Mlp<B>>,
    pub ln_cross: LayerNorm<B>,
    pub ln_image: Option<LayerNorm<B>>,
    pub cross_attn: Attention<B>,
    pub ln_mlp: LayerNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: Backend> MultimodalBlock<B> {
    fn new(init: &Init<B>, config: &ModelConfig) -> Self {
        let (width, eps) = (config.text_width, config.layer_norm_eps);
        let open_clip = config.architecture == Architecture::OpenClip;
        let scale = residual_std_scale(config.multimodal_layers);
        let attention = |context_width: usize| AttentionConfig {
            width,
            context_width,
            heads: config.text_heads,
            residual_std_scale: scale,
            key_bias: config.key_bias(),
        };
        let mlp = MlpConfig {
            width,
            hidden: config.text_mlp,
            residual_std_scale: scale,
        };
        Self {
            ln_self: init.layer_norm(width, eps),
            self_attn: attention(width).init(&init.child("self_attn")),
            ln_self_mlp: open_clip.then(|| init.layer_norm(width, eps)),
            self_mlp: open_clip.then(|| mlp.init(&init.child("self_mlp"))),
            ln_cross: init.layer_norm(width, eps),
            ln_image: open_clip.then(|| init.layer_norm(config.pooler_width(), eps)),
            cross_attn: attention(config.pooler_width()).init(&init.child("cross_attn")),
            ln_mlp: init.layer_norm(width, eps),
            mlp: mlp.init(&init.child("mlp")),
        }
    }

    fn forward(&self, x: Tensor<B, 3>, image_tokens: Tensor<B, 3>, causal: Tensor<B, 4>) -> Tensor<B, 3> {
        let normed = layer_norm(&self.ln_self, x.clone());
        let x = x + self.self_attn.forward(normed.clone(), normed, Some(causal));
        let (k, v) = self.image_keys_values(image_tokens);
        self.after_self_attention(x, k, v)
    }

    /// The cross-attention's keys and values of the image tokens (decoding
    /// computes them once per image).
    pub fn image_keys_values(&self, image_tokens: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let image_tokens = match &self.ln_image {
            Some(ln) => layer_norm(ln, image_tokens),
            None => image_tokens,
        };
        self.cross_attn.keys_values(image_tokens)
    }

    /// Everything after the self-attention's residual: [open_clip's MLP],
    /// cross-attention to `image_keys_values`, MLP.
    pub fn after_self_attention(&self, x: Tensor<B, 3>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 3> {
        let x = match (&self.ln_self_mlp, &self.self_mlp) {
            (Some(ln), Some(mlp)) => x.clone() + mlp.forward(layer_norm(ln, x)),
            _ => x,
        };
        let x = x.clone() + self.cross_attn.attend(layer_norm(&self.ln_cross, x), k, v, None);
        x.clone() + self.mlp.forward(layer_norm(&self.ln_mlp, x))
    }
}

#[derive(Module, Debug)]
pub struct MultimodalDecoder<B: Backend> {
    pub blocks: Vec<MultimodalBlock<B>>,
    pub ln_final: LayerNorm<B>,
}

impl<B: Backend> MultimodalDecoder<B> {
    pub fn new(init: &Init<B>, config: &ModelConfig) -> Self {
        Self {
            blocks: (0..config.multimodal_layers)
                .map(|i| MultimodalBlock::new(&init.child("blocks").child(i), config))
                .collect(),
            ln_final: init.layer_norm(config.text_width, config.layer_norm_eps),
        }
    }

    /// `states`: [batch, len, text_width] from the unimodal decoder;
    /// `image_tokens`: [batch, queries, pooler width]. Returns normalised
    /// states; the caller projects them to the vocabulary.
    pub fn forward(&self, states: Tensor<B, 3>, image_tokens: Tensor<B, 3>) -> Tensor<B, 3> {
        let [_, len, _] = states.dims();
        let causal = causal_bias::<B>(len, &states.device());
        let mut x = states;
        for block in &self.blocks {
            x = block.forward(x, image_tokens.clone(), causal.clone());
        }
        layer_norm(&self.ln_final, x)
    }
}

/// The vocabulary projection, separate or tied to the token embedding.
#[derive(Module, Debug)]
pub struct VocabProjection<B: Backend> {
    pub untied: Option<Dense<B>>,
}

impl<B: Backend> VocabProjection<B> {
    /// `token_table`: [vocab, width], used when tied.
    pub fn forward(&self, x: Tensor<B, 3>, token_table: Tensor<B, 2>) -> Tensor<B, 3> {
        match &self.untied {
            Some(linear) => linear.forward(x),
            None => {
                let dtype = x.dtype();
                x.matmul(token_table.cast(dtype).transpose().unsqueeze::<3>())
            }
        }
    }
}
