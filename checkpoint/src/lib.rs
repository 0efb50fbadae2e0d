//! coca's sharded checkpoints, burn-free: the layout every part agrees on
//! ([`layout`]), shard files ([`shard`]), reading, checking and writing one
//! step ([`step`]), and a location as a whole: which step a job resumes
//! from, committing and retention ([`location`]), and saves that outlast a
//! failing store ([`save_retry`]). The coordinator, the
//! worker, `coca eval` and `coca export` all go through here; the model
//! crate only turns its parameters and optimizer into the flat state.
//! Blocking (object store calls): run off an async runtime.

pub mod ema;
mod error;
pub mod layout;
pub mod location;
pub mod save_retry;
pub mod shard;
pub mod step;

pub use error::CheckpointError;
pub use location::{choose, commit, read_named, step_url, steps, Chosen, NamedState, Resume};
pub use step::{read_state, read_step, verify, write_meta, write_shard};
