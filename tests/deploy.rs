//! The deploy/ files: the Kubernetes resources validate against the
//! Kubernetes schemas (the `kubernetes-validate` package, installed by
//! scripts/test-deps.sh), and the job they run is a valid manifest whose
//! worker count matches the Job's.

use std::path::Path;
use std::process::Command;

use contract::manifest::Manifest;

const KUBERNETES: &str = "1.33.0";

fn k8s(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s").join(file)
}

#[test]
fn kubernetes_resources_validate_strictly() {
    for file in ["coordinator.yaml", "workers.yaml"] {
        let output = Command::new("kubernetes-validate")
            .args(["--strict", "-k", KUBERNETES, k8s(file).to_str().unwrap()])
            .output()
            .expect("kubernetes-validate runs: run scripts/test-deps.sh");
        let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{file}:\n{text}");
        assert!(text.contains("passed"), "{file}:\n{text}");
    }
}

#[test]
fn the_kubernetes_job_is_a_valid_manifest_with_matching_worker_counts() {
    let text = std::fs::read_to_string(k8s("job.toml")).unwrap();
    let manifest = Manifest::parse(&text, "deploy/k8s/job.toml").unwrap();
    let kustomization = std::fs::read_to_string(k8s("kustomization.yaml")).unwrap();
    let value_after = |path: &str| -> usize {
        let rest = &kustomization[kustomization.find(path).unwrap_or_else(|| panic!("{path}"))..];
        let value = rest.split("value:").nth(1).unwrap().lines().next().unwrap();
        value.trim().trim_matches('"').parse().unwrap()
    };
    assert_eq!(value_after("path: /spec/completions"), manifest.cluster.workers);
    assert_eq!(value_after("path: /spec/parallelism"), manifest.cluster.workers);
    let workers = std::fs::read_to_string(k8s("workers.yaml")).unwrap();
    assert!(workers.contains(&format!("completions: {}", manifest.cluster.workers)));
    // Pods reach the coordinator through the Service, so it must listen beyond loopback.
    assert!(manifest.cluster.coordinator.ip().is_unspecified());
    // A failed worker is restarted in its pod (keeping its index, its rank), as
    // often as the job heals; the Job itself does not fail first.
    assert!(workers.contains("restartPolicy: OnFailure"), "{workers}");
    let backoff = workers
        .split("backoffLimit:")
        .nth(1)
        .and_then(|rest| rest.lines().next()?.trim().parse::<u32>().ok())
        .expect("a backoffLimit");
    assert!(backoff >= manifest.recovery.max_restarts, "backoffLimit {backoff}");
}
