//! The `http` remote end to end: the daemon asks a presign backend (run by the test, in
//! front of a real `s3s-fs`) for presigned URLs with its device token and uploads to them.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::s3::*;
use common::*;

const TOKEN: &str = "device-token-7Hq2mZ0pXw";

fn http_env(presign: &PresignService, token: &str) -> Env {
    Env::new(&format!(
        "[remote]\nkind = \"http\"\nprefix = \"fs\"\n\n[remote.http]\nendpoint = \"{}\"\ntoken = \"{token}\"\nconnect_timeout = \"2s\"\nread_timeout = \"5s\"\n",
        presign.endpoint()
    ))
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
    let fixed = env.toml.replace(wrong, TOKEN);
    env.write_config(&fixed);
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
