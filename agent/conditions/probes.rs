//! Probes: read the facts the conditions decide on, from the kernel's own files.
//!
//! Each probe reads a handful of small procfs/sysfs files (or one `statvfs`), so a probe
//! round costs microseconds and the daemon can afford one every few seconds on a battery
//! device. Roots are configurable so tests drive them with a fake tree. A probe that
//! cannot read something reports "unknown", which never blocks uploads on its own.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::Battery;

/// Reads the facts below one procfs and one sysfs root.
#[derive(Debug, Clone)]
pub struct Probes {
    pub proc_root: PathBuf,
    pub sys_root: PathBuf,
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

impl Probes {
    /// The interface carrying the default route: IPv4 (`net/route`, lowest metric) first,
    /// else IPv6 (`net/ipv6_route`). `None` when there is none or it cannot be read.
    pub fn default_route(&self) -> Option<String> {
        let v4 = fs::read_to_string(self.proc_root.join("net/route")).unwrap_or_default();
        if let Some(i) = parse_route(&v4) {
            return Some(i);
        }
        let v6 = fs::read_to_string(self.proc_root.join("net/ipv6_route")).unwrap_or_default();
        parse_ipv6_route(&v6)
    }

    /// The power-supply class: system batteries (capacity, status) and external supplies
    /// (mains, USB, wireless `online`).
    pub fn battery(&self) -> Battery {
        let dir = self.sys_root.join("class/power_supply");
        let Ok(entries) = fs::read_dir(&dir) else {
            return Battery::default();
        };
        let mut b = Battery::default();
        for e in entries.flatten() {
            let p = e.path();
            let kind = read_trim(&p.join("type")).unwrap_or_default();
            if kind == "Battery" {
                // Peripherals (a Bluetooth scanner's battery) report scope "Device"; only
                // the batteries that power this device count.
                if read_trim(&p.join("scope")).as_deref() == Some("Device") {
                    continue;
                }
                b.present = true;
                if let Some(c) = read_trim(&p.join("capacity")).and_then(|s| s.parse::<u8>().ok()) {
                    b.percent = Some(b.percent.map_or(c, |old: u8| old.min(c)));
                }
                // "Not charging" means external power holds the charge (a charge limit).
                if matches!(
                    read_trim(&p.join("status")).as_deref(),
                    Some("Charging" | "Full" | "Not charging")
                ) {
                    b.charging = true;
                }
            } else if read_trim(&p.join("online")).as_deref() == Some("1") {
                // Mains, USB, USB_PD, Wireless, …: any online supply powers the device.
                b.charging = true;
            }
        }
        b
    }

    /// The hottest thermal zone in °C, if any can be read.
    pub fn cpu_temp(&self) -> Option<f64> {
        let entries = fs::read_dir(self.sys_root.join("class/thermal")).ok()?;
        entries
            .flatten()
            .filter(|e| e.file_name().as_bytes().starts_with(b"thermal_zone"))
            .filter_map(|e| read_trim(&e.path().join("temp"))?.parse::<i64>().ok())
            .map(|milli| milli as f64 / 1000.0)
            .reduce(f64::max)
    }
}

/// Bytes available to an unprivileged writer on the volume holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs struct.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// The local wall-clock date and time of day (the device's time zone, `TZ` or
/// `/etc/localtime`): budgets reset at local midnight and schedules are local.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTime {
    /// `YYYY-MM-DD`.
    pub date: String,
    pub minute_of_day: u16,
}

/// The local time now. The zone is the system's as every program reads it (`TZ` when set:
/// a zone name, a path or a POSIX rule; else `/etc/localtime`), re-read at most every few
/// minutes, so a zone changed while the daemon runs applies without a restart. A zone that
/// cannot be read is UTC.
pub fn local_now() -> LocalTime {
    let now = jiff::Zoned::now();
    LocalTime {
        date: now.date().to_string(),
        minute_of_day: (now.hour() as u16) * 60 + now.minute() as u16,
    }
}

/// The interface of the IPv4 default route with the lowest metric.
pub fn parse_route(text: &str) -> Option<String> {
    const RTF_UP: u32 = 0x1;
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let flags = u32::from_str_radix(f[3], 16).ok()?;
            let metric: u32 = f[6].parse().ok()?;
            (f[1] == "00000000" && f[7] == "00000000" && flags & RTF_UP != 0)
                .then(|| (metric, f[0].to_string()))
        })
        .min()
        .map(|(_, i)| i)
}

/// The interface of the IPv6 default route (`::/0`, not loopback) with the lowest metric.
pub fn parse_ipv6_route(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 10 || f[9] == "lo" {
                return None;
            }
            let default = f[0].bytes().all(|b| b == b'0') && f[1] == "00";
            let metric = u32::from_str_radix(f[5], 16).ok()?;
            default.then(|| (metric, f[9].to_string()))
        })
        .min()
        .map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        wwan0\t00000000\t0100A8C0\t0003\t0\t0\t700\t00000000\t0\t0\t0\n\
        wlan0\t00000000\t0102A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
        wlan0\t0002A8C0\t00000000\t0001\t0\t0\t600\t00FFFFFF\t0\t0\t0\n";

    #[test]
    fn default_route_lowest_metric_wins() {
        assert_eq!(parse_route(ROUTE).as_deref(), Some("wlan0"));
        let only_lan = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
            eth0\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n";
        assert_eq!(parse_route(only_lan), None);
        assert_eq!(parse_route(""), None);
        let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 wwan0\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n";
        assert_eq!(parse_ipv6_route(v6).as_deref(), Some("wwan0"));
    }

    fn write(p: &Path, s: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, s).unwrap();
    }

    #[test]
    fn reads_a_fake_tree() {
        let d = tempfile::tempdir().unwrap();
        let pr = Probes {
            proc_root: d.path().join("proc"),
            sys_root: d.path().join("sys"),
        };
        assert_eq!(
            pr.battery(),
            Battery::default(),
            "no power_supply: no battery"
        );
        assert_eq!(pr.default_route(), None);
        assert_eq!(pr.cpu_temp(), None);

        let ps = d.path().join("sys/class/power_supply");
        write(&ps.join("BAT0/type"), "Battery\n");
        write(&ps.join("BAT0/capacity"), "10\n");
        write(&ps.join("BAT0/status"), "Discharging\n");
        write(&ps.join("hid-mouse/type"), "Battery\n");
        write(&ps.join("hid-mouse/scope"), "Device\n");
        write(&ps.join("hid-mouse/capacity"), "1\n");
        write(&ps.join("AC/type"), "Mains\n");
        write(&ps.join("AC/online"), "0\n");
        assert_eq!(
            pr.battery(),
            Battery {
                present: true,
                percent: Some(10),
                charging: false
            }
        );
        write(&ps.join("AC/online"), "1\n");
        assert!(pr.battery().charging, "on mains");
        write(&ps.join("AC/online"), "0\n");
        write(&ps.join("BAT0/status"), "Charging\n");
        assert!(pr.battery().charging);

        write(&d.path().join("proc/net/route"), ROUTE);
        assert_eq!(pr.default_route().as_deref(), Some("wlan0"));

        let th = d.path().join("sys/class/thermal");
        write(&th.join("thermal_zone0/temp"), "45000\n");
        write(&th.join("thermal_zone1/temp"), "71500\n");
        write(&th.join("cooling_device0/temp"), "99000\n");
        assert_eq!(pr.cpu_temp(), Some(71.5));
    }

    #[test]
    fn statvfs_and_local_time() {
        let d = tempfile::tempdir().unwrap();
        assert!(free_bytes(d.path()).unwrap() > 0);
        assert_eq!(free_bytes(Path::new("/nonexistent/x")), None);
        let t = local_now();
        assert_eq!(t.date.len(), 10);
        assert!(t.minute_of_day < 1440);
    }
}
