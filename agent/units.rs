//! The value types configuration is written in, the same in every table: durations
//! (`"30s"`), byte sizes (`"50MB"`), local-time windows (`"20:00-06:00"`) and rate
//! timetables (`"08:00,512k 19:00,off"`). A leaf: it imports nothing from the crate, so
//! every section (and every part that reads one) can use it. Parsing is pure and
//! unit-tested; a bad value is reported by the config loader with the key that holds it.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A duration written as `"250ms"`, `"5s"`, `"5m"`, `"1h 30m"`, or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"500ms\", \"30s\", \"5m\" or a number of seconds")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Dur, E> {
                Ok(Dur::secs(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Dur, E> {
                u64::try_from(v)
                    .map(Dur::secs)
                    .map_err(|_| E::custom("expected a duration that is not negative"))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Dur, E> {
                Duration::try_from_secs_f64(v)
                    .map(Dur)
                    .map_err(|_| E::custom("expected a duration that is not negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Dur, E> {
                humantime::parse_duration(v).map(Dur).map_err(|e| {
                    E::custom(format!(
                        "invalid duration \"{v}\" ({e}); expected e.g. \"500ms\", \"30s\", \"5m\""
                    ))
                })
            }
        }
        d.deserialize_any(V)
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
