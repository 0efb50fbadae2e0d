//! coca's worker process: where the coordinator is ([`discovery`]), the
//! GPU kernel set-up ([`kernels`]), and the job loop that registers, trains,
//! reports and checkpoints ([`job`]).

pub mod discovery;
pub mod job;
pub mod kernels;
