//! Qwen2.5-Omni thinker: how text, audio, images and videos are laid out in one token
//! sequence and where each token sits in TMRoPE's (time, height, width) position space.
//!
//! - [`ThinkerConfig`]: the thinker `config.json`'s special token ids and timing constants;
//! - [`Media`] and [`expand_prompt`]: the chat template's media placeholders expanded as
//!   `Qwen2_5OmniProcessor` does (one placeholder → one token per encoder output row, a
//!   video with its audio track interleaved in 2-second chunks);
//! - [`rope_index`]: transformers' `get_rope_index`, the 3-row position ids for M-RoPE;
//! - [`Thinker`]: towers + Qwen2 decoder on merged embeddings, implementing the core's
//!   [`omniopsd_core::PolicyModel`] over the decoder's
//!   [`omniopsd_decoder::TokenPrompt`] (expanded ids, TMRoPE rows, encoded media rows).
//!
//! Reference: transformers 5.24 `models/qwen2_5_omni/{processing,modeling}_qwen2_5_omni.py`.

mod config;
mod layout;
mod model;

pub use config::ThinkerConfig;
pub use layout::{audio_tokens, expand_prompt, rope_index, Media, Positions};
pub use model::{decoder_config, load_decoder, EncodedMedia, MediaInput, ModelError, Thinker};

/// Errors from laying out a multimodal prompt.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The token sequence and the media metadata disagree.
    #[error("prompt token {index}: {reason}")]
    Layout { index: usize, reason: String },
    /// More or fewer media items than placeholders in the prompt.
    #[error("prompt has {placeholders} {kind} placeholder block(s) but {given} {kind} item(s) were given")]
    MediaCount {
        kind: &'static str,
        placeholders: usize,
        given: usize,
    },
    /// Media metadata that cannot be laid out.
    #[error("{kind} item {index}: {reason}")]
    Media {
        kind: &'static str,
        index: usize,
        reason: String,
    },
    /// A missing or malformed `config.json` key.
    #[error("config.json: {field}: {reason}")]
    Config { field: &'static str, reason: String },
}
