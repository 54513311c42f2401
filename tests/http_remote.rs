//! The `http` remote end to end: the daemon asks a presign backend (run by the test, in
//! front of a real `s3s-fs`) for presigned URLs with its device token and uploads to them.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::s3::*;
use common::*;

const TOKEN: &str = "device-token-7Hq2mZ0pXw";
const MIB: u64 = 1024 * 1024;
/// Slack for request lines and headers (presigned URLs are long) on top of body bytes.
const OVERHEAD: u64 = 256 * 1024;
/// Multipart from 5 MiB, in 5 MiB parts.
const MULTIPART: &str = "multipart_threshold = \"5MiB\"\npart_size = \"5MiB\"\n";

fn http_env(presign: &PresignService, token: &str) -> Env {
    http_env_with(presign, token, "")
}

fn http_env_with(presign: &PresignService, token: &str, extra: &str) -> Env {
    Env::new(&format!(
        "[remote]\nkind = \"http\"\nprefix = \"fs\"\n\n[remote.http]\nendpoint = \"{}\"\ntoken = \"{token}\"\nconnect_timeout = \"2s\"\nread_timeout = \"5s\"\n{extra}",
        presign.endpoint()
    ))
}

/// Committed parts (count, bytes) in the queue database (the CLI does not show them).
fn committed_parts(env: &Env) -> (i64, i64) {
    let db = rusqlite::Connection::open(env.state.join("queue.db")).unwrap();
    db.query_row(
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM upload_parts",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

/// The object of the only attachment equals `data`, with its sha256 metadata.
fn assert_one_object(env: &Env, server: &S3Server, data: &[u8]) -> String {
    let list = env.list();
    assert_eq!(list.len(), 1);
    let key = list[0]["object_key"].as_str().unwrap().to_string();
    let client = server.client();
    let body = client.get(&key).expect("object in the bucket");
    assert_eq!(body.len(), data.len(), "size of {key}");
    assert_eq!(sha256_hex(&body), sha256_hex(data), "bytes of {key}");
    assert_eq!(
        client.head(&key).unwrap()["x-amz-meta-sha256"],
        sha256_hex(data)
    );
    assert_eq!(client.list("fs/").len(), 1, "one object");
    key
}

#[test]
fn presigned_uploads_land_and_an_expired_url_is_requested_again() {
    let server = S3Server::start();
    let presign = PresignService::start(&server.endpoint(), TOKEN);
    // The first URL the backend hands out has expired by the time the device uses it.
    presign.expire_next.store(1, Ordering::SeqCst);
    let env = http_env(&presign, TOKEN);
    let d = env.spawn();
    let sizes = [0usize, 1, 150_000, 3_000_000];
    for (i, len) in sizes.iter().enumerate() {
        env.drop_file(
            &format!("pump-1/row-{i}/IMG_{i}.jpg"),
            &bytes(i as u64, *len),
        );
    }
    env.wait(Some(&d), 60, "4 synced", || env.count("synced") == 4);

    let client = server.client();
    for a in env.list() {
        let key = a["object_key"].as_str().unwrap();
        let local = std::fs::read(a["local_uri"].as_str().unwrap()).unwrap();
        let body = client.get(key).expect("object in the bucket");
        assert_eq!(sha256_hex(&body), sha256_hex(&local), "bytes of {key}");
        assert_eq!(
            client.head(key).unwrap()["x-amz-meta-sha256"],
            sha256_hex(&local)
        );
    }
    assert_eq!(client.list("fs/").len(), 4, "one object per photo");

    // The expired URL was replaced by a fresh one at once: two PUT presigns for that key,
    // one for every other, and no credentials pause.
    let expired = presign.expired.lock().unwrap().clone();
    assert_eq!(expired.len(), 1);
    assert_eq!(presign.count("PUT", &expired[0]), 2);
    for a in env.list() {
        let key = a["object_key"].as_str().unwrap();
        if key != expired[0] {
            assert_eq!(presign.count("PUT", key), 1, "{key}");
        }
    }
    assert!(
        !env.events().iter().any(|e| e["kind"] == "paused"),
        "no pause"
    );
    assert!(env.status()["pause_reason"].is_null());
    assert!(d.log_text().contains("asking for a new one"));
}

#[test]
fn refused_device_token_pauses_with_auth_and_never_leaks() {
    let server = S3Server::start();
    let presign = PresignService::start(&server.endpoint(), TOKEN);
    let wrong = "not-the-device-token-Pq9";
    let mut env = http_env(&presign, wrong);
    env.drop_file("c/r/a.jpg", &bytes(1, 10_000));
    let mut d = env.spawn();
    env.wait(Some(&d), 30, "paused with reason auth", || {
        env.status()["pause_reason"] == "auth"
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(env.count("failed"), 0);
    assert_eq!(env.count("synced"), 0);
    let seen = format!(
        "{}\n{}\n{}",
        d.log_text(),
        env.cli_ok(&["status", "--json"]),
        env.cli_ok(&["list", "--json"]),
    );
    assert!(
        !seen.contains(wrong) && !seen.contains(TOKEN),
        "token leaked"
    );

    assert_eq!(d.terminate().0, Some(0));
    env.edit_config(wrong, TOKEN);
    let d = env.spawn();
    env.wait(Some(&d), 30, "synced", || env.count("synced") == 1);
    let a = &env.list()[0];
    assert_eq!(
        server
            .client()
            .get(a["object_key"].as_str().unwrap())
            .unwrap(),
        bytes(1, 10_000)
    );
}

#[test]
fn presigned_multipart_of_100_mb_lands_byte_identical() {
    let server = S3Server::start();
    let presign = PresignService::start(&server.endpoint(), TOKEN);
    let env = http_env_with(&presign, TOKEN, MULTIPART);
    let data = bytes(11, 100_000_000);
    env.drop_file("pump-2/row-1/VID_0002.mp4", &data);
    let d = env.spawn();
    env.wait(Some(&d), 120, "synced", || env.count("synced") == 1);
    let key = assert_one_object(&env, &server, &data);
    // 20 parts of at most 5 MiB, each presigned once; no whole-file PUT.
    assert_eq!(presign.count("multipart_create", &key), 1);
    assert_eq!(presign.count("multipart_part", &key), 20);
    assert_eq!(presign.count("multipart_complete", &key), 1);
    assert_eq!(presign.count("PUT", &key), 0);
    assert_eq!(committed_parts(&env).0, 0, "parts forgotten once complete");
}

#[test]
fn killed_mid_presigned_multipart_resends_at_most_one_part_and_progress_moves_within_parts() {
    let server = S3Server::start();
    // The proxy sits between the device and storage: the backend presigns URLs for it.
    let proxy = FaultProxy::start(server.addr());
    let presign = PresignService::start_via(&server.endpoint(), &proxy.endpoint(), TOKEN);
    let mut env = http_env_with(&presign, TOKEN, MULTIPART);
    let part = 5 * MIB;
    let size = 100_000_000u64;
    let data = bytes(42, size as usize);
    env.drop_file("pump-7/row-3/VID_0001.mp4", &data);
    // The device's own rate limit paces the reads, so one part takes far longer than the
    // progress interval (500 ms): status shows progress between part boundaries, not only
    // per acknowledged part. (A throttle in the proxy would not show it: on loopback the
    // kernel's socket buffers take a whole 5 MiB part at once.)
    let unlimited = env.toml.clone();
    let t = unlimited.replace(
        "min_free_disk = 0",
        "bandwidth_limit = \"4MB\"\nmin_free_disk = 0",
    );
    env.write_config(&t);
    let mut d = env.spawn();
    env.wait(Some(&d), 60, "bytes_sent between part boundaries", || {
        let sent = env.status()["uploading"][0]["bytes_sent"]
            .as_u64()
            .unwrap_or(0);
        !sent.is_multiple_of(part) && sent < size
    });
    env.wait(Some(&d), 120, "30 MB sent", || {
        env.status()["uploading"][0]["bytes_sent"]
            .as_u64()
            .unwrap_or(0)
            >= 30_000_000
    });
    d.kill9();
    // What the dead process had already written still drains through the proxy.
    proxy.set_throttle(0);
    proxy.wait_closed(Duration::from_secs(30));
    let before = proxy.up_bytes();
    let (parts, committed) = committed_parts(&env);
    assert!(parts >= 4, "parts committed before the kill: {parts}");

    env.write_config(&unlimited);
    let d = env.spawn();
    env.wait(Some(&d), 120, "synced after restart", || {
        env.count("synced") == 1
    });
    let after = proxy.up_bytes() - before;
    assert_one_object(&env, &server, &data);
    assert!(
        after <= size - committed as u64 + OVERHEAD,
        "sent {after} after restart; {committed} of {size} were committed\n{}",
        env.dump(Some(&d))
    );
    let total = before + after;
    eprintln!("forwarded {before} before the kill, {after} after; {committed} were committed");
    assert!(
        total <= size + part + OVERHEAD,
        "{total} bytes forwarded for a {size} byte file (part {part})\n{}",
        env.dump(Some(&d))
    );
    assert!(d.log_text().contains("resuming multipart upload"));
    assert_eq!(committed_parts(&env).0, 0, "parts forgotten once complete");
}

#[test]
fn backend_without_multipart_gets_single_puts() {
    let server = S3Server::start();
    let presign = PresignService::start(&server.endpoint(), TOKEN);
    presign.multipart.store(false, Ordering::SeqCst);
    let env = http_env_with(&presign, TOKEN, MULTIPART);
    let d = env.spawn();
    let a = bytes(5, 12_000_000);
    env.drop_file("c/r/VID_a.mp4", &a);
    env.wait(Some(&d), 60, "first synced", || env.count("synced") == 1);
    let key_a = assert_one_object(&env, &server, &a);
    assert_eq!(presign.count("multipart_create", &key_a), 1);
    assert_eq!(presign.count("PUT", &key_a), 1, "sent in one PUT");
    // Remembered: the next large file goes straight to a single PUT.
    env.drop_file("c/r/VID_b.mp4", &bytes(6, 12_000_000));
    env.wait(Some(&d), 60, "both synced", || env.count("synced") == 2);
    for a in env.list() {
        let key = a["object_key"].as_str().unwrap();
        let local = std::fs::read(a["local_uri"].as_str().unwrap()).unwrap();
        assert_eq!(
            sha256_hex(&server.client().get(key).unwrap()),
            sha256_hex(&local)
        );
        assert_eq!(presign.count("PUT", key), 1, "{key}");
    }
    let creates = presign
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|(m, _)| m == "multipart_create")
        .count();
    assert_eq!(creates, 1, "the missing multipart calls are remembered");
    assert!(d.log_text().contains("offers no multipart upload"));
}
