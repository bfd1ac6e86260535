//! `q4wgpu chat` through a pseudo-terminal (Python's pty module drives it: tests/serve/chat_pty.py):
//! two turns with the second reusing the first from the KV cache, /reset, /system, Ctrl-C in the
//! middle of an answer (the session continues), /exit.

mod serve_support;

use std::process::Command;

#[test]
fn chat_repl_through_a_pseudo_terminal() {
    let dir = std::env::temp_dir().join(format!("q4wgpu-chat-{}", std::process::id()));
    serve_support::tiny_text_model(&dir, 11);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/serve/chat_pty.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(serve_support::bin())
        .arg("--model")
        .arg(&dir)
        // On lavapipe an answer of 64 tokens takes about a second: long enough to be stopped.
        .args(["--max-tokens", "64"])
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
