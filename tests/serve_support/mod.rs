//! Helpers for the tests that run the `q4wgpu` binary: a server process, `run --json`, and a
//! Python with the `openai` and `httpx` packages (installed with pip once if missing).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The binary under test: cargo's, or `Q4WGPU_BIN` (a copy, where a shared target directory
/// may be rebuilt by another checkout meanwhile).
pub fn bin() -> String {
    std::env::var("Q4WGPU_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_q4wgpu").to_string())
}

/// A tiny random Qwen2 model in `dir` whose vocabulary is exactly the tiny tokenizer's (the
/// stock tiny config has ids beyond it, which generation could pick and no one could decode).
pub fn tiny_text_model(dir: &Path, seed: u64) {
    let _ = std::fs::remove_dir_all(dir);
    let mut config = q4wgpu::test_models::tiny_config(q4wgpu::Arch::Qwen2);
    config.vocab_size =
        q4wgpu::test_models::special_token_id("<|im_end|>").expect("im_end") as usize + 1;
    q4wgpu::test_models::write_hf_model(dir, &config, seed).expect("write tiny model");
}

/// `python3` with `openai` and `httpx` importable: installs them with pip when missing (CI has
/// CPython and pip; the packages come from PyPI). Fails the test, never skips it.
pub fn python_with_openai() -> &'static str {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        let check = || {
            Command::new("python3")
                .args(["-c", "import openai, httpx"])
                .status()
                .is_ok_and(|s| s.success())
        };
        if !check() {
            let out = Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "openai>=1.40", "httpx"])
                .output()
                .expect("python3 must be installed to run the server tests (./scripts/setup.sh)");
            assert!(
                out.status.success() && check(),
                "could not install the Python packages openai and httpx with pip (the server tests need them): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    });
    "python3"
}

/// The text `q4wgpu run --json` generates greedily for `prompt`, never stopping at EOS early:
/// a fixed number of tokens is compared, so the run must make them all.
pub fn run_json_text(model: &Path, cpu: bool, prompt: &str, n: usize) -> String {
    let mut cmd = Command::new(bin());
    cmd.args([
        "run",
        "--json",
        "--temperature",
        "0",
        "-n",
        &n.to_string(),
        "--prompt",
        prompt,
    ])
    .arg("--model")
    .arg(model);
    if cpu {
        cmd.arg("--cpu");
    }
    let out = cmd.output().expect("run q4wgpu");
    assert!(
        out.status.success(),
        "q4wgpu run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("q4wgpu run --json prints JSON");
    assert_eq!(
        v["generated_token_ids"].as_array().map(Vec::len),
        Some(n),
        "the oracle run stopped early ({}); pick another prompt",
        v["finish_reason"]
    );
    v["text"].as_str().expect("text").to_string()
}

/// A `q4wgpu serve` process on a free port; killed when dropped.
pub struct Server {
    child: Child,
    pub base: String,
    pub model_id: String,
    pub api_key: Option<String>,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts the server and waits until it is listening and has loaded the model.
    pub fn start(model: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(bin())
            .args(["serve", "--port", "0"])
            .arg("--model")
            .arg(model)
            .args(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start q4wgpu serve");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&format!("{line}\n"));
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut base = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        base = rest.split_whitespace().next().map(str::to_string);
                    }
                    if line.contains("q4wgpu serve: ready") {
                        break;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("the server did not become ready:\n{}", log.lock().unwrap());
                }
            }
        }
        let key_at = args.iter().position(|a| *a == "--api-key");
        Server {
            child,
            base: base.expect("the server printed its address"),
            model_id: model
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            api_key: key_at.map(|i| args[i + 1].to_string()),
            log,
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
