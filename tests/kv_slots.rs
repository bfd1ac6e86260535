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

/// A tiny random model of `arch`, written to a temp folder named after `name`, loaded, and the
/// folder removed.
fn tiny_model(name: &str, arch: Arch, seed: u64) -> model::LoadedModel {
    let dir = std::env::temp_dir().join(format!("q4wgpu-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    test_models::write_tiny_hf_model(&dir, arch, seed).expect("write tiny model");
    let loaded = model::load(&dir, false).expect("load");
    let _ = std::fs::remove_dir_all(&dir);
    loaded
}

#[test]
fn interleaved_slots_match_the_cpu_reference_and_a_lone_sequence() {
    let mut rng = Rng::fresh("kv slots");
    // Llama's tiny shape has 2 KV heads, so each swap copies several ranges per cache.
    let loaded = tiny_model("kv-slots", Arch::Llama, 21);
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

/// One slot's record: its prompt, then per step the token fed and what was sampled.
struct Record {
    prompt: Vec<u32>,
    steps: Vec<(u32, q4wgpu::generate::StepOutput)>,
}

/// How far a batched step's output (`b`) is from the lone step's (`a`): the largest difference
/// between the log-probabilities of the same token in both (the sampled token and the
/// alternatives, matched by token). Infinite where a token of one is missing from the other,
/// unless it sits within `allowed` of the other's least likely listed token, or where the
/// sampled tokens differ and were not nearly equally likely (near ties rounding may settle
/// either way).
fn output_gap(
    a: &q4wgpu::generate::StepOutput,
    b: &q4wgpu::generate::StepOutput,
    allowed: f32,
) -> f32 {
    let (Some(la), Some(lb)) = (&a.logprobs, &b.logprobs) else {
        return f32::INFINITY;
    };
    let listed = |l: &q4wgpu::generate::TokenLogprobs| {
        let mut all = l.top.clone();
        if !all.iter().any(|t| t.0 == l.token) {
            all.push((l.token, l.logprob));
        }
        all
    };
    let (ta, tb) = (listed(la), listed(lb));
    let mut gap = 0.0f32;
    for (x, y) in [(&ta, &tb), (&tb, &ta)] {
        let floor = y.iter().map(|t| t.1).fold(f32::INFINITY, f32::min);
        for &(id, lp) in x.iter() {
            match y.iter().find(|t| t.0 == id) {
                Some(t) => gap = gap.max((t.1 - lp).abs()),
                None if lp <= floor + allowed => {}
                None => return f32::INFINITY,
            }
        }
    }
    // Different tokens only where both were nearly equally likely: samplers order tokens by
    // probability, and rounding may swap two that are nearly equal.
    if a.token != b.token && (la.logprob - lb.logprob).abs() > allowed {
        return f32::INFINITY;
    }
    gap
}

/// The most a batched step's log-probabilities may differ from the lone step's. On lavapipe the
/// two paths give the same bits (1e-5 allows printing round trips). On a GPU the driver compiles
/// the batched and the one-sequence kernels (and their fusions) apart, their sums may differ by
/// an ulp, and a later layer's int8 quantization can turn that ulp into a whole level of one
/// input: on the H200, 28 runs gave differences up to 2.5e-2 (deterministic per seed, so
/// not a race), and 2 of 15 runs sampled another token of the same probability (-4.92 against
/// -4.92) at temperature 0.9. There the check is looser, and tokens may differ only in a near
/// tie; the strict check of the slot logic is the lavapipe one, which CI runs.
fn logprob_gap_allowed() -> f32 {
    if gpu().is_cpu() {
        1e-5
    } else {
        5e-2
    }
}

/// The batched decode step (`GpuModel::step_batch`, int8 activations): sequences in three slots,
/// stepped in random subsets and orders, mixed with a lone step, sample
/// the tokens and log-probabilities that each sequence gets on an engine that runs it alone, with
/// greedy, seeded and repetition-penalised sampling.
#[test]
fn batched_steps_sample_what_each_sequence_samples_alone() {
    use q4wgpu::engine::BatchEntry;
    use q4wgpu::generate::Decoder;
    use q4wgpu::sampling::SamplingParams;
    let mut rng = Rng::fresh("batched steps");
    let loaded = tiny_model("batch", Arch::Qwen2, 5);
    let vocab = loaded.weights.config.vocab_size;
    let opts = |slots| EngineOptions {
        ctx_size: 64,
        chunk: 8,
        kv_slots: slots,
        ..Default::default()
    };
    let mut engine = GpuModel::new(gpu(), &loaded.weights, opts(3)).expect("engine");
    assert_eq!(engine.batch_capacity(), 3);
    let params = [
        SamplingParams::greedy(),
        SamplingParams {
            temperature: 0.9,
            top_k: 40,
            seed: 7,
            ..SamplingParams::greedy()
        },
        SamplingParams {
            repeat_penalty: 1.3,
            repeat_last_n: 16,
            ..SamplingParams::greedy()
        },
    ];
    let mut records: Vec<Record> = Vec::new();
    let mut next = Vec::new();
    for (s, len) in [3usize, 7, 11].into_iter().enumerate() {
        let prompt: Vec<u32> = (0..len).map(|_| rng.below(vocab) as u32).collect();
        engine.select_kv_slot(s).expect("select");
        let out = engine
            .step(&prompt, &params[s], &prompt, 0, Some(3))
            .expect("prompt");
        next.push(out.token);
        records.push(Record {
            prompt,
            steps: Vec::new(),
        });
    }
    let history = |r: &Record| -> Vec<u32> {
        let mut h = r.prompt.clone();
        h.extend(r.steps.iter().map(|(_, o)| o.token));
        h
    };
    for round in 0..8 {
        let mut order = vec![0usize, 1, 2];
        for i in (1..3).rev() {
            order.swap(i, rng.below(i + 1));
        }
        order.truncate(1 + rng.below(3));
        if round == 4 {
            // A lone step in between: the working cache takes slot 1 back, then parks again.
            engine.select_kv_slot(1).expect("select");
            let h = history(&records[1]);
            let n = records[1].steps.len() as u32;
            let out = engine
                .step(&[next[1]], &params[1], &h, n + 1, Some(3))
                .expect("lone step");
            records[1].steps.push((next[1], out.clone()));
            next[1] = out.token;
        }
        let histories: Vec<Vec<u32>> = order.iter().map(|&s| history(&records[s])).collect();
        let entries: Vec<BatchEntry> = order
            .iter()
            .zip(&histories)
            .map(|(&s, h)| BatchEntry {
                slot: s,
                token: next[s],
                params: &params[s],
                history: h,
                step: records[s].steps.len() as u32 + 1,
                top_logprobs: Some(3),
            })
            .collect();
        let outs = engine.step_batch(&entries).expect("batched step");
        for (&s, out) in order.iter().zip(outs) {
            assert_eq!(
                engine.slot_len(s),
                records[s].prompt.len() + records[s].steps.len() + 1
            );
            records[s].steps.push((next[s], out.clone()));
            next[s] = out.token;
        }
    }
    let mut widest = 0.0f32;
    let allowed = logprob_gap_allowed();
    for (s, r) in records.iter().enumerate() {
        let mut alone = GpuModel::new(gpu(), &loaded.weights, opts(1)).expect("engine");
        alone
            .step(&r.prompt, &params[s], &r.prompt, 0, Some(3))
            .expect("prompt");
        let mut h = r.prompt.clone();
        for (i, (fed, want)) in r.steps.iter().enumerate() {
            let got = alone
                .step(&[*fed], &params[s], &h, i as u32 + 1, Some(3))
                .expect("step");
            let gap = output_gap(&got, want, allowed);
            assert!(
                gap <= allowed,
                "slot {s} step {i}: batched {want:?}, alone {got:?}"
            );
            widest = widest.max(gap);
            h.push(want.token);
        }
    }
    eprintln!("largest batched-vs-lone log-probability difference: {widest:e}");
    let bad = [BatchEntry {
        slot: 3,
        token: 0,
        params: &params[0],
        history: &[],
        step: 0,
        top_logprobs: None,
    }];
    assert!(engine.step_batch(&bad).is_err());
}
