//! RmsNorm, RopeKv and SwiGLU against CPU references (f64), with fresh random inputs, NaN-poisoned
//! outputs, odd sizes, and m_max > n_tokens (rows beyond n_tokens must stay untouched).

use half::f16;
use q4wgpu::gpu::testing::{assert_close, gpu, poisoned, run_dispatches, Rng};
use q4wgpu::gpu::Gpu;
use q4wgpu::kernels::rmsnorm::RmsNorm;
use q4wgpu::kernels::rope_kv::RopeKv;
use q4wgpu::kernels::swiglu::SwiGlu;
use q4wgpu::kernels::StepParams;

fn step_buffer(g: &Gpu, pos: usize, n_tokens: usize) -> wgpu::Buffer {
    let s = StepParams {
        pos: pos as u32,
        n_tokens: n_tokens as u32,
        kv_len: (pos + n_tokens) as u32,
        _pad: 0,
    };
    g.uniform("step", &s)
}

fn assert_all_nan(what: &str, v: &[f32]) {
    if let Some(i) = v.iter().position(|x| !x.is_nan()) {
        panic!(
            "{what}: element {i} was written ({}) but lies beyond n_tokens",
            v[i]
        );
    }
}

/// Tolerance 2e-6 of the row's largest output: f32 accumulation of at most ~1000 squares.
#[test]
fn rmsnorm_matches_f64_reference() {
    let g = gpu();
    let k = RmsNorm::new(g).expect("compile rmsnorm");
    let mut rng = Rng::fresh("rmsnorm");
    for (dim, m_max, n_tokens) in [(160, 1, 1), (576, 5, 3), (896, 2, 2), (1001, 7, 4)] {
        let eps = 1e-6 * (1 + rng.below(10)) as f32;
        let x: Vec<f32> = rng.vec(m_max * dim, 2.0);
        let w: Vec<f32> = rng.vec(dim, 1.0);
        let xb = g.storage_from("x", &x);
        let wb = g.storage_from("w", &w);
        let yb = poisoned(g, "y", m_max * dim);
        let step = step_buffer(g, 0, n_tokens);
        let d = k
            .bind(g, &xb, &wb, &yb, dim, eps, m_max, &step)
            .expect("bind");
        run_dispatches(g, &[&d]);
        let y = g.read_f32(&yb, m_max * dim).expect("read y");
        for t in 0..n_tokens {
            let row = &x[t * dim..(t + 1) * dim];
            let ms: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / dim as f64;
            let s = 1.0 / (ms + eps as f64).sqrt();
            let want: Vec<f32> = row
                .iter()
                .zip(&w)
                .map(|(&v, &wi)| (v as f64 * s * wi as f64) as f32)
                .collect();
            assert_close(
                &format!("rmsnorm dim {dim} row {t}"),
                &y[t * dim..(t + 1) * dim],
                &want,
                2e-6,
            );
        }
        assert_all_nan("rmsnorm rows past n_tokens", &y[n_tokens * dim..]);
    }
}

/// Tolerance 1e-6 of the largest output: one exp and two products per element in f32.
#[test]
fn swiglu_matches_f64_reference() {
    let g = gpu();
    let k = SwiGlu::new(g).expect("compile swiglu");
    let mut rng = Rng::fresh("swiglu");
    for (ffn, m_max, n_tokens) in [(1, 1, 1), (333, 4, 3), (1000, 3, 3), (4867, 2, 1)] {
        let gu = rng.vec(m_max * 2 * ffn, 4.0);
        let gub = g.storage_from("gate_up", &gu);
        let ob = poisoned(g, "out", m_max * ffn);
        let step = step_buffer(g, 17, n_tokens);
        let d = k.bind(g, &gub, &ob, ffn, m_max, &step).expect("bind");
        run_dispatches(g, &[&d]);
        let got = g.read_f32(&ob, m_max * ffn).expect("read out");
        let mut want = Vec::new();
        for t in 0..n_tokens {
            for j in 0..ffn {
                let gate = gu[t * 2 * ffn + j] as f64;
                let up = gu[t * 2 * ffn + ffn + j] as f64;
                want.push((gate / (1.0 + (-gate).exp()) * up) as f32);
            }
        }
        assert_close(
            &format!("swiglu ffn {ffn}"),
            &got[..n_tokens * ffn],
            &want,
            1e-6,
        );
        assert_all_nan("swiglu rows past n_tokens", &got[n_tokens * ffn..]);
    }
}

struct RopeCase {
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    ctx: usize,
    m_max: usize,
    n_tokens: usize,
    pos: usize,
}

/// Element e of the rotated head `x`: angle = (position as f32 * inv_freq) rounded to f32, as the
/// CPU reference computes it, then cos/sin in f64.
fn rope_ref(x: &[f32], inv_freq: &[f32], position: usize) -> Vec<f32> {
    let half = x.len() / 2;
    (0..x.len())
        .map(|e| {
            let i = e % half;
            let angle = (position as f32 * inv_freq[i]) as f64;
            let (s, c) = angle.sin_cos();
            let v = if e < half {
                x[e] as f64 * c - x[e + half] as f64 * s
            } else {
                x[e] as f64 * c + x[i] as f64 * s
            };
            v as f32
        })
        .collect()
}

fn unpack_f16(words: &[u32]) -> Vec<f32> {
    words
        .iter()
        .flat_map(|&w| {
            [
                f16::from_bits(w as u16).to_f32(),
                f16::from_bits((w >> 16) as u16).to_f32(),
            ]
        })
        .collect()
}

const CACHE_POISON: u32 = 0x7e00_7e00; // two f16 NaNs

/// A head's f16 cache values against the f32 reference: each rounds to the reference's f16 or a
/// neighbour (the f32 result may sit on a rounding boundary): at most one f16 ulp of the value,
/// plus 2e-5 of the head's scale.
#[track_caller]
fn assert_f16_cache(what: &str, got: &[f32], want: &[f32]) {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (e, (&g, &w)) in got.iter().zip(want).enumerate() {
        let w16 = f16::from_f32(w).to_f32();
        let ulp = (f16::from_f32(w.abs()).to_f32() * 2f32.powi(-10)).max(6e-8);
        let err = (g - w16).abs();
        assert!(
            g.is_finite() && err <= ulp + 2e-5 * scale,
            "{what} element {e}: got {g} want {w16} (f32 {w})"
        );
    }
}

/// q: tolerance 2e-5 of the head's largest value (f32 products; the angle reduction and the GPU's
/// cos/sin are accurate to ~1e-6 rad). k, v: the f16 values must round to the same f16 as the
/// reference, or to a neighbour (the f32 result may sit on a rounding boundary): checked as at most
/// one f16 ulp of the value, plus 2e-5 of the head's scale.
fn check_rope(c: &RopeCase, rng: &mut Rng) {
    let g = gpu();
    let k = RopeKv::new(g).expect("compile rope_kv");
    let hd = c.head_dim;
    let q_dim = c.n_heads * hd;
    let kv_dim = c.n_kv_heads * hd;
    let width = q_dim + 2 * kv_dim;
    let theta = [10000.0f64, 1_000_000.0, 500_000.0][rng.below(3)];
    let inv_freq: Vec<f32> = (0..hd / 2)
        .map(|i| (1.0 / theta.powf(2.0 * i as f64 / hd as f64)) as f32)
        .collect();
    let qkv = rng.vec(c.m_max * width, 1.5);
    let qkv_b = g.storage_from("qkv", &qkv);
    let inv_b = g.storage_from("inv_freq", &inv_freq);
    let q_b = poisoned(g, "q_out", c.m_max * q_dim);
    let words = c.n_kv_heads * c.ctx * hd / 2;
    let k_b = g.storage_from("k_cache", &vec![CACHE_POISON; words]);
    let v_b = g.storage_from("v_cache", &vec![CACHE_POISON; words]);
    let step = step_buffer(g, c.pos, c.n_tokens);
    let d = k
        .bind(
            g,
            &qkv_b,
            &inv_b,
            &q_b,
            &k_b,
            &v_b,
            c.n_heads,
            c.n_kv_heads,
            hd,
            c.ctx,
            c.m_max,
            &step,
        )
        .expect("bind");
    run_dispatches(g, &[&d]);
    let q = g.read_f32(&q_b, c.m_max * q_dim).expect("read q");
    let kc = unpack_f16(&g.read_u32(&k_b, words).expect("read k"));
    let vc = unpack_f16(&g.read_u32(&v_b, words).expect("read v"));
    let what = format!(
        "rope_kv heads {}/{} hd {hd} pos {}",
        c.n_heads, c.n_kv_heads, c.pos
    );

    for t in 0..c.n_tokens {
        let row = &qkv[t * width..(t + 1) * width];
        let p = c.pos + t;
        for h in 0..c.n_heads {
            let want = rope_ref(&row[h * hd..(h + 1) * hd], &inv_freq, p);
            let got = &q[t * q_dim + h * hd..t * q_dim + (h + 1) * hd];
            assert_close(&format!("{what}: q token {t} head {h}"), got, &want, 2e-5);
        }
        for h in 0..c.n_kv_heads {
            let cache = (h * c.ctx + p) * hd;
            let k_src = &row[q_dim + h * hd..q_dim + (h + 1) * hd];
            let v_src = &row[q_dim + kv_dim + h * hd..q_dim + kv_dim + (h + 1) * hd];
            if p >= c.ctx {
                continue;
            }
            let k_want = rope_ref(k_src, &inv_freq, p);
            for (name, got, want) in [
                ("k", &kc[cache..cache + hd], &k_want[..]),
                ("v", &vc[cache..cache + hd], v_src),
            ] {
                assert_f16_cache(&format!("{what}: {name} token {t} kv head {h}"), got, want);
            }
        }
    }
    assert_all_nan(
        &format!("{what}: q rows past n_tokens"),
        &q[c.n_tokens * q_dim..],
    );
    // Every cache position outside [pos, pos + n_tokens) keeps its poison.
    for (name, cache) in [("k", &kc), ("v", &vc)] {
        for h in 0..c.n_kv_heads {
            for p in (0..c.ctx).filter(|&p| p < c.pos || p >= c.pos + c.n_tokens) {
                let at = (h * c.ctx + p) * hd;
                assert_all_nan(
                    &format!("{what}: {name} cache head {h} position {p}"),
                    &cache[at..at + hd],
                );
            }
        }
    }
}

#[test]
fn rope_kv_matches_reference_for_several_gqa_ratios() {
    let mut rng = Rng::fresh("rope_kv");
    let cases = [
        RopeCase {
            n_heads: 2,
            n_kv_heads: 2,
            head_dim: 64,
            ctx: 9,
            m_max: 5,
            n_tokens: 3,
            pos: 4,
        },
        RopeCase {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 128,
            ctx: 5000,
            m_max: 4,
            n_tokens: 4,
            pos: 4990,
        },
        RopeCase {
            n_heads: 7,
            n_kv_heads: 1,
            head_dim: 6,
            ctx: 70000,
            m_max: 3,
            n_tokens: 2,
            pos: 65536,
        },
        RopeCase {
            n_heads: 14,
            n_kv_heads: 2,
            head_dim: 64,
            ctx: 20,
            m_max: 1,
            n_tokens: 1,
            pos: 0,
        },
    ];
    for c in &cases {
        check_rope(c, &mut rng);
    }
}

#[test]
fn rope_kv_never_writes_past_ctx() {
    let mut rng = Rng::fresh("rope_kv ctx guard");
    // Tokens at positions 6, 7 fit; 8, 9 fall past ctx = 8 and must be dropped (q is still written).
    let c = RopeCase {
        n_heads: 3,
        n_kv_heads: 1,
        head_dim: 32,
        ctx: 8,
        m_max: 6,
        n_tokens: 4,
        pos: 6,
    };
    check_rope(&c, &mut rng);
}

/// RoPE and the KV write of a batched decode step (`RopeKv::bind_batch`: rope_kv.wgsl with
/// batch_step.wgsl's rows): each live row rotated at its own position and written into its own
/// slot's region of caches holding three sequences; every other cache position, and the q row
/// past `n_rows`, keeps its poison.
#[test]
fn rope_kv_batched_rows_write_their_own_slots() {
    use q4wgpu::kernels::BatchStep;
    let g = gpu();
    let mut rng = Rng::fresh("rope_kv batched");
    let kernel = RopeKv::new(g).expect("compile rope_kv");
    let (nh, nkv, hd, ctx, slots) = (6, 2, 32, 40, 3);
    let (q_dim, kv_dim) = (nh * hd, nkv * hd);
    let width = q_dim + 2 * kv_dim;
    // (slot, position) per live row; one more row is bound.
    let live = [(1usize, 39usize), (2, 0), (0, 17)];
    let bound = live.len() + 1;
    let inv_freq: Vec<f32> = (0..hd / 2)
        .map(|i| (1.0 / 10000f64.powf(2.0 * i as f64 / hd as f64)) as f32)
        .collect();
    let qkv = rng.vec(bound * width, 1.5);
    let qkv_b = g.storage_from("qkv", &qkv);
    let inv_b = g.storage_from("inv_freq", &inv_freq);
    let q_b = poisoned(g, "q_out", bound * q_dim);
    let words = slots * nkv * ctx * hd / 2;
    let k_b = g.storage_from("k caches", &vec![CACHE_POISON; words]);
    let v_b = g.storage_from("v caches", &vec![CACHE_POISON; words]);
    let batch = g.uniform("batch rows", &BatchStep::new(&live));
    let d = kernel
        .bind_batch(
            g,
            &qkv_b,
            &inv_b,
            &q_b,
            &k_b,
            &v_b,
            (nh, nkv, hd),
            ctx,
            slots,
            bound,
            &batch,
        )
        .expect("bind batched rope_kv");
    run_dispatches(g, &[&d]);
    let q = g.read_f32(&q_b, bound * q_dim).expect("read q");
    let kc = unpack_f16(&g.read_u32(&k_b, words).expect("read k"));
    let vc = unpack_f16(&g.read_u32(&v_b, words).expect("read v"));
    let mut written = vec![false; slots * nkv * ctx];
    for (t, &(slot, p)) in live.iter().enumerate() {
        let row = &qkv[t * width..(t + 1) * width];
        for h in 0..nh {
            let want = rope_ref(&row[h * hd..(h + 1) * hd], &inv_freq, p);
            let got = &q[t * q_dim + h * hd..t * q_dim + (h + 1) * hd];
            assert_close(
                &format!("batched rope: q row {t} head {h}"),
                got,
                &want,
                2e-5,
            );
        }
        for h in 0..nkv {
            let at = (slot * nkv + h) * ctx + p;
            written[at] = true;
            let k_want = rope_ref(&row[q_dim + h * hd..q_dim + (h + 1) * hd], &inv_freq, p);
            let v_want = &row[q_dim + kv_dim + h * hd..q_dim + kv_dim + (h + 1) * hd];
            let what = format!("batched rope: row {t} (slot {slot}, position {p}) kv head {h}");
            assert_f16_cache(&format!("{what} k"), &kc[at * hd..(at + 1) * hd], &k_want);
            assert_f16_cache(&format!("{what} v"), &vc[at * hd..(at + 1) * hd], v_want);
        }
    }
    assert_all_nan(
        "batched rope: the q row past n_rows",
        &q[live.len() * q_dim..],
    );
    for (name, cache) in [("k", &kc), ("v", &vc)] {
        for at in (0..written.len()).filter(|&at| !written[at]) {
            assert_all_nan(
                &format!("batched rope: {name} cache row {at}"),
                &cache[at * hd..(at + 1) * hd],
            );
        }
    }
}
