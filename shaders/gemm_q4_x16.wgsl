// X as f16 for gemm_q4_mma.wgsl, from the f32 X of the first min(n_tokens, m_max) rows, rounded
// by the same conversion the f32-input kernel applies in its K loop (so both give identical
// products). Two layouts, one entry point each:
// - `main` (XElem = vec2<f16>, gemm_q4_mma_load.wgsl): each pair of f32 as a pair of f16, rows
//   K / 2 pairs long;
// - `main_packed` (gemm_q4_mma_load_packed.wgsl): each group of 8 as 16 bytes of f16 ordered
//   [x0, x4, x1, x5, x2, x6, x3, x7] (the order in which that loader dequantizes a word of W),
//   rows ceil(K / 8) groups long, the last group padded with zeros past K.

enable f16;

struct Params {
    // Pairs per row of X (K / 2).
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

// Whether this dispatch converts row m (the step's tokens, inside the readers' token range).
fn converts(m: u32) -> bool {
    let m_count = min(step.n_tokens, p.m_max);
    return step.n_tokens > p.m_lo && step.n_tokens <= p.m_hi && m < m_count;
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let m = gid.y;
    if (!converts(m) || i >= p.k2) {
        return;
    }
    x16[m * p.k2 + i] = vec2<f16>(x[m * p.k2 + i]);
}

// Element k of row m (0 past K).
fn x_at(m: u32, k: u32) -> f32 {
    if (k < 2u * p.k2) {
        return x[m * p.k2 + k / 2u][k % 2u];
    }
    return 0.0;
}

@compute @workgroup_size(256)
fn main_packed(@builtin(global_invocation_id) gid: vec3<u32>) {
    let g = gid.x;
    let m = gid.y;
    let k8 = (2u * p.k2 + 7u) / 8u;
    if (!converts(m) || g >= k8) {
        return;
    }
    let out = 4u * (m * k8 + g);
    for (var j = 0u; j < 4u; j++) {
        let k = 8u * g + j;
        x16[out + j] = vec2<f16>(vec2<f32>(x_at(m, k), x_at(m, k + 4u)));
    }
}
