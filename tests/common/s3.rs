//! Real S3 peers for the integration tests: an `s3s-fs` server (real SigV4 and
//! Content-MD5 checking) on an ephemeral port, a client that reads back what landed, a
//! TCP fault proxy that sits between the daemon and the server (delay, throttle, drop the
//! connection after N bytes, bursts of 503), and a tiny presign backend for the `http`
//! remote. Faults come from the proxy or from stopping the real server, never from a fake
//! client. Everything stops on drop.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rusty_s3::actions::{
    AbortMultipartUpload, CompleteMultipartUpload, CreateMultipartUpload, DeleteObject, GetObject,
    HeadBucket, HeadObject, ListObjectsV2, ListParts, PutObject, S3Action, UploadPart,
};
use rusty_s3::{Bucket, Credentials, UrlStyle};

pub const ACCESS_KEY: &str = "fieldsync-test-key";
pub const SECRET_KEY: &str = "s3cr3t-Test-Value-9f8e7d";
pub const BUCKET: &str = "inspections";

fn s3s_fs_bin() -> PathBuf {
    if let Ok(p) = std::env::var("S3S_FS") {
        return p.into();
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let p = PathBuf::from(home).join(".cargo/bin/s3s-fs");
    if p.exists() {
        p
    } else {
        "s3s-fs".into()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `s3s-fs` with one bucket.
pub struct S3Server {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    log: PathBuf,
    /// CPUs the server is pinned to (`taskset -c`), for benchmarks.
    cpus: Option<String>,
}

impl S3Server {
    pub fn start() -> S3Server {
        Self::start_pinned(None)
    }

    /// Starts the server pinned to `cpus` (a `taskset -c` list) when given, so a
    /// benchmark's clients do not compete with it for a core.
    pub fn start_pinned(cpus: Option<&str>) -> S3Server {
        let dir = tempfile::Builder::new()
            .prefix("fieldsync-s3-")
            .tempdir()
            .unwrap();
        // s3s-fs serves each directory under its root as a bucket.
        fs::create_dir_all(dir.path().join("data").join(BUCKET)).unwrap();
        let mut s = S3Server {
            log: dir.path().join("s3s-fs.log"),
            dir,
            port: free_port(),
            child: None,
            cpus: cpus.map(str::to_string),
        };
        s.resume();
        s
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    /// Stops the server (kill): the port goes dark.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts (again) on the same port and data directory.
    pub fn resume(&mut self) {
        assert!(self.child.is_none());
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = match &self.cpus {
            Some(c) => {
                let mut t = Command::new("taskset");
                t.args(["-c", c]).arg(s3s_fs_bin());
                t
            }
            None => Command::new(s3s_fs_bin()),
        };
        let child = cmd
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--access-key",
                ACCESS_KEY,
                "--secret-key",
                SECRET_KEY,
            ])
            .arg(self.dir.path().join("data"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start s3s-fs ({}): {e}; install it with tests/run.sh",
                    s3s_fs_bin().display()
                )
            });
        self.child = Some(child);
        let start = Instant::now();
        while TcpStream::connect(self.addr()).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "s3s-fs did not start:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Part files the server keeps for an unfinished multipart upload (s3s-fs stores
    /// them as `.upload_id-<id>.part-<n>` in its root): the storage an abort frees.
    pub fn stored_parts(&self, upload_id: &str) -> usize {
        let prefix = format!(".upload_id-{upload_id}.part-");
        fs::read_dir(self.dir.path().join("data"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .count()
    }

    pub fn client(&self) -> S3Client {
        S3Client::new(&self.endpoint())
    }

    /// The `[remote]` config for this server (through `endpoint`, e.g. a proxy).
    pub fn remote_toml(endpoint: &str, secret: &str, extra: &str) -> String {
        format!(
            "[remote]\nkind = \"s3\"\nprefix = \"fs\"\n\n[remote.s3]\nendpoint = \"{endpoint}\"\nbucket = \"{BUCKET}\"\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{secret}\"\nconnect_timeout = \"2s\"\nread_timeout = \"5s\"\n{extra}\n"
        )
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads back what the daemon stored, with its own correctly signed requests.
pub struct S3Client {
    bucket: Bucket,
    creds: Credentials,
    agent: ureq::Agent,
}

const TTL: Duration = Duration::from_secs(600);

impl S3Client {
    pub fn new(endpoint: &str) -> S3Client {
        S3Client {
            bucket: Bucket::new(
                endpoint.parse().unwrap(),
                UrlStyle::Path,
                BUCKET,
                "us-east-1",
            )
            .unwrap(),
            creds: Credentials::new(ACCESS_KEY, SECRET_KEY),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .new_agent(),
        }
    }

    pub fn bucket(&self) -> &Bucket {
        &self.bucket
    }

    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let url = GetObject::new(&self.bucket, Some(&self.creds), key).sign(TTL);
        let mut r = self.agent.get(url.as_str()).call().unwrap();
        match r.status().as_u16() {
            404 => None,
            200 => Some(
                r.body_mut()
                    .with_config()
                    .limit(u64::MAX)
                    .read_to_vec()
                    .unwrap(),
            ),
            s => panic!("GET {key}: HTTP {s}"),
        }
    }

    /// The `x-amz-meta-*` headers and size of an object.
    pub fn head(&self, key: &str) -> Option<HashMap<String, String>> {
        let url = HeadObject::new(&self.bucket, Some(&self.creds), key).sign(TTL);
        let r = self.agent.head(url.as_str()).call().unwrap();
        if r.status().as_u16() == 404 {
            return None;
        }
        Some(
            r.headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                .collect(),
        )
    }

    pub fn put(&self, key: &str, body: &[u8]) {
        let url = PutObject::new(&self.bucket, Some(&self.creds), key).sign(TTL);
        let r = self.agent.put(url.as_str()).send(body).unwrap();
        assert!(r.status().is_success(), "PUT {key}: {}", r.status());
    }

    pub fn delete(&self, key: &str) {
        let url = DeleteObject::new(&self.bucket, Some(&self.creds), key).sign(TTL);
        self.agent.delete(url.as_str()).call().unwrap();
    }

    pub fn abort_multipart(&self, key: &str, upload_id: &str) {
        let url =
            AbortMultipartUpload::new(&self.bucket, Some(&self.creds), key, upload_id).sign(TTL);
        let r = self.agent.delete(url.as_str()).call().unwrap();
        assert!(r.status().is_success(), "abort {key}: {}", r.status());
    }

    pub fn bucket_ok(&self) -> bool {
        let url = HeadBucket::new(&self.bucket, Some(&self.creds)).sign(TTL);
        self.agent
            .head(url.as_str())
            .call()
            .unwrap()
            .status()
            .is_success()
    }

    /// Every object key (and size) under `prefix`, following continuation tokens.
    pub fn list(&self, prefix: &str) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut a = ListObjectsV2::new(&self.bucket, Some(&self.creds));
            a.with_prefix(prefix);
            if let Some(t) = &token {
                a.with_continuation_token(t.clone());
            }
            let url = a.sign(TTL);
            let mut r = self.agent.get(url.as_str()).call().unwrap();
            assert!(r.status().is_success(), "list: {}", r.status());
            let body = r.body_mut().read_to_string().unwrap();
            let parsed = ListObjectsV2::parse_response(&body).unwrap();
            for c in parsed.contents {
                out.push((c.key, c.size.unwrap_or(0)));
            }
            match parsed.next_continuation_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        out.sort();
        out
    }
}

/// Faults the proxy injects; tests change them while it runs.
#[derive(Default)]
pub struct Faults {
    /// Upload bandwidth in bytes per second; 0 is unlimited.
    pub throttle_bps: AtomicU64,
    /// Drop the connection once this many more bytes went upstream (one shot; -1 off).
    pub reset_after: AtomicI64,
    /// Answer this many more connections with `503 Slow Down` instead of forwarding.
    pub fail_503: AtomicU32,
    /// Swallow this many more responses: the request reached the server, the client
    /// never hears back (an unknown outcome).
    pub swallow_responses: AtomicU32,
    /// The same, only for answers to a `PUT` (a photo's upload), so that no other
    /// request the daemon makes meanwhile (a probe, a poll) takes the fault.
    pub swallow_put_responses: AtomicU32,
    /// Delay before each new connection is forwarded, in ms.
    pub delay_ms: AtomicU64,
    /// Bytes forwarded client → server (request lines, headers and bodies).
    pub up_bytes: AtomicU64,
    /// Download bandwidth (server → client) in bytes per second; 0 is unlimited.
    pub down_throttle_bps: AtomicU64,
    /// Bytes forwarded server → client (status lines, headers and bodies).
    pub down_bytes: AtomicU64,
    pub served_503: AtomicU32,
    pub resets: AtomicU32,
    pub connections: AtomicU32,
    /// Client connections not yet closed. A killed client's kernel still delivers what
    /// sat in its socket buffers, so byte counts are final only once this is 0.
    pub open: AtomicU32,
}

/// Counts a client connection as open for as long as it lives.
struct OpenGuard(Arc<Faults>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A TCP proxy on 127.0.0.1 in front of `upstream`.
pub struct FaultProxy {
    pub port: u16,
    pub faults: Arc<Faults>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(Faults::default());
        faults.reset_after.store(-1, Ordering::SeqCst);
        let stop = Arc::new(AtomicBool::new(false));
        {
            let faults = faults.clone();
            let stop = stop.clone();
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = conn else { continue };
                    let faults = faults.clone();
                    thread::spawn(move || handle(client, upstream, faults));
                }
            });
        }
        FaultProxy { port, faults, stop }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn up_bytes(&self) -> u64 {
        self.faults.up_bytes.load(Ordering::SeqCst)
    }

    /// Waits until every client connection has closed (a killed daemon's sockets drain
    /// their send buffers first), so `up_bytes` no longer moves.
    pub fn wait_closed(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while self.faults.open.load(Ordering::SeqCst) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "proxy connections still open after {timeout:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn down_bytes(&self) -> u64 {
        self.faults.down_bytes.load(Ordering::SeqCst)
    }

    pub fn set_down_throttle(&self, bps: u64) {
        self.faults.down_throttle_bps.store(bps, Ordering::SeqCst);
    }

    pub fn set_throttle(&self, bps: u64) {
        self.faults.throttle_bps.store(bps, Ordering::SeqCst);
    }

    pub fn reset_after(&self, bytes: i64) {
        self.faults.reset_after.store(bytes, Ordering::SeqCst);
    }

    pub fn fail_503(&self, n: u32) {
        self.faults.fail_503.store(n, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn handle(client: TcpStream, upstream: SocketAddr, f: Arc<Faults>) {
    f.connections.fetch_add(1, Ordering::SeqCst);
    f.open.fetch_add(1, Ordering::SeqCst);
    let _open = OpenGuard(f.clone());
    let delay = f.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        thread::sleep(Duration::from_millis(delay));
    }
    let take_503 = f
        .fail_503
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if take_503 {
        // Read the request head, answer 503 and close: the client sees a real answer
        // (bodies wait for `100 Continue`, which never comes).
        let mut r = BufReader::new(client.try_clone().unwrap());
        let mut line = String::new();
        while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            if line == "\r\n" {
                break;
            }
            line.clear();
        }
        let mut c = client;
        let body = "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
        let _ = write!(c, "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        f.served_503.fetch_add(1, Ordering::SeqCst);
        let _ = c.shutdown(Shutdown::Both);
        return;
    }
    let Ok(server) = TcpStream::connect(upstream) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = server.set_nodelay(true);
    let _ = client.set_nodelay(true);
    // Whether the request being answered on this connection is a PUT.
    let put = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // server → client, unless a response is to be swallowed.
    {
        let mut s = server.try_clone().unwrap();
        let mut c = client.try_clone().unwrap();
        let f = f.clone();
        let put = put.clone();
        thread::spawn(move || {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                // `100 Continue` is not the answer; the final status line is.
                let interim = buf[..n].starts_with(b"HTTP/1.1 100");
                let take = |knob: &AtomicU32| {
                    knob.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                };
                if !interim
                    && buf[..n].starts_with(b"HTTP/")
                    && (take(&f.swallow_responses)
                        || (put.load(Ordering::SeqCst) && take(&f.swallow_put_responses)))
                {
                    let _ = c.shutdown(Shutdown::Both);
                    let _ = s.shutdown(Shutdown::Both);
                    return;
                }
                if c.write_all(&buf[..n]).is_err() {
                    break;
                }
                f.down_bytes.fetch_add(n as u64, Ordering::SeqCst);
                let bps = f.down_throttle_bps.load(Ordering::SeqCst);
                if bps > 0 {
                    thread::sleep(Duration::from_secs_f64(n as f64 / bps as f64));
                }
            }
            let _ = c.shutdown(Shutdown::Write);
        });
    }
    // client → server, with the faults.
    let mut c = client;
    let mut s = server;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // A request line starts a read (keep-alive: one request at a time).
        for method in [&b"PUT "[..], b"GET ", b"HEAD ", b"POST ", b"DELETE "] {
            if buf[..n].starts_with(method) {
                put.store(method == b"PUT ", Ordering::SeqCst);
            }
        }
        let mut n = n;
        let mut drop_now = false;
        let armed = f.reset_after.load(Ordering::SeqCst);
        if armed >= 0 {
            if (n as i64) >= armed {
                n = armed as usize;
                drop_now = true;
                f.reset_after.store(-1, Ordering::SeqCst);
            } else {
                f.reset_after.store(armed - n as i64, Ordering::SeqCst);
            }
        }
        if s.write_all(&buf[..n]).is_err() {
            break;
        }
        f.up_bytes.fetch_add(n as u64, Ordering::SeqCst);
        if drop_now {
            f.resets.fetch_add(1, Ordering::SeqCst);
            let _ = c.shutdown(Shutdown::Both);
            let _ = s.shutdown(Shutdown::Both);
            return;
        }
        let bps = f.throttle_bps.load(Ordering::SeqCst);
        if bps > 0 {
            thread::sleep(Duration::from_secs_f64(n as f64 / bps as f64));
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

/// A slow, distant link between a client and `upstream`, as a TCP proxy on 127.0.0.1:
/// every byte waits for its turn on a link of `rate` bytes/s that all connections share
/// (one budget per direction, as on a real uplink), then arrives `delay` later. What is
/// in flight is bounded (about the bandwidth-delay product), so a sender feels the link
/// through TCP's back-pressure as it would on the real one.
pub struct ShapedLink {
    pub port: u16,
    stop: Arc<AtomicBool>,
}

/// When the link in one direction is free again.
type LinkClock = Arc<Mutex<Instant>>;

impl ShapedLink {
    pub fn start(upstream: SocketAddr, rate: u64, delay: Duration) -> ShapedLink {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let up: LinkClock = Arc::new(Mutex::new(Instant::now()));
        let down: LinkClock = Arc::new(Mutex::new(Instant::now()));
        {
            let stop = stop.clone();
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = conn else { continue };
                    let Ok(server) = TcpStream::connect(upstream) else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                    let (up, down) = (up.clone(), down.clone());
                    thread::spawn(move || shaped_pump(client, server, up, rate, delay));
                    thread::spawn(move || shaped_pump(s2, c2, down, rate, delay));
                }
            });
        }
        ShapedLink { port, stop }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for ShapedLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// One direction of a [`ShapedLink`] connection: a reader that takes each chunk onto
/// the link when the link is free (shared `clock`), and a writer that delivers it
/// `delay` after it left.
fn shaped_pump(mut from: TcpStream, to: TcpStream, clock: LinkClock, rate: u64, delay: Duration) {
    const CHUNK: usize = 16 * 1024;
    // In flight: the bandwidth-delay product, in chunks, and a little more.
    let bdp = (rate as f64 * delay.as_secs_f64()) as usize / CHUNK + 4;
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Instant, Vec<u8>)>(bdp);
    let writer = thread::spawn(move || {
        let mut to = to;
        for (at, bytes) in rx {
            let now = Instant::now();
            if at > now {
                thread::sleep(at - now);
            }
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let left = {
            let mut free = clock.lock().unwrap();
            let start = (*free).max(Instant::now());
            *free = start + Duration::from_secs_f64(n as f64 / rate as f64);
            *free
        };
        // The sender waits while its bytes are being clocked onto the link.
        let now = Instant::now();
        if left > now {
            thread::sleep(left - now);
        }
        if tx.send((left + delay, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
}

/// A minimal presign backend for the `http` remote, in the test process: it checks the
/// device token, signs with the S3 server's credentials (rusty-s3) and answers the JSON the
/// README documents, including the multipart calls (`<endpoint>/multipart`), which it runs
/// against the server itself. The next `expire_next` PUT URLs it hands out are already
/// expired when the device gets them; their keys are recorded in `expired`. Clearing
/// `multipart` makes it a backend without multipart calls (404).
pub struct PresignService {
    pub port: u16,
    /// (`PUT`/`HEAD`/`GET`/`DELETE`, or `multipart_<action>`, key) of every request.
    pub requests: Arc<Mutex<Vec<(String, String)>>>,
    pub expire_next: Arc<AtomicU32>,
    pub expired: Arc<Mutex<Vec<String>>>,
    pub multipart: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

/// What every backend connection shares.
struct Backend {
    /// Signs the URLs handed to the device (their host may be a proxy).
    signer: S3Client,
    /// The backend's own calls to the server (create, list, complete, abort).
    direct: S3Client,
    token: String,
    requests: Arc<Mutex<Vec<(String, String)>>>,
    expire_next: Arc<AtomicU32>,
    expired: Arc<Mutex<Vec<String>>>,
    multipart: Arc<AtomicBool>,
}

impl PresignService {
    pub fn start(s3_endpoint: &str, token: &str) -> PresignService {
        Self::start_via(s3_endpoint, s3_endpoint, token)
    }

    /// A backend that talks to the server at `s3_endpoint` but hands the device URLs
    /// for `url_endpoint` (a proxy in front of the same server).
    pub fn start_via(s3_endpoint: &str, url_endpoint: &str, token: &str) -> PresignService {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let backend = Arc::new(Backend {
            signer: S3Client::new(url_endpoint),
            direct: S3Client::new(s3_endpoint),
            token: token.to_string(),
            requests: Arc::new(Mutex::new(Vec::new())),
            expire_next: Arc::new(AtomicU32::new(0)),
            expired: Arc::new(Mutex::new(Vec::new())),
            multipart: Arc::new(AtomicBool::new(true)),
        });
        let service = PresignService {
            port,
            requests: backend.requests.clone(),
            expire_next: backend.expire_next.clone(),
            expired: backend.expired.clone(),
            multipart: backend.multipart.clone(),
            stop: stop.clone(),
        };
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let backend = backend.clone();
                thread::spawn(move || {
                    let _ = presign_conn(conn, &backend);
                });
            }
        });
        service
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/v1/presign", self.port)
    }

    /// How many presign requests named `method` and `key`.
    pub fn count(&self, method: &str, key: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, k)| m == method && k == key)
            .count()
    }
}

impl Drop for PresignService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn presign_conn(conn: TcpStream, be: &Backend) -> io::Result<()> {
    let mut r = BufReader::new(conn.try_clone()?);
    let mut w = conn;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let path = line.split(' ').nth(1).unwrap_or("").to_string();
        let mut len = 0usize;
        let mut auth = String::new();
        loop {
            let mut h = String::new();
            r.read_line(&mut h)?;
            if h == "\r\n" || h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((&h, ""));
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().unwrap_or(0),
                "authorization" => auth = v.trim().to_string(),
                _ => {}
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let (status, json) = if auth != format!("Bearer {}", be.token) {
            (
                401,
                serde_json::json!({"code": "unauthorized", "message": "device token refused"}),
            )
        } else if path.ends_with("/multipart") {
            let (action, key) = (&req["action"], &req["key"]);
            be.requests.lock().unwrap().push((
                format!("multipart_{}", action.as_str().unwrap_or("")),
                key.as_str().unwrap_or("").to_string(),
            ));
            if be.multipart.load(Ordering::SeqCst) {
                multipart_call(be, &req)
            } else {
                (
                    404,
                    serde_json::json!({"code": "not_found", "message": "no such endpoint"}),
                )
            }
        } else {
            presign_call(be, &req)
        };
        let body = serde_json::to_vec(&json).unwrap();
        let reason = match status {
            200 => "OK",
            401 => "Unauthorized",
            404 => "Not Found",
            _ => "Error",
        };
        write!(
            w,
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )?;
        w.write_all(&body)?;
    }
}

/// `POST <endpoint>`: one presigned URL.
fn presign_call(be: &Backend, req: &serde_json::Value) -> (u16, serde_json::Value) {
    let method = req["method"].as_str().unwrap_or("").to_string();
    let key = req["key"].as_str().unwrap_or("").to_string();
    be.requests
        .lock()
        .unwrap()
        .push((method.clone(), key.clone()));
    let b = be.signer.bucket();
    let c = Some(be.signer.credentials());
    let mut headers = serde_json::Map::new();
    let url = match method.as_str() {
        "PUT" => {
            let mut a = PutObject::new(b, c, &key);
            for (field, header) in [
                ("content_md5", "content-md5"),
                ("sha256", "x-amz-meta-sha256"),
                ("content_type", "content-type"),
            ] {
                if let Some(v) = req[field].as_str() {
                    a.headers_mut().insert(header, v.to_string());
                    headers.insert(header.into(), v.into());
                }
            }
            let expire = be
                .expire_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if expire {
                be.expired.lock().unwrap().push(key.clone());
                // Valid for one second, handed out after two: a URL that
                // expired on its way to the device.
                let u = a.sign(Duration::from_secs(1));
                thread::sleep(Duration::from_millis(2100));
                u
            } else {
                a.sign(TTL)
            }
        }
        "HEAD" => HeadObject::new(b, c, &key).sign(TTL),
        "GET" => GetObject::new(b, c, &key).sign(TTL),
        "DELETE" => DeleteObject::new(b, c, &key).sign(TTL),
        _ => {
            return (
                400,
                serde_json::json!({"code": "bad_method", "message": "unknown method"}),
            )
        }
    };
    (
        200,
        serde_json::json!({"url": url.as_str(), "headers": headers}),
    )
}

/// `POST <endpoint>/multipart`: create, part, list, complete, abort.
fn multipart_call(be: &Backend, req: &serde_json::Value) -> (u16, serde_json::Value) {
    let action = req["action"].as_str().unwrap_or("").to_string();
    let key = req["key"].as_str().unwrap_or("").to_string();
    let uid = req["upload_id"].as_str().unwrap_or("").to_string();
    let d = &be.direct;
    let (b, c) = (d.bucket(), Some(d.credentials()));
    // The server's answer: (status, body).
    let run = |method: &str, url: url::Url, headers: &[(&str, String)], body: &str| {
        let mut rq = ureq::http::Request::builder()
            .method(method)
            .uri(url.as_str());
        for (k, v) in headers {
            rq = rq.header(*k, v.as_str());
        }
        let mut resp = d.agent.run(rq.body(body.to_string()).unwrap()).unwrap();
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(16 << 20)
            .read_to_string()
            .unwrap_or_default();
        (status, text)
    };
    let failed = |status: u16, text: &str| {
        (
            if status == 404 { 404 } else { 502 },
            serde_json::json!({"code": "storage", "message": format!("storage answered {status}: {text}")}),
        )
    };
    match action.as_str() {
        "create" => {
            let mut a = CreateMultipartUpload::new(b, c, &key);
            let mut headers = Vec::new();
            for (field, header) in [
                ("sha256", "x-amz-meta-sha256"),
                ("content_type", "content-type"),
            ] {
                if let Some(v) = req[field].as_str() {
                    a.headers_mut().insert(header, v.to_string());
                    headers.push((header, v.to_string()));
                }
            }
            let (status, text) = run("POST", a.sign(TTL), &headers, "");
            if status != 200 {
                return failed(status, &text);
            }
            let r = CreateMultipartUpload::parse_response(&text).unwrap();
            (200, serde_json::json!({"upload_id": r.upload_id()}))
        }
        "part" => {
            let pn = req["part_number"].as_u64().unwrap_or(0) as u16;
            // Signed for where the device sends (maybe the proxy), like every URL it gets.
            let s = &be.signer;
            let mut a = UploadPart::new(s.bucket(), Some(s.credentials()), &key, pn, &uid);
            let mut headers = serde_json::Map::new();
            if let Some(v) = req["content_md5"].as_str() {
                a.headers_mut().insert("content-md5", v.to_string());
                headers.insert("content-md5".into(), v.into());
            }
            (
                200,
                serde_json::json!({"url": a.sign(TTL).as_str(), "headers": headers}),
            )
        }
        "list" => {
            let (status, text) = run("GET", ListParts::new(b, c, &key, &uid).sign(TTL), &[], "");
            if status != 200 {
                return failed(status, &text);
            }
            let parts: Vec<_> = text
                .split("<Part>")
                .skip(1)
                .map(|p| {
                    let tag = |t: &str| {
                        let open = format!("<{t}>");
                        let s = p.find(&open).map(|i| i + open.len()).unwrap_or(0);
                        let e = p[s..].find('<').map(|i| s + i).unwrap_or(s);
                        p[s..e].replace("&quot;", "\"")
                    };
                    serde_json::json!({
                        "part_number": tag("PartNumber").parse::<u64>().unwrap_or(0),
                        "size": tag("Size").parse::<u64>().unwrap_or(0),
                        "etag": tag("ETag"),
                    })
                })
                .collect();
            (200, serde_json::json!({ "parts": parts }))
        }
        "complete" => {
            let mut xml = String::from("<CompleteMultipartUpload>");
            for p in req["parts"].as_array().cloned().unwrap_or_default() {
                xml.push_str(&format!(
                    "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>",
                    p["part_number"],
                    p["etag"].as_str().unwrap_or("")
                ));
            }
            xml.push_str("</CompleteMultipartUpload>");
            let a = CompleteMultipartUpload::new(b, c, &key, &uid, std::iter::empty::<&str>());
            let (status, text) = run("POST", a.sign(TTL), &[], &xml);
            if status != 200 || text.contains("<Error>") {
                return failed(status, &text);
            }
            let etag = text
                .split("<ETag>")
                .nth(1)
                .and_then(|t| t.split("</ETag>").next())
                .unwrap_or("")
                .replace("&quot;", "\"");
            (200, serde_json::json!({ "etag": etag }))
        }
        "abort" => {
            let (status, text) = run(
                "DELETE",
                AbortMultipartUpload::new(b, c, &key, &uid).sign(TTL),
                &[],
                "",
            );
            match status {
                200..=299 => (200, serde_json::json!({})),
                _ => failed(status, &text),
            }
        }
        _ => (
            400,
            serde_json::json!({"code": "bad_action", "message": "unknown action"}),
        ),
    }
}
