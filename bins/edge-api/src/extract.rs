//! Extractors that answer bad input with [`ApiError`] JSON instead of axum's plain-text
//! rejections: [`ApiJson`] for bodies (400 `invalid_json`, 413 `payload_too_large`, at once when
//! `Content-Length` is over the limit, 408 `request_timeout` when the body stalls) and
//! [`ApiPath`] for path parameters.

use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::routes::AppState;

/// A JSON request body of type `T`, at most `FLEET_MAX_BODY_BYTES` (a larger one is answered
/// with the limit), read whole within `FLEET_HTTP_READ_TIMEOUT_SECS`.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T> FromRequest<AppState> for ApiJson<T>
where
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        // The client needs the limit to know how far to shrink its request.
        let too_large = || {
            ApiError::PayloadTooLarge(format!(
                "the request body is larger than the limit of {} bytes",
                state.max_body_bytes
            ))
        };
        // A declared length over the limit is refused before any of the body is read: reading
        // first, the answer waited for the client to send a limit's worth (forever for one
        // that waits for it, or for `100 Continue`, before it sends).
        if declared_length(&req).is_some_and(|n| n > state.max_body_bytes as u64) {
            return Err(too_large());
        }
        // The server bounds how long a request's head may take, not its body: without this, a
        // client that sends part of a body and stops (or a few bytes now and then) would hold
        // its connection and this handler for good. The whole body, not each of its reads, is
        // bounded, so a trickle cannot stretch it. The timer lives in this future: no allocation.
        let read = axum::Json::<T>::from_request(req, state);
        match tokio::time::timeout(state.body_timeout, read).await {
            Ok(Ok(axum::Json(value))) => Ok(ApiJson(value)),
            Ok(Err(r)) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(too_large()),
            Ok(Err(r)) => Err(r.into()),
            Err(_) => Err(ApiError::RequestTimeout(format!(
                "the request body did not arrive within {} s",
                state.body_timeout.as_secs()
            ))),
        }
    }
}

/// The body length the request's `Content-Length` header declares, if it holds a number.
fn declared_length(req: &Request) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Path parameters of type `T`.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(value) = Path::<T>::from_request_parts(parts, state).await?;
        Ok(ApiPath(value))
    }
}
