//! Sampling on the GPU, two passes (the spec is in src/kernels/sample.rs and src/sampling.rs).
//!
//! Keys: a logit becomes a 64-bit key (hi = its f32 bits mapped to an order-preserving u32,
//! lo = !id), so "larger key" means "larger logit, then lower id", and keys are unique.
//! The sentinel key (0, 0) is below every real key.
//!
//! Pass 1 (`slices`, one workgroup per SLICE vocabulary entries):
//!   - marks the slice's tokens found in the penalty window of the history (a bitmask);
//!   - reduces the raw logits to an online (max, sum of exp(x - max)) and the penalised logits to
//!     their largest key (the greedy pick): partials[slice];
//!   - sampling: keys of penalised / temperature in workgroup memory, radix select of the slice's
//!     k_cand largest, written (unordered, padded with sentinels) to cand_pen[slice * k_cand ..];
//!   - top_n > 0: the same for the raw logits and top_n, into cand_raw[slice * top_n ..].
//! Pass 2 (`finish`, one workgroup): merges the partials (log Z, greedy pick); sampling: radix
//! select of the k_cand largest of cand_pen, bitonic sort, softmax (after min-p), top-p, draw; top_n: the same
//! for cand_raw; writes out = [token, logprob, n_top, 0, (id, logprob) * n_top].
//!
//! Radix select: 8 rounds of 8-bit digits of the 64-bit key (most significant first); each round
//! histograms the digit among keys that share the prefix found so far (256 bins, one per thread),
//! a suffix scan finds the bin holding the k-th largest key, and the select stops as soon as the
//! keys at or above that bin are exactly the k wanted. The result is a threshold key T: exactly the
//! k largest keys are >= T.

const WG: u32 = 256u;
const SLICE: u32 = 4096u;
const MAX_CAND: u32 = 256u;
const NEG_BIG: f32 = -3.0e38;

struct Params {
    vocab: u32,
    n_slices: u32,
    // Raw-logit candidates to report (0..=20).
    top_n: u32,
    // Candidates kept after top-k (1..=256), or 0 for greedy.
    k_cand: u32,
    temperature: f32,
    top_p: f32,
    repeat_penalty: f32,
    // The penalty window: history[hist_start .. hist_start + hist_count] (empty when off).
    hist_start: u32,
    hist_count: u32,
    seed: u32,
    step: u32,
    // Keep candidates with exp(l_i - l_0) >= min_p (0 = off).
    min_p: f32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read> history: array<u32>;
// Per slice: (greedy key hi, greedy key lo, bits of raw max, bits of raw sum of exp(x - max)).
@group(0) @binding(2) var<storage, read_write> partials: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> cand_pen: array<vec2<u32>>;
@group(0) @binding(4) var<storage, read_write> cand_raw: array<vec2<u32>>;
@group(0) @binding(5) var<storage, read_write> out: array<u32>;
@group(0) @binding(6) var<uniform> params: Params;

// Pass 1: the slice's key hi words (the id is implicit: slice_start + index).
var<workgroup> keys: array<u32, SLICE>;
var<workgroup> pen_bits: array<atomic<u32>, 128>;
var<workgroup> hist: array<atomic<u32>, 256>;
var<workgroup> scan: array<u32, 256>;
// The bin a select round chose: (bin, keys above it, keys at or above it, 0).
var<workgroup> sel: vec4<u32>;
var<workgroup> n_out: atomic<u32>;
var<workgroup> red_key: array<vec2<u32>, WG>;
var<workgroup> red_lse: array<vec2<f32>, WG>;
// Pass 2: the selected candidates, sorted, and their probabilities.
var<workgroup> list: array<vec2<u32>, MAX_CAND>;
var<workgroup> probs: array<f32, MAX_CAND>;
var<workgroup> result: vec4<u32>;
var<private> slice_start: u32;

fn sortable(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

fn unsortable(k: u32) -> f32 {
    return bitcast<f32>(select(~k, k & 0x7fffffffu, (k & 0x80000000u) != 0u));
}

fn key_gt(a: vec2<u32>, b: vec2<u32>) -> bool {
    return a.x > b.x || (a.x == b.x && a.y > b.y);
}

fn key_ge(a: vec2<u32>, b: vec2<u32>) -> bool {
    return a.x > b.x || (a.x == b.x && a.y >= b.y);
}

// (max, sum of exp(x - max)) of two parts.
fn lse_merge(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    let m = max(a.x, b.x);
    return vec2<f32>(m, a.y * exp(a.x - m) + b.y * exp(b.x - m));
}

fn high_mask(bits: u32) -> u32 {
    if bits == 0u {
        return 0u;
    }
    return 0xffffffffu << (32u - bits);
}

// Digit d (0 = most significant) of a 64-bit key.
fn digit(key: vec2<u32>, d: u32) -> u32 {
    if d < 4u {
        return (key.x >> (24u - 8u * d)) & 0xffu;
    }
    return (key.y >> (24u - 8u * (d - 4u))) & 0xffu;
}

fn with_digit(prefix: vec2<u32>, d: u32, b: u32) -> vec2<u32> {
    if d < 4u {
        return vec2<u32>(prefix.x | (b << (24u - 8u * d)), prefix.y);
    }
    return vec2<u32>(prefix.x, prefix.y | (b << (24u - 8u * (d - 4u))));
}

// Whether the top 8 * d bits of `key` equal those of `prefix`.
fn has_prefix(key: vec2<u32>, prefix: vec2<u32>, d: u32) -> bool {
    if d <= 4u {
        let m = high_mask(8u * d);
        return (key.x & m) == (prefix.x & m);
    }
    let m = high_mask(8u * (d - 4u));
    return key.x == prefix.x && (key.y & m) == (prefix.y & m);
}

// Key i of a selection source: 0 = this slice (pass 1), 1 = cand_pen, 2 = cand_raw.
fn source_key(src: u32, i: u32) -> vec2<u32> {
    switch src {
        case 0u: {
            return vec2<u32>(keys[i], ~(slice_start + i));
        }
        case 1u: {
            return cand_pen[i];
        }
        default: {
            return cand_raw[i];
        }
    }
}

// The threshold T such that exactly the k largest of the n keys of `src` are >= T (all when k >= n).
// Called by the whole workgroup with uniform arguments.
fn radix_select(src: u32, n: u32, k: u32, lid: u32) -> vec2<u32> {
    var prefix = vec2<u32>(0u, 0u);
    if k >= n {
        return prefix;
    }
    var need = k;
    for (var d = 0u; d < 8u; d++) {
        atomicStore(&hist[lid], 0u);
        workgroupBarrier();
        for (var i = lid; i < n; i += WG) {
            let key = source_key(src, i);
            if has_prefix(key, prefix, d) {
                atomicAdd(&hist[digit(key, d)], 1u);
            }
        }
        workgroupBarrier();
        let own = atomicLoad(&hist[lid]);
        scan[lid] = own;
        workgroupBarrier();
        // Inclusive suffix sums: scan[b] = keys with this prefix whose digit is >= b.
        for (var off = 1u; off < 256u; off *= 2u) {
            var v = scan[lid];
            if lid + off < 256u {
                v += scan[lid + off];
            }
            workgroupBarrier();
            scan[lid] = v;
            workgroupBarrier();
        }
        let ge = scan[lid];
        if ge >= need && ge - own < need {
            sel = vec4<u32>(lid, ge - own, ge, 0u);
        }
        let s = workgroupUniformLoad(&sel);
        prefix = with_digit(prefix, d, s.x);
        if s.z == need {
            break;
        }
        need -= s.y;
    }
    return prefix;
}

// Writes the keys of `src` that are >= thr, in any order, to dst (0 = cand_pen, 1 = cand_raw,
// 2 = list) from index `base`.
fn compact(src: u32, n: u32, thr: vec2<u32>, dst: u32, base: u32, lid: u32) {
    if lid == 0u {
        atomicStore(&n_out, 0u);
    }
    workgroupBarrier();
    for (var i = lid; i < n; i += WG) {
        let key = source_key(src, i);
        if key_ge(key, thr) {
            let j = base + atomicAdd(&n_out, 1u);
            switch dst {
                case 0u: {
                    cand_pen[j] = key;
                }
                case 1u: {
                    cand_raw[j] = key;
                }
                default: {
                    list[j] = key;
                }
            }
        }
    }
    workgroupBarrier();
}

// Sorts `list` by key, largest first (bitonic network, one element per thread).
fn sort_list(lid: u32) {
    workgroupBarrier();
    for (var size = 2u; size <= MAX_CAND; size *= 2u) {
        for (var stride = size / 2u; stride > 0u; stride /= 2u) {
            let partner = lid ^ stride;
            if partner > lid {
                let a = list[lid];
                let b = list[partner];
                let descending = (lid & size) == 0u;
                if descending != key_gt(a, b) {
                    list[lid] = b;
                    list[partner] = a;
                }
            }
            workgroupBarrier();
        }
    }
}

// The k largest keys of `src` (n keys), sorted, in list[0..k]; the rest of `list` is sentinels.
fn select_sorted(src: u32, n: u32, k: u32, lid: u32) {
    let thr = radix_select(src, n, k, lid);
    list[lid] = vec2<u32>(0u, 0u);
    compact(src, n, thr, 2u, 0u, lid);
    sort_list(lid);
}

fn penalised(x: f32) -> f32 {
    let p = params.repeat_penalty;
    return select(x * p, x / p, x > 0.0);
}

fn rng_uniform(seed: u32, step: u32) -> f32 {
    var s = seed ^ (step * 0x9E3779B9u);
    s = s * 747796405u + 2891336453u;
    var w = ((s >> ((s >> 28u) + 4u)) ^ s) * 277803737u;
    w = (w >> 22u) ^ w;
    return f32(w >> 8u) / 16777216.0;
}

@compute @workgroup_size(WG)
fn slices(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let slice = wid.x;
    let start = slice * SLICE;
    slice_start = start;
    let len = min(SLICE, params.vocab - start);

    if lid < SLICE / 32u {
        atomicStore(&pen_bits[lid], 0u);
    }
    workgroupBarrier();
    for (var j = lid; j < params.hist_count; j += WG) {
        let h = history[params.hist_start + j];
        if h >= start && h - start < len {
            let o = h - start;
            atomicOr(&pen_bits[o / 32u], 1u << (o % 32u));
        }
    }
    workgroupBarrier();

    let sampling = params.k_cand > 0u;
    var best = vec2<u32>(0u, 0u);
    var lse = vec2<f32>(NEG_BIG, 0.0);
    for (var j = lid; j < len; j += WG) {
        let raw = logits[start + j];
        if raw > lse.x {
            lse = vec2<f32>(raw, lse.y * exp(lse.x - raw) + 1.0);
        } else {
            lse.y += exp(raw - lse.x);
        }
        var x = raw;
        if ((atomicLoad(&pen_bits[j / 32u]) >> (j % 32u)) & 1u) != 0u {
            x = penalised(x);
        }
        let key = vec2<u32>(sortable(x), ~(start + j));
        if key_gt(key, best) {
            best = key;
        }
        if sampling {
            keys[j] = sortable(x / params.temperature);
        }
    }
    red_key[lid] = best;
    red_lse[lid] = lse;
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half /= 2u) {
        if lid < half {
            if key_gt(red_key[lid + half], red_key[lid]) {
                red_key[lid] = red_key[lid + half];
            }
            red_lse[lid] = lse_merge(red_lse[lid], red_lse[lid + half]);
        }
        workgroupBarrier();
    }
    if lid == 0u {
        let r = red_lse[0];
        partials[slice] = vec4<u32>(red_key[0], bitcast<u32>(r.x), bitcast<u32>(r.y));
    }

    if sampling {
        let k = min(params.k_cand, len);
        let thr = radix_select(0u, len, k, lid);
        compact(0u, len, thr, 0u, slice * params.k_cand, lid);
        for (var i = k + lid; i < params.k_cand; i += WG) {
            cand_pen[slice * params.k_cand + i] = vec2<u32>(0u, 0u);
        }
    }
    if params.top_n > 0u {
        workgroupBarrier();
        for (var j = lid; j < len; j += WG) {
            keys[j] = sortable(logits[start + j]);
        }
        workgroupBarrier();
        let k = min(params.top_n, len);
        let thr = radix_select(0u, len, k, lid);
        compact(0u, len, thr, 1u, slice * params.top_n, lid);
        for (var i = k + lid; i < params.top_n; i += WG) {
            cand_raw[slice * params.top_n + i] = vec2<u32>(0u, 0u);
        }
    }
}

@compute @workgroup_size(WG)
fn finish(@builtin(local_invocation_index) lid: u32) {
    if lid == 0u {
        var best = vec2<u32>(0u, 0u);
        var lse = vec2<f32>(NEG_BIG, 0.0);
        for (var w = 0u; w < params.n_slices; w++) {
            let p = partials[w];
            if key_gt(p.xy, best) {
                best = p.xy;
            }
            lse = lse_merge(lse, vec2<f32>(bitcast<f32>(p.z), bitcast<f32>(p.w)));
        }
        let log_z = lse.x + log(lse.y);
        result = vec4<u32>(~best.y, bitcast<u32>(log_z), 0u, 0u);
    }
    workgroupBarrier();

    let k_cand = params.k_cand;
    if k_cand > 0u {
        select_sorted(1u, params.n_slices * k_cand, k_cand, lid);
        if lid < k_cand {
            probs[lid] = exp(unsortable(list[lid].x) - unsortable(list[0].x));
        }
        workgroupBarrier();
        if lid == 0u {
            // min-p: the candidates are sorted, so the kept ones are a prefix (the first has 1).
            var n = k_cand;
            if params.min_p > 0.0 {
                n = 1u;
                for (var i = 1u; i < k_cand; i++) {
                    if probs[i] < params.min_p {
                        break;
                    }
                    n = i + 1u;
                }
            }
            // Sequential sums in candidate order, as the CPU sampler does.
            var sum = 0.0;
            for (var i = 0u; i < n; i++) {
                sum += probs[i];
            }
            for (var i = 0u; i < n; i++) {
                probs[i] = probs[i] / sum;
            }
            var keep = n;
            if params.top_p < 1.0 {
                var cum = 0.0;
                for (var i = 0u; i < n; i++) {
                    cum += probs[i];
                    if cum >= params.top_p {
                        keep = i + 1u;
                        break;
                    }
                }
                var total = 0.0;
                for (var i = 0u; i < keep; i++) {
                    total += probs[i];
                }
                for (var i = 0u; i < keep; i++) {
                    probs[i] = probs[i] / total;
                }
            }
            let u = rng_uniform(params.seed, params.step);
            var pick = keep - 1u;
            var cum = 0.0;
            for (var i = 0u; i < keep; i++) {
                cum += probs[i];
                if cum > u {
                    pick = i;
                    break;
                }
            }
            result.x = ~list[pick].y;
        }
        workgroupBarrier();
    }

    let log_z = bitcast<f32>(result.y);
    let n_top = min(params.top_n, params.vocab);
    if n_top > 0u {
        select_sorted(2u, params.n_slices * params.top_n, n_top, lid);
        if lid < n_top {
            let key = list[lid];
            out[4u + 2u * lid] = ~key.y;
            out[5u + 2u * lid] = bitcast<u32>(unsortable(key.x) - log_z);
        }
    }
    if lid == 0u {
        let token = result.x;
        out[0] = token;
        out[1] = bitcast<u32>(logits[token] - log_z);
        out[2] = n_top;
        out[3] = 0u;
    }
}
