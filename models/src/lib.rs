//! Llama-family models for the STEPER toolchain, in candle.
//!
//! - [`LlamaConfig`]: the Hugging Face `config.json`; [`arch`]: the model families (Llama,
//!   Qwen2), each described once.
//! - [`Llama`]: the decoder; [`Llama::forward`] gives differentiable full-sequence logits for
//!   training, [`Llama::forward_cached`] extends a [`KvCache`] for generation.
//! - [`Weights`] / [`Checkpoint`]: named tensors, random init, single or sharded safetensors.
//! - [`gguf::import_gguf`]: a llama.cpp GGUF file to an HF-style checkpoint directory, with the
//!   tokenizer rebuilt from the GGUF metadata.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use steper_models::{Llama, LlamaConfig, Weights};
//!
//! let cfg = LlamaConfig::tiny(32);
//! let weights = Weights::random(&cfg, 0, &Device::Cpu)?;
//! let model = Llama::new(&cfg, &weights)?;
//! let ids = Tensor::new(&[[1u32, 5, 7]], &Device::Cpu)?;
//! let logits = model.forward(&ids, None)?;
//! assert_eq!(logits.dims(), &[1, 3, 32]);
//! # Ok::<(), steper_models::Error>(())
//! ```
#![warn(missing_docs)]

// Not called directly: the dependency turns on gemm's AVX-512 kernels (feature `x86-v4`) for
// every candle CPU matmul in the workspace (Cargo unifies features).
use gemm as _;

pub mod arch;
pub mod attention;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod dtype;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod lora;
pub mod model;
pub mod ops;
pub mod tokenizer;
pub mod weights;

pub use checkpoint::{copy_companion_files, load_tokenizer, Checkpoint, GenerationConfig};
pub use config::{LlamaConfig, RopeScaling, TokenIds};
pub use device::DeviceChoice;
pub use dtype::DTypeChoice;
pub use error::{Error, Result};
pub use generate::{
    generate, generate_text, GenerateOptions, Generation, Sampling, TextGeneration,
};
pub use lora::{LoraConfig, LoraTarget};
pub use model::{KvCache, Llama, SeqInputs};
pub use weights::Weights;
