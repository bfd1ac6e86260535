// gemm_q4 (tiled matrix multiply-add): Y = X W^T (+ bias) for INT4 W, on 16x16x16 matrix
// operations (cooperative matrices: tensor cores). X and the dequantized W are rounded to f16;
// products accumulate in f32.
//
// The wrapper (src/kernels/gemm_q4.rs, `mma_shader`) puts before this file the tile constants
// SG (subgroup size), TM and TN (16x16 accumulators per subgroup along tokens and weight rows),
// PREFETCH (whether the next step's global loads overlap this step's multiplies), DB (double-
// buffered workgroup tiles, one barrier per K step), WS (warp specialization, tile_specialized),
// XW (X loaded 8 values at a time), ABLATE (bench only), BK (K step: 32 or 64), STN (accumulators per row staged at once: TN, or fewer to fit BK = 64 in 48 KiB of
// workgroup memory), the X element type `XElem` with `x_to_f16` (pair q of an item: a pair of
// f32, or f16 that the wrapper's conversion dispatch wrote, shaders/gemm_q4_x16.wgsl, as one pair
// or, with XW, four)
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

// The threads that load and dequantize a K step: the whole workgroup, or with WS (warp
// specialization) the second half, while the first half multiplies.
const LOADERS: u32 = 4u * SG;
const WG: u32 = select(4u, 8u, WS) * SG;
const BM: u32 = 32u * TM;
const BN: u32 = 32u * TN;
// Row strides in f16 pairs (tiles) and in f32 (staging).
const AS2: u32 = BK / 2u + 4u;
const SS: u32 = 16u * STN + 4u;
// Groups of 4 pairs of X along one row of a step.
const XG: u32 = BK / 8u;
// Per thread and K step: pairs of X (two f32 of one token), words of W.
// XW (wide X): items of 8 values (BK = 32: 4 per row and step) instead of pairs.
const X_PER_ITEM: u32 = select(2u, 8u, XW);
const X_ITEMS: u32 = (BM * (BK / X_PER_ITEM) + LOADERS - 1u) / LOADERS;
const W_ITEMS: u32 = (BN * (BK / 8u) + LOADERS - 1u) / LOADERS;

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

// DB and WS: two copies of each tile (see the K loops).
const NBUF: u32 = select(1u, 2u, DB || WS);
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

// XW: the token row of wide item e (8 rows per 32 items).
fn xw_row(e: u32) -> u32 {
    return (e / 32u) * 8u + e % 8u;
}

// Global loads of the K step at k0: zeros for tokens past m_count, k past K, rows past n.
fn load_step(k0: u32, m0: u32, n0: u32, m_count: u32, lid: u32) -> Loaded {
    var r: Loaded;
    // ABLATE (bench only, see TileOpts::ablate): bit 1 skips the loads after a slice's first.
    if ((ABLATE & 1u) != 0u && k0 % p.k_split != 0u) {
        return r;
    }
    let k2 = p.k / 2u;
    for (var it = 0u; it < X_ITEMS; it++) {
        let e = lid + it * LOADERS;
        var v = XElem();
        if (XW) {
            // Item e: row 8 (e / 32) + e % 8, values 8 c .. 8 c + 7 of the step, c = e / 8 % 4.
            let m = m0 + xw_row(e);
            let k8 = k0 / 8u + (e / 8u) % 4u;
            if (e < BM * (BK / 8u) && m < m_count && k8 < p.k / 8u) {
                v = x[m * (p.k / 8u) + k8];
            }
        } else {
            let m = m0 + x_row(e);
            let kp = k0 / 2u + x_pair(e);
            if (e < BM * (BK / 2u) && m < m_count && kp < k2) {
                v = x[m * k2 + kp];
            }
        }
        r.x[it] = v;
    }
    for (var it = 0u; it < W_ITEMS; it++) {
        let e = lid + it * LOADERS;
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
        let e = lid + it * LOADERS;
        if (XW) {
            if (e < BM * (BK / 8u)) {
                // Pairs rotated by the chunk c, so the 32 lanes of a store (8 rows x 4 chunks)
                // hit 32 different banks.
                let c = (e / 8u) % 4u;
                let base = xb + xw_row(e) * AS2 + 4u * c;
                for (var j = 0u; j < 4u; j++) {
                    let q = (j + c) & 3u;
                    xs[base + q] = x_to_f16(r.x[it], q);
                }
            }
        } else if (e < BM * (BK / 2u)) {
            xs[xb + x_row(e) * AS2 + x_pair(e)] = x_to_f16(r.x[it], 0u);
        }
    }
    for (var it = 0u; it < W_ITEMS; it++) {
        let e = lid + it * LOADERS;
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
    if (WS) {
        tile_specialized(m0, n0, m_count, wid.z, lid);
    } else {
        tile(m0, n0, m_count, wid.z, lid);
    }
}

// The tile of a live workgroup. A function of its own because naga's uniformity analysis does
// not see that main's early return is workgroup-uniform, and rejects matrix operations after it
// unless they sit behind a call.
fn tile(m0: u32, n0: u32, m_count: u32, slice: u32, lid: u32) {
    let sg = lid / SG;
    let qm = (sg / 2u) * 16u * TM;
    let qn = (sg % 2u) * 16u * TN;
    // Every subgroup multiplies and writes its accumulators (see tile_specialized).
    let multiplies = true;
    // The wrapper writes the TM x TN accumulators out as named variables acc_i_j: an array
    // indexed in loops may go to local memory (suspected: with an array, every tile size ran at
    // about 33 TFLOP/s on the H200, the 128 x 128 tile no faster than 32 x 64).
    //#ACC_DECL
    let k_begin = slice * p.k_split;
    let k_end = min(p.k, k_begin + p.k_split);
    let y_off = slice * p.y_slice;
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

// WS: the tile with the work split by subgroup. Subgroups 0-3 only multiply (each its quarter,
// as in `tile`); subgroups 4-7 only load, dequantize and store the next K step into the other
// copy of the tiles, and issue the global loads of the step after it. So the stores and the
// multiplies of a step run at the same time on one multiprocessor instead of one after the
// other, and the loads have a whole step to arrive. One barrier per step: a copy is rewritten
// only after the barrier that ends the step reading it. The matrix operations sit behind calls
// (see `tile`: naga's uniformity analysis would reject them inside the subgroup branch).
fn tile_specialized(m0: u32, n0: u32, m_count: u32, slice: u32, lid: u32) {
    let sg = lid / SG;
    let multiplies = sg < 4u;
    let qm = ((sg % 4u) / 2u) * 16u * TM;
    let qn = (sg % 2u) * 16u * TN;
    let loader = lid % LOADERS;
    //#ACC_DECL
    let k_begin = slice * p.k_split;
    let k_end = min(p.k, k_begin + p.k_split);
    let y_off = slice * p.y_slice;
    // The loaders keep WS_DEPTH K steps of loads in flight (n1 the next step to store): their
    // registers are free, since the multiplying subgroups set the kernel's register count.
    var n1: Loaded;
    var n2: Loaded;
    var n3: Loaded;
    if (!multiplies) {
        store_step(load_step(k_begin, m0, n0, m_count, loader), loader, 0u);
        if (k_begin + BK < k_end) {
            n1 = load_step(k_begin + BK, m0, n0, m_count, loader);
        }
        if (WS_DEPTH >= 2u && k_begin + 2u * BK < k_end) {
            n2 = load_step(k_begin + 2u * BK, m0, n0, m_count, loader);
        }
        if (WS_DEPTH >= 3u && k_begin + 3u * BK < k_end) {
            n3 = load_step(k_begin + 3u * BK, m0, n0, m_count, loader);
        }
    }
    workgroupBarrier();
    var buf = 0u;
    for (var k0 = k_begin; k0 < k_end; k0 += BK) {
        if (multiplies) {
            let xb = buf * BM * AS2;
            let wb = buf * BN * AS2;
            for (var kk = 0u; kk < BK / 2u; kk += 8u) {
                //#MMA_STEP_CALLS
            }
        } else if (k0 + BK < k_end) {
            store_step(n1, loader, 1u - buf);
            let k_load = k0 + (WS_DEPTH + 1u) * BK;
            let more = k_load < k_end;
            if (WS_DEPTH == 1u && more) {
                n1 = load_step(k_load, m0, n0, m_count, loader);
            }
            if (WS_DEPTH == 2u) {
                n1 = n2;
                if (more) {
                    n2 = load_step(k_load, m0, n0, m_count, loader);
                }
            }
            if (WS_DEPTH == 3u) {
                n1 = n2;
                n2 = n3;
                if (more) {
                    n3 = load_step(k_load, m0, n0, m_count, loader);
                }
            }
        }
        workgroupBarrier();
        buf = 1u - buf;
    }
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
