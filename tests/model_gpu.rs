//! The whole model on the GPU against the CPU reference, on tiny random Qwen2 and Llama
//! checkpoints written in the Hugging Face layout, quantized on load; and streaming under budgets.

use q4wgpu::cpu::CpuModel;
use q4wgpu::engine::{DecodeFusion, EngineOptions, GpuModel, StreamRead};
use q4wgpu::gpu::testing::{gpu, Rng};
use q4wgpu::model::{self, LoadedModel};
use q4wgpu::{test_models, Arch};

/// GPU and CPU differ by accumulation order and by the f16 KV cache (the CPU keeps f32):
/// measured ~1e-4 of the largest logit; this bound still catches a wrong epsilon, mask or head map.
const LOGIT_TOLERANCE: f32 = 2e-3;

fn tiny_model(arch: Arch, seed: u64) -> LoadedModel {
    tiny_model_with_layers(arch, seed, test_models::tiny_config(arch).num_hidden_layers)
}

fn tiny_model_with_layers(arch: Arch, seed: u64, layers: usize) -> LoadedModel {
    let dir = std::env::temp_dir().join(format!(
        "q4wgpu-model-gpu-{arch:?}-{seed}-{layers}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = test_models::tiny_config(arch);
    config.num_hidden_layers = layers;
    test_models::write_hf_model(&dir, &config, seed).expect("write tiny model");
    let loaded = model::load(&dir, false).expect("load tiny model");
    let _ = std::fs::remove_dir_all(&dir);
    loaded
}

fn max_rel_err(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            if g.is_finite() {
                (g - w).abs() / scale
            } else {
                f32::INFINITY
            }
        })
        .fold(0.0, f32::max)
}

fn options(chunk: usize) -> EngineOptions {
    EngineOptions {
        ctx_size: 256,
        chunk,
        ..Default::default()
    }
}

/// Prompt in chunks (one longer than the chunk size, so it is split), then single-token decode
/// steps: every step's logits must match the CPU reference's.
fn gpu_matches_cpu(arch: Arch) {
    let mut rng = Rng::fresh("gpu vs cpu");
    let loaded = tiny_model(arch, rng.next_u64() % 1000);
    let vocab = loaded.weights.config.vocab_size;
    let prompt: Vec<u32> = (0..21).map(|_| rng.below(vocab) as u32).collect();
    let steps: Vec<u32> = (0..6).map(|_| rng.below(vocab) as u32).collect();
    let cpu = CpuModel::new(&loaded.weights).expect("cpu model");
    // Decode with every elementwise step separate, with all of them fused into the GEMVs, and as
    // the engine chooses by default.
    let all = DecodeFusion {
        input_norm: true,
        post_norm: true,
        swiglu: true,
    };
    for fusion in [DecodeFusion::NONE, all, DecodeFusion::default()] {
        let mut cache = cpu.new_cache(256);
        let opts = EngineOptions {
            decode_fusion: fusion,
            ..options(8)
        };
        let mut engine = GpuModel::new(gpu(), &loaded.weights, opts).expect("gpu model");
        let want = cpu.forward(&mut cache, &prompt).expect("cpu prompt");
        let got = engine.logits(&prompt).expect("gpu prompt");
        let err = max_rel_err(&got, &want);
        assert!(
            err <= LOGIT_TOLERANCE,
            "{arch:?} prompt logits: max relative error {err:e}"
        );
        for (step, &token) in steps.iter().enumerate() {
            let want = cpu.forward(&mut cache, &[token]).expect("cpu step");
            let got = engine.logits(&[token]).expect("gpu step");
            let err = max_rel_err(&got, &want);
            assert!(
                err <= LOGIT_TOLERANCE,
                "{arch:?} decode step {step} with {fusion:?}: max relative error {err:e}"
            );
        }
    }
}

#[test]
fn qwen2_gpu_logits_match_the_cpu_reference() {
    gpu_matches_cpu(Arch::Qwen2);
}

#[test]
fn llama_gpu_logits_match_the_cpu_reference() {
    gpu_matches_cpu(Arch::Llama);
}

/// Streamed layers run the same kernels on the same bytes: logits are bit-identical at any budget.
#[test]
fn logits_are_bit_identical_when_layers_stream() {
    let mut rng = Rng::fresh("streaming");
    let loaded = tiny_model_with_layers(Arch::Qwen2, 7, 5);
    let vocab = loaded.weights.config.vocab_size;
    let prompt: Vec<u32> = (0..11).map(|_| rng.below(vocab) as u32).collect();
    let next = rng.below(vocab) as u32;
    let run_reading = |budget: Option<u64>, reads: StreamRead| {
        let mut e = GpuModel::new(
            gpu(),
            &loaded.weights,
            EngineOptions {
                vram_budget: budget,
                prefetch_depth: 1,
                decode_reads: reads,
                prompt_reads: reads,
                ..options(4)
            },
        )
        .expect("engine under budget");
        let plan = e.plan().clone();
        let a = e.logits(&prompt).expect("prompt");
        let b = e.logits(&[next]).expect("decode");
        (plan, a, b)
    };
    let (all, want_prompt, want_decode) = run_reading(None, StreamRead::Ring);
    assert_eq!(all.streamed_layers(), 0);
    let layers = all.layers;
    // Zero-copy reads of host memory need MAPPABLE_PRIMARY_BUFFERS (lavapipe and NVIDIA have it);
    // without it they are refused with a clear error.
    let zero_copy = gpu().caps.mappable_primary_buffers;
    if !zero_copy {
        let err = GpuModel::new(
            gpu(),
            &loaded.weights,
            EngineOptions {
                vram_budget: Some(all.fixed_bytes + all.layer_bytes),
                decode_reads: StreamRead::ZeroCopy,
                ..options(4)
            },
        )
        .err()
        .expect("zero-copy refused");
        assert!(
            err.to_string().contains("MAPPABLE_PRIMARY_BUFFERS"),
            "{err}"
        );
    }
    let reads: &[StreamRead] = if zero_copy {
        &[StreamRead::Ring, StreamRead::ZeroCopy]
    } else {
        &[StreamRead::Ring]
    };
    // Some, most and all layers streamed, through one ring slot or read from host memory.
    let configs = [layers - 2, 1, 0]
        .into_iter()
        .flat_map(|r| reads.iter().map(move |&m| (r, m)));
    for (resident, reads) in configs {
        let budget = all.fixed_bytes + (resident as u64 + 1) * all.layer_bytes;
        let (plan, got_prompt, got_decode) = run_reading(Some(budget), reads);
        assert_eq!(
            plan.resident_layers,
            resident,
            "budget {budget}: {}",
            plan.describe()
        );
        assert_eq!(plan.streamed_layers(), layers - resident);
        assert!(
            got_prompt == want_prompt,
            "prompt logits differ with {} streamed layers read by {reads:?}",
            layers - resident
        );
        assert!(
            got_decode == want_decode,
            "decode logits differ with {} streamed layers read by {reads:?}",
            layers - resident
        );
    }
}

#[test]
fn a_budget_below_the_minimum_is_a_clear_error() {
    let loaded = tiny_model(Arch::Llama, 3);
    let err = GpuModel::new(
        gpu(),
        &loaded.weights,
        EngineOptions {
            vram_budget: Some(1000),
            ..options(4)
        },
    )
    .err()
    .expect("a 1000-byte budget cannot work");
    let msg = err.to_string();
    assert!(
        msg.contains("minimum is") && msg.contains("--vram-budget"),
        "{msg}"
    );
}

#[test]
fn a_sequence_longer_than_the_context_is_refused() {
    let loaded = tiny_model(Arch::Qwen2, 5);
    let mut engine = GpuModel::new(
        gpu(),
        &loaded.weights,
        EngineOptions {
            ctx_size: 16,
            chunk: 4,
            ..Default::default()
        },
    )
    .expect("engine");
    let err = engine
        .logits(&[1u32; 17])
        .err()
        .expect("17 tokens do not fit 16");
    assert!(err.to_string().contains("--ctx-size"), "{err}");
    // Nothing was consumed: a prompt that fits still runs from position 0.
    engine.logits(&[1u32; 16]).expect("16 tokens fit");
}

/// Prompts of 2-8 tokens go through decode steps (see engine::SHORT_PROMPT), longer ones through
/// prompt chunks: either way the sampled token's log-probability after the prompt matches the CPU
/// reference's, and so does the next step's, so the KV cache was filled right.
#[test]
fn short_prompts_through_decode_steps_match_the_cpu_reference() {
    use q4wgpu::generate::Decoder;
    use q4wgpu::sampling::{logprobs, SamplingParams};
    let mut rng = Rng::fresh("short prompts");
    let loaded = tiny_model(Arch::Llama, 17);
    let vocab = loaded.weights.config.vocab_size;
    let cpu = CpuModel::new(&loaded.weights).expect("cpu model");
    let mut engine = GpuModel::new(gpu(), &loaded.weights, options(16)).expect("gpu model");
    let greedy = SamplingParams::greedy();
    for n in [2, 5, 8, 9] {
        engine.reset();
        let prompt: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
        let mut cache = cpu.new_cache(256);
        let mut history = prompt.clone();
        let mut tokens = prompt.clone();
        for step in 0..2u32 {
            let out = engine
                .step(&tokens, &greedy, &history, step, Some(2))
                .expect("gpu step");
            let want_logits = cpu.forward(&mut cache, &tokens).expect("cpu step");
            let scale = want_logits.iter().fold(0f32, |m, v| m.max(v.abs()));
            let want = logprobs(&want_logits, out.token, 2);
            let got = out.logprobs.expect("logprobs asked for");
            let tol = 2.0 * LOGIT_TOLERANCE * scale + 1e-4;
            assert!(
                (got.logprob - want.logprob).abs() <= tol,
                "prompt of {n}, step {step}: logprob {} vs CPU {} (tolerance {tol})",
                got.logprob,
                want.logprob
            );
            // The greedy pick is the CPU's argmax unless the two best are within the tolerance.
            let (best, second) = (want.top[0], want.top[1]);
            if best.1 - second.1 > tol {
                assert_eq!(out.token, best.0, "prompt of {n}, step {step}");
            }
            history.push(out.token);
            tokens = vec![out.token];
        }
    }
}
