//! INT4 matrix-vector product with int8 activations for decode (`shaders/gemv_q4_q8.wgsl`):
//! `y = W x (+ bias)` or `y += W x (+ bias)` with x quantized by
//! [`QuantAct`](super::quant_act::QuantAct) as [`ActQ8`](crate::quant::ActQ8) specifies.
//!
//! Same thread mapping, row-range splitting and workgroup reduction as [`GemvQ4`]; the inner loop
//! is two packed 4-way int8 dot products per word of weights instead of an f32 multiply-add per
//! weight, which takes the kernel from issue-bound to memory-bound (KERNELS.md §0: the H200 gives
//! about 4 instructions per weight at its read bandwidth).
//!
//! [`GemvQ4`]: super::gemv_q4::GemvQ4

use super::gemv_q4::{check_matrix, check_vector, row_chunks, Epilogue, GemvConfig, GemvOptions, MAX_ROWS};
use super::quant_act::ActQ8Buffers;
use super::{BufRange, Dispatch, Q4Ref};
use crate::error::{Error, Result};
use crate::gpu::{dispatch_2d, Gpu};
use crate::quant::{blocks_per_row, ACT_BLOCK, BLOCK};
use std::collections::HashMap;
use std::sync::Mutex;

const SOURCE: &str = include_str!("../../shaders/gemv_q4_q8.wgsl");
const SUM_SUBGROUP: &str = include_str!("../../shaders/gemv_q4_sum_subgroup.wgsl");
const SUM_SHARED: &str = include_str!("../../shaders/gemv_q4_sum_shared.wgsl");

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    k: u32,
    bpr: u32,
    row_base: u32,
    accumulate: u32,
    has_bias: u32,
    pad: [u32; 2],
}

pub struct GemvQ4Q8 {
    subgroups: bool,
    subgroup_max: u32,
    pipelines: Mutex<HashMap<GemvConfig, wgpu::ComputePipeline>>,
}

impl GemvQ4Q8 {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let kernel = GemvQ4Q8 {
            subgroups: gpu.caps.subgroups,
            subgroup_max: gpu.caps.subgroup_max_size.max(1),
            pipelines: Mutex::new(HashMap::new()),
        };
        kernel.pipeline(gpu, kernel.config_for(4096, 4096))?;
        Ok(kernel)
    }

    /// The workgroup shape for a `rows x cols` matrix, from the H200 sweep of every shape
    /// (benchmarks/runs/2026-11-30-h200-int8/kernels.log, GB/s):
    /// - many rows (gate_up 55296, lm_head 152064): 32 threads x 4 rows (3800 and 4305; 1 row
    ///   per workgroup loses a quarter: each x load serves fewer rows);
    /// - few rows and a long K (down, 5120 x 27648): 128 threads x 1 row (3311; 64 x 4: 2540):
    ///   the row's K loop spreads over more threads and every workgroup still has work;
    /// - few rows and a short K (qkv, o): 32 threads x 2 rows (2001 and 1661; 64 x 4: 1766 and
    ///   1364): more workgroups on a small matrix.
    pub fn config_for(&self, rows: usize, cols: usize) -> GemvConfig {
        let unit = self.subgroup_max.max(32);
        let (wg, rows_per_group) = if rows >= 32768 {
            (unit, 4)
        } else if cols > 8192 {
            (128u32.next_multiple_of(unit), 1)
        } else {
            (unit, 2)
        };
        GemvConfig {
            wg,
            rows: rows_per_group,
            subgroups: self.subgroups,
        }
    }

    fn pipeline(&self, gpu: &Gpu, cfg: GemvConfig) -> Result<wgpu::ComputePipeline> {
        let unit = self.subgroup_max.max(32);
        if cfg.wg % unit != 0 || !(32..=1024).contains(&cfg.wg) || !(1..=MAX_ROWS).contains(&cfg.rows) {
            return Err(Error::Invalid(format!(
                "gemv_q4_q8: workgroup of {} threads x {} rows: threads must be in 32..=1024 and a multiple of {unit}, rows in 1..={MAX_ROWS}",
                cfg.wg, cfg.rows
            )));
        }
        if cfg.subgroups && !self.subgroups {
            return Err(Error::Unsupported("gemv_q4_q8: the adapter has no subgroup operations".into()));
        }
        let mut cache = self
            .pipelines
            .lock()
            .map_err(|_| Error::Gpu("gemv_q4_q8: pipeline cache poisoned".into()))?;
        if let Some(p) = cache.get(&cfg) {
            return Ok(p.clone());
        }
        let sum = if cfg.subgroups { SUM_SUBGROUP } else { SUM_SHARED };
        let kind = if cfg.subgroups { "subgroup" } else { "shared" };
        let label = format!("gemv_q4_q8/wg{}_rows{}_{kind}", cfg.wg, cfg.rows);
        let source = format!("{sum}\n{SOURCE}");
        let overrides = [("WG", cfg.wg as f64), ("ROWS", cfg.rows as f64)];
        let pipeline = gpu.compute_pipeline_unchecked(&label, &source, "main", &overrides)?;
        cache.insert(cfg, pipeline.clone());
        Ok(pipeline)
    }

    /// Binds `y = W x` (see [`Epilogue`]) for x in `x` (quantized, `cols` values), `y, bias:
    /// [rows]` f32. One dispatch per row range, to encode in order.
    #[allow(clippy::too_many_arguments)]
    pub fn bind(
        &self,
        gpu: &Gpu,
        w: Q4Ref,
        x: &ActQ8Buffers,
        y: BufRange,
        bias: Option<BufRange>,
        mode: Epilogue,
        opts: &GemvOptions,
    ) -> Result<Vec<Dispatch>> {
        let what = "gemv_q4_q8";
        check_matrix(gpu, what, &w)?;
        if w.cols > x.capacity {
            return Err(Error::Invalid(format!(
                "{what}: K = {} exceeds the quantized activation buffers' {} values",
                w.cols, x.capacity
            )));
        }
        check_vector(gpu, what, "y", &y, w.rows as u64 * 4)?;
        if let Some(b) = &bias {
            check_vector(gpu, what, "bias", b, w.rows as u64 * 4)?;
        }
        let cfg = opts.config.unwrap_or_else(|| self.config_for(w.rows, w.cols));
        let pipeline = self.pipeline(gpu, cfg)?;
        let max_binding = opts
            .max_binding_bytes
            .unwrap_or(gpu.limits.max_storage_buffer_binding_size);
        let bpr = blocks_per_row(w.cols);
        let x_blocks = (bpr * BLOCK / ACT_BLOCK) as u64;
        // Without a bias the binding still needs a buffer: x's scales, never read through it.
        let bias_range = bias.unwrap_or(BufRange::whole(&x.scales));
        let bias_bytes = if bias.is_some() { w.rows as u64 * 4 } else { 4 };
        let mut out = Vec::new();
        for c in &row_chunks(gpu, what, &w, max_binding)? {
            let params = Params {
                rows: c.rows as u32,
                k: w.cols as u32,
                bpr: bpr as u32,
                row_base: c.row0 as u32,
                accumulate: (mode == Epilogue::Accumulate) as u32,
                has_bias: bias.is_some() as u32,
                pad: [0; 2],
            };
            let label = format!("{what} {}x{} rows {}..{}", w.rows, w.cols, c.row0, c.row0 + c.rows);
            let params_buf = gpu.uniform(&label, &params);
            let bind_group = gpu.bind_group_ranges(
                &label,
                &pipeline,
                &[
                    (&params_buf, 0, None),
                    (w.qweight.buffer, c.qweight.0, Some(c.qweight.1)),
                    (w.scales.buffer, c.scales.0, Some(c.scales.1)),
                    (&x.words, 0, Some(x_blocks * 32)),
                    (&x.scales, 0, Some(x_blocks * 8)),
                    (bias_range.buffer, bias_range.offset, Some(bias_bytes)),
                    (y.buffer, y.offset, Some(w.rows as u64 * 4)),
                ],
            );
            let (gx, gy) = dispatch_2d(c.rows.div_ceil(cfg.rows as usize) as u32);
            out.push(Dispatch {
                label,
                pipeline: pipeline.clone(),
                bind_group,
                workgroups: [gx, gy, 1],
                params: Some(params_buf),
            });
        }
        Ok(out)
    }
}
