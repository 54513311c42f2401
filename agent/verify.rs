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
            let stored = crate::localfs::text_path(&a.local_uri);
            let path = stored.as_path();
            // The entry itself: a link in the file's place is not the file.
            let meta = match fs::symlink_metadata(path) {
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
                            path: crate::localfs::readable_line(&a.local_uri),
                            from: a.state,
                            to: State::Archived,
                            reason: format!("superseded by {}", new.id),
                        });
                    }
                    continue;
                }
                _ => continue,
            };
            let msg = format!(
                "{} no longer exists",
                crate::localfs::readable_line(&a.local_uri)
            );
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
                path: crate::localfs::readable_line(&a.local_uri),
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

// ----- the remote side: `fieldsync verify --remote` ------------------------------------

/// Records read per query while checking the remote.
const REMOTE_PAGE: i64 = 100;

/// What `verify --remote` found wrong with one object.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RemoteFinding {
    pub id: String,
    pub key: String,
    pub path: String,
    /// `missing`, `size_mismatch`, `sha256_mismatch`, or `no_sha256` (the object has no
    /// sha256 metadata, so its bytes cannot be vouched for; reported, not changed).
    pub problem: String,
    /// `requeued` (the local copy is intact: uploaded again), or why nothing was done
    /// (`local_copy_gone`, `local_copy_changed`, `none`).
    pub action: String,
}

/// The outcome of one `verify --remote` run.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct RemoteCheck {
    /// Objects checked by this run.
    pub checked: usize,
    pub ok: usize,
    pub requeued: usize,
    pub findings: Vec<RemoteFinding>,
    /// True when every uploaded record was checked; false when the run stopped early
    /// (`stopped` says why) and the next run goes on from where this one stopped.
    pub complete: bool,
    pub stopped: Option<String>,
}

/// Checks every uploaded record's object (existence, size, sha256 metadata) at most
/// `per_second` requests a second, resuming where an interrupted run stopped.
/// `hold` is asked before each request and returns why the run must stop now (uploads are
/// paused: offline, battery, schedule, operator); the run then stops and keeps its place,
/// as it does when the remote fails. An object that is missing or wrong while the local
/// copy is intact (its sha256 matches) is requeued for upload.
pub fn verify_remote(
    store: &mut Store,
    remote: &dyn crate::remote::Remote,
    per_second: f64,
    hold: &dyn Fn(&Store) -> Option<String>,
) -> Result<RemoteCheck, StoreError> {
    let gap = std::time::Duration::from_secs_f64(1.0 / per_second.max(0.01));
    let mut out = RemoteCheck::default();
    let mut after = store.verify_remote_cursor()?;
    let mut last_request: Option<std::time::Instant> = None;
    loop {
        let page = store.page_uploaded(after, REMOTE_PAGE)?;
        if page.is_empty() {
            break;
        }
        for (rowid, a) in page {
            if let Some(why) = hold(store) {
                out.stopped = Some(why);
                return Ok(out);
            }
            if let Some(t) = last_request {
                if let Some(wait) = gap.checked_sub(t.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            last_request = Some(std::time::Instant::now());
            let problem = match remote.head(&a.object_key) {
                Err(e) => {
                    out.stopped = Some(format!("remote: {e}"));
                    return Ok(out);
                }
                Ok(None) => Some("missing"),
                Ok(Some(o)) if o.size != a.size as u64 => Some("size_mismatch"),
                Ok(Some(o)) => match o.sha256 {
                    Some(s) if s != a.sha256 => Some("sha256_mismatch"),
                    Some(_) => None,
                    None => Some("no_sha256"),
                },
            };
            out.checked += 1;
            match problem {
                None => out.ok += 1,
                Some(problem) => {
                    let action = if problem == "no_sha256" {
                        "none".to_string()
                    } else {
                        match local_intact(&a) {
                            Ok(()) => {
                                store.requeue_lost_object(&a.id, &format!("remote_{problem}"))?;
                                out.requeued += 1;
                                "requeued".to_string()
                            }
                            Err(why) => why.to_string(),
                        }
                    };
                    out.findings.push(RemoteFinding {
                        id: a.id.clone(),
                        key: a.object_key.clone(),
                        path: crate::localfs::readable_line(&a.local_uri),
                        problem: problem.to_string(),
                        action,
                    });
                }
            }
            after = rowid;
            store.set_verify_remote_cursor(after)?;
        }
    }
    store.set_verify_remote_cursor(0)?;
    out.complete = true;
    Ok(out)
}

/// Whether the local copy still holds the uploaded bytes (size and sha256).
fn local_intact(a: &crate::store::Attachment) -> Result<(), &'static str> {
    let stored = crate::localfs::text_path(&a.local_uri);
    let path = stored.as_path();
    // The entry itself (a link in the photo's place is not the photo; `hash_file` never
    // reads through one either).
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_file() && m.len() as i64 == a.size => {}
        Ok(_) => return Err("local_copy_changed"),
        Err(_) => return Err("local_copy_gone"),
    }
    match crate::ingest::hash_file(path) {
        Ok((sha, _)) if sha == a.sha256 => Ok(()),
        Ok(_) => Err("local_copy_changed"),
        Err(_) => Err("local_copy_gone"),
    }
}
