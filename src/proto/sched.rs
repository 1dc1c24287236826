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
//! Bytes enter a queue two ways: copied in ([`SendQueue::push`]), or
//! written in place by a reader ([`SendQueue::fill`] lends the free run at
//! the queue's tail, so the agent reads an API server's body straight
//! into the tunnel's queue and saves a copy of every byte).
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
/// Largest spare buffer kept among [`SPARES`]; a bigger one is kept
/// alone, and only for a while (see [`SendQueue::trim`]).
const SPARE_CAPACITY: usize = 64 * 1024;
/// Smallest ring allocated. A first fill or push gets just what it
/// needs above this (as `Vec` and `VecDeque` size a first allocation), so
/// the spares an idle session keeps are no bigger than the answers that
/// left them; growth after that doubles.
const MIN_RING: usize = 512;

/// A byte ring over memory that is always initialised: zeroed once when
/// it grows, then reused, so its free tail can be lent out as a
/// `&mut [u8]` for a read straight into the queue ([`SendQueue::fill`])
/// without zeroing per read. (A `VecDeque<u8>`'s spare capacity is
/// uninitialised and cannot be lent without `unsafe`.)
#[derive(Debug, Default)]
struct Ring {
    buf: Vec<u8>,
    /// Index of the first queued byte.
    head: usize,
    len: usize,
}

impl Ring {
    fn len(&self) -> usize {
        self.len
    }

    fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// The queued bytes up to the wrap point.
    fn front(&self) -> &[u8] {
        let end = (self.head + self.len).min(self.buf.len());
        &self.buf[self.head..end]
    }

    /// Drops `n` bytes from the front.
    fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len);
        self.len -= n;
        // Empty: start over at 0, so the next fill gets one run.
        self.head = if self.len == 0 { 0 } else { (self.head + n) % self.buf.len() };
    }

    fn clear(&mut self) {
        self.head = 0;
        self.len = 0;
    }

    /// Makes at least `extra` bytes free, moving the queued bytes to the
    /// front of a new buffer when it has to grow (doubling, so growth is
    /// rare and its zeroing amortised).
    fn reserve(&mut self, extra: usize) {
        let need = self.len + extra;
        if need <= self.buf.len() {
            return;
        }
        let mut grown = vec![0; need.max(2 * self.buf.len()).max(MIN_RING)];
        let first = self.front().len();
        grown[..first].copy_from_slice(self.front());
        grown[first..self.len].copy_from_slice(&self.buf[..self.len - first]);
        self.buf = grown;
        self.head = 0;
    }

    /// The free run after the last queued byte, at most `max` long and
    /// never empty (`max` > 0): the ring grows when less than `max` is
    /// free in all, so a run is short only at the wrap point.
    fn tail(&mut self, max: usize) -> &mut [u8] {
        self.reserve(max);
        let cap = self.buf.len();
        let start = self.head + self.len;
        let (start, end) = if start < cap { (start, cap) } else { (start - cap, self.head) };
        let end = end.min(start + max);
        &mut self.buf[start..end]
    }

    /// Counts `n` bytes written into the last [`Ring::tail`] as queued.
    fn commit(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.len <= self.buf.len());
    }

    fn push(&mut self, mut data: &[u8]) {
        self.reserve(data.len());
        while !data.is_empty() {
            let run = self.tail(data.len());
            let n = run.len();
            run.copy_from_slice(&data[..n]);
            self.commit(n);
            data = &data[n..];
        }
    }
}

#[derive(Debug, Default)]
struct Queued {
    /// A ring, so a bulk stream topped up as it drains never shifts bytes.
    data: Ring,
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
    spares: Vec<Ring>,
    /// One ring bigger than [`SPARE_CAPACITY`], kept after its queue
    /// drained: a download whose queue runs dry between the API server's
    /// reads (the tunnel keeps up) takes it back at once instead of
    /// growing, and zeroing, a fresh one each time. Freed by
    /// [`SendQueue::trim`] once unused for a whole interval.
    big_spare: Option<Ring>,
    /// Whether `big_spare` was taken or parked since the last
    /// [`SendQueue::trim`].
    big_used: bool,
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
        q.data.push(data);
        self.bytes += data.len();
    }

    /// Queues for `id` what `write` puts into the free run at the end of
    /// its queue: `write` gets at most `max` (> 0) bytes of room and
    /// returns how many it filled (0: nothing queued). The caller has
    /// checked credit for `max`. The room is memory zeroed once and
    /// reused, so filling it costs no more than the write itself.
    pub fn fill(&mut self, id: StreamId, max: usize, write: impl FnOnce(&mut [u8]) -> usize) -> usize {
        debug_assert!(max > 0);
        if let Some(q) = self.queues.get_mut(&id) {
            let room = q.data.tail(max);
            let n = write(room).min(room.len());
            q.data.commit(n);
            self.bytes += n;
            return n;
        }
        // A reader fills in bulk: the big ring first.
        let mut data = match self.big_spare.take() {
            Some(big) => {
                self.big_used = true;
                big
            }
            None => self.spares.pop().unwrap_or_default(),
        };
        let room = data.tail(max);
        let n = write(room).min(room.len());
        if n == 0 {
            self.recycle(data);
            return 0;
        }
        data.commit(n);
        self.bytes += n;
        self.ready.push_back(id);
        self.queues.insert(id, Queued { data, trailer: Vec::new() });
        n
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
        self.big_spare = None;
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
        let front = q.data.front();
        let n = front.len().min(chunk.max(1));
        codec::encode_data(id, &front[..n], u32::MAX, out).expect("a quantum fits any frame limit");
        q.data.consume(n);
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

    /// Frees the big spare ring unless it was taken since the last call.
    /// The mux calls this every keepalive interval, so an idle session
    /// holds no more than its small spares.
    pub fn trim(&mut self) {
        if !self.big_used {
            self.big_spare = None;
        }
        self.big_used = false;
    }

    fn recycle(&mut self, mut data: Ring) {
        if data.capacity() > SPARE_CAPACITY {
            if self.big_spare.as_ref().is_none_or(|b| b.capacity() < data.capacity()) {
                data.clear();
                self.big_spare = Some(data);
                // Parked just now: kept for at least a whole interval.
                self.big_used = true;
            }
            return;
        }
        if self.spares.len() < SPARES {
            data.clear();
            self.spares.push(data);
        }
    }

    /// Heap bytes held, for memory bounds in tests.
    pub fn memory(&self) -> usize {
        self.queues.values().map(|q| q.data.capacity() + q.trailer.capacity()).sum::<usize>()
            + self.spares.iter().map(Ring::capacity).sum::<usize>()
            + self.big_spare.as_ref().map_or(0, Ring::capacity)
            + self.queues.capacity() * (std::mem::size_of::<StreamId>() + std::mem::size_of::<Queued>() + 8)
            + self.ready.capacity() * std::mem::size_of::<StreamId>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every turn until the queue is empty, decoded.
    fn drain(q: &mut SendQueue, chunk: usize) -> Vec<Frame> {
        let mut out = Vec::new();
        while q.poll(&mut out, chunk) {}
        codec::decode_all(&out)
    }

    fn bytes_of(frames: &[Frame], id: u32) -> Vec<u8> {
        frames
            .iter()
            .flat_map(|f| match f {
                Frame::Data { id: StreamId(i), data } if *i == id => data.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// A pattern that shows any byte out of place.
    fn pattern(from: usize, len: usize) -> Vec<u8> {
        (from..from + len).map(|i| (i % 251) as u8).collect()
    }

    /// Fills that meet the ring's wrap point and its growth, mixed with
    /// pushes and partial drains, keep every byte in order; a fill that
    /// writes nothing queues nothing and leaves no queue behind.
    #[test]
    fn filled_room_across_the_wrap_point_and_growth_keeps_order() {
        let mut q = SendQueue::default();
        let id = StreamId(2);
        assert_eq!(q.fill(id, 100, |_| 0), 0);
        assert!(q.is_empty(), "an empty fill leaves no queue");
        let mut sent = 0;
        let mut got = Vec::new();
        let mut rounds = 0;
        let mut seen_short_run = false;
        while sent < 200_000 {
            rounds += 1;
            // Fill what the room allows, then top up with a push.
            let want = 1 + (rounds * 977) % 9000;
            let n = q.fill(id, want, |room| {
                assert!(!room.is_empty() && room.len() <= want);
                seen_short_run |= room.len() < want;
                let n = room.len().min(3000);
                room[..n].copy_from_slice(&pattern(sent, n));
                n
            });
            sent += n;
            let extra = pattern(sent, rounds % 700);
            q.push(id, &extra);
            sent += extra.len();
            assert_eq!(q.stream_bytes(id), sent - got.len());
            // Drain some, not all, so the ring's head moves around it.
            let mut out = Vec::new();
            for _ in 0..1 + rounds % 2 {
                q.poll(&mut out, 1 + (rounds * 131) % 5000);
            }
            got.extend(bytes_of(&codec::decode_all(&out), 2));
        }
        got.extend(bytes_of(&drain(&mut q, QUANTUM), 2));
        assert!(seen_short_run, "some fill met the wrap point");
        assert_eq!(got.len(), sent);
        assert!(got == pattern(0, sent), "bytes out of order");
        assert!(q.is_empty() && q.bytes() == 0);
    }

    /// A stream filled in place takes its turns like one pushed to: a
    /// small answer behind a bulk stream leaves after one quantum.
    #[test]
    fn a_filled_bulk_stream_still_takes_turns() {
        let mut q = SendQueue::default();
        let bulk = StreamId(2);
        let mut left = 4 * QUANTUM;
        while left > 0 {
            left -= q.fill(bulk, left, |room| {
                room.fill(7);
                room.len()
            });
        }
        q.push(StreamId(4), b"small");
        assert!(q.then(StreamId(4), &Frame::End { id: StreamId(4) }));
        let frames = drain(&mut q, QUANTUM);
        assert_eq!(frames[1], Frame::Data { id: StreamId(4), data: b"small".to_vec() });
        assert_eq!(frames[2], Frame::End { id: StreamId(4) });
        assert_eq!(bytes_of(&frames, 2), vec![7; 4 * QUANTUM]);
    }

    /// A discarded stream's ring goes back to the spares, bounded in
    /// number and size; a fresh stream reuses one without growing it.
    #[test]
    fn rings_are_reused_and_spares_stay_bounded() {
        let mut q = SendQueue::default();
        for i in 0..20u32 {
            q.fill(StreamId(2 * i + 2), 1000, |room| room.len());
        }
        for i in 0..20u32 {
            q.discard(StreamId(2 * i + 2));
        }
        assert!(q.is_empty());
        let idle = q.memory();
        assert!(idle <= SPARES * 1000 + 4096, "idle queue holds {idle}");
        q.fill(StreamId(100), 1000, |room| room.len());
        assert_eq!(q.memory(), idle, "a spare was reused, nothing allocated");
        q.discard(StreamId(100));
        // A big ring is kept once drained, for the next bulk fill only,
        // and freed after a whole trim interval without use.
        q.push(StreamId(102), &vec![1; 2 * SPARE_CAPACITY]);
        drain(&mut q, QUANTUM);
        let with_big = q.memory();
        assert!(with_big > idle + SPARE_CAPACITY);
        q.trim();
        q.fill(StreamId(104), 10, |room| room.len());
        assert_eq!(q.memory(), with_big, "the bulk fill took the big ring");
        q.discard(StreamId(104));
        q.trim();
        assert_eq!(q.memory(), with_big, "used within the interval: kept");
        q.trim();
        assert!(q.memory() <= idle, "unused for an interval: freed");
        q.push(StreamId(106), &vec![1; 2 * SPARE_CAPACITY]);
        drain(&mut q, QUANTUM);
        q.clear();
        assert!(q.memory() <= idle, "the session's end frees it too");
    }
}
