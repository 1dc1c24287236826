//! Tunnel benchmarks (`cargo bench --bench tunnel`): throughput of the
//! sans-IO core in memory, throughput of the driver over TLS on loopback,
//! and heap bytes per open idle stream. Figures, not pass/fail: the
//! machine is shared, so read them as orders of magnitude and compare
//! within one run.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};
use uplink::proto::*;

/// Counts live heap bytes so the per-stream figure is measured, not
/// estimated. `unsafe` because `GlobalAlloc` is an unsafe trait; it only
/// forwards to the system allocator.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn head() -> RequestHead {
    RequestHead {
        method: "GET".into(),
        path: "/api/v1/namespaces/default/pods?watch=1".into(),
        headers: vec![Header::new("accept", "application/json")],
        identity: Identity { user: "alice".into(), groups: vec!["dev".into()], ..Default::default() },
    }
}

fn connected_pair(config: Config) -> (Mux, Mux) {
    let now = Instant::now();
    let mut agent = Mux::agent(config.clone(), AgentInfo::default(), now);
    let mut hub = Mux::hub(config, 1, now);
    for _ in 0..4 {
        let a = agent.take_transmit(Vec::new());
        hub.handle_input(&a, now);
        let h = hub.take_transmit(Vec::new());
        agent.handle_input(&h, now);
    }
    while agent.poll_event().is_some() {}
    while hub.poll_event().is_some() {}
    (agent, hub)
}

fn mib_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64()
}

/// Agent → hub, one stream, 32 KiB writes, the hub consuming as it goes.
fn in_memory_throughput(total: usize) -> f64 {
    let (mut agent, mut hub) = connected_pair(Config { initial_window: 1 << 20, ..Config::default() });
    let id = hub.open(head()).unwrap();
    let open = hub.take_transmit(Vec::new());
    agent.handle_input(&open, Instant::now());
    while agent.poll_event().is_some() {}
    agent.send_head(id, ResponseHead { status: 200, headers: vec![] }).unwrap();
    let chunk = vec![0xabu8; 32 * 1024];
    let (mut moved, mut spare_a, mut spare_h) = (0usize, Vec::new(), Vec::new());
    let now = Instant::now();
    let start = Instant::now();
    while moved < total {
        while agent.send_data(id, &chunk).unwrap_or(0) > 0 {}
        let bytes = agent.take_transmit(std::mem::take(&mut spare_a));
        hub.handle_input(&bytes, now);
        spare_a = bytes;
        while let Some(e) = hub.poll_event() {
            if let Event::Data { data, .. } = e {
                moved += data.len();
                hub.consume(id, data.len());
            }
        }
        let back = hub.take_transmit(std::mem::take(&mut spare_h));
        agent.handle_input(&back, now);
        spare_h = back;
        while agent.poll_event().is_some() {}
    }
    mib_per_s(moved, start.elapsed())
}

/// Heap bytes per open idle stream, counted on both sides: mux state plus
/// the driver-free bookkeeping of one side.
fn bytes_per_idle_stream(n: usize) -> (f64, f64) {
    let (mut agent, mut hub) = connected_pair(Config { max_streams: 100_000, ..Config::default() });
    let before = LIVE.load(Ordering::Relaxed);
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(hub.open(head()).unwrap());
    }
    let hub_after = LIVE.load(Ordering::Relaxed);
    let bytes = hub.take_transmit(Vec::new());
    agent.handle_input(&bytes, Instant::now());
    // The agent's application would take the Opened events; drop them.
    while agent.poll_event().is_some() {}
    drop(bytes);
    let agent_after = LIVE.load(Ordering::Relaxed);
    let hub_per = (hub_after - before) as f64 / n as f64;
    let agent_per = (agent_after - hub_after) as f64 / n as f64;
    drop(ids);
    (hub_per, agent_per)
}

/// Through the driver and rustls over loopback TCP.
fn tls_throughput(total: usize) -> f64 {
    use futures_rustls::{TlsAcceptor, TlsConnector};
    use smol::net::{TcpListener, TcpStream};
    use uplink::driver::Session;

    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["hub.test".to_string()]).unwrap().self_signed(&key).unwrap();
    let server = uplink::tls::server_config(&cert.pem(), &key.serialize_pem()).unwrap();
    let client = uplink::tls::client_config(&uplink::tls::Trust::CaPem(cert.pem()), None, &[]).unwrap();
    let ex = smol::LocalExecutor::new();
    smol::block_on(ex.run(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (c, s) = smol::future::zip(TcpStream::connect(addr), listener.accept()).await;
        let (c, s) = (c.unwrap(), s.unwrap().0);
        c.set_nodelay(true).unwrap();
        s.set_nodelay(true).unwrap();
        let name = rustls::pki_types::ServerName::try_from("hub.test").unwrap();
        let (c, s) =
            smol::future::zip(TlsConnector::from(client).connect(name, c), TlsAcceptor::from(server).accept(s)).await;
        let agent = Session::new(Mux::agent(Config::default(), AgentInfo::default(), Instant::now()));
        let hub = Session::new(Mux::hub(Config::default(), 1, Instant::now()));
        let (a, h) = (agent.clone(), hub.clone());
        let c = c.unwrap();
        let s = s.unwrap();
        let _agent_task = ex.spawn(async move { a.run(c).await });
        let _hub_task = ex.spawn(async move { h.run(s).await });
        let sender = ex.spawn(async move {
            let (mut stream, _) = agent.accept().await.unwrap();
            stream.send_head(ResponseHead { status: 200, headers: vec![] }).unwrap();
            let chunk = vec![0x5au8; 32 * 1024];
            let mut sent = 0;
            while sent < total {
                stream.write_all(&chunk).await.unwrap();
                sent += chunk.len();
            }
            stream.finish();
            stream
        });
        hub.connected().await.unwrap();
        let start = Instant::now();
        let mut stream = hub.open(head()).unwrap();
        stream.response_head().await.unwrap();
        let mut got = 0;
        while let Some(chunk) = stream.read_chunk().await.unwrap() {
            got += chunk.len();
        }
        let elapsed = start.elapsed();
        drop(sender.await);
        mib_per_s(got, elapsed)
    }))
}

fn main() {
    // `cargo test` also runs bench targets' mains with --bench absent;
    // only measure when asked.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let (hub_per, agent_per) = bytes_per_idle_stream(10_000);
    println!("heap per open idle stream: hub {hub_per:.0} B, agent {agent_per:.0} B (mux state, 10,000 streams)");
    for _ in 0..3 {
        println!("in-memory pair, 32 KiB Data frames: {:.0} MiB/s", in_memory_throughput(1 << 30));
    }
    for _ in 0..3 {
        println!("driver over TLS on loopback, one stream: {:.0} MiB/s", tls_throughput(256 << 20));
    }
}
