//! End-to-end checks on the real Qwen2.5-Coder-0.5B-Instruct (fetched once into the cache):
//! the GPU's greedy continuation equals the CPU reference's, and the CLI answers as a user sees it.

use q4wgpu::cpu::{CpuDecoder, CpuModel};
use q4wgpu::engine::{EngineOptions, GpuModel};
use q4wgpu::generate::{generate, GenerateOptions};
use q4wgpu::gpu::testing::gpu;
use q4wgpu::model;
use q4wgpu::sampling::SamplingParams;
use q4wgpu::tokenizer::ChatMessage;
use std::process::Command;

const TOKENS: usize = 32;

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        stop_strings: vec![],
        logprobs: None,
    }
}

/// Greedy decoding of 32 tokens from several prompts (code, a chat turn, prose): the GPU picks
/// the same tokens as the CPU reference.
#[test]
fn gpu_greedy_continuation_equals_the_cpu_reference() {
    let path = model::resolve(None).expect("fetch and quantize the default model");
    let loaded = model::load(&path, false).expect("load");
    // The CPU reference quantizes decode activations as the GPU does by default.
    let cpu = CpuModel::new(&loaded.weights)
        .expect("cpu")
        .with_decode_activations(EngineOptions::default().decode_activations);
    let mut engine = GpuModel::new(
        gpu(),
        &loaded.weights,
        EngineOptions {
            ctx_size: 512,
            ..Default::default()
        },
    )
    .expect("gpu");
    let tok = &loaded.tokenizer;
    let chat = tok
        .apply_chat_template(
            &[ChatMessage::new(
                "user",
                "Write a Python function that checks whether a number is prime, with a docstring.",
            )],
            true,
        )
        .expect("chat template");
    let prompts = [
        (
            "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n".to_string(),
            tok.add_bos(),
        ),
        (chat, false),
        (
            "The three most important ideas in the history of computing are".to_string(),
            tok.add_bos(),
        ),
    ];
    let opts = greedy(TOKENS);
    for (prompt, add_bos) in &prompts {
        let ids = tok.encode(prompt, *add_bos).expect("encode");
        engine.reset();
        let on_gpu = generate(&mut engine, tok, &ids, &opts, &mut |_| {}).expect("gpu generate");
        // An f16 KV cache as the GPU's: int8 decode activations would magnify an f32 cache's
        // differences (kernels_q8 and model_gpu check the arithmetic tightly).
        let mut decoder = CpuDecoder::new(&cpu, 512).with_f16_cache();
        let on_cpu = generate(&mut decoder, tok, &ids, &opts, &mut |_| {}).expect("cpu generate");
        assert_eq!(
            on_cpu.generated_token_ids.len(),
            TOKENS,
            "the CPU stopped early on {prompt:?}: {:?}",
            on_cpu.text
        );
        assert_eq!(
            on_gpu.generated_token_ids, on_cpu.generated_token_ids,
            "prompt {prompt:?}\nGPU text {:?}\nCPU text {:?}",
            on_gpu.text, on_cpu.text
        );
    }
}

fn q4wgpu(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_q4wgpu"))
        .args(args)
        .output()
        .expect("run the q4wgpu binary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "q4wgpu {args:?} failed:\n{stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "q4wgpu {args:?}: stdout is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The README's command, on the GPU (lavapipe in CI) and on the CPU reference: the model answers 3.4.
#[test]
fn the_cli_answers_the_readme_question_on_gpu_and_cpu() {
    // Fetch and quantize in this process first (serialized with the other test), so the CLI
    // processes find the cached model instead of racing to create it.
    model::resolve(None).expect("fetch and quantize the default model");
    for backend in [None, Some("--cpu")] {
        let mut args = vec![
            "run",
            "--chat",
            "--prompt",
            "1.1+2.3=?",
            "--max-tokens",
            "40",
            "--json",
        ];
        args.extend(backend);
        let v = q4wgpu(&args);
        let text = v["text"].as_str().expect("text");
        assert!(text.contains("3.4"), "{backend:?}: answered {text:?}");
        assert_eq!(v["finish_reason"], "eos", "{backend:?}: {v}");
        let prompt_ids = v["prompt_token_ids"].as_array().expect("prompt ids");
        assert_eq!(
            prompt_ids.first().and_then(|x| x.as_u64()),
            Some(151644),
            "the chat prompt starts with <|im_start|>"
        );
        assert!(!v["generated_token_ids"].as_array().expect("ids").is_empty());
    }
}

#[test]
fn a_prompt_longer_than_the_context_is_a_clear_error() {
    model::resolve(None).expect("fetch and quantize the default model");
    let long = "word ".repeat(200);
    let out = Command::new(env!("CARGO_BIN_EXE_q4wgpu"))
        .args(["run", "--prompt", &long, "--ctx-size", "64", "--cpu"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--ctx-size") && !stderr.contains("panicked"),
        "{stderr}"
    );
}
