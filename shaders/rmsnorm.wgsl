//! RMSNorm: y[t] = x[t] * w / sqrt(mean(x[t]²) + eps) for rows t < n_tokens of [m_max, dim] f32.
//!
//! One workgroup per row (workgroup id x = row). Each thread sums the squares of the elements
//! lid, lid + WG, ... (coalesced), a tree reduction in workgroup memory gives the row's sum, then
//! each thread writes its elements. Rows at or beyond `step.n_tokens` return at once (the whole
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

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x;
    if row >= step.n_tokens {
        return;
    }
    let base = row * params.dim;
    var sq = 0.0;
    for (var i = lid; i < params.dim; i += WG) {
        let v = x[base + i];
        sq += v * v;
    }
    partial[lid] = sq;
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half /= 2u) {
        if lid < half {
            partial[lid] += partial[lid + half];
        }
        workgroupBarrier();
    }
    let scale = 1.0 / sqrt(partial[0] / f32(params.dim) + params.eps);
    for (var i = lid; i < params.dim; i += WG) {
        y[base + i] = x[base + i] * scale * weight[i];
    }
}
