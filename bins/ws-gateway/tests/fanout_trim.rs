//! A fan-out reader whose shard was trimmed past its position (a stalled reader, a long Redis
//! outage): the entries in between are gone, and the clients of that shard catch up from their
//! session logs, or hear `events_lost` when the log lost the events too.
//!
//! A fan-out reader is blocked in XREAD between entries; Redis answers it only after a script or
//! a transaction has run whole. So one script that writes the session's entries, then enough
//! entries of another session, then trims the shard makes the reader miss the session's entries
//! as surely as hours of stall would.

mod common;

use std::sync::Arc;

use common::*;
use fleet::Keys;
use fleet::session_log::LoggedEvent;
use fleet::stream::entry::StreamId;
use fred::prelude::*;
use fred::types::CustomCommand;
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;
use ws_gateway::fanout::{self, READ_COUNT};
use ws_gateway::registry::{Registry, Signal, Subscription, Transport};

/// XADDs to `KEYS[1]` the fan-out entries in `ARGV[3..]` (`s`, `e`, `p`, `d` each), then
/// `ARGV[1]` entries of a session no client follows, then trims the stream to `ARGV[2]` entries
/// (`''`: no trim).
const WRITE_AND_TRIM: &str = r"
local key = KEYS[1]
for i = 3, #ARGV, 4 do
  redis.call('XADD', key, '*', 's', ARGV[i], 'e', ARGV[i + 1], 'p', ARGV[i + 2], 'd', ARGV[i + 3])
end
for _ = 1, tonumber(ARGV[1]) do
  redis.call('XADD', key, '*', 's', 'nobody-here', 'e', '1-1', 'p', '', 'd', '{}')
end
if ARGV[2] ~= '' then
  redis.call('XTRIM', key, 'MAXLEN', ARGV[2])
end
return redis.call('XLEN', key)
";

/// The arguments of [`WRITE_AND_TRIM`].
fn script_args(sid: &str, events: &[LoggedEvent], others: u64, keep: Option<u64>) -> Vec<String> {
    let mut args = vec![
        others.to_string(),
        keep.map_or_else(String::new, |k| k.to_string()),
    ];
    for ev in events {
        args.extend([
            sid.to_owned(),
            ev.event_id.clone(),
            ev.prev.clone(),
            ev.json.clone(),
        ]);
    }
    args
}

/// Runs [`WRITE_AND_TRIM`] on `key` in one step; returns the stream's length after it.
async fn write_and_trim(
    client: &Client,
    key: &str,
    sid: &str,
    events: &[LoggedEvent],
    others: u64,
    keep: Option<u64>,
) -> u64 {
    client
        .eval(
            WRITE_AND_TRIM,
            vec![key.to_owned()],
            script_args(sid, events, others, keep),
        )
        .await
        .expect("write and trim")
}

/// A fan-out entry of `sid` with one made-up event `ms-1` (for a reader without clients' logs).
fn made_up(ms: u64) -> LoggedEvent {
    LoggedEvent {
        prev: String::new(),
        event_id: format!("{ms}-1"),
        json: "{}".to_owned(),
    }
}

fn ids(events: &[LoggedEvent]) -> Vec<String> {
    events.iter().map(|e| e.event_id.clone()).collect()
}

/// The next signal of `sub`, within [`WAIT`].
async fn signal(sub: &mut Subscription) -> Signal {
    tokio::time::timeout(WAIT, sub.recv())
        .await
        .expect("a signal in time")
}

fn live_id(signal: &Signal) -> StreamId {
    match signal {
        Signal::Live(live) => live.event_id,
        other => panic!("expected a live entry, got {other:?}"),
    }
}

#[tokio::test]
async fn a_reader_resyncs_its_shard_clients_only_when_its_shard_was_trimmed_past_it() {
    let fleet = Fleet::new().await;
    let shards = fleet.log.fanout_config().shards;
    let sid = "fanout-trim-a";
    let shard = Keys::fanout_shard(sid, shards);
    let other = (0..)
        .map(|i| format!("fanout-trim-b{i}"))
        .find(|s| Keys::fanout_shard(s, shards) != shard)
        .expect("a session on another shard");
    let key = fleet.log.fanout_key(sid);
    let registry = Arc::new(Registry::default());
    let mut mine = registry.subscribe_on_shard(sid, Transport::WebSocket, shard);
    let mut elsewhere =
        registry.subscribe_on_shard(&other, Transport::Sse, Keys::fanout_shard(&other, shards));
    let start = fanout::start_ids(&fleet.client, std::slice::from_ref(&key))
        .await
        .expect("start ids")[0];
    let stop = CancellationToken::new();
    let reader = tokio::spawn(fanout::read_shard(
        fleet.client.clone(),
        key.clone(),
        start,
        registry.clone(),
        stop.clone(),
    ));

    // Full reads of a shard nobody trimmed: checked, nothing lost, nobody resyncs.
    let len = write_and_trim(
        &fleet.client,
        &key,
        "nobody-here",
        &[],
        3 * READ_COUNT,
        None,
    )
    .await;
    assert_eq!(len, 3 * READ_COUNT);
    write_and_trim(&fleet.client, &key, sid, &[made_up(1)], 0, None).await;
    assert_eq!(live_id(&signal(&mut mine).await), "1-1".parse().unwrap());

    // The session's entry, then more than one read's worth, then a trim past the reader.
    let len = write_and_trim(
        &fleet.client,
        &key,
        sid,
        &[made_up(2)],
        READ_COUNT + 100,
        Some(READ_COUNT + 50),
    )
    .await;
    assert_eq!(len, READ_COUNT + 50);
    assert!(
        matches!(signal(&mut mine).await, Signal::Resync),
        "the shard's client is told to read its log"
    );
    // The reader goes on.
    write_and_trim(&fleet.client, &key, sid, &[made_up(3)], 0, None).await;
    assert_eq!(live_id(&signal(&mut mine).await), "3-1".parse().unwrap());
    // A client of another shard was not told: its reader lost nothing.
    assert!(elsewhere.try_recv().is_none());

    stop.cancel();
    tokio::time::timeout(WAIT, reader)
        .await
        .expect("the reader stops")
        .expect("the reader does not panic");
}

#[tokio::test]
async fn clients_catch_up_from_the_log_when_their_shard_was_trimmed_past_the_reader() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let tid = fleet.submit(&s.sid, "hi").await;
    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;
    let mut sse = SseStream::new(
        SseStream::open(&format!("{}?token={}", gw.sse_url(&s.sid), s.token), &[]).await,
    );
    let first = fleet.chunk(&s.sid, &tid, 1, "one").await;
    // Both clients have what the log held, then the live chunk: the reader is past it.
    let mut ws_got = Vec::new();
    while ws_got.last() != Some(&first.event_id) {
        ws_got.extend(event_ids(&recv_n(&mut ws, 1).await));
    }
    let mut sse_got = Vec::new();
    while sse_got.last() != Some(&first.event_id) {
        let ev = sse.next().await.expect("an SSE event");
        sse_got.push(ev.id.expect("a log event"));
    }

    // Logged, and fanned out only to be trimmed before the reader reads past them.
    let ops: Vec<_> = (2..=4).map(|seq| chunk(&s.sid, &tid, seq, "x")).collect();
    let missed = fleet.emit(&s.sid, &ops, false).await;
    let key = fleet.log.fanout_key(&s.sid);
    write_and_trim(
        &fleet.client,
        &key,
        &s.sid,
        &missed,
        READ_COUNT + 100,
        Some(READ_COUNT + 50),
    )
    .await;

    assert_eq!(event_ids(&recv_n(&mut ws, 3).await), ids(&missed));
    let sse_missed: Vec<_> = sse
        .next_n(3)
        .await
        .into_iter()
        .map(|e| e.id.expect("a log event"))
        .collect();
    assert_eq!(sse_missed, ids(&missed));

    // Live delivery goes on, each event once.
    let next = fleet.chunk(&s.sid, &tid, 5, "five").await;
    assert_eq!(
        event_ids(&recv_n(&mut ws, 1).await),
        vec![next.event_id.clone()]
    );
    assert_eq!(
        sse.next().await.expect("an SSE event").id,
        Some(next.event_id)
    );
    ping_pong(&mut ws).await;
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn clients_hear_events_lost_when_the_log_lost_what_the_trimmed_shard_held() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let tid = fleet.submit(&s.sid, "hi").await;
    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;
    let first = fleet.chunk(&s.sid, &tid, 1, "one").await;
    let mut got = Vec::new();
    while got.last() != Some(&first.event_id) {
        got.extend(event_ids(&recv_n(&mut ws, 1).await));
    }

    let ops: Vec<_> = (2..=5).map(|seq| chunk(&s.sid, &tid, seq, "x")).collect();
    let missed = fleet.emit(&s.sid, &ops, false).await;
    // The log keeps only the last two of them.
    let _: u64 = fleet
        .client
        .xtrim(fleet.keys.session_events(&s.sid), ("MAXLEN", "=", 2_i64))
        .await
        .expect("trim the log");
    let key = fleet.log.fanout_key(&s.sid);
    write_and_trim(
        &fleet.client,
        &key,
        &s.sid,
        &missed,
        READ_COUNT + 100,
        Some(READ_COUNT + 50),
    )
    .await;

    let lost: Json = recv_json(&mut ws).await;
    assert_eq!(lost["message_type"], "error", "{lost}");
    assert_eq!(lost["data"]["error"]["error_type"], "events_lost", "{lost}");
    let message = lost["data"]["error"]["message"]
        .as_str()
        .expect("a message");
    assert!(
        message.contains(&first.event_id) && message.contains(&missed[2].event_id),
        "{lost}"
    );
    assert_eq!(event_ids(&recv_n(&mut ws, 2).await), ids(&missed[2..]));

    let next = fleet.chunk(&s.sid, &tid, 6, "six").await;
    assert_eq!(event_ids(&recv_n(&mut ws, 1).await), vec![next.event_id]);
    ping_pong(&mut ws).await;
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn clients_catch_up_when_the_reader_reconnects_past_a_trim() {
    // Its own Redis: every connection but the test's is cut.
    let redis = fleet_test_support::RedisServer::start();
    let fleet = Fleet::on(redis.url()).await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let tid = fleet.submit(&s.sid, "hi").await;
    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;
    let first = fleet.chunk(&s.sid, &tid, 1, "one").await;
    let mut got = Vec::new();
    while got.last() != Some(&first.event_id) {
        got.extend(event_ids(&recv_n(&mut ws, 1).await));
    }

    // In one transaction: cut the gateway's connections (its readers reconnect, and fred
    // retries their reads), then write the session's entries and trim them away, leaving far
    // fewer entries than one read takes.
    let ops: Vec<_> = (2..=4).map(|seq| chunk(&s.sid, &tid, seq, "x")).collect();
    let missed = fleet.emit(&s.sid, &ops, false).await;
    let key = fleet.log.fanout_key(&s.sid);
    let trx = fleet.client.multi();
    let _: Value = trx
        .custom(
            CustomCommand::new_static("CLIENT", None, false),
            vec!["KILL", "TYPE", "normal", "SKIPME", "yes"],
        )
        .await
        .expect("queue the kill");
    let _: Value = trx
        .custom(
            CustomCommand::new_static("EVAL", None, false),
            [
                vec![WRITE_AND_TRIM.to_owned(), "1".to_owned(), key.clone()],
                script_args(&s.sid, &missed, 20, Some(10)),
            ]
            .concat(),
        )
        .await
        .expect("queue the writes");
    let replies: Vec<Value> = trx.exec(true).await.expect("transaction");
    assert!(
        replies[0].as_u64().is_some_and(|killed| killed > 0),
        "{replies:?}"
    );
    assert_eq!(replies[1].as_u64(), Some(10), "{replies:?}");

    assert_eq!(event_ids(&recv_n(&mut ws, 3).await), ids(&missed));
    let next = fleet.chunk(&s.sid, &tid, 5, "five").await;
    assert_eq!(event_ids(&recv_n(&mut ws, 1).await), vec![next.event_id]);
    ping_pong(&mut ws).await;
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_gap_fill_that_finds_its_events_trimmed_from_the_log_reports_them_lost() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let tid = fleet.submit(&s.sid, "hi").await;
    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;
    let first = fleet.chunk(&s.sid, &tid, 1, "one").await;
    let mut got = Vec::new();
    while got.last() != Some(&first.event_id) {
        got.extend(event_ids(&recv_n(&mut ws, 1).await));
    }

    // Chunks 2 to 4 are logged without fan-out, and the log keeps only chunk 4; a nudge then
    // points at chunk 3, which the log no longer holds.
    let ops: Vec<_> = (2..=4).map(|seq| chunk(&s.sid, &tid, seq, "x")).collect();
    let missed = fleet.emit(&s.sid, &ops, false).await;
    let _: u64 = fleet
        .client
        .xtrim(fleet.keys.session_events(&s.sid), ("MAXLEN", "=", 1_i64))
        .await
        .expect("trim the log");
    fleet.nudge(&s.sid, &missed[1].event_id).await;

    let lost: Json = recv_json(&mut ws).await;
    assert_eq!(lost["data"]["error"]["error_type"], "events_lost", "{lost}");
    let message = lost["data"]["error"]["message"]
        .as_str()
        .expect("a message");
    assert!(message.contains(&missed[1].event_id), "{lost}");
    // The next live event is read with what the log still holds before it.
    let next = fleet.chunk(&s.sid, &tid, 5, "five").await;
    assert_eq!(
        event_ids(&recv_n(&mut ws, 2).await),
        vec![missed[2].event_id.clone(), next.event_id]
    );
    ping_pong(&mut ws).await;
    gw.stop().await.expect("clean stop");
}
