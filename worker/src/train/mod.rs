//! Training: one optimisation step of the CoCa objective.

pub mod step;
pub mod synthetic;
