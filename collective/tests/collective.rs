//! TCP ring collectives between threads on loopback, against direct
//! computation.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use collective::tcp::RingListener;
use collective::{Collective, CollectiveError};

use collective::loopback::{on_every_rank, rings};

const TIMEOUT: Duration = Duration::from_secs(20);

/// Small integers, so sums are exact in f32 whatever the order.
fn contribution(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| ((rank * 7 + i * 3) % 29) as f32).collect()
}

#[test]
fn all_reduce_sums_for_every_world_and_size() {
    for world in [1, 2, 3, 5] {
        let mut sizes = vec![1, 2, 3, 7, 1000, 65_537];
        if world > 1 {
            sizes.push((16 << 20) / 4 + 3); // 16 MiB and a bit, not divisible by the world
        }
        for len in sizes {
            let results = on_every_rank(rings(world, TIMEOUT).expect("a loopback ring"), |ring| {
                let mut buffer = contribution(ring.rank(), len);
                ring.all_reduce_sum(&mut buffer).unwrap();
                buffer
            });
            let mut expected = vec![0.0f32; len];
            for rank in 0..world {
                let values = contribution(rank, len);
                expected.iter_mut().zip(values).for_each(|(sum, value)| *sum += value);
            }
            for (rank, result) in results.iter().enumerate() {
                assert!(result == &expected, "world {world}, len {len}: rank {rank} differs");
            }
        }
    }
}

#[test]
fn all_reduce_mean_is_bit_identical_on_every_rank() {
    let len = 10_001;
    let results = on_every_rank(rings(3, TIMEOUT).expect("a loopback ring"), |ring| {
        // Values whose sums round differently in different orders.
        let mut buffer: Vec<f32> = (0..len).map(|i| 0.1 + (ring.rank() * len + i) as f32 * 1e-3).collect();
        ring.all_reduce_mean(&mut buffer).unwrap();
        buffer
    });
    for result in &results[1..] {
        assert!(result.iter().zip(&results[0]).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
    let expected = (0.1 + 0.1 + 0.1 + (0 + len + 2 * len) as f32 * 1e-3) / 3.0;
    assert!((results[0][0] - expected).abs() < 1e-5);
}

#[test]
fn all_gather_concatenates_in_rank_order() {
    for world in [1, 2, 3, 5] {
        for len in [0, 1, 5, 100_003] {
            let results = on_every_rank(rings(world, TIMEOUT).expect("a loopback ring"), |ring| {
                ring.all_gather(&contribution(ring.rank(), len)).unwrap()
            });
            let expected: Vec<f32> = (0..world).flat_map(|rank| contribution(rank, len)).collect();
            assert!(
                results.iter().all(|result| result == &expected),
                "world {world}, len {len}"
            );
        }
    }
}

#[test]
fn segments_tile_the_buffer_in_rank_order() {
    for (len, world) in [(0, 3), (2, 5), (10, 4), (65_537, 3)] {
        let segments: Vec<_> = (0..world).map(|rank| collective::segment(len, rank, world)).collect();
        assert_eq!(segments[0].start, 0);
        assert_eq!(segments[world - 1].end, len);
        assert!(segments.windows(2).all(|pair| pair[0].end == pair[1].start));
        let lengths: Vec<usize> = segments.iter().map(|s| s.len()).collect();
        assert!(
            lengths.iter().max().unwrap() - lengths.iter().min().unwrap() <= 1,
            "{lengths:?}"
        );
    }
}

/// A reduce-scatter then an all-gather of segments is an all-reduce: each
/// half leaves what it promises, on the ring and by the trait's defaults.
#[test]
fn reduce_scatter_and_segment_all_gather_are_the_halves_of_an_all_reduce() {
    for world in [1, 2, 3, 5] {
        for len in [1, 3, 7, 1000, 300_007] {
            let mut expected = vec![0.0f32; len];
            for rank in 0..world {
                let values = contribution(rank, len);
                expected.iter_mut().zip(values).for_each(|(sum, value)| *sum += value);
            }
            let results = on_every_rank(rings(world, TIMEOUT).expect("a loopback ring"), |ring| {
                let (rank, world) = (ring.rank(), ring.world_size());
                let mut buffer = contribution(rank, len);
                ring.reduce_scatter_sum(&mut buffer).unwrap();
                let mine = collective::segment(len, rank, world);
                let reduced = buffer[mine.clone()].to_vec();
                // Only the own segment travels in the gather.
                for (i, value) in buffer.iter_mut().enumerate() {
                    if !mine.contains(&i) {
                        *value = f32::NAN;
                    }
                }
                ring.all_gather_segments(&mut buffer).unwrap();
                (reduced, buffer)
            });
            for (rank, (reduced, gathered)) in results.iter().enumerate() {
                let mine = collective::segment(len, rank, world);
                assert!(
                    reduced[..] == expected[mine],
                    "world {world}, len {len}: rank {rank}'s segment"
                );
                assert!(
                    gathered == &expected,
                    "world {world}, len {len}: rank {rank} after the gather"
                );
            }
            let mut rehearsal = collective::Rehearsal { world };
            let mut buffer = contribution(0, len);
            rehearsal.all_gather_segments(&mut buffer).unwrap();
            let first = collective::segment(len, 0, world);
            assert!(
                buffer[first.clone()] == contribution(0, len)[first],
                "the default gather keeps rank 0's segment"
            );
        }
    }
}

#[test]
fn broadcast_copies_the_root_everywhere() {
    for world in [1, 2, 3, 5] {
        for root in 0..world {
            let len = 300_007;
            let results = on_every_rank(rings(world, TIMEOUT).expect("a loopback ring"), |ring| {
                let mut buffer = contribution(ring.rank(), len);
                ring.broadcast(&mut buffer, root).unwrap();
                ring.barrier().unwrap();
                buffer
            });
            assert!(
                results.iter().all(|result| result == &contribution(root, len)),
                "world {world}, root {root}"
            );
        }
    }
}

#[test]
fn buffers_of_different_lengths_are_an_error_naming_the_peer() {
    let errors = on_every_rank(rings(2, TIMEOUT).expect("a loopback ring"), |ring| {
        let mut buffer = vec![1.0; 10 + ring.rank()];
        ring.all_reduce_sum(&mut buffer).unwrap_err()
    });
    for (rank, error) in errors.iter().enumerate() {
        match error {
            CollectiveError::Protocol { peer, message, .. } => {
                assert_eq!(*peer, 1 - rank);
                assert!(message.contains("same length"), "{message}");
            }
            other => panic!("rank {rank}: {other}"),
        }
    }
}

#[test]
fn a_rank_that_dies_mid_all_reduce_fails_the_others_instead_of_hanging() {
    let timeout = Duration::from_secs(2);
    let mut all = rings(3, timeout).expect("a loopback ring");
    let dead = all.remove(1);
    let (done, outcome) = mpsc::channel();
    for mut ring in all {
        let done = done.clone();
        thread::spawn(move || {
            let mut buffer = vec![1.0; 1 << 20];
            done.send((ring.rank(), ring.all_reduce_sum(&mut buffer))).unwrap();
        });
    }
    // Rank 1 leaves while the others are in the all-reduce.
    thread::sleep(Duration::from_millis(100));
    drop(dead);
    for _ in 0..2 {
        let (rank, result) = outcome.recv_timeout(timeout * 10).expect("no rank hangs");
        let error = result.expect_err("the all-reduce cannot succeed");
        let message = error.to_string();
        assert!(message.contains("rank "), "rank {rank}: {message}");
        assert!(
            matches!(
                error,
                CollectiveError::PeerLost { .. } | CollectiveError::Timeout { .. }
            ),
            "rank {rank}: {message}"
        );
    }
}

#[test]
fn an_unreachable_peer_is_an_error_naming_it() {
    let listener = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    // A port that nothing listens on: bind one, then close it.
    let closed = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap().local_addr();
    let peers = [listener.local_addr(), closed];
    let error = listener
        .connect(0, &peers, Duration::from_millis(500))
        .err()
        .expect("nobody to connect to");
    let message = error.to_string();
    assert!(message.contains(&format!("rank 1 at {closed}")), "{message}");
}

#[test]
fn an_interrupt_ends_an_operation_blocked_on_a_silent_peer() {
    // Rank 1 never calls: rank 0's all-reduce would wait out the 20 s timeout.
    let mut ranks = rings(2, TIMEOUT).unwrap();
    let silent = ranks.pop().unwrap();
    let mut waiting = ranks.pop().unwrap();
    let interrupt = waiting.interrupt().expect("a ring of two can be interrupted");
    let started = std::time::Instant::now();
    let blocked = thread::spawn(move || waiting.all_reduce_sum(&mut [1.0; 1024]));
    thread::sleep(Duration::from_millis(200));
    interrupt();
    let error = blocked.join().unwrap().unwrap_err();
    assert!(
        started.elapsed() < TIMEOUT / 2,
        "the operation ended by its timeout, not the interrupt"
    );
    assert!(matches!(error, CollectiveError::PeerLost { .. }), "{error}");
    drop(silent);
}
