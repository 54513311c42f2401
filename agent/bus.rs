//! The messages the daemon's parts send each other, and the little state they share.
//!
//! One small module that every part may import and that imports none of them, so no two
//! parts import each other for the sake of a message type. Channels are tokio's: the async
//! drivers await them, and the blocking threads (upload workers, the inotify callback)
//! send on them without blocking.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

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
}
