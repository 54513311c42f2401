//! `fieldsync run` (the daemon) and `fieldsync demo` (a newcomer's first run).

use std::sync::Arc;

use crate::bus::Shared;
use crate::config::Config;
use crate::daemon::{self, RunOptions};
use crate::ingest::absolute;
use crate::status;
use crate::store::Store;

use super::common::remote_name;
use super::error::{exit, CliError};

/// `fieldsync run [--until-idle]`; `path` is the config file a reload re-reads (`None`:
/// the embedded one).
pub fn run(
    cfg: Config,
    until_idle: bool,
    path: Option<std::path::PathBuf>,
) -> Result<i32, CliError> {
    daemon::run(
        cfg,
        RunOptions {
            until_idle,
            config_path: path,
        },
        Arc::new(Shared::default()),
    )?;
    Ok(exit::OK)
}

/// `fieldsync demo`: a newcomer's first run, no services needed.
pub fn demo(cfg: Config) -> Result<i32, CliError> {
    let io = |e: std::io::Error| CliError::new(exit::FAILURE, e.to_string());
    let row_dir = cfg
        .paths
        .capture
        .join("pump-station-7")
        .join("row-1-inlet-valve");
    std::fs::create_dir_all(&row_dir).map_err(io)?;
    for n in 1..=3u8 {
        let p = row_dir.join(format!("IMG_000{n}.jpg"));
        if !p.exists() {
            // A stand-in photo: a JPEG header and some bytes.
            let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xE0];
            bytes.extend((0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 ^ n));
            std::fs::write(&p, bytes).map_err(io)?;
        }
    }
    let sidecar = row_dir.join("IMG_0001.jpg.json");
    if !sidecar.exists() {
        std::fs::write(
            &sidecar,
            br#"{"captured_at":"2026-11-22T09:00:00Z","inspector":"demo","notes":"inlet valve, no leak"}"#,
        )
        .map_err(io)?;
    }
    let checklist = row_dir
        .parent()
        .unwrap()
        .join(crate::ingest::CHECKLIST_FILE);
    if !checklist.exists() {
        std::fs::write(
            &checklist,
            br#"{"title":"Pump station 7 monthly inspection","rows":[{"id":"row-1-inlet-valve","fields":{"leak":false,"pressure_bar":4.2},"photos":["IMG_0001.jpg","IMG_0002.jpg","IMG_0003.jpg"]}]}"#,
        )
        .map_err(io)?;
    }
    println!(
        "demo: photos in {}; uploading to {} ...",
        cfg.paths.capture.display(),
        remote_name(&cfg)
    );
    let state_dir = absolute(&cfg.paths.state_dir);
    let device = cfg.device_id.clone();
    let remote = remote_name(&cfg);
    daemon::run(
        cfg,
        RunOptions {
            until_idle: true,
            config_path: None,
        },
        Arc::new(Shared::default()),
    )?;
    let store = Store::open(&state_dir.join("queue.db"))?;
    print!(
        "{}",
        status::render(&status::snapshot(&store, &device, &remote, false)?)
    );
    Ok(exit::OK)
}
