//! `fieldsync fleet --serve` in a real browser: headless Chromium loads the page from the
//! real server, which subscribes to a real mosquitto where two real daemons report. The
//! page stays open while the fleet changes (a daemon killed with SIGKILL turns `lost`,
//! a pause sent from the page reaches its daemon and the result shows, a checklist a daemon
//! waits for is published once its last photo is captured), and the test reads the live
//! DOM over the DevTools protocol.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::cdp::Browser;
use common::mqtt::{Broker, Sub};
use common::*;
use rumqttc::QoS;
use serde_json::{json, Value};

const TOKEN: &str = "op-token-7f3a9c";

/// A running `fieldsync fleet --serve` (killed on drop).
struct Dashboard {
    child: Child,
    /// `http://127.0.0.1:PORT`
    url: String,
    addr: String,
    log: std::path::PathBuf,
}

impl Dashboard {
    fn start(env: &Env, broker: &Broker, extra: &[&str]) -> Dashboard {
        let log = env
            .dir
            .path()
            .join(format!("dashboard-{}.log", fastrand::u32(..)));
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&env.config)
            .args(["fleet", "--broker", &format!("127.0.0.1:{}", broker.port)])
            .args(["--serve", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!(
                    "fleet --serve did not start: {}",
                    fs::read_to_string(&log).unwrap_or_default()
                )
            });
        // `fieldsync fleet: serving http://127.0.0.1:PORT/ (...)`
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no URL in {line:?}"))
            .trim_end_matches('/')
            .to_string();
        let addr = url.trim_start_matches("http://").to_string();
        Dashboard {
            child,
            url,
            addr,
            log,
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One raw HTTP request; returns (status code, headers and body as text).
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req.push_str(&format!("Host: {}\r\n", self.addr));
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, out)
    }

    /// What the event stream sends in its first `for_how_long`.
    fn events_for(&self, for_how_long: Duration) -> String {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        write!(s, "GET /events HTTP/1.1\r\nHost: {}\r\n\r\n", self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let start = Instant::now();
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        while start.elapsed() < for_how_long {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An `[mqtt]` section with a short keep-alive. A killed daemon's socket closes at once
/// and the broker publishes its last will then; the keep-alive bounds the wait when a
/// connection dies silently.
fn mqtt_section(broker: &Broker) -> String {
    format!(
        "[mqtt]\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive = \"2s\"\nheartbeat = \"30s\"\n",
        broker.port
    )
}

/// The table rows as the page shows them, in order.
fn rows(b: &mut Browser) -> Vec<Value> {
    let v = b.eval(
        r#"JSON.stringify([...document.querySelectorAll('#devices tr')].map(r => ({
            device: r.dataset.device, state: r.dataset.state, pending: r.dataset.pending,
            attention: r.dataset.attention === 'true',
            pending_text: r.querySelector('td.pending .count').textContent,
            state_text: r.querySelector('td.state').textContent,
            text: r.innerText,
            result: (r.querySelector('.result') || {dataset: {}}).dataset.result || null,
            result_text: (r.querySelector('.result') || {}).textContent || null,
            checklists: [...r.querySelectorAll('.checklist')].map(c => ({
                name: c.dataset.checklist, published: c.dataset.published === 'true', text: c.textContent})),
            transfers: [...r.querySelectorAll('.transfer')].map(t => t.textContent),
            buttons: [...r.querySelectorAll('button[data-action]')].map(b => b.dataset.action),
            spark_points: r.querySelectorAll('.spark circle').length,
        })))"#,
    );
    serde_json::from_str(v.as_str().unwrap()).unwrap()
}

fn row(b: &mut Browser, device: &str) -> Option<Value> {
    rows(b).into_iter().find(|r| r["device"] == device)
}

fn load_id(b: &mut Browser) -> String {
    b.eval("document.documentElement.dataset.loadId")
        .as_str()
        .unwrap()
        .to_string()
}

/// Waits for `cond` on the live page; on timeout prints the rows, the browser's and the
/// dashboard's logs.
fn wait_page(
    b: &mut Browser,
    dash: &Dashboard,
    secs: u64,
    what: &str,
    mut cond: impl FnMut(&mut Browser) -> bool,
) -> Duration {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        if cond(b) {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let shot = Browser::target_path("dashboard-failed.png");
    b.screenshot(&shot);
    panic!(
        "timed out after {secs}s waiting for {what} (screenshot {})\n--- rows\n{}\n--- chromium\n{}\n--- fleet --serve\n{}",
        shot.display(),
        serde_json::to_string_pretty(&rows(b)).unwrap(),
        b.log(),
        dash.log_text()
    );
}

/// The checklist.json the app writes for dev2's checklist `P-7`: three photos in two rows.
fn dev2_checklist() -> Vec<u8> {
    serde_json::to_vec(&json!({"title": "Pump 7", "rows": [
        {"id": "r1", "photos": ["IMG_a.jpg"]},
        {"id": "r2", "photos": ["IMG_b.jpg", "IMG_c.jpg"]}
    ]}))
    .unwrap()
}

/// The `P-7` entry of a status's `checklists[]`.
fn p7(status: &Value) -> Option<&Value> {
    status["checklists"]
        .as_array()?
        .iter()
        .find(|c| c["checklist"] == "P-7")
}

/// A status with the `checklists` array (waits for a pending and a failed photo, which
/// the real daemons do not show here) and a download, from a third device that exists
/// only as retained messages.
fn third_device_status() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schema": 1, "agent_version": "0.1.0", "device_id": "dev3",
        "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        "daemon_running": true, "remote": "file:/mnt/nas",
        "counts": {"failed": {"count": 1, "bytes": 5000}, "synced": {"count": 3, "bytes": 9000}},
        "pending": {"count": 1, "bytes": 4000, "oldest_age_s": 30},
        "uploading": [{"id": "u1", "filename": "IMG_2.jpg", "checklist": "C-17", "row": "r2",
                        "size": 4000, "bytes_sent": 1600, "percent": 40}],
        "downloading": [{"id": "d1", "filename": "drawing.pdf", "size": 1000,
                          "bytes_received": 120, "percent": 12}],
        "paused": false, "pause_reason": null,
        "last_success": {"time": "2026-01-01T00:00:00.000Z", "kind": "uploaded",
                          "attachment_id": "a", "checklist": "C-18", "row": "r1", "reason": "uploaded"},
        "last_error": null,
        "device": {"uptime_s": 7200, "load_1m": 0.5, "mem_total_bytes": 2_000_000_000u64,
                   "mem_available_bytes": 400_000_000u64, "rss_bytes": 9_000_000u64, "cpu_s": 1.5},
        "checklists": [
            {"checklist": "C-17", "named": 3, "synced": 1, "pending": 1, "failed": 1,
             "published_at": null, "waiting_for": [
                {"file": "IMG_2.jpg", "reason": "pending", "detail": null},
                {"file": "IMG_3.jpg", "reason": "failed", "detail": "read_error: permission denied"}]},
            {"checklist": "C-18", "named": 2, "synced": 2, "pending": 0, "failed": 0,
             "published_at": "2026-01-01T00:00:00.000Z", "waiting_for": []}
        ]
    }))
    .unwrap()
}

#[test]
fn the_page_shows_the_fleet_live_and_sends_a_pause_with_the_token() {
    let broker = Broker::start();
    let section = mqtt_section(&broker);
    let one = Env::new(&section);
    let mut two = Env::new(&section);
    two.write_config(
        &two.toml
            .replace("device_id = \"dev1\"", "device_id = \"dev2\""),
    );
    // dev1 holds three photos (paused before it starts); dev2 uploads two of the three
    // photos its checklist P-7 names, the third is not captured yet.
    one.cli_ok(&["pause"]);
    for i in 0..3u64 {
        one.drop_file(&format!("c1/r{i}/IMG_{i}.jpg"), &bytes(i, 5_000));
    }
    two.drop_file("P-7/r1/IMG_a.jpg", &bytes(31, 6_000));
    two.drop_file("P-7/r2/IMG_b.jpg", &bytes(32, 6_000));
    two.drop_file("P-7/checklist.json", &dev2_checklist());
    let sub = Sub::new(broker.port, "fieldsync/+/status");
    let mut d1 = one.spawn();
    let d2 = two.spawn();
    wait_for(
        Duration::from_secs(60),
        "dev1 reporting 3 pending, dev2 reporting P-7 waiting for IMG_c.jpg only",
        || {
            let s = sub.on("/status");
            s.iter()
                .any(|m| m.topic == "fieldsync/dev1/status" && m.json()["pending"]["count"] == 3)
                && s.iter().any(|m| {
                    let j = m.json();
                    m.topic == "fieldsync/dev2/status"
                        && j["pending"]["count"] == 0
                        && p7(&j).is_some_and(|c| {
                            c["synced"] == 2
                                && c["waiting_for"]
                                    == json!([{"file": "IMG_c.jpg", "reason": "not_captured",
                                                "detail": null}])
                        })
                })
        },
        || {
            format!(
                "{}\n{}\n{}",
                sub.dump(),
                one.dump(Some(&d1)),
                two.dump(Some(&d2))
            )
        },
    );
    // A third device, only retained messages, carrying checklists and a download.
    sub.client
        .publish("fieldsync/dev3/state", QoS::AtLeastOnce, true, "online")
        .unwrap();
    sub.client
        .publish(
            "fieldsync/dev3/status",
            QoS::AtLeastOnce,
            true,
            third_device_status(),
        )
        .unwrap();

    let token_file = one.dir.path().join("dashboard.token");
    fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let dash = Dashboard::start(
        &one,
        &broker,
        &[
            "--allow-commands",
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    );
    let mut b = Browser::open(&format!("{}/", dash.url));

    // Both daemons with their pending counts, and the retained third device.
    wait_page(&mut b, &dash, 60, "three devices on the page", |b| {
        let r = rows(b);
        r.len() == 3
            && r.iter()
                .any(|r| r["device"] == "dev1" && r["pending_text"] == "3")
            && r.iter().any(|r| {
                r["device"] == "dev2"
                    && r["pending_text"] == "0"
                    && r["checklists"].as_array().is_some_and(|c| c.len() == 1)
            })
    });
    let page = load_id(&mut b);
    let r = rows(&mut b);
    let get = |id: &str| r.iter().find(|x| x["device"] == id).unwrap().clone();
    let (r1, r2, r3) = (get("dev1"), get("dev2"), get("dev3"));
    assert_eq!(r1["state"], "online", "{r1}");
    assert_eq!(r1["pending"], "3");
    assert!(
        r1["attention"].as_bool().unwrap(),
        "paused: needs attention {r1}"
    );
    assert!(
        r1["text"].as_str().unwrap().contains("paused_by_operator"),
        "{r1}"
    );
    assert!(!r2["attention"].as_bool().unwrap(), "{r2}");
    assert!(
        r2["text"].as_str().unwrap().contains("agent "),
        "device health shown: {r2}"
    );
    // Attention first: dev1 (paused) and dev3 (1 failed) before dev2.
    let order: Vec<&str> = r.iter().map(|x| x["device"].as_str().unwrap()).collect();
    assert_eq!(order, ["dev1", "dev3", "dev2"], "{r:?}");
    // The checklist the third device waits for, and the one it published.
    assert!(r3["text"].as_str().unwrap().contains("1 failed"), "{r3}");
    let c = r3["checklists"].as_array().unwrap();
    assert_eq!(c.len(), 2, "{r3}");
    assert_eq!(
        (c[0]["name"].as_str(), c[0]["published"].as_bool()),
        (Some("C-17"), Some(false))
    );
    let waits = c[0]["text"].as_str().unwrap();
    assert!(
        waits.contains("IMG_3.jpg (failed: read_error: permission denied)")
            && waits.contains("IMG_2.jpg (pending)"),
        "{waits}"
    );
    assert_eq!(
        (c[1]["name"].as_str(), c[1]["published"].as_bool()),
        (Some("C-18"), Some(true))
    );
    let t = r3["transfers"].as_array().unwrap();
    assert!(t[0].as_str().unwrap().contains("IMG_2.jpg 40%"), "{t:?}");
    assert!(t[1].as_str().unwrap().contains("drawing.pdf 12%"), "{t:?}");
    // dev2's real checklist, as its daemon reports it: waiting for the photo not captured.
    let c = r2["checklists"].as_array().unwrap();
    assert_eq!(c.len(), 1, "{r2}");
    assert_eq!(
        (c[0]["name"].as_str(), c[0]["published"].as_bool()),
        (Some("P-7"), Some(false)),
        "{r2}"
    );
    let waits = c[0]["text"].as_str().unwrap();
    assert!(
        waits.contains("P-7 (2/3 synced) waits for: IMG_c.jpg (not captured)"),
        "{waits}"
    );
    assert!(
        !waits.contains("IMG_a.jpg") && !waits.contains("IMG_b.jpg"),
        "{waits}"
    );
    // The filter box.
    b.eval(
        r#"(() => { const f = document.getElementById('filter'); f.value = 'dev2';
        f.dispatchEvent(new Event('input')); })()"#,
    );
    let shown: Vec<String> = rows(&mut b)
        .iter()
        .map(|r| r["device"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(shown, ["dev2"]);
    b.eval(
        r#"(() => { const f = document.getElementById('filter'); f.value = '';
        f.dispatchEvent(new Event('input')); })()"#,
    );
    b.screenshot(&Browser::target_path("dashboard.png"));

    // The app captures the missing photo: dev2 uploads it, publishes P-7's manifest, and
    // the open page shows the checklist published.
    two.drop_file("P-7/r2/IMG_c.jpg", &bytes(33, 6_000));
    wait_page(
        &mut b,
        &dash,
        30,
        "P-7 shown published on the open page",
        |b| {
            row(b, "dev2").is_some_and(|r| {
                r["checklists"]
                    .as_array()
                    .is_some_and(|c| c.len() == 1 && c[0]["published"] == true)
            })
        },
    );
    let r2 = row(&mut b, "dev2").unwrap();
    let c = &r2["checklists"][0];
    assert_eq!(c["name"], "P-7", "{r2}");
    let text = c["text"].as_str().unwrap();
    assert!(
        text.starts_with("P-7 ✓ published ") && text.ends_with(" ago (3/3 synced)"),
        "{text}"
    );
    assert!(!text.contains("waits for"), "{text}");
    assert!(!r2["attention"].as_bool().unwrap(), "{r2}");
    assert_eq!(
        load_id(&mut b),
        page,
        "the page updated in place, not by a reload"
    );
    let manifest: Value =
        serde_json::from_slice(&fs::read(two.remote.join("fs/dev2/P-7/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["fieldsync"]["checklist"], "P-7", "{manifest}");
    let published = two.status();
    let p = p7(&published).unwrap();
    assert!(p["published_at"].is_string(), "{p}");
    assert_eq!(p["waiting_for"], json!([]), "{p}");

    // Commands without the token, or with a wrong one, are refused and reach nobody.
    let cmd = r#"{"device":"fieldsync/dev2","command":"pause"}"#;
    let json_ct = ("Content-Type", "application/json");
    let (code, body) = dash.request("POST", "/cmd", &[json_ct], cmd);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("missing or wrong token"), "{body}");
    let (code, _) = dash.request(
        "POST",
        "/cmd",
        &[json_ct, ("Authorization", "Bearer nope")],
        cmd,
    );
    assert_eq!(code, 403);
    // The right token from another site's page is refused too.
    let auth = format!("Bearer {TOKEN}");
    let (code, _) = dash.request(
        "POST",
        "/cmd",
        &[
            json_ct,
            ("Authorization", &auth),
            ("Origin", "http://evil.example"),
        ],
        cmd,
    );
    assert_eq!(code, 403);
    // A name the server was not told about (DNS rebinding) gets nothing.
    let (code, body) = dash.request("GET", "/", &[("Host", "evil.example:80")], "");
    assert_eq!(code, 421, "{body}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        two.status()["paused"],
        false,
        "a refused command must not reach the device"
    );

    // A pause from the page: the operator types the token once, clicks, confirms.
    b.eval(&format!(
        r#"(() => {{ document.getElementById('token').value = '{TOKEN}';
            document.getElementById('token-use').click(); }})()"#
    ));
    b.eval(
        r#"document.querySelector('tr[data-device="dev2"] button[data-action="pause"]').click()"#,
    );
    wait_page(&mut b, &dash, 10, "the confirmation", |b| {
        b.eval(r#"!!document.querySelector('tr[data-device="dev2"] button[data-confirm="pause"]')"#)
            == true
    });
    // Nothing is sent before the operator confirms.
    assert_eq!(two.status()["paused"], false);
    b.eval(
        r#"document.querySelector('tr[data-device="dev2"] button[data-confirm="pause"]').click()"#,
    );
    wait_page(&mut b, &dash, 30, "the pause result next to dev2", |b| {
        row(b, "dev2").is_some_and(|r| r["result"] == "ok")
    });
    let r2 = row(&mut b, "dev2").unwrap();
    assert!(
        r2["result_text"].as_str().unwrap().starts_with("pause: ok"),
        "{r2}"
    );
    two.wait(Some(&d2), 30, "dev2 paused by the page's command", || {
        let s = two.status();
        s["paused"] == true && s["pause_reason"] == "paused_by_operator"
    });
    wait_page(&mut b, &dash, 30, "dev2 shown paused", |b| {
        row(b, "dev2").is_some_and(|r| {
            r["attention"] == true && r["text"].as_str().unwrap().contains("paused_by_operator")
        })
    });

    // kill -9 dev1: the broker fires its last will and the open page turns it `lost`.
    d1.kill9();
    let killed = Instant::now();
    wait_page(&mut b, &dash, 20, "dev1 lost on the open page", |b| {
        row(b, "dev1").is_some_and(|r| r["state"] == "lost")
    });
    let took = killed.elapsed();
    eprintln!("dev1 shown lost {took:?} after kill -9 (keep_alive 2s)");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(
        load_id(&mut b),
        page,
        "the page updated in place, not by a reload"
    );
    let r1 = row(&mut b, "dev1").unwrap();
    assert!(
        r1["state_text"].as_str().unwrap().contains("for "),
        "age of the state: {r1}"
    );
    assert!(r1["text"].as_str().unwrap().contains("lost"), "{r1}");
    b.screenshot(&Browser::target_path("dashboard.png"));

    // Nothing secret reached the page: not the token (the page only ever sends it).
    let (_, html) = dash.request("GET", "/", &[], "");
    assert!(
        html.contains("Content-Security-Policy: default-src 'none'"),
        "{html}"
    );
    let stream = dash.events_for(Duration::from_millis(1500));
    assert!(stream.contains("event: snapshot"), "{stream}");
    for text in [&html, &stream] {
        assert!(!text.contains(TOKEN));
    }
    drop(d2);
}

#[test]
fn read_only_by_default_and_flags_are_checked() {
    let mut broker = Broker::start();
    let env = Env::new(&mqtt_section(&broker));
    let sub = Sub::new(broker.port, "fieldsync/+/state");
    let d = env.spawn();
    wait_for(
        Duration::from_secs(30),
        "dev1 online",
        || sub.last("/state").is_some_and(|m| m.text() == "online"),
        || env.dump(Some(&d)),
    );
    let dash = Dashboard::start(&env, &broker, &[]);
    let token_file = env.dir.path().join("t");
    fs::write(&token_file, TOKEN).unwrap();
    // No command is accepted, whatever token is sent.
    let (code, body) = dash.request(
        "POST",
        "/cmd",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &format!("Bearer {TOKEN}")),
        ],
        r#"{"device":"fieldsync/dev1","command":"pause"}"#,
    );
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("commands are disabled"), "{body}");
    // The page offers no action.
    let mut b = Browser::open(&format!("{}/", dash.url));
    wait_page(&mut b, &dash, 60, "dev1 on the read-only page", |b| {
        row(b, "dev1").is_some_and(|r| r["state"] == "online")
    });
    let r = row(&mut b, "dev1").unwrap();
    assert_eq!(r["buttons"], json!([]), "{r}");
    assert!(r["text"].as_str().unwrap().contains("read-only"), "{r}");
    assert_eq!(env.status()["paused"], false);

    // The broker goes away: the page says so; it comes back: the page follows again.
    let broker_pill = |b: &mut Browser| {
        b.eval("document.getElementById('broker').textContent")
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    broker.stop();
    wait_page(&mut b, &dash, 30, "broker shown disconnected", |b| {
        let t = broker_pill(b);
        t.starts_with("broker: ") && t != "broker: connected"
    });
    broker.restart();
    wait_page(&mut b, &dash, 60, "broker shown connected again", |b| {
        broker_pill(b) == "broker: connected"
    });

    // Bad flags: one line, exit 2, nothing served.
    let run = |args: &[&str]| {
        let mut c = Command::new(BIN);
        c.arg("--config").arg(&env.config).args([
            "fleet",
            "--broker",
            &format!("127.0.0.1:{}", broker.port),
        ]);
        c.args(args).output().unwrap()
    };
    let missing = env.dir.path().join("no-such-token");
    let empty = env.dir.path().join("empty-token");
    fs::write(&empty, "\n").unwrap();
    for (args, want) in [
        (
            vec!["--serve", "127.0.0.1:0", "--allow-commands"],
            "--allow-commands needs --token-file".to_string(),
        ),
        (
            vec![
                "--serve",
                "127.0.0.1:0",
                "--allow-commands",
                "--token-file",
                missing.to_str().unwrap(),
            ],
            format!("--token-file {}:", missing.display()),
        ),
        (
            vec![
                "--serve",
                "127.0.0.1:0",
                "--allow-commands",
                "--token-file",
                empty.to_str().unwrap(),
            ],
            format!("--token-file {}: the file is empty", empty.display()),
        ),
        (
            vec!["--serve", "no-such-host-name.invalid:x"],
            "--serve no-such-host-name.invalid:x:".to_string(),
        ),
    ] {
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(&want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!err.contains(TOKEN));
    }
    // The address is taken: exit 1, one line.
    let out = run(&["--serve", &dash.addr]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot listen"), "{err}");
}
