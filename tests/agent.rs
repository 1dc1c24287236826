//! The agent as a real process: the built `uplink` binary against the
//! stand-in API server (tests/support/kube) and a hub built on the same
//! mux (tests/agent_support).

mod agent_support;
mod support;

use agent_support::{Agent, ConnectProxy, FakeHub, PATIENCE, ident, scratch, wait_for};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use support::kube::{AGENT_USER, Config, StandIn};
use uplink::proto::GoAwayCode;

const ARTICLE_RBAC: &str = include_str!("fixtures/kube/eks-console-restricted-access.yaml");
const AGENT_IMPERSONATION: &str = include_str!("fixtures/kube/agent-impersonation.yaml");
const DEBUG_ACCESS: &str = include_str!("fixtures/kube/debug-access.yaml");

/// A stand-in cluster, a hub, and the files an agent needs.
struct World {
    k: StandIn,
    hub: FakeHub,
    dir: PathBuf,
    token: PathBuf,
    ca: PathBuf,
    activation: PathBuf,
    state: PathBuf,
}

impl World {
    fn new(name: &str) -> World {
        let k = StandIn::start(Config::default());
        for y in [ARTICLE_RBAC, AGENT_IMPERSONATION, DEBUG_ACCESS] {
            k.load_rbac_yaml(y).expect("fixture yaml");
        }
        let hub = FakeHub::start();
        let dir = scratch(name);
        let w = World {
            token: dir.join("token"),
            ca: dir.join("ca.pem"),
            activation: dir.join("activation.json"),
            state: dir.join("lib/state"),
            k,
            hub,
            dir,
        };
        std::fs::write(&w.token, w.k.agent_token()).unwrap();
        std::fs::write(&w.ca, w.k.ca_pem()).unwrap();
        std::fs::write(&w.activation, w.hub.activation_json()).unwrap();
        w
    }

    fn args(&self) -> Vec<String> {
        let p = |p: &PathBuf| p.display().to_string();
        vec![
            "run".into(),
            "--activation".into(),
            p(&self.activation),
            "--state".into(),
            p(&self.state),
            "--kube-url".into(),
            self.k.url(),
            "--kube-token-file".into(),
            p(&self.token),
            "--kube-ca".into(),
            p(&self.ca),
        ]
    }

    fn spawn(&self, env: &[(&str, &str)]) -> Agent {
        let args = self.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Agent::spawn(&self.dir, &args, env)
    }

    /// An agent with its tunnel up.
    fn connected_agent(&self) -> Agent {
        let n = self.hub.tunnels();
        let a = self.spawn(&[]);
        self.hub.wait_connected(n + 1);
        a
    }
}

fn bob() -> uplink::proto::Identity {
    ident("bob", &["uplink:debuggers"])
}

#[test]
fn activates_once_across_restarts_and_stops_cleanly() {
    let w = World::new("once");
    let mut a = w.connected_agent();
    assert_eq!(w.hub.activations(), 1);
    {
        let st = w.hub.state.lock().unwrap();
        let req = &st.activate_requests[0];
        assert_eq!(req["agent_version"], json!(env!("CARGO_PKG_VERSION")));
        assert_eq!(req["arch"], json!(std::env::consts::ARCH));
        let hello = st.hello.as_ref().expect("hello");
        assert!(!hello.kube_version.is_empty(), "Hello carries the kube version");
        assert_eq!(st.tunnel_auth.last().unwrap(), &format!("Bearer {}", st.credential));
    }
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&w.state).unwrap().permissions().mode() & 0o777, 0o600);
    wait_for("/readyz", || a.health_get("/readyz").is_some_and(|(c, _)| c == 200));
    assert_eq!(a.health_get("/healthz").unwrap().0, 200);
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_uplink"))
        .args(["status", "--health-addr", &a.health])
        .output()
        .unwrap();
    assert!(status.status.success(), "uplink status: {status:?}");
    assert!(String::from_utf8_lossy(&status.stdout).contains("uplink_tunnel_up 1"));
    assert_eq!(a.stop(), Some(0), "SIGTERM stops with 0; log:\n{}", a.log());

    // Restarted: uses the saved registration, never activates again.
    let mut b = w.connected_agent();
    assert_eq!(w.hub.activations(), 1);
    assert_eq!(w.hub.state.lock().unwrap().activate_requests.len(), 1, "no second POST /v1/activate");
    assert!(b.log().contains("using the registration saved in state file"), "{}", b.log());
    assert_eq!(b.stop(), Some(0));
    // Stopped: status says so.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_uplink"))
        .args(["status", "--live", "--health-addr", &b.health])
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(1));
}

#[test]
fn proxied_list_is_impersonated_and_client_credentials_dropped() {
    let w = World::new("list");
    let _a = w.connected_agent();
    w.k.clear_requests();
    let s = w.hub.open(
        "GET",
        "/api/v1/namespaces/default/pods?limit=500",
        ident("alice", &[]),
        &[
            ("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"),
            ("Authorization", "Bearer client-token"),
            ("Impersonate-User", "kubernetes-admin"),
            ("Impersonate-Group", "system:masters"),
            ("Connection", "X-Hop"),
            ("X-Hop", "1"),
        ],
        b"",
        true,
    );
    let (status, headers) = s.head();
    let body: Value = serde_json::from_slice(&s.body()).unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["kind"], json!("Table"), "Accept with as=Table is kept");
    assert!(headers.iter().any(|(n, v)| n.eq_ignore_ascii_case("content-type") && v.contains("json")));
    let recs = w.k.requests();
    let r = recs.iter().find(|r| r.path == "/api/v1/namespaces/default/pods").expect("request reached the cluster");
    assert_eq!(r.user.as_deref(), Some(AGENT_USER), "authenticated with the agent's token");
    assert_eq!(r.impersonated_user.as_deref(), Some("alice"));
    assert_eq!(r.effective_user.as_deref(), Some("alice"));
    assert_eq!(r.query, "limit=500");
    assert!(
        r.impersonate_headers.iter().all(|(n, v)| n != "impersonate-group" && v != "kubernetes-admin"),
        "client impersonation dropped: {:?}",
        r.impersonate_headers
    );
    assert_eq!(r.status, 200);

    // RBAC decides: alice may not read secrets.
    let (status, body) = w.hub.get("/api/v1/namespaces/default/secrets", ident("alice", &[]));
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));

    // No user: refused by the agent, never forwarded.
    w.k.clear_requests();
    let (status, body) = w.hub.get("/api/v1/namespaces/default/pods", ident("", &["system:masters"]));
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, body["kind"].as_str(), body["reason"].as_str()), (403, Some("Status"), Some("Forbidden")));
    assert!(w.k.requests().is_empty(), "nothing reached the cluster");

    // A request line that tries to smuggle headers: refused.
    let (status, _) =
        w.hub.get("/api/v1/pods HTTP/1.1\r\nImpersonate-User: kubernetes-admin\r\nX:", ident("alice", &[]));
    assert_eq!(status, 400);
    assert!(w.k.requests().is_empty(), "nothing reached the cluster");
}

#[test]
fn watch_and_logs_follow_stream_as_they_happen() {
    let w = World::new("watch");
    let _a = w.connected_agent();
    let watch = w.hub.open("GET", "/api/v1/namespaces/default/pods?watch=1", bob(), &[], b"", true);
    assert_eq!(watch.head().0, 200);
    watch.until("db-0", PATIENCE); // initial ADDED events
    let started = Instant::now();
    w.k.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "late-pod", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Running"},
    }))
    .unwrap();
    watch.until("late-pod", Duration::from_secs(10));
    assert!(started.elapsed() < Duration::from_secs(5), "watch event took {:?}", started.elapsed());

    w.k.append_log("default", "db-0", "first line");
    let logs = w.hub.open("GET", "/api/v1/namespaces/default/pods/db-0/log?follow=true", bob(), &[], b"", true);
    assert_eq!(logs.head().0, 200);
    logs.until("first line", PATIENCE);
    let started = Instant::now();
    w.k.append_log("default", "db-0", "second line");
    logs.until("second line", Duration::from_secs(10));
    assert!(started.elapsed() < Duration::from_secs(5));

    // The person goes away: the agent drops its API-server request.
    watch.reset();
    logs.reset();
    wait_for("streams to end", || _a.metric("uplink_streams_active").is_some_and(|v| v == 0.0));
}

/// A WebSocket frame from the client (masked, RFC 6455 §5.3).
fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    let key = [7u8, 1, 9, 3];
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

/// Splits server frames (unmasked) off the front of `buf`.
fn ws_frames(buf: &mut Vec<u8>) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        if buf.len() < 2 {
            return out;
        }
        let (op, len7) = (buf[0] & 0x0f, (buf[1] & 0x7f) as usize);
        let (len, start) = match len7 {
            126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
            127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize, 10),
            126 | 127 => return out,
            n => (n, 2),
        };
        if buf.len() < start + len {
            return out;
        }
        out.push((op, buf[start..start + len].to_vec()));
        buf.drain(..start + len);
    }
}

#[test]
fn exec_with_stdin_through_an_upgrade() {
    let w = World::new("exec");
    let _a = w.connected_agent();
    let s = w.hub.open(
        "GET",
        "/api/v1/namespaces/default/pods/db-0/exec?command=cat&stdin=true&stdout=true&stderr=true",
        bob(),
        &[
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Protocol", "v5.channel.k8s.io"),
        ],
        b"",
        false,
    );
    let (status, headers) = s.head();
    assert_eq!(status, 101, "{headers:?}");
    let h = |n: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.clone());
    assert_eq!(h("upgrade").as_deref(), Some("websocket"));
    assert_eq!(h("sec-websocket-protocol").as_deref(), Some("v5.channel.k8s.io"));
    s.send(&ws_frame(2, b"\x00hello through the tunnel\n"));
    let mut buf = Vec::new();
    let mut stdout = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while !String::from_utf8_lossy(&stdout).contains("hello through the tunnel") {
        assert!(Instant::now() < deadline, "no echo; got {:?}", String::from_utf8_lossy(&stdout));
        if let Some(d) = s.next(PATIENCE) {
            buf.extend(d);
        }
        for (op, p) in ws_frames(&mut buf) {
            if op == 2 && p.first() == Some(&1) {
                stdout.extend_from_slice(&p[1..]);
            }
        }
    }
    // Close stdin (v5: [255, 0]); cat ends, the status arrives, the
    // server closes: the stream ends from the cluster's side.
    s.send(&ws_frame(2, &[255, 0]));
    let mut status_json = None;
    while let Some(d) = s.next(PATIENCE) {
        buf.extend(d);
        for (op, p) in ws_frames(&mut buf) {
            if op == 2 && p.first() == Some(&3) {
                status_json = Some(String::from_utf8_lossy(&p[1..]).into_owned());
            }
        }
    }
    let st = status_json.expect("exec status on channel 3");
    assert!(st.contains("Success"), "{st}");
    s.finish();
}

#[test]
fn many_streams_proceed_while_one_reader_stalls() {
    let w = World::new("many");
    let a = w.connected_agent();
    // A log bigger than the tunnel window (128 KiB) for the stalled reader.
    let line = "x".repeat(1000);
    for _ in 0..1200 {
        w.k.append_log("default", "web-7d4b9c8f6d-abcde", &line);
    }
    let pods: Value = serde_json::from_slice(&w.hub.get("/api/v1/namespaces/default/pods", bob()).1).unwrap();
    let pod = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .find(|n| n.starts_with("web-"))
        .unwrap();
    if pod != "web-7d4b9c8f6d-abcde" {
        for _ in 0..1200 {
            w.k.append_log("default", &pod, &line);
        }
    }
    let stalled = w.hub.open("GET", &format!("/api/v1/namespaces/default/pods/{pod}/log"), bob(), &[], b"", true);
    stalled.pause();
    assert_eq!(stalled.head().0, 200);
    let started = Instant::now();
    let streams: Vec<_> =
        (0..200).map(|_| w.hub.open("GET", "/api/v1/namespaces/default/pods/db-0", bob(), &[], b"", true)).collect();
    for s in &streams {
        assert_eq!(s.head().0, 200);
        let body: Value = serde_json::from_slice(&s.body()).unwrap();
        assert_eq!(body["metadata"]["name"], json!("db-0"));
    }
    eprintln!("200 streams beside a stalled one: {:?}", started.elapsed());
    assert!(a.metric("uplink_streams_active").unwrap() >= 1.0, "the stalled stream is still in flight");
    stalled.resume();
    let body = stalled.body();
    assert!(body.len() >= 1200 * 1001, "stalled stream delivered {} bytes", body.len());
}

#[test]
fn reconnects_after_hub_restart_and_follows_token_rotation() {
    let mut w = World::new("reconnect");
    let a = w.connected_agent();
    assert_eq!(w.hub.get("/api/v1/namespaces/default/pods", bob()).0, 200);

    w.hub.restart();
    w.hub.wait_connected(2);
    assert_eq!(w.hub.get("/api/v1/namespaces/default/pods", bob()).0, 200);
    wait_for("reconnect metric", || a.metric("uplink_tunnel_reconnects_total").is_some_and(|v| v >= 1.0));

    // ShuttingDown: a new tunnel at once, while a stream in flight on the
    // old one goes on to its end.
    w.k.append_log("default", "db-0", "one");
    let logs = w.hub.open("GET", "/api/v1/namespaces/default/pods/db-0/log?follow=true", bob(), &[], b"", true);
    assert_eq!(logs.head().0, 200);
    logs.until("one", PATIENCE);
    let before = Instant::now();
    w.hub.go_away(GoAwayCode::ShuttingDown);
    w.hub.wait_connected(3);
    assert!(before.elapsed() < Duration::from_secs(5), "reconnect after ShuttingDown took {:?}", before.elapsed());
    w.k.append_log("default", "db-0", "two");
    logs.until("two", PATIENCE);
    assert_eq!(w.hub.get("/api/v1/namespaces/default/pods", bob()).0, 200, "new tunnel serves");
    logs.reset();

    // Token rotation: the old token stops working at the API server; the
    // agent picks up the new file content without a restart.
    let new = format!("rotated-{}", std::process::id());
    w.k.set_agent_token(&new);
    std::fs::write(&w.token, &new).unwrap();
    // The agent looks at its token file at most once a second
    // (uplink::agent::kube::TOKEN_RECHECK), as client-go does once a minute.
    std::thread::sleep(Duration::from_millis(1100));
    w.k.clear_requests();
    let (status, body) = w.hub.get("/api/v1/namespaces/default/pods", bob());
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(w.k.requests().iter().all(|r| r.user.as_deref() == Some(AGENT_USER)));
    assert!(a.log().contains("token file"), "{}", a.log());
}

#[test]
fn dials_the_hub_through_an_https_proxy() {
    let w = World::new("proxy");
    let proxy = ConnectProxy::start();
    let n = w.hub.tunnels();
    let proxy_url = format!("http://{}", proxy.addr);
    let _a = w.spawn(&[("https_proxy", proxy_url.as_str()), ("NO_PROXY", "example.com")]);
    w.hub.wait_connected(n + 1);
    let seen = proxy.seen.lock().unwrap().clone();
    let hub = w.hub.addr.to_string();
    assert!(seen.iter().filter(|t| **t == hub).count() >= 2, "activation and tunnel went through the proxy: {seen:?}");
    assert_eq!(w.hub.get("/api/v1/namespaces/default/pods", bob()).0, 200);

    // NO_PROXY naming the hub: direct.
    let w2 = World::new("noproxy");
    let proxy2 = ConnectProxy::start();
    let url2 = format!("http://{}", proxy2.addr);
    let _b = w2.spawn(&[("HTTPS_PROXY", url2.as_str()), ("no_proxy", "localhost,127.0.0.0/8")]);
    w2.hub.wait_connected(1);
    assert!(proxy2.seen.lock().unwrap().is_empty());
}

#[test]
fn deregistration_stops_the_agent_with_status_4() {
    let w = World::new("dereg");
    let mut a = w.connected_agent();
    // An open watch does not hold the agent up once deregistered.
    let watch = w.hub.open("GET", "/api/v1/namespaces/default/pods?watch=1", bob(), &[], b"", true);
    assert_eq!(watch.head().0, 200);
    let started = Instant::now();
    w.hub.deregister();
    assert_eq!(a.wait_exit(PATIENCE), Some(4), "log:\n{}", a.log());
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?} to stop", started.elapsed());
    assert!(a.log().contains("deregistered"), "{}", a.log());
    // Started again with the revoked credential: 403 at the tunnel, exit 4,
    // no retry storm.
    let mut b = w.spawn(&[]);
    assert_eq!(b.wait_exit(PATIENCE), Some(4), "log:\n{}", b.log());
    assert!(b.log().contains("deregistered"));
    let tunnels = w.hub.state.lock().unwrap().tunnel_auth.len();
    assert!(tunnels <= 2, "{tunnels} tunnel attempts");
}

#[test]
fn bad_or_expired_activation_exits_2_and_reregistration_reactivates() {
    let w = World::new("badact");
    // Missing file.
    let missing = w.dir.join("nope.json");
    let mut a = Agent::spawn(
        &w.dir,
        &[
            "run",
            "--activation",
            missing.to_str().unwrap(),
            "--state",
            w.state.to_str().unwrap(),
            "--kube-url",
            &w.k.url(),
            "--kube-ca",
            w.ca.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(a.wait_exit(PATIENCE), Some(2));
    assert!(a.log().contains(&format!("activation {}: no such file", missing.display())), "{}", a.log());
    // Malformed.
    std::fs::write(&w.activation, "{\"cluster\": 1}").unwrap();
    let mut a = w.spawn(&[]);
    assert_eq!(a.wait_exit(PATIENCE), Some(2));
    assert!(
        a.log().contains(&format!("activation {}: not a valid activation JSON", w.activation.display())),
        "{}",
        a.log()
    );
    // Expired.
    let mut act: Value = serde_json::from_str(&w.hub.activation_json()).unwrap();
    act["expires_at"] = json!("2020-01-01T00:00:00Z");
    std::fs::write(&w.activation, act.to_string()).unwrap();
    let mut a = w.spawn(&[]);
    assert_eq!(a.wait_exit(PATIENCE), Some(2));
    assert!(a.log().contains("expired at 2020-01-01T00:00:00Z"), "{}", a.log());
    assert_eq!(w.hub.activations(), 0);

    // Good activation; then `uplink activate` says it is already done.
    std::fs::write(&w.activation, w.hub.activation_json()).unwrap();
    let mut args = w.args();
    args[0] = "activate".into();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_uplink")).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_uplink")).args(&args).output().unwrap();
    assert!(out.status.success());
    assert_eq!(w.hub.activations(), 1);

    // The cluster is registered again: a new activation replaces the state.
    w.hub.reregister();
    std::fs::write(&w.activation, w.hub.activation_json()).unwrap();
    let a = w.connected_agent();
    assert_eq!(w.hub.activations(), 2);
    assert!(a.log().contains("registered again"), "{}", a.log());
    drop(a);
    // A stale (expired) different activation beside a saved state: refused.
    let mut act: Value = serde_json::from_str(&w.hub.activation_json()).unwrap();
    act["activation_id"] = json!("act_other");
    act["expires_at"] = json!("2020-01-01T00:00:00Z");
    std::fs::write(&w.activation, act.to_string()).unwrap();
    let mut a = w.spawn(&[]);
    assert_eq!(a.wait_exit(PATIENCE), Some(2));
    assert!(a.log().contains("which expired at"), "{}", a.log());
}

#[test]
fn secret_mode_activates_once_across_restarts() {
    let w = World::new("secret");
    w.k.load_rbac_yaml(
        "apiVersion: v1
kind: Namespace
metadata:
  name: uplink
---
apiVersion: v1
kind: Secret
metadata:
  name: uplink-state
  namespace: uplink
type: Opaque
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: uplink-state
  namespace: uplink
rules:
- apiGroups: [\"\"]
  resources: [\"secrets\"]
  resourceNames: [\"uplink-state\"]
  verbs: [\"get\", \"update\"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: uplink-state
  namespace: uplink
subjects:
- kind: ServiceAccount
  name: uplink-agent
  namespace: uplink
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: uplink-state
",
    )
    .unwrap();
    // The activation as a mounted Secret: a directory with activation.json.
    let mount = w.dir.join("activation-mount");
    std::fs::create_dir_all(&mount).unwrap();
    std::fs::write(mount.join("activation.json"), w.hub.activation_json()).unwrap();
    let args = [
        "run",
        "--activation",
        mount.to_str().unwrap(),
        "--state-secret",
        "uplink/uplink-state",
        "--kube-url",
        &w.k.url(),
        "--kube-token-file",
        w.token.to_str().unwrap(),
        "--kube-ca",
        w.ca.to_str().unwrap(),
    ];
    let mut a = Agent::spawn(&w.dir, &args, &[]);
    w.hub.wait_connected(1);
    let secret = w.k.object("v1", "Secret", "uplink", "uplink-state").unwrap();
    assert!(secret["data"]["state"].as_str().is_some_and(|s| !s.is_empty()), "{secret}");
    assert_eq!(a.stop(), Some(0));
    let mut b = Agent::spawn(&w.dir, &args, &[]);
    w.hub.wait_connected(2);
    assert_eq!(w.hub.activations(), 1);
    assert!(b.log().contains("using the registration saved in state Secret uplink/uplink-state"), "{}", b.log());
    assert_eq!(b.stop(), Some(0));
}

#[test]
fn tells_systemd_ready_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let w = World::new("notify");
    let sock_path = w.dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(PATIENCE)).unwrap();
    let n = w.hub.tunnels();
    let mut a = w.spawn(&[("NOTIFY_SOCKET", sock_path.to_str().unwrap()), ("WATCHDOG_USEC", "200000")]);
    w.hub.wait_connected(n + 1);
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !(seen.iter().any(|m: &String| m == "READY=1") && seen.iter().any(|m| m == "WATCHDOG=1")) {
        let len = sock.recv(&mut buf).expect("a notification");
        seen.push(String::from_utf8_lossy(&buf[..len]).into_owned());
    }
    assert_eq!(a.stop(), Some(0));
    sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    while let Ok(len) = sock.recv(&mut buf) {
        seen.push(String::from_utf8_lossy(&buf[..len]).into_owned());
    }
    assert!(seen.iter().any(|m| m == "STOPPING=1"), "{seen:?}");
}

#[test]
fn allow_lists_limit_who_is_impersonated() {
    let w = World::new("allow");
    let config = w.dir.join("agent.yaml");
    std::fs::write(&config, "allowed_users: [alice]\nallowed_groups: []\n").unwrap();
    let n = w.hub.tunnels();
    let mut args = w.args();
    args.extend(["--config".to_string(), config.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _a = Agent::spawn(&w.dir, &args, &[]);
    w.hub.wait_connected(n + 1);
    assert_eq!(w.hub.get("/api/v1/namespaces/default/pods", ident("alice", &[])).0, 200);
    w.k.clear_requests();
    let (status, body) = w.hub.get("/api/v1/namespaces/default/pods", bob());
    assert_eq!(status, 403);
    assert!(
        String::from_utf8_lossy(&body).contains("does not allow impersonating"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(w.k.requests().is_empty());

    // An API server that cannot be reached: a Status saying so, not a hang.
    let w = World::new("noapi");
    let mut args = w.args();
    args[6] = format!("https://127.0.0.1:{}", agent_support::free_port());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _a = Agent::spawn(&w.dir, &args, &[]);
    w.hub.wait_connected(1);
    let (status, body) = w.hub.get("/api/v1/namespaces/default/pods", ident("alice", &[]));
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, body["reason"].as_str()), (503, Some("ServiceUnavailable")), "{body}");
}

/// Whatever the hub sends, the agent writes names into `Impersonate-*`
/// byte for byte, and refuses on its own a name that cannot travel
/// unchanged (a control character, a space at either end).
#[test]
fn names_reach_the_api_server_byte_for_byte_and_controls_stop_at_the_agent() {
    let w = World::new("names");
    let _a = w.connected_agent();
    for name in ["arn:aws:iam::1234567890:user/Alice", "jane@example.com", "Jane Doe", "Zoë Ångström", "山田"] {
        w.k.clear_requests();
        let group = "arn:aws:iam::1234567890:role/Admins";
        w.hub.get("/api/v1/namespaces/default/pods", ident(name, &[group, "system:masters"]));
        let recs = w.k.requests();
        let r = recs.first().unwrap_or_else(|| panic!("{name}: nothing reached the cluster"));
        assert_eq!(
            r.impersonate_headers,
            [
                ("impersonate-user".to_string(), name.to_string()),
                ("impersonate-group".to_string(), group.to_string()),
                ("impersonate-group".to_string(), "system:masters".to_string()),
            ],
            "{name}"
        );
    }
    w.k.clear_requests();
    for (user, says) in [
        ("a\u{85}b", "U+0085 at byte 1"),
        ("del\u{7f}", "U+007F at byte 3"),
        ("tab\t", "U+0009 at byte 3"),
        ("alice ", "has a space at byte 5"),
    ] {
        let (status, body) = w.hub.get("/api/v1/namespaces/default/pods", ident(user, &[]));
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((status, body["reason"].as_str()), (400, Some("BadRequest")), "{user:?}: {body}");
        assert!(body["message"].as_str().unwrap().contains(says), "{user:?}: {body}");
    }
    let (status, _) = w.hub.get("/api/v1/namespaces/default/pods", ident("alice", &["ops\r\nImpersonate-User: root"]));
    assert_eq!(status, 400);
    assert!(w.k.requests().is_empty(), "nothing reached the cluster");
}

#[test]
fn sigterm_drains_in_flight_streams_briefly_then_exits_0() {
    let w = World::new("drain");
    let config = w.dir.join("agent.yaml");
    std::fs::write(&config, "drain_seconds: 1\n").unwrap();
    let mut args = w.args();
    args.extend(["--config".to_string(), config.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut a = Agent::spawn(&w.dir, &args, &[]);
    w.hub.wait_connected(1);
    w.k.append_log("default", "db-0", "before");
    let logs = w.hub.open("GET", "/api/v1/namespaces/default/pods/db-0/log?follow=true", bob(), &[], b"", true);
    assert_eq!(logs.head().0, 200);
    logs.until("before", PATIENCE);
    let started = Instant::now();
    a.signal("TERM");
    // Still streaming while draining.
    w.k.append_log("default", "db-0", "during the drain");
    logs.until("during the drain", Duration::from_secs(5));
    assert_eq!(a.wait_exit(PATIENCE), Some(0), "{}", a.log());
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(6), "drain took {took:?}");
    assert!(a.log().contains("draining 1 in-flight streams"), "{}", a.log());
}

#[test]
fn request_bodies_stream_to_the_api_server() {
    let w = World::new("writes");
    w.k.load_rbac_yaml(
        "apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: cm-writer
  namespace: default
rules:
- apiGroups: [\"\"]
  resources: [\"configmaps\"]
  verbs: [\"get\", \"create\", \"patch\", \"update\"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: cm-writer
  namespace: default
subjects:
- kind: User
  name: bob
  apiGroup: rbac.authorization.k8s.io
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: cm-writer
",
    )
    .unwrap();
    let _a = w.connected_agent();
    // Without Content-Length: streamed to the API server chunked, in
    // several Data frames.
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "written", "namespace": "default"}, "data": {"k": "x".repeat(100_000)}})
        .to_string();
    let s = w.hub.open(
        "POST",
        "/api/v1/namespaces/default/configmaps",
        bob(),
        &[("Content-Type", "application/json")],
        b"",
        false,
    );
    for part in cm.as_bytes().chunks(7000) {
        s.send(part);
    }
    s.finish();
    let (status, _) = s.head();
    let body = String::from_utf8_lossy(&s.body()).into_owned();
    assert_eq!(status, 201, "{body}");
    // With Content-Length: a merge patch, Content-Type kept.
    let patch = br#"{"data":{"k":"patched"}}"#;
    let len = patch.len().to_string();
    let s = w.hub.open(
        "PATCH",
        "/api/v1/namespaces/default/configmaps/written",
        bob(),
        &[("Content-Type", "application/merge-patch+json"), ("Content-Length", &len)],
        patch,
        true,
    );
    let (status, _) = s.head();
    let body: Value = serde_json::from_slice(&s.body()).unwrap();
    assert_eq!((status, body["data"]["k"].as_str()), (200, Some("patched")), "{body}");
    let obj = w.k.object("v1", "ConfigMap", "default", "written").unwrap();
    assert_eq!(obj["data"]["k"], json!("patched"));
    let rec = w.k.requests().into_iter().rev().find(|r| r.method == "PATCH").unwrap();
    assert_eq!((rec.effective_user.as_deref(), rec.verb.as_str()), (Some("bob"), "patch"));
}

/// Footprint and latency, printed for the issue's report. Run with
/// `cargo test --test agent -- --ignored --nocapture measure`.
#[test]
#[ignore]
fn measure_footprint_and_latency() {
    use uplink::agent::http1::{self, Pool};
    use uplink::agent::net::Target;
    use uplink::proto::Header;
    let w = World::new("measure");
    let a = w.connected_agent();
    std::thread::sleep(Duration::from_millis(500));
    let idle = a.rss_kib();

    // p50 of a small GET: straight to the stand-in (keep-alive, same
    // headers the agent would send) versus through hub → tunnel → agent.
    let path = "/api/v1/namespaces/default/pods/db-0";
    let rounds = 400;
    let p50 = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let direct = smol::block_on(async {
        let tls = uplink::tls::client_config(&uplink::tls::Trust::CaPem(w.k.ca_pem()), None, &[b"http/1.1"]).unwrap();
        let pool = Pool::new(Target::parse(&w.k.url()).unwrap(), Some(tls), None, 4);
        let headers = [
            Header::new("Accept", "application/json"),
            Header::new("Authorization", format!("Bearer {}", w.k.agent_token())),
            Header::new("Impersonate-User", "bob"),
            Header::new("Impersonate-Group", "uplink:debuggers"),
        ];
        let mut times = Vec::new();
        for i in 0..rounds + 20 {
            let t = Instant::now();
            let a = http1::exchange(&pool, "GET", path, &headers, b"", 1 << 20).await.unwrap();
            assert_eq!(a.status, 200);
            if i >= 20 {
                times.push(t.elapsed());
            }
        }
        times
    });
    let mut tunnel = Vec::new();
    for i in 0..rounds + 20 {
        let t = Instant::now();
        let (status, _) = w.hub.get(path, bob());
        assert_eq!(status, 200);
        if i >= 20 {
            tunnel.push(t.elapsed());
        }
    }
    let (d, t) = (p50(direct), p50(tunnel));
    let after_requests = a.rss_kib();

    // 1,000 open watches (UPLINK_MEASURE_WATCHES for another number).
    let n_watches: usize = std::env::var("UPLINK_MEASURE_WATCHES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let watches: Vec<_> = (0..n_watches)
        .map(|_| {
            w.hub.open("GET", "/api/v1/namespaces/default/pods?watch=1&allowWatchBookmarks=true", bob(), &[], b"", true)
        })
        .collect();
    for s in &watches {
        assert_eq!(s.head().0, 200);
    }
    std::thread::sleep(Duration::from_secs(1));
    let with_watches = a.rss_kib();
    eprintln!(
        "MEASURE idle RSS: {idle} KiB; after {rounds} requests: {after_requests} KiB; with {n_watches} watches: {with_watches} KiB"
    );
    eprintln!(
        "MEASURE p50 small GET: direct {:?}, through hub+tunnel+agent {:?}, ratio {:.2}, added {:?}",
        d,
        t,
        t.as_secs_f64() / d.as_secs_f64(),
        t.saturating_sub(d)
    );
    for s in &watches {
        s.reset();
    }
}

/// A bad `Content-Length` in a request the hub forwards is refused with a
/// `Status` on the stream and never reaches the API server.
#[test]
fn bad_content_length_in_a_forwarded_request_is_refused() {
    let w = World::new("bad-cl-request");
    let _a = w.connected_agent();
    let before = w.k.requests().len();
    for (value, expect) in [("+5", "digits only"), ("5, 5", "several"), ("99999999999999999999", "too large")] {
        let s = w.hub.open(
            "POST",
            "/api/v1/namespaces/default/configmaps",
            bob(),
            &[("Content-Type", "application/json"), ("Content-Length", value)],
            b"hello",
            true,
        );
        let (status, _) = s.head();
        let body: Value = serde_json::from_slice(&s.body()).unwrap();
        assert_eq!((status, body["kind"].as_str(), body["code"].as_u64()), (400, Some("Status"), Some(400)), "{body}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(expect) && message.contains("Content-Length"), "{value:?}: {message}");
    }
    let s = w.hub.open(
        "POST",
        "/api/v1/namespaces/default/configmaps",
        bob(),
        &[("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
        b"hello",
        true,
    );
    let (status, _) = s.head();
    let body = String::from_utf8_lossy(&s.body()).into_owned();
    assert!(status == 400 && body.contains("both Transfer-Encoding and Content-Length"), "{status} {body}");
    assert_eq!(w.k.requests().len(), before, "nothing reached the API server");
    // The agent still serves the next request.
    assert_eq!(w.hub.get("/api/v1/namespaces/default/pods", bob()).0, 200);
}

/// An API server whose answers the test chooses: `/bad-length` gets a
/// `Content-Length: +5`, `/both` gets Content-Length beside chunked, and
/// everything else a small JSON object. Each connection records what
/// it was asked, so the test can see whether a connection that carried
/// a malformed answer was ever used again.
struct RawApiServer {
    url: String,
    conns: std::sync::Arc<std::sync::Mutex<Vec<Vec<String>>>>,
}

impl RawApiServer {
    fn start() -> RawApiServer {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Vec<String>>::new()));
        let record = conns.clone();
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { return };
                let record = record.clone();
                let i = {
                    let mut c = record.lock().unwrap();
                    c.push(Vec::new());
                    c.len() - 1
                };
                std::thread::spawn(move || {
                    let mut w = tcp.try_clone().unwrap();
                    let mut r = BufReader::new(tcp);
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let path = line.split(' ').nth(1).unwrap_or("").to_string();
                        let mut length = 0;
                        loop {
                            let mut h = String::new();
                            if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                                break;
                            }
                            if let Some((name, value)) = h.split_once(':') {
                                if name.eq_ignore_ascii_case("content-length") {
                                    length = value.trim().parse().unwrap();
                                }
                            }
                        }
                        let mut body = vec![0u8; length];
                        if std::io::Read::read_exact(&mut r, &mut body).is_err() {
                            return;
                        }
                        record.lock().unwrap()[i].push(path.clone());
                        // A faulty server: bytes past its answer, a moment
                        // after it (a body after its answer to HEAD; more
                        // than the answer's length).
                        let faulty: Option<(&[u8], &[u8])> = match path.as_str() {
                            "/stray" => Some((
                                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n",
                                b"hello",
                            )),
                            "/extra" => Some((
                                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
                                b"junk",
                            )),
                            _ => None,
                        };
                        if let Some((answer, stray)) = faulty {
                            if w.write_all(answer).is_err() {
                                return;
                            }
                            std::thread::sleep(std::time::Duration::from_millis(30));
                            if w.write_all(stray).is_err() {
                                return;
                            }
                            continue;
                        }
                        if path == "/silent" {
                            // Takes the request and says nothing, until
                            // the agent gives up on the connection.
                            let _ = r.read_line(&mut line);
                            return;
                        }
                        if let Some(kind) = path.strip_prefix("/big-") {
                            // A body well past a read's worth, framed as
                            // `kind` says, written in pieces of odd sizes
                            // with pauses, so the agent finds its buffer
                            // empty mid-body and mid-chunk.
                            if write_big(&mut w, kind).is_err() || kind == "close" || kind == "cut" {
                                return;
                            }
                            continue;
                        }
                        // Garbage where an answer should start: always,
                        // or only the first time it is asked.
                        let garbled = path == "/garbled"
                            || (path == "/garbled-once"
                                && record.lock().unwrap().iter().flatten().filter(|p| *p == &path).count() == 1);
                        if garbled {
                            let _ = w.write_all(b"hello, this is not HTTP\r\n\r\n");
                            continue;
                        }
                        let answer: &[u8] = match path.as_str() {
                            "/bad-length" => b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: +5\r\n\r\nhello",
                            "/both" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                            _ => b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
                        };
                        if w.write_all(answer).is_err() || path == "/ok-then-close" {
                            // That one closes its keep-alive connection
                            // right after a complete answer, as a server
                            // that restarts or trims idle connections does.
                            return;
                        }
                    }
                });
            }
        });
        RawApiServer { url, conns }
    }
}

/// The body [`RawApiServer`] sends for `/big-*`.
fn big_body() -> Vec<u8> {
    (0..3 * 1024 * 1024 + 333).map(|i: usize| (i * 7 % 251) as u8).collect()
}

/// Writes `/big-{kind}`'s answer: `length` (Content-Length), `chunked`
/// (chunks of odd sizes, one with an extension, a trailer), `close` (to
/// the connection's end), `cut` (a Content-Length it breaks off at half)
/// or `silent` (part of a body, then nothing until the agent lets go).
/// The head goes out with the first bytes of the body, as servers send
/// it.
fn write_big(w: &mut std::net::TcpStream, kind: &str) -> std::io::Result<()> {
    use std::io::Write;
    let body = big_body();
    if kind == "silent" {
        // Part of a 1 GiB body, then silence until the agent lets go.
        w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n")?;
        w.write_all(&body[..100_000])?;
        let _ = std::io::Read::read(w, &mut [0; 1]);
        return Err(std::io::ErrorKind::ConnectionAborted.into());
    }
    let mut wire = match kind {
        "length" | "cut" => format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes(),
        "chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
        _ => b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec(),
    };
    let mut at = 0;
    let mut i = 0;
    while at < body.len() {
        let n = (1 + (i * 104_729) % 150_000).min(body.len() - at);
        if kind == "chunked" {
            let ext = if i == 3 { ";name=value" } else { "" };
            wire.extend_from_slice(format!("{n:x}{ext}\r\n").as_bytes());
            wire.extend_from_slice(&body[at..at + n]);
            wire.extend_from_slice(b"\r\n");
        } else {
            wire.extend_from_slice(&body[at..at + n]);
        }
        at += n;
        i += 1;
    }
    if kind == "chunked" {
        wire.extend_from_slice(b"0\r\nX-Trailer: done\r\n\r\n");
    }
    // The head and the body's first bytes in one write, then pieces of
    // odd sizes, some after a pause (the agent's buffer runs dry).
    if kind == "cut" {
        wire.truncate(wire.len() / 2);
    }
    let first = wire.len().min(5000);
    w.write_all(&wire[..first])?;
    let mut at = first;
    let mut i = 0;
    while at < wire.len() {
        let n = (1 + (i * 7919) % 60_000).min(wire.len() - at);
        w.write_all(&wire[at..at + n])?;
        w.flush()?;
        if i % 5 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
        at += n;
        i += 1;
    }
    Ok(())
}

/// Bodies the agent reads from the API server straight into the tunnel's
/// send queue (Content-Length, chunked, to the close) arrive byte for
/// byte, and a kept-alive connection serves its next answer intact: the
/// relay read nothing past a body.
#[test]
fn bodies_read_in_place_arrive_intact_in_every_framing() {
    let (w, api, _a) = raw_world("big-bodies", &[]);
    let body = big_body();
    for path in ["/big-length", "/big-chunked", "/big-close"] {
        let (status, got) = w.hub.get(path, bob());
        assert_eq!(status, 200, "{path}");
        assert_eq!(got.len(), body.len(), "{path}");
        assert!(got == body, "{path}: bytes out of place");
        assert_eq!(w.hub.get("/ok", bob()), (200, b"{}".to_vec()), "after {path}");
    }
    let conns = api.conns.lock().unwrap().clone();
    for framed in ["/big-length", "/big-chunked"] {
        let reused = conns.iter().any(|c| c.windows(2).any(|p| p[0] == framed && p[1] == "/ok"));
        assert!(reused, "the connection that carried {framed} served the next request: {conns:?}");
    }
}

/// A body the API server breaks off while the agent reads it in place
/// resets the stream with the reason; a download the person abandons
/// while the API server is silent is let go at once, and the agent
/// serves on.
#[test]
fn a_body_read_in_place_that_breaks_off_or_is_abandoned_ends_its_stream() {
    // The body's stall deadline past the test's patience: the download
    // must end for the reset, not for the API server's silence.
    let (w, _api, a) = raw_world("big-cut", &[("UPLINK_RESPONSE_TIMEOUT", "120s")]);
    let cut = w.hub.open("GET", "/big-cut", bob(), &[], b"", true);
    assert_eq!(cut.head().0, 200);
    let mut got = 0;
    let why = loop {
        match cut.events.recv_timeout(PATIENCE) {
            Ok(agent_support::Ev::Data(d)) => got += d.len(),
            Ok(agent_support::Ev::Reset(why)) => break why,
            other => panic!("expected data, then a reset; got {other:?}"),
        }
    };
    assert!(got < big_body().len(), "{got} bytes of a body cut at half");
    assert!(why.contains("connection closed inside the body"), "{why}");
    let silent = w.hub.open("GET", "/big-silent", bob(), &[], b"", true);
    assert_eq!(silent.head().0, 200);
    let mut got = 0;
    while got < 100_000 {
        got += silent.next(PATIENCE).unwrap().len();
    }
    // The agent now waits on the API server, reading in place.
    silent.reset();
    wait_for("the abandoned download to end", || a.metric("uplink_streams_active") == Some(0.0));
    assert_eq!(w.hub.get("/ok", bob()), (200, b"{}".to_vec()));
    let log = a.log();
    assert!(log.contains("GET /big-cut: API server broke off"), "{log}");
    assert!(log.contains("GET /big-silent: stream ended early: stream reset"), "{log}");
}

/// A world whose agent's API server is a [`RawApiServer`]; `env` for the
/// agent.
fn raw_world(name: &str, env: &[(&str, &str)]) -> (World, RawApiServer, Agent) {
    let w = World::new(name);
    let api = RawApiServer::start();
    let mut args = w.args();
    let i = args.iter().position(|a| a == "--kube-url").unwrap();
    args[i + 1] = api.url.clone();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let n = w.hub.tunnels();
    let a = Agent::spawn(&w.dir, &args, env);
    w.hub.wait_connected(n + 1);
    (w, api, a)
}

/// Garbage where an answer should start, on a reused connection: it may
/// be the stray tail of an earlier faulty answer, so a read is asked once
/// more on a fresh connection, but a DELETE is not made twice: it gets a
/// `502` that says what came back.
#[test]
fn garbage_for_an_answer_is_asked_again_only_for_a_read() {
    let (w, api, a) = raw_world("garbled", &[]);
    let jane = || ident("jane@example.com", &["system:authenticated"]);
    // A good exchange first, so the next request meets a reused connection.
    assert_eq!(w.hub.get("/ok", jane()).0, 200);
    let s = w.hub.open("DELETE", "/garbled", jane(), &[], b"", true);
    let (status, _) = s.head();
    let body: Value = serde_json::from_slice(&s.body()).unwrap();
    assert_eq!((status, body["code"].as_u64()), (502, Some(502)), "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("malformed response head"), "{message}");
    assert_eq!(w.hub.get("/ok", jane()).0, 200);
    let (status, body) = w.hub.get("/garbled-once", jane());
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let conns = api.conns.lock().unwrap().clone();
    let asked = |path: &str| conns.iter().flatten().filter(|p| *p == path).count();
    assert_eq!((asked("/garbled"), asked("/garbled-once")), (1, 2), "{conns:?}");
    assert!(a.log().contains("DELETE /garbled: malformed API-server response"), "{}", a.log());
}

/// A malformed answer from the API server becomes a `502` Status for the
/// client, and the connection that carried it is dropped, not pooled.
#[test]
fn bad_content_length_from_the_api_server_is_a_502_and_the_connection_is_dropped() {
    let (w, api, a) = raw_world("bad-cl-response", &[]);
    for (path, expect) in [("/bad-length", "digits only"), ("/both", "both Transfer-Encoding and Content-Length")] {
        // A good exchange first, so a warm connection sits in the pool.
        assert_eq!(w.hub.get("/ok", bob()).0, 200);
        let (status, body) = w.hub.get(path, bob());
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((status, body["code"].as_u64()), (502, Some(502)), "{body}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(expect) && message.contains("API server"), "{message}");
        assert_eq!(w.hub.get("/ok", bob()).0, 200);
    }
    let conns = api.conns.lock().unwrap().clone();
    for c in &conns {
        if let Some(i) = c.iter().position(|p| p == "/bad-length" || p == "/both") {
            assert_eq!(i + 1, c.len(), "a connection was reused after a malformed answer: {conns:?}");
        }
    }
    assert!(a.log().contains("malformed API-server response"), "{}", a.log());
}

/// The API server closes a keep-alive connection right after a complete
/// answer. A bodiless request that meets it in the pool (taken without a
/// liveness check when just used) is retried on a fresh connection; a
/// request with a body is never sent on it (the pool's check sees the
/// close); a faulty server's body after a HEAD answer, or bytes past an
/// answer's length before a DELETE, are not taken for the next answer;
/// and a server that took a request and said nothing until the response
/// deadline is not asked again.
#[test]
fn a_connection_the_api_server_closed_loses_no_request_and_silence_is_not_retried() {
    let (w, api, _a) = raw_world("stale-pooled", &[("UPLINK_RESPONSE_TIMEOUT", "1s")]);
    let jane = || ident("jane@example.com", &["system:authenticated"]);
    for round in 0..5 {
        assert_eq!(w.hub.get("/ok-then-close", jane()).0, 200, "round {round}");
        let (status, body) = w.hub.get("/ok", jane());
        assert_eq!(status, 200, "round {round}: {}", String::from_utf8_lossy(&body));
    }
    for round in 0..3 {
        assert_eq!(w.hub.get("/ok-then-close", jane()).0, 200, "round {round}");
        // The close has reached the agent before the next request.
        std::thread::sleep(Duration::from_millis(50));
        let s = w.hub.open(
            "POST",
            "/ok",
            jane(),
            &[("Content-Type", "application/json"), ("Content-Length", "2")],
            b"{}",
            true,
        );
        let (status, _) = s.head();
        assert_eq!(status, 200, "round {round}: {}", String::from_utf8_lossy(&s.body()));
    }
    // A stray body after a HEAD answer is not read as the next answer,
    // though the next request is bodiless and comes at once.
    for round in 0..3 {
        let s = w.hub.open("HEAD", "/stray", jane(), &[], b"", true);
        assert_eq!(s.head().0, 200, "round {round}");
        std::thread::sleep(Duration::from_millis(100));
        let (status, body) = w.hub.get("/ok", jane());
        assert_eq!(status, 200, "round {round}: {}", String::from_utf8_lossy(&body));
    }
    // Stray bytes past an answer's length: a DELETE that follows at once
    // is not sent where they wait (read as its answer, it would be made
    // again elsewhere: done twice, the second answered 404).
    for round in 0..3 {
        assert_eq!(w.hub.get("/extra", jane()).0, 200, "round {round}");
        std::thread::sleep(Duration::from_millis(100));
        let s = w.hub.open("DELETE", "/ok", jane(), &[], b"", true);
        assert_eq!(s.head().0, 200, "round {round}: {}", String::from_utf8_lossy(&s.body()));
    }
    assert_eq!(w.hub.get("/ok", jane()).0, 200);
    let (status, body) = w.hub.get("/silent", jane());
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, body["code"].as_u64()), (504, Some(504)), "{body}");
    let conns = api.conns.lock().unwrap().clone();
    let asked: usize = conns.iter().map(|c| c.iter().filter(|p| *p == "/silent").count()).sum();
    assert_eq!(asked, 1, "the silent server was asked again: {conns:?}");
    for c in &conns {
        if let Some(i) = c.iter().position(|p| p == "/ok-then-close") {
            assert_eq!(i + 1, c.len(), "a request reached a closed connection: {conns:?}");
        }
        // (Sent there, it would have read the stray body as its answer
        // and been tried again elsewhere: a request made twice.)
        if let Some(i) = c.iter().position(|p| p == "/stray" || p == "/extra") {
            assert_eq!(i + 1, c.len(), "a request went where stray bytes waited: {conns:?}");
        }
    }
}

/// A hub that sends a malformed `ReplicaSet` (a bad URL, too many
/// entries, an id twice): the agent says what is wrong, dials nothing new
/// and keeps the tunnel it has, which goes on serving.
#[test]
fn a_malformed_replica_set_is_logged_and_the_tunnels_kept() {
    use uplink::proto::{MAX_REPLICAS, ReplicaInfo, ReplicaSet};
    let w = World::new("bad-set");
    let a = w.connected_agent();
    let me = ReplicaInfo { id: "r_fake".into(), url: w.hub.url() };
    let set = |extra: Vec<ReplicaInfo>| ReplicaSet {
        this: "r_fake".into(),
        replicas: std::iter::once(me.clone()).chain(extra).collect(),
    };
    w.hub.replicas(set(vec![]));
    wait_for("the agent took the set", || a.log().contains("hub replicas: 1 (r_fake)"));
    let from = format!("replica set from {} refused:", w.hub.url());
    let bad = [
        (
            set(vec![ReplicaInfo { id: "r_b".into(), url: "http://10.0.0.2:8443".into() }]),
            r#"replica "r_b" has advertise URL "http://10.0.0.2:8443": not an https:// URL"#.to_string(),
        ),
        (
            set((1..=MAX_REPLICAS)
                .map(|i| ReplicaInfo { id: format!("r_{i}"), url: format!("https://10.0.1.{i}:8443") })
                .collect()),
            format!("{} replicas, over the limit of {MAX_REPLICAS}", MAX_REPLICAS + 1),
        ),
        (
            set(vec![ReplicaInfo { id: "r_fake".into(), url: "https://10.0.0.3:8443".into() }]),
            r#"replica id "r_fake" appears twice"#.to_string(),
        ),
    ];
    for (set, why) in bad {
        w.hub.replicas(set);
        let line = format!("{from} {why}; keeping the current tunnels ({})", w.hub.url());
        wait_for(&line, || a.log().contains(&line));
    }
    std::thread::sleep(Duration::from_millis(500));
    let log = a.log();
    let dialled = log.lines().any(|l| l.contains("10.0.") && !l.contains(&from));
    assert!(!dialled, "dialled nothing from a refused set:\n{log}");
    assert_eq!(w.hub.tunnels(), 1, "the one tunnel was kept:\n{log}");
    assert_eq!(a.metric("uplink_tunnels"), Some(1.0));
    let (status, body) = w.hub.get("/api/v1/namespaces/default/pods", ident("alice", &[]));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}
