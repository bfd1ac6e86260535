//! Kernel benchmarks: INT4 GEMV bandwidth (decode) and GEMM throughput (prompt processing) on the
//! 32B model's shapes, against a plain streaming kernel measured in the same run.
//!
//! `cargo bench --bench kernels` runs the DeepSeek-R1-Distill-Qwen-32B shapes (needs a big GPU):
//! INT4 GEMV (decode), INT4 GEMM (prompt) and decode attention over the KV cache at several
//! context lengths.
//! `Q4WGPU_BENCH_SMALL=1` (or the argument `--small`) runs small shapes, for lavapipe.
//! `Q4WGPU_BENCH_GEMM_ONLY=1` (or `--gemm-only`) runs only the GEMM table;
//! `Q4WGPU_BENCH_GEMM_M=512,4096` sets its token counts (default 512, 64, 4096).
//! `Q4WGPU_BENCH_GEMM_SWEEP=1` (or `--gemm-sweep`) adds, on adapters with cooperative matrices,
//! every option of the tiled kernel (`TileOpts`: f16 X, K steps of 64, double-buffered tiles,
//! split-K 2/4/8 where the 128 x 128 tiles do not fill the GPU twice) and ends each token count
//! with the best variant per matrix. `Q4WGPU_BENCH_GEMM_FILTER=split` times only the variants
//! whose table name contains that text (and the default). `Q4WGPU_BENCH_EMULATED=1` runs the
//! tiled kernels with emulated matrix operations (to check the table on lavapipe; its times mean
//! nothing).
//! `Q4WGPU_BENCH_GEMM_ABLATE=1` adds the 128 x 128 tile with parts of the K loop left out
//! (`-loads`, `-stores`, `-mma`: wrong results, to see what each part costs; see
//! `gemm_q4::ABLATE_*` for what each really leaves out).
//! `Q4WGPU_BENCH_SWEEP=1` (or `--sweep`) also times every GEMV workgroup shape, for tuning
//! `GemvQ4::config_for`, and decode attention's split settings.
//! `Q4WGPU_BENCH_ATTENTION_ONLY=1` (or `--attention-only`) times only the streaming read, the
//! activation quantizer and decode attention (the decode step's small kernels).
//!
//! GEMV GB/s = (qweight + scales + x bytes) / median time; weights rotate over enough copies
//! that they cannot stay in the GPU's L2 cache between runs. Times come from timestamp queries
//! around a pass of `REPS` products when the adapter has them, else from the wall clock around
//! submit + wait of such a pass. Each median is over `SAMPLES` passes after `WARMUP` passes.

use q4wgpu::gpu::Gpu;
use q4wgpu::kernels::attention::{Attention, AttentionDispatches, DecodeKernel, DecodeOptions};
use q4wgpu::kernels::gemm_q4::{
    GemmOptions, GemmQ4, GemmVariant, TileOpts, ABLATE_LOADS, ABLATE_MMA, ABLATE_STORES,
};
use q4wgpu::kernels::gemv_q4::{Epilogue, GemvConfig, GemvOptions, GemvQ4, MAX_UNROLL};
use q4wgpu::kernels::gemv_q4_q8::{GemvQ4Q8, Q8Input};
use q4wgpu::kernels::quant_act::{ActInput, ActQ8Buffers, QuantAct, QuantActKernel};
use q4wgpu::kernels::{BufRange, Dispatch, Q4Ref, StepParams};
use q4wgpu::quant::{blocks_per_row, ActQ8};
use std::time::Instant;

const SAMPLES: usize = 21;
const WARMUP: usize = 3;

/// Reads (and, for the copy entry point, writes) a buffer of vec4<u32> with a grid-stride loop.
const STREAM: &str = r#"
@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<u32>>;

@compute @workgroup_size(256)
fn stream_read(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * 256u;
    var acc = vec4<u32>(0u);
    for (var i = gid.x; i < arrayLength(&src); i += stride) {
        acc ^= src[i];
    }
    // Never true for this data; keeps the loads alive.
    if (all(acc == vec4<u32>(0x12345678u))) {
        dst[gid.x] = acc;
    }
}

@compute @workgroup_size(256)
fn stream_copy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * 256u;
    for (var i = gid.x; i < arrayLength(&src); i += stride) {
        dst[i] = src[i];
    }
}
"#;

/// One thread per row, one word at a time: the baseline a GEMV kernel should beat.
const NAIVE_GEMV: &str = r#"
struct Params { rows: u32, k: u32, bpr: u32, pad: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qw: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.x + gid.y * nwg.x * 64u;
    if (row >= p.rows) {
        return;
    }
    var acc = 0.0;
    for (var c = 0u; c < p.k; c++) {
        let si = row * p.bpr + c / 128u;
        let sw = scales[si / 2u];
        let s = select(bf16_lo(sw), bf16_hi(sw), (si & 1u) == 1u);
        acc += q4_level(qw[row * p.bpr * 16u + c / 8u], c % 8u) * s * x[c];
    }
    y[row] = acc;
}
"#;

struct Shape {
    name: &'static str,
    k: usize,
    n: usize,
}

struct Settings {
    shapes: Vec<Shape>,
    /// Weights rotate over copies totalling at least this many bytes (defeats the L2 cache).
    rotate_bytes: u64,
    stream_bytes: u64,
    /// Token counts of the GEMM table.
    gemm_ms: Vec<usize>,
    /// Decode attention: (query heads, KV heads, head dim) and the context lengths timed.
    attention: (usize, usize, usize),
    contexts: Vec<usize>,
    reps: usize,
    naive: bool,
    sweep: bool,
    /// Only the streaming read and decode attention (`--attention-only`).
    attention_only: bool,
    /// Only the GEMM table (`--gemm-only`).
    gemm_only: bool,
    /// Every option of the tiled GEMM (`--gemm-sweep`).
    gemm_sweep: bool,
    /// The 128 x 128 tile inline and with parts left out (`Q4WGPU_BENCH_GEMM_ABLATE=1`).
    gemm_ablate: bool,
}

fn settings() -> Settings {
    let args: Vec<String> = std::env::args().collect();
    let flag = |arg: &str, env: &str| {
        args.iter().any(|a| a == arg) || std::env::var(env).is_ok_and(|v| v != "0")
    };
    let sweep = flag("--sweep", "Q4WGPU_BENCH_SWEEP");
    let attention_only = flag("--attention-only", "Q4WGPU_BENCH_ATTENTION_ONLY");
    let gemm_only = flag("--gemm-only", "Q4WGPU_BENCH_GEMM_ONLY");
    let gemm_sweep = flag("--gemm-sweep", "Q4WGPU_BENCH_GEMM_SWEEP");
    // Q4WGPU_BENCH_GEMM_M=512,4096 overrides the GEMM token counts.
    let gemm_m: Option<Vec<usize>> = std::env::var("Q4WGPU_BENCH_GEMM_M")
        .ok()
        .map(|v| v.split(',').filter_map(|m| m.trim().parse().ok()).collect());
    if flag("--small", "Q4WGPU_BENCH_SMALL") {
        // SmolLM2-135M's shapes (hidden 576, 3 KV heads of 64, FFN 1536), small enough for lavapipe.
        let shapes = vec![
            Shape {
                name: "qkv",
                k: 576,
                n: 576 + 2 * 192,
            },
            Shape {
                name: "o",
                k: 576,
                n: 576,
            },
            Shape {
                name: "gate_up",
                k: 576,
                n: 2 * 1536,
            },
            Shape {
                name: "down",
                k: 1536,
                n: 576,
            },
        ];
        Settings {
            shapes,
            rotate_bytes: 0,
            stream_bytes: 16 << 20,
            gemm_ms: gemm_m.clone().unwrap_or(vec![32, 100]),
            attention: (9, 3, 64),
            contexts: vec![64, 512],
            reps: 1,
            naive: true,
            sweep,
            attention_only,
            gemm_only,
            gemm_sweep,
            gemm_ablate: flag("--gemm-ablate", "Q4WGPU_BENCH_GEMM_ABLATE"),
        }
    } else {
        let (h, kv, ffn, vocab) = (5120, 1024, 27648, 152064);
        let shapes = vec![
            Shape {
                name: "qkv",
                k: h,
                n: h + 2 * kv,
            },
            Shape {
                name: "o",
                k: h,
                n: h,
            },
            Shape {
                name: "gate_up",
                k: h,
                n: 2 * ffn,
            },
            Shape {
                name: "down",
                k: ffn,
                n: h,
            },
            Shape {
                name: "lm_head",
                k: h,
                n: vocab,
            },
        ];
        Settings {
            shapes,
            rotate_bytes: 256 << 20,
            stream_bytes: 1 << 30,
            gemm_ms: gemm_m.unwrap_or(vec![512, 64, 4096]),
            attention: (40, 8, 128),
            contexts: vec![512, 4096, 8192, 16384, 32768],
            reps: 10,
            naive: false,
            sweep,
            attention_only,
            gemm_only,
            gemm_sweep,
            gemm_ablate: flag("--gemm-ablate", "Q4WGPU_BENCH_GEMM_ABLATE"),
        }
    }
}

/// Three significant digits (lavapipe's numbers are small, the H100's large).
fn sig(v: f64) -> String {
    let decimals = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else if v >= 1.0 {
        2
    } else {
        3 + (-v.log10()).floor().max(0.0) as usize
    };
    format!("{v:.decimals$}")
}

/// Times passes of `reps` calls of `encode(pass, call_index)`; returns the median seconds per call.
fn time_per_call(
    gpu: &Gpu,
    reps: usize,
    encode: &dyn Fn(&mut wgpu::ComputePass<'_>, usize),
) -> f64 {
    let passes = WARMUP + SAMPLES;
    let mut times = Vec::with_capacity(SAMPLES);
    if gpu.caps.timestamps {
        let queries = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("bench timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: 2 * SAMPLES as u32,
        });
        let bytes = 16 * SAMPLES as u64;
        let resolve = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("bench resolve"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let readback = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("bench readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        for s in 0..passes {
            let timestamp_writes =
                s.checked_sub(WARMUP)
                    .map(|i| wgpu::ComputePassTimestampWrites {
                        query_set: &queries,
                        beginning_of_pass_write_index: Some(2 * i as u32),
                        end_of_pass_write_index: Some(2 * i as u32 + 1),
                    });
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("bench"),
                timestamp_writes,
            });
            for r in 0..reps {
                encode(&mut pass, s * reps + r);
            }
        }
        enc.resolve_query_set(&queries, 0..2 * SAMPLES as u32, &resolve, 0);
        enc.copy_buffer_to_buffer(&resolve, 0, &readback, 0, bytes);
        gpu.queue.submit([enc.finish()]);
        let raw = gpu
            .map_and_read(&readback, bytes)
            .expect("reading timestamps");
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&raw);
        let period = gpu.queue.get_timestamp_period() as f64 * 1e-9;
        for pair in ticks.chunks(2) {
            times.push(pair[1].wrapping_sub(pair[0]) as f64 * period / reps as f64);
        }
    } else {
        for s in 0..passes {
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                for r in 0..reps {
                    encode(&mut pass, s * reps + r);
                }
            }
            let t = Instant::now();
            gpu.queue.submit([enc.finish()]);
            gpu.wait().expect("GPU work finishes");
            if s >= WARMUP {
                times.push(t.elapsed().as_secs_f64() / reps as f64);
            }
        }
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// A fast deterministic filler (xorshift) for large random buffers.
fn random_words(n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 16) as u32
        })
        .collect()
}

/// `n` values uniform in [-0.5, 0.5) from `random_words(n, seed)`.
fn random_values(n: usize, seed: u64) -> Vec<f32> {
    random_words(n, seed)
        .iter()
        .map(|w| (*w as f32 / u32::MAX as f32) - 0.5)
        .collect()
}

/// A random INT4 matrix on the GPU: words, and scales as bf16 in [2^-8, 2^-6).
struct Matrix {
    rows: usize,
    cols: usize,
    qweight: wgpu::Buffer,
    scales: wgpu::Buffer,
}

impl Matrix {
    fn random(gpu: &Gpu, rows: usize, cols: usize, seed: u64) -> Matrix {
        let bpr = blocks_per_row(cols);
        let words = random_words(rows * bpr * 16, seed);
        let scales: Vec<u16> = random_words(rows * bpr, seed + 1)
            .iter()
            .map(|w| 0x3b80 + (w & 0xff) as u16)
            .collect();
        Matrix {
            rows,
            cols,
            qweight: gpu.storage_from("bench qweight", &words),
            scales: gpu.storage_from_bytes("bench scales", bytemuck::cast_slice(&scales)),
        }
    }

    fn q4ref(&self) -> Q4Ref<'_> {
        Q4Ref::whole(self.rows, self.cols, &self.qweight, &self.scales)
    }

    fn bytes(&self) -> u64 {
        let bpr = blocks_per_row(self.cols) as u64;
        self.rows as u64 * bpr * (64 + 2)
    }
}

/// Random copies of `shape`'s matrix totalling at least `s.rotate_bytes` (timings rotate over
/// them so the L2 cache does not hold the weights): the first with seed `first + i`, copy c
/// with `step * c + i`.
fn rotating_copies(
    gpu: &Gpu,
    s: &Settings,
    shape: &Shape,
    (first, step): (u64, u64),
    i: u64,
) -> Vec<Matrix> {
    let first = Matrix::random(gpu, shape.n, shape.k, first + i);
    let n_copies = (s.rotate_bytes.div_ceil(first.bytes()) as usize).max(1);
    let mut copies = vec![first];
    for c in 1..n_copies {
        copies.push(Matrix::random(gpu, shape.n, shape.k, step * c as u64 + i));
    }
    copies
}

fn encode_all(pass: &mut wgpu::ComputePass<'_>, dispatches: &[Dispatch]) {
    for d in dispatches {
        d.encode(pass);
    }
}

/// Median seconds of one GEMV, rotating over the copies.
fn time_gemv(
    gpu: &Gpu,
    s: &Settings,
    kernel: &GemvQ4,
    copies: &[Matrix],
    x: &wgpu::Buffer,
    y: &wgpu::Buffer,
    cfg: Option<GemvConfig>,
) -> Option<f64> {
    let opts = GemvOptions {
        config: cfg,
        ..Default::default()
    };
    let mut bound = Vec::new();
    for m in copies {
        match kernel.bind_with(
            gpu,
            m.q4ref(),
            BufRange::whole(x),
            BufRange::whole(y),
            None,
            Epilogue::Store,
            &opts,
        ) {
            Ok(d) => bound.push(d),
            Err(e) => {
                eprintln!("  gemv {cfg:?}: {e}");
                return None;
            }
        }
    }
    Some(time_per_call(gpu, s.reps, &|pass, i| {
        encode_all(pass, &bound[i % bound.len()])
    }))
}

fn stream_bandwidth(gpu: &Gpu, s: &Settings) -> (f64, f64) {
    let bytes = s
        .stream_bytes
        .min(gpu.limits.max_storage_buffer_binding_size / 2 & !15);
    let src = gpu.storage_buffer("stream src", bytes);
    let dst = gpu.storage_buffer("stream dst", bytes);
    let groups = 132 * 8 * 4;
    let mut out = [0.0; 2];
    for (i, entry) in ["stream_read", "stream_copy"].into_iter().enumerate() {
        let pipeline = gpu
            .compute_pipeline(&format!("bench/{entry}"), STREAM, entry, &[])
            .expect("stream kernel");
        let bind_group = gpu.bind_group(&format!("bench/{entry}"), &pipeline, &[&src, &dst]);
        let d = Dispatch {
            label: entry.into(),
            pipeline,
            bind_group,
            workgroups: [groups, 1, 1],
            params: None,
        };
        let t = time_per_call(gpu, s.reps, &|pass, _| d.encode(pass));
        let moved = if entry == "stream_copy" {
            2 * bytes
        } else {
            bytes
        };
        out[i] = moved as f64 / t / 1e9;
    }
    (out[0], out[1])
}

fn naive_gemv_gbs(gpu: &Gpu, s: &Settings, m: &Matrix, x: &wgpu::Buffer, y: &wgpu::Buffer) -> f64 {
    let pipeline = gpu
        .compute_pipeline("bench/naive_gemv", NAIVE_GEMV, "main", &[])
        .expect("naive gemv");
    let params = [
        m.rows as u32,
        m.cols as u32,
        blocks_per_row(m.cols) as u32,
        0,
    ];
    let pbuf = gpu.uniform("naive params", &params);
    let bind_group = gpu.bind_group(
        "bench/naive_gemv",
        &pipeline,
        &[&pbuf, &m.qweight, &m.scales, x, y],
    );
    let (gx, gy) = q4wgpu::gpu::dispatch_2d(m.rows.div_ceil(64) as u32);
    let d = Dispatch {
        label: "naive".into(),
        pipeline,
        bind_group,
        workgroups: [gx, gy, 1],
        params: Some(pbuf),
    };
    let t = time_per_call(gpu, s.reps, &|pass, _| d.encode(pass));
    (m.bytes() + m.cols as u64 * 4) as f64 / t / 1e9
}

fn main() {
    let gpu = match Gpu::new(None) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("kernels bench: {e}");
            std::process::exit(1);
        }
    };
    let s = settings();
    println!("# q4wgpu kernel bench\n\nadapter: {}\n", gpu.describe());
    println!(
        "timing: {}, median of {SAMPLES} passes of {} calls after {WARMUP} warm-up passes\n",
        if gpu.caps.timestamps {
            "timestamp queries"
        } else {
            "wall clock"
        },
        s.reps
    );
    let (read_gbs, copy_gbs) = stream_bandwidth(&gpu, &s);
    println!(
        "streaming vec4<u32>: read {} GB/s, copy {} GB/s (read + written bytes)\n",
        sig(read_gbs),
        sig(copy_gbs)
    );

    // Q4WGPU_BENCH_BATCH_ONLY=1: only the batched int8 GEMV (serve --parallel, issue 12).
    if std::env::var("Q4WGPU_BENCH_BATCH_ONLY").is_ok_and(|v| v != "0") {
        gemv_batched(&gpu, &s, read_gbs);
        return;
    }
    // Q4WGPU_BENCH_ALU_ONLY=1: the issue rates of the GEMV's arithmetic alone.
    if std::env::var("Q4WGPU_BENCH_ALU_ONLY").is_ok_and(|v| v != "0") {
        alu_rates(&gpu);
        return;
    }
    if s.attention_only {
        quant_act_table(&gpu, &s);
        attention_decode(&gpu, &s, read_gbs);
        return;
    }
    // Q4WGPU_BENCH_EMULATED=1: the tiled kernels with emulated matrix operations, to check the
    // GEMM table and sweep on adapters without cooperative matrices (the times mean nothing).
    let gemm = if std::env::var("Q4WGPU_BENCH_EMULATED").is_ok_and(|v| v != "0") {
        GemmQ4::new_emulated(&gpu)
    } else {
        GemmQ4::new(&gpu).expect("gemm compiles")
    };
    if s.gemm_only {
        gemm_table(&gpu, &s, &gemm);
        return;
    }
    let gemv = GemvQ4::new(&gpu).expect("gemv compiles");
    println!("## GEMV (M = 1)\n");
    println!(
        "| matrix | K | N | MB | µs | GB/s | of stream read | config |{}",
        if s.naive { " naive GB/s |" } else { "" }
    );
    println!(
        "| --- | --- | --- | --- | --- | --- | --- | --- |{}",
        if s.naive { " --- |" } else { "" }
    );
    let mut sweeps = Vec::new();
    for (i, shape) in s.shapes.iter().enumerate() {
        let copies = rotating_copies(&gpu, &s, shape, (7, 1000), i as u64);
        let x_host: Vec<f32> = random_values(shape.k, 3);
        let x = gpu.storage_from("bench x", &x_host);
        let y = gpu.storage_buffer("bench y", shape.n as u64 * 4);
        let bytes = copies[0].bytes() + shape.k as u64 * 4;
        let cfg = gemv.config_for(shape.n, shape.k);
        let Some(t) = time_gemv(&gpu, &s, &gemv, &copies, &x, &y, None) else {
            continue;
        };
        let gbs = bytes as f64 / t / 1e9;
        let naive = if s.naive {
            format!(" {} |", sig(naive_gemv_gbs(&gpu, &s, &copies[0], &x, &y)))
        } else {
            String::new()
        };
        println!(
            "| {} | {} | {} | {:.1} | {} | {} | {:.2} | wg {} rows {} |{naive}",
            shape.name,
            shape.k,
            shape.n,
            bytes as f64 / 1e6,
            sig(t * 1e6),
            sig(gbs),
            gbs / read_gbs,
            cfg.wg,
            cfg.rows
        );
        if s.sweep {
            for wg in [32, 64, 96, 128, 256] {
                for rows in [4, 6, 8, 10] {
                    let cfg = GemvConfig {
                        wg,
                        rows,
                        subgroups: gpu.caps.subgroups,
                        unroll: 1,
                    };
                    if let Some(t) = time_gemv(&gpu, &s, &gemv, &copies, &x, &y, Some(cfg)) {
                        sweeps.push((shape.name, cfg, bytes as f64 / t / 1e9));
                    }
                }
            }
        }
    }
    if s.sweep {
        println!("\n### GEMV workgroup shapes (GB/s)\n\n| matrix | wg | rows | GB/s |\n| --- | --- | --- | --- |");
        for (name, cfg, gbs) in &sweeps {
            println!("| {name} | {} | {} | {} |", cfg.wg, cfg.rows, sig(*gbs));
        }
    }

    gemv_int8(&gpu, &s, read_gbs);
    barrier_cost(&gpu, &s);
    gemm_table(&gpu, &s, &gemm);
    attention_decode(&gpu, &s, read_gbs);
}

/// Multiprocessors of the GPU the split-K sweep is sized for (the H200's 132).
const SMS: usize = 132;

/// The GEMM kernels a table row compares on this adapter for `m` tokens: the default first,
/// then the other tiles, then (with `sweep`) every option of the larger tiles, then the first
/// kernels. Split-K only where 128 x 128 tiles number at most two per multiprocessor.
fn gemm_variants(gemm: &GemmQ4, m: usize, n: usize, k: usize, s: &Settings) -> Vec<GemmVariant> {
    let sweep = s.gemm_sweep;
    let mut v = vec![gemm.variant_for(m, n, k)];
    if s.gemm_ablate && gemm.has_hardware_coop() {
        for (prefetch, packed) in [(true, false), (false, false), (true, true)] {
            for ablate in [
                0,
                ABLATE_LOADS,
                ABLATE_STORES,
                ABLATE_MMA,
                ABLATE_LOADS | ABLATE_STORES,
            ] {
                v.push(GemmVariant::CoopTile {
                    tm: 4,
                    tn: 4,
                    prefetch,
                    opts: TileOpts {
                        ablate,
                        packed,
                        ..TileOpts::default()
                    },
                });
            }
        }
    }
    if gemm.has_coop() {
        for (tm, tn) in [(4, 4), (2, 4), (4, 2), (2, 2), (1, 4), (1, 2)] {
            for prefetch in [true, false] {
                v.push(GemmVariant::coop_tile(tm, tn, prefetch));
            }
        }
        // The packed loader (16-byte moves, packed f16 dequantization) on the tiles the default
        // picks, plain, with double buffers and with K steps of 64.
        for (tm, tn) in [(4, 4), (2, 4), (4, 2), (2, 2), (1, 4)] {
            for (double_buffer, bk64, prefetch) in [
                (false, false, true),
                (true, false, true),
                (false, true, true),
                (false, false, false),
            ] {
                v.push(GemmVariant::CoopTile {
                    tm,
                    tn,
                    prefetch,
                    opts: TileOpts {
                        packed: true,
                        double_buffer,
                        bk64,
                        ..TileOpts::default()
                    },
                });
            }
        }
        let few_tiles = m.div_ceil(128) * n.div_ceil(128) <= 2 * SMS;
        let splits: &[u32] = if few_tiles { &[1, 2, 4, 8] } else { &[1] };
        for &split_k in splits.iter().filter(|_| sweep) {
            for (tm, tn) in [(4, 4), (2, 4), (4, 2), (2, 2)] {
                for prefetch in [true, false] {
                    // Double buffers with K steps of 64 need 72 KiB on 128-wide tiles: not swept.
                    for (x_f16, bk64, double_buffer) in [
                        (false, false, false),
                        (true, false, false),
                        (false, true, false),
                        (true, true, false),
                        (false, false, true),
                        (true, false, true),
                    ] {
                        let opts = TileOpts {
                            split_k,
                            x_f16,
                            bk64,
                            double_buffer,
                            ..TileOpts::default()
                        };
                        v.push(GemmVariant::CoopTile {
                            tm,
                            tn,
                            prefetch,
                            opts,
                        });
                    }
                }
            }
        }
    }
    if gemm.has_hardware_coop() {
        v.push(GemmVariant::Coop);
    }
    v.push(GemmVariant::Reg {
        rm: if m > 32 { 8 } else { 2 },
    });
    v.push(GemmVariant::Tiled);
    let mut seen = Vec::new();
    v.retain(|x| {
        let new = !seen.contains(x);
        seen.push(*x);
        new
    });
    v
}

/// INT4 GEMM (prompt processing) on each shape at each token count, every kernel variant:
/// TFLOP/s = 2 M N K / median time.
fn gemm_table(gpu: &Gpu, s: &Settings, gemm: &GemmQ4) {
    for &m in &s.gemm_ms {
        println!("\n## GEMM (M = {m})\n");
        println!(
            "| matrix | K | N | variant | tile | ms | TFLOP/s | X to f16 ms | TFLOP/s without it |\n\
             | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        // Per matrix: the default's TFLOP/s, and the best variant and its TFLOP/s.
        let mut best: Vec<(&str, f64, String, f64)> = Vec::new();
        let step = gpu.uniform(
            "bench step",
            &StepParams {
                pos: 0,
                n_tokens: m as u32,
                kv_len: m as u32,
                _pad: 0,
            },
        );
        for (i, shape) in s.shapes.iter().enumerate() {
            let y_bytes = (m * shape.n * 4) as u64;
            if y_bytes > gpu.limits.max_storage_buffer_binding_size {
                println!(
                    "| {} | {} | {} | all | — | — | Y ({y_bytes} bytes) exceeds one binding |",
                    shape.name, shape.k, shape.n
                );
                continue;
            }
            let w = Matrix::random(gpu, shape.n, shape.k, 99 + i as u64);
            let x_host: Vec<f32> = random_values(m * shape.k, 5);
            let x = gpu.storage_from("bench X", &x_host);
            let y = gpu.storage_buffer("bench Y", y_bytes);
            let default = gemm.variant_for(m, shape.n, shape.k);
            best.push((shape.name, 0.0, String::new(), 0.0));
            let filter = std::env::var("Q4WGPU_BENCH_GEMM_FILTER").unwrap_or_default();
            for variant in gemm_variants(gemm, m, shape.n, shape.k, s)
                .into_iter()
                .filter(|v| *v == default || v.short_name().contains(&filter))
            {
                let opts = GemmOptions {
                    variant: Some(variant),
                    ..Default::default()
                };
                let (tm, tn) = variant.tile();
                let bound = match gemm.bind_with(
                    gpu,
                    w.q4ref(),
                    BufRange::whole(&x),
                    BufRange::whole(&y),
                    None,
                    Epilogue::Store,
                    m,
                    &step,
                    &opts,
                ) {
                    Ok(d) => d,
                    Err(e) => {
                        println!(
                            "| {} | {} | {} | {} | {tm}x{tn} | — | {e} | | |",
                            shape.name,
                            shape.k,
                            shape.n,
                            variant.short_name()
                        );
                        continue;
                    }
                };
                let t = time_per_call(gpu, 1, &|pass, _| encode_all(pass, &bound));
                let flops = 2.0 * m as f64 * shape.n as f64 * shape.k as f64;
                let tflops = flops / t / 1e12;
                // The conversion of X to f16 (the first dispatch of an x16 binding), timed alone:
                // a producer could write f16 X in its epilogue instead.
                let (conv, without) = match bound.first() {
                    Some(d) if d.label.starts_with("gemm_q4/x16") => {
                        let c = time_per_call(gpu, 1, &|pass, _| d.encode(pass));
                        (sig(c * 1e3), sig(flops / (t - c).max(1e-9) / 1e12))
                    }
                    _ => (String::new(), String::new()),
                };
                println!(
                    "| {} | {} | {} | {} | {tm}x{tn} | {} | {} | {conv} | {without} |",
                    shape.name,
                    shape.k,
                    shape.n,
                    variant.short_name(),
                    sig(t * 1e3),
                    sig(tflops)
                );
                let b = best.last_mut().expect("pushed above");
                if variant == default {
                    b.1 = tflops;
                }
                if tflops > b.3 {
                    (b.2, b.3) = (variant.short_name(), tflops);
                }
            }
        }
        println!("\n### GEMM best per matrix (M = {m})\n");
        println!("| matrix | default TFLOP/s | best variant | best TFLOP/s | gain |\n| --- | --- | --- | --- | --- |");
        for (name, default, variant, tflops) in &best {
            println!(
                "| {name} | {} | {variant} | {} | {:.2}x |",
                sig(*default),
                sig(*tflops),
                tflops / default.max(1e-9)
            );
        }
    }
}

/// Decode attention (split over the sequence, then combined) of one token over a full KV cache
/// of each context length: µs per layer and GB/s of KV cache read (f16 K and V), for the previous
/// kernel ("legacy") and the grouped one; with `--sweep`, also the grouped kernel's split settings.
/// Caches rotate over copies totalling `rotate_bytes` (as the layers of a model do), so a short
/// context is not served from L2.
fn attention_decode(gpu: &Gpu, s: &Settings, read_gbs: f64) {
    let (heads, kv_heads, hd) = s.attention;
    println!("\n## Attention, decode ({heads} query heads, {kv_heads} KV heads, head dim {hd})\n");
    println!(
        "| kernel | context | splits | µs | KV GB/s | of stream read |\n| --- | --- | --- | --- | --- | --- |"
    );
    let grouped = DecodeOptions::default();
    let mut variants = vec![
        (
            "legacy".to_string(),
            DecodeOptions {
                kernel: DecodeKernel::Legacy,
                ..grouped
            },
        ),
        ("grouped".to_string(), grouped),
        (
            "grouped, V loads past the end".to_string(),
            DecodeOptions {
                v_tail_guard: false,
                ..grouped
            },
        ),
    ];
    if s.sweep {
        for target in [128, 256, 1024, 2048] {
            for min in [32, 128] {
                let o = DecodeOptions {
                    min_split_positions: min,
                    target_workgroups: target,
                    ..grouped
                };
                variants.push((format!("grouped wg {target} min {min}"), o));
            }
        }
    }
    let kernels: Vec<(String, Attention)> = variants
        .into_iter()
        .map(|(name, o)| {
            (
                name,
                Attention::with_decode(gpu, o).expect("attention compiles"),
            )
        })
        .collect();
    for &ctx in &s.contexts {
        let q_host: Vec<f32> = random_values(heads * hd, 11);
        let q = gpu.storage_from("bench q", &q_host);
        let out = gpu.storage_buffer("bench attention out", (heads * hd * 4) as u64);
        let kv_bytes = (2 * kv_heads * ctx * hd * 2) as u64;
        // f16 values in [-1, 1): an exponent field below 15 keeps every value finite.
        let cache_words: Vec<u32> = random_words(kv_heads * ctx * hd / 2, 13)
            .iter()
            .map(|w| w & 0xBBFF_BBFF)
            .collect();
        let copies = s.rotate_bytes.div_ceil(kv_bytes).clamp(1, 128) as usize;
        let caches: Vec<(wgpu::Buffer, wgpu::Buffer)> = (0..copies)
            .map(|_| {
                (
                    gpu.storage_from("bench k cache", &cache_words),
                    gpu.storage_from("bench v cache", &cache_words),
                )
            })
            .collect();
        let step = gpu.uniform(
            "bench step",
            &StepParams {
                pos: ctx as u32 - 1,
                n_tokens: 1,
                kv_len: ctx as u32,
                _pad: 0,
            },
        );
        for (name, attention) in &kernels {
            let bound: Result<Vec<_>, _> = caches
                .iter()
                .map(|(k, v)| {
                    attention.bind(gpu, &q, k, v, &out, heads, kv_heads, hd, ctx, 1, &step)
                })
                .collect();
            let bound = match bound {
                Ok(b) => b,
                Err(e) => {
                    println!("| {name} | {ctx} | | — | {e} | |");
                    continue;
                }
            };
            let splits = match name.as_str() {
                "legacy" => bound[0].max_splits,
                _ => attention
                    .decode_layout(heads, kv_heads, hd, ctx)
                    .map_or(0, |l| l.splits),
            };
            let t = time_per_call(gpu, s.reps, &|pass, i| {
                encode_all(pass, &bound[i % bound.len()].decode)
            });
            let gbs = kv_bytes as f64 / t / 1e9;
            println!(
                "| {name} | {ctx} | {splits} | {} | {} | {:.2} |",
                sig(t * 1e6),
                sig(gbs),
                gbs / read_gbs
            );
            if name == "grouped" {
                grouped_parts(gpu, s, attention, &bound, ctx, splits, heads * hd);
            }
        }
    }
}

/// The grouped decode's parts at one context: the split pass alone (what the combine adds is
/// the difference), and the combine that also writes the o projection's int8 input
/// (`DecodeFusion::attention_combine`; against the row above plus the plain quantizer's).
fn grouped_parts(
    gpu: &Gpu,
    s: &Settings,
    attention: &Attention,
    bound: &[AttentionDispatches],
    ctx: usize,
    splits: usize,
    q_dim: usize,
) {
    let t = time_per_call(gpu, s.reps, &|pass, i| {
        bound[i % bound.len()].decode[0].encode(pass)
    });
    println!(
        "| grouped, split pass only | {ctx} | {splits} | {} | | |",
        sig(t * 1e6)
    );
    let xq = ActQ8Buffers::new(gpu, "bench attention int8", q_dim);
    let with_q8: Vec<Vec<Dispatch>> = bound
        .iter()
        .filter_map(|b| attention.decode_q8_output(gpu, b, &xq).ok().flatten())
        .collect();
    if with_q8.len() != bound.len() {
        println!("| grouped, int8 combine | {ctx} | {splits} | — | not available | |");
        return;
    }
    let t = time_per_call(gpu, s.reps, &|pass, i| {
        encode_all(pass, &with_q8[i % with_q8.len()])
    });
    println!(
        "| grouped, int8 combine | {ctx} | {splits} | {} | | |",
        sig(t * 1e6)
    );
}

/// The int8-activation GEMV (gemv_q4_q8) on the same shapes, with its activation quantizer, and
/// (with --sweep) every workgroup shape: GB/s of weights + quantized x.
fn gemv_int8(gpu: &Gpu, s: &Settings, read_gbs: f64) {
    let kernel = GemvQ4Q8::new(gpu).expect("gemv_q4_q8 compiles");
    println!("\n## GEMV, int8 activations (M = 1)\n");
    println!("| matrix | K | N | MB | µs | GB/s | of stream read | config | input quantized in: µs |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut sweeps = Vec::new();
    let mut unroll_rows = Vec::new();
    for (i, shape) in s.shapes.iter().enumerate() {
        let copies = rotating_copies(gpu, s, shape, (77, 2000), i as u64);
        let x_host: Vec<f32> = random_values(shape.k, 3);
        let a = ActQ8::quantize(&x_host);
        let x = ActQ8Buffers::new(gpu, "bench x", shape.k);
        gpu.queue
            .write_buffer(&x.words, 0, bytemuck::cast_slice(&a.packed_words()));
        gpu.queue
            .write_buffer(&x.scales, 0, bytemuck::cast_slice(&a.packed_scales()));
        let y = gpu.storage_buffer("bench y", shape.n as u64 * 4);
        let bytes = copies[0].bytes() + shape.k as u64 + shape.k as u64 / 4;
        let time = |cfg: Option<GemvConfig>| -> Option<f64> {
            let opts = GemvOptions {
                config: cfg,
                ..Default::default()
            };
            let mut bound = Vec::new();
            for m in &copies {
                match kernel.bind(
                    gpu,
                    m.q4ref(),
                    Q8Input::Quantized(&x),
                    BufRange::whole(&y),
                    None,
                    Epilogue::Store,
                    &opts,
                ) {
                    Ok(d) => bound.push(d),
                    Err(e) => {
                        eprintln!("  gemv_q4_q8 {cfg:?}: {e}");
                        return None;
                    }
                }
            }
            Some(time_per_call(gpu, s.reps, &|pass, i| {
                encode_all(pass, &bound[i % bound.len()])
            }))
        };
        let cfg = kernel.config_for(shape.n, shape.k);
        let Some(t) = time(None) else { continue };
        let gbs = bytes as f64 / t / 1e9;
        // The same product with x quantized by the GEMV as it reads it (the decode step's fused
        // inputs: RMSNorm for the projections of the residual stream, SwiGLU for down, f32 for o).
        let xf = gpu.storage_from("bench x f32", &[x_host.clone(), x_host.clone()].concat());
        let norm = gpu.storage_from("bench norm", &vec![1.0f32; shape.k]);
        let fused_input = match shape.name {
            "o" => Q8Input::F32(BufRange::whole(&xf)),
            "down" => Q8Input::SwiGlu(BufRange::whole(&xf)),
            _ => Q8Input::RmsNorm {
                x: BufRange::whole(&xf),
                weight: &norm,
                eps: 1e-5,
            },
        };
        let fused: Vec<Vec<Dispatch>> = copies
            .iter()
            .filter_map(|m| {
                kernel
                    .bind(
                        gpu,
                        m.q4ref(),
                        fused_input,
                        BufRange::whole(&y),
                        None,
                        Epilogue::Store,
                        &GemvOptions::default(),
                    )
                    .ok()
            })
            .collect();
        let t_fused = time_per_call(gpu, s.reps, &|pass, i| {
            encode_all(pass, &fused[i % fused.len()])
        });
        println!(
            "| {} | {} | {} | {:.1} | {} | {} | {:.2} | wg {} rows {} | {} |",
            shape.name,
            shape.k,
            shape.n,
            bytes as f64 / 1e6,
            sig(t * 1e6),
            sig(gbs),
            gbs / read_gbs,
            cfg.wg,
            cfg.rows,
            sig(t_fused * 1e6)
        );
        // Unroll depths at the chosen shape (the quick table), then (with --sweep) every shape.
        let mut unrolls = vec![];
        for unroll in 1..=MAX_UNROLL {
            let t = time(Some(GemvConfig { unroll, ..cfg }));
            unrolls.push(t.map_or("—".to_string(), |t| sig(bytes as f64 / t / 1e9)));
        }
        unroll_rows.push(format!(
            "| {} | wg {} rows {} | {} |",
            shape.name,
            cfg.wg,
            cfg.rows,
            unrolls.join(" | ")
        ));
        if s.sweep {
            for wg in [32, 64, 128, 256] {
                for rows in [1, 2, 4, 8] {
                    for unroll in [1, 2, 4] {
                        let cfg = GemvConfig {
                            wg,
                            rows,
                            subgroups: gpu.caps.subgroups,
                            unroll,
                        };
                        if let Some(t) = time(Some(cfg)) {
                            sweeps.push((shape.name, cfg, bytes as f64 / t / 1e9));
                        }
                    }
                }
            }
        }
    }
    println!("\n### int8 GEMV: K steps loaded ahead (UNROLL), GB/s at the default shape\n");
    println!("| matrix | shape | unroll 1 | 2 | 3 | 4 |\n| --- | --- | --- | --- | --- | --- |");
    for row in &unroll_rows {
        println!("{row}");
    }
    if s.sweep {
        println!("\n### int8 GEMV workgroup shapes (GB/s)\n\n| matrix | wg | rows | unroll | GB/s |\n| --- | --- | --- | --- | --- |");
        for (name, cfg, gbs) in &sweeps {
            println!(
                "| {name} | {} | {} | {} | {} |",
                cfg.wg,
                cfg.rows,
                cfg.unroll,
                sig(*gbs)
            );
        }
    }
    quant_act_table(gpu, s);
}

/// The batched int8 GEMV (`bind_batch`) per matrix at 1, 2, 4 and 8 live columns of an 8-column
/// pipeline (COLS one-column workgroups side by side; column lanes, with the one-column rows per
/// workgroup and with 8) and of a pipeline of that many columns, with the weights rotating over
/// copies larger than L2 ("cold") and one copy ("hot": L2 can hold the smaller matrices). If a
/// step of 8 columns costs about one column's time, the weights are read once; if it grows with
/// the columns, what grows is the question.
fn gemv_batched(gpu: &Gpu, s: &Settings, read_gbs: f64) {
    let kernel = GemvQ4Q8::new(gpu).expect("gemv_q4_q8 compiles");
    println!("\n## Batched int8 GEMV: µs per call (÷ the 1-column pipeline's time)\n");
    println!("| matrix | K | N | weights | pipeline cols | live 1 | 2 | 4 | 8 | 8 live: weight GB/s, of stream read |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (i, shape) in s.shapes.iter().enumerate() {
        let copies = rotating_copies(gpu, s, shape, (91, 3000), i as u64);
        let cols_max = 8;
        let x = ActQ8Buffers::with_rows(gpu, "batch x", shape.k, cols_max);
        // Each column a quantized random vector at its padded offset (the timing does not depend
        // on the values, but the arithmetic is that of real ones).
        let padded = blocks_per_row(shape.k) * q4wgpu::quant::BLOCK;
        for c in 0..cols_max {
            let v: Vec<f32> = random_values(padded, 5 + c as u64);
            let a = ActQ8::quantize(&v);
            let (wo, so) = (
                x.words.size() / cols_max as u64,
                x.scales.size() / cols_max as u64,
            );
            gpu.queue.write_buffer(
                &x.words,
                c as u64 * wo,
                bytemuck::cast_slice(&a.packed_words()),
            );
            gpu.queue.write_buffer(
                &x.scales,
                c as u64 * so,
                bytemuck::cast_slice(&a.packed_scales()),
            );
        }
        let y = gpu.storage_buffer("batch y", (shape.n * cols_max) as u64 * 4);
        // The one-column kernel (the lone sequence's step), as the engine binds it.
        let time_one = |mats: &[Matrix]| -> Option<f64> {
            let bound: Vec<Vec<Dispatch>> = mats
                .iter()
                .map(|m| {
                    let (x, y) = (Q8Input::Quantized(&x), BufRange::whole(&y));
                    let opts = GemvOptions::default();
                    kernel.bind(gpu, m.q4ref(), x, y, None, Epilogue::Store, &opts)
                })
                .collect::<Result<_, _>>()
                .map_err(|e| eprintln!("  gemv_q4_q8: {e}"))
                .ok()?;
            Some(time_per_call(gpu, s.reps, &|pass, i| {
                encode_all(pass, &bound[i % bound.len()])
            }))
        };
        let time = |mats: &[Matrix], cols: usize, live: usize, opts: GemvOptions| -> Option<f64> {
            if cols == 1 {
                return time_one(mats);
            }
            let rows: Vec<(usize, usize)> = (0..live).map(|c| (c, c)).collect();
            let batch = gpu.uniform("batch", &q4wgpu::kernels::BatchStep::new(&rows));
            let io = q4wgpu::kernels::gemv_q4_q8::BatchIo {
                x: &x,
                y: &y,
                y_stride: shape.n,
                cols,
                batch: &batch,
            };
            let mut bound = Vec::new();
            for m in mats {
                match kernel.bind_batch(gpu, m.q4ref(), &io, None, Epilogue::Store, &opts) {
                    Ok(d) => bound.push(d),
                    Err(e) => {
                        eprintln!("  batched gemv {cols} columns: {e}");
                        return None;
                    }
                }
            }
            Some(time_per_call(gpu, s.reps, &|pass, i| {
                encode_all(pass, &bound[i % bound.len()])
            }))
        };
        let weights = copies[0].bytes();
        for (what, mats) in [("cold", &copies[..]), ("hot", &copies[..1])] {
            let Some(one) = time_one(mats) else {
                continue;
            };
            let lanes = |rows: Option<u32>| {
                let mut config = kernel.config_for(shape.n, shape.k);
                config.rows = rows.unwrap_or(config.rows);
                GemvOptions {
                    config: Some(config),
                    column_lanes: true,
                    ..GemvOptions::default()
                }
            };
            let layouts = [
                ("8", 8usize, GemvOptions::default()),
                ("8 lanes", 8, lanes(None)),
                ("8 lanes, 8 rows", 8, lanes(Some(8))),
                ("= live", 0, GemvOptions::default()),
            ];
            for (name, pipeline, opts) in layouts {
                let cells: Vec<String> = [1usize, 2, 4, 8]
                    .iter()
                    .map(|&live| {
                        let cols = if pipeline == 0 { live } else { pipeline };
                        time(mats, cols, live, opts).map_or("—".into(), |t| {
                            format!("{} ({:.2})", sig(t * 1e6), t / one)
                        })
                    })
                    .collect();
                let t8 = time(mats, 8, 8, opts).unwrap_or(f64::NAN);
                println!(
                    "| {} | {} | {} | {what} | {name} | {} | {} |",
                    shape.name,
                    shape.k,
                    shape.n,
                    cells.join(" | "),
                    format!(
                        "{}, {:.2}",
                        sig(weights as f64 / t8 / 1e9),
                        weights as f64 / t8 / 1e9 / read_gbs
                    ),
                );
            }
        }
    }
}

/// The activation quantizer at the decode step's sizes (5120 plain and RMSNorm, 27648 SwiGLU
/// on the 32B shape): the serial kernel it replaced and the four-lanes kernel at several
/// workgroup sizes, in one run.
fn quant_act_table(gpu: &Gpu, s: &Settings) {
    let (h, ffn) = (s.shapes[0].k, s.shapes[3].k);
    let x = gpu.storage_from("bench act", &vec![0.25f32; 2 * ffn.max(h)]);
    let w = gpu.storage_from("bench norm", &vec![1.0f32; h]);
    let out = ActQ8Buffers::new(gpu, "bench act q8", ffn.max(h));
    let kernels = [
        QuantActKernel::Serial,
        QuantActKernel::Lanes { wg: 32 },
        QuantActKernel::Lanes { wg: 64 },
        QuantActKernel::Lanes { wg: 128 },
        QuantActKernel::Lanes { wg: 256 },
    ];
    println!("\n| activation quantizer | K | kernel | µs |\n| --- | --- | --- | --- |");
    for kernel in kernels {
        let quant = QuantAct::with_kernel(gpu, kernel).expect("quant_act compiles");
        let name = match kernel {
            QuantActKernel::Serial => "serial".to_string(),
            QuantActKernel::Lanes { wg } if kernel == QuantActKernel::default() => {
                format!("lanes wg {wg} (default)")
            }
            QuantActKernel::Lanes { wg } => format!("lanes wg {wg}"),
        };
        for (input_name, input, k) in [
            (
                "rmsnorm",
                ActInput::RmsNorm {
                    weight: &w,
                    eps: 1e-5,
                },
                h,
            ),
            ("plain", ActInput::Plain, h),
            ("swiglu", ActInput::SwiGlu, ffn),
        ] {
            let d = quant
                .bind(gpu, input, &x, k, &out)
                .expect("quant_act binds");
            let t = time_per_call(gpu, s.reps, &|pass, _| d.encode(pass));
            println!("| {input_name} | {k} | {name} | {} |", sig(t * 1e6));
        }
    }
}

/// What a barrier costs: tiny dispatches that each write a buffer no other dispatch of the
/// command buffer touches (wgpu records no barrier between them) against the same dispatches all
/// writing one buffer (a barrier before each: read-write to read-write, KERNELS.md §3).
fn barrier_cost(gpu: &Gpu, _s: &Settings) {
    const TINY: &str = "@group(0) @binding(0) var<storage, read_write> v: array<u32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) { v[g.x] = v[g.x] + 1u; }";
    let pipeline = gpu
        .compute_pipeline("bench/tiny", TINY, "main", &[])
        .expect("tiny compiles");
    const N: usize = 64;
    // One pass of N dispatches per call, one call per pass: every dispatch of the command buffer
    // gets its own buffer in the distinct case.
    let calls = SAMPLES + WARMUP;
    let buffers: Vec<wgpu::Buffer> = (0..N * calls)
        .map(|i| gpu.storage_buffer(&format!("tiny {i}"), 4096))
        .collect();
    let groups: Vec<wgpu::BindGroup> = buffers
        .iter()
        .map(|b| gpu.bind_group("tiny", &pipeline, &[b]))
        .collect();
    let time = |distinct: bool| {
        time_per_call(gpu, 1, &|pass, call| {
            pass.set_pipeline(&pipeline);
            for i in 0..N {
                let g = if distinct { call * N + i } else { 0 };
                pass.set_bind_group(0, &groups[g % groups.len()], &[]);
                pass.dispatch_workgroups(16, 1, 1);
            }
        }) / N as f64
    };
    let (distinct, same) = (time(true), time(false));
    println!(
        "\n## Dispatch and barrier cost ({N} tiny dispatches per pass)\n\n| buffers | µs per dispatch |\n| --- | --- |\n| distinct (no barriers) | {} |\n| one read-write buffer (a barrier each) | {} |\n\nbarrier ≈ {} µs",
        sig(distinct * 1e6),
        sig(same * 1e6),
        sig((same - distinct) * 1e6)
    );
}

/// Issue rates of the GEMV's inner-loop operations, each in a loop of 8 independent chains per
/// thread over many threads (no memory traffic): packed int8 dots (`dot4I8Packed`), f32 FMAs and
/// integer and-or, as operations per second per GPU. Tells whether an int8 GEMV serving several
/// columns is bound by its dots (each weight-column costs a quarter of a packed dot).
fn alu_rates(gpu: &Gpu) {
    const ITERS: u32 = 4096;
    let body = |op: &str| {
        format!(
            "@group(0) @binding(0) var<storage, read_write> out: array<u32>;
@compute @workgroup_size(256) fn main(@builtin(global_invocation_id) g: vec3<u32>) {{
    var a = array<u32, 8>(g.x, g.x + 1u, g.x + 2u, g.x + 3u, g.x + 4u, g.x + 5u, g.x + 6u, g.x + 7u);
    var f = array<f32, 8>(f32(g.x), 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0);
    var s = array<i32, 8>(0, 1, 2, 3, 4, 5, 6, 7);
    let k = g.x * 2654435761u;
    for (var i = 0u; i < {ITERS}u; i++) {{
        for (var j = 0u; j < 8u; j++) {{ {op} }}
    }}
    var t = 0u;
    for (var j = 0u; j < 8u; j++) {{ t += a[j] + bitcast<u32>(f[j]) + u32(s[j]); }}
    out[g.x] = t;
}}"
        )
    };
    let ops = [
        ("dot4I8Packed", "s[j] = dot4I8Packed(a[j] ^ k, k) + s[j];"),
        ("f32 fma", "f[j] = fma(f[j], 0.999, 0.5);"),
        (
            "u32 and + shift",
            "a[j] = ((a[j] >> 4u) & 0x0F0F0F0Fu) ^ k;",
        ),
    ];
    let threads: u32 = 256 * 132 * 16;
    let out = gpu.storage_buffer("alu out", threads as u64 * 4);
    println!("\n## Issue rates ({threads} threads, 8 chains of {ITERS} operations each)\n\n| operation | G operations/s |\n| --- | ---: |");
    for (name, op) in ops {
        let pipeline = gpu
            .compute_pipeline(&format!("bench/alu {name}"), &body(op), "main", &[])
            .expect("alu kernel compiles");
        let group = gpu.bind_group("alu", &pipeline, &[&out]);
        let seconds = time_per_call(gpu, 1, &|pass, _| {
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &group, &[]);
            pass.dispatch_workgroups(threads / 256, 1, 1);
        });
        let rate = threads as f64 * 8.0 * ITERS as f64 / seconds / 1e9;
        println!("| {name} | {} |", sig(rate));
    }
}
