//! Training: one optimisation step of the CoCa objective.

pub mod checkpointing;
pub mod contrastive;
pub mod ema;
pub mod gradients;
pub mod parameter_groups;
pub mod replicas;
pub mod sharded_adamw;
pub mod step;
pub mod synthetic;
