// gemm_q4 (tiled matrix multiply-add): Y = X W^T (+ bias) for INT4 W, on 16x16x16 matrix
// operations (cooperative matrices: tensor cores). X and the dequantized W are rounded to f16;
// products accumulate in f32.
//
// The wrapper (src/kernels/gemm_q4.rs, `mma_shader`) puts before this file the tile constants
// SG (subgroup size), TM and TN (16x16 accumulators per subgroup along tokens and weight rows),
// PREFETCH (whether the next step's global loads overlap this step's multiplies), DB (double-
// buffered workgroup tiles, one barrier per K step), BK (K step: 32
// or 64), STN (accumulators per row staged at once: TN, or fewer to fit BK = 64 in 48 KiB of
// workgroup memory), the X element type `XElem` with `x_to_f16` (a pair of f32, or a pair of f16
// that the wrapper's conversion dispatch wrote, shaders/gemm_q4_x16.wgsl)
// and the matrix operations `acc_zero`, `load_a`, `load_b`, `mma`, `store_acc` with the types
// `Frag_A`, `Frag_B`, `Acc`: either cooperative matrices (shaders/gemm_q4_mma_coop.wgsl) or a
// plain-WGSL emulation for adapters without them (shaders/gemm_q4_mma_emulated.wgsl, used by the
// tests to check this file's tiling on lavapipe).
//
// Tiling: a workgroup of 4 subgroups computes a BM x BN tile of Y (BM = 32 TM tokens, BN = 32 TN
// weight rows); subgroup s owns the (s / 2, s % 2) quarter, TM x TN accumulators. The K loop steps
// BK elements (a quarter or half of a 128-block: one scale per row and step). Split-K: workgroup
// z covers K elements [z k_split, (z + 1) k_split) and writes its partial sums to slice z of Y
// (y_slice elements apart); the wrapper then sums the slices in a fixed order
// (shaders/gemm_q4_splitk.wgsl), so results do not depend on scheduling. With PREFETCH, global
// loads for the next step are issued into registers before the current step multiplies
// (register double buffering, at the cost of ~40 registers per thread). Then all threads store X as f16 and dequantize W (in f32, exact, then rounded once
// to f16, as the first kernel did) into workgroup memory as f16 pairs, rows padded to 20 pairs
// (80 bytes, or 36 pairs = 144 bytes for BK = 64: an odd multiple of 16, so the 16x16 matrix loads do not conflict). The stores are
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
const BM: u32 = 32u * TM;
const BN: u32 = 32u * TN;
// Row strides in f16 pairs (tiles) and in f32 (staging).
const AS2: u32 = BK / 2u + 4u;
const SS: u32 = 16u * STN + 4u;
// Groups of 4 pairs of X along one row of a step.
const XG: u32 = BK / 8u;
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
    // Split-K: K elements per slice (a multiple of BK; K itself without split) and elements
    // between the slices of Y (0 without split).
    k_split: u32,
    y_slice: u32,
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
@group(0) @binding(4) var<storage, read> x: array<XElem>;
@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;

// DB: two copies of each tile (see the K loop).
const NBUF: u32 = select(1u, 2u, DB);
var<workgroup> xs: array<vec2<f16>, NBUF * BM * AS2>;
var<workgroup> ws: array<vec2<f16>, NBUF * BN * AS2>;
var<workgroup> stage: array<f32, 4u * 16u * SS>;
// This thread's index in its subgroup (the emulated matrix operations need it).
var<private> lane: u32;

fn scale(i: u32) -> f32 {
    let w = scales[i / 2u];
    return select(bf16_lo(w), bf16_hi(w), (i & 1u) == 1u);
}

// The registers one thread carries from the global loads of a K step to its stores.
struct Loaded {
    x: array<XElem, X_ITEMS>,
    w: array<u32, W_ITEMS>,
    s: array<f32, W_ITEMS>,
}

// X pair e of a step: token row (8 rows per 32 items, so one store instruction of a subgroup
// covers 8 rows x 16 bytes: 32 banks), and its index (in pairs) along the step.
fn x_row(e: u32) -> u32 {
    return (e / (32u * XG)) * 8u + (e / 4u) % 8u;
}

fn x_pair(e: u32) -> u32 {
    return ((e / 32u) % XG) * 4u + e % 4u;
}

// Global loads of the K step at k0: zeros for tokens past m_count, k past K, rows past n.
fn load_step(k0: u32, m0: u32, n0: u32, m_count: u32, lid: u32) -> Loaded {
    var r: Loaded;
    // ABLATE (bench only, see TileOpts::ablate): bit 1 skips the loads after a slice's first
    // (the dequantization of the constant words that remain then folds away too).
    if ((ABLATE & 1u) != 0u && k0 % p.k_split != 0u) {
        return r;
    }
    let k2 = p.k / 2u;
    for (var it = 0u; it < X_ITEMS; it++) {
        let e = lid + it * WG;
        let m = m0 + x_row(e);
        let kp = k0 / 2u + x_pair(e);
        var v = XElem();
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

// Writes one step's registers to the workgroup tiles (X as f16, W dequantized), copy `buf`.
fn store_step(r: Loaded, lid: u32, buf: u32) {
    // ABLATE bit 2 (bench only): no stores, the tiles keep whatever they held.
    if ((ABLATE & 2u) != 0u) {
        return;
    }
    let xb = buf * BM * AS2;
    let wb = buf * BN * AS2;
    for (var it = 0u; it < X_ITEMS; it++) {
        let e = lid + it * WG;
        if (e < BM * (BK / 2u)) {
            xs[xb + x_row(e) * AS2 + x_pair(e)] = x_to_f16(r.x[it]);
        }
    }
    for (var it = 0u; it < W_ITEMS; it++) {
        let e = lid + it * WG;
        if (e < BN * (BK / 8u)) {
            // Word g of the row holds pairs 4 g .. 4 g + 3; a thread writes them rotated by g
            // (the shift is per thread) so the lanes of one store hit 32 different banks.
            let g = e % (BK / 8u);
            let base = wb + (e / (BK / 8u)) * AS2 + g * 4u;
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
    // The wrapper writes the TM x TN accumulators out as named variables acc_i_j: an array
    // indexed in loops may go to local memory (suspected: with an array, every tile size ran at
    // about 33 TFLOP/s on the H200, the 128 x 128 tile no faster than 32 x 64).
    //#ACC_DECL
    let k_begin = wid.z * p.k_split;
    let k_end = min(p.k, k_begin + p.k_split);
    let y_off = wid.z * p.y_slice;
    // Without DB: per step, store the loaded tiles, barrier, multiply, barrier. With DB
    // (double-buffered tiles): the tiles of the next step go to the other copy right after this
    // step's multiplies, so one barrier per step suffices (a copy is rewritten only after the
    // barrier that ends the step reading it), and one subgroup's stores overlap the others'
    // multiplies. DB with PREFETCH loads the next step before the multiplies, without it after.
    var buf = 0u;
    var next = load_step(k_begin, m0, n0, m_count, lid);
    if (DB) {
        store_step(next, lid, 0u);
        workgroupBarrier();
    }
    for (var k0 = k_begin; k0 < k_end; k0 += BK) {
        let more = k0 + BK < k_end;
        if (!DB) {
            if (!PREFETCH && k0 > k_begin) {
                next = load_step(k0, m0, n0, m_count, lid);
            }
            store_step(next, lid, 0u);
            workgroupBarrier();
        }
        if (PREFETCH && more) {
            next = load_step(k0 + BK, m0, n0, m_count, lid);
        }
        let xb = buf * BM * AS2;
        let wb = buf * BN * AS2;
        for (var kk = 0u; kk < BK / 2u; kk += 8u) {
            // Unrolled by the wrapper: B fragments b_j, then per row i of accumulators one A
            // fragment and TN multiply-adds.
            //#MMA_STEP
        }
        if (DB && more) {
            if (!PREFETCH) {
                next = load_step(k0 + BK, m0, n0, m_count, lid);
            }
            store_step(next, lid, 1u - buf);
        }
        workgroupBarrier();
        if (DB) {
            buf = 1u - buf;
        }
    }
    // Epilogue, unrolled by the wrapper: per row i of accumulators, store_acc of acc_i_j to the
    // subgroup's staging tile, a barrier, write_stage, a barrier.
    //#EPILOGUE
}

// Writes the subgroup's staging tile (16 rows x 16 STN columns) to Y rows m_base.., columns
// n_base.. (y_off further on: the split-K slice): consecutive lanes write consecutive columns;
// bounds on M and N, bias, accumulate.
fn write_stage(sg: u32, m_base: u32, n_base: u32, m_count: u32, y_off: u32) {
    for (var e = lane; e < 16u * 16u * STN; e += SG) {
        let r = e / (16u * STN);
        let c = e % (16u * STN);
        let m = m_base + r;
        let n = n_base + c;
        if (m < m_count && n < p.n) {
            let out = y_off + m * p.ldy + p.row_base + n;
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
}
