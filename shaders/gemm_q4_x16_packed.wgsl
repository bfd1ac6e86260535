// X as f16 for gemm_q4_mma_load_packed.wgsl: each group of 8 f32 of the first
// min(n_tokens, m_max) rows becomes 16 bytes of f16 ordered [x0, x4, x1, x5, x2, x6, x3, x7] (the
// order in which that loader dequantizes a word of W), rounded as the f32-input kernel rounds X;
// a row's last group is padded with zeros past K. Rows are ceil(K / 8) groups long.

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
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> x16: array<vec2<f16>>;

fn at(row: u32, k: u32) -> f32 {
    if (k < 2u * p.k2) {
        return x[row + k];
    }
    return 0.0;
}

fn pair(row: u32, k: u32) -> vec2<f16> {
    return vec2<f16>(vec2<f32>(at(row, k), at(row, k + 4u)));
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let m_count = min(step.n_tokens, p.m_max);
    let g = gid.x;
    let m = gid.y;
    let k8 = (2u * p.k2 + 7u) / 8u;
    if (step.n_tokens <= p.m_lo || step.n_tokens > p.m_hi || m >= m_count || g >= k8) {
        return;
    }
    let row = m * 2u * p.k2;
    let k = 8u * g;
    let out = 4u * (m * k8 + g);
    for (var j = 0u; j < 4u; j++) {
        x16[out + j] = pair(row, k + j);
    }
}
