//! Test support: one GPU per test binary, random inputs, NaN-poisoned outputs, error measures.
//! In CI a missing adapter is a failure, never a skip.

use super::Gpu;
use std::sync::OnceLock;

static GPU: OnceLock<Gpu> = OnceLock::new();

/// The test GPU (lavapipe in CI; `WGPU_ADAPTER_NAME` picks another). Panics with the reason if none.
pub fn gpu() -> &'static Gpu {
    GPU.get_or_init(|| match Gpu::new(None) {
        Ok(g) => {
            eprintln!("test GPU: {}", g.describe());
            g
        }
        Err(e) => panic!("tests need a Vulkan adapter: {e}"),
    })
}

/// A small deterministic-per-seed generator (xorshift), so tests need no extra dependency on GPU paths.
pub struct Rng(u64);

impl Rng {
    /// Seeded from the clock: inputs are fresh each run. The seed is printed so a failure can be replayed.
    pub fn fresh(what: &str) -> Rng {
        let seed = std::env::var("Q4WGPU_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("{what}: Q4WGPU_TEST_SEED={seed}");
        Rng(seed | 1)
    }

    pub fn seeded(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Approximately normal (sum of uniforms), scaled.
    pub fn normal(&mut self, std: f32) -> f32 {
        let s: f32 = (0..4).map(|_| self.uniform()).sum();
        s * std * 0.866
    }

    pub fn vec(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal(std)).collect()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A storage buffer of `n` f32 NaNs: a kernel that never writes its output cannot pass.
pub fn poisoned(gpu: &Gpu, label: &str, n: usize) -> wgpu::Buffer {
    gpu.storage_from(label, &vec![f32::NAN; n])
}

/// Compares `got` with `want`: fails (with the first bad index and the worst errors) when any
/// element differs by more than `tol * max(|want|_inf, 1e-6)`, or is not finite.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    let mut worst = 0.0f32;
    let mut first_bad = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / scale;
        if !g.is_finite() || err > tol {
            first_bad.get_or_insert(i);
        }
        if err > worst || !g.is_finite() {
            worst = if g.is_finite() { err } else { f32::INFINITY };
        }
    }
    if let Some(i) = first_bad {
        panic!(
            "{what}: first bad index {i}: got {} want {}; max relative error {worst:e} (tolerance {tol:e}, scale {scale})",
            got[i], want[i]
        );
    }
}

/// Parses, validates (all capabilities) and compiles a kernel (after `shader_source`) to SPIR-V
/// with naga, as wgpu would on a GPU that has every feature it uses; returns the words. For
/// kernels the test adapter cannot run (cooperative matrices on lavapipe).
pub fn compile_to_spirv(name: &str, kernel: &str, overrides: &[(&str, f64)]) -> Vec<u32> {
    use wgpu::naga;
    let src = super::shader_source(kernel);
    let module = naga::front::wgsl::parse_str(&src)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(&src)));
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(&src)));
    let mut constants = naga::back::PipelineConstants::default();
    for (k, v) in overrides {
        constants.insert(k.to_string(), *v);
    }
    let (module, info) = naga::back::pipeline_constants::process_overrides(
        &module,
        &info,
        Some((naga::ShaderStage::Compute, "main")),
        &constants,
    )
    .unwrap_or_else(|e| panic!("{name}: overrides: {e}"));
    let options = naga::back::spv::Options {
        lang_version: (1, 6),
        ..Default::default()
    };
    let pipeline = naga::back::spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: "main".into(),
    };
    let words = naga::back::spv::write_vec(&module, &info, &options, Some(&pipeline))
        .unwrap_or_else(|e| panic!("{name}: SPIR-V: {e}"));
    assert_eq!(words.first(), Some(&0x0723_0203), "{name}: SPIR-V magic");
    words
}
