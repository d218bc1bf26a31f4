//! Redis commands' timeouts against a real redis-server: a command with no reply fails after the
//! client's command timeout (`FLEET_REDIS_TIMEOUT_MS`), and a blocking reader gets its block on
//! top.

use std::time::Duration;

use fred::cmd;
use fred::prelude::*;

#[tokio::test]
async fn a_command_without_a_reply_fails_after_the_command_timeout() {
    // A Redis of its own: the test pauses its writes.
    let redis = fleet_test_support::RedisServer::start();
    let client = fleet::redis::connect_with(&redis.url(), Duration::from_millis(300))
        .await
        .unwrap();
    let admin = fleet::redis::connect(&redis.url()).await.unwrap();
    let _: Value = admin
        .custom(cmd!("CLIENT"), vec!["PAUSE", "30000", "WRITE"])
        .await
        .unwrap();
    let stuck: Result<(), _> = client.set("k", "v", None, None, false).await;
    let _: Value = admin.custom(cmd!("CLIENT"), vec!["UNPAUSE"]).await.unwrap();
    let error = stuck.expect_err("a write to a paused Redis has no reply");
    assert_eq!(*error.kind(), fred::error::ErrorKind::Timeout, "{error}");
    // The client itself is fine: the next command goes through.
    let () = client.set("k", "v", None, None, false).await.unwrap();
}

#[tokio::test]
async fn a_blocking_reader_may_wait_its_block_beyond_the_command_timeout() {
    let client =
        fleet::redis::connect_with(&fleet_test_support::redis(), Duration::from_millis(300))
            .await
            .unwrap();
    let stream = format!("{}:empty", fleet_test_support::prefix());
    let plain = client.clone_new();
    plain.init().await.unwrap();
    let timed_out: Result<Value, _> = plain.xread(None, Some(800), &stream, "$").await;
    assert_eq!(
        *timed_out
            .expect_err("an 800 ms block outlasts a 300 ms timeout")
            .kind(),
        fred::error::ErrorKind::Timeout
    );
    let reader = fleet::redis::blocking_reader(&client, Duration::from_millis(1000));
    reader.init().await.unwrap();
    let nothing: Value = reader.xread(None, Some(800), &stream, "$").await.unwrap();
    assert!(nothing.is_null(), "{nothing:?}");
}
