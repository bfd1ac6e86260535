//! Tiny random models for tests and benchmarks: awkward sizes (hidden not a multiple of 128,
//! grouped-query attention, q_dim ≠ hidden), both architectures, a byte-level BPE tokenizer and
//! a ChatML template, written as a Hugging Face folder.

use crate::config::{Arch, ModelConfig, RopeScaling, TokenIds};
use crate::error::{Error, Result};
use crate::formats::hf::{write_hf_folder, HfDtype};
use std::path::Path;

/// Special tokens, in id order after the byte tokens and merges.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A few merges so the tokenizer is a real BPE (pairs of GPT-2 byte-level characters; Ġ is space).
const MERGES: [(&str, &str); 10] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("e", "r"),
    ("a", "n"),
    ("o", "n"),
    ("Ġ", "a"),
    ("r", "e"),
    ("Ġ", "s"),
];

/// Id of a special token of the tiny tokenizer.
pub fn special_token_id(token: &str) -> Option<u32> {
    SPECIAL_TOKENS
        .iter()
        .position(|&t| t == token)
        .map(|i| (256 + MERGES.len() + i) as u32)
}

/// The config of a tiny model.
/// Qwen2: hidden 160, 5 query heads / 1 KV head of 32, FFN 224, q/k/v bias, untied lm_head.
/// Llama: hidden 200, 6 query heads / 2 KV heads of 32 (q_dim 192 ≠ hidden), FFN 344, tied
/// embeddings, llama3 RoPE scaling with its three frequency bands all populated.
pub fn tiny_config(arch: Arch) -> ModelConfig {
    let eos = special_token_id("<|im_end|>").unwrap_or(0);
    let endoftext = special_token_id("<|endoftext|>").unwrap_or(0);
    match arch {
        Arch::Qwen2 => ModelConfig {
            architectures: vec!["Qwen2ForCausalLM".into()],
            model_type: Some("qwen2".into()),
            hidden_size: 160,
            intermediate_size: 224,
            num_hidden_layers: 2,
            num_attention_heads: 5,
            num_key_value_heads: Some(1),
            head_dim: Some(32),
            vocab_size: 300,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            rope_scaling: None,
            tie_word_embeddings: false,
            max_position_embeddings: 8192,
            attention_bias: None,
            bos_token_id: Some(TokenIds::One(endoftext)),
            eos_token_id: Some(TokenIds::One(eos)),
        },
        Arch::Llama => ModelConfig {
            architectures: vec!["LlamaForCausalLM".into()],
            model_type: Some("llama".into()),
            hidden_size: 200,
            intermediate_size: 344,
            num_hidden_layers: 2,
            num_attention_heads: 6,
            num_key_value_heads: Some(2),
            head_dim: Some(32),
            vocab_size: 300,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            // Wavelengths 2π·θ^(i/16): i ≤ 4 below 256 (kept), i = 5, 6 in the ramp, i ≥ 7 above 1024 (divided).
            rope_scaling: Some(RopeScaling {
                rope_type: "llama3".into(),
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 1024,
            }),
            tie_word_embeddings: true,
            max_position_embeddings: 8192,
            attention_bias: Some(false),
            bos_token_id: Some(TokenIds::One(endoftext)),
            eos_token_id: Some(TokenIds::Many(vec![eos, endoftext])),
        },
    }
}

/// SplitMix64: small, deterministic, good enough for test weights.
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

/// Random weights for every tensor of `config` (lm_head too unless tied), deterministic in `seed`.
/// Linear weights ~ N(0, 1/in) so activations keep their scale; embeddings ~ N(0, 1); norm
/// weights ~ 1 + N(0, 0.1); biases ~ N(0, 0.1).
pub fn random_tensors(config: &ModelConfig, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut names = crate::quantize::expected_tensors(config);
    if !config.tie_word_embeddings {
        names.push((
            crate::quantize::LM_HEAD.to_string(),
            vec![config.vocab_size, config.hidden_size],
        ));
    }
    let mut rng = SplitMix(seed);
    names
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let (mean, std) = if name.ends_with("norm.weight") {
                (1.0, 0.1)
            } else if name.ends_with(".bias") {
                (0.0, 0.1)
            } else if name == crate::quantize::EMBED {
                (0.0, 1.0)
            } else {
                (0.0, 1.0 / (shape[1] as f32).sqrt())
            };
            let data = (0..n).map(|_| mean + std * rng.normal()).collect();
            (name, shape, data)
        })
        .collect()
}

/// GPT-2's byte-level alphabet: printable bytes map to themselves, the rest to U+0100 onwards.
pub fn byte_to_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        return b as char;
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).unwrap_or('?')
}

/// The tiny tokenizer: a byte-level BPE whose vocabulary is the 256 byte characters (id = byte),
/// then one token per merge, then the special tokens.
pub fn tiny_tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(byte_to_char(b).to_string(), b.into());
    }
    for (i, (a, b)) in MERGES.iter().enumerate() {
        vocab.insert(format!("{a}{b}"), (256 + i).into());
    }
    let merges: Vec<String> = MERGES.iter().map(|(a, b)| format!("{a} {b}")).collect();
    let added: Vec<serde_json::Value> = SPECIAL_TOKENS
        .iter()
        .map(|t| {
            serde_json::json!({
                "id": special_token_id(t), "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            })
        })
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true },
        "post_processor": null,
        "decoder": { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true },
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    })
}

pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

pub fn tiny_tokenizer_config_json() -> serde_json::Value {
    serde_json::json!({
        "add_bos_token": false,
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE,
        "model_max_length": 8192
    })
}

/// Writes a complete tiny Hugging Face model folder: config, BF16 safetensors, tokenizer files.
pub fn write_tiny_hf_model(dir: &Path, arch: Arch, seed: u64) -> Result<()> {
    write_hf_model(dir, &tiny_config(arch), seed)
}

/// Writes a random checkpoint of any (small) config with the tiny tokenizer, in the Hugging Face layout.
pub fn write_hf_model(dir: &Path, config: &ModelConfig, seed: u64) -> Result<()> {
    let tensors = random_tensors(config, seed);
    write_hf_folder(
        dir,
        config,
        &mut tensors.into_iter().map(Ok),
        HfDtype::BF16,
        u64::MAX,
    )?;
    for (file, value) in [
        ("tokenizer.json", tiny_tokenizer_json()),
        ("tokenizer_config.json", tiny_tokenizer_config_json()),
    ] {
        let path = dir.join(file);
        let text =
            serde_json::to_string_pretty(&value).map_err(|e| Error::Invalid(e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| Error::io("writing", &path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_a_bijection_onto_printable_chars() {
        let chars: std::collections::HashSet<char> = (0..=255u8).map(byte_to_char).collect();
        assert_eq!(chars.len(), 256);
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'A'), 'A');
    }

    #[test]
    fn tiny_configs_are_valid_and_awkward() {
        for arch in [Arch::Qwen2, Arch::Llama] {
            let c = tiny_config(arch);
            c.validate().expect("tiny config validates");
            assert_eq!(c.arch().expect("known arch"), arch);
            assert_ne!(c.hidden_size % 128, 0);
            assert!(c.kv_groups() > 1);
            assert!(special_token_id("<|im_end|>").is_some_and(|id| (id as usize) < c.vocab_size));
        }
        assert_ne!(
            tiny_config(Arch::Llama).q_dim(),
            tiny_config(Arch::Llama).hidden_size
        );
    }

    #[test]
    fn random_tensors_are_deterministic_and_scaled() {
        let c = tiny_config(Arch::Qwen2);
        let a = random_tensors(&c, 7);
        let b = random_tensors(&c, 7);
        let other = random_tensors(&c, 8);
        assert_eq!(a, b);
        assert_ne!(a, other);
        let (_, shape, q) = a
            .iter()
            .find(|t| t.0 == "model.layers.0.self_attn.q_proj.weight")
            .expect("q_proj");
        let var = q.iter().map(|v| v * v).sum::<f32>() / q.len() as f32;
        let want = 1.0 / shape[1] as f32;
        assert!(
            (var / want - 1.0).abs() < 0.1,
            "variance {var}, want {want}"
        );
        let (_, _, norm) = a.iter().find(|t| t.0 == "model.norm.weight").expect("norm");
        let mean = norm.iter().sum::<f32>() / norm.len() as f32;
        assert!((mean - 1.0).abs() < 0.05, "norm mean {mean}");
    }
}
