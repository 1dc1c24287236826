//! Two muxes wired back to back with a virtual clock: the protocol as a
//! deterministic trace, no sockets and no sleeping.

use proptest::prelude::*;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use uplink::proto::*;

struct Pair {
    agent: Mux,
    hub: Mux,
    now: Instant,
    agent_events: Vec<Event>,
    hub_events: Vec<Event>,
    /// When false, bytes from the agent are dropped (a dead link).
    agent_link_up: bool,
}

fn head(path: &str) -> RequestHead {
    RequestHead {
        method: "GET".into(),
        path: path.into(),
        headers: vec![Header::new("accept", "application/json")],
        identity: Identity { user: "alice".into(), groups: vec!["dev".into()], ..Default::default() },
    }
}

fn ok_head() -> ResponseHead {
    ResponseHead { status: 200, headers: vec![Header::new("content-type", "application/json")] }
}

impl Pair {
    fn with(config: Config) -> Pair {
        let now = Instant::now();
        let info = AgentInfo { agent_version: "0.1.0".into(), arch: "aarch64".into(), ..Default::default() };
        let mut pair = Pair {
            agent: Mux::agent(config.clone(), info, now),
            hub: Mux::hub(config, 42, now),
            now,
            agent_events: Vec::new(),
            hub_events: Vec::new(),
            agent_link_up: true,
        };
        pair.run();
        assert!(pair.agent.is_open() && pair.hub.is_open(), "handshake completes");
        pair
    }

    fn new() -> Pair {
        Pair::with(Config::default())
    }

    /// Moves bytes both ways until nothing more is sent.
    fn run(&mut self) {
        for _ in 0..10_000 {
            let a = self.agent.take_transmit(Vec::new());
            let h = self.hub.take_transmit(Vec::new());
            if a.is_empty() && h.is_empty() {
                break;
            }
            if self.agent_link_up && !a.is_empty() {
                self.hub.handle_input(&a, self.now);
            }
            if !h.is_empty() {
                self.agent.handle_input(&h, self.now);
            }
            self.collect();
        }
        self.collect();
    }

    fn collect(&mut self) {
        while let Some(e) = self.agent.poll_event() {
            self.agent_events.push(e);
        }
        while let Some(e) = self.hub.poll_event() {
            self.hub_events.push(e);
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.agent.handle_timeout(self.now);
        self.hub.handle_timeout(self.now);
        self.run();
    }

    /// Feeds raw bytes to the hub as if the agent sent them.
    fn inject_to_hub(&mut self, frame: &Frame) {
        let mut bytes = Vec::new();
        uplink::proto::codec::encode(frame, u32::MAX, &mut bytes).unwrap();
        self.hub.handle_input(&bytes, self.now);
        self.run();
    }

    fn take_agent_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.agent_events)
    }

    fn take_hub_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.hub_events)
    }
}

fn data_for(events: &[Event], id: StreamId) -> Vec<u8> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Data { id: i, data } if *i == id => Some(data.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn handshake_exchanges_hello_and_welcome() {
    let mut p = Pair::new();
    let hub = p.take_hub_events();
    let agent = p.take_agent_events();
    match &hub[..] {
        [Event::Connected { hello: Some(h), welcome }] => {
            assert_eq!(h.arch, "aarch64");
            assert_eq!(h.protocol_version, PROTOCOL_VERSION);
            assert_eq!(welcome.session_id, 42);
        }
        other => panic!("hub events {other:?}"),
    }
    assert!(matches!(&agent[..], [Event::Connected { hello: None, welcome }] if welcome.session_id == 42));
}

#[test]
fn request_response_with_half_close() {
    let mut p = Pair::new();
    p.take_agent_events();
    p.take_hub_events();
    let id = p.hub.open(head("/api/v1/pods")).unwrap();
    assert_eq!(id.opener(), Side::Hub);
    assert_eq!(p.hub.send_data(id, b"request body").unwrap(), 12);
    p.hub.finish(id).unwrap();
    p.run();
    let ev = p.take_agent_events();
    assert_eq!(ev[0], Event::Opened { id, head: head("/api/v1/pods") });
    assert_eq!(data_for(&ev, id), b"request body");
    assert_eq!(ev.last(), Some(&Event::End { id }));

    // Data before the head is refused locally.
    assert_eq!(p.agent.send_data(id, b"x"), Err(StreamError::HeadOrder));
    p.agent.send_head(id, ok_head()).unwrap();
    assert_eq!(p.agent.send_head(id, ok_head()), Err(StreamError::HeadOrder));
    p.agent.send_data(id, b"{\"items\":[]}").unwrap();
    p.agent.finish(id).unwrap();
    assert_eq!(p.agent.send_data(id, b"late"), Err(StreamError::Unknown(id)));
    p.run();
    let ev = p.take_hub_events();
    assert_eq!(ev[0], Event::Head { id, head: ok_head() });
    assert_eq!(data_for(&ev, id), b"{\"items\":[]}");
    assert_eq!(ev.last(), Some(&Event::End { id }));
    assert_eq!(p.hub.stream_count(), 0);
    assert_eq!(p.agent.stream_count(), 0);
}

/// A head opened by reference (the hub's proxied requests) reaches the
/// agent as the same head opened by value, and meets the same limits.
#[test]
fn a_borrowed_open_is_the_same_open() {
    let mut p = Pair::new();
    p.take_agent_events();
    let owned = head("/api/v1/pods?limit=1");
    let a = p.hub.open(owned.clone()).unwrap();
    let b = p.hub.open_ref(&owned.as_open()).unwrap();
    let extra = owned.as_open().with_field(b"uplink-peer-cluster", b"c_1");
    let c = p.hub.open_ref(&extra).unwrap();
    p.run();
    let mut with_extra = owned.clone();
    with_extra.headers.push(Header::new("uplink-peer-cluster", "c_1"));
    assert_eq!(
        p.take_agent_events(),
        [
            Event::Opened { id: a, head: owned.clone() },
            Event::Opened { id: b, head: owned.clone() },
            Event::Opened { id: c, head: with_extra }
        ]
    );
    let mut crowded = owned.clone();
    crowded.identity.groups = (0..300).map(|i| format!("g{i}")).collect();
    let mut wordy = owned.clone();
    wordy.headers = (0..300).map(|i| Header::new(format!("x-{i}"), "v")).collect();
    let mut big = owned.clone();
    big.headers = vec![Header::new("x-big", vec![b'v'; 300 * 1024])];
    for bad in [crowded, wordy, big] {
        let by_value = p.hub.open(bad.clone()).unwrap_err();
        assert!(matches!(by_value, StreamError::Limits(_)), "{by_value:?}");
        assert_eq!(p.hub.open_ref(&bad.as_open()).unwrap_err(), by_value);
    }
}

#[test]
fn both_sides_open_streams_without_colliding() {
    let mut p = Pair::new();
    let a = p.agent.open(head("/from-agent")).unwrap();
    let h = p.hub.open(head("/from-hub")).unwrap();
    let h2 = p.hub.open(head("/from-hub-2")).unwrap();
    assert_eq!((a.0 % 2, h.0 % 2), (0, 1));
    assert_ne!(h, h2);
    p.run();
    assert!(p.hub_events.contains(&Event::Opened { id: a, head: head("/from-agent") }));
    assert!(p.agent_events.contains(&Event::Opened { id: h, head: head("/from-hub") }));
}

#[test]
fn reset_ends_only_that_stream() {
    let mut p = Pair::new();
    let a = p.hub.open(head("/a")).unwrap();
    let b = p.hub.open(head("/b")).unwrap();
    p.run();
    p.take_agent_events();
    p.hub.reset(a, ResetCode::Cancel, "client went away");
    p.run();
    let ev = p.take_agent_events();
    assert_eq!(ev, vec![Event::Reset { id: a, code: ResetCode::Cancel, message: "client went away".into() }]);
    assert_eq!(p.agent.send_head(a, ok_head()), Err(StreamError::Unknown(a)));
    // The other stream is untouched.
    p.agent.send_head(b, ok_head()).unwrap();
    p.agent.send_data(b, b"ok").unwrap();
    p.run();
    assert_eq!(data_for(&p.hub_events, b), b"ok");
    assert!(p.hub.is_open() && p.agent.is_open());
}

#[test]
fn window_exhaustion_and_refill() {
    let config = Config { initial_window: 1024, ..Config::default() };
    let mut p = Pair::with(config);
    let id = p.hub.open(head("/upload")).unwrap();
    let body = vec![7u8; 5000];
    let mut sent = p.hub.send_data(id, &body).unwrap();
    assert_eq!(sent, 1024, "send stops at the peer's window");
    assert_eq!(p.hub.send_data(id, &body[sent..]).unwrap(), 0);
    assert_eq!(p.hub.send_capacity(id), 0);
    p.run();
    let mut received = data_for(&p.take_agent_events(), id).len();
    assert_eq!(received, 1024);
    // Nothing moves until the reader consumes; then credit comes back.
    p.run();
    assert_eq!(p.hub.send_data(id, &body[sent..]).unwrap(), 0);
    while sent < body.len() {
        p.agent.consume(id, received);
        p.run();
        assert!(p.take_hub_events().contains(&Event::Writable { id }));
        let n = p.hub.send_data(id, &body[sent..]).unwrap();
        assert!(n > 0 && n <= 1024);
        sent += n;
        p.run();
        received = data_for(&p.take_agent_events(), id).len();
        assert_eq!(received, n);
    }
}

#[test]
fn a_stalled_reader_stops_only_its_own_stream_among_1000() {
    let config = Config { initial_window: 8 * 1024, max_tx_buffer: 64 * 1024, ..Config::default() };
    let mut p = Pair::with(config);
    p.take_hub_events();
    let ids: Vec<StreamId> = (0..1000).map(|i| p.hub.open(head(&format!("/s/{i}"))).unwrap()).collect();
    for &id in &ids {
        p.hub.finish(id).unwrap();
    }
    p.run();
    p.take_agent_events();
    let stalled = ids[0];
    let response = vec![1u8; 20 * 1024];
    let mut remaining: HashMap<StreamId, usize> = HashMap::new();
    for &id in &ids {
        p.agent.send_head(id, ok_head()).unwrap();
        remaining.insert(id, response.len());
    }
    let mut got: HashMap<StreamId, usize> = HashMap::new();
    let mut ended: HashSet<StreamId> = HashSet::new();
    for _round in 0..5000 {
        // The agent writes what credit allows on every stream.
        for &id in &ids {
            let left = remaining[&id];
            if left > 0 {
                let n = p.agent.send_data(id, &response[..left]).unwrap();
                remaining.insert(id, left - n);
                if left - n == 0 {
                    p.agent.finish(id).unwrap();
                }
            }
        }
        p.run();
        for e in p.take_hub_events() {
            match e {
                Event::Data { id, data } => {
                    *got.entry(id).or_default() += data.len();
                    if id != stalled {
                        p.hub.consume(id, data.len());
                    }
                }
                Event::End { id } => {
                    ended.insert(id);
                }
                Event::Head { .. } | Event::Writable { .. } | Event::Pong { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        p.run();
        if ended.len() == 999 {
            break;
        }
    }
    assert_eq!(ended.len(), 999, "every stream but the stalled one completes");
    assert!(!ended.contains(&stalled));
    assert_eq!(got[&stalled], 8 * 1024, "the stalled stream got exactly its window");
    assert!(ids[1..].iter().all(|id| got[id] == response.len()));
    assert!(p.hub.memory_estimate() < 4 << 20, "hub memory bounded: {}", p.hub.memory_estimate());
    assert!(p.agent.memory_estimate() < 4 << 20, "agent memory bounded: {}", p.agent.memory_estimate());
    // Keepalive still flows with the stalled stream parked.
    p.take_agent_events();
    for _ in 0..4 {
        p.advance(Duration::from_secs(4));
    }
    assert!(p.hub_events.iter().chain(&p.agent_events).any(|e| matches!(e, Event::Pong { .. })));
    assert!(p.hub.is_open());
}

#[test]
fn keepalive_keeps_a_quiet_link_alive_and_detects_a_dead_one() {
    let mut p = Pair::new();
    for _ in 0..20 {
        p.advance(Duration::from_secs(10));
    }
    assert!(p.hub.is_open() && p.agent.is_open(), "pings and pongs keep both sides alive for 200 s");
    assert!(p.take_hub_events().iter().any(|e| matches!(e, Event::Pong { .. })));
    // The agent's bytes stop arriving at the hub.
    p.agent_link_up = false;
    let deadline = p.hub.poll_timeout().unwrap();
    assert!(deadline <= p.now + Duration::from_secs(15));
    for _ in 0..2 {
        p.advance(Duration::from_secs(10));
    }
    assert!(p.hub.is_closed());
    assert!(p.take_hub_events().contains(&Event::Closed { error: SessionError::Timeout }));
}

#[test]
fn the_agent_takes_the_hubs_keepalive_and_deadline() {
    // The agent's own settings are slower; the hub's win in the handshake.
    let hub_config =
        Config { keepalive: Duration::from_secs(2), dead_after: Duration::from_secs(7), ..Config::default() };
    let agent_config =
        Config { keepalive: Duration::from_secs(30), dead_after: Duration::from_secs(90), ..Config::default() };
    let now = Instant::now();
    let mut agent = Mux::agent(agent_config.clone(), AgentInfo::default(), now);
    let mut hub = Mux::hub(hub_config.clone(), 1, now);
    hub.handle_input(&agent.take_transmit(Vec::new()), now);
    agent.handle_input(&hub.take_transmit(Vec::new()), now);
    assert!(agent.is_open());
    assert_eq!((agent.keepalive(), agent.dead_after()), (Duration::from_secs(2), Duration::from_secs(7)));
    // Silence from the hub: the agent gives up at the hub's deadline.
    assert_eq!(agent.poll_timeout(), Some(now + Duration::from_secs(2)));
    agent.handle_timeout(now + Duration::from_secs(6));
    assert!(agent.is_open());
    agent.handle_timeout(now + Duration::from_secs(7));
    assert!(agent.is_closed());

    // An agent of the previous release (no CAP_DEADLINE) is sent no
    // Deadline frame, which it could not decode.
    let mut hub = Mux::hub(hub_config.clone(), 2, now);
    let old_hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "0.1.0".into(),
        arch: "x86_64".into(),
        kube_version: String::new(),
        node_count: 0,
        capabilities: 0,
        initial_window: DEFAULT_INITIAL_WINDOW,
        max_streams: DEFAULT_MAX_STREAMS,
        max_frame: MAX_FRAME_LEN,
    };
    let mut bytes = Vec::new();
    uplink::proto::codec::encode(&Frame::Hello(old_hello), u32::MAX, &mut bytes).unwrap();
    hub.handle_input(&bytes, now);
    let sent = hub.take_transmit(Vec::new());
    let (first, used) = uplink::proto::codec::decode(&sent, MAX_FRAME_LEN).unwrap().unwrap();
    assert!(matches!(first, Frame::Welcome(_)));
    assert_eq!(used, sent.len(), "Welcome alone");

    // A hub of the previous release sends no Deadline: three intervals.
    let mut agent = Mux::agent(agent_config, AgentInfo::default(), now);
    agent.take_transmit(Vec::new());
    let welcome = Welcome {
        session_id: 3,
        keepalive_ms: 4000,
        initial_window: DEFAULT_INITIAL_WINDOW,
        max_streams: DEFAULT_MAX_STREAMS,
        max_frame: MAX_FRAME_LEN,
    };
    let mut bytes = Vec::new();
    uplink::proto::codec::encode(&Frame::Welcome(welcome), u32::MAX, &mut bytes).unwrap();
    agent.handle_input(&bytes, now);
    assert_eq!((agent.keepalive(), agent.dead_after()), (Duration::from_secs(4), Duration::from_secs(12)));
    // A Deadline below two intervals is raised to two.
    let mut bytes = Vec::new();
    uplink::proto::codec::encode(&Frame::Deadline { dead_after_ms: 1000 }, u32::MAX, &mut bytes).unwrap();
    agent.handle_input(&bytes, now);
    assert_eq!(agent.dead_after(), Duration::from_secs(8));
    // The hub never accepts one.
    let mut p = Pair::new();
    p.inject_to_hub(&Frame::Deadline { dead_after_ms: 1 });
    assert!(p.hub.is_closed());
}

fn replicas(this: &str, ids: &[&str]) -> ReplicaSet {
    ReplicaSet {
        this: this.into(),
        replicas: ids.iter().map(|id| ReplicaInfo { id: id.to_string(), url: format!("https://{id}:8443") }).collect(),
    }
}

fn replica_events(events: &[Event]) -> Vec<Result<ReplicaSet, ReplicaSetError>> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::ReplicaSet(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

/// CAP_REPLICAS: the set follows the handshake, again on each change and
/// only then; an agent without the bit never sees the frame; a bad set is
/// reported, the session lives on; the frame from the wrong side or
/// unannounced ends the session.
#[test]
fn replica_set_is_negotiated_sent_after_welcome_and_on_change() {
    let now = Instant::now();
    let mut agent = Mux::agent(Config::default(), AgentInfo::default(), now);
    let mut hub = Mux::hub(Config::default(), 1, now);
    hub.set_replicas(replicas("a", &["a", "b"]));
    hub.handle_input(&agent.take_transmit(Vec::new()), now);
    assert!(hub.peer_takes_replicas());
    let sent = hub.take_transmit(Vec::new());
    let mut frames = Vec::new();
    let mut at = 0;
    while let Some((f, used)) = uplink::proto::codec::decode(&sent[at..], MAX_FRAME_LEN).unwrap() {
        frames.push(f);
        at += used;
    }
    assert!(
        matches!(&frames[..], [Frame::Welcome(_), Frame::Deadline { .. }, Frame::ReplicaSet(s)] if *s == replicas("a", &["a", "b"]))
    );
    agent.handle_input(&sent, now);
    let mut events = Vec::new();
    while let Some(e) = agent.poll_event() {
        events.push(e);
    }
    assert_eq!(replica_events(&events), vec![Ok(replicas("a", &["a", "b"]))]);

    // A change is sent; the same set again is not.
    let mut p = Pair::new();
    p.hub.set_replicas(replicas("a", &["a"]));
    p.run();
    p.hub.set_replicas(replicas("a", &["a", "c"]));
    p.run();
    p.hub.set_replicas(replicas("a", &["a", "c"]));
    p.run();
    assert_eq!(replica_events(&p.take_agent_events()), vec![Ok(replicas("a", &["a"])), Ok(replicas("a", &["a", "c"]))]);

    // A malformed set: the agent hears what is wrong, the session goes on.
    let mut bad = replicas("a", &["a", "b"]);
    bad.replicas[1].id = "a".into();
    p.hub.set_replicas(bad);
    p.run();
    assert_eq!(replica_events(&p.take_agent_events()), vec![Err(ReplicaSetError::DuplicateId("a".into()))]);
    assert!(p.agent.is_open() && p.hub.is_open());

    // An agent of the previous release (capabilities without the bit).
    let mut old = Mux::agent_with_capabilities(Config::default(), AgentInfo::default(), CAP_DEADLINE, now);
    let mut hub = Mux::hub(Config::default(), 2, now);
    hub.set_replicas(replicas("a", &["a"]));
    hub.handle_input(&old.take_transmit(Vec::new()), now);
    assert!(!hub.peer_takes_replicas());
    old.handle_input(&hub.take_transmit(Vec::new()), now);
    hub.set_replicas(replicas("a", &["a", "b"]));
    let later = hub.take_transmit(Vec::new());
    assert!(later.is_empty(), "nothing sent to an agent without CAP_REPLICAS");
    assert!(old.is_open());
    // ... and a hub that sends it anyway breaks the protocol.
    let mut bytes = Vec::new();
    uplink::proto::codec::encode(&Frame::ReplicaSet(replicas("a", &["a"])), u32::MAX, &mut bytes).unwrap();
    old.handle_input(&bytes, now);
    assert!(old.is_closed());

    // The hub never accepts one.
    let mut p = Pair::new();
    p.inject_to_hub(&Frame::ReplicaSet(replicas("a", &["a"])));
    assert!(p.hub.is_closed());
}

#[test]
fn goaway_drains_in_flight_streams_and_refuses_new_ones() {
    let mut p = Pair::new();
    let id = p.hub.open(head("/watch")).unwrap();
    p.run();
    p.hub.go_away(GoAwayCode::ShuttingDown, "hub restarting");
    p.run();
    assert!(
        p.agent_events.contains(&Event::GoAway { code: GoAwayCode::ShuttingDown, message: "hub restarting".into() })
    );
    assert_eq!(p.hub.open(head("/new")).err(), Some(StreamError::GoingAway));
    assert_eq!(p.agent.open(head("/new")).err(), Some(StreamError::GoingAway));
    assert!(!p.hub.is_drained());
    // The in-flight stream still completes.
    p.agent.send_head(id, ok_head()).unwrap();
    p.agent.send_data(id, b"last event").unwrap();
    p.agent.finish(id).unwrap();
    p.hub.finish(id).unwrap();
    p.run();
    assert_eq!(data_for(&p.hub_events, id), b"last event");
    assert!(p.hub.is_drained() && p.agent.is_drained());
    p.agent.shutdown_drained();
    p.collect();
    assert!(matches!(
        p.agent_events.last(),
        Some(Event::Closed { error: SessionError::GoAway { code: GoAwayCode::ShuttingDown, .. } })
    ));
}

#[test]
fn goaway_refuses_streams_the_peer_never_accepted() {
    let mut p = Pair::new();
    let accepted = p.hub.open(head("/a")).unwrap();
    p.run();
    // The agent goes away while a second Open is still in flight.
    let in_flight = p.hub.open(head("/b")).unwrap();
    p.agent.go_away(GoAwayCode::ShuttingDown, "agent stopping");
    let to_hub = p.agent.take_transmit(Vec::new());
    p.hub.handle_input(&to_hub, p.now);
    p.run();
    let ev = p.take_hub_events();
    assert!(ev.contains(&Event::Reset { id: in_flight, code: ResetCode::Refused, message: "peer going away".into() }));
    assert!(!ev.iter().any(|e| matches!(e, Event::Reset { id, .. } if *id == accepted)));
}

#[test]
fn a_frame_for_a_never_opened_stream_closes_the_session() {
    let mut p = Pair::new();
    p.inject_to_hub(&Frame::Data { id: StreamId(99), data: b"x".to_vec() });
    assert!(p.hub.is_closed());
    assert!(
        matches!(p.hub_events.last(), Some(Event::Closed { error: SessionError::Protocol(m) }) if m.contains("never opened"))
    );
    // The agent learns why.
    assert!(
        p.agent_events.iter().any(|e| matches!(
            e,
            Event::Closed { error: SessionError::GoAway { code: GoAwayCode::ProtocolError, .. } }
        ))
    );
}

#[test]
fn late_frames_for_a_reset_stream_are_ignored() {
    let mut p = Pair::new();
    let id = p.hub.open(head("/a")).unwrap();
    p.run();
    p.hub.reset(id, ResetCode::Cancel, "gone");
    // The agent answered before it saw the reset.
    p.inject_to_hub(&Frame::Head { id, head: ok_head() });
    p.inject_to_hub(&Frame::Data { id, data: b"late".to_vec() });
    assert!(p.hub.is_open());
    assert!(!p.hub_events.iter().any(|e| matches!(e, Event::Head { .. } | Event::Data { .. })));
}

#[test]
fn data_past_credit_resets_the_stream_only() {
    let config = Config { initial_window: 1024, ..Config::default() };
    let mut p = Pair::with(config);
    let id = p.agent.open(head("/a")).unwrap();
    let other = p.agent.open(head("/b")).unwrap();
    p.run();
    p.take_hub_events();
    p.inject_to_hub(&Frame::Data { id, data: vec![0; 2048] });
    let ev = p.take_hub_events();
    assert!(
        matches!(&ev[..], [Event::Reset { id: i, code: ResetCode::StreamProtocol, message }] if *i == id && message.contains("past a credit"))
    );
    assert!(p.hub.is_open());
    assert!(p.agent_events.iter().any(|e| matches!(e, Event::Reset { id: i, .. } if *i == id)));
    assert_eq!(p.agent.send_data(other, b"fine").unwrap(), 4);
}

#[test]
fn window_overflow_resets_the_stream() {
    let mut p = Pair::new();
    let id = p.hub.open(head("/a")).unwrap();
    p.run();
    p.take_hub_events();
    p.inject_to_hub(&Frame::Window { id, increment: u32::MAX });
    assert!(matches!(&p.take_hub_events()[..], [Event::Reset { code: ResetCode::StreamProtocol, .. }]));
    assert!(p.hub.is_open());
}

#[test]
fn garbage_and_huge_lengths_close_with_a_typed_error() {
    let mut p = Pair::new();
    p.hub.handle_input(&[0xff, 0xff, 0xff, 0xff], p.now);
    p.collect();
    assert!(matches!(
        p.hub_events.last(),
        Some(Event::Closed { error: SessionError::Decode(DecodeError::TooLarge { len: u32::MAX, .. }) })
    ));
    let mut p = Pair::new();
    p.hub.handle_input(b"\x00\x00\x00\x03GET / HTTP/1.1\r\n", p.now);
    p.collect();
    assert!(matches!(p.hub_events.last(), Some(Event::Closed { error: SessionError::Decode(_) })));
}

#[test]
fn handshake_rules() {
    let now = Instant::now();
    // A hub that hears anything but Hello first closes.
    let mut hub = Mux::hub(Config::default(), 1, now);
    let mut bytes = Vec::new();
    uplink::proto::codec::encode(&Frame::Ping { nonce: 1 }, u32::MAX, &mut bytes).unwrap();
    hub.handle_input(&bytes, now);
    assert!(hub.is_closed());
    // A wrong protocol version is refused with a reason the agent can show.
    let mut hub = Mux::hub(Config::default(), 1, now);
    let hello = Hello {
        protocol_version: 9,
        agent_version: "9".into(),
        arch: "x".into(),
        kube_version: "v".into(),
        node_count: 0,
        capabilities: 0,
        initial_window: 1024,
        max_streams: 1,
        max_frame: 4096,
    };
    let mut bytes = Vec::new();
    uplink::proto::codec::encode(&Frame::Hello(hello), u32::MAX, &mut bytes).unwrap();
    hub.handle_input(&bytes, now);
    assert_eq!(hub.poll_event(), Some(Event::Closed { error: SessionError::UnsupportedVersion(9) }));
    let mut agent = Mux::agent(Config::default(), AgentInfo::default(), now);
    agent.take_transmit(Vec::new());
    agent.handle_input(&hub.take_transmit(Vec::new()), now);
    assert!(matches!(
        agent.poll_event(),
        Some(Event::Closed { error: SessionError::GoAway { code: GoAwayCode::UnsupportedVersion, .. } })
    ));
    // Nothing can be opened before the handshake.
    let mut agent = Mux::agent(Config::default(), AgentInfo::default(), now);
    assert_eq!(agent.open(head("/")), Err(StreamError::NotConnected));
    // A silent hub is given up on.
    agent.handle_timeout(now + Duration::from_secs(60));
    assert_eq!(agent.poll_event(), Some(Event::Closed { error: SessionError::Timeout }));
}

#[test]
fn max_streams_refuses_extra_opens() {
    let config = Config { max_streams: 2, ..Config::default() };
    let mut p = Pair::with(config);
    p.hub.open(head("/1")).unwrap();
    p.hub.open(head("/2")).unwrap();
    assert_eq!(p.hub.open(head("/3")), Err(StreamError::TooManyStreams));
    // A peer that ignores the limit gets Refused resets, not a dead session.
    let mut p = Pair::with(Config { max_streams: 1, ..Config::default() });
    p.take_hub_events();
    p.hub.take_transmit(Vec::new());
    let mut bytes = Vec::new();
    for id in [2, 4] {
        let frame = Frame::Open { id: StreamId(id), head: head("/a") };
        uplink::proto::codec::encode(&frame, u32::MAX, &mut bytes).unwrap();
    }
    p.hub.handle_input(&bytes, p.now);
    assert_eq!(p.hub.stream_count(), 1);
    assert!(p.hub.is_open());
    let mut refusal = Vec::new();
    uplink::proto::codec::encode(
        &Frame::Reset {
            id: StreamId(4),
            code: ResetCode::Refused,
            message: "over the limit of 1 concurrent streams".into(),
        },
        u32::MAX,
        &mut refusal,
    )
    .unwrap();
    assert_eq!(p.hub.take_transmit(Vec::new()), refusal);
}

/// One application call in a random trace.
#[derive(Clone, Debug)]
enum Op {
    Open(bool),
    Send(bool, usize, u16),
    Finish(bool, usize),
    Reset(bool, usize),
    Consume(bool, usize, u16),
    Head(bool, usize),
    Tick(u16),
    GoAway,
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => any::<bool>().prop_map(Op::Open),
        4 => (any::<bool>(), any::<usize>(), any::<u16>()).prop_map(|(s, i, n)| Op::Send(s, i, n)),
        2 => (any::<bool>(), any::<usize>()).prop_map(|(s, i)| Op::Finish(s, i)),
        1 => (any::<bool>(), any::<usize>()).prop_map(|(s, i)| Op::Reset(s, i)),
        3 => (any::<bool>(), any::<usize>(), any::<u16>()).prop_map(|(s, i, n)| Op::Consume(s, i, n)),
        2 => (any::<bool>(), any::<usize>()).prop_map(|(s, i)| Op::Head(s, i)),
        1 => any::<u16>().prop_map(Op::Tick),
        1 => Just(Op::GoAway),
    ]
}

/// What one side has seen of each stream, to check event invariants.
#[derive(Default)]
struct Seen {
    live: HashSet<StreamId>,
    ended: HashSet<StreamId>,
    unconsumed: HashMap<StreamId, usize>,
}

impl Seen {
    fn check(&mut self, events: Vec<Event>, window: usize) -> Result<(), TestCaseError> {
        for e in events {
            match e {
                Event::Opened { id, .. } => {
                    prop_assert!(self.live.insert(id), "stream {id:?} opened twice");
                }
                Event::Head { id, .. } | Event::Writable { id } => {
                    prop_assert!(self.live.contains(&id), "event for unknown stream {id:?}");
                }
                Event::Data { id, data } => {
                    prop_assert!(self.live.contains(&id), "data for unknown stream {id:?}");
                    prop_assert!(!self.ended.contains(&id), "data after end on {id:?}");
                    let buffered = self.unconsumed.entry(id).or_default();
                    *buffered += data.len();
                    prop_assert!(*buffered <= window, "peer sent past its credit");
                }
                Event::End { id } => {
                    prop_assert!(self.live.contains(&id), "end for unknown stream {id:?}");
                    prop_assert!(self.ended.insert(id), "end twice on {id:?}");
                }
                Event::Reset { id, .. } => {
                    prop_assert!(self.live.remove(&id), "reset for unknown stream {id:?}");
                }
                _ => {}
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn random_operation_sequences_keep_the_invariants(ops in proptest::collection::vec(arb_op(), 1..200)) {
        let window = 4096usize;
        let mut p = Pair::with(Config { initial_window: window as u32, max_streams: 8, ..Config::default() });
        p.take_hub_events();
        p.take_agent_events();
        let mut hub_seen = Seen::default();
        let mut agent_seen = Seen::default();
        let payload = vec![0x5a; 70_000];
        for op in ops {
            match op {
                Op::Open(hub) => {
                    let (m, s) = if hub { (&mut p.hub, &mut hub_seen) } else { (&mut p.agent, &mut agent_seen) };
                    if let Ok(id) = m.open(head("/x")) {
                        s.live.insert(id);
                    }
                }
                Op::Send(hub, i, n) => {
                    let (m, s) = if hub { (&mut p.hub, &hub_seen) } else { (&mut p.agent, &agent_seen) };
                    if let Some(id) = pick(&s.live, i) {
                        let before = m.send_capacity(id);
                        if let Ok(sent) = m.send_data(id, &payload[..n as usize]) {
                            prop_assert!(sent <= before);
                        }
                    }
                }
                Op::Finish(hub, i) => {
                    let (m, s) = if hub { (&mut p.hub, &hub_seen) } else { (&mut p.agent, &agent_seen) };
                    if let Some(id) = pick(&s.live, i) {
                        let _ = m.finish(id);
                    }
                }
                Op::Reset(hub, i) => {
                    let (m, s) = if hub { (&mut p.hub, &mut hub_seen) } else { (&mut p.agent, &mut agent_seen) };
                    if let Some(id) = pick(&s.live, i) {
                        m.reset(id, ResetCode::Cancel, "test");
                        s.live.remove(&id);
                    }
                }
                Op::Consume(hub, i, n) => {
                    let (m, s) = if hub { (&mut p.hub, &mut hub_seen) } else { (&mut p.agent, &mut agent_seen) };
                    if let Some(id) = pick(&s.live, i) {
                        let buffered = s.unconsumed.entry(id).or_default();
                        let n = (n as usize).min(*buffered);
                        *buffered -= n;
                        m.consume(id, n);
                    }
                }
                Op::Head(hub, i) => {
                    let (m, s) = if hub { (&mut p.hub, &hub_seen) } else { (&mut p.agent, &agent_seen) };
                    if let Some(id) = pick(&s.live, i) {
                        let _ = m.send_head(id, ok_head());
                    }
                }
                Op::Tick(ms) => {
                    // Up to 10 s at a time: the peers ping every 15 s.
                    p.now += Duration::from_millis(ms as u64 % 10_000);
                    p.agent.handle_timeout(p.now);
                    p.hub.handle_timeout(p.now);
                }
                Op::GoAway => p.hub.go_away(GoAwayCode::ShuttingDown, "test"),
            }
            p.run();
            hub_seen.check(p.take_hub_events(), window)?;
            agent_seen.check(p.take_agent_events(), window)?;
            prop_assert!(p.hub.memory_estimate() < 2 << 20);
            prop_assert!(p.agent.memory_estimate() < 2 << 20);
            prop_assert!(!p.hub.is_closed() && !p.agent.is_closed(), "a well-behaved peer never breaks the session");
        }
    }
}

fn pick(live: &HashSet<StreamId>, i: usize) -> Option<StreamId> {
    if live.is_empty() {
        return None;
    }
    let mut ids: Vec<_> = live.iter().copied().collect();
    ids.sort();
    Some(ids[i % ids.len()])
}

#[test]
fn an_oversized_response_head_resets_the_stream() {
    let mut p = Pair::new();
    let id = p.hub.open(head("/a")).unwrap();
    p.run();
    p.take_hub_events();
    let headers = (0..300).map(|i| Header::new(format!("x-{i}"), "v")).collect();
    p.inject_to_hub(&Frame::Head { id, head: ResponseHead { status: 200, headers } });
    assert!(matches!(&p.take_hub_events()[..], [Event::Reset { message, .. }] if message.contains("too many header")));
    assert!(p.hub.is_open());
}

// ---------------------------------------------------------------------
// Fairness: control frames first, data in round-robin quanta.

use uplink::proto::sched::QUANTUM;

/// Decodes a transmit buffer into its frames, in wire order.
fn frames(mut bytes: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    while let Some((frame, used)) = uplink::proto::codec::decode(bytes, MAX_FRAME_LEN).unwrap() {
        out.push(frame);
        bytes = &bytes[used..];
    }
    assert!(bytes.is_empty(), "transmit buffers hold whole frames");
    out
}

/// A pair whose streams may queue megabytes: window and buffer of 8 MiB.
fn bulk_pair() -> Pair {
    let mut p = Pair::with(Config { initial_window: 8 << 20, max_tx_buffer: 8 << 20, ..Config::default() });
    p.take_hub_events();
    p.take_agent_events();
    p
}

/// The hub opens a stream and the agent answers its head.
fn answered(p: &mut Pair, path: &str) -> StreamId {
    let id = p.hub.open(head(path)).unwrap();
    p.hub.finish(id).unwrap();
    p.run();
    p.take_agent_events();
    p.agent.send_head(id, ok_head()).unwrap();
    p.run();
    p.take_hub_events();
    id
}

#[test]
fn a_small_answer_overtakes_a_bulk_backlog_within_one_quantum() {
    let mut p = bulk_pair();
    let bulk = answered(&mut p, "/api/v1/pods?watch=1");
    let big = vec![b'b'; 6 << 20];
    assert_eq!(p.agent.send_data(bulk, &big).unwrap(), big.len(), "megabytes queued at once");
    // The driver has taken a first write's worth; the rest waits in the mux.
    let mut wire = Vec::new();
    p.agent.poll_transmit(&mut wire, 32 * 1024);
    p.hub.handle_input(&wire, p.now);
    // Now a `kubectl get` arrives and is answered while the download runs.
    let small = p.hub.open(head("/api/v1/namespaces")).unwrap();
    p.hub.finish(small).unwrap();
    let to_agent = p.hub.take_transmit(Vec::new());
    p.agent.handle_input(&to_agent, p.now);
    p.collect();
    assert!(p.take_agent_events().contains(&Event::Opened { id: small, head: head("/api/v1/namespaces") }));
    let body = vec![b'{'; 2500];
    p.agent.send_head(small, ok_head()).unwrap();
    assert_eq!(p.agent.send_data(small, &body).unwrap(), body.len());
    p.agent.finish(small).unwrap();

    // Pull the way the driver does: a little at a time.
    let mut order = Vec::new();
    for _ in 0..8 {
        let mut wire = Vec::new();
        p.agent.poll_transmit(&mut wire, 32 * 1024);
        p.hub.handle_input(&wire, p.now);
        order.extend(frames(&wire));
    }
    let bulk_before = |i: usize| -> usize {
        order[..i]
            .iter()
            .map(|f| match f {
                Frame::Data { id, data } if *id == bulk => data.len(),
                _ => 0,
            })
            .sum()
    };
    let head_at = order.iter().position(|f| matches!(f, Frame::Head { id, .. } if *id == small)).unwrap();
    let end_at = order.iter().position(|f| matches!(f, Frame::End { id } if *id == small)).unwrap();
    assert_eq!(head_at, 0, "the head is a control frame: it goes first");
    assert!(
        bulk_before(end_at) <= QUANTUM,
        "the answer is done within one quantum: {} bulk bytes first",
        bulk_before(end_at)
    );
    assert!(order.iter().any(|f| matches!(f, Frame::Data { id, data } if *id == small && data.len() == 2500)));
    // And the whole exchange arrives intact, the download too.
    p.run();
    let ev = p.take_hub_events();
    assert_eq!(data_for(&ev, small), body);
    assert!(ev.contains(&Event::End { id: small }));
    assert_eq!(data_for(&ev, bulk).len(), big.len());
}
#[test]
fn two_bulk_streams_take_turns() {
    let mut p = bulk_pair();
    let a = answered(&mut p, "/a");
    let b = answered(&mut p, "/b");
    let big = vec![7u8; 2 << 20];
    p.agent.send_data(a, &big).unwrap();
    p.agent.send_data(b, &big).unwrap();
    p.agent.finish(a).unwrap();
    p.agent.finish(b).unwrap();
    let (mut sent_a, mut sent_b) = (0usize, 0usize);
    let mut ends = Vec::new();
    loop {
        let mut wire = Vec::new();
        if p.agent.poll_transmit(&mut wire, 32 * 1024) == 0 {
            break;
        }
        for f in frames(&wire) {
            match f {
                Frame::Data { id, data } if id == a => sent_a += data.len(),
                Frame::Data { id, data } if id == b => sent_b += data.len(),
                Frame::End { id } => ends.push(id),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(sent_a.abs_diff(sent_b) <= QUANTUM, "fair within a quantum: {sent_a} vs {sent_b}");
    }
    assert_eq!((sent_a, sent_b), (big.len(), big.len()));
    assert_eq!(ends, vec![a, b]);
}

#[test]
fn control_frames_overtake_queued_data() {
    let mut p = bulk_pair();
    let a = answered(&mut p, "/download");
    p.agent.send_data(a, &vec![1u8; 1 << 20]).unwrap();
    // A keepalive and a refusal do not wait for the megabyte. (Just past
    // the ping interval, well before the dead-peer deadline.)
    p.agent.handle_timeout(p.now + Config::default().keepalive + Duration::from_millis(1));
    let other = p.hub.open(head("/other")).unwrap();
    let to_agent = p.hub.take_transmit(Vec::new());
    p.agent.handle_input(&to_agent, p.now);
    p.agent.reset(other, ResetCode::Forbidden, "no");
    let mut wire = Vec::new();
    p.agent.poll_transmit(&mut wire, 1);
    let f = frames(&wire);
    assert!(matches!(f[0], Frame::Ping { .. }), "{:?}", f[0]);
    assert!(matches!(f[1], Frame::Reset { id, .. } if id == other));
    assert_eq!(f.len(), 2, "the control frames filled the limit");
    wire.clear();
    p.agent.poll_transmit(&mut wire, 1);
    assert!(matches!(&frames(&wire)[..], [Frame::Data { id, data }] if *id == a && data.len() == QUANTUM));
}

#[test]
fn a_small_answer_is_queued_even_when_bulk_filled_the_buffer() {
    let mut p = Pair::with(Config { max_tx_buffer: 64 * 1024, ..Config::default() });
    let bulk = answered(&mut p, "/logs");
    let small = answered(&mut p, "/version");
    assert_eq!(p.agent.send_data(bulk, &vec![0u8; 256 * 1024]).unwrap(), 64 * 1024, "bulk stops at the buffer");
    assert_eq!(p.agent.send_data(bulk, b"more").unwrap(), 0);
    assert_eq!(p.agent.send_capacity(small), QUANTUM);
    assert_eq!(p.agent.send_data(small, &[b'x'; 2500]).unwrap(), 2500, "a small answer never waits for the backlog");
    assert_eq!(p.agent.send_data(small, &vec![b'x'; 64 * 1024]).unwrap(), QUANTUM - 2500, "but only one quantum of it");
}

#[test]
fn a_reset_after_end_follows_the_queued_data() {
    let mut p = bulk_pair();
    let id = p.hub.open(head("/upload")).unwrap();
    p.run();
    p.agent.send_head(id, ResponseHead { status: 413, headers: vec![] }).unwrap();
    p.agent.send_data(id, &vec![9u8; 100_000]).unwrap();
    p.agent.finish(id).unwrap();
    // The agent is done and refuses the rest of the upload.
    p.agent.reset(id, ResetCode::Cancel, "stream dropped");
    p.run();
    let ev = p.take_hub_events();
    assert_eq!(data_for(&ev, id).len(), 100_000);
    let rest: Vec<_> = ev.iter().filter(|e| !matches!(e, Event::Data { .. })).collect();
    assert!(matches!(rest[..], [Event::Head { .. }, Event::End { .. }, Event::Reset { .. }]), "{rest:?}");
    // A reset before End, by contrast, drops what was queued.
    let id = p.hub.open(head("/again")).unwrap();
    p.run();
    p.agent.send_head(id, ok_head()).unwrap();
    p.agent.send_data(id, &vec![9u8; 100_000]).unwrap();
    p.agent.reset(id, ResetCode::Internal, "upstream failed");
    p.run();
    let ev = p.take_hub_events();
    assert!(data_for(&ev, id).is_empty());
    assert!(matches!(ev.last(), Some(Event::Reset { code: ResetCode::Internal, .. })));
}

/// `send_with` lends no more room than credit and the transmit buffer
/// allow, queues what was written like `send_data`, keeps the head-first
/// and end rules, and writes nothing without credit until `Window`.
#[test]
fn send_with_fills_in_place_within_credit_and_the_rules() {
    let config = Config { initial_window: 16 * 1024, ..Config::default() };
    let mut p = Pair::with(config);
    let id = p.hub.open(head("/log")).unwrap();
    p.hub.finish(id).unwrap();
    p.run();
    let fill = |room: &mut [u8]| {
        room.fill(b'x');
        room.len()
    };
    assert_eq!(p.agent.send_with(id, 100, fill), Err(StreamError::HeadOrder), "data before the head");
    p.agent.send_head(id, ok_head()).unwrap();
    // Credit caps the room: 16 KiB in two fills, then none.
    let mut lent = Vec::new();
    let first = p.agent.send_with(id, 10_000, |room| {
        lent.push(room.len());
        fill(room)
    });
    assert_eq!(first, Ok(Some(10_000)));
    let second = p.agent.send_with(id, 1 << 20, |room| {
        lent.push(room.len());
        room[..100].fill(b'y');
        100
    });
    assert_eq!(second, Ok(Some(100)), "only what was written is queued");
    assert_eq!(lent, vec![10_000, 16 * 1024 - 10_000]);
    let rest = p.agent.send_capacity(id);
    assert_eq!(rest, 16 * 1024 - 10_100);
    assert_eq!(p.agent.send_with(id, rest, fill), Ok(Some(rest)));
    assert_eq!(p.agent.send_with(id, 1, |_| panic!("lent room without credit")), Ok(None));
    // The hub reads, credit comes back, and the rest goes in.
    p.run();
    let got = data_for(&p.take_hub_events(), id);
    assert_eq!(got.len(), 16 * 1024);
    assert!(got[..10_000].iter().all(|&b| b == b'x') && got[10_000..10_100].iter().all(|&b| b == b'y'));
    p.hub.consume(id, got.len());
    p.run();
    assert!(p.take_agent_events().contains(&Event::Writable { id }));
    assert_eq!(p.agent.send_with(id, 5, fill), Ok(Some(5)));
    p.agent.finish(id).unwrap();
    assert_eq!(p.agent.send_with(id, 5, fill), Err(StreamError::Unknown(id)), "finished and gone");
    p.run();
    let events = p.take_hub_events();
    assert_eq!(data_for(&events, id), b"xxxxx");
    assert!(events.contains(&Event::End { id }));
}
