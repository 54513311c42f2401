//! Reload without restart, with the real binary: SIGHUP, `fieldsync reload` and MQTT
//! `cmd/reload` re-read the config and its secret files; live settings change in the
//! running daemon, a bad config is refused and the old one stays in force, restart-only
//! changes are named in one log line, fixed S3 credentials (a real `s3s-fs`) resume
//! a queue paused for `auth` without a restart, and a reloaded bandwidth limit is in
//! status and in force for the next transfer as soon as the reload is answered.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::mqtt::{Broker, Msg, Sub};
use common::s3::*;
use common::*;
use serde_json::Value;

fn write(p: &Path, s: &str) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, s).unwrap();
}

/// A battery at `percent`, discharging, in the fake sysfs the harness points at.
fn battery(env: &Env, percent: u8) {
    let ps = env.dir.path().join("fake/sys/class/power_supply");
    write(&ps.join("BAT0/type"), "Battery\n");
    write(&ps.join("BAT0/capacity"), &format!("{percent}\n"));
    write(&ps.join("BAT0/status"), "Discharging\n");
}

fn reason(env: &Env) -> Option<String> {
    env.status()["pause_reason"].as_str().map(String::from)
}

fn reload_events(env: &Env) -> Vec<Value> {
    env.events()
        .into_iter()
        .filter(|e| e["kind"] == "config_reloaded")
        .collect()
}

fn hup(d: &Daemon) {
    let st = std::process::Command::new("kill")
        .args(["-HUP", &d.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn reload_changes_a_live_setting_and_names_restart_only_changes_in_one_line() {
    let mut env = Env::new("");
    battery(&env, 40);
    env.edit_config(
        "[conditions]\n",
        "[conditions]\nprobe_interval = \"200ms\"\nmin_battery_percent = 60\n",
    );
    env.drop_file("c/r/a.jpg", &bytes(1, 20_000));
    let d = env.spawn();
    env.wait(Some(&d), 20, "queued, paused battery_low", || {
        env.count("queued_upload") == 1 && reason(&env).as_deref() == Some("battery_low")
    });
    let pid = d.pid();

    // A lower threshold (live) and more workers (restart only).
    env.edit_config("min_battery_percent = 60", "min_battery_percent = 25");
    env.edit_config("[upload]\n", "[upload]\nconcurrency = 3\n");
    let out = env.cli(&["reload"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("applied: conditions"), "{stdout}");
    assert!(
        stdout.contains("needs a restart: upload.concurrency"),
        "{stdout}"
    );
    env.wait(Some(&d), 20, "synced after the reload", || {
        env.count("synced") == 1
    });
    assert_eq!(d.pid(), pid);
    let log = d.log_text();
    assert_eq!(log.matches("fieldsync started").count(), 1, "not restarted");
    let restart_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("upload.concurrency"))
        .collect();
    assert_eq!(restart_lines.len(), 1, "{log}");
    assert!(
        restart_lines[0].contains("upload.concurrency"),
        "{}",
        restart_lines[0]
    );
    let ev = reload_events(&env);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0]["outcome"], "applied");
    assert_eq!(
        env.status()["conditions"]["battery"]["min_percent"],
        25,
        "status shows the new threshold"
    );
}

#[test]
fn a_bad_config_is_refused_and_the_daemon_keeps_running_on_the_old_one() {
    let mut env = Env::new("");
    let good = env.toml.clone();
    let d = env.spawn();
    env.drop_file("c/r/a.jpg", &bytes(1, 10_000));
    env.wait(Some(&d), 20, "first synced", || env.count("synced") == 1);

    let bad = good.replace("[upload]\n", "[upload]\nconcurency = 3\n");
    env.write_config(&bad);
    let check = env.cli(&["config", "check"]);
    assert_eq!(check.status.code(), Some(2));
    let check_err = String::from_utf8_lossy(&check.stderr).trim().to_string();
    assert!(check_err.contains("upload.concurency"), "{check_err}");

    // `fieldsync reload` refuses with the same line and exit code.
    let out = env.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), check_err);

    // SIGHUP: the daemon itself refuses, records why, and goes on.
    hup(&d);
    env.wait(Some(&d), 20, "reload refused", || {
        d.log_text()
            .contains("config reload refused; the running configuration stays in force")
    });
    env.drop_file("c/r/b.jpg", &bytes(2, 10_000));
    // (The CLI needs a valid config to read the queue.)
    env.write_config(&good);
    env.wait(Some(&d), 20, "still uploading", || env.count("synced") == 2);
    assert!(env.status()["daemon_running"].as_bool().unwrap());
    let ev = reload_events(&env);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0]["outcome"], "failed");
    let reason = ev[0]["reason"].as_str().unwrap().to_string();
    assert_eq!(format!("fieldsync: {reason}"), check_err);

    // Fixed: the next reload applies.
    let out = env.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

fn creds_file(dir: &Path, secret: &str) -> std::path::PathBuf {
    let p = dir.join("aws-credentials");
    fs::write(
        &p,
        format!("[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {secret}\n"),
    )
    .unwrap();
    p
}

/// An s3 environment whose credentials come from a file holding `secret`.
fn s3_file_env(server: &S3Server, secret: &str, auth_recheck: &str) -> (Env, std::path::PathBuf) {
    let toml = S3Server::remote_toml(&server.endpoint(), "unused", "");
    let mut env = Env::new(&toml);
    let creds = creds_file(env.dir.path(), secret);
    let t = env
        .toml
        .replace(
            &format!("access_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"unused\"\n"),
            &format!("credentials_file = \"{}\"\n", creds.display()),
        )
        .replace(
            "[upload]\n",
            &format!("[upload]\nauth_recheck = \"{auth_recheck}\"\n"),
        );
    env.write_config(&t);
    (env, creds)
}

#[test]
fn credentials_refused_at_start_and_fixed_by_reload_resume_without_restart() {
    let server = S3Server::start();
    let wrong = "WRONG-secret-Rl9vX31pLk";
    // A long re-check interval: only the reload can bring it back in time.
    let (env, creds) = s3_file_env(&server, wrong, "10m");
    for i in 0..2 {
        env.drop_file(&format!("c/r/p{i}.jpg"), &bytes(i, 30_000));
    }
    let d = env.spawn();
    env.wait(Some(&d), 30, "paused with reason auth", || {
        reason(&env).as_deref() == Some("auth")
    });
    creds_file(env.dir.path(), SECRET_KEY);
    assert_eq!(creds, env.dir.path().join("aws-credentials"));
    let out = env.cli(&["reload"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout.contains("remote credentials"), "{stdout}");
    env.wait(Some(&d), 30, "2 synced after the reload", || {
        env.count("synced") == 2
    });
    assert_eq!(server.client().list("").len(), 2);
    assert!(reason(&env).is_none());
    assert_eq!(d.log_text().matches("fieldsync started").count(), 1);
    let seen = format!("{}\n{}", d.log_text(), env.cli_ok(&["events", "--json"]));
    for secret in [wrong, SECRET_KEY] {
        assert!(!seen.contains(secret), "credential leaked");
    }
}

#[test]
fn a_rotated_credentials_file_is_picked_up_when_the_remote_refuses() {
    let server = S3Server::start();
    let wrong = "WRONG-secret-Qm3vX31pLk";
    let (env, _) = s3_file_env(&server, wrong, "1s");
    env.drop_file("c/r/a.jpg", &bytes(1, 30_000));
    let d = env.spawn();
    env.wait(Some(&d), 30, "paused with reason auth", || {
        reason(&env).as_deref() == Some("auth")
    });
    // Rotated on disk, no reload: the next re-check reads the file again.
    creds_file(env.dir.path(), SECRET_KEY);
    env.wait(Some(&d), 30, "synced with the rotated file", || {
        env.count("synced") == 1
    });
    assert!(d.log_text().contains("s3 credentials re-read"));
}

#[test]
fn mqtt_cmd_reload_replies_with_the_outcome() {
    let broker = Broker::start();
    let mut env = Env::new(&broker.agent_config(""));
    let good = env.toml.clone();
    let sub = Sub::new(broker.port, "fieldsync/dev1/#");
    let d = env.spawn();
    env.wait(Some(&d), 30, "online", || {
        sub.last("/state").map(|m| m.text()).as_deref() == Some("online")
    });
    let results = || -> Vec<Value> { sub.on("/cmd/reload/result").iter().map(Msg::json).collect() };
    let t = good.replace("[conditions]\n", "[conditions]\nmetered = \"never\"\n");
    env.write_config(&t);
    sub.publish("fieldsync/dev1/cmd/reload", br#"{"request_id":"r1"}"#);
    env.wait(Some(&d), 30, "reload result", || !results().is_empty());
    let r = &results()[0];
    assert_eq!(r["result"], "ok", "{r}");
    assert_eq!(r["request_id"], "r1");
    assert_eq!(r["message"], "applied: conditions");

    env.write_config(&good.replace("[upload]\n", "[upload]\nconcurency = 3\n"));
    sub.publish("fieldsync/dev1/cmd/reload", br#"{"request_id":"r2"}"#);
    env.wait(Some(&d), 30, "second reload result", || {
        results().len() >= 2
    });
    let r = &results()[1];
    assert_eq!(r["result"], "error", "{r}");
    assert_eq!(r["request_id"], "r2");
    let check = env.cli(&["config", "check"]);
    assert_eq!(
        format!("fieldsync: {}", r["message"].as_str().unwrap()),
        String::from_utf8_lossy(&check.stderr).trim()
    );
    // Events carry both outcomes too (the CLI needs a valid config to read them).
    env.write_config(&good);
    let ev = reload_events(&env);
    assert_eq!(
        ev.iter()
            .map(|e| e["outcome"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["applied", "failed"]
    );
}

#[test]
fn a_fixed_mqtt_password_file_is_used_after_reload_without_restart() {
    const SECRET: &str = "pw-Rl4-never-logged";
    let auth = tempfile::tempdir().unwrap();
    let passwd = auth.path().join("passwd");
    let st = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c", &passwd.display().to_string(), "device", SECRET])
        .status()
        .expect("mosquitto_passwd");
    assert!(st.success());
    let broker = Broker::with_config(&format!(
        "allow_anonymous false\npassword_file {}\n",
        passwd.display()
    ));
    let pw_file = auth.path().join("device.pw");
    fs::write(&pw_file, "wrong-Rl4-password\n").unwrap();
    let env = Env::new(&broker.agent_config(&format!(
        "username = \"device\"\npassword_file = \"{}\"",
        pw_file.display()
    )));
    let sub = Sub::connect(broker.port, "fieldsync/#", Some(("device", SECRET)), false);
    let d = env.spawn();
    env.wait(Some(&d), 30, "wrong password refused", || {
        d.log_text().contains("broker refused the connection")
    });
    fs::write(&pw_file, format!("{SECRET}\n")).unwrap();
    let out = env.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("mqtt credentials"));
    env.wait(Some(&d), 60, "online with the fixed password", || {
        sub.last("fieldsync/dev1/state")
            .map(|m| m.text())
            .as_deref()
            == Some("online")
    });
    assert_eq!(d.log_text().matches("fieldsync started").count(), 1);
    assert!(!d.log_text().contains(SECRET));
}

#[test]
fn a_rotated_device_token_file_is_picked_up_without_restart() {
    const TOKEN: &str = "device-token-Rl2mZ0pXw";
    let server = S3Server::start();
    let presign = PresignService::start(&server.endpoint(), TOKEN);
    let env = Env::new(&format!(
        "[remote]\nkind = \"http\"\nprefix = \"fs\"\n\n[remote.http]\nendpoint = \"{}\"\ntoken_file = \"TOKEN_FILE\"\nconnect_timeout = \"2s\"\nread_timeout = \"5s\"\n",
        presign.endpoint()
    ));
    let token_file = env.dir.path().join("device-token");
    fs::write(&token_file, "expired-token-Xx9\n").unwrap();
    let mut env = env;
    let t = env
        .toml
        .replace("TOKEN_FILE", &token_file.display().to_string())
        .replace("[upload]\n", "[upload]\nauth_recheck = \"1s\"\n");
    env.write_config(&t);
    env.drop_file("c/r/a.jpg", &bytes(1, 20_000));
    let d = env.spawn();
    env.wait(Some(&d), 30, "paused with reason auth", || {
        reason(&env).as_deref() == Some("auth")
    });
    fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    env.wait(Some(&d), 30, "synced with the rotated token", || {
        env.count("synced") == 1
    });
    assert!(d.log_text().contains("device token re-read"));
    assert!(!d.log_text().contains(TOKEN));
    assert_eq!(d.log_text().matches("fieldsync started").count(), 1);

    // A token file that is gone refuses the reload with the one line of every
    // configuration error: the file, the key, what is wrong.
    let gone = env.dir.path().join("no-such-token");
    env.edit_config(
        &token_file.display().to_string(),
        &gone.display().to_string(),
    );
    let out = env.cli(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "fieldsync: config {}: key `remote.http.token_file`: {}: ",
            env.config.display(),
            gone.display()
        )),
        "{err}"
    );
    assert!(!err.contains(TOKEN), "{err}");
}

fn limit(env: &Env) -> Value {
    env.status()["conditions"]["bandwidth"]["limit_bytes_per_s"].clone()
}

/// Rewrites the config with `bandwidth_limit` (`None`: no such key) and a probe interval
/// long enough that only the reload can have put the new limit in force.
fn with_limit(env: &mut Env, base: &str, rate: Option<&str>) {
    let key = rate.map_or(String::new(), |r| format!("bandwidth_limit = \"{r}\"\n"));
    env.write_config(&base.replace(
        "[conditions]\n",
        &format!("[conditions]\nprobe_interval = \"1m\"\n{key}"),
    ));
}

fn reload_applies_conditions(env: &Env) {
    let out = env.cli(&["reload"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout.contains("applied: conditions"), "{stdout}");
}

/// Drops a photo of `len` bytes and returns how long it took to be synced.
fn time_to_sync(env: &Env, d: &Daemon, name: &str, len: usize, synced: i64) -> Duration {
    let t0 = Instant::now();
    env.drop_file(&format!("c/r/{name}"), &bytes(len as u64, len));
    env.wait(Some(d), 60, &format!("{name} synced"), || {
        env.count("synced") == synced
    });
    t0.elapsed()
}

#[test]
fn a_bandwidth_limit_added_by_reload_is_in_status_and_paces_the_next_photo_at_once() {
    let mut env = Env::new("");
    let base = env.toml.clone();
    with_limit(&mut env, &base, None);
    let d = env.spawn();
    time_to_sync(&env, &d, "a.jpg", 1_000_000, 1);
    assert_eq!(limit(&env), Value::Null);

    with_limit(&mut env, &base, Some("200k"));
    reload_applies_conditions(&env);
    // At once: no probe round (a minute away) and no status heartbeat needed.
    assert_eq!(limit(&env), 200_000);
    let text = env.cli_ok(&["status"]);
    assert!(text.contains("bandwidth 200.0 kB/s"), "{text}");
    // 1 MB at 200 kB/s is 5 s; unthrottled it is a fraction of a second. A loaded machine
    // only makes it slower, so only the lower bound is asserted (with slack for the
    // limiter's burst and the last chunk).
    let took = time_to_sync(&env, &d, "b.jpg", 1_000_000, 2);
    eprintln!("1 MB photo dropped after the reload to 200k took {took:.2?}");
    assert!(
        took >= Duration::from_secs(3),
        "took {took:?}: not paced by the reloaded limit\n{}",
        env.dump(Some(&d))
    );

    // A changed limit is shown at once too.
    with_limit(&mut env, &base, Some("1MB"));
    reload_applies_conditions(&env);
    assert_eq!(limit(&env), 1_000_000);
    assert_eq!(d.log_text().matches("fieldsync started").count(), 1);
}

#[test]
fn a_bandwidth_limit_removed_by_reload_is_gone_from_status_and_transfers_at_once() {
    let mut env = Env::new("");
    let base = env.toml.clone();
    with_limit(&mut env, &base, Some("200k"));
    let d = env.spawn();
    env.wait(Some(&d), 20, "the limit in status", || {
        limit(&env) == 200_000
    });

    with_limit(&mut env, &base, None);
    reload_applies_conditions(&env);
    assert_eq!(limit(&env), Value::Null);
    let text = env.cli_ok(&["status"]);
    assert!(text.contains("bandwidth unlimited"), "{text}");
    // 4 MB at the old 200 kB/s would take 20 s; without a limit it is a local copy.
    let took = time_to_sync(&env, &d, "big.jpg", 4_000_000, 1);
    eprintln!("4 MB photo dropped after removing the limit took {took:.2?}");
    assert!(
        took < Duration::from_secs(12),
        "took {took:?}: still paced by the removed limit\n{}",
        env.dump(Some(&d))
    );
}

#[test]
fn a_reloaded_archived_cache_limit_is_applied_and_named_retention() {
    let mut env = Env::new("");
    let t = format!("{}\n[retention]\narchived_cache_limit = 100\n", env.toml);
    env.write_config(&t);
    let d = env.spawn();
    let files: Vec<_> = (0..3u64)
        .map(|i| env.drop_file(&format!("c/r/{i}.jpg"), &bytes(70 + i, 2_000)))
        .collect();
    env.wait(Some(&d), 20, "3 synced", || env.count("synced") == 3);
    // A checklist that names none of them archives all three; their files then go, so
    // nothing but the cache limit keeps the records.
    write(
        &env.capture.join("c/checklist.json"),
        r#"{"rows": [{"id": "r", "photos": []}]}"#,
    );
    env.wait(Some(&d), 20, "3 archived", || env.count("archived") == 3);
    for f in &files {
        fs::remove_file(f).unwrap();
    }
    env.write_config(&t.replace("archived_cache_limit = 100", "archived_cache_limit = 1"));
    let out = env.cli_ok(&["reload"]);
    assert!(out.contains("applied: retention"), "{out}");
    env.wait(Some(&d), 20, "2 records expired", || {
        env.events()
            .iter()
            .filter(|e| e["kind"] == "expired")
            .count()
            == 2
    });
    assert_eq!(env.count("archived"), 1, "{}", env.dump(Some(&d)));
}
