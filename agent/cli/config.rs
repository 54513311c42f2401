//! `fieldsync config check`: the configuration as the daemon would load it, remote and
//! MQTT credentials included.

use std::path::Path;

use crate::config::{source, Config, ConfigError};

use super::error::{exit, CliError};

/// `path` is the `--config` argument; `embedded` is true on the embedded demo config.
pub fn check(cfg: &Config, path: Option<&Path>, embedded: bool) -> Result<i32, CliError> {
    let src = source(path, embedded);
    cfg.check_paths(&src, false)?;
    // Reads the credentials and CA files, as the daemon will.
    crate::remote::build(&cfg.remote, &cfg.device_id).map_err(|e| ConfigError::keyed(&src, &e))?;
    if let Some(m) = &cfg.mqtt {
        // Reads the password file and certificates, as the daemon will.
        crate::mqtt::options(m, "check", None)
            .map_err(|e| ConfigError::keyed(&src, &e.to_string()))?;
    }
    println!("config {src}: ok");
    Ok(exit::OK)
}
