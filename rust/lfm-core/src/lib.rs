//! lfm-core: LiquidAI's LFM2.5-VL on ONNX Runtime, in pure Rust.
//!
//! Preprocessing ([`preproc`]), options and errors build without ONNX Runtime
//! (`--no-default-features --features decoders`; without `decoders`, from pixel arrays only);
//! the engine needs the `inference` feature.

pub mod error;
pub mod options;
pub mod preproc;

pub use error::{Error, Result};
pub use options::{EngineOptions, ImageBudget, Limits, RequestOptions};
pub mod admission;
#[cfg(feature = "inference")]
pub mod chat;
#[cfg(feature = "inference")]
mod deep_stack;
#[cfg(feature = "inference")]
pub mod engine;
#[cfg(feature = "inference")]
pub mod field_ends;
#[cfg(feature = "inference")]
pub mod files;
#[cfg(feature = "decoders")]
pub mod fuzzing;
#[cfg(feature = "inference")]
pub mod grammar;
pub mod heap;
pub mod recycle;
pub mod request;
#[cfg(feature = "inference")]
pub mod runtime;
pub mod sampling;
#[cfg(feature = "inference")]
pub mod scheduler;
#[cfg(feature = "inference")]
pub mod sequence;
pub mod stream;
#[cfg(feature = "inference")]
pub mod tokenizer;
