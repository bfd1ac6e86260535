//! RMSNorm: y[t] = x[t] * w / sqrt(mean(x[t]²) + eps) for rows t < n_tokens of [m_max, dim] f32.
//!
//! One workgroup per row (workgroup id x = row). Each thread sums the squares of the elements
//! lid, lid + WG, ... (coalesced), four independent loads per iteration so that a long row is not
//! bound by one load's latency at a time (a single workgroup's run time is latency); a tree reduction in workgroup memory gives the row's sum,
//! then each thread writes its elements. Rows at or beyond `step.n_tokens` return at once (the whole
//! workgroup, so barriers stay in uniform control flow).

const WG: u32 = 256u;

struct Params {
    dim: u32,
    eps: f32,
}

struct Step {
    pos: u32,
    n_tokens: u32,
    kv_len: u32,
    pad: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> weight: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> params: Params;
@group(0) @binding(4) var<uniform> step: Step;

var<workgroup> partial: array<f32, WG>;

// Element i of the row at `base`, 0 past its end.
fn load(base: u32, i: u32, dim: u32) -> f32 {
    return select(0.0, x[base + min(i, dim - 1u)], i < dim);
}

fn load_w(i: u32, dim: u32) -> f32 {
    return select(0.0, weight[min(i, dim - 1u)], i < dim);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x;
    if row >= step.n_tokens {
        return;
    }
    let base = row * params.dim;
    let dim = params.dim;
    var sq = vec4<f32>(0.0);
    for (var i = lid; i < dim; i += 4u * WG) {
        let v = vec4<f32>(load(base, i, dim), load(base, i + WG, dim), load(base, i + 2u * WG, dim), load(base, i + 3u * WG, dim));
        sq += v * v;
    }
    partial[lid] = (sq.x + sq.y) + (sq.z + sq.w);
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half /= 2u) {
        if lid < half {
            partial[lid] += partial[lid + half];
        }
        workgroupBarrier();
    }
    let scale = 1.0 / sqrt(partial[0] / f32(params.dim) + params.eps);
    for (var i = lid; i < dim; i += 4u * WG) {
        // All loads before the stores: the compiler may not move a load across a store to y.
        let v = vec4<f32>(load(base, i, dim), load(base, i + WG, dim), load(base, i + 2u * WG, dim), load(base, i + 3u * WG, dim));
        let w = vec4<f32>(load_w(i, dim), load_w(i + WG, dim), load_w(i + 2u * WG, dim), load_w(i + 3u * WG, dim));
        let r = v * scale * w;
        for (var j = 0u; j < 4u; j++) {
            if i + j * WG < dim {
                y[base + i + j * WG] = r[j];
            }
        }
    }
}
