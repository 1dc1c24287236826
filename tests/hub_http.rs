//! The hub's HTTP front against clients that misbehave, over real
//! sockets and TLS: strict request framing (RFC 9112 §6), deadlines for
//! slow and idle clients, and connection caps.
#![cfg(feature = "hub")]

mod hub_support;

use hub_support::{HubProc, SimAgents, tcp_from, temp_dir, tls_over, wait_for};
use serde_json::json;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Short deadlines, so the tests wait seconds, not minutes.
const SHORT: &[&str] = &[
    "--handshake-timeout",
    "2s",
    "--head-timeout",
    "2s",
    "--idle-timeout",
    "2s",
    "--body-timeout",
    "2s",
    "--small-body-timeout",
    "4s",
];

/// A hub with [`SHORT`] deadlines, except those `extra` sets itself.
fn start_with(dir: &std::path::Path, extra: &[&str]) -> HubProc {
    let mut args = vec!["--listen", "127.0.0.1:0"];
    for pair in SHORT.chunks(2) {
        if !extra.contains(&pair[0]) {
            args.extend_from_slice(pair);
        }
    }
    args.extend_from_slice(extra);
    HubProc::start_with(dir, &args)
}

/// Reads until the peer closes; `Err` with what arrived if it has not
/// closed within `within`.
fn read_until_closed(s: &mut impl Read, within: Duration) -> Result<Vec<u8>, Vec<u8>> {
    let end = Instant::now() + within;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return Ok(out),
        }
    }
    Err(out)
}

/// Metric `name`'s value from the hub's `/metrics`, asked from an
/// address of its own (127.0.0.250) so that caps on the others do not
/// refuse the question.
fn metric(hub: &HubProc, name: &str) -> u64 {
    try_metric(hub, name).unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// [`metric`], or `None` when the hub is at its total cap (the previous
/// question's connection may still be counted for a moment).
fn try_metric(hub: &HubProc, name: &str) -> Option<u64> {
    let mut tls = tls_over(hub, tcp_from(Ipv4Addr::new(127, 0, 0, 250), hub.addr).unwrap());
    tls.write_all(b"GET /metrics HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n").unwrap();
    tls.flush().unwrap();
    let mut text = String::new();
    let _ = tls.read_to_string(&mut text);
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
}

/// Sends `raw` on a fresh TLS connection and reads until the hub closes
/// it; panics if it does not within 20 s.
fn exchange_until_close(hub: &HubProc, raw: &[u8]) -> String {
    let mut tls = hub.client(None).connect().unwrap();
    tls.sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    tls.write_all(raw).unwrap();
    tls.flush().unwrap();
    let mut out = Vec::new();
    match tls.read_to_end(&mut out) {
        Ok(_) => {}
        // A TCP close without close_notify still ends the exchange.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => panic!("the hub did not close the connection: {e}; got {:?}", String::from_utf8_lossy(&out)),
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn bad_content_length_gets_400_and_the_connection_closes() {
    let dir = temp_dir("framing");
    let hub = HubProc::start(&dir);
    let admin = hub.admin();
    let r = admin.post_json("/api/v1/clusters", &json!({ "name": "edge-1" })).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let token = hub.admin_token.clone().unwrap();
    // What the message says: hyper's parser refuses a malformed length
    // itself (an empty 400, then close); uplink's own rule refuses the
    // codings hyper would take.
    let hypers = "";
    let cases: &[(&str, &str, &str)] = &[
        ("POST /v1/activate", "Content-Length: +5\r\n", hypers),
        ("POST /v1/activate", "Content-Length: -5\r\n", hypers),
        ("POST /v1/activate", "Content-Length: 0x5\r\n", hypers),
        ("POST /v1/activate", "Content-Length: 5, 5\r\n", hypers),
        ("POST /v1/activate", "Content-Length: 5\r\nContent-Length: 6\r\n", hypers),
        ("POST /v1/activate", "Content-Length: 99999999999999999999\r\n", hypers),
        ("POST /v1/activate", "Transfer-Encoding: gzip, chunked\r\n", "only `chunked`"),
        ("POST /v1/activate", "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "only `chunked`"),
        ("POST /api/v1/users", "Content-Length: +5\r\n", hypers),
        ("POST /api/v1/users", "Transfer-Encoding: gzip, chunked\r\n", "only `chunked`"),
        ("POST /k8s/clusters/edge-1/api/v1/namespaces/default/configmaps", "Content-Length: +5\r\n", hypers),
        // Transfer-Encoding with Content-Length: chunked wins and the
        // connection closes after the answer (RFC 9112 §6.1); "hello" is
        // no chunk, so the body fails.
        ("POST /v1/activate", "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "body could not be read"),
    ];
    for (line, fields, expect) in cases {
        let raw = format!("{line} HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {token}\r\n{fields}\r\nhello");
        let answer = exchange_until_close(&hub, raw.as_bytes());
        assert!(answer.starts_with("HTTP/1.1 400 "), "{line} {fields:?}: {answer}");
        assert!(answer.contains(expect), "{fields:?}: {answer}");
        // The body bytes were not read as a second request.
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    }
    // Identical duplicate lengths are one length (RFC 9110 §8.6 lets a
    // server collapse them, and hyper does): the body is read, once.
    let raw = "POST /v1/activate HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}"
        .to_string();
    let answer = exchange_until_close(&hub, raw.as_bytes());
    assert!(answer.contains("invalid activation request: missing field"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    assert!(hub.log().contains("request refused"), "{}", hub.log());
    // A well-framed request on the same hub still works.
    assert_eq!(admin.get("/api/v1/whoami").unwrap().status, 200);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_trickled_head_is_cut_at_its_deadline_not_kept_for_minutes() {
    let dir = temp_dir("slow-head");
    let hub = start_with(&dir, &[]);
    let mut tls = hub.client(None).connect().unwrap();
    tls.sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    // One byte every 300 ms: each arrives well within any idle timeout,
    // but the head would take 30 s to finish.
    let head = format!("GET /api/v1/whoami HTTP/1.1\r\nHost: hub\r\nX-Slow: {}\r\n\r\n", "a".repeat(100));
    let started = Instant::now();
    let mut closed = false;
    for b in head.as_bytes() {
        if tls.write_all(&[*b]).and_then(|_| tls.flush()).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
        let mut buf = [0u8; 256];
        match tls.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => panic!("answered a head that never finished: {:?}", String::from_utf8_lossy(&buf[..n])),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "the hub kept a head trickled for {:?}", started.elapsed());
    assert!(wait_for(30, || metric(&hub, "uplink_hub_slow_clients_closed_total") >= 1));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn idle_keep_alive_and_unfinished_handshakes_are_closed() {
    let dir = temp_dir("idle");
    let hub = start_with(&dir, &[]);
    // A kept-alive connection after one answer.
    let mut tls = hub.client(None).connect().unwrap();
    tls.sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\n").unwrap();
    tls.flush().unwrap();
    let answer = read_until_closed(&mut tls, Duration::from_secs(30)).expect("idle connection closed");
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"), "{answer:?}");
    // TCP only, and a handshake that never finishes.
    let mut tcp = std::net::TcpStream::connect(hub.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    read_until_closed(&mut tcp, Duration::from_secs(30)).expect("silent TCP connection closed");
    let mut tcp = std::net::TcpStream::connect(hub.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    // The first bytes of a ClientHello record, then nothing.
    tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00]).unwrap();
    read_until_closed(&mut tcp, Duration::from_secs(30)).expect("unfinished handshake closed");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_stalled_activation_body_is_cut() {
    let dir = temp_dir("slow-body");
    let hub = start_with(&dir, &[]);
    for (fields, first) in [
        ("Content-Length: 1000\r\n", &b"{\"activation_id\": "[..]),
        ("Transfer-Encoding: chunked\r\n", &b"10\r\n{\"activation_id"[..]),
    ] {
        let mut tls = hub.client(None).connect().unwrap();
        tls.sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        write!(tls, "POST /v1/activate HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n{fields}\r\n")
            .unwrap();
        tls.write_all(first).unwrap();
        tls.flush().unwrap();
        let answer = read_until_closed(&mut tls, Duration::from_secs(30)).expect("stalled body cut");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.contains("request body not received in time"), "{answer}");
    }
    // A body that keeps moving, but too slowly for the total bound: one
    // byte a second, 1000 bytes announced.
    let mut tls = hub.client(None).connect().unwrap();
    tls.sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    tls.write_all(b"POST /v1/activate HTTP/1.1\r\nHost: hub\r\nContent-Length: 1000\r\n\r\n").unwrap();
    tls.flush().unwrap();
    let mut cut = false;
    for _ in 0..60 {
        if tls.write_all(b" ").and_then(|_| tls.flush()).is_err() {
            cut = true;
            break;
        }
        if let Ok(answer) = read_until_closed(&mut tls, Duration::from_millis(1000)) {
            assert!(String::from_utf8_lossy(&answer).contains("not received in time"), "{answer:?}");
            cut = true;
            break;
        }
    }
    assert!(cut, "a body trickled past the total bound was kept");
    std::fs::remove_dir_all(&dir).ok();
}

/// Reads the 503 a refused connection gets.
fn refused(hub: &HubProc, src: Ipv4Addr) -> String {
    let tcp = tcp_from(src, hub.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = tls_over(hub, tcp);
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn connection_caps_answer_503_with_retry_after() {
    let dir = temp_dir("caps");
    let hub = start_with(
        &dir,
        &[
            "--max-connections",
            "6",
            "--max-connections-per-address",
            "3",
            "--idle-timeout",
            "60s",
            "--handshake-timeout",
            "60s",
        ],
    );
    let token = hub.admin_token.clone().unwrap();
    let one = Ipv4Addr::new(127, 0, 0, 1);
    // An authenticated keep-alive connection: it does not count toward
    // its address's cap.
    let mut authed = tls_over(&hub, tcp_from(one, hub.addr).unwrap());
    write!(authed, "GET /api/v1/whoami HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {token}\r\n\r\n").unwrap();
    authed.flush().unwrap();
    let mut buf = [0u8; 4096];
    let n = authed.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Three connections that say nothing fill 127.0.0.1's cap.
    let quiet: Vec<_> = (0..3).map(|_| tcp_from(one, hub.addr).unwrap()).collect();
    assert!(wait_for(30, || metric(&hub, "uplink_hub_connections_unauthenticated") >= 3));
    // They count toward the cap once they have lingered past the grace.
    std::thread::sleep(uplink::hub::limits::PENDING_GRACE + Duration::from_millis(300));
    let answer = refused(&hub, one);
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("Retry-After: 2"), "{answer}");
    assert!(answer.contains("have not authenticated yet"), "{answer}");
    assert!(answer.contains(r#""kind": "Status""#), "{answer}");
    // Another address still gets in, until the total is reached.
    let two = Ipv4Addr::new(127, 0, 0, 2);
    let mut more = vec![tcp_from(two, hub.addr).unwrap()];
    // Five held, plus the one asking.
    assert!(wait_for(30, || try_metric(&hub, "uplink_hub_connections_open") == Some(6)));
    // Let the question's own connection go before taking the last slot;
    // the hub accepts in order, so the sixth is in before the next.
    std::thread::sleep(Duration::from_millis(300));
    more.push(tcp_from(two, hub.addr).unwrap());
    let answer = refused(&hub, Ipv4Addr::new(127, 0, 0, 3));
    assert!(answer.starts_with("HTTP/1.1 503 ") && answer.contains("connection limit (6)"), "{answer}");
    // Slots come back as connections close.
    drop(quiet);
    drop(more);
    assert!(wait_for(30, || try_metric(&hub, "uplink_hub_connections_open").is_some_and(|n| n <= 2)));
    assert_eq!(hub.client(Some(&token)).get("/api/v1/whoami").unwrap().status, 200);
    assert!(metric(&hub, "uplink_hub_connections_refused_total") >= 2);
    // The authenticated connection outlived all of it.
    write!(authed, "GET /api/v1/whoami HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {token}\r\n\r\n").unwrap();
    authed.flush().unwrap();
    let n = authed.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    std::fs::remove_dir_all(&dir).ok();
}

/// The hub does not trust an agent's framing either: a response head
/// with a bad `Content-Length` becomes a 502 Status.
#[test]
fn a_bad_content_length_from_an_agent_is_a_502() {
    let dir = temp_dir("agent-framing");
    let hub = HubProc::start(&dir);
    let admin = hub.admin();
    let reg = admin.post_json("/api/v1/clusters", &json!({ "name": "edge-1" })).unwrap().json();
    let a = &reg["activation"];
    let body = json!({ "activation_id": a["activation_id"], "activation_code": a["activation_code"] });
    let act = hub.client(None).post_json("/v1/activate", &body).unwrap().json();
    let agents = SimAgents::start(hub.addr, &hub.ca_pem, act["credential"].as_str().unwrap(), 1);
    assert!(wait_for(10, || agents.state.lock().unwrap().connected == 1));
    let r = admin.get("/k8s/clusters/edge-1/bad-length").unwrap();
    assert_eq!((r.status, r.json()["kind"].as_str()), (502, Some("Status")), "{}", r.text());
    assert!(r.json()["message"].as_str().unwrap().contains("digits only"), "{}", r.text());
    assert!(hub.log().contains("bad response framing from agent"), "{}", hub.log());
    // The same agent's well-framed answers still pass.
    assert_eq!(admin.get("/k8s/clusters/edge-1/cl").unwrap().status, 200);
    std::fs::remove_dir_all(&dir).ok();
}

/// A client that asks and never reads (a slow read) is cut once an
/// answer held in memory has not left within the deadline.
#[test]
fn a_client_that_stops_reading_is_cut() {
    let dir = temp_dir("slow-read");
    let hub = start_with(&dir, &[]);
    let index = hub.client(None).get("/").unwrap().text();
    let script = index
        .split('"')
        .find(|s| s.starts_with("/assets/") && s.ends_with(".js"))
        .unwrap_or_else(|| panic!("no script in {index}"))
        .rsplit_once('/')
        .unwrap()
        .0
        .to_string()
        + "/cluster.js";
    assert_eq!(hub.client(None).get(&script).unwrap().status, 200, "{script}");
    let requests = 1000;
    let mut tls = hub.client(None).connect().unwrap();
    // 40 KiB of requests fit the hub's receive buffer; about 28 MiB of
    // answers do not fit the buffers between the two, so the hub's
    // writes stall while the test does not read.
    let ask = format!("GET {script} HTTP/1.1\r\nHost: hub\r\n\r\n").repeat(requests);
    tls.write_all(ask.as_bytes()).unwrap();
    tls.flush().unwrap();
    std::thread::sleep(Duration::from_secs(10));
    tls.sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let got = read_until_closed(&mut tls, Duration::from_secs(60)).expect("the hub closed the connection");
    let answers = String::from_utf8_lossy(&got).matches("HTTP/1.1 200 OK").count();
    assert!(answers < requests, "all {answers} answers waited for a client that did not read");
    std::fs::remove_dir_all(&dir).ok();
}
