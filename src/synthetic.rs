//! Random-weight models with the shapes of real ones, for benchmarks (speed does not depend on the
//! values) and tests.
//!
//! The tensors have exactly the names, shapes and storage types a quantized checkpoint has
//! (`quantize::expected_tensors` plus `lm_head.weight`): INT4 block-128 linear weights and lm_head,
//! a BF16 embedding table, F32 norms and biases. Every layer shares the same blobs (`Blob::Owned`
//! is an `Arc`), so a 35 GB model takes one layer's worth of host memory; the engine copies each
//! layer to the GPU (or to its own host staging buffer) separately anyway.
//!
//! Values are chosen so activations stay of order one through any number of layers: nibbles are
//! uniform in 0..=15 (levels −8..=7, E[q²] = 21.5), and a block's scale is
//! `(0.5 + u) / sqrt(21.5 · cols)` with `u` uniform in [0, 1), so `W x` of a unit-RMS `x` (what
//! RMSNorm feeds every matrix) has RMS of about one. Norms are 1, biases within ±0.02, embeddings
//! uniform in [−1, 1).

use crate::config::{ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::quant::{blocks_per_row, BLOCK, WORDS_PER_BLOCK};
use crate::quantize::{expected_tensors, EMBED, LM_HEAD};
use crate::weights::{is_quantized_name, Blob, DenseDtype, ModelWeights, Weight};
use half::bf16;
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// The shapes `synthetic_config` knows, for messages and `--help`.
pub const SYNTHETIC_NAMES: [&str; 5] = ["tiny", "qwen2-0.5b", "qwen2-7b", "qwen2-32b", "llama-70b"];

fn qwen2(
    hidden: usize,
    layers: usize,
    ffn: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
) -> ModelConfig {
    ModelConfig {
        architectures: vec!["Qwen2ForCausalLM".into()],
        model_type: Some("qwen2".into()),
        hidden_size: hidden,
        intermediate_size: ffn,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        head_dim: None,
        vocab_size: vocab,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        rope_scaling: None,
        tie_word_embeddings: false,
        max_position_embeddings: 131072,
        attention_bias: None,
        bos_token_id: None,
        eos_token_id: None,
    }
}

/// The config of a named synthetic shape (see [`SYNTHETIC_NAMES`]).
///
/// `tiny` is small but awkward, for tests: hidden 192 (one and a half blocks of 128), 4 layers,
/// 6 query heads over 2 KV heads of 32, FFN 320, vocabulary 517, q/k/v bias, untied lm_head.
pub fn synthetic_config(name: &str) -> Result<ModelConfig> {
    let config = match name {
        "tiny" => {
            let mut c = qwen2(192, 4, 320, 6, 2, 517);
            c.head_dim = Some(32);
            c.max_position_embeddings = 4096;
            c
        }
        // Qwen2.5-0.5B: tied embeddings (lm_head is still a separate INT4 copy, as the quantizer makes it).
        "qwen2-0.5b" => {
            let mut c = qwen2(896, 24, 4864, 14, 2, 151936);
            c.tie_word_embeddings = true;
            c.max_position_embeddings = 32768;
            c
        }
        "qwen2-7b" => qwen2(3584, 28, 18944, 28, 4, 152064),
        // DeepSeek-R1-Distill-Qwen-32B.
        "qwen2-32b" => {
            let mut c = qwen2(5120, 64, 27648, 40, 8, 152064);
            c.rms_norm_eps = 1e-5;
            c
        }
        // DeepSeek-R1-Distill-Llama-70B.
        "llama-70b" => ModelConfig {
            architectures: vec!["LlamaForCausalLM".into()],
            model_type: Some("llama".into()),
            hidden_size: 8192,
            intermediate_size: 28672,
            num_hidden_layers: 80,
            num_attention_heads: 64,
            num_key_value_heads: Some(8),
            head_dim: None,
            vocab_size: 128256,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_scaling: Some(RopeScaling {
                rope_type: "llama3".into(),
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }),
            tie_word_embeddings: false,
            max_position_embeddings: 131072,
            attention_bias: Some(false),
            bos_token_id: None,
            eos_token_id: None,
        },
        other => {
            return Err(Error::Invalid(format!(
                "unknown synthetic model {other:?}; known shapes: {}",
                SYNTHETIC_NAMES.join(", ")
            )))
        }
    };
    config.validate()?;
    Ok(config)
}

/// Words filled per independent generator: large enough to amortise seeding, small enough to
/// spread a multi-GB fill over all cores.
const FILL_CHUNK: usize = 1 << 16;

/// A 64-bit mix (splitmix64's finaliser): turns (seed, chunk index) into independent seeds.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Fills `out` in parallel: chunk `i` gets a xorshift64 stream seeded from `(seed, i)`, and each
/// word is `make(next random u64)`. Deterministic for a seed, whatever the thread count.
fn fill_words(out: &mut [u32], seed: u64, make: impl Fn(u64) -> u32 + Sync) {
    out.par_chunks_mut(FILL_CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut s = mix(seed ^ mix(i as u64 + 1)) | 1;
            for w in chunk {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                *w = make(s);
            }
        });
}

/// Uniform in [0, 1) from the top 24 bits of `bits`.
fn unit(bits: u64) -> f32 {
    (bits >> 40) as f32 / (1u64 << 24) as f32
}

/// Two bf16 values per word, each `f(u)` of an independent uniform `u` in [0, 1).
fn bf16_pairs(n_values: usize, seed: u64, f: impl Fn(f32) -> f32 + Sync) -> Blob {
    let mut words = vec![0u32; n_values.div_ceil(2)];
    let bits = |v: f32| bf16::from_f32(v).to_bits() as u32;
    fill_words(&mut words, seed, |r| {
        bits(f(unit(r))) | bits(f(unit(r << 24))) << 16
    });
    Blob::Owned(Arc::new(words), n_values * 2)
}

/// A random INT4 matrix `[rows, cols]` in the `quant.rs` layout, scaled as the module doc says.
/// Padding elements of a short last block hold level 0 (nibble 8), as the quantizer writes them.
fn random_q4(rows: usize, cols: usize, seed: u64) -> Weight {
    let bpr = blocks_per_row(cols);
    let mut words = vec![0u32; rows * bpr * WORDS_PER_BLOCK];
    fill_words(&mut words, seed, |r| r as u32);
    let tail = cols % BLOCK;
    if tail != 0 {
        words.par_chunks_mut(bpr * WORDS_PER_BLOCK).for_each(|row| {
            let last = &mut row[(bpr - 1) * WORDS_PER_BLOCK..];
            for i in tail..BLOCK {
                let shift = 4 * (i % 8);
                last[i / 8] = (last[i / 8] & !(0xF << shift)) | (8 << shift);
            }
        });
    }
    let base = 1.0 / (21.5 * cols as f32).sqrt();
    let scales = bf16_pairs(rows * bpr, seed ^ 0x5CA1E, |u| base * (0.5 + u));
    Weight::Q4 {
        rows,
        cols,
        qweight: Blob::Owned(Arc::new(words), rows * bpr * WORDS_PER_BLOCK * 4),
        scales,
    }
}

fn dense_f32(shape: Vec<usize>, value: impl Fn(usize) -> f32) -> Weight {
    let n: usize = shape.iter().product();
    let data: Vec<u32> = (0..n).map(|i| value(i).to_bits()).collect();
    Weight::Dense {
        shape,
        dtype: DenseDtype::F32,
        data: Blob::Owned(Arc::new(data), n * 4),
    }
}

/// The part of a tensor name that is the same in every layer (`self_attn.q_proj.weight`), so
/// layers can share one blob per kind.
fn kind_of(name: &str) -> &str {
    name.strip_prefix("model.layers.")
        .and_then(|rest| rest.split_once('.'))
        .map_or(name, |(_, kind)| kind)
}

/// Gives every layer's INT4 matrices memory of their own (copies of the shared blobs), so that a
/// CPU reading layer after layer (`--cpu`, a hybrid plan's CPU layers) reads distinct memory as
/// with a real model: with shared blobs, a CPU cache larger than one layer would serve the later
/// layers from cache. Costs the whole model's size in host memory.
pub fn give_layers_own_memory(weights: &mut ModelWeights) {
    let own = |b: &Blob| match b {
        Blob::Owned(words, len) => Blob::Owned(Arc::new(words.as_ref().clone()), *len),
        other => other.clone(),
    };
    weights
        .tensors
        .par_iter_mut()
        .filter(|(name, _)| name.starts_with("model.layers."))
        .for_each(|(_, w)| {
            if let Weight::Q4 {
                qweight, scales, ..
            } = w
            {
                (*qweight, *scales) = (own(qweight), own(scales));
            }
        });
}

/// Random weights for `config` (deterministic for `seed`). Layers share their blobs.
pub fn synthetic_weights(config: &ModelConfig, seed: u64) -> ModelWeights {
    let mut shared: HashMap<String, Weight> = HashMap::new();
    let mut tensors = BTreeMap::new();
    let mut specs = expected_tensors(config);
    specs.push((
        LM_HEAD.to_string(),
        vec![config.vocab_size, config.hidden_size],
    ));
    for (k, (name, shape)) in specs.into_iter().enumerate() {
        let kind = kind_of(&name).to_string();
        let tensor_seed = mix(seed ^ mix(k as u64 + 0x1000));
        let weight = shared
            .entry(kind)
            .or_insert_with(|| {
                if is_quantized_name(&name) {
                    random_q4(shape[0], shape[1], tensor_seed)
                } else if name == EMBED {
                    let n = shape[0] * shape[1];
                    Weight::Dense {
                        shape: shape.clone(),
                        dtype: DenseDtype::BF16,
                        data: bf16_pairs(n, tensor_seed, |u| 2.0 * u - 1.0),
                    }
                } else if name.ends_with(".bias") {
                    dense_f32(shape.clone(), |i| {
                        0.02 * (2.0 * unit(mix(tensor_seed ^ i as u64)) - 1.0)
                    })
                } else {
                    dense_f32(shape.clone(), |_| 1.0)
                }
            })
            .clone();
        tensors.insert(name, weight);
    }
    ModelWeights {
        config: config.clone(),
        tensors,
    }
}
