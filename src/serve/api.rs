//! OpenAI request bodies, checked field by field so a bad request gets a message that names the
//! field and what it must be. Fields OpenAI defines that q4wgpu does not implement are refused
//! when they would change the answer (tools, n > 1, json response formats), except
//! `frequency_penalty` and `presence_penalty`, which are checked and ignored (README says so).

use crate::sampling::SamplingParams;
use crate::tokenizer::ChatMessage;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

/// An error answer: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub code: Option<&'static str>,
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            code: None,
            param: None,
        }
    }

    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    fn param(field: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(field.to_string()),
            ..ApiError::bad(message)
        }
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

/// What both endpoints share.
#[derive(Clone, Debug)]
pub struct Options {
    /// `max_tokens` / `max_completion_tokens`; `None`: up to the context's end.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    /// Generate past the end-of-sequence token (vLLM's `ignore_eos`; for benchmarks and tests).
    pub ignore_eos: bool,
}

/// Most alternatives `top_logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

pub struct CompletionRequest {
    pub prompt: Prompt,
    pub options: Options,
}

pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub options: Options,
}

/// Parses a body as a JSON object (invalid UTF-8 and malformed JSON are 400s).
pub fn parse_object(body: &[u8]) -> ApiResult<Map<String, Value>> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("the body is not valid JSON: {e}")))?;
    match value {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::bad(format!(
            "the body must be a JSON object, got {}",
            type_name(&other)
        ))),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A field that is present and not null.
fn field<'a>(m: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    m.get(name).filter(|v| !v.is_null())
}

fn number(m: &Map<String, Value>, name: &str, lo: f64, hi: f64) -> ApiResult<Option<f64>> {
    match field(m, name) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
            _ => Err(ApiError::param(
                name,
                format!("{name} must be a number from {lo} to {hi}, got {v}"),
            )),
        },
    }
}

fn integer(m: &Map<String, Value>, name: &str, lo: u64, hi: u64) -> ApiResult<Option<u64>> {
    match field(m, name) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
            _ => Err(ApiError::param(
                name,
                format!("{name} must be an integer from {lo} to {hi}, got {v}"),
            )),
        },
    }
}

fn boolean(m: &Map<String, Value>, name: &str) -> ApiResult<bool> {
    match field(m, name) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::param(
            name,
            format!("{name} must be true or false, got {v}"),
        )),
    }
}

/// Checks `model` against the one served (absent is accepted, as llama-server does).
pub fn check_model(m: &Map<String, Value>, served: &str) -> ApiResult<()> {
    match field(m, "model") {
        None => Ok(()),
        Some(Value::String(name)) if name == served => Ok(()),
        Some(Value::String(name)) => Err(ApiError {
            param: Some("model".into()),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                format!("the model {name:?} does not exist; this server serves {served:?} (GET /v1/models)"),
            )
            .with_code("model_not_found")
        }),
        Some(v) => Err(ApiError::param("model", format!("model must be a string, got {v}"))),
    }
}

/// The fields both endpoints share; `chat` selects how `logprobs` is given.
fn options(m: &Map<String, Value>, chat: bool) -> ApiResult<Options> {
    if let Some(n) = integer(m, "n", 0, u64::MAX)? {
        if n != 1 {
            return Err(ApiError::param("n", format!("n must be 1 (one choice per request), got {n}")));
        }
    }
    for name in ["tools", "functions"] {
        if field(m, name).is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
            return Err(ApiError::param(name, format!("{name} are not supported by this server")));
        }
    }
    if let Some(rf) = field(m, "response_format") {
        if rf.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::param(
                "response_format",
                "only response_format {\"type\": \"text\"} is supported",
            ));
        }
    }
    // Checked so a wrong value is still an error, then ignored (README: not implemented).
    number(m, "frequency_penalty", -2.0, 2.0)?;
    number(m, "presence_penalty", -2.0, 2.0)?;

    let max_tokens = match (
        integer(m, "max_completion_tokens", 1, u32::MAX as u64)?,
        integer(m, "max_tokens", 1, u32::MAX as u64)?,
    ) {
        (Some(a), _) | (None, Some(a)) => Some(a as usize),
        (None, None) => None,
    };
    let seed = match field(m, "seed") {
        None => 0,
        Some(v) => match (v.as_u64(), v.as_i64()) {
            (Some(u), _) => u,
            (None, Some(i)) => i as u64,
            _ => return Err(ApiError::param("seed", format!("seed must be an integer, got {v}"))),
        },
    };
    let sampling = SamplingParams {
        temperature: number(m, "temperature", 0.0, 2.0)?.unwrap_or(1.0) as f32,
        top_p: number(m, "top_p", 0.0, 1.0)?.unwrap_or(1.0) as f32,
        // Not OpenAI's, but llama-server's and vLLM's: 0 = off.
        top_k: integer(m, "top_k", 0, u32::MAX as u64)?.unwrap_or(0) as usize,
        // llama-server's and vLLM's: 0 = off.
        min_p: number(m, "min_p", 0.0, 1.0)?.unwrap_or(0.0) as f32,
        repeat_penalty: number(m, "repeat_penalty", 0.01, 10.0)?.unwrap_or(1.0) as f32,
        repeat_last_n: 64,
        seed,
    };
    if sampling.top_p == 0.0 {
        return Err(ApiError::param("top_p", "top_p must be above 0"));
    }
    let stop = match field(m, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() <= 16 => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::param("stop", "stop must be a string or a list of strings"))?,
        Some(v) => {
            return Err(ApiError::param(
                "stop",
                format!("stop must be a string or a list of up to 16 strings, got {v}"),
            ))
        }
    };
    let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
    let logprobs = if chat {
        let top = integer(m, "top_logprobs", 0, MAX_TOP_LOGPROBS as u64)?;
        match (boolean(m, "logprobs")?, top) {
            (true, top) => Some(top.unwrap_or(0) as usize),
            (false, Some(_)) => {
                return Err(ApiError::param("top_logprobs", "top_logprobs needs logprobs: true"))
            }
            (false, None) => None,
        }
    } else {
        integer(m, "logprobs", 0, MAX_TOP_LOGPROBS as u64)?.map(|n| n as usize)
    };
    let stream = boolean(m, "stream")?;
    let include_usage = match field(m, "stream_options") {
        None => false,
        Some(Value::Object(o)) => boolean(o, "include_usage")?,
        Some(v) => {
            return Err(ApiError::param(
                "stream_options",
                format!("stream_options must be an object, got {v}"),
            ))
        }
    };
    Ok(Options {
        ignore_eos: boolean(m, "ignore_eos")?,
        max_tokens,
        sampling,
        stop,
        logprobs,
        stream,
        include_usage,
    })
}

pub fn chat_request(m: &Map<String, Value>) -> ApiResult<ChatRequest> {
    let items = match field(m, "messages") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(Value::Array(_)) => {
            return Err(ApiError::param("messages", "messages must not be empty"))
        }
        None => return Err(ApiError::param("messages", "messages is required")),
        Some(v) => {
            return Err(ApiError::param(
                "messages",
                format!("messages must be an array of messages, got {}", type_name(v)),
            ))
        }
    };
    let messages = items
        .iter()
        .enumerate()
        .map(|(i, v)| message(i, v))
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(ChatRequest {
        messages,
        options: options(m, true)?,
    })
}

/// One message: a role and content as a string or a list of text parts.
fn message(i: usize, v: &Value) -> ApiResult<ChatMessage> {
    let param = format!("messages[{i}]");
    let role = v
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::param(&param, format!("{param} needs a string role")))?;
    if !["system", "developer", "user", "assistant", "tool"].contains(&role) {
        return Err(ApiError::param(
            &param,
            format!("{param}: unknown role {role:?} (system, developer, user, assistant or tool)"),
        ));
    }
    let content = match v.get("content") {
        None | Some(Value::Null) if role == "assistant" => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        return Err(ApiError::param(
                            &param,
                            format!("{param}: only text content parts are supported"),
                        ))
                    }
                }
            }
            text
        }
        _ => {
            return Err(ApiError::param(
                &param,
                format!("{param} needs content: a string or a list of text parts"),
            ))
        }
    };
    // Templates know "system"; "developer" is OpenAI's newer name for it.
    let role = if role == "developer" { "system" } else { role };
    Ok(ChatMessage::new(role, content))
}

pub fn completion_request(m: &Map<String, Value>) -> ApiResult<CompletionRequest> {
    let bad = || {
        ApiError::param(
            "prompt",
            "prompt must be a string, a list of one string, or a list of token ids",
        )
    };
    let prompt = match field(m, "prompt") {
        None => return Err(ApiError::param("prompt", "prompt is required")),
        Some(Value::String(s)) => Prompt::Text(s.clone()),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => Prompt::Text(s.clone()),
            [Value::Array(ids)] => Prompt::Tokens(token_ids(ids).ok_or_else(bad)?),
            ids if !ids.is_empty() && ids.iter().all(Value::is_number) => {
                Prompt::Tokens(token_ids(ids).ok_or_else(bad)?)
            }
            _ => return Err(bad()),
        },
        Some(_) => return Err(bad()),
    };
    if field(m, "suffix").is_some() {
        return Err(ApiError::param("suffix", "suffix is not supported"));
    }
    if boolean(m, "echo")? {
        return Err(ApiError::param("echo", "echo is not supported"));
    }
    Ok(CompletionRequest {
        prompt,
        options: options(m, false)?,
    })
}

pub fn token_ids(items: &[Value]) -> Option<Vec<u32>> {
    items
        .iter()
        .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
        .collect()
}
