//! User and group names as Kubernetes has them (IAM ARNs, emails, OIDC
//! subjects, `system:` groups, spaces, UTF-8), everywhere a name goes:
//! the REST API (percent-encoded path segments and query values), the
//! admin CLI and its tables, the rendered manifest's `resourceNames`
//! applied to a cluster, kubeconfigs, the agent's `Impersonate-*` fields
//! and the cluster's RBAC, with real processes and real kubectl:
//!
//! ```text
//!  uplink-hub cluster register --user NAME... ──► manifest ──► kubectl apply (stand-in)
//!  uplink run (file activation, the manifest's service account)
//!  per name: user add ─► grant add ─► kubeconfig ─► kubectl get pods
//!            (allowed in default by a RoleBinding naming exactly that subject,
//!             forbidden in kube-system in the cluster's words)
//!            ─► DELETE /api/v1/users/<percent-encoded> ─► kubectl refused
//! ```
//!
//! And `cluster register` losing nothing on a bad argument: checks before
//! the call, the activation printed when files cannot be written,
//! `--force` and `cluster renew` for a PENDING cluster.
#![cfg(feature = "hub")]

mod hub_support;
mod support;

use hub_support::{HubProc, KillOnDrop, activate, fails, hub_cli, ok, temp_dir, wait_for, write_kube_credentials};
use serde_json::{Value, json};
use std::path::Path;
use std::process::Output;
use std::time::Duration;
use support::kube::{Config, StandIn};
use support::kubectl::Kubectl;

/// The article's Alice, percent-encoded as the issue spells it.
const ALICE: &str = "arn:aws:iam::1234567890:user/Alice";
const ALICE_PATH: &str = "/api/v1/users/arn%3Aaws%3Aiam%3A%3A1234567890%3Auser%2FAlice";

/// Percent-encodes every byte but RFC 3986's unreserved ones. Written
/// here, apart from the hub's own encoder, so the test does not check
/// the hub against itself.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The token `user add` printed.
fn token_from(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("token (shown only this once): "))
        .unwrap_or_else(|| panic!("no token in {out}"))
        .trim()
        .to_string()
}

/// A role binding in `default` that lets exactly `subject` (a `User` or
/// `Group`) list pods, as YAML (JSON-quoted names are YAML scalars).
fn pod_reader_binding(n: usize, kind: &str, subject: &str) -> String {
    format!(
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: pod-reader-{n}
  namespace: default
subjects:
  - kind: {kind}
    name: {subject}
    apiGroup: rbac.authorization.k8s.io
roleRef:
  kind: Role
  name: pod-reader
  apiGroup: rbac.authorization.k8s.io
"#,
        subject = serde_json::to_string(subject).unwrap()
    )
}

const POD_READER: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: pod-reader
  namespace: default
rules:
  - apiGroups: [""]
    resources: ["pods"]
    verbs: ["get", "list"]
"#;

/// One person of the table: their name, their groups, the subject the
/// cluster binds (`None`: none, they rely on `system:masters`).
struct Person {
    name: &'static str,
    groups: &'static [&'static str],
    binding: Option<(&'static str, &'static str)>,
    /// Whether `kubectl get pods -n kube-system` is allowed.
    kube_system: bool,
}

const PEOPLE: &[Person] = &[
    Person { name: ALICE, groups: &[], binding: Some(("User", ALICE)), kube_system: false },
    Person { name: "jane@example.com", groups: &[], binding: Some(("User", "jane@example.com")), kube_system: false },
    Person {
        name: "oidc:https://idp.example.com#42",
        groups: &[],
        binding: Some(("User", "oidc:https://idp.example.com#42")),
        kube_system: false,
    },
    Person { name: "Jane Doe", groups: &[], binding: Some(("User", "Jane Doe")), kube_system: false },
    Person { name: "Zoë Ångström", groups: &[], binding: Some(("User", "Zoë Ångström")), kube_system: false },
    Person { name: "山田", groups: &[], binding: Some(("User", "山田")), kube_system: false },
    Person {
        name: "ci-bot",
        groups: &["arn:aws:iam::1234567890:role/Admins"],
        binding: Some(("Group", "arn:aws:iam::1234567890:role/Admins")),
        kube_system: false,
    },
    Person { name: "root-bot", groups: &["system:masters"], binding: None, kube_system: true },
];

#[test]
fn names_as_kubernetes_has_them_end_to_end_through_kubectl() {
    let Some(admin_kc) = Kubectl::find("names-admin") else { return };
    let dir = temp_dir("names");
    let k = StandIn::start(Config::default());
    k.kubeconfig_for_token(admin_kc.path(), &k.admin_token()).unwrap();
    k.load_rbac_yaml(POD_READER).unwrap();
    for (n, p) in PEOPLE.iter().enumerate() {
        if let Some((kind, subject)) = p.binding {
            k.load_rbac_yaml(&pod_reader_binding(n, kind, subject)).unwrap();
        }
    }
    let hub = HubProc::start_on_free_port(&dir);
    let admin_token = hub.admin_token.clone().unwrap();
    let admin = hub.admin();
    let cli = |args: &[&str]| hub_cli(&hub, &admin_token, args);

    // Register with every name; the cluster's admin applies the manifest,
    // whose ClusterRole lets the agent impersonate exactly these names.
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut args = vec!["cluster", "register", "edge-names", "--out-dir", out_dir.to_str().unwrap()];
    for p in PEOPLE {
        args.extend(["--user", p.name]);
        for g in p.groups {
            args.extend(["--group", g]);
        }
    }
    ok(&cli(&args));
    let manifest = out_dir.join("uplink-edge-names.yaml");
    ok(&admin_kc.run(&["apply", "--validate=false", "-f", manifest.to_str().unwrap()]));
    let role = k.object("rbac.authorization.k8s.io/v1", "ClusterRole", "", "uplink-impersonate").unwrap();
    let mut users: Vec<&str> = PEOPLE.iter().map(|p| p.name).collect();
    users.sort_unstable();
    assert_eq!(role["rules"][1]["resourceNames"], json!(users), "{role}");

    // The agent: the file activation, the manifest's service account.
    std::fs::copy(out_dir.join("uplink-edge-names-activation.json"), dir.join("activation.json")).unwrap();
    write_kube_credentials(&dir, &k.agent_token(), &k.ca_pem());
    let (activation, state) = (dir.join("activation.json"), dir.join("state"));
    let flags = ["--activation".as_ref(), activation.as_os_str(), "--state".as_ref(), state.as_os_str()];
    let _agent = KillOnDrop(hub_support::spawn_agent(&flags, &k.url(), &dir, &dir.join("agent.log")));
    assert!(
        wait_for(60, || admin.get("/api/v1/clusters/edge-names").unwrap().json()["status"] == "ACTIVE"),
        "agent log:\n{}",
        std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
    );

    let mut table = Vec::new();
    for (n, p) in PEOPLE.iter().enumerate() {
        let kc = Kubectl::find(&format!("names-{n}")).unwrap();
        let mut add = vec!["user", "add", p.name];
        for g in p.groups {
            add.extend(["--group", g]);
        }
        let token = token_from(&ok(&cli(&add)));
        ok(&cli(&["grant", "add", "--user", p.name, "--clusters", "edge-names"]));
        ok(&hub_cli(&hub, &token, &["kubeconfig", "--cluster", "edge-names", "--out", kc.path().to_str().unwrap()]));
        let kubeconfig = std::fs::read_to_string(kc.path()).unwrap();
        assert!(kubeconfig.is_ascii(), "names are escaped in the kubeconfig:\n{kubeconfig}");

        let pods = ok(&kc.run(&["get", "pods", "-n", "default"]));
        assert!(pods.contains("web-7d4b9c8f6d-k2x9p"), "{}: {pods}", p.name);
        let system = kc.run(&["get", "pods", "-n", "kube-system"]);
        if p.kube_system {
            assert!(stdout(&system).contains("coredns"), "{}: {}", p.name, stderr(&system));
        } else {
            let said = format!(
                r#"User {:?} cannot list resource "pods" in API group "" in the namespace "kube-system""#,
                p.name
            );
            fails(&system, &said);
        }
        // The cluster saw the name byte for byte, as the impersonated user.
        let seen = k.requests().into_iter().filter(|r| r.impersonated_user.as_deref() == Some(p.name)).count();
        assert!(seen >= 2, "{}: the cluster saw {seen} requests as this name", p.name);
        let as_groups: Vec<String> = k
            .requests()
            .into_iter()
            .filter(|r| r.impersonated_user.as_deref() == Some(p.name))
            .flat_map(|r| r.impersonated_groups)
            .collect();
        assert!(p.groups.iter().all(|g| as_groups.iter().any(|s| s == g)), "{}: {as_groups:?}", p.name);

        // The audit log filtered by the name in a query string.
        let audit =
            admin.get(&format!("/api/v1/audit?user={}&cluster=edge-names&limit=1000", enc(p.name))).unwrap().json();
        let entries = audit["entries"].as_array().unwrap();
        assert!(entries.len() >= 2 && entries.iter().all(|e| e["user"] == p.name), "{}: {audit}", p.name);

        // Revoked through REST with the name as one percent-encoded segment.
        let path = if p.name == ALICE { ALICE_PATH.to_string() } else { format!("/api/v1/users/{}", enc(p.name)) };
        let r = admin.delete(&path).unwrap();
        assert_eq!((r.status, r.json()["user"]["name"].as_str()), (200, Some(p.name)), "{path}: {}", r.text());
        let refused = kc.run(&["get", "pods", "-n", "default"]);
        fails(&refused, "You must be logged in to the server");
        table.push(format!(
            "{:<36} groups {:?}: allowed in default, {} in kube-system, revoked via {path}",
            format!("{:?}", p.name),
            p.groups,
            if p.kube_system { "allowed" } else { "forbidden" }
        ));
    }

    // A name the cluster was not registered with is not impersonated,
    // however close it looks: names are compared exactly.
    let kc = Kubectl::find("names-lookalike").unwrap();
    let token = token_from(&ok(&cli(&["user", "add", "Zoe Angstrom"])));
    ok(&cli(&["grant", "add", "--user", "Zoe Angstrom", "--clusters", "edge-names"]));
    ok(&hub_cli(&hub, &token, &["kubeconfig", "--cluster", "edge-names", "--out", kc.path().to_str().unwrap()]));
    fails(&kc.run(&["get", "pods", "-n", "default"]), r#"was registered to impersonate only ["#);
    assert!(!k.requests().iter().any(|r| r.impersonated_user.as_deref() == Some("Zoe Angstrom")));

    eprintln!("names tried end to end:\n{}", table.join("\n"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn rest_takes_every_name_and_refuses_control_characters_saying_which() {
    let dir = temp_dir("names-rest");
    let hub = HubProc::start(&dir);
    let admin = hub.admin();
    let names = [
        ALICE,
        "arn:aws:iam::1234567890:role/Admins",
        "jane@example.com",
        "oidc:https://idp.example.com#42",
        "system:masters",
        "Jane Doe",
        "Zoë Ångström",
        "山田",
        "a+b&c=d?e#f%g",
    ];
    let mut tokens = Vec::new();
    for name in names {
        let r = admin.post_json("/api/v1/users", &json!({ "name": name, "groups": [name] })).unwrap();
        assert_eq!(r.status, 201, "{name}: {}", r.text());
        assert_eq!(r.json()["user"]["name"], name);
        let token = r.json()["token"].as_str().unwrap().to_string();
        assert_eq!(hub.client(Some(&token)).get("/api/v1/whoami").unwrap().json()["name"], name);
        tokens.push(token);
        let g = admin.post_json("/api/v1/grants", &json!({ "user": name, "clusters": "edge-*" })).unwrap();
        assert_eq!(g.status, 201, "{name}: {}", g.text());
        let g = admin.post_json("/api/v1/grants", &json!({ "group": name, "clusters": "edge-*" })).unwrap();
        assert_eq!(g.status, 201, "{name}: {}", g.text());
        let t = admin.post_json(&format!("/api/v1/users/{}/tokens", enc(name)), &json!({})).unwrap();
        assert_eq!((t.status, t.json()["user"].as_str()), (201, Some(name)), "{name}: {}", t.text());
        let audit = admin.get(&format!("/api/v1/audit?user={}", enc(name))).unwrap();
        assert_eq!(audit.status, 200);
    }
    let reg =
        admin.post_json("/api/v1/clusters", &json!({ "name": "edge-1", "users": names, "groups": names })).unwrap();
    assert_eq!(reg.status, 201, "{}", reg.text());
    assert_eq!(reg.json()["cluster"]["users"], json!(names));

    // A raw `/` splits the path: no route, nothing revoked.
    let alice = hub.client(Some(&tokens[0]));
    assert_ne!(admin.delete("/api/v1/users/arn:aws:iam::1234567890:user/Alice").unwrap().status, 200);
    assert_eq!(alice.get("/api/v1/whoami").unwrap().status, 200);
    // The issue's own example, and `%2f` in lower case.
    let r = admin.delete(ALICE_PATH).unwrap();
    assert_eq!(alice.get("/api/v1/whoami").unwrap().status, 401);
    assert_eq!((r.status, r.json()["user"]["name"].as_str()), (200, Some(ALICE)), "{}", r.text());
    let r = admin.delete("/api/v1/users/arn:aws:iam::1234567890:role%2fAdmins").unwrap();
    assert_eq!((r.status, r.json()["user"]["name"].as_str()), (200, Some("arn:aws:iam::1234567890:role/Admins")));
    // `+` is a plus in a path; a space is %20.
    assert_eq!(admin.delete("/api/v1/users/a+b%26c%3Dd%3Fe%23f%25g").unwrap().status, 200);
    assert_eq!(admin.delete("/api/v1/users/Jane%20Doe").unwrap().status, 200);
    let bad = admin.delete("/api/v1/users/Zo%C3").unwrap();
    assert_eq!(bad.status, 400);
    assert!(bad.json()["message"].as_str().unwrap().contains("not percent-encoded UTF-8"), "{}", bad.text());

    let refused: &[(Value, &str)] = &[
        (
            json!({ "name": "a\nb" }),
            r#"user name "a\nb" has a control character U+000A at byte 1; names may hold any printable character"#,
        ),
        (
            json!({ "name": "x", "groups": ["ops\r\nImpersonate-User: root"] }),
            "group name \"ops\\r\\nImpersonate-User: root\" has a control character U+000D at byte 3",
        ),
        (json!({ "name": "nul\u{0}" }), "control character U+0000 at byte 3"),
        (json!({ "name": "del\u{7f}" }), "control character U+007F at byte 3"),
        (json!({ "name": "c1\u{85}" }), "control character U+0085 at byte 2"),
        (json!({ "name": " alice" }), "has a space at byte 0; names may not start or end with white space"),
        (json!({ "name": "" }), "a user name may not be empty"),
        (json!({ "name": "x".repeat(1025) }), "a user name of 1025 bytes is too long; names may be at most 1024 bytes"),
    ];
    for (body, message) in refused {
        let r = admin.post_json("/api/v1/users", body).unwrap();
        assert_eq!(r.status, 400, "{body}");
        assert!(r.json()["message"].as_str().unwrap().contains(message), "{body}: {}", r.text());
        let mut grant = json!({ "clusters": "*" });
        grant["user"] = body["name"].clone();
        if body.get("groups").is_none() {
            let r = admin.post_json("/api/v1/grants", &grant).unwrap();
            assert_eq!(r.status, 400, "{grant}");
            assert!(r.json()["message"].as_str().unwrap().contains(message), "{grant}: {}", r.text());
        }
    }
    let r = admin.post_json("/api/v1/clusters", &json!({ "name": "edge-2", "users": ["ok", "tab\there"] })).unwrap();
    assert_eq!(r.status, 400);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains(r#"user name "tab\there" has a control character U+0009 at byte 3"#)
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Where `register` writes for cluster `name`.
fn files(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    (dir.join(format!("uplink-{name}.yaml")), dir.join(format!("uplink-{name}-activation.json")))
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

#[test]
fn register_checks_before_the_call_and_loses_nothing() {
    let dir = temp_dir("names-register");
    let hub = HubProc::start(&dir);
    let admin = hub.admin();
    let token = hub.admin_token.clone().unwrap();
    let cli = |args: &[&str]| hub_cli(&hub, &token, args);
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let out_s = out.to_str().unwrap();
    let not_registered = |name: &str| admin.get(&format!("/api/v1/clusters/{name}")).unwrap().status == 404;

    // Refused before the call: nothing is registered.
    fails(&cli(&["cluster", "register", "edge-x", "--out-dir", "/missing"]), "--out-dir /missing: No such file");
    let file = dir.join("a-file");
    std::fs::write(&file, "").unwrap();
    fails(&cli(&["cluster", "register", "edge-x", "--out-dir", file.to_str().unwrap()]), "is not a directory");
    fails(
        &cli(&["cluster", "register", "edge-x", "--out-dir", out_s, "--user", "a\nb"]),
        "--user: user name \"a\\nb\" has a control character U+000A at byte 1",
    );
    fails(&cli(&["cluster", "register", "Edge_X", "--out-dir", out_s]), "is not a cluster name");
    fails(&cli(&["cluster", "register", "edge-x", "--out-dir", out_s, "--expires-hours", "0"]), "--expires-hours");
    let (manifest, activation) = files(&out, "edge-x");
    std::fs::write(&manifest, "mine").unwrap();
    fails(&cli(&["cluster", "register", "edge-x", "--out-dir", out_s]), "exists; move it away");
    assert_eq!(std::fs::read_to_string(&manifest).unwrap(), "mine", "not clobbered");
    // A directory that does not take new files (not as root: root writes anyway).
    let ro = dir.join("read-only");
    std::fs::create_dir_all(&ro).unwrap();
    let mut perms = std::fs::metadata(&ro).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o555);
    std::fs::set_permissions(&ro, perms).unwrap();
    if std::fs::write(ro.join("probe"), "").is_err() {
        fails(&cli(&["cluster", "register", "edge-x", "--out-dir", ro.to_str().unwrap()]), "does not take new files");
    }
    assert!(not_registered("edge-x"));

    // Asked to replace the files: registered, files written.
    let done = ok(&cli(&["cluster", "register", "edge-x", "--out-dir", out_s, "--user", ALICE, "--force"]));
    assert!(done.contains("cluster edge-x registered: PENDING"), "{done}");
    let first = read_json(&activation);
    assert!(std::fs::read_to_string(&manifest).unwrap().contains(r#"- "arn:aws:iam::1234567890:user/Alice""#));

    // Registering again says how to get a fresh activation.
    let again = cli(&["cluster", "register", "edge-x", "--out-dir", dir.to_str().unwrap()]);
    fails(&again, "cluster edge-x is already registered");
    fails(&again, "uplink-hub cluster renew edge-x");

    // Writing fails after the call (with --force, through a dangling
    // link where the activation goes): the activation and the manifest
    // are printed instead. Without --force the link is refused first.
    let lost = dir.join("lost");
    std::fs::create_dir_all(&lost).unwrap();
    let (_, lost_activation) = files(&lost, "edge-y");
    std::os::unix::fs::symlink(dir.join("no-such-dir/activation.json"), &lost_activation).unwrap();
    fails(&cli(&["cluster", "register", "edge-y", "--out-dir", lost.to_str().unwrap()]), "exists; move it away");
    assert!(not_registered("edge-y"));
    let o = cli(&["cluster", "register", "edge-y", "--out-dir", lost.to_str().unwrap(), "--force"]);
    fails(&o, "cluster edge-y registered, but its files could not be written");
    fails(&o, "uplink-edge-y-activation.json: No such file or directory");
    fails(&o, "The activation and the manifest are printed on standard output");
    let printed = stdout(&o);
    let json_part = printed
        .split("# ---- uplink-edge-y-activation.json")
        .nth(1)
        .and_then(|rest| rest.split_once('\n'))
        .map(|(_, rest)| rest.split("# ---- uplink-edge-y.yaml").next().unwrap())
        .unwrap_or_else(|| panic!("no activation printed:\n{printed}"));
    let printed_activation: Value = serde_json::from_str(json_part).unwrap();
    assert!(printed.contains("kind: ClusterRole"), "{printed}");
    let (st, body) = activate(&hub, &printed_activation);
    assert_eq!(st, 200, "the printed activation works: {body}");

    // --force on a PENDING cluster: a fresh activation, the old code dead.
    let forced =
        ok(&cli(&["cluster", "register", "edge-x", "--out-dir", out_s, "--user", "jane@example.com", "--force"]));
    assert!(forced.contains("cluster edge-x has a new activation: PENDING"), "{forced}");
    let second = read_json(&activation);
    assert_ne!(first["activation_id"], second["activation_id"]);
    assert!(std::fs::read_to_string(&manifest).unwrap().contains(r#"- "jane@example.com""#));
    let (st, old) = activate(&hub, &first);
    assert_eq!((st, old["error"].as_str()), (410, Some("activation_replaced")), "{old}");
    let shown = admin.get("/api/v1/clusters/edge-x").unwrap().json();
    assert_eq!(shown["users"], json!(["jane@example.com"]));
    assert_eq!(shown["events"][0]["kind"], "renewed", "{shown}");
    let (st, body) = activate(&hub, &second);
    assert_eq!(st, 200, "{body}");

    // Once activated, --force and renew refuse: deregister first.
    fails(
        &cli(&["cluster", "register", "edge-x", "--out-dir", out_s, "--force"]),
        "Deregister it first with `uplink-hub cluster deregister edge-x`",
    );
    fails(&cli(&["cluster", "renew", "edge-x", "--out-dir", out_s]), "Deregister it first");
    fails(&cli(&["cluster", "renew", "edge-nope", "--out-dir", out_s]), "no registered cluster edge-nope");

    // renew: an expired activation of a PENDING cluster, renewed.
    let short = admin
        .post_json("/api/v1/clusters", &json!({ "name": "edge-z", "expires_in_seconds": 1, "users": ["山田"] }))
        .unwrap()
        .json();
    std::thread::sleep(Duration::from_millis(1200));
    let (st, expired) = activate(&hub, &short["activation"]);
    assert_eq!((st, expired["error"].as_str()), (410, Some("activation_expired")));
    assert!(expired["message"].as_str().unwrap().contains("uplink-hub cluster renew"), "{expired}");
    let renewed = ok(&cli(&["cluster", "renew", "edge-z", "--out-dir", out_s]));
    assert!(renewed.contains("cluster edge-z has a new activation: PENDING"), "{renewed}");
    let (z_manifest, z_activation) = files(&out, "edge-z");
    assert!(std::fs::read_to_string(&z_manifest).unwrap().contains(r#"- "\u5C71\u7530""#), "users kept");
    let (st, body) = activate(&hub, &read_json(&z_activation));
    assert_eq!(st, 200, "{body}");

    // The REST form, with an empty body, and its refusals.
    admin.post_json("/api/v1/clusters", &json!({ "name": "edge-w" })).unwrap();
    let r = admin.request("POST", "/api/v1/clusters/edge-w/activation", &[], None).unwrap();
    assert_eq!((r.status, r.json()["renewed"].as_bool()), (200, Some(true)), "{}", r.text());
    assert!(
        r.json()["manifest"].as_str().unwrap().contains(r.json()["activation"]["activation_code"].as_str().unwrap())
    );
    assert_eq!(admin.request("POST", "/api/v1/clusters/nope/activation", &[], None).unwrap().status, 404);
    assert_eq!(admin.post_json("/api/v1/clusters/edge-x/activation", &json!({})).unwrap().status, 409);
    let alice = hub.client(Some(&token_from(&ok(&cli(&["user", "add", "someone"])))));
    assert_eq!(alice.post_json("/api/v1/clusters/edge-w/activation", &json!({})).unwrap().status, 403);
    std::fs::remove_dir_all(&dir).ok();
}

/// Display columns of `s` as the CLI counts them (the CLI's own rule is
/// tested in `hub::table`; here the wide names are all CJK).
fn width(s: &str) -> usize {
    s.chars().map(|c| if ('\u{4E00}'..='\u{9FFF}').contains(&c) { 2 } else { 1 }).sum()
}

/// The display column where each of `cells` starts on `line`.
fn starts(line: &str, cells: &[&str]) -> Vec<usize> {
    let mut from = 0;
    cells
        .iter()
        .map(|c| {
            let i = from + line[from..].find(c).unwrap_or_else(|| panic!("{c:?} not in {line:?}"));
            from = i + c.len();
            width(&line[..i])
        })
        .collect()
}

#[test]
fn cli_tables_stay_aligned_with_long_names_and_names_reach_urls_whole() {
    let dir = temp_dir("names-tables");
    let hub = HubProc::start(&dir);
    let admin = hub.admin();
    let token = hub.admin_token.clone().unwrap();
    let cli = |args: &[&str]| hub_cli(&hub, &token, args);
    let people = [ALICE, "山田", "Zoë Ångström", "oidc:https://idp.example.com#42"];
    let mut tokens = Vec::new();
    for p in people {
        tokens.push(token_from(&ok(&cli(&["user", "add", p, "--group", "arn:aws:iam::1234567890:role/Admins"]))));
        ok(&cli(&["grant", "add", "--user", p, "--clusters", "edge-*"]));
    }
    ok(&cli(&["cluster", "register", "edge-1", "--out-dir", dir.to_str().unwrap()]));
    ok(&cli(&["cluster", "register", "edge-with-a-much-longer-name-than-usual", "--out-dir", dir.to_str().unwrap()]));
    // Requests to a PENDING cluster are refused and audited under the name.
    for t in &tokens {
        hub.client(Some(t)).get("/k8s/clusters/edge-1/api").unwrap();
    }
    assert!(wait_for(10, || admin.get("/api/v1/audit").unwrap().json()["entries"].as_array().unwrap().len() == 4));

    let users = ok(&cli(&["user", "list"]));
    let lines: Vec<&str> = users.lines().collect();
    assert_eq!(lines.len(), 1 + 1 + people.len(), "{users}");
    let header = starts(lines[0], &["NAME", "ADMIN", "REVOKED", "GROUPS"]);
    for name in std::iter::once("admin").chain(people) {
        let line = lines.iter().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name}: {users}"));
        let at = starts(line, &[name, if name == "admin" { "true" } else { "false" }, "-"]);
        assert_eq!(at, header[..3], "{users}");
    }

    let grants = ok(&cli(&["grant", "list"]));
    let lines: Vec<&str> = grants.lines().collect();
    let header = starts(lines[0], &["ID", "SUBJECT", "CLUSTERS"]);
    for (line, name) in lines[1..].iter().zip(people) {
        let subject = format!("user:{name}");
        let at = starts(line, &[&subject, "edge-*"]);
        assert_eq!(at, header[1..], "{grants}");
    }

    let clusters = ok(&cli(&["cluster", "list"]));
    let lines: Vec<&str> = clusters.lines().collect();
    let header = starts(lines[0], &["NAME", "STATUS"]);
    assert_eq!(starts(lines[1], &["edge-1", "PENDING"]), header, "{clusters}");
    assert_eq!(starts(lines[2], &["edge-with-a-much-longer-name-than-usual", "PENDING"]), header, "{clusters}");

    // `audit --user NAME` puts the name in the query string encoded.
    for p in people {
        let audit = ok(&cli(&["audit", "--user", p]));
        let lines: Vec<&str> = audit.lines().collect();
        assert_eq!(lines.len(), 2, "{p}: {audit}");
        let header = starts(lines[0], &["TIME", "USER", "CLUSTER", "STATUS"]);
        let at = starts(lines[1], &["20", p, "edge-1"]);
        assert_eq!(at, header[..3], "{audit}");
    }
    let all = ok(&cli(&["audit", "--cluster", "edge-1"]));
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.len(), 5, "{all}");
    let header = starts(lines[0], &["TIME", "USER", "CLUSTER", "STATUS"]);
    for line in &lines[1..] {
        let user = people.iter().find(|p| line.contains(*p)).unwrap();
        let at = starts(line, &["20", user, "edge-1", "503"]);
        assert_eq!(at[..3], header[..3], "{all}");
        // STATUS is right-aligned: the cell ends where the header does.
        assert_eq!(at[3] + "503".len(), header[3] + "STATUS".len(), "{all}");
    }

    // `user revoke` puts the name in the path encoded.
    let revoked = ok(&cli(&["user", "revoke", ALICE]));
    assert!(revoked.contains(&format!("user {ALICE} revoked")), "{revoked}");
    assert_eq!(hub.client(Some(&tokens[0])).get("/api/v1/whoami").unwrap().status, 401);
    assert_eq!(hub.client(Some(&tokens[1])).get("/api/v1/whoami").unwrap().status, 200);
    std::fs::remove_dir_all(&dir).ok();
}
