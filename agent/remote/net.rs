//! HTTP plumbing shared by the `s3` and `http` remotes: the ureq agent (rustls with ring,
//! optional private CA bundle, stall timeouts), the streaming request body that reports
//! progress, honours the rate limit and stops at a safe point, the mapping of HTTP answers
//! and transport failures to [`ErrorClass`], and the small config value types both use.
//!
//! Invariant: nothing here formats a request URL into a message. Presigned URLs carry the
//! access key id and, with temporary credentials, the session token in their query.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use md5::Md5;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::file::local_read_error;
use super::{ErrorClass, RemoteError};

/// Read size for hashing and for request bodies: also the granularity of progress
/// reports, rate-limit accounting and stop checks. Small enough that a SIGTERM is honoured
/// within milliseconds even on a slow link, large enough that syscalls do not dominate.
pub const CHUNK: usize = 64 * 1024;

/// Error bodies are short XML or JSON documents; anything longer is not worth holding.
const MAX_ERROR_BODY: u64 = 64 * 1024;

/// A Retry-After beyond this is treated as this: a misconfigured proxy must not park the
/// queue for a day.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// A credential: deserialised from config like a string, but never printed by `Debug`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

pub const MIB: u64 = 1024 * 1024;

/// Builds the HTTP agent. Status codes are returned, not raised, so every answer goes
/// through [`status_error`]; redirects are not followed (a redirected signed request
/// fails anyway, and following one could send a presigned URL's body elsewhere).
pub fn agent(
    ca_bundle: Option<&Path>,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> Result<ureq::Agent, String> {
    use ureq::tls::{RootCerts, TlsConfig, TlsProvider};
    let mut tls = TlsConfig::builder().provider(TlsProvider::Rustls);
    if let Some(path) = ca_bundle {
        let pem = std::fs::read(path).map_err(|e| format!("ca_bundle {}: {e}", path.display()))?;
        let mut certs = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
                Ok(_) => {}
                Err(e) => return Err(format!("ca_bundle {}: {e}", path.display())),
            }
        }
        if certs.is_empty() {
            return Err(format!(
                "ca_bundle {}: no PEM certificate found",
                path.display()
            ));
        }
        tls = tls.root_certs(RootCerts::new_with_certs(&certs));
    }
    let cfg = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .user_agent(concat!("fieldsync/", env!("CARGO_PKG_VERSION")))
        .timeout_connect(Some(connect_timeout))
        // Per read and per write: a stalled link fails after this long, a slow one that
        // keeps moving never does (a whole-request timeout would kill big parts on 2G).
        .timeout_per_read(Some(io_timeout))
        .timeout_per_write(Some(io_timeout))
        .tls_config(tls.build())
        .build();
    Ok(cfg.new_agent())
}

/// The request body of one PUT: `len` bytes of a file from `offset`, read in [`CHUNK`]s.
/// Each chunk is accounted to the rate limit before it is handed to the socket, reported
/// as progress, and preceded by a stop check. A failure reading the local file, or a stop,
/// is remembered here so the caller can tell it from a network error (ureq reports both
/// as I/O errors).
pub struct BodyReader<'a> {
    file: io::Take<File>,
    throttle: &'a dyn Fn(u64),
    keep_going: &'a dyn Fn() -> bool,
    progress: &'a mut dyn FnMut(u64),
    /// Bytes of the object confirmed before this body (earlier parts).
    base: u64,
    /// Bytes of this body handed to the socket so far.
    pub sent: u64,
    pub local_error: Option<io::Error>,
    pub stopped: bool,
}

impl<'a> BodyReader<'a> {
    pub fn open(
        path: &Path,
        offset: u64,
        len: u64,
        base: u64,
        throttle: &'a dyn Fn(u64),
        keep_going: &'a dyn Fn() -> bool,
        progress: &'a mut dyn FnMut(u64),
    ) -> Result<BodyReader<'a>, RemoteError> {
        let mut f = File::open(path).map_err(local_read_error)?;
        f.seek(SeekFrom::Start(offset)).map_err(local_read_error)?;
        Ok(BodyReader {
            file: f.take(len),
            throttle,
            keep_going,
            progress,
            base,
            sent: 0,
            local_error: None,
            stopped: false,
        })
    }

    /// Turns a failed request into the right error: a stop or local read failure seen by
    /// this body wins over how ureq reported it.
    pub fn explain(&mut self, e: ureq::Error, what: &str) -> RemoteError {
        if self.stopped {
            return RemoteError::interrupted();
        }
        if let Some(le) = self.local_error.take() {
            return local_read_error(le);
        }
        transport_error(e, what)
    }
}

impl Read for BodyReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !(self.keep_going)() {
            self.stopped = true;
            return Err(io::Error::other("upload stopped at a safe point"));
        }
        let want = buf.len().min(CHUNK);
        let n = match self.file.read(&mut buf[..want]) {
            Ok(n) => n,
            Err(e) => {
                let msg = e.to_string();
                self.local_error = Some(e);
                return Err(io::Error::other(msg));
            }
        };
        if n > 0 {
            (self.throttle)(n as u64);
            self.sent += n as u64;
            (self.progress)(self.base + self.sent);
        }
        Ok(n)
    }
}

/// Digests of one range of a file, computed in a single read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digests {
    pub md5: Option<[u8; 16]>,
    pub sha256: Option<[u8; 32]>,
}

/// The MD5 and/or SHA-256 (as asked) of `len` bytes of `path` from `offset`; `also` (the
/// whole-object hash) is fed the same bytes. Only what is needed is computed: hashing is
/// most of the CPU an upload costs on a small ARM core. A short read means the file
/// shrank: it changed since ingest.
pub fn digest_range(
    path: &Path,
    offset: u64,
    len: u64,
    want_md5: bool,
    want_sha256: bool,
    also: Option<&mut Sha256>,
) -> Result<Digests, RemoteError> {
    let mut f = File::open(path).map_err(local_read_error)?;
    f.seek(SeekFrom::Start(offset)).map_err(local_read_error)?;
    let mut f = f.take(len);
    let mut md5 = want_md5.then(Md5::new);
    let mut sha = want_sha256.then(Sha256::new);
    let mut also = also;
    let mut buf = vec![0u8; 4 * CHUNK];
    let mut total = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(local_read_error(e)),
        };
        if let Some(h) = md5.as_mut() {
            h.update(&buf[..n]);
        }
        if let Some(h) = sha.as_mut() {
            h.update(&buf[..n]);
        }
        if let Some(h) = also.as_deref_mut() {
            h.update(&buf[..n]);
        }
        total += n as u64;
    }
    if total != len {
        return Err(RemoteError::new(
            ErrorClass::LocalChanged,
            "checksum_mismatch",
            format!(
                "file is shorter than when it was hashed ({total} of {len} bytes at offset {offset})"
            ),
        ));
    }
    Ok(Digests {
        md5: md5.map(|h| h.finalize().into()),
        sha256: sha.map(|h| h.finalize().into()),
    })
}

/// Writes a GET answer's body to `dest` through a temporary file, fsynced and renamed
/// into place, so `dest` is either absent or complete. Returns the bytes written.
pub fn save_body(
    resp: &mut ureq::http::Response<ureq::Body>,
    dest: &std::path::Path,
    what: &str,
) -> Result<u64, RemoteError> {
    let tmp = dest.with_extension("fieldsync-download");
    let io_err = |step: &str, e: std::io::Error| {
        RemoteError::transient("local_io", format!("{step} {}: {e}", tmp.display()))
    };
    let mut out = std::fs::File::create(&tmp).map_err(|e| io_err("create", e))?;
    let mut reader = resp.body_mut().with_config().limit(u64::MAX).reader();
    let n = std::io::copy(&mut reader, &mut out).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        RemoteError::transient("connection", format!("{what}: {e}"))
    })?;
    out.sync_all().map_err(|e| io_err("fsync", e))?;
    std::fs::rename(&tmp, dest).map_err(|e| io_err("rename", e))?;
    Ok(n)
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A transport failure (no HTTP answer): always worth retrying, the link may come back.
/// Only the error kind goes into the message, never the URL.
pub fn transport_error(e: ureq::Error, what: &str) -> RemoteError {
    let (code, detail) = match &e {
        ureq::Error::Timeout(t) => ("timeout", format!("timed out ({t})")),
        ureq::Error::HostNotFound => ("dns", "host not found".to_string()),
        ureq::Error::ConnectionFailed => ("connect", "connection failed".to_string()),
        ureq::Error::Io(io) => match io.kind() {
            io::ErrorKind::ConnectionRefused => ("connect", "connection refused".into()),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ("timeout", io.to_string()),
            _ => ("connection", io.to_string()),
        },
        ureq::Error::Tls(m) => ("tls", format!("TLS: {m}")),
        #[allow(unreachable_patterns)]
        ureq::Error::BadUri(_) => ("bad_url", "invalid URL".to_string()),
        ureq::Error::Protocol(p) => ("protocol", format!("HTTP protocol error: {p}")),
        other => ("connection", other.to_string()),
    };
    if code == "bad_url" {
        return RemoteError::permanent(code, format!("{what}: {detail}"));
    }
    RemoteError::transient(code, format!("{what}: {detail}"))
}

/// What a server said in an error body: S3's `<Code>`/`<Message>` XML, or a JSON
/// `{"code": …, "message": …}` / `{"error": …}` from a presign backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerSays {
    pub code: Option<String>,
    pub message: Option<String>,
}

pub fn parse_error_body(body: &str) -> ServerSays {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(body) {
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        return ServerSays {
            code: s("code"),
            message: s("message").or_else(|| s("error")),
        };
    }
    ServerSays {
        code: xml_tag(body, "Code"),
        message: xml_tag(body, "Message"),
    }
}

/// The text of the first `<tag>…</tag>` (S3 answers are flat enough for this).
pub fn xml_tag(body: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = body.find(&open)? + open.len();
    let end = body[start..].find(&close)? + start;
    Some(xml_unescape(&body[start..end]))
}

fn xml_unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Reads an (error) body, bounded.
pub fn read_body(resp: &mut ureq::http::Response<ureq::Body>) -> String {
    resp.body_mut()
        .with_config()
        .limit(MAX_ERROR_BODY)
        .read_to_string()
        .unwrap_or_default()
}

pub fn header(resp: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The error for a non-success HTTP answer: 401/403 are credentials (pause the queue),
/// 408/429/5xx and checksum mismatches are transient (honouring Retry-After), other 4xx are
/// permanent. The code is `s3_<ServerCode>` (or `http_<status>`), the message names what
/// was being done and what the server said, on one line.
pub fn status_error(
    status: u16,
    retry_after: Option<&str>,
    says: &ServerSays,
    what: &str,
) -> RemoteError {
    let code = match &says.code {
        Some(c) if !c.is_empty() => format!("s3_{c}"),
        _ => format!("http_{status}"),
    };
    let mut message = format!("{what}: HTTP {status}");
    if let Some(c) = &says.code {
        message.push_str(&format!(" {c}"));
    }
    if let Some(m) = &says.message {
        message.push_str(&format!(": {}", one_line(m, 200)));
    }
    let server_code = says.code.as_deref().unwrap_or("");
    let class = match (status, server_code) {
        // A body that did not match its checksum was damaged on the way: send again.
        (_, "BadDigest" | "InvalidDigest" | "XAmzContentChecksumMismatch" | "RequestTimeout") => {
            ErrorClass::Transient { retry_after: None }
        }
        // Credentials or signing set-up (expired session token, wrong region in the
        // signature): every file would fail the same way, so pause rather than fail each.
        (
            400,
            "ExpiredToken"
            | "InvalidToken"
            | "TokenRefreshRequired"
            | "AuthorizationHeaderMalformed"
            | "AuthorizationQueryParametersError",
        ) => ErrorClass::Auth,
        (401 | 403, _) => ErrorClass::Auth,
        (408 | 429, _) | (500..=599, _) => ErrorClass::Transient {
            retry_after: retry_after.and_then(parse_retry_after),
        },
        _ => ErrorClass::Permanent,
    };
    RemoteError::new(class, code, message)
}

/// Retry-After as delta-seconds or an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let at = parse_http_date(v)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(at.saturating_sub(now)).min(MAX_RETRY_AFTER))
}

/// Seconds since the epoch of an IMF-fixdate.
fn parse_http_date(v: &str) -> Option<u64> {
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    let mut it = v.split_whitespace();
    let _weekday = it.next()?;
    let day: u64 = it.next()?.parse().ok()?;
    let month = match it.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = it.next()?.parse().ok()?;
    let mut hms = it.next()?.split(':').map(|x| x.parse::<u64>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    if it.next()? != "GMT" || day == 0 || day > 31 || h > 23 || m > 59 || s > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days)
        .ok()
        .map(|d| d * 86_400 + h * 3600 + m * 60 + s)
}

/// Server text may span lines or be long; status and MQTT want one short line.
pub fn one_line(s: &str, max: usize) -> String {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() > max {
        let cut: String = s.chars().take(max).collect();
        format!("{cut}…")
    } else {
        s
    }
}

/// Removes `secrets` from `s` (defence in depth: a server may echo a header back).
pub fn scrub(mut s: String, secrets: &[&str]) -> String {
    for secret in secrets {
        if secret.len() >= 4 {
            s = s.replace(secret, "***");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        use crate::config::parse_size;
        assert_eq!(parse_size("8MiB").unwrap(), 8 * MIB);
        assert_eq!(parse_size("5 MB").unwrap(), 5_000_000);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(parse_size("8 parsecs").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn secrets_never_debug_print() {
        let s = Secret::new("hunter2-very-secret");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn statuses_map_to_classes() {
        let none = ServerSays::default();
        let c = |st, code: Option<&str>| {
            status_error(
                st,
                Some("7"),
                &ServerSays {
                    code: code.map(str::to_string),
                    message: Some("m\nx".into()),
                },
                "put",
            )
        };
        assert_eq!(
            c(403, Some("SignatureDoesNotMatch")).class,
            ErrorClass::Auth
        );
        assert_eq!(status_error(401, None, &none, "x").class, ErrorClass::Auth);
        assert_eq!(c(400, Some("ExpiredToken")).class, ErrorClass::Auth);
        assert_eq!(
            c(503, Some("SlowDown")).class,
            ErrorClass::Transient {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        assert!(matches!(
            c(429, None).class,
            ErrorClass::Transient {
                retry_after: Some(_)
            }
        ));
        assert!(matches!(
            c(400, Some("BadDigest")).class,
            ErrorClass::Transient { .. }
        ));
        let e = c(400, Some("InvalidArgument"));
        assert_eq!(e.class, ErrorClass::Permanent);
        assert_eq!(e.code, "s3_InvalidArgument");
        assert_eq!(e.message, "put: HTTP 400 InvalidArgument: m x");
        assert_eq!(status_error(413, None, &none, "x").code, "http_413");
    }

    #[test]
    fn error_bodies_and_dates_parse() {
        let x = "<?xml version=\"1.0\"?><Error><Code>NoSuchUpload</Code><Message>gone &amp; away</Message></Error>";
        let s = parse_error_body(x);
        assert_eq!(s.code.as_deref(), Some("NoSuchUpload"));
        assert_eq!(s.message.as_deref(), Some("gone & away"));
        let j = parse_error_body(r#"{"error":"bad token"}"#);
        assert_eq!(j.message.as_deref(), Some("bad token"));
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784111777)
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("5"), Some(Duration::from_secs(5)));
        assert_eq!(parse_retry_after("soon"), None);
    }
}
