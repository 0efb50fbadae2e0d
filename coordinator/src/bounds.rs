//! What a worker's calls may say: every value a call carries is checked
//! against the job before it touches the job's state, so a client holding
//! the token but not following the protocol (a bug, or hostile) is refused
//! by name and changes nothing: no step beyond the job, no step going
//! back, no source that does not exist, no unbounded table, no checkpoint
//! naming another rank's file.

use std::net::SocketAddr;

use proto::{CheckpointShard, HeartbeatRequest, RendezvousRequest, StepMetrics};
use tonic::Status;

/// Registered workers at most: the ring, as many spares, and some slack.
pub fn max_workers(target_world: usize) -> usize {
    2 * target_world + 64
}

/// NCCL's unique id is 128 bytes.
const NCCL_UNIQUE_ID_BYTES: usize = 128;
/// Entries of one step's lists (bad-record reasons, evaluations) and the
/// length of their names.
const MAX_ENTRIES: usize = 64;
const MAX_NAME: usize = 256;

fn invalid(message: String) -> Status {
    Status::invalid_argument(message)
}

/// A rendezvous: a listening address peers can dial, an NCCL id of
/// NCCL's size, a generation left that exists.
pub fn rendezvous(request: &RendezvousRequest, generation: u64) -> Result<(), Status> {
    if request.collective_address.parse::<SocketAddr>().is_err() {
        return Err(invalid(format!(
            "collective_address `{}` is not an IP address and port peers can dial",
            clip(&request.collective_address)
        )));
    }
    if request.nccl_unique_id.len() > NCCL_UNIQUE_ID_BYTES {
        return Err(invalid(format!(
            "nccl_unique_id has {} bytes; NCCL's is {NCCL_UNIQUE_ID_BYTES}",
            request.nccl_unique_id.len()
        )));
    }
    if request.left_generation > generation {
        return Err(invalid(format!(
            "left_generation {} is after the job's generation {generation}",
            request.left_generation
        )));
    }
    Ok(())
}

/// A heartbeat of the current ring, from a worker at step `before`: its
/// step within the job and not going back, and each step's metrics
/// between `before` and it, in order, about the job's sources.
pub fn heartbeat(request: &HeartbeatRequest, before: u64, total_steps: u64, sources: usize) -> Result<(), Status> {
    let step = request.step;
    if step > total_steps {
        return Err(invalid(format!("step {step} is beyond the job's {total_steps} steps")));
    }
    if step < before {
        return Err(invalid(format!(
            "step {step} is behind step {before}, which this worker reported before"
        )));
    }
    let mut last = before;
    for metrics in &request.metrics {
        if metrics.step <= last || metrics.step > step {
            return Err(invalid(format!(
                "metrics of step {} are outside the steps {}..={step} this heartbeat reports, in order",
                metrics.step,
                before + 1
            )));
        }
        last = metrics.step;
        step_metrics(metrics, sources)?;
    }
    Ok(())
}

fn step_metrics(metrics: &StepMetrics, sources: usize) -> Result<(), Status> {
    let at = metrics.step;
    for (field, len) in [
        ("source_epochs", metrics.source_epochs.len()),
        ("source_samples", metrics.source_samples.len()),
    ] {
        if len != 0 && len != sources {
            return Err(invalid(format!(
                "step {at}: {field} has {len} values for the job's {sources} sources"
            )));
        }
    }
    let named_sources = metrics
        .bad_records
        .iter()
        .map(|bad| ("bad_records", bad.source))
        .chain(metrics.traffic.iter().map(|traffic| ("traffic", traffic.source)));
    for (field, source) in named_sources {
        if source as usize >= sources {
            return Err(invalid(format!(
                "step {at}: {field} names source {source}; the job has {sources}"
            )));
        }
    }
    for (field, count) in [
        ("bad_records", metrics.bad_records.len()),
        ("evals", metrics.evals.len()),
    ] {
        if count > MAX_ENTRIES {
            return Err(invalid(format!(
                "step {at}: {count} {field} entries, more than {MAX_ENTRIES}"
            )));
        }
    }
    let names = metrics
        .bad_records
        .iter()
        .map(|bad| &bad.reason)
        .chain(metrics.evals.iter().map(|eval| &eval.name));
    if let Some(name) = names.into_iter().find(|name| name.len() > MAX_NAME) {
        return Err(invalid(format!(
            "step {at}: a name of {} bytes (`{}`), more than {MAX_NAME}",
            name.len(),
            clip(name)
        )));
    }
    Ok(())
}

/// A checkpoint shard: a step of the job, the file of this rank in this
/// world, a SHA-256.
pub fn checkpoint_shard(shard: &CheckpointShard, rank: usize, world: usize, total_steps: u64) -> Result<(), Status> {
    if shard.step == 0 || shard.step > total_steps {
        return Err(invalid(format!(
            "step {} is not a step of the job's 1..={total_steps}",
            shard.step
        )));
    }
    let expected = checkpoint::layout::shard_file(rank, world);
    if shard.file != expected {
        return Err(invalid(format!(
            "file `{}` is not rank {rank}'s shard of a world of {world} (`{expected}`)",
            clip(&shard.file)
        )));
    }
    if shard.sha256.len() != 64 || !shard.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(format!(
            "sha256 `{}` is not a hex SHA-256",
            clip(&shard.sha256)
        )));
    }
    Ok(())
}

/// A finish: a step within the job.
pub fn finish(step: u64, total_steps: u64) -> Result<(), Status> {
    if step > total_steps {
        return Err(invalid(format!("step {step} is beyond the job's {total_steps} steps")));
    }
    Ok(())
}

/// A value quoted in an error, at most 64 characters of it.
fn clip(text: &str) -> String {
    match text.char_indices().nth(64) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}
