//! Random application calls on two connected muxes plus hostile bytes
//! injected into either side: never a panic, events only for known
//! streams, no data past the window, memory bounded.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;
use std::time::{Duration, Instant};
use uplink::proto::*;

#[derive(Arbitrary, Debug)]
enum Op {
    Open(bool),
    Send(bool, u8, u16),
    Finish(bool, u8),
    Reset(bool, u8),
    Consume(bool, u8, u16),
    Head(bool, u8),
    Tick(u16),
    GoAway(bool),
    Inject(bool, Vec<u8>),
    Deliver,
    /// One side sends only a little, as the driver does when the socket
    /// is slow: the rest stays in the scheduler while other ops run.
    DeliverSome(bool, u16),
}

fn head() -> RequestHead {
    RequestHead {
        method: "GET".into(),
        path: "/".into(),
        headers: vec![],
        identity: Identity { user: "u".into(), ..Default::default() },
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let start = Instant::now();
    let mut now = start;
    let config = Config { initial_window: 2048, max_streams: 16, ..Config::default() };
    let mut sides = [Mux::hub(config.clone(), 1, now), Mux::agent(config, AgentInfo::default(), now)];
    let mut live: [HashSet<StreamId>; 2] = Default::default();
    let mut ended: [HashSet<StreamId>; 2] = Default::default();
    let payload = vec![1u8; 70_000];
    for op in ops {
        match op {
            Op::Open(h) => {
                let i = h as usize;
                if let Ok(id) = sides[i].open(head()) {
                    live[i].insert(id);
                }
            }
            Op::Send(h, k, n) => {
                let i = h as usize;
                if let Some(id) = pick(&live[i], k) {
                    let cap = sides[i].send_capacity(id);
                    if let Ok(sent) = sides[i].send_data(id, &payload[..n as usize]) {
                        assert!(sent <= cap);
                    }
                }
            }
            Op::Finish(h, k) => {
                let i = h as usize;
                if let Some(id) = pick(&live[i], k) {
                    let _ = sides[i].finish(id);
                }
            }
            Op::Reset(h, k) => {
                let i = h as usize;
                if let Some(id) = pick(&live[i], k) {
                    sides[i].reset(id, ResetCode::Cancel, "fuzz");
                    live[i].remove(&id);
                }
            }
            Op::Consume(h, k, n) => {
                let i = h as usize;
                if let Some(id) = pick(&live[i], k) {
                    sides[i].consume(id, n as usize);
                }
            }
            Op::Head(h, k) => {
                let i = h as usize;
                if let Some(id) = pick(&live[i], k) {
                    let _ = sides[i].send_head(id, ResponseHead { status: 200, headers: vec![] });
                }
            }
            Op::Tick(ms) => {
                now += Duration::from_millis(ms as u64);
                for m in &mut sides {
                    m.handle_timeout(now);
                }
            }
            Op::GoAway(h) => sides[h as usize].go_away(GoAwayCode::ShuttingDown, "fuzz"),
            Op::Inject(h, bytes) => sides[h as usize].handle_input(&bytes, now),
            Op::DeliverSome(h, limit) => {
                let i = h as usize;
                let mut wire = Vec::new();
                sides[i].poll_transmit(&mut wire, limit as usize);
                sides[1 - i].handle_input(&wire, now);
            }
            Op::Deliver => {
                let a = sides[0].take_transmit(Vec::new());
                let b = sides[1].take_transmit(Vec::new());
                sides[1].handle_input(&a, now);
                sides[0].handle_input(&b, now);
            }
        }
        for i in 0..2 {
            while let Some(e) = sides[i].poll_event() {
                match e {
                    Event::Opened { id, .. } => assert!(live[i].insert(id)),
                    Event::Data { id, data } => {
                        assert!(live[i].contains(&id) && !ended[i].contains(&id));
                        assert!(data.len() <= 2048 * 64);
                    }
                    Event::Head { id, .. } | Event::Writable { id } => assert!(live[i].contains(&id)),
                    Event::End { id } => {
                        assert!(live[i].contains(&id));
                        assert!(ended[i].insert(id));
                    }
                    Event::Reset { id, .. } => assert!(live[i].remove(&id)),
                    Event::Closed { .. } => live[i].clear(),
                    _ => {}
                }
            }
            assert!(sides[i].memory_estimate() < 8 << 20);
        }
    }
});

fn pick(live: &HashSet<StreamId>, k: u8) -> Option<StreamId> {
    let mut ids: Vec<_> = live.iter().copied().collect();
    ids.sort();
    (!ids.is_empty()).then(|| ids[k as usize % ids.len()])
}
