//! Live cluster status changes, for pollers (the web console).
//!
//! A bounded ring of recent events with increasing sequence numbers; a
//! reader long-polls with the last number it saw. Nothing is stored: a
//! reader that falls behind the ring reloads the cluster list.

use super::clock::{Millis, now_ms};
use event_listener::Event;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::time::Duration;

/// Events kept for pollers.
const RING: usize = 1024;

#[derive(Debug, Clone)]
pub struct BusEvent {
    pub seq: u64,
    pub time: Millis,
    pub cluster: String,
    /// `registered`, `activated`, `connected`, `disconnected`, `deregistered`.
    pub kind: String,
    /// The cluster's status after the event.
    pub status: String,
}

#[derive(Default)]
pub struct Bus {
    seq: Cell<u64>,
    ring: RefCell<VecDeque<BusEvent>>,
    changed: Event,
}

impl Bus {
    pub fn publish(&self, cluster: &str, kind: &str, status: &str) {
        let seq = self.seq.get() + 1;
        self.seq.set(seq);
        let mut ring = self.ring.borrow_mut();
        if ring.len() == RING {
            ring.pop_front();
        }
        ring.push_back(BusEvent {
            seq,
            time: now_ms(),
            cluster: cluster.into(),
            kind: kind.into(),
            status: status.into(),
        });
        drop(ring);
        self.changed.notify(usize::MAX);
    }

    pub fn current(&self) -> u64 {
        self.seq.get()
    }

    /// Events after `since`, and whether some were already dropped.
    pub fn since(&self, since: u64) -> (Vec<BusEvent>, bool) {
        let ring = self.ring.borrow();
        let lost = ring.front().is_some_and(|e| e.seq > since + 1);
        (ring.iter().filter(|e| e.seq > since).cloned().collect(), lost)
    }

    /// Waits until an event after `since` exists, at most `timeout`.
    pub async fn wait(&self, since: u64, timeout: Duration) {
        use smol::future::FutureExt;
        let wait = async {
            loop {
                let listener = self.changed.listen();
                if self.seq.get() > since {
                    return;
                }
                listener.await;
            }
        };
        wait.or(async {
            smol::Timer::after(timeout).await;
        })
        .await;
    }
}
