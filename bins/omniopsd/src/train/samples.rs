//! The corpus and the samples built from it.
//!
//! Invariant: this is where records become model inputs, once per run: the corpus is read (the
//! synthetic one generated on first use) and the bad-sample policy applied; every record's
//! media runs through the frozen towers once, and every view's prompt (student, rationale
//! teacher, label teacher) and the gold answer's ids are laid out by [`super::prompt`]. The
//! phases only index into the resulting [`Sample`]s.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use omniopsd_checkpoint::Checkpoint;
use omniopsd_decoder::{Qwen2Model, TokenPrompt};
use omniopsd_thinker::{MediaInput, Thinker};
use omniopsd_vision::ProcessorConfig;
use tokenizers::Tokenizer;

use super::config::{BadSamplePolicy, TrainConfig};
use super::progress;
use super::prompt::{self, Privileged, View};
use super::run::{Ctx, Output};
use crate::data::manifest::{self, Limits, Record};
use crate::data::synth;
use crate::inputs;

/// One sample ready for the model: its prompts in every view and the gold answer's ids.
pub struct Sample {
    /// The corpus record.
    pub record: Record,
    /// Media and subtitle.
    pub student: TokenPrompt,
    /// The student's context and the rationale (absent without one).
    pub rationale: Option<TokenPrompt>,
    /// The student's context and the gold answer.
    pub label: TokenPrompt,
    /// The gold answer's ids, stop token included.
    pub target: Vec<u32>,
}

impl Sample {
    /// The teacher's prompt for `kind`.
    pub fn teacher(&self, kind: Privileged) -> Option<&TokenPrompt> {
        match kind {
            Privileged::Rationale => self.rationale.as_ref(),
            Privileged::Label => Some(&self.label),
            Privileged::None => Some(&self.student),
        }
    }
}

/// The corpus as the run sees it: its records, the directory their paths are relative to, and
/// notes for the report.
pub struct Corpus {
    /// Valid records, in manifest order.
    pub records: Vec<Record>,
    /// The manifest's directory.
    pub base: PathBuf,
    /// What was skipped, in plain words.
    pub notes: Vec<String>,
}

/// Every record as a [`Sample`] for the checkpoint in `ckpt`: a Qwen2.5-Omni thinker sees the
/// media, a text-only decoder only the text (said in `ctx.notes`).
pub fn build<B: burn::tensor::backend::Backend>(
    ctx: &mut Ctx<'_>,
    ckpt: &Checkpoint,
    corpus: &Corpus,
    limits: &Limits,
    device: &B::Device,
) -> Result<Vec<Sample>> {
    if ckpt.layout().is_multimodal() {
        let processor = video_processor(ctx.cfg)?;
        let media = preprocess_media(&corpus.records, &corpus.base, limits, &processor, ctx.out)?;
        encode_samples::<B>(ctx, ckpt, &corpus.records, &media, device)
    } else {
        ctx.notes.push(format!(
            "{} is a text-only checkpoint: prompts hold the subtitle (and the privileged block), no media",
            ckpt.dir().display()
        ));
        text_samples::<B>(ctx, ckpt, &corpus.records, device)
    }
}

/// The video processor of the run's model: the embedded model's small frames, or the
/// checkpoint's own settings ([`inputs::processor_for`]). Exported students record it.
pub fn video_processor(cfg: &TrainConfig) -> Result<ProcessorConfig> {
    match &cfg.model.dir {
        None => Ok(super::tiny::video_processor()),
        Some(dir) => inputs::processor_for(dir),
    }
}

/// Reads (generating on first use) the corpus and applies the bad-sample policy.
pub fn load_corpus(cfg: &TrainConfig, limits: &Limits, out: Output) -> Result<Corpus> {
    let manifest = match &cfg.data.manifest {
        Some(m) => m.clone(),
        None => {
            let dir = cfg.data.cache_dir.join(format!(
                "synth-n{}-seed{}",
                cfg.data.synth_n, cfg.data.synth_seed
            ));
            let manifest = dir.join("manifest.jsonl");
            // The manifest is written last and atomically, so its presence marks a finished
            // corpus; an interrupted generation is simply redone over its partial files.
            if !manifest.is_file() {
                let synth_cfg = synth::SynthConfig {
                    n: cfg.data.synth_n,
                    seed: cfg.data.synth_seed,
                    ..synth::SynthConfig::default()
                };
                let bar = progress::bar(synth_cfg.n as u64, "corpus", out.quiet);
                synth::synthesize(&dir, &synth_cfg, |i| bar.set_position(i as u64)).with_context(
                    || format!("generating the synthetic corpus in {}", dir.display()),
                )?;
                bar.finish_and_clear();
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
    Ok(Corpus {
        records: checked.records.into_iter().map(|(_, r)| r).collect(),
        base,
        notes,
    })
}

/// Frames and audio of every record as the thinker's media inputs.
fn preprocess_media(
    records: &[Record],
    base: &Path,
    limits: &Limits,
    processor: &ProcessorConfig,
    out: Output,
) -> Result<Vec<Vec<MediaInput>>> {
    let bar = progress::bar(records.len() as u64, "media", out.quiet);
    let mut all = Vec::with_capacity(records.len());
    for r in records {
        all.push(vec![
            inputs::record_media(r, base, limits, processor)?.into_input()
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
            let ids = prompt::prompt_ids(tk, r, view)?;
            thinker
                .prompt_encoded(&ids, &enc)
                .with_context(|| format!("sample `{}`", r.id))
        })?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// A record's prompts in every view, laid out by `layout`, and its answer's ids.
fn sample(
    tk: &Tokenizer,
    record: &Record,
    layout: impl Fn(View) -> Result<TokenPrompt>,
) -> Result<Sample> {
    Ok(Sample {
        student: layout(View::Student)?,
        rationale: match &record.rationale {
            Some(_) => Some(layout(View::Teacher(Privileged::Rationale))?),
            None => None,
        },
        label: layout(View::Teacher(Privileged::Label))?,
        target: prompt::answer_ids(tk, record)?,
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
            let p = TokenPrompt::new(prompt::text_prompt_ids(tk, r, view)?);
            decoder
                .check_prompt(&p)
                .with_context(|| format!("sample `{}`", r.id))?;
            Ok(p)
        })?);
    }
    Ok(out)
}
