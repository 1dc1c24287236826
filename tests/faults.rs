//! Faults as a fleet meets them, with real processes: `uplink-hub serve`,
//! the agent (`uplink run`) and the stand-in API server, with a
//! fault-injecting relay (`support::relay`) on the tunnel's path and
//! another in front of the API server.
//!
//! ```text
//!  probe (bob, a request every few ms) ──► hub ◄── relay ◄── agent ──► relay ──► stand-in API server
//!  status poller (admin) ─────────────────►  │       cut, FIN,            freeze
//!                                            │       black hole,
//!                         kill -9, SIGTERM ──┘       silent acceptor, corrupt
//! ```
//!
//! Each test injects one kind of fault three times and prints what it
//! measured: recovery is the time from the fault (or from the path coming
//! back) to the first good answer to a request started after it. Bounds
//! are generous (the machine is small and shared); the figures printed are
//! the point. Every answer is checked: a 200 must carry the right pod
//! list, anything else a Kubernetes `Status`, and nothing may hang.
//!
//! Timing tests run one at a time (`SERIAL`), so they do not skew each
//! other. Small keepalive settings are used where the property does not
//! depend on the value (one test runs the defaults).
#![cfg(feature = "hub")]

mod hub_support;
mod support;

use hub_support::{HubProc, KillOnDrop, temp_dir, wait_for};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::kube::{Config, StandIn};
use support::relay::Relay;
use uplink::hub::client::Client;

const ARTICLE_RBAC: &str = include_str!("fixtures/kube/eks-console-restricted-access.yaml");
const AGENT_IMPERSONATION: &str = include_str!("fixtures/kube/agent-impersonation.yaml");
const DEBUG_ACCESS: &str = include_str!("fixtures/kube/debug-access.yaml");
const POD: &str = "web-7d4b9c8f6d-k2x9p";
const PODS: &str = "/k8s/clusters/edge-1/api/v1/namespaces/default/pods";
/// A request still unanswered after this is hung.
const HUNG: Duration = Duration::from_secs(20);
/// How long a tunnel is up before a fault: past the agent's
/// `WORKED_AFTER`, so the redial after the fault is the immediate one.
const SETTLE: Duration = Duration::from_millis(1200);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Hub and agent settings for one world.
#[derive(Clone)]
struct Settings {
    keepalive: &'static str,
    dead_after: &'static str,
    dial_timeout: &'static str,
    response_timeout: &'static str,
}

const FAST: Settings = Settings { keepalive: "1s", dead_after: "3s", dial_timeout: "2s", response_timeout: "2s" };
const DEFAULTS: Settings =
    Settings { keepalive: "5s", dead_after: "15s", dial_timeout: "10s", response_timeout: "60s" };

/// Everything of one run: the stand-in cluster, the hub, the agent, the
/// relays between them, and clients for the admin and for bob.
struct World {
    dir: PathBuf,
    _k: StandIn,
    kube_relay: Relay,
    hub_relay: Relay,
    hub: HubProc,
    hub_args: Vec<String>,
    agent: KillOnDrop,
    settings: Settings,
    admin_token: String,
    bob_token: String,
    /// The listening socket held for the hub as systemd's socket unit
    /// holds it, when the hub runs socket-activated.
    socket: Option<std::net::TcpListener>,
}

impl World {
    fn start(tag: &str, s: &Settings) -> World {
        World::start_on(tag, s, None)
    }

    /// With `socket`, every hub process is started on it as systemd starts
    /// a socket-activated service (fd 3, `LISTEN_FDS`, `LISTEN_PID`).
    fn start_on(tag: &str, s: &Settings, socket: Option<std::net::TcpListener>) -> World {
        let dir = temp_dir(tag);
        let k = StandIn::start(Config::default());
        for y in [ARTICLE_RBAC, AGENT_IMPERSONATION, DEBUG_ACCESS] {
            k.load_rbac_yaml(y).unwrap();
        }
        hub_support::write_kube_credentials(&dir, &k.agent_token(), &k.ca_pem());
        let kube_relay = Relay::start(k.addr());
        // The agent dials the relay: it is the hub's public URL.
        let hub_relay = Relay::start_on("127.0.0.1:0".parse().unwrap(), None);
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut hub_args: Vec<String> = [
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--public-url",
            &format!("https://{}", hub_relay.addr),
            "--keepalive",
            s.keepalive,
            "--dead-after",
            s.dead_after,
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        if socket.is_none() {
            hub_args.push("--reuse-port".into());
        }
        let hub = start_hub(&dir, &hub_args, socket.as_ref());
        hub_relay.set_target(hub.addr);
        let admin_token = hub.admin_token.clone().unwrap();
        let admin = hub.admin();
        let reg = admin.post_json("/api/v1/clusters", &json!({ "name": "edge-1", "users": ["bob"] })).unwrap().json();
        std::fs::write(dir.join("activation.json"), reg["systemd_activation"].as_str().unwrap()).unwrap();
        let bob = admin.post_json("/api/v1/users", &json!({ "name": "bob" })).unwrap().json();
        let bob_token = bob["token"].as_str().unwrap().to_string();
        admin.post_json("/api/v1/grants", &json!({ "user": "bob", "clusters": "edge-*" })).unwrap();

        let agent = spawn_agent(&dir, s, &kube_relay);
        let w = World {
            settings: s.clone(),
            dir,
            _k: k,
            kube_relay,
            hub_relay,
            hub,
            hub_args,
            agent: KillOnDrop(agent),
            admin_token,
            bob_token,
            socket,
        };
        w.wait_active();
        w
    }

    /// Kills the agent (-9) and starts it again at once, as systemd or the
    /// kubelet would.
    fn restart_agent(&mut self) {
        let _ = self.agent.0.kill();
        let _ = self.agent.0.wait();
        self.agent = KillOnDrop(spawn_agent(&self.dir, &self.settings, &self.kube_relay));
    }

    fn admin(&self) -> Client {
        self.hub.client(Some(&self.admin_token))
    }

    fn bob(&self) -> Client {
        self.hub.client(Some(&self.bob_token))
    }

    fn status(&self) -> String {
        self.admin()
            .get("/api/v1/clusters/edge-1")
            .map(|r| r.json()["status"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    }

    /// Waits until the cluster is connected and answers bob.
    fn wait_active(&self) {
        let bob = self.bob();
        let up = wait_for(30, || self.status() == "ACTIVE" && matches!(probe_once(&bob, &self.bob_token), Outcome::Ok));
        assert!(up, "never became ACTIVE\nagent log:\n{}\nhub log:\n{}", self.agent_log(), self.hub.log());
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    fn start_hub(&self) -> HubProc {
        start_hub(&self.dir, &self.hub_args, self.socket.as_ref())
    }

    fn signal(&self, pid: u32, sig: &str) {
        Command::new("kill").args([sig, &pid.to_string()]).status().unwrap();
    }
}

/// The agent of a world, appending to `dir/agent.log`.
fn spawn_agent(dir: &std::path::Path, s: &Settings, kube_relay: &Relay) -> std::process::Child {
    let (activation, state) = (dir.join("activation.json"), dir.join("state"));
    let flags = ["--activation".as_ref(), activation.as_os_str(), "--state".as_ref(), state.as_os_str()];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uplink"));
    cmd.env("UPLINK_DIAL_TIMEOUT", s.dial_timeout).env("UPLINK_RESPONSE_TIMEOUT", s.response_timeout);
    let kube_url = format!("https://{}", kube_relay.addr);
    let log = dir.join(format!("agent-{}.log", SPAWNED.fetch_add(1, Ordering::SeqCst)));
    let child = hub_support::spawn_agent_with(cmd, &flags, &kube_url, dir, &log);
    // agent.log: the current agent's lines (the tests read it).
    let _ = std::fs::remove_file(dir.join("agent.log"));
    let _ = std::os::unix::fs::symlink(&log, dir.join("agent.log"));
    child
}

static SPAWNED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Starts a hub: on its own port, or on `socket` the way systemd starts a
/// socket-activated service: the socket as fd 3, `LISTEN_FDS=1` and
/// `LISTEN_PID` the hub's own pid (a shell moves the inherited socket to
/// fd 3 and sets both, then execs the hub in its own place).
fn start_hub(dir: &std::path::Path, args: &[String], socket: Option<&std::net::TcpListener>) -> HubProc {
    let Some(socket) = socket else {
        return HubProc::start_with(dir, &args.iter().map(String::as_str).collect::<Vec<_>>());
    };
    use std::os::fd::AsRawFd;
    let script = r#"exec 3<&"$0"; export LISTEN_FDS=1 LISTEN_PID=$$; exec "$@""#;
    let mut sh = Command::new("sh");
    sh.args(["-c", script, &socket.as_raw_fd().to_string(), env!("CARGO_BIN_EXE_uplink-hub"), "serve"])
        .args(args)
        .arg("--data-dir")
        .arg(dir.join("data"));
    HubProc::start_command(dir, sh)
}

#[derive(Clone, Debug)]
enum Outcome {
    Ok,
    /// A clear failure: the status (0: no HTTP answer) and message.
    Failed(u16, String),
    /// A 200 whose body is not the pod list, or an error that is not a Status.
    Corrupt(String),
    Hung,
}

#[derive(Clone, Debug)]
struct Sample {
    start: Instant,
    end: Instant,
    outcome: Outcome,
}

/// One request as bob (`token`), checked.
fn probe_once(bob: &Client, token: &str) -> Outcome {
    let mut tls = match bob.connect() {
        Ok(t) => t,
        Err(e) => return Outcome::Failed(0, e.to_string()),
    };
    tls.sock.set_read_timeout(Some(HUNG)).unwrap();
    // Client::request has no read timeout; this is the same request.
    let req = format!("GET {PODS} HTTP/1.1\r\nHost: hub\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\r\n");
    if let Err(e) = tls.write_all(req.as_bytes()).and_then(|_| tls.flush()) {
        return Outcome::Failed(0, e.to_string());
    }
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            return Outcome::Hung;
        }
        Err(e) => return Outcome::Failed(0, e.to_string()),
    }
    let reply = match uplink::hub::client::parse_response(&raw, false) {
        Ok(r) => r,
        // Cut short before its Content-Length or last chunk: the client
        // can tell, as kubectl does ("unexpected EOF").
        Err(e)
            if raw.is_empty()
                || e.to_string().contains("short body")
                || (e.to_string().contains("chunked") && !raw.ends_with(b"0\r\n\r\n")) =>
        {
            return Outcome::Failed(0, format!("answer cut short: {e}"));
        }
        Err(e) => return Outcome::Corrupt(format!("unparsable answer: {e}")),
    };
    let v: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    if reply.status == 200 {
        let names: Vec<&str> = v["items"]
            .as_array()
            .map(|a| a.iter().filter_map(|p| p["metadata"]["name"].as_str()).collect())
            .unwrap_or_default();
        if v["kind"] == "PodList" && names.contains(&POD) {
            Outcome::Ok
        } else {
            Outcome::Corrupt(format!("200 with {}", reply.text()))
        }
    } else if v["kind"] == "Status" {
        Outcome::Failed(reply.status, v["message"].as_str().unwrap_or("").to_string())
    } else {
        Outcome::Corrupt(format!("{} without a Status: {}", reply.status, reply.text()))
    }
}

/// Requests as bob in a loop on a thread, every answer recorded.
struct Probe {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Probe {
    fn start(w: &World) -> Probe {
        let (samples, stop) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (s2, st2) = (samples.clone(), stop.clone());
        let bob = w.bob();
        let token = w.bob_token.clone();
        let thread = std::thread::spawn(move || {
            while !st2.load(Ordering::SeqCst) {
                let start = Instant::now();
                let outcome = probe_once(&bob, &token);
                let failed = !matches!(outcome, Outcome::Ok);
                s2.lock().unwrap().push(Sample { start, end: Instant::now(), outcome });
                std::thread::sleep(Duration::from_millis(if failed { 10 } else { 5 }));
            }
        });
        Probe { samples, stop, thread: Some(thread) }
    }

    /// Time from `since` to the end of the first good answer to a request
    /// started at or after it; waits up to `patience` for one.
    fn recovery(&self, since: Instant, patience: Duration) -> Option<Duration> {
        let end = Instant::now() + patience;
        loop {
            let found = self
                .samples
                .lock()
                .unwrap()
                .iter()
                .find(|s| s.start >= since && matches!(s.outcome, Outcome::Ok))
                .map(|s| s.end - since);
            if found.is_some() || Instant::now() > end {
                return found;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    /// Stops, and asserts that no answer was corrupted and none hung.
    fn finish(mut self, what: &str) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let samples = self.samples();
        let bad: Vec<&Sample> =
            samples.iter().filter(|s| matches!(s.outcome, Outcome::Corrupt(_) | Outcome::Hung)).collect();
        let ok = samples.iter().filter(|s| matches!(s.outcome, Outcome::Ok)).count();
        println!(
            "[{what}] {} requests: {ok} good, {} clear failures, {} corrupted or hung",
            samples.len(),
            samples.len() - ok - bad.len(),
            bad.len()
        );
        for s in &bad {
            if let Outcome::Corrupt(why) = &s.outcome {
                println!("[{what}] corrupted: {why}");
            }
        }
        assert!(bad.is_empty(), "{what}: corrupted or hung answers: {bad:?}");
        samples
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

fn report(what: &str, figures: &[Duration]) -> Duration {
    let m = median(figures.to_vec());
    let all: Vec<String> = figures.iter().map(|d| d.as_millis().to_string()).collect();
    println!("FIGURE {what}: median {} (tries: {} ms)", ms(m), all.join(", "));
    m
}

/// Waits for the cluster to show `status`; how long that took from `since`.
fn status_after(w: &World, status: &str, since: Instant, patience: Duration) -> Option<Duration> {
    let end = Instant::now() + patience;
    while Instant::now() < end {
        if w.status() == status {
            return Some(since.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The agent's lines saying a tunnel ended: one that had worked ("tunnel
/// ended (why); reconnecting to URL …") or one that had just come up
/// ("tunnel ended N ms after it came up").
fn tunnel_ends(agent_log: &str) -> usize {
    agent_log.lines().filter(|l| l.contains("tunnel ended ")).count()
}

#[test]
fn cut_fin_corrupt_and_hub_kill9_recover_within_a_second() {
    let _serial = serial();
    let mut w = World::start("faults-cut", &FAST);
    let probe = Probe::start(&w);
    let mut figures: Vec<(&str, Vec<Duration>)> = Vec::new();
    let faults = [
        ("tunnel cut (RST)", 0),
        ("FIN from the network", 1),
        ("a corrupted byte", 2),
        ("hub kill -9", 3),
        ("agent kill -9", 4),
    ];
    for (name, fault) in faults {
        let mut tries = Vec::new();
        for _ in 0..3 {
            w.wait_active();
            std::thread::sleep(SETTLE);
            let ended_before = tunnel_ends(&w.agent_log());
            let at = Instant::now();
            match fault {
                0 => w.hub_relay.cut(),
                1 => w.hub_relay.fin(),
                2 => w.hub_relay.corrupt_next(),
                4 => w.restart_agent(),
                _ => {
                    w.hub.kill9();
                    w.hub = w.start_hub();
                    w.hub_relay.set_target(w.hub.addr);
                }
            }
            if fault == 2 {
                // The corrupted byte goes with the next bytes to the agent:
                // a ping within a second at most, or the probe's next request.
                let broke = wait_for(5, || tunnel_ends(&w.agent_log()) > ended_before);
                assert!(broke, "a corrupted byte did not end the tunnel:\n{}", w.agent_log());
            }
            let r = probe.recovery(at, Duration::from_secs(15));
            let r =
                r.unwrap_or_else(|| panic!("{name}: no recovery\nagent:\n{}\nhub:\n{}", w.agent_log(), w.hub.log()));
            tries.push(r);
        }
        figures.push((name, tries));
    }
    probe.finish("cut, FIN, corrupt, kill -9");
    for (name, tries) in &figures {
        let m = report(&format!("recovery after {name}"), tries);
        assert!(m < Duration::from_secs(5), "{name}: median recovery {m:?}");
    }
}

#[test]
fn ten_cuts_in_a_row_each_recover_within_a_second() {
    let _serial = serial();
    // The backoff used to grow for faults less than 60 s apart.
    let spacing =
        Duration::from_secs(std::env::var("UPLINK_FAULT_SPACING").ok().and_then(|v| v.parse().ok()).unwrap_or(2));
    let w = World::start("faults-ten", &FAST);
    let probe = Probe::start(&w);
    let mut tries = Vec::new();
    for _ in 0..10 {
        std::thread::sleep(spacing);
        let at = Instant::now();
        w.hub_relay.cut();
        tries.push(probe.recovery(at, Duration::from_secs(15)).expect("no recovery"));
    }
    probe.finish("ten cuts");
    let worst = *tries.iter().max().unwrap();
    report(&format!("recovery after each of ten cuts {}s apart (worst {})", spacing.as_secs(), ms(worst)), &tries);
    assert!(worst < Duration::from_secs(3), "a recovery took {worst:?}: {tries:?}");
}

#[test]
fn a_black_holed_tunnel_is_noticed_at_the_deadline_and_back_when_the_path_returns() {
    let _serial = serial();
    // Dead after 3 s here; the path stays black for 4 s, so the agent's
    // redial lands in the black hole and completes when it lifts.
    let w = World::start("faults-blackhole", &Settings { dial_timeout: "4s", ..FAST });
    let probe = Probe::start(&w);
    let (mut noticed, mut recovered) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        w.wait_active();
        std::thread::sleep(SETTLE);
        let silent_from = Instant::now();
        w.hub_relay.pause(true);
        let n = status_after(&w, "DISCONNECTED", silent_from, Duration::from_secs(10)).expect("never DISCONNECTED");
        noticed.push(n);
        std::thread::sleep(Duration::from_secs(4).saturating_sub(silent_from.elapsed()));
        let back = Instant::now();
        w.hub_relay.pause(false);
        recovered.push(probe.recovery(back, Duration::from_secs(15)).expect("no recovery"));
    }
    let samples = probe.finish("black hole");
    // Requests caught in the outage failed with a Status naming the hop.
    let failed: Vec<&Outcome> =
        samples.iter().map(|s| &s.outcome).filter(|o| matches!(o, Outcome::Failed(..))).collect();
    assert!(
        failed
            .iter()
            .any(|o| matches!(o, Outcome::Failed(503, m) if m.contains("tunnel") || m.contains("not connected"))),
        "no request caught in the outages failed with a 503 naming the tunnel; the failures: {failed:?}"
    );
    let n = report("dead tunnel noticed after the path went silent (dead-after 3s)", &noticed);
    let r = report("recovery after a black-holed path returns", &recovered);
    assert!(n < Duration::from_secs(5) && r < Duration::from_secs(5), "noticed {n:?}, recovered {r:?}");
}

#[test]
fn a_black_hole_is_noticed_within_fifteen_seconds_with_the_default_settings() {
    let _serial = serial();
    let w = World::start("faults-blackhole-default", &DEFAULTS);
    let probe = Probe::start(&w);
    std::thread::sleep(Duration::from_millis(300));
    let silent_from = Instant::now();
    w.hub_relay.pause(true);
    let n = status_after(&w, "DISCONNECTED", silent_from, Duration::from_secs(25)).expect("never DISCONNECTED");
    std::thread::sleep(Duration::from_secs(16).saturating_sub(silent_from.elapsed()));
    let back = Instant::now();
    w.hub_relay.pause(false);
    let r = probe.recovery(back, Duration::from_secs(20)).expect("no recovery");
    probe.finish("black hole, defaults");
    report("dead tunnel noticed (defaults: keepalive 5s, dead after 15s)", &[n]);
    report("recovery after a 16 s black hole returns (defaults)", &[r]);
    assert!(n < Duration::from_secs(17), "noticed after {n:?}");
    assert!(r < Duration::from_secs(5), "recovered after {r:?}");
}

#[test]
fn a_redial_into_a_silent_acceptor_is_abandoned_at_its_deadline() {
    let _serial = serial();
    let w = World::start("faults-silent", &FAST);
    let probe = Probe::start(&w);
    let mut waits = Vec::new();
    let mut recovered = Vec::new();
    for i in 0..3 {
        w.wait_active();
        std::thread::sleep(SETTLE);
        w.hub_relay.silent(true);
        w.hub_relay.cut();
        let gave_up = wait_for(10, || w.hub_relay.silent_waits().iter().flatten().count() > i);
        assert!(gave_up, "the agent never gave up on the silent acceptor:\n{}", w.agent_log());
        waits.push(w.hub_relay.silent_waits().into_iter().flatten().nth(i).unwrap());
        let back = Instant::now();
        w.hub_relay.silent(false);
        recovered.push(probe.recovery(back, Duration::from_secs(15)).expect("no recovery"));
    }
    probe.finish("silent acceptor");
    assert!(
        w.agent_log().contains("TLS handshake with") && w.agent_log().contains("timed out after 2s"),
        "{}",
        w.agent_log()
    );
    let m = report("a dial into a silent acceptor abandoned after (deadline 2s)", &waits);
    report("recovery once the hub answers again", &recovered);
    assert!(waits.iter().all(|d| *d < Duration::from_secs(3)), "{waits:?}");
    assert!(m >= Duration::from_millis(1900));
}

#[test]
fn a_frozen_agent_fails_requests_with_a_status_and_shows_disconnected() {
    let _serial = serial();
    let w = World::start("faults-sigstop", &FAST);
    let probe = Probe::start(&w);
    let (mut noticed, mut recovered) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        w.wait_active();
        std::thread::sleep(SETTLE);
        let at = Instant::now();
        w.signal(w.agent.0.id(), "-STOP");
        noticed.push(status_after(&w, "DISCONNECTED", at, Duration::from_secs(10)).expect("never DISCONNECTED"));
        std::thread::sleep(Duration::from_millis(500));
        let back = Instant::now();
        w.signal(w.agent.0.id(), "-CONT");
        recovered.push(probe.recovery(back, Duration::from_secs(15)).expect("no recovery"));
    }
    let samples = probe.finish("agent SIGSTOP");
    // Requests sent into the frozen tunnel failed at the deadline, saying so.
    let lost: Vec<&Sample> = samples
        .iter()
        .filter(|s| matches!(&s.outcome, Outcome::Failed(503, m) if m.contains("tunnel was lost")))
        .collect();
    assert!(!lost.is_empty(), "no request failed with the tunnel-lost Status");
    let longest = lost.iter().map(|s| s.end - s.start).max().unwrap();
    let n = report("frozen agent: DISCONNECTED after (dead-after 3s)", &noticed);
    report("recovery after SIGCONT", &recovered);
    println!("FIGURE frozen agent: the longest a request waited: {}", ms(longest));
    assert!(n < Duration::from_secs(5) && longest < Duration::from_secs(5), "{n:?} {longest:?}");
}

#[test]
fn a_frozen_api_server_gets_a_504_that_names_the_hop() {
    let _serial = serial();
    let w = World::start("faults-kube-frozen", &FAST);
    let probe = Probe::start(&w);
    let mut recovered = Vec::new();
    for _ in 0..3 {
        w.wait_active();
        std::thread::sleep(Duration::from_millis(300));
        let at = Instant::now();
        w.kube_relay.pause(true);
        // Requests wait at most the agent's deadlines (2 s), then fail.
        let timed_out = wait_for(10, || {
            probe.samples().iter().any(|s| s.start >= at && matches!(&s.outcome, Outcome::Failed(504, _)))
        });
        assert!(
            timed_out,
            "no 504 while the API server was frozen: {:?}\n{}",
            probe.samples().iter().filter(|s| s.start >= at).collect::<Vec<_>>(),
            w.agent_log()
        );
        std::thread::sleep(Duration::from_millis(500));
        let back = Instant::now();
        w.kube_relay.pause(false);
        recovered.push(probe.recovery(back, Duration::from_secs(15)).expect("no recovery"));
    }
    let samples = probe.finish("API server frozen");
    let slow: Vec<&Sample> = samples.iter().filter(|s| matches!(s.outcome, Outcome::Failed(504, _))).collect();
    for s in &slow {
        let Outcome::Failed(_, m) = &s.outcome else { unreachable!() };
        assert!(m.contains("uplink agent → API server") && m.contains("timed out after 2s"), "{m}");
    }
    let longest = slow.iter().map(|s| s.end - s.start).max().unwrap();
    println!("FIGURE frozen API server: 504 after at most {} (deadline 2s)", ms(longest));
    report("recovery after the API server thaws", &recovered);
    assert!(longest < Duration::from_secs(5));
}

#[test]
fn a_hub_restart_with_sigterm_refuses_nothing_and_costs_a_watch_one_reconnect() {
    let _serial = serial();
    let Some(kc) = support::kubectl::Kubectl::find("faults-restart") else { return };
    let mut w = World::start("faults-restart", &FAST);
    let watch = Watch::start(&w, &kc);
    let probe = Probe::start(&w);
    let mut gaps = Vec::new();
    for _ in 0..3 {
        w.wait_active();
        std::thread::sleep(Duration::from_millis(500));
        let before = watch.starts();
        // systemctl restart as a handover: the next process binds the same
        // port (SO_REUSEPORT), then the old one gets SIGTERM and drains.
        let next = w.start_hub();
        let at = Instant::now();
        let mut old = std::mem::replace(&mut w.hub, next);
        w.signal(old.child.id(), "-TERM");
        let exited = old.child.wait().unwrap();
        assert!(exited.success(), "old hub exited with {exited:?}:\n{}", old.log());
        w.wait_active();
        std::thread::sleep(Duration::from_millis(500));
        watch.assert_reconnects_since(before, &w);
        // The longest any request waited for its good answer across the restart.
        let samples = probe.samples();
        let gap = samples.iter().filter(|s| s.start >= at).map(|s| s.end - s.start).max().unwrap_or_default();
        gaps.push(gap);
    }
    drop(watch);
    let samples = probe.finish("hub restart");
    let refused: Vec<&Sample> = samples.iter().filter(|s| !matches!(s.outcome, Outcome::Ok)).collect();
    println!("FIGURE hub SIGTERM restart: {} requests, {} refused or failed", samples.len(), refused.len());
    report("hub restart: longest single request during the handover", &gaps);
    assert!(refused.is_empty(), "refused during the restart: {refused:?}");
}

/// `kubectl get pods -w` as bob, started again whenever it ends: each
/// start after the first is a reconnect.
struct Watch {
    starts: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    fn start(w: &World, kc: &support::kubectl::Kubectl) -> Watch {
        let yaml = uplink::hub::api::kubeconfig_yaml(&w.hub.url, Some(&w.hub.ca_pem), "edge-1", "bob", &w.bob_token);
        std::fs::write(&kc.kubeconfig, yaml).unwrap();
        let starts = Arc::new(Mutex::new(Vec::<Instant>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (starts.clone(), stop.clone());
        let watch_log = w.dir.join("watch.log");
        let cmd = kc.command(&["get", "pods", "-n", "default", "-w"]);
        let (program, args): (PathBuf, Vec<std::ffi::OsString>) =
            (cmd.get_program().into(), cmd.get_args().map(|a| a.to_owned()).collect());
        let envs: Vec<(std::ffi::OsString, std::ffi::OsString)> =
            cmd.get_envs().filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))).collect();
        let thread = std::thread::spawn(move || {
            while !st2.load(Ordering::SeqCst) {
                s2.lock().unwrap().push(Instant::now());
                let log = || std::fs::OpenOptions::new().create(true).append(true).open(&watch_log).unwrap();
                let mut child = Command::new(&program)
                    .args(&args)
                    .env_clear()
                    .envs(envs.iter().cloned())
                    .stdout(log())
                    .stderr(log())
                    .spawn()
                    .unwrap();
                while !st2.load(Ordering::SeqCst) && child.try_wait().unwrap().is_none() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        });
        // Let the first watch get going.
        std::thread::sleep(Duration::from_secs(1));
        Watch { starts, stop, thread: Some(thread) }
    }

    fn starts(&self) -> usize {
        self.starts.lock().unwrap().len()
    }

    /// At most one reconnect since `before` starts had happened.
    fn assert_reconnects_since(&self, before: usize, w: &World) {
        let reconnects = self.starts() - before;
        println!("the watch reconnected {reconnects} time(s)");
        assert!(
            reconnects <= 1,
            "the watch reconnected {reconnects} times:\n{}",
            std::fs::read_to_string(w.dir.join("watch.log")).unwrap_or_default()
        );
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A fleet that lost its hub at once, in virtual time: 1,000 agents with
/// the agent's own backoff (seeded), a hub that is down for `down` and
/// then accepts every dial. Returns when each agent got back in.
fn fleet_returns(n: u64, down: Duration) -> Vec<Duration> {
    use uplink::agent::tunnel::{BACKOFF_BASE, BACKOFF_CAP, Backoff};
    (0..n)
        .map(|i| {
            let mut b =
                Backoff::with_seed(BACKOFF_BASE, BACKOFF_CAP, 0x9e37_79b9_7f4a_7c15 ^ i.wrapping_mul(0x1000_0001));
            let mut t = b.after_session();
            while t < down {
                // A refused dial costs about nothing; then the backoff.
                t += b.next_delay();
            }
            t
        })
        .collect()
}

#[test]
fn a_thousand_agents_losing_the_hub_come_back_spread_out() {
    for down_ms in [0u64, 1000, 3000, 10_000] {
        let down = Duration::from_millis(down_ms);
        let back = fleet_returns(1000, down);
        // Accepts per 100 ms once the hub is back.
        let mut buckets = std::collections::BTreeMap::<u128, usize>::new();
        for t in &back {
            *buckets.entry(t.as_millis() / 100).or_default() += 1;
        }
        let peak = *buckets.values().max().unwrap();
        let last = back.iter().max().unwrap();
        println!(
            "FIGURE 1,000 agents, hub down {down_ms} ms: peak {peak} accepts per 100 ms ({} per second), all back after {}",
            peak * 10,
            ms(*last)
        );
        // Without jitter all 1,000 would land in one bucket.
        assert!(peak <= 450, "hub down {down_ms} ms: {peak} dials in one 100 ms window");
        assert!(*last < down + Duration::from_secs(31));
    }
}

#[test]
fn the_hub_serves_on_the_socket_systemd_passes() {
    // systemd-socket-activate does what uplink-hub.socket does: it listens,
    // and on the first connection starts the hub with the socket as fd 3
    // (LISTEN_FDS=1, LISTEN_PID). The hub must use it, not --listen.
    let Ok(activate) = which("systemd-socket-activate") else {
        eprintln!("\n!!!!! SKIPPING socket activation: systemd-socket-activate not found !!!!!\n");
        return;
    };
    let dir = temp_dir("faults-socket");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(activate)
        .args(["-l", &addr, env!("CARGO_BIN_EXE_uplink-hub"), "serve", "--listen", "127.0.0.1:1"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--public-url", &format!("https://{addr}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("hub.log")).unwrap())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    // The first connection starts the hub; it is served once the hub is up.
    let healthy = wait_for(20, || {
        let Ok(ca) = std::fs::read_to_string(dir.join("data/ca.pem")) else {
            let _ = std::net::TcpStream::connect(&addr);
            return false;
        };
        let c = Client::new(&format!("https://{addr}"), Some(&ca), None).unwrap();
        c.get("/healthz").is_ok_and(|r| r.status == 200)
    });
    let log = std::fs::read_to_string(dir.join("hub.log")).unwrap_or_default();
    assert!(healthy, "the hub did not serve on the passed socket:\n{log}");
    assert!(log.contains("listening on the socket systemd passed"), "{log}");
    // SIGTERM: the hub stops at once (nothing to drain) and exits cleanly.
    Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap();
    assert_eq!(hub_support::wait_exit(&mut child.0, Duration::from_secs(10)), Some(0));
}

fn which(name: &str) -> Result<PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()).ok_or(())
}

/// Dials the hub's `/v1/tunnel` as an agent does (TCP, TLS, upgrade,
/// Hello/Welcome); the session once connected.
async fn sim_dial(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    credential: &str,
) -> Result<(uplink::driver::Session, impl smol::io::AsyncRead + smol::io::AsyncWrite + Unpin), String> {
    use smol::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = smol::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let mut io = futures_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(|e| e.to_string())?;
    let req = format!(
        "GET /v1/tunnel HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: uplink/1\r\nAuthorization: Bearer {credential}\r\n\r\n"
    );
    io.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if io.read(&mut b).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed".into());
        }
        head.push(b[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err(String::from_utf8_lossy(&head).into_owned());
    }
    let mux = uplink::proto::Mux::agent(uplink::proto::Config::default(), Default::default(), Instant::now());
    Ok((uplink::driver::Session::new(mux), io))
}

#[test]
fn a_fleet_dialling_a_restarted_hub_arrives_spread_out() {
    // Simulated agents (the agent's own backoff, seeded per agent; the
    // real TCP, TLS and upgrade) hold tunnels to a real hub, which is
    // killed and started again after a pause. When each got its tunnel
    // back is recorded: the hub's accepts per 100 ms.
    let _serial = serial();
    let n: u64 = std::env::var("UPLINK_FLEET").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let down = Duration::from_secs(2);
    let dir = temp_dir("faults-fleet");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let args = ["--listen".to_string(), format!("127.0.0.1:{port}")];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut hub = HubProc::start_with(&dir, &args);
    let reg = hub.admin().post_json("/api/v1/clusters", &json!({ "name": "fleet" })).unwrap().json();
    let act = hub
        .client(None)
        .post_json(
            "/v1/activate",
            &json!({
                "activation_id": reg["activation"]["activation_id"],
                "activation_code": reg["activation"]["activation_code"],
            }),
        )
        .unwrap()
        .json();
    let credential = act["credential"].as_str().unwrap().to_string();
    let tls = uplink::tls::client_config(&uplink::tls::Trust::CaPem(hub.ca_pem.clone()), None, &[b"http/1.1"]).unwrap();
    let addr = hub.addr;
    // Each agent's connect times, in order.
    // Each agent's tunnels: when the dial that made it began (its arrival
    // at the hub) and when the handshake completed.
    let connects = Arc::new(Mutex::new(vec![Vec::<(Instant, Instant)>::new(); n as usize]));
    let stop = Arc::new(AtomicBool::new(false));
    let fleet = {
        let (connects, stop) = (connects.clone(), stop.clone());
        std::thread::spawn(move || {
            let ex = smol::LocalExecutor::new();
            smol::block_on(ex.run(async {
                use uplink::agent::tunnel::{BACKOFF_BASE, BACKOFF_CAP, Backoff};
                let tasks: Vec<_> = (0..n)
                    .map(|i| {
                        let (tls, credential, connects) = (tls.clone(), credential.clone(), connects.clone());
                        ex.spawn(async move {
                            let mut backoff =
                                Backoff::with_seed(BACKOFF_BASE, BACKOFF_CAP, i.wrapping_mul(0x9e37_79b9));
                            loop {
                                let dialled = Instant::now();
                                let wait = match sim_dial(addr, tls.clone(), &credential).await {
                                    Ok((session, io)) => {
                                        let s2 = session.clone();
                                        let record = async {
                                            if session.connected().await.is_ok() {
                                                connects.lock().unwrap()[i as usize].push((dialled, Instant::now()));
                                            }
                                            std::future::pending::<()>().await
                                        };
                                        smol::future::or(
                                            async {
                                                s2.run(io).await;
                                            },
                                            record,
                                        )
                                        .await;
                                        backoff.after_session()
                                    }
                                    Err(_) => backoff.next_delay(),
                                };
                                smol::Timer::after(wait).await;
                            }
                        })
                    })
                    .collect();
                while !stop.load(Ordering::SeqCst) {
                    smol::Timer::after(Duration::from_millis(50)).await;
                }
                drop(tasks);
            }));
        })
    };
    let all_connected = |k: usize| connects.lock().unwrap().iter().all(|c| c.len() >= k);
    assert!(wait_for(120, || all_connected(1)), "the fleet never connected");
    let killed = Instant::now();
    hub.kill9();
    std::thread::sleep(down);
    hub = HubProc::start_with(&dir, &args);
    let back_at = Instant::now();
    let done = wait_for(90, || all_connected(2));
    stop.store(true, Ordering::SeqCst);
    fleet.join().unwrap();
    assert!(done, "not every agent came back");
    let second = connects.lock().unwrap().iter().map(|c| c[1]).collect::<Vec<_>>();
    let arrived: Vec<Duration> = second.iter().map(|(d, _)| d.saturating_duration_since(back_at)).collect();
    let connected: Vec<Duration> = second.iter().map(|(_, c)| c.saturating_duration_since(back_at)).collect();
    let peak = |times: &[Duration]| {
        let mut buckets = std::collections::BTreeMap::<u128, usize>::new();
        for t in times {
            *buckets.entry(t.as_millis() / 100).or_default() += 1;
        }
        *buckets.values().max().unwrap()
    };
    let (arrivals_peak, tunnels_peak) = (peak(&arrived), peak(&connected));
    println!(
        "FIGURE {n} dialling agents, hub killed and back after {}: peak {arrivals_peak} successful dials begun per 100 ms \
         ({tunnels_peak} tunnels completed per 100 ms), half back after {}, all after {}",
        ms(back_at - killed),
        ms(median(connected.clone())),
        ms(*connected.iter().max().unwrap())
    );
    // Without jitter, every agent would dial within the same instant.
    assert!(arrivals_peak as u64 <= n / 3, "{arrivals_peak} of {n} agents dialled within one 100 ms window");
    drop(hub);
}

#[test]
fn systemctl_restart_with_the_socket_unit_refuses_nothing() {
    // `systemctl restart uplink-hub` with uplink-hub.socket: systemd holds
    // the socket, SIGTERMs the running hub, waits for it to exit and starts
    // the next on the same socket. Connections made meanwhile wait in the
    // socket's queue: none is refused, some wait out the old one's drain.
    let _serial = serial();
    let Some(kc) = support::kubectl::Kubectl::find("faults-systemctl") else { return };
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // Inheritable, as systemd passes it (the shell moves it to fd 3).
    rustix::io::fcntl_setfd(&socket, rustix::io::FdFlags::empty()).unwrap();
    // The default dial deadline (10 s) outlasts the drain (5 s): an agent's
    // redial into the queue is answered by the next process.
    let w = World::start_on("faults-systemctl", &Settings { dial_timeout: "10s", ..FAST }, Some(socket));
    let mut w = w;
    assert!(w.hub.log().contains("listening on the socket systemd passed"), "{}", w.hub.log());
    let watch = Watch::start(&w, &kc);
    let probe = Probe::start(&w);
    let mut waits = Vec::new();
    for _ in 0..3 {
        w.wait_active();
        std::thread::sleep(Duration::from_millis(500));
        let before = watch.starts();
        let at = Instant::now();
        w.signal(w.hub.child.id(), "-TERM");
        let exited = w.hub.child.wait().unwrap();
        assert!(exited.success(), "old hub exited with {exited:?}:\n{}", w.hub.log());
        w.hub = w.start_hub();
        w.wait_active();
        std::thread::sleep(Duration::from_millis(500));
        watch.assert_reconnects_since(before, &w);
        let longest = probe.samples().iter().filter(|s| s.end >= at).map(|s| s.end - s.start).max().unwrap();
        waits.push(longest);
    }
    drop(watch);
    let samples = probe.finish("systemctl restart");
    let refused: Vec<&Sample> = samples.iter().filter(|s| !matches!(s.outcome, Outcome::Ok)).collect();
    println!("FIGURE systemctl restart (socket unit): {} requests, {} refused or failed", samples.len(), refused.len());
    report("systemctl restart: the longest a request waited", &waits);
    assert!(refused.is_empty(), "refused during the restart: {refused:?}");
}

/// The relay's black hole is exact: bytes sent after `pause(true)` has
/// returned do not cross until `pause(false)`, even when a pump was
/// already inside a read. The tests above (and `fleet`'s slow cluster)
/// count on it; a pump that forwarded what its in-flight read brought
/// once let a paused cluster answer.
#[test]
fn the_relay_holds_what_is_sent_after_a_pause() {
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = echo.accept().unwrap();
        let mut buf = [0u8; 64];
        while let Ok(n @ 1..) = s.read(&mut buf) {
            if s.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    });
    let relay = Relay::start(target);
    let mut c = std::net::TcpStream::connect(relay.addr).unwrap();
    c.set_nodelay(true).unwrap();
    let mut one = [0u8; 1];
    for round in 0..20u8 {
        relay.pause(true);
        c.write_all(&[round]).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(60))).unwrap();
        let leaked = c.read(&mut one);
        assert!(leaked.is_err(), "round {round}: a byte crossed the paused relay: {leaked:?}");
        relay.pause(false);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.read_exact(&mut one).unwrap();
        assert_eq!(one[0], round, "round {round}");
    }
}
