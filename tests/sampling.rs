//! The CPU sampler against independent f64 computations of what each step should do, and its
//! draws against the distribution they should follow.

use q4wgpu::gpu::testing::Rng;
use q4wgpu::sampling::{
    distribution, logprobs, penalized, rng_uniform, sample_at, Sampler, SamplingParams,
    MAX_CANDIDATES,
};

fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 64,
        seed: 0,
    }
}

/// The highest logit, lowest id on ties, written independently of the library.
fn reference_argmax(logits: &[f32]) -> u32 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    logits.iter().position(|&l| l == max).expect("non-empty") as u32
}

/// Steps 3–6 in f64 with a full sort: (token, probability) of the kept candidates.
fn reference_distribution(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f64)> {
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    ids.sort_by(|&a, &b| {
        logits[b as usize]
            .partial_cmp(&logits[a as usize])
            .expect("finite")
            .then(a.cmp(&b))
    });
    let k = if p.top_k == 0 { ids.len() } else { p.top_k };
    ids.truncate(k.min(MAX_CANDIDATES));
    let scaled: Vec<f64> = ids
        .iter()
        .map(|&i| logits[i as usize] as f64 / p.temperature as f64)
        .collect();
    // min-p: candidates at least min_p times as likely as the first.
    let ratio = |s: &f64| (s - scaled[0]).exp();
    let n_min_p = scaled
        .iter()
        .take_while(|s| ratio(s) >= p.min_p as f64)
        .count()
        .max(1);
    let (ids, scaled) = (&ids[..n_min_p], &scaled[..n_min_p]);
    let z: f64 = scaled.iter().map(ratio).sum();
    let probs: Vec<f64> = scaled.iter().map(|s| ratio(s) / z).collect();
    let mut keep = probs.len();
    let mut cum = 0.0;
    for (i, q) in probs.iter().enumerate() {
        cum += q;
        if cum >= p.top_p as f64 {
            keep = i + 1;
            break;
        }
    }
    let total: f64 = probs[..keep].iter().sum();
    ids.iter()
        .copied()
        .zip(probs)
        .take(keep)
        .map(|(i, q)| (i, q / total))
        .collect()
}

#[test]
fn rng_matches_an_independent_transcription_and_is_uniform() {
    // The spec in 64-bit arithmetic with explicit masking: catches a wrong constant or shift.
    fn spec(seed: u32, step: u32) -> f32 {
        let m = 0xFFFF_FFFFu64;
        let mut s = (seed as u64 ^ ((step as u64 * 0x9E37_79B9) & m)) & m;
        s = (s * 747_796_405 + 2_891_336_453) & m;
        let w = (((s >> ((s >> 28) + 4)) ^ s) * 277_803_737) & m;
        let w = (w >> 22) ^ w;
        (w >> 8) as f32 / 16_777_216.0
    }
    let mut rng = Rng::fresh("rng");
    let seed = rng.next_u64() as u32;
    let n = 200_000u32;
    let mut buckets = [0u32; 16];
    for step in 0..n {
        let u = rng_uniform(seed, step);
        assert_eq!(u, spec(seed, step), "seed {seed} step {step}");
        assert!((0.0..1.0).contains(&u), "seed {seed} step {step}: {u}");
        buckets[(u * 16.0) as usize] += 1;
    }
    let expected = n as f64 / 16.0;
    let chi2: f64 = buckets
        .iter()
        .map(|&b| (b as f64 - expected).powi(2) / expected)
        .sum();
    // 15 degrees of freedom: mean 15, sd 5.5.
    assert!(
        chi2 < 15.0 + 8.0 * 5.5,
        "seed {seed}: buckets {buckets:?}, chi-square {chi2}"
    );
}

#[test]
fn greedy_is_argmax_with_ties_to_the_lowest_id() {
    let mut rng = Rng::fresh("greedy");
    let mut logits = rng.vec(1000, 3.0);
    let mut sampler = Sampler::new(SamplingParams::default());
    assert_eq!(sampler.sample(&logits, &[]), reference_argmax(&logits));
    let top = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) + 1.0;
    logits[503] = top;
    logits[17] = top;
    for _ in 0..5 {
        assert_eq!(sampler.sample(&logits, &[]), 17);
    }
    assert_eq!(sampler.step, 6, "the step advances on greedy calls too");
}

#[test]
fn temperature_near_zero_approaches_greedy_and_top_k_one_is_greedy() {
    let mut rng = Rng::fresh("near greedy");
    let mut logits = rng.vec(777, 3.0);
    let best = rng.below(777);
    logits[best] = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) + 0.05;
    let mut cold = Sampler::new(SamplingParams {
        seed: rng.next_u64(),
        ..params(1e-3, 0, 1.0)
    });
    let mut top1 = Sampler::new(SamplingParams {
        seed: rng.next_u64(),
        ..params(1.5, 1, 1.0)
    });
    let mut warm = Sampler::new(SamplingParams {
        seed: rng.next_u64(),
        ..params(1.0, 0, 1.0)
    });
    let mut warm_picked_other = false;
    for _ in 0..300 {
        assert_eq!(cold.sample(&logits, &[]), best as u32, "temperature 1e-3");
        assert_eq!(top1.sample(&logits, &[]), best as u32, "top_k 1");
        warm_picked_other |= warm.sample(&logits, &[]) != best as u32;
    }
    assert!(
        warm_picked_other,
        "at temperature 1 the sampler should not always pick the argmax"
    );
}

#[test]
fn seeded_sampler_is_reproducible_and_seeds_differ() {
    let mut rng = Rng::fresh("seeds");
    let logits = rng.vec(500, 0.5);
    let history: Vec<u32> = (0..40).map(|_| rng.below(500) as u32).collect();
    let base = SamplingParams {
        repeat_penalty: 1.1,
        ..params(0.9, 50, 0.95)
    };
    let run = |seed: u64| {
        let mut s = Sampler::new(SamplingParams {
            seed,
            ..base.clone()
        });
        (0..200)
            .map(|_| s.sample(&logits, &history))
            .collect::<Vec<u32>>()
    };
    let seed = rng.next_u64();
    let other = seed ^ 0x5555;
    assert_eq!(run(seed), run(seed), "seed {seed}");
    assert_ne!(run(seed), run(other), "seeds {seed} and {other}");
    // sample_at is the same step function, so a sampler can be replayed from any step.
    let p = SamplingParams {
        seed,
        ..base.clone()
    };
    assert_eq!(run(seed)[123], sample_at(&p, &logits, &history, 123));
}

#[test]
fn draws_follow_the_top_p_truncated_softmax() {
    let mut rng = Rng::fresh("frequencies");
    let vocab = 60;
    let logits = rng.vec(vocab, 1.5);
    let mut p = SamplingParams {
        seed: rng.next_u64(),
        ..params(0.7, 25, 1.0)
    };
    // Put top_p halfway between two cumulative probabilities, so rounding cannot move the cut.
    let full = reference_distribution(&logits, &p);
    let cums: Vec<f64> = full
        .iter()
        .scan(0.0, |c, &(_, q)| {
            *c += q;
            Some(*c)
        })
        .collect();
    let cut = cums
        .iter()
        .position(|&c| c >= 0.9)
        .expect("cumulative reaches 1")
        .max(1);
    p.top_p = ((cums[cut - 1] + cums[cut]) / 2.0) as f32;
    let want = reference_distribution(&logits, &p);
    assert_eq!(want.len(), cut + 1);

    let got = distribution(&p, &logits, &[]);
    assert_eq!(
        got.iter().map(|c| c.0).collect::<Vec<_>>(),
        want.iter().map(|c| c.0).collect::<Vec<_>>(),
        "candidates"
    );
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g.1 as f64 - w.1).abs() <= 1e-6,
            "token {}: probability {} vs {}",
            g.0,
            g.1,
            w.1
        );
    }

    let n = 40_000;
    let mut counts = vec![0u32; vocab];
    let mut sampler = Sampler::new(p.clone());
    for _ in 0..n {
        counts[sampler.sample(&logits, &[]) as usize] += 1;
    }
    let mut chi2 = 0.0;
    for &(token, q) in &want {
        let expected = q * n as f64;
        chi2 += (counts[token as usize] as f64 - expected).powi(2) / expected;
    }
    let kept: u32 = want.iter().map(|&(t, _)| counts[t as usize]).sum();
    assert_eq!(kept, n, "every draw must come from the kept candidates");
    let df = (want.len() - 1).max(1) as f64;
    assert!(
        chi2 < df + 8.0 * (2.0 * df).sqrt() + 5.0,
        "chi-square {chi2} with {df} degrees of freedom; counts {counts:?}"
    );
}

#[test]
fn candidates_are_capped() {
    let mut rng = Rng::fresh("cap");
    let logits = rng.vec(1000, 0.1);
    let p = SamplingParams {
        seed: rng.next_u64(),
        ..params(5.0, 0, 1.0)
    };
    let dist = distribution(&p, &logits, &[]);
    assert_eq!(dist.len(), MAX_CANDIDATES);
    let mut sorted = logits.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let threshold = sorted[MAX_CANDIDATES - 1];
    let mut sampler = Sampler::new(p);
    for _ in 0..2000 {
        let t = sampler.sample(&logits, &[]);
        assert!(
            logits[t as usize] >= threshold,
            "token {t} is not among the {MAX_CANDIDATES} best"
        );
    }
}

#[test]
fn repetition_penalty_lowers_recent_distinct_tokens_once() {
    let mut rng = Rng::fresh("penalty");
    let vocab = 300;
    let mut logits = rng.vec(vocab, 2.0);
    logits[10] = 2.5;
    logits[11] = -1.5;
    logits[12] = 3.0; // only outside the window
    let p = SamplingParams {
        repeat_penalty: 1.3,
        repeat_last_n: 4,
        seed: rng.next_u64(),
        ..params(1.0, 0, 1.0)
    };
    let history = [12, 7, 10, 11, 10];
    let out = penalized(&p, &logits, &history);
    for (t, (&o, &l)) in out.iter().zip(&logits).enumerate() {
        let want = match t {
            7 | 10 | 11 => {
                if l > 0.0 {
                    l / 1.3
                } else {
                    l * 1.3
                }
            }
            _ => l,
        };
        assert_eq!(o, want, "token {t}: history {history:?}, window 4");
    }
    let before = distribution(
        &SamplingParams {
            repeat_penalty: 1.0,
            ..p.clone()
        },
        &logits,
        &history,
    );
    let after = distribution(&p, &logits, &history);
    let prob = |d: &[(u32, f32)], t: u32| d.iter().find(|c| c.0 == t).map_or(0.0, |c| c.1);
    assert!(prob(&after, 10) < prob(&before, 10) && prob(&after, 11) < prob(&before, 11));

    // Greedy: a narrow leader that was just generated loses its place.
    let mut logits = rng.vec(vocab, 1.0);
    let top = logits.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let (leader, runner_up) = (
        rng.below(vocab / 2) as u32,
        (vocab / 2 + rng.below(vocab / 2)) as u32,
    );
    logits[runner_up as usize] = top + 1.0;
    logits[leader as usize] = top + 1.01;
    let greedy = SamplingParams {
        repeat_penalty: 1.5,
        ..SamplingParams::default()
    };
    assert_eq!(Sampler::new(greedy).sample(&logits, &[leader]), runner_up);
    assert_eq!(
        Sampler::new(SamplingParams::default()).sample(&logits, &[leader]),
        leader
    );
}

#[test]
fn logprobs_are_the_log_softmax_of_the_raw_logits() {
    let mut rng = Rng::fresh("logprobs");
    let vocab = 1501;
    let logits = rng.vec(vocab, 4.0);
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_z = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    let mut total = 0.0f64;
    for t in 0..vocab as u32 {
        let lp = logprobs(&logits, t, 0);
        let want = logits[t as usize] as f64 - log_z;
        assert!(
            (lp.logprob as f64 - want).abs() <= 1e-5,
            "token {t}: {} vs {want}",
            lp.logprob
        );
        assert_eq!(lp.token, t);
        total += (lp.logprob as f64).exp();
    }
    assert!((total - 1.0).abs() <= 1e-4, "probabilities sum to {total}");

    let top_n = 7;
    let lp = logprobs(&logits, 3, top_n);
    let mut order: Vec<u32> = (0..vocab as u32).collect();
    order.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    assert_eq!(
        lp.top.iter().map(|t| t.0).collect::<Vec<_>>(),
        order[..top_n].to_vec()
    );
    for &(t, l) in &lp.top {
        assert!(
            (l as f64 - (logits[t as usize] as f64 - log_z)).abs() <= 1e-5,
            "top token {t}"
        );
    }
}

/// min-p keeps exactly the candidates at least `min_p` times as likely as the best one: with
/// logits whose ratios to the best are 1, 1/2, 1/4, 1/8, ..., min-p 0.2 keeps the first three,
/// renormalised, and draws never leave them.
#[test]
fn min_p_keeps_candidates_within_the_ratio_of_the_best() {
    let logits: Vec<f32> = (0..10).map(|i| -(i as f32) * std::f32::consts::LN_2).collect();
    let p = SamplingParams {
        min_p: 0.2,
        ..params(1.0, 0, 1.0)
    };
    let d = distribution(&p, &logits, &[]);
    let ids: Vec<u32> = d.iter().map(|c| c.0).collect();
    assert_eq!(ids, vec![0, 1, 2], "{d:?}");
    for (got, want) in d.iter().zip([4.0 / 7.0, 2.0 / 7.0, 1.0 / 7.0]) {
        assert!((got.1 as f64 - want).abs() < 1e-6, "{d:?}");
    }
    let reference = reference_distribution(&logits, &p);
    assert_eq!(reference.len(), 3, "{reference:?}");
    let mut seen = [0usize; 10];
    for seed in 0..2000u64 {
        let t = sample_at(&SamplingParams { seed, ..p.clone() }, &logits, &[], 0);
        seen[t as usize] += 1;
    }
    assert!(seen[3..].iter().all(|&n| n == 0), "{seen:?}");
    assert!(seen[..3].iter().all(|&n| n > 100), "{seen:?}");
    // min-p 0 changes nothing.
    let off = distribution(&params(1.0, 0, 1.0), &logits, &[]);
    assert_eq!(off.len(), 10);
}

/// Every range is checked, NaN and infinities included, with the option named.
#[test]
fn out_of_range_parameters_are_refused_by_name() {
    let ok = params(0.8, 40, 0.95);
    ok.validate().expect("defaults are valid");
    let cases = [
        (SamplingParams { temperature: f32::NAN, ..ok.clone() }, "--temperature"),
        (SamplingParams { temperature: f32::INFINITY, ..ok.clone() }, "--temperature"),
        (SamplingParams { temperature: -1.0, ..ok.clone() }, "--temperature"),
        (SamplingParams { top_p: 2.0, ..ok.clone() }, "--top-p"),
        (SamplingParams { top_p: f32::NAN, ..ok.clone() }, "--top-p"),
        (SamplingParams { min_p: -0.1, ..ok.clone() }, "--min-p"),
        (SamplingParams { repeat_penalty: 0.0, ..ok.clone() }, "--repeat-penalty"),
        (SamplingParams { repeat_penalty: f32::NAN, ..ok.clone() }, "--repeat-penalty"),
    ];
    for (p, option) in cases {
        let msg = p.validate().expect_err("out of range").to_string();
        assert!(msg.contains(option), "{p:?}: {msg}");
    }
}
