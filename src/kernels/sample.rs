//! Token sampling on the GPU (`shaders/sample.wgsl`): each decoded token costs two dispatches and
//! one small read-back, and picks the same token as the CPU sampler (`src/sampling.rs`) for the same
//! logits, history, seed and step, up to float rounding at a near-tie.
//!
//! The spec, in order (all arithmetic in f32):
//! 1. repetition penalty on each distinct token among the last `repeat_last_n` history tokens:
//!    `logit > 0 ? logit / p : logit * p` (off when `p == 1` or `repeat_last_n == 0`);
//! 2. temperature ≤ 0: the argmax of the penalised logits (ties → lowest id), done;
//! 3. `logit / temperature`;
//! 4. candidates: the `top_k` largest (0 → all), at most [`MAX_CANDIDATES`], sorted by value
//!    descending, ties by lower id;
//! 5. softmax: `e_i = exp(l_i - l_0)`; min-p (only when `min_p > 0`) keeps the prefix with
//!    `e_i >= min_p`; `sum` of the kept `e_i` accumulated in candidate order, `p_i = e_i / sum`;
//! 6. top-p (only when `top_p < 1`): keep the shortest prefix whose running sum of `p_i` is
//!    `>= top_p` (all if none), `total` = the running sum of the kept `p_i`, `p_i = p_i / total`;
//! 7. `u = rng_uniform(seed_lo ^ seed_hi, step)`; the first candidate whose running sum of `p_i`
//!    is `> u`, or the last kept one.
//!
//! Also reported, over the whole vocabulary and the raw logits: the chosen token's log-probability
//! and the `top_n` (≤ [`MAX_TOP_N`]) largest raw logits (ties → lower id) with their
//! log-probabilities, `logit - (max + ln Σ exp(logit - max))`.
//!
//! Greedy without `top_n` only reduces (max, sum of exp, argmax) per slice of 4096 entries and
//! merges the partials; the selections run only when asked for (see the shader's doc).

use super::check_size;
use super::Dispatch;
use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// The most candidates kept after top-k.
pub const MAX_CANDIDATES: usize = 256;
/// The most raw-logit alternatives a result can report.
pub const MAX_TOP_N: usize = 20;
/// Vocabulary entries per pass-1 workgroup (the shader's SLICE).
const SLICE: usize = 4096;
/// Workgroup memory the shader declares, rounded up.
const WORKGROUP_BYTES: u32 = 28 * 1024;

/// Sampling parameters (the same meaning as `sampling::SamplingParams`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleParams {
    /// 0 (or below) = greedy.
    pub temperature: f32,
    /// 0 = off (all tokens, up to [`MAX_CANDIDATES`]).
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    /// 1 = off.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl From<&crate::sampling::SamplingParams> for SampleParams {
    fn from(p: &crate::sampling::SamplingParams) -> SampleParams {
        SampleParams {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            repeat_penalty: p.repeat_penalty,
            repeat_last_n: p.repeat_last_n,
            seed: p.seed,
        }
    }
}

/// One sampled token: its id, its raw log-probability, and the `top_n` most likely raw candidates.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleResult {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    vocab: u32,
    n_slices: u32,
    top_n: u32,
    k_cand: u32,
    temperature: f32,
    top_p: f32,
    repeat_penalty: f32,
    hist_start: u32,
    hist_count: u32,
    seed: u32,
    step: u32,
    min_p: f32,
}

pub struct Sample {
    slices: wgpu::ComputePipeline,
    finish: wgpu::ComputePipeline,
}

/// The two bound dispatches of one sampler, its params uniform and its scratch buffers.
pub struct SampleDispatch {
    pub slices: Dispatch,
    pub finish: Dispatch,
    params: wgpu::Buffer,
    out: wgpu::Buffer,
    vocab: usize,
    max_history: usize,
    top_n: usize,
    n_slices: usize,
    _scratch: [wgpu::Buffer; 3],
}

/// u32 words of the result buffer for `top_n` alternatives: [token, logprob bits, n, 0, (id, logprob bits) * n].
pub fn out_words(top_n: usize) -> usize {
    4 + 2 * top_n
}

impl Sample {
    pub fn new(gpu: &Gpu) -> Result<Sample> {
        if gpu.limits.max_compute_workgroup_storage_size < WORKGROUP_BYTES {
            return Err(Error::Unsupported(format!(
                "the GPU sampler needs {WORKGROUP_BYTES} bytes of workgroup memory; {} offers {}",
                gpu.info.name, gpu.limits.max_compute_workgroup_storage_size
            )));
        }
        let src = include_str!("../../shaders/sample.wgsl");
        let slices = gpu.compute_pipeline("sample/slices", src, "slices", &[])?;
        let finish = gpu.compute_pipeline("sample/finish", src, "finish", &[])?;
        Ok(Sample { slices, finish })
    }

    /// `logits`: f32 [vocab]; `history`: u32 [max_history] recent token ids (written by the engine,
    /// oldest first); `out`: at least [`out_words`]`(top_n)` u32 words.
    #[allow(clippy::too_many_arguments)]
    pub fn bind(
        &self,
        gpu: &Gpu,
        logits: &wgpu::Buffer,
        history: &wgpu::Buffer,
        out: &wgpu::Buffer,
        vocab: usize,
        max_history: usize,
        top_n: usize,
    ) -> Result<SampleDispatch> {
        if vocab == 0 || vocab >= u32::MAX as usize / 2 || top_n > MAX_TOP_N || max_history == 0 {
            return Err(Error::Invalid(format!(
                "sample: vocab {vocab} must be positive, max_history {max_history} positive, top_n {top_n} at most {MAX_TOP_N}"
            )));
        }
        check_size("sample logits", logits, (vocab * 4) as u64)?;
        check_size("sample history", history, (max_history * 4) as u64)?;
        check_size("sample out", out, (out_words(top_n) * 4) as u64)?;
        let n_slices = vocab.div_ceil(SLICE);
        if n_slices > 65535 {
            return Err(Error::Invalid(format!("sample: vocab {vocab} too large")));
        }
        let partials = gpu.storage_buffer("sample/partials", (n_slices * 16) as u64);
        let cand_pen =
            gpu.storage_buffer("sample/cand_pen", (n_slices * MAX_CANDIDATES * 8) as u64);
        let cand_raw = gpu.storage_buffer("sample/cand_raw", (n_slices * top_n.max(1) * 8) as u64);
        let params = gpu.uniform("sample/params", &Params::zeroed_for(vocab, n_slices, top_n));
        let slices_bg = bind_indexed(
            gpu,
            "sample/slices",
            &self.slices,
            &[
                (0, logits),
                (1, history),
                (2, &partials),
                (3, &cand_pen),
                (4, &cand_raw),
                (6, &params),
            ],
        );
        let finish_bg = bind_indexed(
            gpu,
            "sample/finish",
            &self.finish,
            &[
                (0, logits),
                (2, &partials),
                (3, &cand_pen),
                (4, &cand_raw),
                (5, out),
                (6, &params),
            ],
        );
        Ok(SampleDispatch {
            slices: Dispatch {
                label: "sample/slices".into(),
                pipeline: self.slices.clone(),
                bind_group: slices_bg,
                workgroups: [n_slices as u32, 1, 1],
                params: Some(params.clone()),
            },
            finish: Dispatch {
                label: "sample/finish".into(),
                pipeline: self.finish.clone(),
                bind_group: finish_bg,
                workgroups: [1, 1, 1],
                params: None,
            },
            params,
            out: out.clone(),
            vocab,
            max_history,
            top_n,
            n_slices,
            _scratch: [partials, cand_pen, cand_raw],
        })
    }
}

impl Params {
    fn zeroed_for(vocab: usize, n_slices: usize, top_n: usize) -> Params {
        Params {
            vocab: vocab as u32,
            n_slices: n_slices as u32,
            top_n: top_n as u32,
            k_cand: 0,
            temperature: 0.0,
            top_p: 1.0,
            repeat_penalty: 1.0,
            hist_start: 0,
            hist_count: 0,
            seed: 0,
            step: 0,
            min_p: 0.0,
        }
    }
}

/// A bind group over `(binding index, buffer)` pairs (the two passes use different subsets).
fn bind_indexed(
    gpu: &Gpu,
    label: &str,
    pipeline: &wgpu::ComputePipeline,
    buffers: &[(u32, &wgpu::Buffer)],
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry> = buffers
        .iter()
        .map(|&(binding, b)| wgpu::BindGroupEntry {
            binding,
            resource: b.as_entire_binding(),
        })
        .collect();
    gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(label),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    })
}

impl SampleDispatch {
    /// Records both passes (in order) into a compute pass.
    pub fn encode(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.slices.encode(pass);
        self.finish.encode(pass);
    }

    /// Writes this step's parameters. `step` is the sampled-token counter that feeds the RNG;
    /// `history_len` is how many ids of the history buffer are valid (the newest last).
    pub fn write_params(
        &self,
        queue: &wgpu::Queue,
        p: &SampleParams,
        step: u32,
        history_len: usize,
    ) -> Result<()> {
        if history_len > self.max_history {
            return Err(Error::Invalid(format!(
                "sample: history of {history_len} tokens, the buffer holds {}",
                self.max_history
            )));
        }
        crate::sampling::check_temperature(p.temperature)?;
        crate::sampling::check_unit("--top-p", p.top_p)?;
        crate::sampling::check_unit("--min-p", p.min_p)?;
        crate::sampling::check_repeat_penalty(p.repeat_penalty)?;
        let greedy = p.temperature <= 0.0 || self.vocab <= 1;
        let k_cand = if greedy {
            0
        } else {
            let k = if p.top_k == 0 {
                self.vocab
            } else {
                p.top_k.min(self.vocab)
            };
            k.min(MAX_CANDIDATES)
        };
        let hist_count = if p.repeat_penalty == 1.0 {
            0
        } else {
            history_len.min(p.repeat_last_n)
        };
        let mut params = Params::zeroed_for(self.vocab, self.n_slices, self.top_n);
        params.k_cand = k_cand as u32;
        params.temperature = p.temperature;
        params.top_p = p.top_p;
        params.repeat_penalty = p.repeat_penalty;
        params.hist_start = (history_len - hist_count) as u32;
        params.hist_count = hist_count as u32;
        params.seed = p.seed as u32 ^ (p.seed >> 32) as u32;
        params.step = step;
        params.min_p = p.min_p;
        queue.write_buffer(&self.params, 0, bytemuck::bytes_of(&params));
        Ok(())
    }

    /// Reads the result of the last run back (blocking).
    pub fn read_result(&self, gpu: &Gpu) -> Result<SampleResult> {
        read_result(gpu, &self.out, self.top_n)
    }
}

/// Reads and decodes a result buffer written for `top_n` alternatives.
pub fn read_result(gpu: &Gpu, out: &wgpu::Buffer, top_n: usize) -> Result<SampleResult> {
    parse_result(&gpu.read_u32(out, out_words(top_n))?)
}

/// Decodes the words of a result buffer (for an engine that reads it back its own way).
pub fn parse_result(words: &[u32]) -> Result<SampleResult> {
    let bad = || {
        Error::Gpu(format!(
            "sample: malformed result buffer ({} words)",
            words.len()
        ))
    };
    let head = words.get(..4).ok_or_else(bad)?;
    let n = head[2] as usize;
    let pairs = words.get(4..4 + 2 * n).ok_or_else(bad)?;
    Ok(SampleResult {
        token: head[0],
        logprob: f32::from_bits(head[1]),
        top: pairs
            .chunks_exact(2)
            .map(|c| (c[0], f32::from_bits(c[1])))
            .collect(),
    })
}
