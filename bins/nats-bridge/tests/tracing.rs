//! With a tracer installed (as `OTEL_*` configuration installs one), the bridge's spans join
//! the publisher's trace both ways: the entry written from a NATS message, and the NATS message
//! published from an entry, carry the same trace id with the bridge's own span id.

mod common;

use std::time::Duration;

use common::{Env, TRACEPARENT, headers, trace_id, transition};
use fleet::envelope::{Envelope, NatsPublish, Outbound};
use fleet::stream::producer;
use futures::StreamExt;
use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

fn span_id(tp: &str) -> &str {
    tp.split('-').nth(2).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_crosses_the_bridge_both_ways() {
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
        .try_init()
        .expect("install the test tracer");

    let env = Env::start().await;
    let mut requests = env.nc.subscribe("agent.requests").await.unwrap();
    let bridge = env.bridge(&[]).await;

    // In: the entry continues the NATS message's trace.
    env.publish(
        "agile.events",
        headers(&[("traceparent", TRACEPARENT)]),
        transition("US-1", "DRAFT", "BUILD"),
    )
    .await;
    env.wait_len(&env.keys.tasks(), 1, Duration::from_secs(20))
        .await;
    let (entry, _) = env.planning_events().await.remove(0);
    let tp = entry.tp.expect("the entry carries a traceparent");
    assert_eq!(trace_id(&tp), trace_id(TRACEPARENT), "same trace");
    assert_ne!(span_id(&tp), span_id(TRACEPARENT), "the bridge's own span");

    // Out: the NATS message continues the entry's trace.
    let writer = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut env_out = Envelope::new(Outbound::Publish(NatsPublish {
        subject: "agent.requests".into(),
        payload: r#"{"task_id": "t1", "session_id": "s1"}"#.into(),
        headers: Default::default(),
    }));
    env_out.tp = Some(writer.into());
    producer::send(&env.redis, &env.keys.outbound(), None, &env_out)
        .await
        .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(20), requests.next())
        .await
        .expect("published")
        .unwrap();
    let h = msg.headers.unwrap();
    let tp = h.get("traceparent").unwrap().as_str();
    assert_eq!(trace_id(tp), trace_id(writer), "same trace");
    assert_ne!(span_id(tp), span_id(writer), "the bridge's own span");
    bridge.stop().await;
}
