//! The engine thread: requests wait in a bounded queue, up to `slots` sequences run at once, one
//! step each per round (a prompt advances by at most `PREFILL_CHUNK` tokens a round, so a long
//! prompt does not stall the others). A slot keeps its KV cache after a request, and the next
//! request reuses the longest prefix it shares with it (the prompt cache). A request whose client
//! went away (its event receiver dropped) is dropped before the next round.

use super::backend::{Backend, SlotStep};
use super::metrics::Metrics;
use crate::error::Result;
use crate::generate::{find_stop, held_back, StepOutput, TokenLogprobs};
use crate::sampling::SamplingParams;
use crate::tokenizer::{StreamDecoder, Tokenizer};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// Most prompt tokens a slot feeds in one round.
const PREFILL_CHUNK: usize = 256;

pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Report log-probabilities with this many alternatives.
    pub logprobs: Option<usize>,
    /// Do not stop at end-of-sequence tokens.
    pub ignore_eos: bool,
    pub events: UnboundedSender<Event>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// End of sequence or a stop string.
    Stop,
    /// `max_tokens` or the context's end.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens found in the slot's KV cache.
    pub cached_tokens: usize,
}

#[derive(Debug)]
pub enum Event {
    /// Final text (never retracted; a possible stop string is held back until decided) and the
    /// log-probabilities of the tokens generated since the previous event.
    Text {
        text: String,
        logprobs: Vec<TokenLogprobs>,
        /// The tokens generated since the previous event (the chat keeps its history as tokens).
        tokens: Vec<u32>,
    },
    Done {
        finish: Finish,
        usage: Usage,
    },
    Error(String),
}

/// A request being generated in a slot.
struct Active<'t> {
    req: Request,
    history: Vec<u32>,
    /// Tokens to append in the next step.
    feed: Vec<u32>,
    prefilled: bool,
    generated: usize,
    decoder: StreamDecoder<'t>,
    text: String,
    emitted: usize,
    logprobs: Vec<TokenLogprobs>,
    /// Generated tokens not yet sent.
    unsent: Vec<u32>,
    usage: Usage,
    eos: &'t [u32],
    /// A stop string ended the text (nothing after it is decoded).
    stopped: bool,
}

struct Slot<'t> {
    /// Tokens whose keys and values the slot's KV cache holds.
    cached: Vec<u32>,
    active: Option<Active<'t>>,
    last_used: u64,
}

/// Serves requests from `queue` until every sender is gone.
pub fn run(
    backend: &mut dyn Backend,
    tokenizer: &Tokenizer,
    queue: Receiver<Request>,
    metrics: &Metrics,
) {
    let mut slots: Vec<Slot> = (0..backend.slots())
        .map(|_| Slot {
            cached: Vec::new(),
            active: None,
            last_used: 0,
        })
        .collect();
    let mut round = 0u64;
    loop {
        round += 1;
        if !admit(&mut slots, &queue, backend, tokenizer, metrics, round) {
            return;
        }
        for slot in &mut slots {
            if slot
                .active
                .as_ref()
                .is_some_and(|a| a.req.events.is_closed())
            {
                slot.active = None;
                metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
        metrics.busy.store(
            slots.iter().filter(|s| s.active.is_some()).count(),
            Ordering::Relaxed,
        );
        step_round(&mut slots, backend, metrics);
    }
}

/// Fills free slots from the queue; blocks while nothing runs. False once the queue is closed
/// and nothing runs.
fn admit<'t>(
    slots: &mut [Slot<'t>],
    queue: &Receiver<Request>,
    backend: &mut dyn Backend,
    tokenizer: &'t Tokenizer,
    metrics: &Metrics,
    round: u64,
) -> bool {
    loop {
        let idle = slots.iter().all(|s| s.active.is_none());
        if !slots.iter().any(|s| s.active.is_none()) {
            return true;
        }
        let req = if idle {
            match queue.recv() {
                Ok(r) => r,
                Err(_) => return false,
            }
        } else {
            match queue.try_recv() {
                Ok(r) => r,
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return true,
            }
        };
        metrics.queued.fetch_sub(1, Ordering::Relaxed);
        if req.events.is_closed() {
            metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if let Err(e) = start(slots, req, backend, tokenizer, metrics, round) {
            // `start` already told the client; the slot stays free.
            eprintln!("serve: a request failed to start: {e}");
        }
    }
}

/// Puts `req` in the free slot that shares the longest prefix with its prompt (least recently
/// used among equals) and cuts that slot's cache to the shared prefix.
fn start<'t>(
    slots: &mut [Slot<'t>],
    req: Request,
    backend: &mut dyn Backend,
    tokenizer: &'t Tokenizer,
    metrics: &Metrics,
    round: u64,
) -> Result<()> {
    let Some((index, shared)) = slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.active.is_none())
        .map(|(i, s)| (i, common_prefix(&s.cached, &req.prompt), s.last_used))
        .max_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)))
        .map(|(i, n, _)| (i, n))
    else {
        return Ok(());
    };
    let ctx = backend.context_size();
    if req.prompt.is_empty() || req.prompt.len() >= ctx {
        let msg = format!(
            "the prompt has {} tokens; it must have at least 1 and fewer than the context's {ctx}",
            req.prompt.len()
        );
        let _ = req.events.send(Event::Error(msg.clone()));
        return Err(crate::Error::Invalid(msg));
    }
    // At least one prompt token is fed: its step yields the first sampled token.
    let reuse = shared.min(req.prompt.len() - 1);
    let slot = &mut slots[index];
    if let Err(e) = backend.truncate(index, reuse) {
        let _ = req.events.send(Event::Error(e.to_string()));
        slot.cached.clear();
        return Err(e);
    }
    slot.cached.truncate(reuse);
    slot.last_used = round;
    metrics.requests.fetch_add(1, Ordering::Relaxed);
    metrics
        .prompt_tokens
        .fetch_add(req.prompt.len() as u64, Ordering::Relaxed);
    metrics
        .cached_tokens
        .fetch_add(reuse as u64, Ordering::Relaxed);
    slot.active = Some(Active {
        history: req.prompt.clone(),
        feed: req.prompt[reuse..].to_vec(),
        prefilled: false,
        generated: 0,
        decoder: StreamDecoder::new(tokenizer, true),
        text: String::new(),
        emitted: 0,
        logprobs: Vec::new(),
        unsent: Vec::new(),
        eos: if req.ignore_eos {
            &[]
        } else {
            tokenizer.eos_ids()
        },
        stopped: false,
        usage: Usage {
            prompt_tokens: req.prompt.len(),
            completion_tokens: 0,
            cached_tokens: reuse,
        },
        req,
    });
    Ok(())
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// One step for every running slot, then each result handled.
fn step_round(slots: &mut [Slot], backend: &mut dyn Backend, metrics: &Metrics) {
    let started = Instant::now();
    let mut fed: Vec<(usize, usize)> = Vec::new(); // (slot, tokens fed)
    let steps: Vec<SlotStep> = slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.active.as_ref().map(|a| (i, a)))
        .map(|(i, a)| {
            let n = a.feed.len().min(PREFILL_CHUNK);
            fed.push((i, n));
            SlotStep {
                slot: i,
                tokens: &a.feed[..n],
                params: &a.req.sampling,
                history: &a.history,
                step: a.generated as u32,
                top_logprobs: a.req.logprobs,
            }
        })
        .collect();
    if steps.is_empty() {
        return;
    }
    let results = backend.step_batch(&steps);
    drop(steps);
    let ctx = backend.context_size();
    let mut sampled = 0;
    for ((i, n), result) in fed.into_iter().zip(results) {
        let slot = &mut slots[i];
        let Some(active) = slot.active.as_mut() else {
            continue;
        };
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                // The slot's cache is in an unknown state: forget it.
                let _ = active.req.events.send(Event::Error(e.to_string()));
                slot.active = None;
                slot.cached.clear();
                let _ = backend.truncate(i, 0);
                continue;
            }
        };
        slot.cached.extend(active.feed.drain(..n));
        if !active.feed.is_empty() {
            continue; // more prompt to feed; this step's sample is not the next token
        }
        active.prefilled = true;
        sampled += 1;
        match active.advance(out, slot.cached.len(), ctx) {
            Ok(None) => {}
            Ok(Some(finish)) => {
                active.finish(finish);
                slot.active = None;
            }
            Err(e) => {
                let _ = active.req.events.send(Event::Error(e.to_string()));
                slot.active = None;
            }
        }
    }
    metrics
        .generated_tokens
        .fetch_add(sampled as u64, Ordering::Relaxed);
    metrics.record_round(sampled, started.elapsed().as_secs_f64());
}

impl Active<'_> {
    /// Takes the token sampled after the fed tokens; returns why the request ends, if it does.
    fn advance(&mut self, out: StepOutput, cached: usize, ctx: usize) -> Result<Option<Finish>> {
        let token = out.token;
        if self.eos.contains(&token) {
            return Ok(Some(Finish::Stop));
        }
        self.generated += 1;
        self.usage.completion_tokens = self.generated;
        self.history.push(token);
        self.unsent.push(token);
        self.logprobs.extend(out.logprobs);
        if let Some(piece) = self.decoder.push(token)? {
            self.text.push_str(&piece);
            if let Some(cut) = find_stop(&self.text, &self.req.stop) {
                self.text.truncate(cut.max(self.emitted));
                self.stopped = true;
                self.send_up_to(cut.max(self.emitted));
                return Ok(Some(Finish::Stop));
            }
            let safe = self.text.len() - held_back(&self.text, &self.req.stop);
            if safe > self.emitted {
                self.send_up_to(safe);
            }
        }
        if self.generated >= self.req.max_tokens || cached + 1 > ctx {
            return Ok(Some(Finish::Length));
        }
        self.feed.push(token);
        Ok(None)
    }

    /// Sends the text from `emitted` to `end` with the pending log-probabilities.
    fn send_up_to(&mut self, end: usize) {
        let text = self.text[self.emitted..end].to_string();
        self.emitted = end;
        let logprobs = std::mem::take(&mut self.logprobs);
        let tokens = std::mem::take(&mut self.unsent);
        if !text.is_empty() || !tokens.is_empty() {
            let _ = self.req.events.send(Event::Text {
                text,
                logprobs,
                tokens,
            });
        }
    }

    /// Sends what is left (no stop string came) and the end.
    fn finish(&mut self, finish: Finish) {
        if !self.stopped {
            if let Ok(Some(rest)) = self.decoder.flush() {
                self.text.push_str(&rest);
            }
            if let Some(cut) = find_stop(&self.text, &self.req.stop) {
                self.text.truncate(cut.max(self.emitted));
            }
        }
        let end = self.text.len();
        self.send_up_to(end);
        let _ = self.req.events.send(Event::Done {
            finish,
            usage: self.usage,
        });
    }
}
