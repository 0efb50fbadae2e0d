//! Evaluation metrics, implemented from their published definitions.

pub mod bleu;
pub mod cider;
pub mod ranking;
mod words;
