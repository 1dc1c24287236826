//! The embedded store: one SQLite file in the data directory.
//!
//! Durability: WAL journal with `synchronous=NORMAL`. A committed
//! transaction is in the WAL before `commit` returns, so killing the
//! process (even `kill -9`) loses nothing committed; only a power cut may
//! lose the last transactions (SQLite's documented WAL+NORMAL trade-off).
//!
//! Lists (groups, users) are stored as JSON text: they are read whole and
//! never queried inside.
//!
//! Audit entries are written by their own thread with its own connection,
//! in one transaction per batch, so a proxied request never waits on the
//! disk in the hub's single-threaded event loop (under write-back
//! pressure one `INSERT` could stall every connection for milliseconds).
//! An entry is committed within about 20 ms of its request ending; a
//! query of the audit log first waits for what was appended before it,
//! and dropping the store commits what is queued. `kill -9` may lose the
//! entries of the last 20 ms.

use super::audit::{AUDIT_BATCH, AUDIT_GATHER, AuditMsg, AuditWriter};
use super::*;
use crate::hub::clock::Millis;
use crate::secret::ct_eq;
use rusqlite::{Connection, OptionalExtension, Row, params};
use std::path::Path;
use std::sync::mpsc;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users(
  name TEXT PRIMARY KEY, groups TEXT NOT NULL, admin INTEGER NOT NULL,
  created_at INTEGER NOT NULL, revoked_at INTEGER, oidc INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS tokens(
  hash TEXT PRIMARY KEY, user TEXT NOT NULL REFERENCES users(name), created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sessions(
  hash TEXT PRIMARY KEY, user TEXT NOT NULL REFERENCES users(name), groups TEXT NOT NULL,
  admin INTEGER NOT NULL, created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS grants(
  id INTEGER PRIMARY KEY AUTOINCREMENT, subject_kind TEXT NOT NULL, subject TEXT NOT NULL,
  clusters TEXT NOT NULL, created_at INTEGER NOT NULL, UNIQUE(subject_kind, subject, clusters));
CREATE TABLE IF NOT EXISTS clusters(
  id TEXT PRIMARY KEY, name TEXT NOT NULL, users TEXT NOT NULL, groups TEXT NOT NULL,
  created_at INTEGER NOT NULL, activated_at INTEGER, deregistered_at INTEGER,
  credential_hash TEXT UNIQUE, agent_version TEXT, arch TEXT, kube_version TEXT, node_count INTEGER,
  last_connected_at INTEGER, last_seen_at INTEGER);
CREATE UNIQUE INDEX IF NOT EXISTS clusters_live_name ON clusters(name) WHERE deregistered_at IS NULL;
CREATE TABLE IF NOT EXISTS activations(
  id TEXT PRIMARY KEY, cluster_id TEXT NOT NULL REFERENCES clusters(id), code_hash TEXT NOT NULL,
  expires_at INTEGER NOT NULL, used_at INTEGER, replaced_at INTEGER);
CREATE TABLE IF NOT EXISTS cluster_events(
  id INTEGER PRIMARY KEY AUTOINCREMENT, cluster_id TEXT NOT NULL, time INTEGER NOT NULL,
  kind TEXT NOT NULL, message TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS cluster_events_cluster ON cluster_events(cluster_id, id);
CREATE TABLE IF NOT EXISTS audit(
  id INTEGER PRIMARY KEY AUTOINCREMENT, time INTEGER NOT NULL, user TEXT NOT NULL, groups TEXT NOT NULL,
  cluster TEXT NOT NULL, method TEXT NOT NULL, path TEXT NOT NULL, status INTEGER NOT NULL,
  bytes_in INTEGER NOT NULL, bytes_out INTEGER NOT NULL, duration_ms INTEGER NOT NULL, upgrade INTEGER NOT NULL);
PRAGMA user_version = 1;
";

const CLUSTER_COLS: &str = "id, name, users, groups, created_at, activated_at, deregistered_at, agent_version, arch, \
                            kube_version, node_count, last_connected_at, last_seen_at";

pub struct SqliteStore {
    db: Connection,
    audit: AuditWriter,
}

fn audit_thread(mut db: Connection, rx: mpsc::Receiver<AuditMsg>) {
    while let Ok(first) = rx.recv() {
        let mut entries = Vec::new();
        let mut flushes = Vec::new();
        // Gather for a moment: one transaction per batch, not per
        // request. The gathering is a sleep, not a wait on the queue, so
        // the serving thread's sends do not wake this one per entry (a
        // cross-thread wake-up per request cost more than the insert).
        // A flush (an audit query waiting) commits without the sleep.
        let mut next = Some(first);
        let mut slept = false;
        loop {
            while let Some(msg) = next {
                match msg {
                    AuditMsg::Entry(e) => entries.push(e),
                    AuditMsg::Flush(done) => flushes.push(done),
                }
                next = if entries.len() < AUDIT_BATCH { rx.try_recv().ok() } else { None };
            }
            if slept || !flushes.is_empty() || entries.len() >= AUDIT_BATCH {
                break;
            }
            std::thread::sleep(AUDIT_GATHER);
            slept = true;
            next = rx.try_recv().ok();
        }
        if entries.is_empty() {
            // Only flushes: nothing to write.
        } else if let Err(e) = write_audit(&mut db, &entries) {
            log::error!("audit write failed entries={} error={e}", entries.len());
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

fn write_audit(db: &mut Connection, entries: &[AuditEntry]) -> rusqlite::Result<()> {
    let tx = db.transaction()?;
    {
        let mut st = tx.prepare_cached(
            "INSERT INTO audit(time, user, groups, cluster, method, path, status, bytes_in, bytes_out,
             duration_ms, upgrade) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        for e in entries {
            st.execute(params![
                e.time,
                e.user,
                to_json(&e.groups),
                e.cluster,
                e.method,
                e.path,
                e.status,
                e.bytes_in as i64,
                e.bytes_out as i64,
                e.duration_ms as i64,
                e.upgrade
            ])?;
        }
    }
    tx.commit()
}

/// Brings a database made by an older hub up to [`SCHEMA`]: each step is
/// idempotent and keyed on what the database lacks, not on a version
/// number, so a half-done upgrade finishes on the next start.
fn migrate(db: &Connection) -> rusqlite::Result<()> {
    // `activations.replaced_at` (renewed activations), added after v1.
    let has_replaced: bool = db.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('activations') WHERE name = 'replaced_at'",
        [],
        |r| r.get(0),
    )?;
    if !has_replaced {
        db.execute_batch("ALTER TABLE activations ADD COLUMN replaced_at INTEGER")?;
    }
    // `users.oidc` (people who sign in through the identity provider).
    let has_oidc: bool =
        db.query_row("SELECT COUNT(*) > 0 FROM pragma_table_info('users') WHERE name = 'oidc'", [], |r| r.get(0))?;
    if !has_oidc {
        db.execute_batch("ALTER TABLE users ADD COLUMN oidc INTEGER NOT NULL DEFAULT 0")?;
    }
    // The index on `audit(time)` of the first schema: no query used it
    // (the audit query's optional bounds, `?3 IS NULL OR time >= ?3`, and
    // its newest-first order walk the rowid), and every audited request
    // paid a second B-tree insert for it.
    db.execute_batch("DROP INDEX IF EXISTS audit_time")?;
    Ok(())
}

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

fn to_json(list: &[String]) -> String {
    serde_json::to_string(list).unwrap_or_else(|_| "[]".into())
}

fn from_json(text: String) -> Vec<String> {
    serde_json::from_str(&text).unwrap_or_default()
}

fn user_row(r: &Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        name: r.get(0)?,
        groups: from_json(r.get(1)?),
        admin: r.get(2)?,
        created_at: r.get(3)?,
        revoked_at: r.get(4)?,
    })
}

fn cluster_row(r: &Row<'_>) -> rusqlite::Result<Cluster> {
    let activated_at: Option<Millis> = r.get(5)?;
    let deregistered_at: Option<Millis> = r.get(6)?;
    let agent_version: Option<String> = r.get(7)?;
    Ok(Cluster {
        id: r.get(0)?,
        name: r.get(1)?,
        users: from_json(r.get(2)?),
        groups: from_json(r.get(3)?),
        created_at: r.get(4)?,
        lifecycle: match (activated_at, deregistered_at) {
            (_, Some(_)) => Lifecycle::Deregistered,
            (Some(_), None) => Lifecycle::Activated,
            (None, None) => Lifecycle::Pending,
        },
        activated_at,
        deregistered_at,
        agent: match agent_version {
            Some(agent_version) => Some(AgentFacts {
                agent_version,
                arch: r.get::<_, Option<String>>(8)?.unwrap_or_default(),
                kube_version: r.get::<_, Option<String>>(9)?.unwrap_or_default(),
                node_count: r.get::<_, Option<u32>>(10)?.unwrap_or_default(),
            }),
            None => None,
        },
        last_connected_at: r.get(11)?,
        last_seen_at: r.get(12)?,
    })
}

fn audit_row(r: &Row<'_>) -> rusqlite::Result<AuditEntry> {
    Ok(AuditEntry {
        id: r.get(0)?,
        time: r.get(1)?,
        user: r.get(2)?,
        groups: from_json(r.get(3)?),
        cluster: r.get(4)?,
        method: r.get(5)?,
        path: r.get(6)?,
        status: r.get(7)?,
        bytes_in: r.get::<_, i64>(8)? as u64,
        bytes_out: r.get::<_, i64>(9)? as u64,
        duration_ms: r.get::<_, i64>(10)? as u64,
        upgrade: r.get(11)?,
    })
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let db = Connection::open(path).map_err(backend)?;
        db.busy_timeout(std::time::Duration::from_secs(5)).map_err(backend)?;
        db.pragma_update(None, "journal_mode", "WAL").map_err(backend)?;
        db.pragma_update(None, "synchronous", "NORMAL").map_err(backend)?;
        db.pragma_update(None, "foreign_keys", "ON").map_err(backend)?;
        db.execute_batch(SCHEMA).map_err(backend)?;
        migrate(&db).map_err(backend)?;
        let writer = Connection::open(path).map_err(backend)?;
        writer.busy_timeout(std::time::Duration::from_secs(5)).map_err(backend)?;
        writer.pragma_update(None, "synchronous", "NORMAL").map_err(backend)?;
        // It only appends: a small page cache (256 KiB, not the default
        // 2 MiB) keeps the hub's memory where it was before this thread.
        writer.pragma_update(None, "cache_size", -256).map_err(backend)?;
        Ok(SqliteStore { db, audit: AuditWriter::start(move |rx| audit_thread(writer, rx))? })
    }

    fn cluster_where(&self, clause: &str, p: impl rusqlite::Params) -> Result<Option<Cluster>> {
        // Cached: the kube front end looks a cluster up on every request.
        let sql = format!("SELECT {CLUSTER_COLS} FROM clusters WHERE {clause}");
        self.db.prepare_cached(&sql).and_then(|mut st| st.query_row(p, cluster_row).optional()).map_err(backend)
    }
}

impl Store for SqliteStore {
    fn user_count(&self) -> Result<u64> {
        self.db.query_row("SELECT COUNT(*) FROM users", [], |r| r.get::<_, i64>(0)).map(|n| n as u64).map_err(backend)
    }

    fn create_user(&self, name: &str, groups: &[String], admin: bool, token_hash: &str, now: Millis) -> Result<User> {
        let tx = self.db.unchecked_transaction().map_err(backend)?;
        tx.execute(
            "INSERT INTO users(name, groups, admin, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![name, to_json(groups), admin, now],
        )
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!("user {name} already exists"))
            } else {
                backend(e)
            }
        })?;
        tx.execute("INSERT INTO tokens(hash, user, created_at) VALUES (?1, ?2, ?3)", params![token_hash, name, now])
            .map_err(backend)?;
        tx.commit().map_err(backend)?;
        Ok(User { name: name.into(), groups: groups.to_vec(), admin, created_at: now, revoked_at: None })
    }

    fn users(&self) -> Result<Vec<User>> {
        let mut st = self
            .db
            .prepare_cached("SELECT name, groups, admin, created_at, revoked_at FROM users ORDER BY name")
            .map_err(backend)?;
        st.query_map([], user_row).map_err(backend)?.collect::<rusqlite::Result<_>>().map_err(backend)
    }

    fn user(&self, name: &str) -> Result<Option<User>> {
        self.db
            .query_row(
                "SELECT name, groups, admin, created_at, revoked_at FROM users WHERE name = ?1",
                [name],
                user_row,
            )
            .optional()
            .map_err(backend)
    }

    fn add_token(&self, user: &str, token_hash: &str, now: Millis) -> Result<()> {
        match self.user(user)? {
            Some(u) if u.revoked_at.is_none() => {}
            _ => return Err(StoreError::NotFound(format!("no user {user}"))),
        }
        self.db
            .execute("INSERT INTO tokens(hash, user, created_at) VALUES (?1, ?2, ?3)", params![token_hash, user, now])
            .map_err(backend)?;
        Ok(())
    }

    fn revoke_user(&self, name: &str, now: Millis) -> Result<User> {
        let tx = self.db.unchecked_transaction().map_err(backend)?;
        let n = tx
            .execute("UPDATE users SET revoked_at = ?2 WHERE name = ?1 AND revoked_at IS NULL", params![name, now])
            .map_err(backend)?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("no live user {name}")));
        }
        tx.execute("DELETE FROM tokens WHERE user = ?1", [name]).map_err(backend)?;
        tx.execute("DELETE FROM sessions WHERE user = ?1", [name]).map_err(backend)?;
        tx.commit().map_err(backend)?;
        self.user(name)?.ok_or_else(|| StoreError::NotFound(format!("no user {name}")))
    }

    fn oidc_sign_in(&self, name: &str, groups: &[String], admin: bool, now: Millis) -> Result<User> {
        let tx = self.db.unchecked_transaction().map_err(backend)?;
        let row: Option<(User, bool)> = tx
            .query_row(
                "SELECT name, groups, admin, created_at, revoked_at, oidc FROM users WHERE name = ?1",
                [name],
                |r| Ok((user_row(r)?, r.get(5)?)),
            )
            .optional()
            .map_err(backend)?;
        let user = match row {
            None => {
                tx.execute(
                    "INSERT INTO users(name, groups, admin, created_at, oidc) VALUES (?1, ?2, ?3, ?4, 1)",
                    params![name, to_json(groups), admin, now],
                )
                .map_err(backend)?;
                User { name: name.into(), groups: groups.to_vec(), admin, created_at: now, revoked_at: None }
            }
            Some((_, false)) => {
                return Err(StoreError::Conflict(format!(
                    "user {name} is a hub-token user, not one of the identity provider; \
                     give the provider's names a prefix (serve --oidc-user-prefix)"
                )));
            }
            // Revoked stays revoked: the caller refuses the person.
            Some((u, true)) if u.revoked_at.is_some() => u,
            Some((u, true)) if u.groups == groups && u.admin == admin => u,
            Some((u, true)) => {
                tx.execute(
                    "UPDATE users SET groups = ?2, admin = ?3 WHERE name = ?1",
                    params![name, to_json(groups), admin],
                )
                .map_err(backend)?;
                User { groups: groups.to_vec(), admin, ..u }
            }
        };
        tx.commit().map_err(backend)?;
        Ok(user)
    }

    fn create_session(&self, id_hash: &str, c: &ConsoleSession, now: Millis) -> Result<()> {
        let tx = self.db.unchecked_transaction().map_err(backend)?;
        tx.execute("DELETE FROM sessions WHERE expires_at <= ?1", [now]).map_err(backend)?;
        tx.execute(
            "INSERT INTO sessions(hash, user, groups, admin, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id_hash, c.user, to_json(&c.groups), c.admin, now, c.expires_at],
        )
        .map_err(backend)?;
        tx.commit().map_err(backend)
    }

    fn session(&self, id_hash: &str, now: Millis) -> Result<Option<ConsoleSession>> {
        let row = self
            .db
            .prepare_cached(
                "SELECT s.hash, s.user, s.groups, s.admin, s.expires_at FROM sessions s JOIN users u ON u.name = s.user
                 WHERE s.hash = ?1 AND s.expires_at > ?2 AND u.revoked_at IS NULL",
            )
            .and_then(|mut st| {
                st.query_row(params![id_hash, now], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        ConsoleSession {
                            user: r.get(1)?,
                            groups: from_json(r.get(2)?),
                            admin: r.get(3)?,
                            expires_at: r.get(4)?,
                        },
                    ))
                })
                .optional()
            })
            .map_err(backend)?;
        // As for tokens: the index found it; compare once more in constant time.
        Ok(row.filter(|(h, _)| ct_eq(h.as_bytes(), id_hash.as_bytes())).map(|(_, s)| s))
    }

    fn delete_session(&self, id_hash: &str) -> Result<()> {
        self.db.execute("DELETE FROM sessions WHERE hash = ?1", [id_hash]).map_err(backend)?;
        Ok(())
    }

    fn user_by_token(&self, token_hash: &str) -> Result<Option<User>> {
        // Cached: every authenticated request asks.
        let row = self
            .db
            .prepare_cached(
                "SELECT t.hash, u.name, u.groups, u.admin, u.created_at, u.revoked_at
                 FROM tokens t JOIN users u ON u.name = t.user WHERE t.hash = ?1 AND u.revoked_at IS NULL",
            )
            .and_then(|mut st| {
                st.query_row([token_hash], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        User {
                            name: r.get(1)?,
                            groups: from_json(r.get(2)?),
                            admin: r.get(3)?,
                            created_at: r.get(4)?,
                            revoked_at: r.get(5)?,
                        },
                    ))
                })
                .optional()
            })
            .map_err(backend)?;
        // The index found the row; compare once more in constant time so a
        // backend with looser matching could never let a near miss in.
        Ok(row.filter(|(hash, _)| ct_eq(hash.as_bytes(), token_hash.as_bytes())).map(|(_, u)| u))
    }

    fn add_grant(&self, subject: &Subject, clusters: &str, now: Millis) -> Result<Grant> {
        let (kind, name) = match subject {
            Subject::User(n) => ("user", n),
            Subject::Group(n) => ("group", n),
        };
        self.db
            .execute(
                "INSERT INTO grants(subject_kind, subject, clusters, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![kind, name, clusters, now],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict(format!("{kind} {name} already has a grant for {clusters}"))
                } else {
                    backend(e)
                }
            })?;
        Ok(Grant {
            id: self.db.last_insert_rowid(),
            subject: subject.clone(),
            clusters: clusters.into(),
            created_at: now,
        })
    }

    fn grants(&self) -> Result<Vec<Grant>> {
        let mut st = self
            .db
            .prepare_cached("SELECT id, subject_kind, subject, clusters, created_at FROM grants ORDER BY id")
            .map_err(backend)?;
        st.query_map([], |r| {
            let kind: String = r.get(1)?;
            let name: String = r.get(2)?;
            Ok(Grant {
                id: r.get(0)?,
                subject: if kind == "group" { Subject::Group(name) } else { Subject::User(name) },
                clusters: r.get(3)?,
                created_at: r.get(4)?,
            })
        })
        .map_err(backend)?
        .collect::<rusqlite::Result<_>>()
        .map_err(backend)
    }

    fn remove_grant(&self, id: i64) -> Result<()> {
        match self.db.execute("DELETE FROM grants WHERE id = ?1", [id]).map_err(backend)? {
            0 => Err(StoreError::NotFound(format!("no grant {id}"))),
            _ => Ok(()),
        }
    }

    fn register_cluster(&self, c: &NewCluster<'_>, a: &NewActivation<'_>) -> Result<Cluster> {
        let tx = self.db.unchecked_transaction().map_err(backend)?;
        tx.execute(
            "INSERT INTO clusters(id, name, users, groups, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![c.id, c.name, to_json(c.users), to_json(c.groups), c.now],
        )
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!("cluster {} is already registered", c.name))
            } else {
                backend(e)
            }
        })?;
        tx.execute(
            "INSERT INTO activations(id, cluster_id, code_hash, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![a.id, c.id, a.code_hash, a.expires_at],
        )
        .map_err(backend)?;
        tx.execute(
            "INSERT INTO cluster_events(cluster_id, time, kind, message) VALUES (?1, ?2, 'registered', ?3)",
            params![
                c.id,
                c.now,
                format!("registered; activation {} valid until {}", a.id, crate::hub::clock::rfc3339(a.expires_at))
            ],
        )
        .map_err(backend)?;
        tx.commit().map_err(backend)?;
        self.cluster_where("id = ?1", [c.id])?.ok_or_else(|| StoreError::Backend("cluster vanished".into()))
    }

    fn clusters(&self) -> Result<Vec<Cluster>> {
        let sql = format!("SELECT {CLUSTER_COLS} FROM clusters ORDER BY created_at, id");
        let mut st = self.db.prepare_cached(&sql).map_err(backend)?;
        st.query_map([], cluster_row).map_err(backend)?.collect::<rusqlite::Result<_>>().map_err(backend)
    }

    fn cluster(&self, name: &str) -> Result<Option<Cluster>> {
        self.cluster_where(
            "name = ?1 ORDER BY deregistered_at IS NOT NULL, deregistered_at DESC, created_at DESC LIMIT 1",
            [name],
        )
    }

    fn activations(&self, cluster_id: &str) -> Result<Vec<Activation>> {
        let mut st = self
            .db
            .prepare_cached(
                "SELECT id, cluster_id, expires_at, used_at, replaced_at FROM activations WHERE cluster_id = ?1
                 ORDER BY rowid",
            )
            .map_err(backend)?;
        st.query_map([cluster_id], |r| {
            Ok(Activation {
                id: r.get(0)?,
                cluster_id: r.get(1)?,
                expires_at: r.get(2)?,
                used_at: r.get(3)?,
                replaced_at: r.get(4)?,
            })
        })
        .map_err(backend)?
        .collect::<rusqlite::Result<_>>()
        .map_err(backend)
    }

    fn activate(
        &self,
        activation_id: &str,
        code_hash: &str,
        credential_hash: &str,
        facts: &AgentFacts,
        now: Millis,
    ) -> std::result::Result<Cluster, ActivateError> {
        let tx = self.db.unchecked_transaction().map_err(backend)?;
        // (cluster_id, code_hash, expires_at, used_at, replaced_at)
        type Found = (String, String, Millis, Option<Millis>, Option<Millis>);
        let row: Option<Found> = tx
            .query_row(
                "SELECT cluster_id, code_hash, expires_at, used_at, replaced_at FROM activations WHERE id = ?1",
                [activation_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()
            .map_err(backend)?;
        let Some((cluster_id, stored_hash, expires_at, used_at, replaced_at)) = row else {
            return Err(ActivateError::Unknown);
        };
        if !ct_eq(stored_hash.as_bytes(), code_hash.as_bytes()) {
            return Err(ActivateError::Unknown);
        }
        let deregistered: Option<Millis> = tx
            .query_row("SELECT deregistered_at FROM clusters WHERE id = ?1", [&cluster_id], |r| r.get(0))
            .map_err(backend)?;
        if deregistered.is_some() {
            return Err(ActivateError::Deregistered);
        }
        if used_at.is_some() {
            return Err(ActivateError::Used);
        }
        if replaced_at.is_some() {
            return Err(ActivateError::Replaced);
        }
        if now >= expires_at {
            return Err(ActivateError::Expired);
        }
        tx.execute("UPDATE activations SET used_at = ?2 WHERE id = ?1", params![activation_id, now])
            .map_err(backend)?;
        tx.execute(
            "UPDATE clusters SET activated_at = ?2, credential_hash = ?3, agent_version = ?4, arch = ?5,
             kube_version = ?6, node_count = ?7 WHERE id = ?1",
            params![
                cluster_id,
                now,
                credential_hash,
                facts.agent_version,
                facts.arch,
                facts.kube_version,
                facts.node_count
            ],
        )
        .map_err(backend)?;
        tx.execute(
            "INSERT INTO cluster_events(cluster_id, time, kind, message) VALUES (?1, ?2, 'activated', ?3)",
            params![
                cluster_id,
                now,
                format!(
                    "activated by agent {} ({}, Kubernetes {})",
                    facts.agent_version, facts.arch, facts.kube_version
                )
            ],
        )
        .map_err(backend)?;
        tx.commit().map_err(backend)?;
        self.cluster_where("id = ?1", [&cluster_id])?.ok_or(ActivateError::Unknown)
    }

    fn renew_activation(
        &self,
        name: &str,
        subjects: Option<(&[String], &[String])>,
        a: &NewActivation<'_>,
        now: Millis,
    ) -> Result<Cluster> {
        let tx = self.db.unchecked_transaction().map_err(backend)?;
        let row: Option<(String, Option<Millis>)> = tx
            .query_row(
                "SELECT id, activated_at FROM clusters WHERE name = ?1 AND deregistered_at IS NULL",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(backend)?;
        let Some((id, activated_at)) = row else {
            return Err(StoreError::NotFound(format!(
                "no registered cluster {name}; register it with `uplink-hub cluster register {name}`"
            )));
        };
        if activated_at.is_some() {
            return Err(StoreError::Conflict(format!(
                "cluster {name} is already activated: an agent holds its credential, so a new activation would \
                 not replace it. Deregister it first with `uplink-hub cluster deregister {name}`, then register it again"
            )));
        }
        let replaced = tx
            .execute(
                "UPDATE activations SET replaced_at = ?2 WHERE cluster_id = ?1 AND used_at IS NULL AND replaced_at IS NULL",
                params![id, now],
            )
            .map_err(backend)?;
        tx.execute(
            "INSERT INTO activations(id, cluster_id, code_hash, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![a.id, id, a.code_hash, a.expires_at],
        )
        .map_err(backend)?;
        if let Some((users, groups)) = subjects {
            tx.execute(
                "UPDATE clusters SET users = ?2, groups = ?3 WHERE id = ?1",
                params![id, to_json(users), to_json(groups)],
            )
            .map_err(backend)?;
        }
        tx.execute(
            "INSERT INTO cluster_events(cluster_id, time, kind, message) VALUES (?1, ?2, 'renewed', ?3)",
            params![
                id,
                now,
                format!(
                    "new activation {} valid until {}; {replaced} earlier unused activation(s) replaced",
                    a.id,
                    crate::hub::clock::rfc3339(a.expires_at)
                )
            ],
        )
        .map_err(backend)?;
        tx.commit().map_err(backend)?;
        self.cluster_where("id = ?1", [&id])?.ok_or_else(|| StoreError::Backend("cluster vanished".into()))
    }

    fn credential(&self, credential_hash: &str) -> Result<CredentialStatus> {
        let sql = format!("SELECT {CLUSTER_COLS}, credential_hash FROM clusters WHERE credential_hash = ?1");
        let row = self
            .db
            .query_row(&sql, [credential_hash], |r| Ok((cluster_row(r)?, r.get::<_, String>(13)?)))
            .optional()
            .map_err(backend)?;
        Ok(match row {
            Some((c, h)) if ct_eq(h.as_bytes(), credential_hash.as_bytes()) => {
                if c.lifecycle == Lifecycle::Deregistered {
                    CredentialStatus::Revoked(c)
                } else {
                    CredentialStatus::Valid(c)
                }
            }
            _ => CredentialStatus::Unknown,
        })
    }

    fn agent_connected(&self, cluster_id: &str, f: &AgentFacts, now: Millis) -> Result<()> {
        self.db
            .execute(
                "UPDATE clusters SET agent_version = ?2, arch = ?3, kube_version = ?4, node_count = ?5,
                 last_connected_at = ?6, last_seen_at = ?6 WHERE id = ?1",
                params![cluster_id, f.agent_version, f.arch, f.kube_version, f.node_count, now],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn agents_gone(&self, cluster_id: &str, now: Millis) -> Result<()> {
        self.db
            .execute("UPDATE clusters SET last_seen_at = ?2 WHERE id = ?1", params![cluster_id, now])
            .map_err(backend)?;
        Ok(())
    }

    fn add_event(&self, cluster_id: &str, kind: &str, message: &str, now: Millis) -> Result<()> {
        self.db
            .execute(
                "INSERT INTO cluster_events(cluster_id, time, kind, message) VALUES (?1, ?2, ?3, ?4)",
                params![cluster_id, now, kind, message],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn events(&self, cluster_id: &str, limit: u32) -> Result<Vec<ClusterEvent>> {
        let mut st = self
            .db
            .prepare_cached(
                "SELECT time, kind, message FROM cluster_events WHERE cluster_id = ?1 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(backend)?;
        st.query_map(params![cluster_id, limit], |r| {
            Ok(ClusterEvent { time: r.get(0)?, kind: r.get(1)?, message: r.get(2)? })
        })
        .map_err(backend)?
        .collect::<rusqlite::Result<_>>()
        .map_err(backend)
    }

    fn deregister(&self, name: &str, now: Millis) -> Result<Cluster> {
        let tx = self.db.unchecked_transaction().map_err(backend)?;
        let id: Option<String> = tx
            .query_row("SELECT id FROM clusters WHERE name = ?1 AND deregistered_at IS NULL", [name], |r| r.get(0))
            .optional()
            .map_err(backend)?;
        let Some(id) = id else {
            return Err(StoreError::NotFound(format!("no registered cluster {name}")));
        };
        // The credential hash stays so a revoked credential is told apart
        // from an unknown one; `deregistered_at` is what revokes it.
        tx.execute("UPDATE clusters SET deregistered_at = ?2 WHERE id = ?1", params![id, now]).map_err(backend)?;
        tx.execute(
            "INSERT INTO cluster_events(cluster_id, time, kind, message) VALUES (?1, ?2, 'deregistered', ?3)",
            params![id, now, "deregistered; agent credential revoked"],
        )
        .map_err(backend)?;
        tx.commit().map_err(backend)?;
        self.cluster_where("id = ?1", [&id])?.ok_or_else(|| StoreError::Backend("cluster vanished".into()))
    }

    fn append_audit(&self, e: AuditEntry) -> Result<()> {
        self.audit.send(AuditMsg::Entry(e))
    }

    fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>> {
        self.audit.flush()?;
        let mut st = self
            .db
            .prepare_cached(
                "SELECT id, time, user, groups, cluster, method, path, status, bytes_in, bytes_out, duration_ms, upgrade
                 FROM audit WHERE (?1 IS NULL OR user = ?1) AND (?2 IS NULL OR cluster = ?2) AND (?3 IS NULL OR time >= ?3)
                 ORDER BY id DESC LIMIT ?4",
            )
            .map_err(backend)?;
        st.query_map(params![q.user, q.cluster, q.since, q.limit], audit_row)
            .map_err(backend)?
            .collect::<rusqlite::Result<_>>()
            .map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::sha256_hex;

    fn store() -> (SqliteStore, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "uplink-store-{}-{}",
            std::process::id(),
            crate::secret::Secret::random(6).expose()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        (SqliteStore::open(&dir.join("hub.db")).unwrap(), dir)
    }

    #[test]
    fn activation_is_consumed_once_and_codes_are_distinct() {
        let (s, dir) = store();
        let c = s
            .register_cluster(
                &NewCluster { id: "c_1", name: "edge-1", users: &["alice".into()], groups: &[], now: 1000 },
                &NewActivation { id: "act_1", code_hash: &sha256_hex("code"), expires_at: 5000 },
            )
            .unwrap();
        assert_eq!(c.lifecycle, Lifecycle::Pending);
        let f = AgentFacts::default();
        assert_eq!(s.activate("act_x", &sha256_hex("code"), "h", &f, 2000), Err(ActivateError::Unknown));
        assert_eq!(s.activate("act_1", &sha256_hex("nope"), "h", &f, 2000), Err(ActivateError::Unknown));
        assert_eq!(s.activate("act_1", &sha256_hex("code"), "h", &f, 6000), Err(ActivateError::Expired));
        let c = s.activate("act_1", &sha256_hex("code"), "h", &f, 2000).unwrap();
        assert_eq!(c.lifecycle, Lifecycle::Activated);
        assert_eq!(s.activate("act_1", &sha256_hex("code"), "h2", &f, 2000), Err(ActivateError::Used));
        assert!(matches!(s.credential("h").unwrap(), CredentialStatus::Valid(_)));
        s.deregister("edge-1", 3000).unwrap();
        assert!(matches!(s.credential("h").unwrap(), CredentialStatus::Revoked(_)));
        assert_eq!(s.credential("zz").unwrap(), CredentialStatus::Unknown);
        // The name is free again.
        s.register_cluster(
            &NewCluster { id: "c_2", name: "edge-1", users: &[], groups: &[], now: 4000 },
            &NewActivation { id: "act_2", code_hash: "x", expires_at: 9000 },
        )
        .unwrap();
        assert_eq!(s.cluster("edge-1").unwrap().unwrap().id, "c_2");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn renewal_replaces_unused_activations_of_pending_clusters_only() {
        let (s, dir) = store();
        let f = AgentFacts::default();
        s.register_cluster(
            &NewCluster { id: "c_1", name: "edge-1", users: &["alice".into()], groups: &[], now: 1000 },
            &NewActivation { id: "act_1", code_hash: &sha256_hex("one"), expires_at: 5000 },
        )
        .unwrap();
        assert!(matches!(
            s.renew_activation("edge-9", None, &NewActivation { id: "x", code_hash: "x", expires_at: 1 }, 1),
            Err(StoreError::NotFound(_))
        ));
        let users = vec!["arn:aws:iam::1234567890:user/Alice".to_string()];
        let c = s
            .renew_activation(
                "edge-1",
                Some((&users, &["ops".into()])),
                &NewActivation { id: "act_2", code_hash: &sha256_hex("two"), expires_at: 9000 },
                2000,
            )
            .unwrap();
        assert_eq!((c.lifecycle, c.users, c.groups), (Lifecycle::Pending, users, vec!["ops".to_string()]));
        assert_eq!(s.activate("act_1", &sha256_hex("one"), "h", &f, 2500), Err(ActivateError::Replaced));
        let acts = s.activations("c_1").unwrap();
        assert_eq!((acts[0].replaced_at, acts[1].replaced_at), (Some(2000), None));
        // Renewal also revives an expired registration.
        s.renew_activation(
            "edge-1",
            None,
            &NewActivation { id: "act_3", code_hash: &sha256_hex("three"), expires_at: 20_000 },
            10_000,
        )
        .unwrap();
        assert_eq!(s.activate("act_2", &sha256_hex("two"), "h", &f, 10_500), Err(ActivateError::Replaced));
        assert_eq!(s.activate("act_3", &sha256_hex("three"), "h", &f, 10_500).unwrap().lifecycle, Lifecycle::Activated);
        let again =
            s.renew_activation("edge-1", None, &NewActivation { id: "act_4", code_hash: "x", expires_at: 1 }, 11_000);
        assert!(matches!(&again, Err(StoreError::Conflict(m)) if m.contains("cluster deregister edge-1")), "{again:?}");
        assert_eq!(s.events("c_1", 10).unwrap().iter().filter(|e| e.kind == "renewed").count(), 2);
        std::fs::remove_dir_all(dir).ok();
    }

    /// A database from before `replaced_at` gains the column on open, and
    /// loses the unused index on the audit log's times.
    #[test]
    fn old_databases_are_migrated() {
        let (s, dir) = store();
        drop(s);
        let path = dir.join("old.db");
        let db = Connection::open(&path).unwrap();
        db.execute_batch(&SCHEMA.replace(", replaced_at INTEGER", "")).unwrap();
        db.execute_batch("CREATE INDEX audit_time ON audit(time)").unwrap();
        drop(db);
        let s = SqliteStore::open(&path).unwrap();
        // The first schema's unused index on the audit log is gone: the
        // audit query walks the rowid with or without it.
        let indexes: Vec<String> =
            s.db.prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'audit'")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
        assert!(indexes.is_empty(), "{indexes:?}");
        s.register_cluster(
            &NewCluster { id: "c_1", name: "edge-1", users: &[], groups: &[], now: 1 },
            &NewActivation { id: "act_1", code_hash: "h", expires_at: 5 },
        )
        .unwrap();
        s.renew_activation("edge-1", None, &NewActivation { id: "act_2", code_hash: "h2", expires_at: 5 }, 2).unwrap();
        assert_eq!(s.activations("c_1").unwrap()[0].replaced_at, Some(2));
        drop(s);
        assert!(SqliteStore::open(&path).is_ok(), "migrating twice is harmless");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn users_tokens_grants() {
        let (s, dir) = store();
        s.create_user("alice", &["devs".into()], false, "t1", 1).unwrap();
        assert!(matches!(s.create_user("alice", &[], false, "t2", 1), Err(StoreError::Conflict(_))));
        assert_eq!(s.user_by_token("t1").unwrap().unwrap().groups, vec!["devs".to_string()]);
        s.add_grant(&Subject::Group("devs".into()), "edge-*", 1).unwrap();
        assert!(matches!(s.add_grant(&Subject::Group("devs".into()), "edge-*", 1), Err(StoreError::Conflict(_))));
        s.revoke_user("alice", 2).unwrap();
        assert_eq!(s.user_by_token("t1").unwrap(), None);
        std::fs::remove_dir_all(dir).ok();
    }
}
