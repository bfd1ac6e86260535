//! The CPU reference as a `Decoder`, so `q4wgpu run --cpu` uses the same decode loop as the GPU.

use super::{CpuModel, KvCache};
use crate::error::Result;
use crate::generate::{Decoder, StepOutput, TokenLogprobs};
use crate::sampling::{self, SamplingParams};

pub struct CpuDecoder<'m, 'w> {
    model: &'m CpuModel<'w>,
    cache: KvCache,
}

impl<'m, 'w> CpuDecoder<'m, 'w> {
    pub fn new(model: &'m CpuModel<'w>, ctx: usize) -> Self {
        CpuDecoder {
            model,
            cache: model.new_cache(ctx),
        }
    }

    /// The same decoder over an f16 KV cache, as the GPU holds it (see [`KvCache::with_f16_values`]).
    pub fn with_f16_cache(mut self) -> Self {
        self.cache = self.cache.with_f16_values();
        self
    }

    /// Keeps only the first `len` tokens of the sequence.
    pub fn truncate(&mut self, len: usize) {
        self.cache.truncate(len);
    }
}

impl Decoder for CpuDecoder<'_, '_> {
    fn step(
        &mut self,
        tokens: &[u32],
        params: &SamplingParams,
        history: &[u32],
        step: u32,
        top_logprobs: Option<usize>,
    ) -> Result<StepOutput> {
        // Short prompts as decode steps, as the GPU runs them (generate::SHORT_PROMPT).
        let mut logits = Vec::new();
        for call in crate::generate::forward_calls(tokens) {
            logits = self.model.forward(&mut self.cache, call)?;
        }
        let token = sampling::sample_at(params, &logits, history, step);
        let logprobs = top_logprobs.map(|n| {
            let lp = sampling::logprobs(&logits, token, n);
            TokenLogprobs {
                token: lp.token,
                logprob: lp.logprob,
                top: lp.top,
            }
        });
        Ok(StepOutput { token, logprobs })
    }

    fn position(&self) -> usize {
        self.cache.len()
    }

    fn context_size(&self) -> usize {
        self.cache.ctx()
    }
}
