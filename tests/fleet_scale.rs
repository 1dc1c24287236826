//! The fleet view at scale: `uplink-hub serve` with many simulated
//! clusters (agents speaking the real tunnel protocol, answering from
//! fixtures), one of them slow.
//!
//! ```text
//!  test ──NDJSON / Table──► uplink-hub ══ N tunnels ══► simulated agents (one thread)
//!                                                         GET /api/v1/pods → PodList or Table of PODS pods
//!                                                         cluster "slow": answers after SLOW
//! ```
//!
//! Prints `FIGURE` lines: time to the first cluster's line and to the
//! whole answer (NDJSON), time to the whole merged Table, the hub's peak
//! RSS during the queries, and when the slow cluster's neighbours
//! answered. `UPLINK_FLEET_CLUSTERS=N` sets N (default 100).
#![cfg(feature = "hub")]

mod hub_support;

use hub_support::{HubProc, temp_dir, wait_for};
use serde_json::{Value, json};
use smol::future::FutureExt;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use uplink::driver::Session;
use uplink::proto::{AgentInfo, Config, Header, Mux, RequestHead, ResponseHead};

/// Pods in each simulated cluster.
const PODS: usize = 50;
/// How long the slow cluster takes.
const SLOW: Duration = Duration::from_secs(4);

fn pod(cluster: &str, i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("pos-{cluster}-{i}"), "namespace": "default", "labels": {"app": "pos"},
                     "uid": format!("{cluster}-{i}"), "resourceVersion": "1"},
        "spec": {"nodeName": "edge-1", "containers": [{"name": "pos", "image": "registry.example.com/pos:1.4.2"}]},
        "status": {"phase": "Running", "containerStatuses": [{"name": "pos", "ready": true, "restartCount": i % 3}]},
    })
}

/// The simulated API server's answer for `head`.
fn answer_for(cluster: &str, head: &RequestHead) -> (u16, Vec<u8>) {
    if !head.path.starts_with("/api/v1/pods") {
        return (404, br#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404,"message":"not simulated"}"#.to_vec());
    }
    let table = head
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case(b"accept") && h.value.windows(8).any(|w| w == b"as=Table"));
    let pods: Vec<Value> = (0..PODS).map(|i| pod(cluster, i)).collect();
    let body = if table {
        json!({
            "kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": "1"},
            "columnDefinitions": [{"name": "Name", "type": "string"}, {"name": "Status", "type": "string"}, {"name": "Restarts", "type": "integer"}],
            "rows": pods.iter().map(|p| json!({"cells": [p["metadata"]["name"], "Running", p["status"]["containerStatuses"][0]["restartCount"]],
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": p["metadata"]}})).collect::<Vec<_>>(),
        })
    } else {
        json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": pods})
    };
    (200, serde_json::to_vec(&body).unwrap())
}

async fn sim_agent(addr: SocketAddr, ca: String, credential: String, cluster: String, slow: bool) {
    let (io, status) = hub_support::dial_tunnel(addr, ca, &credential).await;
    if status != 101 {
        return;
    }
    let info =
        AgentInfo { agent_version: "sim".into(), arch: "x86_64".into(), kube_version: "v1.32.0".into(), node_count: 1 };
    let session = Session::new(Mux::agent(Config::default(), info, Instant::now()));
    let serve = async {
        let ex = smol::LocalExecutor::new();
        ex.run(async {
            while let Some((mut stream, head)) = session.accept().await {
                let cluster = cluster.clone();
                ex.spawn(async move {
                    while let Ok(Some(_)) = stream.read_chunk().await {}
                    if slow {
                        smol::Timer::after(SLOW).await;
                    }
                    let (status, body) = answer_for(&cluster, &head);
                    let headers = vec![Header::new("Content-Type", "application/json")];
                    let _ = stream.send_head(ResponseHead { status, headers });
                    let _ = stream.write_all(&body).await;
                    stream.finish();
                    smol::Timer::after(Duration::from_millis(500)).await;
                })
                .detach();
            }
        })
        .await
    };
    async {
        session.run(io).await;
    }
    .or(serve)
    .await;
}

/// The hub's peak RSS (KiB) while `f` runs.
fn peak_rss<T>(hub: &HubProc, f: impl FnOnce() -> T) -> (T, u64) {
    let pid = hub.child.id();
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let (s, p) = (stop.clone(), peak.clone());
    let sampler = std::thread::spawn(move || {
        while !s.load(Ordering::SeqCst) {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let kib = status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                .unwrap_or(0);
            p.fetch_max(kib, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let out = f();
    stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    (out, peak.load(Ordering::SeqCst))
}

/// Sends `GET target` and reads the answer; `on_line` sees each line of
/// the (chunked) body with the time it arrived.
fn get(hub: &HubProc, token: &str, target: &str, accept: &str, mut on_line: impl FnMut(Duration, &str)) -> Vec<u8> {
    let client = hub.client(Some(token)).with_read_timeout(Duration::from_secs(120));
    let mut s = client.connect().unwrap();
    let start = Instant::now();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {token}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s.flush().unwrap();
    // `seen`: where the current line starts; `scanned`: how far a newline
    // has been looked for (a 15 MiB Table is one line).
    let (mut raw, mut buf, mut seen, mut scanned) = (Vec::new(), vec![0u8; 64 * 1024], 0, 0);
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        raw.extend_from_slice(&buf[..n]);
        while let Some(i) = raw[scanned..].iter().position(|&b| b == b'\n') {
            let end = scanned + i;
            let line = String::from_utf8_lossy(&raw[seen..end]).trim().to_string();
            on_line(start.elapsed(), &line);
            seen = end + 1;
            scanned = seen;
        }
        scanned = raw.len();
    }
    raw
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

#[test]
fn a_hundred_clusters_answer_and_a_slow_one_holds_up_nobody() {
    let n: usize = std::env::var("UPLINK_FLEET_CLUSTERS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let dir = temp_dir("fleet-scale");
    let hub = HubProc::start(&dir);
    let admin = hub.admin();
    let names: Vec<String> =
        (0..n).map(|i| if i == n / 2 { "site-slow".into() } else { format!("site-{i:04}") }).collect();
    let mut credentials = Vec::new();
    for name in &names {
        let reg = admin.post_json("/api/v1/clusters", &json!({ "name": name })).unwrap().json();
        let act = &reg["activation"];
        let r = hub
            .client(None)
            .post_json(
                "/v1/activate",
                &json!({ "activation_id": act["activation_id"], "activation_code": act["activation_code"],
                         "agent_version": "sim", "arch": "x86_64", "kube_version": "v1.32.0", "node_count": 1 }),
            )
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        credentials.push(r.json()["credential"].as_str().unwrap().to_string());
    }
    let (addr, ca) = (hub.addr, hub.ca_pem.clone());
    let list = names.clone();
    let (stop_tx, stop_rx) = smol::channel::bounded::<()>(1);
    let sims = std::thread::spawn(move || {
        let ex = smol::LocalExecutor::new();
        smol::block_on(ex.run(async {
            let tasks: Vec<_> = list
                .into_iter()
                .zip(credentials)
                .map(|(name, cred)| {
                    let slow = name == "site-slow";
                    ex.spawn(sim_agent(addr, ca.clone(), cred, name, slow))
                })
                .collect();
            let _ = stop_rx.recv().await;
            drop(tasks);
        }));
    });
    assert!(wait_for(60, || {
        let all = admin.get("/api/v1/clusters").unwrap().json();
        all["clusters"].as_array().unwrap().iter().filter(|c| c["status"] == "ACTIVE").count() == n
    }));
    let token = hub.admin_token.clone().unwrap();
    let idle_rss = hub.rss_kib();

    // NDJSON: the first clusters' lines long before the slow one.
    let mut first = None;
    let mut answered: Vec<(Duration, String)> = Vec::new();
    let mut summary = Value::Null;
    let (_, peak_ndjson) = peak_rss(&hub, || {
        get(&hub, &token, "/api/v1/fleet/k8s/api/v1/pods?clusters=site-*", "application/json", |t, line| {
            let Ok(v) = serde_json::from_str::<Value>(line) else { return };
            if let Some(c) = v["cluster"].as_str() {
                assert!(v["items"].as_array().is_some_and(|i| i.len() == PODS), "{line}");
                first.get_or_insert(t);
                answered.push((t, c.to_string()));
            }
            if !v["summary"].is_null() {
                summary = v["summary"].clone();
            }
        })
    });
    assert_eq!(summary["answered"], n, "{summary}");
    assert_eq!(summary["items"], n * PODS, "{summary}");
    let whole = answered.iter().map(|a| a.0).max().unwrap();
    let slow_at = answered.iter().find(|a| a.1 == "site-slow").unwrap().0;
    let others = answered.iter().filter(|a| a.1 != "site-slow").map(|a| a.0).max().unwrap();
    // The slow cluster holds one worker: everybody else is done before it.
    assert!(others < slow_at, "the others waited for the slow one: last of them at {others:?}, slow at {slow_at:?}");
    if n <= 100 {
        assert!(others < SLOW, "the others waited for the slow one: last of them at {others:?}");
    }
    assert!(slow_at >= SLOW && answered.last().unwrap().1 == "site-slow");
    let first = first.unwrap();
    println!("FIGURE fleet NDJSON, {n} clusters x {PODS} pods: first cluster's line after {}", ms(first));
    println!(
        "FIGURE fleet NDJSON: {} other clusters all answered after {}; the slow one ({}s) after {} (whole answer)",
        n - 1,
        ms(others),
        SLOW.as_secs(),
        ms(whole)
    );

    // The merged Table kubectl gets: sent once every cluster answered.
    let mut done = Duration::ZERO;
    let (raw, peak_table) = peak_rss(&hub, || {
        let t = Instant::now();
        let raw = get(
            &hub,
            &token,
            "/k8s/fleet/site-*/api/v1/pods",
            "application/json;as=Table;v=v1;g=meta.k8s.io",
            |_, _| {},
        );
        done = t.elapsed();
        raw
    });
    let text = String::from_utf8_lossy(&raw);
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let table: Value = serde_json::from_str(body).unwrap();
    assert_eq!(table["columnDefinitions"][0]["name"], "Cluster");
    assert_eq!(table["rows"].as_array().unwrap().len(), n * PODS);
    println!(
        "FIGURE fleet Table for kubectl, {n} clusters x {PODS} pods ({} KiB): whole answer after {} (the slow cluster's {}s included)",
        body.len() / 1024,
        ms(done),
        SLOW.as_secs()
    );
    println!(
        "FIGURE hub RSS: {} MiB idle with {n} tunnels; peak {} MiB during the NDJSON query, {} MiB during the Table query",
        idle_rss / 1024,
        peak_ndjson / 1024,
        peak_table / 1024
    );
    let _ = stop_tx.try_send(());
    let _ = sims.join();
    std::fs::remove_dir_all(&dir).ok();
}
