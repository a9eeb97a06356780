//! Supervised fine-tuning (SFT) over a [`PolicyModel`]: token-level cross-entropy of a target
//! answer after a prompt, with the same AdamW, schedule, clipping and non-finite skip as the
//! OPSD trainer (both go through [`crate::update::Updater`]), and a state that resumes
//! bit-identically. It serves as a warm-up before OPSD (rationale in the prompt) and as the
//! label-SFT baseline OPSD is compared with.
//!
//! ```
//! # #[path = "../examples/own_model/model.rs"] mod model;
//! # use model::BagOfWords; // the small Burn model of core/examples/own_model
//! use omniopsd_core::sft::{Example, SftConfig, SftTrainer};
//!
//! type B = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
//! let model = BagOfWords::<B>::new(8, 4, &Default::default());
//! let mut trainer = SftTrainer::new(model, SftConfig { learning_rate: 0.05, ..SftConfig::default() });
//! let (prompt, target) = (vec![1u32, 2], [5u32, 6, 7]);
//! let batch = [Example { prompt: &prompt, target: &target }];
//! let first = trainer.step(&batch).unwrap();
//! for _ in 0..20 {
//!     trainer.step(&batch).unwrap();
//! }
//! let last = trainer.step(&batch).unwrap();
//! assert!(last.loss < first.loss, "{} -> {}", first.loss, last.loss);
//! assert_eq!(trainer.steps, 22);
//! ```

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};

use crate::fused::lm_logits;
use crate::model::PolicyModel;
use crate::sync::{align_gradients, GradientSync, SingleDevice, SyncError};
use crate::update::{
    AdamWOptimizer, AdamWSettings, ConfigError, LossScaleState, LossScaling, LrSchedule,
    OptimizerRecord, UpdateConfig, Updater,
};

/// The optimizer of an SFT phase.
pub type SftOptimizer<B, M> = AdamWOptimizer<B, M>;
/// Its saved state.
pub type SftOptimizerRecord<B, M> = OptimizerRecord<B, M>;

/// One supervised example: the prompt and the target tokens that follow it.
#[derive(Debug)]
pub struct Example<'a, P> {
    /// The context the target is conditioned on.
    pub prompt: &'a P,
    /// The tokens to learn, in order (their first is predicted from the prompt's last state).
    pub target: &'a [u32],
}

impl<P> Clone for Example<'_, P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P> Copy for Example<'_, P> {}

/// Hyper-parameters of an SFT phase (the same knobs, with the same meaning and field paths
/// in errors, as the update part of [`crate::step::OpsdConfig`]).
#[derive(Clone, Debug, PartialEq)]
pub struct SftConfig {
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Learning-rate schedule over optimizer updates.
    pub schedule: LrSchedule,
    /// AdamW hyper-parameters.
    pub adamw: AdamWSettings,
    /// Clip the global L2 gradient norm to this value; `None` disables clipping.
    pub max_grad_norm: Option<f32>,
    /// Examples per micro-batch: their graphs are held at once and their losses summed before
    /// one backward pass; a [`SftTrainer::step`] accumulates its batch's micro-batches into
    /// one update. `1` (the default) holds one example at a time.
    pub micro_batch: usize,
    /// Dynamic loss scaling, for half-precision (f16) compute; `None` (the default) for
    /// f32 and bf16.
    pub loss_scaling: Option<LossScaling>,
}

impl Default for SftConfig {
    /// Learning rate `1e-5`, constant schedule, [`AdamWSettings::default`], clipping at 1.
    fn default() -> Self {
        Self {
            learning_rate: 1e-5,
            schedule: LrSchedule::default(),
            adamw: AdamWSettings::default(),
            max_grad_norm: Some(1.0),
            micro_batch: 1,
            loss_scaling: None,
        }
    }
}

impl SftConfig {
    /// The optimizer knobs as the shared [`Updater`] takes them.
    pub fn update(&self) -> UpdateConfig {
        UpdateConfig {
            learning_rate: self.learning_rate,
            schedule: self.schedule,
            adamw: self.adamw,
            max_grad_norm: self.max_grad_norm,
            loss_scaling: self.loss_scaling,
        }
    }

    /// Checks every knob, as [`crate::step::OpsdConfig::validate`] checks the same ones;
    /// [`SftTrainer::try_new`] calls it.
    pub fn validate(&self) -> Result<(), SftError> {
        if self.micro_batch == 0 {
            return Err(SftError::Config {
                field: "micro_batch",
                expected: ">= 1",
                found: format!("{}", self.micro_batch),
            });
        }
        Ok(self.update().validate()?)
    }
}

/// Errors of an SFT step. Each surfaces before any gradient is applied, so the trainer is
/// left exactly as before the call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SftError {
    /// A knob is out of range.
    #[error("sft config: `{field}` must be {expected}, found {found}")]
    Config {
        /// The field path in [`SftConfig`].
        field: &'static str,
        /// What the field must be.
        expected: &'static str,
        /// The value found.
        found: String,
    },
    /// `step` was called with no examples.
    #[error("an SFT step needs at least one example")]
    NoExamples,
    /// Every target of the batch is empty: there is no token to learn.
    #[error("every SFT target in the batch is empty")]
    EmptyTargets,
    /// A target token is not in the model's vocabulary.
    #[error("example {example}: target token {token} at position {position} is outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        /// Index in the slice passed to `step`.
        example: usize,
        /// Index in the target.
        position: usize,
        /// The token id.
        token: u32,
        /// Rows of the model's LM head.
        vocab: usize,
    },
    /// The model's teacher-forced hidden states have the wrong shape.
    #[error("example {example}: response_hidden: expected shape {expected:?}, found {found:?}")]
    StudentShape {
        /// Index in the slice passed to `step`.
        example: usize,
        /// `[1, R, H]`.
        expected: [usize; 3],
        /// What the model returned.
        found: [usize; 3],
    },
    /// The devices of a data-parallel step could not agree (see [`crate::sync`]).
    #[error("data parallel: {0}")]
    Sync(#[from] SyncError),
}

impl SftError {
    /// The out-of-range field as its path in [`SftConfig`] (`learning_rate`,
    /// `schedule.total_steps`, `adamw.epsilon`, …), if this is a config error from
    /// [`SftConfig::validate`].
    pub fn field_error(&self) -> Option<crate::FieldError> {
        match self {
            Self::Config {
                field,
                expected,
                found,
            } => Some(crate::FieldError::out_of_range(field, expected, found)),
            _ => None,
        }
    }
}

impl From<ConfigError> for SftError {
    fn from(e: ConfigError) -> Self {
        SftError::Config {
            field: e.field,
            expected: e.expected,
            found: e.found,
        }
    }
}

/// What one update measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SftMetrics {
    /// Mean negative log-likelihood per target token (non-finite when the update was skipped
    /// for its loss).
    pub loss: f32,
    /// Pre-clip global gradient norm (NaN when the loss was not finite and no gradient was
    /// taken).
    pub grad_norm: f32,
    /// Learning rate used (or that would have been used, when skipped).
    pub lr: f64,
    /// Whether the update was skipped for a non-finite loss or gradient; the weights, the
    /// optimizer state and [`SftTrainer::steps`] are then unchanged.
    pub skipped: bool,
}

/// An SFT phase in progress.
pub struct SftTrainer<B: AutodiffBackend, M: AutodiffModule<B>> {
    /// The model being trained.
    pub model: M,
    /// Updates applied so far (drives the learning-rate schedule; save it with
    /// [`SftTrainer::optimizer_record`]).
    pub steps: u64,
    updater: Updater<B, M>,
    config: SftConfig,
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> core::fmt::Debug for SftTrainer<B, M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SftTrainer")
            .field("config", &self.config)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl<B, M> SftTrainer<B, M>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + PolicyModel<B>,
{
    /// A fresh phase. `config` is not checked: a phase that is all warm-up
    /// (`warmup_steps == total_steps` with a decaying schedule, which [`SftConfig::validate`]
    /// rejects) is a fine SFT schedule. [`SftTrainer::try_new`] checks it first.
    pub fn new(model: M, config: SftConfig) -> Self {
        Self {
            updater: Updater::new(config.update()),
            model,
            steps: 0,
            config,
        }
    }

    /// [`SftTrainer::new`] after [`SftConfig::validate`].
    pub fn try_new(model: M, config: SftConfig) -> Result<Self, SftError> {
        config.validate()?;
        Ok(Self::new(model, config))
    }

    /// Continues a phase from its saved optimizer state and step count; `model` holds the
    /// weights saved with them.
    pub fn resume(
        model: M,
        config: SftConfig,
        record: SftOptimizerRecord<B, M>,
        steps: u64,
    ) -> Self {
        Self {
            updater: Updater::resume(config.update(), record),
            model,
            steps,
            config,
        }
    }

    /// The optimizer state to save.
    pub fn optimizer_record(&self) -> SftOptimizerRecord<B, M> {
        self.updater.record()
    }

    /// The loss scaling state to save with the step count (`None` without loss scaling).
    pub fn loss_scale_state(&self) -> Option<LossScaleState> {
        self.updater.loss_scale_state()
    }

    /// Restores a saved loss scaling state after [`Self::resume`].
    pub fn set_loss_scale_state(&mut self, state: Option<LossScaleState>) {
        self.updater.set_loss_scale_state(state);
    }

    /// The configuration.
    pub fn config(&self) -> &SftConfig {
        &self.config
    }

    /// The learning rate of the next update.
    pub fn current_lr(&self) -> f64 {
        self.updater.lr(self.steps)
    }

    /// One update on `batch`: the loss is the mean NLL over every target token of the batch,
    /// `−(1/N) Σ_i Σ_t log p(y_it | prompt_i, y_i<t)`, back-propagated one micro-batch of
    /// [`SftConfig::micro_batch`] examples at a time and accumulated (empty targets contribute
    /// nothing). Then the shared update: clip the global gradient norm
    /// and apply AdamW at the scheduled learning rate.
    ///
    /// A non-finite loss or gradient norm skips the update and is reported in the metrics;
    /// it is not an error.
    ///
    /// This is [`Self::step_shard`] of the whole batch on one device ([`SingleDevice`]).
    pub fn step(&mut self, batch: &[Example<'_, M::Prompt>]) -> Result<SftMetrics, SftError> {
        self.step_shard(batch, &mut SingleDevice)
    }

    /// One device's share of a data-parallel [`Self::step`]: `batch` is this device's part of
    /// the update's examples and `sync` joins it to the devices holding the others (see
    /// [`crate::sync`]). `N` is the target tokens of every device's share together, so the
    /// devices' gradient sum is the one-device gradient up to the order of its floating-point
    /// additions, every device applies that same update, and the loss is the whole batch's.
    /// Each device's share holds at least one example.
    pub fn step_shard(
        &mut self,
        batch: &[Example<'_, M::Prompt>],
        sync: &mut dyn GradientSync<B>,
    ) -> Result<SftMetrics, SftError> {
        if batch.is_empty() {
            return Err(SftError::NoExamples);
        }
        let micro = self.config.micro_batch;
        if micro == 0 {
            // `new` leaves the config unchecked; this one knob would divide by zero below.
            return Err(SftError::Config {
                field: "micro_batch",
                expected: ">= 1",
                found: "0".into(),
            });
        }
        let head = self.model.lm_head();
        let device = head.device();
        let [vocab, hidden_size] = head.dims();
        drop(head);
        // A failure is kept until the next sync point, so that every device learns of it
        // there and none waits for a device that has returned.
        let mut failure = None;
        for (example, e) in batch.iter().enumerate() {
            if let Some((position, &token)) = e
                .target
                .iter()
                .enumerate()
                .find(|(_, t)| **t as usize >= vocab)
            {
                failure = Some(SftError::TokenOutOfRange {
                    example,
                    position,
                    token,
                    vocab,
                });
                break;
            }
        }
        let local: usize = batch.iter().map(|e| e.target.len()).sum();
        let mut counts = [f64::from(u8::from(failure.is_some())), local as f64];
        sync.sum(&mut counts)?;
        let total = counts[1] as usize;
        if total == 0 {
            return Err(SftError::EmptyTargets);
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if counts[0] > 0.0 {
            return Err(SyncError::PeerFailed.into());
        }
        let lr = self.current_lr();
        let mut accumulator = GradientsAccumulator::<M>::new();
        let mut loss_sum = 0.0f64;
        let mut non_finite: Option<f32> = None;
        let mut pending: Option<Tensor<B, 1>> = None;
        for (example, e) in batch.iter().enumerate() {
            if example % micro == 0 {
                if let Some(sum) = pending.take() {
                    let grads = GradientsParams::from_grads(sum.backward(), &self.model);
                    accumulator.accumulate(&self.model, grads);
                }
            }
            if e.target.is_empty() {
                continue;
            }
            let r = e.target.len();
            let ids: Vec<i64> = e.target.iter().map(|&t| i64::from(t)).collect();
            let target = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, r]), &device);
            let hidden = self.model.response_hidden(e.prompt, target.clone());
            let expected = [1, r, hidden_size];
            if hidden.dims() != expected {
                failure = Some(SftError::StudentShape {
                    example,
                    expected,
                    found: hidden.dims(),
                });
                pending = None;
                break;
            }
            let logits = lm_logits(hidden.reshape([r, hidden_size]), self.model.lm_head());
            let nll = log_softmax(logits, 1)
                .gather(1, target.reshape([r, 1]))
                .sum()
                .neg()
                .div_scalar(total as f64);
            let value: f32 = nll.clone().into_scalar().elem();
            loss_sum += f64::from(value);
            if !value.is_finite() {
                non_finite = Some(value);
                pending = None;
                break;
            }
            // Times the loss scale (1 without loss scaling), divided out in the update.
            let scale = self.updater.loss_scale();
            let nll = if scale == 1.0 {
                nll
            } else {
                nll.mul_scalar(scale)
            };
            pending = Some(match pending {
                Some(sum) => sum.add(nll),
                None => nll,
            });
        }
        let mut sums = [
            f64::from(u8::from(failure.is_some())),
            f64::from(u8::from(non_finite.is_some())),
            loss_sum,
        ];
        sync.sum(&mut sums)?;
        if let Some(e) = failure {
            return Err(e);
        }
        if sums[0] > 0.0 {
            return Err(SyncError::PeerFailed.into());
        }
        if sums[1] > 0.0 {
            return Ok(SftMetrics {
                // The first non-finite value this device met, or the sum over the devices
                // (non-finite too) when it met none.
                loss: non_finite.unwrap_or(sums[2] as f32),
                grad_norm: f32::NAN,
                lr,
                skipped: true,
            });
        }
        if let Some(sum) = pending {
            let grads = GradientsParams::from_grads(sum.backward(), &self.model);
            accumulator.accumulate(&self.model, grads);
        }
        let mut grads = accumulator.grads();
        if sync.devices() > 1 {
            grads = align_gradients::<B, M>(&self.model, grads, sync)?;
            grads = sync.sum_gradients(grads)?;
        }
        let outcome = self.updater.apply(&mut self.model, grads, &mut self.steps);
        Ok(SftMetrics {
            loss: sums[2] as f32,
            grad_norm: outcome.grad_norm,
            lr: outcome.lr,
            skipped: !outcome.applied,
        })
    }
}
