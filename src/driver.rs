//! Runs a [`Mux`] over an async byte stream on a single-threaded executor.
//!
//! The driver is deliberately thin: it reads bytes into the mux, writes
//! what the mux wants sent, re-arms one timer from [`Mux::poll_timeout`],
//! and turns mux events into wake-ups of the [`Stream`] handles that the
//! application reads and writes. All protocol rules live in the mux.
//!
//! ```text
//!   socket ──read──► reader loop ──handle_input──► Mux ──events──► Stream handles
//!   socket ◄─write── writer loop ◄──poll_transmit── Mux ◄──send_*── Stream handles
//!                    timer loop  ──handle_timeout──►
//! ```
//!
//! It is `!Send` on purpose (`Rc<RefCell<..>>`): the agent runs everything
//! on one thread, and the hub keeps each session on one executor. Borrows
//! of the shared state never cross an `.await`.
//!
//! Not here: dialling, TLS handshakes, HTTP upgrades, reconnect policy.
//! Callers hand [`Session::run`] a ready byte stream.

use crate::proto::{
    Event, GoAwayCode, Hello, Mux, ReplicaSet, ReplicaSetError, RequestHead, ResetCode, ResponseHead, SessionError,
    StreamError, StreamId, StreamMap, Welcome,
};
use smol::Timer;
use smol::future::{self, FutureExt};
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How long a session that closed with the transport still up may spend
/// flushing its last frames before the transport is dropped anyway.
const CLOSE_FLUSH: Duration = Duration::from_millis(500);

/// How the reading side of a session ended.
enum Ended {
    /// The transport is gone (EOF, reset, read error): nothing to flush.
    TransportGone,
    /// The mux closed while the transport still works.
    Closed,
}

/// Bytes asked of the mux per write while the socket keeps up (the last
/// write went through at once): a batch the kernel takes in one send (one
/// TSO segment of 64 KiB, TLS records included), so a busy tunnel on a
/// fast link makes few, large writes.
pub const WRITE_BATCH: usize = 60 * 1024;

/// Bytes asked of the mux per write while the socket does not keep up
/// (the link is the bottleneck): one scheduler turn, so that what is
/// committed below the scheduler stays small and the mux, not a deep
/// buffer, decides what crosses the slow link next.
pub const WRITE_CHUNK: usize = 16 * 1024;

/// `TCP_NOTSENT_LOWAT` for tunnel sockets, both ends: the kernel holds
/// at most about this many unsent bytes (plus the write in progress), so
/// a small answer queued behind a download waits for this much to leave,
/// not for a send buffer of megabytes.
pub const TUNNEL_NOTSENT_LOWAT: u32 = 16 * 1024;

/// Why a stream can no longer be read or written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamClosed {
    /// The peer reset the stream, or this side did because the peer broke
    /// a stream rule.
    Reset { code: ResetCode, message: String },
    /// The whole session ended.
    Session(SessionError),
    /// This side already finished (half-closed) the stream.
    Finished,
}

impl fmt::Display for StreamClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamClosed::Reset { code, message } => write!(f, "stream reset ({code:?}): {message}"),
            StreamClosed::Session(e) => write!(f, "tunnel closed: {e}"),
            StreamClosed::Finished => write!(f, "stream already finished"),
        }
    }
}

impl std::error::Error for StreamClosed {}

impl From<StreamClosed> for io::Error {
    fn from(e: StreamClosed) -> io::Error {
        let kind = match e {
            StreamClosed::Reset { .. } => io::ErrorKind::ConnectionReset,
            StreamClosed::Session(_) => io::ErrorKind::ConnectionAborted,
            StreamClosed::Finished => io::ErrorKind::BrokenPipe,
        };
        io::Error::new(kind, e)
    }
}

/// What one [`Stream::send_from`] did.
#[derive(Debug)]
pub enum Relayed {
    /// The reader's result: bytes read and queued (0: the reader's end),
    /// or its error.
    Read(io::Result<usize>),
    /// Nothing may be queued now: wait with [`Stream::writable`].
    Full,
}

#[derive(Default)]
struct Slot {
    head: Option<ResponseHead>,
    recv: VecDeque<Vec<u8>>,
    /// Bytes of `recv[0]` already read.
    offset: usize,
    ended: bool,
    reset: Option<(ResetCode, String)>,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

struct Shared {
    mux: Mux,
    slots: StreamMap<Slot>,
    accept: VecDeque<(StreamId, RequestHead)>,
    accept_waker: Option<Waker>,
    connected: Option<(Option<Hello>, Welcome)>,
    connected_wakers: Vec<Waker>,
    goaway: Option<(GoAwayCode, String)>,
    closed: Option<SessionError>,
    /// The run loop's waker: woken whenever the mux may have bytes to send
    /// or its deadline may have moved.
    driver_waker: Option<Waker>,
    /// Streams waiting for room in the transmit buffer.
    room_wakers: Vec<Waker>,
    last_rtt: Option<Duration>,
    /// Agent: the latest replica set the hub sent, not yet taken. Only the
    /// latest matters: a newer set replaces an older one unread.
    replica_set: Option<Result<ReplicaSet, ReplicaSetError>>,
    replica_waker: Option<Waker>,
}

impl Shared {
    /// Drains mux events into slots and wakes whoever waits on them.
    fn dispatch(&mut self) {
        while let Some(event) = self.mux.poll_event() {
            match event {
                Event::Connected { hello, welcome } => {
                    self.connected = Some((hello, welcome));
                    self.connected_wakers.drain(..).for_each(Waker::wake);
                }
                Event::Opened { id, head } => {
                    self.slots.insert(id, Slot::default());
                    self.accept.push_back((id, head));
                    wake(&mut self.accept_waker);
                }
                Event::Head { id, head } => {
                    if let Some(slot) = self.slots.get_mut(&id) {
                        slot.head = Some(head);
                        wake(&mut slot.read_waker);
                    }
                }
                Event::Data { id, data } => match self.slots.get_mut(&id) {
                    Some(slot) => {
                        slot.recv.push_back(data);
                        wake(&mut slot.read_waker);
                    }
                    // The handle is gone: nobody will read, hand the
                    // credit back so the peer is not left waiting.
                    None => self.mux.consume(id, data.len()),
                },
                Event::End { id } => {
                    if let Some(slot) = self.slots.get_mut(&id) {
                        slot.ended = true;
                        wake(&mut slot.read_waker);
                    }
                }
                Event::Reset { id, code, message } => {
                    if let Some(slot) = self.slots.get_mut(&id) {
                        slot.reset = Some((code, message));
                        wake(&mut slot.read_waker);
                        wake(&mut slot.write_waker);
                    }
                }
                Event::Writable { id } => {
                    if let Some(slot) = self.slots.get_mut(&id) {
                        wake(&mut slot.write_waker);
                    }
                }
                Event::Pong { rtt } => self.last_rtt = Some(rtt),
                Event::ReplicaSet(set) => {
                    self.replica_set = Some(set);
                    wake(&mut self.replica_waker);
                }
                Event::GoAway { code, message } => {
                    self.goaway = Some((code, message));
                    wake(&mut self.accept_waker);
                }
                Event::Closed { error } => {
                    self.closed = Some(error);
                    // The writer flushes what is left and closes the
                    // transport now, not when something else wakes it.
                    wake(&mut self.driver_waker);
                    wake(&mut self.accept_waker);
                    wake(&mut self.replica_waker);
                    self.connected_wakers.drain(..).for_each(Waker::wake);
                    self.room_wakers.drain(..).for_each(Waker::wake);
                    for slot in self.slots.values_mut() {
                        wake(&mut slot.read_waker);
                        wake(&mut slot.write_waker);
                    }
                }
            }
        }
        if self.mux.pending_transmit() > 0 {
            wake(&mut self.driver_waker);
        }
    }

    fn session_error(&self) -> SessionError {
        self.closed.clone().unwrap_or_else(|| SessionError::ConnectionLost("session closed".into()))
    }

    /// Why stream `id` can send no more: gone with its session, reset,
    /// or the session ended. `None` while it can.
    fn ended(&self, id: StreamId) -> Option<StreamClosed> {
        let Some(slot) = self.slots.get(&id) else {
            return Some(StreamClosed::Session(self.session_error()));
        };
        if let Some((code, message)) = slot.reset.clone() {
            return Some(StreamClosed::Reset { code, message });
        }
        self.closed.clone().map(StreamClosed::Session)
    }

    /// Parks a sender of stream `id` until it may queue again: out of
    /// credit (woken by `Writable`) or the transmit buffer full (woken
    /// when the writer drains it).
    fn wait_for_room(&mut self, id: StreamId, cx: &Context<'_>) {
        if let Some(slot) = self.slots.get_mut(&id) {
            store(&mut slot.write_waker, cx);
        }
        self.room_wakers.push(cx.waker().clone());
    }
}

fn wake(slot: &mut Option<Waker>) {
    if let Some(w) = slot.take() {
        w.wake();
    }
}

fn store(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// A handle to one tunnel session. Cheap to clone; all clones drive and
/// observe the same session.
#[derive(Clone)]
pub struct Session {
    shared: Rc<RefCell<Shared>>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session").field("mux", &self.shared.borrow().mux).finish()
    }
}

impl Session {
    pub fn new(mux: Mux) -> Self {
        Session {
            shared: Rc::new(RefCell::new(Shared {
                mux,
                slots: StreamMap::default(),
                accept: VecDeque::new(),
                accept_waker: None,
                connected: None,
                connected_wakers: Vec::new(),
                goaway: None,
                closed: None,
                driver_waker: None,
                room_wakers: Vec::new(),
                last_rtt: None,
                replica_set: None,
                replica_waker: None,
            })),
        }
    }

    /// Drives the session over `io` until it ends; returns why it ended.
    /// Reading never waits on the application (credit bounds what can
    /// arrive), so a stalled stream cannot stall the others or the
    /// keepalive.
    pub async fn run<IO>(&self, io: IO) -> SessionError
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let (reader, writer) = smol::io::split(io);
        let write = async {
            if let Err(e) = self.write_loop(writer).await {
                let mut s = self.shared.borrow_mut();
                s.mux.handle_eof(&format!("write failed: {e}"));
                s.dispatch();
            }
        };
        let read = async {
            if let Ended::TransportGone = self.read_loop(reader).or(self.timer_loop()).await {
                // EOF, reset or a read error: nothing more can reach the
                // peer, so the session ends in this same turn.
                return;
            }
            // Closed by a frame, the application or the dead-peer deadline:
            // the writer (woken by the close) flushes the last frames, a
            // GoAway that says why, and returns. A peer that stopped
            // reading must not hold us here, so that gets a bounded moment.
            Timer::after(CLOSE_FLUSH).await;
        };
        write.or(read).await;
        self.shared.borrow().session_error()
    }

    async fn read_loop<R: AsyncRead + Unpin>(&self, mut reader: R) -> Ended {
        loop {
            // Read straight into the mux's receive buffer: one copy fewer
            // of every byte the tunnel brings (the decoder's).
            let mut buf = self.shared.borrow_mut().mux.input_buffer();
            let result = reader.read(buf.room()).await;
            let mut s = self.shared.borrow_mut();
            s.mux.handle_read(buf, *result.as_ref().unwrap_or(&0), Instant::now());
            match result {
                Ok(0) => {
                    s.mux.handle_eof("peer closed the connection");
                    s.dispatch();
                    return Ended::TransportGone;
                }
                Ok(_) => {
                    if s.mux.is_drained() {
                        s.mux.shutdown_drained();
                    }
                    s.dispatch();
                    if s.mux.is_closed() {
                        return Ended::Closed;
                    }
                }
                Err(e) => {
                    s.mux.handle_eof(&format!("read failed: {e}"));
                    s.dispatch();
                    return Ended::TransportGone;
                }
            }
        }
    }

    /// Asks the mux for a batch, writes it out, and only then asks again:
    /// the mux decides the order, this loop only moves bytes. A write that
    /// had to wait for the socket means the link is the bottleneck: the
    /// next batches are small ([`WRITE_CHUNK`]) until one goes through at
    /// once again.
    async fn write_loop<W: AsyncWrite + Unpin>(&self, mut writer: W) -> io::Result<()> {
        let mut buf = Vec::with_capacity(WRITE_BATCH + super::proto::sched::QUANTUM + 1024);
        let mut congested = false;
        loop {
            let limit = if congested { WRITE_CHUNK } else { WRITE_BATCH };
            let more = future::poll_fn(|cx| {
                let mut s = self.shared.borrow_mut();
                buf.clear();
                if s.mux.poll_transmit(&mut buf, limit) > 0 {
                    Poll::Ready(true)
                } else if s.mux.is_closed() {
                    Poll::Ready(false)
                } else {
                    store(&mut s.driver_waker, cx);
                    Poll::Pending
                }
            })
            .await;
            if !more {
                writer.flush().await?;
                return writer.close().await;
            }
            {
                let mut write = std::pin::pin!(async {
                    writer.write_all(&buf).await?;
                    writer.flush().await
                });
                congested = match future::poll_once(write.as_mut()).await {
                    Some(done) => {
                        done?;
                        false
                    }
                    None => {
                        write.await?;
                        true
                    }
                };
            }
            // A burst of control frames may have blown the buffer up.
            if buf.capacity() > 1 << 20 {
                buf = Vec::with_capacity(WRITE_BATCH);
            }
            let mut s = self.shared.borrow_mut();
            s.room_wakers.drain(..).for_each(Waker::wake);
            // The last queued data may just have left a session that was
            // only waiting for it to go away.
            if s.mux.is_drained() && !s.mux.is_closed() {
                s.mux.shutdown_drained();
                s.dispatch();
            }
        }
    }

    async fn timer_loop(&self) -> Ended {
        let mut timer = Timer::never();
        // When `timer` is set to go off. The mux's deadline moves later
        // with every frame received (the dead-peer deadline), and moving
        // an armed timer costs the reactor a wake-up (async-io notifies
        // its poller on every insert). So the timer is only moved
        // earlier; going off early just re-arms it for the real deadline.
        let mut armed: Option<Instant> = None;
        future::poll_fn(|cx| {
            loop {
                let mut s = self.shared.borrow_mut();
                // Store first: any later change to the mux wakes us to re-arm.
                store(&mut s.driver_waker, cx);
                let Some(deadline) = s.mux.poll_timeout() else {
                    return Poll::Ready(Ended::Closed);
                };
                let now = Instant::now();
                if now >= deadline {
                    s.mux.handle_timeout(now);
                    if s.mux.is_drained() {
                        s.mux.shutdown_drained();
                    }
                    s.dispatch();
                    continue;
                }
                drop(s);
                if armed.is_none_or(|a| deadline < a || a <= now) {
                    timer.set_at(deadline);
                    armed = Some(deadline);
                }
                if Pin::new(&mut timer).poll(cx).is_pending() {
                    return Poll::Pending;
                }
                armed = None;
            }
        })
        .await
    }

    /// Waits for the handshake. The hub gets the agent's `Hello`.
    pub async fn connected(&self) -> Result<(Option<Hello>, Welcome), SessionError> {
        future::poll_fn(|cx| {
            let mut s = self.shared.borrow_mut();
            if let Some(c) = &s.connected {
                return Poll::Ready(Ok(c.clone()));
            }
            if s.closed.is_some() {
                return Poll::Ready(Err(s.session_error()));
            }
            s.connected_wakers.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Whether [`Session::open`] would take a stream now ([`Mux::can_open`]).
    pub fn can_open(&self) -> Result<(), StreamError> {
        self.shared.borrow().mux.can_open()
    }

    /// Opens a stream carrying `head`.
    pub fn open(&self, head: RequestHead) -> Result<Stream, StreamError> {
        let mut s = self.shared.borrow_mut();
        let id = s.mux.open(head)?;
        s.slots.insert(id, Slot::default());
        s.dispatch();
        Ok(Stream { id, shared: self.shared.clone(), opener: true })
    }

    /// [`Session::open`] from a borrowed head ([`Mux::open_ref`]).
    pub fn open_ref<'a, I>(&self, head: &crate::proto::codec::OpenHead<'a, I>) -> Result<Stream, StreamError>
    where
        I: Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
    {
        let mut s = self.shared.borrow_mut();
        let id = s.mux.open_ref(head)?;
        s.slots.insert(id, Slot::default());
        s.dispatch();
        Ok(Stream { id, shared: self.shared.clone(), opener: true })
    }

    /// The next stream the peer opened, or `None` once the session is
    /// closed or the peer sent `GoAway`.
    pub async fn accept(&self) -> Option<(Stream, RequestHead)> {
        future::poll_fn(|cx| {
            let mut s = self.shared.borrow_mut();
            if let Some((id, head)) = s.accept.pop_front() {
                return Poll::Ready(Some((Stream { id, shared: self.shared.clone(), opener: false }, head)));
            }
            if s.closed.is_some() || s.goaway.is_some() {
                return Poll::Ready(None);
            }
            store(&mut s.accept_waker, cx);
            Poll::Pending
        })
        .await
    }

    /// Sends `GoAway`: in-flight streams finish, no new ones start; the
    /// session closes once drained.
    pub fn go_away(&self, code: GoAwayCode, message: &str) {
        let mut s = self.shared.borrow_mut();
        s.mux.go_away(code, message);
        if s.mux.is_drained() {
            s.mux.shutdown_drained();
        }
        s.dispatch();
        wake(&mut s.driver_waker);
    }

    /// Ends the session now, with a reason the peer will see.
    pub fn close(&self, code: GoAwayCode, message: &str) {
        let mut s = self.shared.borrow_mut();
        s.mux.close(code, message);
        s.dispatch();
        wake(&mut s.driver_waker);
    }

    /// Hub: the replica set to tell the agent (see [`Mux::set_replicas`]).
    pub fn set_replicas(&self, set: ReplicaSet) {
        let mut s = self.shared.borrow_mut();
        s.mux.set_replicas(set);
        s.dispatch();
    }

    /// Agent: the next replica set the hub sends (or a malformed one, with
    /// what is wrong with it); `None` once the session is closed. Sets
    /// that arrive while nobody waits are coalesced to the latest.
    pub async fn next_replica_set(&self) -> Option<Result<ReplicaSet, ReplicaSetError>> {
        future::poll_fn(|cx| {
            let mut s = self.shared.borrow_mut();
            if let Some(set) = s.replica_set.take() {
                return Poll::Ready(Some(set));
            }
            if s.closed.is_some() {
                return Poll::Ready(None);
            }
            store(&mut s.replica_waker, cx);
            Poll::Pending
        })
        .await
    }

    /// The peer's `GoAway`, if it sent one.
    pub fn goaway_received(&self) -> Option<(GoAwayCode, String)> {
        self.shared.borrow().goaway.clone()
    }

    /// Why the session ended, once it has.
    pub fn closed(&self) -> Option<SessionError> {
        self.shared.borrow().closed.clone()
    }

    pub fn is_open(&self) -> bool {
        self.shared.borrow().mux.is_open()
    }

    /// Live streams in the mux.
    pub fn stream_count(&self) -> usize {
        self.shared.borrow().mux.stream_count()
    }

    /// Round-trip time of the last answered keepalive ping.
    pub fn rtt(&self) -> Option<Duration> {
        self.shared.borrow().last_rtt
    }
}

/// One stream of a session: a request/response exchange or, after an
/// upgrade, a raw two-way byte stream. Reading returns credit to the peer
/// as data is consumed. Dropping a stream that is still live resets it.
pub struct Stream {
    id: StreamId,
    shared: Rc<RefCell<Shared>>,
    opener: bool,
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream").field("id", &self.id.0).finish()
    }
}

impl Stream {
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Opener: waits for the peer's response head.
    pub async fn response_head(&mut self) -> Result<ResponseHead, StreamClosed> {
        debug_assert!(self.opener, "only the opener receives a response head");
        future::poll_fn(|cx| {
            let mut s = self.shared.borrow_mut();
            let closed = s.closed.clone();
            let Some(slot) = s.slots.get_mut(&self.id) else {
                return Poll::Ready(Err(StreamClosed::Session(SessionError::ConnectionLost("stream gone".into()))));
            };
            if let Some(head) = slot.head.take() {
                return Poll::Ready(Ok(head));
            }
            if let Some((code, message)) = slot.reset.clone() {
                return Poll::Ready(Err(StreamClosed::Reset { code, message }));
            }
            if let Some(e) = closed {
                return Poll::Ready(Err(StreamClosed::Session(e)));
            }
            store(&mut slot.read_waker, cx);
            Poll::Pending
        })
        .await
    }

    /// Acceptor: sends the response head.
    pub fn send_head(&mut self, head: ResponseHead) -> Result<(), StreamError> {
        let mut s = self.shared.borrow_mut();
        s.mux.send_head(self.id, head)?;
        s.dispatch();
        Ok(())
    }

    /// Acceptor: sends the response head from borrowed `(name, value)`
    /// fields (see [`Mux::send_head_fields`]).
    pub fn send_head_fields<'a, I>(&mut self, status: u16, fields: I) -> Result<(), StreamError>
    where
        I: Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
    {
        let mut s = self.shared.borrow_mut();
        s.mux.send_head_fields(self.id, status, fields)?;
        s.dispatch();
        Ok(())
    }

    /// The next chunk of data as the peer sent it, `Ok(None)` at the end
    /// of the stream. Avoids a copy compared with `AsyncRead`.
    pub async fn read_chunk(&mut self) -> Result<Option<Vec<u8>>, StreamClosed> {
        future::poll_fn(|cx| self.poll_chunk(cx)).await
    }

    /// [`Stream::read_chunk`] as a poll, for bodies pulled by their
    /// reader (the hub's answers to hyper) rather than pushed by a task.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Vec<u8>>, StreamClosed>> {
        let mut s = self.shared.borrow_mut();
        let s = &mut *s;
        let Some(slot) = s.slots.get_mut(&self.id) else {
            return Poll::Ready(Err(StreamClosed::Session(s.session_error())));
        };
        if let Some(mut chunk) = slot.recv.pop_front() {
            if slot.offset > 0 {
                chunk.drain(..slot.offset);
                slot.offset = 0;
            }
            s.mux.consume(self.id, chunk.len());
            s.dispatch();
            return Poll::Ready(Ok(Some(chunk)));
        }
        // A reset after the peer's End only refuses our further data: what
        // the peer sent is complete, so reading ends cleanly.
        if slot.ended {
            return Poll::Ready(Ok(None));
        }
        if let Some((code, message)) = slot.reset.clone() {
            return Poll::Ready(Err(StreamClosed::Reset { code, message }));
        }
        if let Some(e) = &s.closed {
            return Poll::Ready(Err(StreamClosed::Session(e.clone())));
        }
        store(&mut slot.read_waker, cx);
        Poll::Pending
    }

    fn poll_send(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<Result<usize, StreamClosed>> {
        let mut s = self.shared.borrow_mut();
        let s = &mut *s;
        if let Some(e) = s.ended(self.id) {
            return Poll::Ready(Err(e));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        match s.mux.send_data(self.id, data) {
            Ok(0) => {
                s.wait_for_room(self.id, cx);
                Poll::Pending
            }
            Ok(n) => {
                wake(&mut s.driver_waker);
                Poll::Ready(Ok(n))
            }
            Err(StreamError::AlreadyFinished) => Poll::Ready(Err(StreamClosed::Finished)),
            Err(e) => Poll::Ready(Err(StreamClosed::Reset { code: ResetCode::Internal, message: e.to_string() })),
        }
    }

    /// Reads once from `reader` (at most `max` bytes) straight into this
    /// stream's send queue ([`Mux::send_with`]): the bytes are queued
    /// without the copy that [`Stream::write_all`] makes of a caller's
    /// buffer. Returns at once with [`Relayed::Full`] when the stream has
    /// no credit or the transmit buffer no room (wait with
    /// [`Stream::writable`]), so the wait for the reader and the wait for
    /// the tunnel can be told apart. A reset or the session's end while
    /// the reader is quiet ends the wait with the stream's error. `max`
    /// of 0 reads nothing: `Read(Ok(0))`, which otherwise means the
    /// reader's end.
    pub async fn send_from<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
        max: usize,
    ) -> Result<Relayed, StreamClosed> {
        future::poll_fn(|cx| self.poll_send_from(cx, reader, max)).await
    }

    fn poll_send_from<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        max: usize,
    ) -> Poll<Result<Relayed, StreamClosed>> {
        let mut s = self.shared.borrow_mut();
        let s = &mut *s;
        if let Some(e) = s.ended(self.id) {
            return Poll::Ready(Err(e));
        }
        if max == 0 {
            return Poll::Ready(Ok(Relayed::Read(Ok(0))));
        }
        // The read runs inside the borrow: it touches only `reader` and
        // the lent room, and returns without waiting.
        let mut read = Poll::Pending;
        let queued = s.mux.send_with(self.id, max, |room| {
            read = Pin::new(&mut *reader).poll_read(cx, room);
            match read {
                Poll::Ready(Ok(n)) => n,
                _ => 0,
            }
        });
        match queued {
            Ok(None) => Poll::Ready(Ok(Relayed::Full)),
            Ok(Some(_)) => match read {
                Poll::Ready(Ok(n)) => {
                    if n > 0 {
                        wake(&mut s.driver_waker);
                    }
                    Poll::Ready(Ok(Relayed::Read(Ok(n))))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Ok(Relayed::Read(Err(e)))),
                Poll::Pending => {
                    // Woken by the reader, or by a reset or the session's
                    // end (both wake the write waker).
                    if let Some(slot) = s.slots.get_mut(&self.id) {
                        store(&mut slot.write_waker, cx);
                    }
                    Poll::Pending
                }
            },
            Err(StreamError::AlreadyFinished) => Poll::Ready(Err(StreamClosed::Finished)),
            Err(e) => Poll::Ready(Err(StreamClosed::Reset { code: ResetCode::Internal, message: e.to_string() })),
        }
    }

    /// Waits until [`Stream::send_from`] may queue bytes again: credit
    /// and room in the transmit buffer.
    pub async fn writable(&mut self) -> Result<(), StreamClosed> {
        future::poll_fn(|cx| {
            let mut s = self.shared.borrow_mut();
            let s = &mut *s;
            if let Some(e) = s.ended(self.id) {
                return Poll::Ready(Err(e));
            }
            if s.mux.send_capacity(self.id) > 0 {
                return Poll::Ready(Ok(()));
            }
            s.wait_for_room(self.id, cx);
            Poll::Pending
        })
        .await
    }

    /// Writes all of `data`, waiting for credit as needed.
    pub async fn write_all(&mut self, mut data: &[u8]) -> Result<(), StreamClosed> {
        while !data.is_empty() {
            let n = future::poll_fn(|cx| self.poll_send(cx, data)).await?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Half-closes: no more data from this side. Idempotent.
    pub fn finish(&mut self) {
        let mut s = self.shared.borrow_mut();
        if s.mux.finish(self.id).is_ok() {
            s.dispatch();
        }
    }

    /// Resolves once the stream is reset (by either side) or the session
    /// closes; never on a clean `End`. Lets a task blocked elsewhere (an
    /// idle watch waiting on the API server) notice that nobody listens
    /// any more. Do not poll it while another task reads this stream: both
    /// wait on the same waker slot.
    pub async fn closed(&self) -> StreamClosed {
        future::poll_fn(|cx| {
            let mut s = self.shared.borrow_mut();
            let s = &mut *s;
            let closed = s.closed.clone();
            let Some(slot) = s.slots.get_mut(&self.id) else {
                return Poll::Ready(StreamClosed::Session(s.session_error()));
            };
            if let Some((code, message)) = slot.reset.clone() {
                return Poll::Ready(StreamClosed::Reset { code, message });
            }
            if let Some(e) = closed {
                return Poll::Ready(StreamClosed::Session(e));
            }
            store(&mut slot.read_waker, cx);
            Poll::Pending
        })
        .await
    }

    /// Abandons the stream; the peer sees `Reset` with `code`.
    pub fn reset(&mut self, code: ResetCode, message: &str) {
        let mut s = self.shared.borrow_mut();
        s.mux.reset(self.id, code, message);
        if let Some(slot) = s.slots.get_mut(&self.id) {
            slot.reset.get_or_insert((code, message.to_string()));
        }
        s.dispatch();
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let Ok(mut s) = self.shared.try_borrow_mut() else { return };
        s.mux.reset(self.id, ResetCode::Cancel, "stream dropped");
        s.slots.remove(&self.id);
        if s.mux.is_drained() {
            s.mux.shutdown_drained();
        }
        s.dispatch();
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut s = this.shared.borrow_mut();
        let s = &mut *s;
        let Some(slot) = s.slots.get_mut(&this.id) else {
            return Poll::Ready(Err(StreamClosed::Session(s.session_error()).into()));
        };
        if let Some(front) = slot.recv.front() {
            let avail = &front[slot.offset..];
            let n = avail.len().min(buf.len());
            buf[..n].copy_from_slice(&avail[..n]);
            slot.offset += n;
            if slot.offset == front.len() {
                slot.recv.pop_front();
                slot.offset = 0;
            }
            s.mux.consume(this.id, n);
            s.dispatch();
            return Poll::Ready(Ok(n));
        }
        // A reset after the peer's End only refuses our further data: what
        // the peer sent is complete, so reading ends cleanly.
        if slot.ended {
            return Poll::Ready(Ok(0));
        }
        if let Some((code, message)) = slot.reset.clone() {
            return Poll::Ready(Err(StreamClosed::Reset { code, message }.into()));
        }
        if let Some(e) = &s.closed {
            return Poll::Ready(Err(StreamClosed::Session(e.clone()).into()));
        }
        store(&mut slot.read_waker, cx);
        Poll::Pending
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_send(cx, buf).map_err(io::Error::from)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Data is handed to the session's writer as soon as it is accepted.
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().finish();
        Poll::Ready(Ok(()))
    }
}
