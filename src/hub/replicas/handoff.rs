//! The hand-off: a person's request that lands on a replica with no tunnel
//! to its cluster goes, one hop, to a replica that has one.
//!
//! ```text
//!  kubectl ─► replica A (no tunnel to c)             replica B (tunnel to c)
//!             route(c): local? no; elsewhere(c) = [B]
//!             peer session to B (one per replica,    GET /v1/peer, Upgrade: uplink-peer/1
//!               dialled on demand, TLS pinned to  ──► Authorization: UplinkPeer v1 A B ts mac
//!               the shared serving key)               401 + warn line unless the mac holds
//!             Mux::hub ◄──────── Hello/Welcome ─────► Mux::agent
//!             open(head + uplink-peer-cluster: c) ──► accept: take the cluster, open the same
//!                                                     head on B's own tunnel to c, splice:
//!             ◄── Head, Data, Window, End, Reset ───► ◄── agent tunnel ──► agent ──► API server
//! ```
//!
//! - **What travels.** Streams carry the same [`RequestHead`] as on an
//!   agent tunnel, the person's identity included: A authenticated the
//!   person and applied grants; B trusts that because only a replica
//!   holds the key the hop's credential is made with. Nothing else can
//!   put an identity on B's tunnels.
//! - **Who may dial.** The credential is an HMAC-SHA256, keyed from the
//!   shared CA key in the store, over (from, to, time): it is valid for
//!   [`CREDENTIAL_VALIDITY`] either side of B's clock, names B, and is
//!   compared in constant time. A checks B in turn: B must present the
//!   serving key every replica shares (a pin, so an advertise URL whose
//!   host is not in the certificate still works).
//! - **One hop.** B serves a peer's stream only from its own tunnels,
//!   never hands it on.
//! - **Never refused while a tunnel exists.** A dial that fails marks the
//!   replica failed for [`RETRY_AFTER`] and the next replica holding a
//!   tunnel is tried; only then the caller's usual "not connected" answer.
//! - **Cancellation.** The splice copies data as the reader consumes it
//!   (so credit flows end to end), passes `End` as a half-close and a
//!   `Reset` (its code and message) to the other side; a peer session that
//!   ends resets every stream on it, and so each spliced agent stream.
//!
//! Not here: which replicas hold which tunnels (the heartbeat, in
//! `replicas`), the HTTP front end (it calls [`route`] and routes
//! `/v1/peer` to [`accept`]), the tunnel protocol itself.

use super::super::clock::now_ms;
use super::super::http::{Incoming, Reply, Request, Upgraded, switch};
use super::super::store::Replica;
use super::super::{Hub, api};
use crate::driver::{Session, Stream, StreamClosed};
use crate::proto::{AgentInfo, GoAwayCode, Header, Mux, ReplicaInfo, RequestHead, ResetCode, StreamError};
use crate::secret::Secret;
use crate::socket::Prefixed;
use futures_rustls::TlsConnector;
use log::{info, warn};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use smol::future::{self, FutureExt};
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use smol::net::TcpStream;
use smol::{LocalExecutor, Timer};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where replicas reach each other.
pub const PEER_PATH: &str = "/v1/peer";
/// The protocol named in `Upgrade` on the peer hop: the tunnel protocol,
/// with the dialling replica in the hub's role.
pub const PEER_UPGRADE: &str = "uplink-peer/1";
/// The header naming the cluster on a handed-off stream; the receiving
/// replica takes it off before the head goes to its agent.
pub const CLUSTER_HEADER: &str = "uplink-peer-cluster";
/// How far a credential's time may be from the receiving replica's clock.
pub const CREDENTIAL_VALIDITY: Duration = Duration::from_secs(30);
/// Connect, TLS, upgrade and tunnel handshake to another replica, all
/// together: past this the replica counts as unreachable.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// After a failed dial a replica is not dialled again for this long:
/// requests meanwhile go on to the next replica (or their usual answer)
/// at once instead of each waiting for a dial of their own.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// A peer session with no stream for this long is closed.
pub const PEER_IDLE: Duration = Duration::from_secs(60);
/// How long the receiving replica waits for its own tunnel to come back
/// (an agent redialling) before it refuses a handed-off stream.
const LOCAL_GRACE: Duration = Duration::from_secs(3);
/// Largest answer head to the upgrade request.
const MAX_HEAD: usize = 16 * 1024;

/// The secrets of the hop: the key credentials are made with, and the TLS
/// configuration that accepts only a replica's serving key.
pub struct PeerTrust {
    key: ring::hmac::Key,
    tls: Arc<ClientConfig>,
}

impl PeerTrust {
    /// From the shared CA key (the credential key is derived from it, so
    /// it changes only with the hub's identity) and this replica's serving
    /// certificate, whose key every replica shares (replicas given their
    /// own `--cert`/`--key` must give them all the same key, or the dial
    /// fails its TLS check and the hop is not made).
    pub fn new(ca_key_pem: &Secret, serving_cert_pem: &str) -> Result<PeerTrust, String> {
        let root = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, ca_key_pem.expose().as_bytes());
        let derived = ring::hmac::sign(&root, b"uplink peer hop credential key v1");
        let pin = crate::tls::certs_from_pem(serving_cert_pem, "the hub certificate")
            .ok()
            .and_then(|c| c.first().and_then(|c| crate::tls::spki_pin(c)))
            .ok_or("the hub certificate has no readable public key")?;
        let tls = crate::tls::client_config(&crate::tls::Trust::Pin(pin), None, &[b"http/1.1"])
            .map_err(|e| format!("peer TLS configuration: {e}"))?;
        Ok(PeerTrust { key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref()), tls })
    }

    fn mac_input(from: &str, to: &str, at: i64) -> String {
        format!("uplink-peer-v1\n{from}\n{to}\n{at}")
    }

    /// The `Authorization` value replica `from` sends to replica `to`.
    pub fn credential(&self, from: &str, to: &str, now_ms: i64) -> String {
        let tag = ring::hmac::sign(&self.key, Self::mac_input(from, to, now_ms).as_bytes());
        format!("UplinkPeer v1 {from} {to} {now_ms} {}", hex(tag.as_ref()))
    }

    /// Checks a credential addressed to replica `me`; the sender's id.
    pub fn verify(&self, value: &str, me: &str, now_ms: i64) -> Result<String, CredentialError> {
        let parts: Vec<&str> = value.split_whitespace().collect();
        let [scheme, version, from, to, at, mac] = parts[..] else {
            return Err(CredentialError::Malformed);
        };
        if !scheme.eq_ignore_ascii_case("UplinkPeer") || version != "v1" {
            return Err(CredentialError::Malformed);
        }
        let at: i64 = at.parse().map_err(|_| CredentialError::Malformed)?;
        let mac = unhex(mac).ok_or(CredentialError::Malformed)?;
        // The signature first: an unsigned claim says nothing about time.
        ring::hmac::verify(&self.key, Self::mac_input(from, to, at).as_bytes(), &mac)
            .map_err(|_| CredentialError::BadSignature)?;
        if (now_ms - at).unsigned_abs() > CREDENTIAL_VALIDITY.as_millis() as u64 {
            return Err(CredentialError::Stale { skew_ms: now_ms - at });
        }
        if to != me {
            return Err(CredentialError::OtherReplica(to.to_string()));
        }
        Ok(from.to_string())
    }
}

/// Why a peer credential was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialError {
    /// None was sent.
    Missing,
    /// Not `UplinkPeer v1 FROM TO MILLIS HEX`.
    Malformed,
    /// Not made with the replicas' key.
    BadSignature,
    /// Made too long ago, or too far ahead (clocks apart).
    Stale { skew_ms: i64 },
    /// Made for another replica.
    OtherReplica(String),
}

impl std::fmt::Display for CredentialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CredentialError::Missing => write!(f, "no peer credential"),
            CredentialError::Malformed => write!(f, "malformed peer credential"),
            CredentialError::BadSignature => write!(f, "peer credential not signed with the replicas' key"),
            CredentialError::Stale { skew_ms } => write!(
                f,
                "peer credential {skew_ms} ms from this replica's clock (valid ±{} s): check the clocks",
                CREDENTIAL_VALIDITY.as_secs()
            ),
            CredentialError::OtherReplica(to) => write!(f, "peer credential addressed to replica {to}"),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.len() > 128 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// One other replica as this one sees it.
#[derive(Clone)]
enum Peer {
    /// A request is dialling it; others wait for the outcome.
    Dialing(Rc<event_listener::Event>),
    Up(Rc<PeerConn>),
    /// The last dial failed at this time, for this reason.
    Failed(Instant, String),
}

struct PeerConn {
    session: Session,
    /// Tells this connection from a later one to the same replica.
    serial: u64,
    last_used: Cell<Instant>,
}

/// The peer sessions this replica dialled, and where the others are.
pub struct Peers {
    trust: Option<PeerTrust>,
    /// Runs the peer sessions: they outlive the request that dialled them.
    ex: LocalExecutor<'static>,
    peers: Rc<RefCell<HashMap<String, Peer>>>,
    /// Replica id → advertise URL, refreshed when an unknown id appears.
    urls: RefCell<HashMap<String, String>>,
    serial: Cell<u64>,
}

impl Default for Peers {
    fn default() -> Self {
        Peers {
            trust: None,
            ex: LocalExecutor::new(),
            peers: Default::default(),
            urls: Default::default(),
            serial: Cell::new(0),
        }
    }
}

impl Peers {
    pub fn new(trust: PeerTrust) -> Peers {
        Peers { trust: Some(trust), ..Default::default() }
    }

    /// Runs `fut` (the heartbeat loop) and, beside it, the peer sessions.
    pub async fn run<T>(&self, fut: impl Future<Output = T>) -> T {
        self.ex.run(fut).await
    }

    /// Where the live replicas are, as the heartbeat just read them (the
    /// replica set), so a hand-off to a known replica asks the store
    /// nothing.
    pub fn know(&self, replicas: &[ReplicaInfo]) {
        *self.urls.borrow_mut() = replicas.iter().map(|r| (r.id.clone(), r.url.clone())).collect();
    }

    /// Learns where the replicas named in `ids` are, asking the store only
    /// when one is new (joined since the last heartbeat).
    pub fn learn(&self, hub: &Hub, ids: &[&str]) {
        if ids.iter().all(|id| self.urls.borrow().contains_key(*id)) {
            return;
        }
        let deadline = super::DEADLINE.as_millis() as i64;
        match hub.store.live_replicas(now_ms(), deadline) {
            Ok(all) => {
                *self.urls.borrow_mut() = all.into_iter().map(|r: Replica| (r.id, r.advertise_url)).collect();
            }
            Err(e) => log::debug!("could not read the replica set error={e}"),
        }
    }

    /// The session to replica `to`: the one held, or a new one dialled now.
    async fn session(&self, hub: &Hub, me: &str, to: &str) -> Result<Session, String> {
        loop {
            let state = self.peers.borrow().get(to).cloned();
            match state {
                Some(Peer::Up(c)) if c.session.is_open() && c.session.goaway_received().is_none() => {
                    c.last_used.set(Instant::now());
                    return Ok(c.session.clone());
                }
                Some(Peer::Dialing(done)) => {
                    let listener = done.listen();
                    // Still dialling (no await since the read above).
                    if matches!(self.peers.borrow().get(to), Some(Peer::Dialing(_))) {
                        listener.await;
                    }
                    continue;
                }
                Some(Peer::Failed(at, why)) if at.elapsed() < RETRY_AFTER => {
                    return Err(format!("{why} (last dial {} ms ago)", at.elapsed().as_millis()));
                }
                _ => {}
            }
            let Some(url) = self.urls.borrow().get(to).cloned() else {
                return Err(format!("the advertise URL of replica {to} is not known yet"));
            };
            let done = Rc::new(event_listener::Event::new());
            self.peers.borrow_mut().insert(to.to_string(), Peer::Dialing(done.clone()));
            // A request that goes away mid-dial must not leave the others
            // waiting for a dial nobody finishes.
            let mut guard = DialGuard { peers: &self.peers, to, done: &done, armed: true };
            // Boxed: the dial (TCP, TLS, upgrade, handshake) is a large
            // future, and unboxed it sized every proxied request's future
            // (and, by its copies, the hub's per-request memory moves).
            let dialled = Box::pin(dial(hub, self, me, to, &url)).or(async {
                Timer::after(DIAL_TIMEOUT).await;
                Err(format!("no answer within {} ms", DIAL_TIMEOUT.as_millis()))
            });
            let outcome = dialled.await;
            guard.armed = false;
            let result = match outcome {
                Ok(conn) => {
                    let session = conn.session.clone();
                    self.peers.borrow_mut().insert(to.to_string(), Peer::Up(conn));
                    Ok(session)
                }
                Err(why) => {
                    let why = format!("replica {to} at {url}: {why}");
                    self.peers.borrow_mut().insert(to.to_string(), Peer::Failed(Instant::now(), why.clone()));
                    Err(why)
                }
            };
            done.notify(usize::MAX);
            return result;
        }
    }
}

struct DialGuard<'a> {
    peers: &'a RefCell<HashMap<String, Peer>>,
    to: &'a str,
    done: &'a event_listener::Event,
    /// Still dialling: on drop, the dial was abandoned.
    armed: bool,
}

impl Drop for DialGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(mut p) = self.peers.try_borrow_mut() {
            p.remove(self.to);
        }
        self.done.notify(usize::MAX);
    }
}

/// The session for a new stream to `cluster_id`: this replica's own
/// tunnel if it holds one, else a peer session to a replica that does.
pub async fn route(hub: &Hub, cluster_id: &str) -> Option<Route> {
    if let Some(s) = hub.tunnels.pick(cluster_id) {
        return Some(Route::Local(s));
    }
    let me = hub.replicas.me()?;
    let mut holders: Vec<String> = hub.replicas.elsewhere(cluster_id).into_iter().map(|s| s.replica_id).collect();
    holders.sort();
    holders.dedup();
    if holders.is_empty() {
        return None;
    }
    let peers = &hub.replicas.peers;
    peers.learn(hub, &holders.iter().map(String::as_str).collect::<Vec<_>>());
    // Replicas already connected first: no dial.
    holders.sort_by_key(|id| !matches!(peers.peers.borrow().get(id), Some(Peer::Up(c)) if c.session.is_open()));
    for to in &holders {
        let cached_failure =
            matches!(peers.peers.borrow().get(to), Some(Peer::Failed(at, _)) if at.elapsed() < RETRY_AFTER);
        match peers.session(hub, &me.id, to).await {
            Ok(session) => {
                super::super::metrics::Metrics::bump(&hub.metrics.handoffs);
                return Some(Route::Peer { session, cluster_id: cluster_id.to_string() });
            }
            Err(why) if !cached_failure => {
                super::super::metrics::Metrics::bump(&hub.metrics.handoff_failures);
                warn!("hand-off dial failed cluster={cluster_id} error={why}");
            }
            Err(why) => log::debug!("hand-off skipped cluster={cluster_id} error={why}"),
        }
    }
    None
}

/// Where a new stream goes: see [`route`].
pub enum Route {
    /// This replica's own tunnel to the cluster.
    Local(Session),
    /// A peer session to a replica that holds one.
    Peer { session: Session, cluster_id: String },
}

impl Route {
    /// Opens a stream carrying `head` (on a peer session, naming the
    /// cluster for the other replica). A person's field of that name never
    /// reaches here: the kube front end's header policy drops it
    /// (`kube::forward_fields`), and the other replica refuses a head
    /// that names more than one cluster.
    /// Whether [`Route::open`] would take a stream now.
    pub fn can_open(&self) -> Result<(), StreamError> {
        match self {
            Route::Local(s) | Route::Peer { session: s, .. } => s.can_open(),
        }
    }

    pub fn open(&self, mut head: RequestHead) -> Result<Stream, StreamError> {
        match self {
            Route::Local(s) => s.open(head),
            Route::Peer { session, cluster_id } => {
                head.headers.push(Header::new(CLUSTER_HEADER, cluster_id.as_str()));
                session.open(head)
            }
        }
    }
}

impl Route {
    /// [`Route::open`] from a borrowed head, as the kube front end opens
    /// its streams.
    pub fn open_ref<'a, I>(&self, head: crate::proto::codec::OpenHead<'a, I>) -> Result<Stream, StreamError>
    where
        I: Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
    {
        match self {
            Route::Local(s) => s.open_ref(&head),
            Route::Peer { session, cluster_id } => {
                session.open_ref(&head.with_field(CLUSTER_HEADER.as_bytes(), cluster_id.as_bytes()))
            }
        }
    }
}

/// Dials replica `to` at `url`: TCP, TLS pinned to the shared key, the
/// upgrade with our credential, the tunnel handshake with us as the hub.
async fn dial(hub: &Hub, peers: &Peers, me: &str, to: &str, url: &str) -> Result<Rc<PeerConn>, String> {
    let trust = peers.trust.as_ref().ok_or("this replica has no peer credentials")?;
    let (host, port) = host_port(url).ok_or_else(|| format!("advertise URL {url:?} is not https://HOST[:PORT]"))?;
    let tcp = TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    // As on agent tunnels: the mux, not the send buffer, orders streams.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = socket2::SockRef::from(&tcp).set_tcp_notsent_lowat(crate::driver::TUNNEL_NOTSENT_LOWAT) {
        log::debug!("TCP_NOTSENT_LOWAT not set on a peer session: {e}");
    }
    let name = ServerName::try_from(host.clone()).map_err(|e| format!("server name {host:?}: {e}"))?;
    let mut tls = TlsConnector::from(trust.tls.clone()).connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
    let credential = trust.credential(me, to, now_ms());
    let request = format!(
        "GET {PEER_PATH} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: {PEER_UPGRADE}\r\n\
         Authorization: {credential}\r\nUser-Agent: uplink-hub/{}\r\n\r\n",
        authority(url),
        env!("CARGO_PKG_VERSION")
    );
    tls.write_all(request.as_bytes()).await.map_err(|e| format!("upgrade request: {e}"))?;
    tls.flush().await.map_err(|e| format!("upgrade request: {e}"))?;
    let (status, upgrade, rest) = read_head(&mut tls).await?;
    if status != 101 {
        let body = String::from_utf8_lossy(&rest);
        return Err(format!("refused the hop with {status}: {}", body.trim()));
    }
    if !upgrade.is_some_and(|u| u.eq_ignore_ascii_case(PEER_UPGRADE)) {
        return Err("answered 101 without Upgrade: uplink-peer/1".into());
    }
    let serial = peers.serial.get() + 1;
    peers.serial.set(serial);
    let session = Session::new(Mux::hub(hub.tunnel_config.clone(), serial, Instant::now()));
    let conn = Rc::new(PeerConn { session: session.clone(), serial, last_used: Cell::new(Instant::now()) });
    let io = Prefixed::new(rest, tls);
    let (map, to_owned, gauge) = (peers.peers.clone(), to.to_string(), hub.metrics.peer_sessions_out.clone());
    let task_conn = conn.clone();
    gauge.set(gauge.get() + 1);
    // Detached: the session belongs to the peer set, not to the request
    // that dialled it; it ends when idle, lost or closed by the other side.
    peers
        .ex
        .spawn(async move {
            let s = &task_conn.session;
            let idle = async {
                // A dial given up on (its request timed out) must not leave
                // a session waiting for a handshake.
                Timer::after(DIAL_TIMEOUT).await;
                if !s.is_open() {
                    s.close(GoAwayCode::Timeout, "no tunnel handshake in time");
                }
                loop {
                    Timer::after(PEER_IDLE / 4).await;
                    if s.stream_count() == 0 && task_conn.last_used.get().elapsed() >= PEER_IDLE {
                        // Out of the set first: no request picks a session
                        // that is going away.
                        forget(&map, &to_owned, task_conn.serial);
                        s.go_away(GoAwayCode::ShuttingDown, "peer session idle");
                        return std::future::pending::<crate::proto::SessionError>().await;
                    }
                }
            };
            let why = s.run(io).or(idle).await;
            gauge.set(gauge.get().saturating_sub(1));
            forget(&map, &to_owned, task_conn.serial);
            info!("peer session ended replica={to_owned} reason={why}");
        })
        .detach();
    match session.connected().await {
        Ok(_) => {
            info!("peer session up replica={to} url={url}");
            Ok(conn)
        }
        Err(e) => Err(format!("tunnel handshake: {e}")),
    }
}

/// Takes a peer session out of the set, unless a newer one replaced it.
fn forget(peers: &RefCell<HashMap<String, Peer>>, to: &str, serial: u64) {
    let mut m = peers.borrow_mut();
    if matches!(m.get(to), Some(Peer::Up(c)) if c.serial == serial) {
        m.remove(to);
    }
}

/// `https://host[:port][/...]` → (host, port); IPv6 in brackets.
fn host_port(url: &str) -> Option<(String, u16)> {
    let auth = authority(url);
    if auth.is_empty() || !url.starts_with("https://") {
        return None;
    }
    let (host, port) = match auth.strip_prefix('[') {
        Some(v6) => {
            let (h, rest) = v6.split_once(']')?;
            (h.to_string(), rest.strip_prefix(':'))
        }
        None => match auth.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (auth.to_string(), None),
        },
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => 443,
    };
    Some((host, port))
}

fn authority(url: &str) -> &str {
    let rest = url.strip_prefix("https://").unwrap_or(url);
    rest.split(['/', '?']).next().unwrap_or("")
}

/// Reads the answer head to the upgrade: (status, `Upgrade`, bytes after
/// the head: the body of a refusal, or the first tunnel bytes).
async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> Result<(u16, Option<String>, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = r.read(&mut chunk).await.map_err(|e| format!("reading the answer: {e}"))?;
        if n == 0 {
            return Err("closed the connection before answering".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = resp.code.unwrap_or(0);
                let upgrade = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("upgrade"))
                    .map(|h| String::from_utf8_lossy(h.value).trim().to_string());
                let mut rest = buf[len..].to_vec();
                if status != 101 {
                    // A refusal's body is small; read what is there.
                    let more = r.read(&mut chunk).or(async {
                        Timer::after(Duration::from_millis(200)).await;
                        Ok(0)
                    });
                    if let Ok(n) = more.await {
                        rest.extend_from_slice(&chunk[..n]);
                    }
                    rest.truncate(1024);
                }
                return Ok((status, upgrade, rest));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => return Err("answer head too large".into()),
            Err(e) => return Err(format!("malformed answer: {e}")),
        }
    }
}

/// `GET /v1/peer`: another replica's hop. The same shape as the agents'
/// `/v1/tunnel`: checks the credential, answers `101`, and runs the peer
/// session ([`session`]) on the upgraded connection until it ends.
/// HTTP/1.1 only: the dialler offers only `http/1.1` in ALPN, and the hop
/// is a tunnel with its own multiplexing, not a stream inside HTTP/2's.
pub fn accept(hub: &Rc<Hub>, req: &Request, body: &mut Incoming, peer: SocketAddr) -> Reply {
    let wants = req.upgrade().is_some_and(|u| u.eq_ignore_ascii_case(PEER_UPGRADE));
    if !wants {
        return Reply::Send(
            api::error(426, "upgrade_required", &format!("send Connection: Upgrade and Upgrade: {PEER_UPGRADE}"))
                .with_header("Upgrade", PEER_UPGRADE),
        );
    }
    let (Some(me), Some(trust)) = (hub.replicas.me(), hub.replicas.peers.trust.as_ref()) else {
        return Reply::Send(api::error(404, "not_found", "this hub has no replicas: it runs on the embedded store"));
    };
    let verdict = match req.header_str("authorization") {
        None => Err(CredentialError::Missing),
        Some(v) => trust.verify(v, &me.id, now_ms()),
    };
    let from = match verdict {
        Ok(from) => from,
        Err(why) => {
            super::super::metrics::Metrics::bump(&hub.metrics.peer_refused);
            warn!("peer hop refused peer={peer} reason={why}");
            let (status, code) = match why {
                CredentialError::OtherReplica(_) => (403, "forbidden"),
                _ => (401, "unauthorized"),
            };
            return Reply::Send(api::error(
                status,
                code,
                &format!("{why}; /v1/peer is for uplink-hub replicas sharing this hub's store"),
            ));
        }
    };
    if hub.draining.get() {
        return Reply::Send(api::error(503, "shutting_down", "this replica is shutting down"));
    }
    let Some(on) = body.take_upgrade() else {
        return Reply::Send(api::error(400, "bad_request", "the peer hop is an HTTP/1.1 upgrade"));
    };
    let hub = hub.clone();
    let fields: &[(&[u8], &[u8])] = &[(b"Connection", b"Upgrade"), (b"Upgrade", PEER_UPGRADE.as_bytes())];
    switch(on, fields, move |up| session(hub, from, up, peer))
        .unwrap_or_else(|| Reply::Send(api::error(500, "internal", "the 101 could not be built")))
}

/// A peer session on its upgraded connection, with this replica in the
/// agent's role: each stream the other replica opens is spliced onto
/// this replica's own tunnel to the cluster it names.
async fn session(hub: Rc<Hub>, from: String, up: Upgraded, peer: SocketAddr) {
    // As on agent tunnels: the mux, not the send buffer, orders streams.
    if let Err(e) = super::super::rt::tunnel_socket(up.get_ref()) {
        log::debug!("TCP_NOTSENT_LOWAT not set on a peer session peer={peer}: {e}");
    }
    let info = AgentInfo {
        agent_version: format!("uplink-hub {}", env!("CARGO_PKG_VERSION")),
        arch: "peer".into(),
        kube_version: String::new(),
        node_count: 0,
    };
    let session = Session::new(Mux::agent(hub.tunnel_config.clone(), info, Instant::now()));
    let m = &hub.metrics;
    m.peer_sessions_in.set(m.peer_sessions_in.get() + 1);
    info!("peer session accepted replica={from} peer={peer}");
    // The streams' tasks live in this executor: they end with the session.
    let ex = LocalExecutor::new();
    let serve = async {
        while let Some((stream, head)) = session.accept().await {
            // Detached: the task owns its two streams and ends with them
            // (or with this executor, when the session ends).
            ex.spawn(serve_stream(hub.clone(), stream, head)).detach();
        }
        std::future::pending::<crate::proto::SessionError>().await
    };
    // Draining: the dialler takes no new stream here (it tries another
    // replica); those in flight finish.
    let drain = async {
        hub.draining_started().await;
        session.go_away(GoAwayCode::ShuttingDown, "replica shutting down");
        std::future::pending::<crate::proto::SessionError>().await
    };
    let why = ex.run(session.run(up).or(serve).or(drain)).await;
    m.peer_sessions_in.set(m.peer_sessions_in.get().saturating_sub(1));
    info!("peer session ended replica={from} reason={why}");
}

/// Counts a spliced stream for `/metrics` while it lives.
struct Live<'a>(&'a Cell<u64>);

impl<'a> Live<'a> {
    fn new(c: &'a Cell<u64>) -> Self {
        c.set(c.get() + 1);
        Live(c)
    }
}

impl Drop for Live<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// One handed-off stream: onto this replica's own tunnel (one hop only).
async fn serve_stream(hub: Rc<Hub>, mut from_peer: Stream, mut head: RequestHead) {
    let _live = Live::new(&hub.metrics.peer_streams_in);
    let named: Vec<Header> =
        head.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(CLUSTER_HEADER.as_bytes())).cloned().collect();
    head.headers.retain(|h| !h.name.eq_ignore_ascii_case(CLUSTER_HEADER.as_bytes()));
    let cluster = match &named[..] {
        [one] => String::from_utf8_lossy(&one.value).into_owned(),
        _ => {
            warn!("handed-off stream refused: it must name one cluster ({} {CLUSTER_HEADER} fields)", named.len());
            from_peer.reset(ResetCode::StreamProtocol, "a handed-off stream names exactly one cluster");
            return;
        }
    };
    let until = Instant::now() + LOCAL_GRACE;
    let to_agent = loop {
        if let Some(s) = hub.tunnels.pick(&cluster) {
            match s.open(head.clone()) {
                Ok(stream) => break stream,
                Err(StreamError::GoingAway | StreamError::Closed | StreamError::NotConnected) => {}
                Err(e) => {
                    from_peer.reset(ResetCode::Refused, &format!("the agent's tunnel could not take the stream: {e}"));
                    return;
                }
            }
        }
        if hub.draining.get() || Instant::now() >= until || !hub.tunnels.expecting(&cluster) {
            from_peer.reset(ResetCode::Refused, "the replica handed to holds no tunnel to the cluster now");
            return;
        }
        // The person may give up meanwhile.
        let gone = async {
            from_peer.closed().await;
            true
        };
        if gone
            .or(async {
                Timer::after(Duration::from_millis(20)).await;
                false
            })
            .await
        {
            return;
        }
    };
    splice(from_peer, to_agent).await;
}

/// Which stream of the splice broke, and how.
struct Broke {
    peer_side: bool,
    why: StreamClosed,
}

async fn read(s: &RefCell<Stream>) -> Result<Option<Vec<u8>>, StreamClosed> {
    future::poll_fn(|cx| pin!(s.borrow_mut().read_chunk()).poll(cx)).await
}

async fn write(s: &RefCell<Stream>, mut data: &[u8]) -> Result<(), StreamClosed> {
    while !data.is_empty() {
        let n = future::poll_fn(|cx| Pin::new(&mut *s.borrow_mut()).poll_write(cx, data)).await.map_err(|e| {
            e.get_ref()
                .and_then(|e| e.downcast_ref::<StreamClosed>())
                .cloned()
                .unwrap_or(StreamClosed::Reset { code: ResetCode::Internal, message: e.to_string() })
        })?;
        data = &data[n..];
    }
    Ok(())
}

async fn closed(s: &RefCell<Stream>) -> StreamClosed {
    future::poll_fn(|cx| pin!(s.borrow().closed()).poll(cx)).await
}

/// Copies `from` to `to` until `from` ends (then half-closes `to`).
async fn copy(from: &RefCell<Stream>, to: &RefCell<Stream>, from_is_peer: bool) -> Result<(), Broke> {
    loop {
        match read(from).await {
            Ok(Some(data)) => {
                write(to, &data).await.map_err(|why| Broke { peer_side: !from_is_peer, why })?;
            }
            Ok(None) => {
                to.borrow_mut().finish();
                return Ok(());
            }
            Err(why) => return Err(Broke { peer_side: from_is_peer, why }),
        }
    }
}

/// Joins the peer's stream and the agent's: the head, then data both ways
/// (credit follows consumption), `End` as a half-close, and a `Reset` or
/// a lost session on one side as a `Reset` on the other.
async fn splice(from_peer: Stream, to_agent: Stream) {
    let (p, a) = (RefCell::new(from_peer), RefCell::new(to_agent));
    let up = copy(&p, &a, true);
    let down = async {
        let head = future::poll_fn(|cx| pin!(a.borrow_mut().response_head()).poll(cx))
            .await
            .map_err(|why| Broke { peer_side: false, why })?;
        p.borrow_mut().send_head(head).map_err(|e| Broke {
            peer_side: true,
            why: StreamClosed::Reset { code: ResetCode::Internal, message: e.to_string() },
        })?;
        copy(&a, &p, false).await
    };
    let (mut up, mut down) = (pin!(up), pin!(down));
    enum First {
        Up(Result<(), Broke>),
        Down(Result<(), Broke>),
    }
    let first = async { First::Up(up.as_mut().await) }.or(async { First::Down(down.as_mut().await) }).await;
    // A direction that ended cleanly leaves its source unread: watch it
    // for a reset while the other direction goes on.
    let outcome = match first {
        First::Up(Ok(())) => down.or(async { Err(Broke { peer_side: true, why: closed(&p).await }) }).await,
        First::Down(Ok(())) => up.or(async { Err(Broke { peer_side: false, why: closed(&a).await }) }).await,
        First::Up(Err(b)) | First::Down(Err(b)) => Err(b),
    };
    if let Err(Broke { peer_side, why }) = outcome {
        let (code, message) = match why {
            StreamClosed::Reset { code, message } => (code, message),
            StreamClosed::Session(e) if peer_side => (ResetCode::Cancel, format!("peer session lost: {e}")),
            StreamClosed::Session(e) => (ResetCode::Refused, format!("the agent's tunnel was lost: {e}")),
            StreamClosed::Finished => (ResetCode::Internal, "stream already finished".into()),
        };
        let other = if peer_side { &a } else { &p };
        other.borrow_mut().reset(code, &message);
        log::debug!("handed-off stream ended early code={code:?} message={message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trust() -> PeerTrust {
        let ca = rcgen::KeyPair::generate().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
        PeerTrust::new(&Secret::new(ca.serialize_pem()), &cert.pem()).unwrap()
    }

    #[test]
    fn credentials_hold_only_for_their_replica_key_and_time() {
        let t = trust();
        let now = 1_796_378_400_000;
        let c = t.credential("r_a", "r_b", now);
        assert_eq!(t.verify(&c, "r_b", now + 1_000), Ok("r_a".into()));
        assert_eq!(t.verify(&c, "r_c", now), Err(CredentialError::OtherReplica("r_b".into())));
        assert!(matches!(t.verify(&c, "r_b", now + 31_000), Err(CredentialError::Stale { .. })));
        assert!(matches!(t.verify(&c, "r_b", now - 31_000), Err(CredentialError::Stale { .. })));
        // Another store's key, a changed field, a changed time: not signed.
        assert_eq!(trust().verify(&c, "r_b", now), Err(CredentialError::BadSignature));
        assert_eq!(t.verify(&c.replace("r_a", "r_x"), "r_b", now), Err(CredentialError::BadSignature));
        let later = c.replace(&now.to_string(), &(now + 5).to_string());
        assert_eq!(t.verify(&later, "r_b", now), Err(CredentialError::BadSignature));
        for bad in
            ["", "Bearer x", "UplinkPeer v2 r_a r_b 1 00", "UplinkPeer v1 r_a r_b x 00", "UplinkPeer v1 a b 1 zz"]
        {
            assert_eq!(t.verify(bad, "r_b", now), Err(CredentialError::Malformed), "{bad}");
        }
    }

    #[test]
    fn advertise_urls() {
        assert_eq!(host_port("https://hub-2.example:8443/"), Some(("hub-2.example".into(), 8443)));
        assert_eq!(host_port("https://10.0.0.2"), Some(("10.0.0.2".into(), 443)));
        assert_eq!(host_port("https://[::1]:9443"), Some(("::1".into(), 9443)));
        assert_eq!(host_port("http://hub:80"), None);
        assert_eq!(host_port("https://hub:port"), None);
    }
}
