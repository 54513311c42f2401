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

// ----- downloads ---------------------------------------------------------------------
// Download throughput: fieldsync fetching assigned files from s3s-fs into its inbox, next
// to `rclone copy` from the bucket to a local folder, same objects, same run. Wall time
// from the daemon's start to every file `synced` (verified and renamed into place), the
// client's CPU seconds (user + system) and peak RSS.

struct DlResult {
    secs: f64,
    cpu_s: f64,
    rss_kb: u64,
}

/// utime + stime of a live process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`: state is field 3; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// Puts `files` objects of `size` bytes under `src/` and returns the assignment entries.
fn put_objects(server: &S3Server, src: &str, files: usize, size: usize, seed: u64) -> Vec<String> {
    let client = server.client();
    (0..files)
        .map(|i| {
            let body = bytes(seed + i as u64, size);
            let key = format!("{src}/row-{}/IMG_{i:04}.jpg", i % 10);
            client.put(&key, &body);
            format!(
                r#"{{"key":"{key}","sha256":"{}","size":{size},"path":"row-{}/IMG_{i:04}.jpg"}}"#,
                sha256_hex(&body),
                i % 10
            )
        })
        .collect()
}

fn run_fieldsync_download(
    bin: &Path,
    server: &S3Server,
    entries: &[String],
    seed: u64,
    concurrency: u32,
) -> DlResult {
    let dir = tempfile::tempdir().unwrap();
    let (capture, state, inbox) = (
        dir.path().join("capture"),
        dir.path().join("state"),
        dir.path().join("inbox"),
    );
    let prefix = format!("fieldsync-dl-{seed}");
    server.client().put(
        &format!("{prefix}/bench/assignments.json"),
        format!("{{\"files\":[{}]}}", entries.join(",")).as_bytes(),
    );
    let cfg = dir.path().join("fieldsync.toml");
    fs::write(
        &cfg,
        format!(
            "device_id = \"bench\"\n[paths]\ncapture = \"{}\"\nstate_dir = \"{}\"\ninbox = \"{}\"\n[upload]\nconcurrency = {concurrency}\n[log]\nlevel = \"warn\"\n{}",
            capture.display(),
            state.display(),
            inbox.display(),
            S3Server::remote_toml(&server.endpoint(), SECRET_KEY, "")
                .replace("prefix = \"fs\"", &format!("prefix = \"{prefix}\""))
        ),
    )
    .unwrap();
    let start = Instant::now();
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
    loop {
        rss = rss.max(vm_hwm_kb(pid).unwrap_or(0));
        if synced_count(&db) as usize == entries.len() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1200),
            "fieldsync download bench timed out"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = start.elapsed().as_secs_f64();
    rss = rss.max(vm_hwm_kb(pid).unwrap_or(0));
    let cpu_s = cpu_secs(pid);
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    let mut n = 0;
    walk(&inbox, &mut |_| n += 1);
    assert_eq!(n, entries.len(), "every file in the inbox");
    DlResult {
        secs,
        cpu_s,
        rss_kb: rss,
    }
}

fn run_rclone_download(server: &S3Server, src: &str, files: usize) -> DlResult {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("dest");
    let out = dir.path().join("time.txt");
    let start = Instant::now();
    let st = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M %U %S")
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
        .arg(format!("bench:{BUCKET}/{src}"))
        .arg(&dest)
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
    let mut n = 0;
    walk(&dest, &mut |_| n += 1);
    assert_eq!(n, files);
    let text = fs::read_to_string(&out).unwrap();
    let last = text.trim().lines().last().unwrap().to_string();
    let v: Vec<f64> = last
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    DlResult {
        secs,
        cpu_s: v[1] + v[2],
        rss_kb: v[0] as u64,
    }
}

fn dl_line(tool: &str, files: usize, size: usize, r: &DlResult) -> String {
    let mb = (files * size) as f64 / MB as f64;
    format!(
        "{tool:<24} {files:>4} x {:>4} MB  {:>7.2} s  {:>7.1} MB/s  CPU {:>6.2} s  peak RSS {:>6.1} MB",
        size / MB,
        r.secs,
        mb / r.secs,
        r.cpu_s,
        r.rss_kb as f64 / 1024.0
    )
}

#[test]
#[ignore = "benchmark: run tests/bench_s3.sh"]
fn bench_s3_downloads_against_rclone() {
    let bin: PathBuf = std::env::var("FIELDSYNC_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| BIN.into());
    let server = S3Server::start();
    let mut report = vec![format!("downloads; fieldsync binary: {}", bin.display())];
    for (files, size, seed) in [(200, 2 * MB, 5000), (4, 100 * MB, 6000)] {
        let src = format!("dl-src-{seed}");
        let entries = put_objects(&server, &src, files, size, seed);
        // The device default (2 transfers at once), and rclone's default of 4.
        let f2 = run_fieldsync_download(&bin, &server, &entries, seed, 2);
        let f4 = run_fieldsync_download(&bin, &server, &entries, seed + 1, 4);
        let r = run_rclone_download(&server, &src, files);
        report.push(dl_line("fieldsync c2 download", files, size, &f2));
        report.push(dl_line("fieldsync c4 download", files, size, &f4));
        report.push(dl_line("rclone --transfers 4", files, size, &r));
    }
    println!("\n{}\n", report.join("\n"));
}
