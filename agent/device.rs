//! Device health for the status snapshot: uptime, 1-minute load, memory, and the agent
//! daemon's own resident memory and CPU time.
//!
//! Read with `sysinfo`, refreshing only what is shown: RAM (`/proc/meminfo`), and for one
//! process its memory and CPU times (`/proc/<pid>/statm`, `stat`; no task list, no command
//! line, no environment). Uptime and load are plain reads. The daemon samples at the MQTT
//! heartbeat, never on every status change; the CLI samples once per `status`, reporting
//! the daemon's process (its pid is in the store), not its own.

use serde::{Deserialize, Serialize};
use sysinfo::{MemoryRefreshKind, Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// The `device` object of the snapshot. `null` fields are unknown: no daemon runs (its
/// RSS and CPU time), or the platform does not say.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DeviceHealth {
    /// Seconds since the device booted.
    pub uptime_s: Option<u64>,
    /// Load average over the last minute.
    pub load_1m: Option<f64>,
    pub mem_total_bytes: Option<u64>,
    /// Memory available to new work without swapping (`MemAvailable`).
    pub mem_available_bytes: Option<u64>,
    /// The agent daemon's resident memory.
    pub rss_bytes: Option<u64>,
    /// CPU time the agent daemon used since it started (user + system), in seconds.
    pub cpu_s: Option<f64>,
}

/// Samples the device and one process, keeping sysinfo's state between samples (the
/// daemon samples its own process once per heartbeat).
pub struct Sampler {
    sys: System,
    pid: Option<Pid>,
}

impl Sampler {
    /// `pid`: the agent daemon's process, if one runs.
    pub fn new(pid: Option<u32>) -> Sampler {
        Sampler {
            sys: System::new(),
            pid: pid.map(Pid::from_u32),
        }
    }

    /// For the daemon: its own process.
    pub fn own() -> Sampler {
        Sampler::new(Some(std::process::id()))
    }

    pub fn sample(&mut self) -> DeviceHealth {
        self.sys
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let total = self.sys.total_memory();
        let (rss_bytes, cpu_s) = match self.pid {
            Some(pid) => {
                self.sys.refresh_processes_specifics(
                    ProcessesToUpdate::Some(&[pid]),
                    true,
                    ProcessRefreshKind::nothing()
                        .without_tasks()
                        .with_memory()
                        .with_cpu(),
                );
                match self.sys.process(pid) {
                    Some(p) => (
                        Some(p.memory()),
                        Some(p.accumulated_cpu_time() as f64 / 1000.0),
                    ),
                    None => (None, None),
                }
            }
            None => (None, None),
        };
        let uptime = System::uptime();
        DeviceHealth {
            uptime_s: (uptime > 0).then_some(uptime),
            load_1m: (total > 0).then(|| System::load_average().one),
            mem_total_bytes: (total > 0).then_some(total),
            mem_available_bytes: (total > 0).then(|| self.sys.available_memory()),
            rss_bytes,
            cpu_s,
        }
    }
}

/// One sample of the device and of process `pid` (the CLI's `status`).
pub fn sample(pid: Option<u32>) -> DeviceHealth {
    Sampler::new(pid).sample()
}

/// The text `fieldsync status` shows after `device: ` (pure): `up 3h12m, load 0.21, mem
/// 412 MB free of 1.9 GB, agent 8.1 MB RSS, 1.2 s CPU`. Unknown parts are left out.
pub fn summary(d: &DeviceHealth) -> String {
    let mut parts = Vec::new();
    if let Some(s) = d.uptime_s {
        parts.push(format!("up {}", uptime(s)));
    }
    if let Some(l) = d.load_1m {
        parts.push(format!("load {l:.2}"));
    }
    match (d.mem_available_bytes, d.mem_total_bytes) {
        (Some(a), Some(t)) => parts.push(format!("mem {} free of {}", bytes(a), bytes(t))),
        (None, Some(t)) => parts.push(format!("mem {}", bytes(t))),
        _ => {}
    }
    match (d.rss_bytes, d.cpu_s) {
        (Some(r), Some(c)) => parts.push(format!("agent {} RSS, {c:.1} s CPU", bytes(r))),
        (Some(r), None) => parts.push(format!("agent {} RSS", bytes(r))),
        _ => {}
    }
    if parts.is_empty() {
        "unknown".into()
    } else {
        parts.join(", ")
    }
}

/// `42s`, `5m`, `3h12m`, `4d3h`: two units at most, for a glance.
fn uptime(s: u64) -> String {
    let (d, h, m) = (s / 86_400, s / 3600 % 24, s / 60 % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m")
    } else {
        format!("{s}s")
    }
}

/// Decimal units with two significant digits where that is enough (`8.1 MB`, `412 MB`).
fn bytes(b: u64) -> String {
    let b = b as f64;
    let (v, unit) = if b >= 1e9 {
        (b / 1e9, "GB")
    } else if b >= 1e6 {
        (b / 1e6, "MB")
    } else if b >= 1e3 {
        (b / 1e3, "kB")
    } else {
        return format!("{b} B");
    };
    if v < 10.0 {
        format!("{v:.1} {unit}")
    } else {
        format!("{v:.0} {unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_is_one_short_line_and_leaves_out_the_unknown() {
        let d = DeviceHealth {
            uptime_s: Some(3 * 3600 + 12 * 60 + 5),
            load_1m: Some(0.214),
            mem_total_bytes: Some(1_900_000_000),
            mem_available_bytes: Some(412_300_000),
            rss_bytes: Some(8_100_000),
            cpu_s: Some(1.23),
        };
        assert_eq!(
            summary(&d),
            "up 3h12m, load 0.21, mem 412 MB free of 1.9 GB, agent 8.1 MB RSS, 1.2 s CPU"
        );
        let no_daemon = DeviceHealth {
            rss_bytes: None,
            cpu_s: None,
            uptime_s: Some(2 * 86_400 + 5 * 3600),
            ..d
        };
        assert_eq!(
            summary(&no_daemon),
            "up 2d5h, load 0.21, mem 412 MB free of 1.9 GB"
        );
        assert_eq!(summary(&DeviceHealth::default()), "unknown");
        assert_eq!(uptime(59), "59s");
        assert_eq!(uptime(61), "1m");
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(12_345), "12 kB");
    }

    #[test]
    fn sampling_this_process_sees_its_memory_and_cpu() {
        // Burn a little CPU so the counter is not zero on a fast machine.
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let d = Sampler::own().sample();
        assert!(d.rss_bytes.is_some_and(|r| r > 0), "{d:?}");
        assert!(d.cpu_s.is_some(), "{d:?}");
        assert!(d.mem_total_bytes >= d.mem_available_bytes, "{d:?}");
        assert!(d.uptime_s.is_some_and(|u| u > 0), "{d:?}");
        assert_eq!(sample(None).rss_bytes, None);
    }
}
