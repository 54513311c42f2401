//! `fieldsync bench`: prints throughput, memory and idle-cost numbers.

use crate::cli::CliError;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// MQTT: bytes per status message (JSON vs CBOR), daemon RSS with MQTT on vs off
    #[arg(long)]
    pub mqtt: bool,
    /// Broker for --mqtt as HOST:PORT [default: start a local mosquitto]
    #[arg(long, requires = "mqtt", value_name = "HOST:PORT")]
    pub mqtt_broker: Option<String>,
}

pub fn run(args: BenchArgs) -> Result<i32, CliError> {
    if args.mqtt {
        return crate::mqtt_bench::run(args.mqtt_broker.as_deref());
    }
    Ok(0)
}
