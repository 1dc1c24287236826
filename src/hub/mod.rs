//! `uplink-hub`: the control plane. It registers and deregisters clusters,
//! holds their agents' tunnels, and serves people (REST, kubectl) as
//! themselves through those tunnels.
//!
//! ```text
//!  client ─TLS─► server (accept, HTTP/1.1 keep-alive, routing; limits:
//!                 caps per address and in total, deadlines for heads and
//!                 unauthenticated bodies)
//!                 ├─ /api/v1/...            api      REST for the CLI and console
//!                 ├─ /k8s/clusters/NAME/..  kube     authn, grant, open stream, pipe
//!                 ├─ /k8s/fleet/PATTERN/.., /api/v1/fleet/k8s/..
//!                 │                         fleet    one read to many clusters, merged
//!                 ├─ /v1/activate, /v1/tunnel agents activation, tunnel sessions
//!                 ├─ /v1/peer               replicas::handoff  another replica's hop
//!                 ├─ /, /assets/...         console  the web console, embedded
//!                 ├─ /auth/...              oidc     console sign-in with the identity provider
//!                 ├─ /api, /apis, /version, ...  kube::root_hint: "use /k8s/clusters/NAME"
//!                 └─ /healthz, /metrics
//!  state: Store (store/: SQLite, or PostgreSQL shared by replicas, behind a cache)
//!         · Tunnels (live sessions) · Replicas (the others' tunnels; a
//!         stream for a cluster held elsewhere goes there: replicas::handoff)
//!         · Bus (status events) · Metrics
//! ```
//!
//! Runs on one thread (`smol::LocalExecutor`): the tunnel driver is `!Send`
//! by design, and one core serves many agents because every connection
//! is I/O bound. The store is called synchronously from that thread; a
//! SQLite commit in WAL mode is a short write. With PostgreSQL each call
//! the cache cannot answer is a network round trip on that thread (hot
//! reads are prepared statements, one round trip each; kube requests are
//! answered from the cache, and a hung database holds the loop at most
//! the statement timeout, 5 s, per call); moving those calls off the loop
//! is future work.
//!
//! Not here: the agent (never linked into it).

pub mod agents;
pub mod api;
pub mod cert;
pub mod cli;
pub mod client;
pub mod clock;
pub mod console;
pub mod events;
pub mod fleet;
pub mod http;
pub mod install;
pub mod kube;
pub mod limits;
pub mod logger;
pub mod metrics;
pub mod oidc;
pub mod replicas;
pub mod server;
pub mod store;
pub mod table;
pub mod tunnels;

use crate::secret::{Secret, sha256_hex};
use clock::{Millis, now_ms, rfc3339};
use events::Bus;
use metrics::Metrics;
use serde_json::{Value, json};
use std::cell::Cell;
use std::rc::Rc;
use store::{AgentFacts, Cluster, Grant, Lifecycle, Store, Subject, User};
use tunnels::Tunnels;

/// Everything the request handlers share.
pub struct Hub {
    pub store: Rc<dyn Store>,
    pub tunnels: Tunnels,
    /// The other replicas sharing the store, and the tunnels they hold.
    pub replicas: replicas::Replicas,
    pub bus: Bus,
    pub metrics: Metrics,
    /// How agents and people reach this hub, e.g. `https://hub.example.com:8443`.
    pub public_url: String,
    /// The private CA clients should trust, if the hub made its own.
    pub ca_pem: Option<String>,
    /// Set on SIGTERM: new connections are told to close.
    pub draining: Cell<bool>,
    /// Notified when `draining` is set.
    pub drain_started: event_listener::Event,
    /// Agent image named in rendered manifests.
    pub agent_image: String,
    /// Connection caps and deadlines, and who is connected (`limits`).
    pub gate: limits::Gate,
    /// Settings of every tunnel session (keepalive, dead-peer deadline).
    pub tunnel_config: crate::proto::Config,
    /// The organisation's identity provider, when configured.
    pub oidc: Option<oidc::Provider>,
}

impl Hub {
    /// Resolves once the hub is draining (SIGTERM).
    pub async fn draining_started(&self) {
        loop {
            let listener = self.drain_started.listen();
            if self.draining.get() {
                return;
            }
            listener.await;
        }
    }
}

/// The status a person sees for a cluster.
pub fn status(hub: &Hub, c: &Cluster) -> &'static str {
    match c.lifecycle {
        Lifecycle::Pending => "PENDING",
        Lifecycle::Deregistered => "DEREGISTERED",
        Lifecycle::Activated if hub.tunnels.is_connected(&c.id) => "ACTIVE",
        // Another live replica holds its tunnel.
        Lifecycle::Activated if !hub.replicas.elsewhere(&c.id).is_empty() => "ACTIVE",
        Lifecycle::Activated => "DISCONNECTED",
    }
}

fn opt_time(t: Option<Millis>) -> Value {
    t.map_or(Value::Null, |t| Value::String(rfc3339(t)))
}

/// A cluster as the REST API shows it.
pub fn cluster_json(hub: &Hub, c: &Cluster) -> Value {
    // This replica's tunnels and those other live replicas hold.
    let (local, remote) = (hub.tunnels.agents(&c.id), hub.replicas.elsewhere(&c.id));
    let agents: Vec<(Millis, &AgentFacts)> =
        local.iter().map(|a| (a.connected_at, &a.facts)).chain(remote.iter().map(|s| (s.since, &s.facts))).collect();
    let connected_since = agents.iter().map(|a| a.0).min();
    // The newest live agent's own words beat what the store remembers.
    let facts = agents.iter().max_by_key(|a| a.0).map(|a| a.1.clone()).or_else(|| c.agent.clone());
    let last_seen = if agents.is_empty() { c.last_seen_at } else { Some(now_ms()) };
    json!({
        "id": c.id,
        "name": c.name,
        "status": status(hub, c),
        "agents": agents.len(),
        "agent_version": facts.as_ref().map(|f| f.agent_version.clone()),
        "arch": facts.as_ref().map(|f| f.arch.clone()),
        "kube_version": facts.as_ref().map(|f| f.kube_version.clone()),
        "node_count": facts.as_ref().map(|f| f.node_count),
        "users": c.users,
        "groups": c.groups,
        "registered_at": rfc3339(c.created_at),
        "activated_at": opt_time(c.activated_at),
        "deregistered_at": opt_time(c.deregistered_at),
        "connected_since": opt_time(connected_since),
        "last_seen": opt_time(last_seen),
    })
}

pub fn user_json(u: &User) -> Value {
    json!({
        "name": u.name,
        "groups": u.groups,
        "admin": u.admin,
        "created_at": rfc3339(u.created_at),
        "revoked_at": opt_time(u.revoked_at),
    })
}

pub fn grant_json(g: &Grant) -> Value {
    let mut v = json!({ "id": g.id, "clusters": g.clusters, "created_at": rfc3339(g.created_at) });
    match &g.subject {
        Subject::User(u) => v["user"] = json!(u),
        Subject::Group(gr) => v["group"] = json!(gr),
    }
    v
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Whether `user` may reach the cluster named `cluster`: admins reach
/// every cluster; others through a grant to them or one of their groups.
pub fn may_reach(user: &User, grants: &[Grant], cluster: &str) -> bool {
    user.admin
        || grants.iter().any(|g| {
            let subject = match &g.subject {
                Subject::User(u) => *u == user.name,
                Subject::Group(gr) => user.groups.contains(gr),
            };
            subject && glob_match(&g.clusters, cluster)
        })
}

/// A new bearer token for a person: its value (shown once) and its hash.
pub fn new_token() -> (Secret, String) {
    let token = Secret::new(format!("uh_{}", Secret::random(32).expose()));
    let hash = sha256_hex(token.expose());
    (token, hash)
}

/// Cluster names are DNS labels: they appear in URLs and kube objects.
pub fn valid_cluster_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", "edge-1"));
        assert!(glob_match("edge-*", "edge-1"));
        assert!(!glob_match("edge-*", "prod-1"));
        assert!(glob_match("*-1", "edge-1"));
        assert!(glob_match("e*e*1", "edge-1"));
        assert!(!glob_match("edge", "edge-1"));
        assert!(glob_match("edge-1", "edge-1"));
    }

    #[test]
    fn names() {
        assert!(valid_cluster_name("edge-1"));
        for bad in ["", "-a", "a-", "Edge", "a/b", "a..b", &"x".repeat(64)] {
            assert!(!valid_cluster_name(bad), "{bad}");
        }
    }
}
