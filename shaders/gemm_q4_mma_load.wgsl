// gemm_q4_mma's K-step loads and workgroup-tile stores for X in f32 or as f16 pairs (the XElem the
// wrapper defines) and W as the stored u32 words: per step a thread loads X_ITEMS pairs of X and
// W_ITEMS words of W (with their rows' scales) into registers (`load_step`), then converts X to
// f16 and dequantizes W (in f32, exact, rounded once to f16) into the tiles (`store_step`).

// Groups of 4 pairs of X along one row of a step.
const XG: u32 = BK / 8u;
// Per thread and K step: pairs of X (two f32 of one token), words of W.
const X_ITEMS: u32 = (BM * (BK / 2u) + WG - 1u) / WG;
const W_ITEMS: u32 = (BN * (BK / 8u) + WG - 1u) / WG;

@group(0) @binding(2) var<storage, read> qw: array<u32>;
@group(0) @binding(4) var<storage, read> x: array<XElem>;

// The registers one thread carries from the global loads of a K step to its stores.
struct Loaded {
    x: array<XElem, X_ITEMS>,
    w: array<u32, W_ITEMS>,
    s: array<f32, W_ITEMS>,
}

// X pair e of a step: token row (8 rows per 32 items, so one store instruction of a subgroup
// covers 8 rows x 16 bytes: 32 banks), and its index (in pairs) along the step.
fn x_row(e: u32) -> u32 {
    return (e / (32u * XG)) * 8u + (e / 4u) % 8u;
}

fn x_pair(e: u32) -> u32 {
    return ((e / 32u) % XG) * 4u + e % 4u;
}

// Global loads of the K step at k0: zeros for tokens past m_count, k past K, rows past n.
fn load_step(k0: u32, m0: u32, n0: u32, m_count: u32, lid: u32) -> Loaded {
    var r: Loaded;
    // ABLATE (bench only, see TileOpts::ablate): bit 1 skips the loads after a slice's first
    // (the dequantization of the constant words that remain then folds away too).
    if ((ABLATE & 1u) != 0u && k0 % p.k_split != 0u) {
        return r;
    }
    let k2 = p.k / 2u;
    for (var it = 0u; it < X_ITEMS; it++) {
        let e = lid + it * WG;
        let m = m0 + x_row(e);
        let kp = k0 / 2u + x_pair(e);
        var v = XElem();
        if (e < BM * (BK / 2u) && m < m_count && kp < k2) {
            v = x[m * k2 + kp];
        }
        r.x[it] = v;
    }
    for (var it = 0u; it < W_ITEMS; it++) {
        let e = lid + it * WG;
        let row = n0 + e / (BK / 8u);
        var w = 0x88888888u;
        var s = 0.0;
        if (e < BN * (BK / 8u) && row < p.n) {
            w = qw[row * p.bpr * 16u + k0 / 8u + e % (BK / 8u)];
            s = scale(row * p.bpr + k0 / 128u);
        }
        r.w[it] = w;
        r.s[it] = s;
    }
    return r;
}

// Writes one step's registers to the workgroup tiles (X as f16, W dequantized), copy `buf`.
fn store_step(r: Loaded, lid: u32, buf: u32) {
    // ABLATE bit 2 (bench only): no stores, the tiles keep whatever they held.
    if ((ABLATE & 2u) != 0u) {
        return;
    }
    let xb = buf * BM * AS2;
    let wb = buf * BN * AS2;
    for (var it = 0u; it < X_ITEMS; it++) {
        let e = lid + it * WG;
        if (e < BM * (BK / 2u)) {
            xs[xb + x_row(e) * AS2 + x_pair(e)] = x_to_f16(r.x[it]);
        }
    }
    for (var it = 0u; it < W_ITEMS; it++) {
        let e = lid + it * WG;
        if (e < BN * (BK / 8u)) {
            // Word g of the row holds pairs 4 g .. 4 g + 3; a thread writes them rotated by g
            // (the shift is per thread) so the lanes of one store hit 32 different banks.
            let g = e % (BK / 8u);
            let base = wb + (e / (BK / 8u)) * AS2 + g * 4u;
            for (var j = 0u; j < 4u; j++) {
                let q = (j + g) & 3u;
                let b = vec2<u32>(r.w[it] >> (8u * q), r.w[it] >> (8u * q + 4u));
                // 0x4b000000 | n is the f32 2^23 + n: the level n - 8 without a conversion.
                let v = bitcast<vec2<f32>>((b & vec2<u32>(0xfu)) | vec2<u32>(0x4b000000u));
                ws[base + q] = vec2<f16>((v - vec2<f32>(8388616.0)) * r.s[it]);
            }
        }
    }
}

