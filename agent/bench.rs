//! `fieldsync bench`: prints throughput, memory and idle-cost numbers.

use crate::cli::CliError;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Which benchmark to run: `conditions` (probe cost, idle daemon CPU, rate limiter)
    pub suite: Option<String>,
    /// Seconds to watch an idle daemon's CPU time (`conditions`; 0 skips)
    #[arg(long, default_value_t = 60)]
    pub idle_secs: u64,
}

pub fn run(args: BenchArgs) -> Result<i32, CliError> {
    if args.suite.as_deref() == Some("conditions") {
        crate::conditions::bench::run(args.idle_secs).map_err(|e| {
            CliError::new(crate::cli::exit::FAILURE, format!("bench conditions: {e}"))
        })?;
    }
    Ok(0)
}
