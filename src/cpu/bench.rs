//! `q4wgpu bench --cpu`: prompt and decode speed of the fast CPU backend (llama-bench style, to
//! compare with llama.cpp's CPU backend on the same cores), and the kernel's read bandwidth.

use super::fast::{self, Isa, PackedAct};
use super::{CpuDecoder, CpuModel};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::generate::Decoder;
use crate::quant::{blocks_per_row, ActQ8, QMatrix, WORDS_PER_BLOCK};
use crate::sampling::SamplingParams;
use crate::weights::ModelWeights;
use serde::Serialize;
use std::time::Instant;

/// One line of the CPU results table.
#[derive(Clone, Debug, Serialize)]
pub struct CpuBenchRow {
    pub model: String,
    pub isa: Isa,
    pub threads: usize,
    /// "pp512", "tg128", or "matvec" for the kernel alone.
    pub test: String,
    /// Tokens (or matvecs) per second: median, min, max over the repetitions.
    pub per_second: f64,
    pub per_second_min: f64,
    pub per_second_max: f64,
    /// INT4 weight bytes (nibbles and scales) read per token (per matvec).
    pub weight_bytes: f64,
    /// Weight bytes per token × tokens per second.
    pub weight_bytes_per_second: f64,
}

pub const CPU_TABLE_HEADER: &str = "| model | CPU kernel | threads | test | tok/s | min–max | weight GB/token | weight GB/s | GB/s per thread |\n| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |";

pub fn cpu_table_line(r: &CpuBenchRow) -> String {
    format!(
        "| {} | {} | {} | {} | {:.2} | {:.2}–{:.2} | {:.3} | {:.2} | {:.2} |",
        r.model,
        r.isa.name(),
        r.threads,
        r.test,
        r.per_second,
        r.per_second_min,
        r.per_second_max,
        r.weight_bytes / 1e9,
        r.weight_bytes_per_second / 1e9,
        r.weight_bytes_per_second / 1e9 / r.threads as f64,
    )
}

/// Bytes an INT4 `[rows, cols]` matrix occupies (and a matvec reads).
fn q4_bytes(rows: usize, cols: usize) -> f64 {
    (rows * blocks_per_row(cols) * (WORDS_PER_BLOCK * 4 + 2)) as f64
}

/// INT4 bytes one token reads: every layer's projections and the lm_head.
pub fn weight_bytes_per_token(c: &ModelConfig) -> f64 {
    let (h, i, q, kv) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
    let layer = q4_bytes(q + 2 * kv, h) + q4_bytes(h, q) + 2.0 * q4_bytes(i, h) + q4_bytes(h, i);
    c.num_hidden_layers as f64 * layer + q4_bytes(c.vocab_size, h)
}

fn row(model: &str, isa: Isa, test: String, rates: &[f64], weight_bytes: f64) -> CpuBenchRow {
    let mut sorted = rates.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    CpuBenchRow {
        model: model.to_string(),
        isa,
        threads: rayon::current_num_threads(),
        test,
        per_second: median,
        per_second_min: sorted[0],
        per_second_max: sorted[n - 1],
        weight_bytes,
        weight_bytes_per_second: weight_bytes * median,
    }
}

/// Prompt (`prompt_tokens`, 0 skips) and decode (`gen_tokens` after 4 prompt tokens, 0 skips)
/// speed of the fast CPU model with `isa`, `reps` timed runs after one short warm-up each.
pub fn bench_model(
    weights: &ModelWeights,
    model: &str,
    isa: Isa,
    prompt_tokens: usize,
    gen_tokens: usize,
    reps: usize,
    on_row: &mut dyn FnMut(&CpuBenchRow),
) -> Result<Vec<CpuBenchRow>> {
    let cpu = CpuModel::fast(weights, isa)?;
    let config = &weights.config;
    let per_token = weight_bytes_per_token(config);
    let params = SamplingParams::greedy();
    let ctx = prompt_tokens
        .max(crate::bench::TG_PROMPT + gen_tokens)
        .max(1);
    let tokens = crate::bench::random_tokens(ctx, config.vocab_size, 0);
    let mut rows = Vec::new();
    if prompt_tokens > 0 {
        let mut rates = Vec::new();
        for rep in 0..=reps {
            let run = if rep == 0 {
                &tokens[..prompt_tokens.min(8)]
            } else {
                &tokens[..prompt_tokens]
            };
            let mut decoder = CpuDecoder::new(&cpu, ctx);
            let start = Instant::now();
            decoder.step(run, &params, &[], 0, None)?;
            if rep > 0 {
                rates.push(run.len() as f64 / start.elapsed().as_secs_f64());
            }
        }
        // A prompt reads the weights once per pass of up to MAX_TOKENS tokens.
        let bytes = per_token / fast::MAX_TOKENS.min(prompt_tokens) as f64;
        rows.push(row(model, isa, format!("pp{prompt_tokens}"), &rates, bytes));
        on_row(rows.last().expect("pushed"));
    }
    if gen_tokens > 0 {
        let mut rates = Vec::new();
        for rep in 0..=reps {
            let steps = if rep == 0 {
                gen_tokens.min(4)
            } else {
                gen_tokens
            };
            let mut decoder = CpuDecoder::new(&cpu, ctx);
            let prompt = &tokens[..crate::bench::TG_PROMPT];
            let mut token = decoder.step(prompt, &params, prompt, 0, None)?.token;
            let start = Instant::now();
            for i in 0..steps {
                token = decoder
                    .step(&[token], &params, &[], i as u32 + 1, None)?
                    .token;
            }
            if rep > 0 {
                rates.push(steps as f64 / start.elapsed().as_secs_f64());
            }
        }
        rows.push(row(
            model,
            isa,
            format!("tg{gen_tokens}"),
            &rates,
            per_token,
        ));
        on_row(rows.last().expect("pushed"));
    }
    Ok(rows)
}

/// The kernel alone: matvecs per second of a random `[rows, cols]` INT4 matrix with `isa`
/// (`tokens` inputs per pass), on the current rayon pool.
pub fn bench_kernel(isa: Isa, rows: usize, cols: usize, tokens: usize, reps: usize) -> CpuBenchRow {
    let bpr = blocks_per_row(cols);
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let m = QMatrix {
        rows,
        cols,
        qweight: (0..rows * bpr * WORDS_PER_BLOCK)
            .map(|_| next() as u32)
            .collect(),
        // bf16 scales around 0.01.
        scales: (0..rows * bpr)
            .map(|_| 0x3C20 + (next() % 64) as u16)
            .collect(),
    };
    let x: Vec<f32> = (0..cols)
        .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let packed: Vec<PackedAct> = (0..tokens)
        .map(|_| PackedAct::new(&ActQ8::quantize(&x)))
        .collect();
    let refs: Vec<&PackedAct> = packed.iter().collect();
    let view = m.view();
    let mut rates = Vec::new();
    for rep in 0..=reps {
        // Each sample lasts at least 0.2 s.
        let start = Instant::now();
        let mut n = 0;
        while n == 0 || start.elapsed().as_secs_f64() < 0.2 {
            std::hint::black_box(fast::matmul(isa, &view, &refs));
            n += 1;
        }
        if rep > 0 {
            rates.push(n as f64 / start.elapsed().as_secs_f64());
        }
    }
    let test = format!("matvec [{rows}, {cols}] × {tokens}");
    row("kernel", isa, test, &rates, q4_bytes(rows, cols))
}
