//! The command line as a new user meets it (issue 13): the built binary is run and its exit
//! status, messages and files are checked. Tiny models and the CPU reference keep these fast;
//! the two interrupt tests use the real 0.5B model, where work lasts long enough to interrupt.

use q4wgpu::test_models::{write_tiny_hf_model, CHATML_TEMPLATE};
use q4wgpu::Arch;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_q4wgpu"));
    // The same noise-free environment a headless user has.
    c.env_remove("XDG_RUNTIME_DIR");
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run the q4wgpu binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn work_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("q4wgpu-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A tiny Hugging Face model folder (random weights, the tiny byte-level tokenizer).
fn tiny_model(name: &str) -> PathBuf {
    let dir = work_dir(name).join("model");
    write_tiny_hf_model(&dir, Arch::Qwen2, 5).expect("tiny model");
    dir
}

/// No panic, no Rust Debug dump of a struct in what the user sees.
fn assert_clean(what: &str, s: &str) {
    for bad in ["panicked", "RUST_BACKTRACE", "Features {", "Caps {", "Report {", "Params {"] {
        assert!(!s.contains(bad), "{what}: {bad:?} in:\n{s}");
    }
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "failed:\n{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", text(&out.stdout)))
}

// ---- item 3: sampling ranges, item 9: negative numbers ------------------------------------

#[test]
fn sampling_values_are_range_checked_when_arguments_are_parsed() {
    let cases: [(&[&str], &str); 8] = [
        (&["--temperature", "nan"], "--temperature"),
        (&["--temperature", "inf"], "--temperature"),
        // A negative number without `=` is a value, refused for its range.
        (&["--temperature", "-0.5"], "--temperature"),
        (&["--top-p", "2"], "--top-p"),
        (&["--top-p", "nan"], "--top-p"),
        (&["--min-p", "1.5"], "--min-p"),
        (&["--repeat-penalty", "0"], "--repeat-penalty"),
        (&["--repeat-penalty", "-1"], "--repeat-penalty"),
    ];
    for (flags, option) in cases {
        // A model that does not exist: the value must be refused before anything is loaded.
        let mut args = vec!["run", "--cpu", "-m", "/nonexistent/model", "-p", "hi"];
        args.extend(flags);
        let out = run(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(option) && err.contains("range"), "{flags:?}: {err}");
        assert!(!err.contains("nonexistent") && !err.contains("unexpected argument"), "{flags:?}: {err}");
        assert_clean("sampling error", &err);
    }
}

// ---- item 4: config values that divide -----------------------------------------------------

#[test]
fn zero_kv_heads_in_config_json_is_an_error_not_a_panic() {
    let model = tiny_model("kv0");
    let path = model.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("config")).expect("json");
    for (key, value) in [
        ("num_key_value_heads", serde_json::json!(0)),
        ("num_attention_heads", serde_json::json!(0)),
        ("head_dim", serde_json::json!(0)),
        ("rms_norm_eps", serde_json::json!(-1.0)),
        ("max_position_embeddings", serde_json::json!(0)),
    ] {
        let mut c = config.clone();
        c[key] = value;
        std::fs::write(&path, c.to_string()).expect("write config");
        for cmd in [&["info", "-m"][..], &["quantize"][..]] {
            let dst = model.parent().expect("parent").join("out");
            let mut args: Vec<&str> = cmd.to_vec();
            let model_arg = model.to_str().expect("utf-8");
            let dst_arg = dst.to_str().expect("utf-8");
            args.push(model_arg);
            if cmd[0] == "quantize" {
                args.push(dst_arg);
            }
            let out = run(&args);
            let err = text(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{key} via {cmd:?}: {err}");
            assert!(err.contains(key), "{key}: {err}");
            assert_clean(key, &err);
        }
    }
    config["num_key_value_heads"] = serde_json::json!(1);
    std::fs::write(&path, config.to_string()).expect("restore");
}

// ---- item 5: a tokenizer-only name ---------------------------------------------------------

#[test]
fn the_tokenizer_only_file_is_not_offered_as_a_model() {
    let out = run(&["run", "--cpu", "-m", "deepseek-r1-distill-qwen-tokenizer", "-p", "hi"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("tokenizer") && err.contains("qwen2.5-coder-0.5b-instruct"), "{err}");
    assert!(!err.contains("truncated"), "{err}");
    // And it is not listed among the models that run.
    let out = run(&["run", "--cpu", "-m", "no-such-model", "-p", "hi"]);
    let err = text(&out.stderr);
    assert!(err.contains("smollm2-135m-instruct") && !err.contains("deepseek"), "{err}");
}

// ---- item 6: noise ------------------------------------------------------------------------

#[test]
fn info_prints_no_window_system_errors_and_no_debug_dumps() {
    let model = tiny_model("info");
    let out = run(&["info", "-m", model.to_str().expect("utf-8")]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("XDG_RUNTIME_DIR"), "{stderr}");
    assert!(stdout.contains("adapter:") && stdout.contains("capabilities:"), "{stdout}");
    assert!(!stdout.contains("expected ≈"), "{stdout}");
    assert_clean("info", &stdout);
}

// ---- item 9: info does not quantize; its size is what quantize writes -------------------------

#[test]
fn info_sizes_a_model_without_quantizing_it_and_matches_what_quantize_writes() {
    let model = tiny_model("info-size");
    let out = run(&["info", "-m", model.to_str().expect("utf-8")]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("once quantized"), "{stdout}");
    let dst = model.parent().expect("parent").join("q4");
    let q = run(&["quantize", model.to_str().expect("utf-8"), dst.to_str().expect("utf-8")]);
    let qerr = text(&q.stderr);
    assert!(q.status.success(), "{qerr}");
    assert!(qerr.contains("wrote") && qerr.contains("INT4"), "{qerr}");
    assert_clean("quantize", &qerr);
    let bytes = std::fs::metadata(dst.join("model.q4.safetensors")).expect("q4 file").len();
    // The tiny model's file is under 1 MB: `info` prints it in KB.
    let want = format!("INT4 weights {:.0} KB", bytes as f64 / 1e3);
    assert!(stdout.contains(&want), "{want:?} not in:\n{stdout}");
    // The quantized folder gives the same figure.
    let out = run(&["info", "-m", dst.to_str().expect("utf-8")]);
    assert!(text(&out.stdout).contains(&want), "{}", text(&out.stdout));
}

// ---- item 7: bench that measures nothing ------------------------------------------------------

#[test]
fn bench_with_a_budget_too_small_for_anything_fails_with_the_reason() {
    let out = run(&[
        "bench", "--synthetic", "tiny", "-p", "8", "-n", "4", "-r", "1", "--vram-budget", "1KB",
        "--bandwidth-buffer", "1MiB",
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("nothing was measured") && err.contains("minimum"), "{err}");
}

// ---- item 8: context size -------------------------------------------------------------------

#[test]
fn context_sizes_beyond_the_model_are_refused_with_advice_that_can_work() {
    let model = tiny_model("ctx");
    let m = model.to_str().expect("utf-8");
    let out = run(&["run", "--cpu", "-m", m, "-p", "hi", "--ctx-size", "10000000"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("10000000") && err.contains("8192"), "{err}");
    // A prompt longer than the model's whole context: raising --ctx-size cannot help.
    let long = model.parent().expect("parent").join("long.txt");
    std::fs::write(&long, "a b ".repeat(6000)).expect("prompt file");
    let out = run(&["run", "--cpu", "-m", m, "-f", long.to_str().expect("utf-8")]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("at most 8192") && !err.contains("raise --ctx-size"), "{err}");
    // One that fits the model but not the asked context: raising it is the advice.
    let out = run(&["run", "--cpu", "-m", m, "-p", &"a b ".repeat(20), "--ctx-size", "16"]);
    let err = text(&out.stderr);
    assert!(err.contains("raise --ctx-size"), "{err}");
}

// ---- item 9: prompt sources, -m, --quiet, seeds, logprobs text, chat template -------------------

#[test]
fn prompt_from_stdin_file_and_flag_give_the_same_greedy_run_and_quiet_is_quiet() {
    let model = tiny_model("prompt");
    let m = model.to_str().expect("utf-8");
    let prompt = "hello there";
    let by_flag = run(&["run", "--cpu", "-m", m, "-p", prompt, "-n", "6", "-q"]);
    assert!(by_flag.status.success(), "{}", text(&by_flag.stderr));
    assert_eq!(text(&by_flag.stderr), "", "--quiet printed status lines");
    assert!(!by_flag.stdout.is_empty());
    let file = model.parent().expect("parent").join("prompt.txt");
    std::fs::write(&file, prompt).expect("prompt file");
    let by_file = run(&["run", "--cpu", "-m", m, "-f", file.to_str().expect("utf-8"), "-n", "6", "-q"]);
    assert_eq!(by_file.stdout, by_flag.stdout);
    let mut child = bin()
        .args(["run", "--cpu", "-m", m, "--prompt", "-", "-n", "6", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child.stdin.take().expect("stdin").write_all(prompt.as_bytes()).expect("write stdin");
    let by_stdin = child.wait_with_output().expect("wait");
    assert!(by_stdin.status.success(), "{}", text(&by_stdin.stderr));
    assert_eq!(by_stdin.stdout, by_flag.stdout);
    // Neither source: a usage error.
    let out = run(&["run", "--cpu", "-m", m]);
    assert_eq!(out.status.code(), Some(2));
}

/// The seed printed by a run without --seed, given back, repeats it; two runs without a seed
/// get different seeds; --seed -1 means a random one.
#[test]
fn sampled_runs_get_a_random_printed_seed_that_repeats_the_run() {
    let model = tiny_model("seed");
    let m = model.to_str().expect("utf-8");
    let sampled = |extra: &[&str]| {
        let mut args = vec!["run", "--cpu", "-m", m, "-p", "hi", "-n", "24", "--temperature", "1.5", "--top-k", "0", "--min-p", "0", "--json"];
        args.extend(extra);
        json(&run(&args))
    };
    let a = sampled(&[]);
    let b = sampled(&["--seed", "-1"]);
    assert_ne!(a["seed"], b["seed"], "two runs drew the same random seed");
    let seed = a["seed"].as_u64().expect("seed in the JSON").to_string();
    let again = sampled(&["--seed", &seed]);
    assert_eq!(again["generated_token_ids"], a["generated_token_ids"]);
    // The seed is also printed for people.
    let out = run(&["run", "--cpu", "-m", m, "-p", "hi", "-n", "2", "--temperature", "0.8", "--seed", "77"]);
    assert!(text(&out.stderr).contains("seed: 77"), "{}", text(&out.stderr));
}

#[test]
fn logprobs_carry_the_token_text() {
    let model = tiny_model("logprobs");
    let m = model.to_str().expect("utf-8");
    let v = json(&run(&["run", "--cpu", "-m", m, "-p", "hello", "-n", "3", "--json", "--logprobs", "2"]));
    let lps = v["logprobs"].as_array().expect("logprobs");
    assert_eq!(lps.len(), v["generated_token_ids"].as_array().expect("ids").len());
    let tok = q4wgpu::tokenizer::Tokenizer::from_folder(&model).expect("tokenizer");
    for lp in lps {
        let id = lp["token"].as_u64().expect("token") as u32;
        assert_eq!(lp["text"], tok.decode(&[id], false).expect("decode"), "{lp}");
        let top = lp["top"].as_array().expect("top");
        assert_eq!(top.len(), 2, "{lp}");
        for alt in top {
            let id = alt["token"].as_u64().expect("token") as u32;
            assert_eq!(alt["text"], tok.decode(&[id], false).expect("decode"), "{alt}");
            assert!(alt["logprob"].as_f64().expect("logprob") <= 0.0);
        }
    }
}

#[test]
fn a_broken_chat_template_only_blocks_chat() {
    let model = tiny_model("template");
    let m = model.to_str().expect("utf-8");
    let path = model.join("tokenizer_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    assert_eq!(cfg["chat_template"], CHATML_TEMPLATE);
    cfg["chat_template"] = "{% for m in messages %}{{ m.content }".into();
    std::fs::write(&path, cfg.to_string()).expect("write");
    let plain = run(&["run", "--cpu", "-m", m, "-p", "hi", "-n", "2"]);
    assert!(plain.status.success(), "{}", text(&plain.stderr));
    let chat = run(&["run", "--cpu", "-m", m, "-p", "hi", "-n", "2", "--chat"]);
    let err = text(&chat.stderr);
    assert_eq!(chat.status.code(), Some(1), "{err}");
    assert!(err.contains("chat template") && err.contains("without --chat"), "{err}");
}

#[test]
fn list_shows_the_known_models_and_other_cached_folders() {
    let cache = work_dir("list-cache");
    let model = tiny_model("list-model");
    let dst = cache.join("quantized").join("my-model");
    let q = run(&["quantize", model.to_str().expect("utf-8"), dst.to_str().expect("utf-8")]);
    assert!(q.status.success(), "{}", text(&q.stderr));
    let out = bin().arg("list").env("Q4WGPU_CACHE", &cache).output().expect("list");
    let stdout = text(&out.stdout);
    assert!(out.status.success());
    for name in ["qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"] {
        assert!(stdout.contains(&format!("{name} ")) && stdout.contains("not fetched"), "{stdout}");
    }
    assert!(stdout.contains("not runnable"), "{stdout}");
    assert!(stdout.contains(&dst.display().to_string()), "{stdout}");
}

// ---- items 1 and 7: interrupts -------------------------------------------------------------

fn interrupt(child: &Child) {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(status.success());
}

fn wait_for(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < limit, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Exit status within `limit`, or the test fails (the child is killed).
fn exit_within(child: &mut Child, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("still running {limit:?} after the interrupt");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Ctrl-C while the real model is being quantized: exit 130 at once, nothing left behind.
#[test]
fn ctrl_c_during_quantize_cleans_up_and_the_folder_is_reusable() {
    let gguf = q4wgpu::fetch::ensure(&q4wgpu::fetch::QWEN25_CODER_05B).expect("fetch the 0.5B model");
    let dir = work_dir("quantize-interrupt");
    let dst = dir.join("q4");
    let tmp = dst.join("model.q4.safetensors.tmp");
    let mut child = bin()
        .arg("quantize")
        .arg(&gguf)
        .arg(&dst)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn quantize");
    wait_for("the temporary file", Duration::from_secs(120), || tmp.exists());
    interrupt(&child);
    assert_eq!(exit_within(&mut child, Duration::from_secs(5)), Some(130));
    assert!(!tmp.exists(), "the temporary file was left behind");
    assert!(!dst.exists(), "the folder quantize created was left behind");

    // A folder holding only our leftovers is reused; one with other files is refused.
    let tiny = tiny_model("quantize-leftovers");
    std::fs::create_dir_all(&dst).expect("dst");
    std::fs::write(&tmp, vec![0u8; 4096]).expect("leftover");
    std::fs::write(dst.join("config.json.tmp"), b"{").expect("leftover");
    let out = run(&["quantize", tiny.to_str().expect("utf-8"), dst.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!tmp.exists() && !dst.join("config.json.tmp").exists());
    let other = dir.join("other");
    std::fs::create_dir_all(&other).expect("other");
    std::fs::write(other.join("notes.txt"), b"mine").expect("user file");
    let out = run(&["quantize", tiny.to_str().expect("utf-8"), other.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read(other.join("notes.txt")).expect("kept"), b"mine");
}

/// On the real model (CPU reference): a Ctrl-C while tokens stream stops after the current token
/// with the statistics and exit 130; a Ctrl-C before any output quits at once with 130.
#[test]
fn ctrl_c_during_a_run_exits_130_and_before_output_quits_at_once() {
    q4wgpu::model::resolve(None).expect("fetch and quantize the default model");
    let args = ["run", "--cpu", "-p", "Write a long story about a lighthouse.", "-n", "2000"];
    let mut child = bin()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).expect("the first output byte");
    interrupt(&child);
    assert_eq!(exit_within(&mut child, Duration::from_secs(30)), Some(130));
    let mut err = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut err).expect("stderr");
    assert!(err.contains("stopped: interrupted"), "{err}");

    // Before any output (the model is still loading or reading the prompt): at once.
    let mut child = bin().args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
    std::thread::sleep(Duration::from_millis(500));
    interrupt(&child);
    assert_eq!(exit_within(&mut child, Duration::from_secs(3)), Some(130));
}

/// The Debug-free quantize summary and the `list` line of a fetched model are covered above;
/// here the exit status of a plain successful run is 0 (not 130) for contrast.
#[test]
fn a_finished_run_exits_0() {
    let model = tiny_model("exit0");
    let out = run(&["run", "--cpu", "-m", model.to_str().expect("utf-8"), "-p", "hi", "-n", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(Path::new(&model).join("config.json").exists());
}

// ---- item 2: kernels warmed up at load, the pipeline cache kept, the CPU driver named ---------

#[test]
fn a_gpu_run_warms_up_at_load_saves_the_pipeline_cache_and_names_a_cpu_driver() {
    let model = tiny_model("pipelines");
    let cache = work_dir("pipeline-cache");
    let gpu_run = || {
        bin()
            .args(["run", "-m", model.to_str().expect("utf-8"), "-p", "hello there", "-n", "3", "--json"])
            .env("Q4WGPU_CACHE", &cache)
            .output()
            .expect("run")
    };
    let out = gpu_run();
    let v = json(&out);
    let stderr = text(&out.stderr);
    assert!(v["kernel_warm_up_seconds"].as_f64().expect("warm-up time") >= 0.0, "{v}");
    assert!(!stderr.contains("XDG_RUNTIME_DIR"), "{stderr}");
    let adapter = v["adapter"].as_str().expect("adapter").to_lowercase();
    if adapter.contains("llvmpipe") {
        assert!(stderr.contains("CPU driver") && stderr.contains("--cpu"), "{stderr}");
        // lavapipe offers Vulkan's pipeline cache: it is written for the next run.
        let saved: Vec<u64> = std::fs::read_dir(cache.join("pipelines"))
            .expect("a pipelines folder")
            .flatten()
            .map(|e| e.metadata().map_or(0, |m| m.len()))
            .collect();
        assert!(saved.len() == 1 && saved[0] > 0, "{saved:?}");
    }
    // The next run starts from the saved cache and gives the same greedy tokens.
    let again = json(&gpu_run());
    assert_eq!(again["generated_token_ids"], v["generated_token_ids"]);
}
