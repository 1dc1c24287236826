//! One tunnel stream → one exchange with the API server.
//!
//! ```text
//!  hub ── Open{head, identity} ──► policy (headers.rs) ──refused──► Head 403 + Status JSON, End
//!                                      │ ok
//!                                      ▼
//!            pool connection ◄── request head, body streamed from Data frames
//!                                      │
//!           response head ───► Head{status, headers}
//!           body pieces   ───► Data (waits for tunnel credit: a slow
//!                                     reader slows the API-server read)
//!           end of body   ───► End; connection back to the pool
//!           101           ───► raw bytes both ways, half-close each way
//! ```
//!
//! A reset from the hub (the person went away) is noticed even while the
//! API server is silent (an idle watch), and the connection is dropped.
//!
//! Deadlines: connecting (TCP, TLS) has [`net::dial_timeout`]; the
//! response head has [`net::response_timeout`], after which the person
//! gets `504` naming the API server as the hop that timed out. A streaming
//! body (watch, `logs -f`) is never cut for being quiet; any other body
//! that stops for that long is reset (the hub then cuts its answer short).

use super::super::AgentCtx;
use super::super::http1::{self, BodyKind, BodyReader, Conn};
use super::super::net;
use super::headers::{self, Refusal};
use crate::driver::{Relayed, Stream, StreamClosed};
use crate::proto::{Header, RequestHead, ResetCode, ResponseHead};
use smol::future::FutureExt as _;
use smol::io::{AsyncReadExt as _, AsyncWriteExt as _};
use std::io;
use std::rc::Rc;
use std::time::Duration;

/// How long to wait for the hub's `End` after the answer went out.
const DRAIN_WAIT: Duration = Duration::from_secs(5);

enum Failure {
    /// Refused by policy: answered with this status and message.
    Refused(u16, &'static str, String),
    /// The API server could not be reached or broke off before a head.
    Upstream(String),
    /// The API server answered with a head that cannot be read safely
    /// ([`http1::MalformedResponse`]): `502`, and its connection dropped.
    BadGateway(String),
    /// The API server took longer than its deadline to answer.
    UpstreamTimeout(String),
    /// The API server broke off after the head went out.
    UpstreamAfterHead(String),
    /// The tunnel stream is gone.
    Tunnel(StreamClosed),
}

impl From<StreamClosed> for Failure {
    fn from(e: StreamClosed) -> Self {
        Failure::Tunnel(e)
    }
}

/// Serves one stream to its end. Never panics on peer input; every
/// outcome is counted in the metrics.
pub async fn serve(ctx: Rc<AgentCtx>, mut stream: Stream, head: RequestHead) {
    let _active = ctx.metrics.stream_started();
    let started = std::time::Instant::now();
    let status = match forward(&ctx, &mut stream, &head).await {
        Ok(Outcome::Done(status)) => status,
        Ok(Outcome::Upgraded(conn)) => {
            ctx.metrics.request_done(101);
            splice(&ctx, stream, conn).await;
            return;
        }
        Err(Failure::Refused(code, reason, message)) => {
            log::info!(
                "refused {} {} for user {:?}: {message}",
                head.method,
                path_only(&head.path),
                head.identity.user
            );
            let _ = send_status(&mut stream, code, reason, &message).await;
            code
        }
        Err(Failure::Upstream(message)) => {
            log::warn!("{} {}: API server unreachable: {message}", head.method, path_only(&head.path));
            let _ = send_status(
                &mut stream,
                503,
                "ServiceUnavailable",
                &format!("the agent could not reach the API server: {message}"),
            )
            .await;
            503
        }
        Err(Failure::BadGateway(message)) => {
            log::warn!("{} {}: malformed API-server response: {message}", head.method, path_only(&head.path));
            let _ = send_status(
                &mut stream,
                502,
                "InternalError",
                &format!("the agent could not read the API server's answer: {message}"),
            )
            .await;
            502
        }
        Err(Failure::UpstreamTimeout(message)) => {
            log::warn!("{} {}: API server too slow: {message}", head.method, path_only(&head.path));
            let _ = send_status(
                &mut stream,
                504,
                "Timeout",
                &format!("uplink agent → API server {}: {message}", ctx.kube.pool.target),
            )
            .await;
            504
        }
        Err(Failure::UpstreamAfterHead(message)) => {
            log::warn!("{} {}: API server broke off: {message}", head.method, path_only(&head.path));
            stream.reset(ResetCode::Upstream, &message);
            0
        }
        Err(Failure::Tunnel(e)) => {
            log::debug!("{} {}: stream ended early: {e}", head.method, path_only(&head.path));
            0
        }
    };
    ctx.metrics.request_done(status);
    log::debug!(
        "{} {} as {:?}: {status} in {} ms",
        head.method,
        path_only(&head.path),
        head.identity.user,
        started.elapsed().as_millis()
    );
}

/// The path without its query (queries may carry names worth not logging
/// at info level, never secrets, but keep lines short).
fn path_only(p: &str) -> &str {
    p.split('?').next().unwrap_or(p)
}

/// How the request body travels to the API server.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ReqBody {
    None,
    Length(u64),
    Chunked,
}

fn request_body(head: &RequestHead, upgrade: bool) -> Result<ReqBody, Failure> {
    if upgrade {
        return Ok(ReqBody::None);
    }
    // The hub checked the framing already; the agent checks again, since
    // it forwards `Content-Length` as it is and must not frame a body
    // differently from the API server (RFC 9112 §6.1, §6.3).
    let length = crate::http::content_length(&head.headers).map_err(|e| {
        Failure::Refused(400, "BadRequest", format!("uplink agent refused the request: {e} (RFC 9112 §6.3)"))
    })?;
    let chunked = crate::http::has_token(&head.headers, "transfer-encoding", "chunked");
    if let Some(n) = length {
        if crate::http::find(&head.headers, "transfer-encoding").is_some() {
            return Err(Failure::Refused(
                400,
                "BadRequest",
                "uplink agent refused the request: both Transfer-Encoding and Content-Length (RFC 9112 §6.1)".into(),
            ));
        }
        return Ok(ReqBody::Length(n));
    }
    if chunked || matches!(head.method.as_str(), "POST" | "PUT" | "PATCH") {
        Ok(ReqBody::Chunked)
    } else {
        Ok(ReqBody::None)
    }
}

/// How an exchange ended well.
enum Outcome {
    /// Answered with this status.
    Done(u16),
    /// `101`: the head went out; the connection is now a byte pipe.
    Upgraded(Conn),
}

async fn forward(ctx: &AgentCtx, stream: &mut Stream, head: &RequestHead) -> Result<Outcome, Failure> {
    let pool = &ctx.kube.pool;
    let upgrade = headers::is_upgrade(&head.headers);
    // The head for the API server, written field by field as the policy
    // passes them: no copy of each field first.
    let mut wire_head = Vec::with_capacity(
        512 + head.path.len() + head.headers.iter().map(|h| h.name.len() + h.value.len() + 4).sum::<usize>(),
    );
    let checked = ctx.kube.with_authorization(|auth| {
        headers::check_request_line(&head.method, &head.path)
            .map_err(|r| Failure::Refused(400, "BadRequest", r.to_string()))?;
        http1::start_request_head(&mut wire_head, &head.method, &head.path, pool.authority());
        let fields = |n: &[u8], v: &[u8]| http1::push_field(&mut wire_head, n, v);
        headers::request_fields(&head.headers, &head.identity, &ctx.allow, auth, fields).map_err(|r| {
            let code = if matches!(r, Refusal::BadField(_) | Refusal::BadName(_)) { 400 } else { 403 };
            Failure::Refused(code, if code == 400 { "BadRequest" } else { "Forbidden" }, r.to_string())
        })
    });
    checked.map_err(|e| Failure::Upstream(format!("cannot read the agent's token: {e}")))??;
    let body = request_body(head, upgrade)?;
    if body == ReqBody::Chunked {
        http1::push_field(&mut wire_head, b"Transfer-Encoding", b"chunked");
    }
    wire_head.extend_from_slice(b"\r\n");
    let head_request = head.method == "HEAD";

    // Send the head (and body), read the answer's head. A pooled
    // connection the server closed meanwhile fails here; a bodiless
    // request is then retried once on a fresh connection. The answer's
    // head goes to the hub as it is read, its fields encoded into the
    // tunnel frame from the connection's buffer.
    let send_head = |stream: &mut Stream, info: &http1::HeadInfo, fields: &[httparse::Header<'_>]| {
        if info.status == 101 && !upgrade {
            return Err(Failure::Upstream("API server switched protocols without being asked".into()));
        }
        stream
            .send_head_fields(info.status, headers::response_fields(info.status, fields))
            .map_err(|e| Failure::Tunnel(StreamClosed::Reset { code: ResetCode::Internal, message: e.to_string() }))
    };
    // A bodiless read is retried below if the connection turns out stale,
    // so a just-used one is taken without the liveness check. Not a
    // DELETE or a bodiless POST (an exec): a faulty server's stray bytes
    // read as its answer would have it made twice, the first one done
    // and the second answered 404.
    let safe = matches!(head.method.as_str(), "GET" | "HEAD" | "OPTIONS");
    let got = if body == ReqBody::None && safe { pool.get_replayable().await } else { pool.get().await };
    let (mut conn, mut reused) = got.map_err(upstream)?;
    let resp = loop {
        let attempt = async {
            conn.write_all(&wire_head).await.map_err(|e| (Failure::Upstream(e.to_string()), true))?;
            send_body(ctx, stream, &mut conn, body).await.map_err(|f| (f, false))?;
            let limit = net::response_timeout();
            let read = conn.read_head_with(head_request, |info, fields| send_head(stream, info, fields));
            net::deadline(limit, || "waiting for the response head".into(), read).await.map_err(|e| {
                // A malformed answer is not a stale pooled connection:
                // `conn` is dropped with it, never pooled, and it is
                // asked again elsewhere only when it had no readable head
                // and the request is a read. On a reused connection that
                // garbage may be the stray tail of an earlier faulty
                // answer; a read asked twice does no harm, where a DELETE
                // would be done twice.
                if http1::is_malformed(&e) {
                    (Failure::BadGateway(e.to_string()), safe && http1::is_unreadable_start(&e))
                } else {
                    (upstream(e), true)
                }
            })
        };
        match attempt.await {
            Ok((info, sent)) => {
                sent?;
                break info;
            }
            Err((Failure::Upstream(e) | Failure::BadGateway(e), true)) if reused && body == ReqBody::None => {
                log::debug!("pooled API-server connection failed ({e}); retrying on a fresh one");
                conn = pool.connect().await.map_err(upstream)?;
                reused = false;
            }
            Err((f, _)) => return Err(f),
        }
    };

    let status = resp.status;
    if status == 101 {
        return Ok(Outcome::Upgraded(conn));
    }
    let mut reader = BodyReader::new(resp.body);
    // A body that stops for the response deadline is a wedged server,
    // unless the request asked for a stream (watch, logs -f) whose silence
    // is normal. One timer for the whole body, moved on only when it goes
    // off (moving it per piece would cost work each), and on the thread's
    // shared timer (net::Expiry: a timer of its own costs a reactor
    // wake-up).
    let stall_limit = net::response_timeout();
    let streaming = crate::http::is_kube_stream(&head.path);
    let last_piece = std::cell::Cell::new(std::time::Instant::now());
    let mut stall = net::Expiry::after(stall_limit);
    loop {
        let stalled = async {
            if streaming {
                return std::future::pending().await;
            }
            loop {
                (&mut stall).await;
                let quiet = last_piece.get().elapsed();
                if quiet >= stall_limit {
                    return Failure::UpstreamAfterHead(format!(
                        "the API server sent no byte of the body for {quiet:?}"
                    ));
                }
                stall = net::Expiry::at(last_piece.get() + stall_limit);
            }
        };
        if let Some(max) = reader.raw_room(&conn) {
            // Nothing buffered and no framing next: the API server's bytes
            // are read straight into the stream's send queue, a copy of
            // each saved (the head's read brought the first ones, which
            // take the path below).
            let relayed = async { stream.send_from(conn.io_mut(), max).await.map_err(Failure::Tunnel) }
                .or(async { Err(stalled.await) })
                .await?;
            match relayed {
                // Waiting for the tunnel, not the API server: outside the
                // stall deadline, as `write_all` below.
                Relayed::Full => stream.writable().await?,
                Relayed::Read(Ok(n)) => {
                    last_piece.set(std::time::Instant::now());
                    reader.raw_read(&mut conn, n).map_err(|e| Failure::UpstreamAfterHead(e.to_string()))?;
                    ctx.metrics.add_to_hub(n);
                }
                Relayed::Read(Err(e)) => return Err(Failure::UpstreamAfterHead(e.to_string())),
            }
            continue;
        }
        let (r, c) = (&mut reader, &mut conn);
        let piece = async move { Ok(r.next(c).await) }
            .or(async { Err(Failure::Tunnel(stream.closed().await)) })
            .or(async { Err(stalled.await) })
            .await?;
        last_piece.set(std::time::Instant::now());
        match piece {
            Ok(Some(data)) => {
                ctx.metrics.add_to_hub(data.len());
                stream.write_all(data).await?;
            }
            Ok(None) => break,
            Err(e) => return Err(Failure::UpstreamAfterHead(e.to_string())),
        }
    }
    stream.finish();
    conn.mark_reusable(reader.allows_reuse() && !resp.close && resp.body != BodyKind::Close);
    conn.recheck_before_reuse(resp.body == BodyKind::None);
    pool.put(conn);
    if body == ReqBody::None {
        // Let the hub's End arrive so the stream closes cleanly instead of
        // being reset when this handle drops.
        let drain = async { while let Ok(Some(_)) = stream.read_chunk().await {} };
        drain
            .or(async {
                net::Expiry::after(DRAIN_WAIT).await;
            })
            .await;
    }
    Ok(Outcome::Done(status))
}

/// A failure to reach the API server, a deadline kept apart.
fn upstream(e: io::Error) -> Failure {
    if e.kind() == io::ErrorKind::TimedOut {
        Failure::UpstreamTimeout(e.to_string())
    } else {
        Failure::Upstream(e.to_string())
    }
}

/// Copies the request body from the tunnel to the API server.
async fn send_body(ctx: &AgentCtx, stream: &mut Stream, conn: &mut Conn, body: ReqBody) -> Result<(), Failure> {
    match body {
        ReqBody::None => Ok(()),
        ReqBody::Length(mut left) => {
            while left > 0 {
                let Some(data) = stream.read_chunk().await? else {
                    return Err(Failure::Refused(
                        400,
                        "BadRequest",
                        "request body shorter than its Content-Length".into(),
                    ));
                };
                let take = (data.len() as u64).min(left) as usize;
                ctx.metrics.add_to_cluster(take);
                conn.write_all(&data[..take]).await.map_err(|e| Failure::Upstream(e.to_string()))?;
                left -= take as u64;
            }
            Ok(())
        }
        ReqBody::Chunked => {
            while let Some(data) = stream.read_chunk().await? {
                if data.is_empty() {
                    continue;
                }
                ctx.metrics.add_to_cluster(data.len());
                conn.write_all(&crate::http::chunk(&data)).await.map_err(|e| Failure::Upstream(e.to_string()))?;
            }
            conn.write_all(crate::http::LAST_CHUNK).await.map_err(|e| Failure::Upstream(e.to_string()))
        }
    }
}

/// After a `101`: bytes both ways until both directions have ended. When
/// one side ends its direction, the other side's write half is closed
/// (tunnel `End`, or TLS close_notify + TCP shutdown), and the other
/// direction keeps flowing.
async fn splice(ctx: &AgentCtx, stream: Stream, conn: Conn) {
    let (io, leftover) = conn.into_parts();
    let (mut from_hub, mut to_hub) = smol::io::split(stream);
    let (mut from_cluster, mut to_cluster) = smol::io::split(io);
    let up = async {
        if !leftover.is_empty() {
            ctx.metrics.add_to_hub(leftover.len());
            to_hub.write_all(&leftover).await?;
        }
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = from_cluster.read(&mut buf).await?;
            if n == 0 {
                to_hub.close().await?;
                return Ok::<_, io::Error>(());
            }
            ctx.metrics.add_to_hub(n);
            to_hub.write_all(&buf[..n]).await?;
        }
    };
    let down = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = from_hub.read(&mut buf).await?;
            if n == 0 {
                to_cluster.close().await?;
                return Ok::<_, io::Error>(());
            }
            ctx.metrics.add_to_cluster(n);
            to_cluster.write_all(&buf[..n]).await?;
            to_cluster.flush().await?;
        }
    };
    if let Err(e) = smol::future::try_zip(up, down).await {
        // Dropping the halves resets the tunnel stream if it is still live.
        log::debug!("upgraded stream ended: {e}");
    }
}

/// Answers with a Kubernetes `Status` object, as the API server would.
async fn send_status(stream: &mut Stream, code: u16, reason: &str, message: &str) -> Result<(), StreamClosed> {
    let body = crate::kube_status::failure(code, reason, message).to_string().into_bytes();
    let head = ResponseHead {
        status: code,
        headers: vec![
            Header::new("Content-Type", "application/json"),
            Header::new("Content-Length", body.len().to_string()),
        ],
    };
    stream.send_head(head).map_err(|e| StreamClosed::Reset { code: ResetCode::Internal, message: e.to_string() })?;
    stream.write_all(&body).await?;
    stream.finish();
    Ok(())
}
