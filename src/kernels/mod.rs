//! One typed wrapper per WGSL kernel family. A wrapper owns its pipelines, checks shapes, writes
//! its `#[repr(C)]` params and computes workgroup counts; only it knows its binding indices.
//!
//! Convention: `Kernel::new(gpu)` compiles once; `kernel.bind(gpu, ...)` builds the params buffer
//! and bind group once and returns a [`Dispatch`] that the engine records every step (no buffer or
//! bind-group creation per token). Shapes, including the most tokens a step may carry, are fixed at
//! bind time; what changes per step (position, tokens in this step) is in the shared [`StepParams`]
//! uniform, which kernels that need it bind, and threads beyond `n_tokens` return early.

pub mod attention;

/// Per-step values, written once per step with `queue.write_buffer` into one shared uniform buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StepParams {
    /// Position of the first token of this step in the sequence.
    pub pos: u32,
    /// Tokens in this step (1 for decode, up to the bound maximum for a prompt chunk).
    pub n_tokens: u32,
    /// Sequence length after this step: `pos + n_tokens`.
    pub kv_len: u32,
    pub _pad: u32,
}

/// A bound kernel invocation: pipeline, bind group and workgroup counts, ready to record.
#[derive(Clone, Debug)]
pub struct Dispatch {
    pub label: String,
    pub pipeline: wgpu::ComputePipeline,
    pub bind_group: wgpu::BindGroup,
    pub workgroups: [u32; 3],
    /// Keeps the params uniform alive as long as the dispatch.
    pub params: Option<wgpu::Buffer>,
}

/// One row of a batched decode step (`shaders/batch_step.wgsl`): a token appended to sequence
/// `slot` at position `pos`, after which it holds `kv_len = pos + 1` positions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BatchRow {
    pub slot: u32,
    pub pos: u32,
    pub kv_len: u32,
    pub _pad: u32,
}

/// The rows of a batched decode step, written once per step into one uniform buffer that the
/// batched kernels bind; rows at or past `n_rows` are not computed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BatchStep {
    pub n_rows: u32,
    pub _pad: [u32; 3],
    pub rows: [BatchRow; gemv_q4_q8::MAX_BATCH],
}

impl BatchStep {
    /// `rows` as (slot, position) pairs; at most [`gemv_q4_q8::MAX_BATCH`].
    pub fn new(rows: &[(usize, usize)]) -> BatchStep {
        let mut step = BatchStep {
            n_rows: rows.len().min(gemv_q4_q8::MAX_BATCH) as u32,
            ..Default::default()
        };
        for (row, &(slot, pos)) in step.rows.iter_mut().zip(rows) {
            *row = BatchRow {
                slot: slot as u32,
                pos: pos as u32,
                kv_len: pos as u32 + 1,
                _pad: 0,
            };
        }
        step
    }
}

impl Dispatch {
    pub fn encode(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        let [x, y, z] = self.workgroups;
        pass.dispatch_workgroups(x, y, z);
    }

    /// The same dispatch, its label prefixed with the role it plays in a model (for profiles).
    pub fn with_role(mut self, role: &str) -> Self {
        self.label = format!("{role}: {}", self.label);
        self
    }
}

/// A range of a buffer (a tensor inside a larger buffer: a ring slot, a packed layer).
#[derive(Clone, Copy, Debug)]
pub struct BufRange<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

impl<'a> BufRange<'a> {
    pub fn whole(buffer: &'a wgpu::Buffer) -> Self {
        BufRange {
            buffer,
            offset: 0,
            size: buffer.size(),
        }
    }
}

/// Where one INT4 matrix lives on the GPU: its words and its bf16 scales (packed two per u32).
#[derive(Clone, Copy, Debug)]
pub struct Q4Ref<'a> {
    pub rows: usize,
    pub cols: usize,
    pub qweight: BufRange<'a>,
    pub scales: BufRange<'a>,
}

impl<'a> Q4Ref<'a> {
    /// A `rows x cols` matrix whose words and scales fill buffers of their own.
    pub fn whole(
        rows: usize,
        cols: usize,
        qweight: &'a wgpu::Buffer,
        scales: &'a wgpu::Buffer,
    ) -> Self {
        Q4Ref {
            rows,
            cols,
            qweight: BufRange::whole(qweight),
            scales: BufRange::whole(scales),
        }
    }
}

pub mod gemm_q4;
pub mod gemv_q4;
pub mod gemv_q4_q8;
pub mod quant_act;
pub mod rmsnorm;
pub mod rope_kv;
pub mod sample;
pub mod swiglu;

/// Fails unless `buffer` holds at least `bytes` bytes.
pub(crate) fn check_size(
    what: &str,
    buffer: &wgpu::Buffer,
    bytes: u64,
) -> crate::error::Result<()> {
    if buffer.size() < bytes {
        return Err(crate::error::Error::Invalid(format!(
            "{what}: buffer holds {} bytes, the shape needs {bytes}",
            buffer.size()
        )));
    }
    Ok(())
}
