//! Optional bearer-token authentication of the `/v1/*` routes.
//!
//! With [`ServeConfig::api_key`](super::ServeConfig::api_key) set, every request whose path
//! starts with `/v1/` must carry `Authorization: Bearer <key>`; otherwise it is answered 401
//! with `WWW-Authenticate: Bearer` and OpenAI's error body, before its body is read. `/healthz`
//! and `/metrics` stay open (load balancers and Prometheus probe them without credentials; they
//! show no request content). The key is compared in constant time.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use super::api::ApiError;
use super::http::{error_response, AppState};
use super::metrics::{Endpoint, ErrorKind};
use crate::error::{Error, Result};

/// The secret of `Authorization: Bearer <key>`. Its `Debug` output never shows it, and it is
/// compared in constant time.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// A key: non-empty, visible ASCII only (a token that fits an `Authorization` header
    /// unchanged).
    pub fn new(key: impl Into<String>) -> Result<Self> {
        let key = key.into();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::InvalidOption {
                option: "api_key".into(),
                expected: "a non-empty key of visible ASCII characters (no spaces)".into(),
                got: format!("{} bytes (not shown)", key.len()),
            });
        }
        Ok(ApiKey(key))
    }

    /// Whether `given` is the key. The time taken depends on `given`'s length only, not on
    /// where it first differs from the key.
    pub fn matches(&self, given: &[u8]) -> bool {
        constant_time_eq(self.0.as_bytes(), given)
    }
}

impl PartialEq for ApiKey {
    fn eq(&self, other: &Self) -> bool {
        self.matches(other.0.as_bytes())
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Compares every byte of `given` (against the key repeated), so neither the position of the
/// first difference nor the key's content shows in the time taken.
fn constant_time_eq(key: &[u8], given: &[u8]) -> bool {
    if key.is_empty() {
        return false;
    }
    let mut diff = u8::from(key.len() != given.len());
    for (i, &b) in given.iter().enumerate() {
        diff |= b ^ key[i % key.len()];
    }
    std::hint::black_box(diff) == 0
}

/// The token of `Authorization: Bearer <token>` (the scheme is case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let start = rest.iter().position(|&b| b != b' ')?;
    Some(&rest[start..])
}

/// The endpoint a `/v1/*` path is counted under.
fn endpoint_of(path: &str) -> Endpoint {
    match path {
        "/v1/reason" => Endpoint::Reason,
        "/v1/completions" => Endpoint::Completions,
        "/v1/chat/completions" => Endpoint::ChatCompletions,
        "/v1/models" => Endpoint::Models,
        _ => Endpoint::Other,
    }
}

/// The middleware: passes every request through when no key is set or the path is not under
/// `/v1/`; otherwise answers 401 unless the request carries the key.
pub(crate) async fn require_key(
    State(st): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(key) = st.config.api_key.as_ref() else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if !(path.starts_with("/v1/") || path == "/v1") {
        return next.run(req).await;
    }
    let t0 = Instant::now();
    let given = bearer(req.headers());
    if given.is_some_and(|g| key.matches(g)) {
        return next.run(req).await;
    }
    let (message, challenge) = match given {
        None => (
            "this server requires an API key: send `Authorization: Bearer <key>`",
            "Bearer",
        ),
        Some(_) => ("the API key is not valid", "Bearer error=\"invalid_token\""),
    };
    let endpoint = endpoint_of(path);
    let mut resp = error_response(&st, &ApiError::new(ErrorKind::Unauthorized, message));
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    st.metrics
        .record_request(endpoint, 401, t0.elapsed().as_secs_f64());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_only_themselves() {
        let k = ApiKey::new("s3cret-key").unwrap();
        assert!(k.matches(b"s3cret-key"));
        for wrong in [
            &b""[..],
            b"s3cret-ke",
            b"s3cret-key ",
            b"s3cret-kez",
            b"S3cret-key",
            b"s3cret-keys3cret-key",
        ] {
            assert!(!k.matches(wrong), "{:?}", String::from_utf8_lossy(wrong));
        }
        assert_eq!(format!("{k:?}"), "ApiKey(<redacted>)");
        assert_eq!(k, ApiKey::new("s3cret-key").unwrap());
        assert_ne!(k, ApiKey::new("other").unwrap());
    }

    #[test]
    fn empty_or_spaced_keys_are_refused_without_showing_them() {
        for bad in ["", "two words", "tab\tkey", "é"] {
            let e = ApiKey::new(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidOption { .. }), "{e}");
            if !bad.is_empty() {
                assert!(!e.to_string().contains(bad), "{e}");
            }
        }
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        for (value, token) in [
            ("Bearer abc", Some(&b"abc"[..])),
            ("bearer  abc", Some(b"abc")),
            ("BEARER abc", Some(b"abc")),
            ("Basic abc", None),
            ("Bearer", None),
            ("Bearer ", None),
        ] {
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
            assert_eq!(bearer(&h), token, "{value}");
        }
    }
}
