//! Data: from stored samples to what the model reads.

pub mod image;
pub mod prompt;
pub mod tokenizer;
