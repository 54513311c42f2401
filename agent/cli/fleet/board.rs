//! What the dashboard knows about the fleet, and what it shows the page: one entry per
//! device from its retained `state` and `status`, the pending history behind the
//! sparkline, which devices need attention and why, and the commands this dashboard sent
//! with their results. Pure: messages and "now" in, JSON for the page out; the server
//! (`serve.rs`) does the I/O.
//!
//! The page gets a chosen set of fields, never the raw snapshot, so nothing the server
//! holds (broker credentials, the command token) can reach it through here.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::mqtt;
use crate::status::human_age;

/// Pending history kept per device: one point per minute for the last hour (the
/// sparkline), so a device costs about a kilobyte however chatty it is.
pub const HISTORY_SPAN: Duration = Duration::from_secs(3600);
const HISTORY_BUCKET_S: u64 = 60;
const HISTORY_POINTS: usize = (HISTORY_SPAN.as_secs() / HISTORY_BUCKET_S) as usize + 1;

/// Request ids this dashboard issued and still matches results to (oldest forgotten
/// first): a result for an id not in here was asked for by someone else.
const MAX_ISSUED: usize = 1024;

/// The commands the page may send (the MQTT command names).
pub const COMMANDS: &[&str] = &["sync", "pause", "resume", "retry"];

/// What the page shows about the broker connection.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerState {
    pub connected: bool,
    /// Why the last connection attempt failed (one line), while not connected.
    pub error: Option<String>,
}

/// A command this dashboard sent to a device, and its result once the device answered.
#[derive(Debug, Clone, PartialEq)]
struct CommandView {
    command: String,
    request_id: String,
    sent: SystemTime,
    /// `ok` / `error` from the device's result, `None` while waiting.
    result: Option<String>,
    message: Option<String>,
    answered: Option<SystemTime>,
}

#[derive(Debug, Clone)]
struct Entry {
    prefix: String,
    device_id: String,
    state: Option<String>,
    /// When this dashboard saw the state change; `None` for a state that was already
    /// retained when it subscribed (then the page counts from the last status instead).
    state_since: Option<SystemTime>,
    status: Option<Value>,
    /// When the last status arrived here (the device's clock may be wrong; ours ages it).
    status_at: Option<SystemTime>,
    /// (unix seconds, pending count), one per minute, oldest first.
    history: VecDeque<(u64, i64)>,
    command: Option<CommandView>,
    /// Why the device needs attention; empty when it does not.
    attention: Vec<String>,
    /// The board's change counter when this entry last changed.
    seq: u64,
}

/// What a page that has seen everything up to some change counter must be sent.
#[derive(Debug, PartialEq)]
pub enum Changes {
    Nothing,
    /// Everything (a device disappeared, or the broker connection changed).
    Snapshot(Value),
    /// Only these devices changed.
    Devices(Vec<Value>),
}

/// Why a command from the page was not sent.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum CommandRefused {
    #[error("unknown command `{0}` (expected sync, pause, resume or retry)")]
    UnknownCommand(String),
    #[error("no device reports under {0}")]
    UnknownDevice(String),
}

/// A command ready to publish.
#[derive(Debug, PartialEq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    pub request_id: String,
}

#[derive(Debug)]
pub struct Board {
    devices: BTreeMap<String, Entry>,
    /// Bumped on every change; pages remember the last one they were sent.
    seq: u64,
    /// The change after which a page needs a whole snapshot again.
    reset_seq: u64,
    broker: BrokerState,
    /// Oldest pending beyond this marks a device for attention.
    attention_after: Duration,
    /// Request id → device prefix, for the results.
    issued: HashMap<String, String>,
    issued_order: VecDeque<String>,
}

impl Board {
    pub fn new(attention_after: Duration) -> Board {
        Board {
            devices: BTreeMap::new(),
            seq: 1,
            reset_seq: 1,
            broker: BrokerState {
                connected: false,
                error: None,
            },
            attention_after,
            issued: HashMap::new(),
            issued_order: VecDeque::new(),
        }
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn broker(&self) -> &BrokerState {
        &self.broker
    }

    pub fn set_broker(&mut self, b: BrokerState) -> bool {
        if self.broker == b {
            return false;
        }
        self.broker = b;
        self.seq += 1;
        self.reset_seq = self.seq;
        true
    }

    /// Takes one message from the subscription (`<prefix>/state`, `<prefix>/status`,
    /// `<prefix>/cmd/<name>/result`); returns whether the view changed.
    pub fn on_message(
        &mut self,
        topic: &str,
        payload: &[u8],
        retained: bool,
        now: SystemTime,
    ) -> bool {
        if let Some(rest) = topic.strip_suffix("/result") {
            return match rest.rsplit_once("/cmd/") {
                Some((prefix, _)) => self.on_result(prefix, payload, now),
                None => false,
            };
        }
        let (prefix, kind) = match topic.rsplit_once('/') {
            Some((p, k @ ("state" | "status"))) if !p.is_empty() => (p, k),
            _ => return false,
        };
        if payload.is_empty() {
            // A cleared retained message: the device left the fleet.
            if self.devices.remove(prefix).is_some() {
                self.seq += 1;
                self.reset_seq = self.seq;
                return true;
            }
            return false;
        }
        let status = if kind == "status" {
            match mqtt::decode::<Value>(payload) {
                Ok(v) if v.is_object() => Some(v),
                _ => return false,
            }
        } else {
            None
        };
        self.seq += 1;
        let seq = self.seq;
        let e = self
            .devices
            .entry(prefix.to_string())
            .or_insert_with(|| Entry {
                prefix: prefix.to_string(),
                device_id: prefix.rsplit('/').next().unwrap_or(prefix).to_string(),
                state: None,
                state_since: None,
                status: None,
                status_at: None,
                history: VecDeque::new(),
                command: None,
                attention: Vec::new(),
                seq,
            });
        match status {
            None => {
                let state = String::from_utf8_lossy(payload).trim().to_string();
                if e.state.as_deref() != Some(state.as_str()) {
                    e.state_since = (!retained).then_some(now);
                    e.state = Some(state);
                }
            }
            Some(s) => {
                if let Some(id) = s["device_id"].as_str() {
                    e.device_id = id.to_string();
                }
                if let Some(n) = s["pending"]["count"].as_i64() {
                    push_history(&mut e.history, now, n);
                }
                e.status = Some(s);
                e.status_at = Some(now);
            }
        }
        e.attention = attention(e, now, self.attention_after);
        e.seq = seq;
        true
    }

    fn on_result(&mut self, prefix: &str, payload: &[u8], now: SystemTime) -> bool {
        let Ok(r) = mqtt::decode::<Value>(payload) else {
            return false;
        };
        let Some(rid) = r["request_id"].as_str() else {
            return false;
        };
        if self.issued.get(rid).map(String::as_str) != Some(prefix) {
            return false;
        }
        let Some(e) = self.devices.get_mut(prefix) else {
            return false;
        };
        let Some(c) = e.command.as_mut().filter(|c| c.request_id == rid) else {
            return false;
        };
        c.result = Some(r["result"].as_str().unwrap_or("error").to_string());
        c.message = r["message"].as_str().map(str::to_string);
        c.answered = Some(now);
        self.seq += 1;
        e.seq = self.seq;
        true
    }

    /// Re-decides attention as time passes (a pending photo grows older without any
    /// message); returns whether any device changed.
    pub fn tick(&mut self, now: SystemTime) -> bool {
        let mut changed = false;
        for e in self.devices.values_mut() {
            let a = attention(e, now, self.attention_after);
            if a != e.attention {
                e.attention = a;
                self.seq += 1;
                e.seq = self.seq;
                changed = true;
            }
        }
        changed
    }

    /// Checks a command from the page and records it; the caller publishes it.
    pub fn command(
        &mut self,
        prefix: &str,
        command: &str,
        request_id: String,
        now: SystemTime,
    ) -> Result<Outgoing, CommandRefused> {
        if !COMMANDS.contains(&command) {
            return Err(CommandRefused::UnknownCommand(command.to_string()));
        }
        let Some(e) = self.devices.get_mut(prefix) else {
            return Err(CommandRefused::UnknownDevice(prefix.to_string()));
        };
        let payload = if command == "retry" {
            json!({"request_id": request_id, "failed": true})
        } else {
            json!({"request_id": request_id})
        };
        e.command = Some(CommandView {
            command: command.to_string(),
            request_id: request_id.clone(),
            sent: now,
            result: None,
            message: None,
            answered: None,
        });
        self.seq += 1;
        e.seq = self.seq;
        if self.issued_order.len() >= MAX_ISSUED {
            if let Some(old) = self.issued_order.pop_front() {
                self.issued.remove(&old);
            }
        }
        self.issued.insert(request_id.clone(), prefix.to_string());
        self.issued_order.push_back(request_id.clone());
        Ok(Outgoing {
            topic: format!("{prefix}/cmd/{command}"),
            payload: serde_json::to_vec(&payload).expect("serialisable"),
            request_id,
        })
    }

    /// Records that a command recorded by [`Board::command`] could not be sent.
    pub fn command_failed(&mut self, prefix: &str, request_id: &str, why: &str) {
        if let Some(e) = self.devices.get_mut(prefix) {
            if let Some(c) = e.command.as_mut().filter(|c| c.request_id == request_id) {
                c.result = Some("error".into());
                c.message = Some(format!("not sent: {why}"));
                self.seq += 1;
                e.seq = self.seq;
            }
        }
    }

    /// What a page that was sent everything up to `since` needs now.
    pub fn changes(&self, since: u64, now: SystemTime) -> Changes {
        if since < self.reset_seq {
            return Changes::Snapshot(self.snapshot(now));
        }
        let changed: Vec<Value> = self
            .devices
            .values()
            .filter(|e| e.seq > since)
            .map(|e| device_json(e, now))
            .collect();
        if changed.is_empty() {
            Changes::Nothing
        } else {
            Changes::Devices(changed)
        }
    }

    /// The whole view.
    pub fn snapshot(&self, now: SystemTime) -> Value {
        json!({
            "broker": {"connected": self.broker.connected, "error": self.broker.error},
            "devices": self.devices.values().map(|e| device_json(e, now)).collect::<Vec<_>>(),
        })
    }
}

/// Keeps one point per minute (the newest value of that minute) for the last hour.
fn push_history(h: &mut VecDeque<(u64, i64)>, now: SystemTime, pending: i64) {
    let t = unix(now);
    let bucket = t / HISTORY_BUCKET_S;
    match h.back_mut() {
        Some(last) if last.0 / HISTORY_BUCKET_S == bucket => *last = (t, pending),
        _ => h.push_back((t, pending)),
    }
    let horizon = t.saturating_sub(HISTORY_SPAN.as_secs());
    while h.front().is_some_and(|p| p.0 < horizon) || h.len() > HISTORY_POINTS {
        h.pop_front();
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Why a device needs an operator (pure): lost, failed photos, paused for a reason other
/// than a clean stop, or its oldest pending photo older than `after`. Empty: it does not.
fn attention(e: &Entry, now: SystemTime, after: Duration) -> Vec<String> {
    let mut why = Vec::new();
    if e.state.as_deref() == Some("lost") {
        why.push("lost".to_string());
    }
    let Some(s) = &e.status else {
        return why;
    };
    let failed = s["counts"]["failed"]["count"].as_i64().unwrap_or(0);
    if failed > 0 {
        why.push(format!("{failed} failed"));
    }
    let reason = s["pause_reason"].as_str();
    if s["paused"] == true && reason != Some("not_running") {
        why.push(format!("paused: {}", reason.unwrap_or("unknown")));
    }
    if s["pending"]["count"].as_i64().unwrap_or(0) > 0 {
        if let Some(age) = s["pending"]["oldest_age_s"].as_u64() {
            // The snapshot's age grows while no newer one arrives (a lost device's
            // photos keep waiting).
            let since = e
                .status_at
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or_default();
            let oldest = Duration::from_secs(age) + since;
            if oldest > after {
                why.push(format!(
                    "oldest pending {}",
                    human_age(oldest.as_secs() as i64)
                ));
            }
        }
    }
    why
}

/// Copies `key` from the snapshot, or null.
fn pick(s: Option<&Value>, key: &str) -> Value {
    s.and_then(|s| s.get(key)).cloned().unwrap_or(Value::Null)
}

/// One device as the page gets it.
fn device_json(e: &Entry, now: SystemTime) -> Value {
    let s = e.status.as_ref();
    let last_success = pick(s, "last_success");
    let last_error = pick(s, "last_error");
    let brief = |v: &Value| {
        if v.is_object() {
            json!({"time": v["time"], "checklist": v["checklist"], "row": v["row"], "reason": v["reason"]})
        } else {
            Value::Null
        }
    };
    let failed = s.and_then(|s| s["counts"]["failed"]["count"].as_i64());
    let horizon = unix(now).saturating_sub(HISTORY_SPAN.as_secs());
    json!({
        "prefix": e.prefix,
        "device_id": e.device_id,
        "state": e.state,
        "state_since": e.state_since.map(rfc3339),
        "status_time": s.map(|s| s["time"].clone()),
        "status_received": e.status_at.map(rfc3339),
        "agent_version": pick(s, "agent_version"),
        "pending": pick(s, "pending"),
        "failed": failed,
        "paused": pick(s, "paused"),
        "pause_reason": pick(s, "pause_reason"),
        "uploading": pick(s, "uploading"),
        "downloading": pick(s, "downloading"),
        "last_success": brief(&last_success),
        "last_error": brief(&last_error),
        "device": pick(s, "device"),
        "checklists": pick(s, "checklists"),
        "history": e.history.iter().filter(|p| p.0 >= horizon).map(|p| [p.0 as i64, p.1]).collect::<Vec<_>>(),
        "attention": e.attention,
        "command": e.command.as_ref().map(|c| json!({
            "command": c.command,
            "request_id": c.request_id,
            "sent": rfc3339(c.sent),
            "result": c.result,
            "message": c.message,
            "answered": c.answered.map(rfc3339),
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    fn status(pending: i64, oldest: Option<i64>, failed: i64, paused: Option<&str>) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "device_id": "a",
            "time": "2027-01-15T08:00:00.000Z",
            "pending": {"count": pending, "bytes": pending * 10, "oldest_age_s": oldest},
            "counts": {"failed": {"count": failed, "bytes": 0}},
            "paused": paused.is_some(),
            "pause_reason": paused,
            "uploading": [{"id": "x", "filename": "IMG_1.jpg", "percent": 40}],
            "device": {"uptime_s": 5},
            "remote": "file:/secret/place",
        }))
        .unwrap()
    }

    fn device(b: &Board, prefix: &str, now: SystemTime) -> Value {
        b.snapshot(now)["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["prefix"] == prefix)
            .cloned()
            .unwrap()
    }

    #[test]
    fn attention_lost_failed_paused_and_old_pending() {
        let mut b = Board::new(Duration::from_secs(3600));
        assert!(b.on_message("fs/a/state", b"online", true, t(0)));
        assert!(b.on_message("fs/a/status", &status(2, Some(60), 0, None), false, t(0)));
        assert_eq!(device(&b, "fs/a", t(0))["attention"], json!([]));
        // A retained state has no known start; a live one has.
        assert!(device(&b, "fs/a", t(0))["state_since"].is_null());

        // The oldest pending photo ages while no new status arrives.
        assert!(!b.tick(t(3000)));
        assert!(b.tick(t(3600)));
        assert_eq!(
            device(&b, "fs/a", t(3600))["attention"],
            json!(["oldest pending 1h 1m"])
        );

        assert!(b.on_message(
            "fs/a/status",
            &status(0, None, 2, Some("auth")),
            false,
            t(3700)
        ));
        assert!(b.on_message("fs/a/state", b"lost", false, t(3701)));
        let d = device(&b, "fs/a", t(3702));
        assert_eq!(d["attention"], json!(["lost", "2 failed", "paused: auth"]));
        assert_eq!(d["state"], "lost");
        assert!(d["state_since"].is_string());
        assert_eq!(d["failed"], 2);

        // A clean stop is not a reason by itself.
        assert!(b.on_message(
            "fs/a/status",
            &status(0, None, 0, Some("not_running")),
            false,
            t(3800)
        ));
        assert!(b.on_message("fs/a/state", b"offline", false, t(3800)));
        assert_eq!(device(&b, "fs/a", t(3800))["attention"], json!([]));
    }

    #[test]
    fn the_page_gets_chosen_fields_only() {
        let mut b = Board::new(Duration::from_secs(3600));
        b.on_message("fs/a/status", &status(1, Some(5), 0, None), false, t(0));
        let d = device(&b, "fs/a", t(0));
        assert_eq!(d["pending"]["count"], 1);
        assert_eq!(d["uploading"][0]["percent"], 40);
        assert!(d["downloading"].is_null());
        assert!(d["checklists"].is_null());
        assert!(!d.to_string().contains("/secret/place"), "{d}");
        // Not a status: ignored. A non-object status: ignored.
        assert!(!b.on_message("fs/a/events", b"{}", false, t(0)));
        assert!(!b.on_message("fs/a/status", b"[1]", false, t(0)));
    }

    #[test]
    fn history_keeps_one_point_a_minute_for_an_hour() {
        let mut b = Board::new(Duration::from_secs(3600));
        for i in 0..200u64 {
            // Every 30 s for 100 minutes.
            let pending = i as i64;
            b.on_message(
                "fs/a/status",
                &status(pending, Some(1), 0, None),
                false,
                t(i * 30),
            );
        }
        let now = t(199 * 30);
        let h = device(&b, "fs/a", now)["history"]
            .as_array()
            .unwrap()
            .clone();
        assert!(h.len() <= HISTORY_POINTS && h.len() >= 59, "{}", h.len());
        assert_eq!(h.last().unwrap()[1], 199);
        let first = h[0][0].as_u64().unwrap();
        assert!(unix(now) - first <= 3600);
    }

    #[test]
    fn changes_send_only_what_changed_and_a_snapshot_after_a_removal() {
        let mut b = Board::new(Duration::from_secs(3600));
        b.on_message("fs/a/state", b"online", true, t(0));
        b.on_message("fs/b/state", b"online", true, t(0));
        let seen = b.seq();
        assert!(matches!(b.changes(0, t(0)), Changes::Snapshot(_)));
        assert_eq!(b.changes(seen, t(0)), Changes::Nothing);
        b.on_message("fs/b/state", b"lost", false, t(1));
        match b.changes(seen, t(1)) {
            Changes::Devices(d) => {
                assert_eq!(d.len(), 1);
                assert_eq!(d[0]["state"], "lost");
            }
            other => panic!("{other:?}"),
        }
        let seen = b.seq();
        assert!(b.on_message("fs/b/state", b"", true, t(2)));
        match b.changes(seen, t(2)) {
            Changes::Snapshot(s) => assert_eq!(s["devices"].as_array().unwrap().len(), 1),
            other => panic!("{other:?}"),
        }
        let seen = b.seq();
        assert!(b.set_broker(BrokerState {
            connected: false,
            error: Some("connection refused".into())
        }));
        assert!(matches!(b.changes(seen, t(3)), Changes::Snapshot(_)));
    }

    #[test]
    fn commands_are_checked_and_results_matched_by_request_id() {
        let mut b = Board::new(Duration::from_secs(3600));
        b.on_message("fs/a/state", b"online", true, t(0));
        assert_eq!(
            b.command("fs/a", "reload", "r0".into(), t(0)),
            Err(CommandRefused::UnknownCommand("reload".into()))
        );
        assert_eq!(
            b.command("fs/zz", "pause", "r0".into(), t(0)),
            Err(CommandRefused::UnknownDevice("fs/zz".into()))
        );
        let out = b.command("fs/a", "retry", "r1".into(), t(0)).unwrap();
        assert_eq!(out.topic, "fs/a/cmd/retry");
        let p: Value = serde_json::from_slice(&out.payload).unwrap();
        assert_eq!(p, json!({"request_id": "r1", "failed": true}));
        let d = device(&b, "fs/a", t(0));
        assert_eq!(d["command"]["command"], "retry");
        assert!(d["command"]["result"].is_null());

        // Someone else's result, and a result from another device, change nothing.
        let other = br#"{"command":"retry","request_id":"x9","result":"ok","message":"m"}"#;
        assert!(!b.on_message("fs/a/cmd/retry/result", other, false, t(1)));
        let ours = br#"{"command":"retry","request_id":"r1","result":"ok","message":"requeued 2"}"#;
        assert!(!b.on_message("fs/b/cmd/retry/result", ours, false, t(1)));
        assert!(b.on_message("fs/a/cmd/retry/result", ours, false, t(1)));
        let d = device(&b, "fs/a", t(1));
        assert_eq!(d["command"]["result"], "ok");
        assert_eq!(d["command"]["message"], "requeued 2");
    }
}
