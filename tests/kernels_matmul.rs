//! INT4 GEMV and GEMM kernels against the CPU reference (`QView::matvec` on the same quantized
//! bytes), so the tolerance covers accumulation order only: `TOL` = 1e-4 of max |y| for f32
//! kernels (K ≤ 4096 sums of f32 products, summed in different orders), `COOP_TOL` = 4e-3 for the
//! cooperative-matrix GEMM, whose operands are rounded to f16 (2^-11 relative each).
//! Inputs are fresh random values each run (the seed is printed); outputs start as NaN.

use q4wgpu::gpu::testing::{
    assert_close, assert_close_at_scale, gpu, poisoned, run_dispatches, term_scale, Rng,
};
use q4wgpu::gpu::Gpu;
use q4wgpu::kernels::gemm_q4::{GemmOptions, GemmQ4, GemmVariant, SMALL_M};
use q4wgpu::kernels::gemv_q4::{
    self, Epilogue, GemvConfig, GemvInput, GemvInputKind, GemvOptions, GemvQ4,
};
use q4wgpu::kernels::{BufRange, Dispatch, Q4Ref, StepParams};
use q4wgpu::quant::QMatrix;

const TOL: f32 = 1e-4;
const COOP_TOL: f32 = 4e-3;

/// A random matrix with rows of different magnitudes (so scales differ), quantized.
fn random_matrix(rng: &mut Rng, rows: usize, cols: usize) -> QMatrix {
    let mut data = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        let std = 0.02 + rng.uniform().abs();
        data.extend(rng.vec(cols, std));
    }
    QMatrix::quantize(&data, rows, cols)
}

/// Bytes placed at `offset` inside a buffer with random bytes around them (so a kernel reading
/// outside its range sees garbage, not zeros).
struct Placed {
    buffer: wgpu::Buffer,
    offset: u64,
    size: u64,
}

impl Placed {
    fn new(g: &Gpu, rng: &mut Rng, label: &str, data: &[u8], offset: u64) -> Placed {
        let total = offset as usize + data.len().next_multiple_of(4) + 256;
        let mut bytes: Vec<u8> = (0..total).map(|_| rng.next_u64() as u8).collect();
        bytes[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Placed {
            buffer: g.storage_from_bytes(label, &bytes),
            offset,
            size: data.len() as u64,
        }
    }

    fn f32s(g: &Gpu, rng: &mut Rng, label: &str, data: &[f32], offset: u64) -> Placed {
        Placed::new(g, rng, label, bytemuck::cast_slice(data), offset)
    }

    fn range(&self) -> BufRange<'_> {
        BufRange {
            buffer: &self.buffer,
            offset: self.offset,
            size: self.size,
        }
    }

    fn read_f32(&self, g: &Gpu) -> Vec<f32> {
        bytemuck::pod_collect_to_vec(
            &g.read_bytes(&self.buffer, self.offset, self.size)
                .expect("read back"),
        )
    }
}

struct GpuMatrix {
    qweight: Placed,
    scales: Placed,
    rows: usize,
    cols: usize,
}

impl GpuMatrix {
    fn upload(g: &Gpu, rng: &mut Rng, m: &QMatrix, offset: u64) -> GpuMatrix {
        let scale_bytes: Vec<u8> = m.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        GpuMatrix {
            qweight: Placed::new(g, rng, "qweight", bytemuck::cast_slice(&m.qweight), offset),
            scales: Placed::new(g, rng, "scales", &scale_bytes, offset),
            rows: m.rows,
            cols: m.cols,
        }
    }

    fn q4ref(&self) -> Q4Ref<'_> {
        Q4Ref {
            rows: self.rows,
            cols: self.cols,
            qweight: self.qweight.range(),
            scales: self.scales.range(),
        }
    }
}

/// CPU reference: `y_init + W x + bias` (y_init zero for Store).
fn reference(m: &QMatrix, x: &[f32], bias: Option<&[f32]>, y_init: Option<&[f32]>) -> Vec<f32> {
    let mut y = vec![0.0; m.rows];
    m.view().matvec(x, &mut y);
    for (r, v) in y.iter_mut().enumerate() {
        *v += bias.map_or(0.0, |b| b[r]) + y_init.map_or(0.0, |i| i[r]);
    }
    y
}

/// Case for one GEMV run.
struct GemvCase {
    rows: usize,
    cols: usize,
    bias: bool,
    mode: Epilogue,
    offset: u64,
    opts: GemvOptions,
}

impl GemvCase {
    fn new(rows: usize, cols: usize) -> Self {
        GemvCase {
            rows,
            cols,
            bias: false,
            mode: Epilogue::Store,
            offset: 0,
            opts: GemvOptions::default(),
        }
    }

    /// Runs the case and compares with the CPU; returns the number of dispatches.
    fn check(&self, kernel: &GemvQ4, rng: &mut Rng) -> usize {
        let g = gpu();
        let m = random_matrix(rng, self.rows, self.cols);
        let w = GpuMatrix::upload(g, rng, &m, self.offset);
        let x = rng.vec(self.cols, 1.0);
        let xb = Placed::f32s(g, rng, "x", &x, self.offset);
        let bias = self.bias.then(|| rng.vec(self.rows, 1.0));
        let bb = bias
            .as_ref()
            .map(|b| Placed::f32s(g, rng, "bias", b, self.offset));
        let y_init = match self.mode {
            Epilogue::Store => vec![f32::NAN; self.rows],
            Epilogue::Accumulate => rng.vec(self.rows, 4.0),
        };
        let yb = Placed::f32s(g, rng, "y", &y_init, self.offset);
        let dispatches = kernel
            .bind_with(
                g,
                w.q4ref(),
                xb.range(),
                yb.range(),
                bb.as_ref().map(Placed::range),
                self.mode,
                &self.opts,
            )
            .expect("bind");
        run_dispatches(g, &dispatches);
        let want = reference(
            &m,
            &x,
            bias.as_deref(),
            (self.mode == Epilogue::Accumulate).then_some(&y_init[..]),
        );
        let what = format!(
            "gemv {}x{} bias {} {:?} offset {} {:?}",
            self.rows, self.cols, self.bias, self.mode, self.offset, self.opts
        );
        let y0 = (self.mode == Epilogue::Accumulate).then_some(&y_init[..]);
        let scale = term_scale(&m, &x, bias.as_deref(), y0);
        assert_close_at_scale(&what, &yb.read_f32(g), &want, scale, "max Σ|w||x|", TOL);
        dispatches.len()
    }
}

#[test]
fn gemv_matches_cpu_on_odd_shapes() {
    let g = gpu();
    let kernel = GemvQ4::new(g).expect("gemv compiles");
    let mut rng = Rng::fresh("gemv odd shapes");
    for cols in [64, 200, 576, 896, 1000] {
        for rows in [1, 7, 33, 300, 4864] {
            GemvCase::new(rows, cols).check(&kernel, &mut rng);
        }
    }
}

#[test]
fn gemv_bias_and_accumulate_inside_bigger_buffers() {
    let g = gpu();
    let kernel = GemvQ4::new(g).expect("gemv compiles");
    let mut rng = Rng::fresh("gemv epilogues");
    for (rows, cols) in [(33, 200), (300, 576), (7, 1000)] {
        for (bias, mode) in [
            (true, Epilogue::Store),
            (false, Epilogue::Accumulate),
            (true, Epilogue::Accumulate),
        ] {
            for offset in [0, 256, 768] {
                GemvCase {
                    bias,
                    mode,
                    offset,
                    ..GemvCase::new(rows, cols)
                }
                .check(&kernel, &mut rng);
            }
        }
    }
}

/// Every reduction path and workgroup shape (threads, rows per workgroup) gives the same sums,
/// including the workgroup-memory tree used on adapters without subgroups.
/// The fused inputs (RMSNorm of the bound vector with its weight and eps; SwiGLU of [gate | up])
/// against the unfused steps computed on the CPU in f64, on odd shapes, with bias, both epilogues.
#[test]
fn gemv_fused_rmsnorm_and_swiglu_inputs_match_cpu() {
    let g = gpu();
    let kernel = GemvQ4::new(g).expect("gemv compiles");
    let mut rng = Rng::fresh("gemv fused inputs");
    let eps = 1e-5f32;
    let cases = [(1, 64), (37, 300), (300, 576), (129, 1000), (4864, 896)];
    for (i, (rows, cols)) in cases.into_iter().enumerate() {
        for swiglu in [false, true] {
            let mode = if i % 2 == 0 {
                Epilogue::Store
            } else {
                Epilogue::Accumulate
            };
            let m = random_matrix(&mut rng, rows, cols);
            let w = GpuMatrix::upload(g, &mut rng, &m, 256);
            let raw = rng.vec(if swiglu { 2 * cols } else { cols }, 2.0);
            let raw_buf = Placed::f32s(g, &mut rng, "input", &raw, 256);
            let norm_w = rng.vec(cols, 1.0);
            let norm_buf = Placed::f32s(g, &mut rng, "norm weight", &norm_w, 512);
            let x: Vec<f32> = if swiglu {
                (0..cols)
                    .map(|j| {
                        let (gate, up) = (raw[j] as f64, raw[cols + j] as f64);
                        (gate / (1.0 + (-gate).exp()) * up) as f32
                    })
                    .collect()
            } else {
                let mean_sq = raw.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64;
                let s = 1.0 / (mean_sq + eps as f64).sqrt();
                raw.iter()
                    .zip(&norm_w)
                    .map(|(&v, &w)| (v as f64 * s * w as f64) as f32)
                    .collect()
            };
            let bias = rng.vec(rows, 1.0);
            let bias_buf = Placed::f32s(g, &mut rng, "bias", &bias, 256);
            let y_init = match mode {
                Epilogue::Store => vec![f32::NAN; rows],
                Epilogue::Accumulate => rng.vec(rows, 4.0),
            };
            let y_buf = Placed::f32s(g, &mut rng, "y", &y_init, 256);
            let input = if swiglu {
                GemvInput::SwiGlu
            } else {
                GemvInput::RmsNorm {
                    weight: norm_buf.range(),
                    eps,
                }
            };
            let dispatches = kernel
                .bind_input(
                    g,
                    w.q4ref(),
                    raw_buf.range(),
                    y_buf.range(),
                    Some(bias_buf.range()),
                    mode,
                    input,
                )
                .expect("bind");
            run_dispatches(g, &dispatches);
            let y0 = (mode == Epilogue::Accumulate).then_some(&y_init[..]);
            let want = reference(&m, &x, Some(&bias), y0);
            let what = format!("gemv {rows}x{cols} {mode:?} with {input:?}");
            let scale = term_scale(&m, &x, Some(&bias), y0);
            assert_close_at_scale(&what, &y_buf.read_f32(g), &want, scale, "max Σ|w||x|", TOL);
        }
    }
    // SwiGLU reads 2K values: a K-long vector is refused.
    let m = random_matrix(&mut rng, 8, 128);
    let w = GpuMatrix::upload(g, &mut rng, &m, 0);
    let gate_only = rng.vec(128, 1.0);
    let short = Placed::f32s(g, &mut rng, "x", &gate_only, 0);
    let y = Placed::f32s(g, &mut rng, "y", &[0.0; 8], 0);
    let err = kernel
        .bind_input(
            g,
            w.q4ref(),
            short.range(),
            y.range(),
            None,
            Epilogue::Store,
            GemvInput::SwiGlu,
        )
        .expect_err("too short for gate and up");
    assert!(err.to_string().contains("x"), "{err}");
}

/// Both workgroup reductions (shaders/gemv_q4_sum_subgroup.wgsl where the adapter has subgroups,
/// and shaders/gemv_q4_sum_shared.wgsl) at every workgroup shape, against the CPU.
#[test]
fn gemv_every_workgroup_shape() {
    let g = gpu();
    let kernel = GemvQ4::new(g).expect("gemv compiles");
    let mut rng = Rng::fresh("gemv workgroup shapes");
    let min_wg = g.caps.subgroup_max_size.max(32).next_power_of_two();
    let reductions: &[bool] = if g.caps.subgroups {
        &[true, false]
    } else {
        &[false]
    };
    for &subgroups in reductions {
        for (wg, rows) in [
            (min_wg, 1),
            (min_wg, 3),
            (min_wg, 16),
            (96, 5),
            (128, 8),
            (160, 10),
            (256, 3),
        ] {
            let config = Some(GemvConfig {
                wg,
                rows,
                subgroups,
                unroll: 1,
            });
            let case = GemvCase {
                bias: true,
                mode: Epilogue::Accumulate,
                opts: GemvOptions {
                    config,
                    ..Default::default()
                },
                // 94 quarters, the last block part padding: threads with several quarters,
                // with one, and with none.
                ..GemvCase::new(37, 3000)
            };
            case.check(&kernel, &mut rng);
        }
    }
}

/// Few rows and a long K: the chosen shape spreads each row over more threads (split K).
#[test]
fn gemv_split_k_for_few_rows() {
    let g = gpu();
    let kernel = GemvQ4::new(g).expect("gemv compiles");
    let mut rng = Rng::fresh("gemv split k");
    let (rows, cols) = (33, 4096);
    let many = kernel.config_for(65536, cols);
    let few = kernel.config_for(rows, cols);
    assert!(
        few.wg > many.wg,
        "few rows should get wider workgroups: {few:?} vs {many:?}"
    );
    GemvCase {
        bias: true,
        ..GemvCase::new(rows, cols)
    }
    .check(&kernel, &mut rng);
}

/// A matrix larger than the binding limit is cut into row ranges (forced here with a small limit).
#[test]
fn gemv_splits_rows_over_the_binding_limit() {
    let g = gpu();
    let kernel = GemvQ4::new(g).expect("gemv compiles");
    let mut rng = Rng::fresh("gemv row ranges");
    for (rows, cols, limit) in [(300, 576, 40_000), (1001, 200, 8_192), (77, 1000, 20_000)] {
        let opts = GemvOptions {
            max_binding_bytes: Some(limit),
            ..Default::default()
        };
        let case = GemvCase {
            bias: true,
            mode: Epilogue::Accumulate,
            offset: 256,
            opts,
            ..GemvCase::new(rows, cols)
        };
        let n = case.check(&kernel, &mut rng);
        assert!(
            n > 1,
            "{rows}x{cols} under a {limit}-byte limit should take several dispatches, took {n}"
        );
    }
}

#[test]
fn gemv_rejects_bad_shapes_with_clear_errors() {
    let g = gpu();
    let kernel = GemvQ4::new(g).expect("gemv compiles");
    let mut rng = Rng::fresh("gemv errors");
    let m = random_matrix(&mut rng, 8, 256);
    let w = GpuMatrix::upload(g, &mut rng, &m, 0);
    let x_host = rng.vec(256, 1.0);
    let x = Placed::f32s(g, &mut rng, "x", &x_host, 0);
    let y = Placed::f32s(g, &mut rng, "y", &[0.0; 8], 0);
    let err = |r: q4wgpu::Result<Vec<Dispatch>>| r.expect_err("must be rejected").to_string();

    let short_x = BufRange {
        size: 255 * 4,
        ..x.range()
    };
    let e = err(kernel.bind(g, w.q4ref(), short_x, y.range(), None, Epilogue::Store));
    assert!(e.contains("x needs 1024 bytes"), "{e}");

    let short_w = Q4Ref {
        qweight: BufRange {
            size: 64,
            ..w.qweight.range()
        },
        ..w.q4ref()
    };
    let e = err(kernel.bind(g, short_w, x.range(), y.range(), None, Epilogue::Store));
    assert!(e.contains("qweight") && e.contains("8x256"), "{e}");

    let odd = Q4Ref {
        cols: 255,
        ..w.q4ref()
    };
    let e = err(kernel.bind(g, odd, x.range(), y.range(), None, Epilogue::Store));
    assert!(e.contains("multiple of 4"), "{e}");

    let align = g.limits.min_storage_buffer_offset_alignment as u64;
    if align > 4 {
        let shifted = BufRange {
            offset: 4,
            size: 8 * 4,
            ..y.range()
        };
        let e = err(kernel.bind(g, w.q4ref(), x.range(), shifted, None, Epilogue::Store));
        assert!(e.contains("alignment"), "{e}");
    }

    let e = err(kernel.bind(g, w.q4ref(), x.range(), x.range(), None, Epilogue::Store));
    assert!(e.contains("different buffers"), "{e}");

    let cfg = GemvConfig {
        wg: 100,
        rows: 4,
        subgroups: false,
        unroll: 1,
    };
    let opts = GemvOptions {
        config: Some(cfg),
        ..Default::default()
    };
    let e = err(kernel.bind_with(
        g,
        w.q4ref(),
        x.range(),
        y.range(),
        None,
        Epilogue::Store,
        &opts,
    ));
    assert!(e.contains("multiple of"), "{e}");
}

/// Every GEMM kernel: the first two and every tile of the register-tiled and cooperative-matrix
/// kernels, and the packed loader on the tiles the default picks.
fn all_gemm_variants() -> Vec<GemmVariant> {
    let mut v = vec![GemmVariant::Tiled, GemmVariant::Coop];
    v.extend([2, 4, 8].map(|rm| GemmVariant::Reg { rm }));
    for prefetch in [true, false] {
        for tm in [1, 2, 4] {
            for tn in [1, 2, 4] {
                v.push(GemmVariant::coop_tile(tm, tn, prefetch));
            }
        }
    }
    v.extend(DEFAULT_TILES.map(|(tm, tn)| packed_tile(tm, tn)));
    v
}

/// The tiles GemmVariant::default_for picks.
const DEFAULT_TILES: [(u32, u32); 5] = [(4, 4), (2, 4), (1, 4), (2, 2), (1, 2)];

/// A tile with prefetch and the packed loader, as the default has them.
fn packed_tile(tm: u32, tn: u32) -> GemmVariant {
    GemmVariant::CoopTile {
        tm,
        tn,
        prefetch: true,
        opts: q4wgpu::kernels::gemm_q4::TileOpts {
            packed: true,
            ..Default::default()
        },
    }
}

fn is_packed(v: GemmVariant) -> bool {
    matches!(v, GemmVariant::CoopTile { opts, .. } if opts.packed)
}

/// Set on a machine whose adapter has cooperative matrices, so tests that need them fail
/// instead of reporting "not run".
fn coop_required() -> bool {
    std::env::var("Q4WGPU_REQUIRE_COOP").is_ok_and(|v| v != "0")
}

/// The GEMM variants this kernel runs (emulated cooperative-matrix tiles included), with their
/// tolerances.
fn gemm_variants(kernel: &GemmQ4) -> Vec<(GemmVariant, f32)> {
    if coop_required() && !kernel.has_coop() {
        panic!("Q4WGPU_REQUIRE_COOP is set but the adapter lacks cooperative matrices");
    }
    all_gemm_variants()
        .into_iter()
        .filter(|v| {
            !v.is_coop()
                || kernel.has_hardware_coop()
                || (kernel.has_coop() && *v != GemmVariant::Coop)
        })
        .map(|v| (v, if v.is_coop() { COOP_TOL } else { TOL }))
        .collect()
}

struct GemmCase {
    m: usize,
    m_max: usize,
    rows: usize,
    cols: usize,
    bias: bool,
    mode: Epilogue,
    max_binding_bytes: Option<u64>,
}

impl GemmCase {
    /// Runs the case with one variant; rows of Y at or past `m` must keep their NaN poison.
    /// Returns the number of dispatches.
    fn check(
        &self,
        kernel: &GemmQ4,
        variant: Option<GemmVariant>,
        tol: f32,
        rng: &mut Rng,
    ) -> usize {
        self.check_y(kernel, variant, tol, rng).0
    }

    /// [`check`](Self::check), also returning the first `m` rows of Y.
    fn check_y(
        &self,
        kernel: &GemmQ4,
        variant: Option<GemmVariant>,
        tol: f32,
        rng: &mut Rng,
    ) -> (usize, Vec<f32>) {
        let g = gpu();
        let (m, k, n) = (self.m, self.cols, self.rows);
        let w_host = random_matrix(rng, n, k);
        let w = GpuMatrix::upload(g, rng, &w_host, 256);
        // Rows past m hold NaN: a kernel that reads them into live rows fails.
        let mut x = rng.vec(m * k, 1.0);
        x.resize(self.m_max * k, f32::NAN);
        let xb = Placed::f32s(g, rng, "x", &x, 0);
        let bias = self.bias.then(|| rng.vec(n, 1.0));
        let bb = bias.as_ref().map(|b| Placed::f32s(g, rng, "bias", b, 512));
        let mut y_init = match self.mode {
            Epilogue::Store => vec![f32::NAN; m * n],
            Epilogue::Accumulate => rng.vec(m * n, 4.0),
        };
        y_init.resize(self.m_max * n, f32::NAN);
        let yb = Placed::f32s(g, rng, "y", &y_init, 256);
        let step = g.uniform(
            "step",
            &StepParams {
                pos: 3,
                n_tokens: m as u32,
                kv_len: 3 + m as u32,
                _pad: 0,
            },
        );
        let opts = GemmOptions {
            variant,
            max_binding_bytes: self.max_binding_bytes,
        };
        let dispatches = kernel
            .bind_with(
                g,
                w.q4ref(),
                xb.range(),
                yb.range(),
                bb.as_ref().map(Placed::range),
                self.mode,
                self.m_max,
                &step,
                &opts,
            )
            .expect("bind");
        run_dispatches(g, &dispatches);
        let got = yb.read_f32(g);
        let what = format!(
            "gemm {variant:?} m {m}/{} {n}x{k} bias {} {:?}",
            self.m_max, self.bias, self.mode
        );
        let mut want = Vec::with_capacity(m * n);
        for t in 0..m {
            let init = (self.mode == Epilogue::Accumulate).then(|| &y_init[t * n..(t + 1) * n]);
            want.extend(reference(
                &w_host,
                &x[t * k..(t + 1) * k],
                bias.as_deref(),
                init,
            ));
        }
        assert_close(&what, &got[..m * n], &want, tol);
        if let Some(i) = got[m * n..].iter().position(|v| !v.is_nan()) {
            panic!(
                "{what}: row {} past n_tokens was written ({})",
                m + i / n,
                got[m * n + i]
            );
        }
        (dispatches.len(), got[..m * n].to_vec())
    }
}

/// Cases that cross every tile edge of `v`: M below one tile and just past one (never a multiple
/// of 16), N not a multiple of the tile, K not a multiple of 128 (and of 8 once), store and
/// accumulate, with and without bias; m_max past M so rows inside a tile but past n_tokens exist.
fn gemm_cases(v: GemmVariant) -> Vec<GemmCase> {
    let (bm, bn) = v.tile();
    let mut shapes = vec![(33, 200), (300, 576), (7, 1000), (bn + 5, 196), (70, 72)];
    if matches!(v, GemmVariant::Tiled | GemmVariant::Coop) {
        shapes.push((45, 130));
    }
    let mut cases = Vec::new();
    for (j, &(rows, cols)) in shapes.iter().enumerate() {
        for (i, m) in [3 + 2 * j, bm + 1 + 6 * j].into_iter().enumerate() {
            cases.push(GemmCase {
                m,
                m_max: m + 1 + 13 * j,
                rows,
                cols,
                bias: (i + j) % 2 == 1,
                mode: if j % 2 == 0 {
                    Epilogue::Store
                } else {
                    Epilogue::Accumulate
                },
                max_binding_bytes: None,
            });
        }
    }
    cases
}

fn check_gemm_variants(kernel: &GemmQ4, what: &str) {
    let mut rng = Rng::fresh(what);
    for (variant, tol) in gemm_variants(kernel) {
        let t = std::time::Instant::now();
        for case in gemm_cases(variant) {
            case.check(kernel, Some(variant), tol, &mut rng);
        }
        eprintln!("{what}: {variant:?} in {:.2} s", t.elapsed().as_secs_f64());
    }
}

#[test]
fn gemm_matches_cpu_and_leaves_rows_past_n_tokens() {
    let g = gpu();
    let kernel = GemmQ4::new(g).expect("gemm compiles");
    check_gemm_variants(&kernel, "gemm");
}

/// The cooperative-matrix tiles with their matrix operations emulated in plain WGSL
/// (shaders/gemm_q4_mma_emulated.wgsl in place of gemm_q4_mma_coop.wgsl): checks the tiling, the
/// f16 staging and the epilogue of shaders/gemm_q4_mma.wgsl on any adapter, with both loaders
/// (shaders/gemm_q4_mma_load.wgsl, and shaders/gemm_q4_mma_load_packed.wgsl fed by the
/// `main_packed` conversion of shaders/gemm_q4_x16.wgsl).
#[test]
fn gemm_emulated_coop_tiles_match_cpu() {
    let g = gpu();
    let kernel = GemmQ4::new_emulated(g);
    let mut rng = Rng::fresh("gemm emulated coop");
    for (variant, tol) in gemm_variants(&kernel) {
        if let GemmVariant::CoopTile {
            tm, tn, prefetch, ..
        } = variant
        {
            // Tiles without prefetch differ only in where the loop loads: they run on the
            // hardware (gemm_matches_cpu_and_leaves_rows_past_n_tokens) and are left out here,
            // where compiling each emulated tile is most of CI's time for this file.
            if !prefetch {
                continue;
            }
            let t = std::time::Instant::now();
            // Every case for the tiles the wrapper picks (with the packed loader, as the default
            // has them); the first four (both M of two shapes: past a tile edge in M, N and K)
            // for the others, to keep the test short.
            let cases = gemm_cases(variant);
            let picked = DEFAULT_TILES.contains(&(tm, tn)) && is_packed(variant);
            let n = if picked { cases.len() } else { 4 };
            for case in cases.into_iter().take(n) {
                case.check(&kernel, Some(variant), tol, &mut rng);
            }
            eprintln!("emulated {variant:?} in {:.2} s", t.elapsed().as_secs_f64());
        }
    }
}

/// The options of the cooperative-matrix tiles (f16 X, K steps of 64, split-K, all three, and
/// the packed loader with each), on the hardware where the adapter has cooperative matrices and
/// emulated everywhere, against the CPU reference: M past a tile edge, N not a multiple of the
/// tile, K not a multiple of 64 (200: split 3 gives slices of 96, 96 and 8) and, packed, not of
/// 8 (196), store and accumulate, with and without bias. f16 X, K steps of 64 and double buffers
/// change no rounding, so they must equal the plain tile bit for bit.
#[test]
fn gemm_coop_tile_options_match_cpu() {
    use q4wgpu::kernels::gemm_q4::TileOpts;
    let g = gpu();
    let hardware = GemmQ4::new(g).expect("gemm compiles");
    let emulated = GemmQ4::new_emulated(g);
    let mut rng = Rng::fresh("gemm tile options");
    let opts = |split_k, x_f16, bk64, double_buffer| TileOpts {
        split_k,
        x_f16,
        bk64,
        double_buffer,
        ..TileOpts::default()
    };
    let packed = |split_k, bk64, double_buffer| TileOpts {
        packed: true,
        ..opts(split_k, false, bk64, double_buffer)
    };
    let variants = [
        (2, 2, true, opts(1, true, false, false)),
        (2, 4, false, opts(1, false, true, false)),
        (2, 2, true, opts(1, false, false, true)),
        (1, 4, false, opts(1, true, false, true)),
        (1, 2, true, opts(3, false, false, false)),
        (2, 4, true, opts(4, true, true, false)),
        (1, 2, false, opts(3, true, true, true)),
        (2, 2, true, packed(1, false, false)),
        (1, 4, false, packed(1, true, false)),
        (2, 1, true, packed(1, false, true)),
        (1, 2, true, packed(3, true, false)),
    ];
    for kernel in [&hardware, &emulated] {
        if !kernel.has_coop() {
            continue;
        }
        for (tm, tn, prefetch, opts) in variants {
            let t = std::time::Instant::now();
            let variant = GemmVariant::CoopTile {
                tm,
                tn,
                prefetch,
                opts,
            };
            let plain = GemmVariant::coop_tile(tm, tn, prefetch);
            let cases = gemm_cases(variant).into_iter().enumerate();
            let chosen = cases.filter(|(i, c)| *i < 4 || (opts.packed && c.cols % 8 != 0));
            for (_, case) in chosen {
                let mut same_inputs = rng.clone();
                let (_, got) = case.check_y(kernel, Some(variant), COOP_TOL, &mut rng);
                // The packed loader sums in another order: checked against the reference only.
                if opts.split_k == 1 && !opts.packed {
                    let (_, want) = case.check_y(kernel, Some(plain), COOP_TOL, &mut same_inputs);
                    let differ = got
                        .iter()
                        .zip(&want)
                        .position(|(a, b)| a.to_bits() != b.to_bits());
                    assert!(
                        differ.is_none(),
                        "{} differs from {}: m {} {}x{}, first at {differ:?}",
                        variant.short_name(),
                        plain.short_name(),
                        case.m,
                        case.rows,
                        case.cols
                    );
                }
            }
            if opts.split_k > 1 && (opts.x_f16 || opts.packed) {
                // W in three row ranges (125 rows of 320 bytes per 40 000-byte binding): one
                // conversion of X, then a product and a reduction per range.
                let case = GemmCase {
                    m: 9,
                    m_max: 20,
                    rows: 300,
                    cols: 576,
                    bias: true,
                    mode: Epilogue::Accumulate,
                    max_binding_bytes: Some(40_000),
                };
                let n = case.check(kernel, Some(variant), COOP_TOL, &mut rng);
                assert_eq!(n, 7, "dispatches of {}", variant.short_name());
            }
            eprintln!(
                "{} {} in {:.2} s",
                if kernel.has_hardware_coop() {
                    "hardware"
                } else {
                    "emulated"
                },
                variant.short_name(),
                t.elapsed().as_secs_f64()
            );
        }
    }
}

/// On an adapter with cooperative matrices the tests above ran the hardware kernels
/// (shaders/gemm_q4_mma.wgsl with gemm_q4_mma_coop.wgsl) against the CPU reference; elsewhere
/// this says so, and fails when Q4WGPU_REQUIRE_COOP=1 (set where the adapter must have them).
#[test]
fn gemm_coop_tiles_ran_on_hardware() {
    let kernel = GemmQ4::new(gpu()).expect("gemm compiles");
    if kernel.has_hardware_coop() {
        let n = gemm_variants(&kernel)
            .iter()
            .filter(|(v, _)| v.is_coop())
            .count();
        assert_eq!(n, 24, "every cooperative-matrix variant is tested");
    } else if coop_required() {
        panic!("Q4WGPU_REQUIRE_COOP is set but the adapter lacks cooperative matrices");
    } else {
        eprintln!("not run: adapter lacks cooperative matrices");
    }
}

/// With the default kernels and m_max above SMALL_M, a binding holds a short-step tile and a
/// long-prompt tile; exactly one of them computes each step (short, at the edge, long).
#[test]
fn gemm_default_binding_switches_tiles_by_tokens() {
    let g = gpu();
    let mut rng = Rng::fresh("gemm default tiles");
    let hardware = GemmQ4::new(g).expect("gemm compiles");
    let emulated = GemmQ4::new_emulated(g);
    for kernel in [&hardware, &emulated] {
        let tol = if kernel.has_coop() { COOP_TOL } else { TOL };
        for (i, m) in [5, SMALL_M, SMALL_M + 1, 150].into_iter().enumerate() {
            let case = GemmCase {
                m,
                m_max: 150,
                rows: 200,
                cols: 264,
                bias: i % 2 == 0,
                mode: if i < 2 {
                    Epilogue::Accumulate
                } else {
                    Epilogue::Store
                },
                max_binding_bytes: None,
            };
            let n = case.check(kernel, None, tol, &mut rng);
            let (large, small) = (
                kernel.variant_for(150, 200, 264),
                kernel.variant_for(SMALL_M, 200, 264),
            );
            let two = large != small;
            // Plus one conversion of X where a packed tile reads it.
            let x16 = [large, small].iter().any(|v| is_packed(*v));
            assert_eq!(
                n,
                1 + two as usize + x16 as usize,
                "dispatches of the default binding"
            );
            // The portable kernels always switch (the register tile height follows M).
            assert!(
                two || kernel.has_coop(),
                "one tile for short and long steps"
            );
        }
    }
}

/// The default kernel for each shape, and clear errors for kernels that cannot take it.
#[test]
fn gemm_picks_kernels_and_rejects_bad_ones() {
    let g = gpu();
    let kernel = GemmQ4::new(g).expect("gemm compiles");
    let mut rng = Rng::fresh("gemm defaults");
    let coop = kernel.has_hardware_coop();
    assert_eq!(
        kernel.variant_for(512, 55296, 5120),
        if coop {
            packed_tile(4, 4)
        } else {
            GemmVariant::Reg { rm: 8 }
        }
    );
    assert_eq!(
        kernel.variant_for(20, 55296, 5120),
        if coop {
            packed_tile(1, 4)
        } else {
            GemmVariant::Reg { rm: 2 }
        }
    );
    // Too few 128 x 128 tiles for a wave and a long K (down, o of the 32B shape at 512 tokens):
    // split-K; qkv's 224 tiles are enough.
    if coop {
        for (n, k, split) in [(5120, 27648, 4), (5120, 5120, 4), (7168, 5120, 1)] {
            match kernel.variant_for(512, n, k) {
                GemmVariant::CoopTile {
                    tm: 4,
                    tn: 4,
                    prefetch: true,
                    opts,
                } => {
                    assert_eq!(opts.split_k, split, "{n} x {k}")
                }
                v => panic!("{n} x {k}: {v:?}"),
            }
        }
    }
    let odd_k = kernel.variant_for(100, 40, 130);
    assert!(
        matches!(odd_k, GemmVariant::Tiled | GemmVariant::Coop),
        "{odd_k:?}"
    );
    // The default for K = 130 runs (vec4 kernels cannot).
    let case = GemmCase {
        m: 9,
        m_max: 11,
        rows: 40,
        cols: 130,
        bias: true,
        mode: Epilogue::Store,
        max_binding_bytes: None,
    };
    let tol = if odd_k.is_coop() { COOP_TOL } else { TOL };
    case.check(&kernel, None, tol, &mut rng);
    let w_host = random_matrix(&mut rng, 40, 130);
    let w = GpuMatrix::upload(g, &mut rng, &w_host, 0);
    let x = poisoned(g, "x", 11 * 130);
    let y = poisoned(g, "y", 11 * 40);
    let step = g.uniform("step", &StepParams::default());
    let bind = |variant| {
        let opts = GemmOptions {
            variant: Some(variant),
            max_binding_bytes: None,
        };
        match kernel.bind_with(
            g,
            w.q4ref(),
            BufRange::whole(&x),
            BufRange::whole(&y),
            None,
            Epilogue::Store,
            11,
            &step,
            &opts,
        ) {
            Ok(_) => panic!("{variant:?} accepted K = 130"),
            Err(e) => e.to_string(),
        }
    };
    let e = bind(GemmVariant::Reg { rm: 4 });
    assert!(e.contains("multiple of 4"), "{e}");
    let e = bind(GemmVariant::Reg { rm: 3 });
    assert!(e.contains("no kernel"), "{e}");
    for split_k in [0, 17] {
        let e = bind(GemmVariant::CoopTile {
            tm: 2,
            tn: 2,
            prefetch: true,
            opts: q4wgpu::kernels::gemm_q4::TileOpts {
                split_k,
                ..Default::default()
            },
        });
        assert!(e.contains("no kernel"), "split_k {split_k}: {e}");
    }
    if !coop {
        let e = bind(GemmVariant::Coop);
        assert!(e.contains("cooperative matrices"), "{e}");
    }
}

#[test]
fn gemm_splits_rows_over_the_binding_limit() {
    let g = gpu();
    let kernel = GemmQ4::new(g).expect("gemm compiles");
    let mut rng = Rng::fresh("gemm row ranges");
    for (variant, tol) in gemm_variants(&kernel) {
        let case = GemmCase {
            m: 9,
            m_max: 20,
            rows: 300,
            cols: 576,
            bias: true,
            mode: Epilogue::Accumulate,
            max_binding_bytes: Some(40_000),
        };
        let n = case.check(&kernel, Some(variant), tol, &mut rng);
        assert!(n > 1, "expected several dispatches, got {n}");
    }
}

/// At M = 1 both kernels compute the same product (up to accumulation order).
#[test]
fn gemm_and_gemv_agree_at_one_token() {
    let g = gpu();
    let gemv = GemvQ4::new(g).expect("gemv compiles");
    let gemm = GemmQ4::new(g).expect("gemm compiles");
    let mut rng = Rng::fresh("gemm vs gemv");
    let (rows, cols) = (301, 896);
    let m = random_matrix(&mut rng, rows, cols);
    let w = GpuMatrix::upload(g, &mut rng, &m, 0);
    let (x_host, bias_host) = (rng.vec(cols, 1.0), rng.vec(rows, 1.0));
    let x = Placed::f32s(g, &mut rng, "x", &x_host, 0);
    let bias = Placed::f32s(g, &mut rng, "bias", &bias_host, 0);
    let y1 = poisoned(g, "y gemv", rows);
    let y2 = poisoned(g, "y gemm", rows);
    let step = g.uniform(
        "step",
        &StepParams {
            pos: 0,
            n_tokens: 1,
            kv_len: 1,
            _pad: 0,
        },
    );
    let mut d = gemv
        .bind(
            g,
            w.q4ref(),
            x.range(),
            BufRange::whole(&y1),
            Some(bias.range()),
            Epilogue::Store,
        )
        .expect("bind gemv");
    for (variant, tol) in gemm_variants(&gemm) {
        let opts = GemmOptions {
            variant: Some(variant),
            ..Default::default()
        };
        d.extend(
            gemm.bind_with(
                g,
                w.q4ref(),
                x.range(),
                BufRange::whole(&y2),
                Some(bias.range()),
                Epilogue::Store,
                1,
                &step,
                &opts,
            )
            .expect("bind gemm"),
        );
        run_dispatches(g, &d);
        let a = g.read_f32(&y1, rows).expect("read");
        let b = g.read_f32(&y2, rows).expect("read");
        assert_close(&format!("gemm {variant:?} vs gemv"), &b, &a, tol);
    }
}

/// Every matmul shader (including the cooperative-matrix one, which lavapipe cannot run) parses,
/// validates and compiles to SPIR-V with naga, as wgpu would on a GPU that has the features.
#[test]
fn matmul_shaders_compile_to_spirv() {
    let gemv = |wg, rows, subgroups, input| {
        gemv_q4::shader(
            &GemvConfig {
                wg,
                rows,
                subgroups,
                unroll: 1,
            },
            input,
        )
    };
    let shaders = [
        (
            "gemv_q4 subgroup",
            gemv(96, 4, true, GemvInputKind::Plain),
            vec![("WG", 96.0), ("ROWS", 4.0)],
        ),
        (
            "gemv_q4 shared",
            gemv(256, 8, false, GemvInputKind::Plain),
            vec![("WG", 256.0), ("ROWS", 8.0)],
        ),
        (
            "gemv_q4 rmsnorm input",
            gemv(128, 8, true, GemvInputKind::RmsNorm),
            vec![("WG", 128.0), ("ROWS", 8.0)],
        ),
        (
            "gemv_q4 swiglu input",
            gemv(96, 8, false, GemvInputKind::SwiGlu),
            vec![("WG", 96.0), ("ROWS", 8.0)],
        ),
        (
            "gemm_q4",
            include_str!("../shaders/gemm_q4.wgsl").to_string(),
            vec![],
        ),
        (
            "gemm_q4_coop",
            include_str!("../shaders/gemm_q4_coop.wgsl").to_string(),
            vec![("WG", 128.0)],
        ),
    ];
    for (name, kernel, overrides) in shaders {
        q4wgpu::gpu::testing::compile_to_spirv(name, &kernel, &overrides);
    }
}

/// naga: parse, validate (every capability, as on a GPU that has the features), SPIR-V out.
fn gemm_spirv(name: &str, kernel: &str) -> Vec<u32> {
    q4wgpu::gpu::testing::compile_to_spirv(name, kernel, &[])
}

/// Every tile of the cooperative-matrix kernel (which lavapipe cannot run), and its emulation,
/// compiles to SPIR-V with naga; the hardware one contains cooperative-matrix instructions.
#[test]
fn gemm_tile_shaders_compile_to_spirv() {
    use q4wgpu::kernels::gemm_q4::{mma_shader, reg_shader};
    // SPIR-V opcodes of OpCooperativeMatrixMulAddKHR and OpCooperativeMatrixStoreKHR.
    let has_op = |words: &[u32], op: u32| {
        // Walk the instruction stream after the 5-word header: (word count << 16) | opcode.
        let mut i = 5;
        while i < words.len() {
            let (count, code) = ((words[i] >> 16) as usize, words[i] & 0xffff);
            if code == op {
                return true;
            }
            i += count.max(1);
        }
        false
    };
    for tm in [1, 2, 4] {
        for tn in [1, 2, 4] {
            for sg in [32, 64] {
                let name = format!("gemm_q4_mma {tm}x{tn} subgroup {sg}");
                let words = gemm_spirv(&name, &mma_shader(tm, tn, sg == 32, sg, false));
                assert!(
                    has_op(&words, 4459),
                    "{name}: no OpCooperativeMatrixMulAddKHR"
                );
                assert!(
                    has_op(&words, 4458),
                    "{name}: no OpCooperativeMatrixStoreKHR"
                );
            }
            let name = format!("gemm_q4_mma {tm}x{tn} emulated");
            let words = gemm_spirv(&name, &mma_shader(tm, tn, tm != tn, 32, true));
            assert!(
                !has_op(&words, 4459),
                "{name}: emulation uses cooperative matrices"
            );
        }
    }
    for rm in [2, 4, 8] {
        gemm_spirv(&format!("gemm_q4_reg {rm}"), &reg_shader(rm));
    }
    // The tile options (split-K does not change the source).
    for (x_f16, packed, bk64, double_buffer) in [
        (true, false, false, false),
        (false, false, true, false),
        (true, false, true, false),
        (true, false, false, true),
        (false, true, false, false),
        (false, true, true, false),
        (false, true, false, true),
    ] {
        let opts = q4wgpu::kernels::gemm_q4::TileOpts {
            split_k: 1,
            x_f16,
            packed,
            bk64,
            double_buffer,
            ..Default::default()
        };
        // Every option set the bench sweeps on 128 x 128 tiles fits 48 KiB.
        assert!(opts.workgroup_bytes(4, 4) <= 48 * 1024, "{opts:?}");
        let name = format!("gemm_q4_mma 4x4 {opts:?}");
        let words = gemm_spirv(
            &name,
            &q4wgpu::kernels::gemm_q4::mma_shader_with(4, 4, true, opts, 32, false),
        );
        assert!(
            has_op(&words, 4459),
            "{name}: no OpCooperativeMatrixMulAddKHR"
        );
    }
    gemm_spirv(
        "gemm_q4_splitk",
        include_str!("../shaders/gemm_q4_splitk.wgsl"),
    );
    gemm_spirv("gemm_q4_x16", include_str!("../shaders/gemm_q4_x16.wgsl"));
}
