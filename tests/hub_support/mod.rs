//! Helpers for the hub's integration tests: a real `uplink-hub serve`
//! process on a temporary data directory, and simulated agents that speak
//! the tunnel protocol (driver + `Mux::agent`) over rustls.
//!
//! The simulated agent answers each stream by echoing what it received
//! as JSON (method, path, identity, header names, body), streams a few
//! chunks for `/watch`, and after a `101` echoes raw bytes until the hub
//! half-closes, then says `bye` and half-closes itself.
#![allow(dead_code)]

use smol::future::FutureExt;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uplink::driver::Session;
use uplink::hub::client::Client;
use uplink::proto::{AgentInfo, Config, GoAwayCode, Header, Mux, RequestHead, ResponseHead};
use uplink::tls::{Trust, client_config};

pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "uplink-hub-test-{tag}-{}-{}",
        std::process::id(),
        uplink::secret::Secret::random(6).expose()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running `uplink-hub serve`.
pub struct HubProc {
    pub child: Child,
    pub dir: PathBuf,
    pub addr: SocketAddr,
    /// `https://127.0.0.1:PORT`
    pub url: String,
    pub ca_pem: String,
    /// Printed only on the first start.
    pub admin_token: Option<String>,
    pub stdout: Vec<String>,
}

impl HubProc {
    pub fn start(dir: &Path) -> HubProc {
        HubProc::start_with(dir, &["--listen", "127.0.0.1:0"])
    }

    /// On a fixed port whose public URL is `https://127.0.0.1:PORT`, so
    /// real agents dial exactly what the activation says.
    pub fn start_on_free_port(dir: &Path) -> HubProc {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let url = format!("https://127.0.0.1:{port}");
        HubProc::start_with(dir, &["--listen", &listen, "--public-url", &url])
    }

    pub fn start_with(dir: &Path, args: &[&str]) -> HubProc {
        let mut hub = Command::new(env!("CARGO_BIN_EXE_uplink-hub"));
        hub.arg("serve").args(args).arg("--data-dir").arg(dir.join("data"));
        HubProc::start_command(dir, hub)
    }

    /// A replica on the shared `store` (`postgres://...`), listening on
    /// `listen`; agents are sent to `public` and, from the replica set, to
    /// `advertise`. Its `url` is `https://127.0.0.1:PORT`, also when it
    /// listens on every address.
    pub fn start_replica(dir: &Path, store: &str, listen: SocketAddr, public: &str, advertise: &str) -> HubProc {
        let listen = listen.to_string();
        let mut hub = HubProc::start_with(
            dir,
            &["--listen", &listen, "--store", store, "--public-url", public, "--advertise-url", advertise],
        );
        hub.url = format!("https://127.0.0.1:{}", hub.addr.port());
        hub
    }

    /// Runs `hub`, a prepared `uplink-hub serve ... --data-dir DIR/data`
    /// (perhaps behind a launcher), and waits until it listens.
    pub fn start_command(dir: &Path, mut hub: Command) -> HubProc {
        let mut child = hub
            .stdout(Stdio::piped())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(dir.join("hub.log")).unwrap())
            .spawn()
            .expect("spawn uplink-hub");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stdout = Vec::new();
        let mut addr = None;
        let mut admin_token = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(rest) = line.split("listening on https://").nth(1) {
                addr = Some(rest.trim().parse::<SocketAddr>().unwrap());
            }
            if line.starts_with("admin token") {
                admin_token = Some(line.rsplit(' ').next().unwrap().to_string());
            }
            let done = line.starts_with("hub CA:");
            stdout.push(line);
            if done {
                break;
            }
        }
        // Keep draining so the hub never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let addr = addr.unwrap_or_else(|| panic!("no listening line in {stdout:?}"));
        let ca_pem = std::fs::read_to_string(dir.join("data/ca.pem")).unwrap();
        HubProc { child, dir: dir.to_path_buf(), addr, url: format!("https://{addr}"), ca_pem, admin_token, stdout }
    }

    pub fn client(&self, token: Option<&str>) -> Client {
        Client::new(&self.url, Some(&self.ca_pem), token).unwrap()
    }

    pub fn admin(&self) -> Client {
        self.client(self.admin_token.as_deref())
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.child.wait().unwrap()
    }

    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("hub.log")).unwrap_or_default()
    }
}

impl Drop for HubProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A port nothing listens on now (the kernel's pick, released at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One sample of a metric in a Prometheus text page: the line that starts
/// with `name` (labels included) and a space.
pub fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// The resident memory of process `pid` (VmRSS), in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The replica id `hub` logged when it joined the shared store.
pub fn replica_id(hub: &HubProc) -> String {
    let log = hub.log();
    let line = log.lines().find(|l| l.contains("replica joined id=")).unwrap_or_else(|| panic!("no id in {log}"));
    line.split("replica joined id=").nth(1).unwrap().split_whitespace().next().unwrap().to_string()
}

/// The sample of `name` (labels included, as the page writes them) in
/// `hub`'s `/metrics`.
pub fn hub_metric(hub: &HubProc, name: &str) -> f64 {
    let page = hub.client(None).get("/metrics").unwrap().text();
    metric(&page, name).unwrap_or_else(|| panic!("no {name} in\n{page}"))
}

/// `POST /v1/activate` with the id and code of `activation` (a
/// registration's), as a simulated agent ([`sim_info`]) would: the status
/// and the answer.
pub fn activate(hub: &HubProc, activation: &serde_json::Value) -> (u16, serde_json::Value) {
    let info = sim_info();
    let r = hub
        .client(None)
        .post_json(
            "/v1/activate",
            &serde_json::json!({
                "activation_id": activation["activation_id"], "activation_code": activation["activation_code"],
                "agent_version": info.agent_version, "arch": info.arch, "kube_version": info.kube_version,
                "node_count": info.node_count,
            }),
        )
        .unwrap();
    (r.status, r.json())
}

/// Registers `name` on `hub` and activates it as a simulated agent would;
/// the agent credential.
pub fn register_and_activate(hub: &HubProc, admin: &str, name: &str) -> String {
    let r = hub.client(Some(admin)).post_json("/api/v1/clusters", &serde_json::json!({ "name": name })).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let (status, answer) = activate(hub, &r.json()["activation"]);
    assert_eq!(status, 200, "{answer}");
    answer["credential"].as_str().unwrap().to_string()
}

/// Polls `f` until it is true or `secs` pass.
pub fn wait_for(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The admin CLI (`uplink-hub --hub-url ... --token ...`) against `hub`.
pub fn hub_cli(hub: &HubProc, token: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_uplink-hub"))
        .args(["--hub-url", &hub.url, "--token", token, "--hub-ca"])
        .arg(hub.dir.join("data/ca.pem"))
        .args(args)
        .output()
        .unwrap()
}

/// Writes the agent's API-server credentials where [`spawn_agent`] has the
/// agent read them: `dir/token` and `dir/kube-ca.pem`.
pub fn write_kube_credentials(dir: &Path, token: &str, ca_pem: &str) {
    std::fs::write(dir.join("token"), token).unwrap();
    std::fs::write(dir.join("kube-ca.pem"), ca_pem).unwrap();
}

/// A real `uplink run` against the API server at `kube_url`: `flags` say
/// where the activation and the state are; `dir` holds the agent's kube
/// credentials (`token`, `kube-ca.pem`); stderr goes to `log`.
pub fn spawn_agent(flags: &[&std::ffi::OsStr], kube_url: &str, dir: &Path, log: &Path) -> Child {
    spawn_agent_with(Command::new(env!("CARGO_BIN_EXE_uplink")), flags, kube_url, dir, log)
}

/// [`spawn_agent`] with the program given: another build of the agent, or
/// one behind a launcher such as `qemu-aarch64-static`.
pub fn spawn_agent_with(agent: Command, flags: &[&std::ffi::OsStr], kube_url: &str, dir: &Path, log: &Path) -> Child {
    spawn_agent_at(agent, flags, kube_url, dir, log, &format!("127.0.0.1:{}", free_port()))
}

/// [`spawn_agent_with`], its health and metrics server on `health`
/// (`127.0.0.1:PORT`), for a test that reads them.
pub fn spawn_agent_at(
    mut agent: Command,
    flags: &[&std::ffi::OsStr],
    kube_url: &str,
    dir: &Path,
    log: &Path,
    health: &str,
) -> Child {
    agent
        .arg("run")
        .args(flags)
        .args(["--kube-url", kube_url, "--kube-token-file"])
        .arg(dir.join("token"))
        .arg("--kube-ca")
        .arg(dir.join("kube-ca.pem"))
        .args(["--health-addr", health])
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the agent {agent:?}: {e}"))
}

/// Kills a process if the test fails before it exits by itself.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The exit code of `child` once it exits within `timeout`.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<i32> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Its stdout, after asserting that the command succeeded.
#[track_caller]
pub fn ok(o: &Output) -> String {
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "command failed: {out}\n{err}");
    out.into_owned()
}

/// Asserts that the command failed saying `message` on stderr.
#[track_caller]
pub fn fails(o: &Output, message: &str) {
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success(), "should have failed: {out}");
    assert!(err.contains(message), "expected {message:?} in:\n{err}");
}

/// What the simulated agents observed.
#[derive(Default, Debug)]
pub struct SimState {
    /// Sessions that completed the handshake.
    pub connected: usize,
    /// HTTP status the hub answered instead of 101, per refused dial.
    pub refused: Vec<u16>,
    pub heads: Vec<RequestHead>,
    pub goaways: Vec<(GoAwayCode, String)>,
    pub ended: usize,
}

/// One thread running `n` simulated agent sessions.
pub struct SimAgents {
    pub state: Arc<Mutex<SimState>>,
    stop: Option<smol::channel::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SimAgents {
    pub fn start(addr: SocketAddr, ca_pem: &str, credential: &str, n: usize) -> SimAgents {
        let state = Arc::new(Mutex::new(SimState::default()));
        let (tx, rx) = smol::channel::bounded::<()>(1);
        let (st, ca, cred) = (state.clone(), ca_pem.to_string(), credential.to_string());
        let thread = std::thread::spawn(move || {
            let ex = smol::LocalExecutor::new();
            smol::block_on(ex.run(async {
                let tasks: Vec<_> =
                    (0..n).map(|_| ex.spawn(run_agent(addr, ca.clone(), cred.clone(), st.clone()))).collect();
                let all = async {
                    for t in tasks {
                        t.await;
                    }
                };
                all.or(async {
                    let _ = rx.recv().await;
                })
                .await;
            }));
        });
        SimAgents { state, stop: Some(tx), thread: Some(thread) }
    }

    /// Stops every session abruptly (like a killed agent).
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.try_send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for SimAgents {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A simulated agent's dial: TLS to the hub, `GET /v1/tunnel` with the
/// agent's credential; the TLS stream and the answer's status (0 when the
/// hub closed before a whole head).
pub async fn dial_tunnel(
    addr: SocketAddr,
    ca: String,
    credential: &str,
) -> (futures_rustls::client::TlsStream<smol::net::TcpStream>, u16) {
    let tls = client_config(&Trust::CaPem(ca), None, &[b"http/1.1"]).unwrap();
    let tcp = smol::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let mut io = futures_rustls::TlsConnector::from(tls).connect(name, tcp).await.unwrap();
    let req = format!(
        "GET /v1/tunnel HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: uplink/1\r\nAuthorization: Bearer {credential}\r\n\r\n"
    );
    io.write_all(req.as_bytes()).await.unwrap();
    io.flush().await.unwrap();
    // Byte by byte, so nothing after the head is read ahead.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if io.read(&mut b).await.unwrap_or(0) == 0 {
            return (io, 0);
        }
        head.push(b[0]);
    }
    let status = String::from_utf8_lossy(&head).split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (io, status)
}

/// What a simulated agent says of itself (in its activation and `Hello`).
pub fn sim_info() -> AgentInfo {
    AgentInfo { agent_version: "sim-0.1".into(), arch: "x86_64".into(), kube_version: "v1.32.0".into(), node_count: 3 }
}

async fn run_agent(addr: SocketAddr, ca: String, credential: String, state: Arc<Mutex<SimState>>) {
    let (io, status) = dial_tunnel(addr, ca, &credential).await;
    if status != 101 {
        state.lock().unwrap().refused.push(status);
        return;
    }
    let session = Session::new(Mux::agent(Config::default(), sim_info(), Instant::now()));
    let serve = async {
        if session.connected().await.is_ok() {
            state.lock().unwrap().connected += 1;
        }
        let ex = Rc::new(smol::LocalExecutor::new());
        let streams = async {
            while let Some((stream, head)) = session.accept().await {
                state.lock().unwrap().heads.push(head.clone());
                ex.spawn(answer(stream, head)).detach();
            }
            std::future::pending::<()>().await
        };
        ex.run(streams).await
    };
    async {
        session.run(io).await;
    }
    .or(serve)
    .await;
    let mut st = state.lock().unwrap();
    if let Some(g) = session.goaway_received() {
        st.goaways.push(g);
    }
    st.ended += 1;
}

async fn answer(mut stream: uplink::driver::Stream, head: RequestHead) {
    let upgrade = head.headers.iter().any(|h| h.name.eq_ignore_ascii_case(b"upgrade"));
    if upgrade {
        let _ = stream.send_head(ResponseHead { status: 101, headers: vec![Header::new("X-Sim", "upgraded")] });
        while let Ok(Some(chunk)) = stream.read_chunk().await {
            if stream.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = stream.write_all(b"bye").await;
        stream.finish();
        // Keep the handle until the hub has seen End.
        smol::Timer::after(Duration::from_millis(200)).await;
        return;
    }
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = stream.read_chunk().await {
        body.extend_from_slice(&chunk);
    }
    if head.path.starts_with("/watch") {
        let _ = stream
            .send_head(ResponseHead { status: 200, headers: vec![Header::new("Content-Type", "application/json")] });
        for i in 0..3 {
            let _ = stream.write_all(format!("{{\"type\":\"ADDED\",\"n\":{i}}}\n").as_bytes()).await;
            smol::Timer::after(Duration::from_millis(150)).await;
        }
        stream.finish();
        smol::Timer::after(Duration::from_millis(200)).await;
        return;
    }
    let names: Vec<String> = head.headers.iter().map(|h| String::from_utf8_lossy(&h.name).to_lowercase()).collect();
    let reply = serde_json::json!({
        "method": head.method,
        "path": head.path,
        "user": head.identity.user,
        "groups": head.identity.groups,
        "headers": names,
        "body": String::from_utf8_lossy(&body),
    });
    let bytes = serde_json::to_vec(&reply).unwrap();
    let mut headers = vec![Header::new("Content-Type", "application/json"), Header::new("X-Sim", "yes")];
    if head.path.starts_with("/cl") {
        headers.push(Header::new("Content-Length", bytes.len().to_string()));
    }
    // A compromised cluster trying to act on the hub's origin.
    if head.path.starts_with("/hostile") {
        headers.push(Header::new("Set-Cookie", "session=stolen"));
        headers.push(Header::new("Access-Control-Allow-Origin", "*"));
        headers.push(Header::new("Content-Security-Policy", "script-src *"));
    }
    // An agent whose framing the hub must not trust.
    if head.path.starts_with("/bad-length") {
        headers.push(Header::new("Content-Length", format!("+{}", bytes.len())));
    }
    if head.path.starts_with("/split") {
        headers.push(Header::new("X-Evil", "a\r\nSet-Cookie: session=stolen"));
    }
    let _ =
        stream.send_head(ResponseHead { status: if head.path.starts_with("/missing") { 404 } else { 200 }, headers });
    let _ = stream.write_all(&bytes).await;
    stream.finish();
    smol::Timer::after(Duration::from_millis(200)).await;
}

/// A TCP connection to `dst` from the loopback address `src` (any
/// 127.0.0.N works on Linux without configuration), so tests can stand
/// for several client addresses.
pub fn tcp_from(src: std::net::Ipv4Addr, dst: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    use rustix::net::{AddressFamily, SocketType, bind, connect, socket};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None)?;
    bind(&fd, &SocketAddr::from((src, 0)))?;
    connect(&fd, &dst)?;
    Ok(std::net::TcpStream::from(fd))
}

/// A blocking TLS client session to the hub over `tcp`.
pub fn tls_over(
    hub: &HubProc,
    tcp: std::net::TcpStream,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let cfg = client_config(&Trust::CaPem(hub.ca_pem.clone()), None, &[]).unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    rustls::StreamOwned::new(rustls::ClientConnection::new(cfg, name).unwrap(), tcp)
}
