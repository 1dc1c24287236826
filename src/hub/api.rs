//! The REST API under `/api/v1/`: JSON in, JSON out, errors as
//! `{"error": CODE, "message": TEXT}` with 400/401/403/404/409.
//!
//! | route                               | who   | what                                  |
//! |-------------------------------------|-------|---------------------------------------|
//! | GET    /api/v1/hub                  | any   | hub URL, CA, version                  |
//! | GET    /api/v1/whoami               | user  | the caller                            |
//! | GET    /api/v1/clusters             | user  | clusters the caller may reach         |
//! | POST   /api/v1/clusters             | admin | register: activation + install files  |
//! | GET    /api/v1/clusters/NAME        | user  | one cluster with agents and events    |
//! | DELETE /api/v1/clusters/NAME        | admin | deregister + cleanup instructions     |
//! | GET    /api/v1/events?since=&wait=  | user  | long-poll of cluster status changes   |
//! | GET    /api/v1/kubeconfig?cluster=  | user  | kubeconfig for the caller             |
//! | GET/POST /api/v1/users              | admin | list / add (token shown once)         |
//! | DELETE /api/v1/users/NAME           | admin | revoke user and tokens                |
//! | POST   /api/v1/users/NAME/tokens    | admin | another token                         |
//! | GET/POST /api/v1/grants             | admin | list / add                            |
//! | DELETE /api/v1/grants/ID            | admin | remove                                |
//! | GET    /api/v1/audit?user=&cluster=&since=&limit= | admin | proxied requests, newest first |

use super::clock::{now_ms, parse_rfc3339, rfc3339};
use super::http::{BodyState, Request, Response, query_params};
use super::install::ActivationDoc;
use super::server::In;
use super::store::{AuditQuery, NewActivation, NewCluster, StoreError, Subject, User};
use super::{
    Hub, cluster_json, grant_json, may_reach, new_token, status, user_json, valid_cluster_name, valid_subject_name,
};
use crate::render::{self, ClusterInstall};
use crate::secret::{Secret, sha256_hex};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

/// Largest JSON body accepted.
const MAX_JSON: usize = 1 << 20;
/// Default and longest activation lifetime.
const DEFAULT_ACTIVATION_HOURS: u64 = 72;
const MAX_ACTIVATION_HOURS: u64 = 24 * 365;

/// An error answer.
pub fn error(status: u16, code: &str, message: &str) -> Response {
    Response::json(status, &json!({ "error": code, "message": message }))
}

struct ApiError(Response);

type ApiResult = Result<Response, ApiError>;

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError(match e {
            StoreError::Conflict(m) => error(409, "conflict", &m),
            StoreError::NotFound(m) => error(404, "not_found", &m),
            StoreError::Backend(m) => {
                log::error!("store failed error={m:?}");
                error(500, "internal", "the hub's store failed; see the hub log")
            }
        })
    }
}

fn fail(status: u16, code: &str, message: impl AsRef<str>) -> ApiError {
    ApiError(error(status, code, message.as_ref()))
}

/// The bearer token of a request, if it has one.
pub fn bearer(req: &Request) -> Option<&str> {
    let v = req.header_str("authorization")?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// The live user behind the request's bearer token.
pub fn authenticate(hub: &Hub, req: &Request) -> Result<Option<User>, StoreError> {
    match bearer(req) {
        Some(t) => hub.store.user_by_token(&sha256_hex(t)),
        None => Ok(None),
    }
}

fn user_of(hub: &Hub, req: &Request) -> Result<User, ApiError> {
    authenticate(hub, req)?.ok_or_else(|| {
        fail(
            401,
            "unauthorized",
            "missing or unknown bearer token: send Authorization: Bearer TOKEN (set UPLINK_TOKEN for the CLI)",
        )
    })
}

fn admin_of(hub: &Hub, req: &Request) -> Result<User, ApiError> {
    let u = user_of(hub, req)?;
    if !u.admin {
        return Err(fail(403, "forbidden", format!("user {} is not an admin; ask an admin of this hub", u.name)));
    }
    Ok(u)
}

async fn json_body<T: for<'de> Deserialize<'de>>(body: &mut BodyState, inb: &mut In) -> Result<T, ApiError> {
    let bytes = inb.read_body_to_end(body, MAX_JSON).await.map_err(|e| fail(400, "bad_request", e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| fail(400, "bad_request", format!("invalid JSON body: {e}")))
}

fn param(req: &Request, name: &str) -> Option<String> {
    query_params(&req.target).into_iter().find(|(k, _)| k == name).map(|(_, v)| v).filter(|v| !v.is_empty())
}

/// Serves one `/api/v1/` request.
pub async fn handle(hub: &Hub, req: &Request, body: &mut BodyState, inb: &mut In) -> Response {
    match dispatch(hub, req, body, inb).await {
        Ok(r) | Err(ApiError(r)) => r,
    }
}

async fn dispatch(hub: &Hub, req: &Request, body: &mut BodyState, inb: &mut In) -> ApiResult {
    let path = req.target.split('?').next().unwrap_or("");
    let rest = path.strip_prefix("/api/v1").unwrap_or("").trim_end_matches('/');
    let parts: Vec<&str> = rest.split('/').skip(1).collect();
    let m = req.method.as_str();
    match (m, parts.as_slice()) {
        ("GET", ["hub"]) => Ok(hub_info(hub)),
        ("GET", ["whoami"]) => {
            let u = user_of(hub, req)?;
            Ok(Response::json(200, &user_json(&u)))
        }
        ("GET", ["clusters"]) => list_clusters(hub, req),
        ("POST", ["clusters"]) => register(hub, req, body, inb).await,
        ("GET", ["clusters", name]) => show_cluster(hub, req, name),
        ("DELETE", ["clusters", name]) => deregister(hub, req, name),
        ("GET", ["events"]) => events(hub, req).await,
        ("GET", ["kubeconfig"]) => kubeconfig(hub, req),
        ("GET", ["users"]) => {
            admin_of(hub, req)?;
            let users: Vec<Value> = hub.store.users()?.iter().map(user_json).collect();
            Ok(Response::json(200, &json!({ "users": users })))
        }
        ("POST", ["users"]) => add_user(hub, req, body, inb).await,
        ("DELETE", ["users", name]) => {
            admin_of(hub, req)?;
            let u = hub.store.revoke_user(name, now_ms())?;
            log::info!("user revoked user={name}");
            Ok(Response::json(200, &json!({ "user": user_json(&u) })))
        }
        ("POST", ["users", name, "tokens"]) => {
            admin_of(hub, req)?;
            let (token, hash) = new_token();
            hub.store.add_token(name, &hash, now_ms())?;
            Ok(Response::json(201, &json!({ "user": name, "token": token.expose() })))
        }
        ("GET", ["grants"]) => {
            admin_of(hub, req)?;
            let grants: Vec<Value> = hub.store.grants()?.iter().map(grant_json).collect();
            Ok(Response::json(200, &json!({ "grants": grants })))
        }
        ("POST", ["grants"]) => add_grant(hub, req, body, inb).await,
        ("DELETE", ["grants", id]) => {
            admin_of(hub, req)?;
            let id: i64 =
                id.parse().map_err(|_| fail(400, "bad_request", "a grant id is a number (see grant list)"))?;
            hub.store.remove_grant(id)?;
            Ok(Response::json(200, &json!({ "removed": id })))
        }
        ("GET", ["audit"]) => audit(hub, req),
        (_, ["hub" | "whoami" | "clusters" | "events" | "kubeconfig" | "users" | "grants" | "audit", ..]) => {
            Err(fail(405, "method_not_allowed", format!("{m} is not supported on {path}")))
        }
        _ => Err(fail(404, "not_found", format!("no API route {path}"))),
    }
}

fn hub_info(hub: &Hub) -> Response {
    Response::json(
        200,
        &json!({
            "hub_url": hub.public_url,
            "ca_pem": hub.ca_pem,
            "version": env!("CARGO_PKG_VERSION"),
            "kube_path": "/k8s/clusters/{name}",
        }),
    )
}

fn list_clusters(hub: &Hub, req: &Request) -> ApiResult {
    let u = user_of(hub, req)?;
    let grants = hub.store.grants()?;
    let all = param(req, "all").is_some_and(|v| v == "true");
    let clusters: Vec<Value> = hub
        .store
        .clusters()?
        .iter()
        .filter(|c| all || c.deregistered_at.is_none())
        .filter(|c| may_reach(&u, &grants, &c.name))
        .map(|c| cluster_json(hub, c))
        .collect();
    Ok(Response::json(200, &json!({ "clusters": clusters, "events_seq": hub.bus.current() })))
}

fn show_cluster(hub: &Hub, req: &Request, name: &str) -> ApiResult {
    let u = user_of(hub, req)?;
    let not_found = || fail(404, "not_found", format!("no cluster {name}; see `uplink-hub cluster list`"));
    if !may_reach(&u, &hub.store.grants()?, name) {
        return Err(not_found());
    }
    let c = hub.store.cluster(name)?.ok_or_else(not_found)?;
    let mut v = cluster_json(hub, &c);
    let events: Vec<Value> = hub
        .store
        .events(&c.id, 50)?
        .iter()
        .map(|e| json!({ "time": rfc3339(e.time), "kind": e.kind, "message": e.message }))
        .collect();
    v["events"] = json!(events);
    v["live_agents"] = json!(
        hub.tunnels
            .agents(&c.id)
            .iter()
            .map(|a| json!({
                "session_id": a.session_id,
                "peer": a.peer,
                "connected_since": rfc3339(a.connected_at),
                "agent_version": a.facts.agent_version,
                "arch": a.facts.arch,
                "streams": a.session.stream_count(),
                "rtt_ms": a.session.rtt().map(|d| d.as_millis() as u64),
            }))
            .collect::<Vec<_>>()
    );
    if u.admin {
        v["activations"] =
            json!(hub
            .store
            .activations(&c.id)?
            .iter()
            .map(|a| json!({ "id": a.id, "expires_at": rfc3339(a.expires_at), "used_at": a.used_at.map(rfc3339) }))
            .collect::<Vec<_>>());
    }
    Ok(Response::json(200, &v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    name: String,
    #[serde(default)]
    expires_in_hours: Option<u64>,
    /// Finer than hours (tests, short-lived demos); wins over hours.
    #[serde(default)]
    expires_in_seconds: Option<u64>,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
}

async fn register(hub: &Hub, req: &Request, body: &mut BodyState, inb: &mut In) -> ApiResult {
    let admin = admin_of(hub, req)?;
    let b: RegisterBody = json_body(body, inb).await?;
    if !valid_cluster_name(&b.name) {
        return Err(fail(
            400,
            "bad_request",
            "a cluster name is a DNS label: lowercase letters, digits and '-', at most 63",
        ));
    }
    if let Some(bad) = b.users.iter().chain(&b.groups).find(|n| !valid_subject_name(n)) {
        return Err(fail(400, "bad_request", format!("{bad:?} is not a valid user or group name")));
    }
    let secs = match b.expires_in_seconds {
        Some(s) => s,
        None => b.expires_in_hours.unwrap_or(DEFAULT_ACTIVATION_HOURS).saturating_mul(3600),
    };
    if secs == 0 || secs > MAX_ACTIVATION_HOURS * 3600 {
        return Err(fail(
            400,
            "bad_request",
            format!("the activation lifetime must be between 1 second and {MAX_ACTIVATION_HOURS} hours"),
        ));
    }
    let now = now_ms();
    let cluster_id = format!("c_{}", Secret::random(12).expose());
    let activation_id = format!("act_{}", Secret::random(12).expose());
    let code = Secret::random(24);
    let expires_at = now + (secs as i64) * 1000;
    let c = hub.store.register_cluster(
        &NewCluster { id: &cluster_id, name: &b.name, users: &b.users, groups: &b.groups, now },
        &NewActivation { id: &activation_id, code_hash: &sha256_hex(code.expose()), expires_at },
    )?;
    log::info!("cluster registered cluster={} by={} activation={activation_id}", c.name, admin.name);
    hub.bus.publish(&c.name, "registered", status(hub, &c));
    let activation = ActivationDoc {
        cluster: c.name.clone(),
        hub_url: hub.public_url.clone(),
        activation_id,
        activation_code: code.expose().to_string(),
        expires_at: rfc3339(expires_at),
        hub_ca_pem: hub.ca_pem.clone(),
        hub_pin_sha256: None,
    };
    let mut install = ClusterInstall::new(&c.name, serde_json::to_string_pretty(&activation).unwrap_or_default());
    install.image = hub.agent_image.clone();
    install.impersonate_users = b.users;
    install.impersonate_groups = b.groups;
    let file = format!("uplink-{}.yaml", c.name);
    Ok(Response::json(
        201,
        &json!({
            "cluster": cluster_json(hub, &c),
            "activation": activation,
            "manifest": render::kubernetes_manifest(&install),
            "systemd_activation": render::systemd_activation_file(&install),
            "install": {
                "kubernetes": format!("kubectl apply -f {file}"),
                "systemd": "install -D -m 0600 activation.json /etc/uplink/activation.json && systemctl enable --now uplink",
            },
        }),
    ))
}

fn deregister(hub: &Hub, req: &Request, name: &str) -> ApiResult {
    let admin = admin_of(hub, req)?;
    let c = hub.store.deregister(name, now_ms())?;
    let notified = hub.tunnels.go_away(
        &c.id,
        crate::proto::GoAwayCode::Deregistered,
        &format!("cluster {name} was deregistered from the hub; this agent must stop"),
    );
    log::info!("cluster deregistered cluster={name} by={} agents_notified={notified}", admin.name);
    hub.bus.publish(name, "deregistered", "DEREGISTERED");
    Ok(Response::json(
        200,
        &json!({
            "cluster": cluster_json(hub, &c),
            "agents_notified": notified,
            "cleanup": render::cleanup_instructions(&ClusterInstall::new(name, "")),
        }),
    ))
}

async fn events(hub: &Hub, req: &Request) -> ApiResult {
    let u = user_of(hub, req)?;
    let Some(since) = param(req, "since") else {
        return Ok(Response::json(200, &json!({ "events": [], "next": hub.bus.current(), "reset": false })));
    };
    let since: u64 =
        since.parse().map_err(|_| fail(400, "bad_request", "since is the `next` of the previous answer"))?;
    let wait = param(req, "wait").and_then(|w| w.parse().ok()).unwrap_or(25u64).min(60);
    hub.bus.wait(since, Duration::from_secs(wait)).await;
    let grants = hub.store.grants()?;
    let (list, reset) = hub.bus.since(since);
    let events: Vec<Value> = list
        .iter()
        .filter(|e| may_reach(&u, &grants, &e.cluster))
        .map(|e| json!({ "seq": e.seq, "time": rfc3339(e.time), "cluster": e.cluster, "kind": e.kind, "status": e.status }))
        .collect();
    Ok(Response::json(200, &json!({ "events": events, "next": hub.bus.current().max(since), "reset": reset })))
}

/// A kubeconfig for the caller and one cluster, with the caller's own
/// token (the one this request carried).
fn kubeconfig(hub: &Hub, req: &Request) -> ApiResult {
    let u = user_of(hub, req)?;
    let name = param(req, "cluster").ok_or_else(|| fail(400, "bad_request", "name the cluster: ?cluster=NAME"))?;
    if !may_reach(&u, &hub.store.grants()?, &name) || hub.store.cluster(&name)?.is_none() {
        return Err(fail(404, "not_found", format!("no cluster {name} you may reach")));
    }
    let token = bearer(req).unwrap_or_default();
    Ok(Response::new(
        200,
        "application/yaml",
        kubeconfig_yaml(&hub.public_url, hub.ca_pem.as_deref(), &name, &u.name, token),
    ))
}

/// Renders a kubeconfig with one cluster, user and context.
pub fn kubeconfig_yaml(hub_url: &str, ca_pem: Option<&str>, cluster: &str, user: &str, token: &str) -> String {
    use base64::Engine as _;
    let ctx = format!("uplink-{cluster}");
    let ca = ca_pem.map_or(String::new(), |pem| {
        format!("      certificate-authority-data: {}\n", base64::engine::general_purpose::STANDARD.encode(pem))
    });
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n  - name: {c}\n    cluster:\n      server: {server}\n{ca}\
users:\n  - name: {u}\n    user:\n      token: {t}\ncontexts:\n  - name: {c}\n    context:\n      cluster: {c}\n      user: {u}\n\
current-context: {c}\n",
        c = q(&ctx),
        server = q(&format!("{hub_url}/k8s/clusters/{cluster}")),
        u = q(&format!("{user}@uplink")),
        t = q(token),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserBody {
    name: String,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    admin: bool,
}

async fn add_user(hub: &Hub, req: &Request, body: &mut BodyState, inb: &mut In) -> ApiResult {
    let admin = admin_of(hub, req)?;
    let b: UserBody = json_body(body, inb).await?;
    if let Some(bad) = std::iter::once(&b.name).chain(&b.groups).find(|n| !valid_subject_name(n)) {
        return Err(fail(400, "bad_request", format!("{bad:?} is not a valid name: letters, digits and ._@:- only")));
    }
    let (token, hash) = new_token();
    let u = hub.store.create_user(&b.name, &b.groups, b.admin, &hash, now_ms())?;
    log::info!("user added user={} admin={} by={}", u.name, u.admin, admin.name);
    Ok(Response::json(201, &json!({ "user": user_json(&u), "token": token.expose() })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    group: Option<String>,
    clusters: String,
}

async fn add_grant(hub: &Hub, req: &Request, body: &mut BodyState, inb: &mut In) -> ApiResult {
    admin_of(hub, req)?;
    let b: GrantBody = json_body(body, inb).await?;
    let subject = match (b.user, b.group) {
        (Some(u), None) if valid_subject_name(&u) => Subject::User(u),
        (None, Some(g)) if valid_subject_name(&g) => Subject::Group(g),
        _ => return Err(fail(400, "bad_request", "a grant names exactly one valid \"user\" or \"group\"")),
    };
    let pattern_ok = !b.clusters.is_empty()
        && b.clusters.bytes().all(|c| c == b'*' || c == b'-' || c.is_ascii_lowercase() || c.is_ascii_digit());
    if !pattern_ok {
        return Err(fail(400, "bad_request", "clusters is a cluster name or a pattern with '*', e.g. edge-*"));
    }
    let g = hub.store.add_grant(&subject, &b.clusters, now_ms())?;
    Ok(Response::json(201, &json!({ "grant": grant_json(&g) })))
}

fn audit(hub: &Hub, req: &Request) -> ApiResult {
    admin_of(hub, req)?;
    let since = match param(req, "since") {
        Some(s) => Some(
            parse_rfc3339(&s)
                .ok_or_else(|| fail(400, "bad_request", "since is RFC 3339, e.g. 2026-01-01T00:00:00Z"))?,
        ),
        None => None,
    };
    let limit = match param(req, "limit") {
        Some(l) => l.parse::<u32>().map_err(|_| fail(400, "bad_request", "limit is a number"))?.clamp(1, 10_000),
        None => 100,
    };
    let q = AuditQuery { user: param(req, "user"), cluster: param(req, "cluster"), since, limit };
    let entries: Vec<Value> = hub
        .store
        .audit(&q)?
        .iter()
        .map(|e| {
            json!({
                "id": e.id, "time": rfc3339(e.time), "time_ms": e.time, "user": e.user, "groups": e.groups,
                "cluster": e.cluster, "method": e.method, "path": e.path, "status": e.status,
                "bytes_in": e.bytes_in, "bytes_out": e.bytes_out, "duration_ms": e.duration_ms, "upgrade": e.upgrade,
            })
        })
        .collect();
    Ok(Response::json(200, &json!({ "entries": entries })))
}
