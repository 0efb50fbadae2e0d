//! The training state as one flattened vector: parameters, then AdamW's
//! first and second moments, each tensor in module visiting order and
//! named by its module path. burn keys optimizer state by ParamIds that
//! are random per process, so the path, never the id, identifies a tensor.

use hashbrown::HashMap;

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::record::AdaptorRecord;
use burn::optim::{AdamW, AdamWState, AdaptiveMomentumState};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use proto::checkpoint::{TensorEntry, SECTIONS};

use crate::model::CocaModel;

/// AdamW's state as burn keeps it, by ParamId.
pub type OptimizerRecord<B> = HashMap<ParamId, AdaptorRecord<AdamW, B>>;
/// The optimizer a trainer steps with.
pub type Optimizer<B> = OptimizerAdaptor<AdamW, CocaModel<B>, B>;

/// A contiguous run of one tensor's elements in one section.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// `<section>.<module path>`.
    pub name: String,
    /// Where in the flattened state the piece starts.
    pub start: u64,
    pub values: Vec<f32>,
}

/// Module path of the parameter being visited: the stack of module names.
#[derive(Default)]
struct PathStack(Vec<String>);

impl PathStack {
    fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    fn exit(&mut self) {
        self.0.pop();
    }
    fn path(&self) -> String {
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

/// Elements `[start, end)` of the flattened state, as pieces of tensors.
pub fn read_range<B: AutodiffBackend>(
    model: &CocaModel<B>,
    record: &OptimizerRecord<B>,
    section_len: u64,
    start: u64,
    end: u64,
) -> Vec<Piece> {
    struct Reader<'a, B: AutodiffBackend> {
        stack: PathStack,
        record: &'a OptimizerRecord<B>,
        section_len: u64,
        range: (u64, u64),
        offset: u64,
        pieces: Vec<(usize, Piece)>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Reader<'_, B> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let len = param.val().shape().num_elements() as u64;
            let offset = self.offset;
            self.offset += len;
            for (section, name) in SECTIONS.iter().enumerate() {
                let begin = section as u64 * self.section_len + offset;
                let (lo, hi) = (begin.max(self.range.0), (begin + len).min(self.range.1));
                if lo >= hi {
                    continue;
                }
                let values: Vec<f32> = match section {
                    0 => flat(param.val().inner()),
                    _ => match self.record.get(&param.id) {
                        Some(record) => {
                            let momentum = record.clone().into_state::<D>().momentum;
                            flat(if section == 1 {
                                momentum.moment_1
                            } else {
                                momentum.moment_2
                            })
                        }
                        None => vec![0.0; len as usize],
                    },
                };
                let piece = Piece {
                    name: format!("{name}.{}", self.stack.path()),
                    start: lo,
                    values: values[(lo - begin) as usize..(hi - begin) as usize].to_vec(),
                };
                self.pieces.push((section, piece));
            }
        }
    }
    let mut reader = Reader {
        stack: PathStack::default(),
        record,
        section_len,
        range: (start, end),
        offset: 0,
        pieces: Vec::new(),
    };
    model.visit(&mut reader);
    // In flattened order: sections first, then tensors.
    reader.pieces.sort_by_key(|(section, piece)| (*section, piece.start));
    reader.pieces.into_iter().map(|(_, piece)| piece).collect()
}

fn flat<B: burn::tensor::backend::Backend, const D: usize>(tensor: Tensor<B, D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data after convert")
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
