//! The rendered Kubernetes manifest gives the agent exactly its job.
//!
//! The manifest the hub renders at registration (`render::kubernetes_manifest`)
//! is applied to the stand-in API server with the real kubectl as the admin
//! would (`kubectl apply -f`; the stand-in serves no OpenAPI, hence
//! `--validate=false`). Then, as the agent's service account
//! `system:serviceaccount:uplink:uplink-agent` with its service-account
//! groups, `kubectl auth can-i` and real requests show what it may do:
//! get and update its state Secret, impersonate the registered users and
//! groups, list nodes (for the node count) — and that it is refused the rest:
//! other Secrets, creating or listing Secrets, impersonating anyone else,
//! reading workloads as itself.

mod support;

use support::kube::{AGENT_GROUPS, AGENT_USER, Config, StandIn};
use support::kubectl::{Kubectl, stderr, stdout};
use uplink::render::{ClusterInstall, kubernetes_manifest};

const ARTICLE_RBAC: &str = include_str!("fixtures/kube/eks-console-restricted-access.yaml");
const ACTIVATION: &str = r#"{"cluster":"edge-1","hub_url":"https://hub.example.com:8443","activation_id":"act_0123","activation_code":"code","expires_at":"2030-01-01T00:00:00Z"}"#;

#[track_caller]
fn ok(o: &std::process::Output) -> String {
    assert!(o.status.success(), "kubectl failed: {}\n{}", stdout(o), stderr(o));
    stdout(o)
}

#[track_caller]
fn refused(o: &std::process::Output, message: &str) {
    assert!(!o.status.success(), "should have been refused: {}", stdout(o));
    assert!(stderr(o).contains(message), "expected {message:?} in:\n{}", stderr(o));
}

#[test]
fn the_agent_service_account_can_do_its_job_and_nothing_else() {
    let Some(admin) = Kubectl::find("manifest-rbac-admin") else { return };
    let sa = Kubectl::find("manifest-rbac-sa").unwrap();
    let k = StandIn::start(Config::default());
    // What alice may do herself (so impersonating her shows her rights).
    k.load_rbac_yaml(ARTICLE_RBAC).unwrap();
    k.kubeconfig_for_token(admin.path(), &k.admin_token()).unwrap();
    let sa_token = "uplink-agent-sa-token";
    k.add_token(sa_token, AGENT_USER, AGENT_GROUPS);
    k.kubeconfig_for_token(sa.path(), sa_token).unwrap();

    // `kubectl auth can-i` as the service account (SelfSubjectAccessReview).
    let can = |args: &[&str]| {
        let o = sa.run(&[&["auth", "can-i"][..], args].concat());
        let answer = stdout(&o).trim().to_string();
        assert!(answer == "yes" || answer == "no", "can-i {args:?}: {answer}\n{}", stderr(&o));
        answer == "yes"
    };
    let allowed: &[&[&str]] = &[
        &["get", "secrets/uplink-state", "-n", "uplink"],
        &["update", "secrets/uplink-state", "-n", "uplink"],
        &["impersonate", "users/alice"],
        &["impersonate", "users/bob"],
        &["impersonate", "groups/uplink:debuggers"],
        &["list", "nodes"],
    ];
    // Nothing of that before the manifest is applied: what follows is its doing.
    for a in allowed {
        assert!(!can(a), "the agent may {a:?} before the manifest is applied");
    }

    let mut install = ClusterInstall::new("edge-1", ACTIVATION);
    install.impersonate_users = vec!["alice".into(), "bob".into()];
    install.impersonate_groups = vec!["uplink:debuggers".into()];
    let manifest = admin.dir.join("uplink-edge-1.yaml");
    std::fs::write(&manifest, kubernetes_manifest(&install)).unwrap();
    let applied = ok(&admin.run(&["apply", "--validate=false", "-f", manifest.to_str().unwrap()]));
    for created in [
        "namespace/uplink",
        "serviceaccount/uplink-agent",
        "clusterrole.rbac.authorization.k8s.io/uplink-impersonate",
        "clusterrolebinding.rbac.authorization.k8s.io/uplink-impersonate",
        "role.rbac.authorization.k8s.io/uplink-state",
        "rolebinding.rbac.authorization.k8s.io/uplink-state",
        "secret/uplink-activation",
        "secret/uplink-state",
        "deployment.apps/uplink-agent",
    ] {
        // The stand-in's fixtures already hold the namespace and the account.
        let line = applied.lines().find(|l| l.starts_with(&format!("{created} ")));
        assert!(
            line.is_some_and(|l| l.ends_with(" created") || l.ends_with(" configured")),
            "{created} missing in:\n{applied}"
        );
    }
    // The SA is who the stand-in says it is.
    let whoami = ok(&sa.run(&["auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"]));
    assert_eq!(whoami, AGENT_USER);

    let denied: &[&[&str]] = &[
        // Other Secrets, and any other verb on its own.
        &["get", "secrets/uplink-activation", "-n", "uplink"],
        &["get", "secrets/other", "-n", "uplink"],
        &["get", "secrets/uplink-state", "-n", "default"],
        &["list", "secrets", "-n", "uplink"],
        &["watch", "secrets", "-n", "uplink"],
        &["create", "secrets", "-n", "uplink"],
        &["patch", "secrets/uplink-state", "-n", "uplink"],
        &["delete", "secrets/uplink-state", "-n", "uplink"],
        // Anyone else.
        &["impersonate", "users/mallory"],
        &["impersonate", "users/system:admin"],
        &["impersonate", "groups/system:masters"],
        &["impersonate", "serviceaccounts/default"],
        // Nothing as itself beyond counting nodes.
        &["list", "pods", "-n", "default"],
        &["get", "pods", "-n", "uplink"],
        &["get", "nodes/edge-1"],
        &["watch", "nodes"],
        &["list", "namespaces"],
        &["create", "deployments", "-n", "uplink"],
        &["update", "roles/uplink-state", "-n", "uplink"],
        &["escalate", "clusterroles"],
    ];
    for a in allowed {
        assert!(can(a), "the agent should be allowed to {a:?}");
    }
    for a in denied {
        assert!(!can(a), "the agent should be refused {a:?}");
    }

    // Real requests. Read the state Secret, write a registration into it (PUT,
    // as the agent does), and see it stored.
    let secret = ok(&sa.run(&["get", "secret", "uplink-state", "-n", "uplink", "-o", "json"]));
    let mut secret: serde_json::Value = serde_json::from_str(&secret).unwrap();
    secret["data"] = serde_json::json!({ "state": "cmVnaXN0cmF0aW9u" });
    let updated = ok(&sa.run_with_stdin(&["replace", "--validate=false", "-f", "-"], secret.to_string().as_bytes()));
    assert!(updated.contains("secret/uplink-state replaced"), "{updated}");
    let stored = k.object("v1", "Secret", "uplink", "uplink-state").unwrap();
    assert_eq!(stored["data"]["state"], "cmVnaXN0cmF0aW9u", "{stored}");
    ok(&sa.run(&["get", "--raw", "/api/v1/nodes?limit=1"]));

    let forbidden = |what: &str| format!(r#"User "{AGENT_USER}" cannot {what}"#);
    refused(
        &sa.run(&["get", "secret", "uplink-activation", "-n", "uplink"]),
        &forbidden(r#"get resource "secrets" in API group "" in the namespace "uplink""#),
    );
    refused(
        &sa.run(&["create", "secret", "generic", "sneaky", "-n", "uplink", "--from-literal=a=b"]),
        &forbidden(r#"create resource "secrets""#),
    );
    refused(&sa.run(&["get", "secrets", "-n", "uplink"]), &forbidden(r#"list resource "secrets""#));
    refused(&sa.run(&["get", "pods", "-n", "default"]), &forbidden(r#"list resource "pods""#));

    // Impersonation: the listed names pass (and then the person's own RBAC
    // decides), others are refused before any RBAC of theirs is looked at.
    let pods = ok(&sa.run(&["get", "pods", "-n", "default", "--as", "alice"]));
    assert!(pods.contains("web-7d4b9c8f6d-k2x9p"), "{pods}");
    refused(
        &sa.run(&["get", "pods", "-n", "kube-system", "--as", "alice"]),
        r#"User "alice" cannot list resource "pods""#,
    );
    refused(
        &sa.run(&["get", "pods", "-n", "default", "--as", "bob", "--as-group", "uplink:debuggers"]),
        r#"User "bob" cannot list resource "pods""#,
    );
    refused(
        &sa.run(&["get", "pods", "-n", "default", "--as", "mallory"]),
        &forbidden(r#"impersonate resource "users""#),
    );
    refused(
        &sa.run(&["get", "pods", "-n", "default", "--as", "alice", "--as-group", "system:masters"]),
        &forbidden(r#"impersonate resource "groups""#),
    );
}
