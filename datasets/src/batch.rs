//! One micro-batch as the model sees it, on a backend's device.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor};

/// One micro-batch as the model sees it.
#[derive(Debug, Clone)]
pub struct CocaBatch<B: Backend> {
    /// [batch, channels, height, width], normalised pixels.
    pub images: Tensor<B, 4>,
    /// [batch, context_length] token ids, right-padded.
    pub tokens: Tensor<B, 2, Int>,
    /// [batch, context_length], true at padding.
    pub padding: Tensor<B, 2, Bool>,
    /// [batch, kept]: the patches each image keeps in training (patch
    /// dropout, ascending); `None`: every patch.
    pub kept_patches: Option<Tensor<B, 2, Int>>,
}

impl<B: Backend> CocaBatch<B> {
    /// Samples `start..start + len`: a rank's share of a global batch.
    pub fn rows(&self, start: usize, len: usize) -> Self {
        Self {
            images: self.images.clone().narrow(0, start, len),
            tokens: self.tokens.clone().narrow(0, start, len),
            padding: self.padding.clone().narrow(0, start, len),
            kept_patches: self
                .kept_patches
                .as_ref()
                .map(|kept| kept.clone().narrow(0, start, len)),
        }
    }
}
