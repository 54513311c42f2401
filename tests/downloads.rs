//! Downloads: files an assignment names land in the inbox byte-identical, from a real S3
//! server (s3s-fs) behind the fault proxy, by the remote assignments file or a retained
//! MQTT message (real mosquitto). Interrupted downloads resume with a Range request; a
//! corrupted object is never placed; downloads obey the battery and the metered budget;
//! an unassigned file is archived and restored without a download; the archived cache
//! limit expires the oldest.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::mqtt::{Broker, Sub};
use common::s3::*;
use common::*;
use serde_json::{json, Value};

const MIB: usize = 1024 * 1024;
/// Request and status lines, headers, assignment polls: slack on top of body bytes.
const OVERHEAD: u64 = 256 * 1024;
/// The resume granularity the README promises (`downloader::SYNC_EVERY`).
const CHUNK: u64 = 8 * 1024 * 1024;

fn inbox(env: &Env) -> PathBuf {
    env.dir.path().join("inbox")
}

/// `env` with `paths.inbox` set and `extra` lines added to `[upload]`.
fn with_inbox(mut env: Env, upload: &str) -> Env {
    let t = env
        .toml
        .replace(
            "[paths]\n",
            &format!("[paths]\ninbox = \"{}\"\n", inbox(&env).display()),
        )
        .replace("[upload]\n", &format!("[upload]\n{upload}\n"));
    env.write_config(&t);
    env
}

fn entry(key: &str, path: &str, body: &[u8]) -> Value {
    json!({"key": key, "sha256": sha256_hex(body), "size": body.len(), "path": path})
}

fn doc(entries: &[Value]) -> Vec<u8> {
    serde_json::to_vec(&json!({ "files": entries })).unwrap()
}

fn downloads(env: &Env) -> Vec<Value> {
    env.list()
        .into_iter()
        .filter(|a| {
            a["local_uri"]
                .as_str()
                .unwrap()
                .starts_with(inbox(env).to_str().unwrap())
        })
        .collect()
}

fn state_of(env: &Env, path: &str) -> Option<String> {
    let full = inbox(env).join(path).display().to_string();
    downloads(env)
        .into_iter()
        .find(|a| a["local_uri"] == full.as_str())
        .map(|a| a["state"].as_str().unwrap().to_string())
}

fn assert_placed(env: &Env, path: &str, body: &[u8]) {
    let got = fs::read(inbox(env).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(got.len(), body.len(), "size of {path}");
    assert!(got == body, "bytes of {path}");
}

fn no_part_files(dir: &Path) -> bool {
    let mut ok = true;
    walk(dir, &mut |p| {
        if p.to_string_lossy().ends_with(".fieldsync-part") {
            ok = false;
        }
    });
    ok
}

/// An S3 environment whose requests go through a fault proxy.
fn s3_env(upload: &str) -> (S3Server, FaultProxy, Env) {
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.addr());
    let env = Env::new(&S3Server::remote_toml(&proxy.endpoint(), SECRET_KEY, ""));
    (server, proxy, with_inbox(env, upload))
}

#[test]
fn remote_assignments_file_lands_byte_identical_and_a_corrupted_object_is_never_placed() {
    let (server, proxy, env) = s3_env("permanent_attempts = 2");
    let client = server.client();
    let small = bytes(1, 1000);
    let big = bytes(2, 3 * MIB + 17);
    let bad = bytes(3, 50_000);
    client.put("refs/a.pdf", &small);
    client.put("refs/site/b.jpg", &big);
    client.put("refs/bad.bin", &bad);
    // The assignment promises other bytes than the object holds.
    let mut wrong = entry("refs/bad.bin", "bad.bin", &bad);
    wrong["sha256"] = json!(sha256_hex(b"something else"));
    client.put(
        "fs/dev1/assignments.json",
        &doc(&[
            entry("refs/a.pdf", "a.pdf", &small),
            entry("refs/site/b.jpg", "site/b.jpg", &big),
            wrong,
            entry("refs/missing.bin", "missing.bin", b"never uploaded"),
        ]),
    );
    let mut d = env.spawn();
    env.wait(
        Some(&d),
        30,
        "two downloaded, the corrupt and the missing one failed",
        || {
            state_of(&env, "a.pdf").as_deref() == Some("synced")
                && state_of(&env, "site/b.jpg").as_deref() == Some("synced")
                && state_of(&env, "bad.bin").as_deref() == Some("failed")
                && state_of(&env, "missing.bin").as_deref() == Some("failed")
        },
    );
    let missing = downloads(&env)
        .into_iter()
        .find(|a| a["filename"] == "missing.bin")
        .unwrap();
    assert_eq!(missing["last_error_code"], "s3_NoSuchKey", "{missing}");
    assert!(!inbox(&env).join("missing.bin").exists());
    assert_placed(&env, "a.pdf", &small);
    assert_placed(&env, "site/b.jpg", &big);
    // The text list names a downloaded file without empty checklist/row parts.
    let text = env.cli_ok(&["list"]);
    assert!(
        text.lines()
            .any(|l| l.contains(" synced ") && l.ends_with("  a.pdf")),
        "{text}"
    );
    assert!(
        !inbox(&env).join("bad.bin").exists(),
        "a mismatch is never placed"
    );
    assert!(no_part_files(&inbox(&env)), "no temp file is left");
    let failed = downloads(&env)
        .into_iter()
        .find(|a| a["filename"] == "bad.bin")
        .unwrap();
    assert_eq!(failed["last_error_code"], "checksum_mismatch", "{failed}");
    assert_eq!(
        failed["attempts"], 2,
        "retried up to permanent_attempts: {failed}"
    );
    // `retry` queues a failed download for download again (not for upload).
    env.cli_ok(&["retry", failed["id"].as_str().unwrap()]);
    assert!(env.events().iter().any(|e| e["kind"] == "retried"
        && e["attachment_id"] == failed["id"]
        && e["to_state"] == "queued_download"));
    env.wait(Some(&d), 20, "failed again", || {
        state_of(&env, "bad.bin").as_deref() == Some("failed")
    });
    assert!(!inbox(&env).join("bad.bin").exists());
    let events = env.events();
    assert_eq!(
        events.iter().filter(|e| e["kind"] == "downloaded").count(),
        2
    );
    // `list` shows them, `status` counts them.
    let listed = env.cli_ok(&["list", "--state", "synced"]);
    assert!(
        listed.contains("a.pdf") && listed.contains("b.jpg"),
        "{listed}"
    );
    assert_eq!(env.status()["counts"]["synced"]["count"], 2);
    assert_eq!(env.status()["counts"]["failed"]["count"], 2);

    // The file is polled conditionally: nothing changes, nothing is downloaded again.
    let before = proxy.down_bytes();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        proxy.down_bytes() - before < 64 * 1024,
        "unchanged assignments cost only small conditional requests"
    );
    let log = d.log_text();
    assert_eq!(
        log.matches("remote assignments changed").count(),
        1,
        "the unchanged file is not read again (If-None-Match): {}",
        tail(&log, 20)
    );
    // Start-up repair: a downloaded file whose copy vanished is fetched again.
    d.terminate();
    fs::remove_file(inbox(&env).join("a.pdf")).unwrap();
    let d = env.spawn();
    env.wait(Some(&d), 30, "a.pdf downloaded again", || {
        state_of(&env, "a.pdf").as_deref() == Some("synced") && inbox(&env).join("a.pdf").exists()
    });
    assert_placed(&env, "a.pdf", &small);
    assert!(env
        .events()
        .iter()
        .any(|e| e["kind"] == "enqueued" && e["reason"] == "local_copy_missing"));
    // Nothing downloaded was uploaded back.
    assert!(client
        .list("fs/dev1/")
        .iter()
        .all(|(k, _)| k == "fs/dev1/assignments.json"));
}

#[test]
fn kill9_mid_download_of_100mb_resumes_with_at_most_one_chunk_fetched_again() {
    let (server, proxy, env) = s3_env("");
    let client = server.client();
    let body = bytes(7, 100 * MIB);
    client.put("refs/big.bin", &body);
    client.put(
        "fs/dev1/assignments.json",
        &doc(&[entry("refs/big.bin", "big.bin", &body)]),
    );
    proxy.set_down_throttle(25 * MIB as u64);
    let part = inbox(&env).join(".big.bin.fieldsync-part");
    let mut d = env.spawn();
    env.wait(Some(&d), 60, "a third downloaded", || {
        fs::metadata(&part).is_ok_and(|m| m.len() > 30 * MIB as u64)
    });
    d.kill9();
    proxy.wait_closed(Duration::from_secs(20));
    let first = proxy.down_bytes();
    let on_disk = fs::metadata(&part).unwrap().len();
    assert!(on_disk < body.len() as u64, "killed mid-download");

    proxy.set_down_throttle(0);
    let mut d = env.spawn();
    env.wait(Some(&d), 60, "downloaded after the restart", || {
        state_of(&env, "big.bin").as_deref() == Some("synced")
    });
    d.terminate();
    proxy.wait_closed(Duration::from_secs(20));
    assert_placed(&env, "big.bin", &body);
    let total = proxy.down_bytes();
    eprintln!(
        "100 MiB download, kill -9 at {on_disk} bytes on disk ({first} sent by then): {total} bytes fetched in all, {} again",
        total.saturating_sub(body.len() as u64)
    );
    assert!(
        total <= body.len() as u64 + CHUNK + OVERHEAD,
        "fetched {total} bytes for a {} byte file ({first} before the kill, {on_disk} on disk)",
        body.len()
    );
    assert!(
        d.log_text().contains("download resumes"),
        "{}",
        tail(&d.log_text(), 20)
    );
}

#[test]
fn retained_mqtt_assignment_downloads_archives_when_removed_and_restores_without_a_download() {
    let broker = Broker::start();
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.addr());
    let env = Env::new(&format!(
        "{}\n{}",
        S3Server::remote_toml(&proxy.endpoint(), SECRET_KEY, ""),
        broker.agent_config("")
    ));
    let env = with_inbox(env, "");
    let client = server.client();
    let a = bytes(11, 2 * MIB);
    let b = bytes(12, MIB);
    client.put("refs/a.jpg", &a);
    client.put("refs/b.jpg", &b);
    let back_office = Sub::new(broker.port, "fieldsync/dev1/#");
    let topic = "fieldsync/dev1/assignments";
    back_office.publish_retained(
        topic,
        &doc(&[
            entry("refs/a.jpg", "a.jpg", &a),
            entry("refs/b.jpg", "b.jpg", &b),
        ]),
    );
    let d = env.spawn();
    env.wait(Some(&d), 30, "both downloaded", || {
        state_of(&env, "a.jpg").as_deref() == Some("synced")
            && state_of(&env, "b.jpg").as_deref() == Some("synced")
    });
    assert_placed(&env, "a.jpg", &a);
    assert_placed(&env, "b.jpg", &b);

    // b is no longer assigned: archived, its copy kept as cache.
    back_office.publish_retained(topic, &doc(&[entry("refs/a.jpg", "a.jpg", &a)]));
    env.wait(Some(&d), 20, "b archived", || {
        state_of(&env, "b.jpg").as_deref() == Some("archived")
    });
    assert_placed(&env, "b.jpg", &b);
    // Assigned again: restored from the local copy, not fetched.
    let before = proxy.down_bytes();
    back_office.publish_retained(
        topic,
        &doc(&[
            entry("refs/a.jpg", "a.jpg", &a),
            entry("refs/b.jpg", "b.jpg", &b),
        ]),
    );
    env.wait(Some(&d), 20, "b restored", || {
        state_of(&env, "b.jpg").as_deref() == Some("synced")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        proxy.down_bytes() - before < 64 * 1024,
        "restored without a download ({} bytes)",
        proxy.down_bytes() - before
    );
    let ev = env.events();
    assert!(ev
        .iter()
        .any(|e| e["kind"] == "restored" && e["reason"] == "local_copy_intact"));
    // The restored copy changed behind our back, then b is unassigned and assigned again:
    // it is downloaded again.
    back_office.publish_retained(topic, &doc(&[entry("refs/a.jpg", "a.jpg", &a)]));
    env.wait(Some(&d), 20, "b archived again", || {
        state_of(&env, "b.jpg").as_deref() == Some("archived")
    });
    fs::write(inbox(&env).join("b.jpg"), b"scribbled over").unwrap();
    back_office.publish_retained(
        topic,
        &doc(&[
            entry("refs/a.jpg", "a.jpg", &a),
            entry("refs/b.jpg", "b.jpg", &b),
        ]),
    );
    env.wait(Some(&d), 20, "b downloaded again", || {
        state_of(&env, "b.jpg").as_deref() == Some("synced")
            && fs::read(inbox(&env).join("b.jpg")).is_ok_and(|x| x == b)
    });
    // Downloads show on the MQTT status like every other state.
    let status = back_office.last("/status").expect("a status").json();
    assert!(status["downloading"].is_array(), "{status}");
}

// ----- conditions (file remote, fake sysfs/procfs) --------------------------------------

fn write(p: &Path, s: &str) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    let tmp = p.with_extension("tmp-write");
    fs::write(&tmp, s).unwrap();
    fs::rename(&tmp, p).unwrap();
}

fn battery(env: &Env, percent: u8, status: &str) {
    let ps = env.dir.path().join("fake/sys/class/power_supply");
    write(&ps.join("BAT0/type"), "Battery\n");
    write(&ps.join("BAT0/capacity"), &format!("{percent}\n"));
    write(&ps.join("BAT0/status"), &format!("{status}\n"));
    write(&ps.join("AC/type"), "Mains\n");
    write(&ps.join("AC/online"), "0\n");
}

fn route(env: &Env, iface: &str) {
    write(
        &env.dir.path().join("fake/proc/net/route"),
        &format!(
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
             {iface}\t00000000\t0102A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n"
        ),
    );
}

/// A file-remote environment with `keys` in `[conditions]` and `retention` lines.
fn file_env(keys: &str, retention: &str) -> Env {
    let mut env = Env::new("");
    let toml = env.toml.replace(
        "[conditions]\n",
        &format!("[conditions]\nprobe_interval = \"200ms\"\n{keys}\n"),
    );
    env.write_config(&format!("{toml}\n[retention]\n{retention}\n"));
    with_inbox(env, "")
}

fn put_file(env: &Env, key: &str, body: &[u8]) {
    let p = env.remote.join(key);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, body).unwrap();
}

fn reason(env: &Env) -> Option<String> {
    env.status()["pause_reason"].as_str().map(String::from)
}

#[test]
fn downloads_wait_on_low_battery_and_count_against_the_metered_budget() {
    let env = file_env("metered_daily_budget = \"5MB\"", "");
    route(&env, "wwan0");
    battery(&env, 10, "Discharging");
    let files: Vec<Vec<u8>> = (0..3).map(|i| bytes(20 + i, 2_000_000)).collect();
    let mut entries = Vec::new();
    for (i, f) in files.iter().enumerate() {
        put_file(&env, &format!("refs/{i}.bin"), f);
        entries.push(entry(&format!("refs/{i}.bin"), &format!("{i}.bin"), f));
    }
    put_file(&env, "fs/dev1/assignments.json", &doc(&entries));
    let d = env.spawn();
    env.wait(Some(&d), 20, "paused on the battery", || {
        reason(&env).as_deref() == Some("battery_low")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        (0..3).all(|i| !inbox(&env).join(format!("{i}.bin")).exists()),
        "nothing downloaded on a low battery"
    );
    assert_eq!(env.count("synced"), 0);
    battery(&env, 10, "Charging");
    env.wait(Some(&d), 30, "two downloaded, the budget spent", || {
        env.count("synced") == 2
            && env.count("queued_download") == 1
            && reason(&env).as_deref() == Some("metered_budget_spent")
    });
    let c = env.status()["conditions"].clone();
    assert_eq!(c["budget"]["used"], 4_000_000, "{c}");
    // Wi-Fi: the last one comes, free of the budget.
    route(&env, "wlan0");
    env.wait(Some(&d), 30, "all three", || env.count("synced") == 3);
    for (i, f) in files.iter().enumerate() {
        assert_placed(&env, &format!("{i}.bin"), f);
    }
}

#[test]
fn cache_limit_keeps_the_newest_archived_and_expire_prints_what_it_removed() {
    let env = file_env("", "archived_cache_limit = 3");
    let files: Vec<Vec<u8>> = (0..5).map(|i| bytes(40 + i, 10_000)).collect();
    let entries: Vec<Value> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            put_file(&env, &format!("refs/{i}.bin"), f);
            entry(&format!("refs/{i}.bin"), &format!("f{i}.bin"), f)
        })
        .collect();
    let key = "fs/dev1/assignments.json";
    put_file(&env, key, &doc(&entries));
    let d = env.spawn();
    env.wait(Some(&d), 20, "all five downloaded", || {
        env.count("synced") == 5
    });
    // Unassign them one by one, oldest first.
    for n in 1..=5 {
        put_file(&env, key, &doc(&entries[n..]));
        env.wait(Some(&d), 20, &format!("{n} unassigned"), || {
            (0..n).all(|i| state_of(&env, &format!("f{i}.bin")).is_none_or(|s| s == "archived"))
        });
    }
    env.wait(Some(&d), 20, "three archived records kept", || {
        env.count("archived") == 3
    });
    for i in 0..2 {
        assert!(
            !inbox(&env).join(format!("f{i}.bin")).exists(),
            "f{i} expired with its copy"
        );
        assert_eq!(state_of(&env, &format!("f{i}.bin")), None);
    }
    for (i, f) in files.iter().enumerate().skip(2) {
        assert_placed(&env, &format!("f{i}.bin"), f);
        assert_eq!(
            state_of(&env, &format!("f{i}.bin")).as_deref(),
            Some("archived")
        );
    }
    let expired: Vec<Value> = env
        .events()
        .into_iter()
        .filter(|e| e["kind"] == "expired")
        .collect();
    assert_eq!(expired.len(), 2, "{expired:?}");

    // On demand, with a smaller limit: prints what it removed.
    let out = env.cli_ok(&["expire", "--limit", "1"]);
    assert!(out.contains("f2.bin") && out.contains("f3.bin"), "{out}");
    assert!(!out.contains("f4.bin"), "{out}");
    assert!(out.contains("expired 2 archived record(s)"), "{out}");
    assert!(!inbox(&env).join("f2.bin").exists());
    assert_placed(&env, "f4.bin", &files[4]);
    // A capture photo is never touched by expiry.
    let photo = env.drop_file("c/r/p.jpg", &bytes(99, 1000));
    env.wait(Some(&d), 20, "photo uploaded", || env.count("synced") == 1);
    let out = env.cli_ok(&["expire", "--limit", "0"]);
    assert!(out.contains("f4.bin"), "{out}");
    assert!(photo.exists());
}

#[test]
fn inbox_inside_capture_is_a_config_error() {
    let env = Env::new("");
    let t = env.toml.replace(
        "[paths]\n",
        &format!("[paths]\ninbox = \"{}/refs\"\n", env.capture.display()),
    );
    fs::write(&env.config, t).unwrap();
    let out = env.cli(&["config", "check"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("paths.inbox"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn http_remote_downloads_through_presigned_gets_and_resumes_a_partial_file_with_range() {
    const TOKEN: &str = "device-token-dl-4Kq9";
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.addr());
    let presign = PresignService::start_via(&server.endpoint(), &proxy.endpoint(), TOKEN);
    let env = Env::new(&format!(
        "[remote]\nkind = \"http\"\nprefix = \"fs\"\n\n[remote.http]\nendpoint = \"{}\"\ntoken = \"{TOKEN}\"\nconnect_timeout = \"2s\"\nread_timeout = \"5s\"\n",
        presign.endpoint()
    ));
    let env = with_inbox(env, "");
    let client = server.client();
    let body = bytes(60, 20 * MIB);
    client.put("refs/plan.pdf", &body);
    client.put(
        "fs/dev1/assignments.json",
        &doc(&[entry("refs/plan.pdf", "site/plan.pdf", &body)]),
    );
    // What an interrupted earlier run left: the first 12 MiB.
    let part = inbox(&env).join("site/.plan.pdf.fieldsync-part");
    fs::create_dir_all(part.parent().unwrap()).unwrap();
    fs::write(&part, &body[..12 * MIB]).unwrap();
    let mut d = env.spawn();
    env.wait(Some(&d), 30, "downloaded", || {
        state_of(&env, "site/plan.pdf").as_deref() == Some("synced")
    });
    d.terminate();
    proxy.wait_closed(Duration::from_secs(20));
    assert_placed(&env, "site/plan.pdf", &body);
    assert!(!part.exists());
    let fetched = proxy.down_bytes();
    assert!(
        fetched <= (8 * MIB) as u64 + OVERHEAD,
        "only the missing 8 MiB fetched, not {fetched} bytes"
    );
    assert!(presign.count("GET", "refs/plan.pdf") >= 1);
    assert!(presign.count("GET", "fs/dev1/assignments.json") >= 1);
}

#[test]
fn transient_errors_retry_with_backoff_and_resume_until_the_file_is_placed() {
    let (mut server, proxy, env) = s3_env("permanent_attempts = 1");
    let client = server.client();
    // Large enough that the socket buffers cannot hold what is left when the server dies.
    let body = bytes(70, 30 * MIB);
    client.put("refs/t.bin", &body);
    client.put(
        "fs/dev1/assignments.json",
        &doc(&[entry("refs/t.bin", "t.bin", &body)]),
    );
    proxy.set_down_throttle(2 * MIB as u64);
    let part = inbox(&env).join(".t.bin.fieldsync-part");
    let d = env.spawn();
    env.wait(Some(&d), 20, "download under way", || {
        fs::metadata(&part).is_ok_and(|m| m.len() > MIB as u64)
    });
    // The server goes away mid-download: more failures than permanent_attempts, but
    // transient ones never make it `failed`.
    server.stop();
    // (The failed request makes the daemon probe the remote; it then waits as `offline`.)
    env.wait(Some(&d), 20, "a retry scheduled, paused offline", || {
        env.events().iter().any(|e| e["kind"] == "retry_scheduled")
            && reason(&env).as_deref() == Some("offline")
    });
    assert_eq!(state_of(&env, "t.bin").as_deref(), Some("queued_download"));
    proxy.set_down_throttle(0);
    server.resume();
    env.wait(Some(&d), 40, "placed once the server is back", || {
        state_of(&env, "t.bin").as_deref() == Some("synced")
    });
    assert_placed(&env, "t.bin", &body);
    assert!(env.events().iter().all(|e| e["kind"] != "failed"));
    assert!(d.log_text().contains("download resumes"));
}
