//! The frames of tunnel protocol v1 and the limits that bound them.
//!
//! A frame is what one side says to the other; [`super::codec`] turns it
//! into bytes. Nothing here does I/O or keeps state.

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks, sent in [`Hello`].
pub const PROTOCOL_VERSION: u16 = 1;

/// Hard ceiling on a frame's encoded length (the `u32` prefix excluded).
/// A peer may negotiate less; nobody may negotiate more. Checked before
/// anything is allocated.
pub const MAX_FRAME_LEN: u32 = 1 << 20;

/// Largest payload carried by one `Data` frame. Larger writes are split.
pub const MAX_DATA_CHUNK: usize = 32 * 1024;

/// Most header fields one request or response head may carry.
pub const MAX_HEADER_COUNT: usize = 256;

/// Most bytes (names + values + identity strings) one head may carry.
pub const MAX_HEADER_BYTES: usize = 256 * 1024;

/// Most groups, and most extra keys, an identity may carry.
pub const MAX_IDENTITY_ITEMS: usize = 256;

/// Default for how many streams one side lets the other open at once.
pub const DEFAULT_MAX_STREAMS: u32 = 4096;

/// Default per-stream receive window in bytes. It bounds how much of one
/// stream's bulk can sit in the receiver's path ahead of another stream's
/// small answer (one TCP stream carries them all), so it is kept small:
/// above the bandwidth-delay product of an edge link (20 Mbit/s at 40 ms
/// is 100 KB), and on loopback the e2e bench showed no bulk loss against
/// 256 KiB while small requests during a download waited half as long.
pub const DEFAULT_INITIAL_WINDOW: u32 = 128 * 1024;

/// Largest window a stream may ever have; a `Window` frame that would push
/// the credit past this is a protocol violation (it would overflow).
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

/// [`Hello::capabilities`] bit: the agent understands [`Frame::Deadline`],
/// so the hub follows its `Welcome` with one naming its dead-peer
/// deadline. Without it the agent takes three keepalive intervals.
pub const CAP_DEADLINE: u64 = 1;

/// [`Hello::capabilities`] bit: the agent understands [`Frame::ReplicaSet`]
/// and keeps a tunnel to every replica named in it, so the hub follows its
/// `Welcome` with the current set and sends it again whenever it changes.
pub const CAP_REPLICAS: u64 = 2;

/// Most replicas one [`ReplicaSet`] may name. A hub is a handful of
/// processes; a set longer than this is a broken or hostile hub, and an
/// agent dialling it all would spend its sockets and memory.
pub const MAX_REPLICAS: usize = 32;

/// Longest replica id in a [`ReplicaSet`], in bytes.
pub const MAX_REPLICA_ID: usize = 128;

/// Longest advertise URL in a [`ReplicaSet`], in bytes.
pub const MAX_REPLICA_URL: usize = 1024;

/// Identifies one stream within a session.
///
/// Hub-opened streams have odd ids, agent-opened streams even ids, so the
/// two sides never pick the same id. Id 0 is never a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StreamId(pub u32);

/// A map keyed by stream id: what the mux, the scheduler and the driver
/// look a stream up in, several times per frame.
pub type StreamMap<V> = std::collections::HashMap<StreamId, V, StreamIdHash>;

/// The hash of [`StreamMap`]: the id mixed with a random key by
/// SplitMix64's finaliser (two multiplications), instead of SipHash, which
/// was 4 % of the agent's instructions per request. The key is drawn per
/// map, so a peer that picks its stream ids cannot pick colliding ones
/// ahead of time.
#[derive(Clone, Debug)]
pub struct StreamIdHash {
    key: u64,
}

impl Default for StreamIdHash {
    fn default() -> Self {
        use std::hash::BuildHasher as _;
        StreamIdHash { key: std::collections::hash_map::RandomState::new().hash_one(0u8) }
    }
}

impl std::hash::BuildHasher for StreamIdHash {
    type Hasher = StreamIdHasher;
    fn build_hasher(&self) -> StreamIdHasher {
        StreamIdHasher { value: self.key }
    }
}

/// See [`StreamIdHash`].
#[derive(Debug)]
pub struct StreamIdHasher {
    value: u64,
}

impl std::hash::Hasher for StreamIdHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u32` is used (a `StreamId` is one u32); anything
        // else still hashes all its bytes.
        for &b in bytes {
            self.value = self.value.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.value ^= u64::from(n);
    }

    fn finish(&self) -> u64 {
        let mut z = self.value;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Which end of the tunnel a [`super::Mux`] drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The control plane: receives `Hello`, answers `Welcome`.
    Hub,
    /// The edge agent: dials out, sends `Hello`.
    Agent,
}

impl StreamId {
    /// The side that opened this stream.
    pub fn opener(self) -> Side {
        if self.0 % 2 == 1 { Side::Hub } else { Side::Agent }
    }
}

/// One header field. Both parts are raw bytes: HTTP header values are
/// not always UTF-8 (RFC 9110 §5.5 allows obs-text).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

impl Header {
    pub fn new(name: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Header { name: name.into(), value: value.into() }
    }
}

/// Who a request is made for: the name and groups the cluster will see in
/// `Impersonate-User`, `Impersonate-Group`, `Impersonate-Uid` and
/// `Impersonate-Extra-*`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub user: String,
    pub groups: Vec<String>,
    pub uid: Option<String>,
    /// `(key, values)` pairs for `Impersonate-Extra-KEY`.
    pub extra: Vec<(String, Vec<String>)>,
}

/// An HTTP request head as it travels from hub to agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHead {
    pub method: String,
    /// Path and query, e.g. `/api/v1/pods?limit=500`.
    pub path: String,
    pub headers: Vec<Header>,
    pub identity: Identity,
}

/// An HTTP response head as it travels from agent to hub.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: Vec<Header>,
}

/// What the agent says first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u16,
    pub agent_version: String,
    pub arch: String,
    pub kube_version: String,
    pub node_count: u32,
    /// Bit set of optional features added within v1 (`CAP_*`); a side
    /// uses one only when the other announced it.
    pub capabilities: u64,
    /// The agent's per-stream receive window (the hub's send credit).
    pub initial_window: u32,
    /// How many hub-opened streams the agent accepts at once.
    pub max_streams: u32,
    /// Largest frame the agent accepts.
    pub max_frame: u32,
}

/// The hub's answer to [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub session_id: u64,
    /// How often each side pings, in milliseconds.
    pub keepalive_ms: u32,
    /// The hub's per-stream receive window (the agent's send credit).
    pub initial_window: u32,
    /// How many agent-opened streams the hub accepts at once.
    pub max_streams: u32,
    /// Largest frame the hub accepts.
    pub max_frame: u32,
}

/// One hub replica as the agent is told of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    /// The replica's id (new at each start of the process).
    pub id: String,
    /// Where the agent reaches this replica itself: `https://host[:port]`.
    pub url: String,
}

/// The hub's replicas as the one sending it sees them: every live replica
/// (itself included) and which of them this tunnel reached.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaSet {
    /// The id of the replica at the hub end of this tunnel: the agent may
    /// have reached it through a load balancer and learns here where it
    /// landed, so it never opens a second tunnel to the same replica.
    pub this: String,
    pub replicas: Vec<ReplicaInfo>,
}

/// Why a [`ReplicaSet`] was refused. The agent keeps its tunnels as they
/// are and logs this; the session goes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaSetError {
    /// More than [`MAX_REPLICAS`] entries.
    TooMany(usize),
    /// An id that is empty, longer than [`MAX_REPLICA_ID`] or holds a
    /// control character or a space.
    BadId(String),
    /// Two entries with this id.
    DuplicateId(String),
    /// Two entries with this URL.
    DuplicateUrl(String),
    /// A URL that is not `https://host[:port][/path]` within
    /// [`MAX_REPLICA_URL`] bytes; the text says what is wrong.
    BadUrl { id: String, url: String, why: &'static str },
    /// `this` names no entry of the set.
    ThisMissing(String),
}

impl std::fmt::Display for ReplicaSetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let clip = |s: &str| -> String { s.chars().take(80).collect::<String>() };
        match self {
            ReplicaSetError::TooMany(n) => write!(f, "{n} replicas, over the limit of {MAX_REPLICAS}"),
            ReplicaSetError::BadId(id) => write!(
                f,
                "replica id {:?} is empty, longer than {MAX_REPLICA_ID} bytes or holds a control character or space",
                clip(id)
            ),
            ReplicaSetError::DuplicateId(id) => write!(f, "replica id {:?} appears twice", clip(id)),
            ReplicaSetError::DuplicateUrl(url) => write!(f, "advertise URL {:?} appears twice", clip(url)),
            ReplicaSetError::BadUrl { id, url, why } => {
                write!(f, "replica {:?} has advertise URL {:?}: {why}", clip(id), clip(url))
            }
            ReplicaSetError::ThisMissing(id) => {
                write!(f, "the sending replica {:?} is not in the set it sent", clip(id))
            }
        }
    }
}

impl std::error::Error for ReplicaSetError {}

impl ReplicaSet {
    /// Checks the set against the limits and the rules the agent relies
    /// on (unique ids and URLs, https URLs with a host, the sender in it).
    pub fn validate(&self) -> Result<(), ReplicaSetError> {
        if self.replicas.len() > MAX_REPLICAS {
            return Err(ReplicaSetError::TooMany(self.replicas.len()));
        }
        // At most MAX_REPLICAS entries: pairwise checks cost nothing and
        // keep hash sets out of the agent.
        for (i, r) in self.replicas.iter().enumerate() {
            if r.id.is_empty() || r.id.len() > MAX_REPLICA_ID || r.id.chars().any(|c| c.is_control() || c == ' ') {
                return Err(ReplicaSetError::BadId(r.id.clone()));
            }
            if let Err(why) = check_replica_url(&r.url) {
                return Err(ReplicaSetError::BadUrl { id: r.id.clone(), url: r.url.clone(), why });
            }
            let earlier = &self.replicas[..i];
            if earlier.iter().any(|e| e.id == r.id) {
                return Err(ReplicaSetError::DuplicateId(r.id.clone()));
            }
            if earlier.iter().any(|e| e.url.trim_end_matches('/') == r.url.trim_end_matches('/')) {
                return Err(ReplicaSetError::DuplicateUrl(r.url.clone()));
            }
        }
        if self.this_replica().is_none() {
            return Err(ReplicaSetError::ThisMissing(self.this.clone()));
        }
        Ok(())
    }

    /// The entry for the replica at the hub end of this tunnel.
    pub fn this_replica(&self) -> Option<&ReplicaInfo> {
        self.replicas.iter().find(|r| r.id == self.this)
    }
}

/// `https://host[:port][/path]`, nothing else: tunnels are TLS only, and a
/// URL with user info, a query or odd bytes is not an address a hub meant.
fn check_replica_url(url: &str) -> Result<(), &'static str> {
    if url.len() > MAX_REPLICA_URL {
        return Err("longer than the limit of 1024 bytes");
    }
    if url.bytes().any(|b| b <= b' ' || b >= 0x7f) {
        return Err("holds a space, a control character or a non-ASCII byte");
    }
    let Some(rest) = url.strip_prefix("https://") else {
        return Err("not an https:// URL");
    };
    let authority = rest.split('/').next().unwrap_or("");
    if authority.contains(['@', '?', '#']) || rest.contains(['?', '#']) {
        return Err("user info, a query or a fragment is not allowed");
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let Some((host, after)) = v6.split_once(']') else { return Err("unclosed [ in the host") };
            (host, after.strip_prefix(':').map(Some).unwrap_or(if after.is_empty() { None } else { Some("x") }))
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err("no host");
    }
    if let Some(p) = port {
        if p.parse::<u16>().map_or(true, |p| p == 0) {
            return Err("the port is not a number from 1 to 65535");
        }
    }
    Ok(())
}

/// Why a stream was reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResetCode {
    /// The application gave up on the stream (client went away, ...).
    Cancel,
    /// The stream was refused before any processing: too many streams or
    /// the session is going away. Safe to retry elsewhere.
    Refused,
    /// The peer broke the stream's rules (head twice, data before head).
    StreamProtocol,
    /// The request was refused by policy (empty identity, bad header).
    Forbidden,
    /// The agent could not reach the API server.
    Upstream,
    /// Anything else; the message says what.
    Internal,
}

/// Why a session is ending.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GoAwayCode {
    /// The cluster was deregistered: the agent must stop and not retry.
    Deregistered,
    /// The sender is shutting down; reconnect (to another hub) at once.
    ShuttingDown,
    /// The peer broke the protocol; the message says how.
    ProtocolError,
    /// The peer speaks a protocol version this side does not.
    UnsupportedVersion,
    /// Nothing heard from the peer within the keepalive deadline.
    Timeout,
    /// The credential was revoked or is unknown.
    Unauthorized,
}

/// One frame of tunnel protocol v1.
///
/// The variant order is the wire tag (postcard encodes the index as a
/// varint); never reorder, only append.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    Hello(Hello),
    Welcome(Welcome),
    Open {
        id: StreamId,
        head: RequestHead,
    },
    Head {
        id: StreamId,
        head: ResponseHead,
    },
    Data {
        id: StreamId,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Window {
        id: StreamId,
        increment: u32,
    },
    End {
        id: StreamId,
    },
    Reset {
        id: StreamId,
        code: ResetCode,
        message: String,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    GoAway {
        /// Highest peer-opened stream the sender accepted; streams above it
        /// were not processed and may be retried.
        last_id: StreamId,
        code: GoAwayCode,
        message: String,
    },
    /// Hub → agent, right after `Welcome`, only to an agent that announced
    /// [`CAP_DEADLINE`]: silence from the hub longer than this means the
    /// tunnel is dead. Appended within v1, so older agents never see it.
    Deadline {
        dead_after_ms: u32,
    },
    /// Hub → agent, right after `Welcome` (and `Deadline`) and again
    /// whenever the set changes, only to an agent that announced
    /// [`CAP_REPLICAS`]: the live replicas and which one this is.
    /// Appended within v1, so older agents never see it.
    ReplicaSet(ReplicaSet),
}

impl Frame {
    /// The stream a frame belongs to, if any.
    pub fn stream_id(&self) -> Option<StreamId> {
        match self {
            Frame::Open { id, .. }
            | Frame::Head { id, .. }
            | Frame::Data { id, .. }
            | Frame::Window { id, .. }
            | Frame::End { id }
            | Frame::Reset { id, .. } => Some(*id),
            _ => None,
        }
    }
}

/// Bytes a list of headers takes against [`MAX_HEADER_BYTES`].
pub fn header_bytes(headers: &[Header]) -> usize {
    headers.iter().map(|h| h.name.len() + h.value.len()).sum()
}

/// Bytes an identity takes against [`MAX_HEADER_BYTES`].
pub fn identity_bytes(id: &Identity) -> usize {
    id.user.len()
        + id.groups.iter().map(String::len).sum::<usize>()
        + id.uid.as_ref().map_or(0, String::len)
        + id.extra.iter().map(|(k, v)| k.len() + v.iter().map(String::len).sum::<usize>()).sum::<usize>()
}

/// Checks a head against the header limits; `Err` names the limit broken.
pub fn check_head_limits(headers: &[Header], identity: Option<&Identity>) -> Result<(), &'static str> {
    let mut bytes = header_bytes(headers);
    if let Some(id) = identity {
        if id.groups.len() > MAX_IDENTITY_ITEMS || id.extra.len() > MAX_IDENTITY_ITEMS {
            return Err("too many identity groups or extras");
        }
        bytes += identity_bytes(id);
    }
    check_field_limits(headers.len(), bytes)
}

/// Checks a head of `count` fields taking `bytes` (see [`header_bytes`])
/// against the header limits; `Err` names the limit broken.
pub fn check_field_limits(count: usize, bytes: usize) -> Result<(), &'static str> {
    if count > MAX_HEADER_COUNT {
        return Err("too many header fields");
    }
    if bytes > MAX_HEADER_BYTES {
        return Err("header bytes over limit");
    }
    Ok(())
}
