//! `fieldsync fleet`: the smallest useful fleet dashboard. Subscribes to every device's
//! retained `state` and `status` under a prefix filter and prints one line per device
//! (or JSON for scripts). One-shot by default: the broker hands over retained messages
//! right after subscribing, so a short collection window sees the whole fleet.
//!
//! Connection settings (credentials, TLS) come from the `[mqtt]` section of the config
//! when there is one; `--broker` overrides its host and port.
//!
//! Runs on an operator's machine, not on a device: built with the `fleet` cargo feature
//! (on by default, off in the device build). `--serve` turns the same subscription into a
//! live web page (`serve.rs`, the `dashboard` feature).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant, SystemTime};

use rumqttc::{Client, Event, Packet, QoS, RecvTimeoutError};
use serde::Serialize;
use serde_json::Value;

use crate::config::Config;
use crate::mqtt;
use crate::status::{human_age, human_bytes};

use super::error::{exit, CliError};

#[cfg(feature = "dashboard")]
mod board;
#[cfg(feature = "dashboard")]
mod http;
#[cfg(feature = "dashboard")]
mod serve;

/// How long to wait for the broker to accept the connection and subscriptions.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Redraws in `--watch` mode at most this often, however busy the fleet.
const REDRAW_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, clap::Args)]
pub struct FleetArgs {
    /// Broker as HOST:PORT [default: host and port of the config's [mqtt] section]
    #[arg(long)]
    pub broker: Option<String>,
    /// Topic prefix of the devices; `+` matches any one device
    #[arg(long, default_value = "fieldsync/+")]
    pub prefix: String,
    /// Print JSON (an array, one object per device) for scripts
    #[arg(long)]
    pub json: bool,
    /// Keep running and redraw whenever a device reports
    #[arg(long)]
    pub watch: bool,
    /// One-shot mode: how long to collect retained messages before printing
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// Serve a live web page of the fleet on HOST:PORT (e.g. 127.0.0.1:8080) instead of printing
    #[cfg(feature = "dashboard")]
    #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["json", "watch"])]
    pub serve: Option<String>,
    /// With --serve: let the page send sync, pause, resume and retry (needs --token-file)
    #[cfg(feature = "dashboard")]
    #[arg(long, requires = "serve")]
    pub allow_commands: bool,
    /// With --allow-commands: a file holding the token the page must send with a command
    #[cfg(feature = "dashboard")]
    #[arg(long, value_name = "FILE", requires = "serve")]
    pub token_file: Option<std::path::PathBuf>,
    /// With --serve: mark a device whose oldest pending photo has waited longer than this
    #[cfg(feature = "dashboard")]
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration, requires = "serve")]
    pub attention_after: Duration,
    /// With --serve: a host name the page may be reached under besides IP addresses and
    /// localhost (repeatable)
    #[cfg(feature = "dashboard")]
    #[arg(long, value_name = "NAME", requires = "serve")]
    pub allow_host: Vec<String>,
}

/// One device as `fleet --json` prints it.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct Device {
    /// The device's topic prefix (`fieldsync/<device-id>` by default).
    pub prefix: String,
    pub device_id: String,
    /// `online`, `offline`, `lost`, or null when the device never published a state.
    pub state: Option<String>,
    pub pending_count: Option<i64>,
    pub pending_bytes: Option<i64>,
    pub oldest_pending_age_s: Option<i64>,
    /// Time of the last successful upload (RFC 3339).
    pub last_upload: Option<String>,
    pub pause_reason: Option<String>,
    /// When the status snapshot was taken (RFC 3339).
    pub status_time: Option<String>,
    /// The full retained status snapshot, as `fieldsync status --json` prints it.
    pub status: Option<Value>,
}

/// What the fleet view knows, by device prefix (pure; unit-tested).
#[derive(Debug, Default)]
pub struct Fleet {
    devices: BTreeMap<String, Device>,
}

impl Fleet {
    /// Takes one message; returns whether it changed the view.
    pub fn update(&mut self, topic: &str, payload: &[u8]) -> bool {
        let (prefix, kind) = match topic.rsplit_once('/') {
            Some((p, k @ ("state" | "status"))) => (p, k),
            _ => return false,
        };
        if payload.is_empty() {
            // A cleared retained message: the device was removed from the fleet.
            return self.devices.remove(prefix).is_some();
        }
        let d = self
            .devices
            .entry(prefix.to_string())
            .or_insert_with(|| Device {
                prefix: prefix.to_string(),
                device_id: prefix.rsplit('/').next().unwrap_or(prefix).to_string(),
                ..Device::default()
            });
        if kind == "state" {
            d.state = Some(String::from_utf8_lossy(payload).trim().to_string());
            return true;
        }
        let Ok(s) = mqtt::decode::<Value>(payload) else {
            return false;
        };
        if let Some(id) = s["device_id"].as_str() {
            d.device_id = id.to_string();
        }
        d.pending_count = s["pending"]["count"].as_i64();
        d.pending_bytes = s["pending"]["bytes"].as_i64();
        d.oldest_pending_age_s = s["pending"]["oldest_age_s"].as_i64();
        d.last_upload = s["last_success"]["time"].as_str().map(str::to_string);
        d.pause_reason = s["pause_reason"].as_str().map(str::to_string);
        d.status_time = s["time"].as_str().map(str::to_string);
        d.status = Some(s);
        true
    }

    pub fn devices(&self) -> Vec<Device> {
        self.devices.values().cloned().collect()
    }

    /// The table: a header and one line per device.
    pub fn render(&self, now: SystemTime) -> String {
        let mut out = format!(
            "{:<20} {:<8} {:>7} {:>10} {:>10} {:>14}  {}\n",
            "DEVICE", "STATE", "PENDING", "BYTES", "OLDEST", "LAST UPLOAD", "PAUSED"
        );
        for d in self.devices.values() {
            let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            out.push_str(&format!(
                "{:<20} {:<8} {:>7} {:>10} {:>10} {:>14}  {}\n",
                d.device_id,
                opt(d.state.clone()),
                opt(d.pending_count.map(|c| c.to_string())),
                opt(d.pending_bytes.map(human_bytes)),
                opt(d.oldest_pending_age_s.map(short_age)),
                opt(d.last_upload.as_deref().and_then(|t| ago(t, now))),
                d.pause_reason.as_deref().unwrap_or("-"),
            ));
        }
        if self.devices.is_empty() {
            out.push_str("(no device has reported under this prefix)\n");
        }
        out
    }
}

/// `90` → `1m 30s`, trimmed to the two largest units so the column stays narrow.
fn short_age(s: i64) -> String {
    human_age(s)
        .split(' ')
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

fn ago(rfc3339: &str, now: SystemTime) -> Option<String> {
    let t = humantime::parse_rfc3339_weak(rfc3339.trim_end_matches('Z')).ok()?;
    let s = now.duration_since(t).unwrap_or_default().as_secs() as i64;
    Some(format!("{} ago", short_age(s)))
}

/// Splits `HOST:PORT` (`[v6]:PORT` too).
fn parse_broker(s: &str) -> Result<(String, u16), CliError> {
    let bad = || {
        CliError::new(
            exit::USAGE,
            format!("--broker {s}: expected HOST:PORT, e.g. broker.example.com:1883"),
        )
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// Runs `fieldsync fleet`; `src` names the configuration in its errors.
pub fn run(cfg: &Config, src: &str, args: FleetArgs) -> Result<i32, CliError> {
    let mut m = cfg.mqtt.clone().unwrap_or_default();
    if let Some(b) = &args.broker {
        let (host, port) = parse_broker(b)?;
        m.host = host;
        m.port = Some(port);
    }
    let prefix = args.prefix.trim_end_matches('/');
    if prefix.is_empty() || prefix.contains('#') {
        return Err(CliError::new(
            exit::USAGE,
            "--prefix: expected a topic prefix such as fieldsync/+ (`#` is not allowed)",
        ));
    }
    let client_id = format!(
        "fieldsync-fleet-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    );
    let opts = mqtt::options(&m, &client_id, None)
        .map_err(|e| crate::config::ConfigError::keyed(src, &e.to_string()))?;
    #[cfg(feature = "dashboard")]
    if let Some(addr) = args.serve {
        let serve = serve::ServeArgs {
            addr,
            allow_commands: args.allow_commands,
            token_file: args.token_file,
            attention_after: args.attention_after,
            allow_host: args.allow_host,
        };
        return serve::run(opts, m.endpoint(), prefix, serve);
    }
    let (client, mut conn) = Client::new(opts, 16);
    for t in ["state", "status"] {
        client
            .subscribe(format!("{prefix}/{t}"), QoS::AtLeastOnce)
            .map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
    }

    let endpoint = m.endpoint();
    let mut fleet = Fleet::default();
    let mut subscribed = false;
    let started = Instant::now();
    let mut collect_until: Option<Instant> = None;
    let mut dirty = true;
    let mut last_draw: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if !subscribed && now.duration_since(started) > CONNECT_TIMEOUT {
            return Err(CliError::new(
                exit::FAILURE,
                format!("fleet: no answer from {endpoint} within {CONNECT_TIMEOUT:?}"),
            ));
        }
        if let Some(until) = collect_until {
            if !args.watch && now >= until {
                print(&fleet, args.json, false);
                let _ = client.disconnect();
                return Ok(exit::OK);
            }
        }
        // The first view waits for the retained messages too, so it is not empty.
        if args.watch
            && collect_until.is_some_and(|u| now >= u)
            && dirty
            && last_draw.is_none_or(|t| t.elapsed() >= REDRAW_EVERY)
        {
            print(&fleet, args.json, true);
            last_draw = Some(Instant::now());
            dirty = false;
        }
        match conn.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                if !subscribed {
                    subscribed = true;
                    collect_until = Some(Instant::now() + args.wait);
                }
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                dirty |= fleet.update(&p.topic, &p.payload);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                let why = mqtt::describe(&e);
                if !args.watch || !subscribed {
                    return Err(CliError::new(
                        exit::FAILURE,
                        format!("fleet: cannot connect to {endpoint}: {why}"),
                    ));
                }
                // Watching: keep the last view and reconnect (subscriptions are renewed
                // because the requests are queued again below).
                eprintln!("fleet: connection to {endpoint} lost ({why}); reconnecting");
                std::thread::sleep(Duration::from_secs(2));
                for t in ["state", "status"] {
                    let _ = client.try_subscribe(format!("{prefix}/{t}"), QoS::AtLeastOnce);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Ok(exit::OK),
        }
    }
}

fn print(fleet: &Fleet, json: bool, watch: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        let devices = fleet.devices();
        let text = if watch {
            serde_json::to_string(&devices)
        } else {
            serde_json::to_string_pretty(&devices)
        };
        let _ = writeln!(out, "{}", text.expect("serialisable"));
    } else {
        if watch && std::io::stdout().is_terminal() {
            let _ = write!(out, "\x1b[2J\x1b[H");
        }
        let _ = write!(out, "{}", fleet.render(SystemTime::now()));
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(device: &str, pending: i64) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "device_id": device,
            "time": "2026-01-01T00:00:10.000Z",
            "pending": {"count": pending, "bytes": pending * 1000, "oldest_age_s": 90},
            "pause_reason": null,
            "last_success": {"time": "2026-01-01T00:00:00.000Z"}
        }))
        .unwrap()
    }

    #[test]
    fn one_line_per_device_from_state_and_status() {
        let mut f = Fleet::default();
        assert!(f.update("fieldsync/a/state", b"online"));
        assert!(f.update("fieldsync/a/status", &status("a", 3)));
        assert!(f.update("fieldsync/b/state", b"lost"));
        let cbor = mqtt::encode(
            mqtt::PayloadFormat::Cbor,
            &serde_json::from_slice::<Value>(&status("b", 0)).unwrap(),
        );
        assert!(f.update("fieldsync/b/status", &cbor));
        assert!(!f.update("fieldsync/b/events", b"{}"));
        let d = f.devices();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].state.as_deref(), Some("online"));
        assert_eq!(d[0].pending_count, Some(3));
        assert_eq!(d[1].pending_bytes, Some(0));
        let now = humantime::parse_rfc3339("2026-01-01T00:05:00Z").unwrap();
        let table = f.render(now);
        assert_eq!(table.lines().count(), 3, "{table}");
        assert!(table.contains("5m ago"), "{table}");
        assert!(table.contains("1m 30s"), "{table}");
        // Clearing the retained messages removes the device.
        assert!(f.update("fieldsync/b/state", b""));
        assert_eq!(f.devices().len(), 1);
    }

    #[test]
    fn broker_argument() {
        assert_eq!(parse_broker("h:1883").unwrap(), ("h".into(), 1883));
        assert_eq!(parse_broker("[::1]:8883").unwrap(), ("::1".into(), 8883));
        assert!(parse_broker("h").is_err());
        assert!(parse_broker("h:0").is_err());
        assert!(parse_broker(":1").is_err());
    }
}
