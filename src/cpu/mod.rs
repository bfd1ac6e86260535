//! The CPU reference forward pass: the oracle every GPU kernel and the whole GPU model are checked
//! against. Plain f32, one readable function per block; INT4 matrices are dequantized on the fly
//! (`QView::matvec`, the same bytes the GPU reads), dense tensors are decoded once in [`CpuModel::new`].
//!
//! The model is the Qwen2 / Llama decoder with Hugging Face semantics:
//! ```text
//! x = embed(token)
//! per layer:  h = rmsnorm(x, input_layernorm)
//!             q, k, v = Wq h (+bq), Wk h (+bk), Wv h (+bv);  rope(q), rope(k) at the token's position
//!             append k, v to the cache;  a = attention(q, cache[0..=pos]);  x += Wo a (+bo)
//!             h = rmsnorm(x, post_attention_layernorm);  x += Wdown (silu(Wgate h) * Wup h)
//! logits = lm_head(rmsnorm(x, model.norm))
//! ```
//! A call processes its tokens layer by layer (all tokens through layer 0, then layer 1, ...) as a
//! GPU prefill does, so a token attends to cache entries written in the same call; causality comes
//! from each token reading only positions up to its own.

pub mod bench;
mod decoder;
pub mod fast;
pub mod ops;

pub use decoder::CpuDecoder;
pub use ops::{
    add_in_place, apply_rope, attention, dot, inverse_rms, rms_norm, silu, softmax_in_place, Heads,
};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::quant::{ActQ8, DecodeActivations, QView};
use crate::weights::{ModelWeights, Weight};
use rayon::prelude::*;

/// A linear layer: an INT4 matrix `[out, in]` and an optional bias `[out]`.
struct Linear<'a> {
    weight: QView<'a>,
    bias: Option<Vec<f32>>,
}

/// What a projection multiplies: f32 values, or int8 blocks (decode steps with int8 activations).
enum Input {
    F32(Vec<f32>),
    Int8(ActQ8),
}

impl Input {
    /// `x` as it is, quantized with `int8`.
    fn plain(x: Vec<f32>, int8: bool) -> Input {
        if int8 {
            Input::Int8(ActQ8::quantize(&x))
        } else {
            Input::F32(x)
        }
    }

    /// RMSNorm of `x` with `weight`; with `int8`, `x * weight` quantized with `1 / rms` on `d`,
    /// the spec's order (see [`ActQ8::quantize_scaled`]).
    fn normed(x: &[f32], weight: &[f32], eps: f32, int8: bool) -> Input {
        if int8 {
            let v: Vec<f32> = x.iter().zip(weight).map(|(a, w)| a * w).collect();
            Input::Int8(ActQ8::quantize_scaled(&v, inverse_rms(x, eps)))
        } else {
            let mut h = vec![0.0; x.len()];
            rms_norm(x, weight, eps, &mut h);
            Input::F32(h)
        }
    }
}

/// Which code multiplies int8 activations with INT4 weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Kernel {
    /// The scalar spec, [`QView::matvec_q8`] (one token at a time).
    Reference,
    /// [`fast::matmul`] with this instruction set: bit-identical to the spec, several tokens per
    /// pass over the weights.
    Fast(fast::Isa),
}

impl Linear<'_> {
    /// `W x (+ b)` for each input.
    fn apply_all(&self, xs: &[Input], kernel: Int8Kernel) -> Vec<Vec<f32>> {
        Linear::apply_each(&[self], xs, kernel).swap_remove(0)
    }

    /// [`apply_all`](Self::apply_all) for several linears of the same input (one parallel
    /// section on the fast kernel). Outputs: `[linear][input]`.
    fn apply_each(linears: &[&Self], xs: &[Input], kernel: Int8Kernel) -> Vec<Vec<Vec<f32>>> {
        let packed = match kernel {
            Int8Kernel::Fast(isa) => int8_inputs(xs).map(|p| (isa, p)),
            Int8Kernel::Reference => None,
        };
        let mut ys = match packed {
            Some((isa, packed)) => {
                let refs: Vec<&fast::PackedAct> = packed.iter().collect();
                let ws: Vec<&QView> = linears.iter().map(|l| &l.weight).collect();
                fast::matmul_each(isa, &ws, &refs)
            }
            None => linears
                .iter()
                .map(|l| xs.iter().map(|x| l.reference(x)).collect())
                .collect(),
        };
        for (l, y) in linears.iter().zip(&mut ys) {
            if let Some(b) = &l.bias {
                y.iter_mut().for_each(|y| add_in_place(y, b));
            }
        }
        ys
    }

    /// `W x` by the reference code, one input.
    fn reference(&self, x: &Input) -> Vec<f32> {
        let mut y = vec![0.0; self.weight.rows];
        match x {
            Input::F32(v) => self.weight.matvec(v, &mut y),
            Input::Int8(a) => self.weight.matvec_q8(a, &mut y),
        }
        y
    }
}

/// The inputs in the fast kernel's layout, if all of them are int8.
fn int8_inputs(xs: &[Input]) -> Option<Vec<fast::PackedAct>> {
    xs.iter()
        .map(|x| match x {
            Input::Int8(a) => Some(fast::PackedAct::new(a)),
            Input::F32(_) => None,
        })
        .collect()
}

struct Layer<'a> {
    input_norm: Vec<f32>,
    q: Linear<'a>,
    k: Linear<'a>,
    v: Linear<'a>,
    o: Linear<'a>,
    post_attention_norm: Vec<f32>,
    gate: Linear<'a>,
    up: Linear<'a>,
    down: Linear<'a>,
}

/// The reference model over borrowed weights. Norms and biases are decoded to f32 once.
pub struct CpuModel<'a> {
    weights: &'a ModelWeights,
    config: &'a ModelConfig,
    heads: Heads,
    inv_freq: Vec<f32>,
    layers: Vec<Layer<'a>>,
    final_norm: Vec<f32>,
    lm_head: QView<'a>,
    /// Activations of one-token calls (decode steps), as the GPU's decode step has them.
    decode_activations: DecodeActivations,
    /// Activations of calls of several tokens (prompts).
    prompt_activations: DecodeActivations,
    int8_kernel: Int8Kernel,
}

/// Keys and values of every layer, preallocated for `ctx` positions (never grown).
/// Layout: `[layer, position, kv_heads * head_dim]` for keys and for values.
#[derive(Clone, Debug)]
pub struct KvCache {
    ctx: usize,
    kv_dim: usize,
    len: usize,
    /// Keys and values are rounded to f16 as they are written (as the GPU's cache stores them).
    f16: bool,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl KvCache {
    /// Positions filled so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the cache can hold.
    pub fn ctx(&self) -> usize {
        self.ctx
    }

    /// Forgets positions from `len` on (a rejected draft, a new conversation).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Keys of `layer` at positions `0..n`, `[n, kv_dim]`.
    pub fn keys(&self, layer: usize, n: usize) -> &[f32] {
        let start = layer * self.ctx * self.kv_dim;
        &self.keys[start..start + n * self.kv_dim]
    }

    /// Values of `layer` at positions `0..n`, `[n, kv_dim]`.
    pub fn values(&self, layer: usize, n: usize) -> &[f32] {
        let start = layer * self.ctx * self.kv_dim;
        &self.values[start..start + n * self.kv_dim]
    }

    /// The same cache, rounding what is written to f16 (round to nearest even), as the GPU's
    /// cache holds it: with int8 decode activations, the f32 cache's tiny differences would move
    /// values across int8 rounding boundaries and hide the kernels' agreement.
    pub fn with_f16_values(mut self) -> Self {
        self.f16 = true;
        self
    }

    /// Layers the cache holds.
    pub fn layers(&self) -> usize {
        self.keys.len() / (self.ctx * self.kv_dim).max(1)
    }

    /// Takes positions `0..len` as filled (their entries written with [`put`](Self::put)).
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.ctx);
    }

    /// Writes the key and value of `layer` at `pos` (rounded to f16 if the cache is).
    pub fn put(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        self.write(layer, pos, k, v);
    }

    fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let start = (layer * self.ctx + pos) * self.kv_dim;
        self.keys[start..start + self.kv_dim].copy_from_slice(k);
        self.values[start..start + self.kv_dim].copy_from_slice(v);
        if self.f16 {
            let round = |x: &mut f32| *x = half::f16::from_f32(*x).to_f32();
            self.keys[start..start + self.kv_dim]
                .iter_mut()
                .for_each(round);
            self.values[start..start + self.kv_dim]
                .iter_mut()
                .for_each(round);
        }
    }
}

impl<'a> CpuModel<'a> {
    /// Checks every tensor the config calls for (presence, kind and shape) and decodes the small ones.
    pub fn new(weights: &'a ModelWeights) -> Result<Self> {
        let config = &weights.config;
        config.validate()?;
        let heads = Heads::of(config);
        let (hidden, inter) = (config.hidden_size, config.intermediate_size);
        check_embedding(weights)?;
        let linear = |name: &str, rows: usize, cols: usize, bias: bool| -> Result<Linear<'a>> {
            let weight = matrix(weights, &format!("{name}.weight"), rows, cols)?;
            let bias = if bias {
                Some(vector(weights, &format!("{name}.bias"), rows)?)
            } else {
                None
            };
            Ok(Linear { weight, bias })
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let (qkv_bias, o_bias) = (config.qkv_bias(), config.o_bias());
            layers.push(Layer {
                input_norm: vector(weights, &format!("{p}.input_layernorm.weight"), hidden)?,
                q: linear(
                    &format!("{p}.self_attn.q_proj"),
                    heads.q_dim(),
                    hidden,
                    qkv_bias,
                )?,
                k: linear(
                    &format!("{p}.self_attn.k_proj"),
                    heads.kv_dim(),
                    hidden,
                    qkv_bias,
                )?,
                v: linear(
                    &format!("{p}.self_attn.v_proj"),
                    heads.kv_dim(),
                    hidden,
                    qkv_bias,
                )?,
                o: linear(
                    &format!("{p}.self_attn.o_proj"),
                    hidden,
                    heads.q_dim(),
                    o_bias,
                )?,
                post_attention_norm: vector(
                    weights,
                    &format!("{p}.post_attention_layernorm.weight"),
                    hidden,
                )?,
                gate: linear(&format!("{p}.mlp.gate_proj"), inter, hidden, false)?,
                up: linear(&format!("{p}.mlp.up_proj"), inter, hidden, false)?,
                down: linear(&format!("{p}.mlp.down_proj"), hidden, inter, false)?,
            });
        }
        Ok(CpuModel {
            weights,
            config,
            heads,
            inv_freq: config.rope_inv_freq(),
            layers,
            final_norm: vector(weights, "model.norm.weight", hidden)?,
            lm_head: matrix(weights, "lm_head.weight", config.vocab_size, hidden)?,
            decode_activations: DecodeActivations::F32,
            prompt_activations: DecodeActivations::F32,
            int8_kernel: Int8Kernel::Reference,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        self.config
    }

    /// The same model with decode steps (calls of one token) using `a` (default
    /// [`DecodeActivations::F32`]); prompts of several tokens stay f32, as on the GPU.
    pub fn with_decode_activations(mut self, a: DecodeActivations) -> Self {
        self.decode_activations = a;
        self
    }

    /// The same model with calls of several tokens (prompts) using `a` (default f32).
    pub fn with_prompt_activations(mut self, a: DecodeActivations) -> Self {
        self.prompt_activations = a;
        self
    }

    /// The same model computing int8 products with `kernel` (default the scalar spec).
    pub fn with_int8_kernel(mut self, kernel: Int8Kernel) -> Self {
        self.int8_kernel = kernel;
        self
    }

    /// The fast CPU backend (`q4wgpu run --cpu`): int8 activations for prompts and decode steps,
    /// multiplied by the SIMD kernel for `isa`. Not the oracle: tests compare it with the spec.
    pub fn fast(weights: &'a ModelWeights, isa: fast::Isa) -> Result<Self> {
        Ok(CpuModel::new(weights)?
            .with_decode_activations(DecodeActivations::Int8)
            .with_prompt_activations(DecodeActivations::Int8)
            .with_int8_kernel(Int8Kernel::Fast(isa)))
    }

    /// An empty cache for up to `ctx` positions.
    pub fn new_cache(&self, ctx: usize) -> KvCache {
        self.new_layers_cache(self.layers.len(), ctx)
    }

    /// An empty cache of `layers` layers (a hybrid plan's CPU layers) for up to `ctx` positions.
    pub fn new_layers_cache(&self, layers: usize, ctx: usize) -> KvCache {
        let n = layers * ctx * self.heads.kv_dim();
        KvCache {
            ctx,
            kv_dim: self.heads.kv_dim(),
            len: 0,
            f16: false,
            keys: vec![0.0; n],
            values: vec![0.0; n],
        }
    }

    /// One decode step of model layers `layers` on the residual stream `x` of the token at `pos`,
    /// the cache's layer `first_cache_layer + j` holding model layer `layers.start + j` (a hybrid
    /// plan's CPU layers). Leaves the cache's length alone: the caller owns the sequence.
    pub fn decode_layers(
        &self,
        layers: std::ops::Range<usize>,
        first_cache_layer: usize,
        cache: &mut KvCache,
        pos: usize,
        x: &mut Vec<f32>,
    ) -> Result<()> {
        let fits = cache.kv_dim == self.heads.kv_dim()
            && first_cache_layer + layers.len() <= cache.layers()
            && layers.end <= self.layers.len();
        if !fits || pos >= cache.ctx() || x.len() != self.config.hidden_size {
            return Err(Error::Invalid(format!(
                "decode_layers: layers {layers:?} at position {pos} do not fit the cache or the model"
            )));
        }
        let int8 = self.int8(1);
        let xs = std::slice::from_mut(x);
        for (j, l) in layers.enumerate() {
            let layer = &self.layers[l];
            self.attention_block(first_cache_layer + j, layer, cache, pos, xs, int8);
            self.mlp_block(layer, xs, int8);
        }
        Ok(())
    }

    /// Runs `tokens` at positions `cache.len()..` and returns the logits of the last one.
    pub fn forward(&self, cache: &mut KvCache, tokens: &[u32]) -> Result<Vec<f32>> {
        let hidden = self.hidden_states(cache, tokens)?;
        let last = hidden
            .last()
            .ok_or_else(|| Error::Invalid("forward: no tokens to process".into()))?;
        Ok(self.logits(last, self.int8(tokens.len())))
    }

    /// Like [`forward`](Self::forward), but returns the logits of every token (for tests).
    pub fn forward_all(&self, cache: &mut KvCache, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let hidden = self.hidden_states(cache, tokens)?;
        let int8 = self.int8(tokens.len());
        Ok(hidden.iter().map(|x| self.logits(x, int8)).collect())
    }

    /// The residual stream of each token after the last layer. The cache is left unchanged on error.
    fn hidden_states(&self, cache: &mut KvCache, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let start = cache.len();
        if start + tokens.len() > cache.ctx() {
            return Err(Error::Invalid(format!(
                "the prompt is longer than the context: {} new tokens after {start} cached need {} positions, \
                 the context holds {}; raise --ctx-size",
                tokens.len(),
                start + tokens.len(),
                cache.ctx()
            )));
        }
        if cache.kv_dim != self.heads.kv_dim()
            || cache.keys.len() != self.layers.len() * cache.ctx() * cache.kv_dim
        {
            return Err(Error::Invalid(
                "forward: the KV cache was made for another model".into(),
            ));
        }
        let mut xs = Vec::with_capacity(tokens.len());
        for &t in tokens {
            let mut x = vec![0.0; self.config.hidden_size];
            self.weights.embedding_row(t, &mut x)?;
            xs.push(x);
        }
        let int8 = self.int8(tokens.len());
        for (l, layer) in self.layers.iter().enumerate() {
            self.attention_block(l, layer, cache, start, &mut xs, int8);
            self.mlp_block(layer, &mut xs, int8);
        }
        cache.len = start + tokens.len();
        Ok(xs)
    }

    /// `x += o_proj(attention(rope(q), cache))` for each token, after writing every token's k, v.
    fn attention_block(
        &self,
        l: usize,
        layer: &Layer,
        cache: &mut KvCache,
        start: usize,
        xs: &mut [Vec<f32>],
        int8: bool,
    ) {
        let eps = self.config.rms_norm_eps;
        let kernel = self.int8_kernel;
        let hs: Vec<Input> = xs
            .iter()
            .map(|x| Input::normed(x, &layer.input_norm, eps, int8))
            .collect();
        let mut qkv = Linear::apply_each(&[&layer.q, &layer.k, &layer.v], &hs, kernel).into_iter();
        let (mut queries, keys, values) = match (qkv.next(), qkv.next(), qkv.next()) {
            (Some(q), Some(k), Some(v)) => (q, k, v),
            _ => unreachable!("three linears give three outputs"),
        };
        for (t, ((q, mut k), v)) in queries.iter_mut().zip(keys).zip(values).enumerate() {
            apply_rope(q, start + t, &self.inv_freq);
            apply_rope(&mut k, start + t, &self.inv_freq);
            cache.write(l, start + t, &k, &v);
        }
        // The tokens of a prompt attend independently (their keys and values are written):
        // one token per task, the same arithmetic whichever thread runs it.
        let cache = &*cache;
        let outs: Vec<Input> = queries
            .par_iter()
            .enumerate()
            .map(|(t, q)| {
                let seen = start + t + 1;
                let mut a = vec![0.0; self.heads.q_dim()];
                attention(
                    self.heads,
                    q,
                    cache.keys(l, seen),
                    cache.values(l, seen),
                    &mut a,
                );
                Input::plain(a, int8)
            })
            .collect();
        for (x, o) in xs.iter_mut().zip(layer.o.apply_all(&outs, kernel)) {
            add_in_place(x, &o);
        }
    }

    /// `x += down(silu(gate(h)) * up(h))` with `h = rmsnorm(x)`, for each token.
    fn mlp_block(&self, layer: &Layer, xs: &mut [Vec<f32>], int8: bool) {
        let eps = self.config.rms_norm_eps;
        let kernel = self.int8_kernel;
        let hs: Vec<Input> = xs
            .iter()
            .map(|x| Input::normed(x, &layer.post_attention_norm, eps, int8))
            .collect();
        let mut gate_up = Linear::apply_each(&[&layer.gate, &layer.up], &hs, kernel).into_iter();
        let (gates, ups) = match (gate_up.next(), gate_up.next()) {
            (Some(g), Some(u)) => (g, u),
            _ => unreachable!("two linears give two outputs"),
        };
        let acts: Vec<Input> = gates
            .into_iter()
            .zip(ups)
            .map(|(mut act, up)| {
                for (g, u) in act.iter_mut().zip(up) {
                    *g = silu(*g) * u;
                }
                Input::plain(act, int8)
            })
            .collect();
        for (x, d) in xs.iter_mut().zip(layer.down.apply_all(&acts, kernel)) {
            add_in_place(x, &d);
        }
    }

    /// Whether a call of `tokens` tokens quantizes its activations (decode step or prompt).
    fn int8(&self, tokens: usize) -> bool {
        let a = if tokens == 1 {
            self.decode_activations
        } else {
            self.prompt_activations
        };
        a == DecodeActivations::Int8
    }

    fn logits(&self, x: &[f32], int8: bool) -> Vec<f32> {
        let h = Input::normed(x, &self.final_norm, self.config.rms_norm_eps, int8);
        let lm_head = Linear {
            weight: self.lm_head,
            bias: None,
        };
        let mut logits = lm_head.apply_all(&[h], self.int8_kernel);
        logits.swap_remove(0)
    }
}

/// An INT4 matrix of the expected shape.
fn matrix<'a>(
    weights: &'a ModelWeights,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<QView<'a>> {
    let m = weights.q4(name)?;
    if (m.rows, m.cols) != (rows, cols) {
        return Err(Error::Config(format!(
            "{name}: shape [{}, {}], but the model config calls for [{rows}, {cols}]",
            m.rows, m.cols
        )));
    }
    Ok(m)
}

/// A dense 1-D tensor of the expected length, as f32.
fn vector(weights: &ModelWeights, name: &str, len: usize) -> Result<Vec<f32>> {
    let (shape, data) = weights.dense_f32(name)?;
    if shape != [len] {
        return Err(Error::Config(format!(
            "{name}: shape {shape:?}, but the model config calls for [{len}]"
        )));
    }
    Ok(data)
}

/// The embedding table must be dense `[vocab_size, hidden_size]` with all its bytes (it is read row
/// by row, never decoded whole: it is the largest dense tensor).
fn check_embedding(weights: &ModelWeights) -> Result<()> {
    let name = "model.embed_tokens.weight";
    let c = &weights.config;
    match weights.get(name)? {
        Weight::Dense { shape, dtype, data } => {
            if shape != &[c.vocab_size, c.hidden_size] {
                return Err(Error::Config(format!(
                    "{name}: shape {shape:?}, but the model config calls for [{}, {}]",
                    c.vocab_size, c.hidden_size
                )));
            }
            if data.bytes().len() != c.vocab_size * c.hidden_size * dtype.size() {
                return Err(Error::Config(format!(
                    "{name}: data does not match its shape {shape:?}"
                )));
            }
            Ok(())
        }
        Weight::Q4 { .. } => Err(Error::Config(format!(
            "{name}: expected a dense tensor, found an INT4 matrix"
        ))),
    }
}
