//! Helpers shared by the worker's integration tests: ranks as threads
//! joined into a TCP ring on loopback.

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use worker::collective::tcp::{RingListener, TcpRing};

/// Binds `world` listeners on loopback and joins them into rings.
pub fn rings(world: usize, timeout: Duration) -> Vec<TcpRing> {
    let listeners: Vec<RingListener> = (0..world)
        .map(|_| RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap())
        .collect();
    let peers: Vec<SocketAddr> = listeners.iter().map(RingListener::local_addr).collect();
    thread::scope(|scope| {
        let joining: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let peers = &peers;
                scope.spawn(move || listener.connect(rank, peers, timeout).unwrap())
            })
            .collect();
        joining.into_iter().map(|handle| handle.join().unwrap()).collect()
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
        running.into_iter().map(|handle| handle.join().unwrap()).collect()
    })
}
