//! AdamW with its state sharded between the ranks (ZeRO stage 2,
//! `train.shard_optimizer`): the gradient is reduce-scattered, each rank
//! keeps and updates the moments of its segment of the flattened
//! parameters, and the updated segments are all-gathered. Each rank holds
//! 1/N of AdamW's moments instead of all of them.
//!
//! burn's own AdamW does the arithmetic, on 1-D pieces of the parameters,
//! so an element's update is the one the unsharded optimizer computes from
//! the same reduced gradient.

use std::ops::Range;

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::{AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, GradientsParams, SimpleOptimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use collective::{segment, Collective, CollectiveError};

use crate::parameters::parameter_layout;
use crate::state::GatheredMoments;
use crate::CocaModel;

/// AdamW's state for this rank's segment of the parameters.
#[derive(Clone)]
pub struct ShardedAdamW<B: Backend> {
    adamw: AdamW,
    /// Per tensor, in visiting order: whether AdamW holds its moments.
    has_state: Vec<bool>,
    steps: u64,
    /// Where this rank stands, from its first step or save on.
    place: Option<Place<B>>,
    /// Moments read from a checkpoint for the segment, until `place` is known.
    loaded: Option<GatheredMoments>,
}

#[derive(Clone)]
struct Place<B: Backend> {
    rank: usize,
    world: usize,
    /// Every tensor's elements, in visiting order: its range of a section.
    tensors: Vec<Range<usize>>,
    /// This rank's segment of a section.
    segment: Range<usize>,
    pieces: Vec<Piece<B>>,
}

/// The part of one tensor in this rank's segment.
#[derive(Clone)]
struct Piece<B: Backend> {
    tensor: usize,
    /// Its elements within the tensor.
    within: Range<usize>,
    /// Its elements within a section.
    at: Range<usize>,
    state: Option<AdamWState<B, 1>>,
}

/// This rank's segment of a section of `model`'s flattened state.
pub fn segment_of<B: AutodiffBackend>(model: &CocaModel<B>, rank: usize, world: usize) -> Range<u64> {
    let len: usize = tensor_ranges(model).last().map_or(0, |range| range.end);
    let range = segment(len, rank, world);
    range.start as u64..range.end as u64
}

impl<B: Backend> ShardedAdamW<B> {
    pub fn new(config: &AdamWConfig) -> Self {
        Self {
            adamw: config.build(),
            has_state: Vec::new(),
            steps: 0,
            place: None,
            loaded: None,
        }
    }

    /// Continues from moments a checkpoint holds for this rank's segment
    /// (`state::load_gathered` of [`segment_of`]).
    pub fn with_loaded(mut self, moments: GatheredMoments) -> Self {
        self.has_state = moments.has_state.clone();
        self.steps = moments.steps;
        self.loaded = Some(moments);
        self.place = None;
        self
    }

    /// Finds this rank's segment and pieces (once), with the moments loaded for it.
    fn place<AB: AutodiffBackend<InnerBackend = B>>(
        &mut self,
        model: &CocaModel<AB>,
        collective: &dyn Collective,
    ) -> Result<(), CollectiveError> {
        let (rank, world) = (collective.rank(), collective.world_size());
        if let Some(place) = &self.place {
            if (place.rank, place.world) != (rank, world) {
                return Err(CollectiveError::Setup(format!(
                    "the sharded optimizer holds rank {} of {}'s segment, not rank {rank} of {world}'s",
                    place.rank, place.world
                )));
            }
        }
        if self.place.is_none() {
            let tensors = tensor_ranges(model);
            let len = tensors.last().map_or(0, |range| range.end);
            let segment = segment(len, rank, world);
            if self.has_state.len() != tensors.len() {
                self.has_state = vec![false; tensors.len()];
            }
            let device = model.logit_scale.val().inner().device();
            let loaded = self.loaded.take();
            if let Some(loaded) = &loaded {
                let range = loaded.range.start as usize..loaded.range.end as usize;
                if range != segment {
                    return Err(CollectiveError::Setup(format!(
                        "the moments loaded cover elements {range:?}, rank {rank} of {world} keeps {segment:?}"
                    )));
                }
            }
            let pieces = tensors
                .iter()
                .enumerate()
                .filter_map(|(tensor, range)| {
                    let at = range.start.max(segment.start)..range.end.min(segment.end);
                    (at.start < at.end).then(|| Piece {
                        tensor,
                        within: at.start - range.start..at.end - range.start,
                        state: match &loaded {
                            Some(loaded) if self.has_state[tensor] => {
                                let moment = |values: &[f32]| {
                                    let local = &values[at.start - segment.start..at.end - segment.start];
                                    Tensor::<B, 1>::from_data(TensorData::new(local.to_vec(), [local.len()]), &device)
                                };
                                let momentum = AdaptiveMomentumState::new(
                                    loaded.steps as usize,
                                    moment(&loaded.first),
                                    moment(&loaded.second),
                                );
                                Some(AdamWState::new(momentum))
                            }
                            _ => None,
                        },
                        at,
                    })
                })
                .collect();
            self.place = Some(Place {
                rank,
                world,
                tensors,
                segment,
                pieces,
            });
        }
        Ok(())
    }

    /// Averages `gradients` (this rank's) over the ranks, clips their
    /// global norm to `clip_norm`, and steps AdamW on this rank's segment,
    /// each tensor at `scales` (in visiting order) of `learning_rate`;
    /// returns `model` with every rank's updated parameters, and the norm of
    /// the reduced gradient before clipping. Every rank of `collective`
    /// calls it, with the same parameters.
    pub fn step<AB: AutodiffBackend<InnerBackend = B>>(
        &mut self,
        model: CocaModel<AB>,
        gradients: GradientsParams,
        learning_rate: f64,
        scales: &[f64],
        clip_norm: Option<f32>,
        collective: &mut dyn Collective,
    ) -> Result<(CocaModel<AB>, f32), CollectiveError>
    where
        CocaModel<AB>: AutodiffModule<AB>,
    {
        let world = collective.world_size();
        let (mut values, has_gradient) = flatten_gradients(&model, gradients);
        collective.reduce_scatter_sum(&mut values)?;
        self.place(&model, &*collective)?;
        let Self {
            adamw,
            has_state,
            steps,
            place,
            ..
        } = self;
        let place = place.as_mut().expect("placed above");
        let segment = place.segment.clone();
        let mine = &mut values[segment.clone()];
        if world > 1 {
            // As `Collective::all_reduce_mean` scales: the same values.
            let scale = 1.0 / world as f32;
            mine.iter_mut().for_each(|value| *value *= scale);
        }
        let mut squares = [mine.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() as f32];
        collective.all_reduce_sum(&mut squares)?;
        let norm = squares[0].sqrt();
        if let Some(max_norm) = clip_norm.filter(|&max_norm| norm > max_norm) {
            let factor = max_norm / (norm + 1e-6);
            mine.iter_mut().for_each(|value| *value *= factor);
        }

        // The segment's gradient becomes its updated parameters.
        let parameters = segment_parameters(&model, place);
        for (piece, parameter) in place.pieces.iter_mut().zip(parameters) {
            let local = piece.at.start - segment.start..piece.at.end - segment.start;
            let updated = if has_gradient[piece.tensor] {
                let gradient = Tensor::<B, 1>::from_data(
                    TensorData::new(mine[local.clone()].to_vec(), [local.len()]),
                    &parameter.device(),
                );
                let rate = learning_rate * scales[piece.tensor];
                let (updated, state) = SimpleOptimizer::<B>::step(adamw, rate, parameter, gradient, piece.state.take());
                piece.state = state;
                updated
            } else {
                parameter
            };
            let data = updated.into_data().convert::<f32>();
            mine[local].copy_from_slice(data.as_slice::<f32>().expect("f32 data after convert"));
        }
        for (has_state, &has_gradient) in has_state.iter_mut().zip(&has_gradient) {
            *has_state |= has_gradient;
        }
        if has_gradient.iter().any(|&has| has) {
            *steps += 1;
        }
        collective.all_gather_segments(&mut values)?;
        let model = model.map(&mut Assign::<AB> {
            values: &values,
            tensors: &place.tensors,
            has_gradient: &has_gradient,
            index: 0,
            _backend: Default::default(),
        });
        Ok((model, norm))
    }

    /// Both moments over `range` of a section, from the ranks that hold
    /// them: what this rank's checkpoint shard needs. Every rank calls it
    /// (each with its own range); each rank's segment is broadcast in turn,
    /// so no rank holds more than its segment and the range at once.
    pub fn gather<AB: AutodiffBackend<InnerBackend = B>>(
        &mut self,
        model: &CocaModel<AB>,
        range: Range<u64>,
        collective: &mut dyn Collective,
    ) -> Result<GatheredMoments, CollectiveError> {
        self.place(model, &*collective)?;
        let place = self.place.as_ref().expect("placed above");
        let (rank, world, len) = (place.rank, place.world, place.tensors.last().map_or(0, |r| r.end));
        let own = place.segment.clone();
        let mut mine = vec![0.0; 2 * own.len()];
        for piece in &place.pieces {
            if let Some(state) = &piece.state {
                let local = piece.at.start - own.start..piece.at.end - own.start;
                for (half, moment) in [&state.momentum.moment_1, &state.momentum.moment_2]
                    .into_iter()
                    .enumerate()
                {
                    let data = moment.clone().into_data().convert::<f32>();
                    let values = data.as_slice::<f32>().expect("f32 data after convert");
                    let at = half * own.len();
                    mine[at + local.start..at + local.end].copy_from_slice(values);
                }
            }
        }
        let wanted = range.start as usize..range.end as usize;
        let (mut first, mut second) = (vec![0.0; wanted.len()], vec![0.0; wanted.len()]);
        for root in 0..world {
            let theirs = segment(len, root, world);
            let mut buffer = if root == rank {
                std::mem::take(&mut mine)
            } else {
                vec![0.0; 2 * theirs.len()]
            };
            collective.broadcast(&mut buffer, root)?;
            let overlap = theirs.start.max(wanted.start)..theirs.end.min(wanted.end);
            if overlap.start < overlap.end {
                let from = overlap.start - theirs.start..overlap.end - theirs.start;
                let to = overlap.start - wanted.start..overlap.end - wanted.start;
                first[to.clone()].copy_from_slice(&buffer[from.clone()]);
                second[to].copy_from_slice(&buffer[theirs.len() + from.start..theirs.len() + from.end]);
            }
        }
        Ok(GatheredMoments {
            range,
            first,
            second,
            has_state: self.has_state.clone(),
            steps: self.steps,
        })
    }
}

/// Each tensor's range of a section, in visiting order.
fn tensor_ranges<B: AutodiffBackend>(model: &CocaModel<B>) -> Vec<Range<usize>> {
    let mut start = 0;
    parameter_layout(model)
        .into_iter()
        .map(|(_, len)| {
            start += len;
            start - len..start
        })
        .collect()
}

/// Every tensor's gradient in one section-long buffer (zeros where a
/// tensor has none), and which tensors have one.
fn flatten_gradients<B: AutodiffBackend>(model: &CocaModel<B>, gradients: GradientsParams) -> (Vec<f32>, Vec<bool>) {
    struct Flatten {
        gradients: GradientsParams,
        values: Vec<f32>,
        has_gradient: Vec<bool>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            match self.gradients.remove::<B::InnerBackend, D>(param.id) {
                Some(gradient) => {
                    let data = gradient.into_data().convert::<f32>();
                    self.values
                        .extend_from_slice(data.as_slice().expect("f32 data after convert"));
                    self.has_gradient.push(true);
                }
                None => {
                    let len = param.val().shape().num_elements();
                    self.values.resize(self.values.len() + len, 0.0);
                    self.has_gradient.push(false);
                }
            }
        }
    }
    let mut flatten = Flatten {
        gradients,
        values: Vec::new(),
        has_gradient: Vec::new(),
    };
    model.visit(&mut flatten);
    (flatten.values, flatten.has_gradient)
}

/// The current values of each piece of the segment, as 1-D tensors.
fn segment_parameters<AB: AutodiffBackend>(
    model: &CocaModel<AB>,
    place: &Place<AB::InnerBackend>,
) -> Vec<Tensor<AB::InnerBackend, 1>> {
    struct Pieces<'a, B: AutodiffBackend> {
        wanted: &'a [Piece<B::InnerBackend>],
        index: usize,
        found: Vec<Tensor<B::InnerBackend, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Pieces<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let index = self.index;
            self.index += 1;
            if let Some(piece) = self.wanted.iter().find(|piece| piece.tensor == index) {
                let tensor = param.val().inner();
                let len = tensor.shape().num_elements();
                self.found
                    .push(tensor.reshape([len]).narrow(0, piece.within.start, piece.within.len()));
            }
        }
    }
    let mut pieces = Pieces::<AB> {
        wanted: &place.pieces,
        index: 0,
        found: Vec::new(),
    };
    model.visit(&mut pieces);
    pieces.found
}

/// Every tensor that had a gradient, set from the gathered parameters.
struct Assign<'a, B: AutodiffBackend> {
    values: &'a [f32],
    tensors: &'a [Range<usize>],
    has_gradient: &'a [bool],
    index: usize,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Assign<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let index = self.index;
        self.index += 1;
        if !self.has_gradient[index] {
            return param;
        }
        let (id, tensor, mapper) = param.consume();
        let values = self.values[self.tensors[index].clone()].to_vec();
        let data = TensorData::new(values, tensor.dims());
        let mut updated = Tensor::<B, D>::from_data(data, &tensor.device());
        if tensor.is_require_grad() {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}
