//! The daemon: builds every part and supervises them on one tokio current-thread runtime
//! until SIGTERM/SIGINT (or until idle, for the demo and benchmarks).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tracing::{info, warn};

use crate::bus::{
    self, Loop, MonitorMsg, PublishMsg, ReloadMsg, ReloadSource, SchedMsg, Shared, WatchMsg,
};
use crate::conditions::governor::{self, Governor};
use crate::conditions::monitor;
use crate::config::{Config, ConfigError};
use crate::ingest::{absolute, Ingestor};
use crate::publisher::{self, PublishLoop, Publisher};
use crate::reload::{self, Reloader};
use crate::remote::{self, Remote};
use crate::reporter::{self, Reporter, ReporterError};
use crate::store::{Store, StoreError};
use crate::util::now_ms;
use crate::watcher::{self, IngestLoop, IngestSink, SettleTimes};
use crate::{scheduler, uploader, verify};

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
    /// The configuration names a file that cannot be used (credentials, CA bundle,
    /// password) or lacks credentials: exit 2, like any configuration error.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
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
    /// The config file a reload re-reads; `None`: the embedded demo config.
    pub config_path: Option<PathBuf>,
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

/// Where the ingest loop's news goes: the scheduler (new work) and the publisher (a
/// checklist.json settled).
struct Sink {
    sched: UnboundedSender<SchedMsg>,
    publish: UnboundedSender<PublishMsg>,
    shared: Arc<Shared>,
    ingestor: Arc<Ingestor>,
}

impl IngestSink for Sink {
    fn enqueued(&self) {
        let _ = self.sched.send(SchedMsg::Wake);
        self.shared.poke();
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

/// Everything the supervisor starts, built (blocking: database, first probes, threads)
/// before the runtime runs.
struct Parts {
    shared: Arc<Shared>,
    until_idle: bool,
    scheduler: scheduler::Core,
    workers: Vec<thread::JoinHandle<()>>,
    sched_rx: UnboundedReceiver<SchedMsg>,
    sched_tx: UnboundedSender<SchedMsg>,
    ingest: IngestLoop,
    watch_rx: UnboundedReceiver<WatchMsg>,
    publish: PublishLoop,
    publish_rx: UnboundedReceiver<PublishMsg>,
    monitor: (Arc<Governor>, Store, UnboundedReceiver<MonitorMsg>),
    reporter: Option<Reporter>,
    reloader: Reloader,
    reload_tx: UnboundedSender<ReloadMsg>,
    reload_rx: UnboundedReceiver<ReloadMsg>,
    alarms: crate::alarms::AlarmLoop,
    /// The assignments loop and the MQTT documents the reporter hands it.
    assignments: (
        crate::assignments::AssignmentLoop,
        UnboundedReceiver<Vec<u8>>,
    ),
    /// Kept alive for as long as the daemon runs (inotify on capture and the wake file).
    _watchers: (notify::RecommendedWatcher, notify::RecommendedWatcher),
}

/// Runs the daemon until `shared.shutdown` is cancelled (by SIGTERM/SIGINT or the caller)
/// or, with `until_idle`, until nothing is pending.
///
/// One tokio current-thread runtime supervises: signals, timers and wake-ups are awaited
/// there; SQLite, hashing and transfers run on the blocking pool and the upload workers'
/// threads. Every part selects on the one shutdown token; the stop order is the order in
/// which the supervisor joins them: the scheduler (transfers stop at their next chunk,
/// workers joined, budget persisted), then ingest, the conditions monitor and the
/// publisher, and MQTT last, so `offline` is the final word.
pub fn run(cfg: Config, opts: RunOptions, shared: Arc<Shared>) -> Result<(), DaemonError> {
    limit_malloc_arenas();
    // The runtime and the signal handlers come first: a SIGTERM that arrives while the
    // parts are still being built (a slow start-up repair, a probe) is then held for the
    // supervisor instead of killing the process with the default action.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("fieldsync-blocking")
        .build()
        .map_err(|source| DaemonError::Io {
            what: "start the runtime",
            path: String::new(),
            source,
        })?;
    let signals = {
        let _in_runtime = runtime.enter();
        Signals::install()?
    };
    // How configuration errors name the file (as `config check` does); no path is the
    // embedded demo.
    let config_name = crate::config::source(opts.config_path.as_deref(), true);
    let state_dir = absolute(&cfg.paths.state_dir);
    mkdir(&state_dir)?;
    // Capture never stops because of the agent: make sure the folder exists to watch it.
    mkdir(&cfg.paths.capture)?;
    if let Some(f) = cfg.remote.file.as_ref().filter(|f| f.create) {
        mkdir(&f.path)?;
    }
    // The lock file stays after a daemon stops: its presence tells a lost database from
    // a first start.
    let ran_before = lock_path(&state_dir).exists();
    let _lock = take_lock(&state_dir)?;

    let db_path = state_dir.join("queue.db");
    let mut store = open_or_rebuild(&db_path, ran_before)?;
    if !crate::store::ensure_reserve(&state_dir) {
        warn!(state_dir = %state_dir.display(), "state disk full at start; new photos wait until there is room");
    }
    store.set_daemon_started(std::process::id(), now_ms())?;
    let ingestor = Arc::new(cfg.ingestor());
    let repairs = match verify::repair(&mut store, &ingestor) {
        Ok(r) => r,
        // Nothing was changed (each repair is one transaction, rolled back): the next
        // start repairs what is left, and a full disk must not keep the daemon down.
        Err(e) if crate::store::is_disk_full(&e) => {
            warn!(error = %e, "state disk full; start-up repair postponed");
            Vec::new()
        }
        Err(e) => return Err(e.into()),
    };
    for r in &repairs {
        info!(id = %r.id, path = %r.path, from = %r.from, to = %r.to, reason = %r.reason, "repaired at start-up");
    }

    let remote: Arc<dyn Remote> = Arc::from(
        remote::build(&cfg.remote, &cfg.device_id)
            .map_err(|e| ConfigError::keyed(&config_name, &e))?,
    );
    if let Some(m) = &cfg.mqtt {
        // The password file and certificates, read before the start is logged: one that
        // cannot be used is the one line of a configuration error, as with `config check`.
        crate::mqtt::options(m, "check", None)
            .map_err(|e| ConfigError::keyed(&config_name, &e.to_string()))?;
    }
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

    // Fleet reporting: configuration and store checked now; it runs as a task, joined
    // after every other part so `offline` comes last.
    let (reload_tx, reload_rx) = unbounded_channel::<ReloadMsg>();
    let mut reporter = match &cfg.mqtt {
        Some(m) => Some(
            Reporter::new(m, &cfg.device_id, &db_path, remote.describe()).map_err(|e| match e {
                ReporterError::Mqtt(e) => ConfigError::keyed(&config_name, &e.to_string()).into(),
                ReporterError::Store(e) => DaemonError::from(e),
            })?,
        ),
        None => None,
    };
    let (assign_tx, assign_rx) = unbounded_channel::<Vec<u8>>();
    if let Some(r) = reporter.as_mut() {
        r.set_reloader(reload_tx.clone());
        r.set_assignments(assign_tx);
    }

    let (sched_tx, sched_rx) = unbounded_channel::<SchedMsg>();
    let (mon_tx, mon_rx) = unbounded_channel::<MonitorMsg>();
    let (watch_tx, watch_rx) = unbounded_channel::<WatchMsg>();
    let (publish_tx, publish_rx) = unbounded_channel::<PublishMsg>();

    let capture_watch =
        watcher::watch(ingestor.capture(), watch_tx).map_err(|source| DaemonError::Watch {
            path: ingestor.capture().display().to_string(),
            source,
        })?;
    let wake_watch = watch_wake_file(&state_dir, sched_tx.clone(), reload_tx.clone())?;
    shared.ingest_idle.store(false, Ordering::Relaxed);

    let mut monitor_store = Store::open(&db_path)?;
    let gov = Governor::new(
        &governor::Settings {
            conditions: cfg.conditions.clone(),
            retention: cfg.retention.clone(),
            state_dir: state_dir.clone(),
            capture: ingestor.capture().to_path_buf(),
        },
        &mut monitor_store,
        remote.clone(),
        mon_tx,
        shared.clone(),
    )?;
    let (jobs, workers) = uploader::spawn(
        uploader::WorkerSet {
            upload: cfg.upload.clone(),
            db_path: db_path.clone(),
            remote: remote.clone(),
            ingestor: ingestor.clone(),
            shared: shared.clone(),
            gov: gov.clone(),
        },
        sched_tx.clone(),
    )?;
    let scheduler = scheduler::Core::new(
        store,
        &cfg.upload,
        gov.clone(),
        remote.clone(),
        shared.clone(),
        jobs,
        opts.until_idle,
    )?;
    let ingest = IngestLoop::new(
        ingestor.clone(),
        Store::open(&db_path)?,
        Box::new(Sink {
            sched: sched_tx.clone(),
            publish: publish_tx,
            shared: shared.clone(),
            ingestor: ingestor.clone(),
        }),
        SettleTimes {
            settle: cfg.ingest.settle.0,
            close_settle: cfg.ingest.close_settle.0,
            rescan_interval: cfg.ingest.rescan_interval.0,
        },
    );
    let publish = PublishLoop::new(
        Publisher {
            capture: ingestor.capture().to_path_buf(),
            layout: ingestor.layout().clone(),
            prefix: cfg.remote.prefix.clone(),
            device: cfg.device_id.clone(),
            remote: remote.clone(),
            settle: cfg.ingest.settle.0,
            stall_after: cfg.upload.checklist_alarm_after.map(|d| d.0),
            delete_unreferenced_remote: {
                let gov = gov.clone();
                Arc::new(move || gov.delete_unreferenced_remote())
            },
        },
        Store::open(&db_path)?,
        cfg.upload.sync_interval.0,
    );
    let assignments = crate::assignments::AssignmentLoop {
        store: Store::open(&db_path)?,
        remote: remote.clone(),
        inbox: absolute(&cfg.paths.inbox),
        device: cfg.device_id.clone(),
        key: crate::assignments::remote_key(&cfg.remote.prefix, &cfg.device_id),
        interval: cfg.upload.sync_interval.0,
        cache_limit: {
            let gov = gov.clone();
            Arc::new(move || gov.archived_cache_limit())
        },
        sched: sched_tx.clone(),
        shared: shared.clone(),
    };
    let reload_store = Store::open(&db_path)?;
    let reloader = Reloader {
        path: opts.config_path.clone(),
        handled: reload_store.reload_requested()?.unwrap_or(0),
        mqtt_current: match &cfg.mqtt {
            Some(m) => crate::mqtt::login(m)
                .map_err(|e| ConfigError::keyed(&config_name, &e.to_string()))?,
            None => None,
        },
        mqtt_login: reporter.as_ref().map(Reporter::login_slot),
        running: cfg.clone(),
        gov: gov.clone(),
        remote: remote.clone(),
        sched: sched_tx.clone(),
        store: reload_store,
    };
    let parts = Parts {
        shared: shared.clone(),
        until_idle: opts.until_idle,
        scheduler,
        workers,
        sched_rx,
        sched_tx,
        ingest,
        watch_rx,
        publish,
        publish_rx,
        monitor: (gov, monitor_store, mon_rx),
        reporter,
        reloader,
        reload_tx,
        reload_rx,
        alarms: crate::alarms::AlarmLoop::new(
            Store::open(&db_path)?,
            cfg.upload.pending_alarm_after.map(|d| d.0),
            cfg.upload.sync_interval.0,
        )?,
        assignments: (assignments, assign_rx),
        _watchers: (capture_watch, wake_watch),
    };

    let result = runtime.block_on(supervise(parts, signals));
    info!("fieldsync stopped");
    result
}

/// Starts every part as a task, waits for the scheduler to finish (shutdown, or idle with
/// `until_idle`), then joins the others in order, the MQTT reporter last.
async fn supervise(p: Parts, signals: Signals) -> Result<(), DaemonError> {
    let token = p.shared.shutdown.clone();
    let signals = {
        let token = token.clone();
        let reload_tx = p.reload_tx.clone();
        let Signals {
            mut term,
            mut int,
            mut hup,
        } = signals;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => info!(signal = "SIGTERM", "stopping"),
                    _ = int.recv() => info!(signal = "SIGINT", "stopping"),
                    _ = hup.recv() => {
                        info!(signal = "SIGHUP", "reloading the configuration");
                        let _ = reload_tx.send(ReloadMsg::Reload {
                            source: ReloadSource::Signal,
                            reply: None,
                        });
                        continue;
                    }
                    _ = token.cancelled() => return,
                }
                break;
            }
            token.cancel();
        })
    };
    drop(p.reload_tx);
    let reloader = tokio::spawn(reload::run(p.reloader, p.reload_rx, token.clone()));
    // The reporter's last word (final status, `offline`) waits for `last_word`, sent once
    // every other part is joined (or dropped, should the supervisor itself fail).
    let (last_word, last_word_rx) = tokio::sync::oneshot::channel::<()>();
    let liveness = p.shared.liveness.clone();
    let mut watched = vec![
        Loop::Scheduler,
        Loop::Ingest,
        Loop::Monitor,
        Loop::Publisher,
        Loop::Alarms,
    ];
    if p.reporter.is_some() {
        watched.push(Loop::Reporter);
    }
    let reporter = p.reporter.map(|r| {
        tokio::spawn(reporter::run(
            r,
            token.clone(),
            p.shared.queue_changed.subscribe(),
            last_word_rx,
            liveness.handle(Loop::Reporter),
        ))
    });
    let (gov, monitor_store, mon_rx) = p.monitor;
    let monitor = tokio::spawn(monitor::run(
        gov,
        monitor_store,
        mon_rx,
        p.sched_tx.clone(),
        token.clone(),
        liveness.handle(Loop::Monitor),
    ));
    let ingest = tokio::spawn(watcher::run(
        p.ingest,
        p.watch_rx,
        token.clone(),
        liveness.handle(Loop::Ingest),
    ));
    let publish = tokio::spawn(publisher::run(
        p.publish,
        p.publish_rx,
        p.shared.queue_changed.subscribe(),
        token.clone(),
        liveness.handle(Loop::Publisher),
    ));
    let alarms = tokio::spawn(crate::alarms::run(
        p.alarms,
        p.shared.queue_changed.subscribe(),
        token.clone(),
        liveness.handle(Loop::Alarms),
    ));
    let (assign_loop, assign_rx) = p.assignments;
    let assignments = tokio::spawn(crate::assignments::run(
        assign_loop,
        assign_rx,
        token.clone(),
    ));
    let sched = tokio::spawn(scheduler::run(
        p.scheduler,
        p.workers,
        p.sched_rx,
        p.sched_tx,
    ));
    // Lock held, queue repaired, capture watched: tell systemd (Type=notify) we are up.
    sd_notify(crate::systemd::READY);
    if let Some(interval) = crate::systemd::watchdog_interval() {
        tokio::spawn(watchdog(liveness, watched, interval, token.clone()));
    }

    let result = join(sched).await.map_err(DaemonError::from);
    sd_notify(crate::systemd::STOPPING);
    // Idle exit (or a store error): the other parts stop now.
    token.cancel();
    join(reloader).await;
    join(ingest).await;
    join(monitor).await;
    join(alarms).await;
    join(assignments).await;
    let mut publish = join(publish).await;
    if p.until_idle {
        // Publish what the last uploads completed before exiting.
        publish = tokio::task::spawn_blocking(move || {
            publish.turn(Vec::new());
            publish.settle_and_turn();
            publish
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    }
    drop(publish);
    join(signals).await;
    let _ = last_word.send(());
    if let Some(r) = reporter {
        join(r).await;
    }
    result
}

/// Sends systemd's `WATCHDOG=1` every half `interval` while every `watched` loop is alive
/// ([`bus::wedged`]: none in a blocking turn for longer than `interval`, none ended), so
/// a wedged scheduler or ingest gets the daemon restarted. Ends at shutdown (the stop has
/// its own timeout).
async fn watchdog(
    liveness: Arc<bus::Liveness>,
    watched: Vec<Loop>,
    interval: Duration,
    token: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(interval / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut wedged_before = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = token.cancelled() => return,
        }
        let states: Vec<_> = watched.iter().map(|&l| (l, liveness.state(l))).collect();
        match bus::wedged(&states, std::time::Instant::now(), interval) {
            None => {
                if std::mem::take(&mut wedged_before) {
                    info!("every loop alive again; watchdog pings resume");
                }
                sd_notify(crate::systemd::WATCHDOG);
            }
            Some((l, state)) => {
                if !std::mem::replace(&mut wedged_before, true) {
                    warn!(part = l.as_str(), state = ?state, "a loop is wedged; watchdog pings stop");
                }
            }
        }
    }
}

/// The stop signals, registered before anything else starts.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    /// `systemctl reload`: re-read the configuration.
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Must run inside the runtime's context.
    fn install() -> Result<Signals, DaemonError> {
        let install = |kind| {
            signal(kind).map_err(|source| DaemonError::Io {
                what: "install signal handler",
                path: String::new(),
                source,
            })
        };
        Ok(Signals {
            term: install(SignalKind::terminate())?,
            int: install(SignalKind::interrupt())?,
            hup: install(SignalKind::hangup())?,
        })
    }
}

/// Waits for a task; a panic in it is re-raised here.
async fn join<T>(h: tokio::task::JoinHandle<T>) -> T {
    match h.await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Wakes the scheduler (and the reloader, for `fieldsync reload`) whenever a CLI command
/// touches the wake file.
fn watch_wake_file(
    state_dir: &Path,
    tx: UnboundedSender<SchedMsg>,
    reload: UnboundedSender<ReloadMsg>,
) -> Result<notify::RecommendedWatcher, DaemonError> {
    use notify::Watcher as _;
    notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if ev
                .paths
                .iter()
                .any(|p| p.file_name().is_some_and(|n| n == crate::store::WAKE_FILE))
            {
                let _ = tx.send(SchedMsg::Wake);
                let _ = reload.send(ReloadMsg::Check);
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

/// Opens the queue database; one that is missing (after an earlier run) or corrupt is
/// moved aside and created anew. The first rescan, always full, then re-enqueues the
/// capture folder under the same name-based ids, and the uploader's check before sending
/// finds what is already in the remote.
fn open_or_rebuild(db_path: &Path, ran_before: bool) -> Result<Store, DaemonError> {
    match Store::open_checked(db_path, ran_before)? {
        Ok(store) => Ok(store),
        Err(damage) => {
            warn!(database = %db_path.display(), problem = %damage, "queue database unusable; rebuilding it");
            let (store, rebuilt) = Store::rebuild(db_path, &damage, now_ms())?;
            warn!(reason = %rebuilt.reason, kept_as = rebuilt.kept_as.as_deref().unwrap_or("-"),
                  "queue database rebuilt; the capture folder is rescanned into it");
            Ok(store)
        }
    }
}

/// glibc gives every thread that allocates its own malloc arena (up to 8 per core), and
/// each keeps its touched pages: with the blocking pool's short-lived threads that is half
/// a MiB of idle RSS on a device for nothing. One arena is enough: the threads on the hot
/// path (the upload workers) reuse their buffers and allocate little per chunk.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a glibc tunable; it is called before any thread of ours
    // exists and takes no pointers.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
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
