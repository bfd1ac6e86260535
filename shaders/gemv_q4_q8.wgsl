//! gemv_q4_q8: y = W x (+ bias), or y += W x (+ bias), for an INT4 block-128 matrix W[rows, k] and
//! x quantized to int8 blocks of 32 (ActQ8 in src/quant.rs, written by quant_act.wgsl).
//!
//! Thread mapping and weight layout as gemv_q4.wgsl: a workgroup of WG threads computes ROWS
//! consecutive rows; thread t walks the quarter blocks (32 weights, one vec4<u32>) t, t + WG, ...
//! of K, first issuing the ROWS weight loads, then loading x's quarter once for all rows.
//!
//! Arithmetic, per quarter and row: `w & 0x0F0F0F0F` and `(w >> 4) & 0x0F0F0F0F` split a word's
//! 8 nibbles (0..15, read as non-negative int8) into two words that meet the packed x words in
//! two 4-way int8 dot products (dot4I8Packed: one instruction where the device has integer dot
//! products). The exact integer sum of nibble * q becomes `d * sum - 8 * (d * Σq)` (the -8 offset
//! of the stored levels) and is scaled by the weight block's bf16 scale: about 1 instruction per
//! weight, against 4 for the f32 kernel.

override WG: u32 = 32u;
override ROWS: u32 = 8u;
const MAX_ROWS: u32 = 16u;

struct Params {
    rows: u32,
    k: u32,
    bpr: u32,
    row_base: u32,
    accumulate: u32,
    has_bias: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qw: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read> xq: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> xd: array<vec2<f32>>;
@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;

var<workgroup> red: array<f32, ROWS * WG>;

fn scale(i: u32) -> f32 {
    let w = scales[i / 2u];
    return select(bf16_lo(w), bf16_hi(w), (i & 1u) == 1u);
}

// Σ nibble * q over one quarter: w holds the 32 nibbles, a and c the 8 packed x words.
fn quarter_dot(w: vec4<u32>, a: vec4<u32>, c: vec4<u32>) -> i32 {
    let m = 0x0F0F0F0Fu;
    var s = dot4I8Packed(w.x & m, a.x);
    s += dot4I8Packed((w.x >> 4u) & m, a.y);
    s += dot4I8Packed(w.y & m, a.z);
    s += dot4I8Packed((w.y >> 4u) & m, a.w);
    s += dot4I8Packed(w.z & m, c.x);
    s += dot4I8Packed((w.z >> 4u) & m, c.y);
    s += dot4I8Packed(w.w & m, c.z);
    s += dot4I8Packed((w.w >> 4u) & m, c.w);
    return s;
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
        let a = xq[2u * q];
        let c = xq[2u * q + 1u];
        let ds = xd[q];
        let offset = 8.0 * ds.y;
        for (var r = 0u; r < ROWS; r++) {
            let t = fma(ds.x, f32(quarter_dot(w[r], a, c)), -offset);
            acc[r] = fma(t, sc[r], acc[r]);
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
