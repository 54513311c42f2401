//! Watcher: notices files in the capture folder and hands complete ones to ingest.
//!
//! inotify (through `notify`) gives prompt events; a periodic full rescan is the backstop
//! for anything missed (events before start-up, queue overflow, a new directory filled
//! before its watch was added). A file is ingested only once complete: closed after a
//! write and quiet for `close_settle`, or with size and mtime unchanged for `settle`.
//! Temp-name-then-rename writers are handled because the rename produces an event for
//! the final name and the temp names are ignored.
//!
//! The settle decisions are [`Settler`], a plain struct whose methods take "now" (and a
//! stat function), unit-tested without sleeps. [`run`] is the thin async driver: it
//! collects inotify messages and runs each turn's blocking work (rescans, hashing, SQLite)
//! in `spawn_blocking`.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::bus::LoopBeat;
pub use crate::bus::WatchMsg;
use crate::ingest::{IngestError, Ingestor, Outcome};
use crate::localfs::path_text;
use crate::store::{Change, State, Store};
use crate::util::mtime_ns;

/// How long ingest waits before trying again when the state disk has no room to record a
/// photo: the files stay pending (nothing is hashed meanwhile) and are taken once it has.
pub const DISK_FULL_RETRY: Duration = Duration::from_secs(2);

/// When a new directory is scanned again after its creation event.
const NEW_DIR_RESCANS: [Duration; 2] = [Duration::from_millis(500), Duration::from_secs(3)];

/// Directory mtimes seen by the last rescan.
pub type DirMtimes = HashMap<PathBuf, i64>;

/// A file seen but not yet ingested.
#[derive(Debug, Clone)]
struct Pending {
    last_event: Instant,
    closed: bool,
    /// Size and mtime at the last stability check.
    seen: Option<(u64, i64)>,
}

/// Starts inotify on the capture folder. The returned watcher must be kept alive.
pub fn watch(
    capture: &Path,
    tx: UnboundedSender<WatchMsg>,
) -> notify::Result<notify::RecommendedWatcher> {
    let handler = move |res: notify::Result<notify::Event>| match res {
        Ok(ev) => {
            if ev.need_rescan() {
                let _ = tx.send(WatchMsg::Rescan);
                return;
            }
            for path in ev.paths {
                let msg = match ev.kind {
                    EventKind::Create(CreateKind::Folder) => WatchMsg::DirCreated(path),
                    EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                        WatchMsg::Changed { path, closed: true }
                    }
                    EventKind::Create(_)
                    | EventKind::Modify(ModifyKind::Data(_))
                    | EventKind::Modify(ModifyKind::Any)
                    | EventKind::Modify(ModifyKind::Metadata(_)) => WatchMsg::Changed {
                        path,
                        closed: false,
                    },
                    EventKind::Modify(ModifyKind::Name(_)) => {
                        // The entry itself, not what a link points at.
                        let meta = fs::symlink_metadata(&path);
                        if meta.as_ref().is_ok_and(|m| m.is_dir()) {
                            WatchMsg::DirCreated(path)
                        } else if meta.is_ok() {
                            // A rename into place: the writer is done with it.
                            WatchMsg::Changed { path, closed: true }
                        } else {
                            WatchMsg::Removed(path)
                        }
                    }
                    EventKind::Remove(_) => WatchMsg::Removed(path),
                    _ => continue,
                };
                if tx.send(msg).is_err() {
                    return;
                }
            }
        }
        Err(e) => {
            warn!(error = %e, "inotify error; rescanning");
            let _ = tx.send(WatchMsg::Rescan);
        }
    };
    // Linked directories below the capture folder are not watched (nor read: `localfs`).
    let mut w = notify::RecommendedWatcher::new(
        handler,
        notify::Config::default().with_follow_symlinks(false),
    )?;
    w.watch(capture, RecursiveMode::Recursive)?;
    Ok(w)
}

/// Settings of the ingest loop.
#[derive(Debug, Clone, Copy)]
pub struct SettleTimes {
    pub settle: Duration,
    pub close_settle: Duration,
    pub rescan_interval: Duration,
}

/// Which files wait to settle, and when folders are rescanned. No I/O: the caller passes
/// "now" and, for [`Settler::ready`], a stat function.
#[derive(Debug)]
pub struct Settler {
    times: SettleTimes,
    pending: HashMap<PathBuf, Pending>,
    /// New directories to scan again, and when.
    new_dirs: Vec<(Instant, PathBuf)>,
    next_rescan: Instant,
    /// The next periodic rescan looks into every folder (the first, and after an overflow).
    full: bool,
    /// No file is taken before this (the state disk is full); pending ones wait.
    held_until: Option<Instant>,
}

/// Rescans due now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rescans {
    /// New directories to scan again.
    pub dirs: Vec<PathBuf>,
    /// The periodic pass over the whole capture folder; `Some(full)` when due.
    pub periodic: Option<bool>,
}

impl Settler {
    /// The first periodic pass (full) is due at once.
    pub fn new(times: SettleTimes, now: Instant) -> Self {
        Settler {
            times,
            pending: HashMap::new(),
            new_dirs: Vec::new(),
            next_rescan: now,
            full: true,
            held_until: None,
        }
    }

    /// The queue cannot record anything now (a full state disk): take no file before
    /// `now + DISK_FULL_RETRY`. Pending files stay pending.
    pub fn hold(&mut self, now: Instant) {
        self.held_until = Some(now + DISK_FULL_RETRY);
    }

    /// Whether files are held back at `now`.
    pub fn held(&self, now: Instant) -> bool {
        self.held_until.is_some_and(|t| now < t)
    }

    /// An inotify event for a candidate file.
    pub fn changed(&mut self, path: PathBuf, closed: bool, now: Instant) {
        let p = self.pending.entry(path).or_insert(Pending {
            last_event: now,
            closed,
            seen: None,
        });
        p.last_event = now;
        p.closed = closed;
    }

    /// A file found by a rescan; returns whether it was not pending yet.
    pub fn found(&mut self, path: PathBuf, now: Instant) -> bool {
        if self.pending.contains_key(&path) {
            return false;
        }
        self.pending.insert(
            path,
            Pending {
                last_event: now,
                closed: false,
                seen: None,
            },
        );
        true
    }

    pub fn removed(&mut self, path: &Path) {
        self.pending.remove(path);
    }

    /// A directory appeared: files written into it (or into subdirectories created with
    /// it) before its inotify watch existed produce no event, so it is scanned again a
    /// little later.
    pub fn dir_created(&mut self, dir: &Path, now: Instant) {
        for delay in NEW_DIR_RESCANS {
            self.new_dirs.push((now + delay, dir.to_path_buf()));
        }
    }

    /// The rescans due now. After the first pass, periodic rescans only look into
    /// directories whose mtime changed (a file created, renamed or removed there); inotify
    /// reports changes inside files, and an overflow asks for a full pass again.
    pub fn rescans_due(&mut self, now: Instant) -> Rescans {
        let (due, later): (Vec<_>, Vec<_>) = self.new_dirs.drain(..).partition(|(t, _)| *t <= now);
        self.new_dirs = later;
        let periodic = (now >= self.next_rescan).then(|| {
            self.next_rescan = now + self.times.rescan_interval;
            std::mem::replace(&mut self.full, false)
        });
        Rescans {
            dirs: due.into_iter().map(|(_, d)| d).collect(),
            periodic,
        }
    }

    /// Files complete enough to ingest now, sorted. `stat` gives a file's size and mtime,
    /// `None` when it is gone (then it is ready: ingest reports it missing). A file not
    /// closed after writing is ready once its size and mtime held for `settle`.
    pub fn ready(
        &mut self,
        now: Instant,
        stat: &mut dyn FnMut(&Path) -> Option<(u64, i64)>,
    ) -> Vec<PathBuf> {
        let mut ready = Vec::new();
        if self.held(now) {
            return ready;
        }
        for (path, p) in self.pending.iter_mut() {
            let quiet = now.duration_since(p.last_event);
            let Some(cur) = stat(path) else {
                ready.push(path.clone());
                continue;
            };
            if p.closed && quiet >= self.times.close_settle {
                ready.push(path.clone());
            } else if quiet >= self.times.settle {
                if p.seen == Some(cur) {
                    ready.push(path.clone());
                } else {
                    // Changed since the last look (or first look): wait another settle time.
                    p.seen = Some(cur);
                    p.last_event = now;
                }
            }
        }
        ready.sort();
        ready
    }

    /// Ingest found the file still being written: start settling again.
    pub fn not_stable(&mut self, path: &Path, now: Instant) {
        if let Some(p) = self.pending.get_mut(path) {
            p.last_event = now;
            p.closed = false;
            p.seen = None;
        }
    }

    /// The file was taken (or given up on).
    pub fn done(&mut self, path: &Path) {
        self.pending.remove(path);
    }

    /// Nothing left to settle or rescan soon (for `run --until-idle`).
    pub fn idle(&self) -> bool {
        self.pending.is_empty() && self.new_dirs.is_empty()
    }

    /// When to look again if no event comes.
    pub fn next_wake(&self, now: Instant) -> Instant {
        if let Some(t) = self
            .held_until
            .filter(|t| now < *t && !self.pending.is_empty())
        {
            return t.min(self.next_rescan.max(now));
        }
        if self.pending.is_empty() {
            let next_dir = self.new_dirs.iter().map(|(t, _)| *t).min();
            next_dir.unwrap_or(self.next_rescan).min(self.next_rescan)
        } else {
            // Re-check pending files often enough to honour the shorter settle time.
            now + self
                .times
                .close_settle
                .min(self.times.settle / 4)
                .max(Duration::from_millis(20))
        }
    }
}

/// Hooks the ingest loop reports to.
pub trait IngestSink: Send {
    /// An attachment was enqueued (wake the uploader).
    fn enqueued(&self);
    /// Whether the loop has nothing left to settle (for `run --until-idle`).
    fn set_idle(&self, idle: bool);
    /// A checklist.json settled (path below the capture folder).
    fn checklist_changed(&self, _path: &Path) {}
}

/// What the ingest loop owns; moved into `spawn_blocking` for each turn and back.
pub struct IngestLoop {
    pub ingestor: std::sync::Arc<Ingestor>,
    pub store: Store,
    pub sink: Box<dyn IngestSink>,
    settler: Settler,
    dirs: DirMtimes,
    /// The state disk had no room at the last look (logged once per episode).
    disk_full: bool,
}

impl IngestLoop {
    pub fn new(
        ingestor: std::sync::Arc<Ingestor>,
        store: Store,
        sink: Box<dyn IngestSink>,
        times: SettleTimes,
    ) -> Self {
        IngestLoop {
            ingestor,
            store,
            sink,
            settler: Settler::new(times, Instant::now()),
            dirs: HashMap::new(),
            disk_full: false,
        }
    }

    /// One turn (blocking): apply the messages, run due rescans, ingest what settled.
    /// Returns when to look again.
    pub fn turn(&mut self, msgs: Vec<WatchMsg>) -> Instant {
        for m in msgs {
            self.apply(m);
        }
        let due = self.settler.rescans_due(Instant::now());
        for d in due.dirs {
            self.rescan(Some(&d), true);
        }
        if let Some(full) = due.periodic {
            self.rescan(None, full);
        }
        self.settle();
        self.sink.set_idle(self.settler.idle());
        self.settler.next_wake(Instant::now())
    }

    fn apply(&mut self, msg: WatchMsg) {
        let now = Instant::now();
        match msg {
            WatchMsg::Changed { path, closed } => {
                let is_json = path.extension().is_some_and(|e| e == "json");
                if is_json || self.ingestor.is_candidate(&path) {
                    self.settler.changed(path, closed, now);
                }
            }
            WatchMsg::DirCreated(dir) => {
                self.settler.dir_created(&dir, now);
                self.rescan(Some(&dir), true);
            }
            WatchMsg::Rescan => self.rescan(None, true),
            WatchMsg::Removed(path) => {
                self.settler.removed(&path);
                deleted_before_upload(&mut self.store, &path);
            }
        }
    }

    fn rescan(&mut self, dir: Option<&Path>, full: bool) {
        let mut added = 0;
        let root = dir.unwrap_or(self.ingestor.capture()).to_path_buf();
        let settler = &mut self.settler;
        rescan_pass(
            &self.ingestor,
            &self.store,
            &root,
            &mut self.dirs,
            full,
            &mut |path| {
                if settler.found(path, Instant::now()) {
                    added += 1;
                }
            },
        );
        if added > 0 {
            debug!(added, "rescan found new or changed files");
        }
    }

    fn settle(&mut self) {
        let ready = self.settler.ready(Instant::now(), &mut |p| {
            fs::symlink_metadata(p)
                .ok()
                .map(|m| (m.len(), mtime_ns(&m)))
        });
        // A new photo is recorded only while the reserve for recording upload outcomes
        // exists: on a full state disk the files wait (unhashed) and are taken later.
        if !ready.is_empty()
            && !self
                .store
                .state_dir()
                .is_none_or(crate::store::ensure_reserve)
        {
            if !self.disk_full {
                warn!(
                    waiting = ready.len(),
                    "state disk full; new photos wait until there is room"
                );
            }
            self.disk_full = true;
            self.settler.hold(Instant::now());
            return;
        }
        if std::mem::take(&mut self.disk_full) && !ready.is_empty() {
            info!(
                waiting = ready.len(),
                "room on the state disk again; recording new photos"
            );
        }
        for path in ready {
            if path
                .file_name()
                .is_some_and(|n| n == crate::ingest::CHECKLIST_FILE)
            {
                self.sink.checklist_changed(&path);
                self.settler.done(&path);
                continue;
            }
            match self.ingestor.ingest(&mut self.store, &path) {
                Ok(Outcome::NotStable) => {
                    self.settler.not_stable(&path, Instant::now());
                    continue;
                }
                Ok(Outcome::Enqueued(_)) | Ok(Outcome::Unreadable(_)) => self.sink.enqueued(),
                Ok(_) => {}
                Err(IngestError::Store(e)) if crate::store::is_disk_full(&e) => {
                    // Not recorded (SQLite rolled it back): keep it pending and try again
                    // once there is room.
                    if !self.disk_full {
                        warn!(path = %path.display(), error = %e, "state disk full; the photo waits");
                    }
                    self.disk_full = true;
                    self.settler.not_stable(&path, Instant::now());
                    self.settler.hold(Instant::now());
                    return;
                }
                Err(e) => {
                    // Forget the folder's mtime so the next periodic rescan looks into it
                    // again.
                    if let Some(parent) = path.parent() {
                        self.dirs.remove(parent);
                    }
                    warn!(path = %path.display(), error = %e, "ingest failed; will retry on the next rescan")
                }
            }
            self.settler.done(&path);
        }
    }
}

/// Drives the ingest loop until `shutdown`: waits for inotify messages or the next
/// settle/rescan deadline, then runs a turn off the reactor.
pub async fn run(
    lp: IngestLoop,
    mut rx: UnboundedReceiver<WatchMsg>,
    shutdown: CancellationToken,
    beat: LoopBeat,
) {
    let mut lp = Some(lp);
    let mut msgs = Vec::new();
    loop {
        let mut l = lp.take().expect("ingest loop");
        let batch = std::mem::take(&mut msgs);
        let busy = beat.busy();
        let turn = tokio::task::spawn_blocking(move || {
            let next = l.turn(batch);
            (l, next)
        });
        let Ok((l, next)) = turn.await else {
            return;
        };
        drop(busy);
        lp = Some(l);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            m = rx.recv() => match m {
                Some(m) => {
                    msgs.push(m);
                    // Take what else is queued before checking files.
                    while let Ok(m) = rx.try_recv() {
                        msgs.push(m);
                    }
                }
                None => return,
            },
            _ = tokio::time::sleep_until(next) => {}
        }
    }
}

/// One rescan pass below `root`: calls `new_file` for every candidate the store does not
/// hold with its current size and mtime. Unless `full`, only directories whose mtime
/// changed since the previous pass (as recorded in `dirs`) have their files looked at.
pub fn rescan_pass(
    ingestor: &Ingestor,
    store: &Store,
    root: &Path,
    dirs: &mut DirMtimes,
    full: bool,
    new_file: &mut dyn FnMut(PathBuf),
) {
    let mut want = |d: &Path| {
        let m = fs::metadata(d).map(|m| mtime_ns(&m)).unwrap_or(0);
        let changed = dirs.insert(d.to_path_buf(), m) != Some(m);
        full || changed
    };
    ingestor.scan_dirs(root, &mut want, &mut |path| {
        if !known_unchanged(store, &path) {
            new_file(path);
        }
    });
}

/// True when the store already holds this path with its current size and mtime: the
/// rescan's cheap check that skips hashing.
fn known_unchanged(store: &Store, path: &Path) -> bool {
    // The entry itself: a link is handed to ingest, which reports it (never reads it).
    let Ok(meta) = fs::symlink_metadata(path) else {
        return true;
    };
    match store.latest_for_path(&path_text(path)) {
        Ok(Some(a)) => a.size == meta.len() as i64 && a.mtime_ns == mtime_ns(&meta),
        _ => false,
    }
}

/// The app deleted a file that was still waiting: archive it (not a failure, not retried).
pub fn deleted_before_upload(store: &mut Store, path: &Path) {
    if fs::symlink_metadata(path).is_ok() {
        return;
    }
    let Ok(Some(a)) = store.latest_for_path(&path_text(path)) else {
        return;
    };
    if a.state == State::QueuedUpload && a.uploading_since.is_none() {
        match store.transition(
            &a.id,
            State::Archived,
            Change {
                reason: Some("deleted_before_upload"),
                ..Change::of(crate::store::EventKind::Archived)
            },
        ) {
            Ok(_) => info!(id = %a.id, path = %path.display(), "deleted before upload; archived"),
            Err(e) => warn!(id = %a.id, error = %e, "cannot archive deleted file"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMES: SettleTimes = SettleTimes {
        settle: Duration::from_secs(2),
        close_settle: Duration::from_millis(300),
        rescan_interval: Duration::from_secs(300),
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_closed_file_is_taken_after_close_settle() {
        let t0 = Instant::now();
        let mut s = Settler::new(TIMES, t0);
        let p = PathBuf::from("/c/a/r/IMG_1.jpg");
        s.changed(p.clone(), true, t0);
        let mut stat = |_: &Path| Some((10u64, 1i64));
        assert!(s.ready(t0 + ms(299), &mut stat).is_empty());
        // Another write restarts the quiet time.
        s.changed(p.clone(), true, t0 + ms(200));
        assert!(s.ready(t0 + ms(400), &mut stat).is_empty());
        assert_eq!(s.ready(t0 + ms(500), &mut stat), std::slice::from_ref(&p));
        s.done(&p);
        assert!(s.idle());
    }

    #[test]
    fn an_open_file_is_taken_once_size_and_mtime_held_for_settle() {
        let t0 = Instant::now();
        let mut s = Settler::new(TIMES, t0);
        let p = PathBuf::from("/c/a/r/IMG_2.jpg");
        s.changed(p.clone(), false, t0);
        let mut size = 10u64;
        // First look after `settle`: remembers size and mtime, waits another settle.
        assert!(s
            .ready(t0 + ms(2000), &mut |_: &Path| Some((size, 1)))
            .is_empty());
        // Still growing: waits again.
        size = 20;
        assert!(s
            .ready(t0 + ms(4000), &mut |_: &Path| Some((size, 1)))
            .is_empty());
        assert!(s
            .ready(t0 + ms(5000), &mut |_: &Path| Some((size, 1)))
            .is_empty());
        assert_eq!(s.ready(t0 + ms(6000), &mut |_: &Path| Some((size, 1))), [p]);
    }

    #[test]
    fn a_vanished_file_is_ready_so_ingest_can_report_it() {
        let t0 = Instant::now();
        let mut s = Settler::new(TIMES, t0);
        let p = PathBuf::from("/c/gone.jpg");
        s.changed(p.clone(), false, t0);
        assert_eq!(s.ready(t0, &mut |_: &Path| None), [p]);
    }

    #[test]
    fn not_stable_starts_over_and_ready_is_sorted() {
        let t0 = Instant::now();
        let mut s = Settler::new(TIMES, t0);
        let a = PathBuf::from("/c/a.jpg");
        let b = PathBuf::from("/c/b.jpg");
        s.changed(b.clone(), true, t0);
        s.changed(a.clone(), true, t0);
        let mut stat = |_: &Path| Some((1u64, 1i64));
        assert_eq!(s.ready(t0 + ms(300), &mut stat), [a.clone(), b.clone()]);
        s.not_stable(&a, t0 + ms(300));
        s.done(&b);
        // Not closed any more: needs a full settle with unchanged metadata.
        assert!(s.ready(t0 + ms(700), &mut stat).is_empty());
        assert!(s.ready(t0 + ms(2300), &mut stat).is_empty());
        assert_eq!(s.ready(t0 + ms(4300), &mut stat), [a]);
    }

    #[test]
    fn a_file_found_by_a_rescan_is_not_reset_if_already_pending() {
        let t0 = Instant::now();
        let mut s = Settler::new(TIMES, t0);
        let p = PathBuf::from("/c/a.jpg");
        s.changed(p.clone(), true, t0);
        assert!(!s.found(p.clone(), t0 + ms(250)));
        assert_eq!(s.ready(t0 + ms(300), &mut |_: &Path| Some((1, 1))), [p]);
        assert!(s.found(PathBuf::from("/c/b.jpg"), t0));
    }

    #[test]
    fn rescans_first_full_then_on_the_interval_and_new_dirs_twice() {
        let t0 = Instant::now();
        let mut s = Settler::new(TIMES, t0);
        assert_eq!(s.rescans_due(t0).periodic, Some(true));
        assert_eq!(s.rescans_due(t0 + ms(10)).periodic, None);
        assert_eq!(s.next_wake(t0), t0 + TIMES.rescan_interval);
        let d = PathBuf::from("/c/new");
        s.dir_created(&d, t0);
        assert!(!s.idle());
        assert_eq!(s.next_wake(t0), t0 + NEW_DIR_RESCANS[0]);
        assert_eq!(s.rescans_due(t0 + ms(500)).dirs, std::slice::from_ref(&d));
        assert!(s.rescans_due(t0 + ms(600)).dirs.is_empty());
        assert_eq!(s.rescans_due(t0 + ms(3000)).dirs, [d]);
        assert!(s.idle());
        let r = s.rescans_due(t0 + TIMES.rescan_interval);
        assert_eq!(r.periodic, Some(false));
    }

    #[test]
    fn a_hold_keeps_files_pending_until_it_ends() {
        let t0 = Instant::now();
        let mut s = Settler::new(TIMES, t0);
        assert_eq!(s.rescans_due(t0).periodic, Some(true));
        let p = PathBuf::from("/c/a.jpg");
        s.changed(p.clone(), true, t0);
        s.hold(t0);
        let mut stat = |_: &Path| Some((1u64, 1i64));
        assert!(s.ready(t0 + ms(500), &mut stat).is_empty());
        assert!(!s.idle());
        // No busy polling while held: the next look is when the hold ends.
        assert_eq!(s.next_wake(t0 + ms(500)), t0 + DISK_FULL_RETRY);
        assert_eq!(s.ready(t0 + DISK_FULL_RETRY, &mut stat), [p]);
    }

    #[test]
    fn pending_files_are_looked_at_often_enough_for_the_shorter_settle() {
        let t0 = Instant::now();
        let mut s = Settler::new(TIMES, t0);
        s.changed(PathBuf::from("/c/a.jpg"), false, t0);
        assert_eq!(s.next_wake(t0), t0 + ms(300));
        let mut fast = Settler::new(
            SettleTimes {
                settle: ms(40),
                close_settle: ms(10),
                rescan_interval: ms(1000),
            },
            t0,
        );
        fast.changed(PathBuf::from("/c/a.jpg"), false, t0);
        assert_eq!(fast.next_wake(t0), t0 + ms(20));
    }
}
