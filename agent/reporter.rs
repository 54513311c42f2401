//! The fleet reporter: publishes the device's state, status snapshot and event log over
//! MQTT and applies operator commands from the dashboard (DESIGN.md, "MQTT contract").
//!
//! Two plain threads, like the rest of the daemon:
//! - `mqtt-net` owns the `rumqttc` sync [`Connection`] and only drives the network: it
//!   forwards connection changes, incoming commands and acknowledgements to the reporter
//!   over a bounded channel, and waits out the reconnect backoff.
//! - `mqtt-reporter` owns a read-mostly store connection and the [`Client`]. It never
//!   blocks on the network: every publish is `try_publish` into `rumqttc`'s bounded request
//!   channel, and it publishes only while connected, so a slow or dead broker costs at most
//!   that channel's capacity in memory. What could not be sent stays in the store: the
//!   status is re-read when it is next due (never a backlog of stale snapshots), and events
//!   are re-read from the event log after the last one the broker acknowledged.
//!
//! The sync API was chosen over the async one because the reporter's work is blocking
//! SQLite reads and writes, which must not run on an async reactor; `rumqttc` keeps its
//! small current-thread runtime inside the `Connection`, on the net thread only.
//!
//! Invariant: uploads never wait for the reporter. It shares nothing with the uploader but
//! the SQLite file (WAL: its reads never block the writers; its writes are one-row commands
//! an operator asked for, and the acknowledged event position every few seconds).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rumqttc::{Client, ClientError, Connection, Event, Outgoing, Packet, QoS};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::commands;
use crate::config::Config;
use crate::mqtt::{self, MqttError, PayloadFormat, Topics};
use crate::status::{self, Snapshot};
use crate::store::{EventForm, EventKind, Store, StoreError};
use crate::util::{now_ms, rfc3339};

/// Requests `rumqttc` holds for the broker before `try_publish` reports it full. Bounds the
/// memory a slow or dead broker can cost (about one status snapshot, a batch of events and
/// a few command results).
const REQUEST_CAPACITY: usize = 64;

/// Net-thread notifications waiting for the reporter. The reporter drains them quickly; the
/// bound only stops a command flood from growing memory (it then backs up into TCP).
const NET_CAPACITY: usize = 128;

/// How often the reporter looks at `PRAGMA data_version` and the event log: changes show
/// on MQTT within half a second, for one cheap query (the brief's "≤ 2/s").
const TICK: Duration = Duration::from_millis(500);

/// Status is published at most this often under load (progress writes change the store
/// several times a second).
const STATUS_MIN_GAP: Duration = Duration::from_secs(1);

/// Events read from the log per tick: keeps one tick short even after a long outage.
const EVENT_BATCH: i64 = 50;

/// The acknowledged event position is written to the store at most this often (it is one
/// fsynced write; losing a few seconds of it only means a few events are sent twice).
const PERSIST_EVERY: Duration = Duration::from_secs(5);

/// How long a clean stop waits for the broker to acknowledge `offline` (and the last
/// events) before disconnecting anyway.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Event kinds not published: one per photo and already visible in the status counts.
const UNPUBLISHED_KINDS: &[EventKind] = &[EventKind::Enqueued];

#[derive(Debug, thiserror::Error)]
pub enum ReporterError {
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The reply on `<prefix>/cmd/<name>/result`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommandResult {
    pub command: String,
    /// Echoed from the command, so a dashboard can match replies to requests.
    pub request_id: Option<String>,
    /// `ok` or `error`.
    pub result: String,
    pub message: String,
    /// For `retry`: the attachment ids requeued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requeued: Option<Vec<String>>,
    pub time: String,
}

/// A command as parsed from its topic and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Sync,
    Pause,
    Resume,
    /// One attachment, or (None) every failed one.
    Retry(Option<String>),
}

/// The payload of every command: all keys optional, unknown keys refused (a typo must not
/// silently do something else).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandArgs {
    request_id: Option<String>,
    /// `retry`: the attachment to requeue.
    id: Option<String>,
    /// `retry`: requeue every failed attachment.
    failed: Option<bool>,
}

/// Parses a command (pure; unit-tested). Returns the request id it carried, if any, even
/// when the command itself is invalid.
pub fn parse_command(name: &str, payload: &[u8]) -> (Option<String>, Result<Command, String>) {
    let args: CommandArgs = if payload.trim_ascii().is_empty() {
        CommandArgs::default()
    } else {
        match mqtt::decode(payload) {
            Ok(a) => a,
            Err(e) => return (None, Err(format!("malformed payload: {e}"))),
        }
    };
    let rid = args.request_id.clone();
    let no_target = |cmd: Command| {
        if args.id.is_some() || args.failed.is_some() {
            Err(format!("`{name}` takes no `id` or `failed`"))
        } else {
            Ok(cmd)
        }
    };
    let cmd = match name {
        "sync" => no_target(Command::Sync),
        "pause" => no_target(Command::Pause),
        "resume" => no_target(Command::Resume),
        "retry" => match (args.id, args.failed) {
            (Some(id), None | Some(false)) if !id.is_empty() => Ok(Command::Retry(Some(id))),
            (None, Some(true)) => Ok(Command::Retry(None)),
            _ => Err(
                "`retry` expects {\"id\": \"<attachment id>\"} or {\"failed\": true}".to_string(),
            ),
        },
        other => Err(format!(
            "unknown command `{other}` (expected sync, pause, resume or retry)"
        )),
    };
    (rid, cmd)
}

/// Applies a command through the same store path as the CLI.
fn apply(store: &mut Store, cmd: &Command) -> Result<(String, Option<Vec<String>>), StoreError> {
    match cmd {
        Command::Sync => commands::sync(store).map(|_| ("sync requested".into(), None)),
        Command::Pause => commands::pause(store, "mqtt").map(|_| ("uploads paused".into(), None)),
        Command::Resume => {
            commands::resume(store, "mqtt").map(|_| ("uploads resumed".into(), None))
        }
        Command::Retry(id) => commands::retry(store, id.as_deref())
            .map(|ids| (format!("requeued {} attachment(s)", ids.len()), Some(ids))),
    }
}

/// When the status is due (pure; unit-tested): on change, but not within `min_gap` of the
/// previous one, and at least every `heartbeat`.
#[derive(Debug, Clone)]
pub struct StatusGate {
    pub min_gap: Duration,
    pub heartbeat: Duration,
    last_sent: Option<Instant>,
    changed: bool,
}

impl StatusGate {
    pub fn new(min_gap: Duration, heartbeat: Duration) -> Self {
        StatusGate {
            min_gap,
            heartbeat,
            last_sent: None,
            changed: true,
        }
    }
    pub fn changed(&mut self) {
        self.changed = true;
    }
    /// Forgets the last publication (after a reconnect the status is due at once).
    pub fn reset(&mut self) {
        self.last_sent = None;
        self.changed = true;
    }
    /// `Some(true)`: the heartbeat is due (publish even if equal); `Some(false)`: a change
    /// may be published; `None`: nothing to do now.
    pub fn due(&self, now: Instant) -> Option<bool> {
        let Some(last) = self.last_sent else {
            return Some(true);
        };
        let since = now.saturating_duration_since(last);
        if since >= self.heartbeat {
            Some(true)
        } else if self.changed && since >= self.min_gap {
            Some(false)
        } else {
            None
        }
    }
    pub fn sent(&mut self, now: Instant) {
        self.last_sent = Some(now);
        self.changed = false;
    }
    /// The change turned out to be no change (only the clock moved).
    pub fn unchanged(&mut self) {
        self.changed = false;
    }
}

/// Where event publication should restart after a (re)connect: after the last
/// acknowledged event, but no further back than the most recent `max_backlog` (pure).
/// Returns the start position and how many events are skipped.
pub fn backlog_start(acked: i64, last: i64, max_backlog: i64) -> (i64, i64) {
    let floor = (last - max_backlog).max(0);
    if acked < floor {
        (floor, floor - acked)
    } else {
        (acked.min(last), 0)
    }
}

/// Two snapshots that differ only in their clock-driven fields are the same news.
fn same_news(a: &Snapshot, b: &Snapshot) -> bool {
    let strip = |s: &Snapshot| {
        let mut s = s.clone();
        s.time = String::new();
        s.pending.oldest_age_s = None;
        s
    };
    strip(a) == strip(b)
}

/// What the net thread tells the reporter.
#[derive(Debug)]
enum Net {
    Connected,
    Disconnected,
    Command {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    },
    /// The broker acknowledged our oldest unacknowledged QoS 1 publish (brokers must
    /// acknowledge in order, MQTT 3.1.1 §4.6).
    PubAck,
    /// Our DISCONNECT was sent: the session ended cleanly.
    Closed,
}

/// A running reporter; [`Reporter::stop`] publishes `offline` and disconnects.
pub struct Reporter {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Reporter {
    /// Starts the reporter threads. Fails only on configuration problems (unreadable
    /// password file or certificates) or when the store cannot be opened; an unreachable
    /// broker is retried in the background.
    pub fn spawn(cfg: &Config, db_path: &Path, remote: String) -> Result<Reporter, ReporterError> {
        let m = cfg.mqtt.clone().unwrap_or_default();
        let topics = Topics::new(m.prefix(&cfg.device_id));
        let client_id = m.client_id.clone().unwrap_or_else(|| cfg.device_id.clone());
        let opts = mqtt::options(&m, &client_id, Some(mqtt::last_will(&topics)))?;
        let store = Store::open(db_path)?;
        let acked = match store.events_acked_seq()? {
            Some(seq) => seq,
            // First start with MQTT: history before it is not news. Recorded at once, so
            // what happens from now on is sent even if this run never reaches the broker.
            None => {
                let seq = store.last_event_seq()?;
                store.set_events_acked_seq(seq)?;
                seq
            }
        };
        let (client, connection) = Client::new(opts, REQUEST_CAPACITY);
        let stop = Arc::new(AtomicBool::new(false));
        let (net_tx, net_rx) = mpsc::sync_channel(NET_CAPACITY);
        let (net_done_tx, net_done_rx) = mpsc::channel();
        {
            let stop = stop.clone();
            let endpoint = m.endpoint();
            thread::Builder::new()
                .name("mqtt-net".into())
                .spawn(move || {
                    net_loop(connection, net_tx, stop, endpoint);
                    let _ = net_done_tx.send(());
                })
                .expect("spawn mqtt-net thread");
        }
        info!(broker = %m.endpoint(), prefix = %topics.prefix, client_id = %client_id,
              format = ?m.format, "mqtt reporting enabled");
        let mut r = Run {
            device_id: cfg.device_id.clone(),
            remote,
            format: m.format,
            max_backlog: m.max_backlog_events as i64,
            gate: StatusGate::new(STATUS_MIN_GAP, m.heartbeat.0),
            topics,
            client,
            store,
            stop: stop.clone(),
            net_rx,
            connected: false,
            outstanding: VecDeque::new(),
            sent_seq: acked,
            acked_seq: acked,
            persisted_seq: acked,
            persisted_at: Instant::now(),
            data_version: 0,
            events_pending: true,
            last_status: None,
            closed: false,
        };
        let thread = thread::Builder::new()
            .name("mqtt-reporter".into())
            .spawn(move || {
                r.run();
                let disconnected_cleanly = r.closed;
                // Dropping the client ends the net thread's loop. After a clean DISCONNECT
                // give it a moment to close the socket; it is never joined, so a broker
                // that stopped answering (or a connect attempt under way) cannot hold up
                // the stop.
                drop(r);
                if disconnected_cleanly {
                    let _ = net_done_rx.recv_timeout(STOP_GRACE);
                }
            })
            .expect("spawn mqtt-reporter thread");
        Ok(Reporter { stop, thread })
    }

    /// Publishes a final status and `offline`, waits briefly for the broker to take them,
    /// disconnects. Called by the daemon after uploads have stopped.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// The reporter thread's state.
struct Run {
    device_id: String,
    remote: String,
    format: PayloadFormat,
    max_backlog: i64,
    gate: StatusGate,
    topics: Topics,
    client: Client,
    store: Store,
    stop: Arc<AtomicBool>,
    net_rx: Receiver<Net>,
    connected: bool,
    /// One entry per QoS 1 publish not yet acknowledged, oldest first: the event sequence
    /// number it carried, if it was an event.
    outstanding: VecDeque<Option<i64>>,
    /// The last event handed to the client in this session.
    sent_seq: i64,
    /// The last event the broker acknowledged (everything up to it is delivered).
    acked_seq: i64,
    persisted_seq: i64,
    persisted_at: Instant,
    data_version: i64,
    /// The event log may hold events not yet handed to the client.
    events_pending: bool,
    last_status: Option<Snapshot>,
    /// Our DISCONNECT went out (a clean stop).
    closed: bool,
}

impl Run {
    fn run(&mut self) {
        loop {
            match self.net_rx.recv_timeout(TICK) {
                Ok(msg) => {
                    self.on_net(msg);
                    while let Ok(m) = self.net_rx.try_recv() {
                        self.on_net(m);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // The net thread ended: nothing more can be published.
                    self.connected = false;
                }
            }
            if self.stop.load(Ordering::Relaxed) {
                self.shutdown();
                return;
            }
            if let Err(e) = self.tick() {
                warn!(error = %e, "mqtt reporter cannot read the queue; will retry");
            }
            self.persist_acked(false);
        }
    }

    fn on_net(&mut self, msg: Net) {
        match msg {
            Net::Connected => {
                self.connected = true;
                self.outstanding.clear();
                if let Err(e) = self.on_connect() {
                    warn!(error = %e, "mqtt reporter cannot read the queue; will retry");
                }
            }
            Net::Disconnected => {
                self.connected = false;
                // Whatever was not acknowledged is gone with the session (clean session):
                // events are sent again from the last acknowledged one.
                self.outstanding.clear();
                self.sent_seq = self.acked_seq;
            }
            Net::Command {
                topic,
                payload,
                retain,
            } => self.on_command(&topic, &payload, retain),
            Net::PubAck => {
                if let Some(Some(seq)) = self.outstanding.pop_front() {
                    self.acked_seq = self.acked_seq.max(seq);
                }
                if self.outstanding.is_empty() {
                    // Everything handed over is delivered, including skipped kinds.
                    self.acked_seq = self.acked_seq.max(self.sent_seq);
                }
            }
            Net::Closed => {
                self.connected = false;
                self.closed = true;
            }
        }
    }

    fn on_connect(&mut self) -> Result<(), StoreError> {
        let last = self.store.last_event_seq()?;
        let (start, skipped) = backlog_start(self.acked_seq, last, self.max_backlog);
        if skipped > 0 {
            info!(
                skipped,
                "mqtt: older events from the outage are not sent (backlog limit); see `fieldsync events`"
            );
        }
        self.acked_seq = start;
        self.sent_seq = start;
        // Subscriptions do not survive a clean session: renew them on every connect.
        if let Err(e) = self
            .client
            .try_subscribe(self.topics.commands(), QoS::AtLeastOnce)
        {
            warn!(error = %e, "mqtt: cannot subscribe to commands");
        }
        self.publish(
            self.topics.state(),
            true,
            mqtt::STATE_ONLINE.as_bytes().to_vec(),
            None,
        );
        self.gate.reset();
        self.events_pending = true;
        self.tick()
    }

    fn tick(&mut self) -> Result<(), StoreError> {
        let dv = self.store.data_version()?;
        if dv != self.data_version {
            self.data_version = dv;
            self.gate.changed();
            self.events_pending = true;
        }
        if !self.connected {
            return Ok(());
        }
        self.pump_events()?;
        if let Some(heartbeat) = self.gate.due(Instant::now()) {
            let snap = status::snapshot(&self.store, &self.device_id, &self.remote, true)?;
            let news = self
                .last_status
                .as_ref()
                .is_none_or(|prev| !same_news(prev, &snap));
            if heartbeat || news {
                let payload = mqtt::encode(self.format, &snap);
                if self.publish(self.topics.status(), true, payload, None) {
                    self.gate.sent(Instant::now());
                    self.last_status = Some(snap);
                }
            } else {
                self.gate.unchanged();
            }
        }
        Ok(())
    }

    /// Hands events after `sent_seq` to the client, oldest first, until the log is
    /// exhausted or the client's channel is full (the rest go on the next tick).
    fn pump_events(&mut self) -> Result<(), StoreError> {
        if !self.events_pending {
            return Ok(());
        }
        let batch = self.store.events_after(self.sent_seq, EVENT_BATCH)?;
        let full_batch = batch.len() as i64 == EVENT_BATCH;
        for e in batch {
            let seq = e.seq;
            if !UNPUBLISHED_KINDS.contains(&e.kind) {
                let payload = mqtt::encode(self.format, &e.form(EventForm::Message));
                if !self.publish(self.topics.events(), false, payload, Some(seq)) {
                    return Ok(());
                }
            }
            self.sent_seq = seq;
        }
        if self.outstanding.is_empty() {
            self.acked_seq = self.acked_seq.max(self.sent_seq);
        }
        self.events_pending = full_batch;
        Ok(())
    }

    fn on_command(&mut self, topic: &str, payload: &[u8], retain: bool) {
        let Some(name) = self.topics.command_name(topic).map(str::to_string) else {
            return;
        };
        let (request_id, parsed) = parse_command(&name, payload);
        let outcome = if retain {
            Err(
                "retained commands are refused (they would run again on every reconnect); \
                 clear it with an empty retained message"
                    .to_string(),
            )
        } else {
            parsed.and_then(|cmd| apply(&mut self.store, &cmd).map_err(|e| e.to_string()))
        };
        let (result, message, requeued) = match outcome {
            Ok((msg, ids)) => ("ok", msg, ids),
            Err(e) => ("error", e, None),
        };
        info!(command = %name, result, detail = %message, "mqtt command");
        let reply = CommandResult {
            command: name.clone(),
            request_id,
            result: result.into(),
            message,
            requeued,
            time: rfc3339(now_ms()),
        };
        let payload = mqtt::encode(self.format, &reply);
        self.publish(self.topics.result(&name), false, payload, None);
        // Our own writes do not change our `data_version`: look again now.
        self.gate.changed();
        self.events_pending = true;
    }

    /// Hands one QoS 1 publish to the client without blocking. False when the client's
    /// channel is full (the broker is slow): the caller retries with fresh data later.
    fn publish(&mut self, topic: String, retain: bool, payload: Vec<u8>, seq: Option<i64>) -> bool {
        match self
            .client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
        {
            Ok(()) => {
                self.outstanding.push_back(seq);
                true
            }
            Err(ClientError::TryRequest(_)) => {
                debug!("mqtt: request channel full; will publish later");
                false
            }
            Err(e) => {
                debug!(error = %e, "mqtt: cannot publish");
                false
            }
        }
    }

    fn persist_acked(&mut self, force: bool) {
        if self.acked_seq != self.persisted_seq
            && (force || self.persisted_at.elapsed() >= PERSIST_EVERY)
        {
            match self.store.set_events_acked_seq(self.acked_seq) {
                Ok(()) => self.persisted_seq = self.acked_seq,
                Err(e) => debug!(error = %e, "cannot record the acknowledged event position"),
            }
            self.persisted_at = Instant::now();
        }
    }

    /// Clean stop: the last events, a final status (as `fieldsync status` shows a stopped
    /// daemon), `offline`, then DISCONNECT once the broker has acknowledged them, so the
    /// broker never mistakes the stop for a loss and publishes the will.
    fn shutdown(&mut self) {
        if self.connected {
            let _ = self.tick();
            let _ = self.pump_events();
            if let Ok(snap) = status::snapshot(&self.store, &self.device_id, &self.remote, false) {
                let payload = mqtt::encode(self.format, &snap);
                self.publish(self.topics.status(), true, payload, None);
            }
            self.publish(
                self.topics.state(),
                true,
                mqtt::STATE_OFFLINE.as_bytes().to_vec(),
                None,
            );
            let deadline = Instant::now() + STOP_GRACE;
            while self.connected && !self.outstanding.is_empty() && Instant::now() < deadline {
                if let Ok(m) = self.net_rx.recv_timeout(Duration::from_millis(50)) {
                    self.on_net(m);
                }
            }
            if self.connected && self.outstanding.is_empty() {
                let _ = self.client.try_disconnect();
                let deadline = Instant::now() + STOP_GRACE;
                while self.connected && Instant::now() < deadline {
                    if let Ok(m) = self.net_rx.recv_timeout(Duration::from_millis(50)) {
                        self.on_net(m);
                    }
                }
                info!("mqtt: published offline and disconnected");
            } else {
                warn!("mqtt: broker did not acknowledge `offline` in time; it will publish `lost`");
            }
        }
        self.persist_acked(true);
    }
}

/// Drives the connection: forwards what the reporter needs, reconnects with backoff.
fn net_loop(mut conn: Connection, tx: SyncSender<Net>, stop: Arc<AtomicBool>, endpoint: String) {
    let mut failures: u32 = 0;
    let mut last_error = String::new();
    let mut was_connected = false;
    loop {
        let event = match conn.recv() {
            Ok(ev) => ev,
            // Every client handle is gone: the reporter ended.
            Err(_) => return,
        };
        let msg = match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if failures > 0 || was_connected {
                    info!(broker = %endpoint, "mqtt reconnected");
                } else {
                    info!(broker = %endpoint, "mqtt connected");
                }
                failures = 0;
                last_error.clear();
                was_connected = true;
                Some(Net::Connected)
            }
            Ok(Event::Incoming(Packet::Publish(p))) => Some(Net::Command {
                topic: p.topic,
                payload: p.payload.to_vec(),
                retain: p.retain,
            }),
            Ok(Event::Incoming(Packet::PubAck(_))) => Some(Net::PubAck),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                let _ = tx.send(Net::Closed);
                return;
            }
            Ok(_) => None,
            Err(e) => {
                failures += 1;
                let why = mqtt::describe(&e);
                let delay = mqtt::reconnect_delay(failures, fastrand::f64());
                if why != last_error {
                    if was_connected && failures == 1 {
                        warn!(broker = %endpoint, error = %why, "mqtt connection lost; reconnecting");
                    } else {
                        warn!(broker = %endpoint, error = %why, retry_in = ?delay, "mqtt cannot connect; will retry");
                    }
                    last_error = why;
                } else {
                    debug!(broker = %endpoint, error = %last_error, retry_in = ?delay, "mqtt cannot connect");
                }
                if tx.send(Net::Disconnected).is_err() {
                    return;
                }
                let until = Instant::now() + delay;
                while Instant::now() < until {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    thread::sleep(Duration::from_millis(100).min(until - Instant::now()));
                }
                // Publishes the reporter made before it learnt of the loss would go out
                // after the reconnect, stale and out of step with its acknowledgement
                // count: drop them (the new session starts clean anyway).
                conn.eventloop.clean();
                None
            }
        };
        if let Some(m) = msg {
            if tx.send(m).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_or_explain() {
        assert_eq!(parse_command("sync", b"").1, Ok(Command::Sync));
        assert_eq!(parse_command("pause", b"  \n").1, Ok(Command::Pause));
        assert_eq!(parse_command("resume", b"{}").1, Ok(Command::Resume));
        let (rid, c) = parse_command("retry", br#"{"id":"abc","request_id":"r1"}"#);
        assert_eq!(rid.as_deref(), Some("r1"));
        assert_eq!(c, Ok(Command::Retry(Some("abc".into()))));
        assert_eq!(
            parse_command("retry", br#"{"failed":true}"#).1,
            Ok(Command::Retry(None))
        );
        for (name, payload) in [
            ("retry", &b""[..]),
            ("retry", br#"{"failed":false}"#),
            ("retry", br#"{"id":"a","failed":true}"#),
            ("pause", b"\xff\xfe garbage"),
            ("pause", br#"{"colour":1}"#),
            ("pause", br#"{"id":"a"}"#),
            ("pause", b"{not json"),
            ("reboot", b""),
        ] {
            let (_, r) = parse_command(name, payload);
            let e = r.unwrap_err();
            assert!(!e.is_empty() && !e.contains('\n'), "{name}: {e}");
        }
        // CBOR commands work too (the same schema).
        let cbor = mqtt::encode(
            PayloadFormat::Cbor,
            &serde_json::json!({"id": "x", "request_id": "7"}),
        );
        let (rid, c) = parse_command("retry", &cbor);
        assert_eq!(
            (rid.as_deref(), c),
            (Some("7"), Ok(Command::Retry(Some("x".into()))))
        );
    }

    #[test]
    fn status_gate_debounces_and_beats() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut g = StatusGate::new(s(1), s(60));
        assert_eq!(g.due(t0), Some(true), "first status at once");
        g.sent(t0);
        assert_eq!(g.due(t0 + s(30)), None, "no change, no heartbeat yet");
        g.changed();
        assert_eq!(g.due(t0 + Duration::from_millis(300)), None, "debounced");
        assert_eq!(g.due(t0 + s(1)), Some(false));
        g.sent(t0 + s(1));
        g.changed();
        g.unchanged();
        assert_eq!(g.due(t0 + s(5)), None);
        assert_eq!(g.due(t0 + s(61)), Some(true), "heartbeat");
        g.reset();
        assert_eq!(g.due(t0 + s(62)), Some(true), "after reconnect");
    }

    #[test]
    fn backlog_is_bounded_to_the_most_recent() {
        assert_eq!(backlog_start(10, 20, 500), (10, 0));
        assert_eq!(backlog_start(10, 2000, 500), (1500, 1490));
        assert_eq!(backlog_start(0, 0, 500), (0, 0));
        // The log was trimmed or recreated below our position: restart at its end.
        assert_eq!(backlog_start(900, 20, 500), (20, 0));
    }

    #[test]
    fn status_news_ignores_the_clock() {
        let store = Store::open_in_memory().unwrap();
        let a = status::snapshot(&store, "d", "file:x", true).unwrap();
        let mut b = a.clone();
        b.time = "later".into();
        b.pending.oldest_age_s = Some(5);
        assert!(same_news(&a, &b));
        b.paused = !b.paused;
        assert!(!same_news(&a, &b));
    }
}
