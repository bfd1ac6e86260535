// RoPE's (cos, sin) of position * inv_freq, shared by rope_kv.wgsl and gemv_q4_q8_out_rope_kv.wgsl
// so that both rotate exactly alike.

// 2π as a Cody-Waite pair: C1 has 8 significant bits, so k * C1 is exact for k < 2^16.
const TWO_PI_HI: f32 = 6.28125;
const TWO_PI_LO: f32 = 0.0019353071795864769;
const INV_TWO_PI: f32 = 0.15915494309189535;

// (cos, sin) of an angle up to ~4e5 rad: reduce to [-π, π] first, since GPU sin/cos are only
// accurate there.
fn cos_sin(angle: f32) -> vec2<f32> {
    // The select keeps `angle` a rounded f32: without it a compiler may fuse the product that made
    // it into the subtraction below (an fma), which is more exact than the f32 reference.
    let a = select(angle, 0.0, bitcast<u32>(angle) == 0xffffffffu);
    let k = round(a * INV_TWO_PI);
    let r = (a - k * TWO_PI_HI) - k * TWO_PI_LO;
    return vec2<f32>(cos(r), sin(r));
}
