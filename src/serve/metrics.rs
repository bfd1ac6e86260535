//! Counters for `GET /metrics`, in Prometheus' text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub struct Metrics {
    /// Requests that reached a slot.
    pub requests: AtomicU64,
    /// Requests refused because the queue was full.
    pub rejected: AtomicU64,
    /// Requests answered with another 4xx or a 5xx.
    pub errors: AtomicU64,
    /// Requests dropped because the client went away.
    pub cancelled: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens found in a slot's KV cache (not recomputed).
    pub cached_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub queued: AtomicUsize,
    pub busy: AtomicUsize,
    pub slots: AtomicUsize,
    /// Generated tokens per second of engine time, smoothed over recent rounds.
    rate: Mutex<Rate>,
}

#[derive(Default)]
struct Rate {
    tokens: f64,
    seconds: f64,
}

impl Metrics {
    /// Adds a round's sampled tokens and time (a decaying window of about 50 rounds).
    pub fn record_round(&self, tokens: usize, seconds: f64) {
        let mut r = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        r.tokens = r.tokens * 0.98 + tokens as f64;
        r.seconds = r.seconds * 0.98 + seconds;
    }

    pub fn tokens_per_second(&self) -> f64 {
        let r = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        if r.seconds > 0.0 {
            r.tokens / r.seconds
        } else {
            0.0
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let getu = |a: &AtomicUsize| a.load(Ordering::Relaxed) as f64;
        let rows: [(&str, &str, &str, f64); 11] = [
            ("q4wgpu_requests_total", "counter", "Requests that reached a slot.", get(&self.requests)),
            ("q4wgpu_requests_rejected_total", "counter", "Requests refused with 429 (queue full).", get(&self.rejected)),
            ("q4wgpu_requests_failed_total", "counter", "Requests answered with another error.", get(&self.errors)),
            ("q4wgpu_requests_cancelled_total", "counter", "Requests dropped because the client disconnected.", get(&self.cancelled)),
            ("q4wgpu_prompt_tokens_total", "counter", "Prompt tokens of requests.", get(&self.prompt_tokens)),
            ("q4wgpu_prompt_tokens_cached_total", "counter", "Prompt tokens reused from a slot's KV cache.", get(&self.cached_tokens)),
            ("q4wgpu_generated_tokens_total", "counter", "Tokens generated.", get(&self.generated_tokens)),
            ("q4wgpu_queue_depth", "gauge", "Requests waiting for a slot.", getu(&self.queued)),
            ("q4wgpu_slots_busy", "gauge", "Slots generating now.", getu(&self.busy)),
            ("q4wgpu_slots", "gauge", "Slots (--parallel).", getu(&self.slots)),
            ("q4wgpu_generation_tokens_per_second", "gauge", "Tokens generated per second of engine time, recent rounds.", self.tokens_per_second()),
        ];
        for (name, kind, help, value) in rows {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        out
    }
}
