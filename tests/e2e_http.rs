//! The hub's HTTP front with real kubectl, the real agent and the
//! stand-in API server:
//!
//! - 1,000 slow clients (TCP only, a TLS handshake never finished, a head
//!   trickled a byte at a time, a body that stalls), each reconnecting
//!   as soon as the hub cuts it, plus one greedy address over its cap, do
//!   not stop a kubectl user, do not cut a running watch, and leave the
//!   hub's memory bounded;
//! - what kubectl 1.27 and 1.32 print, from an empty discovery cache,
//!   for a cluster that is PENDING or DISCONNECTED, and when pointed at
//!   the hub's root instead of `/k8s/clusters/NAME`.
//!
//! Skips loudly without kubectl (see `support::kubectl`).
#![cfg(feature = "hub")]

mod hub_support;
mod support;

use hub_support::{
    HubProc, KillOnDrop, hub_cli, ok, spawn_agent, tcp_from, temp_dir, wait_for, write_kube_credentials,
};
use serde_json::json;
use smol::future::FutureExt;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};
use support::kube::{Config, StandIn};
use support::kubectl::{Kubectl, kill, lines, wait_line};

const ARTICLE_RBAC: &str = include_str!("fixtures/kube/eks-console-restricted-access.yaml");
const AGENT_IMPERSONATION: &str = include_str!("fixtures/kube/agent-impersonation.yaml");
const DEBUG_ACCESS: &str = include_str!("fixtures/kube/debug-access.yaml");
/// Generous: a loaded 2-core machine runs several suites at once.
const PATIENCE: Duration = Duration::from_secs(60);

/// Slow clients spread over [`ADDRESSES`] addresses, plus [`GREEDY`] from
/// one more address that its cap ([`PER_ADDRESS`]) holds back.
const SLOW_CLIENTS: usize = 1000;
const ADDRESSES: usize = 20;
const PER_ADDRESS: usize = 64;
const GREEDY: usize = 200;
/// The hub's deadlines in this test: short, so slow clients are cut and
/// come back several times while kubectl works.
const DEADLINE: &str = "6s";
/// [`DEADLINE`] as a duration: the attack is watched for more than two
/// of them, so every slow client is cut at least once however fast
/// kubectl answers (a fixed count of gets once took 5.9 s on a quiet
/// machine, and the last slow clients had not yet met their deadline).
const DEADLINE_DURATION: Duration = Duration::from_secs(6);

/// The soft open-file limit, raised toward the hard one: the test holds
/// one end of each slow connection and the hub (a child, which inherits
/// the limit) the other.
fn raise_open_files(want: u64) -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    let hard = l.maximum.unwrap_or(u64::MAX);
    if l.current.is_some_and(|c| c < want) {
        l.current = Some(want.min(hard));
        let _ = setrlimit(Resource::Nofile, l);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

#[derive(Clone, Copy, Debug)]
enum Slow {
    /// Connects and says nothing.
    TcpOnly,
    /// Sends the first bytes of a ClientHello and nothing more.
    HalfHandshake,
    /// Finishes TLS, then sends a head one byte every 2 s.
    TrickledHead,
    /// Sends a whole head announcing 1000 body bytes, 10 of them, then
    /// nothing.
    StalledBody,
    /// Finishes TLS and says nothing (the greedy address: it reads the
    /// 503 a refused connection gets).
    SilentTls,
}

#[derive(Default)]
struct Tally {
    /// Connections open now.
    held: AtomicUsize,
    /// Connections made in all.
    made: AtomicUsize,
    /// Times the hub closed one (a deadline or a 503).
    cut: AtomicUsize,
    /// 503s read.
    refused: AtomicUsize,
    /// Connections given up on after [`GIVE_UP`] without a word from
    /// the hub.
    gave_up: AtomicUsize,
}

/// How long a slow client waits for the hub to cut it, far past the
/// hub's deadlines.
const GIVE_UP: Duration = Duration::from_secs(20);

/// A non-blocking connect from `src`, awaited.
async fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> std::io::Result<smol::Async<std::net::TcpStream>> {
    let tcp = smol::unblock(move || tcp_from(src, dst)).await?;
    smol::Async::new(tcp)
}

/// Reads until the hub closes the connection; true if what came was a 503.
async fn until_closed<R: smol::io::AsyncRead + Unpin>(r: &mut R) -> bool {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return seen.starts_with(b"HTTP/1.1 503"),
            Ok(n) if seen.len() < 64 => seen.extend_from_slice(&buf[..n]),
            Ok(_) => {}
        }
    }
}

/// One slow client: connects, misbehaves its way, and when the hub cuts
/// it, connects again, until `stop`.
async fn slow_client(
    kind: Slow,
    src: Ipv4Addr,
    hub: SocketAddr,
    tls: futures_rustls::TlsConnector,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(SeqCst) {
        let Ok(mut tcp) = connect_from(src, hub).await else {
            smol::Timer::after(Duration::from_millis(200)).await;
            continue;
        };
        tally.made.fetch_add(1, SeqCst);
        tally.held.fetch_add(1, SeqCst);
        let work = async {
            match kind {
                Slow::TcpOnly => until_closed(&mut tcp).await,
                Slow::HalfHandshake => {
                    let _ = tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00]).await;
                    until_closed(&mut tcp).await
                }
                Slow::TrickledHead | Slow::StalledBody | Slow::SilentTls => {
                    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
                    match tls.connect(name, tcp).await {
                        Err(_) => false,
                        Ok(s) => {
                            let (mut r, mut w) = smol::io::split(s);
                            let misbehave = async {
                                if let Slow::SilentTls = kind {
                                    std::future::pending::<bool>().await
                                } else if let Slow::StalledBody = kind {
                                    let head = b"POST /v1/activate HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"activat";
                                    let _ = w.write_all(head).await;
                                    let _ = w.flush().await;
                                    std::future::pending::<bool>().await
                                } else {
                                    let head = format!(
                                        "GET /api/v1/clusters HTTP/1.1\r\nHost: hub\r\nX-Pad: {}\r\n\r\n",
                                        "x".repeat(200)
                                    );
                                    for b in head.as_bytes() {
                                        if w.write_all(&[*b]).await.is_err() || w.flush().await.is_err() {
                                            break;
                                        }
                                        smol::Timer::after(Duration::from_secs(2)).await;
                                    }
                                    false
                                }
                            };
                            smol::future::or(until_closed(&mut r), misbehave).await
                        }
                    }
                }
            }
        };
        // A connection the kernel completed but the hub's accept queue
        // dropped (a full backlog under the flood) is never closed by
        // anyone: a client that sends nothing would wait forever.
        let refused = work
            .or(async {
                smol::Timer::after(GIVE_UP).await;
                tally.gave_up.fetch_add(1, SeqCst);
                false
            })
            .await;
        tally.held.fetch_sub(1, SeqCst);
        tally.cut.fetch_add(1, SeqCst);
        if refused {
            tally.refused.fetch_add(1, SeqCst);
        }
        // A real attacker would come straight back; a breath keeps a
        // refused client from spinning.
        smol::Timer::after(Duration::from_millis(100)).await;
    }
}

/// Runs the slow clients on one thread until `stop` is set.
/// Counts the slow clients in `tally` and the greedy address's in `greedy`.
fn start_attack(
    hub: &HubProc,
    tally: Arc<Tally>,
    greedy: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let cfg = uplink::tls::client_config(&uplink::tls::Trust::CaPem(hub.ca_pem.clone()), None, &[]).unwrap();
    let tls = futures_rustls::TlsConnector::from(cfg);
    let addr = hub.addr;
    std::thread::spawn(move || {
        let ex = smol::LocalExecutor::new();
        let kinds = [Slow::TcpOnly, Slow::HalfHandshake, Slow::TrickledHead, Slow::StalledBody];
        let mut tasks = Vec::new();
        for i in 0..SLOW_CLIENTS {
            let src = Ipv4Addr::new(127, 0, 1, 10 + (i % ADDRESSES) as u8);
            tasks.push(ex.spawn(slow_client(
                kinds[i % kinds.len()],
                src,
                addr,
                tls.clone(),
                tally.clone(),
                stop.clone(),
            )));
        }
        for i in 0..GREEDY {
            let src = Ipv4Addr::new(127, 0, 1, 200);
            // Staggered, 20 ms apart: the address's first connections
            // linger past the hub's grace while the later ones arrive,
            // so the later ones meet its cap.
            let client = slow_client(Slow::SilentTls, src, addr, tls.clone(), greedy.clone(), stop.clone());
            tasks.push(ex.spawn(async move {
                smol::Timer::after(Duration::from_millis(20 * i as u64)).await;
                client.await
            }));
        }
        smol::block_on(ex.run(async {
            for t in tasks {
                t.await;
            }
        }));
    })
}

/// Metric `name` from the hub's `/metrics` (a fresh connection from
/// 127.0.0.1, like kubectl's).
fn metric(hub: &HubProc, name: &str) -> u64 {
    let text = hub.client(None).get("/metrics").unwrap().text();
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or(0)
}

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Runs `kubectl get pods` `n` times; every run must succeed.
fn timed_gets(kc: &Kubectl, n: usize) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let out = kc.run(&["get", "pods", "-n", "default"]);
            let took = t.elapsed();
            assert!(ok(&out).contains("web-7d4b9c8f6d-k2x9p"));
            took
        })
        .collect()
}

fn setup_cluster(dir: &Path, hub: &HubProc, k: &StandIn, kc: &Kubectl, name: &str) -> KillOnDrop {
    setup_cluster_with(dir, hub, &k.url(), &[], kc, name)
}

/// Registers `name` for bob, starts a real agent for it (against the API
/// server at `kube_url`, with `extra` flags), waits for ACTIVE and
/// writes bob's kubeconfig into `kc`.
fn setup_cluster_with(
    dir: &Path,
    hub: &HubProc,
    kube_url: &str,
    extra: &[&std::ffi::OsStr],
    kc: &Kubectl,
    name: &str,
) -> KillOnDrop {
    let token = hub.admin_token.clone().unwrap();
    let out_dir = dir.join(format!("out-{name}"));
    std::fs::create_dir_all(&out_dir).unwrap();
    ok(&hub_cli(hub, &token, &["cluster", "register", name, "--user", "bob", "--out-dir", out_dir.to_str().unwrap()]));
    let activation = out_dir.join(format!("uplink-{name}-activation.json"));
    let state = out_dir.join("state");
    let mut flags = vec!["--activation".as_ref(), activation.as_os_str(), "--state".as_ref(), state.as_os_str()];
    flags.extend_from_slice(extra);
    let log = dir.join(format!("agent-{name}.log"));
    let agent = KillOnDrop(spawn_agent(&flags, kube_url, dir, &log));
    let admin = hub.admin();
    assert!(
        wait_for(30, || admin.get(&format!("/api/v1/clusters/{name}")).unwrap().json()["status"] == "ACTIVE"),
        "agent log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    admin.post_json("/api/v1/grants", &json!({ "user": "bob", "clusters": name })).unwrap();
    ok(&hub_cli(hub, &bob_token(hub, dir), &["kubeconfig", "--cluster", name, "--out", kc.path().to_str().unwrap()]));
    agent
}

/// Bob's hub token: made on first use, then kept in `dir/bob.token`.
fn bob_token(hub: &HubProc, dir: &Path) -> String {
    let file = dir.join("bob.token");
    if let Ok(t) = std::fs::read_to_string(&file) {
        return t;
    }
    let r = hub.admin().post_json("/api/v1/users", &json!({ "name": "bob" })).unwrap();
    let token = r.json()["token"].as_str().unwrap_or_else(|| panic!("{}", r.text())).to_string();
    std::fs::write(&file, &token).unwrap();
    token
}

#[test]
fn a_thousand_slow_clients_do_not_stop_kubectl() {
    let Some(kc) = Kubectl::find("e2e-http-slow") else { return };
    let files = raise_open_files(8192);
    assert!(files >= 3000, "this test needs about 2,500 open files; the limit is {files}");
    let dir = temp_dir("slow-clients");
    let k = StandIn::start(Config::default());
    for y in [ARTICLE_RBAC, AGENT_IMPERSONATION, DEBUG_ACCESS] {
        k.load_rbac_yaml(y).unwrap();
    }
    write_kube_credentials(&dir, &k.agent_token(), &k.ca_pem());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (listen, url) = (format!("127.0.0.1:{port}"), format!("https://127.0.0.1:{port}"));
    let per_address = PER_ADDRESS.to_string();
    let hub = HubProc::start_with(
        &dir,
        &[
            "--listen",
            &listen,
            "--public-url",
            &url,
            "--max-connections-per-address",
            &per_address,
            "--handshake-timeout",
            DEADLINE,
            "--head-timeout",
            DEADLINE,
            "--idle-timeout",
            DEADLINE,
            "--body-timeout",
            DEADLINE,
        ],
    );
    let _agent = setup_cluster(&dir, &hub, &k, &kc, "edge-1");

    // Idle: warm the discovery cache, then time.
    timed_gets(&kc, 2);
    let idle = timed_gets(&kc, 10);
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = hub.rss_kib();

    // A watch that lives through the whole attack, idle far longer than
    // any deadline.
    let mut watch = kc.spawn(&["get", "pods", "-n", "default", "-w"]);
    let watch_lines = lines(&mut watch);
    wait_line(&watch_lines, PATIENCE, "an existing pod", |l| l.contains("web-7d4b9c8f6d-k2x9p"));

    let (tally, greedy) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let attack = start_attack(&hub, tally.clone(), greedy.clone(), stop.clone());
    // Wait until the slow clients are in: all of them held at once.
    let ramp = wait_for(60, || tally.held.load(SeqCst) >= SLOW_CLIENTS);
    let held_at_start = tally.held.load(SeqCst);
    let mut hub_unauth = metric(&hub, "uplink_hub_connections_unauthenticated");

    let mut during = Vec::new();
    let mut held_samples = Vec::new();
    let mut rss_during = 0;
    let watched = Instant::now();
    while during.len() < 10 || watched.elapsed() < 2 * DEADLINE_DURATION + Duration::from_secs(1) {
        during.extend(timed_gets(&kc, 1));
        held_samples.push(tally.held.load(SeqCst));
        hub_unauth = hub_unauth.max(metric(&hub, "uplink_hub_connections_unauthenticated"));
        rss_during = rss_during.max(hub.rss_kib());
        std::thread::sleep(Duration::from_millis(500));
    }
    // The watch, idle for all that time, still delivers.
    k.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "after-the-storm", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Pending"},
    }))
    .unwrap();
    wait_line(&watch_lines, PATIENCE, "the new pod on the watch", |l| l.contains("after-the-storm"));
    let refused_by_hub = metric(&hub, "uplink_hub_connections_refused_total");
    let cut_by_hub = metric(&hub, "uplink_hub_slow_clients_closed_total");
    stop.store(true, SeqCst);
    kill(watch);

    let held_min = *held_samples.iter().min().unwrap();
    eprintln!(
        "slow clients: {SLOW_CLIENTS} over {ADDRESSES} addresses + {GREEDY} from one address (cap {PER_ADDRESS}); \
         held at once: {held_at_start} at ramp-up, {held_min}..{} while kubectl ran; hub counted up to {hub_unauth} \
         unauthenticated; connections made {}, ended {} (hub: {cut_by_hub} cut at a deadline, {refused_by_hub} 503s; \
         {} never accepted)",
        held_samples.iter().max().unwrap(),
        tally.made.load(SeqCst),
        tally.cut.load(SeqCst),
        tally.gave_up.load(SeqCst),
    );
    eprintln!(
        "kubectl get pods p50: idle {:?}, during the attack {:?} (max {:?})",
        p50(idle),
        p50(during.clone()),
        during.iter().max().unwrap()
    );
    eprintln!("hub RSS: before {rss_before} KiB, during {rss_during} KiB");
    assert!(ramp, "only {} slow clients connected", tally.held.load(SeqCst));
    eprintln!(
        "greedy address: {} connections made, {} refused with 503",
        greedy.made.load(SeqCst),
        greedy.refused.load(SeqCst)
    );
    // The greedy address was held to its cap and told so.
    assert!(refused_by_hub > 0 && greedy.refused.load(SeqCst) > 0, "no 503 for the greedy address");
    // The slow clients were really held, not refused: the hub counted
    // them (less the few reconnecting at any moment).
    assert!(hub_unauth >= (SLOW_CLIENTS * 9 / 10) as u64, "the hub held only {hub_unauth} unauthenticated connections");
    assert_eq!(tally.refused.load(SeqCst), 0, "slow clients under their address's cap were refused");
    // And cut at their deadlines, again and again: each was watched
    // for more than two deadlines.
    assert!(cut_by_hub >= SLOW_CLIENTS as u64, "the hub cut only {cut_by_hub} slow connections");
    // Bounded: a few tens of KiB per connection, not a buffer per byte.
    assert!(rss_during < 256 * 1024, "hub RSS {rss_during} KiB during the attack (before: {rss_before} KiB)");
    attack.join().unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// kubectl `version` (1.27, 1.32, ...) at its usual place, with a fresh,
/// empty discovery cache; `None` (loudly) when that kubectl is missing
/// and not required.
fn kubectl_version(version: &str, kubeconfig: &str) -> Option<Kubectl> {
    let bin = std::path::PathBuf::from(format!("/usr/lib/google-cloud-sdk/bin/kubectl.{version}"));
    if !bin.is_file() {
        let required = std::env::var("UPLINK_REQUIRE_KUBECTL").is_ok_and(|v| v == "1");
        assert!(!required, "kubectl {version} not found at {} and UPLINK_REQUIRE_KUBECTL=1", bin.display());
        eprintln!("\n!!!!! SKIPPING kubectl {version}: not found at {} !!!!!\n", bin.display());
        return None;
    }
    let dir = support::kubectl::temp_dir(&format!("kubectl-{version}"));
    let kc = Kubectl { bin, kubeconfig: dir.join("kubeconfig"), dir };
    std::fs::write(&kc.kubeconfig, kubeconfig).unwrap();
    Some(kc)
}

/// Its stderr, after asserting that kubectl failed.
#[track_caller]
fn failed(o: &std::process::Output) -> String {
    assert!(!o.status.success(), "kubectl should have failed: {}", String::from_utf8_lossy(&o.stdout));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn kubectl_prints_the_hubs_words_for_clusters_that_cannot_answer() {
    if Kubectl::find("e2e-http-discovery").is_none() {
        return;
    }
    let dir = temp_dir("discovery");
    let hub = HubProc::start(&dir);
    let token = hub.admin_token.clone().unwrap();
    let admin = hub.admin();
    // edge-2: registered, never activated (PENDING). edge-3: activated by
    // an agent that is not connected (DISCONNECTED).
    for name in ["edge-2", "edge-3"] {
        let r = admin.post_json("/api/v1/clusters", &json!({ "name": name })).unwrap();
        assert_eq!(r.status, 201, "{}", r.text());
        if name == "edge-3" {
            let a = &r.json()["activation"];
            let body = json!({ "activation_id": a["activation_id"], "activation_code": a["activation_code"] });
            assert_eq!(hub.client(None).post_json("/v1/activate", &body).unwrap().status, 200);
        }
    }
    assert_eq!(admin.get("/api/v1/clusters/edge-3").unwrap().json()["status"], "DISCONNECTED");
    let config =
        |cluster: &str| uplink::hub::api::kubeconfig_yaml(&hub.url, Some(&hub.ca_pem), cluster, "admin", &token);
    let root = config("edge-2").replace(&format!("{}/k8s/clusters/edge-2", hub.url), &hub.url);
    let generic = "the server is currently unable to handle the request";
    for version in ["1.27", "1.32"] {
        for (cluster, words) in [
            ("edge-2", r#"cluster "edge-2" is registered but no agent has activated it yet; install its manifest"#),
            ("edge-3", r#"cluster "edge-3" is not connected to uplink-hub (DISCONNECTED)"#),
        ] {
            let Some(kc) = kubectl_version(version, &config(cluster)) else { continue };
            // From an empty cache: discovery fails first.
            let err = failed(&kc.run(&["get", "pods"]));
            assert!(err.contains(words) && !err.contains(generic), "kubectl {version}, {cluster}:\n{err}");
            eprintln!("kubectl {version}, {cluster}, empty cache: {}", err.lines().last().unwrap_or(""));
            // `get --raw` takes its path from the server's root, not from
            // the kubeconfig's `/k8s/clusters/NAME`: the cluster's health
            // is under the prefix, and the bare path gets the hint, not
            // the hub's own "ok".
            let raw = format!("/k8s/clusters/{cluster}/healthz");
            let err = failed(&kc.run(&["get", "--raw", &raw]));
            assert!(err.contains(words), "kubectl {version} get --raw {raw}:\n{err}");
            let err = failed(&kc.run(&["get", "--raw", "/healthz"]));
            assert!(err.contains("not a Kubernetes API server"), "kubectl {version} get --raw /healthz:\n{err}");
        }
        // A kubeconfig pointing at the hub's root: told where clusters are,
        // never a healthy-looking answer from the hub itself.
        let Some(kc) = kubectl_version(version, &root) else { continue };
        let hint = "this is uplink-hub, not a Kubernetes API server";
        let err = failed(&kc.run(&["get", "pods"]));
        assert!(err.contains(hint) && err.contains("/k8s/clusters/NAME"), "kubectl {version} at the root:\n{err}");
        eprintln!("kubectl {version}, hub root, empty cache: {}", err.lines().last().unwrap_or(""));
        for raw in ["/healthz", "/readyz", "/livez", "/version", "/apis"] {
            let err = failed(&kc.run(&["get", "--raw", raw]));
            assert!(err.contains(hint), "kubectl {version} get --raw {raw} at the root:\n{err}");
        }
        // The cluster's own paths through the root kubeconfig, as the
        // README shows.
        let err = failed(&kc.run(&["get", "--raw", "/k8s/clusters/edge-2/api"]));
        assert!(err.contains("no agent has activated it yet"), "{err}");
    }
    // `kubectl proxy --append-server-path` keeps the kubeconfig's
    // `/k8s/clusters/NAME` in front of every path it forwards.
    if let Some(kc) = kubectl_version("1.32", &config("edge-2")) {
        let mut proxy = kc.spawn(&["proxy", "--append-server-path", "--port=0"]);
        let out = lines(&mut proxy);
        let l = wait_line(&out, PATIENCE, "Starting to serve", |l| l.starts_with("Starting to serve on 127.0.0.1:"));
        let port: u16 = l.rsplit(':').next().unwrap().trim().parse().unwrap();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        std::io::Write::write_all(
            &mut s,
            b"GET /api/v1/namespaces HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut s, &mut answer).unwrap();
        assert!(answer.contains("no agent has activated it yet"), "{answer}");
        kill(proxy);
    }
    // Probes keep their answer.
    let probe = hub.client(None).get("/healthz").unwrap();
    assert_eq!((probe.status, probe.text().as_str()), (200, "ok\n"));
    std::fs::remove_dir_all(&dir).ok();
}

/// The agent's own refusals and an API server it cannot reach, met on
/// discovery from an empty cache: kubectl prints their words, not
/// "unknown" or a generic line.
#[test]
fn kubectl_prints_the_agents_words_on_discovery() {
    if Kubectl::find("e2e-http-agent-words").is_none() {
        return;
    }
    let dir = temp_dir("agent-words");
    let k = StandIn::start(Config::default());
    for y in [ARTICLE_RBAC, AGENT_IMPERSONATION, DEBUG_ACCESS] {
        k.load_rbac_yaml(y).unwrap();
    }
    write_kube_credentials(&dir, &k.agent_token(), &k.ca_pem());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (listen, url) = (format!("127.0.0.1:{port}"), format!("https://127.0.0.1:{port}"));
    let hub = HubProc::start_with(&dir, &["--listen", &listen, "--public-url", &url]);
    // edge-4's agent may impersonate only alice; edge-5's API server is gone.
    let config = dir.join("agent.yaml");
    std::fs::write(&config, "allowed_users: [alice]\nallowed_groups: []\n").unwrap();
    let kc = Kubectl::find("e2e-http-agent-words-setup").unwrap();
    let _a4 = setup_cluster_with(&dir, &hub, &k.url(), &["--config".as_ref(), config.as_os_str()], &kc, "edge-4");
    let gone = format!(
        "https://127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    );
    let _a5 = setup_cluster_with(&dir, &hub, &gone, &[], &kc, "edge-5");
    let bob = bob_token(&hub, &dir);
    for version in ["1.27", "1.32"] {
        for (cluster, words) in [
            ("edge-4", r#"the agent's configuration does not allow impersonating user "bob""#),
            ("edge-5", "the agent could not reach the API server"),
        ] {
            let config = uplink::hub::api::kubeconfig_yaml(&hub.url, Some(&hub.ca_pem), cluster, "bob", &bob);
            let Some(kc) = kubectl_version(version, &config) else { continue };
            let err = failed(&kc.run(&["get", "pods"]));
            assert!(err.contains(words) && !err.contains(": unknown"), "kubectl {version}, {cluster}:\n{err}");
            eprintln!("kubectl {version}, {cluster}, empty cache: {}", err.lines().last().unwrap_or(""));
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
