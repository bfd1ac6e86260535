//! INT4 block-128 quantization: the weight format as executable spec.
//!
//! Semantics (DESIGN.md §4, identical to the seed's PyTorch method): for each row of W[out, in],
//! consecutive blocks of 128 elements along `in`; `scale = bf16(absmax / 7)` (absmax 0 → 1);
//! `q = clamp(round_half_even(w / scale), -8, 7)` with f32 division; `w' = q * scale`.
//! A row whose length is not a multiple of 128 ends with a shorter block (as if zero-padded).
//!
//! Layout (chosen for wide GPU loads): each row is padded to whole blocks; a block is 16 u32 words
//! (64 bytes); element `i` of a block is nibble `i % 8` (bits `4*(i%8)..`) of word `i / 8`, stored
//! as `q + 8` in 0..=15. Padding elements hold 8 (q = 0). Scales are a separate `[rows, blocks]`
//! array of bf16 bit patterns.

use half::bf16;

pub const BLOCK: usize = 128;
pub const WORDS_PER_BLOCK: usize = BLOCK / 8;

pub fn blocks_per_row(cols: usize) -> usize {
    cols.div_ceil(BLOCK)
}

/// One quantized matrix, owned. Files and GPU buffers hold the same two arrays.
#[derive(Clone, Debug, PartialEq)]
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    /// `rows * blocks_per_row(cols) * 16` words.
    pub qweight: Vec<u32>,
    /// `rows * blocks_per_row(cols)` bf16 bit patterns.
    pub scales: Vec<u16>,
}

/// Scale of one block, as the bf16 that is stored.
pub fn block_scale(block: &[f32]) -> bf16 {
    let absmax = block.iter().fold(0.0f32, |m, &w| m.max(w.abs()));
    if absmax == 0.0 {
        bf16::ONE
    } else {
        bf16::from_f32(absmax / 7.0)
    }
}

/// Quantizes one value with its block's scale, as a signed level in -8..=7.
pub fn quantize_value(w: f32, scale: f32) -> i32 {
    ((w / scale).round_ties_even() as i32).clamp(-8, 7)
}

/// Quantizes one row into its words and scales (`out_words`: blocks*16, `out_scales`: blocks).
pub fn quantize_row(row: &[f32], out_words: &mut [u32], out_scales: &mut [u16]) {
    let blocks = blocks_per_row(row.len());
    assert_eq!(out_words.len(), blocks * WORDS_PER_BLOCK);
    assert_eq!(out_scales.len(), blocks);
    out_words.fill(0x8888_8888);
    for (b, block) in row.chunks(BLOCK).enumerate() {
        let scale = block_scale(block);
        out_scales[b] = scale.to_bits();
        let s = scale.to_f32();
        for (i, &w) in block.iter().enumerate() {
            let nibble = (quantize_value(w, s) + 8) as u32;
            let word = &mut out_words[b * WORDS_PER_BLOCK + i / 8];
            let shift = 4 * (i % 8);
            *word = (*word & !(0xF << shift)) | (nibble << shift);
        }
    }
}

impl QMatrix {
    /// Quantizes a row-major `[rows, cols]` f32 matrix, rows in parallel.
    pub fn quantize(data: &[f32], rows: usize, cols: usize) -> QMatrix {
        use rayon::prelude::*;
        assert_eq!(
            data.len(),
            rows * cols,
            "matrix data does not match its shape"
        );
        let bpr = blocks_per_row(cols);
        let mut qweight = vec![0u32; rows * bpr * WORDS_PER_BLOCK];
        let mut scales = vec![0u16; rows * bpr];
        qweight
            .par_chunks_mut(bpr * WORDS_PER_BLOCK)
            .zip(scales.par_chunks_mut(bpr))
            .zip(data.par_chunks(cols))
            .for_each(|((words, sc), row)| quantize_row(row, words, sc));
        QMatrix {
            rows,
            cols,
            qweight,
            scales,
        }
    }

    pub fn blocks_per_row(&self) -> usize {
        blocks_per_row(self.cols)
    }

    pub fn view(&self) -> QView<'_> {
        QView {
            rows: self.rows,
            cols: self.cols,
            qweight: &self.qweight,
            scales: &self.scales,
        }
    }
}

/// A borrowed quantized matrix (from a memory-mapped file or a `QMatrix`).
#[derive(Clone, Copy, Debug)]
pub struct QView<'a> {
    pub rows: usize,
    pub cols: usize,
    pub qweight: &'a [u32],
    pub scales: &'a [u16],
}

impl<'a> QView<'a> {
    pub fn blocks_per_row(&self) -> usize {
        blocks_per_row(self.cols)
    }

    /// Row `r`'s words (`blocks_per_row * 16`) and bf16 scales (`blocks_per_row`).
    pub fn row(&self, r: usize) -> (&'a [u32], &'a [u16]) {
        let bpr = self.blocks_per_row();
        (
            &self.qweight[r * bpr * WORDS_PER_BLOCK..(r + 1) * bpr * WORDS_PER_BLOCK],
            &self.scales[r * bpr..(r + 1) * bpr],
        )
    }

    /// Dequantizes row `r` into `out` (`cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (words, scales) = self.row(r);
        for (c, o) in out.iter_mut().enumerate().take(self.cols) {
            let b = c / BLOCK;
            let i = c % BLOCK;
            let nibble = (words[b * WORDS_PER_BLOCK + i / 8] >> (4 * (i % 8))) & 0xF;
            *o = (nibble as i32 - 8) as f32 * bf16::from_bits(scales[b]).to_f32();
        }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, row) in out.chunks_mut(self.cols).enumerate() {
            self.dequantize_row(r, row);
        }
        out
    }

    /// `y[r] = sum_c W[r, c] * x[c]` in f32, dequantizing on the fly (the CPU oracle's matvec).
    /// A block is summed in 8 partial sums, one per nibble position of a word (independent sums
    /// the compiler vectorizes: twice as fast as one running sum), then scaled once.
    pub fn matvec(&self, x: &[f32], y: &mut [f32]) {
        use rayon::prelude::*;
        assert_eq!(x.len(), self.cols);
        assert_eq!(y.len(), self.rows);
        y.par_iter_mut().enumerate().for_each(|(r, out)| {
            let (words, scales) = self.row(r);
            let mut acc = 0.0f32;
            for ((block, xb), &scale) in words
                .chunks_exact(WORDS_PER_BLOCK)
                .zip(x.chunks(BLOCK))
                .zip(scales)
            {
                let mut lanes = [0.0f32; 8];
                for (&word, x8) in block.iter().zip(xb.chunks(8)) {
                    for (j, &xv) in x8.iter().enumerate() {
                        lanes[j] += (((word >> (4 * j)) & 0xF) as i32 - 8) as f32 * xv;
                    }
                }
                acc += lanes.iter().sum::<f32>() * bf16::from_bits(scale).to_f32();
            }
            *out = acc;
        });
    }
}

/// Activations quantized to int8 for the integer-dot GEMV (decode), one spec for the CPU
/// reference and the GPU kernels (shaders/quant_act.wgsl, shaders/gemv_q4_q8.wgsl).
///
/// Blocks of [`ACT_BLOCK`] = 32 consecutive values (a quarter of a weight block); the vector is
/// zero-padded to whole weight blocks of 128. Per block: `d = absmax / 127` (f32 division),
/// `q = clamp(round_half_even(x / d), -127, 127)` (all zero when `d = 0`), and `sum = d * Σq`.
/// An RMSNorm input is quantized before its scalar `1 / rms` is applied, which then multiplies
/// `d` ([`ActQ8::quantize_scaled`]).
/// With the weight levels `n - 8` (n the stored nibble) a block's product is
/// `Σ (n - 8) q d = d Σ n q - 8 sum`: an exact integer dot product of nibbles and int8 values,
/// then two float operations; the weight block's bf16 scale multiplies the result.
#[derive(Clone, Debug, PartialEq)]
pub struct ActQ8 {
    /// Values in the unpadded vector.
    pub len: usize,
    /// `blocks_per_row(len) * 128` int8 values (padding zero).
    pub q: Vec<i8>,
    /// Per block of 32: `d`.
    pub d: Vec<f32>,
    /// Per block of 32: `d * Σq`.
    pub sum: Vec<f32>,
}

pub const ACT_BLOCK: usize = 32;

/// How a decode step (one token) multiplies activations with INT4 weights; prompt chunks always
/// use f32 activations (rounded to f16 on tensor cores).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecodeActivations {
    /// f32 activations against dequantized weights.
    F32,
    /// Activations quantized once per input as [`ActQ8`] specifies, integer dot products.
    #[default]
    Int8,
}

impl DecodeActivations {
    pub fn parse(text: &str) -> crate::error::Result<DecodeActivations> {
        match text {
            "f32" => Ok(DecodeActivations::F32),
            "int8" => Ok(DecodeActivations::Int8),
            _ => Err(crate::error::Error::Invalid(format!(
                "unknown decode activations {text:?}: use int8 or f32"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DecodeActivations::F32 => "f32",
            DecodeActivations::Int8 => "int8",
        }
    }
}

/// `t.round_ties_even()` for |t| ≤ 2^22 (and NaN stays NaN): adding and subtracting 1.5 · 2^23
/// leaves no fraction bits, so the addition rounds to the nearest integer, ties to even. Without
/// SSE4.1 in the baseline target `round_ties_even` is a libm call, which took 3 % of a CPU
/// decode step quantizing activations (levels are within ±127.00002).
#[inline(always)]
fn round_half_even_small(t: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (t + MAGIC) - MAGIC
}

impl ActQ8 {
    pub fn quantize(x: &[f32]) -> ActQ8 {
        ActQ8::quantize_scaled(x, 1.0)
    }

    /// The vector `scale * x`, quantized as the levels of `x` with every block's `d` multiplied
    /// by `scale`: how an RMSNorm input is quantized (`x` the residual times the norm weight,
    /// `scale = 1 / rms`), so that a GEMV can apply the norm's scalar to its sums at the end.
    pub fn quantize_scaled(x: &[f32], scale_by: f32) -> ActQ8 {
        let padded = blocks_per_row(x.len()) * BLOCK;
        let mut q = vec![0i8; padded];
        let mut d = vec![0.0f32; padded / ACT_BLOCK];
        let mut sum = vec![0.0f32; padded / ACT_BLOCK];
        for (b, block) in x.chunks(ACT_BLOCK).enumerate() {
            let absmax = block.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
            let block_d = absmax / 127.0;
            if block_d == 0.0 {
                continue;
            }
            let mut total = 0i32;
            for (i, &v) in block.iter().enumerate() {
                let level = (round_half_even_small(v / block_d) as i32).clamp(-127, 127);
                q[b * ACT_BLOCK + i] = level as i8;
                total += level;
            }
            d[b] = block_d * scale_by;
            sum[b] = d[b] * total as f32;
        }
        ActQ8 {
            len: x.len(),
            q,
            d,
            sum,
        }
    }

    /// The values the quantized vector stands for (`q * d`), `len` of them.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.len)
            .map(|i| self.q[i] as f32 * self.d[i / ACT_BLOCK])
            .collect()
    }

    /// The GPU layout of `q`: per block of 32, 8 words; word `2j` holds values `8j, 8j+2, 8j+4,
    /// 8j+6` and word `2j+1` values `8j+1, 8j+3, 8j+5, 8j+7` (bytes from the lowest), the order
    /// in which `w & 0x0F0F0F0F` and `(w >> 4) & 0x0F0F0F0F` lay out the nibbles of weight word j.
    pub fn packed_words(&self) -> Vec<u32> {
        let byte = |i: usize| self.q[i] as u8 as u32;
        let mut out = Vec::with_capacity(self.q.len() / 4);
        for block in 0..self.q.len() / ACT_BLOCK {
            for j in 0..4 {
                for odd in 0..2 {
                    let base = block * ACT_BLOCK + 8 * j + odd;
                    out.push(
                        byte(base)
                            | byte(base + 2) << 8
                            | byte(base + 4) << 16
                            | byte(base + 6) << 24,
                    );
                }
            }
        }
        out
    }

    /// `(d, sum)` per block of 32, interleaved: the GPU layout.
    pub fn packed_scales(&self) -> Vec<f32> {
        self.d
            .iter()
            .zip(&self.sum)
            .flat_map(|(&d, &s)| [d, s])
            .collect()
    }
}

impl QView<'_> {
    /// `y[r] = Σ_c W[r, c] x[c]` with x quantized as [`ActQ8`] says: per block of 32, the exact
    /// integer dot product of nibbles and int8 values, then `d * dot - 8 * sum`, times the
    /// weight block's scale (the GPU integer-dot GEMV's arithmetic, in this order per row).
    pub fn matvec_q8(&self, x: &ActQ8, y: &mut [f32]) {
        use rayon::prelude::*;
        assert_eq!(x.len, self.cols);
        assert_eq!(y.len(), self.rows);
        y.par_iter_mut().enumerate().for_each(|(r, out)| {
            let (words, scales) = self.row(r);
            let mut acc = 0.0f32;
            for (qi, quarter) in words.chunks_exact(4).enumerate() {
                let xq = &x.q[qi * ACT_BLOCK..(qi + 1) * ACT_BLOCK];
                let mut dot = 0i32;
                for (i, &xv) in xq.iter().enumerate() {
                    let nibble = (quarter[i / 8] >> (4 * (i % 8))) & 0xF;
                    dot += nibble as i32 * xv as i32;
                }
                let t = x.d[qi] * dot as f32 - 8.0 * x.sum[qi];
                acc = t.mul_add(bf16::from_bits(scales[qi / 4]).to_f32(), acc);
            }
            *out = acc;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The magic-number rounding equals `round_ties_even` on every f32 of magnitude 0.25 to 128
    /// (every representable value: ties, values an ulp off a tie), on every 97th smaller one
    /// (signed zeros included), and keeps NaN.
    #[test]
    fn small_rounding_equals_round_ties_even_on_the_level_range() {
        let (quarter, top) = (0.25f32.to_bits(), 128.0f32.to_bits());
        let small = (0..quarter).step_by(97).chain([0]);
        for magnitude in (quarter..=top).chain(small) {
            for t in [f32::from_bits(magnitude), -f32::from_bits(magnitude)] {
                let (got, want) = (round_half_even_small(t), t.round_ties_even());
                assert!(got == want, "{t:e}: {got} against {want}");
            }
        }
        assert!(round_half_even_small(f32::NAN).is_nan());
    }

    #[test]
    fn known_block_quantizes_as_specified() {
        // absmax 7 → scale 1; 2.5 rounds half to even → 2; -3.5 → -4; 7 → 7; -7 → -7.
        let mut row = vec![0.0f32; 128];
        row[0] = 2.5;
        row[1] = -3.5;
        row[2] = 7.0;
        row[9] = -7.0;
        let m = QMatrix::quantize(&row, 1, 128);
        assert_eq!(bf16::from_bits(m.scales[0]).to_f32(), 1.0);
        let d = m.view().dequantize();
        assert_eq!(&d[..3], &[2.0, -4.0, 7.0]);
        assert_eq!(d[9], -7.0);
        assert_eq!(m.qweight[0] & 0xF, 10); // 2 + 8 in the lowest nibble
        assert_eq!(m.qweight[1] & 0xF, 8); // element 8: zero
        assert_eq!((m.qweight[1] >> 4) & 0xF, 1); // element 9: -7 + 8
    }

    #[test]
    fn zero_block_has_scale_one_and_short_rows_pad_with_zero() {
        let row = vec![0.0f32; 200]; // one full block, one of 72
        let m = QMatrix::quantize(&row, 1, 200);
        assert_eq!(m.scales, vec![bf16::ONE.to_bits(); 2]);
        assert!(m.qweight.iter().all(|&w| w == 0x8888_8888));
    }

    #[test]
    fn round_trip_error_is_within_half_a_step() {
        let rows = 3;
        let cols = 300;
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1 + i % 5) as f32)
            .collect();
        let m = QMatrix::quantize(&data, rows, cols);
        let d = m.view().dequantize();
        for r in 0..rows {
            for (b, block) in data[r * cols..(r + 1) * cols].chunks(BLOCK).enumerate() {
                let s = bf16::from_bits(m.scales[r * m.blocks_per_row() + b]).to_f32();
                for (i, &w) in block.iter().enumerate() {
                    let err = (w - d[r * cols + b * BLOCK + i]).abs();
                    // Half a step, plus the clamp at -8..7 when bf16 rounds the scale down.
                    assert!(
                        err <= 0.5 * s * 1.01 + 1e-6 || (w / s).abs() > 7.0,
                        "r{r} b{b} i{i}: {w} vs err {err}"
                    );
                }
            }
        }
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut y = vec![f32::NAN; rows];
        m.view().matvec(&x, &mut y);
        for r in 0..rows {
            let want: f32 = (0..cols).map(|c| d[r * cols + c] * x[c]).sum();
            assert!(
                (want - y[r]).abs() <= 1e-4 * want.abs().max(1.0),
                "row {r}: {want} vs {}",
                y[r]
            );
        }
    }
}
