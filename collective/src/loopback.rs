//! Ranks as threads of one process, joined into a TCP ring on loopback:
//! what tests and single-machine benchmarks use to run a world in-process.

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use crate::tcp::{RingListener, TcpRing};
use crate::CollectiveError;

/// Binds `world` listeners on loopback and joins them into rings, in rank order.
pub fn rings(world: usize, timeout: Duration) -> Result<Vec<TcpRing>, CollectiveError> {
    let loopback: SocketAddr = (std::net::Ipv4Addr::LOCALHOST, 0).into();
    let listeners = (0..world)
        .map(|_| RingListener::bind(loopback))
        .collect::<Result<Vec<_>, _>>()?;
    let peers: Vec<SocketAddr> = listeners.iter().map(RingListener::local_addr).collect();
    thread::scope(|scope| {
        let joining: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let peers = &peers;
                scope.spawn(move || listener.connect(rank, peers, timeout))
            })
            .collect();
        joining
            .into_iter()
            .map(|handle| handle.join().expect("a joining rank panicked"))
            .collect()
    })
}

/// Runs `work` on every rank in its own thread; results in rank order.
pub fn on_every_rank<T: Send>(rings: Vec<TcpRing>, work: impl Fn(&mut TcpRing) -> T + Sync) -> Vec<T> {
    thread::scope(|scope| {
        let running: Vec<_> = rings
            .into_iter()
            .map(|mut ring| {
                let work = &work;
                scope.spawn(move || work(&mut ring))
            })
            .collect();
        running
            .into_iter()
            .map(|handle| handle.join().expect("a rank panicked"))
            .collect()
    })
}

/// `count` loopback addresses with ports free a moment ago, for ranks that
/// are separate processes: each binds its own, all connect to the others.
pub fn free_addresses(count: usize) -> Result<Vec<SocketAddr>, CollectiveError> {
    let loopback: SocketAddr = (std::net::Ipv4Addr::LOCALHOST, 0).into();
    // Held together until all are chosen, so no port is picked twice.
    let listeners = (0..count)
        .map(|_| RingListener::bind(loopback))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(listeners.iter().map(RingListener::local_addr).collect())
}
