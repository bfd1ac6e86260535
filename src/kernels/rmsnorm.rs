//! RMSNorm over the rows of an f32 activation matrix (`shaders/rmsnorm.wgsl`): one workgroup per
//! row, a workgroup tree reduction of the squares, then `x * w / sqrt(mean(x²) + eps)`.

use super::{check_size, Dispatch};
use crate::error::{Error, Result};
use crate::gpu::Gpu;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    dim: u32,
    eps: f32,
}

pub struct RmsNorm {
    pipeline: wgpu::ComputePipeline,
}

impl RmsNorm {
    pub fn new(gpu: &Gpu) -> Result<RmsNorm> {
        let pipeline = gpu.compute_pipeline(
            "rmsnorm",
            include_str!("../../shaders/rmsnorm.wgsl"),
            "main",
            &[],
        )?;
        Ok(RmsNorm { pipeline })
    }

    /// `x`, `y`: f32 [m_max, dim] (distinct buffers); `weight`: f32 [dim]; `step`: the shared
    /// [`super::StepParams`] uniform, whose `n_tokens` rows are normalised.
    #[allow(clippy::too_many_arguments)]
    pub fn bind(
        &self,
        gpu: &Gpu,
        x: &wgpu::Buffer,
        weight: &wgpu::Buffer,
        y: &wgpu::Buffer,
        dim: usize,
        eps: f32,
        m_max: usize,
        step: &wgpu::Buffer,
    ) -> Result<Dispatch> {
        if dim == 0 || m_max == 0 || m_max > 65535 {
            return Err(Error::Invalid(format!(
                "rmsnorm: dim {dim} and m_max {m_max} must be in 1..=65535 rows"
            )));
        }
        let act = (m_max * dim * 4) as u64;
        check_size("rmsnorm x", x, act)?;
        check_size("rmsnorm y", y, act)?;
        check_size("rmsnorm weight", weight, (dim * 4) as u64)?;
        let params = gpu.uniform(
            "rmsnorm/params",
            &Params {
                dim: dim as u32,
                eps,
            },
        );
        let bind_group = gpu.bind_group("rmsnorm", &self.pipeline, &[x, weight, y, &params, step]);
        Ok(Dispatch {
            label: "rmsnorm".into(),
            pipeline: self.pipeline.clone(),
            bind_group,
            workgroups: [m_max as u32, 1, 1],
            params: Some(params),
        })
    }
}
