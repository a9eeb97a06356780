//! The pipeline behind `omniopsd train`: corpus → tokenizer and model → warm-up → one training
//! per (method, seed) → held-out MER-UniBench scores → plots, report, exported students.
//!
//! Every phase (`warmup-seed{S}`, `{method}-seed{S}`) checkpoints into its own directory and
//! marks completion with `results/{phase}.json`, so `--resume` skips finished phases and
//! continues the unfinished one from its newest valid checkpoint. Nothing in a phase depends
//! on wall time or on state outside its checkpoint: data order is a function of
//! `(seed, phase, step)`, rollouts use the core's counter-based sampler, and model, optimizer
//! and teacher are saved at full precision — so a resumed run reaches bit-identical weights.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use burn::module::{AutodiffModule, Module};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::TensorData;
use omniopsd_checkpoint::{Checkpoint, Dtype};
use omniopsd_core::divergence::{Divergence, LossConfig, Reduction, TopK};
use omniopsd_core::rollout::RolloutConfig;
use omniopsd_core::sampling::SamplingConfig;
use omniopsd_core::step::{
    AdamWSettings, Episode, LrDecay, LrSchedule, OpsdConfig, OpsdTrainer, StepMetrics, TrainerState,
};
use omniopsd_core::teacher::TeacherMode;
use omniopsd_decoder::{Qwen2Model, TokenPrompt};
use omniopsd_thinker::{MediaInput, Thinker};
use omniopsd_vision::ProcessorConfig;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::checkpoint;
use super::config::{
    BadSamplePolicy, DecayName, DivergenceName, Method, ReductionName, TeacherName, TrainConfig,
};
use super::eval::{self, Privileged};
use super::omni::{self, View};
use super::plot::{self, Series};
use super::progress;
use super::report::{self, Report, RunResult, Scores};
use super::run_dir::{write_file_atomic, MetricLine, RunDir};
use super::sft::{Example, SftConfig, SftTrainer};
use crate::data::manifest::{self, Limits, Record, Split};
use crate::data::synth;

/// How the user asked for output.
#[derive(Clone, Copy, Debug)]
pub struct Output {
    /// No progress bars, no summary.
    pub quiet: bool,
    /// Every metric line also printed to stdout as JSON.
    pub json_logs: bool,
}

/// A training stopped by Ctrl-C after saving its checkpoint.
#[derive(Debug, thiserror::Error)]
#[error("interrupted: checkpoint saved; continue with `omniopsd train --resume {}`", .0.display())]
pub struct Interrupted(pub PathBuf);

/// One sample ready for the model: its prompts in every view and the gold answer's ids.
struct Sample {
    record: Record,
    student: TokenPrompt,
    rationale: Option<TokenPrompt>,
    label: TokenPrompt,
    target: Vec<u32>,
}

impl Sample {
    fn teacher(&self, kind: Privileged) -> Option<&TokenPrompt> {
        match kind {
            Privileged::Rationale => self.rationale.as_ref(),
            Privileged::Label => Some(&self.label),
            Privileged::None => Some(&self.student),
        }
    }
}

/// What a phase checkpoint holds besides the records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Meta {
    phase: String,
    /// `step()` calls done in this phase.
    step: u64,
    optimizer_steps: u64,
    episodes_seen: u64,
    seed: u64,
    /// Identifies the model shape, so a checkpoint never loads into another model.
    fingerprint: String,
    done: bool,
}

/// Everything the phases share.
struct Ctx<'a> {
    cfg: &'a TrainConfig,
    run: &'a RunDir,
    tokenizer: &'a Tokenizer,
    wheels: &'a omniopsd_mer::EmotionWheels,
    out: Output,
    stop: Arc<AtomicBool>,
    notes: Vec<String>,
    /// `<|im_end|>`: where answers stop.
    stop_token: u32,
}

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

fn recorder() -> BinBytesRecorder<FullPrecisionSettings> {
    BinBytesRecorder::<FullPrecisionSettings>::default()
}

fn to_bytes<B: burn::tensor::backend::Backend, R: burn::record::Record<B>>(
    record: R,
) -> Result<Vec<u8>> {
    Recorder::<B>::record(&recorder(), record, ()).map_err(|e| anyhow!("serializing: {e:?}"))
}

fn from_bytes<B: burn::tensor::backend::Backend, R: burn::record::Record<B>>(
    bytes: &[u8],
    device: &B::Device,
) -> Result<R> {
    Recorder::<B>::load(&recorder(), bytes.to_vec(), device)
        .map_err(|e| anyhow!("deserializing: {e:?}"))
}

/// The core trainer's configuration from the `[opsd]` table.
pub fn opsd_config(cfg: &TrainConfig, stop_token: u32, seed: u64) -> OpsdConfig {
    let o = &cfg.opsd;
    let divergence = match o.divergence {
        DivergenceName::ForwardKl => Divergence::ForwardKl,
        DivergenceName::ReverseKl => Divergence::ReverseKl,
        DivergenceName::Jsd => Divergence::Jsd { beta: o.beta },
        DivergenceName::SampledReverseKl => Divergence::SampledReverseKl {
            ratio_clip: o.ratio_clip,
        },
    };
    OpsdConfig {
        rollout: RolloutConfig {
            sampling: SamplingConfig {
                temperature: o.temperature,
                top_k: o.top_k,
                top_p: o.top_p,
            },
            samples_per_prompt: o.samples_per_prompt,
            max_new_tokens: o.max_new_tokens,
            stop_tokens: vec![stop_token],
            // Padding is masked out, so any in-vocabulary id does.
            pad_token: stop_token,
            logp_temperature: o.loss_temperature,
        },
        loss: LossConfig {
            divergence,
            top_k: o.loss_top_k.map(|k| TopK {
                k,
                tail: o.loss_top_k_tail,
            }),
            reduction: match o.reduction {
                ReductionName::Token => Reduction::Token,
                ReductionName::Sequence => Reduction::Sequence,
            },
            temperature: o.loss_temperature,
            kl_clip: o.kl_clip,
        },
        teacher: match o.teacher {
            TeacherName::Live => TeacherMode::Live,
            TeacherName::Frozen => TeacherMode::Frozen,
            TeacherName::Ema => TeacherMode::Ema { rate: o.ema_rate },
        },
        adamw: adamw(cfg),
        learning_rate: o.learning_rate,
        schedule: schedule(cfg, o.steps * o.updates_per_rollout as u64),
        max_grad_norm: o.max_grad_norm,
        updates_per_rollout: o.updates_per_rollout,
        chunk_rows: o.chunk_rows,
        seed,
    }
}

fn adamw(cfg: &TrainConfig) -> AdamWSettings {
    let o = &cfg.opsd;
    AdamWSettings {
        beta_1: o.adam_beta1,
        beta_2: o.adam_beta2,
        epsilon: o.adam_epsilon,
        weight_decay: o.weight_decay,
    }
}

fn schedule(cfg: &TrainConfig, total_steps: u64) -> LrSchedule {
    let o = &cfg.opsd;
    LrSchedule {
        warmup_steps: o.lr_warmup_steps.min(total_steps),
        decay: match o.lr_decay {
            DecayName::Constant => LrDecay::Constant,
            DecayName::Cosine => LrDecay::Cosine,
            DecayName::Linear => LrDecay::Linear,
        },
        total_steps,
        min_lr_ratio: o.min_lr_ratio,
    }
}

/// Indices of the examples of `step`: epochs are seeded permutations of `0..n`, keyed by the
/// phase, so the order is a pure function of `(seed, phase, step)`.
fn batch_indices(seed: u64, phase: &str, step: u64, n: usize, per_step: usize) -> Vec<usize> {
    let key = phase.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let permutation = |epoch: u64| {
        let mut perm: Vec<usize> = (0..n).collect();
        let mut rng = synth::SplitMix64::new(seed ^ key, epoch);
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

/// Runs `omniopsd train` on backend `B`.
pub fn train<B: AutodiffBackend>(
    cfg: &TrainConfig,
    run: &RunDir,
    device: &B::Device,
    out: Output,
    stop: Arc<AtomicBool>,
) -> Result<Report> {
    let started = Instant::now();
    let limits = Limits {
        max_audio_seconds: cfg.data.max_audio_seconds,
        max_frames: cfg.data.max_frames,
        require_rationale: cfg.methods.iter().any(|m| *m == Method::Opsd),
    };
    let (records, base, mut notes) = load_corpus(cfg, &limits, out)?;
    let train_n = records.iter().filter(|r| r.split == Split::Train).count();
    let heldout_n = records.len() - train_n;
    ensure!(
        train_n > 0 && heldout_n > 0,
        "the corpus needs train and held-out samples (found {train_n} and {heldout_n})"
    );

    let tokenizer = prepare_tokenizer(cfg, run, &records)?;
    let wheels = eval::load_wheels(&cfg.eval.mer_data)?;
    let mut ctx = Ctx {
        cfg,
        run,
        tokenizer: &tokenizer,
        wheels: &wheels,
        out,
        stop,
        notes: Vec::new(),
        stop_token: omni::stop_token(&tokenizer)?,
    };

    let mut results = Vec::new();
    // One base model for every training, as a pretrained MLLM is for real runs: the seeds
    // vary what the methods do from it (sampling, data order), not the starting point.
    let init = model_dir(cfg, run, &tokenizer)?;
    let ckpt = Checkpoint::open(&init)?;
    let json = ckpt.config_json();
    let omni_model = json.get("thinker_config").is_some() || json.get("text_config").is_some();
    let samples = if omni_model {
        let media = preprocess_media(&records, &base, &limits, cfg.model.dir.is_none(), out)?;
        encode_samples::<Inner<B>>(&ctx, &ckpt, &records, &media, device)?
    } else {
        ctx.notes.push(format!(
            "{} is a text-only checkpoint: prompts hold the subtitle (and the privileged block), no media",
            init.display()
        ));
        text_samples::<Inner<B>>(&ctx, &ckpt, &records, device)?
    };
    let (train, heldout): (Vec<&Sample>, Vec<&Sample>) =
        samples.iter().partition(|s| s.record.split == Split::Train);
    let heldout = match cfg.eval.max_samples {
        Some(k) => heldout.into_iter().take(k).collect(),
        None => heldout,
    };
    let base_model = omniopsd_thinker::load_decoder::<B>(&ckpt, device)?;
    let (warm, warm_results) = warmup_phase::<B>(&mut ctx, base_model, &train, &heldout, device)?;
    results.extend(warm_results);
    for &seed in &cfg.seeds {
        for &method in &cfg.methods {
            let r = method_phase::<B>(
                &mut ctx, method, seed, &warm, &train, &heldout, &ckpt, device,
            )?;
            results.push(r);
            write_outputs(&ctx, &results, &notes, started)?;
        }
    }
    notes.append(&mut ctx.notes);
    notes.extend(observations(&results));
    write_outputs(&ctx, &results, &notes, started)
}

/// Reads (generating on first use) the corpus and applies the bad-sample policy.
fn load_corpus(
    cfg: &TrainConfig,
    limits: &Limits,
    out: Output,
) -> Result<(Vec<Record>, PathBuf, Vec<String>)> {
    let manifest = match &cfg.data.manifest {
        Some(m) => m.clone(),
        None => {
            let dir = cfg.data.cache_dir.join(format!(
                "synth-n{}-seed{}",
                cfg.data.synth_n, cfg.data.synth_seed
            ));
            let manifest = dir.join("manifest.jsonl");
            if !manifest.is_file() {
                let synth_cfg = synth::SynthConfig {
                    n: cfg.data.synth_n,
                    seed: cfg.data.synth_seed,
                    ..synth::SynthConfig::default()
                };
                // Generate next to the final place and rename, so an interrupted generation
                // never looks like a finished corpus.
                let tmp = cfg.data.cache_dir.join(format!(
                    ".synth-n{}-seed{}.tmp",
                    cfg.data.synth_n, cfg.data.synth_seed
                ));
                let _ = fs::remove_dir_all(&tmp);
                let bar = progress::bar(synth_cfg.n as u64, "corpus", out.quiet);
                synth::synthesize(&tmp, &synth_cfg, |i| bar.set_position(i as u64)).with_context(
                    || format!("generating the synthetic corpus in {}", tmp.display()),
                )?;
                bar.finish_and_clear();
                let _ = fs::remove_dir_all(&dir);
                fs::rename(&tmp, &dir)
                    .with_context(|| format!("moving the corpus to {}", dir.display()))?;
            }
            manifest
        }
    };
    let checked = manifest::check_manifest(&manifest, limits)?;
    let mut notes = Vec::new();
    if !checked.problems.is_empty() {
        let list: Vec<String> = checked
            .problems
            .iter()
            .map(|p| format!("{}:{}: {}", manifest.display(), p.line, p.message))
            .collect();
        match cfg.data.on_bad_sample {
            BadSamplePolicy::Error => bail!(
                "{} problem(s) in the manifest (set data.on_bad_sample = \"skip\" to leave those samples out):\n{}",
                list.len(),
                list.join("\n")
            ),
            BadSamplePolicy::Skip => {
                let lines: std::collections::BTreeSet<usize> =
                    checked.problems.iter().map(|p| p.line).collect();
                notes.push(format!(
                    "{} manifest line(s) skipped as invalid: {}",
                    lines.len(),
                    list.join("; ")
                ));
                if !out.quiet {
                    for l in &list {
                        eprintln!("skipped: {l}");
                    }
                }
            }
        }
    }
    let base = manifest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok((
        checked.records.into_iter().map(|(_, r)| r).collect(),
        base,
        notes,
    ))
}

/// The tokenizer: the checkpoint's, or (embedded model) one trained on the corpus texts,
/// saved in the run directory so a resumed run uses the very same one.
fn prepare_tokenizer(cfg: &TrainConfig, run: &RunDir, records: &[Record]) -> Result<Tokenizer> {
    if let Some(dir) = &cfg.model.dir {
        let path = dir.join("tokenizer.json");
        return Tokenizer::from_file(&path).map_err(|e| anyhow!("{}: {e}", path.display()));
    }
    let path = run.root.join("tokenizer.json");
    if path.is_file() {
        return Tokenizer::from_file(&path).map_err(|e| anyhow!("{}: {e}", path.display()));
    }
    let mut texts: Vec<String> = Vec::new();
    for r in records {
        texts.push(eval::student_text(r));
        texts.push(eval::answer(r));
        texts.push(eval::privileged_text(r, Privileged::Rationale));
        texts.push(eval::privileged_text(r, Privileged::Label));
    }
    texts.push(format!(
        "system\n{}\nuser\nassistant\n",
        omni::SYSTEM_PROMPT
    ));
    let tk = super::tokenizer::train(&texts, cfg.model.vocab_size)?;
    super::tokenizer::save(&tk, &path)?;
    Ok(tk)
}

/// The checkpoint training starts from: the configured HF directory, or the embedded tiny
/// omni model initialised with `model.init_seed` in `run/init`.
fn model_dir(cfg: &TrainConfig, run: &RunDir, tk: &Tokenizer) -> Result<PathBuf> {
    if let Some(dir) = &cfg.model.dir {
        return Ok(dir.clone());
    }
    let dir = run.root.join("init");
    if !dir.join("model.safetensors").is_file() {
        omni::write_tiny_omni::<burn::backend::NdArray<f32>>(
            &dir,
            &cfg.model,
            tk,
            cfg.model.init_seed,
        )?;
    }
    Ok(dir)
}

/// Frames and audio of every record as the thinker's media inputs.
fn preprocess_media(
    records: &[Record],
    base: &Path,
    limits: &Limits,
    embedded: bool,
    out: Output,
) -> Result<Vec<Vec<MediaInput>>> {
    // Qwen2.5-Omni's processor upsamples small frames to at least 128·28² pixels; the
    // embedded model is trained from scratch on 56×56 faces, so its processor keeps them at
    // their size (8 video tokens instead of 288 per sample).
    let processor = match embedded {
        true => ProcessorConfig {
            min_pixels: 56 * 56,
            ..omni::video_processor()
        },
        false => omni::video_processor(),
    };
    let bar = progress::bar(records.len() as u64, "media", out.quiet);
    let mut all = Vec::with_capacity(records.len());
    for r in records {
        all.push(vec![
            omni::record_media(r, base, limits, &processor)?.into_input()
        ]);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(all)
}

/// Runs the (frozen) towers once per sample and lays out every view's prompt.
fn encode_samples<B: burn::tensor::backend::Backend>(
    ctx: &Ctx<'_>,
    ckpt: &Checkpoint,
    records: &[Record],
    media: &[Vec<MediaInput>],
    device: &B::Device,
) -> Result<Vec<Sample>> {
    let thinker = Thinker::<B>::from_checkpoint(ckpt, device)?;
    let tk = ctx.tokenizer;
    let bar = progress::bar(records.len() as u64, "encode", ctx.out.quiet);
    let mut out = Vec::with_capacity(records.len());
    for (r, m) in records.iter().zip(media) {
        let enc = thinker
            .encode_media(m)
            .with_context(|| format!("sample `{}`", r.id))?;
        out.push(sample(tk, r, |view| {
            let ids = omni::prompt_ids(tk, r, view)?;
            thinker
                .prompt_encoded(&ids, &enc)
                .with_context(|| format!("sample `{}`", r.id))
        })?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// A record's prompts in every view, laid out by `prompt`, and its answer's ids.
fn sample(
    tk: &Tokenizer,
    record: &Record,
    prompt: impl Fn(View) -> Result<TokenPrompt>,
) -> Result<Sample> {
    Ok(Sample {
        student: prompt(View::Student)?,
        rationale: match &record.rationale {
            Some(_) => Some(prompt(View::Teacher(Privileged::Rationale))?),
            None => None,
        },
        label: prompt(View::Teacher(Privileged::Label))?,
        target: omni::answer_ids(tk, record)?,
        record: record.clone(),
    })
}

/// Every view's prompt for a text-only decoder (`Qwen2ForCausalLM`).
fn text_samples<B: burn::tensor::backend::Backend>(
    ctx: &Ctx<'_>,
    ckpt: &Checkpoint,
    records: &[Record],
    device: &B::Device,
) -> Result<Vec<Sample>> {
    let decoder = Qwen2Model::<B>::from_checkpoint(ckpt, device)?;
    let tk = ctx.tokenizer;
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        out.push(sample(tk, r, |view| {
            let p = TokenPrompt::new(omni::text_prompt_ids(tk, r, view)?);
            decoder
                .check_prompt(&p)
                .with_context(|| format!("sample `{}`", r.id))?;
            Ok(p)
        })?);
    }
    Ok(out)
}

fn fingerprint<B: burn::tensor::backend::Backend>(
    model: &impl Module<B>,
    cfg: &TrainConfig,
) -> String {
    format!("params={} model={:?}", model.num_params(), cfg.model)
}

fn phase_result_path(run: &RunDir, phase: &str) -> PathBuf {
    run.root.join("results").join(format!("{phase}.json"))
}

fn read_result(run: &RunDir, phase: &str) -> Result<Option<RunResult>> {
    let path = phase_result_path(run, phase);
    match fs::read(&path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_result(run: &RunDir, phase: &str, result: &RunResult) -> Result<()> {
    let path = phase_result_path(run, phase);
    fs::create_dir_all(path.parent().unwrap_or(&run.root))?;
    write_file_atomic(&path, &serde_json::to_vec_pretty(result)?)
}

/// A loaded phase checkpoint.
struct Resumed {
    meta: Meta,
    sections: checkpoint::Sections,
}

fn load_phase(ctx: &Ctx<'_>, phase: &str, fingerprint: &str) -> Result<Option<Resumed>> {
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

fn save_phase(ctx: &Ctx<'_>, meta: &Meta, mut sections: checkpoint::Sections) -> Result<()> {
    sections.insert("meta".into(), serde_json::to_vec(meta)?);
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

fn section<'s>(sections: &'s checkpoint::Sections, name: &str, phase: &str) -> Result<&'s [u8]> {
    sections
        .get(name)
        .map(Vec::as_slice)
        .with_context(|| format!("checkpoint of {phase}: no `{name}` section"))
}

fn metric(ctx: &Ctx<'_>, line: MetricLine) -> Result<()> {
    if ctx.out.json_logs {
        println!("{}", serde_json::to_string(&line)?);
    }
    ctx.run.append_metric(&line)
}

fn values(pairs: &[(&str, f64)]) -> serde_json::Map<String, serde_json::Value> {
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

/// Greedy answers of the student view of `heldout`, scored with the MER-UniBench metrics.
fn evaluate<B: burn::tensor::backend::Backend>(
    ctx: &Ctx<'_>,
    model: &Qwen2Model<B>,
    heldout: &[&Sample],
    label: &str,
    prompt: impl Fn(&Sample) -> &TokenPrompt,
) -> Result<(Scores, Vec<String>)> {
    let bar = progress::bar(heldout.len() as u64, "eval", ctx.out.quiet);
    bar.set_message(label.to_string());
    let mut answers = Vec::with_capacity(heldout.len());
    for s in heldout {
        let ids = model.generate_greedy(
            prompt(s),
            ctx.cfg.eval.max_new_tokens,
            true,
            &[ctx.stop_token],
        )?;
        let ids: Vec<u32> = ids.into_iter().filter(|&t| t != ctx.stop_token).collect();
        answers.push(super::tokenizer::decode(ctx.tokenizer, &ids)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let records: Vec<&Record> = heldout.iter().map(|s| &s.record).collect();
    Ok((eval::score(ctx.wheels, &records, &answers), answers))
}

fn eval_line(
    ctx: &Ctx<'_>,
    method: &str,
    seed: u64,
    phase: &str,
    step: u64,
    scores: &Scores,
) -> Result<()> {
    metric(
        ctx,
        MetricLine {
            kind: "eval".into(),
            method: method.into(),
            seed,
            phase: phase.into(),
            step,
            values: values(&[
                ("hit", scores.hit),
                ("waf", scores.waf),
                ("fs", scores.fs),
                ("mean", scores.mean()),
                ("hit_misleading", scores.hit_misleading.unwrap_or(f64::NAN)),
            ]),
        },
    )
}

/// Drops metric lines a killed run wrote past the checkpoint it resumes from.
fn forget_after(
    ctx: &Ctx<'_>,
    method: &str,
    seed: u64,
    phase: &str,
    step: Option<u64>,
) -> Result<()> {
    ctx.run.retain_metrics(|m| {
        !(m.method == method
            && m.seed == seed
            && m.phase == phase
            && step.is_none_or(|s| m.step > s))
    })
}

fn sft_config(cfg: &TrainConfig, learning_rate: f64, steps: u64) -> SftConfig {
    SftConfig {
        learning_rate,
        schedule: schedule(cfg, steps),
        adamw: adamw(cfg),
        max_grad_norm: cfg.opsd.max_grad_norm,
    }
}

/// Supervised phase shared by the warm-up and `label-sft`: `steps` updates on `examples`.
#[allow(clippy::too_many_arguments)]
fn sft_phase<B: AutodiffBackend>(
    ctx: &mut Ctx<'_>,
    phase: &str,
    method: &str,
    seed: u64,
    model: Qwen2Model<B>,
    examples: &[(&TokenPrompt, &[u32])],
    steps: u64,
    batch: usize,
    learning_rate: f64,
    heldout: &[&Sample],
    device: &B::Device,
) -> Result<Qwen2Model<B>> {
    let print = fingerprint(&model, ctx.cfg);
    let config = sft_config(ctx.cfg, learning_rate, steps);
    let resumed = load_phase(ctx, phase, &print)?;
    let mut trainer = match &resumed {
        Some(r) => {
            let model = model.load_record(from_bytes::<B, _>(
                section(&r.sections, "model", phase)?,
                device,
            )?);
            let optim = from_bytes::<B, _>(section(&r.sections, "optimizer", phase)?, device)?;
            SftTrainer::resume(model, config, optim, r.meta.optimizer_steps)
        }
        None => SftTrainer::new(model, config),
    };
    let mut step = resumed.as_ref().map_or(0, |r| r.meta.step);
    forget_after(
        ctx,
        method,
        seed,
        phase_kind(phase),
        resumed.as_ref().map(|r| r.meta.step),
    )?;
    if resumed.as_ref().is_some_and(|r| r.meta.done) {
        return Ok(trainer.model);
    }
    let bar = progress::bar(steps, phase, ctx.out.quiet);
    bar.set_position(step);
    let save = |ctx: &Ctx<'_>, trainer: &SftTrainer<B, Qwen2Model<B>>, step: u64, done: bool| {
        let mut sections = checkpoint::Sections::new();
        sections.insert(
            "model".into(),
            to_bytes::<B, _>(trainer.model.clone().into_record())?,
        );
        sections.insert(
            "optimizer".into(),
            to_bytes::<B, _>(trainer.optimizer_record())?,
        );
        save_phase(
            ctx,
            &Meta {
                phase: phase.into(),
                step,
                optimizer_steps: trainer.steps,
                episodes_seen: 0,
                seed,
                fingerprint: print.clone(),
                done,
            },
            sections,
        )
    };
    while step < steps {
        let idx = batch_indices(seed, phase, step, examples.len(), batch);
        let batch_examples: Vec<Example<'_, TokenPrompt>> = idx
            .iter()
            .map(|&i| Example {
                prompt: examples[i].0,
                target: examples[i].1,
            })
            .collect();
        let m = trainer.step(&batch_examples)?;
        step += 1;
        bar.set_position(step);
        bar.set_message(format!("loss {:.4}", m.loss));
        let values = values(&[
            ("loss", f64::from(m.loss)),
            ("grad_norm", f64::from(m.grad_norm)),
            ("lr", m.lr),
            ("skipped", if m.skipped { 1.0 } else { 0.0 }),
        ]);
        let at = Progress {
            phase,
            method,
            seed,
            step,
            steps,
        };
        after_update(
            ctx,
            &at,
            values,
            heldout,
            &bar,
            || trainer.model.valid(),
            |done| save(ctx, &trainer, step, done),
        )?;
    }
    bar.finish_and_clear();
    Ok(trainer.model)
}

/// Where a phase's loop stands after an update.
struct Progress<'a> {
    phase: &'a str,
    method: &'a str,
    seed: u64,
    /// Updates done, this one included.
    step: u64,
    steps: u64,
}

/// What every phase does after an update: log it; evaluate the held-out set when due (not
/// after the last update: the phase's caller scores the final model); checkpoint when due, at
/// the end (`done`) and on Ctrl-C, which then stops the run with [`Interrupted`].
fn after_update<B: burn::tensor::backend::Backend>(
    ctx: &Ctx<'_>,
    at: &Progress<'_>,
    values: serde_json::Map<String, serde_json::Value>,
    heldout: &[&Sample],
    bar: &indicatif::ProgressBar,
    model: impl FnOnce() -> Qwen2Model<B>,
    save: impl FnOnce(bool) -> Result<()>,
) -> Result<()> {
    let kind = phase_kind(at.phase);
    metric(
        ctx,
        MetricLine {
            kind: "train".into(),
            method: at.method.into(),
            seed: at.seed,
            phase: kind.into(),
            step: at.step,
            values,
        },
    )?;
    let interrupted = ctx.stop.load(Ordering::SeqCst);
    let every_eval = ctx.cfg.eval.every;
    if every_eval > 0
        && at.step % every_eval == 0
        && at.step < at.steps
        && !heldout.is_empty()
        && !interrupted
    {
        let (scores, _) = evaluate(ctx, &model(), heldout, at.phase, |s| &s.student)?;
        eval_line(ctx, at.method, at.seed, kind, at.step, &scores)?;
    }
    let every_ckpt = ctx.cfg.checkpoint.every;
    let done = at.step == at.steps;
    if interrupted || done || (every_ckpt > 0 && at.step % every_ckpt == 0) {
        save(done)?;
    }
    if interrupted {
        bar.abandon();
        return Err(Interrupted(ctx.run.root.clone()).into());
    }
    Ok(())
}

/// `warmup`, `opsd` or `sft`: the `phase` field of metric lines.
fn phase_kind(phase: &str) -> &'static str {
    if phase.starts_with("warmup") {
        "warmup"
    } else if phase.starts_with("label-sft") {
        "sft"
    } else {
        "opsd"
    }
}

/// The warm-up: supervised answers with the rationale in context, which gives the tiny model
/// what a pretrained MLLM brings — reading evidence placed in its context. Scored twice on
/// the held-out set: as the student (media and subtitle only) and as the teacher (rationale
/// in context), the gap OPSD has to close.
fn warmup_phase<B: AutodiffBackend>(
    ctx: &mut Ctx<'_>,
    model: Qwen2Model<B>,
    train: &[&Sample],
    heldout: &[&Sample],
    device: &B::Device,
) -> Result<(Qwen2Model<B>, Vec<RunResult>)> {
    let phase = "warmup";
    let seed = ctx.cfg.model.init_seed;
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
    let w = &ctx.cfg.warmup;
    let (steps, batch, lr) = (w.steps, w.batch_size, w.learning_rate);
    let model = if steps == 0 {
        model
    } else {
        sft_phase(
            ctx,
            phase,
            "warmup",
            seed,
            model,
            &examples,
            steps,
            batch,
            lr,
            &[],
            device,
        )?
    };
    let teacher_phase = "warmup-teacher-view";
    if let (Some(a), Some(b)) = (
        read_result(ctx.run, phase)?,
        read_result(ctx.run, teacher_phase)?,
    ) {
        return Ok((model, vec![a, b]));
    }
    let inner = model.valid();
    let (scores, _) = evaluate(ctx, &inner, heldout, phase, |s| &s.student)?;
    eval_line(ctx, "warmup", seed, "warmup", steps, &scores)?;
    let (teacher, _) = evaluate(ctx, &inner, heldout, teacher_phase, |s| {
        s.rationale.as_ref().unwrap_or(&s.label)
    })?;
    eval_line(ctx, "warmup-teacher-view", seed, "warmup", steps, &teacher)?;
    let seconds = started.elapsed().as_secs_f64();
    let results = vec![
        RunResult {
            method: "warmup-only".into(),
            seed,
            scores,
            final_divergence: None,
            seconds,
        },
        RunResult {
            method: "warmup, rationale in context".into(),
            seed,
            scores: teacher,
            final_divergence: None,
            seconds: 0.0,
        },
    ];
    write_result(ctx.run, phase, &results[0])?;
    write_result(ctx.run, teacher_phase, &results[1])?;
    Ok((model, results))
}

/// One row of the ablation table for one seed, starting from the warm-up weights.
#[allow(clippy::too_many_arguments)]
fn method_phase<B: AutodiffBackend>(
    ctx: &mut Ctx<'_>,
    method: Method,
    seed: u64,
    warm: &Qwen2Model<B>,
    train: &[&Sample],
    heldout: &[&Sample],
    init: &Checkpoint,
    device: &B::Device,
) -> Result<RunResult> {
    let phase = format!("{}-seed{seed}", method.name());
    if let Some(done) = read_result(ctx.run, &phase)? {
        return Ok(done);
    }
    let started = Instant::now();
    let o = &ctx.cfg.opsd;
    let per_step = o.batch_size * o.grad_accumulation;
    let (model, final_divergence) = match method {
        Method::LabelSft => {
            let examples: Vec<(&TokenPrompt, &[u32])> = train
                .iter()
                .map(|s| (&s.student, s.target.as_slice()))
                .collect();
            let (steps, lr) = (o.steps, o.learning_rate);
            let model = sft_phase(
                ctx,
                &phase,
                method.name(),
                seed,
                warm.clone(),
                &examples,
                steps,
                per_step,
                lr,
                heldout,
                device,
            )?;
            (model, None)
        }
        _ => {
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
            opsd_phase(
                ctx,
                &phase,
                method,
                seed,
                warm.clone(),
                &episodes,
                per_step,
                heldout,
                device,
            )?
        }
    };
    let (scores, answers) = evaluate(ctx, &model.valid(), heldout, &phase, |s| &s.student)?;
    let kind = phase_kind(&phase);
    eval_line(ctx, method.name(), seed, kind, o.steps, &scores)?;
    write_predictions(ctx, &phase, heldout, &answers)?;
    export_student(ctx, &phase, &model.valid(), init)?;
    let result = RunResult {
        method: method.name().into(),
        seed,
        scores,
        final_divergence,
        seconds: started.elapsed().as_secs_f64(),
    };
    write_result(ctx.run, &phase, &result)?;
    Ok(result)
}

#[allow(clippy::too_many_arguments)]
fn opsd_phase<B: AutodiffBackend>(
    ctx: &mut Ctx<'_>,
    phase: &str,
    method: Method,
    seed: u64,
    model: Qwen2Model<B>,
    episodes: &[Episode<TokenPrompt>],
    per_step: usize,
    heldout: &[&Sample],
    device: &B::Device,
) -> Result<(Qwen2Model<B>, Option<f64>)> {
    let steps = ctx.cfg.opsd.steps;
    let config = opsd_config(ctx.cfg, ctx.stop_token, seed);
    let print = fingerprint(&model, ctx.cfg);
    let resumed = load_phase(ctx, phase, &print)?;
    let mut trainer: OpsdTrainer<B, Qwen2Model<B>> = match &resumed {
        Some(r) => {
            let teacher = match r.sections.get("teacher") {
                Some(bytes) => Some(
                    model
                        .valid()
                        .load_record(from_bytes::<Inner<B>, _>(bytes, device)?),
                ),
                None => None,
            };
            let state = TrainerState::<B, Qwen2Model<B>> {
                optimizer: from_bytes::<B, _>(section(&r.sections, "optimizer", phase)?, device)?,
                teacher,
                optimizer_steps: r.meta.optimizer_steps,
                episodes_seen: r.meta.episodes_seen,
                seed: r.meta.seed,
            };
            let model = model.load_record(from_bytes::<B, _>(
                section(&r.sections, "model", phase)?,
                device,
            )?);
            OpsdTrainer::resume(model, config, state)?
        }
        None => OpsdTrainer::new(model, config)?,
    };
    let mut step = resumed.as_ref().map_or(0, |r| r.meta.step);
    let name = method.name();
    forget_after(
        ctx,
        name,
        seed,
        "opsd",
        resumed.as_ref().map(|r| r.meta.step),
    )?;
    let mut last_divergence = None;
    if resumed.as_ref().is_some_and(|r| r.meta.done) {
        let lines = ctx.run.read_metrics()?;
        last_divergence = lines
            .iter()
            .rev()
            .find(|m| m.method == name && m.seed == seed && m.kind == "train")
            .and_then(|m| m.values.get("divergence").and_then(|v| v.as_f64()));
        return Ok((trainer.into_model(), last_divergence));
    }
    let bar = progress::bar(steps, phase, ctx.out.quiet);
    bar.set_position(step);
    let save = |ctx: &Ctx<'_>, trainer: &OpsdTrainer<B, Qwen2Model<B>>, step: u64, done: bool| {
        let state = trainer.state();
        let mut sections = checkpoint::Sections::new();
        sections.insert(
            "model".into(),
            to_bytes::<B, _>(trainer.model().clone().into_record())?,
        );
        sections.insert("optimizer".into(), to_bytes::<B, _>(state.optimizer)?);
        if let Some(t) = state.teacher {
            sections.insert("teacher".into(), to_bytes::<Inner<B>, _>(t.into_record())?);
        }
        save_phase(
            ctx,
            &Meta {
                phase: phase.into(),
                step,
                optimizer_steps: state.optimizer_steps,
                episodes_seen: state.episodes_seen,
                seed,
                fingerprint: print.clone(),
                done,
            },
            sections,
        )
    };
    while step < steps {
        let idx = batch_indices(seed, phase, step, episodes.len(), per_step);
        let batch: Vec<Episode<TokenPrompt>> = idx.iter().map(|&i| episodes[i].clone()).collect();
        let m: StepMetrics = trainer.step(&batch)?;
        step += 1;
        last_divergence = Some(f64::from(m.mean_divergence));
        bar.set_position(step);
        bar.set_message(format!("loss {:.4} div {:.4}", m.loss, m.mean_divergence));
        let values = values(&[
            ("loss", f64::from(m.loss)),
            ("divergence", f64::from(m.mean_divergence)),
            ("entropy", f64::from(m.student_entropy)),
            ("clip_fraction", f64::from(m.clip_fraction)),
            ("grad_norm", f64::from(m.grad_norm)),
            ("lr", m.lr),
            ("response_length", f64::from(m.response_length)),
            ("stop_fraction", f64::from(m.stop_fraction)),
            ("skipped", if m.skipped { 1.0 } else { 0.0 }),
        ]);
        let at = Progress {
            phase,
            method: name,
            seed,
            step,
            steps,
        };
        after_update(
            ctx,
            &at,
            values,
            heldout,
            &bar,
            || trainer.model().valid(),
            |done| save(ctx, &trainer, step, done),
        )?;
    }
    bar.finish_and_clear();
    Ok((trainer.into_model(), last_divergence))
}

/// `predictions/{phase}.jsonl`: the held-out answers, one JSON object per line.
fn write_predictions(
    ctx: &Ctx<'_>,
    phase: &str,
    heldout: &[&Sample],
    answers: &[String],
) -> Result<()> {
    let mut text = String::new();
    for (s, a) in heldout.iter().zip(answers) {
        let line = serde_json::json!({
            "id": s.record.id,
            "answer": a,
            "gold": eval::answer(&s.record),
            "conflict": s.record.conflict,
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let dir = ctx.run.root.join("predictions");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    write_file_atomic(&dir.join(format!("{phase}.jsonl")), text.as_bytes())
}

/// `students/{phase}/`: the trained model as an HF checkpoint directory of the same layout as
/// the one it started from (towers copied, decoder weights replaced), with its tokenizer.
fn export_student<B: burn::tensor::backend::Backend>(
    ctx: &Ctx<'_>,
    phase: &str,
    model: &Qwen2Model<B>,
    init: &Checkpoint,
) -> Result<()> {
    let dir = ctx.run.root.join("students").join(phase);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let prefix = if init.weights().contains("thinker.model.embed_tokens.weight") {
        "thinker."
    } else {
        ""
    };
    let trained: BTreeMap<String, TensorData> = model
        .export_tensors()
        .into_iter()
        .map(|(n, d)| (format!("{prefix}{n}"), d))
        .collect();
    let mut tensors = Vec::new();
    for name in init.tensor_names() {
        match trained.get(name) {
            Some(d) => tensors.push((name.to_string(), d.clone())),
            None => {
                let (values, shape) = init.read_f32(name)?;
                tensors.push((name.to_string(), TensorData::new(values, shape)));
            }
        }
    }
    for (name, data) in &trained {
        if !tensors.iter().any(|(n, _)| n == name) {
            tensors.push((name.clone(), data.clone()));
        }
    }
    omniopsd_checkpoint::save_safetensors::<B>(
        &dir.join("model.safetensors"),
        &tensors,
        Dtype::F32,
    )?;
    let config = serde_json::to_vec_pretty(init.config_json())?;
    write_file_atomic(&dir.join("config.json"), &config)?;
    super::tokenizer::save(ctx.tokenizer, &dir.join("tokenizer.json"))
}

/// Plain-words observations computed from the results.
fn observations(results: &[RunResult]) -> Vec<String> {
    let rows = report::rows(results);
    let mut notes = Vec::new();
    let get = |m: &str| rows.iter().find(|r| r.method == m);
    if let (Some(o), Some(s)) = (get("opsd"), get("label-sft")) {
        notes.push(format!(
            "opsd vs label-sft (mean of HIT, WAF, F_s): {:.2} vs {:.2} ({:+.2} points over {} seeds)",
            o.mean.mean,
            s.mean.mean,
            o.mean.mean - s.mean.mean,
            o.seeds.len()
        ));
    }
    if let (Some(o), Some(w)) = (get("opsd"), get("warmup-only")) {
        notes.push(format!(
            "opsd vs the warm-up it starts from: {:.2} vs {:.2} ({:+.2})",
            o.mean.mean,
            w.mean.mean,
            o.mean.mean - w.mean.mean
        ));
    }
    if let Some(n) = get("opsd-no-privileged") {
        notes.push(format!(
            "opsd-no-privileged: the teacher sees exactly the student's context, so its only signal is the gap between the current student and the teacher's weights (zero by construction for a live teacher); final divergence {:.2e}",
            n.final_divergence.mean
        ));
    }
    notes
}

fn write_outputs(
    ctx: &Ctx<'_>,
    results: &[RunResult],
    notes: &[String],
    started: Instant,
) -> Result<Report> {
    let report = Report {
        name: ctx.cfg.name.clone(),
        rows: report::rows(results),
        results: results.to_vec(),
        notes: notes.to_vec(),
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    report::write(&ctx.run.root, &report)?;
    plots(ctx)?;
    Ok(report)
}

/// The curves, from `metrics.jsonl`, one line per method averaged over seeds:
/// `plots/warmup_loss.png`, `plots/loss.png`, `plots/divergence.png` and `plots/heldout.png`
/// (every method starts at the warm-up's held-out score at update 0).
fn plots(ctx: &Ctx<'_>) -> Result<()> {
    let lines = ctx.run.read_metrics()?;
    // (plot, method) → update → values over seeds
    let mut by: BTreeMap<(&'static str, String), BTreeMap<u64, Vec<f64>>> = BTreeMap::new();
    let mut warm_score = None;
    for m in &lines {
        let get = |k: &str| m.values.get(k).and_then(|v| v.as_f64());
        let mut add = |plot: &'static str, v: Option<f64>| {
            if let Some(v) = v {
                by.entry((plot, m.method.clone()))
                    .or_default()
                    .entry(m.step)
                    .or_default()
                    .push(v);
            }
        };
        match (m.kind.as_str(), m.phase.as_str()) {
            ("train", "warmup") => add("warmup_loss", get("loss")),
            ("train", _) => {
                add("loss", get("loss"));
                add("divergence", get("divergence"));
            }
            ("eval", "warmup") if m.method == "warmup" => warm_score = get("mean"),
            ("eval", "warmup") => {}
            _ => add("heldout", get("mean")),
        }
    }
    let dir = ctx.run.root.join("plots");
    for (plot, title) in [
        (
            "warmup_loss",
            "warm-up loss (answers with the rationale in context)",
        ),
        ("loss", "training loss per update, mean over seeds"),
        (
            "divergence",
            "per-token divergence to the teacher, mean over seeds",
        ),
        (
            "heldout",
            "held-out score (mean of HIT, WAF, F_s), mean over seeds",
        ),
    ] {
        let series: Vec<Series> = by
            .iter()
            .filter(|(k, _)| k.0 == plot)
            .map(|(k, steps)| {
                let mut points: Vec<(f64, f64)> = Vec::new();
                if plot == "heldout" {
                    points.extend(warm_score.map(|w| (0.0, w)));
                }
                points.extend(
                    steps
                        .iter()
                        .map(|(x, v)| (*x as f64, v.iter().sum::<f64>() / v.len() as f64)),
                );
                Series {
                    label: k.1.clone(),
                    points,
                }
            })
            .collect();
        if !series.is_empty() {
            plot::line_chart(&dir.join(format!("{plot}.png")), title, "update", &series)?;
        }
    }
    Ok(())
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
}
