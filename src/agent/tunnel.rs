//! The tunnels to the hub: one per hub replica ([`run`] keeps the set),
//! each a link that dials (through a proxy when the environment says so),
//! does TLS, `GET /v1/tunnel` with `Upgrade: uplink/1` and the
//! credential, then runs the mux until the session ends; and again, with
//! its own backoff, until its replica leaves the set. A hub without
//! replicas (or an older one) is one link to the public URL, as before.
//!
//! One link:
//!
//! ```text
//!        ┌──── backoff (exponential, full jitter, ≤ 30 s) ◄──── dial, TLS or upgrade failed / timed out
//!        ▼                                                    ▲
//!  dial ─► TLS ─► GET /v1/tunnel ─101─► session (Hello/Welcome done: backoff reset)
//!                    │                    │ ends: lost, timeout, GoAway(ShuttingDown)
//!                    │                    └──► redial at once, within REDIAL_JITTER
//!                    │ 401 / 403           │ GoAway(Deregistered|Unauthorized)
//!                    ▼                    ▼
//!               stop: exit 4          stop: exit 4
//! ```
//!
//! After a session that worked the next dial is immediate, so a cut
//! tunnel is back within a round trip or two; the backoff grows only while
//! dials keep failing. A session that ends within [`WORKED_AFTER`] of its
//! handshake counts as a failed dial, so a hub that accepts and drops
//! agents in a loop is not redialled four times a second. The jitter on both spreads a fleet that lost one
//! hub at once: its redials arrive over [`REDIAL_JITTER`], then, while the
//! hub stays away, over ever longer windows (see `tests/faults.rs` for
//! 1,000 agents). Each step of a dial has a deadline
//! ([`net::dial_timeout`]), so a redial into a black hole is abandoned.

use super::AgentCtx;
use super::activation::error_body;
use super::http1::{self, Conn};
use super::kube::proxy;
use super::net::{self, Io, Target};
use crate::driver::Session;
use crate::proto::{AgentInfo, Config, GoAwayCode, Header, Mux, ReplicaSet, ReplicaSetError, SessionError};
use crate::socket::Prefixed;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// First backoff ceiling.
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Largest backoff ceiling.
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A session counts as one that worked once it has been up this long.
pub const WORKED_AFTER: Duration = Duration::from_secs(1);

/// The redial after a session that worked waits a uniformly random time
/// up to this: quick for one agent, spread for a fleet.
pub const REDIAL_JITTER: Duration = Duration::from_millis(250);

/// Exponential backoff with full jitter: attempt `n` waits a uniformly
/// random time in `[0, min(cap, base·2ⁿ)]` ("Exponential Backoff and
/// Jitter", AWS architecture blog), so a fleet of agents that lost the
/// hub at once does not come back at once.
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        use ring::rand::SecureRandom as _;
        let mut seed = [0u8; 8];
        let _ = ring::rand::SystemRandom::new().fill(&mut seed);
        Backoff::with_seed(base, cap, u64::from_le_bytes(seed))
    }

    /// A backoff whose jitter is drawn from `seed`: the same seed gives
    /// the same waits (tests, simulations).
    pub fn with_seed(base: Duration, cap: Duration, seed: u64) -> Self {
        Backoff { base, cap, attempt: 0, rng: seed | 1 }
    }

    /// The ceiling for the next wait.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The wait before the next dial after a failed one; each call raises
    /// the ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        self.jitter(ceiling)
    }

    /// The wait before the first dial after a session that worked: the
    /// backoff starts over, and the dial waits only a jitter up to
    /// [`REDIAL_JITTER`] (at most the base).
    pub fn after_session(&mut self) -> Duration {
        self.attempt = 0;
        self.jitter(REDIAL_JITTER.min(self.base))
    }

    /// Uniform in `[0, ceiling]`, whole milliseconds.
    fn jitter(&mut self, ceiling: Duration) -> Duration {
        // xorshift64*: plenty for jitter.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        let ms = ceiling.as_millis() as u64;
        Duration::from_millis(if ms == 0 { 0 } else { r % (ms + 1) })
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Why the agent stops tunnelling for good.
#[derive(Debug)]
pub struct Deregistered(pub String);

/// How one connection attempt ended.
enum Attempt {
    /// A session completed its handshake and later ended: redial at once.
    Ended(String),
    /// Could not establish a session.
    Failed(String),
    /// The hub says this cluster is gone.
    Stop(String),
}

/// Which way a tunnel goes: through the public URL (the load balancer,
/// landing on whichever replica it picks) or to one replica's own
/// advertise URL.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Via {
    Public,
    Replica(String),
}

/// What a link task tells the supervisor. `serial` names the link, so a
/// message from a link that was dropped a moment ago is recognised, and
/// one whose link now goes by another key (a replica replaced at its
/// address) still finds it.
enum Msg {
    Up { serial: u64, session: Session },
    Set { serial: u64, set: Result<ReplicaSet, ReplicaSetError> },
    Down { serial: u64 },
    Stop(String),
}

/// One link: a task that keeps a tunnel up to one target with its own
/// backoff, and what the supervisor knows of it.
struct Link {
    serial: u64,
    target: Target,
    /// Dropping it cancels the link (after its session was closed).
    task: smol::Task<()>,
    /// Set when the replica left the set: the link ends after its
    /// current session instead of dialling again.
    retire: Rc<Cell<bool>>,
    session: Option<Session>,
    /// The latest valid set the hub sent on this link's session; its
    /// `this` says which replica the session reached.
    set: Option<ReplicaSet>,
}

/// Keeps one tunnel to every live hub replica until the cluster is
/// deregistered.
///
/// ```text
///  start ─► link Public (the public URL) ─► up on replica A, ReplicaSet{A,B,C}
///                                            ├─ link B ─► advertise URL of B
///                                            └─ link C ─► advertise URL of C
///  ReplicaSet adds D ─► link D          ReplicaSet drops C ─► GoAway on C's tunnel,
///                                                              link ends once drained
///  no tunnel up (or no set known) ─► link Public dials again (the fallback)
///  a session lands on a replica another session holds ─► closed: never two tunnels
///                                                        to one replica
///  a replica restarted at its URL (a new id) ─► the tunnel there carries over
///                                              to the new id: no second dial
/// ```
///
/// The set dialled is the union of the latest sets the live sessions
/// heard (each replica tells its own view; a replica one of them still
/// sees is not dropped); with no session up, the last one known. A hub
/// that sends no set (the embedded store, or an older hub) leaves the
/// agent with its one tunnel through the public URL, as before.
pub async fn run(ctx: Rc<AgentCtx>) -> Deregistered {
    let tx = Mailbox::default();
    let mut sup = Supervisor { ctx, tx: tx.clone(), links: BTreeMap::new(), known: BTreeMap::new(), serial: 0 };
    sup.reconcile();
    loop {
        let msg = tx.recv().await;
        if let Msg::Stop(why) = msg {
            sup.close_all("agent stopping: cluster deregistered");
            return Deregistered(why);
        }
        sup.handle(msg);
    }
}

/// The links' messages to the supervisor, on the one thread. Sending
/// never waits: a link sends a handful per session (up, sets, down), and
/// the supervisor takes each as soon as the link yields.
#[derive(Clone, Default)]
struct Mailbox(Rc<RefCell<(VecDeque<Msg>, Option<Waker>)>>);

impl Mailbox {
    fn send(&self, msg: Msg) {
        let mut m = self.0.borrow_mut();
        m.0.push_back(msg);
        if let Some(w) = m.1.take() {
            w.wake();
        }
    }

    async fn recv(&self) -> Msg {
        std::future::poll_fn(|cx| {
            let mut m = self.0.borrow_mut();
            match m.0.pop_front() {
                Some(msg) => Poll::Ready(msg),
                None => {
                    m.1 = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
    }
}

struct Supervisor {
    ctx: Rc<AgentCtx>,
    tx: Mailbox,
    links: BTreeMap<Via, Link>,
    /// The replicas to keep tunnels to (id → advertise URL).
    known: BTreeMap<String, String>,
    serial: u64,
}

impl Supervisor {
    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Up { serial, session } => {
                let Some(via) = self.key(serial) else { return };
                self.links.get_mut(&via).expect("just found").session = Some(session);
                self.count_up();
            }
            Msg::Set { serial, set: Err(e) } => {
                let Some(via) = self.key(serial) else { return };
                let from = self.links[&via].target.to_string();
                log::error!("replica set from {from} refused: {e}; keeping the current tunnels ({})", self.up_list());
            }
            Msg::Set { serial, set: Ok(set) } => {
                let Some(mut via) = self.key(serial) else { return };
                let holder = self
                    .links
                    .iter()
                    .find(|(v, l)| {
                        **v != via && l.session.is_some() && l.set.as_ref().is_some_and(|s| s.this == set.this)
                    })
                    .map(|(v, _)| v.clone());
                if let Some(holder) = holder {
                    self.duplicate(&via, &set.this, &holder);
                } else {
                    if let Via::Replica(id) = &via
                        && *id != set.this
                    {
                        via = self.reached_another(id.clone(), &set);
                    }
                    let link = self.links.get_mut(&via).expect("checked above");
                    if link.set.as_ref() == Some(&set) {
                        return;
                    }
                    link.set = Some(set);
                }
                self.reconcile();
            }
            Msg::Down { serial } => {
                let Some(via) = self.key(serial) else { return };
                let link = self.links.get_mut(&via).expect("just found");
                link.session = None;
                link.set = None;
                self.count_up();
                self.reconcile();
            }
            Msg::Stop(_) => unreachable!("handled by run"),
        }
    }

    /// The key of the live link `serial`, if it still is one.
    fn key(&self, serial: u64) -> Option<Via> {
        self.links.iter().find(|(_, l)| l.serial == serial).map(|(v, _)| v.clone())
    }

    /// The link to replica `id` reached replica `set.this`, and no other
    /// session holds that one. When `set.this` advertises the URL `id`
    /// had, `id` was replaced there (a restart gives a replica a new id):
    /// the tunnel becomes `set.this`'s, so that neither a second dial to
    /// the new replica nor the old one leaving the set costs a reconnect.
    /// Otherwise a replica's advertise URL leads to another: say so, and
    /// keep the tunnel where it is. Returns the link's key now.
    fn reached_another(&mut self, id: String, set: &ReplicaSet) -> Via {
        let old = Via::Replica(id.clone());
        let url = set.replicas.iter().find(|r| r.id == set.this).map(|r| r.url.as_str());
        if url.is_none() || url != self.known.get(&id).map(String::as_str) {
            log::warn!(
                "the advertise URL of hub replica {id} reached replica {}: check that replica's --advertise-url",
                set.this
            );
            return old;
        }
        let new = Via::Replica(set.this.clone());
        if self.links.get(&new).is_some_and(|l| l.session.is_some()) {
            // Its own link is up too (its set not heard yet): that one
            // stays, this one goes when `id` leaves the set.
            return old;
        }
        // A link of the new replica still dialling is not needed any more.
        if let Some(dialling) = self.links.remove(&new) {
            drop(dialling.task);
        }
        let link = self.links.remove(&old).expect("the link exists");
        log::info!("hub replica {id} was replaced by {} at {}: the tunnel now counts as its", set.this, link.target);
        self.links.insert(new.clone(), link);
        new
    }

    /// Whether another replica's link holds a session at `id`'s advertise
    /// URL: then `id` is a replica replaced there that the set still
    /// lists for a moment (two live replicas never share one URL).
    fn url_held_by_another(&self, id: &str) -> bool {
        let Some(url) = self.known.get(id) else { return false };
        self.links.iter().any(|(via, l)| match via {
            Via::Replica(other) => other != id && l.session.is_some() && self.known.get(other) == Some(url),
            Via::Public => false,
        })
    }

    /// A session on `via` reached a replica that `holder` already has a
    /// tunnel to: the newcomer goes (it carries nothing yet).
    fn duplicate(&mut self, via: &Via, replica: &str, holder: &Via) {
        log::info!("second tunnel to hub replica {replica} ({via:?}, already held by {holder:?}): closing it");
        if let Some(link) = self.links.get_mut(via) {
            if let Some(s) = link.session.take() {
                s.go_away(GoAwayCode::ShuttingDown, "agent already holds a tunnel to this replica");
            }
            link.set = None;
        }
        if *via == Via::Public {
            // The public URL is only the way in and the fallback: a tunnel
            // is up, so it rests. Its session ends when drained (now: it
            // carried nothing yet).
            if let Some(link) = self.links.remove(via) {
                link.retire.set(true);
                link.task.detach();
            }
        }
        self.count_up();
    }

    /// Brings the links in line with the known set: one per replica, the
    /// public URL only while nothing else is up.
    fn reconcile(&mut self) {
        let live: Vec<&ReplicaSet> =
            self.links.values().filter(|l| l.session.is_some()).filter_map(|l| l.set.as_ref()).collect();
        if !live.is_empty() {
            let mut known = BTreeMap::new();
            for set in live {
                for r in &set.replicas {
                    known.entry(r.id.clone()).or_insert_with(|| r.url.clone());
                }
            }
            if known != self.known {
                let ids: Vec<&str> = known.keys().map(String::as_str).collect();
                log::info!("hub replicas: {} ({})", ids.len(), ids.join(", "));
                self.known = known;
            }
        }
        // The replica the public URL's session reached needs no link of
        // its own while that session lasts.
        let via_public = self
            .links
            .get(&Via::Public)
            .filter(|l| l.session.is_some())
            .and_then(|l| l.set.as_ref())
            .map(|s| s.this.clone());
        let gone: Vec<Via> = self
            .links
            .iter()
            .filter(|(via, l)| match via {
                Via::Public => false,
                Via::Replica(id) => {
                    !self.known.contains_key(id)
                        || (via_public.as_deref() == Some(id) && l.session.is_none())
                        || (l.session.is_none() && self.url_held_by_another(id))
                }
            })
            .map(|(via, _)| via.clone())
            .collect();
        for via in gone {
            self.retire(&via);
        }
        let missing: Vec<(String, String)> = self
            .known
            .iter()
            .filter(|(id, _)| via_public.as_deref() != Some(id.as_str()))
            .filter(|(id, _)| !self.links.contains_key(&Via::Replica(id.to_string())))
            .filter(|(id, _)| !self.url_held_by_another(id))
            .map(|(id, url)| (id.clone(), url.clone()))
            .collect();
        for (id, url) in missing {
            match Target::parse(&url) {
                Ok(target) => self.spawn(Via::Replica(id), target),
                Err(e) => log::error!("hub replica {id}: advertise URL {e}; not dialling it"),
            }
        }
        let any_up = self.links.values().any(|l| l.session.is_some());
        let need_public = !any_up || self.known.is_empty();
        match self.links.get(&Via::Public) {
            None if need_public => self.spawn(Via::Public, self.ctx.hub.clone()),
            Some(l) if !need_public && l.session.is_none() => {
                self.links.remove(&Via::Public);
            }
            _ => {}
        }
    }

    /// Ends a link whose replica left the set: a live session is told
    /// `GoAway` and closes once its streams finish; a link still dialling
    /// just stops.
    fn retire(&mut self, via: &Via) {
        let Some(link) = self.links.remove(via) else { return };
        match &link.session {
            Some(s) => {
                log::info!("hub replica left the set: draining the tunnel to {}", link.target);
                s.go_away(GoAwayCode::ShuttingDown, "replica left the hub's replica set");
                link.retire.set(true);
                // Detached: the link ends by itself once the session
                // drained (the retire flag stops its redial).
                link.task.detach();
            }
            None => log::info!("hub replica left the set: no longer dialling {}", link.target),
        }
        self.count_up();
    }

    fn spawn(&mut self, via: Via, target: Target) {
        self.serial += 1;
        let retire = Rc::new(Cell::new(false));
        let task =
            self.ctx.ex.spawn(link(self.ctx.clone(), self.serial, target.clone(), self.tx.clone(), retire.clone()));
        self.links.insert(via, Link { serial: self.serial, target, task, retire, session: None, set: None });
    }

    /// Sessions up, for the metrics and `/readyz`.
    fn count_up(&self) {
        let n = self.links.values().filter(|l| l.session.is_some()).count() as u64;
        self.ctx.metrics.tunnels.set(n);
        self.ctx.metrics.tunnel_up.set(n > 0);
    }

    fn up_list(&self) -> String {
        let up: Vec<String> =
            self.links.values().filter(|l| l.session.is_some()).map(|l| l.target.to_string()).collect();
        if up.is_empty() { "none up".into() } else { up.join(", ") }
    }

    fn close_all(&mut self, why: &str) {
        for link in self.links.values() {
            if let Some(s) = &link.session {
                s.close(GoAwayCode::Deregistered, why);
            }
        }
    }
}

/// Keeps a tunnel up to `target` with its own backoff, reporting to the
/// supervisor, until the cluster is deregistered or the link is retired.
async fn link(ctx: Rc<AgentCtx>, serial: u64, target: Target, tx: Mailbox, retire: Rc<Cell<bool>>) {
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
    let mut first = true;
    loop {
        if !first {
            ctx.metrics.reconnects.set(ctx.metrics.reconnects.get() + 1);
        }
        first = false;
        let result = attempt(&ctx, serial, &target, &tx).await;
        tx.send(Msg::Down { serial });
        if ctx.stopping.get() || retire.get() {
            // The agent is stopping, or the replica left: stay down.
            return;
        }
        match result {
            Attempt::Stop(why) => {
                tx.send(Msg::Stop(why));
                return;
            }
            Attempt::Ended(why) => {
                let wait = backoff.after_session();
                log::warn!("tunnel ended ({why}); reconnecting to {target} in {} ms", wait.as_millis());
                smol::Timer::after(wait).await;
            }
            Attempt::Failed(why) => {
                let wait = backoff.next_delay();
                log::warn!("cannot connect to the hub: {why}; retrying in {} ms", wait.as_millis());
                smol::Timer::after(wait).await;
            }
        }
    }
}

async fn attempt(ctx: &Rc<AgentCtx>, serial: u64, target: &Target, tx: &Mailbox) -> Attempt {
    let io = match open(ctx, target).await {
        Ok(io) => io,
        Err(Open::Stop(why)) => return Attempt::Stop(why),
        Err(Open::Failed(why)) => return Attempt::Failed(why),
    };
    let info = ctx.agent_info().await;
    let session = Session::new(Mux::agent(Config::default(), info, Instant::now()));
    ctx.sessions.borrow_mut().insert(serial, session.clone());
    // Out of `ctx.sessions` when this attempt ends, or is cancelled (a
    // link dropped while its dial was under way).
    let listed = Listed { ctx: ctx.clone(), serial };
    let up_since = Cell::new(None);
    let ready = async {
        if session.connected().await.is_ok() {
            up_since.set(Some(Instant::now()));
            log::info!("tunnel up to {target}");
            super::notify::notify("STATUS=tunnel up");
            tx.send(Msg::Up { serial, session: session.clone() });
        }
        let sets = async {
            while let Some(set) = session.next_replica_set().await {
                tx.send(Msg::Set { serial, set });
            }
            std::future::pending::<SessionError>().await
        };
        let streams = async {
            while let Some((stream, head)) = session.accept().await {
                // Detached: the task owns its stream and ends with it — at
                // the end of the exchange, or when the session closes
                // (every stream operation then fails).
                ctx.ex.spawn(proxy::serve(ctx.clone(), stream, head)).detach();
            }
            // `accept` ends on the hub's GoAway. ShuttingDown lets in-flight
            // streams finish; a deregistered cluster serves nothing more, so
            // the session ends now instead of when the last watch does.
            match session.goaway_received() {
                Some((code @ (GoAwayCode::Deregistered | GoAwayCode::Unauthorized), message)) => {
                    session.close(code, "agent stopping: cluster deregistered");
                    SessionError::GoAway { code, message }
                }
                // The hub is going away but its in-flight streams (long
                // watches, exec sessions) finish on this connection: a new
                // tunnel comes up beside it at once.
                Some((code @ GoAwayCode::ShuttingDown, message)) if !ctx.stopping.get() => {
                    SessionError::GoAway { code, message }
                }
                _ => std::future::pending::<SessionError>().await,
            }
        };
        smol::future::or(streams, sets).await
    };
    let s2 = session.clone();
    let mut run = ctx.ex.spawn(async move { s2.run(io).await });
    let error = smol::future::or(&mut run, ready).await;
    if matches!(error, SessionError::GoAway { code: GoAwayCode::ShuttingDown, .. }) && !run.is_finished() {
        // Detached: the old session ends by itself once its last stream
        // does, or when the hub closes the connection; it stays in
        // `ctx.sessions` meanwhile, so SIGTERM drains it too.
        ctx.ex
            .spawn(async move {
                run.await;
                drop(listed);
            })
            .detach();
    }
    match &error {
        SessionError::GoAway { code: GoAwayCode::Deregistered | GoAwayCode::Unauthorized, message } => {
            Attempt::Stop(format!("the hub closed the tunnel: {message}"))
        }
        // The hub is going away: another process (or replica) takes the
        // dial, so it is as good as a session that worked.
        SessionError::GoAway { code: GoAwayCode::ShuttingDown, .. } => Attempt::Ended(error.to_string()),
        _ => match up_since.get() {
            Some(t) if t.elapsed() >= WORKED_AFTER => Attempt::Ended(error.to_string()),
            Some(t) => {
                Attempt::Failed(format!("tunnel ended {} ms after it came up: {error}", t.elapsed().as_millis()))
            }
            // Upgraded but no Welcome (a hub that refused the handshake or
            // went silent): a failed dial, so the backoff grows.
            None => Attempt::Failed(format!("tunnel handshake with {target}: {error}")),
        },
    }
}

/// A session listed in `AgentCtx::sessions`; unlisted when dropped.
struct Listed {
    ctx: Rc<AgentCtx>,
    serial: u64,
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.ctx.sessions.borrow_mut().remove(&self.serial);
    }
}

enum Open {
    Failed(String),
    Stop(String),
}

/// Dials `target` and upgrades to the tunnel protocol. The certificate is
/// checked against the public URL's host whatever the address dialled:
/// every replica presents the one certificate the replicas share, issued
/// for the public name (and verified against the pinned hub CA).
async fn open(ctx: &AgentCtx, target: &Target) -> Result<Prefixed<Io>, Open> {
    let proxy = ctx.proxies.for_target(target).map_err(Open::Failed)?;
    let io = net::dial_as(target, &ctx.hub.host, Some(&ctx.hub_tls), proxy.as_ref()).await.map_err(|e| {
        Open::Failed(format!("{target}{}: {e}", proxy.map(|p| format!(" via proxy {}", p.target)).unwrap_or_default()))
    })?;
    if let Err(e) = io.set_notsent_lowat(crate::driver::TUNNEL_NOTSENT_LOWAT) {
        log::debug!("TCP_NOTSENT_LOWAT not set on the tunnel: {e}");
    }
    let mut conn = Conn::new(io);
    let path = format!("{}/v1/tunnel", target.path_prefix);
    let headers = [
        Header::new("Connection", "Upgrade"),
        Header::new("Upgrade", "uplink/1"),
        Header::new("Authorization", format!("Bearer {}", ctx.credential.expose())),
        Header::new("User-Agent", super::kube::user_agent()),
    ];
    let head = http1::request_head("GET", &path, &target.authority(), &headers);
    let handshake = async {
        conn.write_all(&head).await?;
        conn.read_head(false).await
    };
    let resp = net::deadline(net::dial_timeout(), || "the hub's answer to the tunnel request".into(), handshake)
        .await
        .map_err(|e| Open::Failed(format!("tunnel request to {target}: {e}")))?;
    if resp.status == 101 {
        let ok = resp.header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case(b"uplink/1"));
        if !ok {
            return Err(Open::Failed("the hub switched to a protocol other than uplink/1".into()));
        }
        let (mut io, leftover) = conn.into_parts();
        // Frames come in bursts (a request's, a batch of them): the read
        // that takes a burst is followed by a wait, not by a `recv` that
        // finds nothing.
        io.short_reads_after_wait_drain(true);
        return Ok(Prefixed::new(leftover, io));
    }
    let mut reader = http1::BodyReader::new(resp.body);
    let mut body = Vec::new();
    while let Ok(Some(p)) = reader.next(&mut conn).await {
        body.extend(p);
        if body.len() > 64 * 1024 {
            break;
        }
    }
    let (code, message) = error_body(&body);
    // The contract: 401 (credential unknown) and 403 cluster_deregistered
    // (revoked) are final. Another 403 may come from something in between
    // (a proxy, a WAF) and is retried like any other failure.
    let final_refusal = resp.status == 401 || (resp.status == 403 && code == "cluster_deregistered");
    if final_refusal {
        return Err(Open::Stop(format!(
            "the hub refused the agent's credential ({} {}{}): the cluster was deregistered or its credential revoked",
            resp.status,
            if code.is_empty() { "unauthorized" } else { &code },
            if message.is_empty() || message == code { String::new() } else { format!(": {message}") },
        )));
    }
    Err(Open::Failed(format!("the hub answered the tunnel request with {} {message}", resp.status)))
}

/// What the agent reports about itself in `Hello` and at activation.
pub fn agent_info(kube_version: String, node_count: u32) -> AgentInfo {
    AgentInfo {
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        arch: std::env::consts::ARCH.to_string(),
        kube_version,
        node_count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_capped_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let ceilings: Vec<u128> = (0..8)
            .map(|_| {
                let c = b.ceiling();
                let d = b.next_delay();
                assert!(d <= c, "{d:?} over {c:?}");
                c.as_millis()
            })
            .collect();
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        // Full jitter spreads over the whole range.
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
        let samples: Vec<Duration> = (0..200).map(|_| b.next_delay()).collect();
        assert!(samples.iter().any(|d| *d < Duration::from_secs(2)));
        assert!(samples.iter().any(|d| *d > Duration::from_secs(8)));
        for _ in 0..100 {
            b.next_delay();
        }
        assert!(b.ceiling() <= Duration::from_secs(10));
    }

    #[test]
    fn after_a_session_that_worked_the_redial_is_immediate_and_failures_grow() {
        let mut b = Backoff::with_seed(BACKOFF_BASE, BACKOFF_CAP, 7);
        // Failing dials push the ceiling up...
        for _ in 0..5 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), BACKOFF_BASE * 32);
        // ...a session that worked starts it over with a jitter-only wait.
        for _ in 0..100 {
            assert!(b.after_session() <= REDIAL_JITTER);
        }
        assert_eq!(b.ceiling(), BACKOFF_BASE);
        // The same seed gives the same waits.
        let waits = |seed| {
            let mut b = Backoff::with_seed(BACKOFF_BASE, BACKOFF_CAP, seed);
            (0..10).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(waits(42), waits(42));
        assert_ne!(waits(42), waits(1042));
        // Full jitter over the redial window: not all at once, not all late.
        let mut b = Backoff::with_seed(BACKOFF_BASE, BACKOFF_CAP, 99);
        let w: Vec<Duration> = (0..1000).map(|_| b.after_session()).collect();
        assert!(w.iter().filter(|d| **d < REDIAL_JITTER / 4).count() > 150);
        assert!(w.iter().filter(|d| **d > REDIAL_JITTER * 3 / 4).count() > 150);
    }
}
