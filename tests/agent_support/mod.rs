//! Support for the agent's integration tests: a small hub built on the
//! same mux and driver ([`FakeHub`]: `/v1/activate` and `/v1/tunnel` as
//! CONVENTIONS.md says, over rustls with an rcgen certificate), a handle
//! on a spawned `uplink` process ([`Agent`]), and a tiny HTTP CONNECT
//! proxy ([`ConnectProxy`]).
//!
//! The hub runs on its own thread with its own smol executor; tests talk
//! to it through channels and read what it saw from [`HubState`].
#![allow(dead_code)]

use futures_rustls::TlsAcceptor;
use serde_json::{Value, json};
use smol::future::FutureExt as _;
use smol::io::{AsyncReadExt as _, AsyncWriteExt as _};
use smol::{Async, LocalExecutor};
use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use uplink::driver::Session;
use uplink::proto::{Config, GoAwayCode, Header, Hello, Identity, Mux, RequestHead};

/// Generous: the test machine is small and shared.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// What the hub knows and saw.
#[derive(Debug, Default)]
pub struct HubState {
    pub cluster: String,
    pub activation_id: String,
    pub activation_code: String,
    pub expires_at: String,
    pub code_used: bool,
    /// Successful activations.
    pub activations: u32,
    pub activate_requests: Vec<Value>,
    pub credential: String,
    /// The credential was revoked: tunnels get 403 cluster_deregistered.
    pub revoked: bool,
    /// Tunnel upgrades accepted.
    pub tunnels: u32,
    pub hello: Option<Hello>,
    pub connected: bool,
    /// `Authorization` values seen on tunnel requests.
    pub tunnel_auth: Vec<String>,
}

enum Cmd {
    Stop,
    Open(Box<OpenCmd>),
    GoAway(GoAwayCode, String),
    Replicas(uplink::proto::ReplicaSet),
}

struct OpenCmd {
    head: RequestHead,
    body: Vec<u8>,
    finish: bool,
    events: mpsc::Sender<Ev>,
    input: smol::channel::Receiver<In>,
}

/// What a hub-side stream reports to the test.
#[derive(Debug)]
pub enum Ev {
    Head(u16, Vec<(String, String)>),
    Data(Vec<u8>),
    End,
    Reset(String),
}

/// What the test tells a hub-side stream.
#[derive(Debug)]
pub enum In {
    Data(Vec<u8>),
    Finish,
    Reset,
    /// Stop reading the stream (its credit runs out).
    Pause,
    Resume,
}

/// A hub for tests. Restartable on the same port with the same key.
pub struct FakeHub {
    pub addr: SocketAddr,
    pub ca_pem: String,
    cert_pem: String,
    key_pem: String,
    pub state: Arc<Mutex<HubState>>,
    cmds: smol::channel::Sender<Cmd>,
    thread: Option<JoinHandle<()>>,
}

static SEQ: AtomicU64 = AtomicU64::new(1);

/// A CA and a server certificate for 127.0.0.1 signed by it.
fn certs() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "fake-hub-ca");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let mut sp = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    sp.distinguished_name.push(DnType::CommonName, "fake-hub");
    let key = KeyPair::generate().unwrap();
    let cert = sp.signed_by(&key, &ca_cert, &ca_key).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

impl FakeHub {
    pub fn start() -> FakeHub {
        let (ca_pem, cert_pem, key_pem) = certs();
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let state = Arc::new(Mutex::new(HubState {
            cluster: "edge-1".into(),
            activation_id: format!("act_{n}"),
            activation_code: format!("code-{n}-{}", std::process::id()),
            expires_at: "2099-01-01T00:00:00Z".into(),
            credential: format!("cred-{n}-{}", std::process::id()),
            ..Default::default()
        }));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (cmds, thread) = spawn_hub(listener, &cert_pem, &key_pem, state.clone());
        FakeHub { addr, ca_pem, cert_pem, key_pem, state, cmds, thread: Some(thread) }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The activation JSON for this hub's current activation.
    pub fn activation_json(&self) -> String {
        let s = self.state.lock().unwrap();
        json!({
            "cluster": s.cluster,
            "hub_url": self.url(),
            "activation_id": s.activation_id,
            "activation_code": s.activation_code,
            "expires_at": s.expires_at,
            "hub_ca_pem": self.ca_pem,
        })
        .to_string()
    }

    /// Registers the cluster again: a new activation id and code.
    pub fn reregister(&self) {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let mut s = self.state.lock().unwrap();
        s.activation_id = format!("act_{n}");
        s.activation_code = format!("code-{n}");
        s.code_used = false;
        s.credential = format!("cred-{n}");
    }

    pub fn stop(&mut self) {
        let _ = self.cmds.send_blocking(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.state.lock().unwrap().connected = false;
    }

    /// Stops, then listens again on the same address with the same key.
    pub fn restart(&mut self) {
        self.stop();
        let listener = TcpListener::bind(self.addr).unwrap();
        let (cmds, thread) = spawn_hub(listener, &self.cert_pem, &self.key_pem, self.state.clone());
        self.cmds = cmds;
        self.thread = Some(thread);
    }

    pub fn tunnels(&self) -> u32 {
        self.state.lock().unwrap().tunnels
    }

    pub fn activations(&self) -> u32 {
        self.state.lock().unwrap().activations
    }

    /// Waits until a tunnel is up (the `n`-th one when `n` > 0).
    pub fn wait_connected(&self, n: u32) {
        wait_for("the agent's tunnel", || {
            let s = self.state.lock().unwrap();
            s.connected && s.tunnels >= n
        });
    }

    /// Revokes the credential and tells the live session so.
    pub fn deregister(&self) {
        self.state.lock().unwrap().revoked = true;
        let _ = self.cmds.send_blocking(Cmd::GoAway(GoAwayCode::Deregistered, "cluster deregistered".into()));
    }

    pub fn go_away(&self, code: GoAwayCode) {
        let _ = self.cmds.send_blocking(Cmd::GoAway(code, "test".into()));
    }

    /// Tells the live session this replica set (sent as is: a test may
    /// send one that breaks the rules).
    pub fn replicas(&self, set: uplink::proto::ReplicaSet) {
        let _ = self.cmds.send_blocking(Cmd::Replicas(set));
    }

    /// Opens a stream carrying a request; `finish` ends the request body.
    pub fn open(
        &self,
        method: &str,
        path: &str,
        identity: Identity,
        headers: &[(&str, &str)],
        body: &[u8],
        finish: bool,
    ) -> HubStream {
        let (etx, erx) = mpsc::channel();
        let (itx, irx) = smol::channel::unbounded();
        let head = RequestHead {
            method: method.into(),
            path: path.into(),
            headers: headers.iter().map(|(n, v)| Header::new(*n, *v)).collect(),
            identity,
        };
        self.cmds
            .send_blocking(Cmd::Open(Box::new(OpenCmd { head, body: body.to_vec(), finish, events: etx, input: irx })))
            .unwrap();
        HubStream { events: erx, input: itx }
    }

    /// A whole small request: status and body.
    pub fn get(&self, path: &str, identity: Identity) -> (u16, Vec<u8>) {
        let s = self.open("GET", path, identity, &[("Accept", "application/json")], b"", true);
        let (status, _) = s.head();
        (status, s.body())
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn ident(user: &str, groups: &[&str]) -> Identity {
    Identity { user: user.into(), groups: groups.iter().map(|g| g.to_string()).collect(), uid: None, extra: vec![] }
}

/// The test's end of a hub stream.
pub struct HubStream {
    pub events: mpsc::Receiver<Ev>,
    input: smol::channel::Sender<In>,
}

impl HubStream {
    pub fn head(&self) -> (u16, Vec<(String, String)>) {
        match self.events.recv_timeout(PATIENCE) {
            Ok(Ev::Head(s, h)) => (s, h),
            other => panic!("expected a response head, got {other:?}"),
        }
    }

    /// The next data, `None` at the end; panics on reset or timeout.
    pub fn next(&self, timeout: Duration) -> Option<Vec<u8>> {
        match self.events.recv_timeout(timeout) {
            Ok(Ev::Data(d)) => Some(d),
            Ok(Ev::End) => None,
            other => panic!("expected data, got {other:?}"),
        }
    }

    pub fn body(&self) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(d) = self.next(PATIENCE) {
            out.extend(d);
        }
        out
    }

    /// Reads until `needle` shows up in what arrived; returns all of it.
    pub fn until(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while !String::from_utf8_lossy(&out).contains(needle) {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("{needle:?} did not arrive; got {:?}", String::from_utf8_lossy(&out)));
            match self.next(left) {
                Some(d) => out.extend(d),
                None => panic!("stream ended before {needle:?}; got {:?}", String::from_utf8_lossy(&out)),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    pub fn send(&self, data: &[u8]) {
        self.input.send_blocking(In::Data(data.to_vec())).unwrap();
    }
    pub fn finish(&self) {
        let _ = self.input.send_blocking(In::Finish);
    }
    pub fn reset(&self) {
        let _ = self.input.send_blocking(In::Reset);
    }
    pub fn pause(&self) {
        self.input.send_blocking(In::Pause).unwrap();
    }
    pub fn resume(&self) {
        self.input.send_blocking(In::Resume).unwrap();
    }
}

fn spawn_hub(
    listener: TcpListener,
    cert: &str,
    key: &str,
    state: Arc<Mutex<HubState>>,
) -> (smol::channel::Sender<Cmd>, JoinHandle<()>) {
    let tls = uplink::tls::server_config(cert, key).unwrap();
    let (tx, rx) = smol::channel::unbounded();
    let thread = std::thread::Builder::new()
        .name("fake-hub".into())
        .spawn(move || hub_main(listener, TlsAcceptor::from(tls), state, rx))
        .unwrap();
    (tx, thread)
}

fn hub_main(listener: TcpListener, tls: TlsAcceptor, state: Arc<Mutex<HubState>>, cmds: smol::channel::Receiver<Cmd>) {
    let ex = Rc::new(LocalExecutor::new());
    let current: Rc<RefCell<Option<Session>>> = Rc::new(RefCell::new(None));
    let ex2 = ex.clone();
    smol::block_on(ex.run(async move {
        let listener = Async::new(listener).unwrap();
        let accept = async {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                tcp.get_ref().set_nodelay(true).unwrap();
                let (tls, state, current) = (tls.clone(), state.clone(), current.clone());
                ex2.spawn(async move {
                    let Ok(stream) = tls.accept(tcp).await else { return };
                    serve_conn(stream, state, current).await;
                })
                .detach();
            }
        };
        let commands = async {
            while let Ok(cmd) = cmds.recv().await {
                match cmd {
                    Cmd::Stop => return,
                    Cmd::GoAway(code, msg) => {
                        if let Some(s) = current.borrow().clone() {
                            s.go_away(code, &msg);
                        }
                    }
                    Cmd::Replicas(set) => {
                        if let Some(s) = current.borrow().clone() {
                            s.set_replicas(set);
                        }
                    }
                    Cmd::Open(open) => {
                        let current = current.clone();
                        ex2.spawn(run_stream(current, open)).detach();
                    }
                }
            }
        };
        commands.or(accept).await;
    }));
}

async fn run_stream(current: Rc<RefCell<Option<Session>>>, open: Box<OpenCmd>) {
    let open = *open;
    let deadline = Instant::now() + PATIENCE;
    let session = loop {
        let s = current.borrow().clone();
        match s {
            Some(s) if s.is_open() => break s,
            _ if Instant::now() > deadline => {
                let _ = open.events.send(Ev::Reset("no session".into()));
                return;
            }
            _ => {
                smol::Timer::after(Duration::from_millis(20)).await;
            }
        }
    };
    let mut stream = match session.open(open.head) {
        Ok(s) => s,
        Err(e) => {
            let _ = open.events.send(Ev::Reset(format!("open: {e}")));
            return;
        }
    };
    if !open.body.is_empty() && stream.write_all(&open.body).await.is_err() {
        return;
    }
    if open.finish {
        stream.finish();
    }
    // Wait for the head, meanwhile writing what the test sends (a request
    // body that streams in after the open).
    let mut paused = false;
    let head = loop {
        enum H {
            Head(Result<uplink::proto::ResponseHead, uplink::driver::StreamClosed>),
            Input(Option<In>),
        }
        let input = &open.input;
        let h = async { H::Head(stream.response_head().await) }.or(async { H::Input(input.recv().await.ok()) }).await;
        match h {
            H::Head(r) => break r,
            H::Input(Some(In::Data(d))) => {
                if stream.write_all(&d).await.is_err() {
                    return;
                }
            }
            H::Input(Some(In::Finish)) => stream.finish(),
            H::Input(Some(In::Reset)) | H::Input(None) => return,
            H::Input(Some(In::Pause)) => paused = true,
            H::Input(Some(In::Resume)) => paused = false,
        }
    };
    match head {
        Ok(h) => {
            let headers = h
                .headers
                .iter()
                .map(|x| {
                    (String::from_utf8_lossy(&x.name).into_owned(), String::from_utf8_lossy(&x.value).into_owned())
                })
                .collect();
            let _ = open.events.send(Ev::Head(h.status, headers));
        }
        Err(e) => {
            let _ = open.events.send(Ev::Reset(e.to_string()));
            return;
        }
    }
    let mut input_open = true;
    loop {
        enum X {
            Chunk(Result<Option<Vec<u8>>, uplink::driver::StreamClosed>),
            Input(Option<In>),
        }
        let input = &open.input;
        let x = if paused {
            X::Input(input.recv().await.ok())
        } else if input_open {
            async { X::Chunk(stream.read_chunk().await) }.or(async { X::Input(input.recv().await.ok()) }).await
        } else {
            X::Chunk(stream.read_chunk().await)
        };
        match x {
            X::Chunk(Ok(Some(d))) => {
                if open.events.send(Ev::Data(d)).is_err() {
                    return;
                }
            }
            X::Chunk(Ok(None)) => {
                let _ = open.events.send(Ev::End);
                // Keep the stream for writes until the test is done with it.
                while let Ok(i) = input.recv().await {
                    match i {
                        In::Data(d) => {
                            let _ = stream.write_all(&d).await;
                        }
                        In::Finish => stream.finish(),
                        In::Reset => return,
                        _ => {}
                    }
                }
                return;
            }
            X::Chunk(Err(e)) => {
                let _ = open.events.send(Ev::Reset(e.to_string()));
                return;
            }
            X::Input(None) => input_open = false,
            X::Input(Some(In::Data(d))) => {
                if stream.write_all(&d).await.is_err() {
                    return;
                }
            }
            X::Input(Some(In::Finish)) => stream.finish(),
            X::Input(Some(In::Reset)) => {
                stream.reset(uplink::proto::ResetCode::Cancel, "test reset");
                return;
            }
            X::Input(Some(In::Pause)) => paused = true,
            X::Input(Some(In::Resume)) => paused = false,
        }
    }
}

/// Reads an HTTP request head and its Content-Length body.
async fn read_request<S: smol::io::AsyncRead + Unpin>(
    s: &mut S,
) -> Option<(String, String, Vec<(String, String)>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.ok()? == 0 || buf.len() > 65536 {
            return None;
        }
        buf.push(byte[0]);
    }
    let mut hs = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut hs);
    req.parse(&buf).ok()?;
    let headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
        .collect();
    let len: usize = headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.ok()?;
    Some((req.method?.to_string(), req.path?.to_string(), headers, body))
}

async fn respond<S: smol::io::AsyncWrite + Unpin>(s: &mut S, status: &str, body: &Value) {
    let b = body.to_string();
    let r = format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len());
    let _ = s.write_all(r.as_bytes()).await;
    let _ = s.flush().await;
}

async fn serve_conn<S>(mut s: S, state: Arc<Mutex<HubState>>, current: Rc<RefCell<Option<Session>>>)
where
    S: smol::io::AsyncRead + smol::io::AsyncWrite + Unpin,
{
    let Some((method, path, headers, body)) = read_request(&mut s).await else { return };
    let header = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()).unwrap_or_default();
    match (method.as_str(), path.as_str()) {
        ("POST", "/v1/activate") => {
            let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let (status, answer) = {
                let mut st = state.lock().unwrap();
                st.activate_requests.push(req.clone());
                if req["activation_id"] != json!(st.activation_id) {
                    ("404 Not Found", json!({"error": "unknown_activation", "message": "no such activation"}))
                } else if st.revoked {
                    ("410 Gone", json!({"error": "cluster_deregistered", "message": "cluster deregistered"}))
                } else if req["activation_code"] != json!(st.activation_code) {
                    ("404 Not Found", json!({"error": "unknown_activation", "message": "wrong code"}))
                } else if st.code_used {
                    ("409 Conflict", json!({"error": "activation_used", "message": "activation code already used"}))
                } else {
                    st.code_used = true;
                    st.activations += 1;
                    (
                        "200 OK",
                        json!({"cluster_id": "c_1", "cluster": st.cluster, "credential": st.credential, "hub_url": ""}),
                    )
                }
            };
            respond(&mut s, status, &answer).await;
        }
        ("GET", "/v1/tunnel") => {
            let auth = header("authorization");
            let verdict = {
                let mut st = state.lock().unwrap();
                st.tunnel_auth.push(auth.clone());
                if auth != format!("Bearer {}", st.credential) {
                    Err(("401 Unauthorized", json!({"error": "unauthorized", "message": "unknown credential"})))
                } else if st.revoked {
                    Err(("403 Forbidden", json!({"error": "cluster_deregistered", "message": "cluster deregistered"})))
                } else if !header("upgrade").eq_ignore_ascii_case("uplink/1") {
                    Err(("400 Bad Request", json!({"error": "bad_request", "message": "upgrade required"})))
                } else {
                    st.tunnels += 1;
                    Ok(st.tunnels)
                }
            };
            let id = match verdict {
                Ok(id) => id,
                Err((status, body)) => return respond(&mut s, status, &body).await,
            };
            let _ = s
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: uplink/1\r\n\r\n")
                .await;
            let _ = s.flush().await;
            let session = Session::new(Mux::hub(Config::default(), id as u64, Instant::now()));
            *current.borrow_mut() = Some(session.clone());
            let watch = async {
                if let Ok((hello, _)) = session.connected().await {
                    let mut st = state.lock().unwrap();
                    st.hello = hello;
                    st.connected = true;
                }
                std::future::pending::<uplink::proto::SessionError>().await
            };
            let _ = session.run(s).or(watch).await;
            let mut st = state.lock().unwrap();
            if st.tunnels == id {
                st.connected = false;
            }
        }
        _ => respond(&mut s, "404 Not Found", &json!({"error": "not_found"})).await,
    }
}

/// Polls `cond` until true; panics after [`PATIENCE`].
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("uplink-agent-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A free local port (bound and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `uplink` process.
pub struct Agent {
    pub child: Child,
    pub health: String,
    pub log: PathBuf,
}

impl Agent {
    /// Spawns `uplink ARGS...` with `--health-addr` on a free port, stderr
    /// into `dir/agent-N.log`.
    pub fn spawn(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Agent {
        let health = format!("127.0.0.1:{}", free_port());
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let log = dir.join(format!("agent-{n}.log"));
        // UPLINK_TEST_BIN: measure another build (e.g. the static release).
        let bin = std::env::var("UPLINK_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_uplink").to_string());
        let mut cmd = Command::new(bin);
        cmd.args(args).arg("--health-addr").arg(&health);
        cmd.env_remove("HTTPS_PROXY").env_remove("https_proxy").env_remove("ALL_PROXY").env_remove("all_proxy");
        cmd.env_remove("KUBERNETES_SERVICE_HOST").env_remove("NOTIFY_SOCKET");
        cmd.env("UPLINK_LOG", "debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        Agent { child: cmd.spawn().unwrap(), health, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().unwrap();
    }

    /// Waits for the process to exit; its status code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait: the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        self.signal("TERM");
        self.wait_exit(PATIENCE)
    }

    /// GET on the health port.
    pub fn health_get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(&self.health).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let code = out.split(' ').nth(1)?.parse().ok()?;
        Some((code, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
    }

    /// The value of one metric line (`name{labels}` exactly).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.health_get("/metrics")?;
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
    }

    /// The resident set size in KiB (Linux).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP CONNECT proxy (RFC 9110 §9.3.6) on a thread; records
/// each CONNECT target.
pub struct ConnectProxy {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<String>>>,
}

impl ConnectProxy {
    pub fn start() -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut client) = conn else { continue };
                let seen = seen2.clone();
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if client.read(&mut b).unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(b[0]);
                    }
                    let text = String::from_utf8_lossy(&head).into_owned();
                    let mut parts = text.split_whitespace();
                    if parts.next() != Some("CONNECT") {
                        let _ = client.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n");
                        return;
                    }
                    let target = parts.next().unwrap_or("").to_string();
                    seen.lock().unwrap().push(target.clone());
                    let Ok(upstream) = TcpStream::connect(&target) else {
                        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
                        return;
                    };
                    client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").unwrap();
                    let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                    let (mut c1, mut u1) = (client, upstream);
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut c2, &mut u2);
                        let _ = u2.shutdown(std::net::Shutdown::Write);
                    });
                    let _ = std::io::copy(&mut u1, &mut c1);
                    let _ = c1.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        ConnectProxy { addr, seen }
    }
}
