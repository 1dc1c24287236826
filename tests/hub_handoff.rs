//! The hand-off between replicas, with real processes: two `uplink-hub
//! serve` replicas A and B on a PostgreSQL started by the test, the real
//! agent connected only to B (it dials B's URL), the stand-in API server,
//! and real kubectl through A.
//!
//! ```text
//!  kubectl ──► A (no tunnel) ══ /v1/peer (TLS, HMAC credential) ══► B ══ tunnel ══► agent ──► API server
//!  kubectl ──► B ═════════════════════════════════════════════════════ tunnel ══► agent ──► API server
//! ```
//!
//! - get, get -w (sees a change), logs -f, exec through A (kubectl
//!   speaks HTTP/2 to A, exec's upgrade HTTP/1.1); the cluster's
//!   own Forbidden for Alice in kube-system, word for word as through B;
//! - kubectl killed during a watch through A: the stream is reset on B
//!   and on the agent (their stream gauges go back to zero);
//! - the p50 of a small request through A and through B, in one run;
//! - B killed with kill -9: A answers the usual "not connected" at once;
//! - `/v1/peer` refuses anything but a replica's credential, with a log
//!   line, so nobody else can put an identity on B's tunnels;
//! - with simulated agents on B and C: a hand-off reads nothing from the
//!   store, and when the replica handed to dies, A's next dial to it fails
//!   and C answers, so no request is refused.
//!
//! Skips loudly without kubectl or PostgreSQL (see `support`).
#![cfg(feature = "hub")]

mod hub_support;
mod support;

use hub_support::{
    HubProc, KillOnDrop, free_port, hub_metric, metric, ok, register_and_activate, replica_id, spawn_agent_at,
    temp_dir, wait_for,
};
use serde_json::json;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::kube::{Config, StandIn, impersonation_rbac};
use support::kubectl::{Kubectl, kill, lines, stderr, wait_line};
use support::pg::Postgres;

const ALICE: &str = "arn:aws:iam::1234567890:user/Alice";
const CLUSTER: &str = "edge-handoff";
const ARTICLE_RBAC: &str = include_str!("fixtures/kube/eks-console-restricted-access.yaml");
/// Beside the article's read-only Role: Alice may also watch pods, read
/// their logs and exec into them, in `default` only.
const ALICE_DEBUGS: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: alice-debug
  namespace: default
rules:
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["watch"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["pods/exec"]
  verbs: ["create", "get"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: alice-debug
  namespace: default
subjects:
- kind: User
  name: "arn:aws:iam::1234567890:user/Alice"
  apiGroup: rbac.authorization.k8s.io
roleRef:
  kind: Role
  name: alice-debug
  apiGroup: rbac.authorization.k8s.io
"#;
const PATIENCE: Duration = Duration::from_secs(60);
const POD: &str = "web-7d4b9c8f6d-k2x9p";

/// A replica on a port of its own, advertising and publishing its own URL.
fn replica(pg: &Postgres, dir: &Path) -> HubProc {
    let port = free_port();
    replica_advertising(pg, dir, port, &format!("https://127.0.0.1:{port}"))
}

/// A replica that agents cannot reach: it advertises a closed port, so
/// the agents that learn of it from the replica set never hold a tunnel
/// to it (it only hands off; nobody hands off to it).
fn replica_out_of_agents_reach(pg: &Postgres, dir: &Path) -> HubProc {
    let (port, closed) = (free_port(), free_port());
    replica_advertising(pg, dir, port, &format!("https://127.0.0.1:{closed}"))
}

fn replica_advertising(pg: &Postgres, dir: &Path, port: u16, advertise: &str) -> HubProc {
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    HubProc::start_replica(dir, &pg.url(), listen, &format!("https://{listen}"), advertise)
}

/// The agent's own `/metrics` on its health port.
fn agent_metric(health: &str, name: &str) -> Option<f64> {
    let mut s = std::net::TcpStream::connect(health).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {health}\r\nConnection: close\r\n\r\n").ok()?;
    let mut page = String::new();
    s.read_to_string(&mut page).ok()?;
    metric(&page, name)
}

/// A small request, again and again on one keep-alive connection: the
/// latency of each, sorted.
fn latencies(hub: &HubProc, token: &str, path: &str, n: usize) -> Vec<Duration> {
    let mut tls = hub.client(None).connect().unwrap();
    let mut out = Vec::with_capacity(n);
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..n {
        let t = Instant::now();
        write!(tls, "GET {path} HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {token}\r\n\r\n").unwrap();
        tls.flush().unwrap();
        let mut got = Vec::new();
        loop {
            let k = tls.read(&mut buf).unwrap();
            assert!(k > 0, "connection closed after {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..k]);
            let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            let body = got.len() - end - 4;
            if let Some(len) = head.lines().find_map(|l| l.strip_prefix("content-length:")) {
                if body >= len.trim().parse::<usize>().unwrap() {
                    break;
                }
            } else if got.ends_with(b"\r\n0\r\n\r\n") {
                break;
            }
        }
        out.push(t.elapsed());
    }
    out.sort();
    out
}

fn spawn_agent(dir: &Path, k: &StandIn, health: &str) -> KillOnDrop {
    let (activation, state) = (dir.join("activation.json"), dir.join("state"));
    let flags = ["--activation".as_ref(), activation.as_os_str(), "--state".as_ref(), state.as_os_str()];
    let agent = Command::new(env!("CARGO_BIN_EXE_uplink"));
    KillOnDrop(spawn_agent_at(agent, &flags, &k.url(), dir, &dir.join("agent.log"), health))
}

#[test]
fn kubectl_through_a_replica_without_the_tunnel() {
    let Some(via_a) = Kubectl::find("handoff-alice-a") else { return };
    let via_b = Kubectl::find("handoff-alice-b").unwrap();
    let Some(pg) = Postgres::start("handoff") else { return };
    let dir = temp_dir("handoff");
    let k = StandIn::start(Config::default());
    k.load_rbac_yaml(&ARTICLE_RBAC.replace(r#"name: "alice""#, &format!("name: {ALICE:?}"))).unwrap();
    k.load_rbac_yaml(&impersonation_rbac(&[ALICE])).unwrap();
    k.load_rbac_yaml(ALICE_DEBUGS).unwrap();
    hub_support::write_kube_credentials(&dir, &k.agent_token(), &k.ca_pem());

    // B first: it makes the admin. The cluster is registered on B, so its
    // activation names B's URL and the agent dials B only.
    let (dir_a, dir_b) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let mut b = replica(&pg, &dir_b);
    // The agent learns of A from the replica set but cannot reach it.
    let a = replica_out_of_agents_reach(&pg, &dir_a);
    let admin_token = b.admin_token.clone().unwrap();
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    ok(&hub_support::hub_cli(
        &b,
        &admin_token,
        &["cluster", "register", CLUSTER, "--user", ALICE, "--out-dir", out.to_str().unwrap()],
    ));
    std::fs::copy(out.join(format!("uplink-{CLUSTER}-activation.json")), dir.join("activation.json")).unwrap();
    let health = format!("127.0.0.1:{}", free_port());
    let _agent = spawn_agent(&dir, &k, &health);
    let status = |h: &HubProc| {
        h.client(Some(&admin_token)).get(&format!("/api/v1/clusters/{CLUSTER}")).unwrap().json()["status"].clone()
    };
    assert!(
        wait_for(30, || status(&b) == "ACTIVE" && status(&a) == "ACTIVE"),
        "agent log:\n{}\nB log:\n{}",
        std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default(),
        b.log()
    );
    assert_eq!(hub_metric(&a, "uplink_hub_agents_connected"), 0.0, "the agent holds no tunnel to A");
    assert_eq!(hub_metric(&b, "uplink_hub_agents_connected"), 1.0);

    let admin = b.client(Some(&admin_token));
    let r = admin.post_json("/api/v1/users", &json!({ "name": ALICE })).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let alice = r.json()["token"].as_str().unwrap().to_string();
    let r = admin.post_json("/api/v1/grants", &json!({ "user": ALICE, "clusters": CLUSTER })).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    for (kc, hub) in [(&via_a, &a), (&via_b, &b)] {
        let yaml = uplink::hub::api::kubeconfig_yaml(&hub.url, Some(&hub.ca_pem), CLUSTER, ALICE, &alice);
        std::fs::write(kc.path(), yaml).unwrap();
    }

    // get, and the cluster's own refusal, word for word as through B.
    let pods = ok(&via_a.run(&["get", "pods", "-n", "default"]));
    assert!(pods.contains(POD), "{pods}\nA log:\n{}", a.log());
    let denied_a = via_a.run(&["get", "pods", "-n", "kube-system"]);
    let denied_b = via_b.run(&["get", "pods", "-n", "kube-system"]);
    assert!(!denied_a.status.success() && !denied_b.status.success());
    let forbidden =
        format!(r#"User "{ALICE}" cannot list resource "pods" in API group "" in the namespace "kube-system""#);
    assert!(stderr(&denied_a).contains(&forbidden), "{}", stderr(&denied_a));
    assert_eq!(stderr(&denied_a), stderr(&denied_b));
    // The person's identity reached the cluster as A authenticated it.
    assert!(hub_metric(&a, "uplink_hub_handoffs_total") >= 2.0);
    assert_eq!(hub_metric(&a, "uplink_hub_peer_sessions{direction=\"out\"}"), 1.0, "one session to B");
    assert_eq!(hub_metric(&b, "uplink_hub_peer_sessions{direction=\"in\"}"), 1.0);
    // kubectl spoke HTTP/2 to A (ALPN): the hand-off sits behind either
    // protocol; the latency figure below goes over HTTP/1.1.
    let h2_requests = hub_metric(&a, "uplink_hub_requests_total{proto=\"h2\"}");
    assert!(h2_requests >= 2.0, "kubectl's requests to A over h2: {h2_requests}");

    // get -w sees a change; killing kubectl resets the stream on B and on
    // the agent.
    let mut watch = via_a.spawn(&["get", "pods", "-n", "default", "-w"]);
    let rx = lines(&mut watch);
    wait_line(&rx, PATIENCE, "an existing pod", |l| l.contains("db-0"));
    // kubectl lists first, then opens the watch.
    assert!(wait_for(10, || hub_metric(&b, "uplink_hub_peer_streams_open") == 1.0), "the watch is spliced on B");
    k.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "handed-off", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Pending"},
    }))
    .unwrap();
    wait_line(&rx, PATIENCE, "the new pod", |l| l.contains("handed-off"));
    assert!(agent_metric(&health, "uplink_streams_active").unwrap() >= 1.0);
    kill(watch);
    assert!(
        wait_for(10, || hub_metric(&b, "uplink_hub_peer_streams_open") == 0.0
            && hub_metric(&b, "uplink_hub_streams_open") == 0.0
            && agent_metric(&health, "uplink_streams_active") == Some(0.0)),
        "streams left: B peer {} B tunnel {} agent {:?}",
        hub_metric(&b, "uplink_hub_peer_streams_open"),
        hub_metric(&b, "uplink_hub_streams_open"),
        agent_metric(&health, "uplink_streams_active")
    );

    // logs -f and exec.
    let mut logs = via_a.spawn(&["logs", "-f", POD, "-n", "default"]);
    let rx = lines(&mut logs);
    wait_line(&rx, PATIENCE, "the existing log", |l| l.contains("listening"));
    k.append_log("default", POD, "GET /handoff 200");
    wait_line(&rx, PATIENCE, "the appended line", |l| l == "GET /handoff 200");
    kill(logs);
    let cat = via_a.run_with_stdin(&["exec", "-i", POD, "-n", "default", "--", "cat"], b"hello\nacross replicas\n");
    assert_eq!(ok(&cat), "hello\nacross replicas\n");

    // The figure: a small request through A (handed to B) and through B.
    let path = format!("/k8s/clusters/{CLUSTER}/api/v1/namespaces/default/pods/{POD}");
    let (n, warm) = (300, 20);
    latencies(&a, &alice, &path, warm);
    latencies(&b, &alice, &path, warm);
    let through_a = latencies(&a, &alice, &path, n);
    let through_b = latencies(&b, &alice, &path, n);
    let p = |v: &[Duration], q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)].as_secs_f64() * 1e3;
    eprintln!(
        "FIGURE small request p50/p90: through A (hand-off) {:.3}/{:.3} ms, through B (direct) {:.3}/{:.3} ms ({n} each)",
        p(&through_a, 0.5),
        p(&through_a, 0.9),
        p(&through_b, 0.5),
        p(&through_b, 0.9)
    );

    // B killed while A hands off: the watch ends, and A answers as for a
    // cluster whose agent is away, at once.
    let mut watch = via_a.spawn(&["get", "pods", "-n", "default", "-w"]);
    let rx = lines(&mut watch);
    wait_line(&rx, PATIENCE, "an existing pod", |l| l.contains("db-0"));
    b.kill9();
    let t = Instant::now();
    let after = via_a.run(&["get", "pods", "-n", "default", "--request-timeout=30s"]);
    let took = t.elapsed();
    assert!(!after.status.success(), "{}", stderr(&after));
    let said = stderr(&after);
    assert!(said.contains("is not connected") || said.contains("could not take the request"), "{said}");
    assert!(took < Duration::from_secs(8), "A answered after {took:?}: {said}");
    eprintln!("FIGURE after kill -9 of B: A answered in {} ms: {}", took.as_millis(), said.trim());
    let _ = kill(watch);
    assert!(a.log().contains("peer session ended"), "{}", a.log());
}

/// The raw answer to `GET /v1/peer` with `authorization`.
fn peer_attempt(hub: &HubProc, authorization: Option<&str>) -> String {
    let mut tls = hub.client(None).connect().unwrap();
    let auth = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    write!(
        tls,
        "GET /v1/peer HTTP/1.1\r\nHost: hub\r\nConnection: Upgrade, close\r\nUpgrade: uplink-peer/1\r\n{auth}\r\n"
    )
    .unwrap();
    tls.flush().unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 8192];
    while let Ok(n @ 1..) = tls.read(&mut buf) {
        got.extend_from_slice(&buf[..n]);
        // An upgraded hop stays open: its head is the answer.
        if got.starts_with(b"HTTP/1.1 101") && got.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn only_a_replica_may_take_the_peer_hop() {
    let Some(pg) = Postgres::start("handoff-auth") else { return };
    let dir = temp_dir("handoff-auth");
    let (dir_a, dir_b) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let b = replica(&pg, &dir_b);
    let a = replica_out_of_agents_reach(&pg, &dir_a);
    let admin_token = b.admin_token.clone().unwrap();
    let r = b.client(Some(&admin_token)).post_json("/api/v1/users", &json!({ "name": ALICE })).unwrap();
    let alice = r.json()["token"].as_str().unwrap().to_string();
    let (ida, idb) = (replica_id(&a), replica_id(&b));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;

    // A key made elsewhere, however well formed the rest.
    let ca = rcgen::KeyPair::generate().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
    let forger =
        uplink::hub::replicas::handoff::PeerTrust::new(&uplink::secret::Secret::new(ca.serialize_pem()), &cert.pem())
            .unwrap();
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "no peer credential"),
        (Some(format!("Bearer {alice}")), "malformed peer credential"),
        (Some(format!("Bearer {admin_token}")), "malformed peer credential"),
        (Some(forger.credential(&ida, &idb, now)), "not signed with the replicas' key"),
        (Some(format!("UplinkPeer v1 {ida} {idb} {now} {}", "00".repeat(32))), "not signed with the replicas' key"),
    ];
    for (auth, why) in &cases {
        let answer = peer_attempt(&b, auth.as_deref());
        assert!(answer.starts_with("HTTP/1.1 401"), "{auth:?}: {answer}");
        assert!(answer.contains(why), "{auth:?}: {answer}");
    }
    assert!(wait_for(5, || b.log().matches("peer hop refused").count() >= cases.len()), "{}", b.log());
    assert!(b.log().contains("reason=peer credential not signed with the replicas' key"), "{}", b.log());
    assert_eq!(hub_metric(&b, "uplink_hub_peer_refused_total"), cases.len() as f64);
    assert_eq!(hub_metric(&b, "uplink_hub_peer_sessions{direction=\"in\"}"), 0.0);
    // With the replicas' own key (read from the store, as only a replica
    // can): a credential made a minute ago, or for another replica, is
    // refused too; a fresh one for B is the only thing that opens the hop.
    let hex = pg.query("SELECT encode(convert_to(ca_key_pem, 'UTF8'), 'hex') FROM hub_identity");
    let ca_key: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    let insider = uplink::hub::replicas::handoff::PeerTrust::new(
        &uplink::secret::Secret::new(String::from_utf8(ca_key).unwrap()),
        &cert.pem(),
    )
    .unwrap();
    let stale = peer_attempt(&b, Some(&insider.credential(&ida, &idb, now - 60_000)));
    assert!(stale.starts_with("HTTP/1.1 401") && stale.contains("check the clocks"), "{stale}");
    let elsewhere = peer_attempt(&b, Some(&insider.credential(&idb, &ida, now)));
    assert!(elsewhere.starts_with("HTTP/1.1 403") && elsewhere.contains("addressed to replica"), "{elsewhere}");
    assert_eq!(hub_metric(&b, "uplink_hub_peer_refused_total"), cases.len() as f64 + 2.0);
    let fresh = peer_attempt(&b, Some(&insider.credential(&ida, &idb, now)));
    assert!(fresh.starts_with("HTTP/1.1 101"), "{fresh}");
    assert!(wait_for(5, || b.log().contains(&format!("peer session accepted replica={ida}"))), "{}", b.log());

    // Without the upgrade, nothing but a pointer to it.
    let r = b.client(Some(&alice)).get("/v1/peer").unwrap();
    assert_eq!(r.status, 426, "{}", r.text());
}

#[test]
fn a_failed_dial_moves_on_to_the_next_replica_holding_a_tunnel() {
    let Some(pg) = Postgres::start("handoff-next") else { return };
    let dir = temp_dir("handoff-next");
    let dirs: Vec<_> = ["b", "c", "a"].iter().map(|n| dir.join(n)).collect();
    dirs.iter().for_each(|d| std::fs::create_dir_all(d).unwrap());
    let mut holders = [replica(&pg, &dirs[0]), replica(&pg, &dirs[1])];
    let a = replica_out_of_agents_reach(&pg, &dirs[2]);
    let admin_token = holders[0].admin_token.clone().unwrap();
    let credential = register_and_activate(&holders[0], &admin_token, "edge-sim");
    // One simulated agent of the cluster on each of B and C, none on A.
    let _agents: Vec<_> =
        holders.iter().map(|h| hub_support::SimAgents::start(h.addr, &h.ca_pem, &credential, 1)).collect();
    let admin = a.client(Some(&admin_token));
    let r = admin.post_json("/api/v1/users", &json!({ "name": ALICE })).unwrap();
    let alice = r.json()["token"].as_str().unwrap().to_string();
    admin.post_json("/api/v1/grants", &json!({ "user": ALICE, "clusters": "edge-sim" })).unwrap();
    assert!(wait_for(20, || admin.get("/api/v1/clusters/edge-sim").unwrap().json()["status"] == "ACTIVE"));
    // Two heartbeats: A has seen both holders' session rows.
    std::thread::sleep(Duration::from_secs(5));

    // A person's request through A, naming another cluster in the
    // header replicas use between themselves: the hop names the real one,
    // and the agent sees neither, only the person as A authenticated her.
    let get = |path: &str| {
        let mut tls = a.client(None).connect().unwrap();
        write!(
            tls,
            "GET /k8s/clusters/edge-sim{path} HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {alice}\r\n\
             Uplink-Peer-Cluster: c_someone_else\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 8192];
        while let Ok(n @ 1..) = tls.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    };
    let answer = get("/cl/first");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}\nA log:\n{}", a.log());
    let body: serde_json::Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["user"], ALICE);
    assert!(!body["headers"].as_array().unwrap().iter().any(|h| h.as_str().unwrap().contains("peer")), "{body}");
    // The hot path of a hand-off asks the store nothing: who holds the
    // tunnel and where that replica is come from the heartbeat.
    pg.query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements");
    pg.query("SELECT pg_stat_statements_reset()");
    let c = a.client(Some(&alice));
    const N: usize = 200;
    let t0 = Instant::now();
    for _ in 0..N {
        assert_eq!(c.get("/k8s/clusters/edge-sim/cl/hot").unwrap().status, 200);
    }
    let elapsed = t0.elapsed();
    // (The heartbeat reads the replica rows every 2 s whatever comes;
    // the hand-off takes its answer from the last one.)
    let reads = pg.statement_calls("(FROM|JOIN) (users|tokens|grants|clusters)\\M");
    // Where the replicas are is read once per heartbeat (the replica set
    // the agents are told), never per request.
    let set_reads = pg.statement_calls("SELECT id, advertise_url");
    eprintln!(
        "FIGURE {N} handed-off requests (a new connection each) in {elapsed:?}: {reads} store reads on the way, \
         {set_reads} reads of the replica set (per heartbeat, each replica)"
    );
    assert_eq!(reads, 0, "the hand-off's hot path reads what the cache and the heartbeat hold");
    let heartbeats = 3 * (elapsed.as_millis() / 2000 + 1);
    assert!(set_reads <= heartbeats, "{set_reads} replica-set reads for {heartbeats} heartbeats");

    let served: Vec<f64> =
        holders.iter().map(|h| hub_metric(h, "uplink_hub_peer_sessions{direction=\"in\"}")).collect();
    assert_eq!(served.iter().sum::<f64>(), 1.0, "one peer session: {served:?}");

    // The replica A handed to dies: every request after it is answered by
    // the other holder (its dial to the dead one fails at once).
    let dead = served.iter().position(|n| *n == 1.0).unwrap();
    holders[dead].kill9();
    let t = Instant::now();
    let mut n = 0;
    while t.elapsed() < Duration::from_secs(4) {
        let answer = get(&format!("/cl/after-{n}"));
        assert!(answer.starts_with("HTTP/1.1 200"), "request {n} after the kill: {answer}\nA log:\n{}", a.log());
        n += 1;
    }
    let other = &holders[1 - dead];
    assert_eq!(hub_metric(other, "uplink_hub_peer_sessions{direction=\"in\"}"), 1.0);
    assert!(hub_metric(&a, "uplink_hub_handoffs_total") >= (n + 1) as f64);
    eprintln!(
        "FIGURE after kill -9 of the replica handed to: {n} requests through A in 4 s, all answered; \
         failed dials {}",
        hub_metric(&a, "uplink_hub_handoff_failures_total")
    );
}
