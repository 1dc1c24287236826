//! SPDY/3.1 server side, just enough for `portforward.k8s.io`: kubectl
//! opens, per forwarded connection, an `error` and a `data` stream (headers
//! `streamType`, `port`, `requestID`); the server replies to each, copies
//! the data stream to and from a TCP connection, and half-closes with FIN.
//!
//! Frames (draft 3): control frames `1 | version(15) | type(16) | flags(8)
//! | length(24)`, data frames `0 | stream(31) | flags(8) | length(24)`.
//! Header blocks are one zlib stream per direction, with the fixed SPDY/3
//! dictionary.
//!
//! The byte stream comes either straight after a `101 SPDY/3.1` upgrade
//! ([`RawPipe`]) or inside WebSocket binary messages
//! (`SPDY/3.1+portforward.k8s.io`, [`super::ws::WsPipe`]).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

use super::Shared;
use super::http::Conn;
use super::ws::{Msg, WsPipe};

pub const TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
const MAX_FRAME: usize = 1 << 24;

/// A bidirectional byte pipe polled by the session loop.
pub trait Pipe {
    /// Bytes from the peer; `Ok(None)` after a short wait with nothing.
    fn recv(&mut self) -> io::Result<Option<Vec<u8>>>;
    fn send(&mut self, data: &[u8]) -> io::Result<()>;
}

/// SPDY straight on the TLS connection.
pub struct RawPipe<'a> {
    pub conn: &'a mut Conn,
}

impl Pipe for RawPipe<'_> {
    fn recv(&mut self) -> io::Result<Option<Vec<u8>>> {
        if self.conn.buf.is_empty() {
            self.conn.set_read_timeout(Duration::from_millis(10));
            let r = self.conn.fill();
            self.conn.set_read_timeout(super::http::POLL);
            r?;
        }
        if self.conn.stopping.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(io::ErrorKind::ConnectionAborted.into());
        }
        Ok(if self.conn.buf.is_empty() { None } else { Some(std::mem::take(&mut self.conn.buf)) })
    }
    fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.conn.write_all(data)
    }
}

impl Pipe for WsPipe<'_> {
    fn recv(&mut self) -> io::Result<Option<Vec<u8>>> {
        match self.recv_msg()? {
            None => Ok(None),
            Some(Msg::Binary(b)) | Some(Msg::Text(b)) => Ok(Some(b)),
            Some(Msg::Close) => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
    fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.send_binary(data)
    }
}

/// The SPDY/3 header compression dictionary (draft 3, section 2.6.10.1):
/// length-prefixed common header names and values, then a run of common
/// status codes, dates and media types.
pub fn dictionary() -> Vec<u8> {
    const WORDS: &[&str] = &[
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ];
    const TAIL: &str = concat!(
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
        "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized",
        "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable",
        "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
        "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,",
        "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
    );
    let mut d = Vec::new();
    for w in WORDS {
        d.extend_from_slice(&(w.len() as u32).to_be_bytes());
        d.extend_from_slice(w.as_bytes());
    }
    d.extend_from_slice(TAIL.as_bytes());
    d
}

struct Codec {
    dict: Vec<u8>,
    inflate: Decompress,
    deflate: Compress,
    deflate_started: bool,
}

impl Codec {
    fn new() -> Self {
        Codec {
            dict: dictionary(),
            inflate: Decompress::new(true),
            deflate: Compress::new(Compression::default(), true),
            deflate_started: false,
        }
    }

    fn decode_headers(&mut self, block: &[u8]) -> io::Result<Vec<(String, String)>> {
        let mut out = Vec::with_capacity(block.len() * 4 + 64);
        let mut input = block;
        let mut guard = 0;
        while !input.is_empty() || out.is_empty() {
            guard += 1;
            if guard > 1000 || out.len() > MAX_FRAME {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "header block does not decompress"));
            }
            if out.capacity() - out.len() < 4096 {
                out.reserve(out.capacity());
            }
            let before = self.inflate.total_in();
            let r = self.inflate.decompress_vec(input, &mut out, FlushDecompress::Sync);
            let used = (self.inflate.total_in() - before) as usize;
            input = &input[used..];
            match r {
                Ok(_) => {
                    if input.is_empty() {
                        break;
                    }
                }
                Err(e) if e.needs_dictionary().is_some() => {
                    let want = e.needs_dictionary().unwrap_or(0);
                    let have = adler32(&self.dict);
                    if want != have {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("SPDY dictionary id {want:#x} differs from ours {have:#x}"),
                        ));
                    }
                    self.inflate.set_dictionary(&self.dict).map_err(io::Error::other)?;
                }
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        }
        parse_header_block(&out)
    }

    fn encode_headers(&mut self, headers: &[(&str, &str)]) -> io::Result<Vec<u8>> {
        if !self.deflate_started {
            self.deflate.set_dictionary(&self.dict).map_err(io::Error::other)?;
            self.deflate_started = true;
        }
        let mut raw = Vec::new();
        raw.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (n, v) in headers {
            raw.extend_from_slice(&(n.len() as u32).to_be_bytes());
            raw.extend_from_slice(n.as_bytes());
            raw.extend_from_slice(&(v.len() as u32).to_be_bytes());
            raw.extend_from_slice(v.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() + 128);
        let mut input = &raw[..];
        loop {
            let before = self.deflate.total_in();
            self.deflate.compress_vec(input, &mut out, FlushCompress::Sync).map_err(io::Error::other)?;
            input = &input[(self.deflate.total_in() - before) as usize..];
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
            out.reserve(256);
        }
        Ok(out)
    }
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + x as u32) % 65_521;
        b = (b + a) % 65_521;
    }
    (b << 16) | a
}

fn parse_header_block(b: &[u8]) -> io::Result<Vec<(String, String)>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed SPDY header block");
    let rd = |at: &mut usize| -> io::Result<u32> {
        let v = b.get(*at..*at + 4).ok_or_else(bad)?;
        *at += 4;
        Ok(u32::from_be_bytes(v.try_into().expect("4")))
    };
    let mut at = 0;
    let n = rd(&mut at)?;
    let mut out = Vec::new();
    for _ in 0..n.min(1024) {
        let l = rd(&mut at)? as usize;
        let name = String::from_utf8_lossy(b.get(at..at + l).ok_or_else(bad)?).to_ascii_lowercase();
        at += l;
        let l = rd(&mut at)? as usize;
        let value = String::from_utf8_lossy(b.get(at..at + l).ok_or_else(bad)?).into_owned();
        at += l;
        out.push((name, value));
    }
    Ok(out)
}

fn control(kind: u16, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80, 0x03];
    f.extend_from_slice(&kind.to_be_bytes());
    f.push(flags);
    f.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(body);
    f
}

fn data(stream: u32, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut f = (stream & 0x7fff_ffff).to_be_bytes().to_vec();
    f.push(u8::from(fin));
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(payload);
    f
}

struct Forward {
    tcp: Option<TcpStream>,
    error_stream: Option<u32>,
    /// The peer sent FIN on the data stream.
    peer_fin: bool,
    /// We sent FIN on the data stream.
    our_fin: bool,
}

/// Runs a port-forward session until the peer goes away or the server stops.
pub fn serve_portforward(pipe: &mut dyn Pipe, shared: &Shared, ns: &str, pod: &str) {
    let mut codec = Codec::new();
    let mut inbuf: Vec<u8> = Vec::new();
    // requestID -> (error stream, data stream)
    let mut pairs: HashMap<String, (Option<u32>, Option<u32>, u16)> = HashMap::new();
    let mut forwards: HashMap<u32, Forward> = HashMap::new();
    loop {
        match pipe.recv() {
            Ok(Some(b)) => inbuf.extend(b),
            Ok(None) => {}
            Err(_) => return,
        }
        // Parse every complete frame.
        loop {
            if inbuf.len() < 8 {
                break;
            }
            let len = u32::from_be_bytes([0, inbuf[5], inbuf[6], inbuf[7]]) as usize;
            if inbuf.len() < 8 + len {
                break;
            }
            let frame: Vec<u8> = inbuf.drain(..8 + len).collect();
            let flags = frame[4];
            let body = &frame[8..];
            if frame[0] & 0x80 == 0 {
                let sid = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) & 0x7fff_ffff;
                if let Some(f) = forwards.get_mut(&sid) {
                    if let Some(t) = f.tcp.as_mut() {
                        if t.write_all(body).is_err() {
                            f.tcp = None;
                        }
                    }
                    if flags & 1 != 0 {
                        f.peer_fin = true;
                        if let Some(t) = f.tcp.as_ref() {
                            let _ = t.shutdown(Shutdown::Write);
                        }
                    }
                }
                continue;
            }
            let kind = u16::from_be_bytes([frame[2], frame[3]]);
            match kind {
                1 => {
                    // SYN_STREAM: stream id, associated id, priority, slot, headers
                    if body.len() < 10 {
                        return;
                    }
                    let sid = u32::from_be_bytes([body[0], body[1], body[2], body[3]]) & 0x7fff_ffff;
                    let headers = match codec.decode_headers(&body[10..]) {
                        Ok(h) => h,
                        Err(e) => {
                            eprintln!("standin: SPDY headers: {e}");
                            return;
                        }
                    };
                    let h = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()).unwrap_or_default();
                    let (stype, port, rid) = (h("streamtype"), h("port"), h("requestid"));
                    let port: u16 = port.parse().unwrap_or(0);
                    let Ok(block) = codec.encode_headers(&[]) else { return };
                    let mut reply = sid.to_be_bytes().to_vec();
                    reply.extend(block);
                    if pipe.send(&control(2, 0, &reply)).is_err() {
                        return;
                    }
                    let entry = pairs.entry(rid.clone()).or_insert((None, None, port));
                    match stype.as_str() {
                        "error" => entry.0 = Some(sid),
                        "data" => entry.1 = Some(sid),
                        _ => {}
                    }
                    if let (Some(es), Some(ds), port) = *entry {
                        pairs.remove(&rid);
                        let target = {
                            let st = shared.lock();
                            st.port_targets.get(&port).copied().unwrap_or(shared.echo_addr)
                        };
                        let tcp = TcpStream::connect_timeout(&target, Duration::from_secs(5)).ok();
                        let mut fwd = Forward { tcp, error_stream: Some(es), peer_fin: false, our_fin: false };
                        match fwd.tcp.as_ref() {
                            Some(t) => {
                                let _ = t.set_nonblocking(true);
                                let _ = t.set_nodelay(true);
                            }
                            None => {
                                let msg = format!(
                                    "error forwarding port {port} to pod {pod} in namespace {ns}: failed to connect to localhost:{port}: connection refused"
                                );
                                if pipe.send(&data(es, true, msg.as_bytes())).is_err() {
                                    return;
                                }
                                fwd.error_stream = None;
                            }
                        }
                        forwards.insert(ds, fwd);
                    }
                }
                // RST_STREAM
                3 if body.len() >= 4 => {
                    let sid = u32::from_be_bytes([body[0], body[1], body[2], body[3]]) & 0x7fff_ffff;
                    forwards.remove(&sid);
                }
                // PING: echo it back.
                6 if pipe.send(&frame).is_err() => return,
                7 => return, // GOAWAY
                _ => {}      // SETTINGS, HEADERS, WINDOW_UPDATE: nothing to do
            }
        }
        // Pump every TCP connection towards the peer.
        let mut done = Vec::new();
        for (sid, f) in forwards.iter_mut() {
            if f.our_fin {
                if f.peer_fin {
                    done.push(*sid);
                }
                continue;
            }
            let mut eof = f.tcp.is_none();
            if let Some(t) = f.tcp.as_mut() {
                let mut buf = [0u8; 32 * 1024];
                loop {
                    match t.read(&mut buf) {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(n) => {
                            if pipe.send(&data(*sid, false, &buf[..n])).is_err() {
                                return;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            eof = true;
                            break;
                        }
                    }
                }
            }
            if eof {
                f.our_fin = true;
                if pipe.send(&data(*sid, true, &[])).is_err() {
                    return;
                }
                if let Some(es) = f.error_stream.take() {
                    if pipe.send(&data(es, true, &[])).is_err() {
                        return;
                    }
                }
            }
        }
        for sid in done {
            forwards.remove(&sid);
        }
    }
}
