// gemv_q4_q8's RoPE + KV-cache output for the decode step's fused qkv projection (one token), in
// place of the qkv store and rope_kv.wgsl's dispatch. Rows of the projection: [q (n_heads * hd) |
// k (n_kv_heads * hd) | v (n_kv_heads * hd)]. Workgroup u takes, in head h = u / (hd / 4) with
// w = u % (hd / 4), the four rows 2w, 2w + 1, hd/2 + 2w, hd/2 + 2w + 1 of the head: two RoPE pairs
// (rotate_half pairs e with e + hd/2) whose results fill two whole f16 pairs of the cache.
// The rotation is rope_kv.wgsl's, operation for operation (rope_angle.wgsl's cos_sin):
//   q' -> q_out[h * hd + e] (f32); k', v -> K/V cache word (kv_head * ctx + pos) * hd/2 + e/2
//   (f16 pairs), at position step.pos, not written at or past ctx.
// Needs ROWS = 4, hd a multiple of 4, and the whole projection in one row range.

struct Rope {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    ctx: u32,
}

struct Step {
    pos: u32,
    n_tokens: u32,
    kv_len: u32,
    pad: u32,
}

@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(9) var<uniform> rope: Rope;
@group(0) @binding(10) var<uniform> step: Step;
@group(0) @binding(11) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(12) var<storage, read_write> q_out: array<f32>;
@group(0) @binding(13) var<storage, read_write> k_cache: array<u32>;
@group(0) @binding(14) var<storage, read_write> v_cache: array<u32>;

var<workgroup> four: array<f32, 4>;

fn out_units() -> u32 {
    return (rope.n_heads + 2u * rope.n_kv_heads) * (rope.head_dim / 4u);
}

fn out_row(unit: u32, r: u32) -> u32 {
    let quads = rope.head_dim / 4u;
    let head = unit / quads;
    let w = unit - head * quads;
    return head * rope.head_dim + (r / 2u) * (rope.head_dim / 2u) + 2u * w + (r % 2u);
}

// `total` is row `lid`'s sum in threads lid < 4; thread 0 rotates and writes all four.
// (One column: the rope + kv output is not batched.)
fn write_out(unit: u32, col: u32, live: bool, total: f32, lid: u32) {
    if (lid < 4u) {
        var v = total;
        if (p.has_bias != 0u) {
            v += bias[out_row(unit, lid)];
        }
        four[lid] = v;
    }
    workgroupBarrier();
    if (lid != 0u) {
        return;
    }
    let hd = rope.head_dim;
    let half = hd / 2u;
    let quads = hd / 4u;
    let head = unit / quads;
    let w = unit - head * quads;
    let nh = rope.n_heads;
    let nkv = rope.n_kv_heads;
    let pos = step.pos;
    // Elements 2w, 2w + 1 (a) and their partners hd/2 + 2w, hd/2 + 2w + 1 (b).
    let a = vec2<f32>(four[0], four[1]);
    let b = vec2<f32>(four[2], four[3]);
    if (head >= nh + nkv) {
        if (pos < rope.ctx) {
            let word = ((head - nh - nkv) * rope.ctx + pos) * half + w;
            v_cache[word] = pack2x16float(a);
            v_cache[word + quads] = pack2x16float(b);
        }
        return;
    }
    let position = f32(pos);
    let c0 = cos_sin(position * inv_freq[2u * w]);
    let c1 = cos_sin(position * inv_freq[2u * w + 1u]);
    let ra = vec2<f32>(a.x * c0.x - b.x * c0.y, a.y * c1.x - b.y * c1.y);
    let rb = vec2<f32>(b.x * c0.x + a.x * c0.y, b.y * c1.x + a.y * c1.y);
    if (head < nh) {
        let out = head * hd + 2u * w;
        q_out[out] = ra.x;
        q_out[out + 1u] = ra.y;
        q_out[out + half] = rb.x;
        q_out[out + half + 1u] = rb.y;
    } else if (pos < rope.ctx) {
        let word = ((head - nh) * rope.ctx + pos) * half + w;
        k_cache[word] = pack2x16float(ra);
        k_cache[word + quads] = pack2x16float(rb);
    }
}
