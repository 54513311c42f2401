//! Shared harness for the integration tests: a temp environment (capture, state and
//! remote folders plus a config file), the real `fieldsync` binary, and waiting helpers
//! that print everything needed to debug when they time out.
//!
//! Peers (S3 server, MQTT broker, fault proxy) live in sibling modules and are started on
//! 127.0.0.1 with ephemeral ports, stopped on drop.

#![allow(dead_code)]

pub mod cdp;
pub mod mosquitto;
pub mod mqtt;

pub mod s3;
pub mod tinyproxy;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_fieldsync");

/// The unprivileged user permission tests run the daemon as when the suite runs as root.
pub const NOBODY: u32 = 65534;

/// Settings that make tests fast: short settle times and backoff.
pub const FAST: &str = r#"
[ingest]
settle = "300ms"
close_settle = "100ms"
rescan_interval = "2s"

[upload]
sync_interval = "1s"
initial_backoff = "200ms"
max_backoff = "1s"
"#;

pub struct Env {
    pub dir: tempfile::TempDir,
    pub capture: PathBuf,
    pub state: PathBuf,
    pub remote: PathBuf,
    pub config: PathBuf,
    /// The TOML that is written (tests may rewrite it with `write_config`).
    pub toml: String,
    /// Run the daemon as this uid (for permission tests when the suite runs as root).
    pub run_as: Option<u32>,
}

impl Env {
    /// A file-remote environment; `extra` is appended to the config (it may override the
    /// `[remote]` section by replacing it, see `with_config`).
    pub fn new(extra: &str) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("fieldsync-test-")
            .tempdir()
            .unwrap();
        let capture = dir.path().join("capture");
        let state = dir.path().join("state");
        let remote = dir.path().join("remote");
        fs::create_dir_all(&capture).unwrap();
        fs::create_dir_all(&state).unwrap();
        fs::create_dir_all(&remote).unwrap();
        let toml = format!(
            "device_id = \"dev1\"\n\n[paths]\ncapture = \"{}\"\nstate_dir = \"{}\"\n{FAST}\n{extra}\n",
            capture.display(),
            state.display(),
        );
        let toml = if toml.contains("[remote]") {
            toml
        } else {
            format!(
                "{toml}\n[remote]\nkind = \"file\"\nprefix = \"fs\"\n[remote.file]\npath = \"{}\"\n",
                remote.display()
            )
        };
        // The host's battery, route and disk must not decide whether a test uploads:
        // point the probes at empty fake trees unless the test brings its own.
        let toml = if toml.contains("[conditions]") {
            toml
        } else {
            format!(
                "{toml}\n[conditions]\nproc_root = \"{0}/fake/proc\"\nsys_root = \"{0}/fake/sys\"\nmin_free_disk = 0\n",
                dir.path().display()
            )
        };
        let config = dir.path().join("fieldsync.toml");
        fs::write(&config, &toml).unwrap();
        Env {
            dir,
            capture,
            state,
            remote,
            config,
            toml,
            run_as: None,
        }
    }

    /// The binary, run as `run_as` when set (the CLI too: files SQLite creates must stay
    /// writable by the daemon's user).
    pub fn command(&self) -> Command {
        match self.run_as {
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                    "--clear-groups",
                    BIN,
                ]);
                c
            }
            None => Command::new(BIN),
        }
    }

    /// Runs everything as an unprivileged user when the suite runs as root, so permission
    /// bits mean what they mean on a device. Returns whether that was needed.
    pub fn drop_privileges(&mut self) -> bool {
        if !is_root() {
            return false;
        }
        chown_tree(self.dir.path(), NOBODY);
        self.run_as = Some(NOBODY);
        true
    }

    pub fn write_config(&mut self, toml: &str) {
        self.toml = toml.to_string();
        fs::write(&self.config, toml).unwrap();
    }

    /// Replaces `from` with `to` in the config and writes it. `from` must be there: an edit
    /// that matched nothing would leave the test running on the config it meant to change.
    pub fn edit_config(&mut self, from: &str, to: &str) {
        assert!(
            self.toml.contains(from),
            "config edit: {from:?} is not in\n{}",
            self.toml
        );
        let toml = self.toml.replace(from, to);
        self.write_config(&toml);
    }

    /// Runs a CLI command to completion.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command()
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs a CLI command and asserts it succeeded; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "fieldsync {args:?} failed: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&self.cli_ok(&["status", "--json"])).unwrap()
    }

    pub fn list(&self) -> Vec<Value> {
        serde_json::from_str(&self.cli_ok(&["list", "--json"])).unwrap()
    }

    pub fn list_state(&self, state: &str) -> Vec<Value> {
        serde_json::from_str(&self.cli_ok(&["list", "--json", "--state", state])).unwrap()
    }

    pub fn events(&self) -> Vec<Value> {
        serde_json::from_str(&self.cli_ok(&["events", "--json", "--limit", "100000"])).unwrap()
    }

    pub fn count(&self, state: &str) -> i64 {
        self.status()["counts"][state]["count"].as_i64().unwrap()
    }

    /// Starts `fieldsync run`; its log goes to a file printed on failure.
    pub fn spawn(&self) -> Daemon {
        self.spawn_with(&[])
    }

    pub fn spawn_with(&self, env: &[(&str, &str)]) -> Daemon {
        let n = fs::read_dir(self.dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("daemon-")
            })
            .count();
        let log = self.dir.path().join(format!("daemon-{n}.log"));
        let mut cmd = self.command();
        cmd.arg("--config")
            .arg(&self.config)
            .arg("run")
            .env("RUST_LOG", "fieldsync=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(fs::File::create(&log).unwrap()))
            .stderr(Stdio::from(
                fs::OpenOptions::new().append(true).open(&log).unwrap(),
            ));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let d = Daemon {
            child: Some(child),
            log,
        };
        // Ready once the lock is held and the database exists.
        let state = self.state.clone();
        wait_for(
            Duration::from_secs(20),
            "daemon start",
            || {
                fs::read_to_string(state.join("fieldsync.lock"))
                    .map(|s| !s.trim().is_empty())
                    .unwrap_or(false)
                    && d.log_text().contains("fieldsync started")
            },
            || d.log_text(),
        );
        d
    }

    /// Writes a file under the capture folder (creating parents) in one go.
    pub fn drop_file(&self, rel: &str, bytes: &[u8]) -> PathBuf {
        let p = self.capture.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, bytes).unwrap();
        p
    }

    /// Everything needed to debug a failed wait.
    pub fn dump(&self, d: Option<&Daemon>) -> String {
        let status = self.cli(&["status"]);
        let list = self.cli(&["list"]);
        let events = self.cli(&["events", "--limit", "60"]);
        format!(
            "--- status\n{}{}\n--- list\n{}\n--- events\n{}\n--- daemon log (tail)\n{}",
            String::from_utf8_lossy(&status.stdout),
            String::from_utf8_lossy(&status.stderr),
            String::from_utf8_lossy(&list.stdout),
            String::from_utf8_lossy(&events.stdout),
            d.map(|d| tail(&d.log_text(), 60)).unwrap_or_default()
        )
    }

    /// Waits until `cond` holds, or panics with the status, list, events and daemon log.
    pub fn wait(&self, d: Option<&Daemon>, secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
        wait_for(Duration::from_secs(secs), what, &mut cond, || self.dump(d));
    }

    /// Every regular file under the remote folder (relative path → bytes).
    pub fn remote_objects(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        walk(&self.remote, &mut |p| {
            let rel = p
                .strip_prefix(&self.remote)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push((rel, fs::read(p).unwrap()));
        });
        out.sort();
        out
    }
}

pub fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, f);
        } else {
            f(&p);
        }
    }
}

pub fn wait_for(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
    dump: impl FnOnce() -> String,
) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}\n{}", dump());
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A running `fieldsync run`; killed (SIGKILL) on drop if still running.
pub struct Daemon {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// kill -9: no chance to clean up, like a power cut for the process.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code and how long the stop took.
    pub fn terminate(&mut self) -> (Option<i32>, Duration) {
        let mut c = self.child.take().expect("running");
        let start = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return (st.code(), start.elapsed());
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return (None, start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Deterministic pseudo-random bytes (photos that differ from each other).
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Appends to a file in chunks with pauses, like a slow camera pipeline.
pub fn write_slowly(path: &Path, data: &[u8], chunks: usize, total: Duration) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = fs::File::create(path).unwrap();
    let step = data.len().div_ceil(chunks);
    for c in data.chunks(step) {
        f.write_all(c).unwrap();
        f.flush().unwrap();
        std::thread::sleep(total / chunks as u32);
    }
}

/// True when the tests run as root (permission bits do not stop root).
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Makes the environment usable by `uid` (for `run_as`).
pub fn chown_tree(path: &Path, uid: u32) {
    let st = Command::new("chown")
        .args(["-R", &format!("{uid}:{uid}"), &path.display().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}
