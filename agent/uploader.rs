//! Scheduler and upload workers.
//!
//! The scheduler thread owns the decision of what runs when: it evaluates the conditions,
//! hands due attachments (oldest or newest first) to a fixed pool of worker threads, and
//! sleeps until a wake-up (new file, finished upload, condition change, CLI command via
//! the wake file, SIGTERM), the next due retry, or the sync interval. Workers move bytes
//! through the [`Remote`] and record every outcome in the store themselves; the scheduler
//! keeps no queue state a crash could lose (only which ids are held right now).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::conditions::governor::{Governor, Ticket};
use crate::conditions::{self, Facts, Reason};
use crate::config::{Config, Order};
use crate::ingest::{Ingestor, Outcome};
use crate::remote::{ErrorClass, Remote, RemoteError, ResumeLog, UploadCtx, UploadJob};
use crate::store::{Attachment, Change, PartRecord, State, Store};
use crate::util::{ctime_ns, mtime_ns, now_ms};

/// How often the scheduler looks at `PRAGMA data_version` for changes made by other
/// processes. CLI commands also touch the wake file (inotify), which takes effect at once;
/// this poll is the backstop, kept rare because every wake-up costs CPU on an idle device.
const CONTROL_POLL: Duration = Duration::from_secs(5);

/// Progress is written to the store at most this often per upload (each write is an
/// fsynced transaction; status only needs a few updates per second).
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// How long a row whose outcome could not be recorded is held back.
const STORE_COOLDOWN: Duration = Duration::from_secs(10);

/// Control keys shared with the CLI.
pub mod control {
    /// "1" while an operator paused uploads.
    pub const PAUSED: &str = "paused";
    /// Written by `fieldsync sync`: any change wakes the scheduler.
    pub const WAKE: &str = "wake";
    /// The reason code uploads are paused for, "" when they run. Written by the daemon.
    pub const PAUSE_REASON: &str = "daemon.pause_reason";
    /// The condition facts as JSON. Written by the daemon.
    pub const CONDITIONS: &str = "daemon.conditions";
    pub const PID: &str = "daemon.pid";
    pub const STARTED_AT: &str = "daemon.started_at";
}

/// Messages to the scheduler.
#[derive(Debug)]
pub enum Msg {
    Wake,
    Done { id: String, outcome: Done },
    Probe { ok: bool },
}

/// What a worker reports about an attachment it held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    Finished,
    /// The store refused a write (disk full, I/O error): the row could not be updated, so
    /// the scheduler holds it back for a while instead of re-sending it in a tight loop.
    StoreFailed,
    Interrupted,
    AuthFailed,
}

/// State shared by the scheduler, workers and the daemon.
#[derive(Debug, Default)]
pub struct Shared {
    /// Set by SIGTERM/SIGINT (an `Arc` so the signal handler can own a reference).
    pub shutdown: Arc<AtomicBool>,
    /// False while a condition pauses uploads: workers stop at the next safe point.
    pub gate_open: AtomicBool,
    pub ingest_idle: AtomicBool,
}

impl Shared {
    pub fn keep_going(&self) -> bool {
        !self.shutdown.load(Ordering::Relaxed) && self.gate_open.load(Ordering::Relaxed)
    }
}

/// Retry delay for the `attempt`-th failure (1-based): exponential from `initial`, capped
/// at `max`, with jitter. `jitter` is a uniform sample in [0, 1).
///
/// DESIGN.md asks for "full jitter" (uniform in [0, d]); we use "equal jitter" (uniform in
/// [d/2, d]) so a delay is never near zero: full jitter lets a failing server be hit again
/// immediately, which on a metered link costs money for nothing.
pub fn backoff(attempt: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = initial
        .checked_mul(1u32 << attempt.saturating_sub(1).min(20))
        .unwrap_or(max)
        .min(max);
    exp / 2 + exp.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
}

/// What the scheduler decides for a failed attempt: retry later, or give up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    RetryIn(Duration),
    GiveUp,
}

/// The retry decision for an error class after `attempts` attempts (pure; unit-tested).
pub fn verdict(
    cfg: &crate::config::Upload,
    class: &ErrorClass,
    attempts: u32,
    jitter: f64,
) -> Verdict {
    let delay = backoff(attempts, cfg.initial_backoff.0, cfg.max_backoff.0, jitter);
    match class {
        ErrorClass::Permanent if attempts >= cfg.permanent_attempts => Verdict::GiveUp,
        ErrorClass::Transient { .. }
            if cfg.transient_attempts > 0 && attempts >= cfg.transient_attempts =>
        {
            Verdict::GiveUp
        }
        ErrorClass::Transient {
            retry_after: Some(ra),
        } => Verdict::RetryIn(delay.max(*ra)),
        _ => Verdict::RetryIn(delay),
    }
}

pub struct Scheduler {
    pub cfg: Arc<Config>,
    pub db_path: PathBuf,
    pub remote: Arc<dyn Remote>,
    pub ingestor: Arc<Ingestor>,
    pub shared: Arc<Shared>,
    pub tx: Sender<Msg>,
    pub rx: Receiver<Msg>,
    /// Exit once nothing is pending (the demo and benchmarks).
    pub until_idle: bool,
}

impl Scheduler {
    /// Runs until shutdown (or idle, with `until_idle`). Joins its workers before returning.
    pub fn run(self, mut store: Store) -> Result<(), crate::store::StoreError> {
        let (job_tx, job_rx) = mpsc::channel::<(Attachment, Ticket)>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let gov = Governor::start(
            &self.cfg,
            &self.db_path,
            self.remote.clone(),
            self.tx.clone(),
            self.shared.clone(),
        )?;
        let mut workers = Vec::new();
        for n in 0..self.cfg.upload.concurrency {
            let w = Worker {
                cfg: self.cfg.clone(),
                store: RefCell::new(Store::open(&self.db_path)?),
                remote: self.remote.clone(),
                ingestor: self.ingestor.clone(),
                shared: self.shared.clone(),
                gov: gov.clone(),
            };
            let rx = job_rx.clone();
            let tx = self.tx.clone();
            workers.push(
                thread::Builder::new()
                    .name(format!("upload-{n}"))
                    .spawn(move || w.run(rx, tx))
                    .expect("spawn upload worker"),
            );
        }

        let mut inflight: HashSet<String> = HashSet::new();
        // Rows whose outcome could not be written, held back until the instant given.
        let mut cooldown: HashMap<String, Instant> = HashMap::new();
        let mut facts = Facts {
            operator_paused: store.control_get(control::PAUSED)?.as_deref() == Some("1"),
            ..Facts::default()
        };
        let mut reason: Option<Reason>;
        // Files that may not start now (metered budget or size, charging required), with
        // why; forgotten whenever the governor's facts or reservations change.
        let mut deferred: HashMap<String, Reason> = HashMap::new();
        let mut deferred_gen = gov.generation();
        let mut recheck = true;
        let mut last_recheck = Instant::now();
        let mut data_version = store.data_version()?;
        let mut last_sync = Instant::now();
        let mut last_auth_check = Instant::now();
        let mut probing = false;
        let mut last_trim = Instant::now();
        let newest_first = self.cfg.upload.order == Order::NewestFirst;

        loop {
            let shutting_down = self.shared.shutdown.load(Ordering::Relaxed);
            if shutting_down && inflight.is_empty() {
                break;
            }

            // CLI changes (pause, resume, retry, sync) arrive through the database.
            let dv = store.data_version()?;
            if dv != data_version {
                data_version = dv;
                recheck = true;
                facts.operator_paused = store.control_get(control::PAUSED)?.as_deref() == Some("1");
            }

            gov.observe(&mut facts);
            reason = conditions::evaluate(&facts, gov.policy());
            self.shared.gate_open.store(
                !reason.is_some_and(|r| r.stops_running()),
                Ordering::Relaxed,
            );
            if gov.generation() != deferred_gen {
                deferred_gen = gov.generation();
                deferred.clear();
                recheck = true;
            }

            if facts.auth_failed
                && !probing
                && last_auth_check.elapsed() >= self.cfg.upload.auth_recheck.0
            {
                probing = true;
                last_auth_check = Instant::now();
                let remote = self.remote.clone();
                let tx = self.tx.clone();
                thread::spawn(move || {
                    let ok = !matches!(
                        remote.probe(),
                        Err(RemoteError {
                            class: ErrorClass::Auth,
                            ..
                        })
                    );
                    let _ = tx.send(Msg::Probe { ok });
                });
            }

            // With files deferred, the queue is only re-read when something changed (or
            // every 2 s for retries falling due): the same files would be refused again.
            let slots = self.cfg.upload.concurrency as usize;
            if reason.is_none()
                && !shutting_down
                && (recheck
                    || deferred.is_empty()
                    || last_recheck.elapsed() >= Duration::from_secs(2))
            {
                recheck = false;
                last_recheck = Instant::now();
                cooldown.retain(|_, until| *until > Instant::now());
                while inflight.len() < slots {
                    let held: Vec<String> = inflight
                        .iter()
                        .chain(deferred.keys())
                        .chain(cooldown.keys())
                        .cloned()
                        .collect();
                    let due =
                        store.due_uploads(now_ms(), slots - inflight.len(), newest_first, &held)?;
                    if due.is_empty() {
                        break;
                    }
                    for att in due {
                        match gov.admit(&facts, &att) {
                            Ok(ticket) => {
                                inflight.insert(att.id.clone());
                                store.set_uploading(&att.id, true)?;
                                let _ = job_tx.send((att, ticket));
                            }
                            Err(why) => {
                                debug!(id = %att.id, reason = why.as_str(), "upload deferred");
                                deferred.insert(att.id, why);
                            }
                        }
                    }
                }
            }
            let mut deferred_by: BTreeMap<Reason, usize> = BTreeMap::new();
            for r in deferred.values() {
                *deferred_by.entry(*r).or_default() += 1;
            }
            // When everything that could run waits for a per-file reason, that is why
            // uploads are not running: show it like a pause.
            let shown = reason.or_else(|| {
                (inflight.is_empty())
                    .then(|| deferred_by.keys().next().copied())
                    .flatten()
            });
            if let Err(e) = gov.publish(&store, &facts, shown, &deferred_by) {
                // Status lags, uploads do not: the next loop writes it again.
                warn!(error = %e, "cannot publish the conditions to status");
            }

            if last_sync.elapsed() >= self.cfg.upload.sync_interval.0 {
                last_sync = Instant::now();
                self.abort_abandoned(&mut store);
                if last_trim.elapsed() >= Duration::from_secs(3600) {
                    last_trim = Instant::now();
                    let _ = store.trim_events();
                }
            }

            if self.until_idle
                && inflight.is_empty()
                && self.shared.ingest_idle.load(Ordering::Relaxed)
                && store.oldest_pending()?.is_none()
            {
                break;
            }

            // Sleep until something can change.
            let mut wait = CONTROL_POLL;
            if reason.is_none()
                && deferred.is_empty()
                && inflight.len() < self.cfg.upload.concurrency as usize
            {
                if let Some(due) = store.next_due_at()? {
                    let ms = (due - now_ms()).max(0) as u64;
                    wait = wait.min(Duration::from_millis(ms));
                }
                if wait.is_zero() && !cooldown.is_empty() {
                    // What is due is held back: don't spin until it may go again.
                    wait = CONTROL_POLL;
                }
            }
            match self.rx.recv_timeout(wait) {
                Ok(msg) => {
                    recheck = true;
                    let mut handle = |m: Msg, facts: &mut Facts| match m {
                        Msg::Wake => {}
                        Msg::Done { id, outcome } => {
                            inflight.remove(&id);
                            if outcome == Done::StoreFailed {
                                cooldown.insert(id.clone(), Instant::now() + STORE_COOLDOWN);
                            }
                            if outcome == Done::AuthFailed && !facts.auth_failed {
                                warn!(
                                    "remote refused the credentials; uploads paused (reason auth)"
                                );
                                facts.auth_failed = true;
                                last_auth_check = Instant::now();
                            }
                        }
                        Msg::Probe { ok } => {
                            probing = false;
                            if ok {
                                info!("remote accepts the credentials again; resuming");
                                facts.auth_failed = false;
                            }
                        }
                    };
                    handle(msg, &mut facts);
                    while let Ok(m) = self.rx.try_recv() {
                        handle(m, &mut facts);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }

        drop(job_tx);
        for w in workers {
            let _ = w.join();
        }
        gov.finish(&store);
        Ok(())
    }

    /// Aborts multipart uploads whose attachment will never complete them.
    fn abort_abandoned(&self, store: &mut Store) {
        let Ok(list) = store.abandoned_multiparts() else {
            return;
        };
        for a in list {
            if let Some(uid) = &a.upload_id {
                match self.remote.abort_upload(&a.object_key, uid) {
                    Ok(()) => {
                        let _ = store.clear_multipart(&a.id);
                        info!(id = %a.id, "aborted abandoned multipart upload");
                    }
                    Err(e) => debug!(id = %a.id, error = %e, "cannot abort multipart upload yet"),
                }
            }
        }
    }
}

struct Worker {
    cfg: Arc<Config>,
    store: RefCell<Store>,
    remote: Arc<dyn Remote>,
    ingestor: Arc<Ingestor>,
    shared: Arc<Shared>,
    /// Admission, rate limit and metered byte count, and evidence of a dead link.
    gov: Arc<Governor>,
}

/// Persists multipart resume state through the worker's store connection.
struct StoreResume<'a> {
    store: &'a RefCell<Store>,
    id: &'a str,
}

impl ResumeLog for StoreResume<'_> {
    fn current(&self) -> Option<(String, u64)> {
        let a = self.store.borrow().get(self.id).ok().flatten()?;
        Some((a.upload_id?, a.part_size? as u64))
    }
    fn parts(&self) -> Vec<PartRecord> {
        self.store.borrow().parts(self.id).unwrap_or_default()
    }
    fn begin(&mut self, upload_id: &str, part_size: u64) {
        if let Err(e) = self
            .store
            .borrow_mut()
            .begin_multipart(self.id, upload_id, part_size)
        {
            warn!(id = self.id, error = %e, "cannot record multipart upload id");
        }
    }
    fn part_done(&mut self, part: &PartRecord) {
        if let Err(e) = self.store.borrow_mut().part_done(self.id, part) {
            warn!(id = self.id, error = %e, "cannot record uploaded part");
        }
    }
    fn clear(&mut self) {
        let _ = self.store.borrow_mut().clear_multipart(self.id);
    }
}

impl Worker {
    fn run(self, jobs: Arc<Mutex<Receiver<(Attachment, Ticket)>>>, tx: Sender<Msg>) {
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
            if tx.send(Msg::Done { id, outcome }).is_err() {
                return;
            }
        }
    }

    fn process(
        &self,
        mut att: Attachment,
        ticket: &Ticket,
    ) -> Result<Done, crate::store::StoreError> {
        let path = Path::new(&att.local_uri);
        if att.sha256.is_empty() {
            // Unreadable at ingest and requeued by an operator: hash it now.
            match crate::ingest::hash_file(path) {
                Ok((sha, n)) => {
                    let mtime = fs::metadata(path).map(|m| mtime_ns(&m)).unwrap_or(0);
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
        // The file must still be the one we hashed.
        let before = match fs::metadata(path) {
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
        if att.attempts > 0 || att.bytes_sent > 0 {
            if let Ok(Some(obj)) = self.remote.head(&att.object_key) {
                // Only a checksum match counts: a same-sized object with other bytes is
                // overwritten by the upload below.
                if obj.size == att.size as u64 && obj.sha256.as_deref() == Some(att.sha256.as_str())
                {
                    self.mark_synced(&att, obj.etag.as_deref(), "already_present")?;
                    return Ok(Done::Finished);
                }
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
        let keep_going = move || shared.keep_going() && ticket.may_continue();
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

    fn failed_attempt(
        &self,
        att: &Attachment,
        e: RemoteError,
    ) -> Result<Done, crate::store::StoreError> {
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
            ErrorClass::Auth => {
                // Not the file's fault: keep the attempt budget, pause the queue.
                self.store
                    .borrow_mut()
                    .schedule_retry(&att.id, now_ms(), &e.code, &e.message)?;
                Ok(Done::AuthFailed)
            }
            class => {
                if matches!(class, ErrorClass::Transient { .. }) {
                    // Every failed request is evidence the link may be down.
                    self.gov.network_failed();
                }
                let attempts = att.attempts as u32 + 1;
                match verdict(&self.cfg.upload, class, attempts, fastrand::f64()) {
                    Verdict::RetryIn(d) => {
                        warn!(id = %att.id, attempt = attempts, retry_in = ?d, error = %e, "upload failed; will retry");
                        self.store.borrow_mut().schedule_retry(
                            &att.id,
                            now_ms() + d.as_millis() as i64,
                            &e.code,
                            &e.message,
                        )?;
                    }
                    Verdict::GiveUp => {
                        warn!(id = %att.id, attempts, error = %e, "upload failed; giving up");
                        let mut s = self.store.borrow_mut();
                        s.schedule_retry(&att.id, 0, &e.code, &e.message)?;
                        s.transition(
                            &att.id,
                            State::Failed,
                            Change {
                                kind: "failed",
                                error: Some((&e.code, &e.message)),
                                ..Default::default()
                            },
                        )?;
                    }
                }
                Ok(Done::Finished)
            }
        }
    }

    /// After an upload sent without re-hashing: true if the file is provably still the
    /// ingested one (ctime unchanged), or, if its ctime moved (a chmod, a touch), its bytes
    /// still hash to the ingest sha256.
    fn still_unchanged(&self, att: &Attachment) -> bool {
        let path = Path::new(&att.local_uri);
        match fs::metadata(path) {
            Ok(m) if att.ctime_ns == Some(ctime_ns(&m)) => true,
            Ok(_) => crate::ingest::hash_file(path).is_ok_and(|(sha, _)| sha == att.sha256),
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
    ) -> Result<(), crate::store::StoreError> {
        self.store.borrow_mut().transition(
            &att.id,
            State::Synced,
            Change {
                kind: "uploaded",
                reason: Some(reason),
                etag,
                ..Default::default()
            },
        )?;
        Ok(())
    }

    fn archive_deleted(&self, att: &Attachment) -> Result<(), crate::store::StoreError> {
        info!(id = %att.id, path = %att.local_uri, "file deleted before upload; archived");
        self.store.borrow_mut().transition(
            &att.id,
            State::Archived,
            Change {
                kind: "archived",
                reason: Some("deleted_before_upload"),
                ..Default::default()
            },
        )?;
        Ok(())
    }

    /// The bytes changed after ingest: hash again; a new version supersedes this one.
    fn reingest(&self, att: &Attachment) {
        let path = Path::new(&att.local_uri);
        let assignment = (att.checklist.clone(), att.row.clone());
        match self
            .ingestor
            .rehash(&mut self.store.borrow_mut(), path, assignment)
        {
            Ok(Outcome::Enqueued(new)) => {
                info!(old = %att.id, new = %new.id, "file changed after ingest; new version queued")
            }
            Ok(Outcome::Missing) => {
                let _ = self.archive_deleted(att);
            }
            Ok(other) => debug!(id = %att.id, ?other, "re-ingest"),
            Err(e) => warn!(id = %att.id, error = %e, "re-ingest failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Dur, Upload};

    #[test]
    fn backoff_grows_caps_and_never_hits_zero() {
        let i = Duration::from_secs(5);
        let m = Duration::from_secs(300);
        assert_eq!(backoff(1, i, m, 0.0), Duration::from_millis(2500));
        assert_eq!(backoff(1, i, m, 0.999_999).as_secs(), 4);
        assert_eq!(backoff(2, i, m, 0.0), Duration::from_secs(5));
        assert_eq!(backoff(3, i, m, 0.0), Duration::from_secs(10));
        assert_eq!(backoff(10, i, m, 0.0), Duration::from_secs(150));
        assert_eq!(backoff(1000, i, m, 0.0), Duration::from_secs(150));
        assert!(backoff(1000, i, m, 0.999) <= m);
    }

    #[test]
    fn verdicts_follow_the_error_class() {
        let cfg = Upload {
            initial_backoff: Dur::secs(5),
            ..Upload::default()
        };
        let transient = ErrorClass::Transient { retry_after: None };
        assert!(matches!(
            verdict(&cfg, &transient, 50, 0.5),
            Verdict::RetryIn(_)
        ));
        assert!(matches!(
            verdict(&cfg, &ErrorClass::Permanent, 1, 0.5),
            Verdict::RetryIn(_)
        ));
        assert_eq!(
            verdict(&cfg, &ErrorClass::Permanent, 3, 0.5),
            Verdict::GiveUp
        );
        let ra = ErrorClass::Transient {
            retry_after: Some(Duration::from_secs(120)),
        };
        assert_eq!(
            verdict(&cfg, &ra, 1, 0.0),
            Verdict::RetryIn(Duration::from_secs(120))
        );
        let limited = Upload {
            transient_attempts: 2,
            ..cfg
        };
        assert_eq!(verdict(&limited, &transient, 2, 0.5), Verdict::GiveUp);
    }
}
