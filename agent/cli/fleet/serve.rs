//! `fieldsync fleet --serve ADDR`: the fleet view as a live web page. One MQTT
//! subscription (the same topics as `fleet`, plus command results) feeds the [`Board`];
//! a small HTTP/1.1 server on std threads serves the embedded page (`GET /`), pushes
//! every change to it as server-sent events (`GET /events`), and, only when started with
//! `--allow-commands` and a `--token-file`, publishes the page's commands (`POST /cmd`).
//!
//! Threads: one drives the MQTT connection, one accepts, one per connection (at most
//! [`MAX_CONNECTIONS`]). They share the board behind a mutex; a condition variable wakes
//! the event streams when it changes. Nothing here blocks an async runtime: this command
//! has none.
//!
//! Security model: read-only unless told; commands need the token in an `Authorization`
//! header, a JSON body (so a page on another site cannot send one without a CORS
//! preflight, which this server never grants) and a matching `Origin`; requests for a
//! `Host` that is neither an IP address, `localhost` nor an `--allow-host` are refused
//! (DNS rebinding). The page never receives the token or the broker's credentials.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use rumqttc::{Client, Connection, Event, MqttOptions, Packet, QoS, RecvTimeoutError};
use serde::Deserialize;
use serde_json::json;
use sha2::Digest as _;

use super::board::{Board, BrokerState, Changes, CommandRefused};
use super::http::{self, HttpError, Request};
use super::CONNECT_TIMEOUT;
use crate::cli::error::{exit, CliError};
use crate::mqtt;

/// Connections served at once (page loads, event streams, commands); more get a 503. An
/// operator's tool: a handful of browser tabs, not the internet.
const MAX_CONNECTIONS: usize = 64;
/// A comment line on an idle event stream this often keeps proxies from closing it and
/// notices a closed tab.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Changes are sent at most this often per page (a busy fleet coalesces into one push).
const PUSH_EVERY: Duration = Duration::from_millis(200);
/// How often attention is re-decided without a message (pending photos age).
const TICK: Duration = Duration::from_secs(5);
/// A client that sends its request this slowly (or reads events this slowly) is dropped.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

const PAGE_HTML: &str = include_str!("page/index.html");
const PAGE_CSS: &str = include_str!("page/style.css");
const PAGE_JS: &str = include_str!("page/app.js");

/// What `fleet --serve` was told (the flags of `fleet` that only it uses).
#[derive(Debug, Clone)]
pub struct ServeArgs {
    pub addr: String,
    pub allow_commands: bool,
    pub token_file: Option<PathBuf>,
    pub attention_after: Duration,
    pub allow_host: Vec<String>,
}

/// Everything the connection threads share.
struct Shared {
    board: Mutex<Board>,
    changed: Condvar,
    client: Client,
    /// The command token, when commands are allowed.
    token: Option<String>,
    allow_host: Vec<String>,
    attention_after: Duration,
    prefix: String,
    page: String,
    csp: String,
    active: AtomicUsize,
}

impl Shared {
    fn notify(&self) {
        self.changed.notify_all();
    }
}

/// The page with its style and script inlined, and a Content-Security-Policy that allows
/// exactly those two (by hash) and connections to this server.
fn page() -> (String, String) {
    let hash = |s: &str| base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(s));
    let html = PAGE_HTML
        .replacen("/*STYLE*/", PAGE_CSS, 1)
        .replacen("/*SCRIPT*/", PAGE_JS, 1);
    let csp = format!(
        "default-src 'none'; style-src 'sha256-{}'; script-src 'sha256-{}'; connect-src 'self'; \
         img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash(PAGE_CSS),
        hash(PAGE_JS)
    );
    (html, csp)
}

/// `HOST:PORT`, or a bare port for 127.0.0.1.
fn parse_addr(s: &str) -> Result<SocketAddr, CliError> {
    let bad = |why: String| {
        CliError::new(
            exit::USAGE,
            format!("--serve {s}: {why} (expected HOST:PORT, e.g. 127.0.0.1:8080)"),
        )
    };
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("no address".into()))
}

fn read_token(args: &ServeArgs) -> Result<Option<String>, CliError> {
    match (&args.token_file, args.allow_commands) {
        (None, false) => Ok(None),
        (None, true) => Err(CliError::new(
            exit::USAGE,
            "--allow-commands needs --token-file FILE (the token the page must send)",
        )),
        (Some(p), false) => Err(CliError::new(
            exit::USAGE,
            format!(
                "--token-file {}: only used with --allow-commands",
                p.display()
            ),
        )),
        (Some(p), true) => {
            let t = std::fs::read_to_string(p).map_err(|e| {
                CliError::new(exit::USAGE, format!("--token-file {}: {e}", p.display()))
            })?;
            let t = t.trim();
            if t.is_empty() {
                return Err(CliError::new(
                    exit::USAGE,
                    format!("--token-file {}: the file is empty", p.display()),
                ));
            }
            if t.chars().any(|c| c.is_control() || c == ' ') {
                return Err(CliError::new(
                    exit::USAGE,
                    format!(
                        "--token-file {}: the token must be one word of printable characters",
                        p.display()
                    ),
                ));
            }
            Ok(Some(t.to_string()))
        }
    }
}

/// Runs the dashboard until the process is stopped.
pub fn run(
    opts: MqttOptions,
    endpoint: String,
    prefix: &str,
    args: ServeArgs,
) -> Result<i32, CliError> {
    let token = read_token(&args)?;
    let addr = parse_addr(&args.addr)?;
    let listener = TcpListener::bind(addr).map_err(|e| {
        CliError::new(
            exit::FAILURE,
            format!("fleet --serve {}: cannot listen: {e}", args.addr),
        )
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;

    let (client, conn) = Client::new(opts, 64);
    let (html, csp) = page();
    let shared = Arc::new(Shared {
        board: Mutex::new(Board::new(args.attention_after)),
        changed: Condvar::new(),
        client: client.clone(),
        token,
        allow_host: args.allow_host.clone(),
        attention_after: args.attention_after,
        prefix: prefix.to_string(),
        page: html,
        csp,
        active: AtomicUsize::new(0),
    });
    let (ready_tx, ready_rx) = mpsc::channel();
    {
        let shared = shared.clone();
        let prefix = prefix.to_string();
        let endpoint = endpoint.clone();
        std::thread::Builder::new()
            .name("fleet-mqtt".into())
            .spawn(move || mqtt_loop(conn, client, &prefix, &endpoint, &shared, ready_tx))
            .map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
    }
    match ready_rx.recv_timeout(CONNECT_TIMEOUT) {
        Ok(Ok(())) => {}
        Ok(Err(why)) => {
            return Err(CliError::new(
                exit::FAILURE,
                format!("fleet: cannot connect to {endpoint}: {why}"),
            ))
        }
        Err(_) => {
            return Err(CliError::new(
                exit::FAILURE,
                format!("fleet: no answer from {endpoint} within {CONNECT_TIMEOUT:?}"),
            ))
        }
    }
    let mode = if shared.token.is_some() {
        "commands allowed with the token"
    } else {
        "read-only"
    };
    println!(
        "fieldsync fleet: serving http://{local}/ ({mode}), devices under {prefix} on {endpoint}"
    );
    let _ = std::io::stdout().flush();

    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if shared.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            shared.active.fetch_sub(1, Ordering::SeqCst);
            let _ = http::respond_error(&stream, 503, "too many connections");
            continue;
        }
        let worker = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("fleet-http".into())
            .spawn(move || {
                let _ = handle(&stream, &worker);
                worker.active.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            // The closure was dropped unrun: give its slot back.
            shared.active.fetch_sub(1, Ordering::SeqCst);
        }
    }
    Ok(exit::OK)
}

/// Drives the subscription: (re)subscribes after every connect, feeds the board, keeps
/// the broker state on the page, and re-decides attention every [`TICK`].
fn mqtt_loop(
    mut conn: Connection,
    client: Client,
    prefix: &str,
    endpoint: &str,
    shared: &Shared,
    ready: mpsc::Sender<Result<(), String>>,
) {
    let mut ready = Some(ready);
    let mut last_tick = Instant::now();
    let mut outage_logged = false;
    loop {
        match conn.recv_timeout(Duration::from_secs(1)) {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                for t in ["state", "status", "cmd/+/result"] {
                    let _ = client.try_subscribe(format!("{prefix}/{t}"), QoS::AtLeastOnce);
                }
            }
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(Ok(()));
                }
                if outage_logged {
                    eprintln!("fleet: connected to {endpoint} again");
                    outage_logged = false;
                }
                let changed = shared.board.lock().unwrap().set_broker(BrokerState {
                    connected: true,
                    error: None,
                });
                if changed {
                    shared.notify();
                }
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let changed = shared.board.lock().unwrap().on_message(
                    &p.topic,
                    &p.payload,
                    p.retain,
                    SystemTime::now(),
                );
                if changed {
                    shared.notify();
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                let why = mqtt::describe(&e);
                if let Some(r) = ready.take() {
                    let _ = r.send(Err(why));
                    return;
                }
                if !outage_logged {
                    eprintln!("fleet: connection to {endpoint} lost ({why}); reconnecting");
                    outage_logged = true;
                }
                let changed = shared.board.lock().unwrap().set_broker(BrokerState {
                    connected: false,
                    error: Some(why),
                });
                if changed {
                    shared.notify();
                }
                std::thread::sleep(Duration::from_secs(2));
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            if shared.board.lock().unwrap().tick(SystemTime::now()) {
                shared.notify();
            }
        }
    }
}

/// Serves one connection: one request, or one event stream.
fn handle(stream: &TcpStream, shared: &Shared) -> Result<(), HttpError> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let req = match http::read_request(stream) {
        Ok(r) => r,
        Err(HttpError::TooLarge) => {
            return Ok(http::respond_error(stream, 413, "request too large")?);
        }
        Err(HttpError::Bad(why)) => {
            return Ok(http::respond_error(stream, 400, why)?);
        }
        Err(e) => return Err(e),
    };
    if !http::host_allowed(req.header("host"), &shared.allow_host) {
        return Ok(http::respond_error(
            stream,
            421,
            "unknown Host (start with --allow-host NAME to serve this name)",
        )?);
    }
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/") | ("GET", "/index.html") => Ok(http::respond(
            stream,
            200,
            "text/html; charset=utf-8",
            &format!("Content-Security-Policy: {}\r\n", shared.csp),
            shared.page.as_bytes(),
        )?),
        ("GET", "/events") => events(stream, shared),
        ("POST", "/cmd") => command(stream, shared, &req),
        (_, "/" | "/index.html" | "/events" | "/cmd") => {
            Ok(http::respond_error(stream, 405, "method not allowed")?)
        }
        _ => Ok(http::respond_error(stream, 404, "not found")?),
    }
}

/// One server-sent event (the JSON has no newlines: serde escapes them in strings).
fn sse(w: &mut impl Write, event: &str, data: &serde_json::Value) -> std::io::Result<()> {
    write!(w, "event: {event}\ndata: {data}\n\n")
}

/// `GET /events`: a `hello` (what the page may do), a `snapshot`, then `device` events
/// for each change, a new `snapshot` when a device disappears or the broker connection
/// changes, and a keep-alive comment while idle. Ends when the page goes away.
fn events(stream: &TcpStream, shared: &Shared) -> Result<(), HttpError> {
    stream.set_read_timeout(None)?;
    let mut w = std::io::BufWriter::new(stream);
    http::event_stream_head(&mut w)?;
    write!(w, "retry: 2000\n\n")?;
    sse(
        &mut w,
        "hello",
        &json!({
            "version": env!("CARGO_PKG_VERSION"),
            "prefix": shared.prefix,
            "allow_commands": shared.token.is_some(),
            "attention_after_s": shared.attention_after.as_secs(),
        }),
    )?;
    let mut seen = 0u64;
    loop {
        let (changes, seq) = {
            let b = shared.board.lock().unwrap();
            (b.changes(seen, SystemTime::now()), b.seq())
        };
        seen = seq;
        let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        match changes {
            Changes::Nothing => {}
            Changes::Snapshot(mut s) => {
                s["server_time"] = json!(now);
                sse(&mut w, "snapshot", &s)?;
            }
            Changes::Devices(devices) => {
                for d in devices {
                    sse(&mut w, "device", &json!({"server_time": now, "device": d}))?;
                }
            }
        }
        w.flush()?;
        std::thread::sleep(PUSH_EVERY);
        let b = shared.board.lock().unwrap();
        let (b, timeout) = shared
            .changed
            .wait_timeout_while(b, KEEPALIVE, |b| b.seq() == seen)
            .unwrap();
        drop(b);
        if timeout.timed_out() {
            write!(w, ": keep-alive\n\n")?;
            w.flush()?;
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandBody {
    /// The device's topic prefix, as the page got it.
    device: String,
    command: String,
}

/// `POST /cmd`: checks, publishes, answers `202 {"request_id"}`; the device's result
/// reaches the page through the event stream.
fn command(stream: &TcpStream, shared: &Shared, req: &Request) -> Result<(), HttpError> {
    let Some(token) = &shared.token else {
        return Ok(http::respond_error(
            stream,
            403,
            "commands are disabled: start fleet --serve with --allow-commands --token-file FILE",
        )?);
    };
    if !http::token_matches(req.header("authorization"), token) {
        return Ok(http::respond_error(stream, 403, "missing or wrong token")?);
    }
    if !http::same_origin(req.header("origin"), req.header("host")) {
        return Ok(http::respond_error(
            stream,
            403,
            "cross-origin request refused",
        )?);
    }
    let json_body = req
        .header("content-type")
        .is_some_and(|c| c.split(';').next().unwrap_or("").trim() == "application/json");
    if !json_body {
        return Ok(http::respond_error(
            stream,
            415,
            "expected application/json",
        )?);
    }
    let body: CommandBody = match serde_json::from_slice(&req.body) {
        Ok(b) => b,
        Err(e) => {
            return Ok(http::respond_error(
                stream,
                400,
                &format!("expected {{\"device\": PREFIX, \"command\": NAME}}: {e}"),
            )?)
        }
    };
    let request_id = format!("dash-{:016x}", fastrand::u64(..));
    let mut board = shared.board.lock().unwrap();
    if !board.broker().connected {
        drop(board);
        return Ok(http::respond_error(
            stream,
            503,
            "not connected to the broker",
        )?);
    }
    let out = match board.command(&body.device, &body.command, request_id, SystemTime::now()) {
        Ok(o) => o,
        Err(e) => {
            drop(board);
            let code = match e {
                CommandRefused::UnknownCommand(_) => 400,
                CommandRefused::UnknownDevice(_) => 404,
            };
            return Ok(http::respond_error(stream, code, &e.to_string())?);
        }
    };
    let sent = shared
        .client
        .try_publish(&out.topic, QoS::AtLeastOnce, false, out.payload);
    if let Err(e) = sent {
        board.command_failed(&body.device, &out.request_id, &e.to_string());
        drop(board);
        shared.notify();
        return Ok(http::respond_error(
            stream,
            503,
            "the broker connection is busy",
        )?);
    }
    drop(board);
    shared.notify();
    Ok(http::respond(
        stream,
        202,
        "application/json",
        "",
        json!({"request_id": out.request_id}).to_string().as_bytes(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_one_document_with_its_hashes_in_the_policy() {
        let (html, csp) = page();
        assert!(html.contains(PAGE_JS) && html.contains(PAGE_CSS));
        assert!(!html.contains("/*SCRIPT*/") && !html.contains("/*STYLE*/"));
        // No external resources: the only URL is the SVG namespace (a name, never fetched).
        let rest = html.replace("\"http://www.w3.org/2000/svg\"", "");
        assert!(
            !rest.contains("http://") && !rest.contains("https://"),
            "no CDN"
        );
        assert!(!rest.contains("<link") && !rest.contains(" src="));
        assert!(csp.contains("script-src 'sha256-") && !csp.contains("unsafe"));
    }

    #[test]
    fn serve_address() {
        assert_eq!(parse_addr("8080").unwrap().to_string(), "127.0.0.1:8080");
        assert_eq!(
            parse_addr("127.0.0.1:0").unwrap().to_string(),
            "127.0.0.1:0"
        );
        let e = parse_addr("nonsense").unwrap_err();
        assert_eq!(e.code, exit::USAGE);
        assert!(e.msg.starts_with("--serve nonsense:"), "{}", e.msg);
    }
}
