//! Command mode: one program run per task.
//!
//! The program gets the task as JSON on stdin (`session_id`, `task_id`, `attempt`, `agent_id`,
//! `message`, `metadata`, `params`, `deadline_ms`). Each line it prints becomes a chunk; the
//! result is all of its stdout. A non-zero exit status (or a signal, named in the message) is an
//! `exit_status` error carrying the last 4 KiB of stderr. It is killed when the task is cancelled
//! or reaches its deadline.
//!
//! The program runs in a process group of its own ([`Group`]), and the whole group is killed
//! when the task ends: on cancel or deadline, so that what the program started stops with it,
//! and as soon as the program exits, so that a process it left in the background (holding its
//! stdout or stderr open) neither keeps the task from ending nor outlives it.
//!
//! What a program prints is bounded, so that one run cannot take the executor's memory: stderr
//! is read to its end but only its tail is kept; a stdout line longer than [`LINE_LIMIT`] or a
//! stdout longer than [`OUTPUT_LIMIT`] kills the program and ends the task with an
//! `output_too_large` error (the chunks sent until then stay sent).

use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fleet::envelope::ExecRequest;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use crate::executor::{Emitter, Ending, StopWhen};

/// Bytes of stderr kept for the error.
pub(crate) const STDERR_TAIL: usize = 4096;

/// Bytes of stdout a run may print: the result holds all of it (the same bound as command
/// agents' output).
pub(crate) const OUTPUT_LIMIT: usize = 1 << 20;

/// Bytes of one stdout line, its newline excluded: each line is a chunk, one stream entry and
/// one client event.
const LINE_LIMIT: usize = 64 * 1024;

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
        .process_group(0)
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
        // Written beside the reads below: a program that prints before it reads its input would
        // otherwise wait on a full stdout pipe while this waits on a full stdin pipe. A program
        // that does not read its input may close stdin early: that is its business.
        tokio::spawn(async move {
            let _ = stdin.write_all(&input).await;
        });
    }
    let stderr = child.stderr.take().expect("piped stderr");
    let mut stderr_task = tokio::spawn(async move {
        String::from_utf8_lossy(&read_tail(stderr, STDERR_TAIL).await).into_owned()
    });
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let (group, mut exited) = Group::watch(child);
    let mut output = String::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        // One byte past the limit (the newline, or the proof that the line is too long).
        let mut limited = (&mut stdout).take(LINE_LIMIT as u64 + 1);
        let read = tokio::select! {
            read = limited.read_until(b'\n', &mut line) => read?,
            _ = stop.wait() => {
                group.kill();
                return Ok(Ending::Stopped);
            }
        };
        if read == 0 {
            break;
        }
        let ended = line.last() == Some(&b'\n');
        if ended {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        let chunk = format!("{}\n", String::from_utf8_lossy(&line));
        let too_large = if !ended && line.len() > LINE_LIMIT {
            Some(format!(
                "the command printed a line longer than {LINE_LIMIT} bytes"
            ))
        } else if output.len() + chunk.len() > OUTPUT_LIMIT {
            Some(format!(
                "the command printed more than {OUTPUT_LIMIT} bytes"
            ))
        } else {
            None
        };
        if let Some(message) = too_large {
            group.kill();
            stderr_task.abort();
            return Ok(Ending::Error(
                "output_too_large".into(),
                message,
                json!({"line_limit": LINE_LIMIT, "output_limit": OUTPUT_LIMIT}),
            ));
        }
        output.push_str(&chunk);
        emit.chunk(&chunk).await?;
    }
    let status = tokio::select! {
        status = &mut exited => status??,
        _ = stop.wait() => {
            group.kill();
            return Ok(Ending::Stopped);
        }
    };
    // Prompt: the group was killed when the program exited, so nothing holds stderr open
    // (unless a process left the group).
    let stderr_tail = tokio::select! {
        tail = &mut stderr_task => tail.unwrap_or_default(),
        _ = stop.wait() => {
            stderr_task.abort();
            return Ok(Ending::Stopped);
        }
    };
    if status.success() {
        Ok(Ending::Result(output))
    } else {
        let (code, signal) = (status.code(), status.signal());
        Ok(Ending::Error(
            "exit_status".into(),
            match (code, signal) {
                (Some(c), _) => format!("the command exited with status {c}"),
                (None, Some(s)) => format!("the command was killed by signal {s}"),
                (None, None) => "the command was killed by a signal".into(),
            },
            json!({"exit_code": code, "signal": signal, "stderr_tail": stderr_tail}),
        ))
    }
}

/// The process group of a program started with `process_group(0)` (its id is the program's
/// pid). Dropping it kills the group unless the program has exited (whereupon the group was
/// killed already), so a run abandoned half-way (a shutdown past its grace period) leaves
/// nothing behind either.
pub(crate) struct Group {
    pid: Option<rustix::process::Pid>,
    exited: Arc<AtomicBool>,
}

/// The program's exit status, once it exits.
pub(crate) type Exited = tokio::task::JoinHandle<std::io::Result<std::process::ExitStatus>>;

impl Group {
    /// Waits for `child` in a task of its own, which kills the group as soon as the program
    /// exits: what it left running in the background is stopped, and its pipes close. Answers
    /// the group and the program's exit status.
    pub(crate) fn watch(mut child: tokio::process::Child) -> (Group, Exited) {
        let pid = child
            .id()
            .and_then(|pid| rustix::process::Pid::from_raw(pid as i32));
        let exited = Arc::new(AtomicBool::new(false));
        let flag = exited.clone();
        let status = tokio::spawn(async move {
            let status = child.wait().await;
            kill_group(pid);
            flag.store(true, Ordering::Release);
            status
        });
        (Group { pid, exited }, status)
    }

    /// Kills every process of the group, unless the program has exited (and the group with it).
    pub(crate) fn kill(&self) {
        if !self.exited.load(Ordering::Acquire) {
            kill_group(self.pid);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

fn kill_group(pid: Option<rustix::process::Pid>) {
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// Reads `r` to its end and answers its last `keep` bytes, holding no more than that.
pub(crate) async fn read_tail(mut r: impl AsyncRead + Unpin, keep: usize) -> Vec<u8> {
    let mut tail = VecDeque::with_capacity(keep);
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let read = &buf[n.saturating_sub(keep)..n];
        let over = (tail.len() + read.len()).saturating_sub(keep);
        tail.drain(..over);
        tail.extend(read);
    }
    tail.into()
}
