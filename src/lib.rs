//! q4wgpu: INT4 large language models on any GPU through Vulkan (wgpu + WGSL).
//!
//! See ARCHITECTURE.md for the design in one page.

pub mod bench;
pub mod chat;
pub mod config;
pub mod cpu;
pub mod engine;
pub mod eval;
pub mod error;
pub mod fetch;
pub mod formats;
pub mod generate;
pub mod gpu;
pub mod interrupt;
pub mod kernels;
pub mod model;
pub mod quant;
pub mod quantize;
pub mod sampling;
pub mod scheduler;
pub mod serve;
pub mod synthetic;
pub mod test_models;
pub mod tokenizer;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use error::{Error, Result};
