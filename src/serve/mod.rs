//! `q4wgpu serve`: an OpenAI-compatible HTTP server, and the engine thread it shares with
//! `q4wgpu chat`. The HTTP side (axum on tokio) parses and checks requests, tokenizes, and queues
//! them; one engine thread owns the model and runs up to `--parallel` sequences
//! ([`scheduler`]) through a narrow [`backend::Backend`] that the GPU engine and the CPU
//! reference implement.

pub mod api;
pub mod backend;
mod http;
pub mod metrics;
pub mod responses;
pub mod scheduler;
mod sse;

use crate::cpu::CpuModel;
use crate::engine::{EngineOptions, GpuModel, StreamRead};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::model;
use crate::tokenizer::Tokenizer;
use backend::{CpuBackend, GpuBackend};
use metrics::Metrics;
use scheduler::Request;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, OnceLock};

/// How the engine thread loads and runs the model.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    pub model: PathBuf,
    pub cpu: bool,
    /// Sequences decoded together (slots).
    pub parallel: usize,
    /// Tokens each slot holds.
    pub ctx_size: usize,
    pub adapter: Option<String>,
    pub vram_budget: Option<u64>,
    pub prefetch_depth: usize,
    /// Layers beyond the budget that decode on the CPU (one slot only; see `engine::hybrid`).
    pub cpu_layers: crate::engine::CpuLayers,
    pub decode_reads: StreamRead,
    pub prompt_reads: StreamRead,
    /// Print load progress and the plan.
    pub verbose: bool,
}

/// What the server needs once the engine has loaded the model.
pub struct Loaded {
    pub tokenizer: Arc<Tokenizer>,
    /// Tokens each slot holds.
    pub ctx: usize,
}

/// Starts the engine thread: it loads the model, reports on `ready`, then serves `queue` until
/// every sender is dropped.
pub fn spawn_engine(
    settings: EngineSettings,
    queue: Receiver<Request>,
    metrics: Arc<Metrics>,
    ready: std::sync::mpsc::Sender<Result<Loaded>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let failed = ready.clone();
        if let Err(e) = engine_main(settings, queue, &metrics, ready) {
            // Before the model is ready the caller hears it; after, the requests fail one by one.
            let _ = failed.send(Err(e));
        }
    })
}

fn engine_main(
    s: EngineSettings,
    queue: Receiver<Request>,
    metrics: &Metrics,
    ready: std::sync::mpsc::Sender<Result<Loaded>>,
) -> Result<()> {
    if s.parallel == 0 {
        return Err(Error::Invalid("--parallel must be at least 1".into()));
    }
    let loaded = model::load(&s.model, s.verbose)?;
    let (weights, tokenizer) = (loaded.weights, Arc::new(loaded.tokenizer));
    let ctx = s.ctx_size.min(weights.config.max_position_embeddings);
    metrics.slots.store(s.parallel, Ordering::Relaxed);
    let announce = || {
        let _ = ready.send(Ok(Loaded {
            tokenizer: tokenizer.clone(),
            ctx,
        }));
    };
    if s.cpu {
        let cpu = CpuModel::new(&weights)?;
        let mut backend = CpuBackend::new(&cpu, s.parallel, ctx);
        if s.verbose {
            eprintln!(
                "running on the CPU reference, {} slots of {ctx} tokens",
                s.parallel
            );
        }
        announce();
        scheduler::run(&mut backend, &tokenizer, queue, metrics);
    } else {
        let gpu = Gpu::new(s.adapter.as_deref())?;
        let opts = EngineOptions {
            ctx_size: ctx,
            vram_budget: s.vram_budget,
            prefetch_depth: s.prefetch_depth,
            cpu_layers: s.cpu_layers,
            decode_reads: s.decode_reads,
            prompt_reads: s.prompt_reads,
            kv_slots: s.parallel,
            ..Default::default()
        };
        let mut engine = GpuModel::new(&gpu, &weights, opts)?;
        if s.verbose {
            eprintln!("adapter: {}", gpu.describe());
            eprintln!(
                "plan: {} (budget from {}); {} slots of {ctx} tokens; {:.2} GB on the GPU",
                engine.plan().describe(),
                engine.budget_source(),
                s.parallel,
                engine.device_bytes() as f64 / 1e9
            );
            if let Some(hybrid) = engine.hybrid_note() {
                eprintln!("{hybrid}");
            }
        }
        match (engine.batch_capacity(), engine.batch_unavailable()) {
            (_, Some(why)) => eprintln!("note: sequences take turns (no batched step): {why}"),
            (n, None) if s.verbose && n > 1 => {
                eprintln!("batched decode: up to {n} sequences per pass over the weights")
            }
            _ => {}
        }
        announce();
        let mut backend = GpuBackend {
            engine: &mut engine,
        };
        scheduler::run(&mut backend, &tokenizer, queue, metrics);
    }
    Ok(())
}

/// `q4wgpu serve` settings beyond the engine's.
#[derive(Clone, Debug)]
pub struct ServeSettings {
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    /// Requests that may wait for a slot; more are answered 429.
    pub queue: usize,
    /// The id `/v1/models` lists and requests name.
    pub model_id: String,
}

/// Runs the server until Ctrl-C. It listens at once (`/health` answers 503 while loading).
pub fn serve(engine: EngineSettings, settings: ServeSettings) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    let (queue_tx, queue_rx): (SyncSender<Request>, _) =
        std::sync::mpsc::sync_channel(settings.queue);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let state = Arc::new(http::AppState {
        model_id: settings.model_id.clone(),
        api_key: settings.api_key.clone(),
        loaded: OnceLock::new(),
        queue: queue_tx,
        metrics: metrics.clone(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Invalid(format!("starting the async runtime: {e}")))?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", settings.host, settings.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| {
            Error::Invalid(format!(
                "cannot listen on {addr}: {e} (another server there? try --port)"
            ))
        })?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::Invalid(format!("reading the bound address: {e}")))?;
        eprintln!(
            "q4wgpu serve: listening on http://{local} (model {:?})",
            settings.model_id
        );
        let _engine = spawn_engine(engine, queue_rx, metrics, ready_tx);
        let waiting = state.clone();
        // The load runs on the engine thread; this waits for its word without blocking the server.
        let loader = tokio::task::spawn_blocking(move || ready_rx.recv());
        tokio::spawn(async move {
            match loader.await {
                Ok(Ok(Ok(loaded))) => {
                    let _ = waiting.loaded.set(loaded);
                    eprintln!("q4wgpu serve: ready");
                }
                Ok(Ok(Err(e))) => {
                    eprintln!("error: {e}");
                    std::process::exit(1);
                }
                _ => {
                    eprintln!("error: the engine thread ended while loading");
                    std::process::exit(1);
                }
            }
        });
        let app = http::router(state);
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
                eprintln!("q4wgpu serve: stopping");
                std::process::exit(0);
            })
            .await
            .map_err(|e| Error::Invalid(format!("the server stopped: {e}")))
    })
}
