//! Model weights as the runtime sees them: INT4 matrices plus 16/32-bit dense tensors, either
//! memory-mapped from our INT4 file or quantized in memory from another format. And the
//! `WeightSource` trait through which the quantizer reads other formats (Hugging Face, GGUF).

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::quant::{blocks_per_row, QMatrix, QView, WORDS_PER_BLOCK};
use half::{bf16, f16};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A tensor of a source checkpoint converted to f32, row-major.
#[derive(Clone, Debug)]
pub struct F32Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A checkpoint in some other format, read one tensor at a time (so a 65 GB model never sits in RAM).
/// Names are Hugging Face names (`model.layers.0.self_attn.q_proj.weight`).
pub trait WeightSource: Send + Sync {
    fn config(&self) -> &ModelConfig;
    /// All tensor names, sorted.
    fn tensor_names(&self) -> Vec<String>;
    fn shape(&self, name: &str) -> Result<Vec<usize>>;
    fn read_f32(&self, name: &str) -> Result<F32Tensor>;
}

/// Bytes that are either a range of a memory-mapped file or owned words (owned as u32 for alignment).
#[derive(Clone, Debug)]
pub enum Blob {
    Mapped {
        map: Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
    },
    Owned(Arc<Vec<u32>>, usize),
}

impl Blob {
    pub fn from_bytes(bytes: &[u8]) -> Blob {
        let mut words = vec![0u32; bytes.len().div_ceil(4)];
        bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Blob::Owned(Arc::new(words), bytes.len())
    }

    pub fn from_words(words: Vec<u32>) -> Blob {
        let len = words.len() * 4;
        Blob::Owned(Arc::new(words), len)
    }

    pub fn bytes(&self) -> &[u8] {
        match self {
            Blob::Mapped { map, offset, len } => &map[*offset..*offset + *len],
            Blob::Owned(words, len) => &bytemuck::cast_slice::<u32, u8>(words)[..*len],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseDtype {
    F32,
    F16,
    BF16,
}

impl DenseDtype {
    pub fn size(self) -> usize {
        match self {
            DenseDtype::F32 => 4,
            DenseDtype::F16 | DenseDtype::BF16 => 2,
        }
    }
}

#[derive(Clone, Debug)]
pub enum Weight {
    /// INT4 block-128 matrix `[rows, cols]` (layout in `quant.rs`).
    Q4 {
        rows: usize,
        cols: usize,
        qweight: Blob,
        scales: Blob,
    },
    /// Embeddings, norms and biases: kept in 16 or 32 bits.
    Dense {
        shape: Vec<usize>,
        dtype: DenseDtype,
        data: Blob,
    },
}

impl Weight {
    pub fn from_qmatrix(m: QMatrix) -> Weight {
        let scale_bytes: Vec<u8> = bytemuck::cast_slice(&m.scales).to_vec();
        Weight::Q4 {
            rows: m.rows,
            cols: m.cols,
            qweight: Blob::from_words(m.qweight),
            scales: Blob::from_bytes(&scale_bytes),
        }
    }

    pub fn dense_bf16(shape: Vec<usize>, data: &[f32]) -> Weight {
        let bits: Vec<u16> = data.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        Weight::Dense {
            shape,
            dtype: DenseDtype::BF16,
            data: Blob::from_bytes(bytemuck::cast_slice(&bits)),
        }
    }

    pub fn dense_f32(shape: Vec<usize>, data: &[f32]) -> Weight {
        Weight::Dense {
            shape,
            dtype: DenseDtype::F32,
            data: Blob::from_bytes(bytemuck::cast_slice(data)),
        }
    }

    /// Bytes this weight occupies (on disk, in host memory, on the GPU).
    pub fn byte_len(&self) -> usize {
        match self {
            Weight::Q4 {
                qweight, scales, ..
            } => qweight.bytes().len() + scales.bytes().len(),
            Weight::Dense { data, .. } => data.bytes().len(),
        }
    }
}

/// Decodes 16/32-bit little-endian values to f32.
pub fn dense_to_f32(dtype: DenseDtype, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DenseDtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DenseDtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DenseDtype::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
    }
}

/// All weights of one model, by Hugging Face name, with the config they belong to.
#[derive(Clone, Debug)]
pub struct ModelWeights {
    pub config: ModelConfig,
    pub tensors: BTreeMap<String, Weight>,
}

impl ModelWeights {
    pub fn get(&self, name: &str) -> Result<&Weight> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::Config(format!("the model has no tensor {name:?}")))
    }

    /// An INT4 matrix, checked against its expected shape.
    pub fn q4(&self, name: &str) -> Result<QView<'_>> {
        match self.get(name)? {
            Weight::Q4 {
                rows,
                cols,
                qweight,
                scales,
            } => {
                let bpr = blocks_per_row(*cols);
                let words: &[u32] = bytemuck::try_cast_slice(qweight.bytes()).map_err(|e| {
                    Error::Config(format!(
                        "{name}: INT4 words misaligned ({e}); re-quantize the model"
                    ))
                })?;
                let sc: &[u16] = bytemuck::try_cast_slice(scales.bytes()).map_err(|e| {
                    Error::Config(format!(
                        "{name}: scales misaligned ({e}); re-quantize the model"
                    ))
                })?;
                if words.len() != rows * bpr * WORDS_PER_BLOCK || sc.len() != rows * bpr {
                    return Err(Error::Config(format!(
                        "{name}: INT4 data does not match its shape [{rows}, {cols}]"
                    )));
                }
                Ok(QView {
                    rows: *rows,
                    cols: *cols,
                    qweight: words,
                    scales: sc,
                })
            }
            Weight::Dense { .. } => Err(Error::Config(format!(
                "{name}: expected an INT4 matrix, found a dense tensor"
            ))),
        }
    }

    /// A dense tensor as f32 with its shape (norms, biases; small).
    pub fn dense_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        match self.get(name)? {
            Weight::Dense { shape, dtype, data } => {
                let n: usize = shape.iter().product();
                if data.bytes().len() != n * dtype.size() {
                    return Err(Error::Config(format!(
                        "{name}: data does not match its shape {shape:?}"
                    )));
                }
                let mut out = vec![0.0; n];
                dense_to_f32(*dtype, data.bytes(), &mut out);
                Ok((shape.clone(), out))
            }
            Weight::Q4 { .. } => Err(Error::Config(format!(
                "{name}: expected a dense tensor, found an INT4 matrix"
            ))),
        }
    }

    /// Row `token` of the embedding table as f32 (the table stays 16-bit; a row is converted on use).
    pub fn embedding_row(&self, token: u32, out: &mut [f32]) -> Result<()> {
        let name = "model.embed_tokens.weight";
        match self.get(name)? {
            Weight::Dense { shape, dtype, data } if shape.len() == 2 => {
                let (vocab, hidden) = (shape[0], shape[1]);
                if token as usize >= vocab || out.len() != hidden {
                    return Err(Error::Invalid(format!(
                        "token id {token} is outside the vocabulary of {vocab}"
                    )));
                }
                let row = hidden * dtype.size();
                let start = token as usize * row;
                dense_to_f32(*dtype, &data.bytes()[start..start + row], out);
                Ok(())
            }
            _ => Err(Error::Config(format!(
                "{name}: expected a 2-D dense tensor"
            ))),
        }
    }

    /// Total bytes of all weights.
    pub fn byte_len(&self) -> usize {
        self.tensors.values().map(Weight::byte_len).sum()
    }
}

/// Names that are quantized to INT4: every linear weight and lm_head. Embeddings, norms, biases stay dense.
pub fn is_quantized_name(name: &str) -> bool {
    name == "lm_head.weight"
        || (name.ends_with("_proj.weight") && name.starts_with("model.layers."))
}
