//! The command line: a thin layer over the library.

use clap::{Args, Parser, Subcommand};
use q4wgpu::cpu::CpuModel;
use q4wgpu::engine::{DecodeFusion, EngineOptions, GpuModel, StreamRead};
use q4wgpu::generate::{generate, GenerateOptions, Generation, INTERRUPTED};
use q4wgpu::chat::ChatSettings;
use q4wgpu::gpu::Gpu;
use q4wgpu::serve::{EngineSettings, ServeSettings};
use q4wgpu::sampling::SamplingParams;
use q4wgpu::tokenizer::{ChatMessage, Tokenizer};
use q4wgpu::{bench, model, scheduler, synthetic, Error, Result};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

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
        /// The folder to create.
        dst: PathBuf,
    },
    /// Measure prompt processing and generation speed (llama-bench style) against bounds measured
    /// in the same run.
    Bench(BenchArgs),
    /// Fetch known models into the cache (all of them when no name is given); verified by SHA-256.
    Fetch { names: Vec<String> },
    /// Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions).
    Serve(ServeArgs),
    /// Talk with the model in the terminal (streamed answers; /reset, /system TEXT, /exit).
    Chat(ChatArgs),
    /// Show the GPU adapters, and a model's size and memory needs.
    Info {
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        adapter: Option<String>,
        #[arg(long, default_value_t = 4096)]
        ctx_size: usize,
        #[arg(long)]
        vram_budget: Option<String>,
    },
}

#[derive(Args)]
struct RunArgs {
    /// A q4wgpu folder, a Hugging Face folder, a .gguf file, or a known model name
    /// (default: qwen2.5-coder-0.5b-instruct, fetched once into ~/.cache/q4wgpu).
    #[arg(long)]
    model: Option<String>,
    #[arg(long, short)]
    prompt: String,
    /// Apply the model's chat template to the prompt.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long)]
    system: Option<String>,
    #[arg(long, short = 'n', default_value_t = 256)]
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
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this text appears (may be given several times).
    #[arg(long)]
    stop: Vec<String>,
    #[arg(long, default_value_t = 4096)]
    ctx_size: usize,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Report each generated token's log-probability and this many alternatives (in --json).
    #[arg(long)]
    logprobs: Option<usize>,
    /// Run the CPU reference instead of the GPU (slow; for checking).
    #[arg(long)]
    cpu: bool,
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
    /// How decode steps read streamed layers: ring (copied into device slots) or zero-copy
    /// (kernels read host memory directly).
    #[arg(long, default_value = EngineOptions::default().decode_reads.name())]
    decode_reads: String,
    /// How prompt chunks read streamed layers: ring or zero-copy.
    #[arg(long, default_value = EngineOptions::default().prompt_reads.name())]
    prompt_reads: String,
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
    #[arg(long, conflicts_with = "synthetic")]
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
    /// post-norm and swiglu (default: input-norm).
    #[arg(long)]
    decode_fusion: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Quantize { src, dst } => quantize(src, dst),
        Command::Bench(args) => bench(args),
        Command::Fetch { names } => fetch(names),
        Command::Serve(args) => serve(args),
        Command::Chat(args) => chat(args),
        Command::Info {
            model,
            adapter,
            ctx_size,
            vram_budget,
        } => info(model, adapter, ctx_size, vram_budget),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn serve(args: ServeArgs) -> Result<()> {
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
    )
}

fn chat(args: ChatArgs) -> Result<()> {
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
            },
        },
    )
}

fn fetch(names: Vec<String>) -> Result<()> {
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
    Ok(())
}

fn quantize(src: PathBuf, dst: PathBuf) -> Result<()> {
    let start = Instant::now();
    let report = model::quantize_path(&src, &dst, true)?;
    eprintln!(
        "wrote {} in {:.1} s ({report:?})",
        dst.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn build_prompt(tokenizer: &Tokenizer, args: &RunArgs) -> Result<Vec<u32>> {
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
            content: args.prompt.clone(),
        });
        let text = tokenizer.apply_chat_template(&messages, true)?;
        // The template writes BOS itself where the model wants one.
        tokenizer.encode(&text, false)
    } else {
        tokenizer.encode(&args.prompt, tokenizer.add_bos())
    }
}

fn run(args: RunArgs) -> Result<()> {
    if args.system.is_some() && !args.chat {
        return Err(Error::Invalid("--system needs --chat".into()));
    }
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::Relaxed));
    let load_start = Instant::now();
    let path = model::resolve(args.model.as_deref())?;
    let loaded = model::load(&path, true)?;
    let prompt_ids = build_prompt(&loaded.tokenizer, &args)?;
    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repeat_penalty: args.repeat_penalty,
            repeat_last_n: args.repeat_last_n,
            seed: args.seed,
        },
        stop_strings: args.stop.clone(),
        logprobs: args.logprobs,
    };
    let ctx = args
        .ctx_size
        .min(loaded.weights.config.max_position_embeddings);
    if prompt_ids.len() >= ctx {
        return Err(Error::Invalid(format!(
            "the prompt has {} tokens but the context holds {ctx}; raise --ctx-size (this model allows up to {})",
            prompt_ids.len(),
            loaded.weights.config.max_position_embeddings
        )));
    }
    let json = args.json;
    let mut print = |piece: &str| {
        if !json {
            print!("{piece}");
            let _ = std::io::stdout().flush();
        }
    };
    let generation: Generation;
    let mut extra = serde_json::Map::new();
    if args.cpu {
        let cpu = CpuModel::new(&loaded.weights)?;
        let mut decoder = q4wgpu::cpu::CpuDecoder::new(&cpu, ctx);
        eprintln!(
            "loaded {} in {:.1} s; running on the CPU reference",
            path.display(),
            load_start.elapsed().as_secs_f64()
        );
        generation = generate(
            &mut decoder,
            &loaded.tokenizer,
            &prompt_ids,
            &opts,
            &mut print,
        )?;
    } else {
        let gpu = Gpu::new(args.adapter.as_deref())?;
        let budget = args
            .vram_budget
            .as_deref()
            .map(scheduler::parse_size)
            .transpose()?;
        let engine_opts = EngineOptions {
            ctx_size: ctx,
            vram_budget: budget,
            prefetch_depth: args.prefetch_depth,
            decode_reads: StreamRead::parse(&args.decode_reads)?,
            prompt_reads: StreamRead::parse(&args.prompt_reads)?,
            ..Default::default()
        };
        let mut engine = GpuModel::new(&gpu, &loaded.weights, engine_opts)?;
        let load_s = load_start.elapsed().as_secs_f64();
        eprintln!("adapter: {}", gpu.describe());
        eprintln!(
            "plan: {} (budget from {})",
            engine.plan().describe(),
            engine.budget_source()
        );
        eprintln!(
            "loaded {} in {load_s:.1} s; {:.2} GB on the GPU",
            path.display(),
            engine.device_bytes() as f64 / 1e9
        );
        extra.insert("load_seconds".into(), load_s.into());
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
    eprintln!(
        "prompt: {} tokens, {:.1} tok/s; generated: {} tokens, {:.1} tok/s; stopped: {}",
        t.prompt_tokens,
        t.prompt_tokens_per_second,
        t.generated_tokens,
        t.decode_tokens_per_second,
        generation.finish_reason
    );
    Ok(())
}

/// `q4wgpu bench`: the rows stream to stdout as a markdown table as they are measured.
fn bench(args: BenchArgs) -> Result<()> {
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
            Some(text) => DecodeFusion::parse(text)?,
            None => DecodeFusion::default(),
        },
    };
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
    eprintln!(
        "{name}: {:.2} GB of weights ready in {:.1} s",
        weights.byte_len() as f64 / 1e9,
        load_start.elapsed().as_secs_f64()
    );
    let gpu = Gpu::new(args.adapter.as_deref())?;
    eprintln!("adapter: {}", gpu.describe());
    let mut header_printed = false;
    let mut report = bench::run_bench(&gpu, &weights, &name, &opts, &mut |row| {
        if !header_printed {
            println!("{}", bench::TABLE_HEADER);
            header_printed = true;
        }
        println!("{}", bench::table_line(row));
        let _ = std::io::stdout().flush();
    })?;
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
    Ok(())
}

fn info(
    model_arg: Option<String>,
    adapter: Option<String>,
    ctx_size: usize,
    vram_budget: Option<String>,
) -> Result<()> {
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
    println!("features: {:?}", gpu.features);
    println!("caps: {:?}", gpu.caps);
    println!(
        "limits: max_buffer_size {}, max_storage_buffer_binding_size {}, max_compute_workgroup_storage_size {}, max_compute_invocations_per_workgroup {}",
        gpu.limits.max_buffer_size,
        gpu.limits.max_storage_buffer_binding_size,
        gpu.limits.max_compute_workgroup_storage_size,
        gpu.limits.max_compute_invocations_per_workgroup
    );
    if let Some(m) = model_arg {
        let path = model::resolve(Some(&m))?;
        let loaded = model::load(&path, true)?;
        let c = &loaded.weights.config;
        println!(
            "model: {} ({:?}), {} layers, hidden {}, {} weight bytes",
            path.display(),
            c.architectures,
            c.num_hidden_layers,
            c.hidden_size,
            loaded.weights.byte_len()
        );
        let budget = vram_budget
            .as_deref()
            .map(scheduler::parse_size)
            .transpose()?;
        let engine = GpuModel::new(
            &gpu,
            &loaded.weights,
            EngineOptions {
                ctx_size,
                vram_budget: budget,
                ..Default::default()
            },
        )?;
        println!(
            "plan: {} (budget from {})",
            engine.plan().describe(),
            engine.budget_source()
        );
        println!(
            "GPU memory needed at --ctx-size {ctx_size}: {:.3} GB",
            engine.device_bytes() as f64 / 1e9
        );
    }
    Ok(())
}
