//! The fast CPU INT4 × int8 matmul: the spec of [`QView::matvec_q8`] (exact integer dot products
//! per quarter block of 32, then per row `t = d * dot - 8 * sum`, `acc = t.mul_add(scale, acc)`
//! in quarter order), computed with SIMD chosen at run time and rows split across rayon threads.
//! The integer sums are exact and every row performs the same float operations in the same order,
//! so results are bit-identical to `matvec_q8` on every instruction set (the tests check this).
//!
//! Up to [`MAX_TOKENS`] activation vectors share one pass over the weights (prompts): each block
//! of weights is loaded and unpacked once, then multiplied with every token's values.
//!
//! Activations are repacked per weight block of 128 to match the nibble layout: byte `m` of a
//! quarter's 16 weight bytes holds element `2m` (low nibble) and `2m + 1` (high nibble), so a
//! block's values are stored as the even elements of its 4 quarters (64 bytes), then the odd ones.

use crate::error::{Error, Result};
use crate::quant::{ActQ8, QView, ACT_BLOCK, BLOCK, WORDS_PER_BLOCK};
use half::bf16;
use rayon::prelude::*;

/// Most activation vectors one pass over the weights serves.
pub const MAX_TOKENS: usize = 8;
/// Rows one thread walks through together.
const ROWS: usize = 4;
/// Bytes of one weight block (128 nibbles).
const BLOCK_BYTES: usize = WORDS_PER_BLOCK * 4;

/// An instruction set the kernel can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Isa {
    /// Plain Rust (the compiler may vectorize it for the baseline target).
    Portable,
    /// x86-64 AVX2 + FMA: `maddubs` (unsigned nibbles × signed int8), `madd` to i32.
    Avx2,
    /// x86-64 AVX-512 BW + VNNI: `vpdpbusd` on 64 bytes at once.
    Avx512Vnni,
    /// aarch64 NEON: widening multiplies (`smull`/`smlal`) to i16, then a widening sum.
    Neon,
}

const ALL: [Isa; 4] = [Isa::Portable, Isa::Avx2, Isa::Avx512Vnni, Isa::Neon];

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Neon => "neon",
        }
    }

    /// An instruction set by name; an error if unknown or not available on this CPU.
    pub fn parse(text: &str) -> Result<Isa> {
        let names: Vec<&str> = Isa::available().iter().map(|i| i.name()).collect();
        match ALL.iter().find(|i| i.name() == text) {
            Some(&isa) if isa.is_available() => Ok(isa),
            Some(_) => Err(Error::Invalid(format!(
                "this CPU lacks {text}; available: {}",
                names.join(", ")
            ))),
            None => Err(Error::Invalid(format!(
                "unknown instruction set {text:?}; available: {}",
                names.join(", ")
            ))),
        }
    }

    /// Whether this CPU runs the kernel (detected at run time).
    pub fn is_available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every instruction set this CPU runs, slowest first.
    pub fn available() -> Vec<Isa> {
        ALL.into_iter().filter(|i| i.is_available()).collect()
    }

    /// The fastest instruction set this CPU runs.
    pub fn best() -> Isa {
        *Isa::available().last().unwrap_or(&Isa::Portable)
    }
}

/// An [`ActQ8`] vector in the kernel's layout (see the module comment).
#[derive(Clone, Debug)]
pub struct PackedAct {
    len: usize,
    /// Per weight block: 64 even-element values (quarter by quarter), then 64 odd ones.
    q: Vec<i8>,
    d: Vec<f32>,
    sum: Vec<f32>,
}

impl PackedAct {
    pub fn new(x: &ActQ8) -> PackedAct {
        let mut q = vec![0i8; x.q.len()];
        for (out, block) in q.chunks_exact_mut(BLOCK).zip(x.q.chunks_exact(BLOCK)) {
            for (k, quarter) in block.chunks_exact(ACT_BLOCK).enumerate() {
                for i in 0..ACT_BLOCK / 2 {
                    out[16 * k + i] = quarter[2 * i];
                    out[64 + 16 * k + i] = quarter[2 * i + 1];
                }
            }
        }
        PackedAct {
            len: x.len,
            q,
            d: x.d.clone(),
            sum: x.sum.clone(),
        }
    }
}

/// The spec's float steps for one weight block: four quarters in order.
#[inline(always)]
fn epilogue(mut acc: f32, dots: [i32; 4], d: &[f32], sum: &[f32], scale: f32) -> f32 {
    for k in 0..4 {
        let t = d[k] * dots[k] as f32 - 8.0 * sum[k];
        acc = t.mul_add(scale, acc);
    }
    acc
}

/// `y = W x` for one vector (a decode step).
pub fn matvec(isa: Isa, w: &QView, x: &PackedAct, y: &mut [f32]) {
    let mut outs = matmul(isa, w, &[x]);
    y.copy_from_slice(&outs.swap_remove(0));
}

/// `W x` for each of `xs`, one output vector per input; several inputs share each pass over `W`.
pub fn matmul(isa: Isa, w: &QView, xs: &[&PackedAct]) -> Vec<Vec<f32>> {
    matmul_each(isa, &[w], xs).swap_remove(0)
}

/// [`matmul`] for several matrices of the same input width (q, k and v; gate and up) in one
/// parallel section per up to 32 inputs: one wait for the threads instead of one per matrix.
/// Outputs: `[matrix][input][row]`.
pub fn matmul_each(isa: Isa, ws: &[&QView], xs: &[&PackedAct]) -> Vec<Vec<Vec<f32>>> {
    assert!(
        isa.is_available(),
        "{} is not available on this CPU",
        isa.name()
    );
    for w in ws {
        let bpr = w.blocks_per_row();
        assert_eq!(w.qweight.len(), w.rows * bpr * WORDS_PER_BLOCK);
        assert_eq!(w.scales.len(), w.rows * bpr);
        for x in xs {
            assert_eq!(x.len, w.cols, "activation length does not match the matrix");
            assert_eq!(x.q.len(), bpr * BLOCK);
        }
    }
    let mut outs: Vec<Vec<Vec<f32>>> = ws.iter().map(|_| Vec::with_capacity(xs.len())).collect();
    for part in xs.chunks(MAX_TOKENS * GROUPS_PER_PASS) {
        for (out, ys) in outs.iter_mut().zip(pass(isa, ws, part)) {
            out.extend(ys);
        }
    }
    outs
}

/// Groups of [`MAX_TOKENS`] inputs that one pass over the weights serves. Each chunk of rows
/// runs them one after another while its weights stay in cache; with many, their inputs no
/// longer stay in L1 (2 cores, a 0.5B model's 256-token prompt: 32 groups per pass ran 8 %
/// slower than one). 4 against 1 on the H200 host's 16 cores, 32B shape: pp64 +4-7 %, pp256
/// +1 % (benchmarks/NOTES.md §18).
const GROUPS_PER_PASS: usize = 4;

/// One parallel section of [`matmul_each`]: every row of every matrix for `xs`.
fn pass(isa: Isa, ws: &[&QView], xs: &[&PackedAct]) -> Vec<Vec<Vec<f32>>> {
    let total_rows: usize = ws.iter().map(|w| w.rows).sum();
    // Rows split into chunks (multiples of 8) that keep every thread busy.
    let chunk_rows = (total_rows / (rayon::current_num_threads() * 8)).clamp(8, 64) / 8 * 8;
    let groups: Vec<&[&PackedAct]> = xs.chunks(MAX_TOKENS).collect();
    let inputs = xs.len();
    // A work item is a chunk of rows for every group of inputs: its weights (at most 64 rows,
    // under 1 MB) come from memory for the first group and from cache for the others, so a long
    // prompt passes over W once, not once per MAX_TOKENS inputs. Its results are contiguous:
    // per group, rows × the group's inputs, input fastest.
    let mut inter: Vec<Vec<f32>> = ws.iter().map(|w| vec![0.0f32; w.rows * inputs]).collect();
    let mut work: Vec<(&QView, usize, &mut [f32])> = Vec::new();
    for (w, buf) in ws.iter().zip(inter.iter_mut()) {
        for (c, out) in buf.chunks_mut(chunk_rows * inputs).enumerate() {
            work.push((w, c * chunk_rows, out));
        }
    }
    work.into_par_iter().for_each(|(w, row0, out)| {
        let n_rows = out.len() / inputs;
        let mut rest = out;
        for group in &groups {
            let (mine, tail) = rest.split_at_mut(n_rows * group.len());
            rows(isa, w, group, row0, mine);
            rest = tail;
        }
    });
    let mut outs: Vec<Vec<Vec<f32>>> = Vec::with_capacity(ws.len());
    for (w, buf) in ws.iter().zip(&inter) {
        let mut per_input = vec![vec![0.0f32; w.rows]; inputs];
        for (c, chunk) in buf.chunks(chunk_rows * inputs).enumerate() {
            let (row0, n_rows) = (c * chunk_rows, chunk.len() / inputs);
            let mut region = chunk;
            for (g, group) in groups.iter().enumerate() {
                let n = group.len();
                let (mine, tail) = region.split_at(n_rows * n);
                for (t, y) in per_input[g * MAX_TOKENS..g * MAX_TOKENS + n]
                    .iter_mut()
                    .enumerate()
                {
                    for (r, v) in y[row0..row0 + n_rows].iter_mut().enumerate() {
                        *v = mine[r * n + t];
                    }
                }
                region = tail;
            }
        }
        outs.push(per_input);
    }
    outs
}

/// Rows `row0..` (as many as `out` holds, `out.len() / xs.len()`) for every input.
fn rows(isa: Isa, w: &QView, xs: &[&PackedAct], row0: usize, out: &mut [f32]) {
    let bytes: &[u8] = bytemuck::cast_slice(w.qweight);
    let rows = RowSet {
        bytes,
        scales: w.scales,
        bpr: w.blocks_per_row(),
        row0,
        xs,
    };
    match isa {
        Isa::Portable => portable::rows(&rows, out),
        // SAFETY: `matmul` checked that this CPU has the instruction set.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::rows_avx2(&rows, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe { x86::rows_avx512vnni(&rows, out) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { arm::rows_neon(&rows, out) },
        #[allow(unreachable_patterns)]
        _ => unreachable!("an unavailable instruction set passed the check"),
    }
}

/// What one thread's share of the work reads.
#[derive(Clone, Copy)]
struct RowSet<'a> {
    /// All of the matrix's weight bytes.
    bytes: &'a [u8],
    scales: &'a [u16],
    bpr: usize,
    row0: usize,
    xs: &'a [&'a PackedAct],
}

impl<'a> RowSet<'a> {
    /// Runs `block_dots(weight block bytes, activation block values) -> four quarter dots`
    /// over the rows `out` covers and applies the spec's float steps.
    #[inline(always)]
    fn run<W: Copy>(
        &self,
        out: &mut [f32],
        load: impl Fn(&'a [u8]) -> W,
        block_dots: impl Fn(W, &[i8]) -> [i32; 4],
    ) {
        let n = self.xs.len();
        let row_bytes = self.bpr * BLOCK_BYTES;
        // Rows in groups of ROWS, block by block: their float chains (one per row and token)
        // are independent, so the CPU overlaps their latencies.
        for (g, out_rows) in out.chunks_mut(ROWS * n).enumerate() {
            let r0 = self.row0 + g * ROWS;
            let group = out_rows.len() / n;
            let mut acc = [[0.0f32; MAX_TOKENS]; ROWS];
            for b in 0..self.bpr {
                let xq = |x: &'a PackedAct| &x.q[b * BLOCK..(b + 1) * BLOCK];
                for (j, acc_row) in acc.iter_mut().enumerate().take(group) {
                    let r = r0 + j;
                    let start = r * row_bytes + b * BLOCK_BYTES;
                    let weights = load(&self.bytes[start..start + BLOCK_BYTES]);
                    let scale = bf16::from_bits(self.scales[r * self.bpr + b]).to_f32();
                    for (a, &x) in acc_row.iter_mut().zip(self.xs) {
                        let dots = block_dots(weights, xq(x));
                        let (d, sum) = (&x.d[4 * b..4 * b + 4], &x.sum[4 * b..4 * b + 4]);
                        *a = epilogue(*a, dots, d, sum, scale);
                    }
                }
            }
            for (out_row, acc_row) in out_rows.chunks_exact_mut(n).zip(&acc) {
                out_row.copy_from_slice(&acc_row[..n]);
            }
        }
    }
}

mod portable {
    use super::RowSet;

    pub fn rows(rows: &RowSet, out: &mut [f32]) {
        rows.run(
            out,
            |w| w,
            |w, a| {
                let mut dots = [0i32; 4];
                for (k, dot) in dots.iter_mut().enumerate() {
                    let (even, odd) = (&a[16 * k..16 * k + 16], &a[64 + 16 * k..64 + 16 * k + 16]);
                    for (i, &byte) in w[16 * k..16 * k + 16].iter().enumerate() {
                        *dot += (byte & 0xF) as i32 * even[i] as i32
                            + (byte >> 4) as i32 * odd[i] as i32;
                    }
                }
                dots
            },
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{RowSet, BLOCK, BLOCK_BYTES, MAX_TOKENS};
    use half::bf16;
    use std::arch::x86_64::*;

    /// Rows in groups of eight, the spec's float steps on eight rows at once (one row per lane:
    /// each lane does the scalar steps, in the same order); the rows left over one at a time.
    /// `block_dots` gives a block's four quarter dots as `[q0 q1 q2 q3]`.
    /// Callers must have AVX2 and FMA (they are `target_feature` functions that inline this).
    /// `dots8` gives the quarter dots of eight rows' blocks as four vectors, quarter k's dots of
    /// rows 0..8 in vector k (each kernel sums its eight rows' partial dots its own way).
    #[inline(always)]
    fn by_eight<'a, W: Copy>(
        rows: &RowSet<'a>,
        out: &mut [f32],
        load: impl Fn(&'a [u8]) -> W,
        block_dots: impl Fn(W, &[i8]) -> __m128i,
        dots8: impl Fn(&[W; 8], &[i8]) -> [__m256i; 4],
    ) {
        let n = rows.xs.len();
        let full = out.len() / (8 * n) * 8 * n;
        let (eights, rest) = out.split_at_mut(full);
        for (g, group) in eights.chunks_exact_mut(8 * n).enumerate() {
            eight_rows(rows, rows.row0 + 8 * g, group, &load, &dots8);
        }
        let rest_rows = RowSet {
            row0: rows.row0 + full / n,
            ..*rows
        };
        rest_rows.run(rest, &load, |w, a| {
            let mut dots = [0i32; 4];
            // SAFETY: 16 bytes into a [i32; 4].
            unsafe { _mm_storeu_si128(dots.as_mut_ptr().cast(), block_dots(w, a)) };
            dots
        });
    }

    #[inline(always)]
    fn eight_rows<'a, W: Copy>(
        rows: &RowSet<'a>,
        r0: usize,
        out: &mut [f32],
        load: &impl Fn(&'a [u8]) -> W,
        dots8: &impl Fn(&[W; 8], &[i8]) -> [__m256i; 4],
    ) {
        let (bpr, n) = (rows.bpr, rows.xs.len());
        // SAFETY (whole function): the callers have AVX2 and FMA.
        unsafe {
            prefetch_next_group(rows, r0);
            let mut acc = [_mm256_setzero_ps(); MAX_TOKENS];
            for b in 0..bpr {
                let scale: [f32; 8] = std::array::from_fn(|j| {
                    bf16::from_bits(rows.scales[(r0 + j) * bpr + b]).to_f32()
                });
                let scale = _mm256_loadu_ps(scale.as_ptr());
                let w: [W; 8] = std::array::from_fn(|j| {
                    let start = ((r0 + j) * bpr + b) * BLOCK_BYTES;
                    load(&rows.bytes[start..start + BLOCK_BYTES])
                });
                for (a, x) in acc.iter_mut().zip(rows.xs) {
                    let xq = &x.q[b * BLOCK..(b + 1) * BLOCK];
                    for (k, dots) in dots8(&w, xq).into_iter().enumerate() {
                        let t = _mm256_sub_ps(
                            _mm256_mul_ps(_mm256_set1_ps(x.d[4 * b + k]), _mm256_cvtepi32_ps(dots)),
                            _mm256_set1_ps(8.0 * x.sum[4 * b + k]),
                        );
                        *a = _mm256_fmadd_ps(t, scale, *a);
                    }
                }
            }
            for (t, a) in acc.iter().take(n).enumerate() {
                let mut lanes = [0.0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
                for (j, &v) in lanes.iter().enumerate() {
                    out[j * n + t] = v;
                }
            }
        }
    }

    /// Short rows (a small model's K): asks for the next eight rows' bytes while these are
    /// computed. Each row is then a stream of a few hundred bytes, too short for the hardware
    /// prefetchers to follow (one thread read 6.9 GB/s of weights at K = 896 against 14.5 at
    /// K = 8192, benchmarks/NOTES.md §12). Long rows are left to the hardware.
    #[inline(always)]
    fn prefetch_next_group(rows: &RowSet, r0: usize) {
        const MOST: usize = 16 << 10;
        let group = 8 * rows.bpr * BLOCK_BYTES;
        let start = (r0 + 8) * rows.bpr * BLOCK_BYTES;
        if group > MOST || start >= rows.bytes.len() {
            return;
        }
        let next = &rows.bytes[start..(start + group).min(rows.bytes.len())];
        for line in next.chunks(64) {
            // SAFETY: SSE is part of x86-64; a prefetch reads nothing architecturally.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
        }
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows_avx2(rows: &RowSet, out: &mut [f32]) {
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let load = |w: &[u8]| {
            // SAFETY: a weight block is 64 bytes; unaligned loads.
            let (w01, w23) = unsafe {
                (
                    _mm256_loadu_si256(w.as_ptr().cast()),
                    _mm256_loadu_si256(w.as_ptr().add(32).cast()),
                )
            };
            [
                _mm256_and_si256(w01, mask),
                _mm256_and_si256(_mm256_srli_epi16::<4>(w01), mask),
                _mm256_and_si256(w23, mask),
                _mm256_and_si256(_mm256_srli_epi16::<4>(w23), mask),
            ]
        };
        // i32 lanes 0..4: quarter 0 (resp. 2)'s partial sums, lanes 4..8: quarter 1 (resp. 3)'s.
        let partials = |[lo01, hi01, lo23, hi23]: [__m256i; 4], a: &[i8]| {
            // SAFETY: an activation block is 128 bytes.
            let p = a.as_ptr();
            let (e01, e23, o01, o23) = unsafe {
                (
                    _mm256_loadu_si256(p.cast()),
                    _mm256_loadu_si256(p.add(32).cast()),
                    _mm256_loadu_si256(p.add(64).cast()),
                    _mm256_loadu_si256(p.add(96).cast()),
                )
            };
            // Pairs of u8 × i8 products fit i16: 2 · 2 · 15 · 127 < 2^15.
            let p01 = _mm256_add_epi16(
                _mm256_maddubs_epi16(lo01, e01),
                _mm256_maddubs_epi16(hi01, o01),
            );
            let p23 = _mm256_add_epi16(
                _mm256_maddubs_epi16(lo23, e23),
                _mm256_maddubs_epi16(hi23, o23),
            );
            (_mm256_madd_epi16(p01, ones), _mm256_madd_epi16(p23, ones))
        };
        let dots = |w: [__m256i; 4], a: &[i8]| {
            let (s01, s23) = partials(w, a);
            let h = _mm256_hadd_epi32(s01, s23);
            let h = _mm256_hadd_epi32(h, h); // [q0 q2 q0 q2 | q1 q3 q1 q3]
            _mm_unpacklo_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h))
            // [q0 q1 q2 q3]
        };
        let dots8 = |w: &[[__m256i; 4]; 8], a: &[i8]| {
            let s: [(__m256i, __m256i); 8] = std::array::from_fn(|j| partials(w[j], a));
            let [q0, q1] = eight_sums(std::array::from_fn(|j| s[j].0));
            let [q2, q3] = eight_sums(std::array::from_fn(|j| s[j].1));
            [q0, q1, q2, q3]
        };
        by_eight(rows, out, load, dots, dots8);
    }

    /// Eight rows' partial sums (each: lanes 0..4 one quarter's, lanes 4..8 the next one's) as
    /// the two quarters' totals of rows 0..8, lane j row j: three rounds of pairwise horizontal
    /// adds and two lane swaps for the eight rows, where each row alone took four shuffles and
    /// the eight a transpose (integer sums: the order is exact).
    #[inline(always)]
    fn eight_sums(s: [__m256i; 8]) -> [__m256i; 2] {
        // SAFETY: AVX2 (the caller's target feature).
        unsafe {
            let h01 = _mm256_hadd_epi32(s[0], s[1]);
            let h23 = _mm256_hadd_epi32(s[2], s[3]);
            let h45 = _mm256_hadd_epi32(s[4], s[5]);
            let h67 = _mm256_hadd_epi32(s[6], s[7]);
            // Low 128 bits: rows 0..4 (resp. 4..8) of the first quarter; high: of the second.
            let g0 = _mm256_hadd_epi32(h01, h23);
            let g1 = _mm256_hadd_epi32(h45, h67);
            [
                _mm256_permute2x128_si256::<0x20>(g0, g1),
                _mm256_permute2x128_si256::<0x31>(g0, g1),
            ]
        }
    }

    /// # Safety
    /// The CPU must have AVX-512 F, BW, VNNI and FMA.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
    pub unsafe fn rows_avx512vnni(rows: &RowSet, out: &mut [f32]) {
        let mask = _mm512_set1_epi8(0x0F);
        // Lane 4k of the summed vector holds quarter k's total.
        let firsts = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
        let load = |w: &[u8]| {
            // SAFETY: a weight block is 64 bytes.
            let v = unsafe { _mm512_loadu_si512(w.as_ptr().cast()) };
            (
                _mm512_and_si512(v, mask),
                _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask),
            )
        };
        // 128-bit lane k: quarter k's four partial sums.
        let partials = |(lo, hi): (__m512i, __m512i), a: &[i8]| {
            // SAFETY: an activation block is 128 bytes.
            let (even, odd) = unsafe {
                (
                    _mm512_loadu_si512(a.as_ptr().cast()),
                    _mm512_loadu_si512(a.as_ptr().add(64).cast()),
                )
            };
            let s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, even);
            _mm512_dpbusd_epi32(s, hi, odd)
        };
        let dots = |w: (__m512i, __m512i), a: &[i8]| {
            let s = partials(w, a);
            let s = _mm512_add_epi32(s, _mm512_shuffle_epi32::<0xB1>(s));
            let s = _mm512_add_epi32(s, _mm512_shuffle_epi32::<0x4E>(s));
            _mm512_castsi512_si128(_mm512_permutexvar_epi32(firsts, s))
        };
        let dots8 = |w: &[(__m512i, __m512i); 8], a: &[i8]| {
            let s: [__m512i; 8] = std::array::from_fn(|j| partials(w[j], a));
            quarters_of_eight(reduce_four(&s[..4]), reduce_four(&s[4..]))
        };
        by_eight(rows, out, load, dots, dots8);
    }

    /// Four rows' partial sums (128-bit lane k: quarter k's four partials) as one vector whose
    /// lane k holds quarter k's totals of the four rows: two transposing unpack-and-add rounds,
    /// where summing each row alone takes three shuffles (integer sums: the order is exact).
    #[inline(always)]
    fn reduce_four(s: &[__m512i]) -> __m512i {
        // SAFETY: AVX-512 F (the caller's target feature).
        unsafe {
            let ab = _mm512_add_epi32(
                _mm512_unpacklo_epi32(s[0], s[1]),
                _mm512_unpackhi_epi32(s[0], s[1]),
            );
            let cd = _mm512_add_epi32(
                _mm512_unpacklo_epi32(s[2], s[3]),
                _mm512_unpackhi_epi32(s[2], s[3]),
            );
            _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd))
        }
    }

    /// Rows 0..4 (`lo`) and 4..8 (`hi`) from [`reduce_four`] as quarter k's eight rows in vector k.
    #[inline(always)]
    fn quarters_of_eight(lo: __m512i, hi: __m512i) -> [__m256i; 4] {
        // SAFETY: AVX-512 F (the caller's target feature).
        unsafe {
            // Lane k of `lo` then lane k of `hi`, for quarters 0 and 1, then 2 and 3.
            let q01 = _mm512_permutex2var_epi32(
                lo,
                _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23),
                hi,
            );
            let q23 = _mm512_permutex2var_epi32(
                lo,
                _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31),
                hi,
            );
            [
                _mm512_castsi512_si256(q01),
                _mm512_extracti64x4_epi64::<1>(q01),
                _mm512_castsi512_si256(q23),
                _mm512_extracti64x4_epi64::<1>(q23),
            ]
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::RowSet;
    use std::arch::aarch64::*;

    /// # Safety
    /// The CPU must have NEON.
    #[target_feature(enable = "neon")]
    pub unsafe fn rows_neon(rows: &RowSet, out: &mut [f32]) {
        rows.run(
            out,
            |w| w,
            |w, a| {
                let mut dots = [0i32; 4];
                for (k, dot) in dots.iter_mut().enumerate() {
                    // SAFETY: 16 weight bytes and 2 × 16 activation bytes of quarter k.
                    unsafe {
                        let v = vld1q_u8(w.as_ptr().add(16 * k));
                        let lo = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F)));
                        let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
                        let even = vld1q_s8(a.as_ptr().add(16 * k));
                        let odd = vld1q_s8(a.as_ptr().add(64 + 16 * k));
                        // Four products per i16 lane: 4 · 15 · 127 < 2^15.
                        let mut p = vmull_s8(vget_low_s8(lo), vget_low_s8(even));
                        p = vmlal_s8(p, vget_high_s8(lo), vget_high_s8(even));
                        p = vmlal_s8(p, vget_low_s8(hi), vget_low_s8(odd));
                        p = vmlal_s8(p, vget_high_s8(hi), vget_high_s8(odd));
                        *dot = vaddlvq_s16(p);
                    }
                }
                dots
            },
        );
    }
}
