//! What `coca bench` measures, and how it starts the processes it measures
//! across: a training step ([`step`], on a GPU: [`gpu`]), the all-reduce
//! ([`all_reduce`]), the loader ([`data`]), checkpoints ([`checkpoint`]),
//! caption generation ([`caption`]), the coordinator under a swarm of
//! simulated workers ([`swarm`]), and ranks as local processes
//! ([`local_ranks`]). The CLI parses the arguments and prints the figures.

pub mod all_reduce;
pub mod caption;
pub mod checkpoint;
pub mod data;
pub mod gpu;
pub mod local_ranks;
pub mod step;
pub mod swarm;

/// The middle of `times` (the upper middle of an even count).
fn median(mut times: Vec<std::time::Duration>) -> std::time::Duration {
    times.sort();
    times[times.len() / 2]
}
