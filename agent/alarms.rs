//! Alarms: what an operator must hear about without looking, pushed as `alarm` events
//! (MQTT `…/events`, `fieldsync events`) once per episode, each ended by a matching
//! `alarm_cleared`.
//!
//! Three kinds of episode, each with its reason code (the first word of the reason):
//! - `pending_too_old`: the oldest photo waiting to upload is older than
//!   `upload.pending_alarm_after` (unset: never);
//! - `failed`: one photo became `failed`; the episode ends when it is synced or archived
//!   (a retry that fails again is the same episode);
//! - `disk_low`: the conditions report `disk_low`.
//!
//! [`Active`] is the pure decision: given what is observed now, which episodes begin and
//! end. The loop around it reads the facts from the store (the queue and the conditions
//! report the scheduler writes), so it depends on no other part, and records the episodes
//! with their events in one transaction, so a restart neither repeats nor loses one.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::bus::LoopBeat;
use crate::conditions::report::ConditionsReport;
use crate::store::{Attachment, EventKind, State, Store, StoreError};
use crate::util::now_ms;

/// The episodes in progress. Stored (control key `alarms.active`) after every change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Active {
    pub pending_too_old: bool,
    pub disk_low: bool,
    /// Ids of the failed photos whose episode has not ended.
    pub failed: BTreeSet<String>,
}

/// What the loop observed.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    /// Age of the oldest photo waiting to upload; `None` when none waits.
    pub oldest_pending: Option<Duration>,
    pub disk_low: bool,
    /// Photos in state `failed` now.
    pub failed: BTreeSet<String>,
    /// Of the photos in [`Active::failed`], those not done yet (failed, or queued again
    /// by a retry): their episode goes on.
    pub unresolved: BTreeSet<String>,
}

/// What an episode is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    PendingTooOld,
    Failed(String),
    DiskLow,
}

impl Subject {
    pub fn code(&self) -> &'static str {
        match self {
            Subject::PendingTooOld => "pending_too_old",
            Subject::Failed(_) => "failed",
            Subject::DiskLow => "disk_low",
        }
    }
}

/// An episode began (`true`) or ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub subject: Subject,
    pub raised: bool,
}

impl Active {
    /// Applies an observation; returns the episodes that began or ended, in a stable
    /// order. `pending_after`: `upload.pending_alarm_after`.
    pub fn observe(&mut self, o: &Observation, pending_after: Option<Duration>) -> Vec<Change> {
        let mut out = Vec::new();
        let mut flip = |on: &mut bool, now: bool, subject: Subject| {
            if *on != now {
                *on = now;
                out.push(Change {
                    subject,
                    raised: now,
                });
            }
        };
        let too_old = pending_after.is_some_and(|max| o.oldest_pending.is_some_and(|a| a > max));
        flip(&mut self.pending_too_old, too_old, Subject::PendingTooOld);
        flip(&mut self.disk_low, o.disk_low, Subject::DiskLow);
        let ended: Vec<String> = self
            .failed
            .iter()
            .filter(|id| !o.failed.contains(*id) && !o.unresolved.contains(*id))
            .cloned()
            .collect();
        for id in ended {
            self.failed.remove(&id);
            out.push(Change {
                subject: Subject::Failed(id),
                raised: false,
            });
        }
        for id in &o.failed {
            if self.failed.insert(id.clone()) {
                out.push(Change {
                    subject: Subject::Failed(id.clone()),
                    raised: true,
                });
            }
        }
        out
    }
}

/// The alarm loop's state; moved into `spawn_blocking` for each turn and back.
pub struct AlarmLoop {
    store: Store,
    active: Active,
    pending_after: Option<Duration>,
    /// How often to look without news (ages grow without any event).
    tick: Duration,
}

impl AlarmLoop {
    /// `tick`: the upload section's `sync_interval`; the loop looks at least that often,
    /// and at least four times per `pending_after`.
    pub fn new(
        store: Store,
        pending_after: Option<Duration>,
        tick: Duration,
    ) -> Result<AlarmLoop, StoreError> {
        let active = store.active_alarms::<Active>()?.unwrap_or_default();
        let tick = match pending_after {
            Some(p) => tick.min(p / 4).max(Duration::from_millis(200)),
            None => tick,
        };
        Ok(AlarmLoop {
            store,
            active,
            pending_after,
            tick,
        })
    }

    /// One look (blocking: SQLite). A store error is logged; the next turn tries again.
    pub fn turn(&mut self) {
        if let Err(e) = self.try_turn() {
            warn!(error = %e, "cannot check alarms");
        }
    }

    fn try_turn(&mut self) -> Result<(), StoreError> {
        let now = now_ms();
        let oldest = self
            .store
            .oldest_pending()?
            .map(|t| Duration::from_millis(now.saturating_sub(t).max(0) as u64));
        let disk_low = self
            .store
            .conditions_report::<ConditionsReport>()?
            .is_some_and(|r| r.alarms.iter().any(|a| a == "disk_low"));
        let failed_rows = self.store.in_states(&[State::Failed])?;
        let mut unresolved = BTreeSet::new();
        let mut rows: Vec<Attachment> = Vec::new();
        for id in &self.active.failed {
            if let Some(a) = self.store.get(id)? {
                if matches!(a.state, State::Failed | State::QueuedUpload) {
                    unresolved.insert(id.clone());
                }
                rows.push(a);
            }
        }
        let obs = Observation {
            oldest_pending: oldest,
            disk_low,
            failed: failed_rows.iter().map(|a| a.id.clone()).collect(),
            unresolved,
        };
        let mut next = self.active.clone();
        let changes = next.observe(&obs, self.pending_after);
        if changes.is_empty() {
            return Ok(());
        }
        rows.extend(failed_rows);
        let events: Vec<(EventKind, Option<&Attachment>, String)> = changes
            .iter()
            .map(|c| {
                let att = match &c.subject {
                    Subject::Failed(id) => rows.iter().find(|a| &a.id == id),
                    _ => None,
                };
                let kind = if c.raised {
                    EventKind::Alarm
                } else {
                    EventKind::AlarmCleared
                };
                (kind, att, self.reason(c, att, oldest))
            })
            .collect();
        self.store.record_alarms(&next, &events)?;
        for (kind, att, reason) in &events {
            let id = att.map(|a| a.id.as_str()).unwrap_or("");
            match kind {
                EventKind::Alarm => warn!(id, reason = %reason, "alarm"),
                _ => info!(id, reason = %reason, "alarm cleared"),
            }
        }
        self.active = next;
        Ok(())
    }

    /// `<code>: <what>`, one line.
    fn reason(&self, c: &Change, att: Option<&Attachment>, oldest: Option<Duration>) -> String {
        let age = |d: Duration| crate::status::human_age(d.as_secs() as i64);
        let limit = self.pending_after.map(age).unwrap_or_default();
        let what = match (&c.subject, c.raised) {
            (Subject::PendingTooOld, true) => format!(
                "the oldest pending photo has waited {}, longer than upload.pending_alarm_after ({limit})",
                oldest.map(age).unwrap_or_default()
            ),
            (Subject::PendingTooOld, false) => match oldest {
                Some(d) => format!("the oldest pending photo has waited {}", age(d)),
                None => "nothing waits to upload".into(),
            },
            (Subject::Failed(_), true) => match att {
                Some(a) => format!(
                    "{}: {}",
                    a.last_error_code.as_deref().unwrap_or("failed"),
                    a.last_error.as_deref().unwrap_or("")
                ),
                None => "gave up".into(),
            },
            (Subject::Failed(_), false) => match att {
                Some(a) => format!("now {}", a.state.as_str()),
                None => "no longer in the queue".into(),
            },
            (Subject::DiskLow, true) => {
                "free disk below conditions.min_free_disk after eviction".into()
            }
            (Subject::DiskLow, false) => "free disk above conditions.min_free_disk".into(),
        };
        format!("{}: {what}", c.subject.code())
    }
}

/// Drives the alarm loop: a look whenever the queue changed and every tick, until
/// shutdown.
pub async fn run(
    lp: AlarmLoop,
    mut queue_changed: watch::Receiver<u64>,
    shutdown: CancellationToken,
    beat: LoopBeat,
) {
    let tick = lp.tick;
    let mut lp = Some(lp);
    loop {
        let mut l = lp.take().expect("alarm loop");
        let busy = beat.busy();
        let l = match tokio::task::spawn_blocking(move || {
            l.turn();
            l
        })
        .await
        {
            Ok(l) => l,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        drop(busy);
        lp = Some(l);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = queue_changed.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn raised(s: Subject) -> Change {
        Change {
            subject: s,
            raised: true,
        }
    }

    fn cleared(s: Subject) -> Change {
        Change {
            subject: s,
            raised: false,
        }
    }

    #[test]
    fn a_pending_photo_too_old_alarms_once_and_clears_when_it_goes() {
        let hour = Duration::from_secs(3600);
        let mut a = Active::default();
        let at = |age: Option<Duration>| Observation {
            oldest_pending: age,
            ..Observation::default()
        };
        assert!(a.observe(&at(Some(hour)), Some(hour)).is_empty());
        assert_eq!(
            a.observe(&at(Some(hour * 2)), Some(hour)),
            vec![raised(Subject::PendingTooOld)]
        );
        // The episode goes on: no second alarm.
        assert!(a.observe(&at(Some(hour * 5)), Some(hour)).is_empty());
        assert_eq!(
            a.observe(&at(None), Some(hour)),
            vec![cleared(Subject::PendingTooOld)]
        );
        // Unset: never.
        let mut off = Active::default();
        assert!(off.observe(&at(Some(hour * 1000)), None).is_empty());
    }

    #[test]
    fn a_failed_photo_is_one_episode_until_it_is_synced() {
        let mut a = Active::default();
        let obs = |failed: &[&str], unresolved: &[&str]| Observation {
            failed: ids(failed),
            unresolved: ids(unresolved),
            ..Observation::default()
        };
        assert_eq!(
            a.observe(&obs(&["p1"], &["p1"]), None),
            vec![raised(Subject::Failed("p1".into()))]
        );
        assert!(a.observe(&obs(&["p1"], &["p1"]), None).is_empty());
        // Retried (queued again), failed again: the same episode.
        assert!(a.observe(&obs(&[], &["p1"]), None).is_empty());
        assert!(a.observe(&obs(&["p1"], &["p1"]), None).is_empty());
        // A second photo is its own episode.
        assert_eq!(
            a.observe(&obs(&["p1", "p2"], &["p1"]), None),
            vec![raised(Subject::Failed("p2".into()))]
        );
        // p1 synced: cleared; p2 still failed.
        assert_eq!(
            a.observe(&obs(&["p2"], &["p2"]), None),
            vec![cleared(Subject::Failed("p1".into()))]
        );
        assert_eq!(a.failed, ids(&["p2"]));
    }

    #[test]
    fn disk_low_alarms_at_its_start_and_clears_at_its_end() {
        let mut a = Active::default();
        let low = |on| Observation {
            disk_low: on,
            ..Observation::default()
        };
        assert_eq!(a.observe(&low(true), None), vec![raised(Subject::DiskLow)]);
        assert!(a.observe(&low(true), None).is_empty());
        assert_eq!(
            a.observe(&low(false), None),
            vec![cleared(Subject::DiskLow)]
        );
        assert!(a.observe(&low(false), None).is_empty());
    }

    #[test]
    fn episodes_survive_a_restart_through_the_store() {
        let mut store = Store::open_in_memory().unwrap();
        let active = Active {
            disk_low: true,
            failed: ids(&["p1"]),
            ..Active::default()
        };
        store
            .record_alarms(
                &active,
                &[(EventKind::Alarm, None, "disk_low: x".to_string())],
            )
            .unwrap();
        let lp = AlarmLoop::new(store, None, Duration::from_secs(30)).unwrap();
        assert_eq!(lp.active, active);
        let ev = lp.store.events_after(0, 10).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].kind, EventKind::Alarm);
        assert_eq!(ev[0].reason.as_deref(), Some("disk_low: x"));
    }
}
