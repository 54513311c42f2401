//! The queue snapshot: what `fieldsync status --json` prints and MQTT publishes.
//!
//! One schema, one code path: [`snapshot`] reads the store (and the daemon's control
//! keys) and both the CLI and the reporter serialise the same struct. The schema is
//! versioned by `schema` and documented in the README.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::checklists::Progress;
use crate::conditions::report::ConditionsReport;
use crate::conditions::settings::MeteredPolicy;
use crate::device::{self, DeviceHealth};
use crate::store::{CountBytes, Event, EventForm, EventKind, Store, StoreError};
use crate::util::{now_ms, rfc3339};

/// Bumped when a field changes meaning or disappears (adding fields does not bump it).
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Snapshot {
    pub schema: u32,
    pub agent_version: String,
    pub device_id: String,
    /// When the snapshot was taken (RFC 3339, UTC).
    pub time: String,
    pub daemon_running: bool,
    pub remote: String,
    /// Count and bytes for every state, including empty ones.
    pub counts: BTreeMap<String, CountBytes>,
    pub pending: Pending,
    /// Attachments being uploaded right now.
    pub uploading: Vec<Uploading>,
    /// Assigned files being downloaded right now.
    pub downloading: Vec<Downloading>,
    /// True when uploads are not running; `pause_reason` says why.
    pub paused: bool,
    pub pause_reason: Option<String>,
    /// The facts behind the decision (one field per condition); `{}` until a daemon has
    /// written its first report.
    #[serde(serialize_with = "empty_if_none::serialize")]
    pub conditions: Option<ConditionsReport>,
    /// The newest `uploaded` event, in its summary form.
    #[serde(serialize_with = "summary")]
    pub last_success: Option<Event>,
    /// The newest failure (`failed`, `retry_scheduled`), in its summary form.
    #[serde(serialize_with = "summary")]
    pub last_error: Option<Event>,
    /// Device health (uptime, load, memory, the daemon's RSS and CPU time). The daemon
    /// samples it at the MQTT heartbeat, the CLI when it runs.
    pub device: DeviceHealth,
    /// The last time the queue database was found missing or corrupt and rebuilt; null
    /// when it never was.
    pub database_rebuilt: Option<RebuiltNote>,
    /// Every checklist with a checklist.json, by name: photos named, synced, pending,
    /// failed, when it was published, or what publication waits for.
    pub checklists: Vec<Progress>,
}

/// `database_rebuilt` of the snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RebuiltNote {
    /// RFC 3339, UTC.
    pub time: String,
    /// `missing` or `corrupt: …` (what SQLite or `PRAGMA quick_check` said).
    pub reason: String,
    /// Where the damaged file was kept; null when it was missing.
    pub kept_as: Option<String>,
}

/// Status quotes an event in its summary form (the README's `{time, kind, …}`).
fn summary<S: serde::Serializer>(e: &Option<Event>, s: S) -> Result<S::Ok, S::Error> {
    e.as_ref().map(|e| e.form(EventForm::Summary)).serialize(s)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Pending {
    pub count: i64,
    pub bytes: i64,
    /// Age in seconds of the oldest attachment waiting to upload.
    pub oldest_age_s: Option<i64>,
}

/// One entry of `downloading[]`: mirrors `uploading[]` for downloads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Downloading {
    pub id: String,
    pub filename: String,
    pub size: i64,
    pub bytes_received: i64,
    pub percent: f64,
}

fn downloading(store: &Store) -> Result<Vec<Downloading>, StoreError> {
    Ok(store
        .downloading()?
        .into_iter()
        .map(|a| Downloading {
            percent: if a.size > 0 {
                (a.bytes_sent as f64 * 1000.0 / a.size as f64).round() / 10.0
            } else {
                0.0
            },
            id: a.id,
            filename: a.filename,
            size: a.size,
            bytes_received: a.bytes_sent,
        })
        .collect())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Uploading {
    pub id: String,
    pub filename: String,
    pub checklist: String,
    pub row: String,
    pub size: i64,
    pub bytes_sent: i64,
    pub percent: f64,
}

/// Builds the snapshot for the CLI. `daemon_running` comes from the daemon's lock; the
/// device health is sampled now, with the running daemon's own RSS and CPU time (its pid is
/// in the store).
pub fn snapshot(
    store: &Store,
    device_id: &str,
    remote: &str,
    daemon_running: bool,
) -> Result<Snapshot, StoreError> {
    let pid = if daemon_running {
        store.daemon_started()?.map(|(pid, _)| pid)
    } else {
        None
    };
    snapshot_with(
        store,
        device_id,
        remote,
        daemon_running,
        device::sample(pid),
    )
}

/// Builds the snapshot with a device sample taken by the caller (the daemon samples at its
/// heartbeat, not on every status change).
pub fn snapshot_with(
    store: &Store,
    device_id: &str,
    remote: &str,
    daemon_running: bool,
    device: DeviceHealth,
) -> Result<Snapshot, StoreError> {
    let now = now_ms();
    let counts: BTreeMap<String, CountBytes> = store
        .counts()?
        .into_iter()
        .map(|(s, c)| (s.as_str().to_string(), c))
        .collect();
    let q = counts.get("queued_upload").copied().unwrap_or_default();
    let oldest = store.oldest_pending()?;
    let uploading = if daemon_running {
        store
            .uploading()?
            .into_iter()
            .map(|a| Uploading {
                percent: if a.size > 0 {
                    (a.bytes_sent as f64 * 1000.0 / a.size as f64).round() / 10.0
                } else {
                    0.0
                },
                id: a.id,
                filename: crate::localfs::readable(&a.filename),
                checklist: a.checklist,
                row: a.row,
                size: a.size,
                bytes_sent: a.bytes_sent,
            })
            .collect()
    } else {
        Vec::new()
    };
    let downloading = if daemon_running {
        downloading(store)?
    } else {
        Vec::new()
    };
    let pause_reason = if daemon_running {
        store.pause_reason()?
    } else if store.operator_paused()? {
        Some("paused_by_operator".into())
    } else {
        Some("not_running".into())
    };
    let conditions = store.conditions_report()?;
    Ok(Snapshot {
        schema: SCHEMA_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        device_id: device_id.to_string(),
        time: rfc3339(now),
        daemon_running,
        remote: remote.to_string(),
        pending: Pending {
            count: q.count,
            bytes: q.bytes,
            oldest_age_s: oldest.map(|t| ((now - t) / 1000).max(0)),
        },
        counts,
        uploading,
        downloading,
        paused: pause_reason.is_some(),
        pause_reason,
        conditions,
        last_success: store.last_event(&EventKind::SUCCESS)?,
        last_error: store.last_event(&EventKind::ERROR)?,
        device,
        database_rebuilt: store.database_rebuilt()?.map(|r| RebuiltNote {
            time: rfc3339(r.at),
            reason: r.reason,
            kept_as: r.kept_as,
        }),
        checklists: checklists(store)?,
    })
}

/// The checklist progress the publisher stored, by name (a record that does not parse,
/// written by another version, is left out).
pub fn checklists(store: &Store) -> Result<Vec<Progress>, StoreError> {
    Ok(store
        .checklist_records()?
        .into_iter()
        .filter_map(|r| serde_json::from_str(&r.progress).ok())
        .collect())
}

/// The `checklists:` lines of `fieldsync status`.
pub fn render_checklists(list: &[Progress]) -> String {
    if list.is_empty() {
        return String::new();
    }
    let mut out = String::from("checklists:\n");
    for c in list {
        out.push_str(&format!(
            "  {:<16}{}/{} synced, {} pending, {} failed; ",
            c.checklist, c.synced, c.named, c.pending, c.failed
        ));
        match &c.published_at {
            Some(t) => out.push_str(&format!("published {t}\n")),
            None => out.push_str(&format!("waiting for {}\n", c.waiting_line())),
        }
    }
    out
}

/// Human-readable bytes (`1.5 MB`, decimal units as file managers show them).
pub fn human_bytes(b: i64) -> String {
    let b = b as f64;
    if b < 1e3 {
        format!("{b} B")
    } else if b < 1e6 {
        format!("{:.1} kB", b / 1e3)
    } else if b < 1e9 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.2} GB", b / 1e9)
    }
}

pub fn human_age(s: i64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(s.max(0) as u64)).to_string()
}

/// The text `fieldsync status` prints.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let daemon = if s.daemon_running {
        "running"
    } else {
        "not running"
    };
    out.push_str(&format!(
        "fieldsync {} on {}: daemon {}, remote {}\n",
        s.agent_version, s.device_id, daemon, s.remote
    ));
    match &s.pause_reason {
        None => out.push_str("uploads: active\n"),
        Some(r) => out.push_str(&format!("uploads: paused ({r})\n")),
    }
    for (state, c) in &s.counts {
        if c.count == 0 && state != "queued_upload" && state != "synced" {
            continue;
        }
        out.push_str(&format!(
            "  {:<16}{:>7}  {:>10}",
            state,
            c.count,
            human_bytes(c.bytes)
        ));
        if state == "queued_upload" {
            if let Some(age) = s.pending.oldest_age_s {
                out.push_str(&format!("  oldest {}", human_age(age)));
            }
        }
        out.push('\n');
    }
    for u in &s.uploading {
        out.push_str(&format!(
            "uploading: {}/{}/{} {:.1}% ({} of {})\n",
            u.checklist,
            u.row,
            crate::localfs::readable_line(&u.filename),
            u.percent,
            human_bytes(u.bytes_sent),
            human_bytes(u.size)
        ));
    }
    for d in &s.downloading {
        out.push_str(&format!(
            "downloading: {} {:.1}% ({} of {})\n",
            d.filename,
            d.percent,
            human_bytes(d.bytes_received),
            human_bytes(d.size)
        ));
    }
    if let Some(e) = &s.last_success {
        out.push_str(&format!(
            "last success: {} {}\n",
            rfc3339(e.time),
            e.attachment_id.as_deref().unwrap_or("")
        ));
    }
    if let Some(e) = &s.last_error {
        out.push_str(&format!(
            "last error:   {} {} {}\n",
            rfc3339(e.time),
            e.attachment_id.as_deref().unwrap_or(""),
            e.reason.as_deref().unwrap_or("")
        ));
    }
    out.push_str(&format!("device: {}\n", device::summary(&s.device)));
    if let Some(r) = &s.database_rebuilt {
        out.push_str(&format!(
            "database: rebuilt {} ({}){}\n",
            r.time,
            r.reason,
            r.kept_as
                .as_deref()
                .map(|k| format!(", old copy kept as {k}"))
                .unwrap_or_default()
        ));
    }
    out.push_str(&render_checklists(&s.checklists));
    if let Some(c) = &s.conditions {
        out.push_str(&render_conditions(c));
    }
    out
}

/// The `conditions:` lines of `fieldsync status`.
pub fn render_conditions(c: &ConditionsReport) -> String {
    let hb = |n: u64| human_bytes(n as i64);
    let mut out = String::from("conditions:\n");
    let mut line = |k: &str, s: String| out.push_str(&format!("  {k:<10}{s}\n"));
    let n = &c.network;
    line(
        "network",
        format!(
            "{}, {}",
            if n.online { "online" } else { "offline" },
            match &n.interface {
                Some(i) if n.metered => format!("{i} (metered)"),
                Some(i) => format!("{i} (unmetered)"),
                None => "no default route".into(),
            }
        ),
    );
    let b = &c.budget;
    line(
        "budget",
        match n.metered_policy {
            MeteredPolicy::Never => "metered links never used".into(),
            MeteredPolicy::Unlimited => {
                format!("{} used today on metered links (no limit)", hb(b.used))
            }
            MeteredPolicy::Budget => format!(
                "{} of {} used today on metered links ({} left)",
                hb(b.used),
                hb(b.limit),
                hb(b.limit.saturating_sub(b.used))
            ),
        },
    );
    let bat = &c.battery;
    line(
        "battery",
        if bat.present {
            format!(
                "{}{} (min {}%)",
                bat.percent.map(|p| format!("{p}% ")).unwrap_or_default(),
                if bat.charging {
                    "charging/on mains"
                } else {
                    "discharging"
                },
                bat.min_percent
            )
        } else {
            "none (always ok)".into()
        },
    );
    let d = &c.disk;
    let free = [d.state_free, d.capture_free].into_iter().flatten().min();
    line(
        "disk",
        format!(
            "{} free (min {}){}{}",
            free.map(hb).unwrap_or_else(|| "unknown".into()),
            hb(d.min_free),
            if d.low { ", LOW" } else { "" },
            if d.evicted_files > 0 {
                format!(", {} local copies evicted", d.evicted_files)
            } else {
                String::new()
            }
        ),
    );
    line(
        "cpu",
        match (c.cpu.temp_c, c.cpu.max_c) {
            (_, None) => "temperature guard off".into(),
            (Some(t), Some(m)) => format!(
                "{t:.1} °C (max {m:.0} °C){}",
                if c.cpu.hot { ", HOT" } else { "" }
            ),
            (None, Some(m)) => format!("temperature unknown (max {m:.0} °C)"),
        },
    );
    let sch = &c.schedule;
    line(
        "schedule",
        if sch.windows.is_empty() {
            "any time".into()
        } else {
            format!(
                "{}{} ({})",
                sch.windows.join(", "),
                if sch.metered_only {
                    " on metered links"
                } else {
                    ""
                },
                if sch.inside { "inside" } else { "outside" }
            )
        },
    );
    line(
        "bandwidth",
        match c.bandwidth.limit_bytes_per_s {
            Some(r) => format!("{}/s", hb(r)),
            None => "unlimited".into(),
        },
    );
    if !c.deferred.is_empty() {
        let parts: Vec<String> = c
            .deferred
            .iter()
            .map(|(k, n)| format!("{n} file(s) {k}"))
            .collect();
        line("waiting", parts.join(", "));
    }
    if !c.failing.is_empty() {
        line("failing", c.failing.join(", "));
    }
    out
}

/// `conditions` is `{}` on the wire when no report exists yet (the documented shape).
mod empty_if_none {
    use serde::{Serialize, Serializer};

    use crate::conditions::report::ConditionsReport;

    pub fn serialize<S: Serializer>(v: &Option<ConditionsReport>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(r) => r.serialize(s),
            None => serde_json::Map::new().serialize(s),
        }
    }
}
