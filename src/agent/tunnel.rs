//! The tunnel to the hub: dial (through a proxy when the environment
//! says so), TLS, `GET /v1/tunnel` with `Upgrade: uplink/1` and the
//! credential, then the mux until the session ends; and again, forever.
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
use crate::proto::{AgentInfo, Config, GoAwayCode, Header, Mux, SessionError};
use smol::io::{AsyncRead, AsyncWrite};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
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

/// Keeps a tunnel up until the cluster is deregistered.
pub async fn run(ctx: Rc<AgentCtx>) -> Deregistered {
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
    let mut first = true;
    loop {
        if !first {
            ctx.metrics.reconnects.set(ctx.metrics.reconnects.get() + 1);
        }
        first = false;
        let result = attempt(&ctx).await;
        if ctx.stopping.get() {
            // The agent is stopping: whatever ended the session, stay down.
            return std::future::pending().await;
        }
        match result {
            Attempt::Stop(why) => return Deregistered(why),
            Attempt::Ended(why) => {
                let wait = backoff.after_session();
                log::warn!("tunnel ended ({why}); reconnecting in {} ms", wait.as_millis());
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

async fn attempt(ctx: &Rc<AgentCtx>) -> Attempt {
    let io = match open(ctx).await {
        Ok(io) => io,
        Err(Open::Stop(why)) => return Attempt::Stop(why),
        Err(Open::Failed(why)) => return Attempt::Failed(why),
    };
    let info = ctx.agent_info().await;
    let session = Session::new(Mux::agent(Config::default(), info, Instant::now()));
    *ctx.session.borrow_mut() = Some(session.clone());
    let up_since = std::cell::Cell::new(None);
    let ready = async {
        if session.connected().await.is_ok() {
            up_since.set(Some(Instant::now()));
            log::info!("tunnel up to {}", ctx.hub);
            ctx.metrics.tunnel_up.set(true);
            super::notify::notify("STATUS=tunnel up");
        }
        while let Some((stream, head)) = session.accept().await {
            // Detached: the task owns its stream and ends with it — at the
            // end of the exchange, or when the session closes (every
            // stream operation then fails).
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
    let s2 = session.clone();
    let mut run = ctx.ex.spawn(async move { s2.run(io).await });
    let error = smol::future::or(&mut run, ready).await;
    if matches!(error, SessionError::GoAway { code: GoAwayCode::ShuttingDown, .. }) && !run.is_finished() {
        // Detached: the old session ends by itself once its last stream
        // does, or when the hub closes the connection.
        run.detach();
    }
    ctx.metrics.tunnel_up.set(false);
    ctx.session.borrow_mut().take();
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
            None => Attempt::Failed(format!("tunnel handshake with {}: {error}", ctx.hub)),
        },
    }
}

enum Open {
    Failed(String),
    Stop(String),
}

/// Dials the hub and upgrades to the tunnel protocol.
async fn open(ctx: &AgentCtx) -> Result<Prefixed<Io>, Open> {
    let target: &Target = &ctx.hub;
    let proxy = ctx.proxies.for_target(target).map_err(Open::Failed)?;
    let io = net::dial(target, Some(&ctx.hub_tls), proxy.as_ref()).await.map_err(|e| {
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
        let (io, leftover) = conn.into_parts();
        return Ok(Prefixed { prefix: leftover, pos: 0, io });
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

/// A byte stream with some bytes already read from it put back in front.
pub struct Prefixed<T> {
    prefix: Vec<u8>,
    pos: usize,
    io: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.len());
            buf[..n].copy_from_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_close(cx)
    }
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

    #[test]
    fn prefixed_reads_prefix_first() {
        smol::block_on(async {
            use smol::io::AsyncReadExt as _;
            let mut p = Prefixed { prefix: b"ab".to_vec(), pos: 0, io: smol::io::Cursor::new(b"cd".to_vec()) };
            let mut out = Vec::new();
            p.read_to_end(&mut out).await.unwrap();
            assert_eq!(out, b"abcd");
        });
    }
}
