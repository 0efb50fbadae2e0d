//! `coca data` as a user runs it: the demo, real datasets installed by
//! scripts/test-deps.sh (Fashion-MNIST from Debian, Twitter emoji from npm),
//! and a real S3 server (SeaweedFS's `weed mini`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::Seaweed;

const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";
const EMOJI_PACKAGE: &str = "/opt/coca-test-data/node_modules/emoji-datasource-twitter";

fn coca(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_coca"));
    command.args(args);
    // Tests choose their own store settings.
    for name in [
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
    ] {
        command.env_remove(name);
    }
    command
        .envs(env.iter().copied())
        .output()
        .expect("the coca binary runs")
}

fn ok(output: Output) -> String {
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

fn fails(output: Output) -> String {
    assert!(
        !output.status.success(),
        "expected a failure:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn installed(path: &str) -> PathBuf {
    let path = PathBuf::from(path);
    assert!(
        path.exists(),
        "{} is missing: run scripts/test-deps.sh (it installs the test data)",
        path.display()
    );
    path
}

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path).display().to_string()
}

#[test]
fn demo_then_inspect_with_a_contact_sheet() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let text = ok(coca(
        &[
            "data",
            "demo",
            "--out",
            out.to_str().unwrap(),
            "--align-rows",
            "300",
            "--jft-rows",
            "200",
        ],
        &[],
    ));
    assert!(text.contains("/demo/align  300 rows (align)"), "{text}");
    assert!(text.contains("/demo/jft-heldout  360 rows (jft)"), "{text}");
    let sheet = dir.path().join("sheet.png");
    let text = ok(coca(
        &[
            "data",
            "inspect",
            out.join("jft").to_str().unwrap(),
            "--sheet",
            sheet.to_str().unwrap(),
            "--samples",
            "4",
        ],
        &[],
    ));
    for line in [
        "kind      jft",
        "rows      200",
        "classes   18 : red circle, circle",
        "bad       0 records",
    ] {
        assert!(text.contains(line), "missing `{line}` in\n{text}");
    }
    let image = image::open(&sheet).unwrap();
    assert_eq!((image.width(), image.height()), (2 * 132 + 4, 2 * 132 + 4));
    // Writing over a dataset is refused, and names the place.
    let error = fails(coca(&["data", "demo", "--out", out.to_str().unwrap()], &[]));
    assert!(error.contains("already holds a dataset"), "{error}");
}

#[test]
fn inspect_reports_a_damaged_shard_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    ok(coca(
        &[
            "data",
            "demo",
            "--out",
            out.to_str().unwrap(),
            "--align-rows",
            "600",
            "--jft-rows",
            "10",
        ],
        &[],
    ));
    let shard = out.join("align/shard-00001.arrow");
    let length = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(length / 2)
        .unwrap();
    let output = coca(
        &[
            "data",
            "inspect",
            out.join("align").to_str().unwrap(),
            "--sheet",
            dir.path().join("s.png").to_str().unwrap(),
        ],
        &[],
    );
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let error = fails(output);
    assert!(
        text.contains(&format!("FAILED    file://{}: checksum mismatch", shard.display())),
        "{text}"
    );
    assert!(error.contains("1 of 2 shards failed verification"), "{error}");
}

#[test]
fn fashion_mnist_imports_from_its_idx_files() {
    let images = installed(FASHION_MNIST).join("t10k-images-idx3-ubyte.gz");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fashion");
    let text = ok(coca(
        &[
            "data",
            "import",
            "--format",
            "idx",
            "--src",
            images.to_str().unwrap(),
            "--classes",
            &repo("deploy/data/fashion-mnist-classes.txt"),
            "--out",
            out.to_str().unwrap(),
            "--shard-rows",
            "1000",
            "--limit",
            "2500",
        ],
        &[],
    ));
    assert!(text.contains("2500 rows in 3 shards (jft), 0 skipped"), "{text}");
    let text = ok(coca(
        &[
            "data",
            "inspect",
            out.to_str().unwrap(),
            "--sheet",
            dir.path().join("s.png").to_str().unwrap(),
        ],
        &[],
    ));
    assert!(
        text.contains("classes   10 : T-shirt/top | Trouser | Pullover"),
        "{text}"
    );
    assert!(text.contains("bad       0 records"), "{text}");
    // Without the class list, the error says what to pass.
    let error = fails(coca(
        &[
            "data",
            "import",
            "--format",
            "idx",
            "--src",
            images.to_str().unwrap(),
            "--out",
            dir.path().join("x").to_str().unwrap(),
        ],
        &[],
    ));
    assert!(error.contains("the idx format needs --classes FILE"), "{error}");
}

#[test]
fn twitter_emoji_import_as_captioned_images() {
    let package = installed(EMOJI_PACKAGE);
    let dir = tempfile::tempdir().unwrap();
    let captions = dir.path().join("emoji.jsonl");
    let script = Command::new("python3")
        .args([
            &repo("scripts/emoji_captions.py"),
            package.to_str().unwrap(),
            captions.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(script.status.success(), "{}", String::from_utf8_lossy(&script.stderr));
    let out = dir.path().join("emoji");
    let text = ok(coca(
        &[
            "data",
            "import",
            "--format",
            "captions",
            "--src",
            captions.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    ));
    assert!(text.contains("3786 rows in 1 shards (align), 0 skipped"), "{text}");
    let text = ok(coca(
        &[
            "data",
            "inspect",
            out.to_str().unwrap(),
            "--sheet",
            dir.path().join("s.png").to_str().unwrap(),
            "--samples",
            "2",
        ],
        &[],
    ));
    assert!(
        text.contains("1  a grinning face emoji (face smiling, smileys & emotion)"),
        "{text}"
    );
}

#[test]
fn datasets_round_trip_through_s3() {
    let _weed = Seaweed::start(None);
    let credentials = Seaweed::CREDENTIALS;
    let dir = tempfile::tempdir().unwrap();
    let text = ok(coca(
        &[
            "data",
            "demo",
            "--out",
            "s3://coca-test/demo",
            "--align-rows",
            "100",
            "--jft-rows",
            "50",
        ],
        &credentials,
    ));
    assert!(text.contains("s3://coca-test/demo/align  100 rows (align)"), "{text}");
    // Importing into S3 from a local folder of images.
    std::fs::create_dir_all(dir.path().join("images/square")).unwrap();
    for i in 0..3 {
        let path = dir.path().join(format!("images/square/{i}.png"));
        image::RgbImage::from_pixel(8, 8, image::Rgb([i * 80, 0, 0]))
            .save(path)
            .unwrap();
    }
    let text = ok(coca(
        &[
            "data",
            "import",
            "--format",
            "imagefolder",
            "--src",
            dir.path().join("images").to_str().unwrap(),
            "--out",
            "s3://coca-test/folders",
        ],
        &credentials,
    ));
    assert!(
        text.contains("s3://coca-test/folders: 3 rows in 1 shards (jft)"),
        "{text}"
    );
    let sheet = dir.path().join("s.png");
    let text = ok(coca(
        &[
            "data",
            "inspect",
            "s3://coca-test/demo/jft",
            "--sheet",
            sheet.to_str().unwrap(),
        ],
        &credentials,
    ));
    assert!(
        text.contains("rows      50") && text.contains("bad       0 records"),
        "{text}"
    );
    // A tokenizer trained from S3 datasets, written to S3.
    let text = ok(coca(
        &[
            "data",
            "tokenizer",
            "--data",
            "s3://coca-test/demo/align",
            "--data",
            "s3://coca-test/demo/jft",
            "--vocab-size",
            "300",
            "--out",
            "s3://coca-test/tok/tokenizer.json",
        ],
        &credentials,
    ));
    assert!(
        text.starts_with("s3://coca-test/tok/tokenizer.json: 300 tokens"),
        "{text}"
    );

    // A job reading its data from S3 and checkpointing to S3, resumed from
    // there, and exported from there.
    let manifest = format!(
        r#"
[job]
name = "s3"
steps = 6
dir = "{dir}/run"
[model]
preset = "tiny"
[data]
tokenizer = "s3://coca-test/tok/tokenizer.json"
s3_endpoint = "http://127.0.0.1:8333"
s3_region = "us-east-1"
loader_threads = 1
[[data.source]]
url = "s3://coca-test/demo/align"
kind = "align"
[[data.source]]
url = "s3://coca-test/demo/jft"
kind = "jft"
[train]
global_batch = 8
[cluster]
workers = 2
coordinator = "127.0.0.1:0"
[checkpoint]
url = "s3://coca-test/runs/checkpoints"
every = 3
keep = 2
[status]
bind = "127.0.0.1:0"
"#,
        dir = dir.path().display()
    );
    let job = dir.path().join("s3.toml");
    std::fs::write(&job, manifest).unwrap();
    ok(coca(&["launch", job.to_str().unwrap()], &credentials));
    let resumed = coca(&["launch", job.to_str().unwrap(), "--steps", "9"], &credentials);
    let stderr = String::from_utf8_lossy(&resumed.stderr).to_string();
    assert!(resumed.status.success(), "{stderr}");
    assert!(
        stderr.contains("resuming from s3://coca-test/runs/checkpoints/step-00000006 (step 6, saved by 2 workers)"),
        "{stderr}"
    );
    let model = dir.path().join("model.safetensors");
    let text = ok(coca(
        &[
            "export",
            "--checkpoint",
            "s3://coca-test/runs/checkpoints",
            "--out",
            model.to_str().unwrap(),
        ],
        &credentials,
    ));
    assert!(
        text.starts_with("exported step 9 of s3://coca-test/runs/checkpoints/step-00000009"),
        "{text}"
    );

    let mut wrong = credentials;
    wrong[2].1 = "not-the-secret";
    let error = fails(coca(&["data", "inspect", "s3://coca-test/demo/jft"], &wrong));
    assert!(
        error.contains("s3://coca-test/demo/jft/index.json: access denied (SignatureDoesNotMatch"),
        "{error}"
    );
    let error = fails(coca(&["data", "inspect", "s3://no-such-bucket/demo"], &credentials));
    assert!(
        error.contains("s3://no-such-bucket/demo/index.json: bucket `no-such-bucket` does not exist"),
        "{error}"
    );
    let error = fails(coca(&["data", "inspect", "s3://coca-test/nothing-here"], &credentials));
    assert!(
        error.contains("s3://coca-test/nothing-here: no dataset here"),
        "{error}"
    );
}
