//! A small HTTP/1.1 server side: request heads (httparse), request bodies
//! (`Content-Length` or chunked, streamed), response heads and bodies.
//!
//! Hand-written because the hub needs exactly this and full control of
//! the byte stream: after a `101` the same connection becomes a tunnel or
//! a raw pipe, with whatever bytes were already read handed over
//! ([`Inbound`] reads its buffer first).
//!
//! Not here: routing, TLS, HTTP/2.

use super::limits::Pace;
use smol::Timer;
use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

/// Largest request head accepted (RFC 9110 §5.4 lets servers pick; kube
/// clients send a few KiB).
pub const MAX_HEAD: usize = 64 * 1024;

/// Longest chunk-size or trailer line.
const MAX_LINE: usize = 8 * 1024;

/// Most bytes handed out per body read.
pub const BODY_CHUNK: usize = 32 * 1024;

/// Why a request could not be read.
#[derive(Debug)]
pub enum HttpError {
    /// The bytes are not HTTP/1.x; the text says what is wrong.
    Malformed(&'static str),
    /// The head is larger than [`MAX_HEAD`].
    HeadTooLarge,
    /// The `Content-Length` cannot frame the body (RFC 9112 §6.3 item 5).
    ContentLength(crate::http::ContentLengthError),
    /// The connection failed or ended in the middle of a message.
    Io(io::Error),
    /// The client let a deadline pass (`crate::hub::limits`); the text
    /// names what it was sending.
    TimedOut(&'static str),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Malformed(m) => write!(f, "malformed request: {m}"),
            HttpError::HeadTooLarge => write!(f, "request head over {MAX_HEAD} bytes"),
            HttpError::ContentLength(e) => write!(f, "malformed request: {e} (RFC 9112 §6.3)"),
            HttpError::Io(e) => write!(f, "connection failed: {e}"),
            HttpError::TimedOut(what) => write!(f, "{what} not received in time"),
        }
    }
}

impl From<io::Error> for HttpError {
    fn from(e: io::Error) -> Self {
        HttpError::Io(e)
    }
}

/// A parsed request head.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The request target as sent (origin-form: path and query).
    pub target: String,
    /// `1` for HTTP/1.1, `0` for HTTP/1.0.
    pub minor: u8,
    /// Fields in the order sent, names as sent.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// How a message body is delimited (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice())
    }

    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok()).map(str::trim)
    }

    /// Whether a comma-separated field (e.g. `Connection`) lists `token`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        crate::http::has_token(&self.headers, name, token)
    }

    /// The body framing (RFC 9112 §6.1–6.3). A request with both
    /// Transfer-Encoding and Content-Length is refused (RFC 9112 §6.1
    /// lets a server treat it as an error, and it is the classic shape of
    /// request smuggling), as is any coding list other than exactly
    /// `chunked` (§6.3 item 4: 411 or 400 and close) and any
    /// Content-Length but one field of digits ([`crate::http::content_length`]).
    pub fn framing(&self) -> Result<Framing, HttpError> {
        let te = self.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"));
        let cl = crate::http::content_length(&self.headers).map_err(HttpError::ContentLength)?;
        match (te, cl) {
            (true, Some(_)) => {
                Err(HttpError::Malformed("both Transfer-Encoding and Content-Length (RFC 9112 §6.1): send one of them"))
            }
            (true, None) => {
                let mut codings = self
                    .headers
                    .iter()
                    .filter(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
                    .flat_map(|(_, v)| v.split(|&b| b == b','))
                    .map(<[u8]>::trim_ascii);
                match (codings.next(), codings.next()) {
                    (Some(c), None) if c.eq_ignore_ascii_case(b"chunked") => Ok(Framing::Chunked),
                    _ => Err(HttpError::Malformed("unsupported Transfer-Encoding: only `chunked` is accepted")),
                }
            }
            (false, n) => Ok(Framing::Length(n.unwrap_or(0))),
        }
    }

    /// Whether the client lets the connection stay open afterwards.
    pub fn keep_alive(&self) -> bool {
        if self.minor == 0 {
            self.has_token("connection", "keep-alive")
        } else {
            !self.has_token("connection", "close")
        }
    }

    /// The protocol the client asks to switch to, if it asks.
    pub fn upgrade(&self) -> Option<&str> {
        if self.has_token("connection", "upgrade") {
            self.header_str("upgrade").filter(|u| !u.is_empty())
        } else {
            None
        }
    }
}

/// Where a body is while it is being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyState {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers,
    Done,
}

impl From<Framing> for BodyState {
    fn from(f: Framing) -> Self {
        match f {
            Framing::Length(0) => BodyState::Done,
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::ChunkSize,
        }
    }
}

/// The reading side of a connection with its buffer. Reading it as
/// [`AsyncRead`] yields the buffered bytes first, so nothing read ahead
/// is lost when the connection changes protocol.
pub struct Inbound<R> {
    io: R,
    buf: Vec<u8>,
    start: usize,
    /// How bodies read into memory must progress; none: no deadline.
    pace: Option<Pace>,
    /// A body read failed (malformed, cut short, too slow): where this
    /// request ends is unknown, so no further body read is attempted and
    /// the connection cannot carry another request.
    body_failed: bool,
}

impl<R: AsyncRead + Unpin> Inbound<R> {
    pub fn new(io: R) -> Self {
        Inbound { io, buf: Vec::new(), start: 0, pace: None, body_failed: false }
    }

    /// Sets how bodies read with [`Inbound::read_body_to_end`] and
    /// [`Inbound::read_body_paced`] must progress. Streamed bodies
    /// ([`Inbound::read_body`]) are not affected.
    pub fn set_pace(&mut self, pace: Pace) {
        self.pace = Some(pace);
    }

    fn avail(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    /// Reads more bytes into the buffer; `Ok(0)` at end of stream.
    ///
    /// Cancel-safe: the kube front end races it against a response (to
    /// notice a client leaving), so a dropped call must leave the buffer
    /// as it was. Reading into a scratch array and appending after the
    /// read completes guarantees that.
    pub async fn fill(&mut self) -> io::Result<usize> {
        if self.start > 0 && self.start * 2 >= self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let mut scratch = [0u8; 16 * 1024];
        let n = self.io.read(&mut scratch).await?;
        self.buf.extend_from_slice(&scratch[..n]);
        Ok(n)
    }

    /// Buffered bytes not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Drops the empty lines a client may send between requests (RFC 9112
    /// §2.2); true if bytes of a request remain buffered.
    pub fn skip_empty_lines(&mut self) -> bool {
        while self.avail().starts_with(b"\r\n") {
            self.consume(2);
        }
        // A lone CR may be the first half of one more empty line.
        self.buffered() > 0 && self.avail() != b"\r"
    }

    /// Reads the next request head; `Ok(None)` when the peer closed the
    /// connection cleanly between requests.
    pub async fn read_head(&mut self) -> Result<Option<Request>, HttpError> {
        loop {
            // Tolerate stray CRLFs between requests (RFC 9112 §2.2).
            while self.avail().starts_with(b"\r\n") {
                self.consume(2);
            }
            if !self.avail().is_empty() {
                let mut fields = [httparse::EMPTY_HEADER; 128];
                let mut req = httparse::Request::new(&mut fields);
                match req.parse(self.avail()) {
                    Ok(httparse::Status::Complete(n)) => {
                        let head = Request {
                            method: req.method.unwrap_or_default().to_string(),
                            target: req.path.unwrap_or_default().to_string(),
                            minor: req.version.unwrap_or(1),
                            headers: req.headers.iter().map(|h| (h.name.to_string(), h.value.to_vec())).collect(),
                        };
                        self.consume(n);
                        return Ok(Some(head));
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
                    Err(_) => return Err(HttpError::Malformed("unparsable request head")),
                }
                if self.buffered() > MAX_HEAD {
                    return Err(HttpError::HeadTooLarge);
                }
            }
            if self.fill().await? == 0 {
                return if self.buffered() == 0 {
                    Ok(None)
                } else {
                    Err(HttpError::Io(io::ErrorKind::UnexpectedEof.into()))
                };
            }
        }
    }

    async fn read_line(&mut self) -> Result<String, HttpError> {
        loop {
            if let Some(i) = self.avail().windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.avail()[..i]).into_owned();
                self.consume(i + 2);
                return Ok(line);
            }
            if self.buffered() > MAX_LINE {
                return Err(HttpError::Malformed("chunk line too long"));
            }
            if self.fill().await? == 0 {
                return Err(HttpError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    async fn take_up_to(&mut self, n: u64) -> Result<Vec<u8>, HttpError> {
        if self.buffered() == 0 && self.fill().await? == 0 {
            return Err(HttpError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        let k = (self.buffered() as u64).min(n).min(BODY_CHUNK as u64) as usize;
        let out = self.avail()[..k].to_vec();
        self.consume(k);
        Ok(out)
    }

    /// The next piece of a request body, `Ok(None)` once it is complete.
    /// After one failure every later call fails at once.
    pub async fn read_body(&mut self, st: &mut BodyState) -> Result<Option<Vec<u8>>, HttpError> {
        if self.body_failed {
            return Err(HttpError::Malformed("the request body could not be read"));
        }
        let piece = self.next_body_piece(st).await;
        self.body_failed = piece.is_err();
        piece
    }

    async fn next_body_piece(&mut self, st: &mut BodyState) -> Result<Option<Vec<u8>>, HttpError> {
        loop {
            match *st {
                BodyState::Done => return Ok(None),
                BodyState::Length(n) => {
                    let chunk = self.take_up_to(n).await?;
                    let left = n - chunk.len() as u64;
                    *st = if left == 0 { BodyState::Done } else { BodyState::Length(left) };
                    return Ok(Some(chunk));
                }
                BodyState::ChunkSize => {
                    let line = self.read_line().await?;
                    let n = crate::http::chunk_size(line.as_bytes()).ok_or(HttpError::Malformed("bad chunk size"))?;
                    *st = if n == 0 { BodyState::Trailers } else { BodyState::ChunkData(n) };
                }
                BodyState::ChunkData(n) => {
                    let chunk = self.take_up_to(n).await?;
                    let left = n - chunk.len() as u64;
                    *st = if left == 0 { BodyState::ChunkDataEnd } else { BodyState::ChunkData(left) };
                    return Ok(Some(chunk));
                }
                BodyState::ChunkDataEnd => {
                    if !self.read_line().await?.is_empty() {
                        return Err(HttpError::Malformed("chunk data longer than its size"));
                    }
                    *st = BodyState::ChunkSize;
                }
                BodyState::Trailers => {
                    // Trailer fields are dropped (RFC 9112 §7.1.2 allows it).
                    if self.read_line().await?.is_empty() {
                        *st = BodyState::Done;
                    }
                }
            }
        }
    }

    /// The next piece of a body that is read into memory or skipped,
    /// under the connection's [`Pace`]: some bytes within `pace.stall`,
    /// the whole body within `pace.total` of `started`. Such bodies are
    /// small and are read before or without authentication (activation
    /// codes, REST JSON, what a refusal left unread), so a client that
    /// stops sending one must not hold the connection.
    pub async fn read_body_paced(
        &mut self,
        st: &mut BodyState,
        started: Instant,
    ) -> Result<Option<Vec<u8>>, HttpError> {
        let Some(pace) = self.pace else { return self.read_body(st).await };
        // Most small bodies are already buffered: no timer for them.
        if let Some(done) = smol::future::poll_once(self.read_body(st)).await {
            return done;
        }
        let at = (Instant::now() + pace.stall).min(started + pace.total);
        let piece = self
            .read_body(st)
            .or(async {
                Timer::at(at).await;
                Err(HttpError::TimedOut("request body"))
            })
            .await;
        self.body_failed |= piece.is_err();
        piece
    }

    /// Reads a whole small body of at most `limit` bytes, under the
    /// connection's pace (see [`Inbound::read_body_paced`]).
    pub async fn read_body_to_end(&mut self, st: &mut BodyState, limit: usize) -> Result<Vec<u8>, HttpError> {
        let started = Instant::now();
        let mut out = Vec::new();
        while let Some(chunk) = self.read_body_paced(st, started).await? {
            out.extend_from_slice(&chunk);
            if out.len() > limit {
                return Err(HttpError::Malformed("request body too large"));
            }
        }
        Ok(out)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Inbound<R> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.buffered() > 0 {
            let n = this.buffered().min(out.len());
            out[..n].copy_from_slice(&this.avail()[..n]);
            this.consume(n);
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut this.io).poll_read(cx, out)
    }
}

/// A reading half and a writing half used as one byte stream (the
/// tunnel session takes one).
pub struct Duplex<R, W> {
    pub r: R,
    pub w: W,
}

impl<R: AsyncRead + Unpin, W: Unpin> AsyncRead for Duplex<R, W> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().r).poll_read(cx, buf)
    }
}

impl<R: Unpin, W: AsyncWrite + Unpin> AsyncWrite for Duplex<R, W> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().w).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().w).poll_flush(cx)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().w).poll_close(cx)
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

/// Serializes a response head.
pub fn head_bytes<N: AsRef<[u8]>, V: AsRef<[u8]>>(status: u16, headers: &[(N, V)]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status)).into_bytes();
    for (n, v) in headers {
        out.extend_from_slice(n.as_ref());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_ref());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A complete response held in memory (API answers, errors).
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response { status, content_type, headers: Vec::new(), body: body.into() }
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

    /// Writes it; `head_only` for `HEAD` requests.
    pub async fn write<W: AsyncWrite + Unpin>(&self, w: &mut W, keep_alive: bool, head_only: bool) -> io::Result<()> {
        let mut fields: Vec<(&str, String)> = vec![
            ("Content-Type", self.content_type.to_string()),
            ("Content-Length", self.body.len().to_string()),
            ("X-Content-Type-Options", "nosniff".into()),
        ];
        // API answers are never cached; a handler may say otherwise.
        if !self.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("cache-control")) {
            fields.push(("Cache-Control", "no-store".into()));
        }
        if !keep_alive {
            fields.push(("Connection", "close".into()));
        }
        fields.extend(self.headers.iter().map(|(n, v)| (n.as_str(), v.clone())));
        let mut out = head_bytes(self.status, &fields);
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        w.write_all(&out).await?;
        w.flush().await
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

    #[test]
    fn chunked_bodies_and_heads() {
        smol::block_on(async {
            let raw: &[u8] = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nT: 1\r\n\r\nGET /y HTTP/1.1\r\n\r\nrest";
            let mut inb = Inbound::new(raw);
            let req = inb.read_head().await.unwrap().unwrap();
            assert_eq!(req.framing().unwrap(), Framing::Chunked);
            let mut st = BodyState::from(req.framing().unwrap());
            assert_eq!(inb.read_body_to_end(&mut st, 100).await.unwrap(), b"abcde");
            let req = inb.read_head().await.unwrap().unwrap();
            assert_eq!(req.target, "/y");
            let mut rest = Vec::new();
            inb.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, b"rest");
        });
    }

    #[test]
    fn a_failed_body_stays_failed() {
        smol::block_on(async {
            let mut inb = Inbound::new(&b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"[..]);
            let req = inb.read_head().await.unwrap().unwrap();
            let mut st = BodyState::from(req.framing().unwrap());
            assert!(matches!(inb.read_body_to_end(&mut st, 100).await, Err(HttpError::Io(_))));
            assert!(matches!(inb.read_body(&mut st).await, Err(HttpError::Malformed(_))));
            let mut done = BodyState::Done;
            assert!(inb.read_body(&mut done).await.is_err(), "where the request ends is unknown");
        });
    }

    #[test]
    fn empty_lines_between_requests_are_not_a_head() {
        for (raw, rest) in [(&b"\r\n\r\n"[..], false), (b"\r\n\r", false), (b"", false), (b"\r\nG", true)] {
            let mut inb = Inbound::new(&b""[..]);
            inb.buf = raw.to_vec();
            assert_eq!(inb.skip_empty_lines(), rest, "{raw:?}");
        }
    }

    #[test]
    fn framing_rules() {
        let req = |h: &[(&str, &str)]| Request {
            method: "POST".into(),
            target: "/".into(),
            minor: 1,
            headers: h.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect(),
        };
        assert!(req(&[("Content-Length", "1"), ("Transfer-Encoding", "chunked")]).framing().is_err());
        assert!(req(&[("Content-Length", "1"), ("Content-Length", "1")]).framing().is_err());
        assert!(req(&[("Transfer-Encoding", "gzip")]).framing().is_err());
        assert!(req(&[("Transfer-Encoding", "gzip, chunked")]).framing().is_err());
        assert!(req(&[("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")]).framing().is_err());
        assert_eq!(req(&[("Transfer-Encoding", " Chunked ")]).framing().unwrap(), Framing::Chunked);
        assert_eq!(req(&[("content-length", " 7 ")]).framing().unwrap(), Framing::Length(7));
        assert_eq!(req(&[]).framing().unwrap(), Framing::Length(0));
        for bad in ["+5", "5, 5", "-1", "0x5", "99999999999999999999", ""] {
            assert!(matches!(req(&[("Content-Length", bad)]).framing(), Err(HttpError::ContentLength(_))), "{bad:?}");
        }
        let e = req(&[("Content-Length", "+5")]).framing().unwrap_err().to_string();
        assert!(e.contains("digits only"), "{e}");
        assert_eq!(req(&[("Connection", "keep-alive, Upgrade"), ("Upgrade", "SPDY/3.1")]).upgrade(), Some("SPDY/3.1"));
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
