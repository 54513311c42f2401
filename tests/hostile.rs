//! Hostile files and paths, against the real binary: nothing outside the capture folder
//! ever leaves the device (symbolic links are never followed, for photos, sidecars and
//! checklist.json alike), no photo is lost to its name (bytes that are not UTF-8,
//! newlines, `%?#+`, NFC/NFD, 255-byte names, 0 bytes), a checklist.json still being
//! written is not parsed, and bad config paths and bad arguments are one-line errors.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::s3::*;
use common::*;
use serde_json::Value;

/// Bytes no photo has: must never be found in the remote or a manifest.
const SECRET: &[u8] = b"TOP-SECRET-outside-the-capture-folder-4711";

/// A file outside the capture folder that a link in it may point at.
fn outside_file(env: &Env, name: &str, body: &[u8]) -> PathBuf {
    let dir = env.dir.path().join("outside");
    fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    fs::write(&p, body).unwrap();
    p
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// No object in the file remote holds the secret.
fn assert_no_secret_in_remote(env: &Env) {
    for (key, body) in env.remote_objects() {
        assert!(
            !contains(&body, SECRET),
            "{key} holds bytes from outside the capture folder"
        );
    }
}

fn events_of(env: &Env, kind: &str) -> Vec<Value> {
    env.events()
        .into_iter()
        .filter(|e| e["kind"] == kind)
        .collect()
}

fn synced_named(env: &Env, name: &str) -> bool {
    env.list()
        .iter()
        .any(|a| a["filename"] == name && a["state"] == "synced")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_symlink_in_the_capture_folder_is_reported_and_never_read() {
    let env = Env::new("");
    let secret = outside_file(&env, "secret.jpg", SECRET);
    let outside_dir = secret.parent().unwrap().to_path_buf();
    fs::write(outside_dir.join("IMG_in_linked_dir.jpg"), SECRET).unwrap();
    // Present at start-up: found by the first rescan.
    env.drop_file("c1/r1/IMG_0.jpg", &bytes(1, 2000));
    fs::create_dir_all(env.capture.join("c1/r2")).unwrap();
    symlink(&secret, env.capture.join("c1/r2/IMG_link_at_start.jpg")).unwrap();
    let d = env.spawn();
    env.wait(Some(&d), 15, "IMG_0 synced", || {
        synced_named(&env, "IMG_0.jpg")
    });

    // Created while the daemon watches: inotify reports it.
    symlink(&secret, env.capture.join("c1/r1/IMG_link.jpg")).unwrap();
    // A linked directory: nothing below it is read either.
    symlink(&outside_dir, env.capture.join("c1/r3")).unwrap();
    // A sidecar that is a link to an outside JSON file.
    outside_file(&env, "meta.json", br#"{"stolen":"TOP-SECRET-outside"}"#);
    env.drop_file("c1/r1/IMG_1.jpg", &bytes(2, 3000));
    symlink(
        outside_dir.join("meta.json"),
        env.capture.join("c1/r1/IMG_1.jpg.json"),
    )
    .unwrap();
    // A rename into place of a link (the writer's temp-name pattern).
    symlink(&secret, env.capture.join("c1/r1/.IMG_2.tmp")).unwrap();
    fs::rename(
        env.capture.join("c1/r1/.IMG_2.tmp"),
        env.capture.join("c1/r1/IMG_2.jpg"),
    )
    .unwrap();
    env.drop_file("c1/r1/IMG_3.jpg", &bytes(3, 3000));
    env.wait(Some(&d), 15, "IMG_1 and IMG_3 synced", || {
        synced_named(&env, "IMG_1.jpg") && synced_named(&env, "IMG_3.jpg")
    });
    // Past a few rescans (2 s) and settle times.
    std::thread::sleep(Duration::from_millis(4500));

    let list = env.list();
    for a in &list {
        let name = a["filename"].as_str().unwrap();
        assert!(
            !name.contains("link") && name != "IMG_2.jpg" && name != "IMG_in_linked_dir.jpg",
            "a link was recorded as a photo: {a}\n{}",
            env.dump(Some(&d))
        );
        assert!(
            !a["meta_data"].to_string().contains("stolen"),
            "a linked sidecar was read: {a}"
        );
    }
    assert_eq!(list.len(), 3, "{}", env.dump(Some(&d)));
    assert_no_secret_in_remote(&env);

    // Each link is reported once, with the reason code and the path.
    let skipped = events_of(&env, "file_skipped");
    for name in [
        "IMG_link_at_start.jpg",
        "IMG_link.jpg",
        "IMG_2.jpg",
        "IMG_1.jpg.json",
    ] {
        let n = skipped
            .iter()
            .filter(|e| {
                let r = e["reason"].as_str().unwrap_or("");
                r.starts_with("not_regular_file: ") && r.contains(name)
            })
            .count();
        assert_eq!(n, 1, "{name} reported {n} times\n{}", env.dump(Some(&d)));
    }
    assert!(skipped.iter().all(|e| e["outcome"] == "skipped"));

    // `enqueue` of a link: one line, exit 2, nothing recorded, nothing read.
    let link = env.capture.join("c1/r1/IMG_link.jpg");
    let out = env.cli(&[
        "enqueue",
        link.to_str().unwrap(),
        "--checklist",
        "c9",
        "--row",
        "r9",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("IMG_link.jpg") && err.contains("not_regular_file"),
        "{err}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(env.list().len(), 3);
    assert_no_secret_in_remote(&env);
}

#[test]
fn a_symlinked_checklist_json_is_not_published() {
    let env = Env::new("");
    let outside = outside_file(
        &env,
        "checklist.json",
        &serde_json::to_vec(&serde_json::json!({
            "title": String::from_utf8_lossy(SECRET),
            "rows": [{"id": "r1", "photos": ["a.jpg"]}]
        }))
        .unwrap(),
    );
    env.drop_file("c1/r1/a.jpg", &bytes(1, 2000));
    let d = env.spawn();
    env.wait(Some(&d), 15, "a.jpg synced", || synced_named(&env, "a.jpg"));
    symlink(&outside, env.capture.join("c1/checklist.json")).unwrap();
    env.drop_file("c1/r1/b.jpg", &bytes(2, 2000));
    env.wait(Some(&d), 15, "b.jpg synced", || synced_named(&env, "b.jpg"));
    std::thread::sleep(Duration::from_millis(3000));
    assert!(
        !env.remote.join("fs/dev1/c1/manifest.json").exists(),
        "the linked checklist was published\n{}",
        env.dump(Some(&d))
    );
    assert_no_secret_in_remote(&env);
    assert!(events_of(&env, "checklist_published").is_empty());
    let invalid = events_of(&env, "checklist_invalid");
    assert_eq!(invalid.len(), 1, "{}", env.dump(Some(&d)));
    assert!(
        invalid[0]["reason"]
            .as_str()
            .unwrap()
            .contains("not_regular_file"),
        "{}",
        invalid[0]
    );
    // Unlinked photos are not archived as "not in checklist": the link is no checklist.
    assert_eq!(env.count("synced"), 2);
}

/// A daemon uploading to a real S3 server (`s3s-fs`).
fn s3_env(s3: &S3Server) -> Env {
    Env::new(&S3Server::remote_toml(&s3.endpoint(), SECRET_KEY, ""))
}

#[test]
fn a_photo_named_with_bytes_that_are_not_utf8_uploads_byte_identical_and_survives_a_restart() {
    let s3 = S3Server::start();
    let client = s3.client();
    let env = s3_env(&s3);
    let dir = env.capture.join("c1/r1");
    fs::create_dir_all(&dir).unwrap();
    let name = OsStr::from_bytes(b"IMG_\xff\xfe.jpg");
    let body = bytes(7, 300_000);
    fs::write(dir.join(name), &body).unwrap();
    // A checklist folder whose name is not UTF-8: keyed with U+FFFD.
    let odd_dir = env.capture.join(OsStr::from_bytes(b"c\xff")).join("r1");
    fs::create_dir_all(&odd_dir).unwrap();
    let odd = bytes(9, 2000);
    fs::write(odd_dir.join("a.jpg"), &odd).unwrap();
    // Its lossy twin is a different file with other bytes.
    let twin = bytes(8, 1000);
    fs::write(dir.join("IMG_\u{FFFD}\u{FFFD}.jpg"), &twin).unwrap();
    let mut d = env.spawn();
    env.wait(Some(&d), 20, "all synced", || env.count("synced") == 3);

    let check = |env: &Env| {
        let list = env.list();
        assert_eq!(list.len(), 3, "{}", env.dump(None));
        let o = list.iter().find(|a| a["filename"] == "a.jpg").unwrap();
        assert_eq!(o["checklist"], "c\u{FFFD}");
        let key = o["object_key"].as_str().unwrap();
        assert!(key.starts_with("fs/dev1/c\u{FFFD}/r1/"), "{key}");
        assert_eq!(client.get(key).unwrap(), odd);
        let a = list
            .iter()
            .find(|a| a["filename"] == "IMG_\\xff\\xfe.jpg")
            .unwrap_or_else(|| panic!("no readable record of the photo: {list:?}"));
        assert_eq!(a["state"], "synced", "{a}");
        let key = a["object_key"].as_str().unwrap();
        assert!(
            key.starts_with("fs/dev1/c1/r1/") && key.ends_with(".jpg"),
            "{key}"
        );
        let got = client.get(key).expect("object in the bucket");
        assert_eq!(sha256_hex(&got), sha256_hex(&body), "bytes of {key}");
        let t = list
            .iter()
            .find(|a| a["filename"] == "IMG_\u{FFFD}\u{FFFD}.jpg")
            .unwrap();
        assert_eq!(client.get(t["object_key"].as_str().unwrap()).unwrap(), twin);
    };
    check(&env);
    assert_eq!(d.terminate().0, Some(0));
    let mut d = env.spawn();
    // Past the first full rescan and another periodic one.
    std::thread::sleep(Duration::from_millis(4500));
    check(&env);
    let archived: Vec<Value> = env
        .events()
        .into_iter()
        .filter(|e| e["reason"] == "deleted_before_upload" || e["reason"] == "file_missing")
        .collect();
    assert!(archived.is_empty(), "{archived:?}\n{}", env.dump(Some(&d)));
    // The text list shows it readably, on one line.
    let text = env.cli_ok(&["list"]);
    assert!(text.contains("c1/r1/IMG_\\xff\\xfe.jpg"), "{text}");
    assert_eq!(text.lines().count(), 3, "{text}");

    // A checklist that names only the twin archives the photo (its file stays). Expiry
    // must see that file under its real name: the record stays, so a restart does not
    // upload the photo a second time.
    fs::write(
        env.capture.join("c1/checklist.json"),
        format!(
            r#"{{"rows": [{{"id": "r1", "photos": ["IMG_{0}{0}.jpg"]}}]}}"#,
            '\u{FFFD}'
        ),
    )
    .unwrap();
    env.wait(Some(&d), 20, "archived", || env.count("archived") == 1);
    let out = env.cli_ok(&["expire", "--limit", "0"]);
    assert!(out.contains("expired 0 archived record(s)"), "{out}");
    assert_eq!(d.terminate().0, Some(0));
    let d = env.spawn();
    std::thread::sleep(Duration::from_millis(4500));
    let objects = client.list("fs/dev1/c1/");
    assert_eq!(
        objects
            .iter()
            .filter(|(k, _)| !k.ends_with("manifest.json"))
            .count(),
        2,
        "{objects:?}\n{}",
        env.dump(Some(&d))
    );
    assert_eq!(env.count("archived"), 1, "{}", env.dump(Some(&d)));
}

#[test]
fn odd_names_upload_byte_identical_to_s3() {
    let s3 = S3Server::start();
    let client = s3.client();
    let env = s3_env(&s3);
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("c1/r1/IMG\n1.jpg", bytes(11, 5000)),
        ("c1/r1/IMG_%20?#+&=.jpg", bytes(12, 6000)),
        // NFC and NFD spellings of the same name are two files on Linux.
        ("c1/r1/Caf\u{e9}.jpg", bytes(13, 7000)),
        ("c1/r1/Cafe\u{301}.jpg", bytes(14, 7000)),
        ("c1/r1/IMG_empty.jpg", Vec::new()),
        // A checklist and a row whose names need escaping in a URL.
        ("c%?#+ 2/r 1+%2F/IMG_5.jpg", bytes(15, 4000)),
    ];
    for (rel, body) in &files {
        env.drop_file(rel, body);
    }
    let d = env.spawn();
    env.wait(Some(&d), 25, "all synced", || {
        env.count("synced") == files.len() as i64
    });
    let list = env.list();
    assert_eq!(list.len(), files.len());
    for (rel, body) in &files {
        let a = list
            .iter()
            .find(|a| a["local_uri"].as_str().unwrap().ends_with(rel))
            .unwrap_or_else(|| panic!("{rel:?} not recorded: {list:?}"));
        let got = client
            .get(a["object_key"].as_str().unwrap())
            .unwrap_or_else(|| panic!("{rel:?}: {} not in the bucket", a["object_key"]));
        assert_eq!(got.len(), body.len(), "{rel:?}");
        assert_eq!(sha256_hex(&got), sha256_hex(body), "{rel:?}");
    }
    // One line per record in the text list, even with a newline in a name.
    let text = env.cli_ok(&["list"]);
    assert_eq!(text.lines().count(), files.len(), "{text}");
    assert!(text.contains("IMG\\n1.jpg"), "{text}");
}

#[test]
fn a_255_byte_name_is_no_malformed_sidecar() {
    let env = Env::new("");
    let name = format!("{}.jpg", "N".repeat(251));
    assert_eq!(name.len(), 255);
    let body = bytes(21, 4000);
    env.drop_file(&format!("c1/r1/{name}"), &body);
    let d = env.spawn();
    env.wait(Some(&d), 15, "synced", || synced_named(&env, &name));
    std::thread::sleep(Duration::from_millis(2500));
    let bad = events_of(&env, "sidecar_invalid");
    assert!(bad.is_empty(), "{bad:?}");
    let objects = env.remote_objects();
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0].1, body);
}

#[test]
fn a_slowly_written_checklist_is_parsed_only_once_complete() {
    let env = Env::new("");
    let d = env.spawn();
    let photos: Vec<String> = (0..12).map(|i| format!("IMG_{i}.jpg")).collect();
    // A large checklist: long notes per row, so it is written in many pieces.
    let doc = serde_json::json!({
        "title": "Pump 7",
        "rows": [{"id": "r1", "notes": "x".repeat(200_000), "photos": photos}],
    });
    let text = serde_json::to_vec_pretty(&doc).unwrap();
    let path = env.capture.join("c1/checklist.json");
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    // Written over ~2.4 s, never pausing as long as ingest.settle (300ms); photos finish
    // uploading meanwhile, each of which makes the publisher look at the checklist.
    let mut f = fs::File::create(&path).unwrap();
    let chunks: Vec<&[u8]> = text.chunks(text.len().div_ceil(photos.len())).collect();
    for (i, c) in chunks.iter().enumerate() {
        use std::io::Write;
        f.write_all(c).unwrap();
        f.flush().unwrap();
        env.drop_file(&format!("c1/r1/{}", photos[i]), &bytes(i as u64, 2000));
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(f);
    env.wait(Some(&d), 20, "published", || {
        !events_of(&env, "checklist_published").is_empty()
    });
    let invalid = events_of(&env, "checklist_invalid");
    assert!(
        invalid.is_empty(),
        "a checklist still being written was reported: {invalid:?}"
    );
    let m: Value =
        serde_json::from_slice(&fs::read(env.remote.join("fs/dev1/c1/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(
        m["rows"][0]["attachments"].as_array().unwrap().len(),
        photos.len()
    );
}

#[test]
fn a_capture_path_that_is_a_file_or_an_uncreatable_state_dir_is_a_config_error() {
    let mut env = Env::new("");
    let file = env.dir.path().join("not-a-dir");
    fs::write(&file, b"x").unwrap();
    let cfg = env.config.display().to_string();
    let original = env.toml.clone();

    let capture = env.capture.display().to_string();
    env.write_config(&original.replace(
        &format!("capture = \"{capture}\""),
        &format!("capture = \"{}\"", file.display()),
    ));
    for args in [&["config", "check"][..], &["run", "--until-idle"][..]] {
        let out = env.cli(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.contains(&format!("config {cfg}: ")) && err.contains("key `paths.capture`"),
            "{args:?}: {err}"
        );
    }

    let state = env.state.display().to_string();
    env.write_config(&original.replace(
        &format!("state_dir = \"{state}\""),
        &format!("state_dir = \"{}/state\"", file.display()),
    ));
    for args in [&["config", "check"][..], &["run", "--until-idle"][..]] {
        let out = env.cli(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.contains(&format!("config {cfg}: ")) && err.contains("key `paths.state_dir`"),
            "{args:?}: {err}"
        );
        // The README's line: the file in the way is named.
        assert!(
            err.contains(&format!(
                "cannot create {}/state: {} is a regular file",
                file.display(),
                file.display()
            )),
            "{args:?}: {err}"
        );
    }

    // An inbox inside the capture folder through a link is still inside it.
    let link = env.dir.path().join("caplink");
    std::os::unix::fs::symlink(&env.capture, &link).unwrap();
    env.write_config(&format!(
        "{}
",
        original.replace(
            "[paths]\n",
            &format!("[paths]\ninbox = \"{}/in\"\n", link.display())
        )
    ));
    assert!(env.toml.contains("caplink/in"), "{}", env.toml);
    for args in [&["config", "check"][..], &["run", "--until-idle"][..]] {
        let out = env.cli(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("key `paths.inbox`"), "{args:?}: {err}");
    }

    // A capture folder that does not exist yet is fine: the daemon creates it.
    env.write_config(&original.replace(
        &format!("capture = \"{capture}\""),
        &format!("capture = \"{capture}/new\""),
    ));
    let out = env.cli(&["config", "check"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// README "Configuration": a file the config names that cannot be used (credentials, CA
/// bundle, password, token), or no credentials at all, stops `config check` and `run` with
/// the one line of every configuration error: ``config <file>: key `<key>`: …``, exit 2,
/// no secret in it.
#[test]
fn unusable_credential_ca_and_password_files_are_config_errors_naming_file_and_key() {
    const SECRET_KEY: &str = "s3cr3t-never-printed-9271";
    let s3 = |extra: &str| {
        format!(
            "[remote]\nkind = \"s3\"\nprefix = \"fs\"\n[remote.s3]\n\
             endpoint = \"http://127.0.0.1:9\"\nbucket = \"bkt\"\n{extra}\n"
        )
    };
    let keys = format!("access_key_id = \"AKIDTEST\"\nsecret_access_key = \"{SECRET_KEY}\"");
    let cases = [
        (s3(""), "remote.s3", "no credentials"),
        (
            s3(&format!("{keys}\nca_bundle = \"/nonexistent.pem\"")),
            "remote.s3.ca_bundle",
            "/nonexistent.pem",
        ),
        (
            s3("credentials_file = \"/nonexistent\""),
            "remote.s3.credentials_file",
            "/nonexistent",
        ),
        (
            "[mqtt]\nhost = \"127.0.0.1\"\nport = 9\nusername = \"dev\"\n\
             password_file = \"/nonexistent-password\"\n"
                .to_string(),
            "mqtt.password_file",
            "/nonexistent-password",
        ),
        (
            "[remote]\nkind = \"http\"\nprefix = \"fs\"\n[remote.http]\n\
             endpoint = \"http://127.0.0.1:9\"\ntoken_file = \"/nonexistent-token\"\n"
                .to_string(),
            "remote.http.token_file",
            "/nonexistent-token",
        ),
    ];
    for (extra, key, detail) in cases {
        let env = Env::new(&extra);
        let cfg = env.config.display().to_string();
        for args in [&["config", "check"][..], &["run", "--until-idle"][..]] {
            let out = env
                .command()
                .arg("--config")
                .arg(&env.config)
                .args(args)
                .env_remove("AWS_ACCESS_KEY_ID")
                .env_remove("AWS_SECRET_ACCESS_KEY")
                .env_remove("AWS_SESSION_TOKEN")
                .env_remove("FIELDSYNC_DEVICE_TOKEN")
                .output()
                .unwrap();
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{key} {args:?}: {err}");
            assert_eq!(err.trim_end().lines().count(), 1, "{key} {args:?}: {err}");
            assert!(
                err.starts_with(&format!("fieldsync: config {cfg}: key `{key}`: ")),
                "{key} {args:?}: {err}"
            );
            assert!(err.contains(detail), "{key} {args:?}: {err}");
            assert!(!err.contains(SECRET_KEY), "{key} {args:?}: {err}");
        }
    }
}

#[test]
fn error_lines_name_the_table_or_say_syntax_error_and_are_one_line() {
    let mut env = Env::new("");
    let original = env.toml.clone();
    env.write_config(&format!("{original}\n[upload]\nconcurrency = 3\n"));
    let out = env.cli(&["config", "check"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!err.contains(": :"), "{err}");
    assert!(err.contains("table `upload`"), "{err}");

    env.write_config(&format!("{original}\n[remote\n"));
    let out = env.cli(&["config", "check"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(!err.contains(": :"), "{err}");
    assert!(err.contains("syntax error"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    env.write_config(&original);
    for args in [
        &["list", "--state", "bogus"][..],
        &["list", "--limit", "many"][..],
        &["enqueue", "x.jpg"][..],
        &["frobnicate"][..],
    ] {
        let out = env.cli(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("fieldsync: "), "{args:?}: {err}");
    }
    let err = stderr(&env.cli(&["list", "--state", "bogus"]));
    assert!(err.contains("bogus") && err.contains("--state"), "{err}");
    let err = stderr(&env.cli(&["enqueue", "x.jpg"]));
    assert!(err.contains("--checklist"), "{err}");
    // Help is not an error.
    let out = env.cli(&["list", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--state"));
}

/// FIFOs, link loops, directories named like photos and files still being written: the
/// daemon neither hangs nor records anything it should not, and the real photos upload.
#[test]
fn fifos_loops_photo_named_directories_and_growing_files() {
    let env = Env::new("");
    let row = env.capture.join("c1/r1");
    fs::create_dir_all(&row).unwrap();
    let mkfifo = |p: &Path| {
        assert!(Command::new("mkfifo").arg(p).status().unwrap().success());
    };
    mkfifo(&row.join("IMG_fifo_at_start.jpg"));
    symlink("IMG_loop_b.jpg", row.join("IMG_loop_a.jpg")).unwrap();
    symlink("IMG_loop_a.jpg", row.join("IMG_loop_b.jpg")).unwrap();
    symlink("..", row.join("up")).unwrap();
    fs::create_dir_all(row.join("IMG_dir.jpg")).unwrap();
    fs::write(row.join("IMG_dir.jpg/inner.jpg"), bytes(31, 1000)).unwrap();
    env.drop_file("c1/r1/IMG_0.jpg", &bytes(30, 1000));
    let d = env.spawn();
    let fifo_reported = |name: &str| {
        events_of(&env, "file_skipped").iter().any(|e| {
            let r = e["reason"].as_str().unwrap_or("");
            r.contains(name) && r.contains("a FIFO")
        })
    };
    env.wait(Some(&d), 15, "IMG_0 and inner synced", || {
        synced_named(&env, "IMG_0.jpg") && synced_named(&env, "inner.jpg")
    });
    mkfifo(&row.join("IMG_fifo.jpg"));
    fs::create_dir_all(row.join("IMG_dir2.jpg")).unwrap();
    // Written in pieces, never quiet for as long as ingest.settle.
    let growing = bytes(32, 400_000);
    write_slowly(
        &row.join("IMG_growing.jpg"),
        &growing,
        20,
        Duration::from_secs(2),
    );
    env.drop_file("c1/r1/IMG_1.jpg", &bytes(33, 1000));
    env.wait(Some(&d), 15, "IMG_growing and IMG_1 synced", || {
        synced_named(&env, "IMG_growing.jpg") && synced_named(&env, "IMG_1.jpg")
    });
    std::thread::sleep(Duration::from_millis(2500));
    let list = env.list();
    let names: Vec<&str> = list
        .iter()
        .map(|a| a["filename"].as_str().unwrap())
        .collect();
    for bad in ["fifo", "loop", "IMG_dir", "up"] {
        assert!(
            !names
                .iter()
                .any(|n| n.starts_with(&format!("IMG_{bad}")) || *n == bad),
            "{bad} recorded: {names:?}"
        );
    }
    assert!(fifo_reported("IMG_fifo_at_start.jpg") && fifo_reported("IMG_fifo.jpg"));
    // The inner photo is recorded once, not again through the `up` loop.
    assert_eq!(names.iter().filter(|n| **n == "inner.jpg").count(), 1);
    // The growing file: only its complete bytes are synced.
    let synced: Vec<&Value> = list
        .iter()
        .filter(|a| a["filename"] == "IMG_growing.jpg" && a["state"] == "synced")
        .collect();
    assert_eq!(synced.len(), 1, "{list:?}");
    assert_eq!(synced[0]["sha256"].as_str().unwrap(), sha256_hex(&growing));
    let key = synced[0]["object_key"].as_str().unwrap();
    assert_eq!(fs::read(env.remote.join(key)).unwrap(), growing);
    assert!(d.log_text().contains("fieldsync started"));
    // Still responsive: a new photo after all that is taken.
    env.drop_file("c1/r1/IMG_2.jpg", &bytes(34, 1000));
    env.wait(Some(&d), 10, "IMG_2 synced", || {
        synced_named(&env, "IMG_2.jpg")
    });
}

/// A photo recorded, then replaced by a link before it was uploaded: the link is never
/// read, and the record fails with the reason instead of being taken again and again.
#[test]
fn a_photo_replaced_by_a_symlink_before_upload_fails_and_is_never_read() {
    let env = Env::new("");
    let secret = outside_file(&env, "secret.jpg", SECRET);
    let d = env.spawn();
    env.cli_ok(&["pause"]);
    env.wait(Some(&d), 5, "paused", || env.status()["paused"] == true);
    env.drop_file("c1/r1/IMG_1.jpg", &bytes(41, 3000));
    env.wait(Some(&d), 10, "queued", || env.count("queued_upload") == 1);
    let tmp = env.capture.join("c1/r1/.IMG_1.tmp");
    symlink(&secret, &tmp).unwrap();
    fs::rename(&tmp, env.capture.join("c1/r1/IMG_1.jpg")).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    env.cli_ok(&["resume"]);
    env.wait(Some(&d), 10, "failed", || env.count("failed") == 1);
    let failed = env.list_state("failed");
    assert_eq!(
        failed[0]["last_error_code"], "not_regular_file",
        "{failed:?}"
    );
    // The message says what stands there, without repeating the code.
    let msg = failed[0]["last_error"].as_str().unwrap();
    assert!(
        msg.ends_with("IMG_1.jpg: a symbolic link; not read") && !msg.contains("not_regular_file"),
        "{msg}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(env.list().len(), 1, "{}", env.dump(Some(&d)));
    assert_no_secret_in_remote(&env);
    assert!(env.remote_objects().is_empty());
}
