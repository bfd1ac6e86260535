//! GGUF vocabularies → the equivalent Hugging Face tokenizer (what its `tokenizer.json` would say).
//!
//! llama.cpp's converter stores a byte-level BPE tokenizer (`tokenizer.ggml.model` = `gpt2`) as
//! token strings (already in the GPT-2 byte-to-unicode alphabet, `Ġ` for space), a type per token
//! (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), the merge list ("a b"), and
//! `tokenizer.ggml.pre`, the name of the pre-tokenizer regex the model was trained with. We rebuild:
//! - model: BPE over all tokens and merges, no byte fallback;
//! - pre-tokenizer: the `pre` regex split(s) (Isolated), then ByteLevel without its own regex;
//! - decoder: ByteLevel; no normalizer, no post-processor (BOS is added by `Tokenizer::encode`);
//! - added tokens: control tokens (special) and user-defined ones (not special, e.g. `<think>`),
//!   matched verbatim in the input before BPE.

use std::collections::BTreeMap;

use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::AddedToken;
use tokenizers::SplitDelimiterBehavior::Isolated;

use super::Specials;
use crate::error::{Error, Result};
use crate::formats::gguf::MetaValue;

const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// GPT-2's split: contractions, letters, digits, other symbols (each with one optional leading
/// space), whitespace.
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Qwen2: case-insensitive contractions, letters with one leading non-letter, single digits,
/// symbols absorbing trailing newlines, newline runs, whitespace.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3: as Qwen2 but digits in groups of up to three.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// SmolLM (StarCoder family): every digit on its own, then GPT-2's split.
const SINGLE_DIGIT_PATTERN: &str = r"\p{N}";

const SUPPORTED_PRE: &str = "qwen2, deepseek-r1-qwen, llama-bpe, llama3, smollm, gpt2, default";

/// The regex splits applied in order, and whether a word already in the vocabulary skips the
/// merges (Llama 3's tokenizer.json sets `ignore_merges`).
fn pre_tokenizer(pre: &str) -> Result<(Vec<&'static str>, bool)> {
    match pre {
        "qwen2" | "deepseek-r1-qwen" => Ok((vec![QWEN2_PATTERN], false)),
        "llama-bpe" | "llama3" => Ok((vec![LLAMA3_PATTERN], true)),
        "smollm" => Ok((vec![SINGLE_DIGIT_PATTERN, GPT2_PATTERN], false)),
        "gpt2" | "default" => Ok((vec![GPT2_PATTERN], false)),
        other => Err(Error::Unsupported(format!(
            "GGUF pre-tokenizer tokenizer.ggml.pre = {other:?}; supported: {SUPPORTED_PRE}"
        ))),
    }
}

fn missing(key: &str) -> Error {
    Error::Tokenizer(format!(
        "GGUF metadata has no {key} (or it has the wrong type)"
    ))
}

fn get_str<'a>(meta: &'a BTreeMap<String, MetaValue>, key: &str) -> Result<&'a str> {
    meta.get(key)
        .and_then(MetaValue::as_str)
        .ok_or_else(|| missing(key))
}

fn get_strings<'a>(meta: &'a BTreeMap<String, MetaValue>, key: &str) -> Result<Vec<&'a str>> {
    let array = meta
        .get(key)
        .and_then(MetaValue::as_array)
        .ok_or_else(|| missing(key))?;
    array
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .ok_or_else(|| Error::Tokenizer(format!("GGUF {key}[{i}] is not a string")))
        })
        .collect()
}

/// An optional token id; present but not a valid id is an error.
fn get_id(meta: &BTreeMap<String, MetaValue>, key: &str, n_tokens: usize) -> Result<Option<u32>> {
    let Some(value) = meta.get(key) else {
        return Ok(None);
    };
    match value.as_u64() {
        Some(id) if (id as usize) < n_tokens => Ok(Some(id as u32)),
        _ => Err(Error::Tokenizer(format!(
            "GGUF {key} = {value:?} is not a token id below the vocabulary size {n_tokens}"
        ))),
    }
}

/// The tokenizer, its chat template and its special tokens, from GGUF metadata.
pub(super) fn build(
    meta: &BTreeMap<String, MetaValue>,
) -> Result<(tokenizers::Tokenizer, Option<String>, Specials)> {
    let model = get_str(meta, "tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(Error::Unsupported(format!(
            "GGUF tokenizer model {model:?} (tokenizer.ggml.model); only byte-level BPE (\"gpt2\") \
             is supported, not SentencePiece (\"llama\") or others"
        )));
    }
    let pre = meta
        .get("tokenizer.ggml.pre")
        .and_then(MetaValue::as_str)
        .unwrap_or("default");
    let (patterns, ignore_merges) = pre_tokenizer(pre)?;

    let tokens = get_strings(meta, "tokenizer.ggml.tokens")?;
    let n = tokens.len();
    let types: Vec<i64> = match meta.get("tokenizer.ggml.token_type") {
        None => vec![1; n],
        Some(v) => {
            let array = v
                .as_array()
                .ok_or_else(|| missing("tokenizer.ggml.token_type"))?;
            if array.len() != n {
                return Err(Error::Tokenizer(format!(
                    "GGUF tokenizer.ggml.token_type has {} entries for {n} tokens",
                    array.len()
                )));
            }
            array.iter().map(|t| t.as_i64().unwrap_or(1)).collect()
        }
    };
    let merges = get_strings(meta, "tokenizer.ggml.merges")?;

    let mut vocab = Vocab::with_capacity(n);
    for (id, token) in tokens.iter().enumerate() {
        if vocab.insert(token.to_string(), id as u32).is_some() {
            return Err(Error::Tokenizer(format!(
                "GGUF vocabulary has the token {token:?} twice (second at id {id})"
            )));
        }
    }
    let merges: Merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
                Ok((a.to_string(), b.to_string()))
            }
            _ => Err(Error::Tokenizer(format!(
                "GGUF tokenizer.ggml.merges[{i}] = {m:?} is not two tokens separated by one space"
            ))),
        })
        .collect::<Result<_>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| {
            Error::Tokenizer(format!(
                "the GGUF vocabulary does not make a BPE model: {e}"
            ))
        })?;

    let mut steps = Vec::with_capacity(patterns.len() + 1);
    for pattern in patterns {
        let split = Split::new(SplitPattern::Regex(pattern.to_string()), Isolated, false)
            .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex for {pre:?}: {e}")))?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());

    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(steps)));
    tokenizer.with_decoder(Some(ByteLevel::new(false, false, false)));
    let added: Vec<AddedToken> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
        .map(|(id, &t)| AddedToken::from(tokens[id], t == TOKEN_TYPE_CONTROL).normalized(false))
        .collect();
    tokenizer.add_tokens(&added);

    let bos_id = get_id(meta, "tokenizer.ggml.bos_token_id", n)?;
    let mut eos_ids = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        eos_ids.extend(get_id(meta, key, n)?);
    }
    let add_bos = match meta.get("tokenizer.ggml.add_bos_token") {
        None => None,
        Some(v) => Some(
            v.as_bool()
                .ok_or_else(|| missing("tokenizer.ggml.add_bos_token"))?,
        ),
    };
    let specials = Specials {
        bos_token: bos_id.map(|id| tokens[id as usize].to_string()),
        bos_id,
        eos_token: eos_ids.first().map(|&id| tokens[id as usize].to_string()),
        eos_ids,
        // Without the key, llama.cpp adds BOS only for Llama 3 among the vocabularies we support.
        add_bos: Some(add_bos.unwrap_or(bos_id.is_some() && matches!(pre, "llama-bpe" | "llama3"))),
    };
    let template = meta
        .get("tokenizer.chat_template")
        .and_then(MetaValue::as_str)
        .map(str::to_string);
    Ok((tokenizer, template, specials))
}
