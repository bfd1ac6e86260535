//! The quantizer and our INT4 file: bit-exact against `QMatrix::quantize`, deterministic bytes,
//! tied lm_head, safe destinations, and clear errors on damaged or foreign files.

use half::bf16;
use q4wgpu::formats::hf::{write_hf_folder, HfDtype, HfSource};
use q4wgpu::formats::q4::{is_q4_folder, open_q4_folder, write_q4_weights, Q4_WEIGHTS_FILE};
use q4wgpu::quant::QMatrix;
use q4wgpu::quantize::{quantize_in_memory, quantize_to_folder, EMBED, LM_HEAD};
use q4wgpu::test_models::{random_tensors, tiny_config, write_tiny_hf_model};
use q4wgpu::weights::{is_quantized_name, Blob, ModelWeights, Weight, WeightSource};
use q4wgpu::Arch;
use std::path::{Path, PathBuf};

/// A fresh folder under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("q4wgpu-quant-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The message of an error that must happen.
fn error_of<T>(r: q4wgpu::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error, got success"),
        Err(e) => e.to_string(),
    }
}

/// A tiny HF model and its quantized folder.
fn quantized(arch: Arch, seed: u64) -> (TempDir, TempDir) {
    let src = TempDir::new("src");
    write_tiny_hf_model(src.path(), arch, seed).expect("write tiny model");
    let dst = TempDir::new("dst");
    let source = HfSource::open(src.path()).expect("open source");
    let report = quantize_to_folder(&source, dst.path(), false).expect("quantize");
    let config = tiny_config(arch);
    let layers = config.num_hidden_layers;
    assert_eq!(
        report.quantized,
        7 * layers + 1,
        "7 linear weights per layer plus lm_head"
    );
    assert_eq!(report.tied_lm_head, config.tie_word_embeddings);
    assert!(report.ignored.is_empty(), "{:?}", report.ignored);
    let file_len = std::fs::metadata(dst.join(Q4_WEIGHTS_FILE))
        .expect("stat")
        .len();
    assert_eq!(report.bytes_written, file_len);
    let peak = report.peak_rss_bytes.expect("VmHWM is available on Linux");
    assert!(
        peak > report.largest_tensor_f32_bytes,
        "peak {peak} vs largest tensor {}",
        report.largest_tensor_f32_bytes
    );
    (src, dst)
}

fn q4_equals(weights: &ModelWeights, name: &str, source: &[f32], rows: usize, cols: usize) {
    let want = QMatrix::quantize(source, rows, cols);
    let got = weights.q4(name).expect("INT4 tensor");
    assert_eq!((got.rows, got.cols), (rows, cols), "{name}");
    assert!(
        got.qweight == want.qweight.as_slice(),
        "{name}: INT4 words differ from QMatrix::quantize"
    );
    assert!(
        got.scales == want.scales.as_slice(),
        "{name}: scales differ from QMatrix::quantize"
    );
}

fn check_against_source(arch: Arch) {
    let (src, dst) = quantized(arch, 21);
    let source = HfSource::open(src.path()).expect("open source");
    let weights = open_q4_folder(dst.path()).expect("open quantized");
    assert_eq!(weights.config, *source.config());
    let mut expected: Vec<String> = source.tensor_names();
    if !expected.contains(&LM_HEAD.to_string()) {
        expected.push(LM_HEAD.to_string());
        expected.sort();
    }
    assert_eq!(
        weights.tensors.keys().cloned().collect::<Vec<_>>(),
        expected
    );
    for name in source.tensor_names() {
        let t = source.read_f32(&name).expect("read source");
        if is_quantized_name(&name) {
            q4_equals(&weights, &name, &t.data, t.shape[0], t.shape[1]);
        } else {
            let (shape, got) = weights.dense_f32(&name).expect("dense tensor");
            assert_eq!(shape, t.shape, "{name}");
            // The source is BF16, so BF16 (embeddings) and F32 (norms, biases) both keep it exactly.
            assert!(
                got.iter()
                    .zip(&t.data)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name} differs"
            );
            let Weight::Dense { dtype, .. } = weights.get(&name).expect("tensor") else {
                unreachable!()
            };
            let want = if name == EMBED {
                q4wgpu::weights::DenseDtype::BF16
            } else {
                q4wgpu::weights::DenseDtype::F32
            };
            assert_eq!(*dtype, want, "{name}");
        }
    }
    // lm_head: tied → the quantized embedding table; untied → the quantized source lm_head.
    let from = if source.config().tie_word_embeddings {
        EMBED
    } else {
        LM_HEAD
    };
    let t = source.read_f32(from).expect("read");
    q4_equals(&weights, LM_HEAD, &t.data, t.shape[0], t.shape[1]);
    // The mapped views are aligned for u32 loads: data page aligned, every matrix 64-byte aligned.
    for (name, w) in &weights.tensors {
        if let Weight::Q4 {
            qweight: Blob::Mapped { offset, .. },
            scales: Blob::Mapped { offset: s, .. },
            ..
        } = w
        {
            assert_eq!(offset % 64, 0, "{name}");
            assert_eq!(s % 2, 0, "{name}");
        }
    }
}

#[test]
fn qwen2_quantizes_bit_exactly() {
    check_against_source(Arch::Qwen2);
}

#[test]
fn llama_with_tied_embeddings_quantizes_bit_exactly() {
    check_against_source(Arch::Llama);
}

#[test]
fn output_is_byte_identical_across_runs_and_paths() {
    let (src, first) = quantized(Arch::Qwen2, 5);
    let bytes = std::fs::read(first.join(Q4_WEIGHTS_FILE)).expect("read");
    let config = std::fs::read(first.join("config.json")).expect("read");
    // Into a fresh folder.
    let (_, second) = quantized(Arch::Qwen2, 5);
    assert!(
        std::fs::read(second.join(Q4_WEIGHTS_FILE)).expect("read") == bytes,
        "two runs differ"
    );
    // Replacing an existing q4wgpu folder in place.
    let source = HfSource::open(src.path()).expect("open");
    assert!(is_q4_folder(first.path()));
    quantize_to_folder(&source, first.path(), false).expect("replace");
    assert!(
        std::fs::read(first.join(Q4_WEIGHTS_FILE)).expect("read") == bytes,
        "re-run differs"
    );
    assert_eq!(
        std::fs::read(first.join("config.json")).expect("read"),
        config
    );
    // Quantizing in memory and writing the result gives the same file.
    let in_memory = quantize_in_memory(&source, false).expect("in memory");
    let path = TempDir::new("mem");
    std::fs::create_dir_all(path.path()).expect("mkdir");
    write_q4_weights(&path.join(Q4_WEIGHTS_FILE), &in_memory).expect("write");
    assert!(
        std::fs::read(path.join(Q4_WEIGHTS_FILE)).expect("read") == bytes,
        "in-memory path differs"
    );
    // A different seed gives a different file (the comparison above can fail).
    let (_, other) = quantized(Arch::Qwen2, 6);
    assert!(std::fs::read(other.join(Q4_WEIGHTS_FILE)).expect("read") != bytes);
}

#[test]
fn file_is_a_standard_safetensors_container() {
    let (_, dst) = quantized(Arch::Llama, 1);
    let bytes = std::fs::read(dst.join(Q4_WEIGHTS_FILE)).expect("read");
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    assert_eq!((8 + header_len) % 4096, 0, "data section is page aligned");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .expect("safetensors parses the padded header");
    let meta = meta.metadata().clone().expect("metadata");
    assert_eq!(meta["format"], "q4wgpu-int4");
    assert_eq!(meta["format_version"], "1");
    assert_eq!(meta["block_size"], "128");
    let shapes: serde_json::Value =
        serde_json::from_str(&meta["q4_shapes"]).expect("q4_shapes json");
    // Llama tiny: o_proj is [hidden 200, q_dim 192]; cols 200 needs 2 blocks of 128.
    assert_eq!(
        shapes["model.layers.1.self_attn.o_proj.weight"],
        serde_json::json!([200, 192])
    );
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parses");
    let q = st
        .tensor("model.layers.0.mlp.gate_proj.weight.qweight")
        .expect("qweight");
    assert_eq!(
        (q.dtype(), q.shape()),
        (safetensors::Dtype::U32, &[344usize, 32][..])
    );
    let s = st
        .tensor("model.layers.0.mlp.gate_proj.weight.scales")
        .expect("scales");
    assert_eq!(
        (s.dtype(), s.shape()),
        (safetensors::Dtype::BF16, &[344usize, 2][..])
    );
}

#[test]
fn unrelated_or_source_folder_is_refused_and_untouched() {
    let src = TempDir::new("src");
    write_tiny_hf_model(src.path(), Arch::Qwen2, 2).expect("write");
    let source = HfSource::open(src.path()).expect("open");

    let dst = TempDir::new("user");
    std::fs::create_dir_all(dst.path()).expect("mkdir");
    std::fs::write(dst.join("thesis.txt"), "years of work").expect("write");
    let err = error_of(quantize_to_folder(&source, dst.path(), false));
    assert!(
        err.contains("not empty") && err.contains("Nothing was written"),
        "{err}"
    );
    let names: Vec<_> = std::fs::read_dir(dst.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("thesis.txt")]);
    assert_eq!(
        std::fs::read_to_string(dst.join("thesis.txt")).expect("read"),
        "years of work"
    );

    let before: Vec<_> = std::fs::read_dir(src.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    let err = error_of(quantize_to_folder(&source, src.path(), false));
    assert!(err.contains("source folder"), "{err}");
    let after: Vec<_> = std::fs::read_dir(src.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(before, after);
}

#[test]
fn missing_or_misshapen_source_tensor_is_named() {
    let config = tiny_config(Arch::Qwen2);
    let victim = "model.layers.1.self_attn.k_proj.bias";
    let tensors: Vec<_> = random_tensors(&config, 4)
        .into_iter()
        .filter(|t| t.0 != victim)
        .collect();
    let src = TempDir::new("missing");
    write_hf_folder(
        src.path(),
        &config,
        &mut tensors.into_iter().map(Ok),
        HfDtype::BF16,
        u64::MAX,
    )
    .expect("write");
    let dst = TempDir::new("dst");
    let err = error_of(quantize_to_folder(
        &HfSource::open(src.path()).expect("open"),
        dst.path(),
        false,
    ));
    assert!(err.contains(victim), "{err}");
    assert!(!dst.join(Q4_WEIGHTS_FILE).exists());

    let victim = "model.layers.0.mlp.down_proj.weight";
    let tensors: Vec<_> = random_tensors(&config, 4)
        .into_iter()
        .map(|(n, s, d)| {
            if n == victim {
                (n, vec![s[1], s[0]], d)
            } else {
                (n, s, d)
            }
        })
        .collect();
    let src = TempDir::new("shape");
    write_hf_folder(
        src.path(),
        &config,
        &mut tensors.into_iter().map(Ok),
        HfDtype::BF16,
        u64::MAX,
    )
    .expect("write");
    let err = error_of(quantize_in_memory(
        &HfSource::open(src.path()).expect("open"),
        false,
    ));
    assert!(
        err.contains(victim) && err.contains("[224, 160]") && err.contains("[160, 224]"),
        "{err}"
    );
}

#[test]
fn truncated_file_is_a_clear_error() {
    let (_, dst) = quantized(Arch::Qwen2, 8);
    let path = dst.join(Q4_WEIGHTS_FILE);
    let len = std::fs::metadata(&path).expect("stat").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(len - 1000)
        .expect("truncate");
    let err = error_of(open_q4_folder(dst.path()));
    assert!(
        err.contains(Q4_WEIGHTS_FILE) && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn future_format_version_is_refused() {
    let (_, dst) = quantized(Arch::Qwen2, 9);
    let path = dst.join(Q4_WEIGHTS_FILE);
    let mut bytes = std::fs::read(&path).expect("read");
    let key = b"\"format_version\":\"1\"";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("version in header");
    bytes[at + key.len() - 2] = b'2';
    std::fs::write(&path, &bytes).expect("write");
    assert!(is_q4_folder(dst.path()), "still recognised as ours");
    let err = error_of(open_q4_folder(dst.path()));
    assert!(
        err.contains("newer") && err.contains("upgrade q4wgpu") && err.contains('2'),
        "{err}"
    );
}

#[test]
fn foreign_files_are_refused_with_a_hint() {
    let src = TempDir::new("hf");
    write_tiny_hf_model(src.path(), Arch::Llama, 1).expect("write");
    let err = error_of(open_q4_folder(src.path()));
    assert!(
        err.contains("Hugging Face") && err.contains("quantize"),
        "{err}"
    );
    assert!(!is_q4_folder(src.path()));

    // A Hugging Face safetensors file under our name.
    std::fs::copy(src.join("model.safetensors"), src.join(Q4_WEIGHTS_FILE)).expect("copy");
    let err = error_of(open_q4_folder(src.path()));
    assert!(err.contains("not a q4wgpu file"), "{err}");
    assert!(!is_q4_folder(src.path()));
}

#[test]
fn a_changed_config_is_caught_on_open() {
    let (_, dst) = quantized(Arch::Llama, 2);
    let path = dst.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    config["intermediate_size"] = 345.into();
    std::fs::write(&path, config.to_string()).expect("write");
    let err = error_of(open_q4_folder(dst.path()));
    assert!(err.contains("gate_proj") && err.contains("345"), "{err}");
}

#[test]
fn quantize_tensor_keeps_dense_kinds() {
    let t = |shape: Vec<usize>| q4wgpu::weights::F32Tensor {
        data: (0..shape.iter().product::<usize>())
            .map(|i| i as f32 * 0.37 - 3.0)
            .collect(),
        shape,
    };
    let w = q4wgpu::quantize::quantize_tensor("model.norm.weight", t(vec![10])).expect("norm");
    assert!(matches!(
        w,
        Weight::Dense {
            dtype: q4wgpu::weights::DenseDtype::F32,
            ..
        }
    ));
    let w = q4wgpu::quantize::quantize_tensor(EMBED, t(vec![3, 10])).expect("embed");
    let Weight::Dense {
        dtype: q4wgpu::weights::DenseDtype::BF16,
        data,
        ..
    } = &w
    else {
        panic!("embedding must be BF16")
    };
    assert_eq!(data.bytes()[2..4], bf16::from_f32(0.37 - 3.0).to_le_bytes());
    let err = error_of(q4wgpu::quantize::quantize_tensor(
        "model.layers.0.mlp.up_proj.weight",
        t(vec![30]),
    ));
    assert!(err.contains("up_proj"), "{err}");
}

#[test]
fn writer_refuses_colliding_names_and_incomplete_files() {
    use q4wgpu::formats::q4::{Q4Writer, TensorSpec};
    use q4wgpu::weights::DenseDtype;
    let dir = TempDir::new("writer");
    std::fs::create_dir_all(dir.path()).expect("mkdir");
    let path = dir.join(Q4_WEIGHTS_FILE);
    // An INT4 "w" is stored as "w.qweight"; a dense tensor of that name would collide.
    let specs = [
        ("w".to_string(), TensorSpec::Q4 { rows: 3, cols: 130 }),
        (
            "w.qweight".to_string(),
            TensorSpec::Dense {
                shape: vec![4],
                dtype: DenseDtype::F32,
            },
        ),
    ]
    .into_iter()
    .collect();
    let err = error_of(Q4Writer::create(&path, &specs));
    assert!(err.contains("w.qweight"), "{err}");

    let specs = [("w".to_string(), TensorSpec::Q4 { rows: 3, cols: 130 })]
        .into_iter()
        .collect();
    let writer = Q4Writer::create(&path, &specs).expect("create");
    let err = error_of(writer.finish());
    assert!(
        err.contains("never written") && err.contains("\"w\""),
        "{err}"
    );
    assert!(
        !path.exists(),
        "an incomplete file is never renamed into place"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").collect();
    assert!(leftovers.is_empty(), "the temporary file is removed");
}
