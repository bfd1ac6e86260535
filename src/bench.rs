//! `q4wgpu bench`: end-to-end speed in the spirit of llama-bench, with the bounds that say how good
//! a number is, measured in the same run.
//!
//! Tests, per VRAM budget (one engine load per budget):
//! - `pp<p>`: one forward pass over `p` random tokens from position 0 (prompt chunks of `chunk`
//!   tokens), ending in the sampled next token; tokens/s = p / wall time.
//! - `tg<n>`: after a short prompt ([`TG_PROMPT`] tokens, not timed), `n` greedy decode steps;
//!   tokens/s = n / wall time.
//!
//! Each test runs once as a shorter warm-up (one prompt chunk, or [`WARMUP_STEPS`] decode steps),
//! then `repetitions` times; rows give the median and the min–max spread. Times are wall clock
//! around submit + wait: every step ends in the read-back of its sampled token, so nothing is left
//! in flight when the clock stops.
//!
//! Bytes per token (what a step must read from GPU memory or copy over PCIe):
//! - tg: every layer's INT4 weights (the packed layers, scales and padding included), lm_head, and
//!   the KV cache read by attention (f16 keys and values up to the step's position, averaged over
//!   the run). Norms, biases and activations are left out (well under 0.1 %).
//! - pp: per prompt chunk, every layer's weights and the KV cache written so far once; lm_head
//!   once; divided by `p`.
//! - streamed: the streamed layers' bytes, copied from host memory once per step (per chunk for pp).
//!
//! Bounds, from bandwidths measured in the same run (`measure_read_bandwidth`,
//! `measure_upload_bandwidth`):
//! - memory limit = 1 / (resident bytes / read bandwidth + streamed bytes / upload bandwidth)
//!   (DESIGN.md §5: copies and kernels serialize on one queue); with nothing streamed, simply
//!   read bandwidth / bytes per token. For pp this is a bandwidth bound only: prompts are usually
//!   limited by arithmetic instead.
//! - PCIe bound (streamed rows) = upload bandwidth / streamed bytes per token.

use crate::config::ModelConfig;
use crate::engine::{
    add_time, BatchEntry, CpuLayers, DecodeFusion, DispatchTime, EngineOptions, GpuModel,
    StreamRead,
};
use crate::error::{Error, Result};
use crate::generate::Decoder;
use crate::gpu::Gpu;
use crate::quant::DecodeActivations;
use crate::sampling::SamplingParams;
use crate::scheduler::ResidencyPlan;
use crate::weights::ModelWeights;
use serde::Serialize;
use std::time::Instant;

/// Prompt tokens before a generation test.
pub const TG_PROMPT: usize = 4;
/// Decode steps of the generation test's warm-up run.
pub const WARMUP_STEPS: usize = 4;

#[derive(Clone, Debug, Serialize)]
pub struct BenchOptions {
    /// `-p`: prompt tokens of the prompt-processing test (0 skips it).
    pub prompt_tokens: usize,
    /// `-n`: decode steps of the generation test (0 skips it).
    pub gen_tokens: usize,
    /// `-r`: timed repetitions of each test.
    pub repetitions: usize,
    /// KV cache positions; `None`: just what the tests need.
    pub ctx_size: Option<usize>,
    /// Most prompt tokens per forward pass (at most the context).
    pub chunk: usize,
    /// One row set per budget; `None` keeps every layer resident.
    pub budgets: Vec<Option<u64>>,
    /// At each budget that streams, one row set per way of reading streamed layers.
    pub stream_reads: Vec<StreamRead>,
    pub prefetch_depth: usize,
    /// Size of the buffers the bandwidth measurements move.
    pub bandwidth_bytes: u64,
    /// Seed of the random prompt tokens.
    pub seed: u64,
    /// Also time every dispatch of a decode step (needs timestamp queries).
    pub profile: bool,
    /// One decode row set (and profile) per fusion and per activation kind, at every budget;
    /// prompt rows for the first of each only (prompts use neither).
    pub decode_fusion: Vec<DecodeFusion>,
    pub decode_activations: Vec<DecodeActivations>,
    /// Positions already in the KV cache before each test (llama-bench's `-d`): one set of rows
    /// per depth.
    pub depths: Vec<usize>,
    /// Sequences decoded together (`serve --parallel`): for each N above 1 a row `tg{n} xN` of
    /// N sequences through the batched step, tokens/s summed over them (the engine keeps the
    /// largest N's KV slots for every row).
    pub parallel: Vec<usize>,
    /// At each budget that streams, one row set per setting of the CPU layers of decode steps.
    pub cpu_layers: Vec<CpuLayers>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        let engine = EngineOptions::default();
        BenchOptions {
            prompt_tokens: 512,
            gen_tokens: 128,
            repetitions: 5,
            ctx_size: None,
            chunk: engine.chunk,
            budgets: vec![None],
            stream_reads: vec![StreamRead::Ring],
            prefetch_depth: engine.prefetch_depth,
            bandwidth_bytes: 256 << 20,
            seed: 0,
            profile: false,
            decode_fusion: vec![DecodeFusion::default()],
            decode_activations: vec![DecodeActivations::default()],
            depths: vec![0],
            parallel: vec![1],
            cpu_layers: vec![engine.cpu_layers],
        }
    }
}

impl BenchOptions {
    /// The KV cache the tests need: the prompt, or the short prompt plus the generated tokens.
    pub fn needed_ctx(&self) -> usize {
        let tg = if self.gen_tokens > 0 {
            TG_PROMPT + self.gen_tokens
        } else {
            0
        };
        self.depths.iter().max().copied().unwrap_or(0) + self.prompt_tokens.max(tg).max(1)
    }
}

/// Bandwidths measured in the run, in bytes per second.
#[derive(Clone, Debug, Serialize)]
pub struct Bandwidths {
    /// A streaming-read kernel over a device buffer.
    pub read: f64,
    /// Copies from a host buffer into a device buffer, [`UPLOAD_COPIES_PER_SUBMIT`] per submit.
    pub upload: f64,
    pub buffer_bytes: u64,
    /// Whether the upload source was host memory (MAP_READ | COPY_SRC, needs
    /// MAPPABLE_PRIMARY_BUFFERS); otherwise a MAP_WRITE buffer, which some drivers place in VRAM.
    pub upload_from_host_memory: bool,
}

/// One line of the results table.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub model: String,
    /// Bytes; `None`: all resident.
    pub budget: Option<u64>,
    /// How streamed layers were read (meaningless when none streams).
    pub stream_read: StreamRead,
    /// Activations of decode steps (tg rows; prompts use f32/f16 whatever this says).
    pub decode_activations: DecodeActivations,
    pub decode_fusion: DecodeFusion,
    pub layers: usize,
    pub resident_layers: usize,
    pub streamed_layers: usize,
    /// Of the streamed layers, those that decode steps run on the CPU (prompts stream them).
    pub cpu_layers: usize,
    /// The hybrid plan with the costs measured at load, if the engine planned one.
    pub decode_plan: Option<String>,
    pub layer_bytes: u64,
    pub fixed_bytes: u64,
    /// What the engine holds on the GPU.
    pub device_bytes: u64,
    /// "pp512", "tg128".
    pub test: String,
    /// Tokens per repetition.
    pub tokens: usize,
    pub tokens_per_second: f64,
    pub tokens_per_second_min: f64,
    pub tokens_per_second_max: f64,
    /// Tokens/s of each timed repetition, in run order.
    pub samples: Vec<f64>,
    pub bytes_per_token: f64,
    pub streamed_bytes_per_token: f64,
    /// bytes_per_token × tokens_per_second.
    pub achieved_bytes_per_second: f64,
    pub memory_limit_tokens_per_second: f64,
    pub fraction_of_memory_limit: f64,
    pub pcie_bound_tokens_per_second: Option<f64>,
    pub fraction_of_pcie_bound: Option<f64>,
    /// tg: the greedy tokens of the last repetition (identical at any budget if streaming is exact).
    pub generated: Vec<u32>,
}

/// A budget the engine refused (too small for the model), with its reason.
#[derive(Clone, Debug, Serialize)]
pub struct SkippedBudget {
    pub budget: Option<u64>,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// The command line, for the record (set by the caller).
    pub command: String,
    pub unix_time: u64,
    pub adapter: String,
    pub backend: String,
    pub driver: String,
    /// Whether the prompt GEMMs ran on cooperative matrices (false on adapters without them
    /// and with `--no-coop`).
    pub cooperative_matrices: bool,
    pub model: String,
    pub config: ModelConfig,
    pub weight_bytes: u64,
    pub options: BenchOptions,
    pub bandwidth: Bandwidths,
    pub rows: Vec<BenchRow>,
    pub skipped: Vec<SkippedBudget>,
    pub profiles: Vec<DecodeProfile>,
}

/// GPU time per dispatch role in a decode step, averaged over [`PROFILE_STEPS`] steps.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeProfile {
    pub budget: Option<u64>,
    /// How streamed layers were read (meaningless when none streams).
    pub stream_read: StreamRead,
    pub decode_activations: DecodeActivations,
    pub decode_fusion: DecodeFusion,
    /// Sequences in the step (above 1: the batched step, without fusions).
    pub sequences: usize,
    /// Seconds per step, by role, in the order the step runs them.
    pub dispatches: Vec<DispatchTime>,
}

/// Decode steps averaged in a profile.
pub const PROFILE_STEPS: usize = 3;

/// Copies per submit in the upload measurement (DESIGN.md §2: fewer per submit leave PCIe idle).
pub const UPLOAD_COPIES_PER_SUBMIT: usize = 8;
/// Timed samples per bandwidth measurement; the median counts.
const BANDWIDTH_SAMPLES: usize = 5;
/// A bandwidth sample lasts at least this long, so submit latency does not count.
const MIN_SAMPLE_SECONDS: f64 = 0.05;

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// Seconds of one submission of `encode`'s commands, wall clock around submit + wait.
fn time_submit(gpu: &Gpu, encode: &dyn Fn(&mut wgpu::CommandEncoder)) -> Result<f64> {
    let mut enc = gpu
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("bandwidth"),
        });
    encode(&mut enc);
    let cmd = enc.finish();
    let start = Instant::now();
    gpu.queue.submit([cmd]);
    gpu.wait()?;
    Ok(start.elapsed().as_secs_f64())
}

/// Bytes per second of `encode(enc, reps)` moving `bytes_per_rep` per repetition: one warm-up
/// submission, `reps` chosen so a sample lasts [`MIN_SAMPLE_SECONDS`], the median of the samples.
fn bandwidth_of(
    gpu: &Gpu,
    bytes_per_rep: u64,
    max_reps: usize,
    encode: &dyn Fn(&mut wgpu::CommandEncoder, usize),
) -> Result<f64> {
    let first = time_submit(gpu, &|enc| encode(enc, 1))?;
    let reps = ((MIN_SAMPLE_SECONDS / first.max(1e-6)).ceil() as usize).clamp(1, max_reps);
    let mut rates = Vec::with_capacity(BANDWIDTH_SAMPLES);
    for _ in 0..BANDWIDTH_SAMPLES {
        let t = time_submit(gpu, &|enc| encode(enc, reps))?;
        rates.push((bytes_per_rep * reps as u64) as f64 / t);
    }
    Ok(median(&rates))
}

/// The buffer size a measurement can use: `bytes` within the adapter's largest buffer, a multiple of 256.
fn usable_size(gpu: &Gpu, bytes: u64) -> Result<u64> {
    let size = bytes.min(gpu.limits.max_buffer_size) & !255;
    if size == 0 {
        return Err(Error::Invalid(format!(
            "a bandwidth buffer of {bytes} bytes is too small; use at least 256"
        )));
    }
    Ok(size)
}

/// Device-memory read bandwidth (bytes/s) of a streaming-read kernel over a 256 MiB buffer.
pub fn measure_read_bandwidth(gpu: &Gpu) -> Result<f64> {
    measure_read_bandwidth_with(gpu, 256 << 20)
}

/// Like [`measure_read_bandwidth`] over `bytes` (bound in ranges within the binding limit).
/// The buffer holds random words, so no driver can shortcut zero pages.
pub fn measure_read_bandwidth_with(gpu: &Gpu, bytes: u64) -> Result<f64> {
    let size = usable_size(gpu, bytes)?;
    let buffer = gpu.storage_buffer("bandwidth source", size);
    let piece = (16u64 << 20).min(size);
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut words = vec![0u32; (piece / 4) as usize];
    let mut at = 0;
    while at < size {
        let n = piece.min(size - at);
        for w in words.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *w = state as u32;
        }
        gpu.queue.write_buffer(
            &buffer,
            at,
            bytemuck::cast_slice(&words[..(n / 4) as usize]),
        );
        at += n;
        // Bound the staging memory wgpu holds for queued writes.
        if at % (256 << 20) == 0 {
            gpu.queue.submit([]);
            gpu.wait()?;
        }
    }
    let sink = gpu.storage_buffer("bandwidth sink", 4096);
    let pipeline = gpu.compute_pipeline(
        "bench/stream_read",
        include_str!("../shaders/stream_read.wgsl"),
        "main",
        &[],
    )?;
    let align = u64::from(gpu.limits.min_storage_buffer_offset_alignment).max(256);
    let max_binding = (gpu.limits.max_storage_buffer_binding_size / align * align).max(align);
    let mut groups = Vec::new();
    let mut offset = 0;
    while offset < size {
        let len = max_binding.min(size - offset);
        let bind = gpu.bind_group_ranges(
            "bench/stream_read",
            &pipeline,
            &[(&buffer, offset, Some(len)), (&sink, 0, None)],
        );
        let workgroups = (len / 16).div_ceil(256).clamp(1, 4096) as u32;
        groups.push((bind, workgroups));
        offset += len;
    }
    let rate = bandwidth_of(gpu, size, 256, &|enc, reps| {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("stream read"),
            timestamp_writes: None,
        });
        pass.set_pipeline(&pipeline);
        for _ in 0..reps {
            for (bind, workgroups) in &groups {
                pass.set_bind_group(0, bind, &[]);
                pass.dispatch_workgroups(*workgroups, 1, 1);
            }
        }
    })?;
    Ok(rate)
}

/// Host → device copy bandwidth (bytes/s) from a 256 MiB host buffer, the way streamed layers
/// travel (see `engine::host_staging`).
pub fn measure_upload_bandwidth(gpu: &Gpu) -> Result<f64> {
    measure_upload_bandwidth_with(gpu, 256 << 20)
}

/// Like [`measure_upload_bandwidth`] with `bytes` per copy.
pub fn measure_upload_bandwidth_with(gpu: &Gpu, bytes: u64) -> Result<f64> {
    let size = usable_size(gpu, bytes)?;
    let usage = if gpu.caps.mappable_primary_buffers {
        wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_SRC
    } else {
        wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC
    };
    let host = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("bandwidth host"),
        size,
        usage,
        mapped_at_creation: false,
    });
    let device = gpu.storage_buffer("bandwidth device", size);
    let per_submit = UPLOAD_COPIES_PER_SUBMIT as u64 * size;
    bandwidth_of(gpu, per_submit, 16, &|enc, reps| {
        for _ in 0..reps * UPLOAD_COPIES_PER_SUBMIT {
            enc.copy_buffer_to_buffer(&host, 0, &device, 0, size);
        }
    })
}

/// Measures both bandwidths (read, then upload), freeing their buffers before returning.
pub fn measure_bandwidths(gpu: &Gpu, bytes: u64) -> Result<Bandwidths> {
    let read = measure_read_bandwidth_with(gpu, bytes)?;
    let upload = measure_upload_bandwidth_with(gpu, bytes)?;
    gpu.queue.submit([]);
    gpu.wait()?;
    Ok(Bandwidths {
        read,
        upload,
        buffer_bytes: usable_size(gpu, bytes)?,
        upload_from_host_memory: gpu.caps.mappable_primary_buffers,
    })
}

/// Random token ids below `vocab` (xorshift, seeded).
pub(crate) fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

/// Byte counts that do not depend on the run: per layer, lm_head, KV cache per position.
struct ByteModel {
    layers: usize,
    layer_bytes: u64,
    streamed_layers: usize,
    /// Of those, the layers decode steps run on the CPU (not copied over PCIe).
    cpu_layers: usize,
    lm_head_bytes: u64,
    /// f16 keys and values of one position in every layer.
    kv_bytes_per_position: u64,
}

impl ByteModel {
    fn new(
        config: &ModelConfig,
        plan: &ResidencyPlan,
        cpu_layers: usize,
        lm_head_bytes: u64,
    ) -> ByteModel {
        ByteModel {
            layers: plan.layers,
            layer_bytes: plan.layer_bytes,
            streamed_layers: plan.streamed_layers(),
            cpu_layers,
            lm_head_bytes,
            kv_bytes_per_position: (config.num_hidden_layers * 2 * config.kv_dim() * 2) as u64,
        }
    }

    fn weights_pass(&self) -> u64 {
        self.layers as u64 * self.layer_bytes
    }

    /// (bytes, bytes copied over PCIe) per token of `n` decode steps after `prompt` tokens.
    fn decode(&self, prompt: usize, n: usize) -> (f64, f64) {
        // Step i attends over prompt + i + 1 positions.
        let mean_kv = prompt as f64 + (n as f64 + 1.0) / 2.0;
        let bytes = (self.weights_pass() + self.lm_head_bytes) as f64
            + mean_kv * self.kv_bytes_per_position as f64;
        (
            bytes,
            ((self.streamed_layers - self.cpu_layers) as u64 * self.layer_bytes) as f64,
        )
    }

    /// The same per token when `seqs` sequences share each step's pass over the weights (each
    /// still reads its own KV cache).
    fn decode_shared(&self, prompt: usize, n: usize, seqs: usize) -> (f64, f64) {
        let (bytes, streamed) = self.decode(prompt, n);
        let pass = (self.weights_pass() + self.lm_head_bytes) as f64;
        let share = (seqs as f64 - 1.0) / seqs as f64;
        (bytes - pass * share, streamed / seqs as f64)
    }

    /// (bytes, streamed bytes) per token of a `p`-token prompt in chunks of `chunk`.
    fn prompt(&self, p: usize, chunk: usize) -> (f64, f64) {
        let chunks = p.div_ceil(chunk);
        let kv: u64 = (1..=chunks)
            .map(|c| (c * chunk).min(p) as u64 * self.kv_bytes_per_position)
            .sum();
        let bytes = chunks as u64 * self.weights_pass() + self.lm_head_bytes + kv;
        let streamed = chunks as u64 * self.streamed_layers as u64 * self.layer_bytes;
        (bytes as f64 / p as f64, streamed as f64 / p as f64)
    }
}

/// Timed repetitions of one test: tokens/s per run and the tokens the last run generated.
struct Timed {
    rates: Vec<f64>,
    generated: Vec<u32>,
}

fn time_prompt(
    engine: &mut GpuModel<'_>,
    tokens: &[u32],
    chunk: usize,
    reps: usize,
    depth: usize,
) -> Result<Timed> {
    let params = SamplingParams::greedy();
    let mut rates = Vec::with_capacity(reps);
    for rep in 0..=reps {
        // The warm-up run is one chunk: first-use costs, not a full measurement.
        let run = if rep == 0 {
            &tokens[..tokens.len().min(chunk)]
        } else {
            tokens
        };
        engine.reset();
        engine.skip_to(depth)?;
        let start = Instant::now();
        engine.step(run, &params, &[], 0, None)?;
        let seconds = start.elapsed().as_secs_f64();
        if rep > 0 {
            rates.push(run.len() as f64 / seconds);
        }
    }
    Ok(Timed {
        rates,
        generated: Vec::new(),
    })
}

fn time_decode(
    engine: &mut GpuModel<'_>,
    prompt: &[u32],
    n: usize,
    reps: usize,
    depth: usize,
) -> Result<Timed> {
    let params = SamplingParams::greedy();
    let mut rates = Vec::with_capacity(reps);
    let mut generated = Vec::new();
    for rep in 0..=reps {
        let steps = if rep == 0 { n.min(WARMUP_STEPS) } else { n };
        engine.reset();
        engine.skip_to(depth)?;
        let mut history = prompt.to_vec();
        let mut token = engine.step(prompt, &params, &history, 0, None)?.token;
        generated.clear();
        let start = Instant::now();
        for i in 0..steps {
            history.push(token);
            generated.push(token);
            token = engine
                .step(&[token], &params, &history, i as u32 + 1, None)?
                .token;
        }
        let seconds = start.elapsed().as_secs_f64();
        if rep > 0 {
            rates.push(steps as f64 / seconds);
        }
    }
    Ok(Timed { rates, generated })
}

/// `n` batched steps of `seqs` sequences, each after the same short prompt in its own slot;
/// tokens/s summed over the sequences.
fn time_batched_decode(
    engine: &mut GpuModel<'_>,
    prompt: &[u32],
    n: usize,
    (reps, depth): (usize, usize),
    seqs: usize,
) -> Result<Timed> {
    let params = SamplingParams::greedy();
    let mut rates = Vec::with_capacity(reps);
    let mut generated = Vec::new();
    for rep in 0..=reps {
        let steps = if rep == 0 { n.min(WARMUP_STEPS) } else { n };
        let mut next = prime_slots(engine, prompt, seqs, depth)?;
        let mut histories = vec![prompt.to_vec(); seqs];
        generated.clear();
        let start = Instant::now();
        for i in 0..steps {
            for (h, &t) in histories.iter_mut().zip(&next) {
                h.push(t);
            }
            generated.push(next[0]);
            let entries: Vec<BatchEntry> = (0..seqs)
                .map(|slot| BatchEntry {
                    slot,
                    token: next[slot],
                    params: &params,
                    history: &histories[slot],
                    step: i as u32 + 1,
                    top_logprobs: None,
                })
                .collect();
            let outs = engine.step_batch(&entries)?;
            next = outs.into_iter().map(|o| o.token).collect();
        }
        let seconds = start.elapsed().as_secs_f64();
        if rep > 0 {
            rates.push((steps * seqs) as f64 / seconds);
        }
    }
    Ok(Timed { rates, generated })
}

/// One engine configuration of the run, with its place in each list of options.
#[derive(Clone, Copy)]
struct RunSetting {
    budget: Option<u64>,
    stream_read: StreamRead,
    cpu_layers: CpuLayers,
    decode_fusion: DecodeFusion,
    decode_activations: DecodeActivations,
    read_index: usize,
    cpu_index: usize,
    act_index: usize,
}

impl RunSetting {
    fn first_of_budget(&self) -> bool {
        self.read_index == 0 && self.cpu_index == 0 && self.act_index == 0
    }
}

/// Every combination of the options, budget by budget.
fn run_settings(opts: &BenchOptions) -> Vec<RunSetting> {
    let decode: Vec<(DecodeFusion, DecodeActivations)> = opts
        .decode_fusion
        .iter()
        .flat_map(|&f| opts.decode_activations.iter().map(move |&a| (f, a)))
        .collect();
    let mut out = Vec::new();
    for &budget in &opts.budgets {
        for (read_index, &stream_read) in opts.stream_reads.iter().enumerate() {
            for (cpu_index, &cpu_layers) in opts.cpu_layers.iter().enumerate() {
                for (act_index, &(decode_fusion, decode_activations)) in decode.iter().enumerate() {
                    out.push(RunSetting {
                        budget,
                        stream_read,
                        cpu_layers,
                        decode_fusion,
                        decode_activations,
                        read_index,
                        cpu_index,
                        act_index,
                    });
                }
            }
        }
    }
    out
}

/// Runs every test at every budget. `on_row` sees each row as soon as it is measured.
pub fn run_bench(
    gpu: &Gpu,
    weights: &ModelWeights,
    model: &str,
    opts: &BenchOptions,
    on_row: &mut dyn FnMut(&BenchRow),
) -> Result<BenchReport> {
    if opts.decode_activations.is_empty() || opts.decode_fusion.is_empty() {
        return Err(Error::Invalid(
            "no decode activations or fusion given".into(),
        ));
    }
    if opts.stream_reads.is_empty() || opts.cpu_layers.is_empty() {
        return Err(Error::Invalid(
            "no way of reading streamed layers or of CPU layers given".into(),
        ));
    }
    if opts.repetitions == 0 || opts.chunk == 0 {
        return Err(Error::Invalid("-r and --chunk must be positive".into()));
    }
    if opts.prompt_tokens == 0 && opts.gen_tokens == 0 {
        return Err(Error::Invalid(
            "nothing to measure: -p and -n are both 0".into(),
        ));
    }
    let config = &weights.config;
    let ctx = opts.ctx_size.unwrap_or_else(|| opts.needed_ctx());
    if ctx < opts.needed_ctx() {
        return Err(Error::Invalid(format!(
            "--ctx-size {ctx} is too small for the tests: they need {} positions",
            opts.needed_ctx()
        )));
    }
    // A prompt chunk never holds more tokens than the context (the engine refuses that).
    let chunk = opts.chunk.min(ctx);
    let used = BenchOptions {
        ctx_size: Some(ctx),
        chunk,
        ..opts.clone()
    };
    let opts = &used;
    let bandwidth = measure_bandwidths(gpu, opts.bandwidth_bytes)?;
    let lm_head = weights.q4("lm_head.weight")?;
    let lm_head_bytes = (lm_head.qweight.len() * 4 + lm_head.scales.len() * 2) as u64;
    let prompt = random_tokens(opts.prompt_tokens, config.vocab_size, opts.seed);
    let tg_prompt = random_tokens(TG_PROMPT, config.vocab_size, opts.seed ^ 0x7E57);

    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    let mut profiles = Vec::new();
    for run in run_settings(opts) {
        let RunSetting {
            budget,
            stream_read,
            cpu_layers,
            decode_fusion,
            decode_activations,
            ..
        } = run;
        let engine_opts = EngineOptions {
            ctx_size: ctx,
            chunk: opts.chunk,
            vram_budget: budget,
            prefetch_depth: opts.prefetch_depth,
            max_top_logprobs: 0,
            decode_fusion,
            decode_reads: stream_read,
            prompt_reads: stream_read,
            decode_activations,
            kv_slots: opts.parallel.iter().copied().max().unwrap_or(1).max(1),
            cpu_layers,
        };
        let mut engine = match GpuModel::new(gpu, weights, engine_opts) {
            Ok(e) => e,
            // A budget too small for the model is a result to report, not a failure of the run.
            Err(e) if budget.is_some() => {
                if run.first_of_budget() {
                    skipped.push(SkippedBudget {
                        budget,
                        reason: e.to_string(),
                    });
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        let plan = engine.plan().clone();
        if (run.read_index > 0 || run.cpu_index > 0) && plan.streamed_layers() == 0 {
            continue; // nothing streams: how streamed layers are read or run changes nothing
        }
        if let Some(note) = engine.hybrid_note() {
            eprintln!("{note}");
        }
        let bytes = ByteModel::new(config, &plan, engine.cpu_layers(), lm_head_bytes);
        let mut tests = Vec::new();
        for &depth in &opts.depths {
            // llama-bench's names: "pp512", "tg128 @ d4096".
            let at = if depth > 0 {
                format!(" @ d{depth}")
            } else {
                String::new()
            };
            // Prompts stream every non-resident layer whatever the decode plan.
            if opts.prompt_tokens > 0 && run.act_index == 0 && run.cpu_index == 0 {
                let chunk = engine.chunk();
                let timed = time_prompt(&mut engine, &prompt, chunk, opts.repetitions, depth)?;
                tests.push((
                    format!("pp{}{at}", opts.prompt_tokens),
                    opts.prompt_tokens,
                    timed,
                    bytes.prompt(opts.prompt_tokens, chunk),
                ));
            }
            if opts.gen_tokens > 0 {
                let timed = time_decode(
                    &mut engine,
                    &tg_prompt,
                    opts.gen_tokens,
                    opts.repetitions,
                    depth,
                )?;
                tests.push((
                    format!("tg{}{at}", opts.gen_tokens),
                    opts.gen_tokens,
                    timed,
                    bytes.decode(TG_PROMPT + depth, opts.gen_tokens),
                ));
            }
            for &seqs in opts
                .parallel
                .iter()
                .filter(|&&n| n > 1 && opts.gen_tokens > 0)
            {
                if seqs > engine.batch_capacity() {
                    return Err(Error::Invalid(format!(
                        "--parallel {seqs}: this engine batches at most {} sequences",
                        engine.batch_capacity()
                    )));
                }
                let n = opts.gen_tokens;
                let timed = time_batched_decode(
                    &mut engine,
                    &tg_prompt,
                    n,
                    (opts.repetitions, depth),
                    seqs,
                )?;
                tests.push((
                    format!("tg{n} x{seqs}{at}"),
                    n * seqs,
                    timed,
                    bytes.decode_shared(TG_PROMPT + depth, n, seqs),
                ));
            }
        }
        for (test, tokens, timed, (per_token, streamed)) in tests {
            let tps = median(&timed.rates);
            let limit =
                1.0 / ((per_token - streamed) / bandwidth.read + streamed / bandwidth.upload);
            let pcie = (streamed > 0.0).then(|| bandwidth.upload / streamed);
            let row = BenchRow {
                model: model.to_string(),
                budget,
                stream_read,
                decode_activations,
                decode_fusion,
                layers: plan.layers,
                resident_layers: plan.resident_layers,
                streamed_layers: plan.streamed_layers(),
                cpu_layers: engine.cpu_layers(),
                decode_plan: engine.hybrid_note().map(str::to_string),
                layer_bytes: plan.layer_bytes,
                fixed_bytes: plan.fixed_bytes,
                device_bytes: engine.device_bytes(),
                test,
                tokens,
                tokens_per_second: tps,
                tokens_per_second_min: timed.rates.iter().copied().fold(f64::INFINITY, f64::min),
                tokens_per_second_max: timed.rates.iter().copied().fold(0.0, f64::max),
                samples: timed.rates,
                bytes_per_token: per_token,
                streamed_bytes_per_token: streamed,
                achieved_bytes_per_second: per_token * tps,
                memory_limit_tokens_per_second: limit,
                fraction_of_memory_limit: tps / limit,
                pcie_bound_tokens_per_second: pcie,
                fraction_of_pcie_bound: pcie.map(|b| tps / b),
                generated: timed.generated,
            };
            on_row(&row);
            rows.push(row);
        }
        if opts.profile {
            let one = profile_decode(
                &mut engine,
                &tg_prompt,
                budget,
                stream_read,
                (decode_activations, decode_fusion),
            )?;
            let most = opts.parallel.iter().copied().max().unwrap_or(1);
            let batched = match most > 1 {
                true => Some(profile_batched(&mut engine, &tg_prompt, most, one.clone())?),
                false => None,
            };
            profiles.push(one);
            profiles.extend(batched);
        }
        // Free this budget's buffers before the next load (wgpu releases them on the next poll).
        drop(engine);
        gpu.queue.submit([]);
        gpu.wait()?;
    }
    let unix_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(BenchReport {
        command: String::new(),
        unix_time,
        adapter: gpu.info.name.clone(),
        backend: format!("{:?}", gpu.info.backend),
        driver: format!("{} {}", gpu.info.driver, gpu.info.driver_info),
        cooperative_matrices: crate::kernels::gemm_q4::GemmQ4::coop_supported(gpu),
        model: model.to_string(),
        config: config.clone(),
        weight_bytes: weights.byte_len() as u64,
        options: opts.clone(),
        bandwidth,
        rows,
        skipped,
        profiles,
    })
}

/// Times every dispatch of [`PROFILE_STEPS`] decode steps after a short prompt (after a warm-up
/// step) and averages them.
fn profile_decode(
    engine: &mut GpuModel<'_>,
    prompt: &[u32],
    budget: Option<u64>,
    stream_read: StreamRead,
    (decode_activations, decode_fusion): (DecodeActivations, DecodeFusion),
) -> Result<DecodeProfile> {
    engine.reset();
    let params = SamplingParams::greedy();
    let token = engine.step(prompt, &params, prompt, 0, None)?.token;
    let total = averaged_profile(|| engine.profile_decode_step(token))?;
    Ok(DecodeProfile {
        budget,
        stream_read,
        decode_activations,
        decode_fusion,
        sequences: 1,
        dispatches: total,
    })
}

/// A profiled step, run once unmeasured and then [`PROFILE_STEPS`] times, averaged.
fn averaged_profile(
    mut step: impl FnMut() -> Result<Vec<DispatchTime>>,
) -> Result<Vec<DispatchTime>> {
    step()?;
    let mut total = step()?;
    for _ in 1..PROFILE_STEPS {
        for d in step()? {
            // Every step has the same dispatches: counts stay per step.
            add_time(&mut total, &d.label, 0, d.seconds);
        }
    }
    for t in &mut total {
        t.seconds /= PROFILE_STEPS as f64;
    }
    Ok(total)
}

/// Slots `0..seqs` each emptied, given `depth` positions and `prompt`: the greedy token after
/// it in each (the first token each batched step appends).
fn prime_slots(
    engine: &mut GpuModel<'_>,
    prompt: &[u32],
    seqs: usize,
    depth: usize,
) -> Result<Vec<u32>> {
    let params = SamplingParams::greedy();
    (0..seqs)
        .map(|slot| {
            engine.select_kv_slot(slot)?;
            engine.reset();
            engine.skip_to(depth)?;
            Ok(engine.step(prompt, &params, prompt, 0, None)?.token)
        })
        .collect()
}

/// The same for the batched step of `seqs` sequences, each after `prompt` in its own slot.
fn profile_batched(
    engine: &mut GpuModel<'_>,
    prompt: &[u32],
    seqs: usize,
    base: DecodeProfile,
) -> Result<DecodeProfile> {
    let params = SamplingParams::greedy();
    let next = prime_slots(engine, prompt, seqs, 0)?;
    let entries: Vec<BatchEntry> = next
        .iter()
        .enumerate()
        .map(|(slot, &token)| BatchEntry {
            slot,
            token,
            params: &params,
            history: prompt,
            step: 1,
            top_logprobs: None,
        })
        .collect();
    let total = averaged_profile(|| engine.profile_batch_step(&entries))?;
    Ok(DecodeProfile {
        sequences: seqs,
        dispatches: total,
        ..base
    })
}

/// A profile as a markdown table: role, dispatches per step, µs per step, share of the sum.
pub fn profile_markdown(p: &DecodeProfile) -> String {
    let sum: f64 = p.dispatches.iter().map(|d| d.seconds).sum();
    let mut out = format!(
        "decode step profile{}, budget {} (GPU time per dispatch, each timed in its own pass): {:.0} µs in all\n\n| dispatch | count | µs per step | share |\n| --- | ---: | ---: | ---: |\n",
        match p.sequences {
            1 => String::new(),
            n => format!(" ({n} sequences, batched)"),
        },
        match p.budget {
            Some(_) => format!("{}, {}, {} activations, fusion {}", budget_label(p.budget), p.stream_read.name(), p.decode_activations.name(), p.decode_fusion.name()),
            None => format!("{}, {} activations, fusion {}", budget_label(p.budget), p.decode_activations.name(), p.decode_fusion.name()),
        },
        sum * 1e6
    );
    for d in &p.dispatches {
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} % |\n",
            d.label,
            d.count,
            d.seconds * 1e6,
            100.0 * d.seconds / sum.max(f64::MIN_POSITIVE)
        ));
    }
    out
}

/// "all" for no budget, else gigabytes.
pub fn budget_label(budget: Option<u64>) -> String {
    match budget {
        None => "all".into(),
        Some(b) => format!("{:.1} GB", b as f64 / 1e9),
    }
}

/// Parses `--vram-budget` lists: "all,24GB,12GB" ("all" or "none": everything resident).
pub fn parse_budgets(text: &str) -> Result<Vec<Option<u64>>> {
    text.split(',')
        .map(str::trim)
        .map(|t| match t.to_ascii_lowercase().as_str() {
            "all" | "none" => Ok(None),
            _ => crate::scheduler::parse_size(t).map(Some),
        })
        .collect()
}

pub const TABLE_HEADER: &str = "| model | budget | layers res/str (cpu) | test | tok/s | min–max | GB/token | streamed GB/token | GB/s | memory limit tok/s | % of limit | PCIe bound tok/s | % of PCIe bound |\n| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |";

/// `v` with three significant digits (at most six decimals): "16.5", "0.257", "0.00102".
fn sig3(v: f64) -> String {
    let decimals = if v > 0.0 {
        (2.0 - v.log10().floor()).clamp(0.0, 6.0) as usize
    } else {
        0
    };
    format!("{v:.decimals$}")
}

/// One markdown table line.
pub fn table_line(r: &BenchRow) -> String {
    let gb = |b: f64| sig3(b / 1e9);
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("—".to_string(), f);
    format!(
        "| {} | {} | {}/{}{} | {} | {:.2} | {:.2}–{:.2} | {} | {} | {} | {:.2} | {:.0} % | {} | {} |",
        r.model,
        if r.streamed_layers > 0 {
            format!("{}, {}", budget_label(r.budget), r.stream_read.name())
        } else {
            budget_label(r.budget)
        },
        r.resident_layers,
        r.streamed_layers,
        // Decode rows of a hybrid plan: how many of the streamed layers ran on the CPU.
        match (r.cpu_layers, r.test.starts_with("tg")) {
            (0, _) | (_, false) => String::new(),
            (n, true) => format!(" ({n})"),
        },
        if r.test.starts_with("tg") {
            // A batched row ("tg64 x8") runs the batched step, which has no fusions.
            let fusion = match r.test.contains(" x") {
                true => "batched".to_string(),
                false => r.decode_fusion.name(),
            };
            format!("{} ({}; {fusion})", r.test, r.decode_activations.name())
        } else {
            r.test.clone()
        },
        r.tokens_per_second,
        r.tokens_per_second_min,
        r.tokens_per_second_max,
        gb(r.bytes_per_token),
        gb(r.streamed_bytes_per_token),
        gb(r.achieved_bytes_per_second),
        r.memory_limit_tokens_per_second,
        100.0 * r.fraction_of_memory_limit,
        opt(r.pcie_bound_tokens_per_second, &|v| format!("{v:.2}")),
        opt(r.fraction_of_pcie_bound, &|v| format!("{:.0} %", 100.0 * v)),
    )
}

/// The header lines (adapter, measured bandwidths) above the table.
pub fn preamble(adapter: &str, bw: &Bandwidths) -> String {
    format!(
        "adapter: {adapter}\nread bandwidth (streaming kernel, {} MiB): {:.1} GB/s; upload bandwidth ({} copies of {} MiB per submit, from {}): {:.1} GB/s\n",
        bw.buffer_bytes >> 20,
        bw.read / 1e9,
        UPLOAD_COPIES_PER_SUBMIT,
        bw.buffer_bytes >> 20,
        if bw.upload_from_host_memory { "host memory" } else { "a MAP_WRITE buffer" },
        bw.upload / 1e9
    )
}

/// The whole report as markdown: preamble, table, skipped budgets.
pub fn markdown(report: &BenchReport) -> String {
    let mut out = preamble(
        &format!(
            "{} ({}, driver {})",
            report.adapter, report.backend, report.driver
        ),
        &report.bandwidth,
    );
    out.push('\n');
    out.push_str(TABLE_HEADER);
    out.push('\n');
    for r in &report.rows {
        out.push_str(&table_line(r));
        out.push('\n');
    }
    for s in &report.skipped {
        out.push_str(&format!(
            "\nbudget {} skipped: {}\n",
            budget_label(s.budget),
            s.reason
        ));
    }
    for p in &report.profiles {
        out.push('\n');
        out.push_str(&profile_markdown(p));
    }
    out
}
