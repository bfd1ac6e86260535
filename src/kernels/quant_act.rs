//! Activation quantization for the integer-dot GEMV (`shaders/quant_act.wgsl`): an f32 vector,
//! or the RMSNorm / SwiGLU of what the step before a projection wrote, to the int8 blocks of
//! [`ActQ8`](crate::quant::ActQ8) in [`ActQ8Buffers`]. One dispatch per vector; every matrix that
//! reads the same input (q|k|v, gate|up are fused by rows) reuses it.

use super::Dispatch;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::quant::{blocks_per_row, ACT_BLOCK, BLOCK};

const SOURCE: &str = include_str!("../../shaders/quant_act.wgsl");
/// The block quantizer shared with the GEMV's fused inputs.
pub(crate) const Q8_BLOCK: &str = include_str!("../../shaders/q8_block.wgsl");
/// Threads per workgroup (the shader's WG).
const WG: u32 = 256;

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
        let padded = blocks_per_row(capacity.max(1)) * BLOCK;
        ActQ8Buffers {
            words: gpu.storage_buffer(&format!("{label} (int8)"), padded as u64),
            scales: gpu.storage_buffer(&format!("{label} (int8 scales)"), (padded / ACT_BLOCK * 8) as u64),
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
    pad: u32,
}

pub struct QuantAct {
    /// By INPUT code.
    pipelines: Vec<wgpu::ComputePipeline>,
}

impl QuantAct {
    pub fn new(gpu: &Gpu) -> Result<QuantAct> {
        let pipelines = ["plain", "rmsnorm", "swiglu"]
            .iter()
            .enumerate()
            .map(|(code, name)| {
                let source = format!("const INPUT: u32 = {code}u;\n{Q8_BLOCK}\n{SOURCE}");
                gpu.compute_pipeline_unchecked(&format!("quant_act/{name}"), &source, "main", &[])
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(QuantAct { pipelines })
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
        if k == 0 || k % 4 != 0 || k > out.capacity {
            return Err(Error::Invalid(format!(
                "quant_act: K = {k} must be a positive multiple of 4 and at most the buffers' {}",
                out.capacity
            )));
        }
        let x_bytes = match input {
            ActInput::SwiGlu => 8 * k as u64,
            _ => 4 * k as u64,
        };
        super::check_size("quant_act x", x, x_bytes)?;
        let (norm, eps) = match input {
            ActInput::RmsNorm { weight, eps } => {
                super::check_size("quant_act norm weight", weight, 4 * k as u64)?;
                (weight, eps)
            }
            // The binding needs a buffer: x, never read through it.
            _ => (x, 0.0),
        };
        let blocks = blocks_per_row(k) * (BLOCK / ACT_BLOCK);
        let params = Params {
            k: k as u32,
            blocks: blocks as u32,
            eps,
            pad: 0,
        };
        let name = ["plain", "rmsnorm", "swiglu"][input.code()];
        let label = format!("quant_act/{name} K={k}");
        let params_buf = gpu.uniform(&label, &params);
        let pipeline = &self.pipelines[input.code()];
        let bind_group = gpu.bind_group_ranges(
            &label,
            pipeline,
            &[
                (&params_buf, 0, None),
                (x, 0, Some(x_bytes)),
                (norm, 0, Some(4 * k as u64)),
                (&out.words, 0, Some(blocks as u64 * 32)),
                (&out.scales, 0, Some(blocks as u64 * 8)),
            ],
        );
        // RMSNorm needs the whole vector in one workgroup; otherwise a thread per block.
        let groups = match input {
            ActInput::RmsNorm { .. } => 1,
            _ => (blocks as u32).div_ceil(WG),
        };
        Ok(Dispatch {
            label,
            pipeline: pipeline.clone(),
            bind_group,
            workgroups: [groups, 1, 1],
            params: Some(params_buf),
        })
    }
}
