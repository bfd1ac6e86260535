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

fn quantize32(v: array<vec4<f32>, 8>) -> Q8Block {
    var absmax = 0.0;
    for (var i = 0u; i < 8u; i++) {
        let a = abs(v[i]);
        absmax = max(absmax, max(max(a.x, a.y), max(a.z, a.w)));
    }
    // Division as the spec has it (a GPU's may be off by an ulp or two: a value within that of a
    // rounding tie may then round the other way; the tests allow for it).
    let d = absmax / 127.0;
    var q: array<vec4<i32>, 8>;
    var total = 0;
    for (var i = 0u; i < 8u; i++) {
        var l = vec4<i32>(0);
        if (d > 0.0) {
            l = vec4<i32>(clamp(round(v[i] / d), vec4<f32>(-127.0), vec4<f32>(127.0)));
        }
        q[i] = l;
        total += l.x + l.y + l.z + l.w;
    }
    var w: array<u32, 8>;
    for (var j = 0u; j < 4u; j++) {
        let a = q[2u * j];
        let c = q[2u * j + 1u];
        w[2u * j] = pack4xI8(vec4<i32>(a.x, a.z, c.x, c.z));
        w[2u * j + 1u] = pack4xI8(vec4<i32>(a.y, a.w, c.y, c.w));
    }
    return Q8Block(vec4<u32>(w[0], w[1], w[2], w[3]), vec4<u32>(w[4], w[5], w[6], w[7]), d, d * f32(total));
}
