//! WebDataset tar shards read in place (img2dataset's and open_clip's
//! format): the samples of one tar ([`tar_shard`]), and the index a tar
//! source is planned from ([`index`]: built once, kept beside the data or
//! in the job's directory). Where a source's tars are is the contract's
//! (`contract::shard_pattern`). Burn-free: the coordinator builds and pins
//! indexes with it, the loader reads samples with it.

pub mod index;
pub mod tar_shard;

pub use index::{IndexBuild, IndexPlace, IndexReport, TarIndexError};
pub use tar_shard::{Label, TarSample, TarShard};
