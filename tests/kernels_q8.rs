//! The int8-activation decode path against the CPU spec (`ActQ8` and `QView::matvec_q8` in
//! src/quant.rs): the activation quantizer kernel (plain, RMSNorm and SwiGLU inputs) and the
//! integer-dot GEMV, on fresh random inputs, odd sizes, NaN-poisoned outputs; plus the spec itself
//! against the f32 product (its error stays inside the bound int8 rounding allows).

use q4wgpu::gpu::testing::{
    assert_close, assert_close_at_scale, compile_to_spirv, gpu, poisoned, run_dispatches,
    term_scale, Rng,
};
use q4wgpu::gpu::Gpu;
use q4wgpu::kernels::gemv_q4::{Epilogue, GemvConfig, GemvOptions};
use q4wgpu::kernels::gemv_q4_q8::{GemvQ4Q8, Q8Input, RopeKvOut};
use q4wgpu::kernels::quant_act::{ActInput, ActQ8Buffers, QuantAct, QuantActKernel};
use q4wgpu::kernels::{BufRange, Q4Ref};
use q4wgpu::quant::{ActQ8, QMatrix, ACT_BLOCK};

const TOL: f32 = 1e-4;

fn random_matrix(rng: &mut Rng, rows: usize, cols: usize) -> QMatrix {
    let mut data = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        let std = 0.02 + rng.uniform().abs();
        data.extend(rng.vec(cols, std));
    }
    QMatrix::quantize(&data, rows, cols)
}

/// Activations with blocks of very different magnitudes, exact zeros and an all-zero block.
fn random_activations(rng: &mut Rng, k: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(k);
    for b in 0..k.div_ceil(ACT_BLOCK) {
        let std = if b == 1 {
            0.0
        } else {
            0.01 + 4.0 * rng.uniform().abs()
        };
        for _ in 0..ACT_BLOCK {
            x.push(if rng.below(17) == 0 {
                0.0
            } else {
                rng.normal(std)
            });
        }
    }
    x.truncate(k);
    x
}

/// Activation buffers poisoned with 0xFF bytes (int8 -1 everywhere, NaN scales).
fn poisoned_act(g: &Gpu, k: usize) -> ActQ8Buffers {
    let out = ActQ8Buffers::new(g, "test act", k);
    let words = vec![u32::MAX; (out.words.size() / 4) as usize];
    g.queue
        .write_buffer(&out.words, 0, bytemuck::cast_slice(&words));
    let nan = vec![f32::NAN; (out.scales.size() / 4) as usize];
    g.queue
        .write_buffer(&out.scales, 0, bytemuck::cast_slice(&nan));
    out
}

/// A quantized matrix on the GPU: its words and bf16 scales in buffers of their own.
struct GpuQ4 {
    qweight: wgpu::Buffer,
    scales: wgpu::Buffer,
    rows: usize,
    cols: usize,
}

impl GpuQ4 {
    fn upload(g: &Gpu, m: &QMatrix) -> GpuQ4 {
        let scale_bytes: Vec<u8> = m.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        GpuQ4 {
            qweight: g.storage_from("qweight", &m.qweight),
            scales: g.storage_from_bytes("scales", &scale_bytes),
            rows: m.rows,
            cols: m.cols,
        }
    }

    fn q4ref(&self) -> Q4Ref<'_> {
        Q4Ref::whole(self.rows, self.cols, &self.qweight, &self.scales)
    }
}

fn upload_act(g: &Gpu, a: &ActQ8) -> ActQ8Buffers {
    let out = ActQ8Buffers::new(g, "test act", a.len);
    g.queue
        .write_buffer(&out.words, 0, bytemuck::cast_slice(&a.packed_words()));
    g.queue
        .write_buffer(&out.scales, 0, bytemuck::cast_slice(&a.packed_scales()));
    out
}

fn read_u32(g: &Gpu, b: &wgpu::Buffer) -> Vec<u32> {
    bytemuck::pod_collect_to_vec(&g.read_bytes(b, 0, b.size()).expect("read back"))
}

fn read_f32(g: &Gpu, b: &wgpu::Buffer, n: usize) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(&g.read_bytes(b, 0, 4 * n as u64).expect("read back"))
}

/// The GPU's int8 values equal the spec's, except a value may round the other way where x / d
/// lies within float error of a tie (the GPU's division and norm are not the CPU's to the bit);
/// scales agree to float error.
fn check_quantized(what: &str, g: &Gpu, out: &ActQ8Buffers, exact: &[f32], scale: f32) {
    let want = &ActQ8::quantize_scaled(exact, scale);
    let words = read_u32(g, &out.words);
    let want_words = want.packed_words();
    let blocks = want.d.len();
    let scales = read_f32(g, &out.scales, 2 * blocks);
    assert_close(
        &format!("{what}: scales"),
        &scales,
        &want.packed_scales(),
        1e-5,
    );
    let got_q: Vec<i8> = unpack(&words[..want_words.len()]);
    let mut flips = 0;
    for (i, (&gq, &wq)) in got_q.iter().zip(&want.q).enumerate() {
        if gq == wq {
            continue;
        }
        let ratio = exact[i] * scale / want.d[i / ACT_BLOCK];
        let near_tie = (ratio - ratio.trunc()).abs() - 0.5;
        assert!(
            (gq as i32 - wq as i32).abs() == 1 && near_tie.abs() < 1e-3,
            "{what}: value {i} quantized to {gq}, the spec says {wq} (x / d = {ratio})"
        );
        flips += 1;
    }
    assert!(
        flips <= 2 + got_q.len() / 1000,
        "{what}: {flips} values differ from the spec"
    );
}

/// Inverse of `ActQ8::packed_words`, written from its documented layout.
fn unpack(words: &[u32]) -> Vec<i8> {
    let mut q = vec![0i8; words.len() * 4];
    for (w, &word) in words.iter().enumerate() {
        let (block, j, odd) = (w / 8, (w % 8) / 2, w % 2);
        for byte in 0..4 {
            q[block * 32 + 8 * j + odd + 2 * byte] = (word >> (8 * byte)) as u8 as i8;
        }
    }
    q
}

/// The quantizer kernels: the default, the extremes of the workgroup size (one block per
/// workgroup; 64 blocks) and the serial kernel the bench compares against.
const QUANT_KERNELS: [QuantActKernel; 4] = [
    QuantActKernel::Lanes { wg: 64 },
    QuantActKernel::Lanes { wg: 4 },
    QuantActKernel::Lanes { wg: 256 },
    QuantActKernel::Serial,
];

#[test]
fn quant_act_matches_the_spec_for_every_input() {
    let g = gpu();
    let kernels: Vec<QuantAct> = QUANT_KERNELS
        .iter()
        .map(|&k| QuantAct::with_kernel(g, k).expect("quant_act compiles"))
        .collect();
    let mut rng = Rng::fresh("quant_act");
    for k in [4, 36, 128, 200, 896, 1028, 4868] {
        let x = random_activations(&mut rng, k);
        let gate = random_activations(&mut rng, k);
        let norm_w: Vec<f32> = (0..k).map(|_| 0.5 + rng.uniform()).collect();
        let eps = 1e-5;
        // The vector each input stands for, computed here from its definition.
        let ms = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / k as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        // RMSNorm quantizes x * w and puts 1 / rms on d (ActQ8::quantize_scaled).
        let xw: Vec<f32> = x.iter().zip(&norm_w).map(|(v, w)| v * w).collect();
        let swiglu: Vec<f32> = gate
            .iter()
            .zip(&x)
            .map(|(gv, u)| ((*gv as f64 / (1.0 + (-*gv as f64).exp())) * *u as f64) as f32)
            .collect();
        let x_buf = g.storage_from("x", &x);
        let w_buf = g.storage_from("norm w", &norm_w);
        let gu: Vec<f32> = gate.iter().chain(&x).copied().collect();
        let gu_buf = g.storage_from("gate|up", &gu);
        let cases: [(&str, ActInput, &wgpu::Buffer, &Vec<f32>, f32); 3] = [
            ("plain", ActInput::Plain, &x_buf, &x, 1.0),
            (
                "rmsnorm",
                ActInput::RmsNorm {
                    weight: &w_buf,
                    eps,
                },
                &x_buf,
                &xw,
                inv as f32,
            ),
            ("swiglu", ActInput::SwiGlu, &gu_buf, &swiglu, 1.0),
        ];
        for (name, input, buf, exact, scale) in cases {
            let mut first: Option<(Vec<u32>, Vec<u32>)> = None;
            for (kernel, which) in kernels.iter().zip(QUANT_KERNELS) {
                let out = poisoned_act(g, k);
                run_dispatches(g, &[kernel.bind(g, input, buf, k, &out).expect("bind")]);
                let what = format!("{name} K={k} {which:?}");
                check_quantized(&what, g, &out, exact, scale);
                // Every kernel runs q8_block.wgsl's arithmetic on the same values: the same
                // levels to the bit, and the same scales except where RMSNorm's sum of squares is
                // added in another order.
                let got = (read_u32(g, &out.words), read_u32(g, &out.scales));
                let Some(want) = &first else {
                    first = Some(got);
                    continue;
                };
                assert!(
                    got.0 == want.0,
                    "{what}: int8 words differ from {:?}'s",
                    QUANT_KERNELS[0]
                );
                if name != "rmsnorm" {
                    assert!(
                        got.1 == want.1,
                        "{what}: scales differ from {:?}'s",
                        QUANT_KERNELS[0]
                    );
                }
            }
        }
    }
}

/// The spec against the f32 product: each value of x moves by at most d / 2, so a row's error is
/// at most Σ_blocks d/2 Σ|w| (plus float rounding).
#[test]
fn int8_activation_error_stays_inside_its_bound() {
    let mut rng = Rng::fresh("act q8 bound");
    for (rows, cols) in [(17, 200), (64, 896), (5, 4864)] {
        let m = random_matrix(&mut rng, rows, cols);
        let x = random_activations(&mut rng, cols);
        let a = ActQ8::quantize(&x);
        let (mut exact, mut q8) = (vec![0.0; rows], vec![0.0; rows]);
        m.view().matvec(&x, &mut exact);
        m.view().matvec_q8(&a, &mut q8);
        let w = m.view().dequantize();
        for r in 0..rows {
            let bound: f32 = (0..cols)
                .map(|c| w[r * cols + c].abs() * a.d[c / ACT_BLOCK] * 0.5)
                .sum::<f32>()
                * 1.001
                + 1e-4 * exact[r].abs().max(1.0);
            assert!(
                (exact[r] - q8[r]).abs() <= bound,
                "{rows}x{cols} row {r}: f32 {} int8 {} (bound {bound})",
                exact[r],
                q8[r]
            );
        }
    }
}

struct Case {
    rows: usize,
    cols: usize,
    bias: bool,
    mode: Epilogue,
    opts: GemvOptions,
}

impl Case {
    fn check(&self, g: &Gpu, kernel: &GemvQ4Q8, rng: &mut Rng) {
        let m = random_matrix(rng, self.rows, self.cols);
        let x_f32 = random_activations(rng, self.cols);
        let a = ActQ8::quantize(&x_f32);
        let bias: Option<Vec<f32>> = self.bias.then(|| rng.vec(self.rows, 1.0));
        let y_init = rng.vec(self.rows, 1.0);
        let mut want = vec![0.0; self.rows];
        m.view().matvec_q8(&a, &mut want);
        for (r, v) in want.iter_mut().enumerate() {
            *v += bias.as_ref().map_or(0.0, |b| b[r]);
            if self.mode == Epilogue::Accumulate {
                *v += y_init[r];
            }
        }
        let gm = GpuQ4::upload(g, &m);
        let w = gm.q4ref();
        let x = upload_act(g, &a);
        let y = match self.mode {
            Epilogue::Store => poisoned(g, "y", self.rows),
            Epilogue::Accumulate => g.storage_from("y", &y_init),
        };
        let bias_buf = bias.as_ref().map(|b| g.storage_from("bias", b));
        let ds = kernel
            .bind(
                g,
                w,
                Q8Input::Quantized(&x),
                BufRange::whole(&y),
                bias_buf.as_ref().map(BufRange::whole),
                self.mode,
                &self.opts,
            )
            .expect("bind");
        run_dispatches(g, &ds);
        let what = format!(
            "gemv_q4_q8 {}x{} {:?} bias {} {:?}",
            self.rows, self.cols, self.mode, self.bias, self.opts.config
        );
        // Against the size of the sums' terms (the f32 activations stand in for their int8
        // levels times d): a row whose terms cancel keeps the same absolute error.
        let y0 = (self.mode == Epilogue::Accumulate).then_some(&y_init[..]);
        let scale = term_scale(&m, &x_f32, bias.as_deref(), y0);
        assert_close_at_scale(
            &what,
            &read_f32(g, &y, self.rows),
            &want,
            scale,
            "max Σ|w||x|",
            TOL,
        );
    }
}

fn case(rows: usize, cols: usize) -> Case {
    Case {
        rows,
        cols,
        bias: false,
        mode: Epilogue::Store,
        opts: GemvOptions::default(),
    }
}

/// gemv_q4_q8.wgsl with its plain output (gemv_q4_q8_out_y.wgsl: store, accumulate, bias).
#[test]
fn gemv_q8_matches_cpu_on_odd_shapes_and_epilogues() {
    let g = gpu();
    let kernel = GemvQ4Q8::new(g).expect("gemv_q4_q8 compiles");
    let mut rng = Rng::fresh("gemv_q4_q8 shapes");
    for cols in [4, 64, 200, 896, 1000, 4864] {
        for rows in [1, 7, 33, 300] {
            kernel_case(g, &kernel, &mut rng, case(rows, cols));
        }
    }
    for (bias, mode) in [
        (true, Epilogue::Store),
        (false, Epilogue::Accumulate),
        (true, Epilogue::Accumulate),
    ] {
        kernel_case(
            g,
            &kernel,
            &mut rng,
            Case {
                bias,
                mode,
                ..case(65, 576)
            },
        );
    }
}

fn kernel_case(g: &Gpu, kernel: &GemvQ4Q8, rng: &mut Rng, c: Case) {
    c.check(g, kernel, rng);
}

/// Every workgroup shape, unroll depth and both reductions give the same sums; matrices larger
/// than a binding are split into row ranges.
#[test]
fn gemv_q8_every_workgroup_shape_and_row_split() {
    let g = gpu();
    let kernel = GemvQ4Q8::new(g).expect("gemv_q4_q8 compiles");
    let mut rng = Rng::fresh("gemv_q4_q8 configs");
    let unit = g.caps.subgroup_max_size.max(32);
    let reductions: &[bool] = if g.caps.subgroups {
        &[true, false]
    } else {
        &[false]
    };
    for &subgroups in reductions {
        for wg in [unit, 2 * unit, 4 * unit] {
            // Deeper unrolls at the smallest workgroup only (each shape is a pipeline to compile).
            let unrolled: &[(u32, u32)] = if wg == unit {
                &[(3, 2), (4, 3), (2, 4)]
            } else {
                &[]
            };
            for &(rows, unroll) in [(1, 1), (3, 1), (4, 1), (8, 1), (16, 1)]
                .iter()
                .chain(unrolled)
            {
                let config = Some(GemvConfig {
                    wg,
                    rows,
                    subgroups,
                    unroll,
                });
                let opts = GemvOptions {
                    config,
                    ..Default::default()
                };
                Case {
                    opts,
                    ..case(37, 1000)
                }
                .check(g, &kernel, &mut rng);
            }
        }
    }
    let opts = GemvOptions {
        max_binding_bytes: Some(64 * 1024),
        ..Default::default()
    };
    Case {
        opts,
        bias: true,
        mode: Epilogue::Accumulate,
        ..case(1500, 896)
    }
    .check(g, &kernel, &mut rng);
}

#[test]
fn gemv_q8_and_quant_act_reject_bad_shapes() {
    let g = gpu();
    let kernel = GemvQ4Q8::new(g).expect("gemv_q4_q8 compiles");
    let quant = QuantAct::new(g).expect("quant_act compiles");
    let small = ActQ8Buffers::new(g, "small", 128);
    let x = g.storage_buffer("x", 4 * 256);
    let e = quant
        .bind(g, ActInput::Plain, &x, 256, &small)
        .err()
        .expect("K over capacity");
    assert!(e.to_string().contains("at most"), "{e}");
    let e = quant
        .bind(g, ActInput::Plain, &x, 6, &small)
        .err()
        .expect("K not a multiple of 4");
    assert!(e.to_string().contains("multiple of 4"), "{e}");
    let e = quant
        .bind(g, ActInput::SwiGlu, &x, 128, &small)
        .map(|_| ())
        .err();
    assert!(e.is_none(), "swiglu over 2K = 256 values fits x");
    for wg in [0, 6, 512] {
        let e = QuantAct::with_kernel(g, QuantActKernel::Lanes { wg })
            .err()
            .expect("bad workgroup size");
        assert!(e.to_string().contains("multiple of 4"), "wg {wg}: {e}");
    }
    let m = QMatrix::quantize(&vec![0.5; 8 * 256], 8, 256);
    let qw = g.storage_from("qw", &m.qweight);
    let sc = g.storage_from_bytes("sc", bytemuck::cast_slice(&m.scales));
    let w = Q4Ref {
        rows: 8,
        cols: 256,
        qweight: BufRange::whole(&qw),
        scales: BufRange::whole(&sc),
    };
    let y = g.storage_buffer("y", 32);
    let e = kernel
        .bind(
            g,
            w,
            Q8Input::Quantized(&small),
            BufRange::whole(&y),
            None,
            Epilogue::Store,
            &GemvOptions::default(),
        )
        .err()
        .expect("K over the activation buffers");
    assert!(e.to_string().contains("exceeds"), "{e}");
}

/// Both shaders compile with naga; with integer dot products available the GEMV's inner loop is
/// the packed-dot instruction (OpSDot, 4x8-bit packed), not naga's polyfill. Checked here because
/// lavapipe runs the polyfill.
#[test]
fn q8_shaders_compile_to_spirv_with_packed_dot() {
    let quant = format!(
        "const INPUT: u32 = 1u;\n{}\n{}",
        include_str!("../shaders/q8_block.wgsl"),
        include_str!("../shaders/quant_act.wgsl")
    );
    compile_to_spirv("quant_act", &quant, &[("WG", 32.0)]);
    let serial = format!(
        "const INPUT: u32 = 2u;\n{}\n{}",
        include_str!("../shaders/q8_block.wgsl"),
        include_str!("../shaders/quant_act_serial.wgsl")
    );
    compile_to_spirv("quant_act_serial", &serial, &[]);
    for input in 1..4 {
        let fused = q4wgpu::kernels::gemv_q4_q8::shader(true, input);
        compile_to_spirv(
            &format!("gemv_q4_q8 input {input}"),
            &fused,
            &[("WG", 64.0), ("ROWS", 4.0)],
        );
    }
    let gemv = q4wgpu::kernels::gemv_q4_q8::shader(true, 0);
    let words = compile_to_spirv("gemv_q4_q8", &gemv, &[("WG", 64.0), ("ROWS", 4.0)]);
    const OP_SDOT: u32 = 4450;
    let sdots = words.iter().filter(|&&w| w == (6 << 16 | OP_SDOT)).count();
    assert!(
        sdots >= 8,
        "gemv_q4_q8: {sdots} OpSDot instructions, want the 8 of a quarter's dot"
    );
}

/// The fused inputs (f32 x, RMSNorm, SwiGLU quantized by the GEMV as it reads them) against the
/// CPU spec; and the f32 input against quant_act + the quantized-input GEMV on the GPU, which
/// quantize with the same arithmetic (so only the summation order differs).
#[test]
fn gemv_q8_fused_inputs_match_the_spec() {
    let g = gpu();
    let kernel = GemvQ4Q8::new(g).expect("gemv_q4_q8 compiles");
    let quant = QuantAct::new(g).expect("quant_act compiles");
    let mut rng = Rng::fresh("gemv_q4_q8 fused inputs");
    // A value may round the other way where x / d lies within float error of a tie (the GPU's
    // exp, division and norm are not the CPU's to the bit): one level of one value moves a row
    // sum by d |w|, about 1e-3 of these rows' largest sums.
    const FUSED_TOL: f32 = 3e-3;
    for (rows, cols) in [(37, 200), (300, 896), (5, 4864)] {
        let m = random_matrix(&mut rng, rows, cols);
        let x = random_activations(&mut rng, cols);
        let gate = random_activations(&mut rng, cols);
        let norm_w: Vec<f32> = (0..cols).map(|_| 0.5 + rng.uniform()).collect();
        let eps = 1e-5;
        let inv = q4wgpu::cpu::inverse_rms(&x, eps);
        let xw: Vec<f32> = x.iter().zip(&norm_w).map(|(a, w)| a * w).collect();
        let sw: Vec<f32> = gate
            .iter()
            .zip(&x)
            .map(|(gv, u)| q4wgpu::cpu::silu(*gv) * u)
            .collect();
        let spec = |a: ActQ8| {
            let mut y = vec![0.0; rows];
            m.view().matvec_q8(&a, &mut y);
            y
        };
        let gm = GpuQ4::upload(g, &m);
        let w = gm.q4ref();
        let x_buf = g.storage_from("x", &x);
        let w_buf = g.storage_from("norm w", &norm_w);
        let gu: Vec<f32> = gate.iter().chain(&x).copied().collect();
        let gu_buf = g.storage_from("gate|up", &gu);
        let opts = GemvOptions::default();
        let run_input = |input: Q8Input| {
            let y = poisoned(g, "y", rows);
            run_dispatches(
                g,
                &kernel
                    .bind(
                        g,
                        w,
                        input,
                        BufRange::whole(&y),
                        None,
                        Epilogue::Store,
                        &opts,
                    )
                    .expect("bind"),
            );
            read_f32(g, &y, rows)
        };
        let x_range = BufRange::whole(&x_buf);
        let f32_in = run_input(Q8Input::F32(x_range));
        assert_close(
            &format!("f32 input {rows}x{cols}"),
            &f32_in,
            &spec(ActQ8::quantize(&x)),
            FUSED_TOL,
        );
        let normed = run_input(Q8Input::RmsNorm {
            x: x_range,
            weight: &w_buf,
            eps,
        });
        assert_close(
            &format!("rmsnorm input {rows}x{cols}"),
            &normed,
            &spec(ActQ8::quantize_scaled(&xw, inv)),
            FUSED_TOL,
        );
        let swiglu = run_input(Q8Input::SwiGlu(BufRange::whole(&gu_buf)));
        assert_close(
            &format!("swiglu input {rows}x{cols}"),
            &swiglu,
            &spec(ActQ8::quantize(&sw)),
            FUSED_TOL,
        );
        // The same quantizer on the GPU, as a dispatch of its own: equal to summation order.
        let xq = poisoned_act(g, cols);
        run_dispatches(
            g,
            &[quant
                .bind(g, ActInput::Plain, &x_buf, cols, &xq)
                .expect("quant")],
        );
        let two_step = run_input(Q8Input::Quantized(&xq));
        assert_close(
            &format!("f32 input vs quant_act {rows}x{cols}"),
            &f32_in,
            &two_step,
            TOL,
        );
    }
}

/// The qkv GEMV with RoPE and the KV-cache write as its output (the decode step's rope-kv
/// fusion): q rotated into q_out, k rotated and v into the caches' words at `pos`, nothing else
/// written, against the CPU spec's product and the CPU reference's RoPE (src/cpu/ops.rs).
/// Shaders: gemv_q4_q8.wgsl with gemv_q4_q8_out_rope_kv.wgsl and rope_angle.wgsl.
#[test]
fn gemv_q8_rope_kv_output_matches_cpu() {
    let g = gpu();
    let kernel = GemvQ4Q8::new(g).expect("gemv_q4_q8 compiles");
    let mut rng = Rng::fresh("gemv_q4_q8 rope kv");
    // (heads, kv heads, head dim, context, position, K): odd K; the last case's position is
    // past the context, so the caches stay untouched.
    for (nh, nkv, hd, ctx, pos, k) in [
        (4, 2, 16, 5, 3, 200),
        (2, 1, 64, 9, 8, 132),
        (6, 3, 8, 4, 0, 36),
        (2, 2, 16, 3, 3, 64),
    ] {
        let rows = (nh + 2 * nkv) * hd;
        let m = random_matrix(&mut rng, rows, k);
        let a = ActQ8::quantize(&random_activations(&mut rng, k));
        let bias = rng.vec(rows, 1.0);
        let inv_freq: Vec<f32> = (0..hd / 2)
            .map(|i| 10000f32.powf(-2.0 * i as f32 / hd as f32))
            .collect();
        let mut y = vec![0.0; rows];
        m.view().matvec_q8(&a, &mut y);
        for (v, b) in y.iter_mut().zip(&bias) {
            *v += b;
        }
        for head in y[..(nh + nkv) * hd].chunks_mut(hd) {
            q4wgpu::cpu::ops::apply_rope(head, pos, &inv_freq);
        }

        let gm = GpuQ4::upload(g, &m);

        let w = gm.q4ref();
        let sentinel = vec![0xDEAD_BEEFu32; nkv * ctx * hd / 2];
        let (k_cache, v_cache) = (
            g.storage_from("k cache", &sentinel),
            g.storage_from("v cache", &sentinel),
        );
        let q_out = poisoned(g, "q", nh * hd);
        let freq = g.storage_from("inv_freq", &inv_freq);
        let step = g.uniform("step", &[pos as u32, 1, pos as u32 + 1, 0]);
        let x = upload_act(g, &a);
        let bias_buf = g.storage_from("bias", &bias);
        let out = RopeKvOut {
            inv_freq: &freq,
            q_out: &q_out,
            k_cache: &k_cache,
            v_cache: &v_cache,
            step: &step,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            ctx,
        };
        let ds = kernel
            .bind_rope_kv(
                g,
                w,
                Q8Input::Quantized(&x),
                &out,
                Some(BufRange::whole(&bias_buf)),
                &GemvOptions::default(),
            )
            .expect("bind");
        run_dispatches(g, &ds);
        let what = format!("rope kv {nh}/{nkv} heads of {hd}, pos {pos} of {ctx}");
        assert_close(
            &format!("{what}: q"),
            &read_f32(g, &q_out, nh * hd),
            &y[..nh * hd],
            TOL,
        );
        for (name, cache, first_row) in [("k", &k_cache, nh * hd), ("v", &v_cache, (nh + nkv) * hd)]
        {
            let words = read_u32(g, cache);
            for (i, &word) in words.iter().enumerate() {
                let (kvh, p, pair) = (i / (ctx * hd / 2), (i / (hd / 2)) % ctx, i % (hd / 2));
                if p != pos {
                    assert_eq!(
                        word, 0xDEAD_BEEF,
                        "{what}: {name} cache word {i} (position {p}) was written"
                    );
                    continue;
                }
                let e = first_row + kvh * hd + 2 * pair;
                let got =
                    [word as u16, (word >> 16) as u16].map(|h| half::f16::from_bits(h).to_f32());
                assert_close(
                    &format!("{what}: {name} cache word {i}"),
                    &got,
                    &y[e..e + 2],
                    1e-3,
                );
            }
        }
    }
}

/// A batched product (`GemvQ4Q8::bind_batch`, COLS > 1), in both layouts (side by side and
/// column lanes): every live column equals the CPU spec of its own x and the one-column kernel's
/// output for that x (to its last bits); columns past the step's `n_rows` are not written. Odd
/// shapes, both epilogues, a bias, several workgroup shapes and a matrix split into row ranges.
#[test]
fn gemv_q8_batched_columns_match_the_one_column_kernel() {
    let g = gpu();
    let kernel = GemvQ4Q8::new(g).expect("gemv_q4_q8 compiles");
    let quant = QuantAct::new(g).expect("quant_act compiles");
    let mut rng = Rng::fresh("gemv_q4_q8 batched");
    let shared = |wg, rows| GemvOptions {
        config: Some(GemvConfig {
            wg,
            rows,
            subgroups: false,
            unroll: 1,
        }),
        ..GemvOptions::default()
    };
    let split = GemvOptions {
        max_binding_bytes: Some(8 * 1024),
        ..GemvOptions::default()
    };
    let cases = [
        (
            37,
            200,
            8,
            8,
            Epilogue::Store,
            false,
            GemvOptions::default(),
        ),
        (
            64,
            896,
            8,
            5,
            Epilogue::Accumulate,
            true,
            GemvOptions::default(),
        ),
        (300, 1000, 3, 2, Epilogue::Store, true, shared(64, 8)),
        (9, 4, 2, 1, Epilogue::Accumulate, false, shared(32, 3)),
        (133, 576, 4, 4, Epilogue::Store, false, split),
    ];
    let layouts = cases.iter().flat_map(|c| {
        [false, true].map(|column_lanes| {
            let opts = GemvOptions {
                column_lanes,
                ..c.6
            };
            (c.0, c.1, c.2, c.3, c.4, c.5, opts)
        })
    });
    for (rows, k, cols, live, mode, with_bias, opts) in layouts {
        let layout = if opts.column_lanes {
            "column lanes"
        } else {
            "side by side"
        };
        let what =
            format!("batched gemv_q4_q8 {rows}x{k}, {live} of {cols} columns, {mode:?}, {layout}");
        let m = random_matrix(&mut rng, rows, k);
        let gm = GpuQ4::upload(g, &m);
        let w = gm.q4ref();
        let xs: Vec<Vec<f32>> = (0..cols).map(|_| random_activations(&mut rng, k)).collect();
        let flat: Vec<f32> = xs.concat();
        let x_buf = g.storage_from("x rows", &flat);
        let xq = ActQ8Buffers::with_rows(g, "batch x", k, cols);
        let bias: Option<Vec<f32>> = with_bias.then(|| rng.vec(rows, 1.0));
        let bias_buf = bias.as_ref().map(|b| g.storage_from("bias", b));
        let stride = rows + 3;
        let y_init: Vec<f32> = match mode {
            Epilogue::Store => vec![f32::NAN; cols * stride],
            Epilogue::Accumulate => rng.vec(cols * stride, 1.0),
        };
        let y = g.storage_from("y", &y_init);
        let rows_uniform: Vec<(usize, usize)> = (0..live).map(|c| (c, c)).collect();
        let batch = g.uniform("batch", &q4wgpu::kernels::BatchStep::new(&rows_uniform));
        let io = q4wgpu::kernels::gemv_q4_q8::BatchIo {
            x: &xq,
            y: &y,
            y_stride: stride,
            cols,
            batch: &batch,
        };
        let mut ds = vec![quant
            .bind_rows(g, ActInput::Plain, &x_buf, k, cols, &xq)
            .expect("bind quant rows")];
        let b = bias_buf.as_ref().map(BufRange::whole);
        ds.extend(
            kernel
                .bind_batch(g, w, &io, b, mode, &opts)
                .expect("bind batch"),
        );
        run_dispatches(g, &ds);
        let got = read_f32(g, &y, cols * stride);
        for (c, x) in xs.iter().enumerate() {
            let col = &got[c * stride..c * stride + rows];
            let init = &y_init[c * stride..c * stride + rows];
            if c >= live {
                let same = col
                    .iter()
                    .zip(init)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{what}: column {c} is past the step's rows but was written"
                );
                continue;
            }
            // The one-column kernel on the same x.
            let x1 = upload_act(g, &ActQ8::quantize(x));
            let y1 = g.storage_from("y1", init);
            let one = kernel
                .bind(
                    g,
                    w,
                    Q8Input::Quantized(&x1),
                    BufRange::whole(&y1),
                    b,
                    mode,
                    &opts,
                )
                .expect("bind one column");
            run_dispatches(g, &one);
            let single = read_f32(g, &y1, rows);
            // The same arithmetic in the same order: equal bits on lavapipe (a CPU adapter);
            // NVIDIA's compiler may round a sum's last bit differently in the two variants (seen
            // on the H200).
            let exact = g.info.device_type == wgpu::DeviceType::Cpu;
            let one_scale = term_scale(&m, x, bias.as_deref(), None);
            for (r, (a, s)) in col.iter().zip(&single).enumerate() {
                let ok = a.to_bits() == s.to_bits()
                    || (!exact && (a - s).abs() <= 4.0 * f32::EPSILON * one_scale);
                assert!(
                    ok,
                    "{what}: column {c} row {r}: {a} against one column's {s}"
                );
            }
            let a = ActQ8::quantize(x);
            let mut want = vec![0.0; rows];
            m.view().matvec_q8(&a, &mut want);
            for (r, v) in want.iter_mut().enumerate() {
                *v += bias.as_ref().map_or(0.0, |b| b[r]);
                if mode == Epilogue::Accumulate {
                    *v += init[r];
                }
            }
            let y0 = (mode == Epilogue::Accumulate).then_some(init);
            let scale = term_scale(&m, x, bias.as_deref(), y0);
            assert_close_at_scale(&what, col, &want, scale, "max Σ|w||x|", TOL);
        }
    }
}

/// `QuantAct::bind_rows`: each row's blocks are, bit for bit, what quantizing that row alone
/// gives, for every input kind (SwiGLU rows are [gate | up] of 2K values).
#[test]
fn quant_act_rows_equal_one_vector_each() {
    let g = gpu();
    let quant = QuantAct::new(g).expect("quant_act compiles");
    let mut rng = Rng::fresh("quant_act rows");
    let (k, rows) = (200, 3);
    let norm = g.storage_from("norm", &rng.vec(k, 1.0));
    for input in [
        ActInput::Plain,
        ActInput::RmsNorm {
            weight: &norm,
            eps: 1e-6,
        },
        ActInput::SwiGlu,
    ] {
        let width = if matches!(input, ActInput::SwiGlu) {
            2 * k
        } else {
            k
        };
        let xs: Vec<Vec<f32>> = (0..rows)
            .map(|_| random_activations(&mut rng, width))
            .collect();
        let all = g.storage_from("x rows", &xs.concat());
        let out = ActQ8Buffers::with_rows(g, "rows", k, rows);
        run_dispatches(
            g,
            &[quant
                .bind_rows(g, input, &all, k, rows, &out)
                .expect("bind rows")],
        );
        let (words, scales) = (read_u32(g, &out.words), read_u32(g, &out.scales));
        let blocks = k.div_ceil(128) * 4;
        for (r, x) in xs.iter().enumerate() {
            let one_x = g.storage_from("x", x);
            let one = poisoned_act(g, k);
            run_dispatches(
                g,
                &[quant.bind(g, input, &one_x, k, &one).expect("bind one")],
            );
            let (w1, s1) = (read_u32(g, &one.words), read_u32(g, &one.scales));
            assert_eq!(
                &words[r * blocks * 8..(r + 1) * blocks * 8],
                &w1[..blocks * 8],
                "row {r}: words"
            );
            assert_eq!(
                &scales[r * blocks * 2..(r + 1) * blocks * 2],
                &s1[..blocks * 2],
                "row {r}: scales"
            );
        }
    }
}
