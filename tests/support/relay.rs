//! A fault-injecting TCP relay, for putting the network's failures between
//! two real processes (agent ↔ hub, agent ↔ API server).
//!
//! ```text
//!  client ──► Relay (127.0.0.1:PORT) ──► target
//!               │ forward (default): bytes both ways, as they come
//!               │ cut():        RST to both ends of every live connection
//!               │ fin():        FIN to both ends (a clean close from the network)
//!               │ pause(true):  a black hole: nothing is read or forwarded,
//!               │               sockets stay open, new connections are
//!               │               accepted and wait; pause(false) and all flows
//!               │               again (TCP would retransmit what was lost)
//!               │ silent(true): new connections are accepted, read and
//!               │               never answered (something that accepts TCP
//!               │               and says nothing); when each is closed is
//!               │               recorded
//!               └ corrupt():    flips one byte in the next chunk towards
//!                               the client
//! ```
//!
//! Blocking threads, two per connection, short read timeouts. A pause is
//! exact: a pump checks it again after every read, so bytes sent once
//! `pause(true)` has returned are held until `pause(false)`. Not a proxy of any protocol:
//! it never looks inside the bytes.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a pump looks at the relay's mode while it has nothing to do.
const TICK: Duration = Duration::from_millis(5);

struct Pair {
    client: TcpStream,
    server: TcpStream,
    /// Set once either pump stopped: the pair is finished.
    done: Arc<AtomicBool>,
}

#[derive(Default)]
struct Inner {
    target: Mutex<Option<SocketAddr>>,
    pairs: Mutex<Vec<Pair>>,
    paused: AtomicBool,
    silent: AtomicBool,
    corrupt_next: AtomicBool,
    stop: AtomicBool,
    accepted: AtomicUsize,
    /// Silent connections: when each was accepted and when its client
    /// gave up (closed), if it has.
    silent_log: Mutex<Vec<(Instant, Option<Instant>)>>,
}

/// A running relay; stops (and drops every connection) on drop.
pub struct Relay {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

impl Relay {
    /// Listens on `127.0.0.1:0` and forwards to `target`.
    pub fn start(target: SocketAddr) -> Relay {
        Relay::start_on("127.0.0.1:0".parse().unwrap(), Some(target))
    }

    /// Listens on `listen`; forwards to `target` once one is set (until
    /// then new connections are accepted and held, as when paused).
    pub fn start_on(listen: SocketAddr, target: Option<SocketAddr>) -> Relay {
        let listener = TcpListener::bind(listen).expect("relay bind");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Inner { target: Mutex::new(target), ..Default::default() });
        let i2 = inner.clone();
        std::thread::Builder::new().name("relay-accept".into()).spawn(move || accept_loop(listener, i2)).unwrap();
        Relay { addr, inner }
    }

    pub fn set_target(&self, target: SocketAddr) {
        *self.inner.target.lock().unwrap() = Some(target);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.inner.accepted.load(Ordering::SeqCst)
    }

    /// Live relayed connections.
    pub fn live(&self) -> usize {
        let mut pairs = self.inner.pairs.lock().unwrap();
        pairs.retain(|p| !p.done.load(Ordering::SeqCst));
        pairs.len()
    }

    /// Resets both ends of every live connection (RST: `SO_LINGER` 0).
    pub fn cut(&self) {
        for p in self.inner.pairs.lock().unwrap().drain(..) {
            for s in [&p.client, &p.server] {
                let _ = rustix::net::sockopt::set_socket_linger(s, Some(Duration::ZERO));
                let _ = s.shutdown(Shutdown::Both);
            }
            p.done.store(true, Ordering::SeqCst);
        }
    }

    /// Closes both ends of every live connection cleanly (FIN both ways).
    pub fn fin(&self) {
        for p in self.inner.pairs.lock().unwrap().drain(..) {
            p.done.store(true, Ordering::SeqCst);
            let _ = p.client.shutdown(Shutdown::Both);
            let _ = p.server.shutdown(Shutdown::Both);
        }
    }

    /// Starts or ends a black hole: while on, nothing moves either way.
    pub fn pause(&self, on: bool) {
        self.inner.paused.store(on, Ordering::SeqCst);
    }

    /// While on, new connections go to a silent acceptor.
    pub fn silent(&self, on: bool) {
        self.inner.silent.store(on, Ordering::SeqCst);
    }

    /// For each silent connection: how long its client waited before
    /// giving up (`None`: still waiting).
    pub fn silent_waits(&self) -> Vec<Option<Duration>> {
        self.inner.silent_log.lock().unwrap().iter().map(|(a, c)| c.map(|c| c - *a)).collect()
    }

    /// Flips a byte in the next chunk sent towards the client.
    pub fn corrupt_next(&self) {
        self.inner.corrupt_next.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.fin();
    }
}

fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    while !inner.stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(TICK);
                continue;
            }
            Err(_) => continue,
        };
        inner.accepted.fetch_add(1, Ordering::SeqCst);
        let _ = client.set_nonblocking(false);
        let _ = client.set_nodelay(true);
        let inner = inner.clone();
        std::thread::spawn(move || {
            if inner.silent.load(Ordering::SeqCst) {
                return silent(client, &inner);
            }
            // A connection made during a pause waits, as a SYN would be
            // retransmitted until the path comes back.
            let target = loop {
                if inner.stop.load(Ordering::SeqCst) {
                    return;
                }
                let target = *inner.target.lock().unwrap();
                match target {
                    Some(t) if !inner.paused.load(Ordering::SeqCst) => break t,
                    _ => std::thread::sleep(TICK),
                }
            };
            let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
                // Nothing listens there: the client sees a reset, as it
                // would dialling the target itself.
                let _ = rustix::net::sockopt::set_socket_linger(&client, Some(Duration::ZERO));
                return;
            };
            let _ = server.set_nodelay(true);
            let done = Arc::new(AtomicBool::new(false));
            let pair =
                Pair { client: client.try_clone().unwrap(), server: server.try_clone().unwrap(), done: done.clone() };
            inner.pairs.lock().unwrap().push(pair);
            let (c2, s2, d2, i2) =
                (client.try_clone().unwrap(), server.try_clone().unwrap(), done.clone(), inner.clone());
            std::thread::spawn(move || pump(c2, s2, &d2, &i2, false));
            pump(server, client, &done, &inner, true);
        });
    }
}

/// Copies `from` → `to` until either end closes or the pair is finished.
fn pump(mut from: TcpStream, mut to: TcpStream, done: &AtomicBool, inner: &Inner, towards_client: bool) {
    let _ = from.set_read_timeout(Some(TICK * 4));
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        if done.load(Ordering::SeqCst) || inner.stop.load(Ordering::SeqCst) {
            return;
        }
        if inner.paused.load(Ordering::SeqCst) {
            std::thread::sleep(TICK);
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => {
                // Half-close travels on; the other pump carries the rest.
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                continue;
            }
            Err(_) => {
                // A reset travels on as a reset.
                let _ = rustix::net::sockopt::set_socket_linger(&to, Some(Duration::ZERO));
                let _ = to.shutdown(Shutdown::Both);
                done.store(true, Ordering::SeqCst);
                return;
            }
        };
        // A read that began before a pause can return after it: what it
        // brought is held, not forwarded, so that nothing sent after
        // `pause(true)` returned crosses the relay until `pause(false)`.
        while inner.paused.load(Ordering::SeqCst) {
            if done.load(Ordering::SeqCst) || inner.stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(TICK);
        }
        if towards_client && inner.corrupt_next.swap(false, Ordering::SeqCst) {
            buf[n / 2] ^= 0x5a;
        }
        if to.write_all(&buf[..n]).is_err() {
            let _ = from.shutdown(Shutdown::Both);
            done.store(true, Ordering::SeqCst);
            return;
        }
    }
}

/// Accepts, reads and discards, never answers; records when the client
/// gave up.
fn silent(mut client: TcpStream, inner: &Inner) {
    let idx = {
        let mut log = inner.silent_log.lock().unwrap();
        log.push((Instant::now(), None));
        log.len() - 1
    };
    let _ = client.set_read_timeout(Some(TICK * 4));
    let mut buf = [0u8; 4096];
    loop {
        if inner.stop.load(Ordering::SeqCst) {
            return;
        }
        let gone = match client.read(&mut buf) {
            Ok(n) => n == 0,
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted),
        };
        if gone {
            inner.silent_log.lock().unwrap()[idx].1 = Some(Instant::now());
            return;
        }
    }
}
