//! Deletes and remote verification against real peers (`s3s-fs`, mosquitto): a deleted
//! photo leaves the bucket and the device and never comes back; a delete mid-upload
//! aborts the multipart upload so nothing reaches the remote; `cmd/delete` answers by
//! request id; `verify --remote` finds an object removed behind the agent's back and the
//! photo is uploaded again.

mod common;

use std::fs;
use std::time::Duration;

use common::mqtt::{Broker, Sub};
use common::s3::*;
use common::*;
use serde_json::Value;

fn s3_env(endpoint: &str, s3_extra: &str) -> Env {
    Env::new(&S3Server::remote_toml(endpoint, SECRET_KEY, s3_extra))
}

fn only(env: &Env) -> Value {
    let list = env.list();
    assert_eq!(list.len(), 1, "{list:?}");
    list[0].clone()
}

fn events_of(env: &Env, kind: &str) -> Vec<Value> {
    env.events()
        .into_iter()
        .filter(|e| e["kind"] == kind)
        .collect()
}

/// Part files `s3s-fs` keeps for unfinished multipart uploads (any upload id).
fn open_parts(server: &S3Server) -> usize {
    fs::read_dir(server.dir.path().join("data"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".upload_id-"))
        .count()
}

fn db(env: &Env) -> rusqlite::Connection {
    rusqlite::Connection::open(env.state.join("queue.db")).unwrap()
}

#[test]
fn delete_of_a_synced_photo_removes_object_and_file_and_it_never_comes_back() {
    let server = S3Server::start();
    let client = server.client();
    let env = s3_env(&server.endpoint(), "");
    let body = bytes(11, 300_000);
    let p = env.drop_file("c1/r1/a.jpg", &body);
    let mut d = env.spawn();
    env.wait(Some(&d), 30, "synced", || env.count("synced") == 1);
    let a = only(&env);
    let id = a["id"].as_str().unwrap().to_string();
    let key = a["object_key"].as_str().unwrap().to_string();
    assert_eq!(client.get(&key).as_deref(), Some(&body[..]));

    let out = env.cli_ok(&["delete", &id]);
    assert!(out.contains("queued for delete"), "{out}");
    env.wait(Some(&d), 30, "archived", || env.count("archived") == 1);
    assert!(
        client.get(&key).is_none(),
        "the object is still in the bucket"
    );
    assert!(client.list("fs/").is_empty(), "{:?}", client.list("fs/"));
    assert!(!p.exists(), "the local copy is still there");
    let a = only(&env);
    assert_eq!(a["has_synced"], false, "{a}");
    let archived = events_of(&env, "archived");
    assert_eq!(archived.len(), 1, "{archived:?}");
    assert_eq!(archived[0]["reason"], "deleted");
    assert_eq!(events_of(&env, "delete_requested")[0]["reason"], "cli");

    // Unknown id and a second delete: one line each, exit 3, nothing changes.
    let out = env.cli(&["delete", "no-such-id"]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("no-such-id"), "{err}");
    let out = env.cli(&["delete", &id]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already deleted"));

    // Expiry never takes the tombstone, not even with a limit of 0.
    let out = env.cli_ok(&["expire", "--limit", "0"]);
    assert!(
        out.contains("expired 0 archived record(s)") && !out.contains(&id),
        "{out}"
    );
    assert_eq!(env.list().len(), 1);

    // The same bytes back at the same path (a restored backup), seen by a rescan and
    // after a restart: the photo stays deleted.
    fs::write(&p, &body).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    d.terminate();
    let d = env.spawn();
    std::thread::sleep(Duration::from_secs(4));
    let list = env.list();
    assert_eq!(
        list.len(),
        1,
        "re-ingested: {list:?}\n{}",
        env.dump(Some(&d))
    );
    assert_eq!(list[0]["state"], "archived");
    assert!(client.list("fs/").is_empty(), "uploaded again");
}

#[test]
fn delete_mid_multipart_aborts_the_upload_and_nothing_reaches_the_remote() {
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.addr());
    let client = server.client();
    let env = s3_env(
        &proxy.endpoint(),
        "multipart_threshold = \"5MiB\"\npart_size = \"5MiB\"",
    );
    let p = env.drop_file("c1/r1/big.mp4", &bytes(12, 40_000_000));
    proxy.set_throttle(3_000_000);
    let d = env.spawn();
    env.wait(Some(&d), 60, "a part committed", || {
        db(&env)
            .query_row("SELECT COUNT(*) FROM upload_parts", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap()
            >= 1
    });
    assert!(open_parts(&server) >= 1, "no part on the server");
    let id = only(&env)["id"].as_str().unwrap().to_string();
    // The upload is in flight right now.
    assert_eq!(only(&env)["state"], "queued_upload");
    let out = env.cli_ok(&["delete", &id]);
    assert!(out.contains("upload cancelled"), "{out}");
    env.wait(Some(&d), 30, "archived", || env.count("archived") == 1);
    env.wait(Some(&d), 10, "parts freed", || open_parts(&server) == 0);
    // The upload stopped where it was: most of the file never went over the wire.
    let sent = proxy.up_bytes();
    assert!(
        sent < 30_000_000,
        "{sent} bytes sent: the upload was not stopped"
    );
    // Well past when the throttled upload would have finished: still nothing.
    std::thread::sleep(Duration::from_secs(3));
    assert!(client.list("fs/").is_empty(), "{:?}", client.list("fs/"));
    assert_eq!(open_parts(&server), 0);
    assert!(!p.exists(), "the local copy is still there");
    let a = only(&env);
    assert_eq!(a["state"], "archived");
    assert!(a["upload_id"].is_null(), "{a}");
    assert_eq!(events_of(&env, "uploaded").len(), 0);
}

#[test]
fn mqtt_cmd_delete_answers_by_request_id() {
    let broker = Broker::start();
    let env = Env::new(&broker.agent_config(""));
    let sub = Sub::new(broker.port, "fieldsync/dev1/#");
    let p = env.drop_file("c1/r1/a.jpg", &bytes(13, 20_000));
    let d = env.spawn();
    env.wait(Some(&d), 30, "synced", || env.count("synced") == 1);
    let id = only(&env)["id"].as_str().unwrap().to_string();
    env.wait(Some(&d), 30, "online", || {
        sub.last("/state").map(|m| m.text()).as_deref() == Some("online")
    });
    let results = || -> Vec<Value> {
        sub.on("/cmd/delete/result")
            .iter()
            .map(|m| m.json())
            .collect()
    };
    // Deletes obey the conditions like uploads: while paused, nothing is removed.
    env.cli_ok(&["pause"]);
    env.wait(Some(&d), 10, "paused", || env.status()["paused"] == true);
    sub.publish(
        "fieldsync/dev1/cmd/delete",
        br#"{"id":"nope","request_id":"d0"}"#,
    );
    sub.publish(
        "fieldsync/dev1/cmd/delete",
        format!(r#"{{"id":"{id}","request_id":"d1"}}"#).as_bytes(),
    );
    env.wait(Some(&d), 30, "two results", || results().len() == 2);
    let r = results();
    let by = |rid: &str| r.iter().find(|x| x["request_id"] == rid).unwrap().clone();
    assert_eq!(by("d0")["result"], "error");
    assert!(by("d0")["message"].as_str().unwrap().contains("nope"));
    assert_eq!(by("d1")["result"], "ok", "{:?}", by("d1"));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(env.count("queued_delete"), 1, "{}", env.dump(Some(&d)));
    assert_eq!(env.remote_objects().len(), 1, "deleted while paused");
    assert!(p.exists());
    env.cli_ok(&["resume"]);
    env.wait(Some(&d), 30, "archived", || env.count("archived") == 1);
    assert!(
        env.remote_objects().is_empty(),
        "{:?}",
        env.remote_objects().len()
    );
    assert!(!p.exists());
    let e = events_of(&env, "delete_requested");
    assert_eq!(e[0]["reason"], "mqtt");
}

#[test]
fn verify_remote_requeues_a_photo_whose_object_vanished_and_it_is_uploaded_again() {
    let server = S3Server::start();
    let client = server.client();
    let env = s3_env(&server.endpoint(), "");
    let keep = bytes(14, 120_000);
    env.drop_file("c1/r1/kept.jpg", &keep);
    env.drop_file("c1/r1/lost.jpg", &bytes(15, 90_000));
    env.drop_file("c1/r1/fine.jpg", &bytes(16, 70_000));
    let d = env.spawn();
    env.wait(Some(&d), 30, "synced", || env.count("synced") == 3);
    let list = env.list();
    let rec = |name: &str| list.iter().find(|a| a["filename"] == name).unwrap().clone();
    let kept = rec("kept.jpg");
    let lost = rec("lost.jpg");
    let kept_key = kept["object_key"].as_str().unwrap();
    // Behind the agent's back: two objects vanish; one photo's local copy is gone too.
    client.delete(kept_key);
    client.delete(lost["object_key"].as_str().unwrap());
    fs::remove_file(lost["local_uri"].as_str().unwrap()).unwrap();

    // Paused: the run stops before its first request and keeps its place.
    env.cli_ok(&["pause"]);
    env.wait(Some(&d), 10, "paused", || env.status()["paused"] == true);
    let out = env.cli(&["verify", "--remote"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("stopped: uploads paused"),
        "{out:?}"
    );
    env.cli_ok(&["resume"]);
    env.wait(Some(&d), 10, "resumed", || env.status()["paused"] == false);

    let out = env.cli_ok(&["verify", "--remote", "--json", "--rate", "50"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let r = &v["remote"];
    assert_eq!(r["complete"], true, "{v}");
    assert_eq!(r["checked"], 3, "{v}");
    assert_eq!(r["ok"], 1, "{v}");
    assert_eq!(r["requeued"], 1, "{v}");
    let f = r["findings"].as_array().unwrap();
    let by = |id: &Value| f.iter().find(|x| &x["id"] == id).unwrap().clone();
    assert_eq!(by(&kept["id"])["problem"], "missing");
    assert_eq!(by(&kept["id"])["action"], "requeued");
    assert_eq!(by(&lost["id"])["problem"], "missing");
    assert_eq!(by(&lost["id"])["action"], "local_copy_gone");

    // The daemon uploads the requeued photo again, byte-identical.
    env.wait(Some(&d), 30, "uploaded again", || {
        client.get(kept_key).as_deref() == Some(&keep[..])
    });
    env.wait(Some(&d), 10, "synced again", || {
        env.list()
            .iter()
            .any(|a| a["id"] == kept["id"] && a["state"] == "synced")
    });
    assert!(env
        .events()
        .iter()
        .any(|e| e["kind"] == "repaired" && e["reason"] == "remote_missing"));
    // A second full run finds only the photo whose every copy is gone.
    let out = env.cli_ok(&["verify", "--remote", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["remote"]["ok"], 2, "{v}");
    assert_eq!(v["remote"]["requeued"], 0, "{v}");
}

#[test]
fn a_delete_refused_by_a_busy_server_is_retried_until_it_is_done() {
    let mut server = S3Server::start();
    let proxy = FaultProxy::start(server.addr());
    let client = server.client();
    let env = s3_env(&proxy.endpoint(), "");
    env.drop_file("c1/r1/a.jpg", &bytes(17, 50_000));
    let d = env.spawn();
    env.wait(Some(&d), 30, "synced", || env.count("synced") == 1);
    let a = only(&env);
    let key = a["object_key"].as_str().unwrap().to_string();
    // Pooled connections die with the server; the next ones are answered 503.
    server.stop();
    server.resume();
    proxy.fail_503(2);
    env.cli_ok(&["delete", a["id"].as_str().unwrap()]);
    env.wait(Some(&d), 30, "archived", || env.count("archived") == 1);
    assert!(client.get(&key).is_none());
    let retries: Vec<Value> = events_of(&env, "retry_scheduled");
    assert!(!retries.is_empty(), "no retry after a 503");
    assert!(
        retries.iter().all(|e| e["to_state"] == "queued_delete"),
        "{retries:?}"
    );
    assert_eq!(events_of(&env, "failed").len(), 0);
}
