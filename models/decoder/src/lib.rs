//! Qwen2 / Qwen2.5 text decoder in Burn, loaded from Hugging Face checkpoints.
//!
//! Architecture (transformers' `Qwen2ForCausalLM`, and the text model of Qwen2.5-Omni's
//! thinker): token embeddings, pre-norm decoder layers with RMSNorm, grouped-query attention
//! with q/k/v bias and rotary positions (1-D RoPE, or M-RoPE's temporal/height/width
//! sections), SwiGLU MLP, a final RMSNorm and a tied or untied LM head. A KV cache serves
//! decoding. [`Qwen2Model`] returns final hidden states; the core applies the head in chunks.
//!
//! Reference checkpoints: `Qwen/Qwen2.5-0.5B-Instruct` (`model.*`, tied head), and the
//! thinker's text model of `Qwen/Qwen2.5-Omni-7B`, which `omniopsd-thinker` hands to
//! [`Qwen2Model::load`] at its prefix.

use std::path::PathBuf;

mod config;
mod lora;
pub mod memory;
mod model;
mod placement;
mod policy;

pub use config::{Qwen2Config, RopeParameters, TokenIds};
pub use lora::{
    peft_prefix, LoraConfig, PeftAdapter, ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_TARGETS,
    TOWER_LINEARS,
};
pub use model::{text_positions, KvCache, Qwen2Model};
pub use placement::{ModuleMatch, Placement};
pub use policy::{
    argmax_first, check_tokenizer, load_tokenizer, BatchCache, DecoderCache, EmbeddingInserts,
    PromptPositions, TokenPrompt,
};

/// Errors from loading or running the decoder; each names the file, key or tensor involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config key is missing, has the wrong type, or asks for something unsupported.
    #[error("{file}: config key `{key}`: {reason}")]
    Config {
        file: PathBuf,
        key: String,
        reason: String,
    },
    /// Reading the weights failed (missing tensor, wrong shape, bad file…).
    #[error(transparent)]
    Checkpoint(#[from] omniopsd_checkpoint::Error),
    /// `tokenizer.json` could not be read.
    #[error("{file}: {reason}")]
    Tokenizer { file: PathBuf, reason: String },
    /// The tokenizer can produce ids the embedding has no row for; `tokenizer` is its largest
    /// id + 1 (its token count when the ids are contiguous).
    #[error("{file}: the tokenizer's ids need {tokenizer} rows (largest id + 1) but the model's embedding has {embedding} rows (config.json `vocab_size`); ids ≥ {embedding} could not be embedded")]
    TokenizerVocab {
        file: PathBuf,
        tokenizer: usize,
        embedding: usize,
    },
    /// A LoRA adapter that does not fit the base model or cannot be written.
    #[error("{file}: {reason}")]
    Adapter { file: PathBuf, reason: String },
    /// A prompt that does not fit the model.
    #[error("prompt: {reason}")]
    Prompt { reason: String },
}
