//! The data scheduler: per-stream send queues drained round-robin, one
//! quantum at a time.
//!
//! The [`super::Mux`] accepts application data within a stream's credit
//! and parks it here, one queue per stream. When the driver asks for bytes
//! to send, the mux first hands over its control frames, then asks this
//! scheduler for `Data` frames: the stream at the front of the ring gives
//! at most one quantum and goes to the back if it has more. So a small
//! response opened behind a large download leaves after at most one
//! quantum of each busy stream, not after the download's whole backlog.
//!
//! ```text
//!   send_data(A, 1 MiB) ─► A: [██████████████]   ready ring: A → B
//!   send_data(B, 2 KiB) ─► B: [█]
//!   poll ─► Data(A, 16 KiB) Data(B, 2 KiB) End(B) Data(A, 16 KiB) ...
//! ```
//!
//! What it does not do: credit (the mux checks it before queueing), control
//! frames, or any I/O. It only remembers bytes and the order of turns.

use super::codec;
use super::frame::{Frame, StreamId, StreamMap};
use std::collections::VecDeque;

/// Most payload one stream sends per turn: one TLS record's worth, so a
/// turn costs a slow link little time (16 KiB is 6.5 ms at 20 Mbit/s).
pub const QUANTUM: usize = 16 * 1024;

/// Spare buffers kept for reuse, so a stream that sends one small answer
/// does not allocate and free a queue each time.
const SPARES: usize = 8;
/// Largest spare buffer kept; bigger ones are freed once drained.
const SPARE_CAPACITY: usize = 64 * 1024;

#[derive(Debug, Default)]
struct Queued {
    /// A ring, so a bulk stream topped up as it drains never shifts bytes.
    data: VecDeque<u8>,
    /// Encoded frames that follow the data (`End`, a `Reset` after it).
    trailer: Vec<u8>,
}

impl Queued {
    fn len(&self) -> usize {
        self.data.len()
    }
}

/// Per-stream send queues and the round-robin ring. See the module docs.
#[derive(Debug, Default)]
pub struct SendQueue {
    queues: StreamMap<Queued>,
    /// Streams with something to send, in turn order. Each queued stream
    /// is in the ring exactly once.
    ready: VecDeque<StreamId>,
    /// Payload bytes across all queues.
    bytes: usize,
    spares: Vec<VecDeque<u8>>,
}

impl SendQueue {
    /// Payload bytes waiting across all streams.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Payload bytes waiting on one stream.
    pub fn stream_bytes(&self, id: StreamId) -> usize {
        self.queues.get(&id).map_or(0, Queued::len)
    }

    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// Queues payload for `id`; the caller has checked credit.
    pub fn push(&mut self, id: StreamId, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let q = match self.queues.get_mut(&id) {
            Some(q) => q,
            None => {
                self.ready.push_back(id);
                let data = self.spares.pop().unwrap_or_default();
                self.queues.entry(id).or_insert(Queued { data, trailer: Vec::new() })
            }
        };
        q.data.extend(data);
        self.bytes += data.len();
    }

    /// Queues `frame` (an `End`, or a `Reset` after it) to follow the data
    /// queued on `id`. Returns false when nothing is queued: the caller
    /// sends the frame itself, right away.
    pub fn then(&mut self, id: StreamId, frame: &Frame) -> bool {
        match self.queues.get_mut(&id) {
            Some(q) => codec::encode(frame, u32::MAX, &mut q.trailer).is_ok(),
            None => false,
        }
    }

    /// Drops whatever `id` still had to send (the stream was reset).
    pub fn discard(&mut self, id: StreamId) {
        if let Some(q) = self.queues.remove(&id) {
            self.bytes -= q.len();
            self.ready.retain(|&r| r != id);
            self.recycle(q.data);
        }
    }

    /// Drops everything (the session ended).
    pub fn clear(&mut self) {
        self.queues.clear();
        self.ready.clear();
        self.bytes = 0;
    }

    /// Appends the next turn to `out`: one `Data` frame of at most
    /// `chunk` bytes (and the stream's `End` if that was the last of its
    /// data). Returns false when no stream has anything to send.
    pub fn poll(&mut self, out: &mut Vec<u8>, chunk: usize) -> bool {
        let Some(id) = self.ready.pop_front() else { return false };
        let q = self.queues.get_mut(&id).expect("every stream in the ring has a queue");
        // Only the ring's first run: a turn that meets the wrap point is a
        // little shorter, which costs nothing.
        let front = q.data.as_slices().0;
        let n = front.len().min(chunk.max(1));
        codec::encode_data(id, &front[..n], u32::MAX, out).expect("a quantum fits any frame limit");
        q.data.drain(..n);
        self.bytes -= n;
        if q.len() > 0 {
            self.ready.push_back(id);
            return true;
        }
        let q = self.queues.remove(&id).expect("present");
        out.extend_from_slice(&q.trailer);
        self.recycle(q.data);
        true
    }

    fn recycle(&mut self, mut data: VecDeque<u8>) {
        if self.spares.len() < SPARES && data.capacity() <= SPARE_CAPACITY {
            data.clear();
            self.spares.push(data);
        }
    }

    /// Heap bytes held, for memory bounds in tests.
    pub fn memory(&self) -> usize {
        self.queues.values().map(|q| q.data.capacity() + q.trailer.capacity()).sum::<usize>()
            + self.spares.iter().map(VecDeque::capacity).sum::<usize>()
            + self.queues.capacity() * (std::mem::size_of::<StreamId>() + std::mem::size_of::<Queued>() + 8)
            + self.ready.capacity() * std::mem::size_of::<StreamId>()
    }
}
