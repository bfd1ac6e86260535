//! The fast CPU int8 kernel against the spec (`QView::matvec_q8`, scalar): bit-identical on
//! random inputs and odd sizes, on every instruction set this CPU has; and the fast CPU model
//! against the reference model running the same int8 spec.

use q4wgpu::cpu::fast::{self, Isa, PackedAct};
use q4wgpu::cpu::CpuModel;
use q4wgpu::gpu::testing::Rng;
use q4wgpu::quant::{ActQ8, DecodeActivations, QMatrix};
use q4wgpu::synthetic::{synthetic_config, synthetic_weights};

/// Activations with blocks of very different magnitudes, one all-zero block and exact ±absmax.
fn activations(rng: &mut Rng, cols: usize) -> ActQ8 {
    let mut x: Vec<f32> = (0..cols)
        .map(|i| rng.normal(1.0) * [0.01, 1.0, 30.0][(i / 32) % 3])
        .collect();
    if cols > 64 {
        x[32..64].fill(0.0);
    }
    ActQ8::quantize_scaled(&x, 0.5 + rng.uniform().abs())
}

fn assert_bit_identical(isa: Isa, what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (r, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits(),
            "{} {what}: row {r}: {g} (fast) vs {w} (spec)",
            isa.name()
        );
    }
}

fn check_matrix(rng: &mut Rng, m: &QMatrix, tokens: usize, what: &str) {
    let xs: Vec<ActQ8> = (0..tokens).map(|_| activations(rng, m.cols)).collect();
    let packed: Vec<PackedAct> = xs.iter().map(PackedAct::new).collect();
    let refs: Vec<&PackedAct> = packed.iter().collect();
    let want: Vec<Vec<f32>> = xs
        .iter()
        .map(|x| {
            let mut y = vec![f32::NAN; m.rows];
            m.view().matvec_q8(x, &mut y);
            y
        })
        .collect();
    for isa in Isa::available() {
        let got = fast::matmul(isa, &m.view(), &refs);
        assert_eq!(got.len(), tokens);
        for (t, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_bit_identical(isa, &format!("{what}, token {t} of {tokens}"), g, w);
        }
        let mut y = vec![f32::NAN; m.rows];
        fast::matvec(isa, &m.view(), &packed[0], &mut y);
        assert_bit_identical(isa, &format!("{what}, matvec"), &y, &want[0]);
    }
}

#[test]
fn fast_matmul_is_bit_identical_to_the_spec_on_every_instruction_set() {
    eprintln!(
        "instruction sets: {:?}",
        Isa::available()
            .iter()
            .map(|i| i.name())
            .collect::<Vec<_>>()
    );
    let mut rng = Rng::fresh("fast int8 matmul");
    // Columns not multiples of 128 (short last blocks, one short of a quarter), rows that are
    // not multiples of any chunk, token counts below, at and above one pass's MAX_TOKENS.
    let shapes = [
        (1, 32),
        (7, 100),
        (13, 129),
        (67, 300),
        (130, 896),
        (301, 1000),
        (5, 1),
    ];
    for (i, &(rows, cols)) in shapes.iter().enumerate() {
        let data = rng.vec(rows * cols, 1.0);
        let m = QMatrix::quantize(&data, rows, cols);
        // Up to three groups of inputs per pass (each row chunk runs every group in turn).
        let tokens = [
            1,
            3,
            fast::MAX_TOKENS,
            fast::MAX_TOKENS + 3,
            2 * fast::MAX_TOKENS + 5,
        ][i % 5];
        check_matrix(&mut rng, &m, tokens, &format!("[{rows}, {cols}]"));
    }
}

#[test]
fn fast_matmul_is_exact_at_the_extreme_levels() {
    // Nibbles all 15 or all 0 against levels ±127: the largest sums the i16 steps must hold.
    let mut rng = Rng::fresh("fast int8 extremes");
    let (rows, cols) = (9, 384);
    let words = rows * cols / 8;
    let mut m = QMatrix::quantize(&rng.vec(rows * cols, 1.0), rows, cols);
    for (i, w) in m.qweight.iter_mut().enumerate() {
        *w = [0xFFFF_FFFF, 0, 0xF0F0_F0F0, 0x0F0F_0F0F][(i * 4) / words];
    }
    let x: Vec<f32> = (0..cols)
        .map(|i| if (i / 7) % 2 == 0 { 3.0 } else { -3.0 })
        .collect();
    let xs = [
        ActQ8::quantize(&x),
        ActQ8::quantize(&x.iter().map(|v| -v).collect::<Vec<_>>()),
    ];
    assert!(xs[0].q.iter().take(cols).all(|q| q.abs() == 127));
    for x in &xs {
        let mut want = vec![f32::NAN; rows];
        m.view().matvec_q8(x, &mut want);
        for isa in Isa::available() {
            let mut y = vec![f32::NAN; rows];
            fast::matvec(isa, &m.view(), &PackedAct::new(x), &mut y);
            assert_bit_identical(isa, "extreme levels", &y, &want);
        }
    }
}

#[test]
fn unknown_or_missing_instruction_sets_are_refused_with_the_available_ones() {
    let err = Isa::parse("sse9").expect_err("unknown").to_string();
    assert!(err.contains("portable"), "{err}");
    assert_eq!(Isa::parse("portable").expect("always there"), Isa::Portable);
    assert!(Isa::available().contains(&Isa::best()));
}

#[test]
fn fast_model_matches_the_reference_running_the_int8_spec() {
    // Prompts of several tokens (one pass per up to 8 tokens) and decode steps, on the tiny
    // synthetic shape (hidden 192, FFN 320: short last blocks everywhere).
    let config = synthetic_config("tiny").expect("known shape");
    let weights = synthetic_weights(&config, 5);
    let spec = CpuModel::new(&weights)
        .expect("valid")
        .with_decode_activations(DecodeActivations::Int8)
        .with_prompt_activations(DecodeActivations::Int8);
    let prompt: Vec<u32> = (0..11).map(|i| (i * 37 + 3) % 517).collect();
    let mut cache = spec.new_cache(32);
    let mut want = spec.forward_all(&mut cache, &prompt).expect("spec prompt");
    for t in [5u32, 99] {
        want.push(spec.forward(&mut cache, &[t]).expect("spec step"));
    }
    for isa in Isa::available() {
        let model = CpuModel::fast(&weights, isa).expect("valid");
        let mut cache = model.new_cache(32);
        let mut got = model.forward_all(&mut cache, &prompt).expect("fast prompt");
        for t in [5u32, 99] {
            got.push(model.forward(&mut cache, &[t]).expect("fast step"));
        }
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_bit_identical(isa, &format!("logits of token {i}"), g, w);
        }
    }
    // The spec itself differs from the f32 oracle (int8 rounding) but stays close to it.
    let oracle = CpuModel::new(&weights).expect("valid");
    let f32_logits = oracle
        .forward(&mut oracle.new_cache(32), &prompt)
        .expect("oracle");
    let int8 = &want[prompt.len() - 1];
    let scale = f32_logits.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let err = f32_logits
        .iter()
        .zip(int8)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err > 0.0 && err < 0.1 * scale,
        "int8 vs f32 logits: max error {err}, scale {scale}"
    );
}
