//! Incremental detokenization for streamed output.
//!
//! Two things stop us from decoding each token on its own: a byte-level token can end in the middle
//! of a UTF-8 character (emoji and CJK characters are often split across tokens), and some decoders
//! change a token's text depending on what precedes it (SentencePiece drops the leading space of
//! the first token). So each step decodes the pending ids together with the ids of the previous
//! piece as context, and emits the text after the context's own text — but only once it does not
//! end in U+FFFD, the mark of an incomplete character.

use super::Tokenizer;
use crate::error::Result;

const INCOMPLETE: char = char::REPLACEMENT_CHARACTER;

pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    skip_special: bool,
    /// The ids of the last emitted piece (the context), then the ids not yet emitted.
    ids: Vec<u32>,
    /// How many leading `ids` are context.
    context: usize,
    /// The decoded text of the context ids alone.
    context_text: String,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tokenizer: &'a Tokenizer, skip_special: bool) -> Self {
        StreamDecoder {
            tokenizer,
            skip_special,
            ids: Vec::new(),
            context: 0,
            context_text: String::new(),
        }
    }

    /// Adds one generated token; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, self.skip_special)?;
        if text.ends_with(INCOMPLETE) {
            return Ok(None);
        }
        self.emit(text)
    }

    /// Emits whatever is still held back (an incomplete character at the end of generation comes
    /// out as U+FFFD, as [`Tokenizer::decode`] gives it).
    pub fn flush(&mut self) -> Result<Option<String>> {
        if self.ids.len() == self.context {
            return Ok(None);
        }
        let text = self.tokenizer.decode(&self.ids, self.skip_special)?;
        self.emit(text)
    }

    /// `text` is the decoding of all `ids`: emit its part after the context, and make the
    /// pending ids the new context.
    fn emit(&mut self, text: String) -> Result<Option<String>> {
        let piece = match text.strip_prefix(self.context_text.as_str()) {
            Some(piece) => piece.to_string(),
            // The decoder rewrote the context's text given what follows; the pending ids on their
            // own are the best we can do without retracting emitted text.
            None => self
                .tokenizer
                .decode(&self.ids[self.context..], self.skip_special)?,
        };
        self.ids.drain(..self.context);
        self.context = self.ids.len();
        self.context_text = self.tokenizer.decode(&self.ids, self.skip_special)?;
        Ok(Some(piece).filter(|p| !p.is_empty()))
    }
}
