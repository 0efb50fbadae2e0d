//! Every manifest rule, table-driven: a change to the demo manifest and the
//! exact error it must give.

use contract::manifest::{
    AutotuneLevel, Backend, CollectiveKind, Length, Manifest, Overrides, Precision, Schedule, SourceFormat,
};

const DEMO: &str = include_str!("../../deploy/local/demo.toml");

fn with(from: &str, to: &str) -> String {
    assert!(DEMO.contains(from), "the demo manifest has `{from}`");
    DEMO.replacen(from, to, 1)
}

#[test]
fn the_demo_manifest_reads_with_its_values_and_defaults() {
    let manifest = Manifest::parse(DEMO, "demo.toml").unwrap();
    assert_eq!(manifest.job.name, "demo");
    assert_eq!(manifest.job.length, Length::Steps(300));
    assert_eq!(manifest.model.context_length, 16);
    assert_eq!(manifest.data.sources.len(), 2);
    assert_eq!(manifest.data.sources[1].templates, "clip80");
    assert_eq!(manifest.train.global_batch, 32);
    assert_eq!(manifest.train.schedule, Schedule::Cosine);
    assert_eq!(manifest.train.beta2, 0.999);
    assert_eq!(
        (manifest.cluster.backend, manifest.cluster.collective),
        (Backend::Cpu, CollectiveKind::Tcp)
    );
    assert_eq!(manifest.cluster.coordinator.to_string(), "127.0.0.1:7070");
    assert_eq!(manifest.checkpoint.as_ref().unwrap().keep, 2);
    assert_eq!(manifest.auth.token_env, "COCA_JOB_TOKEN");
    // The GPU settings default to a fast start and a kernel cache beside the checkpoints.
    assert_eq!(manifest.gpu.autotune, AutotuneLevel::Minimal);
    assert_eq!(manifest.gpu.kernel_cache, "runs/demo/checkpoints/kernel-cache");
    assert!(manifest.gpu.log_compilations);
    // Healing is on, with a finite budget, waiting for replacements.
    assert_eq!(manifest.recovery.max_restarts, 10);
    assert_eq!(manifest.recovery.min_workers, 2);
    assert_eq!(manifest.recovery.replacement_timeout_ms, 60_000);
}

#[test]
fn a_cuda_manifest_without_a_collective_runs_on_tcp() {
    let cuda = Manifest::parse(
        &with("backend = \"cpu\"\ncollective = \"tcp\"", "backend = \"cuda\""),
        "m",
    )
    .unwrap();
    assert_eq!(
        (cuda.cluster.backend, cuda.cluster.collective),
        (Backend::Cuda, CollectiveKind::Tcp)
    );
    let nccl = Manifest::parse(
        &with(
            "backend = \"cpu\"\ncollective = \"tcp\"",
            "backend = \"cuda\"\ncollective = \"nccl\"",
        ),
        "m",
    )
    .unwrap();
    assert_eq!(nccl.cluster.collective, CollectiveKind::Nccl);
    let wgpu = Manifest::parse(&with("backend = \"cpu\"", "backend = \"wgpu\""), "m").unwrap();
    assert_eq!(wgpu.cluster.backend, Backend::Wgpu);
    // Mixed precision is asked for; f32 is the default on every backend until bf16 is checked on a GPU.
    assert_eq!(cuda.train.precision, Precision::F32);
    let bf16 = Manifest::parse(
        &with("schedule = \"cosine\"", "schedule = \"cosine\"\nprecision = \"bf16\""),
        "m",
    )
    .unwrap();
    assert_eq!(bf16.train.precision, Precision::Bf16);
}

#[test]
fn the_gpu_section_is_read_and_its_cache_defaults_to_the_job_directory() {
    let gpu = Manifest::parse(
        &(DEMO.to_string()
            + "\n[gpu]\nautotune = \"balanced\"\nkernel_cache = \"s3://b/k\"\nlog_compilations = false\n"),
        "m",
    )
    .unwrap()
    .gpu;
    assert_eq!(
        (gpu.autotune, gpu.kernel_cache.as_str(), gpu.log_compilations),
        (AutotuneLevel::Balanced, "s3://b/k", false)
    );
    let start = DEMO.find("[checkpoint]").expect("the demo checkpoints");
    let end = DEMO[start..].find("\n\n").map_or(DEMO.len(), |i| start + i);
    let without_checkpoints = format!("{}{}", &DEMO[..start], &DEMO[end..]);
    let manifest = Manifest::parse(&without_checkpoints, "m").unwrap();
    assert!(manifest.checkpoint.is_none());
    assert_eq!(manifest.gpu.kernel_cache, "runs/demo/kernel-cache");
}

#[test]
fn the_schedule_warms_up_then_decays_to_its_end() {
    let train = Manifest::parse(DEMO, "m").unwrap().train;
    let lr = |step| train.learning_rate_at(step, 300);
    assert!((lr(0) - 1e-3 / 10.0).abs() < 1e-12);
    assert!((lr(9) - 1e-3).abs() < 1e-12);
    assert!((lr(10) - 1e-3).abs() < 1e-12);
    assert!((lr(155) - (1e-4 + 0.9e-3 * 0.5)).abs() < 1e-9, "{}", lr(155));
    assert!((lr(300) - 1e-4).abs() < 1e-12);
    assert!(lr(100) > lr(200));
}

#[test]
fn replicas_are_what_the_manifest_says_while_they_split_the_micro_batch() {
    let demo = Manifest::parse(DEMO, "demo.toml").unwrap();
    assert_eq!((demo.cluster.replicas, demo.replicas_for(2)), (1, 1));
    // A global batch of 32 over 2 workers: 16 samples each, 4 replicas of 4.
    let four = Manifest::parse(&with("workers = 2", "workers = 2\nreplicas = 4"), "m.toml").unwrap();
    assert_eq!(four.replicas_for(2), 4);
    assert_eq!(four.replicas_for(1), 4);
    // A world of 16 workers (after healing, say): 2 samples each, 4 falls to 2.
    assert_eq!(four.replicas_for(16), 2);
}

#[test]
fn a_source_of_tars_is_webdataset_by_its_url_or_by_its_format() {
    let format_of = |text: &str| {
        let manifest = Manifest::parse(text, "m.toml").unwrap();
        (manifest.data.sources[0].format, manifest.data.sources[1].format)
    };
    assert_eq!(format_of(DEMO), (SourceFormat::Arrow, SourceFormat::Arrow));
    let pattern = with("url = \"data/demo/align\"", "url = \"s3://b/laion/{00000..00009}.tar\"");
    assert_eq!(format_of(&pattern), (SourceFormat::Webdataset, SourceFormat::Arrow));
    let one = with("url = \"data/demo/align\"", "url = \"shards/00000.tar\"");
    assert_eq!(format_of(&one).0, SourceFormat::Webdataset);
    let prefix = with(
        "url = \"data/demo/jft\"",
        "url = \"data/tars\"\nformat = \"webdataset\"\nclasses = \"data/classes.txt\"",
    );
    assert_eq!(format_of(&prefix).1, SourceFormat::Webdataset);
    let manifest = Manifest::parse(&prefix, "m.toml").unwrap();
    assert_eq!(manifest.data.sources[1].classes.as_deref(), Some("data/classes.txt"));
}

#[test]
fn every_rule_names_its_field() {
    let cases: Vec<(String, &str)> = vec![
        (with("[job]", "[jobs]"), "jobs: unknown section; did you mean `[job]`?"),
        (with("seed = 0", "sede = 0"), "job.sede: unknown key; did you mean `seed`?"),
        (with("name = \"demo\"", "name = \"my demo\""), "job.name: `my demo` must be letters, digits, `-` or `_`"),
        (with("name = \"demo\"\n", ""), "job.name: missing"),
        (with("steps = 300", "steps = 300\nepochs = 2"), "job.steps: give job.steps or job.epochs, not both"),
        (with("steps = 300", "steps = \"300\""), "job.steps: invalid type: string \"300\", expected u64"),
        (with("steps = 300", "steps = 0"), "job.steps: must be at least 1"),
        (with("steps = 300", "epochs = -1.0"), "job.epochs: -1 must be a positive number"),
        (with("seed = 0", "seed = -4"), "job.seed: invalid value: integer `-4`, expected u64"),
        (with("preset = \"tiny\"", "preset = \"huge\""), "model.preset: unknown model preset `huge` (known: tiny, bench, base, large, giant, coca_vit_b_32, coca_vit_l_14)"),
        (with("preset = \"tiny\"", "preset = \"tiny\"\nvocab_sise = 9"), "model.vocab_sise: unknown field; did you mean `vocab_size`?"),
        (with("preset = \"tiny\"", "preset = \"tiny\"\npatch_size = 7"), "model.patch_size: 7 does not divide image_size = 32"),
        (with("tokenizer = \"data/demo/tokenizer.json\"\n", ""), "data.tokenizer: missing (the URL of a tokenizer.json)"),
        (with("kind = \"align\"", "kind = \"captions\""), "data.source[0].kind: unknown variant `captions`, expected `align` or `jft`"),
        (with("weight = 0.5", "weight = 0.0"), "data.source[0].weight: 0 must be a positive number"),
        (with("kind = \"align\"", "kind = \"align\"\ntemplates = \"simple\""), "data.source[0].templates: only jft sources use prompt templates"),
        (with("url = \"data/demo/jft\"", "uri = \"data/demo/jft\""), "data.source[1].uri: unknown key; did you mean `url`?"),
        (with("url = \"data/demo/align\"", "url = \"data/{0..}.tar\""), "data.source[0].url: data/{0..}.tar: `{0..}`: `` is not a whole number"),
        (with("kind = \"align\"", "kind = \"align\"\nformat = \"parquet\""), "data.source[0].format: unknown variant `parquet`, expected `arrow` or `webdataset`"),
        (with("kind = \"jft\"", "kind = \"jft\"\nclasses = \"classes.txt\""), "data.source[1].classes: only jft webdataset sources take a class list (an Arrow dataset's index has its classes)"),
        (with("weight = 0.5", "weight = 0.001"), "data.source: data source 0: weight 0.001 gives it no sample of a global batch of 32; raise its weight or the batch"),
        (with("loader_threads = 1", "loader_threads = 0"), "data.loader_threads: must be at least 1"),
        (with("loader_threads = 1", "loader_threads = 1\nstreams = 5"), "data.streams: 5 streams do not divide data source 0's 16 samples of every global batch"),
        (with("loader_threads = 1", "loader_threads = 1\nstreams = 0"), "data.streams: must be at least 1"),
        (with("loader_threads = 1", "loader_threads = 1\nmax_image_pixels = 0"), "data.max_image_pixels: must be at least 1"),
        (with("loader_threads = 1", "loader_threads = 1\nshuffle_window = 0"), "data.shuffle_window: must be at least 1 shard"),
        (with("loader_threads = 1", "loader_threads = 1\nshard_memory_bytes = 0"), "data.shard_memory_bytes: must be at least 1"),
        (with("global_batch = 32", "global_batch = 33"), "train.global_batch: 33 is not divisible by cluster.workers = 2"),
        (with("learning_rate = 1e-3", "learning_rate = 0"), "train.learning_rate: 0 must be positive"),
        (with("end_learning_rate = 1e-4", "end_learning_rate = 1e-2"), "train.end_learning_rate: 0.01 must be between 0 and train.learning_rate = 0.001"),
        (with("warmup_steps = 10", "warmup_steps = 300"), "train.warmup_steps: 300 must be less than job.steps = 300"),
        (with("schedule = \"cosine\"", "schedule = \"step\""), "train.schedule: unknown variant `step`, expected one of `cosine`, `linear`, `constant`"),
        (with("schedule = \"cosine\"", "schedule = \"cosine\"\nprecision = \"fp16\""), "train.precision: unknown variant `fp16`, expected `f32` or `bf16`"),
        (with("weight_decay = 0.01", "beta1 = 1.0"), "train.beta1: 1 must be in [0, 1)"),
        (with("lambda_con = 1.0\nlambda_cap = 2.0", "lambda_con = 0\nlambda_cap = 0"), "train.lambda_cap: train.lambda_con and train.lambda_cap are both 0: nothing to learn"),
        (with("lambda_cap = 2.0", "lambda_cap = -1.0"), "train.lambda_cap: -1 must be zero or positive"),
        (with("lambda_cap = 2.0", "lambda_cap = 2.0\ngrad_clip_norm = 0.0"), "train.grad_clip_norm: 0 must be a positive number"),
        (with("lambda_cap = 2.0", "lambda_cap = 2.0\npatch_dropout = 1.0"), "train.patch_dropout: 1 must be in [0, 1): the share of patches dropped"),
        (with("lambda_cap = 2.0", "lambda_cap = 2.0\naccumulation = 0"), "train.accumulation: 0 must be between 1 and the 16 samples each worker steps on"),
        (
            with("workers = 2", "workers = 2\nreplicas = 2").replace("lambda_cap = 2.0", "lambda_cap = 2.0\naccumulation = 9"),
            "train.accumulation: 9 must be between 1 and the 8 samples each replica steps on",
        ),
        (
            with("workers = 2", "workers = 2\nreplicas = 2").replace("lambda_cap = 2.0", "lambda_cap = 2.0\nshard_optimizer = true"),
            "cluster.replicas: 2 replicas with train.shard_optimizer: sharding saves device memory, replicas are a CPU worker's threads; use one of them",
        ),
        (with("lambda_cap = 2.0", "lambda_cap = 2.0\nshard_optimizer = 1"), "train.shard_optimizer: invalid type: integer `1`, expected a boolean"),
        (with("lambda_cap = 2.0", "lambda_cap = 2.0\nactivation_checkpointing = \"yes\""), "train.activation_checkpointing: invalid type: string \"yes\", expected a boolean"),
        (with("lambda_cap = 2.0", "lambda_cap = 2.0\nlock_image_unlocked_groups = 1"), "train.lock_image_unlocked_groups: 1 needs train.lock_image = true"),
        (
            with("lambda_cap = 2.0", "lambda_cap = 2.0\nlock_text = true\nlock_text_unlocked_groups = 4"),
            "train.lock_text_unlocked_groups: 4 leaves nothing locked: the text tower has 4 groups (its stem, 2 blocks, its head)",
        ),
        (with("lambda_cap = 2.0", "lambda_cap = 2.0\nimage_layer_decay = 0"), "train.image_layer_decay: 0 must be in (0, 1] (1: off)"),
        (with("lambda_cap = 2.0", "lambda_cap = 2.0\nema_decay = 1.0"), "train.ema_decay: 1 must be in (0, 1)"),
        (with("lambda_cap = 2.0", "lambda_cap = 2.0\ntext_layer_decay = 1.5"), "train.text_layer_decay: 1.5 must be in (0, 1] (1: off)"),
        (with("workers = 2", "workers = 0"), "cluster.workers: must be at least 1"),
        (with("collective = \"tcp\"", "collective = \"nccl\""), "cluster.collective: nccl needs cluster.backend = \"cuda\""),
        (DEMO.to_string() + "\n[gpu]\nautotune = \"max\"\n", "gpu.autotune: unknown variant `max`, expected one of `minimal`, `balanced`, `extensive`, `full`"),
        (DEMO.to_string() + "\n[gpu]\nlog_compilations = 1\n", "gpu.log_compilations: invalid type: integer `1`, expected a boolean"),
        (DEMO.to_string() + "\n[gpu]\nkernel_cache = \"\"\n", "gpu.kernel_cache: is empty (the URL of a directory)"),
        (DEMO.to_string() + "\n[gpu]\nkernel_cahce = \"x\"\n", "gpu.kernel_cahce: unknown key; did you mean `kernel_cache`?"),
        (DEMO.to_string() + "\n[logging]\ntensorboard = \" \"\n", "logging.tensorboard: is empty (a directory path or store URL)"),
        (DEMO.to_string() + "\n[logging]\ntensorbord = \"tb\"\n", "logging.tensorbord: unknown key; did you mean `tensorboard`?"),
        (with("backend = \"cpu\"", "backend = \"tpu\""), "cluster.backend: unknown variant `tpu`, expected one of `cpu`, `cuda`, `wgpu`"),
        (with("backend = \"cpu\"\ncollective = \"tcp\"", "backend = \"wgpu\"\ncollective = \"nccl\""), "cluster.collective: nccl needs cluster.backend = \"cuda\""),
        (with("backend = \"cpu\"", "backend = \"wgpu\"\nreplicas = 2"), "cluster.replicas: replicas are for the cpu backend (a GPU runs one)"),
        (with("coordinator = \"127.0.0.1:7070\"", "coordinator = \"localhost\""), "cluster.coordinator: `localhost` is not an address (host:port, e.g. 127.0.0.1:7070)"),
        (with("heartbeat_timeout_ms = 10000", "heartbeat_timeout_ms = 600"), "cluster.heartbeat_timeout_ms: 600 must be at least twice cluster.heartbeat_ms = 500"),
        (with("workers = 2", "workers = 2\nreplicas = 0"), "cluster.replicas: must be at least 1"),
        (with("workers = 2", "workers = 2\nreplicas = 5"), "cluster.replicas: 5 does not divide each worker's micro-batch of 16 (train.global_batch / cluster.workers)"),
        (with("backend = \"cpu\"", "backend = \"cuda\"\nreplicas = 2"), "cluster.replicas: replicas are for the cpu backend (a GPU runs one)"),
        (with("every = 100", "every = 0"), "checkpoint.every: must be at least 1"),
        (with("keep = 2", "keep = 0"), "checkpoint.keep: must be at least 1"),
        (with("url = \"runs/demo/checkpoints\"\n", ""), "checkpoint.url: missing"),
        (with("limit = 256", "limit = 0"), "eval.limit: must be at least 1"),
        (with("zeroshot = \"data/demo/jft-heldout\"\n", ""), "eval: names no dataset: set zeroshot (a jft dataset) and/or retrieval (an align dataset)"),
        (with("limit = 256", "limit = 256\nzero_shot = \"x\""), "eval.zero_shot: unknown key; did you mean `zeroshot`?"),
        (with("bind = \"127.0.0.1:7071\"", "bind = \"127.0.0.1:7070\""), "status.bind: 127.0.0.1:7070 is also cluster.coordinator"),
        (DEMO.to_string() + "\n[auth]\ntoken = \"x\"\n", "auth.token: unknown key; did you mean `token_env`?"),
        (DEMO.to_string() + "\n[recovery]\nmin_workers = 3\n", "recovery.min_workers: 3 must be between 1 and cluster.workers = 2"),
        (DEMO.to_string() + "\n[recovery]\nmin_workers = 0\n", "recovery.min_workers: 0 must be between 1 and cluster.workers = 2"),
        (DEMO.to_string() + "\n[recovery]\nmax_restart = 1\n", "recovery.max_restart: unknown key; did you mean `max_restarts`?"),
    ];
    let mut wrong = Vec::new();
    for (text, expected) in cases {
        let error = Manifest::parse(&text, "m.toml").expect_err(expected);
        let said = format!("{}: {}", error.field, error.message);
        if said != expected {
            wrong.push(format!("expected {expected}\n    said {said}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// `path:line:column: field: message`, as compilers print it; the line and
/// column are where the field's value (or its nearest written table) is.
#[test]
fn an_error_names_the_file_and_where_the_field_is_written() {
    let place = |text: &str, overrides: &Overrides| {
        Manifest::parse_with(text, "deploy/m.toml", overrides)
            .unwrap_err()
            .to_string()
    };
    let none = Overrides::default();
    // Read by serde: a type, an unknown key, an unknown section.
    assert_eq!(
        place(&with("global_batch = 32", "global_batch = \"32\""), &none),
        "deploy/m.toml:31:16: train.global_batch: invalid type: string \"32\", expected usize"
    );
    assert_eq!(
        place(&with("seed = 0", "sede = 0"), &none),
        "deploy/m.toml:7:1: job.sede: unknown key; did you mean `seed`?"
    );
    assert_eq!(
        place(&with("[status]", "[stauts]"), &none),
        "deploy/m.toml:60:2: stauts: unknown section; did you mean `[status]`?"
    );
    // A rule: at the value it is about; a missing key: at its table.
    assert_eq!(
        place(&with("weight = 0.5", "weight = 0.0"), &none),
        "deploy/m.toml:22:10: data.source[0].weight: 0 must be a positive number"
    );
    assert_eq!(
        place(&with("url = \"runs/demo/checkpoints\"\n", ""), &none),
        "deploy/m.toml:48:1: checkpoint.url: missing"
    );
    assert_eq!(
        place(&with("preset = \"tiny\"", "preset = \"tiny\"\npatch_size = 7"), &none),
        "deploy/m.toml:13:14: model.patch_size: 7 does not divide image_size = 32"
    );
    // A value from the command line has no place in the file.
    let workers = Overrides {
        workers: Some(0),
        ..Overrides::default()
    };
    assert_eq!(
        place(DEMO, &workers),
        "deploy/m.toml: cluster.workers: must be at least 1"
    );
    // A syntax error: where the parser stopped.
    let syntax = place("[job\nname = 1", &none);
    assert!(syntax.starts_with("deploy/m.toml:1:5: "), "{syntax}");
}
