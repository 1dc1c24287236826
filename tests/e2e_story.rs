//! The rest of the seed's story with real processes (`uplink-hub serve`,
//! the real agent, the stand-in API server, real kubectl with kubeconfigs
//! the hub's CLI wrote), beside `e2e_hub.rs`:
//!
//! ```text
//!  uplink-hub cluster register ──► uplink-NAME.yaml
//!  kubectl apply -f uplink-NAME.yaml ──► stand-in (namespace, SA, RBAC,
//!               Secrets uplink-activation and uplink-state, Deployment)
//!  Secret uplink-activation ──► DIR/activation.json (as its mount shows it)
//!  uplink run --activation DIR --state-secret uplink/uplink-state
//!               (as the service account) ──► activates, stores its
//!               registration in uplink-state, ACTIVE
//!  restart ──► no second activation: the stored registration reconnects
//!  Alice is the article's IAM user arn:aws:iam::1234567890:user/Alice:
//!               pods in default, Forbidden by the cluster elsewhere
//!  dave: kubectl apply / patch / delete configmaps where a Role allows
//!               (namespace foo), Forbidden by the cluster elsewhere (bar)
//!  GET /api/v1/audit ──► one entry per request the cluster saw
//!               impersonated: method, path, user, status
//!  DELETE /api/v1/users/arn%3Aaws%3Aiam%3A%3A1234567890%3Auser%2FAlice
//!               ──► Alice's kubectl is refused
//! ```
//!
//! Skips loudly without kubectl (see `support::kubectl`).
#![cfg(feature = "hub")]

mod hub_support;
mod support;

use base64::Engine;
use hub_support::{
    HubProc, KillOnDrop, fails, hub_cli, ok, spawn_agent, temp_dir, wait_exit, wait_for, write_kube_credentials,
};
use serde_json::{Value, json};
use std::process::Command;
use std::time::{Duration, Instant};
use support::kube::{AGENT_GROUPS, AGENT_USER, Config, StandIn};
use support::kubectl::Kubectl;

const ARTICLE_RBAC: &str = include_str!("fixtures/kube/eks-console-restricted-access.yaml");
/// The article's Alice, an IAM user, as its RBAC names her.
const ALICE: &str = "arn:aws:iam::1234567890:user/Alice";
/// Her revocation: the name as one percent-encoded path segment.
const ALICE_PATH: &str = "/api/v1/users/arn%3Aaws%3Aiam%3A%3A1234567890%3Auser%2FAlice";

/// The article's RBAC with its own subject: the shared fixture calls
/// Alice `alice` for the tests that predate names such as ARNs.
fn article_rbac() -> String {
    let fixture_alice = r#"name: "alice""#;
    assert_eq!(ARTICLE_RBAC.matches(fixture_alice).count(), 2, "both of the article's bindings name Alice");
    ARTICLE_RBAC.replace(fixture_alice, &format!("name: {ALICE:?}"))
}
/// Dave may read and change configmaps in `foo`, and nothing in `bar`.
const CONFIGMAP_EDITOR: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: configmap-editor
  namespace: foo
rules:
  - apiGroups: [""]
    resources: ["configmaps"]
    verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: configmap-editor-dave
  namespace: foo
subjects:
  - kind: User
    name: dave
    apiGroup: rbac.authorization.k8s.io
roleRef:
  kind: Role
  name: configmap-editor
  apiGroup: rbac.authorization.k8s.io
"#;
const CONFIGMAP: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata:
  name: story
data:
  color: red
  size: large
"#;
/// Generous: a loaded 2-core machine runs several suites at once.
const PATIENCE: Duration = Duration::from_secs(60);
const CLUSTER: &str = "edge-story";

fn status_of(hub: &HubProc) -> String {
    let shown = hub.admin().get(&format!("/api/v1/clusters/{CLUSTER}")).unwrap().json();
    shown["status"].as_str().unwrap_or("").to_string()
}

fn state_secret(k: &StandIn) -> Value {
    k.object("v1", "Secret", "uplink", "uplink-state").expect("the manifest created the state Secret")
}

#[test]
fn secret_mode_activation_apply_patch_delete_and_a_complete_audit() {
    let Some(admin_kc) = Kubectl::find("e2e-story-admin") else { return };
    let alice_kc = Kubectl::find("e2e-story-alice").unwrap();
    let dave_kc = Kubectl::find("e2e-story-dave").unwrap();
    let start = Instant::now();
    let dir = temp_dir("story");
    let k = StandIn::start(Config::default());
    k.load_rbac_yaml(&article_rbac()).unwrap();
    k.load_rbac_yaml(CONFIGMAP_EDITOR).unwrap();
    k.kubeconfig_for_token(admin_kc.path(), &k.admin_token()).unwrap();

    let hub = HubProc::start_on_free_port(&dir);
    let admin_token = hub.admin_token.clone().unwrap();
    let admin = hub.admin();
    let agent_log = |n: usize| std::fs::read_to_string(dir.join(format!("agent-{n}.log"))).unwrap_or_default();

    // Register; the admin applies the rendered manifest as it is.
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.to_str().unwrap();
    ok(&hub_cli(
        &hub,
        &admin_token,
        &["cluster", "register", CLUSTER, "--user", ALICE, "--user", "dave", "--out-dir", out],
    ));
    let manifest = out_dir.join(format!("uplink-{CLUSTER}.yaml"));
    let applied = ok(&admin_kc.run(&["apply", "--validate=false", "-f", manifest.to_str().unwrap()]));
    assert!(applied.contains("secret/uplink-activation created"), "{applied}");
    assert!(state_secret(&k)["data"]["state"].as_str().unwrap_or("").is_empty(), "{}", state_secret(&k));

    // The activation Secret, as its mount presents it: DIR/activation.json.
    let activation = k.object("v1", "Secret", "uplink", "uplink-activation").unwrap();
    let b64 = activation["data"]["activation.json"].as_str().unwrap_or_else(|| panic!("{activation}"));
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    let from_secret: Value = serde_json::from_slice(&bytes).unwrap();
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join(format!("uplink-{CLUSTER}-activation.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(from_secret, file, "the Secret and the systemd file carry the same activation");
    let mount = dir.join("activation");
    std::fs::create_dir_all(&mount).unwrap();
    std::fs::write(mount.join("activation.json"), &bytes).unwrap();

    // The agent runs as its service account, with only what the manifest gave it.
    let sa_token = "uplink-agent-projected-token";
    k.add_token(sa_token, AGENT_USER, AGENT_GROUPS);
    write_kube_credentials(&dir, sa_token, &k.ca_pem());
    let flags = ["--activation".as_ref(), mount.as_os_str(), "--state-secret".as_ref(), "uplink/uplink-state".as_ref()];
    let mut agent = KillOnDrop(spawn_agent(&flags, &k.url(), &dir, &dir.join("agent-0.log")));
    assert!(
        wait_for(PATIENCE.as_secs(), || status_of(&hub) == "ACTIVE"),
        "agent log:\n{}\nhub log:\n{}",
        agent_log(0),
        hub.log()
    );
    let stored = state_secret(&k)["data"]["state"].as_str().unwrap_or("").to_string();
    assert!(!stored.is_empty(), "no registration in the state Secret: {}\n{}", state_secret(&k), agent_log(0));
    assert!(
        k.requests().iter().any(|r| r.method == "PUT"
            && r.path == "/api/v1/namespaces/uplink/secrets/uplink-state"
            && r.user.as_deref() == Some(AGENT_USER)
            && r.impersonated_user.is_none()
            && r.status == 200),
        "the agent wrote its state Secret as itself"
    );

    // Restart: the stored registration reconnects; no second activation.
    Command::new("kill").args(["-TERM", &agent.0.id().to_string()]).status().unwrap();
    assert_eq!(wait_exit(&mut agent.0, PATIENCE), Some(0), "{}", agent_log(0));
    assert!(wait_for(PATIENCE.as_secs(), || status_of(&hub) == "DISCONNECTED"));
    let _agent = KillOnDrop(spawn_agent(&flags, &k.url(), &dir, &dir.join("agent-1.log")));
    assert!(wait_for(PATIENCE.as_secs(), || status_of(&hub) == "ACTIVE"), "agent log:\n{}", agent_log(1));
    let shown = admin.get(&format!("/api/v1/clusters/{CLUSTER}")).unwrap().json();
    let kinds = |kind: &str| shown["events"].as_array().unwrap().iter().filter(|e| e["kind"] == kind).count();
    assert_eq!((kinds("activated"), kinds("connected")), (1, 2), "{shown}");
    let activations = shown["activations"].as_array().unwrap();
    assert_eq!(activations.len(), 1, "{shown}");
    assert!(activations[0]["used_at"].is_string(), "{shown}");
    assert_eq!(state_secret(&k)["data"]["state"].as_str().unwrap_or(""), stored, "the registration was kept");

    // People with grants and kubeconfigs the hub wrote.
    for name in [ALICE, "dave"] {
        let token = admin.post_json("/api/v1/users", &json!({ "name": name })).unwrap().json()["token"]
            .as_str()
            .unwrap()
            .to_string();
        admin.post_json("/api/v1/grants", &json!({ "user": name, "clusters": CLUSTER })).unwrap();
        let kc = if name == ALICE { &alice_kc } else { &dave_kc };
        ok(&hub_cli(&hub, &token, &["kubeconfig", "--cluster", CLUSTER, "--out", kc.path().to_str().unwrap()]));
    }
    // The restarted agent serves.
    let pods = ok(&alice_kc.run(&["get", "pods", "-n", "default"]));
    assert!(pods.contains("web-7d4b9c8f6d-k2x9p"), "{pods}");
    fails(
        &alice_kc.run(&["get", "configmaps", "-n", "foo"]),
        &format!(r#"User "{ALICE}" cannot list resource "configmaps""#),
    );

    // Dave: apply, patch, delete where his Role allows.
    let cm_file = dave_kc.dir.join("configmap.yaml");
    std::fs::write(&cm_file, CONFIGMAP).unwrap();
    let cm_path = cm_file.to_str().unwrap();
    let created = ok(&dave_kc.run(&["apply", "--validate=false", "-n", "foo", "-f", cm_path]));
    assert_eq!(created.trim(), "configmap/story created");
    let cm = k.object("v1", "ConfigMap", "foo", "story").expect("created in the cluster");
    assert_eq!((cm["data"]["color"].as_str(), cm["data"]["size"].as_str()), (Some("red"), Some("large")), "{cm}");
    let same = ok(&dave_kc.run(&["apply", "--validate=false", "-n", "foo", "-f", cm_path]));
    assert_eq!(same.trim(), "configmap/story unchanged");
    let patched = ok(&dave_kc.run(&[
        "patch",
        "configmap",
        "story",
        "-n",
        "foo",
        "--type",
        "merge",
        "-p",
        r#"{"data":{"color":"blue"}}"#,
    ]));
    assert_eq!(patched.trim(), "configmap/story patched");
    let cm = k.object("v1", "ConfigMap", "foo", "story").unwrap();
    assert_eq!((cm["data"]["color"].as_str(), cm["data"]["size"].as_str()), (Some("blue"), Some("large")), "{cm}");
    let got = ok(&dave_kc.run(&["get", "configmap", "story", "-n", "foo", "-o", "jsonpath={.data.color}"]));
    assert_eq!(got, "blue");
    let deleted = ok(&dave_kc.run(&["delete", "configmap", "story", "-n", "foo"]));
    assert_eq!(deleted.trim(), r#"configmap "story" deleted"#);
    assert!(k.object("v1", "ConfigMap", "foo", "story").is_none());

    // ... and the cluster refuses him elsewhere, in its own words.
    let refused = |what: &str| {
        format!(r#"User "dave" cannot {what} resource "configmaps" in API group "" in the namespace "bar""#)
    };
    fails(&dave_kc.run(&["apply", "--validate=false", "-n", "bar", "-f", cm_path]), &refused("get"));
    fails(&dave_kc.run(&["create", "configmap", "story", "-n", "bar", "--from-literal=color=red"]), &refused("create"));
    k.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "story", "namespace": "bar"}, "data": {"color": "red"}}))
        .unwrap();
    fails(
        &dave_kc.run(&[
            "patch",
            "configmap",
            "story",
            "-n",
            "bar",
            "--type",
            "merge",
            "-p",
            r#"{"data":{"color":"blue"}}"#,
        ]),
        &refused("get"),
    );
    fails(&dave_kc.run(&["delete", "configmap", "story", "-n", "bar"]), &refused("delete"));
    assert_eq!(k.object("v1", "ConfigMap", "bar", "story").unwrap()["data"]["color"], "red");

    // The audit log: exactly the requests the cluster saw as someone, each
    // with its method, path, user and status.
    // Both sides record a request once its response is done, which may be
    // a moment after kubectl exits: poll until they agree.
    type Seen = Vec<(String, String, String, u16)>;
    let in_cluster = || -> Seen {
        let mut v: Seen =
            k.requests().into_iter().filter_map(|r| Some((r.method, r.path, r.impersonated_user?, r.status))).collect();
        v.sort();
        v
    };
    let audited = || -> Seen {
        let audit = admin.get(&format!("/api/v1/audit?cluster={CLUSTER}&limit=10000")).unwrap().json();
        let mut v: Seen = audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let path = e["path"].as_str().unwrap().split('?').next().unwrap().to_string();
                let status = e["status"].as_u64().unwrap() as u16;
                (e["method"].as_str().unwrap().to_string(), path, e["user"].as_str().unwrap().to_string(), status)
            })
            .collect();
        v.sort();
        v
    };
    wait_for(PATIENCE.as_secs(), || audited() == in_cluster());
    let audited = audited();
    assert_eq!(audited, in_cluster(), "the audit entries and the requests the cluster saw as someone differ");
    let has = |method: &str, path: &str, user: &str, status: u16| {
        audited.iter().any(|(m, p, u, s)| m == method && p == path && u == user && *s == status)
    };
    let cm = "/api/v1/namespaces/foo/configmaps";
    assert!(has("POST", cm, "dave", 201), "{audited:#?}");
    assert!(has("PATCH", &format!("{cm}/story"), "dave", 200), "{audited:#?}");
    assert!(has("DELETE", &format!("{cm}/story"), "dave", 200), "{audited:#?}");
    assert!(has("GET", "/api/v1/namespaces/bar/configmaps/story", "dave", 403), "{audited:#?}");
    assert!(has("POST", "/api/v1/namespaces/bar/configmaps", "dave", 403), "{audited:#?}");
    assert!(has("DELETE", "/api/v1/namespaces/bar/configmaps/story", "dave", 403), "{audited:#?}");
    assert!(has("GET", "/api/v1/namespaces/default/pods", ALICE, 200), "{audited:#?}");
    assert!(has("GET", "/api/v1/namespaces/foo/configmaps", ALICE, 403), "{audited:#?}");
    let hers = admin.get(&format!("/api/v1/audit?user={}", uplink::http::percent_encode(ALICE))).unwrap().json();
    assert!(hers["entries"].as_array().unwrap().iter().all(|e| e["user"] == ALICE), "{hers}");
    assert_eq!(hers["entries"].as_array().unwrap().len(), audited.iter().filter(|a| a.2 == ALICE).count());

    // Revoking Alice by her name in the path ends her access.
    let revoked = admin.delete(ALICE_PATH).unwrap();
    assert_eq!((revoked.status, revoked.json()["user"]["name"].as_str()), (200, Some(ALICE)), "{}", revoked.text());
    fails(&alice_kc.run(&["get", "pods", "-n", "default"]), "You must be logged in to the server");
    eprintln!("MEASURE e2e_story: {:.1} s, {} audited requests", start.elapsed().as_secs_f64(), audited.len());
    std::fs::remove_dir_all(&dir).ok();
}
