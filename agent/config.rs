//! Configuration: one TOML file, every key optional with a documented default.
//!
//! Unknown keys, wrong types and bad values are rejected at start with one line naming the
//! file, the key and what was expected (`ConfigError`). `config/demo.toml` is compiled in
//! as the embedded default used when no config file exists.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Byte sizes (`"50MB"`, `"8MiB"`, a number of bytes) mean the same in every table.
pub use crate::conditions::settings::{parse_size, Size};

/// The demo configuration, used when no `--config` is given and the default path is absent.
pub const DEMO_TOML: &str = include_str!("../config/demo.toml");

/// Where the daemon looks for its configuration when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/fieldsync/fieldsync.toml";

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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identifies this device in object keys and MQTT topics. Default: the hostname.
    #[serde(default = "default_device_id")]
    pub device_id: String,
    #[serde(default)]
    pub paths: Paths,
    #[serde(default)]
    pub ingest: Ingest,
    #[serde(default)]
    pub upload: Upload,
    #[serde(default)]
    pub remote: Remote,
    #[serde(default)]
    pub log: Log,
    /// When uploads may run: network, metered budget, battery, disk, schedule, rate.
    #[serde(default)]
    pub conditions: crate::conditions::settings::Conditions,
    /// Which local copies of uploaded files may be deleted.
    #[serde(default)]
    pub retention: crate::conditions::settings::Retention,

    /// Fleet reporting over MQTT; absent: no MQTT at all (see `crate::mqtt::MqttConfig`).
    pub mqtt: Option<crate::mqtt::MqttConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Paths {
    /// The folder the inspection app writes photos into.
    pub capture: PathBuf,
    /// Where the queue database lives; must survive reboots.
    pub state_dir: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            capture: "/var/lib/fieldsync/capture".into(),
            state_dir: "/var/lib/fieldsync".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ingest {
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

impl Default for Ingest {
    fn default() -> Self {
        Ingest {
            settle: Dur::secs(2),
            close_settle: Dur(Duration::from_millis(300)),
            rescan_interval: Dur::secs(300),
            layout: "{checklist}/{row}/{file}".into(),
            ignore: vec![".*".into(), "*.tmp".into(), "*.part".into(), "*~".into()],
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
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteKind {
    File,
    S3,
    Http,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Remote {
    /// Which remote uploads go to; its own table below holds its settings.
    pub kind: RemoteKind,
    /// First component of every object key.
    pub prefix: String,
    pub file: Option<FileRemote>,
    pub s3: Option<crate::remote::s3::S3Config>,
    pub http: Option<crate::remote::http::HttpConfig>,
}

impl Default for Remote {
    fn default() -> Self {
        Remote {
            kind: RemoteKind::File,
            prefix: "fieldsync".into(),
            file: None,
            s3: None,
            http: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRemote {
    /// The directory objects are written to (a NAS mount, a USB drive, the demo folder).
    pub path: PathBuf,
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

/// A duration written as `"250ms"`, `"5s"`, `"5m"`, `"1h 30m"`, or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"500ms\", \"30s\", \"5m\" or a number of seconds")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Dur, E> {
                Ok(Dur::secs(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Dur, E> {
                u64::try_from(v)
                    .map(Dur::secs)
                    .map_err(|_| E::custom("expected a duration that is not negative"))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Dur, E> {
                Duration::try_from_secs_f64(v)
                    .map(Dur)
                    .map_err(|_| E::custom("expected a duration that is not negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Dur, E> {
                humantime::parse_duration(v).map(Dur).map_err(|e| {
                    E::custom(format!(
                        "invalid duration \"{v}\" ({e}); expected e.g. \"500ms\", \"30s\", \"5m\""
                    ))
                })
            }
        }
        d.deserialize_any(V)
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
        let de = toml::de::Deserializer::parse(text)
            .map_err(|e| invalid(String::new(), one_line(e.message()), e.span()))?;
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let key = if path.is_empty() || path == "." {
                String::new()
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
    fn validate(&self) -> Result<(), (&'static str, String)> {
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
        if self.upload.permanent_attempts == 0 {
            return Err(("upload.permanent_attempts", "expected at least 1".into()));
        }
        if self.ingest.rescan_interval.0 < Duration::from_secs(1) {
            return Err(("ingest.rescan_interval", "expected at least 1s".into()));
        }
        if let Err(e) = crate::ingest::Layout::parse(&self.ingest.layout) {
            return Err(("ingest.layout", e));
        }
        if self.remote.prefix.starts_with('/') || self.remote.prefix.contains("..") {
            return Err((
                "remote.prefix",
                "expected a relative key prefix without `..`".into(),
            ));
        }
        match self.remote.kind {
            RemoteKind::File if self.remote.file.is_none() => {
                return Err((
                    "remote.file",
                    "expected a [remote.file] table with `path` when remote.kind = \"file\"".into(),
                ))
            }
            RemoteKind::S3 => match &self.remote.s3 {
                None => {
                    return Err((
                        "remote.s3",
                        "expected a [remote.s3] table when remote.kind = \"s3\"".into(),
                    ))
                }
                Some(s3) => s3.validate()?,
            },
            RemoteKind::Http => match &self.remote.http {
                None => {
                    return Err((
                        "remote.http",
                        "expected a [remote.http] table when remote.kind = \"http\"".into(),
                    ))
                }
                Some(h) => h.validate()?,
            },
            _ => {}
        }
        self.conditions.validate()?;

        if let Some(m) = &self.mqtt {
            m.validate()?;
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err((
                "log.level",
                "expected a level such as \"info\" or \"fieldsync=debug\"".into(),
            ));
        }
        Ok(())
    }

    /// The queue database inside the state directory.
    pub fn db_path(&self) -> PathBuf {
        self.paths.state_dir.join("queue.db")
    }
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

    fn err(text: &str) -> String {
        Config::parse(text, "/etc/x.toml").unwrap_err().to_string()
    }

    #[test]
    fn embedded_demo_config_is_valid() {
        let c = Config::demo();
        assert_eq!(c.remote.kind, RemoteKind::File);
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
        assert!(e.contains("line 1"), "{e}");
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
}
