//! Listening sockets: binding them, and those of the HTTP and WebSocket front doors.

use std::net::SocketAddr;

use anyhow::Context as _;
use axum::serve::{ListenerExt, TapIo};
use tokio::net::{TcpListener, TcpStream};

/// Binds `addr`, the value of `setting` (e.g. `FLEET_ADMIN_ADDR`); port 0 picks a free port.
/// The error names the setting and the address, so a port already taken says which one.
pub async fn bind(addr: SocketAddr, setting: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {setting} {addr}"))
}

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
