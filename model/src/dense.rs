//! A linear layer that multiplies all tokens as one matrix.
//!
//! burn's `Linear` on a [batch, len, in] input runs one small matmul per
//! batch row and, in backward, materialises a [batch, in, out] weight
//! gradient before summing it: on CPU that is most of the step. Folding the
//! leading dimensions into rows gives one large matmul each way.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

#[derive(Module, Debug)]
pub struct Dense<B: Backend> {
    /// [in, out]
    pub weight: Param<Tensor<B, 2>>,
    /// [out]
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Dense<B> {
    /// `x`: [..., in] -> [..., out]
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mut dims = x.dims();
        let input = dims[D - 1];
        let rows = x.shape().num_elements() / input;
        // Parameters are kept in f32; they compute in the input's precision.
        let dtype = x.dtype();
        let y = x.reshape([rows, input]).matmul(self.weight.val().cast(dtype));
        let y = match &self.bias {
            Some(bias) => y + bias.val().cast(dtype).unsqueeze::<2>(),
            None => y,
        };
        dims[D - 1] = self.weight.dims()[1];
        y.reshape(dims)
    }
}
