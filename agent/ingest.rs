//! Ingest: turns a complete file in the capture folder into a queued attachment.
//!
//! It hashes the file (sha256, while reading), resolves its checklist and row from the
//! layout template, reads the optional sidecar, and records it in one transaction. The
//! same file (path, size, mtime, hash) is never enqueued twice; a file whose bytes changed
//! after ingest becomes a new version and the stale, not yet uploaded one is archived.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::localfs::{self, path_text, readable_line};
use crate::remote::object_key;
use crate::store::{Attachment, EventKind, EventOutcome, NewAttachment, State, Store, StoreError};
use crate::units::Dur;
use crate::util::{ctime_ns, glob_match, hex, mtime_ns};

/// Checklist name given to photos outside the layout: they are uploaded, never dropped.
pub const UNASSIGNED: &str = "unassigned";

/// The file the app writes to declare a checklist finished; not an attachment.
pub const CHECKLIST_FILE: &str = "checklist.json";

/// Read buffer for hashing.
const HASH_CHUNK: usize = 256 * 1024;

/// `[ingest]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// A file not closed after writing is taken once its size and mtime were unchanged
    /// this long.
    pub settle: Dur,
    /// After a close-after-write, how long no further write must follow.
    pub close_settle: Dur,
    /// Full rescan of the capture folder, the backstop for missed inotify events.
    pub rescan_interval: Dur,
    /// Path template below the capture folder: `{checklist}`, `{row}`, `{file}`, `*`.
    pub layout: String,
    /// Glob patterns (on the file name) that are never ingested.
    pub ignore: Vec<String>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            settle: Dur::secs(2),
            close_settle: Dur(std::time::Duration::from_millis(300)),
            rescan_interval: Dur::secs(300),
            layout: "{checklist}/{row}/{file}".into(),
            ignore: vec![".*".into(), "*.tmp".into(), "*.part".into(), "*~".into()],
        }
    }
}

impl IngestConfig {
    /// Checks what the types cannot: the key and what is expected.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.rescan_interval.0 < std::time::Duration::from_secs(1) {
            return Err(("ingest.rescan_interval", "expected at least 1s".into()));
        }
        Layout::parse(&self.layout).map_err(|e| ("ingest.layout", e))?;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
}

/// What ingesting one path did.
#[derive(Debug)]
pub enum Outcome {
    Enqueued(Attachment),
    /// The file exists but cannot be read: recorded as `failed` with the reason.
    Unreadable(Attachment),
    /// Already recorded with the same size and mtime.
    Unchanged,
    /// Same bytes, new mtime: only the mtime was updated.
    Touched,
    /// The file changed while it was being hashed: try again once it is stable.
    NotStable,
    /// Not an attachment (ignored name, directory, sidecar, checklist.json).
    Ignored,
    /// A sidecar written after its photo updated the photo's metadata.
    SidecarUpdated,
    /// The path does not exist (any more).
    Missing,
    /// Not read: a symbolic link, a FIFO, a file reached through a linked directory
    /// (`crate::localfs`); reported once as `file_skipped`. The `not_regular_file: …`
    /// reason.
    Refused(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Checklist,
    Row,
    File,
    Any,
    Lit(String),
}

/// The capture layout template, e.g. `{checklist}/{row}/{file}`.
#[derive(Debug, Clone)]
pub struct Layout {
    segs: Vec<Seg>,
}

impl Layout {
    pub fn parse(s: &str) -> Result<Layout, String> {
        let segs: Vec<Seg> = s
            .split('/')
            .filter(|p| !p.is_empty())
            .map(|p| match p {
                "{checklist}" => Seg::Checklist,
                "{row}" => Seg::Row,
                "{file}" => Seg::File,
                "*" => Seg::Any,
                lit => Seg::Lit(lit.to_string()),
            })
            .collect();
        if segs.last() != Some(&Seg::File) {
            return Err(
                "expected a template ending in `{file}`, e.g. \"{checklist}/{row}/{file}\"".into(),
            );
        }
        if !segs.contains(&Seg::Checklist) {
            return Err("expected a template containing `{checklist}`".into());
        }
        for s in &segs {
            if let Seg::Lit(l) = s {
                if l.contains(['{', '}']) {
                    return Err(format!(
                        "unknown placeholder `{l}`; expected {{checklist}}, {{row}}, {{file}} or *"
                    ));
                }
            }
        }
        Ok(Layout { segs })
    }

    /// Checklist and row of a path relative to the capture folder, or `None` when it does
    /// not fit the layout.
    pub fn resolve(&self, rel: &Path) -> Option<(String, String)> {
        let comps: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if comps.len() != self.segs.len() {
            return None;
        }
        let (mut checklist, mut row) = (None, String::new());
        for (seg, comp) in self.segs.iter().zip(&comps) {
            match seg {
                Seg::Checklist => checklist = Some(comp.clone()),
                Seg::Row => row = comp.clone(),
                Seg::Lit(l) if l != comp => return None,
                _ => {}
            }
        }
        checklist.map(|c| (c, row))
    }

    /// The literal folders above the checklist folder, or `None` when a `*` or `{row}`
    /// comes first (then checklist folders have no single place and are not published).
    fn checklist_parent(&self) -> Option<Vec<&str>> {
        let mut lits = Vec::new();
        for s in &self.segs {
            match s {
                Seg::Checklist => return Some(lits),
                Seg::Lit(l) => lits.push(l.as_str()),
                _ => return None,
            }
        }
        None
    }

    /// The folder of `checklist` below `capture` (where its checklist.json lives).
    pub fn checklist_dir(&self, capture: &Path, checklist: &str) -> Option<PathBuf> {
        let mut p = capture.to_path_buf();
        for l in self.checklist_parent()? {
            p.push(l);
        }
        p.push(checklist);
        Some(p)
    }

    /// The checklist a `checklist.json` path (relative to the capture folder) belongs to.
    pub fn checklist_of_file(&self, rel: &Path) -> Option<String> {
        let parent = self.checklist_parent()?;
        let comps: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if comps.len() != parent.len() + 2
            || comps.last().map(String::as_str) != Some(CHECKLIST_FILE)
        {
            return None;
        }
        if comps.iter().zip(&parent).any(|(c, l)| c != l) {
            return None;
        }
        Some(comps[parent.len()].clone())
    }

    /// Calls `f(name, folder)` for every checklist folder below `capture`.
    pub fn each_checklist_dir(&self, capture: &Path, f: &mut dyn FnMut(String, PathBuf)) {
        let Some(parent) = self.checklist_parent() else {
            return;
        };
        let mut dir = capture.to_path_buf();
        for l in parent {
            dir.push(l);
        }
        let Ok(rd) = fs::read_dir(&dir) else { return };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) && !name.starts_with('.') {
                f(name, e.path());
            }
        }
    }
}

pub struct Ingestor {
    capture: PathBuf,
    layout: Layout,
    ignore: Vec<String>,
    prefix: String,
    device: String,
    /// Paths already reported as not read (`file_skipped`): each rescan finds a link
    /// again, and the log should say so once.
    reported: Mutex<HashSet<PathBuf>>,
}

impl Ingestor {
    /// An ingestor for the folder `capture`, naming objects `<prefix>/<device>/…`.
    pub fn new(capture: &Path, cfg: &IngestConfig, prefix: &str, device: &str) -> Ingestor {
        Ingestor {
            capture: absolute(capture),
            layout: Layout::parse(&cfg.layout).expect("layout validated with the config"),
            ignore: cfg.ignore.clone(),
            prefix: prefix.to_string(),
            device: device.to_string(),
            reported: Mutex::new(HashSet::new()),
        }
    }

    /// The path a file below (or outside) the capture folder is opened by: the capture
    /// folder's real path joined with the rest ([`localfs::real_path`]).
    pub fn real_path(&self, path: &Path) -> io::Result<PathBuf> {
        localfs::real_path(&self.capture, path)
    }

    /// Reports once that `path` is not read (`file_skipped`, reason `not_regular_file`).
    fn refuse(
        &self,
        store: &Store,
        path: &Path,
        checklist: Option<&str>,
        what: &'static str,
    ) -> Result<Outcome, IngestError> {
        let msg = localfs::Refused {
            path: readable_line(&path_text(path)),
            what,
        }
        .to_string();
        let first = self
            .reported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_path_buf());
        if first {
            // `info`: the event is the report (MQTT too); `enqueue` prints the reason
            // as its one error line.
            info!(reason = %msg, "file in the capture folder not read");
            store.log_event_for(
                EventKind::FileSkipped,
                EventOutcome::Skipped,
                checklist,
                Some(&msg),
            )?;
        }
        Ok(Outcome::Refused(msg))
    }

    pub fn capture(&self) -> &Path {
        &self.capture
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Whether a file name is one fieldsync ignores (hidden, partial, temp).
    pub fn ignored_name(&self, name: &str) -> bool {
        self.ignore.iter().any(|g| glob_match(g, name))
    }

    /// Whether `path` may be an attachment (by name and place; not yet by content).
    pub fn is_candidate(&self, path: &Path) -> bool {
        // Names that are not UTF-8 are still photos; the globs see U+FFFD for such bytes.
        let Some(name) = path.file_name().map(|n| n.to_string_lossy()) else {
            return false;
        };
        path.starts_with(&self.capture)
            && path != self.capture
            && !self.ignored_name(&name)
            && !name.ends_with(".json")
            // Anything inside a hidden directory (an app's staging area) is ignored too.
            && !path
                .strip_prefix(&self.capture)
                .map(|rel| {
                    rel.parent()
                        .map(|p| {
                            p.components()
                                .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
                        })
                        .unwrap_or(false)
                })
                .unwrap_or(true)
    }

    /// Ingests one path. Safe to call repeatedly on the same file.
    pub fn ingest(&self, store: &mut Store, path: &Path) -> Result<Outcome, IngestError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".json") {
            return self.sidecar_changed(store, path, &name);
        }
        if !self.is_candidate(path) {
            return Ok(Outcome::Ignored);
        }
        let assignment = path
            .strip_prefix(&self.capture)
            .ok()
            .and_then(|rel| self.layout.resolve(rel))
            .unwrap_or_else(|| (UNASSIGNED.to_string(), String::new()));
        self.ingest_as(store, path, assignment)
    }

    /// Ingests `path` against an explicit checklist and row (`fieldsync enqueue`, and the
    /// second half of [`Ingestor::ingest`]).
    pub fn ingest_as(
        &self,
        store: &mut Store,
        path: &Path,
        assignment: (String, String),
    ) -> Result<Outcome, IngestError> {
        self.ingest_inner(store, path, assignment, false)
    }

    /// Hashes `path` again even if its size and mtime are the recorded ones: the uploader
    /// found bytes that do not match the ingest hash (a writer that restored the mtime).
    pub fn rehash(
        &self,
        store: &mut Store,
        path: &Path,
        assignment: (String, String),
    ) -> Result<Outcome, IngestError> {
        self.ingest_inner(store, path, assignment, true)
    }

    fn ingest_inner(
        &self,
        store: &mut Store,
        path: &Path,
        (checklist, row): (String, String),
        force: bool,
    ) -> Result<Outcome, IngestError> {
        // The stored form of the name and path keeps every byte (`localfs::path_text`).
        let name = path_text(Path::new(path.file_name().unwrap_or_default()));
        // Nothing is read through a link (`localfs`): the link itself is looked at, and
        // the file is opened without following one and checked once open.
        let lmeta = match fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Outcome::Missing),
            Err(e) => return Err(io_err(path, e)),
        };
        if lmeta.is_dir() {
            return Ok(Outcome::Ignored);
        }
        if let Some(what) = localfs::odd_kind(&lmeta) {
            return self.refuse(store, path, Some(&checklist), what);
        }
        let mut read_error = None;
        let (mut file, meta) = match self
            .real_path(path)
            .and_then(|r| localfs::open_regular(&r))
            .and_then(|f| f.metadata().map(|m| (f, m)))
        {
            Ok((f, m)) => (Some(f), m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Outcome::Missing),
            Err(e) => {
                if let Some(r) = localfs::refused(&e) {
                    return self.refuse(store, path, Some(&checklist), r.what);
                }
                read_error = Some(e);
                (None, lmeta)
            }
        };
        let uri = path_text(path);
        let size = meta.len() as i64;
        let mtime = mtime_ns(&meta);
        let latest = store.latest_for_path(&uri)?;
        if let Some(l) = &latest {
            // Same path, size and mtime: the same file, whatever state its record is in
            // (an archived record stays archived until something references it again).
            if l.size == size && l.mtime_ns == mtime && !force {
                return Ok(Outcome::Unchanged);
            }
        }

        // The id is known once the bytes are hashed (it names them); until then, none.
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut new = NewAttachment {
            object_key: String::new(),
            id: String::new(),
            filename: name.clone(),
            local_uri: uri,
            size,
            media_type: media_type(&ext).to_string(),
            meta_data: None,
            checklist,
            row,
            sha256: String::new(),
            mtime_ns: mtime,
            ctime_ns: None,
            state: State::QueuedUpload,
            error: None,
        };

        let hashed = match (file.as_mut(), read_error) {
            (Some(f), _) => hash_reader(f),
            (None, e) => Err(e.unwrap_or_else(|| io::Error::other("not opened"))),
        };
        match hashed {
            Ok((sha, hashed_len)) => {
                // The app may still be writing: only a file that did not change while we
                // read it is taken.
                let after = match file.as_ref().map(File::metadata) {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => return Err(io_err(path, e)),
                    None => return Ok(Outcome::Missing),
                };
                if after.len() as i64 != size
                    || mtime_ns(&after) != mtime
                    || ctime_ns(&after) != ctime_ns(&meta)
                    || hashed_len != size as u64
                {
                    return Ok(Outcome::NotStable);
                }
                new.ctime_ns = Some(ctime_ns(&after));
                if let Some(l) = &latest {
                    // The same bytes back at the path of a photo an operator deleted (a
                    // restored backup, a local copy that could not be removed): it stays
                    // deleted.
                    if l.sha256 == sha && l.state == State::Archived && store.is_tombstone(&l.id)? {
                        store.touch_mtime(&l.id, mtime)?;
                        return Ok(Outcome::Unchanged);
                    }
                    if l.sha256 == sha && l.state != State::Archived && l.state != State::Failed {
                        store.touch_mtime(&l.id, mtime)?;
                        return Ok(Outcome::Touched);
                    }
                }
                new.sha256 = sha;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Outcome::Missing),
            Err(e) => {
                // Unreadable (permissions, I/O error): record it so an operator sees it;
                // `fieldsync retry` re-ingests once it is fixed.
                if let Some(l) = &latest {
                    if l.state == State::Failed && l.size == size && l.mtime_ns == mtime {
                        return Ok(Outcome::Unchanged);
                    }
                }
                new.state = State::Failed;
                new.error = Some(("read_error".into(), e.to_string()));
                self.name(store, &mut new, path, &ext)?;
                warn!(path = %path.display(), error = %e, "cannot read captured file");
                let supersedes = latest.as_ref().map(|l| l.id.clone());
                let att = store.insert(&new, supersedes.as_deref())?;
                return Ok(Outcome::Unreadable(att));
            }
        }
        new.meta_data = self.read_sidecar(store, path);
        self.name(store, &mut new, path, &ext)?;
        let supersedes = latest
            .as_ref()
            .filter(|l| matches!(l.state, State::QueuedUpload | State::Failed))
            .map(|l| l.id.clone());
        // Inside the capture folder the start-up rescan finds the file again if a power
        // cut loses its record; a file enqueued from elsewhere has only its record.
        let att = if path.starts_with(&self.capture) {
            store.insert_rediscoverable(&new, supersedes.as_deref())?
        } else {
            store.insert(&new, supersedes.as_deref())?
        };
        self.reported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(path);
        info!(id = %att.id, path = %path.display(), checklist = %att.checklist, row = %att.row,
              size = att.size, "enqueued");
        Ok(Outcome::Enqueued(att))
    }

    /// Gives `new` its id and object key: the name-based id of [`attachment_id`], so a
    /// rebuilt database names a photo exactly as the lost one did and the check before
    /// sending finds what is already up. Should that id already be taken (the same bytes
    /// recorded again at the same path and mtime after their record was archived or
    /// failed), a random one keeps the new record distinct.
    fn name(
        &self,
        store: &Store,
        new: &mut NewAttachment,
        path: &Path,
        ext: &str,
    ) -> Result<(), IngestError> {
        let rel = path.strip_prefix(&self.capture).unwrap_or(path);
        let mut id = attachment_id(&self.device, rel, new.size, new.mtime_ns, &new.sha256);
        if store.get(&id)?.is_some() {
            id = uuid::Uuid::new_v4().to_string();
        }
        new.object_key = object_key(
            &self.prefix,
            &self.device,
            &new.checklist,
            &new.row,
            &id,
            ext,
        );
        new.id = id;
        Ok(())
    }

    /// Reads `<file>.json`. A malformed sidecar is reported (log and event) and the photo
    /// is still enqueued, without metadata.
    fn read_sidecar(&self, store: &Store, photo: &Path) -> Option<String> {
        let mut p = photo.as_os_str().to_owned();
        p.push(".json");
        let p = PathBuf::from(p);
        let no_sidecar = |e: &io::Error| {
            // A name so long that `<name>.json` cannot exist: there is no sidecar.
            e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENAMETOOLONG)
        };
        match fs::symlink_metadata(&p) {
            Err(e) if no_sidecar(&e) => return None,
            Ok(m) if m.is_dir() => return None,
            Ok(m) => {
                if let Some(what) = localfs::odd_kind(&m) {
                    let _ = self.refuse(store, &p, None, what);
                    return None;
                }
            }
            Err(_) => {}
        }
        let read = self.real_path(&p).and_then(|r| {
            let mut text = String::new();
            localfs::open_regular(&r)?.read_to_string(&mut text)?;
            Ok(text)
        });
        let text = match read {
            Ok(t) => t,
            Err(e) if no_sidecar(&e) => return None,
            Err(e) if localfs::refused(&e).is_some() => {
                let what = localfs::refused(&e).map(|r| r.what).unwrap_or_default();
                let _ = self.refuse(store, &p, None, what);
                return None;
            }
            Err(e) => {
                warn!(sidecar = %p.display(), error = %e, "cannot read sidecar; photo enqueued without metadata");
                let _ = store.log_event(
                    EventKind::SidecarInvalid,
                    EventOutcome::Failed,
                    None,
                    Some(&format!("{}: {e}", p.display())),
                );
                return None;
            }
        };
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) => Some(v.to_string()),
            Err(e) => {
                warn!(sidecar = %p.display(), error = %e, "malformed sidecar; photo enqueued without metadata");
                let _ = store.log_event(
                    EventKind::SidecarInvalid,
                    EventOutcome::Failed,
                    None,
                    Some(&format!("{}: {e}", p.display())),
                );
                None
            }
        }
    }

    /// A `.json` file changed: if it is the sidecar of an already ingested photo, refresh
    /// that photo's metadata; `checklist.json` and stray JSON are not attachments.
    fn sidecar_changed(
        &self,
        store: &mut Store,
        path: &Path,
        name: &str,
    ) -> Result<Outcome, IngestError> {
        if name == CHECKLIST_FILE {
            return Ok(Outcome::Ignored);
        }
        let file = path.file_name().unwrap_or_default().as_bytes();
        let stem = file.strip_suffix(b".json").unwrap_or(file);
        let photo = path.with_file_name(std::ffi::OsStr::from_bytes(stem));
        let uri = path_text(&photo);
        let Some(att) = store.latest_for_path(&uri)? else {
            return Ok(Outcome::Ignored);
        };
        let meta = self.read_sidecar(store, &photo);
        if meta.is_some() && meta != att.meta_data {
            store.set_meta_data(&att.id, meta.as_deref())?;
            return Ok(Outcome::SidecarUpdated);
        }
        Ok(Outcome::Ignored)
    }

    /// Calls `f` for every candidate file below `dir`, one directory at a time, without
    /// collecting the whole tree (a capture folder may hold years of photos).
    pub fn scan_each(&self, dir: &Path, f: &mut dyn FnMut(PathBuf)) {
        self.scan_dirs(dir, &mut |_| true, f)
    }

    /// Like [`Ingestor::scan_each`], but `want_files(dir)` decides per directory whether
    /// its files are visited (subdirectories are always descended into).
    pub fn scan_dirs(
        &self,
        dir: &Path,
        want_files: &mut dyn FnMut(&Path) -> bool,
        f: &mut dyn FnMut(PathBuf),
    ) {
        // A folder reached through a link is not looked into (nothing below the capture
        // folder is read through a link).
        let linked = dir != self.capture && fs::symlink_metadata(dir).is_ok_and(|m| m.is_symlink());
        let mut stack = if linked {
            Vec::new()
        } else {
            vec![dir.to_path_buf()]
        };
        while let Some(dir) = stack.pop() {
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            let files = want_files(&dir);
            for entry in rd.flatten() {
                let Ok(ft) = entry.file_type() else { continue };
                if ft.is_dir() {
                    if !entry.file_name().to_string_lossy().starts_with('.') {
                        stack.push(entry.path());
                    }
                } else if files {
                    // Links, FIFOs and the like too: ingest reports them (never reads).
                    let p = entry.path();
                    if self.is_candidate(&p) {
                        f(p);
                    }
                }
            }
        }
    }
}

/// The namespace of attachment ids (a fixed, random UUID: ids of fieldsync only).
const ID_NAMESPACE: uuid::Uuid = uuid::uuid!("6f3b1c2e-8d4a-4f7e-9a51-2c0e7d9b4a13");

/// The id of an attachment: a name-based UUID (v5) of the device, the path relative to
/// the capture folder (absolute outside it), size, mtime and sha256. The same photo
/// always gets the same id, so its object key survives the loss of the database.
/// Records written before ids were name-based keep their random (v4) ids.
pub fn attachment_id(device: &str, rel: &Path, size: i64, mtime_ns: i64, sha256: &str) -> String {
    use std::os::unix::ffi::OsStrExt;
    // NUL cannot occur in a device id, a path or the numbers: the fields cannot run into
    // each other.
    let mut name = Vec::with_capacity(128);
    name.extend_from_slice(device.as_bytes());
    name.push(0);
    name.extend_from_slice(rel.as_os_str().as_bytes());
    name.push(0);
    name.extend_from_slice(format!("{size}\0{mtime_ns}\0{sha256}").as_bytes());
    uuid::Uuid::new_v5(&ID_NAMESPACE, &name).to_string()
}

/// Streams the file through sha256; returns the hex digest and the bytes read. `path` is
/// a real path ([`Ingestor::real_path`]), opened under the rule of [`crate::localfs`].
pub fn hash_file(path: &Path) -> io::Result<(String, u64)> {
    hash_reader(&mut localfs::open_regular(path)?)
}

/// Streams an open file through sha256; returns the hex digest and the bytes read.
pub fn hash_reader(f: &mut File) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut n = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                hasher.update(&buf[..k]);
                n += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok((hex(&hasher.finalize()), n))
}

pub fn media_type(ext: &str) -> &'static str {
    match ext.to_ascii_lowercase().as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "heic" | "heif" => "image/heic",
        "webp" => "image/webp",
        "tif" | "tiff" => "image/tiff",
        "dng" => "image/x-adobe-dng",
        "mp4" => "video/mp4",
        "mov" => "video/quicktime",
        "pdf" => "application/pdf",
        _ => "application/octet-stream",
    }
}

/// An absolute form of `p` without touching the file system's symlinks.
pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn io_err(path: &Path, source: io::Error) -> IngestError {
    IngestError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(dir: &Path) -> (Ingestor, Store) {
        let cfg = IngestConfig::default();
        (
            Ingestor::new(dir, &cfg, "fieldsync", "dev"),
            Store::open_in_memory().unwrap(),
        )
    }

    #[test]
    fn layout_resolves_checklist_and_row() {
        let l = Layout::parse("{checklist}/{row}/{file}").unwrap();
        assert_eq!(
            l.resolve(Path::new("c1/r1/a.jpg")),
            Some(("c1".into(), "r1".into()))
        );
        assert_eq!(l.resolve(Path::new("a.jpg")), None);
        assert_eq!(l.resolve(Path::new("c1/a.jpg")), None);
        let l = Layout::parse("site/{checklist}/*/{file}").unwrap();
        assert_eq!(
            l.resolve(Path::new("site/c9/x/a.jpg")),
            Some(("c9".into(), "".into()))
        );
        assert_eq!(l.resolve(Path::new("other/c9/x/a.jpg")), None);
        assert!(Layout::parse("{checklist}/{row}").is_err());
        assert!(Layout::parse("{row}/{file}").is_err());
        assert!(Layout::parse("{checklist}/{rows}/{file}").is_err());
    }

    #[test]
    fn layout_places_checklist_files() {
        let l = Layout::parse("{checklist}/{row}/{file}").unwrap();
        assert_eq!(
            l.checklist_of_file(Path::new("c1/checklist.json")),
            Some("c1".into())
        );
        assert_eq!(l.checklist_of_file(Path::new("c1/r1/checklist.json")), None);
        assert_eq!(
            l.checklist_dir(Path::new("/cap"), "c1"),
            Some(PathBuf::from("/cap/c1"))
        );
        let l = Layout::parse("site/{checklist}/{file}").unwrap();
        assert_eq!(
            l.checklist_of_file(Path::new("site/c2/checklist.json")),
            Some("c2".into())
        );
        assert_eq!(
            l.checklist_of_file(Path::new("other/c2/checklist.json")),
            None
        );
        assert_eq!(
            Layout::parse("*/{checklist}/{file}")
                .unwrap()
                .checklist_dir(Path::new("/c"), "x"),
            None
        );
    }

    #[test]
    fn same_file_is_enqueued_once_and_changed_file_supersedes() {
        let dir = tempfile::tempdir().unwrap();
        let (ing, mut store) = setup(dir.path());
        let p = dir.path().join("c1/r1/a.jpg");
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, b"one").unwrap();
        let first = match ing.ingest(&mut store, &p).unwrap() {
            Outcome::Enqueued(a) => a,
            o => panic!("{o:?}"),
        };
        assert_eq!((first.checklist.as_str(), first.row.as_str()), ("c1", "r1"));
        assert!(matches!(
            ing.ingest(&mut store, &p).unwrap(),
            Outcome::Unchanged
        ));
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&p, b"two!").unwrap();
        let second = match ing.ingest(&mut store, &p).unwrap() {
            Outcome::Enqueued(a) => a,
            o => panic!("{o:?}"),
        };
        assert_ne!(first.id, second.id);
        assert_ne!(first.sha256, second.sha256);
        assert_eq!(
            store.get(&first.id).unwrap().unwrap().state,
            State::Archived
        );
        assert_eq!(
            store.due_uploads(i64::MAX, 10, false, &[]).unwrap().len(),
            1
        );
    }

    #[test]
    fn ids_are_name_based_and_pinned() {
        let id = attachment_id(
            "dev",
            Path::new("c1/r1/a.jpg"),
            3,
            1_700_000_000_000_000_000,
            "ab",
        );
        // Pinned: a rebuilt database must name a photo as every earlier version did.
        assert_eq!(id, PINNED_ID);
        assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 5);
        for other in [
            attachment_id(
                "dev2",
                Path::new("c1/r1/a.jpg"),
                3,
                1_700_000_000_000_000_000,
                "ab",
            ),
            attachment_id(
                "dev",
                Path::new("c1/r1/b.jpg"),
                3,
                1_700_000_000_000_000_000,
                "ab",
            ),
            attachment_id(
                "dev",
                Path::new("c1/r1/a.jpg"),
                4,
                1_700_000_000_000_000_000,
                "ab",
            ),
            attachment_id(
                "dev",
                Path::new("c1/r1/a.jpg"),
                3,
                1_700_000_000_000_000_001,
                "ab",
            ),
            attachment_id(
                "dev",
                Path::new("c1/r1/a.jpg"),
                3,
                1_700_000_000_000_000_000,
                "ac",
            ),
        ] {
            assert_ne!(other, id);
        }
    }

    const PINNED_ID: &str = "80ea91d7-86dd-53d7-a1f9-75fccd3af396";

    #[test]
    fn a_lost_database_names_the_same_photo_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let (ing, mut store) = setup(dir.path());
        let p = dir.path().join("c1/r1/a.jpg");
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, b"one").unwrap();
        let Outcome::Enqueued(first) = ing.ingest(&mut store, &p).unwrap() else {
            panic!()
        };
        let mut fresh = Store::open_in_memory().unwrap();
        let Outcome::Enqueued(again) = ing.ingest(&mut fresh, &p).unwrap() else {
            panic!()
        };
        assert_eq!(
            (first.id.as_str(), first.object_key.as_str()),
            (again.id.as_str(), again.object_key.as_str())
        );
        // The same bytes recorded a second time in one database get a distinct id.
        let new = NewAttachment {
            id: String::new(),
            filename: "a.jpg".into(),
            local_uri: p.to_string_lossy().into_owned(),
            size: 3,
            media_type: "image/jpeg".into(),
            meta_data: None,
            checklist: "c1".into(),
            row: "r1".into(),
            sha256: first.sha256.clone(),
            mtime_ns: first.mtime_ns,
            object_key: String::new(),
            ctime_ns: None,
            state: State::QueuedUpload,
            error: None,
        };
        let mut n = new.clone();
        ing.name(&store, &mut n, &p, "jpg").unwrap();
        assert_ne!(n.id, first.id);
    }

    #[test]
    fn outside_layout_is_unassigned_and_bad_sidecar_is_tolerated() {
        let dir = tempfile::tempdir().unwrap();
        let (ing, mut store) = setup(dir.path());
        let p = dir.path().join("loose.jpg");
        fs::write(&p, b"x").unwrap();
        fs::write(dir.path().join("loose.jpg.json"), b"{not json").unwrap();
        let a = match ing.ingest(&mut store, &p).unwrap() {
            Outcome::Enqueued(a) => a,
            o => panic!("{o:?}"),
        };
        assert_eq!(a.checklist, UNASSIGNED);
        assert!(a.meta_data.is_none());
        assert!(a.object_key.starts_with("fieldsync/dev/unassigned/"));
        let ev = store.events_after(0, 10).unwrap();
        assert!(ev.iter().any(|e| e.kind == EventKind::SidecarInvalid));
    }

    #[test]
    fn ignores_partial_hidden_and_json() {
        let dir = tempfile::tempdir().unwrap();
        let (ing, _) = setup(dir.path());
        let c = dir.path();
        assert!(!ing.is_candidate(&c.join("c/r/.a.jpg")));
        assert!(!ing.is_candidate(&c.join("c/r/a.jpg.tmp")));
        assert!(!ing.is_candidate(&c.join("c/r/a.jpg.part")));
        assert!(!ing.is_candidate(&c.join("c/r/a.jpg.json")));
        assert!(!ing.is_candidate(&c.join("c/.staging/a.jpg")));
        assert!(ing.is_candidate(&c.join("c/r/a b ü.jpg")));
    }
}
