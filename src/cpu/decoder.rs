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
        let logits = self.model.forward(&mut self.cache, tokens)?;
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
