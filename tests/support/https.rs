//! A tiny blocking HTTPS/1.1 client for poking servers in tests (the
//! stand-in API server, the hub): one request per connection, bodies by
//! length or chunked, optional client certificate.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

pub type Stream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// One response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Trusts `ca_der`; presents `client` (cert PEM, key PEM) when given.
pub fn client_config(ca_der: &[u8], client: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec())).expect("CA");
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let cfg = match client {
        None => b.with_no_client_auth(),
        Some((cert, key)) => {
            let certs = vec![CertificateDer::from_pem_slice(cert.as_bytes()).expect("cert PEM")];
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key PEM");
            b.with_client_auth_cert(certs, key).expect("client cert")
        }
    };
    Arc::new(cfg)
}

pub fn connect(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> Stream {
    let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    let name = ServerName::try_from("127.0.0.1").expect("name").to_owned();
    rustls::StreamOwned::new(rustls::ClientConnection::new(cfg, name).expect("client"), sock)
}

/// Writes one request (with `Connection: close` unless headers say otherwise).
pub fn send(s: &mut Stream, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
    let mut h = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n", body.len());
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("connection")) {
        h.push_str("Connection: close\r\n");
    }
    for (n, v) in headers {
        h.push_str(&format!("{n}: {v}\r\n"));
    }
    h.push_str("\r\n");
    s.write_all(h.as_bytes()).expect("write head");
    s.write_all(body).expect("write body");
    s.flush().expect("flush");
}

/// Reads a response head; returns it with whatever body bytes came along.
pub fn read_head(s: &mut Stream) -> (Response, Vec<u8>) {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let rest = buf[end + 4..].to_vec();
            let mut lines = head.split("\r\n");
            let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).expect("status");
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            return (Response { status, headers, body: Vec::new() }, rest);
        }
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => panic!("connection ended before a response head: {:?}", String::from_utf8_lossy(&buf)),
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

/// Reads the rest of a body (by length, chunked, or to EOF).
pub fn read_body(s: &mut Stream, r: &mut Response, mut rest: Vec<u8>) {
    let mut tmp = [0u8; 8192];
    let mut more = |rest: &mut Vec<u8>| match s.read(&mut tmp) {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            rest.extend_from_slice(&tmp[..n]);
            true
        }
    };
    if let Some(len) = r.header("content-length").and_then(|l| l.parse::<usize>().ok()) {
        while rest.len() < len && more(&mut rest) {}
        rest.truncate(len);
        r.body = rest;
    } else if r.header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        let mut body = Vec::new();
        loop {
            let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                if !more(&mut rest) {
                    break;
                }
                continue;
            };
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16).expect("chunk size");
            while rest.len() < eol + 2 + size + 2 {
                if !more(&mut rest) {
                    r.body = body;
                    return;
                }
            }
            body.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest.drain(..eol + 2 + size + 2);
            if size == 0 {
                break;
            }
        }
        r.body = body;
    } else {
        while more(&mut rest) {}
        r.body = rest;
    }
}

/// One request on a fresh connection.
pub fn request(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut s = connect(addr, cfg);
    send(&mut s, method, path, headers, body);
    let (mut r, rest) = read_head(&mut s);
    read_body(&mut s, &mut r, rest);
    r
}
