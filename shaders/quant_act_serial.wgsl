//! quant_act_serial: the first activation quantizer (one thread per block of 32), kept so that the
//! kernel bench can time it against quant_act.wgsl in the same run; the engine uses quant_act.wgsl.
//! One f32 activation vector -> the int8 blocks that gemv_q4_q8.wgsl reads (the spec is
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
//! Thread mapping: each thread quantizes one block of 32 (8 vec4 loads, the absmax, 8 packed
//! words written as two vec4). Blocks past K (to whole weight blocks of 128) are written as zero.
//! INPUT_RMSNORM needs the mean square of the whole vector first: one workgroup takes the whole
//! vector (its threads stride over the blocks) after a reduction in workgroup memory.
//!
//! Packed layout (ActQ8::packed_words): per block, word 2j holds values 8j, 8j+2, 8j+4, 8j+6 and
//! word 2j+1 values 8j+1, 8j+3, 8j+5, 8j+7, as `w & 0x0F0F0F0F` and `(w >> 4) & 0x0F0F0F0F` lay
//! out the nibbles of weight word j.

override WG: u32 = 256u;
const INPUT_PLAIN: u32 = 0u;
const INPUT_RMSNORM: u32 = 1u;
const INPUT_SWIGLU: u32 = 2u;

struct Params {
    // Values in the vector (a multiple of 4).
    k: u32,
    // Blocks of 32 to write: K padded to whole weight blocks of 128, over 32.
    blocks: u32,
    eps: f32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> norm_w: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> xq: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read_write> xd: array<vec2<f32>>;

var<workgroup> red: array<f32, WG>;

// Values 4v .. 4v+4 of the vector before any norm, zero past K.
fn load4(v: u32) -> vec4<f32> {
    let n = p.k / 4u;
    if (v >= n) {
        return vec4<f32>(0.0);
    }
    if (INPUT == INPUT_SWIGLU) {
        let g = x[v];
        return g / (1.0 + exp(-g)) * x[v + n];
    }
    return x[v];
}

// 1 / sqrt(mean(x²) + eps) over the whole vector (one workgroup; every thread calls it).
fn inverse_rms(lid: u32) -> f32 {
    var s = 0.0;
    for (var v = lid; v < p.k / 4u; v += WG) {
        let t = x[v];
        s += dot(t, t);
    }
    red[lid] = s;
    workgroupBarrier();
    for (var n = WG; n > 1u; n = (n + 1u) / 2u) {
        let half = (n + 1u) / 2u;
        if (lid < n - half) {
            red[lid] += red[lid + half];
        }
        workgroupBarrier();
    }
    return 1.0 / sqrt(red[0] / f32(p.k) + p.eps);
}

// Quantizes block b; RMSNorm's 1 / rms multiplies d (quantizing x * w and scaling d by the norm
// is the spec's order: ActQ8::quantize_scaled).
fn quantize_block(b: u32, inv_rms: f32) {
    var v: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        var t = load4(b * 8u + i);
        if (INPUT == INPUT_RMSNORM) {
            t = t * norm_w[min(b * 8u + i, p.k / 4u - 1u)];
        }
        v[i] = t;
    }
    let q = quantize32(v);
    xq[2u * b] = q.lo;
    xq[2u * b + 1u] = q.hi;
    xd[b] = vec2<f32>(q.d * inv_rms, q.dsum * inv_rms);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if (INPUT == INPUT_RMSNORM) {
        let inv_rms = inverse_rms(lid);
        for (var b = lid; b < p.blocks; b += WG) {
            quantize_block(b, inv_rms);
        }
    } else {
        let b = wid.x * WG + lid;
        if (b < p.blocks) {
            quantize_block(b, 1.0);
        }
    }
}
