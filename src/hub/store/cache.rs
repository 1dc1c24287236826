//! A read cache in front of the store for what every kube request asks:
//! token → user, identity-provider person by name, the grant list,
//! cluster by name, the cluster list.
//!
//! Correctness rests on one rule: every write goes through this wrapper
//! (the serving process is the database's only writer), and every write
//! that could change a cached answer empties the cache *before* it
//! returns, on the same thread. A revoked token therefore fails on the
//! very next request. Only answers that were found are cached (a miss
//! costs a query, never memory), and each map is bounded.
//!
//! The token map is keyed by the SHA-256 of the token, as the database
//! is, so its lookup times say nothing useful about a token.
//!
//! With a shared store (PostgreSQL, several replicas) this process is
//! not the only writer: the others' writes arrive as change
//! notifications ([`super::notify`]) that call [`Store::invalidate`],
//! and a periodic full refresh covers a notification that was lost.
//!
//! While the store is away ([`StoreError::Unavailable`]) what is cached
//! keeps answering: a write that failed because the store was away
//! changed nothing, so it does not empty the cache.
//!
//! Not cached: anything else (user lists, audit, credentials, events).
//! The cluster list is (it changes only by writes through here or
//! another replica's, announced), so a `/metrics` scrape or the fleet
//! view costs no query on a warm cache.

use super::{
    ActivateError, Activation, AgentFacts, AgentSession, AuditEntry, AuditQuery, Cluster, ClusterEvent, ConsoleSession,
    CredentialStatus, Grant, NewActivation, NewCluster, Replica, Result, Store, StoreError, Subject, User,
};
use crate::hub::clock::Millis;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Most tokens or cluster names remembered; past it the map starts over.
const MAX_ENTRIES: usize = 1024;

#[derive(Default)]
struct Cached {
    users: HashMap<String, User>,
    /// People of the identity provider by name, as last signed in.
    oidc: HashMap<String, User>,
    grants: Option<Vec<Grant>>,
    /// Shared with the requests that asked ([`Store::cluster_shared`]).
    clusters: HashMap<String, Rc<Cluster>>,
    /// Every cluster, as `clusters()` lists them (for `/metrics`, the
    /// fleet view and the deregistration sweep).
    all_clusters: Option<Vec<Cluster>>,
}

/// `Store` with the hot reads answered from memory.
pub struct CachedStore<S> {
    inner: S,
    cached: RefCell<Cached>,
}

impl<S: Store> CachedStore<S> {
    pub fn new(inner: S) -> Self {
        CachedStore { inner, cached: RefCell::default() }
    }

    /// Forgets everything; called by every write that could change a
    /// cached answer.
    fn forget(&self) {
        *self.cached.borrow_mut() = Cached::default();
    }

    /// Runs a write and forgets the cache whatever its outcome (a failed
    /// write may still have changed something), unless the store was
    /// unreachable (then nothing changed, and the cache is what still
    /// answers).
    fn write<T: Outcome>(&self, f: impl FnOnce(&S) -> T) -> T {
        let r = f(&self.inner);
        if !r.unreachable() {
            self.forget();
        }
        r
    }
}

/// What [`CachedStore::write`] needs to know of a write's result.
trait Outcome {
    /// The store could not be reached, so it changed nothing.
    fn unreachable(&self) -> bool;
}

impl<T> Outcome for Result<T> {
    fn unreachable(&self) -> bool {
        matches!(self, Err(StoreError::Unavailable(_)))
    }
}

impl<T> Outcome for std::result::Result<T, ActivateError> {
    fn unreachable(&self) -> bool {
        matches!(self, Err(ActivateError::Store(StoreError::Unavailable(_))))
    }
}

fn remember<V: Clone>(map: &mut HashMap<String, V>, key: &str, value: &V) {
    if map.len() >= MAX_ENTRIES {
        map.clear();
    }
    map.insert(key.to_string(), value.clone());
}

impl<S: Store> Store for CachedStore<S> {
    fn user_count(&self) -> Result<u64> {
        self.inner.user_count()
    }
    fn create_user(&self, name: &str, groups: &[String], admin: bool, token_hash: &str, now: Millis) -> Result<User> {
        self.write(|s| s.create_user(name, groups, admin, token_hash, now))
    }
    fn users(&self) -> Result<Vec<User>> {
        self.inner.users()
    }
    fn user(&self, name: &str) -> Result<Option<User>> {
        self.inner.user(name)
    }
    fn add_token(&self, user: &str, token_hash: &str, now: Millis) -> Result<()> {
        self.write(|s| s.add_token(user, token_hash, now))
    }
    fn revoke_user(&self, name: &str, now: Millis) -> Result<User> {
        self.write(|s| s.revoke_user(name, now))
    }
    fn oidc_sign_in(&self, name: &str, groups: &[String], admin: bool, now: Millis) -> Result<User> {
        // Every request with an ID token asks; only a first sign-in or
        // changed groups reach the database. The row written is this
        // person's alone (the store refuses names of token users), and only
        // this map holds it, so nothing else cached goes stale; any other
        // write (a revocation) empties this map as well.
        if let Some(u) = self.cached.borrow().oidc.get(name)
            && u.groups == groups
            && u.admin == admin
        {
            return Ok(u.clone());
        }
        let u = self.inner.oidc_sign_in(name, groups, admin, now)?;
        if u.revoked_at.is_none() {
            remember(&mut self.cached.borrow_mut().oidc, name, &u);
        }
        Ok(u)
    }
    // Sessions are not cached: a console session is a handful of requests
    // a minute, and sign-in and sign-out touch nothing cached.
    fn create_session(&self, id_hash: &str, session: &ConsoleSession, now: Millis) -> Result<()> {
        self.inner.create_session(id_hash, session, now)
    }
    fn session(&self, id_hash: &str, now: Millis) -> Result<Option<ConsoleSession>> {
        self.inner.session(id_hash, now)
    }
    fn delete_session(&self, id_hash: &str) -> Result<()> {
        self.inner.delete_session(id_hash)
    }
    fn user_by_token(&self, token_hash: &str) -> Result<Option<User>> {
        if let Some(u) = self.cached.borrow().users.get(token_hash) {
            return Ok(Some(u.clone()));
        }
        let found = self.inner.user_by_token(token_hash)?;
        if let Some(u) = &found {
            remember(&mut self.cached.borrow_mut().users, token_hash, u);
        }
        Ok(found)
    }

    fn add_grant(&self, subject: &Subject, clusters: &str, now: Millis) -> Result<Grant> {
        self.write(|s| s.add_grant(subject, clusters, now))
    }
    fn grants(&self) -> Result<Vec<Grant>> {
        if let Some(g) = &self.cached.borrow().grants {
            return Ok(g.clone());
        }
        let grants = self.inner.grants()?;
        self.cached.borrow_mut().grants = Some(grants.clone());
        Ok(grants)
    }
    fn may_reach(&self, user: &User, name: &str) -> Result<bool> {
        if let Some(g) = &self.cached.borrow().grants {
            return Ok(crate::hub::may_reach(user, g, name));
        }
        Ok(crate::hub::may_reach(user, &self.grants()?, name))
    }
    fn remove_grant(&self, id: i64) -> Result<()> {
        self.write(|s| s.remove_grant(id))
    }

    fn register_cluster(&self, cluster: &NewCluster<'_>, activation: &NewActivation<'_>) -> Result<Cluster> {
        self.write(|s| s.register_cluster(cluster, activation))
    }
    fn clusters(&self) -> Result<Vec<Cluster>> {
        if let Some(all) = &self.cached.borrow().all_clusters {
            return Ok(all.clone());
        }
        let all = self.inner.clusters()?;
        self.cached.borrow_mut().all_clusters = Some(all.clone());
        Ok(all)
    }
    fn cluster(&self, name: &str) -> Result<Option<Cluster>> {
        Ok(self.cluster_shared(name)?.map(|c| (*c).clone()))
    }
    fn cluster_shared(&self, name: &str) -> Result<Option<Rc<Cluster>>> {
        if let Some(c) = self.cached.borrow().clusters.get(name) {
            return Ok(Some(c.clone()));
        }
        let found = self.inner.cluster(name)?.map(Rc::new);
        if let Some(c) = &found {
            remember(&mut self.cached.borrow_mut().clusters, name, c);
        }
        Ok(found)
    }
    fn activations(&self, cluster_id: &str) -> Result<Vec<Activation>> {
        self.inner.activations(cluster_id)
    }
    fn renew_activation(
        &self,
        name: &str,
        subjects: Option<(&[String], &[String])>,
        activation: &NewActivation<'_>,
        now: Millis,
    ) -> Result<Cluster> {
        // Writes the cluster's users and groups: cached clusters go.
        self.write(|s| s.renew_activation(name, subjects, activation, now))
    }
    fn activate(
        &self,
        activation_id: &str,
        code_hash: &str,
        credential_hash: &str,
        facts: &AgentFacts,
        now: Millis,
    ) -> std::result::Result<Cluster, ActivateError> {
        self.write(|s| s.activate(activation_id, code_hash, credential_hash, facts, now))
    }
    fn credential(&self, credential_hash: &str) -> Result<CredentialStatus> {
        self.inner.credential(credential_hash)
    }
    fn agent_connected(&self, cluster_id: &str, facts: &AgentFacts, now: Millis) -> Result<()> {
        self.write(|s| s.agent_connected(cluster_id, facts, now))
    }
    fn agents_gone(&self, cluster_id: &str, now: Millis) -> Result<()> {
        self.write(|s| s.agents_gone(cluster_id, now))
    }
    fn add_event(&self, cluster_id: &str, kind: &str, message: &str, now: Millis) -> Result<()> {
        // Events are not part of any cached answer.
        self.inner.add_event(cluster_id, kind, message, now)
    }
    fn events(&self, cluster_id: &str, limit: u32) -> Result<Vec<ClusterEvent>> {
        self.inner.events(cluster_id, limit)
    }
    fn deregister(&self, name: &str, now: Millis) -> Result<Cluster> {
        self.write(|s| s.deregister(name, now))
    }

    fn append_audit(&self, entry: AuditEntry) -> Result<()> {
        self.inner.append_audit(entry)
    }
    fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>> {
        self.inner.audit(query)
    }

    // The replica set is never cached: it is what changes by itself.
    fn join_replica(&self, replica: &Replica, now: Millis, deadline: Millis) -> Result<()> {
        self.inner.join_replica(replica, now, deadline)
    }
    fn replica_heartbeat(
        &self,
        replica: &Replica,
        sessions: &[AgentSession],
        changed: bool,
        now: Millis,
        deadline: Millis,
    ) -> Result<Vec<AgentSession>> {
        self.inner.replica_heartbeat(replica, sessions, changed, now, deadline)
    }
    fn leave_replica(&self, id: &str) -> Result<()> {
        self.inner.leave_replica(id)
    }
    fn live_replicas(&self, now: Millis, deadline: Millis) -> Result<Vec<Replica>> {
        self.inner.live_replicas(now, deadline)
    }

    fn check(&self) -> Result<()> {
        self.inner.check()
    }
    fn invalidate(&self) {
        self.forget();
        self.inner.invalidate();
    }
    fn queries(&self) -> Vec<(&'static str, u64)> {
        self.inner.queries()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::store::Subject;
    use crate::hub::store::sqlite::SqliteStore;

    fn store() -> (CachedStore<SqliteStore>, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("uplink-cache-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        (CachedStore::new(SqliteStore::open(&dir.join("hub.db")).unwrap()), dir)
    }

    fn rand_suffix() -> String {
        crate::secret::Secret::random(6).expose().to_string()
    }

    #[test]
    fn writes_forget_what_they_change() {
        let (s, dir) = store();
        s.create_user("ann", &[], false, "h1", 1).unwrap();
        assert_eq!(s.user_by_token("h1").unwrap().unwrap().name, "ann");
        assert_eq!(s.user_by_token("h1").unwrap().unwrap().name, "ann");
        assert!(s.grants().unwrap().is_empty());
        let g = s.add_grant(&Subject::User("ann".into()), "*", 2).unwrap();
        assert_eq!(s.grants().unwrap().len(), 1);
        s.remove_grant(g.id).unwrap();
        assert!(s.grants().unwrap().is_empty());
        s.revoke_user("ann", 3).unwrap();
        assert!(s.user_by_token("h1").unwrap().is_none(), "a revoked token stops at once");
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn oidc_people_are_created_updated_and_revoked_at_once() {
        let (s, dir) = store();
        s.create_user("admin", &[], true, "h0", 1).unwrap();
        let dev = vec!["oidc:dev".to_string()];
        let u = s.oidc_sign_in("oidc:ann", &dev, false, 2).unwrap();
        assert_eq!((u.name.as_str(), u.created_at, u.revoked_at), ("oidc:ann", 2, None));
        assert_eq!(s.user("oidc:ann").unwrap().unwrap().groups, dev, "the record is created on first sign-in");
        let ops = vec!["oidc:ops".to_string()];
        assert_eq!(s.oidc_sign_in("oidc:ann", &ops, true, 3).unwrap().groups, ops);
        assert!(s.user("oidc:ann").unwrap().unwrap().admin, "groups and admin follow the latest token");
        assert!(matches!(s.oidc_sign_in("admin", &[], true, 4), Err(crate::hub::store::StoreError::Conflict(_))));
        let session = ConsoleSession { user: "oidc:ann".into(), groups: ops.clone(), admin: true, expires_at: 100 };
        s.create_session("sh1", &session, 4).unwrap();
        assert_eq!(s.session("sh1", 5).unwrap(), Some(session.clone()));
        assert_eq!(s.session("sh1", 100).unwrap(), None, "expired");
        assert_eq!(s.session("sh2", 5).unwrap(), None);
        s.create_session("sh2", &session, 4).unwrap();
        s.delete_session("sh2").unwrap();
        assert_eq!(s.session("sh2", 5).unwrap(), None, "signed out");
        s.revoke_user("oidc:ann", 5).unwrap();
        assert_eq!(s.oidc_sign_in("oidc:ann", &ops, true, 6).unwrap().revoked_at, Some(5), "revoked at once");
        assert_eq!(s.session("sh1", 6).unwrap(), None, "revocation ends the sessions");
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }
}
