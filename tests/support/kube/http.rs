//! HTTP/1.1 over one blocking TLS connection: request heads parsed with
//! `httparse`, bodies by `Content-Length` or chunked, responses with a
//! length or chunked. Keep-alive by default (RFC 9112 §9.3).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The TLS stream of one client connection.
pub type Tls = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

/// Largest request head accepted; past it the answer is 431.
pub const MAX_HEAD: usize = 64 * 1024;
/// Largest request body, as kube-apiserver's JSON limit (3 MiB).
pub const MAX_BODY: usize = 3 * 1024 * 1024;
/// How long a connection may sit idle between requests.
const IDLE: Duration = Duration::from_secs(120);
/// The read timeout used to notice shutdown while blocked in a read.
pub const POLL: Duration = Duration::from_millis(100);

/// One parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path without the query, percent-decoded.
    pub path: String,
    /// Raw query string (without `?`).
    pub raw_query: String,
    pub query: Vec<(String, String)>,
    /// Header names in lower case, in arrival order, duplicates kept.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
    pub fn query_all(&self, name: &str) -> Vec<String> {
        self.query.iter().filter(|(n, _)| n == name).map(|(_, v)| v.clone()).collect()
    }
    pub fn query_true(&self, name: &str) -> bool {
        matches!(self.query(name), Some("1" | "true" | "True"))
    }
    /// Whether this asks for a protocol upgrade (RFC 9110 §7.8).
    pub fn upgrade(&self) -> Option<String> {
        let conn = self.header("connection").unwrap_or("").to_ascii_lowercase();
        if conn.split(',').any(|t| t.trim() == "upgrade") {
            self.header("upgrade").map(|u| u.to_ascii_lowercase())
        } else {
            None
        }
    }
}

/// Why reading a request stopped.
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed, went idle too long, or the server is stopping.
    Closed,
    /// The head could not be parsed: answer 400 and close.
    BadRequest(String),
    /// The head is too large: 431 and close.
    HeadTooLarge,
    /// The body is over [`MAX_BODY`]: 413 and close.
    BodyTooLarge(Box<Request>),
}

/// One client connection with its read buffer.
pub struct Conn {
    pub tls: Tls,
    pub buf: Vec<u8>,
    pub stopping: Arc<AtomicBool>,
}

fn timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

impl Conn {
    /// Reads more bytes into `buf`. `Ok(None)` is a timeout with nothing read.
    pub fn fill(&mut self) -> io::Result<Option<usize>> {
        let mut tmp = [0u8; 16 * 1024];
        match self.tls.read(&mut tmp) {
            Ok(0) => Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                Ok(Some(n))
            }
            Err(e) if timeout(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn set_read_timeout(&self, d: Duration) {
        let _ = self.tls.sock.set_read_timeout(Some(d));
    }

    /// Whether the peer has gone away, checked without blocking for long.
    /// Any bytes that arrive meanwhile stay in `buf`.
    pub fn peer_gone(&mut self) -> bool {
        self.set_read_timeout(Duration::from_millis(1));
        let gone = self.fill().is_err();
        self.set_read_timeout(POLL);
        gone
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Reads exactly `n` more bytes of body beyond what is buffered.
    fn need(&mut self, n: usize, deadline: Instant) -> Result<(), ReadError> {
        while self.buf.len() < n {
            if self.stopping() || Instant::now() > deadline {
                return Err(ReadError::Closed);
            }
            match self.fill() {
                Ok(_) => {}
                Err(_) => return Err(ReadError::Closed),
            }
        }
        Ok(())
    }

    /// Reads the next request. Blocks until a whole one arrived.
    pub fn read_request(&mut self) -> Result<Request, ReadError> {
        let idle_deadline = Instant::now() + IDLE;
        let (mut req, head_len, body_len, chunked) = loop {
            if !self.buf.is_empty() {
                let mut hs = [httparse::EMPTY_HEADER; 96];
                let mut r = httparse::Request::new(&mut hs);
                match r.parse(&self.buf) {
                    Ok(httparse::Status::Complete(n)) => break parse_head(&r, n)?,
                    Ok(httparse::Status::Partial) => {}
                    Err(e) => return Err(ReadError::BadRequest(e.to_string())),
                }
                if self.buf.len() > MAX_HEAD {
                    return Err(ReadError::HeadTooLarge);
                }
            }
            if self.stopping() || Instant::now() > idle_deadline {
                return Err(ReadError::Closed);
            }
            if self.fill().is_err() {
                return Err(ReadError::Closed);
            }
        };
        self.buf.drain(..head_len);
        let deadline = Instant::now() + Duration::from_secs(60);
        if chunked {
            let mut body = Vec::new();
            loop {
                let line_end = loop {
                    if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break p;
                    }
                    self.need(self.buf.len() + 1, deadline)?;
                };
                let line = String::from_utf8_lossy(&self.buf[..line_end]).to_string();
                let size_hex = line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_hex, 16)
                    .map_err(|_| ReadError::BadRequest(format!("bad chunk size {size_hex:?}")))?;
                if body.len() + size > MAX_BODY {
                    return Err(ReadError::BodyTooLarge(Box::new(req)));
                }
                self.need(line_end + 2 + size + 2, deadline)?;
                body.extend_from_slice(&self.buf[line_end + 2..line_end + 2 + size]);
                self.buf.drain(..line_end + 2 + size + 2);
                if size == 0 {
                    break;
                }
            }
            req.body = body;
        } else if body_len > 0 {
            if body_len > MAX_BODY {
                return Err(ReadError::BodyTooLarge(Box::new(req)));
            }
            self.need(body_len, deadline)?;
            req.body = self.buf.drain(..body_len).collect();
        }
        Ok(req)
    }

    pub fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.tls.write_all(data)?;
        self.tls.flush()
    }

    /// Writes a response head. `body_len` None means chunked.
    pub fn write_head(&mut self, status: u16, headers: &[(&str, String)], body_len: Option<usize>) -> io::Result<()> {
        let mut h = format!("HTTP/1.1 {status} {}\r\n", reason(status));
        for (n, v) in headers {
            h.push_str(&format!("{n}: {v}\r\n"));
        }
        h.push_str("Date: ");
        h.push_str(&super::time::http_date());
        h.push_str("\r\n");
        match body_len {
            Some(n) if status != 101 => h.push_str(&format!("Content-Length: {n}\r\n")),
            Some(_) => {}
            None => h.push_str("Transfer-Encoding: chunked\r\n"),
        }
        h.push_str("\r\n");
        self.tls.write_all(h.as_bytes())?;
        if body_len.is_none() {
            self.tls.flush()?;
        }
        Ok(())
    }

    pub fn write_chunk(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.tls.write_all(format!("{:x}\r\n", data.len()).as_bytes())?;
        self.tls.write_all(data)?;
        self.tls.write_all(b"\r\n")?;
        self.tls.flush()
    }

    pub fn end_chunks(&mut self) -> io::Result<()> {
        self.write_all(b"0\r\n\r\n")
    }
}

type Head = (Request, usize, usize, bool);

fn parse_head(r: &httparse::Request, n: usize) -> Result<Head, ReadError> {
    let method = r.method.unwrap_or("GET").to_string();
    let target = r.path.unwrap_or("/");
    let (raw_path, raw_query) = match target.split_once('?') {
        Some((p, q)) => (p, q.to_string()),
        None => (target, String::new()),
    };
    let mut headers = Vec::new();
    let mut body_len = 0usize;
    let mut chunked = false;
    for h in r.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        // Optional white space only (RFC 9110 §5.5), as Go's net/http trims:
        // a name ending in U+3000 or U+00A0 arrives with it. Bytes past
        // 0x7F (UTF-8 names in Impersonate-*) arrive as they were sent.
        let value = String::from_utf8_lossy(h.value).trim_matches([' ', '\t']).to_string();
        if name == "content-length" {
            body_len = value.parse().map_err(|_| ReadError::BadRequest("bad Content-Length".into()))?;
        }
        if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        }
        headers.push((name, value));
    }
    let query = raw_query
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(kv), String::new()),
        })
        .collect();
    let req = Request { method, path: percent_decode(raw_path), raw_query, query, headers, body: Vec::new() };
    Ok((req, n, body_len, chunked))
}

/// Decodes `%XX` escapes and `+` (as a space, form style).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        409 => "Conflict",
        413 => "Request Entity Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Status",
    }
}
