//! INT4 matrix-matrix product for prompt processing: `Y[m, n] = sum_k X[m, k] W[n, k] (+ bias[n])`,
//! stored or added to Y, for `m < n_tokens` (read each step from the [`StepParams`] uniform, at
//! most `m_max` fixed at bind time). Rows of Y at or past `n_tokens` are left untouched.
//!
//! Two kernels, chosen by the adapter:
//! - shaders/gemm_q4_coop.wgsl: cooperative matrices (tensor cores), f16 operands with f32
//!   accumulation, 64x64 tiles of Y per workgroup of 4 subgroups. Needs `caps.coop_matrix_f16`,
//!   `caps.subgroups`, `caps.shader_f16` and a fixed subgroup size ([`GemmQ4::coop_supported`]). Operands are rounded to f16 (X and the dequantized
//!   weights), so results differ from f32 by about 1e-3 relative.
//! - shaders/gemm_q4.wgsl: portable, f32 throughout, 64x64 tiles through workgroup memory.
//!
//! Both read W through the same row-range bindings as [`GemvQ4`](super::gemv_q4::GemvQ4).
//!
//! [`StepParams`]: super::StepParams

use super::gemv_q4::{check_matrix, check_operands, check_vector, row_chunks, Epilogue};
use super::{BufRange, Dispatch, Q4Ref};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::quant::blocks_per_row;

const PORTABLE: &str = include_str!("../../shaders/gemm_q4.wgsl");
const COOP: &str = include_str!("../../shaders/gemm_q4_coop.wgsl");

/// Y tile of one workgroup (both kernels).
const TILE_M: usize = 64;
const TILE_N: usize = 64;

/// Which kernel computes the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmVariant {
    /// Workgroup-memory tiles in f32: every adapter.
    Tiled,
    /// Cooperative matrices, f16 in, f32 accumulate.
    Coop,
}

/// Overrides for [`GemmQ4::bind_with`].
#[derive(Clone, Copy, Debug, Default)]
pub struct GemmOptions {
    /// Kernel instead of the best the adapter has.
    pub variant: Option<GemmVariant>,
    /// Largest binding in bytes instead of the adapter's `max_storage_buffer_binding_size`.
    pub max_binding_bytes: Option<u64>,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    k: u32,
    bpr: u32,
    row_base: u32,
    ldy: u32,
    m_max: u32,
    accumulate: u32,
    has_bias: u32,
}

pub struct GemmQ4 {
    tiled: wgpu::ComputePipeline,
    coop: Option<wgpu::ComputePipeline>,
}

impl GemmQ4 {
    /// Compiles the portable kernel, and the cooperative-matrix one where the adapter supports it.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let tiled = gpu.compute_pipeline("gemm_q4/tiled", PORTABLE, "main", &[])?;
        let coop = if Self::coop_supported(gpu) {
            // Exactly 4 subgroups: every subgroup computes a quarter of the tile.
            let wg = 4 * gpu.caps.subgroup_max_size;
            Some(gpu.compute_pipeline("gemm_q4/coop", COOP, "main", &[("WG", wg as f64)])?)
        } else {
            None
        };
        Ok(GemmQ4 { tiled, coop })
    }

    /// Whether the adapter runs the cooperative-matrix kernel: f16 16x16x16 matrices, f16 and
    /// subgroups, and one fixed subgroup size (the kernel's workgroup is exactly 4 subgroups).
    pub fn coop_supported(gpu: &Gpu) -> bool {
        let c = &gpu.caps;
        c.coop_matrix_f16
            && c.subgroups
            && c.shader_f16
            && c.subgroup_min_size == c.subgroup_max_size
            && c.subgroup_max_size > 0
    }

    /// The kernel [`bind`](Self::bind) uses.
    pub fn variant(&self) -> GemmVariant {
        if self.coop.is_some() {
            GemmVariant::Coop
        } else {
            GemmVariant::Tiled
        }
    }

    /// Binds `Y = X Wᵀ` (see [`Epilogue`]) for `x: [m_max, cols]`, `y: [m_max, rows]`,
    /// `bias: [rows]` f32, row-major; `step` is the shared [`StepParams`](super::StepParams)
    /// uniform. Returns one dispatch per row range of W, to encode in order.
    #[allow(clippy::too_many_arguments)]
    pub fn bind(
        &self,
        gpu: &Gpu,
        w: Q4Ref,
        x: BufRange,
        y: BufRange,
        bias: Option<BufRange>,
        mode: Epilogue,
        m_max: usize,
        step: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        self.bind_with(
            gpu,
            w,
            x,
            y,
            bias,
            mode,
            m_max,
            step,
            &GemmOptions::default(),
        )
    }

    /// [`bind`](Self::bind) with a chosen kernel or binding limit.
    #[allow(clippy::too_many_arguments)]
    pub fn bind_with(
        &self,
        gpu: &Gpu,
        w: Q4Ref,
        x: BufRange,
        y: BufRange,
        bias: Option<BufRange>,
        mode: Epilogue,
        m_max: usize,
        step: &wgpu::Buffer,
        opts: &GemmOptions,
    ) -> Result<Vec<Dispatch>> {
        let what = "gemm_q4";
        check_matrix(gpu, what, &w)?;
        if m_max == 0 {
            return Err(Error::Invalid(format!("{what}: m_max must be at least 1")));
        }
        let m = m_max as u64;
        check_operands(
            gpu,
            what,
            &x,
            m * w.cols as u64 * 4,
            &y,
            m * w.rows as u64 * 4,
        )?;
        if let Some(b) = &bias {
            check_vector(gpu, what, "bias", b, w.rows as u64 * 4)?;
        }
        if m * (w.cols.max(w.rows) as u64) > u32::MAX as u64 {
            return Err(Error::Unsupported(format!(
                "{what}: {m_max}x{} too large for 32-bit indexing",
                w.cols.max(w.rows)
            )));
        }
        let (pipeline, name) = match opts.variant.unwrap_or(self.variant()) {
            GemmVariant::Tiled => (&self.tiled, "tiled"),
            GemmVariant::Coop => match &self.coop {
                Some(p) => (p, "coop"),
                None => {
                    return Err(Error::Unsupported(format!(
                        "{what}: the adapter has no f16 16x16x16 cooperative matrices"
                    )))
                }
            },
        };
        let max_binding = opts
            .max_binding_bytes
            .unwrap_or(gpu.limits.max_storage_buffer_binding_size);
        let bpr = blocks_per_row(w.cols);
        let bias_range = bias.unwrap_or(x);
        let bias_bytes = if bias.is_some() {
            w.rows as u64 * 4
        } else {
            x.size.min(w.cols as u64 * 4)
        };
        let m_groups = m_max.div_ceil(TILE_M) as u32;
        let mut out = Vec::new();
        for c in row_chunks(gpu, what, &w, max_binding)? {
            let n_groups = c.rows.div_ceil(TILE_N) as u32;
            if n_groups > gpu.limits.max_compute_workgroups_per_dimension
                || m_groups > gpu.limits.max_compute_workgroups_per_dimension
            {
                return Err(Error::Unsupported(format!(
                    "{what}: {m_max}x{} needs too many workgroups",
                    c.rows
                )));
            }
            let params = Params {
                n: c.rows as u32,
                k: w.cols as u32,
                bpr: bpr as u32,
                row_base: c.row0 as u32,
                ldy: w.rows as u32,
                m_max: m_max as u32,
                accumulate: (mode == Epilogue::Accumulate) as u32,
                has_bias: bias.is_some() as u32,
            };
            let label = format!(
                "gemm_q4/{name} {}x{} rows {}..{} m_max {m_max}",
                w.rows,
                w.cols,
                c.row0,
                c.row0 + c.rows
            );
            let params_buf = gpu.uniform(&label, &params);
            let bind_group = gpu.bind_group_ranges(
                &label,
                pipeline,
                &[
                    (&params_buf, 0, None),
                    (
                        step,
                        0,
                        Some(std::mem::size_of::<super::StepParams>() as u64),
                    ),
                    (w.qweight.buffer, c.qweight.0, Some(c.qweight.1)),
                    (w.scales.buffer, c.scales.0, Some(c.scales.1)),
                    (x.buffer, x.offset, Some(m * w.cols as u64 * 4)),
                    (bias_range.buffer, bias_range.offset, Some(bias_bytes)),
                    (y.buffer, y.offset, Some(m * w.rows as u64 * 4)),
                ],
            );
            out.push(Dispatch {
                label,
                pipeline: pipeline.clone(),
                bind_group,
                workgroups: [n_groups, m_groups, 1],
                params: Some(params_buf),
            });
        }
        Ok(out)
    }
}
