//! What a trained model does, end to end: the demo job trains, then `coca
//! eval` and `coca caption` judge its checkpoint and its export.

mod common;

use std::path::Path;
use std::process::Output;

use common::coca;

const DEMO: &str = include_str!("../deploy/local/demo.toml");

fn json(output: &Output) -> serde_json::Value {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// `coca eval TASK --checkpoint .. --data .. EXTRA.. --json`, parsed.
fn evaluate(dir: &Path, task: &str, checkpoint: &str, data: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["eval", task, "--checkpoint", checkpoint, "--data", data, "--json"];
    args.extend_from_slice(extra);
    json(&coca(dir, &args))
}

/// Share of captions holding `word`, among those whose reference does or does not.
fn rate(captions: &[serde_json::Value], word: &str, in_reference: bool) -> f64 {
    let chosen: Vec<&serde_json::Value> = captions
        .iter()
        .filter(|c| words(c["references"][0].as_str().unwrap()).contains(&word.to_string()) == in_reference)
        .collect();
    let hits = chosen
        .iter()
        .filter(|c| words(c["caption"].as_str().unwrap()).contains(&word.to_string()))
        .count();
    hits as f64 / chosen.len().max(1) as f64
}

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric()).map(str::to_string).collect()
}

#[test]
fn a_trained_demo_model_classifies_retrieves_and_captions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let manifest = DEMO
        .replace("coordinator = \"127.0.0.1:7070\"", "coordinator = \"127.0.0.1:0\"")
        .replace("bind = \"127.0.0.1:7071\"", "bind = \"127.0.0.1:0\"");
    std::fs::write(path.join("job.toml"), manifest).unwrap();
    let trained = coca(path, &["launch", "job.toml"]);
    assert!(trained.status.success(), "{}", String::from_utf8_lossy(&trained.stderr));
    let checkpoint = "runs/demo/checkpoints";

    // Zero-shot on held-out images: 18 classes, chance is 1/18.
    let zeroshot = evaluate(path, "zeroshot", checkpoint, "data/demo/jft-heldout", &[]);
    let top1 = zeroshot["top1"].as_f64().unwrap();
    assert!(top1 >= 3.0 / 18.0, "top-1 {top1} is under 3x chance");
    assert_eq!(zeroshot["per_class"].as_array().unwrap().len(), 18);
    assert!(
        std::fs::read_dir(path)
            .unwrap()
            .flatten()
            .all(|e| e.path().extension().is_none_or(|x| x != "png")),
        "an evaluation draws no picture unless asked"
    );

    // The job's own [eval] (zero-shot, first 256 held-out images, simple
    // templates) ran every 100 steps and agrees with `coca eval`.
    let metrics = std::fs::read_to_string(path.join("runs/demo/metrics.jsonl")).unwrap();
    let evals: Vec<serde_json::Value> = metrics
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|m| m.get("evals").is_some())
        .collect();
    let steps: Vec<u64> = evals.iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [100, 200, 300]);
    let same = evaluate(
        path,
        "zeroshot",
        checkpoint,
        "data/demo/jft-heldout",
        &["--templates", "simple", "--limit", "256", "--confusion", "matrix.png"],
    );
    assert_eq!(evals[2]["evals"]["zeroshot_top1"], same["top1"]);
    // The matrix drawn on request: 18 classes at 48 px, names and title around them.
    let confusion = image::open(path.join("matrix.png")).unwrap();
    assert!(
        confusion.width() > 18 * 48 && confusion.height() > 18 * 48,
        "{:?}",
        (confusion.width(), confusion.height())
    );

    // The export is the same model.
    let export = coca(
        path,
        &["export", "--checkpoint", checkpoint, "--out", "model.safetensors"],
    );
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    // The same step exports to the same bytes, run after run.
    for again in ["again.safetensors", "again2.safetensors"] {
        let export = coca(path, &["export", "--checkpoint", checkpoint, "--out", again]);
        assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
        assert!(
            std::fs::read(path.join(again)).unwrap() == std::fs::read(path.join("model.safetensors")).unwrap(),
            "{again} differs from model.safetensors"
        );
    }
    let exported = evaluate(path, "zeroshot", "model.safetensors", "data/demo/jft-heldout", &[]);
    assert_eq!(exported["top1"], zeroshot["top1"]);
    assert_eq!(exported["confusion"], zeroshot["confusion"]);

    // Retrieval among 100 pairs: chance at R@10 is 10%.
    let retrieval = evaluate(path, "retrieval", checkpoint, "data/demo/align", &["--limit", "100"]);
    for direction in ["image_to_text", "text_to_image"] {
        let r10 = retrieval[direction][2].as_f64().unwrap();
        assert!(r10 >= 0.3, "{direction} R@10 {r10}");
    }

    // Captions of held-out images name their colour and shape more often
    // than they name the colours and shapes the images do not have.
    let captioned = evaluate(
        path,
        "caption",
        "model.safetensors",
        "data/demo/jft-heldout",
        &["--limit", "120"],
    );
    let captions = captioned["captions"].as_array().unwrap();
    assert_eq!(captions.len(), 120);
    assert!(captioned["bleu4"].as_f64().unwrap() > 0.0);
    assert!(captioned["cider_d"].as_f64().unwrap() > 0.0);
    for (words, factor) in [
        (&["red", "green", "blue", "yellow", "purple", "orange"][..], 2.0),
        (&["circle", "square", "triangle"][..], 1.0),
    ] {
        let right: f64 = words.iter().map(|w| rate(captions, w, true)).sum::<f64>() / words.len() as f64;
        let wrong: f64 = words.iter().map(|w| rate(captions, w, false)).sum::<f64>() / words.len() as f64;
        assert!(
            right > factor * wrong,
            "{words:?}: named when right {right:.2}, when wrong {wrong:.2}"
        );
    }

    // `coca caption` on image files, with beam search.
    let sheet = coca(
        path,
        &["data", "inspect", "data/demo/jft-heldout", "--sheet", "sheet.png"],
    );
    assert!(sheet.status.success(), "{}", String::from_utf8_lossy(&sheet.stderr));
    let captioned = json(&coca(
        path,
        &[
            "caption",
            "--checkpoint",
            "model.safetensors",
            "--beam",
            "3",
            "--json",
            "sheet.png",
        ],
    ));
    assert!(!captioned[0]["caption"].as_str().unwrap().is_empty(), "{captioned}");
    // open_clip's generation options; each bad one refused by name.
    let caption_with = |options: &[&str]| {
        let mut args = vec!["caption", "--checkpoint", "model.safetensors", "--json"];
        args.extend_from_slice(options);
        args.push("sheet.png");
        coca(path, &args)
    };
    let sampled = json(&caption_with(&[
        "--temperature",
        "0.7",
        "--top-k",
        "5",
        "--repetition-penalty",
        "1.3",
        "--min-len",
        "2",
        "--stop",
        "circle",
    ]));
    let words = sampled[0]["caption"].as_str().unwrap().split_whitespace().count();
    assert!(words >= 2, "{sampled}");
    for (options, message) in [
        (
            &["--stop", "red circle"][..],
            "--stop \"red circle\": `red circle` is 2 tokens of this tokenizer, not one",
        ),
        (
            &["--temperature", "1", "--top-k", "0"][..],
            "--top-k must be at least 1",
        ),
        (
            &["--repetition-penalty", "0"][..],
            "--repetition-penalty must be a positive number (1: off)",
        ),
        (&["--min-len", "40"][..], "--min-len 40 is more than --max-len 32"),
    ] {
        let refused = caption_with(options);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && stderr.contains(message),
            "{options:?}: {stderr}"
        );
    }
    // Zero-shot on a folder of class folders, read in place: ImageNet-1k's
    // classes and names from WordNet-id folders, or the folder names.
    for (folder, images) in [("n01440764", ["a.png", "b.png"].as_slice()), ("n01443537", &["c.png"])] {
        let dir = path.join("imagenet").join(folder);
        std::fs::create_dir_all(&dir).unwrap();
        for image in images {
            std::fs::copy(path.join("sheet.png"), dir.join(image)).unwrap();
        }
        std::fs::write(dir.join("notes.txt"), "not an image").unwrap();
    }
    let imagenet = evaluate(
        path,
        "zeroshot",
        "model.safetensors",
        "imagenet",
        &["--classes", "imagenet1k"],
    );
    assert_eq!(
        (imagenet["samples"].as_u64(), imagenet["classes"].as_u64()),
        (Some(3), Some(1000))
    );
    assert_eq!(imagenet["templates"], 80);
    let per_class = &imagenet["per_class"];
    assert_eq!(
        (per_class[0]["class"].as_str(), per_class[0]["total"].as_u64()),
        (Some("tench"), Some(2))
    );
    assert_eq!(
        (per_class[1]["class"].as_str(), per_class[1]["total"].as_u64()),
        (Some("goldfish"), Some(1))
    );
    let named = evaluate(path, "zeroshot", "model.safetensors", "imagenet", &[]);
    assert_eq!(named["classes"], 2);
    assert_eq!(named["per_class"][1]["class"], "n01443537");
    std::fs::create_dir_all(path.join("imagenet/cat")).unwrap();
    for (data, message) in [
        (
            "imagenet",
            "imagenet/cat: not an ImageNet WordNet id (like n01440764), and imagenet holds 3 class folders, not 1000",
        ),
        (
            "data/demo/jft-heldout",
            "--classes names the classes of a folder of class folders; data/demo/jft-heldout is a dataset with its own",
        ),
    ] {
        let refused = coca(
            path,
            &[
                "eval",
                "zeroshot",
                "--checkpoint",
                "model.safetensors",
                "--data",
                data,
                "--classes",
                "imagenet1k",
            ],
        );
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success() && stderr.contains(message), "{stderr}");
    }
    let missing = coca(path, &["caption", "--checkpoint", "model.safetensors", "nowhere.png"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read nowhere.png"));

    // A job's [eval] datasets are checked before it starts.
    let manifest = std::fs::read_to_string(path.join("job.toml")).unwrap();
    std::fs::write(
        path.join("job.toml"),
        manifest.replace("zeroshot = \"data/demo/jft-heldout\"", "zeroshot = \"data/demo/align\""),
    )
    .unwrap();
    let refused = coca(path, &["launch", "job.toml", "--fresh"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("eval.zeroshot (data/demo/align): the dataset is align; eval.zeroshot needs a jft dataset"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // Each evaluation checks the dataset's kind.
    let wrong = coca(
        path,
        &[
            "eval",
            "zeroshot",
            "--checkpoint",
            checkpoint,
            "--data",
            "data/demo/align",
        ],
    );
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr)
            .contains("is an align dataset; zero-shot classification needs a jft one"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
}
