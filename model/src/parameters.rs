//! A module's parameters as plain values: flattened, or fingerprinted to
//! check that replicas agree.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::state::PathStack;

/// FNV-1a over the bits of every float parameter, in visiting order: equal
/// exactly when the parameters are bit-identical (barring collisions).
pub fn parameter_checksum<B: Backend, M: Module<B>>(module: &M) -> u64 {
    struct Checksum(u64);
    impl<B: Backend> ModuleVisitor<B> for Checksum {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let data = param.val().into_data().convert::<f32>();
            for value in data.as_slice::<f32>().expect("f32 data after convert") {
                for byte in value.to_bits().to_le_bytes() {
                    self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
                }
            }
        }
    }
    let mut checksum = Checksum(0xcbf2_9ce4_8422_2325);
    module.visit(&mut checksum);
    checksum.0
}

/// Every float parameter's values, flattened in visiting order.
pub fn parameter_values<B: Backend, M: Module<B>>(module: &M) -> Vec<f32> {
    struct Values(Vec<f32>);
    impl<B: Backend> ModuleVisitor<B> for Values {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let data = param.val().into_data().convert::<f32>();
            self.0
                .extend_from_slice(data.as_slice::<f32>().expect("f32 data after convert"));
        }
    }
    let mut values = Values(Vec::new());
    module.visit(&mut values);
    values.0
}

/// Every float parameter as (module path, element count), in visiting
/// order, without reading a value.
pub fn parameter_layout<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, usize)> {
    struct Layout {
        stack: PathStack,
        tensors: Vec<(String, usize)>,
    }
    impl<B: Backend> ModuleVisitor<B> for Layout {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.tensors
                .push((self.stack.path(), param.val().shape().num_elements()));
        }
    }
    let mut layout = Layout {
        stack: PathStack::default(),
        tensors: Vec::new(),
    };
    module.visit(&mut layout);
    layout.tensors
}

/// Every float parameter as (module path, shape, values), in visiting order.
pub fn named_parameters<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    struct Named {
        stack: PathStack,
        tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    }
    impl<B: Backend> ModuleVisitor<B> for Named {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let data = param.val().into_data().convert::<f32>();
            self.tensors.push((
                self.stack.path(),
                data.shape.to_vec(),
                data.to_vec().expect("f32 data after convert"),
            ));
        }
    }
    let mut named = Named {
        stack: PathStack::default(),
        tensors: Vec::new(),
    };
    module.visit(&mut named);
    named.tensors
}
