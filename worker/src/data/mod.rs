//! Data: from stored samples to what the model reads.

pub mod prompt;
pub mod tokenizer;
