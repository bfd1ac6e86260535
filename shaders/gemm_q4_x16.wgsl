// X as f16 for gemm_q4_mma.wgsl with XElem = vec2<f16>: each pair of f32 of the first
// min(n_tokens, m_max) rows, rounded to f16 by the same conversion the f32-input kernel applies
// in its K loop (so both give identical products).

enable f16;

struct Params {
    // Pairs per row (K / 2).
    k2: u32,
    m_max: u32,
    m_lo: u32,
    m_hi: u32,
}

struct Step {
    pos: u32,
    n_tokens: u32,
    kv_len: u32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> x: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read_write> x16: array<vec2<f16>>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let m_count = min(step.n_tokens, p.m_max);
    let i = gid.x;
    let m = gid.y;
    if (step.n_tokens <= p.m_lo || step.n_tokens > p.m_hi || m >= m_count || i >= p.k2) {
        return;
    }
    x16[m * p.k2 + i] = vec2<f16>(x[m * p.k2 + i]);
}
