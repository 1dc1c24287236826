//! The `uplink-hub` command line: `serve`, and admin commands that talk to
//! a running hub's REST API (URL, token and CA from flags or
//! `UPLINK_HUB_URL`, `UPLINK_TOKEN`, `UPLINK_HUB_CA`).
//!
//! Names people give (users, groups, clusters) go into URLs
//! percent-encoded, one path segment or query value each, so an IAM ARN
//! with its `/` or a name with spaces reaches the hub whole. Tables are
//! sized from their content ([`super::table`]).
//!
//! `cluster register` checks all it can before it asks the hub (names,
//! lifetime, an existing writable output directory, files it would
//! overwrite): a registration whose files cannot be written loses its
//! one-time code. Should writing fail anyway, the activation and the
//! manifest go to standard output instead of being lost.

use super::client::{Client, Reply};
use super::limits::{Limits, Timeout, setting};
use super::oidc::{self, OidcConfig};
use super::server::{ServeConfig, serve};
use super::table::{self, Align};
use crate::http::percent_encode;
use crate::names::{self, NameKind};
use crate::secret::Secret;
use argh::FromArgs;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// uplink-hub: register Kubernetes clusters, hold their agents' tunnels, serve kubectl through them.
#[derive(FromArgs)]
pub struct Args {
    /// hub URL for admin commands (env UPLINK_HUB_URL, default https://localhost:8443)
    #[argh(option)]
    pub hub_url: Option<String>,
    /// bearer token for admin commands (env UPLINK_TOKEN)
    #[argh(option)]
    pub token: Option<String>,
    /// PEM file of the hub's CA (env UPLINK_HUB_CA; default ./uplink-data/ca.pem if present, else public roots)
    #[argh(option)]
    pub hub_ca: Option<PathBuf>,
    #[argh(subcommand)]
    pub cmd: Cmd,
}

// Parsed once per process: the size of `serve`'s many options costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(FromArgs)]
#[argh(subcommand)]
pub enum Cmd {
    Serve(ServeArgs),
    Cluster(ClusterArgs),
    User(UserArgs),
    Grant(GrantArgs),
    Kubeconfig(KubeconfigArgs),
    Audit(AuditArgs),
    Login(LoginArgs),
    Version(VersionArgs),
}

/// run the hub
#[derive(FromArgs)]
#[argh(subcommand, name = "serve")]
pub struct ServeArgs {
    /// address to listen on (default 0.0.0.0:8443)
    #[argh(option, default = "\"0.0.0.0:8443\".parse().unwrap()")]
    pub listen: std::net::SocketAddr,
    /// data directory: database, certificates (default ./uplink-data)
    #[argh(option, default = "PathBuf::from(\"uplink-data\")")]
    pub data_dir: PathBuf,
    /// where the hub keeps its state: an SQLite path or sqlite: URL (default DATA_DIR/hub.db), or
    /// postgres://USER@HOST:PORT/DB?sslmode=verify-full&sslrootcert=CA.pem&passfile=PATH to share one database
    /// among several hubs (env UPLINK_HUB_STORE)
    #[argh(option)]
    pub store: Option<String>,
    /// this replica's own URL when several hubs share a postgres store (default
    /// https://HOSTNAME:PORT of --listen); --public-url is the load balancer's
    #[argh(option)]
    pub advertise_url: Option<String>,
    /// URL agents and people use to reach this hub (default https://HOSTNAME:PORT)
    #[argh(option)]
    pub public_url: Option<String>,
    /// PEM certificate chain to serve instead of the self-made one
    #[argh(option)]
    pub cert: Option<PathBuf>,
    /// PEM private key for --cert
    #[argh(option)]
    pub key: Option<PathBuf>,
    /// most client connections held at once (env UPLINK_HUB_MAX_CONNECTIONS, default 4096, lowered to fit the open-file limit)
    #[argh(option)]
    pub max_connections: Option<usize>,
    /// most connections one client address may hold that wait over 2 s to authenticate (env UPLINK_HUB_MAX_CONNECTIONS_PER_ADDRESS, default 128)
    #[argh(option)]
    pub max_connections_per_address: Option<usize>,
    /// TLS handshake deadline, e.g. 10s or 500ms (env UPLINK_HUB_HANDSHAKE_TIMEOUT, default 10s)
    #[argh(option)]
    pub handshake_timeout: Option<Timeout>,
    /// deadline for a whole request head from its first byte (env UPLINK_HUB_HEAD_TIMEOUT, default 10s)
    #[argh(option)]
    pub head_timeout: Option<Timeout>,
    /// how long an idle kept-alive connection stays open (env UPLINK_HUB_IDLE_TIMEOUT, default 60s)
    #[argh(option)]
    pub idle_timeout: Option<Timeout>,
    /// longest pause inside an activation or REST request body (env UPLINK_HUB_BODY_TIMEOUT, default 10s)
    #[argh(option)]
    pub body_timeout: Option<Timeout>,
    /// deadline for a whole activation or REST request body, and for writing an in-memory answer (env UPLINK_HUB_SMALL_BODY_TIMEOUT, default 30s)
    #[argh(option)]
    pub small_body_timeout: Option<Timeout>,
    /// how often each side of a tunnel pings, e.g. 5s or 500ms; agents
    /// take it from the hub (env UPLINK_HUB_KEEPALIVE, default 5s)
    #[argh(option)]
    pub keepalive: Option<String>,
    /// silence after which a tunnel is dead and its streams fail, at least
    /// twice --keepalive; agents take it from the hub (env
    /// UPLINK_HUB_DEAD_AFTER, default 15s)
    #[argh(option)]
    pub dead_after: Option<String>,
    /// share the port with another hub process (SO_REUSEPORT), so a new
    /// one can start while this one drains (env UPLINK_HUB_REUSE_PORT=1)
    #[argh(switch)]
    pub reuse_port: bool,
    /// issuer URL (OpenID Connect) of the organisation's identity provider (enables sign-in with it)
    #[argh(option)]
    pub oidc_issuer: Option<String>,
    /// client id (OIDC) registered for this hub (the ID tokens' audience)
    #[argh(option)]
    pub oidc_client_id: Option<String>,
    /// file holding the OIDC client secret (env UPLINK_OIDC_CLIENT_SECRET; none: a public client with PKCE)
    #[argh(option)]
    pub oidc_client_secret_file: Option<PathBuf>,
    /// scopes to request, comma-separated (default openid,email,profile,groups)
    #[argh(option, default = "\"openid,email,profile,groups\".into()")]
    pub oidc_scopes: String,
    /// claim that names the person: email, sub or preferred_username (default email)
    #[argh(option, default = "\"email\".into()")]
    pub oidc_user_claim: String,
    /// claim that lists the person's groups (default groups; empty: none)
    #[argh(option, default = "\"groups\".into()")]
    pub oidc_groups_claim: String,
    /// prefix for user names from the provider, e.g. oidc: (default none)
    #[argh(option, default = "String::new()")]
    pub oidc_user_prefix: String,
    /// prefix for group names from the provider, e.g. oidc: (default none)
    #[argh(option, default = "String::new()")]
    pub oidc_group_prefix: String,
    /// signature algorithms accepted, comma-separated (default RS256,ES256; none is never accepted)
    #[argh(option, default = "\"RS256,ES256\".into()")]
    pub oidc_algs: String,
    /// members of this group (as named after the group prefix) are hub admins
    #[argh(option)]
    pub oidc_admin_group: Option<String>,
    /// PEM CA to trust for the identity provider instead of the public roots
    #[argh(option)]
    pub oidc_ca: Option<PathBuf>,
}

impl ServeArgs {
    /// The limits these flags, else the environment, else the defaults set.
    fn limits(&self) -> Result<Limits, String> {
        let d = Limits::default();
        let t = |flag: Option<Timeout>, env: &str, default| setting(flag, env, Timeout(default)).map(|t| t.0);
        let limits = Limits {
            max_connections: setting(self.max_connections, "UPLINK_HUB_MAX_CONNECTIONS", d.max_connections)?,
            max_pending_per_address: setting(
                self.max_connections_per_address,
                "UPLINK_HUB_MAX_CONNECTIONS_PER_ADDRESS",
                d.max_pending_per_address,
            )?,
            handshake: t(self.handshake_timeout, "UPLINK_HUB_HANDSHAKE_TIMEOUT", d.handshake)?,
            head: t(self.head_timeout, "UPLINK_HUB_HEAD_TIMEOUT", d.head)?,
            idle: t(self.idle_timeout, "UPLINK_HUB_IDLE_TIMEOUT", d.idle)?,
            body_stall: t(self.body_timeout, "UPLINK_HUB_BODY_TIMEOUT", d.body_stall)?,
            small_body: t(self.small_body_timeout, "UPLINK_HUB_SMALL_BODY_TIMEOUT", d.small_body)?,
        };
        if limits.max_connections == 0 || limits.max_pending_per_address == 0 {
            return Err("--max-connections and --max-connections-per-address must be at least 1".into());
        }
        Ok(limits)
    }

    /// Keepalive interval and dead-peer deadline from flags, else the
    /// environment, else the defaults; the deadline must allow two pings.
    fn keepalive(&self) -> Result<(std::time::Duration, std::time::Duration), String> {
        use crate::proto::mux::{DEFAULT_DEAD_AFTER, DEFAULT_KEEPALIVE};
        let get = |flag: &Option<String>, name: &str, env: &str, default| match flag
            .clone()
            .or_else(|| std::env::var(env).ok().filter(|v| !v.trim().is_empty()))
        {
            Some(v) => crate::time::parse_duration(&v).map_err(|e| format!("--{name} (or {env}): {e}")),
            None => Ok(default),
        };
        let every = get(&self.keepalive, "keepalive", "UPLINK_HUB_KEEPALIVE", DEFAULT_KEEPALIVE)?;
        let dead = get(&self.dead_after, "dead-after", "UPLINK_HUB_DEAD_AFTER", DEFAULT_DEAD_AFTER)?;
        if every < std::time::Duration::from_millis(100) {
            return Err(format!("--keepalive {every:?} is below 100ms"));
        }
        if dead < every * 2 {
            return Err(format!(
                "--dead-after {dead:?} must be at least twice --keepalive {every:?}, or quiet tunnels would be cut"
            ));
        }
        Ok((every, dead))
    }
}

/// sign in with the identity provider and print a kubectl ExecCredential (an exec credential plugin)
#[derive(FromArgs)]
#[argh(subcommand, name = "login")]
pub struct LoginArgs {
    /// issuer URL of the OpenID Connect provider
    #[argh(option)]
    pub issuer: String,
    /// client id (OIDC) of the hub
    #[argh(option)]
    pub client_id: String,
    /// scopes, comma-separated (default openid,email,profile,groups,offline_access)
    #[argh(option, default = "\"openid,email,profile,groups,offline_access\".into()")]
    pub scopes: String,
    /// PEM CA of the provider (env UPLINK_OIDC_CA_PEM holds the PEM itself; default public roots)
    #[argh(option)]
    pub ca_file: Option<PathBuf>,
    /// print only the ID token (e.g. UPLINK_TOKEN=$(uplink-hub login ... --print-token) uplink-hub kubeconfig ...)
    #[argh(switch)]
    pub print_token: bool,
}

/// manage clusters
#[derive(FromArgs)]
#[argh(subcommand, name = "cluster")]
pub struct ClusterArgs {
    #[argh(subcommand)]
    pub cmd: ClusterCmd,
}

#[derive(FromArgs)]
#[argh(subcommand)]
pub enum ClusterCmd {
    Register(RegisterArgs),
    Renew(RenewArgs),
    List(ListArgs),
    Show(ShowArgs),
    Deregister(DeregisterArgs),
}

/// register a cluster: prints its activation, writes its manifest and activation file
#[derive(FromArgs)]
#[argh(subcommand, name = "register")]
pub struct RegisterArgs {
    /// cluster name (a DNS label)
    #[argh(positional)]
    pub name: String,
    /// hours the activation stays valid (default 72)
    #[argh(option, default = "72")]
    pub expires_hours: u64,
    /// a user the cluster may impersonate (repeatable; any Kubernetes user name, e.g. an IAM ARN)
    #[argh(option)]
    pub user: Vec<String>,
    /// a group the cluster may impersonate (repeatable)
    #[argh(option)]
    pub group: Vec<String>,
    /// where to write uplink-NAME.yaml and uplink-NAME-activation.json (default .)
    #[argh(option, default = "PathBuf::from(\".\")")]
    pub out_dir: PathBuf,
    /// if NAME is registered but PENDING, issue a fresh activation (the old code stops working); also overwrite the files
    #[argh(switch)]
    pub force: bool,
    /// print the API answer as JSON
    #[argh(switch)]
    pub json: bool,
}

/// issue a fresh activation for a PENDING cluster (expired code, lost files); rewrites its files
#[derive(FromArgs)]
#[argh(subcommand, name = "renew")]
pub struct RenewArgs {
    /// cluster name
    #[argh(positional)]
    pub name: String,
    /// hours the new activation stays valid (default 72)
    #[argh(option, default = "72")]
    pub expires_hours: u64,
    /// where to write uplink-NAME.yaml and uplink-NAME-activation.json (default .)
    #[argh(option, default = "PathBuf::from(\".\")")]
    pub out_dir: PathBuf,
    /// print the API answer as JSON
    #[argh(switch)]
    pub json: bool,
}

/// list clusters
#[derive(FromArgs)]
#[argh(subcommand, name = "list")]
pub struct ListArgs {
    /// include deregistered clusters
    #[argh(switch)]
    pub all: bool,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

/// show one cluster with its agents and recent events
#[derive(FromArgs)]
#[argh(subcommand, name = "show")]
pub struct ShowArgs {
    #[argh(positional)]
    pub name: String,
}

/// deregister a cluster: revoke its credential, stop its agents
#[derive(FromArgs)]
#[argh(subcommand, name = "deregister")]
pub struct DeregisterArgs {
    #[argh(positional)]
    pub name: String,
}

/// manage users
#[derive(FromArgs)]
#[argh(subcommand, name = "user")]
pub struct UserArgs {
    #[argh(subcommand)]
    pub cmd: UserCmd,
}

#[derive(FromArgs)]
#[argh(subcommand)]
pub enum UserCmd {
    Add(UserAddArgs),
    List(UserListArgs),
    Revoke(UserRevokeArgs),
}

/// add a user; prints their token once
#[derive(FromArgs)]
#[argh(subcommand, name = "add")]
pub struct UserAddArgs {
    #[argh(positional)]
    pub name: String,
    /// a group of the user (repeatable)
    #[argh(option)]
    pub group: Vec<String>,
    /// make the user a hub admin
    #[argh(switch)]
    pub admin: bool,
}

/// list users
#[derive(FromArgs)]
#[argh(subcommand, name = "list")]
pub struct UserListArgs {}

/// revoke a user and all their tokens
#[derive(FromArgs)]
#[argh(subcommand, name = "revoke")]
pub struct UserRevokeArgs {
    #[argh(positional)]
    pub name: String,
}

/// manage grants (who may reach which clusters)
#[derive(FromArgs)]
#[argh(subcommand, name = "grant")]
pub struct GrantArgs {
    #[argh(subcommand)]
    pub cmd: GrantCmd,
}

#[derive(FromArgs)]
#[argh(subcommand)]
pub enum GrantCmd {
    Add(GrantAddArgs),
    List(GrantListArgs),
    Remove(GrantRemoveArgs),
}

/// let a user or group reach clusters matching a pattern (e.g. edge-*)
#[derive(FromArgs)]
#[argh(subcommand, name = "add")]
pub struct GrantAddArgs {
    /// the user
    #[argh(option)]
    pub user: Option<String>,
    /// the group
    #[argh(option)]
    pub group: Option<String>,
    /// cluster name or pattern with '*'
    #[argh(option)]
    pub clusters: String,
}

/// list grants
#[derive(FromArgs)]
#[argh(subcommand, name = "list")]
pub struct GrantListArgs {}

/// remove a grant by id
#[derive(FromArgs)]
#[argh(subcommand, name = "remove")]
pub struct GrantRemoveArgs {
    #[argh(positional)]
    pub id: i64,
}

/// write a kubeconfig for you and one cluster
#[derive(FromArgs)]
#[argh(subcommand, name = "kubeconfig")]
pub struct KubeconfigArgs {
    /// the cluster
    #[argh(option)]
    pub cluster: String,
    /// file to write (default: standard output)
    #[argh(option)]
    pub out: Option<PathBuf>,
}

/// show the audit log of proxied requests, newest first
#[derive(FromArgs)]
#[argh(subcommand, name = "audit")]
pub struct AuditArgs {
    /// only this user's requests
    #[argh(option)]
    pub user: Option<String>,
    /// only requests to this cluster
    #[argh(option)]
    pub cluster: Option<String>,
    /// only requests since this RFC 3339 time, e.g. 2026-01-01T00:00:00Z
    #[argh(option)]
    pub since: Option<String>,
    /// at most this many entries (default 100)
    #[argh(option, default = "100")]
    pub limit: u32,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

/// print the version
#[derive(FromArgs)]
#[argh(subcommand, name = "version")]
pub struct VersionArgs {}

/// Runs the command; returns the process exit code.
pub fn run(args: Args) -> i32 {
    match run_inner(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("uplink-hub: {e}");
            1
        }
    }
}

fn client(args: &Args) -> Result<Client, String> {
    let url = args
        .hub_url
        .clone()
        .or_else(|| std::env::var("UPLINK_HUB_URL").ok())
        .unwrap_or_else(|| "https://localhost:8443".into());
    let token = args.token.clone().or_else(|| std::env::var("UPLINK_TOKEN").ok());
    if token.is_none() {
        return Err(
            "no token: set UPLINK_TOKEN (the admin token is printed at the hub's first start) or pass --token".into()
        );
    }
    let ca_path = args.hub_ca.clone().or_else(|| std::env::var_os("UPLINK_HUB_CA").map(PathBuf::from)).or_else(|| {
        let p = PathBuf::from("uplink-data/ca.pem");
        p.exists().then_some(p)
    });
    let ca = match ca_path {
        Some(p) => Some(std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => None,
    };
    Client::new(&url, ca.as_deref(), token.as_deref())
}

fn read_file(p: &Path) -> Result<String, String> {
    std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))
}

fn list(csv: &str) -> Vec<String> {
    csv.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

/// The provider `serve` was given, checked before the hub starts.
fn oidc_config(a: &ServeArgs) -> Result<Option<OidcConfig>, String> {
    let Some(issuer) = a.oidc_issuer.clone() else {
        return match a.oidc_client_id {
            Some(_) => Err("--oidc-client-id needs --oidc-issuer".into()),
            None => Ok(None),
        };
    };
    let secret = match &a.oidc_client_secret_file {
        Some(p) => Some(read_file(p)?.trim().to_string()),
        None => std::env::var("UPLINK_OIDC_CLIENT_SECRET").ok().filter(|s| !s.is_empty()),
    };
    let cfg = OidcConfig {
        issuer,
        client_id: a.oidc_client_id.clone().unwrap_or_default(),
        client_secret: secret.map(Secret::new),
        scopes: list(&a.oidc_scopes),
        user_claim: a.oidc_user_claim.clone(),
        groups_claim: Some(a.oidc_groups_claim.clone()).filter(|g| !g.is_empty()),
        user_prefix: a.oidc_user_prefix.clone(),
        group_prefix: a.oidc_group_prefix.clone(),
        algorithms: OidcConfig::parse_algorithms(&a.oidc_algs)?,
        admin_group: a.oidc_admin_group.clone(),
        ca_pem: a.oidc_ca.as_deref().map(read_file).transpose()?,
    };
    cfg.validate()?;
    Ok(Some(cfg))
}

/// `uplink-hub login`: stdout carries only the credential.
fn login(l: &LoginArgs) -> Result<(), String> {
    let ca_pem = match &l.ca_file {
        Some(p) => Some(read_file(p)?),
        None => std::env::var("UPLINK_OIDC_CA_PEM").ok().filter(|s| !s.is_empty()),
    };
    let cfg = oidc::login::LoginConfig {
        issuer: l.issuer.clone(),
        client_id: l.client_id.clone(),
        scopes: list(&l.scopes),
        ca_pem,
    };
    let dir = oidc::login::cache_dir().ok_or("cannot find a cache directory: set XDG_CACHE_HOME or HOME")?;
    let token = oidc::login::id_token(&cfg, &dir).map_err(|e| e.to_string())?;
    if l.print_token {
        println!("{}", token.expose());
    } else {
        println!("{}", oidc::login::exec_credential(token.expose()));
    }
    Ok(())
}

fn check(r: std::io::Result<Reply>) -> Result<Value, String> {
    let r = r.map_err(|e| format!("cannot reach the hub: {e}"))?;
    let v = r.json();
    if r.status >= 400 {
        let msg = v["message"].as_str().map_or_else(|| r.text(), str::to_string);
        return Err(format!("{} ({}): {msg}", v["error"].as_str().unwrap_or("error"), r.status));
    }
    Ok(v)
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn run_inner(args: Args) -> Result<(), String> {
    match &args.cmd {
        Cmd::Version(_) => {
            println!("uplink-hub {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Cmd::Serve(a) => {
            super::logger::init();
            let (keepalive, dead_after) = a.keepalive()?;
            let reuse_port = a.reuse_port || std::env::var("UPLINK_HUB_REUSE_PORT").is_ok_and(|v| v == "1");
            serve(ServeConfig {
                listen: a.listen,
                data_dir: a.data_dir.clone(),
                public_url: a.public_url.clone(),
                cert: a.cert.clone(),
                key: a.key.clone(),
                keepalive,
                dead_after,
                reuse_port,
                oidc: oidc_config(a)?,
                limits: a.limits()?,
                store: a.store.clone().or_else(|| std::env::var("UPLINK_HUB_STORE").ok()),
                advertise_url: a.advertise_url.clone(),
            })
        }
        Cmd::Login(l) => login(l),
        Cmd::Cluster(c) => {
            let api = client(&args)?;
            match &c.cmd {
                ClusterCmd::Register(r) => register(&api, r),
                ClusterCmd::Renew(r) => renew(&api, r),
                ClusterCmd::List(l) => {
                    let path = if l.all { "/api/v1/clusters?all=true" } else { "/api/v1/clusters" };
                    let v = check(api.get(path))?;
                    if l.json {
                        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                        return Ok(());
                    }
                    let rows: Vec<Vec<String>> = v["clusters"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|c| {
                            [
                                "name",
                                "status",
                                "agents",
                                "agent_version",
                                "arch",
                                "kube_version",
                                "node_count",
                                "last_seen",
                            ]
                            .iter()
                            .map(|k| s(&c[*k]))
                            .collect()
                        })
                        .collect();
                    let align =
                        [Align::Left, Align::Left, Align::Right, Align::Left, Align::Left, Align::Left, Align::Right];
                    print!(
                        "{}",
                        table::render(
                            &["NAME", "STATUS", "AGENTS", "VERSION", "ARCH", "KUBE", "NODES", "LAST SEEN"],
                            &rows,
                            &align
                        )
                    );
                    Ok(())
                }
                ClusterCmd::Show(sh) => {
                    let v = check(api.get(&format!("/api/v1/clusters/{}", percent_encode(&sh.name))))?;
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    Ok(())
                }
                ClusterCmd::Deregister(d) => {
                    let v = check(api.delete(&format!("/api/v1/clusters/{}", percent_encode(&d.name))))?;
                    println!(
                        "cluster {} deregistered ({} connected agent(s) told to stop)",
                        d.name,
                        s(&v["agents_notified"])
                    );
                    print!("{}", v["cleanup"].as_str().unwrap_or_default());
                    Ok(())
                }
            }
        }
        Cmd::User(u) => {
            let api = client(&args)?;
            match &u.cmd {
                UserCmd::Add(a) => {
                    let v = check(
                        api.post_json("/api/v1/users", &json!({ "name": a.name, "groups": a.group, "admin": a.admin })),
                    )?;
                    println!("user {} added", a.name);
                    println!("token (shown only this once): {}", s(&v["token"]));
                    Ok(())
                }
                UserCmd::List(_) => {
                    let v = check(api.get("/api/v1/users"))?;
                    let rows: Vec<Vec<String>> = v["users"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|u| {
                            let groups: Vec<String> = u["groups"].as_array().into_iter().flatten().map(s).collect();
                            vec![s(&u["name"]), s(&u["admin"]), s(&u["revoked_at"]), groups.join(",")]
                        })
                        .collect();
                    print!("{}", table::render(&["NAME", "ADMIN", "REVOKED", "GROUPS"], &rows, &[]));
                    Ok(())
                }
                UserCmd::Revoke(r) => {
                    check(api.delete(&format!("/api/v1/users/{}", percent_encode(&r.name))))?;
                    println!("user {} revoked; their tokens no longer work", r.name);
                    Ok(())
                }
            }
        }
        Cmd::Grant(g) => {
            let api = client(&args)?;
            match &g.cmd {
                GrantCmd::Add(a) => {
                    let v = check(api.post_json(
                        "/api/v1/grants",
                        &json!({ "user": a.user, "group": a.group, "clusters": a.clusters }),
                    ))?;
                    println!("grant {} added", s(&v["grant"]["id"]));
                    Ok(())
                }
                GrantCmd::List(_) => {
                    let v = check(api.get("/api/v1/grants"))?;
                    let rows: Vec<Vec<String>> = v["grants"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|g| {
                            let subject = if g["user"].is_string() {
                                format!("user:{}", s(&g["user"]))
                            } else {
                                format!("group:{}", s(&g["group"]))
                            };
                            vec![s(&g["id"]), subject, s(&g["clusters"])]
                        })
                        .collect();
                    print!("{}", table::render(&["ID", "SUBJECT", "CLUSTERS"], &rows, &[Align::Right]));
                    Ok(())
                }
                GrantCmd::Remove(r) => {
                    check(api.delete(&format!("/api/v1/grants/{}", r.id)))?;
                    println!("grant {} removed", r.id);
                    Ok(())
                }
            }
        }
        Cmd::Audit(a) => audit(&client(&args)?, a),
        Cmd::Kubeconfig(k) => {
            let api = client(&args)?;
            let r = api
                .get(&format!("/api/v1/kubeconfig?cluster={}", percent_encode(&k.cluster)))
                .map_err(|e| format!("cannot reach the hub: {e}"))?;
            if r.status != 200 {
                check(Ok(r))?;
                return Err("unexpected answer".into());
            }
            match &k.out {
                Some(p) => {
                    write_private(p, &r.text())?;
                    eprintln!("wrote {}; use: KUBECONFIG={} kubectl get ns", p.display(), p.display());
                }
                None => print!("{}", r.text()),
            }
            Ok(())
        }
    }
}

/// `cluster register`: check, ask the hub, write the files (or print
/// what could not be written).
fn register(api: &Client, r: &RegisterArgs) -> Result<(), String> {
    if !super::valid_cluster_name(&r.name) {
        return Err(format!(
            "{:?} is not a cluster name: a DNS label of lowercase letters, digits and '-', at most 63",
            r.name
        ));
    }
    for u in &r.user {
        names::check(NameKind::User, u).map_err(|e| format!("--user: {e}"))?;
    }
    for g in &r.group {
        names::check(NameKind::Group, g).map_err(|e| format!("--group: {e}"))?;
    }
    check_lifetime(r.expires_hours)?;
    let files = InstallFiles::new(&r.name, &r.out_dir);
    files.check(r.force)?;
    let files = InstallFiles { overwrite: r.force, ..files };
    let v = check(api.post_json(
        "/api/v1/clusters",
        &json!({
            "name": r.name, "expires_in_hours": r.expires_hours, "users": r.user, "groups": r.group, "force": r.force,
        }),
    ))?;
    // With --force, a cluster that was already PENDING keeps its id and
    // gets a new activation (the hub says which happened).
    let what = if v["renewed"] == true { "has a new activation" } else { "registered" };
    files.write(&v, r.json, what)
}

/// `cluster renew`: a fresh activation for a PENDING cluster.
fn renew(api: &Client, r: &RenewArgs) -> Result<(), String> {
    check_lifetime(r.expires_hours)?;
    let files = InstallFiles::new(&r.name, &r.out_dir);
    // Renewing replaces this cluster's own files: the activation in them
    // stops working.
    files.check(true)?;
    let files = InstallFiles { overwrite: true, ..files };
    let v = check(api.post_json(
        &format!("/api/v1/clusters/{}/activation", percent_encode(&r.name)),
        &json!({ "expires_in_hours": r.expires_hours }),
    ))?;
    files.write(&v, r.json, "has a new activation")
}

fn check_lifetime(hours: u64) -> Result<(), String> {
    const MAX_HOURS: u64 = 24 * 365;
    if hours == 0 || hours > MAX_HOURS {
        return Err(format!("--expires-hours must be between 1 and {MAX_HOURS}"));
    }
    Ok(())
}

/// Where `cluster register` and `cluster renew` put what they got.
struct InstallFiles {
    name: String,
    dir: PathBuf,
    manifest: PathBuf,
    activation: PathBuf,
    /// Whether [`InstallFiles::write`] may replace existing files; when
    /// not, it creates them or fails, so a file made between the check
    /// and the write is not clobbered either.
    overwrite: bool,
}

impl InstallFiles {
    fn new(name: &str, dir: &Path) -> InstallFiles {
        InstallFiles {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            manifest: dir.join(format!("uplink-{name}.yaml")),
            activation: dir.join(format!("uplink-{name}-activation.json")),
            overwrite: false,
        }
    }

    /// Before the hub is asked: the directory exists and takes files,
    /// and nothing is overwritten unless `overwrite`.
    fn check(&self, overwrite: bool) -> Result<(), String> {
        let dir = self.dir.display();
        match std::fs::metadata(&self.dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("--out-dir {dir} is not a directory; nothing was registered")),
            Err(e) => {
                return Err(format!("--out-dir {dir}: {e}; create it or pick another, nothing was registered"));
            }
        }
        let probe = self.dir.join(format!(".uplink-{}-{}.probe", self.name, std::process::id()));
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
            Ok(_) => {
                let _ = std::fs::remove_file(&probe);
            }
            Err(e) => {
                return Err(format!("--out-dir {dir} does not take new files ({e}); nothing was registered"));
            }
        }
        for f in [&self.manifest, &self.activation] {
            if std::fs::symlink_metadata(f).is_ok_and(|m| m.is_dir()) {
                return Err(format!("{} is a directory; nothing was registered", f.display()));
            }
            // Any entry counts, a dangling link too: it would be written through.
            if !overwrite && std::fs::symlink_metadata(f).is_ok() {
                return Err(format!(
                    "{} exists; move it away, pick another --out-dir, or pass --force to replace it \
                     (nothing was registered)",
                    f.display()
                ));
            }
        }
        Ok(())
    }

    /// Writes the manifest and the activation file from the hub's answer
    /// `v`. Should that fail, both go to standard output so the one-time
    /// code is not lost, and the command fails.
    fn write(&self, v: &Value, json_out: bool, what: &str) -> Result<(), String> {
        let manifest = v["manifest"].as_str().unwrap_or_default();
        let activation = v["systemd_activation"].as_str().unwrap_or_default();
        let failed: Vec<String> = [(&self.manifest, manifest), (&self.activation, activation)]
            .into_iter()
            .filter_map(|(path, text)| write_secret(path, text, self.overwrite).err())
            .collect();
        if !failed.is_empty() {
            println!("# ---- {} (install as /etc/uplink/activation.json) ----", file_name(&self.activation));
            print!("{activation}");
            println!("# ---- {} (kubectl apply -f) ----", file_name(&self.manifest));
            print!("{manifest}");
            return Err(format!(
                "cluster {} {what}, but its files could not be written: {}.\n\
                 The activation and the manifest are printed on standard output: save them now, the \
                 activation code is not shown again (or issue a fresh one later with \
                 `uplink-hub cluster renew {} --out-dir DIR`).",
                self.name,
                failed.join("; "),
                self.name
            ));
        }
        if json_out {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
            return Ok(());
        }
        println!("cluster {} {what}: {}", self.name, s(&v["cluster"]["status"]));
        println!("activation {} expires {}", s(&v["activation"]["activation_id"]), s(&v["activation"]["expires_at"]));
        println!("(the activation code is inside the files below and is not shown again)");
        println!();
        println!("in the cluster (pod):     kubectl apply -f {}", self.manifest.display());
        println!(
            "beside it (systemd):      install -D -m 0600 {} /etc/uplink/activation.json && systemctl enable --now uplink",
            self.activation.display()
        );
        Ok(())
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned())
}

/// `audit`: the audit log as a table; names go out percent-encoded.
fn audit(api: &Client, a: &AuditArgs) -> Result<(), String> {
    let mut query = vec![format!("limit={}", a.limit)];
    for (key, value) in [("user", &a.user), ("cluster", &a.cluster), ("since", &a.since)] {
        if let Some(v) = value {
            query.push(format!("{key}={}", percent_encode(v)));
        }
    }
    let v = check(api.get(&format!("/api/v1/audit?{}", query.join("&"))))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let rows: Vec<Vec<String>> = v["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            vec![
                s(&e["time"]),
                s(&e["user"]),
                s(&e["cluster"]),
                s(&e["status"]),
                format!("{} ms", s(&e["duration_ms"])),
                format!("{} {}", s(&e["method"]), s(&e["path"])),
            ]
        })
        .collect();
    let align = [Align::Left, Align::Left, Align::Left, Align::Right, Align::Right];
    print!("{}", table::render(&["TIME", "USER", "CLUSTER", "STATUS", "DURATION", "REQUEST"], &rows, &align));
    Ok(())
}

/// Files with secrets in them are written 0600.
fn write_private(path: &std::path::Path, contents: &str) -> Result<(), String> {
    write_secret(path, contents, true)
}

/// [`write_private`]; unless `overwrite`, only as a new file.
fn write_secret(path: &std::path::Path, contents: &str, overwrite: bool) -> Result<(), String> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    if overwrite {
        opts.write(true).create(true).truncate(true);
    } else {
        opts.write(true).create_new(true);
    }
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path).and_then(|mut f| f.write_all(contents.as_bytes())).map_err(|e| format!("{}: {e}", path.display()))
}
