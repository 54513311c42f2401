//! A real headless Chromium driven over the DevTools protocol: it loads a page once and
//! the test reads the live DOM (and takes screenshots) while the page stays open, so a
//! change that shows up proves the page updated itself without a reload.
//!
//! The protocol runs over a WebSocket; the few lines of client framing it needs (masked
//! text frames out, unmasked frames in) are written here rather than pulling a crate.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Debian's package is `chromium`; other systems name the binary differently.
pub fn chromium_bin() -> &'static str {
    for b in [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ] {
        if Path::new(b).exists() {
            return b;
        }
    }
    "chromium"
}

pub struct Browser {
    /// First, so the processes are gone before their profile directory is removed.
    _proc: ProcessGroup,
    /// The browser's profile and its log.
    dir: tempfile::TempDir,
    ws: TcpStream,
    next_id: u64,
}

/// Chromium and its helper processes: killed together on drop.
struct ProcessGroup(Child);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // The group is signalled by the call itself, never through `kill -KILL -<pid>`:
        // procps-ng 4.0.2's kill (Debian 12) parses that as `kill(-1, SIGKILL)`, which as
        // root kills every process on the machine, the test runner included.
        if let Ok(pgid) = libc::pid_t::try_from(self.0.id()) {
            if pgid > 1 {
                // SAFETY: killpg only sends a signal; the group is the one chromium leads.
                unsafe { libc::killpg(pgid, libc::SIGKILL) };
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn log_of(dir: &Path) -> String {
    super::tail(
        &fs::read_to_string(dir.join("chromium.log")).unwrap_or_default(),
        30,
    )
}

impl Browser {
    /// Starts Chromium on `url` and attaches to its page.
    pub fn open(url: &str) -> Browser {
        let dir = tempfile::Builder::new()
            .prefix("fieldsync-chromium-")
            .tempdir()
            .unwrap();
        let log = fs::File::create(dir.path().join("chromium.log")).unwrap();
        let child = Command::new(chromium_bin())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--window-size=1800,900",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
            ])
            .arg(format!(
                "--user-data-dir={}",
                dir.path().join("profile").display()
            ))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            // Its own process group: the renderer and helper processes go with it.
            .process_group(0)
            .spawn()
            .expect("start chromium (Debian package `chromium`)");
        let proc = ProcessGroup(child);
        let port_file = dir.path().join("profile/DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(60);
        let port: u16 = loop {
            if let Some(p) = fs::read_to_string(&port_file)
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()))
            {
                break p;
            }
            assert!(
                Instant::now() < deadline,
                "chromium did not open its DevTools port within 60s\n{}",
                log_of(dir.path())
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        // The page target for our URL.
        let ws_url = loop {
            let list = http_get(port, "/json/list");
            let page = serde_json::from_str::<Value>(&list).ok().and_then(|v| {
                v.as_array()?
                    .iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_string))
            });
            if let Some(u) = page {
                break u;
            }
            assert!(
                Instant::now() < deadline,
                "no page target: {list}\n{}",
                log_of(dir.path())
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let ws = ws_connect(&ws_url);
        Browser {
            _proc: proc,
            dir,
            ws,
            next_id: 1,
        }
    }

    pub fn log(&self) -> String {
        log_of(self.dir.path())
    }

    /// One DevTools call; returns its `result`.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        ws_send(&mut self.ws, msg.as_bytes());
        loop {
            let text = ws_recv(&mut self.ws);
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                if !v["error"].is_null() {
                    panic!("{method}: {}", v["error"]);
                }
                return v["result"].clone();
            }
            // Events (no id) are not needed.
        }
    }

    /// Evaluates `js` in the page (promises awaited) and returns its value.
    pub fn eval(&mut self, js: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{js}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Saves a PNG of the page.
    pub fn screenshot(&mut self, path: &Path) {
        use base64::Engine as _;
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        if let Some(p) = path.parent() {
            fs::create_dir_all(p).unwrap();
        }
        fs::write(path, png).unwrap();
    }

    /// Where screenshots go: `target/<name>`.
    pub fn target_path(name: &str) -> PathBuf {
        Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .unwrap()
            .join(name)
    }
}

/// A GET to the DevTools HTTP endpoint (it keeps connections open: read by length).
fn http_get(port: u16, path: &str) -> String {
    let Ok(s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = write!(
        &s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    );
    let mut r = BufReader::new(s);
    let mut len = 0usize;
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap_or(0) == 0 {
            return String::new();
        }
        if l == "\r\n" {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; len];
    if r.read_exact(&mut body).is_err() {
        return String::new();
    }
    String::from_utf8_lossy(&body).into_owned()
}

fn ws_connect(url: &str) -> TcpStream {
    let rest = url.strip_prefix("ws://").expect("ws:// URL");
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    assert!(
        status.contains(" 101 "),
        "websocket upgrade refused: {status}"
    );
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        if l == "\r\n" || l.is_empty() {
            break;
        }
    }
    // The server speaks only after we send, so nothing is buffered in `r`.
    s
}

fn ws_send(s: &mut TcpStream, payload: &[u8]) {
    ws_frame(s, 0x1, payload);
}

fn ws_frame(s: &mut TcpStream, opcode: u8, payload: &[u8]) {
    let mut f = vec![0x80 | opcode];
    let n = payload.len();
    if n < 126 {
        f.push(0x80 | n as u8);
    } else if n < 65536 {
        f.push(0x80 | 126);
        f.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(n as u64).to_be_bytes());
    }
    let mask: [u8; 4] = fastrand::u32(..).to_be_bytes();
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&f).unwrap();
}

/// The next whole text message (continuations joined, pings answered).
fn ws_recv(s: &mut TcpStream) -> String {
    let mut msg = Vec::new();
    loop {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).expect("DevTools websocket read");
        let fin = h[0] & 0x80 != 0;
        let opcode = h[0] & 0x0f;
        let mut len = (h[1] & 0x7f) as u64;
        if len == 126 {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).unwrap();
            len = u16::from_be_bytes(b) as u64;
        } else if len == 127 {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).unwrap();
            len = u64::from_be_bytes(b);
        }
        let mut mask = [0u8; 4];
        if h[1] & 0x80 != 0 {
            s.read_exact(&mut mask).unwrap();
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).unwrap();
        if h[1] & 0x80 != 0 {
            for (i, b) in data.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        match opcode {
            0x9 => ws_frame(s, 0xA, &data),
            0x8 => panic!("DevTools closed the websocket"),
            0x0..=0x2 => {
                msg.extend_from_slice(&data);
                if fin {
                    return String::from_utf8(msg).unwrap();
                }
            }
            _ => {}
        }
    }
}
