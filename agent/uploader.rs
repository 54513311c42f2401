//! Upload workers: a fixed pool of threads that each take an admitted attachment from the
//! scheduler ([`crate::scheduler`]), move its bytes through the [`Remote`] and record the
//! outcome in the store themselves, then tell the scheduler they are free. Blocking by
//! nature (file reads, hashing, ureq), so plain threads, never the async reactor.

use std::cell::RefCell;
use std::fs;
use std::io;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, info, warn};

use crate::bus::{Done, SchedMsg, Shared};
use crate::conditions::governor::{Governor, Ticket};
use crate::config::Upload;
use crate::ingest::{Ingestor, Outcome};
use crate::localfs::text_path;
use crate::remote::{ErrorClass, Remote, RemoteError, ResumeLog, UploadCtx, UploadJob};

use crate::store::{
    Attachment, Change, EventKind, EventOutcome, PartRecord, State, Store, StoreError,
};
use crate::util::{ctime_ns, mtime_ns, now_ms};

/// Progress is written to the store at most this often per upload (each write is an
/// fsynced transaction; status only needs a few updates per second).
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// What every worker shares.
pub struct WorkerSet {
    pub upload: Upload,
    pub db_path: std::path::PathBuf,
    pub remote: Arc<dyn Remote>,
    pub ingestor: Arc<Ingestor>,
    pub shared: Arc<Shared>,
    pub gov: Arc<Governor>,
}

/// Starts `upload.concurrency` workers, each with its own store connection. They take jobs
/// from the returned sender until it is dropped, and report on `done`.
#[allow(clippy::type_complexity)]
pub fn spawn(
    set: WorkerSet,
    done: UnboundedSender<SchedMsg>,
) -> Result<(mpsc::Sender<(Attachment, Ticket)>, Vec<JoinHandle<()>>), StoreError> {
    let (job_tx, job_rx) = mpsc::channel::<(Attachment, Ticket)>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    let mut handles = Vec::new();
    // Set only at start-up (a rebuild happens before the workers exist).
    let rebuilt_at = Store::open(&set.db_path)?.database_rebuilt()?.map(|r| r.at);
    for n in 0..set.upload.concurrency {
        let w = Worker {
            rebuilt_at,
            cfg: set.upload.clone(),
            store: RefCell::new(Store::open(&set.db_path)?),
            remote: set.remote.clone(),
            ingestor: set.ingestor.clone(),
            shared: set.shared.clone(),
            gov: set.gov.clone(),
        };
        let rx = job_rx.clone();
        let tx = done.clone();
        handles.push(
            thread::Builder::new()
                .name(format!("upload-{n}"))
                .spawn(move || w.run(rx, tx))
                .expect("spawn upload worker"),
        );
    }
    Ok((job_tx, handles))
}

struct Worker {
    cfg: Upload,
    store: RefCell<Store>,
    remote: Arc<dyn Remote>,
    ingestor: Arc<Ingestor>,
    shared: Arc<Shared>,
    /// Admission, rate limit and metered byte count, and evidence of a dead link.
    gov: Arc<Governor>,
    /// When the queue database was last rebuilt (unix ms): photos older than that may
    /// already be in the remote.
    rebuilt_at: Option<i64>,
}

/// Whether to ask the remote for the object before sending it: after an attempt that may
/// have reached it, or for a photo that existed when the database was rebuilt (its old
/// record may have uploaded it under the same name-based key).
pub fn check_before_send(att: &Attachment, rebuilt_at: Option<i64>) -> bool {
    att.attempts > 0
        || att.bytes_sent > 0
        || rebuilt_at.is_some_and(|at| att.mtime_ns / 1_000_000 <= at)
}

/// Persists multipart resume state through the worker's store connection.
struct StoreResume<'a> {
    store: &'a RefCell<Store>,
    id: &'a str,
}

/// A resume record the queue database would not take (locked by another writer, disk
/// full): the attempt stops and is retried with backoff like a network error.
fn store_error(what: &str, e: &dyn std::fmt::Display) -> RemoteError {
    RemoteError::transient("store_error", format!("{what}: {e}"))
}

impl ResumeLog for StoreResume<'_> {
    fn current(&self) -> Option<(String, u64)> {
        let a = self.store.borrow().get(self.id).ok().flatten()?;
        Some((a.upload_id?, a.part_size? as u64))
    }
    fn parts(&self) -> Vec<PartRecord> {
        self.store.borrow().parts(self.id).unwrap_or_default()
    }
    fn begin(&mut self, upload_id: &str, part_size: u64) -> Result<(), RemoteError> {
        self.store
            .borrow_mut()
            .begin_multipart(self.id, upload_id, part_size)
            .map_err(|e| store_error("cannot record the multipart upload id", &e))
    }
    fn part_done(&mut self, part: &PartRecord) -> Result<(), RemoteError> {
        self.store
            .borrow_mut()
            .part_done(self.id, part)
            .map_err(|e| store_error("cannot record an uploaded part", &e))
    }
    fn clear(&mut self) {
        let _ = self.store.borrow_mut().clear_multipart(self.id);
    }
}

impl Worker {
    fn run(self, jobs: Arc<Mutex<Receiver<(Attachment, Ticket)>>>, tx: UnboundedSender<SchedMsg>) {
        loop {
            let job = {
                let rx = jobs.lock().unwrap_or_else(|e| e.into_inner());
                rx.recv()
            };
            let Ok((att, ticket)) = job else { return };
            let id = att.id.clone();
            let outcome = match self.process(att, &ticket) {
                Ok(o) => o,
                Err(e) => {
                    warn!(id = %id, error = %e, "store error while uploading; will retry");
                    Done::StoreFailed
                }
            };
            let _ = self.store.borrow().set_uploading(&id, false);
            // Releases the file's metered reservation before the scheduler looks again.
            drop(ticket);
            if tx.send(SchedMsg::Done { id, outcome }).is_err() {
                return;
            }
        }
    }

    fn process(&self, mut att: Attachment, ticket: &Ticket) -> Result<Done, StoreError> {
        if att.state == State::QueuedDownload {
            return crate::downloader::Downloader {
                cfg: &self.cfg,
                store: &self.store,
                remote: &*self.remote,
                shared: &self.shared,
                gov: &self.gov,
            }
            .process(&att, ticket);
        }
        if att.state == State::QueuedDelete {
            return crate::deletes::perform(
                &mut self.store.borrow_mut(),
                &*self.remote,
                &self.cfg,
                &self.gov,
                self.ingestor.capture(),
                &att,
            );
        }
        // Every read is of the real path below the capture folder, never through a link
        // (`crate::localfs`); a vanished folder shows up as the file missing.
        let stored = text_path(&att.local_uri);
        let real = self.ingestor.real_path(&stored).unwrap_or(stored);
        let path = real.as_path();
        if att.sha256.is_empty() {
            // Unreadable at ingest and requeued by an operator: hash it now.
            match crate::ingest::hash_file(path) {
                Ok((sha, n)) => {
                    let mtime = fs::symlink_metadata(path)
                        .map(|m| mtime_ns(&m))
                        .unwrap_or(0);
                    self.store
                        .borrow()
                        .set_hash(&att.id, &sha, n as i64, mtime)?;
                    att.sha256 = sha;
                    att.size = n as i64;
                    att.mtime_ns = mtime;
                }
                Err(e) => {
                    return self.failed_attempt(&att, crate::remote::file::local_read_error(e))
                }
            }
        }
        // The file must still be the one we hashed (the entry itself: a link put in its
        // place is not it).
        let before = match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.archive_deleted(&att)?;
                return Ok(Done::Finished);
            }
            Ok(m) if m.len() as i64 != att.size || mtime_ns(&m) != att.mtime_ns => {
                self.reingest(&att);
                return Ok(Done::Finished);
            }
            Ok(m) => Some(m),
            Err(_) => None,
        };
        // No write since ingest (ctime unchanged): the remote need not hash it again.
        let verified = before
            .as_ref()
            .is_some_and(|m| att.ctime_ns == Some(ctime_ns(m)));

        // A previous attempt may have reached the remote without us learning it: check
        // before sending the whole file again.
        if check_before_send(&att, self.rebuilt_at) {
            match self.remote.head(&att.object_key) {
                // Only a checksum match counts: a same-sized object with other bytes is
                // overwritten by the upload below.
                Ok(Some(obj))
                    if obj.size == att.size as u64
                        && obj.sha256.as_deref() == Some(att.sha256.as_str()) =>
                {
                    self.mark_synced(&att, obj.etag.as_deref(), "already_present")?;
                    // Found by the rebuild's rescan (a record made since, for a file older
                    // than the rebuild, that sent nothing): the lost record is restored,
                    // even when its first attempts failed (a refused or unreachable remote).
                    let found_by_rebuild = self
                        .rebuilt_at
                        .is_some_and(|at| att.created_at >= at && att.mtime_ns / 1_000_000 <= at);
                    if found_by_rebuild && att.bytes_sent == 0 {
                        let s = self.store.borrow();
                        s.log_event(
                            EventKind::Repaired,
                            EventOutcome::Applied,
                            s.get(&att.id)?.as_ref(),
                            Some("already_in_remote"),
                        )?;
                    }
                    return Ok(Done::Finished);
                }
                // The remote is busy or unreachable: the question is asked again on the
                // retry rather than answered by sending the whole file (bytes a metered
                // link pays for, likely refused the same way). Other refusals (a backend
                // that cannot presign a HEAD) leave it to the upload.
                Err(e) if matches!(e.class, ErrorClass::Transient { .. }) => {
                    return self.failed_attempt(&att, e);
                }
                _ => {}
            }
        }

        let job = UploadJob {
            id: att.id.clone(),
            key: att.object_key.clone(),
            path: path.to_path_buf(),
            size: att.size as u64,
            sha256: att.sha256.clone(),
            media_type: att.media_type.clone(),
            verified,
        };
        let mut last_write = Instant::now();
        let mut progress = |n: u64| {
            if last_write.elapsed() >= PROGRESS_EVERY {
                last_write = Instant::now();
                let _ = self.store.borrow().set_progress(&att.id, n as i64);
            }
        };
        let shared = self.shared.clone();
        let id = att.id.clone();
        let keep_going =
            move || shared.keep_going() && ticket.may_continue() && !shared.is_cancelled(&id);
        let mut resume = StoreResume {
            store: &self.store,
            id: &att.id,
        };
        let started = Instant::now();
        let result = self.remote.upload(
            &job,
            &mut UploadCtx {
                progress: &mut progress,
                keep_going: &keep_going,
                throttle: &|n| ticket.throttle(n),
                resume: &mut resume,
            },
        );
        match result {
            Ok(up) => {
                if verified && !self.still_unchanged(&att) {
                    // Written to while it was sent: what the remote holds is not provably
                    // the ingested bytes. Remove it and take the new version.
                    warn!(id = %att.id, "file changed during upload; re-ingesting");
                    let _ = self.remote.delete(&att.object_key);
                    self.reingest(&att);
                    return Ok(Done::Finished);
                }
                let secs = started.elapsed().as_secs_f64();
                info!(id = %att.id, key = %att.object_key, bytes = att.size,
                      mb_per_s = format!("{:.1}", up.bytes_sent as f64 / 1e6 / secs.max(1e-6)),
                      "uploaded");
                self.mark_synced(&att, up.etag.as_deref(), "uploaded")?;
                Ok(Done::Finished)
            }
            Err(e) => self.failed_attempt(&att, e),
        }
    }

    /// After a refusal (401/403, an expired session token): re-reads the credentials
    /// from their files; true when they changed, so the refusal may be stale.
    fn credentials_rotated(&self) -> bool {
        match self.remote.reload_credentials(None) {
            Ok(changed) => {
                if changed {
                    info!("remote refused the old credentials; retrying with the re-read ones");
                }
                changed
            }
            Err(e) => {
                warn!(error = %e, "cannot re-read the credentials");
                false
            }
        }
    }

    fn failed_attempt(&self, att: &Attachment, e: RemoteError) -> Result<Done, StoreError> {
        // Deleted while it was sent: the delete decides what happens now, not this error.
        if !matches!(e.class, ErrorClass::Interrupted)
            && self
                .store
                .borrow()
                .get(&att.id)?
                .is_some_and(|a| a.state == State::QueuedDelete)
        {
            return Ok(Done::Interrupted);
        }
        match &e.class {
            ErrorClass::Interrupted => {
                debug!(id = %att.id, "upload stopped at a safe point");
                Ok(Done::Interrupted)
            }
            ErrorClass::LocalMissing => {
                self.archive_deleted(att)?;
                Ok(Done::Finished)
            }
            ErrorClass::LocalChanged => {
                warn!(id = %att.id, error = %e, "file changed since it was hashed; re-ingesting");
                self.reingest(att);
                Ok(Done::Finished)
            }
            ErrorClass::Auth if self.credentials_rotated() => {
                // A rotated credentials or token file: try again with the new ones.
                self.store
                    .borrow_mut()
                    .schedule_retry(&att.id, now_ms(), &e.code, &e.message)?;
                Ok(Done::Finished)
            }
            ErrorClass::Auth => {
                // Not the file's fault: keep the attempt budget, pause the queue.
                self.store
                    .borrow_mut()
                    .schedule_retry(&att.id, now_ms(), &e.code, &e.message)?;
                Ok(Done::AuthFailed)
            }
            ErrorClass::ClockSkew => {
                // The device clock, not the file: no attempt used, nothing failed.
                warn!(id = %att.id, error = %e, "remote refused the device clock; upload waits");
                self.store
                    .borrow_mut()
                    .hold_without_attempt(&att.id, &e.code, &e.message)?;
                Ok(Done::ClockSkewed)
            }
            class => {
                if matches!(class, ErrorClass::Transient { .. }) {
                    // Every failed request is evidence the link may be down.
                    self.gov.network_failed();
                }
                crate::scheduler::record_failure(
                    &mut self.store.borrow_mut(),
                    &self.cfg,
                    att,
                    class,
                    &e,
                    "upload",
                )?;
                Ok(Done::Finished)
            }
        }
    }

    /// After an upload sent without re-hashing: true if the file is provably still the
    /// ingested one (ctime unchanged), or, if its ctime moved (a chmod, a touch), its bytes
    /// still hash to the ingest sha256.
    fn still_unchanged(&self, att: &Attachment) -> bool {
        let stored = text_path(&att.local_uri);
        let path = self.ingestor.real_path(&stored).unwrap_or(stored);
        match fs::symlink_metadata(&path) {
            Ok(m) if att.ctime_ns == Some(ctime_ns(&m)) => true,
            Ok(_) => crate::ingest::hash_file(&path).is_ok_and(|(sha, _)| sha == att.sha256),
            // Deleted since: an unlink does not change bytes already read, and deleting
            // the object would lose the only copy.
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(_) => false,
        }
    }

    fn mark_synced(
        &self,
        att: &Attachment,
        etag: Option<&str>,
        reason: &str,
    ) -> Result<(), StoreError> {
        // The bytes are in the remote: record it even on a full disk.
        let r = self.store.borrow_mut().with_room(|s| {
            s.transition(
                &att.id,
                State::Synced,
                Change {
                    reason: Some(reason),
                    etag,
                    ..Change::of(EventKind::Uploaded)
                },
            )
        });
        match r {
            // Deleted while the last part was on its way: the delete removes the object.
            Err(StoreError::BadTransition {
                from: State::QueuedDelete,
                ..
            }) => Ok(()),
            r => r.map(|_| ()),
        }
    }

    fn archive_deleted(&self, att: &Attachment) -> Result<(), StoreError> {
        info!(id = %att.id, path = %att.local_uri, "file deleted before upload; archived");
        self.store.borrow_mut().transition(
            &att.id,
            State::Archived,
            Change {
                reason: Some("deleted_before_upload"),
                ..Change::of(EventKind::Archived)
            },
        )?;
        Ok(())
    }

    /// The bytes changed after ingest: hash again; a new version supersedes this one.
    fn reingest(&self, att: &Attachment) {
        let path = text_path(&att.local_uri);
        let assignment = (att.checklist.clone(), att.row.clone());
        let outcome = self
            .ingestor
            .rehash(&mut self.store.borrow_mut(), &path, assignment);
        match outcome {
            Ok(Outcome::Enqueued(new)) => {
                info!(old = %att.id, new = %new.id, "file changed after ingest; new version queued")
            }
            Ok(Outcome::Missing) => {
                let _ = self.archive_deleted(att);
            }
            Ok(Outcome::Refused(why)) => {
                // A link (or a FIFO) now stands where the photo was: it is never read, and
                // the record must not be taken again and again.
                warn!(id = %att.id, reason = %why, "photo replaced by a file that is not read");
                let _ = self.store.borrow_mut().transition(
                    &att.id,
                    State::Failed,
                    Change {
                        // The code is the record's; the message is the rest.
                        error: Some((
                            "not_regular_file",
                            why.strip_prefix("not_regular_file: ").unwrap_or(&why),
                        )),
                        ..Change::of(EventKind::Failed)
                    },
                );
            }
            Ok(other) => debug!(id = %att.id, ?other, "re-ingest"),
            Err(e) => warn!(id = %att.id, error = %e, "re-ingest failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_first_after_an_attempt_or_for_photos_older_than_a_rebuild() {
        let mut s = Store::open_in_memory().unwrap();
        let a = s
            .insert(
                &crate::store::NewAttachment {
                    id: "a".into(),
                    filename: "a.jpg".into(),
                    local_uri: "/c/a.jpg".into(),
                    size: 1,
                    media_type: "image/jpeg".into(),
                    meta_data: None,
                    checklist: "c".into(),
                    row: "r".into(),
                    sha256: "00".into(),
                    mtime_ns: 5_000_000_000,
                    object_key: "k".into(),
                    ctime_ns: None,
                    state: State::QueuedUpload,
                    error: None,
                },
                None,
            )
            .unwrap();
        assert!(!check_before_send(&a, None));
        assert!(check_before_send(&a, Some(5_000)));
        // Captured after the rebuild: it cannot have been uploaded before.
        assert!(!check_before_send(&a, Some(4_999)));
        assert!(check_before_send(
            &Attachment {
                attempts: 1,
                ..a.clone()
            },
            None
        ));
        assert!(check_before_send(&Attachment { bytes_sent: 1, ..a }, None));
    }
}
