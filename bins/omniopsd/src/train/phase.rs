//! The phase driver: one loop for every training phase (the warm-up, and each method × seed).
//!
//! Invariant: a phase supplies only its update ([`Stepper`]); the driver owns everything
//! around it, identically for every phase: resuming from the newest valid checkpoint,
//! dropping metric lines a killed run wrote past it, the data order, progress, metric lines,
//! periodic held-out evaluation, checkpoints (when due, at the end, on Ctrl-C) and stopping
//! with [`Interrupted`]. Nothing in a phase depends on wall time or on state outside its
//! checkpoint: data order is a function of `(seed, phase, step)`, rollouts use the core's
//! counter-based sampler, and model, optimizer and teacher are saved at full precision, so a
//! resumed phase reaches bit-identical weights.
//!
//! With several devices the driver is device 0's thread: it also starts one worker per other
//! device ([`super::parallel`]), each with its own stepper, and hands each its share of every
//! update; everything above stays the driver's alone.
//!
//! Every phase checkpoints into `checkpoints/{phase}/` and marks completion with
//! `results/{phase}.json`, so `--resume` skips finished phases.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::{anyhow, ensure, Context, Result};
use burn::module::{AutodiffModule, Module};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use omniopsd_core::step::LossScaleState;
use omniopsd_core::sync::{GradientSync, SingleDevice};
use omniopsd_decoder::Qwen2Model;
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, Sections};
use super::config::{Method, TrainConfig};
use super::eval;
use super::parallel::{self, Devices, ExitOnPanic, Workers};
use super::progress;
use super::report::RunResult;
use super::run::Ctx;
use super::run_dir::{MetricLine, RunDir};
use super::samples::Sample;

/// A training phase: what its checkpoints, results, metric lines and data order are keyed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The warm-up SFT every method starts from, seeded by `model.init_seed`.
    Warmup {
        /// `model.init_seed`.
        seed: u64,
    },
    /// One row of the ablation table for one seed.
    Method {
        /// The row.
        method: Method,
        /// The seed.
        seed: u64,
    },
}

impl Phase {
    /// `warmup` or `{method}-seed{S}`: its directory and result file names.
    pub fn name(&self) -> String {
        match self {
            Phase::Warmup { .. } => "warmup".into(),
            Phase::Method { method, seed } => format!("{}-seed{seed}", method.name()),
        }
    }

    /// The `method` field of its metric lines.
    pub fn method(&self) -> &'static str {
        match self {
            Phase::Warmup { .. } => "warmup",
            Phase::Method { method, .. } => method.name(),
        }
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        match *self {
            Phase::Warmup { seed } | Phase::Method { seed, .. } => seed,
        }
    }

    /// `warmup`, `sft` or `opsd`: the `phase` field of its metric lines.
    pub fn kind(&self) -> &'static str {
        match self {
            Phase::Warmup { .. } => "warmup",
            Phase::Method {
                method: Method::LabelSft,
                ..
            } => "sft",
            Phase::Method { .. } => "opsd",
        }
    }
}

/// A training stopped by Ctrl-C after saving its checkpoint.
#[derive(Debug, thiserror::Error)]
#[error("interrupted: checkpoint saved; continue with `omniopsd train --resume {}`", .0.display())]
pub struct Interrupted(pub PathBuf);

/// What a phase supplies: one update, and the state to checkpoint.
pub trait Stepper<B: AutodiffBackend> {
    /// One update on the phase's examples at `batch`, this device's share of the update: the
    /// update's examples `first .. first + batch.len()` of `total`, the other shares stepped
    /// at the same time by the devices `sync` joins (the whole update, with
    /// `SingleDevice`). The metric values it measured, over the whole update, `loss` first.
    fn step(
        &mut self,
        batch: &[usize],
        first: usize,
        total: usize,
        sync: &mut dyn GradientSync<B>,
    ) -> Result<Vec<(&'static str, f64)>>;
    /// The current weights.
    fn model(&self) -> &Qwen2Model<B>;
    /// Record sections to checkpoint (`model`, `optimizer`, …) and the trainer's counters.
    fn save(&self) -> Result<Saved>;
}

/// A stepper's checkpointed state.
pub struct Saved {
    /// Named record bytes.
    pub sections: Sections,
    /// Optimizer updates applied.
    pub optimizer_steps: u64,
    /// Episodes consumed (OPSD; 0 for SFT).
    pub episodes_seen: u64,
    /// Where dynamic loss scaling stands (`precision = "f16-mixed"`; `None` otherwise).
    pub loss_scale: Option<LossScaleState>,
}

/// [`LossScaleState`] as a checkpoint's meta stores it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedScale {
    pub scale: f64,
    pub good_steps: u32,
}

impl From<LossScaleState> for SavedScale {
    fn from(s: LossScaleState) -> Self {
        Self {
            scale: s.scale,
            good_steps: s.good_steps,
        }
    }
}

impl From<SavedScale> for LossScaleState {
    fn from(s: SavedScale) -> Self {
        Self {
            scale: s.scale,
            good_steps: s.good_steps,
        }
    }
}

/// What a phase checkpoint holds besides the records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// [`Phase::name`].
    pub phase: String,
    /// `step()` calls done in this phase.
    pub step: u64,
    /// Optimizer updates applied.
    pub optimizer_steps: u64,
    /// Episodes consumed.
    pub episodes_seen: u64,
    /// The dynamic loss scale (only with loss scaling; absent in older checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<SavedScale>,
    /// The phase's seed.
    pub seed: u64,
    /// Identifies the model shape, so a checkpoint never loads into another model.
    pub fingerprint: String,
    /// Whether the phase had finished.
    pub done: bool,
}

/// A loaded phase checkpoint, handed to the stepper's constructor.
pub struct Resumed {
    /// Its meta section.
    pub meta: Meta,
    /// Its record sections.
    pub sections: Sections,
}

impl Resumed {
    /// Section `name`, deserialized as a record on `device`.
    pub fn record<B: Backend, R: burn::record::Record<B>>(
        &self,
        name: &str,
        device: &B::Device,
    ) -> Result<R> {
        let bytes = self
            .sections
            .get(name)
            .with_context(|| format!("checkpoint of {}: no `{name}` section", self.meta.phase))?;
        from_bytes::<B, R>(bytes, device)
    }

    /// Whether the checkpoint has section `name`.
    pub fn has(&self, name: &str) -> bool {
        self.sections.contains_key(name)
    }
}

/// How long a phase runs and on what.
pub struct Plan<'a> {
    /// The phase.
    pub phase: Phase,
    /// Updates.
    pub steps: u64,
    /// Examples per update.
    pub per_step: usize,
    /// How many examples the stepper indexes.
    pub examples: usize,
    /// Evaluated every `eval.every` updates (empty: never).
    pub heldout: &'a [&'a Sample],
}

/// A finished phase: its stepper, and the values of its last update (read back from
/// `metrics.jsonl` when the phase had finished before this run).
pub struct Finished<S> {
    /// The stepper after the last update.
    pub stepper: S,
    /// The last update's metric values.
    pub last: Option<serde_json::Map<String, serde_json::Value>>,
}

fn recorder() -> BinBytesRecorder<FullPrecisionSettings> {
    BinBytesRecorder::<FullPrecisionSettings>::default()
}

/// A record as checkpoint bytes (full precision).
pub fn to_bytes<B: Backend, R: burn::record::Record<B>>(record: R) -> Result<Vec<u8>> {
    Recorder::<B>::record(&recorder(), record, ()).map_err(|e| anyhow!("serializing: {e:?}"))
}

fn from_bytes<B: Backend, R: burn::record::Record<B>>(
    bytes: &[u8],
    device: &B::Device,
) -> Result<R> {
    Recorder::<B>::load(&recorder(), bytes.to_vec(), device)
        .map_err(|e| anyhow!("deserializing: {e:?}"))
}

/// Runs `plan` from `model` on `devices`: `start` builds a device's stepper, fresh or from
/// the checkpoint found; with several devices, each of this machine's other devices gets a
/// worker thread with its own stepper ([`parallel`]), and every update is split between them.
pub fn drive<B, S, F>(
    ctx: &Ctx<'_>,
    plan: &Plan<'_>,
    model: Qwen2Model<B>,
    devices: &Devices<B>,
    start: F,
) -> Result<Finished<S>>
where
    B: AutodiffBackend,
    S: Stepper<B>,
    F: Fn(Qwen2Model<B>, Option<&Resumed>, &B::Device) -> Result<S> + Sync,
{
    let name = plan.phase.name();
    let print = fingerprint(&model, ctx.cfg);
    let resumed = load(ctx, &name, &print)?;
    let step = resumed.as_ref().map_or(0, |r| r.meta.step);
    if devices.total() == 1 {
        let stepper = start(model, resumed.as_ref(), devices.first())?;
        return steps(
            ctx,
            plan,
            &print,
            stepper,
            resumed.as_ref(),
            |stepper, batch| stepper.step(batch, 0, batch.len(), &mut SingleDevice),
        );
    }
    let model = match devices.cluster() {
        true => parallel::renumber(model),
        false => model,
    };
    let (resumed, start) = (&resumed, &start);
    std::thread::scope(|scope| {
        let _exit = ExitOnPanic;
        let workers = Workers::spawn(scope, devices, &model, resumed.as_ref(), start);
        let stepper = start(model, resumed.as_ref(), devices.first());
        workers.ready()?;
        let stepper = stepper?;
        let mut sync = devices.sync(0);
        workers.agree(step, || parallel::agree_on_step(&mut *sync, step))?;
        steps(
            ctx,
            plan,
            &print,
            stepper,
            resumed.as_ref(),
            |stepper, batch| {
                workers.step(devices, batch, |share| {
                    stepper.step(&batch[share.clone()], share.start, batch.len(), &mut *sync)
                })
            },
        )
    })
}

/// The phase's loop from where `resumed` left it: `update` makes one update of the stepper.
fn steps<B, S>(
    ctx: &Ctx<'_>,
    plan: &Plan<'_>,
    print: &str,
    mut stepper: S,
    resumed: Option<&Resumed>,
    mut update: impl FnMut(&mut S, &[usize]) -> Result<Vec<(&'static str, f64)>>,
) -> Result<Finished<S>>
where
    B: AutodiffBackend,
    S: Stepper<B>,
{
    let phase = plan.phase;
    let name = phase.name();
    let mut step = resumed.map_or(0, |r| r.meta.step);
    forget_after(ctx.run, phase, resumed.map(|r| r.meta.step))?;
    if resumed.is_some_and(|r| r.meta.done) {
        let last = ctx
            .run
            .read_metrics()?
            .into_iter()
            .rev()
            .find(|m| m.method == phase.method() && m.seed == phase.seed() && m.kind == "train")
            .map(|m| m.values);
        return Ok(Finished { stepper, last });
    }
    let bar = progress::bar(plan.steps, &name, ctx.out.quiet);
    bar.set_position(step);
    let mut last = None;
    while step < plan.steps {
        let idx = batch_indices(phase.seed(), &name, step, plan.examples, plan.per_step);
        let measured = update(&mut stepper, &idx)?;
        step += 1;
        bar.set_position(step);
        bar.set_message(
            measured
                .iter()
                .filter(|(k, _)| matches!(*k, "loss" | "divergence"))
                .map(|(k, v)| format!("{} {v:.4}", if *k == "loss" { "loss" } else { "div" }))
                .collect::<Vec<_>>()
                .join(" "),
        );
        let values = values(&measured);
        last = Some(values.clone());
        metric(
            ctx,
            MetricLine {
                kind: "train".into(),
                method: phase.method().into(),
                seed: phase.seed(),
                phase: phase.kind().into(),
                step,
                values,
            },
        )?;
        let interrupted = ctx.stop.load(Ordering::SeqCst);
        // Not after the last update: the phase's caller scores the final model.
        let every_eval = ctx.cfg.eval.every;
        if every_eval > 0
            && step % every_eval == 0
            && step < plan.steps
            && !plan.heldout.is_empty()
            && !interrupted
        {
            let (scores, _) =
                eval::evaluate(ctx, &stepper.model().valid(), plan.heldout, &name, |s| {
                    &s.student
                })?;
            eval::log(
                ctx,
                phase.method(),
                phase.seed(),
                phase.kind(),
                step,
                &scores,
            )?;
        }
        let every_ckpt = ctx.cfg.checkpoint.every;
        let done = step == plan.steps;
        if interrupted || done || (every_ckpt > 0 && step % every_ckpt == 0) {
            save(ctx, phase, print, step, done, stepper.save()?)?;
        }
        if interrupted {
            bar.abandon();
            return Err(Interrupted(ctx.run.root.clone()).into());
        }
    }
    bar.finish_and_clear();
    Ok(Finished { stepper, last })
}

fn fingerprint<B: Backend>(model: &impl Module<B>, cfg: &TrainConfig) -> String {
    format!("params={} model={:?}", model.num_params(), cfg.model)
}

fn load(ctx: &Ctx<'_>, phase: &str, fingerprint: &str) -> Result<Option<Resumed>> {
    let dir = ctx.run.checkpoints(phase);
    let Some(loaded) = checkpoint::load_latest(&dir)? else {
        return Ok(None);
    };
    for r in &loaded.rejected {
        eprintln!("warning: skipped a damaged checkpoint: {r}");
    }
    let meta: Meta = serde_json::from_slice(
        loaded
            .sections
            .get("meta")
            .with_context(|| format!("{}: no `meta` section", loaded.path.display()))?,
    )
    .with_context(|| format!("{}: bad `meta` section", loaded.path.display()))?;
    ensure!(
        meta.step == loaded.step && meta.phase == phase,
        "{}: its file name and its `meta` section disagree (step {} / {}, phase {})",
        loaded.path.display(),
        loaded.step,
        meta.step,
        meta.phase
    );
    ensure!(
        meta.fingerprint == fingerprint,
        "{}: saved for a different model ({}), this run has {}",
        loaded.path.display(),
        meta.fingerprint,
        fingerprint
    );
    Ok(Some(Resumed {
        meta,
        sections: loaded.sections,
    }))
}

fn save(
    ctx: &Ctx<'_>,
    phase: Phase,
    fingerprint: &str,
    step: u64,
    done: bool,
    saved: Saved,
) -> Result<()> {
    let meta = Meta {
        phase: phase.name(),
        step,
        optimizer_steps: saved.optimizer_steps,
        episodes_seen: saved.episodes_seen,
        loss_scale: saved.loss_scale.map(SavedScale::from),
        seed: phase.seed(),
        fingerprint: fingerprint.into(),
        done,
    };
    let mut sections = saved.sections;
    sections.insert("meta".into(), serde_json::to_vec(&meta)?);
    let dir = ctx.run.checkpoints(&meta.phase);
    checkpoint::save(
        &dir,
        meta.step,
        &sections,
        ctx.cfg.checkpoint.keep_last.max(1),
    )
    .with_context(|| format!("saving the checkpoint of {}", meta.phase))?;
    Ok(())
}

/// Drops metric lines a killed run wrote past the checkpoint it resumes from.
fn forget_after(run: &RunDir, phase: Phase, step: Option<u64>) -> Result<()> {
    run.retain_metrics(|m| {
        !(m.method == phase.method()
            && m.seed == phase.seed()
            && m.phase == phase.kind()
            && step.is_none_or(|s| m.step > s))
    })
}

/// Indices of the examples of `step`: epochs are seeded permutations of `0..n`, keyed by the
/// phase, so the order is a pure function of `(seed, phase, step)`.
fn batch_indices(seed: u64, phase: &str, step: u64, n: usize, per_step: usize) -> Vec<usize> {
    let key = omniopsd_core::rng::fnv1a64(phase.as_bytes());
    let permutation = |epoch: u64| {
        let mut perm: Vec<usize> = (0..n).collect();
        let mut rng = omniopsd_core::rng::SplitMix64::new(seed ^ key, epoch);
        for i in (1..n).rev() {
            perm.swap(i, rng.below(i + 1));
        }
        perm
    };
    let mut out = Vec::with_capacity(per_step);
    let (mut epoch, mut perm) = (u64::MAX, Vec::new());
    for j in 0..per_step as u64 {
        let k = step * per_step as u64 + j;
        if k / n as u64 != epoch {
            epoch = k / n as u64;
            perm = permutation(epoch);
        }
        out.push(perm[(k % n as u64) as usize]);
    }
    out
}

/// Appends a line to `metrics.jsonl` (and prints it with `--json-logs`).
pub fn metric(ctx: &Ctx<'_>, line: MetricLine) -> Result<()> {
    if ctx.out.json_logs {
        println!("{}", serde_json::to_string(&line)?);
    }
    ctx.run.append_metric(&line)
}

/// Named values as a metric line's `values` (non-finite numbers as `null`).
pub fn values(pairs: &[(&str, f64)]) -> serde_json::Map<String, serde_json::Value> {
    pairs
        .iter()
        .map(|(k, v)| {
            let v = serde_json::Number::from_f64(*v)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null);
            (k.to_string(), v)
        })
        .collect()
}

fn result_path(run: &RunDir, name: &str) -> PathBuf {
    run.root.join("results").join(format!("{name}.json"))
}

/// `results/{name}.json`, if that phase (or warm-up view) has finished.
pub fn read_result(run: &RunDir, name: &str) -> Result<Option<RunResult>> {
    let path = result_path(run, name);
    match fs::read(&path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Marks `name` finished with its result.
pub fn write_result(run: &RunDir, name: &str, result: &RunResult) -> Result<()> {
    let path = result_path(run, name);
    fs::create_dir_all(path.parent().unwrap_or(&run.root))?;
    Ok(omniopsd_checkpoint::atomic::write_atomic(
        &path,
        &serde_json::to_vec_pretty(result)?,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_order_is_a_pure_function_covering_each_epoch() {
        let a: Vec<usize> = (0..5)
            .flat_map(|s| batch_indices(3, "opsd-seed3", s, 10, 2))
            .collect();
        let b: Vec<usize> = (0..5)
            .flat_map(|s| batch_indices(3, "opsd-seed3", s, 10, 2))
            .collect();
        assert_eq!(a, b);
        let mut epoch = a.clone();
        epoch.sort();
        assert_eq!(
            epoch,
            (0..10).collect::<Vec<_>>(),
            "one epoch visits every index once"
        );
        let c: Vec<usize> = (0..5)
            .flat_map(|s| batch_indices(3, "label-sft-seed3", s, 10, 2))
            .collect();
        assert_ne!(a, c, "phases shuffle differently");
    }

    #[test]
    fn phase_names_and_kinds_are_the_file_and_metric_keys() {
        let w = Phase::Warmup { seed: 0 };
        assert_eq!(
            (w.name().as_str(), w.method(), w.kind()),
            ("warmup", "warmup", "warmup")
        );
        let s = Phase::Method {
            method: Method::LabelSft,
            seed: 2,
        };
        assert_eq!((s.name().as_str(), s.kind()), ("label-sft-seed2", "sft"));
        let o = Phase::Method {
            method: Method::OpsdNoPrivileged,
            seed: 1,
        };
        assert_eq!(
            (o.name().as_str(), o.kind()),
            ("opsd-no-privileged-seed1", "opsd")
        );
    }
}
