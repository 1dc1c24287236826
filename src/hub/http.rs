//! The request and response types every handler speaks, below both the
//! server (`server`, which drives hyper) and the handlers (`api`, `kube`,
//! `agents`, `console`, `fleet`, `oidc`), so neither imports the other.
//!
//! ```text
//!  hyper::Request ─► Request (head: method, target, fields, protocol)
//!                  + Incoming (body, paced reads; the upgrade, if any)
//!  handler ─► Reply ─┬─ Send(Response): an answer held in memory
//!                    └─ Http(hyper::Response<Body>): streamed (a kube
//!                       answer, NDJSON) or a 101 whose upgraded
//!                       connection a task already waits for
//! ```
//!
//! Bytes on the wire are hyper's (HTTP/1.1 and HTTP/2); what is uplink's
//! own policy stays here: the strict body framing of HTTP/1.1 requests
//! ([`Request::framing`]), the pace of small bodies read into memory, and
//! the fields every hub answer carries.
//!
//! Not here: routing, TLS, connection deadlines and caps.

use super::limits::Pace;
use crate::socket::Prefixed;
use bytes::Bytes;
use hyper::http;
use smol::Timer;
use smol::future::FutureExt;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

/// Why a request (or its body) could not be read.
#[derive(Debug)]
pub enum HttpError {
    /// The request is not acceptable HTTP; the text says what is wrong.
    Malformed(&'static str),
    /// The `Content-Length` cannot frame the body (RFC 9112 §6.3 item 5).
    ContentLength(crate::http::ContentLengthError),
    /// The connection or stream failed or ended in the middle of a body.
    Body(String),
    /// The client let a deadline pass (`crate::hub::limits`); the text
    /// names what it was sending.
    TimedOut(&'static str),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Malformed(m) => write!(f, "malformed request: {m}"),
            HttpError::ContentLength(e) => write!(f, "malformed request: {e} (RFC 9112 §6.3)"),
            HttpError::Body(e) => write!(f, "the request body could not be read: {e}"),
            HttpError::TimedOut(what) => write!(f, "{what} not received in time"),
        }
    }
}

/// The protocol a request came over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http10,
    Http11,
    H2,
}

impl Proto {
    /// The label in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Proto::Http10 | Proto::Http11 => "http/1.1",
            Proto::H2 => "h2",
        }
    }
}

/// A request head: hyper's parts, moved in rather than copied (a `String`
/// and a `Vec` per field cost a proxied request 2 allocations a field).
#[derive(Debug, Clone)]
pub struct Request {
    pub method: http::Method,
    uri: http::Uri,
    pub proto: Proto,
    /// Fields in the order received. Names are lower case (hyper's, and
    /// HTTP/2's own); compare them without case anyway.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl crate::http::Field for (http::HeaderName, http::HeaderValue) {
    fn name(&self) -> &[u8] {
        self.0.as_str().as_bytes()
    }
    fn value(&self) -> &[u8] {
        self.1.as_bytes()
    }
}

impl Request {
    /// The head of a hyper request.
    pub fn from_parts(parts: http::request::Parts) -> Request {
        let proto = match parts.version {
            http::Version::HTTP_2 => Proto::H2,
            http::Version::HTTP_10 | http::Version::HTTP_09 => Proto::Http10,
            _ => Proto::Http11,
        };
        let mut headers = Vec::with_capacity(parts.headers.len());
        // Each name comes once, before all of its values.
        let mut name: Option<http::HeaderName> = None;
        for (n, v) in parts.headers {
            if n.is_some() {
                name = n;
            }
            if let Some(n) = &name {
                headers.push((n.clone(), v));
            }
        }
        Request { method: parts.method, uri: parts.uri, proto, headers }
    }

    /// A head from its pieces (tests, and requests the hub makes up);
    /// `None` when one is not valid HTTP.
    pub fn new(method: &str, target: &str, proto: Proto, fields: &[(&str, &str)]) -> Option<Request> {
        let headers = fields
            .iter()
            .map(|(n, v)| {
                Some((http::HeaderName::from_bytes(n.as_bytes()).ok()?, http::HeaderValue::from_str(v).ok()?))
            })
            .collect::<Option<_>>()?;
        Some(Request {
            method: http::Method::from_bytes(method.as_bytes()).ok()?,
            uri: target.parse().ok()?,
            proto,
            headers,
        })
    }

    /// The request target (origin-form: path and query).
    pub fn target(&self) -> &str {
        self.uri.path_and_query().map_or("/", |p| p.as_str())
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n.as_str().eq_ignore_ascii_case(name)).map(|(_, v)| v.as_bytes())
    }

    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok()).map(str::trim)
    }

    /// Whether a comma-separated field (e.g. `Connection`) lists `token`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        crate::http::has_token(&self.headers, name, token)
    }

    /// Checks the body framing of an HTTP/1.x request (RFC 9112 §6.1–6.3)
    /// more strictly than hyper does, which collapses identical duplicate
    /// lengths and lets Transfer-Encoding override Content-Length. A
    /// request with both is refused (RFC 9112 §6.1 lets a server treat it
    /// as an error, and it is the classic shape of request smuggling), as
    /// is any coding list other than exactly `chunked` (§6.3 item 4) and
    /// any Content-Length but one field of digits
    /// ([`crate::http::content_length`]). HTTP/2 frames bodies itself
    /// (RFC 9113 §8.2.2 forbids Transfer-Encoding; h2 checks lengths).
    pub fn framing(&self) -> Result<(), HttpError> {
        if self.proto == Proto::H2 {
            return Ok(());
        }
        let te = self.headers.iter().any(|(n, _)| n == "transfer-encoding");
        let cl = crate::http::content_length(&self.headers).map_err(HttpError::ContentLength)?;
        match (te, cl) {
            (true, Some(_)) => {
                Err(HttpError::Malformed("both Transfer-Encoding and Content-Length (RFC 9112 §6.1): send one of them"))
            }
            (true, None) => {
                let mut codings = self
                    .headers
                    .iter()
                    .filter(|(n, _)| n == "transfer-encoding")
                    .flat_map(|(_, v)| v.as_bytes().split(|&b| b == b','))
                    .map(<[u8]>::trim_ascii);
                match (codings.next(), codings.next()) {
                    (Some(c), None) if c.eq_ignore_ascii_case(b"chunked") => Ok(()),
                    _ => Err(HttpError::Malformed("unsupported Transfer-Encoding: only `chunked` is accepted")),
                }
            }
            (false, _) => Ok(()),
        }
    }

    /// The protocol an HTTP/1.1 client asks to switch to, if it asks.
    pub fn upgrade(&self) -> Option<&str> {
        if self.proto != Proto::H2 && self.has_token("connection", "upgrade") {
            self.header_str("upgrade").filter(|u| !u.is_empty())
        } else {
            None
        }
    }
}

/// A request's body and, for an HTTP/1.1 upgrade, the connection it
/// becomes after the `101`.
pub struct Incoming {
    body: Option<hyper::body::Incoming>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// How bodies read into memory must progress.
    pace: Pace,
    /// A read failed (malformed, cut short, too slow).
    failed: bool,
}

impl Incoming {
    pub fn new(body: hyper::body::Incoming, upgrade: Option<hyper::upgrade::OnUpgrade>, pace: Pace) -> Self {
        Incoming { body: Some(body), upgrade, pace, failed: false }
    }

    /// Whether a body read failed: where the request ends is unknown.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// The upgraded connection, to await once the `101` is on its way.
    pub fn take_upgrade(&mut self) -> Option<hyper::upgrade::OnUpgrade> {
        self.upgrade.take()
    }

    /// The next piece of the body, `Ok(None)` once it is complete. No
    /// deadline: a proxied upload goes at the client's pace, bounded by
    /// flow control. After a failure every later call fails.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, HttpError> {
        loop {
            let Some(body) = self.body.as_mut() else { return Ok(None) };
            let frame = std::future::poll_fn(|cx| hyper::body::Body::poll_frame(Pin::new(&mut *body), cx)).await;
            match frame {
                None => {
                    self.body = None;
                    return Ok(None);
                }
                Some(Ok(f)) => {
                    // Trailers are dropped (RFC 9112 §7.1.2, RFC 9110 §6.5.1).
                    if let Ok(data) = f.into_data()
                        && !data.is_empty()
                    {
                        return Ok(Some(data));
                    }
                }
                Some(Err(e)) => {
                    self.body = None;
                    self.failed = true;
                    return Err(HttpError::Body(e.to_string()));
                }
            }
        }
    }

    /// Reads a whole small body of at most `limit` bytes: some bytes
    /// within `pace.stall`, all of it within `pace.total`. Such bodies
    /// are read before or without authentication (activation codes, REST
    /// JSON), so a client that stops sending one must not hold the hub.
    pub async fn read_to_end(&mut self, limit: usize) -> Result<Vec<u8>, HttpError> {
        let started = Instant::now();
        let mut out = Vec::new();
        loop {
            // Most small bodies are already buffered: no timer for them.
            let next = match smol::future::poll_once(self.chunk()).await {
                Some(next) => next,
                None => {
                    let at = (Instant::now() + self.pace.stall).min(started + self.pace.total);
                    let next = self
                        .chunk()
                        .or(async {
                            Timer::at(at).await;
                            Err(HttpError::TimedOut("request body"))
                        })
                        .await;
                    if next.is_err() {
                        self.body = None;
                        self.failed = true;
                    }
                    next
                }
            };
            match next? {
                Some(c) => {
                    out.extend_from_slice(&c);
                    if out.len() > limit {
                        self.failed = true;
                        return Err(HttpError::Malformed("request body too large"));
                    }
                }
                None => return Ok(out),
            }
        }
    }
}

/// A response body: whole, pulled from a source as hyper asks for it,
/// or fed by a task as the answer arrives.
pub enum Body {
    Full(Option<Bytes>),
    /// Pieces polled from the source when hyper is ready for them: no
    /// task and no channel between the two, so a piece that arrives
    /// wakes hyper's connection directly (a proxied answer cost a task
    /// spawn and a task wake-up per piece before). Dropped with the
    /// body, like a task. An `Err` aborts the answer, as below.
    Pull(Pin<Box<dyn smol::stream::Stream<Item = std::io::Result<Bytes>>>>),
    /// Pieces from a producer task. The task is owned here: when hyper
    /// drops the body (the client reset its HTTP/2 stream or closed its
    /// connection) the task is cancelled, and what it holds (a tunnel
    /// stream) is dropped and reset with it.
    Stream {
        rx: Pin<Box<smol::channel::Receiver<std::io::Result<Bytes>>>>,
        _task: smol::Task<()>,
    },
}

impl Body {
    pub fn empty() -> Body {
        Body::Full(None)
    }

    /// A body produced by `f`, which sends pieces into the channel it is
    /// given (at most one waits: backpressure reaches the producer). An
    /// error sent aborts the answer (HTTP/1.1: the connection closes;
    /// HTTP/2: the stream is reset), so a cut answer is never taken for
    /// a whole one.
    pub fn stream<F: std::future::Future<Output = ()> + 'static>(
        f: impl FnOnce(smol::channel::Sender<std::io::Result<Bytes>>) -> F,
    ) -> Body {
        let (tx, rx) = smol::channel::bounded(1);
        Body::Stream { rx: Box::pin(rx), _task: super::rt::spawn(f(tx)) }
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().filter(|b| !b.is_empty()).map(|b| Ok(hyper::body::Frame::data(b)))),
            Body::Stream { rx, .. } => {
                smol::stream::Stream::poll_next(rx.as_mut(), cx).map(|b| b.map(|b| b.map(hyper::body::Frame::data)))
            }
            Body::Pull(s) => s.as_mut().poll_next(cx).map(|b| b.map(|b| b.map(hyper::body::Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Body::Full(b) => hyper::body::SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Stream { .. } | Body::Pull(_) => hyper::body::SizeHint::default(),
        }
    }
}

/// What a handler answers.
pub enum Reply {
    /// A complete response held in memory.
    Send(Response),
    /// A response whose body streams, or a `101`.
    Http(hyper::Response<Body>),
}

impl From<Response> for Reply {
    fn from(r: Response) -> Reply {
        Reply::Send(r)
    }
}

impl Reply {
    pub fn into_hyper(self) -> hyper::Response<Body> {
        match self {
            Reply::Send(r) => r.into_hyper(),
            Reply::Http(r) => r,
        }
    }
}

/// Switches protocols: answers `101` with `fields`, and once hyper has
/// sent it and handed the connection over, runs `then` on the raw TLS
/// stream with the bytes already read past the request head. The
/// handler shape of every upgrade (`/v1/tunnel`, `/v1/peer`, kube exec and
/// port-forward): `then` owns the connection until it ends.
pub fn switch<F>(
    on: hyper::upgrade::OnUpgrade,
    fields: &[(&[u8], &[u8])],
    then: impl FnOnce(Upgraded) -> F + 'static,
) -> Option<Reply>
where
    F: std::future::Future<Output = ()> + 'static,
{
    let resp = streamed(101, fields, Body::empty())?;
    // Detached: the task owns the upgraded connection and ends with it;
    // if the 101 never leaves (the client went away), `on` fails at once.
    super::rt::spawn(async move {
        match on.await {
            Ok(up) => match up.downcast::<super::rt::Io<super::rt::Tls>>() {
                Ok(parts) => {
                    let mut tls = parts.io.into_inner();
                    // Raw bytes from here on, bulk as often as not; but a
                    // short read right after a wait took a whole burst (a
                    // tunnel's batch of frames, a keystroke), and the
                    // `recv` after it would find nothing: once per
                    // request at one client on a tunnel, as on the agent.
                    let socket = &mut tls.get_mut().0;
                    socket.short_reads_drain(false);
                    socket.short_reads_after_wait_drain(true);
                    then(Prefixed::new(parts.read_buf.into(), tls)).await
                }
                Err(_) => log::error!("an upgraded connection was not the hub's TLS stream"),
            },
            Err(e) => log::debug!("upgrade not completed error={e}"),
        }
    })
    .detach();
    Some(Reply::Http(resp))
}

/// A connection after `101`: the TLS stream, the bytes hyper read past
/// the request head first.
pub type Upgraded = Prefixed<super::rt::Tls>;

/// A response head whose body streams: `fields` as given, names checked.
pub fn streamed(status: u16, fields: &[(&[u8], &[u8])], body: Body) -> Option<hyper::Response<Body>> {
    let mut b = hyper::Response::builder().status(status);
    for (n, v) in fields {
        b = b.header(http::HeaderName::from_bytes(n).ok()?, http::HeaderValue::from_bytes(v).ok()?);
    }
    b.body(body).ok()
}

/// [`streamed`] for fields the caller owns (a proxied answer's): each
/// value moves into hyper's map without a copy, and the map is sized
/// once (through the builder, each field moved the whole head and the
/// map grew step by step; this way a proxied request costs the hub
/// about 4 % fewer instructions). `then` is appended after them: fields
/// of the hub's own, constants that cost no allocation.
pub fn streamed_owned<const N: usize>(
    status: u16,
    fields: Vec<crate::proto::Header>,
    then: [(http::HeaderName, http::HeaderValue); N],
    body: Body,
) -> Option<hyper::Response<Body>> {
    let mut r = hyper::Response::new(body);
    *r.status_mut() = http::StatusCode::from_u16(status).ok()?;
    let map = r.headers_mut();
    map.reserve(fields.len() + N);
    for h in fields {
        let name = http::HeaderName::from_bytes(&h.name).ok()?;
        map.append(name, http::HeaderValue::from_maybe_shared(Bytes::from(h.value)).ok()?);
    }
    for (name, value) in then {
        map.append(name, value);
    }
    Some(r)
}

/// A complete response held in memory (API answers, errors).
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: std::borrow::Cow<'static, str>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response { status, content_type: content_type.into(), headers: Vec::new(), body: body.into() }
    }

    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
        body.push(b'\n');
        Response::new(status, "application/json", body)
    }

    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    /// The fields every hub answer carries, then the handler's own.
    fn fields(&self) -> Vec<(&str, String)> {
        let mut fields: Vec<(&str, String)> =
            vec![("Content-Type", self.content_type.to_string()), ("X-Content-Type-Options", "nosniff".into())];
        // API answers are never cached; a handler may say otherwise.
        if !self.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("cache-control")) {
            fields.push(("Cache-Control", "no-store".into()));
        }
        fields.extend(self.headers.iter().map(|(n, v)| (n.as_str(), v.clone())));
        fields
    }

    /// As hyper's response (which adds `Content-Length`, and leaves the
    /// body out for `HEAD`). A field hyper cannot carry (a value with a
    /// control character) is dropped with a log line rather than sent.
    pub fn into_hyper(self) -> hyper::Response<Body> {
        let mut b = hyper::Response::builder().status(self.status);
        for (n, v) in self.fields() {
            match http::HeaderValue::from_str(&v) {
                Ok(v) => b = b.header(n, v),
                Err(_) => log::warn!("response field dropped name={n}: its value is not a valid field value"),
            }
        }
        b.body(Body::Full(Some(Bytes::from(self.body)))).unwrap_or_else(|e| {
            log::error!("response not built error={e}");
            let mut r = hyper::Response::new(Body::empty());
            *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            r
        })
    }

    /// The response as HTTP/1.1 bytes, for the one answer written before
    /// any request is read (a connection over a cap gets its 503 so).
    pub fn h1_bytes(&self) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status)).into_bytes();
        let mut fields = self.fields();
        fields.push(("Content-Length", self.body.len().to_string()));
        fields.push(("Connection", "close".into()));
        for (n, v) in fields {
            out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

/// Splits a request target into decoded query parameters.
pub fn query_params(target: &str) -> Vec<(String, String)> {
    let Some((_, q)) = target.split_once('?') else { return Vec::new() };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (form_decode(k), form_decode(v))
        })
        .collect()
}

/// Decodes `%XX` and `+` (form encoding); invalid escapes are kept as is.
pub fn form_decode(s: &str) -> String {
    crate::http::percent_decode(&s.replace('+', " "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(h: &[(&str, &str)]) -> Request {
        Request::new("POST", "/", Proto::Http11, h).unwrap()
    }

    #[test]
    fn framing_rules() {
        assert!(req(&[("Content-Length", "1"), ("Transfer-Encoding", "chunked")]).framing().is_err());
        assert!(req(&[("Content-Length", "1"), ("Content-Length", "1")]).framing().is_err());
        assert!(req(&[("Transfer-Encoding", "gzip")]).framing().is_err());
        assert!(req(&[("Transfer-Encoding", "gzip, chunked")]).framing().is_err());
        assert!(req(&[("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")]).framing().is_err());
        assert!(req(&[("Transfer-Encoding", " Chunked ")]).framing().is_ok());
        assert!(req(&[("content-length", " 7 ")]).framing().is_ok());
        assert!(req(&[]).framing().is_ok());
        for bad in ["+5", "5, 5", "-1", "0x5", "99999999999999999999", ""] {
            assert!(matches!(req(&[("Content-Length", bad)]).framing(), Err(HttpError::ContentLength(_))), "{bad:?}");
        }
        let e = req(&[("Content-Length", "+5")]).framing().unwrap_err().to_string();
        assert!(e.contains("digits only"), "{e}");
        assert_eq!(req(&[("Connection", "keep-alive, Upgrade"), ("Upgrade", "SPDY/3.1")]).upgrade(), Some("SPDY/3.1"));
        let mut h2 = req(&[("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"), ("Content-Length", "1, 1")]);
        h2.proto = Proto::H2;
        assert_eq!(h2.upgrade(), None, "no HTTP/1.1 upgrade over h2");
        assert!(h2.framing().is_ok(), "h2 frames its own bodies");
    }

    #[test]
    fn query() {
        assert_eq!(
            query_params("/a?user=al%20ice&x&since=2026-01-01T00:00:00Z"),
            vec![
                ("user".into(), "al ice".into()),
                ("x".into(), "".into()),
                ("since".into(), "2026-01-01T00:00:00Z".into())
            ]
        );
        assert_eq!(form_decode("%zz%4"), "%zz%4");
    }
}
