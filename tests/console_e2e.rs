//! The web console in a real browser: headless Chromium (Debian's
//! `/usr/bin/chromium`) driven by Playwright (`tests/console/e2e.mjs`)
//! against a real `uplink-hub serve`, a real `uplink run` agent and the
//! stand-in API server with the article's RBAC.
//!
//! ```text
//!  this test ── starts ──► StandIn (article RBAC, alice may read logs in default)
//!            ── starts ──► uplink-hub serve ◄── uplink run (agent, edge-1)
//!            ── runs ────► node tests/console/e2e.mjs ── Chromium ──► hub
//!                            │ stdout "@@ append-log NS POD TEXT" / "@@ kill-agent"
//!                            ▼
//!            acts on the stand-in or the agent, answers "ok" on its stdin
//! ```
//!
//! Skips (loudly) when node, Chromium or `tests/console/node_modules` are
//! missing, unless `UPLINK_REQUIRE_BROWSER=1` (as `.ci/run` and
//! `tests/console/run.sh` set it). Screenshots go to
//! `target/console-screenshots/`.
#![cfg(feature = "hub")]

mod hub_support;
mod support;

use hub_support::{HubProc, temp_dir, wait_for};
use serde_json::json;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::kube::{Config, StandIn};

const ARTICLE_RBAC: &str = include_str!("fixtures/kube/eks-console-restricted-access.yaml");
const AGENT_IMPERSONATION: &str = include_str!("fixtures/kube/agent-impersonation.yaml");

/// The article grants alice no `pods/log`; an operator who wants her to
/// read logs in the console adds this (and lets the agent count nodes).
const ALICE_LOGS: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {namespace: default, name: console-logs}
rules:
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {namespace: default, name: console-logs}
subjects:
- {kind: User, name: alice, apiGroup: rbac.authorization.k8s.io}
roleRef: {kind: Role, name: console-logs, apiGroup: rbac.authorization.k8s.io}
---
# The agent counts nodes for the hub's cluster list.
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: uplink-agent-nodes}
rules:
- apiGroups: [""]
  resources: [nodes]
  verbs: [list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: uplink-agent-nodes}
subjects:
- {kind: ServiceAccount, name: uplink-agent, namespace: uplink}
roleRef: {kind: ClusterRole, name: uplink-agent-nodes, apiGroup: rbac.authorization.k8s.io}
"#;

/// The whole browser scenario may take this long on a busy machine.
const BUDGET: Duration = Duration::from_secs(600);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chromium() -> PathBuf {
    std::env::var_os("UPLINK_CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// Why the browser test cannot run here, if it cannot.
fn missing_tools() -> Option<String> {
    if Command::new("node").arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
        return Some("node is not installed (apt-get install -y nodejs npm)".into());
    }
    if !chromium().exists() {
        return Some(format!("{} is missing (apt-get install -y chromium)", chromium().display()));
    }
    if !repo().join("tests/console/node_modules/playwright-core").is_dir() {
        return Some("tests/console/node_modules is missing (cd tests/console && npm ci)".into());
    }
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `uplink run` against the stand-in.
struct AgentProc {
    child: Child,
    log: PathBuf,
}

impl AgentProc {
    fn start(dir: &Path, k: &StandIn, activation: &str) -> AgentProc {
        let (act, token, ca, log) =
            (dir.join("activation.json"), dir.join("kube-token"), dir.join("kube-ca.pem"), dir.join("agent.log"));
        std::fs::write(&act, activation).unwrap();
        std::fs::write(&token, k.agent_token()).unwrap();
        std::fs::write(&ca, k.ca_pem()).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_uplink"))
            .arg("run")
            .arg("--activation")
            .arg(&act)
            .arg("--state")
            .arg(dir.join("state/state"))
            .args(["--kube-url", &k.url()])
            .arg("--kube-token-file")
            .arg(&token)
            .arg("--kube-ca")
            .arg(&ca)
            .args(["--health-addr", &format!("127.0.0.1:{}", free_port())])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn uplink");
        AgentProc { child, log }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn console_in_headless_chromium() {
    if let Some(why) = missing_tools() {
        if std::env::var("UPLINK_REQUIRE_BROWSER").as_deref() == Ok("1") {
            panic!("the console browser test cannot run: {why}");
        }
        eprintln!(
            "\n*** SKIPPED console_in_headless_chromium: {why}. Set UPLINK_REQUIRE_BROWSER=1 to fail instead. ***\n"
        );
        return;
    }
    let started = Instant::now();

    // A syntax error in a module would only show as a page that never
    // loads; say which file and line instead.
    for entry in std::fs::read_dir(repo().join("src/hub/console")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "js") {
            let out = Command::new("node")
                .args(["--input-type=module", "--check"])
                .stdin(std::fs::File::open(&path).unwrap())
                .output()
                .unwrap();
            assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        }
    }

    // The cluster, with the article's RBAC.
    let k = StandIn::start(Config::default());
    for y in [ARTICLE_RBAC, AGENT_IMPERSONATION, ALICE_LOGS] {
        k.load_rbac_yaml(y).expect("fixture yaml");
    }
    k.append_log("default", "web-7d4b9c8f6d-k2x9p", "console-e2e: first line before the browser came");

    // The hub, alice, and edge-1 registered for her.
    let dir = temp_dir("console");
    let hub = HubProc::start(&dir);
    let admin = hub.admin();
    let r = admin.post_json("/api/v1/users", &json!({ "name": "alice" })).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let alice_token = r.json()["token"].as_str().unwrap().to_string();
    let r = admin.post_json("/api/v1/grants", &json!({ "user": "alice", "clusters": "edge-*" })).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let r = admin.post_json("/api/v1/clusters", &json!({ "name": "edge-1", "users": ["alice"] })).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let activation = serde_json::to_string_pretty(&r.json()["activation"]).unwrap();

    // The agent dials in.
    let mut agent = AgentProc::start(&dir, &k, &activation);
    let active =
        wait_for(60, || admin.get("/api/v1/clusters/edge-1").map(|r| r.json()["status"] == "ACTIVE").unwrap_or(false));
    assert!(
        active,
        "edge-1 never became ACTIVE; agent log:\n{}",
        std::fs::read_to_string(&agent.log).unwrap_or_default()
    );
    eprintln!("console e2e: hub, agent and stand-in up in {:?}", started.elapsed());

    // The browser.
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let ca_path = dir.join("data/ca.pem");
    let mut node = Command::new("node")
        .arg(repo().join("tests/console/e2e.mjs"))
        .current_dir(repo().join("tests/console"))
        .env("HUB_URL", &hub.url)
        .env("HUB_CA", &ca_path)
        .env("ADMIN_TOKEN", hub.admin_token.as_deref().unwrap())
        .env("ALICE_TOKEN", &alice_token)
        .env("CLUSTER", "edge-1")
        .env("SCREENSHOTS", &shots)
        .env("CHROMIUM", chromium())
        .env("BROWSER_DATA", dir.join("chromium-profile"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn node");
    let mut to_node = node.stdin.take().unwrap();
    let from_node = BufReader::new(node.stdout.take().unwrap());

    // A watchdog: a hung browser must not hang the test run.
    let pid = node.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(BUDGET).is_err() {
            eprintln!("console e2e: over {BUDGET:?}, killing the browser run");
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    });

    // What the page asks of the world.
    for line in from_node.lines() {
        let Ok(line) = line else { break };
        let Some(cmd) = line.strip_prefix("@@ ") else {
            eprintln!("  {line}");
            continue;
        };
        let answer = match cmd.split_once(' ').unwrap_or((cmd, "")) {
            ("append-log", rest) => {
                let mut it = rest.splitn(3, ' ');
                let (ns, pod, text) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap_or(""));
                k.append_log(ns, pod, text);
                "ok".to_string()
            }
            ("kill-agent", _) => {
                agent.kill();
                "ok".to_string()
            }
            (other, _) => format!("unknown command {other}"),
        };
        if writeln!(to_node, "{answer}").is_err() {
            break;
        }
    }
    let status = node.wait().unwrap();
    let _ = done_tx.send(());
    let _ = watchdog.join();
    eprintln!("console e2e: finished in {:?}; screenshots in {}", started.elapsed(), shots.display());
    assert!(
        status.success(),
        "the browser scenario failed ({status}); hub log:\n{}\nagent log:\n{}",
        tail(&hub.log(), 40),
        tail(&std::fs::read_to_string(&agent.log).unwrap_or_default(), 40)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Signing in with the organisation's identity provider, in the browser:
/// the test provider (`tests/support/idp.rs`) auto-approves ann, whose
/// IdP group `dev` is granted `edge-*`; the scenario
/// (`tests/console/oidc.mjs`) clicks "Sign in with your organisation"
/// and ends on the clusters page as `oidc:ann@example.com`.
#[test]
fn console_oidc_sign_in_in_headless_chromium() {
    use support::idp::{CLIENT_ID, Idp, Person};
    if let Some(why) = missing_tools() {
        if std::env::var("UPLINK_REQUIRE_BROWSER").as_deref() == Ok("1") {
            panic!("the console browser test cannot run: {why}");
        }
        eprintln!("\n*** SKIPPED console_oidc_sign_in_in_headless_chromium: {why}. ***\n");
        return;
    }
    let idp = Idp::start(Person { sub: "42".into(), email: "ann@example.com".into(), groups: vec!["dev".into()] });
    let dir = temp_dir("console-oidc");
    let idp_ca = dir.join("idp-ca.pem");
    std::fs::write(&idp_ca, &idp.ca_pem).unwrap();
    let port = free_port();
    let hub = HubProc::start_with(
        &dir,
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--public-url",
            &format!("https://127.0.0.1:{port}"),
            "--oidc-issuer",
            &idp.issuer(),
            "--oidc-client-id",
            CLIENT_ID,
            "--oidc-ca",
            idp_ca.to_str().unwrap(),
            "--oidc-user-prefix",
            "oidc:",
            "--oidc-group-prefix",
            "oidc:",
        ],
    );
    let admin = hub.admin();
    for name in ["edge-dev", "prod-1"] {
        assert_eq!(admin.post_json("/api/v1/clusters", &json!({ "name": name })).unwrap().status, 201);
    }
    let r = admin.post_json("/api/v1/grants", &json!({ "group": "oidc:dev", "clusters": "edge-*" })).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());

    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("console-screenshots");
    let mut node = Command::new("node")
        .arg(repo().join("tests/console/oidc.mjs"))
        .current_dir(repo().join("tests/console"))
        .env("HUB_URL", &hub.url)
        .env("PERSON", "oidc:ann@example.com")
        .env("ALLOWED", "edge-dev")
        .env("HIDDEN", "prod-1")
        .env("SCREENSHOTS", &shots)
        .env("CHROMIUM", chromium())
        .env("BROWSER_DATA", dir.join("chromium-profile"))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn node");
    let pid = node.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(BUDGET).is_err() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    });
    let status = node.wait().unwrap();
    let _ = done_tx.send(());
    let _ = watchdog.join();
    assert!(status.success(), "the OIDC browser scenario failed ({status}); hub log:\n{}", tail(&hub.log(), 40));
    assert!(hub.log().contains("oidc console sign-in user=\"oidc:ann@example.com\""), "{}", hub.log());
    let _ = std::fs::remove_dir_all(&dir);
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
