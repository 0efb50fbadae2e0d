//! The coordinator over real gRPC on loopback, with workers played by the
//! test: registration, tokens, protocol versions, rendezvous, heartbeats,
//! a silent worker, and the journal across a restart.

use std::path::Path;
use std::time::Duration;

use contract::manifest::Manifest;
use contract::status::{JobState, Phase};
use coordinator::{Coordinator, Resume};
use proto::auth::Token;
use proto::coordinator_client::CoordinatorClient;
use proto::{
    BadRecordCount, CheckpointShard, Command, EvalMetric, FinishRequest, HeartbeatRequest, RegisterRequest,
    RendezvousRequest, StepMetrics, WorkerPhase, PROTOCOL_VERSION,
};
use tonic::transport::Channel;

/// A manifest over two hand-written dataset indexes (the coordinator reads
/// only indexes), everything on port 0.
fn manifest(dir: &Path, timeout_ms: u64) -> Manifest {
    manifest_with(dir, timeout_ms, 0)
}

/// [`manifest`] with `max_restarts` recoveries allowed.
fn manifest_with(dir: &Path, timeout_ms: u64, max_restarts: u32) -> Manifest {
    Manifest::parse(&manifest_text(dir, timeout_ms, max_restarts), "test manifest").unwrap()
}

fn manifest_text(dir: &Path, timeout_ms: u64, max_restarts: u32) -> String {
    for (name, kind, classes) in [
        ("align", "align", ""),
        ("jft", "jft", r#", "classes": [{"name": "cat"}]"#),
    ] {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        let index = format!(
            r#"{{"format": "coca-dataset", "version": 1, "kind": "{kind}", "shards": [{{"file": "shard-00000.arrow", "rows": 100, "bytes": 1, "sha256": "{}"}}]{classes}}}"#,
            "0".repeat(64)
        );
        std::fs::write(dir.join(name).join("index.json"), index).unwrap();
    }
    format!(
        r#"
[job]
name = "protocol"
steps = 5
dir = "{dir}/run"
[model]
preset = "tiny"
[data]
tokenizer = "{dir}/tokenizer.json"
[[data.source]]
url = "{dir}/align"
kind = "align"
[[data.source]]
url = "{dir}/jft"
kind = "jft"
[train]
global_batch = 4
[cluster]
workers = 2
coordinator = "127.0.0.1:0"
heartbeat_ms = 100
heartbeat_timeout_ms = {timeout_ms}
[status]
bind = "127.0.0.1:0"
[recovery]
max_restarts = {max_restarts}
"#,
        dir = dir.display()
    )
}

/// Presents a token, or none.
#[derive(Clone)]
struct Auth(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(header) = &self.0 {
            request.metadata_mut().insert("authorization", header.clone());
        }
        Ok(request)
    }
}

type Client = CoordinatorClient<tonic::service::interceptor::InterceptedService<Channel, Auth>>;

async fn client(coordinator: &Coordinator, token: Option<&str>) -> Client {
    let channel = Channel::from_shared(format!("http://{}", coordinator.grpc_address()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    CoordinatorClient::with_interceptor(channel, Auth(token.map(|t| format!("Bearer {t}").parse().unwrap())))
}

fn register() -> RegisterRequest {
    RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        host: "test-host".into(),
        device: "cpu".into(),
        preferred_rank: None,
    }
}

/// Asks to join at `address`, having left generation `left` (0: none).
fn join(id: &str, address: &str, left: u64) -> RendezvousRequest {
    RendezvousRequest {
        worker_id: id.into(),
        collective_address: address.into(),
        left_generation: left,
        left_because: "connection reset by peer".into(),
        ..Default::default()
    }
}

fn heartbeat(id: &str, step: u64, generation: u64) -> HeartbeatRequest {
    HeartbeatRequest {
        worker_id: id.into(),
        step,
        metrics: Vec::new(),
        phase: WorkerPhase::Training as i32,
        device: String::new(),
        generation,
    }
}

/// Registers two workers and returns the ranks they were given.
async fn ranks_for(preferred: [Option<u32>; 2]) -> [u32; 2] {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(manifest(dir.path(), 5000), Token::new("t"), Resume::Latest)
        .await
        .unwrap();
    let mut client = client(&coordinator, Some("t")).await;
    let mut waits = Vec::new();
    for (address, preferred_rank) in ["127.0.0.1:9001", "127.0.0.1:9002"].into_iter().zip(preferred) {
        let request = RegisterRequest {
            preferred_rank,
            ..register()
        };
        let id = client.register(request).await.unwrap().into_inner().worker_id;
        let mut client = client.clone();
        waits.push(tokio::spawn(
            async move { client.rendezvous(join(&id, address, 0)).await },
        ));
    }
    let mut ranks = [0; 2];
    for (rank, wait) in ranks.iter_mut().zip(waits) {
        *rank = wait.await.unwrap().unwrap().into_inner().rank;
    }
    ranks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nccl_job_hands_every_rank_the_unique_id_of_rank_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut nccl = manifest(dir.path(), 5000);
    nccl.cluster.backend = contract::manifest::Backend::Cuda;
    nccl.cluster.collective = contract::manifest::CollectiveKind::Nccl;
    let coordinator = Coordinator::start(nccl, Token::new("t"), Resume::Latest).await.unwrap();
    let mut client = client(&coordinator, Some("t")).await;
    // Rank 0 by preference is the second to register and the last to meet.
    let mut workers = Vec::new();
    for preferred_rank in [1, 0] {
        let request = RegisterRequest {
            preferred_rank: Some(preferred_rank),
            ..register()
        };
        let reply = client.register(request).await.unwrap().into_inner();
        assert_eq!(reply.collective(), proto::CollectiveKind::Nccl);
        workers.push(reply.worker_id);
    }
    let rendezvous = |id: String, nccl_unique_id: &[u8]| {
        let mut client = client.clone();
        let request = RendezvousRequest {
            nccl_unique_id: nccl_unique_id.to_vec(),
            ..join(&id, "127.0.0.1:9001", 0)
        };
        async move { client.rendezvous(request).await }
    };
    // A worker without an id (a build without CUDA) is refused, by name of the field.
    let refused = rendezvous(workers[0].clone(), b"").await.unwrap_err();
    assert!(
        refused.message().contains("sent no NCCL unique id"),
        "{}",
        refused.message()
    );
    // Rank 1 waits until rank 0 has sent its id, then both get rank 0's.
    let waiting = tokio::spawn(rendezvous(workers[0].clone(), b"id of rank 1"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiting.is_finished(),
        "rank 1 got an assignment before rank 0's id was known"
    );
    let rank0 = rendezvous(workers[1].clone(), b"id of rank 0")
        .await
        .unwrap()
        .into_inner();
    let rank1 = waiting.await.unwrap().unwrap().into_inner();
    assert_eq!((rank0.rank, rank1.rank), (0, 1));
    assert_eq!(rank0.nccl_unique_id, b"id of rank 0");
    assert_eq!(rank1.nccl_unique_id, b"id of rank 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engines_indexes_become_ranks_when_they_name_each_rank_once() {
    assert_eq!(ranks_for([Some(1), Some(0)]).await, [1, 0]);
    // Otherwise the order of (host, address) decides.
    assert_eq!(ranks_for([Some(1), Some(1)]).await, [0, 1]);
    assert_eq!(ranks_for([Some(1), None]).await, [0, 1]);
    assert_eq!(ranks_for([Some(5), Some(0)]).await, [0, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_protocol_versions_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(manifest(dir.path(), 5000), Token::new("right"), Resume::Latest)
        .await
        .unwrap();
    let mut anonymous = client(&coordinator, None).await;
    let status = anonymous.register(register()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert_eq!(status.message(), "no job token (authorization: Bearer ...)");
    let mut wrong = client(&coordinator, Some("another job's")).await;
    let status = wrong.register(register()).await.unwrap_err();
    assert_eq!(status.message(), "the job token does not match this job's");
    assert_eq!(coordinator.shared.refused_calls(), 2);

    let mut right = client(&coordinator, Some("right")).await;
    // 3: the release before the job plan, which sent the manifest's text.
    for other in [3, PROTOCOL_VERSION + 1] {
        let mut old = register();
        old.protocol_version = other;
        let status = right.register(old).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            format!(
                "this worker speaks protocol version {other}, this coordinator speaks version {PROTOCOL_VERSION}; run the same coca release on both"
            )
        );
    }
    // Nothing refused reached the job.
    assert!(coordinator.shared.job.lock().unwrap().workers.is_empty());
    let report = coordinator::status::report(&coordinator.shared);
    assert_eq!(report.refused_calls, 2);
    let metrics = coordinator::status::prometheus_text(&report);
    assert!(metrics.contains("coca_rpc_refused_calls 2"), "{metrics}");
    assert!(
        !serde_json::to_string(&report).unwrap().contains("right"),
        "the token never shows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendezvous_ranks_heartbeats_and_completion() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(manifest(dir.path(), 5000), Token::new("t"), Resume::Latest)
        .await
        .unwrap();
    let mut client = client(&coordinator, Some("t")).await;
    // Registered out of address order; ranks follow (host, address).
    let second = client.register(register()).await.unwrap().into_inner().worker_id;
    let first = client.register(register()).await.unwrap().into_inner().worker_id;
    let caller = client.clone();
    let rendezvous = |id: String, address: &'static str| {
        let mut client = caller.clone();
        tokio::spawn(async move { client.rendezvous(join(&id, address, 0)).await.unwrap().into_inner() })
    };
    let (b, a) = (
        rendezvous(second.clone(), "127.0.0.1:9002"),
        rendezvous(first.clone(), "127.0.0.1:9001"),
    );
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!((a.rank, b.rank), (0, 1));
    // Each rank is told its two ring neighbours (in a ring of 2, the other both ways).
    assert_eq!(
        (a.prev_peer.as_str(), a.next_peer.as_str()),
        ("127.0.0.1:9002", "127.0.0.1:9002")
    );
    assert_eq!(
        (b.prev_peer.as_str(), b.next_peer.as_str()),
        ("127.0.0.1:9001", "127.0.0.1:9001")
    );
    // The job plan: every rank receives the same, derived once.
    let plan = a.job_plan().unwrap();
    assert_eq!(
        (a.world_size, plan.job.as_str(), plan.total_steps, plan.sources.len()),
        (2, "protocol", 5, 2)
    );
    assert_eq!(plan, b.job_plan().unwrap());
    assert_eq!(plan, coordinator.shared.plan);
    assert_eq!(coordinator.shared.job.lock().unwrap().state, JobState::Running);
    // A third worker waits as a spare: the world is complete.
    let spare = client.register(register()).await.unwrap().into_inner().worker_id;
    let spare_waits = rendezvous(spare.clone(), "127.0.0.1:9003");

    // A GPU worker in its first step says it compiles; the status page shows it.
    client
        .heartbeat(HeartbeatRequest {
            phase: WorkerPhase::Compiling as i32,
            device: "cuda:0 NVIDIA H200".into(),
            ..heartbeat(&first, 0, a.generation)
        })
        .await
        .unwrap();
    let phases: Vec<(String, Phase, String)> = coordinator::status::report(&coordinator.shared)
        .workers
        .iter()
        .map(|w| (w.id.clone(), w.phase.clone(), w.device.clone()))
        .collect();
    assert!(
        phases.contains(&(first.clone(), Phase::Compiling, "cuda:0 NVIDIA H200".into())),
        "{phases:?}"
    );
    assert!(
        phases.contains(&(second.clone(), Phase::Starting, "cpu".into())),
        "{phases:?}"
    );
    assert!(
        coordinator::status::prometheus_text(&coordinator::status::report(&coordinator.shared))
            .contains("coca_workers_compiling 1")
    );
    for id in [&first, &second] {
        let reply = client
            .heartbeat(heartbeat(id, 5, a.generation))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.command, Command::Continue as i32);
        client
            .finish(FinishRequest {
                worker_id: id.clone(),
                step: 5,
                ok: true,
                message: String::new(),
            })
            .await
            .unwrap();
    }
    assert_eq!(coordinator.finished(Duration::from_secs(1)).await, JobState::Completed);
    let report = coordinator::status::report(&coordinator.shared);
    let states: Vec<&str> = report.transitions.iter().map(|t| t.state.name()).collect();
    assert_eq!(states, ["pending", "rendezvous", "running", "completed"]);
    // The spare is told the job is over.
    let over = spare_waits.await.unwrap_err();
    assert!(format!("{over:?}").contains("the job is completed"), "{over:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_worker_is_declared_lost_by_name_and_the_journal_remembers() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(manifest(dir.path(), 600), Token::new("t"), Resume::Latest)
        .await
        .unwrap();
    let mut client = client(&coordinator, Some("t")).await;
    let alive = client.register(register()).await.unwrap().into_inner().worker_id;
    let silent = client.register(register()).await.unwrap().into_inner().worker_id;
    let waits = [(&alive, "127.0.0.1:9001"), (&silent, "127.0.0.1:9002")].map(|(id, address)| {
        let mut client = client.clone();
        let request = join(id, address, 0);
        tokio::spawn(async move { client.rendezvous(request).await })
    });
    let mut generation = 0;
    for wait in waits {
        generation = wait.await.unwrap().unwrap().into_inner().generation;
    }
    let started = std::time::Instant::now();
    let mut stopped = false;
    while started.elapsed() < Duration::from_secs(5) {
        let reply = client
            .heartbeat(heartbeat(&alive, 1, generation))
            .await
            .unwrap()
            .into_inner();
        if reply.command == Command::Stop as i32 {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stopped, "the live worker is told to stop");
    let lost_after = started.elapsed();
    assert!(
        lost_after >= Duration::from_millis(600),
        "not before the timeout: {lost_after:?}"
    );
    let report = coordinator::status::report(&coordinator.shared);
    assert_eq!(report.state, JobState::Failed);
    let reason = report.reason.unwrap();
    assert!(
        reason.starts_with(&format!("worker {silent} (rank 1, test-host) lost: no heartbeat for")),
        "{reason}"
    );
    assert!(
        coordinator::status::prometheus_text(&coordinator::status::report(&coordinator.shared))
            .contains("coca_workers_lost 1")
    );
    drop(coordinator);

    // A new coordinator over the same job directory knows how the job ended.
    let again = Coordinator::start(manifest(dir.path(), 600), Token::new("t"), Resume::Latest)
        .await
        .unwrap();
    let previous = coordinator::status::report(&again.shared)
        .previous
        .expect("the journal was read");
    assert_eq!(previous.state.as_deref(), Some("failed"));
    assert!(previous.reason.unwrap().contains("lost: no heartbeat"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_ring_regroups_into_the_next_generation_and_the_journal_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(manifest_with(dir.path(), 5000, 3), Token::new("t"), Resume::Latest)
        .await
        .unwrap();
    let mut client = client(&coordinator, Some("t")).await;
    let mut workers = Vec::new();
    for _ in 0..2 {
        workers.push(client.register(register()).await.unwrap().into_inner().worker_id);
    }
    let caller = client.clone();
    let rendezvous = |request: RendezvousRequest| {
        let mut client = caller.clone();
        tokio::spawn(async move { client.rendezvous(request).await.unwrap().into_inner() })
    };
    let first = [
        rendezvous(join(&workers[0], "127.0.0.1:9001", 0)),
        rendezvous(join(&workers[1], "127.0.0.1:9002", 0)),
    ];
    let mut generation = 0;
    for assignment in first {
        generation = assignment.await.unwrap().generation;
    }
    for id in &workers {
        client.heartbeat(heartbeat(id, 3, generation)).await.unwrap();
    }
    // Rank 0's ring broke: it asks to join the next generation, which begins a recovery.
    let rank0_again = rendezvous(join(&workers[0], "127.0.0.1:9011", generation));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(coordinator.shared.job.lock().unwrap().state, JobState::Recovering);
    let told = client.heartbeat(heartbeat(&workers[1], 3, generation)).await.unwrap();
    assert_eq!(told.into_inner().command, Command::Regroup as i32);
    // Rank 1 had completed step 4 since its last report: the restart counts from there.
    let rank1_again = rendezvous(RendezvousRequest {
        left_at_step: 4,
        ..join(&workers[1], "127.0.0.1:9012", generation)
    });
    let (a, b) = (rank0_again.await.unwrap(), rank1_again.await.unwrap());
    assert_eq!((a.generation, b.generation), (generation + 1, generation + 1));
    assert_eq!(
        (a.next_peer.as_str(), b.next_peer.as_str()),
        ("127.0.0.1:9012", "127.0.0.1:9011"),
        "the new listeners"
    );
    // Nothing was committed: the next ring starts over from step 0.
    assert_eq!((a.start_step, a.resume_from.as_str()), (0, ""));

    let report = coordinator::status::report(&coordinator.shared);
    assert_eq!(
        (report.state, report.generation, report.restarts_left),
        (JobState::Running, generation + 1, 2)
    );
    let restart = &report.restarts[0];
    assert_eq!(
        (restart.reached_step, restart.resumed_step, restart.world),
        (4, Some(0), Some(2))
    );
    assert_eq!(restart.training_after_seconds, None, "no step of the new ring yet");
    assert!(
        restart.cause.ends_with("(rank 0, test-host): connection reset by peer"),
        "{}",
        restart.cause
    );
    // The new ring's first step ends the recovery: training again, timed.
    client
        .heartbeat(heartbeat(&workers[0], 1, generation + 1))
        .await
        .unwrap();
    let report = coordinator::status::report(&coordinator.shared);
    let restart = &report.restarts[0];
    let (ranks, training) = (
        restart.ranks_after_seconds.unwrap(),
        restart.training_after_seconds.expect("timed at the first step"),
    );
    assert!(
        training >= ranks,
        "training again after {training} s, ranks after {ranks} s"
    );
    let metrics = coordinator::status::prometheus_text(&report);
    assert!(
        metrics.contains("coca_restarts 1")
            && metrics.contains("coca_steps_lost 4")
            && metrics.contains("coca_recovery_training_after_seconds_count 1")
            && metrics.contains("coca_recovery_training_after_seconds_bucket{le=\"300.0\"} 1"),
        "{metrics}"
    );
    drop(coordinator);
    // A coordinator started again over the same job counts on from there.
    let again = Coordinator::start(manifest_with(dir.path(), 5000, 3), Token::new("t"), Resume::Latest)
        .await
        .unwrap();
    let report = coordinator::status::report(&again.shared);
    assert_eq!(report.generation, generation + 2);
    assert_eq!(report.restarts.len(), 2);
    // The journal kept the first recovery's figures.
    let first = &report.restarts[0];
    assert_eq!((first.reached_step, first.steps_trained_again()), (4, 4));
    assert!(first
        .training_after_seconds
        .is_some_and(|s| s >= first.ranks_after_seconds.unwrap()));
    assert!(report.restarts[1]
        .cause
        .starts_with("the coordinator restarted (the journal says running"));
    let mut client = self::client(&again, Some("t")).await;
    let id = client.register(register()).await.unwrap().into_inner().worker_id;
    assert_eq!(id, "w-2", "ids go on from the earlier coordinator's");
}

/// A client holding the job's token but not following the protocol (a bug,
/// or hostile) during a running job: every call out of bounds is refused,
/// naming what is wrong; the job goes on as if it never came, and its
/// journal holds only what was accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_out_of_bounds_are_refused_by_name_and_the_job_goes_on_undisturbed() {
    let dir = tempfile::tempdir().unwrap();
    let text = manifest_text(dir.path(), 5000, 0)
        + &format!("[checkpoint]\nurl = \"{}/ckpt\"\nevery = 1\n", dir.path().display());
    let coordinator = Coordinator::start(
        Manifest::parse(&text, "m.toml").unwrap(),
        Token::new("t"),
        Resume::Latest,
    )
    .await
    .unwrap();
    let mut client = client(&coordinator, Some("t")).await;
    let first = client.register(register()).await.unwrap().into_inner().worker_id;
    let second = client.register(register()).await.unwrap().into_inner().worker_id;
    let caller = client.clone();
    let rendezvous = |id: String, address: &'static str| {
        let mut client = caller.clone();
        tokio::spawn(async move { client.rendezvous(join(&id, address, 0)).await.unwrap().into_inner() })
    };
    let (a, b) = (
        rendezvous(first.clone(), "127.0.0.1:9001"),
        rendezvous(second.clone(), "127.0.0.1:9002"),
    );
    let (a, _) = (a.await.unwrap(), b.await.unwrap());
    let generation = a.generation;
    fn refused<T>(result: Result<T, tonic::Status>, code: tonic::Code, message: &str) {
        let status = result.err().unwrap_or_else(|| panic!("accepted; expected `{message}`"));
        assert_eq!(status.code(), code, "{}", status.message());
        assert!(
            status.message().contains(message),
            "`{}` lacks `{message}`",
            status.message()
        );
    }

    // A worker registering thousands of times: the table stops at 2 x 2 + 64.
    let mut accepted = 2;
    let mut last = None;
    for _ in 0..1000 {
        match client.register(register()).await {
            Ok(reply) => {
                accepted += 1;
                last = Some(reply.into_inner().worker_id);
            }
            Err(status) => {
                refused(
                    Err::<(), _>(status),
                    tonic::Code::ResourceExhausted,
                    "68 workers are registered, the most this job takes",
                );
                break;
            }
        }
    }
    assert_eq!(accepted, 68);
    let stranger = last.unwrap();

    let with = |edit: &dyn Fn(&mut RendezvousRequest)| {
        let mut request = join(&stranger, "127.0.0.1:9100", 0);
        edit(&mut request);
        request
    };
    let mut call = client.clone();
    refused(
        call.rendezvous(with(&|r| r.collective_address = "my-laptop".into()))
            .await,
        tonic::Code::InvalidArgument,
        "collective_address `my-laptop` is not an IP address and port",
    );
    refused(
        call.rendezvous(with(&|r| r.nccl_unique_id = vec![7; 4096])).await,
        tonic::Code::InvalidArgument,
        "nccl_unique_id has 4096 bytes; NCCL's is 128",
    );
    refused(
        call.rendezvous(with(&|r| r.left_generation = generation + 5)).await,
        tonic::Code::InvalidArgument,
        "is after the job's generation",
    );

    let metrics = |step: u64| StepMetrics {
        step,
        source_epochs: vec![0.1, 0.1],
        ..Default::default()
    };
    let beat = |step: u64, metrics: Vec<StepMetrics>| HeartbeatRequest {
        metrics,
        ..heartbeat(&first, step, generation)
    };
    refused(
        call.heartbeat(beat(999, vec![])).await,
        tonic::Code::InvalidArgument,
        "step 999 is beyond the job's 5 steps",
    );
    call.heartbeat(beat(3, vec![metrics(1), metrics(2), metrics(3)]))
        .await
        .unwrap();
    refused(
        call.heartbeat(beat(1, vec![])).await,
        tonic::Code::InvalidArgument,
        "step 1 is behind step 3",
    );
    refused(
        call.heartbeat(beat(4, vec![metrics(2)])).await,
        tonic::Code::InvalidArgument,
        "metrics of step 2 are outside the steps 4..=4",
    );
    refused(
        call.heartbeat(beat(4, vec![metrics(4), metrics(4)])).await,
        tonic::Code::InvalidArgument,
        "metrics of step 4 are outside",
    );
    let mut wrong = metrics(4);
    wrong.source_epochs = vec![0.0; 5];
    refused(
        call.heartbeat(beat(4, vec![wrong])).await,
        tonic::Code::InvalidArgument,
        "step 4: source_epochs has 5 values for the job's 2 sources",
    );
    let mut wrong = metrics(4);
    wrong.bad_records = vec![BadRecordCount {
        source: 7,
        reason: "x".into(),
        count: 1,
    }];
    refused(
        call.heartbeat(beat(4, vec![wrong])).await,
        tonic::Code::InvalidArgument,
        "step 4: bad_records names source 7; the job has 2",
    );
    let mut wrong = metrics(4);
    wrong.evals = (0..100)
        .map(|i| EvalMetric {
            name: format!("e{i}"),
            value: 0.0,
        })
        .collect();
    refused(
        call.heartbeat(beat(4, vec![wrong])).await,
        tonic::Code::InvalidArgument,
        "step 4: 100 evals entries, more than 64",
    );
    // A message over gRPC's 4 MB limit never reaches the job.
    let mut huge = metrics(4);
    huge.evals = vec![EvalMetric {
        name: "x".repeat(5 << 20),
        value: 0.0,
    }];
    refused(
        call.heartbeat(beat(4, vec![huge])).await,
        tonic::Code::OutOfRange,
        "message length too large",
    );

    let shard = |worker: &str, file: &str, step: u64, sha256: &str| CheckpointShard {
        worker_id: worker.into(),
        step,
        file: file.into(),
        bytes: 10,
        sha256: sha256.into(),
        seconds: 0.1,
        generation,
    };
    let sha = "0".repeat(64);
    refused(
        call.report_checkpoint(shard(&first, "../../etc/passwd", 2, &sha)).await,
        tonic::Code::InvalidArgument,
        "file `../../etc/passwd` is not rank 0's shard of a world of 2 (`rank-00000-of-00002.safetensors`)",
    );
    refused(
        call.report_checkpoint(shard(&first, "rank-00000-of-00002.safetensors", 99, &sha))
            .await,
        tonic::Code::InvalidArgument,
        "step 99 is not a step of the job's 1..=5",
    );
    refused(
        call.report_checkpoint(shard(&first, "rank-00000-of-00002.safetensors", 2, "zz"))
            .await,
        tonic::Code::InvalidArgument,
        "sha256 `zz` is not a hex SHA-256",
    );
    refused(
        call.report_checkpoint(shard(&stranger, "rank-00000-of-00002.safetensors", 2, &sha))
            .await,
        tonic::Code::FailedPrecondition,
        "a checkpoint before rendezvous",
    );
    // Both ranks report shards that were never written: nothing is committed.
    call.report_checkpoint(shard(&first, "rank-00000-of-00002.safetensors", 2, &sha))
        .await
        .unwrap();
    refused(
        call.report_checkpoint(shard(&second, "rank-00001-of-00002.safetensors", 2, &sha))
            .await,
        tonic::Code::Unavailable,
        "rank-00000-of-00002.safetensors: missing; step 2 is not committed",
    );
    assert!(!dir.path().join("ckpt/step-00000002/COMMITTED").exists());

    refused(
        call.finish(FinishRequest {
            worker_id: first.clone(),
            step: 999,
            ok: true,
            message: String::new(),
        })
        .await,
        tonic::Code::InvalidArgument,
        "step 999 is beyond the job's 5 steps",
    );
    // A caller outside the ring says it failed: it leaves, the ring goes on;
    // said again, it is a stranger.
    let failed = |id: &str| FinishRequest {
        worker_id: id.into(),
        step: 5,
        ok: false,
        message: "hostile".into(),
    };
    call.finish(failed(&stranger)).await.unwrap();
    refused(
        call.finish(failed(&stranger)).await,
        tonic::Code::NotFound,
        &format!("unknown worker {stranger}"),
    );
    assert_eq!(coordinator.shared.job.lock().unwrap().state, JobState::Running);

    // The ring finishes as if none of this had come.
    for id in [&first, &second] {
        call.heartbeat(heartbeat(id, 5, generation)).await.unwrap();
        call.finish(FinishRequest {
            worker_id: id.clone(),
            step: 5,
            ok: true,
            message: String::new(),
        })
        .await
        .unwrap();
    }
    assert_eq!(coordinator.finished(Duration::from_secs(1)).await, JobState::Completed);
    let report = coordinator::status::report(&coordinator.shared);
    let states: Vec<&str> = report.transitions.iter().map(|t| t.state.name()).collect();
    assert_eq!(states, ["pending", "rendezvous", "running", "completed"]);
    drop(coordinator);
    // The journal: only the accepted registrations, and the job's own end.
    let journal = std::fs::read_to_string(dir.path().join("run/journal.jsonl")).unwrap();
    let registered = journal
        .lines()
        .filter(|line| line.contains(r#""event":"worker""#))
        .count();
    assert_eq!(registered, 68, "{journal}");
    let recovered = coordinator::journal::read(&dir.path().join("run/journal.jsonl")).unwrap();
    assert_eq!(recovered.state.as_deref(), Some("completed"));
}
