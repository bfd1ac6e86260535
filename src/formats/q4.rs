//! Our quantized model folder: `config.json`, the tokenizer files, and `model.q4.safetensors`.
//!
//! `model.q4.safetensors` is a plain safetensors container, so any safetensors tool can list it:
//! - an INT4 matrix `NAME` (Hugging Face name, `[rows, cols]`) is stored as `NAME.qweight`
//!   (U32, `[rows, blocks * 16]`, the word layout of `quant.rs`) and `NAME.scales`
//!   (BF16, `[rows, blocks]`), with `blocks = ceil(cols / 128)`;
//! - dense tensors keep their names: the embedding table in BF16, norms and biases in F32;
//! - `__metadata__`: `format` = `q4wgpu-int4`, `format_version` = `1`, `block_size` = `128`, and
//!   `q4_shapes`, a JSON object NAME → `[rows, cols]` (cols cannot be recovered from the padded shape).
//!
//! The header is padded with spaces so the data section starts on a 4096-byte boundary (a mapped
//! file's views are then aligned). Tensors are ordered by element width, then by name: all U32
//! words first (each a multiple of 64 bytes, so every matrix starts 64-byte aligned), then F32,
//! then the 16-bit tensors. The same tensors therefore always give the same bytes.
//!
//! Writing is streamed: the layout is computed from the shapes alone, the header written first,
//! then each tensor written at its offset as it is produced, in any order. The file is written as
//! `model.q4.safetensors.tmp` and renamed when complete, so a failure never leaves a half file
//! and never clobbers an existing one.

use super::hf::{
    encode_header, map_file, tmp_path, write_atomically, HeaderEntry, Scratch, CONFIG_FILE,
};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::quant::{blocks_per_row, BLOCK, WORDS_PER_BLOCK};
use crate::weights::{is_quantized_name, Blob, DenseDtype, ModelWeights, Weight};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const Q4_WEIGHTS_FILE: &str = "model.q4.safetensors";
pub const FORMAT: &str = "q4wgpu-int4";
pub const FORMAT_VERSION: u32 = 1;
/// The data section starts at a multiple of this (one page).
const DATA_ALIGN: usize = 4096;
/// The safetensors crate refuses larger headers; so do we.
const MAX_HEADER: u64 = 100_000_000;

/// What a tensor of the file will hold; known before its data is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TensorSpec {
    Q4 {
        rows: usize,
        cols: usize,
    },
    Dense {
        shape: Vec<usize>,
        dtype: DenseDtype,
    },
}

impl TensorSpec {
    pub fn of(weight: &Weight) -> TensorSpec {
        match weight {
            Weight::Q4 { rows, cols, .. } => TensorSpec::Q4 {
                rows: *rows,
                cols: *cols,
            },
            Weight::Dense { shape, dtype, .. } => TensorSpec::Dense {
                shape: shape.clone(),
                dtype: *dtype,
            },
        }
    }

    /// The file's tensors for this spec, in the order `Weight` holds their data.
    fn parts(&self) -> Vec<Part> {
        match self {
            TensorSpec::Q4 { rows, cols } => {
                let blocks = blocks_per_row(*cols);
                let words = blocks * WORDS_PER_BLOCK;
                vec![
                    Part {
                        suffix: ".qweight",
                        dtype: Dtype::U32,
                        shape: vec![*rows, words],
                        bytes: (rows * words * 4) as u64,
                    },
                    Part {
                        suffix: ".scales",
                        dtype: Dtype::BF16,
                        shape: vec![*rows, blocks],
                        bytes: (rows * blocks * 2) as u64,
                    },
                ]
            }
            TensorSpec::Dense { shape, dtype } => {
                let n: usize = shape.iter().product();
                vec![Part {
                    suffix: "",
                    dtype: dense_dtype(*dtype),
                    shape: shape.clone(),
                    bytes: (n * dtype.size()) as u64,
                }]
            }
        }
    }

    pub fn byte_len(&self) -> u64 {
        self.parts().iter().map(|p| p.bytes).sum()
    }
}

/// One safetensors tensor of the file: an INT4 matrix has two, a dense tensor one.
struct Part {
    /// Appended to the weight's name to name the stored tensor.
    suffix: &'static str,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: u64,
}

fn dense_dtype(d: DenseDtype) -> Dtype {
    match d {
        DenseDtype::F32 => Dtype::F32,
        DenseDtype::F16 => Dtype::F16,
        DenseDtype::BF16 => Dtype::BF16,
    }
}

/// Order of the groups in the file: widest elements first keeps every tensor aligned.
fn dtype_group(d: Dtype) -> u8 {
    match d {
        Dtype::U32 => 0,
        Dtype::F32 => 1,
        _ => 2,
    }
}

/// Where one declared weight goes in the file.
struct Slot {
    spec: TensorSpec,
    /// Absolute file offset of each of its parts.
    offsets: Vec<u64>,
    written: bool,
}

/// Streams the tensors of one `model.q4.safetensors` to disk.
pub struct Q4Writer {
    path: PathBuf,
    tmp: PathBuf,
    file: File,
    slots: BTreeMap<String, Slot>,
    total: u64,
    scratch: Scratch,
}

impl Q4Writer {
    /// Lays out the file for `specs` and writes its header to `path.tmp`.
    pub fn create(path: &Path, specs: &BTreeMap<String, TensorSpec>) -> Result<Q4Writer> {
        // Every stored tensor: (group, stored name, owning weight, part index, part).
        let mut layout = Vec::new();
        let mut q4_shapes = BTreeMap::new();
        for (name, spec) in specs {
            if let TensorSpec::Q4 { rows, cols } = spec {
                q4_shapes.insert(name.clone(), [*rows, *cols]);
            }
            for (i, part) in spec.parts().into_iter().enumerate() {
                layout.push((
                    dtype_group(part.dtype),
                    format!("{name}{}", part.suffix),
                    name,
                    i,
                    part,
                ));
            }
        }
        layout.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let mut stored = std::collections::HashSet::new();
        if let Some(dup) = layout.iter().find(|l| !stored.insert(&l.1)) {
            return Err(Error::Invalid(format!(
                "two tensors would both be stored as {:?}",
                dup.1
            )));
        }
        let q4_shapes =
            serde_json::to_string(&q4_shapes).map_err(|e| Error::Invalid(e.to_string()))?;
        let metadata = [
            ("block_size".to_string(), BLOCK.to_string()),
            ("format".to_string(), FORMAT.to_string()),
            ("format_version".to_string(), FORMAT_VERSION.to_string()),
            ("q4_shapes".to_string(), q4_shapes),
        ];
        let entries: Vec<HeaderEntry> = layout
            .iter()
            .map(|(_, stored, _, _, part)| HeaderEntry {
                name: stored.clone(),
                dtype: dtype_name(part.dtype),
                shape: part.shape.clone(),
                bytes: part.bytes,
            })
            .collect();
        let header = encode_header(&metadata, &entries, DATA_ALIGN);

        let mut slots: BTreeMap<String, Slot> = specs
            .iter()
            .map(|(name, spec)| {
                let offsets = vec![0; spec.parts().len()];
                (
                    name.clone(),
                    Slot {
                        spec: spec.clone(),
                        offsets,
                        written: false,
                    },
                )
            })
            .collect();
        let mut offset = header.len() as u64;
        for (_, _, owner, i, part) in &layout {
            if let Some(slot) = slots.get_mut(*owner) {
                slot.offsets[*i] = offset;
            }
            offset += part.bytes;
        }

        let tmp = tmp_path(path);
        let mut scratch = Scratch::new();
        scratch.add(tmp.clone());
        let mut file = File::create(&tmp).map_err(|e| Error::io("creating", &tmp, e))?;
        file.write_all(&header)
            .map_err(|e| Error::io("writing", &tmp, e))?;
        file.set_len(offset)
            .map_err(|e| Error::io("sizing", &tmp, e))?;
        Ok(Q4Writer {
            path: path.to_path_buf(),
            tmp,
            file,
            slots,
            total: offset,
            scratch,
        })
    }

    /// Writes one tensor (any order; each exactly once). It must match the spec it was declared with.
    pub fn write(&mut self, name: &str, weight: &Weight) -> Result<()> {
        let slot = self.slots.get_mut(name).ok_or_else(|| {
            Error::Invalid(format!(
                "tensor {name:?} was not declared when the file was laid out"
            ))
        })?;
        let spec = TensorSpec::of(weight);
        if spec != slot.spec {
            return Err(Error::Invalid(format!(
                "tensor {name:?} is {spec:?}, but was declared as {:?}",
                slot.spec
            )));
        }
        if slot.written {
            return Err(Error::Invalid(format!("tensor {name:?} was written twice")));
        }
        let blobs: Vec<&Blob> = match weight {
            Weight::Q4 {
                qweight, scales, ..
            } => vec![qweight, scales],
            Weight::Dense { data, .. } => vec![data],
        };
        for ((blob, &offset), part) in blobs.iter().zip(&slot.offsets).zip(spec.parts()) {
            if blob.bytes().len() as u64 != part.bytes {
                return Err(Error::Invalid(format!(
                    "tensor {name:?}{}: {} bytes of data, its shape needs {}",
                    part.suffix,
                    blob.bytes().len(),
                    part.bytes
                )));
            }
            self.file
                .seek(SeekFrom::Start(offset))
                .map_err(|e| Error::io("writing", &self.tmp, e))?;
            self.file
                .write_all(blob.bytes())
                .map_err(|e| Error::io("writing", &self.tmp, e))?;
        }
        slot.written = true;
        Ok(())
    }

    /// Checks every tensor was written, syncs, and renames the file into place. Returns its size.
    pub fn finish(mut self) -> Result<u64> {
        let missing: Vec<&String> = self
            .slots
            .iter()
            .filter(|(_, s)| !s.written)
            .map(|(n, _)| n)
            .collect();
        if !missing.is_empty() {
            return Err(Error::Invalid(format!(
                "tensors never written: {missing:?}"
            )));
        }
        self.file
            .sync_all()
            .map_err(|e| Error::io("writing", &self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|e| Error::io("renaming into place", &self.path, e))?;
        self.scratch.forget(&self.tmp);
        Ok(self.total)
    }
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::U32 => "U32",
        Dtype::F32 => "F32",
        Dtype::F16 => "F16",
        _ => "BF16",
    }
}

/// Writes all tensors of an in-memory model to `path` (e.g. the result of quantizing on load).
pub fn write_q4_weights(path: &Path, weights: &ModelWeights) -> Result<u64> {
    let specs = weights
        .tensors
        .iter()
        .map(|(n, w)| (n.clone(), TensorSpec::of(w)))
        .collect();
    let mut writer = Q4Writer::create(path, &specs)?;
    for (name, weight) in &weights.tensors {
        writer.write(name, weight)?;
    }
    writer.finish()
}

/// Writes `config.json` of a q4wgpu folder (atomically).
pub fn write_config(dir: &Path, config: &ModelConfig) -> Result<()> {
    let text = serde_json::to_string_pretty(config).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomically(&dir.join(CONFIG_FILE), text.as_bytes())
}

/// Reads only the `__metadata__` of a safetensors file (cheap: the header, not the data).
fn read_header_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let mut file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| Error::io("reading the header of", path, e))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER {
        return Err(Error::format(
            path,
            format!("header length {len} is not plausible: not a safetensors file"),
        ));
    }
    let mut header = Vec::new();
    file.take(len)
        .read_to_end(&mut header)
        .map_err(|e| Error::io("reading the header of", path, e))?;
    #[derive(serde::Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: HashMap<String, String>,
    }
    let header: Header = serde_json::from_slice(&header)
        .map_err(|e| Error::format(path, format!("not a safetensors header ({e})")))?;
    Ok(header.metadata)
}

/// True when `dir` holds a q4wgpu weights file (of any format version).
pub fn is_q4_folder(dir: &Path) -> bool {
    read_header_metadata(&dir.join(Q4_WEIGHTS_FILE))
        .is_ok_and(|m| m.get("format").map(String::as_str) == Some(FORMAT))
}

/// Opens a q4wgpu folder: the config, and every tensor as a view of the memory-mapped file.
pub fn open_q4_folder(dir: &Path) -> Result<ModelWeights> {
    if dir.is_file() {
        return Err(Error::Invalid(format!(
            "{} is a file; a q4wgpu model is a folder holding config.json and {Q4_WEIGHTS_FILE}",
            dir.display()
        )));
    }
    let path = dir.join(Q4_WEIGHTS_FILE);
    if !path.is_file() {
        let hint = if super::hf::is_hf_folder(dir) {
            "it is a Hugging Face folder, not a q4wgpu folder: quantize it first (q4wgpu quantize)"
        } else {
            "not a q4wgpu model folder"
        };
        return Err(Error::format(
            dir,
            format!("no {Q4_WEIGHTS_FILE} here: {hint}"),
        ));
    }
    let config = ModelConfig::from_file(&dir.join(CONFIG_FILE))?;
    let map = Arc::new(map_file(&path)?);
    let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
        Error::format(&path, format!("not a valid safetensors file ({e}); the file may be truncated: quantize the model again"))
    })?;
    let data_start = 8 + header_len;
    let meta = metadata.metadata().clone().unwrap_or_default();
    let q4_shapes = check_metadata(&path, &meta)?;

    let infos = metadata.tensors();
    let find = |name: &str, dtype: Dtype, shape: &[usize], align: usize| -> Result<Blob> {
        let info = infos
            .get(name)
            .ok_or_else(|| Error::format(&path, format!("tensor {name:?} is missing")))?;
        if info.dtype != dtype || info.shape != shape {
            return Err(Error::format(
                &path,
                format!(
                    "tensor {name:?} is {} {:?}, expected {dtype} {shape:?}",
                    info.dtype, info.shape
                ),
            ));
        }
        let (begin, end) = info.data_offsets;
        let offset = data_start + begin;
        if offset % align != 0 {
            return Err(Error::format(
                &path,
                format!("tensor {name:?} is not {align}-byte aligned: quantize the model again"),
            ));
        }
        Ok(Blob::Mapped {
            map: map.clone(),
            offset,
            len: end - begin,
        })
    };

    let mut tensors = BTreeMap::new();
    for (name, &[rows, cols]) in &q4_shapes {
        let blocks = blocks_per_row(cols);
        let qweight = find(
            &format!("{name}.qweight"),
            Dtype::U32,
            &[rows, blocks * WORDS_PER_BLOCK],
            4,
        )?;
        let scales = find(&format!("{name}.scales"), Dtype::BF16, &[rows, blocks], 2)?;
        tensors.insert(
            name.clone(),
            Weight::Q4 {
                rows,
                cols,
                qweight,
                scales,
            },
        );
    }
    for (name, info) in &infos {
        let owner = name
            .strip_suffix(".qweight")
            .or_else(|| name.strip_suffix(".scales"));
        if owner.is_some_and(|o| q4_shapes.contains_key(o)) {
            continue;
        }
        let dtype = match info.dtype {
            Dtype::F32 => DenseDtype::F32,
            Dtype::F16 => DenseDtype::F16,
            Dtype::BF16 => DenseDtype::BF16,
            other => {
                return Err(Error::format(
                    &path,
                    format!(
                        "tensor {name:?} has dtype {other}; dense tensors are BF16, F16 or F32"
                    ),
                ))
            }
        };
        let data = find(name, info.dtype, &info.shape, dtype.size())?;
        tensors.insert(
            name.clone(),
            Weight::Dense {
                shape: info.shape.clone(),
                dtype,
                data,
            },
        );
    }
    let weights = ModelWeights { config, tensors };
    check_against_config(&path, &weights)?;
    Ok(weights)
}

/// Checks the format metadata; returns `q4_shapes`.
fn check_metadata(
    path: &Path,
    meta: &HashMap<String, String>,
) -> Result<BTreeMap<String, [usize; 2]>> {
    match meta.get("format") {
        Some(f) if f == FORMAT => {}
        other => {
            return Err(Error::format(
                path,
                format!(
                    "not a q4wgpu file (format metadata {:?}, expected {FORMAT:?}); quantize the model with q4wgpu",
                    other.map(String::as_str).unwrap_or("missing")
                ),
            ))
        }
    }
    let version: u32 = meta
        .get("format_version")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::format(path, "format_version is missing or not a number"))?;
    if version > FORMAT_VERSION {
        return Err(Error::format(
            path,
            format!(
                "written by a newer q4wgpu (format version {version}; this build reads up to {FORMAT_VERSION}): upgrade q4wgpu"
            ),
        ));
    }
    if version == 0 {
        return Err(Error::format(path, "format_version 0 does not exist"));
    }
    if meta.get("block_size").map(String::as_str) != Some(&BLOCK.to_string()) {
        return Err(Error::format(
            path,
            format!("block_size {:?} is not {BLOCK}", meta.get("block_size")),
        ));
    }
    let shapes = meta
        .get("q4_shapes")
        .ok_or_else(|| Error::format(path, "q4_shapes metadata is missing"))?;
    serde_json::from_str(shapes)
        .map_err(|e| Error::format(path, format!("q4_shapes metadata is not valid: {e}")))
}

/// Every tensor the config implies must be present with the right kind and shape.
fn check_against_config(path: &Path, weights: &ModelWeights) -> Result<()> {
    let config = &weights.config;
    let mut expected = crate::quantize::expected_tensors(config);
    expected.push((
        "lm_head.weight".to_string(),
        vec![config.vocab_size, config.hidden_size],
    ));
    for (name, shape) in expected {
        let found = weights.tensors.get(&name).ok_or_else(|| {
            Error::format(
                path,
                format!("tensor {name:?} is missing; config.json implies it"),
            )
        })?;
        let found_shape = match found {
            Weight::Q4 { rows, cols, .. } => vec![*rows, *cols],
            Weight::Dense { shape, .. } => shape.clone(),
        };
        let kind_ok = matches!(found, Weight::Q4 { .. }) == is_quantized_name(&name);
        if found_shape != shape || !kind_ok {
            return Err(Error::format(
                path,
                format!(
                    "tensor {name:?} is {} {found_shape:?}; config.json implies {} {shape:?}",
                    if matches!(found, Weight::Q4 { .. }) {
                        "INT4"
                    } else {
                        "dense"
                    },
                    if is_quantized_name(&name) {
                        "INT4"
                    } else {
                        "dense"
                    },
                ),
            ));
        }
    }
    Ok(())
}
