//! The REST API under `/api/v1/`: JSON in, JSON out, errors as
//! `{"error": CODE, "message": TEXT}` with 400/401/403/404/409.
//!
//! | route                               | who   | what                                  |
//! |-------------------------------------|-------|---------------------------------------|
//! | GET    /api/v1/hub                  | any   | hub URL, CA, version                  |
//! | GET    /api/v1/whoami               | user  | the caller                            |
//! | GET    /api/v1/clusters             | user  | clusters the caller may reach         |
//! | POST   /api/v1/clusters             | admin | register (`force`: renew if PENDING)  |
//! | GET    /api/v1/clusters/NAME        | user  | one cluster with agents and events    |
//! | DELETE /api/v1/clusters/NAME        | admin | deregister + cleanup instructions     |
//! | POST   /api/v1/clusters/NAME/activation | admin | renew a PENDING cluster's activation |
//! | GET    /api/v1/events?since=&wait=  | user  | long-poll of cluster status changes   |
//! | GET    /api/v1/kubeconfig?cluster=  | user  | kubeconfig for the caller             |
//! | GET/POST /api/v1/users              | admin | list / add (token shown once)         |
//! | DELETE /api/v1/users/NAME           | admin | revoke user and tokens                |
//! | POST   /api/v1/users/NAME/tokens    | admin | another token                         |
//! | GET/POST /api/v1/grants             | admin | list / add                            |
//! | DELETE /api/v1/grants/ID            | admin | remove                                |
//! | GET    /api/v1/audit?user=&cluster=&since=&limit= | admin | proxied requests, newest first |
//!
//! A user name in a path is one percent-encoded segment: the path is split
//! on `/` before each segment is decoded, so
//! `DELETE /api/v1/users/arn%3Aaws%3Aiam%3A%3A1234567890%3Auser%2FAlice`
//! revokes `arn:aws:iam::1234567890:user/Alice`. Query values are form
//! encoded (`+` or `%20` for a space). Names are any string Kubernetes
//! accepts and are checked by [`crate::names`].

use super::clock::{now_ms, parse_rfc3339, rfc3339};
use super::http::{Incoming, Request, Response, query_params};
use super::install::ActivationDoc;
use super::store::{AuditQuery, Cluster, NewActivation, NewCluster, StoreError, Subject, User};
use super::{Hub, cluster_json, grant_json, may_reach, new_token, status, user_json, valid_cluster_name};
use crate::http::percent_decode_segment;
use crate::names::{self, NameError, NameKind};
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
            StoreError::Unavailable(m) => error(
                503,
                "store_unavailable",
                &format!("the hub's store is unavailable ({m}); the hub reconnects by itself: retry shortly"),
            ),
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

/// Why a request's credentials were refused (not merely absent).
#[derive(Debug)]
pub enum AuthError {
    /// The store failed; not the caller's fault.
    Store(StoreError),
    /// An ID token or console session was refused; the text says why
    /// (never the token).
    Refused(String),
}

impl From<StoreError> for AuthError {
    fn from(e: StoreError) -> Self {
        AuthError::Store(e)
    }
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthError::Store(e) => e.fmt(f),
            AuthError::Refused(m) => f.write_str(m),
        }
    }
}

/// The live user behind the request: a hub token, an ID token of the
/// identity provider (bearer), or a console session cookie. The one
/// place people are authenticated (REST and kube front end alike).
pub fn authenticate(hub: &Hub, req: &Request) -> Result<Option<User>, AuthError> {
    use super::oidc::{browser, jwt};
    match (bearer(req), &hub.oidc) {
        (Some(t), Some(p)) if jwt::looks_like_jwt(t) => {
            let now = now_ms();
            let id = p.identify(t, None, now / 1000).map_err(|e| {
                log::warn!("oidc token refused reason={e:?}");
                AuthError::Refused(e.to_string())
            })?;
            signed_in(hub, &id.name, &id.groups, id.admin).map(Some)
        }
        (Some(t), _) => Ok(hub.store.user_by_token(crate::secret::Sha256Hex::of(t).as_str())?),
        (None, Some(_)) => match browser::session_of(hub, req) {
            Ok(Some(s)) => signed_in(hub, &s.user.user, &s.user.groups, s.user.admin).map(Some),
            Ok(None) => Ok(None),
            Err(e) => {
                log::warn!("console session refused reason={e:?}");
                Err(AuthError::Refused(e.to_string()))
            }
        },
        (None, None) => Ok(None),
    }
}

/// A person of the identity provider: their store record, created on
/// first sign-in; refused once an admin revoked them.
fn signed_in(hub: &Hub, name: &str, groups: &[String], admin: bool) -> Result<User, AuthError> {
    let u = hub.store.oidc_sign_in(name, groups, admin, now_ms()).map_err(|e| match e {
        StoreError::Conflict(m) => AuthError::Refused(m),
        other => AuthError::Store(other),
    })?;
    if u.revoked_at.is_some() {
        log::warn!("oidc user refused reason=revoked user={name:?}");
        return Err(AuthError::Refused(format!("user {name} was revoked by a hub admin")));
    }
    // What the token says now, not what was stored before this request.
    Ok(User { groups: groups.to_vec(), admin, ..u })
}

fn user_of(hub: &Hub, req: &Request) -> Result<User, ApiError> {
    match authenticate(hub, req) {
        Ok(Some(u)) => Ok(u),
        Ok(None) => Err(fail(
            401,
            "unauthorized",
            "missing or unknown bearer token: send Authorization: Bearer TOKEN (set UPLINK_TOKEN for the CLI)",
        )),
        Err(AuthError::Refused(m)) => Err(fail(401, "unauthorized", m)),
        Err(AuthError::Store(e)) => Err(e.into()),
    }
}

fn admin_of(hub: &Hub, req: &Request) -> Result<User, ApiError> {
    let u = user_of(hub, req)?;
    if !u.admin {
        return Err(fail(403, "forbidden", format!("user {} is not an admin; ask an admin of this hub", u.name)));
    }
    Ok(u)
}

async fn json_body<T: for<'de> Deserialize<'de>>(body: &mut Incoming) -> Result<T, ApiError> {
    let bytes = body.read_to_end(MAX_JSON).await.map_err(|e| fail(400, "bad_request", e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| fail(400, "bad_request", format!("invalid JSON body: {e}")))
}

fn param(req: &Request, name: &str) -> Option<String> {
    query_params(req.target()).into_iter().find(|(k, _)| k == name).map(|(_, v)| v).filter(|v| !v.is_empty())
}

/// Serves one `/api/v1/` request.
pub async fn handle(hub: &Hub, req: &Request, body: &mut Incoming) -> Response {
    match dispatch(hub, req, body).await {
        Ok(r) | Err(ApiError(r)) => r,
    }
}

/// The segments of a path after `/api/v1`, each percent-decoded on its
/// own after splitting on `/`, so `users/arn%3Aaws%3Aiam%3A%3A1%3Auser%2FAlice`
/// is two segments and the second is the whole ARN.
fn segments(path: &str) -> Result<Vec<String>, ApiError> {
    let rest = path.strip_prefix("/api/v1").unwrap_or("").trim_end_matches('/');
    rest.split('/')
        .skip(1)
        .map(|raw| {
            percent_decode_segment(raw).ok_or_else(|| {
                fail(
                    400,
                    "bad_request",
                    format!(
                        "path segment {raw:?} is not percent-encoded UTF-8: encode a name with %XX escapes \
                         (e.g. encodeURIComponent), '/' as %2F"
                    ),
                )
            })
        })
        .collect()
}

fn name_error(e: NameError) -> ApiError {
    fail(400, "bad_request", e.to_string())
}

/// Checks names people give for users and groups (see [`crate::names`]).
fn check_names<'a>(kind: NameKind, list: impl IntoIterator<Item = &'a String>) -> Result<(), ApiError> {
    list.into_iter().try_for_each(|n| names::check(kind, n)).map_err(name_error)
}

async fn dispatch(hub: &Hub, req: &Request, body: &mut Incoming) -> ApiResult {
    let path = req.target().split('?').next().unwrap_or("");
    let decoded = segments(path)?;
    let parts: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let m = req.method.as_str();
    match (m, parts.as_slice()) {
        ("GET", ["hub"]) => Ok(hub_info(hub)),
        ("GET", ["whoami"]) => {
            let u = user_of(hub, req)?;
            let mut v = user_json(&u);
            // The console's session: the token it sends back on every
            // state-changing call (see oidc::browser).
            if bearer(req).is_none()
                && hub.oidc.is_some()
                && let Ok(Some(s)) = super::oidc::browser::session_of(hub, req)
            {
                v["csrf_token"] = json!(s.csrf.expose());
                v["session"] = json!("oidc");
            }
            Ok(Response::json(200, &v))
        }
        ("GET", ["clusters"]) => list_clusters(hub, req),
        ("POST", ["clusters"]) => register(hub, req, body).await,
        ("GET", ["clusters", name]) => show_cluster(hub, req, name),
        ("DELETE", ["clusters", name]) => deregister(hub, req, name),
        ("POST", ["clusters", name, "activation"]) => renew(hub, req, name, body).await,
        ("GET", ["events"]) => events(hub, req).await,
        ("GET", ["kubeconfig"]) => kubeconfig(hub, req),
        ("GET", ["users"]) => {
            admin_of(hub, req)?;
            let users: Vec<Value> = hub.store.users()?.iter().map(user_json).collect();
            Ok(Response::json(200, &json!({ "users": users })))
        }
        ("POST", ["users"]) => add_user(hub, req, body).await,
        ("DELETE", ["users", name]) => {
            admin_of(hub, req)?;
            let u = hub.store.revoke_user(name, now_ms())?;
            log::info!("user revoked user={name:?}");
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
        ("POST", ["grants"]) => add_grant(hub, req, body).await,
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
    let oidc = hub
        .oidc
        .as_ref()
        .map(|p| json!({ "issuer": p.config.issuer, "client_id": p.config.client_id, "login_path": "/auth/login" }));
    Response::json(
        200,
        &json!({
            "hub_url": hub.public_url,
            "ca_pem": hub.ca_pem,
            "version": env!("CARGO_PKG_VERSION"),
            "kube_path": "/k8s/clusters/{name}",
            "oidc": oidc,
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
        v["activations"] = json!(
            hub.store
                .activations(&c.id)?
                .iter()
                .map(|a| json!({
                    "id": a.id,
                    "expires_at": rfc3339(a.expires_at),
                    "used_at": a.used_at.map(rfc3339),
                    "replaced_at": a.replaced_at.map(rfc3339),
                }))
                .collect::<Vec<_>>()
        );
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
    /// A `PENDING` cluster of this name gets a fresh activation (and
    /// these users and groups) instead of a conflict.
    #[serde(default)]
    force: bool,
}

/// The body of `POST /api/v1/clusters/NAME/activation` (may be empty).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RenewBody {
    #[serde(default)]
    expires_in_hours: Option<u64>,
    #[serde(default)]
    expires_in_seconds: Option<u64>,
}

/// The activation lifetime asked for, in seconds, within the limits.
fn lifetime(seconds: Option<u64>, hours: Option<u64>) -> Result<u64, ApiError> {
    let secs = match seconds {
        Some(s) => s,
        None => hours.unwrap_or(DEFAULT_ACTIVATION_HOURS).saturating_mul(3600),
    };
    if secs == 0 || secs > MAX_ACTIVATION_HOURS * 3600 {
        return Err(fail(
            400,
            "bad_request",
            format!("the activation lifetime must be between 1 second and {MAX_ACTIVATION_HOURS} hours"),
        ));
    }
    Ok(secs)
}

/// A fresh activation: its id, its one-time code (shown once) and the
/// row the store keeps (the code's hash).
struct Issued {
    id: String,
    code: Secret,
    code_hash: String,
    expires_at: i64,
}

impl Issued {
    fn new(now: i64, secs: u64) -> Issued {
        let code = Secret::random(24);
        let code_hash = sha256_hex(code.expose());
        Issued {
            id: format!("act_{}", Secret::random(12).expose()),
            code,
            code_hash,
            expires_at: now + (secs as i64) * 1000,
        }
    }

    fn row(&self) -> NewActivation<'_> {
        NewActivation { id: &self.id, code_hash: &self.code_hash, expires_at: self.expires_at }
    }
}

async fn register(hub: &Hub, req: &Request, body: &mut Incoming) -> ApiResult {
    let admin = admin_of(hub, req)?;
    let b: RegisterBody = json_body(body).await?;
    if !valid_cluster_name(&b.name) {
        return Err(fail(
            400,
            "bad_request",
            "a cluster name is a DNS label: lowercase letters, digits and '-', at most 63",
        ));
    }
    check_names(NameKind::User, &b.users)?;
    check_names(NameKind::Group, &b.groups)?;
    let secs = lifetime(b.expires_in_seconds, b.expires_in_hours)?;
    let now = now_ms();
    let issued = Issued::new(now, secs);
    let live = hub.store.cluster(&b.name)?.filter(|c| c.deregistered_at.is_none());
    let (c, status_code) = match live {
        // Forced over a live cluster: a fresh activation for a PENDING
        // one; the store refuses an activated one (deregister first).
        Some(_) if b.force => {
            let c = hub.store.renew_activation(&b.name, Some((&b.users, &b.groups)), &issued.row(), now)?;
            log::info!("cluster activation renewed cluster={} by={:?} activation={}", c.name, admin.name, issued.id);
            hub.bus.publish(&c.name, "renewed", status(hub, &c));
            (c, 200)
        }
        _ => {
            let cluster_id = format!("c_{}", Secret::random(12).expose());
            let new = NewCluster { id: &cluster_id, name: &b.name, users: &b.users, groups: &b.groups, now };
            let c = hub.store.register_cluster(&new, &issued.row()).map_err(|e| match e {
                StoreError::Conflict(m) => fail(
                    409,
                    "conflict",
                    format!(
                        "{m}. While it is PENDING, issue a fresh activation with `uplink-hub cluster renew {n}` \
                         (or `cluster register {n} --force`); once an agent activated it, deregister it first",
                        n = b.name
                    ),
                ),
                other => ApiError::from(other),
            })?;
            log::info!("cluster registered cluster={} by={:?} activation={}", c.name, admin.name, issued.id);
            hub.bus.publish(&c.name, "registered", status(hub, &c));
            (c, 201)
        }
    };
    let mut answer = install_answer(hub, &c, &issued);
    answer["renewed"] = json!(status_code == 200);
    Ok(Response::json(status_code, &answer))
}

/// `POST /api/v1/clusters/NAME/activation`: a fresh activation for a
/// `PENDING` cluster (its code expired, or its files were lost); the
/// earlier unused codes stop working.
async fn renew(hub: &Hub, req: &Request, name: &str, body: &mut Incoming) -> ApiResult {
    let admin = admin_of(hub, req)?;
    let bytes = body.read_to_end(MAX_JSON).await.map_err(|e| fail(400, "bad_request", e.to_string()))?;
    let b: RenewBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        RenewBody::default()
    } else {
        serde_json::from_slice(&bytes).map_err(|e| fail(400, "bad_request", format!("invalid JSON body: {e}")))?
    };
    let secs = lifetime(b.expires_in_seconds, b.expires_in_hours)?;
    let now = now_ms();
    let issued = Issued::new(now, secs);
    let c = hub.store.renew_activation(name, None, &issued.row(), now)?;
    log::info!("cluster activation renewed cluster={} by={:?} activation={}", c.name, admin.name, issued.id);
    hub.bus.publish(&c.name, "renewed", status(hub, &c));
    let mut answer = install_answer(hub, &c, &issued);
    answer["renewed"] = json!(true);
    Ok(Response::json(200, &answer))
}

/// What an admin installs for `c` with the activation just issued: the
/// answer of register and renew.
fn install_answer(hub: &Hub, c: &Cluster, issued: &Issued) -> Value {
    let activation = ActivationDoc {
        cluster: c.name.clone(),
        hub_url: hub.public_url.clone(),
        activation_id: issued.id.clone(),
        activation_code: issued.code.expose().to_string(),
        expires_at: rfc3339(issued.expires_at),
        hub_ca_pem: hub.ca_pem.clone(),
        hub_pin_sha256: None,
    };
    let mut install = ClusterInstall::new(&c.name, serde_json::to_string_pretty(&activation).unwrap_or_default());
    install.image = hub.agent_image.clone();
    install.impersonate_users = c.users.clone();
    install.impersonate_groups = c.groups.clone();
    let file = format!("uplink-{}.yaml", c.name);
    json!({
        "cluster": cluster_json(hub, c),
        "activation": activation,
        "manifest": render::kubernetes_manifest(&install),
        "systemd_activation": render::systemd_activation_file(&install),
        "install": {
            "kubernetes": format!("kubectl apply -f {file}"),
            "systemd": "install -D -m 0600 activation.json /etc/uplink/activation.json && systemctl enable --now uplink",
        },
    })
}

fn deregister(hub: &Hub, req: &Request, name: &str) -> ApiResult {
    let admin = admin_of(hub, req)?;
    let c = hub.store.deregister(name, now_ms())?;
    let notified = hub.tunnels.go_away(
        &c.id,
        crate::proto::GoAwayCode::Deregistered,
        &format!("cluster {name} was deregistered from the hub; this agent must stop"),
    );
    log::info!("cluster deregistered cluster={name} by={:?} agents_notified={notified}", admin.name);
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
    let yaml = match &hub.oidc {
        // A person of the identity provider (ID token or console session):
        // kubectl gets fresh ID tokens from `uplink-hub login`, never a copy
        // of the short-lived one this request carried.
        Some(p) if token.is_empty() || super::oidc::jwt::looks_like_jwt(token) => {
            // The hub's scopes, and a refresh token for the plugin's cache.
            let mut scopes = p.config.scopes.clone();
            if !scopes.iter().any(|s| s == "offline_access") {
                scopes.push("offline_access".into());
            }
            let scopes = scopes.join(",");
            let exec = ExecPlugin {
                issuer: &p.config.issuer,
                client_id: &p.config.client_id,
                scopes: &scopes,
                ca_pem: p.config.ca_pem.as_deref(),
            };
            kubeconfig_exec_yaml(&hub.public_url, hub.ca_pem.as_deref(), &name, &u.name, &exec)
        }
        _ => kubeconfig_yaml(&hub.public_url, hub.ca_pem.as_deref(), &name, &u.name, token),
    };
    Ok(Response::new(200, "application/yaml", yaml))
}

/// The `exec` credential plugin a kubeconfig names for a person of the
/// identity provider.
pub struct ExecPlugin<'a> {
    pub issuer: &'a str,
    pub client_id: &'a str,
    /// Comma-separated, as `login --scopes` takes them.
    pub scopes: &'a str,
    /// The provider's CA when it is not publicly trusted; handed to the
    /// plugin in `UPLINK_OIDC_CA_PEM`.
    pub ca_pem: Option<&'a str>,
}

/// A kubeconfig whose user runs `uplink-hub login` for its token
/// (`client.authentication.k8s.io/v1`).
pub fn kubeconfig_exec_yaml(
    hub_url: &str,
    ca_pem: Option<&str>,
    cluster: &str,
    user: &str,
    exec: &ExecPlugin<'_>,
) -> String {
    let q = render::yaml_quote;
    let env = exec.ca_pem.map_or(String::new(), |pem| {
        format!("        env:\n          - name: UPLINK_OIDC_CA_PEM\n            value: {}\n", q(pem))
    });
    let user_yaml = format!(
        concat!(
            "      exec:\n",
            "        apiVersion: client.authentication.k8s.io/v1\n",
            "        command: uplink-hub\n",
            "        args:\n",
            "          - login\n",
            "          - --issuer\n",
            "          - {issuer}\n",
            "          - --client-id\n",
            "          - {client}\n",
            "          - --scopes\n",
            "          - {scopes}\n",
            "{env}",
            "        interactiveMode: IfAvailable\n",
            "        provideClusterInfo: false\n",
        ),
        issuer = q(exec.issuer),
        client = q(exec.client_id),
        scopes = q(exec.scopes),
        env = env,
    );
    kubeconfig_with(hub_url, ca_pem, cluster, user, &user_yaml)
}

/// Renders a kubeconfig with one cluster, user and context.
pub fn kubeconfig_yaml(hub_url: &str, ca_pem: Option<&str>, cluster: &str, user: &str, token: &str) -> String {
    kubeconfig_with(hub_url, ca_pem, cluster, user, &format!("      token: {}\n", render::yaml_quote(token)))
}

/// A kubeconfig with one cluster, context and user whose `user:` body is
/// `user_yaml` (indented six spaces).
fn kubeconfig_with(hub_url: &str, ca_pem: Option<&str>, cluster: &str, user: &str, user_yaml: &str) -> String {
    use base64::Engine as _;
    let ctx = format!("uplink-{cluster}");
    let ca = ca_pem.map_or(String::new(), |pem| {
        format!("      certificate-authority-data: {}\n", base64::engine::general_purpose::STANDARD.encode(pem))
    });
    // Quoted as ASCII with escapes: a name may hold characters (U+2028,
    // U+0085) that YAML 1.1 parsers such as kubectl's read as line breaks.
    let q = render::yaml_quote;
    // A second context, `fleet`, asks every cluster the person may reach
    // at once (read-only; see `fleet`).
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n  - name: {c}\n    cluster:\n      server: {server}\n{ca}  - name: uplink-fleet\n    cluster:\n      server: {fleet}\n{ca}\
users:\n  - name: {u}\n    user:\n{user_yaml}contexts:\n  - name: {c}\n    context:\n      cluster: {c}\n      user: {u}\n  - name: fleet\n    context:\n      cluster: uplink-fleet\n      user: {u}\n\
current-context: {c}\n",
        c = q(&ctx),
        server = q(&format!("{hub_url}/k8s/clusters/{cluster}")),
        fleet = q(&format!("{hub_url}{}*", super::fleet::KUBE_PREFIX)),
        u = q(&format!("{user}@uplink")),
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

async fn add_user(hub: &Hub, req: &Request, body: &mut Incoming) -> ApiResult {
    let admin = admin_of(hub, req)?;
    let b: UserBody = json_body(body).await?;
    check_names(NameKind::User, [&b.name])?;
    check_names(NameKind::Group, &b.groups)?;
    let (token, hash) = new_token();
    let u = hub.store.create_user(&b.name, &b.groups, b.admin, &hash, now_ms())?;
    log::info!("user added user={:?} admin={} by={:?}", u.name, u.admin, admin.name);
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

async fn add_grant(hub: &Hub, req: &Request, body: &mut Incoming) -> ApiResult {
    admin_of(hub, req)?;
    let b: GrantBody = json_body(body).await?;
    let subject = match (b.user, b.group) {
        (Some(u), None) => {
            names::check_user(&u).map_err(name_error)?;
            Subject::User(u)
        }
        (None, Some(g)) => {
            names::check_group(&g).map_err(name_error)?;
            Subject::Group(g)
        }
        _ => return Err(fail(400, "bad_request", "a grant names exactly one \"user\" or \"group\"")),
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

#[cfg(test)]
mod tests {
    use super::*;
    use yaml_rust2::YamlLoader;

    /// The kubeconfig's user entry reads back as the person's name for
    /// every name Kubernetes has, and kubectl's context points at it.
    #[test]
    fn kubeconfig_user_entries_are_quoted() {
        for name in [
            "arn:aws:iam::1234567890:user/Alice",
            "jane@example.com",
            "oidc:https://idp.example.com#42",
            "Jane Doe",
            "Zoë Ångström",
            "山田",
            "a\"b\\c",
            "line\u{2028}sep",
            "no",
        ] {
            let text = kubeconfig_yaml("https://hub.example.com:8443", Some("PEM"), "edge-1", name, "uh_t");
            let doc = &YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{name:?}: {e}\n{text}"))[0];
            let user = format!("{name}@uplink");
            assert_eq!(doc["users"][0]["name"].as_str(), Some(&*user), "{text}");
            assert_eq!(doc["contexts"][0]["context"]["user"].as_str(), Some(&*user), "{text}");
            assert_eq!(doc["users"][0]["user"]["token"].as_str(), Some("uh_t"));
            assert_eq!(
                doc["clusters"][0]["cluster"]["server"].as_str(),
                Some("https://hub.example.com:8443/k8s/clusters/edge-1")
            );
            assert_eq!(doc["contexts"][1]["name"].as_str(), Some("fleet"), "{text}");
            assert_eq!(doc["contexts"][1]["context"]["user"].as_str(), Some(&*user), "{text}");
            assert_eq!(
                doc["clusters"][1]["cluster"]["server"].as_str(),
                Some("https://hub.example.com:8443/k8s/fleet/*")
            );
            assert_eq!(
                doc["clusters"][1]["cluster"]["certificate-authority-data"],
                doc["clusters"][0]["cluster"]["certificate-authority-data"]
            );
            assert!(text.is_ascii(), "{text}");
        }
    }

    /// An OIDC person's kubeconfig runs `uplink-hub login` as a
    /// `client.authentication.k8s.io/v1` exec plugin.
    #[test]
    fn kubeconfig_exec_entries_read_back() {
        let exec = ExecPlugin {
            issuer: "https://idp.example.com/realms/acme",
            client_id: "uplink-hub",
            scopes: "openid,email,offline_access",
            ca_pem: Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"),
        };
        let text = kubeconfig_exec_yaml("https://hub.example.com", None, "edge-1", "oidc:ann@example.com", &exec);
        let doc = &YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))[0];
        let e = &doc["users"][0]["user"]["exec"];
        assert_eq!(e["apiVersion"].as_str(), Some("client.authentication.k8s.io/v1"), "{text}");
        assert_eq!(e["command"].as_str(), Some("uplink-hub"));
        let args: Vec<&str> = e["args"].as_vec().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "login",
                "--issuer",
                "https://idp.example.com/realms/acme",
                "--client-id",
                "uplink-hub",
                "--scopes",
                "openid,email,offline_access"
            ]
        );
        assert_eq!(e["env"][0]["name"].as_str(), Some("UPLINK_OIDC_CA_PEM"));
        assert_eq!(e["env"][0]["value"].as_str(), exec.ca_pem);
        assert_eq!(e["interactiveMode"].as_str(), Some("IfAvailable"));
        assert_eq!(doc["users"][0]["name"].as_str(), Some("oidc:ann@example.com@uplink"));
    }

    #[test]
    fn path_segments_are_decoded_after_splitting() {
        let parts = segments("/api/v1/users/arn%3Aaws%3Aiam%3A%3A1234567890%3Auser%2FAlice/tokens").ok().unwrap();
        assert_eq!(parts, ["users", "arn:aws:iam::1234567890:user/Alice", "tokens"]);
        let parts = segments("/api/v1/users/Zo%C3%AB%20%C3%85ngstr%C3%B6m").ok().unwrap();
        assert_eq!(parts, ["users", "Zoë Ångström"]);
        assert!(segments("/api/v1/users/%C3").is_err());
        assert!(segments("/api/v1/users/100%").is_err());
    }
}
