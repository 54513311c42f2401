//! The conditions' shared state: the facts the monitor observed, the metered-data
//! budget, the upload rate limiter, per-file admission (tickets), and writing what it all
//! means to the store for status.
//!
//! Who calls what:
//! - the monitor task ([`super::monitor`]) calls [`Governor::probe_round`] every
//!   `probe_interval` and [`Governor::probe_remote`] with backoff while offline, and wakes
//!   the scheduler when a fact that matters changed;
//! - workers call [`Ticket::throttle`] before each chunk (rate limit, metered byte count)
//!   and [`Ticket::may_continue`] at safe points;
//! - the scheduler calls [`Governor::observe`], [`Governor::admit`] and
//!   [`Governor::publish`], which also persists the budget.
//!
//! The budget is persisted in the store's control table (`conditions.budget`), at most a
//! second after it changes and when the daemon stops. Bytes are counted before they are
//! sent, so a crash can only over-count, never let the budget be exceeded.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{info, warn};

use super::probes::{self, Probes};
use super::report::{self, ConditionsReport, Counters};
use super::settings::{Conditions, MeteredPolicy, Retention};
use super::{admit, evaluate, failing, is_metered, Facts, Link, Policy, Reason};
use crate::bus::{MonitorMsg, Shared};
use crate::remote::{ErrorClass, Remote, RemoteError};
use crate::store::{Attachment, EventKind, EventOutcome, Store, StoreError};

/// How far ahead of the ideal pace the rate limiter lets a sender run. Small, so a 10 s
/// transfer takes 10 s, not 9: the limit protects a link other apps share.
const BURST: Duration = Duration::from_millis(100);

/// Longest single sleep inside the rate limiter, so a pause or shutdown is noticed.
const THROTTLE_SLICE: Duration = Duration::from_millis(100);

/// Numbers that change continuously (budget used, disk free) are written to the store at
/// most this often; discrete changes are written at once.
const NUMBERS_EVERY: Duration = Duration::from_secs(1);
/// Numbers that change while nothing else does (battery percent, disk free, temperature)
/// are refreshed in status this often, so an idle device does not write every probe.
const HEARTBEAT: Duration = Duration::from_secs(60);

/// A token bucket in GCRA form: `tat` is when the bytes sent so far would have finished
/// at exactly `rate`; a sender may run at most [`BURST`] ahead of it.
#[derive(Debug, Clone)]
pub struct Bucket {
    pub rate: Option<u64>,
    tat: Instant,
}

impl Bucket {
    pub fn new(rate: Option<u64>, now: Instant) -> Bucket {
        Bucket { rate, tat: now }
    }

    pub fn set_rate(&mut self, rate: Option<u64>, now: Instant) {
        if rate != self.rate {
            self.rate = rate;
            self.tat = now;
        }
    }

    /// Accounts `n` bytes about to be sent at `now`; returns how long to wait first.
    pub fn take(&mut self, n: u64, now: Instant) -> Duration {
        let Some(rate) = self.rate else {
            return Duration::ZERO;
        };
        let tat = self.tat.max(now);
        let wait = (tat.checked_sub(BURST).unwrap_or(now)).saturating_duration_since(now);
        self.tat = tat + Duration::from_secs_f64(n as f64 / rate as f64);
        wait
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Budget {
    day: String,
    used: u64,
}

impl Budget {
    /// The budget for local day `today` (`YYYY-MM-DD`): this one, or a fresh one when
    /// `today` is a later day. The day only moves forward: a clock set back (a board
    /// without a real-time clock boots in 1970, then NTP puts it right) keeps counting
    /// against the day already counted, so neither the jump back nor the jump forward
    /// again resets the count.
    fn for_day(self, today: &str) -> (Budget, bool) {
        let later = match (
            self.day.parse::<jiff::civil::Date>(),
            today.parse::<jiff::civil::Date>(),
        ) {
            (Ok(counted), Ok(today)) => today > counted,
            // Unreadable (hand-edited) day: start afresh rather than never reset.
            _ => self.day != today,
        };
        if later {
            (
                Budget {
                    day: today.to_string(),
                    used: 0,
                },
                true,
            )
        } else {
            (self, false)
        }
    }
}

/// Facts the monitor observes, plus what only status needs.
#[derive(Debug, Clone, Default)]
struct Observed {
    offline: bool,
    link: Link,
    battery: super::Battery,
    state_free: Option<u64>,
    capture_free: Option<u64>,
    cpu_temp: Option<f64>,
    cpu_hot: bool,
    minute_of_day: u16,
    evicted_files: u64,
}

struct Inner {
    seen: Observed,
    budget: Budget,
    /// Metered bytes promised to running uploads and not yet sent.
    reserved: u64,
    /// Bumped on every change of `budget`; the store has `Published::budget_version`.
    budget_version: u64,
    bucket: Bucket,
    /// Bumped whenever admission could change (facts, reservations released).
    generation: u64,
}

/// What was last written to the store, so unchanged state is not rewritten.
#[derive(Default)]
struct Published {
    summary: Option<String>,
    shown: Option<Option<Reason>>,
    json: String,
    written_at: Option<Instant>,
    failing: Vec<Reason>,
    deferred: BTreeMap<Reason, usize>,
    budget_version: u64,
    /// The rate limit the written report shows.
    rate: Option<u64>,
    /// The facts the written report was built from (a reload rebuilds it from them).
    facts: Facts,
}

/// What the governor needs from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub conditions: Conditions,
    pub retention: Retention,
    /// Absolute paths of the volumes whose free space matters.
    pub state_dir: PathBuf,
    pub capture: PathBuf,
}

/// The settings a reload may change while the daemon runs; swapped whole.
struct Live {
    conditions: Conditions,
    retention: Retention,
    policy: Policy,
    probes: Probes,
}

impl Live {
    fn new(conditions: Conditions, retention: Retention) -> Live {
        Live {
            policy: Policy::from(&conditions),
            probes: Probes {
                proc_root: conditions.proc_root.clone(),
                sys_root: conditions.sys_root.clone(),
            },
            conditions,
            retention,
        }
    }
}

pub struct Governor {
    live: RwLock<Arc<Live>>,
    state_dir: PathBuf,
    capture: PathBuf,
    remote: Arc<dyn Remote>,
    shared: Arc<Shared>,
    inner: Mutex<Inner>,
    published: Mutex<Published>,
    /// To the monitor task: network evidence and retention sweeps.
    monitor: UnboundedSender<MonitorMsg>,
}

/// A permission to upload one file, held by the worker for the upload's duration.
pub struct Ticket {
    gov: Arc<Governor>,
    size: u64,
    /// Bytes this upload has sent (metered or not).
    sent: AtomicU64,
    /// Metered bytes still reserved for this upload.
    reserved: AtomicU64,
    /// Admitted against the metered budget (at dispatch or when the link became metered).
    metered: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Governor {
    /// Loads the persisted budget and takes a first reading of every probe, so the first
    /// dispatch already respects the conditions. The monitor task keeps it current.
    pub fn new(
        settings: &Settings,
        store: &mut Store,
        remote: Arc<dyn Remote>,
        monitor: UnboundedSender<MonitorMsg>,
        shared: Arc<Shared>,
    ) -> Result<Arc<Governor>, StoreError> {
        let c = settings.conditions.clone();
        let today = probes::local_now();
        let budget = match store.metered_budget::<Budget>()? {
            Some(b) => b.for_day(&today.date).0,
            None => Budget {
                day: today.date.clone(),
                used: 0,
            },
        };
        let gov = Arc::new(Governor {
            live: RwLock::new(Arc::new(Live::new(c, settings.retention.clone()))),
            state_dir: settings.state_dir.clone(),
            capture: settings.capture.clone(),
            inner: Mutex::new(Inner {
                seen: Observed::default(),
                budget,
                reserved: 0,
                budget_version: 0,
                bucket: Bucket::new(None, Instant::now()),
                generation: 0,
            }),
            remote,
            shared,
            published: Mutex::new(Published::default()),
            monitor,
        });
        gov.probe_round(store, &mut HashSet::new(), false);
        Ok(gov)
    }

    /// The settings in force now.
    fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts reloaded `[conditions]` and `[retention]` in force (everything but
    /// `probe_interval`, which the monitor reads at start): the rate limit at once, for
    /// the next chunk of every transfer (running or not); admission and the gate from the
    /// next decision, the probes from the next round; files deferred under the old ones
    /// are looked at again. The conditions report in the store is rewritten before this
    /// returns, so status shows the new limits as soon as the reload is answered.
    pub fn reconfigure(
        &self,
        store: &Store,
        conditions: Conditions,
        retention: Retention,
    ) -> Result<(), StoreError> {
        let live = Arc::new(Live::new(conditions, retention));
        let minute = probes::local_now().minute_of_day;
        let rate = live.conditions.bandwidth_limit.rate_at(minute);
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = live.clone();
        {
            let mut i = lock(&self.inner);
            i.bucket.set_rate(rate, Instant::now());
            i.generation += 1;
        }
        // New retention limits apply now, not at the next upload.
        let _ = self.monitor.send(MonitorMsg::Sweep);
        let mut p = lock(&self.published);
        if p.summary.is_none() {
            // Nothing written yet: the scheduler's first publish writes it all.
            return Ok(());
        }
        // The scheduler's own facts (operator, auth, clock) as last published, the probed
        // ones as observed now, judged by the new settings.
        let mut facts = p.facts.clone();
        self.observe(&mut facts);
        let per_file = p.shown.flatten().filter(|r| p.deferred.contains_key(r));
        let shown = evaluate(&facts, &live.policy).or(per_file);
        let deferred = p.deferred.clone();
        let written = self.write(&mut p, store, &facts, shown, &deferred, true);
        if written.is_err() {
            // Status lags until the scheduler's next step writes it.
            p.summary = None;
        }
        written
    }

    /// `retention.archived_cache_limit` as in force now.
    pub fn archived_cache_limit(&self) -> u64 {
        self.live().retention.archived_cache_limit
    }

    /// `retention.delete_unreferenced_remote` as in force now.
    pub fn delete_unreferenced_remote(&self) -> bool {
        self.live().retention.delete_unreferenced_remote
    }

    /// How often the monitor reads the probes.
    pub fn probe_interval(&self) -> Duration {
        self.live().conditions.probe_interval.0
    }

    pub fn policy(&self) -> Policy {
        self.live().policy.clone()
    }

    /// Copies the probed facts into the scheduler's (which owns operator, auth and the
    /// clock).
    pub fn observe(&self, f: &mut Facts) {
        let i = lock(&self.inner);
        f.offline = i.seen.offline;
        f.link = i.seen.link.clone();
        f.battery = i.seen.battery.clone();
        f.disk_free = min_opt(i.seen.state_free, i.seen.capture_free);
        f.cpu_temp = i.seen.cpu_temp;
        f.cpu_hot = i.seen.cpu_hot;
        f.minute_of_day = i.seen.minute_of_day;
        f.budget_used = i.budget.used;
    }

    /// Changes whenever a file refused before might be admitted now.
    pub fn generation(&self) -> u64 {
        lock(&self.inner).generation
    }

    /// Per-file check at dispatch; on success the ticket holds the file's metered
    /// reservation until it is dropped.
    pub fn admit(self: &Arc<Self>, f: &Facts, att: &Attachment) -> Result<Ticket, Reason> {
        let mut i = lock(&self.inner);
        let size = att.size.max(0) as u64;
        // Only a multipart upload resumes; any other upload sends the whole file again.
        let remaining = if att.upload_id.is_some() {
            size.saturating_sub(att.bytes_sent.max(0) as u64)
        } else {
            size
        };
        let committed = i.budget.used + i.reserved;
        let live = self.live();
        admit(f, &live.policy, size, remaining, committed)?;
        let metered = f.link.metered && live.policy.metered == MeteredPolicy::Budget;
        let reserve = if metered { remaining } else { 0 };
        i.reserved += reserve;
        Ok(Ticket {
            gov: self.clone(),
            size,
            sent: AtomicU64::new(0),
            reserved: AtomicU64::new(reserve),
            metered: AtomicBool::new(metered),
        })
    }

    /// A request failed the way a dead link fails: check the remote now.
    pub fn network_failed(&self) {
        let _ = self.monitor.send(MonitorMsg::NetworkFailed);
    }

    /// Writes the pause reason, the condition report and the budget to the store when
    /// they changed, and logs `paused`/`resumed`, `conditions_changed` and `disk_low`
    /// events. Called by the scheduler on every loop; cheap when nothing changed.
    pub fn publish(
        &self,
        store: &Store,
        facts: &Facts,
        shown: Option<Reason>,
        deferred: &BTreeMap<Reason, usize>,
    ) -> Result<(), StoreError> {
        let mut p = lock(&self.published);
        self.write(&mut p, store, facts, shown, deferred, false)
    }

    /// [`Self::publish`] under the lock; `force`: write even when nothing seems changed.
    fn write(
        &self,
        p: &mut Published,
        store: &Store,
        facts: &Facts,
        shown: Option<Reason>,
        deferred: &BTreeMap<Reason, usize>,
        force: bool,
    ) -> Result<(), StoreError> {
        let now_failing = failing(facts, &self.live().policy);
        let summary = report::summary(facts, &now_failing);
        let (budget_version, rate) = {
            let i = lock(&self.inner);
            (i.budget_version, i.bucket.rate)
        };
        let dirty = budget_version != p.budget_version;
        let first = p.summary.is_none() || force;
        // The rate limit changes with a timetable slot or a reload: shown at once.
        let discrete = p.summary.as_deref() != Some(summary.as_str())
            || p.shown != Some(shown)
            || p.rate != rate;
        // Budget and deferral counts matter to an operator watching a metered upload:
        // refreshed every second; the rest (disk free, battery percent) on the heartbeat.
        let fast = dirty || *deferred != p.deferred;
        let since = p.written_at.map_or(Duration::MAX, |t| t.elapsed());
        // Called on every scheduler loop: decide before building any JSON.
        if !(first || discrete || since >= HEARTBEAT || (fast && since >= NUMBERS_EVERY)) {
            return Ok(());
        }
        let (report, json, budget, budget_version, rate) = {
            let i = lock(&self.inner);
            let report = self.report(&i, facts, &now_failing, deferred);
            let json = serde_json::to_string(&report).unwrap_or_default();
            (
                report,
                json,
                i.budget.clone(),
                i.budget_version,
                i.bucket.rate,
            )
        };
        if !(first || discrete) && json == p.json {
            p.written_at = Some(Instant::now());
            return Ok(());
        }
        store.atomically(|store| {
            store.set_pause_reason(shown.map(|r| r.as_str()))?;
            store.set_conditions_report(&report)?;
            store.set_metered_budget(&budget)?;
            if p.summary.as_deref() != Some(summary.as_str()) {
                info!(conditions = %summary, "conditions changed");
                store.log_event(
                    EventKind::ConditionsChanged,
                    EventOutcome::Applied,
                    None,
                    Some(&summary),
                )?;
            }
            if now_failing.contains(&Reason::DiskLow) && !p.failing.contains(&Reason::DiskLow) {
                warn!(
                    free = ?facts.disk_free,
                    min_free = self.live().policy.min_free_disk,
                    "disk space low after evicting what retention allows"
                );
                store.log_event(
                    EventKind::DiskLow,
                    EventOutcome::Applied,
                    None,
                    Some("disk_low"),
                )?;
            }
            let was = p.shown.flatten();
            let start = p.summary.is_none();
            if p.shown != Some(shown) && !(start && shown.is_none()) {
                match shown {
                    Some(r) => {
                        info!(reason = r.as_str(), "uploads paused");
                        store.log_event(
                            EventKind::Paused,
                            EventOutcome::Applied,
                            None,
                            Some(r.as_str()),
                        )?;
                    }
                    None => {
                        let was = was.map(|r| r.as_str()).unwrap_or("");
                        info!(was, "uploads resumed");
                        store.log_event(
                            EventKind::Resumed,
                            EventOutcome::Applied,
                            None,
                            Some(was),
                        )?;
                    }
                }
            }
            Ok(())
        })?;
        p.summary = Some(summary);
        p.shown = Some(shown);
        p.json = json;
        p.written_at = Some(Instant::now());
        p.failing = now_failing;
        p.deferred = deferred.clone();
        p.budget_version = budget_version;
        p.rate = rate;
        p.facts = facts.clone();
        Ok(())
    }

    /// Persists the budget (daemon shutdown).
    pub fn finish(&self, store: &Store) {
        let budget = lock(&self.inner).budget.clone();
        if let Err(e) = store.set_metered_budget(&budget) {
            warn!(error = %e, "cannot persist the metered data budget");
        }
    }

    /// The `conditions` object of the status snapshot (documented in the README).
    fn report(
        &self,
        i: &Inner,
        f: &Facts,
        failing: &[Reason],
        deferred: &BTreeMap<Reason, usize>,
    ) -> ConditionsReport {
        let counters = Counters {
            budget_day: i.budget.day.clone(),
            budget_used: i.budget.used,
            reserved: i.reserved,
            state_free: i.seen.state_free,
            capture_free: i.seen.capture_free,
            evicted_files: i.seen.evicted_files,
            rate: i.bucket.rate,
        };
        let live = self.live();
        report::build(
            f,
            &live.policy,
            live.conditions.max_cpu_temp,
            &counters,
            failing,
            deferred,
        )
    }

    /// Whether the link is down, as far as the monitor knows.
    pub fn offline(&self) -> bool {
        lock(&self.inner).seen.offline
    }

    /// Asks the remote whether it answers (blocking: a request). Records the outcome and
    /// returns whether it changed the `offline` fact, with the error of a failed probe.
    pub fn probe_remote(&self) -> (bool, Option<RemoteError>) {
        let (reachable, failure) = match self.remote.probe() {
            Ok(()) => (true, None),
            // Credentials and the clock are the scheduler's `auth` and `clock_skew`
            // conditions; the link is fine.
            Err(e) if matches!(e.class, ErrorClass::Auth | ErrorClass::ClockSkew) => (true, None),
            Err(e) => (false, Some(e)),
        };
        let mut i = lock(&self.inner);
        if i.seen.offline != reachable {
            return (false, failure);
        }
        i.seen.offline = !reachable;
        i.generation += 1;
        if reachable {
            info!("remote reachable again");
        } else {
            warn!("remote not reachable; uploads wait (reason offline)");
        }
        (true, failure)
    }

    /// Reads every probe once and applies what follows from it (budget day, rate,
    /// eviction). Returns whether anything the decision depends on changed. Blocking
    /// (file reads, statvfs, store writes when evicting).
    pub fn probe_round(
        &self,
        store: &mut Store,
        evict_seen: &mut HashSet<String>,
        sweep: bool,
    ) -> bool {
        let live = self.live();
        let c = &live.conditions;
        let t = probes::local_now();
        let interface = live.probes.default_route();
        let metered = interface
            .as_deref()
            .is_some_and(|i| is_metered(i, &c.unmetered_interfaces, &c.metered_interfaces));
        let battery = live.probes.battery();
        // Thermal zones are read only when the guard is on: nothing is spent on a check
        // nobody asked for.
        let cpu_temp = c.max_cpu_temp.and_then(|_| live.probes.cpu_temp());
        let free = || {
            (
                probes::free_bytes(&self.state_dir)
                    .map(|f| crate::store::usable_free(&self.state_dir, f)),
                probes::free_bytes(&self.capture),
            )
        };
        let (mut state_free, mut capture_free) = free();
        let min_free = live.policy.min_free_disk;
        let low = |s: Option<u64>, cf: Option<u64>| {
            min_free > 0 && min_opt(s, cf).is_some_and(|f| f < min_free)
        };
        let mut evicted = 0;
        if sweep {
            match super::retention::sweep(store, &self.capture, &live.retention) {
                Ok(n) => evicted += n,
                Err(e) => warn!(error = %e, "retention sweep failed"),
            }
        }
        // Evicting frees the capture volume only: when the state directory is on another
        // volume, its low space is reported (`disk_low`) but costs no photo.
        let shared_volume = same_volume(&self.state_dir, &self.capture);
        let evict_helps = |s: Option<u64>, cf: Option<u64>| {
            if shared_volume {
                low(s, cf)
            } else {
                low(None, cf)
            }
        };
        if evict_helps(state_free, capture_free) && live.retention.evict_on_disk_low {
            match super::retention::evict_for_space(store, &self.capture, evict_seen, || {
                let (s, cf) = free();
                evict_helps(s, cf)
            }) {
                Ok(n) => evicted += n,
                Err(e) => warn!(error = %e, "evicting local copies failed"),
            }
        }
        if evicted > 0 {
            (state_free, capture_free) = free();
        }
        let mut i = lock(&self.inner);
        // What the decision depends on, before and after this round.
        let judged = |i: &Inner| {
            (
                i.seen.link.clone(),
                i.seen.battery.clone(),
                i.seen.cpu_hot,
                low(i.seen.state_free, i.seen.capture_free),
                i.seen.minute_of_day,
                i.bucket.rate,
            )
        };
        let before = judged(&i);
        let used_before = i.budget.used;
        let (budget, new_day) = std::mem::take(&mut i.budget).for_day(&t.date);
        i.budget = budget;
        if new_day {
            info!(day = %t.date, used_yesterday = used_before, "new day: metered data budget reset");
            i.budget_version += 1;
            i.generation += 1;
        }
        if interface != i.seen.link.interface {
            info!(
                interface = interface.as_deref().unwrap_or("none"),
                metered, "default route changed"
            );
        }
        i.seen.link = Link { interface, metered };
        i.seen.battery = battery;
        i.seen.cpu_hot = super::cpu_hot(i.seen.cpu_hot, cpu_temp, c.max_cpu_temp);
        i.seen.cpu_temp = cpu_temp;
        i.seen.state_free = state_free;
        i.seen.capture_free = capture_free;
        i.seen.minute_of_day = t.minute_of_day;
        i.seen.evicted_files += evicted as u64;
        // The limit as in force now, not as when this round started: a reload may have
        // put a new one in force meanwhile (and set it in the bucket already).
        let rate = self
            .live()
            .conditions
            .bandwidth_limit
            .rate_at(t.minute_of_day);
        i.bucket.set_rate(rate, Instant::now());
        let after = judged(&i);
        let changed = before != after || evicted > 0;
        if changed {
            i.generation += 1;
        }
        changed
    }
}

/// Whether two folders are on one file system (unknown counts as one: eviction then
/// behaves as before, for the lower of the two).
fn same_volume(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev(),
        _ => true,
    }
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Ticket {
    /// Called with each chunk's size before it is sent: counts metered bytes and waits as
    /// long as the rate limit requires (waking early when uploads must stop).
    pub fn throttle(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
        let wait = {
            let mut i = lock(&self.gov.inner);
            if i.seen.link.metered {
                i.budget.used += n;
                i.budget_version += 1;
                let r = self.reserved.load(Ordering::Relaxed);
                let take = r.min(n);
                self.reserved.store(r - take, Ordering::Relaxed);
                i.reserved -= take;
            }
            i.bucket.take(n, Instant::now())
        };
        let until = Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.gov.shared.keep_going() {
                return;
            }
            thread::sleep(left.min(THROTTLE_SLICE));
        }
    }

    /// Checked at safe points: false when this file may not go on over the current link
    /// (the default route became metered mid-upload and the rest does not fit the budget
    /// or the file is too large for metered links).
    pub fn may_continue(&self) -> bool {
        let g = &self.gov;
        let live = g.live();
        let mut i = lock(&g.inner);
        if !i.seen.link.metered
            || live.policy.metered != MeteredPolicy::Budget
            || self.metered.load(Ordering::Relaxed)
        {
            return true;
        }
        let remaining = self.size.saturating_sub(self.sent.load(Ordering::Relaxed));
        let f = Facts {
            link: i.seen.link.clone(),
            battery: i.seen.battery.clone(),
            ..Facts::default()
        };
        match admit(
            &f,
            &live.policy,
            self.size,
            remaining,
            i.budget.used + i.reserved,
        ) {
            Ok(()) => {
                i.reserved += remaining;
                self.reserved.store(remaining, Ordering::Relaxed);
                self.metered.store(true, Ordering::Relaxed);
                true
            }
            Err(_) => false,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        {
            let mut i = lock(&self.gov.inner);
            i.reserved = i
                .reserved
                .saturating_sub(self.reserved.load(Ordering::Relaxed));
            i.generation += 1;
        }
        let live = self.gov.live();
        let r = &live.retention;
        if r.delete_after_upload || r.keep_synced_files.is_some() || r.keep_synced_bytes.is_some() {
            let _ = self.gov.monitor.send(MonitorMsg::Sweep);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_day_only_moves_forward_when_the_clock_jumps() {
        let b = |day: &str, used| Budget {
            day: day.into(),
            used,
        };
        // A fake clock's days as a board without RTC sees them: counting on 1 December,
        // a reboot in 1970, NTP puts the clock right, the next day comes.
        let mut budget = b("2026-12-01", 10);
        let mut resets = 0;
        for (today, used_after) in [
            ("2026-12-01", 10),
            ("1970-01-01", 10),
            ("1970-01-01", 10),
            ("2026-12-01", 10),
            ("2026-11-30", 10),
            ("2026-12-02", 0),
            ("2026-12-02", 0),
        ] {
            let (next, reset) = budget.for_day(today);
            resets += reset as u32;
            assert_eq!(next.used, used_after, "on {today}");
            budget = next;
        }
        assert_eq!(resets, 1, "one new day, one reset");
        assert_eq!(budget.day, "2026-12-02");
        // The day does not go back with the clock.
        assert_eq!(b("2026-12-02", 5).for_day("1970-01-01").0.day, "2026-12-02");
        // A hand-edited day is replaced rather than kept forever.
        assert_eq!(
            b("someday", 5).for_day("2026-12-02"),
            (b("2026-12-02", 0), true)
        );
    }

    #[test]
    fn bucket_paces_to_the_configured_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(Some(1_000_000), t0);
        // Send 10 MB in 256 KiB chunks as fast as the bucket allows, on a virtual clock.
        let mut now = t0;
        let chunk = 256 * 1024;
        let mut sent = 0u64;
        while sent < 10_000_000 {
            now += b.take(chunk, now);
            sent += chunk;
        }
        // The last chunk starts when all but it would have taken at 1 MB/s, less BURST.
        let ideal = (sent - chunk) as f64 / 1e6 - BURST.as_secs_f64();
        let took = (now - t0).as_secs_f64();
        assert!((took - ideal).abs() < 0.01, "took {took}, ideal {ideal}");
        assert!((9.0..=10.5).contains(&took), "{took}");
    }

    #[test]
    fn bucket_off_never_waits_and_idle_time_is_not_banked() {
        let t0 = Instant::now();
        let mut off = Bucket::new(None, t0);
        assert_eq!(off.take(u64::MAX / 2, t0), Duration::ZERO);
        let mut b = Bucket::new(Some(1000), t0);
        assert_eq!(b.take(1000, t0), Duration::ZERO);
        // A long idle gap does not let a sender burst beyond BURST afterwards.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.take(1000, later), Duration::ZERO);
        let w = b.take(1000, later);
        assert!(
            w >= Duration::from_millis(850) && w <= Duration::from_millis(950),
            "{w:?}"
        );
    }
}
