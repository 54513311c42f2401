//! S3 upload benchmark: fieldsync next to `rclone copy`, same files, same local `s3s-fs`,
//! same run. Ignored by `cargo test`; run it with `tests/bench_s3.sh` (release binary).
//!
//! Two workloads: 200 × 2 MB photos and 4 × 100 MB videos. For each tool: wall time from
//! start to everything confirmed in the bucket, MB/s, and peak RSS (VmHWM).
//!
//! fieldsync is timed two ways. "end to end": from start with files not yet seen, so its
//! time includes settling and hashing every file at ingest. "drain": the files were
//! ingested while uploads were paused (as on a device, where photos are captured and
//! hashed over hours and the upload window comes later); the clock starts at `resume`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::s3::*;
use common::*;

const MB: usize = 1_000_000;

/// Peak resident set of a live process, in kB.
fn vm_hwm_kb(pid: u32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn make_files(dir: &Path, n: usize, size: usize, seed: u64) -> u64 {
    for i in 0..n {
        let p = dir.join(format!("bench/row-{}/IMG_{i:04}.jpg", i % 10));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, bytes(seed + i as u64, size)).unwrap();
    }
    (n * size) as u64
}

struct Result {
    secs: f64,
    rss_kb: u64,
}

fn synced_count(db: &Path) -> i64 {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM attachments WHERE state='synced'",
                [],
                |r| r.get(0),
            )
        })
        .unwrap_or(0)
}

fn queued_count(db: &Path) -> i64 {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM attachments WHERE state='queued_upload'",
                [],
                |r| r.get(0),
            )
        })
        .unwrap_or(0)
}

#[allow(clippy::too_many_arguments)]
fn run_fieldsync(
    bin: &Path,
    server: &S3Server,
    files: usize,
    size: usize,
    seed: u64,
    concurrency: u32,
    parts: u32,
    drain: bool,
) -> Result {
    let dir = tempfile::tempdir().unwrap();
    let capture = dir.path().join("capture");
    let state = dir.path().join("state");
    let total = make_files(&capture, files, size, seed);
    let cfg = dir.path().join("fieldsync.toml");
    fs::write(
        &cfg,
        format!(
            "device_id = \"bench\"\n[paths]\ncapture = \"{}\"\nstate_dir = \"{}\"\n[ingest]\nsettle = \"200ms\"\n[upload]\nconcurrency = {concurrency}\n[log]\nlevel = \"warn\"\n{}",
            capture.display(),
            state.display(),
            S3Server::remote_toml(
                &server.endpoint(),
                SECRET_KEY,
                &format!("part_concurrency = {parts}")
            )
                .replace("prefix = \"fs\"", &format!("prefix = \"fieldsync-{seed}\""))
        ),
    )
    .unwrap();
    if drain {
        let st = Command::new(bin)
            .arg("--config")
            .arg(&cfg)
            .arg("pause")
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
    }
    let mut start = Instant::now();
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id();
    let db = state.join("queue.db");
    let mut rss = 0;
    if drain {
        while queued_count(&db) < files as i64 {
            assert!(
                start.elapsed() < Duration::from_secs(600),
                "ingest timed out"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        start = Instant::now();
        let st = Command::new(bin)
            .arg("--config")
            .arg(&cfg)
            .arg("resume")
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
    }
    loop {
        rss = rss.max(vm_hwm_kb(pid).unwrap_or(0));
        if synced_count(&db) as usize == files {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1200),
            "fieldsync bench timed out"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let secs = start.elapsed().as_secs_f64();
    rss = rss.max(vm_hwm_kb(pid).unwrap_or(0));
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    assert_eq!(
        server.client().list(&format!("fieldsync-{seed}/")).len(),
        files
    );
    let _ = total;
    Result { secs, rss_kb: rss }
}

fn run_rclone(server: &S3Server, files: usize, size: usize, seed: u64) -> Result {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    make_files(&src, files, size, seed);
    let out = dir.path().join("time.txt");
    let start = Instant::now();
    // GNU time reports the peak RSS (%M, kB) exactly, without sampling.
    let st = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&out)
        .args([
            "env",
            "-u",
            "AWS_CA_BUNDLE",
            "rclone",
            "copy",
            "--config",
            "/dev/null",
        ])
        .arg(&src)
        .arg(format!("bench:{BUCKET}/rclone-{seed}"))
        .env("RCLONE_CONFIG_BENCH_TYPE", "s3")
        .env("RCLONE_CONFIG_BENCH_PROVIDER", "Other")
        .env("RCLONE_CONFIG_BENCH_ACCESS_KEY_ID", ACCESS_KEY)
        .env("RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("RCLONE_CONFIG_BENCH_ENDPOINT", server.endpoint())
        .env("RCLONE_CONFIG_BENCH_REGION", "us-east-1")
        .stdout(Stdio::null())
        .status()
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(st.success(), "rclone failed");
    assert_eq!(
        server.client().list(&format!("rclone-{seed}/")).len(),
        files
    );
    let rss_kb = fs::read_to_string(&out)
        .unwrap()
        .trim()
        .lines()
        .last()
        .unwrap()
        .parse()
        .unwrap();
    Result { secs, rss_kb }
}

fn line(tool: &str, files: usize, size: usize, r: &Result) -> String {
    let mb = (files * size) as f64 / MB as f64;
    format!(
        "{tool:<24} {files:>4} x {:>4} MB  {:>7.2} s  {:>7.1} MB/s  peak RSS {:>6.1} MB",
        size / MB,
        r.secs,
        mb / r.secs,
        r.rss_kb as f64 / 1024.0
    )
}

#[test]
#[ignore = "benchmark: run tests/bench_s3.sh"]
fn bench_s3_against_rclone() {
    let bin: PathBuf = std::env::var("FIELDSYNC_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| BIN.into());
    let server = S3Server::start();
    let mut report = vec![format!("fieldsync binary: {}", bin.display())];
    for (files, size, seed) in [(200, 2 * MB, 1000), (4, 100 * MB, 2000)] {
        // The device default (2 uploads at once), and rclone's default of 4 transfers.
        // c: files at once; p: parts of one file at once (rclone: 4 transfers, 4 chunks).
        let f2 = run_fieldsync(&bin, &server, files, size, seed, 2, 1, false);
        let f4 = run_fieldsync(&bin, &server, files, size, seed + 100, 4, 4, false);
        let d2 = run_fieldsync(&bin, &server, files, size, seed + 200, 2, 1, true);
        let d4 = run_fieldsync(&bin, &server, files, size, seed + 300, 4, 1, true);
        let d44 = run_fieldsync(&bin, &server, files, size, seed + 400, 4, 4, true);
        let r = run_rclone(&server, files, size, seed);
        report.push(line("fieldsync c2 end to end", files, size, &f2));
        report.push(line("fieldsync c4p4 end to end", files, size, &f4));
        report.push(line("fieldsync c2 drain", files, size, &d2));
        report.push(line("fieldsync c4 drain", files, size, &d4));
        report.push(line("fieldsync c4p4 drain", files, size, &d44));
        report.push(line("rclone --transfers 4", files, size, &r));
    }
    println!("\n{}\n", report.join("\n"));
}
