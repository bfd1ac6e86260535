//! The front door for model files: a q4wgpu folder, a Hugging Face folder or a GGUF file, by path
//! or by the name of a model the fetcher knows. Other formats are quantized on load.

use crate::error::{Error, Result};
use crate::fetch;
use crate::formats::{gguf, hf, q4};
use crate::quantize;
use crate::tokenizer::Tokenizer;
use crate::weights::{ModelWeights, WeightSource};
use std::path::{Path, PathBuf};

pub struct LoadedModel {
    pub weights: ModelWeights,
    pub tokenizer: Tokenizer,
    /// Where it came from, for messages.
    pub path: PathBuf,
}

/// A checkpoint in another format, with its tokenizer, ready to quantize.
pub struct Source {
    pub weights: Box<dyn WeightSource>,
    pub tokenizer: Tokenizer,
}

const WHAT_IS_A_MODEL: &str = "expected a q4wgpu folder (the output of `q4wgpu quantize`), a Hugging Face \
folder (config.json, tokenizer.json and *.safetensors, as `git clone` of a model repository gives) or a .gguf file";

/// `--model` as given: none → the default model (fetched once); a known name → fetched; else a path.
pub fn resolve(arg: Option<&str>) -> Result<PathBuf> {
    match arg {
        None => cached_quantized(fetch::DEFAULT_MODEL),
        Some(name) => match fetch::find_known(name) {
            Some(known) if !known.runnable => Err(Error::Invalid(format!(
                "{name} is only the first part of a model file, kept for its tokenizer (`q4wgpu fetch {name}` fetches it for the tokenizer tests); it has no usable weights. Models that run: {}",
                fetch::runnable_names()
            ))),
            Some(known) => cached_quantized(known),
            None => {
                let path = PathBuf::from(name);
                if path.exists() {
                    Ok(path)
                } else {
                    Err(Error::Invalid(format!(
                        "model {name:?} is neither a path that exists nor a known model name ({})",
                        fetch::runnable_names()
                    )))
                }
            }
        },
    }
}

/// A known model, fetched and quantized once into the cache.
fn cached_quantized(known: &fetch::KnownModel) -> Result<PathBuf> {
    static QUANTIZING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = QUANTIZING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let folder = fetch::cache_dir().join("quantized").join(known.name);
    if q4::is_q4_folder(&folder) {
        return Ok(folder);
    }
    let gguf_path = fetch::ensure(known)?;
    eprintln!(
        "quantizing {} to INT4 once, into {}",
        known.name,
        folder.display()
    );
    quantize_path(&gguf_path, &folder, true)?;
    Ok(folder)
}

/// Opens a non-quantized checkpoint (Hugging Face folder or GGUF file) with its tokenizer.
pub fn open_source(path: &Path) -> Result<Source> {
    if path.is_dir() && hf::is_hf_folder(path) {
        let weights = hf::HfSource::open(path)?;
        let tokenizer = Tokenizer::from_folder(path)?;
        Ok(Source {
            weights: Box::new(weights),
            tokenizer,
        })
    } else if path.is_file() && gguf::is_gguf_file(path) {
        let weights = gguf::GgufSource::open(path)?;
        let tokenizer = Tokenizer::from_gguf_metadata(&weights.header().metadata)?;
        Ok(Source {
            weights: Box::new(weights),
            tokenizer,
        })
    } else if q4::is_q4_folder(path) {
        Err(Error::Invalid(format!(
            "{} is already quantized; use it with `run` directly",
            path.display()
        )))
    } else {
        Err(Error::Invalid(format!(
            "{}: not a model: {WHAT_IS_A_MODEL}",
            path.display()
        )))
    }
}

/// `q4wgpu quantize SRC DST`: weights, config and tokenizer files into a self-contained folder.
pub fn quantize_path(src: &Path, dst: &Path, progress: bool) -> Result<quantize::QuantizeReport> {
    let source = open_source(src)?;
    let report = quantize::quantize_to_folder(source.weights.as_ref(), dst, progress)?;
    source.tokenizer.write_files(dst)?;
    Ok(report)
}

/// Loads any supported model for inference; non-quantized inputs are quantized in memory.
pub fn load(path: &Path, progress: bool) -> Result<LoadedModel> {
    if path.is_dir() && q4::is_q4_folder(path) {
        let weights = q4::open_q4_folder(path)?;
        let tokenizer = Tokenizer::from_folder(path)?;
        return Ok(LoadedModel {
            weights,
            tokenizer,
            path: path.to_path_buf(),
        });
    }
    let source = open_source(path)?;
    let weights = quantize::quantize_in_memory(source.weights.as_ref(), progress)?;
    Ok(LoadedModel {
        weights,
        tokenizer: source.tokenizer,
        path: path.to_path_buf(),
    })
}

/// What `info` shows of a model, read without quantizing or uploading anything.
pub struct ModelSummary {
    pub config: crate::config::ModelConfig,
    /// Bytes of the INT4 weights file (as it is, or as `quantize` would write it).
    pub int4_bytes: u64,
    /// Already a q4wgpu folder (else quantized on load).
    pub quantized: bool,
}

/// The config and INT4 size of any supported model: a q4wgpu folder is mapped, not read; another
/// format is checked against its config and sized from its tensor shapes.
pub fn summarize(path: &Path) -> Result<ModelSummary> {
    if path.is_dir() && q4::is_q4_folder(path) {
        let weights = q4::open_q4_folder(path)?;
        return Ok(ModelSummary {
            int4_bytes: weights.byte_len() as u64,
            config: weights.config,
            quantized: true,
        });
    }
    let source = open_source(path)?;
    Ok(ModelSummary {
        int4_bytes: quantize::planned_bytes(source.weights.as_ref())?,
        config: source.weights.config().clone(),
        quantized: false,
    })
}
