//! The command line: a thin layer over the library.

use clap::{Args, Parser, Subcommand};
use q4wgpu::chat::ChatSettings;
use q4wgpu::cpu::fast::Isa;
use q4wgpu::cpu::CpuModel;
use q4wgpu::engine::{CpuLayers, DecodeFusion, EngineOptions, GpuModel, StreamRead};
use q4wgpu::generate::{generate, GenerateOptions, Generation};
use q4wgpu::gpu::Gpu;
use q4wgpu::interrupt;
use q4wgpu::quant::DecodeActivations;
use q4wgpu::sampling::SamplingParams;
use q4wgpu::serve::{EngineSettings, ServeSettings};
use q4wgpu::tokenizer::{ChatMessage, Tokenizer};
use q4wgpu::{bench, model, scheduler, synthetic, Error, Result};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

#[path = "q4wgpu_cli/values.rs"]
mod cli_values;
use cli_values::{
    gb, parse_min_p, parse_repeat_penalty, parse_seed, parse_temperature, parse_top_p, Seed,
};

/// `--quiet`: status lines on stderr are left out (errors are not).
static QUIET: AtomicBool = AtomicBool::new(false);

/// A status line on stderr, unless `--quiet`.
macro_rules! note {
    ($($arg:tt)*) => {
        if !QUIET.load(Ordering::Relaxed) {
            eprintln!($($arg)*);
        }
    };
}

#[derive(Parser)]
#[command(
    name = "q4wgpu",
    version,
    about = "Run INT4 language models on any GPU through Vulkan"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt.
    Run(RunArgs),
    /// Quantize a Hugging Face folder or a GGUF file into a q4wgpu INT4 folder.
    Quantize {
        /// A Hugging Face model folder or a .gguf file.
        src: PathBuf,
        /// The folder to create (new, empty, or an earlier q4wgpu folder to replace).
        dst: PathBuf,
    },
    /// Measure prompt processing and generation speed (llama-bench style) against bounds measured
    /// in the same run.
    Bench(BenchArgs),
    /// Fetch known models into the cache (all of them when no name is given); verified by SHA-256.
    Fetch {
        /// Known model names (see `q4wgpu list`).
        names: Vec<String>,
    },
    /// List the known models and what the cache holds of them.
    List,
    /// Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions).
    Serve(ServeArgs),
    /// Talk with the model in the terminal (streamed answers; /reset, /system TEXT, /exit).
    Chat(ChatArgs),
    /// Quality of int8 decode activations against f32 on a text: top-1 agreement, KL divergence
    /// and perplexity, one token per step (teacher-forced).
    Eval {
        /// A model as `run` takes it.
        #[arg(long)]
        model: Option<String>,
        /// The text (UTF-8).
        #[arg(long)]
        file: PathBuf,
        /// Tokens of the text to use (from its start).
        #[arg(long, default_value_t = 2048)]
        max_tokens: usize,
        #[arg(long)]
        adapter: Option<String>,
        /// Also write the figures as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Show the GPU adapters, and a model's size and memory needs (without loading its weights).
    Info {
        /// A model as `run` takes it.
        #[arg(long, short = 'm')]
        model: Option<String>,
        /// Part of the adapter's name to pick it.
        #[arg(long)]
        adapter: Option<String>,
        /// KV cache positions to plan for.
        #[arg(long, short = 'c', default_value_t = 4096)]
        ctx_size: usize,
        /// GPU memory to plan for, e.g. 24GB or 8GiB (default: the adapter's, less a margin).
        #[arg(long)]
        vram_budget: Option<String>,
    },
}

#[derive(Args)]
#[command(
    group(clap::ArgGroup::new("input").required(true).args(["prompt", "file"])),
    // `--temperature -0.5`, `--seed -1`: negative numbers are values, not options.
    allow_negative_numbers = true
)]
struct RunArgs {
    /// A q4wgpu folder, a Hugging Face folder, a .gguf file, or a known model name
    /// (default: qwen2.5-coder-0.5b-instruct, fetched once into ~/.cache/q4wgpu).
    #[arg(long, short = 'm')]
    model: Option<String>,
    /// The prompt text; `-` reads it from standard input.
    #[arg(long, short = 'p')]
    prompt: Option<String>,
    /// Read the prompt from this file.
    #[arg(long, short = 'f')]
    file: Option<PathBuf>,
    /// Apply the model's chat template to the prompt.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 256)]
    max_tokens: usize,
    /// Randomness of sampling: 0 always picks the most likely token (greedy).
    #[arg(long, default_value_t = 0.0, value_parser = parse_temperature)]
    temperature: f32,
    /// Sample among the K most likely tokens only (0 = no limit; at most 256 are kept).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Sample among the most likely tokens whose probabilities add up to P (1 = off).
    #[arg(long, default_value_t = 0.95, value_parser = parse_top_p)]
    top_p: f32,
    /// Drop tokens less likely than P times the most likely one (0 = off).
    #[arg(long, default_value_t = 0.05, value_parser = parse_min_p)]
    min_p: f32,
    /// Penalise tokens seen in the last --repeat-last-n tokens (1 = off, 1.1 = mild).
    #[arg(long, default_value_t = 1.0, value_parser = parse_repeat_penalty)]
    repeat_penalty: f32,
    /// How many recent tokens --repeat-penalty looks at.
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    /// Seed of sampling; the same seed repeats a run. Default (or -1): a random seed, printed.
    #[arg(long, short = 's', value_parser = parse_seed)]
    seed: Option<Seed>,
    /// Stop when this text appears (may be given several times).
    #[arg(long)]
    stop: Vec<String>,
    /// Context size in tokens, prompt and reply together (default: 4096, or the model's maximum
    /// if smaller).
    #[arg(long, short = 'c')]
    ctx_size: Option<usize>,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Report each generated token's log-probability and this many alternatives (in --json).
    #[arg(long)]
    logprobs: Option<usize>,
    /// Run on the CPU instead of the GPU: int8 activations and the SIMD kernel (with
    /// --decode-activations f32: the f32 reference).
    #[arg(long)]
    cpu: bool,
    /// Run the plain CPU reference (the tests' oracle; slow), with --decode-activations for
    /// decode steps (prompts in f32).
    #[arg(long)]
    cpu_reference: bool,
    /// Instruction set of the CPU kernel: portable, avx2, avx512vnni, neon (default: the best
    /// this CPU has). Threads: RAYON_NUM_THREADS (default: every core).
    #[arg(long)]
    cpu_isa: Option<String>,
    /// Leave the adapter's cooperative matrices (tensor cores) unused: prompts run on the
    /// portable GEMM that adapters without them get.
    #[arg(long)]
    no_coop: bool,
    /// Part of the adapter's name to pick it (see `q4wgpu info`).
    #[arg(long)]
    adapter: Option<String>,
    /// GPU memory to use, e.g. 24GB or 8GiB; layers beyond it stream from host memory
    /// (default: the adapter's device-local memory less a margin).
    #[arg(long)]
    vram_budget: Option<String>,
    /// Ring slots for streamed layers (copies of the next layers queued ahead).
    #[arg(long, default_value_t = 2)]
    prefetch_depth: usize,
    /// How many of the layers that do not fit the budget decode on the CPU while the next
    /// streamed layers cross PCIe: auto (measured at load), or a number (0: stream them all).
    #[arg(long, default_value = "auto")]
    cpu_layers: String,
    /// How decode steps read streamed layers: ring (copied into device slots) or zero-copy
    /// (kernels read host memory directly).
    #[arg(long, default_value = EngineOptions::default().decode_reads.name())]
    decode_reads: String,
    /// How prompt chunks read streamed layers: ring or zero-copy.
    #[arg(long, default_value = EngineOptions::default().prompt_reads.name())]
    prompt_reads: String,
    /// Activations of decode steps: int8 (quantized once per input, integer dot products) or f32.
    #[arg(long, default_value = EngineOptions::default().decode_activations.name())]
    decode_activations: String,
    /// Only the generated text on stdout and errors on stderr: no status lines.
    #[arg(long, short = 'q')]
    quiet: bool,
}

/// How `serve` and `chat` load and run the model.
#[derive(Args)]
struct EngineArgs {
    /// A model as `run` takes it.
    #[arg(long)]
    model: Option<String>,
    /// Tokens each sequence holds (capped by the model's max_position_embeddings).
    #[arg(long, default_value_t = 4096)]
    ctx_size: usize,
    /// Run the CPU reference instead of the GPU (slow; for checking).
    #[arg(long)]
    cpu: bool,
    /// Part of the adapter's name to pick it (see `q4wgpu info`).
    #[arg(long)]
    adapter: Option<String>,
    /// GPU memory to use, as for `run`.
    #[arg(long)]
    vram_budget: Option<String>,
    /// Ring slots for streamed layers.
    #[arg(long, default_value_t = 2)]
    prefetch_depth: usize,
    /// Layers beyond the budget that decode on the CPU: auto or a number, as for `run`.
    #[arg(long, default_value = "auto")]
    cpu_layers: String,
    /// How decode steps read streamed layers: ring or zero-copy.
    #[arg(long, default_value = EngineOptions::default().decode_reads.name())]
    decode_reads: String,
    /// How prompt chunks read streamed layers: ring or zero-copy.
    #[arg(long, default_value = EngineOptions::default().prompt_reads.name())]
    prompt_reads: String,
}

impl EngineArgs {
    fn settings(&self, parallel: usize) -> Result<EngineSettings> {
        Ok(EngineSettings {
            model: model::resolve(self.model.as_deref())?,
            cpu: self.cpu,
            parallel,
            ctx_size: self.ctx_size,
            adapter: self.adapter.clone(),
            vram_budget: self
                .vram_budget
                .as_deref()
                .map(scheduler::parse_size)
                .transpose()?,
            prefetch_depth: self.prefetch_depth,
            cpu_layers: CpuLayers::parse(&self.cpu_layers)?,
            decode_reads: StreamRead::parse(&self.decode_reads)?,
            prompt_reads: StreamRead::parse(&self.prompt_reads)?,
            verbose: true,
        })
    }
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    engine: EngineArgs,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port (the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Sequences decoded together, each with its own KV cache.
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// Requests that may wait for a free sequence; more are answered 429.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Require `Authorization: Bearer KEY` (default: the Q4WGPU_API_KEY environment variable, if set).
    #[arg(long, env = "Q4WGPU_API_KEY")]
    api_key: Option<String>,
    /// The model name /v1/models lists and requests give (default: the model folder's name).
    #[arg(long)]
    alias: Option<String>,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// System message.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per answer.
    #[arg(long, short = 'n', default_value_t = 1024)]
    max_tokens: usize,
    /// 0 picks the most likely token (greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct BenchArgs {
    /// A model as `run` takes it.
    #[arg(long, short = 'm', conflicts_with = "synthetic")]
    model: Option<String>,
    /// A random-weight model of a known shape: tiny, qwen2-0.5b, qwen2-7b, qwen2-32b, llama-70b.
    #[arg(long)]
    synthetic: Option<String>,
    /// Prompt tokens of the prompt-processing test (0 skips it).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    prompt_tokens: usize,
    /// Decode steps of the generation test (0 skips it).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    gen_tokens: usize,
    /// Timed repetitions of each test (after one warm-up run).
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    repetitions: usize,
    /// KV cache positions (default: what the tests need).
    #[arg(long)]
    ctx_size: Option<usize>,
    /// Most prompt tokens per forward pass.
    #[arg(long, default_value_t = EngineOptions::default().chunk)]
    chunk: usize,
    /// Comma-separated VRAM budgets, one set of rows each; "all" keeps every layer resident.
    #[arg(long, default_value = "all")]
    vram_budget: String,
    /// Ring slots for streamed layers.
    #[arg(long, default_value_t = EngineOptions::default().prefetch_depth)]
    prefetch_depth: usize,
    /// Comma-separated ways of reading streamed layers (ring, zero-copy), one row set each at
    /// budgets that stream.
    #[arg(long, default_value = "ring")]
    stream_read: String,
    /// Comma-separated settings of the CPU layers of decode steps (auto, or a number; 0 streams
    /// every layer that does not fit), one row set each at budgets that stream.
    #[arg(long, default_value = "auto")]
    cpu_layers: String,
    /// Leave the adapter's cooperative matrices (tensor cores) unused: prompts run on the
    /// portable GEMM that adapters without them get.
    #[arg(long)]
    no_coop: bool,
    /// Part of the adapter's name to pick it (see `q4wgpu info`).
    #[arg(long)]
    adapter: Option<String>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Buffer size of the bandwidth measurements.
    #[arg(long, default_value = "256MiB")]
    bandwidth_buffer: String,
    /// Seed of the synthetic weights and the random prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also time every dispatch of a decode step at each budget (needs timestamp queries).
    #[arg(long)]
    profile: bool,
    /// Decode steps computed inside the projection after them: none, or a list of input-norm,
    /// post-norm, swiglu, attention-output and
    /// attention-combine (default: none); several
    /// sets separated by '/' give one set of generation rows each.
    #[arg(long)]
    decode_fusion: Option<String>,
    /// Comma-separated depths: positions already in the KV cache before each test (as
    /// llama-bench's -d; the cached values are whatever the buffers hold: speed does not depend
    /// on them).
    #[arg(short = 'd', long = "n-depth", default_value = "0")]
    depth: String,
    /// Comma-separated numbers of sequences decoded together (as `serve --parallel`): for each
    /// above 1 a generation row of that many sequences through the batched step (at most 8),
    /// tokens/s summed over them.
    #[arg(long, default_value = "1")]
    parallel: String,
    /// Comma-separated decode activations (int8, f32), one set of generation rows each.
    #[arg(long, default_value = EngineOptions::default().decode_activations.name())]
    decode_activations: String,
    /// Time the fast CPU backend instead of the GPU (threads: RAYON_NUM_THREADS, default every
    /// core), after the kernel alone on one thread and on all.
    #[arg(long)]
    cpu: bool,
    /// With --cpu: comma-separated instruction sets (portable, avx2, avx512vnni, neon, or "all"
    /// available; default the best).
    #[arg(long)]
    cpu_isa: Option<String>,
}

fn main() {
    // Before any thread: it sets an environment variable (see the function).
    q4wgpu::gpu::quiet_device_select_layer();
    let cli = Cli::parse();
    // `chat` installs it after its line editor, which takes SIGINT when created.
    if !matches!(cli.command, Command::Chat(_)) {
        interrupt::install();
    }
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Quantize { src, dst } => quantize(src, dst),
        Command::Bench(args) => bench(args),
        Command::Fetch { names } => fetch(names),
        Command::Eval {
            model,
            file,
            max_tokens,
            adapter,
            json,
        } => eval(model, file, max_tokens, adapter, json),
        Command::List => list(),
        Command::Serve(args) => serve(args),
        Command::Chat(args) => chat(args),
        Command::Info {
            model,
            adapter,
            ctx_size,
            vram_budget,
        } => info(model, adapter, ctx_size, vram_budget),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

/// The model `bench` asked for (synthetic or loaded) and its name.
fn bench_weights(args: &BenchArgs) -> Result<(q4wgpu::weights::ModelWeights, String)> {
    let load_start = Instant::now();
    let (weights, name) = match (&args.synthetic, &args.model) {
        (Some(shape), _) => (
            synthetic::synthetic_weights(&synthetic::synthetic_config(shape)?, args.seed),
            format!("{shape} (synthetic)"),
        ),
        (None, model_arg) => {
            let path = model::resolve(model_arg.as_deref())?;
            let name = path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            (model::load(&path, true)?.weights, name)
        }
    };
    let mut weights = weights;
    if args.synthetic.is_some() {
        // Layers of their own where host memory allows (see give_layers_own_memory): CPU layers
        // and --cpu then read distinct memory per layer, as with a real model.
        let room = scheduler::host_memory_available().unwrap_or(0);
        if room / 5 * 2 > weights.byte_len() as u64 {
            synthetic::give_layers_own_memory(&mut weights);
        } else {
            eprintln!(
                "note: the synthetic layers share one layer's memory (not enough host RAM for their own): CPU figures may gain from the CPU's cache"
            );
        }
    }
    eprintln!(
        "{name}: {:.2} GB of weights ready in {:.1} s",
        weights.byte_len() as f64 / 1e9,
        load_start.elapsed().as_secs_f64()
    );
    Ok((weights, name))
}

/// `bench --cpu`: the kernel alone on one thread and on all, then prompt and decode speed.
fn bench_cpu(args: BenchArgs) -> Result<i32> {
    use q4wgpu::cpu::bench as cb;
    if args.repetitions == 0 {
        return Err(Error::Invalid("-r must be positive".into()));
    }
    let isas = match args.cpu_isa.as_deref() {
        None => vec![Isa::best()],
        Some("all") => Isa::available(),
        Some(list) => list
            .split(',')
            .map(|t| Isa::parse(t.trim()))
            .collect::<Result<_>>()?,
    };
    let (weights, name) = bench_weights(&args)?;
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| Error::Invalid(format!("starting a one-thread pool: {e}")))?;
    let mut rows = Vec::new();
    let mut print = |r: &cb::CpuBenchRow| {
        println!("{}", cb::cpu_table_line(r));
        let _ = std::io::stdout().flush();
    };
    println!("{}", cb::CPU_TABLE_HEADER);
    for &isa in &isas {
        // 280 MB of weights, more than any last-level cache, so memory bandwidth counts; and the
        // same bytes in rows as short as a small model's (K = 896: 7 blocks per row).
        for (m, k) in [(65536, 8192), (589824, 896)] {
            for r in [
                one.install(|| cb::bench_kernel(isa, m, k, 1, args.repetitions)),
                cb::bench_kernel(isa, m, k, 1, args.repetitions),
            ] {
                print(&r);
                rows.push(r);
            }
        }
        rows.extend(cb::bench_model(
            &weights,
            &name,
            isa,
            args.prompt_tokens,
            args.gen_tokens,
            args.repetitions,
            &mut print,
        )?);
    }
    if let Some(out) = &args.json {
        let v = serde_json::json!({
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "model": name,
            "rows": rows,
        });
        std::fs::write(out, serde_json::to_string_pretty(&v).unwrap_or_default())
            .map_err(|e| Error::Invalid(format!("writing {}: {e}", out.display())))?;
    }
    Ok(EXIT_OK)
}

/// Exit status of a command that ran to its end.
const EXIT_OK: i32 = 0;

fn eval(
    model_arg: Option<String>,
    file: PathBuf,
    max_tokens: usize,
    adapter: Option<String>,
    json: Option<PathBuf>,
) -> Result<i32> {
    let text = std::fs::read_to_string(&file)
        .map_err(|e| Error::Invalid(format!("reading {}: {e}", file.display())))?;
    let path = model::resolve(model_arg.as_deref())?;
    let loaded = model::load(&path, true)?;
    let mut tokens = loaded.tokenizer.encode(&text, loaded.tokenizer.add_bos())?;
    tokens.truncate(max_tokens);
    let gpu = Gpu::new(adapter.as_deref())?;
    eprintln!(
        "adapter: {}\n{} tokens of {}",
        gpu.describe(),
        tokens.len(),
        file.display()
    );
    let opts = EngineOptions::default();
    let q = q4wgpu::eval::compare_decode_activations(&gpu, &loaded.weights, &tokens, &opts)?;
    println!(
        "int8 against f32 decode activations over {} steps: top-1 agreement {:.2} %, mean KL {:.5} nats (max {:.4}), perplexity {:.3} (f32) / {:.3} (int8)",
        q.steps,
        100.0 * q.top1_agreement,
        q.mean_kl,
        q.max_kl,
        q.perplexity_f32,
        q.perplexity_int8
    );
    if let Some(out) = json {
        let v = serde_json::json!({
            "model": path.display().to_string(),
            "text": file.display().to_string(),
            "adapter": gpu.info.name,
            "quality": q,
        });
        std::fs::write(&out, serde_json::to_string_pretty(&v).unwrap_or_default())
            .map_err(|e| Error::Invalid(format!("writing {}: {e}", out.display())))?;
    }
    Ok(EXIT_OK)
}

fn serve(args: ServeArgs) -> Result<i32> {
    let engine = args.engine.settings(args.parallel)?;
    let model_id = match args.alias {
        Some(a) => a,
        None => engine.model.file_name().map_or_else(
            || engine.model.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
    };
    if args.queue == 0 {
        return Err(Error::Invalid("--queue must be at least 1".into()));
    }
    q4wgpu::serve::serve(
        engine,
        ServeSettings {
            host: args.host,
            port: args.port,
            api_key: args.api_key.filter(|k| !k.is_empty()),
            queue: args.queue,
            model_id,
        },
    )?;
    Ok(EXIT_OK)
}

fn chat(args: ChatArgs) -> Result<i32> {
    let engine = args.engine.settings(1)?;
    q4wgpu::chat::chat(
        engine,
        ChatSettings {
            system: args.system,
            max_tokens: args.max_tokens,
            sampling: SamplingParams {
                temperature: args.temperature,
                top_k: args.top_k,
                top_p: args.top_p,
                repeat_penalty: args.repeat_penalty,
                repeat_last_n: 64,
                seed: args.seed,
                ..SamplingParams::default()
            },
        },
    )?;
    Ok(EXIT_OK)
}

fn fetch(names: Vec<String>) -> Result<i32> {
    let models: Vec<&q4wgpu::fetch::KnownModel> = if names.is_empty() {
        q4wgpu::fetch::KNOWN_MODELS.to_vec()
    } else {
        names
            .iter()
            .map(|n| {
                q4wgpu::fetch::find_known(n).ok_or_else(|| {
                    let known: Vec<&str> =
                        q4wgpu::fetch::KNOWN_MODELS.iter().map(|m| m.name).collect();
                    Error::Invalid(format!("unknown model {n:?}; known: {}", known.join(", ")))
                })
            })
            .collect::<Result<_>>()?
    };
    for m in models {
        let path = q4wgpu::fetch::ensure(m)?;
        println!("{}: {}", m.name, path.display());
    }
    Ok(EXIT_OK)
}

/// `q4wgpu list`: each known model, whether it is fetched and quantized, and any other quantized
/// folder in the cache.
fn list() -> Result<i32> {
    let cache = q4wgpu::fetch::cache_dir();
    println!("cache: {}", cache.display());
    for m in q4wgpu::fetch::KNOWN_MODELS {
        let file = q4wgpu::fetch::cache_dir().join("models").join(m.file_name);
        let fetched = file.is_file();
        let quantized = cache.join("quantized").join(m.name);
        let state = match (
            m.runnable,
            fetched,
            q4wgpu::formats::q4::is_q4_folder(&quantized),
        ) {
            (false, true, _) => "fetched (tokenizer only, not runnable)".to_string(),
            (false, false, _) => "not fetched (tokenizer only, not runnable)".to_string(),
            (true, _, true) => format!("ready: {}", quantized.display()),
            (true, true, false) => "fetched, quantized at first use".to_string(),
            (true, false, false) => format!("not fetched ({}; fetched at first use)", gb(m.size)),
        };
        println!("{:36} {state}", m.name);
    }
    let others = std::fs::read_dir(cache.join("quantized"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| q4wgpu::formats::q4::is_q4_folder(p))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            q4wgpu::fetch::find_known(name).is_none()
        });
    for p in others {
        println!("{:36} ready: {}", "(other)", p.display());
    }
    Ok(EXIT_OK)
}

fn quantize(src: PathBuf, dst: PathBuf) -> Result<i32> {
    let start = Instant::now();
    let r = model::quantize_path(&src, &dst, true)?;
    let tied = if r.tied_lm_head {
        ", lm_head from the tied embeddings"
    } else {
        ""
    };
    let ignored = if r.ignored.is_empty() {
        String::new()
    } else {
        format!("; {} unused source tensors left out", r.ignored.len())
    };
    eprintln!(
        "wrote {} in {:.1} s: {} tensors ({} INT4{tied}), {}{ignored}",
        dst.display(),
        start.elapsed().as_secs_f64(),
        r.tensors,
        r.quantized,
        gb(r.bytes_written)
    );
    Ok(EXIT_OK)
}

/// The prompt text: `--prompt TEXT`, `--prompt -` (standard input) or `--file PATH`.
fn prompt_text(args: &RunArgs) -> Result<String> {
    match (&args.prompt, &args.file) {
        (Some(p), None) if p == "-" => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| Error::io("reading the prompt from standard input", "<stdin>", e))?;
            Ok(text)
        }
        (Some(p), None) => Ok(p.clone()),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| Error::io("reading the prompt file (--file)", path, e)),
        _ => Err(Error::Invalid(
            "give the prompt with --prompt TEXT, --prompt - (standard input) or --file PATH".into(),
        )),
    }
}

fn build_prompt(tokenizer: &Tokenizer, args: &RunArgs, prompt: &str) -> Result<Vec<u32>> {
    if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: system.clone(),
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: prompt.to_string(),
        });
        let text = tokenizer.apply_chat_template(&messages, true)?;
        // The template writes BOS itself where the model wants one.
        tokenizer.encode(&text, false)
    } else {
        tokenizer.encode(prompt, tokenizer.add_bos())
    }
}

/// The CPU model `run` asked for, and its description.
fn cpu_model<'w>(
    weights: &'w q4wgpu::weights::ModelWeights,
    args: &RunArgs,
) -> Result<(CpuModel<'w>, String)> {
    let decode = DecodeActivations::parse(&args.decode_activations)?;
    if args.cpu_reference || decode == DecodeActivations::F32 {
        if args.cpu_isa.is_some() {
            return Err(Error::Invalid(
                "--cpu-isa picks the fast CPU kernel: drop it, or --cpu-reference and \
                 --decode-activations f32"
                    .into(),
            ));
        }
        let model = CpuModel::new(weights)?.with_decode_activations(decode);
        return Ok((
            model,
            format!("CPU reference ({} decode activations)", decode.name()),
        ));
    }
    let isa = match &args.cpu_isa {
        Some(name) => Isa::parse(name)?,
        None => Isa::best(),
    };
    let description = format!(
        "CPU (int8 activations, {}, {} threads)",
        isa.name(),
        rayon::current_num_threads()
    );
    Ok((CpuModel::fast(weights, isa)?, description))
}

/// The context size: `--ctx-size` if the model allows it, else 4096 or the model's maximum.
fn context_size(asked: Option<usize>, model_max: usize) -> Result<usize> {
    match asked {
        Some(0) => Err(Error::Invalid("--ctx-size must be at least 1".into())),
        Some(n) if n > model_max => Err(Error::Invalid(format!(
            "--ctx-size {n} is larger than this model's context ({model_max} tokens, its max_position_embeddings); use at most {model_max}"
        ))),
        Some(n) => Ok(n),
        None => Ok(4096.min(model_max)),
    }
}

/// Refuses a prompt that leaves no room to generate, saying what would help.
fn check_prompt_fits(prompt_tokens: usize, ctx: usize, model_max: usize) -> Result<()> {
    if prompt_tokens < ctx {
        return Ok(());
    }
    let advice = if prompt_tokens < model_max {
        format!("raise --ctx-size (this model allows up to {model_max}) or shorten the prompt")
    } else {
        format!("this model holds at most {model_max} tokens in all, so shorten the prompt")
    };
    Err(Error::Invalid(format!(
        "the prompt has {prompt_tokens} tokens but the context holds {ctx}; {advice}"
    )))
}

fn run(args: RunArgs) -> Result<i32> {
    QUIET.store(args.quiet, Ordering::Relaxed);
    if args.system.is_some() && !args.chat {
        return Err(Error::Invalid("--system needs --chat".into()));
    }
    if args.prefetch_depth == 0 {
        return Err(Error::Invalid("--prefetch-depth must be at least 1".into()));
    }
    let decode_reads = StreamRead::parse(&args.decode_reads)?;
    let prompt_reads = StreamRead::parse(&args.prompt_reads)?;
    let cpu_layers = CpuLayers::parse(&args.cpu_layers)?;
    let budget = args
        .vram_budget
        .as_deref()
        .map(scheduler::parse_size)
        .transpose()?;
    let prompt = prompt_text(&args)?;
    let seed = match args.seed {
        Some(Seed(Some(s))) => s,
        _ => cli_values::random_seed(),
    };
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repeat_penalty: args.repeat_penalty,
        repeat_last_n: args.repeat_last_n,
        seed,
    };
    sampling.validate()?;
    let load_start = Instant::now();
    let path = model::resolve(args.model.as_deref())?;
    let loaded = model::load(&path, !args.quiet)?;
    let model_max = loaded.weights.config.max_position_embeddings;
    let ctx = context_size(args.ctx_size, model_max)?;
    let prompt_ids = build_prompt(&loaded.tokenizer, &args, &prompt)?;
    check_prompt_fits(prompt_ids.len(), ctx, model_max)?;
    if args.temperature > 0.0 {
        note!("seed: {seed} (--seed {seed} repeats this run)");
    }
    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling,
        stop_strings: args.stop.clone(),
        logprobs: args.logprobs,
    };
    let json = args.json;
    let mut print = |piece: &str| {
        // Output has begun: from now on the first Ctrl-C stops after the current token.
        interrupt::set_graceful(true);
        if !json {
            print!("{piece}");
            let _ = std::io::stdout().flush();
        }
    };
    let generation: Generation;
    let mut extra = serde_json::Map::new();
    extra.insert("seed".into(), seed.into());
    if args.cpu || args.cpu_reference {
        let (cpu, backend) = cpu_model(&loaded.weights, &args)?;
        let mut decoder = q4wgpu::cpu::CpuDecoder::new(&cpu, ctx);
        note!(
            "loaded {} in {:.1} s; running on the {backend}",
            path.display(),
            load_start.elapsed().as_secs_f64()
        );
        extra.insert("backend".into(), backend.into());
        generation = generate(
            &mut decoder,
            &loaded.tokenizer,
            &prompt_ids,
            &opts,
            &mut print,
        )?;
    } else {
        let gpu = Gpu::new_with(args.adapter.as_deref(), !args.no_coop)?;
        let engine_opts = EngineOptions {
            ctx_size: ctx,
            vram_budget: budget,
            prefetch_depth: args.prefetch_depth,
            decode_reads,
            prompt_reads,
            decode_activations: DecodeActivations::parse(&args.decode_activations)?,
            cpu_layers,
            ..Default::default()
        };
        let mut engine = GpuModel::new(&gpu, &loaded.weights, engine_opts)?;
        note!("adapter: {}", gpu.describe());
        if gpu.is_cpu() {
            note!(
                "note: {} is a CPU driver (no GPU adapter was found or chosen): expect a few tokens/s; --cpu runs the CPU reference, which is faster on this machine",
                gpu.info.name
            );
        }
        note!(
            "plan: {} (budget from {})",
            engine.plan().describe(),
            engine.budget_source()
        );
        if let Some(hybrid) = engine.hybrid_note() {
            note!("{hybrid}");
        }
        let compile_s = warm_up(&gpu, &mut engine, args.quiet)?;
        let load_s = load_start.elapsed().as_secs_f64();
        note!(
            "loaded {} in {load_s:.1} s (kernels ready in {compile_s:.1} s of it); {} on the GPU",
            path.display(),
            gb(engine.device_bytes())
        );
        extra.insert("load_seconds".into(), load_s.into());
        extra.insert("kernel_warm_up_seconds".into(), compile_s.into());
        extra.insert("adapter".into(), gpu.info.name.clone().into());
        extra.insert("gpu_bytes".into(), engine.device_bytes().into());
        generation = generate(
            &mut engine,
            &loaded.tokenizer,
            &prompt_ids,
            &opts,
            &mut print,
        )?;
    }
    interrupt::set_graceful(false);
    let t = &generation.timings;
    if json {
        let mut value = serde_json::to_value(&generation)
            .map_err(|e| Error::Invalid(format!("serialising the result: {e}")))?;
        if let Some(obj) = value.as_object_mut() {
            obj.extend(extra);
        }
        println!("{value}");
    } else {
        println!();
    }
    note!(
        "prompt: {} tokens, {:.1} tok/s; generated: {} tokens, {:.1} tok/s; stopped: {}",
        t.prompt_tokens,
        t.prompt_tokens_per_second,
        t.generated_tokens,
        t.decode_tokens_per_second,
        generation.finish_reason
    );
    Ok(if generation.finish_reason == "interrupted" {
        interrupt::EXIT_INTERRUPTED
    } else {
        EXIT_OK
    })
}

/// Runs every kernel once before the prompt (so a driver that compiles kernels at their first
/// dispatch does it here, not inside the prompt's time), with a spinner; saves the pipeline cache.
/// Returns the seconds it took.
fn warm_up(gpu: &Gpu, engine: &mut GpuModel, quiet: bool) -> Result<f64> {
    let start = Instant::now();
    let spinner = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new_spinner()
    };
    spinner.set_message(format!(
        "preparing the GPU kernels on {} (slow only the first time on some drivers)",
        gpu.info.name
    ));
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    engine.warm_up()?;
    spinner.finish_and_clear();
    if let Err(e) = gpu.save_pipeline_cache() {
        note!("note: the pipeline cache was not saved ({e}); the next run compiles again");
    }
    Ok(start.elapsed().as_secs_f64())
}

/// `q4wgpu bench`: the rows stream to stdout as a markdown table as they are measured.
/// A comma-separated list of counts given to `flag`.
fn parse_counts(flag: &str, text: &str) -> Result<Vec<usize>> {
    text.split(',')
        .map(|t| {
            t.trim().parse().map_err(|_| {
                Error::Invalid(format!(
                    "{flag} takes a comma-separated list of counts, not {t:?}"
                ))
            })
        })
        .collect()
}

fn bench(args: BenchArgs) -> Result<i32> {
    if args.cpu {
        return bench_cpu(args);
    }
    let opts = bench::BenchOptions {
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        repetitions: args.repetitions,
        ctx_size: args.ctx_size,
        chunk: args.chunk,
        budgets: bench::parse_budgets(&args.vram_budget)?,
        stream_reads: args
            .stream_read
            .split(',')
            .map(|t| StreamRead::parse(t.trim()))
            .collect::<Result<_>>()?,
        prefetch_depth: args.prefetch_depth,
        bandwidth_bytes: scheduler::parse_size(&args.bandwidth_buffer)?,
        seed: args.seed,
        profile: args.profile,
        decode_fusion: match &args.decode_fusion {
            Some(text) => text
                .split('/')
                .map(DecodeFusion::parse)
                .collect::<Result<_>>()?,
            None => vec![DecodeFusion::default()],
        },
        depths: parse_counts("-d", &args.depth)?,
        cpu_layers: args
            .cpu_layers
            .split(',')
            .map(CpuLayers::parse)
            .collect::<Result<_>>()?,
        parallel: parse_counts("--parallel", &args.parallel)?,
        decode_activations: args
            .decode_activations
            .split(',')
            .map(|t| DecodeActivations::parse(t.trim()))
            .collect::<Result<_>>()?,
    };
    let (weights, name) = bench_weights(&args)?;
    let gpu = Gpu::new_with(args.adapter.as_deref(), !args.no_coop)?;
    eprintln!(
        "adapter: {}{}",
        gpu.describe(),
        if args.no_coop {
            " (cooperative matrices off: --no-coop)"
        } else {
            ""
        }
    );
    let mut header_printed = false;
    let mut report = bench::run_bench(&gpu, &weights, &name, &opts, &mut |row| {
        if !header_printed {
            println!("{}", bench::TABLE_HEADER);
            header_printed = true;
        }
        println!("{}", bench::table_line(row));
        let _ = std::io::stdout().flush();
    })?;
    if report.rows.is_empty() {
        let reasons: Vec<String> = report
            .skipped
            .iter()
            .map(|s| format!("budget {}: {}", bench::budget_label(s.budget), s.reason))
            .collect();
        return Err(Error::Invalid(if reasons.is_empty() {
            "nothing was measured: -p and -n are both 0".into()
        } else {
            format!("nothing was measured; {}", reasons.join("; "))
        }));
    }
    report.command = std::env::args().collect::<Vec<_>>().join(" ");
    println!();
    print!("{}", bench::preamble(&gpu.describe(), &report.bandwidth));
    for s in &report.skipped {
        println!(
            "budget {} skipped: {}",
            bench::budget_label(s.budget),
            s.reason
        );
    }
    for p in &report.profiles {
        println!();
        print!("{}", bench::profile_markdown(p));
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::Invalid(format!("serialising the results: {e}")))?;
        std::fs::write(path, text).map_err(|e| Error::io("writing the results", path, e))?;
    }
    Ok(EXIT_OK)
}

fn info(
    model_arg: Option<String>,
    adapter: Option<String>,
    ctx_size: usize,
    vram_budget: Option<String>,
) -> Result<i32> {
    let adapters = q4wgpu::gpu::list_adapters();
    if adapters.is_empty() {
        println!("adapters: none");
    }
    for a in &adapters {
        println!(
            "adapter: {} ({:?}, {:?}, driver {} {})",
            a.name, a.device_type, a.backend, a.driver, a.driver_info
        );
    }
    let gpu = Gpu::new(adapter.as_deref())?;
    println!("using: {}", gpu.describe());
    let c = &gpu.caps;
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    println!(
        "capabilities: f16 {}, subgroups {} (size {}-{}), f16 tensor cores {}, kernels read host memory {}, timestamps {}, pipeline cache {}",
        yes_no(c.shader_f16),
        yes_no(c.subgroups),
        c.subgroup_min_size,
        c.subgroup_max_size,
        yes_no(c.coop_matrix_f16),
        yes_no(c.mappable_primary_buffers),
        yes_no(c.timestamps),
        gpu.pipeline_cache_path()
            .map_or("no".to_string(), |p| p.display().to_string())
    );
    println!(
        "limits: largest buffer {}, largest storage binding {}, workgroup memory {} KiB, {} invocations per workgroup",
        gb(gpu.limits.max_buffer_size),
        gb(gpu.limits.max_storage_buffer_binding_size as u64),
        gpu.limits.max_compute_workgroup_storage_size / 1024,
        gpu.limits.max_compute_invocations_per_workgroup
    );
    if gpu.is_cpu() {
        println!(
            "note: {} is a CPU driver: `run --cpu` (the CPU reference) is faster on this machine",
            gpu.info.name
        );
    }
    let Some(m) = model_arg else {
        return Ok(EXIT_OK);
    };
    let path = model::resolve(Some(&m))?;
    // Only the config and the tensor shapes: nothing is quantized or uploaded.
    let summary = model::summarize(&path)?;
    let c = &summary.config;
    let ctx = context_size(Some(ctx_size), c.max_position_embeddings)?;
    println!(
        "model: {} ({}), {} layers, hidden {}, vocabulary {}, context up to {}; INT4 weights {}{}",
        path.display(),
        c.architectures.join(", "),
        c.num_hidden_layers,
        c.hidden_size,
        c.vocab_size,
        c.max_position_embeddings,
        gb(summary.int4_bytes),
        if summary.quantized {
            ""
        } else {
            " once quantized (on load)"
        }
    );
    let budget = vram_budget
        .as_deref()
        .map(scheduler::parse_size)
        .transpose()?;
    let opts = EngineOptions {
        ctx_size: ctx,
        vram_budget: budget,
        ..Default::default()
    };
    let (plan, source) = q4wgpu::engine::residency_plan(&gpu, c, &opts)?;
    println!("plan: {} (budget from {source})", plan.describe());
    if plan.streamed_layers() > 0 {
        println!(
            "decode: how many of the streamed layers run on the CPU instead is decided at load, from timings of this machine (`run --cpu-layers auto`, the default; `run` prints the split)"
        );
    }
    println!(
        "GPU memory planned at --ctx-size {ctx}: {} (room for the driver included)",
        gb(plan.device_bytes())
    );
    Ok(EXIT_OK)
}
