//! Start-up verification and repair (also `fieldsync verify`).
//!
//! Moves every record to a state that is true now: a worker marker left by a process that
//! died is cleared (the upload resumes from its persisted parts), a file whose bytes changed
//! is re-ingested as a new version, and a record whose local file vanished is settled:
//!
//! - synced, file gone → `archived` (`file_missing`): the remote has it; nothing is lost.
//! - never uploaded, file gone → `failed` (`file_missing`), not `archived`: after a gap we
//!   did not observe (crash, power cut, card swap) we cannot tell a deliberate delete from
//!   a lost photo, and a lost photo must stay visible to the operator until they decide.
//!   (A delete the running daemon sees happen is the app's choice: `archived`,
//!   `deleted_before_upload`.)

use std::fs;
use std::io;
use std::path::Path;

use serde::Serialize;

use crate::ingest::{Ingestor, Outcome};
use crate::store::{Change, EventKind, EventOutcome, State, Store, StoreError};
use crate::util::mtime_ns;

/// Records checked per query: bounds start-up memory on a device with a long history.
const PAGE: i64 = 500;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Repair {
    pub id: String,
    pub path: String,
    pub from: State,
    pub to: State,
    pub reason: String,
}

/// Checks every live record against the file system and repairs what is not true.
pub fn repair(store: &mut Store, ingestor: &Ingestor) -> Result<Vec<Repair>, StoreError> {
    let mut out = Vec::new();
    store.clear_uploading()?;
    let mut after = 0;
    loop {
        let (page, last) =
            store.page_in_states(&[State::QueuedUpload, State::Synced], after, PAGE)?;
        if page.is_empty() {
            break;
        }
        after = last;
        for a in page {
            let path = Path::new(&a.local_uri);
            let meta = match fs::metadata(path) {
                Ok(m) => Some(m),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                // Unreadable metadata is not proof of absence; the uploader reports it.
                Err(_) => continue,
            };
            // A downloaded file whose copy vanished: the device must hold it, fetch again.
            let assigned =
                meta.is_none() && a.state == State::Synced && store.is_assignment(&a.id)?;
            let (to, reason) = match (&meta, a.state) {
                (None, State::Synced) if assigned => (State::QueuedDownload, "local_copy_missing"),
                (None, State::Synced) => (State::Archived, "file_missing"),
                (None, _) => (State::Failed, "file_missing"),
                (Some(m), State::QueuedUpload)
                    if m.len() as i64 != a.size || mtime_ns(m) != a.mtime_ns =>
                {
                    if let Ok(Outcome::Enqueued(new)) =
                        ingestor.ingest_as(store, path, (a.checklist.clone(), a.row.clone()))
                    {
                        out.push(Repair {
                            id: a.id.clone(),
                            path: a.local_uri.clone(),
                            from: a.state,
                            to: State::Archived,
                            reason: format!("superseded by {}", new.id),
                        });
                    }
                    continue;
                }
                _ => continue,
            };
            let msg = format!("{} no longer exists", a.local_uri);
            store.transition(
                &a.id,
                to,
                Change {
                    reason: Some(reason),
                    error: (to == State::Failed).then_some((reason, msg.as_str())),
                    ..Change::of(if to == State::Failed {
                        EventKind::Failed
                    } else if to == State::QueuedDownload {
                        EventKind::Enqueued
                    } else {
                        EventKind::Archived
                    })
                },
            )?;
            out.push(Repair {
                id: a.id,
                path: a.local_uri,
                from: a.state,
                to,
                reason: reason.into(),
            });
        }
    }
    for r in &out {
        store.log_event(
            EventKind::Repaired,
            EventOutcome::Applied,
            store.get(&r.id)?.as_ref(),
            Some(&r.reason),
        )?;
    }
    Ok(out)
}
