//! `fieldsync bench conditions`: the idle cost of condition probing and the accuracy of
//! the rate limiter. Prints numbers; needs no services.
//!
//! - Probe cost: the CPU time (this thread's utime+stime) of one probe round (route,
//!   battery, thermal zones, two statvfs, local time) over many rounds, on a fake tree
//!   shaped like a field device and on this machine's own /proc and /sys, extrapolated
//!   to an hour at the default 5 s interval.
//! - Idle daemon: utime+stime of a real `fieldsync run` with nothing to do, over
//!   `--idle-secs`, from /proc/<pid>/task/*/schedstat (all threads: probes, scheduler,
//!   watcher), once with probes every 5 s and once every hour: the difference is probing.
//! - Rate limiter: real file-remote uploads throttled by the token bucket, measured
//!   against the configured rate.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::conditions::governor::Bucket;
use crate::conditions::probes::{self, Probes};
use crate::remote::file::FileRemote;
use crate::remote::{Remote, RemoteError, ResumeLog, UploadCtx, UploadJob};
use crate::store::PartRecord;

use super::procfs::cpu_ns_over;

/// Probe rounds measured per tree: enough for a stable per-round figure in ~1 s.
const ROUNDS: u32 = 20_000;
/// Rounds per hour at the default probe interval (5 s).
const ROUNDS_PER_HOUR: f64 = 3600.0 / 5.0;

fn thread_cpu() -> Duration {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid rusage we own; RUSAGE_THREAD is Linux-specific and supported.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn write(p: &Path, s: &str) -> std::io::Result<()> {
    fs::create_dir_all(p.parent().unwrap_or(Path::new(".")))?;
    fs::write(p, s)
}

/// One probe round as the governor runs it; returns something so it is not optimised out.
fn round(p: &Probes, state: &Path, capture: &Path) -> usize {
    let r = p.default_route();
    let b = p.battery();
    let t = p.cpu_temp();
    let f1 = probes::free_bytes(state);
    let f2 = probes::free_bytes(capture);
    let now = probes::local_now();
    r.map_or(0, |s| s.len())
        + b.percent.unwrap_or(0) as usize
        + t.map_or(0, |t| t as usize)
        + (f1.unwrap_or(0) ^ f2.unwrap_or(0)) as usize % 7
        + now.minute_of_day as usize
}

fn probe_cost(label: &str, p: &Probes, dir: &Path) {
    let start = thread_cpu();
    let wall = Instant::now();
    let mut sink = 0usize;
    for _ in 0..ROUNDS {
        sink = sink.wrapping_add(round(p, dir, dir));
    }
    let cpu = thread_cpu() - start;
    let per = cpu / ROUNDS;
    let per_hour = per.as_secs_f64() * ROUNDS_PER_HOUR;
    println!(
        "probe round ({label}): {:.1} µs CPU ({:.1} µs wall) per round; at a 5 s interval {:.3} s CPU per hour (target < 1 s) [{sink}]",
        per.as_secs_f64() * 1e6,
        wall.elapsed().as_secs_f64() * 1e6 / ROUNDS as f64,
        per_hour,
        sink = sink % 10
    );
}

fn idle_daemon(secs: u64, dir: &Path, probe_interval: &str) -> Result<f64, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = &dir.join(format!("idle-{probe_interval}"));
    fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let cfg = dir.join("idle.toml");
    fs::write(
        &cfg,
        format!(
            "device_id = \"bench\"\n[paths]\ncapture = \"{0}/capture\"\nstate_dir = \"{0}/state\"\n\
             [remote]\nkind = \"file\"\n[remote.file]\npath = \"{0}/remote\"\n\
             [conditions]\nproc_root = \"{1}/proc\"\nsys_root = \"{1}/sys\"\nmax_cpu_temp = 85\n\
             probe_interval = \"{2}\"\n",
            dir.display(),
            dir.parent().unwrap_or(dir).display(),
            probe_interval
        ),
    )
    .map_err(|e| e.to_string())?;
    fs::create_dir_all(dir.join("remote")).map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    // Start-up (migrations, first scan) is not idle cost.
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ns_over(child.id(), Duration::from_secs(secs)).map(Duration::from_nanos);
    let _ = child.kill();
    let _ = child.wait();
    match used {
        Ok(used) => {
            let per_hour = used.as_secs_f64() * 3600.0 / secs as f64;
            println!(
                "idle daemon, probes every {probe_interval}: {:.3} s CPU over {secs} s = {per_hour:.2} s per hour (all threads, from schedstat)",
                used.as_secs_f64(),
            );
            Ok(per_hour)
        }
        Err(e) => Err(format!("cannot read the daemon's /proc/<pid>/task: {e}")),
    }
}

struct NoResume;
impl ResumeLog for NoResume {
    fn current(&self) -> Option<(String, u64)> {
        None
    }
    fn parts(&self) -> Vec<PartRecord> {
        Vec::new()
    }
    fn begin(&mut self, _: &str, _: u64) -> Result<(), RemoteError> {
        Ok(())
    }
    fn part_done(&mut self, _: &PartRecord) -> Result<(), RemoteError> {
        Ok(())
    }
    fn clear(&mut self) {}
}

fn rate_accuracy(rate: u64, secs: u64, dir: &Path) -> Result<(), String> {
    let size = rate * secs;
    let src = dir.join(format!("rate-{rate}.bin"));
    let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    fs::write(&src, &data).map_err(|e| e.to_string())?;
    use sha2::Digest;
    let sha = crate::util::hex(&sha2::Sha256::digest(&data));
    let root = dir.join("remote");
    fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    let remote = FileRemote::new(root);
    let bucket = Mutex::new(Bucket::new(Some(rate), Instant::now()));
    let first: Mutex<Option<Instant>> = Mutex::new(None);
    let throttle = |n: u64| {
        let wait = bucket
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(n, Instant::now());
        std::thread::sleep(wait);
        first
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(Instant::now);
    };
    let job = UploadJob {
        id: "bench".into(),
        key: format!("bench/rate-{rate}"),
        path: src.clone(),
        size,
        sha256: sha,
        media_type: "application/octet-stream".into(),
        verified: false,
    };
    remote
        .upload(
            &job,
            &mut UploadCtx {
                progress: &mut |_| {},
                keep_going: &|| true,
                throttle: &throttle,
                resume: &mut NoResume,
            },
        )
        .map_err(|e| e.to_string())?;
    let end = Instant::now();
    let start = first
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .ok_or("no chunk sent")?;
    let took = (end - start).as_secs_f64();
    let measured = size as f64 / took;
    println!(
        "rate limit {}/s: {} in {took:.2} s = {}/s measured, {:+.1}% vs configured (target within 5%)",
        crate::status::human_bytes(rate as i64),
        crate::status::human_bytes(size as i64),
        crate::status::human_bytes(measured as i64),
        (measured / rate as f64 - 1.0) * 100.0
    );
    let _ = fs::remove_file(&src);
    Ok(())
}

/// Runs the conditions benchmark; `idle_secs` of 0 skips the idle-daemon measurement.
pub fn run(idle_secs: u64) -> Result<(), String> {
    let dir = tempfile::Builder::new()
        .prefix("fieldsync-bench-conditions-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let d = dir.path();
    // A field device's tree: one battery, mains, two thermal zones, a cellular route.
    let ps = d.join("sys/class/power_supply");
    let w = |p: &Path, s: &str| write(p, s).map_err(|e| e.to_string());
    w(&ps.join("BAT0/type"), "Battery\n")?;
    w(&ps.join("BAT0/capacity"), "64\n")?;
    w(&ps.join("BAT0/status"), "Discharging\n")?;
    w(&ps.join("AC/type"), "Mains\n")?;
    w(&ps.join("AC/online"), "0\n")?;
    w(&d.join("sys/class/thermal/thermal_zone0/temp"), "47000\n")?;
    w(&d.join("sys/class/thermal/thermal_zone1/temp"), "45500\n")?;
    w(
        &d.join("proc/net/route"),
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
         wwan0\t00000000\t0100A8C0\t0003\t0\t0\t700\t00000000\t0\t0\t0\n",
    )?;
    probe_cost(
        "fake field-device tree",
        &Probes {
            proc_root: d.join("proc"),
            sys_root: d.join("sys"),
        },
        d,
    );
    probe_cost(
        "this machine's /proc and /sys",
        &Probes {
            proc_root: "/proc".into(),
            sys_root: "/sys".into(),
        },
        d,
    );
    if idle_secs > 0 {
        // The same idle daemon with probing effectively off: the difference is what
        // condition probing costs; the rest is the scheduler, watcher and store.
        let with = idle_daemon(idle_secs, d, "5s")?;
        let without = idle_daemon(idle_secs, d, "1h")?;
        println!(
            "condition probing's share of the idle daemon: {:.3} s per hour",
            with - without
        );
    }
    rate_accuracy(1_000_000, 10, d)?;
    rate_accuracy(4_000_000, 10, d)?;
    Ok(())
}
