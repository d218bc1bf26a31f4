//! Listening sockets, and the HTTP server every one of them runs: edge-api's REST port,
//! ws-gateway's WebSocket and SSE port, and the admin port of every binary.
//!
//! [`serve`] serves an axum [`Router`] as `axum::serve` does (HTTP/1 with upgrades and HTTP/2 on
//! one port, graceful shutdown), plus a bound on how long a client may take to send a request:
//! the read timeout (`FLEET_HTTP_READ_TIMEOUT_SECS`, [`DEFAULT_READ_TIMEOUT_SECS`]).
//! `axum::serve` gives hyper no timer, so hyper waited for a request's headers forever: a client
//! that connected and sent nothing, or half its headers (slowloris, or just a broken client),
//! held its connection, a file descriptor and its buffers for good. Within the read timeout,
//!
//! - a new connection sends the bytes that tell HTTP/1 from HTTP/2's preface (at most 24;
//!   hyper-util's protocol detection reads them with no bound of its own, so [`serve`] reads
//!   them itself, under the timeout, and hands them back in front of the connection);
//! - an HTTP/1 request sends its whole head (hyper's `header_read_timeout`, which starts when
//!   hyper waits for a head: a keep-alive connection idle that long between two requests is
//!   closed too);
//! - an HTTP/2 peer answers a ping, sent when it has sent nothing for that long (a vanished
//!   peer's connection is closed);
//!
//! or the connection is closed, and `fleet_http_read_timeouts_total` counts it. A request's
//! body is its route's to bound (edge-api answers a REST body that stalls with 408): nothing
//! here limits how long a request or a response lasts, so a WebSocket (an HTTP/1 connection
//! handed over once upgraded) or an SSE stream (a response that goes on) is never cut.
//!
//! Every accepted connection gets `TCP_NODELAY`: replies and streamed events are small writes,
//! often several in a row (a chunk and then the response), and with Nagle's algorithm each one
//! after the first would wait for the client's delayed ACK.

use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Default of `FLEET_HTTP_READ_TIMEOUT_SECS`: how long a client may take to send a request's
/// first bytes and head (and, on edge-api's REST routes, its body). It is also how long an
/// HTTP/1 keep-alive connection may stay idle, so it is above the 60 s for which proxies and
/// load balancers commonly keep idle connections to a backend (ingress-nginx's upstream
/// keep-alive, cloud load balancers' idle timeout): a backend that closes first races the
/// proxy's next request on that connection, which the proxy then answers 502.
pub const DEFAULT_READ_TIMEOUT_SECS: u64 = 75;

/// What an HTTP/2 client sends first; anything else is HTTP/1.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Binds `addr`, the value of `setting` (e.g. `FLEET_ADMIN_ADDR`); port 0 picks a free port.
/// The error names the setting and the address, so a port already taken says which one.
pub async fn bind(addr: SocketAddr, setting: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {setting} {addr}"))
}

/// Serves `router` on `listener` until `shutdown` is cancelled, giving each client
/// `read_timeout` to send what the server waits for (see the module's documentation). Then it
/// stops accepting, closes idle connections, lets requests in flight finish (an HTTP/2
/// connection gets a GOAWAY) and returns once every connection is closed; the caller bounds
/// that wait with its grace period. Upgraded connections (WebSockets) are their handlers'.
///
/// Errors accepting a connection are logged and retried, as `axum::serve` does (after a
/// second when the process is out of file descriptors), so this only returns on `shutdown`.
pub async fn serve(
    mut listener: TcpListener,
    router: Router,
    read_timeout: Duration,
    shutdown: CancellationToken,
) {
    let builder = Arc::new(connection_builder(read_timeout));
    // Listed at 0 from the start, so that a rate over it has a series before the first close.
    metrics::counter!(READ_TIMEOUTS).increment(0);
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
            () = shutdown.cancelled() => break,
        };
        connections.spawn(serve_connection(
            stream,
            peer,
            TowerToHyperService::new(router.clone()),
            builder.clone(),
            read_timeout,
            shutdown.clone(),
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// The connection settings of every port: those of `axum::serve` (HTTP/1 and HTTP/2, the
/// extended CONNECT of WebSockets over HTTP/2) plus the timer and timeouts it leaves out.
fn connection_builder(read_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .keep_alive_interval(read_timeout)
        .keep_alive_timeout(read_timeout);
    builder
}

/// Connections of `listener` that sent their first bytes within `read_timeout` (with
/// `TCP_NODELAY`, those bytes put back in front), for a server that takes a stream of
/// connections rather than a [`Router`]: edge-api's gRPC port (tonic). A connection that sends
/// nothing in time is closed and counted, as [`serve`] does; the rest of a request is the
/// server's to bound (for tonic, HTTP/2 keep-alive pings). Accepts until `shutdown` is cancelled
/// or the stream is dropped.
pub fn first_bytes_within(
    mut listener: TcpListener,
    read_timeout: Duration,
    shutdown: CancellationToken,
) -> impl futures::Stream<Item = io::Result<Replay<TcpStream>>> + Send + 'static {
    // A few connections may wait for the server to take them; more wait in the accept queue.
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                accepted = axum::serve::Listener::accept(&mut listener) => accepted,
                () = shutdown.cancelled() => return,
                () = tx.closed() => return,
            };
            let (tx, shutdown) = (tx.clone(), shutdown.clone());
            tokio::spawn(async move {
                if let Some(io) = first_bytes(stream, peer, read_timeout, &shutdown).await {
                    // The server stopped taking connections: this one closes.
                    let _ = tx.send(Ok(io)).await;
                }
            });
        }
    });
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// `stream` with `TCP_NODELAY` and its first bytes read within `read_timeout`
/// ([`read_protocol`]) and put back in front; `None` when it closed, failed or timed out (then
/// counted) first, or `shutdown` came before them.
async fn first_bytes(
    mut stream: TcpStream,
    peer: SocketAddr,
    read_timeout: Duration,
    shutdown: &CancellationToken,
) -> Option<Replay<TcpStream>> {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY on an accepted connection");
    }
    let mut first = [0u8; H2_PREFACE.len()];
    let read = tokio::select! {
        read = tokio::time::timeout(read_timeout, read_protocol(&mut stream, &mut first)) => read,
        // Nothing was asked of this connection yet: nothing to finish.
        () = shutdown.cancelled() => return None,
    };
    match read {
        Ok(Ok(Some(len))) => Some(Replay::new(stream, first, len)),
        Ok(Ok(None)) => None,
        Ok(Err(e)) => {
            tracing::trace!(%peer, error = %e, "connection failed before its first request");
            None
        }
        Err(_) => {
            read_timed_out();
            tracing::debug!(%peer, "connection closed: no request within the read timeout");
            None
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    service: TowerToHyperService<Router>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    read_timeout: Duration,
    shutdown: CancellationToken,
) {
    let Some(io) = first_bytes(stream, peer, read_timeout, &shutdown).await else {
        return;
    };
    let io = TokioIo::new(io);
    let mut conn = pin!(builder.serve_connection_with_upgrades(io, service));
    let mut draining = false;
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    if e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout) {
                        read_timed_out();
                        tracing::debug!(%peer, "connection closed: no whole request head in time");
                    } else {
                        tracing::trace!(%peer, error = %e, "connection ended on an error");
                    }
                }
                return;
            }
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Connections closed because their client sent no request (or no whole head) in time.
const READ_TIMEOUTS: &str = "fleet_http_read_timeouts_total";

fn read_timed_out() {
    metrics::counter!(READ_TIMEOUTS).increment(1);
}

/// Reads the first bytes of a connection into `first`, until they tell its protocol: the whole
/// HTTP/2 preface, or a byte that departs from it (HTTP/1), as hyper-util's detection does.
/// Returns how many it read, or `None` when the client closed before they told anything.
async fn read_protocol<R: AsyncRead + Unpin>(
    io: &mut R,
    first: &mut [u8; H2_PREFACE.len()],
) -> io::Result<Option<usize>> {
    let mut len = 0;
    while len < first.len() {
        let n = io.read(&mut first[len..]).await?;
        if n == 0 {
            return Ok(None);
        }
        len += n;
        if first[..len] != H2_PREFACE[..len] {
            break;
        }
    }
    Ok(Some(len))
}

/// A connection with the bytes [`read_protocol`] took from it put back in front.
pub struct Replay<T> {
    first: [u8; H2_PREFACE.len()],
    /// `first[at..len]` is still to be read.
    at: u8,
    len: u8,
    io: T,
}

impl<T> Replay<T> {
    fn new(io: T, first: [u8; H2_PREFACE.len()], len: usize) -> Self {
        debug_assert!(len <= first.len());
        Replay {
            first,
            at: 0,
            len: len as u8,
            io,
        }
    }
}

/// What tonic's server knows of a connection: its addresses, as for a plain `TcpStream`.
impl tonic::transport::server::Connected for Replay<TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Replay<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.len && buf.remaining() > 0 {
            let rest = &this.first[usize::from(this.at)..usize::from(this.len)];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.at += n as u8;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Replay<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        // hyper writes a response's head and body in one system call when this says so.
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use axum::routing::get;
    use tokio::io::AsyncWriteExt;

    use super::*;

    async fn protocol_of(chunks: &[&[u8]]) -> (Option<usize>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(64);
        for chunk in chunks {
            client.write_all(chunk).await.unwrap();
        }
        drop(client);
        let mut first = [0u8; 24];
        let len = read_protocol(&mut server, &mut first).await.unwrap();
        // What the connection reads next, after the replayed bytes.
        let mut replay = Replay::new(server, first, len.unwrap_or(0));
        let mut all = Vec::new();
        replay.read_to_end(&mut all).await.unwrap();
        (len, all)
    }

    #[tokio::test]
    async fn the_first_bytes_tell_the_protocol_and_are_read_again_after() {
        // HTTP/1: the first byte that departs from the preface decides, wherever it is.
        let get = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n";
        assert_eq!(protocol_of(&[get]).await, (Some(24), get.to_vec()));
        let pr = b"PRIVATE /x HTTP/1.1\r\n\r\n";
        assert_eq!(
            protocol_of(&[&pr[..2], &pr[2..]]).await,
            (Some(pr.len()), pr.to_vec())
        );
        assert_eq!(protocol_of(&[b"G"]).await.0, Some(1));
        // HTTP/2: the whole preface, however it is split, and not a byte more.
        let h2 = [&H2_PREFACE[..], b"\0\0\0\x04\0\0\0\0\0"].concat();
        let (len, all) = protocol_of(&[&h2[..3], &h2[3..20], &h2[20..]]).await;
        assert_eq!((len, all), (Some(24), h2.clone()));
        // Closed before telling anything.
        assert_eq!(protocol_of(&[]).await.0, None);
        assert_eq!(protocol_of(&[&H2_PREFACE[..10]]).await.0, None);
    }

    /// A server of one route on a free port, with `read_timeout`; its address.
    async fn server(read_timeout: Duration, shutdown: CancellationToken) -> SocketAddr {
        let listener = bind("127.0.0.1:0".parse().unwrap(), "test").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/hello", get(|| async { "hello" }));
        tokio::spawn(serve(listener, router, read_timeout, shutdown));
        addr
    }

    /// Waits for the server to close `tcp` (within 10 s), reading and keeping what it sent.
    async fn closed_by_server(tcp: &mut TcpStream) -> String {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut got))
            .await
            .expect("the server closes the connection")
            .ok();
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn clients_that_send_nothing_or_part_of_a_head_or_preface_are_closed() {
        let shutdown = CancellationToken::new();
        let timeout = Duration::from_millis(500);
        let addr = server(timeout, shutdown.clone()).await;
        for sent in [
            &b""[..],
            &H2_PREFACE[..10],
            b"GET /hello HTTP/1.1\r\nhost: x\r\n",
        ] {
            let started = Instant::now();
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(sent).await.unwrap();
            let answer = closed_by_server(&mut tcp).await;
            let took = started.elapsed();
            assert!(took >= timeout, "{sent:?}: closed after {took:?}");
            assert_eq!(answer, "", "{sent:?}: closed without an answer");
        }
        // An HTTP/2 peer that sends its preface and settings, then answers nothing (not even
        // the server's ping), is closed.
        let started = Instant::now();
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&[&H2_PREFACE[..], b"\0\0\0\x04\0\0\0\0\0"].concat())
            .await
            .unwrap();
        closed_by_server(&mut tcp).await;
        assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
        // A whole request is served, and a keep-alive connection left idle is closed.
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = closed_by_server(&mut tcp).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("hello"), "{answer}");
        shutdown.cancel();
    }
}
