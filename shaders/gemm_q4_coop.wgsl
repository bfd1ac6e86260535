// gemm_q4 (cooperative matrices): the product of gemm_q4.wgsl on tensor cores. X and the
// dequantized W are rounded to f16; products accumulate in f32 (16x16x16 matrices).
//
// Tiling: a workgroup of 4 subgroups (WG = 4 x the subgroup size) computes a 64 x 64 tile of Y;
// subgroup s computes the 32 x 32 quarter (s / 2, s % 2) as 2 x 2 accumulator matrices. The K loop
// steps 64 elements (inside one 128-block): all threads copy the X tile to workgroup memory as f16
// ([m][k], row-major) and dequantize the W tile ([n][k], i.e. B = W^T column-major), rows padded
// by 8 halves against bank conflicts; then each subgroup runs 4 k-steps of 4 matrix multiply-adds.
// The accumulators go through workgroup memory (naga needs a constant coopStore stride) so the
// epilogue can bound-check rows and columns, add the bias and accumulate into Y.
// Cooperative operations must run in workgroup-uniform control flow, so every subgroup computes:
// WG must be exactly 4 subgroups (the wrapper uses this kernel only where the subgroup size is fixed).
enable f16;
// (naga 30 has no `enable subgroups;`; the subgroup_size builtin needs the SUBGROUP feature only.)
enable wgpu_cooperative_matrix;

override WG: u32 = 128u;
const TILE_M: u32 = 64u;
const TILE_N: u32 = 64u;
const TILE_K: u32 = 64u;
// Row strides of the workgroup tiles (elements), padded; multiples of 8 keep 16-byte alignment.
const AS: u32 = 72u;
const CS: u32 = 68u;

struct Params {
    n: u32,
    k: u32,
    bpr: u32,
    row_base: u32,
    ldy: u32,
    m_max: u32,
    accumulate: u32,
    has_bias: u32,
}

struct Step {
    pos: u32,
    n_tokens: u32,
    kv_len: u32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> qw: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> scales: array<u32>;
@group(0) @binding(4) var<storage, read> x: array<f32>;
@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;

var<workgroup> xs: array<f16, TILE_M * AS>;
var<workgroup> ws: array<f16, TILE_N * AS>;
var<workgroup> cs: array<f32, TILE_M * CS>;

fn scale(i: u32) -> f32 {
    let w = scales[i / 2u];
    return select(bf16_lo(w), bf16_hi(w), (i & 1u) == 1u);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_size) sg_size: u32,
) {
    let m_count = min(step.n_tokens, p.m_max);
    let m0 = wid.y * TILE_M;
    let n0 = wid.x * TILE_N;
    if (m0 >= m_count) {
        return;
    }
    let sg = lid / sg_size;
    let qm = (sg / 2u) * 32u;
    let qn = (sg % 2u) * 32u;
    let quarters = p.bpr * 4u;
    var c00 = coop_mat16x16<f32, C>();
    var c01 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>();
    var c11 = coop_mat16x16<f32, C>();
    for (var k0 = 0u; k0 < p.k; k0 += TILE_K) {
        for (var e = lid; e < TILE_M * TILE_K; e += WG) {
            let m = e / TILE_K;
            let k = e % TILE_K;
            var v = 0.0;
            if (m0 + m < m_count && k0 + k < p.k) {
                v = x[(m0 + m) * p.k + k0 + k];
            }
            xs[m * AS + k] = f16(v);
        }
        // One quarter block (a vec4 of words: 32 weights) per item.
        for (var e = lid; e < TILE_N * (TILE_K / 32u); e += WG) {
            let n = e / (TILE_K / 32u);
            let c = e % (TILE_K / 32u);
            let row = n0 + n;
            var w = vec4<u32>(0x88888888u);
            var s = 0.0;
            if (row < p.n) {
                w = qw[row * quarters + k0 / 32u + c];
                s = scale(row * p.bpr + k0 / 128u);
            }
            let base = n * AS + c * 32u;
            for (var j = 0u; j < 4u; j++) {
                for (var i = 0u; i < 8u; i++) {
                    ws[base + j * 8u + i] = f16(q4_level(w[j], i) * s);
                }
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TILE_K; kk += 16u) {
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&xs[qm * AS + kk], AS);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&xs[(qm + 16u) * AS + kk], AS);
            let b0 = coopLoad<coop_mat16x16<f16, B>>(&ws[qn * AS + kk], AS);
            let b1 = coopLoad<coop_mat16x16<f16, B>>(&ws[(qn + 16u) * AS + kk], AS);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
        }
        workgroupBarrier();
    }
    coopStoreT(c00, &cs[qm * CS + qn], CS);
    coopStoreT(c01, &cs[qm * CS + qn + 16u], CS);
    coopStoreT(c10, &cs[(qm + 16u) * CS + qn], CS);
    coopStoreT(c11, &cs[(qm + 16u) * CS + qn + 16u], CS);
    workgroupBarrier();
    for (var e = lid; e < TILE_M * TILE_N; e += WG) {
        let m = m0 + e / TILE_N;
        let n = n0 + e % TILE_N;
        if (m < m_count && n < p.n) {
            let out = m * p.ldy + p.row_base + n;
            var v = cs[(e / TILE_N) * CS + e % TILE_N];
            if (p.has_bias != 0u) {
                v += bias[p.row_base + n];
            }
            if (p.accumulate != 0u) {
                v += y[out];
            }
            y[out] = v;
        }
    }
}
