//! A real MQTT broker for the tests: mosquitto on 127.0.0.1 with an ephemeral port and its
//! own config file in a temp dir (restartable on the same port, stopped on drop), a
//! recording subscriber, and a throwaway test CA made with the `openssl` CLI.

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

use super::{mosquitto, tail};

/// `n` distinct ports nobody listens on right now (bound together, then released for
/// mosquitto to take).
pub fn free_ports(n: usize) -> Vec<u16> {
    mosquitto::free_ports(n).unwrap()
}

pub struct Broker {
    /// The plain listener.
    pub port: u16,
    /// Ports for extra listeners (`{port2}`, `{port3}` in the config).
    pub extra_ports: Vec<u16>,
    pub dir: tempfile::TempDir,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Broker {
    /// A plain, anonymous listener on `port`; retained messages persist across restarts.
    pub fn start() -> Broker {
        Broker::with_config("")
    }

    /// `extra` is appended to the config (more listeners, auth); `{dir}`, `{port2}` and
    /// `{port3}` in it are replaced by the broker's temp dir and two more free ports.
    /// Anonymous access is allowed unless `extra` sets `allow_anonymous`.
    ///
    /// The ports are free when chosen but must be released for mosquitto to bind them: a
    /// listener that takes one meanwhile (another test's broker, TLS or password listener,
    /// or black hole; another suite running on the machine) makes mosquitto exit with
    /// "Address already in use". Then it starts again on fresh ports.
    pub fn with_config(extra: &str) -> Broker {
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let mut b = Broker::configure(extra);
            match b.launch() {
                Ok(()) => return b,
                Err(e) if attempt < ATTEMPTS => {
                    eprintln!("mosquitto did not start ({e}); trying other ports")
                }
                Err(e) => panic!("{e}\n{}", b.log_text()),
            }
        }
        unreachable!()
    }

    fn configure(extra: &str) -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("fieldsync-mosquitto-")
            .tempdir()
            .unwrap();
        let ports = free_ports(3);
        let port = ports[0];
        let d = dir.path().display().to_string();
        let extra = extra
            .replace("{dir}", &d)
            .replace("{port2}", &ports[1].to_string())
            .replace("{port3}", &ports[2].to_string());
        let anonymous = if extra.contains("allow_anonymous") {
            ""
        } else {
            "allow_anonymous true\n"
        };
        let conf = dir.path().join("mosquitto.conf");
        let log = dir.path().join("mosquitto.log");
        // `user root` keeps root from dropping to the `mosquitto` user, which could not
        // read the temp dir; it is ignored when the tests do not run as root.
        let text = format!(
            "user root\nper_listener_settings false\n{anonymous}\
             persistence true\npersistence_location {d}/\n\
             log_dest file {}\nlog_type all\n\
             listener {port} 127.0.0.1\n{}\n",
            log.display(),
            extra
        );
        fs::write(&conf, text).unwrap();
        Broker {
            port,
            extra_ports: ports[1..].to_vec(),
            dir,
            conf,
            log,
            child: None,
        }
    }

    /// Starts (again) on the same port and waits until it accepts connections.
    pub fn restart(&mut self) {
        if let Err(e) = self.launch() {
            panic!("{e}\n{}", self.log_text());
        }
    }

    /// Starts mosquitto and waits until this mosquitto listens: its log says `running` for
    /// this start (printed once every listener is bound) and a connection is accepted.
    /// Accepting alone proves nothing: the port may have been taken by another listener,
    /// which the tests would then talk to (a black hole never answers CONNECT: the
    /// subscriber's SUBACK wait times out).
    fn launch(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "broker already running");
        let runs_before = self.runs_logged();
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("stdout.log"))
            .unwrap();
        let mut child = Command::new(mosquitto::bin())
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("start mosquitto (Debian package `mosquitto`)");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return Err(format!(
                    "mosquitto on port {} exited at start-up ({st})",
                    self.port
                ));
            }
            if self.runs_logged() > runs_before
                && TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "timed out after 20s waiting for mosquitto to listen on port {}",
                    self.port
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// How many times the log says mosquitto started listening.
    fn runs_logged(&self) -> usize {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("mosquitto version") && l.ends_with(" running"))
            .count()
    }

    /// SIGTERM (mosquitto saves retained messages) and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            mosquitto::stop(&mut c);
        }
    }

    pub fn log_text(&self) -> String {
        let mut s = fs::read_to_string(&self.log).unwrap_or_default();
        s.push_str(&fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default());
        tail(&s, 40)
    }

    /// The `[mqtt]` section for an agent on this broker's plain listener.
    pub fn agent_config(&self, extra: &str) -> String {
        format!(
            "[mqtt]\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive = \"5s\"\nheartbeat = \"30s\"\n{extra}\n",
            self.port
        )
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One message as a subscriber received it.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Msg {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {:?}", self.topic, self.text()))
    }
}

/// A subscriber recording every message (its own thread drives the connection).
pub struct Sub {
    pub client: Client,
    msgs: Arc<Mutex<Vec<Msg>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Sub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.client.try_disconnect();
    }
}

impl Sub {
    /// Connects to `127.0.0.1:port`, subscribes to `filter` and waits for the SUBACK, so
    /// retained messages are the first ones recorded.
    pub fn new(port: u16, filter: &str) -> Sub {
        Sub::connect(port, filter, None, false)
    }

    /// A subscriber whose session outlives broker restarts (clean session off, persisted
    /// by mosquitto): QoS 1 messages published while it is disconnected are delivered when
    /// it reconnects, so nothing published around a restart is missed.
    pub fn persistent(port: u16, filter: &str) -> Sub {
        Sub::connect(port, filter, None, true)
    }

    pub fn connect(
        port: u16,
        filter: &str,
        credentials: Option<(&str, &str)>,
        persistent: bool,
    ) -> Sub {
        let id = format!("test-sub-{}", fastrand::u64(..));
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5))
            .set_clean_session(!persistent);
        if let Some((u, p)) = credentials {
            o.set_credentials(u, p);
        }
        let (client, mut conn) = Client::new(o, 64);
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        {
            let msgs = msgs.clone();
            let resub = client.clone();
            let filter = filter.to_string();
            let stop = stop.clone();
            thread::spawn(move || {
                for ev in conn.iter() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    match ev {
                        Ok(Event::Incoming(Packet::ConnAck(ack))) if !ack.session_present => {
                            // A new session (first connect, or the broker forgot us).
                            let _ = resub.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            let _ = ready_tx.send(());
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            msgs.lock().unwrap().push(Msg {
                                topic: p.topic.clone(),
                                payload: p.payload.to_vec(),
                                retain: p.retain,
                            });
                        }
                        Ok(_) => {}
                        // The tests stop the broker on purpose: keep trying to reconnect
                        // (the iterator ends when the `Sub` is dropped).
                        Err(_) => thread::sleep(Duration::from_millis(200)),
                    }
                }
            });
        }
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("subscriber SUBACK");
        Sub { client, msgs, stop }
    }

    pub fn all(&self) -> Vec<Msg> {
        self.msgs.lock().unwrap().clone()
    }

    /// Messages on topics ending with `suffix` (e.g. `/status`).
    pub fn on(&self, suffix: &str) -> Vec<Msg> {
        self.all()
            .into_iter()
            .filter(|m| m.topic.ends_with(suffix))
            .collect()
    }

    pub fn last(&self, suffix: &str) -> Option<Msg> {
        self.on(suffix).pop()
    }

    pub fn publish(&self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .unwrap();
    }

    /// A retained message (what a back office leaves for a device).
    pub fn publish_retained(&self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload.to_vec())
            .unwrap();
    }

    /// Everything received, for failure messages (payloads cut short).
    pub fn dump(&self) -> String {
        self.all()
            .iter()
            .map(|m| {
                let t = m.text();
                format!(
                    "{}{} {}",
                    m.topic,
                    if m.retain { " (retained)" } else { "" },
                    &t[..t.len().min(300)]
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A throwaway CA with a server certificate for 127.0.0.1/localhost and a client
/// certificate, made with the `openssl` CLI.
pub struct TestPki {
    pub dir: PathBuf,
}

impl TestPki {
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes `<name>.pem`/`<name>.key` signed by the CA `<ca>.pem`/`<ca>.key` in `dir`.
fn leaf(dir: &Path, ca: &str, name: &str, ext: &str) {
    fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}.pem"),
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

fn ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
}

/// The CA `ca`, a server certificate `server`, a client certificate `client`, and an
/// unrelated CA `wrong-ca`, all in `dir`.
pub fn make_pki(dir: &Path) -> TestPki {
    fs::create_dir_all(dir).unwrap();
    ca(dir, "ca");
    ca(dir, "wrong-ca");
    leaf(
        dir,
        "ca",
        "server",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    );
    leaf(
        dir,
        "ca",
        "client",
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
    );
    TestPki {
        dir: dir.to_path_buf(),
    }
}
