//! The narrow interface the server's scheduler drives: N sequences ("slots"), each with its own
//! KV cache, extended a step at a time. The GPU engine and the CPU reference both implement it.

use crate::cpu::{CpuDecoder, CpuModel};
use crate::engine::{BatchEntry, GpuModel};
use crate::error::{Error, Result};
use crate::generate::{Decoder, StepOutput};
use crate::sampling::SamplingParams;

/// One slot's work in a step: append `tokens` (a prompt's uncached part, or the last sampled
/// token) and sample what follows.
pub struct SlotStep<'a> {
    pub slot: usize,
    pub tokens: &'a [u32],
    pub params: &'a SamplingParams,
    /// The sequence so far (prompt and generated tokens), for the repetition penalty.
    pub history: &'a [u32],
    /// Sampled tokens so far (seeds the sampler's draw).
    pub step: u32,
    pub top_logprobs: Option<usize>,
}

pub trait Backend {
    fn slots(&self) -> usize;
    /// Most tokens one slot holds.
    fn context_size(&self) -> usize;
    /// Tokens in `slot`'s KV cache.
    fn cached_len(&self, slot: usize) -> usize;
    /// Keeps only the first `len` tokens of `slot`'s cache.
    fn truncate(&mut self, slot: usize, len: usize) -> Result<()>;
    /// Runs one step for each entry (distinct slots). The default runs them one after another;
    /// an engine that reads the weights once for all of them overrides it.
    fn step_batch(&mut self, steps: &[SlotStep]) -> Vec<Result<StepOutput>> {
        steps.iter().map(|s| self.step(s)).collect()
    }
    fn step(&mut self, s: &SlotStep) -> Result<StepOutput>;
}

/// The GPU engine with `EngineOptions::kv_slots` sequences.
pub struct GpuBackend<'e, 'w> {
    pub engine: &'e mut GpuModel<'w>,
}

impl Backend for GpuBackend<'_, '_> {
    fn slots(&self) -> usize {
        self.engine.kv_slots()
    }

    fn context_size(&self) -> usize {
        self.engine.context_size()
    }

    fn cached_len(&self, slot: usize) -> usize {
        self.engine.slot_len(slot)
    }

    fn truncate(&mut self, slot: usize, len: usize) -> Result<()> {
        self.engine.select_kv_slot(slot)?;
        self.engine.truncate(len);
        Ok(())
    }

    fn step(&mut self, s: &SlotStep) -> Result<StepOutput> {
        self.engine.select_kv_slot(s.slot)?;
        self.engine
            .step(s.tokens, s.params, s.history, s.step, s.top_logprobs)
    }

    /// Steps of one token (decoding sequences) run together in batched steps of up to the
    /// engine's batch capacity, one pass over the weights each; prompts one after another.
    fn step_batch(&mut self, steps: &[SlotStep]) -> Vec<Result<StepOutput>> {
        let mut results: Vec<Option<Result<StepOutput>>> = steps.iter().map(|_| None).collect();
        let singles: Vec<usize> = (0..steps.len())
            .filter(|&i| steps[i].tokens.len() == 1)
            .collect();
        let capacity = self.engine.batch_capacity();
        if capacity >= 2 {
            for group in singles.chunks(capacity).filter(|g| g.len() >= 2) {
                let entries: Vec<BatchEntry> = group
                    .iter()
                    .map(|&i| BatchEntry {
                        slot: steps[i].slot,
                        token: steps[i].tokens[0],
                        params: steps[i].params,
                        history: steps[i].history,
                        step: steps[i].step,
                        top_logprobs: steps[i].top_logprobs,
                    })
                    .collect();
                match self.engine.step_batch(&entries) {
                    Ok(outs) => {
                        for (&i, out) in group.iter().zip(outs) {
                            results[i] = Some(Ok(out));
                        }
                    }
                    Err(e) => {
                        for &i in group {
                            results[i] = Some(Err(Error::Gpu(format!("batched step: {e}"))));
                        }
                    }
                }
            }
        }
        results
            .into_iter()
            .zip(steps)
            .map(|(r, s)| r.unwrap_or_else(|| self.step(s)))
            .collect()
    }
}

/// The CPU reference: one f32 KV cache per slot.
pub struct CpuBackend<'m, 'w> {
    slots: Vec<CpuDecoder<'m, 'w>>,
    ctx: usize,
}

impl<'m, 'w> CpuBackend<'m, 'w> {
    pub fn new(model: &'m CpuModel<'w>, slots: usize, ctx: usize) -> Self {
        CpuBackend {
            slots: (0..slots).map(|_| CpuDecoder::new(model, ctx)).collect(),
            ctx,
        }
    }

    fn slot(&mut self, slot: usize) -> Result<&mut CpuDecoder<'m, 'w>> {
        let n = self.slots.len();
        self.slots.get_mut(slot).ok_or_else(|| {
            crate::Error::Invalid(format!("slot {slot} does not exist (there are {n})"))
        })
    }
}

impl Backend for CpuBackend<'_, '_> {
    fn slots(&self) -> usize {
        self.slots.len()
    }

    fn context_size(&self) -> usize {
        self.ctx
    }

    fn cached_len(&self, slot: usize) -> usize {
        self.slots.get(slot).map_or(0, |d| d.position())
    }

    fn truncate(&mut self, slot: usize, len: usize) -> Result<()> {
        self.slot(slot)?.truncate(len);
        Ok(())
    }

    fn step(&mut self, s: &SlotStep) -> Result<StepOutput> {
        self.slot(s.slot)?
            .step(s.tokens, s.params, s.history, s.step, s.top_logprobs)
    }
}
