//! The driver over real sockets: a TCP pair on 127.0.0.1, and the same
//! through rustls with certificates from rcgen.

use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncWrite};
use smol::net::{TcpListener, TcpStream};
use smol::{LocalExecutor, Task, Timer};
use std::rc::Rc;
use std::time::{Duration, Instant};
use uplink::driver::{Session, StreamClosed};
use uplink::proto::*;

fn head(path: &str) -> RequestHead {
    RequestHead {
        method: "POST".into(),
        path: path.into(),
        headers: vec![],
        identity: Identity { user: "alice".into(), ..Default::default() },
    }
}

fn agent_mux(config: Config) -> Mux {
    Mux::agent(config, AgentInfo { agent_version: "test".into(), ..Default::default() }, Instant::now())
}

/// The agent side of the tests: answers every stream with 200 and echoes
/// the request body back, except paths starting with `/stall`, which it
/// answers with `n` bytes it keeps writing regardless of the reader.
async fn echo_agent(ex: Rc<LocalExecutor<'static>>, session: Session) {
    while let Some((mut stream, head)) = session.accept().await {
        ex.spawn(async move {
            stream.send_head(ResponseHead { status: 200, headers: vec![] }).unwrap();
            if let Some(n) = head.path.strip_prefix("/send/") {
                let n: usize = n.parse().unwrap();
                let chunk = vec![b'z'; 16 * 1024];
                let mut left = n;
                while left > 0 {
                    let k = left.min(chunk.len());
                    if stream.write_all(&chunk[..k]).await.is_err() {
                        return;
                    }
                    left -= k;
                }
                stream.finish();
                return;
            }
            while let Ok(Some(chunk)) = stream.read_chunk().await {
                if stream.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            stream.finish();
        })
        .detach(); // Owned by the executor; ends with its stream.
    }
}

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, server) = smol::future::zip(TcpStream::connect(addr), listener.accept()).await;
    let client = client.unwrap();
    let server = server.unwrap().0;
    client.set_nodelay(true).unwrap();
    server.set_nodelay(true).unwrap();
    (client, server)
}

/// Agent and hub sessions over `agent_io` and `hub_io`, each run by a task
/// on `ex`: dropping a task drops that side and its socket.
fn spawn_sessions<'a, A, H>(
    ex: &LocalExecutor<'a>,
    config: Config,
    agent_io: A,
    hub_io: H,
) -> (Session, Task<SessionError>, Session, Task<SessionError>)
where
    A: AsyncRead + AsyncWrite + Unpin + 'a,
    H: AsyncRead + AsyncWrite + Unpin + 'a,
{
    let agent = Session::new(agent_mux(config.clone()));
    let hub = Session::new(Mux::hub(config, 1, Instant::now()));
    let a = agent.clone();
    let agent_task = ex.spawn(async move { a.run(agent_io).await });
    let h = hub.clone();
    let hub_task = ex.spawn(async move { h.run(hub_io).await });
    (agent, agent_task, hub, hub_task)
}

/// Runs hub and agent sessions over the given transports, then `body`
/// against the hub session.
fn with_sessions<A, H, F, Fut>(config: Config, make: impl AsyncFnOnce() -> (A, H), body: F)
where
    A: AsyncRead + AsyncWrite + Unpin + 'static,
    H: AsyncRead + AsyncWrite + Unpin + 'static,
    F: FnOnce(Session, Session) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let ex = Rc::new(LocalExecutor::new());
    smol::block_on(ex.run(async {
        let (agent_io, hub_io) = make().await;
        let (agent, agent_task, hub, hub_task) = spawn_sessions(&ex, config, agent_io, hub_io);
        let echo = ex.spawn(echo_agent(ex.clone(), agent.clone()));
        let (hello, _) = hub.connected().await.unwrap();
        assert_eq!(hello.unwrap().agent_version, "test");
        body(hub.clone(), agent.clone())
            .or(async {
                Timer::after(Duration::from_secs(60)).await;
                panic!("test timed out")
            })
            .await;
        drop((agent_task, hub_task, echo));
    }));
}

async fn echo_roundtrip(hub: &Session, payload: &[u8]) -> Vec<u8> {
    let mut stream = hub.open(head("/echo")).unwrap();
    assert_eq!(stream.response_head().await.unwrap().status, 200);
    // Interleave writing and reading: the echo is bounded by credit both
    // ways, so writing everything first would deadlock by design.
    let mut out = Vec::new();
    for piece in payload.chunks(64 * 1024) {
        stream.write_all(piece).await.unwrap();
        let want = out.len() + piece.len();
        while out.len() < want {
            out.extend_from_slice(&stream.read_chunk().await.unwrap().expect("echo ended early"));
        }
    }
    stream.finish();
    while let Some(chunk) = stream.read_chunk().await.unwrap() {
        out.extend_from_slice(&chunk);
    }
    out
}

#[test]
fn tcp_echo_small_and_large() {
    with_sessions(Config::default(), tcp_pair, |hub, _agent| async move {
        assert_eq!(echo_roundtrip(&hub, b"hello").await, b"hello");
        let big: Vec<u8> = (0..8 * 1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
        assert!(echo_roundtrip(&hub, &big).await == big, "8 MiB echoed intact");
        assert_eq!(hub.stream_count(), 0);
    });
}

#[test]
fn concurrent_streams_complete_while_one_reader_stalls() {
    let config = Config { initial_window: 16 * 1024, ..Config::default() };
    with_sessions(config, tcp_pair, |hub, _agent| async move {
        // A stream whose reader never reads, parked with a full window.
        let mut stalled = hub.open(head("/send/10000000")).unwrap();
        stalled.finish();
        assert_eq!(stalled.response_head().await.unwrap().status, 200);
        let mut tasks = Vec::new();
        for i in 0..200 {
            let hub = hub.clone();
            tasks.push(async move {
                let payload = format!("stream {i} ").repeat(1000).into_bytes();
                assert_eq!(echo_roundtrip(&hub, &payload).await, payload);
            });
        }
        for t in tasks {
            t.await;
        }
        // Keepalive and new streams still work; the stalled one is intact.
        assert_eq!(echo_roundtrip(&hub, b"after").await, b"after");
        let first = stalled.read_chunk().await.unwrap().unwrap();
        assert!(first.iter().all(|&b| b == b'z'));
    });
}

#[test]
fn concurrent_streams_run_in_parallel_tasks() {
    with_sessions(Config::default(), tcp_pair, |hub, _agent| async move {
        let ex = LocalExecutor::new();
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let hub = hub.clone();
                ex.spawn(async move {
                    let payload = vec![i as u8; 100_000];
                    assert_eq!(echo_roundtrip(&hub, &payload).await, payload);
                })
            })
            .collect();
        ex.run(async {
            for t in tasks {
                t.await;
            }
        })
        .await;
    });
}

#[test]
fn goaway_deregistered_reaches_the_agent() {
    with_sessions(Config::default(), tcp_pair, |hub, agent| async move {
        hub.go_away(GoAwayCode::Deregistered, "cluster edge-1 was deregistered");
        let deadline = Instant::now() + Duration::from_secs(10);
        while agent.goaway_received().is_none() {
            assert!(Instant::now() < deadline, "GoAway never arrived");
            Timer::after(Duration::from_millis(5)).await;
        }
        assert_eq!(
            agent.goaway_received(),
            Some((GoAwayCode::Deregistered, "cluster edge-1 was deregistered".to_string()))
        );
        // Nothing in flight: both sessions are drained and close.
        while agent.closed().is_none() || hub.closed().is_none() {
            assert!(Instant::now() < deadline, "sessions did not close after draining");
            Timer::after(Duration::from_millis(5)).await;
        }
        assert!(hub.open(head("/x")).is_err());
    });
}

#[test]
fn a_dropped_connection_fails_open_streams_with_a_reason() {
    let ex = LocalExecutor::new();
    smol::block_on(ex.run(async {
        let (agent_io, hub_io) = tcp_pair().await;
        let (agent, agent_task, hub, hub_task) = spawn_sessions(&ex, Config::default(), agent_io, hub_io);
        hub.connected().await.unwrap();
        hub.connected().await.unwrap();
        let mut stream = hub.open(head("/watch")).unwrap();
        let (mut accepted, _) = agent.accept().await.unwrap();
        accepted.send_head(ResponseHead { status: 200, headers: vec![] }).unwrap();
        assert_eq!(stream.response_head().await.unwrap().status, 200);
        // The agent process dies: its session task is dropped with the socket.
        drop(agent_task);
        drop(accepted);
        let err = stream.read_chunk().await.unwrap_err();
        assert!(matches!(err, StreamClosed::Session(SessionError::ConnectionLost(_))), "{err:?}");
        let why = hub_task.await;
        assert!(matches!(why, SessionError::ConnectionLost(_)), "{why:?}");
    }));
}

mod tls {
    use super::*;
    use futures_rustls::{TlsAcceptor, TlsConnector};
    use rustls::pki_types::ServerName;

    struct Certs {
        ca_pem: String,
        cert_pem: String,
        key_pem: String,
    }

    fn certs() -> Certs {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["hub.test".to_string()]).unwrap();
        let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
        Certs { ca_pem: ca_cert.pem(), cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    }

    async fn tls_pair(
        trust: uplink::tls::Trust,
        certs: &Certs,
    ) -> std::io::Result<(futures_rustls::client::TlsStream<TcpStream>, futures_rustls::server::TlsStream<TcpStream>)>
    {
        let (client, server) = tcp_pair().await;
        let client_config = uplink::tls::client_config(&trust, None, &[]).unwrap();
        let server_config = uplink::tls::server_config(&certs.cert_pem, &certs.key_pem).unwrap();
        let connector = TlsConnector::from(client_config);
        let acceptor = TlsAcceptor::from(server_config);
        let name = ServerName::try_from("hub.test").unwrap();
        let (c, s) = smol::future::zip(connector.connect(name, client), acceptor.accept(server)).await;
        Ok((c?, s?))
    }

    #[test]
    fn echo_through_rustls_with_a_private_ca() {
        let certs = certs();
        let trust = uplink::tls::Trust::CaPem(certs.ca_pem.clone());
        with_sessions(
            Config::default(),
            || async move { tls_pair(trust, &certs).await.unwrap() },
            |hub, _agent| async move {
                let big: Vec<u8> = (0..2 * 1024 * 1024).map(|i: u32| (i % 253) as u8).collect();
                assert!(echo_roundtrip(&hub, &big).await == big);
            },
        );
    }

    #[test]
    fn public_key_pin_accepts_the_pinned_key_only() {
        let certs = certs();
        let der = uplink::tls::certs_from_pem(&certs.cert_pem, "test").unwrap();
        let pin = uplink::tls::spki_pin(&der[0]).unwrap();
        let good = uplink::tls::Trust::Pin(pin);
        with_sessions(
            Config::default(),
            || async move { tls_pair(good, &certs).await.unwrap() },
            |hub, _agent| async move {
                assert_eq!(echo_roundtrip(&hub, b"pinned").await, b"pinned");
            },
        );
        let other = super::tls::certs();
        let wrong = uplink::tls::Trust::Pin(
            uplink::tls::spki_pin(&uplink::tls::certs_from_pem(&other.cert_pem, "t").unwrap()[0]).unwrap(),
        );
        let certs = super::tls::certs();
        let result = smol::block_on(tls_pair(wrong, &certs));
        assert!(result.is_err(), "a different key is refused");
        // And an unknown CA is refused under CA trust.
        let result = smol::block_on(tls_pair(uplink::tls::Trust::CaPem(other.ca_pem), &certs));
        assert!(result.is_err());
    }
}

#[test]
fn a_reset_after_the_peers_end_still_reads_to_a_clean_end() {
    let ex = LocalExecutor::new();
    smol::block_on(ex.run(async {
        let (agent_io, hub_io) = tcp_pair().await;
        let (agent, _agent_task, hub, _hub_task) = spawn_sessions(&ex, Config::default(), agent_io, hub_io);
        hub.connected().await.unwrap();
        // The hub never finishes its side; the agent answers, finishes and
        // drops the stream, which resets it.
        let mut stream = hub.open(head("/early-answer")).unwrap();
        let (mut accepted, _) = agent.accept().await.unwrap();
        accepted.send_head(ResponseHead { status: 413, headers: vec![] }).unwrap();
        accepted.write_all(b"too large").await.unwrap();
        accepted.finish();
        drop(accepted);
        assert_eq!(stream.response_head().await.unwrap().status, 413);
        // Let the Reset arrive too.
        Timer::after(Duration::from_millis(50)).await;
        assert_eq!(stream.read_chunk().await.unwrap().unwrap(), b"too large");
        assert_eq!(stream.read_chunk().await.unwrap(), None);
    }));
}

/// How long `task` takes to finish, at most `limit`.
async fn time_to_end(task: Task<SessionError>, limit: Duration) -> (Duration, SessionError) {
    let start = Instant::now();
    let why = task
        .or(async {
            Timer::after(limit).await;
            panic!("session still running after {limit:?}")
        })
        .await;
    (start.elapsed(), why)
}

#[test]
fn a_lost_connection_ends_the_other_side_in_the_same_turn() {
    // Each side in turn loses its peer (the peer's task and socket are
    // dropped: EOF, or a reset when bytes were unread). The survivor ends
    // at once, not after a grace period, and says why.
    for hub_dies in [true, false] {
        let ex = LocalExecutor::new();
        smol::block_on(ex.run(async {
            let (agent_io, hub_io) = smol::net::unix::UnixStream::pair().unwrap();
            let (agent, agent_task, hub, hub_task) = spawn_sessions(&ex, Config::default(), agent_io, hub_io);
            hub.connected().await.unwrap();
            agent.connected().await.unwrap();
            let (dead, survivor) = if hub_dies { (hub_task, agent_task) } else { (agent_task, hub_task) };
            drop(dead);
            let (took, why) = time_to_end(survivor, Duration::from_secs(5)).await;
            assert!(matches!(why, SessionError::ConnectionLost(_)), "{why:?}");
            assert!(took < Duration::from_millis(200), "noticed after {took:?}");
        }));
    }
}

#[test]
fn a_session_closed_by_the_peer_ends_both_sides_at_once() {
    let ex = LocalExecutor::new();
    smol::block_on(ex.run(async {
        let (agent_io, hub_io) = tcp_pair().await;
        let (agent, agent_task, hub, hub_task) = spawn_sessions(&ex, Config::default(), agent_io, hub_io);
        hub.connected().await.unwrap();
        agent.connected().await.unwrap();
        hub.close(GoAwayCode::ShuttingDown, "hub restarting");
        let (took, why) = time_to_end(agent_task, Duration::from_secs(5)).await;
        assert_eq!(why, SessionError::GoAway { code: GoAwayCode::ShuttingDown, message: "hub restarting".into() });
        assert!(took < Duration::from_millis(200), "agent ended after {took:?}");
        let (took, _) = time_to_end(hub_task, Duration::from_secs(5)).await;
        assert!(took < Duration::from_millis(200), "hub ended after {took:?}");
    }));
}

#[test]
fn a_silent_peer_is_dead_after_the_hubs_deadline() {
    // The hub's settings reach the agent; a peer that stops answering (its
    // socket stays open, nothing arrives) is given up on at that deadline.
    let ex = LocalExecutor::new();
    smol::block_on(ex.run(async {
        let config = Config {
            keepalive: Duration::from_millis(100),
            dead_after: Duration::from_millis(400),
            ..Config::default()
        };
        let (agent_io, mut hub_io) = smol::net::unix::UnixStream::pair().unwrap();
        let agent = Session::new(agent_mux(Config::default()));
        let a = agent.clone();
        let agent_task = ex.spawn(async move { a.run(agent_io).await });
        // The hub answers the handshake by hand, then goes silent with its
        // socket open (a frozen process, a black-holed path).
        let mut hub = Mux::hub(config, 1, Instant::now());
        let mut buf = vec![0u8; 4096];
        while !hub.is_open() {
            let n = smol::io::AsyncReadExt::read(&mut hub_io, &mut buf).await.unwrap();
            hub.handle_input(&buf[..n], Instant::now());
        }
        smol::io::AsyncWriteExt::write_all(&mut hub_io, &hub.take_transmit(Vec::new())).await.unwrap();
        agent.connected().await.unwrap();
        let (took, why) = time_to_end(agent_task, Duration::from_secs(5)).await;
        assert_eq!(why, SessionError::Timeout);
        assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(1500), "gave up after {took:?}");
        drop(hub_io);
    }));
}

/// A pattern that shows any byte out of place.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Relays everything `reader` gives into `stream` with `send_from`
/// (waiting with `writable` when the stream is full), then finishes it.
/// Returns how many times it found the stream full.
async fn relay<R: AsyncRead + Unpin>(
    stream: &mut uplink::driver::Stream,
    reader: &mut R,
) -> Result<usize, StreamClosed> {
    use uplink::driver::Relayed;
    let mut full = 0;
    loop {
        match stream.send_from(reader, 32 * 1024).await? {
            Relayed::Full => {
                full += 1;
                stream.writable().await?;
            }
            Relayed::Read(Ok(0)) => break,
            Relayed::Read(Ok(_)) => {}
            Relayed::Read(Err(e)) => panic!("source failed: {e}"),
        }
    }
    stream.finish();
    Ok(full)
}

/// Bytes read from a socket straight into a stream's send queue arrive
/// intact and in order, through waits for credit (a window far below the
/// body) and reads of odd sizes; a small answer opened meanwhile on the
/// same session completes too.
#[test]
fn send_from_relays_a_socket_in_place_through_credit_waits() {
    let ex = Rc::new(LocalExecutor::new());
    smol::block_on(ex.run(async {
        let config = Config { initial_window: 16 * 1024, ..Config::default() };
        let (agent_io, hub_io) = tcp_pair().await;
        let (agent, agent_task, hub, hub_task) = spawn_sessions(&ex, config, agent_io, hub_io);
        let body = pattern(3 * 1024 * 1024 + 77);
        let source = body.clone();
        let full = ex.spawn(async move {
            let (mut big, _) = agent.accept().await.unwrap();
            big.send_head(ResponseHead { status: 200, headers: vec![] }).unwrap();
            let (mut small, _) = agent.accept().await.unwrap();
            small.send_head(ResponseHead { status: 200, headers: vec![] }).unwrap();
            small.write_all(b"small answer").await.unwrap();
            small.finish();
            // The source writes in pieces of odd sizes.
            let (mut w, mut r) = tcp_pair().await;
            let writer = async move {
                let mut at = 0;
                let mut i = 0;
                while at < source.len() {
                    let n = (1 + (i * 7919) % 20000).min(source.len() - at);
                    smol::io::AsyncWriteExt::write_all(&mut w, &source[at..at + n]).await.unwrap();
                    at += n;
                    i += 1;
                }
            };
            let (_, full) = smol::future::zip(writer, relay(&mut big, &mut r)).await;
            let full = full.unwrap();
            // Keep the stream until the hub read it all (a drop resets).
            while big.read_chunk().await.unwrap().is_some() {}
            full
        });
        hub.connected().await.unwrap();
        let mut big = hub.open(head("/big")).unwrap();
        big.finish();
        let mut small = hub.open(head("/small")).unwrap();
        small.finish();
        assert_eq!(small.response_head().await.unwrap().status, 200);
        assert_eq!(small.read_chunk().await.unwrap().unwrap(), b"small answer");
        assert_eq!(big.response_head().await.unwrap().status, 200);
        let mut got = Vec::new();
        while let Some(chunk) = big.read_chunk().await.unwrap() {
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got.len(), body.len());
        assert!(got == body, "relayed bytes out of order");
        drop(big);
        let full = full.await;
        assert!(full > 0, "the 16 KiB window made the relay wait for credit");
        drop((agent_task, hub_task));
    }));
}

/// A relay waiting on a silent source (an idle watch) learns at once
/// that the hub reset the stream, and a stream that was never written
/// to leaves nothing queued behind.
#[test]
fn a_reset_ends_a_send_from_that_waits_on_its_source() {
    let ex = Rc::new(LocalExecutor::new());
    smol::block_on(ex.run(async {
        let (agent_io, hub_io) = tcp_pair().await;
        let (agent, agent_task, hub, hub_task) = spawn_sessions(&ex, Config::default(), agent_io, hub_io);
        let (waiting_tx, waiting_rx) = smol::channel::bounded(1);
        let relayed = ex.spawn(async move {
            let (mut stream, _) = agent.accept().await.unwrap();
            stream.send_head(ResponseHead { status: 200, headers: vec![] }).unwrap();
            let (_w, mut r) = tcp_pair().await;
            waiting_tx.send(()).await.unwrap();
            let ended = relay(&mut stream, &mut r).await;
            (ended, agent)
        });
        hub.connected().await.unwrap();
        let mut stream = hub.open(head("/watch")).unwrap();
        assert_eq!(stream.response_head().await.unwrap().status, 200);
        waiting_rx.recv().await.unwrap();
        stream.reset(ResetCode::Cancel, "kubectl went away");
        let (ended, agent) = relayed
            .or(async {
                Timer::after(Duration::from_secs(10)).await;
                panic!("the relay did not notice the reset")
            })
            .await;
        match ended {
            Err(StreamClosed::Reset { code: ResetCode::Cancel, message }) => assert_eq!(message, "kubectl went away"),
            other => panic!("expected the hub's reset, got {other:?}"),
        }
        // The session goes on.
        let deadline = Instant::now() + Duration::from_secs(5);
        while agent.stream_count() > 0 {
            assert!(Instant::now() < deadline, "the reset stream stayed");
            Timer::after(Duration::from_millis(5)).await;
        }
        assert!(agent.is_open() && hub.is_open());
        drop((agent_task, hub_task));
    }));
}
