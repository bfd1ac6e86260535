//! The CPU reference model against itself (one token at a time vs. whole sequences vs. mixed
//! chunks) and against an independent, naive full-recompute implementation in f64; its small ops
//! against hand formulas; and its refusals (context overflow, missing or misshapen tensors).
//!
//! Tolerance: relative error (max |got - want| / max |want|) ≤ 1e-4. Both sides decode the same
//! stored bytes (each with its own code), so the only difference is f32 vs. f64 arithmetic (about
//! 1e-6 here).

use q4wgpu::config::ModelConfig;
use q4wgpu::cpu::{apply_rope, attention, rms_norm, silu, CpuModel, Heads};
use q4wgpu::gpu::testing::Rng;
use q4wgpu::quant::QMatrix;
use q4wgpu::weights::{ModelWeights, Weight};
use q4wgpu::Error;
use std::collections::BTreeMap;

const TOL: f64 = 1e-4;

/// Qwen2-shaped: q/k/v bias, 5 query heads sharing 1 KV head, sizes that are not multiples of 128.
fn qwen_config() -> ModelConfig {
    serde_json::from_str(
        r#"{"architectures":["Qwen2ForCausalLM"],"hidden_size":160,"intermediate_size":300,
        "num_hidden_layers":2,"num_attention_heads":5,"num_key_value_heads":1,"vocab_size":263,
        "rms_norm_eps":1e-6,"rope_theta":1000000.0,"tie_word_embeddings":true}"#,
    )
    .expect("valid config json")
}

/// Llama-shaped: 6 query heads over 2 KV heads, head_dim 40 (q_dim 240 ≠ hidden 200), q/k/v/o bias,
/// llama3 RoPE scaling with a short original context so the ramp covers several frequencies.
fn llama_config() -> ModelConfig {
    serde_json::from_str(
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":200,"intermediate_size":333,
        "num_hidden_layers":2,"num_attention_heads":6,"num_key_value_heads":2,"head_dim":40,
        "vocab_size":301,"rms_norm_eps":1e-5,"rope_theta":500000.0,"attention_bias":true,
        "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
        "original_max_position_embeddings":64}}"#,
    )
    .expect("valid config json")
}

/// Random weights in memory: INT4 linears, bf16 embeddings and biases, norms in f32 and bf16.
fn random_weights(config: &ModelConfig, rng: &mut Rng) -> ModelWeights {
    let (hidden, inter, vocab) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    );
    let (q_dim, kv_dim) = (config.q_dim(), config.kv_dim());
    let mut t = BTreeMap::new();
    let linear = |t: &mut BTreeMap<String, Weight>,
                  name: String,
                  rows: usize,
                  cols: usize,
                  rng: &mut Rng| {
        let data = rng.vec(rows * cols, 1.0 / (cols as f32).sqrt());
        t.insert(
            name,
            Weight::from_qmatrix(QMatrix::quantize(&data, rows, cols)),
        );
    };
    let norm =
        |rng: &mut Rng, n: usize| -> Vec<f32> { (0..n).map(|_| 1.0 + rng.normal(0.2)).collect() };
    t.insert(
        "model.embed_tokens.weight".into(),
        Weight::dense_bf16(vec![vocab, hidden], &rng.vec(vocab * hidden, 1.0)),
    );
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}");
        t.insert(
            format!("{p}.input_layernorm.weight"),
            Weight::dense_bf16(vec![hidden], &norm(rng, hidden)),
        );
        t.insert(
            format!("{p}.post_attention_layernorm.weight"),
            Weight::dense_f32(vec![hidden], &norm(rng, hidden)),
        );
        linear(
            &mut t,
            format!("{p}.self_attn.q_proj.weight"),
            q_dim,
            hidden,
            rng,
        );
        linear(
            &mut t,
            format!("{p}.self_attn.k_proj.weight"),
            kv_dim,
            hidden,
            rng,
        );
        linear(
            &mut t,
            format!("{p}.self_attn.v_proj.weight"),
            kv_dim,
            hidden,
            rng,
        );
        linear(
            &mut t,
            format!("{p}.self_attn.o_proj.weight"),
            hidden,
            q_dim,
            rng,
        );
        linear(
            &mut t,
            format!("{p}.mlp.gate_proj.weight"),
            inter,
            hidden,
            rng,
        );
        linear(
            &mut t,
            format!("{p}.mlp.up_proj.weight"),
            inter,
            hidden,
            rng,
        );
        linear(
            &mut t,
            format!("{p}.mlp.down_proj.weight"),
            hidden,
            inter,
            rng,
        );
        if config.qkv_bias() {
            for (name, n) in [("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)] {
                t.insert(
                    format!("{p}.self_attn.{name}.bias"),
                    Weight::dense_bf16(vec![n], &rng.vec(n, 0.5)),
                );
            }
        }
        if config.o_bias() {
            t.insert(
                format!("{p}.self_attn.o_proj.bias"),
                Weight::dense_bf16(vec![hidden], &rng.vec(hidden, 0.5)),
            );
        }
    }
    t.insert(
        "model.norm.weight".into(),
        Weight::dense_f32(vec![hidden], &norm(rng, hidden)),
    );
    linear(&mut t, "lm_head.weight".into(), vocab, hidden, rng);
    ModelWeights {
        config: config.clone(),
        tensors: t,
    }
}

/// max |got - want| / max |want|; infinite when any value on either side is not finite (a NaN
/// would otherwise vanish in the maximum).
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            if g.is_finite() && w.is_finite() {
                (g as f64 - w).abs()
            } else {
                f64::INFINITY
            }
        })
        .fold(0.0, f64::max)
        / scale
}

/// An independent implementation: recomputes every position from scratch, no cache, f64 sums.
/// It shares no code with the model under test: weights are decoded here straight from their
/// stored bytes (the INT4 layout of README.md "The INT4 format", bf16/f16/f32 bit patterns), and
/// the RoPE frequencies (llama3 ramp included) are computed here from the formula, in f64.
mod naive {
    use super::*;
    use q4wgpu::weights::DenseDtype;

    struct Mat {
        rows: usize,
        cols: usize,
        data: Vec<f64>,
    }

    /// An INT4 matrix from its bytes: per row, blocks of 128 as 16 little-endian u32 words,
    /// element i of a block in bits 4*(i%8).. of word i/8 as q + 8; one bf16 scale per block.
    fn mat(w: &ModelWeights, name: &str) -> Mat {
        let Some(Weight::Q4 {
            rows,
            cols,
            qweight,
            scales,
        }) = w.tensors.get(name)
        else {
            panic!("{name}: no INT4 matrix")
        };
        let (rows, cols, blocks) = (*rows, *cols, cols.div_ceil(128));
        let (qb, sb) = (qweight.bytes(), scales.bytes());
        assert_eq!(
            (qb.len(), sb.len()),
            (rows * blocks * 64, rows * blocks * 2),
            "{name}"
        );
        let mut data = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            for c in 0..cols {
                let (b, i) = (r * blocks + c / 128, c % 128);
                let at = b * 64 + (i / 8) * 4;
                let word = u32::from_le_bytes([qb[at], qb[at + 1], qb[at + 2], qb[at + 3]]);
                let q = ((word >> (4 * (i % 8))) & 0xF) as f64 - 8.0;
                let scale =
                    f32::from_bits((u16::from_le_bytes([sb[2 * b], sb[2 * b + 1]]) as u32) << 16);
                data.push(q * scale as f64);
            }
        }
        Mat { rows, cols, data }
    }

    /// A dense tensor from its bytes, whatever its stored type.
    fn vec_of(w: &ModelWeights, name: &str) -> Vec<f64> {
        let Some(Weight::Dense { dtype, data, .. }) = w.tensors.get(name) else {
            panic!("{name}: no dense tensor")
        };
        let b = data.bytes();
        match dtype {
            DenseDtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
            DenseDtype::BF16 => b
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64)
                .collect(),
            DenseDtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
        }
    }

    /// RoPE inverse frequencies from the config's numbers: 1/theta^(2i/d), and with llama3
    /// scaling, wavelengths beyond original_ctx/low divided by factor, below original_ctx/high
    /// kept, linear in original_ctx/wavelength between.
    fn inv_freq(c: &ModelConfig) -> Vec<f64> {
        let d = c.head_dim();
        (0..d / 2)
            .map(|i| {
                let f = (c.rope_theta as f64).powf(-2.0 * i as f64 / d as f64);
                let Some(s) = c.rope_scaling.as_ref().filter(|s| s.rope_type == "llama3") else {
                    return f;
                };
                let (factor, lo, hi) = (
                    s.factor as f64,
                    s.low_freq_factor as f64,
                    s.high_freq_factor as f64,
                );
                let ctx = s.original_max_position_embeddings as f64;
                let ctx_over_wavelen = ctx * f / (2.0 * std::f64::consts::PI);
                let t = ((ctx_over_wavelen - lo) / (hi - lo)).clamp(0.0, 1.0);
                f / factor * (1.0 - t) + f * t
            })
            .collect()
    }

    fn mul(m: &Mat, x: &[f64]) -> Vec<f64> {
        (0..m.rows)
            .map(|r| (0..m.cols).map(|c| m.data[r * m.cols + c] * x[c]).sum())
            .collect()
    }

    fn linear(w: &ModelWeights, name: &str, bias: bool, x: &[f64]) -> Vec<f64> {
        let mut y = mul(&mat(w, &format!("{name}.weight")), x);
        if bias {
            for (yi, b) in y.iter_mut().zip(vec_of(w, &format!("{name}.bias"))) {
                *yi += b;
            }
        }
        y
    }

    fn norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        x.iter()
            .zip(w)
            .map(|(v, wi)| v / (ms + eps).sqrt() * wi)
            .collect()
    }

    fn rope(x: &mut [f64], pos: usize, inv_freq: &[f64]) {
        let half = inv_freq.len();
        for head in x.chunks_mut(2 * half) {
            for i in 0..half {
                let angle = pos as f64 * inv_freq[i];
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * angle.cos() - b * angle.sin();
                head[i + half] = b * angle.cos() + a * angle.sin();
            }
        }
    }

    /// Logits of every position of `tokens`.
    pub fn logits(w: &ModelWeights, tokens: &[u32]) -> Vec<Vec<f64>> {
        let c = &w.config;
        let (hd, nh, nkv) = (c.head_dim(), c.num_attention_heads, c.num_kv_heads());
        let eps = c.rms_norm_eps as f64;
        let inv_freq = inv_freq(c);
        let embed = vec_of(w, "model.embed_tokens.weight");
        let mut xs: Vec<Vec<f64>> = tokens
            .iter()
            .map(|&t| embed[t as usize * c.hidden_size..(t as usize + 1) * c.hidden_size].to_vec())
            .collect();
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let hs: Vec<Vec<f64>> = xs
                .iter()
                .map(|x| norm(x, &vec_of(w, &format!("{p}.input_layernorm.weight")), eps))
                .collect();
            let mut qs = Vec::new();
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            for (pos, h) in hs.iter().enumerate() {
                let mut q = linear(w, &format!("{p}.self_attn.q_proj"), c.qkv_bias(), h);
                let mut k = linear(w, &format!("{p}.self_attn.k_proj"), c.qkv_bias(), h);
                rope(&mut q, pos, &inv_freq);
                rope(&mut k, pos, &inv_freq);
                qs.push(q);
                ks.push(k);
                vs.push(linear(w, &format!("{p}.self_attn.v_proj"), c.qkv_bias(), h));
            }
            for t in 0..xs.len() {
                let mut att = vec![0.0; nh * hd];
                for head in 0..nh {
                    let kvh = head / (nh / nkv);
                    let scores: Vec<f64> = (0..=t)
                        .map(|s| {
                            (0..hd)
                                .map(|d| qs[t][head * hd + d] * ks[s][kvh * hd + d])
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let z: f64 = scores.iter().map(|s| s.exp()).sum();
                    for (s, sc) in scores.iter().enumerate() {
                        for d in 0..hd {
                            att[head * hd + d] += sc.exp() / z * vs[s][kvh * hd + d];
                        }
                    }
                }
                let o = linear(w, &format!("{p}.self_attn.o_proj"), c.o_bias(), &att);
                xs[t].iter_mut().zip(o).for_each(|(x, o)| *x += o);
            }
            for x in xs.iter_mut() {
                let h = norm(
                    x,
                    &vec_of(w, &format!("{p}.post_attention_layernorm.weight")),
                    eps,
                );
                let gate = linear(w, &format!("{p}.mlp.gate_proj"), false, &h);
                let up = linear(w, &format!("{p}.mlp.up_proj"), false, &h);
                let act: Vec<f64> = gate
                    .iter()
                    .zip(&up)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let down = linear(w, &format!("{p}.mlp.down_proj"), false, &act);
                x.iter_mut().zip(down).for_each(|(x, d)| *x += d);
            }
        }
        let head = mat(w, "lm_head.weight");
        xs.iter()
            .map(|x| mul(&head, &norm(x, &vec_of(w, "model.norm.weight"), eps)))
            .collect()
    }
}

fn check_paths_agree(config: ModelConfig, what: &str) {
    let mut rng = Rng::fresh(what);
    let weights = random_weights(&config, &mut rng);
    let model = CpuModel::new(&weights).expect("complete weights");
    let n = 11;
    let tokens: Vec<u32> = (0..n)
        .map(|_| rng.below(config.vocab_size) as u32)
        .collect();
    let want = naive::logits(&weights, &tokens);

    let mut cache = model.new_cache(n + 3);
    let whole = model
        .forward_all(&mut cache, &tokens)
        .expect("fits the context");
    assert_eq!(cache.len(), n);

    let mut cache = model.new_cache(n);
    let one_by_one: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&t| model.forward(&mut cache, &[t]).expect("fits"))
        .collect();

    let mut cache = model.new_cache(n);
    let mut chunked = Vec::new();
    for chunk in [&tokens[..4], &tokens[4..5], &tokens[5..9], &tokens[9..]] {
        chunked.extend(model.forward_all(&mut cache, chunk).expect("fits"));
    }
    let mut cache = model.new_cache(n);
    let last = model.forward(&mut cache, &tokens).expect("fits");

    for t in 0..n {
        for (name, got) in [
            ("whole sequence", &whole[t]),
            ("one token at a time", &one_by_one[t]),
            ("chunks 4,1,4,2", &chunked[t]),
        ] {
            let e = rel_err(got, &want[t]);
            assert!(
                e <= TOL,
                "{what}: {name}, position {t}: relative error {e:e} against the naive model"
            );
        }
    }
    let e = rel_err(&last, &want[n - 1]);
    assert!(
        e <= TOL,
        "{what}: forward's last logits: relative error {e:e}"
    );
    // The comparison means something only if positions differ (context and position matter).
    let spread = rel_err(&whole[n - 1], &want[n - 2]);
    assert!(
        spread > 100.0 * TOL,
        "{what}: logits of the last two positions are nearly equal ({spread:e})"
    );
}

#[test]
fn qwen_incremental_whole_chunked_and_naive_agree() {
    check_paths_agree(qwen_config(), "qwen");
}

#[test]
fn llama_incremental_whole_chunked_and_naive_agree() {
    check_paths_agree(llama_config(), "llama");
}

#[test]
fn truncated_cache_recomputes_the_same_logits() {
    let mut rng = Rng::fresh("truncate");
    let weights = random_weights(&qwen_config(), &mut rng);
    let model = CpuModel::new(&weights).expect("complete weights");
    let tokens: Vec<u32> = (0..7).map(|_| rng.below(263) as u32).collect();
    let mut cache = model.new_cache(8);
    let first = model.forward(&mut cache, &tokens).expect("fits");
    cache.truncate(4);
    assert_eq!(cache.len(), 4);
    let again = model.forward(&mut cache, &tokens[4..]).expect("fits");
    assert_eq!(
        first, again,
        "the same positions recomputed after truncation give the same logits"
    );
}

#[test]
fn rms_norm_matches_hand_computation() {
    let (x, w, eps) = ([1.0f32, -2.0, 3.0, 4.0], [1.0f32, 0.5, 2.0, -1.0], 1e-6f32);
    let rms = ((1.0 + 4.0 + 9.0 + 16.0) / 4.0 + 1e-6f64).sqrt();
    let want = [1.0 / rms, -1.0 / rms, 6.0 / rms, -4.0 / rms];
    let mut out = [f32::NAN; 4];
    rms_norm(&x, &w, eps, &mut out);
    let e = rel_err(&out, &want);
    assert!(e <= 1e-6, "hand example: {out:?} vs {want:?}");

    let mut rng = Rng::fresh("rms_norm");
    let n = 897;
    let x = rng.vec(n, 3.0);
    let w = rng.vec(n, 1.0);
    let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
    let want: Vec<f64> = x
        .iter()
        .zip(&w)
        .map(|(&v, &wi)| v as f64 * wi as f64 / (ms + 1e-5).sqrt())
        .collect();
    let mut out = vec![f32::NAN; n];
    rms_norm(&x, &w, 1e-5, &mut out);
    let e = rel_err(&out, &want);
    assert!(e <= 1e-5, "random length {n}: relative error {e:e}");
}

#[test]
fn rope_matches_rotation_formula_at_large_positions() {
    let mut rng = Rng::fresh("rope");
    for config in [qwen_config(), llama_config()] {
        let inv_freq = config.rope_inv_freq();
        let hd = config.head_dim();
        let heads = 3;
        for pos in [0usize, 1, 5, 4095, 4096, 4097, 10_007, 131_071] {
            let x = rng.vec(heads * hd, 1.0);
            let mut got = x.clone();
            apply_rope(&mut got, pos, &inv_freq);
            let mut want = vec![0.0f64; x.len()];
            for h in 0..heads {
                for i in 0..hd / 2 {
                    // The angle is the f32 product, as Hugging Face forms it; the rotation in f64.
                    let angle = (pos as f32 * inv_freq[i]) as f64;
                    let (a, b) = (x[h * hd + i] as f64, x[h * hd + i + hd / 2] as f64);
                    want[h * hd + i] = a * angle.cos() - b * angle.sin();
                    want[h * hd + i + hd / 2] = b * angle.cos() + a * angle.sin();
                }
            }
            let e = rel_err(&got, &want);
            assert!(
                e <= 1e-5,
                "head_dim {hd}, position {pos}: relative error {e:e}"
            );
            if pos == 0 {
                assert_eq!(got, x, "position 0 is the identity");
            }
        }
    }
}

#[test]
fn attention_matches_naive_f64_softmax() {
    let mut rng = Rng::fresh("attention");
    let hd = 24;
    for (groups, n_kv_heads) in [(1usize, 3usize), (3, 2), (5, 1)] {
        let heads = Heads {
            n_heads: groups * n_kv_heads,
            n_kv_heads,
            head_dim: hd,
        };
        for n_pos in [1usize, 7, 4099] {
            // Scores reach beyond 88, where exp overflows in f32 unless the maximum is subtracted.
            let q = rng.vec(heads.q_dim(), 8.0);
            let keys = rng.vec(n_pos * heads.kv_dim(), 4.0);
            let values = rng.vec(n_pos * heads.kv_dim(), 1.0);
            let mut got = vec![f32::NAN; heads.q_dim()];
            attention(heads, &q, &keys, &values, &mut got);
            let mut want = vec![0.0f64; heads.q_dim()];
            for h in 0..heads.n_heads {
                let kvh = h / groups;
                let scores: Vec<f64> = (0..n_pos)
                    .map(|p| {
                        let dot: f64 = (0..hd)
                            .map(|d| {
                                q[h * hd + d] as f64
                                    * keys[p * heads.kv_dim() + kvh * hd + d] as f64
                            })
                            .sum();
                        dot / (hd as f64).sqrt()
                    })
                    .collect();
                let z: f64 = scores.iter().map(|s| s.exp()).sum();
                for (p, s) in scores.iter().enumerate() {
                    for d in 0..hd {
                        want[h * hd + d] +=
                            s.exp() / z * values[p * heads.kv_dim() + kvh * hd + d] as f64;
                    }
                }
            }
            let e = rel_err(&got, &want);
            assert!(
                e <= TOL,
                "groups {groups}, kv heads {n_kv_heads}, {n_pos} positions: relative error {e:e}"
            );
        }
    }
}

#[test]
fn silu_is_x_times_sigmoid() {
    for x in [-30.0f32, -2.5, -1e-3, 0.0, 0.7, 3.0, 40.0] {
        let want = x as f64 / (1.0 + (-(x as f64)).exp());
        assert!(
            (silu(x) as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3),
            "silu({x}) = {} vs {want}",
            silu(x)
        );
    }
}

#[test]
fn prompt_longer_than_context_is_refused_and_the_cache_kept() {
    let mut rng = Rng::fresh("ctx");
    let weights = random_weights(&qwen_config(), &mut rng);
    let model = CpuModel::new(&weights).expect("complete weights");
    let mut cache = model.new_cache(5);
    let check = |r: Result<Vec<f32>, Error>| match r {
        Err(Error::Invalid(msg)) => assert!(
            msg.contains("longer than the context") && msg.contains("--ctx-size"),
            "{msg}"
        ),
        other => panic!("expected a context error, got {other:?}"),
    };
    check(model.forward(&mut cache, &[1, 2, 3, 4, 5, 6]));
    assert_eq!(cache.len(), 0);
    model.forward(&mut cache, &[1, 2, 3]).expect("3 of 5 fit");
    check(model.forward(&mut cache, &[4, 5, 6]));
    assert_eq!(cache.len(), 3);
    model
        .forward(&mut cache, &[4, 5])
        .expect("exactly fills the context");
    check(model.forward(&mut cache, &[6]));
    assert_eq!(cache.len(), 5);
}

#[test]
fn out_of_vocabulary_token_is_refused() {
    let mut rng = Rng::fresh("vocab");
    let weights = random_weights(&qwen_config(), &mut rng);
    let model = CpuModel::new(&weights).expect("complete weights");
    let mut cache = model.new_cache(4);
    match model.forward(&mut cache, &[1, 263]) {
        Err(Error::Invalid(msg)) => assert!(msg.contains("263"), "{msg}"),
        other => panic!("expected an invalid-token error, got {other:?}"),
    }
    assert_eq!(cache.len(), 0);
}

#[test]
fn missing_or_misshapen_tensors_are_named() {
    let mut rng = Rng::fresh("missing");
    let config = qwen_config();
    let weights = random_weights(&config, &mut rng);
    let expect_error = |w: &ModelWeights, name: &str, also: &str| match CpuModel::new(w) {
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(name) && msg.contains(also),
                "error for {name} should say {also:?}: {msg}"
            );
        }
        Ok(_) => panic!("weights with a bad {name} were accepted"),
    };
    for name in [
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.0.self_attn.k_proj.bias",
        "model.layers.1.post_attention_layernorm.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        let mut w = weights.clone();
        w.tensors.remove(name);
        expect_error(&w, name, "no tensor");
    }
    let mut w = weights.clone();
    let name = "model.layers.0.self_attn.o_proj.weight";
    w.tensors.insert(
        name.into(),
        Weight::from_qmatrix(QMatrix::quantize(&rng.vec(160 * 128, 0.1), 128, 160)),
    );
    expect_error(&w, name, "[160, 160]");
    let mut w = weights.clone();
    let name = "model.layers.1.mlp.down_proj.weight";
    w.tensors.insert(
        name.into(),
        Weight::dense_f32(vec![160, 300], &rng.vec(160 * 300, 0.1)),
    );
    expect_error(&w, name, "INT4");
    let mut w = weights;
    let name = "model.layers.0.input_layernorm.weight";
    w.tensors.insert(
        name.into(),
        Weight::dense_f32(vec![161], &rng.vec(161, 0.1)),
    );
    expect_error(&w, name, "[160]");
}
