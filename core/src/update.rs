//! The optimizer update every trainer of the core shares: AdamW at a scheduled learning rate,
//! global gradient-norm clipping, and skipping an update whose gradient is not finite.
//!
//! [`crate::step::OpsdTrainer`] and [`crate::sft::SftTrainer`] differ only in the loss they
//! differentiate; both hand the accumulated gradients to an [`Updater`]. A trainer of your
//! own can do the same:
//!
//! ```
//! # use burn::backend::{Autodiff, NdArray};
//! # use burn::module::Param;
//! # use burn::optim::GradientsParams;
//! # use burn::tensor::Tensor;
//! use omniopsd_core::update::{UpdateConfig, Updater};
//!
//! type B = Autodiff<NdArray<f32>>;
//! let mut weight = Param::from_tensor(Tensor::<B, 1>::from_floats([3.0, -4.0], &Default::default()));
//! let mut updater = Updater::<B, Param<Tensor<B, 1>>>::new(UpdateConfig {
//!     learning_rate: 0.1,
//!     ..UpdateConfig::default()
//! });
//! let mut steps = 0;
//! for _ in 0..10 {
//!     let loss = weight.val().powi_scalar(2).sum(); // ‖w‖², minimised at 0
//!     let grads = GradientsParams::from_grads(loss.backward(), &weight);
//!     let outcome = updater.apply(&mut weight, grads, &mut steps);
//!     assert!(outcome.applied && outcome.grad_norm.is_finite());
//! }
//! assert_eq!(steps, 10);
//! let w = weight.val().into_data().to_vec::<f32>().unwrap();
//! assert!(w[0].abs() < 3.0 && w[1].abs() < 4.0);
//! ```

use alloc::format;
use alloc::string::String;
use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
// Without std, `f64::cos`/`sqrt` come from libm through this trait.
#[cfg(not(feature = "std"))]
#[allow(unused_imports)]
use num_traits::Float;

/// A knob out of range. Trainers wrap it in their own error type, naming the config.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`{field}` must be {expected}, found {found}")]
pub struct ConfigError {
    /// The field path in the trainer's config (`learning_rate`, `adamw.epsilon`, ...).
    pub field: &'static str,
    /// What the field must be.
    pub expected: &'static str,
    /// The value found.
    pub found: String,
}

/// How the learning rate decays after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LrDecay {
    /// Stays at the peak.
    Constant,
    /// Half-cosine from the peak to `min_lr_ratio · peak` (Loshchilov & Hutter, SGDR, 2017).
    Cosine,
    /// Straight line from the peak to `min_lr_ratio · peak`.
    Linear,
}

/// Learning-rate multiplier as a function of the optimizer update index `s` (0-based).
///
/// Warm-up: `f(s) = (s + 1) / W` for `s < W`, so the first update already moves and the
/// last warm-up update reaches the peak. Then with progress
/// `q = clamp((s − W) / max(1, S − W), 0, 1)`, `S = total_steps`, `m = min_lr_ratio`:
/// constant `f = 1`; linear `f = m + (1 − m)(1 − q)`; cosine
/// `f = m + (1 − m)·(1 + cos(π q))/2` (the shape of `transformers`'
/// `get_cosine_schedule_with_warmup`, with a floor).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    /// `W`: linear warm-up updates.
    pub warmup_steps: u64,
    /// Decay shape after warm-up.
    pub decay: LrDecay,
    /// `S`: the update index where decay ends (ignored for `Constant`).
    pub total_steps: u64,
    /// `m`: the floor of the decay, as a fraction of the peak, in `[0, 1]`.
    pub min_lr_ratio: f64,
}

impl Default for LrSchedule {
    fn default() -> Self {
        Self {
            warmup_steps: 0,
            decay: LrDecay::Constant,
            total_steps: 0,
            min_lr_ratio: 0.0,
        }
    }
}

impl LrSchedule {
    /// The multiplier `f(s)` applied to the peak learning rate at update `s`.
    pub fn factor(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).clamp(0.0, 1.0);
        let m = self.min_lr_ratio;
        match self.decay {
            LrDecay::Constant => 1.0,
            LrDecay::Linear => m + (1.0 - m) * (1.0 - progress),
            LrDecay::Cosine => {
                m + (1.0 - m) * 0.5 * (1.0 + (core::f64::consts::PI * progress).cos())
            }
        }
    }

    /// Checks `min_lr_ratio` in `[0, 1]` and, for a decaying schedule, `total_steps > warmup_steps`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(ConfigError {
                field: "schedule.min_lr_ratio",
                expected: "a number in [0, 1]",
                found: format!("{}", self.min_lr_ratio),
            });
        }
        if self.decay != LrDecay::Constant && self.total_steps <= self.warmup_steps {
            return Err(ConfigError {
                field: "schedule.total_steps",
                expected: "> schedule.warmup_steps for a decaying schedule",
                found: format!("{}", self.total_steps),
            });
        }
        Ok(())
    }
}

/// AdamW hyper-parameters (Loshchilov & Hutter 2019, as implemented by `burn::optim::AdamW`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWSettings {
    /// First-moment decay `β₁`.
    pub beta_1: f32,
    /// Second-moment decay `β₂`.
    pub beta_2: f32,
    /// Denominator guard `ε`.
    pub epsilon: f32,
    /// Decoupled weight decay `λ` (per unit learning rate).
    pub weight_decay: f32,
}

impl AdamWSettings {
    /// A fresh Burn AdamW optimizer for module `M` with these settings.
    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(&self) -> OptimizerAdaptor<AdamW, M, B> {
        AdamWConfig::new()
            .with_beta_1(self.beta_1)
            .with_beta_2(self.beta_2)
            .with_epsilon(self.epsilon)
            .with_weight_decay(self.weight_decay)
            .init()
    }
}

impl Default for AdamWSettings {
    /// PyTorch / TRL defaults, without weight decay (fine-tuning from a pretrained model).
    fn default() -> Self {
        Self {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Why an update was not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// The loss (of some episode or example) was NaN or infinite.
    NonFiniteLoss,
    /// The loss was finite but the global gradient norm was not.
    NonFiniteGradient,
}

/// The optimizer of every trainer: Burn's AdamW over the whole module.
pub type AdamWOptimizer<B, M> = OptimizerAdaptor<AdamW, M, B>;
/// Its state (first and second moments and step count per parameter), a Burn record.
pub type OptimizerRecord<B, M> = <AdamWOptimizer<B, M> as Optimizer<M, B>>::Record;

/// How updates are made, shared by every trainer's config.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UpdateConfig {
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Learning-rate schedule over optimizer updates.
    pub schedule: LrSchedule,
    /// AdamW hyper-parameters.
    pub adamw: AdamWSettings,
    /// Clip the global L2 norm of the gradient (over all parameters) to this value;
    /// `None` disables clipping.
    pub max_grad_norm: Option<f32>,
    /// Dynamic loss scaling (for f16 compute); `None`: the loss is differentiated as it is.
    pub loss_scaling: Option<LossScaling>,
}

impl Default for UpdateConfig {
    /// Learning rate `1e-6`, constant schedule, [`AdamWSettings::default`], clipping at 1,
    /// no loss scaling.
    fn default() -> Self {
        Self {
            learning_rate: 1e-6,
            schedule: LrSchedule::default(),
            adamw: AdamWSettings::default(),
            max_grad_norm: Some(1.0),
            loss_scaling: None,
        }
    }
}

/// Dynamic loss scaling, the rule of PyTorch's `torch.amp.GradScaler` (Micikevicius et al.
/// 2018, "Mixed Precision Training"): the loss is multiplied by a scale `S` before the
/// backward pass, so small gradients of a half-precision backward do not flush to zero, and
/// the gradients are multiplied by `1/S` before clipping and the update. A non-finite
/// gradient skips the update and multiplies `S` by `backoff_factor`; after
/// `growth_interval` applied updates in a row, `S` is multiplied by `growth_factor`. With
/// powers of two for `S` and both factors, scaling and unscaling are exact, so where nothing
/// overflows the update equals an unscaled one bit for bit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScaling {
    /// `S` at the first update.
    pub init_scale: f64,
    /// Factor on `S` after `growth_interval` applied updates in a row (> 1).
    pub growth_factor: f64,
    /// Factor on `S` after a non-finite gradient (in (0, 1)).
    pub backoff_factor: f64,
    /// Applied updates in a row before `S` grows (≥ 1).
    pub growth_interval: u32,
}

impl Default for LossScaling {
    /// `GradScaler`'s defaults: `S = 2¹⁶`, ×2 every 2,000 applied updates, ×½ on overflow.
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

impl LossScaling {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, expected, found: f64| {
            Err(ConfigError {
                field,
                expected,
                found: format!("{found}"),
            })
        };
        if !(self.init_scale > 0.0 && self.init_scale.is_finite()) {
            return bad(
                "loss_scaling.init_scale",
                "a finite number > 0",
                self.init_scale,
            );
        }
        if !(self.growth_factor > 1.0 && self.growth_factor.is_finite()) {
            return bad(
                "loss_scaling.growth_factor",
                "a finite number > 1",
                self.growth_factor,
            );
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return bad(
                "loss_scaling.backoff_factor",
                "a number in (0, 1)",
                self.backoff_factor,
            );
        }
        if self.growth_interval == 0 {
            return bad(
                "loss_scaling.growth_interval",
                "at least 1",
                f64::from(self.growth_interval),
            );
        }
        Ok(())
    }
}

/// Where dynamic loss scaling stands: a trainer saves it with its counters so a resumed run
/// goes on with the same scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScaleState {
    /// The current scale `S`.
    pub scale: f64,
    /// Applied updates since `S` last changed.
    pub good_steps: u32,
}

impl UpdateConfig {
    /// Checks the schedule, the AdamW settings, the learning rate and the clipping norm.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.schedule.validate()?;
        let a = &self.adamw;
        if !((0.0..1.0).contains(&a.beta_1) && (0.0..1.0).contains(&a.beta_2)) {
            return Err(ConfigError {
                field: "adamw.beta_1/beta_2",
                expected: "numbers in [0, 1)",
                found: format!("({}, {})", a.beta_1, a.beta_2),
            });
        }
        if !(a.epsilon > 0.0 && a.epsilon.is_finite()) {
            return Err(ConfigError {
                field: "adamw.epsilon",
                expected: "a finite number > 0",
                found: format!("{}", a.epsilon),
            });
        }
        if !(a.weight_decay >= 0.0 && a.weight_decay.is_finite()) {
            return Err(ConfigError {
                field: "adamw.weight_decay",
                expected: "a finite number >= 0",
                found: format!("{}", a.weight_decay),
            });
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(ConfigError {
                field: "learning_rate",
                expected: "a finite number > 0",
                found: format!("{}", self.learning_rate),
            });
        }
        if let Some(c) = self.max_grad_norm {
            if !(c > 0.0 && c.is_finite()) {
                return Err(ConfigError {
                    field: "max_grad_norm",
                    expected: "None or a finite number > 0",
                    found: format!("{}", c),
                });
            }
        }
        if let Some(scaling) = &self.loss_scaling {
            scaling.validate()?;
        }
        Ok(())
    }

    /// The learning rate of update `step` (0-based): `peak · f(step)`.
    pub fn lr(&self, step: u64) -> f64 {
        self.learning_rate * self.schedule.factor(step)
    }
}

/// What [`Updater::apply`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UpdateOutcome {
    /// Learning rate used (or that would have been used, when not applied).
    pub lr: f64,
    /// Global L2 gradient norm before clipping (NaN or inf when a gradient is not finite).
    pub grad_norm: f32,
    /// False when the gradient norm was not finite: weights and optimizer state are then
    /// unchanged ([`SkipReason::NonFiniteGradient`]).
    pub applied: bool,
}

/// AdamW with a schedule, clipping and the non-finite skip, for module `M`.
///
/// The count of updates applied so far is the trainer's (it is saved with the trainer's
/// other counters) and passed to [`Updater::apply`]; with it and [`Updater::record`] a
/// trainer resumes bit-identically through [`Updater::resume`]. The config is not checked
/// here: trainers call [`UpdateConfig::validate`] as part of their own.
pub struct Updater<B: AutodiffBackend, M: AutodiffModule<B>> {
    config: UpdateConfig,
    optimizer: AdamWOptimizer<B, M>,
    /// `Some` exactly when the config asks for loss scaling.
    scale: Option<LossScaleState>,
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> core::fmt::Debug for Updater<B, M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Updater")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> Updater<B, M> {
    /// Fresh AdamW moments.
    pub fn new(config: UpdateConfig) -> Self {
        Self {
            optimizer: config.adamw.init(),
            scale: initial_scale(&config),
            config,
        }
    }

    /// Continues with the moments saved by [`Updater::record`] (and the loss scale at its
    /// initial value; [`Updater::set_loss_scale_state`] restores a saved one).
    pub fn resume(config: UpdateConfig, record: OptimizerRecord<B, M>) -> Self {
        Self {
            optimizer: config.adamw.init().load_record(record),
            scale: initial_scale(&config),
            config,
        }
    }

    /// The factor the loss is multiplied by before the backward pass: the current loss
    /// scale, or 1 without loss scaling.
    pub fn loss_scale(&self) -> f64 {
        self.scale.map_or(1.0, |s| s.scale)
    }

    /// The loss scaling state to save with the trainer's counters (`None` without loss
    /// scaling).
    pub fn loss_scale_state(&self) -> Option<LossScaleState> {
        self.scale
    }

    /// Restores a saved loss scaling state; ignored without loss scaling in the config.
    pub fn set_loss_scale_state(&mut self, state: Option<LossScaleState>) {
        if let (Some(current), Some(saved)) = (self.scale.as_mut(), state) {
            *current = saved;
        }
    }

    /// The optimizer state to save.
    pub fn record(&self) -> OptimizerRecord<B, M> {
        self.optimizer.to_record()
    }

    /// The configuration.
    pub fn config(&self) -> &UpdateConfig {
        &self.config
    }

    /// The learning rate of the update after `steps` applied ones.
    pub fn lr(&self, steps: u64) -> f64 {
        self.config.lr(steps)
    }

    /// One update of `model` from `grads`, the gradients of the loss (times
    /// [`Updater::loss_scale`], which is divided out first), after `steps` applied updates:
    /// clip the global gradient norm ([`clip_global_grad_norm`]); when it is finite, apply
    /// AdamW at [`Updater::lr`]`(steps)` and count the update in `steps`; otherwise leave
    /// `model`, the optimizer state and `steps` untouched. With loss scaling the scale then
    /// moves as [`LossScaling`] says.
    pub fn apply(
        &mut self,
        model: &mut M,
        grads: GradientsParams,
        steps: &mut u64,
    ) -> UpdateOutcome {
        let lr = self.lr(*steps);
        let grads = match self.scale {
            Some(state) => scale_grads::<B, M>(model, grads, (1.0 / state.scale) as f32),
            None => grads,
        };
        let (grads, grad_norm) =
            clip_global_grad_norm::<B, M>(model, grads, self.config.max_grad_norm);
        if let (Some(state), Some(rule)) = (self.scale.as_mut(), self.config.loss_scaling) {
            if grad_norm.is_finite() {
                state.good_steps += 1;
                if state.good_steps >= rule.growth_interval {
                    state.scale *= rule.growth_factor;
                    state.good_steps = 0;
                }
            } else {
                state.scale *= rule.backoff_factor;
                state.good_steps = 0;
            }
        }
        if !grad_norm.is_finite() {
            return UpdateOutcome {
                lr,
                grad_norm,
                applied: false,
            };
        }
        *model = self.optimizer.step(lr, model.clone(), grads);
        *steps += 1;
        UpdateOutcome {
            lr,
            grad_norm,
            applied: true,
        }
    }
}

struct SquaredNorm<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    total: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let sq = g.square().sum();
            self.total = Some(match self.total.take() {
                Some(t) => t.add(sq),
                None => sq,
            });
        }
    }
}

/// `‖g‖₂` over every parameter gradient of `model`, read back once (NaN/inf propagate).
fn global_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &GradientsParams,
) -> f32 {
    let mut visitor = SquaredNorm::<B> { grads, total: None };
    model.visit(&mut visitor);
    match visitor.total {
        Some(t) => t.into_scalar().elem::<f64>().sqrt() as f32,
        None => 0.0,
    }
}

struct ScaleGrads<B: AutodiffBackend> {
    grads: GradientsParams,
    factor: f32,
    _backend: core::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for ScaleGrads<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads
                .register::<B::InnerBackend, D>(param.id, g.mul_scalar(self.factor));
        }
    }
}

/// The first loss scaling state of `config` (`None` without loss scaling).
fn initial_scale(config: &UpdateConfig) -> Option<LossScaleState> {
    config.loss_scaling.map(|rule| LossScaleState {
        scale: rule.init_scale,
        good_steps: 0,
    })
}

/// Every gradient of `model`'s parameters times `factor`.
fn scale_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: GradientsParams,
    factor: f32,
) -> GradientsParams {
    let mut visitor = ScaleGrads::<B> {
        grads,
        factor,
        _backend: core::marker::PhantomData,
    };
    model.visit(&mut visitor);
    visitor.grads
}

/// Global gradient-norm clipping, as `torch.nn.utils.clip_grad_norm_`: with
/// `‖g‖ = sqrt(Σ_p ‖g_p‖²)` over every parameter of `model`, scales every gradient by
/// `c / (‖g‖ + 1e-6)` when `‖g‖ > c`. Returns the gradients and the pre-clip `‖g‖` (NaN or
/// inf when a gradient is non-finite; nothing is scaled then). `max_norm = None` only
/// measures.
pub fn clip_global_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: GradientsParams,
    max_norm: Option<f32>,
) -> (GradientsParams, f32) {
    let norm = global_grad_norm::<B, M>(model, &grads);
    match max_norm {
        Some(max) if norm.is_finite() && norm > max => {
            (scale_grads::<B, M>(model, grads, max / (norm + 1e-6)), norm)
        }
        _ => (grads, norm),
    }
}
