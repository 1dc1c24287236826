//! The replica set, as far as it is built: each replica sharing a
//! PostgreSQL store keeps its own row (id, advertise URL, version,
//! heartbeat) and one row per agent tunnel it holds, and reads the
//! others' rows, so any replica shows a cluster `ACTIVE` while any live
//! replica holds a tunnel to it.
//!
//! ```text
//!  every HEARTBEAT: replica_heartbeat(me, our sessions, whether they changed)
//!                     ├ our heartbeat_at = now (row re-made if it expired,
//!                     │ and then our sessions written again too)
//!                     ├ replicas silent past DEADLINE: deleted, sessions too
//!                     ├ → the sessions the other live replicas hold
//!                     └ live_replicas → the set; changed? ReplicaSet to every
//!                                      agent that announced CAP_REPLICAS
//!  kill -9: our rows stay until DEADLINE, then the others drop them
//!  SIGTERM: leave_replica removes them at once (before the agents hear
//!           GoAway), so the others announce the smaller set at their
//!           next heartbeat; no heartbeat re-makes the row afterwards
//! ```
//!
//! The set an agent is told is this replica's view: itself and every
//! replica whose heartbeat is younger than [`DEADLINE`]. Agents dial each
//! (`src/agent/tunnel.rs`); the frame is in `src/proto/PROTOCOL.md`.
//!
//! With the embedded store there is one replica and no rows: `Replicas`
//! is empty and every method answers as if alone.
//!
//! A request for a cluster this replica holds no tunnel to (yet: an agent
//! learns of a new replica within a heartbeat) is handed to a replica
//! that does: [`handoff`].

pub mod handoff;

use super::Hub;
use super::clock::now_ms;
use super::store::{AgentSession, Replica};
use crate::proto::{ReplicaInfo, ReplicaSet};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How often a replica proves it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// Silence after which a replica (and its sessions) counts as gone.
pub const DEADLINE: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Replicas {
    me: Option<Replica>,
    /// Sessions the other live replicas hold, by cluster id, as of the
    /// latest heartbeat that answered.
    remote: RefCell<HashMap<String, Vec<AgentSession>>>,
    /// When a heartbeat last answered: past [`DEADLINE`] without one,
    /// what the others hold is unknown and no longer shown.
    answered: RefCell<Option<Instant>>,
    /// Our sessions as last written, to write only changes.
    written: RefCell<Option<Vec<(String, u64)>>>,
    /// The peer sessions of the hand-off, and where the others are.
    pub peers: handoff::Peers,
    /// The replica set as agents were last told it.
    set: RefCell<Option<ReplicaSet>>,
    /// Set once this replica left (SIGTERM): no heartbeat brings it back.
    left: Cell<bool>,
}

impl Replicas {
    /// This process shares its store with other replicas; `trust` makes
    /// and checks the credentials of the hop between them.
    pub fn shared(me: Replica, trust: handoff::PeerTrust) -> Replicas {
        Replicas { me: Some(me), peers: handoff::Peers::new(trust), ..Default::default() }
    }

    pub fn me(&self) -> Option<&Replica> {
        self.me.as_ref()
    }

    /// The tunnels other live replicas hold to this cluster.
    pub fn elsewhere(&self, cluster_id: &str) -> Vec<AgentSession> {
        if self.answered.borrow().is_none_or(|t| t.elapsed() > DEADLINE) {
            return Vec::new();
        }
        self.remote.borrow().get(cluster_id).cloned().unwrap_or_default()
    }

    /// The replica set to tell an agent that just connected: the latest
    /// known, or this replica alone before the first heartbeat. `None` on
    /// the embedded store (one hub, nothing to tell).
    pub fn set(&self) -> Option<ReplicaSet> {
        let me = self.me.as_ref()?;
        if let Some(set) = &*self.set.borrow() {
            return Some(set.clone());
        }
        Some(ReplicaSet {
            this: me.id.clone(),
            replicas: vec![ReplicaInfo { id: me.id.clone(), url: me.advertise_url.clone() }],
        })
    }

    /// Reads the live replicas and, when the set changed, tells every
    /// agent connected here (the mux sends it only to those that
    /// announced `CAP_REPLICAS`).
    fn refresh_set(&self, hub: &Hub, me: &Replica) {
        let live = match hub.store.live_replicas(now_ms(), DEADLINE.as_millis() as i64) {
            Ok(l) => l,
            Err(e) => return log::debug!("reading the replica set failed error={e}"),
        };
        let mut replicas: Vec<ReplicaInfo> =
            live.into_iter().map(|r| ReplicaInfo { id: r.id, url: r.advertise_url }).collect();
        // Our own heartbeat just answered: we are live whatever a lagging
        // read says.
        if !replicas.iter().any(|r| r.id == me.id) {
            replicas.push(ReplicaInfo { id: me.id.clone(), url: me.advertise_url.clone() });
        }
        replicas.sort_by(|a, b| a.id.cmp(&b.id));
        self.peers.know(&replicas);
        let set = ReplicaSet { this: me.id.clone(), replicas };
        if self.set.borrow().as_ref() == Some(&set) {
            return;
        }
        let ids: Vec<&str> = set.replicas.iter().map(|r| r.id.as_str()).collect();
        log::info!("replica set changed replicas={} ids={}", ids.len(), ids.join(","));
        *self.set.borrow_mut() = Some(set.clone());
        for (_, agent) in hub.tunnels.all() {
            agent.session.set_replicas(set.clone());
        }
    }

    /// One heartbeat (a single store transaction), then the replica set.
    pub fn beat(&self, hub: &Hub) {
        let Some(me) = &self.me else { return };
        if self.left.get() {
            return;
        }
        let mut ours: Vec<AgentSession> = hub
            .tunnels
            .all()
            .into_iter()
            .map(|(cluster_id, a)| AgentSession {
                replica_id: me.id.clone(),
                cluster_id,
                session_id: a.session_id,
                since: a.connected_at,
                facts: a.facts.clone(),
            })
            .collect();
        ours.sort_by_key(|s| s.session_id);
        let keys: Vec<(String, u64)> = ours.iter().map(|s| (s.cluster_id.clone(), s.session_id)).collect();
        let changed = self.written.borrow().as_ref() != Some(&keys);
        let deadline = DEADLINE.as_millis() as i64;
        match hub.store.replica_heartbeat(me, &ours, changed, now_ms(), deadline) {
            Ok(others) => {
                let ids: Vec<&str> = others.iter().map(|s| s.replica_id.as_str()).collect();
                self.peers.learn(hub, &ids);
                let mut by_cluster: HashMap<String, Vec<AgentSession>> = HashMap::new();
                for s in others {
                    by_cluster.entry(s.cluster_id.clone()).or_default().push(s);
                }
                let before: Vec<String> = {
                    let old = self.remote.borrow();
                    let mut ids: Vec<String> = old.keys().cloned().collect();
                    ids.sort();
                    ids
                };
                *self.remote.borrow_mut() = by_cluster;
                *self.answered.borrow_mut() = Some(Instant::now());
                self.publish_changes(hub, &before);
                if changed {
                    *self.written.borrow_mut() = Some(keys);
                }
                self.refresh_set(hub, me);
            }
            // The store says why in its own log line (once per outage).
            Err(e) => log::debug!("replica heartbeat failed error={e}"),
        }
    }

    /// Tells the console's live events about clusters whose tunnels on
    /// other replicas came or went (one store query, only then).
    fn publish_changes(&self, hub: &Hub, before: &[String]) {
        let after: Vec<String> = {
            let mut ids: Vec<String> = self.remote.borrow().keys().cloned().collect();
            ids.sort();
            ids
        };
        if after == before {
            return;
        }
        let Ok(clusters) = hub.store.clusters() else { return };
        for c in clusters.iter().filter(|c| before.contains(&c.id) != after.contains(&c.id)) {
            let kind = if after.contains(&c.id) { "connected" } else { "disconnected" };
            hub.bus.publish(&c.name, kind, super::status(hub, c));
        }
    }

    /// Heartbeats for the life of the hub, and beside them the peer
    /// sessions this replica dials.
    pub async fn run(hub: std::rc::Rc<Hub>) {
        let beats = async {
            loop {
                hub.replicas.beat(&hub);
                smol::Timer::after(HEARTBEAT).await;
            }
        };
        hub.replicas.peers.run(beats).await
    }

    /// A clean shutdown: the others stop counting our tunnels at once,
    /// and announce a set without this replica at their next heartbeat.
    pub fn leave(&self, hub: &Hub) {
        if self.left.replace(true) {
            return;
        }
        if let Some(me) = &self.me
            && let Err(e) = hub.store.leave_replica(&me.id)
        {
            log::warn!("could not remove this replica's row error={e}");
        }
    }
}
