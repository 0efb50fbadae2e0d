//! Ring collectives over TCP, for the CPU backend.
//!
//! Each rank holds two connections: one to the next rank in the ring (it
//! only writes there) and one from the previous rank (it only reads there).
//! All-reduce is a ring reduce-scatter followed by a ring all-gather, so
//! each rank moves 2 (N-1)/N of the buffer whatever the world size; within a
//! step the send and the receive run concurrently and the received segment
//! is reduced chunk by chunk as it streams in.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::thread;
use std::time::{Duration, Instant};

use retry::{retry_blocking, RetryPolicy};

use super::{segment, Collective, CollectiveError};

/// Identifies coca's ring protocol in the connection handshake.
const MAGIC: u32 = 0xC0CA_0001;
/// Received data is reduced in chunks of this many values (1 MiB).
const CHUNK: usize = 1 << 18;

/// The operation a message belongs to; a mismatch means ranks disagree on
/// what they are doing, which is reported rather than silently mixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum Tag {
    ReduceScatter = 1,
    AllGather = 2,
    Gather = 3,
    Broadcast = 4,
}

impl Tag {
    fn operation(self) -> &'static str {
        match self {
            Tag::ReduceScatter | Tag::AllGather => "all-reduce",
            Tag::Gather => "all-gather",
            Tag::Broadcast => "broadcast",
        }
    }
}

/// A rank's place in the ring: what it needs to join it (a world of
/// thousands hands each rank its two neighbours, not every address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbours {
    pub rank: usize,
    pub world: usize,
    /// The listening address of rank `rank - 1` (mod world), which dials us.
    pub prev: SocketAddr,
    /// The listening address of rank `rank + 1` (mod world), which we dial.
    pub next: SocketAddr,
}

/// A bound listening socket: bind every rank first, share the addresses,
/// then `connect`.
pub struct RingListener {
    listener: TcpListener,
    address: SocketAddr,
}

impl RingListener {
    pub fn bind(address: SocketAddr) -> Result<Self, CollectiveError> {
        let listener = TcpListener::bind(address).map_err(|source| CollectiveError::Listen { address, source })?;
        let address = listener
            .local_addr()
            .map_err(|source| CollectiveError::Listen { address, source })?;
        Ok(Self { listener, address })
    }

    /// The address peers should connect to (the bound port, if 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// Joins the ring as `rank` of `peers.len()`, where `peers[i]` is rank
    /// i's listening address. Waits up to `timeout` for the neighbours;
    /// every later operation also fails after `timeout` without progress.
    pub fn connect(self, rank: usize, peers: &[SocketAddr], timeout: Duration) -> Result<TcpRing, CollectiveError> {
        let world = peers.len();
        let neighbours = (rank < world).then(|| Neighbours {
            rank,
            world,
            prev: peers[(rank + world - 1) % world],
            next: peers[(rank + 1) % world],
        });
        match neighbours {
            Some(neighbours) => self.connect_within(neighbours, timeout, timeout),
            None => Err(CollectiveError::Setup(format!(
                "rank {rank} is outside a world of {world}"
            ))),
        }
    }

    /// Joins the ring as `neighbours.rank`, knowing only its two neighbours'
    /// addresses, waiting only `patience` for them: a job that heals gives
    /// up on a neighbour that died before it connected about when the
    /// coordinator declares it lost.
    pub fn connect_within(
        self,
        neighbours: Neighbours,
        patience: Duration,
        timeout: Duration,
    ) -> Result<TcpRing, CollectiveError> {
        let Neighbours {
            rank,
            world,
            prev,
            next,
        } = neighbours;
        if rank >= world {
            return Err(CollectiveError::Setup(format!(
                "rank {rank} is outside a world of {world}"
            )));
        }
        if world == 1 {
            return Ok(TcpRing {
                rank,
                world,
                links: None,
                timeout,
            });
        }
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let deadline = Instant::now() + patience;
        let (next, prev) = thread::scope(|scope| {
            let accepting = scope.spawn(|| accept(&self.listener, prev_rank, prev, world, deadline, timeout));
            let next = dial(rank, next_rank, next, world, deadline, timeout);
            let prev = accepting.join().expect("the accepting thread does not panic");
            (next, prev)
        });
        let links = Links {
            next: next?,
            prev: prev?,
            scratch: Vec::new(),
        };
        for link in [&links.next, &links.prev] {
            link.configure(timeout)?;
        }
        Ok(TcpRing {
            rank,
            world,
            links: Some(links),
            timeout,
        })
    }
}

/// Connects to the next rank and introduces itself.
fn dial(
    rank: usize,
    peer: usize,
    address: SocketAddr,
    world: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<Link, CollectiveError> {
    // The neighbour may not be listening yet: retry until the deadline.
    let patience = RetryPolicy::until_deadline(Duration::from_millis(10), Duration::from_millis(200));
    let connect = || {
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        TcpStream::connect_timeout(&address, remaining)
    };
    let mut stream =
        retry_blocking(&patience, Some(deadline), |_| true, connect).map_err(|gave_up| CollectiveError::Connect {
            peer,
            address,
            timeout,
            source: gave_up.error,
        })?;
    let mut hello = Vec::with_capacity(20);
    hello.extend_from_slice(&MAGIC.to_le_bytes());
    hello.extend_from_slice(&(rank as u64).to_le_bytes());
    hello.extend_from_slice(&(world as u64).to_le_bytes());
    stream.set_write_timeout(Some(timeout)).ok();
    match stream.write_all(&hello) {
        Ok(()) => Ok(Link { stream, peer, address }),
        Err(source) => Err(CollectiveError::PeerLost {
            peer,
            address,
            operation: "connect",
            source,
        }),
    }
}

/// Accepts the previous rank's connection and checks who it is.
fn accept(
    listener: &TcpListener,
    peer: usize,
    address: SocketAddr,
    world: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<Link, CollectiveError> {
    let own = listener.local_addr().unwrap_or(address);
    let setup = |source: io::Error| CollectiveError::Listen { address: own, source };
    listener.set_nonblocking(true).map_err(setup)?;
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false).map_err(setup)?;
                stream.set_read_timeout(Some(timeout)).map_err(setup)?;
                let mut hello = [0u8; 20];
                let lost = |source| CollectiveError::PeerLost {
                    peer,
                    address,
                    operation: "connect",
                    source,
                };
                stream.read_exact(&mut hello).map_err(lost)?;
                let magic = u32::from_le_bytes(hello[0..4].try_into().expect("4 bytes"));
                let their_rank = u64::from_le_bytes(hello[4..12].try_into().expect("8 bytes"));
                let their_world = u64::from_le_bytes(hello[12..20].try_into().expect("8 bytes"));
                if magic != MAGIC || their_rank != peer as u64 || their_world != world as u64 {
                    return Err(CollectiveError::Protocol {
                        peer,
                        address,
                        operation: "connect",
                        message: format!(
                            "expected rank {peer} of {world} (magic {MAGIC:#x}), got rank {their_rank} of {their_world} (magic {magic:#x})"
                        ),
                    });
                }
                return Ok(Link { stream, peer, address });
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(error) => {
                let error = if error.kind() == io::ErrorKind::WouldBlock {
                    io::Error::new(io::ErrorKind::TimedOut, "the previous rank never connected")
                } else {
                    error
                };
                return Err(CollectiveError::Connect {
                    peer,
                    address,
                    timeout,
                    source: error,
                });
            }
        }
    }
}

/// One direction of the ring.
struct Link {
    stream: TcpStream,
    peer: usize,
    address: SocketAddr,
}

impl Link {
    fn configure(&self, timeout: Duration) -> Result<(), CollectiveError> {
        let setup = |source| CollectiveError::PeerLost {
            peer: self.peer,
            address: self.address,
            operation: "connect",
            source,
        };
        self.stream.set_nodelay(true).map_err(setup)?;
        self.stream.set_read_timeout(Some(timeout)).map_err(setup)?;
        self.stream.set_write_timeout(Some(timeout)).map_err(setup)
    }

    fn error(&self, tag: Tag, timeout: Duration, source: io::Error) -> CollectiveError {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => CollectiveError::Timeout {
                peer: self.peer,
                address: self.address,
                timeout,
                operation: tag.operation(),
            },
            _ => CollectiveError::PeerLost {
                peer: self.peer,
                address: self.address,
                operation: tag.operation(),
                source,
            },
        }
    }

    fn send(&mut self, header: Header, values: &[f32], timeout: Duration) -> Result<(), CollectiveError> {
        self.announce(header, timeout)?;
        self.write(header.tag, values, timeout)
    }

    fn announce(&mut self, header: Header, timeout: Duration) -> Result<(), CollectiveError> {
        let tag = header.tag;
        let header = header.encode();
        self.stream
            .write_all(&header)
            .map_err(|source| self.error(tag, timeout, source))
    }

    fn write(&mut self, tag: Tag, values: &[f32], timeout: Duration) -> Result<(), CollectiveError> {
        self.stream
            .write_all(as_bytes(values))
            .map_err(|source| self.error(tag, timeout, source))
    }

    /// Reads a message header and checks it is the one this rank expects.
    fn expect(&mut self, expected: Header, timeout: Duration) -> Result<(), CollectiveError> {
        let tag = expected.tag;
        let mut bytes = [0u8; HEADER_BYTES];
        self.stream
            .read_exact(&mut bytes)
            .map_err(|source| self.error(tag, timeout, source))?;
        let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let (their_tag, their_len, their_total) = (word(0), word(1), word(2));
        if (their_tag, their_len, their_total) != (tag as u64, expected.len as u64, expected.total as u64) {
            return Err(CollectiveError::Protocol {
                peer: self.peer,
                address: self.address,
                operation: tag.operation(),
                message: format!(
                    "expected message {} for a buffer of {} values, got message {their_tag} for a buffer of \
                     {their_total} (do all ranks pass buffers of the same length to the same operations?)",
                    tag as u32, expected.total
                ),
            });
        }
        Ok(())
    }

    fn read(&mut self, tag: Tag, into: &mut [f32], timeout: Duration) -> Result<(), CollectiveError> {
        self.stream
            .read_exact(as_bytes_mut(into))
            .map_err(|source| self.error(tag, timeout, source))
    }
}

/// Precedes every message: what it is and the caller's whole buffer length,
/// so ranks that disagree find out at the first message, on both sides.
#[derive(Debug, Clone, Copy)]
struct Header {
    tag: Tag,
    /// Values in this message.
    len: usize,
    /// Values in the operation's buffer on the sending rank.
    total: usize,
}

const HEADER_BYTES: usize = 24;

impl Header {
    fn encode(self) -> [u8; HEADER_BYTES] {
        let mut bytes = [0u8; HEADER_BYTES];
        for (i, word) in [self.tag as u64, self.len as u64, self.total as u64]
            .into_iter()
            .enumerate()
        {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&word.to_le_bytes());
        }
        bytes
    }
}

struct Links {
    next: Link,
    prev: Link,
    /// Receive buffer for reductions, kept between calls.
    scratch: Vec<f32>,
}

/// A rank's place in a TCP ring.
pub struct TcpRing {
    rank: usize,
    world: usize,
    /// None when the world has one rank.
    links: Option<Links>,
    timeout: Duration,
}

/// Two disjoint ranges of one buffer: the first to read, the second to write.
fn split_pair<'a>(buffer: &'a mut [f32], read: &Range<usize>, write: &Range<usize>) -> (&'a [f32], &'a mut [f32]) {
    if read.start < write.start {
        let (head, tail) = buffer.split_at_mut(write.start);
        (&head[read.clone()], &mut tail[..write.len()])
    } else {
        let (head, tail) = buffer.split_at_mut(read.start);
        (&tail[..read.len()], &mut head[write.clone()])
    }
}

// f32 is plain data; the ring assumes little-endian hosts (x86-64, aarch64).
fn as_bytes(values: &[f32]) -> &[u8] {
    bytemuck::cast_slice(values)
}

fn as_bytes_mut(values: &mut [f32]) -> &mut [u8] {
    bytemuck::cast_slice_mut(values)
}

impl Links {
    /// Sends `send` to the next rank while receiving `receive.len()` values
    /// from the previous one, combining each received chunk into `receive`.
    /// `total`: the length of the buffer the operation works on.
    fn exchange(
        &mut self,
        tag: Tag,
        total: usize,
        send: &[f32],
        receive: &mut [f32],
        timeout: Duration,
        arrival: Arrival,
    ) -> Result<(), CollectiveError> {
        let Links { next, prev, scratch } = self;
        let outgoing = Header {
            tag,
            len: send.len(),
            total,
        };
        let incoming = Header {
            tag,
            len: receive.len(),
            total,
        };
        thread::scope(|scope| {
            let sending = scope.spawn(|| next.send(outgoing, send, timeout));
            let received = (|| {
                prev.expect(incoming, timeout)?;
                match arrival {
                    Arrival::Store => prev.read(tag, receive, timeout),
                    Arrival::Add => {
                        scratch.resize(CHUNK.min(receive.len()), 0.0);
                        for chunk in receive.chunks_mut(CHUNK) {
                            let incoming = &mut scratch[..chunk.len()];
                            prev.read(tag, incoming, timeout)?;
                            chunk
                                .iter_mut()
                                .zip(incoming.iter())
                                .for_each(|(sum, value)| *sum += value);
                        }
                        Ok(())
                    }
                }
            })();
            let sent = sending.join().expect("the sending thread does not panic");
            received.and(sent)
        })
    }
}

/// What becomes of received values.
#[derive(Debug, Clone, Copy)]
enum Arrival {
    /// Added into the buffer, chunk by chunk as they stream in.
    Add,
    /// Written straight into the buffer.
    Store,
}

impl TcpRing {
    /// One half of a ring all-reduce over the world's segments of `buffer`
    /// (n - 1 exchanges): `ReduceScatter` leaves rank r the sum of segment
    /// r + `shift`; `AllGather`, given rank r holding segment r + `shift`,
    /// leaves every rank every segment.
    fn ring_phase(&mut self, buffer: &mut [f32], tag: Tag, shift: usize) -> Result<(), CollectiveError> {
        let (rank, n, timeout) = (self.rank, self.world, self.timeout);
        let Some(links) = self.links.as_mut() else {
            return Ok(());
        };
        let total = buffer.len();
        let parts: Vec<Range<usize>> = (0..n).map(|r| segment(total, r, n)).collect();
        let arrival = match tag {
            Tag::ReduceScatter => Arrival::Add,
            _ => Arrival::Store,
        };
        // Reducing, the segment sent first is the one ending n - 1 hops
        // away; gathering, it is the one held.
        let first = match tag {
            Tag::ReduceScatter => rank + shift + n - 1,
            _ => rank + shift + n,
        };
        for step in 0..n - 1 {
            let send = &parts[(first - step) % n];
            let receive = &parts[(first + n - step - 1) % n];
            let (send, receive) = split_pair(buffer, send, receive);
            links.exchange(tag, total, send, receive, timeout, arrival)?;
        }
        Ok(())
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    /// Shuts both links down: a blocked read or write fails at once.
    fn interrupt(&self) -> Option<crate::Interrupt> {
        let links = self.links.as_ref()?;
        let streams: Vec<TcpStream> = [&links.next.stream, &links.prev.stream]
            .into_iter()
            .filter_map(|stream| stream.try_clone().ok())
            .collect();
        Some(std::sync::Arc::new(move || {
            for stream in &streams {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }))
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buffer: &mut [f32]) -> Result<(), CollectiveError> {
        // The reduce-scatter leaves rank r segment r + 1; the all-gather
        // spreads them, so every rank ends bit-identical.
        self.ring_phase(buffer, Tag::ReduceScatter, 1)?;
        self.ring_phase(buffer, Tag::AllGather, 1)
    }

    fn reduce_scatter_sum(&mut self, buffer: &mut [f32]) -> Result<(), CollectiveError> {
        self.ring_phase(buffer, Tag::ReduceScatter, 0)
    }

    fn all_gather_segments(&mut self, buffer: &mut [f32]) -> Result<(), CollectiveError> {
        self.ring_phase(buffer, Tag::AllGather, 0)
    }

    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        let (rank, n, timeout) = (self.rank, self.world, self.timeout);
        let len = local.len();
        let mut gathered = vec![0.0; len * n];
        gathered[rank * len..(rank + 1) * len].copy_from_slice(local);
        let Some(links) = self.links.as_mut() else {
            return Ok(gathered);
        };
        let slot = |i: usize| i * len..(i + 1) * len;
        for step in 0..n - 1 {
            let send = slot((rank + n - step) % n);
            let receive = slot((rank + 2 * n - step - 1) % n);
            let (send, receive) = split_pair(&mut gathered, &send, &receive);
            links.exchange(Tag::Gather, len, send, receive, timeout, Arrival::Store)?;
        }
        Ok(gathered)
    }

    fn broadcast(&mut self, buffer: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        let (rank, n, timeout) = (self.rank, self.world, self.timeout);
        if root >= n {
            return Err(CollectiveError::Setup(format!(
                "broadcast root {root} is outside a world of {n}"
            )));
        }
        let Some(Links { next, prev, .. }) = self.links.as_mut() else {
            return Ok(());
        };
        let forwards = (rank + 1) % n != root;
        let header = Header {
            tag: Tag::Broadcast,
            len: buffer.len(),
            total: buffer.len(),
        };
        if rank == root {
            return next.send(header, buffer, timeout);
        }
        // Receive from the previous rank, forwarding each chunk as it lands.
        prev.expect(header, timeout)?;
        if forwards {
            next.announce(header, timeout)?;
        }
        for chunk in buffer.chunks_mut(CHUNK) {
            prev.read(Tag::Broadcast, chunk, timeout)?;
            if forwards {
                next.write(Tag::Broadcast, chunk, timeout)?;
            }
        }
        Ok(())
    }
}
