//! The seed's whole story with real processes: `uplink-hub serve`, the
//! real agent (`uplink run`), the stand-in API server, and real kubectl
//! with kubeconfigs the hub's CLI wrote.
#![cfg(feature = "hub")]

mod hub_support;
mod support;

use hub_support::{HubProc, fails, hub_cli, ok, temp_dir, wait_exit, wait_for, write_kube_credentials};
use serde_json::json;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;
use support::kube::{Config, StandIn};
use support::kubectl::{Kubectl, forwarded_port, kill, lines, stderr, stdout, wait_line};

const ARTICLE_RBAC: &str = include_str!("fixtures/kube/eks-console-restricted-access.yaml");
const AGENT_IMPERSONATION: &str = include_str!("fixtures/kube/agent-impersonation.yaml");
const DEBUG_ACCESS: &str = include_str!("fixtures/kube/debug-access.yaml");
const PATIENCE: Duration = Duration::from_secs(20);

fn spawn_agent(dir: &Path, k: &StandIn, n: usize) -> Child {
    let (activation, state) = (dir.join("activation.json"), dir.join("state"));
    let flags = ["--activation".as_ref(), activation.as_os_str(), "--state".as_ref(), state.as_os_str()];
    hub_support::spawn_agent(&flags, &k.url(), dir, &dir.join(format!("agent-{n}.log")))
}

#[test]
fn register_activate_use_with_kubectl_disconnect_and_deregister() {
    let Some(alice_kc) = Kubectl::find("e2e-hub-alice") else { return };
    let bob_kc = Kubectl::find("e2e-hub-bob").unwrap();
    let carol_kc = Kubectl::find("e2e-hub-carol").unwrap();
    let dir = temp_dir("e2e");
    let k = StandIn::start(Config::default());
    for y in [ARTICLE_RBAC, AGENT_IMPERSONATION, DEBUG_ACCESS] {
        k.load_rbac_yaml(y).unwrap();
    }
    write_kube_credentials(&dir, &k.agent_token(), &k.ca_pem());

    let hub = HubProc::start_on_free_port(&dir);
    let admin_token = hub.admin_token.clone().unwrap();
    let admin = hub.admin();

    // Register with the CLI; install the rendered systemd activation file.
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let reg = ok(&hub_cli(
        &hub,
        &admin_token,
        &["cluster", "register", "edge-1", "--user", "alice", "--user", "bob", "--out-dir", out_dir.to_str().unwrap()],
    ));
    assert!(reg.contains("PENDING") && reg.contains("kubectl apply -f"), "{reg}");
    std::fs::copy(out_dir.join("uplink-edge-1-activation.json"), dir.join("activation.json")).unwrap();
    let manifest = std::fs::read_to_string(out_dir.join("uplink-edge-1.yaml")).unwrap();
    assert!(manifest.contains("uplink-activation") && manifest.contains("\"alice\""));

    let mut agent = spawn_agent(&dir, &k, 0);
    assert!(
        wait_for(20, || admin.get("/api/v1/clusters/edge-1").unwrap().json()["status"] == "ACTIVE"),
        "agent log:\n{}\nhub log:\n{}",
        std::fs::read_to_string(dir.join("agent-0.log")).unwrap_or_default(),
        hub.log()
    );
    let shown = admin.get("/api/v1/clusters/edge-1").unwrap().json();
    assert!(shown["kube_version"].as_str().unwrap_or("").starts_with("v1.32"), "{shown}");
    let list = ok(&hub_cli(&hub, &admin_token, &["cluster", "list"]));
    assert!(list.contains("edge-1") && list.contains("ACTIVE"), "{list}");

    // People, grants and kubeconfigs written by the CLI.
    let token_of = |name: &str| {
        let r = admin.post_json("/api/v1/users", &json!({ "name": name })).unwrap();
        r.json()["token"].as_str().unwrap().to_string()
    };
    let (alice, bob, carol) = (token_of("alice"), token_of("bob"), token_of("carol"));
    admin.post_json("/api/v1/grants", &json!({ "user": "alice", "clusters": "edge-*" })).unwrap();
    admin.post_json("/api/v1/grants", &json!({ "user": "bob", "clusters": "edge-1" })).unwrap();
    for (kc, token) in [(&alice_kc, &alice), (&bob_kc, &bob)] {
        ok(&hub_cli(&hub, token, &["kubeconfig", "--cluster", "edge-1", "--out", kc.path().to_str().unwrap()]));
    }
    // Carol has no grant, so the hub gives her no kubeconfig; she writes one.
    fails(&hub_cli(&hub, &carol, &["kubeconfig", "--cluster", "edge-1"]), "no cluster edge-1 you may reach");
    let yaml = uplink::hub::api::kubeconfig_yaml(&hub.url, Some(&hub.ca_pem), "edge-1", "carol", &carol);
    std::fs::write(carol_kc.path(), yaml).unwrap();

    // Alice: namespaces, nodes, default workloads; forbidden in kube-system.
    let ns = ok(&alice_kc.run(&["get", "namespaces"]));
    assert!(ns.contains("default") && ns.contains("kube-system"), "{ns}");
    let nodes = ok(&alice_kc.run(&["get", "nodes"]));
    assert!(nodes.contains("edge-1") && nodes.contains("Ready"), "{nodes}");
    let pods = ok(&alice_kc.run(&["get", "pods", "-n", "default"]));
    assert!(pods.contains("web-7d4b9c8f6d-k2x9p"), "{pods}");
    ok(&alice_kc.run(&["get", "deployments", "-n", "default"]));
    fails(
        &alice_kc.run(&["get", "pods", "-n", "kube-system"]),
        r#"User "alice" cannot list resource "pods" in API group "" in the namespace "kube-system""#,
    );
    // --as is refused at the hub, readably.
    fails(&alice_kc.run(&["get", "pods", "-n", "default", "--as", "bob"]), "uplink-hub refuses impersonation");
    // No grant: 403 from the hub.
    fails(&carol_kc.run(&["get", "pods", "-n", "default"]), "has no grant for cluster");

    // Bob: watch, logs -f, exec with stdin, port-forward.
    let mut watch = bob_kc.spawn(&["get", "pods", "-n", "default", "-w"]);
    let rx = lines(&mut watch);
    wait_line(&rx, PATIENCE, "an existing pod", |l| l.contains("db-0"));
    k.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "late-arrival", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Pending"},
    }))
    .unwrap();
    wait_line(&rx, PATIENCE, "the new pod", |l| l.contains("late-arrival"));
    kill(watch);

    let pod = "web-7d4b9c8f6d-k2x9p";
    let mut logs = bob_kc.spawn(&["logs", "-f", pod, "-n", "default"]);
    let rx = lines(&mut logs);
    wait_line(&rx, PATIENCE, "the existing log", |l| l.contains("listening"));
    k.append_log("default", pod, "GET /healthz 200");
    wait_line(&rx, PATIENCE, "the appended line", |l| l == "GET /healthz 200");
    kill(logs);

    let cat = bob_kc.run_with_stdin(&["exec", "-i", pod, "-n", "default", "--", "cat"], b"hello\nthrough uplink\n");
    assert_eq!(ok(&cat), "hello\nthrough uplink\n");
    let exit3 = bob_kc.run(&["exec", pod, "-n", "default", "--", "sh", "-c", "echo before; exit 3"]);
    assert_eq!((stdout(&exit3).as_str(), exit3.status.code()), ("before\n", Some(3)), "{}", stderr(&exit3));
    fails(&alice_kc.run(&["exec", pod, "-n", "default", "--", "echo", "hi"]), r#"User "alice" cannot"#);

    let mut pf = bob_kc.spawn(&["port-forward", &format!("pod/{pod}"), ":8080", "-n", "default"]);
    let rx = lines(&mut pf);
    let port = forwarded_port(&rx, PATIENCE);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    std::io::Write::write_all(&mut s, b"ping through the hub").unwrap();
    let mut back = vec![0u8; 20];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, b"ping through the hub");
    drop(s);
    kill(pf);

    // The cluster saw every request as the agent impersonating the person.
    let recs = k.requests();
    assert!(recs.iter().any(|r| r.impersonated_user.as_deref() == Some("alice")));
    assert!(recs.iter().any(|r| r.impersonated_user.as_deref() == Some("bob") && r.status == 101));
    assert!(!recs.iter().any(|r| r.impersonated_user.as_deref() == Some("carol")));

    // Audit: every request of the run, with the right user.
    let audit = admin.get("/api/v1/audit?limit=1000").unwrap().json();
    let entries = audit["entries"].as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["user"] == "alice" && e["status"] == 403 && e["path"].as_str().unwrap().contains("kube-system"))
    );
    assert!(
        entries
            .iter()
            .any(|e| e["user"] == "bob" && e["upgrade"] == true && e["path"].as_str().unwrap().contains("/exec"))
    );
    assert!(entries.iter().any(|e| e["user"] == "bob" && e["path"].as_str().unwrap().contains("watch")));
    assert!(entries.iter().any(|e| e["user"] == "carol" && e["status"] == 403));

    // The agent stops: DISCONNECTED and 503; it returns (no new activation): ACTIVE.
    Command::new("kill").args(["-TERM", &agent.id().to_string()]).status().unwrap();
    assert_eq!(wait_exit(&mut agent, PATIENCE), Some(0));
    assert!(wait_for(20, || admin.get("/api/v1/clusters/edge-1").unwrap().json()["status"] == "DISCONNECTED"));
    fails(&alice_kc.run(&["get", "pods", "-n", "default"]), "not connected");
    let mut agent = spawn_agent(&dir, &k, 1);
    assert!(wait_for(20, || admin.get("/api/v1/clusters/edge-1").unwrap().json()["status"] == "ACTIVE"));
    ok(&alice_kc.run(&["get", "pods", "-n", "default"]));

    // Deregister: the agent stops for good (exit 4) and its credential is refused.
    let dereg = ok(&hub_cli(&hub, &admin_token, &["cluster", "deregister", "edge-1"]));
    assert!(dereg.contains("systemctl disable --now uplink") || dereg.contains("kubectl delete"), "{dereg}");
    assert_eq!(
        wait_exit(&mut agent, PATIENCE),
        Some(4),
        "{}",
        std::fs::read_to_string(dir.join("agent-1.log")).unwrap_or_default()
    );
    let mut again = spawn_agent(&dir, &k, 2);
    assert_eq!(
        wait_exit(&mut again, PATIENCE),
        Some(4),
        "{}",
        std::fs::read_to_string(dir.join("agent-2.log")).unwrap_or_default()
    );
    std::fs::remove_dir_all(&dir).ok();
}
