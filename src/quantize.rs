//! Quantizes a checkpoint (Hugging Face, GGUF: any `WeightSource`) to our INT4 model.
//!
//! Linear weights and lm_head become INT4 block-128 (`quant.rs`, DESIGN.md §4); the embedding
//! table is kept in BF16, norms and biases in F32. With tied embeddings (`tie_word_embeddings`,
//! or a checkpoint without `lm_head.weight`) lm_head is a quantized copy of the embedding table.
//!
//! One source tensor is read (as f32) at a time and its rows are quantized in parallel, so peak
//! memory is about the largest tensor in f32 plus its converted form. The source is checked
//! against its config first: every tensor the config implies must be there with its shape.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::formats::hf::CONFIG_FILE;
use crate::formats::q4::{is_q4_folder, write_config, Q4Writer, TensorSpec, Q4_WEIGHTS_FILE};
use crate::quant::QMatrix;
use crate::weights::{
    is_quantized_name, Blob, DenseDtype, F32Tensor, ModelWeights, Weight, WeightSource,
};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

pub const EMBED: &str = "model.embed_tokens.weight";
pub const LM_HEAD: &str = "lm_head.weight";

/// The tensors a checkpoint must have for `config`, with their shapes, in model order.
/// lm_head is not listed: it is optional (tied embeddings).
pub fn expected_tensors(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let h = config.hidden_size;
    let (q, kv, ffn) = (config.q_dim(), config.kv_dim(), config.intermediate_size);
    let mut out = vec![(EMBED.to_string(), vec![config.vocab_size, h])];
    for layer in 0..config.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
        if config.qkv_bias() {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
        }
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
        if config.o_bias() {
            out.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
        }
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![ffn, h]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![ffn, h]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![h, ffn]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    out
}

/// The stored form of one tensor: INT4 for linear weights and lm_head, BF16 for the embedding
/// table, F32 for the rest (norms, biases).
pub fn quantize_tensor(name: &str, t: F32Tensor) -> Result<Weight> {
    let n: usize = t.shape.iter().product();
    if t.data.len() != n {
        return Err(Error::Invalid(format!(
            "tensor {name:?}: {} values for shape {:?}",
            t.data.len(),
            t.shape
        )));
    }
    if is_quantized_name(name) {
        let &[rows, cols] = t.shape.as_slice() else {
            return Err(Error::Invalid(format!(
                "tensor {name:?} is to be quantized but has shape {:?}, not 2-D",
                t.shape
            )));
        };
        Ok(Weight::from_qmatrix(QMatrix::quantize(&t.data, rows, cols)))
    } else if name == EMBED {
        Ok(bf16_weight(t.shape, &t.data))
    } else {
        Ok(Weight::dense_f32(t.shape, &t.data))
    }
}

/// A BF16 dense weight built straight into its blob's words (two values per little-endian word),
/// so a large embedding table is not copied twice on the way.
fn bf16_weight(shape: Vec<usize>, data: &[f32]) -> Weight {
    use rayon::prelude::*;
    let bits = |v: f32| half::bf16::from_f32(v).to_bits() as u32;
    let mut words = vec![0u32; data.len().div_ceil(2)];
    words
        .par_iter_mut()
        .zip(data.par_chunks(2))
        .for_each(|(w, pair)| *w = bits(pair[0]) | pair.get(1).map_or(0, |&v| bits(v) << 16));
    Weight::Dense {
        shape,
        dtype: DenseDtype::BF16,
        data: Blob::Owned(std::sync::Arc::new(words), data.len() * 2),
    }
}

fn spec_for(name: &str, shape: &[usize]) -> TensorSpec {
    if is_quantized_name(name) && shape.len() == 2 {
        TensorSpec::Q4 {
            rows: shape[0],
            cols: shape[1],
        }
    } else if name == EMBED {
        TensorSpec::Dense {
            shape: shape.to_vec(),
            dtype: DenseDtype::BF16,
        }
    } else {
        TensorSpec::Dense {
            shape: shape.to_vec(),
            dtype: DenseDtype::F32,
        }
    }
}

/// What will be read and written, after checking the source against its config.
struct Plan {
    /// Source tensors to read, with their shapes, in model order (lm_head last when untied).
    reads: Vec<(String, Vec<usize>)>,
    /// lm_head is the quantized embedding table.
    tied: bool,
    /// Source tensors the model does not use.
    ignored: Vec<String>,
}

impl Plan {
    fn new(source: &dyn WeightSource) -> Result<Plan> {
        let config = source.config();
        config.validate()?;
        let names: std::collections::BTreeSet<String> = source.tensor_names().into_iter().collect();
        let mut reads = expected_tensors(config);
        let tied = config.tie_word_embeddings || !names.contains(LM_HEAD);
        if !tied {
            reads.push((
                LM_HEAD.to_string(),
                vec![config.vocab_size, config.hidden_size],
            ));
        }
        for (name, shape) in &reads {
            if !names.contains(name) {
                return Err(Error::Config(format!(
                    "the checkpoint lacks tensor {name:?}, which its config implies ({} layers, hidden {}, {:?})",
                    config.num_hidden_layers, config.hidden_size, config.architectures
                )));
            }
            let found = source.shape(name)?;
            if &found != shape {
                return Err(Error::Config(format!(
                    "tensor {name:?} has shape {found:?}, but the config implies {shape:?}"
                )));
            }
        }
        let used: std::collections::HashSet<&str> = reads
            .iter()
            .map(|(n, _)| n.as_str())
            .chain(std::iter::once(LM_HEAD))
            .collect();
        let ignored = names
            .iter()
            .filter(|n| !used.contains(n.as_str()))
            .cloned()
            .collect();
        Ok(Plan {
            reads,
            tied,
            ignored,
        })
    }

    /// Output tensors with their specs.
    fn specs(&self) -> BTreeMap<String, TensorSpec> {
        let mut specs: BTreeMap<String, TensorSpec> = self
            .reads
            .iter()
            .map(|(n, s)| (n.clone(), spec_for(n, s)))
            .collect();
        if self.tied {
            let embed = &self.reads[0].1;
            specs.insert(LM_HEAD.to_string(), spec_for(LM_HEAD, embed));
        }
        specs
    }

    fn f32_bytes(&self) -> u64 {
        self.reads
            .iter()
            .map(|(_, s)| 4 * s.iter().product::<usize>() as u64)
            .sum()
    }

    /// Reads each source tensor once, hands `emit` its stored form(s), one tensor at a time.
    fn run(
        &self,
        source: &dyn WeightSource,
        bar: &indicatif::ProgressBar,
        emit: &mut dyn FnMut(&str, Weight) -> Result<()>,
    ) -> Result<u64> {
        let mut largest = 0u64;
        for (name, shape) in &self.reads {
            bar.set_message(name.clone());
            let t = source.read_f32(name)?;
            if &t.shape != shape || t.data.len() != shape.iter().product::<usize>() {
                return Err(Error::Config(format!(
                    "tensor {name:?} read as shape {:?} with {} values; expected {shape:?}",
                    t.shape,
                    t.data.len()
                )));
            }
            let bytes = 4 * t.data.len() as u64;
            largest = largest.max(bytes);
            if self.tied && name == EMBED {
                let (rows, cols) = (shape[0], shape[1]);
                emit(EMBED, bf16_weight(t.shape.clone(), &t.data))?;
                emit(
                    LM_HEAD,
                    Weight::from_qmatrix(QMatrix::quantize(&t.data, rows, cols)),
                )?;
            } else {
                emit(name, quantize_tensor(name, t)?)?;
            }
            bar.inc(bytes);
        }
        bar.finish_and_clear();
        Ok(largest)
    }
}

fn progress_bar(show: bool, total: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "quantizing {bar:30} {binary_bytes}/{binary_total_bytes} (f32) {elapsed} {wide_msg}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Bytes the INT4 weights of `source` take once quantized (from the shapes; nothing is read).
pub fn planned_bytes(source: &dyn WeightSource) -> Result<u64> {
    Ok(Plan::new(source)?.specs().values().map(TensorSpec::byte_len).sum())
}

/// Quantizes a whole model into memory (how `run` loads a Hugging Face folder or a GGUF file).
pub fn quantize_in_memory(source: &dyn WeightSource, progress: bool) -> Result<ModelWeights> {
    let plan = Plan::new(source)?;
    let bar = progress_bar(progress, plan.f32_bytes());
    let mut tensors = BTreeMap::new();
    plan.run(source, &bar, &mut |name, w| {
        tensors.insert(name.to_string(), w);
        Ok(())
    })?;
    Ok(ModelWeights {
        config: source.config().clone(),
        tensors,
    })
}

/// What `quantize_to_folder` did.
#[derive(Clone, Debug)]
pub struct QuantizeReport {
    /// Tensors written (lm_head included).
    pub tensors: usize,
    /// Of those, INT4 matrices.
    pub quantized: usize,
    /// lm_head was made from the embedding table.
    pub tied_lm_head: bool,
    /// Source tensors the model does not use (not written).
    pub ignored: Vec<String>,
    /// Size of model.q4.safetensors.
    pub bytes_written: u64,
    /// The largest source tensor in f32: what peak memory should be about (plus its output).
    pub largest_tensor_f32_bytes: u64,
    /// The process's peak resident memory (Linux VmHWM) at the end; `None` where unknown.
    pub peak_rss_bytes: Option<u64>,
    pub seconds: f64,
}

/// Quantizes `source` into the folder `dst`: `config.json` and `model.q4.safetensors` (the caller
/// adds the tokenizer files). `dst` must be new, empty, or a q4wgpu folder to be replaced: any
/// other folder with files in it (a source checkpoint included) is refused before anything is written.
pub fn quantize_to_folder(
    source: &dyn WeightSource,
    dst: &Path,
    progress: bool,
) -> Result<QuantizeReport> {
    let start = Instant::now();
    let created = !dst.exists();
    prepare_destination(dst)?;
    let plan = Plan::new(source)?;
    let specs = plan.specs();
    let quantized = specs
        .values()
        .filter(|s| matches!(s, TensorSpec::Q4 { .. }))
        .count();
    std::fs::create_dir_all(dst).map_err(|e| Error::io("creating folder", dst, e))?;
    if created {
        // An interrupt removes the folder again if it is still empty (the writer removes its file).
        crate::interrupt::register_folder(dst);
    }
    let mut writer = Q4Writer::create(&dst.join(Q4_WEIGHTS_FILE), &specs)?;
    let bar = progress_bar(progress, plan.f32_bytes());
    let largest = plan.run(source, &bar, &mut |name, w| writer.write(name, &w))?;
    let bytes_written = writer.finish()?;
    write_config(dst, source.config())?;
    crate::interrupt::forget_folder(dst);
    Ok(QuantizeReport {
        tensors: specs.len(),
        quantized,
        tied_lm_head: plan.tied,
        ignored: plan.ignored,
        bytes_written,
        largest_tensor_f32_bytes: largest,
        peak_rss_bytes: peak_rss_bytes(),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Refuses a destination that holds anything but a q4wgpu model.
fn prepare_destination(dst: &Path) -> Result<()> {
    if !dst.exists() {
        return Ok(());
    }
    if !dst.is_dir() {
        return Err(Error::Invalid(format!(
            "{} exists and is not a folder",
            dst.display()
        )));
    }
    let names: Vec<std::ffi::OsString> = std::fs::read_dir(dst)
        .map_err(|e| Error::io("listing", dst, e))?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::io("listing", dst, e))?;
    if names.is_empty() || is_q4_folder(dst) {
        return Ok(());
    }
    // Only the temporary files of an interrupted `quantize`: ours to remove, then start afresh.
    if names.iter().all(|n| is_our_leftover(n)) {
        for n in &names {
            let path = dst.join(n);
            std::fs::remove_file(&path)
                .map_err(|e| Error::io("removing an earlier run's temporary file", &path, e))?;
        }
        return Ok(());
    }
    let what = if dst.join(CONFIG_FILE).exists() {
        " (it holds a model: never quantize into the source folder)"
    } else {
        ""
    };
    Err(Error::Invalid(format!(
        "{} is not empty and is not a q4wgpu model folder{what}; choose a new or empty folder. Nothing was written.",
        dst.display()
    )))
}

/// A temporary file that an interrupted `quantize` may leave (`<our output file>.tmp`).
fn is_our_leftover(name: &std::ffi::OsStr) -> bool {
    let outputs = [
        Q4_WEIGHTS_FILE,
        CONFIG_FILE,
        "tokenizer.json",
        "tokenizer_config.json",
    ];
    name.to_str()
        .and_then(|n| n.strip_suffix(".tmp"))
        .is_some_and(|stem| outputs.contains(&stem))
}

/// Peak resident set size of this process (Linux: VmHWM in /proc/self/status).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}
