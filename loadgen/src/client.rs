//! A small blocking HTTP/1.1 client for the load test and the server's tests: keep-alive connections,
//! `Content-Length` and chunked bodies, server-sent event parsing. Plain HTTP on loopback only;
//! not a general client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::{Error, Result};

/// Longest header block or chunk-size line accepted from the server.
const MAX_LINE: usize = 64 * 1024;

/// A response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The whole body (chunked bodies de-chunked).
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).map_err(|e| Error::NotJson {
            status: self.status,
            message: e.to_string(),
            start: String::from_utf8_lossy(&self.body[..self.body.len().min(200)]).into_owned(),
        })
    }

    /// The body as server-sent events, in order.
    pub fn events(&self) -> Vec<SseEvent> {
        parse_sse(&String::from_utf8_lossy(&self.body))
    }
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// `event:` (empty when absent).
    pub event: String,
    /// `data:` lines joined with newlines.
    pub data: String,
}

/// Splits an event stream into events (comments and keep-alives dropped).
pub fn parse_sse(text: &str) -> Vec<SseEvent> {
    let mut out = Vec::new();
    let mut event = String::new();
    let mut data: Vec<&str> = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            if !data.is_empty() {
                out.push(SseEvent {
                    event: std::mem::take(&mut event),
                    data: data.join("\n"),
                });
            }
            event.clear();
            data.clear();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push(v.strip_prefix(' ').unwrap_or(v));
        } else if let Some(v) = line.strip_prefix("event:") {
            event = v.trim().to_string();
        }
    }
    out
}

/// One keep-alive connection to a server.
pub struct Client {
    addr: SocketAddr,
    timeout: Duration,
    conn: Option<BufReader<TcpStream>>,
    bearer: Option<String>,
}

impl Client {
    /// A client of `addr` (`host:port`); `timeout` bounds each read and write.
    pub fn new(addr: &str, timeout: Duration) -> Result<Self> {
        let addr = addr
            .to_socket_addrs()
            .map_err(|e| Error::Address {
                addr: addr.to_string(),
                message: e.to_string(),
            })?
            .next()
            .ok_or_else(|| Error::Address {
                addr: addr.to_string(),
                message: "resolves to nothing".into(),
            })?;
        Ok(Client {
            addr,
            timeout,
            conn: None,
            bearer: None,
        })
    }

    /// Sends `Authorization: Bearer <key>` with every request of [`Client::request`].
    #[must_use]
    pub fn with_bearer(mut self, key: impl Into<String>) -> Self {
        self.bearer = Some(key.into());
        self
    }

    /// The server address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn io(&self, what: &str, e: std::io::Error) -> Error {
        Error::Io {
            addr: self.addr,
            op: what.to_string(),
            source: e,
        }
    }

    fn connect(&mut self) -> Result<&mut BufReader<TcpStream>> {
        let conn = match self.conn.take() {
            Some(c) => c,
            None => {
                let s = TcpStream::connect_timeout(&self.addr, self.timeout)
                    .map_err(|e| self.io("connect", e))?;
                s.set_read_timeout(Some(self.timeout))
                    .and_then(|_| s.set_write_timeout(Some(self.timeout)))
                    .and_then(|_| s.set_nodelay(true))
                    .map_err(|e| self.io("socket options", e))?;
                BufReader::new(s)
            }
        };
        Ok(self.conn.insert(conn))
    }

    /// `GET path`.
    pub fn get(&mut self, path: &str) -> Result<Response> {
        self.request("GET", path, None)
    }

    /// `POST path` with a JSON body.
    pub fn post_json(&mut self, path: &str, body: &serde_json::Value) -> Result<Response> {
        self.request("POST", path, Some(body.to_string().as_bytes()))
    }

    /// Sends a request and reads the whole response. A connection the server closed while idle
    /// is reopened once.
    pub fn request(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Response> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAccept: */*\r\n",
            self.addr
        );
        if let Some(key) = &self.bearer {
            head.push_str(&format!("Authorization: Bearer {key}\r\n"));
        }
        if let Some(b) = body {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        head.push_str("\r\n");
        let mut raw = head.into_bytes();
        if let Some(b) = body {
            raw.extend_from_slice(b);
        }
        let reused = self.conn.is_some();
        match self.send_raw_keep(&raw) {
            Err(_) if reused => {
                self.conn = None;
                self.send_raw_keep(&raw)
            }
            r => r,
        }
    }

    /// Sends bytes as they are (a request the test crafted, possibly malformed) on this
    /// connection and reads one response.
    pub fn send_raw_keep(&mut self, raw: &[u8]) -> Result<Response> {
        let addr = self.addr;
        let conn = self.connect()?;
        let result = conn
            .get_mut()
            .write_all(raw)
            .and_then(|_| conn.get_mut().flush())
            .map_err(|e| Error::Io {
                addr,
                op: "write".into(),
                source: e,
            })
            .and_then(|_| read_response(conn, addr));
        match result {
            Ok(resp) => {
                let close = resp
                    .header("connection")
                    .is_some_and(|v| v.eq_ignore_ascii_case("close"));
                if close {
                    self.conn = None;
                }
                Ok(resp)
            }
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }
}

/// Sends `raw` on a new connection, half-closes it when `half_close` (so a truncated body ends
/// at once), and reads the response if the server sends one (`Ok(None)`: it closed without
/// answering).
pub fn send_raw_once(
    addr: SocketAddr,
    raw: &[u8],
    half_close: bool,
    timeout: Duration,
) -> Result<Option<Response>> {
    let io = |what: &str, e: std::io::Error| Error::Io {
        addr,
        op: what.to_string(),
        source: e,
    };
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| io("connect", e))?;
    s.set_read_timeout(Some(timeout))
        .and_then(|_| s.set_write_timeout(Some(timeout)))
        .map_err(|e| io("socket options", e))?;
    // The server may answer (and close) before reading everything: a failed write is fine.
    let _ = s.write_all(raw);
    if half_close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut reader = BufReader::new(s);
    match read_response(&mut reader, addr) {
        Ok(r) => Ok(Some(r)),
        Err(Error::Io { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

pub(crate) fn read_line(r: &mut impl BufRead, addr: SocketAddr) -> Result<String> {
    let mut buf = Vec::new();
    let n = r
        .by_ref()
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut buf)
        .map_err(|e| Error::Io {
            addr,
            op: "read".into(),
            source: e,
        })?;
    if n == 0 {
        return Err(Error::Io {
            addr,
            op: "read".into(),
            source: std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ),
        });
    }
    let s = String::from_utf8_lossy(&buf);
    Ok(s.trim_end_matches(['\r', '\n']).to_string())
}

fn bad(addr: SocketAddr, m: String) -> Error {
    Error::Malformed { addr, message: m }
}

/// The status and the headers (names lower-cased) of a response.
pub(crate) fn read_head(
    r: &mut impl BufRead,
    addr: SocketAddr,
) -> Result<(u16, Vec<(String, String)>)> {
    let status_line = read_line(r, addr)?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(addr, format!("status line {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(r, addr)?;
        if line.is_empty() {
            break;
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad(addr, format!("header line {line:?}")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    Ok((status, headers))
}

pub(crate) fn read_response(r: &mut BufReader<TcpStream>, addr: SocketAddr) -> Result<Response> {
    let (status, headers) = read_head(r, addr)?;
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let read_err = |e: std::io::Error| Error::Io {
        addr,
        op: "read body".into(),
        source: e,
    };
    let mut body = Vec::new();
    if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let size_line = read_line(r, addr)?;
            let size_hex = size_line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| bad(addr, format!("chunk size {size_line:?}")))?;
            if size == 0 {
                // Trailers until the empty line.
                while !read_line(r, addr)?.is_empty() {}
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..]).map_err(read_err)?;
            let _ = read_line(r, addr)?;
        }
    } else if let Some(len) = get("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| bad(addr, format!("content-length {len:?}")))?;
        body.resize(len, 0);
        r.read_exact(&mut body).map_err(read_err)?;
    } else if status != 204 && status != 304 {
        r.read_to_end(&mut body).map_err(read_err)?;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// `host:port` of an `http://host:port[/…]` URL.
pub fn host_port(url: &str) -> Result<String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| Error::Url {
        url: url.to_string(),
        expected: "http://host:port",
    })?;
    let hp = rest.split('/').next().unwrap_or("");
    if hp.is_empty() || !hp.contains(':') {
        return Err(Error::Url {
            url: url.to_string(),
            expected: "http://host:port (with a port)",
        });
    }
    Ok(hp.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_are_split_in_order() {
        let ev = parse_sse("event: step\ndata: {\"a\":1}\n\n: keep-alive\n\nevent: answer\ndata: x\ndata: y\n\ndata: [DONE]\n\n");
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[0].event, "step");
        assert_eq!(ev[1].data, "x\ny");
        assert_eq!(ev[2].event, "");
        assert_eq!(ev[2].data, "[DONE]");
    }

    #[test]
    fn urls_give_host_and_port() {
        assert_eq!(
            host_port("http://127.0.0.1:8080").unwrap(),
            "127.0.0.1:8080"
        );
        assert_eq!(host_port("http://localhost:1/v1").unwrap(), "localhost:1");
        assert!(host_port("https://x:1").is_err());
        assert!(host_port("http://x").is_err());
    }
}
