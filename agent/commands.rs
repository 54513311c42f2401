//! Operator commands shared by the CLI and MQTT `cmd/<name>`: one store path for both,
//! so a command behaves the same wherever it comes from. Each is one small write; the CLI
//! then touches the wake file, which a running daemon watches (inotify), so it takes effect
//! at once (`PRAGMA data_version`, checked every 5 s, is the backstop).

use crate::store::{DeleteRequest, EventKind, EventOutcome, Store, StoreError};
use crate::util::now_ms;

/// Pauses uploads (ingest goes on). `source` is recorded in the event log (`cli`, `mqtt`).
pub fn pause(store: &Store, source: &str) -> Result<(), StoreError> {
    store.set_operator_paused(true)?;
    store.log_event(
        EventKind::PauseRequested,
        EventOutcome::Applied,
        None,
        Some(source),
    )?;
    wake(store)
}

/// Resumes uploads paused by [`pause`].
pub fn resume(store: &Store, source: &str) -> Result<(), StoreError> {
    store.set_operator_paused(false)?;
    store.log_event(
        EventKind::ResumeRequested,
        EventOutcome::Applied,
        None,
        Some(source),
    )?;
    wake(store)
}

/// Requeues one failed attachment, or all of them; returns the ids requeued.
pub fn retry(store: &mut Store, id: Option<&str>) -> Result<Vec<String>, StoreError> {
    let ids = store.retry_failed(id)?;
    wake(store)?;
    Ok(ids)
}

/// Removes a photo everywhere (`fieldsync delete ID`, MQTT `cmd/delete`): it becomes
/// `queued_delete` and the daemon deletes the remote object, then the local copy
/// ([`crate::deletes`]); a photo still `queued_upload` has its upload cancelled. `source`
/// is recorded in the event log.
pub fn delete(store: &mut Store, id: &str, source: &str) -> Result<DeleteRequest, StoreError> {
    let r = store.request_delete(id, source, false)?;
    wake(store)?;
    Ok(r)
}

/// What [`delete`] tells the operator.
pub fn describe_delete(r: &DeleteRequest) -> String {
    let a = &r.attachment;
    match r.from {
        crate::store::State::QueuedUpload => format!(
            "{} ({}): upload cancelled; queued for delete",
            a.id, a.filename
        ),
        from => format!("{} ({}, {from}): queued for delete", a.id, a.filename),
    }
}

/// Makes every waiting retry due now and wakes the scheduler.
pub fn sync(store: &Store) -> Result<(), StoreError> {
    store.make_retries_due()?;
    wake(store)
}

/// Wakes a running daemon now: touches the wake file it watches. (Its periodic look at
/// `PRAGMA data_version` would notice the change too, but only within seconds.)
pub fn wake(store: &Store) -> Result<(), StoreError> {
    let now = now_ms();
    store.set_wake_requested_at(now)?;
    if let Some(f) = store.wake_file() {
        // Best effort: a CLI user without write access to the state dir still gets the
        // change applied, just later.
        let _ = std::fs::write(f, now.to_string());
    }
    Ok(())
}

/// Asks the running daemon to re-read its configuration and secret files (`fieldsync
/// reload`); returns the request's event sequence number, after which the daemon's
/// `config_reloaded` event tells how it went.
pub fn reload(store: &mut Store, source: &str) -> Result<i64, StoreError> {
    let seq = store.request_reload(source)?;
    wake(store)?;
    Ok(seq)
}
