//! Hubs as real processes on a shared PostgreSQL (started by the test):
//! replicas starting together, changes on one replica reaching another,
//! durability under kill -9, and the database going away and coming back.
//!
//! Not here: agents tunnelling to several replicas (`tests/hub_replicas.rs`)
//! and hand-off between replicas; an agent here holds one tunnel to one hub.
#![cfg(feature = "hub")]

mod hub_support;
mod support;

use hub_support::{HubProc, SimAgents, temp_dir, wait_for};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::pg::Postgres;

fn start(pg: &Postgres, tag: &str) -> HubProc {
    let dir = temp_dir(tag);
    HubProc::start_with(&dir, &["--listen", "127.0.0.1:0", "--store", &pg.url()])
}

fn add_user(hub: &HubProc, admin: &str, name: &str, groups: &[&str]) -> String {
    let r = hub.client(Some(admin)).post_json("/api/v1/users", &json!({ "name": name, "groups": groups })).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["token"].as_str().unwrap().to_string()
}

/// Registers and activates `name` on `hub`; returns the agent credential.
fn register_and_activate(hub: &HubProc, admin: &str, name: &str) -> String {
    let r = hub.client(Some(admin)).post_json("/api/v1/clusters", &json!({ "name": name })).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let act = &r.json()["activation"];
    let r = hub
        .client(None)
        .post_json(
            "/v1/activate",
            &json!({
                "activation_id": act["activation_id"], "activation_code": act["activation_code"],
                "agent_version": "sim-0.1", "arch": "x86_64", "kube_version": "v1.32.0", "node_count": 3,
            }),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["credential"].as_str().unwrap().to_string()
}

fn readyz(hub: &HubProc) -> (u16, String) {
    let r = hub.client(None).get("/readyz").unwrap();
    (r.status, r.text())
}

#[test]
fn three_replicas_starting_at_once_migrate_once_and_share_one_identity() {
    let Some(pg) = Postgres::start("hub-three") else { return };
    let hubs: Vec<HubProc> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|i| {
                s.spawn({
                    let pg = &pg;
                    move || start(pg, &format!("three-{i}"))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let migrated = hubs.iter().filter(|h| h.log().contains("store migrated to schema version 1")).count();
    assert_eq!(migrated, 1, "exactly one replica migrates");
    assert_eq!(hubs.iter().filter(|h| h.admin_token.is_some()).count(), 1, "one admin token is printed");
    assert!(hubs.iter().all(|h| h.ca_pem == hubs[0].ca_pem), "every replica presents the same CA");
    let token = hubs.iter().find_map(|h| h.admin_token.clone()).unwrap();
    for h in &hubs {
        assert_eq!(readyz(h).0, 200);
        // The admin made by one replica works on every replica, trusting
        // the one CA.
        assert_eq!(h.client(Some(&token)).get("/api/v1/users").unwrap().status, 200);
    }
    assert_eq!(pg.query("SELECT COUNT(*) FROM schema_version"), "1");
}

#[test]
fn bad_stores_are_one_line_errors_and_nonzero_exits() {
    let Some(pg) = Postgres::start("hub-bad") else { return };
    let hub = env!("CARGO_BIN_EXE_uplink-hub");
    let run = |store: &str| {
        let dir = temp_dir("bad");
        let o = std::process::Command::new(hub)
            .args(["serve", "--listen", "127.0.0.1:0", "--store", store, "--data-dir"])
            .arg(dir.join("data"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
        assert!(!o.status.success(), "{store}: {err}");
        let last = err.lines().last().unwrap_or("").to_string();
        assert!(last.starts_with("uplink-hub: "), "{store}: {err}");
        last
    };
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    assert!(run(&format!("postgres://postgres@127.0.0.1:{closed}/uplink")).contains("cannot connect to PostgreSQL"));
    assert!(
        run(&format!("postgres://postgres:{}@127.0.0.1:{}/nosuch", support::pg::PASSWORD, pg.port))
            .contains("database \"nosuch\" does not exist")
    );
    assert!(run("postgres://127.0.0.1/uplink?bogus=1").contains("invalid PostgreSQL connection string"));
    // A wrong password: said in one line, the password never.
    let wrong = format!("postgres://postgres:hunter2@127.0.0.1:{}/uplink", pg.port);
    let e = run(&wrong);
    assert!(e.contains("password authentication failed") && !e.contains("hunter2"), "{e}");
    // The password from a libpq password file (`passfile=`).
    let pass = temp_dir("passfile").join("pgpass");
    std::fs::write(&pass, format!("# uplink\n127.0.0.1:{}:uplink:postgres:{}\n", pg.port, support::pg::PASSWORD))
        .unwrap();
    let with_file = format!("{}&passfile={}", pg.url_without_password(), pass.display());
    let h = HubProc::start_with(&temp_dir("passfile-hub"), &["--listen", "127.0.0.1:0", "--store", &with_file]);
    assert_eq!(readyz(&h).0, 200);
    drop(h);
    std::fs::write(&pass, "*:*:*:postgres:hunter2\n").unwrap();
    let e = run(&with_file);
    assert!(e.contains("password authentication failed") && !e.contains("hunter2"), "{e}");
    // Two replicas cannot advertise one URL.
    let first = HubProc::start_with(
        &temp_dir("bad-url"),
        &["--listen", "127.0.0.1:0", "--store", &pg.url(), "--advertise-url", "https://hub-1.example:8443"],
    );
    let dir = temp_dir("bad-url-2");
    let o = std::process::Command::new(hub)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            &pg.url(),
            "--advertise-url",
            "https://hub-1.example:8443/",
        ])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    let last = err.trim().lines().last().unwrap();
    assert!(last.starts_with("uplink-hub: another live replica") && last.contains("--advertise-url"), "{err}");
    drop(first);

    // A database from a newer hub: refused, untouched.
    drop(start(&pg, "bad-first"));
    pg.query("INSERT INTO schema_version(version, applied_at) VALUES (42, 0)");
    let users = pg.query("SELECT COUNT(*) FROM users");
    let e = run(&pg.url());
    assert!(e.contains("schema version 42") && e.contains("nothing was changed"), "{e}");
    assert_eq!(pg.query("SELECT COUNT(*) FROM users"), users);
}

/// Writes on replica A reach replica B's cache through LISTEN/NOTIFY.
#[test]
fn changes_on_one_replica_take_effect_on_another_within_a_second() {
    let Some(pg) = Postgres::start("hub-two") else { return };
    let a = start(&pg, "two-a");
    let b = start(&pg, "two-b");
    let admin = a.admin_token.clone().unwrap();
    let alice = add_user(&a, &admin, "alice", &["devs"]);
    let g =
        a.client(Some(&admin)).post_json("/api/v1/grants", &json!({ "group": "devs", "clusters": "edge-*" })).unwrap();
    assert_eq!(g.status, 201, "{}", g.text());
    let grant_id = g.json()["grant"]["id"].as_i64().unwrap();
    let credential = register_and_activate(&a, &admin, "edge-1");

    // A cluster registered on A shows on B.
    let listed = b.client(Some(&admin)).get("/api/v1/clusters").unwrap().json();
    let names: Vec<&str> = listed["clusters"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["edge-1"]);

    // Alice through A (which holds the tunnel) and on B (which does not
    // yet: the cluster is known and granted, the tunnel is elsewhere).
    let agents = SimAgents::start(a.addr, &a.ca_pem, &credential, 1);
    assert!(wait_for(10, || agents.state.lock().unwrap().connected == 1));
    let kube =
        |hub: &HubProc, token: &str| hub.client(Some(token)).get("/k8s/clusters/edge-1/api/v1/pods").unwrap().status;
    assert_eq!(kube(&a, &alice), 200);
    let on_b = kube(&b, &alice);
    assert!(on_b != 401 && on_b != 403, "alice is known and granted on B: {on_b}");

    // B shows the cluster ACTIVE: A holds its tunnel (session rows).
    let shown = |hub: &HubProc| hub.client(Some(&admin)).get("/api/v1/clusters/edge-1").unwrap().json();
    assert!(wait_for(10, || shown(&b)["status"] == "ACTIVE"), "{}", shown(&b));
    assert_eq!((shown(&b)["agents"].as_u64(), shown(&b)["node_count"].as_u64()), (Some(1), Some(3)));
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_uplink-hub"))
        .args(["cluster", "list"])
        .env("UPLINK_HUB_URL", &b.url)
        .env("UPLINK_TOKEN", &admin)
        .env("UPLINK_HUB_CA", b.dir.join("data/ca.pem"))
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&cli.stdout);
    assert!(listed.lines().any(|l| l.contains("edge-1") && l.contains("ACTIVE")), "{listed}");

    // Removing the grant on A stops alice on B.
    assert_eq!(b.client(Some(&alice)).get("/api/v1/clusters").unwrap().json()["clusters"].as_array().unwrap().len(), 1);
    let t0 = Instant::now();
    assert_eq!(a.client(Some(&admin)).delete(&format!("/api/v1/grants/{grant_id}")).unwrap().status, 200);
    // (Measured on B's cluster list for alice, which answers at once; a
    // kube request on B may wait out the reconnect grace of a hub that
    // just started, as it holds no tunnel itself.)
    let reach = |hub: &HubProc| {
        hub.client(Some(&alice)).get("/api/v1/clusters").unwrap().json()["clusters"].as_array().unwrap().len()
    };
    assert!(wait_for(5, || reach(&b) == 0), "grant removal reaches B");
    let grant_took = t0.elapsed();
    assert_eq!(kube(&b, &alice), 403);
    assert_eq!(kube(&a, &alice), 403);
    a.client(Some(&admin)).post_json("/api/v1/grants", &json!({ "user": "alice", "clusters": "edge-1" })).unwrap();
    assert!(wait_for(5, || kube(&a, &alice) == 200));

    // Revoking alice on A: her token is refused on B, measured.
    assert_eq!(b.client(Some(&alice)).get("/api/v1/whoami").unwrap().status, 200, "cached on B");
    let t0 = Instant::now();
    assert_eq!(a.client(Some(&admin)).delete("/api/v1/users/alice").unwrap().status, 200);
    let mut revoked_after = None;
    while t0.elapsed() < Duration::from_secs(5) {
        if b.client(Some(&alice)).get("/api/v1/whoami").unwrap().status == 401 {
            revoked_after = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let revoked_after = revoked_after.expect("revocation on A reaches B");
    println!("revocation A→B took {revoked_after:?}; grant removal A→B took {grant_took:?}");
    assert!(revoked_after < Duration::from_secs(1), "{revoked_after:?}");
    assert!(grant_took < Duration::from_secs(1), "{grant_took:?}");
    assert_eq!(kube(&b, &alice), 401);
    assert_eq!(kube(&a, &alice), 401);

    // Deregistering on B: A refuses the cluster's requests at once.
    let bob = add_user(&b, &admin, "bob", &[]);
    b.client(Some(&admin)).post_json("/api/v1/grants", &json!({ "user": "bob", "clusters": "*" })).unwrap();
    assert!(wait_for(5, || kube(&a, &bob) == 200));
    assert_eq!(b.client(Some(&admin)).delete("/api/v1/clusters/edge-1").unwrap().status, 200);
    assert!(wait_for(1, || kube(&a, &bob) == 404), "deregistration on B reaches A");
    // ... and A tells the agent whose tunnel it holds to stop.
    assert!(
        wait_for(2, || agents
            .state
            .lock()
            .unwrap()
            .goaways
            .iter()
            .any(|(c, _)| *c == uplink::proto::GoAwayCode::Deregistered)),
        "{:?}",
        agents.state.lock().unwrap().goaways
    );
}

/// A replica killed with kill -9: its session rows expire after the
/// heartbeat deadline, and the others stop showing its tunnels.
#[test]
fn a_killed_replicas_sessions_expire() {
    let Some(pg) = Postgres::start("hub-expire") else { return };
    let mut a = start(&pg, "expire-a");
    let b = start(&pg, "expire-b");
    let admin = a.admin_token.clone().unwrap();
    let credential = register_and_activate(&a, &admin, "edge-1");
    let agents = SimAgents::start(a.addr, &a.ca_pem, &credential, 1);
    assert!(wait_for(10, || agents.state.lock().unwrap().connected == 1));
    let status = || b.client(Some(&admin)).get("/api/v1/clusters/edge-1").unwrap().json()["status"].clone();
    let since = b.client(Some(&admin)).get("/api/v1/events").unwrap().json()["next"].as_u64().unwrap();
    assert!(wait_for(10, || status() == "ACTIVE"));
    // B's console hears of the tunnel A holds.
    let ev = b.client(Some(&admin)).get(&format!("/api/v1/events?since={since}&wait=3")).unwrap().json();
    assert!(
        ev["events"].as_array().unwrap().iter().any(|e| e["kind"] == "connected" && e["status"] == "ACTIVE"),
        "{ev}"
    );
    assert_eq!(pg.query("SELECT COUNT(*) FROM replicas"), "2");
    a.kill9();
    let t0 = Instant::now();
    assert!(wait_for(20, || status() == "DISCONNECTED"), "{}", status());
    println!("a killed replica's tunnels stopped counting after {:?}", t0.elapsed());
    assert!(wait_for(5, || pg.query("SELECT COUNT(*) FROM replicas") == "1"));
    assert_eq!(pg.query("SELECT COUNT(*) FROM agent_sessions"), "0");
}

/// kill -9 while an API loop adds users and grants: every write that
/// was answered with success is there after a restart.
#[test]
fn kill9_loses_no_acknowledged_write() {
    let Some(pg) = Postgres::start("hub-kill") else { return };
    let mut hub = start(&pg, "kill");
    let admin = hub.admin_token.clone().unwrap();
    let client = hub.client(Some(&admin));
    let acked = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0.. {
                let name = format!("u{i}");
                match client.post_json("/api/v1/users", &json!({ "name": name })) {
                    Ok(r) if r.status == 201 => acked.lock().unwrap().push(("user", name.clone())),
                    _ => break,
                }
                match client.post_json("/api/v1/grants", &json!({ "user": name, "clusters": format!("c{i}-*") })) {
                    Ok(r) if r.status == 201 => acked.lock().unwrap().push(("grant", name)),
                    _ => break,
                }
            }
        });
        std::thread::sleep(Duration::from_millis(1500));
        hub.kill9();
    });
    let acked = acked.into_inner().unwrap();
    assert!(acked.len() > 10, "the loop wrote something: {}", acked.len());
    let again = start(&pg, "kill-again");
    let c = again.client(Some(&admin));
    let users = c.get("/api/v1/users").unwrap().json();
    let grants = c.get("/api/v1/grants").unwrap().json();
    let has = |list: &Value, key: &str, name: &str| list.as_array().unwrap().iter().any(|x| x[key] == name);
    for (kind, name) in &acked {
        match *kind {
            "user" => assert!(has(&users["users"], "name", name), "user {name} lost"),
            _ => assert!(has(&grants["grants"], "user", name), "grant of {name} lost"),
        }
    }
    println!("kill -9: {} acknowledged writes, all present", acked.len());
}

/// PostgreSQL stopped under a running hub: not ready (with the reason),
/// cached reads work, writes get 503; it recovers by itself.
#[test]
fn the_store_going_away_and_coming_back() {
    let Some(pg) = Postgres::start("hub-away") else { return };
    let hub = start(&pg, "away");
    let admin = hub.admin_token.clone().unwrap();
    let alice = add_user(&hub, &admin, "alice", &[]);
    hub.client(Some(&admin)).post_json("/api/v1/grants", &json!({ "user": "alice", "clusters": "edge-1" })).unwrap();
    let credential = register_and_activate(&hub, &admin, "edge-1");
    let agents = SimAgents::start(hub.addr, &hub.ca_pem, &credential, 1);
    assert!(wait_for(10, || agents.state.lock().unwrap().connected == 1));
    let kube = || hub.client(Some(&alice)).get("/k8s/clusters/edge-1/api/v1/pods").unwrap().status;
    assert_eq!(kube(), 200, "warms the cache");
    assert_eq!(readyz(&hub).0, 200);

    assert!(pg.stop_server().status.success());
    let (status, why) = readyz(&hub);
    assert_eq!(status, 503);
    assert!(why.contains("PostgreSQL"), "{why}");
    assert_eq!(kube(), 200, "cached reads keep working while the store is away");
    let w = hub.client(Some(&admin)).post_json("/api/v1/users", &json!({ "name": "zed" })).unwrap();
    assert_eq!(w.status, 503, "{}", w.text());
    assert_eq!(w.json()["error"], "store_unavailable");
    assert_eq!(kube(), 200, "a refused write leaves the cache alone");
    assert_eq!(hub.log().matches("store away").count(), 1, "said once: {}", hub.log());

    assert!(pg.start_server().status.success());
    assert!(wait_for(15, || readyz(&hub).0 == 200), "recovers by itself");
    let w = hub.client(Some(&admin)).post_json("/api/v1/users", &json!({ "name": "zed" })).unwrap();
    assert_eq!(w.status, 201, "{}", w.text());
    assert_eq!(kube(), 200);
    assert!(hub.log().contains("store back"));
}

/// The hot path: a proxied kube request on a warm cache reads nothing
/// from PostgreSQL (counted with pg_stat_statements); its audit entry is
/// written in batches, off the event loop.
#[test]
fn proxied_requests_are_served_from_the_cache() {
    let Some(pg) = Postgres::start("hub-hot") else { return };
    let hub = start(&pg, "hot");
    pg.query("CREATE EXTENSION pg_stat_statements");
    let admin = hub.admin_token.clone().unwrap();
    let alice = add_user(&hub, &admin, "alice", &[]);
    hub.client(Some(&admin)).post_json("/api/v1/grants", &json!({ "user": "alice", "clusters": "edge-1" })).unwrap();
    let credential = register_and_activate(&hub, &admin, "edge-1");
    let agents = SimAgents::start(hub.addr, &hub.ca_pem, &credential, 1);
    assert!(wait_for(10, || agents.state.lock().unwrap().connected == 1));
    let c = hub.client(Some(&alice));
    assert_eq!(c.get("/k8s/clusters/edge-1/api/v1/pods").unwrap().status, 200, "warms the cache");
    pg.query("SELECT pg_stat_statements_reset()");
    const N: i64 = 300;
    let t0 = Instant::now();
    for _ in 0..N {
        assert_eq!(c.get("/k8s/clusters/edge-1/api/v1/pods").unwrap().status, 200);
    }
    let elapsed = t0.elapsed();
    // What the hub ran meanwhile (not this test's own psql).
    let count = |filter: &str| {
        pg.query(&format!(
            "SELECT COALESCE(SUM(calls), 0) FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid
             WHERE s.query NOT LIKE '%pg_stat_statements%' AND {filter}"
        ))
        .parse::<i64>()
        .unwrap()
    };
    let cached_reads = count("s.query ~* '(FROM|JOIN) (users|tokens|grants|clusters)\\M'");
    let audit = count("s.query ~* 'INSERT INTO audit'");
    let all = count("TRUE");
    println!(
        "{N} proxied requests in {elapsed:?}: {cached_reads} reads of users/tokens/grants/clusters; \
         {audit} audit inserts; {all} statements in all (audit batches, heartbeats, readiness)"
    );
    assert_eq!(cached_reads, 0, "the hot path reads what the cache holds");
    // The count does see reads: a write empties the cache, and the next
    // request reads its token, grants and cluster again.
    add_user(&hub, &admin, "bob", &[]);
    assert_eq!(c.get("/k8s/clusters/edge-1/api/v1/pods").unwrap().status, 200);
    assert!(count("s.query ~* '(FROM|JOIN) (users|tokens|grants|clusters)\\M'") >= 3);
}
