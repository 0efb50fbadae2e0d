//! Data: from stored samples to what the model reads.

pub mod demo;
pub mod image;
pub mod prompt;
pub mod tokenizer;
