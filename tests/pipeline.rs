//! The core pipeline end to end with the real binary and the file remote: capture folder →
//! SQLite queue → remote, and the CLI's view of it.

mod common;

use std::collections::HashMap;
use std::fs;
use std::time::Duration;

use common::*;

/// Object bytes by attachment id (the file name of the object).
fn objects_by_id(env: &Env) -> HashMap<String, (String, Vec<u8>)> {
    env.remote_objects()
        .into_iter()
        .map(|(k, b)| {
            let id = k
                .rsplit('/')
                .next()
                .unwrap()
                .split('.')
                .next()
                .unwrap()
                .to_string();
            (id, (k, b))
        })
        .collect()
}

#[test]
fn fifty_photos_land_byte_identical_under_their_keys() {
    let env = Env::new("");
    let d = env.spawn();
    let mut want = HashMap::new();
    for i in 0..50u64 {
        let rel = format!("check-{}/row-{}/IMG_{i:04}.jpg", i % 3, i % 5);
        let data = bytes(i, 1000 + (i as usize) * 3000);
        env.drop_file(&rel, &data);
        want.insert(env.capture.join(&rel).display().to_string(), (rel, data));
    }
    env.wait(Some(&d), 60, "50 synced", || env.count("synced") == 50);
    let status = env.status();
    assert_eq!(status["counts"]["synced"]["count"], 50);
    assert_eq!(status["pending"]["count"], 0);
    assert_eq!(status["daemon_running"], true);

    let objects = objects_by_id(&env);
    assert_eq!(objects.len(), 50, "exactly one object per photo");
    let list = env.list();
    assert_eq!(list.len(), 50, "no duplicate rows");
    for a in &list {
        let (rel, data) = &want[a["local_uri"].as_str().unwrap()];
        let mut parts = rel.split('/');
        let (checklist, row) = (parts.next().unwrap(), parts.next().unwrap());
        let id = a["id"].as_str().unwrap();
        let (key, body) = &objects[id];
        assert_eq!(key, &format!("fs/dev1/{checklist}/{row}/{id}.jpg"));
        assert_eq!(body, data, "bytes of {rel}");
        assert_eq!(a["sha256"].as_str().unwrap(), sha256_hex(data));
        assert_eq!(a["state"], "synced");
    }
    // One `uploaded` event per photo.
    let uploaded = env
        .events()
        .iter()
        .filter(|e| e["kind"] == "uploaded")
        .count();
    assert_eq!(uploaded, 50);
}

#[test]
fn slowly_written_photo_is_uploaded_once_complete() {
    let env = Env::new("");
    let d = env.spawn();
    let data = bytes(7, 3_000_000);
    let p = env.capture.join("c/r/slow.jpg");
    write_slowly(&p, &data, 10, Duration::from_secs(2));
    env.wait(Some(&d), 30, "slow photo synced", || {
        env.count("synced") == 1
    });
    std::thread::sleep(Duration::from_secs(1));
    let objs = env.remote_objects();
    assert_eq!(objs.len(), 1, "uploaded exactly once");
    assert_eq!(objs[0].1, data, "complete bytes");
    assert_eq!(env.list().len(), 1, "one record");
}

#[test]
fn temp_name_then_rename_and_ignored_names() {
    let env = Env::new("");
    let d = env.spawn();
    env.drop_file("c/r/.IMG_1.jpg.tmp", &bytes(1, 5000));
    env.drop_file("c/r/IMG_2.jpg.part", &bytes(2, 5000));
    env.drop_file("c/r/.hidden.jpg", &bytes(3, 5000));
    fs::rename(
        env.capture.join("c/r/.IMG_1.jpg.tmp"),
        env.capture.join("c/r/IMG_1.jpg"),
    )
    .unwrap();
    env.wait(Some(&d), 30, "renamed photo synced", || {
        env.count("synced") == 1
    });
    // Give a rescan the chance to (wrongly) pick up the partial and hidden files.
    std::thread::sleep(Duration::from_secs(3));
    let list = env.list();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["filename"], "IMG_1.jpg");
    assert_eq!(env.remote_objects()[0].1, bytes(1, 5000));
}

#[test]
fn odd_inputs_are_all_captured() {
    let env = Env::new("");
    let d = env.spawn();
    env.drop_file("loose.jpg", b"outside the layout");
    env.drop_file("c1/r1/zero.jpg", b"");
    env.drop_file(
        "Prüfung 7/Reihe 2 – Ventil/Foto mit Leerzeichen.JPG",
        b"unicode",
    );
    env.drop_file("c1/r1/meta.jpg", b"with bad sidecar");
    env.drop_file("c1/r1/meta.jpg.json", b"{ this is not json");
    env.drop_file("c1/r1/good.jpg", b"with sidecar");
    env.drop_file(
        "c1/r1/good.jpg.json",
        br#"{"inspector":"ana","gps":[48.1,11.5]}"#,
    );
    env.wait(Some(&d), 30, "5 synced", || env.count("synced") == 5);
    let list = env.list();
    let by_name: HashMap<&str, &serde_json::Value> = list
        .iter()
        .map(|a| (a["filename"].as_str().unwrap(), a))
        .collect();
    let loose = by_name["loose.jpg"];
    assert_eq!(loose["checklist"], "unassigned");
    assert!(loose["object_key"]
        .as_str()
        .unwrap()
        .starts_with("fs/dev1/unassigned/"));
    assert_eq!(by_name["zero.jpg"]["size"], 0);
    let uni = by_name["Foto mit Leerzeichen.JPG"];
    assert_eq!(uni["checklist"], "Prüfung 7");
    assert_eq!(uni["row"], "Reihe 2 – Ventil");
    assert!(by_name["meta.jpg"]["meta_data"].is_null());
    let meta: serde_json::Value =
        serde_json::from_str(by_name["good.jpg"]["meta_data"].as_str().unwrap()).unwrap();
    assert_eq!(meta["inspector"], "ana");
    // The malformed sidecar was reported.
    assert!(env.events().iter().any(|e| e["kind"] == "sidecar_invalid"
        && e["reason"].as_str().unwrap().contains("meta.jpg.json")));
    // Every object has the right bytes.
    let objs = objects_by_id(&env);
    for a in &list {
        let (_, body) = &objs[a["id"].as_str().unwrap()];
        assert_eq!(body, &fs::read(a["local_uri"].as_str().unwrap()).unwrap());
    }
    // Sidecars themselves are not attachments.
    assert!(!list
        .iter()
        .any(|a| a["filename"].as_str().unwrap().ends_with(".json")));
}

#[test]
fn malformed_config_exits_2_naming_file_and_key() {
    let mut env = Env::new("");
    let original = env.toml.clone();
    let text = original.replace("[upload]", "[upload]\nconcurency = 3");
    env.write_config(&text);
    let out = env.cli(&["config", "check"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains(&env.config.display().to_string()), "{err}");
    assert!(err.contains("concurency"), "{err}");

    env.write_config(&original.replace("[upload]", "[upload]\nconcurrency = \"many\""));
    let out = env.cli(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("key `upload.concurrency`"), "{err}");

    let out = std::process::Command::new(BIN)
        .args(["--config", "/nonexistent/fieldsync.toml", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/fieldsync.toml"));
}

#[test]
fn photos_in_freshly_created_nested_folders_are_seen_without_a_rescan() {
    let mut env = Env::new("");
    // The periodic rescan must not be what finds them.
    env.edit_config("rescan_interval = \"2s\"", "rescan_interval = \"5m\"");
    let d = env.spawn();
    // Many folders created and filled as fast as possible: some files land before the
    // watch on their new folder exists.
    for c in 0..40 {
        for r in 0..3 {
            env.drop_file(&format!("new-{c}/row-{r}/IMG.jpg"), &bytes(c * 10 + r, 200));
        }
    }
    env.wait(Some(&d), 30, "120 synced", || env.count("synced") == 120);
}

/// `--config config/demo.toml` in a fresh directory behaves as the embedded demo config:
/// the demo's remote folder is created at start and the photo uploads (it used to stay
/// `offline`, the folder missing).
#[test]
fn the_demo_config_given_by_path_creates_its_remote_folder() {
    let dir = tempfile::tempdir().unwrap();
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.toml");
    let cli = |args: &[&str]| {
        std::process::Command::new(BIN)
            .current_dir(dir.path())
            .args(["--config", config])
            .args(args)
            .output()
            .unwrap()
    };
    let log = dir.path().join("daemon.log");
    let mut child = std::process::Command::new(BIN)
        .current_dir(dir.path())
        .args(["--config", config, "run"])
        .stdout(fs::File::create(&log).unwrap())
        .stderr(fs::File::create(dir.path().join("daemon.err")).unwrap())
        .spawn()
        .unwrap();
    let photo = dir
        .path()
        .join("fieldsync-demo/capture/pump-7/row-3/IMG_0001.jpg");
    let status = || -> serde_json::Value {
        serde_json::from_slice(&cli(&["status", "--json"]).stdout).unwrap_or_default()
    };
    wait_for(
        Duration::from_secs(20),
        "the daemon and its remote folder",
        || dir.path().join("fieldsync-demo/remote").is_dir() && status()["daemon_running"] == true,
        || fs::read_to_string(dir.path().join("daemon.err")).unwrap_or_default(),
    );
    fs::create_dir_all(photo.parent().unwrap()).unwrap();
    fs::write(&photo, bytes(7, 50_000)).unwrap();
    wait_for(
        Duration::from_secs(30),
        "the photo synced with uploads active",
        || {
            let st = status();
            st["counts"]["synced"]["count"] == 1 && st["pause_reason"].is_null()
        },
        || {
            format!(
                "{}\n{}",
                String::from_utf8_lossy(&cli(&["status"]).stdout),
                fs::read_to_string(dir.path().join("daemon.err")).unwrap_or_default()
            )
        },
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
}
