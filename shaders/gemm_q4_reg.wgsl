// gemm_q4 (portable, register-tiled): Y = X W^T (+ bias) for INT4 W in f32 throughout, for
// adapters without cooperative matrices.
//
// The wrapper (src/kernels/gemm_q4.rs, `reg_shader`) puts before this file the constant RM: token
// rows per thread (2, 4 or 8). A workgroup of 16 x 16 threads computes a BM x 128 tile of Y
// (BM = 16 RM); thread (tx, ty) owns rows ty + 16 i (i < RM) and columns tx + 16 j (j < 8), so
// neighbouring threads write neighbouring columns, and the 8 accumulators of a row sit in
// registers. The K loop steps BK = 32 (a quarter of a 128-block: one scale per row and step).
// Global loads for the next step go to registers before the current step multiplies (register
// double buffering); then X is stored and W dequantized (once per tile) into workgroup memory as
// [row][k] with rows of 36 floats (9 vec4: vec4 stores and loads of neighbouring threads fall in
// different banks). Per 4 k a thread loads RM + 8 vec4 and runs 32 RM FMAs.
//
// Shapes: K a multiple of 4 (X rows are read as vec4).

const WG: u32 = 256u;
const BK: u32 = 32u;
const BM: u32 = 16u * RM;
const BN: u32 = 128u;
// Row stride of the tiles in vec4.
const RS: u32 = 9u;
// Per thread and K step: vec4 of X, words of W.
const X_ITEMS: u32 = (BM * (BK / 4u) + WG - 1u) / WG;
const W_ITEMS: u32 = BN * (BK / 8u) / WG;

struct Params {
    n: u32,
    k: u32,
    bpr: u32,
    row_base: u32,
    ldy: u32,
    m_max: u32,
    accumulate: u32,
    has_bias: u32,
    // The dispatch runs only for m_lo < n_tokens <= m_hi (the wrapper binds a small and a large
    // tile and the step picks one).
    m_lo: u32,
    m_hi: u32,
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
@group(0) @binding(2) var<storage, read> qw: array<u32>;
@group(0) @binding(3) var<storage, read> scales: array<u32>;
@group(0) @binding(4) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;

var<workgroup> xs: array<vec4<f32>, BM * RS>;
var<workgroup> ws: array<vec4<f32>, BN * RS>;

fn scale(i: u32) -> f32 {
    let w = scales[i / 2u];
    return select(bf16_lo(w), bf16_hi(w), (i & 1u) == 1u);
}

struct Loaded {
    x: array<vec4<f32>, X_ITEMS>,
    w: array<u32, W_ITEMS>,
    s: array<f32, W_ITEMS>,
}

// Global loads of the K step at k0: zeros for tokens past m_count, k past K, rows past n.
fn load_step(k0: u32, m0: u32, n0: u32, m_count: u32, lid: u32) -> Loaded {
    var r: Loaded;
    let k4 = p.k / 4u;
    for (var it = 0u; it < X_ITEMS; it++) {
        let e = lid + it * WG;
        let m = m0 + e / (BK / 4u);
        let kv = k0 / 4u + e % (BK / 4u);
        var v = vec4<f32>();
        if (e < BM * (BK / 4u) && m < m_count && kv < k4) {
            v = x[m * k4 + kv];
        }
        r.x[it] = v;
    }
    for (var it = 0u; it < W_ITEMS; it++) {
        let e = lid + it * WG;
        let row = n0 + e / (BK / 8u);
        var w = 0x88888888u;
        var s = 0.0;
        if (row < p.n) {
            w = qw[row * p.bpr * 16u + k0 / 8u + e % (BK / 8u)];
            s = scale(row * p.bpr + k0 / 128u);
        }
        r.w[it] = w;
        r.s[it] = s;
    }
    return r;
}

// The level of nibble i of w times s: 0x4b000000 | n is the f32 2^23 + n.
fn dequant4(w: u32, i: u32, s: f32) -> vec4<f32> {
    let b = vec4<u32>(w >> (4u * i), w >> (4u * i + 4u), w >> (4u * i + 8u), w >> (4u * i + 12u));
    let v = bitcast<vec4<f32>>((b & vec4<u32>(0xfu)) | vec4<u32>(0x4b000000u));
    return (v - vec4<f32>(8388616.0)) * s;
}

// acc + dot(a, b) as 4 fused multiply-adds.
fn mac4(acc: f32, a: vec4<f32>, b: vec4<f32>) -> f32 {
    return fma(a.w, b.w, fma(a.z, b.z, fma(a.y, b.y, fma(a.x, b.x, acc))));
}

fn store_step(r: Loaded, lid: u32) {
    for (var it = 0u; it < X_ITEMS; it++) {
        let e = lid + it * WG;
        if (e < BM * (BK / 4u)) {
            xs[(e / (BK / 4u)) * RS + e % (BK / 4u)] = r.x[it];
        }
    }
    for (var it = 0u; it < W_ITEMS; it++) {
        let e = lid + it * WG;
        let base = (e / (BK / 8u)) * RS + (e % (BK / 8u)) * 2u;
        ws[base] = dequant4(r.w[it], 0u, r.s[it]);
        ws[base + 1u] = dequant4(r.w[it], 4u, r.s[it]);
    }
}

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) l: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let m_count = min(step.n_tokens, p.m_max);
    let m0 = wid.y * BM;
    let n0 = wid.x * BN;
    if (m0 >= m_count || step.n_tokens <= p.m_lo || step.n_tokens > p.m_hi) {
        return;
    }
    var acc: array<array<f32, 8>, RM>;
    var next = load_step(0u, m0, n0, m_count, lid);
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        store_step(next, lid);
        workgroupBarrier();
        if (k0 + BK < p.k) {
            next = load_step(k0 + BK, m0, n0, m_count, lid);
        }
        for (var kq = 0u; kq < BK / 4u; kq++) {
            var xv: array<vec4<f32>, RM>;
            for (var i = 0u; i < RM; i++) {
                xv[i] = xs[(l.y + 16u * i) * RS + kq];
            }
            for (var j = 0u; j < 8u; j++) {
                let wv = ws[(l.x + 16u * j) * RS + kq];
                for (var i = 0u; i < RM; i++) {
                    acc[i][j] = mac4(acc[i][j], xv[i], wv);
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < RM; i++) {
        let m = m0 + l.y + 16u * i;
        for (var j = 0u; j < 8u; j++) {
            let n = n0 + l.x + 16u * j;
            if (m < m_count && n < p.n) {
                let out = m * p.ldy + p.row_base + n;
                var v = acc[i][j];
                if (p.has_bias != 0u) {
                    v += bias[p.row_base + n];
                }
                if (p.accumulate != 0u) {
                    v += y[out];
                }
                y[out] = v;
            }
        }
    }
}
