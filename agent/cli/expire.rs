//! `fieldsync expire`: applies `retention.archived_cache_limit` now and prints what it
//! removed (the daemon does the same after every assignment change and every
//! `upload.sync_interval`).

use crate::assignments;
use crate::config::Config;

use super::common::{open_store, print_json};
use super::error::{exit, CliError};

pub fn run(cfg: &Config, limit: Option<u64>, json: bool) -> Result<i32, CliError> {
    let mut store = open_store(cfg)?;
    let limit = limit.unwrap_or(cfg.retention.archived_cache_limit);
    let gone = assignments::expire(&mut store, limit)?;
    if json {
        print_json(&gone);
        return Ok(exit::OK);
    }
    for e in &gone {
        let what = if e.local_deleted {
            "record and local copy removed"
        } else {
            "record removed"
        };
        println!("expired {}  {}  {what}", e.id, e.path_line);
    }
    println!(
        "expired {} archived record(s); at most {limit} kept",
        gone.len()
    );
    Ok(exit::OK)
}
