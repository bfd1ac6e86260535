// Attention over the f16 KV cache: softmax(q·kᵀ / sqrt(HD)) · v, causal, grouped-query.
//
// Layouts (shared with the RoPE / KV-write kernel):
//   q, out    [m_max, n_heads * HD] f32; token t of the step sits at position step.pos + t.
//   k_cache, v_cache: f16 pairs packed in u32 (pack2x16float); word
//             (kvh * ctx + position) * (HD / 2) + i. Positions 0..step.kv_len are filled.
//   Query head h reads KV head h / group. Softmax in f32 with a running max (online softmax).
//
// Entry points:
//   decode_partial  one token, flash-decoding. Workgroup (KV head × head batch, split) covers a
//                   chunk of positions for up to 8 query heads of one KV group, so each K/V row is
//                   loaded once for all of them; heads are vec4 lanes (two quads), so per-thread
//                   state needs no arrays. Tiles of 64 positions: one thread per position scores it
//                   for every head (q in workgroup memory), then each thread accumulates 8 output
//                   dims for every head over a strided subset of the tile's positions. Writes the
//                   split's running max m, sum l and unnormalised output to scratch.
//   decode_combine  one workgroup per query head: rescales the splits to a common max and divides;
//                   threads split the splits between them (tree reductions for max and sum).
//   prefill         a chunk of tokens. Workgroup = 32 (token, head) rows of one KV group; tiles of
//                   BK keys are unpacked once into workgroup memory and used by all 32 rows.
//                   Per tile: scores (thread: 4 rows × BK/16 keys), online softmax (4 threads per
//                   row), then P·V (thread: HD/32 rows × 8 dims).

struct Step {
    pos: u32,
    n_tokens: u32,
    kv_len: u32,
    _pad: u32,
}

struct Params {
    n_heads: u32,
    n_kv_heads: u32,
    // Query heads per KV head.
    group: u32,
    // Positions per KV head in the cache.
    ctx: u32,
    // Decode: splits of the sequence bound at bind time (the dispatch's y size).
    max_splits: u32,
    // Decode: workgroups per KV head, each for up to GB query heads.
    head_batches: u32,
    // Most tokens per step (rows of q and out).
    m_max: u32,
    _pad1: u32,
}

// Head dimension: 32, 64 or 128.
override HD: u32 = 128u;
// Decode: query heads handled by one workgroup (1 to 8).
override GB: u32 = 1u;
// Prefill: keys per tile (16 or 32, chosen from the workgroup memory limit).
override BK: u32 = 32u;

// A finite stand-in for -infinity: exp(NEG - m) is 0, and NEG - NEG is not NaN.
const NEG: f32 = -3.0e38;
// Decode: positions per tile = threads per workgroup.
const DEC_TILE: u32 = 64u;
// Decode combine: threads per workgroup, most splits (the bind-time bound never exceeds it).
const CB_THREADS: u32 = 256u;
const MAX_SPLITS: u32 = 512u;
// Prefill: (token, head) rows per workgroup, threads per workgroup.
const PF_ROWS: u32 = 32u;
const PF_THREADS: u32 = 128u;
// Row stride of the prefill probability tile (odd: conflict-free column reads).
const P_STRIDE: u32 = 33u;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> k_cache: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> v_cache: array<vec4<u32>>;
// Decode scratch: per (query head, split), HD/4 vec4 of unnormalised output and (m, l).
@group(0) @binding(5) var<storage, read_write> part_o: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> part_ml: array<vec2<f32>>;
@group(0) @binding(7) var<storage, read_write> out: array<vec4<f32>>;

// Eight f16 values (four packed words) as two vec4<f32>: dims 0..3 and 4..7.
fn unpack_lo(w: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}

fn unpack_hi(w: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w));
}

// Positions per decode split: the splits bound at bind time cover kv_len in whole tiles.
// Both decode passes derive the same split layout from it.
fn decode_chunk(kv_len: u32) -> u32 {
    let per_split = (kv_len + params.max_splits - 1u) / params.max_splits;
    return max(DEC_TILE, (per_split + DEC_TILE - 1u) / DEC_TILE * DEC_TILE);
}

// Query head quads per decode workgroup: heads are handled four at a time as vec4 lanes.
override NQ: u32 = (GB + 3u) / 4u;

var<workgroup> dq_s: array<vec4<f32>, NQ * HD>;
// Scores, then probabilities, of the tile: [position][quad].
var<workgroup> de_s: array<vec4<f32>, 2u * DEC_TILE>;
var<workgroup> dmax_s: array<vec4<f32>, 32u>;
// Each thread's accumulators for the phase sum: [thread][head][dims 0..3, 4..7].
var<workgroup> dsum_o: array<vec4<f32>, 16u * DEC_TILE>;
var<workgroup> dsum_l: array<vec4<f32>, 2u * DEC_TILE>;

// Score of query head j (of the batch) against eight key dims 8w..8w+8.
fn qk(j: u32, w: u32, ka: vec4<f32>, kb: vec4<f32>) -> f32 {
    let base = j * (HD / 4u) + 2u * w;
    return dot(dq_s[base], ka) + dot(dq_s[base + 1u], kb);
}

// Accumulates probability e (one lane per head) times eight value dims into two matrices whose
// column j holds head j's dims 0..3 (a) and 4..7 (b).
fn accumulate(a: ptr<function, mat4x4<f32>>, b: ptr<function, mat4x4<f32>>, e: vec4<f32>, va: vec4<f32>, vb: vec4<f32>) {
    *a += mat4x4<f32>(va * e.x, va * e.y, va * e.z, va * e.w);
    *b += mat4x4<f32>(vb * e.x, vb * e.y, vb * e.z, vb * e.w);
}

fn rescale(m: mat4x4<f32>, f: vec4<f32>) -> mat4x4<f32> {
    return mat4x4<f32>(m[0] * f.x, m[1] * f.y, m[2] * f.z, m[3] * f.w);
}

@compute @workgroup_size(64)
fn decode_partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let kv_len = min(step.kv_len, params.ctx);
    let chunk = decode_chunk(kv_len);
    let split = wid.y;
    let start = split * chunk;
    if start >= kv_len {
        return;
    }
    let end = min(start + chunk, kv_len);
    let kvh = wid.x / params.head_batches;
    let batch = wid.x % params.head_batches;
    let head0 = kvh * params.group + batch * GB;
    let n_here = min(GB, params.group - batch * GB);
    let hd4 = HD / 4u;
    let hd8 = HD / 8u;
    let scale = inverseSqrt(f32(HD));

    // Queries of the batch, pre-scaled; padding heads are 0 and never written out.
    for (var it = 0u; it < (NQ * HD + DEC_TILE - 1u) / DEC_TILE; it++) {
        let idx = it * DEC_TILE + lid;
        let j = idx / hd4;
        if idx < NQ * HD {
            var qv = vec4<f32>(0.0);
            if j < n_here {
                qv = q[(head0 + j) * hd4 + idx % hd4] * scale;
            }
            dq_s[idx] = qv;
        }
    }

    // P·V mapping: thread owns dims 8*dgi..8*dgi+8 over positions ph, ph + nph, ... of a tile.
    let dgi = lid % hd8;
    let ph = lid / hd8;
    let nph = DEC_TILE / hd8;
    var m_lo = vec4<f32>(NEG);
    var m_hi = vec4<f32>(NEG);
    var l_lo = vec4<f32>(0.0);
    var l_hi = vec4<f32>(0.0);
    var a_lo = mat4x4<f32>();
    var b_lo = mat4x4<f32>();
    var a_hi = mat4x4<f32>();
    var b_hi = mat4x4<f32>();
    workgroupBarrier();

    for (var t0 = start; t0 < end; t0 += DEC_TILE) {
        // Scores of this thread's position (clamped to a valid row, masked below) for every head.
        let p = t0 + lid;
        let krow = (kvh * params.ctx + min(p, end - 1u)) * hd8;
        var s_lo = vec4<f32>(0.0);
        var s_hi = vec4<f32>(0.0);
        for (var w = 0u; w < hd8; w++) {
            let kw = k_cache[krow + w];
            let ka = unpack_lo(kw);
            let kb = unpack_hi(kw);
            s_lo += vec4<f32>(qk(0u, w, ka, kb), qk(1u, w, ka, kb), qk(2u, w, ka, kb), qk(3u, w, ka, kb));
            if NQ > 1u {
                s_hi += vec4<f32>(qk(4u, w, ka, kb), qk(5u, w, ka, kb), qk(6u, w, ka, kb), qk(7u, w, ka, kb));
            }
        }
        if p >= end {
            s_lo = vec4<f32>(NEG);
            s_hi = vec4<f32>(NEG);
        }
        de_s[2u * lid] = s_lo;
        de_s[2u * lid + 1u] = s_hi;
        workgroupBarrier();

        // Tile max per head: thread (quad, part) over four positions, then all threads over parts.
        if lid < 32u {
            let quad = lid / 16u;
            let p4 = (lid % 16u) * 4u;
            dmax_s[lid] = max(max(de_s[2u * p4 + quad], de_s[2u * (p4 + 1u) + quad]), max(de_s[2u * (p4 + 2u) + quad], de_s[2u * (p4 + 3u) + quad]));
        }
        workgroupBarrier();
        var t_lo = vec4<f32>(NEG);
        var t_hi = vec4<f32>(NEG);
        for (var i = 0u; i < 16u; i++) {
            t_lo = max(t_lo, dmax_s[i]);
            t_hi = max(t_hi, dmax_s[16u + i]);
        }
        let mn_lo = max(m_lo, t_lo);
        let mn_hi = max(m_hi, t_hi);
        let f_lo = exp(m_lo - mn_lo);
        let f_hi = exp(m_hi - mn_hi);
        m_lo = mn_lo;
        m_hi = mn_hi;
        de_s[2u * lid] = exp(s_lo - m_lo);
        de_s[2u * lid + 1u] = exp(s_hi - m_hi);
        workgroupBarrier();

        a_lo = rescale(a_lo, f_lo);
        b_lo = rescale(b_lo, f_lo);
        l_lo *= f_lo;
        if NQ > 1u {
            a_hi = rescale(a_hi, f_hi);
            b_hi = rescale(b_hi, f_hi);
            l_hi *= f_hi;
        }
        let vbase = kvh * params.ctx * hd8 + dgi;
        for (var i = 0u; i < hd8; i++) {
            let pp = ph + i * nph;
            let vw = v_cache[vbase + min(t0 + pp, end - 1u) * hd8];
            let va = unpack_lo(vw);
            let vb = unpack_hi(vw);
            let e_lo = de_s[2u * pp];
            accumulate(&a_lo, &b_lo, e_lo, va, vb);
            l_lo += e_lo;
            if NQ > 1u {
                let e_hi = de_s[2u * pp + 1u];
                accumulate(&a_hi, &b_hi, e_hi, va, vb);
                l_hi += e_hi;
            }
        }
        workgroupBarrier();
    }

    // Sum the position phases and write the split's partial result per head.
    for (var c = 0u; c < 4u; c++) {
        dsum_o[16u * lid + 2u * c] = a_lo[c];
        dsum_o[16u * lid + 2u * c + 1u] = b_lo[c];
        dsum_o[16u * lid + 8u + 2u * c] = a_hi[c];
        dsum_o[16u * lid + 9u + 2u * c] = b_hi[c];
    }
    dsum_l[2u * lid] = l_lo;
    dsum_l[2u * lid + 1u] = l_hi;
    workgroupBarrier();
    for (var idx = lid; idx < GB * hd8; idx += DEC_TILE) {
        let j = idx / hd8;
        let d = idx % hd8;
        if j < n_here {
            var oa = vec4<f32>(0.0);
            var ob = vec4<f32>(0.0);
            var ll = 0.0;
            for (var k = 0u; k < nph; k++) {
                let t = k * hd8 + d;
                oa += dsum_o[16u * t + 2u * j];
                ob += dsum_o[16u * t + 2u * j + 1u];
                ll += dsum_l[2u * k * hd8 + j / 4u][j % 4u];
            }
            let slot = (head0 + j) * params.max_splits + split;
            part_o[slot * hd4 + 2u * d] = oa;
            part_o[slot * hd4 + 2u * d + 1u] = ob;
            if d == 0u {
                part_ml[slot] = vec2<f32>(select(m_hi[j % 4u], m_lo[j % 4u], j < 4u), ll);
            }
        }
    }
}

var<workgroup> cb_red: array<f32, CB_THREADS>;
var<workgroup> cb_w: array<f32, MAX_SPLITS>;
var<workgroup> cb_o: array<vec4<f32>, CB_THREADS>;

// Tree sum or max of cb_red over the workgroup; every thread gets the result.
fn combine_reduce(lid: u32, v: f32, is_max: bool) -> f32 {
    cb_red[lid] = v;
    workgroupBarrier();
    for (var width = CB_THREADS / 2u; width > 0u; width /= 2u) {
        if lid < width {
            let other = cb_red[lid + width];
            cb_red[lid] = select(cb_red[lid] + other, max(cb_red[lid], other), is_max);
        }
        workgroupBarrier();
    }
    let r = cb_red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(256)
fn decode_combine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let hd4 = HD / 4u;
    let head = wid.x;
    let kv_len = min(step.kv_len, params.ctx);
    let chunk = decode_chunk(kv_len);
    let n_splits = (kv_len + chunk - 1u) / chunk;
    let first = head * params.max_splits;

    var mx = NEG;
    for (var s = lid; s < n_splits; s += CB_THREADS) {
        mx = max(mx, part_ml[first + s].x);
    }
    let m_all = combine_reduce(lid, mx, true);
    var lsum = 0.0;
    for (var s = lid; s < n_splits; s += CB_THREADS) {
        let ml = part_ml[first + s];
        let w = exp(ml.x - m_all);
        cb_w[s] = w;
        lsum += w * ml.y;
    }
    let l_all = combine_reduce(lid, lsum, false);

    // Thread (split group sg, vec4 w4) sums splits sg, sg + nsg, ...; four loads in flight per step.
    let w4 = lid % hd4;
    let sg = lid / hd4;
    let nsg = CB_THREADS / hd4;
    var o = vec4<f32>(0.0);
    for (var s0 = sg; s0 < n_splits; s0 += 4u * nsg) {
        var part: array<vec4<f32>, 4>;
        for (var u = 0u; u < 4u; u++) {
            part[u] = part_o[(first + min(s0 + u * nsg, n_splits - 1u)) * hd4 + w4];
        }
        for (var u = 0u; u < 4u; u++) {
            if s0 + u * nsg < n_splits {
                o += cb_w[s0 + u * nsg] * part[u];
            }
        }
    }
    cb_o[lid] = o;
    workgroupBarrier();
    if sg == 0u {
        var total = vec4<f32>(0.0);
        for (var g = 0u; g < nsg; g++) {
            total += cb_o[g * hd4 + w4];
        }
        out[head * hd4 + w4] = total / l_all;
    }
}

// Prefill tiles. Rows of pq_s / pkv_s are padded by one vec4 so that threads reading different
// rows at the same column hit different banks.
var<workgroup> pq_s: array<vec4<f32>, PF_ROWS * (HD / 4u + 1u)>;
var<workgroup> pkv_s: array<vec4<f32>, BK * (HD / 4u + 1u)>;
// Scores, then probabilities: [key][row].
var<workgroup> pp_s: array<f32, BK * P_STRIDE>;
var<workgroup> pmax_s: array<f32, PF_THREADS>;
var<workgroup> psum_s: array<f32, PF_THREADS>;
var<workgroup> row_m: array<f32, PF_ROWS>;
var<workgroup> row_l: array<f32, PF_ROWS>;
var<workgroup> row_f: array<f32, PF_ROWS>;

// Position of flattened row rg = token * group + head_in_group; rows past the step's tokens
// take the last token's position, so every row sees position 0 and its max stays finite.
fn row_position(rg: u32) -> u32 {
    return step.pos + min(rg / params.group, prefill_tokens() - 1u);
}

// The step's tokens, bounded by the bound rows and the cache (a bad step reads nothing outside).
fn prefill_tokens() -> u32 {
    return min(min(step.n_tokens, params.m_max), params.ctx - min(step.pos, params.ctx));
}

// A prefill K or V tile (BK positions from kt) in registers: word idx = it * PF_THREADS + lid of
// the tile. Positions past key_end are clamped to the last one: finite data whose scores are
// masked, so their probabilities are 0.
const TILE_LOADS: u32 = 4u;

fn load_tile(from_v: bool, kvh: u32, kt: u32, key_end: u32, lid: u32) -> array<vec4<u32>, TILE_LOADS> {
    let hd8 = HD / 8u;
    var r: array<vec4<u32>, TILE_LOADS>;
    for (var it = 0u; it < (BK * hd8 + PF_THREADS - 1u) / PF_THREADS; it++) {
        let idx = min(it * PF_THREADS + lid, BK * hd8 - 1u);
        let kp = min(kt + idx / hd8, key_end - 1u);
        let word = (kvh * params.ctx + kp) * hd8 + idx % hd8;
        if from_v {
            r[it] = v_cache[word];
        } else {
            r[it] = k_cache[word];
        }
    }
    return r;
}

fn store_tile(r: array<vec4<u32>, TILE_LOADS>, lid: u32) {
    let hd8 = HD / 8u;
    let s4 = HD / 4u + 1u;
    for (var it = 0u; it < (BK * hd8 + PF_THREADS - 1u) / PF_THREADS; it++) {
        let idx = it * PF_THREADS + lid;
        if idx < BK * hd8 {
            let c = idx / hd8;
            pkv_s[c * s4 + 2u * (idx % hd8)] = unpack_lo(r[it]);
            pkv_s[c * s4 + 2u * (idx % hd8) + 1u] = unpack_hi(r[it]);
        }
    }
}

@compute @workgroup_size(128)
fn prefill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = params.group;
    let n_rows = prefill_tokens() * g;
    let r_base = wid.x * PF_ROWS;
    if r_base >= n_rows {
        return;
    }
    let kvh = wid.y;
    let hd4 = HD / 4u;
    let hd8 = HD / 8u;
    let s4 = hd4 + 1u;
    let scale = inverseSqrt(f32(HD));
    // Keys up to the last token of this block's rows.
    let key_end = row_position(min(r_base + PF_ROWS, n_rows) - 1u) + 1u;

    for (var it = 0u; it < PF_ROWS * hd4 / PF_THREADS; it++) {
        let idx = it * PF_THREADS + lid;
        let r = idx / hd4;
        let rg = r_base + r;
        var qv = vec4<f32>(0.0);
        if rg < n_rows {
            let h = kvh * g + rg % g;
            qv = q[((rg / g) * params.n_heads + h) * hd4 + idx % hd4] * scale;
        }
        pq_s[r * s4 + idx % hd4] = qv;
    }
    if lid < PF_ROWS {
        row_m[lid] = NEG;
        row_l[lid] = 0.0;
    }

    // Score mapping: rows 4*srg..4*srg+4, keys kg, kg + 16 (when BK = 32).
    let kg = lid % 16u;
    let srg = lid / 16u;
    var qpos: array<u32, 4>;
    for (var i = 0u; i < 4u; i++) {
        qpos[i] = row_position(r_base + srg * 4u + i);
    }
    // Softmax mapping: row sm_row, keys sm_part * BK/4 ...
    let sm_row = lid / 4u;
    let sm_part = lid % 4u;
    // P·V mapping: rows prg*rpt .. +rpt, dims 4*dg..4*dg+4 and 4*(dg+hd8)..+4.
    let dg = lid % hd8;
    let prg = lid / hd8;
    let rpt = HD / 32u;
    var acc: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        acc[i] = vec4<f32>(0.0);
    }

    var kreg = load_tile(false, kvh, 0u, key_end, lid);
    for (var kt = 0u; kt < key_end; kt += BK) {
        workgroupBarrier();
        store_tile(kreg, lid);
        // The V tile is in flight during the scores; the next K tile during softmax and P·V.
        let vreg = load_tile(true, kvh, kt, key_end, lid);
        workgroupBarrier();

        var s: array<vec4<f32>, 2>;
        for (var j = 0u; j < BK / 16u; j++) {
            s[j] = vec4<f32>(0.0);
        }
        for (var w = 0u; w < hd4; w++) {
            let q0 = pq_s[(srg * 4u) * s4 + w];
            let q1 = pq_s[(srg * 4u + 1u) * s4 + w];
            let q2 = pq_s[(srg * 4u + 2u) * s4 + w];
            let q3 = pq_s[(srg * 4u + 3u) * s4 + w];
            for (var j = 0u; j < BK / 16u; j++) {
                let kv = pkv_s[(kg + 16u * j) * s4 + w];
                s[j] += vec4<f32>(dot(q0, kv), dot(q1, kv), dot(q2, kv), dot(q3, kv));
            }
        }
        for (var j = 0u; j < BK / 16u; j++) {
            let c = kg + 16u * j;
            for (var i = 0u; i < 4u; i++) {
                var v = s[j][i];
                if kt + c > qpos[i] {
                    v = NEG;
                }
                pp_s[c * P_STRIDE + srg * 4u + i] = v;
            }
        }
        if kt + BK < key_end {
            kreg = load_tile(false, kvh, kt + BK, key_end, lid);
        }
        workgroupBarrier();

        // Online softmax, part 1: partial row maxima; meanwhile the V tile replaces the K tile.
        let kpp = BK / 4u;
        var mx = NEG;
        for (var i = 0u; i < kpp; i++) {
            mx = max(mx, pp_s[(sm_part * kpp + i) * P_STRIDE + sm_row]);
        }
        pmax_s[lid] = mx;
        store_tile(vreg, lid);
        workgroupBarrier();

        // Part 2: new row max, probabilities, row sums.
        let m_old = row_m[sm_row];
        let tmax = max(max(pmax_s[sm_row * 4u], pmax_s[sm_row * 4u + 1u]), max(pmax_s[sm_row * 4u + 2u], pmax_s[sm_row * 4u + 3u]));
        let m_new = max(m_old, tmax);
        var sum = 0.0;
        for (var i = 0u; i < kpp; i++) {
            let idx = (sm_part * kpp + i) * P_STRIDE + sm_row;
            let pr = exp(pp_s[idx] - m_new);
            pp_s[idx] = pr;
            sum += pr;
        }
        psum_s[lid] = sum;
        workgroupBarrier();
        if sm_part == 0u {
            let f = exp(m_old - m_new);
            row_l[sm_row] = row_l[sm_row] * f + psum_s[lid] + psum_s[lid + 1u] + psum_s[lid + 2u] + psum_s[lid + 3u];
            row_m[sm_row] = m_new;
            row_f[sm_row] = f;
        }
        workgroupBarrier();

        for (var i = 0u; i < rpt; i++) {
            let f = row_f[prg * rpt + i];
            acc[2u * i] *= f;
            acc[2u * i + 1u] *= f;
        }
        for (var c = 0u; c < BK; c++) {
            let va = pkv_s[c * s4 + dg];
            let vb = pkv_s[c * s4 + dg + hd8];
            for (var i = 0u; i < rpt; i++) {
                let pr = pp_s[c * P_STRIDE + prg * rpt + i];
                acc[2u * i] += pr * va;
                acc[2u * i + 1u] += pr * vb;
            }
        }
    }

    for (var i = 0u; i < rpt; i++) {
        let row = prg * rpt + i;
        let rg = r_base + row;
        if rg < n_rows {
            let inv_l = 1.0 / row_l[row];
            let o = ((rg / g) * params.n_heads + kvh * g + rg % g) * hd4;
            out[o + dg] = acc[2u * i] * inv_l;
            out[o + dg + hd8] = acc[2u * i + 1u] * inv_l;
        }
    }
}
