// gemm_q4 (tiled matrix multiply-add): Y = X W^T (+ bias) for INT4 W, on 16x16x16 matrix
// operations (cooperative matrices: tensor cores). X and the dequantized W are rounded to f16;
// products accumulate in f32.
//
// The wrapper (src/kernels/gemm_q4.rs, `mma_shader`) puts before this file the tile constants
// SG (subgroup size), TM and TN (16x16 accumulators per subgroup along tokens and weight rows),
// PREFETCH (whether the next step's global loads overlap this step's multiplies), DB (double-
// buffered workgroup tiles, one barrier per K step), BK (K step: 32 or 64), STN (accumulators per
// row staged at once: TN, or fewer to fit BK = 64 in 48 KiB of workgroup memory); the matrix
// operations `acc_zero`, `load_a`, `load_b`, `mma`, `store_acc` with the types `Frag_A`, `Frag_B`,
// `Acc`: either cooperative matrices (shaders/gemm_q4_mma_coop.wgsl) or a plain-WGSL emulation
// for adapters without them (shaders/gemm_q4_mma_emulated.wgsl, used by the tests to check this
// file's tiling on lavapipe); and after it the loader: the X and W bindings, `Loaded`,
// `load_step` (a K step's global loads into registers) and `store_step` (X as f16 and W
// dequantized to f16 into the workgroup tiles): shaders/gemm_q4_mma_load.wgsl (X in f32 or as f16
// pairs, W dequantized in f32) or shaders/gemm_q4_mma_load_packed.wgsl (16-byte loads of f16 X
// and W, W dequantized with packed f16 arithmetic).
//
// Tiling: a workgroup of 4 subgroups computes a BM x BN tile of Y (BM = 32 TM tokens, BN = 32 TN
// weight rows); subgroup s owns the (s / 2, s % 2) quarter, TM x TN accumulators. The K loop steps
// BK elements (a quarter or half of a 128-block: one scale per row and step). Split-K: workgroup
// z covers K elements [z k_split, (z + 1) k_split) and writes its partial sums to slice z of Y
// (y_slice elements apart); the wrapper then sums the slices in a fixed order
// (shaders/gemm_q4_splitk.wgsl), so results do not depend on scheduling. With PREFETCH, global
// loads for the next step are issued into registers before the current step multiplies
// (register double buffering, at the cost of ~40 registers per thread). The tiles hold f16 pairs,
// rows padded to 20 pairs (80 bytes, or 36 pairs = 144 bytes for BK = 64: an odd multiple of 16,
// so the 16x16 matrix loads do not conflict).
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
@group(0) @binding(3) var<storage, read> scales: array<u32>;
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
