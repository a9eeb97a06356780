//! The pipeline behind `omniopsd train`: corpus → tokenizer and model → warm-up → one training
//! per (method, seed) → held-out MER-UniBench scores → plots, report, exported students.
//!
//! Invariant: this file only sequences the phases and says what each one trains on; how a
//! record becomes a sample is [`super::samples`], how a phase loops, resumes and checkpoints
//! is [`super::phase`], an update is [`super::steps`], and what is written at the end is
//! [`super::outputs`]. Every training starts from the same warm-up weights, as a pretrained
//! MLLM would be for real runs: the seeds vary what the methods do from it (sampling, data
//! order), not the starting point.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Result};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use omniopsd_checkpoint::Checkpoint;
use omniopsd_core::step::Episode;
use omniopsd_decoder::{Qwen2Model, TokenPrompt};
use tokenizers::Tokenizer;

use super::config::{Method, TrainConfig};
use super::eval;
use super::outputs;
use super::parallel::Devices;
use super::phase::{self, Phase, Plan};
use super::prompt::{self, Privileged};
use super::report::{Report, RunResult};
use super::run_dir::RunDir;
use super::samples::{self, Sample};
use super::steps::{Opsd, Sft};
use crate::data::manifest::{Limits, Split};

/// Report row of the warm-up model answering as the student.
pub const WARMUP_ROW: &str = "warmup-only";
/// Report row of the warm-up model answering with the rationale in context.
const WARMUP_TEACHER_ROW: &str = "warmup, rationale in context";
/// Result file and metric `method` of the warm-up's teacher-view evaluation.
const WARMUP_TEACHER_VIEW: &str = "warmup-teacher-view";

/// How the user asked for output.
#[derive(Clone, Copy, Debug)]
pub struct Output {
    /// No progress bars, no summary.
    pub quiet: bool,
    /// Every metric line also printed to stdout as JSON.
    pub json_logs: bool,
}

/// Everything the phases share.
pub struct Ctx<'a> {
    /// The resolved config.
    pub cfg: &'a TrainConfig,
    /// The run directory.
    pub run: &'a RunDir,
    /// The model's tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// MER-UniBench scoring data.
    pub wheels: &'a omniopsd_mer::EmotionWheels,
    /// Output options.
    pub out: Output,
    /// Set by Ctrl-C.
    pub stop: Arc<AtomicBool>,
    /// Notes for the report, added by the phases.
    pub notes: Vec<String>,
    /// `<|im_end|>`: where answers stop.
    pub stop_token: u32,
}

/// Runs `omniopsd train` on backend `B`.
pub fn train<B: AutodiffBackend>(
    cfg: &TrainConfig,
    run: &RunDir,
    devices: &Devices<B>,
    out: Output,
    memory: super::plan::MemoryCheck,
    stop: Arc<AtomicBool>,
) -> Result<Report> {
    let started = Instant::now();
    let device = devices.first();
    let limits = Limits {
        max_audio_seconds: cfg.data.max_audio_seconds,
        max_frames: cfg.data.max_frames,
        video: cfg.data.video.clone(),
        require_rationale: cfg.methods.iter().any(|m| *m == Method::Opsd),
    };
    let mut corpus = samples::load_corpus(cfg, &limits, out)?;
    let train_n = corpus
        .records
        .iter()
        .filter(|r| r.split == Split::Train)
        .count();
    let heldout_n = corpus.records.len() - train_n;
    ensure!(
        train_n > 0 && heldout_n > 0,
        "the corpus needs train and held-out samples (found {train_n} and {heldout_n})"
    );

    let (tokenizer, init) = super::tiny::prepare(cfg, run, &corpus.records)?;
    let wheels = eval::load_wheels(&cfg.eval.mer_data)?;
    let mut ctx = Ctx {
        cfg,
        run,
        tokenizer: &tokenizer,
        wheels: &wheels,
        out,
        stop,
        notes: Vec::new(),
        stop_token: prompt::stop_token(&tokenizer)?,
    };

    let ckpt = Checkpoint::open(&init)?;
    let samples = samples::build::<B::InnerBackend>(&mut ctx, &ckpt, &corpus, &limits, device)?;
    let (train, heldout): (Vec<&Sample>, Vec<&Sample>) =
        samples.iter().partition(|s| s.record.split == Split::Train);
    let heldout = match cfg.eval.max_samples {
        Some(k) => heldout.into_iter().take(k).collect(),
        None => heldout,
    };
    // The memory plan with the longest prompts of the run, before the decoder is loaded.
    let prompt = samples
        .iter()
        .map(|s| s.student.ids.len())
        .max()
        .unwrap_or(0);
    let privileged = samples
        .iter()
        .flat_map(|s| [s.rationale.as_ref(), Some(&s.label)].into_iter().flatten())
        .map(|t| t.ids.len())
        .max()
        .unwrap_or(0)
        .saturating_sub(prompt);
    let decoder = omniopsd_thinker::decoder_config(&ckpt)?;
    super::plan::check_before_loading(cfg, &decoder, prompt, privileged, memory, out.quiet)?;
    let base_model =
        omniopsd_thinker::load_decoder::<B>(&ckpt, device)?.with_compute(cfg.precision.compute());
    let (warm, mut results) = warmup::<B>(&ctx, base_model, &train, &heldout, devices)?;
    let mut notes = std::mem::take(&mut corpus.notes);
    for &seed in &cfg.seeds {
        for &method in &cfg.methods {
            let phase = Phase::Method { method, seed };
            results.push(method_phase::<B>(
                &mut ctx, phase, &warm, &train, &heldout, &ckpt, devices,
            )?);
            outputs::write_outputs(&ctx, &results, &notes, started)?;
        }
    }
    notes.append(&mut ctx.notes);
    notes.extend(outputs::observations(&results));
    outputs::write_outputs(&ctx, &results, &notes, started)
}

/// The warm-up: supervised answers with the rationale in context, which gives the tiny model
/// what a pretrained MLLM brings — reading evidence placed in its context. Scored twice on
/// the held-out set: as the student (media and subtitle only) and as the teacher (rationale
/// in context), the gap OPSD has to close.
fn warmup<B: AutodiffBackend>(
    ctx: &Ctx<'_>,
    model: Qwen2Model<B>,
    train: &[&Sample],
    heldout: &[&Sample],
    devices: &Devices<B>,
) -> Result<(Qwen2Model<B>, Vec<RunResult>)> {
    let phase = Phase::Warmup {
        seed: ctx.cfg.model.init_seed,
    };
    let seed = phase.seed();
    let started = Instant::now();
    let examples: Vec<(&TokenPrompt, &[u32])> = train
        .iter()
        .map(|s| {
            (
                s.rationale.as_ref().unwrap_or(&s.label),
                s.target.as_slice(),
            )
        })
        .collect();
    let steps = ctx.cfg.warmup.steps;
    let model = if steps == 0 {
        model
    } else {
        let plan = Plan {
            phase,
            steps,
            per_step: ctx.cfg.warmup.batch_size,
            examples: examples.len(),
            heldout: &[],
        };
        let config = ctx.cfg.warmup_sft();
        phase::drive(ctx, &plan, model, devices, |m, resumed, device| {
            Sft::start(m, config.clone(), examples.clone(), resumed, device)
        })?
        .stepper
        .into_model()
    };
    if let (Some(a), Some(b)) = (
        phase::read_result(ctx.run, &phase.name())?,
        phase::read_result(ctx.run, WARMUP_TEACHER_VIEW)?,
    ) {
        return Ok((model, vec![a, b]));
    }
    let inner = model.valid();
    let (scores, _) = eval::evaluate(ctx, &inner, heldout, &phase.name(), |s| &s.student)?;
    eval::log(ctx, phase.method(), seed, phase.kind(), steps, &scores)?;
    let (teacher, _) = eval::evaluate(ctx, &inner, heldout, WARMUP_TEACHER_VIEW, |s| {
        s.rationale.as_ref().unwrap_or(&s.label)
    })?;
    eval::log(
        ctx,
        WARMUP_TEACHER_VIEW,
        seed,
        phase.kind(),
        steps,
        &teacher,
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let results = vec![
        RunResult {
            method: WARMUP_ROW.into(),
            seed,
            scores,
            final_divergence: None,
            seconds,
        },
        RunResult {
            method: WARMUP_TEACHER_ROW.into(),
            seed,
            scores: teacher,
            final_divergence: None,
            seconds: 0.0,
        },
    ];
    phase::write_result(ctx.run, &phase.name(), &results[0])?;
    phase::write_result(ctx.run, WARMUP_TEACHER_VIEW, &results[1])?;
    Ok((model, results))
}

/// One row of the ablation table for one seed, starting from the warm-up weights: `label-sft`
/// is supervised on the gold answers, every other method is OPSD with its teacher view.
fn method_phase<B: AutodiffBackend>(
    ctx: &mut Ctx<'_>,
    phase: Phase,
    warm: &Qwen2Model<B>,
    train: &[&Sample],
    heldout: &[&Sample],
    init: &Checkpoint,
    devices: &Devices<B>,
) -> Result<RunResult> {
    let Phase::Method { method, seed } = phase else {
        unreachable!("method_phase runs the methods");
    };
    let name = phase.name();
    if let Some(done) = phase::read_result(ctx.run, &name)? {
        return Ok(done);
    }
    let started = Instant::now();
    let o = &ctx.cfg.opsd;
    let mut plan = Plan {
        phase,
        steps: o.steps,
        // `TrainConfig::validate` refused a product past usize, naming both keys.
        per_step: o.batch_size.saturating_mul(o.grad_accumulation),
        examples: train.len(),
        heldout,
    };
    // With `[lora]`, every method trains new adapters on the frozen warm-up weights.
    let start = match &ctx.cfg.lora {
        Some(lora) => warm.clone().with_new_adapters(&lora.config(), seed)?,
        None => warm.clone(),
    };
    let (model, final_divergence) = match method {
        Method::LabelSft => {
            let examples: Vec<(&TokenPrompt, &[u32])> = train
                .iter()
                .map(|s| (&s.student, s.target.as_slice()))
                .collect();
            let config = ctx.cfg.label_sft();
            let done = phase::drive(ctx, &plan, start, devices, |m, resumed, device| {
                Sft::start(m, config.clone(), examples.clone(), resumed, device)
            })?;
            (done.stepper.into_model(), None)
        }
        Method::Opsd | Method::OpsdLabelPrivileged | Method::OpsdNoPrivileged => {
            let kind = match method {
                Method::Opsd => Privileged::Rationale,
                Method::OpsdLabelPrivileged => Privileged::Label,
                _ => Privileged::None,
            };
            let episodes: Vec<Episode<TokenPrompt>> = train
                .iter()
                .filter_map(|s| {
                    s.teacher(kind).map(|t| Episode {
                        student: s.student.clone(),
                        teacher: t.clone(),
                    })
                })
                .collect();
            if episodes.len() < train.len() {
                ctx.notes.push(format!(
                    "{}: {} of {} training samples have no rationale and were left out",
                    method.name(),
                    train.len() - episodes.len(),
                    train.len()
                ));
            }
            ensure!(
                !episodes.is_empty(),
                "{}: no training sample has a rationale",
                method.name()
            );
            plan.examples = episodes.len();
            let config = ctx.cfg.opsd_trainer(ctx.stop_token, seed);
            let done = phase::drive(ctx, &plan, start, devices, |m, resumed, device| {
                Opsd::start(m, config.clone(), &episodes, resumed, device)
            })?;
            let divergence = done
                .last
                .as_ref()
                .and_then(|v| v.get("divergence").and_then(|v| v.as_f64()));
            (done.stepper.into_model(), divergence)
        }
    };
    let inner = model.valid();
    let (scores, answers) = eval::evaluate(ctx, &inner, heldout, &name, |s| &s.student)?;
    eval::log(ctx, phase.method(), seed, phase.kind(), o.steps, &scores)?;
    outputs::write_predictions(ctx, &name, heldout, &answers)?;
    outputs::export_student(ctx, &name, &inner, init)?;
    let result = RunResult {
        method: method.name().into(),
        seed,
        scores,
        final_divergence,
        seconds: started.elapsed().as_secs_f64(),
    };
    phase::write_result(ctx.run, &name, &result)?;
    Ok(result)
}
