//! Multi-head self- and cross-attention, on burn's fused attention op.

use burn::module::Module;

use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Tensor, TensorData};

use super::dense::Dense;
use super::init::{fan_in_std, Init};

/// Multi-head self-attention. Query, key and value have separate
/// projections: a fused one would be split by slicing, whose backward
/// zero-fills and adds three full-size gradients.
#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    pub q: Dense<B>,
    pub k: Dense<B>,
    pub v: Dense<B>,
    pub out: Dense<B>,
    pub heads: usize,
}

impl<B: Backend> SelfAttention<B> {
    /// `residual_std_scale` shrinks the output projection of deep stacks so
    /// the residual stream does not grow with depth.
    pub fn new(init: &Init<B>, width: usize, heads: usize, residual_std_scale: f64) -> Self {
        Self {
            q: init.linear("q", width, width, fan_in_std(width), true),
            k: init.linear("k", width, width, fan_in_std(width), true),
            v: init.linear("v", width, width, fan_in_std(width), true),
            out: init.linear("out", width, width, fan_in_std(width) * residual_std_scale, true),
            heads,
        }
    }

    /// `x`: [batch, len, width]. `bias`: added to the attention scores,
    /// broadcast to [batch, heads, len, len] (see `causal_bias`).
    pub fn forward(&self, x: Tensor<B, 3>, bias: Option<Tensor<B, 4>>) -> Tensor<B, 3> {
        let [_, _, width] = x.dims();
        let project = |dense: &Dense<B>| split_heads(dense.forward(x.clone()), self.heads);
        let (q, k, v) = (project(&self.q), project(&self.k), project(&self.v));
        let context = attention(q, k, v, None, bias, AttentionModuleOptions::default());
        self.out.forward(merge_heads(context, width))
    }
}

/// Attention from queries to a separate context (image tokens).
#[derive(Module, Debug)]
pub struct CrossAttention<B: Backend> {
    pub q: Dense<B>,
    pub k: Dense<B>,
    pub v: Dense<B>,
    pub out: Dense<B>,
    pub heads: usize,
}

impl<B: Backend> CrossAttention<B> {
    pub fn new(init: &Init<B>, width: usize, context_width: usize, heads: usize, residual_std_scale: f64) -> Self {
        Self {
            q: init.linear("q", width, width, fan_in_std(width), true),
            k: init.linear("k", context_width, width, fan_in_std(context_width), true),
            v: init.linear("v", context_width, width, fan_in_std(context_width), true),
            out: init.linear("out", width, width, fan_in_std(width) * residual_std_scale, true),
            heads,
        }
    }

    /// `queries`: [batch, len_q, width], or [1, len_q, width] for queries
    /// shared by the whole batch (projected once, then broadcast).
    /// `context`: [batch, len_k, context_width].
    pub fn forward(&self, queries: Tensor<B, 3>, context: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, _, _] = context.dims();
        let [_, len_q, width] = queries.dims();
        let q = self.q.forward(queries).expand([batch, len_q, width]);
        let k = self.k.forward(context.clone());
        let v = self.v.forward(context);
        let context = attention(
            split_heads(q, self.heads),
            split_heads(k, self.heads),
            split_heads(v, self.heads),
            None,
            None,
            AttentionModuleOptions::default(),
        );
        self.out.forward(merge_heads(context, width))
    }
}

/// Additive attention bias [1, 1, len, len]: 0 where query t may see key s
/// (s <= t), -inf where it may not. Built once per forward and shared by
/// every layer; broadcasting it is far cheaper than a mask per call.
pub fn causal_bias<B: Backend>(len: usize, device: &B::Device) -> Tensor<B, 4> {
    let values: Vec<f32> = (0..len * len)
        .map(|i| if i % len > i / len { f32::NEG_INFINITY } else { 0.0 })
        .collect();
    Tensor::from_data(TensorData::new(values, [1, 1, len, len]), device)
}

/// `causal` with keys at padding ([batch, len], true at padding) also hidden:
/// [batch, 1, len, len].
pub fn causal_padding_bias<B: Backend>(padding: Tensor<B, 2, Bool>) -> Tensor<B, 4> {
    let [batch, len] = padding.dims();
    let device = padding.device();
    let hidden_keys = Tensor::<B, 4>::zeros([batch, 1, 1, len], &device)
        .mask_fill(padding.reshape([batch, 1, 1, len]), f32::NEG_INFINITY);
    causal_bias::<B>(len, &device) + hidden_keys
}

/// [batch, len, width] -> [batch, heads, len, width / heads]
fn split_heads<B: Backend>(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [batch, len, width] = x.dims();
    x.reshape([batch, len, heads, width / heads]).swap_dims(1, 2)
}

/// [batch, heads, len, head_width] -> [batch, len, width]
fn merge_heads<B: Backend>(x: Tensor<B, 4>, width: usize) -> Tensor<B, 3> {
    let [batch, _, len, _] = x.dims();
    x.swap_dims(1, 2).reshape([batch, len, width])
}
