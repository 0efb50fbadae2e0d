//! On a cubecl device, a training step's kernels are compiled in the first
//! steps and never again: a kernel specialised on a value that changes every
//! step (the learning rate, a step counter, a shape) would compile anew each
//! time and stall every step the way the first one stalls.
//!
//! The device is burn's wgpu backend on Mesa's lavapipe, a Vulkan driver
//! that runs on the CPU (scripts/test-deps.sh installs it): no GPU here, but
//! the same fusion, compilation and autotune code CUDA workers run, with
//! the worker's own kernel set-up and compilation counter.

use std::time::{Duration, Instant};

use burn::backend::wgpu::WgpuDevice;
use burn::backend::{Autodiff, Wgpu};
use burn::optim::AdamWConfig;
use collective::Solo;
use contract::manifest::{AutotuneLevel, Gpu};
use contract::Preset;
use model::loss::LossWeights;
use model::train::contrastive::ContrastiveMode;
use model::train::step::TrainStep;
use model::train::synthetic::synthetic_batch;
use model::CocaModel;
use store::StoreOptions;
use worker::kernels::Kernels;

type B = Autodiff<Wgpu>;

/// cubecl reports compilations from a logger task: wait until the count rests.
fn settled(kernels: &Kernels) -> u64 {
    let mut last = kernels.compiled().expect("counted");
    let mut still_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(10);
    while still_since.elapsed() < Duration::from_millis(500) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let now = kernels.compiled().expect("counted");
        if now != last {
            (last, still_since) = (now, Instant::now());
        }
    }
    last
}

fn lavapipe_is_installed() -> bool {
    std::fs::read_dir("/usr/share/vulkan/icd.d")
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("lvp_icd"))
        })
        .unwrap_or(false)
}

#[test]
fn kernels_are_compiled_in_the_first_steps_and_never_again() {
    assert!(
        lavapipe_is_installed(),
        "no lavapipe Vulkan driver: run scripts/test-deps.sh (Debian's mesa-vulkan-drivers)"
    );
    let shared = tempfile::tempdir().unwrap();
    let gpu = Gpu {
        autotune: AutotuneLevel::Minimal,
        kernel_cache: shared.path().display().to_string(),
        log_compilations: true,
    };
    let mut kernels = Kernels::prepare(&gpu, &StoreOptions::default(), 0, "lavapipe").unwrap();
    let device = WgpuDevice::default();
    let config = Preset::Tiny.config();
    let data = synthetic_batch::<B>(&config, 4, 0, &device);
    let mut model = CocaModel::<B>::new(&config, 0, &device);
    let mut trainer = TrainStep::<B>::new(
        &AdamWConfig::new().with_weight_decay(0.01),
        LossWeights::default(),
        ContrastiveMode::Local,
    );
    let mut compiled = Vec::new();
    let mut before = settled(&kernels);
    for step in 0..4 {
        // A learning rate that changes every step, as a schedule's does.
        let learning_rate = 1e-4 * (1.0 + step as f64 / 3.0);
        let (next, report) = trainer.step(model, &data, learning_rate, &mut Solo).unwrap();
        model = next;
        assert!(
            report.losses.total.is_finite(),
            "step {step}: loss {}",
            report.losses.total
        );
        let now = settled(&kernels);
        compiled.push(now - before);
        before = now;
    }
    assert!(
        compiled[0] > 0,
        "the first step compiles the model's kernels: {compiled:?}"
    );
    assert_eq!(compiled[2..], [0, 0], "kernels compiled per step: {compiled:?}");

    // What was tuned is shared for the next worker or restart, under the device model's folder.
    kernels.publish();
    let tuned = store::Store::open(&gpu.kernel_cache, &StoreOptions::default())
        .unwrap()
        .list("lavapipe/autotune")
        .unwrap();
    assert!(!tuned.is_empty(), "autotune results were shared");
    assert!(tuned.iter().all(|o| o.name.contains("-any-")), "{tuned:?}");
}
