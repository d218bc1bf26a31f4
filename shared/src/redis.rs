//! Connecting to Redis: one multiplexed client per process for ordinary commands, and a
//! separate connection ([`blocking_reader`]) for each blocking reader. A command fails when its
//! reply takes longer than the command timeout (`FLEET_REDIS_TIMEOUT_MS`, default 15 s); a
//! blocking reader's commands get their block on top.

use std::time::Duration;

use fred::prelude::*;
use fred::types::config::{TcpConfig, UnresponsiveConfig};

/// Why Redis could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid Redis URL `{url}`: {}", reason(.error))]
    Url { url: String, error: Error },
    #[error("cannot connect to Redis at `{url}`: {}", reason(.error))]
    Connect { url: String, error: Error },
}

/// What went wrong, as a person reads it: fred renders a system error with its debug form
/// (`IO Error: Os { code: 111, kind: ConnectionRefused, message: "Connection refused" }`),
/// whose message is the part worth showing.
pub fn reason(error: &Error) -> String {
    let details = error.details();
    if *error.kind() == ErrorKind::IO {
        for field in ["message: \"", "error: \""] {
            if let Some(start) = details.find(field).map(|at| at + field.len())
                && let Some(len) = details[start..].find('"')
            {
                return details[start..start + len].to_owned();
            }
        }
    }
    error.to_string()
}

/// How long, in milliseconds, a command may wait for its reply unless told otherwise (the
/// default of `FLEET_REDIS_TIMEOUT_MS`).
pub const DEFAULT_COMMAND_TIMEOUT_MS: u64 = 15_000;
/// [`DEFAULT_COMMAND_TIMEOUT_MS`] as a duration.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_millis(DEFAULT_COMMAND_TIMEOUT_MS);

/// Builds a client for `url` (`redis://`, `rediss://`, or `redis-cluster://` for cluster mode)
/// that reconnects forever with backoff, and connects it.
pub async fn connect(url: &str) -> Result<Client, ConnectError> {
    connect_with(url, DEFAULT_COMMAND_TIMEOUT).await
}

/// [`connect`], with commands failing after `command_timeout` without a reply. A blocking
/// read's wait counts too: give a reader that blocks longer than a second its own allowance
/// ([`blocking_reader`]).
pub async fn connect_with(url: &str, command_timeout: Duration) -> Result<Client, ConnectError> {
    let client = client(url)?;
    client.update_perf_config(PerformanceConfig {
        default_command_timeout: command_timeout,
        ..client.perf_config()
    });
    client.init().await.map_err(|error| ConnectError::Connect {
        url: redact(url),
        error,
    })?;
    crate::task::SCRIPTS
        .load(&client)
        .await
        .map_err(|error| ConnectError::Connect {
            url: redact(url),
            error,
        })?;
    Ok(client)
}

/// A connection of its own for a reader whose calls block up to `block`: its commands may take
/// that much longer than `client`'s before they time out. Not yet connected (`init` it).
pub fn blocking_reader(client: &Client, block: Duration) -> Client {
    let reader = client.clone_new();
    let perf = client.perf_config();
    reader.update_perf_config(PerformanceConfig {
        default_command_timeout: perf.default_command_timeout + block,
        ..perf
    });
    reader
}

/// Builds a client for `url` without connecting it.
pub fn client(url: &str) -> Result<Client, ConnectError> {
    let config = Config::from_url(url).map_err(|error| ConnectError::Url {
        url: redact(url),
        error,
    })?;
    let connection = ConnectionConfig {
        connection_timeout: Duration::from_secs(5),
        max_command_attempts: 3,
        // Every request is small and waits for its reply: with Nagle's algorithm a write that
        // follows one not yet acknowledged (a transaction's commands, pipelined requests of
        // several tasks) would wait for the peer's delayed ACK, tens of milliseconds.
        tcp: TcpConfig {
            nodelay: Some(true),
            ..Default::default()
        },
        unresponsive: UnresponsiveConfig {
            max_timeout: Some(Duration::from_secs(10)),
            interval: Duration::from_secs(1),
        },
        ..Default::default()
    };
    let perf = PerformanceConfig {
        default_command_timeout: DEFAULT_COMMAND_TIMEOUT,
        ..Default::default()
    };
    let policy = ReconnectPolicy::new_exponential(0, 50, 2_000, 2);
    Ok(Client::new(
        config,
        Some(perf),
        Some(connection),
        Some(policy),
    ))
}

/// `url` with any password replaced by `***`, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            super::redact("redis://u:secret@h:1/0"),
            "redis://u:***@h:1/0"
        );
        assert_eq!(super::redact("redis://h:1"), "redis://h:1");
    }

    #[tokio::test]
    async fn a_redis_that_is_not_there_is_named_with_the_systems_reason() {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("redis://127.0.0.1:{port}");
        let e = super::connect(&url).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("cannot connect to Redis at `{url}`: Connection refused")
        );
        // Said once, not again as a cause (`{:#}` shows an error's causes).
        assert_eq!(
            format!("{:#}", anyhow::Error::from(e))
                .matches("refused")
                .count(),
            1
        );
        let e = super::client("redis://h:port").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("invalid Redis URL `redis://h:port`: "),
            "{e}"
        );
    }
}
