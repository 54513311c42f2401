//! A real HTTP proxy (Debian's `tinyproxy`) on 127.0.0.1 with an ephemeral port, its
//! config and log in a temp dir; stopped on drop.

use std::fs;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Tinyproxy {
    child: Child,
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tinyproxy {
    /// Starts tinyproxy; with `auth`, it requires that user and password (BasicAuth).
    pub fn start(auth: Option<(&str, &str)>) -> Tinyproxy {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.path().join("tinyproxy.log");
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nLogLevel Info\nLogFile \"{}\"\nMaxClients 50\n",
            log.display()
        );
        if let Some((u, p)) = auth {
            conf.push_str(&format!("BasicAuth {u} {p}\n"));
        }
        let conf_path = dir.path().join("tinyproxy.conf");
        fs::write(&conf_path, conf).unwrap();
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy is installed (apt-get install tinyproxy)");
        let p = Tinyproxy {
            child,
            port,
            log,
            _dir: dir,
        };
        super::wait_for(
            Duration::from_secs(10),
            "tinyproxy listening",
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            || p.log_text(),
        );
        p
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// CONNECT requests the proxy saw to `host:port`.
    pub fn connects_to(&self, target: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains(&format!("CONNECT {target} ")))
            .count()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
