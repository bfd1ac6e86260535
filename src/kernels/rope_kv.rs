//! RoPE and the KV-cache write, fused into one dispatch per layer (`shaders/rope_kv.wgsl`).
//!
//! Reads the fused QKV rows `[q | k | v]`, writes roped q as f32 `[m_max, n_heads * head_dim]`, and
//! roped k and raw v into the layer's K and V caches at positions `step.pos + t`. Cache layout (the
//! attention kernel reads it): f16 packed two per u32 with `pack2x16float`, word index
//! `(kv_head * ctx + position) * (head_dim / 2) + i`. Positions at or past `ctx` are not written.

use super::check_size;
use super::Dispatch;
use crate::error::{Error, Result};
use crate::gpu::{groups, Gpu};

const WG: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    ctx: u32,
}

/// RoPE's (cos, sin) of an angle, shared with the int8 GEMV's RoPE epilogue.
pub(crate) const ROPE_ANGLE: &str = include_str!("../../shaders/rope_angle.wgsl");

/// Rows of a prompt chunk or decode step: `step.n_tokens` of them from `step.pos`, one sequence.
const STEP_ROWS: &str = "
struct Step { pos: u32, n_tokens: u32, kv_len: u32, pad: u32 }
@group(0) @binding(6) var<uniform> step: Step;
fn live_rows() -> u32 { return step.n_tokens; }
fn row_pos(t: u32) -> u32 { return step.pos + t; }
fn row_cache(t: u32, nkv: u32) -> u32 { return 0u; }
";

/// Rows of a batched decode step: each at its own position, in its slot's cache region.
const BATCH_ROWS: &str = "
@group(0) @binding(6) var<uniform> batch: BatchStep;
fn live_rows() -> u32 { return min(batch.n_rows, MAX_BATCH); }
fn row_pos(t: u32) -> u32 { return batch.rows[t].pos; }
fn row_cache(t: u32, nkv: u32) -> u32 { return batch.rows[t].slot * nkv * params.ctx; }
";

pub struct RopeKv {
    pipeline: wgpu::ComputePipeline,
    batch_pipeline: wgpu::ComputePipeline,
}

/// Where the rows of a dispatch come from (binding 6).
enum Rows<'a> {
    Step(&'a wgpu::Buffer),
    /// The batch uniform, and the slots the caches hold.
    Batch(&'a wgpu::Buffer, usize),
}

impl RopeKv {
    pub fn new(gpu: &Gpu) -> Result<RopeKv> {
        let shader = include_str!("../../shaders/rope_kv.wgsl");
        let batch_step = super::gemv_q4_q8::BATCH_STEP;
        let source = format!("{ROPE_ANGLE}\n{STEP_ROWS}\n{shader}");
        let pipeline = gpu.compute_pipeline("rope_kv", &source, "main", &[])?;
        let source = format!("{ROPE_ANGLE}\n{batch_step}\n{BATCH_ROWS}\n{shader}");
        let batch_pipeline = gpu.compute_pipeline("rope_kv (batched)", &source, "main", &[])?;
        Ok(RopeKv {
            pipeline,
            batch_pipeline,
        })
    }

    /// RoPE and the KV write of a batched decode step of up to `rows` rows (`batch`: the step's
    /// rows uniform, at most `rows` live; `heads`: query heads, KV heads, head dim): row t goes
    /// to position `rows[t].pos` of slot `rows[t].slot`'s region of caches holding `slots`
    /// sequences of `ctx` positions (`[slot][kv_head][ctx][head_dim / 2]` words).
    #[allow(clippy::too_many_arguments)]
    pub fn bind_batch(
        &self,
        gpu: &Gpu,
        qkv: &wgpu::Buffer,
        inv_freq: &wgpu::Buffer,
        q_out: &wgpu::Buffer,
        k_cache: &wgpu::Buffer,
        v_cache: &wgpu::Buffer,
        heads: (usize, usize, usize),
        ctx: usize,
        slots: usize,
        rows: usize,
        batch: &wgpu::Buffer,
    ) -> Result<Dispatch> {
        let caches = [k_cache, v_cache];
        self.bind_with(
            gpu,
            qkv,
            inv_freq,
            q_out,
            caches,
            heads,
            ctx,
            rows,
            Rows::Batch(batch, slots),
        )
    }

    /// `qkv`: f32 [m_max, (n_heads + 2 * n_kv_heads) * head_dim]; `inv_freq`: f32 [head_dim / 2]
    /// (`ModelConfig::rope_inv_freq`); `q_out`: f32 [m_max, n_heads * head_dim]; `k_cache`,
    /// `v_cache`: u32 [n_kv_heads, ctx, head_dim / 2].
    #[allow(clippy::too_many_arguments)]
    pub fn bind(
        &self,
        gpu: &Gpu,
        qkv: &wgpu::Buffer,
        inv_freq: &wgpu::Buffer,
        q_out: &wgpu::Buffer,
        k_cache: &wgpu::Buffer,
        v_cache: &wgpu::Buffer,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        ctx: usize,
        m_max: usize,
        step: &wgpu::Buffer,
    ) -> Result<Dispatch> {
        let (caches, heads) = ([k_cache, v_cache], (n_heads, n_kv_heads, head_dim));
        self.bind_with(
            gpu,
            qkv,
            inv_freq,
            q_out,
            caches,
            heads,
            ctx,
            m_max,
            Rows::Step(step),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn bind_with(
        &self,
        gpu: &Gpu,
        qkv: &wgpu::Buffer,
        inv_freq: &wgpu::Buffer,
        q_out: &wgpu::Buffer,
        [k_cache, v_cache]: [&wgpu::Buffer; 2],
        (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
        ctx: usize,
        m_max: usize,
        rows: Rows,
    ) -> Result<Dispatch> {
        if head_dim == 0
            || !head_dim.is_multiple_of(2)
            || n_kv_heads == 0
            || !n_heads.is_multiple_of(n_kv_heads)
        {
            return Err(Error::Invalid(format!(
                "rope_kv: head_dim {head_dim} must be even and n_heads {n_heads} a multiple of n_kv_heads {n_kv_heads}"
            )));
        }
        if m_max == 0 || m_max > 65535 || ctx == 0 {
            return Err(Error::Invalid(format!(
                "rope_kv: m_max {m_max} must be in 1..=65535 and ctx {ctx} positive"
            )));
        }
        let q_dim = n_heads * head_dim;
        let kv_dim = n_kv_heads * head_dim;
        check_size(
            "rope_kv qkv",
            qkv,
            (m_max * (q_dim + 2 * kv_dim) * 4) as u64,
        )?;
        check_size("rope_kv inv_freq", inv_freq, (head_dim / 2 * 4) as u64)?;
        check_size("rope_kv q_out", q_out, (m_max * q_dim * 4) as u64)?;
        let (pipeline, rows_buf, slots) = match rows {
            Rows::Step(b) => (&self.pipeline, b, 1),
            Rows::Batch(b, slots) => (&self.batch_pipeline, b, slots),
        };
        let cache_bytes = (slots * n_kv_heads * ctx * head_dim * 2) as u64;
        check_size("rope_kv k_cache", k_cache, cache_bytes)?;
        check_size("rope_kv v_cache", v_cache, cache_bytes)?;
        let p = Params {
            n_heads: n_heads as u32,
            n_kv_heads: n_kv_heads as u32,
            head_dim: head_dim as u32,
            ctx: ctx as u32,
        };
        let params = gpu.uniform("rope_kv/params", &p);
        let bind_group = gpu.bind_group(
            "rope_kv",
            pipeline,
            &[qkv, inv_freq, q_out, k_cache, v_cache, &params, rows_buf],
        );
        let words = (n_heads + 2 * n_kv_heads) * head_dim / 2;
        Ok(Dispatch {
            label: "rope_kv".into(),
            pipeline: pipeline.clone(),
            bind_group,
            workgroups: [groups(words, WG), m_max as u32, 1],
            params: Some(params),
        })
    }
}
