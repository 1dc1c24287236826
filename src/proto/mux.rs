//! The multiplexer: one tunnel session's state machine.
//!
//! Sans-IO in the manner of quinn-proto: bytes and `now` go in through
//! [`Mux::handle_input`] (or read in place: [`Mux::input_buffer`] and
//! [`Mux::handle_read`]) and [`Mux::handle_timeout`]; bytes to send come
//! out of [`Mux::take_transmit`], events out of [`Mux::poll_event`], and
//! the next deadline out of [`Mux::poll_timeout`]. It owns no socket,
//! reads no clock and never blocks, so both the agent and the hub drive
//! the same code and tests run it with a virtual clock.
//!
//! What it does not do: buffer application data beyond the credit the
//! peer granted, interpret HTTP, or know about TLS.
//!
//! # Sending: control first, data in turns
//!
//! Control frames (`Open`, `Head`, `Window`, `End`, `Reset`, `Ping`,
//! `Pong`, `GoAway`) are encoded at once into a small buffer that always
//! leaves first. Data waits in per-stream queues ([`super::sched`]) and
//! is encoded only when the driver asks for bytes
//! ([`Mux::poll_transmit`]): streams take turns of one
//! [`super::sched::QUANTUM`] each. So a `kubectl get` answered while
//! another stream downloads gigabytes leaves within one quantum, and the
//! driver, which asks for a little at a time and keeps the socket's unsent
//! bytes low, leaves the order to this scheduler.
//!
//! # Session
//!
//! ```text
//!  agent                                   hub
//!    │ ── Hello{version, windows, limits} ──► │
//!    │ ◄── Welcome{keepalive, windows, ...} ─ │   both: Connected
//!    │ ◄── Deadline{dead_after} ───────────── │   if Hello announced CAP_DEADLINE
//!    │ ◄── ReplicaSet{this, replicas} ──────── │   if Hello announced CAP_REPLICAS
//!    │ ◄── ReplicaSet ... (on each change) ─── │     and the hub knows a set
//!    │ ◄─────── streams, Ping/Pong ─────────► │
//!    │ ◄──────── GoAway{last_id, code} ────── │   no new streams; in-flight finish
//! ```
//!
//! # A stream
//!
//! ```text
//!            open()/Open                 finish()/End sent
//!   (none) ────────────► Open ─────────────────────────► LocalEnded ──┐
//!                          │   End received                            │ End received
//!                          └────────────────► RemoteEnded ─────────────┤ / finish()
//!                                                                      ▼
//!      Reset sent or received, from any state ───────────────────► (removed)
//! ```
//!
//! The opener sends `Open` (request head) and then `Data`; the acceptor
//! answers `Head` (response head) once, before any `Data` of its own.
//!
//! # Flow control
//!
//! Each side announces its per-stream receive window in the handshake.
//! A sender may have at most that many unacknowledged `Data` bytes in
//! flight on a stream; the receiver returns credit with `Window` as the
//! application consumes data ([`Mux::consume`]), in batches of at least
//! half a window. There is no connection-level window: a stream whose
//! reader stalls runs out of its own credit and stops alone, while other
//! streams and the keepalive go on. Data beyond the credit, or a `Window`
//! that would push credit past [`MAX_WINDOW`], resets that stream.
//!
//! # Errors
//!
//! A stream error (bad order within a stream, flow-control breach,
//! refused open) resets only that stream. A session error (undecodable
//! bytes, a frame for a stream id that was never opened, a broken
//! handshake, silence past the dead-peer deadline) sends `GoAway` with the
//! reason and ends the session with [`Event::Closed`].

use super::codec::{self, DecodeError, Decoder, InputBuf};
use super::frame::*;
use super::sched::{QUANTUM, SendQueue};
use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

/// Tunables for one session. The receive-side values are announced to the
/// peer in the handshake.
#[derive(Clone, Debug)]
pub struct Config {
    /// Per-stream receive window announced to the peer.
    pub initial_window: u32,
    /// How many peer-opened streams may be live at once.
    pub max_streams: u32,
    /// Largest frame accepted from the peer.
    pub max_frame: u32,
    /// Ping interval. The hub's value wins: it is sent in `Welcome`.
    pub keepalive: Duration,
    /// Silence longer than this means the peer is gone. The hub's value
    /// wins too: it follows `Welcome` in a `Deadline` frame, or is taken
    /// as three keepalive intervals from a hub that sends none.
    pub dead_after: Duration,
    /// `send_data` accepts nothing while this many data bytes wait to be
    /// sent, except that a stream with less than a quantum queued may
    /// always queue up to one (while the total stays under twice this),
    /// so a small answer never waits for a bulk backlog to drain first.
    pub max_tx_buffer: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            initial_window: DEFAULT_INITIAL_WINDOW,
            max_streams: DEFAULT_MAX_STREAMS,
            max_frame: MAX_FRAME_LEN,
            // Edge links: a dead tunnel is noticed within seconds, at a
            // cost of one tiny frame each way every interval.
            keepalive: DEFAULT_KEEPALIVE,
            dead_after: DEFAULT_DEAD_AFTER,
            max_tx_buffer: 256 * 1024,
        }
    }
}

/// Default ping interval (the hub's `--keepalive`).
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(5);
/// Default dead-peer deadline (the hub's `--dead-after`): three missed
/// pings.
pub const DEFAULT_DEAD_AFTER: Duration = Duration::from_secs(15);

/// What the agent tells the hub about itself in `Hello`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentInfo {
    pub agent_version: String,
    pub arch: String,
    pub kube_version: String,
    pub node_count: u32,
}

/// Why a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionError {
    /// The peer's bytes could not be framed.
    Decode(DecodeError),
    /// The peer broke a session rule; the text says which.
    Protocol(String),
    /// The peer speaks another protocol version.
    UnsupportedVersion(u16),
    /// Nothing arrived within the dead-peer deadline.
    Timeout,
    /// The transport ended (EOF or I/O error reported by the driver).
    ConnectionLost(String),
    /// The peer sent `GoAway` and every stream has finished, or it closed
    /// the session with a reason.
    GoAway { code: GoAwayCode, message: String },
    /// This side closed the session.
    Local { code: GoAwayCode, message: String },
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionError::Decode(e) => write!(f, "undecodable input: {e}"),
            SessionError::Protocol(why) => write!(f, "protocol violation: {why}"),
            SessionError::UnsupportedVersion(v) => {
                write!(f, "peer speaks protocol version {v}, this side speaks {PROTOCOL_VERSION}")
            }
            SessionError::Timeout => write!(f, "peer silent past the keepalive deadline"),
            SessionError::ConnectionLost(why) => write!(f, "connection lost: {why}"),
            SessionError::GoAway { code, message } => write!(f, "peer went away ({code:?}): {message}"),
            SessionError::Local { code, message } => write!(f, "closed locally ({code:?}): {message}"),
        }
    }
}

impl std::error::Error for SessionError {}

/// Why an application call on a stream was refused. Local misuse or
/// session state; never caused by peer bytes directly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamError {
    /// No live stream with this id (never opened, finished or reset).
    Unknown(StreamId),
    /// The handshake has not completed yet.
    NotConnected,
    /// The session is closed.
    Closed,
    /// A `GoAway` was sent or received: no new streams.
    GoingAway,
    /// The peer's concurrent stream limit is reached.
    TooManyStreams,
    /// This side already sent `End` on the stream.
    AlreadyFinished,
    /// The acceptor must send its head before data, and only once; the
    /// opener never sends one.
    HeadOrder,
    /// A head breaks the header limits.
    Limits(&'static str),
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::Unknown(id) => write!(f, "no live stream {}", id.0),
            StreamError::NotConnected => write!(f, "session handshake not complete"),
            StreamError::Closed => write!(f, "session closed"),
            StreamError::GoingAway => write!(f, "session going away: no new streams"),
            StreamError::TooManyStreams => write!(f, "peer's concurrent stream limit reached"),
            StreamError::AlreadyFinished => write!(f, "stream already finished"),
            StreamError::HeadOrder => write!(f, "response head out of order"),
            StreamError::Limits(why) => write!(f, "head over limits: {why}"),
        }
    }
}

impl std::error::Error for StreamError {}

/// What the session tells its application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Handshake complete. The hub sees the agent's `Hello`; the agent
    /// sees the hub's `Welcome` (its `hello` field is then `None`).
    Connected { hello: Option<Hello>, welcome: Welcome },
    /// The peer opened a stream.
    Opened { id: StreamId, head: RequestHead },
    /// The response head on a stream this side opened.
    Head { id: StreamId, head: ResponseHead },
    /// Data arrived. Call [`Mux::consume`] once it has been used.
    Data { id: StreamId, data: Vec<u8> },
    /// The peer will send no more data on this stream.
    End { id: StreamId },
    /// The stream is gone (reset by the peer, or by this side because the
    /// peer broke a stream rule). No further events for this id.
    Reset { id: StreamId, code: ResetCode, message: String },
    /// Credit arrived on a stream that had none.
    Writable { id: StreamId },
    /// Answer to our ping.
    Pong { rtt: Duration },
    /// The peer sent `GoAway`: open no new streams; in-flight ones go on.
    GoAway { code: GoAwayCode, message: String },
    /// Agent: the hub told its replica set, or sent one that breaks the
    /// rules of [`ReplicaSet::validate`] (the session goes on; the agent
    /// keeps the set it had).
    ReplicaSet(Result<ReplicaSet, ReplicaSetError>),
    /// The session is over. Always the last event.
    Closed { error: SessionError },
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Handshake,
    Open,
    Closed,
}

/// Per-stream bookkeeping; kept small because an idle watch costs one.
#[derive(Debug)]
struct Stream {
    /// Bytes we may still send.
    send_credit: u32,
    /// Bytes the peer may still send.
    recv_window: u32,
    /// Bytes the application consumed but we have not granted back.
    unacked: u32,
    local_end: bool,
    remote_end: bool,
    /// Acceptor: head sent. Opener: head received.
    head: bool,
}

/// One tunnel session. See the module docs.
pub struct Mux {
    side: Side,
    config: Config,
    state: State,
    decoder: Decoder,
    /// Encoded control frames: they leave before any queued data.
    ctrl: Vec<u8>,
    /// Data accepted from the application, sent in round-robin turns.
    sendq: SendQueue,
    events: VecDeque<Event>,
    streams: StreamMap<Stream>,
    /// Next id this side will open.
    next_local: u32,
    /// Highest id the peer opened so far (0: none).
    last_peer: u32,
    /// Live streams opened by each side.
    local_open: u32,
    peer_open: u32,
    /// Limits learned from the peer's handshake frame.
    peer_window: u32,
    peer_max_streams: u32,
    peer_max_frame: u32,
    keepalive: Duration,
    last_recv: Instant,
    next_ping: Instant,
    ping: Option<(u64, Instant)>,
    ping_seq: u64,
    goaway_sent: bool,
    goaway_received: Option<(GoAwayCode, String)>,
    session_id: u64,
    /// Hub: the agent announced [`CAP_REPLICAS`]. Agent: this side did.
    replicas_cap: bool,
    /// Hub: the replica set to tell a capable agent, sent right after the
    /// handshake and again whenever [`Mux::set_replicas`] changes it.
    replicas: Option<ReplicaSet>,
}

impl fmt::Debug for Mux {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mux")
            .field("side", &self.side)
            .field("state", &self.state)
            .field("streams", &self.streams.len())
            .field("ctrl", &self.ctrl.len())
            .field("queued", &self.sendq.bytes())
            .finish()
    }
}

impl Mux {
    /// The agent's end: queues `Hello` at once, announcing every optional
    /// feature this build has.
    pub fn agent(config: Config, info: AgentInfo, now: Instant) -> Self {
        Mux::agent_with_capabilities(config, info, CAP_DEADLINE | CAP_REPLICAS, now)
    }

    /// The agent's end announcing only `capabilities`: what an agent of an
    /// older release says (tests, and hubs that must serve such agents).
    pub fn agent_with_capabilities(config: Config, info: AgentInfo, capabilities: u64, now: Instant) -> Self {
        let mut mux = Mux::new(Side::Agent, config, now, 0);
        mux.replicas_cap = capabilities & CAP_REPLICAS != 0;
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: info.agent_version,
            arch: info.arch,
            kube_version: info.kube_version,
            node_count: info.node_count,
            capabilities,
            initial_window: mux.config.initial_window,
            max_streams: mux.config.max_streams,
            max_frame: mux.config.max_frame,
        };
        mux.queue(&Frame::Hello(hello));
        mux
    }

    /// The hub's end: waits for `Hello`, answers `Welcome` with this id.
    pub fn hub(config: Config, session_id: u64, now: Instant) -> Self {
        Mux::new(Side::Hub, config, now, session_id)
    }

    fn new(side: Side, config: Config, now: Instant, session_id: u64) -> Self {
        let max_frame = config.max_frame.min(MAX_FRAME_LEN);
        Mux {
            side,
            decoder: Decoder::new(max_frame),
            state: State::Handshake,
            ctrl: Vec::new(),
            sendq: SendQueue::default(),
            events: VecDeque::new(),
            streams: StreamMap::default(),
            next_local: if side == Side::Hub { 1 } else { 2 },
            last_peer: 0,
            local_open: 0,
            peer_open: 0,
            peer_window: 0,
            peer_max_streams: 0,
            // Until the peer says otherwise, send nothing bigger than the
            // smallest frame any v1 peer accepts.
            peer_max_frame: 64 * 1024,
            keepalive: config.keepalive,
            last_recv: now,
            next_ping: now + config.keepalive,
            ping: None,
            ping_seq: 0,
            goaway_sent: false,
            goaway_received: None,
            session_id,
            replicas_cap: false,
            replicas: None,
            config,
        }
    }

    /// Hub: the replica set this agent should know. Sent right after the
    /// handshake, or now if the session is open and the set differs from
    /// the last one sent; only to an agent that announced
    /// [`CAP_REPLICAS`] (others never hear of it). Ignored on the agent.
    pub fn set_replicas(&mut self, set: ReplicaSet) {
        if self.side != Side::Hub || self.replicas.as_ref() == Some(&set) {
            return;
        }
        let send = self.state == State::Open && self.replicas_cap && !self.goaway_sent;
        if send {
            self.queue(&Frame::ReplicaSet(set.clone()));
        }
        self.replicas = Some(set);
    }

    /// Hub: whether the agent announced [`CAP_REPLICAS`].
    pub fn peer_takes_replicas(&self) -> bool {
        self.side == Side::Hub && self.replicas_cap
    }

    pub fn side(&self) -> Side {
        self.side
    }

    /// True once the handshake is done and until the session closes.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// True when a `GoAway` went either way and no stream is left: the
    /// driver may close the transport.
    pub fn is_drained(&self) -> bool {
        (self.goaway_sent || self.goaway_received.is_some()) && self.streams.is_empty() && self.sendq.is_empty()
    }

    /// Ends a drained session (see [`Mux::is_drained`]) without another
    /// frame: both sides already know it is going away.
    pub fn shutdown_drained(&mut self) {
        if self.state == State::Closed || !self.is_drained() {
            return;
        }
        self.state = State::Closed;
        let error = match &self.goaway_received {
            Some((code, message)) => SessionError::GoAway { code: *code, message: message.clone() },
            None => SessionError::Local { code: GoAwayCode::ShuttingDown, message: "drained after GoAway".into() },
        };
        self.events.push_back(Event::Closed { error });
    }

    /// Live streams.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// The keepalive interval in force (the hub's, once connected).
    pub fn keepalive(&self) -> Duration {
        self.keepalive
    }

    /// The dead-peer deadline in force (the hub's, once connected).
    pub fn dead_after(&self) -> Duration {
        self.config.dead_after
    }

    /// Bytes waiting to be sent: control frames plus queued data (frame
    /// headers of the data not counted).
    pub fn pending_transmit(&self) -> usize {
        match self.state {
            State::Closed => self.ctrl.len(),
            _ => self.ctrl.len() + self.sendq.bytes(),
        }
    }

    /// Feeds bytes read from the transport.
    pub fn handle_input(&mut self, bytes: &[u8], now: Instant) {
        if self.state == State::Closed {
            return;
        }
        self.decoder.push(bytes);
        self.decode_input(now);
    }

    /// Lends the receive buffer for a read straight into it, so the
    /// transport's bytes are not copied a second time on their way in;
    /// give it back with [`Mux::handle_read`] (also after a failed read,
    /// with `0`).
    pub fn input_buffer(&mut self) -> InputBuf {
        self.decoder.lend()
    }

    /// Takes the lent buffer back with `n` bytes read into it, as
    /// [`Mux::handle_input`] takes bytes.
    pub fn handle_read(&mut self, lent: InputBuf, n: usize, now: Instant) {
        self.decoder.filled(lent, n);
        if self.state == State::Closed || n == 0 {
            return;
        }
        self.decode_input(now);
    }

    fn decode_input(&mut self, now: Instant) {
        self.last_recv = now;
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => {
                    self.handle_frame(frame, now);
                    if self.state == State::Closed {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let message = e.to_string();
                    self.fail(SessionError::Decode(e), GoAwayCode::ProtocolError, message);
                    return;
                }
            }
        }
        self.decoder.shrink();
    }

    /// Tells the mux the transport ended.
    pub fn handle_eof(&mut self, why: &str) {
        if self.state != State::Closed {
            self.state = State::Closed;
            let error = match &self.goaway_received {
                Some((code, message)) => SessionError::GoAway { code: *code, message: message.clone() },
                None => SessionError::ConnectionLost(why.to_string()),
            };
            self.events.push_back(Event::Closed { error });
        }
    }

    /// The next instant [`Mux::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Closed => None,
            State::Handshake => Some(self.last_recv + self.config.dead_after),
            State::Open => Some(self.next_ping.min(self.last_recv + self.config.dead_after)),
        }
    }

    /// Runs timers: pings and the dead-peer deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        if now >= self.last_recv + self.config.dead_after {
            self.fail(SessionError::Timeout, GoAwayCode::Timeout, "no frames within the keepalive deadline".into());
            return;
        }
        if self.state == State::Open && now >= self.next_ping {
            self.ping_seq += 1;
            self.ping = Some((self.ping_seq, now));
            self.queue(&Frame::Ping { nonce: self.ping_seq });
            self.next_ping = now + self.keepalive;
            // Once per interval: a big send ring unused since the last
            // tick is freed, so an idle session stays small.
            self.sendq.trim();
        }
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Appends bytes to send to `out`: every control frame first, then
    /// data in round-robin turns of one quantum per stream, until `out`
    /// has grown by at least `limit` bytes or nothing is left. Returns how
    /// many bytes were appended (0: nothing to send).
    ///
    /// Data stays queued here until asked for, so a driver that asks for a
    /// little at a time, as the socket takes it, lets later control frames
    /// and other streams' turns overtake a backlog.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>, limit: usize) -> usize {
        let start = out.len();
        out.extend_from_slice(&self.ctrl);
        self.ctrl.clear();
        // Once the session is closed only the control frames (the GoAway
        // that says why) are worth sending.
        if self.state != State::Closed {
            let chunk = self.data_chunk().min(QUANTUM);
            while out.len() - start < limit && self.sendq.poll(out, chunk) {}
        }
        out.len() - start
    }

    /// Everything there is to send (see [`Mux::poll_transmit`]), in
    /// `spare`, which is cleared first so buffers are reused.
    pub fn take_transmit(&mut self, mut spare: Vec<u8>) -> Vec<u8> {
        spare.clear();
        self.poll_transmit(&mut spare, usize::MAX);
        spare
    }

    /// Largest payload per `Data` frame the peer accepts.
    fn data_chunk(&self) -> usize {
        (self.peer_max_frame as usize).saturating_sub(16).clamp(1, MAX_DATA_CHUNK)
    }

    /// How many more data bytes stream `id` may queue (credit aside).
    fn queue_room(&self, id: StreamId) -> usize {
        let max = self.config.max_tx_buffer;
        let total = self.sendq.bytes();
        let room = max.saturating_sub(total);
        let mine = self.sendq.stream_bytes(id);
        // A stream with less than a quantum queued may go past a buffer
        // that bulk streams filled, so its answer is queued at once and
        // leaves in the next round instead of after the backlog.
        let reserve = if mine < QUANTUM { (QUANTUM - mine).min((2 * max).saturating_sub(total)) } else { 0 };
        room.max(reserve)
    }

    /// Whether [`Mux::open`] would take a stream now (the session's
    /// state, `GoAway`, the peer's stream limit): a caller that retries
    /// elsewhere asks first, and keeps its head instead of a copy.
    pub fn can_open(&self) -> Result<(), StreamError> {
        self.usable()?;
        if self.goaway_sent || self.goaway_received.is_some() {
            return Err(StreamError::GoingAway);
        }
        if self.local_open >= self.peer_max_streams {
            return Err(StreamError::TooManyStreams);
        }
        Ok(())
    }

    /// Opens a stream carrying a request head.
    pub fn open(&mut self, head: RequestHead) -> Result<StreamId, StreamError> {
        self.open_ref(&head.as_open())
    }

    /// [`Mux::open`] from a borrowed head: the same checks, and the same
    /// bytes ([`codec::encode_open`]), with no [`RequestHead`] built
    /// first (the hub's proxied requests).
    pub fn open_ref<'a, I>(&mut self, head: &codec::OpenHead<'a, I>) -> Result<StreamId, StreamError>
    where
        I: Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
    {
        self.can_open()?;
        if head.groups.len() > MAX_IDENTITY_ITEMS || head.extra.len() > MAX_IDENTITY_ITEMS {
            return Err(StreamError::Limits("too many identity groups or extras"));
        }
        let (count, bytes) = head.size();
        check_field_limits(count, bytes).map_err(StreamError::Limits)?;
        if self.next_local > u32::MAX - 2 {
            // Ids are never reused; a session that used them all must end.
            return Err(StreamError::GoingAway);
        }
        let id = StreamId(self.next_local);
        self.next_local += 2;
        if codec::encode_open(id, head, count, self.peer_max_frame, &mut self.ctrl).is_err() {
            return Err(StreamError::Limits("request head larger than the peer's frame limit"));
        }
        self.streams.insert(id, self.new_stream());
        self.local_open += 1;
        Ok(id)
    }

    /// Sends the response head on a stream the peer opened.
    pub fn send_head(&mut self, id: StreamId, head: ResponseHead) -> Result<(), StreamError> {
        let fields = head.headers.iter().map(|h| (h.name.as_slice(), h.value.as_slice()));
        self.send_head_fields(id, head.status, fields)
    }

    /// [`Mux::send_head`] from borrowed `(name, value)` fields: encoded
    /// straight into the transmit buffer, with no [`ResponseHead`] built
    /// first (the agent's answers come from the API server's head in its
    /// read buffer).
    pub fn send_head_fields<'a, I>(&mut self, id: StreamId, status: u16, fields: I) -> Result<(), StreamError>
    where
        I: Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
    {
        self.usable()?;
        let (count, bytes) = fields.clone().fold((0, 0), |(c, b), (n, v)| (c + 1, b + n.len() + v.len()));
        check_field_limits(count, bytes).map_err(StreamError::Limits)?;
        let side = self.side;
        let peer_max_frame = self.peer_max_frame;
        let s = self.streams.get_mut(&id).ok_or(StreamError::Unknown(id))?;
        if id.opener() == side || s.head {
            return Err(StreamError::HeadOrder);
        }
        if s.local_end {
            return Err(StreamError::AlreadyFinished);
        }
        if codec::encode_head_of(id, status, count, fields, peer_max_frame, &mut self.ctrl).is_err() {
            return Err(StreamError::Limits("response head larger than the peer's frame limit"));
        }
        s.head = true;
        Ok(())
    }

    /// How many bytes [`Mux::send_data`] would accept now.
    pub fn send_capacity(&self, id: StreamId) -> usize {
        match self.streams.get(&id) {
            Some(s) if self.state == State::Open && !s.local_end => (s.send_credit as usize).min(self.queue_room(id)),
            _ => 0,
        }
    }

    /// Queues as much of `data` as credit and the transmit buffer allow;
    /// returns how many bytes were taken (possibly 0: wait for
    /// [`Event::Writable`] or for the transmit buffer to drain).
    pub fn send_data(&mut self, id: StreamId, data: &[u8]) -> Result<usize, StreamError> {
        let credit = self.send_checks(id)?;
        let n = data.len().min(credit).min(self.queue_room(id));
        self.sendq.push(id, &data[..n]);
        self.take_credit(id, n);
        Ok(n)
    }

    /// [`Mux::send_data`] with the bytes written in place: `write` gets
    /// the free run at the end of the stream's send queue (at most `max`
    /// bytes, within credit and the transmit buffer) and returns how many
    /// bytes it put there, which are queued as `send_data` queues them.
    /// Saves the copy from the caller's buffer: the agent reads an API
    /// server's body straight into it. `Ok(None)`, without calling
    /// `write`, when nothing may be queued now (as `send_data`'s `Ok(0)`).
    pub fn send_with(
        &mut self,
        id: StreamId,
        max: usize,
        write: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<Option<usize>, StreamError> {
        let credit = self.send_checks(id)?;
        let max = max.min(credit).min(self.queue_room(id));
        if max == 0 {
            return Ok(None);
        }
        let n = self.sendq.fill(id, max, write);
        debug_assert!(n <= max, "wrote past the room it was lent");
        self.take_credit(id, n.min(max));
        Ok(Some(n))
    }

    /// The checks every send and `finish` make: the session usable, the
    /// stream known and not finished, and on the accepting side its head
    /// sent first. Returns the stream's credit.
    fn send_checks(&self, id: StreamId) -> Result<usize, StreamError> {
        self.usable()?;
        let s = self.streams.get(&id).ok_or(StreamError::Unknown(id))?;
        if s.local_end {
            return Err(StreamError::AlreadyFinished);
        }
        if id.opener() != self.side && !s.head {
            return Err(StreamError::HeadOrder);
        }
        Ok(s.send_credit as usize)
    }

    /// Spends `n` bytes of a stream's credit, once they are queued.
    fn take_credit(&mut self, id: StreamId, n: usize) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.send_credit -= n as u32;
        }
    }

    /// Half-closes: this side sends no more data on the stream.
    pub fn finish(&mut self, id: StreamId) -> Result<(), StreamError> {
        self.send_checks(id)?;
        if let Some(s) = self.streams.get_mut(&id) {
            s.local_end = true;
        }
        // End follows the stream's queued data; with none queued it is a
        // control frame like any other.
        if !self.sendq.then(id, &Frame::End { id }) {
            self.queue(&Frame::End { id });
        }
        self.maybe_remove(id);
        Ok(())
    }

    /// Abandons a stream. Unknown ids are ignored: the stream may have
    /// ended on its own a moment ago.
    pub fn reset(&mut self, id: StreamId, code: ResetCode, message: &str) {
        let Some(s) = self.streams.get(&id) else { return };
        if self.state == State::Closed {
            return;
        }
        let frame = Frame::Reset { id, code, message: truncate(message, 1024) };
        // After this side's End the data is complete: it still goes out,
        // and the Reset follows it, refusing only the peer's further data.
        if s.local_end && self.sendq.then(id, &frame) {
            self.forget(id);
            return;
        }
        self.queue(&frame);
        self.remove(id);
    }

    /// Returns `n` bytes of credit on a stream once the application has
    /// used them. Window frames are batched to half a window.
    pub fn consume(&mut self, id: StreamId, n: usize) {
        if self.state == State::Closed {
            return;
        }
        let threshold = (self.config.initial_window / 2).max(1);
        let Some(s) = self.streams.get_mut(&id) else { return };
        if s.remote_end {
            return;
        }
        s.unacked = s.unacked.saturating_add(n as u32);
        if s.unacked >= threshold {
            let increment = s.unacked;
            s.unacked = 0;
            s.recv_window = s.recv_window.saturating_add(increment);
            self.queue(&Frame::Window { id, increment });
        }
    }

    /// Sends `GoAway`: no new streams either way; in-flight ones finish.
    pub fn go_away(&mut self, code: GoAwayCode, message: &str) {
        if self.state == State::Closed || self.goaway_sent {
            return;
        }
        self.goaway_sent = true;
        self.queue(&Frame::GoAway { last_id: StreamId(self.last_peer), code, message: truncate(message, 1024) });
    }

    /// Ends the session now with `GoAway`; every stream is dropped.
    pub fn close(&mut self, code: GoAwayCode, message: &str) {
        if self.state == State::Closed {
            return;
        }
        self.fail(SessionError::Local { code, message: message.to_string() }, code, message.to_string());
    }

    fn usable(&self) -> Result<(), StreamError> {
        match self.state {
            State::Handshake => Err(StreamError::NotConnected),
            State::Closed => Err(StreamError::Closed),
            State::Open => Ok(()),
        }
    }

    fn new_stream(&self) -> Stream {
        Stream {
            send_credit: self.peer_window,
            recv_window: self.config.initial_window,
            unacked: 0,
            local_end: false,
            remote_end: false,
            head: false,
        }
    }

    fn queue(&mut self, frame: &Frame) {
        // Control frames are tiny and bounded in count by the streams and
        // credit that caused them, so they bypass the transmit limit.
        if let Err(e) = codec::encode(frame, u32::MAX, &mut self.ctrl) {
            log::error!("dropping unencodable frame: {e}");
        }
    }

    fn fail(&mut self, error: SessionError, code: GoAwayCode, message: String) {
        if self.state == State::Closed {
            return;
        }
        self.queue(&Frame::GoAway { last_id: StreamId(self.last_peer), code, message: truncate(&message, 1024) });
        self.goaway_sent = true;
        self.state = State::Closed;
        self.streams.clear();
        self.sendq.clear();
        self.local_open = 0;
        self.peer_open = 0;
        self.events.push_back(Event::Closed { error });
    }

    fn violation(&mut self, why: String) {
        self.fail(SessionError::Protocol(why.clone()), GoAwayCode::ProtocolError, why);
    }

    fn stream_violation(&mut self, id: StreamId, why: &str) {
        log::debug!("resetting stream {}: {why}", id.0);
        self.queue(&Frame::Reset { id, code: ResetCode::StreamProtocol, message: why.to_string() });
        self.remove(id);
        self.events.push_back(Event::Reset { id, code: ResetCode::StreamProtocol, message: why.to_string() });
    }

    /// Forgets a reset stream, with whatever data it still had queued.
    fn remove(&mut self, id: StreamId) {
        self.sendq.discard(id);
        self.forget(id);
    }

    /// Forgets a stream's state; its queued data, if any, still goes out.
    fn forget(&mut self, id: StreamId) {
        if self.streams.remove(&id).is_some() {
            if id.opener() == self.side {
                self.local_open -= 1;
            } else {
                self.peer_open -= 1;
            }
        }
    }

    fn maybe_remove(&mut self, id: StreamId) {
        if let Some(s) = self.streams.get(&id) {
            if s.local_end && s.remote_end {
                self.forget(id);
            }
        }
    }

    /// Whether `id` names a stream that existed once but is gone. Frames
    /// for such ids are late arrivals after a reset and are dropped.
    fn was_live(&self, id: StreamId) -> bool {
        if id.0 == 0 {
            return false;
        }
        if id.opener() == self.side { id.0 < self.next_local } else { id.0 <= self.last_peer }
    }

    fn handle_frame(&mut self, frame: Frame, now: Instant) {
        if self.state == State::Handshake {
            return self.handle_handshake(frame, now);
        }
        if let Some(id) = frame.stream_id() {
            if !matches!(frame, Frame::Open { .. }) && !self.streams.contains_key(&id) {
                if !self.was_live(id) {
                    self.violation(format!("frame for stream {} that was never opened", id.0));
                }
                return;
            }
        }
        match frame {
            Frame::Hello(_) | Frame::Welcome(_) => self.violation("second handshake frame".into()),
            Frame::Open { id, head } => self.handle_open(id, head),
            Frame::Head { id, head } => {
                let side = self.side;
                let s = self.streams.get_mut(&id).expect("checked above");
                if id.opener() != side || s.head {
                    self.stream_violation(id, "response head on the wrong side or twice");
                } else if let Err(why) = check_head_limits(&head.headers, None) {
                    self.stream_violation(id, why);
                } else {
                    s.head = true;
                    self.events.push_back(Event::Head { id, head });
                }
            }
            Frame::Data { id, data } => {
                let side = self.side;
                let s = self.streams.get_mut(&id).expect("checked above");
                if s.remote_end {
                    self.stream_violation(id, "data after end of stream");
                } else if id.opener() == side && !s.head {
                    self.stream_violation(id, "data before the response head");
                } else if data.len() > s.recv_window as usize {
                    let why = format!("{} bytes of data past a credit of {}", data.len(), s.recv_window);
                    self.stream_violation(id, &why);
                } else {
                    s.recv_window -= data.len() as u32;
                    if !data.is_empty() {
                        self.events.push_back(Event::Data { id, data });
                    }
                }
            }
            Frame::Window { id, increment } => {
                let s = self.streams.get_mut(&id).expect("checked above");
                match s.send_credit.checked_add(increment) {
                    Some(credit) if credit <= MAX_WINDOW => {
                        let was_empty = s.send_credit == 0;
                        s.send_credit = credit;
                        if was_empty && increment > 0 && !s.local_end {
                            self.events.push_back(Event::Writable { id });
                        }
                    }
                    _ => self.stream_violation(id, "window increment overflows the credit"),
                }
            }
            Frame::End { id } => {
                let side = self.side;
                let s = self.streams.get_mut(&id).expect("checked above");
                if s.remote_end {
                    self.stream_violation(id, "end of stream twice");
                } else if id.opener() == side && !s.head {
                    self.stream_violation(id, "end before the response head");
                } else {
                    s.remote_end = true;
                    self.events.push_back(Event::End { id });
                    self.maybe_remove(id);
                }
            }
            Frame::Reset { id, code, message } => {
                self.remove(id);
                self.events.push_back(Event::Reset { id, code, message });
            }
            Frame::Ping { nonce } => self.queue(&Frame::Pong { nonce }),
            Frame::Pong { nonce } => {
                if let Some((sent, at)) = self.ping {
                    if sent == nonce {
                        self.ping = None;
                        self.events.push_back(Event::Pong { rtt: now.saturating_duration_since(at) });
                    }
                }
            }
            Frame::GoAway { last_id, code, message } => self.handle_goaway(last_id, code, message),
            Frame::Deadline { dead_after_ms } => {
                if self.side == Side::Hub {
                    return self.violation("Deadline frame from the agent".into());
                }
                // Never below two intervals: a deadline shorter than the
                // ping interval would end every quiet session.
                self.config.dead_after = Duration::from_millis(dead_after_ms as u64).max(self.keepalive * 2);
            }
            Frame::ReplicaSet(set) => {
                if self.side == Side::Hub {
                    return self.violation("ReplicaSet frame from the agent".into());
                }
                if !self.replicas_cap {
                    return self.violation("ReplicaSet frame though this agent did not announce CAP_REPLICAS".into());
                }
                // A bad set is the hub's mistake about its peers, not about
                // this session: report it and carry on.
                let checked = set.validate().map(|()| set);
                self.events.push_back(Event::ReplicaSet(checked));
            }
        }
    }

    fn handle_handshake(&mut self, frame: Frame, now: Instant) {
        match (self.side, frame) {
            (Side::Hub, Frame::Hello(hello)) => {
                if hello.protocol_version != PROTOCOL_VERSION {
                    let v = hello.protocol_version;
                    let message = format!("protocol version {v} not supported; this hub speaks {PROTOCOL_VERSION}");
                    self.fail(SessionError::UnsupportedVersion(v), GoAwayCode::UnsupportedVersion, message);
                    return;
                }
                if let Err(why) = self.learn_peer(hello.initial_window, hello.max_streams, hello.max_frame) {
                    return self.violation(why);
                }
                let welcome = Welcome {
                    session_id: self.session_id,
                    keepalive_ms: self.config.keepalive.as_millis().min(u32::MAX as u128) as u32,
                    initial_window: self.config.initial_window,
                    max_streams: self.config.max_streams,
                    max_frame: self.config.max_frame.min(MAX_FRAME_LEN),
                };
                self.queue(&Frame::Welcome(welcome.clone()));
                if hello.capabilities & CAP_DEADLINE != 0 {
                    let dead_after_ms = self.config.dead_after.as_millis().min(u32::MAX as u128) as u32;
                    self.queue(&Frame::Deadline { dead_after_ms });
                }
                self.replicas_cap = hello.capabilities & CAP_REPLICAS != 0;
                if self.replicas_cap {
                    if let Some(set) = self.replicas.clone() {
                        self.queue(&Frame::ReplicaSet(set));
                    }
                }
                self.open_session(now);
                self.events.push_back(Event::Connected { hello: Some(hello), welcome });
            }
            (Side::Agent, Frame::Welcome(welcome)) => {
                if let Err(why) = self.learn_peer(welcome.initial_window, welcome.max_streams, welcome.max_frame) {
                    return self.violation(why);
                }
                if welcome.keepalive_ms > 0 {
                    self.keepalive = Duration::from_millis(welcome.keepalive_ms as u64);
                    // Three missed pings, unless a `Deadline` frame follows
                    // with the hub's own setting.
                    self.config.dead_after = self.keepalive * 3;
                }
                self.session_id = welcome.session_id;
                self.open_session(now);
                self.events.push_back(Event::Connected { hello: None, welcome });
            }
            (_, Frame::GoAway { code, message, .. }) => {
                // A hub may refuse the agent right away (deregistered,
                // unsupported version): report its reason, not a violation.
                self.state = State::Closed;
                self.events.push_back(Event::Closed { error: SessionError::GoAway { code, message } });
            }
            (_, other) => {
                let what = frame_name(&other);
                self.violation(format!("{what} frame before the handshake completed"));
            }
        }
    }

    fn learn_peer(&mut self, window: u32, max_streams: u32, max_frame: u32) -> Result<(), String> {
        if window > MAX_WINDOW {
            return Err(format!("initial window {window} exceeds {MAX_WINDOW}"));
        }
        if max_frame < 1024 {
            return Err(format!("maximum frame {max_frame} is below the 1024-byte floor"));
        }
        self.peer_window = window;
        self.peer_max_streams = max_streams;
        self.peer_max_frame = max_frame.min(MAX_FRAME_LEN);
        Ok(())
    }

    fn open_session(&mut self, now: Instant) {
        self.state = State::Open;
        self.next_ping = now + self.keepalive;
    }

    fn handle_open(&mut self, id: StreamId, head: RequestHead) {
        if id.opener() == self.side || id.0 == 0 {
            return self.violation(format!("peer opened stream {} with this side's parity", id.0));
        }
        if id.0 <= self.last_peer {
            return self.violation(format!("stream {} opened out of order or twice", id.0));
        }
        self.last_peer = id.0;
        if self.goaway_sent {
            self.queue(&Frame::Reset { id, code: ResetCode::Refused, message: "session going away".into() });
            return;
        }
        if self.peer_open >= self.config.max_streams {
            let message = format!("over the limit of {} concurrent streams", self.config.max_streams);
            self.queue(&Frame::Reset { id, code: ResetCode::Refused, message });
            return;
        }
        if let Err(why) = check_head_limits(&head.headers, Some(&head.identity)) {
            self.queue(&Frame::Reset { id, code: ResetCode::StreamProtocol, message: why.into() });
            return;
        }
        self.streams.insert(id, self.new_stream());
        self.peer_open += 1;
        self.events.push_back(Event::Opened { id, head });
    }

    fn handle_goaway(&mut self, last_id: StreamId, code: GoAwayCode, message: String) {
        // Our streams the peer never accepted: refused, safe to retry.
        let side = self.side;
        let refused: Vec<StreamId> =
            self.streams.keys().copied().filter(|id| id.opener() == side && id.0 > last_id.0).collect();
        for id in refused {
            self.remove(id);
            self.events.push_back(Event::Reset { id, code: ResetCode::Refused, message: "peer going away".into() });
        }
        if code == GoAwayCode::ProtocolError || code == GoAwayCode::Timeout || code == GoAwayCode::UnsupportedVersion {
            // The peer closed on an error: nothing more will come.
            self.state = State::Closed;
            self.streams.clear();
            self.events.push_back(Event::Closed { error: SessionError::GoAway { code, message } });
            return;
        }
        self.goaway_received = Some((code, message.clone()));
        self.events.push_back(Event::GoAway { code, message });
    }

    /// Bytes of heap held by this session beyond the struct itself, for
    /// tests that check memory stays bounded.
    pub fn memory_estimate(&self) -> usize {
        self.ctrl.capacity()
            + self.sendq.memory()
            + self.decoder.capacity()
            + self.streams.capacity() * (std::mem::size_of::<StreamId>() + std::mem::size_of::<Stream>() + 8)
            + self.events.capacity() * std::mem::size_of::<Event>()
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn frame_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello(_) => "Hello",
        Frame::Welcome(_) => "Welcome",
        Frame::Open { .. } => "Open",
        Frame::Head { .. } => "Head",
        Frame::Data { .. } => "Data",
        Frame::Window { .. } => "Window",
        Frame::End { .. } => "End",
        Frame::Reset { .. } => "Reset",
        Frame::Ping { .. } => "Ping",
        Frame::Pong { .. } => "Pong",
        Frame::GoAway { .. } => "GoAway",
        Frame::Deadline { .. } => "Deadline",
        Frame::ReplicaSet(_) => "ReplicaSet",
    }
}
