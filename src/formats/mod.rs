//! Readers and writers of weight files: Hugging Face safetensors folders, GGUF, and our INT4 file.

pub mod gguf;
pub mod hf;
pub mod q4;
