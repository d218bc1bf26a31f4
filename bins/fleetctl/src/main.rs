//! fleetctl: chat with an agent through a running fleet, and look after dead letters.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use fleet::stream::dlq::ORIGINAL_FIELD_PREFIX;
use fleet::stream::entry::parse_entries;
use fred::prelude::*;
use futures::{SinkExt, StreamExt};
use serde_json::{Value as Json, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[derive(Parser)]
#[command(name = "fleetctl", version, about = "Fleet's command-line client.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open a session with an agent, send a message over WebSocket and print the answer as it
    /// streams in.
    Chat {
        /// edge-api base URL.
        #[arg(long, env = "FLEET_API_URL", default_value = "http://127.0.0.1:8001")]
        api: String,
        /// The agent to talk to.
        #[arg(long, default_value = "demo")]
        agent: String,
        /// Print every server message as JSON instead of the streamed text.
        #[arg(long)]
        json: bool,
        /// The message.
        #[arg(required = true)]
        message: Vec<String>,
    },
    /// Dead letters: list them, or send them back to their stream.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
        #[arg(
            long,
            env = "REDIS_URL",
            default_value = "redis://127.0.0.1:6379",
            global = true
        )]
        redis_url: String,
        #[arg(long, env = "FLEET_PREFIX", default_value = fleet::keys::DEFAULT_PREFIX, global = true)]
        prefix: String,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Show the newest dead letters.
    List {
        #[arg(long, default_value_t = 20)]
        count: u64,
    },
    /// Put dead letters back on the stream they came from (as new entries) and remove them
    /// from the dead-letter stream.
    Replay {
        /// Ids of dead letters (as `list` shows them).
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Chat {
            api,
            agent,
            json,
            message,
        } => chat(&api, &agent, &message.join(" "), json).await,
        Command::Dlq {
            command,
            redis_url,
            prefix,
        } => {
            let client = fleet::redis::connect(&redis_url).await?;
            let dlq = fleet::Keys::new(&prefix).dlq();
            match command {
                DlqCommand::List { count } => dlq_list(&client, &dlq, count).await,
                DlqCommand::Replay { ids } => dlq_replay(&client, &dlq, &ids).await,
            }
        }
    }
}

async fn chat(api: &str, agent: &str, message: &str, as_json: bool) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let init: Json = http
        .post(format!("{}/api/v1/chat/init", api.trim_end_matches('/')))
        .json(&json!({"agent_id": agent}))
        .send()
        .await
        .with_context(|| format!("cannot reach edge-api at {api}"))?
        .json()
        .await?;
    if let Some(err) = init.get("error") {
        bail!(
            "edge-api refused the session: {}",
            err["message"].as_str().unwrap_or("unknown error")
        );
    }
    let url = init["websocket_url"]
        .as_str()
        .context("no websocket_url in the init answer")?;
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .with_context(|| format!("cannot connect to the gateway at {url}"))?;
    let sent = Instant::now();
    let frame = json!({"message_type": "chat_message", "data": {"message": message}});
    ws.send(WsMessage::text(frame.to_string())).await?;

    let mut task_id: Option<String> = None;
    let mut first_chunk = None;
    let mut chunks = 0;
    let mut out = std::io::stdout();
    while let Some(frame) = ws.next().await {
        let text = match frame? {
            WsMessage::Text(t) => t.to_string(),
            WsMessage::Close(c) => bail!("the gateway closed the connection: {c:?}"),
            _ => continue,
        };
        let m: Json = serde_json::from_str(&text)?;
        if as_json {
            println!("{text}");
        }
        let mine = task_id.is_some() && m["task_id"].as_str() == task_id.as_deref();
        match m["message_type"].as_str().unwrap_or_default() {
            "task_queued" => task_id = m["data"]["task_id"].as_str().map(str::to_owned),
            "chat_streaming" if mine => {
                first_chunk.get_or_insert_with(|| sent.elapsed());
                chunks += 1;
                if !as_json {
                    write!(out, "{}", m["data"]["content"].as_str().unwrap_or_default())?;
                    out.flush()?;
                }
            }
            "task_restarted" if mine => {
                // The task runs again from the start: what was printed is void.
                chunks = 0;
                if !as_json {
                    println!();
                    eprintln!("[the task restarted on another executor; its answer follows anew]");
                }
            }
            "chat_response" if mine => {
                if !as_json {
                    println!();
                }
                eprintln!(
                    "[task {} completed: {chunks} chunks, first chunk after {:.1} ms, done after {:.1} ms]",
                    task_id.unwrap_or_default(),
                    first_chunk.unwrap_or_default().as_secs_f64() * 1000.0,
                    sent.elapsed().as_secs_f64() * 1000.0
                );
                let _ = ws.close(None).await;
                return Ok(());
            }
            "chat_error" if mine => bail!("the task failed: {}", m["data"]["error"]),
            "error" => bail!("the gateway refused the message: {}", m["data"]["error"]),
            _ => {}
        }
    }
    bail!("the connection ended before the answer")
}

async fn dlq_list(client: &Client, dlq: &str, count: u64) -> anyhow::Result<()> {
    let reply: Value = client.xrevrange(dlq, "+", "-", Some(count)).await?;
    let entries = parse_entries(reply)?;
    if entries.is_empty() {
        println!("no dead letters in {dlq}");
    }
    for e in entries {
        println!(
            "{}  {} / {}  entry {}  deliveries {}\n    reason: {}\n    kind: {}",
            e.id,
            e.get_str("stream").unwrap_or("?"),
            e.get_str("group").unwrap_or("?"),
            e.get_str("entry_id").unwrap_or("?"),
            e.get_str("deliveries").unwrap_or("?"),
            e.get_str("reason").unwrap_or("?"),
            e.get_str("orig.kind").unwrap_or("(none)"),
        );
    }
    Ok(())
}

/// A message nats-bridge refused comes back through `fleet:outbound`, published to its subject.
async fn replay_to_nats(
    client: &Client,
    dlq: &str,
    letter: &fleet::stream::StreamEntry,
) -> anyhow::Result<String> {
    let subject = letter
        .get_str("subject")
        .context("NATS dead letter without a subject")?;
    let payload = letter
        .get_str("orig.data")
        .context("NATS dead letter without its payload")?;
    let outbound = dlq
        .strip_suffix(":dlq")
        .map(|p| fleet::Keys::new(p).outbound())
        .context("dead-letter stream name")?;
    let env = fleet::envelope::Envelope::new(fleet::envelope::Outbound::Publish(
        fleet::envelope::NatsPublish {
            subject: subject.to_owned(),
            payload: payload.to_owned(),
            headers: Default::default(),
        },
    ));
    Ok(fleet::stream::producer::send(client, &outbound, None, &env)
        .await?
        .to_string())
}

async fn dlq_replay(client: &Client, dlq: &str, ids: &[String]) -> anyhow::Result<()> {
    for id in ids {
        let reply: Value = client
            .xrange(dlq, id.as_str(), id.as_str(), Some(1))
            .await?;
        let Some(letter) = parse_entries(reply)?.into_iter().next() else {
            bail!("no dead letter {id} in {dlq}");
        };
        if letter.get_str("source") == Some("nats") {
            let new_id = replay_to_nats(client, dlq, &letter).await?;
            let _: i64 = client.xdel(dlq, id.as_str()).await?;
            println!(
                "{id} -> NATS {} (through {new_id})",
                letter.get_str("subject").unwrap_or("?")
            );
            continue;
        }
        let stream = letter
            .get_str("stream")
            .context("dead letter without a stream")?
            .to_owned();
        let fields: Vec<(Bytes, Bytes)> = letter
            .fields
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(ORIGINAL_FIELD_PREFIX.as_bytes())
                    .map(|name| (Bytes::copy_from_slice(name), v.clone()))
            })
            .collect();
        if fields.is_empty() {
            bail!("dead letter {id} keeps no original fields");
        }
        let new_id: String = client.xadd(&stream, false, None, "*", fields).await?;
        let _: i64 = client.xdel(dlq, id.as_str()).await?;
        println!("{id} -> {stream} {new_id}");
    }
    Ok(())
}
