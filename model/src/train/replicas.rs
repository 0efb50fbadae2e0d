//! Data parallelism inside one CPU worker: its micro-batch split between
//! model replicas, a thread and a core each, stepping as ranks of the job
//! (`collective::replicas`). On the bench preset a replica per core is
//! about 1.6 times as fast as every core working on each op of one replica:
//! most ops are too small to split well (README, Benchmarks).

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use collective::replicas::replica_group;
use collective::{Collective, CollectiveError};

use crate::state::Moments;
use crate::train::step::{StepReport, TrainStep};
use crate::{CocaBatch, CocaModel};

/// A [`TrainStep`] run by `replicas` model replicas of one worker. The
/// first replica's model is the caller's (it moves to its thread for the
/// step and back); the others live here. All stay identical.
pub struct ReplicatedStep<B: AutodiffBackend> {
    lead: TrainStep<B>,
    others: Vec<Option<(CocaModel<B>, TrainStep<B>)>>,
    pools: Vec<rayon::ThreadPool>,
}

impl<B: AutodiffBackend> ReplicatedStep<B>
where
    CocaModel<B>: AutodiffModule<B, InnerModule = CocaModel<B::InnerBackend>>,
{
    /// `replicas` copies of `model` and `trainer` (1: the trainer alone,
    /// on the caller's thread and thread pool).
    pub fn new(trainer: TrainStep<B>, model: &CocaModel<B>, replicas: usize) -> Self {
        assert!(replicas >= 1, "at least one replica");
        assert!(
            replicas == 1 || !trainer.is_sharded(),
            "a sharded optimizer runs without replicas (the manifest refuses both)"
        );
        let pools = if replicas > 1 {
            (0..replicas)
                .map(|_| {
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(1)
                        .build()
                        .expect("a one-thread pool")
                })
                .collect()
        } else {
            Vec::new()
        };
        // Each replica's parameters are leaves of its own autodiff graph: a
        // clone's would be the same graph nodes, which concurrent backward
        // passes consume from under each other.
        let replica = || CocaModel::from_inner(model.valid());
        Self {
            others: (1..replicas).map(|_| Some((replica(), trainer.clone()))).collect(),
            lead: trainer,
            pools,
        }
    }

    pub fn replicas(&self) -> usize {
        1 + self.others.len()
    }

    /// The moving average's decay and values (every replica's are the same).
    pub fn ema(&self) -> Option<(f64, &[f32])> {
        self.lead.ema()
    }

    /// AdamW's moments as this worker's checkpoint shard needs them (every
    /// replica's are the same); see [`TrainStep::moments`].
    pub fn moments(
        &mut self,
        model: &CocaModel<B>,
        collective: &mut dyn Collective,
    ) -> Result<Moments<B>, CollectiveError> {
        self.lead.moments(model, collective)
    }

    /// One step of the worker's micro-batch, split between the replicas in
    /// order; `collective` is the job's, between workers.
    pub fn step(
        &mut self,
        model: CocaModel<B>,
        batch: &CocaBatch<B>,
        learning_rate: f64,
        collective: &mut dyn Collective,
    ) -> Result<(CocaModel<B>, StepReport), CollectiveError> {
        let replicas = self.replicas();
        if replicas == 1 {
            return self.lead.step(model, batch, learning_rate, collective);
        }
        let [rows, ..] = batch.images.dims();
        assert_eq!(rows % replicas, 0, "the micro-batch splits evenly between the replicas");
        let rows = rows / replicas;
        let (members, combiner) = replica_group(collective, replicas);
        let mut members = members.into_iter();
        let (lead, others, pools) = (&mut self.lead, &mut self.others, &self.pools);
        std::thread::scope(|scope| {
            let mut lead_member = members.next().expect("the first replica");
            let lead_batch = batch.rows(0, rows);
            let pool = &pools[0];
            let leading =
                scope.spawn(move || pool.install(|| lead.step(model, &lead_batch, learning_rate, &mut lead_member)));
            let following: Vec<_> = others
                .iter_mut()
                .zip(members)
                .zip(&pools[1..])
                .enumerate()
                .map(|(i, ((slot, mut member), pool))| {
                    let (model, mut trainer) = slot.take().expect("a replica between steps");
                    let part = batch.rows((i + 1) * rows, rows);
                    scope.spawn(move || {
                        let result = pool.install(|| trainer.step(model, &part, learning_rate, &mut member));
                        (result, trainer, slot)
                    })
                })
                .collect();
            let combined = combiner.serve(collective);
            let mut failure = combined.err();
            for handle in following {
                let (result, trainer, slot) = handle.join().expect("a replica panicked");
                match result {
                    Ok((model, _)) => *slot = Some((model, trainer)),
                    Err(error) => {
                        failure.get_or_insert(error);
                    }
                }
            }
            let lead = leading.join().expect("the first replica panicked");
            match failure {
                // The job's own error (a peer lost) rather than its echo in a replica.
                Some(error) => Err(error),
                None => lead,
            }
        })
    }
}
