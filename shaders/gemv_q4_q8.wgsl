//! gemv_q4_q8: y = W x (+ bias), or y += W x (+ bias), for an INT4 block-128 matrix W[rows, k] and
//! x quantized to int8 blocks of 32 (ActQ8 in src/quant.rs).
//!
//! Thread mapping and weight layout as gemv_q4.wgsl: a workgroup of WG threads computes ROWS
//! consecutive rows; thread t walks the quarter blocks (32 weights, one vec4<u32>) t, t + WG, ...
//! of K, first issuing the ROWS weight loads, then getting x's quarter once for all rows.
//!
//! Input (INPUT, a `const` the wrapper prepends): INPUT_Q8 reads x already quantized (by
//! quant_act.wgsl); the others quantize each quarter of x as they go (q8_block.wgsl), so the step
//! before the projection needs no dispatch: INPUT_F32 from an f32 vector, INPUT_RMSNORM from the
//! residual stream r times the norm weight, summing r² on the way and multiplying the row sums by
//! 1 / rms at the end (the scalar commutes with the block quantizer, ActQ8::quantize_scaled),
//! INPUT_SWIGLU from silu(gate) * up of [gate | up].
//!
//! Output (the file the wrapper prepends after this one's constants): gemv_q4_q8_out_y.wgsl writes
//! y (ROWS consecutive rows per workgroup); gemv_q4_q8_out_rope_kv.wgsl takes the rows of the
//! fused qkv projection in fours that RoPE pairs, rotates q and k and writes q and the KV cache,
//! so the decode step needs no RoPE dispatch of its own. Each defines the bias and output
//! bindings, `out_units` (workgroups with work), `out_row` (a workgroup's rows) and `write_out`.
//!
//! Batched (COLS > 1, a `const` the wrapper prepends with a `batch_cols()` giving the step's
//! live columns): x is COLS int8 vectors (INPUT_Q8 only), column c at quarter c * quarters, and
//! y gets COLS outputs, column c at c * y_stride. A workgroup is COLS copies of the one-column
//! workgroup side by side (WG * COLS threads; thread lid works on column lid / WG as lane
//! lid % WG), all reading the same weight rows at the same time: the weights come from memory
//! once for all columns (the other columns' loads hit L1), each thread holds one column's
//! accumulators, and a column's sums are the one-column kernel's, operation for operation.
//!
//! Arithmetic, per quarter and row: `w & 0x0F0F0F0F` and `(w >> 4) & 0x0F0F0F0F` split a word's
//! 8 nibbles (0..15, read as non-negative int8) into two words that meet the packed x words in
//! two 4-way int8 dot products (dot4I8Packed: one instruction where the device has integer dot
//! products). The exact integer sum of nibble * q becomes `d * sum - 8 * (d * Σq)` (the -8 offset
//! of the stored levels) and is scaled by the weight block's bf16 scale: about 1 instruction per
//! weight, against 4 for the f32 kernel.

override WG: u32 = 32u;
override ROWS: u32 = 8u;
// UNROLL (a `const` the wrapper prepends): K steps per loop iteration; a thread issues all their
// weight loads before it computes any (more bytes in flight). Each thread still accumulates its
// quarters in the same order, so any UNROLL gives the same sums. (A const, not an override:
// naga 30 panicked on the override in the loop's step.)
const MAX_ROWS: u32 = 16u;
const MAX_UNROLL: u32 = 4u;
const INPUT_Q8: u32 = 0u;
const INPUT_F32: u32 = 1u;
const INPUT_RMSNORM: u32 = 2u;
const INPUT_SWIGLU: u32 = 3u;

struct Params {
    rows: u32,
    k: u32,
    bpr: u32,
    row_base: u32,
    accumulate: u32,
    has_bias: u32,
    eps: f32,
    // Distance between the output columns of a batched product (COLS > 1).
    y_stride: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qw: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read> xq: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> xd: array<vec2<f32>>;
// The fused inputs' f32 vector (INPUT_SWIGLU: [gate | up]) and RMSNorm's weight.
@group(0) @binding(7) var<storage, read> xf: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read> norm_w: array<vec4<f32>>;

var<workgroup> red: array<f32, ROWS * WG * COLS>;
var<workgroup> red_sq: array<f32, WG>;
// INPUT_RMSNORM: this thread's sum of r² over the quarters it read.
var<private> sum_sq: f32;

fn scale(i: u32) -> f32 {
    let w = scales[i / 2u];
    return select(bf16_lo(w), bf16_hi(w), (i & 1u) == 1u);
}

// Quarter q of x as int8 (read, or quantized here from the f32 input).
fn x_quarter(q: u32) -> Q8Block {
    if (INPUT == INPUT_Q8) {
        let ds = xd[q];
        return Q8Block(xq[2u * q], xq[2u * q + 1u], ds.x, ds.y);
    }
    let n = p.k / 4u;
    var v: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        let j = 8u * q + i;
        var t = vec4<f32>(0.0);
        if (j < n) {
            if (INPUT == INPUT_SWIGLU) {
                let g = xf[j];
                t = g / (1.0 + exp(-g)) * xf[j + n];
            } else {
                t = xf[j];
                if (INPUT == INPUT_RMSNORM) {
                    sum_sq += dot(t, t);
                    t = t * norm_w[j];
                }
            }
        }
        v[i] = t;
    }
    return quantize32(v);
}

// RMSNorm's 1 / rms(r) from the threads' sums of r² (together they read all of K), else 1.
fn input_scale(lid: u32) -> f32 {
    if (INPUT != INPUT_RMSNORM) {
        return 1.0;
    }
    red_sq[lid] = sum_sq;
    workgroupBarrier();
    for (var n = WG; n > 1u; n = (n + 1u) / 2u) {
        let half = (n + 1u) / 2u;
        if (lid < n - half) {
            red_sq[lid] += red_sq[lid + half];
        }
        workgroupBarrier();
    }
    return 1.0 / sqrt(red_sq[0] / f32(p.k) + p.eps);
}

// A quarter's 32 nibbles (0..15, as non-negative int8) as the 8 words that meet x's packed words:
// `w & 0x0F0F0F0F` and `(w >> 4) & 0x0F0F0F0F` of each weight word.
struct Nibbles {
    a: vec4<u32>,
    c: vec4<u32>,
}

fn split_nibbles(w: vec4<u32>) -> Nibbles {
    let m = vec4<u32>(0x0F0F0F0Fu);
    let lo = w & m;
    let hi = (w >> vec4<u32>(4u)) & m;
    return Nibbles(vec4<u32>(lo.x, hi.x, lo.y, hi.y), vec4<u32>(lo.z, hi.z, lo.w, hi.w));
}

// Σ nibble * q over one quarter: n holds the 32 nibbles, a and c the 8 packed x words.
fn quarter_dot(n: Nibbles, a: vec4<u32>, c: vec4<u32>) -> i32 {
    var s = dot4I8Packed(n.a.x, a.x);
    s += dot4I8Packed(n.a.y, a.y);
    s += dot4I8Packed(n.a.z, a.z);
    s += dot4I8Packed(n.a.w, a.w);
    s += dot4I8Packed(n.c.x, c.x);
    s += dot4I8Packed(n.c.y, c.y);
    s += dot4I8Packed(n.c.z, c.z);
    s += dot4I8Packed(n.c.w, c.w);
    return s;
}

// Quarter q of x's column c (batched: always quantized beforehand).
fn x_quarter_col(q: u32, c: u32) -> Q8Block {
    if (COLS == 1u) {
        return x_quarter(q);
    }
    let i = c * p.bpr * 4u + q;
    let ds = xd[i];
    return Q8Block(xq[2u * i], xq[2u * i + 1u], ds.x, ds.y);
}

// The K loop of one thread: quarters pos, pos + WG, ... of the workgroup's rows against x's
// column `col` (nothing when `live` is false), each row's products summed in that order (the
// one-column kernel's thread pos does exactly this).
fn row_sums(unit: u32, pos: u32, col: u32, live: bool) -> array<f32, MAX_ROWS> {
    let quarters = p.bpr * 4u;
    var rows: array<u32, MAX_ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        rows[r] = out_row(unit, r);
    }
    var acc: array<f32, MAX_ROWS>;
    let end = select(0u, quarters, live);
    for (var q0 = pos; q0 < end; q0 += WG * UNROLL) {
        var w: array<vec4<u32>, MAX_ROWS * MAX_UNROLL>;
        var sc: array<f32, MAX_ROWS * MAX_UNROLL>;
        for (var u = 0u; u < UNROLL; u++) {
            // Past the row's end a step re-reads its last quarter, unused below.
            let q = min(q0 + u * WG, quarters - 1u);
            for (var r = 0u; r < ROWS; r++) {
                w[u * ROWS + r] = qw[rows[r] * quarters + q];
                sc[u * ROWS + r] = scale(rows[r] * p.bpr + q / 4u);
            }
        }
        for (var u = 0u; u < UNROLL; u++) {
            let q = q0 + u * WG;
            if (q < quarters) {
                let xb = x_quarter_col(q, col);
                let offset = 8.0 * xb.dsum;
                for (var r = 0u; r < ROWS; r++) {
                    let t = fma(xb.d, f32(quarter_dot(split_nibbles(w[u * ROWS + r]), xb.lo, xb.hi)), -offset);
                    acc[r] = fma(t, sc[u * ROWS + r], acc[r]);
                }
            }
        }
    }
    return acc;
}

// One column (COLS = 1), or COLS one-column workgroups side by side: thread lid works on column
// lid / WG as the one-column kernel's thread lid % WG.
fn side_by_side(unit: u32, lid: u32) {
    let col = lid / WG;
    let lane = lid % WG;
    red_base = col * ROWS * WG;
    // A column past the step's rows computes nothing (its threads still meet the barriers).
    let live = col < batch_cols();
    let acc = row_sums(unit, lane, col, live);
    write_out(unit, col, live, workgroup_sums(acc, lane) * input_scale(lane), lane);
}

// Column lanes (LANES, batched only): the COLS consecutive threads lid work on one quarter
// position t = lid / COLS, each for its own column lid % COLS, so one weight load serves COLS
// lanes and each thread keeps one column's accumulators. The partial sums are then staged in
// workgroup memory in the side-by-side order and reduced as there: each column's sums are the
// one-column kernel's, operation for operation.
fn column_lanes(unit: u32, lid: u32) {
    let own = lid % COLS;
    let t = lid / COLS;
    let acc = row_sums(unit, t, own, own < batch_cols());
    for (var r = 0u; r < ROWS; r++) {
        red[(own * ROWS + r) * WG + t] = acc[r];
    }
    workgroupBarrier();
    let col = lid / WG;
    let lane = lid % WG;
    var staged: array<f32, MAX_ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        staged[r] = red[(col * ROWS + r) * WG + lane];
    }
    workgroupBarrier();
    red_base = col * ROWS * WG;
    write_out(unit, col, col < batch_cols(), workgroup_sums(staged, lane), lane);
}

@compute @workgroup_size(WG * COLS)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let unit = wid.x + wid.y * nwg.x;
    if (unit >= out_units()) {
        return;
    }
    if (LANES) {
        column_lanes(unit, lid);
    } else {
        side_by_side(unit, lid);
    }
}
