//! The gRPC service workers call: registration, rendezvous, heartbeats,
//! checkpoint reports, finish.

use std::sync::Arc;
use std::time::Instant;

use checkpoint::layout::ShardRecord;
use proto::coordinator_server::Coordinator as CoordinatorRpc;
use proto::{
    Assignment, CheckpointReply, CheckpointShard, CollectiveKind as RpcCollectiveKind, FinishReply, FinishRequest,
    HeartbeatReply, HeartbeatRequest, RegisterReply, RegisterRequest, RendezvousRequest, WorkerPhase, PROTOCOL_VERSION,
};
use tonic::{Request, Response, Status};

use contract::status::JobState;

use crate::bounds;
use crate::job::{Job, Left, Worker};
use crate::journal::Event;
use crate::Shared;

pub struct Service {
    pub shared: Arc<Shared>,
}

#[tonic::async_trait]
impl CoordinatorRpc for Service {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterReply>, Status> {
        let request = request.into_inner();
        if request.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "this worker speaks protocol version {}, this coordinator speaks version {PROTOCOL_VERSION}; \
                 run the same coca release on both",
                request.protocol_version
            )));
        }
        let now = Instant::now();
        let mut id = String::new();
        let mut refused = None;
        self.shared.decide(|job| {
            if job.state.is_terminal() {
                refused = Some(Status::failed_precondition(format!(
                    "the job is {} and takes no new workers",
                    job.state.name()
                )));
                return Vec::new();
            }
            let limit = bounds::max_workers(job.policy.target_world);
            if job.workers.len() >= limit {
                refused = Some(Status::resource_exhausted(format!(
                    "{} workers are registered, the most this job takes (2 x cluster.workers + 64); \
                     a worker that leaves makes room",
                    job.workers.len()
                )));
                return Vec::new();
            }
            id = job.register(
                request.host.clone(),
                request.device.clone(),
                request.preferred_rank.map(|r| r as usize),
                now,
            );
            if job.state == JobState::Pending {
                job.transition(JobState::Rendezvous, Some("the first worker registered".into()));
            }
            Vec::new()
        });
        if let Some(status) = refused {
            return Err(status);
        }
        self.shared.journal(Event::Worker {
            id: id.clone(),
            host: request.host,
            at: crate::job::unix_now(),
        });
        let collective = match self.shared.manifest.cluster.collective {
            contract::manifest::CollectiveKind::Tcp => RpcCollectiveKind::Tcp,
            contract::manifest::CollectiveKind::Nccl => RpcCollectiveKind::Nccl,
        };
        Ok(Response::new(RegisterReply {
            worker_id: id,
            collective: collective as i32,
            heartbeat_ms: self.shared.manifest.cluster.heartbeat_ms,
        }))
    }

    async fn rendezvous(&self, request: Request<RendezvousRequest>) -> Result<Response<Assignment>, Status> {
        bounds::rendezvous(request.get_ref(), self.shared.job.lock().expect("job state").generation)?;
        let RendezvousRequest {
            worker_id: id,
            nccl_unique_id,
            collective_address,
            left_generation,
            left_because,
            left_at_step,
        } = request.into_inner();
        let nccl = self.shared.manifest.cluster.collective == contract::manifest::CollectiveKind::Nccl;
        if nccl && nccl_unique_id.is_empty() {
            return Err(Status::invalid_argument(
                "this job's collective is nccl and this worker sent no NCCL unique id (a coca built without CUDA?)",
            ));
        }
        let mut ready = self.shared.ready.subscribe();
        registered(&mut self.shared.job.lock().expect("job state"), &id)?;
        let left = (left_generation > 0).then_some(Left {
            generation: left_generation,
            step: left_at_step,
            because: left_because,
        });
        self.shared
            .decide(|job| job.ask_to_join(&id, collective_address, nccl_unique_id, left, Instant::now()));
        loop {
            {
                let mut job = self.shared.job.lock().expect("job state");
                let worker = registered(&mut job, &id)?;
                let (rank, joining) = (worker.rank, worker.joining);
                if job.state.is_terminal() {
                    return Err(Status::aborted(format!("the job is {}", job.state.name())));
                }
                let nccl_unique_id = job.nccl_unique_id().map(<[u8]>::to_vec);
                let assigned = joining == Some(job.generation) && job.state != JobState::Recovering;
                if let Some(rank) = rank.filter(|_| assigned && (!nccl || nccl_unique_id.is_some())) {
                    let world = job.ring.len();
                    let neighbour = |offset: usize| job.ring[(rank + offset) % world].clone();
                    return Ok(Response::new(Assignment {
                        rank: rank as u32,
                        world_size: job.world_size as u32,
                        prev_peer: neighbour(world - 1),
                        next_peer: neighbour(1),
                        start_step: job.start_step,
                        nccl_unique_id: nccl_unique_id.unwrap_or_default(),
                        resume_from: job.checkpoint.resumed_from.clone().unwrap_or_default(),
                        generation: job.generation,
                        plan: self.shared.plan_json.clone(),
                    }));
                }
            }
            if ready.changed().await.is_err() {
                return Err(Status::unavailable("the coordinator is shutting down"));
            }
        }
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatReply>, Status> {
        let request = request.into_inner();
        let mut job = self.shared.job.lock().expect("job state");
        if job.is_foreign(request.generation) {
            return Err(Status::not_found(format!(
                "worker {} trains in generation {}, which this coordinator never formed",
                request.worker_id, request.generation
            )));
        }
        // Progress counts from the current ring only: an older one's steps are trained again.
        let current = request.generation == job.generation;
        let (total_steps, sources) = (job.total_steps, self.shared.plan.sources.len());
        let worker = registered(&mut job, &request.worker_id)?;
        if current {
            bounds::heartbeat(&request, worker.step, total_steps, sources)?;
        }
        worker.last_heartbeat = Instant::now();
        worker.phase = WorkerPhase::try_from(request.phase)
            .unwrap_or(WorkerPhase::Starting)
            .into();
        if !request.device.is_empty() {
            worker.device = request.device;
        }
        let before = worker.step;
        let rank = worker.rank.filter(|_| current);
        let mut changes = Vec::new();
        if current {
            worker.step = worker.step.max(request.step);
            changes.extend(job.completed_step(request.step, Instant::now()));
            if rank == Some(0) {
                self.shared.log_metrics(&request.metrics);
            }
            for metrics in request.metrics {
                job.record_metrics(&request.worker_id, rank, metrics);
            }
        }
        // The journal hears of every 10th step rank 0 reaches (the slowest rank's step).
        let journal_step = (rank == Some(0) && before / 10 != request.step / 10).then(|| job.step());
        let command = job.command_for(&request.worker_id, request.generation);
        drop(job);
        self.shared.announce(changes);
        if let Some(step) = journal_step {
            self.shared.journal(Event::Step {
                step,
                at: crate::job::unix_now(),
            });
        }
        Ok(Response::new(HeartbeatReply {
            command: command as i32,
        }))
    }

    async fn report_checkpoint(&self, request: Request<CheckpointShard>) -> Result<Response<CheckpointReply>, Status> {
        let shard = request.into_inner();
        let Some(checkpoint) = self.shared.manifest.checkpoint.clone() else {
            return Err(Status::failed_precondition("this job has no [checkpoint] section"));
        };
        let complete = {
            let mut job = self.shared.job.lock().expect("job state");
            if !job.accepts_shard_of(shard.generation) {
                return Err(Status::aborted(format!(
                    "step {}'s shard comes from generation {}, the job is in generation {}: it does not count",
                    shard.step, shard.generation, job.generation
                )));
            }
            let rank = registered(&mut job, &shard.worker_id)?
                .rank
                .ok_or_else(|| Status::failed_precondition("a checkpoint before rendezvous"))?;
            bounds::checkpoint_shard(&shard, rank, job.world_size, job.total_steps)?;
            let record = ShardRecord {
                file: shard.file,
                bytes: shard.bytes,
                sha256: shard.sha256,
            };
            job.record_shard(shard.step, rank, record, shard.seconds)
        };
        let Some(reports) = complete else {
            return Ok(Response::new(CheckpointReply { committed: false }));
        };
        let step = shard.step;
        let seconds = reports.iter().map(|(_, s)| *s).fold(0.0, f64::max);
        let shards: Vec<ShardRecord> = reports.into_iter().map(|(record, _)| record).collect();
        let options = crate::plan::store_options(&self.shared.plan.store);
        let committed = tokio::task::spawn_blocking(move || {
            let root = store::Store::open(&checkpoint.url, &options)?;
            // A store that fails (an S3 server away) is tried again for as
            // long as the ranks try their saves.
            let bytes = checkpoint::save_retry::retry_failing_store(
                std::time::Duration::from_secs(checkpoint.save_retry_seconds),
                || checkpoint::commit(&root, step, shards.clone(), checkpoint.keep, crate::job::unix_now()),
                |error, _| tracing::warn!("committing step {step} failed ({error}); trying again"),
            )?;
            Ok::<_, checkpoint::CheckpointError>((bytes, checkpoint::step_url(&root, step)))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let (bytes, url) = committed.map_err(|e| Status::unavailable(format!("committing step {step}: {e}")))?;
        {
            let mut job = self.shared.job.lock().expect("job state");
            if job.newest_commit.as_ref().is_none_or(|(newest, _)| step > *newest) {
                job.newest_commit = Some((step, url));
            }
            let progress = &mut job.checkpoint;
            progress.last_committed_step = Some(step);
            progress.last_save_seconds = Some(seconds);
            progress.last_bytes = Some(bytes);
            progress.committed += 1;
        }
        tracing::info!("committed step {step} ({bytes} bytes, slowest save {seconds:.2} s)");
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.flush_tensorboard());
        self.shared.journal(Event::Checkpoint {
            step,
            at: crate::job::unix_now(),
        });
        Ok(Response::new(CheckpointReply { committed: true }))
    }

    async fn finish(&self, request: Request<FinishRequest>) -> Result<Response<FinishReply>, Status> {
        let request = request.into_inner();
        {
            let mut job = self.shared.job.lock().expect("job state");
            let total_steps = job.total_steps;
            let worker = registered(&mut job, &request.worker_id)?;
            bounds::finish(request.step, total_steps)?;
            // A finish said again (a retried call) changes nothing.
            if worker.finished.is_some() {
                return Ok(Response::new(FinishReply {}));
            }
        }
        let mut ended = None;
        self.shared.decide(|job| {
            job.finish(
                &request.worker_id,
                request.step,
                request.ok,
                request.message,
                Instant::now(),
            );
            ended = job.state.is_terminal().then(|| job.step());
            Vec::new()
        });
        if let Some(step) = ended {
            self.shared.journal(Event::Step {
                step,
                at: crate::job::unix_now(),
            });
        }
        Ok(Response::new(FinishReply {}))
    }
}

/// The worker a call names, which must have registered.
fn registered<'a>(job: &'a mut Job, id: &str) -> Result<&'a mut Worker, Status> {
    job.workers
        .get_mut(id)
        .ok_or_else(|| Status::not_found(format!("unknown worker {id}")))
}
