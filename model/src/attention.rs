//! Multi-head attention, for self-attention and cross-attention alike.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Tensor, TensorData};

use super::dense::Dense;
use super::init::{fan_in_std, Init};

/// Multi-head attention with separate query, key, value and output
/// projections (a fused projection would be split by slicing, whose
/// backward zero-fills and adds full-size gradients).
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q: Dense<B>,
    pub k: Dense<B>,
    pub v: Dense<B>,
    pub out: Dense<B>,
    pub heads: usize,
}

/// The shape of an [`Attention`].
#[derive(Debug, Clone, Copy)]
pub struct AttentionConfig {
    /// Width of the queries and of the output.
    pub width: usize,
    /// Width of what is attended to (`width` for self-attention).
    pub context_width: usize,
    pub heads: usize,
    /// Shrinks the output projection of deep stacks so the residual stream
    /// does not grow with depth (1 for no shrinking).
    pub residual_std_scale: f64,
    /// A key bias: softmax cancels it, so only open_clip's layout has one.
    pub key_bias: bool,
}

impl AttentionConfig {
    pub fn init<B: Backend>(&self, init: &Init<B>) -> Attention<B> {
        let Self {
            width,
            context_width,
            heads,
            residual_std_scale,
            key_bias,
        } = *self;
        Attention {
            q: init.linear("q", width, width, fan_in_std(width), true),
            // A key bias adds the same amount to every score of a query, which
            // softmax cancels, so its gradient is float noise.
            k: init.linear("k", context_width, width, fan_in_std(context_width), key_bias),
            v: init.linear("v", context_width, width, fan_in_std(context_width), true),
            out: init.linear("out", width, width, fan_in_std(width) * residual_std_scale, true),
            heads,
        }
    }
}

impl<B: Backend> Attention<B> {
    /// `queries`: [batch, len_q, width], or [1, len_q, width] for queries
    /// shared by the whole batch (projected once). `context`: [batch, len_k,
    /// context_width]; the queries themselves for self-attention. `bias`:
    /// added to the scores, broadcast to [batch, 1, len_q, len_k] (see
    /// `causal_bias`). Returns [batch, len_q, width].
    pub fn forward(&self, queries: Tensor<B, 3>, context: Tensor<B, 3>, bias: Option<Tensor<B, 4>>) -> Tensor<B, 3> {
        let (k, v) = self.keys_values(context);
        self.attend(queries, k, v, bias)
    }

    /// Keys and values of a context [batch, len, context_width], split into
    /// heads: [batch, heads, len, width / heads] each. Decoding caches these.
    pub fn keys_values(&self, context: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        (
            split_heads(self.k.forward(context.clone()), self.heads),
            split_heads(self.v.forward(context), self.heads),
        )
    }

    /// `queries` attending to keys and values from `keys_values`.
    pub fn attend(
        &self,
        queries: Tensor<B, 3>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        bias: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 3> {
        let [batch, _, _, _] = k.dims();
        let [_, len_q, width] = queries.dims();
        // Shared queries are projected once, then broadcast over the batch
        // as a view (after the head split, so no copy is ever made of it).
        let q = split_heads(self.q.forward(queries), self.heads).expand([batch, self.heads, len_q, width / self.heads]);
        let bias = bias.map(|bias| bias.cast(q.dtype()));
        let context = attention(q, k, v, None, bias, AttentionModuleOptions::default());
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

/// Additive attention bias [1, 1, len, len]: 0 where query t may see key s
/// (s <= t), -inf where it may not. Built once per forward and shared by
/// every layer; broadcasting it is far cheaper than a mask per call.
pub fn causal_bias<B: Backend>(len: usize, device: &B::Device) -> Tensor<B, 4> {
    let values: Vec<f32> = (0..len * len)
        .map(|i| if i % len > i / len { f32::NEG_INFINITY } else { 0.0 })
        .collect();
    Tensor::from_data(TensorData::new(values, [1, 1, len, len]), device)
}

/// The causal bias of `len` new queries after `past` cached keys:
/// [1, 1, len, past + len], query t sees keys up to past + t.
pub fn causal_bias_after<B: Backend>(past: usize, len: usize, device: &B::Device) -> Tensor<B, 4> {
    let keys = past + len;
    let values: Vec<f32> = (0..len * keys)
        .map(|i| {
            if i % keys > past + i / keys {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_data(TensorData::new(values, [1, 1, len, keys]), device)
}

/// `causal_bias` with keys at padding ([batch, len], true at padding) also
/// hidden: [batch, 1, len, len].
pub fn causal_padding_bias<B: Backend>(padding: Tensor<B, 2, Bool>) -> Tensor<B, 4> {
    let [batch, len] = padding.dims();
    let device = padding.device();
    let hidden_keys = Tensor::<B, 4>::zeros([batch, 1, 1, len], &device)
        .mask_fill(padding.reshape([batch, 1, 1, len]), f32::NEG_INFINITY);
    causal_bias::<B>(len, &device) + hidden_keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use burn::tensor::activation::softmax;

    /// Textbook multi-head attention, one head at a time, from the weights.
    fn reference(
        attn: &Attention<Cpu>,
        queries: Tensor<Cpu, 3>,
        context: Tensor<Cpu, 3>,
        bias: Tensor<Cpu, 4>,
    ) -> Tensor<Cpu, 3> {
        let [batch, len_k, _] = context.dims();
        let [_, len_q, width] = queries.dims();
        let queries = queries.expand([batch, len_q, width]);
        let head_width = width / attn.heads;
        let project = |dense: &Dense<Cpu>, x: Tensor<Cpu, 3>, head: usize| {
            let w = dense
                .weight
                .val()
                .narrow(1, head * head_width, head_width)
                .unsqueeze::<3>();
            let projected = x.matmul(w);
            match &dense.bias {
                Some(bias) => projected + bias.val().narrow(0, head * head_width, head_width).unsqueeze::<3>(),
                None => projected,
            }
        };
        let heads: Vec<Tensor<Cpu, 3>> = (0..attn.heads)
            .map(|head| {
                let q = project(&attn.q, queries.clone(), head);
                let k = project(&attn.k, context.clone(), head);
                let v = project(&attn.v, context.clone(), head);
                let scores = q.matmul(k.swap_dims(1, 2)) / (head_width as f32).sqrt();
                let scores = scores + bias.clone().reshape([batch, len_q, len_k]);
                softmax(scores, 2).matmul(v)
            })
            .collect();
        attn.out.forward(Tensor::cat(heads, 2))
    }

    fn random(shape: [usize; 3], seed: u64) -> Tensor<Cpu, 3> {
        let device = Default::default();
        let init = Init::<Cpu>::new(seed, &device);
        let [a, b, c] = shape;
        init.normal("x", [a * b, c], 1.0).val().reshape(shape)
    }

    #[test]
    fn attention_equals_the_textbook_per_head_computation() {
        let device = Default::default();
        let init = Init::<Cpu>::new(3, &device);
        // Cross-attention with a different context width and a padding bias.
        let cross = AttentionConfig {
            width: 12,
            context_width: 20,
            heads: 3,
            residual_std_scale: 1.0,
            key_bias: true,
        }
        .init(&init.child("cross"));
        let queries = random([2, 5, 12], 1);
        let context = random([2, 7, 20], 2);
        let padding = Tensor::<Cpu, 2, Bool>::from_bool(
            TensorData::new((0..14).map(|i| i % 7 >= 5 && i >= 7).collect::<Vec<_>>(), [2, 7]),
            &device,
        );
        let bias = Tensor::<Cpu, 4>::zeros([2, 1, 1, 7], &device)
            .mask_fill(padding.reshape([2, 1, 1, 7]), f32::NEG_INFINITY)
            .expand([2, 1, 5, 7]);
        let ours = cross.forward(queries.clone(), context.clone(), Some(bias.clone()));
        let expected = reference(&cross, queries, context.clone(), bias.clone());
        ours.into_data()
            .assert_approx_eq::<f32>(&expected.into_data(), burn::tensor::Tolerance::absolute(1e-5));

        // Queries shared by the batch give the same as repeated queries.
        let shared = random([1, 5, 12], 4);
        let ours = cross.forward(shared.clone(), context.clone(), None);
        let expected = reference(&cross, shared, context, Tensor::zeros([2, 1, 5, 7], &device));
        ours.into_data()
            .assert_approx_eq::<f32>(&expected.into_data(), burn::tensor::Tolerance::absolute(1e-5));

        // Causal self-attention.
        let own = AttentionConfig {
            width: 12,
            context_width: 12,
            heads: 4,
            residual_std_scale: 1.0,
            key_bias: false,
        }
        .init(&init.child("self"));
        let x = random([2, 6, 12], 5);
        let ours = own.forward(x.clone(), x.clone(), Some(causal_bias(6, &device)));
        let expected = reference(&own, x.clone(), x, causal_bias::<Cpu>(6, &device).expand([2, 1, 6, 6]));
        ours.into_data()
            .assert_approx_eq::<f32>(&expected.into_data(), burn::tensor::Tolerance::absolute(1e-5));
    }

    #[test]
    fn causal_padding_bias_hides_future_and_padded_keys() {
        let device = Default::default();
        let padding = Tensor::<Cpu, 2, Bool>::from_bool(TensorData::new(vec![false, false, true], [1, 3]), &device);
        let bias: Vec<f32> = causal_padding_bias(padding).into_data().to_vec().unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(bias, vec![0.0, inf, inf, 0.0, 0.0, inf, 0.0, 0.0, inf]);
    }
}
