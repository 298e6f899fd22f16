//! Building and sending each kind of request of the soak, one connection at a time.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::{Outcome, SoakKind, SoakOptions, BAD_REQUEST_TIMEOUT, MAX_STREAM_LINES, SLOW_PIECES};
use crate::client::{read_head, read_line, read_response, Client};
use crate::Error;

/// Everything one client needs to build and send requests.
pub(super) struct Requests {
    pub(super) addr: SocketAddr,
    pub(super) opts: SoakOptions,
}

impl Requests {
    fn question(&self, i: usize) -> &str {
        &self.opts.questions[i % self.opts.questions.len()]
    }

    fn reason_body(&self, i: usize, stream: bool) -> Vec<u8> {
        let mut v = serde_json::json!({"question": self.question(i), "include_trace": false});
        if let Some(s) = self.opts.max_steps {
            v["max_steps"] = s.into();
        }
        if stream {
            v["stream"] = true.into();
        }
        v.to_string().into_bytes()
    }

    fn completion_body(&self, i: usize, stream: bool) -> Vec<u8> {
        let mut v = serde_json::json!({
            "prompt": format!("Q: {}\nA:", self.question(i)),
            "max_tokens": self.opts.max_tokens,
            "temperature": 0,
        });
        if stream {
            v["stream"] = true.into();
        }
        v.to_string().into_bytes()
    }

    /// A request head; `length: None` sends a chunked body.
    fn head(&self, path: &str, length: Option<usize>) -> Vec<u8> {
        let mut h = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nConnection: close\r\n",
            self.addr
        );
        if let Some(key) = &self.opts.api_key {
            h.push_str(&format!("Authorization: Bearer {key}\r\n"));
        }
        match length {
            Some(n) => h.push_str(&format!("Content-Length: {n}\r\n")),
            None => h.push_str("Transfer-Encoding: chunked\r\n"),
        }
        h.push_str("\r\n");
        h.into_bytes()
    }

    fn connect(&self, timeout: Duration) -> std::result::Result<TcpStream, Outcome> {
        let io = |e: std::io::Error| {
            Outcome::of_error(&Error::Io {
                addr: self.addr,
                op: "connect".into(),
                source: e,
            })
        };
        let s = TcpStream::connect_timeout(&self.addr, timeout).map_err(io)?;
        s.set_read_timeout(Some(timeout))
            .and_then(|_| s.set_write_timeout(Some(timeout)))
            .and_then(|_| s.set_nodelay(true))
            .map_err(io)?;
        Ok(s)
    }

    /// Sends `parts` on a new connection (`gap` between them), half-closes when asked, and
    /// reads one response. A failed write is not final: the server may have answered first.
    fn exchange(&self, parts: &[Vec<u8>], gap: Duration, half_close: bool) -> Outcome {
        let timeout = if gap.is_zero() {
            BAD_REQUEST_TIMEOUT
        } else {
            self.opts.request_timeout
        };
        let mut s = match self.connect(timeout) {
            Ok(s) => s,
            Err(o) => return o,
        };
        let mut write_failed = None;
        for (i, p) in parts.iter().enumerate() {
            if i > 0 && !gap.is_zero() {
                std::thread::sleep(gap);
            }
            if let Err(e) = s.write_all(p).and_then(|_| s.flush()) {
                write_failed = Some(e);
                break;
            }
        }
        if half_close {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        let mut r = BufReader::new(s);
        match read_response(&mut r, self.addr) {
            Ok(resp) => Outcome::Status(resp.status),
            Err(e) => match write_failed {
                Some(w) => Outcome::of_error(&Error::Io {
                    addr: self.addr,
                    op: "write".into(),
                    source: w,
                }),
                None => Outcome::of_error(&e),
            },
        }
    }

    /// A streaming request abandoned after its first event (or the full answer when it is
    /// not a stream).
    pub(super) fn stream_then_drop(&self, i: usize) -> Outcome {
        let (path, body) = if i.is_multiple_of(2) {
            ("/v1/completions", self.completion_body(i, true))
        } else {
            ("/v1/reason", self.reason_body(i, true))
        };
        let mut s = match self.connect(self.opts.request_timeout) {
            Ok(s) => s,
            Err(o) => return o,
        };
        let mut raw = self.head(path, Some(body.len()));
        raw.extend_from_slice(&body);
        if let Err(e) = s.write_all(&raw) {
            return Outcome::of_error(&Error::Io {
                addr: self.addr,
                op: "write".into(),
                source: e,
            });
        }
        let mut r = BufReader::new(s);
        let (status, headers) = match read_head(&mut r, self.addr) {
            Ok(h) => h,
            Err(e) => return Outcome::of_error(&e),
        };
        let is_stream = headers
            .iter()
            .any(|(k, v)| k == "content-type" && v.starts_with("text/event-stream"));
        if status == 200 && is_stream {
            for _ in 0..MAX_STREAM_LINES {
                match read_line(&mut r, self.addr) {
                    Ok(line) if line.starts_with("data:") => break,
                    Ok(_) => {}
                    Err(e) => return Outcome::of_error(&e),
                }
            }
        }
        // Dropping the reader closes the connection in the middle of the stream.
        Outcome::Status(status)
    }

    pub(super) fn oversized(&self, i: usize) -> Outcome {
        let limit = self.opts.body_limit;
        if i.is_multiple_of(2) {
            // Announced: the length alone is over the limit.
            let body = vec![b'x'; limit + 1 + i % 4096];
            self.exchange(
                &[self.head("/v1/reason", Some(body.len())), body],
                Duration::ZERO,
                false,
            )
        } else {
            // Chunked, no length: the server finds out while reading. One byte over the limit
            // is sent and no last chunk, so the server has read all of it when it answers.
            let mut raw = self.head("/v1/completions", None);
            let mut left = limit + 1;
            while left > 0 {
                let n = left.min(16 * 1024);
                raw.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                raw.extend(std::iter::repeat_n(b'{', n));
                raw.extend_from_slice(b"\r\n");
                left -= n;
            }
            self.exchange(&[raw], Duration::ZERO, false)
        }
    }

    pub(super) fn truncated(&self, i: usize) -> Outcome {
        let body = if i.is_multiple_of(2) {
            self.reason_body(i, false)
        } else {
            self.completion_body(i, false)
        };
        let path = if i.is_multiple_of(2) {
            "/v1/reason"
        } else {
            "/v1/completions"
        };
        let cut = &body[..body.len() / 2];
        let mut raw = self.head(path, Some(body.len() + 1 + i % 100));
        raw.extend_from_slice(cut);
        self.exchange(&[raw], Duration::ZERO, true)
    }

    pub(super) fn non_utf8(&self, i: usize) -> Outcome {
        let (path, mut body) = if i.is_multiple_of(2) {
            ("/v1/reason", b"{\"question\": \"who ".to_vec())
        } else {
            ("/v1/completions", b"{\"prompt\": \"Q: ".to_vec())
        };
        let junk: [&[u8]; 4] = [b"\xff\xfe", b"\xc3\x28", b"\xe2\x82", b"\xc0\xaf\x80"];
        body.extend_from_slice(junk[i % junk.len()]);
        body.extend_from_slice(b"\"}");
        let mut raw = self.head(path, Some(body.len()));
        raw.extend_from_slice(&body);
        self.exchange(&[raw], Duration::ZERO, false)
    }

    pub(super) fn wrong_type(&self, i: usize) -> Outcome {
        let q = self.question(i);
        let bodies = [
            ("/v1/reason", serde_json::json!({"question": 42})),
            (
                "/v1/reason",
                serde_json::json!({"question": q, "max_steps": "two"}),
            ),
            (
                "/v1/reason",
                serde_json::json!({"question": q, "stream": "yes"}),
            ),
            (
                "/v1/completions",
                serde_json::json!({"prompt": q, "max_tokens": "ten"}),
            ),
            (
                "/v1/completions",
                serde_json::json!({"prompt": {"text": q}}),
            ),
            (
                "/v1/completions",
                serde_json::json!({"prompt": q, "temperature": [0]}),
            ),
            ("/v1/reason", serde_json::json!([q])),
        ];
        let (path, body) = &bodies[i % bodies.len()];
        let body = body.to_string().into_bytes();
        let mut raw = self.head(path, Some(body.len()));
        raw.extend_from_slice(&body);
        self.exchange(&[raw], Duration::ZERO, false)
    }

    pub(super) fn slow_sender(&self, i: usize) -> Outcome {
        let (path, body) = if i.is_multiple_of(2) {
            ("/v1/reason", self.reason_body(i, false))
        } else {
            ("/v1/completions", self.completion_body(i, false))
        };
        let mut parts = vec![self.head(path, Some(body.len()))];
        let piece = body.len().div_ceil(SLOW_PIECES as usize).max(1);
        parts.extend(body.chunks(piece).map(<[u8]>::to_vec));
        let gap = self.opts.slow_body / SLOW_PIECES;
        self.exchange(&parts, gap.max(Duration::from_millis(1)), false)
    }

    pub(super) fn keep_alive(&self, client: &mut Client, kind: SoakKind, i: usize) -> Outcome {
        let (path, body) = match kind {
            SoakKind::Reason => ("/v1/reason", self.reason_body(i, false)),
            _ => ("/v1/completions", self.completion_body(i, false)),
        };
        match client.request("POST", path, Some(&body)) {
            Ok(r) => Outcome::Status(r.status),
            Err(e) => Outcome::of_error(&e),
        }
    }
}
