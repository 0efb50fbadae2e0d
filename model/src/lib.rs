//! coca's model on burn, generic over the backend. The network itself lives
//! at the top: CoCa (Yu et al. 2022), a ViT image encoder, attentional
//! poolers, a unimodal text decoder with a trailing CLS token and a
//! multimodal decoder cross-attending to the image, and its losses. Around
//! it: the training step ([`train`]), the model/optimizer state as a flat
//! vector and as sharded checkpoints ([`state`]), decoding and captioning
//! ([`generate`]), loading for inference ([`inference`]) and evaluation
//! ([`eval`]). Backends are chosen in [`backend`].

pub mod attention;
pub mod backend;
pub mod block;
#[cfg(feature = "cuda")]
pub mod cuda_memory;
pub mod decoding;
pub mod dense;
pub mod eval;
pub mod generate;
pub mod inference;
pub mod init;
pub mod loss;
pub mod multimodal;
pub mod open_clip;
pub mod parameters;
pub mod pooler;
pub mod profile;
pub mod state;
pub mod train;
pub mod unimodal;
pub mod vision;

use burn::module::{Module, Param};

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, FloatDType, Int, Tensor};
use contract::{Architecture, ModelConfig, ParamCounts, PoolerLayout};
pub use datasets::batch::CocaBatch;

use self::block::{BlockStack, Straight};
use self::dense::Dense;
use self::init::{fan_in_std, Init};
use self::loss::{captioning_loss, contrastive_loss, Heads, LossWeights, Losses};
use self::multimodal::{MultimodalDecoder, VocabProjection};
use self::pooler::{AttentionalPooler, PoolerConfig};
use self::unimodal::{TextEmbedding, UnimodalDecoder};
use self::vision::VisionTransformer;

/// CLIP's temperature: logits are scaled by at most 100.
const MAX_LOGIT_SCALE: f32 = 100.0;

#[derive(Module, Debug)]
pub struct CocaModel<B: Backend> {
    pub image_encoder: VisionTransformer<B>,
    /// Absent in the shared layout, where the caption pooler's first query
    /// serves the contrastive head.
    pub contrastive_pooler: Option<AttentionalPooler<B>>,
    pub caption_pooler: AttentionalPooler<B>,
    pub image_projection: Dense<B>,
    pub text_embedding: TextEmbedding<B>,
    pub unimodal: UnimodalDecoder<B>,
    pub multimodal: MultimodalDecoder<B>,
    pub vocab_projection: VocabProjection<B>,
    /// log of the contrastive logit scale, initialised to ln(1/0.07).
    pub logit_scale: Param<Tensor<B, 1>>,
}

#[derive(Debug, Clone)]
pub struct CocaOutput<B: Backend> {
    /// L2-normalised image embedding [batch, embed_dim] (contrastive head).
    pub image_embedding: Option<Tensor<B, 2>>,
    /// L2-normalised text embedding [batch, embed_dim] (contrastive head).
    pub text_embedding: Option<Tensor<B, 2>>,
    /// [batch, len - 1, vocab]: position t predicts token t + 1 (captioning head).
    pub caption_logits: Option<Tensor<B, 3>>,
}

impl<B: Backend> CocaModel<B> {
    /// Builds the model; the same `seed` gives bit-identical parameters in
    /// every process.
    pub fn new(config: &ModelConfig, seed: u64, device: &B::Device) -> Self {
        Self::with(config, Init::new(seed, device))
    }

    /// The model's shapes, every parameter zero: for loading into.
    pub fn placeholder(config: &ModelConfig, device: &B::Device) -> Self {
        Self::with(config, Init::placeholder(device))
    }

    fn with(config: &ModelConfig, init: Init<B>) -> Self {
        let width = config.pooler_width();
        let pooler = |name: &str, queries: usize| {
            PoolerConfig {
                queries,
                width,
                context_width: config.vision_width,
                heads: config.pooler_heads,
                eps: config.layer_norm_eps,
                open_clip: config.architecture == Architecture::OpenClip,
            }
            .init(&init.child(name))
        };
        let (contrastive_pooler, caption_pooler) = match config.pooler_layout {
            PoolerLayout::Parallel => (
                Some(pooler("contrastive_pooler", 1)),
                pooler("caption_pooler", config.caption_queries),
            ),
            PoolerLayout::Shared => (None, pooler("caption_pooler", 1 + config.caption_queries)),
        };
        let text_width = config.text_width;
        Self {
            image_encoder: VisionTransformer::new(&init.child("image_encoder"), config),
            contrastive_pooler,
            caption_pooler,
            image_projection: init.linear("image_projection", width, config.embed_dim, fan_in_std(width), false),
            text_embedding: TextEmbedding::new(&init.child("text_embedding"), config),
            unimodal: UnimodalDecoder::new(&init.child("unimodal"), config),
            multimodal: MultimodalDecoder::new(&init.child("multimodal"), config),
            vocab_projection: VocabProjection {
                untied: (!config.tie_embeddings).then(|| {
                    init.linear(
                        "vocab_projection",
                        text_width,
                        config.vocab_size,
                        fan_in_std(text_width),
                        false,
                    )
                }),
            },
            logit_scale: init.constant([1], (1.0f32 / 0.07).ln()),
        }
    }

    /// Parameters per part, counted from the built tensors.
    pub fn param_counts(&self) -> ParamCounts {
        ParamCounts {
            image_encoder: self.image_encoder.num_params(),
            poolers: self.contrastive_pooler.num_params()
                + self.caption_pooler.num_params()
                + self.image_projection.num_params(),
            unimodal: self.unimodal.num_params() + self.logit_scale.num_params(),
            multimodal: self.multimodal.num_params(),
            embeddings: self.text_embedding.num_params() + self.vocab_projection.num_params(),
        }
    }

    /// exp(logit_scale), clamped at 100.
    pub fn logit_scale(&self) -> Tensor<B, 1> {
        logit_scale_from(self.logit_scale.val())
    }

    /// Image tokens for each head: (contrastive [batch, 1, w], caption [batch, queries, w]).
    pub(crate) fn pool(
        &self,
        image_tokens: Tensor<B, 3>,
        heads: Heads,
    ) -> (Option<Tensor<B, 3>>, Option<Tensor<B, 3>>) {
        match &self.contrastive_pooler {
            Some(contrastive) => (
                heads.contrastive.then(|| contrastive.forward(image_tokens.clone())),
                heads.captioning.then(|| self.caption_pooler.forward(image_tokens)),
            ),
            None => {
                let pooled = self.caption_pooler.forward(image_tokens);
                let [_, queries, _] = pooled.dims();
                (
                    heads.contrastive.then(|| pooled.clone().narrow(1, 0, 1)),
                    heads.captioning.then(|| pooled.narrow(1, 1, queries - 1)),
                )
            }
        }
    }

    /// The batch's images set the precision the towers compute in (f32, or
    /// bf16 for mixed precision: parameters stay f32); embeddings and
    /// logits come back in f32, so the losses and softmaxes are f32.
    pub fn forward(&self, batch: &CocaBatch<B>, heads: Heads) -> CocaOutput<B> {
        self.forward_with(batch, heads, [&mut Straight, &mut Straight])
    }

    /// [`forward`](Self::forward), the image encoder's blocks run by
    /// `stacks[0]`, the unimodal decoder's by `stacks[1]`.
    pub fn forward_with(
        &self,
        batch: &CocaBatch<B>,
        heads: Heads,
        stacks: [&mut dyn BlockStack<B>; 2],
    ) -> CocaOutput<B> {
        let [vision_stack, text_stack] = stacks;
        let compute = batch.images.dtype();
        let image_tokens =
            self.image_encoder
                .forward_with(batch.images.clone(), batch.kept_patches.as_ref(), vision_stack);
        let (contrastive_token, caption_tokens) = self.pool(image_tokens, heads);
        let image_embedding = contrastive_token.map(|token| {
            let [batch, _, width] = token.dims();
            let projected = self.image_projection.forward(token.reshape([batch, width]));
            l2_normalize(projected.cast(FloatDType::F32))
        });

        let embedded = self.text_embedding.forward(batch.tokens.clone()).cast(compute);
        let unimodal = self.unimodal.forward_with(
            embedded,
            batch.padding.clone(),
            self.cls_position(&batch.tokens),
            text_stack,
        );
        let text_embedding = heads
            .contrastive
            .then(|| l2_normalize(unimodal.cls.cast(FloatDType::F32)));
        let caption_logits = caption_tokens.map(|image_tokens| {
            // The last position has no next token to predict.
            let [_, len, _] = unimodal.states.dims();
            let states = unimodal.states.narrow(1, 0, len - 1);
            let hidden = self.multimodal.forward(states, image_tokens);
            let logits = self.vocab_projection.forward(hidden, self.text_embedding.token.val());
            logits.cast(FloatDType::F32)
        });
        CocaOutput {
            image_embedding,
            text_embedding,
            caption_logits,
        }
    }

    /// L2-normalised image embeddings (the contrastive head): [batch, embed_dim].
    pub fn embed_images(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        let heads = Heads {
            contrastive: true,
            captioning: false,
        };
        let (token, _) = self.pool(self.image_encoder.forward(images), heads);
        let token = token.expect("the contrastive head was asked for");
        let [batch, _, width] = token.dims();
        l2_normalize(self.image_projection.forward(token.reshape([batch, width])))
    }

    /// L2-normalised text embeddings (the unimodal decoder's CLS): [batch, embed_dim].
    pub fn embed_texts(&self, tokens: Tensor<B, 2, Int>, padding: Tensor<B, 2, Bool>) -> Tensor<B, 2> {
        let cls_position = self.cls_position(&tokens);
        let embedded = self.text_embedding.forward(tokens);
        l2_normalize(self.unimodal.forward(embedded, padding, cls_position).cls)
    }

    /// The position embedding of the CLS after `tokens` ([batch, len]),
    /// where it has one (open_clip's layout): row `len`.
    pub(crate) fn cls_position(&self, tokens: &Tensor<B, 2, Int>) -> Option<Tensor<B, 1>> {
        let [_, len] = tokens.dims();
        let [_, width] = self.text_embedding.position.dims();
        self.unimodal
            .open_clip
            .then(|| self.text_embedding.position.val().narrow(0, len, 1).reshape([width]))
    }

    /// Forward and loss on one batch with in-batch negatives only.
    pub fn losses(&self, batch: &CocaBatch<B>, weights: LossWeights) -> Losses<B> {
        let output = self.forward(batch, weights.heads());
        let contrastive = match (output.image_embedding, output.text_embedding) {
            (Some(image), Some(text)) => Some(contrastive_loss(
                image.clone(),
                text.clone(),
                image,
                text,
                0,
                self.logit_scale(),
            )),
            _ => None,
        };
        let captioning = output.caption_logits.map(|logits| {
            let [_, len] = batch.tokens.dims();
            captioning_loss(
                logits,
                batch.tokens.clone().narrow(1, 1, len - 1),
                batch.padding.clone().narrow(1, 1, len - 1),
            )
        });
        weights.combine(contrastive, captioning)
    }
}

/// The contrastive temperature from its learned logarithm: exp(raw),
/// clamped at 100.
pub fn logit_scale_from<B: Backend>(raw: Tensor<B, 1>) -> Tensor<B, 1> {
    raw.clamp_max(MAX_LOGIT_SCALE.ln()).exp()
}

pub(crate) fn l2_normalize<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = x.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}
