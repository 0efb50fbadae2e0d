//! Deterministic parameter initialisation.
//!
//! Every parameter draws from its own generator, seeded by the job seed and
//! the parameter's module path. Initial weights are therefore bit-identical
//! across processes, ranks and backends, and independent of construction
//! order or of other threads seeding burn's global generator.

use burn::module::Param;
use burn::nn::{LayerNorm, LayerNormConfig};

use super::dense::Dense;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use contract::rng::{fnv1a, SplitMix64};

/// Creates parameters under a module path (`image_encoder.blocks.3.attn`).
#[derive(Debug, Clone)]
pub struct Init<'a, B: Backend> {
    seed: u64,
    path: String,
    device: &'a B::Device,
    /// False for a model whose every parameter is about to be replaced
    /// (loaded, imported): drawing them would be wasted time.
    draw: bool,
}

impl<'a, B: Backend> Init<'a, B> {
    pub fn new(seed: u64, device: &'a B::Device) -> Self {
        Self {
            seed,
            path: String::new(),
            device,
            draw: true,
        }
    }

    /// Parameters of the right shapes, all zero.
    pub fn placeholder(device: &'a B::Device) -> Self {
        Self {
            draw: false,
            ..Self::new(0, device)
        }
    }

    pub fn device(&self) -> &'a B::Device {
        self.device
    }

    /// The initialiser of a submodule.
    pub fn child(&self, name: impl std::fmt::Display) -> Self {
        let path = if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        };
        Self {
            seed: self.seed,
            path,
            device: self.device,
            draw: self.draw,
        }
    }

    /// Normally distributed values with mean 0 and standard deviation `std`.
    pub fn normal<const D: usize>(&self, name: &str, shape: [usize; D], std: f64) -> Param<Tensor<B, D>> {
        if !self.draw {
            return self.constant(shape, 0.0);
        }
        let mut rng = SplitMix64::new(self.seed ^ fnv1a(&format!("{}.{name}", self.path)));
        let count: usize = shape.iter().product();
        let values: Vec<f32> = (0..count).map(|_| (rng.standard_normal() * std) as f32).collect();
        Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), self.device))
    }

    pub fn constant<const D: usize>(&self, shape: [usize; D], value: f32) -> Param<Tensor<B, D>> {
        Param::from_tensor(Tensor::full(shape, value, self.device))
    }

    /// A linear layer with weights N(0, std^2) and, if requested, zero bias.
    pub fn linear(&self, name: &str, input: usize, output: usize, std: f64, bias: bool) -> Dense<B> {
        let init = self.child(name);
        Dense {
            weight: init.normal("weight", [input, output], std),
            bias: bias.then(|| init.constant([output], 0.0)),
        }
    }

    /// A layer norm with unit scale and zero shift.
    pub fn layer_norm(&self, width: usize, epsilon: f64) -> LayerNorm<B> {
        LayerNormConfig::new(width).with_epsilon(epsilon).init(self.device)
    }
}

/// Standard deviation that keeps activations at unit scale: fan_in^-1/2.
pub fn fan_in_std(fan_in: usize) -> f64 {
    (fan_in as f64).powf(-0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_seeds_give_distinct_streams() {
        let device = Default::default();
        let a = Init::<crate::backend::Cpu>::new(1, &device);
        let first = |init: &Init<crate::backend::Cpu>, name: &str| -> Vec<f32> {
            init.normal(name, [4], 1.0).val().into_data().to_vec().unwrap()
        };
        assert_eq!(first(&a, "w"), first(&a, "w"));
        assert_ne!(first(&a, "w"), first(&a, "v"));
        assert_ne!(first(&a, "w"), first(&a.child("x"), "w"));
        assert_ne!(first(&a, "w"), first(&Init::new(2, &device), "w"));
    }
}
