//! `omniopsd predict`: a model's answers over a manifest, written as `eval-mer`'s input.
//!
//! Every sample of the chosen split goes through the model with the evaluation prompt and the
//! decoding chosen, and its answer becomes MER-UniBench prediction lines (`dataset`, `id`,
//! `gt`, `pred`, plus the raw `answer`), appended as it goes.
//!
//! Invariant: the trainer's held-out evaluation and this command share [`answer_ids`] (how an
//! answer is decoded) and [`mer_samples`] (how an answer and a record become scored samples),
//! so a score from `predict` + `eval-mer` equals the run report's for the same weights.
//!
//! Resuming: the predictions file is only ever appended to, a sample's lines in one write
//! followed by `fsync`, and a sidecar `<out>.run.json` (written first, atomically) records
//! what produced it. A rerun with the same settings skips the samples already written; one
//! with other settings is refused, naming the setting. A sample's group of lines left
//! incomplete by a kill (a torn last line) is cut off before appending, and said so. A file
//! without its sidecar is never touched.

use std::collections::{HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::backend::Backend;
use clap::{Parser, ValueEnum};
use omniopsd_backends::DeviceSpec;
use omniopsd_core::rng::fnv1a64;
use omniopsd_core::sampling::{sample, uniform, SamplingConfig};
use omniopsd_decoder::{Qwen2Model, TokenPrompt};
use omniopsd_mer::{Gt, Pred, Sample};
use serde_json::{json, Value};

use crate::data::datasets::{scored_labels, Kind};
use crate::data::manifest::{check_manifest, Limits, Record, Split};
use crate::infer::{on_device, Loaded, Model};
use crate::inputs;
use crate::train::progress;
use crate::train::prompt::{self, parse_answer, View};

/// AffectGPT's zero-shot question (its MER-UniBench evaluation prompt).
pub const AFFECTGPT_QUESTION: &str =
    "Please recognize all possible emotional states of the character.";

/// Which prompt a sample is asked with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PromptPreset {
    /// The trainer's student prompt; the answer line `emotion: …; sentiment: …; open: …` is
    /// parsed into the three predictions.
    Student,
    /// AffectGPT's zero-shot question after the subtitle, in the same chat layout; the
    /// free-form answer is the prediction of every dataset, for `eval-mer --extract llm`.
    Affectgpt,
}

/// How answers are decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DecodingPreset {
    /// Argmax at every step (lowest id on ties).
    Greedy,
    /// AffectGPT's decoding: temperature 1, top-p 0.9.
    Affectgpt,
}

/// Which samples of the manifest are predicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SplitArg {
    Train,
    Heldout,
    All,
}

impl SplitArg {
    fn includes(self, split: Split) -> bool {
        match self {
            SplitArg::All => true,
            SplitArg::Train => split == Split::Train,
            SplitArg::Heldout => split == Split::Heldout,
        }
    }
}

/// What to do with a sample whose media cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnBadSample {
    /// Stop with an error naming the manifest line and the file (lines written so far stay,
    /// and a rerun resumes after them).
    Error,
    /// Leave it out, say so on stderr and in the summary.
    Skip,
}

/// Arguments of `omniopsd predict`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Each manifest sample gives one line per label it carries, under its own \
dataset; a sample without `dataset` gives three, scored as the trainer's held-out evaluation \
scores them: its emotion as a MER2023 sample (HIT), its sentiment as a CMU-MOSI sample (WAF), \
its open-set labels as an OV-MERD+ sample (F_s). Rerunning the same command after an \
interruption resumes; other settings with the same --out are refused."
)]
pub struct PredictArgs {
    /// Checkpoint directory: config.json, *.safetensors and tokenizer.json (a Qwen2.5-Omni
    /// thinker sees the media; a Qwen2ForCausalLM the text alone).
    #[arg(long)]
    pub model: PathBuf,
    /// A LoRA adapter directory in PEFT's format, made for --model.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// The JSONL manifest (media paths relative to its directory).
    #[arg(long, value_name = "FILE.jsonl")]
    pub manifest: PathBuf,
    /// Which samples to predict.
    #[arg(long, value_enum, default_value = "heldout")]
    pub split: SplitArg,
    /// The predictions file (JSONL, eval-mer's input); appended to when resuming.
    #[arg(long, value_name = "FILE.jsonl")]
    pub out: PathBuf,
    /// The question asked.
    #[arg(long, value_enum, default_value = "student")]
    pub prompt: PromptPreset,
    /// The decoding preset; --temperature / --top-p / --top-k override its values.
    #[arg(long, value_enum, default_value = "greedy")]
    pub decoding: DecodingPreset,
    /// Softmax temperature (0: greedy).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Seed of the sampler; each sample draws from its own stream (keyed by its id), so a
    /// resumed run gives the answers an uninterrupted one would.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most tokens generated per answer, stop token included (default: the trainer's
    /// `eval.max_new_tokens` default, 24, with the student prompt; 512 with affectgpt's
    /// free-form answers).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Samples decoded together in one batch (left-padded prompts, one forward per step for
    /// all of them). Answers are the ones decoded alone, up to f32 rounding; more samples per
    /// batch is more throughput and more memory.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub batch_size: u64,
    /// How a video file's frames are sampled.
    #[command(flatten)]
    pub video_sampling: inputs::VideoArgs,
    /// A sample whose media cannot be read: stop, or leave it out.
    #[arg(long, value_enum, default_value = "error")]
    pub on_bad_sample: OnBadSample,
    /// Device: cpu, ndarray, flex, cuda or cuda:N (as compiled into this build).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Score the finished file with eval-mer and print its table.
    #[arg(long)]
    pub score: bool,
    /// eval-mer's extraction step with --score (llm needs --llm-url and --llm-model).
    #[arg(long, value_enum, default_value = "none", requires = "score")]
    pub extract: crate::eval_mer::ExtractArg,
    /// With --extract llm: the OpenAI-compatible endpoint.
    #[arg(long, value_name = "URL", requires = "score")]
    pub llm_url: Option<String>,
    /// With --extract llm: the model name the endpoint serves.
    #[arg(long, value_name = "NAME", requires = "score")]
    pub llm_model: Option<String>,
    /// With --extract llm: the environment variable holding the API key.
    #[arg(long, value_name = "VAR", requires = "score")]
    pub llm_api_key_env: Option<String>,
}

/// How an answer is decoded: greedy without `sampling`.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoding {
    /// Temperature, top-k and top-p of the core's rollout sampler; `None` is greedy.
    pub sampling: Option<SamplingConfig>,
    /// Most tokens generated, stop token included.
    pub max_new_tokens: usize,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Decoding {
    /// Greedy decoding of at most `max_new_tokens`.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            sampling: None,
            max_new_tokens,
            seed: 0,
        }
    }
}

/// The answers' token ids for `prompts` (stop tokens removed), decoded together as one
/// batch ([`Qwen2Model::generate_batch`]): greedy, or drawn by the core's sampler, prompt
/// `i` from its own stream `streams[i]` (position `t` of its answer uses the uniform of the
/// rollout sampler's row 0 at `t`), so an answer is the same whichever batch it is in, up to
/// f32 rounding. The trainer's held-out evaluation decodes through this function too.
pub fn answer_ids<B: Backend>(
    decoder: &Qwen2Model<B>,
    prompts: &[&TokenPrompt],
    decoding: &Decoding,
    stop: &[u32],
    streams: &[u64],
) -> Result<Vec<Vec<u32>>> {
    if streams.len() != prompts.len() {
        bail!(
            "{} sampler streams for {} prompts",
            streams.len(),
            prompts.len()
        );
    }
    let n = decoding.max_new_tokens;
    let answers = match &decoding.sampling {
        None => decoder.generate_batch(prompts, n, stop, |_, _, logits| {
            Ok::<_, anyhow::Error>(omniopsd_decoder::argmax_first(logits))
        })?,
        Some(cfg) => {
            cfg.validate()?;
            decoder.generate_batch(prompts, n, stop, |i, position, logits| {
                let u = uniform(decoding.seed, streams[i], 0, position as u32);
                sample(logits, cfg, u)
                    .map(|c| c.token)
                    .map_err(|e| anyhow!("answer token {position}: {e}"))
            })?
        }
    };
    Ok(answers
        .into_iter()
        .map(|ids| ids.into_iter().filter(|t| !stop.contains(t)).collect())
        .collect())
}

/// The scored samples of one record's `answer`, one per label it carries, each as the test
/// set [`scored_labels`] names (a sample without `dataset`: its emotion as MER2023 (HIT), its
/// sentiment as CMU-MOSI (WAF), its open set as OV-MERD+ (F_s)). With the student prompt the
/// answer line is parsed into each label's prediction; with a free-form preset the whole
/// answer is each prediction, for eval-mer's extraction.
pub fn mer_samples(
    record: &Record,
    answer: &str,
    preset: PromptPreset,
    line: usize,
) -> Vec<Sample> {
    let parsed = parse_answer(answer);
    scored_labels(record)
        .into_iter()
        .map(|(dataset, kind)| {
            let gt = match kind {
                Kind::Emotion => Gt::Labels(record.emotion.iter().cloned().collect()),
                Kind::Sentiment => Gt::Score(record.sentiment.unwrap_or_default()),
                Kind::Openset => Gt::Labels(record.openset.clone().unwrap_or_default()),
            };
            let pred = match (preset, kind) {
                (PromptPreset::Affectgpt, _) => Pred::Text(answer.to_string()),
                (PromptPreset::Student, Kind::Emotion) => Pred::List(
                    Some(parsed.emotion.clone())
                        .filter(|e| !e.is_empty())
                        .into_iter()
                        .collect(),
                ),
                (PromptPreset::Student, Kind::Sentiment) => Pred::Text(parsed.sentiment.clone()),
                (PromptPreset::Student, Kind::Openset) => Pred::List(parsed.openset.clone()),
            };
            Sample {
                dataset,
                id: record.id.clone(),
                gt,
                pred,
                line,
            }
        })
        .collect()
}

/// One prediction line as eval-mer reads it, with the raw answer beside.
fn line_json(sample: &Sample, answer: &str) -> Value {
    let gt = match &sample.gt {
        Gt::Labels(labels) => json!(labels),
        Gt::Score(score) => json!(score),
    };
    let pred = match &sample.pred {
        Pred::Text(text) => json!(text),
        Pred::List(labels) => json!(labels),
        Pred::Missing => Value::Null,
    };
    json!({
        "dataset": sample.dataset.name(),
        "id": sample.id,
        "gt": gt,
        "pred": pred,
        "answer": answer,
    })
}

/// `omniopsd predict`.
pub fn run(args: PredictArgs) -> Result<()> {
    on_device!(args.device, predict, &args)?;
    if args.score {
        score(&args)?;
    }
    Ok(())
}

/// The decoding the flags ask for, checked.
fn decoding(args: &PredictArgs) -> Result<Decoding> {
    let (temperature, top_p) = match args.decoding {
        DecodingPreset::Greedy => (0.0, 1.0),
        DecodingPreset::Affectgpt => (1.0, 0.9),
    };
    let sampling = SamplingConfig {
        temperature: args.temperature.unwrap_or(temperature),
        top_k: args.top_k,
        top_p: args.top_p.unwrap_or(top_p),
    };
    sampling.validate()?;
    let max_new_tokens = args.max_new_tokens.unwrap_or(match args.prompt {
        // The trainer's default held-out budget, so the scores equal a run's report.
        PromptPreset::Student => crate::train::config::EvalConfig::default().max_new_tokens,
        PromptPreset::Affectgpt => 512,
    });
    if max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    Ok(Decoding {
        sampling: (sampling.temperature != 0.0).then_some(sampling),
        max_new_tokens,
        seed: args.seed,
    })
}

/// What produced a predictions file: a rerun must match it to resume.
fn run_record(args: &PredictArgs, decoding: &Decoding) -> Result<Value> {
    let absolute = |p: &Path| -> Result<String> {
        Ok(fs::canonicalize(p)
            .with_context(|| format!("{}", p.display()))?
            .display()
            .to_string())
    };
    let sampling = decoding.sampling.as_ref();
    Ok(json!({
        "model": absolute(&args.model)?,
        "adapter": args.adapter.as_deref().map(absolute).transpose()?,
        "manifest": absolute(&args.manifest)?,
        "split": format!("{:?}", args.split).to_lowercase(),
        "prompt": format!("{:?}", args.prompt).to_lowercase(),
        "temperature": sampling.map_or(0.0, |s| s.temperature),
        "top_p": sampling.map(|s| s.top_p),
        "top_k": sampling.and_then(|s| s.top_k),
        "seed": sampling.map(|_| decoding.seed),
        "max_new_tokens": decoding.max_new_tokens,
        "video_sampling": format!("{:?}", args.video_sampling.options()?),
    }))
}

/// The sidecar that records what wrote `out`.
fn sidecar(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".run.json");
    PathBuf::from(name)
}

/// Opens `out` for appending, creating it (and its sidecar) or resuming it: the ids already
/// written (`lines`: how many lines each sample of the manifest gets). Refuses a file another
/// run wrote with other settings, or one without a sidecar.
fn open_out(
    out: &Path,
    record: &Value,
    lines: &HashMap<String, usize>,
) -> Result<(fs::File, HashSet<String>)> {
    let side = sidecar(out);
    if !out.exists() {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        omniopsd_checkpoint::atomic::write_atomic(&side, &serde_json::to_vec_pretty(record)?)?;
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(out)
            .with_context(|| format!("creating {}", out.display()))?;
        return Ok((file, HashSet::new()));
    }
    let Ok(text) = fs::read_to_string(&side) else {
        bail!(
            "{} exists but {} does not: it was not written by `omniopsd predict`, and is left \
             as it is; choose another --out",
            out.display(),
            side.display()
        );
    };
    let earlier: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not the JSON `omniopsd predict` writes", side.display()))?;
    if let (Value::Object(old), Value::Object(new)) = (&earlier, record) {
        let (mut was, mut now) = (Vec::new(), Vec::new());
        for (key, value) in new {
            let before = old.get(key).unwrap_or(&Value::Null);
            if before != value {
                was.push(format!("{key} = {before}"));
                now.push(format!("{key} = {value}"));
            }
        }
        if !was.is_empty() {
            bail!(
                "{} was written with {}; this run has {}. Rerun with the same settings to \
                 resume, or choose another --out",
                out.display(),
                was.join(", "),
                now.join(", ")
            );
        }
    }
    let bytes = fs::read(out).with_context(|| format!("reading {}", out.display()))?;
    let (keep, done) = complete_prefix(&bytes, out, lines)?;
    let file = OpenOptions::new()
        .append(true)
        .open(out)
        .with_context(|| format!("opening {}", out.display()))?;
    if keep < bytes.len() {
        // Only lines this command wrote, of a sample it did not finish, are cut.
        file.set_len(keep as u64)
            .with_context(|| format!("cutting the unfinished sample off {}", out.display()))?;
        file.sync_data()?;
        eprintln!(
            "{}: cut {} byte(s) of an unfinished sample left by an interrupted run",
            out.display(),
            bytes.len() - keep
        );
    }
    Ok((file, done))
}

/// The length of `bytes`' complete samples (for each, its `lines[id]` whole lines in a row)
/// and their ids. A whole line that is not a prediction line of a manifest sample is an error
/// naming it.
fn complete_prefix(
    bytes: &[u8],
    path: &Path,
    lines: &HashMap<String, usize>,
) -> Result<(usize, HashSet<String>)> {
    let mut done = HashSet::new();
    let (mut keep, mut offset) = (0, 0);
    let mut group: Option<(String, usize)> = None;
    for (index, raw) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
        offset += raw.len();
        if !raw.ends_with(b"\n") {
            break; // torn: the write was cut
        }
        let line = index + 1;
        let text = std::str::from_utf8(raw)
            .map_err(|_| anyhow!("{}:{line}: not UTF-8", path.display()))?;
        let sample = omniopsd_mer::predictions::parse_line(
            text.trim_end(),
            line,
            &path.display().to_string(),
        )?;
        let Some(&expected) = lines.get(&sample.id) else {
            bail!(
                "{}:{line}: sample `{}` is not in the manifest (another manifest's predictions?)",
                path.display(),
                sample.id
            );
        };
        let count = match group.take() {
            Some((id, n)) if id == sample.id => n + 1,
            Some((id, n)) => bail!(
                "{}:{line}: sample `{id}` has {n} line(s) before `{}` starts, fewer than its \
                 labels (the file was edited?)",
                path.display(),
                sample.id
            ),
            None => 1,
        };
        if count == expected {
            done.insert(sample.id);
            keep = offset;
        } else {
            group = Some((sample.id, count));
        }
    }
    Ok((keep, done))
}

fn predict<B: Backend>(args: &PredictArgs, device: &B::Device) -> Result<()> {
    let decoding = decoding(args)?;
    let record = run_record(args, &decoding)?;
    let limits = Limits {
        video: args.video_sampling.options()?,
        require_rationale: false,
        ..Limits::default()
    };
    let checked = check_manifest(&args.manifest, &limits)?;
    let base = args
        .manifest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut bad: Vec<String> = Vec::new();
    for p in &checked.problems {
        let msg = format!("{}:{}: {}", args.manifest.display(), p.line, p.message);
        match args.on_bad_sample {
            OnBadSample::Error => bail!(
                "{msg}\n(pass --on-bad-sample skip to leave such samples out; nothing was written)"
            ),
            OnBadSample::Skip => bad.push(msg),
        }
    }
    let chosen: Vec<&(usize, Record)> = checked
        .records
        .iter()
        .filter(|(_, r)| args.split.includes(r.split))
        .collect();
    if chosen.is_empty() && bad.is_empty() {
        bail!(
            "{}: no valid sample in split {:?}",
            args.manifest.display(),
            args.split
        );
    }
    let loaded = Loaded::<B>::load(&args.model, args.adapter.as_deref(), device)?;
    let lines: HashMap<String, usize> = checked
        .records
        .iter()
        .map(|(_, r)| (r.id.clone(), scored_labels(r).len()))
        .collect();
    let (mut file, done) = open_out(&args.out, &record, &lines)?;
    let todo: Vec<&(usize, Record)> = chosen
        .into_iter()
        .filter(|(_, r)| !done.contains(&r.id))
        .collect();
    let processor = inputs::processor_for(&args.model)?;
    let stop = loaded.stop_tokens();
    let bar = progress::rate_bar(todo.len() as u64, "predict", args.quiet);
    let started = Instant::now();
    let mut predicted = 0usize;
    for chunk in todo.chunks(args.batch_size as usize) {
        let where_ = |line: usize, r: &Record| {
            format!("{}:{line} (sample `{}`)", args.manifest.display(), r.id)
        };
        let mut batch = Vec::with_capacity(chunk.len());
        let mut prompts = Vec::with_capacity(chunk.len());
        for (line, r) in chunk {
            match sample_prompt(&loaded, r, &base, &limits, &processor, args.prompt) {
                Ok(p) => {
                    batch.push((*line, r));
                    prompts.push(p);
                }
                Err(e) if args.on_bad_sample == OnBadSample::Skip => {
                    bad.push(format!("{}: {e:#}", where_(*line, r)));
                    bar.inc(1);
                }
                Err(e) => return Err(e.context(where_(*line, r))),
            }
        }
        let streams: Vec<u64> = batch
            .iter()
            .map(|(_, r)| fnv1a64(r.id.as_bytes()))
            .collect();
        let prompts: Vec<&TokenPrompt> = prompts.iter().collect();
        let answers = answer_ids(loaded.decoder(), &prompts, &decoding, &stop, &streams)
            .with_context(|| match batch.as_slice() {
                [(line, r)] => where_(*line, r),
                _ => format!(
                    "{}: the batch of samples {}",
                    args.manifest.display(),
                    batch
                        .iter()
                        .map(|(line, r)| format!("`{}` (line {line})", r.id))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
        for ((line, r), ids) in batch.into_iter().zip(answers) {
            let answer = loaded
                .tokenizer
                .decode(&ids, true)
                .map_err(|e| anyhow!("{}: decoding the answer: {e}", where_(line, r)))?;
            let mut text = String::new();
            for s in mer_samples(r, &answer, args.prompt, line) {
                text.push_str(&serde_json::to_string(&line_json(&s, &answer))?);
                text.push('\n');
            }
            file.write_all(text.as_bytes())
                .and_then(|()| file.sync_data())
                .with_context(|| format!("appending to {}", args.out.display()))?;
            predicted += 1;
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    for b in &bad {
        eprintln!("skipped: {b}");
    }
    eprintln!(
        "{}: {} sample(s) predicted in {seconds:.1} s ({:.2} samples/s), {} already there, {} skipped",
        args.out.display(),
        predicted,
        predicted as f64 / seconds.max(1e-9),
        done.len(),
        bad.len()
    );
    Ok(())
}

/// A record's prompt for the loaded model: the thinker sees its video with the audio track
/// interleaved, a text-only decoder the text alone.
fn sample_prompt<B: Backend>(
    loaded: &Loaded<B>,
    record: &Record,
    base: &Path,
    limits: &Limits,
    processor: &omniopsd_vision::ProcessorConfig,
    preset: PromptPreset,
) -> Result<TokenPrompt> {
    let tk = &loaded.tokenizer;
    let video = matches!(loaded.model, Model::Omni(_));
    let ids = match preset {
        PromptPreset::Student if video => prompt::prompt_ids(tk, record, View::Student)?,
        PromptPreset::Student => prompt::text_prompt_ids(tk, record, View::Student)?,
        PromptPreset::Affectgpt => {
            let text = prompt::question_text(record, AFFECTGPT_QUESTION);
            prompt::user_prompt_ids(tk, record, &text, video)?
        }
    };
    match &loaded.model {
        Model::Text(decoder) => {
            let p = TokenPrompt::new(ids);
            decoder.check_prompt(&p)?;
            Ok(p)
        }
        Model::Omni(thinker) => {
            let media = inputs::record_media(record, base, limits, processor)?;
            let encoded = thinker.encode_media(&[media.into_input()])?;
            Ok(thinker.prompt_encoded(&ids, &encoded)?)
        }
    }
}

/// `eval-mer` on the finished predictions file, with the extraction flags given.
fn score(args: &PredictArgs) -> Result<()> {
    #[derive(Parser)]
    struct EvalMer {
        #[command(flatten)]
        args: crate::eval_mer::Args,
    }
    let mut argv: Vec<String> = vec![
        "eval-mer".into(),
        "--predictions".into(),
        args.out.display().to_string(),
        "--extract".into(),
        args.extract
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_else(|| "none".into()),
    ];
    for (flag, value) in [
        ("--llm-url", &args.llm_url),
        ("--llm-model", &args.llm_model),
        ("--llm-api-key-env", &args.llm_api_key_env),
    ] {
        if let Some(v) = value {
            argv.extend([flag.to_string(), v.clone()]);
        }
    }
    let parsed = EvalMer::try_parse_from(argv).map_err(|e| anyhow!("--score: {e}"))?;
    crate::eval_mer::run(parsed.args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::prompt::answer;
    use crate::train::prompt::tests::record;
    use omniopsd_mer::Dataset;

    #[test]
    fn the_student_answer_line_becomes_three_scored_samples() {
        let r = record("angry", -2.0, &["angry", "annoyed"]);
        let [hit, waf, fs] =
            <[Sample; 3]>::try_from(mer_samples(&r, &answer(&r), PromptPreset::Student, 7))
                .unwrap();
        assert_eq!(hit.dataset, Dataset::Mer2023);
        assert_eq!(hit.pred, Pred::List(vec!["angry".into()]));
        assert_eq!(waf.gt, Gt::Score(-2.0));
        assert_eq!(waf.pred, Pred::Text("negative".into()));
        assert_eq!(fs.pred, Pred::List(vec!["angry".into(), "annoyed".into()]));
        assert_eq!(fs.line, 7);
        // Free-form answers go to every dataset whole, for eval-mer's extraction.
        let free = mer_samples(&r, "She sounds furious.", PromptPreset::Affectgpt, 1);
        let [hit, _, fs] = <[Sample; 3]>::try_from(free).unwrap();
        assert_eq!(hit.pred, Pred::Text("She sounds furious.".into()));
        assert_eq!(fs.pred, Pred::Text("She sounds furious.".into()));
    }

    #[test]
    fn a_benchmark_sample_gives_one_line_under_its_own_dataset() {
        let mut r = record("joy", 0.0, &[]);
        r.dataset = Some("MELD".into());
        (r.sentiment, r.openset) = (None, None);
        assert_eq!(answer(&r), "emotion: joy");
        let samples = mer_samples(&r, "emotion: anger", PromptPreset::Student, 3);
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].dataset, Dataset::Meld);
        assert_eq!(samples[0].gt, Gt::Labels(vec!["joy".into()]));
        assert_eq!(samples[0].pred, Pred::List(vec!["anger".into()]));
        r.dataset = Some("CH-SIMS".into());
        (r.emotion, r.sentiment) = (None, Some(-0.4));
        assert_eq!(answer(&r), "sentiment: negative");
        let samples = mer_samples(&r, "sentiment: positive", PromptPreset::Student, 3);
        assert_eq!(samples[0].dataset, Dataset::ChSims);
        assert_eq!(samples[0].gt, Gt::Score(-0.4));
        assert_eq!(samples[0].pred, Pred::Text("positive".into()));
    }

    #[test]
    fn lines_round_trip_through_eval_mers_parser() {
        let r = record("happy", 1.5, &["happy", "joyful"]);
        for s in mer_samples(&r, &answer(&r), PromptPreset::Student, 1) {
            let text = serde_json::to_string(&line_json(&s, "raw")).unwrap();
            let back = omniopsd_mer::predictions::parse_line(&text, 1, "t").unwrap();
            assert_eq!(back, s);
        }
    }

    /// Three lines a sample, as a sample without dataset gets.
    fn counts() -> HashMap<String, usize> {
        ["a", "b"]
            .map(|id| (id.to_string(), 3))
            .into_iter()
            .collect()
    }

    fn group(id: &str) -> String {
        let r = Record {
            id: id.into(),
            ..record("sad", -1.0, &["sad"])
        };
        mer_samples(&r, &answer(&r), PromptPreset::Student, 1)
            .iter()
            .map(|s| serde_json::to_string(&line_json(s, "a")).unwrap() + "\n")
            .collect()
    }

    #[test]
    fn an_unfinished_sample_is_cut_and_finished_ones_are_kept() {
        let path = Path::new("preds.jsonl");
        let (a, b) = (group("a"), group("b"));
        let whole = format!("{a}{b}");
        let (keep, done) = complete_prefix(whole.as_bytes(), path, &counts()).unwrap();
        assert_eq!((keep, done.len()), (whole.len(), 2));
        // b's third line torn in the middle, then b's second line missing entirely.
        let torn = &whole[..whole.len() - 10];
        let (keep, done) = complete_prefix(torn.as_bytes(), path, &counts()).unwrap();
        assert_eq!(keep, a.len());
        assert_eq!(done, HashSet::from(["a".to_string()]));
        let first_line_of_b = b.lines().next().unwrap();
        let partial = format!("{a}{first_line_of_b}\n");
        assert_eq!(
            complete_prefix(partial.as_bytes(), path, &counts())
                .unwrap()
                .0,
            a.len()
        );
    }

    #[test]
    fn a_foreign_or_edited_file_is_an_error_naming_the_line() {
        let path = Path::new("preds.jsonl");
        let err = complete_prefix(b"not json\n", path, &counts()).unwrap_err();
        assert!(format!("{err:#}").contains("line 1"), "{err:#}");
        let a = group("a");
        let mut lines = a.lines();
        let mixed = format!("{}\n{}", lines.next().unwrap(), group("b"));
        let err = complete_prefix(mixed.as_bytes(), path, &counts()).unwrap_err();
        assert!(format!("{err:#}").contains("preds.jsonl:2"), "{err:#}");
        let stranger = group("c");
        let err = complete_prefix(stranger.as_bytes(), path, &counts()).unwrap_err();
        assert!(
            format!("{err:#}").contains("not in the manifest"),
            "{err:#}"
        );
    }
}
