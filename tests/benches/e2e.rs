//! End-to-end benchmark (`cargo bench --bench e2e`): the same client
//! against the same nginx "API server" over TLS, on several paths.
//!
//! ```text
//!  direct    client ──TLS──► nginx
//!  uplink    client ──TLS──► uplink-hub ══tunnel (TLS)══► uplink run ──TLS──► nginx
//!  before    the same with other builds (UPLINK_BENCH_BASELINE=DIR holding
//!            uplink and uplink-hub), to compare before/after in one run
//!  bore      client ──TLS (end to end)── bore server ══TCP══ bore local ── nginx
//!            (`cargo install bore-cli`; skipped with a notice when missing)
//!  edge      uplink with an emulated edge link between agent and hub: a
//!            relay in this bench, 20 Mbit/s each way and 20 ms each way
//!            (40 ms RTT), with a small queue, since `tc netem` is not here
//! ```
//!
//! Real processes: nginx (`daemon off;`, temp prefix, rcgen certificate),
//! `uplink-hub serve` on a temp data dir, `uplink run` activated through
//! the hub's REST API. The client (HTTP/1.1 keep-alive, rustls,
//! `TCP_NODELAY`) is the same code for every path; only the address, the
//! trust root and the path prefix differ.
//!
//! Measured per round, paths interleaved, medians of the rounds reported
//! as ratios to direct: warm latency of a 2.5 KB JSON answer (like a small
//! `kubectl get`; c=1 p50, p99; all paths in turns of short runs, so a
//! slow spell falls on each alike; then again with each path pinned to
//! one CPU, see [`Pinning`]), request rate with 32 keep-alive clients,
//! CPU ms per 10k of those requests on each side of the tunnel (utime +
//! stime from /proc), bulk download of 64 MiB, upload of 64 MiB (a `PUT`
//! that nginx's WebDAV module stores, answering once all of it is in),
//! small-request latency while a bulk download runs on another
//! connection through the same tunnel, and a request on a fresh
//! connection (full TLS handshake). On the edge
//! link: small-request p50/p99 and the time to the first byte of a
//! watch-like stream while a download runs. Agent RSS when idle.
//!
//! `UPLINK_BENCH_QUICK=1` shortens every phase; `UPLINK_BENCH_ROUNDS=N`
//! (default 3); `UPLINK_BENCH_AGENT=PATH` runs another agent binary for
//! the uplink path (e.g. the shipped `--no-default-features` build);
//! `UPLINK_BENCH_BORE=PATH` names bore when it is not on `PATH`.
//! The one-CPU c=1 run needs `taskset` (util-linux); without it that
//! column says `-`.
//!
//! Needs `nginx` on `PATH` or in /usr/sbin; without it the bench says so
//! and exits 0.

#[path = "../hub_support/mod.rs"]
mod hub_support;

use hub_support::{free_port, spawn_agent_with, temp_dir, wait_for, write_kube_credentials};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use uplink::hub::client::Client;

/// The small answer: a 2.5 KB JSON list, like `kubectl get` of a few objects.
const SMALL: &str = "/small.json";
const LARGE: usize = 64 << 20;
const CLIENTS: usize = 32;
/// The emulated edge link, each direction.
const EDGE_BITS_PER_SEC: f64 = 20e6;
const EDGE_DELAY: Duration = Duration::from_millis(20);

/// How much of each phase to run.
struct Plan {
    rounds: usize,
    latency_requests: usize,
    rate_secs: f64,
    busy_requests: usize,
    fresh_requests: usize,
    edge_requests: usize,
}

impl Plan {
    fn from_env() -> Plan {
        let rounds = std::env::var("UPLINK_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok());
        if std::env::var_os("UPLINK_BENCH_QUICK").is_some() {
            Plan {
                rounds: rounds.unwrap_or(1),
                latency_requests: 300,
                rate_secs: 1.0,
                busy_requests: 200,
                fresh_requests: 20,
                edge_requests: 10,
            }
        } else {
            Plan {
                rounds: rounds.unwrap_or(3),
                latency_requests: 2000,
                rate_secs: 3.0,
                busy_requests: 1000,
                fresh_requests: 60,
                edge_requests: 30,
            }
        }
    }
}

// ---------------------------------------------------------------------
// The client: identical for both paths.

/// Where to send requests and how to trust the server.
#[derive(Clone)]
struct Endpoint {
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
    /// `""` direct, `/k8s/clusters/bench` through uplink.
    prefix: String,
    token: String,
}

impl Endpoint {
    fn request(&self, path: &str) -> Vec<u8> {
        format!(
            "GET {}{path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nUser-Agent: uplink-bench\r\nAccept: */*\r\n\r\n",
            self.prefix, self.addr, self.token
        )
        .into_bytes()
    }

    /// The head of a `PUT` of `len` bytes (nginx's WebDAV module stores
    /// it, answering once the whole body is in).
    fn put_head(&self, path: &str, len: usize) -> Vec<u8> {
        format!(
            "PUT {}{path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nUser-Agent: uplink-bench\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n",
            self.prefix, self.addr, self.token
        )
        .into_bytes()
    }

    fn connect(&self) -> Conn {
        let tcp = TcpStream::connect(self.addr).expect("connect");
        tcp.set_nodelay(true).unwrap();
        let name = ServerName::IpAddress(self.addr.ip().into());
        let tls = ClientConnection::new(self.tls.clone(), name).unwrap();
        Conn { io: StreamOwned::new(tls, tcp), buf: vec![0; 64 * 1024], start: 0, end: 0 }
    }
}

/// One keep-alive connection with its read buffer.
struct Conn {
    io: StreamOwned<ClientConnection, TcpStream>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Conn {
    /// Sends one prepared request and reads the whole answer; returns the
    /// body length. Panics on anything but `200` with `Content-Length`:
    /// the paths are known.
    fn get(&mut self, request: &[u8]) -> usize {
        self.io.write_all(request).expect("write request");
        self.io.flush().unwrap();
        let (len, head) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) = resp.parse(&self.buf[self.start..self.end]).expect("response head") {
                assert_eq!(resp.code, Some(200), "{}", String::from_utf8_lossy(&self.buf[self.start..self.end]));
                let len = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                    .expect("Content-Length");
                break (len, n);
            }
            self.fill();
        };
        self.start += head;
        let mut left = len;
        loop {
            let take = left.min(self.end - self.start);
            self.start += take;
            left -= take;
            if left == 0 {
                return len;
            }
            self.fill();
        }
    }

    fn fill(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = self.io.read(&mut self.buf[self.end..]).expect("read");
        assert!(n > 0, "server closed the connection");
        self.end += n;
    }
}

impl Conn {
    /// Sends a `PUT` head and its body, and reads the answer: `201` or
    /// `204` (created or replaced), with an empty or no body.
    fn put(&mut self, head: &[u8], body: &[u8]) {
        self.io.write_all(head).expect("write request head");
        for piece in body.chunks(256 * 1024) {
            self.io.write_all(piece).expect("write request body");
        }
        self.io.flush().unwrap();
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) = resp.parse(&self.buf[self.start..self.end]).expect("response head") {
                let text = String::from_utf8_lossy(&self.buf[self.start..self.end]).into_owned();
                assert!(matches!(resp.code, Some(201 | 204)), "{text}");
                let len = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                    .unwrap_or(0);
                assert_eq!(len, 0, "{text}");
                self.start += n;
                return;
            }
            self.fill();
        }
    }

    /// Sends a request for a stream (a watch) and returns once its head
    /// and the first body byte are in.
    fn first_body_byte(&mut self, request: &[u8]) {
        self.io.write_all(request).expect("write request");
        self.io.flush().unwrap();
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) = resp.parse(&self.buf[self.start..self.end]).expect("response head") {
                assert_eq!(resp.code, Some(200));
                if self.end - self.start > n {
                    return;
                }
            }
            self.fill();
        }
    }
}

// ---------------------------------------------------------------------
// Measurements.

#[derive(Clone, Copy, Default)]
struct Latency {
    p50: Duration,
    p99: Duration,
}

fn percentiles(mut v: Vec<Duration>) -> Latency {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    Latency { p50: at(0.50), p99: at(0.99) }
}

/// `n` small requests one after another on one warm connection.
fn warm_latency(ep: &Endpoint, n: usize) -> Latency {
    let req = ep.request(SMALL);
    let mut c = ep.connect();
    for _ in 0..n / 10 + 20 {
        c.get(&req);
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.get(&req);
        samples.push(t.elapsed());
    }
    percentiles(samples)
}

fn fresh_latency(ep: &Endpoint, n: usize) -> Latency {
    let mut tls = (*ep.tls).clone();
    tls.resumption = rustls::client::Resumption::disabled();
    let ep = Endpoint { tls: Arc::new(tls), ..ep.clone() };
    let req = ep.request(SMALL);
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + 3 {
        let t = Instant::now();
        let mut c = ep.connect();
        c.get(&req);
        let took = t.elapsed();
        c.io.conn.send_close_notify();
        let _ = c.io.flush();
        drop(c);
        if i >= 3 {
            samples.push(took);
        }
    }
    percentiles(samples)
}

/// Requests per second with `CLIENTS` keep-alive clients for `secs`;
/// also how many requests that was.
fn rate(ep: &Endpoint, secs: f64) -> (f64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let go = Arc::new(std::sync::Barrier::new(CLIENTS + 1));
    let total = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (ep, stop, go, total) = (ep.clone(), stop.clone(), go.clone(), total.clone());
            std::thread::spawn(move || {
                let req = ep.request(SMALL);
                let mut c = ep.connect();
                c.get(&req);
                go.wait();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    c.get(&req);
                    n += 1;
                }
                total.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    go.wait();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for th in threads {
        th.join().unwrap();
    }
    let n = total.load(Ordering::Relaxed);
    (n as f64 / t.elapsed().as_secs_f64(), n)
}

/// MiB/s of one download of the large file on a warm connection.
fn bulk(ep: &Endpoint) -> f64 {
    let req = ep.request("/large");
    let mut c = ep.connect();
    c.get(&ep.request(SMALL));
    let t = Instant::now();
    assert_eq!(c.get(&req), LARGE);
    LARGE as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64()
}

/// MiB/s of one upload of the large body on a warm connection: from the
/// first byte of the `PUT` to its answer, which nginx sends once the
/// whole body is stored.
fn upload(ep: &Endpoint, body: &[u8]) -> f64 {
    let head = ep.put_head("/up/large", body.len());
    let mut c = ep.connect();
    c.get(&ep.request(SMALL));
    let t = Instant::now();
    c.put(&head, body);
    body.len() as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64()
}

/// Downloads the large file over and over on its own connection until
/// dropped; dropping mid-body closes the connection.
struct Download {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Download {
    fn start(ep: &Endpoint) -> Download {
        let stop = Arc::new(AtomicBool::new(false));
        let (ep, flag) = (ep.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let req = ep.request("/large");
            let mut c = ep.connect();
            while !flag.load(Ordering::Relaxed) {
                if c.io.write_all(&req).and_then(|_| c.io.flush()).is_err() {
                    return;
                }
                // Read raw bytes: stop promptly, mid-body if need be. No
                // panics here: the bench profile aborts on one.
                let mut got = 0usize;
                while got < LARGE && !flag.load(Ordering::Relaxed) {
                    match c.io.read(&mut c.buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got += n,
                    }
                }
                if got < LARGE {
                    return;
                }
                // The head's bytes were counted as body: skip the excess
                // by reconnecting rather than parsing.
                c = ep.connect();
            }
        });
        Download { stop, thread: Some(thread) }
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Small-request latency while a bulk download runs through the same path.
fn busy_latency(ep: &Endpoint, n: usize, settle: Duration) -> Latency {
    let req = ep.request(SMALL);
    let mut c = ep.connect();
    c.get(&req);
    let _download = Download::start(ep);
    std::thread::sleep(settle);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.get(&req);
        samples.push(t.elapsed());
    }
    percentiles(samples)
}

/// Time to the first byte of a watch-like stream opened while a download
/// runs through the same path; `n` of them, each on a fresh request.
fn busy_watch_ttfb(ep: &Endpoint, n: usize, settle: Duration) -> Latency {
    let req = ep.request("/watch");
    let mut conns: Vec<Conn> = (0..n).map(|_| ep.connect()).collect();
    for c in &mut conns {
        c.get(&ep.request(SMALL));
    }
    let _download = Download::start(ep);
    std::thread::sleep(settle);
    let mut samples = Vec::with_capacity(n);
    for mut c in conns {
        let t = Instant::now();
        c.first_body_byte(&req);
        samples.push(t.elapsed());
    }
    percentiles(samples)
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU time of a process.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
}

// ---------------------------------------------------------------------
// The processes.

/// A child process killed (SIGTERM, then SIGKILL) when dropped.
struct Proc(Child);

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    /// SIGTERM first: nginx's master then stops its workers, which a
    /// killed master would leave running.
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        if !wait_for(5, || matches!(self.0.try_wait(), Ok(Some(_)))) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn find_program(name: &str, env: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin"));
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .chain(home)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

struct Nginx {
    proc: Proc,
    addr: SocketAddr,
    ca_pem: String,
}

/// A JSON list of about 2.5 KB, shaped like `kubectl get pods -o json`.
fn small_json() -> Vec<u8> {
    let items: Vec<_> = (0..6)
        .map(|i| {
            json!({
                "metadata": { "name": format!("web-7d4b9c8f6d-{i:05}"), "namespace": "default",
                    "uid": format!("3f1c2a9e-8b7d-4e6f-a5c4-{i:012}"), "resourceVersion": format!("{}", 81234 + i),
                    "labels": { "app": "web", "pod-template-hash": "7d4b9c8f6d" } },
                "spec": { "nodeName": "edge-1", "containers": [{ "name": "web", "image": "nginx:1.27" }] },
                "status": { "phase": "Running", "podIP": format!("10.42.0.{}", 10 + i) }
            })
        })
        .collect();
    let mut body = serde_json::to_vec(&json!({
        "apiVersion": "v1", "kind": "PodList", "metadata": { "resourceVersion": "81299" }, "items": items
    }))
    .unwrap();
    body.resize(2500.max(body.len()), b' ');
    body
}

/// The large file's bytes ([`LARGE`] of them, not compressible), served
/// for the download and sent as the upload.
fn large_body() -> Vec<u8> {
    (0..LARGE as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect()
}

fn start_nginx(bin: &Path, dir: &Path) -> Nginx {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "uplink bench CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let www = dir.join("www");
    std::fs::create_dir_all(www.join("up")).unwrap();
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    // nginx's workers store uploads there, as whatever user they run as.
    for d in [www.join("up"), dir.join("tmp")] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    std::fs::write(dir.join("cert.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(www.join("small.json"), small_json()).unwrap();
    std::fs::write(www.join("watch"), vec![b'\n'; 1 << 20]).unwrap();
    let large = large_body();
    std::fs::write(www.join("large"), large).unwrap();
    std::fs::write(www.join("version"), r#"{"gitVersion":"v1.32.0-nginx"}"#).unwrap();

    let port = free_port();
    let d = dir.display();
    // `/watch` trickles like a watch: events now and then, never done soon.
    let conf = format!(
        r#"worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp;
    sendfile on;
    tcp_nodelay on;
    keepalive_timeout 300s;
    keepalive_requests 10000000;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {d}/cert.pem;
        ssl_certificate_key {d}/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        root {d}/www;
        location = /version {{ default_type application/json; }}
        location = /small.json {{ default_type application/json; }}
        location /up/ {{ dav_methods PUT; client_max_body_size 128m; client_body_buffer_size 1m; }}
        location = /watch {{ default_type application/json; limit_rate 1k; }}
    }}
}}
"#
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = Command::new(bin)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn nginx");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(wait_for(10, || TcpStream::connect(addr).is_ok()), "nginx did not start; see {d}/error.log");
    Nginx { proc: Proc(child), addr, ca_pem: ca.pem() }
}

struct Hub {
    proc: Proc,
    addr: SocketAddr,
    ca_pem: String,
    admin: Client,
}

/// `uplink-hub serve` from `bin` on `port`; agents are told to dial it
/// at `public` (the hub itself, or a relay in front of it).
fn start_hub(bin: &Path, dir: &Path, port: u16, public: SocketAddr) -> Hub {
    std::fs::create_dir_all(dir).unwrap();
    let mut child = Command::new(bin)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--public-url", &format!("https://{public}")])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("hub.log")).unwrap())
        .spawn()
        .expect("spawn uplink-hub");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut token = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.starts_with("admin token") {
            token = line.rsplit(' ').next().unwrap().to_string();
        }
        if line.starts_with("hub CA:") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let ca_pem = std::fs::read_to_string(dir.join("data/ca.pem")).unwrap();
    let admin = Client::new(&format!("https://{addr}"), Some(&ca_pem), Some(&token)).unwrap();
    Hub { proc: Proc(child), addr, ca_pem, admin }
}

/// Registers `cluster` and runs `bin` as its agent.
fn start_agent(bin: &Path, dir: &Path, admin: &Client, cluster: &str, nginx: &Nginx) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    let r = admin.post_json("/api/v1/clusters", &json!({ "name": cluster })).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    std::fs::write(dir.join("activation.json"), r.json()["systemd_activation"].as_str().unwrap()).unwrap();
    write_kube_credentials(dir, "bench-agent-token\n", &nginx.ca_pem);
    let (activation, state) = (dir.join("activation.json"), dir.join("state"));
    let flags = ["--activation".as_ref(), activation.as_os_str(), "--state".as_ref(), state.as_os_str()];
    let kube_url = format!("https://{}", nginx.addr);
    let agent = Proc(spawn_agent_with(Command::new(bin), &flags, &kube_url, dir, &dir.join("agent.log")));
    let active =
        wait_for(30, || admin.get(&format!("/api/v1/clusters/{cluster}")).unwrap().json()["status"] == "ACTIVE");
    assert!(active, "agent did not connect; log:\n{}", std::fs::read_to_string(dir.join("agent.log")).unwrap());
    agent
}

/// bore: a server and a client exposing nginx's port through it. The
/// client connects to the server's fixed control port 7835.
fn start_bore(bin: &Path, dir: &Path, nginx: &Nginx) -> Option<(Proc, Proc, SocketAddr)> {
    if TcpStream::connect("127.0.0.1:7835").is_ok() {
        eprintln!("e2e bench: port 7835 (bore's control port) is taken; bore skipped");
        return None;
    }
    let log = |n: &str| std::fs::File::create(dir.join(n)).unwrap();
    let server = Proc(
        Command::new(bin)
            .args(["server", "--bind-addr", "127.0.0.1"])
            .stdout(log("bore-server.log"))
            .stderr(log("bore-server.err"))
            .spawn()
            .ok()?,
    );
    if !wait_for(10, || TcpStream::connect("127.0.0.1:7835").is_ok()) {
        eprintln!("e2e bench: bore server did not start; bore skipped");
        return None;
    }
    let port = free_port();
    let local = Proc(
        Command::new(bin)
            .args(["local", &nginx.addr.port().to_string(), "--local-host", "127.0.0.1", "--to", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .stdout(log("bore-local.log"))
            .stderr(log("bore-local.err"))
            .spawn()
            .ok()?,
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    if !wait_for(10, || TcpStream::connect(addr).is_ok()) {
        eprintln!("e2e bench: bore local did not connect; bore skipped");
        return None;
    }
    Some((server, local, addr))
}

// ---------------------------------------------------------------------
// The emulated edge link.

/// A TCP relay that behaves like a slow link: each direction is
/// serialized at `EDGE_BITS_PER_SEC` and delivered `EDGE_DELAY` later.
/// It reads only while its own queue (bytes waiting to go onto the link)
/// is short, like a router with a modest buffer, and its sockets' receive
/// buffers are tiny so they add next to nothing to that queue: what does
/// not fit waits in the sender's socket, where the sender's own policy
/// (TCP_NOTSENT_LOWAT, its scheduler) is in charge.
struct Relay {
    addr: SocketAddr,
}

/// Bytes waiting to go onto the emulated link before the relay stops
/// reading: about 13 ms of the link.
const EDGE_QUEUE: usize = 32 * 1024;
/// The relay's socket receive buffers (the kernel doubles and rounds up).
const EDGE_SOCKET_BUFFER: usize = 4 * 1024;

impl Relay {
    fn start(to: SocketAddr) -> Relay {
        let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        listener.set_recv_buffer_size(EDGE_SOCKET_BUFFER).unwrap();
        listener.set_reuse_address(true).unwrap();
        listener.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        listener.listen(16).unwrap();
        let listener: TcpListener = listener.into();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { return };
                let out = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                out.set_recv_buffer_size(EDGE_SOCKET_BUFFER).unwrap();
                if out.connect(&to.into()).is_err() {
                    continue;
                }
                let out: TcpStream = out.into();
                let _ = inbound.set_nodelay(true);
                let _ = out.set_nodelay(true);
                link(inbound.try_clone().unwrap(), out.try_clone().unwrap());
                link(out, inbound);
            }
        });
        Relay { addr }
    }
}

/// One direction of the link: a reader that schedules each chunk's
/// departure at the link rate, a writer that delivers it after the delay.
fn link(mut from: TcpStream, mut to: TcpStream) {
    type Queue = Mutex<std::collections::VecDeque<(Instant, Vec<u8>)>>;
    let queue: Arc<(Queue, Condvar)> = Arc::new((Mutex::new(Default::default()), Condvar::new()));
    let q = queue.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        let mut free_at = Instant::now(); // when the link finishes its current backlog
        let per_byte = Duration::from_secs_f64(8.0 / EDGE_BITS_PER_SEC);
        loop {
            // Read only while the backlog before the link is short.
            let backlog = free_at.saturating_duration_since(Instant::now());
            let max_backlog = per_byte * EDGE_QUEUE as u32;
            if backlog > max_backlog {
                std::thread::sleep(backlog - max_backlog);
            }
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            let now = Instant::now();
            free_at = free_at.max(now) + per_byte * n as u32;
            let (lock, cv) = &*q;
            lock.lock().unwrap().push_back((free_at + EDGE_DELAY, buf[..n].to_vec()));
            cv.notify_one();
            if n == 0 {
                return;
            }
        }
    });
    std::thread::spawn(move || {
        loop {
            let (at, bytes) = {
                let (lock, cv) = &*queue;
                let mut q = lock.lock().unwrap();
                while q.is_empty() {
                    q = cv.wait(q).unwrap();
                }
                q.pop_front().unwrap()
            };
            let wait = at.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            if bytes.is_empty() {
                let _ = to.shutdown(std::net::Shutdown::Write);
                return;
            }
            if to.write_all(&bytes).is_err() {
                let _ = from_shutdown(&to);
                return;
            }
        }
    });
}

fn from_shutdown(s: &TcpStream) -> std::io::Result<()> {
    s.shutdown(std::net::Shutdown::Both)
}

// ---------------------------------------------------------------------
// The run.

/// One way from the client to nginx.
struct Route {
    name: String,
    ep: Endpoint,
    /// The tunnel's two processes: (edge side, hub side).
    pids: Option<(u32, u32)>,
    /// Every process on the way (nginx's master and workers, the
    /// tunnel's two), pinned together for the one-CPU c=1 run.
    procs: Vec<u32>,
}

/// One round's numbers for one route.
#[derive(Clone, Copy, Default)]
struct Sample {
    warm: Latency,
    /// [`warm_latencies`] with the path pinned to one CPU; `None` without
    /// `taskset`.
    one_cpu: Option<Latency>,
    rate: f64,
    cpu_edge: f64,
    cpu_hub: f64,
    bulk: f64,
    /// MiB/s of a 64 MiB upload ([`upload`]).
    upload: f64,
    busy: Latency,
    fresh: Latency,
}

#[derive(Clone, Copy, Default)]
struct EdgeSample {
    idle: Latency,
    busy: Latency,
    watch: Latency,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Milliseconds of CPU per 10k requests.
fn cpu_per_10k(d: Duration, requests: u64) -> f64 {
    ms(d) * 10_000.0 / requests.max(1) as f64
}

/// Warm c=1 latency of every route, in turns: each route's requests
/// are split into [`LATENCY_TURNS`] runs on one warm connection per
/// route, the routes taking turns. Measured a route at a time, the c=1
/// p50 hung on what ran just before (one build in a given slot was the
/// slower one in six of seven runs, whichever build it was); in turns,
/// a slow spell of the machine falls on every route alike.
///
/// With `pin`, each route's turn runs with its processes and the
/// calling (measuring) thread on one CPU, and everything is unpinned
/// after the turn, so nothing stays pinned for the other phases.
fn warm_latencies(routes: &[Route], n: usize, pin: Option<&Pinning>) -> Vec<Latency> {
    let mut conns: Vec<(Vec<u8>, Conn)> = routes
        .iter()
        .map(|r| {
            let req = r.ep.request(SMALL);
            let mut c = r.ep.connect();
            for _ in 0..n / 10 + 20 {
                c.get(&req);
            }
            (req, c)
        })
        .collect();
    let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(n); routes.len()];
    let per_turn = n.div_ceil(LATENCY_TURNS);
    for turn in 0..LATENCY_TURNS {
        for k in 0..routes.len() {
            let i = (k + turn) % routes.len();
            let (req, c) = &mut conns[i];
            if let Some(pin) = pin {
                pin.pin(&routes[i].procs);
                // The moved threads' first requests run on cold caches.
                for _ in 0..PIN_SETTLE_REQUESTS {
                    c.get(req);
                }
            }
            for _ in 0..per_turn.min(n - samples[i].len()) {
                let t = Instant::now();
                c.get(req);
                samples[i].push(t.elapsed());
            }
            if let Some(pin) = pin {
                pin.unpin(&routes[i].procs);
            }
        }
    }
    samples.into_iter().map(percentiles).collect()
}

/// Turns of [`warm_latencies`].
const LATENCY_TURNS: usize = 20;
/// Requests not counted after a route is pinned.
const PIN_SETTLE_REQUESTS: usize = 5;

/// Pins processes to one CPU and back, with `taskset` (util-linux; the
/// crate has no `libc`, and `rustix` here lacks its `thread` feature).
///
/// Why: on a 2-vCPU VM the c=1 latency hangs on where the scheduler
/// puts the client, nginx and the tunnel's processes. A request that
/// crosses cores pays a vCPU wake-up each time, so the same binaries'
/// p50 moved between 196 and 373 µs, and which path happened to share a
/// core with the client mattered more than its code. On one CPU the
/// figure is the work the path does per request.
///
/// Not for the other phases: c=32, bulk and the edge link need both
/// CPUs, and [`warm_latencies`] unpins after every turn.
struct Pinning {
    /// The CPU everything goes to: the first the bench may run on.
    cpu: String,
    /// The bench's affinity when it started (all CPUs, unless it was run
    /// under `taskset` itself): what everything is given back.
    all: String,
}

impl Pinning {
    /// `None` (and a notice) when `taskset` cannot be run here. Call from
    /// the thread that measures: [`Pinning::pin`] pins the main thread.
    fn new() -> Option<Pinning> {
        let me = std::process::id().to_string();
        let out = match Command::new("taskset").args(["-c", "-p", &me]).output() {
            Ok(out) if out.status.success() => out,
            other => {
                eprintln!("e2e bench: taskset (util-linux) does not run here ({other:?}); the one-CPU c=1 run skipped");
                return None;
            }
        };
        // "pid 123's current affinity list: 0,1"
        let text = String::from_utf8_lossy(&out.stdout);
        let all = text.trim().rsplit_once(": ").map(|(_, l)| l.to_string())?;
        let cpu = all.split([',', '-']).next()?.to_string();
        Some(Pinning { cpu, all })
    }

    fn pin(&self, procs: &[u32]) {
        self.set(procs, &self.cpu);
    }

    fn unpin(&self, procs: &[u32]) {
        self.set(procs, &self.all);
    }

    /// Every thread of `procs` (`-a`: all of /proc/PID/task), and this
    /// process's main thread (its tid is the pid; without `-a` only it),
    /// which runs the measurements. Threads the client spawns later
    /// inherit the main thread's affinity, restored by then.
    fn set(&self, procs: &[u32], cpus: &str) {
        assert_eq!(std::thread::current().name(), Some("main"), "measure on the main thread");
        let me = std::process::id();
        for (pid, all_threads) in procs.iter().map(|&p| (p, true)).chain([(me, false)]) {
            let mut cmd = Command::new("taskset");
            if all_threads {
                cmd.arg("-a");
            }
            cmd.args(["-p", "-c", cpus, &pid.to_string()]).stdout(Stdio::null());
            // A thread that exits while taskset walks /proc/PID/task
            // fails that call (a hub's blocking-pool thread may): again.
            let mut last = None;
            for _ in 0..3 {
                match cmd.output() {
                    Ok(out) if out.status.success() => {
                        last = None;
                        break;
                    }
                    other => last = Some(other),
                }
            }
            assert!(last.is_none(), "taskset -p -c {cpus} {pid} failed: {last:?}");
        }
    }
}

/// The children of `pid` (nginx's workers), from each process's
/// /proc/PID/stat: its parent is the field after the state.
fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            rest.split_whitespace().nth(1).and_then(|x| x.parse::<u32>().ok()) == Some(pid)
        })
        .collect()
}

fn measure(route: &Route, plan: &Plan, warm: Latency, one_cpu: Option<Latency>, body: &[u8]) -> Sample {
    let cpu0 = route.pids.map(|(e, h)| (cpu_time(e), cpu_time(h)));
    let (rate, n) = rate(&route.ep, plan.rate_secs);
    let (cpu_edge, cpu_hub) = match (route.pids, cpu0) {
        (Some((e, h)), Some((e0, h0))) => (cpu_per_10k(cpu_time(e) - e0, n), cpu_per_10k(cpu_time(h) - h0, n)),
        _ => (f64::NAN, f64::NAN),
    };
    let bulk = bulk(&route.ep);
    let upload = upload(&route.ep, body);
    let busy = busy_latency(&route.ep, plan.busy_requests, Duration::from_millis(200));
    let fresh = fresh_latency(&route.ep, plan.fresh_requests);
    Sample { warm, one_cpu, rate, cpu_edge, cpu_hub, bulk, upload, busy, fresh }
}

fn measure_edge(ep: &Endpoint, plan: &Plan) -> EdgeSample {
    let idle = warm_latency(ep, plan.edge_requests / 3 + 1);
    // The download needs a moment to fill the link and the buffers.
    let busy = busy_latency(ep, plan.edge_requests, Duration::from_millis(1500));
    let watch = busy_watch_ttfb(ep, 5, Duration::from_millis(1500));
    EdgeSample { idle, busy, watch }
}

/// A bench user with a grant on every cluster of `hub`, and the client
/// endpoint for the cluster `bench` through it.
fn client_endpoint(hub: &Hub) -> Endpoint {
    let r = hub.admin.post_json("/api/v1/users", &json!({ "name": "bench", "groups": ["bench"] })).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let token = r.json()["token"].as_str().unwrap().to_string();
    let g = hub.admin.post_json("/api/v1/grants", &json!({ "user": "bench", "clusters": "*" })).unwrap();
    assert_eq!(g.status, 201, "{}", g.text());
    let tls = uplink::tls::client_config(&uplink::tls::Trust::CaPem(hub.ca_pem.clone()), None, &[b"http/1.1"]).unwrap();
    Endpoint { addr: hub.addr, tls, prefix: "/k8s/clusters/bench".into(), token }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` / `cargo test --benches` probe
    }
    let Some(nginx_bin) = find_program("nginx", "UPLINK_BENCH_NGINX") else {
        eprintln!("e2e bench: nginx not found (apt-get install nginx-light); skipped");
        return;
    };
    let plan = Plan::from_env();
    let dir = temp_dir("bench-e2e");
    let nginx = start_nginx(&nginx_bin, &dir.join("nginx"));
    let trust = |pem: &str| uplink::tls::client_config(&uplink::tls::Trust::CaPem(pem.into()), None, &[b"http/1.1"]);
    let direct =
        Endpoint { addr: nginx.addr, tls: trust(&nginx.ca_pem).unwrap(), prefix: String::new(), token: String::new() };
    let mut routes = vec![Route { name: "direct".into(), ep: direct.clone(), pids: None, procs: Vec::new() }];
    let mut edges: Vec<(String, Endpoint)> = Vec::new();
    // Kept alive until the end; dropped in reverse order.
    let mut procs: Vec<Proc> = Vec::new();
    let mut idle_rss = Vec::new();

    let this_build = (
        std::env::var_os("UPLINK_BENCH_AGENT").map_or(PathBuf::from(env!("CARGO_BIN_EXE_uplink")), PathBuf::from),
        PathBuf::from(env!("CARGO_BIN_EXE_uplink-hub")),
    );
    let mut builds = vec![("uplink".to_string(), this_build)];
    if let Some(base) = std::env::var_os("UPLINK_BENCH_BASELINE").map(PathBuf::from) {
        builds.push(("uplink before".to_string(), (base.join("uplink"), base.join("uplink-hub"))));
    }
    for (name, (agent_bin, hub_bin)) in &builds {
        let d = dir.join(name.replace(' ', "-"));
        let port = free_port();
        let hub = start_hub(hub_bin, &d.join("hub"), port, SocketAddr::from(([127, 0, 0, 1], port)));
        let agent = start_agent(agent_bin, &d.join("agent"), &hub.admin, "bench", &nginx);
        // The edge: another hub, whose public URL (what its agents dial)
        // is the relay in front of it.
        let port = free_port();
        let relay = Relay::start(SocketAddr::from(([127, 0, 0, 1], port)));
        let edge_hub = start_hub(hub_bin, &d.join("edge-hub"), port, relay.addr);
        let edge_agent = start_agent(agent_bin, &d.join("edge"), &edge_hub.admin, "bench", &nginx);
        let near = client_endpoint(&hub);
        let far = client_endpoint(&edge_hub);
        // First request through: proves the path and warms the agent's pool.
        near.connect().get(&near.request(SMALL));
        far.connect().get(&far.request(SMALL));
        std::thread::sleep(Duration::from_millis(300));
        idle_rss.push((
            name.clone(),
            proc_status_kib(agent.pid(), "VmRSS:"),
            proc_status_kib(hub.proc.pid(), "VmRSS:"),
        ));
        routes.push(Route {
            name: name.clone(),
            ep: near,
            pids: Some((agent.pid(), hub.proc.pid())),
            procs: Vec::new(),
        });
        edges.push((name.clone(), far));
        eprintln!(
            "e2e bench: {name}: hub pid {}, agent pid {}, edge hub pid {}, edge agent pid {}",
            hub.proc.pid(),
            agent.pid(),
            edge_hub.proc.pid(),
            edge_agent.pid()
        );
        procs.extend([edge_agent, edge_hub.proc, agent, hub.proc]);
    }
    match find_program("bore", "UPLINK_BENCH_BORE") {
        None => {
            eprintln!("e2e bench: bore not found (cargo install bore-cli, or UPLINK_BENCH_BORE=PATH); bore skipped")
        }
        Some(bin) => {
            if let Some((server, local, addr)) = start_bore(&bin, &dir, &nginx) {
                routes.push(Route {
                    name: "bore".into(),
                    ep: Endpoint { addr, ..direct.clone() },
                    pids: Some((local.pid(), server.pid())),
                    procs: Vec::new(),
                });
                procs.extend([local, server]);
            }
        }
    }
    // The bench profile aborts on panic, so no Drop runs then: say what
    // to stop by hand if an assertion fails.
    eprintln!("e2e bench: nginx pid {}, data in {}", nginx.proc.pid(), dir.display());
    // nginx's workers are up by now: every path but direct has sent a
    // request through.
    let nginx_pids: Vec<u32> = std::iter::once(nginx.proc.pid()).chain(children(nginx.proc.pid())).collect();
    for r in &mut routes {
        r.procs = nginx_pids.iter().copied().chain(r.pids.into_iter().flat_map(|(e, h)| [e, h])).collect();
    }
    let pinning = Pinning::new();

    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); routes.len()];
    let mut edge_samples: Vec<Vec<EdgeSample>> = vec![Vec::new(); edges.len()];
    // The upload's body: the download's bytes, made once.
    let upload_body = large_body();
    for round in 0..plan.rounds {
        // Interleaved, and each round in another order, so a noisy
        // neighbour's burst does not always land on the same path.
        let n = routes.len();
        eprintln!("e2e bench: round {}/{}: c=1 latency, every path in turns", round + 1, plan.rounds);
        let warm = warm_latencies(&routes, plan.latency_requests, None);
        let one_cpu = pinning.as_ref().map(|pin| {
            eprintln!(
                "e2e bench: round {}/{}: c=1 latency on CPU {}, every path in turns",
                round + 1,
                plan.rounds,
                pin.cpu
            );
            warm_latencies(&routes, plan.latency_requests, Some(pin))
        });
        for k in 0..n {
            let i = (k + round) % n;
            eprintln!("e2e bench: round {}/{}: {}", round + 1, plan.rounds, routes[i].name);
            samples[i].push(measure(&routes[i], &plan, warm[i], one_cpu.as_ref().map(|w| w[i]), &upload_body));
        }
        for k in 0..edges.len() {
            let i = (k + round) % edges.len();
            eprintln!("e2e bench: round {}/{}: {} over the edge link", round + 1, plan.rounds, edges[i].0);
            edge_samples[i].push(measure_edge(&edges[i].1, &plan));
        }
    }

    report(&routes, &samples, &edges, &edge_samples, &idle_rss, &plan, pinning.as_ref());
    drop(procs);
    drop(nginx);
    let _ = std::fs::remove_dir_all(&dir);
}

fn report(
    routes: &[Route],
    samples: &[Vec<Sample>],
    edges: &[(String, Endpoint)],
    edge_samples: &[Vec<EdgeSample>],
    idle_rss: &[(String, u64, u64)],
    plan: &Plan,
    pinning: Option<&Pinning>,
) {
    let med = |i: usize, f: &dyn Fn(&Sample) -> f64| median(samples[i].iter().map(f).collect());
    let d = |f: &dyn Fn(&Sample) -> f64| med(0, f);
    let (d50, drate, dbulk, dfresh) = (d(&|s| ms(s.warm.p50)), d(&|s| s.rate), d(&|s| s.bulk), d(&|s| ms(s.fresh.p50)));
    let dup = d(&|s| s.upload);
    let one_cpu = |s: &Sample| s.one_cpu.map_or(f64::NAN, |l| ms(l.p50));
    let d1 = d(&one_cpu);
    println!();
    println!(
        "uplink e2e: 2.5 KB JSON answers from nginx (TLS), {} CPUs, medians of {} rounds, paths interleaved",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        plan.rounds
    );
    println!();
    println!(
        "| path | c=1 p50 | × direct | c=1 p99 | c=1 p50, one CPU | × direct | c=32 req/s | × direct | bulk MiB/s | × direct | upload MiB/s | × direct | fresh conn p50 × direct | small p50 during bulk × idle | p99 during bulk | edge CPU ms/10k req | hub CPU ms/10k req |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, r) in routes.iter().enumerate() {
        let p50 = med(i, &|s| ms(s.warm.p50));
        let cpu = |x: f64| if x.is_nan() { "-".to_string() } else { format!("{x:.0}") };
        let p50_one = med(i, &one_cpu);
        let (p50_one, p50_one_x) = if p50_one.is_nan() {
            ("-".to_string(), "-".to_string())
        } else {
            (format!("{p50_one:.3} ms"), format!("{:.2}", p50_one / d1))
        };
        println!(
            "| {} | {:.3} ms | {:.2} | {:.3} ms | {p50_one} | {p50_one_x} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} ms | {} | {} |",
            r.name,
            p50,
            p50 / d50,
            med(i, &|s| ms(s.warm.p99)),
            med(i, &|s| s.rate),
            med(i, &|s| s.rate) / drate,
            med(i, &|s| s.bulk),
            med(i, &|s| s.bulk) / dbulk,
            med(i, &|s| s.upload),
            med(i, &|s| s.upload) / dup,
            med(i, &|s| ms(s.fresh.p50)) / dfresh,
            med(i, &|s| ms(s.busy.p50) / ms(s.warm.p50)),
            med(i, &|s| ms(s.busy.p99)),
            cpu(med(i, &|s| s.cpu_edge)),
            cpu(med(i, &|s| s.cpu_hub)),
        );
    }
    println!();
    match pinning {
        Some(pin) => println!(
            "c=1 p50, one CPU: the same c=1 runs in turns, each path's processes (nginx's master and workers, hub, agent, bore server and local; all their threads) and the bench's measuring thread pinned to CPU {} with taskset for its turn, then given back CPUs {}. Spread over the VM's CPUs, a request that crosses cores pays a vCPU wake-up, so the c=1 p50 above mixes each path's own work with where the scheduler happens to put its processes; on one CPU it is the work.",
            pin.cpu, pin.all
        ),
        None => println!("c=1 p50, one CPU: not measured (taskset not found)"),
    }
    if !edges.is_empty() {
        let rtt = ms(EDGE_DELAY) * 2.0;
        println!();
        println!(
            "Edge link between agent and hub: {:.0} Mbit/s each way, {rtt:.0} ms RTT, {} KiB queue; a 64 MiB download runs through the same tunnel",
            EDGE_BITS_PER_SEC / 1e6,
            EDGE_QUEUE / 1024
        );
        println!();
        println!(
            "| path | idle p50 | small p50 during download | p99 | × RTT (p50) | watch first byte during download (p50) | × RTT |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for (i, (name, _)) in edges.iter().enumerate() {
            let m = |f: &dyn Fn(&EdgeSample) -> f64| median(edge_samples[i].iter().map(f).collect());
            let busy = m(&|s| ms(s.busy.p50));
            let watch = m(&|s| ms(s.watch.p50));
            println!(
                "| {name} | {:.1} ms | {busy:.1} ms | {:.1} ms | {:.2} | {watch:.1} ms | {:.2} |",
                m(&|s| ms(s.idle.p50)),
                m(&|s| ms(s.busy.p99)),
                busy / rtt,
                watch / rtt
            );
        }
    }
    println!();
    println!("| build | agent RSS idle | hub RSS idle |");
    println!("|---|---:|---:|");
    for (name, agent, hub) in idle_rss {
        println!("| {name} | {:.1} MiB | {:.1} MiB |", *agent as f64 / 1024.0, *hub as f64 / 1024.0);
    }
    println!();
    println!("profile: bench (= release); CPU from /proc/PID/stat over the c=32 phase");
}
