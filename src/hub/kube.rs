//! The kube front end: `/k8s/clusters/NAME/...` for kubectl and any
//! Kubernetes client, over HTTP/1.1 or HTTP/2 alike.
//!
//! ```text
//!  request ─► split_target ─► authenticate ─► admit (grant, no
//!  Impersonate-*, cluster registered for this user, activated) ─►
//!  open_stream {head, identity} ─► upload (body, then response head) ─┬
//!     ├─ 101: switch_protocols: HTTP/1.1 101, then pipe raw bytes both
//!     │       ways on the upgraded TLS stream, half-close
//!     └─ else: answer: status + end-to-end headers, body pulled from
//!              the tunnel stream as hyper sends it (`Download`)
//!  ─► Audit (written when dropped, whatever step the request reached)
//! ```
//!
//! Cancellation: hyper drops a request's future and its response body
//! when the client resets its HTTP/2 stream or its HTTP/1.1 connection
//! goes; the tunnel stream goes with them, and dropping it resets it on
//! the tunnel. Upgrades are HTTP/1.1 only: client-go dials exec, attach
//! and port-forward (SPDY or WebSocket) over HTTP/1.1 on a connection of
//! their own, also when its other requests use h2 (tests/e2e_h2.rs).
//!
//! Errors made here are Kubernetes `Status` objects, so kubectl prints
//! them as it prints the API server's own.
//!
//! Headers: hop-by-hop fields (RFC 9110 §7.6.1), `Authorization`, `Host`,
//! the replicas' own `uplink-peer-cluster` and the fields a `Connection`
//! header names are not forwarded; an
//! upgrade carries `Connection: Upgrade` and `Upgrade` so the agent can
//! ask the API server for the same switch. Every `Impersonate-*` field is
//! refused, never dropped silently.

use super::clock::now_ms;
use super::http::{Body, Incoming, Reply, Request, Response, Upgraded};
use super::store::{AuditEntry, Cluster, Lifecycle, User};
use super::{Hub, api, valid_cluster_name};
use crate::driver::{Stream, StreamClosed};
use crate::http::{connection_names, is_hop_by_hop};
use crate::proto::codec::OpenHead;
use crate::proto::{Header, ResetCode, ResponseHead, StreamError};
use bytes::Bytes;
use smol::future::FutureExt;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

const PREFIX: &str = "/k8s/clusters/";

/// After the cluster side of an upgraded stream ends, how long the client
/// side may keep sending before the connection is dropped.
const UPGRADE_LINGER: Duration = Duration::from_secs(10);

/// A Kubernetes `Status` failure (what the API server itself answers).
pub fn status_response(code: u16, message: &str) -> Response {
    let reason = match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    };
    Response::json(code, &crate::kube_status::failure(code, reason, message))
}

/// Whether client-go reads the answer to `path` raw: the discovery
/// documents (`/api`, `/apis`, with or without aggregated discovery's
/// `Accept`), `/version` and `/openapi/...` are fetched with
/// `Request.Do().Raw()`, which never decodes a `Status` from the body.
fn read_raw_by_client_go(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or("").trim_end_matches('/');
    matches!(path, "/api" | "/apis" | "/version" | "") || path.starts_with("/openapi")
}

/// A hub-made error for a request whose forwarded path is `forward`.
///
/// Resource requests get a `Status` object with the real code: kubectl
/// prints its message ("Error from server (ServiceUnavailable): ...").
///
/// Discovery is different. client-go reads `/api`, `/apis`, `/version`
/// and `/openapi/...` raw ([`read_raw_by_client_go`]) and builds the
/// error from the status code alone (`errors.NewGenericServerResponse`),
/// which keeps the server's text only when it is `text/*` and only for
/// some codes. Tried with kubectl 1.27 and 1.32 from an empty cache:
///
/// | code on `/api` | kubectl prints                                         |
/// |----------------|--------------------------------------------------------|
/// | 503            | "the server is currently unable to handle the request" |
/// | 401            | "You must be logged in to the server (...)", generic   |
/// | 404            | nothing: read as "no API groups" ("doesn't have a resource type") |
/// | 500, 502       | `an error on the server ("<text, quotes escaped>") ...` |
/// | 403            | "Error from server (Forbidden): <text>", verbatim      |
///
/// So on those paths every hub-made refusal but 401 is a `403` with the
/// message as plain text: the person reads the hub's own words (why the
/// cluster cannot answer, what to do) instead of a generic line. 401
/// keeps its code: kubectl's "You must be logged in" is the right advice.
/// A `200` with an empty discovery document would be worse: kubectl
/// caches it and then believes the cluster has no resources at all.
pub fn error_for(forward: &str, code: u16, message: &str) -> Response {
    if read_raw_by_client_go(forward) {
        let mut r = status_response(if code == 401 { 401 } else { 403 }, message);
        r.content_type = "text/plain; charset=utf-8".into();
        r.body = format!("{message}\n").into_bytes();
        return r;
    }
    status_response(code, message)
}

/// An answer for a Kubernetes path asked of the hub's root (a kubeconfig
/// whose server is `https://HUB` instead of `https://HUB/k8s/clusters/NAME`),
/// saying where the cluster is; `None` for the hub's own paths.
///
/// The paths: `/api` (the REST API is `/api/v1/...`, which stays the
/// hub's: kubectl reaches it only with `get --raw`, and there a REST 404
/// is no false "healthy"), `/apis/...`, `/version`, `/openapi/...`,
/// `/livez`, `/readyz/...` and `/healthz/...`. `/healthz` and `/readyz`
/// themselves are the hub's probes (liveness, and readiness with the
/// store's state): they get the hint only when the request carries
/// credentials, which kubectl sends and kubelet and load-balancer probes
/// do not, so `kubectl get --raw /healthz` no longer reads "ok" for a
/// cluster it never reached.
pub fn root_hint(req: &Request, public_url: &str) -> Option<Response> {
    let path = req.target().split('?').next().unwrap_or("");
    let under = |p: &str| path == p || path.starts_with(&format!("{p}/"));
    let kube_like = path == "/api"
        || path == "/api/"
        || under("/apis")
        || under("/version")
        || under("/openapi")
        || under("/livez")
        // The hub's own probes answer a bare `/healthz` and `/readyz`; a
        // request that carries credentials is kubectl, not a probe.
        || path.starts_with("/readyz/")
        || path.starts_with("/healthz/")
        || ((path == "/healthz" || path == "/readyz") && req.header("authorization").is_some());
    if !kube_like {
        return None;
    }
    let message = format!(
        "this is uplink-hub, not a Kubernetes API server: set kubectl's server to {public_url}/k8s/clusters/NAME \
         (`uplink-hub kubeconfig --cluster NAME` writes such a kubeconfig); \
         for a raw path, `kubectl get --raw /k8s/clusters/NAME{path}`"
    );
    Some(error_for(path, 404, &message))
}

/// Splits `/k8s/clusters/NAME/REST?QUERY` into the cluster name and the
/// path to forward (`/REST?QUERY`). Refuses anything that could make the
/// forwarded path differ from what the hub checked: dot segments, empty
/// segments, backslashes, encoded `/`, `\`, `.` or `%`, control bytes,
/// and a second `/k8s/` prefix.
pub fn split_target(target: &str) -> Result<(&str, String), &'static str> {
    if !target.starts_with('/') {
        return Err("the request target must be a path");
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    if path.bytes().any(|b| b.is_ascii_control() || b == b'\\' || b == b' ' || b == b'#') {
        return Err("control characters, spaces and backslashes are not allowed in the path");
    }
    // %2f, %5c, %2e, %25 and %00 in any case, looked for in place (every
    // kube request comes through here).
    let encoded = |w: &[u8]| {
        w[0] == b'%'
            && matches!((w[1], w[2].to_ascii_lowercase()), (b'2', b'f' | b'e' | b'5') | (b'5', b'c') | (b'0', b'0'))
    };
    if path.as_bytes().windows(3).any(encoded) {
        return Err("encoded '/', '\\', '.' or '%' are not allowed in the path");
    }
    let rest = path.strip_prefix(PREFIX).ok_or("kube paths look like /k8s/clusters/NAME/api/...")?;
    let name = rest.split('/').next().unwrap_or("");
    if !valid_cluster_name(name) {
        return Err("the cluster name in the path is not a valid cluster name");
    }
    // What follows the name: empty, or `/` and the segments.
    let after = &rest[name.len()..];
    if let Some(segments) = after.strip_prefix('/') {
        let mut segments = segments.split('/').peekable();
        while let Some(s) = segments.next() {
            if s == "." || s == ".." {
                return Err("'.' and '..' path segments are not allowed");
            }
            if s.is_empty() && segments.peek().is_some() {
                return Err("empty path segments ('//') are not allowed");
            }
        }
    }
    let forward_path = if after.is_empty() { "/" } else { after };
    if forward_path.starts_with("/k8s/") || forward_path == "/k8s" {
        return Err("a second /k8s/ prefix is not allowed");
    }
    let mut forward = String::with_capacity(forward_path.len() + query.map_or(0, |q| q.len() + 1));
    forward.push_str(forward_path);
    if let Some(q) = query {
        if q.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err("control characters are not allowed in the query");
        }
        forward.push('?');
        forward.push_str(q);
    }
    Ok((name, forward))
}

/// What gets audited about a request; written once, when dropped, so a
/// request abandoned at any step (the client reset its stream or went
/// away) is audited with what it had reached.
struct Audit {
    hub: Rc<Hub>,
    start: Instant,
    time: i64,
    user: String,
    groups: Vec<String>,
    cluster: String,
    method: String,
    path: String,
    /// 499 until an answer's status is known: the client left first.
    status: u16,
    bytes_in: u64,
    bytes_out: u64,
    upgrade: bool,
}

impl Audit {
    /// Counts the bytes an upgraded connection moved (up, down).
    fn moved(mut self, up: u64, down: u64) {
        self.bytes_in += up;
        self.bytes_out += down;
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        let duration_ms = self.start.elapsed().as_millis() as u64;
        self.hub.metrics.record(&self.cluster, self.status, self.bytes_in, self.bytes_out);
        let entry = AuditEntry {
            id: 0,
            time: self.time,
            user: std::mem::take(&mut self.user),
            groups: std::mem::take(&mut self.groups),
            cluster: std::mem::take(&mut self.cluster),
            method: std::mem::take(&mut self.method),
            path: std::mem::take(&mut self.path),
            status: self.status,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            duration_ms,
            upgrade: self.upgrade,
        };
        // Debug, not info: the audit log below already keeps every
        // request, and a synchronous stderr line per request cost the
        // event loop a file write (and, under write-back pressure, a stall).
        log::debug!(
            "kube request user={} cluster={} method={} path={:?} status={} bytes_in={} bytes_out={} duration_ms={duration_ms} upgrade={}",
            entry.user,
            entry.cluster,
            entry.method,
            entry.path,
            entry.status,
            entry.bytes_in,
            entry.bytes_out,
            entry.upgrade
        );
        if let Err(e) = self.hub.store.append_audit(entry) {
            log::error!("audit write failed error={e}");
        }
    }
}

/// The person behind a kube front-end request (the single-cluster proxy
/// and the fleet view), or the answer kubectl should read: 401 for no or
/// refused credentials, 503 when the store failed. `forward` is the
/// Kubernetes path asked, which decides how a refusal is worded.
pub(super) fn authenticate(hub: &Hub, req: &Request, forward: &str) -> Result<User, Response> {
    match api::authenticate(hub, req) {
        Ok(Some(u)) => Ok(u),
        Ok(None) => Err(error_for(
            forward,
            401,
            "Unauthorized: uplink-hub needs a valid bearer token (get a kubeconfig with `uplink-hub kubeconfig --cluster NAME`)",
        )),
        Err(api::AuthError::Refused(why)) => {
            Err(error_for(forward, 401, &format!("Unauthorized: uplink-hub refused your credentials: {why}")))
        }
        Err(e) => Err(error_for(forward, 503, &format!("uplink-hub store failed: {e}"))),
    }
}

/// Serves one kube front-end request, along the module's pipeline.
pub async fn proxy(hub: &Rc<Hub>, req: &Request, body: &mut Incoming) -> Reply {
    let (cluster_name, forward) = match split_target(req.target()) {
        Ok(x) => x,
        Err(why) => return Reply::Send(status_response(400, &format!("path rejected by uplink-hub: {why}"))),
    };
    let user = match authenticate(hub, req, &forward) {
        Ok(u) => u,
        Err(refusal) => return Reply::Send(refusal),
    };
    // Taken before the checks, as a refusal is audited too.
    let (start, time) = (Instant::now(), now_ms());
    let upgrade = req.upgrade();
    let admitted = admit(hub, req, &user, cluster_name);
    // The person's name and groups move into the audit record, and the
    // tunnel's `Open` frame is written from there: no copy of either.
    let mut audit = Audit {
        hub: hub.clone(),
        start,
        time,
        user: user.name,
        groups: user.groups,
        cluster: cluster_name.to_string(),
        method: req.method.to_string(),
        path: forward,
        status: 499,
        bytes_in: 0,
        bytes_out: 0,
        upgrade: upgrade.is_some(),
    };
    let cluster = match admitted {
        Ok(c) => c,
        Err((code, message)) => return refuse(audit, code, message),
    };
    audit.groups = impersonable(&cluster, std::mem::take(&mut audit.groups));
    let head = OpenHead {
        method: req.method.as_str(),
        path: &audit.path,
        fields: forward_fields(req, upgrade),
        user: &audit.user,
        groups: &audit.groups,
        uid: None,
        extra: &[],
    };
    let mut stream = match open_stream(hub, &cluster.id, head).await {
        Ok(s) => s,
        Err(None) => {
            let message = format!(
                "cluster \"{cluster_name}\" is not connected to uplink-hub (DISCONNECTED): its agent is not running or cannot reach the hub"
            );
            return refuse(audit, 503, message);
        }
        Err(Some(e)) => {
            return refuse(audit, 503, format!("cluster \"{cluster_name}\" could not take the request: {e}"));
        }
    };
    let resp_head = match upload(&mut stream, body, &mut audit, upgrade.is_some(), cluster_name).await {
        Ok(h) => h,
        Err(Upload::Client(e)) => {
            // The client's body broke: the stream is dropped (reset) and
            // the connection or HTTP/2 stream is most likely gone too.
            log::debug!("request body failed cluster={cluster_name} error={e}");
            return refuse(audit, 400, format!("uplink-hub: {e}"));
        }
        Err(Upload::Tunnel(e)) => {
            drop(stream);
            let (code, message) = tunnel_failure(cluster_name, &e);
            return refuse(audit, code, message);
        }
    };
    audit.status = resp_head.status;
    if resp_head.status == 101 {
        return switch_protocols(stream, resp_head.headers, upgrade, body, audit);
    }
    answer(hub, req, cluster_name, stream, resp_head, audit).await
}

/// A refusal made by the hub: audited, and worded for the path asked.
fn refuse(mut audit: Audit, code: u16, message: String) -> Reply {
    audit.status = code;
    Reply::Send(error_for(&audit.path, code, &message))
}

/// The checks between authentication and the tunnel: the grant, no
/// `Impersonate-*`, the cluster registered, the user and groups it was
/// registered to impersonate, an agent activated. The cluster, or the
/// refusal's code and words.
fn admit(hub: &Hub, req: &Request, user: &User, cluster_name: &str) -> Result<Rc<Cluster>, (u16, String)> {
    let reach = hub.store.may_reach(user, cluster_name).map_err(|e| (503, format!("uplink-hub store failed: {e}")))?;
    if !reach {
        return Err((
            403,
            format!(
                "uplink-hub: user \"{}\" has no grant for cluster \"{cluster_name}\"; ask a hub admin for one (`uplink-hub grant add`)",
                user.name
            ),
        ));
    }
    if let Some((name, _)) = req.headers.iter().find(|(n, _)| n.as_str().starts_with("impersonate-")) {
        return Err((
            403,
            format!(
                "uplink-hub refuses impersonation ({name} header): requests reach cluster \"{cluster_name}\" as your hub user \"{}\"{}; remove --as/--as-group",
                user.name,
                if user.groups.is_empty() { String::new() } else { format!(" (groups {})", user.groups.join(", ")) }
            ),
        ));
    }
    let cluster = match hub.store.cluster_shared(cluster_name) {
        Ok(Some(c)) if c.lifecycle != Lifecycle::Deregistered => c,
        Ok(_) => return Err((404, format!("uplink-hub: no registered cluster \"{cluster_name}\""))),
        Err(e) => return Err((503, format!("uplink-hub store failed: {e}"))),
    };
    if !cluster.users.is_empty() && !cluster.users.iter().any(|u| *u == user.name || u == "*") {
        return Err((
            403,
            format!(
                "uplink-hub: cluster \"{cluster_name}\" was registered to impersonate only [{}], not \"{}\"; an admin can register it again with that user",
                cluster.users.join(", "),
                user.name
            ),
        ));
    }
    if cluster.lifecycle == Lifecycle::Pending {
        return Err((
            503,
            format!(
                "cluster \"{cluster_name}\" is registered but no agent has activated it yet; install its manifest or activation file"
            ),
        ));
    }
    Ok(cluster)
}

/// The person's groups the cluster was registered to let the agent
/// impersonate: asking for more would fail the whole request. Dropping
/// one only narrows.
fn impersonable(cluster: &Cluster, mut groups: Vec<String>) -> Vec<String> {
    if !cluster.groups.is_empty() {
        groups.retain(|g| cluster.groups.iter().any(|c| c == g || c == "*"));
    }
    groups
}

/// Why [`upload`] stopped.
enum Upload {
    /// The client's body could not be read.
    Client(super::http::HttpError),
    /// The tunnel stream failed.
    Tunnel(StreamClosed),
}

/// Uploads the request body, then waits for the answer's head. An
/// upgrade request keeps its send side open: after a 101 the same
/// stream carries the client's raw bytes.
async fn upload(
    stream: &mut Stream,
    body: &mut Incoming,
    audit: &mut Audit,
    upgrading: bool,
    cluster_name: &str,
) -> Result<ResponseHead, Upload> {
    loop {
        match body.chunk().await {
            Ok(Some(chunk)) => {
                audit.bytes_in += chunk.len() as u64;
                stream.write_all(&chunk).await.map_err(Upload::Tunnel)?;
            }
            Ok(None) => {
                if !upgrading {
                    stream.finish();
                }
                break;
            }
            Err(e) => return Err(Upload::Client(e)),
        }
    }
    stream.response_head().await.map_err(|e| {
        log::warn!("no response head cluster={cluster_name} error={e}");
        Upload::Tunnel(e)
    })
}

/// The cluster switched protocols (exec, attach, port-forward): `101` to
/// the client, then raw bytes both ways on the upgraded connection.
fn switch_protocols(
    stream: Stream,
    headers: Vec<Header>,
    upgrade: Option<&str>,
    body: &mut Incoming,
    audit: Audit,
) -> Reply {
    let (Some(upgrade), Some(on)) = (upgrade, body.take_upgrade()) else {
        return refuse(audit, 502, "the cluster switched protocols without being asked".into());
    };
    let Some(mut fields) = response_fields(headers) else {
        let message = format!("cluster \"{}\" answered with a malformed header", audit.cluster);
        return refuse(audit, 502, message);
    };
    for (n, v) in sandbox() {
        fields.push(Header::new(n.as_str(), v.as_bytes()));
    }
    fields.push(Header::new("Connection", "Upgrade"));
    fields.push(Header::new("Upgrade", upgrade));
    let refs: Vec<(&[u8], &[u8])> = fields.iter().map(|h| (h.name.as_slice(), h.value.as_slice())).collect();
    let then = move |up| async move {
        let (bytes_in, bytes_out) = pipe(stream, up).await;
        audit.moved(bytes_in, bytes_out);
    };
    super::http::switch(on, &refs, then)
        .unwrap_or_else(|| Reply::Send(status_response(502, "the cluster's upgrade answer could not be sent")))
}

/// The answer: status and end-to-end headers pass, the body streams as
/// it arrives (watch events and log lines reach the client as they
/// happen); framing is hyper's, on either protocol.
async fn answer(
    hub: &Rc<Hub>,
    req: &Request,
    cluster_name: &str,
    mut stream: Stream,
    resp_head: ResponseHead,
    mut audit: Audit,
) -> Reply {
    let no_body = req.method == "HEAD" || resp_head.status == 204 || resp_head.status == 304 || resp_head.status < 200;
    // The agent is not trusted to have framed its answer: a length that
    // is not one field of digits (RFC 9110 §8.6) is a bad gateway, not a
    // guess at where the body ends.
    if let Err(e) = crate::http::content_length(&resp_head.headers) {
        log::warn!("bad response framing from agent cluster={cluster_name} error={e}");
        return refuse(audit, 502, format!("cluster \"{cluster_name}\" answered with a malformed header: {e}"));
    }
    // A failure on a path client-go reads raw (discovery) would reach the
    // person as "unknown" or a generic line: the agent's refusals and the
    // API server's own Status lose their message there. Retold the way
    // `error_for` tells the hub's own, so kubectl prints the words. Not
    // retold: a 404 (client-go reads it as "no such API" and falls back,
    // e.g. from /openapi/v3 to v2) and anything client-go retries by
    // itself (429, or a `Retry-After`).
    let retried = resp_head.status == 429 || crate::http::find(&resp_head.headers, "retry-after").is_some();
    let code = resp_head.status;
    if code >= 400 && code != 404 && !retried && !no_body && read_raw_by_client_go(&audit.path) {
        let message = match small_body(&mut stream).await {
            Some(body) => {
                audit.bytes_out = body.len() as u64;
                status_message(&body).unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string())
            }
            None => format!("cluster \"{cluster_name}\" answered {code} with a body that could not be read"),
        };
        return refuse(audit, code, message);
    }
    let Some(fields) = response_fields(resp_head.headers) else {
        return refuse(audit, 502, format!("cluster \"{cluster_name}\" answered with a malformed header"));
    };
    // A watch or followed log ends at once when the hub shuts down: the
    // client opens it again on the next process, and the drain (during
    // which a socket-activated successor cannot start) is not held up.
    let drain = crate::http::is_kube_stream(&audit.path).then(|| {
        let hub = hub.clone();
        Box::pin(async move { hub.draining_started().await }) as Pin<Box<dyn Future<Output = ()>>>
    });
    let body = Body::Pull(Box::pin(Download { stream, audit, no_body, drain, done: false }));
    match super::http::streamed_owned(code, fields, sandbox(), body) {
        Some(r) => Reply::Http(r),
        None => {
            Reply::Send(status_response(502, &format!("cluster \"{cluster_name}\" answered with a malformed header")))
        }
    }
}

/// An answer's body as hyper pulls it: each piece read from the tunnel
/// stream when hyper is ready to send it (flow control then reaches the
/// agent through the stream's window). Dropped (the client went away or
/// reset its HTTP/2 stream), it resets the tunnel stream and writes the
/// audit entry with the bytes that went.
struct Download {
    stream: Stream,
    audit: Audit,
    /// A `HEAD` answer (or a status without a body): pieces are read
    /// and dropped.
    no_body: bool,
    /// Watches and followed logs: ends them once the hub starts
    /// draining. The client opens them again on the next process, and
    /// the drain (during which a socket-activated successor cannot
    /// start) is not held up.
    drain: Option<Pin<Box<dyn Future<Output = ()>>>>,
    done: bool,
}

impl smol::stream::Stream for Download {
    type Item = std::io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.drain.as_mut().is_some_and(|d| d.as_mut().poll(cx).is_ready()) {
            this.done = true;
            return Poll::Ready(None);
        }
        loop {
            match std::task::ready!(this.stream.poll_chunk(cx)) {
                Ok(Some(_)) if this.no_body => {}
                Ok(Some(chunk)) => {
                    this.audit.bytes_out += chunk.len() as u64;
                    return Poll::Ready(Some(Ok(Bytes::from(chunk))));
                }
                Ok(None) => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                Err(e) => {
                    log::warn!("response stream broke cluster={} error={e}", this.audit.cluster);
                    // An error, not an end: the client must not take a
                    // cut answer for a whole one.
                    this.done = true;
                    return Poll::Ready(Some(Err(std::io::Error::other(e))));
                }
            }
        }
    }
}

/// Largest error body from a cluster that is read to retell its message.
const SMALL_BODY: usize = 64 * 1024;

/// A whole response body of at most [`SMALL_BODY`] bytes; `None` when it
/// is larger or the stream breaks.
async fn small_body(stream: &mut Stream) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = stream.read_chunk().await.ok()? {
        body.extend_from_slice(&chunk);
        if body.len() > SMALL_BODY {
            return None;
        }
    }
    Some(body)
}

/// The message of a Kubernetes `Status` failure.
fn status_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    (v["kind"] == "Status").then(|| v["message"].as_str().map(str::to_string)).flatten().filter(|m| !m.is_empty())
}

/// How long a request waits for a cluster's agent that is expected back
/// (see [`super::tunnels::Tunnels::expecting`]) before it is refused: a
/// redial after a cut or a hub restart is quicker than this.
const TUNNEL_GRACE: Duration = Duration::from_secs(3);

/// A stream to the cluster on its least busy tunnel, or through a replica
/// that holds one (`replicas::handoff`). A request that lands
/// while the agent is redialling waits for it, up to [`TUNNEL_GRACE`],
/// rather than being refused. `Err(None)`: no tunnel; `Err(Some)`: the
/// tunnel could not take the stream.
pub(super) async fn open_stream<'a, I>(
    hub: &Hub,
    cluster_id: &str,
    head: OpenHead<'a, I>,
) -> Result<Stream, Option<StreamError>>
where
    I: Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
{
    let until = Instant::now() + TUNNEL_GRACE;
    loop {
        // Asked before the head is encoded, so that a stream refused for
        // a passing reason is retried.
        let error = match super::replicas::handoff::route(hub, cluster_id).await {
            Some(route) => match route.can_open() {
                Ok(()) => return route.open_ref(head.clone()).map_err(Some),
                // Going away or closing: a new tunnel is on its way.
                Err(e @ (StreamError::GoingAway | StreamError::Closed | StreamError::NotConnected)) => Some(e),
                Err(e) => return Err(Some(e)),
            },
            None => None,
        };
        if hub.draining.get() || Instant::now() >= until || !hub.tunnels.expecting(cluster_id) {
            return Err(error);
        }
        smol::Timer::after(Duration::from_millis(20)).await;
    }
}

/// The status and message for a request whose tunnel stream failed before
/// the answer's head: which hop failed, and what to do.
fn tunnel_failure(cluster: &str, e: &StreamClosed) -> (u16, String) {
    match e {
        StreamClosed::Session(why) => (
            503,
            format!(
                "uplink-hub ↔ agent of cluster \"{cluster}\": the tunnel was lost before the answer came ({why}); \
                 the agent reconnects by itself, retry in a moment"
            ),
        ),
        StreamClosed::Reset { code: ResetCode::Refused, message } => {
            (503, format!("the agent of cluster \"{cluster}\" refused the request ({message}); retry in a moment"))
        }
        StreamClosed::Reset { code: ResetCode::Upstream, message } => {
            (502, format!("uplink agent → API server of cluster \"{cluster}\": {message}"))
        }
        other => (502, format!("cluster \"{cluster}\" stopped answering: {other}")),
    }
}

/// Response fields an agent may not set on the hub's origin, which also
/// serves the console: cookies, cross-origin grants and page policies
/// would let a compromised agent reach people's console sessions.
const AGENT_MAY_NOT_SET: &[&str] = &[
    "set-cookie",
    "set-cookie2",
    "content-security-policy",
    "content-security-policy-report-only",
    "x-frame-options",
    "strict-transport-security",
    "clear-site-data",
    "refresh",
    "alt-svc",
    "service-worker-allowed",
];

/// What every proxied answer carries besides the cluster's fields: a
/// sandboxing policy, so that whatever a cluster answers can never run as
/// the hub's own page.
fn sandbox() -> [(hyper::http::HeaderName, hyper::http::HeaderValue); 2] {
    use hyper::http::{HeaderValue, header};
    // Constants, so the values are checked at compile time, not on every
    // answer (`from_static` walks its bytes). A fresh value at each use.
    #[allow(clippy::declare_interior_mutable_const)]
    const CSP: HeaderValue = HeaderValue::from_static("sandbox; default-src 'none'; frame-ancestors 'none'");
    #[allow(clippy::declare_interior_mutable_const)]
    const NOSNIFF: HeaderValue = HeaderValue::from_static("nosniff");
    [(header::CONTENT_SECURITY_POLICY, CSP), (header::X_CONTENT_TYPE_OPTIONS, NOSNIFF)]
}

/// The bytes of a field name (RFC 9110 §5.6.2 `tchar`), by table: every
/// field of every answer is checked.
const TCHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~'
            );
        i += 1;
    }
    t
};

/// The agent's response fields as the hub will send them: hop-by-hop and
/// origin-sensitive fields dropped (the caller adds [`sandbox`]).
/// `None` when a field could split the response (a name that is not a
/// token, a value with CR, LF or NUL): the agent is not trusted to have
/// checked.
fn response_fields(mut headers: Vec<Header>) -> Option<Vec<Header>> {
    for h in &headers {
        let token = !h.name.is_empty() && h.name.iter().all(|&b| TCHAR[b as usize]);
        if !token || h.value.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0)) {
            return None;
        }
    }
    // In place: the fields move on into hyper's map without a copy.
    headers.retain(|h| {
        let name = h.name.as_slice();
        let origin_sensitive = name.get(..15).is_some_and(|p| p.eq_ignore_ascii_case(b"access-control-"))
            || AGENT_MAY_NOT_SET.iter().any(|n| n.len() == name.len() && n.as_bytes().eq_ignore_ascii_case(name));
        !is_hop_by_hop(name) && !origin_sensitive
    });
    Some(headers)
}

/// The request fields that travel to the agent, as `(name, value)`
/// borrowed from the request (walked twice: counted, then encoded into
/// the `Open` frame). Also dropped: the field a replica names a
/// handed-off stream's cluster with
/// ([`super::replicas::handoff::CLUSTER_HEADER`]); only replicas set it.
fn forward_fields<'a>(
    req: &'a Request,
    upgrade: Option<&'a str>,
) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone + 'a {
    // Fields the client's Connection header marks hop-by-hop (RFC 9110
    // §7.6.1); most requests have no Connection field to look in.
    let named = req.headers.iter().any(|(n, _)| *n == hyper::http::header::CONNECTION);
    let kept = req
        .headers
        .iter()
        .filter(move |(n, _)| {
            let name = n.as_str().as_bytes();
            let dropped = is_hop_by_hop(name)
                || *n == hyper::http::header::AUTHORIZATION
                || *n == hyper::http::header::HOST
                || *n == super::replicas::handoff::CLUSTER_HEADER
                || named && connection_names(&req.headers, name);
            !dropped
        })
        .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
    let upgrade =
        upgrade.into_iter().flat_map(|u| [(&b"Connection"[..], &b"Upgrade"[..]), (&b"Upgrade"[..], u.as_bytes())]);
    kept.chain(upgrade)
}

async fn stream_read(s: &RefCell<Stream>, buf: &mut [u8]) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| smol::io::AsyncRead::poll_read(Pin::new(&mut *s.borrow_mut()), cx, buf)).await
}

async fn stream_write(s: &RefCell<Stream>, data: &[u8]) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| smol::io::AsyncWrite::poll_write(Pin::new(&mut *s.borrow_mut()), cx, data)).await
}

/// Most bytes moved per read on an upgraded connection.
const PIPE_CHUNK: usize = 32 * 1024;

/// Pipes an upgraded connection: client bytes to the stream, stream bytes
/// to the client, each direction half-closing on its own. Returns the
/// bytes (up, down).
async fn pipe(stream: Stream, up: Upgraded) -> (u64, u64) {
    let (mut inb, mut out) = smol::io::split(up);
    let stream = RefCell::new(stream);
    let up_bytes = std::cell::Cell::new(0u64);
    let down_bytes = std::cell::Cell::new(0u64);
    let up = async {
        let mut buf = vec![0u8; PIPE_CHUNK];
        loop {
            match inb.read(&mut buf).await {
                Ok(0) => {
                    stream.borrow_mut().finish();
                    return true;
                }
                Ok(n) => {
                    let mut data = &buf[..n];
                    while !data.is_empty() {
                        match stream_write(&stream, data).await {
                            Ok(k) => data = &data[k..],
                            Err(_) => return false,
                        }
                    }
                    up_bytes.set(up_bytes.get() + n as u64);
                }
                Err(_) => return false,
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; PIPE_CHUNK];
        loop {
            match stream_read(&stream, &mut buf).await {
                Ok(0) => {
                    // close(): TLS close_notify, then TCP write shutdown;
                    // the client may still send (half-close).
                    let _ = out.close().await;
                    return true;
                }
                Ok(n) => {
                    if out.write_all(&buf[..n]).await.is_err() || out.flush().await.is_err() {
                        return false;
                    }
                    down_bytes.set(down_bytes.get() + n as u64);
                }
                Err(_) => return false,
            }
        }
    };
    // Whichever side ends first: a clean client EOF waits for the cluster
    // side; a clean cluster EOF gives the client a moment to finish.
    let mut up = std::pin::pin!(up);
    let mut down = std::pin::pin!(down);
    enum First {
        Up(bool),
        Down(bool),
    }
    let first = async { First::Up(up.as_mut().await) }.or(async { First::Down(down.as_mut().await) }).await;
    match first {
        First::Up(true) => {
            down.await;
        }
        First::Down(true) => {
            up.or(async {
                smol::Timer::after(UPGRADE_LINGER).await;
                false
            })
            .await;
        }
        _ => {}
    }
    (up_bytes.get(), down_bytes.get())
}

#[cfg(test)]
mod tests {
    use super::{error_for, forward_fields, root_hint, split_target, status_message};
    use crate::hub::http::{Proto, Request};

    #[test]
    fn forwarded_fields_on_either_protocol() {
        for proto in [Proto::Http11, Proto::H2] {
            let fields: &[(&str, &str)] = &[
                ("Host", "hub"),
                ("Authorization", "Bearer person"),
                ("Connection", "keep-alive, X-Hop"),
                ("X-Hop", "1"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                // Only replicas name a handed-off stream's cluster.
                ("Uplink-Peer-Cluster", "c_someone_else"),
                ("uplink-peer-cluster", "c_other"),
                ("Accept", "application/json;as=Table;g=meta.k8s.io;v=v1"),
                ("Content-Type", "application/merge-patch+json"),
            ];
            let req = Request::new("GET", "/k8s/clusters/edge-1/api/v1/pods", proto, fields).unwrap();
            let names: Vec<String> =
                forward_fields(&req, None).map(|(n, _)| String::from_utf8_lossy(n).into_owned()).collect();
            assert_eq!(names, ["accept", "content-type"], "{proto:?}");
            let up: Vec<String> = forward_fields(&req, Some("SPDY/3.1"))
                .map(|(n, v)| format!("{}: {}", String::from_utf8_lossy(n), String::from_utf8_lossy(v)))
                .collect();
            assert_eq!(up[2..], ["Connection: Upgrade", "Upgrade: SPDY/3.1"], "{proto:?}");
        }
    }

    #[test]
    fn discovery_refusals_are_403_text_except_401() {
        for path in ["/api", "/apis", "/apis/", "/version?timeout=32s", "/openapi/v3", "/"] {
            let r = error_for(path, 503, "cluster \"x\" is not connected");
            assert_eq!((r.status, r.content_type.as_ref()), (403, "text/plain; charset=utf-8"), "{path}");
            assert_eq!(r.body, b"cluster \"x\" is not connected\n");
            assert_eq!(error_for(path, 401, "log in").status, 401);
        }
        for path in ["/api/v1/pods", "/apis/apps/v1", "/healthz"] {
            let r = error_for(path, 503, "not connected");
            assert_eq!((r.status, r.content_type.as_ref()), (503, "application/json"), "{path}");
            assert!(String::from_utf8_lossy(&r.body).contains(r#""kind": "Status""#));
        }
    }

    #[test]
    fn status_messages() {
        let st = crate::kube_status::failure(403, "Forbidden", "not you").to_string();
        assert_eq!(status_message(st.as_bytes()).as_deref(), Some("not you"));
        assert_eq!(status_message(br#"{"kind":"Status","message":""}"#), None);
        assert_eq!(status_message(br#"{"kind":"APIVersions","message":"x"}"#), None);
        assert_eq!(status_message(b"<html>"), None);
    }

    #[test]
    fn kubernetes_paths_at_the_hub_root_get_a_hint() {
        let req = |target: &str, auth: bool| {
            let fields: &[(&str, &str)] = if auth { &[("Authorization", "Bearer t")] } else { &[] };
            Request::new("GET", target, crate::hub::http::Proto::Http11, fields).unwrap()
        };
        for (target, auth) in [
            ("/api", false),
            ("/api?timeout=32s", true),
            ("/apis", false),
            ("/apis/apps/v1", true),
            ("/version", false),
            ("/openapi/v2", false),
            ("/livez", false),
            ("/readyz?verbose", true),
            ("/readyz/ping", false),
            ("/healthz/ping", false),
            ("/healthz", true),
        ] {
            let r = root_hint(&req(target, auth), "https://hub:8443").unwrap_or_else(|| panic!("{target}"));
            let text = String::from_utf8_lossy(&r.body).into_owned();
            assert!(text.contains("https://hub:8443/k8s/clusters/NAME"), "{target}: {text}");
            assert!([403, 404].contains(&r.status), "{target}");
        }
        // The hub's own paths: its probe, REST API, console, metrics.
        for target in
            ["/healthz", "/readyz", "/api/v1/clusters", "/api/v1", "/", "/metrics", "/assets/app.js", "/apiary"]
        {
            assert!(root_hint(&req(target, false), "https://hub").is_none(), "{target}");
        }
    }

    #[test]
    fn paths() {
        assert_eq!(
            split_target("/k8s/clusters/edge-1/api/v1/pods?watch=1").unwrap(),
            ("edge-1", "/api/v1/pods?watch=1".into())
        );
        assert_eq!(split_target("/k8s/clusters/edge-1").unwrap(), ("edge-1", "/".into()));
        assert_eq!(split_target("/k8s/clusters/edge-1/").unwrap(), ("edge-1", "/".into()));
        assert_eq!(split_target("/k8s/clusters/edge-1/api/").unwrap(), ("edge-1", "/api/".into()));
        for bad in [
            "/k8s/clusters/edge-1/../edge-2/api",
            "/k8s/clusters/edge-1/api/%2e%2e/x",
            "/k8s/clusters/edge-1%2Fapi",
            "/k8s/clusters/edge-1/api%2F..%2F",
            "/k8s/clusters/edge-1/k8s/clusters/edge-2/api",
            "/k8s/clusters/edge-1//api",
            "/k8s/clusters/../clusters/edge-2/api",
            "/k8s/clusters/edge-1/api/./v1",
            "/k8s/clusters/edge-1\\..\\edge-2",
            "/k8s/clusters/%65dge-1/api",
            "/k8s/clusters/edge-1/api/%252e%252e",
            "/k8s/clusters//edge-1/api",
            "/k8s/clusters/Edge-1/api",
            "http://x/k8s/clusters/edge-1/api",
        ] {
            assert!(split_target(bad).is_err(), "{bad}");
        }
    }
}
