//! A lost or corrupt queue database: the daemon moves it aside, creates a new one and
//! rescans the capture folder; photos already in the remote are found there under their
//! name-based keys, so nothing is uploaded a second time. Against a real S3 server
//! (`s3s-fs`), with the bytes sent counted at a proxy in front of it.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::time::Duration;

use common::s3::*;
use common::*;

const PHOTOS: u64 = 20;
const PHOTO_SIZE: usize = 200_000;

/// Bytes one HEAD (and its share of probes) may take on the wire; an upload of one
/// photo takes `PHOTO_SIZE`.
const PER_PHOTO_SLACK: u64 = 4 * 1024;

fn ids(env: &Env) -> BTreeSet<(String, String)> {
    env.list()
        .iter()
        .map(|a| {
            (
                a["id"].as_str().unwrap().to_string(),
                a["object_key"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// 20 synced photos; then `damage` is done to the stopped daemon's database and it is
/// started again. Returns the environment for the caller's own checks.
/// `busy`: answers the server refuses with 503 right after the damage, so some photos'
/// first attempts after the rebuild fail before they are found in the remote.
fn rebuild_after(damage: impl FnOnce(&Env), expect_kept: bool, busy: u32) {
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.addr());
    let env = Env::new(&S3Server::remote_toml(&proxy.endpoint(), SECRET_KEY, ""));
    let mut d = env.spawn();
    for i in 0..PHOTOS {
        env.drop_file(
            &format!("pump-{}/row-{}/IMG_{i:04}.jpg", i % 3, i % 4),
            &bytes(i, PHOTO_SIZE),
        );
    }
    env.wait(Some(&d), 60, "20 synced", || {
        env.count("synced") == PHOTOS as i64
    });
    let before = ids(&env);
    assert_eq!(d.terminate().0, Some(0));
    let client = server.client();
    assert_eq!(client.list("fs/").len() as u64, PHOTOS);

    damage(&env);
    proxy.wait_closed(Duration::from_secs(10));
    proxy.fail_503(busy);
    let sent_before = proxy.up_bytes();
    let d = env.spawn();
    env.wait(Some(&d), 60, "20 synced again", || {
        env.count("synced") == PHOTOS as i64
    });
    let resent = proxy.up_bytes() - sent_before;
    eprintln!("{resent} bytes sent after the rebuild for {PHOTOS} photos of {PHOTO_SIZE} B");
    assert!(
        resent < PHOTOS * PER_PHOTO_SLACK,
        "{resent} bytes sent after the rebuild: photos were uploaded again\n{}",
        env.dump(Some(&d))
    );
    // The same ids and keys as before: no duplicate objects.
    assert_eq!(ids(&env), before);
    let objects = client.list("fs/");
    assert_eq!(
        objects.len() as u64,
        PHOTOS,
        "no duplicate objects: {objects:?}"
    );
    for a in env.list() {
        let local = fs::read(a["local_uri"].as_str().unwrap()).unwrap();
        let body = client.get(a["object_key"].as_str().unwrap()).unwrap();
        assert_eq!(sha256_hex(&body), sha256_hex(&local));
    }

    // Reported: a database_rebuilt event, one repaired event per photo found in the
    // remote, and the status.
    let events = env.events();
    let rebuilt: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "database_rebuilt")
        .collect();
    assert_eq!(rebuilt.len(), 1, "{events:#?}");
    let repaired = events
        .iter()
        .filter(|e| e["kind"] == "repaired" && e["reason"] == "already_in_remote")
        .count();
    assert_eq!(repaired as u64, PHOTOS, "{events:#?}");
    let st = env.status();
    let note = &st["database_rebuilt"];
    assert!(note["time"].is_string(), "{st}");
    let text = env.cli_ok(&["status"]);
    assert!(text.contains("database: rebuilt"), "{text}");
    if expect_kept {
        assert!(
            note["reason"].as_str().unwrap().starts_with("corrupt: "),
            "{st}"
        );
        let kept = note["kept_as"].as_str().unwrap();
        assert!(
            fs::metadata(kept).unwrap().len() > 0,
            "old database kept at {kept}"
        );
        assert!(
            rebuilt[0]["reason"].as_str().unwrap().contains(kept),
            "{:?}",
            rebuilt[0]
        );
    } else {
        assert_eq!(note["reason"], "missing", "{st}");
        assert!(note["kept_as"].is_null());
    }
    // The rebuilt database passes the check the daemon makes at start.
    let db = rusqlite::Connection::open(env.state.join("queue.db")).unwrap();
    let check: String = db
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

/// The queue database and its WAL files gone (a card wiped, a path mistyped).
fn delete_database(env: &Env) {
    for f in ["queue.db", "queue.db-wal", "queue.db-shm"] {
        let _ = fs::remove_file(env.state.join(f));
    }
}

#[test]
fn a_deleted_database_is_rebuilt_without_uploading_again() {
    rebuild_after(delete_database, false, 0);
}

#[test]
fn a_deleted_database_is_rebuilt_and_repaired_even_when_first_attempts_fail() {
    rebuild_after(delete_database, false, 4);
}

#[test]
fn a_corrupt_database_is_kept_aside_and_rebuilt_without_uploading_again() {
    rebuild_after(
        |env| {
            let db = env.state.join("queue.db");
            let mut f = fs::OpenOptions::new().write(true).open(&db).unwrap();
            let len = f.metadata().unwrap().len();
            assert!(len > 16 * 1024, "a database of some pages: {len}");
            // Bytes overwritten in the middle of the file, as a failing card does.
            f.seek(SeekFrom::Start(len / 2 - 4096)).unwrap();
            f.write_all(&vec![0xA5; 8192]).unwrap();
            f.sync_all().unwrap();
        },
        true,
        0,
    );
}
