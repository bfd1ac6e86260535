//! INT4 matrix-vector product for decode: `y = W x (+ bias)` or `y += W x (+ bias)`.
//!
//! Kernel: shaders/gemv_q4.wgsl. A workgroup of `wg` threads computes `rows` consecutive rows;
//! its threads split K (quarter blocks of 32 weights, one 16-byte load each), so every load of x
//! serves `rows` rows and each thread keeps `rows` weight loads in flight. Partial sums are
//! reduced with subgroup operations where the adapter has them (shaders/gemv_q4_sum_subgroup.wgsl),
//! otherwise through a tree in workgroup memory (shaders/gemv_q4_sum_shared.wgsl). Weights are
//! dequantized in 3 instructions each (see the shader's header): on the H100 fewer instructions
//! per weight and more rows per x load raised GB/s, more loads in flight per thread (unrolled or
//! prefetched steps) did not.
//!
//! Splitting K across a workgroup is this kernel's split-K: for a small N (few rows, too few
//! workgroups to fill the GPU) [`GemvQ4::config_for`] gives each workgroup more threads, so there
//! are more threads per row and shorter K loops, with no second pass.
//!
//! A matrix whose words exceed the adapter's storage-binding limit is cut into row ranges, one
//! dispatch each (the bindings of a range start at aligned offsets); see [`row_chunks`].

use super::{BufRange, Dispatch, Q4Ref};
use crate::error::{Error, Result};
use crate::gpu::{dispatch_2d, Gpu};
use crate::quant::{blocks_per_row, WORDS_PER_BLOCK};
use std::collections::HashMap;
use std::sync::Mutex;

const SOURCE: &str = include_str!("../../shaders/gemv_q4.wgsl");
const SUM_SUBGROUP: &str = include_str!("../../shaders/gemv_q4_sum_subgroup.wgsl");
const SUM_SHARED: &str = include_str!("../../shaders/gemv_q4_sum_shared.wgsl");

/// Most rows one workgroup may compute (`MAX_ROWS` in the shader).
pub const MAX_ROWS: u32 = 16;
/// Threads the heuristic aims to have in flight over the whole GPU (tuned on the H100 with
/// benches/kernels.rs; enough 16-byte loads in flight to cover memory latency).
const TARGET_THREADS: usize = 1 << 16;

/// What is done with the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    /// `y = W x (+ bias)`.
    Store,
    /// `y += W x (+ bias)`: the residual add, fused (each element read and written by one thread).
    Accumulate,
}

/// What the kernel reads as x: the vector itself, or one it computes on the fly from the input
/// of the elementwise step before a projection (that step's dispatch is saved).
#[derive(Clone, Copy, Debug)]
pub enum GemvInput<'a> {
    /// x as bound.
    Plain,
    /// The bound vector is the residual stream r; x = RMSNorm(r) with `weight` (K f32) and `eps`.
    RmsNorm { weight: BufRange<'a>, eps: f32 },
    /// The bound vector is [gate (K) | up (K)]; x = silu(gate) * up.
    SwiGlu,
}

/// [`GemvInput`] without its operands: what selects the kernel variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemvInputKind {
    Plain,
    RmsNorm,
    SwiGlu,
}

impl GemvInput<'_> {
    pub fn kind(&self) -> GemvInputKind {
        match self {
            GemvInput::Plain => GemvInputKind::Plain,
            GemvInput::RmsNorm { .. } => GemvInputKind::RmsNorm,
            GemvInput::SwiGlu => GemvInputKind::SwiGlu,
        }
    }
}

impl GemvInputKind {
    /// The shader's INPUT constant.
    fn code(self) -> u32 {
        match self {
            GemvInputKind::Plain => 0,
            GemvInputKind::RmsNorm => 1,
            GemvInputKind::SwiGlu => 2,
        }
    }
}

/// Shape of the GEMV workgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemvConfig {
    /// Threads per workgroup: 32..=1024, a multiple of 32 and of the subgroup size.
    pub wg: u32,
    /// Rows per workgroup, 1..=[`MAX_ROWS`].
    pub rows: u32,
    /// Reduce with subgroup operations (needs `gpu.caps.subgroups`).
    pub subgroups: bool,
    /// K steps whose weight loads a thread issues before it computes (the int8 kernel:
    /// 1..=[`MAX_UNROLL`], more bytes in flight; the f32 kernel: 1).
    pub unroll: u32,
}

/// The int8 kernel's largest [`GemvConfig::unroll`] (its shader's MAX_UNROLL).
pub const MAX_UNROLL: u32 = 4;

/// Overrides for [`GemvQ4::bind_with`]: benchmarks and tests of the row-range splitting.
#[derive(Clone, Copy, Debug, Default)]
pub struct GemvOptions {
    /// Workgroup shape instead of [`GemvQ4::config_for`]'s choice.
    pub config: Option<GemvConfig>,
    /// Largest binding in bytes instead of the adapter's `max_storage_buffer_binding_size`.
    pub max_binding_bytes: Option<u64>,
    /// Batched int8 products only (`GemvQ4Q8::bind_batch`): the column-lanes layout (each
    /// group of COLS consecutive threads shares one quarter position and each weight load,
    /// one thread per column) instead of COLS one-column workgroups side by side. Same sums.
    pub column_lanes: bool,
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
}

pub struct GemvQ4 {
    subgroups: bool,
    subgroup_max: u32,
    /// By workgroup shape and INPUT code.
    pipelines: Mutex<HashMap<(GemvConfig, GemvInputKind), wgpu::ComputePipeline>>,
}

impl GemvQ4 {
    /// Compiles the kernel in its most common shape (other shapes compile on first use).
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let kernel = GemvQ4 {
            subgroups: gpu.caps.subgroups,
            subgroup_max: gpu.caps.subgroup_max_size.max(1),
            pipelines: Mutex::new(HashMap::new()),
        };
        kernel.pipeline(gpu, kernel.config_for(4096, 4096), GemvInputKind::Plain)?;
        Ok(kernel)
    }

    /// The workgroup shape used for a `rows x cols` matrix: 8 rows per workgroup (each x load
    /// shared by 8 rows), and the smallest workgroup (a multiple of 32 threads, at most 256) that
    /// puts about `TARGET_THREADS` threads on the GPU, no wider than a row has quarter blocks:
    /// tall matrices get one subgroup per workgroup, short ones with a long K split K over more
    /// threads.
    pub fn config_for(&self, rows: usize, cols: usize) -> GemvConfig {
        // Measured on the H100 (benches/kernels.rs --sweep): 8 rows and 32 threads win on
        // N >= 55296 (gate_up 1893 GB/s, lm_head 2198), 8 rows and 128 threads on
        // down (N = 5120, K = 27648: 1635 GB/s; 32 threads: 888).
        let rows_per_group = 8u32;
        let groups = rows.div_ceil(rows_per_group as usize).max(1);
        let quarters = blocks_per_row(cols) * 4;
        let unit = self.subgroup_max.max(32) as usize;
        let wg = TARGET_THREADS
            .div_ceil(groups)
            .min(quarters)
            .clamp(unit, 256)
            .next_multiple_of(unit) as u32;
        GemvConfig {
            unroll: 1,
            wg,
            rows: rows_per_group,
            subgroups: self.subgroups,
        }
    }

    fn pipeline(
        &self,
        gpu: &Gpu,
        cfg: GemvConfig,
        input: GemvInputKind,
    ) -> Result<wgpu::ComputePipeline> {
        check_config(gpu, "gemv_q4", &cfg, self.subgroups, self.subgroup_max, 1)?;
        cached_pipeline(
            gpu,
            &self.pipelines,
            "gemv_q4",
            cfg,
            input,
            &format!("{input:?}"),
            || shader(&cfg, input),
        )
    }

    /// Binds `y = W x` (see [`Epilogue`]) for `x: [cols]`, `y, bias: [rows]` f32. Returns one
    /// dispatch per row range (one unless W exceeds the storage-binding limit), to encode in order.
    pub fn bind(
        &self,
        gpu: &Gpu,
        w: Q4Ref,
        x: BufRange,
        y: BufRange,
        bias: Option<BufRange>,
        mode: Epilogue,
    ) -> Result<Vec<Dispatch>> {
        self.bind_with(gpu, w, x, y, bias, mode, &GemvOptions::default())
    }

    /// [`bind`](Self::bind) with x computed from `x` as `input` says (see [`GemvInput`]).
    #[allow(clippy::too_many_arguments)]
    pub fn bind_input(
        &self,
        gpu: &Gpu,
        w: Q4Ref,
        x: BufRange,
        y: BufRange,
        bias: Option<BufRange>,
        mode: Epilogue,
        input: GemvInput,
    ) -> Result<Vec<Dispatch>> {
        self.bind_full(gpu, w, x, y, bias, mode, input, &GemvOptions::default())
    }

    /// [`bind`](Self::bind) with a chosen workgroup shape or binding limit.
    #[allow(clippy::too_many_arguments)]
    pub fn bind_with(
        &self,
        gpu: &Gpu,
        w: Q4Ref,
        x: BufRange,
        y: BufRange,
        bias: Option<BufRange>,
        mode: Epilogue,
        opts: &GemvOptions,
    ) -> Result<Vec<Dispatch>> {
        self.bind_full(gpu, w, x, y, bias, mode, GemvInput::Plain, opts)
    }

    #[allow(clippy::too_many_arguments)]
    fn bind_full(
        &self,
        gpu: &Gpu,
        w: Q4Ref,
        x: BufRange,
        y: BufRange,
        bias: Option<BufRange>,
        mode: Epilogue,
        input: GemvInput,
        opts: &GemvOptions,
    ) -> Result<Vec<Dispatch>> {
        let what = "gemv_q4";
        check_matrix(gpu, what, &w)?;
        if w.cols % 4 != 0 {
            return Err(Error::Invalid(format!(
                "{what}: K = {} must be a multiple of 4 (x is read as vec4<f32>)",
                w.cols
            )));
        }
        // SwiGLU reads gate and up: twice K values.
        let x_bytes = match input {
            GemvInput::SwiGlu => 2 * w.cols as u64 * 4,
            _ => w.cols as u64 * 4,
        };
        check_operands(gpu, what, &x, x_bytes, &y, w.rows as u64 * 4)?;
        if let Some(b) = &bias {
            check_vector(gpu, what, "bias", b, w.rows as u64 * 4)?;
        }
        let (norm_range, norm_bytes, eps) = match input {
            GemvInput::RmsNorm { weight, eps } => {
                check_vector(gpu, what, "norm weight", &weight, w.cols as u64 * 4)?;
                (weight, w.cols as u64 * 4, eps)
            }
            // The binding still needs a buffer: x, never read through it.
            _ => (x, w.cols as u64 * 4, 0.0),
        };
        let cfg = opts
            .config
            .unwrap_or_else(|| self.config_for(w.rows, w.cols));
        let pipeline = self.pipeline(gpu, cfg, input.kind())?;
        let max_binding = opts
            .max_binding_bytes
            .unwrap_or(gpu.limits.max_storage_buffer_binding_size);
        let bpr = blocks_per_row(w.cols);
        // Without a bias the binding still needs a buffer: x, which is never read through it.
        let bias_range = bias.unwrap_or(x);
        let bias_bytes = if bias.is_some() {
            w.rows as u64 * 4
        } else {
            x.size.min(w.cols as u64 * 4)
        };
        let chunks = row_chunks(gpu, what, &w, max_binding)?;
        let mut out = Vec::with_capacity(chunks.len());
        for c in &chunks {
            let params = Params {
                rows: c.rows as u32,
                k: w.cols as u32,
                bpr: bpr as u32,
                row_base: c.row0 as u32,
                accumulate: (mode == Epilogue::Accumulate) as u32,
                has_bias: bias.is_some() as u32,
                eps,
            };
            let fused = match input {
                GemvInput::Plain => "",
                GemvInput::RmsNorm { .. } => " (rmsnorm fused)",
                GemvInput::SwiGlu => " (swiglu fused)",
            };
            let label = format!(
                "gemv_q4 {}x{} rows {}..{}{fused}",
                w.rows,
                w.cols,
                c.row0,
                c.row0 + c.rows
            );
            let params_buf = gpu.uniform(&label, &params);
            let bind_group = gpu.bind_group_ranges(
                &label,
                &pipeline,
                &[
                    (&params_buf, 0, None),
                    (w.qweight.buffer, c.qweight.0, Some(c.qweight.1)),
                    (w.scales.buffer, c.scales.0, Some(c.scales.1)),
                    (x.buffer, x.offset, Some(x_bytes)),
                    (bias_range.buffer, bias_range.offset, Some(bias_bytes)),
                    (y.buffer, y.offset, Some(w.rows as u64 * 4)),
                    (norm_range.buffer, norm_range.offset, Some(norm_bytes)),
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

/// Compiled GEMV pipelines by workgroup shape and a kernel's own key (its input, output).
pub(crate) type PipelineCache<K> = Mutex<HashMap<(GemvConfig, K), wgpu::ComputePipeline>>;

/// The pipeline of a GEMV kernel `name` in shape `cfg` reading `input`, compiled on first use
/// (`source` gives its WGSL; WG and ROWS are overrides) and kept in `cache`.
pub(crate) fn cached_pipeline<I: std::hash::Hash + Eq + Copy>(
    gpu: &Gpu,
    cache: &PipelineCache<I>,
    name: &str,
    cfg: GemvConfig,
    input: I,
    input_label: &str,
    source: impl FnOnce() -> String,
) -> Result<wgpu::ComputePipeline> {
    let mut cache = cache
        .lock()
        .map_err(|_| Error::Gpu(format!("{name}: pipeline cache poisoned")))?;
    if let Some(p) = cache.get(&(cfg, input)) {
        return Ok(p.clone());
    }
    let kind = if cfg.subgroups { "subgroup" } else { "shared" };
    let label = format!(
        "{name}/wg{}_rows{}_unroll{}_{kind}_{input_label}",
        cfg.wg, cfg.rows, cfg.unroll
    );
    let overrides = [("WG", cfg.wg as f64), ("ROWS", cfg.rows as f64)];
    let pipeline = gpu.compute_pipeline_unchecked(&label, &source(), "main", &overrides)?;
    cache.insert((cfg, input), pipeline.clone());
    Ok(pipeline)
}

/// Checks a GEMV workgroup shape against the kernels' bounds and the adapter: threads a multiple
/// of 32 and of the subgroup size, rows in 1..=[`MAX_ROWS`], unroll in 1..=`max_unroll`, the
/// reduction's workgroup memory ((rows + 1) f32 per thread), and subgroups only where the adapter
/// has them.
pub(crate) fn check_config(
    gpu: &Gpu,
    what: &str,
    cfg: &GemvConfig,
    subgroups: bool,
    subgroup_max: u32,
    max_unroll: u32,
) -> Result<()> {
    if !(1..=max_unroll).contains(&cfg.unroll) {
        return Err(Error::Invalid(format!(
            "{what}: unroll {} must be in 1..={max_unroll}",
            cfg.unroll
        )));
    }
    let unit = subgroup_max.max(32);
    if cfg.wg % unit != 0 || !(32..=1024).contains(&cfg.wg) {
        return Err(Error::Invalid(format!(
            "{what}: workgroup size {} must be in 32..=1024 and a multiple of {unit} (32 and the subgroup size {subgroup_max})",
            cfg.wg
        )));
    }
    if !(1..=MAX_ROWS).contains(&cfg.rows) {
        return Err(Error::Invalid(format!(
            "{what}: rows per workgroup {} must be in 1..={MAX_ROWS}",
            cfg.rows
        )));
    }
    let shared_bytes = (cfg.rows as u64 + 1) * cfg.wg as u64 * 4;
    if shared_bytes > gpu.limits.max_compute_workgroup_storage_size as u64 {
        return Err(Error::Unsupported(format!(
            "{what}: {} rows x {} threads need {shared_bytes} bytes of workgroup memory, the adapter has {}",
            cfg.rows, cfg.wg, gpu.limits.max_compute_workgroup_storage_size
        )));
    }
    if cfg.subgroups && !subgroups {
        return Err(Error::Unsupported(format!(
            "{what}: the adapter has no subgroup operations"
        )));
    }
    Ok(())
}

/// The WGSL of `cfg`'s kernel reading `input` (before gpu::shader_source); WG and ROWS are
/// overrides.
pub fn shader(cfg: &GemvConfig, input: GemvInputKind) -> String {
    let sum = if cfg.subgroups {
        SUM_SUBGROUP
    } else {
        SUM_SHARED
    };
    format!("const INPUT: u32 = {}u;\n{sum}\n{SOURCE}", input.code())
}

/// One row range of a matrix and its two bindings, `(offset, size)` in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RowChunk {
    pub row0: usize,
    pub rows: usize,
    pub qweight: (u64, u64),
    pub scales: (u64, u64),
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Cuts `w` into row ranges whose word binding fits `max_binding` bytes. Range starts are chosen
/// so both bindings begin at offsets aligned to `min_storage_buffer_offset_alignment`.
pub(crate) fn row_chunks(
    gpu: &Gpu,
    what: &str,
    w: &Q4Ref,
    max_binding: u64,
) -> Result<Vec<RowChunk>> {
    let bpr = blocks_per_row(w.cols) as u64;
    let row_bytes = bpr * WORDS_PER_BLOCK as u64 * 4;
    let align = gpu.limits.min_storage_buffer_offset_alignment.max(4) as u64;
    let fit = (max_binding / row_bytes) as usize;
    let rows_per_chunk = if fit >= w.rows {
        w.rows
    } else {
        // Scale offsets (2 bytes per block) are the finer ones; aligning them aligns the words too.
        let step = (align / gcd(align, bpr * 2)) as usize;
        fit / step * step
    };
    if rows_per_chunk == 0 {
        return Err(Error::Unsupported(format!(
            "{what}: a {}x{} matrix cannot be split into bindings of at most {max_binding} bytes \
             (a row takes {row_bytes} bytes; ranges must start at {align}-byte offsets)",
            w.rows, w.cols
        )));
    }
    let mut chunks = Vec::new();
    let mut row0 = 0;
    while row0 < w.rows {
        let rows = rows_per_chunk.min(w.rows - row0);
        let q_off = w.qweight.offset + row0 as u64 * row_bytes;
        let s_off = w.scales.offset + row0 as u64 * bpr * 2;
        // A binding's size must be a multiple of 4: the last scale word of a range may be half used.
        let s_size = (rows as u64 * bpr * 2).next_multiple_of(4);
        if s_off + s_size > w.scales.buffer.size() {
            return Err(Error::Invalid(format!(
                "{what}: the scales of a {}x{} matrix end {} bytes into a buffer of {}; \
                 allocate scale buffers padded to a multiple of 4 bytes",
                w.rows,
                w.cols,
                s_off + s_size,
                w.scales.buffer.size()
            )));
        }
        chunks.push(RowChunk {
            row0,
            rows,
            qweight: (q_off, rows as u64 * row_bytes),
            scales: (s_off, s_size),
        });
        row0 += rows;
    }
    Ok(chunks)
}

fn check_range(gpu: &Gpu, what: &str, name: &str, r: &BufRange) -> Result<()> {
    let align = gpu.limits.min_storage_buffer_offset_alignment as u64;
    if r.offset % align != 0 {
        return Err(Error::Invalid(format!(
            "{what}: {name} starts at byte {}, which is not a multiple of the adapter's storage offset alignment {align}",
            r.offset
        )));
    }
    if r.offset + r.size > r.buffer.size() {
        return Err(Error::Invalid(format!(
            "{what}: {name} range {}..{} lies outside its buffer of {} bytes",
            r.offset,
            r.offset + r.size,
            r.buffer.size()
        )));
    }
    Ok(())
}

/// Checks a matrix's ranges against its shape.
pub(crate) fn check_matrix(gpu: &Gpu, what: &str, w: &Q4Ref) -> Result<()> {
    if w.rows == 0 || w.cols == 0 {
        return Err(Error::Invalid(format!(
            "{what}: empty matrix {}x{}",
            w.rows, w.cols
        )));
    }
    let bpr = blocks_per_row(w.cols) as u64;
    let rows = w.rows as u64;
    for (name, r, need) in [
        (
            "qweight",
            &w.qweight,
            rows * bpr * WORDS_PER_BLOCK as u64 * 4,
        ),
        ("scales", &w.scales, rows * bpr * 2),
    ] {
        check_range(gpu, what, name, r)?;
        if r.size < need {
            return Err(Error::Invalid(format!(
                "{what}: {name} of a {}x{} INT4 matrix needs {need} bytes, the range has {}",
                w.rows, w.cols, r.size
            )));
        }
    }
    if (w.cols as u64) > u32::MAX as u64 / 8
        || rows * bpr * WORDS_PER_BLOCK as u64 / 4 > u32::MAX as u64
    {
        return Err(Error::Unsupported(format!(
            "{what}: matrix {}x{} too large for 32-bit indexing",
            w.rows, w.cols
        )));
    }
    Ok(())
}

/// Checks an activation range: aligned, inside its buffer, at least `need` bytes, and bindable.
/// Checks the operands of a product: `x` (read) and `y` (written, so not in x's buffer).
pub(crate) fn check_operands(
    gpu: &Gpu,
    what: &str,
    x: &BufRange,
    x_bytes: u64,
    y: &BufRange,
    y_bytes: u64,
) -> Result<()> {
    check_vector(gpu, what, "x", x, x_bytes)?;
    check_vector(gpu, what, "y", y, y_bytes)?;
    if x.buffer == y.buffer {
        return Err(Error::Invalid(format!(
            "{what}: x and y must be different buffers (y is written)"
        )));
    }
    Ok(())
}

pub(crate) fn check_vector(
    gpu: &Gpu,
    what: &str,
    name: &str,
    r: &BufRange,
    need: u64,
) -> Result<()> {
    check_range(gpu, what, name, r)?;
    if r.size < need {
        return Err(Error::Invalid(format!(
            "{what}: {name} needs {need} bytes, the range has {}",
            r.size
        )));
    }
    if need > gpu.limits.max_storage_buffer_binding_size {
        return Err(Error::Unsupported(format!(
            "{what}: {name} takes {need} bytes, more than the adapter's largest storage binding ({})",
            gpu.limits.max_storage_buffer_binding_size
        )));
    }
    Ok(())
}
