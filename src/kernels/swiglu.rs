//! SwiGLU over the fused gate/up projection (`shaders/swiglu.wgsl`): row t of the input is
//! `[gate (ffn) | up (ffn)]`, row t of the output `silu(gate) * up`; one thread per output element.

use super::check_size;
use super::Dispatch;
use crate::error::{Error, Result};
use crate::gpu::{dispatch_2d, groups, Gpu};

const WG: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    ffn: u32,
}

pub struct SwiGlu {
    pipeline: wgpu::ComputePipeline,
}

impl SwiGlu {
    pub fn new(gpu: &Gpu) -> Result<SwiGlu> {
        let pipeline = gpu.compute_pipeline(
            "swiglu",
            include_str!("../../shaders/swiglu.wgsl"),
            "main",
            &[],
        )?;
        Ok(SwiGlu { pipeline })
    }

    /// `gate_up`: f32 [m_max, 2 * ffn]; `out`: f32 [m_max, ffn]; rows below `step.n_tokens` are computed.
    pub fn bind(
        &self,
        gpu: &Gpu,
        gate_up: &wgpu::Buffer,
        out: &wgpu::Buffer,
        ffn: usize,
        m_max: usize,
        step: &wgpu::Buffer,
    ) -> Result<Dispatch> {
        let elements = m_max * ffn;
        if ffn == 0 || m_max == 0 || elements >= u32::MAX as usize / 2 {
            return Err(Error::Invalid(format!(
                "swiglu: ffn {ffn} x m_max {m_max} out of range"
            )));
        }
        check_size("swiglu gate_up", gate_up, (elements * 8) as u64)?;
        check_size("swiglu out", out, (elements * 4) as u64)?;
        let params = gpu.uniform("swiglu/params", &Params { ffn: ffn as u32 });
        let bind_group = gpu.bind_group("swiglu", &self.pipeline, &[gate_up, out, &params, step]);
        let (x, y) = dispatch_2d(groups(elements, WG));
        Ok(Dispatch {
            label: "swiglu".into(),
            pipeline: self.pipeline.clone(),
            bind_group,
            workgroups: [x, y, 1],
            params: Some(params),
        })
    }
}
