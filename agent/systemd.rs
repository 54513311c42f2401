//! The systemd readiness protocol (`sd_notify`), so the unit can be `Type=notify`.
//!
//! systemd passes a datagram socket in `$NOTIFY_SOCKET`: a file path, or an abstract
//! socket name written with a leading `@`. The daemon sends `READY=1` once it holds the
//! lock, opened and repaired the queue and watches the capture folder, and `STOPPING=1`
//! when it begins a clean stop. Without the variable (a shell, the tests, another init
//! system) every call is a no-op. A few lines on std's `UnixDatagram` instead of the
//! `sd-notify`/`libsystemd` crates: nothing else from systemd is needed.
//!
//! With `WatchdogSec=` in the unit, systemd also passes `$WATCHDOG_USEC` (and
//! `$WATCHDOG_PID`): the daemon then sends `WATCHDOG=1` at half that interval for as long
//! as its loops are alive, and systemd restarts it when the pings stop.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Start-up finished: the service is ready.
pub const READY: &str = "READY=1";
/// A clean stop has begun.
pub const STOPPING: &str = "STOPPING=1";
/// The service is alive (the watchdog keep-alive).
pub const WATCHDOG: &str = "WATCHDOG=1";

/// The watchdog interval systemd asks this process for, from the environment.
pub fn watchdog_interval() -> Option<Duration> {
    let var = |k| std::env::var(k).ok();
    watchdog_from(
        var("WATCHDOG_USEC").as_deref(),
        var("WATCHDOG_PID").as_deref(),
        std::process::id(),
    )
}

/// The watchdog interval from `$WATCHDOG_USEC`, when `$WATCHDOG_PID` is unset or names
/// `our_pid` (a child that inherited the variables must not ping for its parent). Pure.
pub fn watchdog_from(usec: Option<&str>, pid: Option<&str>, our_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(our_pid) {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Sends `state` (newline-separated `KEY=value` lines) to `$NOTIFY_SOCKET` if it is set.
/// Returns whether a message was sent. Errors are for the caller to log: a failed
/// notification must never stop the daemon.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET) {
        Some(addr) if !addr.is_empty() => {
            notify_to(&addr.to_string_lossy(), state)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Sends `state` to the notification socket `addr` (a path, or `@name` for an abstract
/// socket).
pub fn notify_to(addr: &str, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let addr = socket_addr(addr)?;
    let sent = sock.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write to the notify socket",
        ));
    }
    Ok(())
}

/// The socket address systemd means by `addr`.
pub fn socket_addr(addr: &str) -> io::Result<SocketAddr> {
    match addr.strip_prefix('@') {
        Some(name) => abstract_addr(name.as_bytes()),
        None if addr.starts_with('/') => SocketAddr::from_pathname(addr),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{NOTIFY_SOCKET} must be an absolute path or start with '@': {addr:?}"),
        )),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract socket names exist only on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        notify_to(path.to_str().unwrap(), READY).unwrap();
        assert_eq!(recv(&sock), "READY=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!(
            "fieldsync-test-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        );
        let addr = socket_addr(&format!("@{name}")).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(&format!("@{name}"), "STOPPING=1\nSTATUS=bye").unwrap();
        assert_eq!(recv(&sock), "STOPPING=1\nSTATUS=bye");
    }

    #[test]
    fn the_watchdog_interval_is_ours_only() {
        let d = Duration::from_secs(180);
        assert_eq!(watchdog_from(Some("180000000"), None, 7), Some(d));
        assert_eq!(watchdog_from(Some("180000000"), Some("7"), 7), Some(d));
        assert_eq!(watchdog_from(Some("180000000"), Some("8"), 7), None);
        assert_eq!(watchdog_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_from(Some("soon"), None, 7), None);
        assert_eq!(watchdog_from(None, Some("7"), 7), None);
    }

    #[test]
    fn relative_paths_are_refused() {
        let e = socket_addr("run/notify").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn missing_listener_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nobody.sock");
        assert!(notify_to(path.to_str().unwrap(), READY).is_err());
    }
}
