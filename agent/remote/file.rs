//! The `file` remote: a directory (a mounted NAS share, a USB drive, the demo folder).
//!
//! Objects are written to a temporary name beside their final path, fsynced, renamed into
//! place and the directory fsynced: a crash leaves either no object or the whole object.
//! The root must already exist: an unmounted share then fails loudly (transient) instead
//! of filling the device's own disk.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{
    DownloadCtx, ErrorClass, Fetched, Remote, RemoteError, RemoteObject, UploadCtx, UploadJob,
    Uploaded,
};
use crate::util::hex;

/// `[remote.file]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The directory objects are written to (a NAS mount, a USB drive, the demo folder).
    pub path: PathBuf,
    /// Create `path` at start when it is missing (the demo). Off by default: a real
    /// share must already be mounted, so an unmounted one fails instead of filling the
    /// device's own disk.
    #[serde(default)]
    pub create: bool,
}

/// Copy buffer; also the granularity of progress reports and stop checks.
const CHUNK: usize = 256 * 1024;

pub struct FileRemote {
    root: PathBuf,
}

impl FileRemote {
    pub fn new(root: PathBuf) -> Self {
        FileRemote { root }
    }

    fn path_of(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn check_root(&self) -> Result<(), RemoteError> {
        match fs::metadata(&self.root) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(RemoteError::transient(
                "remote_unavailable",
                format!("{} is not a directory", self.root.display()),
            )),
            Err(e) => Err(RemoteError::transient(
                "remote_unavailable",
                format!("{}: {e}", self.root.display()),
            )),
        }
    }

    /// Writes `src` to `key` atomically, hashing as it goes; `expect` is the sha256 the
    /// bytes must have, checked before the rename makes the object visible.
    fn write_atomic(
        &self,
        key: &str,
        src: &mut dyn Read,
        expect: Option<&str>,
        progress: &mut dyn FnMut(u64),
        keep_going: &dyn Fn() -> bool,
        throttle: &dyn Fn(u64),
    ) -> Result<u64, RemoteError> {
        self.check_root()?;
        let dest = self.path_of(key);
        let dir = dest.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| remote_io("create directory", &dir, e))?;
        let tmp = dir.join(format!(
            ".{}.fieldsync-tmp",
            dest.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("object")
        ));
        let result = (|| {
            let mut out = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(|e| remote_io("create", &tmp, e))?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0u64;
            loop {
                if !keep_going() {
                    return Err(RemoteError::interrupted());
                }
                let n = match src.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(local_read_error(e)),
                };
                throttle(n as u64);
                if expect.is_some() {
                    hasher.update(&buf[..n]);
                }
                out.write_all(&buf[..n])
                    .map_err(|e| remote_io("write", &tmp, e))?;
                total += n as u64;
                progress(total);
            }
            if let Some(expect) = expect {
                let got = hex(&hasher.finalize());
                if got != expect {
                    return Err(RemoteError::new(
                        ErrorClass::LocalChanged,
                        "checksum_mismatch",
                        format!("local bytes hash to {got}, expected {expect}"),
                    ));
                }
            }
            out.sync_all().map_err(|e| remote_io("fsync", &tmp, e))?;
            drop(out);
            fs::rename(&tmp, &dest).map_err(|e| remote_io("rename", &dest, e))?;
            if let Ok(d) = File::open(&dir) {
                let _ = d.sync_all();
            }
            Ok(total)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

/// A failure on the remote side of a file copy: the share may come back (remount, space
/// freed, permissions fixed), so it is transient.
fn remote_io(what: &str, path: &Path, e: io::Error) -> RemoteError {
    let code = match e.kind() {
        // Its own code, so status says plainly why uploads wait (space freed on the
        // share: they go on by themselves).
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => "remote_full",
        _ => "remote_io",
    };
    RemoteError::transient(code, format!("{what} {}: {e}", path.display()))
}

/// A failure reading the local file.
pub fn local_read_error(e: io::Error) -> RemoteError {
    if let Some(r) = crate::localfs::refused(&e) {
        let line = r.to_string();
        let message = line.strip_prefix("not_regular_file: ").unwrap_or(&line);
        return RemoteError::permanent("not_regular_file", message);
    }
    match e.kind() {
        io::ErrorKind::NotFound => {
            RemoteError::new(ErrorClass::LocalMissing, "file_missing", e.to_string())
        }
        _ => RemoteError::permanent("read_error", e.to_string()),
    }
}

impl Remote for FileRemote {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn describe(&self) -> String {
        format!("file:{}", self.root.display())
    }

    fn upload(&self, job: &UploadJob, ctx: &mut UploadCtx<'_>) -> Result<Uploaded, RemoteError> {
        let mut f = crate::localfs::open_regular(&job.path).map_err(local_read_error)?;
        // Hash while copying only when the uploader could not prove the file unchanged
        // since ingest (it re-checks after the upload either way).
        let expect = (!job.verified).then_some(job.sha256.as_str());
        let n = self.write_atomic(
            &job.key,
            &mut f,
            expect,
            ctx.progress,
            ctx.keep_going,
            ctx.throttle,
        )?;
        Ok(Uploaded {
            etag: None,
            bytes_sent: n,
        })
    }

    fn head(&self, key: &str) -> Result<Option<RemoteObject>, RemoteError> {
        self.check_root()?;
        let p = self.path_of(key);
        let f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(remote_io("open", &p, e)),
        };
        let size = f.metadata().map_err(|e| remote_io("stat", &p, e))?.len();
        let mut hasher = Sha256::new();
        io::copy(&mut io::BufReader::new(f), &mut hasher).map_err(|e| remote_io("read", &p, e))?;
        Ok(Some(RemoteObject {
            size,
            etag: None,
            sha256: Some(hex(&hasher.finalize())),
        }))
    }

    fn download(
        &self,
        key: &str,
        offset: u64,
        out: &mut dyn Write,
        ctx: &DownloadCtx<'_>,
    ) -> Result<u64, RemoteError> {
        self.check_root()?;
        let p = self.path_of(key);
        let mut src = File::open(&p).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                RemoteError::permanent("not_found", format!("no object {key}"))
            }
            _ => remote_io("open", &p, e),
        })?;
        src.seek(SeekFrom::Start(offset))
            .map_err(|e| remote_io("seek", &p, e))?;
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            if !(ctx.keep_going)() {
                return Err(RemoteError::interrupted());
            }
            let n = match src.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(remote_io("read", &p, e)),
            };
            (ctx.throttle)(n as u64);
            out.write_all(&buf[..n]).map_err(|e| {
                RemoteError::transient("local_io", format!("download {key}: write: {e}"))
            })?;
            total += n as u64;
        }
    }

    fn fetch_if_changed(&self, key: &str, tag: Option<&str>) -> Result<Fetched, RemoteError> {
        self.check_root()?;
        let p = self.path_of(key);
        let m = match fs::metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Fetched::Missing),
            Err(e) => return Err(remote_io("stat", &p, e)),
        };
        // A share has no ETag: size and mtime stand in for it.
        let now = format!("{}-{}", m.len(), crate::util::mtime_ns(&m));
        if tag == Some(now.as_str()) {
            return Ok(Fetched::Unchanged);
        }
        if m.len() > super::MAX_SMALL_OBJECT {
            return Err(RemoteError::permanent(
                "too_large",
                format!("{key}: {} bytes is too large", m.len()),
            ));
        }
        let body = fs::read(&p).map_err(|e| remote_io("read", &p, e))?;
        Ok(Fetched::Changed {
            body,
            tag: Some(now),
        })
    }

    fn delete(&self, key: &str) -> Result<(), RemoteError> {
        let p = self.path_of(key);
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(remote_io("delete", &p, e)),
        }
    }

    fn put_bytes(&self, key: &str, bytes: &[u8], _media_type: &str) -> Result<(), RemoteError> {
        let mut src = bytes;
        self.write_atomic(key, &mut src, None, &mut |_| {}, &|| true, &|_| {})
            .map(|_| ())
    }

    fn probe(&self) -> Result<(), RemoteError> {
        self.check_root()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::ResumeLog;
    use crate::store::PartRecord;

    struct NoResume;
    impl ResumeLog for NoResume {
        fn current(&self) -> Option<(String, u64)> {
            None
        }
        fn parts(&self) -> Vec<PartRecord> {
            vec![]
        }
        fn begin(&mut self, _: &str, _: u64) -> Result<(), RemoteError> {
            Ok(())
        }
        fn part_done(&mut self, _: &PartRecord) -> Result<(), RemoteError> {
            Ok(())
        }
        fn clear(&mut self) {}
    }

    fn job(path: &Path, sha: &str) -> UploadJob {
        UploadJob {
            id: "id1".into(),
            key: "p/dev/c/r/id1.jpg".into(),
            path: path.to_path_buf(),
            size: 5,
            sha256: sha.into(),
            media_type: "image/jpeg".into(),
            verified: false,
        }
    }

    #[test]
    fn uploads_atomically_and_refuses_changed_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("remote");
        fs::create_dir(&root).unwrap();
        let src = dir.path().join("a.jpg");
        fs::write(&src, b"hello").unwrap();
        let r = FileRemote::new(root.clone());
        let good = hex(&Sha256::digest(b"hello"));
        let mut progress = |_| {};
        let keep = || true;
        let mut resume = NoResume;
        let mut ctx = UploadCtx {
            progress: &mut progress,
            keep_going: &keep,
            throttle: &|_| {},
            resume: &mut resume,
        };
        r.upload(&job(&src, &good), &mut ctx).unwrap();
        assert_eq!(fs::read(root.join("p/dev/c/r/id1.jpg")).unwrap(), b"hello");
        let head = r.head("p/dev/c/r/id1.jpg").unwrap().unwrap();
        assert_eq!(head.sha256.as_deref(), Some(good.as_str()));

        let err = r.upload(&job(&src, "00"), &mut ctx).unwrap_err();
        assert_eq!(err.class, ErrorClass::LocalChanged);
        // The good object is untouched and no temp file is left behind.
        assert_eq!(fs::read(root.join("p/dev/c/r/id1.jpg")).unwrap(), b"hello");
        assert_eq!(fs::read_dir(root.join("p/dev/c/r")).unwrap().count(), 1);
    }

    #[test]
    fn missing_root_is_transient() {
        let r = FileRemote::new("/nonexistent/fieldsync-remote".into());
        let e = r.probe().unwrap_err();
        assert!(matches!(e.class, ErrorClass::Transient { .. }));
    }
}
