//! The messages the daemon's parts send each other, and the little state they share.
//!
//! One small module that every part may import and that imports none of them, so no two
//! parts import each other for the sake of a message type. Channels are tokio's: the async
//! drivers await them, and the blocking threads (upload workers, the inotify callback)
//! send on them without blocking.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Messages to the scheduler.
#[derive(Debug)]
pub enum SchedMsg {
    /// Something may have become due: a new file, a CLI command, a condition change.
    Wake,
    /// A worker let go of an attachment.
    Done { id: String, outcome: Done },
    /// The result of a credentials re-check while paused for `auth`.
    AuthProbe { ok: bool },
    /// A reload brought new remote credentials: re-check them now if paused for `auth`.
    CredentialsChanged,
    /// The result of a re-check while paused for `clock_skew`: whether the remote
    /// accepts the device clock again.
    ClockProbe { ok: bool },
}

/// What a worker reports about an attachment it held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    Finished,
    /// The store refused a write (disk full, I/O error): the row could not be updated, so
    /// the scheduler holds it back for a while instead of re-sending it in a tight loop.
    StoreFailed,
    /// Stopped at a safe point (shutdown, pause, a condition turned false).
    Interrupted,
    /// The remote refused the credentials: the whole queue pauses.
    AuthFailed,
    /// The remote refused the device clock: the whole queue pauses until it is right.
    ClockSkewed,
}

/// Messages to the conditions monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitorMsg {
    /// A request failed in a way that suggests the network: probe the remote now.
    NetworkFailed,
    /// An upload finished: apply the routine retention rules.
    Sweep,
}

/// Messages into the ingest loop, from inotify.
#[derive(Debug)]
pub enum WatchMsg {
    /// Something happened to this path; `closed` when it was a close-after-write.
    Changed {
        path: PathBuf,
        closed: bool,
    },
    /// A directory appeared: scan it (its files may predate its watch).
    DirCreated(PathBuf),
    Removed(PathBuf),
    /// inotify lost events: rescan everything.
    Rescan,
}

/// Where a reload request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadSource {
    /// SIGHUP (`systemctl reload fieldsync`).
    Signal,
    /// `fieldsync reload`, through the store and the wake file.
    Cli,
    /// MQTT `cmd/reload`.
    Mqtt,
}

impl ReloadSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadSource::Signal => "signal",
            ReloadSource::Cli => "cli",
            ReloadSource::Mqtt => "mqtt",
        }
    }
}

/// Messages to the reloader.
#[derive(Debug)]
pub enum ReloadMsg {
    /// Re-read the configuration and its secret files; the outcome (what changed, or the
    /// one-line error that refused it) goes to `reply` when given.
    Reload {
        source: ReloadSource,
        reply: Option<std::sync::mpsc::Sender<Result<String, String>>>,
    },
    /// The wake file was touched: a `fieldsync reload` may be waiting in the store.
    Check,
}

/// Messages to the publisher.
#[derive(Debug)]
pub enum PublishMsg {
    /// This checklist's `checklist.json` changed (it settled): check it now.
    Check(String),
}

/// Flags read on the hot path of every upload chunk, shared by the scheduler, the workers
/// and the supervisor. Atomics, because workers are plain threads.
#[derive(Debug, Default)]
pub struct Shared {
    /// The daemon's one stop signal: cancelled by SIGTERM/SIGINT or by the caller.
    pub shutdown: CancellationToken,
    /// False while a condition pauses uploads: workers stop at the next safe point.
    pub gate_open: AtomicBool,
    /// True while the ingest loop has nothing left to settle (for `run --until-idle`).
    pub ingest_idle: AtomicBool,
    /// Bumped whenever the queue changed (a file enqueued, an upload finished, a CLI
    /// command): the publisher and the reporter wait on it instead of polling.
    pub queue_changed: watch::Sender<u64>,
    /// Whether each async loop is alive, for the systemd watchdog.
    pub liveness: Arc<Liveness>,
    /// Uploads in flight whose photo an operator deleted meanwhile: their workers stop at
    /// the next safe point, so the delete can abort the multipart upload.
    pub cancelled: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Shared {
    /// Tells whoever waits on [`Shared::queue_changed`] that the queue changed.
    pub fn poke(&self) {
        self.queue_changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Checked by workers at every safe point (each chunk, each part).
    pub fn keep_going(&self) -> bool {
        !self.shutdown.is_cancelled() && self.gate_open.load(Ordering::Relaxed)
    }

    /// Stops the upload of `id` at its next safe point (or, `on` false, forgets that).
    pub fn cancel(&self, id: &str, on: bool) {
        let mut c = self.cancelled.lock().unwrap_or_else(|e| e.into_inner());
        if on {
            c.insert(id.to_string());
        } else {
            c.remove(id);
        }
    }

    /// Whether the upload of `id` was cancelled (checked with [`Shared::keep_going`]).
    pub fn is_cancelled(&self, id: &str) -> bool {
        let c = self.cancelled.lock().unwrap_or_else(|e| e.into_inner());
        !c.is_empty() && c.contains(id)
    }
}

/// The supervisor's async loops, whose liveness the systemd watchdog vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loop {
    Scheduler,
    Ingest,
    Monitor,
    Publisher,
    Reporter,
    Alarms,
}

impl Loop {
    pub const ALL: [Loop; 6] = [
        Loop::Scheduler,
        Loop::Ingest,
        Loop::Monitor,
        Loop::Publisher,
        Loop::Reporter,
        Loop::Alarms,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Loop::Scheduler => "scheduler",
            Loop::Ingest => "ingest",
            Loop::Monitor => "monitor",
            Loop::Publisher => "publisher",
            Loop::Reporter => "reporter",
            Loop::Alarms => "alarms",
        }
    }
}

/// What a loop is doing, as the watchdog sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopState {
    /// Waiting for a message or a timer on the runtime: alive (a runtime that hangs stops
    /// the watchdog task with it).
    Idle,
    /// In a blocking turn (SQLite, hashing, a probe) since this instant.
    Busy(Instant),
    /// The task ended (returned or panicked).
    Exited,
}

/// Each loop's state, in atomics: the loops mark themselves, the watchdog task reads.
///
/// A loop is wedged when one blocking turn has run longer than the watchdog allows, or
/// when its task ended while the daemon runs. Marking the turns, rather than having every
/// loop wake up to say "still here", keeps an idle device idle: a loop waiting on the
/// runtime cannot be stuck unless the runtime is, and then the pings stop anyway.
#[derive(Debug, Default)]
pub struct Liveness {
    /// Per [`Loop`]: 0 idle, `u64::MAX` exited, else 1 + ms since [`epoch`] when the
    /// current turn began.
    slots: [AtomicU64; 6],
}

/// The monotonic origin of [`Liveness`]' instants.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

const EXITED: u64 = u64::MAX;

impl Liveness {
    fn slot(&self, l: Loop) -> &AtomicU64 {
        &self.slots[l as usize]
    }

    pub fn state(&self, l: Loop) -> LoopState {
        match self.slot(l).load(Ordering::Relaxed) {
            0 => LoopState::Idle,
            EXITED => LoopState::Exited,
            ms => LoopState::Busy(epoch() + Duration::from_millis(ms - 1)),
        }
    }

    /// The handle a loop marks itself with; when it is dropped (the task ended, or
    /// unwound) the loop counts as exited.
    pub fn handle(self: &Arc<Self>, l: Loop) -> LoopBeat {
        self.slot(l).store(0, Ordering::Relaxed);
        LoopBeat {
            liveness: self.clone(),
            which: l,
        }
    }
}

/// A loop's mark in [`Liveness`]; see [`LoopBeat::busy`].
#[derive(Debug)]
pub struct LoopBeat {
    liveness: Arc<Liveness>,
    which: Loop,
}

impl LoopBeat {
    /// Marks a blocking turn as begun; the turn ends when the guard is dropped.
    pub fn busy(&self) -> BusyGuard<'_> {
        let ms = epoch().elapsed().as_millis() as u64 + 1;
        self.liveness.slot(self.which).store(ms, Ordering::Relaxed);
        BusyGuard(self)
    }
}

impl Drop for LoopBeat {
    fn drop(&mut self) {
        self.liveness
            .slot(self.which)
            .store(EXITED, Ordering::Relaxed);
    }
}

/// A blocking turn in progress; see [`LoopBeat::busy`].
#[derive(Debug)]
pub struct BusyGuard<'a>(&'a LoopBeat);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0
            .liveness
            .slot(self.0.which)
            .store(0, Ordering::Relaxed);
    }
}

/// The first loop that is not alive: one of `watched` whose task ended, or whose
/// blocking turn began more than `max_turn` before `now` (pure; the watchdog's decision).
pub fn wedged(
    states: &[(Loop, LoopState)],
    now: Instant,
    max_turn: Duration,
) -> Option<(Loop, LoopState)> {
    states.iter().copied().find(|(_, st)| match st {
        LoopState::Idle => false,
        LoopState::Exited => true,
        LoopState::Busy(since) => now.saturating_duration_since(*since) > max_turn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_turn_or_an_ended_loop_is_wedged_an_idle_one_is_not() {
        let t0 = Instant::now();
        let max = Duration::from_secs(30);
        let idle = [
            (Loop::Scheduler, LoopState::Idle),
            (Loop::Ingest, LoopState::Idle),
        ];
        assert_eq!(wedged(&idle, t0 + max * 100, max), None);
        let busy = [
            (Loop::Scheduler, LoopState::Idle),
            (Loop::Ingest, LoopState::Busy(t0)),
        ];
        assert_eq!(wedged(&busy, t0 + max, max), None);
        assert_eq!(
            wedged(&busy, t0 + max + Duration::from_millis(1), max),
            Some((Loop::Ingest, LoopState::Busy(t0)))
        );
        let ended = [(Loop::Publisher, LoopState::Exited)];
        assert_eq!(wedged(&ended, t0, max).map(|w| w.0), Some(Loop::Publisher));
    }

    #[test]
    fn handles_mark_turns_and_the_end_of_their_loop() {
        let l = Arc::new(Liveness::default());
        let beat = l.handle(Loop::Ingest);
        assert_eq!(l.state(Loop::Ingest), LoopState::Idle);
        {
            let _turn = beat.busy();
            assert!(matches!(l.state(Loop::Ingest), LoopState::Busy(_)));
        }
        assert_eq!(l.state(Loop::Ingest), LoopState::Idle);
        drop(beat);
        assert_eq!(l.state(Loop::Ingest), LoopState::Exited);
        assert_eq!(l.state(Loop::Monitor), LoopState::Idle);
    }
}
