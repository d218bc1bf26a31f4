//! fleetctl: chat with an agent through a running fleet, and look after dead letters.

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use fleet::stream::dlq::ORIGINAL_FIELD_PREFIX;
use fleet::stream::entry::{StreamId, parse_entries};
use fred::prelude::*;
use futures::{SinkExt, StreamExt};
use serde_json::{Value as Json, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

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
        /// edge-api's base URL (`http://` is assumed when the scheme is left out).
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
        /// The fleet's Redis.
        #[arg(
            long,
            env = "REDIS_URL",
            default_value = "redis://127.0.0.1:6379",
            global = true
        )]
        redis_url: String,
        /// The fleet's key prefix (the dead letters are in `<prefix>:dlq`).
        #[arg(long, env = "FLEET_PREFIX", default_value = fleet::keys::DEFAULT_PREFIX, global = true)]
        prefix: String,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Show the newest dead letters.
    List {
        /// How many to show, newest first.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
        count: u64,
    },
    /// Put dead letters back on the stream they came from (as new entries) and remove them
    /// from the dead-letter stream.
    Replay {
        /// Ids of dead letters (as `list` shows them).
        #[arg(required = true)]
        ids: Vec<StreamId>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetctl: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each once (some errors repeat their cause in their own
/// message): not anyhow's debug form, which adds a backtrace when `RUST_BACKTRACE` is set.
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if !out.contains(&msg) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&msg);
        }
    }
    out
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
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
            let client = fleet::redis::connect(&redis_url)
                .await
                .map_err(|e| match e {
                    fleet::redis::ConnectError::Url { .. } => {
                        anyhow!("{e} (--redis-url or REDIS_URL takes a URL: redis://host:port)")
                    }
                    fleet::redis::ConnectError::Connect { .. } => anyhow!(
                        "{e} (is the fleet's Redis running? --redis-url or REDIS_URL sets its address)"
                    ),
                })?;
            let dlq = fleet::Keys::new(&prefix).dlq();
            match command {
                DlqCommand::List { count } => dlq_list(&client, &dlq, count).await,
                DlqCommand::Replay { ids } => dlq_replay(&client, &dlq, &ids).await,
            }
        }
    }
}

/// `api` as a base URL: `http://` when it has no scheme, no trailing slash.
fn api_base(api: &str) -> String {
    let api = api.trim_end_matches('/');
    if api.contains("://") {
        api.to_owned()
    } else {
        format!("http://{api}")
    }
}

/// An error or failure of the protocol (`{error_type, message, ...}`) as a person reads it.
fn describe(err: &Json) -> String {
    match (err["message"].as_str(), err["error_type"].as_str()) {
        (Some(message), Some(kind)) => format!("{message} ({kind})"),
        (Some(message), None) => message.to_owned(),
        _ => err.to_string(),
    }
}

/// Why the gateway closed the socket, with what to do about it where the code says.
fn closed(frame: Option<CloseFrame>) -> anyhow::Error {
    let Some(frame) = frame else {
        return anyhow!("the gateway closed the connection before the answer");
    };
    let code = u16::from(frame.code);
    let hint = match code {
        1001 => "; the gateway is shutting down",
        1011 => "; the gateway cannot read session storage (Redis)",
        4001 => "; edge-api and ws-gateway must share one FLEET_SECRET",
        4004 => {
            "; edge-api and ws-gateway must share one Redis (REDIS_URL) and key prefix (FLEET_PREFIX)"
        }
        _ => "",
    };
    anyhow!(
        "the gateway closed the connection with code {code}: {}{hint}",
        frame.reason
    )
}

async fn chat(api: &str, agent: &str, message: &str, as_json: bool) -> anyhow::Result<()> {
    let base = api_base(api);
    let response = reqwest::Client::new()
        .post(format!("{base}/api/v1/chat/init"))
        .json(&json!({"agent_id": agent}))
        .send()
        .await
        .with_context(|| {
            format!("cannot reach edge-api at {base} (is the fleet running? --api or FLEET_API_URL sets its address)")
        })?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .with_context(|| format!("reading edge-api's answer from {base}"))?;
    let Ok(init) = serde_json::from_slice::<Json>(&body) else {
        bail!(
            "{base} answered POST /api/v1/chat/init with {status} and no JSON: is it edge-api? \
             (--api or FLEET_API_URL sets edge-api's address)"
        );
    };
    if let Some(err) = init.get("error") {
        bail!("edge-api refused the session ({status}): {}", describe(err));
    }
    let url = init["websocket_url"].as_str().with_context(|| {
        format!("{base} answered {status} without a websocket_url: is it edge-api?")
    })?;
    // The URL carries the session token: not in messages.
    let shown = url.split('?').next().unwrap_or_default();
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .with_context(|| format!("cannot connect to the gateway at {shown}"))?;
    let sent = Instant::now();
    let frame = json!({"message_type": "chat_message", "data": {"message": message}});
    ws.send(WsMessage::text(frame.to_string()))
        .await
        .context("sending the message to the gateway")?;

    let mut task_id: Option<String> = None;
    let mut first_chunk = None;
    let mut chunks = 0;
    // Whether events the answer was made of were trimmed before they reached this client.
    let mut lost = false;
    let mut out = std::io::stdout();
    while let Some(frame) = ws.next().await {
        let text = match frame.context("the connection to the gateway failed")? {
            WsMessage::Text(t) => t.to_string(),
            WsMessage::Close(c) => return Err(closed(c)),
            _ => continue,
        };
        let m: Json = serde_json::from_str(&text)
            .with_context(|| format!("the gateway sent a message that is not JSON: {text}"))?;
        if as_json {
            println!("{text}");
        }
        let mine = task_id.is_some() && m["task_id"].as_str() == task_id.as_deref();
        match m["message_type"].as_str().unwrap_or_default() {
            "task_queued" => task_id = m["data"]["task_id"].as_str().map(str::to_owned),
            "chat_streaming" if mine => {
                first_chunk.get_or_insert_with(|| sent.elapsed());
                chunks += 1;
                if !as_json && !lost {
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
                    // An executor may send the whole answer without streaming it; and the
                    // answer is whole here when streamed parts of it were lost.
                    if chunks == 0 || lost {
                        write!(out, "{}", m["data"]["content"].as_str().unwrap_or_default())?;
                    }
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
            "chat_error" if mine => bail!("the task failed: {}", describe(&m["data"]["error"])),
            "error" if m["data"]["error"]["error_type"] == "events_lost" => {
                if !as_json && !lost && chunks > 0 {
                    println!();
                }
                lost = true;
                eprintln!(
                    "[part of the answer was lost on the way; the whole answer follows at its end]"
                );
            }
            "error" => bail!(
                "the gateway refused the message: {}",
                describe(&m["data"]["error"])
            ),
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

async fn dlq_replay(client: &Client, dlq: &str, ids: &[StreamId]) -> anyhow::Result<()> {
    // Every letter first: a mistyped id replays none rather than those before it.
    let mut letters = Vec::with_capacity(ids.len());
    for id in ids {
        let id = id.to_string();
        let reply: Value = client
            .xrange(dlq, id.as_str(), id.as_str(), Some(1))
            .await?;
        let Some(letter) = parse_entries(reply)?.into_iter().next() else {
            bail!(
                "no dead letter {id} in {dlq}, so none was replayed (`fleetctl dlq list` shows them)"
            );
        };
        letters.push((id, letter));
    }
    for (id, letter) in letters {
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
