//! The fleet view with real processes: `uplink-hub serve`, five real
//! agents (`uplink run`) in front of five stand-in API servers, each with
//! its own RBAC, and real kubectl on the `fleet` context.
//!
//! ```text
//!  shop-1  Alice and Jane read nodes, pods, deployments everywhere; a `pos` pod
//!  shop-2  Alice reads nodes, and pods only in `default`; a `pos` pod
//!  shop-3  Alice may be impersonated but has no rights: 403
//!  shop-4  activated, agent stopped: disconnected
//!  shop-5  its API server is behind a paused relay: times out
//!  prod-1  Alice has no grant: never asked
//! ```
#![cfg(feature = "hub")]

mod hub_support;
mod support;

use hub_support::{HubProc, KillOnDrop, hub_cli, ok, temp_dir, wait_for, write_kube_credentials};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::kube::{Config, StandIn, impersonation_rbac};
use support::kubectl::{Kubectl, stderr, stdout};
use support::relay::Relay;

const ALICE: &str = "arn:aws:iam::1234567890:user/Alice";
const JANE: &str = "jane@example.com";

/// Reading everything everywhere, for Alice and Jane.
fn readers_everywhere() -> String {
    format!(
        r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: fleet-reader
rules:
- apiGroups: ["", "apps"]
  resources: ["nodes", "pods", "namespaces", "deployments"]
  verbs: ["get", "list"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: fleet-reader
subjects:
- kind: User
  name: "{ALICE}"
  apiGroup: rbac.authorization.k8s.io
- kind: User
  name: "{JANE}"
  apiGroup: rbac.authorization.k8s.io
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: fleet-reader
"#
    )
}

/// Alice reads nodes, and pods only in `default`.
fn readers_in_default() -> String {
    format!(
        r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: node-reader
rules:
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["get", "list"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: node-reader
subjects:
- kind: User
  name: "{ALICE}"
  apiGroup: rbac.authorization.k8s.io
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: node-reader
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: pod-reader
  namespace: default
rules:
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: pod-reader
  namespace: default
subjects:
- kind: User
  name: "{ALICE}"
  apiGroup: rbac.authorization.k8s.io
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: pod-reader
"#
    )
}

fn pos_pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "pos"}},
        "spec": {"containers": [{"name": "pos", "image": "pos:1"}], "nodeName": "edge-1"},
        "status": {"phase": "Running"},
    })
}

/// One cluster: its stand-in, agent and directory.
struct Site {
    _k: StandIn,
    agent: Option<KillOnDrop>,
}

/// Registers `name`, starts a stand-in with `rbac` and an agent for it
/// (through `relay` when given), and waits until the cluster is ACTIVE.
fn site(
    hub: &HubProc,
    dir: &Path,
    name: &str,
    rbac: &[String],
    extra: &[Value],
    relayed: bool,
) -> (Site, Option<Relay>) {
    let k = StandIn::start(Config::default());
    for y in rbac {
        k.load_rbac_yaml(y).unwrap();
    }
    for o in extra {
        k.apply(o.clone()).unwrap();
    }
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    write_kube_credentials(&d, &k.agent_token(), &k.ca_pem());
    let r = hub.admin().post_json("/api/v1/clusters", &json!({ "name": name, "users": [ALICE, JANE] })).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    std::fs::write(d.join("activation.json"), r.json()["systemd_activation"].as_str().unwrap()).unwrap();
    let relay = relayed.then(|| Relay::start(k.addr()));
    let url = relay.as_ref().map_or(k.url(), |r| format!("https://{}", r.addr));
    let (activation, state) = (d.join("activation.json"), d.join("state"));
    let flags = ["--activation".as_ref(), activation.as_os_str(), "--state".as_ref(), state.as_os_str()];
    let agent = KillOnDrop(hub_support::spawn_agent(&flags, &url, &d, &d.join("agent.log")));
    let admin = hub.admin();
    assert!(
        wait_for(30, || admin.get(&format!("/api/v1/clusters/{name}")).unwrap().json()["status"] == "ACTIVE"),
        "{name} never connected:\n{}",
        std::fs::read_to_string(d.join("agent.log")).unwrap_or_default()
    );
    (Site { _k: k, agent: Some(agent) }, relay)
}

/// One NDJSON fleet query, each line with the time it arrived.
fn fleet_rest(hub: &HubProc, token: &str, target: &str) -> (u16, Vec<(Duration, Value)>) {
    let client = hub.client(Some(token));
    let mut s = client.connect().unwrap();
    let start = Instant::now();
    write!(s, "GET {target} HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")
        .unwrap();
    s.flush().unwrap();
    let mut raw = Vec::new();
    let mut seen = 0;
    let mut events = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        raw.extend_from_slice(&buf[..n]);
        // Each chunk is one line; a line starting with '{' is an event.
        let text = String::from_utf8_lossy(&raw).into_owned();
        let lines: Vec<&str> = text.split("\r\n").collect();
        let complete = lines.len().saturating_sub(1);
        for l in &lines[seen.min(complete)..complete] {
            if l.starts_with('{') {
                events.push((start.elapsed(), serde_json::from_str(l.trim()).unwrap()));
            }
        }
        seen = seen.max(complete);
    }
    let head = String::from_utf8_lossy(&raw);
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, events)
}

fn by_cluster<'a>(events: &'a [(Duration, Value)], name: &str) -> &'a (Duration, Value) {
    events.iter().find(|(_, e)| e["cluster"] == name).unwrap_or_else(|| panic!("no event for {name}: {events:?}"))
}

#[test]
fn fleet_queries_across_clusters_with_each_clusters_rbac() {
    let Some(kc132) = Kubectl::find("fleet-132") else { return };
    let dir = temp_dir("fleet");
    let hub = HubProc::start_on_free_port(&dir);
    let admin = hub.admin();
    let imp = impersonation_rbac(&[ALICE, JANE]);
    let (s1, _) = site(&hub, &dir, "shop-1", &[imp.clone(), readers_everywhere()], &[pos_pod("pos-1a")], false);
    let (s2, _) = site(&hub, &dir, "shop-2", &[imp.clone(), readers_in_default()], &[pos_pod("pos-2a")], false);
    let (s3, _) = site(&hub, &dir, "shop-3", std::slice::from_ref(&imp), &[], false);
    let (mut s4, _) = site(&hub, &dir, "shop-4", &[imp.clone(), readers_everywhere()], &[], false);
    let (s5, relay5) = site(&hub, &dir, "shop-5", &[imp.clone(), readers_everywhere()], &[], true);
    let (p1, _) = site(&hub, &dir, "prod-1", &[imp.clone(), readers_everywhere()], &[], false);
    drop(s4.agent.take());
    assert!(wait_for(20, || admin.get("/api/v1/clusters/shop-4").unwrap().json()["status"] == "DISCONNECTED"));
    let relay5 = relay5.unwrap();
    relay5.pause(true);

    let user = |name: &str, grant: &str| {
        let r = admin.post_json("/api/v1/users", &json!({ "name": name })).unwrap();
        assert_eq!(r.status, 201, "{}", r.text());
        let g = admin.post_json("/api/v1/grants", &json!({ "user": name, "clusters": grant })).unwrap();
        assert_eq!(g.status, 201, "{}", g.text());
        r.json()["token"].as_str().unwrap().to_string()
    };
    let alice = user(ALICE, "shop-*");
    let jane = user(JANE, "shop-1");

    // REST: one line per cluster as it answers, the slow one last.
    let (status, events) = fleet_rest(&hub, &alice, "/api/v1/fleet/k8s/api/v1/nodes?clusters=*");
    assert_eq!(status, 200);
    let first = &events[0].1["fleet"];
    assert_eq!(first["clusters"], json!(["shop-1", "shop-2", "shop-3", "shop-4", "shop-5"]), "{events:?}");
    let (t1, e1) = by_cluster(&events, "shop-1");
    let names: Vec<&str> =
        e1["items"].as_array().unwrap().iter().map(|n| n["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["edge-1", "edge-2"]);
    assert_eq!(e1["items"][0]["metadata"]["annotations"]["uplink.dev/cluster"], "shop-1");
    assert_eq!(by_cluster(&events, "shop-2").1["items"].as_array().unwrap().len(), 2);
    let e3 = &by_cluster(&events, "shop-3").1["error"];
    assert_eq!((e3["reason"].as_str(), e3["code"].as_u64()), (Some("Forbidden"), Some(403)), "{e3}");
    assert!(e3["message"].as_str().unwrap().contains("cannot list resource \"nodes\""), "{e3}");
    assert_eq!(by_cluster(&events, "shop-4").1["error"]["reason"], "Disconnected");
    let (t5, e5) = by_cluster(&events, "shop-5");
    assert_eq!(e5["error"]["reason"], "Timeout", "{e5}");
    assert!(*t1 < Duration::from_secs(5) && *t5 >= Duration::from_secs(10), "shop-1 at {t1:?}, shop-5 at {t5:?}");
    let summary = &events.last().unwrap().1["summary"];
    assert_eq!((summary["answered"].as_u64(), summary["failed"].as_u64()), (Some(2), Some(3)), "{summary}");
    assert_eq!(summary["items"], 4);

    // Selectors pass through; Tables get a Cluster column; the timeout is the caller's.
    let (_, events) = fleet_rest(
        &hub,
        &alice,
        "/api/v1/fleet/k8s/api/v1/namespaces/default/pods?clusters=shop-*&labelSelector=app%3Dpos&fleetTimeout=2",
    );
    let mut pods: Vec<(String, String)> = events
        .iter()
        .filter_map(|(_, e)| Some((e["cluster"].as_str()?.to_string(), e["items"].as_array()?.clone())))
        .flat_map(|(c, items)| {
            items.into_iter().map(move |i| (c.clone(), i["metadata"]["name"].as_str().unwrap().to_string()))
        })
        .collect();
    pods.sort();
    assert_eq!(pods, [("shop-1".to_string(), "pos-1a".to_string()), ("shop-2".into(), "pos-2a".into())], "{events:?}");
    assert!(events.iter().any(|(t, e)| e["cluster"] == "shop-5" && *t < Duration::from_secs(5)), "fleetTimeout=2");
    let (_, events) =
        fleet_rest(&hub, &jane, "/api/v1/fleet/k8s/api/v1/pods?fieldSelector=metadata.name%3Ddb-0&clusters=*");
    assert_eq!(events[0].1["fleet"]["clusters"], json!(["shop-1"]), "Jane's grant is shop-1 only");
    assert_eq!(by_cluster(&events, "shop-1").1["items"][0]["metadata"]["name"], "db-0");
    // Reads only.
    let r = hub.client(Some(&alice)).request("DELETE", "/api/v1/fleet/k8s/api/v1/nodes/edge-1", &[], None).unwrap();
    assert_eq!(r.status, 405, "{}", r.text());
    let r = hub.client(Some(&alice)).get("/api/v1/fleet/k8s/api/v1/namespaces/default/pods/db-0/log").unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(hub.client(None).get("/api/v1/fleet/k8s/api/v1/nodes").unwrap().status, 401);

    // Every cluster's request is audited, as Alice.
    let audit = admin.get("/api/v1/audit?limit=1000").unwrap().json();
    let fleet_audit: Vec<&Value> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["user"] == ALICE && e["path"] == "/api/v1/nodes")
        .collect();
    assert_eq!(fleet_audit.len(), 5, "{audit}");
    assert!(fleet_audit.iter().any(|e| e["cluster"] == "shop-3" && e["status"] == 403));

    // kubectl on the fleet context of the kubeconfig the hub writes.
    let mut kubectls = vec![kc132];
    for v in ["1.27", "1.33"] {
        let bin = PathBuf::from(format!("/usr/lib/google-cloud-sdk/bin/kubectl.{v}"));
        if bin.is_file() {
            let kc = Kubectl::find(&format!("fleet-{v}")).unwrap();
            let mut kc = kc;
            kc.bin = bin;
            kubectls.push(kc);
        } else {
            eprintln!("\n!!!!! kubectl {v} not found at {}: only the default kubectl is tested !!!!!\n", bin.display());
        }
    }
    for kc in &kubectls {
        ok(&hub_cli(&hub, &alice, &["kubeconfig", "--cluster", "shop-1", "--out", kc.kubeconfig.to_str().unwrap()]));
        let fleet = |args: &[&str]| {
            let mut all = vec!["--context", "fleet"];
            all.extend_from_slice(args);
            kc.run(&all)
        };
        let version = kc.bin.display().to_string();
        // The first kubectl sees shop-5 still silent: its timeout is a
        // warning, the rest print. Then shop-5 thaws and answers.
        let slow = kc.bin == kubectls[0].bin;
        let t = Instant::now();
        let nodes = fleet(&["get", "nodes"]);
        let (out, err) = (stdout(&nodes), stderr(&nodes));
        assert!(nodes.status.success(), "{version}: {out}\n{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].starts_with("CLUSTER") && lines[0].contains("NAME") && lines[0].contains("STATUS"),
            "{version}: {out}"
        );
        for (c, n) in [("shop-1", "edge-1"), ("shop-1", "edge-2"), ("shop-2", "edge-1"), ("shop-2", "edge-2")] {
            assert!(lines.iter().any(|l| l.starts_with(c) && l.contains(n) && l.contains("Ready")), "{version}: {out}");
        }
        assert_eq!(lines.len(), if slow { 5 } else { 7 }, "{version}: {out}");
        for w in ["Warning: cluster shop-3: Forbidden:", "Warning: cluster shop-4: Disconnected:"] {
            assert!(err.contains(w), "{version}: {w:?} not in\n{err}");
        }
        assert_eq!(err.contains("Warning: cluster shop-5: Timeout:"), slow, "{version}: {err}");
        assert!(!err.contains("prod-1") && !out.contains("prod-1"), "no grant, never asked");
        assert!(t.elapsed() < Duration::from_secs(30), "{version}: {:?}", t.elapsed());
        if slow {
            relay5.pause(false);
        }

        // -o wide, -A with a label selector, RBAC that differs per cluster.
        let wide = ok(&fleet(&["get", "nodes", "-o", "wide"]));
        assert!(
            wide.lines().next().unwrap().contains("INTERNAL-IP") && wide.contains("10.0.0.11"),
            "{version}: {wide}"
        );
        let pos = fleet(&["get", "pods", "-A", "-l", "app=pos"]);
        let (out, err) = (stdout(&pos), stderr(&pos));
        // kubectl puts the namespace it takes from each row's object first.
        assert!(out.lines().next().unwrap().starts_with("NAMESPACE   CLUSTER   NAME"), "{version}: {out}");
        assert!(out.contains("pos-1a") && !out.contains("pos-2a") && !out.contains("web-"), "{version}: {out}");
        assert!(
            err.contains("Warning: cluster shop-2: Forbidden:") && err.contains("cannot list resource \\\"pods\\\"")
                || err.contains("cannot list resource \"pods\""),
            "{version}: {err}"
        );
        let pos = ok(&fleet(&["get", "pods", "-n", "default", "-l", "app=pos"]));
        assert!(pos.contains("pos-1a") && pos.contains("pos-2a"), "{version}: {pos}");
        let db = ok(&fleet(&["get", "pods", "-n", "default", "--field-selector", "metadata.name=db-0"]));
        let clusters: Vec<&str> = db.lines().skip(1).map(|l| l.split(' ').next().unwrap()).collect();
        assert_eq!(clusters, ["shop-1", "shop-2", "shop-5"], "{version}: in cluster order; shop-5 thawed: {db}");

        // -o json: one List, every item annotated with its cluster.
        let json: Value =
            serde_json::from_str(&ok(&fleet(&["get", "pods", "-n", "default", "-l", "app=pos", "-o", "json"])))
                .unwrap();
        assert_eq!(json["kind"], "List");
        let clusters: Vec<&str> = json["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["annotations"]["uplink.dev/cluster"].as_str().unwrap())
            .collect();
        assert_eq!(clusters, ["shop-1", "shop-2"], "{version}: {json}");

        // Get by name: where it exists; NotFound where nowhere.
        let named = ok(&fleet(&["get", "pod", "pos-2a", "-n", "default"]));
        assert!(named.lines().nth(1).unwrap().starts_with("shop-2"), "{version}: {named}");
        let none = fleet(&["get", "pod", "nowhere", "-n", "default"]);
        assert!(!none.status.success() && stderr(&none).contains("NotFound"), "{version}: {}", stderr(&none));

        // A watch: the first listing prints, then the watch is refused.
        let w = fleet(&["get", "nodes", "-w"]);
        assert!(stdout(&w).contains("shop-1"), "{version}: {}", stdout(&w));
        // kubectl 1.27 does not print a refused watch's message.
        let generic = version.ends_with("1.27") && stderr(&w).contains("does not allow this method");
        assert!(stderr(&w).contains("the fleet context does not watch") || generic, "{version}: {}", stderr(&w));

        // Writes and per-cluster streams are refused, readably.
        for args in [
            &["delete", "pod", "pos-1a", "-n", "default"][..],
            &["logs", "pos-1a", "-n", "default"],
            &["exec", "pos-1a", "-n", "default", "--", "true"],
        ] {
            let o = fleet(args);
            assert!(!o.status.success(), "{version} {args:?}");
            assert!(stderr(&o).contains("the fleet context is read-only"), "{version} {args:?}: {}", stderr(&o));
        }
    }
    drop((s1, s2, s3, s4, s5, p1, relay5));
    std::fs::remove_dir_all(&dir).ok();
}
