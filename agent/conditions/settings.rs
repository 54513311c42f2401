//! The `[conditions]` and `[retention]` configuration tables. Their values are written in
//! the shared units (`crate::units`); `validate` names the key of a value the types cannot
//! check.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The units these tables are written in, for the conditions code that reads them.
pub use crate::units::{parse_size, parse_timetable, parse_window, Dur, Size, Timetable, Window};

/// What metered links (cellular) may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MeteredPolicy {
    /// Upload within `metered_daily_budget` and `metered_max_file_size`.
    Budget,
    /// Never upload over a metered link.
    Never,
    /// Metered links are used like any other (bytes are still counted for status).
    Unlimited,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Conditions {
    /// How often battery, route, disk and temperature are read. Each probe reads a few
    /// small sysfs/procfs files, so the idle cost is tiny; shorter reacts faster.
    pub probe_interval: Dur,
    /// Where procfs is mounted (`net/route` is read from it); tests point it at a fake tree.
    pub proc_root: PathBuf,
    /// Where sysfs is mounted (`class/power_supply`, `class/thermal`).
    pub sys_root: PathBuf,
    /// Interfaces (globs) whose default route is free to use.
    pub unmetered_interfaces: Vec<String>,
    /// Interfaces (globs) that cost money per byte. An interface in neither list is
    /// treated as metered: an unknown data plan is never spent by surprise.
    pub metered_interfaces: Vec<String>,
    pub metered: MeteredPolicy,
    /// Bytes that may be sent over metered links per local calendar day.
    pub metered_daily_budget: Size,
    /// Larger files wait for an unmetered link.
    pub metered_max_file_size: Option<Size>,
    /// Below this charge (and not charging) uploads pause; 0 disables the check.
    pub min_battery_percent: u8,
    /// Files larger than this upload only while charging or on mains.
    pub require_charging_above: Option<Size>,
    /// Below this free space (state or capture volume) local copies of uploaded files are
    /// evicted as retention allows, and `disk_low` is reported; 0 disables.
    pub min_free_disk: Size,
    /// Uploads pause above this CPU temperature (°C, hottest thermal zone); unset disables.
    pub max_cpu_temp: Option<f64>,
    /// Local-time windows in which uploads may run (`"20:00-06:00"`); empty means always.
    pub schedule: Vec<Window>,
    /// Apply `schedule` only while the link is metered (unmetered links upload any time).
    pub schedule_metered_only: bool,
    /// Upload rate limit: `"off"`, a rate (`"1MB"` per second) or a timetable
    /// (`"08:00,512k 19:00,off"`).
    pub bandwidth_limit: Timetable,
}

impl Default for Conditions {
    fn default() -> Self {
        Conditions {
            probe_interval: Dur::secs(5),
            proc_root: "/proc".into(),
            sys_root: "/sys".into(),
            unmetered_interfaces: ["eth*", "en*", "wlan*", "wl*"].map(String::from).to_vec(),
            metered_interfaces: ["wwan*", "ppp*", "usb*", "rmnet*"]
                .map(String::from)
                .to_vec(),
            metered: MeteredPolicy::Budget,
            metered_daily_budget: Size(50_000_000),
            metered_max_file_size: None,
            min_battery_percent: 25,
            require_charging_above: None,
            min_free_disk: Size(100_000_000),
            max_cpu_temp: None,
            schedule: Vec::new(),
            schedule_metered_only: false,
            bandwidth_limit: Timetable::default(),
        }
    }
}

impl Conditions {
    /// Checks values the types cannot: the key and what is expected.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.probe_interval.0 < Duration::from_millis(100) {
            return Err((
                "conditions.probe_interval",
                "expected at least 100ms".into(),
            ));
        }
        if self.min_battery_percent > 100 {
            return Err((
                "conditions.min_battery_percent",
                "expected a percentage from 0 to 100".into(),
            ));
        }
        if let Some(t) = self.max_cpu_temp {
            if !(20.0..=150.0).contains(&t) {
                return Err((
                    "conditions.max_cpu_temp",
                    "expected degrees Celsius from 20 to 150".into(),
                ));
            }
        }
        if self.unmetered_interfaces.iter().any(|g| g.is_empty()) {
            return Err((
                "conditions.unmetered_interfaces",
                "expected non-empty interface globs".into(),
            ));
        }
        if self.metered_interfaces.iter().any(|g| g.is_empty()) {
            return Err((
                "conditions.metered_interfaces",
                "expected non-empty interface globs".into(),
            ));
        }
        Ok(())
    }
}

/// What happens to local copies of uploaded files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// Delete the local copy as soon as its upload is confirmed.
    pub delete_after_upload: bool,
    /// Keep at most this many uploaded local copies (newest kept); unset keeps all.
    pub keep_synced_files: Option<u64>,
    /// Keep at most this many bytes of uploaded local copies (newest kept); unset keeps all.
    pub keep_synced_bytes: Option<Size>,
    /// When disk space is low, evict uploaded local copies (oldest first) even inside the
    /// limits above, so the inspection app can go on capturing.
    pub evict_on_disk_low: bool,
    /// Photos a revised checklist.json no longer names are deleted from the remote (the
    /// local copy stays, archived) instead of only archived.
    pub delete_unreferenced_remote: bool,
    /// Archived records kept (newest kept); beyond it the oldest are expired: the record
    /// removed and, for a downloaded file, its local inbox copy deleted.
    pub archived_cache_limit: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            delete_after_upload: false,
            keep_synced_files: None,
            keep_synced_bytes: None,
            evict_on_disk_low: true,
            delete_unreferenced_remote: false,
            archived_cache_limit: 100,
        }
    }
}
