//! open_clip interop end to end, through the command line: `coca import
//! open-clip` of the fixture (tests/fixtures/open_clip, made with open_clip
//! 3.3.0 by scripts/make_openclip_fixture.py), `coca export --format
//! open-clip` back to the same bytes, `coca embed`, `coca caption`, and a
//! job started from the import with `coca launch --from`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::coca;
use safetensors::SafeTensors;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/open_clip");
const DEMO: &str = include_str!("../deploy/local/demo.toml");

fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn failed(output: Output) -> String {
    assert!(!output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
    String::from_utf8(output.stderr).unwrap()
}

fn fixture(name: &str) -> String {
    format!("{FIXTURE}/{name}")
}

/// A word-level tokenizer small enough for the fixture's 64-token vocabulary.
fn small_tokenizer(dir: &Path) -> PathBuf {
    let words = [
        "a", "photo", "of", "the", "cat", "dog", "red", "blue", "green", "circle", "square", "star", "triangle",
    ];
    let specials = ["<pad>", "<bos>", "<eos>", "<unk>"];
    let vocab: serde_json::Map<String, serde_json::Value> = specials
        .iter()
        .chain(&words)
        .enumerate()
        .map(|(id, token)| (token.to_string(), id.into()))
        .collect();
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(id, token)| {
            serde_json::json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    let path = dir.join("small-tokenizer.json");
    std::fs::write(&path, tokenizer.to_string()).unwrap();
    path
}

/// Every tensor of a safetensors file: name -> (shape, bytes).
fn tensors(path: &str) -> BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .map(|(name, view)| (name, (view.shape().to_vec(), view.data().to_vec())))
        .collect()
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(bytes)
}

/// Imports the fixture into `dir/imported`; returns the step directory.
fn import(dir: &Path) -> String {
    let tokenizer = small_tokenizer(dir);
    let printed = ok(coca(
        dir,
        &[
            "import",
            "open-clip",
            "--weights",
            &fixture("open_clip.safetensors"),
            "--config",
            &fixture("config.json"),
            "--tokenizer",
            tokenizer.to_str().unwrap(),
            "--out",
            "imported",
        ],
    ));
    assert!(printed.contains("coca launch MANIFEST --from"), "{printed}");
    let step = dir.join("imported/step-00000000");
    assert!(step.join("COMMITTED").exists() && step.join("tokenizer.json").exists());
    step.to_str().unwrap().to_string()
}

#[test]
fn import_then_export_gives_back_every_tensors_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let step = import(dir.path());
    let printed = ok(coca(
        dir.path(),
        &[
            "export",
            "--checkpoint",
            &step,
            "--format",
            "open-clip",
            "--out",
            "back.safetensors",
        ],
    ));
    assert!(printed.contains("back.json"), "{printed}");
    let theirs = tensors(&fixture("open_clip.safetensors"));
    let back = tensors(dir.path().join("back.safetensors").to_str().unwrap());
    assert_eq!(back.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
    for (name, (shape, bytes)) in &theirs {
        assert_eq!(&back[name].0, shape, "{name}");
        assert!(back[name].1 == *bytes, "{name}: other bytes");
    }
    // The model JSON beside it reads as the same configuration.
    let config =
        |path: &Path| model::open_clip::config_from_json(&std::fs::read_to_string(path).unwrap(), "json").unwrap();
    assert_eq!(
        config(&dir.path().join("back.json")),
        config(Path::new(&fixture("config.json")))
    );
}

#[test]
fn embed_writes_normalised_rows_in_input_order() {
    let dir = tempfile::tempdir().unwrap();
    let step = import(dir.path());
    let photos = ["photo-0.jpg", "photo-1.jpg", "photo-2.png"].map(fixture);
    let mut args = vec![
        "embed",
        "--checkpoint",
        &step,
        "--out",
        "images.safetensors",
        "--images",
    ];
    args.extend(photos.iter().map(String::as_str));
    ok(coca(dir.path(), &args));
    let bytes = std::fs::read(dir.path().join("images.safetensors")).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = header.metadata().clone().unwrap();
    assert_eq!(metadata["kind"], "image");
    let inputs: Vec<String> = serde_json::from_str(&metadata["inputs"]).unwrap();
    assert_eq!(inputs, photos.to_vec());
    let ours = tensors(dir.path().join("images.safetensors").to_str().unwrap());
    let expected = tensors(&fixture("expected.safetensors"));
    assert_eq!(ours["embeddings"].0, vec![3, 32]);
    // open_clip's image features of the same photos (through its own JPEG
    // decoder and resampling, hence not bit-identical).
    let difference = floats(&ours["embeddings"].1)
        .iter()
        .zip(floats(&expected["image_features"].1))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(difference < 5e-3, "{difference}");

    std::fs::write(
        dir.path().join("texts.txt"),
        "a photo of the cat\na red circle\nthe blue star\n",
    )
    .unwrap();
    ok(coca(
        dir.path(),
        &[
            "embed",
            "--checkpoint",
            &step,
            "--texts",
            "texts.txt",
            "--out",
            "texts.safetensors",
        ],
    ));
    let texts = tensors(dir.path().join("texts.safetensors").to_str().unwrap());
    assert_eq!(texts["embeddings"].0, vec![3, 32]);
    for row in floats(&texts["embeddings"].1).chunks(32) {
        let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    }
    // A file that is not an image is named.
    let error = failed(coca(
        dir.path(),
        &[
            "embed",
            "--checkpoint",
            &step,
            "--out",
            "x.safetensors",
            "--images",
            "texts.txt",
        ],
    ));
    assert!(error.contains("texts.txt"), "{error}");
    // The imported checkpoint captions too.
    let caption = ok(coca(
        dir.path(),
        &["caption", "--checkpoint", &step, &photos[0], "--max-len", "4"],
    ));
    assert!(caption.starts_with(&photos[0]), "{caption}");
}

#[test]
fn import_refuses_what_it_cannot_place() {
    let dir = tempfile::tempdir().unwrap();
    let weights = fixture("open_clip.safetensors");
    let args = |config: &str, out: &str| -> Vec<String> {
        [
            "import",
            "open-clip",
            "--weights",
            &weights,
            "--config",
            config,
            "--out",
            out,
        ]
        .map(String::from)
        .to_vec()
    };
    let run = |args: Vec<String>| coca(dir.path(), &args.iter().map(String::as_str).collect::<Vec<_>>());
    // CLIP's tokenizer does not fit the fixture's 64-token vocabulary.
    let error = failed(run(args(&fixture("config.json"), "a")));
    assert!(
        error.contains("CLIP's BPE tokenizer has 49408 tokens, more than the model's vocabulary (64)"),
        "{error}"
    );
    // A named configuration whose shapes the file does not have.
    let error = failed(run(args("coca_ViT-B-32", "b")));
    assert!(
        error.contains("`visual.conv1.weight`: shape [48, 3, 8, 8], the configuration wants [768, 3, 32, 32]"),
        "{error}"
    );
    // Neither a name nor a file.
    let error = failed(run(args("coca_ViT-H-14", "c")));
    assert!(
        error.contains("--config coca_ViT-H-14: neither a known name (coca_ViT-B-32, coca_ViT-L-14)"),
        "{error}"
    );
    // A location that already holds a step is not overwritten.
    import(dir.path());
    let tokenizer = dir.path().join("small-tokenizer.json");
    let mut again = args(&fixture("config.json"), "imported");
    again.extend(["--tokenizer".to_string(), tokenizer.to_str().unwrap().to_string()]);
    let error = failed(run(again));
    assert!(error.contains("already holds committed step 0"), "{error}");
}

#[test]
fn a_job_trains_on_from_the_import() {
    let dir = tempfile::tempdir().unwrap();
    let step = import(dir.path());
    let config =
        model::open_clip::config_from_json(&std::fs::read_to_string(fixture("config.json")).unwrap(), "c").unwrap();
    let model_table = format!("[model]\npreset = \"tiny\"\n{}", toml::to_string(&config).unwrap());
    let manifest = DEMO
        .replace("steps = 300", "steps = 3")
        .replace("warmup_steps = 10", "warmup_steps = 1")
        .replace("[model]\npreset = \"tiny\"\n", &format!("{model_table}\n"))
        .replace(
            "tokenizer = \"data/demo/tokenizer.json\"",
            &format!("tokenizer = \"{step}/tokenizer.json\""),
        )
        .replace("workers = 2", "workers = 1")
        .replace("coordinator = \"127.0.0.1:7070\"", "coordinator = \"127.0.0.1:0\"")
        .replace("bind = \"127.0.0.1:7071\"", "bind = \"127.0.0.1:0\"")
        .replace("every = 100\nkeep = 2", "every = 3\nkeep = 2");
    let manifest =
        manifest[..manifest.find("[eval]").unwrap()].to_string() + &manifest[manifest.find("[status]").unwrap()..];
    std::fs::write(dir.path().join("job.toml"), &manifest).unwrap();
    ok(coca(dir.path(), &["launch", "job.toml", "--from", &step]));
    let trained = dir.path().join("runs/demo/checkpoints/step-00000003");
    assert!(trained.join("COMMITTED").exists());
    for (checkpoint, out) in [
        (step.as_str(), "imported.safetensors"),
        (trained.to_str().unwrap(), "trained.safetensors"),
    ] {
        ok(coca(
            dir.path(),
            &[
                "export",
                "--checkpoint",
                checkpoint,
                "--format",
                "open-clip",
                "--out",
                out,
            ],
        ));
    }
    let imported = tensors(dir.path().join("imported.safetensors").to_str().unwrap());
    let trained = tensors(dir.path().join("trained.safetensors").to_str().unwrap());
    // Three small AdamW steps from the imported weights: every tensor moved
    // a little, none far (a fresh initialisation would be far from them).
    let mut largest = 0.0f32;
    for (name, (_, bytes)) in &imported {
        let moved = floats(bytes)
            .iter()
            .zip(floats(&trained[name].1))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        largest = largest.max(moved);
    }
    println!("largest change in 3 steps: {largest}");
    assert!(largest > 0.0 && largest < 0.02, "{largest}");
}
