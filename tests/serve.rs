//! `q4wgpu serve` end to end: the binary on a tiny random model, driven by the official `openai`
//! Python client and raw httpx (tests/serve/openai_suite.py), with `q4wgpu run --json` as the
//! oracle for greedy answers. The CPU reference backend carries the broad API suite (cheap); the
//! GPU backend (lavapipe in CI) runs slots, the prompt cache and disconnects once.

mod serve_support;

use q4wgpu::{test_models, Arch};
use serve_support::{python_with_openai, run_json_text, Server};
use std::path::PathBuf;
use std::process::Command;

fn tiny_model(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("q4wgpu-serve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    test_models::write_tiny_hf_model(&dir, Arch::Qwen2, 11).expect("write tiny model");
    dir
}

/// Runs the Python suite in `mode` against `server`; panics with its output on failure.
fn suite(mode: &str, server: &Server, expected: &serde_json::Value) {
    let python = python_with_openai();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/serve/openai_suite.py");
    let out = Command::new(python)
        .args([
            script,
            mode,
            &server.base,
            &server.model_id,
            server.api_key.as_deref().unwrap_or(""),
            &expected.to_string(),
        ])
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("all passed"),
        "the {mode} suite failed:\n{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
}

fn expected(model: &PathBuf, cpu: bool, prompts: &[&str]) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = prompts
        .iter()
        .map(|p| (p.to_string(), run_json_text(model, cpu, p, 16).into()))
        .collect();
    map.into()
}

#[test]
fn openai_api_on_the_cpu_backend() {
    let model = tiny_model("cpu");
    let want = expected(&model, true, &["Hello", "The quick brown fox"]);
    let server = Server::start(&model, &["--cpu", "--parallel", "4", "--api-key", "sekrit"]);
    suite("full", &server, &want);
    let server = Server::start(&model, &["--cpu", "--parallel", "1", "--queue", "1"]);
    suite("queue", &server, &serde_json::json!({}));
    let _ = std::fs::remove_dir_all(&model);
}

#[test]
fn parallel_slots_on_the_gpu_match_single_sequence_runs() {
    let model = tiny_model("gpu");
    let prompts = [
        "Hello",
        "The quick brown fox",
        "In a quiet village by the sea there lived an old fisherman",
    ];
    let want = expected(&model, false, &prompts);
    let server = Server::start(&model, &["--parallel", "3"]);
    suite("gpu", &server, &want);
    let _ = std::fs::remove_dir_all(&model);
}
