//! `fieldsync status [--json] [--watch]`: the status snapshot, once or refreshed.

use std::time::Duration;

use crate::config::Config;
use crate::daemon;
use crate::ingest::absolute;
use crate::status;

use super::common::{open_store, remote_name};
use super::error::{exit, CliError};

pub fn run(cfg: &Config, json: bool, watch: bool, interval: Duration) -> Result<i32, CliError> {
    let store = open_store(cfg)?;
    let remote = remote_name(cfg);
    loop {
        let running = daemon::running_pid(&absolute(&cfg.paths.state_dir)).is_some();
        let snap = status::snapshot(&store, &cfg.device_id, &remote, running)?;
        if watch && !json {
            print!("\x1b[2J\x1b[H");
        }
        if json {
            println!("{}", serde_json::to_string(&snap).expect("serialisable"));
        } else {
            print!("{}", status::render(&snap));
        }
        if !watch {
            return Ok(exit::OK);
        }
        std::thread::sleep(interval);
    }
}
