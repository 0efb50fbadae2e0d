//! The `coca` binary, run as a user runs it.

use std::process::{Command, Output};

fn coca(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_coca"))
        .args(args)
        .output()
        .expect("the coca binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The number after `label` at the start of a line of `text`.
fn figure(text: &str, label: &str) -> f64 {
    text.lines()
        .find_map(|line| line.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no {label} in:\n{text}"))
}

/// `coca ARGS` fails, saying `message`.
fn refused(args: &[&str], message: &str) {
    let output = coca(args);
    assert!(!output.status.success(), "{args:?} succeeded");
    assert!(stderr(&output).contains(message), "{args:?}: {}", stderr(&output));
}

#[test]
fn model_info_reports_every_part_and_the_total() {
    let output = coca(&["model", "info", "--preset", "base"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    for part in [
        "image encoder",
        "poolers",
        "unimodal decoder",
        "multimodal decoder",
        "embeddings",
        "total",
    ] {
        assert!(text.contains(part), "missing {part} in:\n{text}");
    }
    assert!(text.contains("388.9M"), "{text}");
}

#[test]
fn model_info_json_applies_overrides() {
    let output = coca(&[
        "model",
        "info",
        "--preset",
        "tiny",
        "--json",
        "--set",
        "vocab_size=1000",
        "--set",
        "pooler_layout=shared",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(report["config"]["vocab_size"], 1000);
    assert_eq!(report["config"]["pooler_layout"], "shared");
    let parts = &report["parameters"];
    let sum: u64 = ["image_encoder", "poolers", "unimodal", "multimodal", "embeddings"]
        .iter()
        .map(|part| parts[part].as_u64().unwrap())
        .sum();
    assert_eq!(report["total"].as_u64().unwrap(), sum);
}

#[test]
fn bad_model_input_fails_with_a_message_naming_it() {
    let cases: [(&[&str], &str); 4] = [
        (
            &["--preset", "tiny", "--set", "vocab_sise=8"],
            "model.vocab_sise: unknown field; did you mean `vocab_size`?",
        ),
        (
            &["--preset", "tiny", "--set", "patch_size=7"],
            "model.patch_size: 7 does not divide image_size = 32",
        ),
        (
            &["--preset", "tiny", "--set", "vocab_size"],
            "--set vocab_size: expected KEY=VALUE",
        ),
        (&["--preset", "huge"], "unknown model preset `huge`"),
    ];
    for (extra, message) in cases {
        let mut args = vec!["model", "info"];
        args.extend_from_slice(extra);
        refused(&args, message);
    }
}

#[test]
fn bench_step_prints_a_median_on_the_tiny_model() {
    let output = coca(&[
        "bench", "step", "--preset", "tiny", "--batch", "4", "--steps", "2", "--warmup", "1",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let figure = |label: &str| figure(&text, label);
    let median_ms = figure("median step");
    assert!(median_ms > 0.0);
    // The first step includes building the model, so it is no shorter than a step (printed in s to 0.1).
    assert!(figure("first step") * 1e3 + 50.0 >= median_ms, "{text}");
    // Throughput and FLOP/s are the batch and the model's FLOPs over the
    // median, which is printed rounded to 0.1 ms.
    let per_median = |value: f64, amount: f64| {
        let (slowest, fastest) = ((median_ms + 0.05) / 1e3, (median_ms - 0.05).max(1e-3) / 1e3);
        value >= 0.999 * amount / slowest - 0.05 && value <= 1.001 * amount / fastest + 0.05
    };
    assert!(per_median(figure("samples/s"), 4.0), "{text}");
    let flops = contract::Preset::Tiny.config().training_flops(4);
    assert!(per_median(figure("model FLOP/s"), flops), "{text}");
}

#[test]
fn bench_step_on_cuda_says_what_it_needs() {
    refused(
        &["bench", "step", "--preset", "tiny", "--backend", "cuda", "--world", "2"],
        "--backend cuda runs one process: leave out --world",
    );
    if !cfg!(feature = "cuda") {
        refused(
            &["bench", "step", "--preset", "tiny", "--backend", "cuda"],
            "this coca was built without CUDA (cargo build --release --features cuda)",
        );
    }
}

#[test]
fn bench_allreduce_runs_separate_processes_and_prints_bandwidths() {
    let output = coca(&[
        "bench",
        "allreduce",
        "--world",
        "3",
        "--mib",
        "1",
        "--iterations",
        "2",
        "--warmup",
        "1",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let figure = |label: &str| figure(&text, label);
    let (algorithm, bus) = (figure("algorithm bw"), figure("bus bw"));
    assert!(algorithm > 0.0 && figure("memcpy bw") > 0.0);
    // Bus bandwidth is algorithm bandwidth x 2(n-1)/n = 4/3 for 3 ranks (printed to 2 decimals).
    assert!((bus - algorithm * 4.0 / 3.0).abs() <= 0.02, "{text}");
}

#[test]
fn bench_allreduce_refuses_a_world_of_one() {
    refused(&["bench", "allreduce", "--world", "1"], "--world must be at least 2");
    // NCCL's world of one is one GPU; a build without CUDA says what it lacks.
    if !cfg!(feature = "cuda") {
        refused(
            &["bench", "allreduce", "--collective", "nccl", "--world", "1"],
            "--collective nccl: this coca was built without CUDA",
        );
    }
}

#[test]
fn bench_coordinator_meets_a_swarm_against_a_coordinator_process() {
    let output = coca(&[
        "bench",
        "coordinator",
        "--workers",
        "24",
        "--heartbeat-ms",
        "200",
        "--seconds",
        "1",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.contains("coordinator: 24 simulated workers registered and met"),
        "{text}"
    );
    // 24 workers beating every 200 ms for 1 s: about 5 each.
    let heartbeats = figure(&text, "heartbeats:");
    assert!((24.0..=24.0 * 6.0).contains(&heartbeats), "{text}");
    assert!(figure(&text, "coordinator CPU:") >= 0.0, "{text}");
    // One lost: the 23 survivors and the spare all got the new ring's ranks.
    assert!(
        text.contains(
            "recovery: one worker lost, its neighbour reports the broken ring; 24 assignments of the new ring"
        ),
        "{text}"
    );
}

/// A fresh directory under the system temp dir for one test.
fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("coca-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn read_parameters(path: &std::path::Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|bytes| f32::from_le_bytes(bytes.try_into().unwrap()))
        .collect()
}

#[test]
fn separate_processes_train_what_one_process_trains_on_the_whole_batch() {
    let dir = scratch_dir("data-parallel");
    for negatives in ["local", "full"] {
        let run = |world: usize| {
            let path = dir.join(format!("{negatives}-world-{world}.bin"));
            let output = coca(&[
                "bench",
                "step",
                "--preset",
                "tiny",
                "--batch",
                "6",
                "--steps",
                "3",
                "--warmup",
                "0",
                "--world",
                &world.to_string(),
                "--negatives",
                negatives,
                "--parameters-out",
                path.to_str().unwrap(),
            ]);
            assert!(
                output.status.success(),
                "{negatives}, world {world}: {}",
                stderr(&output)
            );
            read_parameters(&path)
        };
        let reference = run(1);
        let untrained_share = reference.iter().filter(|value| **value == 0.0).count();
        assert!(untrained_share < reference.len() / 10, "the parameters look untrained");
        for world in [2, 3] {
            let parameters = run(world);
            assert_eq!(parameters.len(), reference.len());
            let norm = |values: &mut dyn Iterator<Item = f32>| values.map(|v| (v as f64).powi(2)).sum::<f64>().sqrt();
            let difference = norm(&mut parameters.iter().zip(&reference).map(|(a, b)| a - b));
            let relative = difference / norm(&mut reference.iter().copied());
            // Float summation order differs between 1 and N ranks (see the
            // worker's data_parallel tests); a wrong gradient is >= 1e-2.
            assert!(
                relative < 1e-5,
                "{negatives}, world {world}: relative difference {relative:.2e}"
            );
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bench_step_refuses_a_batch_that_does_not_split() {
    refused(
        &["bench", "step", "--preset", "tiny", "--batch", "5", "--world", "2"],
        "--batch 5 does not split evenly between --world 2 ranks",
    );
}

#[test]
fn kernels_warm_says_what_it_needs() {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/local/demo.toml");
    refused(
        &["kernels", "warm", manifest],
        "cluster.backend = \"cpu\" compiles no kernels: nothing to warm",
    );
    refused(
        &["kernels", "warm", "no-such.toml"],
        "cannot read the manifest no-such.toml",
    );
    refused(
        &["bench", "step", "--preset", "tiny", "--backend", "wgpu", "--world", "2"],
        "--backend wgpu runs one process: leave out --world",
    );
}

/// `coca status` names the endpoint it cannot read, and what it got instead.
#[test]
fn status_names_an_endpoint_it_cannot_read() {
    // A port nothing listens on (bound a moment ago, then freed).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    refused(&["status", &url], &format!("cannot reach {url}"));
    refused(
        &["status", "http://127.0.0.1:7071/status"],
        "give the status endpoint as http://host:port",
    );
    // Something that answers HTTP, but not with a coca status document.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = server.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in server.incoming().take(1) {
            let mut stream = stream.unwrap();
            let _ = stream.read(&mut [0; 1024]);
            let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    refused(&["status", &format!("http://{address}")], "/status: HTTP 404 Not Found");
}
