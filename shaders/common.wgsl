// Shared helpers, placed before every kernel's own source (see gpu::shader_source).

// bf16 is the upper half of an f32: the low and high halves of a word of two packed bf16 values.
fn bf16_lo(w: u32) -> f32 {
    return bitcast<f32>(w << 16u);
}

fn bf16_hi(w: u32) -> f32 {
    return bitcast<f32>(w & 0xffff0000u);
}

// The signed INT4 level stored in nibble i (0..7) of a word, as f32 (stored value minus 8).
fn q4_level(w: u32, i: u32) -> f32 {
    return f32((w >> (4u * i)) & 0xfu) - 8.0;
}
