//! The `s3` remote against a real S3 server (`s3s-fs`: SigV4 and Content-MD5 checked),
//! with faults injected by a TCP proxy in front of it or by stopping the server. Every test
//! reads back what landed in the bucket.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::s3::*;
use common::*;

const MIB: usize = 1024 * 1024;

/// Slack for request lines and headers (presigned URLs are long) on top of body bytes.
const OVERHEAD: u64 = 256 * 1024;

/// An environment uploading to `endpoint` (the server or a proxy in front of it).
fn s3_env(endpoint: &str, secret: &str, s3_extra: &str) -> Env {
    Env::new(&S3Server::remote_toml(endpoint, secret, s3_extra))
}

/// An environment sending 5 MiB parts (multipart above 5 MiB) through a fault proxy in
/// front of a fresh server; `extra`: more `[remote.s3]` keys.
fn multipart_behind_proxy(extra: &str) -> (S3Server, FaultProxy, Env) {
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.addr());
    let env = s3_env(
        &proxy.endpoint(),
        SECRET_KEY,
        &format!("multipart_threshold = \"5MiB\"\npart_size = \"5MiB\"\n{extra}"),
    );
    (server, proxy, env)
}

/// Adds keys to the `[upload]` table of the environment's config.
fn upload_settings(env: &mut Env, lines: &str) {
    env.edit_config("[upload]\n", &format!("[upload]\n{lines}\n"));
}

/// Every synced attachment's object, read back with GET, equals its local file, and the
/// bucket holds nothing else: one object per row, none uploaded twice.
fn assert_bucket_matches(env: &Env, client: &S3Client) -> Vec<serde_json::Value> {
    let list = env.list();
    for a in &list {
        assert_eq!(a["state"], "synced", "{a}");
        let key = a["object_key"].as_str().unwrap();
        let local = std::fs::read(a["local_uri"].as_str().unwrap()).unwrap();
        let body = client
            .get(key)
            .unwrap_or_else(|| panic!("{key} is not in the bucket"));
        assert_eq!(body.len(), local.len(), "size of {key}");
        assert_eq!(sha256_hex(&body), sha256_hex(&local), "bytes of {key}");
        assert_eq!(a["sha256"].as_str().unwrap(), sha256_hex(&local));
        let meta = client.head(key).unwrap();
        assert_eq!(
            meta["x-amz-meta-sha256"],
            sha256_hex(&local),
            "sha256 metadata of {key}"
        );
    }
    let objects = client.list("fs/");
    assert_eq!(objects.len(), list.len(), "one object per row: {objects:?}");
    list
}

/// The queue database, for what the CLI does not show (multipart parts).
fn committed_parts(env: &Env) -> (i64, i64) {
    let db = rusqlite::Connection::open(env.state.join("queue.db")).unwrap();
    db.query_row(
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM upload_parts",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

fn upload_id(env: &Env) -> Option<String> {
    let db = rusqlite::Connection::open(env.state.join("queue.db")).unwrap();
    db.query_row(
        "SELECT upload_id FROM attachments WHERE upload_id IS NOT NULL",
        [],
        |r| r.get(0),
    )
    .ok()
}

fn bytes_sent(env: &Env) -> i64 {
    env.list()
        .iter()
        .map(|a| a["bytes_sent"].as_i64().unwrap_or(0))
        .sum()
}

#[test]
fn hundred_photos_of_mixed_sizes_land_byte_identical_under_their_keys() {
    let server = S3Server::start();
    let env = s3_env(&server.endpoint(), SECRET_KEY, "");
    let d = env.spawn();
    // 0 B, a 40 MB video-sized photo, exactly the multipart threshold, just above it (two
    // parts), and 96 ordinary photos of 1 kB .. 480 kB: about 80 MB in all.
    let mut want = HashMap::new();
    for i in 0..100u64 {
        let len = match i {
            0 => 0,
            1 => 40_000_000,
            2 => 8 * MIB,
            3 => 8 * MIB + 1,
            _ => 1000 + (i as usize * 4_919) % 480_000,
        };
        let rel = format!("check-{}/row-{}/IMG_{i:04}.jpg", i % 4, i % 7);
        env.drop_file(&rel, &bytes(i, len));
        want.insert(env.capture.join(&rel).display().to_string(), rel);
    }
    env.wait(Some(&d), 240, "100 synced", || env.count("synced") == 100);

    let client = server.client();
    let list = assert_bucket_matches(&env, &client);
    assert_eq!(list.len(), 100);
    for a in &list {
        let rel = &want[a["local_uri"].as_str().unwrap()];
        let mut p = rel.split('/');
        let (checklist, row) = (p.next().unwrap(), p.next().unwrap());
        let id = a["id"].as_str().unwrap();
        assert_eq!(
            a["object_key"].as_str().unwrap(),
            format!("fs/dev1/{checklist}/{row}/{id}.jpg")
        );
    }
    let status = env.status();
    assert_eq!(status["pending"]["count"], 0);
    assert_eq!(status["counts"]["failed"]["count"], 0);
}

#[test]
fn killed_mid_multipart_resumes_and_resends_at_most_one_part() {
    let (server, proxy, env) = multipart_behind_proxy("");
    let part = 5 * MIB as u64;
    let size = 100_000_000u64;
    let data = bytes(42, size as usize);
    env.drop_file("pump-7/row-3/VID_0001.mp4", &data);
    // Slow enough that the kill lands mid-upload; fast enough for CI.
    proxy.set_throttle(25_000_000);
    let mut d = env.spawn();
    env.wait(Some(&d), 120, "30 MB sent", || {
        bytes_sent(&env) >= 30_000_000
    });
    d.kill9();
    // What the dead process had already written still drains through the proxy.
    proxy.set_throttle(0);
    proxy.wait_closed(Duration::from_secs(30));
    let before = proxy.up_bytes();
    let (parts, committed) = committed_parts(&env);
    assert!(parts >= 4, "parts committed before the kill: {parts}");
    assert!(upload_id(&env).is_some(), "upload id kept for resume");

    proxy.set_throttle(0);
    let d = env.spawn();
    env.wait(Some(&d), 120, "synced after restart", || {
        env.count("synced") == 1
    });
    let after = proxy.up_bytes() - before;

    let client = server.client();
    assert_eq!(assert_bucket_matches(&env, &client).len(), 1);
    // The restart sent only what was not committed (no completed part again) …
    assert!(
        after <= size - committed as u64 + OVERHEAD,
        "sent {after} after restart; {committed} of {size} were committed"
    );
    // … so over both runs at most one part went twice.
    let total = before + after;
    assert!(
        total <= size + part + OVERHEAD,
        "{total} bytes forwarded for a {size} byte file (part {part})"
    );
    assert!(d.log_text().contains("resuming multipart upload"));
    assert_eq!(committed_parts(&env).0, 0, "parts forgotten once complete");
}

#[test]
fn forgotten_upload_id_starts_a_fresh_multipart_upload() {
    let (server, proxy, env) = multipart_behind_proxy("");
    env.drop_file("c/r/big.jpg", &bytes(5, 30_000_000));
    proxy.set_throttle(10_000_000);
    let mut d = env.spawn();
    env.wait(Some(&d), 60, "a part committed", || {
        committed_parts(&env).0 >= 1
    });
    d.kill9();
    // The server forgets the upload (as after its expiry rule ran).
    let uid = upload_id(&env).unwrap();
    let key = env.list()[0]["object_key"].as_str().unwrap().to_string();
    server.client().abort_multipart(&key, &uid);

    proxy.set_throttle(0);
    let d = env.spawn();
    env.wait(Some(&d), 60, "synced", || env.count("synced") == 1);
    let client = server.client();
    assert_eq!(assert_bucket_matches(&env, &client).len(), 1);
    assert!(
        d.log_text().contains("starting a fresh one"),
        "{}",
        d.log_text()
    );
    assert_eq!(env.count("failed"), 0);
}

#[test]
fn dropped_connections_mid_part_and_mid_put_leave_one_good_object() {
    let (server, proxy, env) = multipart_behind_proxy("");
    let d = env.spawn();
    // Mid second part of a three-part upload.
    proxy.reset_after(7_000_000);
    env.drop_file("c/r/multi.jpg", &bytes(1, 12 * MIB));
    env.wait(Some(&d), 60, "multipart synced", || {
        env.count("synced") == 1
    });
    // Mid single PUT.
    proxy.reset_after(1_000_000);
    env.drop_file("c/r/single.jpg", &bytes(2, 3_000_000));
    env.wait(Some(&d), 60, "single synced", || env.count("synced") == 2);

    assert_eq!(
        proxy
            .faults
            .resets
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    let client = server.client();
    assert_eq!(assert_bucket_matches(&env, &client).len(), 2);
    let retries = env
        .events()
        .iter()
        .filter(|e| e["kind"] == "retry_scheduled")
        .count();
    assert!(retries >= 2, "each drop was a retried attempt: {retries}");
}

#[test]
fn burst_of_503_is_retried_without_duplicates() {
    let (server, proxy, env) = multipart_behind_proxy("");
    proxy.fail_503(8);
    env.drop_file("c/r/multi.jpg", &bytes(1, 11 * MIB));
    for i in 0..4 {
        env.drop_file(&format!("c/r/p{i}.jpg"), &bytes(10 + i, 200_000));
    }
    let d = env.spawn();
    env.wait(Some(&d), 120, "5 synced", || env.count("synced") == 5);
    assert_eq!(
        proxy
            .faults
            .served_503
            .load(std::sync::atomic::Ordering::SeqCst),
        8
    );
    let client = server.client();
    assert_eq!(assert_bucket_matches(&env, &client).len(), 5);
    let slow_down = env
        .events()
        .iter()
        .filter(|e| {
            e["kind"] == "retry_scheduled"
                && e["reason"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("s3_SlowDown")
        })
        .count();
    assert!(
        slow_down >= 1,
        "503s were retried as SlowDown\n{}",
        env.dump(Some(&d))
    );
    assert_eq!(env.count("failed"), 0);
}

#[test]
fn wrong_secret_pauses_with_auth_and_never_leaks_credentials() {
    let server = S3Server::start();
    let wrong = "WRONG-secret-Zq8vX31pLk";
    let mut env = s3_env(&server.endpoint(), wrong, "");
    upload_settings(&mut env, "auth_recheck = \"1s\"");
    for i in 0..3 {
        env.drop_file(&format!("c/r/p{i}.jpg"), &bytes(i, 50_000 + i as usize));
    }
    let mut d = env.spawn();
    env.wait(Some(&d), 30, "paused with reason auth", || {
        env.status()["pause_reason"] == "auth"
    });
    // Re-probes (every second here) keep it paused; nothing is given up or uploaded.
    std::thread::sleep(Duration::from_secs(3));
    let status = env.status();
    assert_eq!(status["pause_reason"], "auth", "{status}");
    assert_eq!(status["counts"]["failed"]["count"], 0);
    assert_eq!(status["counts"]["synced"]["count"], 0);
    assert_eq!(status["counts"]["queued_upload"]["count"], 3);
    assert!(server.client().list("").is_empty());
    let last_error = env.list()[0]["last_error_code"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert_eq!(last_error, "s3_SignatureDoesNotMatch");

    // No credential in the log, status, list or events.
    let seen = format!(
        "{}\n{}\n{}\n{}\n{}",
        d.log_text(),
        env.cli_ok(&["status", "--json"]),
        env.cli_ok(&["status"]),
        env.cli_ok(&["list", "--json"]),
        env.cli_ok(&["events", "--json"]),
    );
    for secret in [wrong, SECRET_KEY, ACCESS_KEY] {
        assert!(!seen.contains(secret), "credential {secret} leaked");
    }

    // Fix the config and restart: everything goes up.
    let (code, _) = d.terminate();
    assert_eq!(code, Some(0));
    env.edit_config(wrong, SECRET_KEY);
    let d = env.spawn();
    env.wait(Some(&d), 30, "3 synced", || env.count("synced") == 3);
    assert_bucket_matches(&env, &server.client());
    assert!(env.status()["pause_reason"].is_null());
}

#[test]
fn server_down_then_back_completes_with_growing_backoff() {
    let mut server = S3Server::start();
    let mut env = s3_env(&server.endpoint(), SECRET_KEY, "");
    upload_settings(
        &mut env,
        "initial_backoff = \"500ms\"\nmax_backoff = \"4s\"",
    );
    let t = env
        .toml
        .replace("initial_backoff = \"200ms\"\n", "")
        .replace("max_backoff = \"1s\"\n", "");
    env.write_config(&t);
    server.stop();
    env.drop_file("c/r/a.jpg", &bytes(1, 300_000));
    env.drop_file("c/r/b.jpg", &bytes(2, 9 * MIB));
    let d = env.spawn();
    env.wait(Some(&d), 30, "first failures", || {
        env.list()
            .iter()
            .all(|a| a["attempts"].as_i64().unwrap_or(0) >= 1)
    });
    std::thread::sleep(Duration::from_secs(8));

    // The failed requests told the conditions the remote is unreachable: the queue waits
    // with reason `offline` instead of burning attempts, and a probe checks the link with
    // a growing delay. Both are in the event log; nothing is a tight loop.
    assert_eq!(env.status()["pause_reason"], "offline");
    let events = env.events();
    let attempts = |id: &str| {
        events
            .iter()
            .filter(|e| e["kind"] == "retry_scheduled" && e["attachment_id"] == id)
            .count()
    };
    let list = env.list();
    let total: usize = list
        .iter()
        .map(|a| attempts(a["id"].as_str().unwrap()))
        .sum();
    // A photo enqueued after the link was found offline is not even tried.
    assert!(
        (1..=10).contains(&total),
        "{total} upload attempts in ~9 s\n{}",
        env.dump(Some(&d))
    );
    for a in &list {
        let id = a["id"].as_str().unwrap();
        if attempts(id) > 0 {
            assert!(events.iter().any(|e| e["attachment_id"] == id
                && e["reason"].as_str().unwrap_or("").starts_with("connect")));
        }
    }
    let probes: Vec<i64> = events
        .iter()
        .filter(|e| e["kind"] == "probe_failed")
        .map(|e| e["time"].as_i64().unwrap())
        .collect();
    assert!((2..=10).contains(&probes.len()), "probes: {probes:?}");
    let gaps: Vec<i64> = probes.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().all(|g| *g >= 500), "probe gaps {gaps:?}");
    assert!(gaps.last() >= gaps.first(), "probe gaps grow: {gaps:?}");
    assert_eq!(env.count("failed"), 0);

    server.resume();
    env.wait(Some(&d), 60, "2 synced", || env.count("synced") == 2);
    assert_bucket_matches(&env, &server.client());
}

#[test]
fn sigterm_during_large_upload_exits_zero_fast_and_resumes_without_resending_parts() {
    let (server, proxy, env) = multipart_behind_proxy("");
    let size = 60_000_000u64;
    env.drop_file("c/r/VID_0002.mp4", &bytes(9, size as usize));
    proxy.set_throttle(8_000_000);
    let mut d = env.spawn();
    env.wait(Some(&d), 60, "2 parts committed", || {
        committed_parts(&env).0 >= 2
    });
    let (code, took) = d.terminate();
    assert_eq!(code, Some(0), "clean exit\n{}", d.log_text());
    assert!(took < Duration::from_secs(10), "stopped in {took:?}");
    // The stopped daemon's send buffers drain through the throttled proxy after it
    // exits: count only what the restarted daemon sends.
    proxy.wait_closed(Duration::from_secs(30));
    let (parts, committed) = committed_parts(&env);
    assert!(parts >= 2);
    assert_eq!(env.count("queued_upload"), 1, "still queued, not failed");

    let before = proxy.up_bytes();
    proxy.set_throttle(0);
    let d = env.spawn();
    env.wait(Some(&d), 60, "synced", || env.count("synced") == 1);
    let after = proxy.up_bytes() - before;
    assert!(
        after <= size - committed as u64 + OVERHEAD,
        "re-sent completed parts: {after} bytes after restart, {committed} were committed"
    );
    assert_bucket_matches(&env, &server.client());
}

#[test]
fn both_checksums_are_sent_and_verified() {
    let server = S3Server::start();
    let env = s3_env(
        &server.endpoint(),
        SECRET_KEY,
        "checksum = \"both\"\nmultipart_threshold = \"5MiB\"\npart_size = \"5MiB\"",
    );
    env.drop_file("c/r/multi.jpg", &bytes(3, 11 * MIB));
    env.drop_file("c/r/small.jpg", &bytes(4, 70_000));
    let d = env.spawn();
    env.wait(Some(&d), 60, "2 synced", || env.count("synced") == 2);
    assert_bucket_matches(&env, &server.client());
}

#[test]
fn object_stored_but_answer_lost_is_not_sent_again() {
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.addr());
    let env = s3_env(&proxy.endpoint(), SECRET_KEY, "");
    let d = env.spawn();
    // Lose the answer to the photo's PUT (no other request takes the fault: the start-up
    // probe, the assignments poll): the server stores the photo, the daemon never hears
    // back (an unknown outcome).
    proxy
        .faults
        .swallow_put_responses
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let before = proxy.up_bytes();
    env.drop_file("c/r/once.jpg", &bytes(8, 2_000_000));
    env.wait(Some(&d), 60, "synced", || env.count("synced") == 1);
    assert_bucket_matches(&env, &server.client());
    assert_eq!(server.client().list("fs/").len(), 1);
    let uploaded = env
        .events()
        .into_iter()
        .find(|e| e["kind"] == "uploaded")
        .unwrap();
    assert_eq!(uploaded["reason"], "already_present", "{uploaded}");
    assert_eq!(
        proxy
            .faults
            .swallow_put_responses
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the PUT's answer was lost"
    );
    assert!(
        proxy.up_bytes() - before < 2 * 2_000_000,
        "sent once, not twice"
    );
}

#[test]
fn abandoned_multipart_upload_is_aborted() {
    let (server, proxy, env) = multipart_behind_proxy("");
    let p = env.drop_file("c/r/gone.jpg", &bytes(6, 40_000_000));
    proxy.set_throttle(8_000_000);
    let d = env.spawn();
    env.wait(Some(&d), 60, "a part committed", || {
        committed_parts(&env).0 >= 1
    });
    let uid = upload_id(&env).unwrap();
    assert!(server.stored_parts(&uid) >= 1);
    // The inspector deletes the photo before it is uploaded.
    std::fs::remove_file(&p).unwrap();
    env.wait(Some(&d), 60, "archived", || env.count("archived") == 1);
    env.wait(Some(&d), 30, "upload aborted", || upload_id(&env).is_none());
    assert_eq!(server.stored_parts(&uid), 0, "server still holds the parts");
    assert!(server.client().list("fs/").is_empty());
}

#[test]
fn file_overwritten_during_upload_never_ends_synced_with_mixed_bytes() {
    // Uploads skip re-hashing when the file's ctime proves it unchanged since ingest; a
    // write in the middle of the upload must still be caught.
    let (server, proxy, env) = multipart_behind_proxy("");
    let size = 20_000_000usize;
    let p = env.drop_file("c/r/VID.mp4", &bytes(1, size));
    proxy.set_throttle(6_000_000);
    let d = env.spawn();
    env.wait(Some(&d), 60, "a part committed", || {
        committed_parts(&env).0 >= 1
    });
    // Same size, other bytes, written in place (no new inode, mtime kept like a careless
    // tool would): only ctime tells.
    let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
    std::fs::write(&p, bytes(2, size)).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    proxy.set_throttle(0);
    env.wait(Some(&d), 60, "one synced", || env.count("synced") == 1);
    std::thread::sleep(Duration::from_secs(2));
    let synced = env.list_state("synced");
    assert_eq!(synced.len(), 1);
    assert_eq!(
        synced[0]["sha256"],
        sha256_hex(&bytes(2, size)),
        "the new bytes"
    );
    // Every object in the bucket is byte-identical to a synced record: no mixed object.
    let objects = server.client().list("");
    assert_eq!(objects.len(), 1, "{objects:?}");
    let body = server
        .client()
        .get(synced[0]["object_key"].as_str().unwrap())
        .unwrap();
    assert_eq!(sha256_hex(&body), sha256_hex(&bytes(2, size)));
}

/// A fake battery in the harness's sysfs tree (the `[conditions]` it points at).
fn battery(env: &Env, percent: u8, status: &str) {
    let ps = env.dir.path().join("fake/sys/class/power_supply/BAT0");
    std::fs::create_dir_all(&ps).unwrap();
    for (name, value) in [
        ("type", "Battery".to_string()),
        ("capacity", percent.to_string()),
        ("status", status.to_string()),
    ] {
        let tmp = ps.join(format!(".{name}"));
        std::fs::write(&tmp, format!("{value}\n")).unwrap();
        std::fs::rename(&tmp, ps.join(name)).unwrap();
    }
}

#[test]
fn condition_lost_mid_multipart_resumes_without_resending_parts() {
    let (server, proxy, env) = multipart_behind_proxy("");
    battery(&env, 80, "Discharging");
    let size = 40_000_000u64;
    env.drop_file("c/r/VID_0003.mp4", &bytes(11, size as usize));
    proxy.set_throttle(6_000_000);
    let d = env.spawn();
    env.wait(Some(&d), 60, "2 parts committed", || {
        committed_parts(&env).0 >= 2
    });

    // The battery runs low mid-upload: uploads stop at a safe point, nothing fails.
    battery(&env, 10, "Discharging");
    env.wait(Some(&d), 20, "paused battery_low", || {
        env.status()["pause_reason"] == "battery_low"
    });
    std::thread::sleep(Duration::from_secs(1));
    let quiet = proxy.up_bytes();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(proxy.up_bytes(), quiet, "nothing is sent while paused");
    assert_eq!(env.count("queued_upload"), 1);
    assert_eq!(env.count("failed"), 0);
    let (parts, committed) = committed_parts(&env);
    assert!(parts >= 2);

    // Plugged in: the upload resumes at the next missing part.
    let before = proxy.up_bytes();
    proxy.set_throttle(0);
    battery(&env, 10, "Charging");
    env.wait(Some(&d), 60, "synced", || env.count("synced") == 1);
    let after = proxy.up_bytes() - before;
    assert!(
        after <= size - committed as u64 + OVERHEAD,
        "re-sent uploaded parts: {after} bytes after resuming, {committed} were committed"
    );
    assert_bucket_matches(&env, &server.client());
}

#[test]
fn a_locked_queue_database_stops_the_upload_before_another_part_is_sent() {
    // Another writer (an operator's `sqlite3 queue.db`) holds the database longer than
    // the daemon's busy timeout (10 s) while a part is acknowledged: that part cannot be
    // committed, so no further part may be sent — a crash then would re-send them all.
    let (server, proxy, env) = multipart_behind_proxy("");
    let part = 5 * MIB as u64;
    let size = 40_000_000u64;
    env.drop_file("c/r/VID_0004.mp4", &bytes(12, size as usize));
    proxy.set_throttle(5_000_000);
    let d = env.spawn();
    env.wait(Some(&d), 60, "a part committed", || {
        committed_parts(&env).0 >= 1
    });
    let db = rusqlite::Connection::open(env.state.join("queue.db")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    // The part on the wire finishes, but its commit waits out the busy timeout (behind a
    // progress write that waits too) and fails: the attempt must stop there. (The old
    // uploader sent the next part once its own byte accounting gave up waiting, ~10 s.)
    env.wait(Some(&d), 60, "the failed commit reported", || {
        d.log_text().contains("cannot record an uploaded part")
    });
    let at_failure = proxy.up_bytes();
    std::thread::sleep(Duration::from_secs(12));
    let after_failure = proxy.up_bytes() - at_failure;
    db.execute_batch("COMMIT").unwrap();
    drop(db);
    assert!(
        after_failure <= OVERHEAD,
        "{after_failure} bytes sent after a part could not be committed"
    );

    env.wait(Some(&d), 90, "synced", || env.count("synced") == 1);
    let client = server.client();
    assert_eq!(assert_bucket_matches(&env, &client).len(), 1);
    assert!(
        proxy.up_bytes() <= size + part + OVERHEAD,
        "{} bytes forwarded for a {size} byte file",
        proxy.up_bytes()
    );
    assert_eq!(env.count("failed"), 0);
}

#[test]
fn parallel_parts_land_byte_identical_and_resume_after_kill9() {
    let (server, proxy, env) = multipart_behind_proxy("part_concurrency = 4");
    let part = 5 * MIB as u64;
    let size = 60_000_000u64;
    env.drop_file("c/r/VID_par.mp4", &bytes(77, size as usize));
    proxy.set_throttle(3_000_000);
    let mut d = env.spawn();
    env.wait(Some(&d), 120, "4 parts committed", || {
        committed_parts(&env).0 >= 4
    });
    d.kill9();
    // What the dead process had already written still drains through the proxy.
    proxy.set_throttle(0);
    proxy.wait_closed(Duration::from_secs(30));
    let before = proxy.up_bytes();
    let (_, committed) = committed_parts(&env);
    proxy.set_throttle(0);
    let d = env.spawn();
    env.wait(Some(&d), 120, "synced", || env.count("synced") == 1);
    let after = proxy.up_bytes() - before;
    assert_bucket_matches(&env, &server.client());
    assert_eq!(server.client().list("fs/").len(), 1, "one object");
    // The restart sends only what was not committed; overall at most the parts that were
    // in flight (4) went twice.
    assert!(
        after <= size - committed as u64 + OVERHEAD,
        "sent {after} after restart; {committed} of {size} were committed\n{}",
        env.dump(Some(&d))
    );
    assert!(before + after <= size + 4 * part + OVERHEAD);
}

/// libfaketime, which runs the real binary with a wrong clock (Debian package `faketime`).
fn libfaketime() -> Option<std::path::PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/arm-linux-gnueabihf/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
    ]
    .into_iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.exists())
}

#[test]
fn a_wrong_clock_waits_as_clock_skew_and_resumes_once_the_clock_is_set() {
    let Some(lib) = libfaketime() else {
        eprintln!("SKIP: libfaketime not installed (apt-get install faketime)");
        return;
    };
    let server = S3Server::start();
    let env = s3_env(&server.endpoint(), SECRET_KEY, "");
    for i in 0..3 {
        env.drop_file(&format!("c/r/p{i}.jpg"), &bytes(i, 40_000 + i as usize));
    }
    // The daemon's clock, set live through libfaketime's timestamp file (re-read every
    // second); the monotonic clock stays real, as it does when NTP steps the wall clock.
    let clock = env.dir.path().join("faketime");
    std::fs::write(&clock, "-20000d\n").unwrap(); // a board without RTC: 1971
    let d = env.spawn_with(&[
        ("LD_PRELOAD", lib.to_str().unwrap()),
        ("FAKETIME_TIMESTAMP_FILE", clock.to_str().unwrap()),
        ("FAKETIME_CACHE_DURATION", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ]);
    env.wait(Some(&d), 30, "paused with reason clock_skew", || {
        env.status()["pause_reason"] == "clock_skew"
    });
    let waiting = |env: &Env, why: &str| {
        let status = env.status();
        assert_eq!(status["pause_reason"], "clock_skew", "{why}: {status}");
        assert_eq!(status["conditions"]["clock_skewed"], true, "{status}");
        assert_eq!(status["conditions"]["auth_failed"], false, "{status}");
        assert_eq!(status["counts"]["failed"]["count"], 0, "{status}");
        assert_eq!(status["counts"]["queued_upload"]["count"], 3, "{status}");
        for a in env.list() {
            assert_eq!(a["attempts"], 0, "{why}: no attempt used\n{a}");
        }
        assert!(server.client().list("").is_empty());
    };
    waiting(&env, "1971");
    assert!(
        env.list().iter().any(|a| a["last_error_code"]
            .as_str()
            .is_some_and(|c| c == "clock_skew" || c.starts_with("s3_"))),
        "{}",
        env.dump(Some(&d))
    );
    // Two hours ahead: s3s-fs answers RequestTimeTooSkewed; still waiting, nothing used.
    std::fs::write(&clock, "+2h\n").unwrap();
    std::thread::sleep(Duration::from_secs(4));
    waiting(&env, "two hours ahead");
    assert!(
        d.log_text().contains("device clock"),
        "the log names the clock\n{}",
        env.dump(Some(&d))
    );

    // NTP syncs: the uploads resume by themselves, without a restart.
    std::fs::write(&clock, "+0\n").unwrap();
    env.wait(Some(&d), 30, "3 synced after the clock was set", || {
        env.count("synced") == 3
    });
    assert_bucket_matches(&env, &server.client());
    let status = env.status();
    assert!(status["pause_reason"].is_null(), "{status}");
    assert_eq!(status["conditions"]["clock_skewed"], false);
    assert_eq!(env.count("failed"), 0);
    assert!(env.list().iter().all(|a| a["attempts"] == 0));
}

#[test]
fn progress_moves_within_parts() {
    let server = S3Server::start();
    let part = 5 * MIB as u64;
    let mut env = s3_env(
        &server.endpoint(),
        SECRET_KEY,
        "multipart_threshold = \"5MiB\"\npart_size = \"5MiB\"",
    );
    // The device's own rate limit paces the reads: a throttle behind the socket would not
    // do, because on loopback the kernel's socket buffers take a whole 5 MiB part at once.
    env.edit_config(
        "min_free_disk = 0",
        "bandwidth_limit = \"2MB\"\nmin_free_disk = 0",
    );
    let size = 12_000_000u64;
    env.drop_file("c/r/VID_progress.mp4", &bytes(9, size as usize));
    let d = env.spawn();
    // A 5 MiB part takes over 2.5 s here: status must move during it.
    env.wait(Some(&d), 60, "bytes_sent between part boundaries", || {
        let sent = env.status()["uploading"][0]["bytes_sent"]
            .as_u64()
            .unwrap_or(0);
        !sent.is_multiple_of(part) && sent < size
    });
    env.wait(Some(&d), 60, "synced", || env.count("synced") == 1);
    assert_bucket_matches(&env, &server.client());
}
