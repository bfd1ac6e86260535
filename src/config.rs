//! Model configuration with Hugging Face `config.json` field names verbatim; derived values are methods.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The architectures we run. Both are the same decoder: Qwen2 adds a bias to q/k/v.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Qwen2,
    Llama,
}

pub const SUPPORTED_ARCHITECTURES: &str =
    "Qwen2ForCausalLM (GGUF: qwen2) and LlamaForCausalLM (GGUF: llama)";

/// Llama-3 style frequency-dependent RoPE scaling (`rope_scaling` with `rope_type: "llama3"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    pub factor: f32,
    #[serde(default = "one")]
    pub low_freq_factor: f32,
    #[serde(default = "four")]
    pub high_freq_factor: f32,
    #[serde(default = "orig_ctx")]
    pub original_max_position_embeddings: usize,
}

fn one() -> f32 {
    1.0
}
fn four() -> f32 {
    4.0
}
fn orig_ctx() -> usize {
    8192
}
fn default_theta() -> f32 {
    10000.0
}
fn default_eps() -> f32 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

/// Token ids may be one id or a list in `config.json` (Llama-3 lists several EOS ids).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f32,
    #[serde(default = "default_theta")]
    pub rope_theta: f32,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Llama's optional q/k/v/o bias; Qwen2 always has q/k/v bias.
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io("reading model config", path, e))?;
        let config: ModelConfig = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not a valid config.json: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// Refuses unknown architectures and inconsistent shapes, so later code can trust the numbers.
    pub fn validate(&self) -> Result<()> {
        self.arch()?;
        let check = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(Error::Config(what.to_string()))
            }
        };
        check(
            self.hidden_size > 0 && self.num_hidden_layers > 0,
            "hidden_size and num_hidden_layers must be positive",
        )?;
        check(
            self.num_attention_heads > 0,
            "num_attention_heads must be positive",
        )?;
        // Checked before anything divides by it (kv_groups, the multiple check below).
        check(
            self.num_kv_heads() > 0,
            "num_key_value_heads (GGUF: attention.head_count_kv) must be positive",
        )?;
        check(
            self.num_attention_heads % self.num_kv_heads() == 0,
            "num_attention_heads must be a multiple of num_key_value_heads",
        )?;
        self.check_sizes()?;
        check(
            self.head_dim() > 0,
            "head_dim must be positive (hidden_size / num_attention_heads when not given)",
        )?;
        check(self.head_dim() % 2 == 0, "head_dim must be even for RoPE")?;
        check(
            self.vocab_size > 0 && self.intermediate_size > 0,
            "vocab_size and intermediate_size must be positive",
        )?;
        check(
            self.max_position_embeddings > 0,
            "max_position_embeddings must be positive",
        )?;
        check(
            self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0,
            "rms_norm_eps must be a finite positive number",
        )?;
        check(
            self.rope_theta.is_finite() && self.rope_theta > 0.0,
            "rope_theta must be a finite positive number",
        )?;
        if let Some(s) = &self.rope_scaling {
            if s.rope_type != "llama3" && s.rope_type != "default" {
                return Err(Error::Unsupported(format!(
                    "rope_scaling type {:?}; supported: llama3",
                    s.rope_type
                )));
            }
            let finite_positive = |v: f32| v.is_finite() && v > 0.0;
            check(
                s.rope_type != "llama3"
                    || (finite_positive(s.factor)
                        && finite_positive(s.low_freq_factor)
                        && finite_positive(s.high_freq_factor)
                        && s.high_freq_factor != s.low_freq_factor
                        && s.original_max_position_embeddings > 0),
                "rope_scaling (llama3) needs finite positive factor, low_freq_factor and high_freq_factor (the two different) and a positive original_max_position_embeddings",
            )?;
        }
        Ok(())
    }

    /// Every dimension must stay within what a tensor or a GPU buffer index can hold, so the sizes
    /// computed from them (rows x columns, KV cache bytes) cannot overflow.
    fn check_sizes(&self) -> Result<()> {
        const MAX_DIM: usize = 1 << 24;
        let dims = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("head_dim", self.head_dim()),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in dims {
            if v > MAX_DIM {
                return Err(Error::Config(format!(
                    "{name} = {v} is larger than any model's (at most {MAX_DIM}); the config is corrupt"
                )));
            }
        }
        let products = [
            ("num_attention_heads x head_dim", self.num_attention_heads, self.head_dim()),
            ("vocab_size x hidden_size", self.vocab_size, self.hidden_size),
            ("intermediate_size x hidden_size", self.intermediate_size, self.hidden_size),
        ];
        for (what, a, b) in products {
            if (a as u64) * (b as u64) > 1 << 36 {
                return Err(Error::Config(format!(
                    "{what} = {a} x {b} is larger than any model's matrix; the config is corrupt"
                )));
            }
        }
        Ok(())
    }

    pub fn arch(&self) -> Result<Arch> {
        for name in &self.architectures {
            match name.as_str() {
                "Qwen2ForCausalLM" => return Ok(Arch::Qwen2),
                "LlamaForCausalLM" => return Ok(Arch::Llama),
                _ => {}
            }
        }
        Err(Error::Unsupported(format!(
            "architecture {:?}; supported: {SUPPORTED_ARCHITECTURES}",
            self.architectures
        )))
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Query heads that share one KV head.
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_kv_heads()
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim()
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads() * self.head_dim()
    }

    pub fn qkv_bias(&self) -> bool {
        match self.arch() {
            Ok(Arch::Qwen2) => true,
            _ => self.attention_bias.unwrap_or(false),
        }
    }

    /// Llama's `attention_bias` also puts a bias on o_proj; Qwen2 has none there.
    pub fn o_bias(&self) -> bool {
        matches!(self.arch(), Ok(Arch::Llama)) && self.attention_bias.unwrap_or(false)
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// Inverse frequencies of RoPE, one per pair of dimensions, with llama3 scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim();
        (0..dim / 2)
            .map(|i| {
                let base = 1.0 / (self.rope_theta as f64).powf(2.0 * i as f64 / dim as f64);
                match &self.rope_scaling {
                    Some(s) if s.rope_type == "llama3" => llama3_scale(base, s) as f32,
                    _ => base as f32,
                }
            })
            .collect()
    }

    /// Names of the linear (quantized) weights of one layer, Hugging Face naming.
    pub fn layer_linear_names(layer: usize) -> [String; 7] {
        let p = format!("model.layers.{layer}");
        [
            format!("{p}.self_attn.q_proj.weight"),
            format!("{p}.self_attn.k_proj.weight"),
            format!("{p}.self_attn.v_proj.weight"),
            format!("{p}.self_attn.o_proj.weight"),
            format!("{p}.mlp.gate_proj.weight"),
            format!("{p}.mlp.up_proj.weight"),
            format!("{p}.mlp.down_proj.weight"),
        ]
    }
}

/// Llama-3.1 RoPE scaling: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
fn llama3_scale(inv_freq: f64, s: &RopeScaling) -> f64 {
    let factor = s.factor as f64;
    let low = s.low_freq_factor as f64;
    let high = s.high_freq_factor as f64;
    let old_ctx = s.original_max_position_embeddings as f64;
    let low_freq_wavelen = old_ctx / low;
    let high_freq_wavelen = old_ctx / high;
    let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
    if wavelen < high_freq_wavelen {
        inv_freq
    } else if wavelen > low_freq_wavelen {
        inv_freq / factor
    } else {
        let smooth = (old_ctx / wavelen - low) / (high - low);
        (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen() -> ModelConfig {
        serde_json::from_str(
            r#"{"architectures":["Qwen2ForCausalLM"],"hidden_size":896,"intermediate_size":4864,
            "num_hidden_layers":24,"num_attention_heads":14,"num_key_value_heads":2,"vocab_size":151936,
            "rms_norm_eps":1e-6,"rope_theta":1000000.0,"tie_word_embeddings":true,"eos_token_id":151645}"#,
        )
        .expect("valid json")
    }

    #[test]
    fn derived_values() {
        let c = qwen();
        c.validate().expect("valid");
        assert_eq!(c.head_dim(), 64);
        assert_eq!(c.kv_groups(), 7);
        assert!(c.qkv_bias());
        assert_eq!(c.eos_token_ids(), vec![151645]);
    }

    #[test]
    fn unknown_architecture_is_refused_with_the_supported_list() {
        let mut c = qwen();
        c.architectures = vec!["MambaForCausalLM".into()];
        let msg = c.validate().expect_err("must refuse").to_string();
        assert!(
            msg.contains("MambaForCausalLM") && msg.contains("Qwen2ForCausalLM"),
            "{msg}"
        );
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let mut c = qwen();
        c.head_dim = Some(128);
        c.rope_theta = 500000.0;
        let plain = c.rope_inv_freq();
        c.rope_scaling = Some(RopeScaling {
            rope_type: "llama3".into(),
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        });
        let scaled = c.rope_inv_freq();
        assert_eq!(plain[0], scaled[0]);
        let last = plain.len() - 1;
        assert!((plain[last] / 8.0 - scaled[last]).abs() < 1e-12);
    }
}
