//! Quality of the int8 decode path: the same text through two GPU engines, one with int8 and
//! one with f32 decode activations, one token per step (teacher-forced: every step feeds the
//! text's next token, whatever the model predicted). Per step: whether the two most likely next
//! tokens agree, and KL(p_f32 ‖ p_int8) of the next-token distributions; over the text, each
//! engine's perplexity on it. `q4wgpu eval` prints the figures.

use crate::engine::{EngineOptions, GpuModel};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::quant::DecodeActivations;
use crate::weights::ModelWeights;
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct ActivationQuality {
    /// Next-token predictions compared (text tokens less one).
    pub steps: usize,
    /// Share of steps whose most likely next token is the same under both.
    pub top1_agreement: f64,
    /// Mean over steps of KL(p_f32 ‖ p_int8), in nats.
    pub mean_kl: f64,
    /// Largest KL of one step, in nats.
    pub max_kl: f64,
    pub perplexity_f32: f64,
    pub perplexity_int8: f64,
}

/// Runs `tokens` through both engines one token per step (see the module comment).
pub fn compare_decode_activations(
    gpu: &Gpu,
    weights: &ModelWeights,
    tokens: &[u32],
    base: &EngineOptions,
) -> Result<ActivationQuality> {
    if tokens.len() < 2 {
        return Err(Error::Invalid("eval needs a text of at least two tokens".into()));
    }
    let engine = |a: DecodeActivations| {
        let opts = EngineOptions {
            ctx_size: base.ctx_size.max(tokens.len()),
            decode_activations: a,
            ..base.clone()
        };
        GpuModel::new(gpu, weights, opts)
    };
    let (mut f32_engine, mut int8_engine) = (engine(DecodeActivations::F32)?, engine(DecodeActivations::Int8)?);
    let (mut agree, mut kl_sum, mut max_kl, mut nll_f32, mut nll_int8) = (0usize, 0.0, 0.0f64, 0.0, 0.0);
    let steps = tokens.len() - 1;
    for i in 0..steps {
        let p = log_softmax(&f32_engine.logits(&tokens[i..=i])?);
        let q = log_softmax(&int8_engine.logits(&tokens[i..=i])?);
        agree += (argmax(&p) == argmax(&q)) as usize;
        let kl: f64 = p.iter().zip(&q).map(|(lp, lq)| lp.exp() * (lp - lq)).sum();
        kl_sum += kl;
        max_kl = max_kl.max(kl);
        let next = tokens[i + 1] as usize;
        nll_f32 -= p.get(next).copied().unwrap_or(f64::NEG_INFINITY);
        nll_int8 -= q.get(next).copied().unwrap_or(f64::NEG_INFINITY);
    }
    Ok(ActivationQuality {
        steps,
        top1_agreement: agree as f64 / steps as f64,
        mean_kl: kl_sum / steps as f64,
        max_kl,
        perplexity_f32: (nll_f32 / steps as f64).exp(),
        perplexity_int8: (nll_int8 / steps as f64).exp(),
    })
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let log_sum = logits.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    logits.iter().map(|&v| v as f64 - log_sum).collect()
}

fn argmax(v: &[f64]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best })
        .0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_and_argmax_by_hand() {
        // logits ln 1, ln 2, ln 1: probabilities 1/4, 1/2, 1/4.
        let lp = log_softmax(&[0.0, std::f32::consts::LN_2, 0.0]);
        let p: Vec<f64> = lp.iter().map(|v| v.exp()).collect();
        for (got, want) in p.iter().zip([0.25, 0.5, 0.25]) {
            assert!((got - want).abs() < 1e-7, "{p:?}");
        }
        assert_eq!(argmax(&lp), 1);
        // Large logits do not overflow.
        let lp = log_softmax(&[1000.0, 1000.0]);
        assert!((lp[0] - (0.5f64).ln()).abs() < 1e-9, "{lp:?}");
    }
}
