//! Change notifications: how a write on one replica reaches every
//! replica's cache.
//!
//! ```text
//!  replica A: UPDATE users ... ──► trigger: pg_notify('uplink_changes', 'users')
//!                                        │ delivered at commit, to every listener
//!  replica B: listener thread ◄──────────┘  (its own connection, LISTEN)
//!               │ Change::Changed / Change::Resync   (bounded channel, coalesced)
//!               ▼
//!             event loop: store.invalidate()  ──► the next read asks PostgreSQL
//!                         tunnels of clusters deregistered elsewhere: GoAway
//! ```
//!
//! A notification is a hint, not data: the cache forgets everything and
//! refills on demand, so a lost or merged notification costs only a
//! query. Notifications are lost while the listener's connection is down;
//! after it comes back it sends `Resync`, and [`REFRESH`] empties the
//! cache periodically in case anything else slipped through.
//!
//! Not here: the triggers (a migration in [`super::postgres`]) and the
//! replica set.

use super::postgres::{CHANNEL, PgConfig};
use ::postgres::fallible_iterator::FallibleIterator;
use std::time::Duration;

/// The safety net: the cache is emptied this often whatever arrives.
pub const REFRESH: Duration = Duration::from_secs(30);

/// What the listener tells the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Another write was committed (ours included).
    Changed,
    /// The listener (re)connected: notifications may have been missed.
    Resync,
}

/// Starts the listener thread; it runs for the life of the process (it
/// holds no state worth a shutdown) and ends when `tx`'s receiver is
/// dropped.
pub fn listen(config: PgConfig, tx: smol::channel::Sender<Change>) -> std::io::Result<()> {
    std::thread::Builder::new().name("store-notify".into()).spawn(move || run(config, tx)).map(|_| ())
}

fn run(config: PgConfig, tx: smol::channel::Sender<Change>) {
    let mut backoff = Duration::from_millis(200);
    let mut first = true;
    loop {
        let mut client = match config.connect_client() {
            Ok(c) => c,
            Err(e) => {
                log::debug!("change listener cannot connect: {e}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")) {
            log::debug!("change listener: LISTEN failed: {e}");
            std::thread::sleep(backoff);
            continue;
        }
        backoff = Duration::from_millis(200);
        if !first && tx.try_send(Change::Resync).is_err() && tx.is_closed() {
            return;
        }
        first = false;
        // Wakes up every second to notice a dead connection or a closed loop.
        loop {
            let next = client.notifications().timeout_iter(Duration::from_secs(1)).next();
            match next {
                Ok(Some(_)) => {
                    // Full means a Changed is already waiting: merge.
                    let _ = tx.try_send(Change::Changed);
                }
                Ok(None) => {}
                Err(e) => {
                    log::warn!("change listener lost its connection: {e}; reconnecting");
                    break;
                }
            }
            if tx.is_closed() {
                return;
            }
            if client.is_closed() {
                log::warn!("change listener lost its connection; reconnecting");
                break;
            }
        }
    }
}
