//! The load generator of `steper-run bench-serve` and the blocking HTTP/1.1 client the
//! server's tests use: N keep-alive clients for T seconds or a request budget, with latency
//! percentiles, status counts, drift and the server's peak RSS ([`load`]); a soak of valid and
//! hostile requests with the server's memory and descriptors sampled ([`soak`]); keep-alive
//! requests, raw (possibly malformed) requests and server-sent events ([`client`]).
//!
//! It lives outside `steper-runtime` so that an embedder of the runtime builds neither; plain
//! HTTP on loopback only, not a general client.
#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod client;
pub mod load;
pub mod soak;

use std::net::SocketAddr;

/// What the client and the load generator report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket operation on the server's connection failed (or the server closed it).
    #[error("http://{addr} ({op}): {source}")]
    Io {
        /// The server.
        addr: SocketAddr,
        /// `connect`, `write`, `read`, `read body`, `socket options`.
        op: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The server's answer is not HTTP/1.1 as this client reads it.
    #[error("http://{addr}: malformed response: {message}")]
    Malformed {
        /// The server.
        addr: SocketAddr,
        /// Which line or header is wrong.
        message: String,
    },
    /// A response body that should be JSON is not.
    #[error("response body (status {status}) is not JSON: {message}: {start}")]
    NotJson {
        /// The HTTP status.
        status: u16,
        /// serde's message.
        message: String,
        /// The first 200 bytes of the body.
        start: String,
    },
    /// An address does not resolve.
    #[error("address {addr}: {message}")]
    Address {
        /// The `host:port` given.
        addr: String,
        /// Why it does not resolve.
        message: String,
    },
    /// A URL is not of the form this client takes.
    #[error("url {url}: expected {expected}")]
    Url {
        /// The URL given.
        url: String,
        /// The form expected.
        expected: &'static str,
    },
    /// A load-level option has a value it cannot take.
    #[error("load option {option}: expected {expected}, got {got}")]
    InvalidOption {
        /// The field of [`load::LoadOptions`].
        option: &'static str,
        /// What it accepts.
        expected: &'static str,
        /// The value given.
        got: String,
    },
    /// A client thread of the load generator panicked.
    #[error("a load-test client thread panicked")]
    ClientPanicked,
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
