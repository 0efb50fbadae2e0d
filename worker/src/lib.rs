//! coca's worker process: where the coordinator is ([`discovery`]), the
//! GPU kernel set-up ([`kernels`]), the job loop that registers, trains,
//! reports and checkpoints ([`job`]), and the benchmarks that time its
//! parts ([`bench`]).

pub mod bench;
pub mod discovery;
pub mod job;
pub mod kernels;
