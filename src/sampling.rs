//! Token sampling on the CPU, with exactly the semantics the GPU sampler implements, so a seeded
//! run picks the same tokens on either (up to float rounding at a near-tie).
//!
//! One step, in order:
//! 1. repetition penalty on each *distinct* token among the last `repeat_last_n` history tokens:
//!    `logit > 0 ? logit / p : logit * p`;
//! 2. temperature 0 (or below): the argmax (ties → the lowest id), done;
//! 3. `logit / temperature`;
//! 4. candidates: the `top_k` highest logits (0 → all), sorted by logit descending, ties by lower id
//!    first, capped at [`MAX_CANDIDATES`];
//! 5. softmax over the candidates: `e_i = exp(l_i - l_0)`; min-p (only when `min_p > 0`) first
//!    keeps the prefix with `e_i >= min_p` (`e_i` is `p_i / p_0`), then `p_i = e_i / sum` with the
//!    sum of the kept `e_i` taken in candidate order;
//! 6. top-p: keep the shortest prefix whose cumulative probability is ≥ `top_p` (at least one
//!    candidate; `top_p ≥ 1` keeps all), then renormalise;
//! 7. draw `u = rng_uniform(seed_lo ^ seed_hi, step)` and pick the first candidate whose cumulative
//!    probability exceeds `u` (the last kept one if rounding leaves none).
//!
//! The step counter advances on every call, greedy ones included.

use crate::error::{Error, Result};

/// The most candidates kept after top-k. The GPU sampler keeps a fixed-size candidate list in
/// workgroup memory (one selection pass, no dynamic allocation), and this bound makes the CPU pick
/// from the same list. With temperature ≥ 0.1 the mass beyond the 256 best tokens is negligible.
pub const MAX_CANDIDATES: usize = 256;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = no top-k (all tokens, up to [`MAX_CANDIDATES`]).
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// Drop candidates less likely than `min_p` times the most likely one; 0 = off.
    pub min_p: f32,
    /// 1 = off.
    pub repeat_penalty: f32,
    /// How many of the most recent history tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// The most likely token each step, no penalty.
    pub fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            repeat_penalty: 1.0,
            ..SamplingParams::default()
        }
    }

    /// Refuses values outside each parameter's range (NaN and infinities included), naming the
    /// command-line option, so a bad value fails before any work instead of sampling garbage.
    pub fn validate(&self) -> Result<()> {
        check_temperature(self.temperature)?;
        check_unit("--top-p", self.top_p)?;
        check_unit("--min-p", self.min_p)?;
        check_repeat_penalty(self.repeat_penalty)
    }

    /// The 32-bit seed both samplers feed to [`rng_uniform`]: the two halves of `seed` xor-ed.
    pub fn seed32(&self) -> u32 {
        self.seed as u32 ^ (self.seed >> 32) as u32
    }
}

/// `--temperature`: finite and at least 0 (0 = greedy).
pub fn check_temperature(t: f32) -> Result<()> {
    if t.is_finite() && t >= 0.0 {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "--temperature {t} is out of range: use 0 (always the most likely token) or a finite positive value such as 0.8"
        )))
    }
}

/// `--top-p`, `--min-p`: a probability in [0, 1].
pub fn check_unit(option: &str, v: f32) -> Result<()> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{option} {v} is out of range: it is a probability between 0 and 1"
        )))
    }
}

/// `--repeat-penalty`: finite and positive (1 = off; above 1 discourages repeats).
pub fn check_repeat_penalty(p: f32) -> Result<()> {
    if p.is_finite() && p > 0.0 {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "--repeat-penalty {p} is out of range: use a finite value above 0 (1 = off, 1.1 discourages repeats)"
        )))
    }
}

/// The shared counter-based RNG (a PCG-style hash of seed and step): uniform in `[0, 1)` with
/// 24 bits of resolution, so the value is exact in f32 on any device.
pub fn rng_uniform(seed: u32, step: u32) -> f32 {
    let mut s = seed ^ step.wrapping_mul(0x9E37_79B9);
    s = s.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
    let w = ((s >> ((s >> 28) + 4)) ^ s).wrapping_mul(277_803_737);
    let w = (w >> 22) ^ w;
    (w >> 8) as f32 / 16_777_216.0
}

/// Logits after step 1 (repetition penalty), as a new vector.
pub fn penalized(params: &SamplingParams, logits: &[f32], history: &[u32]) -> Vec<f32> {
    let mut out = logits.to_vec();
    if params.repeat_penalty == 1.0 || params.repeat_last_n == 0 {
        return out;
    }
    let mut recent: Vec<u32> =
        history[history.len().saturating_sub(params.repeat_last_n)..].to_vec();
    recent.sort_unstable();
    recent.dedup();
    for t in recent {
        if let Some(l) = out.get_mut(t as usize) {
            *l = if *l > 0.0 {
                *l / params.repeat_penalty
            } else {
                *l * params.repeat_penalty
            };
        }
    }
    out
}

/// The highest logit's id; ties go to the lowest id.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The distribution a step draws from (steps 1–6): candidates in draw order with their final
/// probabilities. Greedy parameters give the argmax with probability 1.
pub fn distribution(params: &SamplingParams, logits: &[f32], history: &[u32]) -> Vec<(u32, f32)> {
    let logits = penalized(params, logits, history);
    if params.temperature <= 0.0 || logits.len() <= 1 {
        return vec![(argmax(&logits), 1.0)];
    }
    let k = if params.top_k == 0 {
        logits.len()
    } else {
        params.top_k.min(logits.len())
    };
    let k = k.min(MAX_CANDIDATES);
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l / params.temperature))
        .collect();
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if k < cand.len() {
        cand.select_nth_unstable_by(k - 1, order);
        cand.truncate(k);
    }
    cand.sort_unstable_by(order);

    let max = cand[0].1;
    for c in cand.iter_mut() {
        c.1 = (c.1 - max).exp();
    }
    if params.min_p > 0.0 {
        // Sorted descending, so the kept candidates are a prefix (the first has e = 1).
        let keep = cand.iter().take_while(|c| c.1 >= params.min_p).count().max(1);
        cand.truncate(keep);
    }
    let mut sum = 0.0f32;
    for c in cand.iter() {
        sum += c.1;
    }
    for c in cand.iter_mut() {
        c.1 /= sum;
    }

    if params.top_p < 1.0 {
        let mut cum = 0.0f32;
        let mut keep = cand.len();
        for (i, c) in cand.iter().enumerate() {
            cum += c.1;
            if cum >= params.top_p {
                keep = i + 1;
                break;
            }
        }
        cand.truncate(keep);
        let total: f32 = cand.iter().map(|c| c.1).sum();
        for c in cand.iter_mut() {
            c.1 /= total;
        }
    }
    cand
}

/// One sampling step at counter value `step` (a pure function: the GPU sampler's reference).
pub fn sample_at(params: &SamplingParams, logits: &[f32], history: &[u32], step: u32) -> u32 {
    let dist = distribution(params, logits, history);
    if dist.len() == 1 {
        return dist[0].0;
    }
    let u = rng_uniform(params.seed32(), step);
    let mut cum = 0.0f32;
    for &(token, p) in &dist {
        cum += p;
        if cum > u {
            return token;
        }
    }
    dist[dist.len() - 1].0
}

/// A sampler: parameters plus the step counter that feeds the RNG.
#[derive(Clone, Debug)]
pub struct Sampler {
    pub params: SamplingParams,
    pub step: u32,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        Sampler { params, step: 0 }
    }

    /// Picks the next token from `logits` given the tokens so far (prompt and generated).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let token = sample_at(&self.params, logits, history, self.step);
        self.step = self.step.wrapping_add(1);
        token
    }
}

/// Log-probability of a chosen token and of the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// The `top_n` most likely tokens, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// Log-softmax of the raw logits over the whole vocabulary (before penalty and temperature, as
/// OpenAI-style APIs report). A token outside the vocabulary gets `-inf`.
pub fn logprobs(logits: &[f32], token: u32, top_n: usize) -> TokenLogprob {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    let logprob_of = |l: f32| (l as f64 - log_z) as f32;
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let order = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let n = top_n.min(ids.len());
    if n > 0 && n < ids.len() {
        ids.select_nth_unstable_by(n - 1, order);
    }
    ids.truncate(n);
    ids.sort_unstable_by(order);
    TokenLogprob {
        token,
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&l| logprob_of(l)),
        top: ids
            .into_iter()
            .map(|i| (i, logprob_of(logits[i as usize])))
            .collect(),
    }
}
