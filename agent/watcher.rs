//! Watcher: notices files in the capture folder and hands complete ones to ingest.
//!
//! inotify (through `notify`) gives prompt events; a periodic full rescan is the backstop
//! for anything missed (events before start-up, queue overflow, a new directory filled
//! before its watch was added). A file is ingested only once complete: closed after a
//! write and quiet for `close_settle`, or with size and mtime unchanged for `settle`.
//! Temp-name-then-rename writers are handled because the rename produces an event for
//! the final name and the temp names are ignored.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher as _};
use tracing::{debug, info, warn};

use crate::ingest::{Ingestor, Outcome};
use crate::store::{Change, State, Store};
use crate::util::mtime_ns;

/// Messages into the ingest loop.
#[derive(Debug)]
pub enum WatchMsg {
    /// Something happened to this path; `closed` when it was a close-after-write.
    Changed {
        path: PathBuf,
        closed: bool,
    },
    /// A directory appeared: scan it (its files may predate its watch).
    DirCreated(PathBuf),
    Removed(PathBuf),
    /// inotify lost events: rescan everything.
    Rescan,
    Shutdown,
}

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
pub fn watch(capture: &Path, tx: Sender<WatchMsg>) -> notify::Result<notify::RecommendedWatcher> {
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
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
                        if path.is_dir() {
                            WatchMsg::DirCreated(path)
                        } else if path.exists() {
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
    })?;
    w.watch(capture, RecursiveMode::Recursive)?;
    Ok(w)
}

/// Settings of the ingest loop.
pub struct IngestLoop {
    pub settle: Duration,
    pub close_settle: Duration,
    pub rescan_interval: Duration,
}

/// Hooks the ingest loop reports to.
pub trait IngestSink {
    /// An attachment was enqueued (wake the uploader).
    fn enqueued(&self);
    /// Whether the loop has nothing left to settle (for `run --until-idle`).
    fn set_idle(&self, idle: bool);
    /// A checklist.json was written (path below the capture folder).
    fn checklist_changed(&self, _path: &Path) {}
}

impl IngestLoop {
    /// Runs until `Shutdown`. Owns its own store connection.
    pub fn run(
        &self,
        ingestor: &Ingestor,
        store: &mut Store,
        rx: Receiver<WatchMsg>,
        sink: &dyn IngestSink,
    ) {
        let mut pending: HashMap<PathBuf, Pending> = HashMap::new();
        let mut dirs: DirMtimes = HashMap::new();
        let mut next_rescan = Instant::now();
        let mut full = true;
        let mut new_dirs: Vec<(Instant, PathBuf)> = Vec::new();
        loop {
            let now = Instant::now();
            // A new directory is scanned again a little later: files written into it (or
            // into subdirectories created with it) before its inotify watch existed
            // produce no event.
            let (due, later): (Vec<_>, Vec<_>) = new_dirs.drain(..).partition(|(t, _)| *t <= now);
            new_dirs = later;
            for (_, d) in due {
                self.rescan(ingestor, store, &mut pending, Some(&d), &mut dirs, true);
            }
            if now >= next_rescan {
                self.rescan(ingestor, store, &mut pending, None, &mut dirs, full);
                // After the first pass, periodic rescans only look into directories whose
                // mtime changed (a file created, renamed or removed there); inotify reports
                // changes inside files, and an overflow asks for a full pass again.
                full = false;
                next_rescan = now + self.rescan_interval;
            }
            sink.set_idle(pending.is_empty() && new_dirs.is_empty());
            let next_dir = new_dirs.iter().map(|(t, _)| *t).min();
            let wait = if pending.is_empty() {
                next_dir
                    .unwrap_or(next_rescan)
                    .min(next_rescan)
                    .saturating_duration_since(now)
            } else {
                // Re-check pending files often enough to honour the shorter settle time.
                self.close_settle
                    .min(self.settle / 4)
                    .max(Duration::from_millis(20))
            };
            match rx.recv_timeout(wait) {
                Ok(WatchMsg::Shutdown) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(msg) => {
                    if let WatchMsg::DirCreated(d) = &msg {
                        for delay in NEW_DIR_RESCANS {
                            new_dirs.push((Instant::now() + delay, d.clone()));
                        }
                    }
                    self.apply(msg, ingestor, store, &mut pending, &mut dirs);
                    // Drain what else is queued before checking files.
                    while let Ok(m) = rx.try_recv() {
                        if matches!(m, WatchMsg::Shutdown) {
                            return;
                        }
                        if let WatchMsg::DirCreated(d) = &m {
                            for delay in NEW_DIR_RESCANS {
                                new_dirs.push((Instant::now() + delay, d.clone()));
                            }
                        }
                        self.apply(m, ingestor, store, &mut pending, &mut dirs);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.settle_pending(ingestor, store, &mut pending, &mut dirs, sink);
        }
    }

    fn apply(
        &self,
        msg: WatchMsg,
        ingestor: &Ingestor,
        store: &mut Store,
        pending: &mut HashMap<PathBuf, Pending>,
        dirs: &mut DirMtimes,
    ) {
        let now = Instant::now();
        match msg {
            WatchMsg::Changed { path, closed } => {
                let is_json = path.extension().is_some_and(|e| e == "json");
                if !is_json && !ingestor.is_candidate(&path) {
                    return;
                }
                let p = pending.entry(path).or_insert(Pending {
                    last_event: now,
                    closed,
                    seen: None,
                });
                p.last_event = now;
                p.closed = closed;
            }
            WatchMsg::DirCreated(dir) => {
                self.rescan(ingestor, store, pending, Some(&dir), dirs, true)
            }
            WatchMsg::Rescan => self.rescan(ingestor, store, pending, None, dirs, true),
            WatchMsg::Removed(path) => {
                pending.remove(&path);
                deleted_before_upload(store, &path);
            }
            WatchMsg::Shutdown => {}
        }
    }

    fn rescan(
        &self,
        ingestor: &Ingestor,
        store: &Store,
        pending: &mut HashMap<PathBuf, Pending>,
        dir: Option<&Path>,
        dirs: &mut DirMtimes,
        full: bool,
    ) {
        let mut added = 0;
        let root = dir.unwrap_or(ingestor.capture());
        rescan_pass(ingestor, store, root, dirs, full, &mut |path| {
            if pending.contains_key(&path) {
                return;
            }
            pending.insert(
                path,
                Pending {
                    last_event: Instant::now(),
                    closed: false,
                    seen: None,
                },
            );
            added += 1;
        });
        if added > 0 {
            debug!(added, "rescan found new or changed files");
        }
    }

    fn settle_pending(
        &self,
        ingestor: &Ingestor,
        store: &mut Store,
        pending: &mut HashMap<PathBuf, Pending>,
        dirs: &mut DirMtimes,
        sink: &dyn IngestSink,
    ) {
        let now = Instant::now();
        let mut ready = Vec::new();
        for (path, p) in pending.iter_mut() {
            let quiet = now.duration_since(p.last_event);
            let meta = match fs::metadata(path) {
                Ok(m) => m,
                Err(_) => {
                    ready.push(path.clone()); // gone: ingest reports Missing and we drop it
                    continue;
                }
            };
            let cur = (meta.len(), mtime_ns(&meta));
            if p.closed && quiet >= self.close_settle {
                ready.push(path.clone());
            } else if quiet >= self.settle {
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
        for path in ready {
            if path
                .file_name()
                .is_some_and(|n| n == crate::ingest::CHECKLIST_FILE)
            {
                sink.checklist_changed(&path);
                pending.remove(&path);
                continue;
            }
            match ingestor.ingest(store, &path) {
                Ok(Outcome::NotStable) => {
                    if let Some(p) = pending.get_mut(&path) {
                        p.last_event = Instant::now();
                        p.closed = false;
                        p.seen = None;
                    }
                    continue;
                }
                Ok(Outcome::Enqueued(_)) | Ok(Outcome::Unreadable(_)) => sink.enqueued(),
                Ok(_) => {}
                Err(e) => {
                    // E.g. the state volume is full. Forget the folder's mtime so the next
                    // periodic rescan looks into it again.
                    if let Some(parent) = path.parent() {
                        dirs.remove(parent);
                    }
                    warn!(path = %path.display(), error = %e, "ingest failed; will retry on the next rescan")
                }
            }
            pending.remove(&path);
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
    let Ok(meta) = fs::metadata(path) else {
        return true;
    };
    match store.latest_for_path(&path.to_string_lossy()) {
        Ok(Some(a)) => a.size == meta.len() as i64 && a.mtime_ns == mtime_ns(&meta),
        _ => false,
    }
}

/// The app deleted a file that was still waiting: archive it (not a failure, not retried).
pub fn deleted_before_upload(store: &mut Store, path: &Path) {
    if path.exists() {
        return;
    }
    let Ok(Some(a)) = store.latest_for_path(&path.to_string_lossy()) else {
        return;
    };
    if a.state == State::QueuedUpload && a.uploading_since.is_none() {
        match store.transition(
            &a.id,
            State::Archived,
            Change {
                kind: "archived",
                reason: Some("deleted_before_upload"),
                ..Default::default()
            },
        ) {
            Ok(_) => info!(id = %a.id, path = %path.display(), "deleted before upload; archived"),
            Err(e) => warn!(id = %a.id, error = %e, "cannot archive deleted file"),
        }
    }
}
