//! Crashes and restarts: kill -9 at several points of a batch, restart, and every photo
//! ends `synced` exactly once with no duplicate rows and no lost photo.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;

const PHOTOS: u64 = 24;

fn check_exactly_once(env: &Env) {
    let list = env.list();
    assert_eq!(list.len() as u64, PHOTOS, "one row per photo: {list:#?}");
    let uris: HashSet<&str> = list
        .iter()
        .map(|a| a["local_uri"].as_str().unwrap())
        .collect();
    assert_eq!(uris.len() as u64, PHOTOS, "no duplicate rows");
    assert!(list.iter().all(|a| a["state"] == "synced"));
    let objs = env.remote_objects();
    assert_eq!(
        objs.len() as u64,
        PHOTOS,
        "one object per photo, no temp leftovers: {:?}",
        objs.iter().map(|o| &o.0).collect::<Vec<_>>()
    );
    for a in &list {
        let key = a["object_key"].as_str().unwrap();
        let body = &objs
            .iter()
            .find(|(k, _)| k == key)
            .expect("object under its key")
            .1;
        assert_eq!(sha256_hex(body), a["sha256"].as_str().unwrap());
        assert_eq!(
            *body,
            std::fs::read(a["local_uri"].as_str().unwrap()).unwrap()
        );
    }
}

/// kill -9 once `synced` reaches `after` (0: as soon as anything is enqueued).
fn crash_after(after: i64) {
    let env = Env::new("");
    let mut d = env.spawn();
    for i in 0..PHOTOS {
        env.drop_file(
            &format!("c{}/r{}/IMG_{i}.jpg", i % 2, i % 3),
            &bytes(i, 2_000_000 + i as usize),
        );
    }
    env.wait(Some(&d), 30, "crash point", || {
        let st = env.status();
        st["counts"]["synced"]["count"].as_i64().unwrap() >= after
            && (after > 0 || st["counts"]["queued_upload"]["count"].as_i64().unwrap() > 0)
    });
    d.kill9();
    let before = env.count("synced");
    eprintln!("killed with {before} of {PHOTOS} synced");
    let mut d = env.spawn();
    env.wait(Some(&d), 60, "all synced after restart", || {
        env.count("synced") == PHOTOS as i64
    });
    // Let a rescan pass over the already-synced files: nothing may be enqueued again.
    std::thread::sleep(Duration::from_millis(2500));
    check_exactly_once(&env);
    d.kill9();
}

#[test]
fn kill9_before_any_upload() {
    crash_after(0);
}

#[test]
fn kill9_a_third_through() {
    crash_after(PHOTOS as i64 / 3);
}

#[test]
fn kill9_two_thirds_through() {
    crash_after(2 * PHOTOS as i64 / 3);
}

#[test]
fn kill9_repeatedly_during_one_batch() {
    let env = Env::new("");
    for i in 0..PHOTOS {
        env.drop_file(&format!("c/r/IMG_{i}.jpg"), &bytes(100 + i, 1_500_000));
    }
    for round in 0..4 {
        let mut d = env.spawn();
        std::thread::sleep(Duration::from_millis(300 + 150 * round));
        d.kill9();
    }
    let d = env.spawn();
    env.wait(Some(&d), 60, "all synced", || {
        env.count("synced") == PHOTOS as i64
    });
    std::thread::sleep(Duration::from_millis(2500));
    check_exactly_once(&env);
}

#[test]
fn restart_does_not_enqueue_synced_files_again() {
    let env = Env::new("");
    let mut d = env.spawn();
    for i in 0..5 {
        env.drop_file(&format!("c/r/{i}.jpg"), &bytes(i, 1000));
    }
    env.wait(Some(&d), 20, "5 synced", || env.count("synced") == 5);
    let (code, took) = d.terminate();
    assert_eq!(code, Some(0));
    // An idle daemon stops at once on SIGTERM (nothing to wait for); generous bound.
    assert!(took < Duration::from_secs(3), "stop took {took:?}");
    let d = env.spawn();
    // Start-up rescan plus a periodic one.
    std::thread::sleep(Duration::from_millis(3000));
    assert_eq!(env.list().len(), 5);
    assert_eq!(env.remote_objects().len(), 5);
    let enq = env
        .events()
        .iter()
        .filter(|e| e["kind"] == "enqueued")
        .count();
    assert_eq!(enq, 5);
    drop(d);
}
