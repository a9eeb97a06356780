//! One OPSD update, as a reusable trainer: rollout → privileged teacher scoring → student
//! forward with gradients → fused loss → backward → global grad-norm clip → AdamW.
//!
//! [`OpsdTrainer`] owns the model, the optimizer, the teacher weights and the random stream
//! position; users drive it with [`OpsdTrainer::step`] from their own loop and checkpoint it
//! with [`OpsdTrainer::state`] / [`OpsdTrainer::resume`]. [`OpsdTrainer::step_shard`] is one
//! device's share of a data-parallel step ([`crate::sync`]).
//!
//! [`OpsdTrainer`] has a runnable example; `core/examples/own_model` is a complete one.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};

use crate::divergence::{Divergence, LossConfig, LossConfigError, Reduction};
use crate::fused::{try_fused_distillation_with_head, FusedLossError, ResponseBatch};
use crate::model::PolicyModel;
use crate::rollout::{rollout, Rollout, RolloutConfig, RolloutError};
use crate::sync::{align_gradients, GradientSync, SingleDevice, SyncError};
use crate::teacher::{self, PrivilegedTemplate, Teacher, TeacherError, TeacherMode, TeacherScores};
use crate::update::{AdamWOptimizer, ConfigError, UpdateConfig, Updater};
// The update knobs and helpers live in `update` (shared with the SFT trainer); they keep
// their paths here.
pub use crate::update::{
    clip_global_grad_norm, AdamWSettings, LossScaleState, LossScaling, LrDecay, LrSchedule,
    OptimizerRecord, SkipReason,
};

/// One training example: the student's context and the privileged teacher's context.
#[derive(Clone, Debug, PartialEq)]
pub struct Episode<P> {
    /// What the student sees (and samples from).
    pub student: P,
    /// Student context + privileged block (see [`PrivilegedTemplate`]).
    pub teacher: P,
}

impl<P> Episode<P> {
    /// Builds the teacher context from `student` and the privileged `block` with `template`.
    pub fn privileged<T: PrivilegedTemplate<P> + ?Sized>(
        template: &T,
        student: P,
        block: &T::Block,
    ) -> Self {
        let teacher = template.teacher_prompt(&student, block);
        Self { student, teacher }
    }
}

/// Everything an OPSD trainer does, all knobs public.
#[derive(Clone, Debug, PartialEq)]
pub struct OpsdConfig {
    /// Sampling and response shape. `rollout.logp_temperature` must equal
    /// `loss.temperature` (the behaviour log-probs feed the importance ratio).
    pub rollout: RolloutConfig,
    /// Divergence, top-k, reduction, loss temperature.
    pub loss: LossConfig,
    /// Teacher weights: frozen `θ₀`, EMA, or the live student.
    pub teacher: TeacherMode,
    /// AdamW hyper-parameters.
    pub adamw: AdamWSettings,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Learning-rate schedule over optimizer updates.
    pub schedule: LrSchedule,
    /// Clip the global L2 norm of the gradient (over all parameters) to this value;
    /// `None` disables clipping.
    pub max_grad_norm: Option<f32>,
    /// Optimizer updates per rollout. Above 1 the later updates are off-policy; only the
    /// sampled-token loss (`Divergence::SampledReverseKl`) carries the importance ratio that
    /// corrects for it, so [`OpsdConfig::validate`] refuses more than 1 with any other loss.
    pub updates_per_rollout: usize,
    /// Rows of `N·R` per chunk of the fused loss (bounds the `[rows, V]` working set).
    pub chunk_rows: usize,
    /// Episodes per micro-batch: the episodes whose teacher scores and student graphs are held
    /// in memory at once, with one backward pass per micro-batch. The episodes of one
    /// [`OpsdTrainer::step`] are one optimizer update, so a step over `b · a` episodes with
    /// `micro_batch = b` accumulates `a` micro-batches. Peak memory grows with this, not with
    /// the episodes per step; `1` (the default) holds one episode at a time.
    pub micro_batch: usize,
    /// Key of the counter-based sampler.
    pub seed: u64,
    /// Dynamic loss scaling, for half-precision (f16) compute; `None` (the default) for
    /// f32 and bf16.
    pub loss_scaling: Option<LossScaling>,
}

impl Default for OpsdConfig {
    fn default() -> Self {
        Self {
            rollout: RolloutConfig::default(),
            loss: LossConfig::default(),
            teacher: TeacherMode::default(),
            adamw: AdamWSettings::default(),
            learning_rate: 1e-6,
            schedule: LrSchedule::default(),
            max_grad_norm: Some(1.0),
            updates_per_rollout: 1,
            chunk_rows: 1024,
            micro_batch: 1,
            seed: 0,
            loss_scaling: None,
        }
    }
}

impl OpsdConfig {
    /// The optimizer knobs (learning rate, schedule, AdamW, clipping).
    pub fn update(&self) -> UpdateConfig {
        UpdateConfig {
            learning_rate: self.learning_rate,
            schedule: self.schedule,
            adamw: self.adamw,
            max_grad_norm: self.max_grad_norm,
            loss_scaling: self.loss_scaling,
        }
    }

    /// Checks every knob; [`OpsdTrainer::new`] calls it.
    pub fn validate(&self) -> Result<(), StepError> {
        self.rollout.validate()?;
        self.loss.validate()?;
        self.teacher.validate()?;
        if self.rollout.logp_temperature != self.loss.temperature {
            return Err(StepError::Config {
                field: "rollout.logp_temperature",
                expected: "equal to loss.temperature",
                found: format!(
                    "{} (loss.temperature is {})",
                    self.rollout.logp_temperature, self.loss.temperature
                ),
            });
        }
        self.update().validate()?;
        if self.updates_per_rollout == 0 {
            return Err(StepError::Config {
                field: "updates_per_rollout",
                expected: ">= 1",
                found: format!("{}", self.updates_per_rollout),
            });
        }
        if self.updates_per_rollout > 1
            && !matches!(self.loss.divergence, Divergence::SampledReverseKl { .. })
        {
            return Err(StepError::Config {
                field: "updates_per_rollout",
                expected: "1 unless loss.divergence is the sampled-token reverse KL (the only \
                           loss the importance ratio enters; a reused rollout would go \
                           uncorrected)",
                found: format!("{}", self.updates_per_rollout),
            });
        }
        if self.chunk_rows == 0 {
            return Err(StepError::Config {
                field: "chunk_rows",
                expected: ">= 1",
                found: format!("{}", self.chunk_rows),
            });
        }
        if self.micro_batch == 0 {
            return Err(StepError::Config {
                field: "micro_batch",
                expected: ">= 1",
                found: format!("{}", self.micro_batch),
            });
        }
        Ok(())
    }
}

/// Errors of a trainer. Rollout, scoring and student-shape errors surface before the first
/// update of a step, so they leave the trainer exactly as before the call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StepError {
    /// A trainer knob is out of range.
    #[error("opsd config: `{field}` must be {expected}, found {found}")]
    Config {
        /// The field path in [`OpsdConfig`].
        field: &'static str,
        /// What the field must be.
        expected: &'static str,
        /// The value found.
        found: String,
    },
    /// Rollout knobs out of range.
    #[error("opsd config: {0}")]
    RolloutConfig(#[from] RolloutError),
    /// Loss knobs out of range.
    #[error("opsd config: {0}")]
    Loss(#[from] LossConfigError),
    /// Teacher knobs or snapshot invalid.
    #[error("teacher: {0}")]
    Teacher(#[from] TeacherError),
    /// `step` was called with no episodes.
    #[error("step called with no episodes")]
    NoEpisodes,
    /// `step_shard` was given a share that does not lie inside its step.
    #[error("shard of {len} episodes from episode {first} does not fit a step of {total}")]
    Shard {
        /// Index of the shard's first episode in the step.
        first: usize,
        /// Episodes in the shard.
        len: usize,
        /// Episodes in the step, over every device.
        total: usize,
    },
    /// The devices of a data-parallel step could not agree (see [`crate::sync`]).
    #[error("data parallel: {0}")]
    Sync(#[from] SyncError),
    /// Rolling out an episode failed.
    #[error("episode {episode}: rollout: {source}")]
    Rollout {
        /// Index in the slice passed to `step` (in the whole step, for `step_shard`).
        episode: usize,
        /// The failure.
        source: RolloutError,
    },
    /// Scoring an episode with the teacher failed.
    #[error("episode {episode}: teacher: {source}")]
    Scoring {
        /// Index in the slice passed to `step` (in the whole step, for `step_shard`).
        episode: usize,
        /// The failure.
        source: TeacherError,
    },
    /// The distillation loss could not be evaluated on an episode (a response token outside
    /// the head's vocabulary, mismatched shapes).
    #[error("episode {episode}: loss: {source}")]
    LossEvaluation {
        /// Index in the slice passed to `step` (in the whole step, for `step_shard`).
        episode: usize,
        /// The failure.
        source: FusedLossError,
    },
    /// The student's teacher-forced hidden states have the wrong shape.
    #[error(
        "episode {episode}: student response_hidden: expected shape {expected:?}, found {found:?}"
    )]
    StudentShape {
        /// Index in the slice passed to `step` (in the whole step, for `step_shard`).
        episode: usize,
        /// `[G, R, H]`.
        expected: [usize; 3],
        /// What the model returned.
        found: [usize; 3],
    },
    /// A saved state does not fit the configuration it is resumed with.
    #[error("resume: state `{field}` is {found} but the config has {expected}")]
    StateMismatch {
        /// The field.
        field: &'static str,
        /// The value in the config.
        expected: u64,
        /// The value in the state.
        found: u64,
    },
}

impl StepError {
    /// The out-of-range field as its path in [`OpsdConfig`] (`loss.divergence.beta`,
    /// `rollout.sampling.top_p`, `teacher.rate`, `learning_rate`, …), if this is a config
    /// error from [`OpsdConfig::validate`].
    pub fn field_error(&self) -> Option<crate::FieldError> {
        match self {
            Self::Config {
                field,
                expected,
                found,
            } => Some(crate::FieldError::out_of_range(field, expected, found)),
            Self::RolloutConfig(e) => e.field_error().map(|e| e.within("rollout")),
            Self::Loss(e) => Some(e.field_error().within("loss")),
            Self::Teacher(e) => e.field_error().map(|e| e.within("teacher")),
            _ => None,
        }
    }
}

impl From<ConfigError> for StepError {
    fn from(e: ConfigError) -> Self {
        StepError::Config {
            field: e.field,
            expected: e.expected,
            found: e.found,
        }
    }
}

/// Measurements of one optimizer update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UpdateMetrics {
    /// Loss, weighted over episodes exactly as the gradient is (see [`OpsdTrainer::step`]).
    pub loss: f32,
    /// Mean per-token divergence to the teacher, over all valid tokens.
    pub mean_divergence: f32,
    /// Mean student entropy over all valid tokens.
    pub student_entropy: f32,
    /// Fraction of valid tokens whose importance ratio was clipped.
    pub clip_fraction: f32,
    /// Global L2 gradient norm before clipping (NaN when not computed).
    pub grad_norm: f32,
    /// Learning rate used (or that would have been used, when skipped).
    pub lr: f64,
    /// `Some` when the update was skipped; the weights and optimizer state are then unchanged.
    pub skipped: Option<SkipReason>,
}

/// Measurements of one [`OpsdTrainer::step`].
#[derive(Clone, Debug, PartialEq)]
pub struct StepMetrics {
    /// Loss of the first update (on-policy: measured before this rollout's updates).
    pub loss: f32,
    /// Mean per-token divergence to the teacher at the first update.
    pub mean_divergence: f32,
    /// Mean student entropy at the first update.
    pub student_entropy: f32,
    /// Importance-ratio clip fraction at the first update (0 on-policy).
    pub clip_fraction: f32,
    /// Pre-clip global gradient norm of the first update.
    pub grad_norm: f32,
    /// Learning rate of the last update.
    pub lr: f64,
    /// Mean response length (valid tokens, stop token included) per sampled sequence.
    pub response_length: f32,
    /// Fraction of sequences that ended on a stop token.
    pub stop_fraction: f32,
    /// Valid response tokens over all episodes.
    pub valid_tokens: usize,
    /// Whether any update of this step was skipped.
    pub skipped: bool,
    /// Updates applied.
    pub updates_applied: usize,
    /// Every update of this step, in order.
    pub updates: Vec<UpdateMetrics>,
}

/// The optimizer the trainer uses.
pub type OpsdOptimizer<B, M> = AdamWOptimizer<B, M>;

/// Everything besides the model's own weights needed to continue training bit-identically.
///
/// The record types are Burn records, so a caller with I/O saves them with any Burn recorder.
pub struct TrainerState<B: AutodiffBackend, M: AutodiffModule<B>> {
    /// AdamW moments per parameter.
    pub optimizer: OptimizerRecord<B, M>,
    /// Teacher weights for `Frozen` / `Ema`, `None` for `Live`.
    pub teacher: Option<M::InnerModule>,
    /// Optimizer updates applied so far (drives the learning-rate schedule).
    pub optimizer_steps: u64,
    /// Episodes rolled out so far (the sampler's stream counter).
    pub episodes_seen: u64,
    /// The sampler key the run used.
    pub seed: u64,
    /// Where dynamic loss scaling stands (`None` without it).
    pub loss_scale: Option<LossScaleState>,
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> Clone for TrainerState<B, M> {
    fn clone(&self) -> Self {
        Self {
            optimizer: self.optimizer.clone(),
            teacher: self.teacher.clone(),
            optimizer_steps: self.optimizer_steps,
            episodes_seen: self.episodes_seen,
            seed: self.seed,
            loss_scale: self.loss_scale,
        }
    }
}

/// On-policy self-distillation trainer over a [`PolicyModel`] on an autodiff backend.
///
/// `M` is the trainable model; its inner (no-autodiff) version, used for rollouts and the
/// teacher, must take the same prompt type, so prompts should be backend-independent data
/// (token ids, `TensorData` media features).
///
/// ```
/// # #[path = "../examples/own_model/model.rs"] mod model;
/// # use model::BagOfWords; // the small Burn model of core/examples/own_model
/// use burn::module::Module;
/// use omniopsd_core::rollout::RolloutConfig;
/// use omniopsd_core::step::{Episode, OpsdConfig, OpsdTrainer};
/// use omniopsd_core::teacher::PrivilegedTemplate;
///
/// type B = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
///
/// /// The teacher reads the rationale right after the question.
/// struct Append;
/// impl PrivilegedTemplate<Vec<u32>> for Append {
///     type Block = [u32];
///     fn teacher_prompt(&self, student: &Vec<u32>, rationale: &[u32]) -> Vec<u32> {
///         student.iter().chain(rationale).copied().collect()
///     }
/// }
///
/// let model = BagOfWords::<B>::new(16, 8, &Default::default());
/// let config = OpsdConfig {
///     rollout: RolloutConfig {
///         samples_per_prompt: 2,
///         max_new_tokens: 4,
///         stop_tokens: vec![0],
///         ..RolloutConfig::default()
///     },
///     learning_rate: 1e-2,
///     ..OpsdConfig::default()
/// };
/// let mut trainer = OpsdTrainer::new(model, config)?;
/// let data: [(&[u32], &[u32]); 2] = [(&[3, 4], &[9, 9]), (&[5], &[12, 13])];
/// let episodes: Vec<Episode<Vec<u32>>> = data
///     .iter()
///     .map(|(question, rationale)| Episode::privileged(&Append, question.to_vec(), *rationale))
///     .collect();
/// for _ in 0..3 {
///     let metrics = trainer.step(&episodes)?;
///     // A non-finite loss or gradient would skip the update and say so here.
///     assert!(!metrics.skipped && metrics.loss.is_finite());
/// }
/// assert_eq!(trainer.optimizer_steps(), 3);
/// // A checkpoint: the weights (a Burn record) and the rest of the state;
/// // `OpsdTrainer::resume(model, config, state)` continues bit-identically.
/// let (_weights, _state) = (trainer.model().clone().into_record(), trainer.state());
/// # Ok::<(), omniopsd_core::step::StepError>(())
/// ```
pub struct OpsdTrainer<B, M>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
{
    config: OpsdConfig,
    model: M,
    updater: Updater<B, M>,
    teacher: Teacher<M::InnerModule>,
    optimizer_steps: u64,
    episodes_seen: u64,
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> core::fmt::Debug for OpsdTrainer<B, M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("OpsdTrainer")
            .field("config", &self.config)
            .field("optimizer_steps", &self.optimizer_steps)
            .field("episodes_seen", &self.episodes_seen)
            .field("teacher", &self.teacher.mode())
            .finish_non_exhaustive()
    }
}

/// The teacher scores of a step's episodes: computed for all of them before the first update
/// when the rollout is reused (`updates_per_rollout > 1`: every update must see the scores of
/// the policy that sampled), otherwise one micro-batch at a time, inside the update.
enum Scores<'p, B: Backend, M> {
    Kept(&'p [TeacherScores<B>]),
    PerMicroBatch(&'p M),
}

/// The gradient of one update, accumulated over its micro-batches and summed over the
/// devices, with its measurements (`grad_norm` not yet known); `grads` is `None` when a loss
/// was not finite on some device.
struct Accumulated {
    grads: Option<GradientsParams>,
    metrics: UpdateMetrics,
}

impl<B, M> OpsdTrainer<B, M>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + PolicyModel<B>,
    M::InnerModule: PolicyModel<B::InnerBackend, Prompt = <M as PolicyModel<B>>::Prompt>,
{
    /// A fresh trainer; the teacher snapshot (for `Frozen` / `Ema`) is taken from `model`.
    pub fn new(model: M, config: OpsdConfig) -> Result<Self, StepError> {
        config.validate()?;
        let teacher = Teacher::new(config.teacher, &model.valid())?;
        Ok(Self {
            updater: Updater::new(config.update()),
            config,
            model,
            teacher,
            optimizer_steps: 0,
            episodes_seen: 0,
        })
    }

    /// A fresh trainer whose `Frozen` / `Ema` teacher starts from `snapshot` instead of the
    /// student's current weights: for LoRA's `frozen` teacher, the base with the adapters off
    /// (its weights shared with the student's, not copied). An `Ema` snapshot must have the
    /// student's parameters (the blend fails otherwise); `Live` takes none.
    pub fn with_teacher(
        model: M,
        config: OpsdConfig,
        snapshot: Option<M::InnerModule>,
    ) -> Result<Self, StepError> {
        config.validate()?;
        let teacher = Teacher::from_snapshot(config.teacher, snapshot)?;
        Ok(Self {
            updater: Updater::new(config.update()),
            config,
            model,
            teacher,
            optimizer_steps: 0,
            episodes_seen: 0,
        })
    }

    /// Continues from a saved [`TrainerState`]; `model` holds the weights saved with it.
    pub fn resume(
        model: M,
        config: OpsdConfig,
        state: TrainerState<B, M>,
    ) -> Result<Self, StepError> {
        config.validate()?;
        if state.seed != config.seed {
            return Err(StepError::StateMismatch {
                field: "seed",
                expected: config.seed,
                found: state.seed,
            });
        }
        let teacher = Teacher::from_snapshot(config.teacher, state.teacher)?;
        let mut updater = Updater::resume(config.update(), state.optimizer);
        updater.set_loss_scale_state(state.loss_scale);
        Ok(Self {
            updater,
            config,
            model,
            teacher,
            optimizer_steps: state.optimizer_steps,
            episodes_seen: state.episodes_seen,
        })
    }

    /// The trainer's state besides the model weights (save it with [`Self::model`]).
    pub fn state(&self) -> TrainerState<B, M> {
        TrainerState {
            optimizer: self.updater.record(),
            teacher: self.teacher.snapshot().cloned(),
            optimizer_steps: self.optimizer_steps,
            episodes_seen: self.episodes_seen,
            seed: self.config.seed,
            loss_scale: self.updater.loss_scale_state(),
        }
    }

    /// The model being trained.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// Ends training and hands the model back.
    pub fn into_model(self) -> M {
        self.model
    }

    /// The configuration.
    pub fn config(&self) -> &OpsdConfig {
        &self.config
    }

    /// The teacher (mode and snapshot).
    pub fn teacher(&self) -> &Teacher<M::InnerModule> {
        &self.teacher
    }

    /// Optimizer updates applied so far.
    pub fn optimizer_steps(&self) -> u64 {
        self.optimizer_steps
    }

    /// Episodes rolled out so far: the next episode uses sampler stream `episodes_seen`.
    pub fn episodes_seen(&self) -> u64 {
        self.episodes_seen
    }

    /// The learning rate of the next update.
    pub fn current_lr(&self) -> f64 {
        self.updater.lr(self.optimizer_steps)
    }

    /// One OPSD step over `episodes` (one prompt each, `G` samples per prompt): one
    /// optimizer update (or `updates_per_rollout` of them) over all of them, in micro-batches
    /// of [`OpsdConfig::micro_batch`] episodes.
    ///
    /// 1. Roll out every episode with the current weights (inner backend, sampler stream
    ///    `episodes_seen + i`). Rollouts are token ids and log-probs, `[G, R]` each.
    /// 2. `updates_per_rollout` times, micro-batch by micro-batch: score the micro-batch's
    ///    responses with the teacher on its privileged context (inner backend, no graph),
    ///    teacher-force them through the autodiff student, compute each episode's fused loss,
    ///    and back-propagate the micro-batch's weighted sum once, accumulating gradients
    ///    across micro-batches. The weights `w_i` make the sum over the step equal the loss of
    ///    one batch holding every episode: `w_i = T_i / Σ_j T_j` (valid tokens) for
    ///    [`Reduction::Token`], `w_i = 1 / n` for [`Reduction::Sequence`] (every episode has
    ///    `G` sequences). Then clip the global gradient norm
    ///    (`g ← g · c / (‖g‖ + 1e-6)` when `‖g‖ > c`, as `torch.nn.utils.clip_grad_norm_`),
    ///    and apply AdamW at `lr = peak · f(optimizer_steps)`.
    ///
    /// The teacher scores every episode with the weights of the policy that sampled (a `Live`
    /// teacher is that policy): with `updates_per_rollout > 1` all episodes are scored before
    /// the first update and kept, so only then do the scores of the whole step stay in memory.
    ///
    /// With `micro_batch = 1` each episode is its own backward pass; larger micro-batches hold
    /// more graphs at once and sum their losses before one backward, which changes the order
    /// of the gradient's floating-point additions, not its value beyond rounding.
    ///
    /// A non-finite loss or gradient norm skips that update (weights, optimizer state and
    /// teacher untouched) and is reported in the metrics; it is not an error.
    ///
    /// This is [`Self::step_shard`] of the whole step on one device ([`SingleDevice`]).
    pub fn step(
        &mut self,
        episodes: &[Episode<<M as PolicyModel<B>>::Prompt>],
    ) -> Result<StepMetrics, StepError> {
        self.step_shard(episodes, 0, episodes.len(), &mut SingleDevice)
    }

    /// One device's share of a data-parallel [`Self::step`]: `episodes` are the step's
    /// episodes `first .. first + episodes.len()` of `total` over all devices, and `sync`
    /// joins this device to the others (see [`crate::sync`]), which call it with the other
    /// shares of the same step at the same time.
    ///
    /// Episode `first + i` rolls out on sampler stream `episodes_seen + first + i`, as it
    /// would in the whole step on one device, and the loss weights use the whole step's
    /// valid tokens (`Σ T` over every device) or episodes (`total`), so the devices' gradient
    /// sum is the one-device gradient up to the order of its floating-point additions; every
    /// device then applies that same update, and the metrics, summed over the devices, are
    /// the one-device step's. Every device must call this with the same `total` and shares
    /// that partition the step, each at least one episode; `episodes_seen` advances by
    /// `total`.
    pub fn step_shard(
        &mut self,
        episodes: &[Episode<<M as PolicyModel<B>>::Prompt>],
        first: usize,
        total: usize,
        sync: &mut dyn GradientSync<B>,
    ) -> Result<StepMetrics, StepError> {
        if episodes.is_empty() {
            return Err(StepError::NoEpisodes);
        }
        if first
            .checked_add(episodes.len())
            .is_none_or(|end| end > total)
        {
            return Err(StepError::Shard {
                first,
                len: episodes.len(),
                total,
            });
        }
        let policy = self.model.valid();
        // A failure is kept until the next sync point, so that every device learns of it
        // there and none waits for a device that has returned.
        let mut failure = None;
        let mut rollouts = Vec::with_capacity(episodes.len());
        for (i, ep) in episodes.iter().enumerate() {
            let episode = first + i;
            match rollout(
                &policy,
                &ep.student,
                &self.config.rollout,
                self.config.seed,
                self.episodes_seen + episode as u64,
            ) {
                Ok(ro) => rollouts.push(ro),
                Err(source) => {
                    failure = Some(StepError::Rollout { episode, source });
                    break;
                }
            }
        }
        let kept = if self.config.updates_per_rollout > 1 && failure.is_none() {
            let mut kept = Vec::with_capacity(episodes.len());
            for (i, (ep, ro)) in episodes.iter().zip(&rollouts).enumerate() {
                match self.score(&policy, first + i, ep, ro) {
                    Ok(scores) => kept.push(scores),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            Some(kept)
        } else {
            None
        };

        let valid: Vec<usize> = rollouts.iter().map(|r| r.valid_tokens()).collect();
        let sequences: usize = rollouts.iter().map(|r| r.responses.len()).sum();
        let stopped: usize = rollouts
            .iter()
            .map(|r| r.stopped.iter().filter(|x| **x).count())
            .sum();
        // Counts of the whole step: exact in f64 (integers far below 2^53).
        let mut counts = [
            f64::from(u8::from(failure.is_some())),
            valid.iter().sum::<usize>() as f64,
            sequences as f64,
            stopped as f64,
        ];
        sync.sum(&mut counts)?;
        if let Some(e) = failure {
            return Err(e);
        }
        if counts[0] > 0.0 {
            return Err(SyncError::PeerFailed.into());
        }
        let [_, total_valid, sequences, stopped] = counts.map(|c| c as usize);
        let weights: Vec<f64> = match self.config.loss.reduction {
            Reduction::Token => valid
                .iter()
                .map(|v| *v as f64 / total_valid as f64)
                .collect(),
            Reduction::Sequence => vec![1.0 / total as f64; episodes.len()],
        };

        let mut updates = Vec::with_capacity(self.config.updates_per_rollout);
        let shard = Shard {
            episodes,
            first,
            rollouts: &rollouts,
            weights: &weights,
        };
        match kept {
            Some(kept) => {
                // The sampling weights are no longer needed: dropping them before the updates
                // lets the optimizer update the parameters in place.
                drop(policy);
                for _ in 0..self.config.updates_per_rollout {
                    let grads = self.accumulate(&shard, &Scores::Kept(&kept), sync)?;
                    updates.push(self.apply(grads)?);
                }
            }
            None => {
                let grads = self.accumulate(&shard, &Scores::PerMicroBatch(&policy), sync)?;
                drop(policy);
                updates.push(self.apply(grads)?);
            }
        }
        self.episodes_seen += total as u64;

        let first = updates[0];
        Ok(StepMetrics {
            loss: first.loss,
            mean_divergence: first.mean_divergence,
            student_entropy: first.student_entropy,
            clip_fraction: first.clip_fraction,
            grad_norm: first.grad_norm,
            lr: updates[updates.len() - 1].lr,
            response_length: total_valid as f32 / sequences as f32,
            stop_fraction: stopped as f32 / sequences as f32,
            valid_tokens: total_valid,
            skipped: updates.iter().any(|u| u.skipped.is_some()),
            updates_applied: updates.iter().filter(|u| u.skipped.is_none()).count(),
            updates,
        })
    }

    /// The teacher's scores of episode `episode`'s responses, under the weights that go with
    /// `policy` (the policy that sampled them).
    fn score(
        &self,
        policy: &M::InnerModule,
        episode: usize,
        ep: &Episode<<M as PolicyModel<B>>::Prompt>,
        ro: &Rollout<B::InnerBackend>,
    ) -> Result<TeacherScores<B::InnerBackend>, StepError> {
        teacher::score(self.teacher.weights(policy), &ep.teacher, ro.tokens.clone())
            .map_err(|source| StepError::Scoring { episode, source })
    }

    /// Forward and backward over every micro-batch of one update of this device's shard,
    /// gradients accumulated; then the metric sums, the non-finite flag and the gradient
    /// summed over the devices.
    fn accumulate(
        &self,
        shard: &Shard<'_, B::InnerBackend, <M as PolicyModel<B>>::Prompt>,
        scores: &Scores<'_, B::InnerBackend, M::InnerModule>,
        sync: &mut dyn GradientSync<B>,
    ) -> Result<Accumulated, StepError> {
        let lr = self.current_lr();
        let mut accumulator = GradientsAccumulator::<M>::new();
        let mut loss = 0.0f64;
        let (mut divergence, mut entropy, mut clipped, mut tokens) =
            (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        let mut non_finite_loss = false;
        let mut failure = None;

        let (episodes, rollouts, weights) = (shard.episodes, shard.rollouts, shard.weights);
        let micro = self.config.micro_batch;
        'micro_batches: for start in (0..episodes.len()).step_by(micro) {
            let end = (start + micro).min(episodes.len());
            let mut surrogate: Option<Tensor<B, 1>> = None;
            for i in start..end {
                let episode = shard.first + i;
                let (ep, ro, w) = (&episodes[i], &rollouts[i], weights[i]);
                let scored;
                let teacher = match scores {
                    Scores::Kept(all) => &all[i],
                    Scores::PerMicroBatch(policy) => match self.score(policy, episode, ep, ro) {
                        Ok(s) => {
                            scored = s;
                            &scored
                        }
                        Err(e) => {
                            failure = Some(e);
                            break 'micro_batches;
                        }
                    },
                };
                let response = Tensor::<B, 2, Int>::from_inner(ro.tokens.clone());
                let [g, r] = ro.tokens.dims();
                let hidden = self.model.response_hidden(&ep.student, response);
                let head = self.model.lm_head();
                let expected = [g, r, head.dims()[1]];
                if hidden.dims() != expected {
                    failure = Some(StepError::StudentShape {
                        episode,
                        expected,
                        found: hidden.dims(),
                    });
                    break 'micro_batches;
                }
                let batch = ResponseBatch {
                    tokens: ro.tokens.clone(),
                    mask: ro.mask.clone(),
                    behaviour_logp: ro.behaviour_logp.clone(),
                };
                let fused = match try_fused_distillation_with_head::<B>(
                    hidden,
                    head,
                    self.model.lm_head_trainable(),
                    teacher.to_input(),
                    &batch,
                    &self.config.loss,
                    self.config.chunk_rows,
                ) {
                    Ok(fused) => fused,
                    Err(source) => {
                        failure = Some(StepError::LossEvaluation { episode, source });
                        break 'micro_batches;
                    }
                };
                let stats = fused.stats;
                let n = stats.valid_tokens as f64;
                loss += w * f64::from(stats.loss);
                divergence += n * f64::from(stats.mean_divergence);
                entropy += n * f64::from(stats.student_entropy);
                clipped += n * f64::from(stats.clip_fraction);
                tokens += n;
                if !stats.loss.is_finite() {
                    non_finite_loss = true;
                    break 'micro_batches;
                }
                // Times the loss scale (1 without loss scaling), divided out in the update.
                let weighted = fused.surrogate.mul_scalar(w * self.updater.loss_scale());
                surrogate = Some(match surrogate {
                    Some(sum) => sum.add(weighted),
                    None => weighted,
                });
            }
            if let Some(sum) = surrogate {
                let grads = sum.backward();
                accumulator
                    .accumulate(&self.model, GradientsParams::from_grads(grads, &self.model));
            }
        }

        let mut sums = [
            f64::from(u8::from(failure.is_some())),
            f64::from(u8::from(non_finite_loss)),
            loss,
            divergence,
            entropy,
            clipped,
            tokens,
        ];
        sync.sum(&mut sums)?;
        if let Some(e) = failure {
            return Err(e);
        }
        if sums[0] > 0.0 {
            return Err(SyncError::PeerFailed.into());
        }
        let [_, non_finite, loss, divergence, entropy, clipped, tokens] = sums;
        let per_token = |x: f64| {
            if tokens > 0.0 {
                (x / tokens) as f32
            } else {
                0.0
            }
        };
        let mut metrics = UpdateMetrics {
            loss: loss as f32,
            mean_divergence: per_token(divergence),
            student_entropy: per_token(entropy),
            clip_fraction: per_token(clipped),
            grad_norm: f32::NAN,
            lr,
            skipped: None,
        };
        if non_finite > 0.0 {
            metrics.skipped = Some(SkipReason::NonFiniteLoss);
            return Ok(Accumulated {
                grads: None,
                metrics,
            });
        }
        let mut grads = accumulator.grads();
        if sync.devices() > 1 {
            grads = align_gradients::<B, M>(&self.model, grads, sync)?;
            grads = sync.sum_gradients(grads)?;
        }
        Ok(Accumulated {
            grads: Some(grads),
            metrics,
        })
    }

    /// Clips and applies accumulated gradients (none: the update is skipped), then moves an
    /// EMA or frozen teacher along.
    fn apply(&mut self, accumulated: Accumulated) -> Result<UpdateMetrics, StepError> {
        let mut metrics = accumulated.metrics;
        let Some(grads) = accumulated.grads else {
            return Ok(metrics);
        };
        let outcome = self
            .updater
            .apply(&mut self.model, grads, &mut self.optimizer_steps);
        metrics.grad_norm = outcome.grad_norm;
        if !outcome.applied {
            metrics.skipped = Some(SkipReason::NonFiniteGradient);
            return Ok(metrics);
        }
        if self.teacher.mode() != TeacherMode::Live {
            let trainable = teacher::trainable_params::<B, M>(&self.model);
            self.teacher
                .after_update_trainable(&self.model.valid(), &trainable)?;
        }
        Ok(metrics)
    }
}

/// One device's episodes of a step with their rollouts and loss weights; episode `i` here is
/// episode `first + i` of the step.
struct Shard<'a, B: Backend, P> {
    episodes: &'a [Episode<P>],
    first: usize,
    rollouts: &'a [Rollout<B>],
    weights: &'a [f64],
}
