//! End-to-end benchmark (`cargo bench --bench e2e`): one client, two
//! paths to the same nginx "API server" over TLS on loopback.
//!
//! ```text
//!  DIRECT  client ──TLS──► nginx
//!  UPLINK  client ──TLS──► uplink-hub ══tunnel (TLS)══► uplink run ──TLS──► nginx
//!          (GET /k8s/clusters/bench/PATH)
//! ```
//!
//! Real processes: nginx (`daemon off;`, temp prefix, rcgen certificate),
//! `uplink-hub serve` on a temp data dir, `uplink run` activated through
//! the hub's REST API. The client (HTTP/1.1 keep-alive, rustls,
//! `TCP_NODELAY`) is the same code for both paths; only the address, the
//! trust root and the path prefix differ.
//!
//! Measured, in one run so the ratios share the machine's mood:
//! warm small-request latency (p50, p99), request rate with 32 keep-alive
//! clients, bulk download of 64 MiB, a request on a fresh connection
//! (TCP + full TLS handshake, no resumption), and the RSS and CPU time of
//! the hub and the agent. The binaries are the ones `cargo bench` builds
//! (the `bench` profile inherits `release`). `UPLINK_BENCH_AGENT=PATH`
//! runs another agent binary (e.g. the shipped `--no-default-features`
//! build); `UPLINK_BENCH_QUICK=1` shortens every phase.
//!
//! Needs `nginx` on `PATH` or in /usr/sbin; without it the bench says so
//! and exits 0.

#[path = "../hub_support/mod.rs"]
mod hub_support;

use hub_support::{HubProc, temp_dir, wait_for};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use serde_json::json;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const CLUSTER: &str = "bench";
const SMALL: usize = 100;
const LARGE: usize = 64 << 20;
const CLIENTS: usize = 32;

/// How much of each phase to run.
struct Plan {
    latency_requests: usize,
    rate_secs: f64,
    bulk_rounds: usize,
    fresh_requests: usize,
}

impl Plan {
    fn from_env() -> Plan {
        if std::env::var_os("UPLINK_BENCH_QUICK").is_some() {
            Plan { latency_requests: 300, rate_secs: 1.5, bulk_rounds: 1, fresh_requests: 40 }
        } else {
            Plan { latency_requests: 2000, rate_secs: 5.0, bulk_rounds: 3, fresh_requests: 200 }
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

fn warm_latency(ep: &Endpoint, n: usize) -> Latency {
    let req = ep.request("/small");
    let mut c = ep.connect();
    for _ in 0..n / 10 + 20 {
        assert_eq!(c.get(&req), SMALL);
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
    let req = ep.request("/small");
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + 5 {
        let t = Instant::now();
        let mut c = ep.connect();
        assert_eq!(c.get(&req), SMALL);
        let took = t.elapsed();
        c.io.conn.send_close_notify();
        let _ = c.io.flush();
        drop(c);
        if i >= 5 {
            samples.push(took);
        }
    }
    percentiles(samples)
}

/// Requests per second with `CLIENTS` keep-alive clients for `secs`.
fn rate(ep: &Endpoint, secs: f64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let go = Arc::new(std::sync::Barrier::new(CLIENTS + 1));
    let total = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (ep, stop, go, total) = (ep.clone(), stop.clone(), go.clone(), total.clone());
            std::thread::spawn(move || {
                let req = ep.request("/small");
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
    total.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
}

/// Best MiB/s over `rounds` downloads of the large file.
fn bulk(ep: &Endpoint, rounds: usize) -> f64 {
    let req = ep.request("/large");
    let mut c = ep.connect();
    c.get(&ep.request("/small"));
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            assert_eq!(c.get(&req), LARGE);
            LARGE as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
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

struct Nginx {
    child: Child,
    addr: SocketAddr,
    ca_pem: String,
}

impl Drop for Nginx {
    /// SIGTERM, not SIGKILL: the master then stops its workers, which a
    /// killed master would leave running.
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let stopped = wait_for(5, || matches!(self.child.try_wait(), Ok(Some(_))));
        if !stopped {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn find_nginx() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
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
    std::fs::create_dir_all(&www).unwrap();
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    std::fs::write(dir.join("cert.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(www.join("small"), vec![b'x'; SMALL]).unwrap();
    let large: Vec<u8> = (0..LARGE as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(www.join("large"), large).unwrap();
    std::fs::write(www.join("version"), r#"{"gitVersion":"v1.32.0-nginx"}"#).unwrap();

    let port = free_port();
    let d = dir.display();
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
    Nginx { child, addr, ca_pem: ca.pem() }
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(dir: &Path, hub: &HubProc, nginx: &Nginx) -> Agent {
    let admin = hub.admin();
    let r = admin.post_json("/api/v1/clusters", &json!({ "name": CLUSTER })).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    std::fs::write(dir.join("activation.json"), r.json()["systemd_activation"].as_str().unwrap()).unwrap();
    std::fs::write(dir.join("kube-token"), "bench-agent-token\n").unwrap();
    std::fs::write(dir.join("kube-ca.pem"), &nginx.ca_pem).unwrap();
    let bin = std::env::var_os("UPLINK_BENCH_AGENT").map_or(PathBuf::from(env!("CARGO_BIN_EXE_uplink")), PathBuf::from);
    let child = Command::new(bin)
        .args(["run", "--activation"])
        .arg(dir.join("activation.json"))
        .arg("--state")
        .arg(dir.join("state"))
        .args(["--kube-url", &format!("https://{}", nginx.addr), "--kube-token-file"])
        .arg(dir.join("kube-token"))
        .arg("--kube-ca")
        .arg(dir.join("kube-ca.pem"))
        .args(["--health-addr", &format!("127.0.0.1:{}", free_port())])
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
        .spawn()
        .expect("spawn uplink");
    let agent = Agent(child);
    let active =
        wait_for(30, || admin.get(&format!("/api/v1/clusters/{CLUSTER}")).unwrap().json()["status"] == "ACTIVE");
    assert!(active, "agent did not connect; log:\n{}", std::fs::read_to_string(dir.join("agent.log")).unwrap());
    agent
}

// ---------------------------------------------------------------------
// The report.

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// How a ratio compares with the reverse tunnels' range `[best, worst]`.
fn verdict(ratio: f64, best: f64, worst: f64) -> &'static str {
    let lower_is_better = best < worst;
    let beats = if lower_is_better { ratio <= best } else { ratio >= best };
    let within = if lower_is_better { ratio <= worst } else { ratio >= worst };
    if beats {
        "BEATS all"
    } else if within {
        "within range"
    } else {
        "WORSE than all"
    }
}

fn row(name: &str, direct: String, uplink: String, ratio: f64, target: &str, verdict: &str) {
    println!("{name:<28} {direct:>14} {uplink:>14} {ratio:>8.2}x  {target:<14} {verdict}");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` / `cargo test --benches` probe
    }
    let Some(nginx_bin) = find_nginx() else {
        eprintln!("e2e bench: nginx not found (apt-get install nginx-light); skipped");
        return;
    };
    let plan = Plan::from_env();
    let dir = temp_dir("bench-e2e");
    let nginx = start_nginx(&nginx_bin, &dir.join("nginx"));
    let hub = HubProc::start_on_free_port(&dir);
    let agent = start_agent(&dir, &hub, &nginx);
    let admin = hub.admin();
    let r = admin.post_json("/api/v1/users", &json!({ "name": "bench", "groups": ["bench"] })).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let token = r.json()["token"].as_str().unwrap().to_string();
    let g = admin.post_json("/api/v1/grants", &json!({ "user": "bench", "clusters": CLUSTER })).unwrap();
    assert_eq!(g.status, 201, "{}", g.text());

    let trust = |pem: &str| uplink::tls::client_config(&uplink::tls::Trust::CaPem(pem.into()), None, &[b"http/1.1"]);
    let direct = Endpoint { addr: nginx.addr, tls: trust(&nginx.ca_pem).unwrap(), prefix: String::new(), token };
    let via = Endpoint {
        addr: hub.addr,
        tls: trust(&hub.ca_pem).unwrap(),
        prefix: format!("/k8s/clusters/{CLUSTER}"),
        ..direct.clone()
    };
    // A fresh connection does a full handshake, like a new kubectl process.
    let no_resume = |ep: &Endpoint| {
        let mut tls = (*ep.tls).clone();
        tls.resumption = rustls::client::Resumption::disabled();
        Endpoint { tls: Arc::new(tls), ..ep.clone() }
    };

    // First request through: proves the path and warms the agent's pool.
    assert_eq!(via.connect().get(&via.request("/small")), SMALL);
    std::thread::sleep(Duration::from_millis(500));
    let (hub_pid, agent_pid) = (hub.child.id(), agent.0.id());
    let rss_idle = (proc_status_kib(hub_pid, "VmRSS:"), proc_status_kib(agent_pid, "VmRSS:"));

    // The bench profile aborts on panic, so no Drop runs then: say what
    // to stop by hand if an assertion fails.
    eprintln!(
        "e2e bench: nginx pid {}, hub pid {hub_pid}, agent pid {agent_pid}, data in {}",
        nginx.child.id(),
        dir.display()
    );
    let phase = |name: &str| eprintln!("e2e bench: {name}");
    phase("warm latency");
    let lat = (warm_latency(&direct, plan.latency_requests), warm_latency(&via, plan.latency_requests));
    phase("request rate, 32 clients");
    let rd = rate(&direct, plan.rate_secs);
    let cpu0 = (cpu_time(hub_pid), cpu_time(agent_pid));
    let t0 = Instant::now();
    let ru = rate(&via, plan.rate_secs);
    let cpu_rate = (cpu_time(hub_pid) - cpu0.0, cpu_time(agent_pid) - cpu0.1);
    let requests = ru * t0.elapsed().as_secs_f64();
    phase("bulk 64 MiB");
    let bd = bulk(&direct, plan.bulk_rounds);
    let cpu1 = (cpu_time(hub_pid), cpu_time(agent_pid));
    let bu = bulk(&via, plan.bulk_rounds);
    let cpu_bulk = (cpu_time(hub_pid) - cpu1.0, cpu_time(agent_pid) - cpu1.1);
    phase("fresh connections");
    let fresh =
        (fresh_latency(&no_resume(&direct), plan.fresh_requests), fresh_latency(&no_resume(&via), plan.fresh_requests));
    std::thread::sleep(Duration::from_millis(500));
    let rss_load = (proc_status_kib(hub_pid, "VmRSS:"), proc_status_kib(agent_pid, "VmRSS:"));
    let hwm = (proc_status_kib(hub_pid, "VmHWM:"), proc_status_kib(agent_pid, "VmHWM:"));

    println!();
    println!(
        "uplink e2e: client -> nginx (TLS) vs client -> uplink-hub -> tunnel -> uplink -> nginx; {} CPUs; nginx 1 worker",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<28} {:>14} {:>14} {:>9}  {:<14} vs rathole/bore/ssh -R",
        "", "direct", "uplink", "ratio", "their range"
    );
    row(
        "small GET p50 (warm)",
        ms(lat.0.p50),
        ms(lat.1.p50),
        lat.1.p50.as_secs_f64() / lat.0.p50.as_secs_f64(),
        "1.3 - 2.0x",
        verdict(lat.1.p50.as_secs_f64() / lat.0.p50.as_secs_f64(), 1.3, 2.0),
    );
    row(
        "small GET p99 (warm)",
        ms(lat.0.p99),
        ms(lat.1.p99),
        lat.1.p99.as_secs_f64() / lat.0.p99.as_secs_f64(),
        "",
        "",
    );
    row(
        "requests/s, 32 clients",
        format!("{rd:.0}/s"),
        format!("{ru:.0}/s"),
        ru / rd,
        "0.07 - 0.5x",
        verdict(ru / rd, 0.5, 0.07),
    );
    row(
        "bulk 64 MiB (best)",
        format!("{bd:.0} MiB/s"),
        format!("{bu:.0} MiB/s"),
        bu / bd,
        "0.26 - 0.42x",
        verdict(bu / bd, 0.42, 0.26),
    );
    row(
        "fresh connection p50",
        ms(fresh.0.p50),
        ms(fresh.1.p50),
        fresh.1.p50.as_secs_f64() / fresh.0.p50.as_secs_f64(),
        "7 - 11x",
        verdict(fresh.1.p50.as_secs_f64() / fresh.0.p50.as_secs_f64(), 7.0, 11.0),
    );
    row(
        "fresh connection p99",
        ms(fresh.0.p99),
        ms(fresh.1.p99),
        fresh.1.p99.as_secs_f64() / fresh.0.p99.as_secs_f64(),
        "",
        "",
    );
    let mib = |k: u64| format!("{:.1} MiB", k as f64 / 1024.0);
    println!();
    println!("{:<28} {:>14} {:>14}   their edge process: 3.5 - 8 MiB", "RSS", "hub", "agent");
    println!(
        "{:<28} {:>14} {:>14}   {}",
        "idle, after connect",
        mib(rss_idle.0),
        mib(rss_idle.1),
        verdict_rss(rss_idle.1)
    );
    println!(
        "{:<28} {:>14} {:>14}   {}",
        "idle, after the load",
        mib(rss_load.0),
        mib(rss_load.1),
        verdict_rss(rss_load.1)
    );
    println!("{:<28} {:>14} {:>14}", "peak (VmHWM)", mib(hwm.0), mib(hwm.1));
    println!();
    let per = |d: Duration| format!("{:.1} us", d.as_secs_f64() * 1e6 / requests.max(1.0));
    let per_mib = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3 / (plan.bulk_rounds * 64) as f64);
    println!("{:<28} {:>14} {:>14}", "CPU", "hub", "agent");
    println!("{:<28} {:>14} {:>14}", "per request (rate phase)", per(cpu_rate.0), per(cpu_rate.1));
    println!("{:<28} {:>14} {:>14}", "per MiB (bulk phase)", per_mib(cpu_bulk.0), per_mib(cpu_bulk.1));
    println!("profile: bench (= release: opt-level z, LTO); data in {}", dir.display());
    drop(agent);
    drop(hub);
    drop(nginx);
    let _ = std::fs::remove_dir_all(&dir);
}

fn verdict_rss(kib: u64) -> &'static str {
    let mib = kib as f64 / 1024.0;
    if mib <= 3.5 {
        "BEATS all"
    } else if mib <= 8.0 {
        "within range"
    } else {
        "WORSE than all"
    }
}
