//! # omniopsd-core
//!
//! Rationale-privileged on-policy self-distillation (OmniOPSD, arXiv 2606.15920), as an
//! algorithm over Burn tensors. The student samples a response from its ordinary context; the
//! *same* model, given a privileged block (a frontier-written rationale) in its context, scores
//! those very tokens as the teacher; the student is trained on a dense per-token divergence to
//! the teacher.
//!
//! Architecture invariant: nothing here knows what a Qwen, a WAV file or a CLI is. Tensors in,
//! tensors and metrics out; `#![no_std]` + `alloc`; generic over `B: Backend` /
//! `B: AutodiffBackend`, never naming a concrete backend.
//!
//! Code map:
//! - [`model`]: the trait a policy model implements (prefill, one-token decode with a cache,
//!   teacher-forced response hidden states, LM head).
//! - [`divergence`]: per-token divergences between teacher and student next-token
//!   distributions from logits (forward/reverse KL, generalized JSD, top-k, sampled-token).
//! - [`fused`]: the same losses computed chunk by chunk from hidden states and the LM-head
//!   weight, with exact analytic gradients, so no `[B·T, V]` tensor ever exists.
//! - [`sampling`] and [`rollout`]: seeded sampling (temperature, top-k, top-p) and G rollouts
//!   per prompt with stop tokens and behaviour log-probs.
//! - [`teacher`]: privileged teacher contexts and teacher weight modes (frozen, EMA, live).
//! - [`step`]: one OPSD update: rollout, teacher scoring, student loss, backward, AdamW.
//! - [`sft`]: supervised fine-tuning on target tokens (the warm-up and the label-SFT
//!   baseline).
//! - [`update`]: what both trainers share: AdamW at a scheduled learning rate, global
//!   gradient-norm clipping, skipping non-finite updates, resumable optimizer records.
//! - [`rng`]: the SplitMix64 generator and FNV-1a hash for everything outside the sampler
//!   (synthetic data, random initialisation).
//!
//! The crate is meant to be linked into trainers of your own: implement [`PolicyModel`] for
//! your model and drive [`step::OpsdTrainer`]; `examples/own_model` does it for a small Burn
//! model in a screenful of glue.
#![no_std]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod divergence;
pub mod fused;
pub mod model;
pub mod rng;
pub mod rollout;
pub mod sampling;
pub mod sft;
pub mod step;
pub mod teacher;
pub mod update;

pub use model::PolicyModel;
