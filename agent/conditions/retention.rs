//! Retention: which local copies of uploaded photos may be deleted, and deleting them.
//!
//! Invariant: a file is only ever deleted when the remote confirmed its exact bytes
//! (`has_synced`), it is the newest record for its path (a newer, not yet uploaded version
//! of the same file name is never touched), its size and mtime still match what was
//! hashed, and it lies inside the capture folder (a file enqueued from elsewhere is the
//! operator's, not ours). The file is deleted before the record changes: a crash in
//! between leaves a `synced` record without a file, which start-up repair settles as
//! `archived` (`file_missing`).

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::Path;

use tracing::{info, warn};

use super::settings::Retention;
use crate::store::{Attachment, Change, EventKind, EventOutcome, State, Store, StoreError};
use crate::util::mtime_ns;

/// Why a local copy was deleted (the reason of its `evicted` event).
pub const DISK_LOW: &str = "disk_low";
pub const DELETE_AFTER_UPLOAD: &str = "delete_after_upload";
pub const CACHE_LIMIT: &str = "cache_limit";

/// Whether `a`'s local file may be deleted now (see the module invariant).
fn evictable(store: &Store, capture: &Path, a: &Attachment) -> bool {
    if !a.has_synced || !matches!(a.state, State::Synced | State::Archived) {
        return false;
    }
    let path = crate::localfs::text_path(&a.local_uri);
    if !path.starts_with(capture) {
        return false;
    }
    match store.latest_for_path(&a.local_uri) {
        Ok(Some(latest)) if latest.id == a.id => {}
        _ => return false,
    }
    match fs::symlink_metadata(&path) {
        Ok(m) => m.is_file() && m.len() as i64 == a.size && mtime_ns(&m) == a.mtime_ns,
        Err(_) => false,
    }
}

/// Deletes one local copy and records it; false when the file could not be deleted.
fn evict(store: &mut Store, a: &Attachment, reason: &str) -> Result<bool, StoreError> {
    match fs::remove_file(crate::localfs::text_path(&a.local_uri)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            warn!(id = %a.id, path = %a.local_uri, error = %e, "cannot evict local copy");
            return Ok(false);
        }
    }
    info!(id = %a.id, path = %a.local_uri, bytes = a.size, reason, "evicted local copy of an uploaded file");
    if a.state == State::Synced {
        store.transition(
            &a.id,
            State::Archived,
            Change {
                reason: Some(reason),
                ..Change::of(EventKind::Evicted)
            },
        )?;
    } else {
        store.log_event(
            EventKind::Evicted,
            EventOutcome::Applied,
            Some(a),
            Some(reason),
        )?;
    }
    Ok(true)
}

/// Frees space: evicts uploaded local copies (synced or archived), oldest capture first,
/// while `still_low()` says space is short. `seen` remembers records with nothing left to
/// evict so a long archive is not re-checked on every probe. Returns how many were evicted.
pub fn evict_for_space(
    store: &mut Store,
    capture: &Path,
    seen: &mut HashSet<String>,
    mut still_low: impl FnMut() -> bool,
) -> Result<usize, StoreError> {
    let mut n = 0;
    for a in store.in_states(&[State::Synced, State::Archived])? {
        if seen.contains(&a.id) || !a.has_synced {
            continue;
        }
        if !still_low() {
            break;
        }
        if evictable(store, capture, &a) && evict(store, &a, DISK_LOW)? {
            n += 1;
        }
        seen.insert(a.id);
    }
    Ok(n)
}

/// Applies the routine rules after uploads: `delete_after_upload`, and the
/// `keep_synced_files` / `keep_synced_bytes` cache limits (newest kept). Returns how many
/// local copies were evicted.
pub fn sweep(store: &mut Store, capture: &Path, r: &Retention) -> Result<usize, StoreError> {
    if !r.delete_after_upload && r.keep_synced_files.is_none() && r.keep_synced_bytes.is_none() {
        return Ok(0);
    }
    let synced = store.in_states(&[State::Synced])?;
    let mut doomed: Vec<(&Attachment, &str)> = Vec::new();
    let (mut count, mut bytes) = (0u64, 0u64);
    // Newest first, so the cache keeps the most recent photos.
    for a in synced.iter().rev() {
        if !evictable(store, capture, a) {
            continue;
        }
        count += 1;
        bytes += a.size.max(0) as u64;
        if r.delete_after_upload {
            doomed.push((a, DELETE_AFTER_UPLOAD));
        } else if r.keep_synced_files.is_some_and(|max| count > max)
            || r.keep_synced_bytes.is_some_and(|max| bytes > max.0)
        {
            doomed.push((a, CACHE_LIMIT));
        }
    }
    let mut n = 0;
    // Oldest first, so an interrupted sweep has removed the right ones.
    for (a, reason) in doomed.into_iter().rev() {
        if evict(store, a, reason)? {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::settings::Size;
    use crate::store::NewAttachment;

    struct Fixture {
        dir: tempfile::TempDir,
        store: Store,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir_all(dir.path().join("capture")).unwrap();
            Fixture {
                dir,
                store: Store::open_in_memory().unwrap(),
            }
        }
        fn capture(&self) -> std::path::PathBuf {
            self.dir.path().join("capture")
        }
        /// A file and its record; `synced` moves it to synced as an upload would.
        fn add(&mut self, id: &str, name: &str, len: usize, synced: bool) -> std::path::PathBuf {
            let p = self.capture().join(name);
            fs::write(&p, vec![7u8; len]).unwrap();
            let m = fs::metadata(&p).unwrap();
            let supersedes = self
                .store
                .latest_for_path(&p.to_string_lossy())
                .unwrap()
                .map(|a| a.id);
            self.store
                .insert(
                    &NewAttachment {
                        id: id.into(),
                        filename: name.into(),
                        local_uri: p.to_string_lossy().into_owned(),
                        size: len as i64,
                        media_type: "image/jpeg".into(),
                        meta_data: None,
                        checklist: "c".into(),
                        row: "r".into(),
                        sha256: "00".into(),
                        mtime_ns: mtime_ns(&m),
                        object_key: format!("k/{id}"),
                        ctime_ns: None,
                        state: State::QueuedUpload,
                        error: None,
                    },
                    supersedes.as_deref(),
                )
                .unwrap();
            if synced {
                self.store
                    .transition(id, State::Synced, Change::of(EventKind::Uploaded))
                    .unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
            p
        }
        fn evicted(&self) -> Vec<String> {
            self.store
                .events_after(0, 1000)
                .unwrap()
                .into_iter()
                .filter(|e| e.kind == EventKind::Evicted)
                .map(|e| e.attachment_id.unwrap())
                .collect()
        }
    }

    #[test]
    fn disk_pressure_evicts_uploaded_copies_oldest_first_never_pending_ones() {
        let mut f = Fixture::new();
        let a = f.add("a", "a.jpg", 10, true);
        let b = f.add("b", "b.jpg", 10, true);
        let c = f.add("c", "c.jpg", 10, false);
        let outside = f.dir.path().join("elsewhere.jpg");
        fs::write(&outside, b"x").unwrap();
        let mut seen = HashSet::new();
        // Enough space after one eviction.
        let mut budget = 1;
        let cap = f.capture();
        let n = evict_for_space(&mut f.store, &cap, &mut seen, || {
            let low = budget > 0;
            budget -= 1;
            low
        })
        .unwrap();
        assert_eq!(n, 1);
        assert!(!a.exists() && b.exists() && c.exists());
        // Still low: everything uploaded goes, the pending file stays.
        let n = evict_for_space(&mut f.store, &cap, &mut seen, || true).unwrap();
        assert_eq!(n, 1);
        assert!(!b.exists() && c.exists() && outside.exists());
        assert_eq!(f.evicted(), vec!["a", "b"]);
        assert_eq!(f.store.get("a").unwrap().unwrap().state, State::Archived);
        assert_eq!(
            f.store.get("c").unwrap().unwrap().state,
            State::QueuedUpload
        );
    }

    #[test]
    fn a_newer_unsent_version_of_the_same_path_is_never_deleted() {
        let mut f = Fixture::new();
        f.add("old", "p.jpg", 10, true);
        let p = f.add("new", "p.jpg", 12, false);
        let cap = f.capture();
        evict_for_space(&mut f.store, &cap, &mut HashSet::new(), || true).unwrap();
        assert!(p.exists());
        assert!(f.evicted().is_empty());
    }

    #[test]
    fn a_file_changed_after_upload_is_kept() {
        let mut f = Fixture::new();
        let p = f.add("a", "a.jpg", 10, true);
        fs::write(&p, b"rewritten by the app").unwrap();
        let cap = f.capture();
        evict_for_space(&mut f.store, &cap, &mut HashSet::new(), || true).unwrap();
        assert!(p.exists());
    }

    #[test]
    fn routine_sweep_applies_delete_after_upload_and_cache_limits() {
        let mut f = Fixture::new();
        let ps: Vec<_> = (0..4)
            .map(|i| f.add(&format!("s{i}"), &format!("{i}.jpg"), 100, true))
            .collect();
        let pending = f.add("p", "p.jpg", 100, false);
        let cap = f.capture();
        assert_eq!(sweep(&mut f.store, &cap, &Retention::default()).unwrap(), 0);
        let keep2 = Retention {
            keep_synced_files: Some(2),
            ..Retention::default()
        };
        assert_eq!(sweep(&mut f.store, &cap, &keep2).unwrap(), 2);
        assert!(!ps[0].exists() && !ps[1].exists() && ps[2].exists() && ps[3].exists());
        let bytes = Retention {
            keep_synced_bytes: Some(Size(150)),
            ..Retention::default()
        };
        assert_eq!(sweep(&mut f.store, &cap, &bytes).unwrap(), 1);
        assert!(!ps[2].exists() && ps[3].exists());
        let all = Retention {
            delete_after_upload: true,
            ..Retention::default()
        };
        assert_eq!(sweep(&mut f.store, &cap, &all).unwrap(), 1);
        assert!(!ps[3].exists() && pending.exists());
        assert_eq!(f.evicted(), vec!["s0", "s1", "s2", "s3"]);
    }
}
