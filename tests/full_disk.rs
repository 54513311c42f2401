//! A full disk: the state directory (or the `file` remote's folder) on a small real
//! filesystem (tmpfs, mounted by the test; root only) filled to the last byte. Nothing is
//! lost, the queue database stays intact, `disk_low` is reported, uploads already queued
//! go on, and everything catches up once space returns.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// A tmpfs mounted on a directory for the test's lifetime.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// None (with a message) when the test cannot mount: not root.
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        if !is_root() {
            eprintln!("SKIPPED: mounting a small tmpfs needs root (CI runs the suite as root)");
            return None;
        }
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs on {}", dir.display());
        Some(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem of `dir` to the last byte with one file; returns it.
fn fill(dir: &Path) -> PathBuf {
    let p = dir.join("filler");
    let mut f = fs::File::create(&p).unwrap();
    let chunk = vec![0x5Au8; 64 * 1024];
    loop {
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
    // The tail smaller than a chunk.
    while f.write_all(&[0x5A]).is_ok() {}
    let _ = f.sync_all();
    p
}

fn quick_check(db: &Path) -> String {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("PRAGMA quick_check", [], |r| r.get(0)).unwrap()
}

fn set_min_free_disk(env: &mut Env, v: &str) {
    env.edit_config("min_free_disk = 0", &format!("min_free_disk = \"{v}\""));
}

fn disk_low(env: &Env) -> bool {
    let st = env.status();
    st["conditions"]["disk"]["low"] == true
        && st["conditions"]["alarms"]
            .as_array()
            .is_some_and(|a| a.iter().any(|r| r == "disk_low"))
}

#[test]
fn a_full_state_disk_loses_nothing_and_catches_up() {
    let mut env = Env::new("");
    let Some(_fs) = Tmpfs::mount(&env.state, "6M") else {
        return;
    };
    set_min_free_disk(&mut env, "1MB");
    // Slow uploads, one at a time, so photos are still queued when the disk fills.
    let t = env
        .toml
        .replace("[upload]\n", "[upload]\nconcurrency = 1\n")
        .replace("min_free_disk", "bandwidth_limit = \"400k\"\nmin_free_disk");
    env.write_config(&t);
    // Local copies are kept: the test counts what is synced (eviction has its own tests).
    let t = format!("{}\n[retention]\nevict_on_disk_low = false\n", env.toml);
    env.write_config(&t);
    let d = env.spawn();
    let mut want = BTreeSet::new();
    for i in 0..4u64 {
        let p = env.drop_file(&format!("c1/r1/IMG_{i}.jpg"), &bytes(i, 400_000));
        want.insert(p.display().to_string());
    }
    env.wait(Some(&d), 30, "4 recorded", || env.list().len() == 4);
    let filler = fill(&env.state);
    // Photos captured while the queue cannot grow.
    for i in 4..8u64 {
        let p = env.drop_file(&format!("c1/r2/IMG_{i}.jpg"), &bytes(i, 300_000));
        want.insert(p.display().to_string());
    }
    env.wait(Some(&d), 30, "disk_low reported", || disk_low(&env));
    // Uploads of what was queued go on.
    env.wait(
        Some(&d),
        60,
        "the queued photos synced on a full disk",
        || env.count("synced") >= 4,
    );
    assert_eq!(quick_check(&env.state.join("queue.db")), "ok");
    assert!(d.child.is_some() && !d.log_text().contains("fieldsync stopped"));

    fs::remove_file(&filler).unwrap();
    env.wait(
        Some(&d),
        60,
        "every photo synced once space returned",
        || env.count("synced") == 8,
    );
    let list = env.list();
    let got: BTreeSet<String> = list
        .iter()
        .map(|a| a["local_uri"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, want, "every photo recorded once");
    assert_eq!(list.len(), 8);
    let objects = env.remote_objects();
    assert_eq!(
        objects.len(),
        8,
        "one object per photo: {:?}",
        objects.iter().map(|o| &o.0).collect::<Vec<_>>()
    );
    for a in &list {
        let body = &objects
            .iter()
            .find(|(k, _)| k == a["object_key"].as_str().unwrap())
            .unwrap()
            .1;
        assert_eq!(sha256_hex(body), a["sha256"].as_str().unwrap());
    }
    assert_eq!(quick_check(&env.state.join("queue.db")), "ok");
    let events = env.events();
    assert!(
        events.iter().any(|e| e["kind"] == "disk_low"),
        "disk_low in the event log: {events:#?}"
    );
    env.wait(Some(&d), 30, "disk_low cleared", || !disk_low(&env));
}

#[test]
fn a_full_remote_folder_fails_transiently_and_catches_up_without_leftovers() {
    let env = Env::new("");
    let Some(_fs) = Tmpfs::mount(&env.remote, "2M") else {
        return;
    };
    let filler = fill(&env.remote);
    let d = env.spawn();
    for i in 0..3u64 {
        env.drop_file(&format!("c1/r1/IMG_{i}.jpg"), &bytes(i, 300_000));
    }
    env.wait(Some(&d), 30, "a retry for lack of space", || {
        env.status()["last_error"]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("remote_full: "))
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        env.count("synced"),
        0,
        "nothing marked synced on a full remote"
    );
    assert_eq!(
        env.count("failed"),
        0,
        "a full remote is not the photo's fault"
    );
    let leftovers: Vec<String> = env
        .remote_objects()
        .into_iter()
        .map(|o| o.0)
        .filter(|k| k != "filler")
        .collect();
    assert!(
        leftovers.is_empty(),
        "no partial objects or temp files: {leftovers:?}"
    );

    fs::remove_file(&filler).unwrap();
    env.wait(Some(&d), 60, "all synced once space returned", || {
        env.count("synced") == 3
    });
    let objects: Vec<_> = env
        .remote_objects()
        .into_iter()
        .filter(|o| o.0 != "filler")
        .collect();
    assert_eq!(
        objects.len(),
        3,
        "one object per photo, no temp leftovers: {:?}",
        objects.iter().map(|o| &o.0).collect::<Vec<_>>()
    );
    for a in env.list() {
        let body = &objects
            .iter()
            .find(|(k, _)| k == a["object_key"].as_str().unwrap())
            .unwrap()
            .1;
        assert_eq!(*body, fs::read(a["local_uri"].as_str().unwrap()).unwrap());
    }
}

#[test]
fn a_low_state_disk_on_its_own_volume_costs_no_photo() {
    // The queue on a small volume of its own, the photos on the big disk: evicting a
    // photo cannot give the queue room, so nothing is evicted and `disk_low` says why.
    let mut env = Env::new("");
    let Some(_fs) = Tmpfs::mount(&env.state, "6M") else {
        return;
    };
    let d = env.spawn();
    let a = env.drop_file("c1/r1/a.jpg", &bytes(1, 30_000));
    let b = env.drop_file("c1/r1/b.jpg", &bytes(2, 30_000));
    let mut d = d;
    env.wait(Some(&d), 20, "2 synced", || env.count("synced") == 2);
    d.terminate();
    // More free space than the 6 MB state volume can ever have; the capture disk has it.
    set_min_free_disk(&mut env, "8MB");
    env.edit_config(
        "[conditions]\n",
        "[conditions]\nprobe_interval = \"200ms\"\n",
    );
    let d = env.spawn();
    env.wait(Some(&d), 20, "disk_low reported", || disk_low(&env));
    std::thread::sleep(Duration::from_secs(1));
    let evicted: Vec<serde_json::Value> = env
        .events()
        .into_iter()
        .filter(|e| e["kind"] == "evicted")
        .collect();
    assert!(evicted.is_empty(), "{evicted:?}\n{}", env.dump(Some(&d)));
    assert!(a.exists() && b.exists(), "local copies deleted");
    assert_eq!(env.count("synced"), 2);
}
