//! quant_act: one f32 activation vector -> the int8 blocks that gemv_q4_q8.wgsl reads (the spec is
//! `ActQ8` in src/quant.rs: blocks of 32, d = absmax / 127, q = round_half_even(x / d) in
//! -127..127, and d * sum(q) per block for the weights' -8 offset).
//!
//! INPUT (a `const` the wrapper prepends) says what the vector is: the bound x itself, the RMSNorm
//! of the residual stream x (times norm_w), or silu(gate) * up of x = [gate | up]. So the
//! elementwise step before a projection costs no dispatch of its own.
//!
//! With INPUT_RMSNORM the blocks quantized are those of x * norm_w, and 1 / rms(x) multiplies
//! their d (ActQ8::quantize_scaled): the same levels gemv_q4_q8 computes when it fuses the norm.
//!
//! Several vectors (a batched decode step's rows): workgroup id y is the row; row r reads x from
//! vec4 r * x_row and writes blocks r * blocks.. of the output.
//!
//! Thread mapping: LANES = 4 threads per block of 32, lane j owning values 8j .. 8j+7 (two vec4
//! loads; a warp reads contiguous memory) and writing the block's words 2j and 2j+1; the block's
//! absmax and level sum go through workgroup memory. WG / 4 blocks per workgroup, so a vector
//! spreads over many workgroups (5120 values: 10 at WG 64). Blocks past K (to whole weight
//! blocks of 128) are written as zero. INPUT_RMSNORM needs the mean square of the whole vector:
//! every workgroup computes it itself (≤ ~110 KB, from L2), identically, rather than one
//! workgroup doing all the blocks. The arithmetic is q8_block.wgsl's (bit-identical to
//! quantize32; quant_act_serial.wgsl is the one-thread-per-block version this replaced).

override WG: u32 = 64u;
const LANES: u32 = 4u;
const INPUT_PLAIN: u32 = 0u;
const INPUT_RMSNORM: u32 = 1u;
const INPUT_SWIGLU: u32 = 2u;

struct Params {
    // Values in the vector (a multiple of 4).
    k: u32,
    // Blocks of 32 to write: K padded to whole weight blocks of 128, over 32.
    blocks: u32,
    eps: f32,
    // vec4s between the rows of x.
    x_row: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> norm_w: array<vec4<f32>>;
// Words 2j, 2j+1 of block b at index 4b + j.
@group(0) @binding(3) var<storage, read_write> xq: array<vec2<u32>>;
@group(0) @binding(4) var<storage, read_write> xd: array<vec2<f32>>;

var<workgroup> red: array<f32, WG>;
var<workgroup> lane_sum: array<i32, WG>;
// The first vec4 of this workgroup's row of x.
var<private> x0: u32;

// Values 4v .. 4v+4 of the vector before any norm, zero past K.
fn load4(v: u32) -> vec4<f32> {
    let n = p.k / 4u;
    if (v >= n) {
        return vec4<f32>(0.0);
    }
    if (INPUT == INPUT_SWIGLU) {
        let g = x[x0 + v];
        return g / (1.0 + exp(-g)) * x[x0 + v + n];
    }
    if (INPUT == INPUT_RMSNORM) {
        return x[x0 + v] * norm_w[v];
    }
    return x[x0 + v];
}

// 1 / sqrt(mean(x²) + eps) over the whole vector; every thread of every workgroup calls it and
// gets the same value (same order of operations everywhere).
fn inverse_rms(lid: u32) -> f32 {
    let n = p.k / 4u;
    // Eight loads in flight per thread and round (indices clamped, values past the end zeroed):
    // a 5120-value vector is 3 rounds at WG 64, 1 at WG 256.
    var s = vec4<f32>(0.0);
    for (var v0 = lid; v0 < n; v0 += 8u * WG) {
        var t: array<vec4<f32>, 8>;
        for (var u = 0u; u < 8u; u++) {
            let v = v0 + u * WG;
            t[u] = select(vec4<f32>(0.0), x[x0 + min(v, n - 1u)], v < n);
        }
        for (var u = 0u; u < 8u; u += 4u) {
            s += vec4<f32>(dot(t[u], t[u]), dot(t[u + 1u], t[u + 1u]), dot(t[u + 2u], t[u + 2u]), dot(t[u + 3u], t[u + 3u]));
        }
    }
    red[lid] = (s.x + s.y) + (s.z + s.w);
    workgroupBarrier();
    for (var m = WG; m > 1u; m = (m + 1u) / 2u) {
        let half = (m + 1u) / 2u;
        if (lid < m - half) {
            red[lid] += red[lid + half];
        }
        workgroupBarrier();
    }
    let inv = 1.0 / sqrt(red[0] / f32(p.k) + p.eps);
    // red is reused for the absmax next.
    workgroupBarrier();
    return inv;
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    x0 = wid.y * p.x_row;
    let out0 = wid.y * p.blocks;
    var inv_rms = 1.0;
    if (INPUT == INPUT_RMSNORM) {
        inv_rms = inverse_rms(lid);
    }
    let b = wid.x * (WG / LANES) + lid / LANES;
    let j = lid % LANES;
    let first = lid - j;
    let live = b < p.blocks;
    var a = vec4<f32>(0.0);
    var c = vec4<f32>(0.0);
    if (live) {
        a = load4(b * 8u + 2u * j);
        c = load4(b * 8u + 2u * j + 1u);
    }
    red[lid] = max(absmax4(a), absmax4(c));
    workgroupBarrier();
    let absmax = max(max(red[first], red[first + 1u]), max(red[first + 2u], red[first + 3u]));
    let d = q8_scale(absmax);
    let la = q8_levels(a, d);
    let lc = q8_levels(c, d);
    let t = la + lc;
    lane_sum[lid] = t.x + t.y + t.z + t.w;
    workgroupBarrier();
    if (live) {
        xq[4u * (out0 + b) + j] = q8_pack_pair(la, lc);
        if (j == 0u) {
            let total = lane_sum[first] + lane_sum[first + 1u] + lane_sum[first + 2u] + lane_sum[first + 3u];
            // (d Σq) / rms, in the order quantize32's dsum then the norm's scale.
            xd[out0 + b] = vec2<f32>(d * inv_rms, d * f32(total) * inv_rms);
        }
    }
}
