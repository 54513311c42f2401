//! The conditions runtime: a probe thread that keeps the facts current, the metered-data
//! budget, the upload rate limiter, per-file admission, and publishing what it all means
//! to status and the event log.
//!
//! Threads and who owns what:
//! - the probe thread (`conditions`) reads sysfs/procfs every `probe_interval`, probes the
//!   remote with backoff while offline, evicts local copies when the disk runs low, and
//!   wakes the scheduler (`Msg::Wake`) the moment a fact that matters changes, so uploads
//!   resume at once instead of on the 30 s tick;
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
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{info, warn};

use super::probes::{self, Probes};
use super::settings::{Conditions, MeteredPolicy, Retention};
use super::{admit, failing, is_metered, Facts, Link, Policy, Reason};
use crate::config::Config;
use crate::ingest::absolute;
use crate::remote::{ErrorClass, Remote};
use crate::store::{Attachment, Store, StoreError};
use crate::uploader::{control, Msg, Shared};

/// Control key holding today's metered byte count: `{"day":"YYYY-MM-DD","used":N}`.
pub const BUDGET_KEY: &str = "conditions.budget";

/// How far ahead of the ideal pace the rate limiter lets a sender run. Small, so a 10 s
/// transfer takes 10 s, not 9: the limit protects a link other apps share.
const BURST: Duration = Duration::from_millis(100);

/// Longest single sleep inside the rate limiter, so a pause or shutdown is noticed.
const THROTTLE_SLICE: Duration = Duration::from_millis(100);

/// Remote probes while offline back off from this to [`OFFLINE_PROBE_MAX`].
const OFFLINE_PROBE_MIN: Duration = Duration::from_secs(1);
/// A dead link is re-checked at least this often.
const OFFLINE_PROBE_MAX: Duration = Duration::from_secs(60);

/// Numbers that change continuously (budget used, disk free) are written to the store at
/// most this often; discrete changes are written at once.
const NUMBERS_EVERY: Duration = Duration::from_secs(1);
/// Numbers that change while nothing else does (battery percent, disk free, temperature)
/// are refreshed in status this often, so an idle device does not write every probe.
const HEARTBEAT: Duration = Duration::from_secs(60);

/// Messages to the probe thread.
enum Ctl {
    /// A request failed in a way that suggests the network: probe the remote now.
    NetworkFailed,
    /// An upload finished: apply the routine retention rules.
    Sweep,
    Stop,
}

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

/// Facts the probe thread owns, plus what only status needs.
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
}

pub struct Governor {
    conditions: Conditions,
    retention: Retention,
    policy: Policy,
    probes: Probes,
    state_dir: PathBuf,
    capture: PathBuf,
    remote: Arc<dyn Remote>,
    shared: Arc<Shared>,
    inner: Mutex<Inner>,
    published: Mutex<Published>,
    ctl: Mutex<Sender<Ctl>>,
    thread: Mutex<Option<JoinHandle<()>>>,
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
    /// Loads the persisted budget, takes a first reading of every probe (so the first
    /// dispatch already respects the conditions) and starts the probe thread.
    pub fn start(
        cfg: &Config,
        db_path: &Path,
        remote: Arc<dyn Remote>,
        wake: Sender<Msg>,
        shared: Arc<Shared>,
    ) -> Result<Arc<Governor>, StoreError> {
        let mut store = Store::open(db_path)?;
        let c = cfg.conditions.clone();
        let today = probes::local_now();
        let budget = store
            .control_get(BUDGET_KEY)?
            .and_then(|s| serde_json::from_str::<Budget>(&s).ok())
            .filter(|b| b.day == today.date)
            .unwrap_or(Budget {
                day: today.date.clone(),
                used: 0,
            });
        let (ctl_tx, ctl_rx) = mpsc::channel();
        let gov = Arc::new(Governor {
            policy: Policy::from(&c),
            probes: Probes {
                proc_root: c.proc_root.clone(),
                sys_root: c.sys_root.clone(),
            },
            state_dir: absolute(&cfg.paths.state_dir),
            capture: absolute(&cfg.paths.capture),
            inner: Mutex::new(Inner {
                seen: Observed::default(),
                budget,
                reserved: 0,
                budget_version: 0,
                bucket: Bucket::new(None, Instant::now()),
                generation: 0,
            }),
            conditions: c,
            retention: cfg.retention.clone(),
            remote,
            shared,
            published: Mutex::new(Published::default()),
            ctl: Mutex::new(ctl_tx),
            thread: Mutex::new(None),
        });
        let mut evict_seen = HashSet::new();
        gov.probe_round(&mut store, &mut evict_seen, false);
        let g = gov.clone();
        let handle = thread::Builder::new()
            .name("conditions".into())
            .spawn(move || g.probe_loop(store, ctl_rx, wake, evict_seen))
            .expect("spawn conditions thread");
        *lock(&gov.thread) = Some(handle);
        Ok(gov)
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Copies the probed facts into the scheduler's (which owns operator and auth).
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
        admit(f, &self.policy, size, remaining, committed)?;
        let metered = f.link.metered && self.policy.metered == MeteredPolicy::Budget;
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
        let _ = lock(&self.ctl).send(Ctl::NetworkFailed);
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
        let now_failing = failing(facts, &self.policy);
        let summary = self.summary(facts, &now_failing);
        let budget_version = lock(&self.inner).budget_version;
        let dirty = budget_version != p.budget_version;
        let first = p.summary.is_none();
        let discrete = p.summary.as_deref() != Some(summary.as_str()) || p.shown != Some(shown);
        // Budget and deferral counts matter to an operator watching a metered upload:
        // refreshed every second; the rest (disk free, battery percent) on the heartbeat.
        let fast = dirty || *deferred != p.deferred;
        let since = p.written_at.map_or(Duration::MAX, |t| t.elapsed());
        // Called on every scheduler loop: decide before building any JSON.
        if !(first || discrete || since >= HEARTBEAT || (fast && since >= NUMBERS_EVERY)) {
            return Ok(());
        }
        let (json, budget, budget_version) = {
            let i = lock(&self.inner);
            let json = self.report(&i, facts, &now_failing, deferred).to_string();
            (json, i.budget.clone(), i.budget_version)
        };
        if !(first || discrete) && json == p.json {
            p.written_at = Some(Instant::now());
            return Ok(());
        }
        let tx = store.conn().unchecked_transaction()?;
        store.control_set(
            control::PAUSE_REASON,
            shown.map(|r| r.as_str()).unwrap_or(""),
        )?;
        store.control_set(control::CONDITIONS, &json)?;
        store.control_set(
            BUDGET_KEY,
            &serde_json::to_string(&budget).unwrap_or_default(),
        )?;
        if p.summary.as_deref() != Some(summary.as_str()) {
            info!(conditions = %summary, "conditions changed");
            store.log_event("conditions_changed", "applied", None, Some(&summary))?;
        }
        if now_failing.contains(&Reason::DiskLow) && !p.failing.contains(&Reason::DiskLow) {
            warn!(
                free = ?facts.disk_free,
                min_free = self.policy.min_free_disk,
                "disk space low after evicting what retention allows"
            );
            store.log_event("disk_low", "applied", None, Some("disk_low"))?;
        }
        let was = p.shown.flatten();
        if p.shown != Some(shown) && !(first && shown.is_none()) {
            match shown {
                Some(r) => {
                    info!(reason = r.as_str(), "uploads paused");
                    store.log_event("paused", "applied", None, Some(r.as_str()))?;
                }
                None => {
                    let was = was.map(|r| r.as_str()).unwrap_or("");
                    info!(was, "uploads resumed");
                    store.log_event("resumed", "applied", None, Some(was))?;
                }
            }
        }
        tx.commit()?;
        p.summary = Some(summary);
        p.shown = Some(shown);
        p.json = json;
        p.written_at = Some(Instant::now());
        p.failing = now_failing;
        p.deferred = deferred.clone();
        p.budget_version = budget_version;
        Ok(())
    }

    /// Persists the budget and stops the probe thread (daemon shutdown).
    pub fn finish(&self, store: &Store) {
        let budget = lock(&self.inner).budget.clone();
        if let Err(e) = store.control_set(
            BUDGET_KEY,
            &serde_json::to_string(&budget).unwrap_or_default(),
        ) {
            warn!(error = %e, "cannot persist the metered data budget");
        }
        let _ = lock(&self.ctl).send(Ctl::Stop);
        if let Some(h) = lock(&self.thread).take() {
            let _ = h.join();
        }
    }

    /// One line naming each condition's state; a change is a `conditions_changed` event.
    fn summary(&self, f: &Facts, failing: &[Reason]) -> String {
        let link = match &f.link.interface {
            Some(i) => format!(
                "{i} {}",
                if f.link.metered {
                    "metered"
                } else {
                    "unmetered"
                }
            ),
            None => "no default route".into(),
        };
        let battery = if !f.battery.present {
            "none".to_string()
        } else if f.battery.charging {
            "charging".into()
        } else if failing.contains(&Reason::BatteryLow) {
            "low".into()
        } else {
            "ok".into()
        };
        let codes: Vec<&str> = failing.iter().map(|r| r.as_str()).collect();
        format!(
            "network={} link={link} battery={battery} failing=[{}]",
            if f.offline { "offline" } else { "online" },
            codes.join(",")
        )
    }

    /// The `conditions` object of the status snapshot (documented in the README).
    fn report(
        &self,
        i: &Inner,
        f: &Facts,
        failing: &[Reason],
        deferred: &BTreeMap<Reason, usize>,
    ) -> serde_json::Value {
        let c = &self.conditions;
        let p = &self.policy;
        let alarms: Vec<&str> = failing
            .iter()
            .filter(|r| **r == Reason::DiskLow)
            .map(|r| r.as_str())
            .collect();
        json!({
            "failing": failing.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
            "alarms": alarms,
            "deferred": deferred.iter().map(|(r, n)| (r.as_str(), *n)).collect::<BTreeMap<_, _>>(),
            "operator_paused": f.operator_paused,
            "auth_failed": f.auth_failed,
            "network": {
                "online": !f.offline,
                "interface": f.link.interface,
                "metered": f.link.metered,
                "metered_policy": c.metered,
            },
            "budget": {
                "day": i.budget.day,
                "limit": p.daily_budget,
                "used": i.budget.used,
                "reserved": i.reserved,
                "remaining": p.daily_budget.saturating_sub(i.budget.used),
                "max_file_size": p.metered_max_file_size,
            },
            "battery": {
                "present": f.battery.present,
                "percent": f.battery.percent,
                "charging": f.battery.charging,
                "min_percent": p.min_battery_percent,
                "require_charging_above": p.require_charging_above,
            },
            "disk": {
                "state_free": i.seen.state_free,
                "capture_free": i.seen.capture_free,
                "min_free": p.min_free_disk,
                "low": failing.contains(&Reason::DiskLow),
                "evicted_files": i.seen.evicted_files,
            },
            "cpu": {
                "temp_c": f.cpu_temp,
                "max_c": c.max_cpu_temp,
                "hot": f.cpu_hot,
            },
            "schedule": {
                "windows": p.schedule.iter().map(|w| w.to_string()).collect::<Vec<_>>(),
                "metered_only": p.schedule_metered_only,
                "inside": !failing.contains(&Reason::OutsideSchedule),
            },
            "bandwidth": {
                "limit_bytes_per_s": i.bucket.rate,
            },
        })
    }

    fn probe_loop(
        self: Arc<Self>,
        mut store: Store,
        rx: Receiver<Ctl>,
        wake: Sender<Msg>,
        mut evict_seen: HashSet<String>,
    ) {
        let interval = self.conditions.probe_interval.0;
        let mut next_round = Instant::now() + interval;
        let mut next_remote: Option<Instant> = None;
        let mut backoff = OFFLINE_PROBE_MIN;
        let mut last_evidence_probe: Option<Instant> = None;
        let mut sweep = false;
        loop {
            let now = Instant::now();
            let until = next_remote.map_or(next_round, |r| r.min(next_round));
            match rx.recv_timeout(until.saturating_duration_since(now)) {
                Ok(Ctl::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(Ctl::NetworkFailed) => {
                    // While offline the backoff schedule already runs; while online, one
                    // failure earns one immediate check (at most one a second).
                    let offline = lock(&self.inner).seen.offline;
                    if !offline
                        && last_evidence_probe.is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
                    {
                        last_evidence_probe = Some(Instant::now());
                        next_remote = Some(Instant::now());
                    }
                }
                Ok(Ctl::Sweep) => sweep = true,
                Err(RecvTimeoutError::Timeout) => {}
            }
            let now = Instant::now();
            let mut changed = false;
            if next_remote.is_some_and(|t| t <= now) {
                let mut failure = None;
                let reachable = match self.remote.probe() {
                    Ok(()) => true,
                    // Credentials are the scheduler's `auth` condition; the link is fine.
                    Err(e) if e.class == ErrorClass::Auth => true,
                    Err(e) => {
                        tracing::debug!(error = %e, retry_in = ?backoff, "remote not reachable");
                        failure = Some(e);
                        false
                    }
                };
                let mut i = lock(&self.inner);
                if i.seen.offline == reachable {
                    i.seen.offline = !reachable;
                    i.generation += 1;
                    changed = true;
                    if reachable {
                        info!("remote reachable again");
                    } else {
                        warn!("remote not reachable; uploads wait (reason offline)");
                    }
                }
                drop(i);
                if reachable {
                    next_remote = None;
                    backoff = OFFLINE_PROBE_MIN;
                } else {
                    next_remote = Some(Instant::now() + backoff);
                    // Each failed probe is in the event log with its next delay, so an
                    // operator sees the backoff (and that nothing hammers a dead link).
                    if let Some(e) = failure {
                        let _ = store.log_event(
                            "probe_failed",
                            "skipped",
                            None,
                            Some(&format!("{e}; next probe in {}ms", backoff.as_millis())),
                        );
                    }
                    backoff = (backoff * 2).min(OFFLINE_PROBE_MAX);
                }
            }
            if now >= next_round || sweep {
                next_round = Instant::now() + interval;
                changed |= self.probe_round(&mut store, &mut evict_seen, sweep);
                sweep = false;
            }
            if changed && wake.send(Msg::Wake).is_err() {
                return;
            }
        }
    }

    /// Reads every probe once and applies what follows from it (budget day, rate,
    /// eviction). Returns whether anything the decision depends on changed.
    fn probe_round(
        &self,
        store: &mut Store,
        evict_seen: &mut HashSet<String>,
        sweep: bool,
    ) -> bool {
        let c = &self.conditions;
        let t = probes::local_now();
        let interface = self.probes.default_route();
        let metered = interface
            .as_deref()
            .is_some_and(|i| is_metered(i, &c.unmetered_interfaces, &c.metered_interfaces));
        let battery = self.probes.battery();
        // Thermal zones are read only when the guard is on: nothing is spent on a check
        // nobody asked for.
        let cpu_temp = c.max_cpu_temp.and_then(|_| self.probes.cpu_temp());
        let free = || {
            (
                probes::free_bytes(&self.state_dir),
                probes::free_bytes(&self.capture),
            )
        };
        let (mut state_free, mut capture_free) = free();
        let min_free = self.policy.min_free_disk;
        let low = |s: Option<u64>, cf: Option<u64>| {
            min_free > 0 && min_opt(s, cf).is_some_and(|f| f < min_free)
        };
        let mut evicted = 0;
        if sweep {
            match super::retention::sweep(store, &self.capture, &self.retention) {
                Ok(n) => evicted += n,
                Err(e) => warn!(error = %e, "retention sweep failed"),
            }
        }
        if low(state_free, capture_free) && self.retention.evict_on_disk_low {
            match super::retention::evict_for_space(store, &self.capture, evict_seen, || {
                let (s, cf) = free();
                low(s, cf)
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
        if i.budget.day != t.date {
            info!(day = %t.date, used_yesterday = i.budget.used, "new day: metered data budget reset");
            i.budget = Budget {
                day: t.date.clone(),
                used: 0,
            };
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
        i.bucket
            .set_rate(c.bandwidth_limit.rate_at(t.minute_of_day), Instant::now());
        let after = judged(&i);
        let changed = before != after || evicted > 0;
        if changed {
            i.generation += 1;
        }
        changed
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
        let mut i = lock(&g.inner);
        if !i.seen.link.metered
            || g.policy.metered != MeteredPolicy::Budget
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
            &g.policy,
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
        let r = &self.gov.retention;
        if r.delete_after_upload || r.keep_synced_files.is_some() || r.keep_synced_bytes.is_some() {
            let _ = lock(&self.gov.ctl).send(Ctl::Sweep);
        }
    }
}

/// The human lines of `fieldsync status` for the `conditions` object of a snapshot.
/// Tolerates missing fields (an older daemon, or one that has not published yet).
pub fn render(v: &serde_json::Value) -> String {
    use crate::status::human_bytes;
    let Some(o) = v.as_object().filter(|o| !o.is_empty()) else {
        return String::new();
    };
    let num = |p: &str| v.pointer(p).and_then(|x| x.as_i64());
    let flag = |p: &str| v.pointer(p).and_then(|x| x.as_bool()).unwrap_or(false);
    let mut out = String::from("conditions:\n");
    let mut line = |k: &str, s: String| out.push_str(&format!("  {k:<10}{s}\n"));
    let iface = v.pointer("/network/interface").and_then(|x| x.as_str());
    line(
        "network",
        format!(
            "{}, {}",
            if flag("/network/online") {
                "online"
            } else {
                "offline"
            },
            match iface {
                Some(i) if flag("/network/metered") => format!("{i} (metered)"),
                Some(i) => format!("{i} (unmetered)"),
                None => "no default route".into(),
            }
        ),
    );
    if let (Some(used), Some(limit)) = (num("/budget/used"), num("/budget/limit")) {
        let policy = v
            .pointer("/network/metered_policy")
            .and_then(|x| x.as_str())
            .unwrap_or("");
        line(
            "budget",
            match policy {
                "never" => "metered links never used".into(),
                "unlimited" => format!(
                    "{} used today on metered links (no limit)",
                    human_bytes(used)
                ),
                _ => format!(
                    "{} of {} used today on metered links ({} left)",
                    human_bytes(used),
                    human_bytes(limit),
                    human_bytes((limit - used).max(0))
                ),
            },
        );
    }
    if flag("/battery/present") {
        line(
            "battery",
            format!(
                "{}{} (min {}%)",
                num("/battery/percent")
                    .map(|p| format!("{p}% "))
                    .unwrap_or_default(),
                if flag("/battery/charging") {
                    "charging/on mains"
                } else {
                    "discharging"
                },
                num("/battery/min_percent").unwrap_or(0)
            ),
        );
    } else {
        line("battery", "none (always ok)".into());
    }
    let free = [num("/disk/state_free"), num("/disk/capture_free")]
        .into_iter()
        .flatten()
        .min();
    line(
        "disk",
        format!(
            "{} free (min {}){}{}",
            free.map(human_bytes).unwrap_or_else(|| "unknown".into()),
            human_bytes(num("/disk/min_free").unwrap_or(0)),
            if flag("/disk/low") { ", LOW" } else { "" },
            match num("/disk/evicted_files") {
                Some(n) if n > 0 => format!(", {n} local copies evicted"),
                _ => String::new(),
            }
        ),
    );
    let temp = v.pointer("/cpu/temp_c").and_then(|x| x.as_f64());
    let max = v.pointer("/cpu/max_c").and_then(|x| x.as_f64());
    line(
        "cpu",
        match (temp, max) {
            (_, None) => "temperature guard off".into(),
            (Some(t), Some(m)) => format!(
                "{t:.1} °C (max {m:.0} °C){}",
                if flag("/cpu/hot") { ", HOT" } else { "" }
            ),
            (None, Some(m)) => format!("temperature unknown (max {m:.0} °C)"),
        },
    );
    let windows: Vec<&str> = v
        .pointer("/schedule/windows")
        .and_then(|x| x.as_array())
        .map(|a| a.iter().filter_map(|w| w.as_str()).collect())
        .unwrap_or_default();
    line(
        "schedule",
        if windows.is_empty() {
            "any time".into()
        } else {
            format!(
                "{}{} ({})",
                windows.join(", "),
                if flag("/schedule/metered_only") {
                    " on metered links"
                } else {
                    ""
                },
                if flag("/schedule/inside") {
                    "inside"
                } else {
                    "outside"
                }
            )
        },
    );
    line(
        "bandwidth",
        match num("/bandwidth/limit_bytes_per_s") {
            Some(r) => format!("{}/s", human_bytes(r)),
            None => "unlimited".into(),
        },
    );
    if let Some(d) = o
        .get("deferred")
        .and_then(|x| x.as_object())
        .filter(|d| !d.is_empty())
    {
        let parts: Vec<String> = d.iter().map(|(k, n)| format!("{n} file(s) {k}")).collect();
        line("waiting", parts.join(", "));
    }
    if let Some(f) = o
        .get("failing")
        .and_then(|x| x.as_array())
        .filter(|f| !f.is_empty())
    {
        let codes: Vec<&str> = f.iter().filter_map(|x| x.as_str()).collect();
        line("failing", codes.join(", "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
