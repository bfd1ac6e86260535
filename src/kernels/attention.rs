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
//! - **decode** (one token; flash-decoding): pass 1 splits the sequence into chunks of whole
//!   64-position tiles, one workgroup per (KV head, batch of ≤ 8 of its query heads, split), so each
//!   K/V row is read once for the whole batch; it writes each split's running max, sum and
//!   unnormalised output to scratch. The number of splits follows `kv_len` at run time (bounded at
//!   bind time from `ctx`); splits past the end exit at once and pass 2 ignores them. Pass 2
//!   rescales the splits of each head to a common max and divides by the total sum.
//! - **prefill** (a chunk of tokens): one workgroup per 32 (token, head) rows of a KV group; tiles of
//!   16 or 32 keys are unpacked into workgroup memory once and used by all 32 rows; causal mask by
//!   position; rows past `n_tokens` are not written.

use super::Dispatch;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use std::collections::HashMap;
use std::sync::Mutex;

const SHADER: &str = include_str!("../../shaders/attention.wgsl");

/// Head dimensions the kernels are built for.
pub const SUPPORTED_HEAD_DIMS: [usize; 3] = [32, 64, 128];
/// Query heads one decode workgroup serves (two vec4 quads in the WGSL).
const MAX_HEADS_PER_GROUP: usize = 8;
/// Positions per decode tile (the WGSL `DEC_TILE`); splits cover whole tiles.
const DECODE_TILE: usize = 64;
/// Decode pass 1 aims at about this many workgroups at full context: enough to fill a large GPU.
/// It also bounds the splits (at most the WGSL `MAX_SPLITS`, the combine's workgroup array).
const DECODE_TARGET_WORKGROUPS: usize = 512;
/// Prefill rows per workgroup and threads per workgroup (the WGSL `PF_ROWS`, `PF_THREADS`).
const PREFILL_ROWS: usize = 32;
const PREFILL_THREADS: usize = 128;

/// Uniform parameters shared by the three entry points (the WGSL `Params`).
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
}

/// The bound attention of one layer: record `decode` for a one-token step and `prefill` for any
/// step (see [`AttentionDispatches::for_tokens`]). Owns the decode scratch buffers.
pub struct AttentionDispatches {
    /// Decode pass 1 (partial results per split) and pass 2 (combine). Valid only when
    /// `n_tokens == 1`.
    pub decode: Vec<Dispatch>,
    /// The chunked causal path; valid for any `1 <= n_tokens <= m_max`.
    pub prefill: Vec<Dispatch>,
    /// Decode splits bound at bind time (the dispatch's y size).
    pub max_splits: usize,
    _scratch: [wgpu::Buffer; 2],
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
    pub fn new(_gpu: &Gpu) -> Result<Attention> {
        Ok(Attention {
            pipelines: Mutex::new(HashMap::new()),
        })
    }

    fn pipeline(&self, gpu: &Gpu, variant: Variant) -> Result<wgpu::ComputePipeline> {
        let mut cache = self
            .pipelines
            .lock()
            .map_err(|_| Error::Gpu("attention pipeline cache poisoned".into()))?;
        if let Some(p) = cache.get(&variant) {
            return Ok(p.clone());
        }
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
            Variant::Prefill { head_dim, keys } => (
                format!("attention/prefill/hd{head_dim}/k{keys}"),
                "prefill",
                vec![("HD", head_dim as f64), ("BK", keys as f64)],
            ),
        };
        // Every index is in bounds by construction: `bind` checks the buffers against the shapes and
        // the shader clamps the step's values to them.
        let p = gpu.compute_pipeline_unchecked(&label, SHADER, entry, &overrides)?;
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
        let binding_limit = limits.max_storage_buffer_binding_size;
        let rows_bytes = (m_max * n_heads * head_dim * 4) as u64;
        let cache_bytes = (n_kv_heads * ctx * head_dim * 2) as u64;
        for (name, buf, need) in [
            ("q", q, rows_bytes),
            ("out", out, rows_bytes),
            ("k_cache", k_cache, cache_bytes),
            ("v_cache", v_cache, cache_bytes),
        ] {
            if buf.size() < need {
                return Err(Error::Invalid(format!(
                    "attention: buffer {name} has {} bytes, needs {need} ({m_max} tokens, {n_heads} heads, {n_kv_heads} KV heads, head_dim {head_dim}, context {ctx})",
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

        let group = n_heads / n_kv_heads;
        let head_batches = group.div_ceil(MAX_HEADS_PER_GROUP);
        let heads_per_batch = group.div_ceil(head_batches);
        let decode_groups_x = n_kv_heads * head_batches;
        let max_splits = ctx
            .div_ceil(DECODE_TILE)
            .min(DECODE_TARGET_WORKGROUPS / decode_groups_x)
            .max(1);
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

        let params = AttentionParams {
            n_heads: n_heads as u32,
            n_kv_heads: n_kv_heads as u32,
            group: group as u32,
            ctx: ctx as u32,
            max_splits: max_splits as u32,
            head_batches: head_batches as u32,
            m_max: m_max as u32,
            _pad: 0,
        };
        let params_buf = gpu.uniform("attention/params", &params);
        let part_o = gpu.storage_buffer(
            "attention/partial_out",
            (n_heads * max_splits * head_dim * 4) as u64,
        );
        let part_ml = gpu.storage_buffer(
            "attention/partial_max_sum",
            (n_heads * max_splits * 2 * 4) as u64,
        );

        let hd = head_dim as u32;
        let partial = self.pipeline(
            gpu,
            Variant::DecodePartial {
                head_dim: hd,
                heads: heads_per_batch as u32,
            },
        )?;
        let combine = self.pipeline(gpu, Variant::DecodeCombine { head_dim: hd })?;
        let prefill = self.pipeline(
            gpu,
            Variant::Prefill {
                head_dim: hd,
                keys: keys as u32,
            },
        )?;

        let dispatch = |label: &str,
                        pipeline: wgpu::ComputePipeline,
                        entries: &[(u32, &wgpu::Buffer)],
                        workgroups: [u32; 3]| {
            let bind_group = bind_at(gpu, label, &pipeline, entries);
            Dispatch {
                label: label.to_string(),
                pipeline,
                bind_group,
                workgroups,
                params: Some(params_buf.clone()),
            }
        };
        let decode = vec![
            dispatch(
                "attention/decode_partial",
                partial,
                &[
                    (0, step),
                    (1, &params_buf),
                    (2, q),
                    (3, k_cache),
                    (4, v_cache),
                    (5, &part_o),
                    (6, &part_ml),
                ],
                [decode_groups_x as u32, max_splits as u32, 1],
            ),
            dispatch(
                "attention/decode_combine",
                combine,
                &[
                    (0, step),
                    (1, &params_buf),
                    (5, &part_o),
                    (6, &part_ml),
                    (7, out),
                ],
                [n_heads as u32, 1, 1],
            ),
        ];
        let prefill = vec![dispatch(
            "attention/prefill",
            prefill,
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
            _scratch: [part_o, part_ml],
        })
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
