//! An exponential moving average of the parameters (`train.ema_decay`):
//! after every step, `ema = decay * ema + (1 - decay) * parameters`, in f32
//! on the host, the same on every rank; it starts as the parameters of the
//! first step. Checkpoints store it (`checkpoint::ema`), evaluation and
//! export read it with `--weights ema`.

use burn::tensor::backend::Backend;

use crate::parameters::parameter_values;
use crate::CocaModel;

#[derive(Debug, Clone)]
pub struct Ema {
    pub decay: f64,
    /// Every parameter, flattened in visiting order (a parameter section).
    values: Option<Vec<f32>>,
}

impl Ema {
    pub fn new(decay: f64) -> Self {
        Self { decay, values: None }
    }

    /// Continues from the average a checkpoint holds.
    pub fn with_values(mut self, values: Vec<f32>) -> Self {
        self.values = Some(values);
        self
    }

    /// The average so far, if a step has been taken or one was loaded.
    pub fn values(&self) -> Option<&[f32]> {
        self.values.as_deref()
    }

    /// Before a step: the average starts as the parameters.
    pub fn start<B: Backend>(&mut self, model: &CocaModel<B>) {
        if self.values.is_none() {
            self.values = Some(parameter_values(model));
        }
    }

    /// After a step: the parameters it left, averaged in.
    pub fn update<B: Backend>(&mut self, model: &CocaModel<B>) {
        let parameters = parameter_values(model);
        let values = self.values.get_or_insert_with(|| parameters.clone());
        average(values, &parameters, self.decay as f32);
    }
}

fn average(ema: &mut [f32], parameters: &[f32], decay: f32) {
    for (average, &parameter) in ema.iter_mut().zip(parameters) {
        *average = decay * *average + (1.0 - decay) * parameter;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_average_weighs_each_step_by_its_age() {
        let mut ema = vec![1.0f32, -2.0];
        super::average(&mut ema, &[3.0, 0.0], 0.5);
        super::average(&mut ema, &[5.0, 4.0], 0.5);
        // 0.25 * start + 0.25 * first + 0.5 * second
        assert_eq!(ema, [0.25 + 0.75 + 2.5, -0.5 + 0.0 + 2.0]);
    }
}
