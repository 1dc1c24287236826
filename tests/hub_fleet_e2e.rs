//! Several hubs end to end, with real processes only: replicas of
//! `uplink-hub serve` on a PostgreSQL the test starts, nginx in front of
//! them as the README configures it, two clusters (each a stand-in API
//! server) with real agents, and real kubectl 1.32.
//!
//! ```text
//!  kubectl ──► nginx (public URL) ─┬─► A ─┐
//!  kubectl ──► A, B, C, D directly ├─► B ─┼── PostgreSQL
//!                                  ├─► C ─┤
//!                                  └─► D ─┘   (D joins later)
//!  edge-deploy: a Deployment with two agent pods (one activation, one
//!               state Secret), each with a tunnel to every replica
//!  edge-node:   one agent (state file, as beside k3s), a tunnel to each
//! ```
//!
//! Alice (an IAM user, the article's RBAC) runs `kubectl get pods` in a
//! loop through the load balancer and straight through the replicas that
//! stay up, and two `kubectl get pods -w` (one through the load balancer,
//! one straight to a replica; each started again when it ends, as a
//! person would), while, in turn:
//!
//! 1. C is killed with `kill -9` (and a watch straight to C shows what
//!    the person whose connection it held sees);
//! 2. a fourth replica D joins and is added to nginx's upstream;
//! 3. every replica is restarted in turn (SIGTERM, start, ready, then
//!    nginx's `fail_timeout` before the next, as the README says; C, dead
//!    since 1., just starts);
//! 4. jane@example.com is revoked on A; her token is used on C;
//! 5. edge-node is deregistered on B while its agent holds a tunnel to
//!    every replica (and a simulated agent of it one more to each).
//!
//! Asserted: no request failed through a replica that stayed up; after
//! each event both watches show a new pod (they keep producing, or came
//! back); revocation and deregistration take effect on every replica
//! (refused there, and every replica's tunnels of the cluster told
//! `GoAway(Deregistered)`). Printed as `FIGURE` lines, not asserted: per
//! event the requests made and failed, the longest gap between successful
//! answers, the watches' reconnects, and how long until revocation and
//! deregistration took effect everywhere.
//!
//! Skips loudly without kubectl, PostgreSQL or nginx (see `support`).
#![cfg(feature = "hub")]

mod hub_support;
mod support;

use hub_support::{HubProc, KillOnDrop, SimAgents, free_port, hub_cli, ok, temp_dir, wait_exit, wait_for};
use serde_json::json;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::kube::{Config, StandIn};
use support::kubectl::{Kubectl, lines, stderr, wait_line};
use support::nginx::Nginx;
use support::pg::Postgres;
use uplink::hub::client::Client;
use uplink::proto::GoAwayCode;

const ALICE: &str = "arn:aws:iam::1234567890:user/Alice";
const JANE: &str = "jane@example.com";
const JANE_PATH: &str = "/api/v1/users/jane%40example.com";
/// A Deployment with two agent pods.
const DEPLOYED: &str = "edge-deploy";
/// One agent with a state file.
const NODE: &str = "edge-node";
const POD: &str = "web-7d4b9c8f6d-k2x9p";
const PODS: &str = "/api/v1/namespaces/default/pods";
const PATIENCE: Duration = Duration::from_secs(30);
const ARTICLE_RBAC: &str = include_str!("fixtures/kube/eks-console-restricted-access.yaml");
/// Beside the article's read-only Role: Alice may also watch pods in
/// `default`; Jane may read and watch them.
const WATCHERS: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: pod-watcher, namespace: default}
rules:
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: pod-watchers, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: pod-watcher}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "arn:aws:iam::1234567890:user/Alice"}
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "jane@example.com"}
"#;

fn article_rbac() -> String {
    ARTICLE_RBAC.replace(r#"name: "alice""#, &format!("name: {ALICE:?}"))
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// One hub replica: a name, a fixed port (kept across restarts, as a
/// machine keeps its address) and, while it runs, its process.
struct Replica {
    name: &'static str,
    port: u16,
    dir: PathBuf,
    hub: Option<HubProc>,
}

impl Replica {
    fn new(name: &'static str, dir: &Path) -> Replica {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        Replica { name, port: free_port(), dir, hub: None }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr())
    }

    /// Starts it (again): the same command on every replica but for its
    /// own `--advertise-url`.
    fn start(&mut self, pg: &Postgres, public: &str) {
        self.hub = Some(HubProc::start_replica(&self.dir, &pg.url(), self.addr(), public, &self.url()));
    }

    fn hub(&self) -> &HubProc {
        self.hub.as_ref().unwrap_or_else(|| panic!("replica {} is not running", self.name))
    }

    fn metric(&self, name: &str) -> f64 {
        let page = self.hub().client(None).get("/metrics").map(|r| r.text()).unwrap_or_default();
        hub_support::metric(&page, name).unwrap_or(-1.0)
    }

    /// Ready: `/readyz` answers 200 and `agents` tunnels are up to it.
    fn ready(&self, agents: f64) -> bool {
        self.hub().client(None).get("/readyz").is_ok_and(|r| r.status == 200)
            && self.metric("uplink_hub_agents_connected") == agents
    }
}

/// One `kubectl get pods` of the loop.
#[derive(Clone, Debug)]
struct Sample {
    via: String,
    start: Instant,
    end: Instant,
    ok: bool,
    said: String,
}

struct LoopState {
    /// Where the loop sends requests now, in turn.
    vias: Vec<(String, Arc<Kubectl>)>,
    /// The via of the request in flight.
    current: Option<String>,
}

/// Alice's `kubectl get pods`, one after another, through the given
/// kubeconfigs in turn.
struct GetLoop {
    state: Arc<Mutex<LoopState>>,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GetLoop {
    fn start(vias: Vec<(String, Arc<Kubectl>)>) -> GetLoop {
        let state = Arc::new(Mutex::new(LoopState { vias, current: None }));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sa, sp) = (state.clone(), samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut i = 0usize;
            while !sp.load(Ordering::SeqCst) {
                let (via, kc) = {
                    let mut s = st.lock().unwrap();
                    let pick = s.vias[i % s.vias.len()].clone();
                    s.current = Some(pick.0.clone());
                    pick
                };
                i += 1;
                let start = Instant::now();
                let out = kc.run(&["get", "pods", "-n", "default", "--request-timeout=20s"]);
                let end = Instant::now();
                let stdout = String::from_utf8_lossy(&out.stdout);
                let ok = out.status.success() && stdout.contains(POD);
                let said = if ok { String::new() } else { format!("{stdout}{}", stderr(&out)).trim().to_string() };
                st.lock().unwrap().current = None;
                sa.lock().unwrap().push(Sample { via, start, end, ok, said });
            }
        });
        GetLoop { state, samples, stop, thread: Some(thread) }
    }

    /// From now on only through `vias`; returns once no request is in
    /// flight through any other (so a replica about to stop has none).
    fn set_vias(&self, vias: Vec<(String, Arc<Kubectl>)>) {
        let names: Vec<String> = vias.iter().map(|v| v.0.clone()).collect();
        self.state.lock().unwrap().vias = vias;
        assert!(
            wait_for(PATIENCE.as_secs(), || {
                self.state.lock().unwrap().current.as_ref().is_none_or(|c| names.contains(c))
            }),
            "the loop's request never finished"
        );
    }

    fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for GetLoop {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `kubectl get pods -w`, started again (after 200 ms) whenever it ends,
/// through the kubeconfig it is given at that moment.
struct WatchLoop {
    name: &'static str,
    via: Arc<Mutex<(String, Arc<Kubectl>)>>,
    starts: Arc<Mutex<Vec<(Instant, String)>>>,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    log: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WatchLoop {
    fn start(name: &'static str, via: (String, Arc<Kubectl>), log: PathBuf) -> WatchLoop {
        let via = Arc::new(Mutex::new(via));
        let starts = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (v, s, l, sp, lg) = (via.clone(), starts.clone(), lines.clone(), stop.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            while !sp.load(Ordering::SeqCst) {
                let (name, kc) = v.lock().unwrap().clone();
                s.lock().unwrap().push((Instant::now(), name.clone()));
                let err = std::fs::OpenOptions::new().create(true).append(true).open(&lg).unwrap();
                let mut child = kc
                    .command(&["get", "pods", "-n", "default", "-w"])
                    .stdout(Stdio::piped())
                    .stderr(err)
                    .spawn()
                    .unwrap();
                let out = child.stdout.take().unwrap();
                let l2 = l.clone();
                let reader = std::thread::spawn(move || {
                    use std::io::BufRead;
                    for line in std::io::BufReader::new(out).lines() {
                        let Ok(line) = line else { break };
                        l2.lock().unwrap().push((Instant::now(), format!("[{name}] {line}")));
                    }
                });
                while !sp.load(Ordering::SeqCst) && child.try_wait().unwrap().is_none() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let status = child.wait().unwrap();
                let _ = reader.join();
                if !sp.load(Ordering::SeqCst) {
                    l.lock().unwrap().push((Instant::now(), format!("(kubectl ended: {status})")));
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        });
        WatchLoop { name, via, starts, lines, log, stop, thread: Some(thread) }
    }

    fn set_via(&self, via: (String, Arc<Kubectl>)) {
        *self.via.lock().unwrap() = via;
    }

    fn saw(&self, needle: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|(_, l)| l.contains(needle))
    }

    /// Starts after the first within `[from, to)`: its reconnects.
    fn reconnects(&self, from: Instant, to: Instant) -> usize {
        self.starts.lock().unwrap().iter().skip(1).filter(|(t, _)| *t >= from && *t < to).count()
    }

    fn transcript(&self) -> String {
        let lines: Vec<String> = self.lines.lock().unwrap().iter().map(|(_, l)| l.clone()).collect();
        format!("{}\nstderr:\n{}", lines.join("\n"), std::fs::read_to_string(&self.log).unwrap_or_default())
    }
}

impl Drop for WatchLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A new pod in `default`: both watches must show it.
fn tick(k: &StandIn, n: usize, watches: &[&WatchLoop]) {
    let name = format!("tick-{n}");
    k.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Pending"},
    }))
    .unwrap();
    for w in watches {
        assert!(
            wait_for(PATIENCE.as_secs(), || w.saw(&name)),
            "watch {} never showed {name}:\n{}",
            w.name,
            w.transcript()
        );
    }
}

/// Prints the event's figures from the loop's samples within
/// `[from, to)`: returns the failed samples, straight to a replica and
/// through the load balancer.
fn report(
    event: &str,
    from: Instant,
    to: Instant,
    samples: &[Sample],
    watches: &[&WatchLoop],
) -> (Vec<Sample>, Vec<Sample>) {
    // Every request under way during the event, also one begun before it.
    let within: Vec<&Sample> = samples.iter().filter(|s| s.end > from && s.start < to).collect();
    let n = within.len();
    let mut ends: Vec<Instant> = within.iter().filter(|s| s.ok).map(|s| s.end).collect();
    let (lb, direct): (Vec<&Sample>, Vec<&Sample>) = within.into_iter().partition(|s| s.via == "lb");
    let failed = |v: &[&Sample]| v.iter().filter(|s| !s.ok).map(|s| (*s).clone()).collect::<Vec<_>>();
    ends.sort();
    let mut gap = Duration::ZERO;
    let mut last = from;
    for e in ends.iter().chain(std::iter::once(&to)) {
        gap = gap.max(e.saturating_duration_since(last));
        last = last.max(*e);
    }
    let reconnects: Vec<String> = watches.iter().map(|w| format!("{} {}", w.name, w.reconnects(from, to))).collect();
    let (fd, fl) = (failed(&direct), failed(&lb));
    for s in direct.iter().chain(&lb).filter(|s| s.ok && s.end - s.start > Duration::from_secs(2)) {
        eprintln!(
            "{event}: kubectl get through {} took {} (from {} ms into the event)",
            s.via,
            ms(s.end - s.start),
            s.start.saturating_duration_since(from).as_millis() as i128
                - from.saturating_duration_since(s.start).as_millis() as i128
        );
    }
    for f in fd.iter().chain(&fl) {
        eprintln!("{event}: kubectl get through {} failed after {}: {}", f.via, ms(f.end - f.start), f.said);
    }
    eprintln!(
        "FIGURE {event}: {} kubectl gets in {:.1} s ({} straight to replicas that stayed up, {} through nginx), \
         failed {} and {}; longest gap between successful answers {}; watch reconnects: {}",
        n,
        (to - from).as_secs_f64(),
        direct.len(),
        lb.len(),
        fd.len(),
        fl.len(),
        ms(gap),
        reconnects.join(", ")
    );
    (fd, fl)
}

fn agent_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Alice's request to `cluster` through `r`: the status.
fn status_via(r: &Replica, token: &str, cluster: &str) -> u16 {
    let c = Client::new(&r.url(), Some(&r.hub().ca_pem), Some(token)).unwrap();
    c.get(&format!("/k8s/clusters/{cluster}{PODS}")).map(|a| a.status).unwrap_or(0)
}

#[test]
fn three_replicas_two_agents_kubectl_through_kills_joins_restarts_revocation_and_deregistration() {
    let Some(alice_lb) = Kubectl::find("fleet-alice-lb") else { return };
    let Some(pg) = Postgres::start("fleet") else { return };
    let dir = temp_dir("fleet");
    eprintln!("logs of the replicas and agents under {}", dir.display());
    let mut reps: Vec<Replica> = ["A", "B", "C", "D"].iter().map(|n| Replica::new(n, &dir)).collect();
    if support::nginx::find("fleet").is_none() {
        return;
    }
    let lb_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let public = format!("https://{lb_addr}");
    let t_setup = Instant::now();
    // A first: it makes the schema, the admin and the shared identity.
    reps[0].start(&pg, &public);
    let admin_token = reps[0].hub().admin_token.clone().unwrap();
    reps[1].start(&pg, &public);
    reps[2].start(&pg, &public);
    let lb = Nginx::start("fleet", lb_addr, &reps[..3].iter().map(|r| r.addr()).collect::<Vec<_>>()).unwrap();
    let ca = reps[0].hub().ca_pem.clone();
    let (a, b, c, d) = (0, 1, 2, 3);

    // Two clusters, each its own stand-in API server.
    let k_deploy = StandIn::start(Config::default());
    let k_node = StandIn::start(Config::default());
    for k in [&k_deploy, &k_node] {
        k.load_rbac_yaml(&article_rbac()).unwrap();
    }
    k_deploy.load_rbac_yaml(WATCHERS).unwrap();
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let out_s = out.to_str().unwrap();
    ok(&hub_cli(
        reps[a].hub(),
        &admin_token,
        &["cluster", "register", DEPLOYED, "--user", ALICE, "--user", JANE, "--out-dir", out_s],
    ));
    ok(&hub_cli(reps[b].hub(), &admin_token, &["cluster", "register", NODE, "--user", ALICE, "--out-dir", out_s]));
    let manifest = |name: &str| std::fs::read_to_string(out.join(format!("uplink-{name}.yaml"))).unwrap();
    // The rendered manifest as applied: namespace, service account, RBAC,
    // the activation and state Secrets, the Deployment.
    k_deploy.load_rbac_yaml(&manifest(DEPLOYED)).unwrap();
    k_node.load_rbac_yaml(&manifest(NODE)).unwrap();

    // edge-deploy: two pods of one Deployment, started together, each
    // with the activation Secret mounted and the one state Secret.
    let pods_dir = dir.join("deploy");
    let mount = pods_dir.join("activation");
    std::fs::create_dir_all(&mount).unwrap();
    std::fs::copy(out.join(format!("uplink-{DEPLOYED}-activation.json")), mount.join("activation.json")).unwrap();
    hub_support::write_kube_credentials(&pods_dir, &k_deploy.agent_token(), &k_deploy.ca_pem());
    let pod_flags =
        ["--activation".as_ref(), mount.as_os_str(), "--state-secret".as_ref(), "uplink/uplink-state".as_ref()];
    let pod_logs: Vec<PathBuf> = (0..2).map(|i| pods_dir.join(format!("pod-{i}.log"))).collect();
    let _pods: Vec<KillOnDrop> = pod_logs
        .iter()
        .map(|log| KillOnDrop(hub_support::spawn_agent(&pod_flags, &k_deploy.url(), &pods_dir, log)))
        .collect();
    // edge-node: one agent with a state file.
    let node_dir = dir.join("node");
    std::fs::create_dir_all(&node_dir).unwrap();
    std::fs::copy(out.join(format!("uplink-{NODE}-activation.json")), node_dir.join("activation.json")).unwrap();
    hub_support::write_kube_credentials(&node_dir, &k_node.agent_token(), &k_node.ca_pem());
    let (node_act, node_state) = (node_dir.join("activation.json"), node_dir.join("state"));
    let node_flags = ["--activation".as_ref(), node_act.as_os_str(), "--state".as_ref(), node_state.as_os_str()];
    let node_log = node_dir.join("agent.log");
    let mut node_agent = KillOnDrop(hub_support::spawn_agent(&node_flags, &k_node.url(), &node_dir, &node_log));

    // Three agent processes, a tunnel from each to each replica.
    let logs = || {
        let mut s = String::new();
        for p in pod_logs.iter().chain([&node_log]) {
            s += &format!("--- {}\n{}", p.display(), agent_log(p));
        }
        s
    };
    assert!(wait_for(PATIENCE.as_secs(), || reps[..3].iter().all(|r| r.ready(3.0))), "{}", logs());
    let admin = reps[a].hub().client(Some(&admin_token));
    let shown = admin.get(&format!("/api/v1/clusters/{DEPLOYED}")).unwrap().json();
    assert_eq!(shown["activations"].as_array().map(|a| a.len()), Some(1), "one activation for both pods: {shown}");
    // Each replica reads the others' session rows at its next heartbeat.
    let agents = || admin.get(&format!("/api/v1/clusters/{DEPLOYED}")).unwrap().json()["agents"].clone();
    assert!(wait_for(10, || agents() == 6), "two pods × three replicas: {}", agents());
    let pod_said: Vec<String> = pod_logs.iter().map(|p| agent_log(p)).collect();
    assert_eq!(
        pod_said.iter().filter(|l| l.contains("activated as cluster")).count(),
        1,
        "one pod activates, the other takes its registration from the state Secret:\n{}",
        logs()
    );
    assert!(
        pod_said.iter().any(|l| l.contains("another replica activated")
            || l.contains("using the registration saved in state Secret uplink/uplink-state")),
        "{}",
        logs()
    );
    let setup = t_setup.elapsed();

    // People and their kubeconfigs: through nginx and straight to each replica.
    let user = |name: &str| {
        admin.post_json("/api/v1/users", &json!({ "name": name })).unwrap().json()["token"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (alice, jane) = (user(ALICE), user(JANE));
    let grant = |u: &str, c: &str| {
        let r = admin.post_json("/api/v1/grants", &json!({ "user": u, "clusters": c })).unwrap();
        assert_eq!(r.status, 201, "{}", r.text());
    };
    grant(ALICE, "edge-*");
    grant(JANE, DEPLOYED);
    let kubeconfig = |kc: &Kubectl, url: &str, user: &str, token: &str| {
        std::fs::write(kc.path(), uplink::hub::api::kubeconfig_yaml(url, Some(&ca), DEPLOYED, user, token)).unwrap();
    };
    kubeconfig(&alice_lb, &public, ALICE, &alice);
    let alice_lb = Arc::new(alice_lb);
    let straight: Vec<Arc<Kubectl>> = reps
        .iter()
        .map(|r| {
            let kc = Kubectl::find(&format!("fleet-alice-{}", r.name)).unwrap();
            kubeconfig(&kc, &r.url(), ALICE, &alice);
            Arc::new(kc)
        })
        .collect();
    let names: Vec<&str> = reps.iter().map(|r| r.name).collect();
    let via = |i: usize| (names[i].to_string(), straight[i].clone());
    let lb_via = || ("lb".to_string(), alice_lb.clone());
    let vias = |live: &[usize]| std::iter::once(lb_via()).chain(live.iter().map(|i| via(*i))).collect::<Vec<_>>();
    let pods = ok(&alice_lb.run(&["get", "pods", "-n", "default"]));
    assert!(pods.contains(POD), "{pods}");

    let watch_lb = WatchLoop::start("through nginx", lb_via(), dir.join("watch-lb.log"));
    let watch_direct = WatchLoop::start("straight to a replica", via(a), dir.join("watch-direct.log"));
    let watches = [&watch_lb, &watch_direct];
    let mut ticks = 0;
    let mut next_tick = |watches: &[&WatchLoop]| {
        ticks += 1;
        tick(&k_deploy, ticks, watches);
    };
    next_tick(&watches);
    let mut people = GetLoop::start(vias(&[a, b, c]));
    std::thread::sleep(Duration::from_secs(2));

    // 1. kill -9 C. Nobody's request goes straight to C any more but one
    // watch, which shows what the person whose connection C held sees.
    people.set_vias(vias(&[a, b]));
    let on_c = Kubectl::find("fleet-alice-on-c").unwrap();
    kubeconfig(&on_c, &reps[c].url(), ALICE, &alice);
    let mut held_by_c: Child = on_c.spawn(&["get", "pods", "-n", "default", "-w"]);
    let held_lines = lines(&mut held_by_c);
    wait_line(&held_lines, PATIENCE, "the pods through C", |l| l.contains(POD));
    // kubectl lists, then opens the watch.
    std::thread::sleep(Duration::from_millis(500));
    let from = Instant::now();
    reps[c].hub.as_mut().unwrap().kill9();
    reps[c].hub = None;
    let ended = wait_exit(&mut held_by_c, PATIENCE);
    assert!(ended.is_some(), "the watch whose connection C held ends (kubectl does not hang)");
    let held_ended_after = from.elapsed();
    let held_said = {
        use std::io::Read;
        let mut s = String::new();
        held_by_c.stderr.take().unwrap().read_to_string(&mut s).unwrap();
        s.trim().lines().last().unwrap_or("").to_string()
    };
    // The agents drop C when its heartbeat expires.
    let left = format!("hub replica left the set: no longer dialling {}", reps[c].url());
    let all_left =
        wait_for(PATIENCE.as_secs(), || pod_logs.iter().chain([&node_log]).all(|p| agent_log(p).contains(&left)));
    assert!(all_left, "every agent drops C:\n{}", logs());
    let dropped_after = from.elapsed();
    next_tick(&watches);
    let to = Instant::now();
    let (failed, via_lb) = report("kill -9 of C", from, to, &people.samples(), &watches);
    assert!(failed.is_empty(), "requests failed through replicas that stayed up: {failed:#?}");
    assert_eq!(
        watch_direct.reconnects(from, to),
        0,
        "the watch through A was untouched:\n{}",
        watch_direct.transcript()
    );
    eprintln!(
        "FIGURE kill -9 of C: kubectl get -w straight to C ended after {} (exit {ended:?}): {held_said:?}; \
         through nginx {} failed; every agent dropped C from its set after {}",
        ms(held_ended_after),
        via_lb.len(),
        ms(dropped_after)
    );

    // 2. A fourth replica: started, ready (every agent's tunnel up), then
    // added to nginx's upstream.
    let from = Instant::now();
    reps[d].start(&pg, &public);
    let listening = from.elapsed();
    assert!(wait_for(PATIENCE.as_secs(), || reps[d].ready(3.0)), "agents dial D:\n{}", logs());
    let tunnels_up = from.elapsed();
    lb.set_upstreams(&[reps[a].addr(), reps[b].addr(), reps[c].addr(), reps[d].addr()]);
    people.set_vias(vias(&[a, b, d]));
    std::thread::sleep(Duration::from_secs(1));
    next_tick(&watches);
    let to = Instant::now();
    let (failed, via_lb) = report("a fourth replica D joins", from, to, &people.samples(), &watches);
    assert!(failed.is_empty() && via_lb.is_empty(), "{failed:#?} {via_lb:#?}");
    assert_eq!(watch_direct.reconnects(from, to), 0, "{}", watch_direct.transcript());
    eprintln!(
        "FIGURE a fourth replica D: listening {} after its start, all three agents' tunnels up after {}",
        ms(listening),
        ms(tunnels_up)
    );

    // 3. Rolling restart: each replica in turn leaves the direct rotation,
    // gets SIGTERM (C, dead since 1., just starts), starts again on its
    // address, and is ready before the next.
    let from = Instant::now();
    let mut live = vec![a, b, d];
    let mut steps = Vec::new();
    for i in [a, b, c, d] {
        let others: Vec<usize> = live.iter().copied().filter(|x| *x != i).collect();
        people.set_vias(vias(&others));
        watch_direct.set_via(via(others[0]));
        let t = Instant::now();
        if let Some(mut h) = reps[i].hub.take() {
            let status = h.terminate();
            assert!(status.success(), "replica {} exit {status:?}:\n{}", reps[i].name, h.log());
        }
        let drained = t.elapsed();
        reps[i].start(&pg, &public);
        assert!(wait_for(PATIENCE.as_secs(), || reps[i].ready(3.0)), "{} ready:\n{}", reps[i].name, logs());
        steps.push(format!("{} drained {} ready {}", reps[i].name, ms(drained), ms(t.elapsed())));
        if !live.contains(&i) {
            live.push(i);
        }
        // nginx skips a replica for fail_timeout after it refused a
        // connection; the next one stops only once that has passed, so
        // that nginx always has a replica it counts as up (README).
        std::thread::sleep(support::nginx::fail_timeout());
        live.sort();
        people.set_vias(vias(&live));
    }
    next_tick(&watches);
    let to = Instant::now();
    let (failed, via_lb) = report("rolling restart of A, B, C, D", from, to, &people.samples(), &watches);
    // A replica restarted at its address has a new id: the agents' tunnel
    // to it carries over instead of being dialled twice and drained.
    let count =
        |what: &str| -> usize { pod_logs.iter().chain([&node_log]).map(|p| agent_log(p).matches(what).count()).sum() };
    let (rekeyed, second, drained) =
        (count("was replaced by"), count("second tunnel to hub replica"), count("draining the tunnel"));
    eprintln!(
        "FIGURE rolling restart steps: {}; in the agents' logs: {rekeyed} tunnels carried over to a replica's new id, \
         {second} second tunnels closed, {drained} tunnels drained",
        steps.join("; ")
    );
    assert!(failed.is_empty(), "requests failed through replicas that stayed up: {failed:#?}");
    assert!(via_lb.is_empty(), "requests failed through nginx during the rolling restart: {via_lb:#?}");

    // 4. Jane revoked on A; her token used on C.
    let jane_c = Kubectl::find("fleet-jane-c").unwrap();
    kubeconfig(&jane_c, &reps[c].url(), JANE, &jane);
    assert!(ok(&jane_c.run(&["get", "pods", "-n", "default"])).contains(POD));
    let from = Instant::now();
    let r = reps[a].hub().client(Some(&admin_token)).delete(JANE_PATH).unwrap();
    assert!(r.status < 300, "{}", r.text());
    let mut refused: Vec<Option<Duration>> = vec![None; reps.len()];
    let everywhere = wait_for(5, || {
        for (i, r) in reps.iter().enumerate() {
            if refused[i].is_none() && status_via(r, &jane, DEPLOYED) == 401 {
                refused[i] = Some(from.elapsed());
            }
        }
        refused.iter().all(|t| t.is_some())
    });
    assert!(everywhere, "jane refused on every replica: {refused:?}");
    let revoked_after = refused.iter().flatten().max().copied().unwrap();
    let denied = jane_c.run(&["get", "pods", "-n", "default"]);
    assert!(!denied.status.success(), "{}", stderr(&denied));
    assert!(stderr(&denied).contains("Unauthorized"), "{}", stderr(&denied));
    std::thread::sleep(Duration::from_secs(1));
    let to = Instant::now();
    let (failed, via_lb) = report("revocation of jane on A", from, to, &people.samples(), &watches);
    assert!(failed.is_empty() && via_lb.is_empty(), "alice was not touched: {failed:#?} {via_lb:#?}");
    let each: Vec<String> = reps.iter().zip(&refused).map(|(r, t)| format!("{} {}", r.name, ms(t.unwrap()))).collect();
    eprintln!(
        "FIGURE revocation on A: jane's token refused everywhere after {} ({}); her kubectl through C: {:?}",
        ms(revoked_after),
        each.join(", "),
        stderr(&denied).trim()
    );

    // 5. edge-node deregistered on B while its agent holds a tunnel to
    // every replica; a simulated agent of it holds one more to each, and
    // records the GoAway it is told (the real agent stops at the first).
    let reg = uplink::agent::state::decode(&std::fs::read(&node_state).unwrap()).unwrap();
    let sims: Vec<SimAgents> =
        reps.iter().map(|r| SimAgents::start(r.addr(), &ca, reg.credential.expose(), 1)).collect();
    let sims_state = || {
        let each: Vec<String> = reps
            .iter()
            .zip(&sims)
            .map(|(r, s)| {
                format!(
                    "{}: {} agents, sim {:?}",
                    r.name,
                    r.metric("uplink_hub_agents_connected"),
                    s.state.lock().unwrap()
                )
            })
            .collect();
        each.join("\n")
    };
    assert!(wait_for(PATIENCE.as_secs(), || reps.iter().all(|r| r.ready(4.0))), "{}\n{}", sims_state(), logs());
    for r in &reps {
        assert_eq!(status_via(r, &alice, NODE), 200, "edge-node through {}", r.name);
    }
    let from = Instant::now();
    let r = reps[b].hub().client(Some(&admin_token)).delete(&format!("/api/v1/clusters/{NODE}")).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let mut effective: Vec<Option<Duration>> = vec![None; reps.len()];
    let everywhere = wait_for(5, || {
        for (i, r) in reps.iter().enumerate() {
            let told = !sims[i].state.lock().unwrap().goaways.is_empty();
            if effective[i].is_none() && told && status_via(r, &alice, NODE) != 200 {
                effective[i] = Some(from.elapsed());
            }
        }
        effective.iter().all(|t| t.is_some())
    });
    assert!(everywhere, "deregistration on every replica: {effective:?}");
    let deregistered_after = effective.iter().flatten().max().copied().unwrap();
    for (r, s) in reps.iter().zip(&sims) {
        let goaways = s.state.lock().unwrap().goaways.clone();
        assert!(matches!(goaways.as_slice(), [(GoAwayCode::Deregistered, _)]), "{}: {goaways:?}", r.name);
    }
    let exit = wait_exit(&mut node_agent.0, PATIENCE);
    assert_eq!(exit, Some(4), "the agent of edge-node stops:\n{}", agent_log(&node_log));
    assert!(wait_for(PATIENCE.as_secs(), || reps.iter().all(|r| r.ready(2.0))), "only edge-deploy's pods are left");
    let after = Client::new(&reps[c].url(), Some(&ca), Some(&alice)).unwrap();
    let after = after.get(&format!("/k8s/clusters/{NODE}{PODS}")).unwrap();
    next_tick(&watches);
    std::thread::sleep(Duration::from_secs(1));
    let to = Instant::now();
    let (failed, via_lb) = report("deregistration of edge-node on B", from, to, &people.samples(), &watches);
    assert!(failed.is_empty() && via_lb.is_empty(), "edge-deploy was not touched: {failed:#?} {via_lb:#?}");
    let each: Vec<String> =
        reps.iter().zip(&effective).map(|(r, t)| format!("{} {}", r.name, ms(t.unwrap()))).collect();
    eprintln!(
        "FIGURE deregistration on B: refused and GoAway(Deregistered) on every replica's tunnels after {} ({}); \
         the agent exited with 4; alice's request through C: {} {:?}",
        ms(deregistered_after),
        each.join(", "),
        after.status,
        after.json()["message"]
    );

    people.stop();
    let all = people.samples();
    eprintln!(
        "FIGURE whole run: {} kubectl gets, {} failed; setup (3 replicas, 3 agents \
         with every tunnel up) {}",
        all.len(),
        all.iter().filter(|s| !s.ok).count(),
        ms(setup)
    );
}
