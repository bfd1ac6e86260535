//! `q4wgpu quantize` on the real Qwen2.5-Coder-0.5B-Instruct GGUF, and on a Hugging Face folder
//! written from it (sharded safetensors, as `git clone` of a model repository gives): both work
//! and give the same INT4 file, and the quantized folder carries a working tokenizer.

use q4wgpu::fetch;
use q4wgpu::formats::gguf::GgufSource;
use q4wgpu::formats::hf::{write_hf_folder, HfDtype};
use q4wgpu::formats::q4;
use q4wgpu::tokenizer::Tokenizer;
use q4wgpu::weights::WeightSource;
use std::path::Path;
use std::process::Command;

fn quantize_cli(src: &Path, dst: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_q4wgpu"))
        .arg("quantize")
        .arg(src)
        .arg(dst)
        .output()
        .expect("run q4wgpu");
    assert!(
        out.status.success(),
        "quantize {} failed:\n{}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn gguf_and_the_hf_folder_written_from_it_quantize_to_the_same_file() {
    let gguf = fetch::ensure(&fetch::QWEN25_CODER_05B).expect("fetch the 0.5B model");
    let work = std::env::temp_dir().join(format!("q4wgpu-quantize-real-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let (hf, from_gguf, from_hf) = (
        work.join("hf"),
        work.join("q4-from-gguf"),
        work.join("q4-from-hf"),
    );

    // The Hugging Face layout, in f32 so that both paths quantize exactly the same values.
    let source = GgufSource::open(&gguf).expect("open gguf");
    let mut tensors = source.tensor_names().into_iter().map(|name| {
        let t = source.read_f32(&name)?;
        Ok((name, t.shape, t.data))
    });
    write_hf_folder(&hf, source.config(), &mut tensors, HfDtype::F32, 1 << 30)
        .expect("write HF folder");
    let tokenizer =
        Tokenizer::from_gguf_metadata(&source.header().metadata).expect("gguf tokenizer");
    tokenizer.write_files(&hf).expect("tokenizer files");
    assert!(
        hf.join("model.safetensors.index.json").is_file(),
        "a 2 GB model in 1 GB shards must be sharded"
    );

    quantize_cli(&gguf, &from_gguf);
    quantize_cli(&hf, &from_hf);
    let a = std::fs::read(from_gguf.join(q4::Q4_WEIGHTS_FILE)).expect("read");
    let b = std::fs::read(from_hf.join(q4::Q4_WEIGHTS_FILE)).expect("read");
    assert!(
        a == b,
        "the INT4 files differ ({} vs {} bytes)",
        a.len(),
        b.len()
    );

    let t = Tokenizer::from_folder(&from_hf).expect("tokenizer of the quantized folder");
    assert_eq!(t.token_to_id("<|im_end|>"), Some(151645));
    let chat = t
        .apply_chat_template(&[q4wgpu::tokenizer::ChatMessage::new("user", "hi")], true)
        .expect("template");
    assert!(chat.ends_with("<|im_start|>assistant\n"), "{chat:?}");
    let weights = q4::open_q4_folder(&from_hf).expect("open quantized folder");
    assert_eq!(weights.config.num_hidden_layers, 24);
    let _ = std::fs::remove_dir_all(&work);
}
