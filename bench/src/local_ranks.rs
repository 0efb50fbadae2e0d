//! A benchmark across ranks on this machine: the parent starts each rank as
//! a process of the same program, joined into a TCP ring (or an NCCL
//! communicator) at addresses the parent chose; each child prints its
//! measured time as its last word, and the slowest rank's is the result.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use collective::tcp::RingListener;
use collective::{Collective, CollectiveError};

#[derive(Debug, thiserror::Error)]
pub enum LocalRanksError {
    #[error("cannot run rank {rank} ({program})")]
    Run {
        rank: usize,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("rank {rank} failed ({status}), said {said:?}")]
    Failed {
        rank: usize,
        status: ExitStatus,
        said: String,
    },
    #[error("rank {rank} is outside the {world} peers")]
    Outside { rank: usize, world: usize },
    #[error("the NCCL id `{0}` is not hex")]
    NcclId(String),
    #[error("this coca was built without CUDA (cargo build --release --features cuda)")]
    WithoutCuda,
    #[error(transparent)]
    Collective(#[from] CollectiveError),
}

/// How a child rank's last line starts; its measured time in nanoseconds follows.
const RESULT: &str = "result ";

/// What a child rank prints last: its measured time.
pub fn report(time: Duration) -> String {
    format!("{RESULT}{}", time.as_nanos())
}

/// Starts `world` copies of `program` (`args` plus `--world`, `--child-rank`
/// and `--peers`, loopback addresses free a moment ago) and returns the
/// slowest rank's [`report`]ed time.
pub fn run(program: &Path, args: &[String], world: usize) -> Result<Duration, LocalRanksError> {
    let peers = collective::loopback::free_addresses(world)?;
    let peers = peers.iter().map(SocketAddr::to_string).collect::<Vec<_>>().join(",");
    let mut ranks: Vec<Child> = Vec::with_capacity(world);
    for rank in 0..world {
        let child = Command::new(program)
            .args(args)
            .args(["--world", &world.to_string(), "--child-rank", &rank.to_string()])
            .args(["--peers", &peers])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|source| LocalRanksError::Run {
                rank,
                program: program.display().to_string(),
                source,
            })?;
        ranks.push(child);
    }
    // Every rank is waited for; the first failure is the one reported.
    let mut slowest = Ok(Duration::ZERO);
    for (rank, child) in ranks.into_iter().enumerate() {
        let waited = child.wait_with_output();
        let outcome = waited
            .map_err(|source| LocalRanksError::Run {
                rank,
                program: program.display().to_string(),
                source,
            })
            .and_then(|output| {
                let said = String::from_utf8_lossy(&output.stdout).into_owned();
                let reported = said
                    .lines()
                    .find_map(|line| line.strip_prefix(RESULT))
                    .and_then(|nanos| nanos.trim().parse().ok())
                    .map(Duration::from_nanos);
                match reported {
                    Some(time) if output.status.success() => Ok(time),
                    _ => Err(LocalRanksError::Failed {
                        rank,
                        status: output.status,
                        said,
                    }),
                }
            });
        slowest = match (slowest, outcome) {
            (Ok(slowest), Ok(time)) => Ok(slowest.max(time)),
            (Ok(_), Err(failed)) | (Err(failed), _) => Err(failed),
        };
    }
    slowest
}

/// Rank `rank`'s place in the TCP ring of `peers` (every rank's address, in rank order).
pub fn join_ring(rank: usize, peers: &[SocketAddr]) -> Result<Box<dyn Collective>, LocalRanksError> {
    let address = *peers.get(rank).ok_or(LocalRanksError::Outside {
        rank,
        world: peers.len(),
    })?;
    let ring = RingListener::bind(address)?.connect(rank, peers, Duration::from_secs(60))?;
    Ok(Box::new(ring))
}

/// A new NCCL unique id, in hex (to pass to other processes).
#[cfg(feature = "cuda")]
pub fn nccl_unique_id() -> Result<String, LocalRanksError> {
    let id = collective::nccl::NcclCollective::unique_id()?;
    Ok(id.iter().map(|byte| format!("{byte:02x}")).collect())
}

/// Rank `rank` of `world` on GPU `rank`, joined to the communicator of `id` (hex).
#[cfg(feature = "cuda")]
pub fn join_nccl(rank: usize, world: usize, id: &str) -> Result<Box<dyn Collective>, LocalRanksError> {
    let bytes = hex(id).ok_or_else(|| LocalRanksError::NcclId(id.to_string()))?;
    Ok(Box::new(collective::nccl::NcclCollective::new(
        rank, rank, world, &bytes,
    )?))
}

#[cfg(feature = "cuda")]
fn hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}

#[cfg(not(feature = "cuda"))]
pub fn nccl_unique_id() -> Result<String, LocalRanksError> {
    Err(LocalRanksError::WithoutCuda)
}

#[cfg(not(feature = "cuda"))]
pub fn join_nccl(_: usize, _: usize, _: &str) -> Result<Box<dyn Collective>, LocalRanksError> {
    Err(LocalRanksError::WithoutCuda)
}
