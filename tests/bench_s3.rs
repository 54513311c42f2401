//! S3 upload benchmark: fieldsync next to `rclone copy`, same files, same local `s3s-fs`,
//! same run. Ignored by `cargo test`; run it with `tests/bench_s3.sh` (release binary).
//!
//! Workloads (one function each, so another is added as one more function and one more
//! line in [`bench_s3_against_rclone`]):
//! - photos: 200 × 2 MiB;
//! - videos: 4 × 100 MiB (multipart for fieldsync, one PUT each for rclone's defaults);
//! - shaped: 50 × 2 MB through a link of 2 MB/s with 100 ms each way ([`ShapedLink`]).
//!
//! Tools: rclone with its defaults (4 transfers, one PUT below 200 MiB); rclone with
//! fieldsync's multipart settings (8 MiB threshold and parts, one part at a time per file);
//! fieldsync "drain" (files ingested while paused, clock started at `resume`, as when a
//! device comes back into coverage) and "end to end" (files not yet seen: settling and
//! ingest hashing included). fieldsync runs with 4 uploads at once, as rclone's 4 transfers.
//!
//! Per tool and workload: wall time, client CPU seconds (user + sys of the client process
//! only), peak RSS and MB/s, as the median and range of `FIELDSYNC_BENCH_ROUNDS` rounds
//! (default 3). The server is pinned to the last CPU and the clients to the others when
//! there are two or more, so a client's CPU time is its own and the server's core is never
//! shared with it. `FIELDSYNC_BENCH_WORKLOADS` (comma-separated: photos, videos, shaped)
//! picks workloads.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::s3::*;
use common::*;

const MIB: usize = 1024 * 1024;
const MB: usize = 1_000_000;

/// The shaped link: 2 MB/s, 100 ms each way.
const LINK_RATE: u64 = 2_000_000;
const LINK_DELAY: Duration = Duration::from_millis(100);

/// One run of one tool.
#[derive(Clone, Copy)]
struct Sample {
    wall: f64,
    /// User + system CPU seconds of the client process over the timed part.
    cpu: f64,
    rss_kib: u64,
}

/// The files of a workload, made once and read by every tool and round.
struct Workload {
    name: String,
    dir: tempfile::TempDir,
    files: usize,
    size: usize,
}

impl Workload {
    fn new(name: &str, files: usize, size: usize, seed: u64) -> Workload {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..files {
            let p = dir
                .path()
                .join(format!("bench/row-{}/IMG_{i:04}.jpg", i % 10));
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, bytes(seed + i as u64, size)).unwrap();
        }
        Workload {
            name: name.into(),
            dir,
            files,
            size,
        }
    }
    fn bytes(&self) -> u64 {
        (self.files * self.size) as u64
    }
    fn src(&self) -> &Path {
        self.dir.path()
    }
}

/// The CPUs of the server and of the clients: the last one and the others.
fn cpu_split() -> (Option<String>, Option<String>) {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    if n < 2 {
        return (None, None);
    }
    let clients = if n == 2 {
        "0".to_string()
    } else {
        format!("0-{}", n - 2)
    };
    (Some((n - 1).to_string()), Some(clients))
}

/// `cmd` pinned to `cpus` (taskset execs it: same pid).
fn pinned(cpus: Option<&str>, program: &Path) -> Command {
    match cpus {
        Some(c) => {
            let mut t = Command::new("taskset");
            t.args(["-c", c]).arg(program);
            t
        }
        None => Command::new(program),
    }
}

/// User + system CPU seconds and peak RSS (KiB) of a live process.
fn cpu_secs(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name.
    let hz = 100.0;
    (ticks(11) + ticks(12)) / hz
}

fn vm_hwm_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn count_state(db: &Path, state: &str) -> i64 {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM attachments WHERE state=?1",
                [state],
                |r| r.get(0),
            )
        })
        .unwrap_or(0)
}

/// Everything under `prefix` is in the bucket with the workload's sizes; then it is
/// removed from the server's disk so rounds do not pile up gigabytes.
fn check_and_clear(server: &S3Server, w: &Workload, prefix: &str) {
    let listed = server.client().list(&format!("{prefix}/"));
    assert_eq!(listed.len(), w.files, "{prefix}: objects in the bucket");
    assert!(
        listed.iter().all(|(_, size)| *size == w.size as u64),
        "{prefix}: an object has the wrong size"
    );
    let _ = fs::remove_dir_all(server.dir.path().join("data").join(BUCKET).join(prefix));
}

/// One tool's run of a workload.
type Tool<'a> = dyn FnMut(&mut Bench) -> Sample + 'a;

/// A workload: its name in `FIELDSYNC_BENCH_WORKLOADS` and what runs it.
type WorkloadFn = (&'static str, fn(&mut Bench));

struct Bench {
    bin: PathBuf,
    server: S3Server,
    clients: Option<String>,
    rounds: usize,
    /// Distinguishes the key prefixes of runs.
    run: u32,
    report: Vec<String>,
}

impl Bench {
    fn next_prefix(&mut self, tool: &str) -> String {
        self.run += 1;
        format!("{tool}-{}", self.run)
    }

    /// fieldsync with 4 uploads at once and its defaults otherwise, against `endpoint`.
    fn fieldsync(&mut self, w: &Workload, endpoint: &str, drain: bool, concurrency: u32) -> Sample {
        let prefix = self.next_prefix("fieldsync");
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let cfg = dir.path().join("fieldsync.toml");
        fs::write(
            &cfg,
            format!(
                "device_id = \"bench\"\n[paths]\ncapture = \"{}\"\nstate_dir = \"{}\"\n[ingest]\nsettle = \"200ms\"\nclose_settle = \"100ms\"\n[upload]\nconcurrency = {concurrency}\n[log]\nlevel = \"warn\"\n{}",
                w.src().display(),
                state.display(),
                S3Server::remote_toml(endpoint, SECRET_KEY, "")
                    .replace("prefix = \"fs\"", &format!("prefix = \"{prefix}\""))
                    .replace("read_timeout = \"5s\"", "read_timeout = \"60s\"")
            ),
        )
        .unwrap();
        let cli = |arg: &str| {
            let st = Command::new(&self.bin)
                .arg("--config")
                .arg(&cfg)
                .arg(arg)
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success(), "fieldsync {arg}");
        };
        if drain {
            cli("pause");
        }
        let db = state.join("queue.db");
        let mut start = Instant::now();
        let mut child = pinned(self.clients.as_deref(), &self.bin)
            .arg("--config")
            .arg(&cfg)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut cpu0 = 0.0;
        if drain {
            while count_state(&db, "queued_upload") < w.files as i64 {
                assert!(
                    start.elapsed() < Duration::from_secs(600),
                    "ingest timed out"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            cpu0 = cpu_secs(pid);
            start = Instant::now();
            cli("resume");
        }
        loop {
            if count_state(&db, "synced") as usize == w.files {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(1200),
                "fieldsync bench timed out"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let wall = start.elapsed().as_secs_f64();
        let cpu = cpu_secs(pid) - cpu0;
        let rss_kib = vm_hwm_kib(pid);
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let _ = child.wait();
        check_and_clear(&self.server, w, &prefix);
        Sample { wall, cpu, rss_kib }
    }

    /// `rclone copy` of the workload's files with `flags`, against `endpoint`.
    fn rclone(&mut self, w: &Workload, endpoint: &str, flags: &[&str]) -> Sample {
        let prefix = self.next_prefix("rclone");
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("time.txt");
        let start = Instant::now();
        // GNU time: the client's own CPU seconds and exact peak RSS, without sampling.
        let mut cmd = Command::new("/usr/bin/time");
        cmd.args(["-f", "%U %S %M", "-o"]).arg(&out);
        if let Some(c) = &self.clients {
            cmd.args(["taskset", "-c", c]);
        }
        let st = cmd
            .args(["rclone", "copy", "--config", "/dev/null"])
            .args(flags)
            .arg(w.src())
            .arg(format!("bench:{BUCKET}/{prefix}"))
            .env_remove("AWS_CA_BUNDLE")
            .env("RCLONE_CONFIG_BENCH_TYPE", "s3")
            .env("RCLONE_CONFIG_BENCH_PROVIDER", "Other")
            .env("RCLONE_CONFIG_BENCH_ACCESS_KEY_ID", ACCESS_KEY)
            .env("RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("RCLONE_CONFIG_BENCH_ENDPOINT", endpoint)
            .env("RCLONE_CONFIG_BENCH_REGION", "us-east-1")
            .stdout(Stdio::null())
            .status()
            .unwrap();
        let wall = start.elapsed().as_secs_f64();
        assert!(st.success(), "rclone failed");
        let text = fs::read_to_string(&out).unwrap();
        let f: Vec<f64> = text
            .lines()
            .last()
            .unwrap()
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        check_and_clear(&self.server, w, &prefix);
        Sample {
            wall,
            cpu: f[0] + f[1],
            rss_kib: f[2] as u64,
        }
    }

    /// Runs every tool of `tools` for `rounds` rounds (tools interleaved within a round,
    /// so a change in the machine's load hits all of them) and reports medians and ranges.
    fn compare(&mut self, w: &Workload, tools: &mut [(&str, &mut Tool<'_>)]) {
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); tools.len()];
        for _ in 0..self.rounds {
            for (i, (_, run)) in tools.iter_mut().enumerate() {
                samples[i].push(run(self));
            }
        }
        self.report.push(format!(
            "\n{} ({} x {:.1} MB, {:.0} MB): median (min-max) of {} rounds",
            w.name,
            w.files,
            w.size as f64 / MB as f64,
            w.bytes() as f64 / MB as f64,
            self.rounds
        ));
        self.report.push(format!(
            "  {:<34} {:>20} {:>20} {:>20} {:>10}",
            "tool", "wall s", "client CPU s", "peak RSS MiB", "MB/s"
        ));
        let stat = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (v[v.len() / 2], v[0], v[v.len() - 1])
        };
        let mut medians = Vec::new();
        for (i, (name, _)) in tools.iter().enumerate() {
            let s = &samples[i];
            let (wall, wmin, wmax) = stat(&mut s.iter().map(|x| x.wall).collect());
            let (cpu, cmin, cmax) = stat(&mut s.iter().map(|x| x.cpu).collect());
            let (rss, rmin, rmax) =
                stat(&mut s.iter().map(|x| x.rss_kib as f64 / 1024.0).collect());
            self.report.push(format!(
                "  {name:<34} {:>20} {:>20} {:>20} {:>10.1}",
                format!("{wall:.2} ({wmin:.2}-{wmax:.2})"),
                format!("{cpu:.2} ({cmin:.2}-{cmax:.2})"),
                format!("{rss:.1} ({rmin:.1}-{rmax:.1})"),
                w.bytes() as f64 / MB as f64 / wall
            ));
            medians.push((name.to_string(), wall, cpu));
        }
        // Ratios to the first tool (rclone with its defaults), from the medians.
        let (base, bwall, bcpu) = medians[0].clone();
        for (name, wall, cpu) in &medians[1..] {
            self.report.push(format!(
                "  {name} / {base}: wall {:.2} x, client CPU {:.2} x",
                wall / bwall,
                cpu / bcpu
            ));
        }
    }
}

/// rclone with fieldsync's multipart settings: 8 MiB threshold and parts, one part of a
/// file at a time (fieldsync's `part_concurrency = 1`).
const RCLONE_LIKE_FIELDSYNC: &[&str] = &[
    "--s3-upload-cutoff",
    "8Mi",
    "--s3-chunk-size",
    "8Mi",
    "--s3-upload-concurrency",
    "1",
];

fn workload_files(b: &mut Bench, w: &Workload) {
    let ep = b.server.endpoint();
    let (e1, e2, e3, e4) = (ep.clone(), ep.clone(), ep.clone(), ep);
    b.compare(
        w,
        &mut [
            ("rclone defaults", &mut |b: &mut Bench| {
                b.rclone(w, &e1, &[])
            }),
            ("rclone, fieldsync's multipart", &mut |b: &mut Bench| {
                b.rclone(w, &e2, RCLONE_LIKE_FIELDSYNC)
            }),
            ("fieldsync drain", &mut |b: &mut Bench| {
                b.fieldsync(w, &e3, true, 4)
            }),
            ("fieldsync end to end", &mut |b: &mut Bench| {
                b.fieldsync(w, &e4, false, 4)
            }),
        ],
    );
}

fn workload_photos(b: &mut Bench) {
    let w = Workload::new("photos", 200, 2 * MIB, 1000);
    workload_files(b, &w);
}

fn workload_videos(b: &mut Bench) {
    let w = Workload::new("videos", 4, 100 * MIB, 2000);
    workload_files(b, &w);
}

/// The slow field link: 4 uploads at once (as rclone's 4 transfers) and the device's
/// default of 2, next to rclone's defaults, all through the same [`ShapedLink`].
fn workload_shaped(b: &mut Bench) {
    let w = Workload::new("shaped link 2 MB/s, 100 ms each way", 50, 2 * MB, 3000);
    let link = ShapedLink::start(b.server.addr(), LINK_RATE, LINK_DELAY);
    let ep = link.endpoint();
    let (e1, e2, e3) = (ep.clone(), ep.clone(), ep);
    b.compare(
        &w,
        &mut [
            ("rclone defaults", &mut |b: &mut Bench| {
                b.rclone(&w, &e1, &[])
            }),
            ("fieldsync drain (4 at once)", &mut |b: &mut Bench| {
                b.fieldsync(&w, &e2, true, 4)
            }),
            (
                "fieldsync drain (2, device default)",
                &mut |b: &mut Bench| b.fieldsync(&w, &e3, true, 2),
            ),
        ],
    );
    let ideal = w.bytes() as f64 / LINK_RATE as f64;
    b.report.push(format!(
        "  the link moves these bytes in {ideal:.1} s at best; wall / that = link time used (target <= 1.05 for fieldsync)"
    ));
}

#[test]
#[ignore = "benchmark: run tests/bench_s3.sh"]
fn bench_s3_against_rclone() {
    let bin: PathBuf = std::env::var("FIELDSYNC_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| BIN.into());
    let rounds = std::env::var("FIELDSYNC_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3usize)
        .max(1);
    let wanted = std::env::var("FIELDSYNC_BENCH_WORKLOADS")
        .unwrap_or_else(|_| "photos,videos,shaped".into());
    let (server_cpu, clients) = cpu_split();
    let server = S3Server::start_pinned(server_cpu.as_deref());
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut b = Bench {
        report: vec![
            format!("fieldsync binary: {}", bin.display()),
            format!(
                "s3s-fs on CPU {}, clients on CPU {}; load average at start: {}",
                server_cpu.as_deref().unwrap_or("any"),
                clients.as_deref().unwrap_or("any"),
                load.split_whitespace()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        ],
        bin,
        server,
        clients,
        rounds,
        run: 0,
    };
    let workloads: [WorkloadFn; 3] = [
        ("photos", workload_photos),
        ("videos", workload_videos),
        ("shaped", workload_shaped),
    ];
    for (name, run) in workloads {
        if wanted.split(',').any(|w| w.trim() == name) {
            run(&mut b);
        }
    }
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    b.report.push(format!(
        "\nload average at end: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    ));
    println!("\n{}\n", b.report.join("\n"));
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
        rss = rss.max(vm_hwm_kib(pid));
        if count_state(&db, "synced") as usize == entries.len() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1200),
            "fieldsync download bench timed out"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = start.elapsed().as_secs_f64();
    rss = rss.max(vm_hwm_kib(pid));
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
