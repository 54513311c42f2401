//! Deletes: `fieldsync delete ID` and MQTT `cmd/delete` remove a photo everywhere.
//!
//! A request ([`crate::commands::delete`]) makes the row `queued_delete` (one transaction
//! with its `delete_requested` event). The scheduler hands due deletes to the same workers
//! and under the same conditions as uploads (offline, battery, schedule, operator pause:
//! nothing runs while they say no), before uploads, since they are few and asked for by
//! a person. A delete then:
//!
//! 1. aborts the photo's open multipart upload, if any (an upload cancelled mid-way);
//! 2. deletes the remote object (a missing object counts as deleted, so a retry after an
//!    unknown outcome is idempotent; it also removes an object whose upload completed
//!    while the cancel was on its way);
//! 3. deletes the local copy, unless the delete keeps it (`delete_unreferenced_remote`):
//!    only a file inside the capture folder, still the newest record for its path, with the
//!    size and mtime that were hashed (a newer capture at the same path is never touched);
//! 4. records the row `archived` with reason `deleted` (`has_synced` cleared: nothing is in
//!    the remote any more). The delete row stays as the tombstone that keeps rescans from
//!    taking the same bytes at that path again.
//!
//! A crash anywhere before step 4 leaves the row `queued_delete`, and the next start runs
//! the steps again, each harmless twice. An upload that is in flight when its photo is
//! deleted is stopped at its next safe point (the scheduler sets [`Shared::cancel`]) and
//! the delete runs once the worker let go of it.
//!
//! Errors per operation: transient ones (timeouts, 5xx, 429) retry with the upload backoff
//! forever by default; a refusal (403: many buckets let devices write but not delete, so
//! this is not a credentials problem and does not pause the queue) or another 4xx marks the
//! photo `failed` with the reason after `upload.permanent_attempts`. `fieldsync retry`
//! (or `delete` again) retries it as a delete.
//!
//! [`Shared::cancel`]: crate::bus::Shared::cancel

use std::fs;
use std::io;
use std::path::Path;

use tracing::{debug, info, warn};

use crate::bus::Done;
use crate::conditions::governor::Governor;
use crate::config::Upload;
use crate::remote::{ErrorClass, Remote, RemoteError};
use crate::scheduler::Core;
use crate::store::{Attachment, Store, StoreError};
use crate::util::{mtime_ns, now_ms};

/// The reason of the `archived` event that ends an operator's delete.
pub const DELETED: &str = "deleted";
/// The reason of the `archived` event that ends the remote delete of a photo a revised
/// checklist no longer names (`retention.delete_unreferenced_remote`).
pub const UNREFERENCED: &str = "not_in_checklist";

impl Core {
    /// Stops uploads in flight whose photo became `queued_delete` (one primary-key
    /// lookup per running upload).
    pub fn cancel_deleted_uploads(&mut self) -> Result<(), StoreError> {
        let running = self.state.running();
        if running.is_empty() {
            return Ok(());
        }
        for id in self.store.queued_for_delete(&running)? {
            // (A delete in flight is `queued_delete` too; the flag only stops uploads and
            // is cleared when its worker reports.)
            if !self.shared.is_cancelled(&id) {
                debug!(id = %id, "queued for delete while a worker holds it; an upload stops");
                self.shared.cancel(&id, true);
            }
        }
        Ok(())
    }

    /// Hands due deletes to free workers. A delete moves no bytes, so it is admitted as a
    /// zero-byte transfer: the metered budget and size limits never hold it back, the
    /// conditions that stop every transfer do (the caller only fills when they allow).
    pub fn fill_deletes(&mut self) -> Result<(), StoreError> {
        while self.state.free_slots() > 0 {
            let held = self.state.held();
            let due = self
                .store
                .due_deletes(now_ms(), self.state.free_slots(), &held)?;
            if due.is_empty() {
                break;
            }
            for att in due {
                let probe = Attachment {
                    size: 0,
                    bytes_sent: 0,
                    upload_id: None,
                    ..att.clone()
                };
                match self.gov.admit(&self.facts, &probe) {
                    Ok(ticket) => {
                        self.shared.cancel(&att.id, false);
                        self.state.dispatched(&att.id);
                        let _ = self.jobs.send((att, ticket));
                    }
                    Err(why) => {
                        debug!(id = %att.id, reason = why.as_str(), "delete deferred");
                        self.state.defer(&att.id, why);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Runs one delete on a worker thread (blocking: remote requests, file removal).
pub fn perform(
    store: &mut Store,
    remote: &dyn Remote,
    cfg: &Upload,
    gov: &Governor,
    capture: &Path,
    att: &Attachment,
) -> Result<Done, StoreError> {
    let pending = store.pending_delete(&att.id)?;
    let keep_local = pending.as_ref().is_some_and(|p| p.keep_local);
    if let Err(e) = remove_remote(store, remote, att) {
        return failed_attempt(store, cfg, gov, att, e);
    }
    if !keep_local {
        remove_local(store, capture, att)?;
    }
    let reason = if keep_local { UNREFERENCED } else { DELETED };
    store.with_room(|s| s.finish_delete(&att.id, reason))?;
    info!(id = %att.id, key = %att.object_key, keep_local, "deleted");
    Ok(Done::Finished)
}

/// Steps 1 and 2: abort an open multipart upload, delete the object.
fn remove_remote(
    store: &mut Store,
    remote: &dyn Remote,
    att: &Attachment,
) -> Result<(), RemoteError> {
    if let Some(uid) = &att.upload_id {
        remote.abort_upload(&att.object_key, uid)?;
        let _ = store.clear_multipart(&att.id);
        info!(id = %att.id, "aborted the multipart upload of a deleted photo");
    }
    remote.delete(&att.object_key)
}

/// Step 3: the local copy, if it is still the photo that was recorded.
fn remove_local(store: &Store, capture: &Path, att: &Attachment) -> Result<(), StoreError> {
    let stored = crate::localfs::text_path(&att.local_uri);
    if !stored.starts_with(capture) {
        // Enqueued from elsewhere: the operator's file, not ours.
        return Ok(());
    }
    // Never through a link below the capture folder (`crate::localfs`).
    let Ok(real) = crate::localfs::real_path(capture, &stored) else {
        return Ok(());
    };
    let path = real.as_path();
    if store
        .latest_for_path(&att.local_uri)?
        .is_some_and(|l| l.id != att.id)
    {
        return Ok(());
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_file() && m.len() as i64 == att.size && mtime_ns(&m) == att.mtime_ns => {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    // The remote object is gone already; the tombstone keeps the file from
                    // being uploaded again (same size and mtime).
                    warn!(id = %att.id, path = %att.local_uri, error = %e,
                          "cannot delete the local copy of a deleted photo; it stays, never uploaded again");
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn failed_attempt(
    store: &mut Store,
    cfg: &Upload,
    gov: &Governor,
    att: &Attachment,
    e: RemoteError,
) -> Result<Done, StoreError> {
    let class = match &e.class {
        ErrorClass::ClockSkew => {
            store.hold_without_attempt(&att.id, &e.code, &e.message)?;
            return Ok(Done::ClockSkewed);
        }
        ErrorClass::Transient { .. } => {
            gov.network_failed();
            e.class.clone()
        }
        // A refused delete is the bucket's policy for this operation, not the device's
        // credentials (uploads go on): counted like a permanent error.
        _ => ErrorClass::Permanent,
    };
    crate::scheduler::record_failure(store, cfg, att, &class, &e, "delete")?;
    Ok(Done::Finished)
}
