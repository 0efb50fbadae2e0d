//! Checkpoints end to end with `coca launch`: stop and resume equals the
//! straight run bit for bit, other world sizes resume, changed manifests
//! are refused, damaged steps are skipped, a store that fails or fills up
//! mid-save is waited for, export writes one file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::children;

const DEMO: &str = include_str!("../deploy/local/demo.toml");

/// The demo manifest on system-chosen ports, checkpointing every `every`
/// steps, with `edits` applied to its text, in `dir`.
fn manifest(dir: &Path, every: u64, edits: &[(&str, &str)]) -> PathBuf {
    let mut text = DEMO
        .replace("coordinator = \"127.0.0.1:7070\"", "coordinator = \"127.0.0.1:0\"")
        .replace("bind = \"127.0.0.1:7071\"", "bind = \"127.0.0.1:0\"")
        .replace("every = 100", &format!("every = {every}"))
        .replace("warmup_steps = 10", "warmup_steps = 2");
    for (from, to) in edits {
        assert!(text.contains(from), "the demo manifest has `{from}`");
        text = text.replace(from, to);
    }
    let path = dir.join("job.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn launch(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_coca"))
        .arg("launch")
        .arg(dir.join("job.toml"))
        .args(args)
        .current_dir(dir)
        .env_remove("COCA_JOB_TOKEN")
        .output()
        .unwrap()
}

fn ok(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(
        output.status.success(),
        "coca launch failed:\n{}\n{stderr}",
        String::from_utf8_lossy(&output.stdout)
    );
    stderr
}

fn failed(output: &Output) -> String {
    assert!(!output.status.success(), "coca launch should have failed");
    String::from_utf8_lossy(&output.stderr).to_string()
}

/// metrics.jsonl: one object per step.
fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("runs/demo/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// Whether metrics.jsonl has `steps` lines yet (the job may be writing it).
fn has_trained(dir: &Path, steps: usize) -> bool {
    std::fs::read_to_string(dir.join("runs/demo/metrics.jsonl")).map_or(0, |text| text.lines().count()) >= steps
}

/// The step of each line of metrics.jsonl, in order.
fn steps_trained(dir: &Path) -> Vec<u64> {
    metrics(dir).iter().map(|m| m["step"].as_u64().unwrap()).collect()
}

fn committed(dir: &Path, step: u64) -> serde_json::Value {
    let path = dir.join(format!("runs/demo/checkpoints/step-{step:08}/COMMITTED"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[test]
fn a_stopped_and_resumed_job_equals_the_straight_one_bit_for_bit() {
    let straight = tempfile::tempdir().unwrap();
    let resumed = tempfile::tempdir().unwrap();
    // A constant rate after warmup: the 20-step job is the 40-step job stopped at 20.
    let constant = ("schedule = \"cosine\"", "schedule = \"constant\"");
    // Both keep a moving average of the parameters, which resumes too.
    let ema = ("lambda_cap = 2.0", "lambda_cap = 2.0\nema_decay = 0.9");
    manifest(straight.path(), 20, &[constant, ema]);
    let tensorboard = (
        "[status]",
        "[logging]\ntensorboard = \"runs/demo/tensorboard\"\n\n[status]",
    );
    manifest(resumed.path(), 20, &[constant, ema, tensorboard]);
    ok(&launch(straight.path(), &["--steps", "40"]));
    ok(&launch(resumed.path(), &["--steps", "20"]));
    let stderr = ok(&launch(resumed.path(), &["--steps", "40"]));
    assert!(stderr.contains("resuming from file://"), "{stderr}");
    assert!(
        stderr.contains("step-00000020 (step 20, saved by 2 workers)"),
        "{stderr}"
    );

    let (a, b) = (metrics(straight.path()), metrics(resumed.path()));
    let steps = |m: &[serde_json::Value]| m.iter().map(|v| v["step"].as_u64().unwrap()).collect::<Vec<_>>();
    assert_eq!(steps(&a), (1..=40).collect::<Vec<_>>());
    assert_eq!(steps(&b), (1..=40).collect::<Vec<_>>());
    for (x, y) in a[20..].iter().zip(&b[20..]) {
        for key in ["loss", "contrastive", "captioning", "learning_rate", "logit_scale"] {
            assert_eq!(x[key], y[key], "step {}: {key}", x["step"]);
        }
    }
    // Parameters and AdamW moments of step 40: the same bytes.
    assert_eq!(
        committed(straight.path(), 40)["shards"],
        committed(resumed.path(), 40)["shards"]
    );

    // The moving average of step 40: the same bytes, recorded in meta.json.
    let average = |dir: &Path| std::fs::read(dir.join("runs/demo/checkpoints/step-00000040/ema.safetensors")).unwrap();
    assert!(
        average(straight.path()) == average(resumed.path()),
        "the moving average resumed otherwise"
    );
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(resumed.path().join("runs/demo/checkpoints/step-00000040/meta.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["ema"]["decay"], 0.9);
    // --weights ema exports it; the default exports the parameters.
    let export = |weights: &str| {
        let out = resumed.path().join(format!("{weights}.safetensors"));
        let status = Command::new(env!("CARGO_BIN_EXE_coca"))
            .args([
                "export",
                "--checkpoint",
                "runs/demo/checkpoints",
                "--weights",
                weights,
                "--out",
            ])
            .arg(&out)
            .current_dir(resumed.path())
            .status()
            .unwrap();
        assert!(status.success());
        let bytes = std::fs::read(out).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors: Vec<(String, Vec<u8>)> = file
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, view.data().to_vec()))
            .collect();
        tensors.sort();
        tensors
    };
    let (model, averaged) = (export("model"), export("ema"));
    let stored = safetensors::SafeTensors::deserialize(&average(resumed.path()))
        .unwrap()
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.data().to_vec()))
        .collect::<std::collections::BTreeMap<_, _>>();
    assert!(
        averaged.iter().all(|(name, data)| &stored[name] == data),
        "--weights ema exports the average"
    );
    assert!(model != averaged, "the average is not the parameters");
    // The decay is a resume field.
    manifest(
        resumed.path(),
        20,
        &[constant, ("lambda_cap = 2.0", "lambda_cap = 2.0\nema_decay = 0.5")],
    );
    let stderr = failed(&launch(resumed.path(), &["--steps", "50"]));
    assert!(
        stderr.contains("was written with train.ema_decay = 0.9; this manifest has 0.5"),
        "{stderr}"
    );

    // TensorBoard's own reader finds every step once, across the two
    // coordinators' files, with metrics.jsonl's values (as f32).
    let events = tensorboard_scalars(&resumed.path().join("runs/demo/tensorboard"));
    assert_eq!(
        std::fs::read_dir(resumed.path().join("runs/demo/tensorboard"))
            .unwrap()
            .count(),
        2,
        "a file per coordinator"
    );
    for (tag, key) in [
        ("train/loss", "loss"),
        ("train/captioning", "captioning"),
        ("train/learning_rate", "learning_rate"),
        ("train/gradient_norm", "gradient_norm"),
        ("train/samples_per_second", "samples_per_second"),
    ] {
        let expected: Vec<(u64, f32)> = b
            .iter()
            .map(|m| (m["step"].as_u64().unwrap(), m[key].as_f64().unwrap() as f32))
            .collect();
        assert_eq!(events[tag], expected, "{tag}");
    }
    let evaluated: Vec<(u64, f32)> = b
        .iter()
        .filter_map(|m| Some((m["step"].as_u64()?, m["evals"]["zeroshot_top1"].as_f64()? as f32)))
        .collect();
    assert!(!evaluated.is_empty());
    assert_eq!(events["eval/zeroshot_top1"], evaluated);
}

/// Every scalar of the TensorBoard run in `dir`, read by TensorBoard's
/// EventAccumulator (Python's `tensorboard`, from scripts/test-deps.sh):
/// tag -> (step, value) in step order.
fn tensorboard_scalars(dir: &Path) -> std::collections::HashMap<String, Vec<(u64, f32)>> {
    let script = "import json, sys\n\
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
run = EventAccumulator(sys.argv[1], size_guidance={'scalars': 0})\n\
run.Reload()\n\
print(json.dumps({t: [[e.step, e.value] for e in run.Scalars(t)] for t in run.Tags()['scalars']}))";
    let output = Command::new("python3").args(["-c", script]).arg(dir).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let read: std::collections::HashMap<String, Vec<(u64, f64)>> = serde_json::from_slice(&output.stdout).unwrap();
    read.into_iter()
        .map(|(tag, values)| {
            (
                tag,
                values.into_iter().map(|(step, value)| (step, value as f32)).collect(),
            )
        })
        .collect()
}

/// A checkpoint written by coca at protocol 3 (the manifest crossed the
/// wire as TOML then; tests/fixtures/checkpoint-protocol-3): step 10 of the
/// demo with a constant rate. Today's coca resumes it, and a resume
/// stopped at step 15 and resumed again ends at step 20 with the same
/// bytes. The shards that version committed at step 20 are kept beside
/// it, but equal today's only on a CPU with the same matmul kernels as the
/// machine that wrote them (with AVX-512 the sums run in another order).
#[test]
fn a_checkpoint_of_an_earlier_version_resumes_bit_exactly() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoint-protocol-3");
    let from_fixture = || {
        let dir = tempfile::tempdir().unwrap();
        manifest(dir.path(), 10, &[("schedule = \"cosine\"", "schedule = \"constant\"")]);
        let step = dir.path().join("runs/demo/checkpoints/step-00000010");
        std::fs::create_dir_all(&step).unwrap();
        for entry in std::fs::read_dir(fixture.join("step-00000010")).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), step.join(entry.file_name())).unwrap();
        }
        dir
    };
    let straight = from_fixture();
    let stderr = ok(&launch(straight.path(), &["--steps", "20"]));
    assert!(
        stderr.contains("step-00000010 (step 10, saved by 2 workers)"),
        "{stderr}"
    );
    let stopped = from_fixture();
    ok(&launch(stopped.path(), &["--steps", "15"]));
    let stderr = ok(&launch(stopped.path(), &["--steps", "20"]));
    assert!(
        stderr.contains("step-00000015 (step 15, saved by 2 workers)"),
        "{stderr}"
    );
    assert_eq!(
        committed(straight.path(), 20)["shards"],
        committed(stopped.path(), 20)["shards"]
    );
    // The old binary's own step 20: the same files, shard by shard.
    let then: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("step-00000020.COMMITTED")).unwrap()).unwrap();
    let files = |shards: &serde_json::Value| -> Vec<(String, u64)> {
        shards
            .as_array()
            .unwrap()
            .iter()
            .map(|shard| {
                (
                    shard["file"].as_str().unwrap().to_string(),
                    shard["bytes"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(files(&committed(straight.path(), 20)["shards"]), files(&then["shards"]));
}

/// The demo's samples as WebDataset tars made by the system's `tar`, one
/// tar per Arrow shard and in its order (`{key}.png` with `{key}.txt`, or
/// `{key}.cls` and classes.txt beside). `coca data index` indexes the
/// align tars ahead; the coordinator indexes the jft ones at the job's
/// start. The job on the tars, stopped and resumed, ends with the straight
/// Arrow job's parameters, bit for bit.
#[test]
fn a_job_on_tars_read_in_place_resumes_to_the_arrow_jobs_parameters() {
    use datasets::dataset::Dataset;
    let (arrow, tars) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let constant = ("schedule = \"cosine\"", "schedule = \"constant\"");
    manifest(arrow.path(), 10, &[constant]);
    ok(&launch(arrow.path(), &["--steps", "20"]));

    let demo = arrow.path().join("data/demo");
    let stage = tars.path().join("stage");
    let mut shard_counts = Vec::new();
    for kind in ["align", "jft"] {
        let store = store::Store::open(demo.join(kind).to_str().unwrap(), &Default::default()).unwrap();
        let dataset = Dataset::open(store).unwrap();
        let out = tars.path().join("data/tars").join(kind);
        std::fs::create_dir_all(&out).unwrap();
        for shard in 0..dataset.index().shards.len() {
            let decoded = dataset.shard(shard).unwrap();
            let folder = stage.join(format!("{kind}-{shard}"));
            std::fs::create_dir_all(&folder).unwrap();
            let mut names = Vec::new();
            for row in 0..decoded.rows() {
                let record = decoded.record(row);
                let (extension, data) = match (record.text, record.labels) {
                    (Some(text), _) => ("txt", text.to_string()),
                    (_, Some(labels)) => ("cls", labels.iter().map(i32::to_string).collect::<Vec<_>>().join(" ")),
                    _ => unreachable!("a record has a text or labels"),
                };
                for (name, bytes) in [
                    (format!("{}.png", record.key), record.image.to_vec()),
                    (format!("{}.{extension}", record.key), data.into_bytes()),
                ] {
                    std::fs::write(folder.join(&name), bytes).unwrap();
                    names.push(name);
                }
            }
            let status = Command::new("tar")
                .arg("-cf")
                .arg(out.join(format!("{shard:05}.tar")))
                .arg("-C")
                .arg(&folder)
                .args(&names)
                .status()
                .unwrap();
            assert!(status.success(), "tar -cf");
        }
        if kind == "jft" {
            let classes: Vec<String> = dataset
                .index()
                .classes
                .iter()
                .map(|class| format!("{}\t{}", class.name, class.parent.clone().unwrap_or_default()))
                .collect();
            std::fs::write(out.join("classes.txt"), classes.join("\n")).unwrap();
        }
        shard_counts.push(dataset.index().shards.len());
    }
    copy_dir(&demo, &tars.path().join("data/demo"));

    let align = format!("data/tars/align/{{00000..{:05}}}.tar", shard_counts[0] - 1);
    let indexed = Command::new(env!("CARGO_BIN_EXE_coca"))
        .args(["data", "index", &align])
        .current_dir(tars.path())
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&indexed.stdout);
    assert!(
        indexed.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&indexed.stderr)
    );
    assert!(
        printed.starts_with(&format!("{} tars, ", shard_counts[0])) && printed.contains("coca-tar-index-"),
        "{printed}"
    );
    // Tars without format = "webdataset", and a pattern naming a tar that
    // is not there: refused at the start, by name.
    let unsaid = ("url = \"data/demo/jft\"", "url = \"data/tars/jft\"");
    manifest(tars.path(), 10, &[unsaid]);
    let stderr = failed(&launch(tars.path(), &["--steps", "10"]));
    assert!(
        stderr.contains("data.source[1] (data/tars/jft)")
            && stderr.contains("but .tar files: set format = \"webdataset\" to read them in place"),
        "{stderr}"
    );
    let missing = (
        "url = \"data/demo/align\"",
        "url = \"data/tars/align/{00000..00999}.tar\"",
    );
    manifest(tars.path(), 10, &[missing]);
    let stderr = failed(&launch(tars.path(), &["--steps", "10"]));
    assert!(
        stderr.contains("data.source[0] (data/tars/align/{00000..00999}.tar)")
            && stderr.contains(".tar: not found, and the source's pattern names it"),
        "{stderr}"
    );
    let sources = [
        ("url = \"data/demo/align\"", format!("url = \"{align}\"")),
        (
            "url = \"data/demo/jft\"",
            "url = \"data/tars/jft\"\nformat = \"webdataset\"".to_string(),
        ),
    ];
    manifest(
        tars.path(),
        10,
        &[constant, (sources[0].0, &sources[0].1), (sources[1].0, &sources[1].1)],
    );
    let stderr = ok(&launch(tars.path(), &["--steps", "10"]));
    assert!(stderr.contains("no index yet; reading every tar once"), "{stderr}");
    assert!(tars.path().join("data/tars/jft/coca-tar-index.json").exists());
    let stderr = ok(&launch(tars.path(), &["--steps", "20"]));
    assert!(
        stderr.contains("step-00000010 (step 10, saved by 2 workers)"),
        "{stderr}"
    );
    assert_eq!(
        committed(arrow.path(), 20)["shards"],
        committed(tars.path(), 20)["shards"],
        "the job on tars trained other parameters than the job on Arrow shards"
    );
    // `coca data inspect` reads a prefix of tars through the index kept beside them.
    let inspected = Command::new(env!("CARGO_BIN_EXE_coca"))
        .args([
            "data",
            "inspect",
            "data/tars/jft",
            "--sheet",
            "sheet.png",
            "--samples",
            "2",
        ])
        .current_dir(tars.path())
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&inspected.stdout);
    assert!(
        inspected.status.success(),
        "{}",
        String::from_utf8_lossy(&inspected.stderr)
    );
    assert!(
        printed.contains("format    WebDataset tars, read in place") && printed.contains("bad       0 records"),
        "{printed}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Also from a job with AdamW's moments sharded (train.shard_optimizer)
/// into one without, and back: the checkpoint is the same either way.
#[test]
fn a_checkpoint_resumes_on_other_world_sizes() {
    let dir = tempfile::tempdir().unwrap();
    // 24 divides among 1, 2, 3 and 4 workers.
    let batch = ("global_batch = 32", "global_batch = 24");
    manifest(dir.path(), 6, &[batch]);
    ok(&launch(dir.path(), &["--steps", "6", "--workers", "1"]));
    for (workers, steps, saved_by, sharded) in [("4", "12", 1, true), ("2", "18", 4, false), ("3", "24", 2, true)] {
        let sharding = ("lambda_cap = 2.0", "lambda_cap = 2.0\nshard_optimizer = true");
        let edits: &[(&str, &str)] = if sharded { &[batch, sharding] } else { &[batch] };
        manifest(dir.path(), 6, edits);
        let stderr = ok(&launch(dir.path(), &["--steps", steps, "--workers", workers]));
        assert!(stderr.contains(&format!("saved by {saved_by} workers")), "{stderr}");
    }
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("runs/demo/checkpoints/step-00000024/meta.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["world_size"], 3);
    assert_eq!(meta["optimizer_steps"], 24);
    assert_eq!(meta["source_samples"], serde_json::json!([288, 288]));
    assert_eq!(steps_trained(dir.path()), (1..=24).collect::<Vec<_>>());
    // The global batch is part of the data plan: a change is refused by name.
    manifest(dir.path(), 6, &[("global_batch = 32", "global_batch = 16")]);
    let stderr = failed(&launch(dir.path(), &["--steps", "30"]));
    assert!(
        stderr.contains("was written with train.global_batch = 24; this manifest has 16"),
        "{stderr}"
    );
}

#[test]
fn changed_fields_are_refused_and_fresh_needs_an_empty_location() {
    let dir = tempfile::tempdir().unwrap();
    manifest(dir.path(), 5, &[]);
    ok(&launch(dir.path(), &["--steps", "5"]));
    for (edit, field) in [
        (("seed = 0", "seed = 1"), "job.seed = 0; this manifest has 1"),
        (
            ("weight = 0.5\n\n[[data", "weight = 0.25\n\n[[data"),
            "data.source[0] = ",
        ),
        (
            ("preset = \"tiny\"", "preset = \"tiny\"\nmultimodal_layers = 3"),
            "model.multimodal_layers = 2; this manifest has 3",
        ),
    ] {
        manifest(dir.path(), 5, &[edit]);
        let stderr = failed(&launch(dir.path(), &["--steps", "10"]));
        assert!(stderr.contains(field), "{field}: {stderr}");
        assert!(stderr.contains("A resume must keep"), "{stderr}");
    }
    // What may change does: the schedule's end, the cadence, the length.
    manifest(
        dir.path(),
        3,
        &[("end_learning_rate = 1e-4", "end_learning_rate = 1e-5")],
    );
    let stderr = failed(&launch(dir.path(), &["--steps", "10", "--fresh"]));
    assert!(stderr.contains("already holds committed step 5"), "{stderr}");
    ok(&launch(dir.path(), &["--steps", "10"]));
    // Run again, it says it is done (and exits 0).
    let again = launch(dir.path(), &["--steps", "10"]);
    ok(&again);
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(
        stdout.contains("job demo: the job is complete: its newest checkpoint, file://")
            && stdout.contains("step-00000010, is step 10 of 10. Raise job.steps"),
        "{stdout}"
    );
    // --from picks an older step.
    let from = dir.path().join("runs/demo/checkpoints/step-00000009");
    let stderr = ok(&launch(
        dir.path(),
        &["--steps", "12", "--from", from.to_str().unwrap()],
    ));
    assert!(
        stderr.contains("step-00000009 (step 9, saved by 2 workers)"),
        "{stderr}"
    );
}

#[test]
fn damaged_and_unfinished_steps_are_skipped_by_name() {
    let dir = tempfile::tempdir().unwrap();
    manifest(dir.path(), 5, &[("keep = 2", "keep = 3")]);
    ok(&launch(dir.path(), &["--steps", "15"]));
    let checkpoints = dir.path().join("runs/demo/checkpoints");
    // A save that never finished (a worker killed mid-save): no COMMITTED.
    std::fs::create_dir_all(checkpoints.join("step-00000020")).unwrap();
    std::fs::write(
        checkpoints.join("step-00000020/rank-00000-of-00002.safetensors"),
        b"partial",
    )
    .unwrap();
    // A truncated shard, and a flipped byte.
    let shard = checkpoints.join("step-00000015/rank-00001-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 10]).unwrap();
    let shard = checkpoints.join("step-00000010/rank-00000-of-00002.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&shard, &bytes).unwrap();

    let stderr = ok(&launch(dir.path(), &["--steps", "20"]));
    assert!(
        stderr.contains("skipping step-00000020: no COMMITTED (a save that did not finish)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("step-00000015/rank-00001-of-00002.safetensors: "),
        "{stderr}"
    );
    assert!(stderr.contains("were committed (truncated?)"), "{stderr}");
    assert!(
        stderr.contains("step-00000010/rank-00000-of-00002.safetensors: checksum mismatch"),
        "{stderr}"
    );
    assert!(
        stderr.contains("step-00000005 (step 5, saved by 2 workers)"),
        "{stderr}"
    );
    // The job saved over the damaged steps; the newest is whole again.
    assert!(committed(dir.path(), 20)["shards"].as_array().unwrap().len() == 2);
}

#[test]
fn export_writes_one_safetensors_file_of_the_parameters() {
    let dir = tempfile::tempdir().unwrap();
    manifest(dir.path(), 5, &[]);
    ok(&launch(dir.path(), &["--steps", "5", "--workers", "2"]));
    let out = dir.path().join("model.safetensors");
    let output = Command::new(env!("CARGO_BIN_EXE_coca"))
        .args(["export", "--checkpoint", "runs/demo/checkpoints", "--out"])
        .arg(&out)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let bytes = std::fs::read(&out).unwrap();
    // The safetensors header, read by hand as any reader would.
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let meta = &header["__metadata__"];
    assert_eq!(meta["step"], "5");
    let config: serde_json::Value = serde_json::from_str(meta["model"].as_str().unwrap()).unwrap();
    assert_eq!(config["vision_layers"], 2);
    let q = &header["image_encoder.blocks.1.attn.q.weight"];
    assert_eq!(q["dtype"], "F32", "{header}");
    assert_eq!(q["shape"], serde_json::json!([32, 32]));
    assert!(header.get("adamw.m1.logit_scale").is_none(), "no optimizer state");
    let tensors = header.as_object().unwrap().len() - 1;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains(&format!("{tensors} tensors")), "{stdout}");
}

fn committed_steps(dir: &Path) -> Vec<u64> {
    committed_in(&dir.join("runs/demo/checkpoints"))
}

#[test]
fn a_worker_killed_while_saving_every_step_leaves_a_resumable_job() {
    let dir = tempfile::tempdir().unwrap();
    // Without healing (tests/healing.rs heals), the job fails and a person resumes it.
    manifest(
        dir.path(),
        1,
        &[
            ("heartbeat_timeout_ms = 10000", "heartbeat_timeout_ms = 2000"),
            ("[status]", "[recovery]\nmax_restarts = 0\n\n[status]"),
        ],
    );
    let mut job = Command::new(env!("CARGO_BIN_EXE_coca"))
        .arg("launch")
        .arg(dir.path().join("job.toml"))
        .args(["--steps", "100000"])
        .current_dir(dir.path())
        .env_remove("COCA_JOB_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while committed_steps(dir.path()).len() < 2 || children(job.id()).len() < 2 {
        assert!(std::time::Instant::now() < deadline, "no checkpoints committed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let workers = children(job.id());
    Command::new("kill")
        .args(["-9", &workers[0].to_string()])
        .status()
        .unwrap();
    let exit = job.wait().unwrap();
    assert!(!exit.success(), "a job that lost a worker fails");

    let newest = *committed_steps(dir.path()).last().unwrap();
    let stderr = ok(&launch(dir.path(), &["--steps", &(newest + 2).to_string()]));
    assert!(
        stderr.contains(&format!("step-{newest:08} (step {newest}, saved by 2 workers)")),
        "{stderr}"
    );
}

/// The S3 server holding the checkpoints (SeaweedFS) killed while the job
/// trains and saves every 5 steps, and started again over its data a few
/// seconds later: the saves in flight are tried again until it is back,
/// the job completes without a recovery, every committed step is whole,
/// and a resume reads the newest.
#[test]
fn a_checkpoint_store_that_goes_away_mid_save_is_waited_for() {
    let weed_dir = tempfile::tempdir().unwrap();
    let weed = common::Seaweed::start(Some(weed_dir.path()));
    let dir = tempfile::tempdir().unwrap();
    let store = (
        "url = \"runs/demo/checkpoints\"",
        "url = \"s3://coca-checkpoints/demo\"",
    );
    let endpoint = (
        "loader_threads = 1",
        "loader_threads = 1\ns3_endpoint = \"http://127.0.0.1:8333\"",
    );
    manifest(dir.path(), 5, &[store, endpoint]);
    // The bucket, made by a first write (S3 lists no bucket that does not exist).
    let made = Command::new(env!("CARGO_BIN_EXE_coca"))
        .args([
            "data",
            "demo",
            "--out",
            "s3://coca-checkpoints/bucket",
            "--align-rows",
            "8",
            "--jft-rows",
            "8",
        ])
        .envs(common::Seaweed::CREDENTIALS)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let mut job = Command::new(env!("CARGO_BIN_EXE_coca"))
        .args(["launch", "job.toml"])
        .current_dir(dir.path())
        .env_remove("COCA_JOB_TOKEN")
        .envs(common::Seaweed::CREDENTIALS)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&mut job, "step 30", || has_trained(dir.path(), 30));
    drop(weed);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let _weed = common::Seaweed::start(Some(weed_dir.path()));
    let output = job.wait_with_output().unwrap();
    let stderr = ok(&output);
    assert!(
        stderr.contains("saving the checkpoint failed") && stderr.contains("trying again in"),
        "the outage met no save: {stderr}"
    );
    assert!(!stderr.contains("recovering"), "{stderr}");
    // Every step of the job trained once, and the newest step resumes.
    assert_eq!(steps_trained(dir.path()), (1..=300).collect::<Vec<_>>());
    let resumed = Command::new(env!("CARGO_BIN_EXE_coca"))
        .args(["launch", "job.toml", "--steps", "305"])
        .current_dir(dir.path())
        .env_remove("COCA_JOB_TOKEN")
        .envs(common::Seaweed::CREDENTIALS)
        .output()
        .unwrap();
    let stderr = ok(&resumed);
    assert!(
        stderr.contains("resuming from s3://coca-checkpoints/demo/step-00000300"),
        "{stderr}"
    );
}

/// Spawns `coca launch job.toml ARGS` in `dir`, its log kept for the end.
fn spawn_launch(dir: &Path, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_coca"))
        .args(["launch", "job.toml"])
        .args(args)
        .current_dir(dir)
        .env_remove("COCA_JOB_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `ready` holds, failing if the job ends first.
fn wait_for(job: &mut std::process::Child, what: &str, ready: impl Fn() -> bool) {
    let started = std::time::Instant::now();
    while !ready() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "waited 120 s for {what}"
        );
        if job.try_wait().unwrap().is_some() {
            let mut log = String::new();
            if let Some(mut stderr) = job.stderr.take() {
                std::io::Read::read_to_string(&mut stderr, &mut log).unwrap();
            }
            panic!("the job ended before {what}: {log}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The steps a job's checkpoints hold whole (COMMITTED written), in `checkpoints`.
fn committed_in(checkpoints: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(checkpoints)
        .map(|entries| {
            entries
                .filter_map(|e| {
                    let e = e.ok()?;
                    e.path().join("COMMITTED").exists().then_some(())?;
                    e.file_name().to_str()?.strip_prefix("step-")?.parse().ok()
                })
                .collect()
        })
        .unwrap_or_default();
    steps.sort_unstable();
    steps
}

/// Files a failed write left behind (the store writes `NAME#N`, then renames).
fn half_written(checkpoints: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![checkpoints.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.to_string_lossy().contains('#') {
                found.push(path);
            }
        }
    }
    found
}

/// The checkpoints' disk (a 16 MB tmpfs) full to its last page when the
/// job starts (nothing is written there before the first save, at step
/// 10), and emptied once training has gone on past that save: the save
/// is tried again until there is room, no step is committed meanwhile,
/// nothing half-written is left, the job trains every step once without
/// a recovery, and a resume reads the last.
#[test]
fn a_full_disk_during_a_save_is_waited_for() {
    let Some(disk) = common::SmallDisk::mount("a_full_disk_during_a_save_is_waited_for", 16 << 20) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let checkpoints = disk.path().join("checkpoints");
    let url = format!("url = \"{}\"", checkpoints.display());
    manifest(dir.path(), 10, &[("url = \"runs/demo/checkpoints\"", &url)]);
    disk.fill();
    let mut job = spawn_launch(dir.path(), &["--steps", "30"]);
    wait_for(&mut job, "step 12", || has_trained(dir.path(), 12));
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(
        committed_in(&checkpoints),
        Vec::<u64>::new(),
        "a step committed on a full disk"
    );
    assert_eq!(half_written(&checkpoints), Vec::<PathBuf>::new());
    disk.empty();

    let stderr = ok(&job.wait_with_output().unwrap());
    assert!(
        stderr.contains("step 10: saving the checkpoint failed")
            && stderr.contains("No space left on device")
            && stderr.contains("trying again in"),
        "the full disk met no save: {stderr}"
    );
    assert!(!stderr.contains("recovering"), "{stderr}");
    assert_eq!(steps_trained(dir.path()), (1..=30).collect::<Vec<_>>());
    assert_eq!(committed_in(&checkpoints), vec![20, 30]);
    assert_eq!(half_written(&checkpoints), Vec::<PathBuf>::new());
    let stderr = ok(&launch(dir.path(), &["--steps", "32"]));
    let newest = checkpoints.join("step-00000030");
    assert!(
        stderr.contains(&format!("resuming from file://{}", newest.display())),
        "{stderr}"
    );
}

/// The checkpoints' disk filled once a step (10, or 20 on a slow machine)
/// is committed, and left full: after `checkpoint.save_retry_seconds` the
/// job fails naming the store and the full disk; the committed step stays
/// whole, and once there is room again a resume reads it and completes
/// the job.
#[test]
fn a_disk_that_stays_full_fails_the_job_by_name_and_keeps_the_last_step() {
    let name = "a_disk_that_stays_full_fails_the_job_by_name_and_keeps_the_last_step";
    let Some(disk) = common::SmallDisk::mount(name, 16 << 20) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let checkpoints = disk.path().join("checkpoints");
    let url = format!("url = \"{}\"", checkpoints.display());
    manifest(
        dir.path(),
        10,
        &[
            ("url = \"runs/demo/checkpoints\"", &url),
            ("keep = 2", "keep = 2\nsave_retry_seconds = 2"),
        ],
    );
    let mut job = spawn_launch(dir.path(), &["--steps", "40"]);
    wait_for(&mut job, "step 10's commit", || !committed_in(&checkpoints).is_empty());
    disk.fill();
    let failure = failed(&job.wait_with_output().unwrap());
    let named = format!("writing its checkpoint: file://{}/step-", checkpoints.display());
    assert!(
        failure.contains(&named)
            && failure.contains("No space left on device")
            && failure.contains("(tried for 2 s: checkpoint.save_retry_seconds)"),
        "the store, the full disk and the retry budget are named: {failure}"
    );
    let kept = committed_in(&checkpoints);
    let newest = *kept.last().expect("the committed step stays");
    assert!(newest < 40, "the job could not have saved its end: {kept:?}");
    assert_eq!(half_written(&checkpoints), Vec::<PathBuf>::new());

    disk.empty();
    let stderr = ok(&launch(dir.path(), &["--steps", "40"]));
    let resumed = checkpoints.join(format!("step-{newest:08}"));
    assert!(
        stderr.contains(&format!("resuming from file://{}", resumed.display())),
        "{stderr}"
    );
    assert_eq!(metrics(dir.path()).last().unwrap()["step"], 40);
}
