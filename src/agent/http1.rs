//! A small HTTP/1.1 client: request heads out, response heads in (parsed
//! with httparse), bodies framed by `Content-Length`, chunked coding or
//! connection close (RFC 9112 §6), and a bounded keep-alive pool.
//!
//! It serves three callers: the kube proxy (streaming both ways), the
//! agent's own API calls (state Secret, version, nodes) and the hub calls
//! (activation, tunnel upgrade). Bodies are handed out chunk by chunk as
//! they arrive, so a caller can forward them without buffering.
//!
//! Not here: redirects, cookies, compression, HTTP/2.

use super::net::{self, Io, Proxy, Target};
use crate::http::{Field, chunk_size, find as find_header, has_token};
use crate::proto::Header;
use rustls::ClientConfig;
use smol::io::{AsyncReadExt as _, AsyncWriteExt as _};
use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest response head accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// Bytes asked of the socket per read while data streams in.
const READ_CHUNK: usize = 32 * 1024;
/// Bytes asked of the socket when it has been quiet: room for a typical
/// small answer (a `kubectl get` of a few objects) in one read, so such
/// answers never grow the buffer.
const SMALL_READ: usize = 4 * 1024;
/// Longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 8 * 1024;

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// How a message body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// No body (HEAD, 1xx, 204, 304, or a request without one).
    None,
    Length(u64),
    Chunked,
    /// Until the server closes the connection.
    Close,
}

/// A parsed response head.
#[derive(Clone, Debug)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: Vec<Header>,
    pub body: BodyKind,
    /// The server asked to close the connection after this response.
    pub close: bool,
}

/// What a response head says beside its fields.
#[derive(Clone, Copy, Debug)]
pub struct HeadInfo {
    pub status: u16,
    pub body: BodyKind,
    /// The server asked to close the connection after this response.
    pub close: bool,
}

/// httparse's view of a field, borrowed from the read buffer.
impl Field for httparse::Header<'_> {
    fn name(&self) -> &[u8] {
        self.name.as_bytes()
    }
    fn value(&self) -> &[u8] {
        self.value
    }
}

impl ResponseHead {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        find_header(&self.headers, name)
    }
}

/// One connection to a server, with its read buffer.
pub struct Conn {
    io: Io,
    /// Read buffer: `buf[pos..end]` holds bytes not yet consumed.
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// Set when a response was read completely and the server keeps the
    /// connection open: it may go back to the pool.
    reusable: bool,
    idle_since: Instant,
    /// The last read filled its buffer: more is probably waiting.
    big_reads: bool,
    /// The last answer had no body by the rules (HEAD, 204, 304), which a
    /// faulty server may send anyway: the next reuse checks for stray
    /// bytes even when it could skip the check ([`Pool::get_replayable`]).
    recheck: bool,
}

impl Conn {
    pub fn new(io: Io) -> Self {
        Conn {
            io,
            buf: Vec::new(),
            pos: 0,
            end: 0,
            reusable: false,
            idle_since: Instant::now(),
            big_reads: false,
            recheck: false,
        }
    }

    /// The socket, for a body read straight to where it goes (see
    /// [`BodyReader::raw_room`]); reading past the body through it would
    /// lose the next answer's bytes.
    pub fn io_mut(&mut self) -> &mut Io {
        &mut self.io
    }

    /// Bytes read from the socket but not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..self.end]
    }

    /// Gives up the socket and any bytes already read past the last head
    /// (for upgrades).
    pub fn into_parts(self) -> (Io, Vec<u8>) {
        let rest = self.buf[self.pos..self.end].to_vec();
        (self.io, rest)
    }

    /// Reads once into the free end of the buffer: small reads until the
    /// server sends more than fits, then large. The buffer keeps its
    /// length between reads and is zeroed only when it grows (resizing
    /// and truncating it per read re-zeroed the read size every time, a
    /// third of the agent's CPU per small request at opt-level z).
    async fn fill(&mut self) -> io::Result<usize> {
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
            // Drained and quiet (the last read did not fill its buffer):
            // an idle connection (a quiet watch) should not sit on a large
            // buffer while it waits, so start small again. A bulk body
            // (every read full) keeps its buffer.
            if !self.big_reads && self.buf.len() > SMALL_READ {
                self.buf = Vec::new();
            }
        }
        let want = if self.big_reads { READ_CHUNK } else { SMALL_READ };
        if self.buf.len() - self.end < want {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
            if self.buf.len() - self.end < want {
                // A fresh zeroed allocation (calloc, a fast memset) rather
                // than `resize`, which at opt-level z zeroes byte by byte:
                // that loop was a sixth of the agent's CPU at 32 clients.
                let mut grown = vec![0; self.end + want];
                grown[..self.end].copy_from_slice(&self.buf[..self.end]);
                self.buf = grown;
            }
        }
        let ready = smol::future::poll_once(self.io.read(&mut self.buf[self.end..self.end + want])).await;
        let n = match ready {
            Some(n) => n?,
            None => {
                // Nothing has arrived: the connection went quiet (a watch
                // between events). Wait on a small buffer, so an idle
                // stream does not sit on a large one. Dropping the pending
                // read loses nothing: a read that is not ready consumed
                // no bytes.
                if self.pos == self.end && self.buf.len() > SMALL_READ {
                    self.buf = vec![0; SMALL_READ];
                    self.pos = 0;
                    self.end = 0;
                }
                let want = want.min(self.buf.len() - self.end);
                self.io.read(&mut self.buf[self.end..self.end + want]).await?
            }
        };
        self.end += n;
        // Large reads while the server keeps more than a small read's
        // worth coming. Not "filled the large buffer": a TLS read returns
        // at most one record (16 KiB) and would drop a bulk body back to
        // small reads every other read.
        self.big_reads = n >= SMALL_READ;
        Ok(n)
    }

    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.io.write_all(data).await?;
        self.io.flush().await
    }

    /// Reads a response head. `head_request`: the request was HEAD, so no
    /// body follows whatever the headers say. Interim 1xx answers other
    /// than `101` are skipped.
    pub async fn read_head(&mut self, head_request: bool) -> io::Result<ResponseHead> {
        let (info, headers) = self
            .read_head_with(head_request, |_, fields| fields.iter().map(|h| Header::new(h.name, h.value)).collect())
            .await?;
        Ok(ResponseHead { status: info.status, headers, body: info.body, close: info.close })
    }

    /// [`Conn::read_head`], handing the fields to `f` where they lie in
    /// the read buffer instead of copying each into a [`Header`]: the kube
    /// proxy encodes them into its tunnel frame from there. `f` runs once,
    /// on the final head, and its result is returned beside the head.
    pub async fn read_head_with<R>(
        &mut self,
        head_request: bool,
        mut f: impl FnMut(&HeadInfo, &[httparse::Header<'_>]) -> R,
    ) -> io::Result<(HeadInfo, R)> {
        loop {
            let avail = &self.buf[self.pos..self.end];
            if !avail.is_empty() {
                let mut storage = [httparse::EMPTY_HEADER; 128];
                let mut resp = httparse::Response::new(&mut storage);
                match resp.parse(avail) {
                    Ok(httparse::Status::Complete(len)) => {
                        let status = resp.code.unwrap_or(0);
                        let close = has_token(resp.headers, "connection", "close") || resp.version == Some(0);
                        let body = response_body_kind(status, head_request, resp.headers)?;
                        let info = HeadInfo { status, body, close };
                        let interim = (100..200).contains(&status) && status != 101;
                        let done = (!interim).then(|| f(&info, resp.headers));
                        self.pos += len;
                        match done {
                            Some(r) => return Ok((info, r)),
                            None => continue,
                        }
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(e) => return Err(unreadable(format!("malformed response head: {e}"))),
                }
                if avail.len() > MAX_HEAD {
                    return Err(malformed("response head too large".into()));
                }
            }
            if self.fill().await? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection"));
            }
        }
    }

    /// Up to `max` bytes: what is buffered, else one socket read. Empty at
    /// EOF. Borrowed from the read buffer: the caller forwards it before
    /// reading on, so it is never copied into a `Vec` of its own.
    async fn read_some(&mut self, max: usize) -> io::Result<&[u8]> {
        if self.pos == self.end && self.fill().await? == 0 {
            return Ok(&[]);
        }
        let start = self.pos;
        let n = (self.end - start).min(max);
        self.pos += n;
        Ok(&self.buf[start..start + n])
    }

    /// The next line without its CR LF, borrowed from the read buffer.
    async fn read_line(&mut self) -> io::Result<&[u8]> {
        loop {
            if let Some(i) = self.buf[self.pos..self.end].iter().position(|&b| b == b'\n') {
                let start = self.pos;
                self.pos += i + 1;
                let line = &self.buf[start..start + i];
                return Ok(line.strip_suffix(b"\r").unwrap_or(line));
            }
            if self.end - self.pos > MAX_LINE {
                return Err(bad("chunk line too long"));
            }
            if self.fill().await? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a chunked body"));
            }
        }
    }
}

/// A response the server framed in a way that cannot be read safely: a
/// `Content-Length` that is not one field of digits, or one beside
/// `Transfer-Encoding`. Carried inside an [`io::Error`] (kind
/// `InvalidData`) so callers can tell it from a broken connection with
/// [`is_malformed`]: it is the server's fault, retrying the same request
/// elsewhere would not help, and the connection must not be reused.
#[derive(Debug)]
pub struct MalformedResponse {
    pub message: String,
    /// No HTTP head where the answer should start (not a bad field in
    /// one): on a reused connection this may be the stray tail of an
    /// earlier faulty answer rather than this answer ([`is_unreadable_start`]).
    pub unreadable_start: bool,
}

impl std::fmt::Display for MalformedResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for MalformedResponse {}

/// Whether `e` is a [`MalformedResponse`].
pub fn is_malformed(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<MalformedResponse>())
}

/// Whether `e` is a [`MalformedResponse`] with no readable head at all.
pub fn is_unreadable_start(e: &io::Error) -> bool {
    e.get_ref().and_then(|inner| inner.downcast_ref::<MalformedResponse>()).is_some_and(|m| m.unreadable_start)
}

fn malformed(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, MalformedResponse { message, unreadable_start: false })
}

/// A [`MalformedResponse`] with no readable head at all.
fn unreadable(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, MalformedResponse { message, unreadable_start: true })
}

fn response_body_kind<F: Field>(status: u16, head_request: bool, headers: &[F]) -> io::Result<BodyKind> {
    // Checked even where no body follows: a server that frames one answer
    // wrongly may frame the next one wrongly too, and the connection is
    // then not reused.
    let length = crate::http::content_length(headers)
        .map_err(|e| malformed(format!("API server response has a bad Content-Length: {e} (RFC 9112 §6.3)")))?;
    let te = find_header(headers, "transfer-encoding").is_some();
    if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(BodyKind::None);
    }
    if te {
        // RFC 9112 §6.3 item 3: Transfer-Encoding overrides Content-Length,
        // but a message with both "ought to be handled as an error"; an
        // intermediary (which the agent is) must not pass it on as is.
        if length.is_some() {
            return Err(malformed(
                "API server response has both Transfer-Encoding and Content-Length (RFC 9112 §6.3)".into(),
            ));
        }
        // RFC 9112 §6.3: chunked must be the final coding; otherwise the
        // body runs to close.
        return Ok(if has_token(headers, "transfer-encoding", "chunked") {
            BodyKind::Chunked
        } else {
            BodyKind::Close
        });
    }
    Ok(length.map_or(BodyKind::Close, BodyKind::Length))
}

/// Reads one body chunk by chunk.
pub struct BodyReader {
    kind: BodyKind,
    remaining: u64,
    chunk: ChunkState,
    done: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data,
    DataEnd,
}

impl BodyReader {
    pub fn new(kind: BodyKind) -> Self {
        let remaining = if let BodyKind::Length(n) = kind { n } else { 0 };
        BodyReader {
            kind,
            remaining,
            chunk: ChunkState::Size,
            done: matches!(kind, BodyKind::None | BodyKind::Length(0)),
        }
    }

    /// The next piece of the body, `None` at its end. A body delimited by
    /// close ends at EOF; any other body cut short is an error. The piece
    /// is borrowed from the connection's read buffer until the next read.
    pub async fn next<'c>(&mut self, conn: &'c mut Conn) -> io::Result<Option<&'c [u8]>> {
        if self.done {
            return Ok(None);
        }
        match self.kind {
            BodyKind::None => Ok(None),
            BodyKind::Length(_) => {
                let data = conn.read_some(self.remaining.min(READ_CHUNK as u64) as usize).await?;
                if data.is_empty() {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside the body"));
                }
                self.remaining -= data.len() as u64;
                self.done = self.remaining == 0;
                Ok(Some(data))
            }
            BodyKind::Close => {
                let data = conn.read_some(READ_CHUNK).await?;
                if data.is_empty() {
                    self.done = true;
                    return Ok(None);
                }
                Ok(Some(data))
            }
            BodyKind::Chunked => loop {
                match self.chunk {
                    ChunkState::Size => {
                        let line = conn.read_line().await?;
                        let size = chunk_size(line).ok_or_else(|| bad("bad chunk size"))?;
                        if size == 0 {
                            // Trailer section: skip fields up to the blank line.
                            while !conn.read_line().await?.is_empty() {}
                            self.done = true;
                            return Ok(None);
                        }
                        self.remaining = size;
                        self.chunk = ChunkState::Data;
                    }
                    ChunkState::Data => {
                        let data = conn.read_some(self.remaining.min(READ_CHUNK as u64) as usize).await?;
                        if data.is_empty() {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "connection closed inside a chunk",
                            ));
                        }
                        self.remaining -= data.len() as u64;
                        if self.remaining == 0 {
                            self.chunk = ChunkState::DataEnd;
                        }
                        return Ok(Some(data));
                    }
                    ChunkState::DataEnd => {
                        if !conn.read_line().await?.is_empty() {
                            return Err(bad("chunk not followed by CRLF"));
                        }
                        self.chunk = ChunkState::Size;
                    }
                }
            },
        }
    }

    /// How many body bytes the socket may be read for as they are, with
    /// no framing among them, when the connection's buffer is empty: the
    /// caller reads them from [`Conn::io_mut`] straight to where they go
    /// (the kube proxy: the tunnel's send queue, a copy saved per byte)
    /// and reports with [`BodyReader::raw_read`]. `None`: read on with
    /// [`BodyReader::next`] (bytes are buffered, a chunk line comes next,
    /// or the body is done). The head and the body's first bytes, read
    /// together into the buffer, always go that way.
    pub fn raw_room(&self, conn: &Conn) -> Option<usize> {
        if self.done || conn.pos != conn.end {
            return None;
        }
        let chunk = READ_CHUNK as u64;
        match (self.kind, &self.chunk) {
            (BodyKind::Length(_), _) | (BodyKind::Chunked, ChunkState::Data) => {
                Some(self.remaining.min(chunk) as usize)
            }
            (BodyKind::Close, _) => Some(READ_CHUNK),
            _ => None,
        }
    }

    /// Counts `n` bytes read as [`BodyReader::raw_room`] allowed (0: the
    /// server closed the connection). Errors as [`BodyReader::next`] does
    /// for a body cut short.
    pub fn raw_read(&mut self, conn: &mut Conn, n: usize) -> io::Result<()> {
        conn.big_reads = n >= SMALL_READ;
        match self.kind {
            BodyKind::Close if n == 0 => self.done = true,
            BodyKind::Close => {}
            _ if n == 0 => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside the body"));
            }
            BodyKind::Length(_) => {
                self.remaining -= n as u64;
                self.done = self.remaining == 0;
            }
            BodyKind::Chunked => {
                self.remaining -= n as u64;
                if self.remaining == 0 {
                    self.chunk = ChunkState::DataEnd;
                }
            }
            BodyKind::None => {}
        }
        Ok(())
    }

    /// True when the body was read to its end without relying on close.
    pub fn allows_reuse(&self) -> bool {
        self.done && self.kind != BodyKind::Close
    }
}

/// Serialises a request head. `headers` must already be policy-checked.
pub fn request_head(method: &str, path: &str, host: &str, headers: &[Header]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + headers.iter().map(|h| h.name.len() + h.value.len() + 4).sum::<usize>());
    start_request_head(&mut out, method, path, host);
    for h in headers {
        push_field(&mut out, &h.name, &h.value);
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Appends the request line and `Host` to `out`; the fields follow with
/// [`push_field`], and the head ends with an empty line.
pub fn start_request_head(out: &mut Vec<u8>, method: &str, path: &str, host: &str) {
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(if path.is_empty() { b"/" } else { path.as_bytes() });
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends one policy-checked field to a head.
pub fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Keep-alive connections to one server. Bounded: at most `max_idle`
/// connections wait; older ones are closed.
pub struct Pool {
    pub target: Target,
    /// `target`'s `Host` value, formatted once rather than per request.
    authority: String,
    tls: Option<Arc<ClientConfig>>,
    proxy: Option<Proxy>,
    addrs: RefCell<Option<(Vec<SocketAddr>, Instant)>>,
    idle: RefCell<Vec<Conn>>,
    max_idle: usize,
    idle_timeout: Duration,
}

/// How long resolved addresses are reused.
const RESOLVE_TTL: Duration = Duration::from_secs(30);

/// A pooled connection idle for less than this is handed out for a
/// replayable request without a liveness `peek` ([`Pool::get_replayable`]).
/// Servers' idle and request timeouts are seconds at the least.
pub const UNCHECKED_IDLE: Duration = Duration::from_secs(1);

impl Pool {
    pub fn new(target: Target, tls: Option<Arc<ClientConfig>>, proxy: Option<Proxy>, max_idle: usize) -> Self {
        Pool {
            authority: target.authority(),
            target,
            tls,
            proxy,
            addrs: RefCell::new(None),
            idle: RefCell::new(Vec::new()),
            max_idle,
            // Below the Go server's usual idle timeouts, so the server is
            // not closing a connection just as we reuse it.
            idle_timeout: Duration::from_secs(50),
        }
    }

    /// The `Host` value for requests to this server.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// A warm idle connection (`true`) or a fresh one (`false`). Each
    /// pooled one is checked first (a `peek`): one the server closed is
    /// skipped, and so is one with unasked-for bytes waiting (a `408`
    /// sent at the server's timeout), which would otherwise be read as
    /// the next request's answer.
    pub async fn get(&self) -> io::Result<(Conn, bool)> {
        self.get_checked(false).await
    }

    /// As [`Pool::get`], for a request the caller retries on a fresh
    /// connection when a reused one fails before any answer byte, and
    /// may make twice (a GET, HEAD or OPTIONS without a body). A connection idle for less than [`UNCHECKED_IDLE`]
    /// is handed out without the `peek`, a syscall per request saved: a
    /// close within that moment costs the caller its retry, and no server
    /// times a connection out (and says `408`) that quickly. Not after an
    /// answer that had no body by the rules, where a faulty server's
    /// stray body would be read as the next answer
    /// ([`Conn::recheck_before_reuse`]).
    pub async fn get_replayable(&self) -> io::Result<(Conn, bool)> {
        self.get_checked(true).await
    }

    async fn get_checked(&self, replayable: bool) -> io::Result<(Conn, bool)> {
        while let Some(conn) = self.idle.borrow_mut().pop() {
            let idle = conn.idle_since.elapsed();
            let unchecked = replayable && idle < UNCHECKED_IDLE && !conn.recheck;
            if idle < self.idle_timeout && (unchecked || conn.io.idle_alive()) {
                return Ok((conn, true));
            }
        }
        Ok((self.connect().await?, false))
    }

    pub async fn connect(&self) -> io::Result<Conn> {
        log::debug!("new connection to {}", self.target);
        if let Some(proxy) = &self.proxy {
            return Ok(Conn::new(net::dial(&self.target, self.tls.as_ref(), Some(proxy)).await?));
        }
        let cached = self.addrs.borrow().as_ref().filter(|(_, at)| at.elapsed() < RESOLVE_TTL).map(|(a, _)| a.clone());
        let addrs = match cached {
            Some(a) => a,
            None => {
                let a = self.target.resolve()?;
                *self.addrs.borrow_mut() = Some((a.clone(), Instant::now()));
                a
            }
        };
        let tcp = match net::tcp_connect(&addrs).await {
            Ok(t) => t,
            Err(e) => {
                self.addrs.borrow_mut().take();
                return Err(e);
            }
        };
        Ok(Conn::new(net::tls_wrap(tcp, &self.target, self.tls.as_ref()).await?))
    }

    /// Returns a connection whose last exchange completed cleanly.
    pub fn put(&self, mut conn: Conn) {
        if !conn.reusable || !conn.buffered().is_empty() || self.max_idle == 0 {
            return;
        }
        conn.reusable = false;
        conn.idle_since = Instant::now();
        // Its read interest armed now, so its next answer's first read
        // waits for readiness instead of a `recv` that finds nothing yet.
        conn.io.watch_idle();
        let mut idle = self.idle.borrow_mut();
        if idle.len() >= self.max_idle {
            idle.remove(0);
        }
        idle.push(conn);
    }

    pub fn idle_count(&self) -> usize {
        self.idle.borrow().len()
    }
}

impl Conn {
    /// Marks the connection fit for reuse after a fully read response.
    pub fn mark_reusable(&mut self, yes: bool) {
        self.reusable = yes;
    }

    /// Whether its next reuse must look for stray bytes first (see
    /// `recheck`): after an answer that had no body by the rules.
    pub fn recheck_before_reuse(&mut self, yes: bool) {
        self.recheck = yes;
    }
}

/// A complete small exchange: the answer's status, headers and body.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<Header>,
    pub body: Vec<u8>,
}

/// Sends one request with a small body and reads the whole answer (at
/// most `max_body` bytes). Retries once on a fresh connection when a
/// pooled one turns out to be closed.
pub async fn exchange(
    pool: &Pool,
    method: &str,
    path: &str,
    headers: &[Header],
    body: &[u8],
    max_body: usize,
) -> io::Result<Answer> {
    let mut hdrs = headers.to_vec();
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        hdrs.push(Header::new("Content-Length", body.len().to_string()));
    }
    let head = request_head(method, path, pool.authority(), &hdrs);
    let (mut conn, mut reused) = pool.get().await?;
    loop {
        match exchange_on(&mut conn, &head, body, method == "HEAD", max_body).await {
            Ok(answer) => {
                pool.put(conn);
                return Ok(answer);
            }
            Err((e, false)) if reused => {
                log::debug!("pooled connection to {} failed ({e}); retrying on a fresh one", pool.target);
                conn = pool.connect().await?;
                reused = false;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// `Err((e, true))` once any answer byte arrived (no retry then).
async fn exchange_on(
    conn: &mut Conn,
    head: &[u8],
    body: &[u8],
    head_request: bool,
    max_body: usize,
) -> Result<Answer, (io::Error, bool)> {
    let mut msg = head.to_vec();
    msg.extend_from_slice(body);
    conn.write_all(&msg).await.map_err(|e| (e, false))?;
    // A server that accepted the request and then says nothing is not
    // waited on forever: not the pooled connection's fault, so no retry.
    let limit = net::response_timeout();
    let resp = net::deadline(limit, || "waiting for the response head".into(), conn.read_head(head_request))
        .await
        .map_err(|e| {
            let timed_out = e.kind() == io::ErrorKind::TimedOut;
            (e, timed_out)
        })?;
    let mut reader = BodyReader::new(resp.body);
    let read_body = async {
        let mut out = Vec::new();
        while let Some(piece) = reader.next(conn).await? {
            out.extend_from_slice(piece);
            if out.len() > max_body {
                return Err(bad(format!("answer body over {max_body} bytes")));
            }
        }
        Ok(out)
    };
    let out = net::deadline(limit, || "reading the response body".into(), read_body).await.map_err(|e| (e, true))?;
    conn.mark_reusable(reader.allows_reuse() && !resp.close);
    Ok(Answer { status: resp.status, headers: resp.headers, body: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_kinds() {
        let h = |n: &str, v: &str| vec![Header::new(n, v)];
        assert_eq!(response_body_kind(200, false, &h("Content-Length", "5")).unwrap(), BodyKind::Length(5));
        assert_eq!(response_body_kind(200, false, &h("Transfer-Encoding", "chunked")).unwrap(), BodyKind::Chunked);
        assert_eq!(response_body_kind(200, false, &h("Transfer-Encoding", "gzip")).unwrap(), BodyKind::Close);
        assert_eq!(response_body_kind::<Header>(200, false, &[]).unwrap(), BodyKind::Close);
        assert_eq!(response_body_kind::<Header>(204, false, &[]).unwrap(), BodyKind::None);
        assert_eq!(response_body_kind(200, true, &h("Content-Length", "5")).unwrap(), BodyKind::None);
        for bad in ["x", "+5", "5, 5", "-1", "99999999999999999999", ""] {
            let e = response_body_kind(200, false, &h("Content-Length", bad)).unwrap_err();
            assert!(is_malformed(&e), "{bad:?}: {e}");
        }
        let two = [Header::new("Content-Length", "5"), Header::new("Content-Length", "5")];
        assert!(is_malformed(&response_body_kind(200, false, &two).unwrap_err()));
        let both = [Header::new("Transfer-Encoding", "chunked"), Header::new("Content-Length", "5")];
        assert!(is_malformed(&response_body_kind(200, false, &both).unwrap_err()));
        // A broken connection is not a malformed response.
        assert!(!is_malformed(&io::Error::new(io::ErrorKind::InvalidData, "tls alert")));
    }

    #[test]
    fn heads() {
        let head = request_head("GET", "/api?x=1", "h:6443", &[Header::new("Accept", "application/json")]);
        assert_eq!(head, b"GET /api?x=1 HTTP/1.1\r\nHost: h:6443\r\nAccept: application/json\r\n\r\n");
    }

    /// A pooled connection the server closed is not handed out again.
    #[test]
    fn pool_skips_connections_the_server_closed() {
        smol::block_on(async {
            let listener = smol::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let target = Target::parse(&format!("http://{addr}")).unwrap();
            let pool = Pool::new(target, None, None, 4);
            let mut conn = pool.connect().await.unwrap();
            let (server_side, _) = listener.accept().await.unwrap();
            conn.mark_reusable(true);
            pool.put(conn);
            assert_eq!(pool.idle_count(), 1);
            let (alive, reused) = pool.get().await.unwrap();
            assert!(reused);
            let mut alive = alive;
            alive.mark_reusable(true);
            pool.put(alive);
            drop(server_side);
            smol::Timer::after(Duration::from_millis(50)).await;
            let accept = smol::spawn(async move { listener.accept().await.unwrap() });
            let (_fresh, reused) = pool.get().await.unwrap();
            assert!(!reused, "the closed connection was skipped");
            accept.await;
        });
    }

    /// For a replayable request a just-used connection is handed out
    /// unchecked (its caller retries), even one the server closed; the
    /// checked `get` skips that one.
    #[test]
    fn replayable_requests_take_a_just_used_connection_unchecked() {
        smol::block_on(async {
            let listener = smol::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let pool = Pool::new(Target::parse(&format!("http://{addr}")).unwrap(), None, None, 4);
            let mut conn = pool.connect().await.unwrap();
            let (server_side, _) = listener.accept().await.unwrap();
            drop(server_side);
            smol::Timer::after(Duration::from_millis(50)).await;
            conn.mark_reusable(true);
            pool.put(conn);
            let (mut unchecked, reused) = pool.get_replayable().await.unwrap();
            assert!(reused, "taken without the peek");
            unchecked.mark_reusable(true);
            pool.put(unchecked);
            // (The listener's backlog completes the new connections.)
            let (mut fresh, reused) = pool.get().await.unwrap();
            assert!(!reused, "the checked get skipped the closed connection");
            let (mut server_side, _) = listener.accept().await.unwrap();
            // After a bodiless answer (HEAD, 204, 304) a replayable request
            // checks too: stray bytes sent after it are seen.
            fresh.mark_reusable(true);
            fresh.recheck_before_reuse(true);
            pool.put(fresh);
            smol::io::AsyncWriteExt::write_all(&mut server_side, b"stray body").await.unwrap();
            smol::Timer::after(Duration::from_millis(50)).await;
            let (_other, reused) = pool.get_replayable().await.unwrap();
            assert!(!reused, "the connection with stray bytes was skipped");
        });
    }

    /// A chunked body split at awkward places, over a real socket pair.
    #[test]
    fn reads_chunked_body_across_reads() {
        smol::block_on(async {
            let listener = smol::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = smol::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                let parts: [&[u8]; 5] = [
                    b"HTTP/1.1 200 OK\r\nTransfer-Enc",
                    b"oding: chunked\r\n\r\n5\r\nhel",
                    b"lo\r\n6;ext=1\r\n world\r\n0\r",
                    b"\nX-Trailer: 1\r\n\r\n",
                    b"HTTP/1.1 204 No Content\r\n\r\n",
                ];
                for p in parts {
                    s.write_all(p).await.unwrap();
                    s.flush().await.unwrap();
                    smol::Timer::after(Duration::from_millis(5)).await;
                }
                smol::Timer::after(Duration::from_millis(100)).await;
            });
            let tcp = net::tcp_connect(&[addr]).await.unwrap();
            let mut conn = Conn::new(Io::Plain(tcp.into()));
            let head = conn.read_head(false).await.unwrap();
            assert_eq!((head.status, head.body), (200, BodyKind::Chunked));
            let mut reader = BodyReader::new(head.body);
            let mut body: Vec<u8> = Vec::new();
            while let Some(p) = reader.next(&mut conn).await.unwrap() {
                body.extend(p);
            }
            assert_eq!(body, b"hello world");
            assert!(reader.allows_reuse());
            let next = conn.read_head(false).await.unwrap();
            assert_eq!((next.status, next.body), (204, BodyKind::None));
            server.await;
        });
    }
}
