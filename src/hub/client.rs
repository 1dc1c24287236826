//! A small blocking HTTPS client for the admin CLI (and the tests): one
//! request per connection, rustls with the crate's trust settings.
//!
//! Hand-written rather than a general client because the CLI talks to one
//! server whose answers it knows (JSON with `Content-Length`, or chunked
//! from the kube front end), and this keeps the hub's dependency tree to
//! what it already has.

use crate::tls::{Trust, client_config};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

/// Where the hub is and how to trust it.
#[derive(Clone)]
pub struct Client {
    host: String,
    port: u16,
    /// Path prefix of the hub URL (usually empty).
    base: String,
    tls: Arc<rustls::ClientConfig>,
    token: Option<crate::secret::Secret>,
    /// Longest wait for the server between bytes; `None` waits forever
    /// (the CLI's long polls and kube streams).
    read_timeout: Option<Duration>,
}

/// A response read to its end.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Splits `https://host[:port][/base]`.
pub fn parse_url(url: &str) -> Result<(String, u16, String), String> {
    let rest = url.strip_prefix("https://").ok_or_else(|| format!("hub URL {url:?} must start with https://"))?;
    let (authority, base) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6.split_once(']').ok_or("bad IPv6 host")?;
        (h.to_string(), p.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let port = match port {
        Some(p) => p.parse().map_err(|_| format!("bad port in {url:?}"))?,
        None => 443,
    };
    if host.is_empty() {
        return Err(format!("no host in {url:?}"));
    }
    Ok((host, port, base.to_string()))
}

impl Client {
    /// `ca_pem`: the hub's private CA; `None` trusts the public roots.
    pub fn new(url: &str, ca_pem: Option<&str>, token: Option<&str>) -> Result<Self, String> {
        let (host, port, base) = parse_url(url)?;
        let trust = match ca_pem {
            Some(pem) => Trust::CaPem(pem.to_string()),
            None => Trust::WebPki,
        };
        let tls = client_config(&trust, None, &[b"http/1.1"]).map_err(|e| e.to_string())?;
        Ok(Client { host, port, base, tls, token: token.map(crate::secret::Secret::new), read_timeout: None })
    }

    /// Gives up on a server silent for `d` (the hub calling its identity
    /// provider from a worker thread must not wait forever).
    pub fn with_read_timeout(mut self, d: Duration) -> Self {
        self.read_timeout = Some(d);
        self
    }

    pub fn get(&self, path: &str) -> io::Result<Reply> {
        self.request("GET", path, &[], None)
    }

    pub fn delete(&self, path: &str) -> io::Result<Reply> {
        self.request("DELETE", path, &[], None)
    }

    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> io::Result<Reply> {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        self.request("POST", path, &[("Content-Type", "application/json")], Some(&bytes))
    }

    /// Sends one request (`Connection: close`) and reads the whole answer.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> io::Result<Reply> {
        let mut tls = self.connect()?;
        // A URL without a path (`https://idp`) asks for `/`.
        let target = match format!("{}{path}", self.base) {
            t if t.is_empty() => "/".to_string(),
            t => t,
        };
        let mut head =
            format!("{method} {target} HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\n", self.host, self.port);
        if let Some(t) = &self.token {
            head += &format!("Authorization: Bearer {}\r\n", t.expose());
        }
        for (n, v) in headers {
            head += &format!("{n}: {v}\r\n");
        }
        if let Some(b) = body {
            head += &format!("Content-Length: {}\r\n", b.len());
        }
        head += "\r\n";
        let mut msg = head.into_bytes();
        msg.extend_from_slice(body.unwrap_or_default());
        tls.write_all(&msg)?;
        tls.flush()?;
        let mut raw = Vec::new();
        match tls.read_to_end(&mut raw) {
            Ok(_) => {}
            // A server may close without close_notify after a complete answer.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
            Err(e) => return Err(e),
        }
        parse_response(&raw, method == "HEAD")
    }

    /// A TLS connection to the hub, for callers that speak HTTP themselves.
    pub fn connect(&self) -> io::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
        let addr = (self.host.as_str(), self.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("cannot resolve {}", self.host)))?;
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(self.read_timeout)?;
        let name = rustls_pki_types::ServerName::try_from(self.host.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let conn = rustls::ClientConnection::new(self.tls.clone(), name).map_err(io::Error::other)?;
        Ok(rustls::StreamOwned::new(conn, tcp))
    }
}

/// Parses a complete HTTP/1.1 response (Content-Length, chunked or
/// close-delimited).
pub fn parse_response(raw: &[u8], head_only: bool) -> io::Result<Reply> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let mut fields = [httparse::EMPTY_HEADER; 128];
    let mut resp = httparse::Response::new(&mut fields);
    let n = match resp.parse(raw).map_err(|e| bad(&e.to_string()))? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Err(bad("incomplete response head")),
    };
    let status = resp.code.unwrap_or(0);
    let headers: Vec<(String, String)> =
        resp.headers.iter().map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned())).collect();
    let rest = &raw[n..];
    let find =
        |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_string());
    let body = if head_only || status == 204 || status == 304 {
        Vec::new()
    } else if find("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        dechunk(rest).ok_or_else(|| bad("bad chunked body"))?
    } else if let Some(len) = crate::http::content_length(&headers).map_err(|e| bad(&e.to_string()))? {
        let len = usize::try_from(len).map_err(|_| bad("Content-Length too large"))?;
        rest.get(..len).ok_or_else(|| bad("short body"))?.to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Reply { status, headers, body })
}

/// Decodes a complete chunked body.
pub fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let i = b.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::try_from(crate::http::chunk_size(&b[..i])?).ok()?;
        b = &b[i + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_and_chunks() {
        assert_eq!(super::parse_url("https://h:8443/x/").unwrap(), ("h".into(), 8443, "/x".into()));
        assert_eq!(super::parse_url("https://[::1]").unwrap(), ("::1".into(), 443, "".into()));
        assert!(super::parse_url("http://h").is_err());
        assert_eq!(super::dechunk(b"3\r\nabc\r\n1;x\r\nd\r\n0\r\n\r\n").unwrap(), b"abcd");
        let r = super::parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokextra", false).unwrap();
        assert_eq!(r.body, b"ok");
        assert!(super::parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok", false).is_err());
    }
}
