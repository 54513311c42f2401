//! Checklist publication: the manifest appears only once every photo it names is in remote
//! storage, names them with the right keys and hashes, republishes on change only, and a
//! malformed checklist.json never holds photos back.

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

fn published(env: &Env) -> usize {
    env.events()
        .iter()
        .filter(|e| e["kind"] == "checklist_published" && e["checklist"] == "c1")
        .count()
}

fn checklist(rows: &[(&str, &[&str])]) -> Vec<u8> {
    let rows: Vec<Value> = rows
        .iter()
        .map(|(id, photos)| serde_json::json!({"id": id, "fields": {"ok": true}, "photos": photos}))
        .collect();
    serde_json::to_vec(&serde_json::json!({"title": "Pump 7", "rows": rows})).unwrap()
}

#[test]
fn manifest_waits_for_every_photo_then_names_them_all() {
    let env = Env::new("");
    let d = env.spawn();
    env.cli_ok(&["pause"]);
    env.wait(Some(&d), 5, "paused", || env.status()["paused"] == true);
    env.drop_file("c1/r1/a.jpg", &bytes(1, 3000));
    env.drop_file("c1/r1/b.jpg", &bytes(2, 4000));
    env.drop_file("c1/r1/a.jpg.json", br#"{"inspector":"ana"}"#);
    env.drop_file(
        "c1/checklist.json",
        &checklist(&[("r1", &["a.jpg", "b.jpg"]), ("r2", &["c.jpg"])]),
    );
    env.wait(Some(&d), 10, "2 queued", || env.count("queued_upload") == 2);
    env.cli_ok(&["resume"]);
    env.wait(Some(&d), 10, "2 synced", || env.count("synced") == 2);
    // c.jpg is named but not captured yet: no manifest.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        manifest(&env).is_none(),
        "published before every photo was uploaded"
    );

    env.drop_file("c1/r2/c.jpg", &bytes(3, 5000));
    env.wait(Some(&d), 15, "manifest", || manifest(&env).is_some());
    let m = manifest(&env).unwrap();
    assert_eq!(m["title"], "Pump 7", "the app's fields are kept");
    assert_eq!(m["fieldsync"]["device_id"], "dev1");
    let list = env.list();
    let mut seen = 0;
    for row in m["rows"].as_array().unwrap() {
        for a in row["attachments"].as_array().unwrap() {
            let rec = list.iter().find(|r| r["id"] == a["id"]).unwrap();
            assert_eq!(rec["state"], "synced");
            assert_eq!(a["key"], rec["object_key"]);
            assert_eq!(a["sha256"], rec["sha256"]);
            // Every photo the manifest names is in the remote with those bytes.
            let body = fs::read(env.remote.join(a["key"].as_str().unwrap())).unwrap();
            assert_eq!(sha256_hex(&body), a["sha256"].as_str().unwrap());
            assert_eq!(body.len() as i64, a["size"].as_i64().unwrap());
            seen += 1;
        }
    }
    assert_eq!(seen, 3);
    assert_eq!(
        m["rows"][0]["attachments"][0]["meta_data"]["inspector"],
        "ana"
    );
    // The event is written just after the manifest lands: wait for it.
    env.wait(Some(&d), 5, "one checklist_published", || {
        published(&env) == 1
    });
}

#[test]
fn republishes_on_change_only_and_archives_unnamed_photos() {
    let env = Env::new("");
    let d = env.spawn();
    env.drop_file("c1/r1/a.jpg", &bytes(1, 3000));
    env.drop_file("c1/r1/extra.jpg", &bytes(9, 3000));
    env.wait(Some(&d), 10, "2 synced", || env.count("synced") == 2);
    env.drop_file("c1/checklist.json", &checklist(&[("r1", &["a.jpg"])]));
    env.wait(Some(&d), 10, "published", || published(&env) == 1);
    // The photo the checklist does not name is archived, not deleted.
    env.wait(Some(&d), 5, "extra archived", || env.count("archived") == 1);
    let archived = env.list_state("archived");
    assert_eq!(archived[0]["filename"], "extra.jpg");
    assert!(env.capture.join("c1/r1/extra.jpg").exists());

    // Same content written again: no second publication.
    env.drop_file("c1/checklist.json", &checklist(&[("r1", &["a.jpg"])]));
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(published(&env), 1);

    // Changed content: republished.
    env.drop_file("c1/r1/b.jpg", &bytes(2, 3000));
    env.drop_file(
        "c1/checklist.json",
        &checklist(&[("r1", &["a.jpg", "b.jpg"])]),
    );
    env.wait(Some(&d), 15, "republished", || published(&env) == 2);
    let m = manifest(&env).unwrap();
    assert_eq!(m["rows"][0]["attachments"].as_array().unwrap().len(), 2);

    // Naming the archived photo again brings it back (it was uploaded: synced again).
    env.drop_file(
        "c1/checklist.json",
        &checklist(&[("r1", &["a.jpg", "b.jpg", "extra.jpg"])]),
    );
    env.wait(Some(&d), 15, "republished with extra", || {
        published(&env) == 3
    });
    assert_eq!(env.count("archived"), 0, "{}", env.dump(Some(&d)));
    let m = manifest(&env).unwrap();
    assert_eq!(m["rows"][0]["attachments"].as_array().unwrap().len(), 3);
}

#[test]
fn malformed_checklist_is_reported_and_photos_still_upload() {
    let env = Env::new("");
    let d = env.spawn();
    env.drop_file("c1/checklist.json", b"{\"rows\": [ broken");
    env.drop_file("c1/r1/a.jpg", &bytes(1, 3000));
    env.wait(Some(&d), 10, "synced", || env.count("synced") == 1);
    env.wait(Some(&d), 10, "reported", || {
        env.events().iter().any(|e| {
            e["kind"] == "checklist_invalid"
                && e["reason"].as_str().unwrap().contains("checklist.json")
        })
    });
    assert!(manifest(&env).is_none());
    // Reported once, not on every pass.
    std::thread::sleep(Duration::from_millis(2000));
    let n = env
        .events()
        .iter()
        .filter(|e| e["kind"] == "checklist_invalid")
        .count();
    assert_eq!(n, 1);
    // Fixed by the app: published.
    env.drop_file("c1/checklist.json", &checklist(&[("r1", &["a.jpg"])]));
    env.wait(Some(&d), 10, "published after fix", || {
        manifest(&env).is_some()
    });
}

#[test]
fn checklists_written_while_stopped_publish_at_start() {
    let env = Env::new("");
    let mut d = env.spawn();
    env.drop_file("c1/r1/a.jpg", &bytes(1, 3000));
    env.wait(Some(&d), 10, "synced", || env.count("synced") == 1);
    assert_eq!(d.terminate().0, Some(0));
    env.drop_file("c1/checklist.json", &checklist(&[("r1", &["a.jpg"])]));
    let d = env.spawn();
    env.wait(Some(&d), 10, "published at start", || {
        manifest(&env).is_some()
    });
    // The event is written just after the manifest lands: wait for it.
    env.wait(Some(&d), 5, "one checklist_published", || {
        published(&env) == 1
    });
}
