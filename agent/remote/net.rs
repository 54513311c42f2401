//! HTTP plumbing shared by the `s3` and `http` remotes: the ureq agent (rustls with ring,
//! optional private CA bundle, stall timeouts), the streaming request body that reports
//! progress, honours the rate limit and stops at a safe point, the mapping of HTTP answers
//! and transport failures to [`ErrorClass`], and the config both share: the HTTP-client
//! keys ([`HttpClient`]) and credentials ([`Secret`]).
//!
//! Invariant: nothing here formats a request URL into a message. Presigned URLs carry the
//! access key id and, with temporary credentials, the session token in their query.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use md5::Md5;
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};

use super::file::local_read_error;
use super::{ErrorClass, RemoteError};
use crate::units::Dur;

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

/// The HTTP-client keys the `s3` and `http` remotes share. They are written in the
/// remote's own table (`[remote.s3]`, `[remote.http]`) beside its other keys, and defined,
/// defaulted and checked only here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpClient {
    /// PEM file of CA certificates to trust instead of the system's trust store (a
    /// private CA); see [`crate::tls::roots`].
    pub ca_bundle: Option<PathBuf>,
    /// TCP + TLS connect. Default 10s.
    pub connect_timeout: Dur,
    /// A read or write that makes no progress this long fails the request. Default 60s.
    pub read_timeout: Dur,
    /// An HTTP(S) CONNECT proxy (`http://user:pass@proxy.lan:3128`); wins over the
    /// `HTTPS_PROXY`/`HTTP_PROXY` environment. Its credentials are never printed.
    pub proxy: Option<ProxyUrl>,
}

/// A proxy URL as configured: printed by `Debug` and [`ProxyUrl::redacted`] without its
/// user name and password.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct ProxyUrl(String);

impl ProxyUrl {
    pub fn new(s: impl Into<String>) -> ProxyUrl {
        ProxyUrl(s.into())
    }

    /// The URL, or why it is not a usable proxy (never echoing the value).
    fn parse(&self) -> Result<url::Url, String> {
        let text = if self.0.contains("://") {
            self.0.clone()
        } else {
            format!("http://{}", self.0)
        };
        let u = url::Url::parse(&text)
            .map_err(|e| format!("expected a proxy URL such as \"http://proxy.lan:3128\" ({e})"))?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err("expected an http:// or https:// proxy URL".into());
        }
        if u.host_str().is_none_or(str::is_empty) {
            return Err("expected a proxy URL with a host".into());
        }
        Ok(u)
    }

    /// `scheme://host:port`, with `***@` in place of any credentials: for logs.
    pub fn redacted(&self) -> String {
        match self.parse() {
            Ok(u) => {
                let creds = if u.username().is_empty() && u.password().is_none() {
                    ""
                } else {
                    "***@"
                };
                format!(
                    "{}://{creds}{}:{}",
                    u.scheme(),
                    u.host_str().unwrap_or_default(),
                    u.port_or_known_default().unwrap_or(0)
                )
            }
            Err(_) => "<invalid proxy URL>".into(),
        }
    }

    /// The ureq proxy, with the `NO_PROXY` list `no_proxy` (comma-separated).
    fn to_ureq(&self, no_proxy: Option<&str>) -> Result<ureq::Proxy, String> {
        use ureq::ProxyProtocol;
        let u = self.parse()?;
        let proto = if u.scheme() == "https" {
            ProxyProtocol::Https
        } else {
            ProxyProtocol::Http
        };
        let host = u.host_str().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let mut b = ureq::Proxy::builder(proto)
            .host(host)
            .port(u.port_or_known_default().unwrap_or(3128));
        if !u.username().is_empty() {
            b = b.username(&percent_decode(u.username()));
        }
        if let Some(p) = u.password() {
            b = b.password(&percent_decode(p));
        }
        for expr in no_proxy.unwrap_or_default().split(',') {
            let expr = expr.trim();
            if !expr.is_empty() {
                b = b.no_proxy(expr);
            }
        }
        b.build()
            .map_err(|_| "expected a proxy URL such as \"http://proxy.lan:3128\"".into())
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where a remote's requests go: the configured `proxy`, else the environment's proxy for
/// the endpoint's scheme (`HTTPS_PROXY` for https, `HTTP_PROXY` for http; either in lower
/// case too; then `ALL_PROXY`). Returns the proxy and where it came from. `NO_PROXY`
/// (or `no_proxy`) lists hosts reached directly, whichever way the proxy was given.
pub fn choose_proxy(
    configured: Option<&ProxyUrl>,
    https: bool,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<(ProxyUrl, String)> {
    if let Some(p) = configured {
        return Some((p.clone(), "proxy".into()));
    }
    let names: &[&str] = if https {
        &["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
    } else {
        &["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
    };
    names.iter().find_map(|n| {
        env(n)
            .filter(|v| !v.trim().is_empty())
            .map(|v| (ProxyUrl::new(v.trim()), (*n).to_string()))
    })
}

/// The `NO_PROXY` list of the environment.
fn no_proxy_env(env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    env("NO_PROXY").or_else(|| env("no_proxy"))
}

impl Default for HttpClient {
    fn default() -> Self {
        HttpClient {
            ca_bundle: None,
            connect_timeout: Dur::secs(10),
            read_timeout: Dur::secs(60),
            proxy: None,
        }
    }
}

impl HttpClient {
    /// The keys, as written in the config file.
    const KEYS: [&'static str; 4] = ["ca_bundle", "connect_timeout", "read_timeout", "proxy"];

    /// Reads the value of `key` (one of [`Self::KEYS`]).
    fn set<'de, D: Deserializer<'de>>(&mut self, key: &str, value: D) -> Result<(), D::Error> {
        match key {
            "ca_bundle" => self.ca_bundle = Some(PathBuf::deserialize(value)?),
            "connect_timeout" => self.connect_timeout = Dur::deserialize(value)?,
            "read_timeout" => self.read_timeout = Dur::deserialize(value)?,
            "proxy" => self.proxy = Some(ProxyUrl::deserialize(value)?),
            _ => unreachable!("not an HTTP-client key: {key}"),
        }
        Ok(())
    }

    /// Checks what the types cannot; `table` is where the keys were written
    /// (`remote.s3`). Returns the key and what is expected.
    pub fn validate(&self, table: &str) -> Result<(), (String, String)> {
        if self.connect_timeout.0.is_zero() {
            return Err((
                format!("{table}.connect_timeout"),
                "expected more than 0s".into(),
            ));
        }
        if self.read_timeout.0 < Duration::from_secs(1) {
            return Err((
                format!("{table}.read_timeout"),
                "expected at least 1s".into(),
            ));
        }
        if let Some(p) = &self.proxy {
            p.to_ureq(None).map_err(|m| (format!("{table}.proxy"), m))?;
        }
        Ok(())
    }
}

/// A remote's table that holds the [`HttpClient`] keys beside its own. serde's `flatten`
/// would buffer the table, which loses the line of an error and does not combine with
/// `deny_unknown_fields`. Instead [`with_client`] reads the table's keys once, in order:
/// it takes the HTTP-client keys out as they come and hands every other key to the
/// remote's own derived deserializer, whose `deny_unknown_fields` still rejects an unknown
/// key, with the key's line, as for every other table.
pub trait WithHttpClient: Sized {
    /// The derived deserializer of the table's own keys (`#[serde(remote = "Self")]`).
    fn own_keys<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error>;
    /// Where the HTTP-client keys go (a `#[serde(skip)]` field).
    fn client_mut(&mut self) -> &mut HttpClient;
}

/// The `Deserialize` of a [`WithHttpClient`] table.
pub fn with_client<'de, D: Deserializer<'de>, T: WithHttpClient>(d: D) -> Result<T, D::Error> {
    struct Table<T>(PhantomData<T>);
    impl<'de, T: WithHttpClient> Visitor<'de> for Table<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table")
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            let mut client = HttpClient::default();
            let mut own = T::own_keys(OwnKeys {
                map,
                client: &mut client,
            })?;
            *own.client_mut() = client;
            Ok(own)
        }
    }
    d.deserialize_map(Table(PhantomData))
}

/// The table's map without the HTTP-client keys, as a deserializer for the own keys.
struct OwnKeys<'c, A> {
    map: A,
    client: &'c mut HttpClient,
}

enum Key<K> {
    Own(K),
    Client(&'static str),
}

/// Reads one key: an HTTP-client key is reported as such, any other goes to `seed` (the
/// own keys' field visitor). Both run inside the file's key deserializer, so an error
/// (an unknown key) carries the key's position.
struct KeySeed<'s, K>(&'s mut Option<K>);

impl<'de, K: DeserializeSeed<'de>> DeserializeSeed<'de> for KeySeed<'_, K> {
    type Value = Key<K::Value>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let name = String::deserialize(d)?;
        if let Some(k) = HttpClient::KEYS.iter().find(|k| **k == name) {
            return Ok(Key::Client(k));
        }
        let seed = self.0.take().expect("one own key per call");
        let name: de::value::StringDeserializer<D::Error> = name.into_deserializer();
        seed.deserialize(name).map(Key::Own).map_err(|e| {
            // The own keys' list of what is expected lacks the HTTP-client keys.
            let msg = e.to_string();
            let msg = msg.trim_end();
            if msg.starts_with("unknown field") {
                let more = HttpClient::KEYS.map(|k| format!("`{k}`")).join(", ");
                de::Error::custom(format!("{msg}, {more}"))
            } else {
                e
            }
        })
    }
}

struct ClientValue<'c> {
    key: &'static str,
    client: &'c mut HttpClient,
}

impl<'de> DeserializeSeed<'de> for ClientValue<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.client.set(self.key, d)
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for OwnKeys<'_, A> {
    type Error = A::Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let mut seed = Some(seed);
        loop {
            match self.map.next_key_seed(KeySeed(&mut seed))? {
                None => return Ok(None),
                Some(Key::Own(k)) => return Ok(Some(k)),
                Some(Key::Client(key)) => self.map.next_value_seed(ClientValue {
                    key,
                    client: self.client,
                })?,
            }
        }
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

impl<'de, A: MapAccess<'de>> Deserializer<'de> for OwnKeys<'_, A> {
    type Error = A::Error;
    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, A::Error> {
        v.visit_map(self)
    }
    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

/// Builds the HTTP agent from the remote's [`HttpClient`] keys; `table` names them in
/// errors (`remote.s3`). Status codes are returned, not raised, so every answer goes
/// through [`status_error`]; redirects are not followed (a redirected signed request
/// fails anyway, and following one could send a presigned URL's body elsewhere).
///
/// Without a `ca_bundle` the system's trust store must hold CAs only if `needs_tls` (the
/// endpoint is https): a plain-http MinIO in the LAN works on a device without one.
pub fn agent(client: &HttpClient, table: &str, needs_tls: bool) -> Result<ureq::Agent, String> {
    agent_with_env(client, table, needs_tls, &|k| std::env::var(k).ok())
}

/// [`agent`] with the environment given (for tests).
pub fn agent_with_env(
    client: &HttpClient,
    table: &str,
    needs_tls: bool,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ureq::Agent, String> {
    use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
    let proxy = match choose_proxy(client.proxy.as_ref(), needs_tls, env) {
        None => None,
        Some((p, source)) => match p.to_ureq(no_proxy_env(env).as_deref()) {
            Ok(u) => {
                tracing::info!(proxy = %p.redacted(), source = %source, "{table}: requests go through a proxy");
                Some(u)
            }
            // The config key was checked at load; a bad environment value is ignored.
            Err(m) => {
                tracing::warn!(source = %source, "{table}: ignoring the proxy: {m}");
                None
            }
        },
    };
    let roots = match crate::tls::roots(client.ca_bundle.as_deref()) {
        Ok(r) => r,
        Err(crate::tls::RootsError::NoSystemRoots) if !needs_tls => {
            tracing::warn!(
                "{table}: no CA certificates in the system trust store; https URLs will fail"
            );
            Vec::new()
        }
        Err(e @ crate::tls::RootsError::NoSystemRoots) => {
            return Err(format!("{table}: {e}; set {table}.ca_bundle"))
        }
        Err(e) => return Err(format!("{table}.ca_bundle {e}")),
    };
    let roots: Vec<Certificate<'static>> = roots
        .iter()
        .map(|c| Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(crate::tls::provider())
        .root_certs(RootCerts::new_with_certs(&roots));
    let cfg = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .user_agent(concat!("fieldsync/", env!("CARGO_PKG_VERSION")))
        .timeout_connect(Some(client.connect_timeout.0))
        // Per read and per write: a stalled link fails after this long, a slow one that
        // keeps moving never does (a whole-request timeout would kill big parts on 2G).
        .timeout_per_read(Some(client.read_timeout.0))
        .timeout_per_write(Some(client.read_timeout.0))
        .tls_config(tls.build())
        .proxy(proxy)
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
        let mut f = crate::localfs::open_regular(path).map_err(local_read_error)?;
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
    let mut f = crate::localfs::open_regular(path).map_err(local_read_error)?;
    f.seek(SeekFrom::Start(offset)).map_err(local_read_error)?;
    let mut f = f.take(len);
    let mut md5 = want_md5.then(Md5::new);
    let mut sha = want_sha256.then(Sha256::new);
    let mut also = also;
    // One chunk: larger reads hash no faster, and every sender holds one.
    let mut buf = vec![0u8; CHUNK];
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

/// Copies a GET answer's body to `out`, chunk by chunk through the rate limit and the
/// stop check. `skip` bytes at the start are read and dropped (a server that answered a
/// Range request with the whole object). Returns the bytes written to `out`.
pub fn copy_body(
    resp: &mut ureq::http::Response<ureq::Body>,
    mut skip: u64,
    out: &mut dyn io::Write,
    ctx: &super::DownloadCtx<'_>,
    what: &str,
) -> Result<u64, RemoteError> {
    let mut reader = resp.body_mut().with_config().limit(u64::MAX).reader();
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    loop {
        if !(ctx.keep_going)() {
            return Err(RemoteError::interrupted());
        }
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(written),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(RemoteError::transient("connection", format!("{what}: {e}"))),
        };
        (ctx.throttle)(n as u64);
        let start = skip.min(n as u64) as usize;
        skip -= start as u64;
        if start < n {
            out.write_all(&buf[start..n])
                .map_err(|e| RemoteError::transient("local_io", format!("{what}: write: {e}")))?;
            written += (n - start) as u64;
        }
    }
}

/// Whether a GET with `Range: bytes=offset-` was answered with the range (206), else the
/// bytes to skip (a 200 with the whole object). `None`: not a success.
pub fn range_skip(status: u16, offset: u64) -> Option<u64> {
    match status {
        206 => Some(0),
        200 => Some(offset),
        _ => None,
    }
}

/// Reads a small body whole, refusing one above [`super::MAX_SMALL_OBJECT`].
pub fn small_body(
    resp: &mut ureq::http::Response<ureq::Body>,
    what: &str,
) -> Result<Vec<u8>, RemoteError> {
    resp.body_mut()
        .with_config()
        .limit(super::MAX_SMALL_OBJECT)
        .read_to_vec()
        .map_err(|e| RemoteError::transient("connection", format!("{what}: {e}")))
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

/// The answer to a conditional GET (`If-None-Match: tag`) as a [`super::Fetched`], for
/// every HTTP remote; `other` turns any other status into the remote's error.
pub fn fetched(
    mut resp: ureq::http::Response<ureq::Body>,
    tag: Option<&str>,
    other: impl FnOnce(ureq::http::Response<ureq::Body>) -> super::RemoteError,
) -> Result<super::Fetched, super::RemoteError> {
    use super::Fetched;
    match resp.status().as_u16() {
        304 => Ok(Fetched::Unchanged),
        404 => Ok(Fetched::Missing),
        s if (200..300).contains(&s) => {
            let new_tag = header(&resp, "etag");
            // A server that ignores If-None-Match sends the body again: the ETag still
            // tells that nothing changed.
            if new_tag.is_some() && new_tag.as_deref() == tag {
                return Ok(Fetched::Unchanged);
            }
            let body = small_body(&mut resp, "get object")?;
            Ok(Fetched::Changed { body, tag: new_tag })
        }
        _ => Err(other(resp)),
    }
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
        // The signature's time is too far from the server's: the device clock is wrong
        // (a board without an RTC before NTP synced). Not the credentials.
        (_, "RequestTimeTooSkewed") => ErrorClass::ClockSkew,
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

/// The error for a non-2xx answer: its class, and the server's code and message (read from
/// the body). The caller scrubs its credentials from it.
pub fn answer_error(mut resp: ureq::http::Response<ureq::Body>, what: &str) -> RemoteError {
    let status = resp.status().as_u16();
    let retry_after = header(&resp, "retry-after");
    let date = header(&resp, "date");
    let says = parse_error_body(&read_body(&mut resp));
    let e = status_error(status, retry_after.as_deref(), &says, what);
    with_clock_check(e, date.as_deref(), SystemTime::now())
}

/// How far the local clock may be from the server's `Date` before a refused request is
/// blamed on the clock rather than the credentials. S3 itself allows 15 minutes; some
/// S3-compatible stores allow less, so a refusal with the clock 5 minutes off is already
/// the clock's fault as far as an operator can tell.
pub const CLOCK_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// How far the local clock `now` is from the server's `Date` header, in seconds
/// (positive: the device is ahead). `None` without a parseable header.
pub fn clock_offset(date: Option<&str>, now: SystemTime) -> Option<i64> {
    let server = parse_http_date(date?)? as i64;
    let local = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    Some(local - server)
}

/// A refused request (401/403) is the clock's fault when the local clock is more than
/// [`CLOCK_TOLERANCE`] from the server's `Date`, unless the server named the key as the
/// problem: a HEAD's answer has no body to say `RequestTimeTooSkewed`, and a presigned
/// request signed in 1970 is refused as `AccessDenied: Request has expired`. Any
/// clock-skew error gets the offset in its message.
pub fn with_clock_check(mut e: RemoteError, date: Option<&str>, now: SystemTime) -> RemoteError {
    const THE_KEY: [&str; 2] = ["s3_InvalidAccessKeyId", "s3_SignatureDoesNotMatch"];
    let Some(offset) = clock_offset(date, now) else {
        return e;
    };
    if e.class == ErrorClass::Auth
        && !THE_KEY.contains(&e.code.as_str())
        && offset.unsigned_abs() > CLOCK_TOLERANCE.as_secs()
    {
        e.class = ErrorClass::ClockSkew;
        if e.code.starts_with("http_") {
            e.code = "clock_skew".into();
        }
    }
    if e.class == ErrorClass::ClockSkew {
        e.message.push_str(&format!(
            " (device clock {offset:+} s from the server's Date)"
        ));
    }
    e
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

/// Seconds since the epoch of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`, RFC 9110's
/// preferred form, which is RFC 2822's with the zone `GMT`).
fn parse_http_date(v: &str) -> Option<u64> {
    let t = jiff::fmt::rfc2822::DateTimeParser::new()
        .parse_timestamp(v)
        .ok()?;
    u64::try_from(t.as_second()).ok()
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
    fn proxy_follows_the_config_then_the_scheme_of_the_endpoint() {
        let env = |k: &str| match k {
            "HTTPS_PROXY" => Some("http://secure.lan:3128".to_string()),
            "http_proxy" => Some("plain.lan:8080".to_string()),
            _ => None,
        };
        let (p, src) = choose_proxy(None, true, &env).unwrap();
        assert_eq!(
            (p.redacted().as_str(), src.as_str()),
            ("http://secure.lan:3128", "HTTPS_PROXY")
        );
        let (p, src) = choose_proxy(None, false, &env).unwrap();
        assert_eq!(
            (p.redacted().as_str(), src.as_str()),
            ("http://plain.lan:8080", "http_proxy")
        );
        let cfg = ProxyUrl::new("http://u:p%40ss@cfg.lan:3128");
        let (p, src) = choose_proxy(Some(&cfg), true, &env).unwrap();
        assert_eq!(src, "proxy");
        assert_eq!(p.redacted(), "http://***@cfg.lan:3128");
        assert!(choose_proxy(None, true, &|_| None).is_none());
        let all = |k: &str| (k == "ALL_PROXY").then(|| "http://all.lan:1".to_string());
        assert_eq!(choose_proxy(None, false, &all).unwrap().1, "ALL_PROXY");
    }

    #[test]
    fn proxy_credentials_are_never_printed() {
        let p = ProxyUrl::new("http://alice:s3cr3t-pw@proxy.lan:3128");
        assert!(!format!("{p:?}").contains("s3cr3t"));
        assert!(!format!("{p:?}").contains("alice"));
        let u = p.to_ureq(Some("localhost, .internal")).unwrap();
        assert_eq!(u.username(), Some("alice"));
        assert_eq!(u.password(), Some("s3cr3t-pw"));
        assert!(!format!("{u:?}").contains("s3cr3t"));
        assert_eq!(percent_decode("p%40ss%2"), "p@ss%2");
        let client = HttpClient {
            proxy: Some(ProxyUrl::new("ftp://bob:hunter22@x")),
            ..HttpClient::default()
        };
        let (k, m) = client.validate("remote.s3").unwrap_err();
        assert_eq!(k, "remote.s3.proxy");
        assert!(!m.contains("hunter22") && !m.contains("bob"), "{m}");
    }

    #[test]
    fn sizes_parse_with_units() {
        use crate::units::parse_size;
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
    fn skewed_clocks_are_told_from_bad_credentials() {
        let says = |code: &str| ServerSays {
            code: Some(code.into()),
            message: None,
        };
        // The server's code decides, whatever the Date.
        let e = status_error(403, None, &says("RequestTimeTooSkewed"), "put");
        assert_eq!(e.class, ErrorClass::ClockSkew);
        assert_eq!(e.code, "s3_RequestTimeTooSkewed");
        let server = "Sun, 06 Nov 1994 08:49:37 GMT";
        let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(secs);
        // A bodyless 403 (HEAD) with the clock in 1970: the clock.
        let head = || status_error(403, None, &ServerSays::default(), "head bucket");
        let e = with_clock_check(head(), Some(server), at(0));
        assert_eq!(e.class, ErrorClass::ClockSkew);
        assert_eq!(e.code, "clock_skew");
        assert!(e
            .message
            .ends_with("(device clock -784111777 s from the server's Date)"));
        // Two hours ahead: the clock. Within the tolerance: the credentials.
        let e = with_clock_check(head(), Some(server), at(784111777 + 7200));
        assert_eq!(e.class, ErrorClass::ClockSkew);
        let e = with_clock_check(head(), Some(server), at(784111777 + 60));
        assert_eq!(e.class, ErrorClass::Auth);
        assert_eq!(e.code, "http_403");
        // An expired presigned request, with the clock in 1970: the clock.
        let e = with_clock_check(
            status_error(403, None, &says("AccessDenied"), "put"),
            Some(server),
            at(0),
        );
        assert_eq!(
            (e.class, e.code.as_str()),
            (ErrorClass::ClockSkew, "s3_AccessDenied")
        );
        // A refusal naming the key stays what the server said; no Date, no guess.
        let e = with_clock_check(
            status_error(403, None, &says("InvalidAccessKeyId"), "put"),
            Some(server),
            at(0),
        );
        assert_eq!(e.class, ErrorClass::Auth);
        assert_eq!(
            with_clock_check(head(), None, at(0)).class,
            ErrorClass::Auth
        );
        assert_eq!(clock_offset(Some("soon"), at(0)), None);
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
