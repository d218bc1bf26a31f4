//! The WebSocket and SSE URLs of the gateway handed to clients by `POST /api/v1/chat/init`.
//!
//! With `FLEET_PUBLIC_WS_URL` (e.g. `wss://chat.example.com`) the URLs are built on it, and the
//! SSE URL on its http/https counterpart. Without it they are derived from the request: the
//! host of its `Host` header (in HTTP/2, of its `:authority`) without the port, `wss`/`https`
//! when `X-Forwarded-Proto: https` (else `ws`/`http`), and the gateway's default port
//! [`GATEWAY_PORT`].

use axum::http::header::HOST;
use axum::http::{HeaderMap, Uri};

/// ws-gateway's default port, used when the URL is derived from the request.
pub const GATEWAY_PORT: u16 = 8002;

/// Where clients reach the gateway: a WebSocket base and its HTTP counterpart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bases {
    /// `ws://host:port` or `wss://host[...]`, no trailing slash.
    pub ws: String,
    /// `http://host:port` or `https://host[...]`, no trailing slash.
    pub http: String,
}

impl Bases {
    /// `<ws>/ws/chat/<sid>?token=<token>`. Tokens and session ids are URL-safe as they are.
    pub fn websocket_url(&self, session_id: &str, token: &str) -> String {
        format!("{}/ws/chat/{session_id}?token={token}", self.ws)
    }

    /// `<http>/sse/chat/<sid>`.
    pub fn sse_url(&self, session_id: &str) -> String {
        format!("{}/sse/chat/{session_id}", self.http)
    }
}

/// The configured base, or how to derive one per request.
#[derive(Clone, Debug, Default)]
pub struct PublicUrls {
    fixed: Option<Bases>,
}

impl PublicUrls {
    /// Checks `FLEET_PUBLIC_WS_URL` when given: it must be a `ws://` or `wss://` URL with a host.
    pub fn new(configured: Option<&str>) -> anyhow::Result<PublicUrls> {
        let Some(url) = configured.map(str::trim).filter(|u| !u.is_empty()) else {
            return Ok(PublicUrls::default());
        };
        let url = url.trim_end_matches('/');
        let (http_scheme, rest) = if let Some(rest) = url.strip_prefix("wss://") {
            ("https", rest)
        } else if let Some(rest) = url.strip_prefix("ws://") {
            ("http", rest)
        } else {
            anyhow::bail!("FLEET_PUBLIC_WS_URL `{url}` must start with ws:// or wss://");
        };
        anyhow::ensure!(
            !rest.is_empty() && !rest.starts_with('/') && !rest.contains(['?', '#', ' ']),
            "FLEET_PUBLIC_WS_URL `{url}` must be a base URL like wss://chat.example.com"
        );
        Ok(PublicUrls {
            fixed: Some(Bases {
                ws: url.to_owned(),
                http: format!("{http_scheme}://{rest}"),
            }),
        })
    }

    /// The bases for a request with these headers and URI (whose authority stands for the
    /// `Host` header in HTTP/2, which has none).
    pub fn bases(&self, headers: &HeaderMap, uri: &Uri) -> Bases {
        if let Some(fixed) = &self.fixed {
            return fixed.clone();
        }
        let secure = headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"));
        let host = headers
            .get(HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| uri.authority().map(|a| a.as_str()))
            .and_then(host_without_port)
            .unwrap_or("localhost");
        let (ws, http) = if secure {
            ("wss", "https")
        } else {
            ("ws", "http")
        };
        Bases {
            ws: format!("{ws}://{host}:{GATEWAY_PORT}"),
            http: format!("{http}://{host}:{GATEWAY_PORT}"),
        }
    }
}

/// The host of a `Host` header value without its port, if it is a plausible host name or
/// address (anything else is not echoed back to clients).
fn host_without_port(value: &str) -> Option<&str> {
    let value = value.trim();
    let host = if value.starts_with('[') {
        // [v6]:port
        &value[..=value.find(']')?]
    } else {
        value.split(':').next()?
    };
    let plausible = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':'));
    plausible.then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(host: &str, proto: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_str(host).unwrap());
        if let Some(p) = proto {
            h.insert("x-forwarded-proto", HeaderValue::from_str(p).unwrap());
        }
        h
    }

    #[test]
    fn derived_urls_use_the_host_without_its_port() {
        let urls = PublicUrls::new(None).unwrap();
        let b = urls.bases(&headers("api.example.com:8001", None), &Uri::default());
        assert_eq!(b.ws, "ws://api.example.com:8002");
        assert_eq!(b.http, "http://api.example.com:8002");
        let b = urls.bases(&headers("api.example.com", Some("https")), &Uri::default());
        assert_eq!(b.ws, "wss://api.example.com:8002");
        assert_eq!(b.http, "https://api.example.com:8002");
        let b = urls.bases(&headers("[::1]:8001", Some("http")), &Uri::default());
        assert_eq!(b.ws, "ws://[::1]:8002");
        let b = urls.bases(&headers("<script>", None), &Uri::default());
        assert_eq!(b.ws, "ws://localhost:8002");
        assert_eq!(
            b.websocket_url("s1", "tok"),
            "ws://localhost:8002/ws/chat/s1?token=tok"
        );
        assert_eq!(b.sse_url("s1"), "http://localhost:8002/sse/chat/s1");
    }

    #[test]
    fn a_configured_base_wins_and_maps_to_http() {
        let urls = PublicUrls::new(Some("wss://chat.example.com/")).unwrap();
        let b = urls.bases(&headers("elsewhere:1", None), &Uri::default());
        assert_eq!(b.ws, "wss://chat.example.com");
        assert_eq!(b.http, "https://chat.example.com");
        let b = PublicUrls::new(Some("ws://gw:9000"))
            .unwrap()
            .bases(&HeaderMap::new(), &Uri::default());
        assert_eq!(b.http, "http://gw:9000");
        assert!(PublicUrls::new(Some("https://chat.example.com")).is_err());
        assert!(PublicUrls::new(Some("wss://")).is_err());
        assert!(PublicUrls::new(Some("")).unwrap().fixed.is_none());
    }
}
