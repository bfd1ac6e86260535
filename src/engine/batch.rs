//! The batched decode step (`serve --parallel N`): one token for each of up to `rows` sequences
//! in one pass over the weights. Each projection's batched GEMV runs a one-sequence workgroup
//! per row side by side on the same weights, so they come from memory once for all rows; RoPE, the KV write and attention run per row in that
//! sequence's region of the slots' caches (`kv_slots.rs`); then one sampler per row. A row's
//! arithmetic is the one-sequence int8 step's without its fusions (no RoPE epilogue, no
//! quantizing combine), which give the same values: so a sequence's tokens do not depend on
//! which other sequences share its steps.

use super::step::{BatchBinds, Shared, StepKernels};
use super::{DispatchTime, GpuModel, MAX_HISTORY};
use crate::error::{Error, Result};
use crate::generate::{StepOutput, TokenLogprobs};
use crate::gpu::Gpu;
use crate::kernels::gemv_q4_q8::MAX_BATCH;
use crate::kernels::quant_act::ActQ8Buffers;
use crate::kernels::sample::{self, Sample, SampleDispatch, SampleParams};
use crate::kernels::{BatchStep, Dispatch, Q4Ref};
use crate::sampling::SamplingParams;

/// One sequence's part of a batched step: append `token` to `slot` and sample what follows.
pub struct BatchEntry<'a> {
    pub slot: usize,
    pub token: u32,
    pub params: &'a SamplingParams,
    /// The sequence so far, for the repetition penalty.
    pub history: &'a [u32],
    /// Sampled tokens so far (seeds the sampler's draw).
    pub step: u32,
    pub top_logprobs: Option<usize>,
}

/// A row's sampler: its logits (copied from the batched lm_head's row), history and result.
struct RowSampler {
    logits: wgpu::Buffer,
    history: wgpu::Buffer,
    out: wgpu::Buffer,
    sampler: SampleDispatch,
}

/// One batch size's dispatches: the GEMVs' pipelines are compiled for `cols` columns (a
/// workgroup of `cols` columns' threads, however many are live; on the H200 an 8-column kernel
/// running 2 sequences was no faster than one sequence).
struct SizedSteps {
    cols: usize,
    layers: Vec<Vec<Dispatch>>,
    head: Vec<Dispatch>,
}

/// The batched step's dispatches and buffers, built at load.
pub(super) struct BatchDecode {
    /// By increasing `cols`; a step of n rows runs the first with `cols >= n`.
    sizes: Vec<SizedSteps>,
    rows_buf: wgpu::Buffer,
    rows: usize,
    logits: wgpu::Buffer,
    /// Values between the rows of `logits` (the vocabulary, padded so a row starts aligned).
    stride: usize,
    samplers: Vec<RowSampler>,
    readback: wgpu::Buffer,
    _input: ActQ8Buffers,
}

/// Rows a batched step takes with `slots` sequences and prompt chunks of `chunk` rows (the
/// activations hold a chunk): 0 where there is nothing to batch.
pub(super) fn batch_rows(slots: usize, chunk: usize) -> usize {
    match slots.min(chunk).min(MAX_BATCH) {
        n if n >= 2 => n,
        _ => 0,
    }
}

/// Bytes the batched step adds on the GPU: its logits and each row's copy of them.
pub(super) fn batch_bytes(rows: usize, vocab: usize) -> u64 {
    (2 * rows * logits_stride(vocab) * 4) as u64
}

fn logits_stride(vocab: usize) -> usize {
    vocab.next_multiple_of(64)
}

impl BatchDecode {
    /// Binds the batched step for `rows` sequences over the model's layers (`layers[l]`: layer
    /// l's buffers and its slots' caches).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        kernels: &StepKernels,
        sh: &Shared,
        rows: usize,
        slots: usize,
        layers: &[(super::step::LayerBuffers, &(wgpu::Buffer, wgpu::Buffer))],
        lm: Q4Ref,
        final_norm: &wgpu::Buffer,
        max_top: usize,
    ) -> Result<BatchDecode> {
        let (gpu, c) = (sh.gpu, sh.config);
        let k_max = c.hidden_size.max(c.q_dim()).max(c.intermediate_size);
        let input = ActQ8Buffers::with_rows(gpu, "batch input", k_max, rows);
        let rows_buf = gpu.uniform("batch rows", &BatchStep::default());
        let (vocab, stride) = (c.vocab_size, logits_stride(c.vocab_size));
        let logits = gpu.storage_buffer("batch logits", (rows * stride * 4) as u64);
        let mut cols: Vec<usize> = [2, 4].into_iter().filter(|&n| n < rows).collect();
        cols.push(rows);
        let sizes = cols
            .into_iter()
            .map(|cols| {
                let binds = BatchBinds {
                    rows_buf: &rows_buf,
                    rows,
                    cols,
                    input: &input,
                    slots,
                };
                let layers = layers
                    .iter()
                    .map(|(l, caches)| kernels.batch_layer(sh, l, &binds, caches))
                    .collect::<Result<Vec<_>>>()?;
                let head = kernels.batch_head(sh, lm, final_norm, &binds, &logits, stride)?;
                Ok(SizedSteps { cols, layers, head })
            })
            .collect::<Result<Vec<_>>>()?;
        let samplers = row_samplers(gpu, rows, vocab, max_top)?;
        let readback = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("batch readback"),
            size: (rows * sample::out_words(max_top) * 4) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(BatchDecode {
            sizes,
            rows_buf,
            rows,
            logits,
            stride,
            samplers,
            readback,
            _input: input,
        })
    }

    /// Rows one step takes.
    pub(super) fn rows(&self) -> usize {
        self.rows
    }

    /// The dispatch lists for a step of `n` rows: the fewest columns that hold them.
    fn sized(&self, n: usize) -> &SizedSteps {
        let last = &self.sizes[self.sizes.len() - 1];
        self.sizes.iter().find(|s| s.cols >= n).unwrap_or(last)
    }
}

fn row_samplers(gpu: &Gpu, rows: usize, vocab: usize, max_top: usize) -> Result<Vec<RowSampler>> {
    let kernel = Sample::new(gpu)?;
    (0..rows)
        .map(|r| {
            let logits = gpu.storage_buffer(&format!("batch row {r} logits"), (vocab * 4) as u64);
            let history =
                gpu.storage_buffer(&format!("batch row {r} history"), (MAX_HISTORY * 4) as u64);
            let out = gpu.storage_buffer(
                &format!("batch row {r} sample"),
                (sample::out_words(max_top) * 4) as u64,
            );
            let sampler = kernel.bind(gpu, &logits, &history, &out, vocab, MAX_HISTORY, max_top)?;
            Ok(RowSampler {
                logits,
                history,
                out,
                sampler,
            })
        })
        .collect()
}

impl GpuModel<'_> {
    /// Most sequences one [`step_batch`](Self::step_batch) takes (0: this engine has no batched
    /// step: one KV slot, or f32 decode activations).
    pub fn batch_capacity(&self) -> usize {
        self.batch.as_ref().map_or(0, BatchDecode::rows)
    }

    /// Why this engine has no batched step though it keeps several sequences (this GPU could not
    /// bind it), if so.
    pub fn batch_unavailable(&self) -> Option<&str> {
        self.batch_off.as_deref()
    }

    /// Appends one token to each entry's sequence (distinct slots, at most
    /// [`batch_capacity`](Self::batch_capacity)) in one pass over the weights, and samples the
    /// next token of each, as [`Decoder::step`](crate::generate::Decoder::step) would for it alone.
    pub fn step_batch(&mut self, entries: &[BatchEntry]) -> Result<Vec<StepOutput>> {
        self.stage_batch(entries)?;
        let batch = self.batch()?;
        let commands = self.encode_batch(batch, entries.len());
        self.gpu.queue.submit([commands]);
        let words: Vec<u32> = bytemuck::pod_collect_to_vec(
            &self
                .gpu
                .map_and_read(&batch.readback, batch.readback.size())?,
        );
        let per_row = words.len() / batch.rows;
        let max_top = self.opts.max_top_logprobs;
        let lens = self.parked_lens();
        let mut out = Vec::with_capacity(entries.len());
        for (r, e) in entries.iter().enumerate() {
            lens[e.slot] += 1;
            let result = sample::parse_result(&words[r * per_row..(r + 1) * per_row])?;
            let top_n = e.top_logprobs.unwrap_or(0).min(max_top);
            out.push(StepOutput {
                token: result.token,
                logprobs: e.top_logprobs.map(|_| TokenLogprobs {
                    token: result.token,
                    logprob: result.logprob,
                    top: result.top.into_iter().take(top_n).collect(),
                }),
            });
        }
        Ok(out)
    }

    /// Runs a batched step of `entries` (as [`step_batch`](Self::step_batch), without sampling)
    /// with every dispatch timed in a pass of its own; returns the GPU time per role.
    pub fn profile_batch_step(&mut self, entries: &[BatchEntry]) -> Result<Vec<DispatchTime>> {
        self.stage_batch(entries)?;
        let batch = self.batch()?;
        let sized = batch.sized(entries.len());
        let times = self.profile_dispatches(&sized.layers, &sized.head)?;
        let lens = self.parked_lens();
        for e in entries {
            lens[e.slot] += 1;
        }
        Ok(times)
    }

    /// Checks `entries`, parks the working cache and writes the step's rows, embedding rows and
    /// sampler parameters.
    fn stage_batch(&mut self, entries: &[BatchEntry]) -> Result<()> {
        self.check_batch(entries, self.batch()?.rows)?;
        self.park();
        let lens = self.parked_lens();
        let rows: Vec<(usize, usize)> = entries.iter().map(|e| (e.slot, lens[e.slot])).collect();
        let batch = self.batch()?;
        let step = BatchStep::new(&rows);
        self.gpu
            .queue
            .write_buffer(&batch.rows_buf, 0, bytemuck::bytes_of(&step));
        let h = self.config.hidden_size;
        let mut x = vec![0f32; entries.len() * h];
        for (e, row) in entries.iter().zip(x.chunks_mut(h)) {
            self.weights.embedding_row(e.token, row)?;
        }
        self.gpu
            .queue
            .write_buffer(&self.act.x, 0, bytemuck::cast_slice(&x));
        for (e, s) in entries.iter().zip(&batch.samplers) {
            let recent = &e.history[e.history.len().saturating_sub(MAX_HISTORY)..];
            self.gpu
                .queue
                .write_buffer(&s.history, 0, bytemuck::cast_slice(recent));
            let p = SampleParams::from(e.params);
            s.sampler
                .write_params(&self.gpu.queue, &p, e.step, recent.len())?;
        }
        Ok(())
    }

    /// The batched step, or why there is none.
    fn batch(&self) -> Result<&BatchDecode> {
        self.batch
            .as_ref()
            .ok_or_else(|| Error::Invalid("this engine has no batched decode step".into()))
    }

    fn check_batch(&self, entries: &[BatchEntry], rows: usize) -> Result<()> {
        if entries.is_empty() || entries.len() > rows {
            return Err(Error::Invalid(format!(
                "a batched step takes 1 to {rows} sequences, not {}",
                entries.len()
            )));
        }
        for (i, e) in entries.iter().enumerate() {
            if e.slot >= self.kv_slots() || entries[..i].iter().any(|o| o.slot == e.slot) {
                return Err(Error::Invalid(format!(
                    "a batched step's slots must be distinct and below {}: slot {} is not",
                    self.kv_slots(),
                    e.slot
                )));
            }
            if self.slot_len(e.slot) + 1 > self.opts.ctx_size {
                return Err(Error::Invalid(format!(
                    "sequence {} would hold {} tokens but the context holds {}; raise --ctx-size",
                    e.slot,
                    self.slot_len(e.slot) + 1,
                    self.opts.ctx_size
                )));
            }
        }
        Ok(())
    }

    /// Records a batched step of `n` rows: the layers (streamed ones copied into the ring as in a
    /// decode step), the head, then each row's logits into its sampler and the results read back.
    fn encode_batch(&self, batch: &BatchDecode, n: usize) -> wgpu::CommandBuffer {
        let sized = batch.sized(n);
        let mut enc = self
            .gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("batched step"),
            });
        self.encode_layers(&mut enc, &sized.layers, self.opts.decode_reads);
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("batched head"),
                timestamp_writes: None,
            });
            for d in &sized.head {
                d.encode(&mut pass);
            }
        }
        let row_bytes = (self.config.vocab_size * 4) as u64;
        for (r, s) in batch.samplers.iter().take(n).enumerate() {
            let from = (r * batch.stride * 4) as u64;
            enc.copy_buffer_to_buffer(&batch.logits, from, &s.logits, 0, row_bytes);
        }
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("batched sampling"),
                timestamp_writes: None,
            });
            for s in batch.samplers.iter().take(n) {
                s.sampler.encode(&mut pass);
            }
        }
        for (r, s) in batch.samplers.iter().take(n).enumerate() {
            let size = s.out.size();
            enc.copy_buffer_to_buffer(&s.out, 0, &batch.readback, r as u64 * size, size);
        }
        enc.finish()
    }
}
