//! gemv_q4: y = W x (+ bias), or y += W x (+ bias), for an INT4 block-128 matrix W[rows, k] and an
//! f32 vector x[k] (decode: one token).
//!
//! Layout (src/quant.rs): each row is `bpr` blocks of 128; a block is 4 vec4<u32> ("quarters" of 32
//! elements); element i of a quarter is nibble i % 8 of word i / 8, stored as level + 8. Scales are
//! bf16 pairs in u32 words, row-major [rows, bpr].
//!
//! Thread mapping: one workgroup of WG threads computes ROWS consecutive rows. Thread t walks the
//! quarters t, t + WG, ... of K (K is split across the workgroup). Per quarter it first issues the
//! ROWS 16-byte weight loads and ROWS scale loads (independent loads in flight are what hides
//! memory latency), then loads the 32 values of x once, 8 at a time, and uses them for every row.
//! Consecutive threads read consecutive 16-byte pieces of a row, so loads coalesce.
//! `workgroup_sums` (prepended from gemv_q4_sum_subgroup.wgsl or gemv_q4_sum_shared.wgsl) adds
//! the partial sums over the workgroup and thread r writes row r. Rows past the end read the last
//! row (clamped) and are not written. One dispatch covers `rows` rows starting at row `row_base`
//! of y and bias (a matrix larger than a storage binding is split into row ranges).
//!
//! Dequantization, 3 instructions per weight: a nibble n shifted to the top of an f32 mantissa
//! under the exponent of 1.0 reads as u = 1 + n/16 (shift, then one and-or), so
//! level = n - 8 = 16 (u - 1.5) and, per quarter, sum(level * x) = 16 (sum(u * x) - 1.5 sum(x)):
//! one multiply-add per weight, and the x-only term sum(x) is computed once per quarter for all
//! ROWS rows. The products stay exact up to f32 rounding (u has 5 significant bits).

override WG: u32 = 32u;
override ROWS: u32 = 8u;
// Upper bound of ROWS: per-thread arrays have a fixed size (unused entries are dead). On the H100
// more than 10 rows spill registers.
const MAX_ROWS: u32 = 16u;

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

// u = 1 + n/16 for the four nibbles in the low 16 bits of w (each moved to mantissa bits 19..22).
fn units(w: u32) -> vec4<f32> {
    let n = (vec4<u32>(w) << vec4<u32>(19u, 15u, 11u, 7u)) & vec4<u32>(0x780000u);
    return bitcast<vec4<f32>>(n | vec4<u32>(0x3f800000u));
}

// x[4v .. 4v+4], zero past the end of x (the padding of the last block has level 0, but x there
// is not ours to read).
fn x4(v: u32) -> vec4<f32> {
    let n = p.k / 4u;
    return select(vec4<f32>(0.0), x[min(v, n - 1u)], v < n);
}

fn scale(i: u32) -> f32 {
    let w = scales[i / 2u];
    return select(bf16_lo(w), bf16_hi(w), (i & 1u) == 1u);
}

// Adds quarter q of every row to acc, given the rows' weights w and block scales s. Word by word,
// so that only 8 values of x are live at a time.
fn accumulate_quarter(q: u32, w: array<vec4<u32>, MAX_ROWS>, s: array<f32, MAX_ROWS>, acc: ptr<function, array<f32, MAX_ROWS>>) {
    var part: array<f32, MAX_ROWS>;
    var xsum = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        let xa = x4(q * 8u + 2u * j);
        let xb = x4(q * 8u + 2u * j + 1u);
        xsum += xa + xb;
        for (var r = 0u; r < ROWS; r++) {
            part[r] += dot(units(w[r][j]), xa) + dot(units(w[r][j] >> 16u), xb);
        }
    }
    let offset = 1.5 * dot(xsum, vec4<f32>(1.0));
    for (var r = 0u; r < ROWS; r++) {
        (*acc)[r] = fma(part[r] - offset, s[r], (*acc)[r]);
    }
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
    var rows: array<u32, MAX_ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        rows[r] = min(row0 + r, p.rows - 1u);
    }
    var acc: array<f32, MAX_ROWS>;
    for (var q = lid; q < quarters; q += WG) {
        var w: array<vec4<u32>, MAX_ROWS>;
        var sc: array<f32, MAX_ROWS>;
        for (var r = 0u; r < ROWS; r++) {
            w[r] = qw[rows[r] * quarters + q];
            sc[r] = scale(rows[r] * p.bpr + q / 4u);
        }
        accumulate_quarter(q, w, sc, &acc);
    }
    let total = 16.0 * workgroup_sums(acc, lid);
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
