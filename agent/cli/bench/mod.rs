//! `fieldsync bench`: measures what the performance targets are about and prints numbers.
//!
//! - ingest: photos/s and MB/s hashing and recording 2 MB files, next to the raw sha256
//!   speed of the same bytes (ingest should be bound by disk and hashing, not SQLite);
//! - drain: wall time for N photos through the real daemon into the file remote, with the
//!   daemon's peak RSS;
//! - idle: RSS and CPU time of the daemon over a window with 10,000 synced and 1,000
//!   queued (paused) records.
//!
//! The daemon runs as a child process (this same binary), so RSS and CPU are its own.
//!
//! Built only with the `bench` cargo feature: the device binary carries none of this.
//! `conditions` and `mqtt` are the other two suites.

mod conditions;
mod mqtt;
mod procfs;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::ingest::{hash_file, Outcome};
use crate::store::{NewAttachment, State, Store};

use super::common::LONG_VERSION;
use super::error::{exit, CliError};
use procfs::{cpu_ns, cpu_ns_over};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Which benchmark: `core` (ingest, drain, idle; the default), `conditions` (probe
    /// cost, idle CPU, rate limiter accuracy), `mqtt` (status bytes JSON vs CBOR, RSS
    /// with MQTT on vs off) or `queue` (`status --json` and `list --json --state synced`
    /// on a queue of `--records` records)
    pub suite: Option<String>,
    /// Broker for `mqtt` as HOST:PORT [default: start a local mosquitto]
    #[arg(long, value_name = "HOST:PORT")]
    pub mqtt_broker: Option<String>,
    /// Photos for the drain run
    #[arg(long, default_value_t = 1000)]
    pub photos: usize,
    /// Size of each photo in MB (10^6 bytes)
    #[arg(long, default_value_t = 2.0)]
    pub size_mb: f64,
    /// Photos for the ingest measurement
    #[arg(long, default_value_t = 200)]
    pub ingest_photos: usize,
    /// Records in the queue the `queue` suite times `status --json` and `list` on
    #[arg(long, default_value_t = 100_000)]
    pub records: usize,
    /// Synced and queued records for the idle measurement
    #[arg(long, default_value_t = 10_000)]
    pub idle_synced: usize,
    #[arg(long, default_value_t = 1_000)]
    pub idle_queued: usize,
    /// Length of the idle measurement window
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_window: Duration,
    /// Work directory (default: a new temporary directory, removed afterwards)
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The binary measured as the daemon (default: this one). Pass the device build
    /// (`--no-default-features`, no bench code) to measure exactly what ships.
    #[arg(long, value_name = "PATH")]
    pub daemon: Option<PathBuf>,
}

fn err(e: impl std::fmt::Display) -> CliError {
    CliError::new(exit::FAILURE, format!("bench: {e}"))
}

pub fn run(args: BenchArgs) -> Result<i32, CliError> {
    match args.suite.as_deref() {
        None | Some("core") => core(args),
        Some("conditions") => {
            conditions::run(args.idle_window.as_secs())
                .map_err(|e| err(format!("conditions: {e}")))?;
            Ok(exit::OK)
        }
        Some("mqtt") => mqtt::run(args.mqtt_broker.as_deref()),
        Some("queue") => queue(args),
        Some(other) => Err(CliError::new(
            exit::USAGE,
            format!("bench: unknown suite `{other}` (expected core, conditions, mqtt or queue)"),
        )),
    }
}

fn core(args: BenchArgs) -> Result<i32, CliError> {
    let tmp;
    let base = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempdir("fieldsync-bench-")?;
            tmp.path().to_path_buf()
        }
    };
    let size = (args.size_mb * 1e6) as usize;
    println!("fieldsync bench ({} on {})", LONG_VERSION, base.display());

    // --- ingest ---------------------------------------------------------------------
    let env = BenchEnv::new(&base.join("ingest"), args.daemon.as_deref())?;
    let files = env.make_photos(args.ingest_photos, size, 0)?;
    let total_bytes = (files.len() * size) as f64;
    let cfg = env.config()?;
    let ingestor = cfg.ingestor();
    let mut store = Store::open(&cfg.db_path()).map_err(err)?;
    // Raw hash and ingest of each file alternate, so a machine whose load changes during
    // the run slows both alike and the ratio stays meaningful.
    let (mut hash_secs, mut ingest_secs) = (0.0, 0.0);
    for f in &files {
        let t = Instant::now();
        hash_file(f).map_err(err)?;
        hash_secs += t.elapsed().as_secs_f64();
        let t = Instant::now();
        match ingestor.ingest(&mut store, f).map_err(err)? {
            Outcome::Enqueued(_) => {}
            o => return Err(err(format!("unexpected ingest outcome {o:?}"))),
        }
        ingest_secs += t.elapsed().as_secs_f64();
    }
    println!(
        "ingest: {} x {:.1} MB: {:.0} photos/s, {:.0} MB/s (raw sha256 of the same files: {:.0} MB/s; ingest at {:.0} % of it, target >= 90 %)",
        files.len(),
        args.size_mb,
        files.len() as f64 / ingest_secs,
        total_bytes / 1e6 / ingest_secs,
        total_bytes / 1e6 / hash_secs,
        100.0 * hash_secs / ingest_secs
    );
    drop(store);
    let _ = fs::remove_dir_all(&env.root);

    // --- drain ----------------------------------------------------------------------
    let env = BenchEnv::new(&base.join("drain"), args.daemon.as_deref())?;
    env.make_photos(args.photos, size, 1)?;
    let t = Instant::now();
    let child = env.spawn(&["run", "--until-idle"])?;
    let (peak, _) = watch_until_exit(child)?;
    let secs = t.elapsed().as_secs_f64();
    let cfg = env.config()?;
    let store = Store::open(&cfg.db_path()).map_err(err)?;
    let synced = store
        .counts()
        .map_err(err)?
        .iter()
        .find(|(s, _)| *s == crate::store::State::Synced)
        .map(|(_, c)| c.count)
        .unwrap_or(0);
    println!(
        "drain: {} x {:.1} MB into the file remote: {:.1} s, {:.0} photos/s, {:.0} MB/s, {} synced, daemon peak RSS {:.1} MiB",
        args.photos,
        args.size_mb,
        secs,
        args.photos as f64 / secs,
        (args.photos * size) as f64 / 1e6 / secs,
        synced,
        peak as f64 / 1024.0
    );
    drop(store);
    let _ = fs::remove_dir_all(&env.root);

    // --- idle -----------------------------------------------------------------------
    let env = BenchEnv::new(&base.join("idle"), args.daemon.as_deref())?;
    env.seed_records(args.idle_synced, args.idle_queued)?;
    // The periodic rescan's cost, through the same code path, amortised over its interval.
    let cfg = env.config()?;
    let (unknown, full_pass, periodic_pass) = {
        let ingestor = cfg.ingestor();
        let store = Store::open(&cfg.db_path()).map_err(err)?;
        let mut dirs = Default::default();
        let mut unknown = 0;
        let mut pass = |full| {
            let t = Instant::now();
            crate::watcher::rescan_pass(
                &ingestor,
                &store,
                ingestor.capture(),
                &mut dirs,
                full,
                &mut |_| unknown += 1,
            );
            t.elapsed()
        };
        let full = pass(true);
        let periodic = pass(false);
        (unknown, full, periodic)
    };
    let child = env.spawn(&["run"])?;
    let pid = child.id();
    // Start-up (verify, first full rescan, watches) runs before the window opens.
    let t = Instant::now();
    while cpu_ns(pid).map_err(err)? == 0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(5));
    let startup_ms = cpu_ns(pid).map_err(err)? as f64 / 1e6;
    let used = cpu_ns_over(pid, args.idle_window).map_err(err)?;
    let rss = procfs::status_kib(pid, "VmRSS:")
        .ok_or_else(|| err(format!("no VmRSS: in /proc/{pid}/status")))?;
    stop(child);
    let cpu_ms = used as f64 / 1e6;
    let per_min = cpu_ms * 60.0 / args.idle_window.as_secs_f64();
    println!(
        "idle: {} synced + {} queued (paused) records: RSS {:.1} MiB, CPU {:.1} ms over {:?} = {:.1} ms/min (start-up used {:.0} ms CPU)",
        args.idle_synced,
        args.idle_queued,
        rss as f64 / 1024.0,
        cpu_ms,
        args.idle_window,
        per_min,
        startup_ms
    );
    let interval = cfg.ingest.rescan_interval.0.as_secs_f64();
    println!(
        "rescan of {} files: full pass (start-up, inotify overflow) {:.0} ms; periodic pass every {:.0} s {:.2} ms = {:.3} ms/min amortised",
        args.idle_synced + args.idle_queued,
        full_pass.as_secs_f64() * 1e3,
        interval,
        periodic_pass.as_secs_f64() * 1e3,
        periodic_pass.as_secs_f64() * 1e3 * 60.0 / interval
    );
    if unknown > 0 {
        return Err(err(
            "rescan found unknown files in a fully recorded capture folder",
        ));
    }
    let _ = fs::remove_dir_all(&env.root);
    Ok(exit::OK)
}

/// How many times each command runs in the `queue` suite (the first one warms the page
/// cache, as on a device where the daemon keeps the database hot).
const QUEUE_RUNS: usize = 7;

/// The CLI's answer time on a large queue: `status --json` and `list --json --state
/// synced`, each run as its own process (what an operator or a script waits for), with
/// the daemon's typical mix of records (mostly synced, some queued, a few failed).
fn queue(args: BenchArgs) -> Result<i32, CliError> {
    let tmp = tempdir("fieldsync-bench-queue-")?;
    let base = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let env = BenchEnv::new(&base.join("queue"), args.daemon.as_deref())?;
    let cfg = env.config()?;
    let n = args.records;
    let t = Instant::now();
    {
        let mut store = Store::open(&cfg.db_path()).map_err(err)?;
        let records: Vec<NewAttachment> = (0..n)
            .map(|i| {
                let id = uuid::Uuid::new_v4().to_string();
                let state = match i % 100 {
                    0 => State::Failed,
                    1..=4 => State::QueuedUpload,
                    _ => State::Synced,
                };
                NewAttachment {
                    filename: format!("IMG_{i:06}.jpg"),
                    local_uri: format!(
                        "/var/lib/fieldsync/capture/c-{}/r-{}/IMG_{i:06}.jpg",
                        i / 1000,
                        i % 10
                    ),
                    size: 2_000_000,
                    media_type: "image/jpeg".into(),
                    meta_data: None,
                    checklist: format!("c-{}", i / 1000),
                    row: format!("r-{}", i % 10),
                    sha256: format!("{:064x}", i),
                    mtime_ns: 1_700_000_000_000_000_000 + i as i64,
                    object_key: format!("bench/{id}.jpg"),
                    ctime_ns: None,
                    error: (state == State::Failed)
                        .then(|| ("http_400".to_string(), "bad request".to_string())),
                    state,
                    id,
                }
            })
            .collect();
        store.import(&records).map_err(err)?;
    }
    println!(
        "queue: {n} records (95 % synced, 4 % queued, 1 % failed) built in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    for cmd in [
        &["status", "--json"][..],
        &["list", "--json", "--state", "synced"][..],
    ] {
        let mut times = Vec::with_capacity(QUEUE_RUNS);
        let mut bytes = 0;
        for _ in 0..QUEUE_RUNS {
            let t = Instant::now();
            let out = env.command(cmd)?.output().map_err(err)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            if !out.status.success() {
                return Err(err(format!(
                    "{} failed: {}",
                    cmd.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            bytes = out.stdout.len();
        }
        let first = times[0];
        let warm = &mut times[1..];
        warm.sort_by(f64::total_cmp);
        let median = warm[warm.len() / 2];
        println!(
            "queue: {:<32} median {median:.0} ms (range {:.0}-{:.0} ms, first run {:.0} ms), {:.1} MB of output: target <= 100 ms {}",
            cmd.join(" "),
            warm[0],
            warm[warm.len() - 1],
            first,
            bytes as f64 / 1e6,
            if median <= 100.0 { "met" } else { "MISSED" }
        );
    }
    let _ = fs::remove_dir_all(&env.root);
    Ok(exit::OK)
}

/// A new directory under the system temp dir, removed on drop.
fn tempdir(prefix: &str) -> Result<tempfile::TempDir, CliError> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(err)
}

/// A capture/state/remote layout with its own config file.
struct BenchEnv {
    root: PathBuf,
    /// The daemon binary under test.
    exe: Option<PathBuf>,
}

impl BenchEnv {
    fn new(root: &Path, exe: Option<&Path>) -> Result<BenchEnv, CliError> {
        let _ = fs::remove_dir_all(root);
        for d in ["capture", "state", "remote"] {
            fs::create_dir_all(root.join(d)).map_err(err)?;
        }
        let toml = format!(
            "device_id = \"bench\"\n[paths]\ncapture = \"{r}/capture\"\nstate_dir = \"{r}/state\"\n\
             [ingest]\nsettle = \"500ms\"\nclose_settle = \"100ms\"\n\
             [log]\nlevel = \"warn\"\n\
             [remote]\nkind = \"file\"\n[remote.file]\npath = \"{r}/remote\"\n",
            r = root.display()
        );
        fs::write(root.join("fieldsync.toml"), toml).map_err(err)?;
        Ok(BenchEnv {
            root: root.to_path_buf(),
            exe: exe.map(Path::to_path_buf),
        })
    }

    fn config(&self) -> Result<Config, CliError> {
        Config::load(&self.root.join("fieldsync.toml")).map_err(err)
    }

    /// Writes `n` distinct photos of `size` bytes into checklist/row folders.
    fn make_photos(&self, n: usize, size: usize, seed: u64) -> Result<Vec<PathBuf>, CliError> {
        let mut out = Vec::with_capacity(n);
        let mut buf = vec![0u8; size];
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for i in 0..n {
            for chunk in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let b = x.to_le_bytes();
                chunk.copy_from_slice(&b[..chunk.len()]);
            }
            let p = self
                .root
                .join("capture")
                .join(format!("checklist-{}", i / 100))
                .join(format!("row-{}", i % 10))
                .join(format!("IMG_{i:05}.jpg"));
            fs::create_dir_all(p.parent().unwrap()).map_err(err)?;
            let mut f = fs::File::create(&p).map_err(err)?;
            f.write_all(&buf).map_err(err)?;
            out.push(p);
        }
        Ok(out)
    }

    /// Creates small files and their records directly (one transaction): `synced` ones
    /// and `queued` ones with uploads paused.
    fn seed_records(&self, synced: usize, queued: usize) -> Result<(), CliError> {
        let cfg = self.config()?;
        let files = self.make_photos(synced + queued, 1024, 2)?;
        let ingestor = cfg.ingestor();
        let mut store = Store::open(&cfg.db_path()).map_err(err)?;
        store.set_operator_paused(true).map_err(err)?;
        let mut records = Vec::with_capacity(files.len());
        for (i, f) in files.iter().enumerate() {
            let meta = fs::metadata(f).map_err(err)?;
            let (sha, _) = hash_file(f).map_err(err)?;
            let id = uuid::Uuid::new_v4().to_string();
            records.push(NewAttachment {
                filename: "x.jpg".into(),
                local_uri: f.to_string_lossy().into_owned(),
                size: meta.len() as i64,
                media_type: "image/jpeg".into(),
                meta_data: None,
                checklist: "c".into(),
                row: "r".into(),
                sha256: sha,
                mtime_ns: crate::util::mtime_ns(&meta),
                object_key: format!("bench/{id}.jpg"),
                ctime_ns: None,
                state: if i < synced {
                    State::Synced
                } else {
                    State::QueuedUpload
                },
                error: None,
                id,
            });
        }
        store.import(&records).map_err(err)?;
        drop(ingestor);
        Ok(())
    }

    /// The measured binary with this environment's config and `args`.
    fn command(&self, args: &[&str]) -> Result<Command, CliError> {
        let exe = match &self.exe {
            Some(p) => p.clone(),
            None => std::env::current_exe().map_err(err)?,
        };
        let mut c = Command::new(exe);
        c.arg("--config")
            .arg(self.root.join("fieldsync.toml"))
            .args(args)
            .stdin(Stdio::null());
        Ok(c)
    }

    fn spawn(&self, args: &[&str]) -> Result<Child, CliError> {
        self.command(args)?
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(err)
    }
}

/// Polls the child's peak RSS (VmHWM, KiB) until it exits.
fn watch_until_exit(mut child: Child) -> Result<(u64, i32), CliError> {
    let pid = child.id();
    let mut peak = 0;
    loop {
        if let Some(kib) = procfs::status_kib(pid, "VmHWM:") {
            peak = peak.max(kib);
        }
        if let Some(st) = child.try_wait().map_err(err)? {
            return Ok((peak, st.code().unwrap_or(-1)));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}
