//! Multi-head self- and cross-attention, on burn's fused attention op.

use burn::module::Module;

use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Tensor};

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

    /// `x`: [batch, len, width]. `key_padding`: [batch, len], true where a
    /// position must not be attended to. `causal`: position t sees only <= t.
    pub fn forward(&self, x: Tensor<B, 3>, key_padding: Option<Tensor<B, 2, Bool>>, causal: bool) -> Tensor<B, 3> {
        let [batch, len, width] = x.dims();
        let project = |dense: &Dense<B>| split_heads(dense.forward(x.clone()), self.heads);
        let (q, k, v) = (project(&self.q), project(&self.k), project(&self.v));
        let mask = key_padding.map(|padding| {
            padding
                .reshape([batch, 1, 1, len])
                .expand([batch, self.heads, len, len])
        });
        let options = AttentionModuleOptions {
            is_causal: causal,
            ..Default::default()
        };
        let context = attention(q, k, v, mask, None, options);
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
