//! The hub over HTTP/2, with real clients: real kubectl of several
//! versions, curl (nghttp2) multiplexing 100 watches on one connection,
//! and a raw HTTP/2 client for the abuse cases (rapid reset,
//! CONTINUATION flood, too many streams, an oversized header list, a
//! stalled window), each refused while another client keeps working.
//!
//! The protocol is read from the hub's own `/metrics`
//! (`uplink_hub_requests_total{proto=...}`), asked over HTTP/1.1, so each
//! question adds exactly one HTTP/1.1 request.
#![cfg(feature = "hub")]

mod hub_support;
mod support;

use hub_support::{HubProc, hub_cli, ok, temp_dir, wait_for, write_kube_credentials};
use serde_json::json;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::kube::{Config, StandIn};
use support::kubectl::{Kubectl, forwarded_port, kill, lines, wait_line};

const AGENT_IMPERSONATION: &str = include_str!("fixtures/kube/agent-impersonation.yaml");
const DEBUG_ACCESS: &str = include_str!("fixtures/kube/debug-access.yaml");
const ARTICLE_RBAC: &str = include_str!("fixtures/kube/eks-console-restricted-access.yaml");
const PATIENCE: Duration = Duration::from_secs(20);
const POD: &str = "web-7d4b9c8f6d-k2x9p";

/// `name{labels}`'s value in the hub's `/metrics`.
fn metric(hub: &HubProc, series: &str) -> u64 {
    let text = hub.client(None).get("/metrics").unwrap().text();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

const H2_REQUESTS: &str = "uplink_hub_requests_total{proto=\"h2\"}";
const H1_REQUESTS: &str = "uplink_hub_requests_total{proto=\"http/1.1\"}";
const H2_OPEN: &str = "uplink_hub_connections{proto=\"h2\"}";
const H1_OPEN: &str = "uplink_hub_connections{proto=\"http/1.1\"}";

/// Requests by protocol since `before`, less the metrics questions.
struct Counts {
    h2: u64,
    h1: u64,
}

fn counts(hub: &HubProc) -> Counts {
    Counts { h2: metric(hub, H2_REQUESTS), h1: metric(hub, H1_REQUESTS) }
}

/// (h2 requests, h1 requests) made since `before` by others than the
/// two metrics questions (each one HTTP/1.1 request).
fn since(hub: &HubProc, before: &Counts) -> (u64, u64) {
    let h2 = metric(hub, H2_REQUESTS);
    let h1 = metric(hub, H1_REQUESTS);
    (h2 - before.h2, h1 - before.h1 - 2)
}

/// A hub, the stand-in API server and a real agent with cluster `edge-1`;
/// the admin token.
struct World {
    hub: HubProc,
    k: StandIn,
    agent: Child,
    dir: PathBuf,
    token: String,
}

fn world(tag: &str) -> World {
    let dir = temp_dir(tag);
    let k = StandIn::start(Config::default());
    for y in [ARTICLE_RBAC, AGENT_IMPERSONATION, DEBUG_ACCESS] {
        k.load_rbac_yaml(y).unwrap();
    }
    write_kube_credentials(&dir, &k.agent_token(), &k.ca_pem());
    // UPLINK_HUB_BIN: another build of the hub to serve (the static
    // release binary, for the RSS figure); this crate's debug build by
    // default.
    let hub = match std::env::var_os("UPLINK_HUB_BIN") {
        Some(bin) => {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut c = Command::new(bin);
            c.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
                .args(["--public-url", &format!("https://127.0.0.1:{port}")])
                .arg("--data-dir")
                .arg(dir.join("data"));
            HubProc::start_command(&dir, c)
        }
        None => HubProc::start_on_free_port(&dir),
    };
    let token = hub.admin_token.clone().unwrap();
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    ok(&hub_cli(&hub, &token, &["cluster", "register", "edge-1", "--user", "bob", "--out-dir", out.to_str().unwrap()]));
    std::fs::copy(out.join("uplink-edge-1-activation.json"), dir.join("activation.json")).unwrap();
    let (activation, state) = (dir.join("activation.json"), dir.join("state"));
    let flags = ["--activation".as_ref(), activation.as_os_str(), "--state".as_ref(), state.as_os_str()];
    let agent = hub_support::spawn_agent(&flags, &k.url(), &dir, &dir.join("agent.log"));
    let admin = hub.admin();
    assert!(wait_for(20, || admin.get("/api/v1/clusters/edge-1").unwrap().json()["status"] == "ACTIVE"));
    let bob = admin.post_json("/api/v1/users", &json!({ "name": "bob" })).unwrap().json()["token"]
        .as_str()
        .unwrap()
        .to_string();
    admin.post_json("/api/v1/grants", &json!({ "user": "bob", "clusters": "edge-1" })).unwrap();
    World { hub, k, agent, dir, token: bob }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

fn kubectl_at(w: &World, version: &str) -> Option<Kubectl> {
    let bin = PathBuf::from(format!("/usr/lib/google-cloud-sdk/bin/kubectl.{version}"));
    if !bin.is_file() {
        let required = std::env::var("UPLINK_REQUIRE_KUBECTL").is_ok_and(|v| v == "1");
        assert!(!required, "kubectl {version} not found at {}", bin.display());
        eprintln!("\n!!!!! SKIPPING kubectl {version}: not at {} !!!!!\n", bin.display());
        return None;
    }
    let mut kc = Kubectl::find(&format!("h2-kubectl-{version}"))?;
    kc.bin = bin;
    ok(&hub_cli(&w.hub, &w.token, &["kubeconfig", "--cluster", "edge-1", "--out", kc.kubeconfig.to_str().unwrap()]));
    Some(kc)
}

/// kubectl 1.27, 1.30, 1.32 and 1.33 speak HTTP/2 to the hub for get,
/// watch and `logs -f` (no HTTP/1.1 request at all), and exec and
/// port-forward work: client-go dials those upgrades over HTTP/1.1 on a
/// connection of their own (SPDY and WebSocket both need the HTTP/1.1
/// `Upgrade`), which this test asserts too.
#[test]
fn kubectl_speaks_h2_for_reads_watches_and_logs() {
    if Kubectl::find("h2-probe").is_none() {
        return;
    }
    let w = world("h2-kubectl");
    for version in ["1.27", "1.30", "1.32", "1.33"] {
        let Some(kc) = kubectl_at(&w, version) else { continue };
        let before = counts(&w.hub);
        let pods = ok(&kc.run(&["get", "pods", "-n", "default"]));
        assert!(pods.contains(POD), "{version}: {pods}");
        let mut watch = kc.spawn(&["get", "pods", "-n", "default", "-w"]);
        let rx = lines(&mut watch);
        wait_line(&rx, PATIENCE, "an existing pod", |l| l.contains("db-0"));
        let name = format!("late-{}", version.replace('.', "-"));
        w.k.apply(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]},
            "status": {"phase": "Pending"},
        }))
        .unwrap();
        wait_line(&rx, PATIENCE, "the new pod", |l| l.contains(&name));
        let mut logs = kc.spawn(&["logs", "-f", POD, "-n", "default"]);
        let lrx = lines(&mut logs);
        wait_line(&lrx, PATIENCE, "the existing log", |l| l.contains("listening"));
        let line = format!("GET /h2/{version} 200");
        w.k.append_log("default", POD, &line);
        wait_line(&lrx, PATIENCE, "the appended line", |l| l == line);
        assert!(metric(&w.hub, H2_OPEN) >= 2, "{version}: the watch and the log follow are on h2 connections");
        kill(logs);
        kill(watch);
        let (h2, h1) = since(&w.hub, &before);
        assert!(h2 >= 3, "{version}: {h2} requests over h2");
        assert_eq!(h1, 1, "{version}: kubectl made HTTP/1.1 requests for get, watch and logs (one is /metrics)");

        // exec and port-forward: HTTP/1.1 upgrades, as client-go dials them.
        let before = counts(&w.hub);
        let cat = kc.run_with_stdin(&["exec", "-i", POD, "-n", "default", "--", "cat"], b"hello over h1 upgrade\n");
        assert_eq!(ok(&cat), "hello over h1 upgrade\n", "{version}");
        let mut pf = kc.spawn(&["port-forward", &format!("pod/{POD}"), ":8080", "-n", "default"]);
        let rx = lines(&mut pf);
        let port = forwarded_port(&rx, PATIENCE);
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.write_all(b"ping through the hub").unwrap();
        let mut back = vec![0u8; 20];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, b"ping through the hub");
        drop(s);
        kill(pf);
        let (h2, h1) = since(&w.hub, &before);
        eprintln!("kubectl {version}: exec + port-forward made {h2} h2 requests and {h1} HTTP/1.1 requests");
        assert!(h1 >= 2, "{version}: exec and port-forward upgrade over HTTP/1.1 ({h1})");
    }
}

/// curl with the hub's CA and bob's token.
fn curl(w: &World, args: &[&str]) -> Command {
    let ca = w.dir.join("hub-ca.pem");
    std::fs::write(&ca, &w.hub.ca_pem).unwrap();
    let mut c = Command::new("curl");
    c.args(["-sS", "--cacert", ca.to_str().unwrap(), "-H", &format!("Authorization: Bearer {}", w.token)]).args(args);
    c
}

/// Opens `n` pod watches with curl (`--http2` multiplexes them on one
/// connection; `--http1.1` needs one each) and returns the hub's RSS
/// growth per watch in KiB once all are open.
fn watches(w: &World, n: usize, proto: &str) -> (Child, f64) {
    let url = format!("{}/k8s/clusters/edge-1/api/v1/namespaces/default/pods?watch=true", w.hub.url);
    let rss0 = w.hub.rss_kib();
    let streams0 = metric(&w.hub, "uplink_hub_streams_open");
    let mut args = vec![proto, "--parallel", "--parallel-max", "300", "-o", "/dev/null"];
    let urls: Vec<String> = (0..n).map(|i| format!("{url}&n={i}")).collect();
    for u in &urls {
        args.push(u);
        args.push("-o");
        args.push("/dev/null");
    }
    args.truncate(args.len() - 2);
    let child = curl(w, &args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    assert!(
        wait_for(60, || metric(&w.hub, "uplink_hub_streams_open") >= streams0 + n as u64),
        "{n} watches over {proto} did not all open"
    );
    std::thread::sleep(Duration::from_millis(500));
    let per = (w.hub.rss_kib() as f64 - rss0 as f64) / n as f64;
    (child, per)
}

/// 100 watches from one client share one HTTP/2 connection. kubectl
/// opens one watch per process, so curl (nghttp2, `--parallel`) is the
/// client that holds 100 at once. Also measured: the hub's memory per
/// open watch, 200 over HTTP/1.1 and 200 over HTTP/2, of this crate's
/// debug build or of `UPLINK_HUB_BIN` (the static release binary:
/// `UPLINK_HUB_BIN=... cargo test --test e2e_h2 hundred -- --nocapture`).
#[test]
fn a_hundred_watches_share_one_connection() {
    if !support::have_curl() {
        return;
    }
    let w = world("h2-watches");
    let (h2_0, h1_0) = (metric(&w.hub, H2_OPEN), metric(&w.hub, H1_OPEN));
    let (mut c, _) = watches(&w, 100, "--http2");
    assert_eq!(metric(&w.hub, H2_OPEN), h2_0 + 1, "100 watches, one h2 connection");
    // Only the metrics question's own HTTP/1.1 connection, as before.
    assert_eq!(metric(&w.hub, H1_OPEN), h1_0);
    // A watch event reaches every one of them.
    c.kill().unwrap();
    c.wait().unwrap();
    assert!(
        wait_for(20, || metric(&w.hub, "uplink_hub_streams_open") == 0),
        "closing the connection reset every stream"
    );

    drop(w);
    // Memory per open watch, each protocol on a fresh hub (a hub that
    // already held watches reuses the memory they freed).
    let w = world("h2-rss-h2");
    let (mut c, per_h2) = watches(&w, 200, "--http2");
    c.kill().unwrap();
    c.wait().unwrap();
    drop(w);
    let w = world("h2-rss-h1");
    let (mut c, per_h1) = watches(&w, 200, "--http1.1");
    assert!(metric(&w.hub, H1_OPEN) >= 200);
    c.kill().unwrap();
    c.wait().unwrap();
    let build = if std::env::var_os("UPLINK_HUB_BIN").is_some() { "UPLINK_HUB_BIN" } else { "debug build" };
    eprintln!("FIGURE hub RSS per open watch ({build}): h2 {per_h2:.1} KiB, HTTP/1.1 {per_h1:.1} KiB");
}

// ---- A raw HTTP/2 client for the abuse cases (RFC 9113 frames, HPACK
// literals without indexing or Huffman, RFC 7541 §6.2.2). ----

type Tls = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

fn h2_connect(hub: &HubProc, settings: &[(u16, u32)]) -> Tls {
    let tcp = std::net::TcpStream::connect(hub.addr).unwrap();
    let cfg = uplink::tls::client_config(&uplink::tls::Trust::CaPem(hub.ca_pem.clone()), None, &[b"h2"]).unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = rustls::StreamOwned::new(rustls::ClientConnection::new(cfg, name).unwrap(), tcp);
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    let mut payload = Vec::new();
    for (id, v) in settings {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&v.to_be_bytes());
    }
    frame(&mut tls, 0x4, 0, 0, &payload);
    tls.flush().unwrap();
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"h2"[..]), "the hub chose h2");
    tls
}

fn frame(w: &mut impl Write, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    w.write_all(&f).unwrap();
}

fn hpack_int(out: &mut Vec<u8>, first: u8, prefix: u8, mut v: usize) {
    let max = (1usize << prefix) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

fn hpack(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (n, v) in fields {
        out.push(0);
        hpack_int(&mut out, 0, 7, n.len());
        out.extend_from_slice(n.as_bytes());
        hpack_int(&mut out, 0, 7, v.len());
        out.extend_from_slice(v.as_bytes());
    }
    out
}

fn get(path: &str, token: &str) -> Vec<u8> {
    let auth = format!("Bearer {token}");
    hpack(&[
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "localhost"),
        (":path", path),
        ("authorization", &auth),
    ])
}

/// A frame read: (type, flags, stream, payload).
type Frame = (u8, u8, u32, Vec<u8>);

/// Frames read until EOF or `within`, and whether the hub closed.
fn read_frames(tls: &mut Tls, within: Duration) -> (Vec<Frame>, bool) {
    tls.sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let end = Instant::now() + within;
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    let mut closed = false;
    let mut chunk = [0u8; 16384];
    while Instant::now() < end {
        match tls.read(&mut chunk) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
        while buf.len() >= 9 {
            let len = (buf[0] as usize) << 16 | (buf[1] as usize) << 8 | buf[2] as usize;
            if buf.len() < 9 + len {
                break;
            }
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            frames.push((buf[3], buf[4], stream, buf[9..9 + len].to_vec()));
            buf.drain(..9 + len);
        }
    }
    (frames, closed)
}

const GOAWAY: u8 = 0x7;
const RST_STREAM: u8 = 0x3;
const HEADERS: u8 = 0x1;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// Another user's requests keep succeeding.
fn others_fine(hub: &HubProc) {
    let t = Instant::now();
    for _ in 0..5 {
        assert_eq!(hub.admin().get("/api/v1/whoami").unwrap().status, 200);
    }
    assert!(t.elapsed() < Duration::from_secs(5), "others waited {:?}", t.elapsed());
}

#[test]
fn h2_abuse_is_refused_without_harm_to_others() {
    let dir = temp_dir("h2-abuse");
    let hub = HubProc::start(&dir);
    let token = hub.admin_token.clone().unwrap();

    // The hub's SETTINGS announce its bounds.
    let mut tls = h2_connect(&hub, &[]);
    let (frames, _) = read_frames(&mut tls, Duration::from_millis(500));
    let settings = &frames.iter().find(|f| f.0 == 0x4 && f.1 & 1 == 0).expect("server SETTINGS").3;
    let value = |id: u16| {
        settings
            .chunks(6)
            .find(|c| u16::from_be_bytes([c[0], c[1]]) == id)
            .map(|c| u32::from_be_bytes([c[2], c[3], c[4], c[5]]))
    };
    assert_eq!(value(0x3), Some(250), "MAX_CONCURRENT_STREAMS");
    assert_eq!(value(0x6), Some(64 * 1024), "MAX_HEADER_LIST_SIZE");
    drop(tls);

    // Rapid reset (CVE-2023-44487): HEADERS then RST_STREAM, 2,000 times.
    let before = metric(&hub, H2_REQUESTS);
    let mut tls = h2_connect(&hub, &[]);
    let block = get("/api/v1/whoami", &token);
    let mut burst = Vec::new();
    for i in 0..2000u32 {
        let id = 1 + 2 * i;
        frame(&mut burst, HEADERS, END_HEADERS | END_STREAM, id, &block);
        frame(&mut burst, RST_STREAM, 0, id, &8u32.to_be_bytes());
    }
    let _ = tls.write_all(&burst).and_then(|_| tls.flush());
    others_fine(&hub);
    let (frames, closed) = read_frames(&mut tls, Duration::from_secs(5));
    let goaway = frames.iter().find(|f| f.0 == GOAWAY);
    assert!(goaway.is_some() || closed, "rapid reset: no GOAWAY");
    if let Some(g) = goaway {
        let code = u32::from_be_bytes([g.3[4], g.3[5], g.3[6], g.3[7]]);
        assert_eq!(code, 0xb, "GOAWAY ENHANCE_YOUR_CALM");
    }
    let handled = metric(&hub, H2_REQUESTS) - before;
    eprintln!("rapid reset: {handled} of 2000 reset streams reached the hub's handlers before GOAWAY");
    assert!(handled < 2000, "every reset stream was served");
    others_fine(&hub);

    // CONTINUATION flood: one header block that never ends.
    let mut tls = h2_connect(&hub, &[]);
    let mut start = Vec::new();
    frame(&mut start, HEADERS, 0, 1, &get("/healthz", &token));
    let _ = tls.write_all(&start);
    let filler = hpack(&[("x-filler", &"a".repeat(4000))]);
    let mut sent = 0usize;
    let started = Instant::now();
    while sent < 64 << 20 && started.elapsed() < Duration::from_secs(10) {
        let mut batch = Vec::new();
        for _ in 0..64 {
            frame(&mut batch, 0x9, 0, 1, &filler);
        }
        if tls.write_all(&batch).and_then(|_| tls.flush()).is_err() {
            break;
        }
        sent += batch.len();
    }
    let (frames, closed) = read_frames(&mut tls, Duration::from_secs(5));
    assert!(closed || frames.iter().any(|f| f.0 == GOAWAY), "CONTINUATION flood: connection kept");
    assert!(sent < 64 << 20, "the hub read 64 MiB of one header block");
    eprintln!("CONTINUATION flood: cut after {} KiB", sent / 1024);
    others_fine(&hub);

    // Too many concurrent streams: 300 uploads that never finish; past
    // 250 the hub refuses the stream (RST_STREAM REFUSED_STREAM).
    let mut tls = h2_connect(&hub, &[]);
    let post = hpack(&[
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", "localhost"),
        (":path", "/v1/activate"),
        ("content-type", "application/json"),
    ]);
    let mut burst = Vec::new();
    for i in 0..300u32 {
        frame(&mut burst, HEADERS, END_HEADERS, 1 + 2 * i, &post);
    }
    let wrote = tls.write_all(&burst).and_then(|_| tls.flush());
    let (frames, closed) = read_frames(&mut tls, Duration::from_secs(3));
    eprintln!(
        "300 streams: write {wrote:?}, closed {closed}, frames {:?}",
        frames
            .iter()
            .map(|f| (f.0, f.2, f.3.get(..8).map(<[u8]>::to_vec)))
            .filter(|f| f.0 != 0x0)
            .take(20)
            .collect::<Vec<_>>()
    );
    let refused: Vec<u32> = frames
        .iter()
        .filter(|f| f.0 == RST_STREAM && u32::from_be_bytes([f.3[0], f.3[1], f.3[2], f.3[3]]) == 0x7)
        .map(|f| f.2)
        .collect();
    assert!(refused.len() >= 50, "streams past 250 refused: {}", refused.len());
    assert!(refused.iter().all(|&id| id > 2 * 250), "{refused:?}");
    others_fine(&hub);
    drop(tls);

    // An oversized header list (200 KiB) never reaches a handler.
    let before = metric(&hub, H2_REQUESTS);
    let mut tls = h2_connect(&hub, &[]);
    let mut big = get("/api/v1/whoami", &token);
    big.extend(hpack(&[("x-big", &"b".repeat(200 * 1024))]));
    // In 16 KiB pieces: HEADERS then CONTINUATIONs (the default frame size).
    let mut pieces = big.chunks(16 * 1024).peekable();
    let mut first = true;
    let mut burst = Vec::new();
    while let Some(p) = pieces.next() {
        let last = pieces.peek().is_none();
        let flags = if last { END_HEADERS } else { 0 } | if first { END_STREAM } else { 0 };
        frame(&mut burst, if first { HEADERS } else { 0x9 }, flags, 1, p);
        first = false;
    }
    // The hub may close before it has read it all.
    let _ = tls.write_all(&burst).and_then(|_| tls.flush());
    // Its answer: a reset or an error for stream 1, a GOAWAY, or the
    // connection closed. When the hub closes with our bytes still unread,
    // the kernel answers them with a TCP reset, and that reset discards
    // whatever frames the hub had sent before it (seen on a loaded machine).
    let (frames, closed) = read_frames(&mut tls, Duration::from_secs(3));
    assert!(
        closed || frames.iter().any(|f| (f.0 == RST_STREAM || f.0 == HEADERS) && f.2 == 1 || f.0 == GOAWAY),
        "an answer for the oversized header list: {frames:?}"
    );
    // The one after it is the metrics question itself.
    assert_eq!(metric(&hub, H2_REQUESTS), before, "the oversized request reached a handler");
    others_fine(&hub);

    // A stalled flow-control window: the client announces a window of 0
    // and asks for a large answer it never takes.
    let mut stalled = h2_connect(&hub, &[(0x4, 0)]);
    let index = hub.client(None).get("/").unwrap().text();
    let script = index.split('"').find(|s| s.starts_with("/assets/") && s.ends_with(".js")).unwrap().to_string();
    for i in 0..100u32 {
        frame(&mut stalled, HEADERS, END_HEADERS | END_STREAM, 1 + 2 * i, &get(&script, &token));
    }
    stalled.flush().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    others_fine(&hub);
    let rss = hub.rss_kib();
    assert!(rss < 200 * 1024, "hub RSS {rss} KiB with a stalled window");
    drop(stalled);
    std::fs::remove_dir_all(&dir).ok();
}

/// The policy is the same over h2: refused impersonation, path checks,
/// the response-header policy; and a reset h2 stream resets its tunnel
/// stream while the connection lives on.
#[test]
fn policy_and_cancellation_over_h2() {
    if !support::have_curl() {
        return;
    }
    let w = world("h2-policy");
    let base = format!("{}/k8s/clusters/edge-1", w.hub.url);
    let run = |args: &[&str]| {
        let o = curl(&w, args).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let pods = format!("{base}/api/v1/namespaces/default/pods");
    let out = run(&["--http2", "-i", "-H", "Impersonate-User: alice", &pods]);
    assert!(out.starts_with("HTTP/2 403"), "{out}");
    assert!(out.contains("uplink-hub refuses impersonation (impersonate-user header)"), "{out}");
    let out = run(&["--http2", "-i", "--path-as-is", &format!("{base}/api/v1/namespaces/default/../kube-system/pods")]);
    assert!(out.starts_with("HTTP/2 400") && out.contains("path rejected by uplink-hub"), "{out}");
    let out = run(&["--http2", "-i", &pods]);
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(out.contains("content-security-policy: sandbox; default-src 'none'"), "{out}");
    assert!(!out.to_ascii_lowercase().contains("\r\nconnection:"), "no connection field over h2: {out}");

    // One watch on a raw h2 connection, then RST_STREAM (CANCEL).
    let mut tls = h2_connect(&w.hub, &[]);
    let path = "/k8s/clusters/edge-1/api/v1/namespaces/default/pods?watch=true";
    let mut buf = Vec::new();
    frame(&mut buf, HEADERS, END_HEADERS | END_STREAM, 1, &get(path, &w.token));
    tls.write_all(&buf).unwrap();
    tls.flush().unwrap();
    assert!(wait_for(20, || metric(&w.hub, "uplink_hub_streams_open") == 1), "the watch's tunnel stream");
    let (frames, _) = read_frames(&mut tls, Duration::from_millis(500));
    assert!(frames.iter().any(|f| f.0 == HEADERS && f.2 == 1), "the watch answered");
    let mut buf = Vec::new();
    frame(&mut buf, RST_STREAM, 0, 1, &8u32.to_be_bytes());
    tls.write_all(&buf).unwrap();
    tls.flush().unwrap();
    assert!(wait_for(20, || metric(&w.hub, "uplink_hub_streams_open") == 0), "the reset reached the tunnel");
    // The connection itself lives on: another request on it is answered.
    let mut buf = Vec::new();
    frame(&mut buf, HEADERS, END_HEADERS | END_STREAM, 3, &get("/healthz", &w.token));
    tls.write_all(&buf).unwrap();
    tls.flush().unwrap();
    let (frames, closed) = read_frames(&mut tls, Duration::from_secs(2));
    assert!(!closed && frames.iter().any(|f| f.0 == HEADERS && f.2 == 3), "{frames:?}");
}
