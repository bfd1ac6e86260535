// Decode attention (one token) over the f16 KV cache: flash-decoding with grouped queries.
//
// Layouts are those of attention.wgsl: q and out [n_heads * HD] f32 (row 0); the K and V caches
// hold f16 pairs packed in u32, word (kvh * ctx + position) * (HD / 2) + i; positions
// 0..step.kv_len are filled; query head h reads KV head h / group; scores are scaled by 1/sqrt(HD).
//
// decode_split: workgroup (KV head × batch of up to 8 of its query heads, split) covers one chunk
// of positions, so each K/V row is read once for every query head of the batch. Thread
// (dg = lid % HD8, pg = lid / HD8) owns eight dims (one vec4<u32> of the cache) and positions
// pg, pg + NPH, ...: the loads of a warp are contiguous rows. Heads are vec4 lanes (quads): the
// thread keeps its eight dims of every head's query in matrices, so one K word gives the partial
// scores of four heads with two mat4x4 × vec4 products. Two passes over the chunk:
//   1. scores: per tile of TILE positions, partial scores per (position, dims) go to workgroup
//      memory and are summed per position into sc_s (the whole chunk's scores fit there);
//   2. max and exp-sum per head (workgroup reductions), then P·V over the chunk's V rows, then a sum of
//      the position phases. Writes the split's max m, sum l and unnormalised output to scratch.
// decode_combine: one workgroup per query head rescales the splits to a common max and divides.
// decode_combine_q8 (int8 decode activations): the same, then the head's HD values (HD / 32 whole
// blocks) quantized with q8_block.wgsl (prepended by the wrapper) into the o projection's int8
// input, bit-identical to what quant_act.wgsl would make of `out`; the last head's workgroup
// zeroes the blocks that pad n_heads * HD to whole weight blocks of 128.
//
// Batched decode (the wrapper's prelude says which): the rows of a batched step (batch_step.wgsl),
// row = workgroup id z of the split pass and y of the combine, each over its own slot's region of
// the caches (`slot * n_kv_heads * ctx` rows in) and its own length; q, out and the scratch hold
// a row after another. One sequence: row 0 over the whole caches, its length from the step.
//
// The split layout follows step.kv_len at run time (split_layout), bounded at bind time by the
// context: workgroups of splits past the layout exit at once, and the combine ignores them.

struct Params {
    n_heads: u32,
    n_kv_heads: u32,
    // Query heads per KV head.
    group: u32,
    // Positions per KV head in the cache.
    ctx: u32,
    // Splits bound at bind time: the dispatch's y size and the scratch's slots per head.
    max_splits: u32,
    // Workgroups per KV head, each for up to GB query heads.
    head_batches: u32,
    // Split layout (multiples of TILE): fewest positions per split worth a workgroup, most that fit
    // sc_s; splits wanted for parallelism once the sequence is long enough.
    min_chunk: u32,
    max_chunk: u32,
    target_splits: u32,
    // decode_combine_q8: blocks of 32 of the o projection's input, padding included.
    q8_blocks: u32,
    _pad1: u32,
    _pad2: u32,
}

// Head dimension: 32, 64 or 128.
override HD: u32 = 128u;
// Query heads per workgroup (1 to 8), as vec4 lanes of NQ quads. With 5 (Qwen2-32B's group) the
// second quad holds one head, and only its lane is computed.
override GB: u32 = 4u;
override NQ: u32 = (GB + 3u) / 4u;
// P·V loads the next V tile only where there is one (false: also past the end, unused; kept
// for the bench's A/B).
override V_TAIL_GUARD: bool = true;

const WG: u32 = 128u;
// Cache words per row, threads per row, rows loaded at once by the workgroup.
override HD8: u32 = HD / 8u;
override NPH: u32 = WG / HD8;
// Positions per tile: each thread has four loads in flight (U in decode_split).
override TILE: u32 = NPH * 4u;
// Scores of a chunk: positions × quads (the bind-time max_chunk keeps max_chunk * NQ <= this).
const SC_VEC4: u32 = 512u;
// Partial scores of a tile (TILE * (HD8 + 1) * NQ <= 4 * (WG + 32) * 2), or the P·V phase sums of
// one quad (8 * WG), or the workgroup reductions (2 * WG + 32).
const RED_VEC4: u32 = 1280u;
// A finite stand-in for -infinity: exp(NEG - m) is 0, and NEG - NEG is not NaN.
const NEG: f32 = -3.0e38;

@group(0) @binding(1) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> k_cache: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> v_cache: array<vec4<u32>>;
// Per (query head, split slot): HD/4 vec4 of unnormalised output, and (m, l).
@group(0) @binding(5) var<storage, read_write> part_o: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> part_ml: array<vec2<f32>>;
@group(0) @binding(7) var<storage, read_write> out: array<vec4<f32>>;
// decode_combine_q8 only: the int8 blocks (two vec4 of words per block) and (d, d Σq) per block.
@group(0) @binding(8) var<storage, read_write> xq: array<vec4<u32>>;
@group(0) @binding(9) var<storage, read_write> xd: array<vec2<f32>>;

var<workgroup> sc_s: array<vec4<f32>, SC_VEC4>;
var<workgroup> red_s: array<vec4<f32>, RED_VEC4>;

struct Layout {
    // Positions per split (a multiple of TILE) and splits covering the sequence.
    chunk: u32,
    n: u32,
}

// The split layout for kv_len >= 1 positions; both entry points derive it the same way, and the
// bind-time bound is the first `n` below at kv_len = ctx (it only grows with kv_len).
fn split_layout(kv_len: u32) -> Layout {
    let wanted = min(params.target_splits, (kv_len + params.min_chunk - 1u) / params.min_chunk);
    let n = max(max(wanted, (kv_len + params.max_chunk - 1u) / params.max_chunk), 1u);
    let chunk = ((kv_len + n - 1u) / n + TILE - 1u) / TILE * TILE;
    return Layout(chunk, (kv_len + chunk - 1u) / chunk);
}

fn step_kv_len(row: u32) -> u32 {
    return max(min(row_kv_len(row), params.ctx), 1u);
}

// The batch row whose query this invocation reads (its q vec4s start at q_base).
var<private> q_base: u32;

// Eight f16 values (four packed words) as two vec4<f32>: dims 0..3 and 4..7.
fn unpack_lo(w: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}

fn unpack_hi(w: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w));
}

// Four dims (vec4 `w4`) of query head h, scaled; 0 unless `valid`.
fn query_row(h: u32, valid: bool, w4: u32) -> vec4<f32> {
    if !valid {
        return vec4<f32>(0.0);
    }
    return q[q_base + h * (HD / 4u) + w4] * inverseSqrt(f32(HD));
}

// Four dims (vec4 `w4` of a head) of query heads 4*quad .. 4*quad+3 of the batch, scaled: column c
// is dim c, lane j is head j. Heads past n_here are 0.
fn query_quad(head0: u32, n_here: u32, quad: u32, w4: u32) -> mat4x4<f32> {
    let hd4 = HD / 4u;
    let scale = inverseSqrt(f32(HD));
    var cols: array<vec4<f32>, 4>;
    for (var j = 0u; j < 4u; j++) {
        let h = 4u * quad + j;
        cols[j] = vec4<f32>(0.0);
        if h < n_here {
            cols[j] = q[q_base + (head0 + h) * hd4 + w4] * scale;
        }
    }
    return transpose(mat4x4<f32>(cols[0], cols[1], cols[2], cols[3]));
}

struct Quads {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

fn sum_or_max(a: vec4<f32>, b: vec4<f32>, is_max: bool) -> vec4<f32> {
    return select(a + b, max(a, b), is_max);
}

// Sum or max over the workgroup of two vec4 per thread, in two levels (16 partial results per
// quad, then every thread reads them): three barriers instead of a tree's eight.
fn reduce_wg(lid: u32, v: Quads, is_max: bool) -> Quads {
    red_s[lid] = v.lo;
    red_s[WG + lid] = v.hi;
    workgroupBarrier();
    if lid < 32u {
        let base = (lid / 16u) * WG + lid % 16u;
        var r = red_s[base];
        for (var i = 1u; i < WG / 16u; i++) {
            r = sum_or_max(r, red_s[base + 16u * i], is_max);
        }
        red_s[2u * WG + lid] = r;
    }
    workgroupBarrier();
    var lo = red_s[2u * WG];
    var hi = red_s[2u * WG + 16u];
    for (var i = 1u; i < 16u; i++) {
        lo = sum_or_max(lo, red_s[2u * WG + i], is_max);
        hi = sum_or_max(hi, red_s[2u * WG + 16u + i], is_max);
    }
    workgroupBarrier();
    return Quads(lo, hi);
}

// Partial scores of tile row `row` from one K word: this thread's dims, every head of the batch.
fn store_partial(row: u32, dg: u32, kw: vec4<u32>, qa_lo: mat4x4<f32>, qb_lo: mat4x4<f32>, qa_hi: mat4x4<f32>, qb_hi: mat4x4<f32>) {
    let ka = unpack_lo(kw);
    let kb = unpack_hi(kw);
    let s4 = HD8 + 1u;
    red_s[row * s4 + dg] = qa_lo * ka + qb_lo * kb;
    if GB == 5u {
        // One head in the second quad (Qwen2-32B's group of 5): its query is column 0.
        red_s[(TILE + row) * s4 + dg] = vec4<f32>(dot(qa_hi[0], ka) + dot(qb_hi[0], kb), 0.0, 0.0, 0.0);
    } else if NQ > 1u {
        red_s[(TILE + row) * s4 + dg] = qa_hi * ka + qb_hi * kb;
    }
}

// Four cache words of this thread: rows t0 + pg + NPH * u of the chunk (u = 0..3), clamped to
// its last row (finite data whose scores or probabilities are not used).
struct Words {
    w0: vec4<u32>,
    w1: vec4<u32>,
    w2: vec4<u32>,
    w3: vec4<u32>,
}

fn load_tile(from_k: bool, row0: u32, pg: u32, dg: u32, n: u32, t0: u32) -> Words {
    let p = t0 + pg;
    let r0 = (row0 + min(p, n - 1u)) * HD8 + dg;
    let r1 = (row0 + min(p + NPH, n - 1u)) * HD8 + dg;
    let r2 = (row0 + min(p + 2u * NPH, n - 1u)) * HD8 + dg;
    let r3 = (row0 + min(p + 3u * NPH, n - 1u)) * HD8 + dg;
    if from_k {
        return Words(k_cache[r0], k_cache[r1], k_cache[r2], k_cache[r3]);
    }
    return Words(v_cache[r0], v_cache[r1], v_cache[r2], v_cache[r3]);
}

struct Acc {
    a_lo: mat4x4<f32>,
    b_lo: mat4x4<f32>,
    a_hi: mat4x4<f32>,
    b_hi: mat4x4<f32>,
}

// Adds probability × V for chunk position p (no-op past n): column j of a holds head j's dims
// 8dg..8dg+3, of b dims 8dg+4..8dg+7.
fn accumulate(acc: ptr<function, Acc>, p: u32, n: u32, vw: vec4<u32>) {
    let va = unpack_lo(vw);
    let vb = unpack_hi(vw);
    let e_lo = select(vec4<f32>(0.0), sc_s[p * NQ], p < n);
    (*acc).a_lo += mat4x4<f32>(va * e_lo.x, va * e_lo.y, va * e_lo.z, va * e_lo.w);
    (*acc).b_lo += mat4x4<f32>(vb * e_lo.x, vb * e_lo.y, vb * e_lo.z, vb * e_lo.w);
    if GB == 5u {
        let e4 = select(0.0, sc_s[p * NQ + 1u].x, p < n);
        (*acc).a_hi[0] += va * e4;
        (*acc).b_hi[0] += vb * e4;
    } else if NQ > 1u {
        let e_hi = select(vec4<f32>(0.0), sc_s[p * NQ + 1u], p < n);
        (*acc).a_hi += mat4x4<f32>(va * e_hi.x, va * e_hi.y, va * e_hi.z, va * e_hi.w);
        (*acc).b_hi += mat4x4<f32>(vb * e_hi.x, vb * e_hi.y, vb * e_hi.z, vb * e_hi.w);
    }
}

@compute @workgroup_size(128)
fn decode_split(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.z;
    if row >= live_rows() {
        return;
    }
    let kv_len = step_kv_len(row);
    let lay = split_layout(kv_len);
    let split = wid.y;
    if split >= lay.n {
        return;
    }
    q_base = row * params.n_heads * (HD / 4u);
    let start = split * lay.chunk;
    let n = min(lay.chunk, kv_len - start);
    let kvh = wid.x / params.head_batches;
    let batch = wid.x % params.head_batches;
    let head0 = kvh * params.group + batch * GB;
    let n_here = min(GB, params.group - batch * GB);
    let dg = lid % HD8;
    let pg = lid / HD8;
    let row0 = (row_slot(row) * params.n_kv_heads + kvh) * params.ctx + start;

    // Pass 1: scores of the chunk into sc_s[position * NQ + quad]. The next tile's K words are
    // in flight while a tile is scored; during the last tile, the first tile's V words instead.
    var k = load_tile(true, row0, pg, dg, n, 0u);
    {
        let qa_lo = query_quad(head0, n_here, 0u, 2u * dg);
        let qb_lo = query_quad(head0, n_here, 0u, 2u * dg + 1u);
        var qa_hi = mat4x4<f32>();
        var qb_hi = mat4x4<f32>();
        if GB == 5u {
            qa_hi[0] = query_row(head0 + 4u, n_here > 4u, 2u * dg);
            qb_hi[0] = query_row(head0 + 4u, n_here > 4u, 2u * dg + 1u);
        } else if NQ > 1u {
            qa_hi = query_quad(head0, n_here, 1u, 2u * dg);
            qb_hi = query_quad(head0, n_here, 1u, 2u * dg + 1u);
        }
        let s4 = HD8 + 1u;
        for (var t0 = 0u; t0 < n; t0 += TILE) {
            let k0 = k.w0;
            let k1 = k.w1;
            let k2 = k.w2;
            let k3 = k.w3;
            let more = t0 + TILE < n;
            k = load_tile(more, row0, pg, dg, n, select(0u, t0 + TILE, more));
            store_partial(pg, dg, k0, qa_lo, qb_lo, qa_hi, qb_hi);
            store_partial(pg + NPH, dg, k1, qa_lo, qb_lo, qa_hi, qb_hi);
            store_partial(pg + 2u * NPH, dg, k2, qa_lo, qb_lo, qa_hi, qb_hi);
            store_partial(pg + 3u * NPH, dg, k3, qa_lo, qb_lo, qa_hi, qb_hi);
            workgroupBarrier();
            for (var i = lid; i < TILE * NQ; i += WG) {
                let row = i % TILE;
                let quad = i / TILE;
                let base = (quad * TILE + row) * s4;
                var s = vec4<f32>(0.0);
                for (var d = 0u; d < HD8; d++) {
                    s += red_s[base + d];
                }
                if t0 + row < n {
                    sc_s[(t0 + row) * NQ + quad] = s;
                }
            }
            workgroupBarrier();
        }
    }

    // Pass 2: max and sum per head, probabilities in place of the scores (the first V tile is in
    // flight meanwhile), then P·V.
    var v = k;
    var m = Quads(vec4<f32>(NEG), vec4<f32>(NEG));
    for (var p = lid; p < n; p += WG) {
        m.lo = max(m.lo, sc_s[p * NQ]);
        if NQ > 1u {
            m.hi = max(m.hi, sc_s[p * NQ + 1u]);
        }
    }
    m = reduce_wg(lid, m, true);
    var l = Quads(vec4<f32>(0.0), vec4<f32>(0.0));
    for (var p = lid; p < n; p += WG) {
        let e_lo = exp(sc_s[p * NQ] - m.lo);
        sc_s[p * NQ] = e_lo;
        l.lo += e_lo;
        if NQ > 1u {
            let e_hi = exp(sc_s[p * NQ + 1u] - m.hi);
            sc_s[p * NQ + 1u] = e_hi;
            l.hi += e_hi;
        }
    }
    // (The reduction's first barrier also publishes the probabilities.)
    l = reduce_wg(lid, l, false);

    var acc = Acc(mat4x4<f32>(), mat4x4<f32>(), mat4x4<f32>(), mat4x4<f32>());
    for (var t0 = 0u; t0 < n; t0 += TILE) {
        let p = t0 + pg;
        let v0 = v.w0;
        let v1 = v.w1;
        let v2 = v.w2;
        let v3 = v.w3;
        if !V_TAIL_GUARD || t0 + TILE < n {
            v = load_tile(false, row0, pg, dg, n, t0 + TILE);
        }
        accumulate(&acc, p, n, v0);
        accumulate(&acc, p + NPH, n, v1);
        accumulate(&acc, p + 2u * NPH, n, v2);
        accumulate(&acc, p + 3u * NPH, n, v3);
    }

    // Sum the NPH position phases, one quad at a time: red_s[((pg * 4 + j) * HD8 + dg) * 2 + half].
    let hd4 = HD / 4u;
    for (var quad = 0u; quad < NQ; quad++) {
        var a = acc.a_lo;
        var b = acc.b_lo;
        if quad == 1u {
            a = acc.a_hi;
            b = acc.b_hi;
        }
        for (var j = 0u; j < 4u; j++) {
            red_s[((pg * 4u + j) * HD8 + dg) * 2u] = a[j];
            red_s[((pg * 4u + j) * HD8 + dg) * 2u + 1u] = b[j];
        }
        workgroupBarrier();
        for (var i = lid; i < 8u * HD8; i += WG) {
            let j = i / hd4;
            let r = i % hd4;
            var o = vec4<f32>(0.0);
            for (var g = 0u; g < NPH; g++) {
                o += red_s[(g * 4u + j) * hd4 + r];
            }
            let h = 4u * quad + j;
            if h < n_here {
                let slot = (row * params.n_heads + head0 + h) * params.max_splits + split;
                part_o[slot * hd4 + r] = o;
                if r == 0u {
                    let mq = select(m.lo, m.hi, quad == 1u);
                    let lq = select(l.lo, l.hi, quad == 1u);
                    part_ml[slot] = vec2<f32>(mq[j], lq[j]);
                }
            }
        }
        workgroupBarrier();
    }
}

// Combine: threads per workgroup.
const CB_WG: u32 = 256u;
var<workgroup> cb_red: array<f32, CB_WG>;
var<workgroup> cb_part: array<f32, 16>;
var<workgroup> cb_o: array<vec4<f32>, CB_WG>;

// Sum or max of one f32 per thread, in two levels as reduce_wg; every thread gets the result.
fn combine_reduce(lid: u32, v: f32, is_max: bool) -> f32 {
    cb_red[lid] = v;
    workgroupBarrier();
    if lid < 16u {
        var r = cb_red[lid];
        for (var i = 1u; i < CB_WG / 16u; i++) {
            let o = cb_red[lid + 16u * i];
            r = select(r + o, max(r, o), is_max);
        }
        cb_part[lid] = r;
    }
    workgroupBarrier();
    var r = cb_part[0];
    for (var i = 1u; i < 16u; i++) {
        let o = cb_part[i];
        r = select(r + o, max(r, o), is_max);
    }
    workgroupBarrier();
    return r;
}

// The combine of query head `head`; every thread calls it. Threads lid < HD / 4 get the output
// of their vec4 (which they also write to `out`); the others get zero.
fn combine(head: u32, row: u32, lid: u32) -> vec4<f32> {
    let hd4 = HD / 4u;
    let n_splits = min(split_layout(step_kv_len(row)).n, params.max_splits);
    let first = (row * params.n_heads + head) * params.max_splits;

    // Thread (split group sg, vec4 w4) sums splits sg, sg + nsg, ... in blocks of eight. The first
    // block is loaded with the maxima, before the common max is known: up to 8 * nsg splits (64 at
    // head dim 128) cost one round trip to memory.
    let w4 = lid % hd4;
    let sg = lid / hd4;
    let nsg = CB_WG / hd4;
    var part: array<vec4<f32>, 8>;
    var ml: array<vec2<f32>, 8>;
    for (var u = 0u; u < 8u; u++) {
        let s = min(sg + u * nsg, n_splits - 1u);
        part[u] = part_o[(first + s) * hd4 + w4];
        ml[u] = part_ml[first + s];
    }
    var mx = NEG;
    for (var s = lid; s < n_splits; s += CB_WG) {
        mx = max(mx, part_ml[first + s].x);
    }
    let m_all = combine_reduce(lid, mx, true);

    var o = vec4<f32>(0.0);
    var l = 0.0;
    for (var s0 = sg; s0 < n_splits; s0 += 8u * nsg) {
        if s0 != sg {
            for (var u = 0u; u < 8u; u++) {
                let s = min(s0 + u * nsg, n_splits - 1u);
                part[u] = part_o[(first + s) * hd4 + w4];
                ml[u] = part_ml[first + s];
            }
        }
        for (var u = 0u; u < 8u; u++) {
            if s0 + u * nsg < n_splits {
                let w = exp(ml[u].x - m_all);
                o += w * part[u];
                l += w * ml[u].y;
            }
        }
    }
    // Every thread of a split group has the same l.
    cb_o[lid] = o;
    cb_red[lid] = l;
    workgroupBarrier();
    var result = vec4<f32>(0.0);
    if sg == 0u {
        var total = vec4<f32>(0.0);
        var l_all = 0.0;
        for (var g = 0u; g < nsg; g++) {
            total += cb_o[g * hd4 + w4];
            l_all += cb_red[g * hd4];
        }
        result = total / l_all;
        out[(row * params.n_heads + head) * hd4 + w4] = result;
    }
    return result;
}

@compute @workgroup_size(256)
fn decode_combine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    if wid.y >= live_rows() {
        return;
    }
    combine(wid.x, wid.y, lid);
}

// The head's output, shared for the block quantizers.
var<workgroup> cb_head: array<vec4<f32>, 32>;

@compute @workgroup_size(256)
fn decode_combine_q8(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let head = wid.x;
    let o = combine(head, 0u, lid);
    if lid < HD / 4u {
        cb_head[lid] = o;
    }
    workgroupBarrier();
    // Thread t < HD / 32 quantizes the head's block t, from the same f32 values written to `out`.
    let per_head = HD / 32u;
    if lid < per_head {
        var v: array<vec4<f32>, 8>;
        for (var i = 0u; i < 8u; i++) {
            v[i] = cb_head[8u * lid + i];
        }
        let q = quantize32(v);
        let b = head * per_head + lid;
        xq[2u * b] = q.lo;
        xq[2u * b + 1u] = q.hi;
        xd[b] = vec2<f32>(q.d, q.dsum);
    }
    // Padding blocks (zero values: zero levels and scales, as quant_act writes them).
    if head + 1u == params.n_heads {
        for (var b = params.n_heads * per_head + lid; b < params.q8_blocks; b += CB_WG) {
            xq[2u * b] = vec4<u32>(0u);
            xq[2u * b + 1u] = vec4<u32>(0u);
            xd[b] = vec2<f32>(0.0);
        }
    }
}
