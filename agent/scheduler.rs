//! The scheduler: decides what uploads when.
//!
//! It evaluates the conditions, hands due attachments (oldest or newest first) to the
//! upload workers ([`crate::uploader`]), and waits until a wake-up (new file, finished
//! upload, condition change, CLI command via the wake file, shutdown), the next due retry,
//! or the control poll. The scheduler keeps no queue state a crash could lose: only which
//! ids are held right now.
//!
//! The decisions live in [`SchedState`], a plain struct whose methods take "now" and are
//! unit-tested without threads or sleeps. [`run`] is the thin async driver: each turn it
//! runs one [`Core::step`] (SQLite work) in `spawn_blocking`, then awaits a message, the
//! computed wait, or the shutdown token.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tracing::{debug, info, warn};

use crate::bus::{Done, Loop, SchedMsg, Shared};
use crate::conditions::governor::{Governor, Ticket};
use crate::conditions::{self, Facts, Reason};
use crate::config::{Order, Upload};
use crate::remote::{ErrorClass, Remote, RemoteError};
use crate::store::{Attachment, Store, StoreError};
use crate::util::now_ms;

/// How often the scheduler looks at `PRAGMA data_version` for changes made by other
/// processes. CLI commands also touch the wake file (inotify), which takes effect at once;
/// this poll is the backstop, kept rare because every wake-up costs CPU on an idle device.
pub const CONTROL_POLL: Duration = Duration::from_secs(5);

/// How long a row whose outcome could not be recorded is held back.
pub const STORE_COOLDOWN: Duration = Duration::from_secs(10);

/// How soon the scheduler looks again after its own write failed on a full disk.
const DISK_FULL_RETRY: Duration = Duration::from_secs(1);

/// With files deferred for a per-file reason, the queue is re-read at most this often
/// unless something changed: the same files would be refused again.
pub const DEFERRED_RECHECK: Duration = Duration::from_secs(2);

/// While the remote refuses the device clock (`clock_skew`), how often to ask it again.
/// Short, because NTP fixes the clock by itself soon after boot and uploads should follow;
/// one HEAD request per interval costs next to nothing.
pub const CLOCK_RECHECK: Duration = Duration::from_secs(15);

/// A wall clock that moved this much more (or less) than the monotonic clock between two
/// steps was set (NTP synced, an operator ran `date`): re-check a refused clock at once.
pub const CLOCK_JUMP: Duration = Duration::from_secs(30);

/// The event log is trimmed this often.
pub const TRIM_EVERY: Duration = Duration::from_secs(3600);

/// Retry delay for the `attempt`-th failure (1-based): exponential from `initial`, capped
/// at `max`, with jitter. `jitter` is a uniform sample in [0, 1).
///
/// DESIGN.md asks for "full jitter" (uniform in [0, d]); we use "equal jitter" (uniform in
/// [d/2, d]) so a delay is never near zero: full jitter lets a failing server be hit again
/// immediately, which on a metered link costs money for nothing.
pub fn backoff(attempt: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = initial
        .checked_mul(1u32 << attempt.saturating_sub(1).min(20))
        .unwrap_or(max)
        .min(max);
    exp / 2 + exp.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
}

/// What the scheduler decides for a failed attempt: retry later, or give up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    RetryIn(Duration),
    GiveUp,
}

/// The retry decision for an error class after `attempts` attempts (pure; unit-tested).
pub fn verdict(cfg: &Upload, class: &ErrorClass, attempts: u32, jitter: f64) -> Verdict {
    let delay = backoff(attempts, cfg.initial_backoff.0, cfg.max_backoff.0, jitter);
    match class {
        ErrorClass::Permanent if attempts >= cfg.permanent_attempts => Verdict::GiveUp,
        ErrorClass::Transient { .. }
            if cfg.transient_attempts > 0 && attempts >= cfg.transient_attempts =>
        {
            Verdict::GiveUp
        }
        ErrorClass::Transient {
            retry_after: Some(ra),
        } => Verdict::RetryIn(delay.max(*ra)),
        _ => Verdict::RetryIn(delay),
    }
}

/// Applies [`verdict`] to a transfer that failed (`what`: upload, download, delete): the
/// row is scheduled for a retry, or, once the verdict gives up, marked `failed` with the
/// error, with its event. One writer for every direction, so they count attempts alike.
pub fn record_failure(
    store: &mut Store,
    cfg: &Upload,
    att: &Attachment,
    class: &ErrorClass,
    e: &RemoteError,
    what: &str,
) -> Result<(), StoreError> {
    use crate::store::{Change, EventKind, State};
    let attempts = att.attempts as u32 + 1;
    match verdict(cfg, class, attempts, fastrand::f64()) {
        Verdict::RetryIn(d) => {
            warn!(id = %att.id, attempt = attempts, retry_in = ?d, error = %e, "{what} failed; will retry");
            store.with_room(|s| {
                s.schedule_retry(
                    &att.id,
                    now_ms() + d.as_millis() as i64,
                    &e.code,
                    &e.message,
                )
            })?;
        }
        Verdict::GiveUp => {
            warn!(id = %att.id, attempts, error = %e, "{what} failed; giving up");
            store.schedule_retry(&att.id, 0, &e.code, &e.message)?;
            store.transition(
                &att.id,
                State::Failed,
                Change {
                    error: Some((&e.code, &e.message)),
                    ..Change::of(EventKind::Failed)
                },
            )?;
        }
    }
    Ok(())
}

/// Routine work that falls due on the sync interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Housekeeping {
    pub abort_abandoned: bool,
    pub trim_events: bool,
}

/// The scheduler's decision state. Every method takes "now"; nothing here does I/O.
#[derive(Debug, Clone)]
pub struct SchedState {
    slots: usize,
    sync_interval: Duration,
    auth_recheck: Duration,
    /// Attachments a worker holds.
    inflight: HashSet<String>,
    /// Rows whose outcome could not be written, held back until the instant given.
    cooldown: HashMap<String, Instant>,
    /// Files that may not start now (metered budget or size, charging required), with
    /// why; forgotten whenever the governor's facts or reservations change.
    deferred: HashMap<String, Reason>,
    deferred_gen: u64,
    /// Something changed since the queue was last read.
    recheck: bool,
    last_recheck: Instant,
    last_sync: Instant,
    last_trim: Instant,
    last_auth_check: Instant,
    /// A credentials re-check is running.
    auth_probing: bool,
    /// New credentials arrived: re-check at once rather than after `auth_recheck`.
    auth_recheck_now: bool,
    last_clock_check: Instant,
    /// A device-clock re-check is running.
    clock_probing: bool,
    /// The wall clock (epoch ms) at an instant, to notice when the clock is set.
    wall_anchor: (Instant, i64),
}

impl SchedState {
    pub fn new(
        slots: usize,
        sync_interval: Duration,
        auth_recheck: Duration,
        generation: u64,
        now: Instant,
    ) -> Self {
        SchedState {
            slots,
            sync_interval,
            auth_recheck,
            inflight: HashSet::new(),
            cooldown: HashMap::new(),
            deferred: HashMap::new(),
            deferred_gen: generation,
            recheck: true,
            last_recheck: now,
            last_sync: now,
            last_trim: now,
            last_auth_check: now,
            auth_probing: false,
            auth_recheck_now: false,
            last_clock_check: now,
            clock_probing: false,
            wall_anchor: (now, i64::MIN),
        }
    }

    /// Applies a message. `facts.auth_failed` is the scheduler's own fact.
    pub fn on_msg(&mut self, msg: SchedMsg, facts: &mut Facts, now: Instant) {
        self.recheck = true;
        match msg {
            SchedMsg::Wake => {}
            SchedMsg::Done { id, outcome } => {
                self.inflight.remove(&id);
                if outcome == Done::StoreFailed {
                    self.cooldown.insert(id, now + STORE_COOLDOWN);
                }
                if outcome == Done::AuthFailed && !facts.auth_failed {
                    warn!("remote refused the credentials; uploads paused (reason auth)");
                    facts.auth_failed = true;
                    self.last_auth_check = now;
                }
                if outcome == Done::ClockSkewed && !facts.clock_skewed {
                    warn!(
                        "remote refused the device clock; uploads wait for it (reason clock_skew)"
                    );
                    facts.clock_skewed = true;
                    self.last_clock_check = now;
                }
            }
            SchedMsg::ClockProbe { ok } => {
                self.clock_probing = false;
                if ok && facts.clock_skewed {
                    info!("remote accepts the device clock again; resuming");
                    facts.clock_skewed = false;
                }
            }
            SchedMsg::CredentialsChanged => self.auth_recheck_now = facts.auth_failed,
            SchedMsg::AuthProbe { ok } => {
                self.auth_probing = false;
                if ok && facts.auth_failed {
                    info!("remote accepts the credentials again; resuming");
                    facts.auth_failed = false;
                }
            }
        }
    }

    /// Another process changed the database (a CLI command).
    pub fn data_changed(&mut self) {
        self.recheck = true;
    }

    /// The governor's generation: when it moved, files deferred before may go now.
    pub fn governor_generation(&mut self, generation: u64) {
        if generation != self.deferred_gen {
            self.deferred_gen = generation;
            self.deferred.clear();
            self.recheck = true;
        }
    }

    /// Whether to re-check the credentials now (paused for `auth`, none running, and
    /// `auth_recheck` since the last). Marks the check as running.
    pub fn auth_probe_due(&mut self, facts: &Facts, now: Instant) -> bool {
        if facts.auth_failed
            && !self.auth_probing
            && (self.auth_recheck_now
                || now.duration_since(self.last_auth_check) >= self.auth_recheck)
        {
            self.auth_probing = true;
            self.auth_recheck_now = false;
            self.last_auth_check = now;
            return true;
        }
        false
    }

    /// Whether to ask the remote again whether it accepts the device clock: paused for
    /// `clock_skew`, none running, and [`CLOCK_RECHECK`] since the last check or the wall
    /// clock `wall_ms` (epoch ms) was set since the last step. Marks the check as running.
    pub fn clock_probe_due(&mut self, facts: &Facts, now: Instant, wall_ms: i64) -> bool {
        let (at, wall) = std::mem::replace(&mut self.wall_anchor, (now, wall_ms));
        let jumped = wall != i64::MIN && {
            let mono = now.duration_since(at).as_millis() as i64;
            (wall_ms.saturating_sub(wall) - mono).unsigned_abs() > CLOCK_JUMP.as_millis() as u64
        };
        if facts.clock_skewed
            && !self.clock_probing
            && (jumped || now.duration_since(self.last_clock_check) >= CLOCK_RECHECK)
        {
            self.clock_probing = true;
            self.last_clock_check = now;
            return true;
        }
        false
    }

    /// Whether to read the queue for work now. With files deferred, only when something
    /// changed or every [`DEFERRED_RECHECK`]. Consumes the pending recheck.
    pub fn wants_fill(
        &mut self,
        reason: Option<Reason>,
        shutting_down: bool,
        now: Instant,
    ) -> bool {
        if reason.is_some() || shutting_down || self.free_slots() == 0 {
            return false;
        }
        if !(self.recheck
            || self.deferred.is_empty()
            || now.duration_since(self.last_recheck) >= DEFERRED_RECHECK)
        {
            return false;
        }
        self.recheck = false;
        self.last_recheck = now;
        self.cooldown.retain(|_, until| *until > now);
        true
    }

    pub fn free_slots(&self) -> usize {
        self.slots.saturating_sub(self.inflight.len())
    }

    /// Ids the queue query must skip: running, deferred, or cooling down.
    pub fn held(&self) -> Vec<String> {
        self.inflight
            .iter()
            .chain(self.deferred.keys())
            .chain(self.cooldown.keys())
            .cloned()
            .collect()
    }

    pub fn dispatched(&mut self, id: &str) {
        self.inflight.insert(id.to_string());
    }

    pub fn defer(&mut self, id: &str, why: Reason) {
        self.deferred.insert(id.to_string(), why);
    }

    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// The ids a worker holds now.
    pub fn running(&self) -> Vec<String> {
        self.inflight.iter().cloned().collect()
    }

    /// Deferred files counted by reason (status shows it).
    pub fn deferred_by(&self) -> BTreeMap<Reason, usize> {
        let mut by = BTreeMap::new();
        for r in self.deferred.values() {
            *by.entry(*r).or_default() += 1;
        }
        by
    }

    /// The reason shown as `pause_reason`: the condition that pauses uploads, or, when
    /// nothing runs and every waiting file is held back by a per-file reason, that one.
    pub fn shown_reason(&self, reason: Option<Reason>) -> Option<Reason> {
        reason.or_else(|| {
            self.inflight
                .is_empty()
                .then(|| self.deferred_by().keys().next().copied())
                .flatten()
        })
    }

    /// Routine work due now (every `sync_interval`; the event log trim hourly).
    pub fn housekeeping(&mut self, now: Instant) -> Housekeeping {
        let mut h = Housekeeping::default();
        if now.duration_since(self.last_sync) >= self.sync_interval {
            self.last_sync = now;
            h.abort_abandoned = true;
            if now.duration_since(self.last_trim) >= TRIM_EVERY {
                self.last_trim = now;
                h.trim_events = true;
            }
        }
        h
    }

    /// Whether the next due retry matters for how long to wait: only when uploads may run
    /// and a slot is free (otherwise a message will come first).
    pub fn waits_for_due(&self, reason: Option<Reason>) -> bool {
        reason.is_none() && self.deferred.is_empty() && self.free_slots() > 0
    }

    /// How long to wait for a message before looking again. `next_due_ms`: when the next
    /// retry falls due (epoch ms), if [`Self::waits_for_due`].
    pub fn next_wake(&self, next_due_ms: Option<i64>, now_ms: i64) -> Duration {
        let mut wait = CONTROL_POLL;
        if let Some(due) = next_due_ms {
            wait = wait.min(Duration::from_millis((due - now_ms).max(0) as u64));
        }
        if wait.is_zero() && !self.cooldown.is_empty() {
            // What is due is held back: don't spin until it may go again.
            wait = CONTROL_POLL;
        }
        wait
    }
}

/// What one step decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Wait this long for a message, then step again; `probe_auth`: re-check the
    /// credentials meanwhile; `probe_clock`: whether the remote accepts the clock now.
    Wait {
        wait: Duration,
        probe_auth: bool,
        probe_clock: bool,
    },
    /// Stop: shutting down with nothing in flight, or idle with `until_idle`.
    Exit,
}

/// What the scheduler owns: its store connection, the decision state and the job queue
/// to the workers. Moved into `spawn_blocking` for each step and back.
pub struct Core {
    pub store: Store,
    pub state: SchedState,
    pub facts: Facts,
    pub gov: Arc<Governor>,
    pub remote: Arc<dyn Remote>,
    pub shared: Arc<Shared>,
    pub jobs: mpsc::Sender<(Attachment, Ticket)>,
    pub newest_first: bool,
    /// Exit once nothing is pending (the demo and benchmarks).
    pub until_idle: bool,
    data_version: i64,
}

impl Core {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        upload: &Upload,
        gov: Arc<Governor>,
        remote: Arc<dyn Remote>,
        shared: Arc<Shared>,
        jobs: mpsc::Sender<(Attachment, Ticket)>,
        until_idle: bool,
    ) -> Result<Core, StoreError> {
        let facts = Facts {
            operator_paused: store.operator_paused()?,
            ..Facts::default()
        };
        let data_version = store.data_version()?;
        Ok(Core {
            state: SchedState::new(
                upload.concurrency as usize,
                upload.sync_interval.0,
                upload.auth_recheck.0,
                gov.generation(),
                Instant::now(),
            ),
            store,
            facts,
            gov,
            remote,
            shared,
            jobs,
            newest_first: upload.order == Order::NewestFirst,
            until_idle,
            data_version,
        })
    }

    /// One turn of the scheduler (blocking: SQLite).
    pub fn step(&mut self, shutting_down: bool) -> Result<Step, StoreError> {
        let now = Instant::now();
        if shutting_down && self.state.inflight() == 0 {
            return Ok(Step::Exit);
        }
        // CLI changes (pause, resume, retry, sync) arrive through the database.
        let dv = self.store.data_version()?;
        if dv != self.data_version {
            self.data_version = dv;
            self.state.data_changed();
            self.facts.operator_paused = self.store.operator_paused()?;
        }
        self.gov.observe(&mut self.facts);
        let reason = conditions::evaluate(&self.facts, &self.gov.policy());
        self.shared.gate_open.store(
            !reason.is_some_and(|r| r.stops_running()),
            Ordering::Relaxed,
        );
        self.state.governor_generation(self.gov.generation());
        let probe_auth = self.state.auth_probe_due(&self.facts, now);
        let probe_clock = self.state.clock_probe_due(&self.facts, now, now_ms());

        self.cancel_deleted_uploads()?;
        if self.state.wants_fill(reason, shutting_down, now) {
            // Deletes first: few, asked for by a person, and they move no bytes.
            self.fill_deletes()?;
            self.fill()?;
        }
        let shown = self.state.shown_reason(reason);
        if let Err(e) = self
            .gov
            .publish(&self.store, &self.facts, shown, &self.state.deferred_by())
        {
            // Status lags, uploads do not: the next step writes it again.
            warn!(error = %e, "cannot publish the conditions to status");
        }
        let h = self.state.housekeeping(now);
        if h.abort_abandoned {
            self.abort_abandoned();
        }
        if h.trim_events {
            let _ = self.store.trim_events();
        }
        if self.until_idle
            && self.state.inflight() == 0
            && self.shared.ingest_idle.load(Ordering::Relaxed)
            && self.store.oldest_pending()?.is_none()
            && !self.store.downloads_pending()?
        {
            return Ok(Step::Exit);
        }
        let next_due = if self.state.waits_for_due(reason) {
            let uploads = self.store.next_due_at()?;
            let deletes = self.store.next_delete_due_at()?;
            uploads.into_iter().chain(deletes).min()
        } else {
            None
        };
        Ok(Step::Wait {
            wait: self.state.next_wake(next_due, now_ms()),
            probe_auth,
            probe_clock,
        })
    }

    /// Hands due attachments to free workers, as the governor admits them.
    fn fill(&mut self) -> Result<(), StoreError> {
        while self.state.free_slots() > 0 {
            let held = self.state.held();
            let due = self.store.due_uploads(
                now_ms(),
                self.state.free_slots(),
                self.newest_first,
                &held,
            )?;
            if due.is_empty() {
                break;
            }
            for att in due {
                match self.gov.admit(&self.facts, &att) {
                    Ok(ticket) => {
                        self.state.dispatched(&att.id);
                        // Only a marker for status: a full disk must not stop the upload.
                        if let Err(e) = self.store.set_uploading(&att.id, true) {
                            debug!(id = %att.id, error = %e, "cannot mark the upload in progress");
                        }
                        let _ = self.jobs.send((att, ticket));
                    }
                    Err(why) => {
                        debug!(id = %att.id, reason = why.as_str(), "upload deferred");
                        self.state.defer(&att.id, why);
                    }
                }
            }
        }
        Ok(())
    }

    /// Aborts multipart uploads whose attachment will never complete them.
    fn abort_abandoned(&mut self) {
        let Ok(list) = self.store.abandoned_multiparts() else {
            return;
        };
        for a in list {
            if let Some(uid) = &a.upload_id {
                match self.remote.abort_upload(&a.object_key, uid) {
                    Ok(()) => {
                        let _ = self.store.clear_multipart(&a.id);
                        info!(id = %a.id, "aborted abandoned multipart upload");
                    }
                    Err(e) => debug!(id = %a.id, error = %e, "cannot abort multipart upload yet"),
                }
            }
        }
    }
}

/// Drives the scheduler until shutdown (or idle, with `until_idle`), then stops the
/// workers (they stop at their next safe point once `shared.shutdown` is cancelled), joins
/// them and persists the budget. `tx` is a sender of `rx`, for the credentials re-check.
pub async fn run(
    core: Core,
    workers: Vec<JoinHandle<()>>,
    mut rx: UnboundedReceiver<SchedMsg>,
    tx: UnboundedSender<SchedMsg>,
) -> Result<(), StoreError> {
    let shutdown = core.shared.shutdown.clone();
    let beat = core.shared.liveness.handle(Loop::Scheduler);
    let mut core = Some(core);
    let result = loop {
        let shutting_down = shutdown.is_cancelled();
        let mut c = core.take().expect("scheduler core");
        let turn = beat.busy();
        let (mut c, step) = blocking(move || {
            let step = c.step(shutting_down);
            (c, step)
        })
        .await;
        drop(turn);
        let step = match step {
            Ok(s) => s,
            // A full state disk: SQLite rolled the write back; nothing is lost, and the
            // uploads already running go on. Free the reserve and look again shortly.
            Err(e) if crate::store::is_disk_full(&e) => {
                warn!(error = %e, "state disk full; retrying");
                if let Some(dir) = c.store.state_dir() {
                    crate::store::release_reserve(dir);
                }
                Step::Wait {
                    wait: DISK_FULL_RETRY,
                    probe_auth: false,
                    probe_clock: false,
                }
            }
            Err(e) => {
                core = Some(c);
                break Err(e);
            }
        };
        let Step::Wait {
            wait,
            probe_auth,
            probe_clock,
        } = step
        else {
            core = Some(c);
            break Ok(());
        };
        if probe_auth {
            let remote = c.remote.clone();
            let tx = tx.clone();
            tokio::task::spawn_blocking(move || {
                // A rotated credentials or token file is picked up here too.
                if let Err(e) = remote.reload_credentials(None) {
                    warn!(error = %e, "cannot re-read the credentials");
                }
                let ok = !matches!(
                    remote.probe(),
                    Err(RemoteError {
                        class: ErrorClass::Auth,
                        ..
                    })
                );
                let _ = tx.send(SchedMsg::AuthProbe { ok });
            });
        }
        if probe_clock {
            let remote = c.remote.clone();
            let tx = tx.clone();
            tokio::task::spawn_blocking(move || {
                let ok = !matches!(
                    remote.probe(),
                    Err(RemoteError {
                        class: ErrorClass::ClockSkew,
                        ..
                    })
                );
                let _ = tx.send(SchedMsg::ClockProbe { ok });
            });
        }
        tokio::select! {
            msg = rx.recv() => {
                let now = Instant::now();
                for m in msg.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                    if let SchedMsg::Done { id, .. } = &m {
                        // The worker let go: a cancel of its upload has done its job.
                        c.shared.cancel(id, false);
                    }
                    c.state.on_msg(m, &mut c.facts, now);
                }
                // An outcome was recorded, a command or a condition changed: the publisher
                // and the reporter look now.
                c.shared.poke();
            }
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled(), if !shutting_down => {}
        }
        core = Some(c);
    };
    // Stop and join the workers, then persist what the governor counted.
    let c = core.expect("scheduler core");
    blocking(move || {
        let Core {
            jobs, gov, store, ..
        } = c;
        drop(jobs);
        for w in workers {
            let _ = w.join();
        }
        gov.finish(&store);
    })
    .await;
    result
}

/// Runs blocking work off the reactor and waits for it. A panic in it is re-raised.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    #[test]
    fn backoff_grows_caps_and_never_hits_zero() {
        let i = Duration::from_secs(5);
        let m = Duration::from_secs(300);
        assert_eq!(backoff(1, i, m, 0.0), Duration::from_millis(2500));
        assert_eq!(backoff(1, i, m, 0.999_999).as_secs(), 4);
        assert_eq!(backoff(2, i, m, 0.0), Duration::from_secs(5));
        assert_eq!(backoff(3, i, m, 0.0), Duration::from_secs(10));
        assert_eq!(backoff(10, i, m, 0.0), Duration::from_secs(150));
        assert_eq!(backoff(1000, i, m, 0.0), Duration::from_secs(150));
        assert!(backoff(1000, i, m, 0.999) <= m);
    }

    #[test]
    fn verdicts_follow_the_error_class() {
        let cfg = Upload {
            initial_backoff: Dur::secs(5),
            ..Upload::default()
        };
        let transient = ErrorClass::Transient { retry_after: None };
        assert!(matches!(
            verdict(&cfg, &transient, 50, 0.5),
            Verdict::RetryIn(_)
        ));
        assert!(matches!(
            verdict(&cfg, &ErrorClass::Permanent, 1, 0.5),
            Verdict::RetryIn(_)
        ));
        assert_eq!(
            verdict(&cfg, &ErrorClass::Permanent, 3, 0.5),
            Verdict::GiveUp
        );
        let ra = ErrorClass::Transient {
            retry_after: Some(Duration::from_secs(120)),
        };
        assert_eq!(
            verdict(&cfg, &ra, 1, 0.0),
            Verdict::RetryIn(Duration::from_secs(120))
        );
        let limited = Upload {
            transient_attempts: 2,
            ..cfg
        };
        assert_eq!(verdict(&limited, &transient, 2, 0.5), Verdict::GiveUp);
    }

    const SYNC: Duration = Duration::from_secs(30);
    const AUTH: Duration = Duration::from_secs(60);

    fn state(slots: usize, t0: Instant) -> SchedState {
        SchedState::new(slots, SYNC, AUTH, 0, t0)
    }

    fn done(id: &str, outcome: Done) -> SchedMsg {
        SchedMsg::Done {
            id: id.into(),
            outcome,
        }
    }

    #[test]
    fn slots_fill_and_free_as_workers_finish() {
        let t0 = Instant::now();
        let mut s = state(2, t0);
        let mut f = Facts::default();
        assert!(s.wants_fill(None, false, t0));
        s.dispatched("a");
        s.dispatched("b");
        assert_eq!(s.free_slots(), 0);
        // Full: the queue is not read, whatever changed.
        s.data_changed();
        assert!(!s.wants_fill(None, false, t0));
        let mut held = s.held();
        held.sort();
        assert_eq!(held, ["a", "b"]);
        s.on_msg(done("a", Done::Finished), &mut f, t0);
        assert_eq!(s.free_slots(), 1);
        assert!(s.wants_fill(None, false, t0));
        assert_eq!(s.held(), ["b"]);
    }

    #[test]
    fn nothing_starts_while_paused_or_shutting_down() {
        let t0 = Instant::now();
        let mut s = state(2, t0);
        assert!(!s.wants_fill(Some(Reason::Offline), false, t0));
        assert!(!s.wants_fill(None, true, t0));
        // The recheck is kept for when it may run again.
        assert!(s.wants_fill(None, false, t0));
    }

    #[test]
    fn deferred_files_are_rechecked_only_on_change_or_every_two_seconds() {
        let t0 = Instant::now();
        let mut s = state(2, t0);
        assert!(s.wants_fill(None, false, t0));
        s.defer("big", Reason::MeteredFileTooLarge);
        // Nothing changed: not re-read at once, but within DEFERRED_RECHECK.
        assert!(!s.wants_fill(None, false, t0 + Duration::from_millis(100)));
        assert!(s.wants_fill(None, false, t0 + DEFERRED_RECHECK));
        assert!(s.held().contains(&"big".to_string()));
        // A new governor generation forgets the deferral and re-reads at once.
        s.governor_generation(1);
        assert!(s.held().is_empty());
        assert!(s.wants_fill(None, false, t0 + DEFERRED_RECHECK));
        // The same generation again changes nothing.
        s.defer("big", Reason::MeteredFileTooLarge);
        s.governor_generation(1);
        assert_eq!(s.held(), ["big"]);
    }

    #[test]
    fn a_per_file_reason_is_shown_only_when_nothing_runs() {
        let t0 = Instant::now();
        let mut s = state(2, t0);
        assert_eq!(s.shown_reason(None), None);
        s.defer("big", Reason::ChargingRequired);
        s.defer("bigger", Reason::MeteredFileTooLarge);
        // Lowest code in priority order wins.
        assert_eq!(s.shown_reason(None), Some(Reason::MeteredFileTooLarge));
        let by = s.deferred_by();
        assert_eq!(by[&Reason::ChargingRequired], 1);
        s.dispatched("small");
        assert_eq!(s.shown_reason(None), None);
        // A pausing condition always shows.
        assert_eq!(s.shown_reason(Some(Reason::Offline)), Some(Reason::Offline));
    }

    #[test]
    fn a_row_whose_outcome_was_not_stored_cools_down() {
        let t0 = Instant::now();
        let mut s = state(1, t0);
        let mut f = Facts::default();
        s.dispatched("a");
        s.on_msg(done("a", Done::StoreFailed), &mut f, t0);
        assert!(s.wants_fill(None, false, t0));
        assert_eq!(s.held(), ["a"]);
        // Due now but held back: wait the control poll, not zero (no spin).
        assert_eq!(s.next_wake(Some(0), 1000), CONTROL_POLL);
        // After the cooldown it may go again.
        s.data_changed();
        assert!(s.wants_fill(None, false, t0 + STORE_COOLDOWN + Duration::from_millis(1)));
        assert!(s.held().is_empty());
    }

    #[test]
    fn wakes_for_the_next_due_retry_within_the_control_poll() {
        let t0 = Instant::now();
        let s = state(2, t0);
        assert!(s.waits_for_due(None));
        assert_eq!(s.next_wake(None, 1000), CONTROL_POLL);
        assert_eq!(s.next_wake(Some(1700), 1000), Duration::from_millis(700));
        assert_eq!(s.next_wake(Some(900), 1000), Duration::ZERO);
        assert_eq!(s.next_wake(Some(60_000), 1000), CONTROL_POLL);
        assert!(!s.waits_for_due(Some(Reason::BatteryLow)));
        let mut full = state(1, t0);
        full.dispatched("a");
        assert!(!full.waits_for_due(None));
    }

    #[test]
    fn refused_clock_pauses_and_is_rechecked_on_its_interval_or_when_the_clock_is_set() {
        let t0 = Instant::now();
        let wall0 = 1_000_000_000_000i64;
        let mut s = SchedState::new(2, Duration::from_secs(30), AUTH, 0, t0);
        let mut f = Facts::default();
        assert!(!s.clock_probe_due(&f, t0, wall0));
        s.on_msg(done("a", Done::ClockSkewed), &mut f, t0);
        assert!(f.clock_skewed);
        assert!(!f.auth_failed);
        // Wall and monotonic clocks move together: only the interval counts.
        let at = |d: Duration| (t0 + d, wall0 + d.as_millis() as i64);
        let (t, w) = at(CLOCK_RECHECK - Duration::from_millis(1));
        assert!(!s.clock_probe_due(&f, t, w));
        let (t, w) = at(CLOCK_RECHECK);
        assert!(s.clock_probe_due(&f, t, w));
        // One check at a time.
        let (t, w) = at(CLOCK_RECHECK + Duration::from_secs(1));
        assert!(!s.clock_probe_due(&f, t, w));
        s.on_msg(SchedMsg::ClockProbe { ok: false }, &mut f, t);
        assert!(f.clock_skewed);
        // NTP steps the wall clock 56 years forward: check at once, not at 2 x 15 s.
        let (t, w) = at(CLOCK_RECHECK + Duration::from_secs(2));
        assert!(!s.clock_probe_due(&f, t, w));
        let t = t + Duration::from_secs(1);
        assert!(s.clock_probe_due(&f, t, w + 1_766_000_000_000));
        s.on_msg(SchedMsg::ClockProbe { ok: true }, &mut f, t);
        assert!(!f.clock_skewed);
        assert!(!s.clock_probe_due(&f, t + CLOCK_RECHECK * 10, w));
    }

    #[test]
    fn auth_failure_pauses_and_is_rechecked_on_its_interval() {
        let t0 = Instant::now();
        let mut s = state(1, t0);
        let mut f = Facts::default();
        s.dispatched("a");
        s.on_msg(done("a", Done::AuthFailed), &mut f, t0);
        assert!(f.auth_failed);
        assert!(!s.auth_probe_due(&f, t0 + AUTH - Duration::from_millis(1)));
        assert!(s.auth_probe_due(&f, t0 + AUTH));
        // One probe at a time.
        assert!(!s.auth_probe_due(&f, t0 + AUTH * 3));
        s.on_msg(SchedMsg::AuthProbe { ok: false }, &mut f, t0 + AUTH);
        assert!(f.auth_failed);
        assert!(s.auth_probe_due(&f, t0 + AUTH * 2));
        s.on_msg(SchedMsg::AuthProbe { ok: true }, &mut f, t0 + AUTH * 2);
        assert!(!f.auth_failed);
        assert!(!s.auth_probe_due(&f, t0 + AUTH * 10));
    }

    #[test]
    fn new_credentials_are_rechecked_at_once() {
        let t0 = Instant::now();
        let mut s = SchedState::new(2, Duration::from_secs(30), AUTH, 0, t0);
        let mut f = Facts::default();
        // Not paused for auth: nothing to re-check.
        s.on_msg(SchedMsg::CredentialsChanged, &mut f, t0);
        assert!(!s.auth_probe_due(&f, t0));
        s.on_msg(done("a", Done::AuthFailed), &mut f, t0);
        assert!(!s.auth_probe_due(&f, t0 + Duration::from_millis(10)));
        s.on_msg(
            SchedMsg::CredentialsChanged,
            &mut f,
            t0 + Duration::from_millis(20),
        );
        assert!(s.auth_probe_due(&f, t0 + Duration::from_millis(30)));
        // Once: the next waits for the interval again.
        s.on_msg(
            SchedMsg::AuthProbe { ok: false },
            &mut f,
            t0 + Duration::from_millis(40),
        );
        assert!(!s.auth_probe_due(&f, t0 + Duration::from_millis(50)));
    }

    #[test]
    fn housekeeping_runs_on_the_sync_interval_and_trims_hourly() {
        let t0 = Instant::now();
        let mut s = state(1, t0);
        assert_eq!(s.housekeeping(t0 + SYNC / 2), Housekeeping::default());
        let h = s.housekeeping(t0 + SYNC);
        assert!(h.abort_abandoned && !h.trim_events);
        assert_eq!(
            s.housekeeping(t0 + SYNC + SYNC / 2),
            Housekeeping::default()
        );
        let h = s.housekeeping(t0 + TRIM_EVERY);
        assert!(h.abort_abandoned && h.trim_events);
    }
}
