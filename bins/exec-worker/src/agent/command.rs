//! Command agents: one program run per deliberation request (`--command`, through `sh -c`).
//!
//! The program reads the request as JSON on stdin (the `agent.request` body: `action`, `role`,
//! `member`, `deliberation_id`, `round`, `description`, `requirements`, `rubric`, `metadata`,
//! `context`, `peers`, `deadline_ms`, ...) and writes its answer on stdout; an optional last line
//! of JSON carries checks or the selection (see [`super::answer`]). A failing program still
//! answers a proposal: its stderr tail, with a failed `dry_run` check, so the round completes
//! and the failure ranks low. A program that prints more than [`OUTPUT_LIMIT`] is killed and
//! fails the same way. It runs in a process group of its own, killed when the request is
//! cancelled or reaches its deadline, and as soon as the program exits (see
//! [`crate::command`]). Subtasks run through the chat executor's command mode.

use std::process::Stdio;

use fleet::deliberation::{Check, Checks};
use fleet::envelope::AgentRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::answer::{self, ProposalAnswer, SelectionAnswer};
use crate::command::{Group, OUTPUT_LIMIT, STDERR_TAIL, read_tail};
use crate::executor::StopWhen;

/// How a run ended.
enum Run {
    Ok(String),
    Failed(String),
    Stopped,
}

async fn run(program: &str, req: &AgentRequest, stop: &StopWhen) -> anyhow::Result<Run> {
    let mut child = match Command::new("sh")
        .arg("-c")
        .arg(program)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Ok(Run::Failed(format!("could not start the command: {e}"))),
    };
    let input = serde_json::to_vec(req)?;
    if let Some(mut stdin) = child.stdin.take() {
        // Written beside the reads below, so that a program that prints before it reads its
        // input cannot deadlock against this.
        tokio::spawn(async move {
            let _ = stdin.write_all(&input).await;
        });
    }
    // One byte past the limit: the proof that the program printed too much.
    let mut stdout = child
        .stdout
        .take()
        .expect("piped stdout")
        .take(OUTPUT_LIMIT as u64 + 1);
    let stderr = child.stderr.take().expect("piped stderr");
    let (group, exited) = Group::watch(child);
    let collect = async {
        let all_of_stdout = async {
            let mut out = Vec::new();
            let _ = stdout.read_to_end(&mut out).await;
            if out.len() > OUTPUT_LIMIT {
                // It would wait on a full stdout pipe for good (holding stderr open too).
                group.kill();
            }
            out
        };
        // Only stderr's tail is kept, however much the program writes there.
        let (out, err) = tokio::join!(all_of_stdout, read_tail(stderr, STDERR_TAIL));
        if out.len() > OUTPUT_LIMIT {
            return (out, err, None);
        }
        let status = exited.await;
        (out, err, Some(status))
    };
    let (out, err, status) = tokio::select! {
        done = collect => done,
        _ = stop.wait() => return Ok(Run::Stopped),
    };
    let Some(status) = status else {
        return Ok(Run::Failed(format!(
            "the command printed more than {OUTPUT_LIMIT} bytes"
        )));
    };
    let out = String::from_utf8_lossy(&out).into_owned();
    match status {
        Ok(Ok(s)) if s.success() => Ok(Run::Ok(out)),
        Ok(Ok(s)) => Ok(Run::Failed(format!(
            "the command exited with {s}: {}",
            String::from_utf8_lossy(&err).trim()
        ))),
        Ok(Err(e)) => Ok(Run::Failed(format!("waiting for the command failed: {e}"))),
        Err(e) => Err(e.into()),
    }
}

pub async fn propose(
    program: &str,
    req: &AgentRequest,
    stop: &StopWhen,
) -> anyhow::Result<Option<ProposalAnswer>> {
    Ok(match run(program, req, stop).await? {
        Run::Ok(out) => Some(answer::parse_proposal(&out)),
        Run::Failed(message) => Some(ProposalAnswer {
            content: message.clone(),
            checks: Checks {
                dry_run: Some(Check::fail(message)),
                ..Default::default()
            },
            self_score: None,
        }),
        Run::Stopped => None,
    })
}

pub async fn select(
    program: &str,
    req: &AgentRequest,
    stop: &StopWhen,
) -> anyhow::Result<Option<SelectionAnswer>> {
    Ok(match run(program, req, stop).await? {
        Run::Ok(out) => answer::parse_selection(&out, req),
        Run::Failed(message) => {
            tracing::warn!(%message, "the architect command failed; the top score will win");
            None
        }
        Run::Stopped => None,
    })
}
