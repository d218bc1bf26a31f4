//! `Connection: close` on an HTTP/1 answer given before the request's body was read to its end.
//!
//! Many answers come before the body is read: a missing or bad token (401, 403), a wrong
//! `Content-Type` (400), an unknown route (404), a declared length over the limit (413, at once).
//! The connection cannot serve another request then, as the rest of the body is still on its
//! way, and hyper closes it after the answer; but when that body had not arrived yet, it closed
//! it without saying so, and a client that sent its next request on the connection, as
//! keep-alive allows, saw that request fail with the connection closed and no answer (a
//! request it cannot safely resend, if it was a submit). Saying `Connection: close` in the
//! answer tells the client to use a new connection. HTTP/2 is not concerned: a stream ends on
//! its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, Version, header};
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;

/// Whether the request has a body (a `Content-Length` above 0, or a `Transfer-Encoding`).
fn declares_body(req: &Request) -> bool {
    let headers = req.headers();
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return true;
    }
    headers
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.to_str().map_or(true, |v| v.trim() != "0"))
}

/// Middleware: marks the answer `Connection: close` when the request's body was not read to its
/// end by the time the answer was made.
pub async fn close_if_unread(req: Request, next: Next) -> Response {
    if req.version() > Version::HTTP_11 || !declares_body(&req) {
        return next.run(req).await;
    }
    let read = Arc::new(AtomicBool::new(false));
    let flag = read.clone();
    let req = req.map(|body| {
        // Polled once the body has given its last byte, never before.
        let end = futures::stream::poll_fn(move |_| {
            flag.store(true, Ordering::Release);
            Poll::Ready(None)
        });
        Body::from_stream(body.into_data_stream().chain(end))
    });
    let mut response = next.run(req).await;
    if !read.load(Ordering::Acquire) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> Request {
        let mut b = axum::http::Request::builder();
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::empty()).unwrap()
    }

    #[test]
    fn a_body_is_declared_by_a_length_above_zero_or_a_transfer_encoding() {
        assert!(!declares_body(&request(&[])));
        assert!(!declares_body(&request(&[("content-length", "0")])));
        assert!(declares_body(&request(&[("content-length", "12")])));
        assert!(declares_body(&request(&[("transfer-encoding", "chunked")])));
    }
}
