//! Test support: one GPU per test binary, random inputs, NaN-poisoned outputs, error measures.
//! In CI a missing adapter is a failure, never a skip.

use super::Gpu;
use std::sync::OnceLock;

static GPU: OnceLock<Gpu> = OnceLock::new();

/// Records `dispatches` in one compute pass, submits them and waits for the GPU.
pub fn run_dispatches<D: std::borrow::Borrow<crate::kernels::Dispatch>>(
    gpu: &Gpu,
    dispatches: &[D],
) {
    let mut enc = gpu.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        for d in dispatches {
            d.borrow().encode(&mut pass);
        }
    }
    gpu.queue.submit([enc.finish()]);
    gpu.wait().expect("GPU work finishes");
}

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
/// A clone repeats the same numbers (to run two kernels on the same inputs).
#[derive(Clone)]
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

/// Compares `got` with `want`: fails when any element differs by more than
/// `tol * max(|want|_inf, 1e-6)`, or when any value of `got` or of `want` is not finite (a NaN or
/// an infinity in the expected values means the oracle itself is broken; it must not pass as
/// "no larger than the tolerance"). The message gives the first bad index, how many are bad, and
/// the largest absolute and relative errors with their indices.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    if let Some(report) = close_report(got, want, tol) {
        panic!("{what}: {report}");
    }
}

/// What [`assert_close`] checks, as a value: `None` when close, else the failure message.
pub fn close_report(got: &[f32], want: &[f32], tol: f32) -> Option<String> {
    let scale = want
        .iter()
        .filter(|v| v.is_finite())
        .fold(0.0f32, |m, v| m.max(v.abs()));
    close_report_at_scale(got, want, scale, "max |want|", tol)
}

/// The largest Σ |w| |x| (+ |bias| + |y_init|) over the rows of `m x`: the size the rounding
/// error of a row's sum grows with, whatever the sum itself (a row whose terms cancel has a small
/// result and the same absolute error). The scale for [`assert_close_at_scale`].
pub fn term_scale(
    m: &crate::quant::QMatrix,
    x: &[f32],
    bias: Option<&[f32]>,
    y_init: Option<&[f32]>,
) -> f32 {
    let mut row = vec![0.0; m.cols];
    (0..m.rows)
        .map(|r| {
            m.view().dequantize_row(r, &mut row);
            let dot: f32 = row.iter().zip(x).map(|(w, x)| (w * x).abs()).sum();
            dot + bias.map_or(0.0, |b| b[r].abs()) + y_init.map_or(0.0, |i| i[r].abs())
        })
        .fold(0.0, f32::max)
}

/// Like [`assert_close`], with errors measured against `scale` (named `scale_name` in the message)
/// instead of max |want|: for a sum whose terms cancel, the size of its terms (e.g. Σ |w| |x| of a
/// dot product) is what its rounding error grows with, not the size of the result.
#[track_caller]
pub fn assert_close_at_scale(
    what: &str,
    got: &[f32],
    want: &[f32],
    scale: f32,
    scale_name: &str,
    tol: f32,
) {
    if let Some(report) = close_report_at_scale(got, want, scale, scale_name, tol) {
        panic!("{what}: {report}");
    }
}

fn close_report_at_scale(
    got: &[f32],
    want: &[f32],
    scale: f32,
    scale_name: &str,
    tol: f32,
) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("length {} but {} expected", got.len(), want.len()));
    }
    let scale = scale.max(1e-6);
    let (mut bad, mut first_bad) = (0usize, None);
    let (mut max_abs, mut at_abs) = (0.0f32, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = if g.is_finite() && w.is_finite() {
            (g - w).abs()
        } else {
            f32::INFINITY
        };
        if !(err / scale <= tol) {
            bad += 1;
            first_bad.get_or_insert(i);
        }
        if err > max_abs {
            (max_abs, at_abs) = (err, i);
        }
    }
    let i = first_bad?;
    let side = match (got[i].is_finite(), want[i].is_finite()) {
        (_, false) => " (the expected value is not finite)",
        (false, true) => " (not finite)",
        _ => "",
    };
    Some(format!(
        "first bad index {i} of {}: got {} want {}{side}; {bad} bad; max abs error {max_abs:e} at {at_abs}, \
         max relative error {:e} (tolerance {tol:e}, relative to {scale_name} = {scale:e})",
        got.len(),
        got[i],
        want[i],
        max_abs / scale
    ))
}

#[cfg(test)]
mod tests {
    use super::close_report;

    #[test]
    fn non_finite_values_on_either_side_fail_with_their_index() {
        let want = [1.0f32, -2.0, 3.0, 0.5];
        assert_eq!(close_report(&want, &want, 0.0), None);
        assert_eq!(close_report(&[1.0, -2.0, 3.001, 0.5], &want, 1e-3), None);
        for (got, want, index, what) in [
            ([1.0, f32::NAN, 3.0, 0.5], want, 1, "not finite"),
            ([1.0, -2.0, f32::INFINITY, 0.5], want, 2, "not finite"),
            (
                want,
                [1.0, -2.0, 3.0, f32::NAN],
                3,
                "expected value is not finite",
            ),
            (
                want,
                [f32::NEG_INFINITY, -2.0, 3.0, 0.5],
                0,
                "expected value is not finite",
            ),
            (
                [f32::NAN; 4],
                [f32::NAN; 4],
                0,
                "expected value is not finite",
            ),
        ] {
            let msg = close_report(&got, &want, 1.0).expect("must fail");
            assert!(
                msg.contains(&format!("first bad index {index} ")) && msg.contains(what),
                "{msg}"
            );
        }
    }

    #[test]
    fn the_report_gives_the_largest_errors_and_the_count() {
        let want = [1.0f32, 2.0, 4.0, -4.0];
        let got = [1.1f32, 2.0, 4.0, -3.0];
        let msg = close_report(&got, &want, 0.01).expect("must fail");
        assert!(msg.contains("first bad index 0 "), "{msg}");
        assert!(msg.contains("2 bad"), "{msg}");
        assert!(msg.contains("max abs error 1e0 at 3"), "{msg}");
        assert!(msg.contains("max relative error 2.5e-1"), "{msg}");
        assert_eq!(
            close_report(&got[..3], &want, 1.0).map(|m| m.contains("length")),
            Some(true)
        );
    }
}

/// Parses, validates (all capabilities) and compiles a kernel (after `shader_source`) to SPIR-V
/// with naga, as wgpu would on a GPU that has every feature it uses; returns the words. For
/// kernels the test adapter cannot run (cooperative matrices on lavapipe).
pub fn compile_to_spirv(name: &str, kernel: &str, overrides: &[(&str, f64)]) -> Vec<u32> {
    let words =
        translate_to_spirv(kernel, overrides, false).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(words.first(), Some(&0x0723_0203), "{name}: SPIR-V magic");
    words
}

/// The translation of [`compile_to_spirv`], errors as text. `unchecked`: with the options of
/// `Gpu::compute_pipeline_unchecked` (no bounds checks, no loop counter, workgroup memory not
/// zeroed), as benches/shader_stats.rs hands kernels to the driver.
pub fn translate_to_spirv(
    kernel: &str,
    overrides: &[(&str, f64)],
    unchecked: bool,
) -> Result<Vec<u32>, String> {
    use wgpu::naga;
    let src = super::shader_source(kernel);
    let module = naga::front::wgsl::parse_str(&src).map_err(|e| e.emit_to_string(&src))?;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .map_err(|e| e.emit_to_string(&src))?;
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
    .map_err(|e| format!("overrides: {e}"))?;
    let mut options = naga::back::spv::Options {
        lang_version: (1, 6),
        ..Default::default()
    };
    if unchecked {
        let none = naga::proc::BoundsCheckPolicy::Unchecked;
        options.bounds_check_policies = naga::proc::BoundsCheckPolicies {
            index: none,
            buffer: none,
            image_load: none,
            binding_array: none,
        };
        options.force_loop_bounding = false;
        options.zero_initialize_workgroup_memory =
            naga::back::spv::ZeroInitializeWorkgroupMemoryMode::None;
    }
    let pipeline = naga::back::spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: "main".into(),
    };
    naga::back::spv::write_vec(&module, &info, &options, Some(&pipeline))
        .map_err(|e| format!("SPIR-V: {e}"))
}
