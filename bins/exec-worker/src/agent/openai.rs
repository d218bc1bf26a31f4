//! OpenAI-compatible agents: each request is one streamed chat completion
//! (`POST <base>/v1/chat/completions` with `"stream": true`, server-sent events of
//! `choices[0].delta.content`, ended by `data: [DONE]`), as vLLM, Ollama, llama.cpp's server and
//! OpenAI itself speak it. A server that answers plain JSON (no stream) is read too. A reply
//! without the answer (an error object, JSON that does not parse, an `error` event mid-stream)
//! fails the request with what the server said, rather than answering with nothing or with what
//! streamed until then.
//!
//! Base URL, model and key come from `FLEET_OPENAI_BASE_URL`, `FLEET_OPENAI_MODEL` and
//! `FLEET_OPENAI_API_KEY` (sent as `Authorization: Bearer`). The prompts are in
//! [`super::answer`]. Subtask answers stream to the client chunk by chunk. The workspace's
//! reqwest is built without TLS: use `http://` endpoints (local model servers), or enable a
//! reqwest TLS feature for `https://`.

use fleet::deliberation::{Check, Checks};
use fleet::envelope::AgentRequest;
use futures::StreamExt;
use serde_json::{Value as Json, json};

use super::answer::{self, ProposalAnswer, SelectionAnswer};
use crate::executor::{Emitter, Ending, StopWhen};

/// Longest error body quoted in a failure.
const ERROR_BODY_LIMIT: usize = 512;

/// A chat completions client.
pub struct OpenAiClient {
    http: reqwest::Client,
    url: String,
    model: String,
    api_key: Option<String>,
}

/// How a completion ended.
pub enum Completion {
    Text(String),
    Failed(String),
    Stopped,
}

/// `<base>/v1/chat/completions`, whether or not `base` ends in `/v1`.
pub fn completions_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/v1") {
        format!("{base}/chat/completions")
    } else {
        format!("{base}/v1/chat/completions")
    }
}

impl OpenAiClient {
    pub fn new(base_url: &str, model: &str, api_key: Option<String>) -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder().build()?,
            url: completions_url(base_url),
            model: model.to_owned(),
            api_key: api_key.filter(|k| !k.is_empty()),
        })
    }

    /// Runs one completion for `req`; with `emit`, streams each delta as a chunk.
    pub async fn complete(
        &self,
        req: &AgentRequest,
        stop: &StopWhen,
        mut emit: Option<&mut Emitter<'_>>,
    ) -> anyhow::Result<Completion> {
        let body = json!({
            "model": self.model,
            "stream": true,
            "messages": [
                {"role": "system", "content": answer::system_prompt(req)},
                {"role": "user", "content": answer::user_prompt(req)},
            ],
        });
        let mut request = self.http.post(&self.url).json(&body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = tokio::select! {
            r = request.send() => r,
            _ = stop.wait() => return Ok(Completion::Stopped),
        };
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                return Ok(Completion::Failed(format!(
                    "cannot reach {}: {e}",
                    self.url
                )));
            }
        };
        let status = response.status();
        if !status.is_success() {
            let text = tokio::select! {
                t = response.text() => t.unwrap_or_default(),
                _ = stop.wait() => return Ok(Completion::Stopped),
            };
            let text: String = text.chars().take(ERROR_BODY_LIMIT).collect();
            return Ok(Completion::Failed(format!(
                "{} answered {status}: {text}",
                self.url
            )));
        }
        let is_json = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if is_json {
            let v: Json = match tokio::select! {
                v = response.json() => v,
                _ = stop.wait() => return Ok(Completion::Stopped),
            } {
                Ok(v) => v,
                Err(e) => {
                    return Ok(Completion::Failed(format!(
                        "{} answered JSON that does not parse: {e}",
                        self.url
                    )));
                }
            };
            // A reply without the answer (an error object, no choices) is a failure, not an
            // empty answer.
            let Some(text) = v["choices"][0]["message"]["content"].as_str() else {
                return Ok(Completion::Failed(format!(
                    "{} answered without choices[0].message.content: {}",
                    self.url,
                    reply_error(&v)
                )));
            };
            let text = text.to_owned();
            if let Some(e) = emit.as_mut() {
                e.chunk(&text).await?;
            }
            return Ok(Completion::Text(text));
        }
        let mut stream = response.bytes_stream();
        let mut pending: Vec<u8> = Vec::new();
        let mut text = String::new();
        loop {
            let next = tokio::select! {
                n = stream.next() => n,
                _ = stop.wait() => return Ok(Completion::Stopped),
            };
            let Some(bytes) = next else { break };
            let bytes = match bytes {
                Ok(b) => b,
                Err(e) => return Ok(Completion::Failed(format!("the stream broke: {e}"))),
            };
            pending.extend_from_slice(&bytes);
            while let Some(at) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=at).collect();
                let line = String::from_utf8_lossy(&line);
                let Some(data) = line.trim().strip_prefix("data:") else {
                    continue;
                };
                let data = data.trim();
                if data == "[DONE]" {
                    return Ok(Completion::Text(text));
                }
                let Ok(event) = serde_json::from_str::<Json>(data) else {
                    continue;
                };
                // A server that fails mid-stream sends an error event: what streamed so far is
                // not the answer.
                if event.get("error").is_some_and(|e| !e.is_null()) {
                    return Ok(Completion::Failed(format!(
                        "{} failed while streaming: {}",
                        self.url,
                        reply_error(&event)
                    )));
                }
                if let Some(delta) = event["choices"][0]["delta"]["content"].as_str()
                    && !delta.is_empty()
                {
                    text.push_str(delta);
                    if let Some(e) = emit.as_mut() {
                        e.chunk(delta).await?;
                    }
                }
            }
        }
        Ok(Completion::Text(text))
    }

    pub async fn propose(
        &self,
        req: &AgentRequest,
        stop: &StopWhen,
    ) -> anyhow::Result<Option<ProposalAnswer>> {
        Ok(match self.complete(req, stop, None).await? {
            Completion::Text(t) => Some(answer::parse_proposal(&t)),
            Completion::Failed(message) => {
                tracing::warn!(%message, "completion failed");
                Some(ProposalAnswer {
                    content: message.clone(),
                    checks: Checks {
                        dry_run: Some(Check::fail(message)),
                        ..Default::default()
                    },
                    self_score: None,
                })
            }
            Completion::Stopped => None,
        })
    }

    pub async fn select(
        &self,
        req: &AgentRequest,
        stop: &StopWhen,
    ) -> anyhow::Result<Option<SelectionAnswer>> {
        Ok(match self.complete(req, stop, None).await? {
            Completion::Text(t) => answer::parse_selection(&t, req),
            Completion::Failed(message) => {
                tracing::warn!(%message, "architect completion failed; the top score will win");
                None
            }
            Completion::Stopped => None,
        })
    }

    pub async fn subtask(
        &self,
        req: &AgentRequest,
        emit: &mut Emitter<'_>,
        stop: &StopWhen,
    ) -> anyhow::Result<Ending> {
        Ok(match self.complete(req, stop, Some(emit)).await? {
            Completion::Text(t) => Ending::Result(t),
            Completion::Failed(message) => {
                Ending::Error("completion_failed".into(), message, Json::Null)
            }
            Completion::Stopped => Ending::Stopped,
        })
    }
}

/// What an OpenAI-style reply says went wrong: `error.message` (or `error` itself, or
/// `message`), else the reply, cut to [`ERROR_BODY_LIMIT`] characters.
fn reply_error(v: &Json) -> String {
    let said = v["error"]["message"]
        .as_str()
        .or_else(|| v["error"].as_str())
        .or_else(|| v["message"].as_str())
        .map_or_else(|| v.to_string(), str::to_owned);
    said.chars().take(ERROR_BODY_LIMIT).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn completion_urls_take_bases_with_or_without_v1() {
        for base in [
            "http://h:8000",
            "http://h:8000/",
            "http://h:8000/v1",
            "http://h:8000/v1/",
        ] {
            assert_eq!(
                super::completions_url(base),
                "http://h:8000/v1/chat/completions"
            );
        }
    }
}
