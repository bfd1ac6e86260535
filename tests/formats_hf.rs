//! Hugging Face folders: round trips through `write_hf_folder` / `HfSource` (single file and
//! sharded, BF16/F16/F32), clear errors on broken folders, and the tiny test model's tokenizer.

use half::{bf16, f16};
use q4wgpu::formats::hf::{is_hf_folder, write_hf_folder, HfDtype, HfSource};
use q4wgpu::test_models::{random_tensors, special_token_id, tiny_config, write_tiny_hf_model};
use q4wgpu::weights::WeightSource;
use q4wgpu::Arch;
use std::path::{Path, PathBuf};

/// A fresh folder under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("q4wgpu-hf-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
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

type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

fn write(dir: &Path, arch: Arch, dtype: HfDtype, max_shard: u64) -> Tensors {
    let config = tiny_config(arch);
    let tensors = random_tensors(&config, 11);
    write_hf_folder(
        dir,
        &config,
        &mut tensors.clone().into_iter().map(Ok),
        dtype,
        max_shard,
    )
    .expect("write");
    tensors
}

fn rounded(dtype: HfDtype, v: f32) -> f32 {
    match dtype {
        HfDtype::BF16 => bf16::from_f32(v).to_f32(),
        HfDtype::F16 => f16::from_f32(v).to_f32(),
        HfDtype::F32 => v,
    }
}

fn assert_reads_back(source: &HfSource, tensors: &Tensors, dtype: HfDtype) {
    let mut names: Vec<String> = tensors.iter().map(|t| t.0.clone()).collect();
    names.sort();
    assert_eq!(source.tensor_names(), names);
    for (name, shape, values) in tensors {
        assert_eq!(&source.shape(name).expect("shape"), shape, "{name}");
        let t = source.read_f32(name).expect("read");
        assert_eq!(&t.shape, shape, "{name}");
        for (i, (&got, &v)) in t.data.iter().zip(values).enumerate() {
            assert_eq!(
                got.to_bits(),
                rounded(dtype, v).to_bits(),
                "{name}[{i}]: {got} vs {v}"
            );
        }
    }
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn single_file_round_trips_in_every_dtype() {
    for (arch, dtype) in [
        (Arch::Qwen2, HfDtype::BF16),
        (Arch::Llama, HfDtype::F16),
        (Arch::Qwen2, HfDtype::F32),
    ] {
        let dir = TempDir::new("single");
        let tensors = write(dir.path(), arch, dtype, u64::MAX);
        assert_eq!(files(dir.path()), vec!["config.json", "model.safetensors"]);
        assert!(is_hf_folder(dir.path()));
        let source = HfSource::open(dir.path()).expect("open");
        assert_eq!(source.config(), &tiny_config(arch));
        assert_reads_back(&source, &tensors, dtype);
        // The container is standard: the reference parser accepts it and sees the dtype.
        let bytes = std::fs::read(dir.path().join("model.safetensors")).expect("read file");
        let st =
            safetensors::SafeTensors::deserialize(&bytes).expect("safetensors parses our file");
        assert_eq!(st.len(), tensors.len());
        assert_eq!(
            source.dtype(&tensors[0].0).expect("dtype").to_string(),
            format!("{dtype:?}")
        );
    }
}

#[test]
fn sharded_folder_round_trips_with_an_index() {
    let dir = TempDir::new("sharded");
    // 40 kB shards: the 300 x 160 BF16 embedding (96 kB) is larger and gets a shard of its own.
    let tensors = write(dir.path(), Arch::Qwen2, HfDtype::BF16, 40_000);
    let names = files(dir.path());
    let shards: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    assert!(shards.len() > 3, "{names:?}");
    let count = shards.len();
    assert!(names.contains(&"model.safetensors.index.json".to_string()));
    assert!(
        !names.iter().any(|n| n.contains("tmp")),
        "scratch files left: {names:?}"
    );
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).expect("index"),
    )
    .expect("json");
    let weight_map = index["weight_map"].as_object().expect("map");
    assert_eq!(weight_map.len(), tensors.len());
    for (i, shard) in shards.iter().enumerate() {
        assert_eq!(
            **shard,
            format!("model-{:05}-of-{:05}.safetensors", i + 1, count)
        );
        let bytes = std::fs::read(dir.path().join(shard)).expect("read shard");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("shard parses");
        let data: usize = st.tensors().iter().map(|(_, t)| t.data().len()).sum();
        let held = weight_map
            .values()
            .filter(|v| v.as_str() == Some(shard.as_str()))
            .count();
        assert_eq!(held, st.len(), "{shard}");
        // A shard stays under the limit unless it holds one tensor larger than the limit.
        assert!(
            data <= 40_000 || st.len() == 1,
            "{shard}: {data} bytes in {} tensors",
            st.len()
        );
    }
    let source = HfSource::open(dir.path()).expect("open");
    assert_reads_back(&source, &tensors, HfDtype::BF16);
}

#[test]
fn missing_shard_is_named() {
    let dir = TempDir::new("missing");
    write(dir.path(), Arch::Llama, HfDtype::BF16, 40_000);
    let names = files(dir.path());
    let victim = names
        .iter()
        .find(|n| n.starts_with("model-00002-of-"))
        .expect("a second shard");
    std::fs::remove_file(dir.path().join(victim)).expect("remove");
    let err = error_of(HfSource::open(dir.path()));
    assert!(err.contains(victim) && err.contains("missing"), "{err}");
}

#[test]
fn index_naming_a_tensor_its_shard_lacks_is_an_error() {
    let dir = TempDir::new("badindex");
    write(dir.path(), Arch::Qwen2, HfDtype::BF16, 40_000);
    let path = dir.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    let first = index["weight_map"]["model.embed_tokens.weight"]
        .as_str()
        .expect("embedding shard")
        .to_string();
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = first.clone().into();
    std::fs::write(&path, index.to_string()).expect("write");
    let err = error_of(HfSource::open(dir.path()));
    assert!(
        err.contains("model.layers.9.mlp.up_proj.weight") && err.contains(&first),
        "{err}"
    );
}

#[test]
fn truncated_file_is_a_clear_error() {
    let dir = TempDir::new("trunc");
    write(dir.path(), Arch::Qwen2, HfDtype::BF16, u64::MAX);
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).expect("stat").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    file.set_len(len - 100).expect("truncate");
    let err = error_of(HfSource::open(dir.path()));
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn bad_header_is_a_clear_error() {
    let dir = TempDir::new("header");
    write(dir.path(), Arch::Qwen2, HfDtype::BF16, u64::MAX);
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).expect("read");
    // Break the JSON: its opening brace becomes garbage.
    bytes[8] = b'#';
    std::fs::write(&path, &bytes).expect("write");
    let err = error_of(HfSource::open(dir.path()));
    assert!(
        err.contains("model.safetensors") && err.contains("JSON"),
        "{err}"
    );
    // A header length pointing past the end of the file.
    let past_end = (bytes.len() as u64).to_le_bytes();
    bytes[..8].copy_from_slice(&past_end);
    std::fs::write(&path, &bytes).expect("write");
    let err = error_of(HfSource::open(dir.path()));
    assert!(
        err.contains("model.safetensors") && err.contains("header length"),
        "{err}"
    );
}

#[test]
fn unsupported_dtype_names_the_tensor_and_the_supported_ones() {
    let dir = TempDir::new("dtype");
    std::fs::create_dir_all(dir.path()).expect("mkdir");
    let config = tiny_config(Arch::Qwen2);
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string(&config).expect("json"),
    )
    .expect("write");
    let ids: Vec<u8> = [3i64, -1, 7].iter().flat_map(|v| v.to_le_bytes()).collect();
    let norm: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        (
            "position_ids",
            safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![3], &ids)
                .expect("view"),
        ),
        (
            "norm",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &norm)
                .expect("view"),
        ),
    ];
    let bytes = safetensors::serialize(views, None).expect("serialize");
    std::fs::write(dir.path().join("model.safetensors"), bytes).expect("write");
    let source = HfSource::open(dir.path()).expect("an unused I64 tensor does not stop opening");
    assert_eq!(
        source.read_f32("norm").expect("f32 reads").data,
        vec![1.0, 2.0]
    );
    let err = error_of(source.read_f32("position_ids"));
    assert!(
        err.contains("position_ids") && err.contains("I64") && err.contains("BF16, F16, F32"),
        "{err}"
    );
    let err = error_of(source.read_f32("nope"));
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn folder_without_config_or_weights_is_refused() {
    let dir = TempDir::new("noconfig");
    write(dir.path(), Arch::Qwen2, HfDtype::BF16, u64::MAX);
    std::fs::remove_file(dir.path().join("config.json")).expect("rm");
    assert!(!is_hf_folder(dir.path()));
    let err = error_of(HfSource::open(dir.path()));
    assert!(err.contains("config.json"), "{err}");

    let dir = TempDir::new("noweights");
    write(dir.path(), Arch::Qwen2, HfDtype::BF16, u64::MAX);
    std::fs::remove_file(dir.path().join("model.safetensors")).expect("rm");
    let err = error_of(HfSource::open(dir.path()));
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn writer_refuses_a_non_empty_folder_and_bad_tensors() {
    let dir = TempDir::new("nonempty");
    std::fs::create_dir_all(dir.path()).expect("mkdir");
    std::fs::write(dir.path().join("notes.txt"), "mine").expect("write");
    let config = tiny_config(Arch::Qwen2);
    let mut none = std::iter::empty();
    let err = error_of(write_hf_folder(
        dir.path(),
        &config,
        &mut none,
        HfDtype::BF16,
        u64::MAX,
    ));
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(files(dir.path()), vec!["notes.txt"]);

    let dir = TempDir::new("badshape");
    let mut bad = std::iter::once(Ok(("x".to_string(), vec![2, 3], vec![0.0; 5])));
    let err = error_of(write_hf_folder(
        dir.path(),
        &config,
        &mut bad,
        HfDtype::BF16,
        u64::MAX,
    ));
    assert!(err.contains("\"x\""), "{err}");
    assert!(
        files(dir.path()).is_empty(),
        "a failed write leaves no files: {:?}",
        files(dir.path())
    );
}

#[test]
fn tiny_model_folder_has_a_working_tokenizer_and_template() {
    let dir = TempDir::new("tiny");
    write_tiny_hf_model(dir.path(), Arch::Llama, 3).expect("write");
    assert!(is_hf_folder(dir.path()));
    let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json"))
        .expect("tokenizer loads");
    assert!(tok.get_vocab_size(true) <= tiny_config(Arch::Llama).vocab_size);
    let text = "<|im_start|>user\nthe theory in ünïcode\n<|im_end|>";
    let enc = tok.encode(text, false).expect("encode");
    let ids = enc.get_ids();
    assert_eq!(ids[0], special_token_id("<|im_start|>").expect("id"));
    assert_eq!(
        *ids.last().expect("ids"),
        special_token_id("<|im_end|>").expect("id")
    );
    // Merges fire: " the" is one token (Ġthe), so there are fewer tokens than bytes.
    assert!(
        ids.len() < text.len(),
        "{} ids for {} bytes",
        ids.len(),
        text.len()
    );
    assert_eq!(tok.decode(ids, false).expect("decode"), text);

    let tc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("tokenizer_config.json")).expect("read"),
    )
    .expect("json");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    let mut env = minijinja::Environment::new();
    env.add_template("chat", tc["chat_template"].as_str().expect("template"))
        .expect("template parses");
    let out = env
        .get_template("chat")
        .expect("template")
        .render(minijinja::context! { messages => vec![minijinja::context!{ role => "user", content => "hi" }], add_generation_prompt => true })
        .expect("render");
    assert_eq!(
        out,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}
