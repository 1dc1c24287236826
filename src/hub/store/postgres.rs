//! The shared store: one PostgreSQL database behind any number of hub
//! replicas (`uplink-hub serve --store postgres://...`).
//!
//! ```text
//!  open:  connection string ──► connect ──► pg_advisory_lock(MIGRATION_LOCK)
//!           (passfile, sslmode)              │ schema_version newer? → error, nothing touched
//!                                            │ apply each missing migration in its own transaction
//!                                            │ hub identity (CA + keys): read, or create and store
//!                                            └ pg_advisory_unlock
//!  calls: one connection, used from the hub's event loop; statements the
//!         hot paths run are prepared once per connection, so such a read
//!         is one round trip. A dropped connection makes calls fail with
//!         [`StoreError::Unavailable`] and is re-dialled with backoff.
//!  audit: its own thread and connection, a batch per transaction, kept
//!         and retried while the database is away.
//!  notify: triggers on the tables a cache holds call pg_notify on
//!         `uplink_changes` at commit (see [`super::notify`]).
//! ```
//!
//! The data mirrors the SQLite store's (same columns, lists as JSON text,
//! times as milliseconds), so both pass the same trait suite. The hub
//! still calls the store synchronously from its one event-loop thread:
//! with a remote database each uncached call costs a network round trip
//! on that thread (and, while the database is away, a re-dial costs up to
//! [`CONNECT_DEADLINE`] at most once per backoff step). A database that
//! hangs holds the loop for at most [`STATEMENT_TIMEOUT`] per call (and a
//! partition for [`TCP_USER_TIMEOUT`]), not forever. Moving the calls off
//! the loop is future work; the [`super::cache::CachedStore`] in front
//! keeps the per-request reads off the database.
//!
//! TLS to the database follows libpq's `sslmode` (`disable`, `prefer`,
//! `require`, `verify-ca`, `verify-full`) with `sslrootcert=`, over
//! rustls ([`super::pg_tls`]).
//!
//! Not here: replica rows and agent-session rows (the replica set), and
//! the cache's invalidation (it listens on its own connection).

use super::audit::{AUDIT_BATCH, AUDIT_GATHER, AuditMsg, AuditWriter};
use super::pg_tls::{MakeRustls, SslMode};
use super::*;
use crate::hub::clock::Millis;
use crate::secret::ct_eq;
use ::postgres::error::SqlState;
use ::postgres::{Client, NoTls, Row, Statement};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Key of the advisory lock taken while migrating and creating the
/// hub's identity (any constant unique to uplink).
const MIGRATION_LOCK: i64 = 0x75706c696e6b; // "uplink"

/// How long the TCP connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a whole connection attempt (TCP, TLS, authentication) may
/// take.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(6);
/// The longest a statement on the serving connection may run, lock waits
/// included. The hub calls the store from its event loop: a database
/// that hangs (a stuck lock, a frozen server) must not hold every request
/// of the replica for longer than this per call.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The same for the audit writer's batches, which nobody waits for
/// except a shutdown.
const AUDIT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long sent data may go unacknowledged before the connection is
/// given up (a network partition), rather than TCP's 15 minutes.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
/// First and longest wait between re-dials of a lost connection.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The channel every change to cached state is announced on.
pub const CHANNEL: &str = "uplink_changes";

/// The schema, one step per version. A step runs once, in one
/// transaction with the row that records it, under [`MIGRATION_LOCK`].
/// Never edit a released step; add the next.
const MIGRATIONS: &[&str] = &[
    // 1: everything the SQLite store has, plus the audit's replica and
    // the hub's shared identity, plus change notifications.
    "
CREATE TABLE users(
  name TEXT PRIMARY KEY, groups TEXT NOT NULL, admin BOOLEAN NOT NULL,
  created_at BIGINT NOT NULL, revoked_at BIGINT, oidc BOOLEAN NOT NULL DEFAULT FALSE);
CREATE TABLE tokens(
  hash TEXT PRIMARY KEY, user_name TEXT NOT NULL REFERENCES users(name), created_at BIGINT NOT NULL);
CREATE INDEX tokens_user ON tokens(user_name);
CREATE TABLE sessions(
  hash TEXT PRIMARY KEY, user_name TEXT NOT NULL REFERENCES users(name), groups TEXT NOT NULL,
  admin BOOLEAN NOT NULL, created_at BIGINT NOT NULL, expires_at BIGINT NOT NULL);
CREATE TABLE grants(
  id BIGSERIAL PRIMARY KEY, subject_kind TEXT NOT NULL, subject TEXT NOT NULL,
  clusters TEXT NOT NULL, created_at BIGINT NOT NULL, UNIQUE(subject_kind, subject, clusters));
CREATE TABLE clusters(
  id TEXT PRIMARY KEY, name TEXT NOT NULL, users TEXT NOT NULL, groups TEXT NOT NULL,
  created_at BIGINT NOT NULL, activated_at BIGINT, deregistered_at BIGINT,
  credential_hash TEXT UNIQUE, agent_version TEXT, arch TEXT, kube_version TEXT, node_count BIGINT,
  last_connected_at BIGINT, last_seen_at BIGINT);
CREATE UNIQUE INDEX clusters_live_name ON clusters(name) WHERE deregistered_at IS NULL;
CREATE TABLE activations(
  seq BIGSERIAL, id TEXT PRIMARY KEY, cluster_id TEXT NOT NULL REFERENCES clusters(id), code_hash TEXT NOT NULL,
  expires_at BIGINT NOT NULL, used_at BIGINT, replaced_at BIGINT);
CREATE TABLE cluster_events(
  id BIGSERIAL PRIMARY KEY, cluster_id TEXT NOT NULL, time BIGINT NOT NULL,
  kind TEXT NOT NULL, message TEXT NOT NULL);
CREATE INDEX cluster_events_cluster ON cluster_events(cluster_id, id);
CREATE TABLE audit(
  id BIGSERIAL PRIMARY KEY, time BIGINT NOT NULL, user_name TEXT NOT NULL, groups TEXT NOT NULL,
  cluster TEXT NOT NULL, method TEXT NOT NULL, path TEXT NOT NULL, status INTEGER NOT NULL,
  bytes_in BIGINT NOT NULL, bytes_out BIGINT NOT NULL, duration_ms BIGINT NOT NULL, upgrade BOOLEAN NOT NULL,
  replica TEXT NOT NULL);
CREATE INDEX audit_time ON audit(time);
CREATE TABLE hub_identity(
  id INTEGER PRIMARY KEY CHECK (id = 1), ca_key_pem TEXT NOT NULL, ca_pem TEXT NOT NULL, key_pem TEXT NOT NULL,
  created_at BIGINT NOT NULL);
CREATE TABLE replicas(
  id TEXT PRIMARY KEY, advertise_url TEXT NOT NULL, version TEXT NOT NULL, started_at BIGINT NOT NULL,
  heartbeat_at BIGINT NOT NULL);
CREATE TABLE agent_sessions(
  replica_id TEXT NOT NULL REFERENCES replicas(id) ON DELETE CASCADE, session_id BIGINT NOT NULL,
  cluster_id TEXT NOT NULL, since BIGINT NOT NULL, facts TEXT NOT NULL, PRIMARY KEY(replica_id, session_id));
CREATE FUNCTION uplink_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('uplink_changes', TG_TABLE_NAME);
  RETURN NULL;
END $$;
CREATE TRIGGER users_changed AFTER INSERT OR UPDATE OR DELETE ON users
  FOR EACH STATEMENT EXECUTE FUNCTION uplink_notify_change();
CREATE TRIGGER tokens_changed AFTER INSERT OR UPDATE OR DELETE ON tokens
  FOR EACH STATEMENT EXECUTE FUNCTION uplink_notify_change();
CREATE TRIGGER sessions_changed AFTER UPDATE OR DELETE ON sessions
  FOR EACH STATEMENT EXECUTE FUNCTION uplink_notify_change();
CREATE TRIGGER grants_changed AFTER INSERT OR UPDATE OR DELETE ON grants
  FOR EACH STATEMENT EXECUTE FUNCTION uplink_notify_change();
CREATE TRIGGER clusters_changed AFTER INSERT OR UPDATE OR DELETE ON clusters
  FOR EACH STATEMENT EXECUTE FUNCTION uplink_notify_change();
",
];

/// The schema version this hub writes.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

const CLUSTER_COLS: &str = "id, name, users, groups, created_at, activated_at, deregistered_at, agent_version, arch, \
                            kube_version, node_count, last_connected_at, last_seen_at";

/// The hub's TLS identity as the database keeps it, shared by every
/// replica so agents' pins hold on all of them. Its `Debug` is redacted.
#[derive(Clone)]
pub struct SharedIdentity {
    pub ca_key_pem: crate::secret::Secret,
    pub ca_pem: String,
    pub key_pem: crate::secret::Secret,
}

impl fmt::Debug for SharedIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedIdentity").field("ca_pem", &self.ca_pem).finish_non_exhaustive()
    }
}

/// Where to connect, parsed from the operator's connection string.
#[derive(Clone)]
pub struct PgConfig {
    config: ::postgres::Config,
    /// The TLS connector (`None`: `sslmode=disable`).
    tls: Option<MakeRustls>,
    /// `sslmode` as it takes effect.
    pub ssl_mode: SslMode,
    /// `user@host:port/db`, for logs and errors (never the password).
    pub display: String,
}

impl fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
    }
}

impl PgConfig {
    /// Parses a `postgres://` or `postgresql://` URL (or libpq's
    /// `key=value` form). Beyond what the driver reads (`sslmode`,
    /// `connect_timeout`, ...) it takes `passfile=PATH`, else
    /// `PGPASSFILE`, else `~/.pgpass`, in libpq's format, when the string
    /// carries no password; a password file others may read is refused
    /// (ignored with a warning when it is the default `~/.pgpass`), as
    /// libpq does. `sslmode` (default `prefer`, as libpq) and
    /// `sslrootcert`, else `PGSSLMODE` and `PGSSLROOTCERT`, choose TLS.
    pub fn parse(conn: &str) -> std::result::Result<PgConfig, String> {
        let (conn, passfile) = take_param(conn, "passfile");
        let (conn, sslmode) = take_param(&conn, "sslmode");
        let (conn, rootcert) = take_param(&conn, "sslrootcert");
        let mut config: ::postgres::Config =
            conn.parse().map_err(|e| format!("invalid PostgreSQL connection string: {e}"))?;
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let mode = SslMode::parse(&sslmode.or_else(|| env("PGSSLMODE")).unwrap_or_else(|| "prefer".into()))?;
        let rootcert = rootcert.or_else(|| env("PGSSLROOTCERT"));
        let (tls, ssl_mode) = MakeRustls::new(mode, rootcert.as_deref())?;
        config.ssl_mode(ssl_mode.driver());
        if config.get_user().is_none() {
            return Err("the PostgreSQL connection string names no user (postgres://USER@HOST/DB)".into());
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // A peer that vanished without a FIN is noticed in about a minute
        // rather than two hours.
        config.keepalives_idle(Duration::from_secs(30));
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
        config.application_name("uplink-hub");
        let host = match config.get_hosts().first() {
            Some(::postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(::postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user = config.get_user().unwrap_or_default().to_string();
        let db = config.get_dbname().unwrap_or(&user).to_string();
        if config.get_password().is_none() {
            let file =
                passfile.map(std::path::PathBuf::from).or_else(|| std::env::var_os("PGPASSFILE").map(Into::into));
            let explicit = file.is_some();
            let file = file.or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".pgpass")));
            if let Some(file) = file {
                let private = private_file(&file);
                match private.and_then(|()| std::fs::read_to_string(&file).map_err(|e| e.to_string())) {
                    Ok(text) => {
                        let pg_host = if host.starts_with('/') { "localhost" } else { &host };
                        if let Some(pw) = passfile_lookup(&text, pg_host, port, &db, &user) {
                            config.password(pw);
                        }
                    }
                    Err(e) if explicit => return Err(format!("PostgreSQL password file {}: {e}", file.display())),
                    // libpq's default file: unreadable or too open is
                    // no password (and a warning), not an error.
                    Err(e) if file.exists() => log::warn!("ignoring PostgreSQL password file {}: {e}", file.display()),
                    Err(_) => {}
                }
            }
        }
        Ok(PgConfig { config, tls, ssl_mode, display: format!("{user}@{host}:{port}/{db}") })
    }

    /// A new connection of its own (the audit writer and the change
    /// listener each keep one), or why not within [`CONNECT_DEADLINE`].
    ///
    /// The driver bounds only the TCP connect; a server that accepts and
    /// then says nothing would hold the caller forever. So the dial runs
    /// on a thread of its own and is abandoned at the deadline: that
    /// thread and its socket end when the peer closes or the kernel gives
    /// up on it (keepalives, set in [`PgConfig::parse`]).
    pub fn connect_client(&self) -> std::result::Result<Client, String> {
        match self.dial().recv_timeout(CONNECT_DEADLINE) {
            Ok(r) => r,
            Err(_) => Err(format!(
                "cannot connect to PostgreSQL at {}: no answer within {}s (is it PostgreSQL, and is the host \
                 and port right?)",
                self.display,
                CONNECT_DEADLINE.as_secs()
            )),
        }
    }

    /// Starts a dial on a thread of its own; its outcome arrives on the
    /// receiver (for a caller that has other work meanwhile).
    pub fn dial(&self) -> mpsc::Receiver<std::result::Result<Client, String>> {
        let (tx, rx) = mpsc::sync_channel(1);
        let (config, tls, display) = (self.config.clone(), self.tls.clone(), self.display.clone());
        let cannot = move |why: String| format!("cannot connect to PostgreSQL at {display}: {why}");
        let spawned = std::thread::Builder::new().name("pg-connect".into()).spawn({
            let (tx, cannot) = (tx.clone(), cannot.clone());
            move || {
                let r = match tls {
                    Some(tls) => config.connect(tls),
                    None => config.connect(NoTls),
                };
                let _ = tx.send(r.map_err(|e| cannot(describe(&e))));
            }
        });
        if let Err(e) = spawned {
            let _ = tx.send(Err(cannot(e.to_string())));
        }
        rx
    }

    /// The same place, each statement of a connection bounded by `limit`
    /// (set at connect time, no extra round trip).
    pub fn with_statement_timeout(&self, limit: Duration) -> PgConfig {
        let mut c = self.clone();
        let set = format!("-c statement_timeout={}", limit.as_millis());
        let options = match self.config.get_options() {
            Some(o) if !o.trim().is_empty() => format!("{o} {set}"),
            _ => set,
        };
        c.config.options(&options);
        c
    }
}

/// `Err` when `path` may be read by others than its owner: libpq's rule
/// for password files.
fn private_file(path: &std::path::Path) -> std::result::Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path)
            && m.permissions().mode() & 0o077 != 0
        {
            return Err(format!(
                "it has group or world access (mode {:o}): permissions should be u=rw (0600) or less",
                m.permissions().mode() & 0o777
            ));
        }
    }
    Ok(())
}

/// Removes `name=value` from a URL's query (or a key=value string) and
/// returns it: the driver refuses parameters it does not know.
fn take_param(conn: &str, name: &str) -> (String, Option<String>) {
    let prefix = format!("{name}=");
    if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        let Some((base, query)) = conn.split_once('?') else { return (conn.to_string(), None) };
        let mut value = None;
        let kept: Vec<&str> = query
            .split('&')
            .filter(|p| match p.strip_prefix(&prefix) {
                Some(v) => {
                    value = Some(percent_decode(v));
                    false
                }
                None => true,
            })
            .collect();
        let conn = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
        (conn, value)
    } else {
        let mut value = None;
        let kept: Vec<&str> = conn
            .split_whitespace()
            .filter(|p| match p.strip_prefix(&prefix) {
                Some(v) => {
                    value = Some(v.trim_matches('\'').to_string());
                    false
                }
                None => true,
            })
            .collect();
        (kept.join(" "), value)
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The password for `host:port:db:user` in a libpq password file: the
/// first line whose fields match (`*` matches anything; `\:` and `\\`
/// escape), `#` lines are comments.
pub fn passfile_lookup(text: &str, host: &str, port: u16, db: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => cur.extend(chars.next()),
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() != 5 {
            continue;
        }
        let matches = |f: &str, v: &str| f == "*" || f == v;
        if matches(&fields[0], host)
            && matches(&fields[1], &port)
            && matches(&fields[2], db)
            && matches(&fields[3], user)
        {
            return Some(fields.swap_remove(4));
        }
    }
    None
}

/// The driver's error in words: the server's message when it sent one.
fn describe(e: &::postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_string();
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

fn backend(e: ::postgres::Error) -> StoreError {
    if e.is_closed() { StoreError::Unavailable(describe(&e)) } else { StoreError::Backend(describe(&e)) }
}

fn is_unique_violation(e: &::postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

fn to_json(list: &[String]) -> String {
    serde_json::to_string(list).unwrap_or_else(|_| "[]".into())
}

fn from_json(text: String) -> Vec<String> {
    serde_json::from_str(&text).unwrap_or_default()
}

fn user_row(r: &Row) -> User {
    User { name: r.get(0), groups: from_json(r.get(1)), admin: r.get(2), created_at: r.get(3), revoked_at: r.get(4) }
}

fn cluster_row(r: &Row) -> Cluster {
    let activated_at: Option<Millis> = r.get(5);
    let deregistered_at: Option<Millis> = r.get(6);
    let agent_version: Option<String> = r.get(7);
    Cluster {
        id: r.get(0),
        name: r.get(1),
        users: from_json(r.get(2)),
        groups: from_json(r.get(3)),
        created_at: r.get(4),
        lifecycle: match (activated_at, deregistered_at) {
            (_, Some(_)) => Lifecycle::Deregistered,
            (Some(_), None) => Lifecycle::Activated,
            (None, None) => Lifecycle::Pending,
        },
        activated_at,
        deregistered_at,
        agent: agent_version.map(|agent_version| AgentFacts {
            agent_version,
            arch: r.get::<_, Option<String>>(8).unwrap_or_default(),
            kube_version: r.get::<_, Option<String>>(9).unwrap_or_default(),
            node_count: r.get::<_, Option<i64>>(10).unwrap_or_default() as u32,
        }),
        last_connected_at: r.get(11),
        last_seen_at: r.get(12),
    }
}

/// The one connection the serving thread uses, and its prepared
/// statements (dropped with it).
struct Conn {
    client: Client,
    prepared: HashMap<&'static str, Statement>,
}

impl Conn {
    /// The serving connection, its statements bounded by
    /// [`STATEMENT_TIMEOUT`].
    fn serving(mut client: Client) -> std::result::Result<Conn, String> {
        client
            .batch_execute(&format!("SET statement_timeout = {}", STATEMENT_TIMEOUT.as_millis()))
            .map_err(|e| describe(&e))?;
        Ok(Conn { client, prepared: HashMap::new() })
    }

    /// The statement for `sql`, prepared on first use: later uses are a
    /// single round trip (bind + execute) instead of two.
    fn prepare(&mut self, sql: &'static str) -> std::result::Result<Statement, ::postgres::Error> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.prepared.insert(sql, s.clone());
        Ok(s)
    }
}

/// Why the store is away and when to dial again.
struct Away {
    reason: String,
    retry_at: Instant,
    backoff: Duration,
}

pub struct PostgresStore {
    config: PgConfig,
    conn: RefCell<Option<Conn>>,
    away: RefCell<Option<Away>>,
    /// Store calls that reached the database, by call (for
    /// `/metrics` and the hot-path figures).
    calls: RefCell<BTreeMap<&'static str, u64>>,
    /// Audit batches the audit thread wrote.
    audit_batches: Arc<AtomicU64>,
    audit: AuditWriter,
    identity: SharedIdentity,
}

impl PostgresStore {
    /// Connects, migrates (once, under the advisory lock, whoever else
    /// starts at the same moment) and loads the shared identity, made by
    /// `new_identity` if no replica has made one yet. `replica` goes into
    /// every audit row this process writes.
    pub fn open(
        config: PgConfig,
        replica: &str,
        new_identity: impl FnOnce() -> std::result::Result<SharedIdentity, String>,
    ) -> std::result::Result<Self, String> {
        let mut client = config.connect_client()?;
        let identity =
            prepare_database(&mut client, new_identity).map_err(|e| format!("PostgreSQL {}: {e}", config.display))?;
        // After the migration, which may wait for another replica's.
        let conn = Conn::serving(client).map_err(|e| format!("PostgreSQL {}: {e}", config.display))?;
        let audit_batches = Arc::new(AtomicU64::new(0));
        let audit = {
            let (config, replica, n) = (config.clone(), replica.to_string(), audit_batches.clone());
            AuditWriter::start(move |rx| audit_thread(config, replica, rx, n))
        }
        .map_err(|e| e.to_string())?;
        Ok(PostgresStore {
            config,
            conn: RefCell::new(Some(conn)),
            away: RefCell::new(None),
            calls: RefCell::new(BTreeMap::new()),
            audit_batches,
            audit,
            identity,
        })
    }

    pub fn config(&self) -> &PgConfig {
        &self.config
    }

    /// The CA and keys every replica presents.
    pub fn identity(&self) -> &SharedIdentity {
        &self.identity
    }

    /// Calls that reached PostgreSQL since start, by store call, and
    /// the audit batches written (`audit_batch`).
    pub fn calls(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<_> = self.calls.borrow().iter().map(|(k, n)| (*k, *n)).collect();
        v.push(("audit_batch", self.audit_batches.load(Ordering::Relaxed)));
        v
    }

    /// Why the store is unreachable, if it is (as of the latest call or
    /// [`Self::probe`]).
    pub fn away(&self) -> Option<String> {
        self.away.borrow().as_ref().map(|a| a.reason.clone())
    }

    /// Checks the connection (re-dialling if due); `Err` says why it is away.
    pub fn probe(&self) -> Result<()> {
        self.with("check", |c| c.client.simple_query("SELECT 1").map(|_| ()).map_err(backend))
    }

    /// Runs `f` on the connection, dialling it first if it was lost and
    /// the backoff allows. A lost connection turns into
    /// [`StoreError::Unavailable`] and is logged once.
    fn with<T>(&self, call: &'static str, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        let mut slot = self.conn.borrow_mut();
        if slot.is_none() {
            let mut away = self.away.borrow_mut();
            let a = away.as_mut().expect("no connection means away");
            if Instant::now() < a.retry_at {
                return Err(StoreError::Unavailable(a.reason.clone()));
            }
            match self.config.connect_client().and_then(Conn::serving) {
                Ok(conn) => {
                    log::info!("store back: reconnected to PostgreSQL at {}", self.config.display);
                    *away = None;
                    *slot = Some(conn);
                }
                Err(e) => {
                    a.reason = e;
                    a.backoff = (a.backoff * 2).min(BACKOFF_MAX);
                    a.retry_at = Instant::now() + a.backoff;
                    return Err(StoreError::Unavailable(a.reason.clone()));
                }
            }
        }
        let conn = slot.as_mut().expect("connected above");
        *self.calls.borrow_mut().entry(call).or_default() += 1;
        let r = f(conn);
        if conn.client.is_closed() {
            let reason = match &r {
                Err(StoreError::Unavailable(m) | StoreError::Backend(m)) => {
                    format!("lost the connection to PostgreSQL at {}: {m}", self.config.display)
                }
                _ => format!("lost the connection to PostgreSQL at {}", self.config.display),
            };
            log::error!("store away: {reason}; retrying with backoff");
            *slot = None;
            *self.away.borrow_mut() =
                Some(Away { reason: reason.clone(), retry_at: Instant::now() + BACKOFF_MIN, backoff: BACKOFF_MIN });
            return match r {
                Err(_) => Err(StoreError::Unavailable(reason)),
                ok => ok,
            };
        }
        r
    }

    fn cluster_by_id(c: &mut Conn, id: &str) -> Result<Cluster> {
        const SQL: &str = "SELECT id, name, users, groups, created_at, activated_at, deregistered_at, agent_version, \
                           arch, kube_version, node_count, last_connected_at, last_seen_at FROM clusters WHERE id = $1";
        let st = c.prepare(SQL).map_err(backend)?;
        c.client
            .query_opt(&st, &[&id])
            .map_err(backend)?
            .map(|r| cluster_row(&r))
            .ok_or_else(|| StoreError::Backend("cluster vanished".into()))
    }
}

/// This replica's row, created or refreshed.
fn upsert_replica(tx: &mut ::postgres::Transaction<'_>, r: &Replica, now: Millis) -> Result<()> {
    tx.execute(
        "INSERT INTO replicas(id, advertise_url, version, started_at, heartbeat_at) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at",
        &[&r.id, &r.advertise_url, &r.version, &r.started_at, &now],
    )
    .map(|_| ())
    .map_err(backend)
}

/// Takes the advisory lock, brings the schema to [`SCHEMA_VERSION`] and
/// reads (or creates) the shared identity, then lets go of the lock.
fn prepare_database(
    client: &mut Client,
    new_identity: impl FnOnce() -> std::result::Result<SharedIdentity, String>,
) -> std::result::Result<SharedIdentity, String> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).map_err(|e| describe(&e))?;
    let r = migrate_and_identity(client, new_identity);
    // Unlocking also happens when the connection closes; a failure here
    // is not worth hiding the real outcome.
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
    r
}

fn migrate_and_identity(
    client: &mut Client,
    new_identity: impl FnOnce() -> std::result::Result<SharedIdentity, String>,
) -> std::result::Result<SharedIdentity, String> {
    let e = |e: ::postgres::Error| describe(&e);
    let exists: bool = client.query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[]).map_err(e)?.get(0);
    let current: i32 = if exists {
        client.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[]).map_err(e)?.get(0)
    } else {
        0
    };
    if current > SCHEMA_VERSION {
        return Err(format!(
            "the database has schema version {current}, newer than this hub's {SCHEMA_VERSION}: \
             run a hub of the newer version (nothing was changed)"
        ));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as i32 + 1;
        let mut tx = client.transaction().map_err(e)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_version(version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .map_err(e)?;
        tx.batch_execute(step)
            .map_err(|err| format!("migration to schema version {version} failed: {}", describe(&err)))?;
        tx.execute(
            "INSERT INTO schema_version(version, applied_at) VALUES ($1, $2)",
            &[&version, &crate::hub::clock::now_ms()],
        )
        .map_err(e)?;
        tx.commit().map_err(e)?;
        log::info!("store migrated to schema version {version}");
    }
    let row = client.query_opt("SELECT ca_key_pem, ca_pem, key_pem FROM hub_identity WHERE id = 1", &[]).map_err(e)?;
    if let Some(r) = row {
        return Ok(SharedIdentity {
            ca_key_pem: crate::secret::Secret::new(r.get::<_, String>(0)),
            ca_pem: r.get(1),
            key_pem: crate::secret::Secret::new(r.get::<_, String>(2)),
        });
    }
    let id = new_identity()?;
    client
        .execute(
            "INSERT INTO hub_identity(id, ca_key_pem, ca_pem, key_pem, created_at) VALUES (1, $1, $2, $3, $4)",
            &[&id.ca_key_pem.expose(), &id.ca_pem, &id.key_pem.expose(), &crate::hub::clock::now_ms()],
        )
        .map_err(e)?;
    log::info!("created the hub's CA and key in the store (shared by every replica)");
    Ok(id)
}

impl Store for PostgresStore {
    fn user_count(&self) -> Result<u64> {
        self.with("user_count", |c| {
            let n: i64 = c.client.query_one("SELECT COUNT(*) FROM users", &[]).map_err(backend)?.get(0);
            Ok(n as u64)
        })
    }

    fn create_user(&self, name: &str, groups: &[String], admin: bool, token_hash: &str, now: Millis) -> Result<User> {
        self.with("create_user", |c| {
            let mut tx = c.client.transaction().map_err(backend)?;
            tx.execute(
                "INSERT INTO users(name, groups, admin, created_at) VALUES ($1, $2, $3, $4)",
                &[&name, &to_json(groups), &admin, &now],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict(format!("user {name} already exists"))
                } else {
                    backend(e)
                }
            })?;
            tx.execute(
                "INSERT INTO tokens(hash, user_name, created_at) VALUES ($1, $2, $3)",
                &[&token_hash, &name, &now],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(User { name: name.into(), groups: groups.to_vec(), admin, created_at: now, revoked_at: None })
        })
    }

    fn users(&self) -> Result<Vec<User>> {
        self.with("users", |c| {
            let rows = c
                .client
                .query("SELECT name, groups, admin, created_at, revoked_at FROM users ORDER BY name", &[])
                .map_err(backend)?;
            Ok(rows.iter().map(user_row).collect())
        })
    }

    fn user(&self, name: &str) -> Result<Option<User>> {
        self.with("user", |c| {
            let st = c
                .prepare("SELECT name, groups, admin, created_at, revoked_at FROM users WHERE name = $1")
                .map_err(backend)?;
            Ok(c.client.query_opt(&st, &[&name]).map_err(backend)?.map(|r| user_row(&r)))
        })
    }

    fn add_token(&self, user: &str, token_hash: &str, now: Millis) -> Result<()> {
        self.with("add_token", |c| {
            // One statement: the user must be live at the moment of the insert.
            let n = c
                .client
                .execute(
                    "INSERT INTO tokens(hash, user_name, created_at)
                     SELECT $1, name, $3 FROM users WHERE name = $2 AND revoked_at IS NULL",
                    &[&token_hash, &user, &now],
                )
                .map_err(backend)?;
            if n == 0 { Err(StoreError::NotFound(format!("no user {user}"))) } else { Ok(()) }
        })
    }

    fn revoke_user(&self, name: &str, now: Millis) -> Result<User> {
        self.with("revoke_user", |c| {
            let mut tx = c.client.transaction().map_err(backend)?;
            let row = tx
                .query_opt(
                    "UPDATE users SET revoked_at = $2 WHERE name = $1 AND revoked_at IS NULL
                     RETURNING name, groups, admin, created_at, revoked_at",
                    &[&name, &now],
                )
                .map_err(backend)?;
            let Some(row) = row else {
                return Err(StoreError::NotFound(format!("no live user {name}")));
            };
            tx.execute("DELETE FROM tokens WHERE user_name = $1", &[&name]).map_err(backend)?;
            tx.execute("DELETE FROM sessions WHERE user_name = $1", &[&name]).map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(user_row(&row))
        })
    }

    fn oidc_sign_in(&self, name: &str, groups: &[String], admin: bool, now: Millis) -> Result<User> {
        self.with("oidc_sign_in", |c| {
            let mut tx = c.client.transaction().map_err(backend)?;
            // FOR UPDATE: two replicas signing the same person in at once
            // see each other's row instead of both inserting.
            let row = tx
                .query_opt(
                    "SELECT name, groups, admin, created_at, revoked_at, oidc FROM users WHERE name = $1 FOR UPDATE",
                    &[&name],
                )
                .map_err(backend)?;
            let user = match row.map(|r| (user_row(&r), r.get::<_, bool>(5))) {
                None => {
                    tx.execute(
                        "INSERT INTO users(name, groups, admin, created_at, oidc) VALUES ($1, $2, $3, $4, TRUE)",
                        &[&name, &to_json(groups), &admin, &now],
                    )
                    .map_err(|e| {
                        if is_unique_violation(&e) {
                            StoreError::Conflict(format!(
                                "user {name} is being created by another request; sign in again"
                            ))
                        } else {
                            backend(e)
                        }
                    })?;
                    User { name: name.into(), groups: groups.to_vec(), admin, created_at: now, revoked_at: None }
                }
                Some((_, false)) => {
                    return Err(StoreError::Conflict(format!(
                        "user {name} is a hub-token user, not one of the identity provider; \
                         give the provider's names a prefix (serve --oidc-user-prefix)"
                    )));
                }
                Some((u, true)) if u.revoked_at.is_some() => u,
                Some((u, true)) if u.groups == groups && u.admin == admin => u,
                Some((u, true)) => {
                    tx.execute(
                        "UPDATE users SET groups = $2, admin = $3 WHERE name = $1",
                        &[&name, &to_json(groups), &admin],
                    )
                    .map_err(backend)?;
                    User { groups: groups.to_vec(), admin, ..u }
                }
            };
            tx.commit().map_err(backend)?;
            Ok(user)
        })
    }

    fn create_session(&self, id_hash: &str, s: &ConsoleSession, now: Millis) -> Result<()> {
        self.with("create_session", |c| {
            let mut tx = c.client.transaction().map_err(backend)?;
            tx.execute("DELETE FROM sessions WHERE expires_at <= $1", &[&now]).map_err(backend)?;
            tx.execute(
                "INSERT INTO sessions(hash, user_name, groups, admin, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
                &[&id_hash, &s.user, &to_json(&s.groups), &s.admin, &now, &s.expires_at],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)
        })
    }

    fn session(&self, id_hash: &str, now: Millis) -> Result<Option<ConsoleSession>> {
        self.with("session", |c| {
            let st = c
                .prepare(
                    "SELECT s.hash, s.user_name, s.groups, s.admin, s.expires_at FROM sessions s
                     JOIN users u ON u.name = s.user_name
                     WHERE s.hash = $1 AND s.expires_at > $2 AND u.revoked_at IS NULL",
                )
                .map_err(backend)?;
            let row = c.client.query_opt(&st, &[&id_hash, &now]).map_err(backend)?;
            // As for tokens: the index found it; compare once more in constant time.
            Ok(row.filter(|r| ct_eq(r.get::<_, &str>(0).as_bytes(), id_hash.as_bytes())).map(|r| ConsoleSession {
                user: r.get(1),
                groups: from_json(r.get(2)),
                admin: r.get(3),
                expires_at: r.get(4),
            }))
        })
    }

    fn delete_session(&self, id_hash: &str) -> Result<()> {
        self.with("delete_session", |c| {
            c.client.execute("DELETE FROM sessions WHERE hash = $1", &[&id_hash]).map(|_| ()).map_err(backend)
        })
    }

    fn user_by_token(&self, token_hash: &str) -> Result<Option<User>> {
        self.with("user_by_token", |c| {
            let st = c
                .prepare(
                    "SELECT t.hash, u.name, u.groups, u.admin, u.created_at, u.revoked_at
                     FROM tokens t JOIN users u ON u.name = t.user_name WHERE t.hash = $1 AND u.revoked_at IS NULL",
                )
                .map_err(backend)?;
            let row = c.client.query_opt(&st, &[&token_hash]).map_err(backend)?;
            Ok(row.filter(|r| ct_eq(r.get::<_, &str>(0).as_bytes(), token_hash.as_bytes())).map(|r| User {
                name: r.get(1),
                groups: from_json(r.get(2)),
                admin: r.get(3),
                created_at: r.get(4),
                revoked_at: r.get(5),
            }))
        })
    }

    fn add_grant(&self, subject: &Subject, clusters: &str, now: Millis) -> Result<Grant> {
        let (kind, name) = match subject {
            Subject::User(n) => ("user", n),
            Subject::Group(n) => ("group", n),
        };
        self.with("add_grant", |c| {
            let row = c
                .client
                .query_one(
                    "INSERT INTO grants(subject_kind, subject, clusters, created_at) VALUES ($1, $2, $3, $4) RETURNING id",
                    &[&kind, name, &clusters, &now],
                )
                .map_err(|e| {
                    if is_unique_violation(&e) {
                        StoreError::Conflict(format!("{kind} {name} already has a grant for {clusters}"))
                    } else {
                        backend(e)
                    }
                })?;
            Ok(Grant { id: row.get(0), subject: subject.clone(), clusters: clusters.into(), created_at: now })
        })
    }

    fn grants(&self) -> Result<Vec<Grant>> {
        self.with("grants", |c| {
            let st = c
                .prepare("SELECT id, subject_kind, subject, clusters, created_at FROM grants ORDER BY id")
                .map_err(backend)?;
            let rows = c.client.query(&st, &[]).map_err(backend)?;
            Ok(rows
                .iter()
                .map(|r| {
                    let kind: &str = r.get(1);
                    let name: String = r.get(2);
                    Grant {
                        id: r.get(0),
                        subject: if kind == "group" { Subject::Group(name) } else { Subject::User(name) },
                        clusters: r.get(3),
                        created_at: r.get(4),
                    }
                })
                .collect())
        })
    }

    fn remove_grant(&self, id: i64) -> Result<()> {
        self.with("remove_grant", |c| {
            match c.client.execute("DELETE FROM grants WHERE id = $1", &[&id]).map_err(backend)? {
                0 => Err(StoreError::NotFound(format!("no grant {id}"))),
                _ => Ok(()),
            }
        })
    }

    fn register_cluster(&self, cl: &NewCluster<'_>, a: &NewActivation<'_>) -> Result<Cluster> {
        self.with("register_cluster", |c| {
            let mut tx = c.client.transaction().map_err(backend)?;
            tx.execute(
                "INSERT INTO clusters(id, name, users, groups, created_at) VALUES ($1, $2, $3, $4, $5)",
                &[&cl.id, &cl.name, &to_json(cl.users), &to_json(cl.groups), &cl.now],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict(format!("cluster {} is already registered", cl.name))
                } else {
                    backend(e)
                }
            })?;
            tx.execute(
                "INSERT INTO activations(id, cluster_id, code_hash, expires_at) VALUES ($1, $2, $3, $4)",
                &[&a.id, &cl.id, &a.code_hash, &a.expires_at],
            )
            .map_err(backend)?;
            let message =
                format!("registered; activation {} valid until {}", a.id, crate::hub::clock::rfc3339(a.expires_at));
            tx.execute(
                "INSERT INTO cluster_events(cluster_id, time, kind, message) VALUES ($1, $2, 'registered', $3)",
                &[&cl.id, &cl.now, &message],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Self::cluster_by_id(c, cl.id)
        })
    }

    fn clusters(&self) -> Result<Vec<Cluster>> {
        self.with("clusters", |c| {
            let sql = format!("SELECT {CLUSTER_COLS} FROM clusters ORDER BY created_at, id");
            Ok(c.client.query(&sql, &[]).map_err(backend)?.iter().map(cluster_row).collect())
        })
    }

    fn cluster(&self, name: &str) -> Result<Option<Cluster>> {
        self.with("cluster", |c| {
            let st = c
                .prepare(
                    "SELECT id, name, users, groups, created_at, activated_at, deregistered_at, agent_version, arch, \
                     kube_version, node_count, last_connected_at, last_seen_at FROM clusters WHERE name = $1
                     ORDER BY deregistered_at IS NOT NULL, deregistered_at DESC, created_at DESC LIMIT 1",
                )
                .map_err(backend)?;
            Ok(c.client.query_opt(&st, &[&name]).map_err(backend)?.map(|r| cluster_row(&r)))
        })
    }

    fn activations(&self, cluster_id: &str) -> Result<Vec<Activation>> {
        self.with("activations", |c| {
            let rows = c
                .client
                .query(
                    "SELECT id, cluster_id, expires_at, used_at, replaced_at FROM activations WHERE cluster_id = $1
                     ORDER BY seq",
                    &[&cluster_id],
                )
                .map_err(backend)?;
            Ok(rows
                .iter()
                .map(|r| Activation {
                    id: r.get(0),
                    cluster_id: r.get(1),
                    expires_at: r.get(2),
                    used_at: r.get(3),
                    replaced_at: r.get(4),
                })
                .collect())
        })
    }

    fn renew_activation(
        &self,
        name: &str,
        subjects: Option<(&[String], &[String])>,
        a: &NewActivation<'_>,
        now: Millis,
    ) -> Result<Cluster> {
        self.with("renew_activation", |c| {
            let mut tx = c.client.transaction().map_err(backend)?;
            let row = tx
                .query_opt(
                    "SELECT id, activated_at FROM clusters WHERE name = $1 AND deregistered_at IS NULL FOR UPDATE",
                    &[&name],
                )
                .map_err(backend)?;
            let Some(row) = row else {
                return Err(StoreError::NotFound(format!(
                    "no registered cluster {name}; register it with `uplink-hub cluster register {name}`"
                )));
            };
            let (id, activated_at): (String, Option<Millis>) = (row.get(0), row.get(1));
            if activated_at.is_some() {
                return Err(StoreError::Conflict(format!(
                    "cluster {name} is already activated: an agent holds its credential, so a new activation would \
                     not replace it. Deregister it first with `uplink-hub cluster deregister {name}`, then register it again"
                )));
            }
            let replaced = tx
                .execute(
                    "UPDATE activations SET replaced_at = $2 WHERE cluster_id = $1 AND used_at IS NULL AND replaced_at IS NULL",
                    &[&id, &now],
                )
                .map_err(backend)?;
            tx.execute(
                "INSERT INTO activations(id, cluster_id, code_hash, expires_at) VALUES ($1, $2, $3, $4)",
                &[&a.id, &id, &a.code_hash, &a.expires_at],
            )
            .map_err(backend)?;
            if let Some((users, groups)) = subjects {
                tx.execute("UPDATE clusters SET users = $2, groups = $3 WHERE id = $1", &[&id, &to_json(users), &to_json(groups)])
                    .map_err(backend)?;
            }
            let message = format!(
                "new activation {} valid until {}; {replaced} earlier unused activation(s) replaced",
                a.id,
                crate::hub::clock::rfc3339(a.expires_at)
            );
            tx.execute(
                "INSERT INTO cluster_events(cluster_id, time, kind, message) VALUES ($1, $2, 'renewed', $3)",
                &[&id, &now, &message],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Self::cluster_by_id(c, &id)
        })
    }

    fn activate(
        &self,
        activation_id: &str,
        code_hash: &str,
        credential_hash: &str,
        facts: &AgentFacts,
        now: Millis,
    ) -> std::result::Result<Cluster, ActivateError> {
        let mut refused = None;
        let r = self.with("activate", |c| {
            let mut tx = c.client.transaction().map_err(backend)?;
            // FOR UPDATE: two replicas given the same code at once
            // serialise here, and the second sees `used_at`.
            let row = tx
                .query_opt(
                    "SELECT a.cluster_id, a.code_hash, a.expires_at, a.used_at, a.replaced_at, c.deregistered_at
                     FROM activations a JOIN clusters c ON c.id = a.cluster_id WHERE a.id = $1 FOR UPDATE",
                    &[&activation_id],
                )
                .map_err(backend)?;
            let Some(row) = row else {
                refused = Some(ActivateError::Unknown);
                return Ok(None);
            };
            let cluster_id: String = row.get(0);
            let stored: &str = row.get(1);
            let (expires_at, used_at, replaced_at, deregistered): (
                Millis,
                Option<Millis>,
                Option<Millis>,
                Option<Millis>,
            ) = (row.get(2), row.get(3), row.get(4), row.get(5));
            refused = if !ct_eq(stored.as_bytes(), code_hash.as_bytes()) {
                Some(ActivateError::Unknown)
            } else if deregistered.is_some() {
                Some(ActivateError::Deregistered)
            } else if used_at.is_some() {
                Some(ActivateError::Used)
            } else if replaced_at.is_some() {
                Some(ActivateError::Replaced)
            } else if now >= expires_at {
                Some(ActivateError::Expired)
            } else {
                None
            };
            if refused.is_some() {
                return Ok(None);
            }
            tx.execute("UPDATE activations SET used_at = $2 WHERE id = $1", &[&activation_id, &now])
                .map_err(backend)?;
            tx.execute(
                "UPDATE clusters SET activated_at = $2, credential_hash = $3, agent_version = $4, arch = $5,
                 kube_version = $6, node_count = $7 WHERE id = $1",
                &[
                    &cluster_id,
                    &now,
                    &credential_hash,
                    &facts.agent_version,
                    &facts.arch,
                    &facts.kube_version,
                    &(facts.node_count as i64),
                ],
            )
            .map_err(backend)?;
            let message = format!(
                "activated by agent {} ({}, Kubernetes {})",
                facts.agent_version, facts.arch, facts.kube_version
            );
            tx.execute(
                "INSERT INTO cluster_events(cluster_id, time, kind, message) VALUES ($1, $2, 'activated', $3)",
                &[&cluster_id, &now, &message],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Self::cluster_by_id(c, &cluster_id).map(Some)
        });
        match (r, refused) {
            (_, Some(e)) => Err(e),
            (Ok(Some(c)), None) => Ok(c),
            (Ok(None), None) => Err(ActivateError::Unknown),
            (Err(e), None) => Err(ActivateError::Store(e)),
        }
    }

    fn credential(&self, credential_hash: &str) -> Result<CredentialStatus> {
        self.with("credential", |c| {
            let st = c
                .prepare(
                    "SELECT id, name, users, groups, created_at, activated_at, deregistered_at, agent_version, arch, \
                     kube_version, node_count, last_connected_at, last_seen_at, credential_hash FROM clusters
                     WHERE credential_hash = $1",
                )
                .map_err(backend)?;
            let row = c.client.query_opt(&st, &[&credential_hash]).map_err(backend)?;
            Ok(match row {
                Some(r) if ct_eq(r.get::<_, &str>(13).as_bytes(), credential_hash.as_bytes()) => {
                    let cl = cluster_row(&r);
                    if cl.lifecycle == Lifecycle::Deregistered {
                        CredentialStatus::Revoked(cl)
                    } else {
                        CredentialStatus::Valid(cl)
                    }
                }
                _ => CredentialStatus::Unknown,
            })
        })
    }

    fn agent_connected(&self, cluster_id: &str, f: &AgentFacts, now: Millis) -> Result<()> {
        self.with("agent_connected", |c| {
            let st = c
                .prepare(
                    "UPDATE clusters SET agent_version = $2, arch = $3, kube_version = $4, node_count = $5,
                     last_connected_at = $6, last_seen_at = $6 WHERE id = $1",
                )
                .map_err(backend)?;
            c.client
                .execute(&st, &[&cluster_id, &f.agent_version, &f.arch, &f.kube_version, &(f.node_count as i64), &now])
                .map(|_| ())
                .map_err(backend)
        })
    }

    fn agents_gone(&self, cluster_id: &str, now: Millis) -> Result<()> {
        self.with("agents_gone", |c| {
            let st = c.prepare("UPDATE clusters SET last_seen_at = $2 WHERE id = $1").map_err(backend)?;
            c.client.execute(&st, &[&cluster_id, &now]).map(|_| ()).map_err(backend)
        })
    }

    fn add_event(&self, cluster_id: &str, kind: &str, message: &str, now: Millis) -> Result<()> {
        self.with("add_event", |c| {
            let st = c
                .prepare("INSERT INTO cluster_events(cluster_id, time, kind, message) VALUES ($1, $2, $3, $4)")
                .map_err(backend)?;
            c.client.execute(&st, &[&cluster_id, &now, &kind, &message]).map(|_| ()).map_err(backend)
        })
    }

    fn events(&self, cluster_id: &str, limit: u32) -> Result<Vec<ClusterEvent>> {
        self.with("events", |c| {
            let rows = c
                .client
                .query(
                    "SELECT time, kind, message FROM cluster_events WHERE cluster_id = $1 ORDER BY id DESC LIMIT $2",
                    &[&cluster_id, &(limit as i64)],
                )
                .map_err(backend)?;
            Ok(rows.iter().map(|r| ClusterEvent { time: r.get(0), kind: r.get(1), message: r.get(2) }).collect())
        })
    }

    fn deregister(&self, name: &str, now: Millis) -> Result<Cluster> {
        self.with("deregister", |c| {
            let mut tx = c.client.transaction().map_err(backend)?;
            let row = tx
                .query_opt(
                    "UPDATE clusters SET deregistered_at = $2 WHERE name = $1 AND deregistered_at IS NULL RETURNING id",
                    &[&name, &now],
                )
                .map_err(backend)?;
            let Some(row) = row else {
                return Err(StoreError::NotFound(format!("no registered cluster {name}")));
            };
            let id: String = row.get(0);
            tx.execute(
                "INSERT INTO cluster_events(cluster_id, time, kind, message) VALUES ($1, $2, 'deregistered', $3)",
                &[&id, &now, &"deregistered; agent credential revoked"],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Self::cluster_by_id(c, &id)
        })
    }

    fn append_audit(&self, e: AuditEntry) -> Result<()> {
        self.audit.send(AuditMsg::Entry(e))
    }

    fn join_replica(&self, r: &Replica, now: Millis, deadline: Millis) -> Result<()> {
        self.with("join_replica", |c| {
            let mut tx = c.client.transaction().map_err(backend)?;
            // Serialises joins: two replicas with one URL starting at the
            // same moment cannot both see the other absent.
            tx.execute("LOCK TABLE replicas IN SHARE ROW EXCLUSIVE MODE", &[]).map_err(backend)?;
            let clash = tx
                .query_opt(
                    "SELECT id FROM replicas WHERE advertise_url = $1 AND id <> $2 AND heartbeat_at > $3",
                    &[&r.advertise_url, &r.id, &(now - deadline)],
                )
                .map_err(backend)?;
            if let Some(row) = clash {
                let other: String = row.get(0);
                return Err(StoreError::Conflict(format!(
                    "another live replica ({other}) already advertises {}: give each replica its own --advertise-url",
                    r.advertise_url
                )));
            }
            upsert_replica(&mut tx, r, now)?;
            tx.commit().map_err(backend)
        })
    }

    fn replica_heartbeat(
        &self,
        r: &Replica,
        sessions: &[AgentSession],
        changed: bool,
        now: Millis,
        deadline: Millis,
    ) -> Result<Vec<AgentSession>> {
        self.with("replica_heartbeat", |c| {
            let mut tx = c.client.transaction().map_err(backend)?;
            tx.execute("DELETE FROM replicas WHERE heartbeat_at <= $1 AND id <> $2", &[&(now - deadline), &r.id])
                .map_err(backend)?;
            // Our row gone means another replica found it expired, and
            // its sessions went with it (ON DELETE CASCADE): they are
            // written again though they did not change, or the other
            // replicas would not see our tunnels until one came or went.
            let remade =
                tx.execute("UPDATE replicas SET heartbeat_at = $2 WHERE id = $1", &[&r.id, &now]).map_err(backend)?
                    == 0;
            if remade {
                upsert_replica(&mut tx, r, now)?;
            }
            if changed || remade {
                tx.execute("DELETE FROM agent_sessions WHERE replica_id = $1", &[&r.id]).map_err(backend)?;
                let st = tx
                    .prepare(
                        "INSERT INTO agent_sessions(replica_id, session_id, cluster_id, since, facts)
                         VALUES ($1, $2, $3, $4, $5)",
                    )
                    .map_err(backend)?;
                for s in sessions {
                    let facts = serde_json::json!({
                        "agent_version": s.facts.agent_version, "arch": s.facts.arch,
                        "kube_version": s.facts.kube_version, "node_count": s.facts.node_count,
                    })
                    .to_string();
                    tx.execute(&st, &[&r.id, &(s.session_id as i64), &s.cluster_id, &s.since, &facts])
                        .map_err(backend)?;
                }
            }
            let rows = tx
                .query(
                    "SELECT s.replica_id, s.cluster_id, s.session_id, s.since, s.facts FROM agent_sessions s
                     JOIN replicas r ON r.id = s.replica_id WHERE r.id <> $1 AND r.heartbeat_at > $2",
                    &[&r.id, &(now - deadline)],
                )
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(rows
                .iter()
                .map(|row| {
                    let f: serde_json::Value = serde_json::from_str(row.get(4)).unwrap_or_default();
                    let text = |k: &str| f[k].as_str().unwrap_or_default().to_string();
                    AgentSession {
                        replica_id: row.get(0),
                        cluster_id: row.get(1),
                        session_id: row.get::<_, i64>(2) as u64,
                        since: row.get(3),
                        facts: AgentFacts {
                            agent_version: text("agent_version"),
                            arch: text("arch"),
                            kube_version: text("kube_version"),
                            node_count: f["node_count"].as_u64().unwrap_or_default() as u32,
                        },
                    }
                })
                .collect())
        })
    }

    fn leave_replica(&self, id: &str) -> Result<()> {
        self.with("leave_replica", |c| {
            c.client.execute("DELETE FROM replicas WHERE id = $1", &[&id]).map(|_| ()).map_err(backend)
        })
    }

    fn live_replicas(&self, now: Millis, deadline: Millis) -> Result<Vec<Replica>> {
        self.with("live_replicas", |c| {
            let rows = c
                .client
                .query(
                    "SELECT id, advertise_url, version, started_at FROM replicas WHERE heartbeat_at > $1 ORDER BY id",
                    &[&(now - deadline)],
                )
                .map_err(backend)?;
            Ok(rows
                .iter()
                .map(|r| Replica { id: r.get(0), advertise_url: r.get(1), version: r.get(2), started_at: r.get(3) })
                .collect())
        })
    }

    fn check(&self) -> Result<()> {
        self.probe()
    }

    fn queries(&self) -> Vec<(&'static str, u64)> {
        self.calls()
    }

    fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>> {
        self.audit.flush()?;
        self.with("audit", |c| {
            let rows = c
                .client
                .query(
                    "SELECT id, time, user_name, groups, cluster, method, path, status, bytes_in, bytes_out, duration_ms,
                     upgrade FROM audit
                     WHERE ($1::TEXT IS NULL OR user_name = $1) AND ($2::TEXT IS NULL OR cluster = $2)
                       AND ($3::BIGINT IS NULL OR time >= $3)
                     ORDER BY id DESC LIMIT $4",
                    &[&q.user, &q.cluster, &q.since, &(q.limit as i64)],
                )
                .map_err(backend)?;
            Ok(rows
                .iter()
                .map(|r| AuditEntry {
                    id: r.get(0),
                    time: r.get(1),
                    user: r.get(2),
                    groups: from_json(r.get(3)),
                    cluster: r.get(4),
                    method: r.get(5),
                    path: r.get(6),
                    status: r.get::<_, i32>(7) as u16,
                    bytes_in: r.get::<_, i64>(8) as u64,
                    bytes_out: r.get::<_, i64>(9) as u64,
                    duration_ms: r.get::<_, i64>(10) as u64,
                    upgrade: r.get(11),
                })
                .collect())
        })
    }
}

/// Most entries kept while the database is away; older ones are dropped
/// (and counted in the log) so the hub's memory stays bounded.
const AUDIT_HELD: usize = 65_536;
/// How often the audit writer tries the database again while it is away.
const AUDIT_RETRY: Duration = Duration::from_secs(1);

fn audit_thread(config: PgConfig, replica: String, rx: mpsc::Receiver<AuditMsg>, batches: Arc<AtomicU64>) {
    let mut client: Option<Client> = None;
    let mut held: Vec<AuditEntry> = Vec::new();
    let mut closing = false;
    // While the database is away: every queued entry is taken into
    // `held` (bounded by AUDIT_HELD), so the queue never fills and the
    // serving thread's `append_audit` never waits on it; and re-dials are
    // paced, not one per entry (one can take CONNECT_DEADLINE).
    let mut away = false;
    let mut retry_at = Instant::now();
    let mut dialing: Option<mpsc::Receiver<std::result::Result<Client, String>>> = None;
    // Bounded, so a hung database cannot hold a SIGTERM's final flush
    // (and the process) forever.
    let config = config.with_statement_timeout(AUDIT_STATEMENT_TIMEOUT);
    while !closing {
        // Wait for work; while entries are held for an absent database,
        // wake up to retry.
        let first = if held.is_empty() {
            match rx.recv() {
                Ok(m) => Some(m),
                Err(_) => break,
            }
        } else {
            // A dial under way is looked at often.
            let wait = if dialing.is_some() { Duration::from_millis(100) } else { AUDIT_RETRY };
            match rx.recv_timeout(wait) {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    closing = true;
                    None
                }
            }
        };
        let mut flushes = Vec::new();
        let mut next = first;
        let mut slept = false;
        loop {
            while let Some(msg) = next {
                match msg {
                    AuditMsg::Entry(e) => held.push(e),
                    AuditMsg::Flush(done) => flushes.push(done),
                }
                next = if client.is_none() || away || held.len() < AUDIT_BATCH { rx.try_recv().ok() } else { None };
            }
            if closing || slept || !flushes.is_empty() || held.len() >= AUDIT_BATCH {
                break;
            }
            // As in the SQLite writer: gather by sleeping, so the serving
            // thread's sends do not wake this one per entry.
            std::thread::sleep(AUDIT_GATHER);
            slept = true;
            next = rx.try_recv().ok();
        }
        // A shutdown, or someone waiting for the entries to be written
        // (an audit query), waits for a dial, whatever the pace.
        let urgent = closing || !flushes.is_empty();
        while !held.is_empty() {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = None;
                if urgent {
                    client = match dialing.take() {
                        Some(d) => d.recv_timeout(CONNECT_DEADLINE).ok().and_then(|r| r.ok()),
                        None => config.connect_client().ok(),
                    };
                } else if let Some(d) = &dialing {
                    match d.try_recv() {
                        Ok(Ok(c)) => (client, dialing) = (Some(c), None),
                        Err(mpsc::TryRecvError::Empty) => {}
                        Ok(Err(_)) | Err(mpsc::TryRecvError::Disconnected) => {
                            (dialing, away, retry_at) = (None, true, Instant::now() + AUDIT_RETRY);
                        }
                    }
                } else if !away || Instant::now() >= retry_at {
                    // The dial runs beside this loop, which keeps taking
                    // entries off the queue meanwhile.
                    dialing = Some(config.dial());
                }
            }
            let Some(c) = client.as_mut() else { break };
            if away && !urgent && Instant::now() < retry_at {
                break;
            }
            let n = held.len().min(AUDIT_BATCH);
            match write_audit(c, &replica, &held[..n]) {
                Ok(()) => {
                    held.drain(..n);
                    batches.fetch_add(1, Ordering::Relaxed);
                    away = false;
                }
                Err(e) => {
                    log::error!("audit write failed entries={n} error={}; kept for retry", describe(&e));
                    (away, retry_at) = (true, Instant::now() + AUDIT_RETRY);
                    break;
                }
            }
        }
        if held.len() > AUDIT_HELD {
            let dropped = held.len() - AUDIT_HELD;
            held.drain(..dropped);
            log::error!("audit: the database is away; dropped the {dropped} oldest entries");
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

fn write_audit(c: &mut Client, replica: &str, entries: &[AuditEntry]) -> std::result::Result<(), ::postgres::Error> {
    let mut tx = c.transaction()?;
    let st = tx.prepare(
        "INSERT INTO audit(time, user_name, groups, cluster, method, path, status, bytes_in, bytes_out,
         duration_ms, upgrade, replica) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )?;
    for e in entries {
        tx.execute(
            &st,
            &[
                &e.time,
                &e.user,
                &to_json(&e.groups),
                &e.cluster,
                &e.method,
                &e.path,
                &(e.status as i32),
                &(e.bytes_in as i64),
                &(e.bytes_out as i64),
                &(e.duration_ms as i64),
                &e.upgrade,
                &replica,
            ],
        )?;
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passfile_lines_match_like_libpq() {
        let text = "# comment\nother:5432:*:alice:nope\n127.0.0.1:5432:uplink:alice:s\\:ecret\n*:*:*:*:fallback\n";
        assert_eq!(passfile_lookup(text, "127.0.0.1", 5432, "uplink", "alice").as_deref(), Some("s:ecret"));
        assert_eq!(passfile_lookup(text, "127.0.0.1", 5433, "uplink", "alice").as_deref(), Some("fallback"));
        assert_eq!(passfile_lookup("h:1:d:u:p\n", "h", 2, "d", "u"), None);
    }

    #[test]
    fn connection_strings() {
        let (rest, pf) = take_param("postgres://u@h/db?sslmode=disable&passfile=%2Ftmp%2Fpw", "passfile");
        assert_eq!((rest.as_str(), pf.as_deref()), ("postgres://u@h/db?sslmode=disable", Some("/tmp/pw")));
        let (rest, pf) = take_param("host=h user=u passfile=/p dbname=d", "passfile");
        assert_eq!((rest.as_str(), pf.as_deref()), ("host=h user=u dbname=d", Some("/p")));
        assert_eq!(PgConfig::parse("postgres://u@h/db?sslmode=require").unwrap().ssl_mode, SslMode::Require);
        assert!(PgConfig::parse("postgres://u@h/db?sslmode=bogus").unwrap_err().contains("invalid sslmode \"bogus\""));
        let e = PgConfig::parse("host=h user=u sslmode=verify-full sslrootcert=/nonexistent").err().unwrap();
        assert!(e.contains("sslrootcert /nonexistent"), "{e}");
        assert!(PgConfig::parse("postgres://h/db").unwrap_err().contains("no user"));
        assert!(PgConfig::parse("postgres://u@h/db?bogus=1").is_err());
        let c = PgConfig::parse("postgres://u:hunter2@h:6000/db").unwrap();
        assert_eq!(format!("{c:?}"), "u@h:6000/db");
    }
}
