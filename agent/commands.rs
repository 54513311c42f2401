//! Operator commands shared by the CLI and MQTT `cmd/<name>`: one store path for both,
//! so a command behaves the same wherever it comes from. Each is one small write that a
//! running daemon notices through `PRAGMA data_version` within a second.

use crate::store::{Store, StoreError};
use crate::uploader::control;
use crate::util::now_ms;

/// Pauses uploads (ingest goes on). `source` is recorded in the event log (`cli`, `mqtt`).
pub fn pause(store: &Store, source: &str) -> Result<(), StoreError> {
    store.control_set(control::PAUSED, "1")?;
    store.log_event("pause_requested", "applied", None, Some(source))
}

/// Resumes uploads paused by [`pause`].
pub fn resume(store: &Store, source: &str) -> Result<(), StoreError> {
    store.control_set(control::PAUSED, "0")?;
    store.log_event("resume_requested", "applied", None, Some(source))
}

/// Requeues one failed attachment, or all of them; returns the ids requeued.
pub fn retry(store: &mut Store, id: Option<&str>) -> Result<Vec<String>, StoreError> {
    let ids = store.retry_failed(id)?;
    wake(store)?;
    Ok(ids)
}

/// Makes every waiting retry due now and wakes the scheduler.
pub fn sync(store: &Store) -> Result<(), StoreError> {
    store.conn().execute(
        "UPDATE attachments SET next_attempt_at=0 WHERE state='queued_upload'",
        [],
    )?;
    wake(store)
}

/// Wakes the scheduler (any change to the database does; this one is explicit).
pub fn wake(store: &Store) -> Result<(), StoreError> {
    store.control_set(control::WAKE, &now_ms().to_string())
}
