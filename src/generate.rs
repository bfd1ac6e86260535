//! The decode loop shared by the GPU engine and the CPU reference: feed the prompt, sample, stream
//! text, stop at EOS, a stop string, the token limit, the context end or Ctrl-C; report timings.

use crate::error::{Error, Result};
use crate::sampling::SamplingParams;
use crate::tokenizer::{StreamDecoder, Tokenizer};
use serde::Serialize;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// The log-probability of a chosen token and its most likely alternatives (raw logits, full vocabulary).
#[derive(Clone, Debug, Serialize)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// A token as reported in `--json` with `--logprobs`: its id, its text, its log-probability.
#[derive(Clone, Debug, Serialize)]
pub struct TokenText {
    pub token: u32,
    pub text: String,
    pub logprob: f32,
}

/// One generated token's report: the token and the most likely alternatives, each with its text.
#[derive(Clone, Debug, Serialize)]
pub struct LogprobReport {
    #[serde(flatten)]
    pub chosen: TokenText,
    pub top: Vec<TokenText>,
}

impl LogprobReport {
    fn new(tokenizer: &Tokenizer, lp: TokenLogprobs) -> Result<LogprobReport> {
        // Special tokens are shown too: an alternative may well be the end of the turn.
        let text = |token: u32, logprob: f32| -> Result<TokenText> {
            Ok(TokenText {
                token,
                text: tokenizer.decode(&[token], false)?,
                logprob,
            })
        };
        Ok(LogprobReport {
            chosen: text(lp.token, lp.logprob)?,
            top: lp
                .top
                .into_iter()
                .map(|(t, l)| text(t, l))
                .collect::<Result<_>>()?,
        })
    }
}

/// What a backend returns for one step: the sampled next token (and its log-probabilities if asked).
#[derive(Clone, Debug)]
pub struct StepOutput {
    pub token: u32,
    pub logprobs: Option<TokenLogprobs>,
}

/// Prompts of at most this many tokens run as decode steps, one token each, on every backend:
/// a GPU prompt chunk's dispatches are sized for the whole chunk whatever the prompt's length (on
/// lavapipe a 2-token prompt took as long as 64 tokens; on the H200 a 64-row chunk cost about 18
/// decode steps), and the CPU reference does the same so that it computes what the GPU computes
/// (decode steps may quantize activations to int8).
pub const SHORT_PROMPT: usize = 8;

/// The forward calls a step of `tokens` is made of: one per token for a short prompt (see
/// [`SHORT_PROMPT`]), else one.
pub fn forward_calls(tokens: &[u32]) -> Vec<&[u32]> {
    if tokens.len() > 1 && tokens.len() <= SHORT_PROMPT {
        tokens.chunks(1).collect()
    } else {
        vec![tokens]
    }
}

/// A model that can extend its sequence: the GPU engine or the CPU reference.
pub trait Decoder {
    /// Appends `tokens` at the current position and samples the token that follows them.
    /// `step` counts sampled tokens (it seeds the sampler's random draw).
    fn step(
        &mut self,
        tokens: &[u32],
        params: &SamplingParams,
        history: &[u32],
        step: u32,
        top_logprobs: Option<usize>,
    ) -> Result<StepOutput>;
    /// Tokens the sequence holds now.
    fn position(&self) -> usize;
    /// Most tokens the sequence can hold.
    fn context_size(&self) -> usize;
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_strings: Vec<String>,
    /// Report the log-probability of each generated token and this many alternatives.
    pub logprobs: Option<usize>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    pub prompt_tokens: usize,
    pub prompt_seconds: f64,
    pub prompt_tokens_per_second: f64,
    pub generated_tokens: usize,
    pub decode_seconds: f64,
    pub decode_tokens_per_second: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub prompt_token_ids: Vec<u32>,
    pub generated_token_ids: Vec<u32>,
    pub text: String,
    /// "eos", "stop_string", "max_tokens", "context_full" or "interrupted".
    pub finish_reason: &'static str,
    pub timings: Timings,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<LogprobReport>>,
}

/// Set by the Ctrl-C handler; the loop stops at the next token and still reports its statistics.
pub use crate::interrupt::INTERRUPTED;

/// Generates from `prompt_ids`, calling `on_text` with each complete piece of text as it is made.
pub fn generate(
    decoder: &mut dyn Decoder,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    if prompt_ids.is_empty() {
        return Err(Error::Invalid(
            "the prompt is empty after tokenization".into(),
        ));
    }
    let ctx = decoder.context_size();
    if decoder.position() + prompt_ids.len() > ctx {
        return Err(Error::Invalid(format!(
            "the prompt has {} tokens but the context holds {ctx}; raise --ctx-size (the model allows up to its max_position_embeddings) or shorten the prompt",
            prompt_ids.len()
        )));
    }
    let mut history: Vec<u32> = prompt_ids.to_vec();
    let mut generated = Vec::new();
    let mut logprobs = opts.logprobs.map(|_| Vec::new());
    let mut text = String::new();
    let mut stream = StreamDecoder::new(tokenizer, true);
    let mut timings = Timings {
        prompt_tokens: prompt_ids.len(),
        ..Default::default()
    };
    let mut finish_reason = "max_tokens";
    let mut emitted = 0; // bytes of `text` already passed to `on_text`

    let start = Instant::now();
    let mut out = decoder.step(prompt_ids, &opts.sampling, &history, 0, opts.logprobs)?;
    timings.prompt_seconds = start.elapsed().as_secs_f64();
    let decode_start = Instant::now();

    while generated.len() < opts.max_tokens {
        if INTERRUPTED.load(Ordering::Relaxed) {
            finish_reason = "interrupted";
            break;
        }
        let token = out.token;
        if tokenizer.eos_ids().contains(&token) {
            finish_reason = "eos";
            break;
        }
        generated.push(token);
        history.push(token);
        if let (Some(all), Some(lp)) = (logprobs.as_mut(), out.logprobs.take()) {
            all.push(LogprobReport::new(tokenizer, lp)?);
        }
        if let Some(piece) = stream.push(token)? {
            text.push_str(&piece);
            if let Some(cut) = find_stop(&text, &opts.stop_strings) {
                text.truncate(cut);
                on_text(&text[emitted.min(cut)..]);
                finish_reason = "stop_string";
                break;
            }
            // Hold back a tail that may still grow into a stop string.
            let safe = text.len() - held_back(&text, &opts.stop_strings);
            if safe > emitted {
                on_text(&text[emitted..safe]);
                emitted = safe;
            }
        }
        if generated.len() >= opts.max_tokens {
            break;
        }
        if decoder.position() + 1 > ctx {
            finish_reason = "context_full";
            break;
        }
        out = decoder.step(
            &[token],
            &opts.sampling,
            &history,
            generated.len() as u32,
            opts.logprobs,
        )?;
    }
    if finish_reason != "stop_string" {
        if let Some(rest) = stream.flush()? {
            text.push_str(&rest);
        }
        on_text(&text[emitted..]);
    }
    timings.generated_tokens = generated.len();
    timings.decode_seconds = decode_start.elapsed().as_secs_f64();
    timings.prompt_tokens_per_second = rate(timings.prompt_tokens, timings.prompt_seconds);
    // The first generated token came out of the prompt step; decode speed counts the steps after it.
    timings.decode_tokens_per_second =
        rate(generated.len().saturating_sub(1), timings.decode_seconds);
    Ok(Generation {
        prompt_token_ids: prompt_ids.to_vec(),
        generated_token_ids: generated,
        text,
        finish_reason,
        timings,
        logprobs,
    })
}

fn rate(n: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        n as f64 / seconds
    } else {
        0.0
    }
}

/// Length of the longest tail of `text` that is a proper prefix of a stop string.
pub(crate) fn held_back(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|s| {
            (1..s.len())
                .rev()
                .filter(move |&n| s.is_char_boundary(n))
                .map(move |n| &s[..n])
        })
        .filter(|prefix| text.ends_with(prefix))
        .map(str::len)
        .max()
        .unwrap_or(0)
}

/// Byte offset where the first stop string begins, if any has appeared.
pub(crate) fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}
