//! Downloads: what an upload worker does with a `queued_download` row (a file an
//! assignment names, see [`crate::assignments`]).
//!
//! The bytes go to a temp file beside the final path in the inbox (`.<name>.fieldsync-part`),
//! hashed as they arrive and fsynced every [`SYNC_EVERY`]; once the size and sha256 match
//! the file is fsynced and renamed into place, then the row becomes
//! `synced` with a `downloaded` event. A mismatch is never placed: the temp file is deleted
//! and the download retried (a permanent error: `failed` after `upload.permanent_attempts`).
//! An interrupted download (kill -9, reboot, dropped link) resumes with a Range request from
//! what the temp file holds, so at most the bytes since the last fsync are fetched again.
//! Downloads take the same slots, conditions, rate limit and metered budget as uploads
//! (the scheduler admits them through the governor; every chunk goes through the ticket).

use std::cell::RefCell;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use crate::assignments::{local_matches, part_path};
use crate::bus::{Done, Shared};
use crate::conditions::governor::{Governor, Ticket};
use crate::config::Upload;
use crate::remote::{DownloadCtx, ErrorClass, Remote, RemoteError};

use crate::store::{Attachment, Store, StoreError};
use crate::util::{hex, mtime_ns};

/// The temp file is fsynced this often: after a power cut at most this much is fetched
/// again (after a kill -9, the page cache keeps everything written). Also the "chunk" of
/// the resume promise.
pub const SYNC_EVERY: u64 = 8 * 1024 * 1024;

/// Progress is written to the store at most this often (status only).
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Writes received bytes to the temp file, hashing them, and stops a body that runs past
/// the expected size (a wrong object must not fill the inbox).
struct PartWriter<'a> {
    file: File,
    hasher: Sha256,
    written: u64,
    synced_at: u64,
    limit: u64,
    too_long: bool,
    progress: &'a mut dyn FnMut(u64),
}

impl Write for PartWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written + buf.len() as u64 > self.limit {
            self.too_long = true;
            return Err(io::Error::other("the object is larger than assigned"));
        }
        self.file.write_all(buf)?;
        self.hasher.update(buf);
        self.written += buf.len() as u64;
        if self.written - self.synced_at >= SYNC_EVERY {
            self.file.sync_data()?;
            self.synced_at = self.written;
        }
        (self.progress)(self.written);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a worker needs to run one download.
pub struct Downloader<'a> {
    pub cfg: &'a Upload,
    pub store: &'a RefCell<Store>,
    pub remote: &'a dyn Remote,
    pub shared: &'a Shared,
    pub gov: &'a Governor,
}

impl Downloader<'_> {
    pub fn process(&self, att: &Attachment, ticket: &Ticket) -> Result<Done, StoreError> {
        let dest_buf = crate::localfs::text_path(&att.local_uri);
        let dest = dest_buf.as_path();
        let size = att.size.max(0) as u64;
        // Placed before a crash took the store write with it, or put there by hand.
        if local_matches(dest, size, &att.sha256) {
            let m = fs::metadata(dest).map(|m| mtime_ns(&m)).unwrap_or(0);
            self.store
                .borrow_mut()
                .with_room(|s| s.download_done(&att.id, m, "already_local"))?;
            return Ok(Done::Finished);
        }
        match self.fetch(att, dest, size, ticket) {
            Ok(()) => {
                let m = fs::metadata(dest).map(|m| mtime_ns(&m)).unwrap_or(0);
                self.store
                    .borrow_mut()
                    .with_room(|s| s.download_done(&att.id, m, "downloaded"))?;
                Ok(Done::Finished)
            }
            Err(e) => self.failed_attempt(att, e),
        }
    }

    fn fetch(
        &self,
        att: &Attachment,
        dest: &Path,
        size: u64,
        ticket: &Ticket,
    ) -> Result<(), RemoteError> {
        let local = |what: &str, p: &Path, e: io::Error| {
            RemoteError::transient("local_io", format!("{what} {}: {e}", p.display()))
        };
        let dir = dest.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(|e| local("create directory", dir, e))?;
        let part = part_path(dest);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part)
            .map_err(|e| local("open", &part, e))?;
        let mut have = file.metadata().map_err(|e| local("stat", &part, e))?.len();
        if have > size {
            file.set_len(0).map_err(|e| local("truncate", &part, e))?;
            have = 0;
        }
        // What is on disk already counts: hash it, go on from its end.
        let mut hasher = Sha256::new();
        if have > 0 {
            let mut r = (&file).take(have);
            io::copy(&mut r, &mut hasher).map_err(|e| local("read", &part, e))?;
            info!(id = %att.id, path = %att.local_uri, resume_at = have, "download resumes");
        }
        file.seek(SeekFrom::Start(have))
            .map_err(|e| local("seek", &part, e))?;

        let mut last_write = Instant::now();
        let mut progress = |n: u64| {
            if last_write.elapsed() >= PROGRESS_EVERY {
                last_write = Instant::now();
                let _ = self.store.borrow().set_progress(&att.id, n as i64);
            }
        };
        let mut w = PartWriter {
            file,
            hasher,
            written: have,
            synced_at: have,
            limit: size,
            too_long: false,
            progress: &mut progress,
        };
        let started = Instant::now();
        let keep_going = || self.shared.keep_going() && ticket.may_continue();
        let result = if have < size || size == 0 {
            self.remote.download(
                &att.object_key,
                have,
                &mut w,
                &DownloadCtx {
                    keep_going: &keep_going,
                    throttle: &|n| ticket.throttle(n),
                },
            )
        } else {
            Ok(0)
        };
        let mismatch = |code: &str, msg: String| {
            let _ = fs::remove_file(&part);
            RemoteError::permanent(code, msg)
        };
        if w.too_long {
            return Err(mismatch(
                "size_mismatch",
                format!(
                    "{} is larger than the {size} bytes assigned",
                    att.object_key
                ),
            ));
        }
        let got = match result {
            Ok(n) => n,
            Err(e) => {
                if w.written == 0 {
                    // Nothing arrived (a 404, a refused connection): leave no empty file.
                    let _ = fs::remove_file(&part);
                } else {
                    let _ = w.file.sync_data();
                }
                return Err(e);
            }
        };
        // Keep what arrived for the next attempt's resume, even when it fails below.
        w.file.sync_data().map_err(|e| local("fsync", &part, e))?;
        if w.written != size {
            // The object is shorter than assigned (a complete answer, not a broken one).
            return Err(mismatch(
                "size_mismatch",
                format!(
                    "{} has {} bytes, the assignment says {size}",
                    att.object_key, w.written
                ),
            ));
        }
        let sha = hex(&w.hasher.finalize());
        if sha != att.sha256 {
            return Err(mismatch(
                "checksum_mismatch",
                format!(
                    "{} hashes to {sha}, the assignment says {}",
                    att.object_key, att.sha256
                ),
            ));
        }
        drop(w.file);
        // The bytes are on disk (fsynced above) before the name points at them. The
        // rename itself is not fsynced: should a power cut lose it, start-up repair finds
        // the file missing, queues it again, and the complete temp file is renamed then
        // without a byte fetched. That saves a directory fsync per file.
        fs::rename(&part, dest).map_err(|e| local("rename", dest, e))?;
        let secs = started.elapsed().as_secs_f64();
        info!(id = %att.id, key = %att.object_key, path = %att.local_uri, bytes = size,
              fetched = got, mb_per_s = format!("{:.1}", got as f64 / 1e6 / secs.max(1e-6)),
              "downloaded");
        Ok(())
    }

    fn failed_attempt(&self, att: &Attachment, e: RemoteError) -> Result<Done, StoreError> {
        let class = match &e.class {
            ErrorClass::Interrupted => {
                debug!(id = %att.id, "download stopped at a safe point");
                return Ok(Done::Interrupted);
            }
            ErrorClass::ClockSkew => {
                warn!(id = %att.id, error = %e, "remote refused the device clock; download waits");
                self.store
                    .borrow_mut()
                    .hold_without_attempt(&att.id, &e.code, &e.message)?;
                return Ok(Done::ClockSkewed);
            }
            // A refused or missing key is that file's problem (the other files may be
            // readable): counted against `permanent_attempts`, then `failed`.
            ErrorClass::Auth
            | ErrorClass::Permanent
            | ErrorClass::LocalChanged
            | ErrorClass::LocalMissing => ErrorClass::Permanent,
            t @ ErrorClass::Transient { .. } => {
                self.gov.network_failed();
                t.clone()
            }
        };
        match crate::scheduler::record_failure(
            &mut self.store.borrow_mut(),
            self.cfg,
            att,
            &class,
            &e,
            "download",
        ) {
            // Unassigned (archived) meanwhile: nothing left to fail.
            Ok(()) | Err(StoreError::BadTransition { .. }) => {}
            Err(e) => return Err(e),
        }
        Ok(Done::Finished)
    }
}
