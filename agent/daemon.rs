//! The daemon: wires watcher, ingest, scheduler and workers together and runs them until
//! SIGTERM/SIGINT (or until idle, for the demo and benchmarks).
//!
//! Threads, not an async runtime: every part does blocking work (SQLite, file hashing,
//! blocking HTTP), the part count is small and fixed, and plain threads keep the binary
//! and its idle footprint small on the device.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tracing::{info, warn};

use crate::config::Config;
use crate::ingest::{absolute, Ingestor};
use crate::publisher::{PublishMsg, Publisher};
use crate::remote::{self, Remote};
use crate::reporter::Reporter;
use crate::store::{Store, StoreError};
use crate::uploader::{control, Msg, Scheduler, Shared};
use crate::util::now_ms;
use crate::verify;
use crate::watcher::{self, IngestLoop, IngestSink, WatchMsg};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("another fieldsync daemon (pid {pid}) is running on {state_dir}")]
    AlreadyRunning { pid: String, state_dir: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("remote: {0}")]
    Remote(String),
    #[error("watch {path}: {source}")]
    Watch { path: String, source: notify::Error },
    #[error(transparent)]
    Reporter(#[from] crate::reporter::ReporterError),
}

/// How `run` behaves beyond the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop once nothing is pending (the demo, benchmarks).
    pub until_idle: bool,
    /// Create the file remote's root folder (the demo; a real share must already exist).
    pub create_remote_root: bool,
}

/// The lock file that makes one daemon per state directory, and tells the CLI whether a
/// daemon is running.
pub fn lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("fieldsync.lock")
}

/// The pid of the daemon running on `state_dir`, if one holds the lock.
pub fn running_pid(state_dir: &Path) -> Option<String> {
    let mut f = File::open(lock_path(state_dir)).ok()?;
    match f.try_lock_shared() {
        Ok(()) => None,
        Err(_) => {
            let mut s = String::new();
            let _ = f.read_to_string(&mut s);
            Some(s.trim().to_string())
        }
    }
}

fn take_lock(state_dir: &Path) -> Result<File, DaemonError> {
    let path = lock_path(state_dir);
    let io = |source| DaemonError::Io {
        what: "lock",
        path: path.display().to_string(),
        source,
    };
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    // A CLI checking `running_pid` holds a shared lock for a moment: retry briefly.
    let mut tries = 0;
    loop {
        match f.try_lock() {
            Ok(()) => break,
            Err(_) if tries < 10 && running_pid(state_dir).is_none() => {
                tries += 1;
                thread::sleep(Duration::from_millis(50));
            }
            Err(_) => {
                return Err(DaemonError::AlreadyRunning {
                    pid: running_pid(state_dir).unwrap_or_else(|| "?".into()),
                    state_dir: state_dir.display().to_string(),
                })
            }
        }
    }
    f.set_len(0).map_err(io)?;
    f.rewind().map_err(io)?;
    write!(f, "{}", std::process::id()).map_err(io)?;
    Ok(f)
}

struct Sink {
    tx: Sender<Msg>,
    shared: Arc<Shared>,
    publish: Sender<PublishMsg>,
    ingestor: Arc<Ingestor>,
}

impl IngestSink for Sink {
    fn enqueued(&self) {
        let _ = self.tx.send(Msg::Wake);
    }
    fn set_idle(&self, idle: bool) {
        self.shared.ingest_idle.store(idle, Ordering::Relaxed);
    }
    fn checklist_changed(&self, path: &Path) {
        let name = path
            .strip_prefix(self.ingestor.capture())
            .ok()
            .and_then(|rel| self.ingestor.layout().checklist_of_file(rel));
        if let Some(name) = name {
            let _ = self.publish.send(PublishMsg::Check(name));
        }
    }
}

/// Runs the daemon until `shared.shutdown` is set (by a signal or the caller) or, with
/// `until_idle`, until nothing is pending.
pub fn run(cfg: Config, opts: RunOptions, shared: Arc<Shared>) -> Result<(), DaemonError> {
    let cfg = Arc::new(cfg);
    let state_dir = absolute(&cfg.paths.state_dir);
    mkdir(&state_dir)?;
    // Capture never stops because of the agent: make sure the folder exists to watch it.
    mkdir(&cfg.paths.capture)?;
    if opts.create_remote_root {
        if let Some(f) = &cfg.remote.file {
            mkdir(&f.path)?;
        }
    }
    let _lock = take_lock(&state_dir)?;

    let db_path = state_dir.join("queue.db");
    let mut store = Store::open(&db_path)?;
    store.control_set(control::PID, &std::process::id().to_string())?;
    store.control_set(control::STARTED_AT, &now_ms().to_string())?;
    let ingestor = Arc::new(Ingestor::new(&cfg));
    let repairs = verify::repair(&mut store, &ingestor)?;
    for r in &repairs {
        info!(id = %r.id, path = %r.path, from = %r.from, to = %r.to, reason = %r.reason, "repaired at start-up");
    }

    let remote: Arc<dyn Remote> = Arc::from(remote::build(&cfg).map_err(DaemonError::Remote)?);
    info!(
        version = env!("CARGO_PKG_VERSION"),
        device = %cfg.device_id,
        capture = %ingestor.capture().display(),
        remote = %remote.describe(),
        repaired = repairs.len(),
        "fieldsync started"
    );
    if let Err(e) = remote.probe() {
        warn!(error = %e, "remote not reachable yet; uploads will retry");
    }

    // SIGTERM/SIGINT: set the shutdown flag and wake the scheduler, which stops workers at
    // their next safe point. The handler itself only writes to a pipe (signal-hook).
    let (tx, rx) = mpsc::channel::<Msg>();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(|source| DaemonError::Io {
        what: "install signal handler",
        path: String::new(),
        source,
    })?;
    let signal_handle = signals.handle();
    {
        let shared = shared.clone();
        let tx = tx.clone();
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    info!(signal = sig, "stopping");
                    shared.shutdown.store(true, Ordering::Relaxed);
                    let _ = tx.send(Msg::Wake);
                }
            })
            .expect("spawn signal thread");
    }

    // Fleet reporting: its own threads, stopped after uploads so `offline` comes last.
    let reporter = match cfg.mqtt {
        Some(_) => Some(Reporter::spawn(&cfg, &db_path, remote.describe())?),
        None => None,
    };

    let (wtx, wrx) = mpsc::channel::<WatchMsg>();
    let _watcher =
        watcher::watch(ingestor.capture(), wtx.clone()).map_err(|source| DaemonError::Watch {
            path: ingestor.capture().display().to_string(),
            source,
        })?;
    let _wake_watch = watch_wake_file(&state_dir, tx.clone())?;
    shared.ingest_idle.store(false, Ordering::Relaxed);
    let (ptx, prx) = mpsc::channel::<PublishMsg>();
    let publish_thread = {
        let publisher = Publisher {
            capture: ingestor.capture().to_path_buf(),
            layout: ingestor.layout().clone(),
            prefix: cfg.remote.prefix.clone(),
            device: cfg.device_id.clone(),
            remote: remote.clone(),
        };
        let mut store = Store::open(&db_path)?;
        let retry = cfg.upload.sync_interval.0;
        thread::Builder::new()
            .name("publish".into())
            .spawn(move || publisher.run(&mut store, prx, retry))
            .expect("spawn publisher thread")
    };
    let ingest_thread = {
        let ingestor = ingestor.clone();
        let mut store = Store::open(&db_path)?;
        let sink = Sink {
            tx: tx.clone(),
            shared: shared.clone(),
            publish: ptx.clone(),
            ingestor: ingestor.clone(),
        };
        let lp = IngestLoop {
            settle: cfg.ingest.settle.0,
            close_settle: cfg.ingest.close_settle.0,
            rescan_interval: cfg.ingest.rescan_interval.0,
        };
        thread::Builder::new()
            .name("ingest".into())
            .spawn(move || lp.run(&ingestor, &mut store, wrx, &sink))
            .expect("spawn ingest thread")
    };

    let scheduler = Scheduler {
        cfg: cfg.clone(),
        db_path: db_path.clone(),
        remote: remote.clone(),
        ingestor: ingestor.clone(),
        shared: shared.clone(),
        tx,
        rx,
        until_idle: opts.until_idle,
    };
    // Lock held, queue repaired, capture watched: tell systemd (Type=notify) we are up.
    sd_notify(crate::systemd::READY);
    let result = scheduler.run(store);
    sd_notify(crate::systemd::STOPPING);
    shared.shutdown.store(true, Ordering::Relaxed);
    let _ = wtx.send(WatchMsg::Shutdown);
    let _ = ingest_thread.join();
    if opts.until_idle {
        // Publish what the last uploads completed before exiting.
        let _ = ptx.send(PublishMsg::Flush);
    }
    let _ = ptx.send(PublishMsg::Shutdown);
    let _ = publish_thread.join();

    if let Some(r) = reporter {
        r.stop();
    }
    signal_handle.close();
    info!("fieldsync stopped");
    result.map_err(Into::into)
}

/// Wakes the scheduler whenever a CLI command touches the wake file.
fn watch_wake_file(
    state_dir: &Path,
    tx: Sender<Msg>,
) -> Result<notify::RecommendedWatcher, DaemonError> {
    use notify::Watcher as _;
    notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if ev
                .paths
                .iter()
                .any(|p| p.file_name().is_some_and(|n| n == crate::store::WAKE_FILE))
            {
                let _ = tx.send(Msg::Wake);
            }
        }
    })
    .and_then(|mut w| {
        w.watch(state_dir, notify::RecursiveMode::NonRecursive)
            .map(|_| w)
    })
    .map_err(|source| DaemonError::Watch {
        path: state_dir.display().to_string(),
        source,
    })
}

/// Readiness for systemd; a failure is logged, never fatal.
fn sd_notify(state: &str) {
    if let Err(e) = crate::systemd::notify(state) {
        warn!(error = %e, state, "cannot notify systemd");
    }
}

fn mkdir(p: &Path) -> Result<(), DaemonError> {
    fs::create_dir_all(p).map_err(|source| DaemonError::Io {
        what: "create directory",
        path: p.display().to_string(),
        source,
    })
}
