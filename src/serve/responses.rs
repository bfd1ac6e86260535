//! OpenAI response bodies: whole answers, stream chunks, usage and log-probabilities.

use super::scheduler::{Finish, Usage};
use crate::generate::TokenLogprobs;
use crate::tokenizer::Tokenizer;
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// What every chunk and the whole answer of one request share.
pub struct Answer {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub tokenizer: Arc<Tokenizer>,
    /// Whether logprobs were asked for (so `logprobs` is an object, not null).
    pub logprobs: bool,
}

pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

impl Answer {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    /// Log-probabilities in the endpoint's format (chat: `content` entries; completions: the
    /// legacy parallel lists). `text` is the text these tokens produced (for offsets).
    pub fn logprobs_json(&self, lps: &[TokenLogprobs], _text: &str) -> Option<Value> {
        if !self.logprobs {
            return None;
        }
        match self.kind {
            Kind::Chat => {
                let entry = |id: u32, lp: f32| {
                    let t = self.token_text(id);
                    json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
                };
                let content: Vec<Value> = lps
                    .iter()
                    .map(|l| {
                        let mut e = entry(l.token, l.logprob);
                        e["top_logprobs"] =
                            l.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
                        e
                    })
                    .collect();
                Some(json!({"content": content}))
            }
            Kind::Completion => {
                let tokens: Vec<String> = lps.iter().map(|l| self.token_text(l.token)).collect();
                let mut offset = 0;
                let offsets: Vec<usize> = tokens
                    .iter()
                    .map(|t| {
                        let o = offset;
                        offset += t.len();
                        o
                    })
                    .collect();
                let top: Vec<Value> = lps
                    .iter()
                    .map(|l| {
                        let m: serde_json::Map<String, Value> = l
                            .top
                            .iter()
                            .map(|&(id, lp)| (self.token_text(id), json!(lp)))
                            .collect();
                        Value::Object(m)
                    })
                    .collect();
                Some(json!({
                    "tokens": tokens,
                    "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
                    "top_logprobs": top,
                    "text_offset": offsets,
                }))
            }
        }
    }

    /// One stream chunk. Chat: `role` only in the first; `finish` only in the last, with an
    /// empty delta. With `include_usage` every chunk carries `"usage": null` as OpenAI's do.
    pub fn chunk(
        &self,
        role: Option<&str>,
        text: &str,
        logprobs: Option<Value>,
        finish: Option<Finish>,
        include_usage: bool,
    ) -> Value {
        let finish_reason = finish.map(Finish::as_str);
        let choice = match self.kind {
            Kind::Chat => {
                let delta = match (role, finish) {
                    (Some(r), _) => json!({"role": r, "content": text}),
                    (None, Some(_)) => json!({}),
                    (None, None) => json!({"content": text}),
                };
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})
            }
            Kind::Completion => {
                json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason})
            }
        };
        let mut v = json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [choice],
        });
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The chunk after the last one when `stream_options.include_usage` is set: no choices.
    pub fn usage_chunk(&self, usage: &Usage) -> Value {
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [],
            "usage": usage_json(usage),
        })
    }

    /// A whole (non-streamed) answer.
    pub fn whole(&self, text: &str, lps: &[TokenLogprobs], finish: Finish, usage: &Usage) -> Value {
        let logprobs = self.logprobs_json(lps, text);
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": logprobs,
                "finish_reason": finish.as_str(),
            }),
            Kind::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish.as_str(),
            }),
        };
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [choice],
            "usage": usage_json(usage),
        })
    }
}
