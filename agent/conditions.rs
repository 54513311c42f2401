//! Conditions: whether uploads may run now and, if not, the one reason why.
//!
//! The decision is a pure function over observed [`Facts`] and the configured [`Policy`],
//! so every combination is unit-tested without I/O. Around it:
//! - [`probes`] reads the facts at the edges (procfs route, sysfs battery and thermal
//!   zones, statvfs, local time);
//! - [`governor`] holds the observed facts, the metered-data budget and the rate limiter,
//!   admits files (tickets), and writes the [`report`] and events to the store;
//! - [`monitor`] is the task that keeps the governor's facts current (probe rounds,
//!   offline backoff, retention sweeps) and wakes the scheduler on a change;
//! - [`retention`] evicts local copies of uploaded files when the disk runs low;
//! - [`settings`] holds the `[conditions]` and `[retention]` configuration.

use serde::Serialize;

pub mod governor;
pub mod monitor;
pub mod probes;
pub mod report;
pub mod retention;
pub mod settings;

use settings::{MeteredPolicy, Window};

/// Why uploads (or one file's upload) may not run. One stable code per condition; shown
/// in status and on MQTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// `fieldsync pause` or an MQTT `cmd/pause`.
    PausedByOperator,
    /// The remote refused our credentials (401/403); re-checked periodically.
    Auth,
    /// The remote refused the request's time: the device clock is wrong (no RTC, NTP not
    /// synced yet); re-checked until the remote accepts it.
    ClockSkew,
    /// The remote does not answer.
    Offline,
    /// The default route is metered and `metered = "never"`.
    MeteredNever,
    /// Outside the configured upload windows.
    OutsideSchedule,
    /// Today's metered byte budget is used up (or too little is left for a file).
    MeteredBudgetSpent,
    /// Per file: larger than `metered_max_file_size` while on a metered link.
    MeteredFileTooLarge,
    /// Battery below `min_battery_percent` and not charging.
    BatteryLow,
    /// Per file: larger than `require_charging_above` and not charging.
    ChargingRequired,
    /// CPU above `max_cpu_temp`.
    CpuHot,
    /// Free disk below `min_free_disk` after eviction. An alarm, not a pause: uploading is
    /// what lets local copies be evicted, so stopping it would only make things worse.
    DiskLow,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PausedByOperator => "paused_by_operator",
            Reason::Auth => "auth",
            Reason::ClockSkew => "clock_skew",
            Reason::Offline => "offline",
            Reason::MeteredNever => "metered_never",
            Reason::OutsideSchedule => "outside_schedule",
            Reason::MeteredBudgetSpent => "metered_budget_spent",
            Reason::MeteredFileTooLarge => "metered_file_too_large",
            Reason::BatteryLow => "battery_low",
            Reason::ChargingRequired => "charging_required",
            Reason::CpuHot => "cpu_hot",
            Reason::DiskLow => "disk_low",
        }
    }

    /// Whether this reason stops uploads already running (at their next chunk or part).
    /// A spent budget does not: every running metered upload holds a reservation that
    /// fits the budget, and stopping it just before its last byte would waste what it
    /// already spent.
    pub fn stops_running(self) -> bool {
        self != Reason::MeteredBudgetSpent
    }
}

/// The link carrying the default route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Link {
    /// Interface name; `None` when there is no default route (or it cannot be read):
    /// a remote that answers is then on the local network and costs nothing.
    pub interface: Option<String>,
    pub metered: bool,
}

/// What the power-supply class reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Battery {
    /// False on devices without a battery: they always pass.
    pub present: bool,
    /// Lowest capacity of the system batteries, when readable.
    pub percent: Option<u8>,
    /// Charging, full, or on mains/USB power.
    pub charging: bool,
}

/// What the probes and the uploader observed. Numbers, not verdicts: [`evaluate`] turns
/// them into a decision with the [`Policy`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Facts {
    pub operator_paused: bool,
    pub auth_failed: bool,
    /// The remote refused the device clock (`RequestTimeTooSkewed`).
    pub clock_skewed: bool,
    pub offline: bool,
    pub link: Link,
    /// Bytes sent over metered links today (local calendar day).
    pub budget_used: u64,
    pub battery: Battery,
    /// Free bytes on the fuller of the state and capture volumes.
    pub disk_free: Option<u64>,
    /// Hottest thermal zone, °C.
    pub cpu_temp: Option<f64>,
    /// `cpu_temp` above the limit, with hysteresis (see [`cpu_hot`]).
    pub cpu_hot: bool,
    /// Local time, minutes after midnight (schedule windows).
    pub minute_of_day: u16,
}

/// The configured thresholds the decision applies (from `[conditions]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub metered: MeteredPolicy,
    pub daily_budget: u64,
    pub metered_max_file_size: Option<u64>,
    pub min_battery_percent: u8,
    pub require_charging_above: Option<u64>,
    pub min_free_disk: u64,
    pub schedule: Vec<Window>,
    pub schedule_metered_only: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::from(&settings::Conditions::default())
    }
}

impl From<&settings::Conditions> for Policy {
    fn from(c: &settings::Conditions) -> Self {
        Policy {
            metered: c.metered,
            daily_budget: c.metered_daily_budget.0,
            metered_max_file_size: c.metered_max_file_size.map(|s| s.0),
            min_battery_percent: c.min_battery_percent,
            require_charging_above: c.require_charging_above.map(|s| s.0),
            min_free_disk: c.min_free_disk.0,
            schedule: c.schedule.clone(),
            schedule_metered_only: c.schedule_metered_only,
        }
    }
}

/// Every condition with whether it fails now, in priority order: the first failing one
/// that pauses is the reason shown. Operator intent comes first, then what an operator
/// must fix (credentials), then the network (nothing else matters offline), then
/// configured policy (link cost, schedule), then the device's own state.
pub fn checks(f: &Facts, p: &Policy) -> [(Reason, bool); 10] {
    let metered_budget = f.link.metered && p.metered == MeteredPolicy::Budget;
    let scheduled = p.schedule.is_empty()
        || (p.schedule_metered_only && !f.link.metered)
        || p.schedule.iter().any(|w| w.contains(f.minute_of_day));
    let battery_low = f.battery.present
        && !f.battery.charging
        && f.battery
            .percent
            .is_some_and(|pc| pc < p.min_battery_percent);
    [
        (Reason::PausedByOperator, f.operator_paused),
        (Reason::Auth, f.auth_failed),
        (Reason::ClockSkew, f.clock_skewed),
        (Reason::Offline, f.offline),
        (
            Reason::MeteredNever,
            f.link.metered && p.metered == MeteredPolicy::Never,
        ),
        (Reason::OutsideSchedule, !scheduled),
        (
            Reason::MeteredBudgetSpent,
            metered_budget && f.budget_used >= p.daily_budget,
        ),
        (Reason::BatteryLow, battery_low),
        (Reason::CpuHot, f.cpu_hot),
        (
            Reason::DiskLow,
            p.min_free_disk > 0 && f.disk_free.is_some_and(|d| d < p.min_free_disk),
        ),
    ]
}

/// The reason uploads may not run, or `None` when they may.
pub fn evaluate(f: &Facts, p: &Policy) -> Option<Reason> {
    checks(f, p)
        .into_iter()
        .find(|(r, failing)| *failing && *r != Reason::DiskLow)
        .map(|(r, _)| r)
}

/// Every failing condition (pausing or not), for status.
pub fn failing(f: &Facts, p: &Policy) -> Vec<Reason> {
    checks(f, p)
        .into_iter()
        .filter(|(_, failing)| *failing)
        .map(|(r, _)| r)
        .collect()
}

/// Whether one file may start (or go on) uploading when uploads as a whole may run.
/// `remaining` is what is left to send of `size`; `committed` is today's metered bytes
/// used plus those reserved by metered uploads already running.
pub fn admit(
    f: &Facts,
    p: &Policy,
    size: u64,
    remaining: u64,
    committed: u64,
) -> Result<(), Reason> {
    if f.link.metered && p.metered == MeteredPolicy::Budget {
        if p.metered_max_file_size.is_some_and(|max| size > max) {
            return Err(Reason::MeteredFileTooLarge);
        }
        // A file that cannot finish within today's budget waits rather than spend the
        // budget on bytes a restart would send again.
        if committed.saturating_add(remaining) > p.daily_budget {
            return Err(Reason::MeteredBudgetSpent);
        }
    }
    if f.battery.present
        && !f.battery.charging
        && p.require_charging_above.is_some_and(|max| size > max)
    {
        return Err(Reason::ChargingRequired);
    }
    Ok(())
}

/// Degrees below the limit the CPU must cool to before uploads resume, so a temperature
/// hovering at the limit does not toggle uploads every probe.
pub const CPU_HYSTERESIS: f64 = 5.0;

/// Whether the CPU counts as hot now, given whether it did at the last probe.
pub fn cpu_hot(was_hot: bool, temp: Option<f64>, max: Option<f64>) -> bool {
    match (temp, max) {
        (Some(t), Some(max)) if was_hot => t > max - CPU_HYSTERESIS,
        (Some(t), Some(max)) => t > max,
        _ => false,
    }
}

/// Classifies an interface by the glob lists: metered first (so `unmetered = ["*"]` with
/// `metered = ["wwan*"]` reads as "everything but the modem is free"), then unmetered; an
/// interface in neither list counts as metered, so an unknown data plan is never spent
/// by surprise.
pub fn is_metered(iface: &str, unmetered: &[String], metered: &[String]) -> bool {
    use crate::util::glob_match;
    metered.iter().any(|g| glob_match(g, iface)) || !unmetered.iter().any(|g| glob_match(g, iface))
}

#[cfg(test)]
mod tests {
    use super::*;
    use settings::parse_window;

    fn ok_facts() -> Facts {
        Facts {
            link: Link {
                interface: Some("wlan0".into()),
                metered: false,
            },
            battery: Battery {
                present: true,
                percent: Some(80),
                charging: false,
            },
            disk_free: Some(10_000_000_000),
            cpu_temp: Some(40.0),
            minute_of_day: 12 * 60,
            ..Facts::default()
        }
    }

    fn metered(mut f: Facts) -> Facts {
        f.link = Link {
            interface: Some("wwan0".into()),
            metered: true,
        };
        f
    }

    #[test]
    fn all_clear_runs() {
        let p = Policy::default();
        assert_eq!(evaluate(&ok_facts(), &p), None);
        assert!(failing(&ok_facts(), &p).is_empty());
        assert_eq!(
            evaluate(&Facts::default(), &p),
            None,
            "no battery, no data: runs"
        );
    }

    #[test]
    fn each_condition_alone() {
        let p = Policy {
            schedule: vec![parse_window("20:00-06:00").unwrap()],
            ..Policy::default()
        };
        let night = |mut f: Facts| {
            f.minute_of_day = 22 * 60;
            f
        };
        let cases: Vec<(Facts, Option<Reason>)> = vec![
            (
                night(Facts {
                    operator_paused: true,
                    ..ok_facts()
                }),
                Some(Reason::PausedByOperator),
            ),
            (
                night(Facts {
                    auth_failed: true,
                    ..ok_facts()
                }),
                Some(Reason::Auth),
            ),
            (
                night(Facts {
                    offline: true,
                    ..ok_facts()
                }),
                Some(Reason::Offline),
            ),
            (ok_facts(), Some(Reason::OutsideSchedule)),
            (
                night(Facts {
                    budget_used: 50_000_000,
                    ..metered(ok_facts())
                }),
                Some(Reason::MeteredBudgetSpent),
            ),
            (
                night(Facts {
                    battery: Battery {
                        present: true,
                        percent: Some(10),
                        charging: false,
                    },
                    ..ok_facts()
                }),
                Some(Reason::BatteryLow),
            ),
            (
                night(Facts {
                    cpu_hot: true,
                    ..ok_facts()
                }),
                Some(Reason::CpuHot),
            ),
            (night(ok_facts()), None),
        ];
        for (f, want) in cases {
            assert_eq!(evaluate(&f, &p), want, "{f:?}");
            assert_eq!(failing(&f, &p), want.into_iter().collect::<Vec<_>>());
        }
        let never = Policy {
            metered: MeteredPolicy::Never,
            ..Policy::default()
        };
        assert_eq!(
            evaluate(&metered(ok_facts()), &never),
            Some(Reason::MeteredNever)
        );
        assert_eq!(
            evaluate(&ok_facts(), &never),
            None,
            "unmetered link is fine"
        );
    }

    #[test]
    fn disk_low_is_reported_but_never_pauses() {
        let p = Policy::default();
        let f = Facts {
            disk_free: Some(1000),
            ..ok_facts()
        };
        assert_eq!(evaluate(&f, &p), None);
        assert_eq!(failing(&f, &p), vec![Reason::DiskLow]);
        let off = Policy {
            min_free_disk: 0,
            ..Policy::default()
        };
        assert!(failing(&f, &off).is_empty(), "0 disables the check");
        let unknown = Facts {
            disk_free: None,
            ..ok_facts()
        };
        assert!(failing(&unknown, &p).is_empty());
    }

    #[test]
    fn combinations_follow_priority_order() {
        let p = Policy {
            schedule: vec![parse_window("20:00-06:00").unwrap()],
            ..Policy::default()
        };
        // Everything fails at once: each layer peeled off reveals the next reason.
        let mut f = metered(Facts {
            operator_paused: true,
            auth_failed: true,
            offline: true,
            budget_used: u64::MAX,
            battery: Battery {
                present: true,
                percent: Some(5),
                charging: false,
            },
            cpu_hot: true,
            disk_free: Some(0),
            ..ok_facts()
        });
        let order = [
            Reason::PausedByOperator,
            Reason::Auth,
            Reason::Offline,
            Reason::OutsideSchedule,
            Reason::MeteredBudgetSpent,
            Reason::BatteryLow,
            Reason::CpuHot,
        ];
        assert_eq!(failing(&f, &p).len(), 8, "all pausing ones plus disk_low");
        for want in order {
            assert_eq!(evaluate(&f, &p), Some(want));
            match want {
                Reason::PausedByOperator => f.operator_paused = false,
                Reason::Auth => f.auth_failed = false,
                Reason::Offline => f.offline = false,
                Reason::OutsideSchedule => f.minute_of_day = 23 * 60,
                Reason::MeteredBudgetSpent => f.budget_used = 0,
                Reason::BatteryLow => f.battery.charging = true,
                Reason::CpuHot => f.cpu_hot = false,
                _ => unreachable!(),
            }
        }
        assert_eq!(evaluate(&f, &p), None);
        // metered = "never" outranks the schedule and the budget.
        let never = Policy {
            metered: MeteredPolicy::Never,
            ..p.clone()
        };
        let f = metered(Facts {
            budget_used: u64::MAX,
            ..ok_facts()
        });
        assert_eq!(evaluate(&f, &never), Some(Reason::MeteredNever));
    }

    #[test]
    fn battery_passes_when_charging_absent_or_unreadable() {
        let p = Policy::default();
        let bat = |percent, charging, present| Facts {
            battery: Battery {
                present,
                percent,
                charging,
            },
            ..ok_facts()
        };
        assert_eq!(evaluate(&bat(Some(10), true, true), &p), None, "charging");
        assert_eq!(evaluate(&bat(Some(25), false, true), &p), None, "at limit");
        assert_eq!(
            evaluate(&bat(Some(24), false, true), &p),
            Some(Reason::BatteryLow)
        );
        assert_eq!(evaluate(&bat(None, false, true), &p), None, "unreadable");
        assert_eq!(
            evaluate(&bat(Some(1), false, false), &p),
            None,
            "no battery"
        );
        let off = Policy {
            min_battery_percent: 0,
            ..Policy::default()
        };
        assert_eq!(evaluate(&bat(Some(0), false, true), &off), None);
    }

    #[test]
    fn budget_and_schedule_apply_to_metered_links_only() {
        let p = Policy {
            schedule: vec![parse_window("20:00-06:00").unwrap()],
            schedule_metered_only: true,
            ..Policy::default()
        };
        let spent = Facts {
            budget_used: 60_000_000,
            ..ok_facts()
        };
        assert_eq!(evaluate(&spent, &p), None, "unmetered, daytime");
        assert_eq!(
            evaluate(&metered(spent.clone()), &p),
            Some(Reason::OutsideSchedule)
        );
        let unlimited = Policy {
            metered: MeteredPolicy::Unlimited,
            ..Policy::default()
        };
        assert_eq!(evaluate(&metered(spent), &unlimited), None);
    }

    #[test]
    fn per_file_admission() {
        let p = Policy {
            daily_budget: 5_000_000,
            metered_max_file_size: Some(2_000_000),
            require_charging_above: Some(10_000_000),
            ..Policy::default()
        };
        let wifi = ok_facts();
        let cell = metered(ok_facts());
        // Unmetered: size and budget do not matter.
        assert_eq!(admit(&wifi, &p, 3_000_000, 3_000_000, 9_000_000), Ok(()));
        // Metered: a large file waits while small ones go.
        assert_eq!(
            admit(&cell, &p, 3_000_000, 3_000_000, 0),
            Err(Reason::MeteredFileTooLarge)
        );
        assert_eq!(admit(&cell, &p, 1_000_000, 1_000_000, 0), Ok(()));
        // Exactly filling the budget is allowed; one byte more is not.
        assert_eq!(admit(&cell, &p, 1_000_000, 1_000_000, 4_000_000), Ok(()));
        assert_eq!(
            admit(&cell, &p, 1_000_000, 1_000_000, 4_000_001),
            Err(Reason::MeteredBudgetSpent)
        );
        // What was already sent (resume) is not charged again.
        assert_eq!(admit(&cell, &p, 2_000_000, 500_000, 4_500_000), Ok(()));
        // Large files need charging when a battery is present and not charging.
        assert_eq!(
            admit(&wifi, &p, 20_000_000, 20_000_000, 0),
            Err(Reason::ChargingRequired)
        );
        let mut charging = ok_facts();
        charging.battery.charging = true;
        assert_eq!(admit(&charging, &p, 20_000_000, 20_000_000, 0), Ok(()));
        let mut mains_only = ok_facts();
        mains_only.battery = Battery::default();
        assert_eq!(admit(&mains_only, &p, 20_000_000, 20_000_000, 0), Ok(()));
    }

    #[test]
    fn a_skewed_clock_pauses_after_credentials_and_before_the_network() {
        let p = Policy::default();
        let mut f = Facts {
            clock_skewed: true,
            offline: true,
            ..ok_facts()
        };
        assert_eq!(evaluate(&f, &p), Some(Reason::ClockSkew));
        assert_eq!(failing(&f, &p), vec![Reason::ClockSkew, Reason::Offline],);
        f.auth_failed = true;
        assert_eq!(evaluate(&f, &p), Some(Reason::Auth));
        f.auth_failed = false;
        f.clock_skewed = false;
        assert_eq!(evaluate(&f, &p), Some(Reason::Offline));
        assert_eq!(Reason::ClockSkew.as_str(), "clock_skew");
        assert!(Reason::ClockSkew.stops_running());
    }

    #[test]
    fn only_a_spent_budget_lets_running_uploads_finish() {
        for r in [
            Reason::PausedByOperator,
            Reason::Auth,
            Reason::Offline,
            Reason::MeteredNever,
            Reason::OutsideSchedule,
            Reason::BatteryLow,
            Reason::CpuHot,
        ] {
            assert!(r.stops_running(), "{r:?}");
        }
        assert!(!Reason::MeteredBudgetSpent.stops_running());
    }

    #[test]
    fn cpu_guard_has_hysteresis() {
        let max = Some(80.0);
        assert!(!cpu_hot(false, Some(80.0), max));
        assert!(cpu_hot(false, Some(80.5), max));
        assert!(cpu_hot(true, Some(78.0), max), "still cooling down");
        assert!(!cpu_hot(true, Some(74.9), max));
        assert!(!cpu_hot(true, None, max), "sensor gone: do not block");
        assert!(!cpu_hot(false, Some(120.0), None), "guard disabled");
    }

    #[test]
    fn interfaces_are_classed_by_globs() {
        let s = settings::Conditions::default();
        let m = |i| is_metered(i, &s.unmetered_interfaces, &s.metered_interfaces);
        for i in ["eth0", "enp3s0", "wlan0", "wlp2s0"] {
            assert!(!m(i), "{i}");
        }
        for i in ["wwan0", "ppp0", "usb0", "rmnet_data0", "tun0"] {
            assert!(m(i), "{i}");
        }
        let all = ["*".to_string()];
        let modem = ["wwan*".to_string()];
        assert!(!is_metered("tun0", &all, &modem));
        assert!(is_metered("wwan0", &all, &modem), "metered list wins");
    }

    #[test]
    fn reason_codes_are_stable() {
        for r in [
            Reason::Offline,
            Reason::MeteredBudgetSpent,
            Reason::MeteredFileTooLarge,
            Reason::DiskLow,
        ] {
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
        }
    }
}
