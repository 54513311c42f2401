//! Queues left by released versions keep opening, reading and working.
//!
//! `tests/fixtures/queue-v<N>.db` are databases of each released schema version (see
//! `tests/fixtures/make_fixtures.py`): records in every state, the event log and every
//! control key. The real binary reads a copy of each: `events`, `list` and `status` print
//! exactly what they printed when this test was written (golden files beside the
//! fixtures), and the daemon takes the old queue over and uploads it.
//!
//! Set `FIELDSYNC_BLESS=1` to rewrite the golden files (only for a deliberate change of an
//! output, which the README must document).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use common::Env;
use serde_json::{json, Value};

/// Schema versions shipped so far (`PRAGMA user_version` of each fixture).
const RELEASED: [u32; 2] = [1, 2];

/// Where the fixtures' local files were (the packaged config's capture folder).
const FIXTURE_CAPTURE: &str = "/var/spool/fieldsync/capture";

/// The schema version this build migrates to.
const CURRENT: i64 = 4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// An environment whose state directory holds a copy of the version-`v` queue.
fn env_with(v: u32) -> Env {
    let env = Env::new("");
    fs::copy(
        fixtures().join(format!("queue-v{v}.db")),
        env.state.join("queue.db"),
    )
    .unwrap();
    env
}

/// Compares `actual` with the golden file `name`, or rewrites it under `FIELDSYNC_BLESS`.
fn golden(name: &str, actual: &str) {
    let p = fixtures().join(name);
    if std::env::var_os("FIELDSYNC_BLESS").is_some() {
        fs::write(&p, actual).unwrap();
        return;
    }
    let want = fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e} (FIELDSYNC_BLESS=1 writes it)", p.display()));
    assert!(
        want == actual,
        "output differs from {}\n--- want\n{want}\n--- got\n{actual}",
        p.display()
    );
}

fn user_version(db: &Path) -> i64 {
    rusqlite::Connection::open(db)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

/// The content each fixture record's file had (see make_fixtures.py).
fn content(id: &str) -> Vec<u8> {
    format!("fieldsync fixture {id}\n").into_bytes()
}

#[test]
fn released_queues_print_their_events_and_records_unchanged() {
    for v in RELEASED {
        let env = env_with(v);
        let db = env.state.join("queue.db");
        assert_eq!(user_version(&db), v as i64);
        golden(
            &format!("queue-v{v}.events.json"),
            &env.cli_ok(&["events", "--json", "--limit", "1000"]),
        );
        assert_eq!(user_version(&db), CURRENT, "v{v}: opening migrates");
        golden(&format!("queue-v{v}.events.txt"), &env.cli_ok(&["events"]));
        golden(
            &format!("queue-v{v}.list.json"),
            &env.cli_ok(&["list", "--json"]),
        );
        golden(&format!("queue-v{v}.list.txt"), &env.cli_ok(&["list"]));
        // Paging the log goes on from where an old consumer stopped.
        let after: Vec<Value> =
            serde_json::from_str(&env.cli_ok(&["events", "--json", "--after", "12"])).unwrap();
        assert_eq!(after[0]["seq"], 13, "v{v}");
    }
}

#[test]
fn released_queues_show_their_status_and_control_values() {
    for v in RELEASED {
        let env = env_with(v);
        let st = env.status();
        assert_eq!(st["schema"], 1);
        assert_eq!(st["daemon_running"], false);
        // The operator's pause, recorded by the old daemon, is still in force.
        assert_eq!(st["paused"], true, "v{v}");
        assert_eq!(st["pause_reason"], "paused_by_operator", "v{v}");
        let queued = if v >= 2 { 3 } else { 2 };
        assert_eq!(st["pending"]["count"], queued, "v{v}");
        assert_eq!(st["counts"]["queued_upload"]["count"], queued, "v{v}");
        assert_eq!(st["counts"]["synced"]["count"], 1, "v{v}");
        assert_eq!(st["counts"]["archived"]["count"], 2, "v{v}");
        assert_eq!(st["counts"]["failed"]["count"], 1, "v{v}");
        assert_eq!(
            st["uploading"],
            json!([]),
            "v{v}: a stopped daemon uploads nothing"
        );
        assert_eq!(
            st["last_success"],
            json!({
                "time": "2026-11-21T10:06:00.000Z",
                "kind": "uploaded",
                "attachment_id": "0b6f7e0a-1d1c-4f55-9d51-0c8a4f1e0006",
                "checklist": "c1",
                "row": "r3",
                "reason": null,
            }),
            "v{v}"
        );
        assert_eq!(
            st["last_error"],
            json!({
                "time": "2026-11-21T10:04:00.001Z",
                "kind": "retry_scheduled",
                "attachment_id": "0b6f7e0a-1d1c-4f55-9d51-0c8a4f1e0003",
                "checklist": "c1",
                "row": "r2",
                "reason": "io: connection reset by peer",
            }),
            "v{v}"
        );
        // The condition report the old daemon wrote is read with today's types.
        let c = &st["conditions"];
        assert_eq!(c["network"]["interface"], "wwan0", "v{v}");
        assert_eq!(c["budget"]["used"], 1048576, "v{v}");
        assert_eq!(c["battery"]["percent"], 81, "v{v}");
        assert_eq!(c["disk"]["evicted_files"], 1, "v{v}");
        assert_eq!(c["deferred"]["metered_file_too_large"], 1, "v{v}");
        assert_eq!(c["failing"], json!(["paused_by_operator"]), "v{v}");
        let text = env.cli_ok(&["status"]);
        assert!(
            text.contains("uploads: paused (paused_by_operator)"),
            "{text}"
        );
        assert!(
            text.contains("network   online, wwan0 (metered)"),
            "v{v}: {text}"
        );
        assert!(
            text.contains("1.0 MB of 52.4 MB used today on metered links"),
            "v{v}: {text}"
        );
    }
}

/// Puts the fixture's local files back below this environment's capture folder: rewrites
/// the recorded paths (a moved capture folder) and writes each file with the recorded
/// content and mtime, so start-up repair finds them unchanged.
fn restore_files(env: &Env, ids: &[&str]) {
    let db = rusqlite::Connection::open(env.state.join("queue.db")).unwrap();
    db.execute(
        "UPDATE attachments SET local_uri = replace(local_uri, ?1, ?2)",
        [FIXTURE_CAPTURE, &env.capture.to_string_lossy()],
    )
    .unwrap();
    for id in ids {
        let (path, mtime_ns): (String, i64) = db
            .query_row(
                "SELECT local_uri, mtime_ns FROM attachments WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        fs::create_dir_all(Path::new(&path).parent().unwrap()).unwrap();
        fs::write(&path, content(id)).unwrap();
        fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(UNIX_EPOCH + Duration::from_nanos(mtime_ns as u64))
            .unwrap();
    }
}

fn id(n: u32) -> String {
    format!("0b6f7e0a-1d1c-4f55-9d51-0c8a4f1e000{n}")
}

#[test]
fn the_daemon_takes_over_a_released_queue_and_uploads_it() {
    for v in RELEASED {
        let env = env_with(v);
        let old_events = env.events();
        // Records 1 (synced), 3 (mid-retry) and 4 (mid-multipart) have their files; 5
        // (failed) and 6 (evicted) had none left; 7 is v2's ctime-era record.
        let mut present = vec![id(1), id(3), id(4)];
        if v >= 2 {
            present.push(id(7));
        }
        restore_files(
            &env,
            &present.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let new = env.drop_file("c9/r1/IMG_9001.jpg", b"a photo taken after the upgrade");

        env.cli_ok(&["resume"]);
        let out = env.cli(&["run", "--until-idle"]);
        assert!(
            out.status.success(),
            "v{v}: run --until-idle: {}\nstderr: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            env.dump(None)
        );

        // The old queue and the new photo are uploaded to their recorded object keys.
        let remote = env.remote_objects();
        let list = env.list();
        let rec = |id: &str| list.iter().find(|a| a["id"] == id).unwrap().clone();
        for id in present.iter().skip(1) {
            let a = rec(id);
            assert_eq!(a["state"], "synced", "v{v}: {a}\n{}", env.dump(None));
            let key = a["object_key"].as_str().unwrap();
            assert!(
                remote.contains(&(key.to_string(), content(id))),
                "v{v}: {key} not uploaded: {remote:?}"
            );
        }
        let fresh = list
            .iter()
            .find(|a| a["local_uri"] == new.to_string_lossy().as_ref())
            .unwrap();
        assert_eq!(fresh["state"], "synced", "v{v}");
        assert_eq!(rec(&id(1))["state"], "synced", "v{v}: nothing to redo");
        assert_eq!(
            rec(&id(5))["state"],
            "failed",
            "v{v}: a failed record waits for the operator"
        );
        // Nothing is uploaded twice: the synced record 1 is not on the remote again.
        assert!(
            !remote.iter().any(|(k, _)| k.contains(&id(1))),
            "v{v}: {remote:?}"
        );

        // The old log is kept as it was and goes on after it.
        let events = env.events();
        assert_eq!(events[..old_events.len()], old_events[..], "v{v}");
        let later = &events[old_events.len()..];
        assert!(later
            .iter()
            .all(|e| e["seq"].as_i64() > old_events.last().unwrap()["seq"].as_i64()));
        assert!(later.iter().any(|e| e["kind"] == "resume_requested"));
        assert!(later
            .iter()
            .any(|e| e["kind"] == "uploaded" && e["attachment_id"] == id(3)));
        let st = env.status();
        assert_eq!(st["pending"]["count"], 0, "v{v}");
        assert_eq!(st["paused"], true, "v{v}: stopped again");
        assert_eq!(st["pause_reason"], "not_running", "v{v}");
    }
}
