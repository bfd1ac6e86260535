//! RoPE on q and k, and the KV-cache write, fused: one dispatch per layer.
//!
//! Input row t (t < n_tokens) of the fused QKV projection: [q (n_heads * hd) | k (n_kv_heads * hd) |
//! v (n_kv_heads * hd)]. Rotation is Hugging Face rotate_half: element e < hd/2 pairs with
//! e + hd/2, rotated by angle = position * inv_freq[e mod hd/2] (the product rounded to f32, as
//! the CPU reference does).
//!   q' -> q_out [m_max, n_heads * hd] (f32);
//!   k', v -> K/V cache of the layer, f16 packed two per u32 (pack2x16float(x[2i], x[2i+1])),
//!            word index (kv_head * ctx + position) * (hd/2) + i, at position step.pos + t;
//!            positions at or past ctx are never written.
//! The angle's cos and sin: rope_angle.wgsl (the wrapper puts it first; gemv_q4_q8 shares it).
//! Which rows are live and where each goes (the wrapper puts one of two first): a prompt chunk's
//! or a decode step's rows t < step.n_tokens at positions step.pos + t; a batched decode step's
//! rows (batch_step.wgsl) each at its own position, in its sequence's region of the caches.
//! Thread mapping: workgroup id y = token t; x covers the (n_heads + 2 * n_kv_heads) * hd/2 words of
//! a row; a thread produces the two elements (2i, 2i+1) of one head that share a cache word.

const WG: u32 = 64u;

struct Params {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    ctx: u32,
}

@group(0) @binding(0) var<storage, read> qkv: array<f32>;
@group(0) @binding(1) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(2) var<storage, read_write> q_out: array<f32>;
@group(0) @binding(3) var<storage, read_write> k_cache: array<u32>;
@group(0) @binding(4) var<storage, read_write> v_cache: array<u32>;
@group(0) @binding(5) var<uniform> params: Params;

// Element e of the rotated head whose first element is at `base` of qkv.
fn rotated(base: u32, e: u32, position: f32) -> f32 {
    let half = params.head_dim / 2u;
    let i = e % half;
    let cs = cos_sin(position * inv_freq[i]);
    let x = qkv[base + e];
    if e < half {
        return x * cs.x - qkv[base + e + half] * cs.y;
    }
    return x * cs.x + qkv[base + i] * cs.y;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.y;
    let half = params.head_dim / 2u;
    let nh = params.n_heads;
    let nkv = params.n_kv_heads;
    let j = wid.x * WG + lid;
    if t >= live_rows() || j >= (nh + 2u * nkv) * half {
        return;
    }
    let head = j / half;
    let w = j - head * half;
    let q_dim = nh * params.head_dim;
    let row = t * (q_dim + 2u * nkv * params.head_dim);
    let base = row + head * params.head_dim;
    let pos = row_pos(t);
    // The first cache row of this row's sequence.
    let first = row_cache(t, nkv);
    let e = 2u * w;
    if head < nh {
        let out = t * q_dim + head * params.head_dim + e;
        q_out[out] = rotated(base, e, f32(pos));
        q_out[out + 1u] = rotated(base, e + 1u, f32(pos));
        return;
    }
    if pos >= params.ctx {
        return;
    }
    if head < nh + nkv {
        let kvh = head - nh;
        let word = (first + kvh * params.ctx + pos) * half + w;
        k_cache[word] = pack2x16float(vec2<f32>(rotated(base, e, f32(pos)), rotated(base, e + 1u, f32(pos))));
    } else {
        let kvh = head - nh - nkv;
        let word = (first + kvh * params.ctx + pos) * half + w;
        v_cache[word] = pack2x16float(vec2<f32>(qkv[base + e], qkv[base + e + 1u]));
    }
}
