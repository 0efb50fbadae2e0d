//! The training state as one flattened vector: parameters, then AdamW's
//! first and second moments, each tensor in module visiting order and
//! named by its module path. burn keys optimizer state by ParamIds that
//! are random per process, so the path, never the id, identifies a tensor.

mod sharded;

pub use sharded::{encode_shard, load, save_shard, write_initial, JobFacts, SavedShard, StateLayout};

use hashbrown::HashMap;

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::record::AdaptorRecord;
use burn::optim::{AdamW, AdamWState, AdaptiveMomentumState};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use checkpoint::layout::{TensorEntry, SECTIONS};

use crate::CocaModel;

/// AdamW's state as burn keeps it, by ParamId.
pub type OptimizerRecord<B> = HashMap<ParamId, AdaptorRecord<AdamW, B>>;
/// The optimizer a trainer steps with.
pub type Optimizer<B> = OptimizerAdaptor<AdamW, CocaModel<B>, B>;

/// Module path of the parameter being visited: the stack of module names.
#[derive(Default)]
pub(crate) struct PathStack(Vec<String>);

impl PathStack {
    pub(crate) fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    pub(crate) fn exit(&mut self) {
        self.0.pop();
    }
    pub(crate) fn path(&self) -> String {
        self.0.join(".")
    }
}

/// The flattened state's tensors (offsets within a section) and the section length.
pub fn tensor_index<B: AutodiffBackend>(model: &CocaModel<B>, record: &OptimizerRecord<B>) -> (Vec<TensorEntry>, u64) {
    struct Index<'a, B: AutodiffBackend> {
        stack: PathStack,
        record: &'a OptimizerRecord<B>,
        entries: Vec<TensorEntry>,
        offset: u64,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Index<'_, B> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let entry = TensorEntry {
                path: self.stack.path(),
                shape: param.val().dims().to_vec(),
                dtype: "F32".into(),
                offset: self.offset,
                optimizer_state: self.record.contains_key(&param.id),
            };
            self.offset += entry.len();
            self.entries.push(entry);
        }
    }
    let mut index = Index {
        stack: PathStack::default(),
        record,
        entries: Vec::new(),
        offset: 0,
    };
    model.visit(&mut index);
    (index.entries, index.offset)
}

/// AdamW's step count: the same for every tensor it has stepped.
pub fn optimizer_steps<B: AutodiffBackend>(model: &CocaModel<B>, record: &OptimizerRecord<B>) -> u64 {
    struct Steps<'a, B: AutodiffBackend> {
        record: &'a OptimizerRecord<B>,
        steps: Option<u64>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Steps<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let (None, Some(record)) = (self.steps, self.record.get(&param.id)) {
                self.steps = Some(record.clone().into_state::<D>().momentum.time as u64);
            }
        }
    }
    let mut steps = Steps { record, steps: None };
    model.visit(&mut steps);
    steps.steps.unwrap_or(0)
}

/// Writes elements `[start, end)` of the flattened state into `out`
/// (little-endian f32, `out.len() == 4 * (end - start)`), each tensor's
/// values copied once, straight from the backend's data.
pub fn fill_range<B: AutodiffBackend>(
    model: &CocaModel<B>,
    record: &OptimizerRecord<B>,
    section_len: u64,
    (start, end): (u64, u64),
    out: &mut [u8],
) {
    struct Filler<'a, B: AutodiffBackend> {
        record: &'a OptimizerRecord<B>,
        section_len: u64,
        range: (u64, u64),
        offset: u64,
        out: &'a mut [u8],
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Filler<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let len = param.val().shape().num_elements() as u64;
            let offset = self.offset;
            self.offset += len;
            for section in 0..SECTIONS.len() {
                let begin = section as u64 * self.section_len + offset;
                let (lo, hi) = (begin.max(self.range.0), (begin + len).min(self.range.1));
                if lo >= hi {
                    continue;
                }
                let target = &mut self.out[4 * (lo - self.range.0) as usize..4 * (hi - self.range.0) as usize];
                let tensor = match section {
                    0 => Some(param.val().inner()),
                    _ => self.record.get(&param.id).map(|record| {
                        let momentum = record.clone().into_state::<D>().momentum;
                        if section == 1 {
                            momentum.moment_1
                        } else {
                            momentum.moment_2
                        }
                    }),
                };
                match tensor {
                    Some(tensor) => {
                        let data = tensor.into_data().convert::<f32>();
                        let values = data.as_slice::<f32>().expect("f32 data after convert");
                        let piece = &values[(lo - begin) as usize..(hi - begin) as usize];
                        target.copy_from_slice(bytemuck::cast_slice(piece));
                    }
                    None => target.fill(0),
                }
            }
        }
    }
    assert_eq!(out.len() as u64, 4 * (end - start), "the buffer holds the range");
    model.visit(&mut Filler {
        record,
        section_len,
        range: (start, end),
        offset: 0,
        out,
    });
}

/// Elements `[start, end)` of the flattened state.
pub fn read_range<B: AutodiffBackend>(
    model: &CocaModel<B>,
    record: &OptimizerRecord<B>,
    section_len: u64,
    start: u64,
    end: u64,
) -> Vec<f32> {
    let mut bytes = vec![0u8; 4 * (end - start) as usize];
    fill_range(model, record, section_len, (start, end), &mut bytes);
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect()
}

/// The model with the parameters of a full flattened state, and AdamW's
/// state for it, keyed by this model's ParamIds.
pub fn apply<B: AutodiffBackend>(
    model: CocaModel<B>,
    entries: &[TensorEntry],
    section_len: u64,
    values: &[f32],
    optimizer_steps: u64,
) -> (CocaModel<B>, OptimizerRecord<B>)
where
    CocaModel<B>: AutodiffModule<B>,
{
    struct Loader<'a, B: AutodiffBackend> {
        entries: std::slice::Iter<'a, TensorEntry>,
        section_len: usize,
        values: &'a [f32],
        steps: usize,
        record: OptimizerRecord<B>,
    }
    impl<B: AutodiffBackend> ModuleMapper<B> for Loader<'_, B> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let entry = self
                .entries
                .next()
                .expect("the index matches the model (checked before)");
            let (offset, len) = (entry.offset as usize, entry.len() as usize);
            let device = tensor.device();
            let section = |s: usize| {
                let at = s * self.section_len + offset;
                TensorData::new(self.values[at..at + len].to_vec(), entry.shape.clone())
            };
            let mut value = Tensor::<B, D>::from_data(section(0), &device);
            if tensor.is_require_grad() {
                value = value.require_grad();
            }
            if entry.optimizer_state {
                let moment = |s| Tensor::<B::InnerBackend, D>::from_data(section(s), &device);
                let momentum = AdaptiveMomentumState::new(self.steps, moment(1), moment(2));
                self.record
                    .insert(id, AdaptorRecord::from_state(AdamWState::new(momentum)));
            }
            Param::from_mapped_value(id, value, mapper)
        }
    }
    let mut loader = Loader {
        entries: entries.iter(),
        section_len: section_len as usize,
        values,
        steps: optimizer_steps as usize,
        record: HashMap::new(),
    };
    let model = model.map(&mut loader);
    (model, loader.record)
}
