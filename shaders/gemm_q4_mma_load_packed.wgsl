// gemm_q4_mma's loader for packed operands (TileOpts::packed): X as f16 that the `main_packed`
// entry point of shaders/gemm_q4_x16.wgsl wrote in groups of 8 ordered [x0, x4, x1, x5, x2, x6,
// x3, x7], and W read 32 weights (16 bytes) at a time and dequantized into the same order. Every
// global load is 16 bytes and every item goes to the tiles as 16 consecutive bytes. A product
// sums over k, so an order within each group of 8 that X and W share does not change what it
// sums (only the order of the additions).
//
// Dequantization as the f32 loader's: a nibble n or-ed into the f32 2^23 reads as 2^23 + n,
// minus 2^23 + 8 the level exactly, times the scale exact in f32, rounded once to f16; the same
// f16 as that loader's. X arrives as u32 words, each a pair of f16 turned back into vec2<f16>
// through f32 (exact): naga 30 cannot bitcast u32 to vec2<f16>, and X read as mat2x4<f16> ran
// the tile at half speed on the H200, as did nibbles converted to f16 with one f16 fma per pair
// (benchmarks/NOTES.md §21).

// 16-byte groups of X per token and step; 16-byte quarters (32 weights) of a W row per step.
const XV: u32 = BK / 8u;
const WQ: u32 = BK / 32u;
const X_ITEMS: u32 = (BM * XV + WG - 1u) / WG;
const W_ITEMS: u32 = (BN * WQ + WG - 1u) / WG;

@group(0) @binding(2) var<storage, read> qw: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> x: array<vec4<u32>>;

// The registers one thread carries from the global loads of a K step to its stores.
struct Loaded {
    x: array<vec4<u32>, X_ITEMS>,
    w: array<vec4<u32>, W_ITEMS>,
    s: array<f32, W_ITEMS>,
}

// X item e of a step: its token row and its group along the step. The 8 lanes whose 16-byte
// stores share a cycle (128 bytes: all 32 banks) hold 8 consecutive rows, 80 or 144 bytes apart.
fn x_row(e: u32) -> u32 {
    return (e / (8u * XV)) * 8u + e % 8u;
}

fn x_group(e: u32) -> u32 {
    return (e / 8u) % XV;
}

// Global loads of the K step at k0: zeros for tokens past m_count and k past K; for rows past n
// the level 0 and scale 0.
fn load_step(k0: u32, m0: u32, n0: u32, m_count: u32, lid: u32) -> Loaded {
    var r: Loaded;
    // ABLATE (bench only, see TileOpts::ablate): bit 1 skips the loads after a slice's first.
    if ((ABLATE & 1u) != 0u && k0 % p.k_split != 0u) {
        return r;
    }
    let k8 = (p.k + 7u) / 8u;
    for (var it = 0u; it < X_ITEMS; it++) {
        let e = lid + it * WG;
        let m = m0 + x_row(e);
        let g = k0 / 8u + x_group(e);
        var v = vec4<u32>();
        if (e < BM * XV && m < m_count && g < k8) {
            v = x[m * k8 + g];
        }
        r.x[it] = v;
    }
    for (var it = 0u; it < W_ITEMS; it++) {
        let e = lid + it * WG;
        let row = n0 + e % BN;
        var w = vec4<u32>(0x88888888u);
        var s = 0.0;
        if (e < BN * WQ && row < p.n) {
            w = qw[row * p.bpr * 4u + k0 / 32u + e / BN];
            s = scale(row * p.bpr + k0 / 128u);
        }
        r.w[it] = w;
        r.s[it] = s;
    }
    return r;
}

// The 8 weights of word w times scale s, as the pairs (j, j + 4) for j = 0..3.
fn dequant8(w: u32, s: f32) -> array<vec2<f16>, 4> {
    // Nibble j in bits 0..3 and nibble j + 4 in bits 16..19 of lane j.
    let t = vec4<u32>(w) >> vec4<u32>(0u, 4u, 8u, 12u);
    let m = vec4<u32>(0xFu);
    let f = vec4<u32>(0x4b000000u);
    let lo = (bitcast<vec4<f32>>((t & m) | f) - vec4<f32>(8388616.0)) * s;
    let hi = (bitcast<vec4<f32>>(((t >> vec4<u32>(16u)) & m) | f) - vec4<f32>(8388616.0)) * s;
    return array<vec2<f16>, 4>(
        vec2<f16>(vec2<f32>(lo.x, hi.x)),
        vec2<f16>(vec2<f32>(lo.y, hi.y)),
        vec2<f16>(vec2<f32>(lo.z, hi.z)),
        vec2<f16>(vec2<f32>(lo.w, hi.w)),
    );
}

// Writes one step's registers to the workgroup tiles, copy `buf`: each item's 16 bytes at once.
fn store_step(r: Loaded, lid: u32, buf: u32) {
    // ABLATE bit 2 (bench only): no stores, the tiles keep whatever they held.
    if ((ABLATE & 2u) != 0u) {
        return;
    }
    let xb = buf * BM * AS2;
    let wb = buf * BN * AS2;
    for (var it = 0u; it < X_ITEMS; it++) {
        let e = lid + it * WG;
        if (e < BM * XV) {
            let at = xb + x_row(e) * AS2 + x_group(e) * 4u;
            let v = r.x[it];
            xs[at] = vec2<f16>(unpack2x16float(v.x));
            xs[at + 1u] = vec2<f16>(unpack2x16float(v.y));
            xs[at + 2u] = vec2<f16>(unpack2x16float(v.z));
            xs[at + 3u] = vec2<f16>(unpack2x16float(v.w));
        }
    }
    for (var it = 0u; it < W_ITEMS; it++) {
        let e = lid + it * WG;
        if (e < BN * WQ) {
            // Consecutive lanes hold consecutive rows: 8 of them fill the 32 banks.
            let at = wb + (e % BN) * AS2 + (e / BN) * 16u;
            let s = r.s[it];
            for (var j = 0u; j < 4u; j++) {
                let d = dequant8(r.w[it][j], s);
                put_w_pairs(at + 4u * j, d);
            }
        }
    }
}

// Four pairs of W to consecutive slots of the W tile from `at`.
fn put_w_pairs(at: u32, d: array<vec2<f16>, 4>) {
    ws[at] = d[0];
    ws[at + 1u] = d[1];
    ws[at + 2u] = d[2];
    ws[at + 3u] = d[3];
}
