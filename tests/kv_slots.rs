//! Several sequences on one GPU engine (`EngineOptions::kv_slots`, used by `serve --parallel`):
//! steps of three sequences interleaved in a shuffled order, with prompt-cache truncation, give
//! every sequence the logits the CPU reference computes for it alone, and bit for bit the logits
//! of an engine that ran only that sequence.

use q4wgpu::cpu::CpuModel;
use q4wgpu::engine::{EngineOptions, GpuModel};
use q4wgpu::gpu::testing::{gpu, Rng};
use q4wgpu::quant::DecodeActivations;
use q4wgpu::{model, test_models, Arch};

/// As in tests/model_gpu.rs: accumulation order and the f16 KV cache.
const LOGIT_TOLERANCE: f32 = 2e-3;

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

#[test]
fn interleaved_slots_match_the_cpu_reference_and_a_lone_sequence() {
    let mut rng = Rng::fresh("kv slots");
    let dir = std::env::temp_dir().join(format!("q4wgpu-kv-slots-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Llama's tiny shape has 2 KV heads, so each swap copies several ranges per cache.
    test_models::write_tiny_hf_model(&dir, Arch::Llama, 21).expect("write tiny model");
    let loaded = model::load(&dir, false).expect("load");
    let _ = std::fs::remove_dir_all(&dir);
    let vocab = loaded.weights.config.vocab_size;
    let opts = |slots| EngineOptions {
        ctx_size: 64,
        chunk: 8,
        kv_slots: slots,
        // f32 activations, so the CPU reference's tolerance holds (int8 ones are tested elsewhere).
        decode_activations: DecodeActivations::F32,
        ..Default::default()
    };
    let cpu = CpuModel::new(&loaded.weights).expect("cpu model");
    let mut engine = GpuModel::new(gpu(), &loaded.weights, opts(3)).expect("engine");
    assert_eq!(engine.kv_slots(), 3);
    let mut caches: Vec<_> = (0..3).map(|_| cpu.new_cache(64)).collect();
    // Slot 0's steps and logits, replayed on a one-sequence engine at the end.
    let mut slot0: Vec<(Option<usize>, Vec<u32>, Vec<f32>)> = Vec::new();
    let random =
        |n: usize, rng: &mut Rng| -> Vec<u32> { (0..n).map(|_| rng.below(vocab) as u32).collect() };
    for round in 0..6 {
        let mut order = vec![0usize, 1, 2];
        for i in (1..3).rev() {
            order.swap(i, rng.below(i + 1));
        }
        for &s in &order {
            engine.select_kv_slot(s).expect("select");
            // Round 0 feeds prompts (a chunk and a half for slot 1); round 3 cuts every cache
            // back, as the prompt cache does, before a new multi-token piece.
            let mut cut = None;
            let tokens = match round {
                0 => random([5, 13, 9][s], &mut rng),
                3 => {
                    let keep = engine.slot_len(s) - 2 - s;
                    engine.truncate(keep);
                    caches[s].truncate(keep);
                    cut = Some(keep);
                    random(3, &mut rng)
                }
                _ => random(1, &mut rng),
            };
            assert_eq!(engine.slot_len(s), caches[s].len(), "slot {s} length");
            let got = engine.logits(&tokens).expect("gpu step");
            let want = cpu.forward(&mut caches[s], &tokens).expect("cpu step");
            let err = max_rel_err(&got, &want);
            assert!(
                err <= LOGIT_TOLERANCE,
                "round {round}, slot {s}: max relative error {err:e}"
            );
            if s == 0 {
                slot0.push((cut, tokens, got));
            }
        }
    }
    let mut alone = GpuModel::new(gpu(), &loaded.weights, opts(1)).expect("engine");
    for (i, (cut, tokens, want)) in slot0.iter().enumerate() {
        if let Some(keep) = cut {
            alone.truncate(*keep);
        }
        let got = alone.logits(tokens).expect("lone step");
        assert!(
            got.iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "step {i}: slot 0 differs from the same sequence run alone"
        );
    }
    assert!(engine.select_kv_slot(3).is_err());
}
