//! The `[conditions]` and `[retention]` configuration tables, and the small value types
//! they are written in: byte sizes (`"50MB"`), time windows (`"20:00-06:00"`) and rate
//! timetables (`"08:00,512k 19:00,off"`). Parsing is pure and unit-tested; a bad value is
//! reported by the config loader with the key that holds it.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::config::Dur;

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
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            delete_after_upload: false,
            keep_synced_files: None,
            keep_synced_bytes: None,
            evict_on_disk_low: true,
        }
    }
}

/// A byte count written as `"50MB"`, `"512k"`, `"1.5GiB"` or a plain number of bytes.
/// k/M/G are decimal (1000), Ki/Mi/Gi binary (1024), as data plans and file managers count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, serde::Serialize)]
pub struct Size(pub u64);

/// Parses a size; the error says what was expected.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("invalid size \"{s}\"; expected e.g. \"50MB\", \"512k\", \"2GiB\"");
    let n: f64 = num.parse().map_err(|_| bad())?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "p" | "pb" => 1e15,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024f64.powi(4),
        _ => return Err(bad()),
    };
    let v = n * mult;
    if !v.is_finite() || v > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(v.round() as u64)
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"50MB\", \"512k\" or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom("expected a size that is not negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A daily local-time window `[start, end)` in minutes after midnight; wraps past midnight
/// when `end <= start` (`"20:00-06:00"`). `"00:00-24:00"` is the whole day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: u16,
    pub end: u16,
}

impl Window {
    /// Whether `minute` (0..1440) is inside the window.
    pub fn contains(&self, minute: u16) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else if self.start == self.end {
            // "06:00-06:00": all day, the only reading that is not an empty window.
            true
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

/// `HH:MM` → minutes after midnight (`24:00` allowed as an end).
fn parse_hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    if m > 59 || h > 24 || (h == 24 && m != 0) || h.to_string().len() > 2 {
        return None;
    }
    Some(h * 60 + m)
}

pub fn parse_window(s: &str) -> Result<Window, String> {
    let bad =
        || format!("invalid window \"{s}\"; expected \"HH:MM-HH:MM\" such as \"20:00-06:00\"");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let start = parse_hhmm(a).filter(|&m| m < 1440).ok_or_else(bad)?;
    let end = parse_hhmm(b).ok_or_else(bad)?;
    Ok(Window { start, end })
}

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_window(&s).map_err(serde::de::Error::custom)
    }
}

/// A rate limit that may change with the local time of day, like rclone's `--bwlimit`
/// timetable. Empty means no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timetable {
    /// (minute after midnight, bytes per second or `None` for off), sorted by minute.
    pub slots: Vec<(u16, Option<u64>)>,
}

impl Timetable {
    /// The rate in force at `minute`: the last slot that started at or before it, or the
    /// day's last slot (still in force from the previous evening).
    pub fn rate_at(&self, minute: u16) -> Option<u64> {
        let slot = self
            .slots
            .iter()
            .rev()
            .find(|(m, _)| *m <= minute)
            .or(self.slots.last())?;
        slot.1
    }
}

fn parse_rate(s: &str) -> Result<Option<u64>, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("off") || s.is_empty() {
        return Ok(None);
    }
    let s = s
        .strip_suffix("/s")
        .or_else(|| s.strip_suffix("ps"))
        .unwrap_or(s);
    match parse_size(s) {
        Ok(0) => Err("a rate of 0 would stop uploads; use \"off\" or a schedule".into()),
        Ok(n) => Ok(Some(n)),
        Err(e) => Err(e),
    }
}

pub fn parse_timetable(s: &str) -> Result<Timetable, String> {
    let tokens: Vec<&str> = s.split_whitespace().collect();
    if tokens.len() <= 1 && !s.contains(',') {
        return Ok(Timetable {
            slots: parse_rate(s)?
                .map(|r| vec![(0, Some(r))])
                .unwrap_or_default(),
        });
    }
    let bad = |t: &str| {
        format!("invalid timetable entry \"{t}\"; expected \"HH:MM,RATE\" entries such as \"08:00,512k 19:00,off\"")
    };
    let mut slots = Vec::new();
    for t in tokens {
        let (hm, rate) = t.split_once(',').ok_or_else(|| bad(t))?;
        let m = parse_hhmm(hm).filter(|&m| m < 1440).ok_or_else(|| bad(t))?;
        slots.push((m, parse_rate(rate).map_err(|e| format!("{}: {e}", bad(t)))?));
    }
    slots.sort_by_key(|s| s.0);
    if slots.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(format!("timetable \"{s}\" names the same time twice"));
    }
    Ok(Timetable { slots })
}

impl<'de> Deserialize<'de> for Timetable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Timetable;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"off\", a rate such as \"1MB\", or a timetable such as \"08:00,512k 19:00,off\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Timetable, E> {
                parse_timetable(&v.to_string()).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Timetable, E> {
                parse_timetable(&v.to_string()).map_err(E::custom)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Timetable, E> {
                parse_timetable(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("50MB"), Ok(50_000_000));
        assert_eq!(parse_size("512k"), Ok(512_000));
        assert_eq!(parse_size("2GiB"), Ok(2 * 1024 * 1024 * 1024));
        assert_eq!(parse_size("1.5M"), Ok(1_500_000));
        assert_eq!(parse_size("1234"), Ok(1234));
        assert_eq!(parse_size(" 10 mb "), Ok(10_000_000));
        assert!(parse_size("lots")
            .unwrap_err()
            .contains("invalid size \"lots\""));
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn windows_wrap_past_midnight() {
        let w = parse_window("20:00-06:00").unwrap();
        assert!(w.contains(20 * 60));
        assert!(w.contains(23 * 60 + 59));
        assert!(w.contains(0));
        assert!(w.contains(5 * 60 + 59));
        assert!(!w.contains(6 * 60));
        assert!(!w.contains(12 * 60));
        let d = parse_window("09:30-17:00").unwrap();
        assert!(d.contains(9 * 60 + 30) && !d.contains(9 * 60 + 29) && !d.contains(17 * 60));
        assert!(parse_window("00:00-24:00").unwrap().contains(1439));
        assert!(parse_window("06:00-06:00").unwrap().contains(0));
        assert_eq!(w.to_string(), "20:00-06:00");
        for bad in [
            "20-06",
            "25:00-01:00",
            "10:60-11:00",
            "24:00-01:00",
            "x",
            "1:00",
        ] {
            assert!(parse_window(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn timetables_like_rclone() {
        assert_eq!(parse_timetable("off").unwrap().rate_at(600), None);
        assert_eq!(parse_timetable("1MB").unwrap().rate_at(0), Some(1_000_000));
        assert_eq!(parse_timetable("1M/s").unwrap().rate_at(0), Some(1_000_000));
        let t = parse_timetable("19:00,off 08:00,512k").unwrap();
        assert_eq!(t.rate_at(8 * 60), Some(512_000));
        assert_eq!(t.rate_at(18 * 60 + 59), Some(512_000));
        assert_eq!(t.rate_at(19 * 60), None);
        // Before the first slot of the day, the previous evening's slot still holds.
        assert_eq!(t.rate_at(3 * 60), None);
        let t = parse_timetable("08:00,512k 12:00,10M 13:00,512k 18:00,off").unwrap();
        assert_eq!(t.rate_at(12 * 60 + 30), Some(10_000_000));
        assert!(parse_timetable("08:00 512k").is_err());
        assert!(parse_timetable("08:00,fast").is_err());
        assert!(parse_timetable("0").is_err());
        assert!(parse_timetable("08:00,1M 08:00,2M").is_err());
    }
}
