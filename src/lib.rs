//! q4wgpu: INT4 large language models on any GPU through Vulkan (wgpu + WGSL).
//!
//! See ARCHITECTURE.md for the design in one page.

pub mod config;
pub mod error;
pub mod quant;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use error::{Error, Result};
pub mod gpu;
pub mod formats;
pub mod kernels;
pub mod fetch;
pub mod scheduler;
pub mod tokenizer;
