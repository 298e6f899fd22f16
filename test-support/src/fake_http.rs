//! A loopback HTTP/1.1 server for tests of HTTP clients: each request is answered by a script
//! given the request's number and what the server saw; one thread per connection,
//! `Connection: close` after each answer.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use serde_json::Value;

/// A request as the fake server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The request target (path and query).
    pub path: String,
    /// Headers, names lower-cased.
    pub headers: HashMap<String, String>,
    /// The JSON body.
    pub body: Value,
    /// When it was read.
    pub at: Instant,
}

/// What the fake server answers.
pub enum Reply {
    /// Status, extra headers and a JSON body.
    Json(u16, Vec<(&'static str, String)>, String),
    /// Wait, then answer (longer than the client's timeout: the client gives up first).
    Slow(Duration, String),
}

/// The script: request number (from 0) and request → reply.
pub type Script = dyn Fn(usize, &Seen) -> Reply + Send + Sync;

/// A loopback HTTP/1.1 server answering each request with `script(request number, request)`.
pub struct FakeServer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeServer {
    /// Binds a loopback port and serves every connection with `script`.
    pub fn start(script: impl Fn(usize, &Seen) -> Reply + Send + Sync + 'static) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let url = format!("http://{}", listener.local_addr()?);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let s2 = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let (seen, script) = (s2.clone(), script.clone());
                std::thread::spawn(move || {
                    let _ = serve_one(stream, &seen, &*script);
                });
            }
        });
        Ok(FakeServer { url, seen })
    }

    /// The requests seen so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve_one(stream: TcpStream, seen: &Mutex<Vec<Seen>>, script: &Script) -> Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("bad request line {line:?}"))?
        .to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .ok_or_else(|| anyhow!("no content-length"))?
        .parse()?;
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    let req = Seen {
        path,
        headers,
        body: serde_json::from_slice(&body)?,
        at: Instant::now(),
    };
    let n = {
        let mut s = seen.lock().unwrap();
        s.push(req.clone());
        s.len() - 1
    };
    let (status, extra, text) = match script(n, &req) {
        Reply::Json(status, extra, text) => (status, extra, text),
        Reply::Slow(d, text) => {
            std::thread::sleep(d);
            (200, Vec::new(), text)
        }
    };
    let mut out = stream;
    let mut head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        text.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}
