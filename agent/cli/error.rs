//! What every subcommand returns: the documented exit codes and [`CliError`], a one-line
//! message with its code. A leaf: subcommands import it, it imports none of them.

use crate::config::ConfigError;
use crate::daemon::DaemonError;
use crate::store::StoreError;

/// Documented exit codes.
pub mod exit {
    pub const OK: i32 = 0;
    /// A runtime failure: I/O, database, remote.
    pub const FAILURE: i32 = 1;
    /// Bad command line or configuration.
    pub const USAGE: i32 = 2;
    /// The named attachment does not exist or is not in a state the command applies to.
    pub const NOT_FOUND: i32 = 3;
    /// Another daemon already runs on this state directory.
    pub const ALREADY_RUNNING: i32 = 4;
}

/// An error for the top level: its one-line message and exit code.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct CliError {
    pub msg: String,
    pub code: i32,
}

impl CliError {
    pub fn new(code: i32, msg: impl Into<String>) -> Self {
        CliError {
            msg: msg.into(),
            code,
        }
    }
}

impl From<ConfigError> for CliError {
    fn from(e: ConfigError) -> Self {
        CliError::new(exit::USAGE, e.to_string())
    }
}

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> Self {
        let code = match e {
            StoreError::NotFound(_) | StoreError::BadTransition { .. } => exit::NOT_FOUND,
            _ => exit::FAILURE,
        };
        CliError::new(code, e.to_string())
    }
}

impl From<DaemonError> for CliError {
    fn from(e: DaemonError) -> Self {
        let code = match e {
            DaemonError::AlreadyRunning { .. } => exit::ALREADY_RUNNING,
            DaemonError::Config(_) => exit::USAGE,
            _ => exit::FAILURE,
        };
        CliError::new(code, e.to_string())
    }
}
