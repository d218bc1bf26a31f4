//! fleetctl against a live fleet: `chat` streams an answer; `dlq list` and `dlq replay` put a
//! dead letter back where it came from (a Redis stream, or NATS through `fleet:outbound`).

use std::process::Command;

use bytes::Bytes;
use fleet::envelope::{Envelope, Outbound, TaskCancel, TaskCommand};
use fleet::stream::entry::parse_entries;
use fleet_e2e::{AGENT, Fleet, Options};
use fred::prelude::*;

fn fleetctl(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(fleet_test_support::bin_path("fleetctl"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run fleetctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_prints_the_streamed_answer() {
    let fleet = Fleet::start(Options {
        echo_delay_ms: 1,
        ..Default::default()
    })
    .await;
    let api = fleet.api();
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || {
        fleetctl(
            &[
                "chat", "--api", &api, "--agent", AGENT, "hello", "from", "fleetctl",
            ],
            &[],
        )
    })
    .await
    .unwrap();
    assert!(ok, "fleetctl chat failed: {stderr}");
    assert_eq!(stdout, "hello from fleetctl\n");
    assert!(stderr.contains("completed: 3 chunks"), "{stderr}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_and_replay_send_dead_letters_back() {
    let fleet = Fleet::start(Options {
        front_doors: false,
        workers: false,
        ..Default::default()
    })
    .await;
    let env_vars = [
        ("REDIS_URL", fleet.redis_url.as_str()),
        ("FLEET_PREFIX", fleet.prefix.as_str()),
    ];

    // A dead letter as the consumer loop writes one, and one as nats-bridge writes one.
    let original = Envelope::new(TaskCommand::Cancel(TaskCancel {
        session_id: "s".into(),
        task_id: "t".into(),
        reason: "replayed".into(),
    }));
    let mut fields: Vec<(Bytes, Bytes)> = vec![
        ("stream".into(), Bytes::from(fleet.keys.tasks())),
        ("group".into(), "dispatchers".into()),
        ("entry_id".into(), "1-0".into()),
        ("reason".into(), "handler gave up".into()),
        ("deliveries".into(), "5".into()),
    ];
    for (k, v) in original.to_fields().unwrap() {
        fields.push((Bytes::from(format!("orig.{k}")), v));
    }
    let redis_letter: String = fleet
        .client
        .xadd(fleet.keys.dlq(), false, None, "*", fields)
        .await
        .unwrap();
    let nats_fields: Vec<(&str, &str)> = vec![
        ("source", "nats"),
        ("stream", "nats:agent.requests"),
        ("subject", "agent.requests"),
        ("reason", "stream missing"),
        ("orig.data", "{\"task_id\":\"t\",\"session_id\":\"s\"}"),
    ];
    let nats_letter: String = fleet
        .client
        .xadd(fleet.keys.dlq(), false, None, "*", nats_fields)
        .await
        .unwrap();

    let (ok, stdout, stderr) = fleetctl(&["dlq", "list"], &env_vars);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("handler gave up") && stdout.contains("stream missing"),
        "{stdout}"
    );

    let (ok, stdout, stderr) = fleetctl(&["dlq", "replay", &redis_letter, &nats_letter], &env_vars);
    assert!(ok, "{stderr}");
    assert!(stdout.contains(&fleet.keys.tasks()), "{stdout}");

    let back: Value = fleet
        .client
        .xrange(fleet.keys.tasks(), "-", "+", None)
        .await
        .unwrap();
    let back = parse_entries(back).unwrap();
    assert_eq!(back.len(), 1);
    let replayed = Envelope::<TaskCommand>::from_fields(&back[0].fields).unwrap();
    assert_eq!(replayed, original, "the original entry, byte for byte");

    let out: Value = fleet
        .client
        .xrange(fleet.keys.outbound(), "-", "+", None)
        .await
        .unwrap();
    let out = parse_entries(out).unwrap();
    let Outbound::Publish(p) = Envelope::<Outbound>::from_fields(&out[0].fields)
        .unwrap()
        .msg;
    assert_eq!(p.subject, "agent.requests");
    assert_eq!(p.payload, "{\"task_id\":\"t\",\"session_id\":\"s\"}");

    let left: Value = fleet
        .client
        .xrange(fleet.keys.dlq(), "-", "+", None)
        .await
        .unwrap();
    assert!(
        parse_entries(left).unwrap().is_empty(),
        "replayed letters leave the dead-letter stream"
    );
    fleet.stop().await;
}
