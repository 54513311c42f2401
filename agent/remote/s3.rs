//! The `s3` remote: any S3-compatible store (AWS S3, MinIO, R2, Ceph RGW, Garage).
//!
//! Requests are signed with SigV4 by `rusty-s3` (sans-IO: it only produces presigned
//! URLs) and sent with a blocking `ureq` agent over rustls. Files at or below
//! `multipart_threshold` go in one PUT; larger ones use a multipart upload whose id and
//! acknowledged parts are committed through the [`ResumeLog`] as each part finishes, so a
//! crash, kill -9 or reboot resumes at the next missing part. An upload id the server no
//! longer knows (expired, aborted, completed) starts a fresh multipart upload.
//!
//! Integrity: every PUT and part carries Content-MD5 and/or x-amz-checksum-sha256 that
//! the server verifies. Unless the uploader proved the file unchanged since ingest
//! (`UploadJob::verified`), the whole file is hashed again while it is sent and must match
//! the ingest sha256, which is also stored as `x-amz-meta-sha256` so `head` can prove that an
//! object left by an attempt with an unknown outcome is the right one.
//!
//! Credentials come from the config, a credentials file or the standard AWS environment
//! variables; they are never printed (see [`Secret`]) and are scrubbed from server text.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::Duration;

use rusty_s3::actions::{
    AbortMultipartUpload, CompleteMultipartUpload, CreateMultipartUpload, DeleteObject, GetObject,
    HeadBucket, HeadObject, ListParts, PutObject, S3Action, UploadPart,
};
use rusty_s3::{Bucket, Credentials, UrlStyle};
use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};
use tracing::{debug, info};

use super::net::{self, b64, HttpClient, Secret, WithHttpClient, MIB};
use super::{
    DownloadCtx, ErrorClass, Fetched, Remote, RemoteError, RemoteObject, UploadCtx, UploadJob,
    Uploaded,
};
use crate::store::PartRecord;
use crate::units::Size;
use crate::util::hex;

/// S3's limits on multipart uploads.
pub(super) const MIN_PART: u64 = 5 * MIB;
pub(super) const MAX_PART: u64 = 5 * 1024 * MIB;
pub(super) const MAX_PARTS: u64 = 10_000;
/// The largest object a single PUT may create.
pub(super) const MAX_SINGLE_PUT: u64 = 5 * 1024 * MIB;

/// Lifetime of the presigned URL of one request. The signature is checked when a request
/// starts, so this only has to cover the gap between signing and sending; short limits the
/// damage of a URL that leaks.
const SIGN_EXPIRY: Duration = Duration::from_secs(15 * 60);

/// How often the caller of a multipart upload reports the bytes of parts in flight (the
/// uploader persists progress at its own, slower, rate).
const PROGRESS_TICK: Duration = Duration::from_millis(250);

/// Metadata key holding the ingest sha256 (hex) of every object fieldsync writes.
const META_SHA256: &str = "x-amz-meta-sha256";

/// `[remote.s3]`: the keys below and the shared HTTP-client keys ([`HttpClient`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct S3Config {
    /// `ca_bundle`, `connect_timeout`, `read_timeout`, written in this table.
    #[serde(skip)]
    pub client: HttpClient,
    /// `https://s3.eu-central-1.amazonaws.com`, `http://minio.local:9000`, …
    pub endpoint: String,
    /// SigV4 signing region. Default `us-east-1` (what MinIO, Garage and Ceph expect).
    #[serde(default = "default_region")]
    pub region: String,
    pub bucket: String,
    /// `path` (`endpoint/bucket/key`, default: every S3-compatible store supports it) or
    /// `virtual_host` (`bucket.endpoint/key`).
    #[serde(default)]
    pub addressing: Addressing,
    /// Inline credentials; both or neither. Prefer `credentials_file` or the environment.
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<Secret>,
    #[serde(default)]
    pub session_token: Option<Secret>,
    /// An AWS shared-credentials file (`[profile]` with `aws_access_key_id`, …).
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// Section of `credentials_file`. Default `default`.
    #[serde(default = "default_profile")]
    pub profile: String,
    /// Files larger than this use multipart upload. Default 8 MiB.
    #[serde(default = "default_part")]
    pub multipart_threshold: Size,
    /// Part size of multipart uploads (5 MiB ..= 5 GiB); raised for files that would
    /// need more than 10,000 parts. Default 8 MiB.
    #[serde(default = "default_part")]
    pub part_size: Size,
    /// Which checksum the server verifies on every PUT and part. Default `sha256`.
    #[serde(default)]
    pub checksum: ChecksumMode,
    /// Parts of one file sent at once (1..=16). Each part streams from the file, so this
    /// costs sockets, not memory; but a crash or a dropped link re-sends every part that
    /// was in flight. Default 1: at most one part is ever sent twice, which is what a
    /// metered field link wants. Raise it (rclone uses 4) on fast unmetered links.
    #[serde(default = "default_part_concurrency")]
    pub part_concurrency: u32,
}

impl<'de> Deserialize<'de> for S3Config {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        net::with_client(d)
    }
}

impl WithHttpClient for S3Config {
    fn own_keys<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        S3Config::deserialize(d)
    }
    fn client_mut(&mut self) -> &mut HttpClient {
        &mut self.client
    }
}

fn default_part_concurrency() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Addressing {
    #[default]
    Path,
    VirtualHost,
}

/// `sha256` (x-amz-checksum-sha256: AWS, MinIO, Ceph, R2 and s3s verify it; the default),
/// `md5` (Content-MD5: understood by every S3-compatible store, also older ones), or
/// `both`. sha256 is the default because it costs least: a single PUT of a file unchanged
/// since ingest sends the ingest hash itself (no byte is hashed again), and where the CPU
/// has SHA instructions (x86 SHA-NI, ARMv8 crypto extensions) sha256 runs 2-3x as fast as
/// MD5, which has none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChecksumMode {
    Md5,
    #[default]
    Sha256,
    Both,
}

impl ChecksumMode {
    fn md5(self) -> bool {
        matches!(self, ChecksumMode::Md5 | ChecksumMode::Both)
    }
    fn sha256(self) -> bool {
        matches!(self, ChecksumMode::Sha256 | ChecksumMode::Both)
    }
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_profile() -> String {
    "default".into()
}
fn default_part() -> Size {
    Size(8 * MIB)
}

impl S3Config {
    /// Checks values the types cannot; returns the key and what is expected.
    pub fn validate(&self) -> Result<(), (String, String)> {
        self.validate_own().map_err(|(k, m)| (k.to_string(), m))?;
        self.client.validate("remote.s3")
    }

    fn validate_own(&self) -> Result<(), (&'static str, String)> {
        match url::Url::parse(&self.endpoint) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
                if u.query().is_some() {
                    return Err(("remote.s3.endpoint", "expected a URL without a query".into()));
                }
            }
            _ => {
                return Err((
                    "remote.s3.endpoint",
                    "expected an http:// or https:// URL such as \"https://s3.eu-central-1.amazonaws.com\"".into(),
                ))
            }
        }
        if !(1..=16).contains(&self.part_concurrency) {
            return Err((
                "remote.s3.part_concurrency",
                "expected a number from 1 to 16".into(),
            ));
        }
        if self.region.trim().is_empty() {
            return Err((
                "remote.s3.region",
                "expected a region such as \"us-east-1\"".into(),
            ));
        }
        let b = &self.bucket;
        if b.len() < 3
            || b.len() > 63
            || !b
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        {
            return Err((
                "remote.s3.bucket",
                "expected a bucket name of 3 to 63 lowercase letters, digits, `-` or `.`".into(),
            ));
        }
        match (&self.access_key_id, &self.secret_access_key) {
            (Some(_), None) => {
                return Err((
                    "remote.s3.secret_access_key",
                    "expected it too when access_key_id is set".into(),
                ))
            }
            (None, Some(_)) => {
                return Err((
                    "remote.s3.access_key_id",
                    "expected it too when secret_access_key is set".into(),
                ))
            }
            (Some(k), Some(s)) if k.is_empty() || s.is_empty() => {
                return Err((
                    "remote.s3.access_key_id",
                    "expected non-empty access_key_id and secret_access_key".into(),
                ))
            }
            _ => {}
        }
        if self.access_key_id.is_some() && self.credentials_file.is_some() {
            return Err((
                "remote.s3.credentials_file",
                "expected either inline keys or a credentials_file, not both".into(),
            ));
        }
        if !(MIN_PART..=MAX_PART).contains(&self.part_size.0) {
            return Err((
                "remote.s3.part_size",
                "expected a size from 5 MiB to 5 GiB (S3's part limits)".into(),
            ));
        }
        if self.multipart_threshold.0 > MAX_SINGLE_PUT {
            return Err((
                "remote.s3.multipart_threshold",
                "expected at most 5 GiB (S3's single PUT limit)".into(),
            ));
        }
        Ok(())
    }
}

/// Where the credentials came from, for the start-up log (never the values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSource {
    Config,
    File,
    Environment,
}

impl CredentialSource {
    fn as_str(self) -> &'static str {
        match self {
            CredentialSource::Config => "config",
            CredentialSource::File => "credentials_file",
            CredentialSource::Environment => "environment",
        }
    }
}

/// Inline keys, else the credentials file, else `AWS_ACCESS_KEY_ID` /
/// `AWS_SECRET_ACCESS_KEY` (/ `AWS_SESSION_TOKEN`).
pub fn resolve_credentials(
    cfg: &S3Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Credentials, CredentialSource), String> {
    let make = |k: String, s: String, t: Option<String>| match t.filter(|t| !t.is_empty()) {
        Some(t) => Credentials::new_with_token(k, s, t),
        None => Credentials::new(k, s),
    };
    if let (Some(k), Some(s)) = (&cfg.access_key_id, &cfg.secret_access_key) {
        let t = cfg.session_token.as_ref().map(|t| t.expose().to_string());
        return Ok((
            make(k.clone(), s.expose().to_string(), t),
            CredentialSource::Config,
        ));
    }
    if let Some(path) = &cfg.credentials_file {
        let text = fs::read_to_string(path)
            .map_err(|e| format!("remote.s3.credentials_file {}: {e}", path.display()))?;
        let section = ini_section(&text, &cfg.profile);
        let get = |k: &str| section.get(k).cloned().filter(|v| !v.is_empty());
        return match (get("aws_access_key_id"), get("aws_secret_access_key")) {
            (Some(k), Some(s)) => Ok((
                make(k, s, get("aws_session_token")),
                CredentialSource::File,
            )),
            _ => Err(format!(
                "remote.s3.credentials_file {}: no aws_access_key_id and aws_secret_access_key in [{}]",
                path.display(),
                cfg.profile
            )),
        };
    }
    match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        (Some(k), Some(s)) if !k.is_empty() && !s.is_empty() => Ok((
            make(k, s, env("AWS_SESSION_TOKEN")),
            CredentialSource::Environment,
        )),
        _ => Err("remote.s3: no credentials: set access_key_id and secret_access_key, or credentials_file, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into()),
    }
}

/// `key = value` pairs of one `[section]` of an INI file (the AWS credentials format).
fn ini_section(text: &str, want: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            inside = name == want || name == format!("profile {want}");
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
    }
    out
}

/// The part size for a file: the configured one, raised (in whole MiB) so the file fits
/// in S3's 10,000 parts.
pub fn part_size_for(size: u64, configured: u64) -> u64 {
    let min_for_count = size.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB;
    configured.max(min_for_count).clamp(MIN_PART, MAX_PART)
}

pub struct S3Remote {
    bucket: Bucket,
    /// Swapped when the credentials are re-read (a reload, or a refusal that a rotated
    /// credentials file may explain); each request signs with the current ones.
    creds: RwLock<Arc<Credentials>>,
    /// Where the credentials come from (inline, a file, the environment).
    cred_source: Mutex<S3Config>,
    agent: ureq::Agent,
    threshold: u64,
    part_size: u64,
    checksum: ChecksumMode,
    part_concurrency: usize,
    describe: String,
}

/// Why a multipart attempt stopped: a remote error, or the server forgot the upload id.
enum Fail {
    Remote(RemoteError),
    NoSuchUpload,
}

impl From<RemoteError> for Fail {
    fn from(e: RemoteError) -> Fail {
        Fail::Remote(e)
    }
}

type Resp = ureq::http::Response<ureq::Body>;

impl S3Remote {
    pub fn new(cfg: &S3Config) -> Result<S3Remote, String> {
        Self::with_env(cfg, &|k| std::env::var(k).ok())
    }

    pub fn with_env(
        cfg: &S3Config,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<S3Remote, String> {
        cfg.validate().map_err(|(k, m)| format!("{k}: {m}"))?;
        let (creds, source) = resolve_credentials(cfg, env)?;
        let endpoint =
            url::Url::parse(&cfg.endpoint).map_err(|e| format!("remote.s3.endpoint: {e}"))?;
        let style = match cfg.addressing {
            Addressing::Path => UrlStyle::Path,
            Addressing::VirtualHost => UrlStyle::VirtualHost,
        };
        let bucket = Bucket::new(
            endpoint.clone(),
            style,
            cfg.bucket.clone(),
            cfg.region.clone(),
        )
        .map_err(|e| format!("remote.s3.endpoint: {e}"))?;
        let agent = net::agent(&cfg.client, "remote.s3", endpoint.scheme() == "https")?;
        info!(credentials = source.as_str(), bucket = %cfg.bucket, "s3 remote configured");
        Ok(S3Remote {
            bucket,
            creds: RwLock::new(Arc::new(creds)),
            cred_source: Mutex::new(cfg.clone()),
            agent,
            threshold: cfg.multipart_threshold.0,
            part_size: cfg.part_size.0,
            checksum: cfg.checksum,
            part_concurrency: cfg.part_concurrency as usize,
            describe: format!(
                "s3://{}/ at {}",
                cfg.bucket,
                endpoint.host_str().unwrap_or_default()
            ),
        })
    }

    /// The credentials requests are signed with now.
    fn creds(&self) -> Arc<Credentials> {
        self.creds.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Server text with any credential removed.
    fn scrub(&self, e: RemoteError) -> RemoteError {
        let creds = self.creds();
        let mut secrets = vec![creds.secret()];
        if let Some(t) = creds.token() {
            secrets.push(t);
        }
        RemoteError {
            message: net::scrub(e.message, &secrets),
            ..e
        }
    }

    /// [`net::answer_error`] without our credentials in the server's text.
    fn answer_error(&self, resp: Resp, what: &str) -> RemoteError {
        self.scrub(net::answer_error(resp, what))
    }

    fn is_no_such_upload(resp: &mut Resp) -> Option<String> {
        let body = net::read_body(resp);
        let says = net::parse_error_body(&body);
        if says.code.as_deref() == Some("NoSuchUpload") {
            None
        } else {
            Some(body)
        }
    }

    /// Headers of a body PUT: checksums per the mode, plus the ones given.
    fn checksum_headers(&self, d: &net::Digests) -> Vec<(&'static str, String)> {
        let mut h = Vec::new();
        if let (true, Some(md5)) = (self.checksum.md5(), d.md5) {
            h.push(("content-md5", b64(&md5)));
        }
        if let (true, Some(sha)) = (self.checksum.sha256(), d.sha256) {
            h.push(("x-amz-checksum-sha256", b64(&sha)));
        }
        h
    }

    /// Sends `len` bytes of `path` from `offset` as the body of a signed PUT to `url`.
    fn put_file(
        &self,
        url: &url::Url,
        headers: &[(&'static str, String)],
        body: &mut net::BodyReader<'_>,
        len: u64,
        what: &str,
    ) -> Result<Resp, RemoteError> {
        let mut req = self
            .agent
            .put(url.as_str())
            .header("content-length", len.to_string());
        if len > 0 {
            // Lets the server refuse (bad signature, no such upload) before the body is
            // sent: otherwise a 403 arrives as a reset halfway through a large part.
            req = req.header("expect", "100-continue");
        }
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        req.send(ureq::SendBody::from_reader(body))
            .map_err(|e| body.explain(e, what))
    }

    fn single_put(
        &self,
        job: &UploadJob,
        ctx: &mut UploadCtx<'_>,
    ) -> Result<Uploaded, RemoteError> {
        // A file unchanged since ingest needs no second look at its bytes for sha256: the
        // whole-object checksum is the ingest hash, and the server checks the body against
        // it. Otherwise the bytes about to go must first be shown to be the ingested ones.
        let ingest_sha = if job.verified {
            parse_hex32(&job.sha256)
        } else {
            None
        };
        let d = match ingest_sha {
            Some(sha) if !self.checksum.md5() => net::Digests {
                md5: None,
                sha256: Some(sha),
            },
            _ => {
                let mut d = net::digest_range(
                    &job.path,
                    0,
                    job.size,
                    self.checksum.md5(),
                    ingest_sha.is_none(),
                    None,
                )?;
                match ingest_sha {
                    Some(sha) => d.sha256 = Some(sha),
                    None => check_sha(&d.sha256.unwrap_or_default(), &job.sha256)?,
                }
                d
            }
        };
        if !(ctx.keep_going)() {
            return Err(RemoteError::interrupted());
        }
        let mut headers = self.checksum_headers(&d);
        headers.push((META_SHA256, job.sha256.clone()));
        headers.push(("content-type", job.media_type.clone()));
        let creds = self.creds();
        let mut action = PutObject::new(&self.bucket, Some(&*creds), &job.key);
        for (k, v) in &headers {
            action.headers_mut().insert(*k, v.clone());
        }
        let url = action.sign(SIGN_EXPIRY);
        let mut body = net::BodyReader::open(
            &job.path,
            0,
            job.size,
            0,
            ctx.throttle,
            ctx.keep_going,
            ctx.progress,
        )?;
        let resp = self.put_file(&url, &headers, &mut body, job.size, "put object")?;
        let sent = body.sent;
        if !resp.status().is_success() {
            return Err(self.answer_error(resp, "put object"));
        }
        Ok(Uploaded {
            etag: net::header(&resp, "etag"),
            bytes_sent: sent,
        })
    }

    fn create_multipart(&self, job: &UploadJob) -> Result<String, RemoteError> {
        let creds = self.creds();
        let mut action = CreateMultipartUpload::new(&self.bucket, Some(&*creds), &job.key);
        let mut headers: Vec<(&'static str, String)> = vec![
            (META_SHA256, job.sha256.clone()),
            ("content-type", job.media_type.clone()),
        ];
        if self.checksum.sha256() {
            headers.push(("x-amz-checksum-algorithm", "SHA256".into()));
        }
        for (k, v) in &headers {
            action.headers_mut().insert(*k, v.clone());
        }
        let url = action.sign(SIGN_EXPIRY);
        let mut req = self.agent.post(url.as_str());
        for (k, v) in &headers {
            req = req.header(*k, v.as_str());
        }
        let mut resp = req
            .send_empty()
            .map_err(|e| net::transport_error(e, "create multipart upload"))?;
        if !resp.status().is_success() {
            return Err(self.answer_error(resp, "create multipart upload"));
        }
        let body = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| net::transport_error(e, "create multipart upload"))?;
        CreateMultipartUpload::parse_response(&body)
            .map(|r| r.upload_id().to_string())
            .map_err(|e| {
                RemoteError::transient(
                    "bad_response",
                    format!("create multipart upload: unreadable answer: {e}"),
                )
            })
    }

    /// The parts the server holds for `upload_id` (number → (size, etag)).
    fn list_parts(&self, key: &str, upload_id: &str) -> Result<BTreeMap<u32, (u64, String)>, Fail> {
        let mut out = BTreeMap::new();
        let mut marker: Option<u16> = None;
        loop {
            let creds = self.creds();
            let mut action = ListParts::new(&self.bucket, Some(&*creds), key, upload_id);
            if let Some(m) = marker {
                action.set_part_number_marker(m);
            }
            let url = action.sign(SIGN_EXPIRY);
            let mut resp = self
                .agent
                .get(url.as_str())
                .call()
                .map_err(|e| net::transport_error(e, "list parts"))?;
            if resp.status().as_u16() == 404 {
                // NoSuchUpload (expired, aborted, completed); a missing bucket surfaces
                // with its own error when the fresh upload is created.
                return Err(Fail::NoSuchUpload);
            }
            if !resp.status().is_success() {
                return Err(self.answer_error(resp, "list parts").into());
            }
            let body = resp
                .body_mut()
                .with_config()
                .limit(16 * MIB)
                .read_to_string()
                .map_err(|e| net::transport_error(e, "list parts"))?;
            let (parts, next) = parse_list_parts(&body);
            for (number, size, etag) in parts {
                out.insert(number, (size, etag));
            }
            match next {
                Some(m) if Some(m) != marker => marker = Some(m),
                _ => break,
            }
        }
        Ok(out)
    }

    fn multipart(&self, job: &UploadJob, ctx: &mut UploadCtx<'_>) -> Result<Uploaded, Fail> {
        let size = job.size;
        // Resume what the store remembers, cross-checked against the server: a part
        // counts only if the server still holds it with the ETag we committed.
        let resumed = ctx.resume.current().is_some();
        let (upload_id, part_size, mut done) = match ctx.resume.current() {
            Some((uid, ps))
                if (MIN_PART..=MAX_PART).contains(&ps) && size.div_ceil(ps) <= MAX_PARTS =>
            {
                let server = self.list_parts(&job.key, &uid)?;
                let mut done = BTreeMap::new();
                for p in ctx.resume.parts() {
                    match server.get(&p.part_number) {
                        Some((sz, etag)) if *sz == p.size && same_etag(etag, &p.etag) => {
                            done.insert(p.part_number, p);
                        }
                        _ => {
                            debug!(id = %job.id, part = p.part_number, "part not on the server; sending it again")
                        }
                    }
                }
                info!(id = %job.id, parts_done = done.len(), "resuming multipart upload");
                (uid, ps, done)
            }
            _ => {
                let ps = part_size_for(size, self.part_size);
                let uid = self.create_multipart(job)?;
                if let Err(e) = ctx.resume.begin(&uid, ps) {
                    // Not remembered: no part may go into an upload a crash would orphan.
                    let _ = self.abort_upload(&job.key, &uid);
                    return Err(e.into());
                }
                (uid, ps, BTreeMap::new())
            }
        };
        let n_parts = size.div_ceil(part_size).max(1) as u32;
        // Parts already on the server (by number and size).
        let have: BTreeMap<u32, u64> = done.iter().map(|(n, p)| (*n, p.size)).collect();
        let mut confirmed: u64 = done.values().map(|p: &PartRecord| p.size).sum();
        let mut sent_now = 0u64;
        (ctx.progress)(confirmed);

        // A verified file (unchanged since ingest) sends several parts at once. Otherwise
        // the whole file must be hashed in order while it is sent, so one part at a time.
        let width = if job.verified {
            self.part_concurrency.max(1)
        } else {
            1
        }
        .min(n_parts as usize);
        let whole = (!job.verified).then(|| Mutex::new(Sha256::new()));
        let next = Mutex::new(1..=n_parts);
        let stop = AtomicBool::new(false);
        // Bytes of the part each sender has in flight: progress between acknowledgements.
        let in_flight: Vec<AtomicU64> = (0..width).map(|_| AtomicU64::new(0)).collect();
        let (keep_going, throttle) = (ctx.keep_going, ctx.throttle);
        let mut first_error: Option<Fail> = None;
        std::thread::scope(|scope| {
            let (rtx, rrx) = mpsc::channel::<(usize, Result<(PartRecord, u64), Fail>)>();
            let mut acks = Vec::new();
            for (w, slot) in in_flight.iter().enumerate() {
                let rtx = rtx.clone();
                // Invariant: a sender starts the body of its next part only after the
                // caller committed its previous one, so at most `width` parts are ever
                // sent but not committed (the ≤ 1 part re-sent after kill -9 at width 1).
                let (ack_tx, ack_rx) = mpsc::channel::<()>();
                acks.push(ack_tx);
                let (next, stop, have, whole, upload_id) =
                    (&next, &stop, &have, &whole, &upload_id);
                scope.spawn(move || {
                    // The next part this sender sends, read and hashed (its checksums):
                    // parts the server already holds are skipped (only fed to the
                    // whole-file hash, in order).
                    let prepare = || -> Option<(u32, u64, u64, Result<net::Digests, Fail>)> {
                        loop {
                            if stop.load(Ordering::Relaxed) {
                                return None;
                            }
                            let pn = next.lock().unwrap_or_else(|e| e.into_inner()).next()?;
                            let offset = (pn as u64 - 1) * part_size;
                            let len = part_size.min(size - offset);
                            if have.get(&pn) == Some(&len) {
                                if let Some(h) = whole {
                                    let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
                                    if let Err(e) = net::digest_range(
                                        &job.path,
                                        offset,
                                        len,
                                        false,
                                        false,
                                        Some(&mut h),
                                    ) {
                                        return Some((pn, offset, len, Err(e.into())));
                                    }
                                }
                                continue;
                            }
                            let d = self
                                .part_digests(job, offset, len, whole.as_ref())
                                .map_err(Fail::from);
                            return Some((pn, offset, len, d));
                        }
                    };
                    let mut awaiting_ack = false;
                    let mut upcoming = prepare();
                    while let Some((pn, offset, len, d)) = upcoming.take() {
                        // Hashing a part may overlap the commit of the previous one;
                        // sending it may not.
                        if awaiting_ack && ack_rx.recv().is_err() {
                            return;
                        }
                        let d = match d {
                            Ok(_) if !keep_going() => Err(RemoteError::interrupted().into()),
                            other => other,
                        };
                        let d = match d {
                            Ok(d) => d,
                            Err(e) => {
                                let _ = rtx.send((w, Err(e)));
                                return;
                            }
                        };
                        // The next part is read and hashed while this one is on the wire,
                        // so the link never waits for the disk or the hash between parts.
                        let (r, after) = std::thread::scope(|s| {
                            let ahead = s.spawn(prepare);
                            let r = self.send_part(
                                job, upload_id, pn, n_parts, offset, len, &d, resumed, throttle,
                                keep_going, slot,
                            );
                            (r, ahead.join().unwrap_or(None))
                        });
                        let failed = r.is_err();
                        if rtx.send((w, r)).is_err() || failed {
                            return;
                        }
                        awaiting_ack = true;
                        upcoming = after;
                    }
                });
            }
            drop(rtx);
            // Parts are committed here, on the caller's thread, as each is acknowledged;
            // between acknowledgements progress includes the bytes in flight.
            let mut last_moving = 0u64;
            loop {
                match rrx.recv_timeout(PROGRESS_TICK) {
                    Ok((w, Ok((rec, sent)))) => {
                        sent_now += sent;
                        in_flight[w].store(0, Ordering::Relaxed);
                        if let Err(e) = ctx.resume.part_done(&rec) {
                            // Not committed: no sender starts another part (each waits
                            // for an acknowledgement that now never comes).
                            stop.store(true, Ordering::Relaxed);
                            first_error.get_or_insert(e.into());
                            acks.clear();
                            continue;
                        }
                        confirmed += rec.size;
                        (ctx.progress)(confirmed);
                        done.insert(rec.part_number, rec);
                        if let Some(ack) = acks.get(w) {
                            let _ = ack.send(());
                        }
                    }
                    Ok((w, Err(e))) => {
                        in_flight[w].store(0, Ordering::Relaxed);
                        stop.store(true, Ordering::Relaxed);
                        first_error.get_or_insert(e);
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        let moving: u64 = in_flight.iter().map(|s| s.load(Ordering::Relaxed)).sum();
                        // Only news is reported: a stalled link writes nothing.
                        if moving > 0 && moving != last_moving {
                            (ctx.progress)(confirmed + moving);
                        }
                        last_moving = moving;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        });
        if let Some(e) = first_error {
            return Err(e);
        }
        if let Some(w) = whole {
            let got = hex(&w.into_inner().unwrap_or_else(|e| e.into_inner()).finalize());
            if got != job.sha256 {
                // The file changed under us: never complete it as a mix of versions.
                let _ = self.abort_upload(&job.key, &upload_id);
                ctx.resume.clear();
                return Err(RemoteError::new(
                    ErrorClass::LocalChanged,
                    "checksum_mismatch",
                    format!("local bytes hash to {got}, expected {}", job.sha256),
                )
                .into());
            }
        }
        let etag = self.complete(&job.key, &upload_id, &done, resumed)?;
        ctx.resume.clear();
        Ok(Uploaded {
            etag,
            bytes_sent: sent_now,
        })
    }

    /// The checksums of part `len` bytes at `offset`; `whole`, when given, receives the
    /// part's bytes for the whole-file hash (one part at a time, in order).
    fn part_digests(
        &self,
        job: &UploadJob,
        offset: u64,
        len: u64,
        whole: Option<&Mutex<Sha256>>,
    ) -> Result<net::Digests, RemoteError> {
        let mut w = whole.map(|w| w.lock().unwrap_or_else(|e| e.into_inner()));
        net::digest_range(
            &job.path,
            offset,
            len,
            self.checksum.md5(),
            self.checksum.sha256(),
            w.as_deref_mut(),
        )
    }

    /// Sends part `pn` (`len` bytes at `offset`, checksums `d`) and returns its record and
    /// the bytes sent. Runs on one of the part threads; `in_flight` follows the bytes of
    /// this part handed to the socket.
    #[allow(clippy::too_many_arguments)]
    fn send_part(
        &self,
        job: &UploadJob,
        upload_id: &str,
        pn: u32,
        n_parts: u32,
        offset: u64,
        len: u64,
        d: &net::Digests,
        resumed: bool,
        throttle: &(dyn Fn(u64) + Sync),
        keep_going: &(dyn Fn() -> bool + Sync),
        in_flight: &AtomicU64,
    ) -> Result<(PartRecord, u64), Fail> {
        let headers = self.checksum_headers(d);
        let creds = self.creds();
        let mut action =
            UploadPart::new(&self.bucket, Some(&*creds), &job.key, pn as u16, upload_id);
        for (k, v) in &headers {
            action.headers_mut().insert(*k, v.clone());
        }
        let url = action.sign(SIGN_EXPIRY);
        // The caller reports it with the parts already committed.
        let mut progress = |n: u64| in_flight.store(n, Ordering::Relaxed);
        let mut body = net::BodyReader::open(
            &job.path,
            offset,
            len,
            0,
            throttle,
            keep_going,
            &mut progress,
        )?;
        let what = format!("upload part {pn} of {n_parts}");
        let result = self.put_file(&url, &headers, &mut body, len, &what);
        let sent = body.sent;
        let mut resp = result?;
        if resp.status().as_u16() == 404 {
            match Self::is_no_such_upload(&mut resp) {
                None => return Err(Fail::NoSuchUpload),
                Some(b) => {
                    let says = net::parse_error_body(&b);
                    return Err(self
                        .scrub(net::status_error(404, None, &says, &what))
                        .into());
                }
            }
        }
        if resumed && resp.status().as_u16() == 403 && self.probe().is_ok() {
            // Some stores (s3s-fs among them) answer 403 rather than NoSuchUpload for
            // an upload id they dropped. The credentials still work, so it is the id.
            return Err(Fail::NoSuchUpload);
        }
        if !resp.status().is_success() {
            return Err(self.answer_error(resp, &what).into());
        }
        let Some(etag) = net::header(&resp, "etag") else {
            return Err(RemoteError::transient(
                "bad_response",
                format!("{what}: no ETag in the answer"),
            )
            .into());
        };
        let checksum = [
            d.md5.map(|m| format!("md5:{}", b64(&m))),
            d.sha256.map(|s| format!("sha256:{}", b64(&s))),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
        Ok((
            PartRecord {
                part_number: pn,
                size: len,
                etag,
                checksum,
            },
            sent,
        ))
    }

    fn complete(
        &self,
        key: &str,
        upload_id: &str,
        parts: &BTreeMap<u32, PartRecord>,
        resumed: bool,
    ) -> Result<Option<String>, Fail> {
        // The body is written here rather than by rusty-s3 so each part can carry its
        // ChecksumSHA256 (AWS requires it when the upload was created with SHA256).
        let mut xml = String::from("<CompleteMultipartUpload>");
        for p in parts.values() {
            xml.push_str(&format!(
                "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag>",
                p.part_number,
                xml_escape(&p.etag)
            ));
            if self.checksum.sha256() {
                if let Some(s) = p
                    .checksum
                    .split(' ')
                    .find_map(|c| c.strip_prefix("sha256:"))
                {
                    xml.push_str(&format!("<ChecksumSHA256>{s}</ChecksumSHA256>"));
                }
            }
            xml.push_str("</Part>");
        }
        xml.push_str("</CompleteMultipartUpload>");
        let creds = self.creds();
        let action = CompleteMultipartUpload::new(
            &self.bucket,
            Some(&*creds),
            key,
            upload_id,
            std::iter::empty::<&str>(),
        );
        let url = action.sign(SIGN_EXPIRY);
        let mut resp = self
            .agent
            .post(url.as_str())
            .header("content-type", "application/xml")
            .send(xml.as_bytes())
            .map_err(|e| net::transport_error(e, "complete multipart upload"))?;
        let status = resp.status().as_u16();
        if status == 404 {
            return match Self::is_no_such_upload(&mut resp) {
                None => Err(Fail::NoSuchUpload),
                Some(b) => Err(self
                    .scrub(net::status_error(
                        404,
                        None,
                        &net::parse_error_body(&b),
                        "complete multipart upload",
                    ))
                    .into()),
            };
        }
        if resumed && status == 403 && self.probe().is_ok() {
            return Err(Fail::NoSuchUpload);
        }
        if !resp.status().is_success() {
            return Err(self.answer_error(resp, "complete multipart upload").into());
        }
        // S3 may answer 200 and still report an error in the body.
        let body = net::read_body(&mut resp);
        if body.contains("<Error>") {
            let says = net::parse_error_body(&body);
            return Err(self
                .scrub(net::status_error(
                    500,
                    None,
                    &says,
                    "complete multipart upload",
                ))
                .into());
        }
        Ok(net::xml_tag(&body, "ETag"))
    }
}

/// The parts of a ListParts answer (number, size, ETag) and the marker of the next page
/// when it is truncated. Parsed by hand: servers differ in which optional fields they send
/// (s3s-fs omits MaxParts, which rusty-s3's parser requires).
fn parse_list_parts(body: &str) -> (Vec<(u32, u64, String)>, Option<u16>) {
    let mut parts = Vec::new();
    let mut rest = body;
    while let Some(start) = rest.find("<Part>") {
        let Some(end) = rest[start..].find("</Part>") else {
            break;
        };
        let part = &rest[start..start + end];
        let number = net::xml_tag(part, "PartNumber").and_then(|v| v.trim().parse().ok());
        let size = net::xml_tag(part, "Size").and_then(|v| v.trim().parse().ok());
        if let (Some(n), Some(sz)) = (number, size) {
            parts.push((n, sz, net::xml_tag(part, "ETag").unwrap_or_default()));
        }
        rest = &rest[start + end..];
    }
    let truncated = net::xml_tag(body, "IsTruncated").is_some_and(|v| v.trim() == "true");
    let next = if truncated {
        net::xml_tag(body, "NextPartNumberMarker").and_then(|v| v.trim().parse().ok())
    } else {
        None
    };
    (parts, next)
}

/// The 32 bytes of a hex sha256 (the ingest hash), if it is one.
fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    let b = hex.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let nib = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = nib(b[2 * i])? << 4 | nib(b[2 * i + 1])?;
    }
    Some(out)
}

fn check_sha(sha: &[u8; 32], expect: &str) -> Result<(), RemoteError> {
    let got = hex(sha);
    if got != expect {
        return Err(RemoteError::new(
            ErrorClass::LocalChanged,
            "checksum_mismatch",
            format!("local bytes hash to {got}, expected {expect}"),
        ));
    }
    Ok(())
}

/// ETags compare without their quotes (some servers list them unquoted).
pub(super) fn same_etag(a: &str, b: &str) -> bool {
    a.trim_matches('"') == b.trim_matches('"')
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Remote for S3Remote {
    fn reload_credentials(&self, cfg: Option<&super::RemoteConfig>) -> Result<bool, String> {
        let mut source = self.cred_source.lock().unwrap_or_else(|e| e.into_inner());
        let candidate = cfg
            .and_then(|c| c.s3.clone())
            .unwrap_or_else(|| source.clone());
        let (creds, from) = resolve_credentials(&candidate, &|k| std::env::var(k).ok())?;
        *source = candidate;
        let mut current = self.creds.write().unwrap_or_else(|e| e.into_inner());
        let same = current.key() == creds.key()
            && current.secret() == creds.secret()
            && current.token() == creds.token();
        if !same {
            *current = Arc::new(creds);
            info!(
                credentials = from.as_str(),
                "s3 credentials re-read: new ones in use"
            );
        }
        Ok(!same)
    }

    fn kind(&self) -> &'static str {
        "s3"
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn upload(&self, job: &UploadJob, ctx: &mut UploadCtx<'_>) -> Result<Uploaded, RemoteError> {
        if job.size <= self.threshold {
            // A multipart upload left over from a larger threshold is of no use now.
            if let Some((uid, _)) = ctx.resume.current() {
                let _ = self.abort_upload(&job.key, &uid);
                ctx.resume.clear();
            }
            return self.single_put(job, ctx);
        }
        // Twice at most: once with what the store remembers, once fresh if the server
        // forgot that upload.
        for _ in 0..2 {
            match self.multipart(job, ctx) {
                Ok(u) => return Ok(u),
                Err(Fail::Remote(e)) => return Err(e),
                Err(Fail::NoSuchUpload) => {
                    info!(id = %job.id, "server no longer knows the multipart upload; starting a fresh one");
                    ctx.resume.clear();
                }
            }
        }
        Err(RemoteError::transient(
            "no_such_upload",
            "the server forgot a new multipart upload at once",
        ))
    }

    fn head(&self, key: &str) -> Result<Option<RemoteObject>, RemoteError> {
        let creds = self.creds();
        let url = HeadObject::new(&self.bucket, Some(&*creds), key).sign(SIGN_EXPIRY);
        let resp = self
            .agent
            .head(url.as_str())
            .call()
            .map_err(|e| net::transport_error(e, "head object"))?;
        match resp.status().as_u16() {
            404 => Ok(None),
            s if (200..300).contains(&s) => Ok(Some(RemoteObject {
                size: net::header(&resp, "content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                etag: net::header(&resp, "etag"),
                sha256: net::header(&resp, META_SHA256),
            })),
            _ => Err(self.answer_error(resp, "head object")),
        }
    }

    fn download(
        &self,
        key: &str,
        offset: u64,
        out: &mut dyn std::io::Write,
        ctx: &DownloadCtx<'_>,
    ) -> Result<u64, RemoteError> {
        let creds = self.creds();
        let url = GetObject::new(&self.bucket, Some(&*creds), key).sign(SIGN_EXPIRY);
        let mut req = self.agent.get(url.as_str());
        if offset > 0 {
            req = req.header("range", format!("bytes={offset}-"));
        }
        let mut resp = req
            .call()
            .map_err(|e| net::transport_error(e, "get object"))?;
        match net::range_skip(resp.status().as_u16(), offset) {
            Some(skip) => net::copy_body(&mut resp, skip, out, ctx, "get object"),
            None => Err(self.answer_error(resp, "get object")),
        }
    }

    fn fetch_if_changed(&self, key: &str, tag: Option<&str>) -> Result<Fetched, RemoteError> {
        let creds = self.creds();
        let url = GetObject::new(&self.bucket, Some(&*creds), key).sign(SIGN_EXPIRY);
        let mut req = self.agent.get(url.as_str());
        if let Some(t) = tag {
            req = req.header("if-none-match", t);
        }
        let resp = req
            .call()
            .map_err(|e| net::transport_error(e, "get object"))?;
        net::fetched(resp, tag, |resp| self.answer_error(resp, "get object"))
    }

    fn delete(&self, key: &str) -> Result<(), RemoteError> {
        let creds = self.creds();
        let url = DeleteObject::new(&self.bucket, Some(&*creds), key).sign(SIGN_EXPIRY);
        let resp = self
            .agent
            .delete(url.as_str())
            .call()
            .map_err(|e| net::transport_error(e, "delete object"))?;
        match resp.status().as_u16() {
            404 => Ok(()),
            s if (200..300).contains(&s) => Ok(()),
            _ => Err(self.answer_error(resp, "delete object")),
        }
    }

    fn put_bytes(&self, key: &str, bytes: &[u8], media_type: &str) -> Result<(), RemoteError> {
        let md5: [u8; 16] = md5::Md5::digest(bytes).into();
        let sha: [u8; 32] = Sha256::digest(bytes).into();
        let mut headers = self.checksum_headers(&net::Digests {
            md5: Some(md5),
            sha256: Some(sha),
        });
        headers.push((META_SHA256, hex(&sha)));
        headers.push(("content-type", media_type.to_string()));
        let creds = self.creds();
        let mut action = PutObject::new(&self.bucket, Some(&*creds), key);
        for (k, v) in &headers {
            action.headers_mut().insert(*k, v.clone());
        }
        let url = action.sign(SIGN_EXPIRY);
        let mut req = self.agent.put(url.as_str());
        for (k, v) in &headers {
            req = req.header(*k, v.as_str());
        }
        let resp = req
            .send(bytes)
            .map_err(|e| net::transport_error(e, "put object"))?;
        if !resp.status().is_success() {
            return Err(self.answer_error(resp, "put object"));
        }
        Ok(())
    }

    fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), RemoteError> {
        let creds = self.creds();
        let url = AbortMultipartUpload::new(&self.bucket, Some(&*creds), key, upload_id)
            .sign(SIGN_EXPIRY);
        let resp = self
            .agent
            .delete(url.as_str())
            .call()
            .map_err(|e| net::transport_error(e, "abort multipart upload"))?;
        match resp.status().as_u16() {
            // Already gone: what we wanted.
            404 => Ok(()),
            s if (200..300).contains(&s) => Ok(()),
            _ => Err(self.answer_error(resp, "abort multipart upload")),
        }
    }

    fn probe(&self) -> Result<(), RemoteError> {
        let creds = self.creds();
        let url = HeadBucket::new(&self.bucket, Some(&*creds)).sign(SIGN_EXPIRY);
        let resp = self
            .agent
            .head(url.as_str())
            .call()
            .map_err(|e| net::transport_error(e, "head bucket"))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(self.answer_error(resp, "head bucket"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Result<S3Config, String> {
        let text = format!("endpoint = \"http://127.0.0.1:9\"\nbucket = \"photos\"\n{extra}");
        let c: S3Config = toml::from_str(&text).map_err(|e| e.to_string())?;
        c.validate().map_err(|(k, m)| format!("{k}: {m}"))?;
        Ok(c)
    }

    #[test]
    fn unusable_ca_bundle_is_one_clear_line() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        fs::write(&not_pem, "not a certificate").unwrap();
        let env = |_: &str| None;
        for (path, want) in [
            (not_pem.clone(), "no PEM certificate"),
            (dir.path().join("missing.pem"), "No such file"),
        ] {
            let c = cfg(&format!(
                "access_key_id = \"A\"\nsecret_access_key = \"S\"\nca_bundle = \"{}\"",
                path.display()
            ))
            .unwrap();
            let e = S3Remote::with_env(&c, &env).err().unwrap();
            assert!(e.starts_with("remote.s3.ca_bundle "), "{e}");
            assert!(e.contains(want) && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn defaults_are_safe() {
        let c = cfg("").unwrap();
        assert_eq!(c.region, "us-east-1");
        assert_eq!(c.addressing, Addressing::Path);
        assert_eq!(c.checksum, ChecksumMode::Sha256);
        assert_eq!(c.part_size.0, 8 * MIB);
        assert_eq!(c.multipart_threshold.0, 8 * MIB);
    }

    #[test]
    fn bad_values_name_the_key() {
        assert!(cfg("part_size = \"1MiB\"")
            .unwrap_err()
            .starts_with("remote.s3.part_size"));
        assert!(cfg("access_key_id = \"AK\"")
            .unwrap_err()
            .starts_with("remote.s3.secret_access_key"));
        let e = toml::from_str::<S3Config>("endpoint = \"x\"\nbucket = \"b\"\nchecksum = \"crc\"")
            .unwrap_err();
        assert!(
            e.to_string().contains("checksum") || e.to_string().contains("crc"),
            "{e}"
        );
        let c: S3Config = toml::from_str("endpoint = \"ftp://x\"\nbucket = \"photos\"").unwrap();
        assert_eq!(c.validate().unwrap_err().0, "remote.s3.endpoint");
        let c: S3Config = toml::from_str("endpoint = \"http://x\"\nbucket = \"Bad_Name\"").unwrap();
        assert_eq!(c.validate().unwrap_err().0, "remote.s3.bucket");
    }

    #[test]
    fn list_parts_answers_parse_with_or_without_optional_fields() {
        let body = r#"<ListPartsResult><Bucket>b</Bucket><IsTruncated>true</IsTruncated><NextPartNumberMarker>2</NextPartNumberMarker>
            <Part><PartNumber>1</PartNumber><ETag>&quot;aa&quot;</ETag><Size>5242880</Size></Part>
            <Part><ETag>"bb"</ETag><PartNumber>2</PartNumber><Size>7</Size></Part></ListPartsResult>"#;
        let (parts, next) = parse_list_parts(body);
        assert_eq!(
            parts,
            vec![
                (1, 5242880, "\"aa\"".to_string()),
                (2, 7, "\"bb\"".to_string())
            ]
        );
        assert_eq!(next, Some(2));
        assert_eq!(parse_list_parts("<ListPartsResult/>"), (vec![], None));
    }

    #[test]
    fn part_size_grows_for_huge_files() {
        assert_eq!(part_size_for(100 * MIB, 8 * MIB), 8 * MIB);
        // 200 GiB in 8 MiB parts would be 25,600 parts.
        let ps = part_size_for(200 * 1024 * MIB, 8 * MIB);
        assert!((200 * 1024 * MIB).div_ceil(ps) <= MAX_PARTS);
        assert_eq!(ps % MIB, 0);
        assert_eq!(part_size_for(1, 1), MIN_PART);
    }

    #[test]
    fn credentials_come_from_config_file_or_env_and_never_debug_print() {
        let no_env = |_: &str| None;
        let c = cfg("access_key_id = \"AKIDINLINE\"\nsecret_access_key = \"inline-secret-value\"")
            .unwrap();
        let (cr, src) = resolve_credentials(&c, &no_env).unwrap();
        assert_eq!((cr.key(), src), ("AKIDINLINE", CredentialSource::Config));
        assert!(!format!("{c:?}").contains("inline-secret-value"));
        assert!(!format!("{cr:?}").contains("inline-secret-value"));

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("creds");
        fs::write(&f, "[default]\naws_access_key_id = A1\naws_secret_access_key = s1\n[profile field]\naws_access_key_id=A2\naws_secret_access_key=s2\naws_session_token=t2\n").unwrap();
        let c = cfg(&format!(
            "credentials_file = \"{}\"\nprofile = \"field\"",
            f.display()
        ))
        .unwrap();
        let (cr, src) = resolve_credentials(&c, &no_env).unwrap();
        assert_eq!(
            (cr.key(), cr.secret(), cr.token(), src),
            ("A2", "s2", Some("t2"), CredentialSource::File)
        );

        let c = cfg("").unwrap();
        let env = |k: &str| match k {
            "AWS_ACCESS_KEY_ID" => Some("A3".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("s3".to_string()),
            _ => None,
        };
        let (cr, src) = resolve_credentials(&c, &env).unwrap();
        assert_eq!((cr.key(), src), ("A3", CredentialSource::Environment));
        let e = resolve_credentials(&c, &no_env).unwrap_err();
        assert!(e.contains("no credentials") && !e.contains('\n'), "{e}");
    }
}
