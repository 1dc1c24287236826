//! A stand-in Kubernetes API server for tests.
//!
//! No real kube-apiserver runs on the test machines, yet uplink's promise
//! is that the cluster's own authentication, impersonation checks and RBAC
//! decide what each person gets. [`StandIn`] enforces exactly those, in
//! process, on `127.0.0.1:0`, over TLS with its own CA, and real `kubectl`
//! (1.32) accepts it.
//!
//! ```text
//!  test ──► StandIn::start(Config) ──► accept thread ──► one thread per connection
//!                                                        │ TLS (rustls, own CA; client certs optional)
//!                                                        │ HTTP/1.1 keep-alive
//!                                                        ▼
//!            authenticate (bearer token | client cert CN/O) ─ 401
//!            impersonate (Impersonate-User/Group/Uid/Extra-*) ─ 403 / 400
//!            authorize (RBAC objects in the store)             ─ 403
//!            serve: discovery, CRUD, Table, watch, logs, exec/attach (WebSocket v5/v4,
//!                   or SPDY/3.1 v4), port-forward (SPDY/3.1, plain or tunnelled in WebSocket),
//!                   SelfSubjectAccessReview (JSON and protobuf), SelfSubjectReview
//!            record every request ──► StandIn::requests()
//! ```
//!
//! # Using it
//!
//! ```ignore
//! mod support;
//! use support::kube::{Config, StandIn};
//!
//! let k = StandIn::start(Config::default());
//! k.load_rbac_yaml(include_str!("fixtures/kube/eks-console-restricted-access.yaml")).unwrap();
//! // k.url(), k.ca_pem(), k.agent_token(): what the agent needs to reach "the cluster".
//! let records = k.requests(); // what reached the cluster, as whom
//! ```
//!
//! The public surface:
//! - [`StandIn::start`], [`StandIn::stop`] (also on drop), [`StandIn::url`],
//!   [`StandIn::addr`], [`StandIn::ca_pem`], [`StandIn::ca_der`].
//! - Credentials: [`StandIn::admin_token`] (group `system:masters`),
//!   [`StandIn::agent_token`] (`system:serviceaccount:uplink:uplink-agent`),
//!   [`StandIn::set_agent_token`] (rotation: the old token is refused from
//!   then on), [`StandIn::add_token`], [`StandIn::remove_token`],
//!   [`StandIn::client_cert_pem_for`] (CN=user, O=group; at most two groups,
//!   a limit of rcgen's distinguished names).
//! - Objects: [`StandIn::load_rbac_yaml`] (any multi-document YAML of
//!   served kinds), [`StandIn::apply`], [`StandIn::delete`],
//!   [`StandIn::object`].
//! - Streams: [`StandIn::append_log`] (seen by `logs -f`),
//!   [`StandIn::echo_port`] (where port-forwards land by default),
//!   [`StandIn::forward_port_to`].
//! - Observation: [`StandIn::requests`], [`StandIn::clear_requests`],
//!   [`RequestRecord`].
//! - kubectl: [`StandIn::kubeconfig_for_token`],
//!   [`StandIn::kubeconfig_for_cert`].
//!
//! Authorization follows kube up to 1.34: a WebSocket exec/attach/port-forward
//! (GET) needs `get` on `pods/exec` (etc.), the SPDY one (POST) `create`.
//! The exec'd container is a tiny shell: `echo`, `cat` (stdin echoed until
//! it closes), `true`, `false`, `exit N`, `sleep N`, `sh -c 'a; b && c'`,
//! `echo ... >&2`; attach behaves as `cat`. Port-forwards to any pod port
//! reach [`StandIn::echo_port`] unless redirected.
//!
//! Things that behave as the real server does and may surprise: an empty
//! `Impersonate-User` means no impersonation (the request runs as the real
//! user; [`RequestRecord::empty_impersonate_user`] tells); when discovery is
//! forbidden kubectl prints only `Error from server (Forbidden): unknown`;
//! watch events are written `{"object":...,"type":...}` (keys sorted).
//!
//! Out of scope: HTTP/2, aggregated discovery, OpenAPI documents, server-side
//! apply, admission, garbage collection, controllers (a Deployment never
//! makes pods by itself), protobuf responses (requests in protobuf are read
//! only for the review kinds).

mod discovery;
mod fixtures;
mod http;
mod proto;
mod rbac;
mod server;
mod spdy;
mod store;
mod time;
mod ws;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use serde_json::{Value, json};

pub use rbac::UserInfo;

/// The agent's service account, as the API server names it.
pub const AGENT_USER: &str = "system:serviceaccount:uplink:uplink-agent";
/// The agent's groups, as the service-account authenticator gives them.
pub const AGENT_GROUPS: &[&str] = &["system:serviceaccounts", "system:serviceaccounts:uplink", "system:authenticated"];
/// The admin user behind [`StandIn::admin_token`].
pub const ADMIN_USER: &str = "kubernetes-admin";

/// RBAC that lets the agent's service account impersonate `users`, and
/// nobody else (for [`StandIn::load_rbac_yaml`]).
pub fn impersonation_rbac(users: &[&str]) -> String {
    let names: Vec<String> = users.iter().map(|u| format!("{u:?}")).collect();
    format!(
        r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: uplink-agent-impersonator
rules:
- apiGroups: [""]
  resources: ["users"]
  verbs: ["impersonate"]
  resourceNames: [{}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: uplink-agent-impersonator
subjects:
- kind: ServiceAccount
  name: uplink-agent
  namespace: uplink
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: uplink-agent-impersonator
"#,
        names.join(", ")
    )
}

/// How to start a [`StandIn`].
#[derive(Clone, Debug)]
pub struct Config {
    /// Load the edge-cluster fixtures (nodes, namespaces, workloads).
    pub fixtures: bool,
    /// Extra multi-document YAML loaded at start (RBAC or any served kind).
    pub yaml: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config { fixtures: true, yaml: Vec::new() }
    }
}

/// What the stand-in saw of one request.
#[derive(Clone, Debug, Default)]
pub struct RequestRecord {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    pub query: String,
    /// Whether an `Authorization` header arrived.
    pub had_authorization: bool,
    /// The authenticated (real) user, if authentication succeeded.
    pub user: Option<String>,
    pub groups: Vec<String>,
    /// Every `Impersonate-*` header exactly as received, empty values too
    /// (names in lower case).
    pub impersonate_headers: Vec<(String, String)>,
    /// The impersonated user, when impersonation took place.
    pub impersonated_user: Option<String>,
    /// The impersonated groups as requested (without `system:authenticated`).
    pub impersonated_groups: Vec<String>,
    /// The user the request finally ran as.
    pub effective_user: Option<String>,
    pub effective_groups: Vec<String>,
    /// The authorization verb (`get`, `list`, `watch`, `create`, ...).
    pub verb: String,
    /// The response status (101 for upgrades).
    pub status: u16,
}

impl RequestRecord {
    /// Whether an `Impersonate-User` header arrived with an empty value.
    pub fn empty_impersonate_user(&self) -> bool {
        self.impersonate_headers.iter().any(|(n, v)| n == "impersonate-user" && v.is_empty())
    }
}

pub(crate) struct State {
    pub tokens: HashMap<String, UserInfo>,
    pub agent_token: String,
    pub store: store::Store,
    pub logs: HashMap<(String, String), Vec<String>>,
    pub port_targets: HashMap<u16, SocketAddr>,
}

pub(crate) struct Shared {
    pub state: Mutex<State>,
    /// Notified on every store change and log append.
    pub changed: Condvar,
    pub records: Mutex<Vec<RequestRecord>>,
    pub stopping: Arc<AtomicBool>,
    pub echo_addr: SocketAddr,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A `Status` object as kube writes them.
pub(crate) fn status(code: u16, reason: &str, message: &str, details: Value) -> Value {
    let mut s = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if details.as_object().is_some_and(|d| !d.is_empty()) {
        s["details"] = details;
    }
    s
}

/// A running stand-in API server. Stops on [`StandIn::stop`] or drop.
pub struct StandIn {
    shared: Arc<Shared>,
    addr: SocketAddr,
    ca_cert: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
    admin_token: String,
    threads: Vec<JoinHandle<()>>,
    echo_listener_addr: SocketAddr,
}

fn random_token(prefix: &str) -> String {
    let mut b = [0u8; 24];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("random");
    format!("{prefix}-{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>())
}

impl StandIn {
    /// Starts the server on `127.0.0.1:0` (and an echo server for
    /// port-forwards). Panics if it cannot: this is test support.
    pub fn start(config: Config) -> StandIn {
        let stopping = Arc::new(AtomicBool::new(false));
        let (ca_cert, ca_key, server_config) = server::tls_config();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind stand-in");
        let addr = listener.local_addr().expect("addr");
        let echo = TcpListener::bind("127.0.0.1:0").expect("bind echo");
        let echo_addr = echo.local_addr().expect("echo addr");

        let admin_token = random_token("admin");
        let agent_token = random_token("agent");
        let mut tokens = HashMap::new();
        tokens.insert(admin_token.clone(), UserInfo::new(ADMIN_USER, &["system:masters", "system:authenticated"]));
        tokens.insert(agent_token.clone(), UserInfo::new(AGENT_USER, AGENT_GROUPS));
        let state = State {
            tokens,
            agent_token,
            store: store::Store::default(),
            logs: HashMap::new(),
            port_targets: HashMap::new(),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            changed: Condvar::new(),
            records: Mutex::new(Vec::new()),
            stopping: stopping.clone(),
            echo_addr,
        });
        {
            let mut st = shared.lock();
            server::load_yaml(&mut st.store, rbac::bootstrap_yaml()).expect("bootstrap policy");
            if config.fixtures {
                fixtures::load(&mut st);
            }
            for y in &config.yaml {
                server::load_yaml(&mut st.store, y).expect("Config.yaml");
            }
        }
        let mut threads = Vec::new();
        let s2 = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("standin-accept".into())
                .spawn(move || server::accept_loop(listener, Arc::new(server_config), s2))
                .expect("spawn"),
        );
        let stop2 = stopping.clone();
        threads.push(
            std::thread::Builder::new()
                .name("standin-echo".into())
                .spawn(move || echo_loop(echo, stop2))
                .expect("spawn"),
        );
        StandIn { shared, addr, ca_cert, ca_key, admin_token, threads, echo_listener_addr: echo_addr }
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA that signed the server certificate (and client certificates).
    pub fn ca_pem(&self) -> String {
        self.ca_cert.pem()
    }

    pub fn ca_der(&self) -> Vec<u8> {
        self.ca_cert.der().to_vec()
    }

    /// A token for `kubernetes-admin` in `system:masters`.
    pub fn admin_token(&self) -> String {
        self.admin_token.clone()
    }

    /// The agent's current service-account token.
    pub fn agent_token(&self) -> String {
        self.shared.lock().agent_token.clone()
    }

    /// Rotates the agent's token: `new` works from now on, the old one is
    /// refused with 401.
    pub fn set_agent_token(&self, new: &str) {
        let mut st = self.shared.lock();
        let old = std::mem::replace(&mut st.agent_token, new.to_string());
        st.tokens.remove(&old);
        st.tokens.insert(new.to_string(), UserInfo::new(AGENT_USER, AGENT_GROUPS));
    }

    /// Accepts `token` as `user` in `groups` (add `system:authenticated`
    /// yourself if wanted; the real authenticators do).
    pub fn add_token(&self, token: &str, user: &str, groups: &[&str]) {
        self.shared.lock().tokens.insert(token.to_string(), UserInfo::new(user, groups));
    }

    pub fn remove_token(&self, token: &str) {
        self.shared.lock().tokens.remove(token);
    }

    /// A client certificate and key (PEM) for `user` with `groups` as O,
    /// signed by the stand-in's CA, as k3s's admin kubeconfig carries.
    pub fn client_cert_pem_for(&self, user: &str, groups: &[&str]) -> (String, String) {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
        assert!(groups.len() <= 2, "rcgen writes at most two O attributes");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(DnType::CommonName, user);
        if let Some(g) = groups.first() {
            p.distinguished_name.push(DnType::OrganizationName, *g);
        }
        if let Some(g) = groups.get(1) {
            p.distinguished_name.push(DnType::CustomDnType(vec![2, 5, 4, 10]), *g);
        }
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &self.ca_cert, &self.ca_key).expect("sign");
        (cert.pem(), key.serialize_pem())
    }

    /// Loads multi-document YAML (Roles, ClusterRoles, bindings, or any
    /// served kind); an existing object of the same name is replaced.
    pub fn load_rbac_yaml(&self, yaml: &str) -> Result<(), String> {
        let mut st = self.shared.lock();
        let r = server::load_yaml(&mut st.store, yaml);
        drop(st);
        self.shared.changed.notify_all();
        r
    }

    /// Creates or replaces one object (`apiVersion`, `kind`,
    /// `metadata.name`, `metadata.namespace` say where). Returns it stored.
    pub fn apply(&self, obj: Value) -> Result<Value, String> {
        let mut st = self.shared.lock();
        let r = server::apply(&mut st.store, obj);
        drop(st);
        self.shared.changed.notify_all();
        r
    }

    /// Deletes an object, as a DELETE through the API would (watchers see it).
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        let Some(r) = discovery::find_kind(api_version, kind) else { return false };
        let ok = self.shared.lock().store.delete(r, namespace, name).is_ok();
        self.shared.changed.notify_all();
        ok
    }

    /// One stored object.
    pub fn object(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let r = discovery::find_kind(api_version, kind)?;
        self.shared.lock().store.get(r, namespace, name).cloned()
    }

    /// Appends a line to a pod's log (followers see it at once).
    pub fn append_log(&self, namespace: &str, pod: &str, line: &str) {
        let mut st = self.shared.lock();
        st.logs.entry((namespace.to_string(), pod.to_string())).or_default().push(line.to_string());
        drop(st);
        self.shared.changed.notify_all();
    }

    /// The port of the built-in echo server, where port-forwards land
    /// unless [`StandIn::forward_port_to`] says otherwise.
    pub fn echo_port(&self) -> u16 {
        self.echo_listener_addr.port()
    }

    /// Sends port-forwards to pod port `port` (any pod) to `target`.
    pub fn forward_port_to(&self, port: u16, target: SocketAddr) {
        self.shared.lock().port_targets.insert(port, target);
    }

    /// Every request so far, in the order they were answered.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.records.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn clear_requests(&self) {
        self.shared.records.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn kubeconfig(&self, path: &Path, user: Value) -> std::io::Result<()> {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let cfg = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": {
                "server": self.url(),
                "certificate-authority-data": b64(&self.ca_pem()),
            }}],
            "users": [{"name": "standin-user", "user": user}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin-user"}}],
            "current-context": "standin",
        });
        // JSON is YAML; kubectl reads it as a kubeconfig.
        std::fs::write(path, serde_json::to_vec_pretty(&cfg)?)
    }

    /// Writes a kubeconfig that reaches the stand-in with a bearer token.
    pub fn kubeconfig_for_token(&self, path: &Path, token: &str) -> std::io::Result<()> {
        self.kubeconfig(path, json!({"token": token}))
    }

    /// Writes a kubeconfig that authenticates with a client certificate.
    pub fn kubeconfig_for_cert(&self, path: &Path, user: &str, groups: &[&str]) -> std::io::Result<()> {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let (cert, key) = self.client_cert_pem_for(user, groups);
        self.kubeconfig(path, json!({"client-certificate-data": b64(&cert), "client-key-data": b64(&key)}))
    }

    /// Stops accepting, ends every stream and joins the server threads.
    pub fn stop(&mut self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        self.shared.changed.notify_all();
        // Wake the blocking accept calls.
        let _ = TcpStream::connect(self.addr);
        let _ = TcpStream::connect(self.echo_listener_addr);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Echoes every byte back on each accepted connection.
fn echo_loop(listener: TcpListener, stopping: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut conn) = conn else { continue };
        // Detached: ends when the peer closes; the test owns the peer.
        std::thread::spawn(move || {
            let Ok(mut w) = conn.try_clone() else { return };
            let _ = std::io::copy(&mut conn, &mut w);
            let _ = w.shutdown(std::net::Shutdown::Write);
        });
    }
}
