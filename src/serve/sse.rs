//! Streaming answers as OpenAI sends them: Server-Sent Events, each `data: {json}\n\n`; for chat a
//! first chunk with `delta.role`, content deltas, a last chunk with an empty delta and
//! `finish_reason`, a usage chunk when asked, then `data: [DONE]`.

use super::responses::{Answer, Kind};
use super::scheduler::Event;
use axum::body::Bytes;
use serde_json::Value;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::Stream;

/// The SSE body of one streamed answer. Dropped when the client disconnects, which drops the
/// event receiver, which the engine sees before its next step.
pub struct SseStream {
    events: UnboundedReceiver<Event>,
    answer: Answer,
    include_usage: bool,
    out: VecDeque<Bytes>,
    done: bool,
}

fn data(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

impl SseStream {
    pub fn new(events: UnboundedReceiver<Event>, answer: Answer, include_usage: bool) -> Self {
        let mut out = VecDeque::new();
        if answer.kind == Kind::Chat {
            out.push_back(data(&answer.chunk(Some("assistant"), "", None, None, include_usage)));
        }
        SseStream {
            events,
            answer,
            include_usage,
            out,
            done: false,
        }
    }

    fn handle(&mut self, event: Option<Event>) {
        let usage = self.include_usage;
        match event {
            Some(Event::Text { text, logprobs }) => {
                let lp = self.answer.logprobs_json(&logprobs, &text);
                self.out
                    .push_back(data(&self.answer.chunk(None, &text, lp, None, usage)));
            }
            Some(Event::Done { finish, usage: u }) => {
                self.out
                    .push_back(data(&self.answer.chunk(None, "", None, Some(finish), usage)));
                if usage {
                    self.out.push_back(data(&self.answer.usage_chunk(&u)));
                }
                self.finish();
            }
            Some(Event::Error(message)) => {
                let err = super::api::ApiError::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    message,
                );
                self.out.push_back(data(&err.body()));
                self.finish();
            }
            None => {
                let err = super::api::ApiError::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "the engine stopped before the answer was complete",
                );
                self.out.push_back(data(&err.body()));
                self.finish();
            }
        }
    }

    fn finish(&mut self) {
        self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.done = true;
    }
}

impl Stream for SseStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(bytes) = self.out.pop_front() {
                return Poll::Ready(Some(Ok(bytes)));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match self.events.poll_recv(cx) {
                Poll::Ready(event) => self.handle(event),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
