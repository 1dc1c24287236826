//! The store trait suite: the same cases against every backend (SQLite,
//! and PostgreSQL started by the test itself), so both keep one
//! contract. Then what only the shared store has: migrations under an
//! advisory lock, refusing a newer schema, the shared identity.
#![cfg(feature = "hub")]

mod support;

use support::pg::Postgres;
use uplink::hub::store::postgres::{PgConfig, PostgresStore, SharedIdentity};
use uplink::hub::store::sqlite::SqliteStore;
use uplink::hub::store::*;
use uplink::secret::{Secret, sha256_hex};

fn s(v: &str) -> String {
    v.to_string()
}

fn identity() -> std::result::Result<SharedIdentity, String> {
    Ok(SharedIdentity { ca_key_pem: Secret::new("ca key"), ca_pem: "ca".into(), key_pem: Secret::new("key") })
}

fn open_pg(pg: &Postgres) -> PostgresStore {
    PostgresStore::open(PgConfig::parse(&pg.url()).unwrap(), "r_test", identity).unwrap()
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("uplink-store-{tag}-{}-{}", std::process::id(), Secret::random(6).expose()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every method of [`Store`], with the answers the hub relies on.
fn suite(st: &dyn Store, shared: bool) {
    people(st);
    grants(st);
    clusters(st);
    audit(st);
    replicas(st, shared);
}

/// The replica set: rows on a shared store, nothing on the embedded one.
fn replicas(st: &dyn Store, shared: bool) {
    let r = |id: &str, url: &str| Replica { id: s(id), advertise_url: s(url), version: s("0.1.0"), started_at: 1 };
    let (a, b) = (r("r_a", "https://a:1"), r("r_b", "https://b:1"));
    st.join_replica(&a, 100, 10).unwrap();
    st.join_replica(&b, 100, 10).unwrap();
    let clash = st.join_replica(&r("r_c", "https://a:1"), 105, 10);
    let f = AgentFacts { agent_version: s("0.1.0"), arch: s("x86_64"), kube_version: s("v1.32.0"), node_count: 2 };
    let sess = |rep: &Replica, n| AgentSession {
        replica_id: rep.id.clone(),
        cluster_id: s("c_1"),
        session_id: n,
        since: 100,
        facts: f.clone(),
    };
    st.replica_heartbeat(&a, &[sess(&a, 1), sess(&a, 2)], true, 106, 10).unwrap();
    let seen_by_b = st.replica_heartbeat(&b, &[], true, 107, 10).unwrap();
    let live = st.live_replicas(107, 10).unwrap();
    // Later: a stops beating; past the deadline b no longer sees it.
    let after = st.replica_heartbeat(&b, &[], false, 120, 10).unwrap();
    let live_after = st.live_replicas(120, 10).unwrap();
    // a beats again (a store outage ended, a pause passed): its tunnels
    // did not change, but its row and sessions are gone, so they are
    // written again and b sees them at its next beat.
    st.replica_heartbeat(&a, &[sess(&a, 1), sess(&a, 2)], false, 121, 10).unwrap();
    let back = st.replica_heartbeat(&b, &[], false, 122, 10).unwrap();
    // Unchanged sessions on a live row are not written again: a's
    // heartbeat with none listed leaves the two rows.
    st.replica_heartbeat(&a, &[], false, 123, 10).unwrap();
    let kept = st.replica_heartbeat(&b, &[], false, 124, 10).unwrap();
    st.leave_replica("r_b").unwrap();
    if shared {
        assert!(matches!(clash, Err(StoreError::Conflict(m)) if m.contains("https://a:1")));
        assert_eq!(seen_by_b, [sess(&a, 1), sess(&a, 2)]);
        assert!(after.is_empty(), "{after:?}");
        assert_eq!(back, [sess(&a, 1), sess(&a, 2)], "a's sessions after its row expired");
        assert_eq!(kept, [sess(&a, 1), sess(&a, 2)]);
        // Where the hand-off dials: every live replica's URL.
        assert_eq!(live, [a.clone(), b.clone()]);
        assert_eq!(live_after, std::slice::from_ref(&b));
        // The URL of a replica that expired may be taken again.
        st.join_replica(&r("r_d", "https://a:1"), 140, 10).unwrap();
    } else {
        assert!(clash.is_ok() && seen_by_b.is_empty() && after.is_empty() && back.is_empty() && kept.is_empty());
        assert!(live.is_empty() && live_after.is_empty());
    }
}

fn people(st: &dyn Store) {
    assert_eq!(st.user_count().unwrap(), 0);
    let alice = st.create_user("alice", &[s("devs")], false, "t1", 10).unwrap();
    assert_eq!((alice.name.as_str(), alice.admin, alice.created_at, alice.revoked_at), ("alice", false, 10, None));
    assert!(matches!(st.create_user("alice", &[], false, "t2", 11), Err(StoreError::Conflict(_))));
    st.create_user("root", &[], true, "t3", 12).unwrap();
    assert_eq!(st.user_count().unwrap(), 2);
    assert_eq!(st.users().unwrap().iter().map(|u| u.name.as_str()).collect::<Vec<_>>(), ["alice", "root"]);
    assert_eq!(st.user("alice").unwrap().unwrap().groups, [s("devs")]);
    assert_eq!(st.user("nobody").unwrap(), None);

    // Tokens: several per user, all gone with the user.
    st.add_token("alice", "t1b", 13).unwrap();
    assert!(matches!(st.add_token("nobody", "tx", 13), Err(StoreError::NotFound(_))));
    assert_eq!(st.user_by_token("t1").unwrap().unwrap().name, "alice");
    assert_eq!(st.user_by_token("t1b").unwrap().unwrap().name, "alice");
    assert_eq!(st.user_by_token("t1c").unwrap(), None);

    // Identity-provider people: created on first sign-in, updated later,
    // never mixed up with token users.
    let o = st.oidc_sign_in("oidc:bob", &[s("ops")], false, 20).unwrap();
    assert_eq!((o.groups.clone(), o.admin), (vec![s("ops")], false));
    let o = st.oidc_sign_in("oidc:bob", &[s("ops"), s("sre")], true, 21).unwrap();
    assert_eq!((o.groups.len(), o.admin, o.created_at), (2, true, 20));
    assert_eq!(st.user("oidc:bob").unwrap().unwrap().groups, [s("ops"), s("sre")]);
    assert!(matches!(st.oidc_sign_in("alice", &[], false, 22), Err(StoreError::Conflict(_))));

    // Console sessions: found by hash until expiry or revocation.
    let sess = ConsoleSession { user: "oidc:bob".into(), groups: vec![s("ops")], admin: false, expires_at: 1000 };
    st.create_session("sh1", &sess, 30).unwrap();
    assert_eq!(st.session("sh1", 40).unwrap(), Some(sess.clone()));
    assert_eq!(st.session("sh1", 1000).unwrap(), None, "expired at expires_at");
    assert_eq!(st.session("sh2", 40).unwrap(), None);
    st.create_session("sh2", &sess, 41).unwrap();
    st.delete_session("sh2").unwrap();
    st.delete_session("sh2").unwrap();
    assert_eq!(st.session("sh2", 42).unwrap(), None);
    // Creating a session forgets expired ones (and keeps live ones).
    st.create_session("sh3", &ConsoleSession { expires_at: 5000, ..sess.clone() }, 2000).unwrap();
    assert_eq!(st.session("sh3", 2001).unwrap().unwrap().expires_at, 5000);

    // Revocation: user, tokens and sessions together; once.
    let r = st.revoke_user("alice", 50).unwrap();
    assert_eq!(r.revoked_at, Some(50));
    assert_eq!(st.user_by_token("t1").unwrap(), None);
    assert_eq!(st.user_by_token("t1b").unwrap(), None);
    assert!(matches!(st.revoke_user("alice", 51), Err(StoreError::NotFound(_))));
    assert!(matches!(st.add_token("alice", "t9", 52), Err(StoreError::NotFound(_))));
    st.revoke_user("oidc:bob", 60).unwrap();
    assert_eq!(st.session("sh3", 61).unwrap(), None);
    let again = st.oidc_sign_in("oidc:bob", &[s("ops")], false, 62).unwrap();
    assert_eq!(again.revoked_at, Some(60), "revoked stays revoked");
    assert_eq!(st.user_by_token("t3").unwrap().unwrap().name, "root");
}

fn grants(st: &dyn Store) {
    let g1 = st.add_grant(&Subject::Group(s("devs")), "edge-*", 100).unwrap();
    let g2 = st.add_grant(&Subject::User(s("carol")), "prod-1", 101).unwrap();
    assert!(g2.id > g1.id);
    assert!(matches!(st.add_grant(&Subject::Group(s("devs")), "edge-*", 102), Err(StoreError::Conflict(_))));
    // The same pattern for another kind of subject is another grant.
    st.add_grant(&Subject::User(s("devs")), "edge-*", 103).unwrap();
    let all = st.grants().unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[0], Grant { id: g1.id, subject: Subject::Group(s("devs")), clusters: s("edge-*"), created_at: 100 });
    assert_eq!(all[1].subject, Subject::User(s("carol")));
    st.remove_grant(g1.id).unwrap();
    assert!(matches!(st.remove_grant(g1.id), Err(StoreError::NotFound(_))));
    assert_eq!(st.grants().unwrap().len(), 2);
}

fn clusters(st: &dyn Store) {
    let code = sha256_hex("code");
    let c = st
        .register_cluster(
            &NewCluster { id: "c_1", name: "edge-1", users: &[s("alice")], groups: &[s("devs")], now: 1000 },
            &NewActivation { id: "act_1", code_hash: &code, expires_at: 5000 },
        )
        .unwrap();
    assert_eq!(
        (c.lifecycle, c.users.clone(), c.groups.clone(), c.agent.clone()),
        (Lifecycle::Pending, vec![s("alice")], vec![s("devs")], None)
    );
    assert!(matches!(
        st.register_cluster(
            &NewCluster { id: "c_x", name: "edge-1", users: &[], groups: &[], now: 1001 },
            &NewActivation { id: "act_x", code_hash: "x", expires_at: 5000 },
        ),
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(st.cluster("edge-1").unwrap().unwrap(), c);
    assert_eq!(st.cluster("edge-9").unwrap(), None);

    // Renewal replaces unused activations of a pending cluster.
    assert!(matches!(
        st.renew_activation("edge-9", None, &NewActivation { id: "x", code_hash: "x", expires_at: 1 }, 1),
        Err(StoreError::NotFound(_))
    ));
    let users = vec![s("arn:aws:iam::1234567890:user/Alice")];
    let r = st
        .renew_activation(
            "edge-1",
            Some((&users, &[s("ops")])),
            &NewActivation { id: "act_2", code_hash: &sha256_hex("two"), expires_at: 9000 },
            2000,
        )
        .unwrap();
    assert_eq!((r.lifecycle, r.users, r.groups), (Lifecycle::Pending, users, vec![s("ops")]));
    let acts = st.activations("c_1").unwrap();
    assert_eq!(
        acts.iter().map(|a| (a.id.as_str(), a.replaced_at)).collect::<Vec<_>>(),
        [("act_1", Some(2000)), ("act_2", None)]
    );
    assert_eq!((acts[1].cluster_id.as_str(), acts[1].expires_at, acts[1].used_at), ("c_1", 9000, None));

    // Activation: each refusal, then once.
    let f = AgentFacts { agent_version: s("0.1.0"), arch: s("aarch64"), kube_version: s("v1.32.0"), node_count: 3 };
    let two = sha256_hex("two");
    assert_eq!(st.activate("act_z", &two, "cred", &f, 2500), Err(ActivateError::Unknown));
    assert_eq!(st.activate("act_2", &sha256_hex("nope"), "cred", &f, 2500), Err(ActivateError::Unknown));
    assert_eq!(st.activate("act_1", &code, "cred", &f, 2500), Err(ActivateError::Replaced));
    assert_eq!(st.activate("act_2", &two, "cred", &f, 9000), Err(ActivateError::Expired));
    let a = st.activate("act_2", &two, "cred", &f, 2500).unwrap();
    assert_eq!((a.lifecycle, a.activated_at, a.agent.clone()), (Lifecycle::Activated, Some(2500), Some(f.clone())));
    assert_eq!(st.activate("act_2", &two, "cred2", &f, 2600), Err(ActivateError::Used));
    assert_eq!(st.activations("c_1").unwrap()[1].used_at, Some(2500));
    let renew =
        st.renew_activation("edge-1", None, &NewActivation { id: "act_3", code_hash: "x", expires_at: 1 }, 2700);
    assert!(matches!(&renew, Err(StoreError::Conflict(m)) if m.contains("cluster deregister edge-1")), "{renew:?}");
    assert!(matches!(st.credential("cred").unwrap(), CredentialStatus::Valid(c) if c.id == "c_1"));
    assert_eq!(st.credential("other").unwrap(), CredentialStatus::Unknown);

    // Agents come and go.
    let f2 = AgentFacts { node_count: 5, ..f.clone() };
    st.agent_connected("c_1", &f2, 3000).unwrap();
    let c = st.cluster("edge-1").unwrap().unwrap();
    assert_eq!((c.agent, c.last_connected_at, c.last_seen_at), (Some(f2), Some(3000), Some(3000)));
    st.agents_gone("c_1", 3500).unwrap();
    assert_eq!(st.cluster("edge-1").unwrap().unwrap().last_seen_at, Some(3500));
    st.add_event("c_1", "connected", "agent 0.1.0 connected", 3001).unwrap();
    let ev = st.events("c_1", 10).unwrap();
    assert_eq!(
        ev.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["connected", "activated", "renewed", "registered"]
    );
    assert_eq!(ev[0], ClusterEvent { time: 3001, kind: s("connected"), message: s("agent 0.1.0 connected") });
    assert_eq!(st.events("c_1", 2).unwrap().len(), 2);
    assert!(st.events("c_none", 10).unwrap().is_empty());

    // Deregistration revokes the credential and frees the name.
    let d = st.deregister("edge-1", 4000).unwrap();
    assert_eq!((d.lifecycle, d.deregistered_at), (Lifecycle::Deregistered, Some(4000)));
    assert!(matches!(st.deregister("edge-1", 4001), Err(StoreError::NotFound(_))));
    assert!(matches!(st.credential("cred").unwrap(), CredentialStatus::Revoked(c) if c.id == "c_1"));
    assert_eq!(st.cluster("edge-1").unwrap().unwrap().id, "c_1", "the latest deregistered one");
    st.register_cluster(
        &NewCluster { id: "c_2", name: "edge-1", users: &[], groups: &[], now: 5000 },
        &NewActivation { id: "act_4", code_hash: "y", expires_at: 9000 },
    )
    .unwrap();
    assert_eq!(st.cluster("edge-1").unwrap().unwrap().id, "c_2", "the live one first");
    // An activation of a deregistered cluster is refused as such.
    st.register_cluster(
        &NewCluster { id: "c_3", name: "edge-3", users: &[], groups: &[], now: 5001 },
        &NewActivation { id: "act_5", code_hash: &code, expires_at: 9000 },
    )
    .unwrap();
    st.deregister("edge-3", 5002).unwrap();
    assert_eq!(st.activate("act_5", &code, "cred3", &f, 5003), Err(ActivateError::Deregistered));
    let all = st.clusters().unwrap();
    assert_eq!(all.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), ["c_1", "c_2", "c_3"]);
}

fn audit(st: &dyn Store) {
    for i in 0..5u64 {
        st.append_audit(AuditEntry {
            id: 0,
            time: 10_000 + i as i64,
            user: if i % 2 == 0 { s("alice") } else { s("bob") },
            groups: vec![s("devs")],
            cluster: if i < 3 { s("edge-1") } else { s("edge-2") },
            method: s("GET"),
            path: format!("/api/v1/pods/{i}"),
            status: 200 + i as u16,
            bytes_in: i,
            bytes_out: 100 + i,
            duration_ms: 7,
            upgrade: i == 4,
        })
        .unwrap();
    }
    let all = st.audit(&AuditQuery { limit: 100, ..Default::default() }).unwrap();
    assert_eq!(all.len(), 5, "an audit query sees every entry appended before it");
    assert_eq!(all[0].path, "/api/v1/pods/4", "newest first");
    assert_eq!(
        (all[0].status, all[0].bytes_out, all[0].upgrade, all[0].groups.clone()),
        (204, 104, true, vec![s("devs")])
    );
    let q = |user: Option<&str>, cluster: Option<&str>, since: Option<i64>, limit| {
        st.audit(&AuditQuery { user: user.map(s), cluster: cluster.map(s), since, limit }).unwrap().len()
    };
    assert_eq!(q(Some("alice"), None, None, 100), 3);
    assert_eq!(q(None, Some("edge-2"), None, 100), 2);
    assert_eq!(q(Some("alice"), Some("edge-1"), Some(10_001), 100), 1);
    assert_eq!(q(None, None, None, 2), 2);

    // A burst, as under load: the writer stores it in batches. Every
    // entry is there, in order, each field its own.
    let burst = 100u64;
    for i in 0..burst {
        st.append_audit(AuditEntry {
            id: 0,
            time: 20_000 + i as i64,
            user: format!("arn:aws:iam::1234567890:user/Burst{i}"),
            groups: vec![format!("g{i}"), s("devs")],
            cluster: format!("edge-{}", i % 7),
            method: if i % 3 == 0 { s("POST") } else { s("GET") },
            path: format!("/api/v1/namespaces/n{i}/pods"),
            status: 200 + (i % 300) as u16,
            bytes_in: i * 3,
            bytes_out: i * 1000 + 1,
            duration_ms: i + 5,
            upgrade: i % 5 == 0,
        })
        .unwrap();
    }
    let all = st.audit(&AuditQuery { limit: 1000, ..Default::default() }).unwrap();
    assert_eq!(all.len(), 5 + burst as usize);
    for (k, e) in all[..burst as usize].iter().enumerate() {
        let i = burst - 1 - k as u64;
        assert_eq!(
            (e.time, e.user.as_str(), e.groups.clone(), e.cluster.as_str(), e.method.as_str(), e.path.as_str()),
            (
                20_000 + i as i64,
                format!("arn:aws:iam::1234567890:user/Burst{i}").as_str(),
                vec![format!("g{i}"), s("devs")],
                format!("edge-{}", i % 7).as_str(),
                if i % 3 == 0 { "POST" } else { "GET" },
                format!("/api/v1/namespaces/n{i}/pods").as_str()
            ),
            "entry {i} of the burst"
        );
        assert_eq!(
            (e.status, e.bytes_in, e.bytes_out, e.duration_ms, e.upgrade),
            (200 + (i % 300) as u16, i * 3, i * 1000 + 1, i + 5, i % 5 == 0),
            "entry {i} of the burst"
        );
    }
    assert!(all.windows(2).all(|w| w[0].id > w[1].id), "ids rise in the order entries were appended");
}

#[test]
fn sqlite_passes_the_suite() {
    let dir = temp_dir("suite");
    let st = SqliteStore::open(&dir.join("hub.db")).unwrap();
    suite(&st, false);
    drop(st);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn postgres_passes_the_suite() {
    let Some(pg) = Postgres::start("store-suite") else { return };
    let st = open_pg(&pg);
    suite(&st, true);
    // The audit rows carry the replica that wrote them.
    assert_eq!(pg.query("SELECT DISTINCT replica FROM audit"), "r_test");
    // Opening again (a restart, or a second replica) migrates nothing and
    // finds the same identity.
    drop(st);
    let again =
        PostgresStore::open(PgConfig::parse(&pg.url()).unwrap(), "r_2", || Err("must not be made twice".into()));
    assert_eq!(again.unwrap().identity().ca_pem, "ca");
    assert_eq!(pg.query("SELECT COUNT(*) FROM schema_version"), "1");
}

/// The cache in front of the shared store passes the same suite.
#[test]
fn cached_postgres_passes_the_suite() {
    let Some(pg) = Postgres::start("store-cached") else { return };
    suite(&cache::CachedStore::new(open_pg(&pg)), true);
}

#[test]
fn a_newer_schema_is_refused_and_left_alone() {
    let Some(pg) = Postgres::start("store-newer") else { return };
    drop(open_pg(&pg));
    pg.query("INSERT INTO schema_version(version, applied_at) VALUES (99, 0)");
    let before = pg.query("SELECT string_agg(table_name, ',' ORDER BY table_name) FROM information_schema.tables WHERE table_schema = 'public'");
    let e = PostgresStore::open(PgConfig::parse(&pg.url()).unwrap(), "r", identity).err().unwrap();
    assert!(e.contains("schema version 99") && e.contains("nothing was changed") && !e.contains('\n'), "{e}");
    let after = pg.query("SELECT string_agg(table_name, ',' ORDER BY table_name) FROM information_schema.tables WHERE table_schema = 'public'");
    assert_eq!(before, after);
    assert_eq!(pg.query("SELECT MAX(version) FROM schema_version"), "99");
}

#[test]
fn unreachable_and_wrong_databases_are_one_line_errors() {
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = PostgresStore::open(PgConfig::parse(&format!("postgres://u@127.0.0.1:{port}/db")).unwrap(), "r", identity)
        .err()
        .unwrap();
    assert!(e.starts_with("cannot connect to PostgreSQL at u@127.0.0.1:") && !e.contains('\n'), "{e}");
    let Some(pg) = Postgres::start("store-wrong") else { return };
    let url = format!("postgres://postgres:{}@127.0.0.1:{}/nosuchdb", support::pg::PASSWORD, pg.port);
    let e = PostgresStore::open(PgConfig::parse(&url).unwrap(), "r", identity).err().unwrap();
    assert!(
        e.contains("database \"nosuchdb\" does not exist") && !e.contains('\n') && !e.contains(support::pg::PASSWORD),
        "{e}"
    );
}

/// Three stores opening an empty database at the same moment: one
/// migrates, all end up on the same schema and the same identity.
#[test]
fn concurrent_first_starts_migrate_once() {
    let Some(pg) = Postgres::start("store-race") else { return };
    let url = pg.url();
    let made = std::sync::atomic::AtomicUsize::new(0);
    let barrier = std::sync::Barrier::new(3);
    let cas: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..3)
            .map(|i| {
                let (url, made, barrier) = (&url, &made, &barrier);
                sc.spawn(move || {
                    barrier.wait();
                    let st = PostgresStore::open(PgConfig::parse(url).unwrap(), &format!("r{i}"), || {
                        made.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        Ok(SharedIdentity {
                            ca_key_pem: Secret::new("k"),
                            ca_pem: format!("ca-{i}"),
                            key_pem: Secret::new("k"),
                        })
                    })
                    .unwrap();
                    st.identity().ca_pem.clone()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(made.load(std::sync::atomic::Ordering::SeqCst), 1, "one identity made");
    assert!(cas.iter().all(|c| *c == cas[0]), "{cas:?}");
    assert_eq!(pg.query("SELECT COUNT(*) FROM schema_version"), "1");
}

/// The database unreachable in the worst way (SYNs dropped, so every
/// re-dial takes the connect timeout): appending audit entries never
/// waits, even past the audit queue's length (4,096), because the writer
/// takes every queued entry into its own bounded holding while it waits.
#[test]
fn audit_appends_never_wait_while_the_database_is_unreachable() {
    let Some(pg) = Postgres::start("store-audit-away") else { return };
    let st = open_pg(&pg);
    assert!(pg.stop_server().status.success());
    // PostgreSQL's port, now answering no SYN (a backlog of 0, filled).
    use rustix::net::{AddressFamily, SocketType, ipproto};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, Some(ipproto::TCP)).unwrap();
    rustix::net::sockopt::set_socket_reuseaddr(&fd, true).unwrap();
    rustix::net::bind(&fd, &std::net::SocketAddr::from(([127, 0, 0, 1], pg.port))).unwrap();
    rustix::net::listen(&fd, 0).unwrap();
    let _dropping = std::net::TcpListener::from(fd);
    let _fill: Vec<_> = (0..3)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(
                &([127, 0, 0, 1], pg.port).into(),
                std::time::Duration::from_millis(300),
            )
            .ok()
        })
        .collect();
    let t0 = std::time::Instant::now();
    for i in 0..10_000u64 {
        st.append_audit(AuditEntry {
            id: 0,
            time: i as i64,
            user: s("jane@example.com"),
            groups: vec![],
            cluster: s("edge-1"),
            method: s("GET"),
            path: s("/api/v1/pods"),
            status: 200,
            bytes_in: 0,
            bytes_out: 0,
            duration_ms: 1,
            upgrade: false,
        })
        .unwrap();
    }
    let took = t0.elapsed();
    println!("10,000 audit appends with the database unreachable: {took:?}");
    assert!(took < std::time::Duration::from_secs(3), "appends waited: {took:?}");
    // Dropping the store joins the writer, which tries once more (up to
    // the connect timeout) and gives up: no hang.
    let t0 = std::time::Instant::now();
    drop(st);
    assert!(t0.elapsed() < std::time::Duration::from_secs(15), "{:?}", t0.elapsed());
}
