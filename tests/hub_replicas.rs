//! One agent, a tunnel to every live hub replica: real `uplink-hub`
//! replicas on a PostgreSQL the test starts, the real `uplink` agent, the
//! stand-in API server.
//!
//! The agent is given one URL (replica 0's, standing in for the load
//! balancer) and learns the others from the `ReplicaSet` frame. Each
//! replica advertises an address that is not in the shared serving
//! certificate (`127.0.0.N`), so the agent's name check (the public URL's
//! host, against the pinned CA) is exercised on every dial.
//!
//! Not here: the hand-off of a request from a replica without a tunnel
//! to one that has it (every replica here holds its own tunnel).
#![cfg(feature = "hub")]

mod hub_support;
mod support;

use hub_support::{
    HubProc, KillOnDrop, free_port, hub_cli, ok, register_and_activate, replica_id, rss_kib, temp_dir, wait_for,
    write_kube_credentials,
};
use serde_json::json;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::kube::{Config, StandIn};
use support::pg::Postgres;
use uplink::hub::client::Client;

const ARTICLE_RBAC: &str = include_str!("fixtures/kube/eks-console-restricted-access.yaml");
/// Lets alice create config maps in `default` (the request kept in
/// flight while a replica drains: a watch would end at once by design).
const CREATE_RBAC: &str = "apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: pod-watcher, namespace: default}
rules:
- apiGroups: [\"\"]
  resources: [configmaps]
  verbs: [create]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: alice-watches, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: pod-watcher}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: alice}
";
const PODS: &str = "/k8s/clusters/edge-1/api/v1/namespaces/default/pods";

/// Replica `i` on `port`: public URL `https://localhost:PUBLIC`, its own
/// advertise URL `https://127.0.0.{2+i}:PORT` (outside the certificate's
/// names on purpose).
fn replica(pg: &Postgres, i: usize, port: u16, public: u16) -> HubProc {
    let listen = std::net::SocketAddr::from(([0, 0, 0, 0], port));
    let public = format!("https://localhost:{public}");
    HubProc::start_replica(&temp_dir(&format!("repl-{i}")), &pg.url(), listen, &public, &advertise(i, port))
}

fn advertise(i: usize, port: u16) -> String {
    format!("https://127.0.0.{}:{port}", 2 + i)
}

/// `(replica id, session id)` of every tunnel the replicas recorded for
/// `cluster`, sorted.
fn sessions(pg: &Postgres, cluster: &str) -> Vec<(String, String)> {
    let q = format!(
        "SELECT s.replica_id || ' ' || s.session_id FROM agent_sessions s JOIN clusters c ON c.id = s.cluster_id \
         WHERE c.name = '{cluster}' ORDER BY 1"
    );
    pg.query(&q)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (a, b) = l.trim().split_once(' ').unwrap();
            (a.to_string(), b.to_string())
        })
        .collect()
}

/// Waits (polling every 20 ms) until `f`, returning how long it took.
fn time_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Requests as alice through the given replicas in turn until stopped;
/// every failure is kept with the replica it went through.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(through: Vec<(String, Client)>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (s, d, f) = (stop.clone(), done.clone(), failures.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                for (name, c) in &through {
                    match c.get(PODS) {
                        Ok(r) if r.status == 200 && r.text().contains("web-7d4b9c8f6d-k2x9p") => {}
                        Ok(r) => f.lock().unwrap().push(format!("{name}: {} {}", r.status, r.text())),
                        Err(e) => f.lock().unwrap().push(format!("{name}: {e}")),
                    }
                    d.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Load { stop, done, failures, thread: Some(thread) }
    }

    /// Stops; returns (requests made, failures).
    fn stop(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        (self.done.load(Ordering::Relaxed), self.failures.lock().unwrap().clone())
    }
}

/// An agent of the previous release on its own cluster: its `Hello`
/// lacks `CAP_REPLICAS`. It answers every request with 200 "old agent".
struct OldAgent {
    state: Arc<Mutex<(bool, Option<String>, usize)>>,
}

impl OldAgent {
    fn start(addr: std::net::SocketAddr, ca: String, credential: String) -> OldAgent {
        use uplink::driver::Session;
        use uplink::proto::*;
        let state = Arc::new(Mutex::new((false, None, 0usize)));
        let st = state.clone();
        std::thread::spawn(move || {
            smol::block_on(async move {
                let (io, status) = hub_support::dial_tunnel(addr, ca, &credential).await;
                assert_eq!(status, 101);
                let info = AgentInfo { agent_version: "0.1.0".into(), arch: "x86_64".into(), ..Default::default() };
                let session =
                    Session::new(Mux::agent_with_capabilities(Config::default(), info, CAP_DEADLINE, Instant::now()));
                let serve = async {
                    if session.connected().await.is_ok() {
                        st.lock().unwrap().0 = true;
                    }
                    while let Some((mut stream, _head)) = session.accept().await {
                        let _ = stream.send_head(ResponseHead {
                            status: 200,
                            headers: vec![Header::new("content-type", "text/plain")],
                        });
                        let _ = stream.write_all(b"old agent").await;
                        stream.finish();
                        st.lock().unwrap().2 += 1;
                    }
                    std::future::pending::<()>().await
                };
                let why = smol::future::or(async { Some(session.run(io).await) }, async {
                    serve.await;
                    None
                })
                .await;
                st.lock().unwrap().1 = Some(format!("{why:?}"));
            })
        });
        OldAgent { state }
    }

    fn connected(&self) -> bool {
        self.state.lock().unwrap().0
    }

    /// Why its session ended, if it did.
    fn ended(&self) -> Option<String> {
        self.state.lock().unwrap().1.clone()
    }
}

fn agent_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
}

/// The stand-in cluster `edge-1` registered on `hub` for alice (who may
/// list pods and create config maps in `default`), and a real agent given
/// the hub's public URL. Returns the agent's directory, the stand-in,
/// alice's token and the agent.
fn cluster_and_agent(hub: &HubProc, admin_token: &str, tag: &str) -> (std::path::PathBuf, StandIn, String, KillOnDrop) {
    let admin = hub.client(Some(admin_token));
    let dir = temp_dir(tag);
    let k = StandIn::start(Config::default());
    k.load_rbac_yaml(ARTICLE_RBAC).unwrap();
    k.load_rbac_yaml(CREATE_RBAC).unwrap();
    write_kube_credentials(&dir, &k.agent_token(), &k.ca_pem());
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    ok(&hub_cli(
        hub,
        admin_token,
        &["cluster", "register", "edge-1", "--user", "alice", "--out-dir", out.to_str().unwrap()],
    ));
    std::fs::copy(out.join("uplink-edge-1-activation.json"), dir.join("activation.json")).unwrap();
    k.load_rbac_yaml(&std::fs::read_to_string(out.join("uplink-edge-1.yaml")).unwrap()).unwrap();
    let r = admin.post_json("/api/v1/users", &json!({ "name": "alice" })).unwrap();
    let alice = r.json()["token"].as_str().unwrap().to_string();
    admin.post_json("/api/v1/grants", &json!({ "user": "alice", "clusters": "edge-1" })).unwrap();
    let (activation, state) = (dir.join("activation.json"), dir.join("state"));
    let flags = ["--activation".as_ref(), activation.as_os_str(), "--state".as_ref(), state.as_os_str()];
    // UPLINK_TEST_AGENT: another build of the agent (the static release
    // build, for its RSS figures); this crate's debug build by default.
    let program = std::env::var_os("UPLINK_TEST_AGENT").unwrap_or_else(|| env!("CARGO_BIN_EXE_uplink").into());
    let agent = KillOnDrop(hub_support::spawn_agent_with(
        std::process::Command::new(program),
        &flags,
        &k.url(),
        &dir,
        &dir.join("agent.log"),
    ));
    (dir, k, alice, agent)
}

/// Behind a load balancer (a TCP relay on the public URL): the agent's
/// first tunnel, through it, counts as the tunnel to the replica it
/// landed on. When the balancer drops it, the agent dials that replica's
/// own address instead of the balancer again (another tunnel is up), and
/// never holds two tunnels to one replica.
#[test]
fn behind_a_load_balancer_the_agent_holds_one_tunnel_per_replica() {
    let Some(pg) = Postgres::start("replicas-lb") else { return };
    let lb = support::relay::Relay::start_on("127.0.0.1:0".parse().unwrap(), None);
    let ports: Vec<u16> = (0..2).map(|_| free_port()).collect();
    let a = replica(&pg, 0, ports[0], lb.addr.port());
    lb.set_target(std::net::SocketAddr::from(([127, 0, 0, 1], ports[0])));
    let b = replica(&pg, 1, ports[1], lb.addr.port());
    let admin_token = a.admin_token.clone().unwrap();
    let (dir, _k, alice, _agent) = cluster_and_agent(&a, &admin_token, "repl-lb-agent");
    let (id_a, id_b) = (replica_id(&a), replica_id(&b));
    let both = sorted(&[id_a.clone(), id_b.clone()]);
    let rows = || sessions(&pg, "edge-1").into_iter().map(|s| s.0).collect::<Vec<_>>();
    assert!(wait_for(20, || rows() == both), "one tunnel per replica: {:?}\n{}", rows(), agent_log(&dir));
    let log = agent_log(&dir);
    assert!(log.contains(&format!("tunnel up to https://localhost:{}", lb.addr.port())), "{log}");
    assert!(log.contains(&format!("tunnel up to {}", advertise(1, ports[1]))), "{log}");
    assert!(
        !log.contains(&format!("tunnel up to {}", advertise(0, ports[0]))),
        "A is held through the balancer:\n{log}"
    );

    // The balancer now sends new connections to B and cuts the live ones.
    let dialled = lb.accepted();
    lb.set_target(std::net::SocketAddr::from(([127, 0, 0, 1], ports[1])));
    lb.cut();
    let direct_a = format!("tunnel up to {}", advertise(0, ports[0]));
    assert!(wait_for(10, || agent_log(&dir).contains(&direct_a)), "A dialled directly:\n{}", agent_log(&dir));
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(rows(), both, "still one tunnel per replica\n{}", agent_log(&dir));
    assert_eq!(lb.accepted(), dialled, "the balancer is not dialled while a tunnel is up:\n{}", agent_log(&dir));
    for h in [&a, &b] {
        let r = h.client(Some(&alice)).get(PODS).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        // And over HTTP/2 (curl, ALPN h2), on each replica's own tunnel.
        if let Some((version, body)) = curl_h2(h, &dir, &alice, PODS) {
            assert_eq!(version, "2", "{body}");
            assert!(body.contains("web-7d4b9c8f6d-k2x9p"), "{body}");
        }
    }
}

/// `GET path` over HTTP/2 with curl: (the HTTP version curl used, body);
/// `None`, loudly, without curl (as `tests/e2e_h2.rs` skips).
fn curl_h2(hub: &HubProc, dir: &Path, token: &str, path: &str) -> Option<(String, String)> {
    if !support::have_curl() {
        return None;
    }
    let ca = dir.join("hub-ca.pem");
    std::fs::write(&ca, &hub.ca_pem).unwrap();
    let Ok(out) = std::process::Command::new("curl")
        .args(["-sS", "--http2", "--cacert", ca.to_str().unwrap(), "-H", &format!("Authorization: Bearer {token}")])
        .args(["-w", "\n%{http_version}", &format!("{}{path}", hub.url)])
        .output()
    else {
        eprintln!("\n!!!!! SKIPPING the HTTP/2 request: no curl !!!!!\n");
        return None;
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, version) = text.rsplit_once('\n').unwrap_or(("", &text));
    Some((version.trim().to_string(), format!("{body}{}", String::from_utf8_lossy(&out.stderr))))
}

#[test]
fn an_agent_keeps_a_tunnel_to_every_live_replica() {
    let Some(pg) = Postgres::start("replicas") else { return };
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let mut hubs: Vec<Option<HubProc>> = vec![Some(replica(&pg, 0, ports[0], ports[0]))];
    let h0 = hubs[0].as_ref().unwrap();
    let admin_token = h0.admin_token.clone().unwrap();
    let admin = h0.admin();
    let ca = h0.ca_pem.clone();

    let (dir, k, alice, agent) = cluster_and_agent(h0, &admin_token, "repl-agent");
    let pid = agent.0.id();
    assert!(wait_for(20, || sessions(&pg, "edge-1").len() == 1), "one tunnel: {}", agent_log(&dir));
    std::thread::sleep(Duration::from_secs(3));
    let rss_1 = rss_kib(pid);

    // Two more replicas: the agent picks both up from the set.
    let started = Instant::now();
    hubs.push(Some(replica(&pg, 1, ports[1], ports[0])));
    hubs.push(Some(replica(&pg, 2, ports[2], ports[0])));
    let join_2 = started.elapsed();
    let to_three = time_until(Duration::from_secs(20), || {
        let log = agent_log(&dir);
        (1..3).all(|i| log.contains(&format!("tunnel up to {}", advertise(i, ports[i]))))
    })
    .unwrap_or_else(|| panic!("no tunnel to replicas 1 and 2:\n{}", agent_log(&dir)));
    let ids: Vec<String> = hubs.iter().map(|h| replica_id(h.as_ref().unwrap())).collect();
    assert!(
        wait_for(10, || sessions(&pg, "edge-1").iter().map(|s| s.0.clone()).collect::<Vec<_>>() == sorted(&ids)),
        "a session row per replica: {:?} vs {ids:?}",
        sessions(&pg, "edge-1")
    );
    // `cluster list` on each replica shows the three tunnels.
    for h in hubs.iter().flatten() {
        // Each replica reads the others' rows at its next heartbeat.
        let show = || h.client(Some(&admin_token)).get("/api/v1/clusters/edge-1").unwrap().json();
        assert!(wait_for(5, || show()["agents"] == 3 && show()["status"] == "ACTIVE"), "{}", show());
        let list = ok(&hub_cli(h, &admin_token, &["cluster", "list"]));
        assert!(list.contains("edge-1") && list.contains("ACTIVE"), "{list}");
    }
    std::thread::sleep(Duration::from_secs(3));
    let rss_3 = rss_kib(pid);
    // Through each replica, on that replica's own tunnel.
    let before = k.requests().len();
    for h in hubs.iter().flatten() {
        let r = h.client(Some(&alice)).get(PODS).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("web-7d4b9c8f6d-k2x9p"));
    }
    assert_eq!(k.requests().len() - before, 3, "each request reached the cluster once");
    assert!(!agent_log(&dir).contains("second tunnel"), "{}", agent_log(&dir));

    // An agent of the previous release, on its own cluster, on replica 0.
    let old_cred = register_and_activate(hubs[0].as_ref().unwrap(), &admin_token, "edge-old");
    let old = OldAgent::start(std::net::SocketAddr::from(([127, 0, 0, 1], ports[0])), ca.clone(), old_cred);
    assert!(wait_for(10, || old.connected()), "old agent connected");
    admin.post_json("/api/v1/grants", &json!({ "user": "alice", "clusters": "edge-old" })).unwrap();

    // kill -9 replica 1 while requests go through 0 and 2.
    let through = |is: &[usize]| -> Vec<(String, Client)> {
        is.iter()
            .map(|i| {
                let url = format!("https://127.0.0.1:{}", ports[*i]);
                (format!("replica {i}"), Client::new(&url, Some(&ca), Some(&alice)).unwrap())
            })
            .collect()
    };
    let load = Load::start(through(&[0, 2]));
    std::thread::sleep(Duration::from_millis(500));
    let killed_at = Instant::now();
    hubs[1].as_mut().unwrap().kill9();
    let left_1 = format!("hub replica left the set: no longer dialling {}", advertise(1, ports[1]));
    let drop_killed = time_until(Duration::from_secs(30), || agent_log(&dir).contains(&left_1))
        .unwrap_or_else(|| panic!("killed replica never dropped:\n{}", agent_log(&dir)));
    std::thread::sleep(Duration::from_millis(500));
    let (n_kill, failed_kill) = load.stop();
    assert!(failed_kill.is_empty(), "requests failed through the others: {failed_kill:?}");
    assert!(n_kill > 20, "the loop ran: {n_kill}");
    let _ = killed_at;

    // A fourth replica: picked up within seconds.
    let load = Load::start(through(&[0, 2]));
    let started = Instant::now();
    hubs.push(Some(replica(&pg, 3, ports[3], ports[0])));
    let listening = started.elapsed();
    let up_3 = format!("tunnel up to {}", advertise(3, ports[3]));
    let pick_up = time_until(Duration::from_secs(20), || agent_log(&dir).contains(&up_3))
        .unwrap_or_else(|| panic!("fourth replica not picked up:\n{}", agent_log(&dir)));
    let r = hubs[3].as_ref().unwrap().client(Some(&alice)).get(PODS).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let (_, failed_add) = load.stop();
    assert!(failed_add.is_empty(), "{failed_add:?}");

    // The old agent heard no ReplicaSet (it would have ended its session
    // on one) through two set changes, and still serves.
    assert_eq!(old.ended(), None, "old agent's session ended");
    let r = hubs[0].as_ref().unwrap().client(Some(&alice)).get("/k8s/clusters/edge-old/api/v1/namespaces").unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "old agent"));

    // SIGTERM replica 2 with a request in flight on its tunnel.
    let before: Vec<(String, String)> =
        sessions(&pg, "edge-1").into_iter().filter(|s| s.0 != ids[2]).collect::<Vec<_>>();
    let load = Load::start(through(&[0, 3]));
    // A create whose body arrives in two halves, the second after the
    // SIGTERM: its stream is open on replica 2's tunnel all along.
    let cfg = support::https::client_config(uplink::tls::certs_from_pem(&ca, "hub CA").unwrap()[0].as_ref(), None);
    let addr2 = std::net::SocketAddr::from(([127, 0, 0, 1], ports[2]));
    let auth = format!("Bearer {alice}");
    let watch = std::thread::spawn(move || {
        use std::io::Write as _;
        let t = Instant::now();
        let body = br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"drain","namespace":"default"},"data":{"k":"v"}}"#;
        let mut s = support::https::connect(addr2, cfg);
        let head = format!(
            "POST /k8s/clusters/edge-1/api/v1/namespaces/default/configmaps HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Authorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&body[..20]).unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        s.write_all(&body[20..]).unwrap();
        s.flush().unwrap();
        let (mut r, rest) = support::https::read_head(&mut s);
        support::https::read_body(&mut s, &mut r, rest);
        (Ok::<_, String>((r.status, r.text())), t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut h2 = hubs[2].take().unwrap();
    let term = std::thread::spawn(move || {
        let status = h2.terminate();
        (status, h2.log())
    });
    let (watched, in_flight_took) = watch.join().unwrap();
    let (status, h2_log) = term.join().unwrap();
    let (code, body) = watched.unwrap_or_else(|e| {
        panic!("in-flight request through the draining replica: {e}\nreplica 2:\n{h2_log}\nagent:\n{}", agent_log(&dir))
    });
    assert_eq!(code, 201, "{body}\nreplica 2:\n{h2_log}\nagent:\n{}", agent_log(&dir));
    assert!(body.contains("\"drain\""), "{body}");
    assert!(in_flight_took >= Duration::from_millis(1500), "the request spanned the SIGTERM: {in_flight_took:?}");
    assert!(status.success(), "replica 2 exit: {status:?}\n{h2_log}");
    let left_2 = format!("hub replica left the set: no longer dialling {}", advertise(2, ports[2]));
    assert!(wait_for(10, || agent_log(&dir).contains(&left_2)), "replica 2 dropped:\n{}", agent_log(&dir));
    let (_, failed_term) = load.stop();
    assert!(failed_term.is_empty(), "{failed_term:?}");
    // The other tunnels were never touched: same sessions as before.
    let after: Vec<(String, String)> = sessions(&pg, "edge-1").into_iter().filter(|s| s.0 != ids[2]).collect();
    let kept: Vec<&(String, String)> = before.iter().filter(|s| s.0 == ids[0]).collect();
    assert!(kept.iter().all(|s| after.contains(s)), "replica 0's session kept: {before:?} → {after:?}");
    let log = agent_log(&dir);
    assert!(log.contains("ShuttingDown"), "the agent heard GoAway:\n{log}");
    assert!(!log.contains("ERROR"), "{log}");

    eprintln!(
        "FIGURES replicas: agent RSS idle 1 tunnel {rss_1} KiB, 3 tunnels {rss_3} KiB; replicas 1+2 started in \
         {join_2:?}, tunnels to both {to_three:?} after start; kill -9: dropped from the set after {drop_killed:?} \
         ({n_kill} requests through the others, {} failed); 4th replica listening after {listening:?}, tunnel up \
         {pick_up:?} after start; SIGTERM: in-flight request finished in {in_flight_took:?}, status {code}",
        failed_kill.len()
    );
    drop(agent);
}

fn sorted(v: &[String]) -> Vec<String> {
    let mut v = v.to_vec();
    v.sort();
    v
}
