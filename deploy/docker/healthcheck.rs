//! fleet-healthcheck: the Docker HEALTHCHECK of Fleet's images.
//!
//! The runtime images have no shell and no curl, so the healthcheck is this small program,
//! built from this one file with `rustc` in the Dockerfile's builder stage (std only, not a
//! workspace member):
//!
//!     fleet-healthcheck <ADDR_VAR> <DEFAULT_PORT> <PATH>
//!
//! It reads the address the binary listens on from the environment variable `ADDR_VAR`, exactly
//! as the binary does (e.g. `FLEET_ADMIN_ADDR`), or uses `127.0.0.1:<DEFAULT_PORT>` when it is
//! unset; an unspecified host (`0.0.0.0`, `[::]`) becomes loopback. It sends `GET <PATH>` and
//! exits 0 on a 2xx answer, 1 otherwise (no answer within 3 s, refused, 503, ...), printing why.
//!
//! tests/e2e/tests/deploy_manifests.rs compiles and runs it against a local listener.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(3);

fn main() {
    match check() {
        Ok(status) => {
            println!("healthy: {status}");
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("unhealthy: {e}");
            std::process::exit(1);
        }
    }
}

fn target() -> Result<(SocketAddr, String), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [var, port, path] = args.as_slice() else {
        return Err("usage: fleet-healthcheck <ADDR_VAR> <DEFAULT_PORT> <PATH>".into());
    };
    let mut addr = match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse::<SocketAddr>()
            .map_err(|e| format!("{var}={v:?} is not an address: {e}"))?,
        _ => {
            let port: u16 = port
                .parse()
                .map_err(|e| format!("default port {port:?}: {e}"))?;
            SocketAddr::from((Ipv4Addr::LOCALHOST, port))
        }
    };
    if addr.ip().is_unspecified() {
        if addr.is_ipv4() {
            addr.set_ip(Ipv4Addr::LOCALHOST.into());
        } else {
            addr.set_ip(Ipv6Addr::LOCALHOST.into());
        }
    }
    if !path.starts_with('/') {
        return Err(format!("path {path:?} must start with /"));
    }
    Ok((addr, path.clone()))
}

fn check() -> Result<String, String> {
    let (addr, path) = target()?;
    let mut stream =
        TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| e.to_string())?;
    // One write: the request goes out in one segment.
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: fleet-healthcheck\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send to {addr}: {e}"))?;

    // Only the status line matters: read until its end (or 1 KiB).
    let mut head = Vec::with_capacity(128);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
        let n = stream
            .read(&mut buf)
            .map_err(|e| format!("read from {addr}: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default().trim().to_owned();
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP status from {addr}{path}: {line:?}"))?;
    if (200..300).contains(&code) {
        Ok(format!("{addr}{path}: {line}"))
    } else {
        Err(format!("{addr}{path}: {line}"))
    }
}
