//! Bad files and a bad remote: each is reported with its reason, nothing is lost, and the
//! other photos are not held up.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;

fn chmod(p: &std::path::Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn unreadable_file_fails_with_reason_and_others_upload() {
    let mut env = Env::new("");
    env.drop_privileges();
    let bad = env.drop_file("c/r/locked.jpg", &bytes(1, 4000));
    chmod(&bad, 0o000);
    for i in 0..5 {
        env.drop_file(&format!("c/r/ok-{i}.jpg"), &bytes(10 + i, 4000));
    }
    if let Some(uid) = env.run_as {
        chown_tree(env.dir.path(), uid);
        chmod(&bad, 0o000);
    }
    let d = env.spawn();
    env.wait(Some(&d), 30, "5 synced and 1 failed", || {
        env.count("synced") == 5 && env.count("failed") == 1
    });
    let failed = env.list_state("failed");
    assert_eq!(failed[0]["filename"], "locked.jpg");
    assert_eq!(failed[0]["last_error_code"], "read_error");
    assert!(
        failed[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("ermission denied"),
        "{failed:?}"
    );
    assert_eq!(env.remote_objects().len(), 5);

    // Fixed by the operator: retry uploads it with the right bytes.
    chmod(&bad, 0o644);
    let out = env.cli_ok(&["retry", "--failed"]);
    assert!(out.contains("requeued 1"), "{out}");
    env.wait(Some(&d), 30, "6 synced", || env.count("synced") == 6);
    assert!(env
        .remote_objects()
        .iter()
        .any(|(_, b)| *b == bytes(1, 4000)));
}

#[test]
fn read_only_remote_retries_with_backoff_then_completes() {
    let mut env = Env::new("");
    if !env.drop_privileges() && is_root() {
        unreachable!();
    }
    chmod(&env.remote, 0o555);
    let d = env.spawn();
    for i in 0..3 {
        env.drop_file(&format!("c/r/p{i}.jpg"), &bytes(i, 20_000));
    }
    // Several failed attempts each, none given up, nothing synced. Each photo is waited
    // for by its own retries: the three are found one by one, so a count over all of them
    // can be reached by two photos before the third is even in the queue.
    env.wait(Some(&d), 30, "two retries for each of the 3 photos", || {
        let evs = env.events();
        let mut per: std::collections::HashMap<String, usize> = Default::default();
        for e in evs.iter().filter(|e| e["kind"] == "retry_scheduled") {
            *per.entry(e["attachment_id"].to_string()).or_default() += 1;
        }
        per.len() == 3 && per.values().all(|n| *n >= 2)
    });
    let st = env.status();
    assert_eq!(st["counts"]["synced"]["count"], 0);
    assert_eq!(
        st["counts"]["failed"]["count"], 0,
        "transient errors never give up"
    );
    assert_eq!(st["counts"]["queued_upload"]["count"], 3);
    assert_eq!(st["last_error"]["kind"], "retry_scheduled");
    assert!(st["last_error"]["reason"]
        .as_str()
        .unwrap()
        .starts_with("remote_io"));

    // Backoff: attempts of one photo are spaced out, not a tight loop (initial 200ms,
    // cap 1s, equal jitter: at least 100ms apart).
    let evs = env.events();
    let id = evs.iter().find(|e| e["kind"] == "retry_scheduled").unwrap()["attachment_id"].clone();
    let times: Vec<i64> = evs
        .iter()
        .filter(|e| e["kind"] == "retry_scheduled" && e["attachment_id"] == id)
        .map(|e| e["time"].as_i64().unwrap())
        .collect();
    assert!(times.len() >= 2);
    for w in times.windows(2) {
        assert!(w[1] - w[0] >= 100, "attempts too close: {times:?}");
    }

    chmod(&env.remote, 0o755);
    env.wait(Some(&d), 30, "all synced", || env.count("synced") == 3);
    assert_eq!(env.remote_objects().len(), 3);
}

#[test]
fn deleted_before_upload_is_archived_not_failed() {
    let env = Env::new("");
    let d = env.spawn();
    env.cli_ok(&["pause"]);
    env.wait(Some(&d), 10, "paused", || {
        env.status()["pause_reason"] == "paused_by_operator"
    });
    let p = env.drop_file("c/r/gone.jpg", &bytes(1, 1000));
    env.drop_file("c/r/kept.jpg", &bytes(2, 1000));
    env.wait(Some(&d), 10, "2 queued", || env.count("queued_upload") == 2);
    fs::remove_file(&p).unwrap();
    env.wait(Some(&d), 10, "archived", || env.count("archived") == 1);
    env.cli_ok(&["resume"]);
    env.wait(Some(&d), 10, "kept synced", || env.count("synced") == 1);
    let archived = env.list_state("archived");
    assert_eq!(archived[0]["filename"], "gone.jpg");
    let ev = env.events();
    assert!(ev.iter().any(|e| e["kind"] == "archived"
        && e["reason"] == "deleted_before_upload"
        && e["attachment_id"] == archived[0]["id"]));
    assert_eq!(env.count("failed"), 0);
    assert_eq!(env.remote_objects().len(), 1);
}

#[test]
fn file_modified_after_ingest_uploads_only_the_new_bytes() {
    let env = Env::new("");
    let d = env.spawn();
    env.cli_ok(&["pause"]);
    env.wait(Some(&d), 10, "paused", || env.status()["paused"] == true);
    let p = env.drop_file("c/r/edit.jpg", &bytes(1, 5000));
    env.wait(Some(&d), 10, "queued", || env.count("queued_upload") == 1);
    std::thread::sleep(Duration::from_millis(50));
    fs::write(&p, bytes(2, 7000)).unwrap();
    env.wait(Some(&d), 10, "old version superseded", || {
        env.count("archived") == 1
    });
    env.cli_ok(&["resume"]);
    env.wait(Some(&d), 10, "synced", || env.count("synced") == 1);
    let objs = env.remote_objects();
    assert_eq!(objs.len(), 1);
    assert_eq!(objs[0].1, bytes(2, 7000), "never the stale bytes");
    let synced = &env.list_state("synced")[0];
    assert_eq!(synced["sha256"], sha256_hex(&bytes(2, 7000)));
}

#[test]
fn pause_and_resume_reach_the_running_daemon() {
    let env = Env::new("");
    let d = env.spawn();
    env.cli_ok(&["pause"]);
    env.wait(Some(&d), 5, "paused", || {
        env.status()["pause_reason"] == "paused_by_operator"
    });
    env.drop_file("c/r/a.jpg", &bytes(1, 1000));
    env.wait(Some(&d), 10, "queued", || env.count("queued_upload") == 1);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(env.count("synced"), 0, "nothing uploads while paused");
    env.cli_ok(&["resume"]);
    env.wait(Some(&d), 5, "synced after resume", || {
        env.count("synced") == 1
    });
    assert!(env.status()["pause_reason"].is_null());
    let kinds: Vec<String> = env
        .events()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(kinds.contains(&"paused".to_string()) && kinds.contains(&"resumed".to_string()));
}

#[test]
fn verify_repairs_records_whose_files_vanished() {
    let env = Env::new("");
    let mut d = env.spawn();
    let synced = env.drop_file("c/r/synced.jpg", &bytes(1, 1000));
    env.wait(Some(&d), 10, "synced", || env.count("synced") == 1);
    env.cli_ok(&["pause"]);
    env.wait(Some(&d), 5, "paused", || env.status()["paused"] == true);
    let queued = env.drop_file("c/r/queued.jpg", &bytes(2, 1000));
    env.wait(Some(&d), 10, "queued", || env.count("queued_upload") == 1);
    d.kill9();
    fs::remove_file(&synced).unwrap();
    fs::remove_file(&queued).unwrap();
    let out = env.cli_ok(&["verify", "--json"]);
    let repairs: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(repairs.len(), 2, "{out}");
    let by_to = |to: &str| repairs.iter().find(|r| r["to"] == to).unwrap().clone();
    assert_eq!(by_to("archived")["reason"], "file_missing");
    assert!(by_to("archived")["path"]
        .as_str()
        .unwrap()
        .ends_with("synced.jpg"));
    assert!(by_to("failed")["path"]
        .as_str()
        .unwrap()
        .ends_with("queued.jpg"));
    let failed = env.list_state("failed");
    assert_eq!(failed[0]["last_error_code"], "file_missing");
    // A second verify finds nothing more.
    assert!(env.cli_ok(&["verify"]).contains("nothing to repair"));
}

#[test]
fn retry_of_unknown_id_exits_3() {
    let env = Env::new("");
    let out = env.cli(&["retry", "no-such-id"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-id"));
}
