//! Checklist progress and publication after eviction: a checklist whose photos were
//! uploaded and then evicted locally still publishes its manifest; `status --json` shows
//! what each checklist waits for; a long wait is reported once as `checklist_stalled`,
//! also across a restart; photos a revised checklist drops can be deleted remotely.

mod common;

use std::fs;
use std::time::Duration;

use common::*;
use serde_json::Value;

const MANIFEST: &str = "fs/dev1/c1/manifest.json";

fn manifest(env: &Env) -> Option<Value> {
    fs::read(env.remote.join(MANIFEST))
        .ok()
        .map(|b| serde_json::from_slice(&b).unwrap())
}

fn checklist(rows: &[(&str, &[&str])]) -> Vec<u8> {
    let rows: Vec<Value> = rows
        .iter()
        .map(|(id, photos)| serde_json::json!({"id": id, "photos": photos}))
        .collect();
    serde_json::to_vec(&serde_json::json!({"title": "Pump 7", "rows": rows})).unwrap()
}

fn progress(env: &Env, name: &str) -> Option<Value> {
    env.status()["checklists"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["checklist"] == name)
        .cloned()
}

fn count_events(env: &Env, kind: &str) -> usize {
    env.events().iter().filter(|e| e["kind"] == kind).count()
}

#[test]
fn photos_evicted_after_upload_still_publish_the_manifest() {
    let env = Env::new("[retention]\ndelete_after_upload = true\n");
    let a = bytes(21, 40_000);
    let b = bytes(22, 50_000);
    let pa = env.drop_file("c1/r1/a.jpg", &a);
    let pb = env.drop_file("c1/r1/b.jpg", &b);
    let d = env.spawn();
    env.wait(Some(&d), 30, "uploaded and evicted", || {
        env.count("archived") == 2 && !pa.exists() && !pb.exists()
    });
    // The app finishes the checklist only now: every photo is in the remote, none local.
    env.drop_file(
        "c1/checklist.json",
        &checklist(&[("r1", &["a.jpg", "b.jpg"])]),
    );
    // The manifest is uploaded first and its publication recorded just after: wait for
    // both, or status may be read in between.
    env.wait(Some(&d), 20, "manifest, publication recorded", || {
        manifest(&env).is_some()
            && progress(&env, "c1").is_some_and(|p| p["published_at"].is_string())
    });
    let m = manifest(&env).unwrap();
    let list = env.list();
    let atts = m["rows"][0]["attachments"].as_array().unwrap();
    assert_eq!(atts.len(), 2, "{m}");
    for (att, body) in atts.iter().zip([&a, &b]) {
        let rec = list.iter().find(|r| r["id"] == att["id"]).unwrap();
        assert_eq!(att["key"], rec["object_key"]);
        assert_eq!(att["sha256"], sha256_hex(body));
        assert_eq!(att["size"], body.len());
        let obj = fs::read(env.remote.join(att["key"].as_str().unwrap())).unwrap();
        assert_eq!(&obj, body);
    }
    let p = progress(&env, "c1").expect("c1 in status");
    assert_eq!(
        (p["named"].as_i64(), p["synced"].as_i64()),
        (Some(2), Some(2)),
        "{p}"
    );
    assert!(p["published_at"].is_string(), "{p}");
    assert_eq!(p["waiting_for"], serde_json::json!([]));
}

#[test]
fn status_shows_what_a_checklist_waits_for_and_a_long_wait_is_reported_once() {
    let mut env = Env::new("");
    env.edit_config("[upload]\n", "[upload]\nchecklist_alarm_after = \"2s\"\n");
    let mut d = env.spawn();
    env.cli_ok(&["pause"]);
    env.wait(Some(&d), 10, "paused", || env.status()["paused"] == true);
    env.drop_file("c1/r1/a.jpg", &bytes(23, 10_000));
    env.drop_file("c1/r2/b.jpg", &bytes(24, 10_000));
    env.drop_file(
        "c1/checklist.json",
        &checklist(&[("r1", &["a.jpg"]), ("r2", &["b.jpg", "c.jpg"])]),
    );
    env.wait(Some(&d), 20, "c1 waits for 3", || {
        progress(&env, "c1").is_some_and(|p| p["pending"] == 2)
    });
    let p = progress(&env, "c1").unwrap();
    assert_eq!(p["named"], 3, "{p}");
    assert_eq!(p["synced"], 0, "{p}");
    assert_eq!(p["failed"], 0, "{p}");
    assert!(p["published_at"].is_null(), "{p}");
    let w = p["waiting_for"].as_array().unwrap();
    let reason = |f: &str| w.iter().find(|x| x["file"] == f).unwrap()["reason"].clone();
    assert_eq!(reason("a.jpg"), "pending");
    assert_eq!(reason("b.jpg"), "pending");
    assert_eq!(reason("c.jpg"), "not_captured");
    let text = env.cli_ok(&["status"]);
    assert!(text.contains("checklists:"), "{text}");
    assert!(text.contains("c.jpg (not_captured)"), "{text}");

    env.cli_ok(&["resume"]);
    env.wait(Some(&d), 20, "2 of 3 synced", || {
        progress(&env, "c1").is_some_and(|p| p["synced"] == 2)
    });
    let p = progress(&env, "c1").unwrap();
    assert_eq!(p["waiting_for"].as_array().unwrap().len(), 1, "{p}");
    // Waiting longer than 2 s: one checklist_stalled, naming what it waits for.
    env.wait(Some(&d), 20, "stalled", || {
        count_events(&env, "checklist_stalled") == 1
    });
    let ev = env
        .events()
        .into_iter()
        .find(|e| e["kind"] == "checklist_stalled")
        .unwrap();
    assert_eq!(ev["checklist"], "c1");
    assert!(ev["reason"].as_str().unwrap().contains("c.jpg"), "{ev}");
    // Not again, not even after a restart.
    d.terminate();
    let d = env.spawn();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        count_events(&env, "checklist_stalled"),
        1,
        "{}",
        env.dump(Some(&d))
    );

    env.drop_file("c1/r2/c.jpg", &bytes(25, 10_000));
    env.wait(Some(&d), 20, "published", || manifest(&env).is_some());
    env.wait(Some(&d), 10, "progress published", || {
        progress(&env, "c1").is_some_and(|p| p["published_at"].is_string())
    });
    let p = progress(&env, "c1").unwrap();
    assert_eq!(
        (p["named"].as_i64(), p["synced"].as_i64()),
        (Some(3), Some(3))
    );
    assert_eq!(p["waiting_for"], serde_json::json!([]));
}

#[test]
fn photos_a_revised_checklist_drops_are_deleted_remotely_when_configured() {
    let env = Env::new("[retention]\ndelete_unreferenced_remote = true\n");
    let pa = env.drop_file("c1/r1/a.jpg", &bytes(26, 10_000));
    let pb = env.drop_file("c1/r1/b.jpg", &bytes(27, 10_000));
    let d = env.spawn();
    env.wait(Some(&d), 20, "synced", || env.count("synced") == 2);
    let list = env.list();
    let key = |f: &str| {
        list.iter().find(|a| a["filename"] == f).unwrap()["object_key"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (ka, kb) = (key("a.jpg"), key("b.jpg"));
    assert!(env.remote.join(&kb).exists());
    env.drop_file("c1/checklist.json", &checklist(&[("r1", &["a.jpg"])]));
    env.wait(Some(&d), 20, "manifest", || manifest(&env).is_some());
    env.wait(Some(&d), 20, "b's object deleted", || {
        !env.remote.join(&kb).exists()
    });
    assert!(env.remote.join(&ka).exists(), "a named photo was deleted");
    assert!(pa.exists() && pb.exists(), "local copies stay");
    env.wait(Some(&d), 10, "b archived", || env.count("archived") == 1);
    let b = env
        .list()
        .into_iter()
        .find(|a| a["filename"] == "b.jpg")
        .unwrap();
    assert_eq!(b["state"], "archived");
    assert_eq!(b["has_synced"], false);
}
