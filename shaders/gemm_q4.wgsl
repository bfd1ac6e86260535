// gemm_q4 (portable): Y[m, n] = sum_k X[m, k] W[n, k] (+ bias[n]), stored or added to Y, for an
// INT4 block-128 matrix W[rows, k] (layout in gemv_q4.wgsl / src/quant.rs) and f32 activations
// X[m, k] (prompt processing: m tokens). Rows m >= n_tokens (from the step uniform) are neither
// read nor written.
//
// Tiling: a workgroup of (TILE_N / 4) x (TILE_M / 4) threads computes a TILE_M x TILE_N tile of Y,
// each thread a 4 x 4 micro-tile (rows l.y + i * TILE_M / 4, columns l.x + j * TILE_N / 4). The K
// loop steps TILE_K = 32 elements (one word per 8 weights, never crossing a 128-block, so one scale
// per row and step): the X tile is copied to workgroup memory and the W tile dequantized into it
// (both transposed to [k][m] / [k][n]), then each thread runs 16 FMAs per k from registers.
// The dispatch covers `n` weight rows starting at column `row_base` of Y (row-range splitting).

override TILE_M: u32 = 64u;
override TILE_N: u32 = 64u;
const TILE_K: u32 = 32u;

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
@group(0) @binding(2) var<storage, read> qw: array<u32>;
@group(0) @binding(3) var<storage, read> scales: array<u32>;
@group(0) @binding(4) var<storage, read> x: array<f32>;
@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;

var<workgroup> xs: array<f32, TILE_K * TILE_M>;
var<workgroup> ws: array<f32, TILE_K * TILE_N>;

fn scale(i: u32) -> f32 {
    let w = scales[i / 2u];
    return select(bf16_lo(w), bf16_hi(w), (i & 1u) == 1u);
}

@compute @workgroup_size(TILE_N / 4u, TILE_M / 4u)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) l: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let m_count = min(step.n_tokens, p.m_max);
    let m0 = wid.y * TILE_M;
    let n0 = wid.x * TILE_N;
    if (m0 >= m_count) {
        return;
    }
    let threads = TILE_M * TILE_N / 16u;
    let words_per_row = p.bpr * 16u;
    let sm = TILE_M / 4u;
    let sn = TILE_N / 4u;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < p.k; k0 += TILE_K) {
        // X: consecutive threads read consecutive k of one token; zero past n_tokens and K.
        for (var e = lid; e < TILE_M * TILE_K; e += threads) {
            let m = e / TILE_K;
            let k = e % TILE_K;
            var v = 0.0;
            if (m0 + m < m_count && k0 + k < p.k) {
                v = x[(m0 + m) * p.k + k0 + k];
            }
            xs[k * TILE_M + m] = v;
        }
        // W: one word (8 weights) per item; rows past the end dequantize to zero.
        for (var e = lid; e < TILE_N * (TILE_K / 8u); e += threads) {
            let n = e / (TILE_K / 8u);
            let c = e % (TILE_K / 8u);
            let row = n0 + n;
            var w = 0x88888888u;
            var s = 0.0;
            if (row < p.n) {
                w = qw[row * words_per_row + k0 / 8u + c];
                s = scale(row * p.bpr + k0 / 128u);
            }
            for (var i = 0u; i < 8u; i++) {
                ws[(c * 8u + i) * TILE_N + n] = q4_level(w, i) * s;
            }
        }
        workgroupBarrier();
        for (var k = 0u; k < TILE_K; k++) {
            let a = vec4<f32>(xs[k * TILE_M + l.y], xs[k * TILE_M + l.y + sm], xs[k * TILE_M + l.y + 2u * sm], xs[k * TILE_M + l.y + 3u * sm]);
            let b = vec4<f32>(ws[k * TILE_N + l.x], ws[k * TILE_N + l.x + sn], ws[k * TILE_N + l.x + 2u * sn], ws[k * TILE_N + l.x + 3u * sn]);
            acc[0] += a.x * b;
            acc[1] += a.y * b;
            acc[2] += a.z * b;
            acc[3] += a.w * b;
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + l.y + i * sm;
        for (var j = 0u; j < 4u; j++) {
            let n = n0 + l.x + j * sn;
            if (m < m_count && n < p.n) {
                let out = m * p.ldy + p.row_base + n;
                var v = acc[i][j];
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
}
