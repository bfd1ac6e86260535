//! The HTTP routes. Every error is `{"error": {...}}` with a 4xx/5xx status; nothing a client
//! sends can stop the server.

use super::api::{self, ApiError, ApiResult, Options, Prompt};
use super::metrics::Metrics;
use super::responses::{Answer, Kind};
use super::scheduler::{Event, Request};
use super::sse::SseStream;
use super::Loaded;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// Largest request body: ample for any prompt a context holds (1 MiB ≈ 250k tokens of text).
pub const MAX_BODY: usize = 1 << 20;

pub struct AppState {
    pub model_id: String,
    pub api_key: Option<String>,
    /// Set once the engine thread has loaded the model.
    pub loaded: OnceLock<Loaded>,
    pub queue: SyncSender<Request>,
    pub metrics: Arc<Metrics>,
}

type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such route; see /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics, /tokenize, /detokenize",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "this route does not take that method")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn new_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!("{prefix}-{t:x}{n:x}")
}

/// Checks `Authorization: Bearer KEY` when the server has a key.
fn authorize(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let Some(key) = &state.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if g.trim() == key => Ok(()),
        Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid API key").with_code("invalid_api_key")),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing API key: send the header Authorization: Bearer KEY",
        )
        .with_code("invalid_api_key")),
    }
}

fn loaded(state: &AppState) -> ApiResult<&Loaded> {
    state.loaded.get().ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the model is still loading; retry shortly")
    })
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    body.map_err(|r| {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(status, format!("the body is larger than the limit of {MAX_BODY} bytes"))
        } else {
            ApiError::new(status, format!("the body could not be read: {r}"))
        }
    })
}

/// Counts the failure in the metrics (429s are counted where they happen).
fn counted(state: &AppState, r: ApiResult<Response>) -> Response {
    match r {
        Ok(resp) => resp,
        Err(e) => {
            if e.status != StatusCode::TOO_MANY_REQUESTS {
                state.metrics.errors.fetch_add(1, Ordering::Relaxed);
            }
            e.into_response()
        }
    }
}

async fn health(State(state): State<Shared>) -> Response {
    match state.loaded.get() {
        Some(_) => Json(json!({"status": "ok"})).into_response(),
        None => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "loading the model").into_response(),
    }
}

async fn metrics(State(state): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn models(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let r = authorize(&state, &headers).map(|_| {
        Json(json!({"object": "list", "data": [{
            "id": state.model_id, "object": "model", "created": 0, "owned_by": "q4wgpu",
        }]}))
        .into_response()
    });
    counted(&state, r)
}

async fn chat(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = chat_inner(&state, &headers, body).await;
    counted(&state, r)
}

async fn chat_inner(
    state: &Shared,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    authorize(state, headers)?;
    let loaded = loaded(state)?;
    let m = api::parse_object(&body_bytes(body)?)?;
    api::check_model(&m, &state.model_id)?;
    let req = api::chat_request(&m)?;
    let text = loaded
        .tokenizer
        .apply_chat_template(&req.messages, true)
        .map_err(|e| ApiError::bad(format!("the chat template refused the messages: {e}")))?;
    let ids = loaded
        .tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::bad(e.to_string()))?;
    submit(state, loaded, Kind::Chat, ids, req.options).await
}

async fn completions(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = completions_inner(&state, &headers, body).await;
    counted(&state, r)
}

async fn completions_inner(
    state: &Shared,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    authorize(state, headers)?;
    let loaded = loaded(state)?;
    let m = api::parse_object(&body_bytes(body)?)?;
    api::check_model(&m, &state.model_id)?;
    let req = api::completion_request(&m)?;
    let tok = &loaded.tokenizer;
    let ids = match req.prompt {
        Prompt::Text(text) => tok
            .encode(&text, tok.add_bos())
            .map_err(|e| ApiError::bad(e.to_string()))?,
        Prompt::Tokens(ids) => {
            check_ids(&ids, tok.vocab_size())?;
            ids
        }
    };
    submit(state, loaded, Kind::Completion, ids, req.options).await
}

fn check_ids(ids: &[u32], vocab: usize) -> ApiResult<()> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => Err(ApiError::bad(format!(
            "token id {id} is outside the vocabulary (0..{vocab})"
        ))),
        None => Ok(()),
    }
}

/// Checks the lengths against the context, queues the request (429 when the queue is full) and
/// answers: an SSE stream, or the whole answer once done.
async fn submit(
    state: &Shared,
    loaded: &Loaded,
    kind: Kind,
    prompt: Vec<u32>,
    options: Options,
) -> ApiResult<Response> {
    let ctx = loaded.ctx;
    if prompt.is_empty() {
        return Err(ApiError::bad("the prompt is empty"));
    }
    let too_long = |asked: usize| {
        ApiError::bad(format!(
            "this model's context holds {ctx} tokens (--ctx-size); the request needs {} ({} in the prompt, {asked} to generate)",
            prompt.len() + asked,
            prompt.len()
        ))
        .with_code("context_length_exceeded")
    };
    if prompt.len() >= ctx {
        return Err(too_long(1));
    }
    let max_tokens = match options.max_tokens {
        Some(n) if prompt.len() + n > ctx => return Err(too_long(n)),
        Some(n) => n,
        None => ctx - prompt.len(),
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let request = Request {
        prompt,
        max_tokens,
        sampling: options.sampling.clone(),
        stop: options.stop.clone(),
        logprobs: options.logprobs,
        ignore_eos: options.ignore_eos,
        events: tx,
    };
    let metrics = &state.metrics;
    metrics.queued.fetch_add(1, Ordering::Relaxed);
    match state.queue.try_send(request) {
        Ok(()) => {}
        Err(e) => {
            metrics.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(match e {
                TrySendError::Full(_) => {
                    metrics.rejected.fetch_add(1, Ordering::Relaxed);
                    ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "every slot is busy and the queue is full (--parallel, --queue); retry later",
                    )
                }
                TrySendError::Disconnected(_) => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the engine has stopped",
                ),
            });
        }
    }
    let answer = Answer {
        kind,
        id: new_id(if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }),
        created: unix_now(),
        model: state.model_id.clone(),
        tokenizer: loaded.tokenizer.clone(),
        logprobs: options.logprobs.is_some(),
    };
    if options.stream {
        let stream = SseStream::new(rx, answer, options.include_usage);
        return Ok((
            [
                (header::CONTENT_TYPE, "text/event-stream"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            Body::from_stream(stream),
        )
            .into_response());
    }
    whole_answer(rx, answer).await
}

async fn whole_answer(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    answer: Answer,
) -> ApiResult<Response> {
    let mut text = String::new();
    let mut lps = Vec::new();
    loop {
        match rx.recv().await {
            Some(Event::Text { text: t, logprobs }) => {
                text.push_str(&t);
                lps.extend(logprobs);
            }
            Some(Event::Done { finish, usage }) => {
                return Ok(Json(answer.whole(&text, &lps, finish, &usage)).into_response())
            }
            Some(Event::Error(e)) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the engine stopped before the answer was complete",
                ))
            }
        }
    }
}

async fn tokenize(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = (|| {
        authorize(&state, &headers)?;
        let loaded = loaded(&state)?;
        let m = api::parse_object(&body_bytes(body)?)?;
        let content = m
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad("tokenize needs content: a string"))?;
        let add_special = match m.get("add_special") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(ApiError::bad(format!("add_special must be true or false, got {v}"))),
        };
        let tok = &loaded.tokenizer;
        let ids = tok
            .encode(content, add_special && tok.add_bos())
            .map_err(|e| ApiError::bad(e.to_string()))?;
        Ok(Json(json!({"tokens": ids})).into_response())
    })();
    counted(&state, r)
}

async fn detokenize(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = (|| {
        authorize(&state, &headers)?;
        let loaded = loaded(&state)?;
        let m = api::parse_object(&body_bytes(body)?)?;
        let ids = m
            .get("tokens")
            .and_then(Value::as_array)
            .and_then(|a| api::token_ids(a))
            .ok_or_else(|| ApiError::bad("detokenize needs tokens: a list of token ids"))?;
        check_ids(&ids, loaded.tokenizer.vocab_size())?;
        let content = loaded
            .tokenizer
            .decode(&ids, false)
            .map_err(|e| ApiError::bad(e.to_string()))?;
        Ok(Json(json!({"content": content})).into_response())
    })();
    counted(&state, r)
}
