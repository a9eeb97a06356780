//! The layers the model crates share, each loaded from a [`omniopsd_checkpoint::Weights`]
//! view under the names PyTorch gives them (`weight`, `bias`):
//!
//! - [`Linear`]: `nn.Linear`, keeping `Wᵀ` contiguous, with the few-row product of
//!   [`omniopsd_backends::rows`] for decode steps, optionally carrying a [`LoraAdapter`]
//!   (PEFT's `lora_A` / `lora_B`, base weight frozen);
//! - [`RmsNorm`]: `Qwen2RMSNorm`;
//! - [`LayerNorm`]: `nn.LayerNorm`;
//! - [`RandomInit`]: their HF-style random initialisation, for checkpoints written from a
//!   config alone (the embedded tiny model, benchmark shapes).
//!
//! The normalisations take ε from the caller: from the config where the architecture reads
//! it there, otherwise the constant the reference implementation hard-codes.

mod init;
mod linear;
mod norm;

pub use init::RandomInit;
pub use linear::{Linear, LoraAdapter};
pub use norm::{LayerNorm, RmsNorm};
