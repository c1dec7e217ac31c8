//! What keeps other web pages out of a dashboard that listens on localhost without a login.
//!
//! - Every request must name an allowed `Host` (the listen address, `localhost` and
//!   `127.0.0.1`/`[::1]` with its port, and `--allow-host` names): a DNS-rebinding page
//!   whose name resolves to 127.0.0.1 sends its own name and is refused, so it can read
//!   neither job pages nor the CSRF token.
//! - A state-changing request (cancel) must carry the per-process token (form field
//!   `token` or header `x-agentq-token`), generated from the OS's random source at start
//!   and only ever written into the dashboard's own pages; when the browser sends
//!   `Origin` it must be this dashboard's, and `Sec-Fetch-Site: cross-site` is refused.
//! - Every response carries a Content-Security-Policy without inline script or style, so
//!   markup slipping through the escaping could still not run script.

use std::net::SocketAddr;

use axum::http::{HeaderMap, HeaderValue, header};

/// The per-process anti-CSRF token.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

impl Token {
    /// 256 bits from the OS's random source.
    pub fn generate() -> Result<Self, String> {
        let mut buf = [0u8; 32];
        getrandom::fill(&mut buf).map_err(|e| format!("no random source for the token: {e}"))?;
        Ok(Self(hex(&buf)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Compares in constant time.
    pub fn matches(&self, given: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), given.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Host(String),
    Token,
    Origin(String),
    CrossSite,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Host(h) => write!(
                f,
                "this dashboard does not answer to Host {h:?}: open it by the address it prints, or start it with --allow-host NAME"
            ),
            Self::Token => f.write_str(
                "the request has no valid dashboard token: changes are only accepted from the dashboard's own pages (reload the page: the token changes when the dashboard restarts)",
            ),
            Self::Origin(o) => write!(
                f,
                "requests from origin {o:?} may not change jobs: use the dashboard's own page"
            ),
            Self::CrossSite => f.write_str(
                "cross-site requests may not change jobs: use the dashboard's own page",
            ),
        }
    }
}

/// The Host names this dashboard answers to.
#[derive(Debug, Clone)]
pub struct HostGuard {
    allowed: Vec<String>,
}

impl HostGuard {
    /// Loopback names with the port, the listen address itself, and `extra` names (a
    /// name without a port is allowed with any port).
    pub fn new(addr: SocketAddr, extra: &[String]) -> Self {
        let port = addr.port();
        let mut allowed = vec![
            format!("localhost:{port}"),
            format!("127.0.0.1:{port}"),
            format!("[::1]:{port}"),
            addr.to_string(),
        ];
        allowed.extend(extra.iter().map(|h| h.to_ascii_lowercase()));
        Self { allowed }
    }

    pub fn check(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let bare = match host.rsplit_once(':') {
            Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.is_empty() => h,
            _ => host.as_str(),
        };
        if self.allowed.iter().any(|a| *a == host || *a == bare) {
            Ok(())
        } else {
            Err(Refusal::Host(host))
        }
    }

    /// Checks a state-changing request: token, then `Origin` and `Sec-Fetch-Site`.
    pub fn check_change(
        &self,
        headers: &HeaderMap,
        token: &Token,
        form_token: Option<&str>,
    ) -> Result<(), Refusal> {
        self.check(headers)?;
        let header_token = headers.get("x-agentq-token").and_then(|v| v.to_str().ok());
        if !form_token
            .or(header_token)
            .is_some_and(|t| token.matches(t))
        {
            return Err(Refusal::Token);
        }
        if headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() == b"cross-site")
        {
            return Err(Refusal::CrossSite);
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let o = origin.to_str().unwrap_or("?").to_ascii_lowercase();
            let host = o.strip_prefix("http://").unwrap_or("");
            if host.is_empty() || !self.allowed.iter().any(|a| a == host) {
                return Err(Refusal::Origin(o));
            }
            // The Origin's host must also be the Host the request was sent to.
            let req_host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("")
                .to_ascii_lowercase();
            if req_host != host {
                return Err(Refusal::Origin(o));
            }
        }
        Ok(())
    }
}

/// Headers every response carries.
pub fn security_headers(h: &mut HeaderMap) {
    const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Not `no-referrer`: under it browsers send `Origin: null` even on same-origin POSTs,
    // and the cancel form's origin could not be checked.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn hosts() {
        let g = HostGuard::new("127.0.0.1:7780".parse().unwrap(), &["box.lan".into()]);
        for ok in [
            "127.0.0.1:7780",
            "localhost:7780",
            "LOCALHOST:7780",
            "box.lan:9999",
        ] {
            assert!(g.check(&headers(&[("host", ok)])).is_ok(), "{ok}");
        }
        for bad in ["evil.example:7780", "127.0.0.1:80", "", "localhost"] {
            assert!(g.check(&headers(&[("host", bad)])).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn changes_need_token_and_own_origin() {
        let g = HostGuard::new("127.0.0.1:7780".parse().unwrap(), &[]);
        let t = Token::generate().unwrap();
        assert_eq!(t.as_str().len(), 64);
        let host = ("host", "127.0.0.1:7780");
        assert_eq!(
            g.check_change(&headers(&[host]), &t, None),
            Err(Refusal::Token)
        );
        assert_eq!(
            g.check_change(&headers(&[host]), &t, Some("nope")),
            Err(Refusal::Token)
        );
        assert!(
            g.check_change(&headers(&[host]), &t, Some(t.as_str()))
                .is_ok()
        );
        assert!(
            g.check_change(&headers(&[host, ("x-agentq-token", t.as_str())]), &t, None)
                .is_ok()
        );
        assert!(
            g.check_change(
                &headers(&[host, ("origin", "http://127.0.0.1:7780")]),
                &t,
                Some(t.as_str())
            )
            .is_ok()
        );
        for origin in ["http://evil.example", "null", "http://localhost:7780"] {
            assert!(matches!(
                g.check_change(&headers(&[host, ("origin", origin)]), &t, Some(t.as_str())),
                Err(Refusal::Origin(_))
            ));
        }
        assert_eq!(
            g.check_change(
                &headers(&[host, ("sec-fetch-site", "cross-site")]),
                &t,
                Some(t.as_str())
            ),
            Err(Refusal::CrossSite)
        );
    }
}
