//! `fieldsync bench mqtt`: what fleet reporting costs a device. Prints the bytes of one
//! status snapshot and one event in JSON and in CBOR, and the daemon's resident memory
//! after the same workload with MQTT disabled and enabled (budget: under 2 MiB more).
//!
//! Runs the real binary (`fieldsync run`) as a child process per mode, against a local
//! mosquitto it starts itself (or `--mqtt-broker HOST:PORT`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::mqtt::{self, PayloadFormat};
use crate::status;
use crate::store::{EventForm, EventKind, Store};

use crate::cli::error::{exit, CliError};

use super::procfs;

/// The launcher the integration tests use too.
#[path = "../../../tests/common/mosquitto.rs"]
mod mosquitto;

/// Photos uploaded in each mode before memory is sampled.
const PHOTOS: u64 = 40;
const PHOTO_BYTES: usize = 256 * 1024;
/// Idle time after the last upload before sampling (heartbeats and timers have run).
/// The workload's config rescans every 2 s so a photo whose directory appeared just as it
/// was written is found quickly: this measures memory, not discovery.
const SETTLE: Duration = Duration::from_secs(3);
/// The budget the issue sets for MQTT's extra resident memory.
const RSS_BUDGET_KIB: i64 = 2 * 1024;

fn fail(msg: impl Into<String>) -> CliError {
    CliError::new(exit::FAILURE, msg)
}

/// A mosquitto started for the benchmark, stopped on drop.
struct LocalBroker(Child);

impl Drop for LocalBroker {
    fn drop(&mut self) {
        mosquitto::stop(&mut self.0);
    }
}

fn start_mosquitto(dir: &Path) -> Result<(LocalBroker, u16), CliError> {
    let port = mosquitto::free_ports(1).map_err(|e| fail(format!("bench: no free port: {e}")))?[0];
    let conf = dir.join("mosquitto.conf");
    fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n"),
    )
    .map_err(|e| fail(format!("bench: {e}")))?;
    let child = mosquitto::spawn(&conf, Stdio::null(), Stdio::null()).map_err(|e| {
        fail(format!(
            "bench mqtt: start {}: {e}; install mosquitto or pass --mqtt-broker HOST:PORT",
            mosquitto::bin()
        ))
    })?;
    let broker = LocalBroker(child);
    let start = Instant::now();
    while !mosquitto::listening(port) {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(fail("bench: mosquitto did not start listening"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((broker, port))
}

/// VmRSS and VmHWM of a process, in KiB.
fn memory_kib(pid: u32) -> Option<(i64, i64)> {
    let kib = |field| procfs::status_kib(pid, field).map(|k| k as i64);
    Some((kib("VmRSS:")?, kib("VmHWM:")?))
}

struct ModeResult {
    rss_kib: i64,
    hwm_kib: i64,
    state_dir: PathBuf,
}

/// Runs the daemon on a fresh directory, uploads the workload, samples its memory.
fn run_mode(root: &Path, mqtt_section: Option<String>) -> Result<ModeResult, CliError> {
    let io = |e: std::io::Error| fail(format!("bench: {e}"));
    let name = if mqtt_section.is_some() { "on" } else { "off" };
    let dir = root.join(format!("mqtt-{name}"));
    let (capture, state, remote) = (dir.join("capture"), dir.join("state"), dir.join("remote"));
    for d in [&capture, &state, &remote] {
        fs::create_dir_all(d).map_err(io)?;
    }
    let config = dir.join("fieldsync.toml");
    fs::write(
        &config,
        format!(
            "device_id = \"bench-{name}\"\n[paths]\ncapture = \"{}\"\nstate_dir = \"{}\"\n\
             [ingest]\nsettle = \"200ms\"\nclose_settle = \"100ms\"\nrescan_interval = \"2s\"\n\
             [remote]\nkind = \"file\"\n[remote.file]\npath = \"{}\"\n{}\n",
            capture.display(),
            state.display(),
            remote.display(),
            mqtt_section.unwrap_or_default()
        ),
    )
    .map_err(io)?;
    let exe = std::env::current_exe().map_err(io)?;
    let log = fs::File::create(dir.join("daemon.log")).map_err(io)?;
    let mut child = Command::new(exe)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().map_err(io)?))
        .stderr(Stdio::from(log))
        .spawn()
        .map_err(io)?;
    let pid = child.id();
    let result = (|| {
        let db = state.join("queue.db");
        let log = dir.join("daemon.log");
        let start = Instant::now();
        // Started means the store is migrated and the watcher is on.
        while !fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("fieldsync started")
        {
            if start.elapsed() > Duration::from_secs(20) {
                return Err(fail("bench: daemon did not start"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for i in 0..PHOTOS {
            let p = capture.join(format!("c{}/r{}/IMG_{i:04}.jpg", i % 4, i % 5));
            fs::create_dir_all(p.parent().unwrap()).map_err(io)?;
            let data: Vec<u8> = (0..PHOTO_BYTES)
                .map(|j| ((j as u64).wrapping_mul(2_654_435_761) >> 13) as u8 ^ i as u8)
                .collect();
            // Written aside and renamed in, as capture apps do (`*.tmp` is ignored).
            let tmp = p.with_extension("jpg.tmp");
            fs::write(&tmp, data).map_err(io)?;
            fs::rename(&tmp, &p).map_err(io)?;
        }
        let store = Store::open(&db).map_err(|e| fail(e.to_string()))?;
        let start = Instant::now();
        loop {
            let snap = status::snapshot(&store, "", "", true).map_err(|e| fail(e.to_string()))?;
            let synced = snap.counts.get("synced").map(|c| c.count).unwrap_or(0);
            if synced == PHOTOS as i64 {
                break;
            }
            if start.elapsed() > Duration::from_secs(120) {
                return Err(fail(format!(
                    "bench: only {synced} of {PHOTOS} uploaded (counts {}; see {})",
                    serde_json::to_string(&snap.counts).unwrap_or_default(),
                    dir.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(SETTLE);
        let (rss_kib, hwm_kib) =
            memory_kib(pid).ok_or_else(|| fail("bench: cannot read the daemon's memory"))?;
        Ok(ModeResult {
            rss_kib,
            hwm_kib,
            state_dir: state.clone(),
        })
    })();
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    result
}

fn mib(kib: i64) -> String {
    format!("{:.2} MiB", kib as f64 / 1024.0)
}

/// `fieldsync bench mqtt [--mqtt-broker HOST:PORT]`.
pub fn run(broker: Option<&str>) -> Result<i32, CliError> {
    let tmp = tempfile::Builder::new()
        .prefix("fieldsync-bench-mqtt-")
        .tempdir()
        .map_err(|e| fail(format!("bench: {e}")))?;
    let root = tmp.path().to_path_buf();
    let outcome = (|| {
        let (_local, host, port) = match broker {
            Some(b) => {
                let (h, p) = b
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
                    .ok_or_else(|| {
                        CliError::new(exit::USAGE, "--mqtt-broker: expected HOST:PORT")
                    })?;
                (None, h, p)
            }
            None => {
                let (b, p) = start_mosquitto(&root)?;
                (Some(b), "127.0.0.1".to_string(), p)
            }
        };
        let off = run_mode(&root, None)?;
        let on = run_mode(
            &root,
            Some(format!(
                "[mqtt]\nhost = \"{host}\"\nport = {port}\nheartbeat = \"1s\"\n"
            )),
        )?;

        // Payload sizes, from the store the MQTT run left behind.
        let store = Store::open(&on.state_dir.join("queue.db")).map_err(|e| fail(e.to_string()))?;
        let snap = status::snapshot(&store, "bench-on", "file:/var/lib/fieldsync/remote", true)
            .map_err(|e| fail(e.to_string()))?;
        let ev = store
            .events_after(0, 100_000)
            .map_err(|e| fail(e.to_string()))?
            .into_iter()
            .rfind(|e| e.kind == EventKind::Uploaded)
            .ok_or_else(|| fail("bench: no uploaded event"))?;
        let ev = ev.form(EventForm::Message);
        let (sj, sc) = (
            mqtt::encode(PayloadFormat::Json, &snap).len(),
            mqtt::encode(PayloadFormat::Cbor, &snap).len(),
        );
        let (ej, ec) = (
            mqtt::encode(PayloadFormat::Json, &ev).len(),
            mqtt::encode(PayloadFormat::Cbor, &ev).len(),
        );
        let delta = on.rss_kib - off.rss_kib;
        println!("mqtt payloads (bytes per message):");
        println!(
            "  status snapshot  json {sj:>5}  cbor {sc:>5}  (cbor is {:.0}% of json)",
            sc as f64 * 100.0 / sj as f64
        );
        println!(
            "  uploaded event   json {ej:>5}  cbor {ec:>5}  (cbor is {:.0}% of json)",
            ec as f64 * 100.0 / ej as f64
        );
        println!(
            "daemon memory after {PHOTOS} photos of {} kB, idle {SETTLE:?}:",
            PHOTO_BYTES / 1024
        );
        println!(
            "  mqtt off  RSS {:>10}  peak {:>10}",
            mib(off.rss_kib),
            mib(off.hwm_kib)
        );
        println!(
            "  mqtt on   RSS {:>10}  peak {:>10}",
            mib(on.rss_kib),
            mib(on.hwm_kib)
        );
        println!(
            "  mqtt adds {} RSS (budget {})",
            mib(delta),
            mib(RSS_BUDGET_KIB)
        );
        if delta >= RSS_BUDGET_KIB {
            return Err(fail(format!(
                "bench: MQTT adds {} RSS, over the {} budget",
                mib(delta),
                mib(RSS_BUDGET_KIB)
            )));
        }
        Ok(exit::OK)
    })();
    if outcome.is_err() {
        // Kept after a failure: the daemon logs and databases explain it.
        let _ = tmp.keep();
    }
    outcome
}
