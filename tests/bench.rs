//! `fieldsync bench`, built only with the `bench` feature (tests/run.sh builds it): each
//! suite runs to its end on small numbers, prints its figures and exits 0. The figures
//! themselves are for people (README, "Benchmarks"); a debug build on a shared test
//! machine says nothing about them.

mod common;

use std::process::Command;

/// Runs `fieldsync bench ARGS` and returns its stdout; on failure shows everything.
fn bench(args: &[&str]) -> String {
    let out = Command::new(common::BIN)
        .arg("bench")
        .args(args)
        .output()
        .expect("run fieldsync bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "fieldsync bench {args:?} exited {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status.code()
    );
    stdout
}

fn expect_lines(out: &str, wanted: &[&str]) {
    for w in wanted {
        assert!(out.contains(w), "no `{w}` in the bench output:\n{out}");
    }
}

#[test]
fn core_suite_measures_ingest_drain_and_idle() {
    let out = bench(&[
        "--photos",
        "5",
        "--size-mb",
        "0.1",
        "--ingest-photos",
        "5",
        "--idle-synced",
        "50",
        "--idle-queued",
        "10",
        "--idle-window",
        "1s",
    ]);
    expect_lines(
        &out,
        &[
            "fieldsync bench (",
            "ingest: 5 x 0.1 MB",
            "drain: 5 x 0.1 MB into the file remote",
            " 5 synced, daemon peak RSS ",
            "idle: 50 synced + 10 queued (paused) records: RSS ",
            "rescan of 60 files: full pass",
        ],
    );
}

#[test]
fn conditions_suite_measures_probes_and_the_rate_limiter() {
    // A zero idle window skips the two idle daemons; the rate limiter runs 2 x 10 s.
    let out = bench(&["conditions", "--idle-window", "0s"]);
    expect_lines(
        &out,
        &[
            "fake field-device tree",
            "this machine's /proc and /sys",
            "rate limit 1.0 MB/s:",
            "rate limit 4.0 MB/s:",
        ],
    );
}

#[test]
fn mqtt_suite_starts_its_own_broker() {
    let out = bench(&["mqtt"]);
    expect_lines(
        &out,
        &[
            "mqtt payloads (bytes per message):",
            "  status snapshot  json ",
            "  uploaded event   json ",
            "  mqtt off  RSS ",
            "  mqtt on   RSS ",
            "  mqtt adds ",
        ],
    );
}

#[test]
fn queue_suite_times_status_and_list_on_a_large_queue() {
    let out = bench(&["queue", "--records", "2000"]);
    expect_lines(
        &out,
        &[
            "queue: 2000 records (95 % synced, 4 % queued, 1 % failed) built in ",
            "queue: status --json ",
            "queue: list --json --state synced ",
            "target <= 100 ms ",
        ],
    );
}
