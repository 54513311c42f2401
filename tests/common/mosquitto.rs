//! Starting and stopping a local mosquitto, std only. One file for two users: the
//! integration tests (`tests/common/mqtt.rs`) and `fieldsync bench mqtt`
//! (`agent/cli/bench/mqtt.rs`, built with the `bench` feature) include it by path.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// `n` distinct ports nobody listens on right now (bound together, then released for
/// mosquitto to take).
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let held = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    held.iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// Debian installs the broker in /usr/sbin, which is not on every user's PATH.
pub fn bin() -> &'static str {
    if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    }
}

/// Starts mosquitto on the config file `conf`, its output to `out`.
pub fn spawn(conf: &Path, out: Stdio, err: Stdio) -> std::io::Result<Child> {
    Command::new(bin())
        .arg("-c")
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
}

/// True once something accepts connections on 127.0.0.1:`port`.
pub fn listening(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// SIGTERM (mosquitto saves retained messages), then SIGKILL if it has not exited
/// within 10 s.
pub fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}
