//! MQTT plumbing shared by the daemon's reporter and `fieldsync fleet`: the `[mqtt]`
//! configuration, building a `rumqttc` connection from it (credentials, TLS with rustls on
//! the ring provider), topic names, payload encoding (JSON or CBOR, one schema) and
//! one-line descriptions of connection errors.
//!
//! Secrets (the password, the private key) are read here and handed to `rumqttc` only;
//! they never appear in `Debug` output, logs or error messages.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{ConnectReturnCode, ConnectionError, LastWill, MqttOptions, QoS, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::units::Dur;

/// Largest MQTT packet we accept: commands are tiny, and a bigger packet must not make the
/// agent allocate without bound.
pub const MAX_INCOMING_PACKET: usize = 64 * 1024;
/// Largest packet we send (a status snapshot is a few kB).
pub const MAX_OUTGOING_PACKET: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("mqtt.{key} {path}: {source}")]
    File {
        key: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("mqtt.{key} {path}: {message}")]
    Pem {
        key: &'static str,
        path: String,
        message: String,
    },
    #[error("mqtt TLS: {0}")]
    Tls(String),
    #[error("mqtt.password_file {0}: the file is empty")]
    EmptyPassword(String),
}

/// Payload encoding of `status`, `events` and command results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    #[default]
    Json,
    Cbor,
}

/// A secret string from the config: usable, never printed.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// The `[mqtt]` section. Its presence turns fleet reporting on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Broker host name or IP address.
    pub host: String,
    /// Broker port. Default 1883, or 8883 with `tls = true`.
    pub port: Option<u16>,
    /// MQTT client id. Default: the device id (unique per device, so a second agent with
    /// the same id takes over the session instead of duplicating the device).
    pub client_id: Option<String>,
    /// User name for brokers that require authentication.
    pub username: Option<String>,
    /// The password, inline. Prefer `password_file` so the config can be world-readable.
    pub password: Option<Secret>,
    /// A file whose content (trailing newline removed) is the password.
    pub password_file: Option<PathBuf>,
    /// Connect with TLS (rustls).
    pub tls: bool,
    /// PEM file with the CA certificate(s) that sign the broker's certificate. Default:
    /// the system's trust store.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain, for brokers that require client certificates.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// MQTT keep-alive: how soon the broker declares the device `lost` after its network
    /// vanished (about 1.5 times this).
    pub keep_alive: Dur,
    /// Topic prefix. Default `fieldsync/<device_id>`.
    pub topic_prefix: Option<String>,
    /// `json` (default) or `cbor`: same schema, CBOR is smaller on metered links.
    pub format: PayloadFormat,
    /// The status snapshot is republished at least this often, even without change.
    pub heartbeat: Dur,
    /// At most this many events from the event log are sent after a reconnect (the most
    /// recent ones); older ones stay in `fieldsync events`.
    pub max_backlog_events: u32,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: "localhost".into(),
            port: None,
            client_id: None,
            username: None,
            password: None,
            password_file: None,
            tls: false,
            ca_file: None,
            client_cert: None,
            client_key: None,
            keep_alive: Dur::secs(30),
            topic_prefix: None,
            format: PayloadFormat::Json,
            heartbeat: Dur::secs(60),
            max_backlog_events: 500,
        }
    }
}

impl MqttConfig {
    /// Checks what the types cannot; returns the key and what is expected.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.host.trim().is_empty() {
            return Err(("mqtt.host", "expected a host name or IP address".into()));
        }
        if self.port == Some(0) {
            return Err(("mqtt.port", "expected a port from 1 to 65535".into()));
        }
        if self.password.is_some() && self.password_file.is_some() {
            return Err((
                "mqtt.password",
                "expected either `password` or `password_file`, not both".into(),
            ));
        }
        if (self.password.is_some() || self.password_file.is_some()) && self.username.is_none() {
            return Err((
                "mqtt.username",
                "expected a user name when a password is set".into(),
            ));
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err((
                "mqtt.client_cert",
                "expected `client_cert` and `client_key` together".into(),
            ));
        }
        if !self.tls && (self.ca_file.is_some() || self.client_cert.is_some()) {
            return Err((
                "mqtt.tls",
                "expected `tls = true` when `ca_file` or `client_cert` is set".into(),
            ));
        }
        let ka = self.keep_alive.0;
        if ka < Duration::from_secs(1) || ka > Duration::from_secs(65535) {
            return Err(("mqtt.keep_alive", "expected from 1s to 18h".into()));
        }
        if self.heartbeat.0 < Duration::from_secs(1) {
            return Err(("mqtt.heartbeat", "expected at least 1s".into()));
        }
        if let Some(p) = &self.topic_prefix {
            if p.is_empty() || p.contains(['+', '#']) || p.starts_with('/') || p.ends_with('/') {
                return Err((
                    "mqtt.topic_prefix",
                    "expected a topic without wildcards or leading/trailing `/`".into(),
                ));
            }
        }
        if let Some(id) = &self.client_id {
            if id.is_empty() || id.len() > 128 {
                return Err(("mqtt.client_id", "expected 1 to 128 characters".into()));
            }
        }
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port.unwrap_or(if self.tls { 8883 } else { 1883 })
    }

    pub fn prefix(&self, device_id: &str) -> String {
        self.topic_prefix
            .clone()
            .unwrap_or_else(|| format!("fieldsync/{device_id}"))
    }

    /// `host:port` for log lines (no credentials in it).
    pub fn endpoint(&self) -> String {
        format!(
            "{}{}:{}",
            if self.tls { "mqtts://" } else { "mqtt://" },
            self.host,
            self.port()
        )
    }
}

/// The topics of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub prefix: String,
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Self {
        Topics {
            prefix: prefix.into(),
        }
    }
    pub fn state(&self) -> String {
        format!("{}/state", self.prefix)
    }
    pub fn status(&self) -> String {
        format!("{}/status", self.prefix)
    }
    pub fn events(&self) -> String {
        format!("{}/events", self.prefix)
    }
    /// The filter the reporter subscribes to.
    /// Retained, from the back office: the files this device must hold.
    pub fn assignments(&self) -> String {
        format!("{}/assignments", self.prefix)
    }
    pub fn commands(&self) -> String {
        format!("{}/cmd/+", self.prefix)
    }
    pub fn result(&self, command: &str) -> String {
        format!("{}/cmd/{command}/result", self.prefix)
    }
    /// The command name of a topic under `cmd/`, if it is one.
    pub fn command_name<'a>(&self, topic: &'a str) -> Option<&'a str> {
        topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("/cmd/")
            .filter(|n| !n.is_empty() && !n.contains('/'))
    }
}

/// Values of `<prefix>/state` (plain UTF-8 text in both payload formats, so the last will
/// needs no encoding and `mosquitto_sub` shows it as is).
pub const STATE_ONLINE: &str = "online";
pub const STATE_OFFLINE: &str = "offline";
pub const STATE_LOST: &str = "lost";

/// Encodes a payload in the configured format.
pub fn encode<T: Serialize>(format: PayloadFormat, v: &T) -> Vec<u8> {
    match format {
        PayloadFormat::Json => serde_json::to_vec(v).expect("serialisable"),
        PayloadFormat::Cbor => {
            let mut out = Vec::with_capacity(512);
            ciborium::into_writer(v, &mut out).expect("serialisable");
            out
        }
    }
}

/// Decodes a payload that may be JSON or CBOR (a JSON object starts with `{`; a CBOR map
/// never starts with that byte, 0x7B being a CBOR text string header).
pub fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    let trimmed = payload.trim_ascii_start();
    if trimmed.first() == Some(&b'{') {
        serde_json::from_slice(trimmed).map_err(|e| format!("invalid JSON: {e}"))
    } else {
        ciborium::from_reader(payload).map_err(|e| match e {
            ciborium::de::Error::Semantic(_, msg) => {
                format!("expected a JSON object or CBOR map: {msg}")
            }
            ciborium::de::Error::Syntax(at) => {
                format!("expected a JSON object or CBOR map: invalid CBOR at byte {at}")
            }
            ciborium::de::Error::Io(_) => {
                "expected a JSON object or CBOR map: truncated CBOR".to_string()
            }
            ciborium::de::Error::RecursionLimitExceeded => {
                "expected a JSON object or CBOR map: nested too deeply".to_string()
            }
        })
    }
}

/// Builds the connection options: endpoint, client id, credentials, TLS, keep-alive,
/// packet limits and (for the daemon) the last will.
pub fn options(
    cfg: &MqttConfig,
    client_id: &str,
    will: Option<LastWill>,
) -> Result<MqttOptions, MqttError> {
    let mut o = MqttOptions::new(client_id, cfg.host.trim(), cfg.port());
    o.set_keep_alive(cfg.keep_alive.0)
        .set_clean_session(true)
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET)
        // Few in flight: the broker is on a slow link and what is not in flight waits in
        // our bounded channel or in the store.
        .set_inflight(32);
    if let Some(w) = will {
        o.set_last_will(w);
    }
    if let Some(user) = &cfg.username {
        o.set_credentials(user, password(cfg)?.unwrap_or_default());
    }
    if cfg.tls {
        o.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(tls_config(cfg)?)),
        ));
    }
    Ok(o)
}

/// The daemon's last will: `lost`, retained, published by the broker when the agent
/// vanishes without a clean disconnect.
pub fn last_will(topics: &Topics) -> LastWill {
    LastWill::new(topics.state(), STATE_LOST, QoS::AtLeastOnce, true)
}

/// The user name and password the broker gets (the password file read now), if any.
pub fn login(cfg: &MqttConfig) -> Result<Option<(String, String)>, MqttError> {
    match &cfg.username {
        Some(user) => Ok(Some((user.clone(), password(cfg)?.unwrap_or_default()))),
        None => Ok(None),
    }
}

fn password(cfg: &MqttConfig) -> Result<Option<String>, MqttError> {
    if let Some(p) = &cfg.password {
        return Ok(Some(p.expose().to_string()));
    }
    let Some(path) = &cfg.password_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|source| MqttError::File {
        key: "password_file",
        path: path.display().to_string(),
        source,
    })?;
    let pw = text.trim_end_matches(['\r', '\n']).to_string();
    if pw.is_empty() {
        return Err(MqttError::EmptyPassword(path.display().to_string()));
    }
    Ok(Some(pw))
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, MqttError> {
    std::fs::read(path).map_err(|source| MqttError::File {
        key,
        path: path.display().to_string(),
        source,
    })
}

fn pem_err(key: &'static str, path: &Path, message: impl Into<String>) -> MqttError {
    MqttError::Pem {
        key,
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, MqttError> {
    let bytes = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(key, path, format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(pem_err(key, path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// A rustls client configuration trusting what the HTTP remotes trust (`crate::tls`: the
/// system's store, or `ca_file` instead).
pub fn tls_config(cfg: &MqttConfig) -> Result<rustls::ClientConfig, MqttError> {
    let found = crate::tls::roots(cfg.ca_file.as_deref()).map_err(|e| match e {
        crate::tls::RootsError::Read { path, source } => MqttError::File {
            key: "ca_file",
            path,
            source,
        },
        crate::tls::RootsError::Pem { path, message } => MqttError::Pem {
            key: "ca_file",
            path,
            message,
        },
        crate::tls::RootsError::NoSystemRoots => MqttError::Tls(format!("{e}; set mqtt.ca_file")),
    })?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(found);
    let builder = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    match (&cfg.client_cert, &cfg.client_key) {
        (Some(cert), Some(key)) => {
            let chain = certs("client_cert", cert)?;
            let bytes = read("client_key", key)?;
            let pk = PrivateKeyDer::from_pem_slice(&bytes)
                .map_err(|_| pem_err("client_key", key, "no PEM private key in the file"))?;
            builder
                .with_client_auth_cert(chain, pk)
                .map_err(|e| MqttError::Tls(format!("client certificate: {e}")))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// One line saying why a connection attempt failed, for logs and `fleet`.
pub fn describe(e: &ConnectionError) -> String {
    // A TLS failure can surface at any layer (handshake, or the first read when the broker
    // rejects our certificate afterwards): say so plainly wherever it is in the chain.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        let tls = c.downcast_ref::<rustls::Error>().or_else(|| {
            c.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(t) = tls {
            return format!("TLS: {t}");
        }
        cause = c.source();
    }
    match e {
        ConnectionError::ConnectionRefused(code) => {
            let why = match code {
                ConnectReturnCode::BadUserNamePassword => "bad user name or password",
                ConnectReturnCode::NotAuthorized => "not authorized",
                ConnectReturnCode::BadClientId => "client id rejected",
                ConnectReturnCode::ServiceUnavailable => "service unavailable",
                ConnectReturnCode::RefusedProtocolVersion => "protocol version refused",
                ConnectReturnCode::Success => "success",
            };
            format!("broker refused the connection: {why}")
        }
        ConnectionError::Io(io) => describe_io(io),
        ConnectionError::MqttState(rumqttc::StateError::Io(io)) => describe_io(io),
        ConnectionError::Tls(t) => match t {
            rumqttc::TlsError::Io(io) => describe_io(io),
            other => format!("TLS: {other}"),
        },
        ConnectionError::NetworkTimeout => "timed out connecting".into(),
        ConnectionError::FlushTimeout => "timed out sending".into(),
        other => other.to_string(),
    }
}

fn describe_io(io: &std::io::Error) -> String {
    match io.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        std::io::ErrorKind::ConnectionReset => "connection reset by the broker".into(),
        std::io::ErrorKind::UnexpectedEof => "connection closed by the broker".into(),
        _ => io.to_string(),
    }
}

/// Retry delay after `failures` failed connection attempts in a row: 1 s doubling up to
/// 30 s, then jittered to 50–100 % so a fleet that lost its broker does not reconnect in
/// lockstep. `jitter` is uniform in [0, 1).
pub fn reconnect_delay(failures: u32, jitter: f64) -> Duration {
    let base = Duration::from_secs(1u64 << failures.saturating_sub(1).min(5)).min(MAX_RECONNECT);
    base / 2 + base.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
}

/// Cap of [`reconnect_delay`]: a device back on the network shows up within half a minute.
pub const MAX_RECONNECT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(toml_text: &str) -> Result<MqttConfig, String> {
        let c: MqttConfig = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        c.validate().map_err(|(k, m)| format!("{k}: {m}"))?;
        Ok(c)
    }

    #[test]
    fn defaults_and_port() {
        let c = cfg("").unwrap();
        assert_eq!(c.port(), 1883);
        assert_eq!(c.prefix("dev1"), "fieldsync/dev1");
        assert_eq!(c.heartbeat.0, Duration::from_secs(60));
        assert_eq!(c.format, PayloadFormat::Json);
        let c = cfg("tls = true").unwrap();
        assert_eq!(c.port(), 8883);
    }

    #[test]
    fn bad_combinations_name_the_key() {
        let e = cfg("username = \"u\"\npassword = \"p\"\npassword_file = \"/x\"").unwrap_err();
        assert!(e.starts_with("mqtt.password:"), "{e}");
        assert!(cfg("password = \"p\"")
            .unwrap_err()
            .starts_with("mqtt.username"));
        assert!(cfg("tls = true\nclient_cert = \"/c\"")
            .unwrap_err()
            .starts_with("mqtt.client_cert"));
        assert!(cfg("ca_file = \"/c\"").unwrap_err().starts_with("mqtt.tls"));
        assert!(cfg("topic_prefix = \"a/+/b\"")
            .unwrap_err()
            .starts_with("mqtt.topic_prefix"));
        assert!(cfg("heartbeat = \"10ms\"")
            .unwrap_err()
            .starts_with("mqtt.heartbeat"));
        assert!(cfg("colour = 1").unwrap_err().contains("unknown field"));
    }

    #[test]
    fn password_never_in_debug_output() {
        let c = cfg("username = \"u\"\npassword = \"hunter2-secret\"").unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2-secret"), "{dbg}");
        assert!(dbg.contains("<redacted>"));
    }

    #[test]
    fn password_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\n").unwrap();
        let c = cfg(&format!(
            "username = \"u\"\npassword_file = \"{}\"",
            p.display()
        ))
        .unwrap();
        assert_eq!(password(&c).unwrap().as_deref(), Some("s3cret"));
        std::fs::write(&p, "\n").unwrap();
        let e = password(&c).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn topics_and_command_names() {
        let t = Topics::new("fieldsync/dev1");
        assert_eq!(t.state(), "fieldsync/dev1/state");
        assert_eq!(t.result("retry"), "fieldsync/dev1/cmd/retry/result");
        assert_eq!(t.command_name("fieldsync/dev1/cmd/pause"), Some("pause"));
        assert_eq!(t.command_name("fieldsync/dev1/cmd/pause/result"), None);
        assert_eq!(t.command_name("fieldsync/dev2/cmd/pause"), None);
        assert_eq!(t.command_name("fieldsync/dev1/cmd/"), None);
    }

    #[test]
    fn json_and_cbor_round_trip_to_the_same_value() {
        let v = serde_json::json!({"a": 1, "b": [true, null, "x"], "c": {"d": 1.5}});
        for f in [PayloadFormat::Json, PayloadFormat::Cbor] {
            let back: serde_json::Value = decode(&encode(f, &v)).unwrap();
            assert_eq!(back, v, "{f:?}");
        }
        assert!(decode::<serde_json::Value>(b"{nope").is_err());
        assert!(decode::<serde_json::Value>(&[0xff, 0x00]).is_err());
    }

    #[test]
    fn reconnect_delay_grows_caps_and_is_never_zero() {
        assert_eq!(reconnect_delay(1, 0.0), Duration::from_millis(500));
        assert_eq!(reconnect_delay(2, 0.0), Duration::from_secs(1));
        assert_eq!(reconnect_delay(100, 0.0), MAX_RECONNECT / 2);
        assert!(reconnect_delay(100, 0.999) <= MAX_RECONNECT);
    }

    #[test]
    fn missing_ca_file_is_one_clear_line() {
        let c = cfg("tls = true\nca_file = \"/nonexistent/ca.pem\"").unwrap();
        let e = options(&c, "x", None).unwrap_err().to_string();
        assert!(e.starts_with("mqtt.ca_file /nonexistent/ca.pem: "), "{e}");
        assert!(!e.contains('\n'));
    }
}
