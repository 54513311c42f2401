//! The conditions monitor: a task that keeps the governor's facts current. It reads the
//! probes every `probe_interval`, probes the remote with backoff while it is offline (and
//! once at once when an upload failed like a dead link fails), applies retention sweeps
//! after uploads, and wakes the scheduler the moment a fact that matters changed, so
//! uploads resume at once instead of on the 30 s tick.
//!
//! The decisions (when to probe what) are [`MonitorState`], a plain struct driven with
//! "now"; the probes themselves are blocking (sysfs reads, statvfs, a request, store
//! writes) and run in `spawn_blocking`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::governor::Governor;
use crate::bus::{LoopBeat, MonitorMsg, SchedMsg};
use crate::store::{EventKind, EventOutcome, Store};

/// Remote probes while offline back off from this to [`OFFLINE_PROBE_MAX`].
const OFFLINE_PROBE_MIN: Duration = Duration::from_secs(1);
/// A dead link is re-checked at least this often.
const OFFLINE_PROBE_MAX: Duration = Duration::from_secs(60);
/// While online, a failed upload earns at most one immediate remote probe this often.
const EVIDENCE_GAP: Duration = Duration::from_secs(1);

/// When the monitor probes what.
#[derive(Debug, Clone)]
pub struct MonitorState {
    interval: Duration,
    next_round: Instant,
    /// When the remote is probed next; `None` while it is known to answer.
    next_remote: Option<Instant>,
    backoff: Duration,
    last_evidence_probe: Option<Instant>,
    /// An upload finished, the daemon started or `[retention]` was reloaded: the next
    /// round applies the retention rules.
    sweep: bool,
}

/// What is due now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub remote: bool,
    pub round: bool,
    pub sweep: bool,
}

impl MonitorState {
    pub fn new(interval: Duration, now: Instant) -> Self {
        MonitorState {
            interval,
            next_round: now + interval,
            next_remote: None,
            backoff: OFFLINE_PROBE_MIN,
            last_evidence_probe: None,
            sweep: false,
        }
    }

    /// A message arrived. `offline`: whether the link is known to be down (then the
    /// backoff schedule already runs and a failure earns no extra probe).
    pub fn on_msg(&mut self, msg: MonitorMsg, offline: bool, now: Instant) {
        match msg {
            MonitorMsg::NetworkFailed => {
                if !offline
                    && self
                        .last_evidence_probe
                        .is_none_or(|t| now.duration_since(t) >= EVIDENCE_GAP)
                {
                    self.last_evidence_probe = Some(now);
                    self.next_remote = Some(now);
                }
            }
            MonitorMsg::Sweep => self.sweep = true,
        }
    }

    /// What to do now; the caller does it and reports back.
    pub fn due(&mut self, now: Instant) -> Due {
        let remote = self.next_remote.is_some_and(|t| t <= now);
        let round = now >= self.next_round || self.sweep;
        let sweep = std::mem::take(&mut self.sweep);
        if round {
            self.next_round = now + self.interval;
        }
        Due {
            remote,
            round,
            sweep,
        }
    }

    /// The remote probe's outcome. Returns the delay before the next probe when it failed.
    pub fn remote_probed(&mut self, reachable: bool, now: Instant) -> Option<Duration> {
        if reachable {
            self.next_remote = None;
            self.backoff = OFFLINE_PROBE_MIN;
            None
        } else {
            let wait = self.backoff;
            self.next_remote = Some(now + wait);
            self.backoff = (self.backoff * 2).min(OFFLINE_PROBE_MAX);
            Some(wait)
        }
    }

    /// When something is due next.
    pub fn deadline(&self) -> Instant {
        self.next_remote
            .map_or(self.next_round, |r| r.min(self.next_round))
    }
}

/// Runs until `shutdown`. `store` is the monitor's own connection.
pub async fn run(
    gov: Arc<Governor>,
    store: Store,
    mut rx: UnboundedReceiver<MonitorMsg>,
    wake: UnboundedSender<SchedMsg>,
    shutdown: CancellationToken,
    beat: LoopBeat,
) {
    let mut state = MonitorState::new(gov.probe_interval(), Instant::now());
    // The retention limits hold from the start, not only after the next upload: copies
    // kept by an earlier run (or under a larger limit) go now.
    state.on_msg(MonitorMsg::Sweep, false, Instant::now());
    // The store and the eviction memory travel into each blocking round and back.
    let mut held = Some((store, HashSet::<String>::new()));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            msg = rx.recv() => match msg {
                Some(m) => state.on_msg(m, gov.offline(), Instant::now()),
                None => return,
            },
            _ = tokio::time::sleep_until(state.deadline()) => {}
        }
        let due = state.due(Instant::now());
        if !due.remote && !due.round {
            continue;
        }
        let Some((mut store, mut evict_seen)) = held.take() else {
            return;
        };
        let g = gov.clone();
        let backoff_if_down = state.backoff;
        let job = tokio::task::spawn_blocking(move || {
            let mut changed = false;
            let mut reachable = None;
            if due.remote {
                let (flipped, failure) = g.probe_remote();
                changed |= flipped;
                reachable = Some(failure.is_none());
                // Each failed probe is in the event log with its next delay, so an
                // operator sees the backoff (and that nothing hammers a dead link).
                if let Some(e) = failure {
                    debug!(error = %e, retry_in = ?backoff_if_down, "remote not reachable");
                    let _ = store.log_event(
                        EventKind::ProbeFailed,
                        EventOutcome::Skipped,
                        None,
                        Some(&format!(
                            "{e}; next probe in {}ms",
                            backoff_if_down.as_millis()
                        )),
                    );
                }
            }
            if due.round {
                changed |= g.probe_round(&mut store, &mut evict_seen, due.sweep);
            }
            (store, evict_seen, changed, reachable)
        });
        let busy = beat.busy();
        let Ok((store, evict_seen, changed, reachable)) = job.await else {
            return;
        };
        drop(busy);
        held = Some((store, evict_seen));
        if let Some(ok) = reachable {
            state.remote_probed(ok, Instant::now());
        }
        if changed && wake.send(SchedMsg::Wake).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_upload_probes_at_once_but_not_more_than_once_a_second() {
        let t0 = Instant::now();
        let mut s = MonitorState::new(Duration::from_secs(5), t0);
        assert_eq!(s.deadline(), t0 + Duration::from_secs(5));
        s.on_msg(MonitorMsg::NetworkFailed, false, t0);
        assert_eq!(s.deadline(), t0);
        assert!(s.due(t0).remote);
        assert_eq!(s.remote_probed(true, t0), None);
        // A second failure within the gap earns nothing; after it, a probe.
        s.on_msg(
            MonitorMsg::NetworkFailed,
            false,
            t0 + Duration::from_millis(500),
        );
        assert!(!s.due(t0 + Duration::from_millis(500)).remote);
        s.on_msg(
            MonitorMsg::NetworkFailed,
            false,
            t0 + Duration::from_secs(1),
        );
        assert!(s.due(t0 + Duration::from_secs(1)).remote);
        // While offline the backoff schedule runs; evidence does not add probes.
        let mut s = MonitorState::new(Duration::from_secs(5), t0);
        s.on_msg(MonitorMsg::NetworkFailed, true, t0);
        assert!(!s.due(t0).remote);
    }

    #[test]
    fn offline_probes_back_off_to_a_minute_and_reset_when_back() {
        let t0 = Instant::now();
        let mut s = MonitorState::new(Duration::from_secs(3600), t0);
        s.on_msg(MonitorMsg::NetworkFailed, false, t0);
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..9 {
            assert!(s.due(now).remote);
            let w = s.remote_probed(false, now).unwrap();
            waits.push(w.as_secs());
            now += w;
            assert_eq!(s.deadline(), now);
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(s.remote_probed(true, now), None);
        assert!(!s.due(now).remote);
        s.on_msg(
            MonitorMsg::NetworkFailed,
            false,
            now + Duration::from_secs(2),
        );
        s.due(now + Duration::from_secs(2));
        assert_eq!(
            s.remote_probed(false, now + Duration::from_secs(2)),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn rounds_follow_the_interval_and_a_sweep_forces_one() {
        let t0 = Instant::now();
        let i = Duration::from_secs(5);
        let mut s = MonitorState::new(i, t0);
        assert_eq!(
            s.due(t0 + Duration::from_secs(1)),
            Due {
                remote: false,
                round: false,
                sweep: false
            }
        );
        s.on_msg(MonitorMsg::Sweep, false, t0 + Duration::from_secs(1));
        assert_eq!(
            s.due(t0 + Duration::from_secs(1)),
            Due {
                remote: false,
                round: true,
                sweep: true
            }
        );
        assert_eq!(s.deadline(), t0 + Duration::from_secs(6));
        let d = s.due(t0 + Duration::from_secs(6));
        assert!(d.round && !d.sweep);
    }
}
