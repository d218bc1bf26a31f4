//! Who may call what, as extractors that run before a handler touches Redis.
//!
//! * [`SessionAuth`]: every `/api/v1/chat/{session_id}/...` and `/api/v1/chat/session/{session_id}/...`
//!   route takes `Authorization: Bearer <session_token>`, checked against the path's session id
//!   with [`fleet::session::Chat::authorize`]: missing, malformed, forged or expired -> 401, a
//!   valid token of another session -> 403.
//! * [`AdminKey`]: the agent routes take `X-API-Key: <key>` (or `Authorization: Bearer <key>`)
//!   when `FLEET_API_KEYS` is set. Keys are compared as SHA-256 digests in constant time.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::routes::AppState;

/// The header carrying an API key.
pub const API_KEY_HEADER: &str = "x-api-key";

/// The token of an `Authorization: Bearer <token>` header, if there is one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A request whose bearer token is valid for the session in its path.
#[derive(Clone, Debug)]
pub struct SessionAuth {
    pub session_id: String,
}

impl FromRequestParts<AppState> for SessionAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let ApiPath(mut params) =
            ApiPath::<HashMap<String, String>>::from_request_parts(parts, state).await?;
        let session_id = params.remove("session_id").ok_or_else(|| {
            ApiError::Unavailable("SessionAuth used on a route without {session_id}".into())
        })?;
        let token = bearer(&parts.headers).ok_or_else(|| {
            ApiError::Unauthorized(
                "this route needs `Authorization: Bearer <session_token>`".into(),
            )
        })?;
        state.chat.authorize(&session_id, token)?;
        Ok(SessionAuth { session_id })
    }
}

/// The configured API keys, kept as SHA-256 digests.
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Arc<[[u8; 32]]>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Equality of two digests whose time does not depend on where they differ.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ApiKeys {
    /// Keys from the comma-separated config; blank entries are ignored.
    pub fn new(keys: &[String]) -> Self {
        let digests: Vec<[u8; 32]> = keys
            .iter()
            .map(|k| k.trim())
            .filter(|k| !k.is_empty())
            .map(digest)
            .collect();
        Self {
            digests: digests.into(),
        }
    }

    /// No keys: the guarded routes are open.
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `presented` is one of the keys. Checks every key, whichever matches.
    pub fn accepts(&self, presented: &str) -> bool {
        let d = digest(presented);
        self.digests
            .iter()
            .fold(false, |found, k| found | same_digest(k, &d))
    }
}

/// A request allowed to manage agents: it carries a configured API key, or none are configured.
#[derive(Clone, Copy, Debug)]
pub struct AdminKey;

impl FromRequestParts<AppState> for AdminKey {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if state.api_keys.is_empty() {
            return Ok(AdminKey);
        }
        let presented = parts
            .headers
            .get(API_KEY_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .or_else(|| bearer(&parts.headers))
            .ok_or_else(|| {
                ApiError::Unauthorized(
                    "this route needs an API key in `X-API-Key: <key>` or `Authorization: Bearer <key>`"
                        .into(),
                )
            })?;
        if state.api_keys.accepts(presented) {
            Ok(AdminKey)
        } else {
            Err(ApiError::Unauthorized("the API key is not valid".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn api_keys_accept_only_configured_keys() {
        let keys = ApiKeys::new(&["k1".into(), " k2 ".into(), "".into()]);
        assert!(!keys.is_empty());
        assert!(keys.accepts("k1"));
        assert!(keys.accepts("k2"));
        assert!(!keys.accepts("k3"));
        assert!(!keys.accepts(""));
        assert!(ApiKeys::new(&["".into()]).is_empty());
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer abc"),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h), None);
    }
}
