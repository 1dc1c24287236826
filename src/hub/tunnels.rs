//! The live tunnels: which agents of which cluster are connected now.
//!
//! Several agents of one cluster (replicas) may be connected at once; a
//! new stream goes to the open session with the fewest streams. Sessions
//! that received or sent `GoAway` take no new streams.
//!
//! It also remembers when each cluster's last tunnel ended, so a request
//! that arrives while the agent is redialling (a cut a moment ago, or this
//! hub just started) can wait for it instead of being refused.

use super::clock::Millis;
use super::store::AgentFacts;
use crate::driver::Session;
use crate::proto::GoAwayCode;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// For this long after a cluster's last tunnel ended, or after the hub
/// started, its agent is expected back (it redials at once).
pub const EXPECT_BACK: Duration = Duration::from_secs(30);

/// One connected agent.
pub struct AgentConn {
    pub session: Session,
    pub session_id: u64,
    pub connected_at: Millis,
    pub facts: AgentFacts,
    pub peer: String,
}

pub struct Tunnels {
    by_cluster: RefCell<HashMap<String, Vec<Rc<AgentConn>>>>,
    next_session: Cell<u64>,
    /// When each cluster's last tunnel ended.
    gone_at: RefCell<HashMap<String, Instant>>,
    started: Instant,
}

impl Default for Tunnels {
    fn default() -> Self {
        Tunnels {
            by_cluster: Default::default(),
            next_session: Default::default(),
            gone_at: Default::default(),
            started: Instant::now(),
        }
    }
}

impl Tunnels {
    pub fn next_session_id(&self) -> u64 {
        let id = self.next_session.get() + 1;
        self.next_session.set(id);
        id
    }

    /// Adds a connected agent; true when it is the cluster's first.
    pub fn add(&self, cluster_id: &str, conn: Rc<AgentConn>) -> bool {
        let mut map = self.by_cluster.borrow_mut();
        let list = map.entry(cluster_id.to_string()).or_default();
        list.push(conn);
        list.len() == 1
    }

    /// Removes an agent; true when the cluster has none left.
    pub fn remove(&self, cluster_id: &str, session_id: u64) -> bool {
        let mut map = self.by_cluster.borrow_mut();
        let Some(list) = map.get_mut(cluster_id) else { return true };
        list.retain(|c| c.session_id != session_id);
        let empty = list.is_empty();
        if empty {
            map.remove(cluster_id);
            self.gone_at.borrow_mut().insert(cluster_id.to_string(), Instant::now());
        }
        empty
    }

    /// Whether the cluster's agent is probably redialling: its last tunnel
    /// ended, or this hub started, less than [`EXPECT_BACK`] ago.
    pub fn expecting(&self, cluster_id: &str) -> bool {
        let recent = |t: Instant| t.elapsed() < EXPECT_BACK;
        recent(self.started) || self.gone_at.borrow().get(cluster_id).is_some_and(|t| recent(*t))
    }

    /// The session for a new stream: open, not going away, fewest streams.
    pub fn pick(&self, cluster_id: &str) -> Option<Session> {
        let map = self.by_cluster.borrow();
        map.get(cluster_id)?
            .iter()
            .filter(|c| c.session.is_open() && c.session.goaway_received().is_none())
            .min_by_key(|c| c.session.stream_count())
            .map(|c| c.session.clone())
    }

    pub fn agents(&self, cluster_id: &str) -> Vec<Rc<AgentConn>> {
        self.by_cluster.borrow().get(cluster_id).cloned().unwrap_or_default()
    }

    pub fn is_connected(&self, cluster_id: &str) -> bool {
        self.by_cluster.borrow().get(cluster_id).is_some_and(|l| !l.is_empty())
    }

    /// Sends `GoAway` to every agent of a cluster.
    pub fn go_away(&self, cluster_id: &str, code: GoAwayCode, message: &str) -> usize {
        let list = self.agents(cluster_id);
        for c in &list {
            c.session.go_away(code, message);
        }
        list.len()
    }

    /// Sends `GoAway` to every agent of every cluster.
    pub fn go_away_all(&self, code: GoAwayCode, message: &str) {
        let all: Vec<Rc<AgentConn>> = self.by_cluster.borrow().values().flatten().cloned().collect();
        for c in all {
            c.session.go_away(code, message);
        }
    }

    pub fn agent_count(&self) -> usize {
        self.by_cluster.borrow().values().map(Vec::len).sum()
    }

    pub fn stream_count(&self) -> usize {
        self.by_cluster.borrow().values().flatten().map(|c| c.session.stream_count()).sum()
    }

    /// Every connected agent, with its cluster id.
    pub fn all(&self) -> Vec<(String, Rc<AgentConn>)> {
        self.by_cluster.borrow().iter().flat_map(|(k, v)| v.iter().map(|a| (k.clone(), a.clone()))).collect()
    }

    /// (cluster id, agents) for every connected cluster.
    pub fn per_cluster(&self) -> Vec<(String, usize)> {
        self.by_cluster.borrow().iter().map(|(k, v)| (k.clone(), v.len())).collect()
    }
}
