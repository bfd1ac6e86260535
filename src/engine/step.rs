//! What a decode step and a prompt chunk are: per layer, a short list of named operations
//! (norm, q|k|v, RoPE and KV write, attention, o, norm, gate|up, SwiGLU, down), each bound once
//! at load to its kernels and buffers. The decode step comes in two forms (int8 or f32
//! activations, see ARCHITECTURE.md); the prompt chunk is one. Every dispatch is labelled with
//! its role for `bench --profile`. Buffers live in `GpuModel`; recording is in `engine.rs`.

use super::{Activations, DecodeFusion, LayerSmall};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::gpu::Gpu;
use crate::kernels::attention::{Attention, AttentionDispatches};
use crate::kernels::gemm_q4::GemmQ4;
use crate::kernels::gemv_q4::{Epilogue, GemvInput, GemvOptions, GemvQ4};
use crate::kernels::gemv_q4_q8::{BatchIo, GemvQ4Q8, Q8Input, RopeKvOut};
use crate::kernels::quant_act::{ActInput, ActQ8Buffers, QuantAct};
use crate::kernels::rmsnorm::RmsNorm;
use crate::kernels::rope_kv::RopeKv;
use crate::kernels::swiglu::SwiGlu;
use crate::kernels::{BufRange, Dispatch, Q4Ref};
use crate::quant::DecodeActivations;
use crate::scheduler::{LayerPack, PackedMatrix};

/// The int8 decode path's kernels and its one quantized-input buffer (every projection's input
/// in turn).
pub(super) struct Int8Kernels {
    quant: QuantAct,
    gemv: GemvQ4Q8,
    input: ActQ8Buffers,
}

/// Every kernel a step uses.
pub(super) struct StepKernels {
    gemv: GemvQ4,
    gemm: GemmQ4,
    norm: RmsNorm,
    rope: RopeKv,
    swiglu: SwiGlu,
    attention: Attention,
    int8: Option<Int8Kernels>,
}

/// What every layer's operations share: the model's shape, the activations, the per-step
/// uniform, RoPE's frequencies, the packed-layer layout and the step's choices.
pub(super) struct Shared<'a> {
    pub gpu: &'a Gpu,
    pub config: &'a ModelConfig,
    pub act: &'a Activations,
    pub step: &'a wgpu::Buffer,
    pub inv_freq: &'a wgpu::Buffer,
    pub pack: &'a LayerPack,
    pub ctx: usize,
    /// Rows of a prompt chunk.
    pub chunk: usize,
    pub fusion: DecodeFusion,
}

/// What a batched decode step's operations bind besides the one-sequence step's: the rows
/// uniform, how many rows are bound, the columns the GEMVs are compiled for (at most `rows`),
/// the quantized inputs of every row, and the slots' caches.
pub(super) struct BatchBinds<'a> {
    pub rows_buf: &'a wgpu::Buffer,
    pub rows: usize,
    pub cols: usize,
    pub input: &'a ActQ8Buffers,
    pub slots: usize,
}

/// One layer's own buffers: where each phase reads its weights, its norms and biases, its cache.
pub(super) struct LayerBuffers<'a> {
    pub decode_weights: &'a wgpu::Buffer,
    pub prompt_weights: &'a wgpu::Buffer,
    pub small: &'a LayerSmall,
    pub k_cache: &'a wgpu::Buffer,
    pub v_cache: &'a wgpu::Buffer,
}

impl LayerSmall {
    /// The quantizer inputs of the attention norm and the MLP norm (int8 steps).
    fn norm_inputs(&self, eps: f32) -> (ActInput<'_>, ActInput<'_>) {
        let norm = |weight| ActInput::RmsNorm { weight, eps };
        (norm(&self.input_norm), norm(&self.post_norm))
    }
}

fn role(name: &str, dispatches: Vec<Dispatch>) -> Vec<Dispatch> {
    dispatches.into_iter().map(|d| d.with_role(name)).collect()
}

fn packed_in<'b>(buf: &'b wgpu::Buffer, p: &PackedMatrix) -> Q4Ref<'b> {
    Q4Ref {
        rows: p.rows,
        cols: p.cols,
        qweight: BufRange {
            buffer: buf,
            offset: p.qweight_offset,
            size: p.qweight_bytes,
        },
        scales: BufRange {
            buffer: buf,
            offset: p.scales_offset,
            size: p.scales_bytes.next_multiple_of(4),
        },
    }
}

impl StepKernels {
    pub fn new(gpu: &Gpu, c: &ModelConfig, activations: DecodeActivations) -> Result<Self> {
        let int8 = match activations {
            DecodeActivations::Int8 => Some(Int8Kernels {
                quant: QuantAct::new(gpu)?,
                gemv: GemvQ4Q8::new(gpu)?,
                input: ActQ8Buffers::new(
                    gpu,
                    "decode input",
                    c.hidden_size.max(c.q_dim()).max(c.intermediate_size),
                ),
            }),
            DecodeActivations::F32 => None,
        };
        Ok(StepKernels {
            gemv: GemvQ4::new(gpu)?,
            gemm: GemmQ4::new(gpu)?,
            norm: RmsNorm::new(gpu)?,
            rope: RopeKv::new(gpu)?,
            swiglu: SwiGlu::new(gpu)?,
            attention: Attention::new(gpu)?,
            int8,
        })
    }

    /// The int8 kernels, which the batched step needs.
    fn batch_int8(&self) -> Result<&Int8Kernels> {
        self.int8.as_ref().ok_or_else(|| {
            crate::error::Error::Invalid("the batched decode step needs int8 activations".into())
        })
    }

    /// Buffers the int8 path owns (kept alive with the model).
    pub fn buffers(&self) -> Vec<wgpu::Buffer> {
        self.int8
            .iter()
            .flat_map(|k| [k.input.words.clone(), k.input.scales.clone()])
            .collect()
    }

    /// One layer's decode step and prompt chunk.
    pub fn layer(&self, sh: &Shared, l: &LayerBuffers) -> Result<(Vec<Dispatch>, Vec<Dispatch>)> {
        let c = sh.config;
        let attn = self.attention.bind(
            sh.gpu,
            &sh.act.q,
            l.k_cache,
            l.v_cache,
            &sh.act.attn,
            c.num_attention_heads,
            c.num_kv_heads(),
            c.head_dim(),
            sh.ctx,
            sh.chunk,
            sh.step,
        )?;
        let decode = match &self.int8 {
            Some(k8) => self.decode_int8(k8, sh, l, &attn)?,
            None => self.decode_f32(sh, l, &attn)?,
        };
        Ok((decode, self.prompt_chunk(sh, l, &attn)?))
    }

    /// RoPE of q and k and the KV-cache write, for steps of up to `tokens` tokens.
    fn rope_kv(&self, sh: &Shared, l: &LayerBuffers, tokens: usize) -> Result<Dispatch> {
        let c = sh.config;
        self.rope.bind(
            sh.gpu,
            &sh.act.qkv,
            sh.inv_freq,
            &sh.act.q,
            l.k_cache,
            l.v_cache,
            c.num_attention_heads,
            c.num_kv_heads(),
            c.head_dim(),
            sh.ctx,
            tokens,
            sh.step,
        )
    }

    /// The decode step with int8 activations.
    fn decode_int8(
        &self,
        k8: &Int8Kernels,
        sh: &Shared,
        l: &LayerBuffers,
        attn: &AttentionDispatches,
    ) -> Result<Vec<Dispatch>> {
        let (c, a, w, s, fuse) = (sh.config, sh.act, sh.pack, l.small, sh.fusion);
        let weights = |p: &PackedMatrix| packed_in(l.decode_weights, p);
        let eps = c.rms_norm_eps;
        let (h, q_dim, ffn) = (c.hidden_size, c.q_dim(), c.intermediate_size);
        let (input_norm, post_norm) = s.norm_inputs(eps);
        let (qkv_bias, o_bias) = (
            s.qkv_bias.as_ref().map(BufRange::whole),
            s.o_bias.as_ref().map(BufRange::whole),
        );
        let (store, add) = (Epilogue::Store, Epilogue::Accumulate);
        let p = |name, fused, input, x, k, m, out, bias, mode| {
            project_int8(
                k8,
                sh.gpu,
                Projection {
                    name,
                    fused,
                    input,
                    x,
                    k,
                    m,
                    out,
                    bias,
                    mode,
                    rope: None,
                },
            )
        };
        let rope = RopeKvOut {
            inv_freq: sh.inv_freq,
            q_out: &a.q,
            k_cache: l.k_cache,
            v_cache: l.v_cache,
            step: sh.step,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_kv_heads(),
            head_dim: c.head_dim(),
            ctx: sh.ctx,
        };
        // RoPE in the qkv GEMV where its workgroups can take whole RoPE pairs (else a dispatch).
        let rope_kv = fuse.rope_kv && k8.gemv.rope_kv_fits(sh.gpu, &weights(&w.qkv), c.head_dim());
        let qkv = Projection {
            name: "qkv",
            fused: fuse.input_norm,
            input: input_norm,
            x: &a.x,
            k: h,
            m: weights(&w.qkv),
            out: &a.qkv,
            bias: qkv_bias,
            mode: store,
            rope: rope_kv.then_some(&rope),
        };
        let mut ops = project_int8(k8, sh.gpu, qkv)?;
        if !rope_kv {
            ops.extend(role("rope + kv write", vec![self.rope_kv(sh, l, 1)?]));
        }
        let combine_q8 = match fuse.attention_combine {
            true => self.attention.decode_q8_output(sh.gpu, attn, &k8.input)?,
            false => None,
        };
        if let Some(ds) = combine_q8 {
            // The combine wrote the o projection's int8 input.
            ops.extend(role("attention, o input (int8) in the combine", ds));
            let o = k8.gemv.bind(
                sh.gpu,
                weights(&w.o),
                Q8Input::Quantized(&k8.input),
                BufRange::whole(&a.x),
                o_bias,
                add,
                &GemvOptions::default(),
            )?;
            ops.extend(role("o (+residual)", o));
        } else {
            ops.extend(role("attention", attn.decode.clone()));
            ops.extend(p(
                "o (+residual)",
                fuse.attention_output,
                ActInput::Plain,
                &a.attn,
                q_dim,
                weights(&w.o),
                &a.x,
                o_bias,
                add,
            )?);
        }
        ops.extend(p(
            "gate|up",
            fuse.post_norm,
            post_norm,
            &a.x,
            h,
            weights(&w.gate_up),
            &a.gate_up,
            None,
            store,
        )?);
        ops.extend(p(
            "down (+residual)",
            fuse.swiglu,
            ActInput::SwiGlu,
            &a.gate_up,
            ffn,
            weights(&w.down),
            &a.x,
            None,
            add,
        )?);
        Ok(ops)
    }

    /// The decode step with f32 activations.
    fn decode_f32(
        &self,
        sh: &Shared,
        l: &LayerBuffers,
        attn: &AttentionDispatches,
    ) -> Result<Vec<Dispatch>> {
        let (a, w, s, fuse) = (sh.act, sh.pack, l.small, sh.fusion);
        let weights = |p: &PackedMatrix| packed_in(l.decode_weights, p);
        let whole = BufRange::whole;
        let qkv_bias = s.qkv_bias.as_ref().map(whole);
        let mut ops = self.normed_f32(
            sh,
            "qkv",
            fuse.input_norm,
            &s.input_norm,
            weights(&w.qkv),
            &a.qkv,
            qkv_bias,
        )?;
        ops.extend(role("rope + kv write", vec![self.rope_kv(sh, l, 1)?]));
        ops.extend(role("attention", attn.decode.clone()));
        let o = self.gemv.bind(
            sh.gpu,
            weights(&w.o),
            whole(&a.attn),
            whole(&a.x),
            s.o_bias.as_ref().map(whole),
            Epilogue::Accumulate,
        )?;
        ops.extend(role("o (+residual)", o));
        ops.extend(self.normed_f32(
            sh,
            "gate|up",
            fuse.post_norm,
            &s.post_norm,
            weights(&w.gate_up),
            &a.gate_up,
            None,
        )?);
        let down = weights(&w.down);
        if fuse.swiglu {
            let ds = self.gemv.bind_input(
                sh.gpu,
                down,
                whole(&a.gate_up),
                whole(&a.x),
                None,
                Epilogue::Accumulate,
                GemvInput::SwiGlu,
            )?;
            ops.extend(role("swiglu + down (+residual)", ds));
        } else {
            let ffn = sh.config.intermediate_size;
            ops.extend(role(
                "swiglu",
                vec![self
                    .swiglu
                    .bind(sh.gpu, &a.gate_up, &a.act, ffn, 1, sh.step)?],
            ));
            let ds = self.gemv.bind(
                sh.gpu,
                down,
                whole(&a.act),
                whole(&a.x),
                None,
                Epilogue::Accumulate,
            )?;
            ops.extend(role("down (+residual)", ds));
        }
        Ok(ops)
    }

    /// An f32 projection of the normalised residual stream, with its norm fused or before it.
    #[allow(clippy::too_many_arguments)]
    fn normed_f32(
        &self,
        sh: &Shared,
        name: &str,
        fused: bool,
        norm_weight: &wgpu::Buffer,
        m: Q4Ref,
        out: &wgpu::Buffer,
        bias: Option<BufRange>,
    ) -> Result<Vec<Dispatch>> {
        let (a, eps, h) = (sh.act, sh.config.rms_norm_eps, sh.config.hidden_size);
        let out = BufRange::whole(out);
        if fused {
            let input = GemvInput::RmsNorm {
                weight: BufRange::whole(norm_weight),
                eps,
            };
            let ds = self.gemv.bind_input(
                sh.gpu,
                m,
                BufRange::whole(&a.x),
                out,
                bias,
                Epilogue::Store,
                input,
            )?;
            return Ok(role(&format!("norm + {name}"), ds));
        }
        let n = self
            .norm
            .bind(sh.gpu, &a.x, norm_weight, &a.h, h, eps, 1, sh.step)?;
        let mut ops = role("norm", vec![n]);
        ops.extend(role(
            name,
            self.gemv
                .bind(sh.gpu, m, BufRange::whole(&a.h), out, bias, Epilogue::Store)?,
        ));
        Ok(ops)
    }

    /// The batched decode step: the int8 step's operations for `b.rows` sequences, each weight
    /// read once for all; RoPE, the KV write and attention per row in its slot's cache region
    /// (`caches`). No fusions: the batched GEMV takes only quantized inputs.
    pub fn batch_layer(
        &self,
        sh: &Shared,
        l: &LayerBuffers,
        b: &BatchBinds,
        caches: &(wgpu::Buffer, wgpu::Buffer),
    ) -> Result<Vec<Dispatch>> {
        let k8 = self.batch_int8()?;
        let (c, a, w, s, gpu) = (sh.config, sh.act, sh.pack, l.small, sh.gpu);
        let weights = |p: &PackedMatrix| packed_in(l.decode_weights, p);
        let eps = c.rms_norm_eps;
        let (h, q_dim, ffn) = (c.hidden_size, c.q_dim(), c.intermediate_size);
        let heads = (c.num_attention_heads, c.num_kv_heads(), c.head_dim());
        let quantize = |name: &str, input, x: &wgpu::Buffer, k| -> Result<Vec<Dispatch>> {
            let d = k8.quant.bind_rows(gpu, input, x, k, b.rows, b.input)?;
            Ok(role(&format!("{name} input (int8, batched)"), vec![d]))
        };
        let project = |name: &str,
                       m: &PackedMatrix,
                       y: &wgpu::Buffer,
                       bias: Option<&wgpu::Buffer>,
                       mode| {
            let io = BatchIo {
                x: b.input,
                y,
                y_stride: m.rows,
                cols: b.cols,
                batch: b.rows_buf,
            };
            let bias = bias.map(BufRange::whole);
            let ds =
                k8.gemv
                    .bind_batch(gpu, weights(m), &io, bias, mode, &GemvOptions::default())?;
            Ok::<_, crate::error::Error>(role(&format!("{name} (batched)"), ds))
        };
        let (input_norm, post_norm) = s.norm_inputs(eps);
        let (store, add) = (Epilogue::Store, Epilogue::Accumulate);
        let mut ops = quantize("qkv", input_norm, &a.x, h)?;
        ops.extend(project("qkv", &w.qkv, &a.qkv, s.qkv_bias.as_ref(), store)?);
        let (kc, vc) = (&caches.0, &caches.1);
        let rope = self.rope.bind_batch(
            gpu,
            &a.qkv,
            sh.inv_freq,
            &a.q,
            kc,
            vc,
            heads,
            sh.ctx,
            b.slots,
            b.rows,
            b.rows_buf,
        )?;
        ops.extend(role("rope + kv write (batched)", vec![rope]));
        let attn = self.attention.bind_batch_decode(
            gpu,
            &a.q,
            [kc, vc],
            &a.attn,
            heads,
            sh.ctx,
            b.slots,
            b.rows,
            b.rows_buf,
        )?;
        ops.extend(role("attention (batched)", attn));
        ops.extend(quantize("o", ActInput::Plain, &a.attn, q_dim)?);
        ops.extend(project(
            "o (+residual)",
            &w.o,
            &a.x,
            s.o_bias.as_ref(),
            add,
        )?);
        ops.extend(quantize("gate|up", post_norm, &a.x, h)?);
        ops.extend(project("gate|up", &w.gate_up, &a.gate_up, None, store)?);
        ops.extend(quantize("down", ActInput::SwiGlu, &a.gate_up, ffn)?);
        ops.extend(project("down (+residual)", &w.down, &a.x, None, add)?);
        Ok(ops)
    }

    /// The batched step's final norm and lm_head: `b.rows` rows of logits, `stride` apart.
    pub fn batch_head(
        &self,
        sh: &Shared,
        lm: Q4Ref,
        final_norm: &wgpu::Buffer,
        b: &BatchBinds,
        logits: &wgpu::Buffer,
        stride: usize,
    ) -> Result<Vec<Dispatch>> {
        let k8 = self.batch_int8()?;
        let (gpu, c) = (sh.gpu, sh.config);
        let input = ActInput::RmsNorm {
            weight: final_norm,
            eps: c.rms_norm_eps,
        };
        let quantize = k8
            .quant
            .bind_rows(gpu, input, &sh.act.x, c.hidden_size, b.rows, b.input)?;
        let mut ops = role("final norm (int8, batched)", vec![quantize]);
        let io = BatchIo {
            x: b.input,
            y: logits,
            y_stride: stride,
            cols: b.cols,
            batch: b.rows_buf,
        };
        let store = Epilogue::Store;
        let ds = k8
            .gemv
            .bind_batch(gpu, lm, &io, None, store, &GemvOptions::default())?;
        ops.extend(role("lm_head (batched)", ds));
        Ok(ops)
    }

    /// The prompt chunk: the same operations over up to `chunk` tokens, through the GEMM.
    fn prompt_chunk(
        &self,
        sh: &Shared,
        l: &LayerBuffers,
        attn: &AttentionDispatches,
    ) -> Result<Vec<Dispatch>> {
        let (c, a, w, s, m, gpu) = (sh.config, sh.act, sh.pack, l.small, sh.chunk, sh.gpu);
        let weights = |p: &PackedMatrix| packed_in(l.prompt_weights, p);
        let (eps, h, ffn) = (c.rms_norm_eps, c.hidden_size, c.intermediate_size);
        let gemm = |p: &PackedMatrix,
                    x: &wgpu::Buffer,
                    y: &wgpu::Buffer,
                    bias: Option<&wgpu::Buffer>,
                    mode| {
            let bias = bias.map(BufRange::whole);
            self.gemm.bind(
                gpu,
                weights(p),
                BufRange::whole(x),
                BufRange::whole(y),
                bias,
                mode,
                m,
                sh.step,
            )
        };
        let mut ops = vec![self
            .norm
            .bind(gpu, &a.x, &s.input_norm, &a.h, h, eps, m, sh.step)?];
        ops.extend(gemm(
            &w.qkv,
            &a.h,
            &a.qkv,
            s.qkv_bias.as_ref(),
            Epilogue::Store,
        )?);
        ops.push(self.rope_kv(sh, l, m)?);
        ops.extend(attn.prefill.iter().cloned());
        ops.extend(gemm(
            &w.o,
            &a.attn,
            &a.x,
            s.o_bias.as_ref(),
            Epilogue::Accumulate,
        )?);
        ops.push(
            self.norm
                .bind(gpu, &a.x, &s.post_norm, &a.h, h, eps, m, sh.step)?,
        );
        ops.extend(gemm(&w.gate_up, &a.h, &a.gate_up, None, Epilogue::Store)?);
        ops.push(self.swiglu.bind(gpu, &a.gate_up, &a.act, ffn, m, sh.step)?);
        ops.extend(gemm(&w.down, &a.act, &a.x, None, Epilogue::Accumulate)?);
        Ok(ops)
    }

    /// The heads: the decode step's final norm and lm_head (row 0), and the prompt chunk's final
    /// norm of every row and lm_head of the last one (copied to `act.last` in between).
    pub fn heads(
        &self,
        sh: &Shared,
        lm: Q4Ref,
        final_norm: &wgpu::Buffer,
    ) -> Result<(Vec<Dispatch>, Dispatch, Vec<Dispatch>)> {
        let (a, gpu, whole) = (sh.act, sh.gpu, BufRange::whole);
        let (eps, h) = (sh.config.rms_norm_eps, sh.config.hidden_size);
        let prefill_norm = self
            .norm
            .bind(gpu, &a.x, final_norm, &a.h, h, eps, sh.chunk, sh.step)?;
        let lm_f32 = role(
            "lm_head",
            self.gemv.bind(
                gpu,
                lm,
                whole(&a.last),
                whole(&a.logits),
                None,
                Epilogue::Store,
            )?,
        );
        let decode = match &self.int8 {
            Some(k8) => {
                let input = ActInput::RmsNorm {
                    weight: final_norm,
                    eps,
                };
                let mut ops = role(
                    "final norm (int8)",
                    vec![k8.quant.bind(gpu, input, &a.x, h, &k8.input)?],
                );
                let x = Q8Input::Quantized(&k8.input);
                let ds = k8.gemv.bind(
                    gpu,
                    lm,
                    x,
                    whole(&a.logits),
                    None,
                    Epilogue::Store,
                    &GemvOptions::default(),
                )?;
                ops.extend(role("lm_head", ds));
                ops
            }
            None => {
                let n = self
                    .norm
                    .bind(gpu, &a.x, final_norm, &a.last, h, eps, 1, sh.step)?;
                let mut ops = role("final norm", vec![n]);
                ops.extend(lm_f32.iter().cloned());
                ops
            }
        };
        Ok((decode, prefill_norm, lm_f32))
    }
}

/// An int8 projection: `m` times the `k`-value input that `input` makes of `x`, into `out`.
struct Projection<'a> {
    name: &'a str,
    /// Quantized by the GEMV as it reads x, else by a dispatch of its own.
    fused: bool,
    input: ActInput<'a>,
    x: &'a wgpu::Buffer,
    k: usize,
    m: Q4Ref<'a>,
    out: &'a wgpu::Buffer,
    bias: Option<BufRange<'a>>,
    mode: Epilogue,
    /// RoPE and the KV-cache write as the output (the qkv projection), in place of `out`.
    rope: Option<&'a RopeKvOut<'a>>,
}

fn project_int8(k8: &Int8Kernels, gpu: &Gpu, p: Projection) -> Result<Vec<Dispatch>> {
    let (y, opts) = (BufRange::whole(p.out), GemvOptions::default());
    let gemv = |x: Q8Input| match p.rope {
        Some(rope) => k8.gemv.bind_rope_kv(gpu, p.m, x, rope, p.bias, &opts),
        None => k8.gemv.bind(gpu, p.m, x, y, p.bias, p.mode, &opts),
    };
    let name = match p.rope {
        Some(_) => format!("{} + rope + kv write", p.name),
        None => p.name.to_string(),
    };
    if p.fused {
        let x = BufRange::whole(p.x);
        let q8 = match p.input {
            ActInput::Plain => Q8Input::F32(x),
            ActInput::RmsNorm { weight, eps } => Q8Input::RmsNorm { x, weight, eps },
            ActInput::SwiGlu => Q8Input::SwiGlu(x),
        };
        return Ok(role(&format!("{name}, input quantized in"), gemv(q8)?));
    }
    let quantize = k8.quant.bind(gpu, p.input, p.x, p.k, &k8.input)?;
    let mut ops = role(&format!("{} input (int8)", p.name), vec![quantize]);
    ops.extend(role(&name, gemv(Q8Input::Quantized(&k8.input))?));
    Ok(ops)
}
