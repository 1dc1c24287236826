//! The fleet view: one read asked of every cluster a person may reach
//! whose name matches a pattern, each cluster's RBAC deciding, the
//! answers merged with every item naming its cluster.
//!
//! ```text
//!  /k8s/fleet/PATTERN/api/...          kubectl (the `fleet` context)
//!  /api/v1/fleet/k8s/api/...?clusters=PATTERN   REST, NDJSON as answers arrive
//!        │
//!  path check ─► authenticate ─► no Impersonate-* ─► GET only ─► what is asked?
//!        ├─ discovery (/api, /apis, /version, /openapi): one reachable cluster answers
//!        ├─ list or get by name: targets = activated ∩ glob(PATTERN) ∩ grants
//!        │     └─ fanout (bounded, per-cluster timeout, audited) ─► merge
//!        │          kubectl: one Table (CLUSTER column first) or List, with a
//!        │                   `Warning: 299` per cluster that could not answer
//!        │          REST:    one line per cluster as it answers, then a summary
//!        └─ anything else (watch, logs, exec, proxy, writes): refused, read-only
//! ```
//!
//! kubectl reads its answer whole before it prints, and the warnings that
//! name failed clusters must be in the response head; so the kubectl
//! answer is sent once every cluster has answered or timed out, holding
//! rows as serialized bytes (what kubectl gets anyway). The REST shape is
//! the streaming one: the first clusters' items are on the wire while the
//! slow ones are still being asked.
//!
//! `limit` and `continue` are not passed on: a continue token belongs to
//! one cluster, so each cluster is asked for its whole list.
//!
//! Not here: the single-cluster proxy (`kube`), watches across clusters.

pub mod fanout;
pub mod merge;

use super::api;
use super::http::{Body, Reply, Request, Response};
use super::kube::{error_for, split_target, status_response};
use super::store::{Cluster, Lifecycle, User};
use super::{Hub, glob_match, may_reach};
use fanout::{Ask, CLUSTER_TIMEOUT, Failure, Outcome, fan_out};
use merge::Parsed;
use serde_json::{Value, json};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// kubectl's fleet context: `/k8s/fleet/PATTERN/...`.
pub const KUBE_PREFIX: &str = "/k8s/fleet/";
/// The REST shape: `/api/v1/fleet/k8s/...?clusters=PATTERN`.
pub const REST_PREFIX: &str = "/api/v1/fleet/k8s/";

/// Most `Warning` fields in one answer; the rest are counted in one more.
const MAX_WARNINGS: usize = 20;
/// Longest message quoted in one warning.
const WARNING_CHARS: usize = 400;
/// Largest merged answer for kubectl: beyond it, a cluster's rows are
/// left out with a warning (the REST query streams and has no such cap).
const MAX_MERGED: usize = 128 << 20;
/// Longest per-cluster timeout a REST caller may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(60);

const READ_ONLY: &str = "the fleet context is read-only: it lists and gets across clusters; use --context CLUSTER";

/// Whether a request path belongs to the fleet view.
pub fn is_fleet_path(path: &str) -> bool {
    path.starts_with(KUBE_PREFIX) || path.starts_with(REST_PREFIX)
}

/// What a kube path asks.
#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    /// `/api`, `/apis`, a group or version, `/version`, `/openapi/...`.
    Discovery,
    /// A list of a resource (`named: false`) or a get by name.
    Read { named: bool },
    /// Not something the fleet view does; the text says what it is.
    Refused(&'static str),
}

/// Classifies a kube path (no query).
pub fn classify(path: &str) -> Target {
    let segs: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let rest = match segs.as_slice() {
        [] | ["version"] | ["api"] | ["apis"] | ["api", _] | ["apis", _] | ["apis", _, _] => {
            return Target::Discovery;
        }
        ["openapi", ..] => return Target::Discovery,
        ["api", _, rest @ ..] => rest,
        ["apis", _, _, rest @ ..] => rest,
        _ => return Target::Refused("not a Kubernetes API path"),
    };
    match rest {
        ["watch", ..] => Target::Refused("watches are not merged across clusters"),
        [_] | ["namespaces", _, _] => Target::Read { named: false },
        [_, _] | ["namespaces", _, _, _] => Target::Read { named: true },
        _ => Target::Refused("subresources (logs, exec, proxy, status, ...) are per cluster"),
    }
}

/// The query without the parameters named in `drop` (raw pairs kept as
/// sent), and whether it asks for a watch.
fn rewrite_query(query: &str, drop: &[&str]) -> (String, bool) {
    let mut watch = false;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .filter(|kv| {
            let key = kv.split('=').next().unwrap_or("");
            if key == "watch" && matches!(kv.split_once('=').map(|x| x.1), Some("true" | "1")) {
                watch = true;
            }
            !drop.contains(&key)
        })
        .collect();
    (kept.join("&"), watch)
}

/// A pattern as grants write them: lower-case letters, digits, `-`, `*`.
fn valid_pattern(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 253
        && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'*')
}

/// The clusters a fleet read goes to: activated, matching, reachable by
/// `user`, sorted by name. Disconnected ones are kept: they are reported.
fn targets(hub: &Hub, user: &User, pattern: &str) -> Result<Vec<Cluster>, String> {
    let grants = hub.store.grants().map_err(|e| e.to_string())?;
    let mut list: Vec<Cluster> = hub
        .store
        .clusters()
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|c| {
            c.lifecycle == Lifecycle::Activated && glob_match(pattern, &c.name) && may_reach(user, &grants, &c.name)
        })
        .collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(list)
}

fn wants_table(req: &Request) -> bool {
    req.header_str("accept").is_some_and(|a| a.split(',').any(|p| p.replace(' ', "").contains("as=Table")))
}

/// The `Accept` sent to every cluster: JSON, a Table when the client asked for one.
fn accept_for(table: bool) -> String {
    if table {
        "application/json;as=Table;v=v1;g=meta.k8s.io,application/json".into()
    } else {
        "application/json".into()
    }
}

fn impersonation_refused(req: &Request) -> Option<String> {
    req.headers.iter().find(|(n, _)| n.as_str().starts_with("impersonate-")).map(|(name, _)| {
        format!("uplink-hub refuses impersonation ({name} header): the fleet view asks every cluster as you; remove --as/--as-group")
    })
}

/// Serves `/k8s/fleet/PATTERN/...` for kubectl.
/// The client going away cancels it: hyper drops the request's future
/// (a closed HTTP/1.1 connection, a reset HTTP/2 stream), and with it
/// the fan-out and its tunnel streams.
pub async fn kube(hub: &Hub, req: &Request) -> Reply {
    let rest = req.target().strip_prefix(KUBE_PREFIX).unwrap_or("");
    let (pattern, rest) = rest.split_once('/').map_or((rest.split('?').next().unwrap_or(""), ""), |(p, r)| (p, r));
    // client-go escapes `*` in a server URL's path.
    let pattern = pattern.replace("%2A", "*").replace("%2a", "*");
    if !valid_pattern(&pattern) {
        return Reply::Send(status_response(
            400,
            "uplink-hub: the fleet pattern is a cluster name with '*' wildcards, e.g. /k8s/fleet/edge-*/",
        ));
    }
    // The same path checks as the single-cluster proxy.
    let forward = match split_target(&format!("/k8s/clusters/fleet/{rest}")) {
        Ok((_, f)) => f,
        Err(why) => return Reply::Send(status_response(400, &format!("path rejected by uplink-hub: {why}"))),
    };
    let user = match super::kube::authenticate(hub, req, &forward) {
        Ok(u) => u,
        Err(refusal) => return Reply::Send(refusal),
    };
    if let Some(m) = impersonation_refused(req) {
        return Reply::Send(error_for(&forward, 403, &m));
    }
    if !matches!(req.method.as_str(), "GET" | "HEAD") || req.upgrade().is_some() {
        return Reply::Send(status_response(405, READ_ONLY));
    }
    let (path, query) = forward.split_once('?').unwrap_or((&forward, ""));
    let targets = match targets(hub, &user, &pattern) {
        Ok(t) => t,
        Err(e) => return Reply::Send(error_for(&forward, 503, &format!("uplink-hub store failed: {e}"))),
    };
    let named = match classify(path) {
        Target::Discovery => return discovery(hub, &user, &targets, &forward, req).await,
        Target::Read { named } => named,
        Target::Refused(what) => return Reply::Send(status_response(405, &format!("{READ_ONLY} ({what})"))),
    };
    let (query, watch) = rewrite_query(query, &["limit", "continue"]);
    if watch {
        // kubectl 1.27 prints a refused watch generically ("does not
        // allow this method") whatever the code; later ones print this.
        return Reply::Send(status_response(
            405,
            "the fleet context does not watch (a watch is per cluster): use --context CLUSTER -w, or list again",
        ));
    }
    let table = wants_table(req);
    let ask = Ask {
        user: &user,
        path: if query.is_empty() { path.to_string() } else { format!("{path}?{query}") },
        accept: accept_for(table),
        timeout: CLUSTER_TIMEOUT,
    };
    let merged = fan_out(hub, &ask, &targets, async |rx| {
        let mut m = Merged::new(table, MAX_MERGED);
        while let Ok((cluster, outcome)) = rx.recv().await {
            m.add(&cluster, outcome);
        }
        m
    })
    .await;
    Reply::Send(merged.response(named, &pattern, targets.len()))
}

/// Answers a discovery request from the first reachable cluster that
/// answers it: the fleet's clusters are expected to serve the same
/// kinds, and kubectl needs one answer. The cluster's content type
/// travels as it is (aggregated discovery is told apart by it).
async fn discovery(hub: &Hub, user: &User, targets: &[Cluster], forward: &str, req: &Request) -> Reply {
    let accept = req.header_str("accept").unwrap_or("application/json").to_string();
    let ask = Ask { user, path: forward.to_string(), accept, timeout: CLUSTER_TIMEOUT };
    let mut last: Option<(String, Failure)> = None;
    let connected = targets.iter().filter(|c| hub.tunnels.is_connected(&c.id));
    for c in connected.take(3) {
        match fanout::ask_one(hub, &ask, c).await {
            Outcome::Answer { content_type, body } => {
                let mut r =
                    Response::new(200, "application/json", body).with_header("X-Uplink-Discovery-From", c.name.clone());
                r.content_type = content_type.into();
                return Reply::Send(r);
            }
            Outcome::Failed(f) => last = Some((c.name.clone(), f)),
        }
    }
    Reply::Send(match last {
        Some((name, f)) => {
            error_for(forward, f.code, &format!("cluster \"{name}\" answered discovery with: {}", f.message))
        }
        None => error_for(
            forward,
            503,
            &format!(
                "uplink-hub: none of the {} clusters you may reach that match this fleet context is connected",
                targets.len()
            ),
        ),
    })
}

/// The merged answer for kubectl, built as clusters answer.
struct Merged {
    table: bool,
    /// Most bytes of rows or items held (see [`MAX_MERGED`]).
    cap: usize,
    held: usize,
    columns: Option<Vec<Value>>,
    /// Each cluster's serialized rows or items, comma-separated; sent in
    /// cluster-name order, whatever order the answers came in.
    parts: Vec<(String, Vec<u8>)>,
    answered: usize,
    failures: Vec<(String, Failure)>,
}

impl Merged {
    fn new(table: bool, cap: usize) -> Merged {
        Merged { table, cap, held: 0, columns: None, parts: Vec::new(), answered: 0, failures: Vec::new() }
    }

    /// Appends one row or item to `cluster`'s part.
    fn push(part: &mut Vec<u8>, v: &Value) {
        if !part.is_empty() {
            part.push(b',');
        }
        part.extend_from_slice(&serde_json::to_vec(v).unwrap_or_default());
    }

    fn add(&mut self, cluster: &str, outcome: Outcome) {
        let body = match outcome {
            Outcome::Answer { body, .. } => body,
            Outcome::Failed(f) => return self.failures.push((cluster.to_string(), f)),
        };
        let unmergeable = |why: String| Failure { reason: "Unreadable".into(), code: 502, message: why };
        let mut part = Vec::new();
        match (merge::parse(cluster, &body), self.table) {
            (Ok(Parsed::Table { columns, rows }), true) => {
                let width = self.columns.get_or_insert(columns).len() + 1;
                for mut row in rows {
                    merge::fit_row(&mut row, width);
                    Merged::push(&mut part, &row);
                }
            }
            (Ok(Parsed::Items(items)), false) => items.iter().for_each(|i| Merged::push(&mut part, i)),
            (Ok(Parsed::Object(o)), false) => Merged::push(&mut part, &o),
            (Ok(_), true) => {
                return self.failures.push((cluster.into(), unmergeable("the cluster answered no Table".into())));
            }
            (Ok(Parsed::Table { .. }), false) => {
                return self.failures.push((cluster.into(), unmergeable("the cluster answered a Table".into())));
            }
            (Err(e), _) => return self.failures.push((cluster.into(), unmergeable(e.to_string()))),
        }
        if self.held + part.len() > self.cap {
            let message = format!(
                "left out: the merged answer would be over {} MiB; narrow it (a pattern, a namespace, a selector) or use the REST fleet query, which streams",
                self.cap >> 20
            );
            return self.failures.push((cluster.into(), Failure { reason: "TooLarge".into(), code: 507, message }));
        }
        self.held += part.len();
        self.parts.push((cluster.to_string(), part));
        self.answered += 1;
    }

    /// The response: a Table or List, with a warning per cluster that
    /// could not answer. A get by name that no cluster found is a 404,
    /// as it is on one cluster (the other clusters' failures still warn).
    fn response(mut self, named: bool, pattern: &str, asked: usize) -> Response {
        self.failures.sort_by(|a, b| a.0.cmp(&b.0));
        let not_found = self.failures.iter().find(|(_, f)| f.code == 404).map(|(_, f)| f.message.clone());
        let mut r = match not_found {
            Some(message) if named && self.answered == 0 => {
                status_response(404, &format!("{message} (in none of the {asked} clusters matching \"{pattern}\")"))
            }
            // A get by name that one cluster found is that object (with its
            // cluster annotation), as kubectl expects of a get by name: so
            // `logs` or `exec` go on to ask for the subresource, which
            // is then refused with a message that says what to do.
            _ if named && !self.table && self.parts.iter().filter(|(_, p)| !p.is_empty()).count() == 1 => {
                let (_, part) = self.parts.iter().find(|(_, p)| !p.is_empty()).expect("one part");
                let mut body = part.clone();
                body.push(b'\n');
                Response::new(200, "application/json", body)
            }
            _ => {
                let mut body = if self.table {
                    merge::table_head(self.columns.as_deref().unwrap_or(&[]))
                } else {
                    merge::list_head()
                };
                self.parts.sort_by(|a, b| a.0.cmp(&b.0));
                let mut first = true;
                for (_, part) in self.parts.iter().filter(|(_, p)| !p.is_empty()) {
                    if !first {
                        body.push(b',');
                    }
                    body.extend_from_slice(part);
                    first = false;
                }
                body.extend_from_slice(merge::TAIL);
                Response::new(200, "application/json", body)
            }
        };
        // On a get by name, "not found" is the expected answer of most clusters.
        let shown: Vec<&(String, Failure)> = self.failures.iter().filter(|(_, f)| !(named && f.code == 404)).collect();
        for (cluster, f) in shown.iter().take(MAX_WARNINGS) {
            r = r.with_header("Warning", warning(&format!("cluster {cluster}: {}: {}", f.reason, f.message)));
        }
        if shown.len() > MAX_WARNINGS {
            r = r.with_header(
                "Warning",
                warning(&format!(
                    "{} more clusters could not answer; the REST fleet query lists them all",
                    shown.len() - MAX_WARNINGS
                )),
            );
        }
        if asked == 0 {
            r = r.with_header(
                "Warning",
                warning(&format!(
                    "no cluster you may reach matches \"{pattern}\"; `uplink-hub cluster list` shows them"
                )),
            );
        }
        r
    }
}

/// A `Warning` field value (RFC 7234 §5.5, as the API server writes them:
/// code 299, agent `-`, quoted text), which kubectl prints on stderr.
pub fn warning(text: &str) -> String {
    let mut out = String::from("299 - \"");
    for c in text.chars().take(WARNING_CHARS) {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Serves `/api/v1/fleet/k8s/...?clusters=PATTERN` as NDJSON: a first
/// line naming the clusters asked, one line per cluster as it answers,
/// and a summary.
pub async fn rest(hub: &Rc<Hub>, req: &Request) -> Reply {
    let user = match api::authenticate(hub, req) {
        Ok(Some(u)) => u,
        Ok(None) => {
            return Reply::Send(api::error(401, "unauthorized", "send a hub token: Authorization: Bearer TOKEN"));
        }
        Err(api::AuthError::Refused(why)) => return Reply::Send(api::error(401, "unauthorized", &why)),
        Err(e) => return Reply::Send(api::error(503, "store_failed", &e.to_string())),
    };
    if req.method != "GET" {
        return Reply::Send(api::error(405, "method_not_allowed", READ_ONLY));
    }
    let params = super::http::query_params(req.target());
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let pattern = param("clusters").unwrap_or_else(|| "*".into());
    if !valid_pattern(&pattern) {
        return Reply::Send(api::error(
            400,
            "bad_request",
            "clusters= is a cluster name with '*' wildcards, e.g. edge-*",
        ));
    }
    let timeout = match param("fleetTimeout").map(|s| s.parse::<u64>()) {
        None => CLUSTER_TIMEOUT,
        Some(Ok(s)) if s > 0 && Duration::from_secs(s) <= MAX_TIMEOUT => Duration::from_secs(s),
        Some(_) => return Reply::Send(api::error(400, "bad_request", "fleetTimeout= is whole seconds, 1 to 60")),
    };
    let rest = req.target().strip_prefix(REST_PREFIX).unwrap_or("");
    let forward = match split_target(&format!("/k8s/clusters/fleet/{rest}")) {
        Ok((_, f)) => f,
        Err(why) => return Reply::Send(api::error(400, "bad_request", why)),
    };
    let (path, query) = forward.split_once('?').unwrap_or((&forward, ""));
    match classify(path) {
        Target::Read { .. } => {}
        Target::Discovery => {
            return Reply::Send(api::error(
                400,
                "bad_request",
                "name a resource to list or get, e.g. /api/v1/fleet/k8s/api/v1/nodes",
            ));
        }
        Target::Refused(what) => return Reply::Send(api::error(400, "bad_request", &format!("{READ_ONLY} ({what})"))),
    }
    let (query, watch) = rewrite_query(query, &["limit", "continue", "clusters", "fleetTimeout"]);
    if watch {
        return Reply::Send(api::error(400, "bad_request", "the fleet query does not watch; list again"));
    }
    if impersonation_refused(req).is_some() {
        return Reply::Send(api::error(403, "forbidden", "Impersonate-* headers are refused: the fleet asks as you"));
    }
    let targets = match targets(hub, &user, &pattern) {
        Ok(t) => t,
        Err(e) => return Reply::Send(api::error(503, "store_failed", &e)),
    };
    let table = wants_table(req);
    let path = if query.is_empty() { path.to_string() } else { format!("{path}?{query}") };
    let hub = hub.clone();
    // The answer streams from a task the body owns: a client that leaves
    // drops the body, which cancels the fan-out and its tunnel streams.
    let body = Body::stream(move |tx| async move {
        let ask = Ask { user: &user, path, accept: accept_for(table), timeout };
        let start = Instant::now();
        let names: Vec<&str> = targets.iter().map(|c| c.name.as_str()).collect();
        let first = json!({ "fleet": { "clusters": names, "path": ask.path, "pattern": pattern } });
        if tx.send(Ok(line(&first).into())).await.is_err() {
            return;
        }
        fan_out(&hub, &ask, &targets, async |rx| {
            let (mut answered, mut failed, mut items) = (0usize, 0usize, 0usize);
            while let Ok((cluster, outcome)) = rx.recv().await {
                let event = match outcome {
                    Outcome::Failed(f) => {
                        failed += 1;
                        json!({ "cluster": cluster, "error": { "reason": f.reason, "code": f.code, "message": f.message } })
                    }
                    Outcome::Answer { body, .. } => match merge::parse(&cluster, &body) {
                        Ok(Parsed::Table { columns, rows }) => {
                            answered += 1;
                            items += rows.len();
                            let mut all = vec![merge::cluster_column()];
                            all.extend(columns);
                            json!({ "cluster": cluster, "columnDefinitions": all, "rows": rows })
                        }
                        Ok(Parsed::Items(list)) => {
                            answered += 1;
                            items += list.len();
                            json!({ "cluster": cluster, "items": list })
                        }
                        Ok(Parsed::Object(o)) => {
                            answered += 1;
                            items += 1;
                            json!({ "cluster": cluster, "object": o })
                        }
                        Err(e) => {
                            failed += 1;
                            json!({ "cluster": cluster, "error": { "reason": "Unreadable", "code": 502, "message": e.to_string() } })
                        }
                    },
                };
                if tx.send(Ok(line(&event).into())).await.is_err() {
                    return;
                }
            }
            let summary = json!({ "summary": {
                "clusters": targets.len(), "answered": answered, "failed": failed, "items": items,
                "elapsed_ms": start.elapsed().as_millis() as u64,
            }});
            let _ = tx.send(Ok(line(&summary).into())).await;
        })
        .await;
    });
    let fields: &[(&[u8], &[u8])] = &[
        (b"Content-Type", b"application/x-ndjson"),
        (b"Cache-Control", b"no-store"),
        (b"X-Content-Type-Options", b"nosniff"),
    ];
    match super::http::streamed(200, fields, body) {
        Some(r) => Reply::Http(r),
        None => Reply::Send(api::error(500, "internal", "the answer could not be built")),
    }
}

fn line(v: &Value) -> Vec<u8> {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_classified() {
        for p in ["/api", "/apis", "/api/v1", "/apis/apps", "/apis/apps/v1", "/version", "/openapi/v3", "/"] {
            assert_eq!(classify(p), Target::Discovery, "{p}");
        }
        for p in ["/api/v1/nodes", "/api/v1/pods", "/api/v1/namespaces/default/pods", "/apis/apps/v1/deployments"] {
            assert_eq!(classify(p), Target::Read { named: false }, "{p}");
        }
        for p in ["/api/v1/nodes/n1", "/api/v1/namespaces/default", "/apis/apps/v1/namespaces/d/deployments/web"] {
            assert_eq!(classify(p), Target::Read { named: true }, "{p}");
        }
        for p in [
            "/api/v1/namespaces/d/pods/p/log",
            "/api/v1/namespaces/d/pods/p/exec",
            "/api/v1/nodes/n1/proxy",
            "/api/v1/watch/pods",
            "/healthz",
        ] {
            assert!(matches!(classify(p), Target::Refused(_)), "{p}");
        }
    }

    #[test]
    fn queries_lose_paging_and_show_watches() {
        assert_eq!(
            rewrite_query("labelSelector=app%3Dpos&limit=500&continue=x", &["limit", "continue"]),
            ("labelSelector=app%3Dpos".into(), false)
        );
        assert!(rewrite_query("watch=true&resourceVersion=1", &[]).1);
        assert!(!rewrite_query("watch=false", &[]).1);
    }

    #[test]
    fn warnings_are_quoted_strings() {
        assert_eq!(warning("cluster e: Forbidden: user \"a\\b\"\n"), r#"299 - "cluster e: Forbidden: user \"a\\b\" ""#);
        assert!(warning(&"x".repeat(1000)).len() < WARNING_CHARS + 10);
    }

    fn answer(v: Value) -> Outcome {
        Outcome::Answer { content_type: "application/json".into(), body: serde_json::to_vec(&v).unwrap() }
    }

    fn table_of(names: &[&str]) -> Value {
        json!({"kind": "Table", "columnDefinitions": [{"name": "Name"}],
               "rows": names.iter().map(|n| json!({"cells": [n]})).collect::<Vec<_>>()})
    }

    /// Rows in cluster order whatever the arrival order; failures warn;
    /// past the cap a cluster is left out with a warning, never silently.
    #[test]
    fn merged_tables_warn_and_keep_to_their_cap() {
        let mut m = Merged::new(true, 70);
        m.add("b", answer(table_of(&["b1"])));
        m.add("a", answer(table_of(&["a1", "a2"])));
        m.add("c", Outcome::Failed(Failure { reason: "Forbidden".into(), code: 403, message: "no \"pods\"".into() }));
        m.add("d", answer(table_of(&["d1", "d2", "d3"])));
        m.add("e", answer(json!({"kind": "PodList", "items": []})));
        let r = m.response(false, "*", 5);
        assert_eq!(r.status, 200);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        let firsts: Vec<&str> = v["rows"].as_array().unwrap().iter().map(|r| r["cells"][0].as_str().unwrap()).collect();
        assert_eq!(firsts, ["a", "a", "b"]);
        assert_eq!(v["columnDefinitions"][0]["name"], "Cluster");
        let warnings: Vec<&str> = r.headers.iter().filter(|(n, _)| n == "Warning").map(|(_, v)| v.as_str()).collect();
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(warnings[0].starts_with(r#"299 - "cluster c: Forbidden: no \"pods\""#), "{warnings:?}");
        assert!(warnings[1].contains("cluster d: TooLarge: left out"), "{warnings:?}");
        assert!(warnings[2].contains("cluster e: Unreadable: the cluster answered no Table"), "{warnings:?}");
    }

    /// A get by name: the one object where one cluster has it, 404 where
    /// none has, and the others' "not found" is no warning.
    #[test]
    fn gets_by_name() {
        let nf = || {
            Outcome::Failed(Failure { reason: "NotFound".into(), code: 404, message: "pods \"x\" not found".into() })
        };
        let mut m = Merged::new(false, MAX_MERGED);
        m.add("a", nf());
        m.add("b", answer(json!({"kind": "Pod", "metadata": {"name": "x"}})));
        let r = m.response(true, "*", 2);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            (v["kind"].as_str(), v["metadata"]["annotations"][merge::CLUSTER_ANNOTATION].as_str()),
            (Some("Pod"), Some("b"))
        );
        assert!(!r.headers.iter().any(|(n, _)| n == "Warning"));
        let mut m = Merged::new(false, MAX_MERGED);
        m.add("a", nf());
        m.add("b", Outcome::Failed(Failure { reason: "Timeout".into(), code: 504, message: "slow".into() }));
        let r = m.response(true, "shop-*", 2);
        assert_eq!(r.status, 404);
        assert!(String::from_utf8_lossy(&r.body).contains(r#"(in none of the 2 clusters matching \"shop-*\")"#));
        assert!(r.headers.iter().any(|(n, v)| n == "Warning" && v.contains("cluster b: Timeout")));
    }

    #[test]
    fn patterns() {
        assert!(valid_pattern("*") && valid_pattern("edge-*") && valid_pattern("edge-1"));
        assert!(!valid_pattern("") && !valid_pattern("Edge") && !valid_pattern("a/b") && !valid_pattern("a?"));
    }
}
