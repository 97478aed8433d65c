//! HTTP plumbing shared by the providers: the TLS crypto provider, client construction with
//! timeouts, one JSON POST with its failures mapped to [`ModelError`], error-body excerpts and
//! API-key redaction.

use std::error::Error as _;
use std::sync::{Once, OnceLock};
use std::time::{Duration, Instant};

use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue};

use crate::model::{ModelError, ModelErrorKind, parse_retry_after};

/// The default connect timeout of the providers.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default total request timeout of the providers (a long generation takes minutes).
pub(crate) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// How many characters of an unexpected body an error message quotes.
const EXCERPT_CHARS: usize = 200;

/// Installs rustls' ring crypto provider as the process default, once. Another provider
/// installed first (by the application) is kept.
pub(crate) fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err means some provider is already installed: fine, reqwest uses it.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Connect and total request timeouts, and the client built from them (lazily, on first use).
#[derive(Clone, Debug, Default)]
pub(crate) struct Transport {
    pub(crate) connect_timeout: Option<Duration>,
    pub(crate) request_timeout: Option<Duration>,
    client: OnceLock<reqwest::Client>,
}

impl Transport {
    /// A transport with the given timeouts; its client is built on first use.
    pub(crate) fn new(connect: Duration, request: Duration) -> Self {
        Transport {
            connect_timeout: Some(connect),
            request_timeout: Some(request),
            client: OnceLock::new(),
        }
    }

    fn client(&self) -> Result<reqwest::Client, ModelError> {
        if let Some(c) = self.client.get() {
            return Ok(c.clone());
        }
        install_crypto_provider();
        let mut b = reqwest::Client::builder()
            .user_agent(concat!("cairn-agents/", env!("CARGO_PKG_VERSION")));
        if let Some(t) = self.connect_timeout {
            b = b.connect_timeout(t);
        }
        if let Some(t) = self.request_timeout {
            b = b.timeout(t);
        }
        let c = b.build().map_err(|e| {
            ModelError::new(
                ModelErrorKind::BadRequest,
                format!("cannot build the HTTP client: {}", chain(&e)),
            )
        })?;
        // A concurrent first call may have won the race; either client will do.
        let _ = self.client.set(c);
        Ok(self.client.get().cloned().expect("client was just set"))
    }

    /// POSTs `body` as JSON to `url` with `headers`; returns the status, the server's
    /// requested wait and the body. Transport failures (connect, timeout, reset) are
    /// `Network`; an invalid URL is `BadRequest`.
    pub(crate) async fn post_json(
        &self,
        provider: &str,
        url: &str,
        mut headers: HeaderMap,
        body: &impl serde::Serialize,
    ) -> Result<RawResponse, ModelError> {
        let client = self.client()?;
        let bytes = serde_json::to_vec(body).map_err(|e| {
            ModelError::new(
                ModelErrorKind::BadRequest,
                format!("cannot serialize the request: {e}"),
            )
        })?;
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let started = Instant::now();
        let resp = client
            .post(url)
            .headers(headers)
            .body(bytes)
            .send()
            .await
            .map_err(|e| self.transport_error(&e))?;
        let status = resp.status().as_u16();
        let retry_after_ms = retry_after_ms(resp.headers());
        let body = resp
            .bytes()
            .await
            .map_err(|e| self.transport_error(&e))?
            .to_vec();
        tracing::debug!(
            provider,
            status,
            elapsed_ms = started.elapsed().as_millis() as u64,
            bytes = body.len(),
            "model call answered"
        );
        Ok(RawResponse {
            status,
            retry_after_ms,
            body,
        })
    }

    fn transport_error(&self, e: &reqwest::Error) -> ModelError {
        if e.is_builder() {
            return ModelError::new(
                ModelErrorKind::BadRequest,
                format!("invalid request: {}", chain(e)),
            );
        }
        let msg = if e.is_timeout() {
            format!(
                "timed out (connect timeout {:?}, request timeout {:?}): {}",
                self.connect_timeout.unwrap_or_default(),
                self.request_timeout.unwrap_or_default(),
                chain(e)
            )
        } else {
            chain(e)
        };
        ModelError::new(ModelErrorKind::Network, msg)
    }
}

/// A provider's HTTP answer, before it is parsed.
#[derive(Debug)]
pub(crate) struct RawResponse {
    pub(crate) status: u16,
    pub(crate) retry_after_ms: Option<u64>,
    pub(crate) body: Vec<u8>,
}

impl RawResponse {
    /// Whether the status is 2xx.
    pub(crate) fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// A `Malformed` error for a body that does not parse as `what`.
    pub(crate) fn malformed(&self, what: &str, err: impl std::fmt::Display) -> ModelError {
        ModelError {
            kind: ModelErrorKind::Malformed,
            status: Some(self.status),
            message: format!(
                "HTTP {} body is not {what} ({err}): {}",
                self.status,
                excerpt(&self.body)
            ),
            retry_after_ms: self.retry_after_ms,
        }
    }

    /// An error from a non-2xx answer with the provider's error type and message.
    pub(crate) fn error(&self, kind: ModelErrorKind, message: String) -> ModelError {
        ModelError {
            kind,
            status: Some(self.status),
            message,
            retry_after_ms: self.retry_after_ms,
        }
    }
}

/// The server's requested wait: `retry-after-ms` (OpenAI) or `retry-after` (seconds or date).
fn retry_after_ms(h: &HeaderMap) -> Option<u64> {
    if let Some(ms) = h
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
    {
        return Some(ms as u64);
    }
    let v = h.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(v).map(|d| d.as_millis().min(u64::MAX as u128) as u64)
}

/// The error and its sources, joined (reqwest's own message names only the outermost layer).
fn chain(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let t = x.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = x.source();
    }
    s
}

/// The start of a body, lossily decoded, cut at a character boundary and marked when cut.
pub(crate) fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(empty body)".to_string();
    }
    match text.char_indices().nth(EXCERPT_CHARS) {
        None => text.to_string(),
        Some((cut, _)) => format!("{}… ({} bytes)", &text[..cut], body.len()),
    }
}

/// `msg` with every occurrence of the API key replaced, in case a server echoes it.
pub(crate) fn redact(msg: String, key: Option<&str>) -> String {
    match key {
        Some(k) if k.len() >= 4 && msg.contains(k) => msg.replace(k, "[redacted]"),
        _ => msg,
    }
}

/// A header value holding a secret: marked sensitive so it is never printed.
pub(crate) fn secret_header(value: &str, what: &str) -> Result<HeaderValue, ModelError> {
    let mut v = HeaderValue::from_str(value).map_err(|_| {
        ModelError::new(
            ModelErrorKind::Auth,
            format!("the {what} contains characters not allowed in an HTTP header"),
        )
    })?;
    v.set_sensitive(true);
    Ok(v)
}

/// The value of environment variable `var` if set and not blank.
pub(crate) fn env_key(var: &str) -> Option<String> {
    std::env::var(var)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// `base` without trailing slashes, then `path`.
pub(crate) fn join_url(base: &str, path: &str) -> String {
    format!("{}{}", base.trim_end_matches('/'), path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_short_and_cut_at_char_boundaries() {
        assert_eq!(excerpt(b"  "), "(empty body)");
        assert_eq!(
            excerpt(b"<html>bad gateway</html>"),
            "<html>bad gateway</html>"
        );
        let long = "é".repeat(500);
        let e = excerpt(long.as_bytes());
        assert!(e.starts_with(&"é".repeat(EXCERPT_CHARS)));
        assert!(e.ends_with("(1000 bytes)"), "{e}");
    }

    #[test]
    fn keys_are_redacted_and_retry_after_ms_wins() {
        assert_eq!(
            redact("bad key sk-123456".into(), Some("sk-123456")),
            "bad key [redacted]"
        );
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after_ms(&h), Some(2000));
        h.insert("retry-after-ms", HeaderValue::from_static("150"));
        assert_eq!(retry_after_ms(&h), Some(150));
        assert_eq!(join_url("http://x/v1/", "/chat"), "http://x/v1/chat");
    }
}
