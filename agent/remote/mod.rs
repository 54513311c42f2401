//! Remote storage: one trait, one implementation per backend.
//!
//! A remote only moves bytes; it never touches queue state. What it needs to resume (a
//! multipart upload id and the acknowledged parts) it reads and writes through the
//! [`ResumeLog`] the uploader hands it, which commits to the store as each part finishes.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::store::PartRecord;

pub mod file;
pub mod http;
mod net;
pub mod s3;

pub use net::HttpClient;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteKind {
    File,
    S3,
    Http,
}

/// `[remote]`: which remote uploads go to, and each kind's own table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteConfig {
    /// Which remote uploads go to; its own table below holds its settings.
    pub kind: RemoteKind,
    /// First component of every object key.
    pub prefix: String,
    pub file: Option<file::FileConfig>,
    pub s3: Option<s3::S3Config>,
    pub http: Option<http::HttpConfig>,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            kind: RemoteKind::File,
            prefix: "fieldsync".into(),
            file: None,
            s3: None,
            http: None,
        }
    }
}

impl RemoteConfig {
    /// Checks what the types cannot: the key and what is expected. Only the table of the
    /// configured kind is checked (the others may be kept for later).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: &str| Err((k.to_string(), m.to_string()));
        if self.prefix.starts_with('/') || self.prefix.contains("..") {
            return bad(
                "remote.prefix",
                "expected a relative key prefix without `..`",
            );
        }
        match self.kind {
            RemoteKind::File if self.file.is_none() => bad(
                "remote.file",
                "expected a [remote.file] table with `path` when remote.kind = \"file\"",
            ),
            RemoteKind::File => Ok(()),
            RemoteKind::S3 => match &self.s3 {
                None => bad(
                    "remote.s3",
                    "expected a [remote.s3] table when remote.kind = \"s3\"",
                ),
                Some(s3) => s3.validate(),
            },
            RemoteKind::Http => match &self.http {
                None => bad(
                    "remote.http",
                    "expected a [remote.http] table when remote.kind = \"http\"",
                ),
                Some(h) => h.validate(),
            },
        }
    }
}

/// Why a remote operation did not succeed; drives the retry decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorClass {
    /// Timeouts, resets, 5xx, 408, 429, a full or read-only target: retry with backoff.
    Transient { retry_after: Option<Duration> },
    /// The request can never succeed as is (4xx, a local file that cannot be read).
    Permanent,
    /// Credentials were refused (401/403): pause the whole queue, do not burn retries.
    Auth,
    /// The server refused the request's time (`RequestTimeTooSkewed`, or a 401/403 while
    /// the local clock is far from the server's `Date`): the device clock is wrong, so
    /// every request would fail the same way. Pause the queue until the clock is right.
    ClockSkew,
    /// The local file's bytes no longer hash to the ingest sha256: re-ingest it.
    LocalChanged,
    /// The local file vanished.
    LocalMissing,
    /// `keep_going` said stop (shutdown, pause, a condition turned false); nothing failed.
    Interrupted,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RemoteError {
    pub class: ErrorClass,
    /// A stable reason code (`io`, `http_503`, `read_error`, `checksum_mismatch`, …).
    pub code: String,
    /// One line for operators. Never contains credentials.
    pub message: String,
}

impl RemoteError {
    pub fn new(class: ErrorClass, code: impl Into<String>, message: impl Into<String>) -> Self {
        RemoteError {
            class,
            code: code.into(),
            message: message.into(),
        }
    }
    pub fn transient(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Transient { retry_after: None }, code, message)
    }
    pub fn permanent(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Permanent, code, message)
    }
    pub fn interrupted() -> Self {
        Self::new(
            ErrorClass::Interrupted,
            "interrupted",
            "stopped at a safe point",
        )
    }
}

/// What to upload.
#[derive(Debug, Clone)]
pub struct UploadJob {
    pub id: String,
    pub key: String,
    pub path: PathBuf,
    pub size: u64,
    /// Hex sha256 taken at ingest; the bytes sent must hash to it.
    pub sha256: String,
    pub media_type: String,
    /// The caller proved the file unchanged since it was hashed (its ctime, which every
    /// write updates, is the one recorded at ingest) and checks again after the upload:
    /// the remote need not hash the bytes a second time to compare with `sha256`. When
    /// false, the remote must hash what it sends and refuse a mismatch (`LocalChanged`).
    pub verified: bool,
}

/// Resume state of one upload, persisted by the caller as it changes.
pub trait ResumeLog {
    /// The multipart upload in progress and its part size, if any.
    fn current(&self) -> Option<(String, u64)>;
    /// Parts already acknowledged by the server.
    fn parts(&self) -> Vec<PartRecord>;
    /// A new multipart upload was created: forget old parts. An error means the id is not
    /// remembered: the remote aborts that upload and the attempt fails (transient), so a
    /// crash cannot leave an upload nobody knows of.
    fn begin(&mut self, upload_id: &str, part_size: u64) -> Result<(), RemoteError>;
    /// The server acknowledged a part: commit it now. An error (the queue database is
    /// locked or full) stops the attempt before another part is sent, so the bound "a
    /// crash re-sends at most the part in flight" holds; the retry resumes from the parts
    /// that were committed.
    fn part_done(&mut self, part: &PartRecord) -> Result<(), RemoteError>;
    /// The multipart upload is over (completed, aborted or unknown to the server).
    fn clear(&mut self);
}

/// Everything an upload needs from the caller besides the job.
pub struct UploadCtx<'a> {
    /// Called with the bytes of the object confirmed or in flight so far.
    pub progress: &'a mut dyn FnMut(u64),
    /// Checked at safe points (between parts and chunks); false means stop now.
    pub keep_going: &'a (dyn Fn() -> bool + Sync),
    /// Called with the size of each chunk before it is sent; blocks as long as the rate
    /// limit requires and accounts the bytes (data budget). Remotes call it for every
    /// chunk of request body they send.
    pub throttle: &'a (dyn Fn(u64) + Sync),
    pub resume: &'a mut dyn ResumeLog,
}

/// What a download needs from the caller.
pub struct DownloadCtx<'a> {
    /// Checked at safe points (between chunks); false means stop now.
    pub keep_going: &'a (dyn Fn() -> bool + Sync),
    /// Called with the size of each chunk received; blocks as the rate limit requires and
    /// accounts the bytes (data budget).
    pub throttle: &'a (dyn Fn(u64) + Sync),
}

/// The answer of [`Remote::fetch_if_changed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// The object still has the tag given.
    Unchanged,
    /// No such object.
    Missing,
    /// The object's bytes and the tag to send next time.
    Changed { body: Vec<u8>, tag: Option<String> },
}

/// Bodies of [`Remote::fetch_if_changed`] above this are refused: an assignments file is
/// a list of keys, not a payload.
pub const MAX_SMALL_OBJECT: u64 = 4 * 1024 * 1024;

/// What the remote confirmed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uploaded {
    pub etag: Option<String>,
    /// Bytes actually sent over the wire by this call (for data budgets).
    pub bytes_sent: u64,
}

/// An object as the remote reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteObject {
    pub size: u64,
    pub etag: Option<String>,
    /// Hex sha256 when the remote knows it (file remote, or a stored checksum).
    pub sha256: Option<String>,
}

pub trait Remote: Send + Sync {
    /// A short name for logs and status (`file`, `s3`, `http`).
    fn kind(&self) -> &'static str;

    /// Where objects go, for status and logs (never with credentials).
    fn describe(&self) -> String;

    /// Uploads `job.path` to `job.key`; only returns `Ok` once the remote has the exact
    /// bytes (checksum verified).
    fn upload(&self, job: &UploadJob, ctx: &mut UploadCtx<'_>) -> Result<Uploaded, RemoteError>;

    /// The object at `key`, if it exists: used to make a retry after an unknown outcome
    /// idempotent.
    fn head(&self, key: &str) -> Result<Option<RemoteObject>, RemoteError>;

    /// Writes the object at `key` from byte `offset` on to `out` (a Range request, so an
    /// interrupted download resumes from what is on disk), returning the bytes written.
    /// A server that ignores the range is handled here: the bytes before `offset` are
    /// read and dropped, so `out` always receives the object from `offset`.
    fn download(
        &self,
        key: &str,
        offset: u64,
        out: &mut dyn Write,
        ctx: &DownloadCtx<'_>,
    ) -> Result<u64, RemoteError>;

    /// A small object (the assignments file) unless it is unchanged since `tag`: ETag and
    /// If-None-Match for `s3`/`http`, size and mtime for `file`.
    fn fetch_if_changed(&self, key: &str, tag: Option<&str>) -> Result<Fetched, RemoteError>;

    /// Removes the object at `key`; absent is success.
    fn delete(&self, key: &str) -> Result<(), RemoteError>;

    /// Uploads small in-memory content (checklist manifests).
    fn put_bytes(&self, key: &str, bytes: &[u8], media_type: &str) -> Result<(), RemoteError>;

    /// Aborts an abandoned multipart upload; remotes without multipart have nothing to do.
    fn abort_upload(&self, _key: &str, _upload_id: &str) -> Result<(), RemoteError> {
        Ok(())
    }

    /// A cheap check that the remote answers and accepts our credentials.
    fn probe(&self) -> Result<(), RemoteError>;

    /// Re-reads the credentials: from `cfg` (a reloaded configuration) when given, else
    /// again from where the current ones came from (a rotated credentials or token file,
    /// the environment). Returns whether they changed; an error (starting with the key it
    /// is about) keeps the current ones. Remotes without credentials have nothing to do.
    fn reload_credentials(&self, _cfg: Option<&RemoteConfig>) -> Result<bool, String> {
        Ok(false)
    }
}

/// Builds the configured remote; `device_id` names this device to an `http` backend.
/// An error starts with the key it is about (`remote.s3.ca_bundle …`).
pub fn build(cfg: &RemoteConfig, device_id: &str) -> Result<Box<dyn Remote>, String> {
    let missing = |kind: &str| format!("remote.{kind}: missing [remote.{kind}] table");
    match cfg.kind {
        RemoteKind::File => {
            let f = cfg.file.as_ref().ok_or_else(|| missing("file"))?;
            Ok(Box::new(file::FileRemote::new(f.path.clone())))
        }
        RemoteKind::S3 => {
            let c = cfg.s3.as_ref().ok_or_else(|| missing("s3"))?;
            Ok(Box::new(s3::S3Remote::new(c)?))
        }
        RemoteKind::Http => {
            let c = cfg.http.as_ref().ok_or_else(|| missing("http"))?;
            Ok(Box::new(http::HttpRemote::new(c, device_id, &cfg.prefix)?))
        }
    }
}

/// Sanitises one component of an object key: no separators, no `.`/`..`, no control
/// characters. Unicode and spaces are kept (every S3-compatible store accepts UTF-8).
pub fn key_component(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    match cleaned.as_str() {
        "" => "_".into(),
        "." | ".." => cleaned.replace('.', "_"),
        _ => cleaned,
    }
}

/// The deterministic object key of DESIGN.md:
/// `<prefix>/<device>/<checklist>/<row>/<attachment-id>.<ext>`.
pub fn object_key(
    prefix: &str,
    device: &str,
    checklist: &str,
    row: &str,
    id: &str,
    ext: &str,
) -> String {
    let mut parts: Vec<String> = Vec::new();
    let prefix = prefix.trim_matches('/');
    if !prefix.is_empty() {
        parts.push(prefix.to_string());
    }
    parts.push(key_component(device));
    parts.push(key_component(checklist));
    if !row.is_empty() {
        parts.push(key_component(row));
    }
    let ext = ext.to_ascii_lowercase();
    if ext.is_empty() {
        parts.push(id.to_string());
    } else {
        parts.push(format!("{id}.{}", key_component(&ext)));
    }
    parts.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_deterministic_and_safe() {
        assert_eq!(
            object_key("fieldsync", "dev1", "c1", "r2", "abc", "JPG"),
            "fieldsync/dev1/c1/r2/abc.jpg"
        );
        assert_eq!(
            object_key("", "dev1", "unassigned", "", "abc", ""),
            "dev1/unassigned/abc"
        );
        assert_eq!(key_component(".."), "__");
        assert_eq!(key_component("a/b"), "a_b");
        assert_eq!(key_component("Pumpe 3 – Ölstand"), "Pumpe 3 – Ölstand");
    }
}
