//! Deployment: what systemd and the package rely on. A clean stop on SIGTERM in the middle
//! of a large upload, the sd_notify readiness protocol, `--version`, and the shipped files
//! (unit, production config, Debian package, install script) agreeing with each other.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A slow link for the file remote: the remote writes each object to
/// `.<name>.fieldsync-tmp` beside it before the rename; a FIFO put there in advance turns
/// that write into a pipe this reader drains at `bytes_per_tick` every 10 ms. The upload
/// is as slow as we say, whatever the machine, and never stalls (the daemon reaches its
/// safe points). Ends at EOF, when the daemon closes (and removes) the FIFO.
struct SlowLink {
    read: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl SlowLink {
    fn start(fifo: &Path, bytes_per_tick: usize) -> SlowLink {
        fs::create_dir_all(fifo.parent().unwrap()).unwrap();
        let st = Command::new("mkfifo").arg(fifo).status().unwrap();
        assert!(st.success(), "mkfifo {}", fifo.display());
        let read = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s, path) = (read.clone(), stop.clone(), fifo.to_path_buf());
        thread::spawn(move || {
            // Blocks until the daemon opens the FIFO for writing.
            let Ok(mut f) = fs::File::open(&path) else {
                return;
            };
            let mut buf = vec![0u8; bytes_per_tick];
            while !s.load(Ordering::Relaxed) {
                match f.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => r.fetch_add(n as u64, Ordering::Relaxed),
                };
                thread::sleep(Duration::from_millis(10));
            }
        });
        SlowLink { read, stop }
    }

    fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn sigterm_during_a_large_upload_exits_0_fast_and_restart_resumes() {
    let env = Env::new("");
    // Paused, so the photo is ingested (and its object key known) before any upload starts.
    env.cli_ok(&["pause"]);
    let mut d = env.spawn();
    let data = bytes(42, 32 << 20);
    env.drop_file("tower-9/row-2/IMG_0100.jpg", &data);
    env.wait(Some(&d), 60, "large photo ingested", || {
        env.list_state("queued_upload")
            .first()
            .is_some_and(|a| !a["sha256"].as_str().unwrap_or("").is_empty())
    });
    let att = env.list_state("queued_upload").remove(0);
    let key = att["object_key"].as_str().unwrap().to_string();
    let object = env.remote.join(&key);
    let fifo = object.parent().unwrap().join(format!(
        ".{}.fieldsync-tmp",
        object.file_name().unwrap().to_str().unwrap()
    ));
    // 64 KiB per 10 ms: about 6 MB/s, so 32 MiB would take about 5 s.
    let link = SlowLink::start(&fifo, 64 * 1024);
    env.cli_ok(&["resume"]);
    env.wait(Some(&d), 30, "upload in flight (2 MiB through)", || {
        link.bytes_read() >= 2 << 20
    });
    assert!(
        link.bytes_read() < data.len() as u64,
        "upload finished before the test could interrupt it"
    );

    let (code, took) = d.terminate();
    let log = d.log_text();
    assert_eq!(code, Some(0), "exit code after SIGTERM\n{}", tail(&log, 40));
    assert!(took < Duration::from_secs(10), "stop took {took:?}");
    assert!(
        link.bytes_read() < data.len() as u64,
        "the upload ran to the end instead of stopping at a safe point"
    );
    drop(link);

    // State committed and true: still queued, no attempt burnt, nothing half-written
    // visible in the remote, no daemon.
    let status = env.status();
    assert_eq!(status["daemon_running"], false);
    assert_eq!(status["counts"]["queued_upload"]["count"], 1, "{status}");
    assert_eq!(status["counts"]["synced"]["count"], 0, "{status}");
    let a = &env.list()[0];
    assert_eq!(a["state"], "queued_upload");
    assert_eq!(
        a["attempts"], 0,
        "an interrupted upload is not a failed attempt: {a}"
    );
    assert!(a["uploading_since"].is_null(), "{a}");
    assert!(
        !object.exists(),
        "no object may appear for an interrupted upload"
    );
    assert!(!fifo.exists(), "the temporary object was not cleaned up");
    assert!(!env.events().iter().any(|e| e["kind"] == "failed"));

    // Restart: the upload resumes and completes with identical bytes.
    let mut d = env.spawn();
    env.wait(Some(&d), 60, "synced after restart", || {
        env.count("synced") == 1
    });
    assert_eq!(
        fs::read(&object).unwrap(),
        data,
        "object bytes after resume"
    );
    let (code, took) = d.terminate();
    assert_eq!(code, Some(0));
    assert!(took < Duration::from_secs(10), "idle stop took {took:?}");
}

#[test]
fn readiness_and_stopping_reach_the_notify_socket() {
    let env = Env::new("");
    let sock_path = env.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut d = env.spawn_with(&[("NOTIFY_SOCKET", sock_path.to_str().unwrap())]);
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("READY=1 within 20 s");
    assert_eq!(&buf[..n], b"READY=1");
    // Ready means working: a photo dropped now is uploaded.
    env.drop_file("c/r/IMG_1.jpg", &bytes(1, 5000));
    env.wait(Some(&d), 30, "synced", || env.count("synced") == 1);
    let (code, _) = d.terminate();
    assert_eq!(code, Some(0));
    let n = sock.recv(&mut buf).expect("STOPPING=1 on SIGTERM");
    assert_eq!(&buf[..n], b"STOPPING=1");
}

/// Receives one datagram within `timeout`, or `None`.
fn recv_within(sock: &UnixDatagram, timeout: Duration) -> Option<String> {
    sock.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 512];
    sock.recv(&mut buf)
        .ok()
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Waits for a `WATCHDOG=1` within `timeout`, skipping other messages.
fn next_ping(sock: &UnixDatagram, timeout: Duration) -> bool {
    let until = std::time::Instant::now() + timeout;
    while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
        match recv_within(sock, left.max(Duration::from_millis(1))) {
            Some(m) if m == "WATCHDOG=1" => return true,
            Some(_) => continue,
            None => return false,
        }
    }
    false
}

/// Reads pings until none came for `gap`; true if that happened within `within`.
fn pings_stop(sock: &UnixDatagram, gap: Duration, within: Duration) -> bool {
    let until = std::time::Instant::now() + within;
    while std::time::Instant::now() < until {
        if !next_ping(sock, gap) {
            return true;
        }
    }
    false
}

#[test]
fn watchdog_pings_only_while_the_loops_are_alive() {
    let env = Env::new("");
    let sock_path = env.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    // systemd's WatchdogSec=2s: a ping every second, a blocking turn may take 2 s.
    let d = env.spawn_with(&[
        ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "2000000"),
    ]);
    assert_eq!(
        recv_within(&sock, Duration::from_secs(20)).as_deref(),
        Some("READY=1")
    );
    for i in 0..3 {
        assert!(
            next_ping(&sock, Duration::from_secs(5)),
            "ping {i}\n{}",
            env.dump(Some(&d))
        );
    }

    // The whole process stopped: no pings (systemd would restart it), back with SIGCONT.
    let pid = d.pid().to_string();
    let signal = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success())
    };
    signal("-STOP");
    thread::sleep(Duration::from_millis(200));
    while recv_within(&sock, Duration::from_millis(50)).is_some() {}
    assert!(
        !next_ping(&sock, Duration::from_secs(3)),
        "a stopped process does not ping"
    );
    signal("-CONT");
    assert!(next_ping(&sock, Duration::from_secs(5)), "pings resume");

    // One loop wedged while the process runs: ingest waits for the queue's write lock,
    // which another connection holds. (A sidecar that is a FIFO nobody writes used to do
    // it; a FIFO is never opened now.) The other loops go on, the pings stop.
    let photo = env.drop_file("c/r/IMG_1.jpg", &bytes(1, 5000));
    env.wait(Some(&d), 30, "first photo synced", || {
        env.count("synced") == 1
    });
    let db = rusqlite::Connection::open(env.state.join("queue.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    fs::write(photo.with_file_name("IMG_2.jpg"), bytes(2, 5000)).unwrap();
    assert!(
        pings_stop(&sock, Duration::from_secs(4), Duration::from_secs(30)),
        "pings stop while ingest is wedged\n{}",
        tail(&d.log_text(), 30)
    );
    assert!(
        d.log_text().contains("a loop is wedged") && d.log_text().contains("part=\"ingest\""),
        "the log names the wedged loop\n{}",
        tail(&d.log_text(), 30)
    );
    // Unwedged: pings come again and the photo goes up.
    db.execute_batch("COMMIT").unwrap();
    drop(db);
    assert!(next_ping(&sock, Duration::from_secs(12)), "pings resume");
    env.wait(Some(&d), 30, "second photo synced", || {
        env.count("synced") == 2
    });
    let mut d = d;
    d.kill9();
}

#[test]
fn version_names_version_commit_and_target() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    let v = String::from_utf8(out.stdout).unwrap();
    let v = v.trim();
    let rest = v
        .strip_prefix(concat!(
            "fieldsync ",
            env!("CARGO_PKG_VERSION"),
            " (commit "
        ))
        .unwrap_or_else(|| panic!("unexpected --version: {v}"));
    let (commit, target) = rest
        .strip_suffix(')')
        .and_then(|r| r.split_once(", "))
        .unwrap_or_else(|| panic!("unexpected --version: {v}"));
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "commit in {v}"
    );
    let arch = match std::env::consts::ARCH {
        "arm" => "armv7",
        a => a,
    };
    assert!(
        target.starts_with(arch) && target.contains("-linux-"),
        "target {target} for {arch}"
    );
}

/// `key = value` lines of a systemd unit, by key (a key may repeat).
fn unit_entries(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("bad line {line}"));
        m.entry(k.trim().into()).or_default().push(v.trim().into());
    }
    m
}

fn production_config() -> fieldsync::config::Config {
    let path = repo().join("config/fieldsync.toml");
    fieldsync::config::Config::load(&path).unwrap()
}

#[test]
fn unit_file_is_hardened_and_agrees_with_the_production_config() {
    let text = fs::read_to_string(repo().join("deploy/fieldsync.service")).unwrap();
    let u = unit_entries(&text);
    let one = |k: &str| -> &str {
        let v = u.get(k).unwrap_or_else(|| panic!("{k}= missing"));
        assert_eq!(v.len(), 1, "{k}= set more than once");
        &v[0]
    };
    for (k, want) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("WatchdogSec", "3min"),
        (
            "ExecStart",
            "/usr/bin/fieldsync --config /etc/fieldsync/fieldsync.toml run",
        ),
        // `systemctl reload fieldsync`: SIGHUP re-reads the config and its secret files.
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Restart", "on-failure"),
        ("User", "fieldsync"),
        ("Group", "fieldsync"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("StateDirectory", "fieldsync"),
        ("WantedBy", "multi-user.target"),
    ] {
        assert_eq!(one(k), want, "{k}=");
    }
    assert!(u.contains_key("MemoryMax"), "MemoryMax= guard");
    // The daemon stops in about half a second; the stop timeout leaves room for a slow SD
    // card but must not hide a hung stop for minutes.
    let stop = humantime::parse_duration(one("TimeoutStopSec")).unwrap();
    assert!(
        (Duration::from_secs(10)..=Duration::from_secs(60)).contains(&stop),
        "{stop:?}"
    );
    // Restarting cannot fix a bad config (exit 2) or a second daemon (exit 4).
    let prevent: Vec<&str> = one("RestartPreventExitStatus").split(' ').collect();
    assert!(prevent.contains(&"2") && prevent.contains(&"4"));

    // Writable: the state directory (the file remote lives there by default) and the
    // packaged capture folder, where uploaded local copies are deleted (eviction is on by
    // default; `fieldsync delete`); nothing else (ProtectSystem=strict).
    let rw: Vec<PathBuf> = u["ReadWritePaths"]
        .iter()
        .flat_map(|v| v.split_whitespace())
        .map(|p| PathBuf::from(p.trim_start_matches('-')))
        .collect();
    let cfg = production_config();
    assert_eq!(
        rw,
        vec![cfg.paths.state_dir.clone(), cfg.paths.capture.clone()],
        "ReadWritePaths="
    );
    assert!(
        cfg.retention.evict_on_disk_low,
        "the packaged config evicts, so capture must be writable"
    );
    let remote = cfg.remote.file.as_ref().unwrap();
    assert!(rw.iter().any(|p| remote.path.starts_with(p)));
    assert!(cfg.paths.state_dir.ends_with(one("StateDirectory")));
}

#[test]
fn production_config_spells_out_every_default() {
    let path = repo().join("config/fieldsync.toml");
    let text = fs::read_to_string(&path).unwrap();
    let cfg = production_config();
    // Apart from the two deployment paths, every value is the built-in default.
    let minimal = fieldsync::config::Config::parse(
        &format!(
            "[paths]\ncapture = \"{}\"\n[remote.file]\npath = \"{}\"\n",
            cfg.paths.capture.display(),
            cfg.remote.file.as_ref().unwrap().path.display()
        ),
        "minimal",
    )
    .unwrap();
    assert_eq!(format!("{cfg:?}"), format!("{minimal:?}"));
    // And every key is written out, so an operator sees what can be set.
    let doc: toml::Table = toml::from_str(&text).unwrap();
    for key in [
        "paths.capture",
        "paths.state_dir",
        "ingest.settle",
        "ingest.close_settle",
        "ingest.rescan_interval",
        "ingest.layout",
        "ingest.ignore",
        "upload.concurrency",
        "upload.order",
        "upload.sync_interval",
        "upload.initial_backoff",
        "upload.max_backoff",
        "upload.permanent_attempts",
        "upload.transient_attempts",
        "remote.kind",
        "remote.prefix",
        "remote.file.path",
        "log.format",
        "log.level",
        "conditions.probe_interval",
        "conditions.unmetered_interfaces",
        "conditions.metered_interfaces",
        "conditions.metered",
        "conditions.metered_daily_budget",
        "conditions.min_battery_percent",
        "conditions.min_free_disk",
        "conditions.schedule",
        "conditions.schedule_metered_only",
        "conditions.bandwidth_limit",
        "retention.delete_after_upload",
        "retention.evict_on_disk_low",
        "retention.delete_unreferenced_remote",
        "retention.archived_cache_limit",
        "paths.inbox",
        "upload.auth_recheck",
    ] {
        let mut v = &toml::Value::Table(doc.clone());
        for part in key.split('.') {
            v = v
                .get(part)
                .unwrap_or_else(|| panic!("{key} missing from {}", path.display()));
        }
    }
    // device_id defaults to the hostname: shown commented out.
    assert!(text.contains("#device_id = "));
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn debian_package_has_the_documented_layout() {
    if !have("dpkg-deb") || !have("readelf") {
        eprintln!("dpkg-deb or readelf missing: package layout not checked here");
        return;
    }
    let out_dir = tempfile::tempdir().unwrap();
    let out = Command::new(repo().join("deploy/build-deb.sh"))
        .args([BIN, "amd64"])
        .arg(out_dir.path())
        .env("DEB_COMPRESSION", "none")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "build-deb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let listing = Command::new("dpkg-deb")
        .args(["-c", &deb])
        .output()
        .unwrap();
    let listing = String::from_utf8(listing.stdout).unwrap();
    let entries: BTreeMap<&str, (&str, &str)> = listing
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[5], (f[0], f[1]))
        })
        .collect();
    for (path, mode) in [
        ("./usr/bin/fieldsync", "-rwxr-xr-x"),
        ("./etc/fieldsync/fieldsync.toml", "-rw-r--r--"),
        ("./lib/systemd/system/fieldsync.service", "-rw-r--r--"),
        ("./usr/share/doc/fieldsync/copyright", "-rw-r--r--"),
        ("./usr/share/doc/fieldsync/README.md", "-rw-r--r--"),
    ] {
        assert_eq!(
            entries.get(path),
            Some(&(mode, "root/root")),
            "{path} in\n{listing}"
        );
    }
    let files = entries.keys().filter(|p| !p.ends_with('/')).count();
    assert_eq!(files, 5, "unexpected files in\n{listing}");
    let field = |args: &[&str]| {
        let o = Command::new("dpkg-deb").args(args).output().unwrap();
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    };
    assert_eq!(
        field(&["-I", &deb, "conffiles"]),
        "/etc/fieldsync/fieldsync.toml"
    );
    assert_eq!(field(&["-f", &deb, "Architecture"]), "amd64");
    assert!(field(&["-f", &deb, "Depends"]).contains("adduser"));
    assert_eq!(
        field(&["-f", &deb, "Version"]),
        concat!(env!("CARGO_PKG_VERSION"), "-1")
    );
    for script in ["postinst", "prerm", "postrm"] {
        let p = repo().join("deploy/debian").join(script);
        let st = Command::new("sh").arg("-n").arg(&p).status().unwrap();
        assert!(st.success(), "{script} has a syntax error");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o111,
            0o111
        );
    }
    let postinst = fs::read_to_string(repo().join("deploy/debian/postinst")).unwrap();
    assert!(postinst.contains("adduser --system"));
    let cfg = production_config();
    for dir in [&cfg.paths.state_dir, &cfg.paths.capture] {
        assert!(
            postinst.contains(&dir.display().to_string()),
            "postinst must create {}",
            dir.display()
        );
    }
}

#[test]
fn install_script_lays_out_an_image_root() {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(repo().join("deploy/install.sh"))
        .arg(BIN)
        .env("DESTDIR", root.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "install.sh: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = |p: &str| {
        fs::metadata(root.path().join(p))
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("usr/bin/fieldsync"), 0o755);
    assert_eq!(mode("etc/systemd/system/fieldsync.service"), 0o644);
    assert_eq!(mode("etc/fieldsync/fieldsync.toml"), 0o640);
    assert_eq!(mode("var/lib/fieldsync"), 0o750);
    assert_eq!(mode("var/lib/fieldsync/outbox"), 0o750);
    assert_eq!(mode("var/spool/fieldsync/capture"), 0o2770);
    // A second run (an upgrade) keeps the operator's config.
    let cfg = root.path().join("etc/fieldsync/fieldsync.toml");
    fs::write(&cfg, "# edited\n").unwrap();
    let st = Command::new(repo().join("deploy/install.sh"))
        .arg(BIN)
        .env("DESTDIR", root.path())
        .output()
        .unwrap();
    assert!(st.status.success());
    assert_eq!(fs::read_to_string(&cfg).unwrap(), "# edited\n");
}
