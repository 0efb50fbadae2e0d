//! Activation checkpointing per transformer block
//! (`train.activation_checkpointing`): the towers' blocks run without an
//! autodiff graph, keeping only each block's input; the backward pass
//! computes each block again, now with a graph, from the last to the
//! first, carrying the gradient of its output. Activations are held for one
//! block at a time, for a second forward of the towers' blocks.
//!
//! Each block's backward is a pass of its own (its output times the
//! gradient arriving at it, summed: the gradient of that sum is exactly the
//! arriving one), so burn needs no custom operation.

use burn::module::{AutodiffModule, Module};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

use crate::block::{Block, BlockStack};
use crate::loss::Heads;
use crate::{CocaBatch, CocaModel, CocaOutput};

/// One tower's stack run without a graph: its input (with the graph that
/// made it), each block's input, and its output as a new leaf.
struct Recompute<B: AutodiffBackend> {
    input: Option<Tensor<B, 3>>,
    block_inputs: Vec<Tensor<B::InnerBackend, 3>>,
    bias: Option<Tensor<B::InnerBackend, 4>>,
    output: Option<Tensor<B, 3>>,
}

impl<B: AutodiffBackend> Recompute<B> {
    fn new() -> Self {
        Self {
            input: None,
            block_inputs: Vec::new(),
            bias: None,
            output: None,
        }
    }
}

impl<B: AutodiffBackend> BlockStack<B> for Recompute<B> {
    fn run(&mut self, blocks: &[Block<B>], x: Tensor<B, 3>, bias: Option<Tensor<B, 4>>) -> Tensor<B, 3> {
        // Untracked tensors and parameters: burn computes what it computes
        // in a graph (the same values as without checkpointing) but keeps
        // no graph. The bias comes from the padding: it has no gradient.
        let mut untracked = Tensor::<B, 3>::from_inner(x.clone().inner());
        for block in blocks {
            self.block_inputs.push(untracked.clone().inner());
            untracked = block.clone().no_grad().forward(untracked, bias.clone());
        }
        let output = Tensor::from_inner(untracked.inner()).require_grad();
        self.input = Some(x);
        self.bias = bias.map(|bias| bias.inner());
        self.output = Some(output.clone());
        output
    }
}

impl<B: AutodiffBackend> Recompute<B> {
    /// Back-propagates `gradient` (of the stack's output) through each
    /// block, computed again, and into the graph that made the stack's
    /// input; every parameter gradient is added to `accumulated`.
    fn backward<M: AutodiffModule<B>>(
        self,
        blocks: &[Block<B>],
        gradient: Tensor<B::InnerBackend, 3>,
        model: &M,
        accumulated: &mut GradientsAccumulator<M>,
    ) {
        let bias = self.bias.map(Tensor::<B, 4>::from_inner);
        let mut gradient = gradient;
        for (block, input) in blocks.iter().zip(self.block_inputs).rev() {
            let input = Tensor::<B, 3>::from_inner(input).require_grad();
            let output = block.forward(input.clone(), bias.clone());
            let mut grads = (output * Tensor::from_inner(gradient)).sum().backward();
            gradient = input
                .grad_remove(&mut grads)
                .expect("a block's input reaches its output");
            accumulated.accumulate(model, GradientsParams::from_grads(grads, model));
        }
        let input = self.input.expect("the stack ran");
        let grads = (input * Tensor::from_inner(gradient)).sum().backward();
        accumulated.accumulate(model, GradientsParams::from_grads(grads, model));
    }
}

/// What a checkpointed forward pass kept of both towers.
pub struct Checkpoints<B: AutodiffBackend> {
    vision: Recompute<B>,
    text: Recompute<B>,
}

/// [`CocaModel::forward`] with the towers' blocks checkpointed: the same
/// output, and what the backward pass needs to compute them again.
pub fn forward<B: AutodiffBackend>(
    model: &CocaModel<B>,
    batch: &CocaBatch<B>,
    heads: Heads,
) -> (CocaOutput<B>, Checkpoints<B>) {
    let (mut vision, mut text) = (Recompute::new(), Recompute::new());
    let output = model.forward_with(batch, heads, [&mut vision, &mut text]);
    (output, Checkpoints { vision, text })
}

impl<B: AutodiffBackend> Checkpoints<B> {
    /// Finishes the backward pass `grads` began (of an objective on a
    /// checkpointed forward): its parameter gradients, then each tower's
    /// blocks', all added to `accumulated`.
    pub fn backward(
        self,
        model: &CocaModel<B>,
        mut grads: B::Gradients,
        accumulated: &mut GradientsAccumulator<CocaModel<B>>,
    ) where
        CocaModel<B>: AutodiffModule<B>,
    {
        let gradient = |recompute: &Recompute<B>, grads: &mut B::Gradients| {
            recompute.output.as_ref().and_then(|output| output.grad_remove(grads))
        };
        let vision = gradient(&self.vision, &mut grads);
        let text = gradient(&self.text, &mut grads);
        accumulated.accumulate(model, GradientsParams::from_grads(grads, model));
        if let Some(gradient) = vision {
            self.vision
                .backward(&model.image_encoder.blocks, gradient, model, accumulated);
        }
        if let Some(gradient) = text {
            self.text.backward(&model.unimodal.blocks, gradient, model, accumulated);
        }
    }
}
