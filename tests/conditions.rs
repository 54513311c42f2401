//! Opportunistic uploads with the real binary, the file remote and a fake sysfs/procfs
//! tree: battery, metered links and their budget, rate limit, disk pressure, schedule,
//! CPU temperature, a lost link, and what happens to an upload a condition interrupts.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::Value;

/// The fake trees the harness points `[conditions]` at.
fn sys(env: &Env) -> PathBuf {
    env.dir.path().join("fake/sys")
}
fn proc_(env: &Env) -> PathBuf {
    env.dir.path().join("fake/proc")
}

fn write(p: &Path, s: &str) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    // Write-then-rename, as the kernel's attribute reads are atomic too.
    let tmp = p.with_extension("tmp-write");
    fs::write(&tmp, s).unwrap();
    fs::rename(&tmp, p).unwrap();
}

fn battery(env: &Env, percent: u8, status: &str) {
    let ps = sys(env).join("class/power_supply");
    write(&ps.join("BAT0/type"), "Battery\n");
    write(&ps.join("BAT0/capacity"), &format!("{percent}\n"));
    write(&ps.join("BAT0/status"), &format!("{status}\n"));
    write(&ps.join("AC/type"), "Mains\n");
    write(&ps.join("AC/online"), "0\n");
}

fn route(env: &Env, iface: &str) {
    write(
        &proc_(env).join("net/route"),
        &format!(
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
             {iface}\t00000000\t0102A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n"
        ),
    );
}

/// An environment whose `[conditions]` table (the harness's, always last before
/// `[retention]`) gets `keys`; probes run every 200 ms so tests react fast.
fn env_with(keys: &str, retention: &str) -> Env {
    let mut env = Env::new("");
    let toml = env.toml.replace("min_free_disk = 0\n", "").replace(
        "[conditions]\n",
        &format!("[conditions]\nprobe_interval = \"200ms\"\n{keys}\n"),
    );
    let toml = if keys.contains("min_free_disk") {
        toml
    } else {
        toml.replace("[conditions]\n", "[conditions]\nmin_free_disk = 0\n")
    };
    env.write_config(&format!("{toml}\n[retention]\n{retention}\n"));
    env
}

/// A POSIX TZ that makes the local time about noon now: the budget day cannot roll
/// over mid-test, and it proves budgets and schedules follow the device's time zone.
fn noon_tz() -> String {
    let h = (SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 3600
        % 24) as i64;
    // POSIX offsets are west-positive: local = UTC - offset.
    format!("FST{:+}", h - 12)
}

fn reason(env: &Env) -> Option<String> {
    env.status()["pause_reason"].as_str().map(String::from)
}

fn cond(env: &Env) -> Value {
    env.status()["conditions"].clone()
}

fn events_of(env: &Env, kind: &str) -> Vec<Value> {
    env.events()
        .into_iter()
        .filter(|e| e["kind"] == kind)
        .collect()
}

fn remote_bytes(env: &Env) -> usize {
    env.remote_objects().iter().map(|(_, b)| b.len()).sum()
}

#[test]
fn low_battery_pauses_and_plugging_in_resumes_at_once() {
    let env = env_with("", "");
    battery(&env, 10, "Discharging");
    let d = env.spawn();
    env.drop_file("c/r/a.jpg", &bytes(1, 50_000));
    env.drop_file("c/r/b.jpg", &bytes(2, 50_000));
    env.wait(Some(&d), 20, "both queued, paused battery_low", || {
        env.count("queued_upload") == 2 && reason(&env).as_deref() == Some("battery_low")
    });
    assert!(
        env.remote_objects().is_empty(),
        "nothing uploaded on a low battery"
    );
    let c = cond(&env);
    assert_eq!(c["battery"]["percent"], 10);
    assert_eq!(c["battery"]["charging"], false);
    assert_eq!(c["failing"], serde_json::json!(["battery_low"]));
    let human = env.cli_ok(&["status"]);
    assert!(human.contains("uploads: paused (battery_low)"), "{human}");
    assert!(human.contains("10% discharging"), "{human}");

    // Plug in: the probe thread wakes the scheduler, no waiting for the sync tick.
    let plugged = Instant::now();
    write(
        &sys(&env).join("class/power_supply/BAT0/status"),
        "Charging\n",
    );
    env.wait(Some(&d), 10, "uploads after plugging in", || {
        env.count("synced") == 2
    });
    eprintln!(
        "resumed and uploaded {:?} after plugging in",
        plugged.elapsed()
    );
    assert_eq!(reason(&env), None);
    assert!(events_of(&env, "paused")
        .iter()
        .any(|e| e["reason"] == "battery_low"));
    assert!(events_of(&env, "resumed")
        .iter()
        .any(|e| e["reason"] == "battery_low"));
    assert!(events_of(&env, "conditions_changed")
        .iter()
        .any(|e| e["reason"].as_str().unwrap().contains("battery=charging")));
}

#[test]
fn a_device_without_power_supply_entries_uploads() {
    let env = env_with("", "");
    fs::create_dir_all(sys(&env).join("class/power_supply")).unwrap();
    let d = env.spawn();
    env.drop_file("c/r/a.jpg", &bytes(3, 10_000));
    env.wait(Some(&d), 20, "synced", || env.count("synced") == 1);
    assert_eq!(cond(&env)["battery"]["present"], false);
}

#[test]
fn metered_budget_stops_uploads_survives_restart_and_wifi_sends_the_rest() {
    let tz = noon_tz();
    let env = env_with("metered_daily_budget = \"5MB\"", "");
    route(&env, "wwan0");
    let mut d = env.spawn_with(&[("TZ", &tz)]);
    for i in 0..8u64 {
        env.drop_file(&format!("c/r/{i}.jpg"), &bytes(10 + i, 1_000_000));
    }
    env.wait(Some(&d), 40, "budget spent after 5 photos", || {
        env.count("synced") == 5
            && env.count("queued_upload") == 3
            && reason(&env).as_deref() == Some("metered_budget_spent")
    });
    assert!(remote_bytes(&env) <= 5_000_000, "never past the budget");
    let c = cond(&env);
    assert_eq!(c["network"]["interface"], "wwan0");
    assert_eq!(c["network"]["metered"], true);
    assert_eq!(c["budget"]["used"], 5_000_000);
    assert_eq!(c["budget"]["remaining"], 0);
    let human = env.cli_ok(&["status"]);
    assert!(human.contains("wwan0 (metered)"), "{human}");
    assert!(human.contains("5.0 MB of 5.0 MB used today"), "{human}");

    // A restart keeps today's count: still paused, nothing more sent.
    d.terminate();
    let d = env.spawn_with(&[("TZ", &tz)]);
    env.wait(Some(&d), 20, "paused again after restart", || {
        let s = env.status();
        s["daemon_running"] == true
            && s["pause_reason"] == "metered_budget_spent"
            && s["conditions"]["budget"]["used"] == 5_000_000
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(env.count("synced"), 5);
    assert!(remote_bytes(&env) <= 5_000_000);

    // Wi-Fi: the rest goes, and costs nothing from the budget.
    route(&env, "wlan0");
    env.wait(Some(&d), 30, "the rest on wlan0", || {
        env.count("synced") == 8
    });
    assert_eq!(remote_bytes(&env), 8_000_000);
    let c = cond(&env);
    assert_eq!(c["network"]["metered"], false);
    assert_eq!(c["budget"]["used"], 5_000_000);
}

#[test]
fn a_file_too_large_for_metered_waits_while_small_ones_go() {
    let env = env_with("metered_max_file_size = \"1MB\"", "");
    route(&env, "rmnet_data0");
    let d = env.spawn();
    env.drop_file("c/r/big.jpg", &bytes(20, 2_000_000));
    std::thread::sleep(Duration::from_millis(50));
    env.drop_file("c/r/small.jpg", &bytes(21, 100_000));
    env.wait(Some(&d), 20, "small synced, big waiting", || {
        env.count("synced") == 1 && reason(&env).as_deref() == Some("metered_file_too_large")
    });
    let synced = env.list_state("synced");
    assert_eq!(synced[0]["filename"], "small.jpg");
    assert_eq!(cond(&env)["deferred"]["metered_file_too_large"], 1);
    route(&env, "eth0");
    env.wait(Some(&d), 20, "big synced on ethernet", || {
        env.count("synced") == 2
    });
}

/// When the `.fieldsync-tmp` object first appears and when the final object does.
fn watch_upload(env: &Env, timeout: Duration) -> (Instant, Instant) {
    let start = Instant::now();
    let mut first: Option<Instant> = None;
    while start.elapsed() < timeout {
        let mut tmp = false;
        let mut done = false;
        walk(&env.remote, &mut |p| {
            if p.to_string_lossy().ends_with(".fieldsync-tmp") {
                tmp = true;
            } else {
                done = true;
            }
        });
        if (tmp || done) && first.is_none() {
            first = Some(Instant::now());
        }
        if done {
            return (first.unwrap(), Instant::now());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("upload did not finish in {timeout:?}\n{}", env.dump(None));
}

#[test]
fn rate_limit_paces_a_10mb_upload_to_about_10_seconds() {
    let env = env_with("bandwidth_limit = \"1MB\"", "");
    let d = env.spawn();
    let data = bytes(30, 10_000_000);
    env.drop_file("c/r/big.jpg", &data);
    let (first, last) = watch_upload(&env, Duration::from_secs(60));
    let took = (last - first).as_secs_f64();
    eprintln!("10 MB at 1 MB/s took {took:.2} s at the remote");
    // Without the limiter this copy takes well under a second; a loaded machine can
    // only make it slower, never faster, so the lower bound is the sharp one.
    assert!(
        (9.0..=12.0).contains(&took),
        "took {took:.2} s\n{}",
        env.dump(Some(&d))
    );
    env.wait(Some(&d), 10, "synced", || env.count("synced") == 1);
    assert_eq!(env.remote_objects()[0].1, data);
    assert_eq!(cond(&env)["bandwidth"]["limit_bytes_per_s"], 1_000_000);
}

#[test]
fn low_disk_evicts_uploaded_copies_oldest_first_and_never_pending_ones() {
    let mut env = env_with("", "");
    let mut d = env.spawn();
    let a = env.drop_file("c/r/a.jpg", &bytes(40, 20_000));
    env.wait(Some(&d), 20, "a synced", || env.count("synced") == 1);
    let b = env.drop_file("c/r/b.jpg", &bytes(41, 20_000));
    env.wait(Some(&d), 20, "b synced", || env.count("synced") == 2);
    d.terminate();

    // A pending photo (held back by a low battery), and a threshold no disk can meet.
    battery(&env, 10, "Discharging");
    let c = env.drop_file("c/r/c.jpg", &bytes(42, 20_000));
    env.edit_config("min_free_disk = 0\n", "min_free_disk = \"1000TB\"\n");
    let d = env.spawn();
    env.wait(Some(&d), 20, "evicted a and b, disk_low reported", || {
        events_of(&env, "evicted").len() == 2
            && !events_of(&env, "disk_low").is_empty()
            && env.count("queued_upload") == 1
    });
    assert!(!a.exists() && !b.exists(), "uploaded copies evicted");
    assert!(c.exists(), "the photo not yet uploaded is never touched");
    let order: Vec<String> = events_of(&env, "evicted")
        .iter()
        .map(|e| {
            let id = e["attachment_id"].as_str().unwrap();
            env.list().into_iter().find(|a| a["id"] == id).unwrap()["filename"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(order, ["a.jpg", "b.jpg"], "oldest first");
    assert_eq!(env.count("archived"), 2);
    assert_eq!(env.list_state("queued_upload")[0]["filename"], "c.jpg");
    assert_eq!(env.remote_objects().len(), 2, "remote copies untouched");
    let s = env.status();
    assert_eq!(s["conditions"]["alarms"], serde_json::json!(["disk_low"]));
    assert_eq!(s["conditions"]["disk"]["low"], true);
    // disk_low is an alarm, not the pause reason: the battery is.
    assert_eq!(s["pause_reason"], "battery_low");
    let human = env.cli_ok(&["status"]);
    assert!(human.contains("LOW"), "{human}");
}

#[test]
fn a_condition_lost_mid_upload_stops_it_without_failing_or_resending_finished_files() {
    let mut env = env_with("bandwidth_limit = \"2MB\"", "");
    env.edit_config("[upload]\n", "[upload]\nconcurrency = 1\n");
    battery(&env, 80, "Discharging");
    let d = env.spawn();
    for i in 0..3u64 {
        env.drop_file(&format!("c/r/{i}.jpg"), &bytes(50 + i, 3_000_000));
        std::thread::sleep(Duration::from_millis(30));
    }
    env.wait(Some(&d), 30, "first synced, second under way", || {
        let s = env.status();
        s["counts"]["synced"]["count"] == 1
            && s["uploading"]
                .as_array()
                .is_some_and(|u| u.iter().any(|x| x["bytes_sent"].as_i64() > Some(0)))
    });
    let first = env
        .remote_objects()
        .into_iter()
        .map(|(k, _)| k)
        .find(|k| !k.ends_with(".fieldsync-tmp"))
        .unwrap();
    let first_mtime = fs::metadata(env.remote.join(&first))
        .unwrap()
        .modified()
        .unwrap();

    battery(&env, 10, "Discharging");
    env.wait(Some(&d), 10, "stopped at a chunk boundary", || {
        let s = env.status();
        s["pause_reason"] == "battery_low"
            && s["uploading"].as_array().is_some_and(|u| u.is_empty())
    });
    let objs = env.remote_objects();
    assert_eq!(objs.len(), 1, "no partial object left behind: {objs:?}");
    // Interrupted is not failed: no attempt used, no retry scheduled.
    for a in env.list_state("queued_upload") {
        assert_eq!(a["attempts"], 0, "{a}");
    }
    assert!(events_of(&env, "retry_scheduled").is_empty());
    assert!(events_of(&env, "failed").is_empty());

    battery(&env, 10, "Charging");
    env.wait(Some(&d), 30, "all synced", || env.count("synced") == 3);
    assert_eq!(
        events_of(&env, "uploaded").len(),
        3,
        "each file uploaded once"
    );
    let again = fs::metadata(env.remote.join(&first))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(again, first_mtime, "the finished file was not sent again");
}

#[test]
fn schedule_for_metered_links_only() {
    let tz = noon_tz();
    let env = env_with(
        "schedule = [\"00:00-06:00\"]\nschedule_metered_only = true",
        "",
    );
    route(&env, "wwan0");
    let d = env.spawn_with(&[("TZ", &tz)]);
    env.drop_file("c/r/a.jpg", &bytes(60, 10_000));
    env.wait(Some(&d), 20, "outside the window on cellular", || {
        env.count("queued_upload") == 1 && reason(&env).as_deref() == Some("outside_schedule")
    });
    assert_eq!(cond(&env)["schedule"]["inside"], false);
    route(&env, "wlan0");
    env.wait(Some(&d), 20, "synced on wifi at noon", || {
        env.count("synced") == 1
    });
}

#[test]
fn hot_cpu_pauses_until_it_cools_down() {
    let env = env_with("max_cpu_temp = 80", "");
    let zone = sys(&env).join("class/thermal/thermal_zone0/temp");
    write(&zone, "91000\n");
    let d = env.spawn();
    env.drop_file("c/r/a.jpg", &bytes(70, 10_000));
    env.wait(Some(&d), 20, "paused cpu_hot", || {
        env.count("queued_upload") == 1 && reason(&env).as_deref() == Some("cpu_hot")
    });
    assert_eq!(cond(&env)["cpu"]["temp_c"], 91.0);
    write(&zone, "60000\n");
    env.wait(Some(&d), 20, "synced after cooling", || {
        env.count("synced") == 1
    });
}

#[test]
fn a_failed_request_marks_the_link_offline_and_a_probe_brings_it_back() {
    let env = env_with("", "");
    let d = env.spawn();
    fs::remove_dir_all(&env.remote).unwrap();
    env.drop_file("c/r/a.jpg", &bytes(80, 10_000));
    env.wait(Some(&d), 20, "paused offline", || {
        reason(&env).as_deref() == Some("offline")
    });
    assert_eq!(cond(&env)["network"]["online"], false);
    fs::create_dir_all(&env.remote).unwrap();
    env.wait(Some(&d), 30, "synced once the remote is back", || {
        env.count("synced") == 1
    });
    assert_eq!(cond(&env)["network"]["online"], true);
}

#[test]
fn bad_condition_settings_are_one_line_naming_the_key() {
    for (keys, key) in [
        (
            "min_battery_percent = 150",
            "conditions.min_battery_percent",
        ),
        ("bandwidth_limit = \"fast\"", "conditions.bandwidth_limit"),
        ("schedule = [\"8-17\"]", "conditions.schedule"),
        (
            "metered_daily_budget = \"lots\"",
            "conditions.metered_daily_budget",
        ),
        ("metered = \"sometimes\"", "conditions.metered"),
    ] {
        let env = env_with(keys, "");
        let out = env.cli(&["config", "check"]);
        assert_eq!(out.status.code(), Some(2), "{keys}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(key), "{keys}: {err}");
    }
}

#[test]
fn disk_low_raises_one_alarm_across_restarts_and_clears_when_space_returns() {
    let mut env = env_with("", "");
    let low = env
        .toml
        .replace("min_free_disk = 0\n", "min_free_disk = \"1000TB\"\n");
    let fine = env.toml.clone();
    let alarms = |env: &Env, kind: &str| -> Vec<serde_json::Value> {
        events_of(env, kind)
            .into_iter()
            .filter(|e| e["reason"].as_str().unwrap_or("").starts_with("disk_low: "))
            .collect()
    };
    env.write_config(&low);
    let mut d = env.spawn();
    env.wait(Some(&d), 20, "disk_low alarm", || {
        alarms(&env, "alarm").len() == 1
    });
    d.terminate();
    // Still low after a restart: the same episode, no second alarm.
    let mut d = env.spawn();
    env.wait(Some(&d), 20, "disk_low reported again", || {
        env.status()["conditions"]["alarms"] == serde_json::json!(["disk_low"])
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(alarms(&env, "alarm").len(), 1, "{}", env.dump(Some(&d)));
    assert!(alarms(&env, "alarm_cleared").is_empty());
    d.terminate();
    // Space returns: one alarm_cleared.
    env.write_config(&fine);
    let d = env.spawn();
    env.wait(Some(&d), 20, "disk_low cleared", || {
        alarms(&env, "alarm_cleared").len() == 1
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(alarms(&env, "alarm").len(), 1);
    assert_eq!(alarms(&env, "alarm_cleared").len(), 1);
}

#[test]
fn keep_synced_files_holds_from_the_start_and_after_a_reload_without_a_new_upload() {
    let mut env = env_with("", "");
    let mut d = env.spawn();
    let mut files = Vec::new();
    for i in 0..4u64 {
        files.push(env.drop_file(&format!("c/r/{i}.jpg"), &bytes(60 + i, 5_000)));
        let n = i as i64 + 1;
        env.wait(Some(&d), 20, "synced", || env.count("synced") == n);
    }
    d.terminate();

    // A limit set while the daemon was stopped: it holds once it starts, with nothing
    // left to upload.
    env.edit_config("[retention]\n", "[retention]\nkeep_synced_files = 3\n");
    let d = env.spawn();
    env.wait(Some(&d), 20, "one copy evicted at start", || {
        events_of(&env, "evicted").len() == 1
    });
    assert!(!files[0].exists(), "the oldest copy goes first");
    assert!(files[1..].iter().all(|f| f.exists()));

    // Lowered by a reload: applied at once, still without an upload.
    env.edit_config("keep_synced_files = 3", "keep_synced_files = 1");
    let out = env.cli_ok(&["reload"]);
    assert!(out.contains("applied"), "{out}");
    env.wait(Some(&d), 20, "two more evicted after the reload", || {
        events_of(&env, "evicted").len() == 3
    });
    assert!(files[..3].iter().all(|f| !f.exists()));
    assert!(files[3].exists(), "the newest copy is kept");
    assert_eq!(env.remote_objects().len(), 4, "remote copies untouched");
    assert!(events_of(&env, "evicted")
        .iter()
        .all(|e| e["reason"] == "cache_limit"));
}
