// gemm_q4 (tiled matrix multiply-add): Y = X W^T (+ bias) for INT4 W, on 16x16x16 matrix
// operations (cooperative matrices: tensor cores). X and the dequantized W are rounded to f16;
// products accumulate in f32.
//
// The wrapper (src/kernels/gemm_q4.rs, `mma_shader`) puts before this file the tile constants
// SG (subgroup size), TM and TN (16x16 accumulators per subgroup along tokens and weight rows)
// and the matrix operations `acc_zero`, `load_a`, `load_b`, `mma`, `store_acc` with the types
// `Frag_A`, `Frag_B`, `Acc`: either cooperative matrices (shaders/gemm_q4_mma_coop.wgsl) or a
// plain-WGSL emulation for adapters without them (shaders/gemm_q4_mma_emulated.wgsl, used by the
// tests to check this file's tiling on lavapipe).
//
// Tiling: a workgroup of 4 subgroups computes a BM x BN tile of Y (BM = 32 TM tokens, BN = 32 TN
// weight rows); subgroup s owns the (s / 2, s % 2) quarter, TM x TN accumulators. The K loop steps
// BK = 32 elements (a quarter of a 128-block: one scale per row and step). Global loads for the
// next step are issued into registers before the current step multiplies (register double
// buffering). Then all threads store X as f16 and dequantize W (in f32, exact, then rounded once
// to f16, as the first kernel did) into workgroup memory as f16 pairs, rows padded to 20 pairs
// (80 bytes: an odd multiple of 16, so the 16x16 matrix loads do not conflict). The stores are
// arranged so the 32 lanes of one store instruction hit 32 different banks (see x_row and
// store_step).
// The accumulators leave through a per-subgroup staging tile in workgroup memory (a matrix store
// needs a constant stride), one row of accumulators at a time, for the epilogue: bounds on M and
// N, bias, store or accumulate.
//
// Shapes: K a multiple of 4 (X is read in pairs). Matrix operations run in workgroup-uniform
// control flow: every thread runs every loop to the same bounds.

enable f16;

const WG: u32 = 4u * SG;
const BK: u32 = 32u;
const BM: u32 = 32u * TM;
const BN: u32 = 32u * TN;
// Row strides in f16 pairs (tiles) and in f32 (staging).
const AS2: u32 = 20u;
const SS: u32 = 16u * TN + 4u;
// Per thread and K step: pairs of X (two f32 of one token), words of W.
const X_ITEMS: u32 = (BM * (BK / 2u) + WG - 1u) / WG;
const W_ITEMS: u32 = (BN * (BK / 8u) + WG - 1u) / WG;

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
@group(0) @binding(4) var<storage, read> x: array<vec2<f32>>;
@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;

var<workgroup> xs: array<vec2<f16>, BM * AS2>;
var<workgroup> ws: array<vec2<f16>, BN * AS2>;
var<workgroup> stage: array<f32, 4u * 16u * SS>;
// This thread's index in its subgroup (the emulated matrix operations need it).
var<private> lane: u32;

fn scale(i: u32) -> f32 {
    let w = scales[i / 2u];
    return select(bf16_lo(w), bf16_hi(w), (i & 1u) == 1u);
}

// The registers one thread carries from the global loads of a K step to its stores.
struct Loaded {
    x: array<vec2<f32>, X_ITEMS>,
    w: array<u32, W_ITEMS>,
    s: array<f32, W_ITEMS>,
}

// X pair e of a step: token row (8 rows per 32 items, so one store instruction of a subgroup
// covers 8 rows x 16 bytes: 32 banks), and its index (in pairs) along the step.
fn x_row(e: u32) -> u32 {
    return (e / 128u) * 8u + (e / 4u) % 8u;
}

fn x_pair(e: u32) -> u32 {
    return ((e / 32u) % 4u) * 4u + e % 4u;
}

// Global loads of the K step at k0: zeros for tokens past m_count, k past K, rows past n.
fn load_step(k0: u32, m0: u32, n0: u32, m_count: u32, lid: u32) -> Loaded {
    var r: Loaded;
    let k2 = p.k / 2u;
    for (var it = 0u; it < X_ITEMS; it++) {
        let e = lid + it * WG;
        let m = m0 + x_row(e);
        let kp = k0 / 2u + x_pair(e);
        var v = vec2<f32>();
        if (e < BM * (BK / 2u) && m < m_count && kp < k2) {
            v = x[m * k2 + kp];
        }
        r.x[it] = v;
    }
    for (var it = 0u; it < W_ITEMS; it++) {
        let e = lid + it * WG;
        let row = n0 + e / (BK / 8u);
        var w = 0x88888888u;
        var s = 0.0;
        if (e < BN * (BK / 8u) && row < p.n) {
            w = qw[row * p.bpr * 16u + k0 / 8u + e % (BK / 8u)];
            s = scale(row * p.bpr + k0 / 128u);
        }
        r.w[it] = w;
        r.s[it] = s;
    }
    return r;
}

// Writes one step's registers to the workgroup tiles (X as f16, W dequantized).
fn store_step(r: Loaded, lid: u32) {
    for (var it = 0u; it < X_ITEMS; it++) {
        let e = lid + it * WG;
        if (e < BM * (BK / 2u)) {
            xs[x_row(e) * AS2 + x_pair(e)] = vec2<f16>(r.x[it]);
        }
    }
    for (var it = 0u; it < W_ITEMS; it++) {
        let e = lid + it * WG;
        if (e < BN * (BK / 8u)) {
            // Word g of the row holds pairs 4 g .. 4 g + 3; a thread writes them rotated by g
            // (the shift is per thread) so the lanes of one store hit 32 different banks.
            let g = e % (BK / 8u);
            let base = (e / (BK / 8u)) * AS2 + g * 4u;
            for (var j = 0u; j < 4u; j++) {
                let q = (j + g) & 3u;
                let b = vec2<u32>(r.w[it] >> (8u * q), r.w[it] >> (8u * q + 4u));
                // 0x4b000000 | n is the f32 2^23 + n: the level n - 8 without a conversion.
                let v = bitcast<vec2<f32>>((b & vec2<u32>(0xfu)) | vec2<u32>(0x4b000000u));
                ws[base + q] = vec2<f16>((v - vec2<f32>(8388616.0)) * r.s[it]);
            }
        }
    }
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let m_count = min(step.n_tokens, p.m_max);
    let m0 = wid.y * BM;
    let n0 = wid.x * BN;
    if (m0 >= m_count || step.n_tokens <= p.m_lo || step.n_tokens > p.m_hi) {
        return;
    }
    lane = lid % SG;
    let sg = lid / SG;
    let qm = (sg / 2u) * 16u * TM;
    let qn = (sg % 2u) * 16u * TN;
    var acc: array<Acc, TM * TN>;
    for (var i = 0u; i < TM * TN; i++) {
        acc[i] = acc_zero();
    }
    var next = load_step(0u, m0, n0, m_count, lid);
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        store_step(next, lid);
        workgroupBarrier();
        if (k0 + BK < p.k) {
            next = load_step(k0 + BK, m0, n0, m_count, lid);
        }
        for (var kk = 0u; kk < BK / 2u; kk += 8u) {
            var a: array<Frag_A, TM>;
            var b: array<Frag_B, TN>;
            for (var i = 0u; i < TM; i++) {
                a[i] = load_a((qm + 16u * i) * AS2 + kk);
            }
            for (var j = 0u; j < TN; j++) {
                b[j] = load_b((qn + 16u * j) * AS2 + kk);
            }
            for (var i = 0u; i < TM; i++) {
                for (var j = 0u; j < TN; j++) {
                    acc[i * TN + j] = mma(a[i], b[j], acc[i * TN + j]);
                }
            }
        }
        workgroupBarrier();
    }
    // Epilogue: one row of TN accumulators at a time through the subgroup's staging tile;
    // consecutive lanes write consecutive columns of Y.
    for (var i = 0u; i < TM; i++) {
        for (var j = 0u; j < TN; j++) {
            store_acc(acc[i * TN + j], sg * 16u * SS + 16u * j);
        }
        workgroupBarrier();
        for (var e = lane; e < 16u * 16u * TN; e += SG) {
            let r = e / (16u * TN);
            let c = e % (16u * TN);
            let m = m0 + qm + 16u * i + r;
            let n = n0 + qn + c;
            if (m < m_count && n < p.n) {
                let out = m * p.ldy + p.row_base + n;
                var v = stage[sg * 16u * SS + r * SS + c];
                if (p.has_bias != 0u) {
                    v += bias[p.row_base + n];
                }
                if (p.accumulate != 0u) {
                    v += y[out];
                }
                y[out] = v;
            }
        }
        workgroupBarrier();
    }
}
