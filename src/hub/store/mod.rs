//! What the hub remembers, as domain operations.
//!
//! [`Store`] speaks in clusters, activations, users, grants and audit
//! entries, never in SQL, so that a PostgreSQL backend (several hub
//! replicas sharing one database) can implement the same trait. The
//! embedded default is [`sqlite::SqliteStore`].
//!
//! Secrets never reach the store: it keeps SHA-256 hashes of tokens,
//! activation codes and agent credentials, and compares them in constant
//! time where a lookup by hash returns a row.
//!
//! What is *live* (which agents are connected right now) is not stored:
//! it lives in the hub process ([`crate::hub::tunnels`]).

mod audit;
pub mod cache;
pub mod notify;
pub mod pg_tls;
pub mod postgres;
pub mod sqlite;

use crate::hub::clock::Millis;
use std::fmt;
use std::rc::Rc;

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The thing already exists (a user or live cluster of that name, the
    /// same grant).
    Conflict(String),
    /// The thing named does not exist.
    NotFound(String),
    /// The database failed; the text says how. Not the caller's fault.
    Backend(String),
    /// The database cannot be reached right now (a shared store whose
    /// connection dropped); the hub retries by itself. Answered with
    /// `503`, never `500`.
    Unavailable(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Conflict(m) | StoreError::NotFound(m) => f.write_str(m),
            StoreError::Backend(m) => write!(f, "store failed: {m}"),
            StoreError::Unavailable(m) => write!(f, "store unavailable: {m}"),
        }
    }
}

impl std::error::Error for StoreError {}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A person (or automation) that calls the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
    /// May manage clusters, users and grants, and reaches every cluster.
    pub admin: bool,
    pub created_at: Millis,
    pub revoked_at: Option<Millis>,
}

/// A console session of a person who signed in through the identity
/// provider. The store knows it by the SHA-256 of its id, never the id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSession {
    pub user: String,
    /// The groups and admin flag the ID token gave at sign-in.
    pub groups: Vec<String>,
    pub admin: bool,
    pub expires_at: Millis,
}

/// Who a grant is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    User(String),
    Group(String),
}

/// `subject` may reach clusters whose name matches `clusters` (`*` glob).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub id: i64,
    pub subject: Subject,
    pub clusters: String,
    pub created_at: Millis,
}

/// Where a cluster is in its life. Whether an activated cluster is
/// `ACTIVE` or `DISCONNECTED` depends on live tunnels, not on the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Registered; its activation has not been used.
    Pending,
    /// An agent activated it and holds a credential.
    Activated,
    /// Gone: credential revoked, name free for a new registration.
    Deregistered,
}

/// What an agent said about itself in its latest `Hello` or activation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentFacts {
    pub agent_version: String,
    pub arch: String,
    pub kube_version: String,
    pub node_count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Stable id (`c_...`); names are reused after deregistration, ids not.
    pub id: String,
    pub name: String,
    pub lifecycle: Lifecycle,
    /// Users the cluster's RBAC lets the agent impersonate.
    pub users: Vec<String>,
    /// Groups the cluster's RBAC lets the agent impersonate.
    pub groups: Vec<String>,
    pub created_at: Millis,
    pub activated_at: Option<Millis>,
    pub deregistered_at: Option<Millis>,
    pub agent: Option<AgentFacts>,
    pub last_connected_at: Option<Millis>,
    pub last_seen_at: Option<Millis>,
}

pub struct NewCluster<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub users: &'a [String],
    pub groups: &'a [String],
    pub now: Millis,
}

pub struct NewActivation<'a> {
    pub id: &'a str,
    pub code_hash: &'a str,
    pub expires_at: Millis,
}

/// An activation as stored (no code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activation {
    pub id: String,
    pub cluster_id: String,
    pub expires_at: Millis,
    pub used_at: Option<Millis>,
    /// When a newer activation of the cluster replaced this unused one
    /// ([`Store::renew_activation`]); its code no longer works.
    pub replaced_at: Option<Millis>,
}

/// Why an activation was refused. Each maps to its own HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActivateError {
    /// No such activation id, or the code does not match it.
    Unknown,
    Expired,
    Used,
    /// A newer activation of the same cluster replaced this one before it
    /// was used ([`Store::renew_activation`]).
    Replaced,
    /// The cluster was deregistered before the agent activated.
    Deregistered,
    Store(StoreError),
}

impl From<StoreError> for ActivateError {
    fn from(e: StoreError) -> Self {
        ActivateError::Store(e)
    }
}

/// What an agent credential is worth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialStatus {
    Valid(Cluster),
    /// It was valid once; its cluster has been deregistered.
    Revoked(Cluster),
    Unknown,
}

/// One line of a cluster's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterEvent {
    pub time: Millis,
    /// `registered`, `renewed`, `activated`, `connected`, `disconnected`,
    /// `deregistered`.
    pub kind: String,
    pub message: String,
}

/// One proxied request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub id: i64,
    pub time: Millis,
    pub user: String,
    pub groups: Vec<String>,
    pub cluster: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: u64,
    pub upgrade: bool,
}

/// One hub process sharing the store with others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// `r_...`, new at every start.
    pub id: String,
    /// Where agents reach this replica itself (`--advertise-url`).
    pub advertise_url: String,
    pub version: String,
    pub started_at: Millis,
}

/// An agent tunnel a replica holds, as the store records it for the
/// other replicas to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSession {
    pub replica_id: String,
    pub cluster_id: String,
    /// The session's number on its replica.
    pub session_id: u64,
    pub since: Millis,
    pub facts: AgentFacts,
}

#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub user: Option<String>,
    pub cluster: Option<String>,
    pub since: Option<Millis>,
    pub limit: u32,
}

/// The hub's memory. Every method is one atomic domain operation; a
/// method that returns `Ok` has made its change durable.
pub trait Store {
    // People.
    fn user_count(&self) -> Result<u64>;
    /// Creates a user with a first token. `Conflict` if the name exists.
    fn create_user(&self, name: &str, groups: &[String], admin: bool, token_hash: &str, now: Millis) -> Result<User>;
    fn users(&self) -> Result<Vec<User>>;
    fn user(&self, name: &str) -> Result<Option<User>>;
    /// Adds another token to a live user.
    fn add_token(&self, user: &str, token_hash: &str, now: Millis) -> Result<()>;
    /// Revokes the user, every token and every console session of theirs.
    fn revoke_user(&self, name: &str, now: Millis) -> Result<User>;
    /// A person the identity provider vouched for: created (with no
    /// token) on first sign-in, their groups and admin flag updated to
    /// what the latest token says. Returns the user as stored, revoked
    /// if an admin revoked them (the caller refuses them then).
    /// `Conflict` if the name belongs to a hub-token user.
    fn oidc_sign_in(&self, name: &str, groups: &[String], admin: bool, now: Millis) -> Result<User>;
    /// Records a console session (and forgets expired ones).
    fn create_session(&self, id_hash: &str, session: &ConsoleSession, now: Millis) -> Result<()>;
    /// The session of this hash if it has not expired at `now` and its
    /// user is not revoked.
    fn session(&self, id_hash: &str, now: Millis) -> Result<Option<ConsoleSession>>;
    /// Ends a session (sign-out); no error if there is none.
    fn delete_session(&self, id_hash: &str) -> Result<()>;
    /// The live user holding this token.
    fn user_by_token(&self, token_hash: &str) -> Result<Option<User>>;

    // Grants.
    fn add_grant(&self, subject: &Subject, clusters: &str, now: Millis) -> Result<Grant>;
    fn grants(&self) -> Result<Vec<Grant>>;
    /// Whether `user` reaches cluster `name` by a grant (admins reach
    /// every cluster). Asked on every proxied request: the cache answers
    /// from the grant list it holds rather than copying it, which with
    /// thousands of grants was thousands of allocations per request.
    fn may_reach(&self, user: &User, name: &str) -> Result<bool> {
        Ok(crate::hub::may_reach(user, &self.grants()?, name))
    }
    fn remove_grant(&self, id: i64) -> Result<()>;

    // Clusters.
    /// Records a `Pending` cluster and its activation. `Conflict` if a
    /// live cluster has the name.
    fn register_cluster(&self, cluster: &NewCluster<'_>, activation: &NewActivation<'_>) -> Result<Cluster>;
    /// Every cluster, deregistered ones included, oldest first.
    fn clusters(&self) -> Result<Vec<Cluster>>;
    /// The live cluster of that name, else the latest deregistered one.
    fn cluster(&self, name: &str) -> Result<Option<Cluster>>;
    /// [`Store::cluster`] for the proxy's hot path: the cache hands out
    /// the copy it holds instead of cloning every field per request.
    fn cluster_shared(&self, name: &str) -> Result<Option<Rc<Cluster>>> {
        Ok(self.cluster(name)?.map(Rc::new))
    }
    fn activations(&self, cluster_id: &str) -> Result<Vec<Activation>>;
    /// Gives the live `Pending` cluster of that name a fresh activation:
    /// every unused activation it had is marked replaced (its code stops
    /// working) and `activation` becomes the one to install. With
    /// `subjects` (users, groups) the cluster's impersonation lists are
    /// replaced as well. `NotFound` if no live cluster has the name;
    /// `Conflict` if an agent already activated it (it holds a
    /// credential: deregister first).
    fn renew_activation(
        &self,
        name: &str,
        subjects: Option<(&[String], &[String])>,
        activation: &NewActivation<'_>,
        now: Millis,
    ) -> Result<Cluster>;
    /// Consumes an activation code (once) and stores the agent credential.
    fn activate(
        &self,
        activation_id: &str,
        code_hash: &str,
        credential_hash: &str,
        facts: &AgentFacts,
        now: Millis,
    ) -> std::result::Result<Cluster, ActivateError>;
    fn credential(&self, credential_hash: &str) -> Result<CredentialStatus>;
    /// An agent connected: remember what it said about itself.
    fn agent_connected(&self, cluster_id: &str, facts: &AgentFacts, now: Millis) -> Result<()>;
    /// The last agent of the cluster went away.
    fn agents_gone(&self, cluster_id: &str, now: Millis) -> Result<()>;
    fn add_event(&self, cluster_id: &str, kind: &str, message: &str, now: Millis) -> Result<()>;
    /// The latest `limit` events, newest first.
    fn events(&self, cluster_id: &str, limit: u32) -> Result<Vec<ClusterEvent>>;
    /// Marks the live cluster of that name gone and revokes its credential.
    fn deregister(&self, name: &str, now: Millis) -> Result<Cluster>;

    // Audit.
    /// Queues an entry (by value: the writer keeps it until its batch
    /// commits, and a copy per request showed in profiles).
    fn append_audit(&self, entry: AuditEntry) -> Result<()>;
    /// Matching entries, newest first.
    fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>>;

    // The replica set (a shared store only; the embedded store has one
    // process, whose own tunnels are the whole truth, and keeps nothing).
    /// Records this replica. `Conflict` if another live replica (its
    /// heartbeat younger than `deadline`) advertises the same URL.
    fn join_replica(&self, _replica: &Replica, _now: Millis, _deadline: Millis) -> Result<()> {
        Ok(())
    }
    /// Refreshes this replica's heartbeat (re-creating its row if it had
    /// expired), replaces its agent-session rows with `sessions` when they
    /// `changed` or when the row had to be made again (another replica
    /// found it expired, after a store outage or a long pause, and its
    /// sessions went with it), forgets replicas silent past `deadline`
    /// (and their sessions), and returns the sessions the *other* live
    /// replicas hold.
    fn replica_heartbeat(
        &self,
        _replica: &Replica,
        _sessions: &[AgentSession],
        _changed: bool,
        _now: Millis,
        _deadline: Millis,
    ) -> Result<Vec<AgentSession>> {
        Ok(Vec::new())
    }
    /// Removes this replica's row and sessions (a clean shutdown).
    fn leave_replica(&self, _id: &str) -> Result<()> {
        Ok(())
    }
    /// The live replicas (heartbeat younger than `deadline`), this one
    /// included, by id: the set agents are told, and where the hand-off
    /// dials.
    fn live_replicas(&self, _now: Millis, _deadline: Millis) -> Result<Vec<Replica>> {
        Ok(Vec::new())
    }

    // Health and caches.
    /// Whether the store answers now; `Unavailable` says why not. The
    /// embedded store always does.
    fn check(&self) -> Result<()> {
        Ok(())
    }
    /// Another process changed the database: forget any cached answer.
    fn invalidate(&self) {}

    /// Store calls that reached the database since start, by call (a
    /// shared store's figures for `/metrics`; the embedded one reports
    /// none).
    fn queries(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}
