//! Tokenizers built from the real GGUF files: special tokens, exact round trips, the BPE splits the
//! Hugging Face tokenizers give, chat templates, the folder round trip, streaming, and errors.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use q4wgpu::fetch::{self, KnownModel};
use q4wgpu::formats::gguf::{read_header, MetaValue};
use q4wgpu::tokenizer::{ChatMessage, Tokenizer};
use q4wgpu::Error;

/// The metadata of a real model file, fetched (once, into the cache) if needed. A file that cannot
/// be had fails the test.
fn metadata(model: &KnownModel) -> BTreeMap<String, MetaValue> {
    let path = fetch::ensure(model).unwrap_or_else(|e| panic!("{}: {e}", model.name));
    read_header(&path)
        .unwrap_or_else(|e| panic!("{e}"))
        .metadata
}

fn load(model: &KnownModel) -> Tokenizer {
    Tokenizer::from_gguf_metadata(&metadata(model))
        .unwrap_or_else(|e| panic!("{}: {e}", model.name))
}

fn qwen() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| load(&fetch::QWEN25_CODER_05B))
}

fn smollm() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| load(&fetch::SMOLLM2_135M))
}

fn deepseek() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| load(&fetch::DEEPSEEK_R1_QWEN_HEADER))
}

/// The token strings (byte-level alphabet: Ġ is a space, Ċ a newline) of `text`.
fn pieces(tok: &Tokenizer, text: &str) -> Vec<String> {
    let ids = tok.encode(text, false).unwrap();
    ids.iter().map(|&id| tok.id_to_token(id).unwrap()).collect()
}

fn user(content: &str) -> Vec<ChatMessage> {
    vec![ChatMessage::new("user", content)]
}

/// A fresh, empty scratch folder.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("q4wgpu-tokenizer-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const ROUND_TRIP_TEXTS: &[&str] = &[
    "中文分词测试：我们今天去北京大学吃烤鸭，好吗？",
    "def f(x):\n\tif x:\n\t\treturn [1,\t2]\n    else:\n  \t  pass\n",
    "family 👨‍👩‍👧‍👦, flags 🇯🇵🇫🇷, thumbs 👍🏽, snake 🐍",
    "a  b   c    \r\n\r\ntrailing   \n\u{a0}nbsp\u{a0}\u{a0}and\u{3000}ideographic space ",
    "3.14159 1,000,000 -42 0x1F 1e-9 ٣٤٥ ½",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "",
    " ",
    "\n",
];

fn assert_round_trips(tok: &Tokenizer) {
    for text in ROUND_TRIP_TEXTS {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(&tok.decode(&ids, false).unwrap(), text, "ids {ids:?}");
    }
}

#[test]
fn qwen_special_tokens() {
    let tok = qwen();
    assert_eq!(tok.encode("<|im_start|>", false).unwrap(), [151644]);
    assert_eq!(tok.encode("<|im_end|>", false).unwrap(), [151645]);
    assert_eq!(tok.encode("<|endoftext|>", false).unwrap(), [151643]);
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(ids.first(), Some(&151644));
    assert_eq!(ids.last(), Some(&151645));
    assert_eq!(tok.eos_ids(), [151645, 151643]);
    assert_eq!(tok.bos_id(), Some(151643));
    assert!(!tok.add_bos());
    assert_eq!(
        tok.encode("hi", true).unwrap(),
        tok.encode("hi", false).unwrap(),
        "Qwen adds no BOS"
    );
    assert_eq!(tok.vocab_size(), 151936);
    // <tool_call> is user-defined: recognised in the text, but not special.
    assert_eq!(tok.encode("<tool_call>", false).unwrap(), [151657]);
    assert_eq!(tok.decode(&[151657, 151645], true).unwrap(), "<tool_call>");
}

#[test]
fn qwen_round_trips_exactly() {
    assert_round_trips(qwen());
}

#[test]
fn qwen_splits_like_the_hf_tokenizer() {
    let tok = qwen();
    assert_eq!(pieces(tok, "Hello world"), ["Hello", "Ġworld"]);
    assert_eq!(tok.encode("Hello world", false).unwrap(), [9707, 1879]);
    assert_eq!(pieces(tok, " hello"), ["Ġhello"]);
    assert_eq!(pieces(tok, "12345"), ["1", "2", "3", "4", "5"]);
    // Contractions are case-insensitive in Qwen2's pattern.
    assert_eq!(pieces(tok, "I'M"), ["I", "'M"]);
    // Whitespace before a word leaves its last space to the word.
    assert_eq!(pieces(tok, "    return x"), ["ĠĠĠ", "Ġreturn", "Ġx"]);
    assert_eq!(pieces(tok, "a\n\nb"), ["a", "ĊĊ", "b"]);
    // Merges really run: common English needs far fewer tokens than bytes.
    let text = "The quick brown fox jumps over the lazy dog because it wanted to.";
    assert!(tok.encode(text, false).unwrap().len() < text.len() / 3);
}

#[test]
fn qwen_chat_template_renders_chatml_with_default_system_prompt() {
    let tok = qwen();
    assert!(tok.has_chat_template());
    let text = tok.apply_chat_template(&user("1.1+2.3=?"), true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\n1.1+2.3=?<|im_end|>\n<|im_start|>assistant\n"
    );
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("assistant", "Hello."),
    ];
    let text = tok.apply_chat_template(&messages, false).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello.<|im_end|>\n"
    );
}

#[test]
fn smollm_loads_and_round_trips() {
    let tok = smollm();
    assert_round_trips(tok);
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.encode("<|im_start|>", false).unwrap(), [1]);
    assert_eq!(tok.eos_ids(), [2, 0]);
    assert!(!tok.add_bos());
    // SmolLM splits digits one by one and uses GPT-2's case-sensitive contractions.
    assert_eq!(pieces(tok, "12345"), ["1", "2", "3", "4", "5"]);
    assert_eq!(pieces(tok, "I'M"), ["I", "'", "M"]);
    assert_eq!(pieces(tok, "Hello world"), ["Hello", "Ġworld"]);
    let text = tok.apply_chat_template(&user("Hi"), true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn deepseek_header_tokenizer_and_template() {
    let tok = deepseek();
    assert_eq!(tok.bos_id(), Some(151646));
    assert!(tok.add_bos());
    assert_eq!(tok.eos_ids().first(), Some(&151643));
    let text = tok.apply_chat_template(&user("1+1?"), true).unwrap();
    assert_eq!(text, "<｜begin▁of▁sentence｜><｜User｜>1+1?<｜Assistant｜>");
    // The template writes BOS itself; encode must not add a second one.
    let ids = tok.encode(&text, true).unwrap();
    assert_eq!(ids[..2], [151646, 151644]);
    assert_eq!(ids.last(), Some(&151645));
    assert_eq!(tok.encode("x", true).unwrap()[0], 151646);
    // Earlier replies lose their reasoning (the template calls content.split('</think>')).
    let messages = [
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("assistant", "<think>\nthinking\n</think>\n\nHello!"),
        ChatMessage::new("user", "Bye"),
    ];
    let text = tok.apply_chat_template(&messages, true).unwrap();
    assert_eq!(
        text,
        "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>\n\nHello!<｜end▁of▁sentence｜><｜User｜>Bye<｜Assistant｜>"
    );
    assert_round_trips(tok);
}

#[test]
fn written_folder_reads_back_identically() {
    for (name, tok) in [("qwen", qwen()), ("deepseek", deepseek())] {
        let dir = scratch_dir(name);
        tok.write_files(&dir).unwrap();
        let back = Tokenizer::from_folder(&dir).unwrap();
        assert_eq!(back.vocab_size(), tok.vocab_size(), "{name}");
        assert_eq!(back.eos_ids(), tok.eos_ids(), "{name}");
        assert_eq!(back.bos_id(), tok.bos_id(), "{name}");
        assert_eq!(back.add_bos(), tok.add_bos(), "{name}");
        for text in ROUND_TRIP_TEXTS
            .iter()
            .chain(&["I'M 12345 Hello world", "<think>x</think>"])
        {
            for add_bos in [false, true] {
                let ids = tok.encode(text, add_bos).unwrap();
                assert_eq!(back.encode(text, add_bos).unwrap(), ids, "{name}: {text:?}");
                assert_eq!(
                    back.decode(&ids, true).unwrap(),
                    tok.decode(&ids, true).unwrap()
                );
            }
        }
        for add_generation_prompt in [false, true] {
            let messages = [
                ChatMessage::new("system", "S"),
                ChatMessage::new("user", "U"),
            ];
            assert_eq!(
                back.apply_chat_template(&messages, add_generation_prompt)
                    .unwrap(),
                tok.apply_chat_template(&messages, add_generation_prompt)
                    .unwrap(),
                "{name}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn stream_decoder_emits_whole_characters() {
    let tok = qwen();
    let text = "Emoji 👨‍👩‍👧 and 🇯🇵 then 中文字符「測試」 ok 🐍!";
    let ids = tok.encode(text, false).unwrap();
    let mut stream = tok.stream_decoder(false);
    let mut out = String::new();
    let mut held_back = 0;
    for &id in &ids {
        match stream.push(id).unwrap() {
            Some(piece) => {
                assert!(
                    !piece.contains('\u{fffd}'),
                    "piece {piece:?} has a replacement character"
                );
                out.push_str(&piece);
            }
            None => held_back += 1,
        }
    }
    out.extend(stream.flush().unwrap());
    assert_eq!(out, tok.decode(&ids, false).unwrap());
    assert_eq!(out, text);
    assert!(
        held_back > 0,
        "no token ended mid-character, so the test proves nothing"
    );
}

#[test]
fn stream_decoder_skips_special_tokens_and_flushes_incomplete_bytes() {
    let tok = qwen();
    let mut ids = tok.encode("<|im_start|>Hi 🐍", false).unwrap();
    ids.pop(); // cut the emoji short
    let mut stream = tok.stream_decoder(true);
    let mut out = String::new();
    for &id in &ids {
        out.extend(stream.push(id).unwrap());
    }
    assert_eq!(
        out, "Hi",
        "the space shares a token with the emoji's first bytes"
    );
    let rest = stream.flush().unwrap().unwrap();
    assert_eq!(out + &rest, tok.decode(&ids, true).unwrap());
    assert!(rest.ends_with('\u{fffd}'));
}

/// Ids of the tiny vocabulary: the 256 byte tokens (id = byte value), then "ab", "<eos>", "<s>".
const AB: u32 = 256;
const EOS: u32 = 257;
const S: u32 = 258;

/// GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the others for
/// U+0100 onwards in byte order.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
    if printable(b) {
        b as char
    } else {
        let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + rank).unwrap()
    }
}

/// A tiny byte-level vocabulary with one merge ("a b") and two control tokens, no BOS id.
fn tiny_metadata(model: &str, pre: &str) -> BTreeMap<String, MetaValue> {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    tokens.extend(["ab", "<eos>", "<s>"].map(String::from));
    let mut types = vec![MetaValue::I32(1); 257];
    types.extend([MetaValue::I32(3), MetaValue::I32(3)]);
    let string = |s: &str| MetaValue::String(s.to_string());
    BTreeMap::from([
        ("tokenizer.ggml.model".to_string(), string(model)),
        ("tokenizer.ggml.pre".to_string(), string(pre)),
        (
            "tokenizer.ggml.tokens".to_string(),
            MetaValue::Array(tokens.iter().map(|t| string(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            MetaValue::Array(types),
        ),
        (
            "tokenizer.ggml.merges".to_string(),
            MetaValue::Array(vec![string("a b")]),
        ),
        (
            "tokenizer.ggml.eos_token_id".to_string(),
            MetaValue::U32(EOS),
        ),
    ])
}

#[test]
fn tiny_vocabulary_merges_and_has_no_template() {
    let tok = Tokenizer::from_gguf_metadata(&tiny_metadata("gpt2", "gpt2")).unwrap();
    assert_eq!(tok.encode("abab<eos>", true).unwrap(), [AB, AB, EOS]);
    assert_eq!(tok.eos_ids(), [EOS]);
    assert_eq!(tok.bos_id(), None);
    let err = tok.apply_chat_template(&user("x"), true).unwrap_err();
    assert!(
        matches!(err, Error::Template(ref m) if m.contains("no chat template")),
        "{err}"
    );
    let err = tok.decode(&[S + 1], false).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}

#[test]
fn every_supported_pre_tokenizer_builds_and_round_trips() {
    for pre in [
        "qwen2",
        "deepseek-r1-qwen",
        "llama-bpe",
        "llama3",
        "smollm",
        "gpt2",
        "default",
    ] {
        let tok = Tokenizer::from_gguf_metadata(&tiny_metadata("gpt2", pre)).unwrap();
        let text = "ab I'M 1234 \u{a0}\r\n  \t中 🐍<eos>";
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "{pre}");
        assert_eq!(ids[0], AB, "{pre}: \"ab\" is merged");
    }
}

#[test]
fn unknown_pre_tokenizer_is_refused() {
    let err = Tokenizer::from_gguf_metadata(&tiny_metadata("gpt2", "tekken"))
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(matches!(err, Error::Unsupported(_)), "{msg}");
    assert!(
        msg.contains("tekken") && msg.contains("qwen2") && msg.contains("smollm"),
        "{msg}"
    );
}

#[test]
fn sentencepiece_gguf_is_refused() {
    let err = Tokenizer::from_gguf_metadata(&tiny_metadata("llama", "default"))
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(matches!(err, Error::Unsupported(_)), "{msg}");
    assert!(msg.contains("\"llama\"") && msg.contains("gpt2"), "{msg}");
}

#[test]
fn missing_or_corrupt_tokenizer_json_is_reported() {
    let dir = scratch_dir("broken");
    let err = Tokenizer::from_folder(&dir).err().unwrap();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    std::fs::write(
        dir.join("tokenizer.json"),
        "{\"model\": {\"type\": \"BPE\", ",
    )
    .unwrap();
    let err = Tokenizer::from_folder(&dir).err().unwrap();
    assert!(
        matches!(err, Error::Format { ref path, .. } if path.ends_with("tokenizer.json")),
        "{err}"
    );

    let tiny = Tokenizer::from_gguf_metadata(&tiny_metadata("gpt2", "gpt2")).unwrap();
    tiny.write_files(&dir).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), "not json").unwrap();
    let err = Tokenizer::from_folder(&dir).err().unwrap();
    assert!(
        matches!(err, Error::Format { ref path, .. } if path.ends_with("tokenizer_config.json")),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn folder_config_variants_are_understood() {
    let dir = scratch_dir("variants");
    Tokenizer::from_gguf_metadata(&tiny_metadata("gpt2", "gpt2"))
        .unwrap()
        .write_files(&dir)
        .unwrap();
    let config = serde_json::json!({
        "bos_token": {"content": "a", "special": true},
        "eos_token": "<eos>",
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{% for m in messages %}{{ m.role }}:{{ m.content }}{% endfor %}{{ bos_token }}"},
        ],
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        format!("{{\"eos_token_id\": [{EOS}, 1]}}"),
    )
    .unwrap();
    let tok = Tokenizer::from_folder(&dir).unwrap();
    assert_eq!(tok.bos_id(), Some(b'a' as u32));
    assert_eq!(tok.eos_ids(), [EOS, 1]);
    assert!(
        !tok.add_bos(),
        "no add_bos_token and no post-processor adding BOS"
    );
    assert_eq!(
        tok.apply_chat_template(&user("x"), false).unwrap(),
        "user:xa"
    );

    let raising = serde_json::json!({
        "chat_template": "{% if messages[0].role != 'system' %}{{ raise_exception('Conversations must start with a system message') }}{% endif %}",
    });
    std::fs::write(dir.join("tokenizer_config.json"), raising.to_string()).unwrap();
    let tok = Tokenizer::from_folder(&dir).unwrap();
    let err = tok.apply_chat_template(&user("x"), true).unwrap_err();
    assert!(
        matches!(err, Error::Template(ref m) if m.contains("Conversations must start with a system message")),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bos_from_the_post_processor_when_config_is_silent() {
    // Hugging Face folders such as Llama 3's add BOS through a TemplateProcessing post-processor.
    let dir = scratch_dir("post-processor");
    Tokenizer::from_gguf_metadata(&tiny_metadata("gpt2", "gpt2"))
        .unwrap()
        .write_files(&dir)
        .unwrap();
    let path = dir.join("tokenizer.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [S], "tokens": ["<s>"]}},
    });
    std::fs::write(&path, json.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": "<eos>"}"#,
    )
    .unwrap();
    let tok = Tokenizer::from_folder(&dir).unwrap();
    assert_eq!(tok.bos_id(), Some(S));
    assert!(tok.add_bos());
    assert_eq!(tok.encode("ab", true).unwrap(), [S, AB]);
    assert_eq!(tok.encode("ab", false).unwrap(), [AB]);
    assert_eq!(tok.encode("<s>ab", true).unwrap(), [S, AB], "no second BOS");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A template from a model file cannot hang the program: nested loops of 10^8 steps run out of
/// fuel with an error in well under a second, while a real template over a long chat renders.
#[test]
fn a_runaway_chat_template_is_stopped_by_its_fuel() {
    use q4wgpu::tokenizer::{ChatMessage, ChatTemplate};
    let runaway = ChatTemplate::new(
        "{% for a in range(10000) %}{% for b in range(10000) %}x{% endfor %}{% endfor %}".into(),
    )
    .expect("compiles");
    let start = std::time::Instant::now();
    let err = runaway
        .render(&[ChatMessage::new("user", "hi")], true, "", "")
        .expect_err("must run out of fuel");
    assert!(start.elapsed().as_secs_f64() < 5.0, "{:?}", start.elapsed());
    assert!(err.to_string().contains("fuel"), "{err}");
    let chatml = ChatTemplate::new(q4wgpu::test_models::CHATML_TEMPLATE.into()).expect("compiles");
    let long: Vec<ChatMessage> = (0..500)
        .map(|i| ChatMessage::new(if i % 2 == 0 { "user" } else { "assistant" }, "a message"))
        .collect();
    let text = chatml.render(&long, true, "", "").expect("a long chat renders");
    assert_eq!(text.matches("<|im_start|>").count(), 501);
}
