//! SwiGLU: out[t, j] = silu(gate[t, j]) * up[t, j], silu(g) = g / (1 + exp(-g)).
//!
//! Input row t of the fused gate/up projection is [gate (ffn) | up (ffn)], stride 2 * ffn; the
//! output is [m_max, ffn]. One thread per output element of the first n_tokens rows; the linear
//! id is wid.x + wid.y * num_workgroups.x (2-D dispatch for large m_max * ffn).

const WG: u32 = 256u;

struct Params {
    ffn: u32,
}

struct Step {
    pos: u32,
    n_tokens: u32,
    kv_len: u32,
    pad: u32,
}

@group(0) @binding(0) var<storage, read> gate_up: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<uniform> params: Params;
@group(0) @binding(3) var<uniform> step: Step;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    let ffn = params.ffn;
    let t = i / ffn;
    if t >= step.n_tokens {
        return;
    }
    let j = i - t * ffn;
    let g = gate_up[t * 2u * ffn + j];
    let u = gate_up[t * 2u * ffn + ffn + j];
    out[i] = g / (1.0 + exp(-g)) * u;
}
