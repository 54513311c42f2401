//! The `fieldsync` command line: argument parsing and dispatch to one module per
//! subcommand group. Errors are one line; exit codes are [`exit`].
//!
//! Every command reads or changes the queue through the store, like the daemon; a change
//! (pause, resume, retry, sync) is seen by a running daemon within a second.
//!
//! Module shape: this file imports the subcommands; they import only the leaves
//! [`error`] (exit codes, [`CliError`]) and [`common`] (version, store, JSON), never this
//! file or each other. `bench` exists only with the `bench` cargo feature, `fleet` only
//! with `fleet` (on by default; off in the device build).

mod common;
mod config;
mod error;
mod expire;
mod list;
mod queue;
mod run;
mod status;

#[cfg(feature = "bench")]
mod bench;
#[cfg(feature = "fleet")]
pub mod fleet;

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, LogFormat, DEFAULT_PATH};
use crate::store::{ListFilter, State};

pub use common::LONG_VERSION;
pub use error::{exit, CliError};

#[derive(Debug, Parser)]
#[command(name = "fieldsync", version = LONG_VERSION, about = "Uploads inspection photos from field devices to object storage")]
pub struct Cli {
    /// Configuration file [default: /etc/fieldsync/fieldsync.toml, else the embedded demo]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Log format (overrides log.format)
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormatArg>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon
    Run {
        /// Exit once nothing is pending
        #[arg(long)]
        until_idle: bool,
    },
    /// Drop sample photos into the demo capture folder, upload them, show the status
    Demo,
    /// Show the queue: counts, progress, pause reason, last success and error
    Status {
        #[arg(long)]
        json: bool,
        /// Refresh until interrupted
        #[arg(long)]
        watch: bool,
        /// Refresh interval for --watch
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: Duration,
    },
    /// List attachments
    List {
        #[arg(long, value_parser = parse_state)]
        state: Option<State>,
        #[arg(long)]
        checklist: Option<String>,
        #[arg(long)]
        row: Option<String>,
        #[arg(long)]
        limit: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// Requeue a failed attachment (by id), or all failed ones
    Retry {
        #[arg(required_unless_present = "failed", conflicts_with = "failed")]
        id: Option<String>,
        #[arg(long)]
        failed: bool,
    },
    /// Delete an attachment everywhere: the remote object (or its unfinished upload), then
    /// the local copy; it stays as an `archived` record (reason `deleted`)
    Delete { id: String },
    /// Enqueue a file against a checklist row (it does not need to be in the capture folder)
    Enqueue {
        file: PathBuf,
        #[arg(long)]
        checklist: String,
        #[arg(long, default_value = "")]
        row: String,
    },
    /// Check every record against the file system and repair what is not true; with
    /// --remote, also every uploaded object in the remote
    Verify {
        #[arg(long)]
        json: bool,
        /// Check every uploaded object's existence, size and sha256 in the remote, and
        /// requeue a photo whose object is missing or wrong while its local copy is intact
        #[arg(long)]
        remote: bool,
        /// Remote requests per second at most (with --remote)
        #[arg(long, default_value_t = 10.0, requires = "remote")]
        rate: f64,
    },
    /// Remove the oldest archived records beyond retention.archived_cache_limit (and
    /// their downloaded inbox copies) now; prints what was removed
    Expire {
        /// Keep at most this many archived records instead of the configured limit
        #[arg(long)]
        limit: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Pause uploads (the daemon keeps ingesting)
    Pause,
    /// Resume uploads paused with `pause`
    Resume,
    /// Wake the uploader now (retries due work immediately)
    Sync,
    /// Make the running daemon re-read its configuration and secret files
    Reload,
    /// Show the event log
    Events {
        /// Only events after this sequence number
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Configuration commands
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Measure ingest and upload speed, memory and idle cost (prints numbers)
    #[cfg(feature = "bench")]
    Bench(bench::BenchArgs),
    /// Show every device reporting to an MQTT broker: state, pending, last upload, pause
    #[cfg(feature = "fleet")]
    Fleet(fleet::FleetArgs),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration and exit
    Check,
}

/// Parses the command line. Help and `--version` are printed and exit 0 as usual; a bad
/// command line is a [`CliError`] of one line (exit 2), like every other error.
pub fn parse() -> Result<Cli, CliError> {
    Cli::try_parse().map_err(|e| {
        use clap::error::ErrorKind;
        if matches!(
            e.kind(),
            ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        ) {
            e.exit()
        }
        CliError::new(exit::USAGE, usage_line(&e.render().to_string()))
    })
}

/// clap's message in one line: its first paragraph (the usage and tips that follow are in
/// `--help`), without the `error: ` prefix.
fn usage_line(rendered: &str) -> String {
    let first = rendered.trim().split("\n\n").next().unwrap_or("");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    first.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn parse_state(s: &str) -> Result<State, String> {
    s.parse()
}

/// Where the configuration came from.
pub struct Loaded {
    pub cfg: Config,
    pub embedded: bool,
}

/// `--config PATH`, else the default path if it exists, else the embedded demo config.
pub fn load_config(path: Option<&Path>) -> Result<Loaded, CliError> {
    match path {
        Some(p) => Ok(Loaded {
            cfg: Config::load(p)?,
            embedded: false,
        }),
        None if Path::new(DEFAULT_PATH).exists() => Ok(Loaded {
            cfg: Config::load(Path::new(DEFAULT_PATH))?,
            embedded: false,
        }),
        None => Ok(Loaded {
            cfg: Config::demo(),
            embedded: true,
        }),
    }
}

fn init_logging(cfg: &Config, arg: Option<LogFormatArg>, daemon: bool) {
    let format = match arg {
        Some(LogFormatArg::Json) => LogFormat::Json,
        Some(LogFormatArg::Text) => LogFormat::Text,
        None => cfg.log.format,
    };
    // Commands other than the daemon stay quiet unless something is wrong.
    let level = if daemon {
        cfg.log.level.as_str()
    } else {
        "warn"
    };
    // `RUST_LOG` wins when it parses; the syntax is the same target=level list.
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| crate::config::log_filter(&v).ok())
        .or_else(|| crate::config::log_filter(level).ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let registry = tracing_subscriber::registry();
    let _ = match format {
        LogFormat::Json => registry
            .with(layer.json().flatten_event(true).with_filter(filter))
            .try_init(),
        LogFormat::Text => registry
            .with(layer.with_target(false).with_filter(filter))
            .try_init(),
    };
}

/// Runs the parsed command; returns the exit code.
pub fn run(cli: Cli) -> Result<i32, CliError> {
    let loaded = load_config(cli.config.as_deref())?;
    let cfg = loaded.cfg;
    let is_daemon = matches!(cli.command, Command::Run { .. } | Command::Demo);
    init_logging(&cfg, cli.log_format, is_daemon);
    if loaded.embedded && is_daemon {
        tracing::info!(
            "no config file given and {DEFAULT_PATH} absent: using the embedded demo config"
        );
    }
    // How configuration errors name the configuration.
    let src = crate::config::source(cli.config.as_deref(), loaded.embedded);
    match cli.command {
        Command::Run { until_idle } => {
            // A capture folder that is a file, or a state directory that cannot be
            // created, is the configuration's fault: exit 2 naming the key, once.
            cfg.check_paths(&src, true)?;
            let path = match cli.config {
                Some(p) => Some(p),
                None if loaded.embedded => None,
                None => Some(PathBuf::from(DEFAULT_PATH)),
            };
            run::run(cfg, until_idle, path)
        }
        Command::Demo => run::demo(cfg),
        Command::Status {
            json,
            watch,
            interval,
        } => status::run(&cfg, json, watch, interval),
        Command::List {
            state,
            checklist,
            row,
            limit,
            json,
        } => list::list(
            &cfg,
            &ListFilter {
                state,
                checklist,
                row,
                limit,
            },
            json,
        ),
        Command::Retry { id, failed: _ } => queue::retry(&cfg, id.as_deref()),
        Command::Delete { id } => queue::delete(&cfg, &id),
        Command::Enqueue {
            file,
            checklist,
            row,
        } => queue::enqueue(&cfg, &file, checklist, row),
        Command::Verify { json, remote, rate } => queue::verify(&cfg, &src, json, remote, rate),
        Command::Expire { limit, json } => expire::run(&cfg, limit, json),
        Command::Pause => queue::pause(&cfg),
        Command::Resume => queue::resume(&cfg),
        Command::Sync => queue::sync(&cfg),
        Command::Reload => queue::reload(&cfg),
        Command::Events { after, limit, json } => list::events(&cfg, after, limit, json),
        Command::Config {
            command: ConfigCommand::Check,
        } => config::check(&cfg, cli.config.as_deref(), loaded.embedded),
        #[cfg(feature = "bench")]
        Command::Bench(args) => bench::run(args),
        #[cfg(feature = "fleet")]
        Command::Fleet(args) => fleet::run(&cfg, &src, args),
    }
}
