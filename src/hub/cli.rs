//! The `uplink-hub` command line: `serve`, and admin commands that talk to
//! a running hub's REST API (URL, token and CA from flags or
//! `UPLINK_HUB_URL`, `UPLINK_TOKEN`, `UPLINK_HUB_CA`).

use super::client::{Client, Reply};
use super::limits::{Limits, Timeout, setting};
use super::server::{ServeConfig, serve};
use argh::FromArgs;
use serde_json::{Value, json};
use std::path::PathBuf;

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

#[derive(FromArgs)]
#[argh(subcommand)]
pub enum Cmd {
    Serve(ServeArgs),
    Cluster(ClusterArgs),
    User(UserArgs),
    Grant(GrantArgs),
    Kubeconfig(KubeconfigArgs),
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
    /// most connections one client address may hold before they authenticate (env UPLINK_HUB_MAX_CONNECTIONS_PER_ADDRESS, default 128)
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
    /// a user the cluster may impersonate (repeatable)
    #[argh(option)]
    pub user: Vec<String>,
    /// a group the cluster may impersonate (repeatable)
    #[argh(option)]
    pub group: Vec<String>,
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
            serve(ServeConfig {
                listen: a.listen,
                data_dir: a.data_dir.clone(),
                public_url: a.public_url.clone(),
                cert: a.cert.clone(),
                key: a.key.clone(),
                limits: a.limits()?,
            })
        }
        Cmd::Cluster(c) => {
            let api = client(&args)?;
            match &c.cmd {
                ClusterCmd::Register(r) => {
                    let v = check(api.post_json(
                        "/api/v1/clusters",
                        &json!({ "name": r.name, "expires_in_hours": r.expires_hours, "users": r.user, "groups": r.group }),
                    ))?;
                    let manifest = r.out_dir.join(format!("uplink-{}.yaml", r.name));
                    let activation = r.out_dir.join(format!("uplink-{}-activation.json", r.name));
                    write_private(&manifest, v["manifest"].as_str().unwrap_or_default())?;
                    write_private(&activation, v["systemd_activation"].as_str().unwrap_or_default())?;
                    if r.json {
                        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                        return Ok(());
                    }
                    println!("cluster {} registered: PENDING", r.name);
                    println!(
                        "activation {} expires {}",
                        s(&v["activation"]["activation_id"]),
                        s(&v["activation"]["expires_at"])
                    );
                    println!("(the activation code is inside the files below and is not shown again)");
                    println!();
                    println!("in the cluster (pod):     kubectl apply -f {}", manifest.display());
                    println!(
                        "beside it (systemd):      install -D -m 0600 {} /etc/uplink/activation.json && systemctl enable --now uplink",
                        activation.display()
                    );
                    Ok(())
                }
                ClusterCmd::List(l) => {
                    let path = if l.all { "/api/v1/clusters?all=true" } else { "/api/v1/clusters" };
                    let v = check(api.get(path))?;
                    if l.json {
                        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                        return Ok(());
                    }
                    println!(
                        "{:<24} {:<13} {:>6} {:<10} {:<8} {:<12} {:>5}  LAST SEEN",
                        "NAME", "STATUS", "AGENTS", "VERSION", "ARCH", "KUBE", "NODES"
                    );
                    for c in v["clusters"].as_array().into_iter().flatten() {
                        println!(
                            "{:<24} {:<13} {:>6} {:<10} {:<8} {:<12} {:>5}  {}",
                            s(&c["name"]),
                            s(&c["status"]),
                            s(&c["agents"]),
                            s(&c["agent_version"]),
                            s(&c["arch"]),
                            s(&c["kube_version"]),
                            s(&c["node_count"]),
                            s(&c["last_seen"])
                        );
                    }
                    Ok(())
                }
                ClusterCmd::Show(sh) => {
                    let v = check(api.get(&format!("/api/v1/clusters/{}", sh.name)))?;
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    Ok(())
                }
                ClusterCmd::Deregister(d) => {
                    let v = check(api.delete(&format!("/api/v1/clusters/{}", d.name)))?;
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
                    println!("{:<24} {:<6} {:<22} GROUPS", "NAME", "ADMIN", "REVOKED");
                    for u in v["users"].as_array().into_iter().flatten() {
                        let groups: Vec<String> = u["groups"].as_array().into_iter().flatten().map(s).collect();
                        println!(
                            "{:<24} {:<6} {:<22} {}",
                            s(&u["name"]),
                            s(&u["admin"]),
                            s(&u["revoked_at"]),
                            groups.join(",")
                        );
                    }
                    Ok(())
                }
                UserCmd::Revoke(r) => {
                    check(api.delete(&format!("/api/v1/users/{}", r.name)))?;
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
                    println!("{:<6} {:<30} CLUSTERS", "ID", "SUBJECT");
                    for g in v["grants"].as_array().into_iter().flatten() {
                        let subject = if g["user"].is_string() {
                            format!("user:{}", s(&g["user"]))
                        } else {
                            format!("group:{}", s(&g["group"]))
                        };
                        println!("{:<6} {:<30} {}", s(&g["id"]), subject, s(&g["clusters"]));
                    }
                    Ok(())
                }
                GrantCmd::Remove(r) => {
                    check(api.delete(&format!("/api/v1/grants/{}", r.id)))?;
                    println!("grant {} removed", r.id);
                    Ok(())
                }
            }
        }
        Cmd::Kubeconfig(k) => {
            let api = client(&args)?;
            let r = api
                .get(&format!("/api/v1/kubeconfig?cluster={}", k.cluster))
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

/// Files with secrets in them are written 0600.
fn write_private(path: &std::path::Path, contents: &str) -> Result<(), String> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path).and_then(|mut f| f.write_all(contents.as_bytes())).map_err(|e| format!("{}: {e}", path.display()))
}
