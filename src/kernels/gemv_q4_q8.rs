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

use super::gemv_q4::{
    cached_pipeline, check_config, check_matrix, check_vector, row_chunks, Epilogue, GemvConfig,
    GemvOptions, PipelineCache, MAX_UNROLL,
};
use super::quant_act::{ActQ8Buffers, Q8_BLOCK};
use super::rope_kv::ROPE_ANGLE;
use super::{BufRange, Dispatch, Q4Ref};
use crate::error::{Error, Result};
use crate::gpu::{dispatch_2d, Gpu};
use crate::quant::{blocks_per_row, ACT_BLOCK, BLOCK};
use std::collections::HashMap;
use std::sync::Mutex;

const SOURCE: &str = include_str!("../../shaders/gemv_q4_q8.wgsl");
const SUM_SUBGROUP: &str = include_str!("../../shaders/gemv_q4_sum_subgroup.wgsl");
const SUM_SHARED: &str = include_str!("../../shaders/gemv_q4_sum_shared.wgsl");
const OUT_Y: &str = include_str!("../../shaders/gemv_q4_q8_out_y.wgsl");
const OUT_ROPE_KV: &str = include_str!("../../shaders/gemv_q4_q8_out_rope_kv.wgsl");

/// What the kernel reads as x.
#[derive(Clone, Copy)]
pub enum Q8Input<'a> {
    /// x quantized beforehand ([`QuantAct`](super::quant_act::QuantAct)).
    Quantized(&'a ActQ8Buffers),
    /// An f32 vector (K values), quantized quarter by quarter as the kernel reads it.
    F32(BufRange<'a>),
    /// RMSNorm of the residual stream (K values) with `weight` and `eps`, quantized as it is read.
    RmsNorm {
        x: BufRange<'a>,
        weight: &'a wgpu::Buffer,
        eps: f32,
    },
    /// `silu(gate) * up` of `[gate | up]` (2K values), quantized as it is read.
    SwiGlu(BufRange<'a>),
}

impl Q8Input<'_> {
    /// The shader's INPUT constant.
    fn code(&self) -> u32 {
        match self {
            Q8Input::Quantized(_) => 0,
            Q8Input::F32(_) => 1,
            Q8Input::RmsNorm { .. } => 2,
            Q8Input::SwiGlu(_) => 3,
        }
    }

    fn name(&self) -> &'static str {
        [
            "",
            " (f32 x quantized in)",
            " (rmsnorm quantized in)",
            " (swiglu quantized in)",
        ][self.code() as usize]
    }
}

/// Where the decode step's fused qkv projection goes with [`GemvQ4Q8::bind_rope_kv`]: q rotated
/// into `q_out`, k rotated and v into the layer's KV cache at position `step.pos` (as
/// [`RopeKv`](super::rope_kv::RopeKv) writes them).
pub struct RopeKvOut<'a> {
    pub inv_freq: &'a wgpu::Buffer,
    pub q_out: &'a wgpu::Buffer,
    pub k_cache: &'a wgpu::Buffer,
    pub v_cache: &'a wgpu::Buffer,
    pub step: &'a wgpu::Buffer,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ctx: usize,
}

/// The kernel's output: y, or RoPE and the KV-cache write (with its parameters' uniform).
enum Out<'a> {
    Y { y: BufRange<'a>, mode: Epilogue },
    RopeKv(&'a RopeKvOut<'a>, wgpu::Buffer),
    Batch { io: &'a BatchIo<'a>, mode: Epilogue },
}

/// The shader's output file (an index into `OUT_SOURCES`).
const OUT_Y_CODE: u32 = 0;
const OUT_ROPE_KV_CODE: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct RopeParams {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    ctx: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    k: u32,
    bpr: u32,
    row_base: u32,
    accumulate: u32,
    has_bias: u32,
    eps: f32,
    y_stride: u32,
}

pub struct GemvQ4Q8 {
    subgroups: bool,
    subgroup_max: u32,
    /// By workgroup shape and variant.
    pipelines: PipelineCache<Variant>,
}

/// What a pipeline is built for, besides its workgroup shape: the INPUT code, the output file,
/// the columns (COLS) and, for a batched product, the column-lanes layout (LANES).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Variant {
    input: u32,
    out: u32,
    cols: u32,
    lanes: bool,
}

impl Variant {
    fn one_column(input: u32, out: u32) -> Variant {
        Variant {
            input,
            out,
            cols: 1,
            lanes: false,
        }
    }
}

/// The batched step's rows uniform (`shaders/batch_step.wgsl`), shared by every batched kernel.
pub(crate) const BATCH_STEP: &str = include_str!("../../shaders/batch_step.wgsl");

/// Most sequences a batched product takes (batch_step.wgsl's MAX_BATCH).
pub const MAX_BATCH: usize = 8;

/// A batched product's x, y and live columns (see [`GemvQ4Q8::bind_batch`]).
pub struct BatchIo<'a> {
    /// `cols` quantized vectors, one after another (each K padded to whole weight blocks).
    pub x: &'a ActQ8Buffers,
    /// `cols` outputs of `w.rows` values, column c at `c * y_stride`.
    pub y: &'a wgpu::Buffer,
    pub y_stride: usize,
    /// Columns bound (the pipeline's COLS).
    pub cols: usize,
    /// The step's rows uniform: its `n_rows` columns are computed.
    pub batch: &'a wgpu::Buffer,
}

impl GemvQ4Q8 {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let kernel = GemvQ4Q8 {
            subgroups: gpu.caps.subgroups,
            subgroup_max: gpu.caps.subgroup_max_size.max(1),
            pipelines: Mutex::new(HashMap::new()),
        };
        kernel.pipeline(
            gpu,
            kernel.config_for(4096, 4096),
            Variant::one_column(0, OUT_Y_CODE),
        )?;
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
            unroll: 1,
            wg,
            rows: rows_per_group,
            subgroups: self.subgroups,
        }
    }

    fn pipeline(&self, gpu: &Gpu, cfg: GemvConfig, v: Variant) -> Result<wgpu::ComputePipeline> {
        check_config(
            gpu,
            "gemv_q4_q8",
            &cfg,
            self.subgroups,
            self.subgroup_max,
            MAX_UNROLL,
        )?;
        let label = format!(
            "input{} out{} cols{}{}",
            v.input,
            v.out,
            v.cols,
            if v.lanes { " lanes" } else { "" }
        );
        cached_pipeline(gpu, &self.pipelines, "gemv_q4_q8", cfg, v, &label, || {
            shader_with_output(cfg.subgroups, cfg.unroll, v)
        })
    }

    /// Binds `y = W x` (see [`Epilogue`]) for x as `x` says (`cols` values), `y, bias: [rows]`
    /// f32. One dispatch per row range, to encode in order.
    #[allow(clippy::too_many_arguments)]
    pub fn bind(
        &self,
        gpu: &Gpu,
        w: Q4Ref,
        x: Q8Input,
        y: BufRange,
        bias: Option<BufRange>,
        mode: Epilogue,
        opts: &GemvOptions,
    ) -> Result<Vec<Dispatch>> {
        self.bind_with(gpu, w, x, Out::Y { y, mode }, bias, opts)
    }

    /// Binds the batched product of a decode step over several sequences: `y[c] = W x[c]` (see
    /// [`Epilogue`]) for the step's live columns c < `batch.n_rows` of `io.cols` bound, so each
    /// weight is read once for all of them. x is quantized beforehand (`QuantAct::bind_rows`).
    /// A column's arithmetic is the one-column kernel's, operation for operation.
    pub fn bind_batch(
        &self,
        gpu: &Gpu,
        w: Q4Ref,
        io: &BatchIo,
        bias: Option<BufRange>,
        mode: Epilogue,
        opts: &GemvOptions,
    ) -> Result<Vec<Dispatch>> {
        if !(1..=MAX_BATCH).contains(&io.cols) || io.y_stride < w.rows {
            return Err(Error::Invalid(format!(
                "gemv_q4_q8 (batched): {} columns (1..={MAX_BATCH}) with outputs {} apart for a \
                 {}-row matrix",
                io.cols, io.y_stride, w.rows
            )));
        }
        self.bind_with(
            gpu,
            w,
            Q8Input::Quantized(io.x),
            Out::Batch { io, mode },
            bias,
            opts,
        )
    }

    /// Whether [`bind_rope_kv`](Self::bind_rope_kv) takes `w` with heads of `head_dim`: a
    /// multiple of 4, and the whole matrix in one binding. Otherwise the caller writes y and
    /// runs RoPE as a dispatch of its own.
    pub fn rope_kv_fits(&self, gpu: &Gpu, w: &Q4Ref, head_dim: usize) -> bool {
        head_dim > 0
            && head_dim.is_multiple_of(4)
            && row_chunks(
                gpu,
                "gemv_q4_q8",
                w,
                gpu.limits.max_storage_buffer_binding_size,
            )
            .is_ok_and(|c| c.len() == 1)
    }

    /// Binds the decode step's qkv projection `W x (+ bias)` (one token) with RoPE and the
    /// KV-cache write as its output (`out`), in place of a y store and a rope_kv dispatch.
    /// Workgroups of 4 rows (`opts.config`'s row count is replaced by 4).
    pub fn bind_rope_kv(
        &self,
        gpu: &Gpu,
        w: Q4Ref,
        x: Q8Input,
        out: &RopeKvOut,
        bias: Option<BufRange>,
        opts: &GemvOptions,
    ) -> Result<Vec<Dispatch>> {
        let what = "gemv_q4_q8 (rope + kv write)";
        let rows = (out.n_heads + 2 * out.n_kv_heads) * out.head_dim;
        if out.head_dim == 0
            || !out.head_dim.is_multiple_of(4)
            || out.n_kv_heads == 0
            || !out.n_heads.is_multiple_of(out.n_kv_heads)
            || out.ctx == 0
            || w.rows != rows
        {
            return Err(Error::Invalid(format!(
                "{what}: a {}-row matrix with {} heads, {} KV heads of {} (head_dim a multiple of 4, \
                 rows = (heads + 2 KV heads) * head_dim) and a context of {}",
                w.rows, out.n_heads, out.n_kv_heads, out.head_dim, out.ctx
            )));
        }
        let q_bytes = (out.n_heads * out.head_dim * 4) as u64;
        let cache_bytes = (out.n_kv_heads * out.ctx * out.head_dim * 2) as u64;
        check_vector(gpu, what, "q_out", &BufRange::whole(out.q_out), q_bytes)?;
        check_vector(
            gpu,
            what,
            "k_cache",
            &BufRange::whole(out.k_cache),
            cache_bytes,
        )?;
        check_vector(
            gpu,
            what,
            "v_cache",
            &BufRange::whole(out.v_cache),
            cache_bytes,
        )?;
        let freq_bytes = (out.head_dim / 2 * 4) as u64;
        check_vector(
            gpu,
            what,
            "inv_freq",
            &BufRange::whole(out.inv_freq),
            freq_bytes,
        )?;
        let params = gpu.uniform(what, &RopeParams::of(out));
        self.bind_with(gpu, w, x, Out::RopeKv(out, params), bias, opts)
    }

    fn bind_with(
        &self,
        gpu: &Gpu,
        w: Q4Ref,
        x: Q8Input,
        out: Out,
        bias: Option<BufRange>,
        opts: &GemvOptions,
    ) -> Result<Vec<Dispatch>> {
        let what = "gemv_q4_q8";
        check_matrix(gpu, what, &w)?;
        let bpr = blocks_per_row(w.cols);
        let mut xb = x_bindings(gpu, what, &w, &x)?;
        let cols = match out {
            Out::Batch { io, .. } => io.cols,
            _ => 1,
        };
        if cols > 1 {
            let (words, scales) = (xb.words.size * cols as u64, xb.scales.size * cols as u64);
            if words > xb.words.buffer.size() || scales > xb.scales.buffer.size() {
                return Err(Error::Invalid(format!(
                    "{what}: the quantized activation buffers hold fewer than {cols} vectors of {} values",
                    w.cols
                )));
            }
            xb.words.size = words;
            xb.scales.size = scales;
        }
        check_output(gpu, what, &w, &x, &xb, &out, bias.as_ref())?;
        let (xq, xd, xf, norm, eps) = (xb.words, xb.scales, xb.f32_x, xb.norm, xb.eps);
        let (xq_bytes, xd_bytes) = (xq.size, xd.size);
        let k_bytes = 4 * w.cols as u64;
        // A batched product takes the one-column shape: its workgroup is COLS of those.
        let mut cfg = opts
            .config
            .unwrap_or_else(|| self.config_for(w.rows, w.cols));
        let out_code = match out {
            Out::Y { .. } | Out::Batch { .. } => OUT_Y_CODE,
            Out::RopeKv(..) => {
                cfg.rows = 4;
                OUT_ROPE_KV_CODE
            }
        };
        let threads = cfg.wg as usize * cols;
        let shared = (cfg.rows as usize * cols + 1) * cfg.wg as usize * 4;
        let limits = &gpu.limits;
        if threads > limits.max_compute_invocations_per_workgroup as usize
            || shared > limits.max_compute_workgroup_storage_size as usize
        {
            return Err(Error::Unsupported(format!(
                "{what}: {cols} columns of {} threads and {} rows need {threads} threads and \
                 {shared} bytes of workgroup memory; this GPU has {} and {}",
                cfg.wg,
                cfg.rows,
                limits.max_compute_invocations_per_workgroup,
                limits.max_compute_workgroup_storage_size
            )));
        }
        let variant = Variant {
            input: x.code(),
            out: out_code,
            cols: cols as u32,
            lanes: cols > 1 && opts.column_lanes,
        };
        let pipeline = self.pipeline(gpu, cfg, variant)?;
        let max_binding = opts
            .max_binding_bytes
            .unwrap_or(gpu.limits.max_storage_buffer_binding_size);
        // Without a bias the binding still needs a buffer: x's, never read through it.
        let bias_range = bias.unwrap_or(xd);
        let bias_bytes = if bias.is_some() { w.rows as u64 * 4 } else { 4 };
        let chunks = row_chunks(gpu, what, &w, max_binding)?;
        if matches!(out, Out::RopeKv(..)) && chunks.len() != 1 {
            return Err(Error::Invalid(format!(
                "{what}: the rope + kv output needs the qkv matrix ({} x {}) in one binding",
                w.rows, w.cols
            )));
        }
        let mode = match out {
            Out::Y { mode, .. } | Out::Batch { mode, .. } => mode,
            Out::RopeKv(..) => Epilogue::Store,
        };
        let y_stride = match out {
            Out::Batch { io, .. } => io.y_stride as u32,
            _ => 0,
        };
        let mut dispatches = Vec::new();
        for c in &chunks {
            let params = Params {
                rows: c.rows as u32,
                k: w.cols as u32,
                bpr: bpr as u32,
                row_base: c.row0 as u32,
                accumulate: (mode == Epilogue::Accumulate) as u32,
                has_bias: bias.is_some() as u32,
                eps,
                y_stride,
            };
            let label = format!(
                "{what} {}x{} rows {}..{}{}",
                w.rows,
                w.cols,
                c.row0,
                c.row0 + c.rows,
                x.name()
            );
            let params_buf = gpu.uniform(&label, &params);
            let mut entries = vec![
                (0, &params_buf, 0, None),
                (1, w.qweight.buffer, c.qweight.0, Some(c.qweight.1)),
                (2, w.scales.buffer, c.scales.0, Some(c.scales.1)),
                (3, xq.buffer, xq.offset, Some(xq_bytes)),
                (4, xd.buffer, xd.offset, Some(xd_bytes)),
                (5, bias_range.buffer, bias_range.offset, Some(bias_bytes)),
                (7, xf.buffer, xf.offset, Some(xf.size.max(16))),
                (8, norm, 0, Some(k_bytes.max(16).min(norm.size()))),
            ];
            entries.extend(output_entries(&out, w.rows));
            let bind_group = gpu.bind_group_numbered(&label, &pipeline, &entries);
            let units = match &out {
                Out::Y { .. } | Out::Batch { .. } => c.rows.div_ceil(cfg.rows as usize),
                Out::RopeKv(r, _) => (r.n_heads + 2 * r.n_kv_heads) * (r.head_dim / 4),
            };
            let (gx, gy) = dispatch_2d(units as u32);
            dispatches.push(Dispatch {
                label,
                pipeline: pipeline.clone(),
                bind_group,
                workgroups: [gx, gy, 1],
                params: Some(params_buf),
            });
        }
        Ok(dispatches)
    }
}

/// Checks the output and bias bindings of a product against `w` and x.
fn check_output(
    gpu: &Gpu,
    what: &str,
    w: &Q4Ref,
    x: &Q8Input,
    xb: &XBindings,
    out: &Out,
    bias: Option<&BufRange>,
) -> Result<()> {
    if let Out::Y { y, .. } = out {
        if y.buffer == xb.f32_x.buffer && !matches!(x, Q8Input::Quantized(_)) {
            return Err(Error::Invalid(format!(
                "{what}: x and y must be different buffers (y is written)"
            )));
        }
        check_vector(gpu, what, "y", y, w.rows as u64 * 4)?;
    }
    if let Out::Batch { io, .. } = out {
        let need = ((io.cols - 1) * io.y_stride + w.rows) as u64 * 4;
        check_vector(gpu, what, "y", &BufRange::whole(io.y), need)?;
    }
    if let Some(b) = bias {
        check_vector(gpu, what, "bias", b, w.rows as u64 * 4)?;
    }
    Ok(())
}

impl RopeParams {
    fn of(r: &RopeKvOut) -> RopeParams {
        RopeParams {
            n_heads: r.n_heads as u32,
            n_kv_heads: r.n_kv_heads as u32,
            head_dim: r.head_dim as u32,
            ctx: r.ctx as u32,
        }
    }
}

/// The output's bind-group entries: y (binding 6), or the RoPE parameters (binding 9), the step,
/// inv_freq, q and the two caches (10-14).
fn output_entries<'a>(
    out: &'a Out<'a>,
    rows: usize,
) -> Vec<(u32, &'a wgpu::Buffer, u64, Option<u64>)> {
    match out {
        Out::Y { y, .. } => vec![(6, y.buffer, y.offset, Some(rows as u64 * 4))],
        Out::Batch { io, .. } => vec![(6, io.y, 0, None), (15, io.batch, 0, None)],
        Out::RopeKv(r, params) => vec![
            (9, params, 0, None),
            (10, r.step, 0, None),
            (11, r.inv_freq, 0, None),
            (12, r.q_out, 0, None),
            (13, r.k_cache, 0, None),
            (14, r.v_cache, 0, None),
        ],
    }
}

/// The x bindings of a product: packed words, block scales, the f32 vector and the norm weight
/// (sized as bound); the ones an input does not use get a buffer never read through them.
struct XBindings<'a> {
    words: BufRange<'a>,
    scales: BufRange<'a>,
    f32_x: BufRange<'a>,
    norm: &'a wgpu::Buffer,
    eps: f32,
}

fn x_bindings<'a>(gpu: &Gpu, what: &str, w: &Q4Ref, x: &Q8Input<'a>) -> Result<XBindings<'a>> {
    let k_bytes = 4 * w.cols as u64;
    if !w.cols.is_multiple_of(4) {
        return Err(Error::Invalid(format!(
            "{what}: K = {} must be a multiple of 4",
            w.cols
        )));
    }
    let sized = |r: BufRange<'a>, size: u64| BufRange { size, ..r };
    Ok(match *x {
        Q8Input::Quantized(a) => {
            if w.cols > a.capacity {
                return Err(Error::Invalid(format!(
                    "{what}: K = {} exceeds the quantized activation buffers' {} values",
                    w.cols, a.capacity
                )));
            }
            let blocks = (blocks_per_row(w.cols) * BLOCK / ACT_BLOCK) as u64;
            let words = BufRange::whole(&a.words);
            XBindings {
                words: sized(words, blocks * 32),
                scales: sized(BufRange::whole(&a.scales), blocks * 8),
                f32_x: sized(words, 16),
                norm: &a.words,
                eps: 0.0,
            }
        }
        Q8Input::F32(v) | Q8Input::SwiGlu(v) => {
            let need = if matches!(x, Q8Input::SwiGlu(_)) {
                2 * k_bytes
            } else {
                k_bytes
            };
            check_vector(gpu, what, "x", &v, need)?;
            XBindings {
                words: sized(v, 16),
                scales: sized(v, 8),
                f32_x: sized(v, need),
                norm: v.buffer,
                eps: 0.0,
            }
        }
        Q8Input::RmsNorm { x: v, weight, eps } => {
            check_vector(gpu, what, "x", &v, k_bytes)?;
            check_vector(gpu, what, "norm weight", &BufRange::whole(weight), k_bytes)?;
            XBindings {
                words: sized(v, 16),
                scales: sized(v, 8),
                f32_x: sized(v, k_bytes),
                norm: weight,
                eps,
            }
        }
    })
}

/// The WGSL of the kernel reading `input` (its INPUT code) and writing y, before
/// gpu::shader_source.
pub fn shader(subgroups: bool, input: u32) -> String {
    shader_with_output(subgroups, 1, Variant::one_column(input, OUT_Y_CODE))
}

/// The same with the RoPE + KV-cache output (see [`GemvQ4Q8::bind_rope_kv`]).
pub fn rope_kv_shader(subgroups: bool, input: u32) -> String {
    shader_with_output(subgroups, 1, Variant::one_column(input, OUT_ROPE_KV_CODE))
}

/// The batched kernel of `cols` columns (quantized x, plain output), with `lanes` in the
/// column-lanes layout ([`GemvOptions::column_lanes`]).
pub fn batch_shader(subgroups: bool, cols: u32, lanes: bool) -> String {
    let v = Variant {
        input: 0,
        out: OUT_Y_CODE,
        cols,
        lanes,
    };
    shader_with_output(subgroups, 1, v)
}

fn shader_with_output(subgroups: bool, unroll: u32, v: Variant) -> String {
    let Variant {
        input,
        out,
        cols,
        lanes,
    } = v;
    let sum = if subgroups { SUM_SUBGROUP } else { SUM_SHARED };
    let output = if out == OUT_ROPE_KV_CODE {
        format!("{ROPE_ANGLE}\n{OUT_ROPE_KV}")
    } else {
        OUT_Y.to_string()
    };
    // One column needs no rows uniform; a batched product computes the step's live columns.
    let columns = if cols == 1 {
        "fn batch_cols() -> u32 { return 1u; }".to_string()
    } else {
        format!(
            "{BATCH_STEP}\n@group(0) @binding(15) var<uniform> batch: BatchStep;\n\
             fn batch_cols() -> u32 {{ return min(batch.n_rows, COLS); }}"
        )
    };
    format!(
        "const INPUT: u32 = {input}u;\nconst UNROLL: u32 = {unroll}u;\nconst COLS: u32 = {cols}u;\n\
         const LANES: bool = {lanes};\n\
         {columns}\n{Q8_BLOCK}\n{sum}\n{SOURCE}\n{output}"
    )
}
