//! The hub as a real process: REST API, activation, tunnels with
//! simulated agents, the kube front end, audit, durability.
#![cfg(feature = "hub")]

mod hub_support;

use hub_support::{HubProc, SimAgents, activate, temp_dir, wait_for};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::time::Duration;
use uplink::proto::GoAwayCode;

fn register(hub: &HubProc, name: &str, body: Value) -> Value {
    let mut body = body;
    body["name"] = json!(name);
    let r = hub.admin().post_json("/api/v1/clusters", &body).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()
}

fn cluster_status(hub: &HubProc, name: &str) -> String {
    hub.admin().get(&format!("/api/v1/clusters/{name}")).unwrap().json()["status"].as_str().unwrap_or("").to_string()
}

fn add_user(hub: &HubProc, name: &str, groups: &[&str]) -> String {
    let r = hub.admin().post_json("/api/v1/users", &json!({ "name": name, "groups": groups })).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["token"].as_str().unwrap().to_string()
}

#[test]
fn first_start_prints_the_admin_token_once_and_kill9_loses_nothing() {
    let dir = temp_dir("durable");
    let mut hub = HubProc::start(&dir);
    let token = hub.admin_token.clone().expect("first start prints the admin token");
    assert!(hub.stdout.iter().any(|l| l.contains("console: https://")), "{:?}", hub.stdout);
    let me = hub.admin().get("/api/v1/whoami").unwrap().json();
    assert_eq!(me["name"], "admin");
    assert_eq!(me["admin"], true);
    let reg = register(&hub, "edge-1", json!({ "users": ["alice"], "groups": ["devs"] }));
    let alice = add_user(&hub, "alice", &["devs"]);
    let g = hub.admin().post_json("/api/v1/grants", &json!({ "group": "devs", "clusters": "edge-*" })).unwrap();
    assert_eq!(g.status, 201);
    let (st, act) = activate(&hub, &reg["activation"]);
    assert_eq!(st, 200, "{act}");
    hub.kill9();

    let hub2 = HubProc::start(&dir);
    assert_eq!(hub2.admin_token, None, "later starts must not print a token: {:?}", hub2.stdout);
    let admin = hub2.client(Some(&token));
    let list = admin.get("/api/v1/clusters").unwrap().json();
    assert_eq!(list["clusters"][0]["name"], "edge-1");
    assert_eq!(list["clusters"][0]["status"], "DISCONNECTED", "activated before the kill");
    assert_eq!(hub2.client(Some(&alice)).get("/api/v1/whoami").unwrap().json()["groups"], json!(["devs"]));
    assert_eq!(admin.get("/api/v1/grants").unwrap().json()["grants"].as_array().unwrap().len(), 1);
    // The activation stays consumed; the credential still works.
    assert_eq!(activate(&hub2, &reg["activation"]).0, 409);
    let mut agents = SimAgents::start(hub2.addr, &hub2.ca_pem, act["credential"].as_str().unwrap(), 1);
    assert!(wait_for(10, || admin.get("/api/v1/clusters/edge-1").unwrap().json()["status"] == "ACTIVE"));
    agents.stop();
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn rest_api_crud_and_errors() {
    let dir = temp_dir("rest");
    let hub = HubProc::start(&dir);
    let admin = hub.admin();
    let anon = hub.client(None);
    let bogus = hub.client(Some("uh_nope"));

    let r = anon.get("/api/v1/clusters").unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "unauthorized");
    assert!(r.json()["message"].as_str().unwrap().contains("Bearer"));
    assert_eq!(bogus.get("/api/v1/clusters").unwrap().status, 401);
    assert_eq!(anon.get("/api/v1/hub").unwrap().json()["ca_pem"], json!(hub.ca_pem));
    assert_eq!(anon.get("/healthz").unwrap().status, 200);

    // Clusters.
    for bad in [
        json!({ "name": "Bad_Name" }),
        json!({ "name": "x", "users": ["a\nb"] }),
        json!({ "name": "x", "groups": [" devs"] }),
        json!({ "name": "x", "expires_in_hours": 0 }),
    ] {
        let r = admin.post_json("/api/v1/clusters", &bad).unwrap();
        assert_eq!(r.status, 400, "{bad} {}", r.text());
        assert_eq!(r.json()["error"], "bad_request");
    }
    assert_eq!(admin.request("POST", "/api/v1/clusters", &[], Some(b"{not json")).unwrap().status, 400);
    let reg = register(&hub, "edge-1", json!({ "users": ["alice"], "groups": ["devs"] }));
    assert_eq!(reg["cluster"]["status"], "PENDING");
    let act = &reg["activation"];
    assert_eq!(act["cluster"], "edge-1");
    assert!(act["activation_id"].as_str().unwrap().starts_with("act_"));
    assert!(act["hub_ca_pem"].as_str().unwrap().contains("BEGIN CERTIFICATE"));
    let manifest = reg["manifest"].as_str().unwrap();
    assert!(
        manifest.contains("resourceNames:\n      - \"alice\"") && manifest.contains("uplink-activation"),
        "{manifest}"
    );
    assert!(manifest.contains(act["activation_code"].as_str().unwrap()));
    let file: Value = serde_json::from_str(reg["systemd_activation"].as_str().unwrap()).unwrap();
    assert_eq!(file["activation_id"], act["activation_id"]);
    let dup = admin.post_json("/api/v1/clusters", &json!({ "name": "edge-1" })).unwrap();
    assert_eq!(dup.status, 409);
    assert_eq!(dup.json()["error"], "conflict");
    assert_eq!(admin.get("/api/v1/clusters/nope").unwrap().status, 404);
    assert_eq!(admin.delete("/api/v1/clusters/nope").unwrap().status, 404);
    let shown = admin.get("/api/v1/clusters/edge-1").unwrap().json();
    assert_eq!(shown["events"][0]["kind"], "registered");
    assert!(!shown.to_string().contains(act["activation_code"].as_str().unwrap()), "the code is never shown again");

    // Users.
    let alice = add_user(&hub, "alice", &["devs"]);
    let alice_c = hub.client(Some(&alice));
    assert_eq!(admin.post_json("/api/v1/users", &json!({ "name": "alice" })).unwrap().status, 409);
    assert_eq!(admin.post_json("/api/v1/users", &json!({ "name": "bad\tname" })).unwrap().status, 400);
    let users = admin.get("/api/v1/users").unwrap().json();
    assert_eq!(users["users"].as_array().unwrap().len(), 2);
    assert!(!users.to_string().contains(&alice), "tokens are never listed");
    let r = alice_c.post_json("/api/v1/clusters", &json!({ "name": "mine" })).unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "forbidden");
    assert_eq!(alice_c.get("/api/v1/users").unwrap().status, 403);
    assert_eq!(alice_c.get("/api/v1/audit").unwrap().status, 403);
    // Without a grant alice sees no clusters.
    assert_eq!(alice_c.get("/api/v1/clusters").unwrap().json()["clusters"], json!([]));
    assert_eq!(alice_c.get("/api/v1/clusters/edge-1").unwrap().status, 404);

    // Grants.
    let g = admin.post_json("/api/v1/grants", &json!({ "group": "devs", "clusters": "edge-*" })).unwrap();
    assert_eq!(g.status, 201);
    let id = g.json()["grant"]["id"].as_i64().unwrap();
    assert_eq!(
        admin.post_json("/api/v1/grants", &json!({ "group": "devs", "clusters": "edge-*" })).unwrap().status,
        409
    );
    assert_eq!(
        admin.post_json("/api/v1/grants", &json!({ "user": "a", "group": "b", "clusters": "*" })).unwrap().status,
        400
    );
    assert_eq!(admin.post_json("/api/v1/grants", &json!({ "user": "a", "clusters": "../x" })).unwrap().status, 400);
    assert_eq!(alice_c.get("/api/v1/clusters").unwrap().json()["clusters"][0]["name"], "edge-1");
    let kc = alice_c.get("/api/v1/kubeconfig?cluster=edge-1").unwrap();
    assert_eq!(kc.status, 200);
    assert!(
        kc.text().contains("/k8s/clusters/edge-1")
            && kc.text().contains(&alice)
            && kc.text().contains("certificate-authority-data")
    );
    assert_eq!(admin.get("/api/v1/grants").unwrap().json()["grants"][0]["group"], "devs");
    assert_eq!(admin.delete(&format!("/api/v1/grants/{id}")).unwrap().status, 200);
    assert_eq!(admin.delete(&format!("/api/v1/grants/{id}")).unwrap().status, 404);
    assert_eq!(alice_c.get("/api/v1/clusters").unwrap().json()["clusters"], json!([]));

    // Extra token, then revoke.
    let t2 = admin.post_json("/api/v1/users/alice/tokens", &json!({})).unwrap();
    assert_eq!(t2.status, 201);
    let t2 = t2.json()["token"].as_str().unwrap().to_string();
    assert_eq!(hub.client(Some(&t2)).get("/api/v1/whoami").unwrap().status, 200);
    assert_eq!(admin.delete("/api/v1/users/alice").unwrap().status, 200);
    assert_eq!(alice_c.get("/api/v1/whoami").unwrap().status, 401);
    assert_eq!(hub.client(Some(&t2)).get("/api/v1/whoami").unwrap().status, 401);
    assert_eq!(admin.delete("/api/v1/users/alice").unwrap().status, 404);

    // Deregister, then the name is free again.
    let d = admin.delete("/api/v1/clusters/edge-1").unwrap();
    assert_eq!(d.status, 200);
    assert!(d.json()["cleanup"].as_str().unwrap().contains("kubectl delete"));
    assert_eq!(admin.get("/api/v1/clusters").unwrap().json()["clusters"], json!([]));
    assert_eq!(admin.get("/api/v1/clusters?all=true").unwrap().json()["clusters"][0]["status"], "DEREGISTERED");
    register(&hub, "edge-1", json!({}));
    assert_eq!(admin.get("/api/v1/nope").unwrap().status, 404);
    assert_eq!(admin.request("PUT", "/api/v1/clusters", &[], None).unwrap().status, 405);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn activation_codes_are_single_use_and_errors_are_distinct() {
    let dir = temp_dir("activate");
    let hub = HubProc::start(&dir);
    let reg = register(&hub, "edge-1", json!({}));
    let act = &reg["activation"];

    let mut wrong = act.clone();
    wrong["activation_code"] = json!("not-the-code");
    let (st, body) = activate(&hub, &wrong);
    assert_eq!((st, body["error"].as_str()), (404, Some("unknown_activation")));
    let mut unknown = act.clone();
    unknown["activation_id"] = json!("act_nope");
    assert_eq!(activate(&hub, &unknown).1["error"], "unknown_activation");

    let (st, ok) = activate(&hub, act);
    assert_eq!(st, 200, "{ok}");
    assert_eq!(ok["cluster"], "edge-1");
    assert!(ok["cluster_id"].as_str().unwrap().starts_with("c_"));
    assert!(ok["credential"].as_str().unwrap().len() > 40);
    assert!(ok["hub_url"].as_str().unwrap().starts_with("https://"));
    let (st, used) = activate(&hub, act);
    assert_eq!((st, used["error"].as_str()), (409, Some("activation_used")));
    assert!(used["message"].as_str().unwrap().contains("uplink-hub cluster register"));
    assert_eq!(cluster_status(&hub, "edge-1"), "DISCONNECTED");

    let short = register(&hub, "edge-2", json!({ "expires_in_seconds": 1 }));
    std::thread::sleep(Duration::from_millis(1200));
    let (st, expired) = activate(&hub, &short["activation"]);
    assert_eq!((st, expired["error"].as_str()), (410, Some("activation_expired")));

    let gone = register(&hub, "edge-3", json!({}));
    assert_eq!(hub.admin().delete("/api/v1/clusters/edge-3").unwrap().status, 200);
    let (st, dereg) = activate(&hub, &gone["activation"]);
    assert_eq!((st, dereg["error"].as_str()), (410, Some("cluster_deregistered")));

    let r = hub.client(None).request("POST", "/v1/activate", &[], Some(b"{}")).unwrap();
    assert_eq!((r.status, r.json()["error"].as_str()), (400, Some("bad_request")));
    // Tunnel without credential / with an unknown one.
    let r = hub
        .client(None)
        .request("GET", "/v1/tunnel", &[("Connection", "Upgrade"), ("Upgrade", "uplink/1")], None)
        .unwrap();
    assert_eq!(r.status, 401);
    let r = hub
        .client(Some("uc_nope"))
        .request("GET", "/v1/tunnel", &[("Connection", "Upgrade"), ("Upgrade", "uplink/1")], None)
        .unwrap();
    assert_eq!((r.status, r.json()["error"].as_str()), (401, Some("unauthorized")));
    std::fs::remove_dir_all(&dir).ok();
}

/// Sends a raw request over TLS and returns the response head and a
/// reader for what follows.
fn raw_upgrade(
    hub: &HubProc,
    token: &str,
    path: &str,
) -> (String, rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>) {
    let mut tls = hub.client(None).connect().unwrap();
    write!(
        tls,
        "POST {path} HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {token}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    tls.flush().unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(tls.read(&mut b).unwrap(), 1);
        head.push(b[0]);
    }
    (String::from_utf8(head).unwrap(), tls)
}

#[test]
fn kube_front_end_through_a_simulated_agent() {
    let dir = temp_dir("kube");
    let hub = HubProc::start(&dir);
    let admin = hub.admin();
    let reg = register(&hub, "edge-1", json!({ "users": ["alice", "carol"], "groups": ["devs"] }));
    let alice = add_user(&hub, "alice", &["devs", "other"]);
    let bob = add_user(&hub, "bob", &["ops"]);
    let carol = add_user(&hub, "carol", &[]);
    admin.post_json("/api/v1/grants", &json!({ "group": "devs", "clusters": "edge-*" })).unwrap();
    admin.post_json("/api/v1/grants", &json!({ "user": "carol", "clusters": "edge-1" })).unwrap();
    let alice_c = hub.client(Some(&alice));

    // Pending: nobody has activated yet.
    let r = alice_c.get("/k8s/clusters/edge-1/api/v1/pods").unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["kind"], "Status");

    let since = admin.get("/api/v1/events").unwrap().json()["next"].as_u64().unwrap();
    let (_, act) = activate(&hub, &reg["activation"]);
    let credential = act["credential"].as_str().unwrap().to_string();
    let mut agents = SimAgents::start(hub.addr, &hub.ca_pem, &credential, 2);
    assert!(wait_for(10, || agents.state.lock().unwrap().connected == 2));
    assert!(wait_for(10, || cluster_status(&hub, "edge-1") == "ACTIVE"));
    let shown = admin.get("/api/v1/clusters/edge-1").unwrap().json();
    assert_eq!(
        (shown["agents"].as_u64(), shown["arch"].as_str(), shown["node_count"].as_u64()),
        (Some(2), Some("x86_64"), Some(3))
    );
    assert_eq!(shown["kube_version"], "v1.32.0");
    assert!(shown["connected_since"].is_string());
    let kinds: Vec<&str> = shown["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"activated") && kinds.contains(&"connected"), "{kinds:?}");
    let ev = admin.get(&format!("/api/v1/events?since={since}&wait=1")).unwrap().json();
    let ev_kinds: Vec<&str> = ev["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(ev_kinds.contains(&"connected"), "{ev}");

    // A plain request: identity from the hub, no client Authorization.
    let r = alice_c
        .request(
            "GET",
            "/k8s/clusters/edge-1/api/v1/namespaces/default/pods?limit=5",
            &[("Accept", "application/json;as=Table;g=meta.k8s.io;v=v1")],
            None,
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-sim"), Some("yes"));
    let echo = r.json();
    assert_eq!(echo["path"], "/api/v1/namespaces/default/pods?limit=5");
    assert_eq!(echo["user"], "alice");
    assert_eq!(echo["groups"], json!(["devs"]), "only groups the cluster may impersonate");
    let names: Vec<&str> = echo["headers"].as_array().unwrap().iter().map(|h| h.as_str().unwrap()).collect();
    assert!(names.contains(&"accept"), "{names:?}");
    assert!(
        !names.contains(&"authorization") && !names.contains(&"host") && !names.contains(&"connection"),
        "{names:?}"
    );
    let head = agents.state.lock().unwrap().heads.last().unwrap().clone();
    assert!(!head.headers.iter().any(|h| h.name.eq_ignore_ascii_case(b"authorization")));

    // A body goes up; Content-Length answers pass through.
    let r = alice_c
        .request(
            "POST",
            "/k8s/clusters/edge-1/cl/apply",
            &[("Content-Type", "application/apply-patch+yaml")],
            Some(b"kind: ConfigMap"),
        )
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body"], "kind: ConfigMap");
    assert!(r.header("content-length").is_some());
    let r = alice_c.get("/k8s/clusters/edge-1/missing").unwrap();
    assert_eq!(r.status, 404, "statuses pass through");

    // What a cluster answers never acts as the hub's own page: cookies,
    // CORS grants and page policies are dropped, a sandbox is added, and a
    // field that would split the response is refused.
    let r = alice_c.get("/k8s/clusters/edge-1/hostile").unwrap();
    assert_eq!(r.status, 200);
    assert!(r.header("set-cookie").is_none() && r.header("access-control-allow-origin").is_none());
    assert_eq!(r.header("content-security-policy"), Some("sandbox; default-src 'none'; frame-ancestors 'none'"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(r.header("x-sim"), Some("yes"), "other fields pass through");
    let r = alice_c.get("/k8s/clusters/edge-1/split").unwrap();
    assert_eq!(r.status, 502);
    assert!(r.header("set-cookie").is_none() && r.header("x-evil").is_none());

    // A long response streams (chunked) as it is produced.
    let mut tls = hub.client(None).connect().unwrap();
    write!(
        tls,
        "GET /k8s/clusters/edge-1/watch?watch=1 HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {alice}\r\n\r\n"
    )
    .unwrap();
    tls.flush().unwrap();
    let start = std::time::Instant::now();
    let mut first = [0u8; 64];
    let n = tls.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    let mut first_event_at = None;
    while !all.ends_with(b"0\r\n\r\n") {
        let n = tls.read(&mut buf).unwrap();
        assert!(n > 0);
        all.extend_from_slice(&buf[..n]);
        if first_event_at.is_none() && all.windows(5).any(|w| w == b"ADDED") {
            first_event_at = Some(start.elapsed());
        }
    }
    assert!(first_event_at.unwrap() < Duration::from_millis(250), "first event was held back: {first_event_at:?}");
    assert_eq!(String::from_utf8_lossy(&all).matches("ADDED").count(), 3);
    drop(tls);

    // Impersonation from the client is refused, readably.
    let r = alice_c.request("GET", "/k8s/clusters/edge-1/api/v1/pods", &[("Impersonate-User", "admin")], None).unwrap();
    assert_eq!(r.status, 403);
    let st = r.json();
    assert_eq!(
        (st["kind"].as_str(), st["status"].as_str(), st["reason"].as_str(), st["code"].as_u64()),
        (Some("Status"), Some("Failure"), Some("Forbidden"), Some(403))
    );
    assert!(st["message"].as_str().unwrap().contains("impersonation"), "{st}");
    let r =
        alice_c.request("GET", "/k8s/clusters/edge-1/api", &[("impersonate-group", "system:masters")], None).unwrap();
    assert_eq!(r.status, 403);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"), "discovery errors are text for kubectl");
    // No grant: 403 from the hub. A grant but not an impersonable user: 403.
    let r = hub.client(Some(&bob)).get("/k8s/clusters/edge-1/api/v1/pods").unwrap();
    assert_eq!(r.status, 403);
    assert!(r.json()["message"].as_str().unwrap().contains("no grant"));
    let r = hub.client(Some(&carol)).get("/k8s/clusters/edge-1/api/v1/pods").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["groups"], json!([]));
    assert_eq!(hub.client(None).get("/k8s/clusters/edge-1/api").unwrap().status, 401);
    // The hub caches tokens and grants: removing the grant or revoking
    // the user stops the very next request.
    let carol_c = hub.client(Some(&carol));
    assert_eq!(carol_c.get("/k8s/clusters/edge-1/api/v1/pods").unwrap().status, 200);
    let grants = admin.get("/api/v1/grants").unwrap().json();
    let carol_grant = grants["grants"].as_array().unwrap().iter().find(|g| g["user"] == "carol").unwrap()["id"].clone();
    assert_eq!(admin.delete(&format!("/api/v1/grants/{carol_grant}")).unwrap().status, 200);
    assert_eq!(carol_c.get("/k8s/clusters/edge-1/api/v1/pods").unwrap().status, 403);
    admin.post_json("/api/v1/grants", &json!({ "user": "carol", "clusters": "edge-1" })).unwrap();
    assert_eq!(carol_c.get("/k8s/clusters/edge-1/api/v1/pods").unwrap().status, 200);
    assert_eq!(admin.delete("/api/v1/users/carol").unwrap().status, 200);
    assert_eq!(carol_c.get("/k8s/clusters/edge-1/api/v1/pods").unwrap().status, 401);

    // Path tricks never reach another cluster.
    for bad in [
        "/k8s/clusters/edge-1/../edge-2/api",
        "/k8s/clusters/edge-1/%2e%2e/edge-2/api",
        "/k8s/clusters/edge-1%2F..%2Fedge-2/api",
        "/k8s/clusters/edge-1/k8s/clusters/edge-2/api",
        "/k8s/clusters/edge-1//api",
        "/k8s/clusters/edge-1/api/%252e%252e/",
    ] {
        let r = alice_c.get(bad).unwrap();
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert_eq!(r.json()["kind"], "Status");
    }
    assert_eq!(alice_c.get("/k8s/clusters/edge-9/api/v1/pods").unwrap().status, 404);

    // Upgrades: 101, then raw bytes both ways with half-close.
    let (head, mut tls) =
        raw_upgrade(&hub, &alice, "/k8s/clusters/edge-1/api/v1/namespaces/default/pods/p/exec?command=sh&stdin=true");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.to_ascii_lowercase().contains("upgrade: spdy/3.1") && head.contains("X-Sim: upgraded"), "{head}");
    tls.write_all(b"hello through the tunnel").unwrap();
    tls.flush().unwrap();
    let mut echo = vec![0u8; 24];
    tls.read_exact(&mut echo).unwrap();
    assert_eq!(echo, b"hello through the tunnel");
    tls.conn.send_close_notify();
    tls.flush().unwrap();
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest);
    assert_eq!(rest, b"bye", "after our half-close the cluster side still answers");
    let upgraded_head = agents.state.lock().unwrap().heads.last().unwrap().clone();
    assert!(upgraded_head.headers.iter().any(|h| h.name.eq_ignore_ascii_case(b"upgrade") && h.value == b"SPDY/3.1"));
    assert!(upgraded_head.headers.iter().any(|h| h.name.eq_ignore_ascii_case(b"x-stream-protocol-version")));

    // Audit has it all, with the right user.
    let audit = admin.get("/api/v1/audit?cluster=edge-1&limit=100").unwrap().json();
    let entries = audit["entries"].as_array().unwrap();
    assert!(
        entries.iter().any(|e| e["user"] == "alice"
            && e["path"] == "/api/v1/namespaces/default/pods?limit=5"
            && e["status"] == 200)
    );
    assert!(
        entries
            .iter()
            .any(|e| e["user"] == "alice" && e["upgrade"] == true && e["status"] == 101 && e["bytes_in"] == 24)
    );
    assert!(entries.iter().any(|e| e["user"] == "bob" && e["status"] == 403));
    assert!(entries.iter().any(|e| e["user"] == "alice" && e["method"] == "POST" && e["bytes_in"] == 15));
    let only_bob = admin.get("/api/v1/audit?user=bob").unwrap().json();
    assert!(only_bob["entries"].as_array().unwrap().iter().all(|e| e["user"] == "bob"));
    assert_eq!(admin.get("/api/v1/audit?since=2999-01-01T00:00:00Z").unwrap().json()["entries"], json!([]));
    assert_eq!(admin.get("/api/v1/audit?since=yesterday").unwrap().status, 400);
    let metrics = hub.client(None).get("/metrics").unwrap().text();
    assert!(metrics.contains("uplink_hub_agents_connected 2"), "{metrics}");
    assert!(metrics.contains("uplink_hub_kube_requests_total{cluster=\"edge-1\",code=\"200\"}"), "{metrics}");

    // Agents stop: DISCONNECTED, and requests get 503.
    agents.stop();
    assert!(wait_for(10, || cluster_status(&hub, "edge-1") == "DISCONNECTED"));
    let r = alice_c.get("/k8s/clusters/edge-1/api/v1/pods").unwrap();
    assert_eq!(r.status, 503);
    assert!(r.json()["message"].as_str().unwrap().contains("not connected"));
    let shown = admin.get("/api/v1/clusters/edge-1").unwrap().json();
    assert!(shown["last_seen"].is_string());
    assert!(shown["events"].as_array().unwrap().iter().any(|e| e["kind"] == "disconnected"));

    // They come back; then deregistration stops them for good.
    let mut agents = SimAgents::start(hub.addr, &hub.ca_pem, &credential, 1);
    assert!(wait_for(10, || cluster_status(&hub, "edge-1") == "ACTIVE"));
    let d = admin.delete("/api/v1/clusters/edge-1").unwrap().json();
    assert_eq!(d["agents_notified"], 1);
    assert!(wait_for(10, || agents.state.lock().unwrap().ended == 1));
    let goaways = agents.state.lock().unwrap().goaways.clone();
    assert_eq!(goaways.first().map(|g| g.0), Some(GoAwayCode::Deregistered), "{goaways:?}");
    agents.stop();
    let again = SimAgents::start(hub.addr, &hub.ca_pem, &credential, 1);
    assert!(wait_for(10, || !again.state.lock().unwrap().refused.is_empty()));
    assert_eq!(again.state.lock().unwrap().refused, vec![403]);
    let r = hub
        .client(Some(&credential))
        .request("GET", "/v1/tunnel", &[("Connection", "Upgrade"), ("Upgrade", "uplink/1")], None)
        .unwrap();
    assert_eq!(r.json()["error"], "cluster_deregistered");
    // Discovery paths get a hub-made refusal as 403 text, which kubectl
    // prints verbatim (a 404 on /api would read as "no resources").
    let gone = alice_c.get("/k8s/clusters/edge-1/api").unwrap();
    assert_eq!((gone.status, gone.text().trim()), (403, r#"uplink-hub: no registered cluster "edge-1""#));
    assert_eq!(alice_c.get("/k8s/clusters/edge-1/api/v1/pods").unwrap().status, 404);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sigterm_sends_shutting_down_to_agents() {
    let dir = temp_dir("term");
    let mut hub = HubProc::start(&dir);
    let reg = register(&hub, "edge-1", json!({}));
    let (_, act) = activate(&hub, &reg["activation"]);
    let agents = SimAgents::start(hub.addr, &hub.ca_pem, act["credential"].as_str().unwrap(), 1);
    assert!(wait_for(10, || cluster_status(&hub, "edge-1") == "ACTIVE"));
    let status = hub.terminate();
    assert!(status.success(), "{status:?}\n{}", hub.log());
    assert!(wait_for(10, || agents.state.lock().unwrap().ended == 1));
    assert_eq!(agents.state.lock().unwrap().goaways.first().map(|g| g.0), Some(GoAwayCode::ShuttingDown));
    assert!(hub.log().contains("shutting down"));
    std::fs::remove_dir_all(&dir).ok();
}

/// Not a pass/fail figure: prints the hub's resident memory idle and with
/// 100 connected (simulated) agents.
#[test]
fn memory_with_100_agents() {
    let dir = temp_dir("rss");
    let hub = HubProc::start(&dir);
    let reg = register(&hub, "edge-1", json!({}));
    let (_, act) = activate(&hub, &reg["activation"]);
    std::thread::sleep(Duration::from_millis(300));
    let idle = hub.rss_kib();
    let agents = SimAgents::start(hub.addr, &hub.ca_pem, act["credential"].as_str().unwrap(), 100);
    assert!(wait_for(30, || agents.state.lock().unwrap().connected == 100));
    assert!(wait_for(10, || hub.admin().get("/api/v1/clusters/edge-1").unwrap().json()["agents"] == 100));
    std::thread::sleep(Duration::from_millis(300));
    let loaded = hub.rss_kib();
    eprintln!(
        "hub RSS: idle {idle} KiB, with 100 agents {loaded} KiB ({} KiB per agent)",
        (loaded.saturating_sub(idle)) / 100
    );
    assert!(loaded < 200 * 1024, "hub RSS {loaded} KiB with 100 agents");
    std::fs::remove_dir_all(&dir).ok();
}
