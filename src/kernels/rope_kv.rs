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

pub struct RopeKv {
    pipeline: wgpu::ComputePipeline,
}

impl RopeKv {
    pub fn new(gpu: &Gpu) -> Result<RopeKv> {
        let source = format!(
            "{ROPE_ANGLE}\n{}",
            include_str!("../../shaders/rope_kv.wgsl")
        );
        let pipeline = gpu.compute_pipeline("rope_kv", &source, "main", &[])?;
        Ok(RopeKv { pipeline })
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
        let cache_bytes = (n_kv_heads * ctx * head_dim * 2) as u64;
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
            &self.pipeline,
            &[qkv, inv_freq, q_out, k_cache, v_cache, &params, step],
        );
        let words = (n_heads + 2 * n_kv_heads) * head_dim / 2;
        Ok(Dispatch {
            label: "rope_kv".into(),
            pipeline: self.pipeline.clone(),
            bind_group,
            workgroups: [groups(words, WG), m_max as u32, 1],
            params: Some(params),
        })
    }
}
