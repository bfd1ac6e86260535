//! `q4wgpu chat`: a terminal conversation. It runs the server's engine thread with one slot, so
//! the conversation stays in that slot's KV cache and each turn only processes what is new (the
//! prompt cache finds the shared prefix). The conversation is kept as the tokens the model saw
//! and made, not re-tokenized from its text (a re-tokenized answer can differ from the tokens
//! generated, and would miss the cache). Ctrl-C during an answer drops the answer's receiver,
//! which the engine sees before its next step, the same path as a client disconnecting.

use crate::error::{Error, Result};
use crate::sampling::SamplingParams;
use crate::serve::metrics::Metrics;
use crate::serve::scheduler::{Event, Request, Usage};
use crate::serve::{spawn_engine, EngineSettings, Loaded};
use crate::tokenizer::ChatMessage;
use rustyline::error::ReadlineError;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct ChatSettings {
    pub system: Option<String>,
    /// Most tokens per answer.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
}

/// Set by Ctrl-C while an answer streams (a second Ctrl-C during it quits).
use crate::interrupt::INTERRUPTED as STOP_ANSWER;

const HELP: &str = "commands: /reset (new conversation), /system TEXT (new system message and conversation), /exit; Ctrl-C stops an answer, Ctrl-D quits";

pub fn chat(engine: EngineSettings, settings: ChatSettings) -> Result<()> {
    let (queue_tx, queue_rx) = std::sync::mpsc::sync_channel(1);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let _engine = spawn_engine(
        EngineSettings {
            parallel: 1,
            ..engine
        },
        queue_rx,
        Arc::new(Metrics::default()),
        ready_tx,
    );
    let loaded = ready_rx
        .recv()
        .map_err(|_| Error::Invalid("the engine thread ended while loading".into()))??;
    if !loaded.tokenizer.has_chat_template() {
        return Err(Error::Invalid(
            "this model has no chat template; use `q4wgpu run --prompt` for raw text".into(),
        ));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|e| Error::Invalid(format!("starting the async runtime: {e}")))?;
    let mut editor = rustyline::DefaultEditor::new()
        .map_err(|e| Error::Invalid(format!("starting the line editor: {e}")))?;
    // After the editor: it takes SIGINT for itself when created (its raw mode turns Ctrl-C into
    // a key while a line is read; during an answer the signal must reach this handler).
    crate::interrupt::install();
    let mut system = settings.system.clone();
    let mut messages = fresh(&system);
    let mut history = History::default();
    eprintln!("{HELP}");
    loop {
        let line = match editor.readline(">>> ") {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => {
                eprintln!("({HELP})");
                continue;
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(Error::Invalid(format!("reading the terminal: {e}"))),
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line);
        if let Some(command) = line.strip_prefix('/') {
            let (name, arg) = command.split_once(' ').unwrap_or((command, ""));
            match name {
                "exit" | "quit" => break,
                "reset" => {
                    messages = fresh(&system);
                    history = History::default();
                    eprintln!("(new conversation)");
                }
                "system" if !arg.trim().is_empty() => {
                    system = Some(arg.trim().to_string());
                    messages = fresh(&system);
                    history = History::default();
                    eprintln!("(system message set; new conversation)");
                }
                _ => eprintln!("({HELP})"),
            }
            continue;
        }
        messages.push(ChatMessage::new("user", line));
        match turn(
            &runtime,
            &queue_tx,
            &loaded,
            &messages,
            &mut history,
            &settings,
        ) {
            Ok(answer) => messages.push(ChatMessage::new("assistant", answer)),
            Err(e) => {
                messages.pop();
                eprintln!("error: {e}");
            }
        }
    }
    Ok(())
}

/// The conversation so far as the model saw it: `text` is the template's rendering up to the end
/// of the last answer, `tokens` the tokens of the prompts and answers behind it.
#[derive(Default)]
struct History {
    text: String,
    tokens: Vec<u32>,
}

impl History {
    /// The prompt for `rendered` (the whole conversation with the new user turn): the history's
    /// tokens and the new part's, or all of it tokenized if the template rewrote the past.
    fn prompt(&self, loaded: &Loaded, rendered: &str) -> Result<Vec<u32>> {
        match rendered.strip_prefix(self.text.as_str()) {
            Some(new) if !self.tokens.is_empty() => {
                let mut tokens = self.tokens.clone();
                tokens.extend(loaded.tokenizer.encode(new, false)?);
                Ok(tokens)
            }
            _ => loaded.tokenizer.encode(rendered, false),
        }
    }
}

fn fresh(system: &Option<String>) -> Vec<ChatMessage> {
    system
        .iter()
        .map(|s| ChatMessage::new("system", s.clone()))
        .collect()
}

/// One answer, streamed to stdout; returns its text (cut short by Ctrl-C, if pressed).
fn turn(
    runtime: &tokio::runtime::Runtime,
    queue: &std::sync::mpsc::SyncSender<Request>,
    loaded: &Loaded,
    messages: &[ChatMessage],
    history: &mut History,
    settings: &ChatSettings,
) -> Result<String> {
    let text = loaded.tokenizer.apply_chat_template(messages, true)?;
    let prompt = history.prompt(loaded, &text)?;
    if prompt.len() + 1 >= loaded.ctx {
        return Err(Error::Invalid(format!(
            "the conversation has {} tokens and the context holds {}: /reset, or raise --ctx-size",
            prompt.len(),
            loaded.ctx
        )));
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let request = Request {
        max_tokens: settings.max_tokens.min(loaded.ctx - prompt.len()),
        prompt: prompt.clone(),
        sampling: settings.sampling.clone(),
        stop: Vec::new(),
        logprobs: None,
        ignore_eos: false,
        events: tx,
    };
    STOP_ANSWER.store(false, Ordering::Relaxed);
    crate::interrupt::set_graceful(true);
    queue
        .send(request)
        .map_err(|_| Error::Invalid("the engine has stopped".into()))?;
    let start = Instant::now();
    let mut generated = Vec::new();
    let mut usage: Option<Usage> = None;
    let mut stdout = std::io::stdout();
    let outcome = runtime.block_on(async {
        loop {
            // Checked every event too: tokens can come faster than the timer below fires.
            if STOP_ANSWER.load(Ordering::Relaxed) {
                break Ok(());
            }
            tokio::select! {
                event = rx.recv() => match event {
                    Some(Event::Text { text, tokens, .. }) => {
                        generated.extend(tokens);
                        print!("{text}");
                        let _ = stdout.flush();
                    }
                    Some(Event::Done { usage: u, .. }) => {
                        usage = Some(u);
                        break Ok(());
                    }
                    Some(Event::Error(e)) => break Err(Error::Invalid(e)),
                    None => break Err(Error::Invalid("the engine has stopped".into())),
                },
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    });
    crate::interrupt::set_graceful(false);
    outcome?;
    println!();
    let seconds = start.elapsed().as_secs_f64();
    match usage {
        Some(u) => eprintln!(
            "({} tokens in {seconds:.1} s; prompt {} tokens, {} from the cache)",
            u.completion_tokens, u.prompt_tokens, u.cached_tokens
        ),
        None => eprintln!("(stopped)"),
    }
    // The answer as its tokens decode, so the next rendering starts with exactly `history.text`.
    let answer = loaded.tokenizer.decode(&generated, true)?;
    history.text = text + &answer;
    history.tokens = prompt;
    history.tokens.extend(generated);
    Ok(answer)
}
