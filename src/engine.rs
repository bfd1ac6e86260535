//! The GPU forward pass and the per-step encoder. Per layer: norm → qkv → rope/KV write →
//! attention → o (+residual) → norm → gate/up → SwiGLU → down (+residual); then the final norm,
//! lm_head and sampling on the GPU, so one decoded token costs one small read-back.
//!
//! Everything is built once at load: buffers, bind groups and the dispatch lists of the decode
//! step (one token, GEMV) and of a prompt chunk (up to `chunk` tokens, GEMM). A step writes the
//! shared `StepParams`, the embedding rows (looked up on the host: the 16-bit table stays in host
//! memory, a row per token is a few KB), records the dispatches and submits once.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::generate::{Decoder, StepOutput, TokenLogprobs};
use crate::gpu::Gpu;
use crate::kernels::sample::{self, Sample, SampleDispatch, SampleParams};
use crate::kernels::{BufRange, Dispatch, Q4Ref, StepParams};
use crate::quant::{DecodeActivations, QView};
use crate::sampling::SamplingParams;
use crate::scheduler::{self, LayerPack, PackedMatrix, ResidencyPlan};
use crate::weights::ModelWeights;

mod batch;
mod hybrid;
mod kv_slots;
mod step;

use batch::BatchDecode;
pub use batch::BatchEntry;
pub use hybrid::CpuLayers;
pub use kv_slots::KvSlots;
use step::StepKernels;

#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Most tokens the KV cache holds.
    pub ctx_size: usize,
    /// Most prompt tokens processed per forward pass (each weight is read once per chunk). On a
    /// CPU adapter (lavapipe) at most [`CPU_ADAPTER_CHUNK`]: there every workgroup of the
    /// chunk-sized prompt dispatches costs, even those past a short prompt's tokens.
    pub chunk: usize,
    /// VRAM budget in bytes; `None` takes the adapter's device-local memory less a margin.
    pub vram_budget: Option<u64>,
    /// Ring slots for streamed layers.
    pub prefetch_depth: usize,
    /// Most alternatives `--logprobs` may ask for.
    pub max_top_logprobs: usize,
    /// Which elementwise steps of a decode step run inside the projection after them.
    pub decode_fusion: DecodeFusion,
    /// How a decode step reads streamed layers.
    pub decode_reads: StreamRead,
    /// How a prompt chunk reads streamed layers.
    pub prompt_reads: StreamRead,
    /// Activations of a decode step: int8 (integer dot products) or f32 (with `decode_fusion`).
    pub decode_activations: DecodeActivations,
    /// Sequences whose KV caches the engine keeps (`serve --parallel`): above 1, each has a saved
    /// copy of the cache that `select_kv_slot` swaps in (see `kv_slots.rs`).
    pub kv_slots: usize,
    /// How many of the layers that do not fit on the GPU decode on the CPU
    /// (`scheduler::hybrid`); prompt chunks stream them all.
    pub cpu_layers: CpuLayers,
}

/// Elementwise steps of a decode step that the following GEMV can compute on the fly
/// ([`GemvInput`]): fused, a step saves its dispatch, but every workgroup of the GEMV redoes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DecodeFusion {
    /// The attention norm, inside the qkv projection.
    pub input_norm: bool,
    /// The MLP norm, inside the gate|up projection.
    pub post_norm: bool,
    /// SwiGLU, inside the down projection.
    pub swiglu: bool,
    /// With int8 activations: the quantization of the attention output, inside the o projection
    /// (the f32 GEMV reads it as it is).
    pub attention_output: bool,
    /// With int8 activations: the attention combine writes the o projection's int8 input itself
    /// (each head is whole 32-value blocks), so no quantizer runs between them. Takes precedence
    /// over `attention_output`; where the decode attention cannot (head dim not a multiple of
    /// 32), the input is quantized by a dispatch of its own.
    pub attention_combine: bool,
    /// With int8 activations: RoPE and the KV-cache write as the qkv projection's output, in place
    /// of a dispatch of their own.
    pub rope_kv: bool,
}

impl DecodeFusion {
    pub const NONE: DecodeFusion = DecodeFusion {
        input_norm: false,
        post_norm: false,
        swiglu: false,
        attention_output: false,
        attention_combine: false,
        rope_kv: false,
    };

    pub const ALL: DecodeFusion = DecodeFusion {
        input_norm: true,
        post_norm: true,
        swiglu: true,
        attention_output: true,
        attention_combine: true,
        rope_kv: true,
    };

    /// The names [`parse`](Self::parse) takes, comma-separated ("none" if none).
    pub fn name(&self) -> String {
        let names = [
            (self.input_norm, "input-norm"),
            (self.post_norm, "post-norm"),
            (self.swiglu, "swiglu"),
            (self.attention_output, "attention-output"),
            (self.attention_combine, "attention-combine"),
            (self.rope_kv, "rope-kv"),
        ];
        let on: Vec<&str> = names.iter().filter(|(f, _)| *f).map(|(_, n)| *n).collect();
        if on.is_empty() {
            "none".into()
        } else {
            on.join(",")
        }
    }

    /// A comma-separated list of input-norm, post-norm, swiglu, attention-output,
    /// attention-combine and rope-kv, or "none".
    pub fn parse(text: &str) -> Result<DecodeFusion> {
        let mut f = DecodeFusion::NONE;
        for item in text.split(',').map(str::trim) {
            match item {
                "none" => {}
                "input-norm" => f.input_norm = true,
                "post-norm" => f.post_norm = true,
                "swiglu" => f.swiglu = true,
                "attention-output" => f.attention_output = true,
                "attention-combine" => f.attention_combine = true,
                "rope-kv" => f.rope_kv = true,
                _ => {
                    return Err(Error::Invalid(format!(
                        "unknown decode fusion {item:?}: use none, or a list of input-norm, post-norm, swiglu, attention-output, attention-combine and rope-kv"
                    )))
                }
            }
        }
        Ok(f)
    }
}

impl Default for DecodeFusion {
    /// The producers' epilogues, not the GEMVs' inputs: RoPE and the KV write in the qkv GEMV
    /// (rope-kv) and the o input quantized by the attention combine (attention-combine). On the
    /// H200's 32B decode step (benchmarks/runs/2026-11-30-h200-session3-exp) nothing fused ran
    /// 99.4 tok/s, rope-kv 100.8, attention-combine 99.8, both 101.9. Fusing into the inputs
    /// costs more than the dispatch it saves (round2-kernels: none 93.4 tok/s; input norm and
    /// attention output 78.4; also the MLP norm 50.1: each of thousands of workgroups quantizes
    /// all of x again). Both defaults act with int8 activations only; with f32 activations
    /// fusing the input norm into qkv pays a little (68.4 against 66.2): `--decode-fusion
    /// input-norm`.
    fn default() -> Self {
        DecodeFusion {
            rope_kv: true,
            attention_combine: true,
            ..DecodeFusion::NONE
        }
    }
}

/// How kernels read the weights of a streamed layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StreamRead {
    /// Copied into a device ring slot before the layer runs: each weight crosses PCIe once per
    /// pass, however often the kernels read it.
    Ring,
    /// Read by the kernels straight from host memory ("zero-copy"; needs
    /// MAPPABLE_PRIMARY_BUFFERS): no copy, but a weight read twice crosses PCIe twice.
    ZeroCopy,
}

impl StreamRead {
    pub fn parse(text: &str) -> Result<StreamRead> {
        match text {
            "ring" => Ok(StreamRead::Ring),
            "zero-copy" => Ok(StreamRead::ZeroCopy),
            _ => Err(Error::Invalid(format!(
                "unknown way to read streamed layers {text:?}: use ring or zero-copy"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            StreamRead::Ring => "ring",
            StreamRead::ZeroCopy => "zero-copy",
        }
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            ctx_size: 4096,
            chunk: 512,
            vram_budget: None,
            prefetch_depth: 2,
            max_top_logprobs: 20,
            decode_fusion: DecodeFusion::default(),
            decode_reads: StreamRead::Ring,
            prompt_reads: StreamRead::Ring,
            decode_activations: DecodeActivations::default(),
            kv_slots: 1,
            cpu_layers: CpuLayers::Auto,
        }
    }
}

/// Where a layer's packed INT4 matrices live.
enum LayerHome {
    Resident(wgpu::Buffer),
    /// In host memory; copied into ring slot `slot` before the layer runs.
    Streamed {
        staging: wgpu::Buffer,
        slot: usize,
    },
}

/// Small per-layer tensors, always resident.
struct LayerSmall {
    input_norm: wgpu::Buffer,
    post_norm: wgpu::Buffer,
    qkv_bias: Option<wgpu::Buffer>,
    o_bias: Option<wgpu::Buffer>,
}

/// Activations, sized for a prompt chunk ([chunk, dim] rows, f32).
struct Activations {
    x: wgpu::Buffer,
    h: wgpu::Buffer,
    qkv: wgpu::Buffer,
    q: wgpu::Buffer,
    attn: wgpu::Buffer,
    gate_up: wgpu::Buffer,
    act: wgpu::Buffer,
    /// The last token's normalised hidden state, input of lm_head.
    last: wgpu::Buffer,
    logits: wgpu::Buffer,
}

pub struct GpuModel<'w> {
    gpu: &'w Gpu,
    weights: &'w ModelWeights,
    config: ModelConfig,
    opts: EngineOptions,
    plan: ResidencyPlan,
    budget_source: String,
    pack: LayerPack,
    homes: Vec<LayerHome>,
    ring: Vec<wgpu::Buffer>,
    act: Activations,
    step_buf: wgpu::Buffer,
    /// Per layer: the dispatches of one decode step and of one prompt chunk.
    decode_layers: Vec<Vec<Dispatch>>,
    prefill_layers: Vec<Vec<Dispatch>>,
    /// Decode: the final norm and lm_head of row 0.
    decode_head: Vec<Dispatch>,
    /// Prefill: the final norm of every row, then (after the last row is copied to `last`) lm_head.
    prefill_final_norm: Dispatch,
    prefill_head: Vec<Dispatch>,
    sampler: SampleDispatch,
    history: wgpu::Buffer,
    sample_out: wgpu::Buffer,
    readback: wgpu::Buffer,
    position: usize,
    device_bytes: u64,
    /// The next decode step's commands, recorded ahead (see `forward`).
    next_decode: Option<wgpu::CommandBuffer>,
    /// The working K and V caches of each layer, and the saved caches of other sequences.
    kv: Vec<(wgpu::Buffer, wgpu::Buffer)>,
    slots: KvSlots,
    /// The batched decode step of several sequences (with more than one KV slot), or why this
    /// GPU cannot run it.
    batch: Option<BatchDecode>,
    batch_off: Option<String>,
    /// Decode steps with CPU layers, if the plan has any; and the plan in words.
    hybrid: Option<hybrid::Hybrid<'w>>,
    hybrid_note: Option<String>,
    _keep: Vec<wgpu::Buffer>,
}

/// GPU time of every dispatch with one label during a profiled step.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DispatchTime {
    pub label: String,
    pub count: usize,
    pub seconds: f64,
}

/// VRAM a budget keeps for the driver (its per-process context and internal allocations), on top
/// of two layers' load-time upload buffers (wgpu releases one at a poll after its copy, so two
/// can be alive). nvidia-smi on the H200 (benchmarks/runs/2026-11-30-h200-vram): with no allowance
/// peaks were 0.35-1.2 GB above the engine's buffers; with 512 MiB + one layer, 70B at 24 GB
/// peaked at 23.4 GB and 32B at 4 GB at 3.75 GB, but 32B at 12 GB at 12.33 GB: about 1.1 GB
/// beyond the engine's buffers, which this allowance (about 1.3 GB on the 32B shape) covers.
/// Not re-measured at this value.
const DRIVER_ALLOWANCE: u64 = 768 << 20;

/// Adds `count` dispatches taking `seconds` to the entry of `label` (appended if new, so the
/// order stays that of first appearance).
pub fn add_time(times: &mut Vec<DispatchTime>, label: &str, count: usize, seconds: f64) {
    match times.iter_mut().find(|t| t.label == label) {
        Some(t) => {
            t.count += count;
            t.seconds += seconds;
        }
        None => times.push(DispatchTime {
            label: label.to_string(),
            count,
            seconds,
        }),
    }
}

/// Recent tokens the repetition penalty can see.
const MAX_HISTORY: usize = 1024;

fn f32_bytes(n: usize) -> u64 {
    (n * 4) as u64
}

/// Most prompt tokens per chunk on a CPU adapter (see [`EngineOptions::chunk`]).
pub const CPU_ADAPTER_CHUNK: usize = 64;

/// The chunk a model runs with: `opts.chunk`, at most the context (a chunk never holds more
/// tokens than the context) and at most [`CPU_ADAPTER_CHUNK`] on a CPU adapter.
fn effective_chunk(gpu: &Gpu, opts: &EngineOptions) -> usize {
    let chunk = opts.chunk.min(opts.ctx_size);
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        chunk.min(CPU_ADAPTER_CHUNK)
    } else {
        chunk
    }
}

/// The residency plan of a model of shape `c` under `opts` on `gpu`, and where the budget came
/// from: needs only the config, so `info` can plan without loading the weights.
pub fn residency_plan(
    gpu: &Gpu,
    c: &ModelConfig,
    opts: &EngineOptions,
) -> Result<(ResidencyPlan, String)> {
    let (ctx, m) = (opts.ctx_size, effective_chunk(gpu, opts));
    let (h, q_dim, kv_dim, ffn, vocab) = (
        c.hidden_size,
        c.q_dim(),
        c.kv_dim(),
        c.intermediate_size,
        c.vocab_size,
    );
    let qkv_dim = q_dim + 2 * kv_dim;
    let pack = LayerPack::new(c);
    // Fixed bytes: KV cache (f16), activations, lm_head, norms and biases.
    // Each sequence beyond the first (`serve --parallel`) keeps a saved copy of the cache.
    let kv_bytes = (c.num_hidden_layers * 2 * c.num_kv_heads() * ctx * c.head_dim() * 2) as u64
        * (1 + KvSlots::saved_copies(opts.kv_slots) as u64);
    let act_bytes = f32_bytes(m * (2 * h + qkv_dim + 2 * q_dim + 2 * ffn + ffn) + h + vocab)
        + batch::batch_bytes(batch::batch_rows(opts.kv_slots, m), vocab);
    let blocks = h.div_ceil(crate::quant::BLOCK);
    let lm_bytes = (vocab * blocks * (crate::quant::WORDS_PER_BLOCK * 4 + 2)) as u64;
    let small_bytes = f32_bytes(c.num_hidden_layers * (2 * h + qkv_dim + h) + h);
    // Kept free inside the budget: the driver's own memory for the process and the upload
    // buffers layers go through while loading (see DRIVER_ALLOWANCE).
    let allowance = DRIVER_ALLOWANCE + 2 * pack.bytes;
    // The prompt GEMMs' split-K partial sums and f16 X (each shared by every binding;
    // cooperative matrices only).
    let gemm_scratch = if crate::kernels::gemm_q4::GemmQ4::coop_supported(gpu) {
        crate::kernels::gemm_q4::SPLIT_K_SCRATCH_BYTES
            + crate::kernels::gemm_q4::packed_x_bytes(m, h.max(ffn))
    } else {
        0
    };
    let fixed =
        kv_bytes + act_bytes + lm_bytes + small_bytes + gemm_scratch + (64 << 20) + allowance;
    let (budget, budget_source) = match opts.vram_budget {
        Some(b) => (b, "--vram-budget".to_string()),
        None => gpu.default_vram_budget().unwrap_or((
            u64::MAX,
            "unlimited: the adapter reports no memory heaps".to_string(),
        )),
    };
    let plan = scheduler::plan(
        budget,
        fixed,
        pack.bytes,
        c.num_hidden_layers,
        opts.prefetch_depth,
    )?;
    Ok((plan, budget_source))
}

impl<'w> GpuModel<'w> {
    /// Uploads the weights (planning residency under the budget) and builds every dispatch.
    pub fn new(gpu: &'w Gpu, weights: &'w ModelWeights, opts: EngineOptions) -> Result<Self> {
        let c = weights.config.clone();
        if opts.ctx_size == 0 || opts.chunk == 0 {
            return Err(Error::Invalid(
                "--ctx-size and the prompt chunk must be positive".into(),
            ));
        }
        let ctx = opts.ctx_size;
        let opts = EngineOptions {
            chunk: effective_chunk(gpu, &opts),
            ..opts
        };
        let m = opts.chunk;
        let pack = LayerPack::new(&c);
        let lm_head = weights.q4("lm_head.weight")?;
        let (plan, budget_source) = residency_plan(gpu, &c, &opts)?;
        check_plan(gpu, &opts, &plan, &pack)?;

        let store = LayerStore::upload(gpu, weights, &plan, &pack)?;
        let lm_q = gpu.storage_from("lm_head.qweight", lm_head.qweight);
        let lm_s = gpu.storage_from_bytes("lm_head.scales", bytemuck::cast_slice(lm_head.scales));
        let final_norm = gpu.storage_from("model.norm", &weights.dense_f32("model.norm.weight")?.1);
        let inv_freq = gpu.storage_from("rope inv_freq", &c.rope_inv_freq());
        let act = Activations::new(gpu, &c, m);
        let step_buf = gpu.uniform("step", &StepParams::default());
        let kv = kv_caches(gpu, &c, ctx);
        let allowance = DRIVER_ALLOWANCE + 2 * pack.bytes;
        let device_bytes = store.device_bytes + plan.fixed_bytes - allowance;
        let slots = KvSlots::new(gpu, &kv, opts.kv_slots)?;

        let kernels = StepKernels::new(gpu, &c, opts.decode_activations)?;
        let shared = step::Shared {
            gpu,
            config: &c,
            act: &act,
            step: &step_buf,
            inv_freq: &inv_freq,
            pack: &pack,
            ctx,
            chunk: m,
            fusion: opts.decode_fusion,
        };
        let mut keep = vec![
            lm_q.clone(),
            lm_s.clone(),
            final_norm.clone(),
            inv_freq.clone(),
        ];
        keep.extend(kernels.buffers());
        let mut decode_layers = Vec::new();
        let mut prefill_layers = Vec::new();
        let mut layer_buffers = Vec::new();
        for (l, caches) in kv.iter().enumerate() {
            let buffers = store.layer_buffers(l, caches, &opts);
            let (decode, prefill) = kernels.layer(&shared, &buffers)?;
            decode_layers.push(decode);
            prefill_layers.push(prefill);
            if let Some(saved) = slots.layer(l) {
                layer_buffers.push((buffers, saved));
            }
            let s = &store.small[l];
            keep.extend([
                s.input_norm.clone(),
                s.post_norm.clone(),
                caches.0.clone(),
                caches.1.clone(),
            ]);
            keep.extend(s.qkv_bias.iter().chain(&s.o_bias).cloned());
        }
        let lm = Q4Ref {
            rows: lm_head.rows,
            cols: lm_head.cols,
            qweight: BufRange::whole(&lm_q),
            scales: BufRange::whole(&lm_s),
        };
        let (decode_head, prefill_final_norm, prefill_head) =
            kernels.heads(&shared, lm, &final_norm)?;
        let (batch, batch_off) = if layer_buffers.len() == c.num_hidden_layers {
            batched_step(&kernels, &shared, &opts, &layer_buffers, lm, &final_norm)?
        } else {
            (None, None)
        };
        drop(layer_buffers);
        let sampling = Sampling::new(gpu, &act.logits, c.vocab_size, opts.max_top_logprobs)?;

        let mut model = GpuModel {
            gpu,
            weights,
            config: c,
            opts,
            plan,
            budget_source,
            pack,
            homes: store.homes,
            ring: store.ring,
            act,
            step_buf,
            decode_layers,
            prefill_layers,
            decode_head,
            prefill_final_norm,
            prefill_head,
            sampler: sampling.sampler,
            history: sampling.history,
            sample_out: sampling.sample_out,
            readback: sampling.readback,
            position: 0,
            device_bytes,
            next_decode: None,
            kv,
            slots,
            batch,
            batch_off,
            hybrid: None,
            hybrid_note: None,
            _keep: keep,
        };
        model.plan_hybrid()?;
        Ok(model)
    }

    pub fn plan(&self) -> &ResidencyPlan {
        &self.plan
    }

    /// Where the VRAM budget came from (the flag, or the adapter's memory heaps).
    pub fn budget_source(&self) -> &str {
        &self.budget_source
    }

    /// Bytes this model holds on the GPU (weights, ring, KV cache, activations).
    pub fn device_bytes(&self) -> u64 {
        self.device_bytes
    }

    /// Runs one decode step (and the sampler), then forgets it, so those kernels have run once
    /// before the prompt: a driver that finishes compiling a kernel at its first dispatch does it
    /// here, outside the prompt's time. (Not a prompt chunk: on lavapipe one costs as much as the
    /// whole chunk of prompt tokens it is sized for, about a minute; see `generate::SHORT_PROMPT`.)
    pub fn warm_up(&mut self) -> Result<()> {
        let greedy = crate::sampling::SamplingParams::greedy();
        self.step(&[0], &greedy, &[0], 0, None)?;
        self.reset();
        Ok(())
    }

    /// Most prompt tokens per forward pass, as this model runs (see [`EngineOptions::chunk`]).
    pub fn chunk(&self) -> usize {
        self.opts.chunk
    }

    /// Forgets the sequence (the KV cache is overwritten from position 0).
    pub fn reset(&mut self) {
        self.truncate(0);
    }

    /// Takes the first `position` KV-cache entries as filled, whatever they hold: for benchmarks
    /// at a depth (`bench -d`), where the time of a step does not depend on the cached values.
    pub fn skip_to(&mut self, position: usize) -> Result<()> {
        if position >= self.opts.ctx_size {
            return Err(Error::Invalid(format!(
                "depth {position} leaves no room in a context of {}",
                self.opts.ctx_size
            )));
        }
        self.position = position;
        self.kv_skipped_to();
        Ok(())
    }

    /// Runs `tokens` through the model and returns the logits of the last one (tests, `--cpu` checks).
    pub fn logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.forward(tokens, None)?;
        self.gpu.read_f32(&self.act.logits, self.config.vocab_size)
    }

    /// Records the copy of streamed layer `l` into its ring slot (nothing for a resident layer).
    fn copy_to_ring(&self, enc: &mut wgpu::CommandEncoder, l: usize) {
        if let LayerHome::Streamed { staging, slot } = &self.homes[l] {
            enc.copy_buffer_to_buffer(staging, 0, &self.ring[*slot], 0, self.pack.bytes);
        }
    }

    /// Writes a chunk's step parameters and embedding rows (the step starts at `position`).
    fn stage_chunk(&self, chunk: &[u32]) -> Result<()> {
        let n = chunk.len();
        let step = StepParams {
            pos: self.position as u32,
            n_tokens: n as u32,
            kv_len: (self.position + n) as u32,
            _pad: 0,
        };
        self.gpu
            .queue
            .write_buffer(&self.step_buf, 0, bytemuck::bytes_of(&step));
        let mut rows = vec![0f32; n * self.config.hidden_size];
        for (t, row) in chunk.iter().zip(rows.chunks_mut(self.config.hidden_size)) {
            self.weights.embedding_row(*t, row)?;
        }
        self.gpu
            .queue
            .write_buffer(&self.act.x, 0, bytemuck::cast_slice(&rows));
        Ok(())
    }

    /// Runs one decode step of `token` with GPU timestamps around every dispatch, each in a pass
    /// of its own (which adds a little barrier time to each), and returns the GPU time per role,
    /// summed over the layers timed, in the order first seen. Needs TIMESTAMP_QUERY; at most
    /// `MAX_PROFILED` dispatches are timed, the rest run untimed. Streamed layers are copied as in
    /// a normal step, untimed. Appends the token like a normal step.
    pub fn profile_decode_step(&mut self, token: u32) -> Result<Vec<DispatchTime>> {
        if self.position + 1 > self.opts.ctx_size {
            return Err(Error::Invalid("the context is full: cannot profile".into()));
        }
        self.kv_to_gpu()?;
        self.stage_chunk(&[token])?;
        let times = self.profile_dispatches(&self.decode_layers, &self.decode_head)?;
        self.position += 1;
        self.gpu_wrote_kv();
        Ok(times)
    }

    /// Runs `layers` (each after its layer's copy into the ring, untimed) and `head`, each
    /// dispatch in a pass of its own between timestamps (at most `MAX_PROFILED` timed), and
    /// returns the GPU time per label in the order first seen.
    fn profile_dispatches(
        &self,
        layers: &[Vec<Dispatch>],
        head: &[Dispatch],
    ) -> Result<Vec<DispatchTime>> {
        const MAX_PROFILED: usize = 2048;
        if !self.gpu.caps.timestamps {
            return Err(Error::Invalid(
                "this adapter has no timestamp queries: cannot profile".into(),
            ));
        }
        // The step's dispatches in order, each with the layer whose copy into the ring precedes it.
        let mut ordered: Vec<(Option<usize>, &Dispatch)> = Vec::new();
        for (l, dispatches) in layers.iter().enumerate() {
            let copy_first = self.opts.decode_reads == StreamRead::Ring;
            for (i, d) in dispatches.iter().enumerate() {
                ordered.push(((i == 0 && copy_first).then_some(l), d));
            }
        }
        ordered.extend(head.iter().map(|d| (None, d)));
        let timed = ordered.len().min(MAX_PROFILED);
        let queries = self.gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profile"),
            ty: wgpu::QueryType::Timestamp,
            count: (2 * timed) as u32,
        });
        let bytes = (2 * timed * 8) as u64;
        let resolved = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profile resolve"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut enc = self
            .gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("profile step"),
            });
        for (i, (copy_layer, d)) in ordered.iter().enumerate() {
            if let Some(l) = copy_layer {
                self.copy_to_ring(&mut enc, *l);
            }
            let timestamp_writes = (i < timed).then(|| wgpu::ComputePassTimestampWrites {
                query_set: &queries,
                beginning_of_pass_write_index: Some((2 * i) as u32),
                end_of_pass_write_index: Some((2 * i + 1) as u32),
            });
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(&d.label),
                timestamp_writes,
            });
            d.encode(&mut pass);
        }
        enc.resolve_query_set(&queries, 0..(2 * timed) as u32, &resolved, 0);
        self.gpu.queue.submit([enc.finish()]);
        let ticks: Vec<u64> =
            bytemuck::pod_collect_to_vec(&self.gpu.read_bytes(&resolved, 0, bytes)?);
        let ns_per_tick = f64::from(self.gpu.queue.get_timestamp_period());
        let mut out = Vec::new();
        for ((_, d), t) in ordered.iter().zip(ticks.chunks_exact(2)) {
            let seconds = t[1].saturating_sub(t[0]) as f64 * ns_per_tick * 1e-9;
            add_time(&mut out, &d.label, 1, seconds);
        }
        Ok(out)
    }

    /// Records every layer's dispatches, a compute pass per layer, each streamed layer copied
    /// into its ring slot first when `reads` is the ring.
    fn encode_layers(
        &self,
        enc: &mut wgpu::CommandEncoder,
        layers: &[Vec<Dispatch>],
        reads: StreamRead,
    ) {
        for (l, dispatches) in layers.iter().enumerate() {
            if reads == StreamRead::Ring {
                self.copy_to_ring(enc, l);
            }
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("layer"),
                timestamp_writes: None,
            });
            for d in dispatches {
                d.encode(&mut pass);
            }
        }
    }

    /// Records one forward pass over `n` staged tokens (decode: one token through the GEMV
    /// dispatches): the layers, then, for the last chunk, the final norm and lm_head, and with
    /// `sample` the sampler and the copy of its result to the read-back buffer.
    fn encode_chunk(
        &self,
        decode: bool,
        n: usize,
        last_chunk: bool,
        sample: bool,
    ) -> wgpu::CommandBuffer {
        let mut enc = self
            .gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("step"),
            });
        let (layers, reads) = if decode {
            (&self.decode_layers, self.opts.decode_reads)
        } else {
            (&self.prefill_layers, self.opts.prompt_reads)
        };
        self.encode_layers(&mut enc, layers, reads);
        if last_chunk {
            self.encode_head(&mut enc, decode, n, sample);
        }
        enc.finish()
    }

    /// Records the final norm and lm_head of the last of `n` rows (a prompt chunk's or the decode
    /// step's) and with `sample` the sampler and the copy of its result to the read-back buffer.
    fn encode_head(&self, enc: &mut wgpu::CommandEncoder, decode: bool, n: usize, sample: bool) {
        let head = if decode {
            &self.decode_head
        } else {
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("final norm"),
                    timestamp_writes: None,
                });
                self.prefill_final_norm.encode(&mut pass);
            }
            let row = f32_bytes(self.config.hidden_size);
            enc.copy_buffer_to_buffer(&self.act.h, (n as u64 - 1) * row, &self.act.last, 0, row);
            &self.prefill_head
        };
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("head"),
                timestamp_writes: None,
            });
            for d in head {
                d.encode(&mut pass);
            }
            if sample {
                self.sampler.encode(&mut pass);
            }
        }
        if sample {
            enc.copy_buffer_to_buffer(
                &self.sample_out,
                0,
                &self.readback,
                0,
                self.sample_out.size(),
            );
        }
    }

    /// Appends `tokens`, leaving the last token's logits in `act.logits`; with `sample`, also
    /// samples on the GPU within the same submission.
    fn forward(
        &mut self,
        tokens: &[u32],
        sample: Option<(&SamplingParams, &[u32], u32)>,
    ) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::Invalid("no tokens to process".into()));
        }
        // After a batched step the working cache must take its sequence back.
        self.select_kv_slot(self.slots.active())?;
        if self.position + tokens.len() > self.opts.ctx_size {
            return Err(Error::Invalid(format!(
                "the sequence would hold {} tokens but the context holds {}; raise --ctx-size",
                self.position + tokens.len(),
                self.opts.ctx_size
            )));
        }
        let chunks: Vec<&[u32]> = if tokens.len() == 1 {
            vec![tokens]
        } else {
            tokens.chunks(self.opts.chunk).collect()
        };
        let n_chunks = chunks.len();
        let decode = tokens.len() == 1;
        let hybrid = decode && self.hybrid.is_some();
        if !hybrid {
            self.kv_to_gpu()?;
        }
        for (i, chunk) in chunks.into_iter().enumerate() {
            let last_chunk = i + 1 == n_chunks;
            let n = chunk.len();
            self.stage_chunk(chunk)?;
            let sample_here = sample.filter(|_| last_chunk);
            if let Some((params, history, step_no)) = sample_here {
                let recent = &history[history.len().saturating_sub(MAX_HISTORY)..];
                self.gpu
                    .queue
                    .write_buffer(&self.history, 0, bytemuck::cast_slice(recent));
                let p = SampleParams::from(params);
                self.sampler
                    .write_params(&self.gpu.queue, &p, step_no, recent.len())?;
            }
            if hybrid {
                self.decode_hybrid(chunk[0], sample_here.is_some())?;
            } else if decode && sample_here.is_some() {
                // The decode step's commands never change: record the next step's while the GPU
                // runs this one, so recording (hundreds of dispatches) is off the critical path.
                let commands = match self.next_decode.take() {
                    Some(c) => c,
                    None => self.encode_chunk(true, n, true, true),
                };
                self.gpu.queue.submit([commands]);
                self.next_decode = Some(self.encode_chunk(true, n, true, true));
            } else {
                let commands = self.encode_chunk(decode, n, last_chunk, sample_here.is_some());
                self.gpu.queue.submit([commands]);
            }
            self.position += n;
        }
        if !hybrid {
            self.gpu_wrote_kv();
        }
        Ok(())
    }
}

impl Decoder for GpuModel<'_> {
    fn step(
        &mut self,
        tokens: &[u32],
        params: &SamplingParams,
        history: &[u32],
        step: u32,
        top_logprobs: Option<usize>,
    ) -> Result<StepOutput> {
        let top_n = top_logprobs.unwrap_or(0).min(self.opts.max_top_logprobs);
        // Short prompts run as decode steps (generate::SHORT_PROMPT); the last one samples.
        let calls = crate::generate::forward_calls(tokens);
        let (last, first) = calls
            .split_last()
            .ok_or_else(|| Error::Invalid("no tokens to process".into()))?;
        for call in first {
            self.forward(call, None)?;
        }
        self.forward(last, Some((params, history, step)))?;
        let words: Vec<u32> = bytemuck::pod_collect_to_vec(
            &self
                .gpu
                .map_and_read(&self.readback, self.readback.size())?,
        );
        let r = sample::parse_result(&words)?;
        let logprobs = top_logprobs.map(|_| TokenLogprobs {
            token: r.token,
            logprob: r.logprob,
            top: r.top.into_iter().take(top_n).collect(),
        });
        Ok(StepOutput {
            token: r.token,
            logprobs,
        })
    }

    fn position(&self) -> usize {
        self.position
    }

    fn context_size(&self) -> usize {
        self.opts.ctx_size
    }
}

/// Checks what the plan needs of the adapter and the host: host memory for the streamed layers,
/// zero-copy reads where asked for, one layer in one buffer.
fn check_plan(
    gpu: &Gpu,
    opts: &EngineOptions,
    plan: &ResidencyPlan,
    pack: &LayerPack,
) -> Result<()> {
    scheduler::check_host_memory(plan)?;
    let zero_copy = [opts.decode_reads, opts.prompt_reads].contains(&StreamRead::ZeroCopy);
    if zero_copy && plan.streamed_layers() > 0 && !gpu.caps.mappable_primary_buffers {
        return Err(Error::Invalid(format!(
            "{} cannot read host memory from kernels (no MAPPABLE_PRIMARY_BUFFERS): use the ring for streamed layers",
            gpu.info.name
        )));
    }
    if pack.bytes > gpu.limits.max_buffer_size {
        return Err(Error::Gpu(format!(
            "one layer's weights take {} bytes, more than the adapter's largest buffer ({})",
            pack.bytes, gpu.limits.max_buffer_size
        )));
    }
    Ok(())
}

/// Every layer's weights where the plan puts them: resident buffers, host staging buffers with
/// their ring slots, the ring, and the small per-layer tensors.
struct LayerStore {
    homes: Vec<LayerHome>,
    ring: Vec<wgpu::Buffer>,
    small: Vec<LayerSmall>,
    /// Device bytes of the resident layers and the ring.
    device_bytes: u64,
}

impl LayerStore {
    fn upload(
        gpu: &Gpu,
        weights: &ModelWeights,
        plan: &ResidencyPlan,
        pack: &LayerPack,
    ) -> Result<LayerStore> {
        let c = &weights.config;
        let ring: Vec<wgpu::Buffer> = (0..plan.ring_slots)
            .map(|s| gpu.storage_buffer(&format!("ring slot {s}"), pack.bytes))
            .collect();
        let mut device_bytes = ring.len() as u64 * pack.bytes;
        let mut homes = Vec::with_capacity(c.num_hidden_layers);
        let mut small = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let bytes = pack_layer(weights, pack, l)?;
            if plan.is_resident(l) {
                homes.push(LayerHome::Resident(
                    gpu.storage_from_bytes(&format!("layer {l}"), &bytes),
                ));
                device_bytes += pack.bytes;
            } else {
                let slot = (l - plan.resident_layers) % plan.ring_slots;
                homes.push(LayerHome::Streamed {
                    staging: host_staging(gpu, &format!("layer {l} (host)"), &bytes)?,
                    slot,
                });
            }
            // Bound the transient upload buffers wgpu keeps until the next submit.
            gpu.queue.submit([]);
            gpu.wait()?;
            small.push(layer_small(gpu, weights, c, l)?);
        }
        Ok(LayerStore {
            homes,
            ring,
            small,
            device_bytes,
        })
    }

    /// Layer `l`'s buffers as each phase's kernels read them (`opts` says how streamed layers
    /// are read), with its KV cache.
    fn layer_buffers<'a>(
        &'a self,
        l: usize,
        kv: &'a (wgpu::Buffer, wgpu::Buffer),
        opts: &EngineOptions,
    ) -> step::LayerBuffers<'a> {
        let source = |reads: StreamRead| match (&self.homes[l], reads) {
            (LayerHome::Resident(b), _) => b,
            (LayerHome::Streamed { slot, .. }, StreamRead::Ring) => &self.ring[*slot],
            (LayerHome::Streamed { staging, .. }, StreamRead::ZeroCopy) => staging,
        };
        step::LayerBuffers {
            decode_weights: source(opts.decode_reads),
            prompt_weights: source(opts.prompt_reads),
            small: &self.small[l],
            k_cache: &kv.0,
            v_cache: &kv.1,
        }
    }
}

impl Activations {
    /// The activation buffers for chunks of `m` tokens.
    fn new(gpu: &Gpu, c: &ModelConfig, m: usize) -> Activations {
        let (h, q_dim, ffn) = (c.hidden_size, c.q_dim(), c.intermediate_size);
        let qkv_dim = q_dim + 2 * c.kv_dim();
        let buffer = |label: &str, values: usize| gpu.storage_buffer(label, f32_bytes(values));
        Activations {
            x: buffer("x", m * h),
            h: buffer("h", m * h),
            qkv: buffer("qkv", m * qkv_dim),
            q: buffer("q", m * q_dim),
            attn: buffer("attn", m * q_dim),
            gate_up: buffer("gate_up", m * 2 * ffn),
            act: buffer("act", m * ffn),
            last: buffer("last", h),
            logits: buffer("logits", c.vocab_size),
        }
    }
}

/// Each layer's K and V caches (f16 pairs) for `ctx` positions.
fn kv_caches(gpu: &Gpu, c: &ModelConfig, ctx: usize) -> Vec<(wgpu::Buffer, wgpu::Buffer)> {
    let words = (c.num_kv_heads() * ctx * c.head_dim() / 2 * 4) as u64;
    (0..c.num_hidden_layers)
        .map(|l| {
            (
                gpu.storage_buffer(&format!("k cache {l}"), words),
                gpu.storage_buffer(&format!("v cache {l}"), words),
            )
        })
        .collect()
}

/// The batched decode step of `serve --parallel` (int8 activations and more than one KV slot),
/// or None with the reason where the GPU cannot bind it: the sequences then take turns (correct,
/// one pass each), so loading goes on.
fn batched_step(
    kernels: &StepKernels,
    shared: &step::Shared,
    opts: &EngineOptions,
    layers: &[(step::LayerBuffers, &(wgpu::Buffer, wgpu::Buffer))],
    lm: Q4Ref,
    final_norm: &wgpu::Buffer,
) -> Result<(Option<BatchDecode>, Option<String>)> {
    let rows = batch::batch_rows(opts.kv_slots, shared.chunk);
    if rows == 0 || opts.decode_activations != DecodeActivations::Int8 {
        return Ok((None, None));
    }
    let bound = BatchDecode::new(
        kernels,
        shared,
        rows,
        opts.kv_slots,
        layers,
        lm,
        final_norm,
        opts.max_top_logprobs,
    );
    match bound {
        Ok(b) => Ok((Some(b), None)),
        Err(Error::Unsupported(why)) => Ok((None, Some(why))),
        Err(e) => Err(e),
    }
}

/// The GPU sampler with its buffers: the token history it penalises, its output and the one
/// read-back buffer of the whole run (a decoded token costs one small map, no allocation).
struct Sampling {
    sampler: SampleDispatch,
    history: wgpu::Buffer,
    sample_out: wgpu::Buffer,
    readback: wgpu::Buffer,
}

impl Sampling {
    fn new(
        gpu: &Gpu,
        logits: &wgpu::Buffer,
        vocab: usize,
        max_top_logprobs: usize,
    ) -> Result<Sampling> {
        let history = gpu.storage_buffer("sample history", (MAX_HISTORY * 4) as u64);
        let sample_out = gpu.storage_buffer(
            "sample out",
            (sample::out_words(max_top_logprobs) * 4) as u64,
        );
        let sampler = Sample::new(gpu)?.bind(
            gpu,
            logits,
            &history,
            &sample_out,
            vocab,
            MAX_HISTORY,
            max_top_logprobs,
        )?;
        let readback = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("sample readback"),
            size: sample_out.size(),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(Sampling {
            sampler,
            history,
            sample_out,
            readback,
        })
    }
}

/// One layer's four INT4 matrices (q|k|v and gate|up fused by rows) in the `LayerPack` layout.
/// Quantization is per row, so concatenating rows of quantized matrices is exact.
fn pack_layer(weights: &ModelWeights, pack: &LayerPack, layer: usize) -> Result<Vec<u8>> {
    let [q, k, v, o, gate, up, down] = ModelConfig::layer_linear_names(layer);
    let mut bytes = vec![0u8; pack.bytes as usize];
    let mut put = |m: &PackedMatrix, parts: &[QView]| -> Result<()> {
        let (mut qo, mut so) = (m.qweight_offset as usize, m.scales_offset as usize);
        for p in parts {
            if p.cols != m.cols {
                return Err(Error::Config(format!(
                    "layer {layer}: a matrix has {} columns, expected {}",
                    p.cols, m.cols
                )));
            }
            let qb: &[u8] = bytemuck::cast_slice(p.qweight);
            let sb: &[u8] = bytemuck::cast_slice(p.scales);
            bytes[qo..qo + qb.len()].copy_from_slice(qb);
            bytes[so..so + sb.len()].copy_from_slice(sb);
            qo += qb.len();
            so += sb.len();
        }
        if qo - m.qweight_offset as usize != m.qweight_bytes as usize {
            return Err(Error::Config(format!(
                "layer {layer}: matrix rows do not match the config"
            )));
        }
        Ok(())
    };
    put(
        &pack.qkv,
        &[weights.q4(&q)?, weights.q4(&k)?, weights.q4(&v)?],
    )?;
    put(&pack.o, &[weights.q4(&o)?])?;
    put(&pack.gate_up, &[weights.q4(&gate)?, weights.q4(&up)?])?;
    put(&pack.down, &[weights.q4(&down)?])?;
    Ok(bytes)
}

fn layer_small(gpu: &Gpu, weights: &ModelWeights, c: &ModelConfig, l: usize) -> Result<LayerSmall> {
    let p = format!("model.layers.{l}");
    let dense = |name: String| -> Result<wgpu::Buffer> {
        Ok(gpu.storage_from(&name, &weights.dense_f32(&name)?.1))
    };
    let qkv_bias = if c.qkv_bias() {
        let mut b = weights.dense_f32(&format!("{p}.self_attn.q_proj.bias"))?.1;
        b.extend(weights.dense_f32(&format!("{p}.self_attn.k_proj.bias"))?.1);
        b.extend(weights.dense_f32(&format!("{p}.self_attn.v_proj.bias"))?.1);
        Some(gpu.storage_from(&format!("{p} qkv bias"), &b))
    } else {
        None
    };
    let o_bias = if c.o_bias() {
        Some(dense(format!("{p}.self_attn.o_proj.bias"))?)
    } else {
        None
    };
    Ok(LayerSmall {
        input_norm: dense(format!("{p}.input_layernorm.weight"))?,
        post_norm: dense(format!("{p}.post_attention_layernorm.weight"))?,
        qkv_bias,
        o_bias,
    })
}

/// A buffer in host memory that copies can read from (DESIGN.md §2: MAP_READ | COPY_SRC buffers
/// are placed in host-cached system memory; MAP_WRITE ones land in VRAM on resizable-BAR cards).
fn host_staging(gpu: &Gpu, label: &str, bytes: &[u8]) -> Result<wgpu::Buffer> {
    let usage = if gpu.caps.mappable_primary_buffers {
        wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::STORAGE
    } else {
        wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC
    };
    let buf = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: (bytes.len() as u64).next_multiple_of(4),
        usage,
        mapped_at_creation: true,
    });
    {
        let mut view = buf
            .slice(..)
            .get_mapped_range_mut()
            .map_err(|e| Error::Gpu(format!("mapping {label}: {e}")))?;
        view.slice(..bytes.len()).copy_from_slice(bytes);
    }
    buf.unmap();
    Ok(buf)
}
