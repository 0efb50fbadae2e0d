//! Evaluation metrics, implemented from their published definitions.

pub mod bleu;
pub mod cider;
pub mod periodic;
pub mod ranking;
pub mod tasks;
mod words;
