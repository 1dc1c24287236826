//! Asking many clusters the same read, as one person, a bounded number
//! at a time.
//!
//! ```text
//!  targets (sorted) ─► queue ─► CONCURRENCY workers ─┬─ ask(cluster) ─► channel ─► consumer
//!                                                    │   open stream {GET, identity}
//!                                                    │   head + body, within the timeout
//!                                                    └─ next cluster
//! ```
//!
//! Each answer (or failure) goes to the consumer as soon as it is
//! complete, in the order they arrive: a slow cluster holds one worker,
//! never the others. The channel holds at most [`CONCURRENCY`] answers,
//! so a slow consumer (client) slows the workers instead of growing the
//! hub's memory; each answer is capped at [`MAX_ANSWER`] bytes.
//!
//! Every request is audited per cluster, as the kube front end audits.
//!
//! Not here: which clusters (the caller picks), merging, HTTP framing.

use super::super::clock::now_ms;
use super::super::store::{AuditEntry, Cluster, User};
use super::super::{Hub, kube};
use crate::driver::StreamClosed;
use crate::proto::{Header, Identity, RequestHead};
use smol::future::FutureExt;
use std::cell::RefCell;
use std::time::{Duration, Instant};

/// Clusters asked at once by one fleet request.
pub const CONCURRENCY: usize = 32;

/// How long one cluster may take to answer in full.
pub const CLUSTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest answer taken from one cluster: a fleet view is for questions
/// across clusters, not for copying a big cluster's whole state.
pub const MAX_ANSWER: usize = 32 << 20;

/// One read to ask every cluster.
pub struct Ask<'a> {
    pub user: &'a User,
    /// Path and query, as the API server takes them.
    pub path: String,
    /// The `Accept` field sent to every cluster.
    pub accept: String,
    pub timeout: Duration,
}

/// Why a cluster did not answer with a 2xx.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// A Kubernetes `StatusReason` (`Forbidden`, `NotFound`, ...) or one of
    /// the hub's: `Disconnected`, `Timeout`, `TooLarge`, `Unreadable`.
    pub reason: String,
    /// The HTTP status the cluster answered, or the hub's equivalent.
    pub code: u16,
    /// In the cluster's words where it gave some.
    pub message: String,
}

/// What one cluster answered.
pub enum Outcome {
    /// A 2xx answer in full.
    Answer {
        content_type: String,
        body: Vec<u8>,
    },
    Failed(Failure),
}

fn failed(reason: &str, code: u16, message: String) -> Outcome {
    Outcome::Failed(Failure { reason: reason.into(), code, message })
}

/// Asks every cluster in `targets`, at most [`CONCURRENCY`] at a time,
/// and hands each `(cluster name, outcome)` to `consume` as it arrives;
/// the channel closes when every cluster has answered or failed.
/// Dropping the returned future cancels every request still in flight.
pub async fn fan_out<R>(
    hub: &Hub,
    ask: &Ask<'_>,
    targets: &[Cluster],
    consume: impl AsyncFnOnce(smol::channel::Receiver<(String, Outcome)>) -> R,
) -> R {
    let workers = CONCURRENCY.min(targets.len()).max(1);
    let (tx, rx) = smol::channel::bounded(workers);
    let queue = RefCell::new(targets.iter());
    let ex = smol::LocalExecutor::new();
    for _ in 0..workers {
        let tx = tx.clone();
        let queue = &queue;
        // Detached on an executor this function owns: the workers end
        // when the queue is empty, or are cancelled when it is dropped.
        ex.spawn(async move {
            loop {
                let next = queue.borrow_mut().next();
                let Some(cluster) = next else { break };
                let outcome = ask_one(hub, ask, cluster).await;
                if tx.send((cluster.name.clone(), outcome)).await.is_err() {
                    break;
                }
            }
        })
        .detach();
    }
    drop(tx);
    ex.run(consume(rx)).await
}

/// The groups to impersonate on `cluster`: only those its registration
/// lets the agent impersonate (as the kube front end does; asking for
/// more would fail the whole request there).
fn groups_for(user: &User, cluster: &Cluster) -> Vec<String> {
    if cluster.groups.is_empty() {
        user.groups.clone()
    } else {
        user.groups.iter().filter(|g| cluster.groups.iter().any(|c| c == *g || c == "*")).cloned().collect()
    }
}

/// Asks one cluster, within the timeout, and audits it.
pub async fn ask_one(hub: &Hub, ask: &Ask<'_>, cluster: &Cluster) -> Outcome {
    let start = Instant::now();
    let time = now_ms();
    let groups = groups_for(ask.user, cluster);
    let outcome = if !cluster.users.is_empty() && !cluster.users.iter().any(|u| *u == ask.user.name || u == "*") {
        failed(
            "Forbidden",
            403,
            format!(
                "cluster \"{}\" was registered to impersonate only [{}], not \"{}\"",
                cluster.name,
                cluster.users.join(", "),
                ask.user.name
            ),
        )
    } else {
        let head = RequestHead {
            method: "GET".into(),
            path: ask.path.clone(),
            headers: vec![Header::new("Accept", ask.accept.as_str()), Header::new("User-Agent", "uplink-hub-fleet")],
            identity: Identity { user: ask.user.name.clone(), groups: groups.clone(), uid: None, extra: Vec::new() },
        };
        let timeout = ask.timeout;
        request(hub, cluster, head)
            .or(async {
                smol::Timer::after(timeout).await;
                failed("Timeout", 504, format!("no answer within {}s", timeout.as_secs()))
            })
            .await
    };
    let (status, bytes) = match &outcome {
        Outcome::Answer { body, .. } => (200, body.len() as u64),
        Outcome::Failed(f) => (f.code, 0),
    };
    hub.metrics.record(&cluster.name, status, 0, bytes);
    let entry = AuditEntry {
        id: 0,
        time,
        user: ask.user.name.clone(),
        groups,
        cluster: cluster.name.clone(),
        method: "GET".into(),
        path: ask.path.clone(),
        status,
        bytes_in: 0,
        bytes_out: bytes,
        duration_ms: start.elapsed().as_millis() as u64,
        upgrade: false,
    };
    if let Err(e) = hub.store.append_audit(entry) {
        log::error!("audit write failed error={e}");
    }
    outcome
}

/// The request itself: stream, head, body up to [`MAX_ANSWER`].
async fn request(hub: &Hub, cluster: &Cluster, head: RequestHead) -> Outcome {
    let mut stream = match kube::open_stream(hub, &cluster.id, head.as_open()).await {
        Ok(s) => s,
        Err(None) => {
            return failed(
                "Disconnected",
                503,
                "not connected to uplink-hub: its agent is not running or cannot reach the hub".into(),
            );
        }
        Err(Some(e)) => return failed("ServiceUnavailable", 503, format!("could not take the request: {e}")),
    };
    stream.finish();
    let head = match stream.response_head().await {
        Ok(h) => h,
        Err(e) => return broken(&e),
    };
    let content_type = head
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(b"content-type"))
        .map(|h| String::from_utf8_lossy(&h.value).into_owned())
        .unwrap_or_else(|| "application/json".into());
    let mut body = Vec::new();
    loop {
        match stream.read_chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_ANSWER {
                    return failed(
                        "TooLarge",
                        507,
                        format!(
                            "the answer is over {} MiB; narrow it with a selector or a namespace",
                            MAX_ANSWER >> 20
                        ),
                    );
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return broken(&e),
        }
    }
    if (200..300).contains(&head.status) {
        return Outcome::Answer { content_type, body };
    }
    let (reason, message) = super::merge::status_message(&body)
        .unwrap_or_else(|| (String::new(), String::from_utf8_lossy(&body[..body.len().min(300)]).trim().to_string()));
    let reason = if reason.is_empty() { default_reason(head.status).to_string() } else { reason };
    failed(&reason, head.status, message)
}

fn broken(e: &StreamClosed) -> Outcome {
    failed("ServiceUnavailable", 503, format!("the request broke off: {e}"))
}

fn default_reason(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    }
}
