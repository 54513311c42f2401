//! The fleet reporter: publishes the device's state, status snapshot and event log over
//! MQTT and applies operator commands from the dashboard (DESIGN.md, "MQTT contract").
//!
//! One task on the daemon's runtime ([`run`]), driving `rumqttc`'s [`AsyncClient`] and
//! [`EventLoop`]:
//! - The event loop is polled by one future that owns it and is never dropped mid-poll
//!   (`EventLoop::poll` is not cancel-safe: a write cut short would lose a packet the
//!   session counts as sent); it also waits out the reconnect backoff.
//! - Everything that touches the store (reading the event log and the snapshot, applying
//!   a command, recording the acknowledged event position) runs on the blocking pool with
//!   the reporter's state ([`Core`]) moved there and back, while the event loop keeps
//!   being polled. Acknowledgements only move counters and are applied on the task.
//! - It never blocks on the network: every publish is `try_publish` into `rumqttc`'s
//!   bounded request channel, and it publishes only while connected, so a slow or dead
//!   broker costs at most that channel's capacity in memory. What could not be sent stays
//!   in the store: the status is re-read when it is next due (never a backlog of stale
//!   snapshots), and events are re-read from the event log after the last one the broker
//!   acknowledged.
//!
//! It looks at the store when the queue changed (`queue_changed`), then once more a second
//! later while the store keeps changing (upload progress is written without a wake-up),
//! and when the status is due (debounce, heartbeat): an idle daemon's reporter wakes for
//! the heartbeat and the keep-alive only.
//!
//! Stop: from the shutdown token on it no longer (re)connects. While connected it goes on
//! reporting until the supervisor has joined every other part (`last_word`), then sends
//! the last events, a final status and `offline`, waits a bounded time for the broker to
//! acknowledge them and disconnects: `offline` is the daemon's final word.
//!
//! Invariant: uploads never wait for the reporter. It shares nothing with the uploader but
//! the SQLite file (WAL: its reads never block the writers; its writes are one-row commands
//! an operator asked for, and the acknowledged event position every few seconds).

use std::collections::VecDeque;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, ClientError, ConnectionError, Event, EventLoop, Outgoing, Packet, QoS};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::bus::{LoopBeat, ReloadMsg, ReloadSource};
use crate::commands;
use crate::device::{DeviceHealth, Sampler};
use crate::mqtt::{self, MqttConfig, MqttError, PayloadFormat, Topics};
use crate::status::{self, Snapshot};
use crate::store::{EventForm, EventKind, Store, StoreError};
use crate::util::{now_ms, rfc3339};

/// Requests `rumqttc` holds for the broker before `try_publish` reports it full. Bounds the
/// memory a slow or dead broker can cost (about one status snapshot, a batch of events and
/// a few command results).
const REQUEST_CAPACITY: usize = 64;

/// Broker messages waiting while the reporter's state is busy with the store. Past this the
/// event loop is not polled until they are handled (a command flood backs up into TCP).
const NET_CAPACITY: usize = 128;

/// When the request channel was full, publishing is tried again after this long.
const RETRY_FULL: Duration = Duration::from_millis(500);

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
    /// Re-read the configuration and its secret files.
    Reload,
    /// Remove one attachment everywhere (`{"id": "…"}`).
    Delete(String),
}

/// The payload of every command: all keys optional, unknown keys refused (a typo must not
/// silently do something else).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandArgs {
    request_id: Option<String>,
    /// `retry`, `delete`: the attachment.
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
        "reload" => no_target(Command::Reload),
        "retry" => match (args.id, args.failed) {
            (Some(id), None | Some(false)) if !id.is_empty() => Ok(Command::Retry(Some(id))),
            (None, Some(true)) => Ok(Command::Retry(None)),
            _ => Err(
                "`retry` expects {\"id\": \"<attachment id>\"} or {\"failed\": true}".to_string(),
            ),
        },
        "delete" => match (args.id, args.failed) {
            (Some(id), None) if !id.is_empty() => Ok(Command::Delete(id)),
            _ => Err("`delete` expects {\"id\": \"<attachment id>\"}".to_string()),
        },
        other => Err(format!(
            "unknown command `{other}` (expected sync, pause, resume, retry, delete or reload)"
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
        Command::Delete(id) => {
            commands::delete(store, id, "mqtt").map(|r| (commands::describe_delete(&r), None))
        }
        // Not a store command: handled by `Core::reload`.
        Command::Reload => Ok(("reload requested".into(), None)),
    }
}

/// How long `cmd/reload` waits for the reloader's answer before replying without it.
const RELOAD_ANSWER: Duration = Duration::from_secs(10);

/// New broker credentials from a reload, taken by the event loop before its next
/// connection attempt (a running connection keeps the ones it was opened with).
#[derive(Clone, Default)]
pub struct LoginSlot(std::sync::Arc<std::sync::Mutex<Option<(String, String)>>>);

impl LoginSlot {
    pub fn set(&self, user: String, password: String) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((user, password));
    }
    fn take(&self) -> Option<(String, String)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
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
    /// When [`StatusGate::due`] next says something (`now` if it already does).
    pub fn next_due(&self, now: Instant) -> Instant {
        match self.last_sent {
            None => now,
            Some(last) if self.changed => last + self.min_gap.min(self.heartbeat),
            Some(last) => last + self.heartbeat,
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

/// Two snapshots that differ only in their clock-driven fields (the time, ages, the
/// device sample) are the same news.
fn same_news(a: &Snapshot, b: &Snapshot) -> bool {
    let strip = |s: &Snapshot| {
        let mut s = s.clone();
        s.time = String::new();
        s.pending.oldest_age_s = None;
        s.device = DeviceHealth::default();
        s
    };
    strip(a) == strip(b)
}

/// What the event loop tells the reporter's state.
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

impl Net {
    /// Handling it reads or writes the store (so it runs on the blocking pool); the others
    /// only move counters.
    fn needs_store(&self) -> bool {
        matches!(self, Net::Connected | Net::Command { .. })
    }
}

/// A reporter ready to [`run`]: configuration checked, store opened, nothing connected yet.
pub struct Reporter {
    core: Core,
    eventloop: EventLoop,
    link: Link,
    login: LoginSlot,
}

impl Reporter {
    /// Fails only on configuration problems (unreadable password file or certificates) or
    /// when the store cannot be opened; an unreachable broker is retried once running.
    pub fn new(
        m: &MqttConfig,
        device_id: &str,
        db_path: &Path,
        remote: String,
    ) -> Result<Reporter, ReporterError> {
        let topics = Topics::new(m.prefix(device_id));
        let client_id = m.client_id.clone().unwrap_or_else(|| device_id.to_string());
        let opts = mqtt::options(m, &client_id, Some(mqtt::last_will(&topics)))?;
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
        let (client, eventloop) = AsyncClient::new(opts, REQUEST_CAPACITY);
        info!(broker = %m.endpoint(), prefix = %topics.prefix, client_id = %client_id,
              format = ?m.format, "mqtt reporting enabled");
        let core = Core {
            device_id: device_id.to_string(),
            remote,
            format: m.format,
            max_backlog: m.max_backlog_events as i64,
            gate: StatusGate::new(STATUS_MIN_GAP, m.heartbeat.0),
            topics,
            client,
            store,
            sampler: Sampler::own(),
            device: DeviceHealth::default(),
            connected: false,
            outstanding: VecDeque::new(),
            sent_seq: acked,
            acked_seq: acked,
            persisted_seq: acked,
            persisted_at: Instant::now(),
            data_version: 0,
            events_pending: true,
            look_at: None,
            hold_until: None,
            last_status: None,
            status_owed: false,
            closed: false,
            reload: None,
            assignments: None,
        };
        Ok(Reporter {
            core,
            eventloop,
            link: Link::new(m.endpoint()),
            login: LoginSlot::default(),
        })
    }

    /// Where a reload puts new broker credentials.
    pub fn login_slot(&self) -> LoginSlot {
        self.login.clone()
    }

    /// Where messages on `<prefix>/assignments` go (the assignments loop).
    pub fn set_assignments(&mut self, tx: tokio::sync::mpsc::UnboundedSender<Vec<u8>>) {
        self.core.assignments = Some(tx);
    }

    /// Where `cmd/reload` sends its request.
    pub fn set_reloader(&mut self, tx: tokio::sync::mpsc::UnboundedSender<ReloadMsg>) {
        self.core.reload = Some(tx);
    }
}

/// The event loop being polled, owned by the future that polls it: handed back with the
/// result, so a poll is never cut short.
type Polling = Pin<Box<dyn Future<Output = (EventLoop, Result<Event, ConnectionError>)> + Send>>;

/// Polls `el` once, after `backoff` (the reconnect delay after a failure). Credentials
/// a reload left in `login` are used from the next connection attempt.
fn poll_after(mut el: EventLoop, backoff: Duration, login: &LoginSlot) -> Polling {
    let login = login.clone();
    Box::pin(async move {
        if !backoff.is_zero() {
            tokio::time::sleep(backoff).await;
            // Publishes made before the loss was noticed would go out after the
            // reconnect, stale and out of step with the acknowledgement count: drop them
            // (the new session starts clean anyway).
            el.clean();
        }
        if let Some((user, password)) = login.take() {
            el.mqtt_options.set_credentials(user, password);
        }
        let r = el.poll().await;
        (el, r)
    })
}

/// Runs the reporter until the supervisor has joined every other part (`last_word` sent,
/// or its sender dropped), then says `offline` and disconnects. From `shutdown` on it does
/// not (re)connect, so a broker that is away never holds up a stop.
pub async fn run(
    r: Reporter,
    shutdown: CancellationToken,
    mut queue_changed: watch::Receiver<u64>,
    mut last_word: oneshot::Receiver<()>,
    beat: LoopBeat,
) {
    let Reporter {
        core,
        eventloop,
        mut link,
        login,
    } = r;
    // `None` while on the blocking pool with `job`.
    let mut core = Some(core);
    let mut job: Option<tokio::task::JoinHandle<Core>> = None;
    // Held while `job` runs: the watchdog's view of the store turn.
    let mut _busy = None;
    let mut polling = Some(poll_after(eventloop, Duration::ZERO, &login));
    // Broker news not yet applied to `core` (it was busy with the store).
    let mut inbox: VecDeque<Net> = VecDeque::new();
    let mut poked = false;
    let mut watching = true;
    let mut stopping = false;
    loop {
        if let Some(c) = core.as_mut() {
            if std::mem::take(&mut poked) {
                c.look_at = Some(Instant::now());
            }
            while inbox.front().is_some_and(|m| !m.needs_store()) {
                c.on_net(inbox.pop_front().expect("front"));
            }
            let now = Instant::now();
            if !inbox.is_empty() || c.next_due(now).is_some_and(|t| t <= now) {
                let mut c = core.take().expect("core");
                let news: Vec<Net> = inbox.drain(..).collect();
                _busy = Some(beat.busy());
                job = Some(tokio::task::spawn_blocking(move || {
                    for m in news {
                        c.on_net(m);
                    }
                    c.turn();
                    c
                }));
            }
        }
        let wake = core.as_ref().and_then(|c| c.next_due(Instant::now()));
        tokio::select! {
            (el, res) = async { polling.as_mut().expect("polling").await },
                if polling.is_some() && inbox.len() < NET_CAPACITY =>
            {
                let (news, backoff) = link.on_poll(res);
                let lost = matches!(news, Some(Net::Disconnected));
                inbox.extend(news);
                // Stopping: no reconnection.
                polling = (!(stopping && lost)).then(|| poll_after(el, backoff, &login));
            }
            c = async { job.as_mut().expect("job").await }, if job.is_some() => {
                job = None;
                _busy = None;
                core = Some(c.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())));
            }
            r = queue_changed.changed(), if watching => match r {
                Ok(()) => poked = true,
                Err(_) => watching = false,
            },
            _ = shutdown.cancelled(), if !stopping => {
                stopping = true;
                if !link.up {
                    // Connecting or waiting to: give up (the broker has nothing of ours to
                    // forget: the will was published, or we never got through).
                    polling = None;
                }
            }
            _ = &mut last_word => break,
            _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now).into()),
                if wake.is_some() && core.is_some() => {}
        }
    }

    // Every other part is joined: what the store says now is final.
    let core = match core {
        Some(c) => c,
        None => join(job.take().expect("job")).await,
    };
    let news: Vec<Net> = inbox.drain(..).collect();
    let mut core = join(tokio::task::spawn_blocking(move || {
        let mut c = core;
        for m in news {
            c.on_net(m);
        }
        c.farewell();
        c
    }))
    .await;
    if core.connected {
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        let mut bye = false;
        while let Some(p) = polling.as_mut() {
            if !bye && core.outstanding.is_empty() {
                if core.client.try_disconnect().is_err() {
                    break;
                }
                bye = true;
            }
            let Ok((el, res)) = tokio::time::timeout_at(deadline, p).await else {
                break;
            };
            match res {
                Ok(Event::Incoming(Packet::PubAck(_))) => core.on_net(Net::PubAck),
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    core.on_net(Net::Closed);
                    break;
                }
                // Commands after the stop are not applied.
                Ok(_) => {}
                Err(e) => {
                    debug!(error = %mqtt::describe(&e), "mqtt connection lost while stopping");
                    core.on_net(Net::Disconnected);
                    break;
                }
            }
            polling = Some(poll_after(el, Duration::ZERO, &login));
        }
        if bye {
            info!("mqtt: published offline and disconnected");
        } else {
            warn!("mqtt: broker did not acknowledge `offline` in time; it will publish `lost`");
        }
    }
    // Closes the socket.
    drop(polling);
    join(tokio::task::spawn_blocking(move || {
        core.persist_acked(true)
    }))
    .await;
}

/// Waits for a blocking job; a panic in it is re-raised here.
async fn join<T>(h: tokio::task::JoinHandle<T>) -> T {
    h.await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// The connection as the log sees it: says when it came and went (once per distinct
/// error, not on every retry) and computes the reconnect backoff.
struct Link {
    endpoint: String,
    /// A CONNACK was received and no error since.
    up: bool,
    failures: u32,
    last_error: String,
    was_connected: bool,
}

impl Link {
    fn new(endpoint: String) -> Link {
        Link {
            endpoint,
            up: false,
            failures: 0,
            last_error: String::new(),
            was_connected: false,
        }
    }

    /// What one poll means for the reporter's state, and how long to wait before polling
    /// again.
    fn on_poll(&mut self, res: Result<Event, ConnectionError>) -> (Option<Net>, Duration) {
        let news = match res {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if self.failures > 0 || self.was_connected {
                    info!(broker = %self.endpoint, "mqtt reconnected");
                } else {
                    info!(broker = %self.endpoint, "mqtt connected");
                }
                self.failures = 0;
                self.last_error.clear();
                self.was_connected = true;
                self.up = true;
                Net::Connected
            }
            Ok(Event::Incoming(Packet::Publish(p))) => Net::Command {
                topic: p.topic,
                payload: p.payload.to_vec(),
                retain: p.retain,
            },
            Ok(Event::Incoming(Packet::PubAck(_))) => Net::PubAck,
            Ok(Event::Outgoing(Outgoing::Disconnect)) => Net::Closed,
            Ok(_) => return (None, Duration::ZERO),
            Err(e) => {
                self.failures += 1;
                let why = mqtt::describe(&e);
                let delay = mqtt::reconnect_delay(self.failures, fastrand::f64());
                let endpoint = &self.endpoint;
                if why != self.last_error {
                    if self.up && self.failures == 1 {
                        warn!(broker = %endpoint, error = %why, "mqtt connection lost; reconnecting");
                    } else {
                        warn!(broker = %endpoint, error = %why, retry_in = ?delay, "mqtt cannot connect; will retry");
                    }
                    self.last_error = why;
                } else {
                    debug!(broker = %endpoint, error = %self.last_error, retry_in = ?delay, "mqtt cannot connect");
                }
                self.up = false;
                return (Some(Net::Disconnected), delay);
            }
        };
        (Some(news), Duration::ZERO)
    }
}

/// The reporter's state and its store connection. Moved to the blocking pool for
/// everything that touches the store ([`Core::turn`], connecting, commands).
struct Core {
    device_id: String,
    remote: String,
    format: PayloadFormat,
    max_backlog: i64,
    gate: StatusGate,
    topics: Topics,
    client: AsyncClient,
    store: Store,
    sampler: Sampler,
    /// The device sample in the status, refreshed at the heartbeat.
    device: DeviceHealth,
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
    /// When to look at the store next: the queue changed, or was still changing.
    look_at: Option<Instant>,
    /// Nothing is tried before this: the request channel was full, or the store failed.
    hold_until: Option<Instant>,
    last_status: Option<Snapshot>,
    /// Connected, and the session's first status not yet handed to the client: events
    /// wait for it.
    status_owed: bool,
    /// Our DISCONNECT went out (a clean stop).
    closed: bool,
    /// Where `cmd/reload` goes (the daemon's reloader).
    reload: Option<tokio::sync::mpsc::UnboundedSender<ReloadMsg>>,
    /// Where assignment documents go (`crate::assignments`); `None`: not subscribed.
    assignments: Option<tokio::sync::mpsc::UnboundedSender<Vec<u8>>>,
}

impl Core {
    /// When [`Core::turn`] is next due; `None`: not before something happens.
    fn next_due(&self, now: Instant) -> Option<Instant> {
        let persist =
            (self.acked_seq != self.persisted_seq).then(|| self.persisted_at + PERSIST_EVERY);
        let report = self.connected.then(|| {
            let t = self
                .look_at
                .map_or(self.gate.next_due(now), |l| l.min(self.gate.next_due(now)));
            self.hold_until.map_or(t, |h| t.max(h))
        });
        [persist, report].into_iter().flatten().min()
    }

    /// The periodic store work: the event log, the status, the acknowledged position.
    fn turn(&mut self) {
        if let Err(e) = self.tick() {
            warn!(error = %e, "mqtt reporter cannot read the queue; will retry");
            self.hold_until = Some(Instant::now() + RETRY_FULL);
        }
        self.persist_acked(false);
    }

    fn on_net(&mut self, msg: Net) {
        match msg {
            Net::Connected => {
                self.connected = true;
                self.outstanding.clear();
                self.hold_until = None;
                if let Err(e) = self.on_connect() {
                    warn!(error = %e, "mqtt reporter cannot read the queue; will retry");
                    self.hold_until = Some(Instant::now() + RETRY_FULL);
                }
            }
            Net::Disconnected => {
                self.connected = false;
                // Whatever was not acknowledged is gone with the session (clean session):
                // events are sent again from the last acknowledged one.
                self.outstanding.clear();
                self.sent_seq = self.acked_seq;
            }
            Net::Command { topic, payload, .. } if topic == self.topics.assignments() => {
                if let Some(tx) = &self.assignments {
                    let _ = tx.send(payload);
                }
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
        if self.assignments.is_some() {
            if let Err(e) = self
                .client
                .try_subscribe(self.topics.assignments(), QoS::AtLeastOnce)
            {
                warn!(error = %e, "mqtt: cannot subscribe to assignments");
            }
        }
        self.publish(
            self.topics.state(),
            true,
            mqtt::STATE_ONLINE.as_bytes().to_vec(),
            None,
        );
        self.gate.reset();
        self.status_owed = true;
        self.events_pending = true;
        self.tick()
    }

    fn tick(&mut self) -> Result<(), StoreError> {
        if !self.connected {
            self.look_at = None;
            return Ok(());
        }
        let now = Instant::now();
        if self.hold_until.is_some_and(|h| now < h) {
            return Ok(());
        }
        self.hold_until = None;
        self.look_at = None;
        let dv = self.store.data_version()?;
        if dv != self.data_version {
            self.data_version = dv;
            self.gate.changed();
            self.events_pending = true;
            // Still changing, perhaps (upload progress, a report written after the
            // wake-up): look again once the status may be published again.
            self.look_at = Some(now + STATUS_MIN_GAP);
        }
        if self.status_owed {
            // A new session: `online` went first, then the current status, and only then
            // the events the broker missed (README "MQTT"). Until that status is handed to
            // the client (the channel may be full) no event goes out.
            self.report_status(now)?;
            if self.status_owed {
                return Ok(());
            }
        }
        self.pump_events()?;
        self.report_status(now)
    }

    /// Publishes the status snapshot if the gate says it is due (and it is news, or the
    /// heartbeat).
    fn report_status(&mut self, now: Instant) -> Result<(), StoreError> {
        let Some(heartbeat) = self.gate.due(now) else {
            return Ok(());
        };
        if heartbeat || self.last_status.is_none() {
            self.device = self.sampler.sample();
        }
        let snap = status::snapshot_with(
            &self.store,
            &self.device_id,
            &self.remote,
            true,
            self.device.clone(),
        )?;
        let news = self
            .last_status
            .as_ref()
            .is_none_or(|prev| !same_news(prev, &snap));
        if heartbeat || news {
            let payload = mqtt::encode(self.format, &snap);
            if self.publish(self.topics.status(), true, payload, None) {
                self.gate.sent(Instant::now());
                self.last_status = Some(snap);
                self.status_owed = false;
            }
        } else {
            self.gate.unchanged();
        }
        Ok(())
    }

    /// Hands events after `sent_seq` to the client, oldest first, until the log is
    /// exhausted or the client's channel is full (the rest go on a later turn).
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
        if full_batch {
            // More of a backlog: the next batch on the next turn, at once.
            self.look_at = Some(Instant::now());
        }
        Ok(())
    }

    /// `cmd/reload`: asks the reloader and waits (blocking: this runs on the blocking
    /// pool) for what it did, or the one-line error that refused the new config.
    fn reload(&mut self) -> Result<String, String> {
        let Some(tx) = &self.reload else {
            return Err("reload is not available in this process".into());
        };
        let (reply, answer) = std::sync::mpsc::channel();
        tx.send(ReloadMsg::Reload {
            source: ReloadSource::Mqtt,
            reply: Some(reply),
        })
        .map_err(|_| "the daemon is stopping".to_string())?;
        answer
            .recv_timeout(RELOAD_ANSWER)
            .map_err(|_| "no answer from the reloader in time".to_string())?
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
            parsed.and_then(|cmd| match cmd {
                Command::Reload => self.reload().map(|m| (m, None)),
                cmd => apply(&mut self.store, &cmd).map_err(|e| e.to_string()),
            })
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
        self.look_at = Some(Instant::now());
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
            Err(e) => {
                if matches!(e, ClientError::TryRequest(_)) {
                    debug!("mqtt: request channel full; will publish later");
                } else {
                    debug!(error = %e, "mqtt: cannot publish");
                }
                self.hold_until = Some(Instant::now() + RETRY_FULL);
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

    /// The last word, once every other part has stopped: the last events, a final status
    /// (as `fieldsync status` shows a stopped daemon) and `offline`. The caller then waits
    /// for the broker to acknowledge them and disconnects, so the broker never mistakes the
    /// stop for a loss and publishes the will.
    fn farewell(&mut self) {
        if !self.connected {
            return;
        }
        self.hold_until = None;
        let _ = self.tick();
        self.hold_until = None;
        let _ = self.pump_events();
        self.device = self.sampler.sample();
        if let Ok(snap) = status::snapshot_with(
            &self.store,
            &self.device_id,
            &self.remote,
            false,
            self.device.clone(),
        ) {
            let payload = mqtt::encode(self.format, &snap);
            self.publish(self.topics.status(), true, payload, None);
        }
        self.publish(
            self.topics.state(),
            true,
            mqtt::STATE_OFFLINE.as_bytes().to_vec(),
            None,
        );
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
        assert_eq!(parse_command("reload", b"").1, Ok(Command::Reload));
        assert!(parse_command("reload", br#"{"id":"a"}"#).1.is_err());
        let (rid, c) = parse_command("retry", br#"{"id":"abc","request_id":"r1"}"#);
        assert_eq!(rid.as_deref(), Some("r1"));
        assert_eq!(c, Ok(Command::Retry(Some("abc".into()))));
        assert_eq!(
            parse_command("retry", br#"{"failed":true}"#).1,
            Ok(Command::Retry(None))
        );
        let (rid, c) = parse_command("delete", br#"{"id":"abc","request_id":"d1"}"#);
        assert_eq!(rid.as_deref(), Some("d1"));
        assert_eq!(c, Ok(Command::Delete("abc".into())));
        for (name, payload) in [
            ("retry", &b""[..]),
            ("retry", br#"{"failed":false}"#),
            ("retry", br#"{"id":"a","failed":true}"#),
            ("pause", b"\xff\xfe garbage"),
            ("pause", br#"{"colour":1}"#),
            ("pause", br#"{"id":"a"}"#),
            ("pause", b"{not json"),
            ("delete", b""),
            ("delete", br#"{"id":""}"#),
            ("delete", br#"{"failed":true}"#),
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
        assert_eq!(g.next_due(t0 + s(5)), t0 + s(61), "next: the heartbeat");
        g.changed();
        assert_eq!(
            g.next_due(t0 + s(5)),
            t0 + s(2),
            "next: a change, debounced"
        );
        g.reset();
        assert_eq!(g.due(t0 + s(62)), Some(true), "after reconnect");
        assert_eq!(g.next_due(t0 + s(62)), t0 + s(62));
    }

    #[test]
    fn backlog_is_bounded_to_the_most_recent() {
        assert_eq!(backlog_start(10, 20, 500), (10, 0));
        assert_eq!(backlog_start(10, 2000, 500), (1500, 1490));
        assert_eq!(backlog_start(0, 0, 500), (0, 0));
        // The log was trimmed or recreated below our position: restart at its end.
        assert_eq!(backlog_start(900, 20, 500), (20, 0));
    }

    /// A core and its event loop (kept, never polled: the request channel fills up).
    fn core() -> (Core, EventLoop) {
        let (client, eventloop) =
            AsyncClient::new(rumqttc::MqttOptions::new("t", "localhost", 1883), 8);
        let core = Core {
            device_id: "d".into(),
            remote: "file:x".into(),
            format: PayloadFormat::Json,
            max_backlog: 500,
            gate: StatusGate::new(STATUS_MIN_GAP, Duration::from_secs(60)),
            topics: Topics::new("fieldsync/d"),
            client,
            store: Store::open_in_memory().unwrap(),
            sampler: Sampler::new(None),
            device: DeviceHealth::default(),
            connected: false,
            outstanding: VecDeque::new(),
            sent_seq: 0,
            acked_seq: 0,
            persisted_seq: 0,
            persisted_at: Instant::now(),
            data_version: 0,
            events_pending: false,
            look_at: None,
            hold_until: None,
            last_status: None,
            status_owed: false,
            closed: false,
            reload: None,
            assignments: None,
        };
        (core, eventloop)
    }

    #[test]
    fn the_next_turn_is_never_a_busy_loop() {
        let (mut c, _el) = core();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(c.next_due(t0), None, "disconnected, nothing to record");
        c.acked_seq = 3;
        assert_eq!(c.next_due(t0), Some(c.persisted_at + PERSIST_EVERY));
        c.acked_seq = 0;
        c.connected = true;
        assert_eq!(c.next_due(t0), Some(t0), "first status at once");
        c.gate.sent(t0);
        c.gate.unchanged();
        assert_eq!(c.next_due(t0), Some(t0 + s(60)), "idle: the heartbeat only");
        c.look_at = Some(t0 + s(1));
        assert_eq!(c.next_due(t0), Some(t0 + s(1)), "a change to look at");
        // The request channel was full: nothing before the hold ends.
        c.hold_until = Some(t0 + s(2));
        assert_eq!(c.next_due(t0), Some(t0 + s(2)));
    }

    #[test]
    fn a_full_request_channel_holds_publishing_and_moves_the_deadline() {
        let (mut c, _el) = core();
        c.connected = true;
        // Capacity 8 and nobody drains it (no event loop runs).
        for _ in 0..8 {
            assert!(c.publish("x".into(), false, vec![], None));
        }
        assert!(!c.publish("x".into(), false, vec![], None));
        let held = c.hold_until.expect("held");
        assert!(c.next_due(Instant::now()).is_some_and(|t| t >= held));
        // Once the hold is over, a turn that still cannot publish the due status holds
        // again: the next turn is never due at once.
        c.hold_until = Some(Instant::now());
        c.turn();
        let now = Instant::now();
        assert!(
            c.next_due(now).is_some_and(|t| t > now),
            "{:?}",
            c.hold_until
        );
        assert!(c.last_status.is_none());
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
