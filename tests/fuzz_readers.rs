//! Every reader of untrusted input under a seeded mutation fuzzer: GGUF, safetensors (Hugging Face
//! and our INT4 file), config.json, and tokenizer.json / tokenizer_config.json with its chat
//! template. Each execution writes one mutated input, opens it the way `run` does and reads
//! everything it exposes. Allowed: any `Err`. Not allowed: a panic, an execution over
//! `TIME_LIMIT` (a hang), or one allocation over `ALLOC_LIMIT` (an absurd count trusted).
//!
//! `cargo test` runs a short bounded campaign (`FUZZ_EXECS`, default 300 per reader, with a fixed
//! seed); `scripts/fuzz.sh` runs the long one. A failing input is saved under
//! `target/fuzz-failures/` and becomes a regression test in `tests/fuzz_corpus/regressions/`,
//! which every run replays first.

use q4wgpu::config::{ModelConfig, TokenIds};
use q4wgpu::formats::gguf::{GgmlType, GgufSource, MetaValue};
use q4wgpu::formats::{hf, q4};
use q4wgpu::test_models;
use q4wgpu::tokenizer::{ChatMessage, Tokenizer};
use q4wgpu::weights::WeightSource;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

// ---- allocation bound ---------------------------------------------------------------------

/// The largest single allocation any reader may make for these inputs (all under 64 KB): a
/// reader that trusts a count or a shape it read would ask for far more.
const ALLOC_LIMIT: usize = 64 << 20;
const TIME_LIMIT: Duration = Duration::from_secs(2);

struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

// ---- mutation -----------------------------------------------------------------------------

/// xorshift64*: the fuzzer's only randomness, so a campaign is repeated by its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values that break size arithmetic: zero, one, sign bits, all ones, just past small powers.
const INTERESTING: [u64; 12] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    1 << 60,
    u64::MAX,
];

/// Numbers for JSON values: what configs must refuse (0, negatives, NaN-like, huge).
const JSON_NUMBERS: [&str; 9] = ["0", "-1", "1", "3", "1e308", "-1e308", "4294967296", "0.5", "18446744073709551615"];

fn mutate(input: &[u8], rng: &mut Rng, others: &[Vec<u8>], json: bool) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = b.len();
        match rng.below(if json { 10 } else { 8 }) {
            0 if len > 0 => {
                let i = rng.below(len);
                b[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                b[i] = INTERESTING[rng.below(INTERESTING.len())] as u8;
            }
            2 if len >= 8 => {
                // A little-endian u32 or u64 overwritten: counts, offsets, dims, type ids.
                let width = if rng.below(2) == 0 { 4 } else { 8 };
                let i = rng.below(len - width + 1);
                let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                b[i..i + width].copy_from_slice(&v[..width]);
            }
            3 => b.truncate(rng.below(len + 1)),
            4 if len > 0 => {
                let (i, n) = (rng.below(len), 1 + rng.below(64));
                b.drain(i..(i + n).min(len));
            }
            5 if len > 0 => {
                let (i, n) = (rng.below(len), 1 + rng.below(64));
                let chunk: Vec<u8> = b[i..(i + n).min(len)].to_vec();
                let at = rng.below(len);
                b.splice(at..at, chunk);
            }
            6 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                b.splice(at..at, bytes);
            }
            7 if !others.is_empty() => {
                // Splice: the head of this input with the tail of another.
                let other = &others[rng.below(others.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                b.truncate(cut);
                b.extend_from_slice(&other[from..]);
            }
            8 | 9 => json_number(&mut b, rng),
            _ => {}
        }
    }
    b
}

/// Replaces one JSON number (a run of digits) with a value configs must cope with.
fn json_number(b: &mut Vec<u8>, rng: &mut Rng) {
    let digits: Vec<usize> = (0..b.len())
        .filter(|&i| b[i].is_ascii_digit() && (i == 0 || !b[i - 1].is_ascii_digit()))
        .collect();
    if digits.is_empty() {
        return;
    }
    let start = digits[rng.below(digits.len())];
    let end = (start..b.len())
        .find(|&i| !(b[i].is_ascii_digit() || b[i] == b'.' || b[i] == b'e' || b[i] == b'-'))
        .unwrap_or(b.len());
    let with = JSON_NUMBERS[rng.below(JSON_NUMBERS.len())].as_bytes();
    b.splice(start..end, with.iter().copied());
}

// ---- targets ------------------------------------------------------------------------------

/// One reader: where its input goes and how it is read. `exec` returns whether the input was
/// accepted (for the report; both outcomes are fine).
struct Target {
    name: &'static str,
    json: bool,
    seeds: fn(&Path) -> Vec<Vec<u8>>,
    exec: fn(&Path, &[u8]) -> bool,
}

fn scratch(name: &str) -> PathBuf {
    let base = Path::new("/dev/shm");
    let base = if base.is_dir() {
        base.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("q4wgpu-fuzz-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating a scratch folder");
    dir
}

/// A model small enough that an execution takes well under a millisecond: one layer, hidden 16,
/// 2 heads of 8, 1 KV head, FFN 12, vocabulary 8.
fn micro_config() -> ModelConfig {
    ModelConfig {
        architectures: vec!["LlamaForCausalLM".into()],
        model_type: Some("llama".into()),
        hidden_size: 16,
        intermediate_size: 12,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: Some(1),
        head_dim: None,
        vocab_size: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        tie_word_embeddings: false,
        max_position_embeddings: 64,
        attention_bias: None,
        bos_token_id: Some(TokenIds::One(1)),
        eos_token_id: Some(TokenIds::One(2)),
    }
}

fn hf_seed_folder(dir: &Path) -> PathBuf {
    let folder = dir.join("seed-hf");
    if !folder.join("model.safetensors").is_file() {
        test_models::write_hf_model(&folder, &micro_config(), 7).expect("writing the seed model");
    }
    folder
}

fn read_all(source: &dyn WeightSource) {
    for name in source.tensor_names() {
        if let Ok(t) = source.read_f32(&name) {
            assert_eq!(t.data.len(), t.shape.iter().product::<usize>(), "{name}");
        }
    }
}

// Hugging Face safetensors: the weights file mutated, the config kept.
fn hf_seeds(dir: &Path) -> Vec<Vec<u8>> {
    vec![std::fs::read(hf_seed_folder(dir).join("model.safetensors")).expect("seed")]
}

fn hf_exec(dir: &Path, input: &[u8]) -> bool {
    let folder = dir.join("hf");
    if !folder.join("config.json").is_file() {
        std::fs::create_dir_all(&folder).expect("folder");
        std::fs::copy(hf_seed_folder(dir).join("config.json"), folder.join("config.json"))
            .expect("config");
    }
    std::fs::write(folder.join("model.safetensors"), input).expect("write input");
    match hf::HfSource::open(&folder) {
        Ok(source) => {
            read_all(&source);
            true
        }
        Err(_) => false,
    }
}

// Our INT4 file: model.q4.safetensors mutated, its config kept.
fn q4_seeds(dir: &Path) -> Vec<Vec<u8>> {
    let folder = dir.join("seed-q4");
    if !q4::is_q4_folder(&folder) {
        let source = hf::HfSource::open(&hf_seed_folder(dir)).expect("seed source");
        q4wgpu::quantize::quantize_to_folder(&source, &folder, false).expect("seed q4");
    }
    vec![std::fs::read(folder.join(q4::Q4_WEIGHTS_FILE)).expect("seed")]
}

fn q4_exec(dir: &Path, input: &[u8]) -> bool {
    let folder = dir.join("q4");
    if !folder.join("config.json").is_file() {
        std::fs::create_dir_all(&folder).expect("folder");
        std::fs::copy(dir.join("seed-q4").join("config.json"), folder.join("config.json"))
            .expect("config");
    }
    std::fs::write(folder.join(q4::Q4_WEIGHTS_FILE), input).expect("write input");
    match q4::open_q4_folder(&folder) {
        Ok(w) => {
            for name in w.tensors.keys() {
                if let Ok(v) = w.q4(name) {
                    assert_eq!(v.scales.len(), v.rows * v.blocks_per_row(), "{name}");
                } else {
                    let _ = w.dense_f32(name);
                }
            }
            let mut row = vec![0f32; w.config.hidden_size];
            let _ = w.embedding_row(0, &mut row);
            true
        }
        Err(_) => false,
    }
}

// config.json: parsed, validated, then every derived size computed (where a zero divides).
fn config_seeds(_dir: &Path) -> Vec<Vec<u8>> {
    let mut with_scaling = serde_json::to_value(micro_config()).expect("json");
    with_scaling["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    vec![
        serde_json::to_vec_pretty(&micro_config()).expect("json"),
        serde_json::to_vec_pretty(&test_models::tiny_config(q4wgpu::Arch::Qwen2)).expect("json"),
        serde_json::to_vec_pretty(&with_scaling).expect("json"),
    ]
}

fn config_exec(dir: &Path, input: &[u8]) -> bool {
    let path = dir.join("config.json");
    std::fs::write(&path, input).expect("write input");
    match ModelConfig::from_file(&path) {
        Ok(c) => {
            let _ = (c.head_dim(), c.kv_groups(), c.q_dim(), c.kv_dim(), c.eos_token_ids());
            let _ = c.rope_inv_freq();
            let _ = q4wgpu::quantize::expected_tensors(&c);
            let _ = q4wgpu::scheduler::LayerPack::new(&c);
            true
        }
        Err(_) => false,
    }
}

// tokenizer.json and tokenizer_config.json (its chat template): one of the two mutated per run.
fn tokenizer_seeds(_dir: &Path) -> Vec<Vec<u8>> {
    let tok = serde_json::to_vec(&test_models::tiny_tokenizer_json()).expect("json");
    let cfg = serde_json::to_vec_pretty(&test_models::tiny_tokenizer_config_json()).expect("json");
    // One input holds both files, split at a marker line, so both are mutated and spliced.
    let mut joined = cfg.clone();
    joined.extend_from_slice(SPLIT);
    joined.extend_from_slice(&tok);
    let mut loop_template = test_models::tiny_tokenizer_config_json();
    loop_template["chat_template"] =
        "{% for m in messages %}{% for i in range(100) %}{{ m['content'] }}{% endfor %}{% endfor %}".into();
    let mut joined2 = serde_json::to_vec_pretty(&loop_template).expect("json");
    joined2.extend_from_slice(SPLIT);
    joined2.extend_from_slice(&tok);
    vec![joined, joined2]
}

const SPLIT: &[u8] = b"\n=====\n";

fn tokenizer_exec(dir: &Path, input: &[u8]) -> bool {
    let (cfg, tok) = match input.windows(SPLIT.len()).position(|w| w == SPLIT) {
        Some(i) => (&input[..i], &input[i + SPLIT.len()..]),
        None => (input, &b""[..]),
    };
    let folder = dir.join("tok");
    std::fs::create_dir_all(&folder).expect("folder");
    std::fs::write(folder.join("tokenizer_config.json"), cfg).expect("write");
    std::fs::write(folder.join("tokenizer.json"), tok).expect("write");
    let Ok(t) = Tokenizer::from_folder(&folder) else {
        return false;
    };
    if let Ok(ids) = t.encode("Hello, world! <|im_end|> 12345", t.add_bos()) {
        let _ = t.decode(&ids, true);
    }
    let messages = [
        ChatMessage::new("system", "be brief"),
        ChatMessage::new("user", "1.1+2.3=?"),
    ];
    if let Ok(text) = t.apply_chat_template(&messages, true) {
        let _ = t.encode(&text, false);
    }
    true
}

// GGUF: a micro llama model with F32, F16 and Q8_0 tensors and a byte-level BPE vocabulary.
fn gguf_seeds(_dir: &Path) -> Vec<Vec<u8>> {
    vec![micro_gguf()]
}

fn gguf_exec(dir: &Path, input: &[u8]) -> bool {
    let path = dir.join("model.gguf");
    std::fs::write(&path, input).expect("write input");
    let Ok(source) = GgufSource::open(&path) else {
        return false;
    };
    read_all(&source);
    if let Ok(t) = Tokenizer::from_gguf_metadata(&source.header().metadata) {
        if let Ok(ids) = t.encode("Hello, world!", t.add_bos()) {
            let _ = t.decode(&ids, true);
        }
    }
    true
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn micro_gguf() -> Vec<u8> {
    use MetaValue::*;
    let c = micro_config();
    let byte_tokens: Vec<MetaValue> = (0..=255u8)
        .map(|b| String(test_models::byte_to_char(b).to_string()))
        .collect();
    let n_tokens = byte_tokens.len() as u32;
    let meta: Vec<(&str, MetaValue)> = vec![
        ("general.architecture", String("llama".into())),
        ("llama.embedding_length", U32(16)),
        ("llama.block_count", U32(1)),
        ("llama.feed_forward_length", U32(12)),
        ("llama.attention.head_count", U32(2)),
        ("llama.attention.head_count_kv", U32(1)),
        ("llama.attention.layer_norm_rms_epsilon", F32(1e-5)),
        ("llama.rope.freq_base", F32(10000.0)),
        ("llama.context_length", U32(64)),
        ("tokenizer.ggml.model", String("gpt2".into())),
        ("tokenizer.ggml.pre", String("qwen2".into())),
        ("tokenizer.ggml.tokens", Array(byte_tokens)),
        ("tokenizer.ggml.token_type", Array((0..n_tokens).map(|_| I32(1)).collect())),
        ("tokenizer.ggml.merges", Array(vec![])),
        ("tokenizer.ggml.bos_token_id", U32(1)),
        ("tokenizer.ggml.eos_token_id", U32(2)),
    ];
    let (h, f, kv) = (16u64, 12u64, 8u64);
    let vocab = c.vocab_size as u64;
    // (name, GGUF dims (fastest first), type)
    let tensors: Vec<(&str, Vec<u64>, GgmlType)> = vec![
        ("token_embd.weight", vec![h, vocab], GgmlType::F16),
        ("output_norm.weight", vec![h], GgmlType::F32),
        ("output.weight", vec![h, vocab], GgmlType::F32),
        ("blk.0.attn_norm.weight", vec![h], GgmlType::F32),
        ("blk.0.attn_q.weight", vec![h, h], GgmlType::F32),
        ("blk.0.attn_k.weight", vec![h, kv], GgmlType::F16),
        ("blk.0.attn_v.weight", vec![h, kv], GgmlType::F32),
        ("blk.0.attn_output.weight", vec![h, h], GgmlType::F32),
        ("blk.0.ffn_norm.weight", vec![h], GgmlType::F32),
        ("blk.0.ffn_gate.weight", vec![h, f], GgmlType::F32),
        ("blk.0.ffn_up.weight", vec![h, f], GgmlType::F32),
        ("blk.0.ffn_down.weight", vec![f, h], GgmlType::F32),
        ("blk.0.extra.weight", vec![32], GgmlType::Q8_0),
    ];
    let data = |n: u64, ty: GgmlType| -> Vec<u8> {
        match ty {
            GgmlType::F32 => (0..n).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect(),
            GgmlType::F16 => (0..n)
                .flat_map(|i| half::f16::from_f32(i as f32 * 0.01).to_le_bytes())
                .collect(),
            // One Q8_0 block: an f16 scale and 32 signed bytes.
            _ => {
                let mut b = half::f16::from_f32(0.5).to_le_bytes().to_vec();
                b.extend((0..32).map(|i| i as u8));
                b
            }
        }
    };
    let align = 32usize;
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        put_str(&mut out, k);
        put_meta(&mut out, v, true);
    }
    let blobs: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, dims, ty)| data(dims.iter().product(), *ty))
        .collect();
    let mut offset = 0usize;
    for ((name, dims, ty), blob) in tensors.iter().zip(&blobs) {
        put_str(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(ty.id().to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset = (offset + blob.len()).next_multiple_of(align);
    }
    out.resize(out.len().next_multiple_of(align), 0);
    for blob in &blobs {
        out.extend(blob);
        out.resize(out.len().next_multiple_of(align), 0);
    }
    out
}

fn meta_type(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::String(_) => 8,
        MetaValue::Array(_) => 9,
        other => panic!("the seed writer does not write {other:?}"),
    }
}

fn put_meta(out: &mut Vec<u8>, v: &MetaValue, with_type: bool) {
    if with_type {
        out.extend(meta_type(v).to_le_bytes());
    }
    match v {
        MetaValue::U32(x) => out.extend(x.to_le_bytes()),
        MetaValue::I32(x) => out.extend(x.to_le_bytes()),
        MetaValue::F32(x) => out.extend(x.to_le_bytes()),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::Array(items) => {
            out.extend(items.first().map_or(4, meta_type).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_meta(out, item, false);
            }
        }
        other => panic!("the seed writer does not write {other:?}"),
    }
}

const TARGETS: [Target; 5] = [
    Target { name: "gguf", json: false, seeds: gguf_seeds, exec: gguf_exec },
    Target { name: "safetensors-hf", json: false, seeds: hf_seeds, exec: hf_exec },
    Target { name: "safetensors-q4", json: false, seeds: q4_seeds, exec: q4_exec },
    Target { name: "config-json", json: true, seeds: config_seeds, exec: config_exec },
    Target { name: "tokenizer-chat-template", json: true, seeds: tokenizer_seeds, exec: tokenizer_exec },
];

// ---- the campaign -------------------------------------------------------------------------

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus").join(target)
}

/// Saved inputs of a target (regressions and kept seeds), sorted by name.
fn saved_inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir(target))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).expect("reading a corpus file");
            (p, bytes)
        })
        .collect()
}

/// Runs one input with the checks; on a failure the input is saved and the test fails.
fn check_one(t: &Target, dir: &Path, input: &[u8], label: &str) -> bool {
    LARGEST.store(0, Ordering::Relaxed);
    let start = Instant::now();
    let result = std::panic::catch_unwind(|| (t.exec)(dir, input));
    let elapsed = start.elapsed();
    let largest = LARGEST.load(Ordering::Relaxed);
    let problem = match &result {
        Err(_) => Some("panicked".to_string()),
        Ok(_) if elapsed > TIME_LIMIT => Some(format!("took {elapsed:?} (limit {TIME_LIMIT:?})")),
        Ok(_) if largest > ALLOC_LIMIT => {
            Some(format!("allocated {largest} bytes at once (limit {ALLOC_LIMIT})"))
        }
        Ok(_) => None,
    };
    if let Some(p) = problem {
        let out = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/fuzz-failures")
            .join(t.name);
        let _ = std::fs::create_dir_all(&out);
        let file = out.join(format!("{label}.bin"));
        let _ = std::fs::write(&file, input);
        panic!("{}: input {label} {p}; saved to {}", t.name, file.display());
    }
    matches!(result, Ok(true))
}

fn campaign(t: &Target, execs: u64, seed: u64) {
    let dir = scratch(t.name);
    // Replay the kept inputs (regressions first): each must pass the checks.
    let saved = saved_inputs(t.name);
    for (path, bytes) in &saved {
        check_one(t, &dir, bytes, &format!("corpus-{}", path.display()));
    }
    let mut pool: Vec<Vec<u8>> = (t.seeds)(&dir);
    pool.extend(saved.into_iter().map(|(_, b)| b));
    for s in pool.clone() {
        assert!(
            check_one(t, &dir, &s, "seed") || t.name == "tokenizer-chat-template",
            "{}: a seed input must be accepted, or the fuzzer only tests the first check",
            t.name
        );
    }
    let mut rng = Rng(seed ^ 0x9E37_79B9_7F4A_7C15 ^ t.name.len() as u64);
    let (mut accepted, start) = (0u64, Instant::now());
    let mut last_report = Instant::now();
    for i in 0..execs {
        let base = &pool[rng.below(pool.len())];
        let input = mutate(base, &mut rng, &pool, t.json);
        if check_one(t, &dir, &input, &format!("seed{seed}-exec{i}")) {
            accepted += 1;
            // Accepted variants join the pool (bounded), so mutations go deeper than one step.
            if pool.len() < 64 && input.len() < 1 << 16 {
                pool.push(input);
            }
        }
        if last_report.elapsed() > Duration::from_secs(60) {
            eprintln!("{}: {i} executions, {accepted} accepted, {:.0} s", t.name, start.elapsed().as_secs_f64());
            last_report = Instant::now();
        }
    }
    eprintln!(
        "fuzz {}: {execs} executions in {:.1} s, {accepted} accepted, 0 failures (seed {seed})",
        t.name,
        start.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn execs() -> u64 {
    std::env::var("FUZZ_EXECS").ok().and_then(|v| v.parse().ok()).unwrap_or(300)
}

fn seed() -> u64 {
    std::env::var("FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(1)
}

fn target(name: &str) -> &'static Target {
    TARGETS.iter().find(|t| t.name == name).expect("a known target")
}

#[test]
fn fuzz_gguf() {
    campaign(target("gguf"), execs(), seed());
}

#[test]
fn fuzz_safetensors_hf() {
    campaign(target("safetensors-hf"), execs(), seed());
}

#[test]
fn fuzz_safetensors_q4() {
    campaign(target("safetensors-q4"), execs(), seed());
}

#[test]
fn fuzz_config_json() {
    campaign(target("config-json"), execs(), seed());
}

#[test]
fn fuzz_tokenizer_and_chat_template() {
    campaign(target("tokenizer-chat-template"), execs(), seed());
}
