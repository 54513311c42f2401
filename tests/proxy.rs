//! Outbound proxies: the `s3` remote reaches a real S3 server (`s3s-fs`) through a real
//! HTTP proxy (`tinyproxy`), given by the `proxy` key or the environment, and `NO_PROXY`
//! bypasses it.

mod common;

use common::s3::*;
use common::tinyproxy::Tinyproxy;
use common::*;

fn s3_env(endpoint: &str, s3_extra: &str) -> Env {
    Env::new(&S3Server::remote_toml(endpoint, SECRET_KEY, s3_extra))
}

#[test]
fn proxy_key_with_credentials_carries_the_uploads_and_is_never_logged() {
    let server = S3Server::start();
    let proxy = Tinyproxy::start(Some(("fieldsync", "Pr0xy-pw-9x")));
    let target = server.addr().to_string();
    let url = format!("http://fieldsync:Pr0xy-pw-9x@127.0.0.1:{}", proxy.port);
    let env = s3_env(&server.endpoint(), &format!("proxy = \"{url}\""));
    env.drop_file("c/r/a.jpg", &bytes(1, 200_000));
    env.drop_file("c/r/b.jpg", &bytes(2, 300_000));
    let d = env.spawn();
    env.wait(Some(&d), 30, "2 synced through the proxy", || {
        env.count("synced") == 2
    });
    assert!(
        proxy.connects_to(&target) >= 1,
        "no CONNECT {target} in the proxy's log:\n{}",
        proxy.log_text()
    );
    assert_eq!(server.client().list("").len(), 2);
    let seen = format!(
        "{}\n{}\n{}",
        d.log_text(),
        env.cli_ok(&["status", "--json"]),
        env.cli_ok(&["config", "check"])
    );
    assert!(
        !seen.contains("Pr0xy-pw-9x"),
        "proxy password leaked:\n{seen}"
    );
    assert!(d.log_text().contains("requests go through a proxy"));
}

#[test]
fn proxy_with_basic_auth_refuses_a_device_without_its_credentials() {
    let server = S3Server::start();
    let proxy = Tinyproxy::start(Some(("fieldsync", "Pr0xy-pw-9x")));
    let env = s3_env(&server.endpoint(), &format!("proxy = \"{}\"", proxy.url()));
    env.drop_file("c/r/a.jpg", &bytes(1, 100_000));
    let d = env.spawn();
    env.wait(Some(&d), 30, "a refused attempt", || {
        env.list()
            .first()
            .is_some_and(|a| !a["last_error"].is_null())
    });
    assert_eq!(env.count("synced"), 0);
    assert!(server.client().list("").is_empty());
    let a = &env.list()[0];
    assert!(
        a["last_error"].as_str().unwrap_or("").contains("407"),
        "the proxy's refusal is the recorded error: {a}"
    );
}

#[test]
fn http_proxy_from_the_environment_and_no_proxy_bypass() {
    let server = S3Server::start();
    let proxy = Tinyproxy::start(None);
    let target = server.addr().to_string();
    let env = s3_env(&server.endpoint(), "");
    env.drop_file("c/r/a.jpg", &bytes(1, 100_000));
    let mut d = env.spawn_with(&[("HTTP_PROXY", &proxy.url()), ("NO_PROXY", "")]);
    env.wait(Some(&d), 30, "synced through HTTP_PROXY", || {
        env.count("synced") == 1
    });
    let via_proxy = proxy.connects_to(&target);
    assert!(via_proxy >= 1, "no CONNECT in:\n{}", proxy.log_text());
    let (code, _) = d.terminate();
    assert_eq!(code, Some(0));

    // NO_PROXY names the S3 host: the proxy sees nothing more.
    env.drop_file("c/r/b.jpg", &bytes(2, 100_000));
    let d = env.spawn_with(&[
        ("http_proxy", &proxy.url()),
        ("NO_PROXY", "localhost,127.0.0.1"),
    ]);
    env.wait(Some(&d), 30, "synced directly", || env.count("synced") == 2);
    assert_eq!(
        proxy.connects_to(&target),
        via_proxy,
        "NO_PROXY was not honoured:\n{}",
        proxy.log_text()
    );
    assert_eq!(server.client().list("").len(), 2);
}

#[test]
fn the_http_remote_reaches_backend_and_storage_through_the_proxy() {
    let server = S3Server::start();
    let presign = PresignService::start(&server.endpoint(), "tok-proxy-5Tq");
    let proxy = Tinyproxy::start(None);
    let env = Env::new(&format!(
        "[remote]\nkind = \"http\"\nprefix = \"fs\"\n\n[remote.http]\nendpoint = \"{}\"\ntoken = \"tok-proxy-5Tq\"\nproxy = \"{}\"\nconnect_timeout = \"2s\"\nread_timeout = \"5s\"\n",
        presign.endpoint(),
        proxy.url()
    ));
    env.drop_file("c/r/a.jpg", &bytes(1, 100_000));
    let d = env.spawn();
    env.wait(Some(&d), 30, "synced through the proxy", || {
        env.count("synced") == 1
    });
    let backend = format!("127.0.0.1:{}", presign.port);
    assert!(
        proxy.connects_to(&backend) >= 1,
        "backend not reached through the proxy:\n{}",
        proxy.log_text()
    );
    assert!(
        proxy.connects_to(&server.addr().to_string()) >= 1,
        "storage not reached through the proxy:\n{}",
        proxy.log_text()
    );
}
