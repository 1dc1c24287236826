//! The audit writer both backends share: a bounded queue in front of a
//! thread of the backend's own that commits entries in batches, so a
//! proxied request never waits on a commit. Not the batching or the SQL:
//! each backend's thread (`sqlite::audit_thread`, `postgres::audit_thread`)
//! gathers and writes in its own way.

use super::{AuditEntry, Result, StoreError};
use std::sync::mpsc;

/// Entries queued for the audit thread before `append_audit` waits.
const AUDIT_QUEUE: usize = 4096;
/// Most entries written in one transaction.
pub(super) const AUDIT_BATCH: usize = 512;
/// How long the writer gathers entries before committing them.
pub(super) const AUDIT_GATHER: std::time::Duration = std::time::Duration::from_millis(20);

pub(super) enum AuditMsg {
    Entry(AuditEntry),
    /// Answered once everything queued before it is committed (or the
    /// database refused it).
    Flush(mpsc::Sender<()>),
}

/// The audit thread's queue; dropping it commits what is queued and
/// joins the thread.
pub(super) struct AuditWriter {
    tx: Option<mpsc::SyncSender<AuditMsg>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AuditWriter {
    /// Starts `thread`, the backend's writer, on the receiving end.
    pub(super) fn start(thread: impl FnOnce(mpsc::Receiver<AuditMsg>) + Send + 'static) -> Result<Self> {
        let (tx, rx) = mpsc::sync_channel(AUDIT_QUEUE);
        let thread = std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || thread(rx))
            .map_err(|e| StoreError::Backend(format!("cannot start the audit writer: {e}")))?;
        Ok(AuditWriter { tx: Some(tx), thread: Some(thread) })
    }

    pub(super) fn send(&self, msg: AuditMsg) -> Result<()> {
        let tx = self.tx.as_ref().ok_or_else(|| StoreError::Backend("audit writer stopped".into()))?;
        tx.send(msg).map_err(|_| StoreError::Backend("audit writer stopped".into()))
    }

    /// Waits until every entry appended so far is committed.
    pub(super) fn flush(&self) -> Result<()> {
        let (done, wait) = mpsc::channel();
        self.send(AuditMsg::Flush(done))?;
        wait.recv().map_err(|_| StoreError::Backend("audit writer stopped".into()))
    }
}

impl Drop for AuditWriter {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
