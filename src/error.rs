//! One error type for the whole crate. Every file or device error says what was being done and to what.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file whose bytes do not make sense: bad magic, truncated, inconsistent offsets.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// Valid input we do not handle (an architecture, a tensor type); the message says what is supported.
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("model config: {0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("GPU: {0}")]
    Gpu(String),
    /// A request that cannot be served as asked (prompt longer than the context, budget too small).
    #[error("{0}")]
    Invalid(String),
    #[error("fetching {what}: {msg}")]
    Fetch { what: String, msg: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            context,
            path: path.into(),
            source,
        }
    }

    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
