//! Chat templates: the Jinja programs that turn a conversation into the model's prompt text.
//!
//! Models ship them in `tokenizer_config.json` (`chat_template`) or in GGUF metadata
//! (`tokenizer.chat_template`). They are rendered with minijinja set up the way Hugging Face
//! transformers sets up Jinja2: `trim_blocks` and `lstrip_blocks` on, Python string methods
//! (`.strip()`, `.startswith()`, `.split()`, ...) through minijinja-contrib's pycompat callback,
//! a `raise_exception(msg)` function, a Python-style `tojson` filter, and the variables
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `tools` (none), `documents` (none).

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

use crate::error::{Error, Result};

/// One turn of a conversation: `role` is "system", "user" or "assistant" (templates may know more).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

const TEMPLATE_NAME: &str = "chat_template";

/// minijinja instructions a render may take: real templates need a few hundred per message.
const TEMPLATE_FUEL: u64 = 2_000_000;

/// A compiled chat template, with its source kept for writing it back out.
pub struct ChatTemplate {
    source: String,
    env: Environment<'static>,
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported here rather than at the first render.
    pub fn new(source: String) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // A template comes with the model file: bound its work, so a hostile or broken one
        // (nested loops) fails in well under a second instead of hanging.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| Error::Template(format!("the template does not compile: {e:#}")))?;
        Ok(ChatTemplate { source, env })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the prompt text for `messages`; with `add_generation_prompt` the text ends where
    /// the assistant's reply begins.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::Template(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
            tools => Value::from(()),
            documents => Value::from(()),
        };
        template
            .render(ctx)
            .map_err(|e| Error::Template(render_error_message(&e)))
    }
}

/// The error's message and, where minijinja has one, the chain of causes.
fn render_error_message(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// Templates call `raise_exception("...")` to reject conversations they cannot format.
fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("the template raised an exception: {msg}"),
    ))
}

/// `tojson` as transformers defines it: Python's `json.dumps` with `ensure_ascii=False`, so
/// `", "` and `": "` separators without `indent`, one item per line with it, and no HTML escaping
/// (minijinja's built-in filter escapes `<`, `>`, `&`, `'`).
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&value, indent, 0, &mut out)?;
    Ok(out)
}

fn write_json(
    value: &Value,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    };
    let item_separator = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&value.to_string()),
        ValueKind::String => write_json_string(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            let mut first = true;
            for item in value.try_iter()? {
                if !first {
                    out.push_str(item_separator);
                }
                first = false;
                newline(out, depth + 1);
                write_json(&item, indent, depth + 1, out)?;
            }
            if !first {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            let mut first = true;
            for key in value.try_iter()? {
                if !first {
                    out.push_str(item_separator);
                }
                first = false;
                newline(out, depth + 1);
                write_json_string(&key.to_string(), out);
                out.push_str(": ");
                write_json(&value.get_item(&key)?, indent, depth + 1, out)?;
            }
            if !first {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => write_json_string(&value.to_string(), out),
    }
    Ok(())
}

fn write_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str) -> Result<String> {
        let messages = [ChatMessage::new("user", "a <b> & \"c\"\n")];
        ChatTemplate::new(source.to_string())?.render(&messages, true, "<s>", "</s>")
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let out = render("{{ messages | tojson }}|{{ {'k': [1, true, none]} | tojson(indent=2) }}")
            .unwrap();
        assert_eq!(
            out,
            "[{\"role\": \"user\", \"content\": \"a <b> & \\\"c\\\"\\n\"}]|{\n  \"k\": [\n    1,\n    true,\n    null\n  ]\n}"
        );
    }

    #[test]
    fn blocks_are_trimmed_like_transformers() {
        let out = render("  {% if add_generation_prompt %}\nyes\n  {% endif %}\n{{ bos_token }}")
            .unwrap();
        assert_eq!(out, "yes\n<s>");
    }

    #[test]
    fn python_string_methods_work() {
        let out = render(
            "{{ messages[0].content.strip().startswith('a') }} {{ 'x</t>y'.split('</t>')[-1] }}",
        )
        .unwrap();
        assert_eq!(out, "True y");
    }

    #[test]
    fn raise_exception_becomes_a_template_error() {
        let err = render("{{ raise_exception('only user and assistant roles') }}").unwrap_err();
        assert!(
            matches!(err, Error::Template(ref m) if m.contains("only user and assistant roles")),
            "{err}"
        );
    }

    #[test]
    fn syntax_error_is_reported_at_load() {
        let err = ChatTemplate::new("{% if %}".to_string())
            .err()
            .expect("must fail");
        assert!(
            matches!(err, Error::Template(ref m) if m.contains("does not compile")),
            "{err}"
        );
    }
}
