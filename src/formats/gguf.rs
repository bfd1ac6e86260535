//! GGUF (v2, v3): metadata, tensor table, and dequantization of llama.cpp's block formats to f32.
//!
//! # File layout (all little-endian)
//! ```text
//! "GGUF"  u32 version  u64 tensor_count  u64 kv_count
//! kv_count     × { string key, u32 value_type, value }
//! tensor_count × { string name, u32 n_dims, n_dims × u64 ne, u32 ggml_type, u64 offset }
//! zero padding up to a multiple of `general.alignment` (default 32)
//! tensor data; each tensor starts at data_offset + offset
//! ```
//! A string is a u64 byte length and UTF-8 bytes; an array is a u32 element type, a u64 count and
//! the elements. Dimensions are in ggml order: `ne[0]` is the contiguous one, so a matrix of
//! Hugging Face shape `[rows, cols]` has `ne = [cols, rows]`. Version 1 (u32 counts) is refused.
//!
//! Every count and length read from the file is checked against the bytes that remain before
//! anything is allocated, so a corrupt header gives an error, never a huge allocation or a panic.
//!
//! # Block formats (ggml's, `d`/`m`/`dmin` are f16)
//! | type | elements | bytes | layout → value |
//! | --- | --- | --- | --- |
//! | Q8_0 | 32 | 34 | d, 32 × i8 q → d·q |
//! | Q4_0 | 32 | 18 | d, 16 bytes: element j in the low nibble of byte j, element j+16 in its high nibble → d·(q−8) |
//! | Q4_1 | 32 | 20 | d, m, nibbles as Q4_0 → d·q + m |
//! | Q5_0 | 32 | 22 | d, u32 qh (bit j = 5th bit of element j), nibbles as Q4_0 → d·(q−16) |
//! | Q5_1 | 32 | 24 | d, m, qh, nibbles → d·q + m |
//! | Q4_K | 256 | 144 | d, dmin, 12 bytes of 6-bit scales/mins for 8 sub-blocks of 32, 128 bytes: chunk c of 32 bytes holds sub-block 2c in low nibbles and 2c+1 in high nibbles → d·sc·q − dmin·m |
//! | Q5_K | 256 | 176 | as Q4_K plus 32 bytes qh before the nibbles: bit s of qh[l] is the 5th bit of element l of sub-block s |
//! | Q6_K | 256 | 210 | 128 bytes ql, 64 bytes qh, 16 × i8 scales (one per 16 elements), d. Element 128h + 32k + l: low 4 bits from ql[64h + 32(k%2) + l] (nibble k/2), high 2 bits from qh[32h + l] >> 2k → d·sc·(q−32) |
//!
//! The 12 scale bytes of Q4_K/Q5_K: for sub-block j < 4, scale = byte[j] & 63 and min = byte[j+4] & 63;
//! for j ≥ 4 the low 4 bits come from byte[j+4] (scale: low nibble, min: high nibble) and the top
//! 2 bits from the top 2 bits of byte[j−4] (scale) and byte[j] (min).
//!
//! # Llama's permuted q/k rows
//! llama.cpp's converter reorders the rows of q_proj and k_proj (weights and biases) of
//! architecture `llama` so that ggml's interleaved RoPE rotates adjacent rows: within each head of
//! dimension hd, Hugging Face row i (i < hd/2) is stored at row 2i and row hd/2 + i at row 2i + 1.
//! We use Hugging Face's rotate-half RoPE, so [`GgufSource`] undoes it ([`llama_rope_unpermute`]).
//! Qwen2 files are not permuted (ggml uses rotate-half "NeoX" RoPE for them).

use crate::config::{ModelConfig, TokenIds, SUPPORTED_ARCHITECTURES};
use crate::error::{Error, Result};
use crate::weights::{F32Tensor, WeightSource};
use half::{bf16, f16};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One metadata value of a GGUF file.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// Any non-negative integer value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v as i64),
            MetaValue::I16(v) => Some(v as i64),
            MetaValue::I32(v) => Some(v as i64),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The ggml tensor types we read (ggml's names, hence the underscores).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl GgmlType {
    pub const ALL: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// The type's id in ggml's `ggml_type` enum (what GGUF files store).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| t.id() == id)
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
        }
    }

    /// Elements per block (1 for the plain float types).
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
                32
            }
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
        }
    }
}

/// Names of ggml types we do not read, for error messages.
fn other_ggml_type_name(id: u32) -> &'static str {
    match id {
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` (ne0) is the contiguous dimension.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Relative to [`GgufHeader::data_offset`].
    pub offset: u64,
}

impl GgufTensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |n, &d| n.saturating_mul(d))
    }

    pub fn byte_len(&self) -> u64 {
        (self.n_elements() / self.ggml_type.block_size() as u64)
            .saturating_mul(self.ggml_type.block_bytes() as u64)
    }

    /// The shape in row-major (Hugging Face) order: the dimensions reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// Everything before the tensor data. Needs none of the tensor data to be present.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    /// Absolute file offset where the tensor data starts.
    pub data_offset: u64,
}

impl GgufHeader {
    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta(key).and_then(MetaValue::as_str)
    }

    pub fn meta_u64(&self, key: &str) -> Option<u64> {
        self.meta(key).and_then(MetaValue::as_u64)
    }

    pub fn meta_f64(&self, key: &str) -> Option<f64> {
        self.meta(key).and_then(MetaValue::as_f64)
    }

    /// `general.architecture` (`qwen2`, `llama`, ...).
    pub fn architecture(&self) -> Option<&str> {
        self.meta_str("general.architecture")
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays deeper than this are refused (a corrupt file could otherwise recurse without end).
const MAX_ARRAY_DEPTH: u32 = 8;

/// Whether the file starts with the GGUF magic.
pub fn is_gguf_file(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == MAGIC
}

/// Reads magic, version, metadata and the tensor table. The tensor data may be missing (a
/// truncated download still gives its vocabulary); [`GgufFile::open`] checks the data.
pub fn read_header(path: &Path) -> Result<GgufHeader> {
    let map = map_file(path)?;
    parse_header(&map, path)
}

fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|e| Error::io("opening GGUF file", path, e))?;
    // SAFETY: the map is read-only; like every mmap-based loader we rely on the file not being
    // truncated or rewritten by another process while it is mapped.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io("memory-mapping GGUF file", path, e))
}

/// A bounds-checked little-endian reader over the file's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn error(&self, msg: impl std::fmt::Display) -> Error {
        Error::format(self.path, format!("{msg} (at byte {})", self.pos))
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn std::fmt::Display) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.error(format!(
                "{what} needs {n} bytes but only {} remain: the file is truncated or corrupt",
                self.remaining()
            )));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &dyn std::fmt::Display) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &dyn std::fmt::Display) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn std::fmt::Display) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &dyn std::fmt::Display) -> Result<String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.error(format!("{what} is not valid UTF-8")))
    }

    /// Checks that `count` items of at least `min_size` bytes each can still be in the file.
    fn check_count(&self, count: u64, min_size: u64, what: &dyn std::fmt::Display) -> Result<()> {
        match count.checked_mul(min_size) {
            Some(n) if n <= self.remaining() => Ok(()),
            _ => Err(self.error(format!(
                "{what}: a count of {count} cannot fit in the {} bytes that remain: the file is corrupt",
                self.remaining()
            ))),
        }
    }
}

/// Smallest encoding of a metadata value of this type, for count checks; None for an unknown type.
fn meta_min_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        8 | 10..=12 => Some(8),
        9 => Some(12),
        _ => None,
    }
}

fn read_value(c: &mut Cursor, ty: u32, key: &str, depth: u32) -> Result<MetaValue> {
    let what = format_args!("metadata value {key:?}");
    Ok(match ty {
        0 => MetaValue::U8(u8::from_le_bytes(c.array(&what)?)),
        1 => MetaValue::I8(i8::from_le_bytes(c.array(&what)?)),
        2 => MetaValue::U16(u16::from_le_bytes(c.array(&what)?)),
        3 => MetaValue::I16(i16::from_le_bytes(c.array(&what)?)),
        4 => MetaValue::U32(u32::from_le_bytes(c.array(&what)?)),
        5 => MetaValue::I32(i32::from_le_bytes(c.array(&what)?)),
        6 => MetaValue::F32(f32::from_le_bytes(c.array(&what)?)),
        7 => match c.array::<1>(&what)?[0] {
            0 => MetaValue::Bool(false),
            1 => MetaValue::Bool(true),
            b => return Err(c.error(format!("{what}: boolean byte {b} is neither 0 nor 1"))),
        },
        8 => MetaValue::String(c.string(&what)?),
        9 => {
            if depth >= MAX_ARRAY_DEPTH {
                return Err(c.error(format!(
                    "{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                )));
            }
            let elem_ty = c.u32(&what)?;
            let min = meta_min_size(elem_ty)
                .ok_or_else(|| c.error(format!("{what}: unknown array element type {elem_ty}")))?;
            let count = c.u64(&what)?;
            c.check_count(count, min, &what)?;
            // Bounded by the file's size above; grown as elements are actually read.
            let mut items = Vec::with_capacity((count as usize).min(1 << 16));
            for _ in 0..count {
                items.push(read_value(c, elem_ty, key, depth + 1)?);
            }
            MetaValue::Array(items)
        }
        10 => MetaValue::U64(u64::from_le_bytes(c.array(&what)?)),
        11 => MetaValue::I64(i64::from_le_bytes(c.array(&what)?)),
        12 => MetaValue::F64(f64::from_le_bytes(c.array(&what)?)),
        _ => return Err(c.error(format!("{what}: unknown metadata value type {ty}"))),
    })
}

fn parse_header(bytes: &[u8], path: &Path) -> Result<GgufHeader> {
    let mut c = Cursor {
        bytes,
        pos: 0,
        path,
    };
    let magic: [u8; 4] = c
        .array(&"the magic")
        .map_err(|_| Error::format(path, "not a GGUF file: shorter than the 4-byte magic"))?;
    if &magic != MAGIC {
        return Err(Error::format(
            path,
            format!("not a GGUF file: it starts with {magic:02x?}, expected the magic \"GGUF\""),
        ));
    }
    let version = c.u32(&"the version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(Error::Unsupported(format!(
                "{}: GGUF version 1 (2023); only versions 2 and 3 are read: download or convert a newer file",
                path.display()
            )))
        }
        v if matches!(v.swap_bytes(), 2 | 3) => {
            return Err(Error::Unsupported(format!("{}: big-endian GGUF files are not supported", path.display())))
        }
        v => return Err(c.error(format!("unknown GGUF version {v}; versions 2 and 3 are supported"))),
    }
    let tensor_count = c.u64(&"the tensor count")?;
    let kv_count = c.u64(&"the metadata count")?;
    // Smallest metadata entry: empty key (8) + type (4) + one byte; smallest tensor entry:
    // empty name (8) + n_dims (4) + type (4) + offset (8).
    c.check_count(kv_count, 13, &"metadata count")?;
    c.check_count(tensor_count, 24, &"tensor count")?;

    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key = c.string(&format_args!("metadata key #{i}"))?;
        let ty = c.u32(&format_args!("the type of metadata {key:?}"))?;
        let value = read_value(&mut c, ty, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(c.error(format!("metadata key {key:?} appears twice")));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() => a,
            _ => {
                return Err(Error::format(
                    path,
                    format!("general.alignment is {v:?}; it must be a power of two"),
                ))
            }
        },
    };

    let mut tensors: Vec<GgufTensorInfo> = Vec::with_capacity(tensor_count as usize);
    let mut names = std::collections::HashSet::new();
    for i in 0..tensor_count {
        let name = c.string(&format_args!("the name of tensor #{i}"))?;
        let what = format!("tensor {name:?}");
        let n_dims = c.u32(&what)?;
        if n_dims > MAX_DIMS {
            return Err(c.error(format!(
                "{what} has {n_dims} dimensions; ggml allows at most {MAX_DIMS}"
            )));
        }
        let dims = (0..n_dims)
            .map(|_| c.u64(&what))
            .collect::<Result<Vec<u64>>>()?;
        let type_id = c.u32(&what)?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
            let supported: Vec<&str> = GgmlType::ALL.iter().map(|t| t.name()).collect();
            Error::Unsupported(format!(
                "{}: tensor {name:?} has ggml type {type_id} ({}); supported types: {}. Use a GGUF file quantized with those (e.g. Q4_K_M, Q8_0)",
                path.display(),
                other_ggml_type_name(type_id),
                supported.join(", ")
            ))
        })?;
        let offset = c.u64(&what)?;
        let n_elements = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        let byte_len = n_elements.and_then(|n| {
            (n / ggml_type.block_size() as u64).checked_mul(ggml_type.block_bytes() as u64)
        });
        if byte_len.and_then(|b| b.checked_add(offset)).is_none() {
            return Err(c.error(format!(
                "{what}: dimensions {dims:?} at offset {offset} overflow"
            )));
        }
        let ne0 = dims.first().copied().unwrap_or(1);
        if ne0 % ggml_type.block_size() as u64 != 0 {
            return Err(c.error(format!(
                "{what}: its rows of {ne0} elements are not a whole number of {} blocks of {}",
                ggml_type.name(),
                ggml_type.block_size()
            )));
        }
        if offset % alignment != 0 {
            return Err(c.error(format!(
                "{what}: data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        if !names.insert(name.clone()) {
            return Err(c.error(format!("{what} appears twice")));
        }
        tensors.push(GgufTensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }

    let data_offset = (c.pos as u64).next_multiple_of(alignment);
    Ok(GgufHeader {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

/// A memory-mapped GGUF file whose tensors were all checked to lie inside the file.
pub struct GgufFile {
    header: GgufHeader,
    map: Arc<memmap2::Mmap>,
    path: PathBuf,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let map = map_file(path)?;
        let header = parse_header(&map, path)?;
        let file_len = map.len() as u64;
        for t in &header.tensors {
            let start = header.data_offset.saturating_add(t.offset);
            let end = start.saturating_add(t.byte_len());
            if end > file_len {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor {:?} needs bytes {start}..{end} but the file has {file_len} bytes: the file is truncated (an interrupted download?); download it again",
                        t.name
                    ),
                ));
            }
        }
        Ok(GgufFile {
            header,
            map: Arc::new(map),
            path: path.to_path_buf(),
        })
    }

    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.header.meta(key)
    }

    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.header.meta_str(key)
    }

    pub fn meta_u64(&self, key: &str) -> Option<u64> {
        self.header.meta_u64(key)
    }

    pub fn meta_f64(&self, key: &str) -> Option<f64> {
        self.header.meta_f64(key)
    }

    pub fn architecture(&self) -> Option<&str> {
        self.header.architecture()
    }

    /// The raw bytes of a tensor (in its ggml type).
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> Result<&[u8]> {
        let start = self.header.data_offset.saturating_add(info.offset);
        let end = start.saturating_add(info.byte_len());
        if end > self.map.len() as u64 {
            return Err(Error::format(
                &self.path,
                format!(
                    "tensor {:?} (bytes {start}..{end}) lies outside the file",
                    info.name
                ),
            ));
        }
        Ok(&self.map[start as usize..end as usize])
    }

    /// A tensor dequantized to f32, in file order (ne0 fastest).
    pub fn tensor_f32(&self, info: &GgufTensorInfo) -> Result<Vec<f32>> {
        let n = usize::try_from(info.n_elements()).map_err(|_| {
            Error::format(
                &self.path,
                format!("tensor {:?} is too large for this machine", info.name),
            )
        })?;
        dequantize(info.ggml_type, self.tensor_bytes(info)?, n)
    }
}

/// Elements decoded per rayon task: large enough to amortize scheduling, small enough to spread.
const ELEMENTS_PER_TASK: usize = 1 << 16;

/// Decodes `n_elements` values of type `ty` from `bytes` (which must hold exactly that many).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    let (bs, bb) = (ty.block_size(), ty.block_bytes());
    if n_elements % bs != 0 {
        return Err(Error::Invalid(format!(
            "{n_elements} elements are not a whole number of {} blocks of {bs}",
            ty.name()
        )));
    }
    let n_blocks = n_elements / bs;
    if n_blocks.checked_mul(bb) != Some(bytes.len()) {
        return Err(Error::Invalid(format!(
            "{n_elements} {} elements take {n_blocks} × {bb} bytes, but {} bytes were given",
            ty.name(),
            bytes.len()
        )));
    }
    let decode: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => decode_f32,
        GgmlType::F16 => decode_f16,
        GgmlType::BF16 => decode_bf16,
        GgmlType::Q8_0 => decode_q8_0,
        GgmlType::Q4_0 => decode_q4_0,
        GgmlType::Q4_1 => decode_q4_1,
        GgmlType::Q5_0 => decode_q5_0,
        GgmlType::Q5_1 => decode_q5_1,
        GgmlType::Q4_K => decode_q4_k,
        GgmlType::Q5_K => decode_q5_k,
        GgmlType::Q6_K => decode_q6_k,
    };
    let blocks_per_task = (ELEMENTS_PER_TASK / bs).max(1);
    let mut out = vec![0.0f32; n_elements];
    out.par_chunks_mut(blocks_per_task * bs)
        .zip(bytes.par_chunks(blocks_per_task * bb))
        .for_each(|(dst, src)| decode(src, dst));
    Ok(out)
}

// Each decoder takes whole blocks: `src` holds k blocks and `dst` their k × block_size values.

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn decode_f32(src: &[u8], dst: &mut [f32]) {
    for (y, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

fn decode_f16(src: &[u8], dst: &mut [f32]) {
    for (y, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *y = f16::from_le_bytes([b[0], b[1]]).to_f32();
    }
}

fn decode_bf16(src: &[u8], dst: &mut [f32]) {
    for (y, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *y = bf16::from_le_bytes([b[0], b[1]]).to_f32();
    }
}

fn decode_q8_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(34).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        for (y, &q) in y.iter_mut().zip(&b[2..]) {
            *y = d * (q as i8) as f32;
        }
    }
}

/// The 32 4-bit values of a Q4_0/Q4_1/Q5 block: element j is the low nibble of byte j, element
/// j + 16 the high nibble.
fn nibble(qs: &[u8], j: usize) -> u8 {
    if j < 16 {
        qs[j] & 0x0F
    } else {
        qs[j - 16] >> 4
    }
}

fn decode_q4_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        for (j, y) in y.iter_mut().enumerate() {
            *y = d * (nibble(&b[2..], j) as i32 - 8) as f32;
        }
    }
}

fn decode_q4_1(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(20).zip(dst.chunks_exact_mut(32)) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        for (j, y) in y.iter_mut().enumerate() {
            *y = d * nibble(&b[4..], j) as f32 + m;
        }
    }
}

/// 5-bit value j of a Q5_0/Q5_1 block: the nibble plus bit j of `qh` as bit 4.
fn five_bits(qh: u32, qs: &[u8], j: usize) -> u8 {
    nibble(qs, j) | ((((qh >> j) & 1) as u8) << 4)
}

fn decode_q5_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(22).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        for (j, y) in y.iter_mut().enumerate() {
            *y = d * (five_bits(qh, &b[6..], j) as i32 - 16) as f32;
        }
    }
}

fn decode_q5_1(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(24).zip(dst.chunks_exact_mut(32)) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        for (j, y) in y.iter_mut().enumerate() {
            *y = d * five_bits(qh, &b[8..], j) as f32 + m;
        }
    }
}

/// Scale and min (6 bits each) of sub-block `j` of a Q4_K/Q5_K block from its 12 packed bytes.
fn k_scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K and Q5_K share everything but the 5th bit; `qh` is empty for Q4_K.
fn decode_k_block(b: &[u8], qh: &[u8], qs: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    for (s, y) in y.chunks_exact_mut(32).enumerate() {
        let (sc, m) = k_scale_min(scales, s);
        let (scale, min) = (d * sc as f32, dmin * m as f32);
        let chunk = &qs[32 * (s / 2)..32 * (s / 2) + 32];
        for (l, y) in y.iter_mut().enumerate() {
            let low = if s % 2 == 0 {
                chunk[l] & 0x0F
            } else {
                chunk[l] >> 4
            };
            let high = if qh.is_empty() {
                0
            } else {
                ((qh[l] >> s) & 1) << 4
            };
            *y = scale * (low | high) as f32 - min;
        }
    }
}

fn decode_q4_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(144).zip(dst.chunks_exact_mut(256)) {
        decode_k_block(b, &[], &b[16..144], y);
    }
}

fn decode_q5_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(176).zip(dst.chunks_exact_mut(256)) {
        decode_k_block(b, &b[16..48], &b[48..176], y);
    }
}

fn decode_q6_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(210).zip(dst.chunks_exact_mut(256)) {
        let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
        let d = f16_at(b, 208);
        for (e, y) in y.iter_mut().enumerate() {
            let (h, k, l) = (e / 128, (e % 128) / 32, e % 32);
            let low = (ql[64 * h + 32 * (k % 2) + l] >> (4 * (k / 2))) & 0x0F;
            let high = (qh[32 * h + l] >> (2 * k)) & 3;
            let q = (low | (high << 4)) as i32 - 32;
            *y = d * (scales[e / 16] as i8) as f32 * q as f32;
        }
    }
}

/// The model config of a GGUF file, from its `{arch}.*` and `tokenizer.ggml.*` metadata.
pub fn config_from_gguf(h: &GgufHeader) -> Result<ModelConfig> {
    let arch = h
        .architecture()
        .ok_or_else(|| Error::Config("GGUF metadata has no general.architecture".into()))?;
    let hf_arch = match arch {
        "qwen2" => "Qwen2ForCausalLM",
        "llama" => "LlamaForCausalLM",
        other => {
            return Err(Error::Unsupported(format!(
                "GGUF architecture {other:?}; supported: {SUPPORTED_ARCHITECTURES}"
            )))
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let get_usize = |k: &str| -> Result<Option<usize>> {
        match h.meta(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    Error::Config(format!(
                        "GGUF metadata {k} is {v:?}; expected a non-negative integer"
                    ))
                }),
        }
    };
    let need_usize =
        |k: &str| get_usize(k)?.ok_or_else(|| Error::Config(format!("GGUF metadata has no {k}")));
    let get_f32 = |k: &str| -> Result<Option<f32>> {
        match h.meta(k) {
            None => Ok(None),
            Some(v) => v.as_f64().map(|x| Some(x as f32)).ok_or_else(|| {
                Error::Config(format!("GGUF metadata {k} is {v:?}; expected a number"))
            }),
        }
    };

    let hidden_size = need_usize(&key("embedding_length"))?;
    let num_attention_heads = need_usize(&key("attention.head_count"))?;
    let head_dim = get_usize(&key("attention.key_length"))?;
    if let (Some(k), Some(v)) = (head_dim, get_usize(&key("attention.value_length"))?) {
        if k != v {
            return Err(Error::Unsupported(format!(
                "key length {k} differs from value length {v}"
            )));
        }
    }
    let rotary = get_usize(&key("rope.dimension_count"))?;
    let full_head = head_dim.unwrap_or(hidden_size / num_attention_heads.max(1));
    if rotary.is_some_and(|r| r != full_head) {
        return Err(Error::Unsupported(format!(
            "partial RoPE ({arch}.rope.dimension_count = {rotary:?}, head dim {full_head})"
        )));
    }

    let mut vocab_size = match h
        .meta("tokenizer.ggml.tokens")
        .and_then(MetaValue::as_array)
    {
        Some(tokens) => tokens.len(),
        None => need_usize(&key("vocab_size"))?,
    };
    if let Some(embd) = h.tensor("token_embd.weight") {
        let rows = embd.dims.get(1).copied().unwrap_or(0) as usize;
        if h.meta("tokenizer.ggml.tokens").is_none() && h.meta(&key("vocab_size")).is_none() {
            vocab_size = rows;
        } else if rows != vocab_size {
            return Err(Error::Config(format!(
                "the vocabulary has {vocab_size} tokens but token_embd.weight has {rows} rows"
            )));
        }
    }

    if h.tensor("rope_freqs.weight").is_some() {
        return Err(Error::Unsupported(
            "llama3-style RoPE scaling stored as a rope_freqs.weight tensor in GGUF; use the Hugging Face checkpoint of this model".into(),
        ));
    }
    match h.meta_str(&key("rope.scaling.type")) {
        None | Some("none") => {}
        Some(other) => {
            return Err(Error::Unsupported(format!(
                "RoPE scaling type {other:?} ({arch}.rope.scaling.type); supported: llama3 (from Hugging Face config.json)"
            )))
        }
    }
    if get_f32(&key("rope.scale_linear"))?.is_some_and(|f| f != 1.0) {
        return Err(Error::Unsupported(format!(
            "linear RoPE scaling ({arch}.rope.scale_linear)"
        )));
    }

    let token = |k: &str| -> Result<Option<TokenIds>> {
        Ok(get_usize(k)?
            .and_then(|id| u32::try_from(id).ok())
            .map(TokenIds::One))
    };
    let config = ModelConfig {
        architectures: vec![hf_arch.to_string()],
        model_type: Some(arch.to_string()),
        hidden_size,
        intermediate_size: need_usize(&key("feed_forward_length"))?,
        num_hidden_layers: need_usize(&key("block_count"))?,
        num_attention_heads,
        num_key_value_heads: get_usize(&key("attention.head_count_kv"))?,
        head_dim,
        vocab_size,
        rms_norm_eps: get_f32(&key("attention.layer_norm_rms_epsilon"))?.ok_or_else(|| {
            Error::Config(format!(
                "GGUF metadata has no {arch}.attention.layer_norm_rms_epsilon"
            ))
        })?,
        rope_theta: get_f32(&key("rope.freq_base"))?.unwrap_or(10000.0),
        rope_scaling: None,
        tie_word_embeddings: h.tensor("output.weight").is_none(),
        max_position_embeddings: get_usize(&key("context_length"))?.unwrap_or(4096),
        attention_bias: (arch == "llama").then(|| h.tensor("blk.0.attn_q.bias").is_some()),
        bos_token_id: token("tokenizer.ggml.bos_token_id")?,
        eos_token_id: token("tokenizer.ggml.eos_token_id")?,
    };
    config.validate()?;
    Ok(config)
}

/// For each (head, i < hd/2, half s): the Hugging Face row and the row llama.cpp stores it at.
fn rope_row_pairs(rows: usize, heads: usize) -> Result<impl Iterator<Item = (usize, usize)>> {
    if heads == 0 || rows % (2 * heads) != 0 {
        return Err(Error::Config(format!(
            "{rows} rows cannot be split into {heads} heads of even size"
        )));
    }
    let hd = rows / heads;
    Ok((0..heads).flat_map(move |h| {
        (0..hd / 2)
            .flat_map(move |i| (0..2).map(move |s| (h * hd + s * (hd / 2) + i, h * hd + 2 * i + s)))
    }))
}

/// What llama.cpp's converter does to the rows of q_proj/k_proj (`[rows, cols]` row-major, or a
/// bias with cols = 1) of a llama model: per head, HF rows i and hd/2 + i become rows 2i and 2i+1.
pub fn llama_rope_permute(hf: &[f32], rows: usize, cols: usize, heads: usize) -> Result<Vec<f32>> {
    move_rows(hf, rows, cols, heads, |hf_row, stored_row| {
        (hf_row, stored_row)
    })
}

/// The inverse of [`llama_rope_permute`]: GGUF row order back to Hugging Face's.
pub fn llama_rope_unpermute(
    stored: &[f32],
    rows: usize,
    cols: usize,
    heads: usize,
) -> Result<Vec<f32>> {
    move_rows(stored, rows, cols, heads, |hf_row, stored_row| {
        (stored_row, hf_row)
    })
}

/// Copies row `from` of `src` to row `to` of the result, with (from, to) = pick(hf_row, stored_row).
fn move_rows(
    src: &[f32],
    rows: usize,
    cols: usize,
    heads: usize,
    pick: impl Fn(usize, usize) -> (usize, usize),
) -> Result<Vec<f32>> {
    if rows.checked_mul(cols) != Some(src.len()) {
        return Err(Error::Config(format!(
            "{} values are not [{rows}, {cols}]",
            src.len()
        )));
    }
    let mut out = vec![0.0f32; src.len()];
    for (hf_row, stored_row) in rope_row_pairs(rows, heads)? {
        let (from, to) = pick(hf_row, stored_row);
        out[to * cols..(to + 1) * cols].copy_from_slice(&src[from * cols..(from + 1) * cols]);
    }
    Ok(out)
}

/// The Hugging Face name of a GGUF tensor, or None for tensors we do not use.
fn hf_name(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let (layer, rest) = name.strip_prefix("blk.")?.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (part, suffix) = rest.split_once('.')?;
    let module = match (part, suffix) {
        ("attn_norm", "weight") => "input_layernorm",
        ("ffn_norm", "weight") => "post_attention_layernorm",
        ("attn_q", "weight" | "bias") => "self_attn.q_proj",
        ("attn_k", "weight" | "bias") => "self_attn.k_proj",
        ("attn_v", "weight" | "bias") => "self_attn.v_proj",
        ("attn_output", "weight" | "bias") => "self_attn.o_proj",
        ("ffn_gate", "weight") => "mlp.gate_proj",
        ("ffn_up", "weight") => "mlp.up_proj",
        ("ffn_down", "weight") => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.{suffix}"))
}

struct SourceTensor {
    index: usize,
    /// Heads to un-permute the rows over (llama q/k), or None.
    rope_heads: Option<usize>,
}

/// A GGUF checkpoint as a [`WeightSource`] with Hugging Face names, shapes and row order.
pub struct GgufSource {
    file: GgufFile,
    config: ModelConfig,
    tensors: BTreeMap<String, SourceTensor>,
    skipped: Vec<String>,
}

impl GgufSource {
    pub fn open(path: &Path) -> Result<GgufSource> {
        let file = GgufFile::open(path)?;
        let config = config_from_gguf(file.header()).map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
            Error::Unsupported(msg) => Error::Unsupported(format!("{}: {msg}", path.display())),
            other => other,
        })?;
        let permuted = file.architecture() == Some("llama");
        let mut tensors = BTreeMap::new();
        let mut skipped = Vec::new();
        for (index, t) in file.header().tensors.iter().enumerate() {
            let Some(name) = hf_name(&t.name) else {
                skipped.push(t.name.clone());
                continue;
            };
            let rope_heads = match t.name.rsplit('.').nth(1) {
                Some("attn_q") if permuted => Some(config.num_attention_heads),
                Some("attn_k") if permuted => Some(config.num_kv_heads()),
                _ => None,
            };
            tensors.insert(name, SourceTensor { index, rope_heads });
        }
        Ok(GgufSource {
            file,
            config,
            tensors,
            skipped,
        })
    }

    pub fn header(&self) -> &GgufHeader {
        self.file.header()
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// GGUF tensors that have no Hugging Face counterpart here (e.g. `rope_freqs.weight`).
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    fn entry(&self, name: &str) -> Result<(&SourceTensor, &GgufTensorInfo)> {
        let t = self.tensors.get(name).ok_or_else(|| {
            Error::Config(format!(
                "{}: the GGUF file has no tensor for {name:?}",
                self.file.path().display()
            ))
        })?;
        Ok((t, &self.file.header().tensors[t.index]))
    }
}

impl WeightSource for GgufSource {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn tensor_names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.entry(name)?.1.shape())
    }

    fn read_f32(&self, name: &str) -> Result<F32Tensor> {
        let (t, info) = self.entry(name)?;
        let shape = info.shape();
        let data = self.file.tensor_f32(info)?;
        let data = match t.rope_heads {
            None => data,
            Some(heads) => {
                let rows = shape[0];
                llama_rope_unpermute(&data, rows, data.len() / rows.max(1), heads).map_err(|e| {
                    let msg = match e {
                        Error::Config(m) => m,
                        other => other.to_string(),
                    };
                    Error::Config(format!(
                        "{}: un-permuting {:?} for RoPE: {msg}",
                        self.file.path().display(),
                        info.name
                    ))
                })?
            }
        };
        Ok(F32Tensor { shape, data })
    }
}
