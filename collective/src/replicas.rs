//! Model replicas as threads of one worker, each a rank of the job: replica
//! i of a worker of outer rank r is rank `r * replicas + i` of a world
//! `replicas` times the outer one. The replicas' operations are combined
//! in replica order by whoever holds the outer collective (the worker's
//! thread, which does no compute meanwhile), so the outer collective never
//! leaves its thread and every result is deterministic.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use crate::{Collective, CollectiveError};

enum Operation {
    AllReduceSum,
    AllGather,
    Broadcast { root: usize },
}

/// The combined result, shared by every replica (each copies it once,
/// into its own buffer).
type Answer = Result<Arc<Vec<f32>>, String>;

/// One replica's call: what, its data, where the answer goes.
type Call = (Operation, Vec<f32>, Sender<Answer>);

enum Message {
    Operation {
        replica: usize,
        operation: Operation,
        data: Vec<f32>,
        reply: Sender<Answer>,
    },
    /// A replica is finished (dropped, also when its thread panicked).
    Done,
}

/// One replica's view: a rank of the combined world.
pub struct Replica {
    index: usize,
    replicas: usize,
    outer_rank: usize,
    outer_world: usize,
    messages: Sender<Message>,
}

/// Combines the replicas' operations with the outer collective.
pub struct Combiner {
    replicas: usize,
    outer_rank: usize,
    messages: Receiver<Message>,
}

/// `replicas` ranks for threads of this process, joined to `outer` (whose
/// rank and world size they take now) through the returned [`Combiner`].
pub fn replica_group(outer: &dyn Collective, replicas: usize) -> (Vec<Replica>, Combiner) {
    assert!(replicas >= 1, "at least one replica");
    let (messages, received) = channel();
    let members = (0..replicas)
        .map(|index| Replica {
            index,
            replicas,
            outer_rank: outer.rank(),
            outer_world: outer.world_size(),
            messages: messages.clone(),
        })
        .collect();
    (
        members,
        Combiner {
            replicas,
            outer_rank: outer.rank(),
            messages: received,
        },
    )
}

impl Combiner {
    /// Serves the replicas until every one of them is dropped. Returns the
    /// outer collective's first error (the replicas got it as their own).
    pub fn serve(self, outer: &mut dyn Collective) -> Result<(), CollectiveError> {
        let mut pending: Vec<Option<Call>> = (0..self.replicas).map(|_| None).collect();
        let mut done = 0;
        let mut failure = None;
        while done < self.replicas {
            match self.messages.recv() {
                Err(_) => break,
                Ok(Message::Done) => {
                    done += 1;
                    // One that ended (panicked) mid-step leaves the others
                    // waiting on an operation that cannot complete.
                    for (_, _, reply) in pending.iter_mut().filter_map(Option::take) {
                        let _ = reply.send(Err("another replica of this worker ended mid-step".into()));
                    }
                }
                Ok(Message::Operation { reply, .. }) if done > 0 => {
                    let _ = reply.send(Err("another replica of this worker ended mid-step".into()));
                }
                Ok(Message::Operation {
                    replica,
                    operation,
                    data,
                    reply,
                }) => {
                    pending[replica] = Some((operation, data, reply));
                    if pending.iter().all(Option::is_some) {
                        let calls: Vec<Call> = pending
                            .iter_mut()
                            .map(|p| p.take().expect("every replica called"))
                            .collect();
                        let replies: Vec<Sender<Answer>> = calls.iter().map(|(_, _, reply)| reply.clone()).collect();
                        let answer = match self.combine(calls, outer) {
                            Ok(values) => Ok(Arc::new(values)),
                            Err(error) => {
                                let message = error.to_string();
                                failure.get_or_insert(error);
                                Err(message)
                            }
                        };
                        for reply in replies {
                            // A replica that is gone no longer needs the answer.
                            let _ = reply.send(answer.clone());
                        }
                    }
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }

    fn combine(&self, mut calls: Vec<Call>, outer: &mut dyn Collective) -> Result<Vec<f32>, CollectiveError> {
        let kind = |operation: &Operation| match operation {
            Operation::AllReduceSum => "all-reduce",
            Operation::AllGather => "all-gather",
            Operation::Broadcast { .. } => "broadcast",
        };
        if let Some((other, _, _)) = calls.iter().find(|(op, _, _)| kind(op) != kind(&calls[0].0)) {
            return Err(CollectiveError::Setup(format!(
                "replicas disagree: {} and {} at once",
                kind(&calls[0].0),
                kind(other)
            )));
        }
        match calls[0].0 {
            Operation::AllReduceSum => {
                // In replica order, so the sum does not depend on timing.
                let mut sum = std::mem::take(&mut calls[0].1);
                for (_, data, _) in &calls[1..] {
                    sum.iter_mut().zip(data).for_each(|(total, value)| *total += value);
                }
                outer.all_reduce_sum(&mut sum)?;
                Ok(sum)
            }
            Operation::AllGather => {
                let local: Vec<f32> = calls.iter().flat_map(|(_, data, _)| data.iter().copied()).collect();
                outer.all_gather(&local)
            }
            Operation::Broadcast { root } => {
                let (outer_root, replica) = (root / self.replicas, root % self.replicas);
                let source = if outer_root == self.outer_rank { replica } else { 0 };
                let mut data = std::mem::take(&mut calls[source].1);
                outer.broadcast(&mut data, outer_root)?;
                Ok(data)
            }
        }
    }
}

impl Replica {
    fn call(&self, operation: Operation, data: Vec<f32>) -> Result<Arc<Vec<f32>>, CollectiveError> {
        let (reply, answer) = channel();
        let gone = || CollectiveError::Setup("the worker's combining thread is gone".into());
        self.messages
            .send(Message::Operation {
                replica: self.index,
                operation,
                data,
                reply,
            })
            .map_err(|_| gone())?;
        answer
            .recv()
            .map_err(|_| gone())?
            .map_err(|message| CollectiveError::Setup(format!("the worker's collective failed: {message}")))
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.messages.send(Message::Done);
    }
}

impl Collective for Replica {
    fn rank(&self) -> usize {
        self.outer_rank * self.replicas + self.index
    }

    fn world_size(&self) -> usize {
        self.outer_world * self.replicas
    }

    fn all_reduce_sum(&mut self, buffer: &mut [f32]) -> Result<(), CollectiveError> {
        let sum = self.call(Operation::AllReduceSum, buffer.to_vec())?;
        buffer.copy_from_slice(&sum);
        Ok(())
    }

    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        Ok(self.call(Operation::AllGather, local.to_vec())?.to_vec())
    }

    fn broadcast(&mut self, buffer: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        let data = self.call(Operation::Broadcast { root }, buffer.to_vec())?;
        buffer.copy_from_slice(&data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loopback;
    use std::time::Duration;

    /// Two workers on a loopback ring, three replicas each: the six ranks
    /// see what six ranks of one ring would.
    #[test]
    fn replicas_are_ranks_of_the_combined_world() {
        let rings = loopback::rings(2, Duration::from_secs(10)).unwrap();
        let results = loopback::on_every_rank(rings, |ring| {
            let (replicas, combiner) = replica_group(ring, 3);
            std::thread::scope(|scope| {
                let handles: Vec<_> = replicas
                    .into_iter()
                    .map(|mut replica| {
                        scope.spawn(move || {
                            let rank = replica.rank() as f32;
                            let mut sum = [rank, 1.0];
                            replica.all_reduce_sum(&mut sum).unwrap();
                            let gathered = replica.all_gather(&[rank, rank * 10.0]).unwrap();
                            let mut broadcast = [rank];
                            replica.broadcast(&mut broadcast, 4).unwrap();
                            (replica.rank(), replica.world_size(), sum, gathered, broadcast[0])
                        })
                    })
                    .collect();
                combiner.serve(ring).unwrap();
                handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
            })
        });
        let all: Vec<_> = results.into_iter().flatten().collect();
        let ranks: Vec<usize> = all.iter().map(|r| r.0).collect();
        assert_eq!(ranks, vec![0, 1, 2, 3, 4, 5]);
        for (_, world, sum, gathered, broadcast) in all {
            assert_eq!(world, 6);
            assert_eq!(sum, [15.0, 6.0]);
            let expected: Vec<f32> = (0..6).flat_map(|r| [r as f32, r as f32 * 10.0]).collect();
            assert_eq!(gathered, expected);
            assert_eq!(broadcast, 4.0);
        }
    }

    /// A replica that ends mid-step (its thread panicked) fails the others'
    /// pending operation instead of leaving them waiting.
    #[test]
    fn a_replica_that_ends_mid_step_fails_the_others() {
        let mut outer = crate::Solo;
        let (mut replicas, combiner) = replica_group(&outer, 2);
        let gone = replicas.pop().unwrap();
        let mut waiting = replicas.pop().unwrap();
        std::thread::scope(|scope| {
            let handle = scope.spawn(move || waiting.all_reduce_sum(&mut [1.0]).unwrap_err().to_string());
            // Before or after the other's call: either way it fails.
            drop(gone);
            combiner.serve(&mut outer).unwrap();
            assert!(handle.join().unwrap().contains("ended mid-step"));
        });
    }

    /// The outer collective's failure reaches every replica and the combiner.
    #[test]
    fn an_outer_failure_fails_every_replica() {
        struct Broken;
        impl Collective for Broken {
            fn rank(&self) -> usize {
                0
            }
            fn world_size(&self) -> usize {
                2
            }
            fn all_reduce_sum(&mut self, _: &mut [f32]) -> Result<(), CollectiveError> {
                Err(CollectiveError::Setup("peer gone".into()))
            }
            fn all_gather(&mut self, _: &[f32]) -> Result<Vec<f32>, CollectiveError> {
                Err(CollectiveError::Setup("peer gone".into()))
            }
            fn broadcast(&mut self, _: &mut [f32], _: usize) -> Result<(), CollectiveError> {
                Err(CollectiveError::Setup("peer gone".into()))
            }
        }
        let mut outer = Broken;
        let (replicas, combiner) = replica_group(&outer, 2);
        std::thread::scope(|scope| {
            let handles: Vec<_> = replicas
                .into_iter()
                .map(|mut replica| scope.spawn(move || replica.all_reduce_sum(&mut [1.0]).unwrap_err().to_string()))
                .collect();
            let error = combiner.serve(&mut outer).unwrap_err();
            assert_eq!(error.to_string(), "invalid collective setup: peer gone");
            for handle in handles {
                assert!(handle.join().unwrap().contains("the worker's collective failed"));
            }
        });
    }
}
