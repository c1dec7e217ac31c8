//! A small HTTP(S) client for agentq's own outbound calls that are not AWS APIs: OTLP
//! trace export and webhook notifications. It is built on the same hyper / hyper-rustls /
//! rustls (aws-lc-rs) stack the AWS SDK already compiles, with the same features, so it adds
//! no crate and no second TLS stack to the build. Roots come from the system store
//! (`rustls-native-certs`, as the SDK's own client does).
//!
//! Every request has a timeout; errors say whether a retry can help.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Largest response body read (receivers answer with a few bytes; the rest is dropped).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// A request that did not get an answer, or got an unusable one.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("{url}: {message}")]
    Connect { url: String, message: String },
    #[error("{url}: the request could not be built: {message}")]
    Request { url: String, message: String },
}

impl HttpError {
    /// Timeouts and connection failures may pass on a later try; a malformed request never.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Request { .. })
    }
}

/// An answer: status and (bounded) body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Response {
    /// Whether another try may get a different answer: 408, 429 and 5xx.
    pub fn is_retryable(&self) -> bool {
        self.status == StatusCode::REQUEST_TIMEOUT
            || self.status == StatusCode::TOO_MANY_REQUESTS
            || self.status.is_server_error()
    }
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// A pooled HTTP/1.1 client for `http://` and `https://` URLs. Cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<Connector, Full<Bytes>>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient").finish_non_exhaustive()
    }
}

impl HttpClient {
    /// Builds the client. Reads the system's root certificates once (a few files); when
    /// there are none, `https://` requests fail with a certificate error and `http://` works.
    pub fn new() -> Self {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let tls = match builder.with_provider_and_native_roots(provider) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "no system root certificates; https:// notifications and exports will fail");
                let config = rustls::ClientConfig::builder_with_provider(
                    rustls::crypto::aws_lc_rs::default_provider().into(),
                )
                .with_safe_default_protocol_versions()
                .expect("aws-lc-rs supports the default TLS versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
            }
        };
        let connector = tls.https_or_http().enable_http1().build();
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(4)
            .build(connector);
        Self { inner }
    }

    /// POSTs `body` to `url` with `headers`, waiting at most `timeout` for the whole
    /// exchange (connect, send, answer, body).
    pub async fn post(
        &self,
        url: &Uri,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<Response, HttpError> {
        let shown = redact_url(url);
        let mut req = Request::builder().method(Method::POST).uri(url.clone());
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let req = req.body(Full::new(body)).map_err(|e| HttpError::Request {
            url: shown.clone(),
            message: e.to_string(),
        })?;
        let exchange = async {
            let resp = self
                .inner
                .request(req)
                .await
                .map_err(|e| HttpError::Connect {
                    url: shown.clone(),
                    message: error_chain(&e),
                })?;
            let status = resp.status();
            // A body larger than the limit is cut, not an error: only the status matters.
            let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok(Response { status, body })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout {
                url: shown,
                timeout,
            }),
        }
    }
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

/// `scheme://host[:port]/path`, without user info or query (they may carry tokens).
pub fn redact_url(url: &Uri) -> String {
    let scheme = url.scheme_str().unwrap_or("http");
    let host = url.host().unwrap_or_default();
    let port = url.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
    format!("{scheme}://{host}{port}{}", url.path())
}

/// Parses an absolute `http://` or `https://` URL.
pub fn parse_url(s: &str) -> Result<Uri, String> {
    let uri: Uri = s
        .trim()
        .parse()
        .map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") if uri.host().is_some() => Ok(uri),
        _ => Err(format!("{s:?} is not an absolute http:// or https:// URL")),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_shown_without_secrets() {
        assert!(parse_url("ftp://x").is_err());
        assert!(parse_url("/v1/traces").is_err());
        assert!(parse_url("not a url").is_err());
        let u = parse_url("https://user:pw@example.com:8443/hook?token=abc").unwrap();
        assert_eq!(redact_url(&u), "https://example.com:8443/hook");
    }

    #[test]
    fn retryable_answers() {
        let r = |s: u16| Response {
            status: StatusCode::from_u16(s).unwrap(),
            body: Bytes::new(),
        };
        assert!(r(503).is_retryable() && r(429).is_retryable() && r(408).is_retryable());
        assert!(!r(400).is_retryable() && !r(401).is_retryable() && !r(200).is_retryable());
    }
}
