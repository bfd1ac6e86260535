//! Synthetic models and `q4wgpu bench` on the tiny shape (lavapipe in CI).

use q4wgpu::bench::{self, BenchOptions, TG_PROMPT};
use q4wgpu::cpu::CpuModel;
use q4wgpu::engine::{CpuLayers, DecodeFusion, EngineOptions, GpuModel, StreamRead};
use q4wgpu::generate::Decoder;
use q4wgpu::gpu::testing::{assert_close, gpu, Rng};
use q4wgpu::quant::DecodeActivations;
use q4wgpu::quantize::expected_tensors;
use q4wgpu::scheduler::LayerPack;
use q4wgpu::synthetic::{synthetic_config, synthetic_weights, SYNTHETIC_NAMES};
use q4wgpu::weights::{is_quantized_name, Blob, DenseDtype, ModelWeights, Weight};
use q4wgpu::Arch;

#[test]
fn synthetic_configs_have_the_real_shapes_and_unknown_names_list_the_known_ones() {
    for name in SYNTHETIC_NAMES {
        let c = synthetic_config(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        c.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let c = synthetic_config("qwen2-32b").expect("known");
    assert_eq!(c.arch().ok(), Some(Arch::Qwen2));
    assert_eq!(
        (c.hidden_size, c.num_hidden_layers, c.intermediate_size),
        (5120, 64, 27648)
    );
    assert_eq!(
        (
            c.num_attention_heads,
            c.num_kv_heads(),
            c.head_dim(),
            c.vocab_size
        ),
        (40, 8, 128, 152064)
    );
    assert!(!c.tie_word_embeddings && c.qkv_bias());
    assert_eq!((c.rope_theta, c.rms_norm_eps), (1e6, 1e-5));
    // 16.49 GB of INT4 linear weights and lm_head per token (DESIGN.md §3).
    let lm_head = c.vocab_size * c.hidden_size.div_ceil(128) * (64 + 2);
    let bytes = LayerPack::new(&c).bytes * c.num_hidden_layers as u64 + lm_head as u64;
    assert!((16.48e9..16.50e9).contains(&(bytes as f64)), "{bytes}");

    let c = synthetic_config("llama-70b").expect("known");
    assert_eq!(c.arch().ok(), Some(Arch::Llama));
    assert_eq!(
        (c.hidden_size, c.num_hidden_layers, c.intermediate_size),
        (8192, 80, 28672)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_kv_heads(), c.vocab_size),
        (64, 8, 128256)
    );
    assert!(!c.qkv_bias() && !c.o_bias() && !c.tie_word_embeddings);
    let s = c.rope_scaling.as_ref().expect("llama3 scaling");
    assert_eq!(
        (
            s.rope_type.as_str(),
            s.factor,
            s.original_max_position_embeddings
        ),
        ("llama3", 8.0, 8192)
    );

    let c = synthetic_config("qwen2-0.5b").expect("known");
    assert_eq!(
        (
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_kv_heads(),
            c.vocab_size
        ),
        (896, 24, 14, 2, 151936)
    );
    assert!(c.tie_word_embeddings);
    let c = synthetic_config("qwen2-7b").expect("known");
    assert_eq!(
        (
            c.hidden_size,
            c.num_hidden_layers,
            c.intermediate_size,
            c.num_kv_heads()
        ),
        (3584, 28, 18944, 4)
    );

    let msg = synthetic_config("gpt-5").expect_err("unknown").to_string();
    for name in SYNTHETIC_NAMES {
        assert!(msg.contains(name), "{msg}");
    }
    assert!(msg.contains("gpt-5"), "{msg}");
}

fn owned_ptr(blob: &Blob) -> *const Vec<u32> {
    match blob {
        Blob::Owned(words, _) => std::sync::Arc::as_ptr(words),
        Blob::Mapped { .. } => panic!("synthetic weights are owned"),
    }
}

#[test]
fn synthetic_weights_have_the_names_shapes_and_types_of_a_quantized_model_and_share_layers() {
    let config = synthetic_config("tiny").expect("known");
    let w = synthetic_weights(&config, 7);
    let mut want = expected_tensors(&config);
    want.push((
        "lm_head.weight".into(),
        vec![config.vocab_size, config.hidden_size],
    ));
    let mut names: Vec<&String> = want.iter().map(|(n, _)| n).collect();
    names.sort();
    assert_eq!(w.tensors.keys().collect::<Vec<_>>(), names);
    for (name, shape) in &want {
        match w.get(name).expect("present") {
            Weight::Q4 { rows, cols, .. } => {
                assert!(is_quantized_name(name), "{name} should be dense");
                assert_eq!(&vec![*rows, *cols], shape, "{name}");
                let view = w.q4(name).expect("consistent INT4 data");
                // Padding of the short last block (192 = 128 + 64) holds level 0, as the quantizer writes it.
                let bpr = view.blocks_per_row();
                for r in [0, view.rows / 2, view.rows - 1] {
                    let last = &view.qweight[(r * bpr + bpr - 1) * 16..(r * bpr + bpr) * 16];
                    let tail = view.cols % 128;
                    if tail != 0 {
                        for i in tail..128 {
                            assert_eq!(
                                (last[i / 8] >> (4 * (i % 8))) & 0xF,
                                8,
                                "{name} row {r} element {i}"
                            );
                        }
                    }
                }
            }
            Weight::Dense {
                shape: s, dtype, ..
            } => {
                assert!(!is_quantized_name(name), "{name} should be INT4");
                assert_eq!(s, shape, "{name}");
                let expected = if name == "model.embed_tokens.weight" {
                    DenseDtype::BF16
                } else {
                    DenseDtype::F32
                };
                assert_eq!(*dtype, expected, "{name}");
                let (_, values) = w.dense_f32(name).expect("consistent dense data");
                assert!(values.iter().all(|v| v.is_finite()), "{name}");
                if name.ends_with("norm.weight") {
                    assert!(values.iter().all(|&v| v == 1.0), "{name}");
                }
            }
        }
    }
    // Layers share one allocation per kind: host memory is one layer's worth.
    let blob = |w: &ModelWeights, name: &str| match w.get(name).expect("present") {
        Weight::Q4 { qweight, .. } => owned_ptr(qweight),
        Weight::Dense { data, .. } => owned_ptr(data),
    };
    for kind in [
        "self_attn.q_proj.weight",
        "mlp.down_proj.weight",
        "self_attn.k_proj.bias",
        "input_layernorm.weight",
    ] {
        let first = blob(&w, &format!("model.layers.0.{kind}"));
        for l in 1..config.num_hidden_layers {
            assert_eq!(
                blob(&w, &format!("model.layers.{l}.{kind}")),
                first,
                "{kind} of layer {l}"
            );
        }
    }
    // The seed changes the values.
    let other = synthetic_weights(&config, 8);
    assert_ne!(
        w.q4("lm_head.weight").expect("q4").qweight,
        other.q4("lm_head.weight").expect("q4").qweight
    );
}

/// Logits stay finite and of order one through every layer (the scales keep activations at unit
/// RMS), and the GPU engine agrees with the CPU reference on them. Tolerance 1e-2 of the largest
/// logit: the GPU keeps the KV cache in f16 (relative rounding 5e-4) and sums in another order.
#[test]
fn synthetic_tiny_model_gives_finite_logits_on_the_cpu_reference_and_the_gpu() {
    let config = synthetic_config("tiny").expect("known");
    let w = synthetic_weights(&config, 11);
    let mut rng = Rng::fresh("synthetic logits");
    let tokens: Vec<u32> = (0..13)
        .map(|_| rng.below(config.vocab_size) as u32)
        .collect();
    let cpu = CpuModel::new(&w).expect("cpu model");
    let mut cache = cpu.new_cache(32);
    let all = cpu.forward_all(&mut cache, &tokens).expect("cpu forward");
    for (pos, logits) in all.iter().enumerate() {
        assert!(
            logits.iter().all(|v| v.is_finite()),
            "position {pos}: non-finite logits"
        );
        let rms = (logits.iter().map(|v| v * v).sum::<f32>() / logits.len() as f32).sqrt();
        assert!(
            (0.05..50.0).contains(&rms),
            "position {pos}: logits RMS {rms} is not of order one"
        );
    }
    let mut engine = GpuModel::new(
        gpu(),
        &w,
        EngineOptions {
            ctx_size: 32,
            chunk: 5,
            ..Default::default()
        },
    )
    .expect("engine");
    let got = engine.logits(&tokens).expect("gpu forward");
    assert_close("synthetic tiny logits", &got, &all[all.len() - 1], 1e-2);
}

fn small_options(budgets: Vec<Option<u64>>) -> BenchOptions {
    BenchOptions {
        prompt_tokens: 9,
        gen_tokens: 5,
        repetitions: 2,
        ctx_size: None,
        chunk: 4,
        budgets,
        stream_reads: vec![StreamRead::Ring],
        prefetch_depth: 1,
        bandwidth_bytes: 4 << 20,
        seed: 3,
        profile: false,
        decode_fusion: vec![Default::default()],
        decode_activations: vec![DecodeActivations::Int8],
        depths: vec![0],
        parallel: vec![1],
        cpu_layers: vec![CpuLayers::Count(0)],
    }
}

#[test]
fn profiled_decode_steps_time_every_role_and_compute_the_same_tokens() {
    let config = synthetic_config("tiny").expect("known");
    let w = synthetic_weights(&config, 7);
    let prompt = [3u32, 1, 4, 1, 5];
    let params = q4wgpu::sampling::SamplingParams::greedy();
    let opts = EngineOptions {
        ctx_size: 16,
        chunk: 8,
        ..Default::default()
    };
    let mut engine = GpuModel::new(gpu(), &w, opts).expect("engine");
    let first = engine
        .step(&prompt, &params, &prompt, 0, None)
        .expect("prompt")
        .token;
    if !gpu().caps.timestamps {
        let err = engine
            .profile_decode_step(first)
            .expect_err("no timestamps");
        assert!(err.to_string().contains("timestamp"), "{err}");
        return;
    }
    // A profiled step appends its token like a normal step: the greedy token after it is the
    // one a plain second step gives.
    engine.profile_decode_step(first).expect("profile");
    let mut history = prompt.to_vec();
    history.push(first);
    let after_profile = engine
        .step(&[first], &params, &history, 2, None)
        .expect("step")
        .token;
    engine.reset();
    let again = engine
        .step(&prompt, &params, &prompt, 0, None)
        .expect("prompt")
        .token;
    assert_eq!(again, first);
    engine
        .step(&[first], &params, &history, 1, None)
        .expect("step");
    let plain = engine
        .step(&[first], &params, &history, 2, None)
        .expect("step")
        .token;
    assert_eq!(after_profile, plain);

    // Every step of a decode step appears, separate or fused, once per layer.
    let all = DecodeFusion::ALL;
    let separate: &[&str] = &[
        "norm: ",
        "qkv: ",
        "rope + kv write: ",
        "attention: ",
        "o (+residual): ",
        "gate|up: ",
        "swiglu: ",
        "down (+residual): ",
    ];
    let fused: &[&str] = &[
        "norm + qkv: ",
        "rope + kv write: ",
        "attention: ",
        "o (+residual): ",
        "norm + gate|up: ",
        "swiglu + down (+residual): ",
    ];
    // With int8 activations each projection's input is quantized with the norm or SwiGLU before it
    // (quantized by a dispatch of its own, or inside the GEMV).
    let int8: &[&str] = &[
        "qkv input (int8): ",
        "qkv: ",
        "rope + kv write: ",
        "attention: ",
        "o (+residual) input (int8): ",
        "o (+residual): ",
        "gate|up input (int8): ",
        "gate|up: ",
        "down (+residual) input (int8): ",
        "down (+residual): ",
    ];
    // All fused: the attention combine writes the o projection's int8 input (head dim 32).
    let int8_fused: &[&str] = &[
        "qkv + rope + kv write, input quantized in: ",
        "attention, o input (int8) in the combine: ",
        "o (+residual): ",
        "gate|up, input quantized in: ",
        "down (+residual), input quantized in: ",
    ];
    let cases = [
        (DecodeActivations::F32, DecodeFusion::NONE, separate),
        (DecodeActivations::F32, all, fused),
        (DecodeActivations::Int8, DecodeFusion::NONE, int8),
        (DecodeActivations::Int8, all, int8_fused),
    ];
    for (activations, fusion, roles) in cases {
        let opts = BenchOptions {
            profile: true,
            decode_fusion: vec![fusion],
            decode_activations: vec![activations],
            ..small_options(vec![None])
        };
        let report =
            bench::run_bench(gpu(), &w, "tiny", &opts, &mut |_| {}).expect("bench with profile");
        assert_eq!(report.profiles.len(), 1);
        let p = &report.profiles[0];
        let layers = config.num_hidden_layers;
        let count = |prefix: &str| -> usize {
            p.dispatches
                .iter()
                .filter(|d| d.label.starts_with(prefix))
                .map(|d| d.count)
                .sum()
        };
        for role in roles {
            // Two norms per layer when separate.
            let per_layer = if *role == "norm: " { 2 } else { 1 };
            let n = count(role);
            assert!(
                n >= per_layer * layers && n % (per_layer * layers) == 0,
                "{fusion:?} {role}: {n} dispatches"
            );
        }
        for role in ["final norm", "lm_head: "] {
            assert!(count(role) >= 1, "{role}");
        }
        let roles_seen = p.dispatches.iter().filter(|d| {
            roles
                .iter()
                .chain(&["final norm", "lm_head: "])
                .any(|r| d.label.starts_with(r))
        });
        assert_eq!(
            roles_seen.count(),
            p.dispatches.len(),
            "unexpected roles in {p:?}"
        );
        assert!(
            p.dispatches
                .iter()
                .all(|d| d.seconds >= 0.0 && d.seconds.is_finite()),
            "{p:?}"
        );
        assert!(
            p.dispatches.iter().map(|d| d.seconds).sum::<f64>() > 0.0,
            "{p:?}"
        );
        let table = bench::profile_markdown(p);
        assert!(table.contains(&format!("| {}", roles[0])), "{table}");
    }
}

fn rel_eq(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

#[test]
fn bench_rows_have_positive_speeds_and_consistent_byte_counts_resident_and_streamed() {
    let config = synthetic_config("tiny").expect("known");
    let w = synthetic_weights(&config, 5);
    let opts = small_options(vec![None]);
    // A budget with room for the fixed buffers and two and a half layers: with one ring slot,
    // one layer stays resident and the other three stream.
    let fixed = {
        let engine = GpuModel::new(
            gpu(),
            &w,
            EngineOptions {
                ctx_size: opts.needed_ctx(),
                chunk: opts.chunk,
                ..Default::default()
            },
        )
        .expect("engine");
        engine.plan().fixed_bytes
    };
    let pack = LayerPack::new(&config);
    let budget = fixed + 2 * pack.bytes + pack.bytes / 2;
    let opts = small_options(vec![None, Some(budget), Some(fixed / 2)]);
    let mut seen = 0;
    let report =
        bench::run_bench(gpu(), &w, "tiny", &opts, &mut |_| seen += 1).expect("bench runs");
    assert_eq!(report.rows.len(), 4, "pp and tg at two budgets");
    assert_eq!(seen, 4);
    assert_eq!(
        report.skipped.len(),
        1,
        "a budget below the fixed buffers is skipped"
    );
    assert!(
        report.skipped[0].reason.contains("minimum"),
        "{}",
        report.skipped[0].reason
    );
    let bw = &report.bandwidth;
    // The read bandwidth comes from shaders/stream_read.wgsl.
    assert!(bw.read > 0.0 && bw.upload > 0.0, "{bw:?}");

    let lm = w.q4("lm_head.weight").expect("lm_head");
    let lm_bytes = (lm.qweight.len() * 4 + lm.scales.len() * 2) as f64;
    let weights_pass = (config.num_hidden_layers as u64 * pack.bytes) as f64;
    let kv_per_pos = (config.num_hidden_layers * 2 * config.kv_dim() * 2) as f64;
    let (p, n, chunk) = (opts.prompt_tokens, opts.gen_tokens, opts.chunk);
    let passes = p.div_ceil(chunk);
    for r in &report.rows {
        let what = format!("{} at {}", r.test, bench::budget_label(r.budget));
        assert_eq!(r.samples.len(), opts.repetitions, "{what}");
        assert!(
            r.samples.iter().all(|&s| s > 0.0 && s.is_finite()),
            "{what}: {:?}",
            r.samples
        );
        assert!(
            r.tokens_per_second_min <= r.tokens_per_second
                && r.tokens_per_second <= r.tokens_per_second_max,
            "{what}"
        );
        assert_eq!(r.layer_bytes, pack.bytes, "{what}");
        assert_eq!(
            r.resident_layers + r.streamed_layers,
            config.num_hidden_layers,
            "{what}"
        );
        let streamed_pass = (r.streamed_layers as u64 * pack.bytes) as f64;
        let (bytes, streamed) = if r.test == format!("tg{n}") {
            let mean_kv = TG_PROMPT as f64 + (n as f64 + 1.0) / 2.0;
            assert_eq!(r.generated.len(), n, "{what}");
            assert!(
                r.generated
                    .iter()
                    .all(|&t| (t as usize) < config.vocab_size),
                "{what}"
            );
            (
                weights_pass + lm_bytes + mean_kv * kv_per_pos,
                streamed_pass,
            )
        } else {
            assert_eq!(r.test, format!("pp{p}"));
            let kv: f64 = (1..=passes)
                .map(|c| (c * chunk).min(p) as f64 * kv_per_pos)
                .sum();
            (
                (passes as f64 * weights_pass + lm_bytes + kv) / p as f64,
                passes as f64 * streamed_pass / p as f64,
            )
        };
        assert!(
            rel_eq(r.bytes_per_token, bytes),
            "{what}: {} bytes/token, expected {bytes}",
            r.bytes_per_token
        );
        assert!(
            rel_eq(r.streamed_bytes_per_token, streamed),
            "{what}: {} streamed, expected {streamed}",
            r.streamed_bytes_per_token
        );
        assert!(
            rel_eq(r.achieved_bytes_per_second, bytes * r.tokens_per_second),
            "{what}"
        );
        let limit = 1.0 / ((bytes - streamed) / bw.read + streamed / bw.upload);
        assert!(rel_eq(r.memory_limit_tokens_per_second, limit), "{what}");
        assert!(
            rel_eq(r.fraction_of_memory_limit, r.tokens_per_second / limit),
            "{what}"
        );
        match r.budget {
            None => {
                assert_eq!(r.streamed_layers, 0, "{what}");
                assert!(
                    r.pcie_bound_tokens_per_second.is_none() && r.fraction_of_pcie_bound.is_none(),
                    "{what}"
                );
            }
            Some(b) => {
                assert_eq!(b, budget);
                assert_eq!((r.resident_layers, r.streamed_layers), (1, 3), "{what}");
                let bound = r
                    .pcie_bound_tokens_per_second
                    .expect("streamed rows have a PCIe bound");
                assert!(rel_eq(bound, bw.upload / streamed), "{what}");
                assert!(
                    rel_eq(
                        r.fraction_of_pcie_bound.expect("ratio"),
                        r.tokens_per_second / bound
                    ),
                    "{what}"
                );
            }
        }
    }
    // Streaming changes where weights live, not the arithmetic: the same greedy tokens.
    let tg: Vec<&bench::BenchRow> = report
        .rows
        .iter()
        .filter(|r| r.test.starts_with("tg"))
        .collect();
    assert_eq!(
        tg[0].generated, tg[1].generated,
        "resident and streamed runs generate the same tokens"
    );

    let md = bench::markdown(&report);
    assert_eq!(
        md.lines().filter(|l| l.starts_with("| tiny |")).count(),
        4,
        "{md}"
    );
    let json = serde_json::to_value(&report).expect("serialises");
    assert_eq!(json["rows"].as_array().map(Vec::len), Some(4));
}

#[test]
fn budget_lists_parse_and_options_are_checked() {
    let b = bench::parse_budgets("all, 24GB,8GiB").expect("valid");
    assert_eq!(b, vec![None, Some(24_000_000_000), Some(8 << 30)]);
    assert!(bench::parse_budgets("all,lots").is_err());
    assert_eq!(StreamRead::parse("ring").expect("ring"), StreamRead::Ring);
    assert_eq!(
        StreamRead::parse("zero-copy").expect("zero-copy"),
        StreamRead::ZeroCopy
    );
    let err = StreamRead::parse("pinned").expect_err("unknown");
    assert!(err.to_string().contains("ring or zero-copy"), "{err}");
    assert_eq!(
        DecodeFusion::parse("none").expect("none"),
        DecodeFusion::NONE
    );
    let f = DecodeFusion::parse("input-norm, swiglu").expect("list");
    assert!(f.input_norm && !f.post_norm && f.swiglu, "{f:?}");
    let f = DecodeFusion::parse("attention-combine").expect("combine");
    assert_eq!(
        f,
        DecodeFusion {
            attention_combine: true,
            ..DecodeFusion::NONE
        }
    );
    assert_eq!(DecodeFusion::parse(&f.name()).expect("round trip"), f);
    let err = DecodeFusion::parse("input-norm,rope").expect_err("unknown");
    assert!(err.to_string().contains("\"rope\""), "{err}");
    let w = synthetic_weights(&synthetic_config("tiny").expect("known"), 1);
    let no_reps = BenchOptions {
        repetitions: 0,
        ..small_options(vec![None])
    };
    assert!(bench::run_bench(gpu(), &w, "tiny", &no_reps, &mut |_| {}).is_err());
    let short_ctx = BenchOptions {
        ctx_size: Some(5),
        ..small_options(vec![None])
    };
    let err = bench::run_bench(gpu(), &w, "tiny", &short_ctx, &mut |_| {})
        .expect_err("ctx too small")
        .to_string();
    assert!(err.contains("--ctx-size"), "{err}");
    // A chunk longer than the context is cut to it (the engine refuses a chunk beyond the context).
    let long_chunk = BenchOptions {
        prompt_tokens: 5,
        gen_tokens: 0,
        repetitions: 1,
        chunk: 64,
        ..small_options(vec![None])
    };
    let report = bench::run_bench(gpu(), &w, "tiny", &long_chunk, &mut |_| {}).expect("runs");
    assert_eq!(
        (report.options.chunk, report.options.ctx_size),
        (5, Some(5))
    );
    assert_eq!(report.rows.len(), 1);
    assert_eq!(report.rows[0].test, "pp5");
}

/// `-d`: each depth gets its own prompt and generation rows, named as llama-bench names them,
/// with the KV bytes of the deeper cache counted; the context grows to hold the deepest tests.
#[test]
fn depth_rows_are_named_and_counted_like_llama_bench() {
    let config = synthetic_config("tiny").expect("known");
    let w = synthetic_weights(&config, 5);
    let opts = BenchOptions {
        depths: vec![0, 24],
        ..small_options(vec![None])
    };
    assert_eq!(opts.needed_ctx(), 24 + 9);
    let report = bench::run_bench(gpu(), &w, "tiny", &opts, &mut |_| {}).expect("bench at depths");
    let names: Vec<&str> = report.rows.iter().map(|r| r.test.as_str()).collect();
    assert_eq!(names, ["pp9", "tg5", "pp9 @ d24", "tg5 @ d24"]);
    assert!(report.rows[3].bytes_per_token > report.rows[1].bytes_per_token);
    let mut engine = GpuModel::new(
        gpu(),
        &w,
        EngineOptions {
            ctx_size: 16,
            chunk: 4,
            ..Default::default()
        },
    )
    .expect("engine");
    let err = engine.skip_to(16).expect_err("no room left");
    assert!(err.to_string().contains("depth 16"), "{err}");
}

/// `--parallel`: a row per number of sequences above 1, named `tg5 xN`, counting every
/// sequence's tokens, with the weight pass shared (fewer bytes per token); each sequence of the
/// batch (same prompt, greedy) generates the tokens the lone tg row generated.
#[test]
fn parallel_rows_share_the_weight_pass_and_generate_the_lone_sequence() {
    let config = synthetic_config("tiny").expect("known");
    let w = synthetic_weights(&config, 5);
    let opts = BenchOptions {
        prompt_tokens: 0,
        parallel: vec![1, 2, 3],
        ..small_options(vec![None])
    };
    let report = bench::run_bench(gpu(), &w, "tiny", &opts, &mut |_| {}).expect("bench");
    let names: Vec<&str> = report.rows.iter().map(|r| r.test.as_str()).collect();
    assert_eq!(names, ["tg5", "tg5 x2", "tg5 x3"]);
    let (one, two, three) = (&report.rows[0], &report.rows[1], &report.rows[2]);
    assert_eq!((two.tokens, three.tokens), (10, 15));
    assert!(
        three.bytes_per_token < two.bytes_per_token && two.bytes_per_token < one.bytes_per_token
    );
    assert_eq!(two.generated, one.generated, "a batched sequence's tokens");
    assert_eq!(
        three.generated, one.generated,
        "a batched sequence's tokens"
    );
    let too_many = BenchOptions {
        parallel: vec![9],
        ..opts
    };
    assert!(bench::run_bench(gpu(), &w, "tiny", &too_many, &mut |_| {}).is_err());
}
