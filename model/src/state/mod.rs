//! The training state as one flattened vector: parameters, then AdamW's
//! first and second moments, each tensor in module visiting order and
//! named by its module path. burn keys optimizer state by ParamIds that
//! are random per process, so the path, never the id, identifies a tensor.

mod sharded;

pub use sharded::{encode_shard, load, load_gathered, save_shard, write_initial, JobFacts, SavedShard, StateLayout};

use std::ops::Range;

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

/// AdamW's moments, as a checkpoint's moment sections read them.
#[derive(Clone)]
pub enum Moments<B: AutodiffBackend> {
    /// burn's record: every tensor's moments, held by this rank.
    Whole(OptimizerRecord<B>),
    /// Both moment sections over a range of a section, on the host: what
    /// a sharded optimizer gathers for one checkpoint shard.
    Gathered(GatheredMoments),
}

/// AdamW's first and second moments of elements `range` of a section, and
/// what the whole optimizer says of every tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct GatheredMoments {
    pub range: Range<u64>,
    pub first: Vec<f32>,
    pub second: Vec<f32>,
    /// Per tensor, in visiting order: whether AdamW holds moments for it
    /// (a tensor that never had a gradient has none).
    pub has_state: Vec<bool>,
    /// AdamW's step count.
    pub steps: u64,
}

impl GatheredMoments {
    /// Moment `section` (1 or 2) over `[lo, hi)` of a section, which the
    /// gathered range holds.
    fn values(&self, section: usize, (lo, hi): (u64, u64)) -> &[f32] {
        assert!(
            self.range.start <= lo && hi <= self.range.end,
            "the moments gathered for a shard cover it"
        );
        let values = if section == 1 { &self.first } else { &self.second };
        &values[(lo - self.range.start) as usize..(hi - self.range.start) as usize]
    }
}

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
pub fn tensor_index<B: AutodiffBackend>(model: &CocaModel<B>, moments: &Moments<B>) -> (Vec<TensorEntry>, u64) {
    struct Index<'a, B: AutodiffBackend> {
        stack: PathStack,
        moments: &'a Moments<B>,
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
                optimizer_state: match self.moments {
                    Moments::Whole(record) => record.contains_key(&param.id),
                    Moments::Gathered(gathered) => gathered.has_state[self.entries.len()],
                },
            };
            self.offset += entry.len();
            self.entries.push(entry);
        }
    }
    let mut index = Index {
        stack: PathStack::default(),
        moments,
        entries: Vec::new(),
        offset: 0,
    };
    model.visit(&mut index);
    (index.entries, index.offset)
}

/// AdamW's step count: the same for every tensor it has stepped.
pub fn optimizer_steps<B: AutodiffBackend>(model: &CocaModel<B>, moments: &Moments<B>) -> u64 {
    let record = match moments {
        Moments::Whole(record) => record,
        Moments::Gathered(gathered) => return gathered.steps,
    };
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
    moments: &Moments<B>,
    section_len: u64,
    (start, end): (u64, u64),
    out: &mut [u8],
) {
    struct Filler<'a, B: AutodiffBackend> {
        moments: &'a Moments<B>,
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
                let record = match (section, self.moments) {
                    (0, _) => None,
                    (_, Moments::Whole(record)) => Some(record),
                    (_, Moments::Gathered(gathered)) => {
                        let at = section as u64 * self.section_len;
                        let values = gathered.values(section, (lo - at, hi - at));
                        target.copy_from_slice(bytemuck::cast_slice(values));
                        continue;
                    }
                };
                let tensor = match record {
                    None => Some(param.val().inner()),
                    Some(record) => record.get(&param.id).map(|record| {
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
        moments,
        section_len,
        range: (start, end),
        offset: 0,
        out,
    });
}

/// Elements `[start, end)` of the flattened state.
pub fn read_range<B: AutodiffBackend>(
    model: &CocaModel<B>,
    moments: &Moments<B>,
    section_len: u64,
    start: u64,
    end: u64,
) -> Vec<f32> {
    let mut bytes = vec![0u8; 4 * (end - start) as usize];
    fill_range(model, moments, section_len, (start, end), &mut bytes);
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
    load_into(model, entries, section_len, values, Some(optimizer_steps))
}

/// The model with the parameters of a full flattened state, and, given
/// AdamW's step count, AdamW's state for it.
fn load_into<B: AutodiffBackend>(
    model: CocaModel<B>,
    entries: &[TensorEntry],
    section_len: u64,
    values: &[f32],
    optimizer_steps: Option<u64>,
) -> (CocaModel<B>, OptimizerRecord<B>)
where
    CocaModel<B>: AutodiffModule<B>,
{
    struct Loader<'a, B: AutodiffBackend> {
        entries: std::slice::Iter<'a, TensorEntry>,
        section_len: usize,
        values: &'a [f32],
        steps: Option<usize>,
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
            if let (true, Some(steps)) = (entry.optimizer_state, self.steps) {
                let moment = |s| Tensor::<B::InnerBackend, D>::from_data(section(s), &device);
                let momentum = AdaptiveMomentumState::new(steps, moment(1), moment(2));
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
        steps: optimizer_steps.map(|steps| steps as usize),
        record: HashMap::new(),
    };
    let model = model.map(&mut loader);
    (model, loader.record)
}

/// The model with the parameters of a full flattened state, and AdamW's
/// moments of elements `range` of a section, on the host.
pub fn apply_gathered<B: AutodiffBackend>(
    model: CocaModel<B>,
    entries: &[TensorEntry],
    section_len: u64,
    values: &[f32],
    optimizer_steps: u64,
    range: Range<u64>,
) -> (CocaModel<B>, GatheredMoments)
where
    CocaModel<B>: AutodiffModule<B>,
{
    let (model, _) = load_into(model, entries, section_len, values, None);
    let section =
        |s: u64| values[(s * section_len + range.start) as usize..(s * section_len + range.end) as usize].to_vec();
    let gathered = GatheredMoments {
        first: section(1),
        second: section(2),
        range,
        has_state: entries.iter().map(|entry| entry.optimizer_state).collect(),
        steps: optimizer_steps,
    };
    (model, gathered)
}
