//! Operations endpoints on a local port: `/healthz` (the process runs),
//! `/readyz` (the tunnel is up) and `/metrics` (Prometheus text format
//! 0.0.4). One request per connection; the listener stays on localhost by
//! default because it has no authentication.

use smol::Async;
use smol::future::FutureExt as _;
use smol::io::{AsyncReadExt as _, AsyncWriteExt as _};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::rc::Rc;
use std::time::Duration;

/// Counters and gauges, updated in place on the one thread.
#[derive(Default)]
pub struct Metrics {
    pub tunnel_up: Cell<bool>,
    /// Tunnels up: one per hub replica (or the one through the public URL).
    pub tunnels: Cell<u64>,
    pub reconnects: Cell<u64>,
    active_streams: Cell<u64>,
    requests: RefCell<BTreeMap<u16, u64>>,
    bytes_to_hub: Cell<u64>,
    bytes_to_cluster: Cell<u64>,
}

/// Decrements the active-stream gauge when dropped.
pub struct ActiveGuard<'a>(&'a Metrics);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active_streams.set(self.0.active_streams.get().saturating_sub(1));
    }
}

impl Metrics {
    pub fn stream_started(&self) -> ActiveGuard<'_> {
        self.active_streams.set(self.active_streams.get() + 1);
        ActiveGuard(self)
    }

    pub fn active_streams(&self) -> u64 {
        self.active_streams.get()
    }

    /// Counts a finished request; `0` means it ended without a status
    /// (reset or broken off).
    pub fn request_done(&self, status: u16) {
        *self.requests.borrow_mut().entry(status).or_default() += 1;
    }

    pub fn add_to_hub(&self, n: usize) {
        self.bytes_to_hub.set(self.bytes_to_hub.get() + n as u64);
    }

    pub fn add_to_cluster(&self, n: usize) {
        self.bytes_to_cluster.set(self.bytes_to_cluster.get() + n as u64);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# HELP uplink_build_info The agent's version.\n# TYPE uplink_build_info gauge");
        let _ = writeln!(s, "uplink_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        let _ = writeln!(
            s,
            "# HELP uplink_tunnel_up Whether the tunnel to the hub is connected.\n# TYPE uplink_tunnel_up gauge"
        );
        let _ = writeln!(s, "uplink_tunnel_up {}", u8::from(self.tunnel_up.get()));
        let _ = writeln!(
            s,
            "# HELP uplink_tunnels Tunnels up, one per hub replica reached.\n# TYPE uplink_tunnels gauge\nuplink_tunnels {}",
            self.tunnels.get()
        );
        let _ = writeln!(s, "# HELP uplink_tunnel_reconnects_total Tunnel connections lost and dialled again.");
        let _ = writeln!(
            s,
            "# TYPE uplink_tunnel_reconnects_total counter\nuplink_tunnel_reconnects_total {}",
            self.reconnects.get()
        );
        let _ =
            writeln!(s, "# HELP uplink_streams_active Proxied requests in flight.\n# TYPE uplink_streams_active gauge");
        let _ = writeln!(s, "uplink_streams_active {}", self.active_streams.get());
        let _ = writeln!(s, "# HELP uplink_requests_total Proxied requests by status (0: broken off).");
        let _ = writeln!(s, "# TYPE uplink_requests_total counter");
        for (code, n) in self.requests.borrow().iter() {
            let _ = writeln!(s, "uplink_requests_total{{code=\"{code}\"}} {n}");
        }
        let _ = writeln!(
            s,
            "# HELP uplink_bytes_total Proxied body bytes by direction.\n# TYPE uplink_bytes_total counter"
        );
        let _ = writeln!(s, "uplink_bytes_total{{direction=\"to_hub\"}} {}", self.bytes_to_hub.get());
        let _ = writeln!(s, "uplink_bytes_total{{direction=\"to_cluster\"}} {}", self.bytes_to_cluster.get());
        s
    }
}

/// Binds the health listener; a bad address is a configuration error.
pub fn bind(addr: SocketAddr) -> std::io::Result<Async<TcpListener>> {
    Async::<TcpListener>::bind(addr)
}

/// Serves health requests forever. Each connection gets its own task
/// owned by the executor: a slow client cannot hold up another, and each
/// is bounded by a timeout.
pub async fn serve(listener: Async<TcpListener>, metrics: Rc<Metrics>, ex: Rc<smol::LocalExecutor<'static>>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            smol::Timer::after(Duration::from_millis(100)).await;
            continue;
        };
        let metrics = metrics.clone();
        // Detached: the task ends by itself within the timeout below.
        ex.spawn(async move {
            let _ = answer(conn, &metrics)
                .or(async {
                    smol::Timer::after(Duration::from_secs(5)).await;
                    Ok(())
                })
                .await;
        })
        .detach();
    }
}

async fn answer(mut conn: Async<TcpStream>, metrics: &Metrics) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let path = loop {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => break req.path.unwrap_or("/").to_string(),
            Ok(httparse::Status::Partial) if buf.len() < 8192 => continue,
            _ => return Ok(()),
        }
    };
    let (status, ctype, body) = match path.split('?').next().unwrap_or("") {
        "/healthz" | "/livez" => ("200 OK", "text/plain", "ok\n".to_string()),
        "/readyz" if metrics.tunnel_up.get() => ("200 OK", "text/plain", "ready: tunnel up\n".to_string()),
        "/readyz" => ("503 Service Unavailable", "text/plain", "not ready: tunnel down\n".to_string()),
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(resp.as_bytes()).await?;
    conn.flush().await
}

/// `uplink status`: asks a running agent. Blocking; returns the status
/// code and body.
pub fn query(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(addr)?.collect();
    let first = addrs.first().ok_or_else(|| std::io::Error::other("address resolved to nothing"))?;
    let mut s = TcpStream::connect_timeout(first, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_metrics() {
        let m = Metrics::default();
        m.tunnel_up.set(true);
        {
            let _g = m.stream_started();
            assert_eq!(m.active_streams(), 1);
        }
        m.request_done(200);
        m.request_done(200);
        m.request_done(403);
        m.add_to_hub(10);
        let text = m.render();
        assert!(text.contains("uplink_tunnel_up 1\n"));
        assert!(text.contains("uplink_streams_active 0\n"));
        assert!(text.contains("uplink_requests_total{code=\"200\"} 2\n"));
        assert!(text.contains("uplink_requests_total{code=\"403\"} 1\n"));
        assert!(text.contains("uplink_bytes_total{direction=\"to_hub\"} 10\n"));
    }
}
