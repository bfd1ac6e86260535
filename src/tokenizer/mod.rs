//! Tokenizers and chat templates.
//!
//! Encoding and decoding are done by Hugging Face's `tokenizers` crate. A tokenizer comes either
//! from a Hugging Face folder (`tokenizer.json` + `tokenizer_config.json`, with
//! `generation_config.json` and `config.json` for more end-of-sequence ids), or from GGUF metadata,
//! which [`gguf`] turns into an equivalent `tokenizer.json`. [`Tokenizer::write_files`] writes the
//! folder form back out, so a GGUF model can be served from a Hugging Face–layout folder.
//!
//! BOS is handled here, not by the `tokenizer.json` post-processor: [`Tokenizer::encode`] always
//! encodes without the post-processor's special tokens and prepends BOS itself when asked and the
//! model wants one (`add_bos_token`), so both sources behave the same.

mod chat;
mod gguf;
mod stream;

use std::path::Path;
use std::str::FromStr;

use serde_json::Value as Json;

pub use chat::{ChatMessage, ChatTemplate};
pub use stream::StreamDecoder;

use crate::error::{Error, Result};

/// Token texts that end an assistant turn in the chat formats we know; a special token with one of
/// these texts stops generation even where the config names only one EOS id.
const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<|EOT|>",
    "<end_of_turn>",
    "<｜end▁of▁sentence｜>",
    "</s>",
];

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<ChatTemplate>,
    /// A template that does not compile: its source (kept when the folder is written out) and the
    /// error, reported only when `--chat` needs it, so plain prompts still run.
    broken_template: Option<(String, String)>,
    bos_token: Option<String>,
    bos_id: Option<u32>,
    /// The text of the primary end-of-sequence token, as templates see it.
    eos_token: Option<String>,
    /// Every id that ends generation, the primary EOS first.
    eos_ids: Vec<u32>,
    add_bos: bool,
    vocab_size: usize,
}

/// What the model's configuration says about special tokens, before it is checked against the vocabulary.
struct Specials {
    bos_token: Option<String>,
    bos_id: Option<u32>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
    add_bos: Option<bool>,
}

impl Tokenizer {
    /// Loads a Hugging Face tokenizer folder: `tokenizer.json` (required), `tokenizer_config.json`
    /// (chat template, BOS/EOS tokens, `add_bos_token`), `chat_template.jinja` (newer transformers
    /// keep the template there), `generation_config.json` and `config.json` (EOS/BOS ids).
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&tokenizer_path)
            .map_err(|e| Error::io("reading the tokenizer (tokenizer.json)", &tokenizer_path, e))?;
        let inner = tokenizers::Tokenizer::from_str(&text).map_err(|e| {
            Error::format(
                &tokenizer_path,
                format!("not a valid Hugging Face tokenizer.json: {e}"),
            )
        })?;

        let config = read_json_if_present(&dir.join("tokenizer_config.json"))?;
        let generation = read_json_if_present(&dir.join("generation_config.json"))?;
        let model_config = read_json_if_present(&dir.join("config.json"))?;

        let mut template = config
            .get("chat_template")
            .map(template_source)
            .transpose()?
            .flatten();
        if template.is_none() {
            let jinja = dir.join("chat_template.jinja");
            if jinja.is_file() {
                let source = std::fs::read_to_string(&jinja)
                    .map_err(|e| Error::io("reading the chat template", &jinja, e))?;
                template = Some(source);
            }
        }

        let token_id = |t: &str| inner.token_to_id(t);
        let bos_token = config.get("bos_token").and_then(token_text);
        let bos_id = bos_token.as_deref().and_then(token_id).or_else(|| {
            [&generation, &model_config]
                .iter()
                .find_map(|c| c.get("bos_token_id").and_then(json_u32))
        });
        let eos_token = config.get("eos_token").and_then(token_text);
        let mut eos_ids: Vec<u32> = eos_token
            .as_deref()
            .and_then(token_id)
            .into_iter()
            .collect();
        for c in [&generation, &model_config] {
            match c.get("eos_token_id") {
                Some(Json::Array(ids)) => eos_ids.extend(ids.iter().filter_map(json_u32)),
                Some(id) => eos_ids.extend(json_u32(id)),
                None => {}
            }
        }
        let add_bos = config.get("add_bos_token").and_then(Json::as_bool);
        let specials = Specials {
            bos_token: bos_token.or_else(|| bos_id.and_then(|id| inner.id_to_token(id))),
            bos_id,
            eos_token,
            eos_ids,
            add_bos,
        };
        Self::assemble(inner, template, specials)
    }

    /// Builds the tokenizer from GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).
    /// Only byte-level BPE vocabularies (`tokenizer.ggml.model` = `gpt2`) are supported.
    pub fn from_gguf_metadata(
        meta: &std::collections::BTreeMap<String, crate::formats::gguf::MetaValue>,
    ) -> Result<Self> {
        let (inner, template, specials) = gguf::build(meta)?;
        Self::assemble(inner, template, specials)
    }

    /// Checks the special tokens against the vocabulary and fills in what the config left implicit.
    fn assemble(
        mut inner: tokenizers::Tokenizer,
        template: Option<String>,
        specials: Specials,
    ) -> Result<Self> {
        // Encoding must never silently truncate or pad a prompt.
        inner
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(format!("cannot disable truncation: {e}")))?;
        inner.with_padding(None);

        let added = inner.get_added_tokens_decoder();
        let max_added = added.keys().max().map_or(0, |&id| id as usize + 1);
        let vocab_size = inner.get_vocab_size(false).max(max_added);
        for id in specials.bos_id.iter().chain(&specials.eos_ids) {
            if *id as usize >= vocab_size {
                return Err(Error::Tokenizer(format!(
                    "special token id {id} is outside the vocabulary of {vocab_size} tokens"
                )));
            }
        }

        let mut eos_ids = Vec::new();
        let mut end_of_turn: Vec<u32> = added
            .iter()
            .filter(|(_, t)| t.special && END_OF_TURN_TOKENS.contains(&t.content.as_str()))
            .map(|(&id, _)| id)
            .collect();
        end_of_turn.sort_unstable();
        for id in specials.eos_ids.into_iter().chain(end_of_turn) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        let eos_token = specials
            .eos_token
            .or_else(|| eos_ids.first().and_then(|&id| inner.id_to_token(id)));

        // Without an explicit add_bos_token, the model wants BOS if its post-processor adds it.
        let add_bos = match (specials.add_bos, specials.bos_id) {
            (Some(add), _) => add,
            (None, Some(bos)) => {
                let ids = |special| {
                    inner
                        .encode_fast("a", special)
                        .map(|e| e.get_ids().to_vec())
                };
                match (ids(true), ids(false)) {
                    (Ok(with), Ok(without)) => with.len() > without.len() && with[0] == bos,
                    _ => false,
                }
            }
            (None, None) => false,
        };
        if add_bos && specials.bos_id.is_none() {
            return Err(Error::Tokenizer(
                "the config asks for a BOS token (add_bos_token) but names none".into(),
            ));
        }

        let (chat_template, broken_template) = match template.map(|t| (t.clone(), ChatTemplate::new(t))) {
            None => (None, None),
            Some((_, Ok(t))) => (Some(t), None),
            Some((source, Err(Error::Template(msg)))) => (None, Some((source, msg))),
            Some((source, Err(e))) => (None, Some((source, e.to_string()))),
        };
        Ok(Tokenizer {
            inner,
            chat_template,
            broken_template,
            bos_token: specials.bos_token,
            bos_id: specials.bos_id,
            eos_token,
            eos_ids,
            add_bos,
            vocab_size,
        })
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) are recognised.
    /// With `add_bos`, BOS is prepended if the model wants one and the text does not already start
    /// with it (chat templates often write it themselves).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(format!("encoding failed: {e}")))?;
        let ids = encoding.get_ids();
        match self.bos_id {
            Some(bos) if add_bos && self.add_bos && ids.first() != Some(&bos) => {
                let mut with_bos = Vec::with_capacity(ids.len() + 1);
                with_bos.push(bos);
                with_bos.extend_from_slice(ids);
                Ok(with_bos)
            }
            _ => Ok(ids.to_vec()),
        }
    }

    /// The text of `ids`; with `skip_special`, special tokens (BOS, `<|im_end|>`, ...) are left out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(Error::Tokenizer(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                self.vocab_size
            )));
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(format!("decoding failed: {e}")))
    }

    /// Incremental decoding for streamed output; see [`StreamDecoder`].
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder<'_> {
        StreamDecoder::new(self, skip_special)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// How many token ids the tokenizer knows (the embedding matrix may have more rows).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Every id that ends generation: the configured EOS ids first, then special end-of-turn
    /// tokens such as `<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Whether the model expects a BOS token at the start of its input.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The prompt text for `messages` per the model's chat template. The text contains every
    /// special token the template writes (BOS included), so encode it with `add_bos` = false or
    /// rely on [`encode`](Self::encode) not doubling a BOS.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        if let Some((_, error)) = &self.broken_template {
            return Err(Error::Template(format!(
                "{error}; fix the model's chat template, or run without --chat and give the prompt as raw text"
            )));
        }
        let template = self.chat_template.as_ref().ok_or_else(|| {
            Error::Template(
                "this model has no chat template (no chat_template in tokenizer_config.json or \
                 tokenizer.chat_template in the GGUF); give a raw prompt instead"
                    .into(),
            )
        })?;
        template.render(
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir` (created if missing), in the
    /// form [`from_folder`](Self::from_folder) and transformers' `PreTrainedTokenizerFast` read.
    /// EOS ids beyond `eos_token` and the end-of-turn tokens belong in `generation_config.json`,
    /// which the model writer owns.
    pub fn write_files(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io("creating the tokenizer folder", dir, e))?;
        let tokenizer_json = self
            .inner
            .to_string(false)
            .map_err(|e| Error::Tokenizer(format!("serializing tokenizer.json: {e}")))?;
        // Through a temporary file and a rename: an interrupt never leaves a half tokenizer.
        let path = dir.join("tokenizer.json");
        crate::formats::hf::write_atomically(&path, tokenizer_json.as_bytes())?;

        let config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": false,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "clean_up_tokenization_spaces": false,
            "chat_template": self
                .chat_template
                .as_ref()
                .map(ChatTemplate::source)
                .or(self.broken_template.as_ref().map(|(source, _)| source.as_str())),
        });
        let path = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&config)
            .map_err(|e| Error::Tokenizer(format!("serializing tokenizer_config.json: {e}")))?;
        crate::formats::hf::write_atomically(&path, text.as_bytes())
    }
}

/// The parsed file, or an empty object if it does not exist.
fn read_json_if_present(path: &Path) -> Result<Json> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Json::Null),
        Err(e) => return Err(Error::io("reading", path, e)),
    };
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))
}

/// A token given as `"<s>"` or as `{"content": "<s>", ...}` (an AddedToken).
fn token_text(value: &Json) -> Option<String> {
    match value {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

fn json_u32(value: &Json) -> Option<u32> {
    value.as_u64().and_then(|v| u32::try_from(v).ok())
}

/// `chat_template` is a string, or a list of `{"name", "template"}` of which we take "default".
fn template_source(value: &Json) -> Result<Option<String>> {
    match value {
        Json::Null => Ok(None),
        Json::String(s) => Ok(Some(s.clone())),
        Json::Array(named) => {
            let default = named
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .or_else(|| named.first());
            Ok(default.and_then(|t| t.get("template")).and_then(Json::as_str).map(str::to_string))
        }
        _ => Err(Error::Template(
            "chat_template in tokenizer_config.json is neither a string nor a list of named templates"
                .into(),
        )),
    }
}
