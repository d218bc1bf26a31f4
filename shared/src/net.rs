//! Listening sockets of the HTTP and WebSocket front doors.

use axum::serve::{ListenerExt, TapIo};
use tokio::net::{TcpListener, TcpStream};

/// `listener` with `TCP_NODELAY` on every accepted connection. Replies and streamed events are
/// small writes, often several in a row (a chunk and then the response): with Nagle's
/// algorithm each one after the first would wait for the client's delayed ACK.
pub fn no_delay(listener: TcpListener) -> TapIo<TcpListener, fn(&mut TcpStream)> {
    listener.tap_io(set_no_delay as fn(&mut TcpStream))
}

fn set_no_delay(stream: &mut TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY on an accepted connection");
    }
}
