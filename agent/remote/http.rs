//! The `http` remote: storage credentials stay off the device.
//!
//! For every object operation the device POSTs a small JSON request, authenticated with
//! its device token, to a backend's presign endpoint; the backend answers with a
//! presigned URL (and the headers to send with it) for the storage, and the device
//! performs the request there. The format is documented in the README (`## S3 and HTTP
//! remotes`).
//!
//! Files above `multipart_threshold` go as a multipart upload through the backend's
//! `<endpoint>/multipart` calls (create, presign a part, list, complete, abort): the
//! backend talks to storage for all but the parts, which the device PUTs to presigned
//! URLs. The upload id and each acknowledged part are committed through the
//! [`ResumeLog`](super::ResumeLog) before the next part's first byte is sent, so a crash
//! re-sends at most one part. A backend without these calls (404/405/501 to create) gets
//! single PUTs, remembered until restart.
//!
//! A presigned URL can expire between the answer and its use (a slow link, a paused
//! queue, a clock far off): storage then answers 403. That is not the device's
//! credentials failing, so it asks for a fresh URL once and, if storage refuses again,
//! retries later like any transient error. Only a 401/403 from the backend itself (the
//! device token was refused) pauses the queue with reason `auth`.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest as _, Sha256};
use tracing::{debug, info};

use super::net::{self, b64, HttpClient, Secret, WithHttpClient, MIB};
use super::s3::{part_size_for, same_etag, MAX_PART, MAX_PARTS, MAX_SINGLE_PUT, MIN_PART};
use super::{
    DownloadCtx, ErrorClass, Fetched, Remote, RemoteError, RemoteObject, UploadCtx, UploadJob,
    Uploaded,
};
use crate::store::PartRecord;
use crate::units::Size;
use crate::util::hex;

/// `[remote.http]`: the keys below and the shared HTTP-client keys ([`HttpClient`]), which
/// apply to the backend and to the storage behind the presigned URLs.
#[derive(Debug, Clone, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct HttpConfig {
    /// `ca_bundle`, `connect_timeout`, `read_timeout`, written in this table.
    #[serde(skip)]
    pub client: HttpClient,
    /// The backend's presign endpoint, e.g. `https://api.example.com/fieldsync/presign`.
    pub endpoint: String,
    /// The device token, sent as `Authorization: Bearer …`. Prefer `token_file` or the
    /// `FIELDSYNC_DEVICE_TOKEN` environment variable.
    #[serde(default)]
    pub token: Option<Secret>,
    /// A file holding the device token (surrounding whitespace ignored).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Files larger than this use a multipart upload through the backend (if it offers
    /// one). Default 8 MiB.
    #[serde(default = "default_part")]
    pub multipart_threshold: Size,
    /// Part size of multipart uploads (5 MiB ..= 5 GiB); raised for files that would
    /// need more than 10,000 parts. Default 8 MiB.
    #[serde(default = "default_part")]
    pub part_size: Size,
}

fn default_part() -> Size {
    Size(8 * MIB)
}

impl<'de> Deserialize<'de> for HttpConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        net::with_client(d)
    }
}

impl WithHttpClient for HttpConfig {
    fn own_keys<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        HttpConfig::deserialize(d)
    }
    fn client_mut(&mut self) -> &mut HttpClient {
        &mut self.client
    }
}

impl HttpConfig {
    /// Checks values the types cannot; returns the key and what is expected.
    pub fn validate(&self) -> Result<(), (String, String)> {
        self.validate_own().map_err(|(k, m)| (k.to_string(), m))?;
        self.client.validate("remote.http")
    }

    fn validate_own(&self) -> Result<(), (&'static str, String)> {
        match url::Url::parse(&self.endpoint) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {}
            _ => {
                return Err((
                    "remote.http.endpoint",
                    "expected an http:// or https:// URL of the presign endpoint".into(),
                ))
            }
        }
        if self.token.is_some() && self.token_file.is_some() {
            return Err((
                "remote.http.token_file",
                "expected either token or token_file, not both".into(),
            ));
        }
        if self.token.as_ref().is_some_and(Secret::is_empty) {
            return Err(("remote.http.token", "expected a non-empty token".into()));
        }
        if !(MIN_PART..=MAX_PART).contains(&self.part_size.0) {
            return Err((
                "remote.http.part_size",
                "expected a size from 5 MiB to 5 GiB (S3's part limits)".into(),
            ));
        }
        if self.multipart_threshold.0 > MAX_SINGLE_PUT {
            return Err((
                "remote.http.multipart_threshold",
                "expected at most 5 GiB (S3's single PUT limit)".into(),
            ));
        }
        Ok(())
    }
}

/// What the device asks the backend for (the README documents it).
#[derive(Debug, Serialize)]
pub struct PresignRequest<'a> {
    pub device_id: &'a str,
    /// `PUT`, `HEAD`, `GET` or `DELETE`.
    pub method: &'a str,
    pub key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachment_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_md5: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<&'a str>,
}

/// The backend's answer.
#[derive(Debug, Deserialize)]
pub struct PresignResponse {
    pub url: String,
    /// Headers to send with the request, exactly as given (they may be signed).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// A call of the backend's multipart API (`POST <endpoint>/multipart`; README).
#[derive(Debug, Serialize)]
pub struct MultipartRequest<'a> {
    pub device_id: &'a str,
    /// `create`, `part`, `list`, `complete` or `abort`.
    pub action: &'a str,
    pub key: &'a str,
    /// Every action but `create`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_id: Option<&'a str>,
    /// `create`: like a PUT presign.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachment_id: Option<&'a str>,
    /// `create`: the file's size; `part`: the part's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<&'a str>,
    /// `create`: the part size the device will use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub part_size: Option<u64>,
    /// `part`: which part (1-based).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub part_number: Option<u32>,
    /// `part`: base64 MD5 of the part, to be signed into its URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_md5: Option<&'a str>,
    /// `complete`: every part, in order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parts: Option<Vec<PartRef>>,
}

impl<'a> MultipartRequest<'a> {
    fn new(device_id: &'a str, action: &'a str, key: &'a str) -> Self {
        MultipartRequest {
            device_id,
            action,
            key,
            upload_id: None,
            attachment_id: None,
            size: None,
            sha256: None,
            content_type: None,
            part_size: None,
            part_number: None,
            content_md5: None,
            parts: None,
        }
    }
}

/// One part as the backend lists it, or as the device names it to `complete`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartRef {
    pub part_number: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    pub etag: String,
}

#[derive(Debug, Deserialize)]
struct Created {
    upload_id: String,
}

#[derive(Debug, Deserialize)]
struct Listed {
    #[serde(default)]
    parts: Vec<PartRef>,
}

#[derive(Debug, Deserialize)]
struct Completed {
    #[serde(default)]
    etag: Option<String>,
}

/// Why a multipart attempt stopped.
enum Fail {
    Remote(RemoteError),
    /// The backend or storage no longer knows the upload id: start a fresh upload.
    NoSuchUpload,
    /// The backend has no multipart calls: send the file in one PUT.
    Unsupported,
}

impl From<RemoteError> for Fail {
    fn from(e: RemoteError) -> Fail {
        Fail::Remote(e)
    }
}

pub struct HttpRemote {
    endpoint: String,
    /// `<endpoint>/multipart`.
    multipart_endpoint: String,
    threshold: u64,
    part_size: u64,
    /// The backend answered that it has no multipart calls: single PUTs from now on.
    no_multipart: AtomicBool,
    /// Swapped when the token is re-read (a reload, or a refusal a rotated token file
    /// may explain).
    token: RwLock<Secret>,
    /// Where the token comes from.
    token_source: Mutex<HttpConfig>,
    device_id: String,
    /// A key the probe asks about: under this device's prefix, so a backend that checks
    /// keys accepts it.
    probe_key: String,
    agent: ureq::Agent,
    describe: String,
}

type Resp = ureq::http::Response<ureq::Body>;

impl HttpRemote {
    pub fn new(cfg: &HttpConfig, device_id: &str, prefix: &str) -> Result<HttpRemote, String> {
        cfg.validate().map_err(|(k, m)| format!("{k}: {m}"))?;
        let token = read_token(cfg)?;
        let https = cfg.endpoint.starts_with("https:");
        let agent = net::agent(&cfg.client, "remote.http", https)?;
        let host = url::Url::parse(&cfg.endpoint)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default();
        let probe_key = super::object_key(prefix, device_id, ".probe", "", "probe", "");
        Ok(HttpRemote {
            endpoint: cfg.endpoint.clone(),
            multipart_endpoint: format!("{}/multipart", cfg.endpoint.trim_end_matches('/')),
            threshold: cfg.multipart_threshold.0,
            part_size: cfg.part_size.0,
            no_multipart: AtomicBool::new(false),
            token: RwLock::new(token),
            token_source: Mutex::new(cfg.clone()),
            device_id: device_id.to_string(),
            probe_key,
            agent,
            describe: format!("http presign via {host}"),
        })
    }

    /// The device token requests carry now.
    fn token(&self) -> Secret {
        self.token.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn scrub(&self, e: RemoteError) -> RemoteError {
        RemoteError {
            message: net::scrub(e.message, &[self.token().expose()]),
            ..e
        }
    }

    /// [`net::answer_error`] without our credentials in the server's text.
    fn answer_error(&self, resp: Resp, what: &str) -> RemoteError {
        self.scrub(net::answer_error(resp, what))
    }

    /// Asks the backend for a presigned request. 401/403 here mean the device token was
    /// refused: the `auth` pause.
    /// A PUT to a presigned URL with the backend's headers, and our Content-MD5 unless the
    /// backend already signed one.
    fn presigned_put(
        &self,
        p: &PresignResponse,
        md5: &str,
    ) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
        let mut req = self.agent.put(p.url.as_str());
        if !p
            .headers
            .keys()
            .any(|k| k.eq_ignore_ascii_case("content-md5"))
        {
            req = req.header("content-md5", md5);
        }
        for (k, v) in &p.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        req
    }

    fn presign(&self, req: &PresignRequest<'_>) -> Result<PresignResponse, RemoteError> {
        let body = serde_json::to_vec(req).expect("presign request serialises");
        let mut resp = self
            .agent
            .post(&self.endpoint)
            .header("authorization", format!("Bearer {}", self.token().expose()))
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .send(&body[..])
            .map_err(|e| net::transport_error(e, "presign"))?;
        if !resp.status().is_success() {
            return Err(self.answer_error(resp, "presign"));
        }
        let text = resp
            .body_mut()
            .with_config()
            .limit(256 * 1024)
            .read_to_string()
            .map_err(|e| net::transport_error(e, "presign"))?;
        serde_json::from_str(&text).map_err(|e| {
            RemoteError::transient("bad_response", format!("presign: unreadable answer: {e}"))
        })
    }

    /// An error from the storage behind a presigned URL: the storage's 401/403 is about
    /// the URL (expired, signed by a backend with bad keys), not the device, so it never
    /// pauses the queue.
    fn storage_error(&self, resp: Resp, what: &str) -> RemoteError {
        let e = self.answer_error(resp, what);
        match e.class {
            ErrorClass::Auth => RemoteError {
                class: ErrorClass::Transient { retry_after: None },
                code: "presigned_rejected".into(),
                ..e
            },
            _ => e,
        }
    }

    fn simple(
        &self,
        method: &'static str,
        key: &str,
    ) -> Result<(PresignResponse, Resp), RemoteError> {
        self.simple_with(method, key, &[])
    }

    /// [`Self::simple`] with extra request headers (Range, If-None-Match) that the
    /// presigned URL does not sign.
    fn simple_with(
        &self,
        method: &'static str,
        key: &str,
        extra: &[(&str, String)],
    ) -> Result<(PresignResponse, Resp), RemoteError> {
        let what = format!("{} object", method.to_ascii_lowercase());
        let mut last = None;
        for _ in 0..2 {
            let p = self.presign(&PresignRequest {
                device_id: &self.device_id,
                method,
                key,
                attachment_id: None,
                size: None,
                sha256: None,
                content_md5: None,
                content_type: None,
            })?;
            let mut req = ureq::http::Request::builder()
                .method(method)
                .uri(p.url.as_str());
            for (k, v) in &p.headers {
                req = req.header(k.as_str(), v.as_str());
            }
            for (k, v) in extra {
                req = req.header(*k, v.as_str());
            }
            let req = req.body(()).map_err(|_| {
                RemoteError::transient(
                    "bad_response",
                    format!("{what}: the backend returned an invalid URL or header"),
                )
            })?;
            let resp = self
                .agent
                .run(req)
                .map_err(|e| net::transport_error(e, &what))?;
            if matches!(resp.status().as_u16(), 401 | 403) {
                last = Some(self.storage_error(resp, &what));
                continue;
            }
            return Ok((p, resp));
        }
        Err(last.expect("loop ran"))
    }

    /// One PUT for the whole file (storage accepts up to 5 GiB so); the backend signs the
    /// Content-MD5 we send, so the storage verifies the bytes.
    fn single_put(
        &self,
        job: &UploadJob,
        ctx: &mut UploadCtx<'_>,
    ) -> Result<Uploaded, RemoteError> {
        let d = net::digest_range(&job.path, 0, job.size, true, !job.verified, None)?;
        let (md5, sha) = (d.md5.unwrap_or_default(), d.sha256.unwrap_or_default());
        if !job.verified && hex(&sha) != job.sha256 {
            return Err(RemoteError::new(
                ErrorClass::LocalChanged,
                "checksum_mismatch",
                format!("local bytes hash to {}, expected {}", hex(&sha), job.sha256),
            ));
        }
        let md5 = b64(&md5);
        let mut sent_total = 0u64;
        let mut last = None;
        for round in 0..2 {
            if !(ctx.keep_going)() {
                return Err(RemoteError::interrupted());
            }
            let p = self.presign(&PresignRequest {
                device_id: &self.device_id,
                method: "PUT",
                key: &job.key,
                attachment_id: Some(&job.id),
                size: Some(job.size),
                sha256: Some(&job.sha256),
                content_md5: Some(&md5),
                content_type: Some(&job.media_type),
            })?;
            let mut req = self
                .presigned_put(&p, &md5)
                .header("content-length", job.size.to_string());
            if job.size > 0 {
                req = req.header("expect", "100-continue");
            }
            let mut body = net::BodyReader::open(
                &job.path,
                0,
                job.size,
                0,
                ctx.throttle,
                ctx.keep_going,
                ctx.progress,
            )?;
            let result = req.send(ureq::SendBody::from_reader(&mut body));
            sent_total += body.sent;
            let resp = result.map_err(|e| body.explain(e, "put object"))?;
            let status = resp.status().as_u16();
            if resp.status().is_success() {
                return Ok(Uploaded {
                    etag: net::header(&resp, "etag"),
                    bytes_sent: sent_total,
                });
            }
            let e = self.storage_error(resp, "put object");
            if matches!(status, 401 | 403) && round == 0 {
                info!(id = %job.id, "storage refused the presigned URL (expired?); asking for a new one");
                last = Some(e);
                continue;
            }
            return Err(e);
        }
        Err(last.expect("loop ran"))
    }

    /// Calls the backend's multipart API. 401/403 are the device token (the `auth`
    /// pause); 404 is answered as [`Fail::NoSuchUpload`], or [`Fail::Unsupported`] for
    /// `create` (404/405/501: a backend without these calls).
    fn multipart_call<T: DeserializeOwned>(&self, req: &MultipartRequest<'_>) -> Result<T, Fail> {
        let what = format!("multipart {}", req.action);
        let body = serde_json::to_vec(req).expect("multipart request serialises");
        let mut resp = self
            .agent
            .post(&self.multipart_endpoint)
            .header("authorization", format!("Bearer {}", self.token().expose()))
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .send(&body[..])
            .map_err(|e| net::transport_error(e, &what))?;
        let status = resp.status().as_u16();
        match status {
            404 | 405 | 501 if req.action == "create" => return Err(Fail::Unsupported),
            404 => return Err(Fail::NoSuchUpload),
            s if !(200..300).contains(&s) => return Err(self.answer_error(resp, &what).into()),
            _ => {}
        }
        let text = resp
            .body_mut()
            .with_config()
            .limit(16 * MIB)
            .read_to_string()
            .map_err(|e| net::transport_error(e, &what))?;
        let text = if text.trim().is_empty() { "{}" } else { &text };
        serde_json::from_str(text).map_err(|e| {
            RemoteError::transient("bad_response", format!("{what}: unreadable answer: {e}")).into()
        })
    }

    fn multipart(&self, job: &UploadJob, ctx: &mut UploadCtx<'_>) -> Result<Uploaded, Fail> {
        let size = job.size;
        // Resume what the store remembers, cross-checked with the backend's list: a part
        // counts only if storage still holds it with the ETag we committed.
        let (upload_id, part_size, mut done) = match ctx.resume.current() {
            Some((uid, ps))
                if (MIN_PART..=MAX_PART).contains(&ps) && size.div_ceil(ps) <= MAX_PARTS =>
            {
                let listed: Listed = self.multipart_call(&MultipartRequest {
                    upload_id: Some(&uid),
                    ..MultipartRequest::new(&self.device_id, "list", &job.key)
                })?;
                let mut done = BTreeMap::new();
                for p in ctx.resume.parts() {
                    let on_server = listed.parts.iter().any(|l| {
                        l.part_number == p.part_number
                            && l.size.is_none_or(|s| s == p.size)
                            && same_etag(&l.etag, &p.etag)
                    });
                    if on_server {
                        done.insert(p.part_number, p);
                    } else {
                        debug!(id = %job.id, part = p.part_number, "part not on the server; sending it again");
                    }
                }
                info!(id = %job.id, parts_done = done.len(), "resuming multipart upload");
                (uid, ps, done)
            }
            _ => {
                let ps = part_size_for(size, self.part_size);
                let created: Created = self.multipart_call(&MultipartRequest {
                    attachment_id: Some(&job.id),
                    size: Some(size),
                    sha256: Some(&job.sha256),
                    content_type: Some(&job.media_type),
                    part_size: Some(ps),
                    ..MultipartRequest::new(&self.device_id, "create", &job.key)
                })?;
                if let Err(e) = ctx.resume.begin(&created.upload_id, ps) {
                    // Not remembered: no part may go into an upload a crash would orphan.
                    let _ = self.abort_upload(&job.key, &created.upload_id);
                    return Err(e.into());
                }
                (created.upload_id, ps, BTreeMap::new())
            }
        };
        let n_parts = size.div_ceil(part_size).max(1) as u32;
        let mut confirmed: u64 = done.values().map(|p: &PartRecord| p.size).sum();
        let mut sent_now = 0u64;
        (ctx.progress)(confirmed);
        // Unless the file is proven unchanged since ingest, it is hashed whole, in order,
        // from the same reads that give each part its MD5.
        let mut whole = (!job.verified).then(Sha256::new);
        // One part at a time, each committed before the next is sent: a crash re-sends
        // at most the part that was in flight.
        for pn in 1..=n_parts {
            let offset = (pn as u64 - 1) * part_size;
            let len = part_size.min(size - offset);
            if done.get(&pn).is_some_and(|p| p.size == len) {
                if let Some(h) = whole.as_mut() {
                    net::digest_range(&job.path, offset, len, false, false, Some(h))?;
                }
                continue;
            }
            if !(ctx.keep_going)() {
                return Err(RemoteError::interrupted().into());
            }
            let d = net::digest_range(&job.path, offset, len, true, false, whole.as_mut())?;
            let md5 = b64(&d.md5.unwrap_or_default());
            let (etag, sent) = self.put_part(
                job, &upload_id, pn, n_parts, offset, len, &md5, confirmed, ctx,
            )?;
            sent_now += sent;
            let rec = PartRecord {
                part_number: pn,
                size: len,
                etag,
                checksum: format!("md5:{md5}"),
            };
            ctx.resume.part_done(&rec)?;
            confirmed += len;
            (ctx.progress)(confirmed);
            done.insert(pn, rec);
        }
        if let Some(h) = whole {
            let got = hex(&h.finalize());
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
        let parts = done
            .values()
            .map(|p| PartRef {
                part_number: p.part_number,
                size: None,
                etag: p.etag.clone(),
            })
            .collect();
        let completed: Completed = self.multipart_call(&MultipartRequest {
            upload_id: Some(&upload_id),
            parts: Some(parts),
            ..MultipartRequest::new(&self.device_id, "complete", &job.key)
        })?;
        ctx.resume.clear();
        Ok(Uploaded {
            etag: completed.etag,
            bytes_sent: sent_now,
        })
    }

    /// PUTs part `pn` to the URL the backend presigns for it; returns its ETag and the
    /// bytes sent. Progress counts from `base` (the parts already committed).
    #[allow(clippy::too_many_arguments)]
    fn put_part(
        &self,
        job: &UploadJob,
        upload_id: &str,
        pn: u32,
        n_parts: u32,
        offset: u64,
        len: u64,
        md5: &str,
        base: u64,
        ctx: &mut UploadCtx<'_>,
    ) -> Result<(String, u64), Fail> {
        let what = format!("upload part {pn} of {n_parts}");
        let mut sent_total = 0u64;
        let mut last = None;
        for round in 0..2 {
            let p: PresignResponse = self.multipart_call(&MultipartRequest {
                upload_id: Some(upload_id),
                part_number: Some(pn),
                size: Some(len),
                content_md5: Some(md5),
                ..MultipartRequest::new(&self.device_id, "part", &job.key)
            })?;
            let req = self
                .presigned_put(&p, md5)
                .header("content-length", len.to_string())
                .header("expect", "100-continue");
            let mut body = net::BodyReader::open(
                &job.path,
                offset,
                len,
                base,
                ctx.throttle,
                ctx.keep_going,
                ctx.progress,
            )?;
            let result = req.send(ureq::SendBody::from_reader(&mut body));
            sent_total += body.sent;
            let resp = result.map_err(|e| body.explain(e, &what))?;
            let status = resp.status().as_u16();
            if resp.status().is_success() {
                let Some(etag) = net::header(&resp, "etag") else {
                    return Err(RemoteError::transient(
                        "bad_response",
                        format!("{what}: no ETag in the answer"),
                    )
                    .into());
                };
                return Ok((etag, sent_total));
            }
            if status == 404 {
                // Storage dropped the upload (expired, aborted).
                return Err(Fail::NoSuchUpload);
            }
            let e = self.storage_error(resp, &what);
            if matches!(status, 401 | 403) && round == 0 {
                info!(id = %job.id, part = pn, "storage refused the presigned URL (expired?); asking for a new one");
                last = Some(e);
                continue;
            }
            return Err(e.into());
        }
        Err(last.expect("loop ran").into())
    }
}

/// The device token: inline, else `token_file`, else `FIELDSYNC_DEVICE_TOKEN`.
fn read_token(cfg: &HttpConfig) -> Result<Secret, String> {
    let token = match (&cfg.token, &cfg.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(p)) => Secret::new(
            fs::read_to_string(p)
                .map_err(|e| format!("remote.http.token_file {}: {e}", p.display()))?
                .trim(),
        ),
        (None, None) => Secret::new(std::env::var("FIELDSYNC_DEVICE_TOKEN").unwrap_or_default()),
    };
    if token.is_empty() {
        return Err(
            "remote.http: no device token: set token, token_file or FIELDSYNC_DEVICE_TOKEN".into(),
        );
    }
    Ok(token)
}

impl Remote for HttpRemote {
    fn reload_credentials(&self, cfg: Option<&super::RemoteConfig>) -> Result<bool, String> {
        let mut source = self.token_source.lock().unwrap_or_else(|e| e.into_inner());
        let candidate = cfg
            .and_then(|c| c.http.clone())
            .unwrap_or_else(|| source.clone());
        let token = read_token(&candidate)?;
        *source = candidate;
        let mut current = self.token.write().unwrap_or_else(|e| e.into_inner());
        let changed = *current != token;
        if changed {
            *current = token;
            info!("device token re-read: the new one is in use");
        }
        Ok(changed)
    }

    fn kind(&self) -> &'static str {
        "http"
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn upload(&self, job: &UploadJob, ctx: &mut UploadCtx<'_>) -> Result<Uploaded, RemoteError> {
        if job.size > self.threshold && !self.no_multipart.load(Ordering::Relaxed) {
            // Twice at most: once with what the store remembers, once fresh if the
            // backend forgot that upload.
            for _ in 0..2 {
                match self.multipart(job, ctx) {
                    Ok(u) => return Ok(u),
                    Err(Fail::Remote(e)) => return Err(e),
                    Err(Fail::NoSuchUpload) => {
                        info!(id = %job.id, "backend no longer knows the multipart upload; starting a fresh one");
                        ctx.resume.clear();
                    }
                    Err(Fail::Unsupported) => {
                        info!("backend offers no multipart upload; sending files in one PUT");
                        self.no_multipart.store(true, Ordering::Relaxed);
                        break;
                    }
                }
            }
            if !self.no_multipart.load(Ordering::Relaxed) {
                return Err(RemoteError::transient(
                    "no_such_upload",
                    "the backend forgot a new multipart upload at once",
                ));
            }
        }
        // A multipart upload left over from a larger threshold is of no use now.
        if let Some((uid, _)) = ctx.resume.current() {
            let _ = self.abort_upload(&job.key, &uid);
            ctx.resume.clear();
        }
        self.single_put(job, ctx)
    }

    fn head(&self, key: &str) -> Result<Option<RemoteObject>, RemoteError> {
        let (_, resp) = self.simple("HEAD", key)?;
        match resp.status().as_u16() {
            404 => Ok(None),
            s if (200..300).contains(&s) => Ok(Some(RemoteObject {
                size: net::header(&resp, "content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                etag: net::header(&resp, "etag"),
                sha256: net::header(&resp, "x-amz-meta-sha256"),
            })),
            _ => Err(self.storage_error(resp, "head object")),
        }
    }

    fn download(
        &self,
        key: &str,
        offset: u64,
        out: &mut dyn std::io::Write,
        ctx: &DownloadCtx<'_>,
    ) -> Result<u64, RemoteError> {
        let range = [("range", format!("bytes={offset}-"))];
        let extra: &[(&str, String)] = if offset > 0 { &range } else { &[] };
        let (_, mut resp) = self.simple_with("GET", key, extra)?;
        match net::range_skip(resp.status().as_u16(), offset) {
            Some(skip) => net::copy_body(&mut resp, skip, out, ctx, "get object"),
            None => Err(self.storage_error(resp, "get object")),
        }
    }

    fn fetch_if_changed(&self, key: &str, tag: Option<&str>) -> Result<Fetched, RemoteError> {
        let cond: Vec<(&str, String)> = tag
            .map(|t| vec![("if-none-match", t.to_string())])
            .unwrap_or_default();
        let (_, resp) = self.simple_with("GET", key, &cond)?;
        net::fetched(resp, tag, |resp| self.storage_error(resp, "get object"))
    }

    fn delete(&self, key: &str) -> Result<(), RemoteError> {
        let (_, resp) = self.simple("DELETE", key)?;
        match resp.status().as_u16() {
            404 => Ok(()),
            s if (200..300).contains(&s) => Ok(()),
            _ => Err(self.storage_error(resp, "delete object")),
        }
    }

    fn put_bytes(&self, key: &str, bytes: &[u8], media_type: &str) -> Result<(), RemoteError> {
        use md5::Digest as _;
        let md5 = b64(&md5::Md5::digest(bytes));
        let sha = hex(&sha2::Sha256::digest(bytes));
        let mut last = None;
        for _ in 0..2 {
            let p = self.presign(&PresignRequest {
                device_id: &self.device_id,
                method: "PUT",
                key,
                attachment_id: None,
                size: Some(bytes.len() as u64),
                sha256: Some(&sha),
                content_md5: Some(&md5),
                content_type: Some(media_type),
            })?;
            let resp = self
                .presigned_put(&p, &md5)
                .send(bytes)
                .map_err(|e| net::transport_error(e, "put object"))?;
            if resp.status().is_success() {
                return Ok(());
            }
            let status = resp.status().as_u16();
            let e = self.storage_error(resp, "put object");
            if !matches!(status, 401 | 403) {
                return Err(e);
            }
            last = Some(e);
        }
        Err(last.expect("loop ran"))
    }

    fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), RemoteError> {
        let r: Result<serde_json::Value, Fail> = self.multipart_call(&MultipartRequest {
            upload_id: Some(upload_id),
            ..MultipartRequest::new(&self.device_id, "abort", key)
        });
        match r {
            // Already gone: what we wanted.
            Ok(_) | Err(Fail::NoSuchUpload) | Err(Fail::Unsupported) => Ok(()),
            Err(Fail::Remote(e)) => Err(e),
        }
    }

    fn probe(&self) -> Result<(), RemoteError> {
        self.presign(&PresignRequest {
            device_id: &self.device_id,
            method: "HEAD",
            key: &self.probe_key,
            attachment_id: None,
            size: None,
            sha256: None,
            content_md5: None,
            content_type: None,
        })
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_validated_and_token_never_debug_prints() {
        let c: HttpConfig = toml::from_str(
            "endpoint = \"https://api.example.com/presign\"\ntoken = \"tok-very-secret\"",
        )
        .unwrap();
        c.validate().unwrap();
        assert!(!format!("{c:?}").contains("tok-very-secret"));
        let r = HttpRemote::new(&c, "dev1", "fs").unwrap();
        assert_eq!(r.describe(), "http presign via api.example.com");
        assert_eq!(r.probe_key, "fs/dev1/.probe/probe");
        let c: HttpConfig = toml::from_str("endpoint = \"presign\"").unwrap();
        assert_eq!(c.validate().unwrap_err().0, "remote.http.endpoint");
        assert!(toml::from_str::<HttpConfig>("endpoint = \"http://x\"\ntokn = \"a\"").is_err());
    }

    #[test]
    fn request_json_has_the_documented_fields() {
        let r = PresignRequest {
            device_id: "dev1",
            method: "PUT",
            key: "fs/dev1/c/r/id.jpg",
            attachment_id: Some("id"),
            size: Some(5),
            sha256: Some("ab"),
            content_md5: Some("md"),
            content_type: Some("image/jpeg"),
        };
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"device_id":"dev1","method":"PUT","key":"fs/dev1/c/r/id.jpg",
                "attachment_id":"id","size":5,"sha256":"ab","content_md5":"md","content_type":"image/jpeg"})
        );
        let p: PresignResponse =
            serde_json::from_str(r#"{"url":"https://s/x","headers":{"content-md5":"m"}}"#).unwrap();
        assert_eq!(p.headers["content-md5"], "m");
    }

    #[test]
    fn multipart_calls_have_the_documented_fields() {
        let v = serde_json::to_value(MultipartRequest {
            upload_id: Some("u1"),
            part_number: Some(3),
            size: Some(8),
            content_md5: Some("md"),
            ..MultipartRequest::new("dev1", "part", "fs/k.mp4")
        })
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"device_id":"dev1","action":"part","key":"fs/k.mp4",
                "upload_id":"u1","part_number":3,"size":8,"content_md5":"md"})
        );
        let v = serde_json::to_value(MultipartRequest {
            upload_id: Some("u1"),
            parts: Some(vec![PartRef {
                part_number: 1,
                size: None,
                etag: "\"e\"".into(),
            }]),
            ..MultipartRequest::new("dev1", "complete", "fs/k.mp4")
        })
        .unwrap();
        assert_eq!(
            v["parts"],
            serde_json::json!([{"part_number":1,"etag":"\"e\""}])
        );
        let l: Listed =
            serde_json::from_str(r#"{"parts":[{"part_number":2,"size":5,"etag":"x"}]}"#).unwrap();
        assert_eq!(l.parts[0].size, Some(5));
        let c: Completed = serde_json::from_str("{}").unwrap();
        assert_eq!(c.etag, None);
    }

    #[test]
    fn multipart_sizes_are_validated() {
        let base = "endpoint = \"https://api.example.com/presign\"\ntoken = \"t\"\n";
        let c: HttpConfig = toml::from_str(base).unwrap();
        assert_eq!((c.multipart_threshold.0, c.part_size.0), (8 * MIB, 8 * MIB));
        let c: HttpConfig = toml::from_str(&format!("{base}part_size = \"1MiB\"")).unwrap();
        assert_eq!(c.validate().unwrap_err().0, "remote.http.part_size");
        let c: HttpConfig =
            toml::from_str(&format!("{base}multipart_threshold = \"6GiB\"")).unwrap();
        assert_eq!(
            c.validate().unwrap_err().0,
            "remote.http.multipart_threshold"
        );
    }
}
