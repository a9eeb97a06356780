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
//! - [`sync`]: data parallelism: the points where the devices of a step agree (the
//!   [`sync::GradientSync`] trait), one device alone, and with the `collective` feature the
//!   sync over `burn-collective`.
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
pub mod sync;
pub mod teacher;
pub mod update;

pub use model::PolicyModel;

use alloc::string::String;

/// A configuration value outside its domain, in one shape for every config type: the field's
/// path in the config struct (`loss.divergence.beta` within [`step::OpsdConfig`]) and what is
/// wrong with it (`must be in [0, 1], found 1.5`). Front ends map the path to their own key
/// names, so the range checks exist only in the `validate` methods here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field in the config struct that was validated.
    pub field: String,
    /// The requirement and the value found.
    pub problem: String,
}

impl FieldError {
    pub(crate) fn new(field: &str, problem: String) -> Self {
        Self {
            field: field.into(),
            problem,
        }
    }

    /// `field` outside its range: `must be {expected}, found {found}`, the one wording every
    /// config error of the core uses.
    pub(crate) fn out_of_range(
        field: &str,
        expected: &str,
        found: &dyn core::fmt::Display,
    ) -> Self {
        Self::new(field, alloc::format!("must be {expected}, found {found}"))
    }

    /// The same error seen from a config that holds this one's struct under `parent`.
    pub(crate) fn within(mut self, parent: &str) -> Self {
        self.field = alloc::format!("{parent}.{}", self.field);
        self
    }
}

impl core::fmt::Display for FieldError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

#[cfg(test)]
mod tests {
    use crate::divergence::Divergence;
    use crate::step::OpsdConfig;
    use crate::teacher::TeacherMode;

    fn field_error(edit: impl FnOnce(&mut OpsdConfig)) -> alloc::string::String {
        let mut cfg = OpsdConfig::default();
        edit(&mut cfg);
        let err = cfg.validate().expect_err("an out-of-range knob");
        alloc::format!("{}", err.field_error().expect("a config error"))
    }

    #[test]
    fn config_errors_name_the_field_path_in_opsd_config() {
        let beta = field_error(|c| c.loss.divergence = Divergence::Jsd { beta: 1.5 });
        assert_eq!(beta, "loss.divergence.beta: must be in [0, 1], found 1.5");
        let top_p = field_error(|c| c.rollout.sampling.top_p = 0.0);
        assert!(
            top_p.starts_with("rollout.sampling.top_p: must be"),
            "{top_p}"
        );
        let rate = field_error(|c| c.teacher = TeacherMode::Ema { rate: 2.0 });
        assert!(
            rate.starts_with("teacher.rate: must be in (0, 1]"),
            "{rate}"
        );
        let lr = field_error(|c| c.learning_rate = 0.0);
        assert!(lr.starts_with("learning_rate: must be"), "{lr}");
        let n = field_error(|c| c.rollout.samples_per_prompt = 0);
        assert!(
            n.starts_with("rollout.samples_per_prompt: must be >= 1"),
            "{n}"
        );
    }
}
