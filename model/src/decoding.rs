//! Incremental decoding for captioning: the image side (encoder, caption
//! pooler, every cross-attention's keys and values) is computed once per
//! image, and each decoder self-attention keeps its keys and values, so a
//! new token costs one position's work instead of the whole prefix's.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use super::attention::causal_bias_after;
use super::CocaModel;

/// One self-attention's keys and values so far: [batch, heads, len, head_width].
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    k: Option<Tensor<B, 4>>,
    v: Option<Tensor<B, 4>>,
}

impl<B: Backend> KvCache<B> {
    fn new() -> Self {
        Self { k: None, v: None }
    }

    /// Appends new keys and values; returns all of them.
    fn extend(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let join = |old: Option<Tensor<B, 4>>, new: Tensor<B, 4>| match old {
            Some(old) => Tensor::cat(vec![old, new], 2),
            None => new,
        };
        let k = join(self.k.take(), k);
        let v = join(self.v.take(), v);
        self.k = Some(k.clone());
        self.v = Some(v.clone());
        (k, v)
    }

    fn select(&mut self, rows: &Tensor<B, 1, Int>) {
        self.k = self.k.take().map(|k| k.select(0, rows.clone()));
        self.v = self.v.take().map(|v| v.select(0, rows.clone()));
    }
}

/// Where a batch of captions stands.
#[derive(Debug, Clone)]
pub struct DecodingState<B: Backend> {
    unimodal: Vec<KvCache<B>>,
    multimodal: Vec<KvCache<B>>,
    /// Per multimodal layer: the image tokens' keys and values.
    cross: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
    /// Tokens decoded so far.
    pub len: usize,
}

impl<B: Backend> DecodingState<B> {
    /// Keeps rows `rows` of the batch, in that order (beam search reorders).
    pub fn select(&mut self, rows: &Tensor<B, 1, Int>) {
        for cache in self.unimodal.iter_mut().chain(self.multimodal.iter_mut()) {
            cache.select(rows);
        }
        for (k, v) in &mut self.cross {
            *k = k.clone().select(0, rows.clone());
            *v = v.clone().select(0, rows.clone());
        }
    }
}

impl<B: Backend> CocaModel<B> {
    /// The image tokens the multimodal decoder attends to: [batch, queries, pooler width].
    pub fn caption_image_tokens(&self, images: Tensor<B, 4>) -> Tensor<B, 3> {
        let tokens = self.image_encoder.forward(images);
        let heads = super::loss::Heads {
            contrastive: false,
            captioning: true,
        };
        self.pool(tokens, heads).1.expect("the captioning head was asked for")
    }

    /// A decoding state for captions of these image tokens.
    pub fn begin_decoding(&self, image_tokens: Tensor<B, 3>) -> DecodingState<B> {
        let layers = self.multimodal.blocks.len();
        DecodingState {
            unimodal: (0..self.unimodal.blocks.len()).map(|_| KvCache::new()).collect(),
            multimodal: (0..layers).map(|_| KvCache::new()).collect(),
            cross: self
                .multimodal
                .blocks
                .iter()
                .map(|block| block.image_keys_values(image_tokens.clone()))
                .collect(),
            len: 0,
        }
    }

    /// Feeds `tokens` ([batch, n]) after those already decoded; returns the
    /// vocabulary logits at each of them: [batch, n, vocab].
    pub fn decode(&self, tokens: Tensor<B, 2, Int>, state: &mut DecodingState<B>) -> Tensor<B, 3> {
        let [_, n] = tokens.dims();
        let device = tokens.device();
        let positions = self
            .text_embedding
            .position
            .val()
            .narrow(0, state.len, n)
            .unsqueeze::<3>();
        let mut x = burn::tensor::module::embedding(self.text_embedding.token.val(), tokens) + positions;
        let bias = (n > 1).then(|| causal_bias_after::<B>(state.len, n, &device));
        for (block, cache) in self.unimodal.blocks.iter().zip(&mut state.unimodal) {
            let normed = block.ln_attn.forward(x.clone());
            let (k, v) = block.attn.keys_values(normed.clone());
            let (k, v) = cache.extend(k, v);
            x = x + block.attn.attend(normed, k, v, bias.clone());
            x = x.clone() + block.mlp.forward(block.ln_mlp.forward(x));
        }
        if !self.unimodal.open_clip {
            x = self.unimodal.ln_final.forward(x);
        }
        for ((block, cache), (cross_k, cross_v)) in self
            .multimodal
            .blocks
            .iter()
            .zip(&mut state.multimodal)
            .zip(&state.cross)
        {
            let normed = block.ln_self.forward(x.clone());
            let (k, v) = block.self_attn.keys_values(normed.clone());
            let (k, v) = cache.extend(k, v);
            x = x + block.self_attn.attend(normed, k, v, bias.clone());
            x = block.after_self_attention(x, cross_k.clone(), cross_v.clone());
        }
        state.len += n;
        let hidden = self.multimodal.ln_final.forward(x);
        self.vocab_projection.forward(hidden, self.text_embedding.token.val())
    }
}
