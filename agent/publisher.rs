//! Publisher: uploads a checklist's manifest once every photo it names is `synced`.
//!
//! The app declares a checklist finished by writing `<checklist folder>/checklist.json`:
//! rows, their fields, and the photo file names of each row. Once every named photo is
//! confirmed in remote storage, the publisher uploads that JSON enriched with each photo's
//! object key, size, sha256 and upload time to `<prefix>/<device>/<checklist>/manifest.json`
//! and logs `checklist_published`. A backend that sees the manifest can rely on every photo
//! it names being present. A changed checklist.json republishes; the same content twice is
//! a no-op. Photos of the checklist that it does not name are archived once it is
//! published (kept locally and in the log); with `retention.delete_unreferenced_remote`
//! their remote objects are deleted ([`crate::deletes`], the local copy stays). A
//! malformed checklist.json is reported (`checklist_invalid`) and the photos upload
//! regardless.
//!
//! A named photo counts as present once its upload was confirmed, even when its local copy
//! was evicted since ([`crate::checklists::classify`]). Every check stores the checklist's
//! progress for `status` (`checklists[]`) and reports a wait longer than
//! `upload.checklist_alarm_after` once as `checklist_stalled`.
//!
//! Runs as its own task, each turn off the reactor: publishing is a network request and
//! must not hold up the scheduler.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::bus::LoopBeat;
pub use crate::bus::PublishMsg;
use crate::checklists::{classify, Photo, Progress};

use crate::ingest::{Layout, CHECKLIST_FILE};
use crate::localfs::text_path;
use crate::remote::{key_component, Remote};
use crate::store::{
    Attachment, Change, ChecklistRecord, EventKind, EventOutcome, ListFilter, State, Store,
    StoreError,
};
use crate::util::{hex, rfc3339};

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Published {
        key: String,
    },
    /// Same content as the last publication.
    Unchanged,
    /// Named photos not yet synced (or not yet captured).
    Waiting {
        missing: usize,
    },
    NoChecklist,
    Invalid(String),
    /// The checklist.json changed less than `settle` ago (the app may still be writing
    /// it): not parsed yet, looked at again once it has been quiet that long.
    Settling,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("upload manifest {key}: {message}")]
    Remote { key: String, message: String },
}

pub struct Publisher {
    pub capture: PathBuf,
    pub layout: Layout,
    pub prefix: String,
    pub device: String,
    pub remote: Arc<dyn Remote>,
    /// `ingest.settle`: a checklist.json is parsed only once its size and mtime held this
    /// long, the rule photos are taken by.
    pub settle: Duration,
    /// `upload.checklist_alarm_after`: a checklist waiting longer is reported once.
    pub stall_after: Option<Duration>,
    /// `retention.delete_unreferenced_remote`, as in force now (a reload may change it).
    pub delete_unreferenced_remote: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl Publisher {
    /// The checklist.json of a checklist, if the layout places checklists in folders.
    pub fn checklist_file(&self, checklist: &str) -> Option<PathBuf> {
        self.layout
            .checklist_dir(&self.capture, checklist)
            .map(|d| d.join(CHECKLIST_FILE))
    }

    pub fn manifest_key(&self, checklist: &str) -> String {
        let mut parts = Vec::new();
        let p = self.prefix.trim_matches('/');
        if !p.is_empty() {
            parts.push(p.to_string());
        }
        parts.push(key_component(&self.device));
        parts.push(key_component(checklist));
        parts.push("manifest.json".into());
        parts.join("/")
    }

    /// Every checklist that has a checklist.json (start-up and periodic passes).
    pub fn all_checklists(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.layout
            .each_checklist_dir(&self.capture, &mut |name, dir| {
                if dir.join(CHECKLIST_FILE).is_file() {
                    out.push(name);
                }
            });
        out
    }

    /// Publishes `checklist` if it is complete and changed since the last publication.
    pub fn check(&self, store: &mut Store, checklist: &str) -> Result<Outcome, PublishError> {
        let Some(path) = self.checklist_file(checklist) else {
            return Ok(Outcome::NoChecklist);
        };
        let bytes = match self.read_settled(&path) {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(Outcome::Settling),
            Err(e) => {
                if let Some(r) = crate::localfs::refused(&e) {
                    // A link (or a FIFO) is never read: no manifest from outside the
                    // capture folder.
                    let why = format!("not_regular_file: {}; not read", r.what);
                    return self.invalid(store, checklist, &path, why.as_bytes(), &why);
                }
                store.remove_checklist_record(checklist)?;
                return Ok(Outcome::NoChecklist);
            }
        };
        let doc: Value = match serde_json::from_slice(&bytes) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                return self.invalid(store, checklist, &path, &bytes, "expected a JSON object")
            }
            Err(e) => return self.invalid(store, checklist, &path, &bytes, &e.to_string()),
        };
        let rows = match doc.get("rows").and_then(Value::as_array) {
            Some(r) => r.clone(),
            None => {
                return self.invalid(store, checklist, &path, &bytes, "expected a `rows` array")
            }
        };

        // Resolve every named photo to its current record.
        let records = store.list(&ListFilter {
            checklist: Some(checklist.to_string()),
            ..Default::default()
        })?;
        let tombstones = store.tombstones_in(checklist)?;
        let mut named: HashSet<String> = HashSet::new();
        let mut progress = Progress::new(checklist);
        let mut out_rows = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let Some(obj) = row.as_object() else {
                return self.invalid(
                    store,
                    checklist,
                    &path,
                    &bytes,
                    &format!("rows[{i}]: expected an object"),
                );
            };
            let Some(row_id) = obj.get("id").and_then(Value::as_str) else {
                return self.invalid(
                    store,
                    checklist,
                    &path,
                    &bytes,
                    &format!("rows[{i}]: expected a string `id`"),
                );
            };
            let photos: Vec<&str> = match obj.get("photos") {
                None => Vec::new(),
                Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
                    a.iter().filter_map(Value::as_str).collect()
                }
                Some(_) => {
                    return self.invalid(
                        store,
                        checklist,
                        &path,
                        &bytes,
                        &format!("rows[{i}].photos: expected an array of file names"),
                    )
                }
            };
            let mut attachments = Vec::new();
            for photo in photos {
                let current = records
                    .iter()
                    .filter(|a| a.row == row_id && a.filename == photo)
                    .max_by_key(|a| a.created_at);
                let local =
                    current.is_some_and(|a| fs::symlink_metadata(text_path(&a.local_uri)).is_ok());
                let tomb = current.is_some_and(|a| tombstones.contains(&a.id));
                let what = classify(current, local, tomb);
                match (&what, current) {
                    (Photo::Present, Some(a)) => {
                        named.insert(a.id.clone());
                        attachments.push(attachment_json(a));
                    }
                    (Photo::Restore | Photo::Requeue, Some(a)) => {
                        // Referenced again (a revised checklist): back to where it was.
                        let to = if what == Photo::Restore {
                            State::Synced
                        } else {
                            State::QueuedUpload
                        };
                        let a = store.transition(
                            &a.id,
                            to,
                            Change {
                                reason: Some("referenced_by_checklist"),
                                ..Change::of(EventKind::Restored)
                            },
                        )?;
                        named.insert(a.id.clone());
                        if to == State::Synced {
                            attachments.push(attachment_json(&a));
                        }
                    }
                    (_, Some(a)) => {
                        named.insert(a.id.clone());
                    }
                    _ => {}
                }
                progress.add(photo, &what);
            }
            let mut r: Map<String, Value> = obj.clone();
            r.insert("attachments".into(), Value::Array(attachments));
            out_rows.push(Value::Object(r));
        }
        if !progress.complete() {
            let missing = progress.waiting_for.len();
            self.record_waiting(store, progress)?;
            return Ok(Outcome::Waiting { missing });
        }

        let mut manifest = doc.as_object().cloned().unwrap_or_default();
        manifest.insert("rows".into(), Value::Array(out_rows));
        manifest.insert(
            "fieldsync".into(),
            json!({ "device_id": self.device, "checklist": checklist }),
        );
        // The content hash excludes the publication time, so the same content is a no-op.
        let content = serde_json::to_vec(&manifest).expect("serialisable");
        let digest = hex(&Sha256::digest(&content));
        if store.published_checklist(checklist)?.as_deref() == Some(digest.as_str()) {
            // Published before this record existed (an older version): the time is now.
            let at = store
                .checklist_record(checklist)?
                .and_then(|r| r.published_at)
                .unwrap_or_else(crate::util::now_ms);
            self.record_published(store, progress, at)?;
            return Ok(Outcome::Unchanged);
        }
        let published_at = crate::util::now_ms();
        manifest
            .get_mut("fieldsync")
            .and_then(Value::as_object_mut)
            .expect("inserted above")
            .insert("published_at".into(), json!(rfc3339(published_at)));
        let body = serde_json::to_vec_pretty(&manifest).expect("serialisable");
        let key = self.manifest_key(checklist);
        self.remote
            .put_bytes(&key, &body, "application/json")
            .map_err(|e| PublishError::Remote {
                key: key.clone(),
                message: e.to_string(),
            })?;
        store.set_published_checklist(checklist, &digest)?;
        store.log_event_for(
            EventKind::ChecklistPublished,
            EventOutcome::Applied,
            Some(checklist),
            Some(&key),
        )?;
        info!(checklist, key = %key, "checklist published");
        self.record_published(store, progress, published_at)?;

        // Photos of this checklist it does not name are no longer referenced.
        let delete_remote = (self.delete_unreferenced_remote)();
        let mut deleted = 0;
        for a in records.iter().filter(|a| {
            !named.contains(&a.id) && matches!(a.state, State::Synced | State::QueuedUpload)
        }) {
            if delete_remote && a.state == State::Synced && a.has_synced {
                // `retention.delete_unreferenced_remote`: the object goes, the local copy
                // stays (archived, as without the option).
                store.request_delete(&a.id, "checklist", true)?;
                deleted += 1;
                continue;
            }
            store.transition(
                &a.id,
                State::Archived,
                Change {
                    reason: Some("not_in_checklist"),
                    ..Change::of(EventKind::Archived)
                },
            )?;
        }
        if deleted > 0 {
            crate::commands::wake(store)?;
        }
        Ok(Outcome::Published { key })
    }

    /// The bytes of a checklist.json under the rule of [`crate::localfs`] (never through a
    /// link), or `None` while it is still settling: changed less than `settle` ago, or
    /// while it was read.
    fn read_settled(&self, path: &Path) -> std::io::Result<Option<Vec<u8>>> {
        use std::io::Read;
        let lmeta = fs::symlink_metadata(path)?;
        if let Some(what) = crate::localfs::odd_kind(&lmeta) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                crate::localfs::Refused {
                    path: path.display().to_string(),
                    what,
                },
            ));
        }
        let mut f = crate::localfs::open_regular(&crate::localfs::real_path(&self.capture, path)?)?;
        let before = f.metadata()?;
        let age = std::time::SystemTime::now()
            .duration_since(before.modified()?)
            .unwrap_or_default();
        if age < self.settle {
            return Ok(None);
        }
        let mut bytes = Vec::with_capacity(before.len() as usize);
        f.read_to_end(&mut bytes)?;
        let after = f.metadata()?;
        if after.len() != before.len()
            || after.modified()? != before.modified()?
            || bytes.len() as u64 != after.len()
        {
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    /// Stores the progress of a checklist that waits, and reports it once as
    /// `checklist_stalled` when it has waited longer than `stall_after`.
    fn record_waiting(&self, store: &mut Store, progress: Progress) -> Result<(), PublishError> {
        let now = crate::util::now_ms();
        let old = store.checklist_record(&progress.checklist)?;
        let waiting_since = old.as_ref().and_then(|r| r.waiting_since).unwrap_or(now);
        let mut stalled_at = old.as_ref().and_then(|r| r.stalled_at);
        if let Some(after) = self.stall_after {
            if stalled_at.is_none() && now - waiting_since >= after.as_millis() as i64 {
                let why = format!(
                    "waiting {} for {}",
                    crate::status::human_age((now - waiting_since) / 1000),
                    progress.waiting_line()
                );
                warn!(checklist = %progress.checklist, reason = %why, "checklist stalled");
                store.log_event_for(
                    EventKind::ChecklistStalled,
                    EventOutcome::Failed,
                    Some(&progress.checklist),
                    Some(&why),
                )?;
                stalled_at = Some(now);
            }
        }
        store.set_checklist_record(&ChecklistRecord {
            name: progress.checklist.clone(),
            progress: serde_json::to_string(&progress).expect("serialisable"),
            waiting_since: Some(waiting_since),
            stalled_at,
            published_at: None,
        })?;
        Ok(())
    }

    fn record_published(
        &self,
        store: &mut Store,
        mut progress: Progress,
        at: i64,
    ) -> Result<(), PublishError> {
        progress.published_at = Some(rfc3339(at));
        store.set_checklist_record(&ChecklistRecord {
            name: progress.checklist.clone(),
            progress: serde_json::to_string(&progress).expect("serialisable"),
            waiting_since: None,
            stalled_at: None,
            published_at: Some(at),
        })?;
        Ok(())
    }

    /// How long until the first waiting checklist is due to be reported stalled.
    pub fn next_stall(&self, store: &Store) -> Option<Duration> {
        let after = self.stall_after?.as_millis() as i64;
        let now = crate::util::now_ms();
        store
            .checklist_records()
            .ok()?
            .into_iter()
            .filter(|r| r.stalled_at.is_none())
            .filter_map(|r| r.waiting_since)
            .map(|since| Duration::from_millis((since + after - now).max(0) as u64))
            .min()
    }

    fn invalid(
        &self,
        store: &mut Store,
        checklist: &str,
        path: &Path,
        bytes: &[u8],
        why: &str,
    ) -> Result<Outcome, PublishError> {
        store.remove_checklist_record(checklist)?;
        let digest = hex(&Sha256::digest(bytes));
        // Report each bad content once, not on every pass.
        if store.invalid_checklist(checklist)?.as_deref() != Some(digest.as_str()) {
            let msg = format!("{}: {why}", path.display());
            warn!(checklist, error = %msg, "malformed checklist.json; its photos still upload");
            store.log_event_for(
                EventKind::ChecklistInvalid,
                EventOutcome::Failed,
                Some(checklist),
                Some(&msg),
            )?;
            store.set_invalid_checklist(checklist, &digest)?;
        }
        Ok(Outcome::Invalid(why.to_string()))
    }
}

/// The publisher's loop state; moved into `spawn_blocking` for each turn and back.
pub struct PublishLoop {
    pub publisher: Publisher,
    pub store: Store,
    /// A failed publication (remote down) is retried this often.
    pub retry_interval: Duration,
    dirty: HashSet<String>,
    failed: HashSet<String>,
    /// Checklists whose checklist.json was still settling: looked at again next turn.
    settling: HashSet<String>,
    /// The last event of the log looked at.
    seq: i64,
    last_retry: Instant,
}

impl PublishLoop {
    /// Every checklist is checked at start.
    pub fn new(publisher: Publisher, store: Store, retry_interval: Duration) -> Self {
        let dirty = publisher.all_checklists().into_iter().collect();
        let seq = store.last_event_seq().unwrap_or(0);
        PublishLoop {
            publisher,
            store,
            retry_interval,
            dirty,
            failed: HashSet::new(),
            settling: HashSet::new(),
            seq,
            last_retry: Instant::now(),
        }
    }

    /// One turn (blocking): checklists named by `uploaded` events since the last turn, by
    /// a message, or due for a retry are checked.
    pub fn turn(&mut self, named: Vec<String>) {
        self.dirty.extend(named);
        self.dirty.extend(self.settling.drain());
        if let Ok(events) = self.store.events_after(self.seq, 1000) {
            for e in events {
                self.seq = e.seq;
                // Anything that changes what a checklist waits for (its progress in status).
                let relevant = matches!(
                    e.kind,
                    EventKind::Uploaded
                        | EventKind::Enqueued
                        | EventKind::Failed
                        | EventKind::Archived
                        | EventKind::Retried
                        | EventKind::Evicted
                        | EventKind::Repaired
                        | EventKind::DeleteRequested
                );
                if relevant && e.attachment_id.is_some() {
                    if let Some(c) = e.checklist {
                        self.dirty.insert(c);
                    }
                }
            }
        }
        if self.last_retry.elapsed() >= self.retry_interval {
            self.last_retry = Instant::now();
            self.dirty.extend(self.failed.drain());
        }
        if self
            .publisher
            .next_stall(&self.store)
            .is_some_and(|d| d.is_zero())
        {
            // A wait became long enough to report: look at every waiting checklist.
            if let Ok(recs) = self.store.checklist_records() {
                self.dirty.extend(
                    recs.into_iter()
                        .filter(|r| r.waiting_since.is_some() && r.stalled_at.is_none())
                        .map(|r| r.name),
                );
            }
        }
        for name in std::mem::take(&mut self.dirty) {
            match self.publisher.check(&mut self.store, &name) {
                Ok(Outcome::Settling) => {
                    debug!(checklist = %name, "checklist.json still settling");
                    self.settling.insert(name);
                }
                Ok(o) => debug!(checklist = %name, outcome = ?o, "checklist checked"),
                Err(e) => {
                    warn!(checklist = %name, error = %e, "cannot publish checklist yet; will retry");
                    self.failed.insert(name);
                }
            }
        }
    }
}

impl PublishLoop {
    /// For the last turn of `--until-idle`: a checklist.json still settling is looked at
    /// again once it may have settled (a few times at most: one being rewritten all the
    /// time must not keep the daemon from exiting).
    pub fn settle_and_turn(&mut self) {
        for _ in 0..3 {
            if self.settling.is_empty() {
                return;
            }
            std::thread::sleep(self.publisher.settle);
            self.turn(Vec::new());
        }
    }
}

/// Drives the publisher until `shutdown`, then hands its state back so the supervisor can
/// run a last turn once uploads have stopped (`--until-idle`). The event log is tailed
/// whenever the queue changed (`queue_changed`: the workers need no knowledge of
/// checklists); a settled checklist.json arrives as a message and is checked at once; a
/// failed publication is retried every `retry_interval`. Nothing wakes it while idle.
pub async fn run(
    lp: PublishLoop,
    mut rx: UnboundedReceiver<PublishMsg>,
    mut queue_changed: watch::Receiver<u64>,
    shutdown: CancellationToken,
    beat: LoopBeat,
) -> PublishLoop {
    let mut lp = Some(lp);
    let mut named = Vec::new();
    loop {
        let mut l = lp.take().expect("publish loop");
        let batch = std::mem::take(&mut named);
        let busy = beat.busy();
        let l = match tokio::task::spawn_blocking(move || {
            l.turn(batch);
            l
        })
        .await
        {
            Ok(l) => l,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        drop(busy);
        let retry = (!l.failed.is_empty()).then_some(l.retry_interval);
        // A settling checklist.json is looked at again once it may have settled.
        let retry = match (retry, l.settling.is_empty()) {
            (r, true) => r,
            (Some(r), false) => Some(r.min(l.publisher.settle)),
            (None, false) => Some(l.publisher.settle),
        };
        // A waiting checklist to report as stalled: wake when its time comes.
        let retry = match (retry, l.publisher.next_stall(&l.store)) {
            (Some(a), Some(b)) => Some(a.min(b.max(Duration::from_millis(200)))),
            (a, b) => a.or(b.map(|b| b.max(Duration::from_millis(200)))),
        };
        lp = Some(l);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = queue_changed.changed() => if r.is_err() { break },
            m = rx.recv() => match m {
                Some(PublishMsg::Check(name)) => {
                    named.push(name);
                    while let Ok(PublishMsg::Check(n)) = rx.try_recv() {
                        named.push(n);
                    }
                }
                None => break,
            },
            _ = tokio::time::sleep(retry.unwrap_or_default()), if retry.is_some() => {}
        }
    }
    lp.expect("publish loop")
}

fn attachment_json(a: &Attachment) -> Value {
    let meta: Value = a
        .meta_data
        .as_deref()
        .and_then(|m| serde_json::from_str(m).ok())
        .unwrap_or(Value::Null);
    json!({
        "file": a.filename,
        "id": a.id,
        "key": a.object_key,
        "size": a.size,
        "sha256": a.sha256,
        "media_type": a.media_type,
        "uploaded_at": a.synced_at.map(rfc3339),
        "meta_data": meta,
    })
}
