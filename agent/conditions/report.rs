//! The `conditions` object of the status snapshot: a typed struct built by one pure
//! function from the facts, the policy and the governor's counters. The daemon stores it
//! as JSON; `status` (CLI and MQTT) reads it back and renders it. Field order is
//! alphabetical, which keeps the JSON byte-identical to the schema the README documents.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::settings::MeteredPolicy;
use super::{Facts, Policy, Reason};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConditionsReport {
    /// Conditions that raise an alarm without pausing (`disk_low`).
    pub alarms: Vec<String>,
    pub auth_failed: bool,
    pub bandwidth: BandwidthReport,
    pub battery: BatteryReport,
    pub budget: BudgetReport,
    /// The remote refused the device clock (`clock_skew`).
    pub clock_skewed: bool,
    pub cpu: CpuReport,
    /// Files held back by a per-file reason, counted by reason code.
    pub deferred: BTreeMap<String, usize>,
    pub disk: DiskReport,
    /// Every condition that holds, in priority order.
    pub failing: Vec<String>,
    pub network: NetworkReport,
    pub operator_paused: bool,
    pub schedule: ScheduleReport,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BandwidthReport {
    pub limit_bytes_per_s: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BatteryReport {
    pub charging: bool,
    pub min_percent: u8,
    pub percent: Option<u8>,
    pub present: bool,
    pub require_charging_above: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BudgetReport {
    /// The local calendar day the count is for (`YYYY-MM-DD`).
    pub day: String,
    pub limit: u64,
    pub max_file_size: Option<u64>,
    pub remaining: u64,
    /// Promised to running uploads and not yet sent.
    pub reserved: u64,
    pub used: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CpuReport {
    pub hot: bool,
    pub max_c: Option<f64>,
    pub temp_c: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiskReport {
    pub capture_free: Option<u64>,
    pub evicted_files: u64,
    pub low: bool,
    pub min_free: u64,
    pub state_free: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkReport {
    pub interface: Option<String>,
    pub metered: bool,
    pub metered_policy: MeteredPolicy,
    pub online: bool,
}

impl Default for NetworkReport {
    fn default() -> Self {
        NetworkReport {
            interface: None,
            metered: false,
            metered_policy: MeteredPolicy::Budget,
            online: false,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScheduleReport {
    pub inside: bool,
    pub metered_only: bool,
    pub windows: Vec<String>,
}

/// What the governor counts, beyond the facts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    pub budget_day: String,
    pub budget_used: u64,
    pub reserved: u64,
    pub state_free: Option<u64>,
    pub capture_free: Option<u64>,
    pub evicted_files: u64,
    pub rate: Option<u64>,
}

/// Builds the report (pure).
pub fn build(
    f: &Facts,
    p: &Policy,
    max_cpu_temp: Option<f64>,
    c: &Counters,
    failing: &[Reason],
    deferred: &BTreeMap<Reason, usize>,
) -> ConditionsReport {
    let codes = |rs: &mut dyn Iterator<Item = &Reason>| -> Vec<String> {
        rs.map(|r| r.as_str().to_string()).collect()
    };
    ConditionsReport {
        alarms: codes(&mut failing.iter().filter(|r| **r == Reason::DiskLow)),
        auth_failed: f.auth_failed,
        clock_skewed: f.clock_skewed,
        bandwidth: BandwidthReport {
            limit_bytes_per_s: c.rate,
        },
        battery: BatteryReport {
            charging: f.battery.charging,
            min_percent: p.min_battery_percent,
            percent: f.battery.percent,
            present: f.battery.present,
            require_charging_above: p.require_charging_above,
        },
        budget: BudgetReport {
            day: c.budget_day.clone(),
            limit: p.daily_budget,
            max_file_size: p.metered_max_file_size,
            remaining: p.daily_budget.saturating_sub(c.budget_used),
            reserved: c.reserved,
            used: c.budget_used,
        },
        cpu: CpuReport {
            hot: f.cpu_hot,
            max_c: max_cpu_temp,
            temp_c: f.cpu_temp,
        },
        deferred: deferred
            .iter()
            .map(|(r, n)| (r.as_str().to_string(), *n))
            .collect(),
        disk: DiskReport {
            capture_free: c.capture_free,
            evicted_files: c.evicted_files,
            low: failing.contains(&Reason::DiskLow),
            min_free: p.min_free_disk,
            state_free: c.state_free,
        },
        failing: codes(&mut failing.iter()),
        network: NetworkReport {
            interface: f.link.interface.clone(),
            metered: f.link.metered,
            metered_policy: p.metered,
            online: !f.offline,
        },
        operator_paused: f.operator_paused,
        schedule: ScheduleReport {
            inside: !failing.contains(&Reason::OutsideSchedule),
            metered_only: p.schedule_metered_only,
            windows: p.schedule.iter().map(|w| w.to_string()).collect(),
        },
    }
}

/// One line naming each condition's state; a change is a `conditions_changed` event.
pub fn summary(f: &Facts, failing: &[Reason]) -> String {
    let link = match &f.link.interface {
        Some(i) => format!(
            "{i} {}",
            if f.link.metered {
                "metered"
            } else {
                "unmetered"
            }
        ),
        None => "no default route".into(),
    };
    let battery = if !f.battery.present {
        "none"
    } else if f.battery.charging {
        "charging"
    } else if failing.contains(&Reason::BatteryLow) {
        "low"
    } else {
        "ok"
    };
    let codes: Vec<&str> = failing.iter().map(|r| r.as_str()).collect();
    format!(
        "network={} link={link} battery={battery} failing=[{}]",
        if f.offline { "offline" } else { "online" },
        codes.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::{Battery, Link};

    /// The JSON an operator's scripts parse: same keys, same order, as documented.
    #[test]
    fn report_json_keeps_the_documented_shape() {
        let f = Facts {
            link: Link {
                interface: Some("wwan0".into()),
                metered: true,
            },
            battery: Battery {
                present: true,
                percent: Some(55),
                charging: false,
            },
            ..Facts::default()
        };
        let p = Policy::default();
        let c = Counters {
            budget_day: "2026-11-22".into(),
            budget_used: 10,
            reserved: 5,
            state_free: Some(100),
            capture_free: None,
            evicted_files: 2,
            rate: Some(1000),
        };
        let mut deferred = BTreeMap::new();
        deferred.insert(Reason::MeteredFileTooLarge, 3);
        let r = build(&f, &p, Some(80.0), &c, &[Reason::DiskLow], &deferred);
        let json = serde_json::to_string(&r).unwrap();
        let expected = serde_json::json!({
            "failing": ["disk_low"],
            "alarms": ["disk_low"],
            "deferred": {"metered_file_too_large": 3},
            "operator_paused": false,
            "auth_failed": false,
            "clock_skewed": false,
            "network": {"online": true, "interface": "wwan0", "metered": true, "metered_policy": "budget"},
            "budget": {"day": "2026-11-22", "limit": p.daily_budget, "used": 10, "reserved": 5,
                       "remaining": p.daily_budget - 10, "max_file_size": p.metered_max_file_size},
            "battery": {"present": true, "percent": 55, "charging": false,
                        "min_percent": p.min_battery_percent, "require_charging_above": p.require_charging_above},
            "disk": {"state_free": 100, "capture_free": null, "min_free": p.min_free_disk, "low": true, "evicted_files": 2},
            "cpu": {"temp_c": null, "max_c": 80.0, "hot": false},
            "schedule": {"windows": [], "metered_only": p.schedule_metered_only, "inside": true},
            "bandwidth": {"limit_bytes_per_s": 1000},
        });
        // serde_json's map is sorted: the typed struct must serialise to the same bytes.
        assert_eq!(json, expected.to_string());
        let back: ConditionsReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn summary_names_each_condition() {
        let f = Facts {
            offline: true,
            ..Facts::default()
        };
        assert_eq!(
            summary(&f, &[Reason::Offline]),
            "network=offline link=no default route battery=none failing=[offline]"
        );
    }
}
