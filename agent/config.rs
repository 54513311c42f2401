//! Configuration: one TOML file, every key optional with a documented default.
//!
//! Unknown keys, wrong types and bad values are rejected at start with one line naming the
//! file, the key and what was expected (`ConfigError`). `config/demo.toml` is compiled in
//! as the embedded default used when no config file exists.
//!
//! By section: a table read by one part is defined (with its defaults and checks) in that
//! part: `[ingest]` in `ingest`, `[remote]` and its kinds in `remote`, `[conditions]` and
//! `[retention]` in `conditions::settings`, `[mqtt]` in `mqtt`. This module assembles
//! them, holds the tables several parts read (`[paths]`, `[upload]`, `[log]`) and the
//! loader; the caller hands each part only its own section. The parts never import this
//! module, and values are written in the same units everywhere (`crate::units`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::conditions::settings::{Conditions, Retention};
use crate::ingest::IngestConfig;
use crate::mqtt::MqttConfig;
use crate::remote::RemoteConfig;
/// Durations and byte sizes mean the same in every table.
pub use crate::units::{parse_size, Dur, Size};

/// Parses a log filter (`info`, `fieldsync=debug,info`: a default level and per-target
/// levels, the `RUST_LOG` syntax without span and field filters, which would pull a regex
/// engine into the device binary).
pub fn log_filter(s: &str) -> Result<tracing_subscriber::filter::Targets, String> {
    s.trim().parse().map_err(|e| format!("{e}"))
}

/// The demo configuration, used when no `--config` is given and the default path is absent.
pub const DEMO_TOML: &str = include_str!("../config/demo.toml");

/// Where the daemon looks for its configuration when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/fieldsync/fieldsync.toml";

/// How errors name the configuration: the `--config` file, the default path, or the
/// embedded demo.
pub fn source(path: Option<&Path>, embedded: bool) -> String {
    path.map(|p| p.display().to_string()).unwrap_or_else(|| {
        if embedded {
            "<embedded demo config>".into()
        } else {
            DEFAULT_PATH.into()
        }
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("config {file}: {location}{key}: {message}")]
    Invalid {
        file: String,
        /// `line N: ` when the parser knows it.
        location: String,
        /// `key `a.b`` or empty when the error is not about one key (TOML syntax).
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// A problem found once the file parsed: in a file a key names (a credentials file, a
    /// CA bundle, a password or token file) or in what the values amount to (no
    /// credentials at all). `line` starts with the key it is about, as the remotes' and
    /// MQTT's errors do (`remote.s3.ca_bundle /x.pem: …`, `remote.s3: no credentials: …`,
    /// `mqtt.password_file /x: …`); it becomes ``config <file>: key `<key>`: <the rest>``,
    /// the form of every other configuration error.
    pub fn keyed(file: &str, line: &str) -> ConfigError {
        let line = one_line(line);
        let end = line.find([' ', ':']).unwrap_or(line.len());
        let (key, rest) = line.split_at(end);
        let rest = rest.trim_start_matches(':').trim_start();
        let (key, message) = if key.is_empty() || rest.is_empty() {
            ("top level".to_string(), line.clone())
        } else {
            (format!("key `{key}`"), rest.to_string())
        };
        ConfigError::Invalid {
            file: file.to_string(),
            location: String::new(),
            key,
            message,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identifies this device in object keys and MQTT topics. Default: the hostname.
    #[serde(default = "default_device_id")]
    pub device_id: String,
    #[serde(default)]
    pub paths: Paths,
    #[serde(default)]
    pub ingest: IngestConfig,
    #[serde(default)]
    pub upload: Upload,
    #[serde(default)]
    pub remote: RemoteConfig,
    #[serde(default)]
    pub log: Log,
    /// When uploads may run: network, metered budget, battery, disk, schedule, rate.
    #[serde(default)]
    pub conditions: Conditions,
    /// Which local copies of uploaded files may be deleted.
    #[serde(default)]
    pub retention: Retention,

    /// Fleet reporting over MQTT; absent: no MQTT at all.
    pub mqtt: Option<MqttConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Paths {
    /// The folder the inspection app writes photos into.
    pub capture: PathBuf,
    /// Where the queue database lives; must survive reboots.
    pub state_dir: PathBuf,
    /// Where files that assignments name are downloaded to; never inside `capture`, so
    /// nothing downloaded is uploaded back.
    pub inbox: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            capture: "/var/lib/fieldsync/capture".into(),
            state_dir: "/var/lib/fieldsync".into(),
            inbox: "/var/lib/fieldsync/inbox".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    OldestFirst,
    NewestFirst,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upload {
    /// Uploads running at once.
    pub concurrency: u32,
    pub order: Order,
    /// The periodic wake-up (retries, missed events), like the attachment queue's 30 s.
    pub sync_interval: Dur,
    /// First retry delay after a transient error; doubles per attempt.
    pub initial_backoff: Dur,
    /// Cap of the retry delay.
    pub max_backoff: Dur,
    /// Attempts before a permanent error marks the attachment `failed`.
    pub permanent_attempts: u32,
    /// Attempts before a transient error marks it `failed`; 0 retries forever.
    pub transient_attempts: u32,
    /// While the remote refuses the credentials (`auth` pause), how often to re-check.
    pub auth_recheck: Dur,
    /// An `alarm` event when the oldest pending photo has waited longer; unset: never.
    pub pending_alarm_after: Option<Dur>,
    /// A `checklist_stalled` event when a checklist has waited longer than this for its
    /// photos (once per wait); unset: never.
    pub checklist_alarm_after: Option<Dur>,
}

impl Default for Upload {
    fn default() -> Self {
        Upload {
            concurrency: 2,
            order: Order::OldestFirst,
            sync_interval: Dur::secs(30),
            initial_backoff: Dur::secs(5),
            max_backoff: Dur::secs(300),
            permanent_attempts: 3,
            transient_attempts: 0,
            auth_recheck: Dur::secs(60),
            pending_alarm_after: None,
            checklist_alarm_after: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub format: LogFormat,
    /// A tracing filter (`info`, `fieldsync=debug`, …); RUST_LOG overrides it.
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

fn default_device_id() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "fieldsync-device".into())
}

impl Config {
    /// The ingest part, built from the sections it needs (capture folder, `[ingest]`, the
    /// remote prefix and the device id: together they name every object key).
    pub fn ingestor(&self) -> crate::ingest::Ingestor {
        crate::ingest::Ingestor::new(
            &self.paths.capture,
            &self.ingest,
            &self.remote.prefix,
            &self.device_id,
        )
    }

    /// Loads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Config::parse(&text, &file)
    }

    /// The embedded demo configuration.
    pub fn demo() -> Config {
        Config::parse(DEMO_TOML, "<embedded demo config>").expect("embedded demo config is valid")
    }

    /// Parses and validates TOML text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let invalid = |key: String, message: String, span: Option<std::ops::Range<usize>>| {
            ConfigError::Invalid {
                file: file.to_string(),
                location: span
                    .map(|s| format!("line {}: ", line_of(text, s.start)))
                    .unwrap_or_default(),
                key,
                message,
            }
        };
        let de = toml::de::Deserializer::parse(text).map_err(|e| {
            let (key, message) = syntax_subject(text, e.message(), e.span());
            invalid(key, message, e.span())
        })?;
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let key = if path.is_empty() || path == "." {
                // Never an empty key in the line (`line 3: : …`).
                "top level".to_string()
            } else {
                format!("key `{path}`")
            };
            invalid(key, one_line(inner.message()), inner.span())
        })?;
        cfg.validate().map_err(|(key, msg)| ConfigError::Invalid {
            file: file.to_string(),
            location: String::new(),
            key: format!("key `{key}`"),
            message: msg,
        })?;
        Ok(cfg)
    }

    /// Checks values that the types alone cannot: returns the key and what is expected.
    fn validate(&self) -> Result<(), (String, String)> {
        let own = |(k, m): (&str, String)| (k.to_string(), m);
        self.validate_own().map_err(own)?;
        self.ingest.validate().map_err(own)?;
        self.remote.validate()?;
        self.conditions.validate().map_err(own)?;
        if let Some(m) = &self.mqtt {
            m.validate().map_err(own)?;
        }
        if log_filter(&self.log.level).is_err() {
            return Err((
                "log.level".into(),
                "expected a level such as \"info\" or \"fieldsync=debug\"".into(),
            ));
        }
        Ok(())
    }

    /// The keys of this module's own tables.
    fn validate_own(&self) -> Result<(), (&'static str, String)> {
        if self.device_id.is_empty() || self.device_id.contains(['/', '+', '#']) {
            return Err((
                "device_id",
                "expected a non-empty name without `/`, `+` or `#`".into(),
            ));
        }
        if !(1..=64).contains(&self.upload.concurrency) {
            return Err((
                "upload.concurrency",
                "expected a number from 1 to 64".into(),
            ));
        }
        if self.upload.sync_interval.0 < Duration::from_millis(100) {
            return Err(("upload.sync_interval", "expected at least 100ms".into()));
        }
        if self.upload.initial_backoff.0 > self.upload.max_backoff.0 {
            return Err((
                "upload.initial_backoff",
                "expected a value not above upload.max_backoff".into(),
            ));
        }
        if overlaps(&self.paths.inbox, &self.paths.capture) {
            return Err(("paths.inbox", INBOX_OVERLAP.into()));
        }
        if self.upload.permanent_attempts == 0 {
            return Err(("upload.permanent_attempts", "expected at least 1".into()));
        }
        Ok(())
    }

    /// Checks `paths.capture` and `paths.state_dir` against the file system (`config
    /// check` and `run`): each must be a directory, or a missing one that can be created;
    /// with `create` (the daemon's start) they are created. `file` names the config in the
    /// error, which is a configuration error like any other (exit 2, not a restart loop).
    pub fn check_paths(&self, file: &str, create: bool) -> Result<(), ConfigError> {
        for (key, path) in [
            ("paths.capture", &self.paths.capture),
            ("paths.state_dir", &self.paths.state_dir),
        ] {
            check_dir(path, create).map_err(|message| ConfigError::Invalid {
                file: file.to_string(),
                location: String::new(),
                key: format!("key `{key}`"),
                message,
            })?;
        }
        // `validate` compares the paths as written; through a link (or `..` past one)
        // the inbox may still lie inside the capture folder.
        if overlaps(&resolved(&self.paths.inbox), &resolved(&self.paths.capture)) {
            return Err(ConfigError::Invalid {
                file: file.to_string(),
                location: String::new(),
                key: "key `paths.inbox`".into(),
                message: INBOX_OVERLAP.into(),
            });
        }
        Ok(())
    }

    /// The queue database inside the state directory.
    pub fn db_path(&self) -> PathBuf {
        self.paths.state_dir.join("queue.db")
    }
}

/// A directory that exists, or can be created (and is, with `create`); else what is wrong.
fn check_dir(path: &Path, create: bool) -> Result<(), String> {
    let kind = |m: &std::fs::Metadata| {
        if m.is_file() {
            "a regular file"
        } else {
            "not a directory"
        }
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(m) => {
            return Err(format!(
                "expected a directory; {} is {}",
                path.display(),
                kind(&m)
            ))
        }
        // ENOTDIR: a file above it; the walk below names it.
        Err(e)
            if e.kind() != std::io::ErrorKind::NotFound
                && e.kind() != std::io::ErrorKind::NotADirectory =>
        {
            return Err(format!("cannot use {}: {e}", path.display()))
        }
        Err(_) => {}
    }
    // Missing: the nearest existing folder above it must be a directory.
    let mut up = path.parent();
    while let Some(p) = up.filter(|p| !p.as_os_str().is_empty()) {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => break,
            Ok(m) => {
                return Err(format!(
                    "cannot create {}: {} is {}",
                    path.display(),
                    p.display(),
                    kind(&m)
                ))
            }
            Err(_) => up = p.parent(),
        }
    }
    if create {
        std::fs::create_dir_all(path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    }
    Ok(())
}

/// What a TOML parse error is about, for its one line: the table or key a `duplicate key`
/// names (from the text at the error), else `syntax error`; and the message.
fn syntax_subject(
    text: &str,
    message: &str,
    span: Option<std::ops::Range<usize>>,
) -> (String, String) {
    let message = one_line(message);
    let at = span
        .as_ref()
        .and_then(|s| text.get(s.clone()))
        .map(str::trim)
        .unwrap_or("");
    if message == "duplicate key" && !at.is_empty() {
        let start = span.map(|s| s.start).unwrap_or(0);
        let line_start = text[..start].rfind('\n').map(|i| i + 1).unwrap_or(0);
        let line = text[line_start..].lines().next().unwrap_or("").trim();
        if let Some(header) = line.strip_prefix('[') {
            let name = header
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or(at);
            return (
                format!("table `{}`", name.trim()),
                "defined twice (merge the two tables)".into(),
            );
        }
        return (format!("key `{at}`"), "defined twice".into());
    }
    ("syntax error".into(), message)
}

/// Why `paths.inbox` is refused when it overlaps `paths.capture`.
const INBOX_OVERLAP: &str = "expected a folder outside paths.capture (and not containing it): downloaded files must not be uploaded back";

/// `p` with its links resolved: the nearest existing folder canonicalized, the rest as
/// written (it does not exist yet, so no link can be in it).
fn resolved(p: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut cur = p;
    loop {
        if let Ok(real) = std::fs::canonicalize(if cur.as_os_str().is_empty() {
            Path::new(".")
        } else {
            cur
        }) {
            let mut out = real;
            for c in rest.iter().rev() {
                out.push(c);
            }
            return out;
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                cur = parent;
            }
            _ => return p.to_path_buf(),
        }
    }
}

/// Whether one path is inside the other (or both are the same), compared component by
/// component after resolving `.` and `..` lexically (the folders may not exist yet).
fn overlaps(a: &Path, b: &Path) -> bool {
    fn norm(p: &Path) -> PathBuf {
        let mut out = PathBuf::new();
        for c in p.components() {
            match c {
                std::path::Component::CurDir => {}
                std::path::Component::ParentDir => {
                    out.pop();
                }
                other => out.push(other),
            }
        }
        out
    }
    let (a, b) = (norm(a), norm(b));
    a.starts_with(&b) || b.starts_with(&a)
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Error messages must stay one line (they go to logs and MQTT results).
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_errors_name_the_file_and_the_key() {
        let e = |line: &str| ConfigError::keyed("/etc/f.toml", line).to_string();
        assert_eq!(
            e("remote.s3.ca_bundle /x.pem: No such file or directory (os error 2)"),
            "config /etc/f.toml: key `remote.s3.ca_bundle`: /x.pem: No such file or directory (os error 2)"
        );
        assert_eq!(
            e("remote.s3: no credentials: set access_key_id"),
            "config /etc/f.toml: key `remote.s3`: no credentials: set access_key_id"
        );
        assert_eq!(
            e("mqtt TLS: bad\nthing"),
            "config /etc/f.toml: key `mqtt`: TLS: bad thing"
        );
        assert_eq!(e("oops"), "config /etc/f.toml: top level: oops");
    }

    fn err(text: &str) -> String {
        Config::parse(text, "/etc/x.toml").unwrap_err().to_string()
    }

    #[test]
    fn embedded_demo_config_is_valid() {
        let c = Config::demo();
        assert_eq!(c.remote.kind, crate::remote::RemoteKind::File);
    }

    #[test]
    fn annotated_example_config_is_valid() {
        let text = include_str!("../config/s3.example.toml");
        let c = Config::parse(text, "s3.example.toml").unwrap();
        let s3 = c.remote.s3.unwrap();
        assert_eq!(s3.bucket, "inspection-photos");
        assert_eq!(c.upload.auth_recheck.0, Duration::from_secs(60));
        // The commented-out http variant is valid too.
        let (_, http) = text.split_once("# --- or:").unwrap();
        let http: String = http
            .lines()
            .skip(1)
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .map(|l| format!("{l}\n"))
            .collect();
        let c = Config::parse(&http, "http").unwrap();
        assert_eq!(c.remote.kind, crate::remote::RemoteKind::Http);
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let e = err("[upload]\nconcurency = 2\n");
        assert!(e.starts_with("config /etc/x.toml: "), "{e}");
        assert!(e.contains("concurency"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn wrong_type_names_the_key() {
        let e = err("[upload]\nconcurrency = \"two\"\n");
        assert!(e.contains("key `upload.concurrency`"), "{e}");
        assert!(e.contains("u32"), "{e}");
    }

    #[test]
    fn bad_value_names_the_key_and_expectation() {
        let e = err("[upload]\nconcurrency = 0\n[remote.file]\npath = \"/x\"\n");
        assert!(e.contains("key `upload.concurrency`"), "{e}");
        assert!(e.contains("1 to 64"), "{e}");
        let e = err("[ingest]\nsettle = \"soon\"\n[remote.file]\npath = \"/x\"\n");
        assert!(e.contains("key `ingest.settle`"), "{e}");
        assert!(e.contains("invalid duration"), "{e}");
    }

    #[test]
    fn missing_remote_table_is_reported() {
        let e = err("");
        assert!(e.contains("key `remote.file`"), "{e}");
    }

    #[test]
    fn syntax_error_has_a_line() {
        let e = err("[upload\n");
        assert!(e.contains("line 1: syntax error: "), "{e}");
        assert!(!e.contains(": :"), "{e}");
    }

    #[test]
    fn a_duplicate_names_the_table_or_the_key() {
        let e = err("[upload]\nconcurrency = 2\n[remote.file]\npath = \"/x\"\n\n[upload]\nx = 1\n");
        assert_eq!(
            e,
            "config /etc/x.toml: line 6: table `upload`: defined twice (merge the two tables)"
        );
        let e = err("[remote.file]\npath = \"/x\"\n[ remote.file ]\n");
        assert!(e.contains("line 3: table `remote.file`"), "{e}");
        let e = err("device_id = \"a\"\ndevice_id = \"b\"\n");
        assert!(e.contains("line 2: key `device_id`: defined twice"), "{e}");
    }

    #[test]
    fn durations_accept_strings_and_numbers() {
        let c = Config::parse(
            "[upload]\nsync_interval = \"250ms\"\ninitial_backoff = 1\n[remote.file]\npath = \"/x\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.upload.sync_interval.0, Duration::from_millis(250));
        assert_eq!(c.upload.initial_backoff.0, Duration::from_secs(1));
    }

    #[test]
    fn http_client_keys_are_read_and_checked_in_either_remote_table() {
        let s3 =
            "[remote]\nkind = \"s3\"\n[remote.s3]\nendpoint = \"http://x\"\nbucket = \"bbb\"\n";
        let c = Config::parse(
            &format!("{s3}connect_timeout = \"2s\"\nca_bundle = \"/ca.pem\"\n"),
            "t",
        )
        .unwrap();
        let client = c.remote.s3.unwrap().client;
        assert_eq!(client.connect_timeout.0, Duration::from_secs(2));
        assert_eq!(client.read_timeout.0, Duration::from_secs(60), "default");
        assert_eq!(client.ca_bundle.as_deref(), Some(Path::new("/ca.pem")));
        let c = Config::parse(
            "[remote]\nkind = \"http\"\nhttp = { endpoint = \"http://x\", read_timeout = \"7s\" }\n",
            "t",
        )
        .unwrap();
        assert_eq!(
            c.remote.http.unwrap().client.read_timeout.0,
            Duration::from_secs(7)
        );

        // Unknown keys are still rejected with file, line and key, and the list of what
        // is expected has both kinds of keys.
        let e = err(&format!("{s3}timeout = \"5s\"\n"));
        assert!(
            e.starts_with("config /etc/x.toml: line 6: key `remote.s3.timeout`: "),
            "{e}"
        );
        assert!(
            e.contains("`part_size`") && e.contains("`read_timeout`"),
            "{e}"
        );
        let e = err(
            "[remote]\nkind = \"http\"\n[remote.http]\nendpoint = \"http://x\"\nreadtimeout = 1\n",
        );
        assert!(e.contains("line 5: key `remote.http.readtimeout`"), "{e}");
        // Wrong types and bad values name the key in the table it was written in.
        let e = err(&format!("{s3}read_timeout = \"soon\"\n"));
        assert!(
            e.contains("line 6: key `remote.s3.read_timeout`: invalid duration"),
            "{e}"
        );
        let e = err("[remote]\nkind = \"http\"\n[remote.http]\nendpoint = \"http://x\"\nconnect_timeout = \"0s\"\n");
        assert!(
            e.contains("key `remote.http.connect_timeout`: expected more than 0s"),
            "{e}"
        );
        let e = err(&format!("{s3}ca_bundle = 5\n"));
        assert!(e.contains("line 6: key `remote.s3.ca_bundle`"), "{e}");
    }
}
