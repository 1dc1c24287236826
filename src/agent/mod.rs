//! The agent: activation, persisted registration, the tunnel to the hub
//! and the impersonating kube proxy, all on one thread.
//!
//! ```text
//!  uplink run
//!    ├─ config, kube discovery (flags | kubeconfig | in-cluster | k3s)   errors: exit 2
//!    └─ LocalExecutor::run ─┬─ health server (/healthz /readyz /metrics)
//!                           ├─ registration: saved state, else activate once and save   exit 2 / 4
//!                           ├─ READY=1, watchdog pings
//!                           ├─ tunnel::run — a tunnel per hub replica, each redialled
//!                           │   with its own backoff; a task per stream (kube::proxy)
//!                           └─ SIGTERM/SIGINT → STOPPING=1, GoAway, drain briefly, exit 0
//! ```
//!
//! Everything shares one [`AgentCtx`] through `Rc`; nothing blocks the
//! thread except file reads and the DNS lookups described in [`net`].
//!
//! Modules: [`activation`], [`state`], [`kube`] (discovery, header policy,
//! proxy), [`http1`] (client and pool), [`net`] (dialling, proxies),
//! [`tunnel`] (connect and reconnect), [`health`], [`notify`], [`yaml`].

pub mod activation;
pub mod health;
pub mod http1;
pub mod kube;
pub mod net;
pub mod notify;
pub mod state;
pub mod tunnel;
pub mod yaml;

use crate::driver::Session;
use crate::proto::{AgentInfo, GoAwayCode};
use crate::secret::Secret;
use activation::{Activation, ActivationError, ExchangeError};
use health::Metrics;
use kube::headers::AllowLists;
use kube::{Kube, KubeFlags};
use net::{ProxyEnv, Target};
use rustls::ClientConfig;
use serde::Deserialize;
use smol::LocalExecutor;
use smol::future::FutureExt as _;
use smol::stream::StreamExt as _;
use state::{Registration, StateStore};
use std::cell::RefCell;
use std::fmt;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Default activation path (a file, or a directory holding `activation.json`).
pub const DEFAULT_ACTIVATION: &str = "/etc/uplink/activation.json";
/// Default state file (systemd `StateDirectory=uplink`).
pub const DEFAULT_STATE: &str = "/var/lib/uplink/state";
/// Default health listener.
pub const DEFAULT_HEALTH_ADDR: &str = "127.0.0.1:9464";
/// How long SIGTERM waits for in-flight streams.
pub const DRAIN: Duration = Duration::from_secs(5);

/// Process exit statuses (CONVENTIONS.md).
pub mod exit {
    pub const OK: i32 = 0;
    pub const RUNTIME: i32 = 1;
    pub const CONFIG: i32 = 2;
    pub const DEREGISTERED: i32 = 4;
}

/// Why the agent stops, with the exit status to use.
#[derive(Debug)]
pub struct AgentError {
    pub code: i32,
    pub message: String,
}

impl AgentError {
    pub fn config(m: impl Into<String>) -> Self {
        AgentError { code: exit::CONFIG, message: m.into() }
    }
    pub fn runtime(m: impl Into<String>) -> Self {
        AgentError { code: exit::RUNTIME, message: m.into() }
    }
    pub fn deregistered(m: impl Into<String>) -> Self {
        AgentError { code: exit::DEREGISTERED, message: m.into() }
    }
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The agent's optional configuration file (YAML subset or JSON):
///
/// ```yaml
/// allowed_users: [alice, bob]      # impersonate only these users
/// allowed_groups:                  # ... and only these groups
///   - dev
/// drain_seconds: 5
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub allowed_users: Option<Vec<String>>,
    pub allowed_groups: Option<Vec<String>>,
    pub drain_seconds: Option<String>,
}

impl FileConfig {
    pub fn load(path: &std::path::Path) -> Result<FileConfig, AgentError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AgentError::config(format!("config {}: cannot read it: {e}", path.display())))?;
        let value = if text.trim_start().starts_with('{') {
            serde_json::from_str(&text).map_err(|e| e.to_string())
        } else {
            yaml::parse(&text).map_err(|e| e.to_string())
        }
        .map_err(|e| AgentError::config(format!("config {}: {e}", path.display())))?;
        let value = if value.is_null() { serde_json::json!({}) } else { value };
        let value = stringify_scalars(value);
        serde_json::from_value(value).map_err(|e| AgentError::config(format!("config {}: {e}", path.display())))
    }
}

/// JSON numbers to strings, so YAML and JSON configs read the same.
fn stringify_scalars(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Number(n) => Value::String(n.to_string()),
        Value::Bool(b) => Value::String(b.to_string()),
        Value::Array(a) => Value::Array(a.into_iter().map(stringify_scalars).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, stringify_scalars(v))).collect()),
        other => other,
    }
}

/// Everything `uplink run` / `uplink activate` were told.
#[derive(Clone, Debug)]
pub struct Options {
    pub activation: PathBuf,
    pub state: StateStore,
    pub kube: KubeFlags,
    pub health_addr: String,
    pub config: Option<PathBuf>,
}

/// What every task shares.
pub struct AgentCtx {
    pub ex: Rc<LocalExecutor<'static>>,
    pub kube: Kube,
    pub allow: AllowLists,
    pub metrics: Rc<Metrics>,
    pub hub: Target,
    pub hub_tls: Arc<ClientConfig>,
    pub credential: Secret,
    pub proxies: ProxyEnv,
    /// The live sessions (one per hub replica), for the drain on SIGTERM.
    pub sessions: RefCell<std::collections::HashMap<u64, Session>>,
    /// Set on SIGTERM: a tunnel that ends now is not dialled again.
    pub stopping: std::cell::Cell<bool>,
    info: RefCell<Option<(AgentInfo, Instant)>>,
}

impl AgentCtx {
    /// Version and node count for `Hello`, refreshed every ten minutes.
    pub async fn agent_info(&self) -> AgentInfo {
        if let Some((info, at)) = &*self.info.borrow() {
            if at.elapsed() < Duration::from_secs(600) {
                return info.clone();
            }
        }
        let info = cluster_info(&self.kube).await;
        *self.info.borrow_mut() = Some((info.clone(), Instant::now()));
        info
    }
}

/// Asks the API server for its version and node count; unknown values on
/// failure (the agent's account may not list nodes).
async fn cluster_info(kube: &Kube) -> AgentInfo {
    async fn limit<T>(d: Duration) -> std::io::Result<T> {
        smol::Timer::after(d).await;
        Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))
    }
    let version = kube.version().or(limit(Duration::from_secs(5))).await.unwrap_or_else(|e| {
        log::warn!("cannot read the API server version from {}: {e}", kube.pool.target);
        String::new()
    });
    let nodes = kube.node_count().or(limit(Duration::from_secs(5))).await.unwrap_or_else(|e| {
        log::info!("cannot count nodes: {e}");
        0
    });
    tunnel::agent_info(version, nodes)
}

fn setup(opts: &Options) -> Result<(Kube, FileConfig), AgentError> {
    let config = match &opts.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let kube = Kube::discover(&opts.kube).map_err(|e| AgentError::config(e.to_string()))?;
    log::info!("API server {} ({})", kube.pool.target, kube.source);
    Ok((kube, config))
}

/// `uplink activate`: make sure a registration is saved, then return.
pub fn activate_only(opts: Options) -> Result<(), AgentError> {
    let (kube, _) = setup(&opts)?;
    let proxies = ProxyEnv::from_env();
    smol::block_on(async {
        let reg = ensure_registered(&opts, &kube, &proxies, false).await?;
        log::info!("registered as cluster {:?} ({}) with {}", reg.cluster, reg.cluster_id, reg.hub_url);
        Ok(())
    })
}

/// `uplink run`: the agent until SIGTERM (Ok) or deregistration.
pub fn run(opts: Options) -> Result<(), AgentError> {
    let (kube, config) = setup(&opts)?;
    let health_addr: std::net::SocketAddr = opts
        .health_addr
        .parse()
        .map_err(|_| AgentError::config(format!("--health-addr {:?}: expected IP:PORT", opts.health_addr)))?;
    let drain = match &config.drain_seconds {
        Some(s) => Duration::from_secs_f64(
            s.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| AgentError::config(format!("config: drain_seconds {s:?} is not a number of seconds")))?,
        ),
        None => DRAIN,
    };
    let ex = Rc::new(LocalExecutor::new());
    // The main loop is a task of its own, not the future `run` races with
    // the executor: that one is polled every time the executor wakes from
    // the reactor (once or twice per proxied request), and each poll read
    // the signal pipe for nothing (a `recv` returning `EAGAIN`). A task
    // is polled only when its own waker fires.
    let main = ex.spawn(main_loop(ex.clone(), opts, kube, config, health_addr, drain));
    smol::block_on(ex.run(main))
}

async fn main_loop(
    ex: Rc<LocalExecutor<'static>>,
    opts: Options,
    kube: Kube,
    config: FileConfig,
    health_addr: std::net::SocketAddr,
    drain: Duration,
) -> Result<(), AgentError> {
    let metrics = Rc::new(Metrics::default());
    let listener = health::bind(health_addr)
        .map_err(|e| AgentError::config(format!("--health-addr {health_addr}: cannot listen: {e}")))?;
    // Kept, not detached: dropped (cancelled) when this function returns.
    let _health = ex.spawn(health::serve(listener, metrics.clone(), ex.clone()));
    let mut signals = async_signal::Signals::new([async_signal::Signal::Term, async_signal::Signal::Int])
        .map_err(|e| AgentError::runtime(format!("cannot install signal handlers: {e}")))?;
    let proxies = ProxyEnv::from_env();

    let registered = async { ensure_registered(&opts, &kube, &proxies, true).await.map(Some) };
    let reg = match registered
        .or(async { signals.next().await.map(|_| None).ok_or_else(|| AgentError::runtime("signal stream ended")) })
        .await?
    {
        Some(reg) => reg,
        None => {
            log::info!("stopping before the tunnel was up");
            return Ok(());
        }
    };
    let trust = activation::trust_from(reg.hub_ca_pem.as_deref(), reg.hub_pin_sha256.as_deref())
        .map_err(|e| AgentError::config(format!("{}: saved hub trust: {e}", opts.state)))?;
    let hub_tls =
        crate::tls::client_config(&trust, None, &[b"http/1.1"]).map_err(|e| AgentError::config(e.to_string()))?;
    let hub = Target::parse(&reg.hub_url).map_err(|e| AgentError::config(format!("{}: hub_url {e}", opts.state)))?;
    let allow = AllowLists { users: config.allowed_users, groups: config.allowed_groups };
    let ctx = Rc::new(AgentCtx {
        ex: ex.clone(),
        kube,
        allow,
        metrics: metrics.clone(),
        hub,
        hub_tls,
        credential: reg.credential.clone(),
        proxies,
        sessions: RefCell::new(Default::default()),
        stopping: std::cell::Cell::new(false),
        info: RefCell::new(None),
    });
    log::info!("cluster {:?} ({}), hub {}", reg.cluster, reg.cluster_id, ctx.hub);
    notify::notify("READY=1");
    let _watchdog = notify::watchdog_interval().map(|every| {
        ex.spawn(async move {
            loop {
                notify::notify("WATCHDOG=1");
                smol::Timer::after(every).await;
            }
        })
    });

    enum End {
        Deregistered(String),
        Signal,
    }
    // A task, not a future raced and dropped: on SIGTERM the tunnel must
    // keep running while in-flight streams drain.
    let mut tunnel = ex.spawn(tunnel::run(ctx.clone()));
    let end = async { End::Deregistered((&mut tunnel).await.0) }
        .or(async {
            signals.next().await;
            End::Signal
        })
        .await;
    match end {
        End::Deregistered(why) => {
            notify::notify("STOPPING=1");
            Err(AgentError::deregistered(format!(
                "{why}. Cluster {:?} was deregistered at the hub: the agent stops and will not retry. To connect it again, \
                 register it with `uplink-hub cluster register NAME` and install the new activation",
                reg.cluster
            )))
        }
        End::Signal => {
            notify::notify("STOPPING=1");
            ctx.stopping.set(true);
            let sessions: Vec<Session> = ctx.sessions.borrow().values().cloned().collect();
            if !sessions.is_empty() {
                log::info!(
                    "stopping: draining {} in-flight streams on {} tunnels (up to {:?})",
                    metrics.active_streams(),
                    sessions.len(),
                    drain
                );
                for session in &sessions {
                    session.go_away(GoAwayCode::ShuttingDown, "agent stopping");
                }
                let deadline = Instant::now() + drain;
                while metrics.active_streams() > 0 && Instant::now() < deadline {
                    smol::Timer::after(Duration::from_millis(25)).await;
                }
                for session in &sessions {
                    session.close(GoAwayCode::ShuttingDown, "agent stopped");
                }
                smol::Timer::after(Duration::from_millis(50)).await;
            }
            log::info!("stopped");
            Ok(())
        }
    }
}

/// The saved registration, or a new one from the activation. See
/// DESIGN.md "Lifecycle" and the module docs of [`state`].
async fn ensure_registered(
    opts: &Options,
    kube: &Kube,
    proxies: &ProxyEnv,
    retry_forever: bool,
) -> Result<Registration, AgentError> {
    let store = &opts.state;
    let saved = store.load(kube).await.map_err(|e| AgentError::runtime(e.to_string()))?;
    let act = match Activation::load(&opts.activation) {
        Ok(a) => Some(a),
        Err(ActivationError::Missing(_)) if saved.is_some() => None,
        Err(e) if saved.is_some() => {
            log::warn!("{e}; using the saved registration");
            None
        }
        Err(e) => return Err(AgentError::config(e.to_string())),
    };
    let now = SystemTime::now();
    match (saved, act) {
        (Some(reg), Some((a, file))) if a.activation_id != reg.activation_id => {
            if a.is_expired(now) {
                return Err(AgentError::config(format!(
                    "{store} belongs to activation {} (cluster {:?}) but {} holds activation {} (cluster {:?}), \
                     which expired at {}. Install a current activation from `uplink-hub cluster register NAME`, or \
                     remove {} to keep the saved registration",
                    reg.activation_id,
                    reg.cluster,
                    file.display(),
                    a.activation_id,
                    a.cluster,
                    a.expires_at,
                    file.display()
                )));
            }
            log::info!(
                "{} holds a new activation {} (the saved one is {}): the cluster was registered again; activating",
                file.display(),
                a.activation_id,
                reg.activation_id
            );
            activate(store, kube, proxies, &a, retry_forever).await
        }
        (Some(reg), _) => {
            log::info!("using the registration saved in {store}");
            Ok(reg)
        }
        (None, Some((a, file))) => {
            a.check_expiry(&file, now).map_err(|e| AgentError::config(e.to_string()))?;
            activate(store, kube, proxies, &a, retry_forever).await
        }
        (None, None) => unreachable!("a missing activation without state returned above"),
    }
}

async fn activate(
    store: &StateStore,
    kube: &Kube,
    proxies: &ProxyEnv,
    act: &Activation,
    retry_forever: bool,
) -> Result<Registration, AgentError> {
    let info = cluster_info(kube).await;
    let mut backoff = tunnel::Backoff::new(tunnel::BACKOFF_BASE, tunnel::BACKOFF_CAP);
    let mut tries = 0;
    let done = loop {
        tries += 1;
        match activation::exchange(act, &info, proxies).await {
            Ok(done) => break done,
            Err(ExchangeError::Transient(why)) if retry_forever || tries < 3 => {
                let wait = backoff.next_delay();
                log::warn!("activation: {why}; retrying in {} ms", wait.as_millis());
                smol::Timer::after(wait).await;
            }
            Err(ExchangeError::Transient(why)) => return Err(AgentError::runtime(format!("activation failed: {why}"))),
            Err(ExchangeError::Deregistered(m)) => return Err(AgentError::deregistered(m)),
            Err(ExchangeError::Refused(m)) => return Err(AgentError::config(m)),
            Err(ExchangeError::Used(m)) => {
                // In a pod, another replica may have won the race and is
                // saving the state now: wait for it a little.
                if let StateStore::Secret { .. } = store {
                    for _ in 0..15 {
                        smol::Timer::after(Duration::from_secs(2)).await;
                        if let Ok(Some(reg)) = store.load(kube).await {
                            if reg.activation_id == act.activation_id {
                                log::info!("another replica activated; using the registration it saved in {store}");
                                return Ok(reg);
                            }
                        }
                    }
                }
                return Err(AgentError::config(m));
            }
        }
    };
    let reg = Registration {
        cluster_id: done.cluster_id,
        cluster: if done.cluster.is_empty() { act.cluster.clone() } else { done.cluster },
        activation_id: act.activation_id.clone(),
        credential: done.credential,
        hub_url: if done.hub_url.is_empty() { act.hub_url.clone() } else { done.hub_url },
        hub_ca_pem: act.hub_ca_pem.clone(),
        hub_pin_sha256: act.hub_pin_sha256.clone(),
        activated_at: activation::unix(SystemTime::now()),
    };
    store.save(kube, &reg).await.map_err(|e| {
        AgentError::runtime(format!(
            "activated, but {e}. The activation code is now used: fix the cause, then register the cluster again"
        ))
    })?;
    log::info!("activated as cluster {:?} ({}); registration saved in {store}", reg.cluster, reg.cluster_id);
    Ok(reg)
}

/// A `log` backend for stderr, one line per event. Under systemd
/// (`JOURNAL_STREAM` set) lines carry `<N>` priority prefixes that
/// journald reads, and no time (journald stamps them); otherwise (a pod,
/// a terminal) a UTC time to the millisecond and a level word.
pub struct Logger {
    level: log::LevelFilter,
    journald: bool,
}

impl Logger {
    /// Installs the logger; `UPLINK_LOG` (error, warn, info, debug, trace)
    /// sets the level, `info` by default.
    pub fn init() {
        let level = std::env::var("UPLINK_LOG").ok().and_then(|v| v.parse().ok()).unwrap_or(log::LevelFilter::Info);
        let journald = crate::time::stderr_is_journal();
        if log::set_logger(Box::leak(Box::new(Logger { level, journald }))).is_ok() {
            log::set_max_level(level);
        }
    }
}

/// One log line: for the journal a `<N>` priority and the message (the
/// journal adds the time); elsewhere the time, the level and the message.
fn log_line(journald: bool, level: log::Level, msg: &str, now_ms: i64) -> String {
    let msg = msg.replace('\n', " ");
    if journald {
        let prio = match level {
            log::Level::Error => 3,
            log::Level::Warn => 4,
            log::Level::Info => 6,
            _ => 7,
        };
        format!("<{prio}>{msg}\n")
    } else {
        format!("{} {level:5} {msg}\n", crate::time::rfc3339_millis(now_ms))
    }
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= self.level && (m.target().starts_with("uplink") || m.level() <= log::Level::Warn)
    }

    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        use std::io::Write as _;
        let line = log_line(self.journald, r.level(), &r.args().to_string(), crate::time::now_unix_ms());
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_file_reads() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/agent.example.yaml");
        let c = FileConfig::load(&p).unwrap();
        assert!(c.allowed_users.is_none() && c.allowed_groups.is_none());
        let text = std::fs::read_to_string(&p).unwrap();
        let uncommented: String = text
            .lines()
            .map(|l| l.strip_prefix('#').unwrap_or(l))
            .filter(|l| !l.starts_with(' ') || l.starts_with("  -"))
            .collect::<Vec<_>>()
            .join("\n");
        let v = yaml::parse(&uncommented).unwrap();
        assert_eq!(v["allowed_users"], serde_json::json!(["alice", "bob"]));
        assert_eq!(v["allowed_groups"], serde_json::json!(["uplink:debuggers"]));
    }

    /// Allow lists take names as Kubernetes has them, quoted or plain
    /// where YAML allows.
    #[test]
    fn config_allow_lists_take_kubernetes_names() {
        let dir = std::env::temp_dir().join(format!("uplink-config-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("agent.yaml");
        std::fs::write(
            &p,
            "allowed_users:\n  - \"arn:aws:iam::1234567890:user/Alice\"\n  - arn:aws:iam::1234567890:role/Admins\n  \
             - Jane Doe # a comment\n  - Zoë Ångström\n  - '山田'\n  - \"oidc:https://idp.example.com#42\"\n\
             allowed_groups: [\"system:masters\", jane@example.com]\n",
        )
        .unwrap();
        let c = FileConfig::load(&p).unwrap();
        assert_eq!(
            c.allowed_users.unwrap(),
            [
                "arn:aws:iam::1234567890:user/Alice",
                "arn:aws:iam::1234567890:role/Admins",
                "Jane Doe",
                "Zoë Ångström",
                "山田",
                "oidc:https://idp.example.com#42"
            ]
        );
        assert_eq!(c.allowed_groups.unwrap(), ["system:masters", "jane@example.com"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn log_lines_carry_a_time_except_for_the_journal() {
        let t = 1_796_378_400_250;
        assert_eq!(log_line(false, log::Level::Info, "tunnel up", t), "2026-12-04T10:00:00.250Z INFO  tunnel up\n");
        assert_eq!(log_line(true, log::Level::Warn, "tunnel lost\nagain", t), "<4>tunnel lost again\n");
    }

    #[test]
    fn config_file_yaml_or_json() {
        let dir = std::env::temp_dir().join(format!("uplink-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("agent.yaml");
        std::fs::write(
            &p,
            "# who may be impersonated\nallowed_users: [alice, bob]\nallowed_groups:\n  - dev\ndrain_seconds: 2\n",
        )
        .unwrap();
        let c = FileConfig::load(&p).unwrap();
        assert_eq!(c.allowed_users, Some(vec!["alice".to_string(), "bob".to_string()]));
        assert_eq!(c.allowed_groups, Some(vec!["dev".to_string()]));
        assert_eq!(c.drain_seconds.as_deref(), Some("2"));
        std::fs::write(&p, r#"{"allowed_groups": ["ops"], "drain_seconds": 1.5}"#).unwrap();
        let c = FileConfig::load(&p).unwrap();
        assert_eq!((c.allowed_users, c.drain_seconds.as_deref()), (None, Some("1.5")));
        std::fs::write(&p, "allowed_user: [typo]\n").unwrap();
        let e = FileConfig::load(&p).unwrap_err();
        assert_eq!(e.code, exit::CONFIG);
        assert!(e.message.contains(&p.display().to_string()) && e.message.contains("allowed_user"), "{e}");
        std::fs::write(&p, "").unwrap();
        assert!(FileConfig::load(&p).unwrap().allowed_users.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
