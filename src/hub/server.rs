//! `uplink-hub serve`: one HTTPS port, one thread.
//!
//! Start-up: data directory → store → TLS material → listener → (first
//! start only) admin user, whose token is printed once. Then an accept
//! loop on a `LocalExecutor`; each connection is admitted by the
//! connection caps (`limits::Gate`, a 503 otherwise), then is a task:
//!
//! ```text
//!  TLS (≤ handshake) ─ ALPN h2 ──────► hyper http2 (bounded: h2_limits)
//!                    └ http/1.1, none ► hyper http1 + upgrades
//!        each request ─► serve_request: credential → Ticket, our framing
//!                        rules (HTTP/1.1), route ─► handler ─► Reply
//!  closed when: no request in flight for `idle`; an HTTP/1.1 head not
//!  whole within `head` of its first byte (rt::Io); a client that stops
//!  reading for `small_body` (rt::Io); the hub drains (graceful: GOAWAY)
//! ```
//!
//! Not here: the bytes of HTTP (hyper's), handlers (they take `http`'s
//! types and never this module's).
//!
//! SIGTERM/SIGINT: the listener closes at once, agents get
//! `GoAway(ShuttingDown)` so they reconnect at once to whoever holds the
//! port next, and in-flight requests get a short drain. So that someone
//! does hold it, the port can be shared:
//!
//! ```text
//!  systemd socket activation (LISTEN_FDS=1, fd 3): the socket outlives the
//!      process; connections made during a restart wait in its queue.
//!  --reuse-port (SO_REUSEPORT): start the new process, then SIGTERM the
//!      old one; the kernel sends new connections to whichever listens.
//! ```

use super::http::{Body, Incoming, Proto, Reply, Request, Response};
use super::limits::{self, Gate, Limits, Ticket};
use super::rt::{self, Tls};
use super::store::cache::CachedStore;
use super::store::postgres::{self, PgConfig, PostgresStore, SharedIdentity};
use super::store::sqlite::SqliteStore;
use super::store::{Store, notify};
use super::{Hub, agents, api, cert, console, fleet, kube, new_token};
use crate::proto::GoAwayCode;
use crate::socket::Socket;
use futures_rustls::TlsAcceptor;
use log::{info, warn};
use smol::future::FutureExt;
use smol::io::AsyncWriteExt;
use smol::{Async, LocalExecutor, Timer};
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::net::TcpListener;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long shutdown waits for agents to leave and requests to finish.
const DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub public_url: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Deadlines and connection caps (`limits`).
    pub limits: Limits,
    /// Tunnel ping interval, told to agents in `Welcome`.
    pub keepalive: Duration,
    /// Tunnel dead-peer deadline, told to agents in `Deadline`.
    pub dead_after: Duration,
    /// Listen with `SO_REUSEPORT` so a successor can bind while this
    /// process drains.
    pub reuse_port: bool,
    /// The organisation's identity provider (`--oidc-*`).
    pub oidc: Option<super::oidc::OidcConfig>,
    /// `--store`: see [`StoreSpec`].
    pub store: Option<String>,
    /// Where agents reach this replica itself, beside the load balancer's
    /// `public_url` (shared store only).
    pub advertise_url: Option<String>,
}

/// Runs the hub until SIGTERM or SIGINT.
pub fn serve(cfg: ServeConfig) -> Result<(), String> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| format!("{}: {e}", cfg.data_dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700));
    }
    let Opened { store, identity, shared, replica } = open_store(&cfg)?;

    let (listener, socket_activated) = listen(&cfg)?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let public_url = match &cfg.public_url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => {
            let host = if local.ip().is_loopback() || local.ip().is_unspecified() && cert::hostname().is_none() {
                "localhost".to_string()
            } else if local.ip().is_unspecified() {
                cert::hostname().unwrap_or_else(|| "localhost".into())
            } else {
                local.ip().to_string()
            };
            format!("https://{host}:{}", local.port())
        }
    };

    let material = match (&cfg.cert, &cfg.key) {
        (Some(c), Some(k)) => cert::TlsMaterial {
            cert_pem: std::fs::read_to_string(c).map_err(|e| format!("{}: {e}", c.display()))?,
            key_pem: std::fs::read_to_string(k).map_err(|e| format!("{}: {e}", k.display()))?,
            ca_pem: None,
        },
        (None, None) => {
            let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
            names.extend(cert::hostname());
            if let Some(h) = url_host(&public_url) {
                names.push(h);
            }
            names.sort();
            names.dedup();
            match &identity {
                Some(id) => cert::from_identity(id, &cfg.data_dir, &names)?,
                None => cert::self_signed(&cfg.data_dir, &names)?,
            }
        }
        _ => return Err("--cert and --key go together".into()),
    };
    let replicas = match replica {
        None => super::replicas::Replicas::default(),
        Some(id) => {
            let me = super::store::Replica {
                id,
                advertise_url: advertise_url(&cfg, local),
                version: env!("CARGO_PKG_VERSION").into(),
                started_at: super::clock::now_ms(),
            };
            store
                .join_replica(&me, me.started_at, super::replicas::DEADLINE.as_millis() as i64)
                .map_err(|e| e.to_string())?;
            info!("replica joined id={} advertise_url={}", me.id, me.advertise_url);
            let key = identity.as_ref().map(|i| &i.ca_key_pem).ok_or("a shared store without a hub identity")?;
            super::replicas::Replicas::shared(me, super::replicas::handoff::PeerTrust::new(key, &material.cert_pem)?)
        }
    };
    let tls = crate::tls::server_config(&material.cert_pem, &material.key_pem).map_err(|e| e.to_string())?;
    // h2 first: a client that speaks both gets HTTP/2 (RFC 7301 lets the
    // server pick; rustls picks in the server's order).
    let mut offer = (*tls).clone();
    offer.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptors = Acceptors { http: TlsAcceptor::from(std::sync::Arc::new(offer)), refusal: TlsAcceptor::from(tls) };

    start_listening(&cfg, &listener, socket_activated)?;
    // `listening on` is a stable line: tests and scripts read the port from it.
    println!("uplink-hub {} listening on https://{local}", env!("CARGO_PKG_VERSION"));
    println!("public URL: {public_url}");
    if store.user_count().map_err(|e| e.to_string())? == 0 {
        let (token, hash) = new_token();
        match store.create_user("admin", &[], true, &hash, super::clock::now_ms()) {
            Ok(_) => {
                println!("first start: created admin user \"admin\"");
                println!("admin token (shown only this once; keep it safe): {}", token.expose());
                println!("console: {public_url}/");
                println!("CLI:     export UPLINK_HUB_URL={public_url} UPLINK_TOKEN=<the token above>");
            }
            // Replicas of a shared store starting together: another one
            // made the admin a moment ago and printed its token.
            Err(super::store::StoreError::Conflict(_)) => {
                println!("first start: another replica created the admin user")
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    if let Some(ca) = &material.ca_pem {
        let pin = crate::tls::certs_from_pem(&material.cert_pem, "hub cert")
            .ok()
            .and_then(|c| c.first().and_then(|c| crate::tls::spki_pin(c)));
        println!(
            "hub CA: {} (export UPLINK_HUB_CA={})",
            cfg.data_dir.join("ca.pem").display(),
            cfg.data_dir.join("ca.pem").display()
        );
        if let Some(pin) = pin {
            println!("hub key pin (sha256 SPKI): {pin}");
        }
        let _ = ca;
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();

    let limits = cfg.limits.fit_open_files(limits::open_file_limit());
    if limits.max_connections < cfg.limits.max_connections {
        warn!(
            "connection cap lowered to {} to fit the open-file limit (raise LimitNOFILE / ulimit -n for more)",
            limits.max_connections
        );
    }
    let hub = Rc::new(Hub {
        store,
        tunnels: Default::default(),
        replicas,
        bus: Default::default(),
        metrics: Default::default(),
        public_url,
        ca_pem: material.ca_pem,
        draining: Default::default(),
        drain_started: Default::default(),
        agent_image: format!("ghcr.io/uplink/uplink:{}", env!("CARGO_PKG_VERSION")),
        gate: Gate::new(limits),
        tunnel_config: crate::proto::Config {
            keepalive: cfg.keepalive,
            dead_after: cfg.dead_after,
            ..Default::default()
        },
        oidc: cfg.oidc.clone().map(super::oidc::Provider::load),
    });
    if let Some(p) = &hub.oidc {
        println!("identity provider: {} (client {})", p.config.issuer, p.config.client_id);
    }

    let ex = Rc::new(LocalExecutor::new());
    rt::set_executor(ex.clone());
    smol::block_on(ex.run(async {
        let listener = Rc::new(Async::new(listener).map_err(|e| e.to_string())?);
        let acceptors = Rc::new(acceptors);
        let signals = async_signal::Signals::new([async_signal::Signal::Term, async_signal::Signal::Int])
            .map_err(|e| format!("cannot watch signals: {e}"))?;
        // Owned by the executor: it ends with the hub.
        if hub.oidc.is_some() {
            let h = hub.clone();
            ex.spawn(async move {
                if let Some(p) = &h.oidc {
                    p.refresh_periodically().await;
                }
            })
            .detach();
        }
        if let Some(pg) = shared {
            watch_shared_store(&ex, &hub, pg)?;
            // Owned by the executor: it ends with the hub.
            ex.spawn(super::replicas::Replicas::run(hub.clone())).detach();
        }
        // Both are tasks, not futures raced here: `ex.run` polls this
        // future on every wake-up of the executor, which re-polled the
        // accept (an `accept4` returning EAGAIN 1.2 times per proxied
        // request, 3 % of the hub's CPU) and the signal pipe. A task is
        // polled only when its own waker fires.
        let accepting = {
            let (ex, hub, listener, acceptors) = (ex.clone(), hub.clone(), listener.clone(), acceptors.clone());
            ex.clone().spawn(async move { accept_loop(&ex, &hub, &listener, &acceptors).await })
        };
        let signal = ex.spawn(async move {
            use smol::stream::StreamExt;
            let mut signals = signals;
            signals.next().await
        });
        let sig = signal.await;
        info!("shutting down signal={sig:?} agents={}", hub.tunnels.agent_count());
        // Cancelled and dropped here, with its handle on the executor.
        accepting.cancel().await;
        // Stop listening now, not after the drain: new connections go to
        // the next process (SO_REUSEPORT) or wait in systemd's socket.
        // Those already queued on a socket of our own would be reset with
        // it, so they are taken and served first: one poll of the accept
        // loop takes every connection that is ready (it does not yield
        // while accepts succeed).
        if !socket_activated {
            accept_loop(&ex, &hub, &listener, &acceptors).or(async {}).await;
        }
        drop(listener);
        info!("stopped listening; draining");
        // Requests on connections accepted a moment ago get their streams
        // before the agents hear GoAway (after which no stream opens).
        Timer::after(Duration::from_millis(200)).await;
        hub.draining.set(true);
        hub.drain_started.notify(usize::MAX);
        // Out of the set first: the other replicas tell the agents, which
        // then keep their other tunnels and do not dial this one again.
        hub.replicas.leave(&hub);
        hub.tunnels.go_away_all(GoAwayCode::ShuttingDown, "hub shutting down; reconnect");
        let drained = async {
            while hub.tunnels.agent_count() > 0 {
                Timer::after(Duration::from_millis(50)).await;
            }
        };
        drained
            .or(async {
                Timer::after(DRAIN).await;
            })
            .await;
        info!("stopped");
        Ok::<(), String>(())
    }))
}

/// What [`open_store`] opened.
struct Opened {
    store: Rc<dyn Store>,
    /// The CA and keys every replica shares (shared store only).
    identity: Option<SharedIdentity>,
    /// Where the shared store is, for the change listener.
    shared: Option<PgConfig>,
    /// This replica's id (shared store only).
    replica: Option<String>,
}

/// Where the store is: `--store` (or `UPLINK_HUB_STORE`), a PostgreSQL
/// URL, an SQLite path or `sqlite:` URL, by default `DATA_DIR/hub.db`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    Sqlite(PathBuf),
    /// The connection string (it may hold a password: never logged).
    Postgres(String),
}

impl StoreSpec {
    pub fn parse(spec: Option<&str>, data_dir: &std::path::Path) -> StoreSpec {
        match spec.map(str::trim).filter(|s| !s.is_empty()) {
            None => StoreSpec::Sqlite(data_dir.join("hub.db")),
            Some(s) if s.starts_with("postgres://") || s.starts_with("postgresql://") => StoreSpec::Postgres(s.into()),
            Some(s) => {
                let path = s.strip_prefix("sqlite://").or_else(|| s.strip_prefix("sqlite:")).unwrap_or(s);
                StoreSpec::Sqlite(PathBuf::from(path))
            }
        }
    }
}

/// Opens the store behind its cache. The cache answers every kube
/// request's token, grant and cluster reads; with SQLite this process is
/// the database's only writer, with PostgreSQL other replicas' writes
/// reach it through [`watch_shared_store`].
fn open_store(cfg: &ServeConfig) -> Result<Opened, String> {
    match StoreSpec::parse(cfg.store.as_deref(), &cfg.data_dir) {
        StoreSpec::Sqlite(path) => {
            let db = SqliteStore::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(Opened { store: Rc::new(CachedStore::new(db)), identity: None, shared: None, replica: None })
        }
        StoreSpec::Postgres(url) => {
            let config = PgConfig::parse(&url)?;
            let replica = format!("r_{}", crate::secret::Secret::random(6).expose());
            let db = PostgresStore::open(config.clone(), &replica, cert::new_identity)?;
            info!(
                "store: PostgreSQL at {} tls={} (schema version {}) replica={replica}",
                config.display,
                config.ssl_mode.as_str(),
                postgres::SCHEMA_VERSION
            );
            let identity = Some(db.identity().clone());
            Ok(Opened { store: Rc::new(CachedStore::new(db)), identity, shared: Some(config), replica: Some(replica) })
        }
    }
}

/// Keeps this replica's cache in step with the shared store: change
/// notifications empty it within moments of another replica's commit,
/// and a periodic refresh (while the store answers) covers any that were
/// lost. The tasks are detached: they belong to the executor and end
/// with the hub.
fn watch_shared_store(ex: &LocalExecutor<'_>, hub: &Rc<Hub>, pg: PgConfig) -> Result<(), String> {
    let (tx, rx) = smol::channel::bounded(1);
    notify::listen(pg, tx).map_err(|e| format!("cannot start the change listener: {e}"))?;
    let h = hub.clone();
    ex.spawn(async move {
        while let Ok(change) = rx.recv().await {
            log::debug!("store change={change:?}");
            h.store.invalidate();
            stop_deregistered(&h);
        }
    })
    .detach();
    let h = hub.clone();
    ex.spawn(async move {
        loop {
            Timer::after(notify::REFRESH).await;
            // While the store is away the cache is all there is: keep it.
            if h.store.check().is_ok() {
                h.store.invalidate();
                stop_deregistered(&h);
            }
        }
    })
    .detach();
    Ok(())
}

/// Sends `GoAway(Deregistered)` on this replica's tunnels to clusters
/// another replica deregistered. One query, only while this replica
/// holds tunnels; its people were already refused, by the cache.
fn stop_deregistered(hub: &Hub) {
    let held = hub.tunnels.per_cluster();
    if held.is_empty() {
        return;
    }
    let Ok(all) = hub.store.clusters() else { return };
    for c in all.iter().filter(|c| c.lifecycle == super::store::Lifecycle::Deregistered) {
        if held.iter().any(|(id, _)| *id == c.id) {
            let message = format!("cluster {} was deregistered from the hub; this agent must stop", c.name);
            let n = hub.tunnels.go_away(&c.id, GoAwayCode::Deregistered, &message);
            log::info!("cluster deregistered on another replica cluster={} agents_notified={n}", c.name);
            hub.bus.publish(&c.name, "deregistered", "DEREGISTERED");
        }
    }
}

/// The socket to serve on: the one systemd passed (socket activation,
/// already listening), else a new one bound to `cfg.listen`, shared with
/// `SO_REUSEPORT` when asked, that [`start_listening`] opens once the hub
/// can serve. Until then a connection to the port is refused at once, so
/// a load balancer moves on to another replica instead of waiting in the
/// queue of one still starting (and a `--reuse-port` successor gets none
/// before it is ready).
fn listen(cfg: &ServeConfig) -> Result<(std::net::TcpListener, bool), String> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() > 0 {
        let listener = fds
            .take_tcp_listener(0)
            .map_err(|e| format!("the socket systemd passed (fd 3): {e}"))?
            .ok_or("systemd passed no TCP socket at fd 3: the .socket unit needs ListenStream=")?;
        info!("listening on the socket systemd passed addr={:?}", listener.local_addr().ok());
        return Ok((listener, true));
    }
    let cannot = |e: std::io::Error| format!("cannot listen on {}: {e}", cfg.listen);
    use rustix::net::{AddressFamily, SocketFlags, SocketType, sockopt};
    let family = if cfg.listen.is_ipv4() { AddressFamily::INET } else { AddressFamily::INET6 };
    let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)
        .map_err(|e| cannot(e.into()))?;
    // As the standard library's bind does: a restart may take the port
    // while the old process's connections linger in TIME_WAIT.
    sockopt::set_socket_reuseaddr(&fd, true).map_err(|e| cannot(e.into()))?;
    if cfg.reuse_port {
        sockopt::set_socket_reuseport(&fd, true).map_err(|e| cannot(e.into()))?;
    }
    rustix::net::bind(&fd, &cfg.listen).map_err(|e| cannot(e.into()))?;
    Ok((std::net::TcpListener::from(fd), false))
}

/// Opens the bound socket for connections (a socket systemd passed
/// already is).
fn start_listening(cfg: &ServeConfig, listener: &std::net::TcpListener, socket_activated: bool) -> Result<(), String> {
    if socket_activated {
        return Ok(());
    }
    // Room for a fleet's agents redialling at once (the kernel caps it at
    // net.core.somaxconn).
    rustix::net::listen(listener, 1024).map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))
}

/// This replica's own URL: `--advertise-url`, else this host's name (or
/// the listening address) and port, never the load balancer's.
fn advertise_url(cfg: &ServeConfig, local: SocketAddr) -> String {
    if let Some(u) = &cfg.advertise_url {
        return u.trim_end_matches('/').to_string();
    }
    let host = if local.ip().is_unspecified() {
        cert::hostname().unwrap_or_else(|| "localhost".into())
    } else if local.is_ipv6() {
        format!("[{}]", local.ip())
    } else {
        local.ip().to_string()
    };
    format!("https://{host}:{}", local.port())
}

/// Whether this hub should get new work: not while draining, not while
/// its store is away (the reason is in the body).
fn readyz(hub: &Hub) -> Response {
    if hub.draining.get() {
        return Response::new(503, "text/plain", "draining\n");
    }
    match hub.store.check() {
        Ok(()) => Response::new(200, "text/plain", "ready\n"),
        Err(e) => Response::new(503, "text/plain", format!("{e}\n")),
    }
}

fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    (!host.is_empty()).then(|| host.to_string())
}

/// The TLS acceptors: the one for requests offers `h2` and `http/1.1`;
/// the one for refusals offers `http/1.1` only, so its 503 can be written
/// before any request is read.
struct Acceptors {
    http: TlsAcceptor,
    refusal: TlsAcceptor,
}

async fn accept_loop(ex: &LocalExecutor<'_>, hub: &Rc<Hub>, listener: &Async<TcpListener>, acceptors: &Acceptors) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("accept failed error={e:?}");
                Timer::after(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.get_ref().set_nodelay(true);
        // Reads only after readiness once a read found nothing (see
        // `crate::socket`): hyper and rustls poll far more often than
        // bytes arrive.
        let mut tcp = Socket::new(tcp);
        // Requests, then a wait for the answer: see the method.
        tcp.short_reads_drain(true);
        let ticket = match hub.gate.admit(peer.ip()) {
            Ok(t) => t,
            Err(why) => {
                refuse_connection(ex, hub, &acceptors.refusal, tcp, peer, why);
                continue;
            }
        };
        let hub = hub.clone();
        let acceptor = acceptors.http.clone();
        // Detached: a connection task owns its socket and ends with it
        // (EOF, error, a deadline); dropping the executor at shutdown
        // cancels any left.
        ex.spawn(async move {
            match handshake(&acceptor, tcp, peer, hub.gate.limits().handshake).await {
                Ok(tls) => connection(hub, tls, peer, ticket).await,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    super::metrics::Metrics::bump(&hub.metrics.slow_closed);
                }
                Err(_) => {}
            }
        })
        .detach();
    }
}

/// The TLS handshake, within `deadline` of accept (else `TimedOut`).
async fn handshake(acceptor: &TlsAcceptor, tcp: Socket, peer: SocketAddr, deadline: Duration) -> std::io::Result<Tls> {
    let timeout = async {
        Timer::after(deadline).await;
        Err(std::io::ErrorKind::TimedOut.into())
    };
    let tls = acceptor.accept(tcp).or(timeout).await;
    if let Err(e) = &tls {
        log::debug!("tls handshake failed peer={peer} error={e}");
    }
    tls
}

/// Answers a connection over a cap with `503` and `Retry-After`, then
/// closes it.
///
/// The 503 is worth a TLS handshake: with the hub's ECDSA key it costs
/// well under a millisecond, and a client that gets one (kubectl,
/// client-go) waits and retries by itself instead of reporting a reset
/// connection. The handshake offers only `http/1.1` (`refusal`), so the
/// answer can be written before the request is read (a slow client must
/// not hold even this); then the hub reads and discards a little so
/// closing does not reset the 503 away (RFC 9112 §9.6). At most
/// [`limits::MAX_REFUSALS_IN_FLIGHT`] refusals run at once, each within
/// [`limits::REFUSAL_DEADLINE`]; past that a refused connection is just
/// closed, so a flood costs the hub accepts and closes, not handshakes.
fn refuse_connection(
    ex: &LocalExecutor<'_>,
    hub: &Rc<Hub>,
    refusal: &TlsAcceptor,
    tcp: Socket,
    peer: SocketAddr,
    why: limits::Refused,
) {
    let message = why.message(hub.gate.limits());
    super::metrics::Metrics::bump(&hub.metrics.connections_refused);
    log::debug!("connection refused peer={peer} reason={why:?}");
    let Some(slot) = hub.gate.refusal_slot() else { return };
    let acceptor = refusal.clone();
    // Detached: bounded by REFUSAL_DEADLINE and by the slot count.
    ex.spawn(async move {
        let _slot = slot;
        let answer = async {
            let Ok(mut tls) = handshake(&acceptor, tcp, peer, limits::REFUSAL_DEADLINE).await else { return };
            let resp = Response::json(503, &crate::kube_status::failure(503, "ServiceUnavailable", &message))
                .with_header("Retry-After", limits::RETRY_AFTER_SECS.to_string());
            if tls.write_all(&resp.h1_bytes()).await.is_err() || tls.flush().await.is_err() {
                return;
            }
            let (mut r, mut w) = smol::io::split(tls);
            let _ = w.close().await;
            let mut sink = [0u8; 4096];
            let mut left: usize = 64 * 1024;
            while left > 0 {
                match smol::io::AsyncReadExt::read(&mut r, &mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        answer
            .or(async {
                Timer::after(limits::REFUSAL_DEADLINE).await;
            })
            .await;
    })
    .detach();
}

/// HTTP/2 bounds, per connection. Each is a flag-free constant: they
/// bound what one authenticated client may hold, and the connection caps
/// (`limits`) bound how many connections there are.
pub mod h2_limits {
    use std::time::Duration;
    /// Streams open at once on one connection. kubectl multiplexes every
    /// watch of one process on one connection: 250 is client-go's own
    /// default ceiling (and the Kubernetes API server's).
    pub const MAX_CONCURRENT_STREAMS: u32 = 250;
    /// Largest decoded header list (RFC 9113 §6.5.2): the same bound as an
    /// HTTP/1.1 head.
    pub const MAX_HEADER_LIST: u32 = 64 * 1024;
    /// Flow-control windows: what one stream, and the connection, may have
    /// in flight unread (RFC 9113 §6.9). 1 MiB per stream lets a watch's
    /// burst through without a round trip; the connection window bounds a
    /// client's uploads in memory.
    pub const STREAM_WINDOW: u32 = 1 << 20;
    pub const CONNECTION_WINDOW: u32 = 4 << 20;
    /// Most bytes queued to send per stream.
    pub const MAX_SEND_BUF: usize = 256 * 1024;
    /// Streams a client may reset before the hub answered them, in flight
    /// at once (rapid reset, CVE-2023-44487); past it the connection gets
    /// GOAWAY.
    pub const MAX_PENDING_ACCEPT_RESETS: usize = 20;
    /// Streams the hub may reset for a client's protocol errors per
    /// connection before it sends GOAWAY (the "MadeYouReset" variant).
    pub const MAX_LOCAL_ERROR_RESETS: usize = 256;
    /// A ping on a silent connection, and how long its answer may take:
    /// a dead peer's connection (and its watches) goes within a minute.
    pub const PING_INTERVAL: Duration = Duration::from_secs(30);
    pub const PING_TIMEOUT: Duration = Duration::from_secs(20);
}

/// Largest HTTP/1.1 request head (RFC 9110 §5.4 lets servers pick; kube
/// clients send a few KiB).
pub const MAX_HEAD: usize = 64 * 1024;

/// One client connection's state, shared by its requests.
struct Conn {
    peer: SocketAddr,
    proto: Proto,
    ticket: RefCell<Ticket>,
    /// Requests in flight, answers still streaming included (atomic only
    /// because the IO adapter that shares it must be `Send` for hyper).
    active: Arc<AtomicUsize>,
    /// Requests begun.
    started: Arc<AtomicUsize>,
    /// When `active` last fell to zero.
    idle_since: Cell<Instant>,
}

/// Counts a request as active until its answer is sent (or abandoned).
struct Active(Rc<Conn>);

impl Active {
    fn new(c: &Rc<Conn>) -> Active {
        c.active.fetch_add(1, Ordering::Relaxed);
        c.started.fetch_add(1, Ordering::Relaxed);
        Active(c.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        let c = &self.0;
        if c.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            c.idle_since.set(Instant::now());
        }
    }
}

/// A response body that keeps its request counted while it streams.
struct Tracked {
    body: Body,
    _active: Active,
}

impl hyper::body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The two kinds of hyper connection, as far as the hub drives them.
trait Serving: std::future::Future<Output = Result<(), hyper::Error>> {
    fn shut_down(self: std::pin::Pin<&mut Self>);
}

impl<S> Serving for hyper::server::conn::http2::Connection<rt::Io<Tls>, S, rt::Exec>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = Tracked>,
    S::Future: 'static,
{
    fn shut_down(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<S> Serving for hyper::server::conn::http1::UpgradeableConnection<rt::Io<Tls>, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = Tracked>,
    S::Future: 'static,
{
    fn shut_down(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Serves one TLS connection with hyper: HTTP/2 when ALPN chose `h2`,
/// else HTTP/1.1 (with upgrades).
async fn connection(hub: Rc<Hub>, tls: Tls, peer: SocketAddr, ticket: Ticket) {
    let limits = *hub.gate.limits();
    let proto = if tls.get_ref().1.alpn_protocol() == Some(b"h2") { Proto::H2 } else { Proto::Http11 };
    let _open = hub.metrics.connection_opened(proto.label());
    let conn = Rc::new(Conn {
        peer,
        proto,
        ticket: RefCell::new(ticket),
        active: Arc::new(AtomicUsize::new(0)),
        started: Arc::new(AtomicUsize::new(0)),
        idle_since: Cell::new(Instant::now()),
    });
    let io = rt::Io::new(tls).with_write_stall(limits.small_body);
    let io = if proto == Proto::H2 {
        io
    } else {
        io.with_head_deadline(limits.head, conn.active.clone(), conn.started.clone())
    };
    let service = {
        let (hub, conn) = (hub.clone(), conn.clone());
        hyper::service::service_fn(move |req| {
            // Counted when hyper hands the request over, not when its
            // future first runs: hyper reads on before polling it, and
            // the head deadline (`rt::Io`) must see the head as complete
            // then, or it arms a timer for every request (each timer
            // wakes async-io's poller: an eventfd write and read).
            let active = Active::new(&conn);
            let hub = hub.clone();
            async move { Ok::<_, std::convert::Infallible>(serve_request(hub, active, req).await) }
        })
    };
    let result = if proto == Proto::H2 {
        use h2_limits::*;
        let mut b = hyper::server::conn::http2::Builder::new(rt::Exec);
        b.timer(rt::Time)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_header_list_size(MAX_HEADER_LIST)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_send_buf_size(MAX_SEND_BUF)
            .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
            .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS)
            .keep_alive_interval(PING_INTERVAL)
            .keep_alive_timeout(PING_TIMEOUT);
        drive(&hub, &conn, &limits, b.serve_connection(io, service)).await
    } else {
        let mut b = hyper::server::conn::http1::Builder::new();
        // The head deadline is the IO adapter's (`with_head_deadline`).
        b.timer(rt::Time).header_read_timeout(None).title_case_headers(true).max_buf_size(MAX_HEAD);
        drive(&hub, &conn, &limits, b.serve_connection(io, service).with_upgrades()).await
    };
    if let Err(e) = result {
        connection_failed(&hub, peer, &e);
    }
}

/// Runs a connection until it ends, closing it gracefully once it has
/// had no request in flight for `limits.idle` or when the hub drains.
async fn drive(hub: &Hub, conn: &Conn, limits: &Limits, serving: impl Serving) -> Result<(), hyper::Error> {
    let mut serving = std::pin::pin!(serving);
    let quiet = async {
        loop {
            // While requests are in flight, look again an idle period on.
            let busy = conn.active.load(Ordering::Relaxed) > 0;
            let due = if busy { Instant::now() + limits.idle } else { conn.idle_since.get() + limits.idle };
            let idle_out = async {
                Timer::at(due).await;
            };
            idle_out.or(hub.draining_started()).await;
            if hub.draining.get()
                || conn.active.load(Ordering::Relaxed) == 0 && conn.idle_since.get().elapsed() >= limits.idle
            {
                return;
            }
        }
    };
    let first = async { Some(serving.as_mut().await) }
        .or(async {
            quiet.await;
            None
        })
        .await;
    if let Some(done) = first {
        return done;
    }
    log::debug!("connection closing peer={} proto={} draining={}", conn.peer, conn.proto.label(), hub.draining.get());
    serving.as_mut().shut_down();
    serving
        .or(async {
            Timer::after(DRAIN).await;
            Ok(())
        })
        .await
}

/// Says why a connection ended, where it matters: a deadline missed (a
/// slow client, counted), or bytes that are not acceptable HTTP (hyper
/// answered 400 or 431 before closing; worth an operator's look).
fn connection_failed(hub: &Hub, peer: SocketAddr, e: &hyper::Error) {
    let io_kind =
        std::error::Error::source(e).and_then(|s| s.downcast_ref::<std::io::Error>()).map(std::io::Error::kind);
    if e.is_timeout() || io_kind == Some(std::io::ErrorKind::TimedOut) {
        // Debug: under a slow-client flood this is thousands of lines;
        // `uplink_hub_slow_clients_closed_total` counts them.
        super::metrics::Metrics::bump(&hub.metrics.slow_closed);
        log::debug!("connection closed peer={peer} reason={e}");
    } else if e.is_parse() || e.is_parse_too_large() {
        warn!("request refused peer={peer} error={e}");
    } else {
        log::debug!("connection ended peer={peer} error={e}");
    }
}

/// One request, from hyper to a handler and back.
async fn serve_request(
    hub: Rc<Hub>,
    active: Active,
    mut req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Tracked> {
    let conn = &active.0;
    let upgrade = (req.version() != hyper::http::Version::HTTP_2).then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let head = Request::from_parts(parts);
    hub.metrics.request(head.proto.label());
    if conn.ticket.borrow().is_pending() && credential_valid(&hub, &head) {
        conn.ticket.borrow_mut().authenticated();
    }
    let reply = match head.framing() {
        Ok(()) => {
            let mut body = Incoming::new(body, upgrade, hub.gate.limits().body_pace());
            let mut reply = route(&hub, &head, &mut body, conn.peer).await;
            // Where a failed body ends is unknown: HTTP/1.1 closes after
            // the answer rather than read on for the next request.
            if body.failed() && head.proto != Proto::H2 {
                reply = match reply {
                    Reply::Send(r) => Reply::Send(r.with_header("Connection", "close")),
                    other => other,
                };
            }
            reply
        }
        Err(e) => {
            // RFC 9112 §6.3: a message whose length cannot be known is
            // answered 400 and the connection closed; reading on would
            // mean guessing where the next request starts.
            warn!("request refused peer={} status=400 error={e}", conn.peer);
            Reply::Send(api::error(400, "bad_request", &e.to_string()).with_header("Connection", "close"))
        }
    };
    let (parts, body) = reply.into_hyper().into_parts();
    hyper::Response::from_parts(parts, Tracked { body, _active: active })
}

/// Whether the request carries a credential the hub knows: a person's
/// token, or on `/v1/tunnel` an agent's. Asked on a connection's requests
/// until one has one, to take it off its address's cap (`limits`);
/// handlers still authenticate every request themselves.
fn credential_valid(hub: &Hub, req: &Request) -> bool {
    if req.target().split('?').next() == Some("/v1/tunnel") {
        return agents::credential_valid(hub, req);
    }
    matches!(api::authenticate(hub, req), Ok(Some(_)))
}

/// The router: one line per route, each a handler of `http` types.
async fn route(hub: &Rc<Hub>, req: &Request, body: &mut Incoming, peer: SocketAddr) -> Reply {
    let path = req.target().split('?').next().unwrap_or("");
    // An ID token naming a key the hub lacks: fetch the keys first, so
    // the (synchronous) authentication below sees them.
    // (The token is looked for only then: every request pays for it.)
    if let Some(p) = &hub.oidc
        && let Some(token) = api::bearer(req)
    {
        p.prepare(token).await;
    }
    if path.starts_with(fleet::KUBE_PREFIX) {
        return fleet::kube(hub, req).await;
    }
    if path.starts_with(fleet::REST_PREFIX) {
        return fleet::rest(hub, req).await;
    }
    if path == "/k8s/clusters" || path.starts_with("/k8s/clusters/") || path.starts_with("/k8s/") {
        return kube::proxy(hub, req, body).await;
    }
    if let Some(hint) = kube::root_hint(req, &hub.public_url) {
        return Reply::Send(hint);
    }
    match (req.method.as_str(), path) {
        ("GET" | "HEAD", "/healthz") => Reply::Send(Response::new(200, "text/plain", "ok\n")),
        ("GET" | "HEAD", "/readyz") => Reply::Send(readyz(hub)),
        ("GET" | "HEAD", "/metrics") => Reply::Send(Response::new(
            200,
            "text/plain; version=0.0.4",
            hub.metrics.render(&agents_by_name(hub), hub.tunnels.stream_count())
                + &connection_gauges(&hub.gate)
                + &super::metrics::store_queries(&hub.store.queries()),
        )),
        ("POST", "/v1/activate") => Reply::Send(agents::activate(hub, req, body).await),
        ("GET", "/v1/tunnel") => agents::tunnel(hub, req, body, peer),
        ("GET", "/v1/peer") => super::replicas::handoff::accept(hub, req, body, peer),
        (_, "/v1/activate" | "/v1/tunnel" | "/v1/peer") => {
            Reply::Send(api::error(405, "method_not_allowed", "wrong method"))
        }
        (m, "/auth/login" | "/auth/callback" | "/auth/logout") => Reply::Send(auth_route(hub, req, m, path).await),
        (_, p) if p == "/api/v1" || p.starts_with("/api/v1/") => Reply::Send(api::handle(hub, req, body).await),
        ("GET" | "HEAD", p) if console::is_console_path(p) => Reply::Send(console::serve(req)),
        _ => Reply::Send(api::error(404, "not_found", &format!("no route for {} {path}", req.method))),
    }
}

/// The console's sign-in routes; 404 when no provider is configured.
async fn auth_route(hub: &Hub, req: &Request, method: &str, path: &str) -> Response {
    use super::oidc::browser;
    let Some(p) = &hub.oidc else {
        return api::error(404, "not_found", "this hub has no identity provider (serve --oidc-issuer)");
    };
    match (method, path) {
        ("GET", "/auth/login") => browser::login(hub, p),
        ("GET", "/auth/callback") => browser::callback(hub, p, req).await,
        ("POST", "/auth/logout") => browser::logout(hub, req),
        _ => api::error(405, "method_not_allowed", &format!("{method} is not supported on {path}")),
    }
}

/// The connection accounting as Prometheus gauges.
fn connection_gauges(gate: &Gate) -> String {
    let (open, pending) = gate.open();
    format!(
        "# HELP uplink_hub_connections_open Client connections held.\n# TYPE uplink_hub_connections_open gauge\n\
         uplink_hub_connections_open {open}\n\
         # HELP uplink_hub_connections_unauthenticated Connections that have not proved a credential yet.\n\
         # TYPE uplink_hub_connections_unauthenticated gauge\nuplink_hub_connections_unauthenticated {pending}\n\
         # HELP uplink_hub_connections_max The connection cap.\n# TYPE uplink_hub_connections_max gauge\n\
         uplink_hub_connections_max {}\n",
        gate.limits().max_connections
    )
}

fn agents_by_name(hub: &Hub) -> Vec<(String, usize)> {
    let names: std::collections::HashMap<String, String> =
        hub.store.clusters().unwrap_or_default().into_iter().map(|c| (c.id, c.name)).collect();
    hub.tunnels.per_cluster().into_iter().map(|(id, n)| (names.get(&id).cloned().unwrap_or(id), n)).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn url_hosts() {
        assert_eq!(super::url_host("https://hub.example.com:8443/x").as_deref(), Some("hub.example.com"));
        assert_eq!(super::url_host("https://[::1]:8443").as_deref(), Some("::1"));
        assert_eq!(super::url_host("https://10.0.0.1").as_deref(), Some("10.0.0.1"));
    }
}
