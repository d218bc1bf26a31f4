//! Command mode: one program run per task.
//!
//! The program gets the task as JSON on stdin (`session_id`, `task_id`, `attempt`, `agent_id`,
//! `message`, `metadata`, `params`, `deadline_ms`). Each line it prints becomes a chunk; the
//! result is all of its stdout. A non-zero exit status is an `exit_status` error carrying the
//! last 4 KiB of stderr. It is killed when the task is cancelled or reaches its deadline.

use std::process::Stdio;

use fleet::envelope::ExecRequest;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use crate::executor::{Emitter, Ending, StopWhen};

/// Bytes of stderr kept for the error.
const STDERR_TAIL: usize = 4096;

pub async fn run(
    program: &str,
    req: &ExecRequest,
    emit: &mut Emitter<'_>,
    stop: &StopWhen,
) -> anyhow::Result<Ending> {
    let spawned = Command::new("sh")
        .arg("-c")
        .arg(program)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            return Ok(Ending::Error(
                "spawn_failed".into(),
                format!("could not start the command: {e}"),
                json!({"command": program}),
            ));
        }
    };
    let input = serde_json::to_vec(&json!({
        "session_id": req.session_id,
        "task_id": req.task_id,
        "attempt": req.attempt,
        "agent_id": req.agent_id,
        "message": req.message,
        "metadata": req.metadata,
        "params": req.params,
        "deadline_ms": req.deadline_ms,
    }))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A program that does not read its input may close stdin early: that is its business.
        let _ = stdin.write_all(&input).await;
        drop(stdin);
    }
    let mut stderr = child.stderr.take().expect("piped stderr");
    let stderr_task = tokio::spawn(async move {
        let mut all = Vec::new();
        let _ = stderr.read_to_end(&mut all).await;
        let start = all.len().saturating_sub(STDERR_TAIL);
        String::from_utf8_lossy(&all[start..]).into_owned()
    });
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let mut output = String::new();
    loop {
        let line = tokio::select! {
            line = lines.next_line() => line?,
            _ = stop.wait() => {
                let _ = child.kill().await;
                return Ok(Ending::Stopped);
            }
        };
        let Some(line) = line else { break };
        let chunk = format!("{line}\n");
        output.push_str(&chunk);
        emit.chunk(&chunk).await?;
    }
    let status = tokio::select! {
        status = child.wait() => status?,
        _ = stop.wait() => {
            let _ = child.kill().await;
            return Ok(Ending::Stopped);
        }
    };
    let stderr_tail = stderr_task.await.unwrap_or_default();
    if status.success() {
        Ok(Ending::Result(output))
    } else {
        let code = status.code();
        Ok(Ending::Error(
            "exit_status".into(),
            match code {
                Some(c) => format!("the command exited with status {c}"),
                None => "the command was killed by a signal".into(),
            },
            json!({"exit_code": code, "stderr_tail": stderr_tail}),
        ))
    }
}
