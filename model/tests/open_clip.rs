//! An open_clip CoCa imported here computes what open_clip computes. The
//! fixture (tests/fixtures/open_clip, made by
//! scripts/make_openclip_fixture.py with open_clip 3.3.0 and PyTorch) holds
//! a small randomly initialised open_clip CoCa of its own configuration,
//! three real photos, open_clip's eval transform of them, and its outputs.

use burn::tensor::{Int, Tensor, TensorData};
use datasets::image::{self, Crop};
use model::backend::Cpu;
use model::loss::LossWeights;
use model::open_clip::{self, OpenClipError};
use model::{CocaBatch, CocaModel};
use safetensors::SafeTensors;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/open_clip");

fn read(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURE}/{name}")).unwrap_or_else(|e| panic!("{FIXTURE}/{name}: {e}"))
}

fn config() -> contract::ModelConfig {
    open_clip::config_from_json(&String::from_utf8(read("config.json")).unwrap(), "config.json").unwrap()
}

fn imported() -> CocaModel<Cpu> {
    open_clip::import(
        &config(),
        &read("open_clip.safetensors"),
        "open_clip.safetensors",
        &Default::default(),
    )
    .unwrap()
}

struct Expected {
    bytes: Vec<u8>,
}

impl Expected {
    fn load() -> Self {
        Self {
            bytes: read("expected.safetensors"),
        }
    }

    fn tensor<const D: usize>(&self, name: &str) -> Tensor<Cpu, D> {
        let file = SafeTensors::deserialize(&self.bytes).unwrap();
        let view = file.tensor(name).unwrap();
        let values: Vec<f32> = bytemuck::pod_collect_to_vec(view.data());
        Tensor::from_data(TensorData::new(values, view.shape().to_vec()), &Default::default())
    }

    fn tokens(&self) -> Tensor<Cpu, 2, Int> {
        let file = SafeTensors::deserialize(&self.bytes).unwrap();
        let view = file.tensor("tokens").unwrap();
        let ids: Vec<i64> = bytemuck::pod_collect_to_vec(view.data());
        Tensor::from_data(TensorData::new(ids, view.shape().to_vec()), &Default::default())
    }
}

/// The largest absolute difference; printed for the record.
fn max_difference<const D: usize>(name: &str, ours: Tensor<Cpu, D>, theirs: Tensor<Cpu, D>) -> f32 {
    assert_eq!(ours.dims(), theirs.dims(), "{name}");
    let difference: f32 = (ours - theirs).abs().max().into_scalar();
    println!("{name}: largest absolute difference {difference:e}");
    difference
}

#[test]
fn outputs_equal_open_clips_within_1e4() {
    let model = imported();
    let expected = Expected::load();
    let pixels: Tensor<Cpu, 4> = expected.tensor("pixels");
    let tokens = expected.tokens();
    // open_clip treats id 0 as padding wherever it is.
    let padding = tokens.clone().equal_elem(0);
    let batch = CocaBatch {
        images: pixels.clone(),
        tokens: tokens.clone(),
        padding: padding.clone(),
        kept_patches: None,
    };
    let weights = LossWeights {
        contrastive: 1.0,
        captioning: 2.0,
    };
    let output = model.forward(&batch, weights.heads());
    let losses = model.losses(&batch, weights);
    let checks = [
        max_difference(
            "image features",
            model.embed_images(pixels),
            expected.tensor("image_features"),
        ),
        max_difference(
            "text features",
            model.embed_texts(tokens, padding),
            expected.tensor("text_features"),
        ),
        max_difference(
            "captioning logits",
            output.caption_logits.unwrap(),
            expected.tensor("logits"),
        ),
        max_difference("logit scale", model.logit_scale(), expected.tensor("logit_scale")),
        max_difference(
            "contrastive loss",
            losses.contrastive.unwrap(),
            expected.tensor("loss_contrastive"),
        ),
        max_difference(
            "captioning loss",
            losses.captioning.unwrap(),
            expected.tensor("loss_captioning"),
        ),
        max_difference("CoCa loss", losses.total, expected.tensor("loss_total")),
    ];
    assert!(checks.iter().all(|&d| d <= 1e-4), "{checks:?}");
}

#[test]
fn photos_prepared_here_embed_as_open_clips_transform_does() {
    let model = imported();
    let expected = Expected::load();
    let size = config().image_size;
    let theirs: Tensor<Cpu, 4> = expected.tensor("pixels");
    let photos = ["photo-0.jpg", "photo-1.jpg", "photo-2.png"];
    let pixels: Vec<f32> = photos
        .iter()
        .flat_map(|name| image::prepare(&image::decode(&read(name)).unwrap(), size as u32, Crop::Centre, 0))
        .collect();
    let ours = Tensor::<Cpu, 4>::from_data(TensorData::new(pixels, [3, 3, size, size]), &Default::default());
    // One level of 255 in normalised units (the smallest std's).
    let level = 1.0 / (255.0 * 0.261_302_6) + 1e-6;
    for (i, name) in photos.iter().enumerate() {
        let difference = max_difference(
            &format!("{name} pixels (normalised)"),
            ours.clone().narrow(0, i, 1),
            theirs.clone().narrow(0, i, 1),
        );
        // The PNG's pixels are the same bytes and resampled in PIL's own
        // arithmetic: the same values. JPEG decoders differ (libjpeg's chroma
        // upsampling in PIL): a few levels at sharp colour edges.
        let allowed = if name.ends_with(".png") { 1e-6 } else { 5.0 * level };
        assert!(difference <= allowed, "{name}: {difference}");
    }
    let embedding = max_difference(
        "image features from our preprocessing",
        model.embed_images(ours),
        expected.tensor("image_features"),
    );
    assert!(embedding < 5e-3, "{embedding}");
}

#[test]
fn bad_inputs_are_errors_naming_the_tensor_or_field() {
    let device = Default::default();
    let weights = read("open_clip.safetensors");
    let import = |config: &contract::ModelConfig, bytes: &[u8]| {
        open_clip::import::<Cpu>(config, bytes, "w.safetensors", &device).map(|_| ())
    };

    // A truncated file.
    let error = import(&config(), &weights[..weights.len() / 2]).unwrap_err();
    assert!(matches!(error, OpenClipError::Format { .. }), "{error}");
    assert!(
        error
            .to_string()
            .starts_with("w.safetensors: not a whole safetensors file"),
        "{error}"
    );

    // A configuration that disagrees with the tensors' shapes: the error
    // names the tensor, both shapes and our parameter.
    let mut wider = config();
    wider.vision_width = 64;
    wider.vision_mlp = 256;
    wider.vision_heads = 4;
    let error = import(&wider, &weights).unwrap_err().to_string();
    assert!(
        error.starts_with(
            "w.safetensors: `visual.conv1.weight`: shape [48, 3, 8, 8], the configuration wants [64, 3, 8, 8]"
        ),
        "{error}"
    );
    let mut deeper = config();
    deeper.unimodal_layers = 3;
    let error = import(&deeper, &weights).unwrap_err().to_string();
    assert!(
        error.contains("`text.transformer.resblocks.2.ln_1.weight`: missing"),
        "{error}"
    );
    let mut shallower = config();
    shallower.multimodal_layers = 1;
    let error = import(&shallower, &weights).unwrap_err().to_string();
    assert!(
        error.contains("the configuration has no place for: text_decoder.cross_attn.1."),
        "{error}"
    );

    // A CLIP (not CoCa) state dict: only the image and text towers.
    let file = SafeTensors::deserialize(&weights).unwrap();
    let clip: Vec<(String, safetensors::tensor::TensorView)> = file
        .tensors()
        .into_iter()
        .filter(|(name, _)| !name.starts_with("text_decoder.") && name != "text.cls_emb")
        .collect();
    let clip = safetensors::serialize(clip, None).unwrap();
    let error = import(&config(), &clip).unwrap_err();
    assert_eq!(
        error.to_string(),
        "w.safetensors: holds a CLIP model's state dict (no `text_decoder.*` or `text.cls_emb` tensors), not a CoCa's"
    );

    // open_clip's training checkpoints prefix every name with `module.`.
    let prefixed: Vec<(String, safetensors::tensor::TensorView)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| (format!("module.{name}"), view))
        .collect();
    import(&config(), &safetensors::serialize(prefixed, None).unwrap()).unwrap();
}
