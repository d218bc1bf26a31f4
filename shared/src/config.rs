//! Configuration every binary shares. Each flag mirrors an environment variable (flags win).

use std::time::Duration;

use crate::keys::Keys;
use crate::session_log::FanoutConfig;
use crate::stream::ConsumerConfig;
use crate::task::Retention;
use crate::telemetry::LogFormat;

/// The longest `FLEET_SESSION_TTL_SECS`: ten years, whose milliseconds fit an `i64` with room.
pub const MAX_SESSION_TTL_SECS: u64 = 315_360_000;

/// Redis, key layout, logging and shutdown: the same in every binary.
#[derive(clap::Args, Clone, Debug)]
pub struct CommonArgs {
    /// Redis to use; a `redis-cluster://` URL selects cluster mode.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// Prefix of every Redis key, so several fleets can share one Redis.
    #[arg(long, env = "FLEET_PREFIX", default_value = crate::keys::DEFAULT_PREFIX)]
    pub prefix: String,

    /// Log format: auto (pretty on a terminal, JSON otherwise), pretty or json.
    /// The level comes from RUST_LOG (default info).
    #[arg(long, env = "FLEET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,

    /// Number of fan-out streams carrying live events to gateways. Must be the same for every
    /// callback-worker, dispatcher and ws-gateway of a fleet.
    #[arg(long, env = "FLEET_FANOUT_SHARDS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub fanout_shards: u32,

    /// Sessions, their tasks and event logs expire after this many seconds without activity;
    /// the session tokens edge-api issues are valid this long from when they are issued.
    /// 1 to 315,360,000 (ten years).
    #[arg(long, env = "FLEET_SESSION_TTL_SECS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(1..=MAX_SESSION_TTL_SECS))]
    pub session_ttl_secs: u64,

    /// Events kept per session log (older ones are trimmed); at least 1.
    #[arg(long, env = "FLEET_SESSION_LOG_MAXLEN", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub session_log_maxlen: u64,

    /// Seconds to finish work in hand after SIGTERM before exiting anyway.
    #[arg(long, env = "FLEET_SHUTDOWN_GRACE_SECS", default_value_t = 25)]
    pub shutdown_grace_secs: u64,

    /// Milliseconds a Redis command may wait for its reply before it fails (and its work is
    /// retried or reported). Blocking reads get their block time on top.
    #[arg(long, env = "FLEET_REDIS_TIMEOUT_MS", default_value_t = crate::redis::DEFAULT_COMMAND_TIMEOUT_MS,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub redis_timeout_ms: u64,

    /// Seconds a client of this binary's HTTP ports (REST, WebSocket / SSE, admin; edge-api's
    /// gRPC port its first bytes) may take to send a request's head before its connection is
    /// closed, and on edge-api's REST routes its body (408 after). Also how long an HTTP/1 keep-alive connection may stay idle between two
    /// requests, and an HTTP/2 one quiet before it is pinged (and closed when the ping is not
    /// answered as long). WebSockets and SSE streams, however quiet, are not affected. 1 to
    /// 3,600.
    #[arg(long, env = "FLEET_HTTP_READ_TIMEOUT_SECS", default_value_t = crate::net::DEFAULT_READ_TIMEOUT_SECS,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub http_read_timeout_secs: u64,
}

impl CommonArgs {
    pub fn keys(&self) -> Keys {
        Keys::new(&self.prefix)
    }

    pub fn retention(&self) -> Retention {
        Retention {
            session_ttl_ms: (self.session_ttl_secs * 1000) as i64,
            log_maxlen: self.session_log_maxlen,
        }
    }

    pub fn fanout(&self) -> FanoutConfig {
        FanoutConfig {
            shards: self.fanout_shards,
            ..FanoutConfig::default()
        }
    }

    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// How long a client may take to send a request (see `--http-read-timeout-secs`).
    pub fn http_read_timeout(&self) -> Duration {
        Duration::from_secs(self.http_read_timeout_secs)
    }

    /// Connects to `redis_url` with these settings' command timeout.
    pub async fn connect(&self) -> Result<fred::prelude::Client, crate::redis::ConnectError> {
        crate::redis::connect_with(
            &self.redis_url,
            Duration::from_millis(self.redis_timeout_ms),
        )
        .await
    }
}

/// How a worker reads its stream (see [`crate::stream`]).
#[derive(clap::Args, Clone, Debug)]
pub struct ConsumerArgs {
    /// Entries read per XREADGROUP.
    #[arg(long, env = "FLEET_BATCH", default_value_t = 256)]
    pub batch: usize,

    /// Entries handled at once, over all batches in hand.
    #[arg(long, env = "FLEET_MAX_IN_FLIGHT", default_value_t = 512)]
    pub max_in_flight: usize,

    /// Milliseconds one XREADGROUP blocks waiting for entries.
    #[arg(long, env = "FLEET_BLOCK_MS", default_value_t = 1000)]
    pub block_ms: u64,

    /// Milliseconds an entry may stay unacknowledged before another consumer takes it over.
    #[arg(long, env = "FLEET_CLAIM_IDLE_MS", default_value_t = 30_000)]
    pub claim_idle_ms: u64,

    /// Deliveries after which an entry is dead-lettered instead of handled again.
    #[arg(long, env = "FLEET_MAX_DELIVERIES", default_value_t = 5)]
    pub max_deliveries: u32,
}

impl Default for ConsumerArgs {
    fn default() -> Self {
        Self {
            batch: 256,
            max_in_flight: 512,
            block_ms: 1000,
            claim_idle_ms: 30_000,
            max_deliveries: 5,
        }
    }
}

impl ConsumerArgs {
    /// A consumer config for `stream` / `group` with these settings.
    pub fn consumer(
        &self,
        keys: &Keys,
        stream: String,
        group: &str,
        consumer: String,
    ) -> ConsumerConfig {
        let mut c = ConsumerConfig::new(stream, group, consumer, keys.dlq());
        c.batch = self.batch.max(1);
        c.max_in_flight = self.max_in_flight.max(c.batch);
        c.block = Duration::from_millis(self.block_ms.max(1));
        c.claim_idle = Duration::from_millis(self.claim_idle_ms.max(100));
        c.max_deliveries = self.max_deliveries.max(1);
        c
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Args {
        #[command(flatten)]
        common: CommonArgs,
    }

    fn parse(args: &[&str]) -> Result<CommonArgs, clap::Error> {
        Args::try_parse_from(std::iter::once("fleet").chain(args.iter().copied())).map(|a| a.common)
    }

    #[test]
    fn a_session_ttl_or_log_length_that_cannot_work_is_refused_at_start() {
        // 0 would make every token expired when issued; a huge TTL would overflow its
        // milliseconds; a log of 0 events would lose every event.
        for bad in [
            ["--session-ttl-secs", "0"],
            ["--session-ttl-secs", "18446744073709551615"],
            ["--session-log-maxlen", "0"],
        ] {
            let err = parse(&bad).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{bad:?}"
            );
            assert!(err.to_string().contains(bad[0]), "{err}");
        }
        let ok = parse(&["--session-ttl-secs", "315360000"]).unwrap();
        assert_eq!(ok.retention().session_ttl_ms, 315_360_000_000);
        assert_eq!(parse(&[]).unwrap().retention().session_ttl_ms, 86_400_000);
    }
}
