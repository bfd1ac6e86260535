// Split-K reduction of gemm_q4_mma.wgsl: Y[m, row_base + n] = sum over slices s, in order
// 0, 1, .., of part[s][m][n] (+ bias[row_base + n]) (+ Y), for m < min(n_tokens, m_max) and
// n < N. A fixed summation order, so the result does not depend on how the GPU scheduled the
// slices (no atomics).

struct Params {
    n: u32,
    ldy: u32,
    row_base: u32,
    m_max: u32,
    accumulate: u32,
    has_bias: u32,
    // Runs only for m_lo < n_tokens <= m_hi, as the GEMM dispatch it completes.
    m_lo: u32,
    m_hi: u32,
    slices: u32,
    // Elements between slices of part (m_max N).
    slice: u32,
    pad0: u32,
    pad1: u32,
}

struct Step {
    pos: u32,
    n_tokens: u32,
    kv_len: u32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> part: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let m_count = min(step.n_tokens, p.m_max);
    let n = gid.x;
    let m = gid.y;
    if (step.n_tokens <= p.m_lo || step.n_tokens > p.m_hi || m >= m_count || n >= p.n) {
        return;
    }
    let i = m * p.n + n;
    var v = part[i];
    for (var s = 1u; s < p.slices; s++) {
        v += part[s * p.slice + i];
    }
    let out = m * p.ldy + p.row_base + n;
    if (p.has_bias != 0u) {
        v += bias[p.row_base + n];
    }
    if (p.accumulate != 0u) {
        v += y[out];
    }
    y[out] = v;
}
