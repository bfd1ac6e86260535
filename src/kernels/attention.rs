//! Attention over the f16 KV cache (`shaders/attention.wgsl`): causal, grouped-query, online
//! softmax in f32.
//!
//! Layouts, shared with the RoPE / KV-write kernel:
//! - queries `q` and output `out`: `[m_max, n_heads * head_dim]` f32; token `t` of a step is at
//!   position `pos + t` (queries already roped);
//! - per layer one K and one V buffer of f16 pairs packed in u32 (`pack2x16float`), word
//!   `(kvh * ctx + position) * (head_dim / 2) + i`, holding positions `0..kv_len` (this step's
//!   tokens included);
//! - query head `h` reads KV head `h / (n_heads / n_kv_heads)`; scores are scaled by
//!   `1 / sqrt(head_dim)`; token `t` attends to positions `0..=pos + t`.
//!
//! Two paths, both bound once:
//! - **decode** (one token; flash-decoding, `shaders/attention_decode.wgsl`): pass 1 splits the
//!   sequence into chunks, one workgroup per (KV head, batch of ≤ 8 of its query heads, split), so
//!   each K/V row is read once for the whole batch, with contiguous vector loads; it writes each
//!   split's max, sum and unnormalised output to scratch. The split layout follows `kv_len` at run
//!   time (few splits for short sequences, more for long ones, bounded at bind time from `ctx`);
//!   splits past the end exit at once. Pass 2 rescales the splits of each head to a common max and
//!   divides by the total sum. With int8 decode activations, [`Attention::decode_q8_output`]
//!   swaps in a combine that also writes the o projection's int8 input (each head is whole
//!   32-value blocks), so no quantizer dispatch runs between them. [`DecodeKernel::Legacy`]
//!   keeps the previous decode kernel (in `shaders/attention.wgsl`) for A/B measurement in the
//!   kernel bench.
//! - **prefill** (a chunk of tokens): one workgroup per 32 (token, head) rows of a KV group; tiles of
//!   16 or 32 keys are unpacked into workgroup memory once and used by all 32 rows; causal mask by
//!   position; rows past `n_tokens` are not written.

use super::quant_act::{ActQ8Buffers, Q8_BLOCK};
use super::Dispatch;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use std::collections::HashMap;
use std::sync::Mutex;

const SHADER: &str = include_str!("../../shaders/attention.wgsl");
const DECODE_SHADER: &str = include_str!("../../shaders/attention_decode.wgsl");
use super::gemv_q4_q8::{BATCH_STEP, MAX_BATCH};
/// The grouped decode's rows: one sequence, its length from the step (binding 0).
const DECODE_ONE: &str = "
struct Step { pos: u32, n_tokens: u32, kv_len: u32, pad: u32 }
@group(0) @binding(0) var<uniform> step: Step;
fn live_rows() -> u32 { return 1u; }
fn row_kv_len(row: u32) -> u32 { return step.kv_len; }
fn row_slot(row: u32) -> u32 { return 0u; }
";
/// The rows of a batched decode step (binding 0: batch_step.wgsl's uniform).
const DECODE_BATCH: &str = "
@group(0) @binding(0) var<uniform> batch: BatchStep;
fn live_rows() -> u32 { return min(batch.n_rows, MAX_BATCH); }
fn row_kv_len(row: u32) -> u32 { return batch.rows[row].kv_len; }
fn row_slot(row: u32) -> u32 { return batch.rows[row].slot; }
";

/// Head dimensions the kernels are built for.
pub const SUPPORTED_HEAD_DIMS: [usize; 3] = [32, 64, 128];
/// Query heads one decode workgroup serves (two vec4 quads in the WGSL).
const MAX_HEADS_PER_GROUP: usize = 8;
/// Legacy decode: positions per tile (the WGSL `DEC_TILE`); splits cover whole tiles.
const DECODE_TILE: usize = 64;
/// Legacy decode: at most the WGSL `MAX_SPLITS`, the combine's workgroup array.
const LEGACY_MAX_SPLITS: usize = 512;
/// Grouped decode (`attention_decode.wgsl`): threads per workgroup; each thread has four K or V
/// loads in flight, so a tile is `4 * WG / (head_dim / 8)` positions.
const SPLIT_THREADS: usize = 128;
/// Grouped decode: vec4 slots for a chunk's scores (the WGSL `SC_VEC4`): positions × head quads.
const SPLIT_SCORE_VEC4: usize = 512;
/// Grouped decode: most splits per head the scratch is sized for (a very long context needs
/// `ctx / max_chunk` of them).
const SPLIT_MAX_SPLITS: usize = 4096;

/// Which decode kernel [`Attention::bind`] records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecodeKernel {
    /// Contiguous vector loads, the batch's heads as vec4 lanes, two passes per chunk
    /// (`attention_decode.wgsl`).
    Grouped,
    /// The previous kernel (`attention.wgsl`: one thread per position for scores), kept for A/B.
    Legacy,
}

/// How decode attention splits the sequence. The defaults suit large GPUs and cost little on small
/// ones (a split that is not needed is a workgroup that exits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeOptions {
    pub kernel: DecodeKernel,
    /// Grouped: fewest positions per split (rounded up to whole tiles), so a short sequence uses few
    /// splits and the combine has little to do.
    pub min_split_positions: usize,
    /// Split-pass workgroups wanted once the sequence is long enough; the splits per KV head are
    /// this divided by the workgroups per split. (Legacy: its bound on the workgroups.)
    pub target_workgroups: usize,
    /// Grouped: the P·V loop loads the next tile's V rows only where there is one (without the
    /// guard each split's last tile also loads a tile of clamped rows it never uses: a memory
    /// round trip at the end of every workgroup). `false` is the earlier kernel, for the bench.
    pub v_tail_guard: bool,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            kernel: DecodeKernel::Grouped,
            min_split_positions: 32,
            target_workgroups: 512,
            v_tail_guard: true,
        }
    }
}
/// Prefill rows per workgroup and threads per workgroup (the WGSL `PF_ROWS`, `PF_THREADS`).
const PREFILL_ROWS: usize = 32;
const PREFILL_THREADS: usize = 128;

/// Uniform parameters of the grouped decode entry points (the `attention_decode.wgsl` `Params`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct SplitParams {
    n_heads: u32,
    n_kv_heads: u32,
    group: u32,
    ctx: u32,
    max_splits: u32,
    head_batches: u32,
    min_chunk: u32,
    max_chunk: u32,
    target_splits: u32,
    /// Blocks of 32 of the o projection's int8 input, padding to weight blocks included.
    q8_blocks: u32,
    _pad: [u32; 2],
}

/// The grouped decode's split layout, as the WGSL `split_layout`: positions per split and splits.
/// `n_max` is the count before rounding, which only grows with `kv_len` (the bind-time bound).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitLayout {
    pub chunk: usize,
    pub splits: usize,
    pub n_max: usize,
}

/// The grouped decode kernel's constants for one shape.
#[derive(Clone, Copy, Debug)]
struct SplitShape {
    tile: usize,
    min_chunk: usize,
    max_chunk: usize,
    target_splits: usize,
}

impl SplitShape {
    fn new(
        head_dim: usize,
        heads_per_batch: usize,
        workgroups_per_split: usize,
        o: &DecodeOptions,
    ) -> SplitShape {
        let tile = 4 * SPLIT_THREADS / (head_dim / 8);
        let quads = heads_per_batch.div_ceil(4);
        let max_chunk = (SPLIT_SCORE_VEC4 / quads / tile).max(1) * tile;
        let min_chunk = o
            .min_split_positions
            .max(1)
            .div_ceil(tile)
            .min(max_chunk / tile)
            * tile;
        SplitShape {
            tile,
            min_chunk,
            max_chunk,
            target_splits: (o.target_workgroups / workgroups_per_split).max(1),
        }
    }

    fn layout(&self, kv_len: usize) -> SplitLayout {
        let kv_len = kv_len.max(1);
        let wanted = self.target_splits.min(kv_len.div_ceil(self.min_chunk));
        let n = wanted.max(kv_len.div_ceil(self.max_chunk)).max(1);
        let chunk = kv_len.div_ceil(n).div_ceil(self.tile) * self.tile;
        SplitLayout {
            chunk,
            splits: kv_len.div_ceil(chunk),
            n_max: n,
        }
    }
}

/// Uniform parameters of prefill and the legacy decode (the `attention.wgsl` `Params`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct AttentionParams {
    n_heads: u32,
    n_kv_heads: u32,
    group: u32,
    ctx: u32,
    max_splits: u32,
    head_batches: u32,
    m_max: u32,
    _pad: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Variant {
    /// Decode pass 1 for `head_dim` and this many query heads per workgroup.
    DecodePartial {
        head_dim: u32,
        heads: u32,
    },
    DecodeCombine {
        head_dim: u32,
    },
    /// Grouped decode pass 1 and combine (`attention_decode.wgsl`).
    /// `batch`: over the rows of a batched step (each its own slot and length).
    Split {
        head_dim: u32,
        heads: u32,
        v_tail_guard: bool,
        batch: bool,
    },
    SplitCombine {
        head_dim: u32,
        batch: bool,
    },
    /// The combine that also writes the int8 o-projection input.
    SplitCombineQ8 {
        head_dim: u32,
    },
    /// Prefill for `head_dim` with `keys` positions per tile.
    Prefill {
        head_dim: u32,
        keys: u32,
    },
}

/// The attention kernels. Pipelines are specialised per shape (head dim, heads per decode
/// workgroup, key tile) and compiled on first `bind` of that shape; all layers of a model share them.
pub struct Attention {
    pipelines: Mutex<HashMap<Variant, wgpu::ComputePipeline>>,
    decode: DecodeOptions,
    /// Decode scratch (partial outputs, max and sum), shared by every binding made here: the
    /// layers of a step run one after another, and wgpu puts a barrier between dispatches that
    /// write the same buffer. Grown when a binding needs more.
    scratch: Mutex<Option<[wgpu::Buffer; 2]>>,
}

/// The bound attention of one layer: record `decode` for a one-token step and `prefill` for any
/// step (see [`AttentionDispatches::for_tokens`]).
pub struct AttentionDispatches {
    /// Decode pass 1 (partial results per split) and pass 2 (combine). Valid only when
    /// `n_tokens == 1`.
    pub decode: Vec<Dispatch>,
    /// The chunked causal path; valid for any `1 <= n_tokens <= m_max`.
    pub prefill: Vec<Dispatch>,
    /// Decode splits bound at bind time (the dispatch's y size).
    pub max_splits: usize,
    /// The decode scratch, shared with the other bindings of the same [`Attention`].
    _scratch: [wgpu::Buffer; 2],
    /// What the int8-output combine binds (grouped decode only).
    combine_q8: Option<CombineQ8>,
}

/// The grouped decode combine's bindings and shape, for [`Attention::decode_q8_output`].
struct CombineQ8 {
    params: wgpu::Buffer,
    step: wgpu::Buffer,
    part_o: wgpu::Buffer,
    part_ml: wgpu::Buffer,
    out: wgpu::Buffer,
    n_heads: usize,
    head_dim: usize,
}

/// Blocks of 32 of an int8 activation vector of `k` values (padded to weight blocks of 128).
fn q8_blocks(k: usize) -> usize {
    crate::quant::blocks_per_row(k) * (crate::quant::BLOCK / crate::quant::ACT_BLOCK)
}

impl AttentionDispatches {
    /// The dispatches to record for a step of `n_tokens` tokens.
    pub fn for_tokens(&self, n_tokens: usize) -> &[Dispatch] {
        if n_tokens == 1 {
            &self.decode
        } else {
            &self.prefill
        }
    }
}

/// Bytes of workgroup memory the prefill entry point needs (the WGSL `pq_s` .. `row_f`).
fn prefill_workgroup_bytes(head_dim: usize, keys: usize) -> usize {
    let row_vec4s = head_dim / 4 + 1;
    let vec4s = (PREFILL_ROWS + keys) * row_vec4s;
    let floats = keys * (PREFILL_ROWS + 1) + 2 * PREFILL_THREADS + 3 * PREFILL_ROWS;
    vec4s * 16 + floats * 4
}

impl Attention {
    pub fn new(gpu: &Gpu) -> Result<Attention> {
        Attention::with_decode(gpu, DecodeOptions::default())
    }

    /// Attention whose decode path uses `decode` (the kernel bench compares kernels and splits).
    pub fn with_decode(_gpu: &Gpu, decode: DecodeOptions) -> Result<Attention> {
        if decode.target_workgroups == 0 {
            return Err(Error::Invalid(
                "attention: decode target_workgroups must be at least 1".into(),
            ));
        }
        Ok(Attention {
            pipelines: Mutex::new(HashMap::new()),
            decode,
            scratch: Mutex::new(None),
        })
    }

    /// The grouped decode's split layout for a shape at `kv_len` positions (tests use it to pick
    /// lengths that cross split boundaries; the bench reports it).
    pub fn decode_layout(
        &self,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        kv_len: usize,
    ) -> Result<SplitLayout> {
        if !SUPPORTED_HEAD_DIMS.contains(&head_dim) || n_kv_heads == 0 || n_heads < n_kv_heads {
            return Err(Error::Invalid(format!(
                "attention: no decode layout for {n_heads} heads over {n_kv_heads} KV heads of head_dim {head_dim}"
            )));
        }
        let (batches, per_batch) = head_batches(n_heads / n_kv_heads);
        let split = SplitShape::new(head_dim, per_batch, n_kv_heads * batches, &self.decode);
        Ok(split.layout(kv_len))
    }

    fn pipeline(&self, gpu: &Gpu, variant: Variant) -> Result<wgpu::ComputePipeline> {
        let mut cache = self
            .pipelines
            .lock()
            .map_err(|_| Error::Gpu("attention pipeline cache poisoned".into()))?;
        if let Some(p) = cache.get(&variant) {
            return Ok(p.clone());
        }
        // The grouped decode module calls q8_block.wgsl's quantizer (decode_combine_q8).
        let decode_source = format!("{Q8_BLOCK}\n{DECODE_ONE}\n{DECODE_SHADER}");
        let batch_source = format!("{Q8_BLOCK}\n{BATCH_STEP}\n{DECODE_BATCH}\n{DECODE_SHADER}");
        let mut source = SHADER;
        let (label, entry, overrides) = match variant {
            Variant::DecodePartial { head_dim, heads } => (
                format!("attention/decode_partial/hd{head_dim}/g{heads}"),
                "decode_partial",
                vec![("HD", head_dim as f64), ("GB", heads as f64)],
            ),
            Variant::DecodeCombine { head_dim } => (
                format!("attention/decode_combine/hd{head_dim}"),
                "decode_combine",
                vec![("HD", head_dim as f64)],
            ),
            Variant::Split {
                head_dim,
                heads,
                v_tail_guard,
                batch,
            } => {
                source = if batch { &batch_source } else { &decode_source };
                (
                    format!("attention/decode_split/hd{head_dim}/g{heads}/guard{v_tail_guard}/batch{batch}"),
                    "decode_split",
                    vec![
                        ("HD", head_dim as f64),
                        ("GB", heads as f64),
                        ("V_TAIL_GUARD", f64::from(u8::from(v_tail_guard))),
                    ],
                )
            }
            Variant::SplitCombine { head_dim, batch } => {
                source = if batch { &batch_source } else { &decode_source };
                (
                    format!("attention/decode_split_combine/hd{head_dim}/batch{batch}"),
                    "decode_combine",
                    vec![("HD", head_dim as f64)],
                )
            }
            Variant::SplitCombineQ8 { head_dim } => {
                source = &decode_source;
                (
                    format!("attention/decode_split_combine_q8/hd{head_dim}"),
                    "decode_combine_q8",
                    vec![("HD", head_dim as f64)],
                )
            }
            Variant::Prefill { head_dim, keys } => (
                format!("attention/prefill/hd{head_dim}/k{keys}"),
                "prefill",
                vec![("HD", head_dim as f64), ("BK", keys as f64)],
            ),
        };
        // Every index is in bounds by construction: `bind` checks the buffers against the shapes and
        // the shader clamps the step's values to them.
        let p = gpu.compute_pipeline_unchecked(&label, source, entry, &overrides)?;
        cache.insert(variant, p.clone());
        Ok(p)
    }

    /// Binds attention for one layer. `q` and `out` hold `m_max` rows of `n_heads * head_dim` f32;
    /// `k_cache` and `v_cache` hold `n_kv_heads * ctx * head_dim` packed f16 values; `step` is the
    /// shared [`StepParams`](super::StepParams) uniform. Shapes are checked here; per-step values come from `step`.
    #[allow(clippy::too_many_arguments)]
    pub fn bind(
        &self,
        gpu: &Gpu,
        q: &wgpu::Buffer,
        k_cache: &wgpu::Buffer,
        v_cache: &wgpu::Buffer,
        out: &wgpu::Buffer,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        ctx: usize,
        m_max: usize,
        step: &wgpu::Buffer,
    ) -> Result<AttentionDispatches> {
        if !SUPPORTED_HEAD_DIMS.contains(&head_dim) {
            return Err(Error::Unsupported(format!(
                "attention with head_dim {head_dim}: the kernels support head_dim {SUPPORTED_HEAD_DIMS:?}"
            )));
        }
        if n_kv_heads == 0 || n_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
            return Err(Error::Invalid(format!(
                "attention: {n_heads} query heads cannot be shared evenly by {n_kv_heads} KV heads"
            )));
        }
        if ctx == 0 || m_max == 0 || m_max > ctx {
            return Err(Error::Invalid(format!(
                "attention: context {ctx} and tokens per step {m_max} must be 1 <= m_max <= ctx"
            )));
        }
        let limits = &gpu.limits;
        let shape = Shape::new(n_heads, n_kv_heads, head_dim, ctx, m_max);
        shape.check_buffers(gpu, [q, out, k_cache, v_cache], 1)?;
        let (group, head_batches) = (shape.group, shape.head_batches);
        let decode_groups_x = n_kv_heads * head_batches;
        let prefill_groups_x = (m_max * group).div_ceil(PREFILL_ROWS);
        if decode_groups_x > limits.max_compute_workgroups_per_dimension as usize
            || prefill_groups_x > limits.max_compute_workgroups_per_dimension as usize
            || n_heads > limits.max_compute_workgroups_per_dimension as usize
        {
            return Err(Error::Unsupported(format!(
                "attention: {n_heads} heads × {m_max} tokens need more workgroups than this GPU dispatches at once"
            )));
        }
        let shared_limit = limits.max_compute_workgroup_storage_size as usize;
        let keys: usize = [32, 16].into_iter().find(|&k| prefill_workgroup_bytes(head_dim, k) <= shared_limit).ok_or_else(|| {
            Error::Unsupported(format!(
                "attention: prefill with head_dim {head_dim} needs {} bytes of workgroup memory, this GPU has {shared_limit}",
                prefill_workgroup_bytes(head_dim, 16)
            ))
        })?;

        let buffers = Buffers {
            q,
            k_cache,
            v_cache,
            out,
            step,
        };
        let (decode, max_splits, scratch, combine_q8) = match self.decode.kernel {
            DecodeKernel::Grouped => {
                let (decode, max_splits, scratch, params) =
                    self.bind_grouped_decode(gpu, &shape, &buffers, false)?;
                let q8 = CombineQ8 {
                    params,
                    step: step.clone(),
                    part_o: scratch[0].clone(),
                    part_ml: scratch[1].clone(),
                    out: out.clone(),
                    n_heads,
                    head_dim,
                };
                (decode, max_splits, scratch, Some(q8))
            }
            DecodeKernel::Legacy => {
                let (decode, max_splits, scratch) =
                    self.bind_legacy_decode(gpu, &shape, &buffers)?;
                (decode, max_splits, scratch, None)
            }
        };

        let params = AttentionParams {
            n_heads: n_heads as u32,
            n_kv_heads: n_kv_heads as u32,
            group: group as u32,
            ctx: ctx as u32,
            max_splits: 1,
            head_batches: head_batches as u32,
            m_max: m_max as u32,
            _pad: 0,
        };
        let params_buf = gpu.uniform("attention/params", &params);
        let prefill = self.pipeline(
            gpu,
            Variant::Prefill {
                head_dim: head_dim as u32,
                keys: keys as u32,
            },
        )?;
        let prefill = vec![dispatch(
            gpu,
            "attention/prefill",
            prefill,
            &params_buf,
            &[
                (0, step),
                (1, &params_buf),
                (2, q),
                (3, k_cache),
                (4, v_cache),
                (7, out),
            ],
            [prefill_groups_x as u32, n_kv_heads as u32, 1],
        )];
        Ok(AttentionDispatches {
            decode,
            prefill,
            max_splits,
            _scratch: scratch,
            combine_q8,
        })
    }

    /// Decode scratch for `max_splits` splits per query head: per (head, split) the unnormalised
    /// output and (max, sum). One pair serves every binding (see `scratch`).
    fn decode_scratch(
        &self,
        gpu: &Gpu,
        s: &Shape,
        max_splits: usize,
        rows: usize,
    ) -> Result<[wgpu::Buffer; 2]> {
        let need = [
            (rows * s.n_heads * max_splits * s.head_dim * 4) as u64,
            (rows * s.n_heads * max_splits * 2 * 4) as u64,
        ];
        let mut cache = self
            .scratch
            .lock()
            .map_err(|_| Error::Gpu("attention scratch cache poisoned".into()))?;
        if let Some(bufs) = cache.as_ref() {
            if bufs[0].size() >= need[0] && bufs[1].size() >= need[1] {
                return Ok(bufs.clone());
            }
        }
        let old = cache
            .as_ref()
            .map_or([0, 0], |b| [b[0].size(), b[1].size()]);
        let bufs = [
            gpu.storage_buffer("attention/partial_out", need[0].max(old[0])),
            gpu.storage_buffer("attention/partial_max_sum", need[1].max(old[1])),
        ];
        *cache = Some(bufs.clone());
        Ok(bufs)
    }

    /// The grouped decode (`attention_decode.wgsl`): split pass and combine, for one sequence
    /// (`b.step` the step uniform) or the rows of a batched step (`batch`: `b.step` the batch
    /// uniform, q and out of `s.m_max` rows).
    fn bind_grouped_decode(
        &self,
        gpu: &Gpu,
        s: &Shape,
        b: &Buffers,
        batch: bool,
    ) -> Result<(Vec<Dispatch>, usize, [wgpu::Buffer; 2], wgpu::Buffer)> {
        let rows = if batch { s.m_max } else { 1 };
        let limits = &gpu.limits;
        let need = split_workgroup_bytes();
        if (limits.max_compute_workgroup_storage_size as usize) < need {
            return Err(Error::Unsupported(format!(
                "attention: decode needs {need} bytes of workgroup memory, this GPU has {}",
                limits.max_compute_workgroup_storage_size
            )));
        }
        let groups_x = s.n_kv_heads * s.head_batches;
        let split = SplitShape::new(s.head_dim, s.heads_per_batch, groups_x, &self.decode);
        let max_splits = split.layout(s.ctx).n_max;
        if max_splits > SPLIT_MAX_SPLITS.min(limits.max_compute_workgroups_per_dimension as usize) {
            return Err(Error::Unsupported(format!(
                "attention: decode over a context of {} positions needs {max_splits} splits per head, more than {SPLIT_MAX_SPLITS}; use a shorter context",
                s.ctx
            )));
        }
        let params = SplitParams {
            n_heads: s.n_heads as u32,
            n_kv_heads: s.n_kv_heads as u32,
            group: s.group as u32,
            ctx: s.ctx as u32,
            max_splits: max_splits as u32,
            head_batches: s.head_batches as u32,
            min_chunk: split.min_chunk as u32,
            max_chunk: split.max_chunk as u32,
            target_splits: split.target_splits as u32,
            q8_blocks: q8_blocks(s.n_heads * s.head_dim) as u32,
            _pad: [0; 2],
        };
        let params_buf = gpu.uniform("attention/decode_params", &params);
        let [part_o, part_ml] = self.decode_scratch(gpu, s, max_splits, rows)?;
        let hd = s.head_dim as u32;
        let pass1 = self.pipeline(
            gpu,
            Variant::Split {
                head_dim: hd,
                heads: s.heads_per_batch as u32,
                v_tail_guard: self.decode.v_tail_guard,
                batch,
            },
        )?;
        let combine = self.pipeline(
            gpu,
            Variant::SplitCombine {
                head_dim: hd,
                batch,
            },
        )?;
        let decode = split_and_combine(
            gpu,
            ("attention/decode_split", pass1),
            combine,
            &params_buf,
            b,
            [&part_o, &part_ml],
            [
                groups_x as u32,
                max_splits as u32,
                s.n_heads as u32,
                rows as u32,
            ],
        );
        Ok((decode, max_splits, [part_o, part_ml], params_buf))
    }

    /// Decode attention of a batched step (`batch`: its rows uniform, see
    /// [`BatchStep`](super::BatchStep)): row r of `q` (rows of `n_heads * head_dim` f32, as
    /// `out`) attends over positions `0..rows[r].kv_len` of slot `rows[r].slot`'s region of caches
    /// holding `slots` sequences of `ctx` positions (`[slot][kv_head][ctx][head_dim]` f16). The
    /// grouped kernel's arithmetic, so a row's output is what a one-sequence step gives.
    #[allow(clippy::too_many_arguments)]
    pub fn bind_batch_decode(
        &self,
        gpu: &Gpu,
        q: &wgpu::Buffer,
        [k_cache, v_cache]: [&wgpu::Buffer; 2],
        out: &wgpu::Buffer,
        (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
        ctx: usize,
        slots: usize,
        rows: usize,
        batch: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let what = "attention (batched decode)";
        if self.decode.kernel != DecodeKernel::Grouped
            || !SUPPORTED_HEAD_DIMS.contains(&head_dim)
            || n_kv_heads == 0
            || n_heads == 0
            || !n_heads.is_multiple_of(n_kv_heads)
            || ctx == 0
            || slots == 0
            || !(1..=MAX_BATCH).contains(&rows)
        {
            return Err(Error::Invalid(format!(
                "{what}: the grouped kernel, head_dim in {SUPPORTED_HEAD_DIMS:?}, query heads a \
                 multiple of the KV heads, and a context and slots ({n_heads} heads, {n_kv_heads} \
                 KV heads of {head_dim}, context {ctx}, {slots} slots)"
            )));
        }
        let shape = Shape::new(n_heads, n_kv_heads, head_dim, ctx, rows);
        shape.check_buffers(gpu, [q, out, k_cache, v_cache], slots)?;
        let buffers = Buffers {
            q,
            k_cache,
            v_cache,
            out,
            step: batch,
        };
        Ok(self.bind_grouped_decode(gpu, &shape, &buffers, true)?.0)
    }

    /// The decode dispatches of `attn` (bound here) with a combine that also writes the o
    /// projection's int8 input into `xq`, bit-identical to quant_act on the f32 output it still
    /// writes. `None` where the decode path cannot: the legacy kernel, or a head dim that is not
    /// whole blocks of 32 (then quantize the output with a dispatch of its own).
    pub fn decode_q8_output(
        &self,
        gpu: &Gpu,
        attn: &AttentionDispatches,
        xq: &ActQ8Buffers,
    ) -> Result<Option<Vec<Dispatch>>> {
        let Some(c) = &attn.combine_q8 else {
            return Ok(None);
        };
        if !c.head_dim.is_multiple_of(crate::quant::ACT_BLOCK) || attn.decode.len() != 2 {
            return Ok(None);
        }
        let q_dim = c.n_heads * c.head_dim;
        if xq.capacity < q_dim {
            return Err(Error::Invalid(format!(
                "attention: the int8 output buffers hold {} values, the heads {q_dim}",
                xq.capacity
            )));
        }
        let blocks = q8_blocks(q_dim) as u64;
        // The shader indexes blocks up to q8_blocks (unchecked pipeline): the buffers must hold them.
        super::check_size("attention int8 output", &xq.words, blocks * 32)?;
        super::check_size("attention int8 scales", &xq.scales, blocks * 8)?;
        let combine = self.pipeline(
            gpu,
            Variant::SplitCombineQ8 {
                head_dim: c.head_dim as u32,
            },
        )?;
        let combine = dispatch(
            gpu,
            "attention/decode_combine_q8",
            combine,
            &c.params,
            &[
                (0, &c.step),
                (1, &c.params),
                (5, &c.part_o),
                (6, &c.part_ml),
                (7, &c.out),
                (8, &xq.words),
                (9, &xq.scales),
            ],
            [c.n_heads as u32, 1, 1],
        );
        Ok(Some(vec![attn.decode[0].clone(), combine]))
    }

    /// The previous decode kernel (`attention.wgsl`), kept for A/B in the kernel bench.
    fn bind_legacy_decode(
        &self,
        gpu: &Gpu,
        s: &Shape,
        b: &Buffers,
    ) -> Result<(Vec<Dispatch>, usize, [wgpu::Buffer; 2])> {
        let groups_x = s.n_kv_heads * s.head_batches;
        let max_splits = s
            .ctx
            .div_ceil(DECODE_TILE)
            .min(
                self.decode
                    .target_workgroups
                    .min(LEGACY_MAX_SPLITS * groups_x)
                    / groups_x,
            )
            .max(1);
        let params = AttentionParams {
            n_heads: s.n_heads as u32,
            n_kv_heads: s.n_kv_heads as u32,
            group: s.group as u32,
            ctx: s.ctx as u32,
            max_splits: max_splits as u32,
            head_batches: s.head_batches as u32,
            m_max: s.m_max as u32,
            _pad: 0,
        };
        let params_buf = gpu.uniform("attention/legacy_decode_params", &params);
        let [part_o, part_ml] = self.decode_scratch(gpu, s, max_splits, 1)?;
        let hd = s.head_dim as u32;
        let partial = self.pipeline(
            gpu,
            Variant::DecodePartial {
                head_dim: hd,
                heads: s.heads_per_batch as u32,
            },
        )?;
        let combine = self.pipeline(gpu, Variant::DecodeCombine { head_dim: hd })?;
        let decode = split_and_combine(
            gpu,
            ("attention/decode_partial", partial),
            combine,
            &params_buf,
            b,
            [&part_o, &part_ml],
            [groups_x as u32, max_splits as u32, s.n_heads as u32, 1],
        );
        Ok((decode, max_splits, [part_o, part_ml]))
    }
}

/// The shape of one bound attention, checked by `bind`.
struct Shape {
    n_heads: usize,
    n_kv_heads: usize,
    group: usize,
    head_dim: usize,
    ctx: usize,
    m_max: usize,
    /// Decode workgroups per KV head, and query heads each serves (the last may serve fewer).
    head_batches: usize,
    heads_per_batch: usize,
}

impl Shape {
    /// `n_heads` over `n_kv_heads` (a multiple: checked by the callers) for `m_max` rows.
    fn new(n_heads: usize, n_kv_heads: usize, head_dim: usize, ctx: usize, m_max: usize) -> Shape {
        let group = n_heads / n_kv_heads;
        let (head_batches, heads_per_batch) = head_batches(group);
        Shape {
            n_heads,
            n_kv_heads,
            group,
            head_dim,
            ctx,
            m_max,
            head_batches,
            heads_per_batch,
        }
    }

    /// Checks q and out (`m_max` rows) and the K and V caches (`slots` sequences) against the
    /// shape, and each against what the GPU binds at once.
    fn check_buffers(
        &self,
        gpu: &Gpu,
        [q, out, k, v]: [&wgpu::Buffer; 4],
        slots: usize,
    ) -> Result<()> {
        let (n_heads, n_kv_heads, head_dim, ctx, m_max) = (
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
            self.ctx,
            self.m_max,
        );
        let binding_limit = gpu.limits.max_storage_buffer_binding_size;
        let rows_bytes = (m_max * n_heads * head_dim * 4) as u64;
        let cache_bytes = (slots * n_kv_heads * ctx * head_dim * 2) as u64;
        let sequences = match slots {
            1 => String::new(),
            n => format!(", {n} sequences"),
        };
        for (name, buf, need) in [
            ("q", q, rows_bytes),
            ("out", out, rows_bytes),
            ("k_cache", k, cache_bytes),
            ("v_cache", v, cache_bytes),
        ] {
            if buf.size() < need {
                return Err(Error::Invalid(format!(
                    "attention: buffer {name} has {} bytes, needs {need} ({m_max} tokens, {n_heads} heads, {n_kv_heads} KV heads, head_dim {head_dim}, context {ctx}{sequences})",
                    buf.size()
                )));
            }
            if buf.size() > binding_limit {
                return Err(Error::Unsupported(format!(
                    "attention: buffer {name} has {} bytes, more than this GPU binds at once ({binding_limit}); use a shorter context",
                    buf.size()
                )));
            }
        }
        Ok(())
    }
}

struct Buffers<'a> {
    q: &'a wgpu::Buffer,
    k_cache: &'a wgpu::Buffer,
    v_cache: &'a wgpu::Buffer,
    out: &'a wgpu::Buffer,
    step: &'a wgpu::Buffer,
}

/// Decode workgroups per KV head (each for at most `MAX_HEADS_PER_GROUP` query heads) and the
/// query heads per workgroup.
fn head_batches(group: usize) -> (usize, usize) {
    let batches = group.div_ceil(MAX_HEADS_PER_GROUP).max(1);
    (batches, group.div_ceil(batches))
}

/// Bytes of workgroup memory of `decode_split` (the WGSL `sc_s` and `red_s`).
fn split_workgroup_bytes() -> usize {
    (SPLIT_SCORE_VEC4 + 1280) * 16
}

/// A decode's two dispatches: the split pass (`split`: label and pipeline) over `groups`
/// workgroups x `splits` x rows, writing partial outputs and max/sum into `part`, then the
/// combine, one workgroup per query head and row, into `b.out`. `grid` is `[groups, splits,
/// heads, rows]`.
fn split_and_combine(
    gpu: &Gpu,
    split: (&str, wgpu::ComputePipeline),
    combine: wgpu::ComputePipeline,
    params: &wgpu::Buffer,
    b: &Buffers,
    part: [&wgpu::Buffer; 2],
    grid: [u32; 4],
) -> Vec<Dispatch> {
    let [part_o, part_ml] = part;
    vec![
        dispatch(
            gpu,
            split.0,
            split.1,
            params,
            &[
                (0, b.step),
                (1, params),
                (2, b.q),
                (3, b.k_cache),
                (4, b.v_cache),
                (5, part_o),
                (6, part_ml),
            ],
            [grid[0], grid[1], grid[3]],
        ),
        dispatch(
            gpu,
            "attention/decode_combine",
            combine,
            params,
            &[
                (0, b.step),
                (1, params),
                (5, part_o),
                (6, part_ml),
                (7, b.out),
            ],
            [grid[2], grid[3], 1],
        ),
    ]
}

fn dispatch(
    gpu: &Gpu,
    label: &str,
    pipeline: wgpu::ComputePipeline,
    params: &wgpu::Buffer,
    entries: &[(u32, &wgpu::Buffer)],
    workgroups: [u32; 3],
) -> Dispatch {
    let bind_group = bind_at(gpu, label, &pipeline, entries);
    Dispatch {
        label: label.to_string(),
        pipeline,
        bind_group,
        workgroups,
        params: Some(params.clone()),
    }
}

/// A bind group with whole buffers at the given binding indices (the entry points use different
/// subsets of the module's bindings).
fn bind_at(
    gpu: &Gpu,
    label: &str,
    pipeline: &wgpu::ComputePipeline,
    entries: &[(u32, &wgpu::Buffer)],
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry> = entries
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
