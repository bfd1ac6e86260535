//! The device opens on the test adapter and round-trips a buffer.

use q4wgpu::gpu::testing::{gpu, Rng};

#[test]
fn opens_an_adapter_and_round_trips_a_buffer() {
    let g = gpu();
    let mut rng = Rng::fresh("round trip");
    let data = rng.vec(1001, 1.0);
    let buf = g.storage_from("data", &data);
    let back = g.read_f32(&buf, data.len()).expect("read back");
    assert_eq!(back, data);
    assert!(g.limits.max_storage_buffer_binding_size >= 128 << 20);
}

#[test]
fn an_invalid_shader_is_an_error_that_names_the_kernel() {
    let err = gpu()
        .compute_pipeline(
            "broken/kernel",
            "@compute @workgroup_size(1) fn main() { let x: f32 = 1u; }",
            "main",
            &[],
        )
        .expect_err("must not compile");
    assert!(err.to_string().contains("broken/kernel"), "{err}");
}
