//! The stand-in Kubernetes API server (tests/support/kube), driven by real
//! kubectl 1.32 with impersonation, and by hand-made HTTP requests.
//!
//! kubectl tests skip loudly when kubectl is missing, unless
//! `UPLINK_REQUIRE_KUBECTL=1`.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;
use support::kube::{AGENT_USER, Config, StandIn};
use support::kubectl::{Kubectl, forwarded_port, kill, lines, stderr, stdout, wait_line};

const ARTICLE_RBAC: &str = include_str!("fixtures/kube/eks-console-restricted-access.yaml");
const AGENT_IMPERSONATION: &str = include_str!("fixtures/kube/agent-impersonation.yaml");
const DEBUG_ACCESS: &str = include_str!("fixtures/kube/debug-access.yaml");
/// Generous: the test machine is small and shared.
const PATIENCE: Duration = Duration::from_secs(60);

/// A stand-in with the article's RBAC, the agent's impersonation grant and
/// Bob's debug role, plus kubectl configured with the agent's token.
fn cluster(tag: &str) -> Option<(StandIn, Kubectl)> {
    let k = StandIn::start(Config::default());
    for y in [ARTICLE_RBAC, AGENT_IMPERSONATION, DEBUG_ACCESS] {
        k.load_rbac_yaml(y).expect("fixture yaml");
    }
    let kc = Kubectl::find(tag)?;
    k.kubeconfig_for_token(kc.path(), &k.agent_token()).expect("kubeconfig");
    Some((k, kc))
}

#[track_caller]
fn ok(o: &std::process::Output) -> String {
    assert!(o.status.success(), "kubectl failed: {}\n{}", stdout(o), stderr(o));
    stdout(o)
}

#[track_caller]
fn fails(o: &std::process::Output, message: &str) {
    assert!(!o.status.success(), "kubectl should have failed: {}", stdout(o));
    assert!(stderr(o).contains(message), "expected {message:?} in:\n{}", stderr(o));
}

#[test]
fn admin_sees_the_edge_cluster() {
    let Some((k, kc)) = cluster("admin") else { return };
    k.kubeconfig_for_token(kc.path(), &k.admin_token()).unwrap();
    let nodes = ok(&kc.run(&["get", "nodes", "-o", "wide"]));
    assert!(nodes.contains("edge-1") && nodes.contains("edge-2") && nodes.contains("Ready"), "{nodes}");
    assert!(nodes.starts_with("NAME"), "a Table with real columns: {nodes}");
    let v = ok(&kc.run(&["version", "-o", "json"]));
    assert!(v.contains("v1.32"), "{v}");
    let pods = ok(&kc.run(&["get", "pods", "-A"]));
    assert!(pods.contains("coredns-") && pods.contains("web-7d4b9c8f6d-k2x9p"), "{pods}");
    let header = pods.lines().next().unwrap_or("");
    for col in ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"] {
        assert!(header.contains(col), "{header}");
    }
    let deploy = ok(&kc.run(&["get", "deploy", "-n", "default"]));
    assert!(deploy.lines().next().unwrap_or("").contains("UP-TO-DATE"), "{deploy}");
    // Label selectors through kubectl.
    let web = ok(&kc.run(&["get", "pods", "-n", "default", "-l", "app in (web)", "-o", "name"]));
    assert_eq!(web.lines().count(), 2, "{web}");
    // Create, patch, delete through kubectl.
    ok(&kc.run(&["create", "configmap", "c1", "-n", "foo", "--from-literal=a=b"]));
    ok(&kc.run(&["label", "configmap", "c1", "-n", "foo", "x=y"]));
    let cm = k.object("v1", "ConfigMap", "foo", "c1").expect("created");
    assert_eq!(cm["metadata"]["labels"]["x"], "y");
    ok(&kc.run(&["delete", "configmap", "c1", "-n", "foo"]));
    assert!(k.object("v1", "ConfigMap", "foo", "c1").is_none());
}

#[test]
fn alice_reads_what_the_article_grants_and_nothing_else() {
    let Some((k, kc)) = cluster("alice") else { return };
    let ns = ok(&kc.run(&["get", "namespaces", "--as", "alice"]));
    for n in ["default", "kube-system", "foo", "bar"] {
        assert!(ns.contains(n), "{ns}");
    }
    let nodes = ok(&kc.run(&["get", "nodes", "--as", "alice"]));
    assert!(nodes.contains("edge-1"), "{nodes}");
    for (kind, name) in [
        ("pods", "web-7d4b9c8f6d-k2x9p"),
        ("deployments", "web"),
        ("daemonsets", "node-exporter"),
        ("statefulsets", "db"),
        ("replicasets", "web-7d4b9c8f6d"),
        ("jobs", "backup"),
    ] {
        let out = ok(&kc.run(&["get", kind, "-n", "default", "--as", "alice"]));
        assert!(out.contains(name), "{kind}: {out}");
    }
    fails(
        &kc.run(&["get", "pods", "-n", "kube-system", "--as", "alice"]),
        r#"Error from server (Forbidden): pods is forbidden: User "alice" cannot list resource "pods" in API group "" in the namespace "kube-system""#,
    );
    fails(
        &kc.run(&["get", "deployments", "-n", "kube-system", "--as", "alice"]),
        r#"deployments.apps is forbidden: User "alice" cannot list resource "deployments" in API group "apps" in the namespace "kube-system""#,
    );
    fails(
        &kc.run(&["get", "secrets", "-n", "default", "--as", "alice"]),
        r#"secrets is forbidden: User "alice" cannot list resource "secrets" in API group "" in the namespace "default""#,
    );
    fails(
        &kc.run(&["delete", "pod", "db-0", "-n", "default", "--as", "alice"]),
        r#"pods "db-0" is forbidden: User "alice" cannot delete resource "pods" in API group "" in the namespace "default""#,
    );
    // Every request reached "the cluster" as the agent, impersonating alice.
    let recs: Vec<_> = k.requests().into_iter().filter(|r| r.impersonated_user.as_deref() == Some("alice")).collect();
    assert!(!recs.is_empty());
    assert!(recs.iter().all(|r| r.user.as_deref() == Some(AGENT_USER) && r.had_authorization));
    assert!(recs.iter().any(|r| r.status == 403 && r.path == "/api/v1/namespaces/kube-system/pods"));
}

#[test]
fn the_agent_may_impersonate_only_whom_it_is_granted() {
    let Some((k, kc)) = cluster("impersonate") else { return };
    // Discovery is refused too, so kubectl says only "Forbidden: unknown",
    // exactly as it does against a real API server; --raw shows the Status.
    fails(&kc.run(&["get", "pods", "-n", "default", "--as", "mallory"]), "Error from server (Forbidden): unknown");
    fails(
        &kc.run(&["get", "--raw", "/api/v1/namespaces/default/pods", "--as", "mallory"]),
        r#"Error from server (Forbidden): users "mallory" is forbidden: User "system:serviceaccount:uplink:uplink-agent" cannot impersonate resource "users" in API group "" at the cluster scope"#,
    );
    fails(
        &kc.run(&["get", "--raw", "/api", "--as", "alice", "--as-group", "system:masters"]),
        r#"groups "system:masters" is forbidden: User "system:serviceaccount:uplink:uplink-agent" cannot impersonate resource "groups" in API group "" at the cluster scope"#,
    );
    // A granted group gives its role: carol is not impersonable, but
    // alice in uplink:debuggers may read logs in default.
    let log = ok(&kc.run(&["logs", "db-0", "-n", "default", "--as", "alice", "--as-group", "uplink:debuggers"]));
    assert!(log.contains("db-0: starting"), "{log}");
    fails(&kc.run(&["logs", "db-0", "-n", "default", "--as", "alice"]), r#"cannot get resource "pods/log""#);
    // Without impersonation the agent itself can do nothing.
    fails(
        &kc.run(&["get", "pods", "-n", "default"]),
        r#"User "system:serviceaccount:uplink:uplink-agent" cannot list resource "pods""#,
    );
    let _ = k;
}

#[test]
fn kubectl_auth_can_i_and_whoami() {
    let Some((_k, kc)) = cluster("can-i") else { return };
    let yes = kc.run(&["auth", "can-i", "list", "pods", "-n", "default", "--as", "alice"]);
    assert_eq!(ok(&yes).trim(), "yes");
    let no = kc.run(&["auth", "can-i", "list", "pods", "-n", "kube-system", "--as", "alice"]);
    assert_eq!(stdout(&no).trim(), "no");
    assert_eq!(no.status.code(), Some(1));
    // (kubectl reads "pods/exec" as pod "exec"; a subresource is a flag.)
    let exec_bob = kc.run(&["auth", "can-i", "create", "pods", "--subresource=exec", "-n", "default", "--as", "bob"]);
    assert_eq!(ok(&exec_bob).trim(), "yes");
    let exec_alice =
        kc.run(&["auth", "can-i", "create", "pods", "--subresource=exec", "-n", "default", "--as", "alice"]);
    assert_eq!(stdout(&exec_alice).trim(), "no");
    let deploy = kc.run(&["auth", "can-i", "get", "deployments.apps", "-n", "default", "--as", "alice"]);
    assert_eq!(ok(&deploy).trim(), "yes");
    let version = kc.run(&["auth", "can-i", "get", "/version", "--as", "alice"]);
    assert_eq!(ok(&version).trim(), "yes");
    let who = ok(&kc.run(&["auth", "whoami", "--as", "alice", "--as-group", "uplink:debuggers"]));
    assert!(who.contains("alice") && who.contains("uplink:debuggers") && who.contains("system:authenticated"), "{who}");
    // The SA may not impersonate mallory, so even can-i is refused.
    fails(&kc.run(&["auth", "can-i", "list", "pods", "--as", "mallory"]), "Forbidden");
}

#[test]
fn kubectl_get_pods_watch_sees_a_new_pod() {
    let Some((k, kc)) = cluster("watch") else { return };
    let mut child = kc.spawn(&["get", "pods", "-n", "default", "-w", "--as", "bob"]);
    let rx = lines(&mut child);
    wait_line(&rx, PATIENCE, "an existing pod", |l| l.contains("db-0"));
    k.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "late-arrival", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Pending"},
    }))
    .unwrap();
    let l = wait_line(&rx, PATIENCE, "the new pod", |l| l.contains("late-arrival"));
    assert!(l.contains("Pending"), "{l}");
    kill(child);
    // alice may list but not watch.
    fails(&kc.run(&["get", "pods", "-n", "default", "-w", "--as", "alice"]), r#"cannot watch resource "pods""#);
}

#[test]
fn kubectl_logs_follow_sees_appended_lines() {
    let Some((k, kc)) = cluster("logs") else { return };
    let mut child = kc.spawn(&["logs", "-f", "web-7d4b9c8f6d-k2x9p", "-n", "default", "--as", "bob"]);
    let rx = lines(&mut child);
    wait_line(&rx, PATIENCE, "the existing log", |l| l.contains("listening"));
    k.append_log("default", "web-7d4b9c8f6d-k2x9p", "GET /healthz 200");
    wait_line(&rx, PATIENCE, "the appended line", |l| l == "GET /healthz 200");
    k.append_log("default", "web-7d4b9c8f6d-k2x9p", "GET / 200");
    wait_line(&rx, PATIENCE, "a second appended line", |l| l == "GET / 200");
    kill(child);
    fails(
        &kc.run(&["logs", "web-7d4b9c8f6d-k2x9p", "-n", "default", "--as", "alice"]),
        r#"pods "web-7d4b9c8f6d-k2x9p" is forbidden: User "alice" cannot get resource "pods/log" in API group "" in the namespace "default""#,
    );
}

#[test]
fn kubectl_exec_with_stdin_and_exit_codes() {
    let Some((k, kc)) = cluster("exec") else { return };
    let pod = "web-7d4b9c8f6d-k2x9p";
    let cat = kc.run_with_stdin(&["exec", "-i", pod, "-n", "default", "--as", "bob", "--", "cat"], b"hello\nworld\n");
    assert_eq!(ok(&cat), "hello\nworld\n");
    let echo = kc.run(&["exec", pod, "-n", "default", "--as", "bob", "--", "echo", "hi", "there"]);
    assert_eq!(ok(&echo), "hi there\n");
    let exit3 = kc.run(&["exec", pod, "-n", "default", "--as", "bob", "--", "sh", "-c", "echo before; exit 3"]);
    assert_eq!(stdout(&exit3), "before\n");
    assert_eq!(exit3.status.code(), Some(3), "{}", stderr(&exit3));
    let f = kc.run(&["exec", pod, "-n", "default", "--as", "bob", "--", "false"]);
    assert_eq!(f.status.code(), Some(1), "{}", stderr(&f));
    fails(&kc.run(&["exec", pod, "-n", "default", "--as", "alice", "--", "echo", "hi"]), r#"User "alice" cannot"#);
    // kubectl 1.32 speaks WebSocket (v5) first: authorized as get on pods/exec.
    let ws = k.requests().into_iter().find(|r| r.path.ends_with("/exec") && r.status == 101).expect("an exec upgrade");
    assert_eq!((ws.method.as_str(), ws.verb.as_str()), ("GET", "get"));
}

#[test]
fn kubectl_port_forward_reaches_the_echo_socket() {
    let Some((k, kc)) = cluster("port-forward") else { return };
    let mut child = kc.spawn(&["port-forward", "pod/web-7d4b9c8f6d-k2x9p", ":8080", "-n", "default", "--as", "bob"]);
    let rx = lines(&mut child);
    let port = forwarded_port(&rx, PATIENCE);
    for round in 0..2 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to kubectl's port");
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let msg = format!("ping {round} through kubectl, the stand-in and SPDY");
        s.write_all(msg.as_bytes()).unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).expect("echo");
        assert_eq!(back, msg.as_bytes());
    }
    let err = kill(child);
    assert!(!err.contains("error"), "{err}");
    // kubectl 1.32 tunnels SPDY in a WebSocket first; the stand-in accepts that.
    let pf: Vec<_> = k.requests().into_iter().filter(|r| r.path.ends_with("/portforward")).collect();
    assert!(pf.iter().any(|r| r.method == "GET" && r.status == 101), "{pf:#?}");
    let _ = k.echo_port();
    let alice = kc.spawn(&["port-forward", "pod/web-7d4b9c8f6d-k2x9p", ":8080", "-n", "default", "--as", "alice"]);
    let out = alice.wait_with_output().unwrap();
    fails(&out, r#"User "alice" cannot"#);
}

// ---- Direct HTTP ------------------------------------------------------------------

use support::https::{self, Response};

fn call(k: &StandIn, method: &str, path: &str, token: Option<&str>, headers: &[(&str, &str)], body: &[u8]) -> Response {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut h: Vec<(&str, &str)> = headers.to_vec();
    if let Some(a) = auth.as_deref() {
        h.push(("Authorization", a));
    }
    https::request(k.addr(), https::client_config(&k.ca_der(), None), method, path, &h, body)
}

#[track_caller]
fn status_is(r: &Response, code: u16, reason: &str, message: &str) {
    assert_eq!(r.status, code, "{}", r.text());
    let s = r.json();
    assert_eq!((s["kind"].as_str(), s["apiVersion"].as_str()), (Some("Status"), Some("v1")), "{s}");
    assert_eq!(s["status"], "Failure");
    assert_eq!(s["code"], code);
    assert_eq!(s["reason"], reason, "{s}");
    assert!(s["message"].as_str().unwrap_or("").contains(message), "{message:?} not in {s}");
}

fn with_rbac() -> StandIn {
    let k = StandIn::start(Config::default());
    for y in [ARTICLE_RBAC, AGENT_IMPERSONATION, DEBUG_ACCESS] {
        k.load_rbac_yaml(y).expect("fixture yaml");
    }
    k
}

#[test]
fn authentication_tokens_rotation_and_client_certificates() {
    let k = with_rbac();
    status_is(&call(&k, "GET", "/api/v1/namespaces", None, &[], b""), 401, "Unauthorized", "Unauthorized");
    status_is(&call(&k, "GET", "/api/v1/namespaces", Some("nope"), &[], b""), 401, "Unauthorized", "Unauthorized");
    let recs = k.requests();
    assert_eq!(recs.iter().map(|r| r.had_authorization).collect::<Vec<_>>(), [false, true]);
    assert!(recs.iter().all(|r| r.user.is_none() && r.status == 401));

    let alice = [("Impersonate-User", "alice")];
    let old = k.agent_token();
    assert_eq!(call(&k, "GET", "/api/v1/namespaces/default/pods", Some(&old), &alice, b"").status, 200);
    k.set_agent_token("rotated-token");
    status_is(&call(&k, "GET", "/api/v1/namespaces/default/pods", Some(&old), &alice, b""), 401, "Unauthorized", "");
    let r = call(&k, "GET", "/api/v1/namespaces/default/pods", Some("rotated-token"), &alice, b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["kind"], "PodList");

    // Client certificates, as k3s's admin kubeconfig: CN is the user, O the groups.
    let (cert, key) = k.client_cert_pem_for("system:admin", &["system:masters"]);
    let cfg = https::client_config(&k.ca_der(), Some((&cert, &key)));
    assert_eq!(https::request(k.addr(), cfg, "GET", "/api/v1/secrets", &[], b"").status, 200);
    let (cert, key) = k.client_cert_pem_for("alice", &["team-a", "team-b"]);
    let cfg = https::client_config(&k.ca_der(), Some((&cert, &key)));
    assert_eq!(https::request(k.addr(), cfg.clone(), "GET", "/api/v1/namespaces", &[], b"").status, 200);
    status_is(
        &https::request(k.addr(), cfg.clone(), "GET", "/api/v1/namespaces/default/secrets", &[], b""),
        403,
        "Forbidden",
        r#"secrets is forbidden: User "alice" cannot list resource "secrets" in API group "" in the namespace "default""#,
    );
    let ssr = br#"{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}"#;
    let who = https::request(k.addr(), cfg, "POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", &[], ssr);
    assert_eq!(who.status, 201, "{}", who.text());
    let groups = who.json()["status"]["userInfo"]["groups"].clone();
    assert_eq!(groups, json!(["team-a", "team-b", "system:authenticated"]));
}

#[test]
fn impersonation_rules_and_the_request_record() {
    let k = with_rbac();
    let t = k.agent_token();
    // Group without user: 400, as the real filter answers.
    let r = call(&k, "GET", "/api", Some(&t), &[("Impersonate-Group", "uplink:debuggers")], b"");
    status_is(&r, 400, "BadRequest", "without impersonating a user");
    // An empty Impersonate-User is no impersonation at all (as the real
    // server): the request runs as the agent, and the record shows it.
    let r = call(&k, "GET", "/api/v1/namespaces/default/pods", Some(&t), &[("Impersonate-User", "")], b"");
    status_is(&r, 403, "Forbidden", r#"User "system:serviceaccount:uplink:uplink-agent" cannot list resource "pods""#);
    let rec = k.requests().pop().unwrap();
    assert!(rec.empty_impersonate_user());
    assert_eq!(rec.impersonated_user, None);
    assert_eq!(rec.effective_user.as_deref(), Some(AGENT_USER));
    // Uid and extras need their own grants.
    let r = call(&k, "GET", "/api", Some(&t), &[("Impersonate-User", "alice"), ("Impersonate-Uid", "u-1")], b"");
    status_is(
        &r,
        403,
        "Forbidden",
        r#"uids.authentication.k8s.io "u-1" is forbidden: User "system:serviceaccount:uplink:uplink-agent" cannot impersonate resource "uids" in API group "authentication.k8s.io" at the cluster scope"#,
    );
    let r =
        call(&k, "GET", "/api", Some(&t), &[("Impersonate-User", "alice"), ("Impersonate-Extra-Scopes", "view")], b"");
    status_is(
        &r,
        403,
        "Forbidden",
        r#"cannot impersonate resource "userextras/scopes" in API group "authentication.k8s.io""#,
    );
    k.load_rbac_yaml(
        r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: extras}
rules:
- {apiGroups: [authentication.k8s.io], resources: [uids, userextras/scopes], verbs: [impersonate]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: extras}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: extras}
subjects: [{kind: ServiceAccount, name: uplink-agent, namespace: uplink}]
"#,
    )
    .unwrap();
    k.clear_requests();
    let h = [
        ("Impersonate-User", "alice"),
        ("Impersonate-Group", "uplink:debuggers"),
        ("Impersonate-Uid", "u-1"),
        ("Impersonate-Extra-Scopes", "view"),
    ];
    let ssr = br#"{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}"#;
    let r = call(&k, "POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", Some(&t), &h, ssr);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        r.json()["status"]["userInfo"],
        json!({"username": "alice", "uid": "u-1", "groups": ["uplink:debuggers", "system:authenticated"], "extra": {"scopes": ["view"]}})
    );
    let rec = k.requests().pop().unwrap();
    assert_eq!(rec.user.as_deref(), Some(AGENT_USER));
    assert_eq!(rec.impersonated_user.as_deref(), Some("alice"));
    assert_eq!(rec.impersonated_groups, ["uplink:debuggers"]);
    assert_eq!(rec.effective_groups, ["uplink:debuggers", "system:authenticated"]);
    assert_eq!(rec.impersonate_headers.len(), 4);
    assert_eq!((rec.method.as_str(), rec.verb.as_str(), rec.status), ("POST", "create", 201));
}

#[test]
fn bad_input_gets_real_statuses() {
    let k = StandIn::start(Config::default());
    let t = k.admin_token();
    let json_ct = [("Content-Type", "application/json")];
    let r = call(&k, "POST", "/api/v1/namespaces/default/configmaps", Some(&t), &json_ct, b"{not json");
    status_is(&r, 400, "BadRequest", "error decoding");
    let r = call(&k, "POST", "/api/v1/namespaces/default/configmaps", Some(&t), &json_ct, b"[1,2]");
    status_is(&r, 400, "BadRequest", "");
    status_is(
        &call(&k, "GET", "/api/v1/widgets", Some(&t), &[], b""),
        404,
        "NotFound",
        "the server could not find the requested resource",
    );
    status_is(&call(&k, "GET", "/apis/nope.example.com/v1/things", Some(&t), &[], b""), 404, "NotFound", "");
    status_is(
        &call(&k, "GET", "/api/v1/namespaces/default/pods/nope", Some(&t), &[], b""),
        404,
        "NotFound",
        r#"pods "nope" not found"#,
    );
    for sel in [
        "labelSelector=app%20in%20(web",
        "labelSelector=a%3D%3D%3Db%3D",
        "fieldSelector=spec.bogus%3Dx",
        "fieldSelector=nonsense",
    ] {
        let r = call(&k, "GET", &format!("/api/v1/pods?{sel}"), Some(&t), &[], b"");
        status_is(&r, 400, "BadRequest", "");
    }
    // Create twice, then update with a stale resourceVersion.
    let cm = br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"},"data":{"a":"1"}}"#;
    let created = call(&k, "POST", "/api/v1/namespaces/foo/configmaps", Some(&t), &json_ct, cm);
    assert_eq!(created.status, 201);
    let r = call(&k, "POST", "/api/v1/namespaces/foo/configmaps", Some(&t), &json_ct, cm);
    status_is(&r, 409, "AlreadyExists", r#"configmaps "c" already exists"#);
    let stale = br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c","resourceVersion":"1"}}"#;
    let r = call(&k, "PUT", "/api/v1/namespaces/foo/configmaps/c", Some(&t), &json_ct, stale);
    status_is(&r, 409, "Conflict", "the object has been modified");
    let r = call(&k, "POST", "/api/v1/namespaces/nowhere/configmaps", Some(&t), &json_ct, cm);
    status_is(&r, 404, "NotFound", r#"namespaces "nowhere" not found"#);
    let merge = [("Content-Type", "application/merge-patch+json")];
    let r = call(&k, "PATCH", "/api/v1/namespaces/foo/configmaps/c", Some(&t), &merge, b"{oops");
    status_is(&r, 400, "BadRequest", "");
    let r =
        call(&k, "PATCH", "/api/v1/namespaces/foo/configmaps/c", Some(&t), &merge, br#"{"data":{"a":null,"b":"2"}}"#);
    assert_eq!(r.json()["data"], json!({"b": "2"}));
    let jp = [("Content-Type", "application/json-patch+json")];
    let r = call(
        &k,
        "PATCH",
        "/api/v1/namespaces/foo/configmaps/c",
        Some(&t),
        &jp,
        br#"[{"op":"add","path":"/data/c","value":"3"}]"#,
    );
    assert_eq!(r.json()["data"], json!({"b": "2", "c": "3"}));
    let r = call(&k, "POST", "/api/v1/namespaces/default/pods/db-0/exec?command=ls", Some(&t), &[], b"");
    status_is(&r, 400, "BadRequest", "Upgrade request required");

    // Oversized: the limit is 3 MiB; the answer comes without reading it all.
    let mut s = https::connect(k.addr(), https::client_config(&k.ca_der(), None));
    let auth = format!("Bearer {t}");
    let head = format!(
        "POST /api/v1/namespaces/default/configmaps HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{{",
        3 * 1024 * 1024 + 1
    );
    s.write_all(head.as_bytes()).unwrap();
    s.flush().unwrap();
    let (mut r, rest) = https::read_head(&mut s);
    https::read_body(&mut s, &mut r, rest);
    status_is(&r, 413, "RequestEntityTooLarge", "Request entity too large: limit is 3145728");

    // Garbage instead of HTTP: 400, never a hang.
    let mut s = https::connect(k.addr(), https::client_config(&k.ca_der(), None));
    s.write_all(b"\x01\x02 nonsense\r\n\r\n").unwrap();
    s.flush().unwrap();
    let (r, _) = https::read_head(&mut s);
    assert_eq!(r.status, 400);
    // Still serving.
    assert_eq!(call(&k, "GET", "/version", Some(&t), &[], b"").json()["gitVersion"], "v1.32.3");
}

#[test]
fn list_paging_and_selectors() {
    let k = StandIn::start(Config::default());
    let t = k.admin_token();
    let all = call(&k, "GET", "/api/v1/pods", Some(&t), &[], b"").json();
    let total = all["items"].as_array().unwrap().len();
    assert!(total >= 8, "{total}");
    let mut names = Vec::new();
    let mut path = "/api/v1/pods?limit=3".to_string();
    loop {
        let page = call(&k, "GET", &path, Some(&t), &[], b"").json();
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 3);
        names.extend(items.iter().map(|i| i["metadata"]["name"].as_str().unwrap().to_string()));
        match page["metadata"]["continue"].as_str() {
            Some(c) => path = format!("/api/v1/pods?limit=3&continue={c}"),
            None => break,
        }
    }
    assert_eq!(names.len(), total);
    let q = |sel: &str| {
        let v = call(&k, "GET", &format!("/api/v1/pods?{sel}"), Some(&t), &[], b"").json();
        let mut n: Vec<String> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        n.sort();
        n
    };
    assert_eq!(q("labelSelector=app%3Dweb").len(), 2);
    assert_eq!(q("labelSelector=app%20in%20(db,node-exporter)").len(), 3);
    assert_eq!(q("labelSelector=app,app!%3Dweb,app%20notin%20(foo-app,bar-app)").len(), 3);
    assert_eq!(q("labelSelector=!app").len(), 2); // coredns and the job's pod
    assert_eq!(q("fieldSelector=status.phase%3DSucceeded"), ["backup-7xk2p"]);
    assert_eq!(q("fieldSelector=spec.nodeName%3Dedge-1,metadata.namespace%3Ddefault").len(), 3);
    assert_eq!(q("fieldSelector=metadata.name%3Ddb-0"), ["db-0"]);
}

/// Reads a chunked stream until `needle` appears in what arrived.
fn read_until(s: &mut https::Stream, got: &mut Vec<u8>, needle: &str) {
    let deadline = Instant::now() + PATIENCE;
    let mut tmp = [0u8; 8192];
    while !String::from_utf8_lossy(got).contains(needle) {
        assert!(Instant::now() < deadline, "no {needle:?} in {}", String::from_utf8_lossy(got));
        match s.read(&mut tmp) {
            Ok(0) => panic!("stream ended before {needle:?}: {}", String::from_utf8_lossy(got)),
            Ok(n) => got.extend_from_slice(&tmp[..n]),
            Err(e) => panic!("{e}: {}", String::from_utf8_lossy(got)),
        }
    }
}

#[test]
fn watch_streams_changes_bookmarks_and_times_out() {
    let k = StandIn::start(Config::default());
    let t = k.admin_token();
    let auth = format!("Bearer {t}");
    let mut s = https::connect(k.addr(), https::client_config(&k.ca_der(), None));
    let path = "/api/v1/namespaces/foo/configmaps?watch=1&allowWatchBookmarks=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan";
    https::send(&mut s, "GET", path, &[("Authorization", &auth)], b"");
    let (r, mut got) = https::read_head(&mut s);
    assert_eq!(r.status, 200);
    read_until(&mut s, &mut got, "k8s.io/initial-events-end");
    let json_ct = [("Content-Type", "application/json")];
    let cm = br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"w"},"data":{"a":"1"}}"#;
    assert_eq!(call(&k, "POST", "/api/v1/namespaces/foo/configmaps", Some(&t), &json_ct, cm).status, 201);
    read_until(&mut s, &mut got, r#""type":"ADDED""#);
    let merge = [("Content-Type", "application/merge-patch+json")];
    assert_eq!(
        call(&k, "PATCH", "/api/v1/namespaces/foo/configmaps/w", Some(&t), &merge, br#"{"data":{"a":"2"}}"#).status,
        200
    );
    read_until(&mut s, &mut got, r#""type":"MODIFIED""#);
    assert_eq!(call(&k, "DELETE", "/api/v1/namespaces/foo/configmaps/w", Some(&t), &[], b"").status, 200);
    read_until(&mut s, &mut got, r#""type":"DELETED""#);
    // A change in another namespace is not seen.
    assert!(!String::from_utf8_lossy(&got).contains("kube-system"));

    // ADDED for what exists, then the stream ends at timeoutSeconds.
    let r = call(&k, "GET", "/api/v1/namespaces/default/pods?watch=true&timeoutSeconds=1", Some(&t), &[], b"");
    assert_eq!(r.status, 200);
    let events: Vec<serde_json::Value> =
        r.text().lines().map(|l| serde_json::from_str(l).expect("one JSON event per line")).collect();
    assert!(events.len() >= 6 && events.iter().all(|e| e["type"] == "ADDED"), "{events:?}");
}

#[test]
fn access_reviews_in_json_and_protobuf() {
    let k = with_rbac();
    let t = k.agent_token();
    let alice = [("Impersonate-User", "alice"), ("Content-Type", "application/json")];
    let review = |ns: &str| {
        format!(
            r#"{{"apiVersion":"authorization.k8s.io/v1","kind":"SelfSubjectAccessReview","spec":{{"resourceAttributes":{{"namespace":"{ns}","verb":"list","resource":"pods"}}}}}}"#
        )
    };
    let path = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews";
    let yes = call(&k, "POST", path, Some(&t), &alice, review("default").as_bytes());
    assert_eq!(yes.json()["status"]["allowed"], true, "{}", yes.text());
    let no = call(&k, "POST", path, Some(&t), &alice, review("kube-system").as_bytes());
    assert_eq!(no.json()["status"]["allowed"], false);

    // The protobuf kubectl sends: k8s\0 + runtime.Unknown{typeMeta, raw}.
    fn field(n: u8, v: &[u8]) -> Vec<u8> {
        let mut out = vec![(n << 3) | 2, v.len() as u8];
        out.extend_from_slice(v);
        out
    }
    let attrs = [field(1, b"default"), field(2, b"get"), field(3, b"apps"), field(5, b"deployments")].concat();
    let raw = field(2, &field(1, &attrs));
    let type_meta = [field(1, b"authorization.k8s.io/v1"), field(2, b"SelfSubjectAccessReview")].concat();
    let body = [b"k8s\0".to_vec(), field(1, &type_meta), field(2, &raw)].concat();
    let pb = [("Impersonate-User", "alice"), ("Content-Type", "application/vnd.kubernetes.protobuf")];
    let r = call(&k, "POST", path, Some(&t), &pb, &body);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["status"]["allowed"], true);
    assert_eq!(r.json()["spec"]["resourceAttributes"]["resource"], "deployments");
}

#[test]
fn kubectl_spdy_fallbacks_and_attach() {
    let Some((k, kc)) = cluster("spdy") else { return };
    let mut cmd = kc.command(&["port-forward", "pod/db-0", ":5432", "-n", "default", "--as", "bob"]);
    cmd.env("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false");
    let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let rx = lines(&mut child);
    let port = forwarded_port(&rx, PATIENCE);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(b"over plain SPDY").unwrap();
    let mut back = [0u8; 15];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"over plain SPDY");
    kill(child);
    let pf: Vec<_> = k.requests().into_iter().filter(|r| r.path.ends_with("/portforward")).collect();
    assert!(pf.iter().any(|r| r.method == "POST" && r.status == 101 && r.verb == "create"), "{pf:#?}");
    // exec over SPDY (kubectl's fallback), with stdin and an exit code.
    let spdy = |args: &[&str], stdin: &[u8]| {
        let mut c = kc.command(args);
        c.env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false").stdin(std::process::Stdio::piped());
        let mut child = c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    };
    let cat = spdy(&["exec", "-i", "db-0", "-n", "default", "--as", "bob", "--", "cat"], b"spdy stdin\n");
    assert_eq!(ok(&cat), "spdy stdin\n");
    let exit3 = spdy(&["exec", "db-0", "-n", "default", "--as", "bob", "--", "sh", "-c", "echo x >&2; exit 3"], b"");
    assert_eq!((exit3.status.code(), stderr(&exit3).lines().next()), (Some(3), Some("x")));
    let posts = k.requests().into_iter().filter(|r| r.path.ends_with("/exec") && r.method == "POST").count();
    assert_eq!(posts, 2);
    // attach: the stand-in's "main process" echoes stdin.
    let attach = kc.run_with_stdin(&["attach", "-i", "db-0", "-n", "default", "--as", "bob"], b"attached\n");
    assert!(ok(&attach).contains("attached"), "{}", stdout(&attach));
}

#[test]
fn a_secret_s_string_data_is_stored_as_data() {
    let Some((k, admin)) = cluster("standin-stringdata") else { return };
    k.kubeconfig_for_token(admin.path(), &k.admin_token()).unwrap();
    let file = admin.dir.join("secret.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\n  namespace: default\n\
         data:\n  kept: a2VwdA==\nstringData:\n  plain: hello\n",
    )
    .unwrap();
    ok(&admin.run(&["apply", "--validate=false", "-f", file.to_str().unwrap()]));
    let s = k.object("v1", "Secret", "default", "s").unwrap();
    assert_eq!(s["data"], json!({ "kept": "a2VwdA==", "plain": "aGVsbG8=" }), "{s}");
    assert!(s.get("stringData").is_none(), "{s}");
    // An update merges it too.
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\n  namespace: default\nstringData:\n  plain: bye\n",
    )
    .unwrap();
    ok(&admin.run(&["replace", "--validate=false", "-f", file.to_str().unwrap()]));
    let s = k.object("v1", "Secret", "default", "s").unwrap();
    assert_eq!(s["data"], json!({ "plain": "Ynll" }), "{s}");
    assert!(s.get("stringData").is_none(), "{s}");
}
