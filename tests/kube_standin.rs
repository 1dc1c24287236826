//! The stand-in Kubernetes API server (tests/support/kube), driven by real
//! kubectl 1.32 with impersonation, and by hand-made HTTP requests.
//!
//! kubectl tests skip loudly when kubectl is missing, unless
//! `UPLINK_REQUIRE_KUBECTL=1`.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::kube::{AGENT_USER, Config, StandIn};
use support::kubectl::{Kubectl, stderr, stdout};

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

/// Lines of a child's stdout, as they come.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_line(rx: &mpsc::Receiver<String>, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) if pred(&l) => return l,
            Ok(l) => seen.push(l),
            Err(_) => break,
        }
    }
    panic!("no line with {what} within {PATIENCE:?}; saw {seen:#?}");
}

fn kill(mut child: Child) -> String {
    let _ = child.kill();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let _ = child.wait();
    err
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
    wait_line(&rx, "an existing pod", |l| l.contains("db-0"));
    k.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "late-arrival", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Pending"},
    }))
    .unwrap();
    let l = wait_line(&rx, "the new pod", |l| l.contains("late-arrival"));
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
    wait_line(&rx, "the existing log", |l| l.contains("listening"));
    k.append_log("default", "web-7d4b9c8f6d-k2x9p", "GET /healthz 200");
    wait_line(&rx, "the appended line", |l| l == "GET /healthz 200");
    k.append_log("default", "web-7d4b9c8f6d-k2x9p", "GET / 200");
    wait_line(&rx, "a second appended line", |l| l == "GET / 200");
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
    let l = wait_line(&rx, "Forwarding from", |l| l.starts_with("Forwarding from 127.0.0.1:"));
    let port: u16 = l
        .trim_start_matches("Forwarding from 127.0.0.1:")
        .split(' ')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("local port");
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
