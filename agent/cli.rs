//! The `fieldsync` command line: argument parsing and the small commands.
//!
//! Every command reads or changes the queue through the store, like the daemon; a change
//! (pause, resume, retry, sync) is seen by a running daemon within a second. Errors are
//! one line; exit codes are [`exit`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::bus::Shared;
use crate::config::{Config, ConfigError, LogFormat, DEFAULT_PATH};
use crate::daemon::{self, DaemonError, RunOptions};
use crate::ingest::{absolute, Ingestor, Outcome};
use crate::store::{ListFilter, State, Store, StoreError};
use crate::{commands, status, verify};

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

/// Version, git commit and target triple, for `--version` and bug reports.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("FIELDSYNC_GIT_COMMIT"),
    ", ",
    env!("FIELDSYNC_TARGET"),
    ")"
);

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
    /// Enqueue a file against a checklist row (it does not need to be in the capture folder)
    Enqueue {
        file: PathBuf,
        #[arg(long)]
        checklist: String,
        #[arg(long, default_value = "")]
        row: String,
    },
    /// Check every record against the file system and repair what is not true
    Verify {
        #[arg(long)]
        json: bool,
    },
    /// Pause uploads (the daemon keeps ingesting)
    Pause,
    /// Resume uploads paused with `pause`
    Resume,
    /// Wake the uploader now (retries due work immediately)
    Sync,
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
    Bench(crate::bench::BenchArgs),
    /// Show every device reporting to an MQTT broker: state, pending, last upload, pause
    Fleet(crate::fleet::FleetArgs),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration and exit
    Check,
}

fn parse_state(s: &str) -> Result<State, String> {
    s.parse()
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
            _ => exit::FAILURE,
        };
        CliError::new(code, e.to_string())
    }
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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.with_target(false).try_init(),
    };
}

fn open_store(cfg: &Config) -> Result<Store, CliError> {
    let dir = absolute(&cfg.paths.state_dir);
    std::fs::create_dir_all(&dir).map_err(|e| {
        CliError::new(
            exit::FAILURE,
            format!("create directory {}: {e}", dir.display()),
        )
    })?;
    Ok(Store::open(&dir.join("queue.db"))?)
}

fn remote_name(cfg: &Config) -> String {
    crate::remote::build(&cfg.remote, &cfg.device_id)
        .map(|r| r.describe())
        .unwrap_or_else(|e| format!("invalid ({e})"))
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serialisable"));
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
    match cli.command {
        Command::Run { until_idle } => {
            daemon::run(
                cfg,
                RunOptions {
                    until_idle,
                    create_remote_root: loaded.embedded,
                },
                Arc::new(Shared::default()),
            )?;
            Ok(exit::OK)
        }
        Command::Demo => demo(cfg, loaded.embedded),
        Command::Status {
            json,
            watch,
            interval,
        } => {
            let store = open_store(&cfg)?;
            let remote = remote_name(&cfg);
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
        Command::List {
            state,
            checklist,
            row,
            limit,
            json,
        } => {
            let store = open_store(&cfg)?;
            let list = store.list(&ListFilter {
                state,
                checklist,
                row,
                limit,
            })?;
            if json {
                print_json(&list);
            } else {
                for a in &list {
                    println!(
                        "{}  {:<14} {:>10}  {}/{}/{}{}",
                        a.id,
                        a.state,
                        status::human_bytes(a.size),
                        a.checklist,
                        a.row,
                        a.filename,
                        a.last_error
                            .as_ref()
                            .map(|e| format!(
                                "  ({}: {e})",
                                a.last_error_code.as_deref().unwrap_or("")
                            ))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(exit::OK)
        }
        Command::Retry { id, failed: _ } => {
            let mut store = open_store(&cfg)?;
            let ids = commands::retry(&mut store, id.as_deref())?;
            println!("requeued {} attachment(s)", ids.len());
            Ok(exit::OK)
        }
        Command::Enqueue {
            file,
            checklist,
            row,
        } => {
            let mut store = open_store(&cfg)?;
            let ingestor = Ingestor::new(
                &cfg.paths.capture,
                &cfg.ingest,
                &cfg.remote.prefix,
                &cfg.device_id,
            );
            let path = absolute(&file);
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
        Command::Verify { json } => {
            let mut store = open_store(&cfg)?;
            let ingestor = Ingestor::new(
                &cfg.paths.capture,
                &cfg.ingest,
                &cfg.remote.prefix,
                &cfg.device_id,
            );
            let repairs = verify::repair(&mut store, &ingestor)?;
            if json {
                print_json(&repairs);
            } else if repairs.is_empty() {
                println!("verified: nothing to repair");
            } else {
                for r in &repairs {
                    println!("{}  {} -> {}  {}  {}", r.id, r.from, r.to, r.reason, r.path);
                }
                println!("repaired {} record(s)", repairs.len());
            }
            Ok(exit::OK)
        }
        Command::Pause => {
            let store = open_store(&cfg)?;
            commands::pause(&store, "cli")?;
            println!("uploads paused");
            Ok(exit::OK)
        }
        Command::Resume => {
            let store = open_store(&cfg)?;
            commands::resume(&store, "cli")?;
            println!("uploads resumed");
            Ok(exit::OK)
        }
        Command::Sync => {
            let store = open_store(&cfg)?;
            commands::sync(&store)?;
            println!("sync requested");
            Ok(exit::OK)
        }
        Command::Events { after, limit, json } => {
            let store = open_store(&cfg)?;
            let events = store.events_after(after, limit)?;
            if json {
                print_json(&events);
            } else {
                for e in &events {
                    println!(
                        "{:>6} {} {:<16} {:<8} {} {}->{} {}",
                        e.seq,
                        crate::util::rfc3339(e.time),
                        e.kind,
                        e.outcome,
                        e.attachment_id.as_deref().unwrap_or("-"),
                        e.from_state.map(|s| s.as_str()).unwrap_or(""),
                        e.to_state.map(|s| s.as_str()).unwrap_or(""),
                        e.reason.as_deref().unwrap_or("")
                    );
                }
            }
            Ok(exit::OK)
        }
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            crate::remote::build(&cfg.remote, &cfg.device_id)
                .map_err(|e| CliError::new(exit::USAGE, e))?;
            if let Some(m) = &cfg.mqtt {
                // Reads the password file and certificates, as the daemon will.
                crate::mqtt::options(m, "check", None)
                    .map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
            }
            let src = cli
                .config
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| {
                    if loaded.embedded {
                        "<embedded demo config>".into()
                    } else {
                        DEFAULT_PATH.into()
                    }
                });
            println!("config {src}: ok");
            Ok(exit::OK)
        }
        Command::Bench(args) => crate::bench::run(args),
        Command::Fleet(args) => crate::fleet::run(&cfg, args),
    }
}

/// `fieldsync demo`: a newcomer's first run, no services needed.
fn demo(cfg: Config, embedded: bool) -> Result<i32, CliError> {
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
            create_remote_root: embedded,
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
