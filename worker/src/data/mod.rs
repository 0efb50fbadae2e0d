//! Data: from stored samples to what the model reads.

pub mod corpus;
pub mod dataset;
pub mod demo;
pub mod image;
pub mod import;
pub mod loader;
pub mod prompt;
pub mod shard;
pub mod tokenizer;
pub mod writer;
