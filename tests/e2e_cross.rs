//! The agent as shipped, on another architecture: a cross-built static
//! `uplink` run through a launcher (`qemu-aarch64-static`) goes once through
//! the whole lifecycle against a real `uplink-hub serve` (this build) and the
//! stand-in API server:
//!
//! ```text
//!  uplink-hub cluster register ──► activation file + manifest
//!  stand-in ◄── the manifest's RBAC (not a fixture): the agent's service
//!               account has exactly what the hub rendered
//!  qemu-aarch64-static uplink run ──► POST /v1/activate, tunnel ──► ACTIVE
//!               (arch, Kubernetes version, node count as the agent saw them)
//!  alice ── HTTPS and kubectl ──► hub ──► tunnel ──► agent ──► stand-in
//!               (seen as the service account impersonating alice)
//!  uplink-hub cluster deregister ──► the agent exits 4
//! ```
//!
//! ```sh
//! UPLINK_AGENT_BIN=target/aarch64-unknown-linux-musl/release/uplink \
//! UPLINK_AGENT_RUNNER=qemu-aarch64-static UPLINK_AGENT_ARCH=aarch64 \
//!     cargo test --test e2e_cross -- --nocapture
//! ```
//!
//! `UPLINK_AGENT_BIN` is the agent to run (without it the test says loudly
//! that it skips; `cross/build.sh` sets it after each build),
//! `UPLINK_AGENT_RUNNER` the program that runs it (none: run it directly),
//! `UPLINK_AGENT_ARCH` the architecture the hub must then report for the
//! cluster. Emulation is slow, so every wait is generous; the phases'
//! times are printed as `MEASURE` lines.

mod hub_support;
mod support;

use hub_support::{
    HubProc, KillOnDrop, hub_cli, ok, spawn_agent_with, temp_dir, wait_exit, wait_for, write_kube_credentials,
};
use serde_json::json;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use support::kube::{AGENT_USER, Config, StandIn};
use support::kubectl::{Kubectl, stderr};

const ARTICLE_RBAC: &str = include_str!("fixtures/kube/eks-console-restricted-access.yaml");
/// Under emulation a TLS handshake alone can take a second or more.
const SLOW: Duration = Duration::from_secs(180);

/// How to start the agent under test.
struct Launcher {
    bin: String,
    runner: Option<String>,
    arch: Option<String>,
}

impl Launcher {
    fn from_env() -> Option<Launcher> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let Some(bin) = var("UPLINK_AGENT_BIN") else {
            eprintln!(
                "\n!!!!! SKIPPING e2e_cross: UPLINK_AGENT_BIN is not set (cross/build.sh sets it to each \
                 cross-built agent, with UPLINK_AGENT_RUNNER=qemu-aarch64-static for aarch64) !!!!!\n"
            );
            return None;
        };
        assert!(Path::new(&bin).is_file(), "UPLINK_AGENT_BIN={bin} is not a file");
        Some(Launcher { bin, runner: var("UPLINK_AGENT_RUNNER"), arch: var("UPLINK_AGENT_ARCH") })
    }

    fn command(&self) -> Command {
        match &self.runner {
            Some(r) => {
                let mut c = Command::new(r);
                c.arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        }
    }

    fn spawn_agent(&self, dir: &Path, k: &StandIn, log: &Path) -> Child {
        let mut agent = self.command();
        agent.env("UPLINK_LOG", "debug");
        let (activation, state) = (dir.join("activation.json"), dir.join("state"));
        let flags = ["--activation".as_ref(), activation.as_os_str(), "--state".as_ref(), state.as_os_str()];
        spawn_agent_with(agent, &flags, &k.url(), dir, log)
    }
}

fn measure(what: &str, since: Instant) -> Instant {
    eprintln!("MEASURE e2e_cross {what}: {:.1} s", since.elapsed().as_secs_f64());
    Instant::now()
}

#[test]
fn cross_built_agent_activates_proxies_and_stops_when_deregistered() {
    let Some(launcher) = Launcher::from_env() else { return };
    let start = Instant::now();
    let dir = temp_dir("e2e-cross");
    let log = dir.join("agent.log");
    let agent_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let k = StandIn::start(Config::default());
    k.load_rbac_yaml(ARTICLE_RBAC).unwrap();
    write_kube_credentials(&dir, &k.agent_token(), &k.ca_pem());

    let hub = HubProc::start_on_free_port(&dir);
    let admin_token = hub.admin_token.clone().unwrap();
    let admin = hub.admin();
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    ok(&hub_cli(
        &hub,
        &admin_token,
        &["cluster", "register", "edge-arm", "--user", "alice", "--out-dir", out_dir.to_str().unwrap()],
    ));
    std::fs::copy(out_dir.join("uplink-edge-arm-activation.json"), dir.join("activation.json")).unwrap();
    // The cluster's RBAC is what the hub rendered for it, nothing more.
    let manifest = std::fs::read_to_string(out_dir.join("uplink-edge-arm.yaml")).unwrap();
    k.load_rbac_yaml(&manifest).unwrap();
    let t = measure("setup (stand-in, hub, register)", start);

    let mut agent = KillOnDrop(launcher.spawn_agent(&dir, &k, &log));
    let status = || admin.get("/api/v1/clusters/edge-arm").unwrap().json();
    assert!(
        wait_for(SLOW.as_secs(), || status()["status"] == "ACTIVE"),
        "not ACTIVE within {SLOW:?}: {}\nagent log:\n{}\nhub log:\n{}",
        status(),
        agent_log(),
        hub.log()
    );
    let t = measure("activation until ACTIVE", t);
    let shown = status();
    assert!(shown["kube_version"].as_str().unwrap_or("").starts_with("v1.32"), "{shown}");
    // The manifest's `list nodes` rule lets the agent count them.
    assert!(shown["node_count"].as_u64().unwrap_or(0) > 0, "no node count: {shown}\n{}", agent_log());
    if let Some(arch) = &launcher.arch {
        assert_eq!(shown["arch"].as_str(), Some(arch.as_str()), "{shown}");
    }

    // Alice, granted, asks through the hub: over plain HTTPS, then kubectl.
    let r = admin.post_json("/api/v1/users", &json!({ "name": "alice" })).unwrap();
    let alice = r.json()["token"].as_str().unwrap().to_string();
    admin.post_json("/api/v1/grants", &json!({ "user": "alice", "clusters": "edge-arm" })).unwrap();
    let pods = hub.client(Some(&alice)).get("/k8s/clusters/edge-arm/api/v1/namespaces/default/pods").unwrap();
    assert_eq!(pods.status, 200, "{}\nagent log:\n{}", pods.text(), agent_log());
    assert!(pods.text().contains("web-7d4b9c8f6d-k2x9p"), "{}", pods.text());
    if let Some(kc) = Kubectl::find("e2e-cross-alice") {
        ok(&hub_cli(&hub, &alice, &["kubeconfig", "--cluster", "edge-arm", "--out", kc.path().to_str().unwrap()]));
        let out = ok(&kc.run(&["get", "pods", "-n", "default"]));
        assert!(out.contains("web-7d4b9c8f6d-k2x9p"), "{out}");
        let refused = kc.run(&["get", "pods", "-n", "kube-system"]);
        assert!(stderr(&refused).contains(r#"User "alice" cannot list resource "pods""#), "{}", stderr(&refused));
    }
    let recs = k.requests();
    let as_alice: Vec<_> = recs.iter().filter(|r| r.impersonated_user.as_deref() == Some("alice")).collect();
    assert!(!as_alice.is_empty(), "no request reached the cluster as alice: {recs:#?}");
    for r in &as_alice {
        assert_eq!(r.user.as_deref(), Some(AGENT_USER), "{r:?}");
        assert_eq!(r.effective_user.as_deref(), Some("alice"), "{r:?}");
    }
    let t = measure("requests as alice", t);

    ok(&hub_cli(&hub, &admin_token, &["cluster", "deregister", "edge-arm"]));
    assert_eq!(wait_exit(&mut agent.0, SLOW), Some(4), "agent log:\n{}", agent_log());
    measure("deregistration until exit 4", t);
    measure("total", start);
    std::fs::remove_dir_all(&dir).ok();
}
