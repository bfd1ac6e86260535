//! The decoder's small operations in plain f32, one function each: the references that GPU kernel
//! tests compare against. Vectors are row-major slices; a "head" is `head_dim` consecutive values.

/// Shapes of multi-head attention with grouped KV heads (query head `h` reads KV head `h / groups`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl Heads {
    pub fn of(config: &crate::config::ModelConfig) -> Heads {
        Heads {
            n_heads: config.num_attention_heads,
            n_kv_heads: config.num_kv_heads(),
            head_dim: config.head_dim(),
        }
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Query heads per KV head.
    pub fn groups(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}

/// `out = x * weight / sqrt(mean(x²) + eps)`, all in f32 as Hugging Face computes it.
/// `1 / sqrt(mean(x²) + eps)`: RMSNorm's scalar.
pub fn inverse_rms(x: &[f32], eps: f32) -> f32 {
    let mean_square = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (mean_square + eps).sqrt()
}

pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    assert_eq!(
        x.len(),
        weight.len(),
        "rms_norm: input and weight lengths differ"
    );
    assert_eq!(
        x.len(),
        out.len(),
        "rms_norm: input and output lengths differ"
    );
    let inv_rms = inverse_rms(x, eps);
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv_rms * w;
    }
}

/// Rotary position embedding, Hugging Face's `rotate_half` form, on every head of `x` in place.
///
/// The head dimension is `2 * inv_freq.len()`. Dimension `i` pairs with `i + head_dim/2`, rotated by
/// `angle = pos * inv_freq[i]`, the product formed in f32 as Hugging Face does (at large positions
/// that rounding is visible, so GPU kernels should form the angle the same way):
/// `x'[i] = x[i] cos - x[i+half] sin`, `x'[i+half] = x[i+half] cos + x[i] sin`.
pub fn apply_rope(x: &mut [f32], pos: usize, inv_freq: &[f32]) {
    let half = inv_freq.len();
    assert!(
        half > 0 && x.len().is_multiple_of(2 * half),
        "apply_rope: length {} is not whole heads of {}",
        x.len(),
        2 * half
    );
    for head in x.chunks_mut(2 * half) {
        let (lo, hi) = head.split_at_mut(half);
        for ((a, b), &f) in lo.iter_mut().zip(hi.iter_mut()).zip(inv_freq) {
            let (sin, cos) = (pos as f32 * f).sin_cos();
            let (x0, x1) = (*a, *b);
            *a = x0 * cos - x1 * sin;
            *b = x1 * cos + x0 * sin;
        }
    }
}

/// Scaled dot-product attention of one query over `n_pos` cached positions.
///
/// `q`: `[n_heads, head_dim]`; `keys`, `values`: `[n_pos, n_kv_heads * head_dim]` (the positions
/// this query may see: causality is the caller's choice of `n_pos`); `out`: `[n_heads, head_dim]`.
/// Scores are scaled by `1/sqrt(head_dim)`; the softmax subtracts the maximum and runs in f32.
pub fn attention(heads: Heads, q: &[f32], keys: &[f32], values: &[f32], out: &mut [f32]) {
    let (hd, kv_dim) = (heads.head_dim, heads.kv_dim());
    assert_eq!(q.len(), heads.q_dim(), "attention: query length");
    assert_eq!(out.len(), heads.q_dim(), "attention: output length");
    assert!(
        kv_dim > 0 && keys.len().is_multiple_of(kv_dim) && keys.len() == values.len(),
        "attention: key/value shapes"
    );
    let n_pos = keys.len() / kv_dim;
    assert!(n_pos > 0, "attention: no positions to attend to");
    let scale = 1.0 / (hd as f32).sqrt();
    let head = |h: usize, oh: &mut [f32]| {
        let kv = (h / heads.groups()) * hd;
        let qh = &q[h * hd..(h + 1) * hd];
        let mut scores: Vec<f32> = (0..n_pos)
            .map(|p| dot(qh, &keys[p * kv_dim + kv..p * kv_dim + kv + hd]) * scale)
            .collect();
        softmax_in_place(&mut scores);
        oh.fill(0.0);
        for (p, &w) in scores.iter().enumerate() {
            let v = &values[p * kv_dim + kv..p * kv_dim + kv + hd];
            for (o, &vi) in oh.iter_mut().zip(v) {
                *o += w * vi;
            }
        }
    };
    // A long context's heads in parallel (one decoded token; a prompt's tokens are already
    // spread over the threads); a short one is not worth waking the threads for.
    const PARALLEL_FROM: usize = 1 << 18;
    if n_pos * q.len() >= PARALLEL_FROM {
        use rayon::prelude::*;
        out.par_chunks_mut(hd)
            .enumerate()
            .for_each(|(h, oh)| head(h, oh));
    } else {
        for (h, oh) in out.chunks_mut(hd).enumerate() {
            head(h, oh);
        }
    }
}

/// `x * sigmoid(x)`.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Numerically stable softmax (the maximum is subtracted before `exp`).
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight running sums (lanes of one vector), then added pairwise: the compiler can keep them
    // in a register, where one sum in order is a chain of dependent scalar adds.
    let mut lanes = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for ((l, &xi), &yi) in lanes.iter_mut().zip(x).zip(y) {
            *l += xi * yi;
        }
    }
    let [l0, l1, l2, l3, l4, l5, l6, l7] = lanes;
    ((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7)) + tail
}

/// `x += y`.
pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len(), "add_in_place: lengths differ");
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
