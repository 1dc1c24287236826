//! The replica set, as far as it is built: each replica sharing a
//! PostgreSQL store keeps its own row (id, advertise URL, version,
//! heartbeat) and one row per agent tunnel it holds, and reads the
//! others' rows, so any replica shows a cluster `ACTIVE` while any live
//! replica holds a tunnel to it.
//!
//! ```text
//!  every HEARTBEAT: replica_heartbeat(me, our sessions if they changed)
//!                     ├ our heartbeat_at = now (row re-made if it expired)
//!                     ├ replicas silent past DEADLINE: deleted, sessions too
//!                     └ → the sessions the other live replicas hold
//!  kill -9: our rows stay until DEADLINE, then the others drop them
//!  SIGTERM: leave_replica removes them at once
//! ```
//!
//! With the embedded store there is one replica and no rows: `Replicas`
//! is empty and every method answers as if alone.
//!
//! A request for a cluster this replica holds no tunnel to is handed to a
//! replica that does: [`handoff`].
//!
//! Not here (yet): telling agents the replica set; agents reach one
//! replica through the load balancer today.

pub mod handoff;

use super::Hub;
use super::clock::now_ms;
use super::store::{AgentSession, Replica};
use std::cell::RefCell;
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

    /// One heartbeat (a single store transaction).
    pub fn beat(&self, hub: &Hub) {
        let Some(me) = &self.me else { return };
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
        match hub.store.replica_heartbeat(me, changed.then_some(&ours[..]), now_ms(), deadline) {
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

    /// A clean shutdown: the others stop counting our tunnels at once.
    pub fn leave(&self, hub: &Hub) {
        if let Some(me) = &self.me
            && let Err(e) = hub.store.leave_replica(&me.id)
        {
            log::warn!("could not remove this replica's row error={e}");
        }
    }
}
