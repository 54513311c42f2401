//! Fleet reporting against a real mosquitto broker and the real binary: state and last
//! will, status snapshots, the event stream, remote commands, broker outages, TLS,
//! credentials, CBOR, and `fieldsync fleet`.

mod common;

use std::collections::HashSet;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::mqtt::{make_pki, Broker, Msg, Sub};
use common::*;
use serde_json::Value;

/// Waits for `cond`; on timeout prints the agent's view, what the subscriber received and
/// the broker's log.
fn wait(
    env: &Env,
    d: &Daemon,
    sub: &Sub,
    broker: &Broker,
    secs: u64,
    what: &str,
    cond: impl FnMut() -> bool,
) {
    wait_for(Duration::from_secs(secs), what, cond, || {
        format!(
            "{}\n--- mqtt messages\n{}\n--- broker log\n{}",
            env.dump(Some(d)),
            sub.dump(),
            broker.log_text()
        )
    });
}

fn state_is(sub: &Sub, want: &str) -> bool {
    sub.last("/state").map(|m| m.text()).as_deref() == Some(want)
}

fn status_where(sub: &Sub, f: impl Fn(&Value) -> bool) -> bool {
    sub.last("/status").is_some_and(|m| f(&m.json()))
}

fn events(sub: &Sub, kind: &str) -> Vec<Value> {
    sub.on("/events")
        .iter()
        .map(Msg::json)
        .filter(|e| e["kind"] == kind)
        .collect()
}

fn results(sub: &Sub, command: &str) -> Vec<Value> {
    sub.on(&format!("/cmd/{command}/result"))
        .iter()
        .map(Msg::json)
        .collect()
}

/// Both values have the same keys at every level of nesting (objects only).
fn assert_same_shape(a: &Value, b: &Value, path: &str) {
    if let (Value::Object(x), Value::Object(y)) = (a, b) {
        let kx: HashSet<_> = x.keys().collect();
        let ky: HashSet<_> = y.keys().collect();
        assert_eq!(kx, ky, "keys differ at {path}");
        for k in x.keys() {
            assert_same_shape(&x[k], &y[k], &format!("{path}.{k}"));
        }
    }
}

#[test]
fn status_converges_to_all_synced_with_one_uploaded_event_per_photo() {
    let broker = Broker::start();
    let env = Env::new(&broker.agent_config(""));
    let sub = Sub::new(broker.port, "fieldsync/dev1/#");
    let d = env.spawn();
    wait(&env, &d, &sub, &broker, 30, "state online", || {
        state_is(&sub, "online")
    });
    for i in 0..6u64 {
        env.drop_file(
            &format!("pump-{}/row-{i}/IMG_{i}.jpg", i % 2),
            &bytes(i, 20_000),
        );
    }
    wait(
        &env,
        &d,
        &sub,
        &broker,
        60,
        "status: 6 synced, 0 pending",
        || {
            status_where(&sub, |s| {
                s["counts"]["synced"]["count"] == 6 && s["pending"]["count"] == 0
            })
        },
    );
    wait(&env, &d, &sub, &broker, 30, "6 uploaded events", || {
        events(&sub, "uploaded").len() >= 6
    });

    // The status topic carries what `fieldsync status --json` prints.
    let mqtt_status = sub.last("/status").unwrap().json();
    let cli = env.status();
    assert_same_shape(&mqtt_status, &cli, "status");
    assert_eq!(mqtt_status["counts"], cli["counts"]);
    assert_eq!(mqtt_status["device_id"], "dev1");
    assert_eq!(mqtt_status["daemon_running"], true);
    // Device health: the daemon's own memory and CPU time, in both (the CLI reads the
    // daemon's process, not its own).
    for (who, s) in [("mqtt", &mqtt_status), ("cli", &cli)] {
        let d = &s["device"];
        assert!(d["rss_bytes"].as_u64().is_some_and(|r| r > 0), "{who}: {d}");
        assert!(d["cpu_s"].as_f64().is_some(), "{who}: {d}");
        assert!(d["uptime_s"].as_u64().is_some_and(|u| u > 0), "{who}: {d}");
        let mem = (
            d["mem_available_bytes"].as_u64(),
            d["mem_total_bytes"].as_u64(),
        );
        assert!(
            matches!(mem, (Some(a), Some(t)) if a <= t && t > 0),
            "{who}: {d}"
        );
        assert!(d["load_1m"].as_f64().is_some(), "{who}: {d}");
    }
    assert!(env.cli_ok(&["status"]).contains("\ndevice: up "));

    // Snapshots converge: the synced count never goes backwards.
    let synced: Vec<i64> = sub
        .on("/status")
        .iter()
        .map(|m| m.json()["counts"]["synced"]["count"].as_i64().unwrap())
        .collect();
    assert!(synced.windows(2).all(|w| w[0] <= w[1]), "{synced:?}");

    // Exactly one `uploaded` event per photo, each naming its photo's checklist and row.
    let uploaded = events(&sub, "uploaded");
    assert_eq!(uploaded.len(), 6, "{}", sub.dump());
    let list = env.list();
    let ids: HashSet<&str> = uploaded
        .iter()
        .map(|e| e["attachment_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 6, "no duplicates");
    for a in &list {
        let e = uploaded
            .iter()
            .find(|e| e["attachment_id"] == a["id"])
            .unwrap_or_else(|| panic!("no uploaded event for {}", a["id"]));
        assert_eq!(e["checklist"], a["checklist"]);
        assert_eq!(e["row"], a["row"]);
        assert!(e["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(e["to_state"], "synced");
    }
    // Events arrive in log order.
    let seqs: Vec<i64> = sub
        .on("/events")
        .iter()
        .map(|m| m.json()["seq"].as_i64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
}

#[test]
fn kill_publishes_lost_and_clean_stop_publishes_offline() {
    let broker = Broker::start();
    let env = Env::new(&broker.agent_config(""));
    let sub = Sub::new(broker.port, "fieldsync/dev1/#");
    let mut d = env.spawn();
    wait(&env, &d, &sub, &broker, 30, "state online", || {
        state_is(&sub, "online")
    });
    d.kill9();
    wait(&env, &d, &sub, &broker, 30, "last will `lost`", || {
        state_is(&sub, "lost")
    });

    // What happens while the agent is down is sent when it is back, in order.
    env.cli_ok(&["pause"]);
    env.cli_ok(&["resume"]);
    let mut d = env.spawn();
    wait(&env, &d, &sub, &broker, 30, "online again", || {
        state_is(&sub, "online")
    });
    wait(
        &env,
        &d,
        &sub,
        &broker,
        30,
        "events from while it was down",
        || !events(&sub, "resume_requested").is_empty(),
    );
    let (p, r) = (
        &events(&sub, "pause_requested")[0],
        &events(&sub, "resume_requested")[0],
    );
    assert_eq!(
        (p["reason"].as_str(), r["reason"].as_str()),
        (Some("cli"), Some("cli"))
    );
    assert!(p["seq"].as_i64() < r["seq"].as_i64());
    let (code, _) = d.terminate();
    assert_eq!(code, Some(0), "{}", d.log_text());
    wait(
        &env,
        &d,
        &sub,
        &broker,
        30,
        "`offline` after SIGTERM",
        || state_is(&sub, "offline"),
    );
    // The final status says the daemon stopped, as `fieldsync status` would.
    let last = sub.last("/status").unwrap().json();
    assert_eq!(last["daemon_running"], false);
    assert_eq!(last["pause_reason"], "not_running");
    assert!(last["device"].is_object(), "{last}");
    // A dashboard connecting later sees `offline`, retained.
    let late = Sub::new(broker.port, "fieldsync/dev1/state");
    wait(&env, &d, &late, &broker, 20, "retained offline", || {
        late.last("/state")
            .is_some_and(|m| m.retain && m.text() == "offline")
    });
    let states: Vec<String> = sub.on("/state").iter().map(Msg::text).collect();
    assert_eq!(
        states[states.len() - 2..],
        ["online".to_string(), "offline".to_string()],
        "a clean stop must not fire the will: {states:?}"
    );
}

#[test]
fn broker_outage_uploads_go_on_and_status_is_current_after_reconnect() {
    let mut broker = Broker::start();
    let env = Env::new(&broker.agent_config(""));
    // A persistent session: it also receives what is published right after the restart.
    let sub = Sub::persistent(broker.port, "fieldsync/dev1/#");
    let d = env.spawn();
    wait(&env, &d, &sub, &broker, 30, "online with a status", || {
        state_is(&sub, "online") && sub.last("/status").is_some()
    });

    broker.stop();
    let before_all = sub.all().len();
    for i in 0..3u64 {
        env.drop_file(&format!("c/r/offline-{i}.jpg"), &bytes(100 + i, 30_000));
    }
    env.wait(Some(&d), 60, "3 synced while the broker is down", || {
        env.count("synced") == 3
    });
    let before = sub.on("/events").len();
    broker.restart();

    wait(
        &env,
        &d,
        &sub,
        &broker,
        90,
        "current status after reconnect",
        || status_where(&sub, |s| s["counts"]["synced"]["count"] == 3),
    );
    wait(
        &env,
        &d,
        &sub,
        &broker,
        30,
        "the outage's uploads as events",
        || {
            let ids: HashSet<String> = events(&sub, "uploaded")
                .iter()
                .map(|e| e["attachment_id"].to_string())
                .collect();
            ids.len() == 3
        },
    );
    assert!(state_is(&sub, "online"));
    // README "MQTT": on reconnect `online`, then the current status, then the events it
    // could not deliver. The persistent session records the order on the broker's side:
    // what the agent publishes after the restart is queued for it as the broker received
    // it, whether the subscriber reconnected first or not, and no retained copy from
    // before the outage mixes in (retained messages come only on SUBSCRIBE).
    let all = sub.all();
    // From the reconnect's `online` on (a message the broker had not yet delivered when
    // it stopped may be redelivered first).
    let online = all[before_all..]
        .iter()
        .position(|m| m.topic.ends_with("/state") && m.text() == "online")
        .unwrap_or_else(|| panic!("no `online` after the restart:\n{}", sub.dump()));
    let since = &all[before_all + online..];
    let first = |suffix: &str| since.iter().position(|m| m.topic.ends_with(suffix));
    let status =
        first("/status").unwrap_or_else(|| panic!("no status after the restart:\n{}", sub.dump()));
    let event = first("/events").expect("events");
    let order: Vec<String> = since
        .iter()
        .map(|m| m.topic.rsplit('/').next().unwrap_or_default().to_string())
        .collect();
    assert!(
        status < event,
        "expected online, then the status, then the backlog; got {order:?}"
    );
    // And that first status is the current one: all three are synced in it.
    assert_eq!(since[status].json()["counts"]["synced"]["count"], 3);
    let after: Vec<i64> = sub.on("/events")[before..]
        .iter()
        .map(|m| m.json()["seq"].as_i64().unwrap())
        .collect();
    assert!(after.windows(2).all(|w| w[0] < w[1]), "in order: {after:?}");
    assert!(
        d.log_text().contains("mqtt connection lost"),
        "{}",
        d.log_text()
    );

    // A dashboard connecting now gets the current snapshot as the retained status.
    let late = Sub::new(broker.port, "fieldsync/dev1/status");
    wait(&env, &d, &late, &broker, 20, "retained status", || {
        late.last("/status").is_some()
    });
    let first = &late.on("/status")[0];
    assert!(first.retain);
    assert_eq!(first.json()["counts"]["synced"]["count"], 3);
}

#[test]
fn commands_pause_resume_retry_and_refuse_garbage() {
    let broker = Broker::start();
    let mut env = Env::new(&broker.agent_config(""));
    // An unreadable photo needs a daemon that permission bits apply to.
    if is_root() {
        env.run_as = Some(65534);
        chown_tree(env.dir.path(), 65534);
    }
    let sub = Sub::new(broker.port, "fieldsync/dev1/#");
    let d = env.spawn();
    wait(&env, &d, &sub, &broker, 30, "online", || {
        state_is(&sub, "online")
    });
    let cmd =
        |name: &str, payload: &[u8]| sub.publish(&format!("fieldsync/dev1/cmd/{name}"), payload);

    // A photo the agent cannot read: recorded as failed.
    let staged = env.dir.path().join("locked.jpg");
    fs::write(&staged, bytes(1, 10_000)).unwrap();
    fs::set_permissions(&staged, fs::Permissions::from_mode(0o000)).unwrap();
    fs::create_dir_all(env.capture.join("c1/r1")).unwrap();
    let locked = env.capture.join("c1/r1/locked.jpg");
    fs::rename(&staged, &locked).unwrap();
    wait(&env, &d, &sub, &broker, 30, "status: 1 failed", || {
        status_where(&sub, |s| s["counts"]["failed"]["count"] == 1)
    });

    // pause: uploads stop, the status says why.
    cmd("pause", br#"{"request_id":"p1"}"#);
    wait(&env, &d, &sub, &broker, 30, "pause result", || {
        !results(&sub, "pause").is_empty()
    });
    let r = &results(&sub, "pause")[0];
    assert_eq!(
        (r["result"].as_str(), r["request_id"].as_str()),
        (Some("ok"), Some("p1"))
    );
    wait(
        &env,
        &d,
        &sub,
        &broker,
        30,
        "status paused by operator",
        || {
            status_where(&sub, |s| {
                s["paused"] == true && s["pause_reason"] == "paused_by_operator"
            })
        },
    );
    env.drop_file("c1/r2/waiting.jpg", &bytes(2, 10_000));
    wait(&env, &d, &sub, &broker, 30, "status: 1 pending", || {
        status_where(&sub, |s| s["pending"]["count"] == 1)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(env.count("synced"), 0, "paused: nothing uploads");

    // resume: the waiting photo uploads.
    cmd("resume", b"");
    wait(&env, &d, &sub, &broker, 30, "resumed and 1 synced", || {
        status_where(&sub, |s| {
            s["paused"] == false && s["counts"]["synced"]["count"] == 1
        })
    });
    assert_eq!(results(&sub, "resume")[0]["result"], "ok");

    // retry: requeues the failed photo, which now uploads.
    let failed_id = env.list_state("failed")[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o644)).unwrap();
    cmd("retry", br#"{"failed":true,"request_id":"r1"}"#);
    wait(&env, &d, &sub, &broker, 30, "retried photo synced", || {
        status_where(&sub, |s| {
            s["counts"]["synced"]["count"] == 2 && s["counts"]["failed"]["count"] == 0
        })
    });
    let r = &results(&sub, "retry")[0];
    assert_eq!(r["result"], "ok", "{r}");
    assert_eq!(r["requeued"], serde_json::json!([failed_id]));
    assert_eq!(r["request_id"], "r1");

    // Wrong or garbage commands get an error result; the agent keeps answering.
    cmd("retry", format!(r#"{{"id":"{failed_id}"}}"#).as_bytes());
    cmd("pause", b"\xff\x00\x13 not a command");
    cmd("retry", br#"{"id": 5}"#);
    cmd("reboot", b"");
    wait(&env, &d, &sub, &broker, 30, "error results", || {
        results(&sub, "retry").len() == 3
            && results(&sub, "pause").len() == 2
            && results(&sub, "reboot").len() == 1
    });
    let retry = results(&sub, "retry");
    assert_eq!(retry[1]["result"], "error");
    assert!(
        retry[1]["message"].as_str().unwrap().contains("synced"),
        "{}",
        retry[1]
    );
    assert_eq!(retry[2]["result"], "error");
    assert_eq!(results(&sub, "pause")[1]["result"], "error");
    assert!(results(&sub, "reboot")[0]["message"]
        .as_str()
        .unwrap()
        .contains("unknown command"));
    cmd("sync", b"");
    wait(&env, &d, &sub, &broker, 30, "sync ok", || {
        results(&sub, "sync")
            .first()
            .is_some_and(|r| r["result"] == "ok")
    });
    assert!(
        !results(&sub, "pause")[1]["message"]
            .as_str()
            .unwrap()
            .contains('\n'),
        "one-line errors"
    );

    // The event stream tells the story, with the pause source and reasons.
    wait(
        &env,
        &d,
        &sub,
        &broker,
        30,
        "pause/resume/retry events",
        || !events(&sub, "retried").is_empty() && !events(&sub, "resumed").is_empty(),
    );
    assert_eq!(events(&sub, "pause_requested")[0]["reason"], "mqtt");
    assert_eq!(events(&sub, "paused")[0]["reason"], "paused_by_operator");
    assert_eq!(
        events(&sub, "failed")[0]["attachment_id"],
        failed_id.as_str()
    );
    assert_eq!(
        events(&sub, "retried")[0]["attachment_id"],
        failed_id.as_str()
    );
}

#[test]
fn tls_with_the_right_ca_connects_and_a_wrong_one_is_refused() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = make_pki(pki_dir.path());
    let tls = |extra: &str| {
        format!(
            "cafile {}\ncertfile {}\nkeyfile {}\n{extra}",
            pki.ca().display(),
            pki.path("server.pem").display(),
            pki.path("server.key").display()
        )
    };
    let broker = Broker::with_config(&format!(
        "listener {{port2}} 127.0.0.1\n{}\nlistener {{port3}} 127.0.0.1\n{}\n",
        tls(""),
        tls("require_certificate true\n")
    ));
    let (tls_port, mtls_port) = (broker.extra_ports[0], broker.extra_ports[1]);
    let agent = |name: &str, port: u16, extra: &str| {
        Env::new(&format!(
            "[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\ntls = true\nclient_id = \"{name}\"\n\
             topic_prefix = \"fieldsync/{name}\"\n{extra}\n"
        ))
    };
    let ca = format!("ca_file = \"{}\"", pki.ca().display());
    let wrong_ca = format!("ca_file = \"{}\"", pki.path("wrong-ca.pem").display());
    let client_cert = format!(
        "client_cert = \"{}\"\nclient_key = \"{}\"",
        pki.path("client.pem").display(),
        pki.path("client.key").display()
    );
    let ok = agent("tls-ok", tls_port, &ca);
    let wrong = agent("tls-wrong", tls_port, &wrong_ca);
    let mtls_ok = agent("mtls-ok", mtls_port, &format!("{ca}\n{client_cert}"));
    let mtls_none = agent("mtls-none", mtls_port, &ca);

    let sub = Sub::new(broker.port, "fieldsync/#");
    let d_ok = ok.spawn();
    let d_wrong = wrong.spawn();
    let d_mtls = mtls_ok.spawn();
    let d_none = mtls_none.spawn();
    let topic_state = |name: &str| {
        sub.all()
            .into_iter()
            .filter(|m| m.topic == format!("fieldsync/{name}/state"))
            .map(|m| m.text())
            .next_back()
    };
    wait(&ok, &d_ok, &sub, &broker, 30, "TLS agent online", || {
        topic_state("tls-ok").as_deref() == Some("online")
    });
    wait(
        &mtls_ok,
        &d_mtls,
        &sub,
        &broker,
        30,
        "client-cert agent online",
        || topic_state("mtls-ok").as_deref() == Some("online"),
    );
    wait(
        &wrong,
        &d_wrong,
        &sub,
        &broker,
        30,
        "wrong CA refused in the log",
        || d_wrong.log_text().contains("mqtt cannot connect"),
    );
    let log = d_wrong.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("mqtt cannot connect"))
        .unwrap();
    assert!(
        line.contains("TLS: invalid peer certificate: UnknownIssuer"),
        "{line}"
    );
    wait(
        &mtls_none,
        &d_none,
        &sub,
        &broker,
        30,
        "missing client cert refused",
        || d_none.log_text().contains("mqtt cannot connect"),
    );
    let log = d_none.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("mqtt cannot connect"))
        .unwrap();
    assert!(
        line.contains("TLS: received fatal alert: CertificateRequired"),
        "{line}"
    );
    assert_eq!(topic_state("tls-wrong"), None);
    assert_eq!(topic_state("mtls-none"), None);
    // Uploads do not depend on the broker: the refused agent still uploads.
    wrong.drop_file("c/r/a.jpg", &bytes(5, 5000));
    wrong.wait(Some(&d_wrong), 30, "upload without MQTT", || {
        wrong.count("synced") == 1
    });
}

#[test]
fn password_is_used_and_never_logged() {
    const SECRET: &str = "pw-Zq8-never-logged";
    const WRONG: &str = "wrong-Kx7-never-logged";
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
    fs::write(&pw_file, format!("{SECRET}\n")).unwrap();
    let good = Env::new(&broker.agent_config(&format!(
        "username = \"device\"\npassword_file = \"{}\"",
        pw_file.display()
    )));
    let bad = Env::new(&broker.agent_config(&format!(
        "username = \"device\"\npassword = \"{WRONG}\"\nclient_id = \"bad\"\ntopic_prefix = \"fieldsync/bad\""
    )));
    let sub = Sub::connect(broker.port, "fieldsync/#", Some(("device", SECRET)), false);
    let d_good = good.spawn();
    let d_bad = bad.spawn();
    wait(
        &good,
        &d_good,
        &sub,
        &broker,
        30,
        "authenticated agent online",
        || state_is(&sub, "online"),
    );
    wait(
        &bad,
        &d_bad,
        &sub,
        &broker,
        30,
        "bad password refused",
        || d_bad.log_text().contains("broker refused the connection"),
    );
    // The logs run at debug level; `config check` and status must not leak either.
    for (env, d) in [(&good, &d_good), (&bad, &d_bad)] {
        let mut seen = d.log_text();
        for args in [&["config", "check"][..], &["status", "--json"][..]] {
            let out = env.cli(args);
            seen.push_str(&String::from_utf8_lossy(&out.stdout));
            seen.push_str(&String::from_utf8_lossy(&out.stderr));
        }
        assert!(!seen.contains(SECRET) && !seen.contains(WRONG), "{seen}");
    }
    // A bad config error names the key, not the value.
    let broken = Env::new(&broker.agent_config(&format!("password = \"{WRONG}\"")));
    let out = broken.cli(&["config", "check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mqtt.username"), "{err}");
    assert!(!err.contains(WRONG), "{err}");
}

#[test]
fn cbor_status_decodes_to_the_json_snapshot() {
    let broker = Broker::start();
    let env = Env::new(&broker.agent_config("format = \"cbor\""));
    let sub = Sub::new(broker.port, "fieldsync/dev1/#");
    let d = env.spawn();
    let cbor = |m: &Msg| -> Value {
        ciborium::from_reader(m.payload.as_slice())
            .unwrap_or_else(|e| panic!("{} is not CBOR: {e}", m.topic))
    };
    env.drop_file("c/r/IMG_1.jpg", &bytes(9, 50_000));
    wait(&env, &d, &sub, &broker, 60, "CBOR status: 1 synced", || {
        sub.last("/status")
            .is_some_and(|m| cbor(&m)["counts"]["synced"]["count"] == 1)
    });
    let from_mqtt = cbor(&sub.last("/status").unwrap());
    let from_cli = env.status();
    assert_same_shape(&from_mqtt, &from_cli, "status");
    for key in [
        "schema",
        "device_id",
        "counts",
        "paused",
        "pause_reason",
        "remote",
        "daemon_running",
    ] {
        assert_eq!(from_mqtt[key], from_cli[key], "{key}");
    }
    assert_eq!(
        from_mqtt["last_success"]["attachment_id"],
        from_cli["last_success"]["attachment_id"]
    );
    // Events are CBOR too, with the JSON field names.
    wait(&env, &d, &sub, &broker, 30, "CBOR uploaded event", || {
        sub.on("/events")
            .iter()
            .any(|m| cbor(m)["kind"] == "uploaded")
    });
    let ev = sub
        .on("/events")
        .iter()
        .map(cbor)
        .find(|e| e["kind"] == "uploaded")
        .unwrap();
    assert_eq!(ev["attachment_id"], env.list()[0]["id"]);
    // The state stays plain text, like the last will.
    assert!(state_is(&sub, "online"));
}

#[test]
fn fleet_json_shows_both_devices() {
    let broker = Broker::start();
    let one = Env::new(&broker.agent_config(""));
    let mut two = Env::new(&broker.agent_config(""));
    two.write_config(
        &two.toml
            .replace("device_id = \"dev1\"", "device_id = \"dev2\""),
    );
    let sub = Sub::new(broker.port, "fieldsync/+/status");
    let d1 = one.spawn();
    let mut d2 = two.spawn();
    one.drop_file("c/r/IMG_1.jpg", &bytes(1, 10_000));
    wait(
        &one,
        &d1,
        &sub,
        &broker,
        60,
        "dev1 synced, dev2 reporting",
        || {
            let s = sub.on("/status");
            s.iter().any(|m| {
                m.topic == "fieldsync/dev1/status" && m.json()["counts"]["synced"]["count"] == 1
            }) && s.iter().any(|m| m.topic == "fieldsync/dev2/status")
        },
    );
    let broker_arg = format!("127.0.0.1:{}", broker.port);
    let out = one.cli_ok(&["fleet", "--broker", &broker_arg, "--json"]);
    let devices: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(devices.len(), 2, "{out}");
    assert_eq!(devices[0]["device_id"], "dev1");
    assert_eq!(devices[1]["device_id"], "dev2");
    for d in &devices {
        assert_eq!(d["state"], "online", "{out}");
        assert_eq!(d["pending_count"], 0);
        assert!(d["status"]["counts"].is_object());
    }
    assert!(devices[0]["last_upload"].is_string());
    assert!(devices[1]["last_upload"].is_null());

    // After a clean stop, the table shows the device offline.
    d2.terminate();
    wait_for(
        Duration::from_secs(30),
        "dev2 offline in the fleet table",
        || {
            let table = one.cli_ok(&["fleet", "--broker", &broker_arg, "--wait", "1s"]);
            table.lines().count() == 3
                && table
                    .lines()
                    .any(|l| l.starts_with("dev2 ") && l.contains("offline"))
        },
        || broker.log_text(),
    );
    // A broker that is not there is one clear error line.
    let dead = common::mqtt::free_ports(1)[0];
    let out = one.cli(&["fleet", "--broker", &format!("127.0.0.1:{dead}")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("connection refused"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn uploads_go_on_while_the_broker_is_a_black_hole() {
    // Accepts TCP connections and never answers: the worst broker for a client that
    // waits on it.
    let hole = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hole.local_addr().unwrap().port();
    let _accepting = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in hole.incoming().flatten() {
            held.push(s);
        }
    });
    let env = Env::new(&format!(
        "[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nkeep_alive = \"5s\"\n"
    ));
    let d = env.spawn();
    for i in 0..10u64 {
        env.drop_file(&format!("c/r/IMG_{i}.jpg"), &bytes(i, 40_000));
    }
    env.wait(Some(&d), 60, "10 synced despite the broker", || {
        env.count("synced") == 10
    });
    env.wait(Some(&d), 30, "the broker problem in the log", || {
        d.log_text().contains("mqtt cannot connect")
    });
}

/// The `alarm` / `alarm_cleared` events whose reason starts with `code`, as MQTT carried
/// them and as `fieldsync events` lists them.
fn alarms(env: &Env, sub: &Sub, kind: &str, code: &str) -> (Vec<Value>, Vec<Value>) {
    let of = |e: &Value| e["kind"] == kind && e["reason"].as_str().unwrap_or("").starts_with(code);
    let pushed = events(sub, kind).into_iter().filter(|e| of(e)).collect();
    let logged = env.events().into_iter().filter(|e| of(e)).collect();
    (pushed, logged)
}

#[test]
fn a_failed_photo_raises_one_alarm_and_its_upload_clears_it() {
    let broker = Broker::start();
    let mut env = Env::new(&broker.agent_config(""));
    // An unreadable photo needs a daemon that permission bits apply to.
    if is_root() {
        env.run_as = Some(65534);
        chown_tree(env.dir.path(), 65534);
    }
    let sub = Sub::new(broker.port, "fieldsync/dev1/#");
    let d = env.spawn();
    wait(&env, &d, &sub, &broker, 30, "online", || {
        state_is(&sub, "online")
    });
    let staged = env.dir.path().join("locked.jpg");
    fs::write(&staged, bytes(1, 10_000)).unwrap();
    fs::set_permissions(&staged, fs::Permissions::from_mode(0o000)).unwrap();
    fs::create_dir_all(env.capture.join("c1/r1")).unwrap();
    let locked = env.capture.join("c1/r1/locked.jpg");
    fs::rename(&staged, &locked).unwrap();
    env.drop_file("c1/r1/fine.jpg", &bytes(2, 10_000));
    wait(
        &env,
        &d,
        &sub,
        &broker,
        30,
        "a failed alarm on MQTT",
        || !alarms(&env, &sub, "alarm", "failed").0.is_empty(),
    );
    let failed = env.list_state("failed");
    assert_eq!(failed.len(), 1);
    let id = failed[0]["id"].clone();
    // Once per episode, however long it lasts.
    std::thread::sleep(Duration::from_secs(3));
    let (pushed, logged) = alarms(&env, &sub, "alarm", "failed");
    assert_eq!(pushed.len(), 1, "{pushed:?}");
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(pushed[0]["attachment_id"], id);
    assert_eq!(pushed[0]["checklist"], "c1");
    assert!(
        pushed[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("failed: read_error: "),
        "{pushed:?}"
    );
    assert!(alarms(&env, &sub, "alarm_cleared", "failed").0.is_empty());

    // Fixed and retried: it uploads, and the episode ends.
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o644)).unwrap();
    env.cli_ok(&["retry", "--failed"]);
    wait(&env, &d, &sub, &broker, 30, "alarm_cleared on MQTT", || {
        !alarms(&env, &sub, "alarm_cleared", "failed").0.is_empty()
    });
    assert_eq!(env.count("synced"), 2);
    let (pushed, logged) = alarms(&env, &sub, "alarm_cleared", "failed");
    assert_eq!((pushed.len(), logged.len()), (1, 1), "{pushed:?}");
    assert_eq!(pushed[0]["attachment_id"], id);
    assert_eq!(pushed[0]["reason"], "failed: now synced");
    assert_eq!(alarms(&env, &sub, "alarm", "failed").0.len(), 1);
}

#[test]
fn a_photo_pending_too_long_raises_one_alarm_until_it_uploads() {
    let broker = Broker::start();
    let mut env = Env::new(&broker.agent_config(""));
    env.edit_config("[upload]\n", "[upload]\npending_alarm_after = \"2s\"\n");
    let sub = Sub::new(broker.port, "fieldsync/dev1/#");
    env.cli_ok(&["pause"]);
    let d = env.spawn();
    wait(&env, &d, &sub, &broker, 30, "online", || {
        state_is(&sub, "online")
    });
    env.drop_file("c1/r1/waiting.jpg", &bytes(3, 10_000));
    wait(&env, &d, &sub, &broker, 30, "pending_too_old alarm", || {
        !alarms(&env, &sub, "alarm", "pending_too_old").0.is_empty()
    });
    std::thread::sleep(Duration::from_secs(3));
    let (pushed, logged) = alarms(&env, &sub, "alarm", "pending_too_old");
    assert_eq!((pushed.len(), logged.len()), (1, 1), "{pushed:?}");
    assert!(
        pushed[0]["reason"]
            .as_str()
            .unwrap()
            .contains("longer than upload.pending_alarm_after (2s)"),
        "{pushed:?}"
    );
    assert_eq!(env.count("synced"), 0);

    env.cli_ok(&["resume"]);
    wait(
        &env,
        &d,
        &sub,
        &broker,
        30,
        "pending_too_old cleared",
        || {
            !alarms(&env, &sub, "alarm_cleared", "pending_too_old")
                .0
                .is_empty()
        },
    );
    assert_eq!(env.count("synced"), 1);
    let (pushed, _) = alarms(&env, &sub, "alarm_cleared", "pending_too_old");
    assert_eq!(pushed.len(), 1);
    assert_eq!(
        pushed[0]["reason"],
        "pending_too_old: nothing waits to upload"
    );
}
