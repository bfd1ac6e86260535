//! Decode steps with CPU layers (the plan of `scheduler::hybrid`). The GPU runs its segments of
//! layers; at a CPU block it hands the hidden state to the host, queues the copies of the next
//! streamed layers into the ring (the GPU runs them while the CPU computes), and takes the hidden
//! state back after the block. Prompt chunks stream every non-resident layer as before, so the
//! CPU layers' keys and values live on both sides and are brought up to date lazily: the GPU's
//! prompt chunks write them on the GPU, the CPU's decode steps on the host.

use super::{f32_bytes, GpuModel, LayerHome};
use crate::cpu::{fast, CpuModel, KvCache};
use crate::error::{Error, Result};
use crate::scheduler::hybrid::{self, HybridCosts, LayerRole, Segment};
use std::time::Instant;

/// How many of the layers that do not fit on the GPU run on the CPU during decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuLayers {
    /// As many as make a decode step fastest by the costs measured at load.
    Auto,
    /// This many (at most the non-resident layers); 0 streams them all.
    Count(usize),
}

impl CpuLayers {
    /// "auto" or a number.
    pub fn parse(text: &str) -> Result<CpuLayers> {
        match text.trim() {
            "auto" => Ok(CpuLayers::Auto),
            n => n.parse().map(CpuLayers::Count).map_err(|_| {
                Error::Invalid(format!(
                    "--cpu-layers takes auto or a number of layers, not {text:?}"
                ))
            }),
        }
    }

    pub fn name(self) -> String {
        match self {
            CpuLayers::Auto => "auto".into(),
            CpuLayers::Count(n) => n.to_string(),
        }
    }
}

/// The CPU side of a hybrid plan.
pub(super) struct Hybrid<'w> {
    cpu: CpuModel<'w>,
    isa: fast::Isa,
    roles: Vec<LayerRole>,
    segments: Vec<Segment>,
    /// The CPU layers' keys and values; cache layer `cache_layer[l]` holds model layer `l`.
    cache: KvCache,
    cache_layer: Vec<Option<usize>>,
    /// Positions whose CPU-layer keys and values the host cache holds, and the GPU caches hold.
    cpu_valid: usize,
    gpu_valid: usize,
    /// Read-back of the hidden state (one row).
    hidden: wgpu::Buffer,
    costs: HybridCosts,
    expected_s: f64,
    streaming_s: f64,
}

impl Hybrid<'_> {
    pub(super) fn truncate(&mut self, len: usize) {
        self.cpu_valid = self.cpu_valid.min(len);
        self.gpu_valid = self.gpu_valid.min(len);
    }

    fn cpu_layers(&self) -> usize {
        self.cache.layers()
    }
}

/// The first GPU segment after segment `i`.
fn next_gpu(segments: &[Segment], i: usize) -> Option<&std::ops::Range<usize>> {
    segments[i + 1..].iter().find_map(|s| match s {
        Segment::Gpu(r) => Some(r),
        Segment::Cpu(_) => None,
    })
}

impl<'w> GpuModel<'w> {
    /// Decides the CPU layers (after the buffers are built): nothing to decide when every layer
    /// is resident, with several KV slots (batched decode needs every layer on the GPU), when
    /// decode steps read streamed layers from host memory (no ring copies to hide) or with
    /// `--cpu-layers 0`.
    pub(super) fn plan_hybrid(&mut self) -> Result<()> {
        let non_resident = self.plan.streamed_layers();
        if non_resident == 0
            || self.opts.kv_slots > 1
            || self.opts.decode_reads != super::StreamRead::Ring
            || self.opts.cpu_layers == CpuLayers::Count(0)
        {
            return Ok(());
        }
        let isa = fast::Isa::best();
        let cpu = CpuModel::fast(self.weights, isa)?;
        let hidden = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("hidden state read-back"),
            size: f32_bytes(self.config.hidden_size),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let costs = self.measure_costs(&cpu, &hidden)?;
        let (layers, resident, slots) = (
            self.plan.layers,
            self.plan.resident_layers,
            self.plan.ring_slots,
        );
        let expect = |n| {
            hybrid::expected_step_seconds(
                &hybrid::layout(layers, resident, slots, n),
                slots,
                &costs,
            )
        };
        let count = match self.opts.cpu_layers {
            CpuLayers::Auto => hybrid::best_cpu_layers(layers, resident, slots, &costs).0,
            CpuLayers::Count(n) => n.min(non_resident),
        };
        let roles = hybrid::layout(layers, resident, slots, count);
        let mut cache_layer = vec![None; layers];
        let cpu_ls = (0..layers).filter(|&l| roles[l] == LayerRole::Cpu);
        for (j, l) in cpu_ls.enumerate() {
            cache_layer[l] = Some(j);
        }
        let hybrid = Hybrid {
            cache: cpu
                .new_layers_cache(count, self.opts.ctx_size)
                .with_f16_values(),
            cpu,
            isa,
            segments: hybrid::segments(&roles),
            roles,
            cache_layer,
            cpu_valid: 0,
            gpu_valid: 0,
            hidden,
            costs,
            expected_s: expect(count),
            streaming_s: expect(0),
        };
        self.hybrid_note = Some(hybrid_note(&hybrid));
        self.hybrid = (count > 0).then_some(hybrid);
        Ok(())
    }

    /// What the decode plan is, with the measured costs (printed by `run`, `serve`, `bench`).
    pub fn hybrid_note(&self) -> Option<&str> {
        self.hybrid_note.as_deref()
    }

    /// Layers of a decode step that run on the CPU (0 without a hybrid plan).
    pub fn cpu_layers(&self) -> usize {
        self.hybrid.as_ref().map_or(0, Hybrid::cpu_layers)
    }

    /// The best of three timings after a first run.
    fn best_time(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        f()?;
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let t = Instant::now();
            f()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best)
    }

    /// Times a streamed layer's copy into the ring, its decode step on the GPU and on the CPU,
    /// and a hand-off of the hidden state, each alone.
    fn measure_costs(&self, cpu: &CpuModel, hidden: &wgpu::Buffer) -> Result<HybridCosts> {
        let l = self.plan.resident_layers;
        let gpu = self.gpu;
        let submit_and_wait = |enc: wgpu::CommandEncoder| {
            gpu.queue.submit([enc.finish()]);
            gpu.wait()
        };
        let copy_layer_s = Self::best_time(|| {
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            self.copy_to_ring(&mut enc, l);
            submit_and_wait(enc)
        })?;
        self.stage_chunk(&[0])?;
        // The layer's weights are in its ring slot (copied above): the kernels alone, once and
        // four times in one submission, so that a submission's own cost is not counted per layer.
        let layers_s = |n: usize| {
            Self::best_time(|| {
                let mut enc = gpu.device.create_command_encoder(&Default::default());
                for _ in 0..n {
                    self.encode_layer(&mut enc, l, true);
                }
                submit_and_wait(enc)
            })
        };
        let (one, four) = (layers_s(1)?, layers_s(4)?);
        let gpu_layer_s = ((four - one) / 3.0).max(0.0);
        let handoff_s = Self::best_time(|| {
            let x = self.read_hidden(hidden)?;
            self.gpu
                .queue
                .write_buffer(&self.act.x, 0, bytemuck::cast_slice(&x));
            Ok(())
        })?;
        // A hand-off also ends a GPU segment early: one more submission waited for.
        let handoff_s = handoff_s + (one - gpu_layer_s).max(0.0);
        let mut cache = cpu.new_layers_cache(1, 1);
        let h = self.config.hidden_size;
        let cpu_layer_s = Self::best_time(|| {
            let mut x: Vec<f32> = (0..h).map(|i| ((i % 7) as f32 - 3.0) * 0.1).collect();
            cpu.decode_layers(l..l + 1, 0, &mut cache, 0, &mut x)
        })?;
        Ok(HybridCosts {
            cpu_layer_s,
            copy_layer_s,
            gpu_layer_s,
            handoff_s,
        })
    }

    /// Records layer `l`'s decode dispatches in a pass of their own, after its copy into the ring
    /// unless `prefetched`.
    fn encode_layer(&self, enc: &mut wgpu::CommandEncoder, l: usize, prefetched: bool) {
        if !prefetched {
            self.copy_to_ring(enc, l);
        }
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("layer"),
            timestamp_writes: None,
        });
        for d in &self.decode_layers[l] {
            d.encode(&mut pass);
        }
    }

    /// Copies row 0 of `act.x` to the host, waiting only for the work submitted so far.
    fn read_hidden(&self, hidden: &wgpu::Buffer) -> Result<Vec<f32>> {
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&self.act.x, 0, hidden, 0, hidden.size());
        let index = self.gpu.queue.submit([enc.finish()]);
        let bytes = self
            .gpu
            .map_and_read_after(hidden, hidden.size(), Some(index))?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Queues the copies of the streamed layers at the start of `range` into their ring slots
    /// (as many as have distinct slots), marking them in `prefetched`.
    fn prefetch(&self, range: &std::ops::Range<usize>, prefetched: &mut [bool]) {
        let mut used = vec![false; self.ring.len()];
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        let mut copies = 0;
        for l in range.clone() {
            let LayerHome::Streamed { slot, .. } = &self.homes[l] else {
                continue;
            };
            if used[*slot] {
                break;
            }
            used[*slot] = true;
            self.copy_to_ring(&mut enc, l);
            prefetched[l] = true;
            copies += 1;
        }
        if copies > 0 {
            self.gpu.queue.submit([enc.finish()]);
        }
    }

    /// One decode step of `token` under the hybrid plan at the position (which the caller then
    /// advances), leaving the logits in `act.logits` and, with `sample`, the sampled token in the
    /// read-back buffer.
    pub(super) fn decode_hybrid(&mut self, token: u32, sample: bool) -> Result<()> {
        let Some(mut hy) = self.hybrid.take() else {
            return Err(Error::Invalid("no hybrid plan".into()));
        };
        let result = self.decode_hybrid_with(&mut hy, token, sample);
        self.hybrid = Some(hy);
        result
    }

    fn decode_hybrid_with(&mut self, hy: &mut Hybrid<'w>, token: u32, sample: bool) -> Result<()> {
        self.kv_to_host(hy)?;
        let pos = self.position;
        self.stage_chunk(&[token])?;
        let mut prefetched = vec![false; self.plan.layers];
        // The hidden state, while it is on the host.
        let mut x: Option<Vec<f32>> = None;
        let last = hy.segments.len() - 1;
        for (i, seg) in hy.segments.iter().enumerate() {
            match seg {
                Segment::Gpu(range) => {
                    if let Some(v) = x.take() {
                        let bytes = bytemuck::cast_slice(&v);
                        self.gpu.queue.write_buffer(&self.act.x, 0, bytes);
                    }
                    let mut enc = self.gpu.device.create_command_encoder(&Default::default());
                    for l in range.clone() {
                        self.encode_layer(&mut enc, l, prefetched[l]);
                    }
                    if i == last {
                        self.encode_head(&mut enc, true, 1, sample);
                        self.gpu.queue.submit([enc.finish()]);
                        continue;
                    }
                    self.gpu.queue.submit([enc.finish()]);
                    let v = self.read_hidden(&hy.hidden)?;
                    if let Some(next) = next_gpu(&hy.segments, i) {
                        self.prefetch(next, &mut prefetched);
                    }
                    x = Some(v);
                }
                Segment::Cpu(range) => {
                    let mut v = match x.take() {
                        Some(v) => v,
                        None => {
                            // The step starts on the CPU: queue the first GPU segment's copies.
                            if let Some(next) = next_gpu(&hy.segments, i) {
                                self.prefetch(next, &mut prefetched);
                            }
                            let mut v = vec![0.0; self.config.hidden_size];
                            self.weights.embedding_row(token, &mut v)?;
                            v
                        }
                    };
                    let first = hy.cache_layer[range.start].unwrap_or(0);
                    hy.cpu
                        .decode_layers(range.clone(), first, &mut hy.cache, pos, &mut v)?;
                    if i == last {
                        self.gpu
                            .queue
                            .write_buffer(&self.act.x, 0, bytemuck::cast_slice(&v));
                        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
                        self.encode_head(&mut enc, true, 1, sample);
                        self.gpu.queue.submit([enc.finish()]);
                    } else {
                        x = Some(v);
                    }
                }
            }
        }
        hy.cpu_valid = pos + 1;
        Ok(())
    }

    /// Brings the host's CPU-layer cache up to the position (after prompt chunks ran on the GPU).
    fn kv_to_host(&self, hy: &mut Hybrid<'w>) -> Result<()> {
        let (from, to) = (hy.cpu_valid, self.position);
        if from >= to {
            return Ok(());
        }
        let (kv_heads, hd) = (self.config.num_kv_heads(), self.config.head_dim());
        let run = self.kv_head_bytes(0, from, to).1; // bytes of one head's positions
        let size = 2 * kv_heads as u64 * run;
        let staging = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("cpu layers' kv read-back"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        for l in 0..self.plan.layers {
            let Some(j) = hy.cache_layer[l] else {
                continue;
            };
            let mut enc = self.gpu.device.create_command_encoder(&Default::default());
            let (k, v) = (&self.kv[l].0, &self.kv[l].1);
            for (side, buf) in [k, v].into_iter().enumerate() {
                for h in 0..kv_heads {
                    let src = self.kv_head_bytes(h, from, to).0;
                    let dst = (side * kv_heads + h) as u64 * run;
                    enc.copy_buffer_to_buffer(buf, src, &staging, dst, run);
                }
            }
            self.gpu.queue.submit([enc.finish()]);
            let bytes = self.gpu.map_and_read(&staging, size)?;
            let halves: Vec<u16> = bytemuck::pod_collect_to_vec(&bytes);
            let value = |side: usize, h: usize, p: usize, i: usize| {
                let at = ((side * kv_heads + h) * (to - from) + p) * hd + i;
                half::f16::from_bits(halves[at]).to_f32()
            };
            for p in 0..to - from {
                let row = |side| -> Vec<f32> {
                    (0..kv_heads * hd)
                        .map(|e| value(side, e / hd, p, e % hd))
                        .collect()
                };
                hy.cache.put(j, from + p, &row(0), &row(1));
            }
        }
        hy.cpu_valid = to;
        hy.cache.set_len(to);
        Ok(())
    }

    /// Brings the GPU's caches of the CPU layers up to the position, before work that runs every
    /// layer on the GPU (prompt chunks); the caller then marks them valid with [`Self::gpu_wrote_kv`].
    pub(super) fn kv_to_gpu(&mut self) -> Result<()> {
        let Some(hy) = self.hybrid.as_ref() else {
            return Ok(());
        };
        let (from, to) = (hy.gpu_valid, self.position.min(hy.cpu_valid));
        if from >= to {
            return Ok(());
        }
        let (kv_heads, hd) = (self.config.num_kv_heads(), self.config.head_dim());
        for l in 0..self.plan.layers {
            let Some(j) = hy.cache_layer[l] else {
                continue;
            };
            let keys = &hy.cache.keys(j, to)[from * kv_heads * hd..];
            let values = &hy.cache.values(j, to)[from * kv_heads * hd..];
            for (buf, data) in [(&self.kv[l].0, keys), (&self.kv[l].1, values)] {
                for h in 0..kv_heads {
                    let head: Vec<u16> = (0..to - from)
                        .flat_map(|p| (0..hd).map(move |i| (p, i)))
                        .map(|(p, i)| {
                            half::f16::from_f32(data[p * kv_heads * hd + h * hd + i]).to_bits()
                        })
                        .collect();
                    let at = self.kv_head_bytes(h, from, to).0;
                    self.gpu
                        .queue
                        .write_buffer(buf, at, bytemuck::cast_slice(&head));
                }
            }
        }
        if let Some(hy) = self.hybrid.as_mut() {
            hy.gpu_valid = hy.gpu_valid.max(to);
        }
        Ok(())
    }

    /// After work that ran every layer on the GPU up to the position.
    pub(super) fn gpu_wrote_kv(&mut self) {
        if let Some(hy) = self.hybrid.as_mut() {
            hy.gpu_valid = self.position;
        }
    }

    /// After `skip_to`: every position counts as written on both sides (bench depths).
    pub(super) fn kv_skipped_to(&mut self) {
        if let Some(hy) = self.hybrid.as_mut() {
            (hy.gpu_valid, hy.cpu_valid) = (self.position, self.position);
            hy.cache.set_len(self.position);
        }
    }
}

/// The plan and the costs behind it, in one line.
fn hybrid_note(hy: &Hybrid) -> String {
    let c = &hy.costs;
    let ms = |s: f64| s * 1e3;
    let streamed = hy
        .roles
        .iter()
        .filter(|&&r| r == LayerRole::Streamed)
        .count();
    format!(
        "decode: {} layer(s) on the CPU ({}, {} threads), {streamed} streamed; measured per layer: CPU {:.2} ms, copy {:.2} ms, GPU {:.2} ms, hand-off {:.2} ms; expected layer time per token {:.1} ms, at most {:.1} tok/s ({:.1} ms streaming them all)",
        hy.cpu_layers(),
        hy.isa.name(),
        rayon::current_num_threads(),
        ms(c.cpu_layer_s),
        ms(c.copy_layer_s),
        ms(c.gpu_layer_s),
        ms(c.handoff_s),
        ms(hy.expected_s),
        1.0 / hy.expected_s,
        ms(hy.streaming_s),
    )
}

#[cfg(test)]
mod tests {
    use super::CpuLayers;

    #[test]
    fn cpu_layers_parse_auto_and_counts_and_name_bad_input() {
        assert_eq!(CpuLayers::parse("auto").ok(), Some(CpuLayers::Auto));
        assert_eq!(CpuLayers::parse(" 12 ").ok(), Some(CpuLayers::Count(12)));
        assert_eq!(CpuLayers::parse("0").ok(), Some(CpuLayers::Count(0)));
        for bad in ["", "-1", "half", "1.5"] {
            let err = CpuLayers::parse(bad).err().map(|e| e.to_string());
            assert!(
                err.as_deref().is_some_and(|e| e.contains("--cpu-layers")),
                "{bad:?}: {err:?}"
            );
        }
        assert_eq!(CpuLayers::Count(7).name(), "7");
    }
}
