//! The two kinds of update a phase runs, as the driver's [`Stepper`]: supervised (the warm-up
//! and `label-sft`) and OPSD (every `opsd*` method).
//!
//! Invariant: a stepper is a trainer plus the examples its batch indices point into; it knows
//! how its trainer's state becomes checkpoint sections and back, and which metric values an
//! update reports. Loops, checkpoint timing and logging are the driver's ([`super::phase`]).

use anyhow::Result;
use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::AutodiffBackend;
use omniopsd_core::step::{Episode, OpsdConfig, OpsdTrainer, TrainerState};
use omniopsd_core::sync::GradientSync;
use omniopsd_core::teacher::TeacherMode;
use omniopsd_decoder::{Qwen2Model, TokenPrompt};

use super::checkpoint::Sections;
use super::phase::{to_bytes, Resumed, Saved, Stepper};
use omniopsd_core::sft::{Example, SftConfig, SftTrainer};

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// Supervised updates: mean NLL of each example's target after its prompt.
pub struct Sft<'a, B: AutodiffBackend> {
    trainer: SftTrainer<B, Qwen2Model<B>>,
    examples: Vec<(&'a TokenPrompt, &'a [u32])>,
}

impl<'a, B: AutodiffBackend> Sft<'a, B> {
    /// A fresh trainer from `model`, or the checkpointed one.
    pub fn start(
        model: Qwen2Model<B>,
        config: SftConfig,
        examples: Vec<(&'a TokenPrompt, &'a [u32])>,
        resumed: Option<&Resumed>,
        device: &B::Device,
    ) -> Result<Self> {
        let trainer = match resumed {
            Some(r) => {
                let model = model.load_record(r.record::<B, _>("model", device)?);
                let optim = r.record::<B, _>("optimizer", device)?;
                let mut trainer = SftTrainer::resume(model, config, optim, r.meta.optimizer_steps);
                trainer.set_loss_scale_state(r.meta.loss_scale.map(Into::into));
                trainer
            }
            None => SftTrainer::new(model, config),
        };
        Ok(Self { trainer, examples })
    }

    /// The trained weights.
    pub fn into_model(self) -> Qwen2Model<B> {
        self.trainer.model
    }
}

impl<B: AutodiffBackend> Stepper<B> for Sft<'_, B> {
    fn step(
        &mut self,
        batch: &[usize],
        _first: usize,
        _total: usize,
        sync: &mut dyn GradientSync<B>,
    ) -> Result<Vec<(&'static str, f64)>> {
        let batch: Vec<Example<'_, TokenPrompt>> = batch
            .iter()
            .map(|&i| Example {
                prompt: self.examples[i].0,
                target: self.examples[i].1,
            })
            .collect();
        let m = self.trainer.step_shard(&batch, sync)?;
        Ok(vec![
            ("loss", f64::from(m.loss)),
            ("grad_norm", f64::from(m.grad_norm)),
            ("lr", m.lr),
            ("skipped", if m.skipped { 1.0 } else { 0.0 }),
        ])
    }

    fn model(&self) -> &Qwen2Model<B> {
        &self.trainer.model
    }

    fn save(&self) -> Result<Saved> {
        let mut sections = Sections::new();
        sections.insert(
            "model".into(),
            to_bytes::<B, _>(self.trainer.model.clone().into_record())?,
        );
        sections.insert(
            "optimizer".into(),
            to_bytes::<B, _>(self.trainer.optimizer_record())?,
        );
        Ok(Saved {
            sections,
            optimizer_steps: self.trainer.steps,
            episodes_seen: 0,
            loss_scale: self.trainer.loss_scale_state(),
        })
    }
}

/// OPSD updates: rollouts of the student, scored by the privileged teacher.
pub struct Opsd<'a, B: AutodiffBackend> {
    trainer: OpsdTrainer<B, Qwen2Model<B>>,
    episodes: &'a [Episode<TokenPrompt>],
}

impl<'a, B: AutodiffBackend> Opsd<'a, B> {
    /// A fresh trainer from `model`, or the checkpointed one (model, optimizer, teacher).
    pub fn start(
        model: Qwen2Model<B>,
        config: OpsdConfig,
        episodes: &'a [Episode<TokenPrompt>],
        resumed: Option<&Resumed>,
        device: &B::Device,
    ) -> Result<Self> {
        // LoRA's frozen teacher is the model with its adapters off: rebuilt from the model,
        // sharing its weights, never saved (see `save`).
        let lora_frozen = model.lora_config().is_some() && config.teacher == TeacherMode::Frozen;
        let trainer = match resumed {
            Some(r) => {
                let teacher = match r.has("teacher") {
                    true => {
                        let loaded = model
                            .valid()
                            .load_record(r.record::<Inner<B>, _>("teacher", device)?);
                        // A LoRA EMA teacher: its adapters on the student's base, held once.
                        Some(match model.lora_config() {
                            Some(_) => model.valid().with_adapters_of(&loaded)?,
                            None => loaded,
                        })
                    }
                    false if lora_frozen => Some(model.valid().without_adapters()),
                    false => None,
                };
                let state = TrainerState::<B, Qwen2Model<B>> {
                    optimizer: r.record::<B, _>("optimizer", device)?,
                    teacher,
                    optimizer_steps: r.meta.optimizer_steps,
                    episodes_seen: r.meta.episodes_seen,
                    seed: r.meta.seed,
                    loss_scale: r.meta.loss_scale.map(Into::into),
                };
                let model = model.load_record(r.record::<B, _>("model", device)?);
                OpsdTrainer::resume(model, config, state)?
            }
            None if lora_frozen => {
                let base = model.valid().without_adapters();
                OpsdTrainer::with_teacher(model, config, Some(base))?
            }
            None => OpsdTrainer::new(model, config)?,
        };
        Ok(Self { trainer, episodes })
    }

    /// The trained weights.
    pub fn into_model(self) -> Qwen2Model<B> {
        self.trainer.into_model()
    }
}

impl<B: AutodiffBackend> Stepper<B> for Opsd<'_, B> {
    fn step(
        &mut self,
        batch: &[usize],
        first: usize,
        total: usize,
        sync: &mut dyn GradientSync<B>,
    ) -> Result<Vec<(&'static str, f64)>> {
        let batch: Vec<Episode<TokenPrompt>> =
            batch.iter().map(|&i| self.episodes[i].clone()).collect();
        let m = self.trainer.step_shard(&batch, first, total, sync)?;
        Ok(vec![
            ("loss", f64::from(m.loss)),
            ("divergence", f64::from(m.mean_divergence)),
            ("entropy", f64::from(m.student_entropy)),
            ("clip_fraction", f64::from(m.clip_fraction)),
            ("grad_norm", f64::from(m.grad_norm)),
            ("lr", m.lr),
            ("response_length", f64::from(m.response_length)),
            ("stop_fraction", f64::from(m.stop_fraction)),
            ("skipped", if m.skipped { 1.0 } else { 0.0 }),
        ])
    }

    fn model(&self) -> &Qwen2Model<B> {
        self.trainer.model()
    }

    fn save(&self) -> Result<Saved> {
        let state = self.trainer.state();
        let mut sections = Sections::new();
        sections.insert(
            "model".into(),
            to_bytes::<B, _>(self.trainer.model().clone().into_record())?,
        );
        sections.insert("optimizer".into(), to_bytes::<B, _>(state.optimizer)?);
        let lora_frozen = self.trainer.model().lora_config().is_some()
            && self.trainer.config().teacher == TeacherMode::Frozen;
        if let Some(t) = state.teacher.filter(|_| !lora_frozen) {
            sections.insert("teacher".into(), to_bytes::<Inner<B>, _>(t.into_record())?);
        }
        Ok(Saved {
            sections,
            optimizer_steps: state.optimizer_steps,
            episodes_seen: state.episodes_seen,
            loss_scale: state.loss_scale,
        })
    }
}
