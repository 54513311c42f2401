//! What several subcommands share: the version string, opening the queue, naming the
//! remote, printing JSON. A leaf beside [`super::error`]: no subcommand is imported here.

use crate::config::Config;
use crate::ingest::absolute;
use crate::store::Store;

use super::error::{exit, CliError};

/// Version, git commit and target triple, for `--version` and bug reports.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("FIELDSYNC_GIT_COMMIT"),
    ", ",
    env!("FIELDSYNC_TARGET"),
    ")"
);

/// The queue of the configured state directory, created if missing.
pub fn open_store(cfg: &Config) -> Result<Store, CliError> {
    let dir = absolute(&cfg.paths.state_dir);
    std::fs::create_dir_all(&dir).map_err(|e| {
        CliError::new(
            exit::FAILURE,
            format!("create directory {}: {e}", dir.display()),
        )
    })?;
    Ok(Store::open(&dir.join("queue.db"))?)
}

/// The remote as `status` names it, or why it is invalid.
pub fn remote_name(cfg: &Config) -> String {
    crate::remote::build(&cfg.remote, &cfg.device_id)
        .map(|r| r.describe())
        .unwrap_or_else(|e| format!("invalid ({e})"))
}

pub fn print_json<T: serde::Serialize>(v: &T) {
    let _ = write_json(v);
}

/// `v` as pretty JSON and a newline on stdout, through one buffer: a large list is
/// written in 64 KiB writes, not a write per line, and never held as one string. A
/// closed pipe (`| head`) ends the output quietly.
pub fn write_json<T: serde::Serialize>(v: &T) -> Result<(), serde_json::Error> {
    use std::io::Write;
    let mut w = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
    serde_json::to_writer_pretty(&mut w, v)?;
    writeln!(w).map_err(serde_json::Error::io)?;
    w.flush().map_err(serde_json::Error::io)
}
