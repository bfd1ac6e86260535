//! Activation quantization for the integer-dot GEMV (`shaders/quant_act.wgsl`): an f32 vector,
//! or the RMSNorm / SwiGLU of what the step before a projection wrote, to the int8 blocks of
//! [`ActQ8`](crate::quant::ActQ8) in [`ActQ8Buffers`]. One dispatch per vector; every matrix that
//! reads the same input (q|k|v, gate|up are fused by rows) reuses it.

use super::Dispatch;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::quant::{blocks_per_row, ACT_BLOCK, BLOCK};

const SOURCE: &str = include_str!("../../shaders/quant_act.wgsl");
const SERIAL_SOURCE: &str = include_str!("../../shaders/quant_act_serial.wgsl");
/// The block quantizer shared with the GEMV's fused inputs.
pub(crate) const Q8_BLOCK: &str = include_str!("../../shaders/q8_block.wgsl");
/// Threads per workgroup of the serial kernel (its WG).
const SERIAL_WG: u32 = 256;
/// Threads per block of 32 in `quant_act.wgsl` (its LANES).
const LANES: u32 = 4;

/// Which quantizer kernel [`QuantAct`] binds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantActKernel {
    /// `quant_act.wgsl`: four threads per block, `wg` threads per workgroup (a multiple of 4
    /// from 4 to 256), many workgroups per vector; the RMSNorm input's sum of squares is
    /// computed by every workgroup.
    Lanes { wg: u32 },
    /// `quant_act_serial.wgsl`: one thread per block; the RMSNorm input in one workgroup. Kept
    /// for the kernel bench's old-against-new rows.
    Serial,
}

impl Default for QuantActKernel {
    fn default() -> Self {
        QuantActKernel::Lanes { wg: 64 }
    }
}

/// Where a quantized activation vector lives: packed int8 words and `(d, d Σq)` per block of 32.
pub struct ActQ8Buffers {
    pub words: wgpu::Buffer,
    pub scales: wgpu::Buffer,
    /// Most values a vector may have.
    pub capacity: usize,
}

impl ActQ8Buffers {
    /// Room for a vector of up to `capacity` values (padded to whole weight blocks).
    pub fn new(gpu: &Gpu, label: &str, capacity: usize) -> ActQ8Buffers {
        Self::with_rows(gpu, label, capacity, 1)
    }

    /// Room for `rows` such vectors one after another (a batched step's rows).
    pub fn with_rows(gpu: &Gpu, label: &str, capacity: usize, rows: usize) -> ActQ8Buffers {
        let padded = (blocks_per_row(capacity.max(1)) * BLOCK * rows.max(1)) as u64;
        ActQ8Buffers {
            words: gpu.storage_buffer(&format!("{label} (int8)"), padded),
            scales: gpu.storage_buffer(
                &format!("{label} (int8 scales)"),
                padded / ACT_BLOCK as u64 * 8,
            ),
            capacity,
        }
    }
}

/// What the kernel quantizes (see the shader's header).
#[derive(Clone, Copy, Debug)]
pub enum ActInput<'a> {
    /// The bound vector.
    Plain,
    /// RMSNorm of the bound vector with `weight` and `eps`.
    RmsNorm { weight: &'a wgpu::Buffer, eps: f32 },
    /// `silu(gate) * up` of the bound `[gate | up]` (twice K values).
    SwiGlu,
}

impl ActInput<'_> {
    fn code(&self) -> usize {
        match self {
            ActInput::Plain => 0,
            ActInput::RmsNorm { .. } => 1,
            ActInput::SwiGlu => 2,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    k: u32,
    blocks: u32,
    eps: f32,
    x_row: u32,
}

pub struct QuantAct {
    /// By INPUT code.
    pipelines: Vec<wgpu::ComputePipeline>,
    kernel: QuantActKernel,
}

impl QuantAct {
    pub fn new(gpu: &Gpu) -> Result<QuantAct> {
        QuantAct::with_kernel(gpu, QuantActKernel::default())
    }

    /// The quantizer with a chosen kernel (the bench times each).
    pub fn with_kernel(gpu: &Gpu, kernel: QuantActKernel) -> Result<QuantAct> {
        let (source, overrides, tag) = match kernel {
            QuantActKernel::Lanes { wg } => {
                let max_wg = gpu.limits.max_compute_invocations_per_workgroup;
                if wg == 0 || wg % LANES != 0 || wg > 256 || wg > max_wg {
                    return Err(Error::Invalid(format!(
                        "quant_act: workgroup of {wg} threads must be a multiple of {LANES} from {LANES} to {}",
                        max_wg.min(256)
                    )));
                }
                (SOURCE, vec![("WG", wg as f64)], format!("wg{wg}"))
            }
            QuantActKernel::Serial => (SERIAL_SOURCE, Vec::new(), "serial".to_string()),
        };
        let pipelines = ["plain", "rmsnorm", "swiglu"]
            .iter()
            .enumerate()
            .map(|(code, name)| {
                let source = format!("const INPUT: u32 = {code}u;\n{Q8_BLOCK}\n{source}");
                let label = format!("quant_act/{name}/{tag}");
                gpu.compute_pipeline_unchecked(&label, &source, "main", &overrides)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(QuantAct { pipelines, kernel })
    }

    /// Quantizes the `k`-value vector that `input` makes of `x` into `out`.
    pub fn bind(
        &self,
        gpu: &Gpu,
        input: ActInput,
        x: &wgpu::Buffer,
        k: usize,
        out: &ActQ8Buffers,
    ) -> Result<Dispatch> {
        self.bind_rows(gpu, input, x, k, 1, out)
    }

    /// Quantizes `rows` vectors, row r made by `input` of x's row r (`k` values apart, `2k` for
    /// SwiGLU's [gate | up]), into `out` one after another (each padded to whole weight blocks).
    pub fn bind_rows(
        &self,
        gpu: &Gpu,
        input: ActInput,
        x: &wgpu::Buffer,
        k: usize,
        rows: usize,
        out: &ActQ8Buffers,
    ) -> Result<Dispatch> {
        let blocks = blocks_per_row(k.max(1)) * (BLOCK / ACT_BLOCK);
        let room = (out.scales.size() / 8) as usize;
        if k == 0 || !k.is_multiple_of(4) || k > out.capacity || rows == 0 || rows * blocks > room {
            return Err(Error::Invalid(format!(
                "quant_act: {rows} vectors of K = {k}: K must be a positive multiple of 4 and at \
                 most the buffers' {} values, with room for every vector",
                out.capacity
            )));
        }
        if rows > 1 && self.kernel == QuantActKernel::Serial {
            return Err(Error::Invalid(
                "quant_act: the serial kernel quantizes one vector".into(),
            ));
        }
        let row_bytes = match input {
            ActInput::SwiGlu => 8 * k as u64,
            _ => 4 * k as u64,
        };
        let x_bytes = row_bytes * rows as u64;
        super::check_size("quant_act x", x, x_bytes)?;
        let (norm, eps) = match input {
            ActInput::RmsNorm { weight, eps } => {
                super::check_size("quant_act norm weight", weight, 4 * k as u64)?;
                (weight, eps)
            }
            // The binding needs a buffer: x, never read through it.
            _ => (x, 0.0),
        };
        let params = Params {
            k: k as u32,
            blocks: blocks as u32,
            eps,
            x_row: (row_bytes / 16) as u32,
        };
        let name = ["plain", "rmsnorm", "swiglu"][input.code()];
        let label = format!("quant_act/{name} K={k} x{rows}");
        let params_buf = gpu.uniform(&label, &params);
        let pipeline = &self.pipelines[input.code()];
        let bind_group = gpu.bind_group_ranges(
            &label,
            pipeline,
            &[
                (&params_buf, 0, None),
                (x, 0, Some(x_bytes)),
                (norm, 0, Some(4 * k as u64)),
                (&out.words, 0, Some((rows * blocks) as u64 * 32)),
                (&out.scales, 0, Some((rows * blocks) as u64 * 8)),
            ],
        );
        let groups = match (self.kernel, input) {
            (QuantActKernel::Lanes { wg }, _) => (blocks as u32).div_ceil(wg / LANES),
            // The serial RMSNorm needs the whole vector in one workgroup.
            (QuantActKernel::Serial, ActInput::RmsNorm { .. }) => 1,
            (QuantActKernel::Serial, _) => (blocks as u32).div_ceil(SERIAL_WG),
        };
        if groups > gpu.limits.max_compute_workgroups_per_dimension {
            return Err(Error::Unsupported(format!(
                "quant_act: K = {k} needs {groups} workgroups, more than this GPU dispatches at once"
            )));
        }
        Ok(Dispatch {
            label,
            pipeline: pipeline.clone(),
            bind_group,
            workgroups: [groups, rows as u32, 1],
            params: Some(params_buf),
        })
    }
}
