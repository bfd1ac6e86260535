// The int8 block quantizer of ActQ8 (src/quant.rs), shared by quant_act.wgsl and gemv_q4_q8.wgsl:
// 32 values in; out the 8 packed words (word 2j: values 8j, 8j+2, 8j+4, 8j+6; word 2j+1: the odd
// ones, as `w & 0x0F0F0F0F` and `(w >> 4) & 0x0F0F0F0F` lay out weight word j), d = absmax / 127
// and d times the sum of the levels (for the weights' -8 offset).

struct Q8Block {
    lo: vec4<u32>,
    hi: vec4<u32>,
    d: f32,
    dsum: f32,
}

// The pieces every quantizer of these blocks shares, so that a block split over threads
// (quant_act.wgsl) or quantized where it is made (attention_decode.wgsl) is bit-identical to
// quantize32's: the scale from the block's absmax, and the levels of four values.
fn q8_scale(absmax: f32) -> f32 {
    // Division as the spec has it (a GPU's may be off by an ulp or two: a value within that of a
    // rounding tie may then round the other way; the tests allow for it).
    return absmax / 127.0;
}

fn q8_levels(v: vec4<f32>, d: f32) -> vec4<i32> {
    if (d > 0.0) {
        return vec4<i32>(clamp(round(v / d), vec4<f32>(-127.0), vec4<f32>(127.0)));
    }
    return vec4<i32>(0);
}

fn absmax4(v: vec4<f32>) -> f32 {
    let a = abs(v);
    return max(max(a.x, a.y), max(a.z, a.w));
}

// Words 2j and 2j+1 of a block from the levels of values 8j..8j+3 (a) and 8j+4..8j+7 (c).
fn q8_pack_pair(a: vec4<i32>, c: vec4<i32>) -> vec2<u32> {
    return vec2<u32>(pack4xI8(vec4<i32>(a.x, a.z, c.x, c.z)), pack4xI8(vec4<i32>(a.y, a.w, c.y, c.w)));
}

fn quantize32(v: array<vec4<f32>, 8>) -> Q8Block {
    var absmax = 0.0;
    for (var i = 0u; i < 8u; i++) {
        absmax = max(absmax, absmax4(v[i]));
    }
    let d = q8_scale(absmax);
    var w: array<vec2<u32>, 4>;
    var total = 0;
    for (var j = 0u; j < 4u; j++) {
        let a = q8_levels(v[2u * j], d);
        let c = q8_levels(v[2u * j + 1u], d);
        let t = a + c;
        total += t.x + t.y + t.z + t.w;
        w[j] = q8_pack_pair(a, c);
    }
    return Q8Block(vec4<u32>(w[0], w[1]), vec4<u32>(w[2], w[3]), d, d * f32(total));
}
