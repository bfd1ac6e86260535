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
//! Input (INPUT): the kernel may compute x on the fly from what the step before a
//! projection would have written, saving that step's dispatch (on the H200 each small dispatch of a
//! decode step cost 6-12 µs): INPUT_RMSNORM reads the residual stream r and uses x = r * norm_w,
//! accumulating sum(r²) as it goes and scaling the row sums by 1/sqrt(mean(r²) + eps) at the end
//! (the norm is a scalar per token, so W (r * w * s) = s * W (r * w)); INPUT_SWIGLU reads
//! [gate | up] (2K values) and uses x = silu(gate) * up.
//!
//! Dequantization, 3 instructions per weight: a nibble n shifted to the top of an f32 mantissa
//! under the exponent of 1.0 reads as u = 1 + n/16 (shift, then one and-or), so
//! level = n - 8 = 16 (u - 1.5) and, per quarter, sum(level * x) = 16 (sum(u * x) - 1.5 sum(x)):
//! one multiply-add per weight, and the x-only term sum(x) is computed once per quarter for all
//! ROWS rows. The products stay exact up to f32 rounding (u has 5 significant bits).

override WG: u32 = 32u;
override ROWS: u32 = 8u;
// INPUT (one of the three below) is a `const` the wrapper prepends: naga 30 panics on an
// `override` compared inside a function ("process_override" handle order).
const INPUT_PLAIN: u32 = 0u;
const INPUT_RMSNORM: u32 = 1u;
const INPUT_SWIGLU: u32 = 2u;
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
    // INPUT_RMSNORM's epsilon.
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qw: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
// INPUT_RMSNORM's weight (K values); another binding, never read, otherwise.
@group(0) @binding(6) var<storage, read> norm_w: array<vec4<f32>>;

var<workgroup> red: array<f32, ROWS * WG>;
var<workgroup> red_sq: array<f32, WG>;
// INPUT_RMSNORM: this thread's sum of squares of the residual values it has read.
var<private> sum_sq: f32;

// u = 1 + n/16 for the four nibbles in the low 16 bits of w (each moved to mantissa bits 19..22).
fn units(w: u32) -> vec4<f32> {
    let n = (vec4<u32>(w) << vec4<u32>(19u, 15u, 11u, 7u)) & vec4<u32>(0x780000u);
    return bitcast<vec4<f32>>(n | vec4<u32>(0x3f800000u));
}

// x[4v .. 4v+4] as INPUT defines it, zero past the end of x (the padding of the last block has
// level 0, but x there is not ours to read). Each value of x is read once per thread.
fn x4(v: u32) -> vec4<f32> {
    let n = p.k / 4u;
    let inside = v < n;
    let i = min(v, n - 1u);
    if (INPUT == INPUT_SWIGLU) {
        let g = x[i];
        return select(vec4<f32>(0.0), g / (1.0 + exp(-g)) * x[i + n], inside);
    }
    let r = select(vec4<f32>(0.0), x[i], inside);
    if (INPUT == INPUT_RMSNORM) {
        sum_sq += dot(r, r);
        return r * norm_w[i];
    }
    return r;
}

// The factor on every row's sum: 1/sqrt(mean(r²) + eps) for INPUT_RMSNORM (sum_sq added over the
// workgroup, whose threads together read all of K), else 1. Called by every thread.
fn input_scale(lid: u32) -> f32 {
    if (INPUT != INPUT_RMSNORM) {
        return 1.0;
    }
    red_sq[lid] = sum_sq;
    workgroupBarrier();
    // Halve the live range [0, n) until one value is left (n need not be a power of two).
    for (var n = WG; n > 1u; n = (n + 1u) / 2u) {
        let half = (n + 1u) / 2u;
        if (lid < n - half) {
            red_sq[lid] += red_sq[lid + half];
        }
        workgroupBarrier();
    }
    return inverseSqrt(red_sq[0] / f32(p.k) + p.eps);
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
    let total = 16.0 * workgroup_sums(acc, lid) * input_scale(lid);
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
