//! `q4wgpu chat` through a pseudo-terminal (Python's pty module drives it: tests/serve/chat_pty.py):
//! two turns with the second reusing the first from the KV cache, /reset, /system, Ctrl-C in the
//! middle of an answer (the session continues), /exit.

use q4wgpu::{test_models, Arch};
use std::process::Command;

#[test]
fn chat_repl_through_a_pseudo_terminal() {
    let dir = std::env::temp_dir().join(format!("q4wgpu-chat-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    test_models::write_tiny_hf_model(&dir, Arch::Qwen2, 11).expect("write tiny model");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/serve/chat_pty.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_q4wgpu"))
        .arg("--model")
        .arg(&dir)
        .args(["--max-tokens", "4000", "--ctx-size", "8192"])
        .output()
        .expect("python3 must be installed to run the chat test (./scripts/setup.sh)");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("all passed"),
        "the chat session failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
