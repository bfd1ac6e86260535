//! Hugging Face model folders: `config.json` plus `model.safetensors`, or shards listed in
//! `model.safetensors.index.json` (`weight_map`: tensor name → shard file).
//!
//! Reading: every shard is memory-mapped and its header parsed by the `safetensors` crate; a
//! tensor is converted to f32 only when asked for, so a model larger than RAM can be quantized.
//!
//! Writing: a safetensors file is an 8-byte little-endian header length, a JSON header
//! (`{"__metadata__": {..}, "name": {"dtype", "shape", "data_offsets": [begin, end]}, ..}`, offsets
//! relative to the data section, consecutive) padded with spaces, then the data. The header must
//! precede the data, but a streamed tensor's shape is only known when it arrives, so each shard's
//! data goes to a scratch file first and is copied behind the header when the shard is closed.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::weights::{F32Tensor, WeightSource};
use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

const SUPPORTED_DTYPES: &str = "BF16, F16, F32";

/// One memory-mapped safetensors file with its parsed header.
struct Shard {
    path: PathBuf,
    map: memmap2::Mmap,
    /// Offset of the data section in the file (8 + header length).
    data_start: usize,
    metadata: Metadata,
}

impl Shard {
    fn open(path: &Path) -> Result<Shard> {
        let map = map_file(path)?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
            Error::format(
                path,
                format!("not a valid safetensors file ({e}); the file may be truncated or damaged"),
            )
        })?;
        Ok(Shard {
            path: path.to_path_buf(),
            map,
            data_start: 8 + header_len,
            metadata,
        })
    }
}

/// Maps a whole file read-only.
pub(crate) fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
    // SAFETY: the map is read-only; if another process truncates the file while it is mapped,
    // reads fault. Model files are not modified in place by any tool we know of.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io("memory-mapping", path, e))
}

/// A Hugging Face checkpoint folder read one tensor at a time.
pub struct HfSource {
    dir: PathBuf,
    config: ModelConfig,
    shards: Vec<Shard>,
    /// Tensor name → index into `shards`.
    tensors: BTreeMap<String, usize>,
}

#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

impl HfSource {
    pub fn open(dir: &Path) -> Result<HfSource> {
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            return Err(Error::format(
                dir,
                format!("no {CONFIG_FILE} here: not a Hugging Face model folder"),
            ));
        }
        let config = ModelConfig::from_file(&config_path)?;

        let single = dir.join(SINGLE_FILE);
        let index_path = dir.join(INDEX_FILE);
        let mut shards = Vec::new();
        let mut tensors = BTreeMap::new();
        if single.is_file() {
            let shard = Shard::open(&single)?;
            for name in shard.metadata.offset_keys() {
                tensors.insert(name, 0);
            }
            shards.push(shard);
        } else if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| Error::io("reading the shard index", &index_path, e))?;
            let index: IndexFile = serde_json::from_str(&text)
                .map_err(|e| Error::format(&index_path, format!("not a valid shard index: {e}")))?;
            let mut shard_of_file: HashMap<&str, usize> = HashMap::new();
            for (name, file) in &index.weight_map {
                let shard = match shard_of_file.get(file.as_str()) {
                    Some(&i) => i,
                    None => {
                        let path = shard_path(dir, &index_path, file)?;
                        if !path.is_file() {
                            return Err(Error::format(
                                &index_path,
                                format!(
                                    "shard {file:?} (holding {name:?}) is missing from {}",
                                    dir.display()
                                ),
                            ));
                        }
                        shards.push(Shard::open(&path)?);
                        shard_of_file.insert(file, shards.len() - 1);
                        shards.len() - 1
                    }
                };
                if shards[shard].metadata.info(name).is_none() {
                    return Err(Error::format(
                        &shards[shard].path,
                        format!(
                            "{INDEX_FILE} says this shard holds tensor {name:?}, but it does not"
                        ),
                    ));
                }
                tensors.insert(name.clone(), shard);
            }
        } else {
            return Err(Error::format(
                dir,
                format!("neither {SINGLE_FILE} nor {INDEX_FILE} is here: no weights to read"),
            ));
        }
        Ok(HfSource {
            dir: dir.to_path_buf(),
            config,
            shards,
            tensors,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The stored element type of a tensor.
    pub fn dtype(&self, name: &str) -> Result<Dtype> {
        let (_, info) = self.info(name)?;
        Ok(info.dtype)
    }

    fn info(&self, name: &str) -> Result<(&Shard, &safetensors::tensor::TensorInfo)> {
        let shard = self
            .tensors
            .get(name)
            .map(|&i| &self.shards[i])
            .ok_or_else(|| {
                Error::Config(format!(
                    "{}: the checkpoint has no tensor {name:?}",
                    self.dir.display()
                ))
            })?;
        let info = shard.metadata.info(name).ok_or_else(|| {
            Error::format(&shard.path, format!("tensor {name:?} is not in this file"))
        })?;
        Ok((shard, info))
    }
}

/// A shard file named by the index, refused if it points outside the folder.
fn shard_path(dir: &Path, index_path: &Path, file: &str) -> Result<PathBuf> {
    let plain = Path::new(file).components().count() == 1
        && matches!(
            Path::new(file).components().next(),
            Some(std::path::Component::Normal(_))
        );
    if !plain {
        return Err(Error::format(
            index_path,
            format!("shard name {file:?} is not a plain file name"),
        ));
    }
    Ok(dir.join(file))
}

impl WeightSource for HfSource {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn tensor_names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.info(name)?.1.shape.clone())
    }

    fn read_f32(&self, name: &str) -> Result<F32Tensor> {
        let (shard, info) = self.info(name)?;
        let (begin, end) = info.data_offsets;
        let bytes = &shard.map[shard.data_start + begin..shard.data_start + end];
        let n: usize = info.shape.iter().product();
        let mut data = vec![0.0f32; n];
        // Large tensors convert in parallel chunks; the chunk size is a multiple of every element size.
        const CHUNK: usize = 1 << 16;
        match info.dtype {
            Dtype::BF16 => data
                .par_chunks_mut(CHUNK)
                .zip(bytes.par_chunks(CHUNK * 2))
                .for_each(|(o, b)| {
                    for (v, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                        *v = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                    }
                }),
            Dtype::F16 => data
                .par_chunks_mut(CHUNK)
                .zip(bytes.par_chunks(CHUNK * 2))
                .for_each(|(o, b)| {
                    for (v, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                        *v = f16::from_le_bytes([c[0], c[1]]).to_f32();
                    }
                }),
            Dtype::F32 => data
                .par_chunks_mut(CHUNK)
                .zip(bytes.par_chunks(CHUNK * 4))
                .for_each(|(o, b)| {
                    for (v, c) in o.iter_mut().zip(b.chunks_exact(4)) {
                        *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }
                }),
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: tensor {name:?} has dtype {other}; supported: {SUPPORTED_DTYPES}",
                    shard.path.display()
                )))
            }
        }
        release_pages(&shard.map, shard.data_start + begin, end - begin);
        Ok(F32Tensor {
            shape: info.shape.clone(),
            data,
        })
    }
}

/// Drops a range of a read-only file mapping from this process's resident set once it has been
/// converted: the pages stay in the page cache, but the process's memory (and its measured peak)
/// does not grow with every tensor read. Best effort: it changes no result.
fn release_pages(map: &memmap2::Mmap, offset: usize, len: usize) {
    // SAFETY: the mapping is a read-only, shared file mapping: pages dropped here are read back
    // from the file, with the same contents, on the next access, so no borrow observes a change.
    #[cfg(unix)]
    unsafe {
        let _ = map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len);
    }
    #[cfg(not(unix))]
    let _ = (map, offset, len);
}

/// True when `dir` looks like a Hugging Face model folder (config plus safetensors weights).
pub fn is_hf_folder(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file()
        && (dir.join(SINGLE_FILE).is_file() || dir.join(INDEX_FILE).is_file())
}

/// Element type of a written Hugging Face checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfDtype {
    BF16,
    F16,
    F32,
}

impl HfDtype {
    pub fn size(self) -> usize {
        match self {
            HfDtype::BF16 | HfDtype::F16 => 2,
            HfDtype::F32 => 4,
        }
    }

    fn name(self) -> &'static str {
        match self {
            HfDtype::BF16 => "BF16",
            HfDtype::F16 => "F16",
            HfDtype::F32 => "F32",
        }
    }

    fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        out.clear();
        match self {
            HfDtype::BF16 => {
                out.extend(values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()))
            }
            HfDtype::F16 => out.extend(values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes())),
            HfDtype::F32 => out.extend(values.iter().flat_map(|&v| v.to_le_bytes())),
        }
    }
}

/// One tensor's entry in a safetensors header; its data follows the previous entry's.
pub(crate) struct HeaderEntry {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub bytes: u64,
}

/// The bytes before the data section: 8-byte length, then the JSON header padded with spaces so
/// that the data section starts at a multiple of `align`. Entries are laid out in the order given.
pub(crate) fn encode_header(
    metadata: &[(String, String)],
    entries: &[HeaderEntry],
    align: usize,
) -> Vec<u8> {
    let mut header = String::from("{");
    if !metadata.is_empty() {
        header.push_str("\"__metadata__\":{");
        for (i, (k, v)) in metadata.iter().enumerate() {
            if i > 0 {
                header.push(',');
            }
            header.push_str(&format!("{}:{}", json_str(k), json_str(v)));
        }
        header.push('}');
    }
    let mut offset = 0u64;
    for (i, e) in entries.iter().enumerate() {
        if i > 0 || !metadata.is_empty() {
            header.push(',');
        }
        let shape: Vec<String> = e.shape.iter().map(|d| d.to_string()).collect();
        header.push_str(&format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            json_str(&e.name),
            e.dtype,
            shape.join(","),
            offset,
            offset + e.bytes
        ));
        offset += e.bytes;
    }
    header.push('}');
    let padded = (8 + header.len()).next_multiple_of(align) - 8;
    let mut out = Vec::with_capacity(8 + padded);
    out.extend_from_slice(&(padded as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.resize(8 + padded, b' ');
    out
}

/// A string as a JSON string literal (quoted, escaped).
fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// Files created by a writer that are removed again unless it finishes.
pub(crate) struct Scratch(Vec<PathBuf>);

impl Scratch {
    pub fn new() -> Scratch {
        Scratch(Vec::new())
    }
    /// Also registered with the Ctrl-C handler, which removes it if the program is interrupted.
    pub fn add(&mut self, path: PathBuf) -> PathBuf {
        crate::interrupt::register_file(&path);
        self.0.push(path.clone());
        path
    }
    pub fn forget(&mut self, path: &Path) {
        crate::interrupt::forget_file(path);
        self.0.retain(|p| p != path);
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for p in &self.0 {
            // Best effort: a scratch file that cannot be removed is harmless clutter.
            let _ = std::fs::remove_file(p);
            crate::interrupt::forget_file(p);
        }
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so `path` is never half written.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let mut scratch = Scratch::new();
    scratch.add(tmp.clone());
    std::fs::write(&tmp, bytes).map_err(|e| Error::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("renaming into place", path, e))?;
    scratch.forget(&tmp);
    Ok(())
}

/// `file.ext` → `file.ext.tmp`.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// A shard being written: its data in a scratch file, its header entries in memory.
struct OpenShard {
    data_path: PathBuf,
    data: BufWriter<File>,
    entries: Vec<HeaderEntry>,
    bytes: u64,
}

/// Writes a Hugging Face folder: `config.json` and one `model.safetensors`, or
/// `model-0000N-of-0000M.safetensors` shards of at most `max_shard_bytes` of data each (a single
/// larger tensor gets a shard of its own) plus `model.safetensors.index.json`.
/// Tensors are streamed: one is in memory at a time. `dir` must be new or empty.
pub fn write_hf_folder(
    dir: &Path,
    config: &ModelConfig,
    tensors: &mut dyn Iterator<Item = Result<(String, Vec<usize>, Vec<f32>)>>,
    dtype: HfDtype,
    max_shard_bytes: u64,
) -> Result<()> {
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir).map_err(|e| Error::io("listing", dir, e))?;
        if entries.next().is_some() {
            return Err(Error::Invalid(format!(
                "{} is not empty; write a Hugging Face folder into a new or empty folder",
                dir.display()
            )));
        }
    } else {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating folder", dir, e))?;
    }

    let mut scratch = Scratch::new();
    let mut closed: Vec<(PathBuf, Vec<String>)> = Vec::new();
    let mut shard: Option<OpenShard> = None;
    let mut seen = std::collections::HashSet::new();
    let mut buf = Vec::new();
    let mut total = 0u64;
    for item in tensors {
        let (name, shape, values) = item?;
        let n: usize = shape.iter().product();
        if values.len() != n {
            return Err(Error::Invalid(format!(
                "tensor {name:?}: {} values do not fill its shape {shape:?}",
                values.len()
            )));
        }
        if !seen.insert(name.clone()) {
            return Err(Error::Invalid(format!("tensor {name:?} was given twice")));
        }
        let bytes = (n * dtype.size()) as u64;
        if shard
            .as_ref()
            .is_some_and(|s| s.bytes > 0 && s.bytes + bytes > max_shard_bytes)
        {
            if let Some(s) = shard.take() {
                closed.push(close_shard(dir, closed.len(), s, &mut scratch)?);
            }
        }
        let s = match &mut shard {
            Some(s) => s,
            None => {
                let data_path = scratch.add(dir.join(format!(".shard-{}.data.tmp", closed.len())));
                let file =
                    File::create(&data_path).map_err(|e| Error::io("creating", &data_path, e))?;
                shard.insert(OpenShard {
                    data_path,
                    data: BufWriter::new(file),
                    entries: Vec::new(),
                    bytes: 0,
                })
            }
        };
        dtype.encode(&values, &mut buf);
        s.data
            .write_all(&buf)
            .map_err(|e| Error::io("writing", &s.data_path, e))?;
        s.entries.push(HeaderEntry {
            name,
            dtype: dtype.name(),
            shape,
            bytes,
        });
        s.bytes += bytes;
        total += bytes;
    }
    if let Some(s) = shard.take() {
        closed.push(close_shard(dir, closed.len(), s, &mut scratch)?);
    }
    if closed.is_empty() {
        // No tensors: still a valid (empty) checkpoint file.
        let data_path = scratch.add(dir.join(".shard-0.data.tmp"));
        let file = File::create(&data_path).map_err(|e| Error::io("creating", &data_path, e))?;
        let s = OpenShard {
            data_path,
            data: BufWriter::new(file),
            entries: Vec::new(),
            bytes: 0,
        };
        closed.push(close_shard(dir, 0, s, &mut scratch)?);
    }

    let count = closed.len();
    let mut weight_map = serde_json::Map::new();
    for (i, (tmp, names)) in closed.iter().enumerate() {
        let file_name = if count == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, count)
        };
        let path = dir.join(&file_name);
        std::fs::rename(tmp, &path).map_err(|e| Error::io("renaming into place", &path, e))?;
        scratch.forget(tmp);
        for name in names {
            weight_map.insert(name.clone(), serde_json::Value::String(file_name.clone()));
        }
    }
    if count > 1 {
        let index =
            serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let text =
            serde_json::to_string_pretty(&index).map_err(|e| Error::Invalid(e.to_string()))?;
        write_atomically(&dir.join(INDEX_FILE), text.as_bytes())?;
    }
    let text = serde_json::to_string_pretty(config).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomically(&dir.join(CONFIG_FILE), text.as_bytes())
}

/// Writes header + data of shard `i` to a temporary file; returns it with the tensor names it holds.
fn close_shard(
    dir: &Path,
    i: usize,
    s: OpenShard,
    scratch: &mut Scratch,
) -> Result<(PathBuf, Vec<String>)> {
    let OpenShard {
        data_path,
        data,
        entries,
        ..
    } = s;
    data.into_inner()
        .map_err(|e| Error::io("writing", &data_path, e.into_error()))?
        .sync_all()
        .map_err(|e| Error::io("writing", &data_path, e))?;
    let header = encode_header(&[("format".into(), "pt".into())], &entries, 8);
    let path = scratch.add(dir.join(format!(".shard-{i}.safetensors.tmp")));
    let mut out = BufWriter::new(File::create(&path).map_err(|e| Error::io("creating", &path, e))?);
    out.write_all(&header)
        .map_err(|e| Error::io("writing", &path, e))?;
    let mut input = File::open(&data_path).map_err(|e| Error::io("reading back", &data_path, e))?;
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let n = input
            .read(&mut chunk)
            .map_err(|e| Error::io("reading back", &data_path, e))?;
        if n == 0 {
            break;
        }
        out.write_all(&chunk[..n])
            .map_err(|e| Error::io("writing", &path, e))?;
    }
    out.into_inner()
        .map_err(|e| Error::io("writing", &path, e.into_error()))?
        .sync_all()
        .map_err(|e| Error::io("writing", &path, e))?;
    std::fs::remove_file(&data_path)
        .map_err(|e| Error::io("removing scratch file", &data_path, e))?;
    scratch.forget(&data_path);
    Ok((path, entries.into_iter().map(|e| e.name).collect()))
}
