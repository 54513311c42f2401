//! The commands that change the queue: `retry`, `enqueue`, `verify`, `pause`, `resume`,
//! `sync`. Each goes through the store, like the daemon; a running daemon sees the change
//! within a second.

use std::path::Path;

use crate::config::Config;
use crate::ingest::{absolute, Outcome};
use crate::{commands, verify};

use super::common::{open_store, print_json};
use super::error::{exit, CliError};

/// `retry ID` or `retry --failed` (`id` is None).
pub fn retry(cfg: &Config, id: Option<&str>) -> Result<i32, CliError> {
    let mut store = open_store(cfg)?;
    let ids = commands::retry(&mut store, id)?;
    println!("requeued {} attachment(s)", ids.len());
    Ok(exit::OK)
}

/// `delete ID`: the daemon removes the remote object and the local copy.
pub fn delete(cfg: &Config, id: &str) -> Result<i32, CliError> {
    let mut store = open_store(cfg)?;
    let r = commands::delete(&mut store, id, "cli").map_err(|e| match e {
        crate::store::StoreError::BadTransition { from, .. } => CliError::new(
            exit::NOT_FOUND,
            if store.is_tombstone(id).unwrap_or(false) {
                format!("attachment {id} is already deleted")
            } else if store.is_assignment(id).unwrap_or(false) {
                format!(
                    "attachment {id} is a file an assignment names: it leaves the device when no assignment names it"
                )
            } else {
                format!("attachment {id} is {from}: it cannot be deleted")
            },
        ),
        e => e.into(),
    })?;
    println!("{}", commands::describe_delete(&r));
    Ok(exit::OK)
}

pub fn enqueue(cfg: &Config, file: &Path, checklist: String, row: String) -> Result<i32, CliError> {
    let mut store = open_store(cfg)?;
    let ingestor = cfg.ingestor();
    let path = absolute(file);
    let outcome = ingestor
        .ingest_as(&mut store, &path, (checklist, row))
        .map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
    match outcome {
        Outcome::Enqueued(a) => println!("enqueued {} as {}", a.id, a.object_key),
        Outcome::Unreadable(a) => {
            return Err(CliError::new(
                exit::FAILURE,
                format!(
                    "{}: recorded as failed ({})",
                    path.display(),
                    a.last_error.unwrap_or_default()
                ),
            ))
        }
        Outcome::Unchanged | Outcome::Touched => println!("already enqueued"),
        Outcome::Missing => {
            return Err(CliError::new(
                exit::NOT_FOUND,
                format!("{}: no such file", path.display()),
            ))
        }
        Outcome::NotStable => {
            return Err(CliError::new(
                exit::FAILURE,
                format!("{}: changed while being read; try again", path.display()),
            ))
        }
        // A link or a FIFO is never read (README: symbolic links); the reason names it.
        Outcome::Refused(why) => return Err(CliError::new(exit::USAGE, why)),
        Outcome::Ignored | Outcome::SidecarUpdated => {
            return Err(CliError::new(
                exit::USAGE,
                format!("{}: not a regular file", path.display()),
            ))
        }
    }
    commands::wake(&store)?;
    Ok(exit::OK)
}

/// `src` names the configuration in its errors.
pub fn verify(
    cfg: &Config,
    src: &str,
    json: bool,
    remote: bool,
    rate: f64,
) -> Result<i32, CliError> {
    let mut store = open_store(cfg)?;
    let ingestor = cfg.ingestor();
    let repairs = verify::repair(&mut store, &ingestor)?;
    if !remote {
        if json {
            print_json(&repairs);
        } else {
            print_repairs(&repairs);
        }
        return Ok(exit::OK);
    }
    if !(rate > 0.0 && rate.is_finite()) {
        return Err(CliError::new(
            exit::USAGE,
            format!("--rate {rate}: expected a number of requests per second above 0"),
        ));
    }
    let r = crate::remote::build(&cfg.remote, &cfg.device_id)
        .map_err(|e| crate::config::ConfigError::keyed(src, &e))?;
    let state_dir = absolute(&cfg.paths.state_dir);
    // The conditions the daemon decides uploads by hold for this run too: it stops (and
    // goes on next time) while uploads are paused. Without a daemon only the operator's
    // pause is known.
    let hold = |s: &crate::store::Store| -> Option<String> {
        if crate::daemon::running_pid(&state_dir).is_some() {
            s.pause_reason()
                .ok()
                .flatten()
                .map(|r| format!("uploads paused ({r})"))
        } else if s.operator_paused().unwrap_or(false) {
            Some("uploads paused (paused_by_operator)".into())
        } else {
            None
        }
    };
    let check = verify::verify_remote(&mut store, &*r, rate, &hold)?;
    if check.requeued > 0 {
        commands::wake(&store)?;
    }
    if json {
        print_json(&serde_json::json!({ "local": repairs, "remote": check }));
    } else {
        print_repairs(&repairs);
        for f in &check.findings {
            println!("{}  {}  {}  {}", f.problem, f.id, f.key, f.action);
        }
        println!(
            "remote: checked {} object(s): {} ok, {} problem(s), {} requeued{}",
            check.checked,
            check.ok,
            check.findings.len(),
            check.requeued,
            match &check.stopped {
                Some(why) => format!("; stopped: {why}; run again to go on from there"),
                None => String::new(),
            }
        );
    }
    Ok(if check.complete {
        exit::OK
    } else {
        exit::FAILURE
    })
}

fn print_repairs(repairs: &[verify::Repair]) {
    if repairs.is_empty() {
        println!("verified: nothing to repair");
    } else {
        for r in repairs {
            println!("{}  {} -> {}  {}  {}", r.id, r.from, r.to, r.reason, r.path);
        }
        println!("repaired {} record(s)", repairs.len());
    }
}

pub fn pause(cfg: &Config) -> Result<i32, CliError> {
    let store = open_store(cfg)?;
    commands::pause(&store, "cli")?;
    println!("uploads paused");
    Ok(exit::OK)
}

pub fn resume(cfg: &Config) -> Result<i32, CliError> {
    let store = open_store(cfg)?;
    commands::resume(&store, "cli")?;
    println!("uploads resumed");
    Ok(exit::OK)
}

pub fn sync(cfg: &Config) -> Result<i32, CliError> {
    let store = open_store(cfg)?;
    commands::sync(&store)?;
    println!("sync requested");
    Ok(exit::OK)
}

/// How long `fieldsync reload` waits for the daemon's answer.
const RELOAD_ANSWER: std::time::Duration = std::time::Duration::from_secs(10);

/// `fieldsync reload`: asks the running daemon (through the store and the wake file) to
/// re-read its configuration and secret files, and waits for its answer. Exit 0 when it
/// applied it, 2 when it refused the new configuration (the message is the one-line
/// error of `config check`), 1 when no daemon runs or none answered in time.
pub fn reload(cfg: &Config) -> Result<i32, CliError> {
    let state_dir = absolute(&cfg.paths.state_dir);
    if crate::daemon::running_pid(&state_dir).is_none() {
        return Err(CliError::new(
            exit::FAILURE,
            format!("no daemon is running on {}", state_dir.display()),
        ));
    }
    let mut store = open_store(cfg)?;
    let seq = commands::reload(&mut store, "cli")?;
    let deadline = std::time::Instant::now() + RELOAD_ANSWER;
    loop {
        if let Some(ev) = store.reload_outcome_after(seq)? {
            let reason = ev.reason.unwrap_or_default();
            if ev.outcome == crate::store::EventOutcome::Applied {
                println!("config reloaded: {reason}");
                return Ok(exit::OK);
            }
            return Err(CliError::new(exit::USAGE, reason));
        }
        if std::time::Instant::now() >= deadline {
            return Err(CliError::new(
                exit::FAILURE,
                format!(
                    "the daemon did not answer the reload within {}s",
                    RELOAD_ANSWER.as_secs()
                ),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
