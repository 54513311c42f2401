//! The little HTTP/1.1 the dashboard needs: read one request (head and a small body, with
//! limits), write a response, and the checks that decide who may ask: the `Host` header
//! (against DNS rebinding), the `Origin` of a POST, and the bearer token (compared in
//! constant time). One request per connection (`Connection: close`); the page asks for
//! three things, so keep-alive would buy nothing.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;

/// Longest request head accepted; a browser's is well under 2 kB.
const MAX_HEAD: usize = 8 * 1024;
/// Largest body accepted (a command is a few dozen bytes).
pub const MAX_BODY: usize = 4 * 1024;

#[derive(Debug, PartialEq)]
pub struct Request {
    pub method: String,
    /// The path without the query string.
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("bad request: {0}")]
    Bad(&'static str),
    #[error("request too large")]
    TooLarge,
}

/// Parses the request line and headers (everything before the blank line).
pub fn parse_head(head: &str) -> Result<Request, HttpError> {
    let mut lines = head.split("\r\n");
    let line = lines.next().ok_or(HttpError::Bad("empty"))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Bad("request line"));
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err(HttpError::Bad("request line"));
    }
    let path = target.split(['?', '#']).next().unwrap_or("/").to_string();
    let mut headers = Vec::new();
    for l in lines.filter(|l| !l.is_empty()) {
        let (k, v) = l.split_once(':').ok_or(HttpError::Bad("header"))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    Ok(Request {
        method: method.to_string(),
        path,
        headers,
        body: Vec::new(),
    })
}

/// Reads one request from the connection.
pub fn read_request(stream: &TcpStream) -> Result<Request, HttpError> {
    let mut r = BufReader::new(stream.take((MAX_HEAD + MAX_BODY) as u64));
    let mut head = String::new();
    loop {
        let n = r.read_line(&mut head)?;
        if n == 0 {
            return Err(HttpError::Bad("connection closed mid-request"));
        }
        if head.len() > MAX_HEAD {
            return Err(HttpError::TooLarge);
        }
        if head.ends_with("\r\n\r\n") || head == "\r\n" {
            break;
        }
    }
    let mut req = parse_head(head.trim_end_matches("\r\n"))?;
    if req.header("transfer-encoding").is_some() {
        return Err(HttpError::Bad("chunked bodies are not accepted"));
    }
    let len: usize = match req.header("content-length") {
        Some(v) => v.parse().map_err(|_| HttpError::Bad("content-length"))?,
        None => 0,
    };
    if len > MAX_BODY {
        return Err(HttpError::TooLarge);
    }
    req.body = vec![0; len];
    r.read_exact(&mut req.body)?;
    Ok(req)
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        421 => "Misdirected Request",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Headers every response carries: nothing cached, nothing framed, no MIME sniffing.
const COMMON: &str = "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
                      X-Frame-Options: DENY\r\nReferrer-Policy: no-referrer\r\n";

/// Writes a whole response and closes the exchange.
pub fn respond(
    mut w: impl Write,
    code: u16,
    content_type: &str,
    extra_headers: &str,
    body: &[u8],
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{COMMON}{extra_headers}Connection: close\r\n\r\n",
        reason(code),
        body.len()
    );
    w.write_all(head.as_bytes())?;
    w.write_all(body)?;
    w.flush()
}

/// A JSON error body: `{"error": "..."}`.
pub fn respond_error(w: impl Write, code: u16, message: &str) -> io::Result<()> {
    let body = serde_json::json!({ "error": message }).to_string();
    respond(w, code, "application/json", "", body.as_bytes())
}

/// The head of a server-sent event stream (the body follows, unbounded).
pub fn event_stream_head(mut w: impl Write) -> io::Result<()> {
    w.write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n{COMMON}Connection: close\r\n\r\n"
        )
        .as_bytes(),
    )?;
    w.flush()
}

/// The host part of a `Host` header (`[::1]:8080` → `::1`).
fn host_of(h: &str) -> &str {
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    h.rsplit_once(':').map_or(h, |(host, _)| host)
}

/// Whether a request naming `host` is for us. A web page on another site can make a
/// browser talk to 127.0.0.1 under a name it controls (DNS rebinding); refusing names we
/// were not told about keeps such pages from reading the fleet. IP literals and
/// `localhost` are always fine.
pub fn host_allowed(host: Option<&str>, allowed: &[String]) -> bool {
    let Some(h) = host else {
        return false;
    };
    let h = host_of(h.trim());
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>().is_ok()
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(h))
}

/// A POST from a page must come from our own page: its `Origin`, when the browser sends
/// one, names the same host and port as `Host`.
pub fn same_origin(origin: Option<&str>, host: Option<&str>) -> bool {
    match (origin, host) {
        (None, _) => true,
        (Some(o), Some(h)) => o
            .strip_prefix("http://")
            .is_some_and(|rest| rest.eq_ignore_ascii_case(h)),
        (Some(_), None) => false,
    }
}

/// `Authorization: Bearer <token>` matches, compared without an early exit.
pub fn token_matches(authorization: Option<&str>, token: &str) -> bool {
    let Some(given) = authorization.and_then(|a| a.strip_prefix("Bearer ")) else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    if a.len() != b.len() || b.is_empty() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_request_head() {
        let r = parse_head(
            "GET /events?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept: text/event-stream",
        )
        .unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/events");
        assert_eq!(r.header("host"), Some("127.0.0.1:8080"));
        assert!(parse_head("GET / HTTP/2").is_err());
        assert!(parse_head("GET http://x/ HTTP/1.1").is_err());
        assert!(parse_head("GET / HTTP/1.1\r\nno colon").is_err());
    }

    #[test]
    fn hosts_origins_and_tokens() {
        let none: &[String] = &[];
        assert!(host_allowed(Some("127.0.0.1:8080"), none));
        assert!(host_allowed(Some("[::1]:8080"), none));
        assert!(host_allowed(Some("localhost:8080"), none));
        assert!(!host_allowed(Some("evil.example:8080"), none));
        assert!(!host_allowed(None, none));
        assert!(host_allowed(Some("ops-box:8080"), &["ops-box".to_string()]));

        assert!(same_origin(None, Some("127.0.0.1:8080")));
        assert!(same_origin(
            Some("http://127.0.0.1:8080"),
            Some("127.0.0.1:8080")
        ));
        assert!(!same_origin(
            Some("http://evil.example"),
            Some("127.0.0.1:8080")
        ));
        assert!(!same_origin(Some("null"), Some("127.0.0.1:8080")));

        assert!(token_matches(Some("Bearer s3cret"), "s3cret"));
        assert!(!token_matches(Some("Bearer s3cre"), "s3cret"));
        assert!(!token_matches(Some("s3cret"), "s3cret"));
        assert!(!token_matches(None, "s3cret"));
        assert!(!token_matches(Some("Bearer "), ""));
    }
}
