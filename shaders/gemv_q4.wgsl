// gemv_q4: y = W x (+ bias), or y += W x (+ bias), for an INT4 block-128 matrix W[rows, k] and an
// f32 vector x[k] (decode: one token).
//
// Layout (src/quant.rs): each row is `bpr` blocks of 128; a block is 4 vec4<u32> ("quarters" of 32
// elements); element i of a quarter is nibble i % 8 of word i / 8, stored as level + 8. Scales are
// bf16 pairs in u32 words, row-major [rows, bpr].
//
// Thread mapping: one workgroup of WG threads computes ROWS consecutive rows. Thread t walks the
// quarters t, t + WG, ... of K (K is split across the workgroup: fewer rows means more threads
// per row) and, for each quarter, loads the 32 values of x once and the quarter of all ROWS rows
// (ROWS independent 16-byte loads in flight), keeping ROWS partial sums. Consecutive threads read
// consecutive 16-byte pieces of a row, so loads coalesce. `workgroup_sums` (prepended from
// gemv_q4_sum_subgroup.wgsl or gemv_q4_sum_shared.wgsl) adds the partial sums over the workgroup
// and thread r writes row r. Rows past the end read the last row (clamped) and are not written.
// One dispatch covers `rows` rows starting at row `row_base` of y and bias (a matrix larger than
// a storage binding is split into row ranges, one dispatch each).

override WG: u32 = 64u;
override ROWS: u32 = 4u;
// Upper bound of ROWS: per-thread accumulators live in a fixed-size private array.
const MAX_ROWS: u32 = 8u;

struct Params {
    rows: u32,
    k: u32,
    bpr: u32,
    row_base: u32,
    accumulate: u32,
    has_bias: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qw: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

var<workgroup> red: array<f32, ROWS * WG>;

// Levels (nibble - 8) of four nibbles, each in the low bits of a lane: 2^23 + n built by OR-ing
// the exponent bits, then one subtraction (cheaper than an int-to-float conversion).
fn levels(n: vec4<u32>) -> vec4<f32> {
    return bitcast<vec4<f32>>((n & vec4<u32>(15u)) | vec4<u32>(0x4b000000u)) - vec4<f32>(8388616.0);
}

// Sum over the 8 elements of one word times x[0..4] (xa) and x[4..8] (xb).
fn dot_word(w: u32, xa: vec4<f32>, xb: vec4<f32>) -> f32 {
    let lo = levels(vec4<u32>(w) >> vec4<u32>(0u, 4u, 8u, 12u));
    let hi = levels(vec4<u32>(w) >> vec4<u32>(16u, 20u, 24u, 28u));
    return dot(lo, xa) + dot(hi, xb);
}

// x[4v .. 4v+4], zero past the end of x (the padding of the last block has level 0, but x there
// is not ours to read).
fn x4(v: u32) -> vec4<f32> {
    if (v < p.k / 4u) {
        return x[v];
    }
    return vec4<f32>(0.0);
}

fn scale(i: u32) -> f32 {
    let w = scales[i / 2u];
    return select(bf16_lo(w), bf16_hi(w), (i & 1u) == 1u);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row0 = (wid.x + wid.y * nwg.x) * ROWS;
    if (row0 >= p.rows) {
        return;
    }
    let quarters = p.bpr * 4u;
    var acc: array<f32, MAX_ROWS>;
    for (var q = lid; q < quarters; q += WG) {
        let x0 = x4(q * 8u);
        let x1 = x4(q * 8u + 1u);
        let x2 = x4(q * 8u + 2u);
        let x3 = x4(q * 8u + 3u);
        let x4_ = x4(q * 8u + 4u);
        let x5 = x4(q * 8u + 5u);
        let x6 = x4(q * 8u + 6u);
        let x7 = x4(q * 8u + 7u);
        let block = q / 4u;
        for (var r = 0u; r < ROWS; r++) {
            let row = min(row0 + r, p.rows - 1u);
            let w = qw[row * quarters + q];
            let s = dot_word(w.x, x0, x1) + dot_word(w.y, x2, x3) + dot_word(w.z, x4_, x5) + dot_word(w.w, x6, x7);
            acc[r] += s * scale(row * p.bpr + block);
        }
    }
    let total = workgroup_sums(acc, lid);
    if (lid < ROWS && row0 + lid < p.rows) {
        let out = p.row_base + row0 + lid;
        var v = total;
        if (p.has_bias != 0u) {
            v += bias[out];
        }
        if (p.accumulate != 0u) {
            v += y[out];
        }
        y[out] = v;
    }
}
