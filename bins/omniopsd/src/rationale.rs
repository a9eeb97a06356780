//! `omniopsd rationale`: a frontier model writes the privileged block of every training sample
//! that lacks one, seeing what the clip holds (sampled frames as images, the audio, the
//! subtitle) and its gold labels, through any OpenAI-compatible `/chat/completions` endpoint.
//!
//! Policy decided here:
//! - which samples: `split` `train` (and `heldout` with `--include-heldout`) without a
//!   non-empty `rationale`; every other line is copied unchanged;
//! - the request: one user message, `[text, image_url..., input_audio]`; frames are the PNG
//!   files' bytes as `data:image/png;base64,...`, sampled evenly up to `--max-frames` (from a
//!   video file: from the frames sampled as for training, PNG-encoded at their resized size),
//!   the audio the WAV file's bytes as `{"data": base64, "format": "wav"}` (any other audio,
//!   or a video's own track when the sample has no `audio`, decoded to 16 kHz mono WAV);
//! - the cache: `--cache`, default `OUT.cache.jsonl`, keyed by the SHA-256 of the request body
//!   (model, rendered prompt with the gold labels, media bytes, sampling), holding validated
//!   rationales only; a rerun sends nothing for them and a killed run resumes;
//! - validation ([`validate`]): an invalid answer is asked once more, then the sample fails;
//! - output: OUT is written atomically once, at the end, with every rationale obtained (failed
//!   samples keep none); never over IN, never over an existing OUT without `--force`; the
//!   summary goes to stdout and to `OUT.summary.json`; the exit status is 1 when any sample
//!   still lacks its rationale.

pub mod prompt;
pub mod validate;

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use omniopsd_endpoint::{
    hex_sha256, run_bounded, ApiKey, Cache, CacheEntry, ChatClient, Error as EndpointError,
    RetryPolicy, Usage,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::data::manifest::{self, Limits, Record, Split};
use crate::data::media;
use crate::inputs;
use prompt::{Attached, Template, DEFAULT_PROMPT};

/// Arguments of `omniopsd rationale`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The input manifest (JSONL); it is only read.
    #[arg(long, value_name = "IN")]
    pub manifest: PathBuf,
    /// The output manifest: IN with `rationale`, `rationale_model` and `rationale_prompt`
    /// filled in. Media paths are copied as they are, so put OUT in IN's directory (or use
    /// absolute media paths).
    #[arg(long, value_name = "OUT")]
    pub out: PathBuf,
    /// Replace an existing OUT.
    #[arg(long)]
    pub force: bool,
    /// OpenAI-compatible endpoint: base URL (http://host:8000/v1) or the full
    /// /chat/completions URL.
    #[arg(long, value_name = "URL")]
    pub endpoint: String,
    /// Model name the endpoint serves.
    #[arg(long, value_name = "NAME")]
    pub model: String,
    /// Environment variable holding the API key, sent as `Authorization: Bearer KEY` (the key
    /// itself is never a flag, never printed, never cached).
    #[arg(long, value_name = "VAR")]
    pub api_key_env: Option<String>,
    /// Prompt template replacing the shipped one. Placeholders: {{id}}, {{subtitle}},
    /// {{emotion}}, {{sentiment}}, {{sentiment_word}}, {{openset}}, {{media}}, {{frames}},
    /// {{audio}}.
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,
    /// Answer cache (JSONL); default: OUT + `.cache.jsonl`.
    #[arg(long, value_name = "FILE")]
    pub cache: Option<PathBuf>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Most HTTP requests this run may send, retries included (default: unlimited).
    #[arg(long, value_name = "N")]
    pub max_requests: Option<u64>,
    /// Do not send the audio (for endpoints without `input_audio`).
    #[arg(long)]
    pub no_audio: bool,
    /// Do not send video frames.
    #[arg(long)]
    pub no_frames: bool,
    /// Most frames sent per sample, sampled evenly from first to last.
    #[arg(long, default_value_t = 8)]
    pub max_frames: usize,
    /// How frames of video files are sampled before `--max-frames` of them are sent.
    #[command(flatten)]
    pub video: crate::inputs::VideoArgs,
    /// Longest rationale accepted, in characters.
    #[arg(long, default_value_t = 2000)]
    pub max_chars: usize,
    /// `max_tokens` of each request.
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: u32,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.2)]
    pub temperature: f64,
    /// Also write rationales for held-out samples (the teacher-view evaluation row reads them).
    #[arg(long)]
    pub include_heldout: bool,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Attempts per request on 429, 5xx, timeouts and connection errors, the first included.
    #[arg(long, default_value_t = 5)]
    pub max_attempts: u32,
    /// Backoff scale of the first retry in milliseconds (doubling, full jitter, capped at 30 s;
    /// a `Retry-After` header is waited instead).
    #[arg(long, default_value_t = 500)]
    pub retry_base_ms: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// One cache line: a validated rationale and what produced it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    /// SHA-256 (hex) of the request body.
    key: String,
    id: String,
    model: String,
    prompt: String,
    rationale: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

impl CacheEntry for Entry {
    fn key(&self) -> &str {
        &self.key
    }
}

/// A sample that ended without a rationale, and why.
#[derive(Clone, Debug, Serialize)]
struct Failure {
    id: String,
    reason: String,
}

/// The closing summary (stdout and `OUT.summary.json`).
#[derive(Debug, Serialize)]
struct Summary {
    manifest: PathBuf,
    out: PathBuf,
    cache: PathBuf,
    endpoint: String,
    model: String,
    prompt: String,
    /// Samples in the manifest.
    samples: usize,
    /// Of those, needing a rationale.
    needed: usize,
    /// Of those, answered from the cache (no request).
    cached: usize,
    /// Of those, answered by the endpoint in this run.
    written: usize,
    /// Of those, without a rationale at the end, with the reason.
    failed: Vec<Failure>,
    /// HTTP requests sent, retries included.
    requests: u64,
    /// Of those, retries of 429 / 5xx / timeouts.
    retries: u64,
    /// Of those, second asks after an invalid answer.
    validation_retries: u64,
    /// Answers that reported `usage` (token totals count those only).
    usage_reported: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// A sample to ask about.
struct Job {
    /// Index in the manifest.
    index: usize,
    key: String,
}

enum Outcome {
    Written(Entry),
    Failed(String),
}

/// Runs `omniopsd rationale`.
pub fn run(args: Args) -> Result<()> {
    check_paths(&args)?;
    let api_key = match &args.api_key_env {
        Some(var) => match std::env::var(var) {
            Ok(value) if !value.trim().is_empty() => Some(ApiKey::new(value.trim())),
            _ => bail!(
                "--api-key-env {var}: the environment variable {var} is not set (or is empty)"
            ),
        },
        None => None,
    };
    let (template_text, template_name) = match &args.prompt_file {
        Some(path) => (
            std::fs::read_to_string(path)
                .with_context(|| format!("reading prompt file {}", path.display()))?,
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string()),
        ),
        None => (DEFAULT_PROMPT.to_string(), "default".to_string()),
    };
    let template = Template::parse(&template_text, &template_name)?;
    let prompt_id = format!(
        "{template_name}@{}",
        &hex_sha256(template_text.as_bytes())[..12]
    );

    let records = read_manifest(&args.manifest)?;
    let base = args
        .manifest
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let cache_path = args
        .cache
        .clone()
        .unwrap_or_else(|| suffixed(&args.out, ".cache.jsonl"));
    let cache: Cache<Entry> = Cache::open(&cache_path)?;
    let client = ChatClient::new(&args.endpoint, Duration::from_secs(args.timeout_secs))
        .with_api_key(api_key)
        .with_retry(RetryPolicy {
            max_attempts: args.max_attempts.max(1),
            base_delay: Duration::from_millis(args.retry_base_ms),
            ..RetryPolicy::default()
        })
        .with_max_requests(args.max_requests);

    // Which samples need one, and their content addresses.
    let mut failed: Vec<Failure> = Vec::new();
    let mut answers: Vec<Option<Entry>> = vec![None; records.len()];
    let (mut needed, mut cached) = (0, 0);
    let mut jobs = Vec::new();
    for (index, record) in records.iter().enumerate() {
        let wanted = record.split == Split::Train || args.include_heldout;
        let missing = record
            .rationale
            .as_deref()
            .is_none_or(|r| r.trim().is_empty());
        if !(wanted && missing) {
            continue;
        }
        needed += 1;
        let body = match request_body(record, &base, &template, &args) {
            Ok(body) => body,
            Err(err) => {
                failed.push(Failure {
                    id: record.id.clone(),
                    reason: format!("{err:#}"),
                });
                continue;
            }
        };
        let key = hex_sha256(body.as_bytes());
        match cache.get(&key) {
            Some(entry) => {
                cached += 1;
                answers[index] = Some(entry);
            }
            // The body is rebuilt by the worker: holding every sample's media in memory at
            // once would not scale to a real corpus.
            None => jobs.push(Job { index, key }),
        }
    }

    let bar = crate::train::progress::bar(jobs.len() as u64, "rationale", args.quiet);
    let stop = AtomicBool::new(false);
    let validation_retries = AtomicU64::new(0);
    let failures_so_far = AtomicUsize::new(0);
    let outcomes = run_bounded(&jobs, args.concurrency.max(1), &stop, |_, job| {
        let record = &records[job.index];
        let outcome = ask(
            &client,
            &cache,
            record,
            job,
            &base,
            &template,
            &args,
            &prompt_id,
            &validation_retries,
            &stop,
        );
        if matches!(outcome, Outcome::Failed(_)) {
            let n = failures_so_far.fetch_add(1, Ordering::SeqCst) + 1;
            bar.set_message(format!("{n} failed"));
        }
        bar.inc(1);
        outcome
    });
    bar.finish_and_clear();

    let mut written = 0;
    for (job, outcome) in jobs.iter().zip(outcomes) {
        let id = records[job.index].id.clone();
        match outcome {
            Some(Outcome::Written(entry)) => {
                written += 1;
                answers[job.index] = Some(entry);
            }
            Some(Outcome::Failed(reason)) => failed.push(Failure { id, reason }),
            None => failed.push(Failure {
                id,
                reason: if client.budget().is_spent() {
                    "not attempted: the request budget (--max-requests) is spent".into()
                } else {
                    "not attempted: the run stopped after an error the endpoint will repeat".into()
                },
            }),
        }
    }

    let mut out_records = records.clone();
    for (record, answer) in out_records.iter_mut().zip(&answers) {
        if let Some(entry) = answer {
            record.rationale = Some(entry.rationale.clone());
            record.rationale_model = Some(entry.model.clone());
            record.rationale_prompt = Some(entry.prompt.clone());
        }
    }
    // Checked again now that the requests are done: an OUT that appeared meanwhile is kept.
    if args.out.exists() && !args.force {
        bail!(
            "{} already exists; pass --force to replace it",
            args.out.display()
        );
    }
    manifest::write_manifest(&args.out, &out_records)?;

    let stats = client.stats();
    let summary = Summary {
        manifest: args.manifest.clone(),
        out: args.out.clone(),
        cache: cache_path,
        endpoint: client.url().to_string(),
        model: args.model.clone(),
        prompt: prompt_id,
        samples: records.len(),
        needed,
        cached,
        written,
        failed,
        requests: stats.requests,
        retries: stats.retries,
        validation_retries: validation_retries.load(Ordering::SeqCst),
        usage_reported: stats.usage_reported,
        prompt_tokens: stats.prompt_tokens,
        completion_tokens: stats.completion_tokens,
    };
    let summary_path = suffixed(&args.out, ".summary.json");
    let text = serde_json::to_string_pretty(&summary).context("serializing the summary")?;
    omniopsd_checkpoint::atomic::write_atomic(&summary_path, format!("{text}\n").as_bytes())?;
    print_summary(&summary, &summary_path);
    if summary.failed.is_empty() {
        Ok(())
    } else {
        bail!(
            "{} of {} samples still lack a rationale; the reasons are in {} (a rerun asks only \
             for those: cached answers cost no request)",
            summary.failed.len(),
            summary.needed,
            summary_path.display()
        )
    }
}

/// Asks for one sample's rationale: the client retries transient failures; an invalid answer
/// is asked once more; a valid one is cached before it counts as written.
#[allow(clippy::too_many_arguments)]
fn ask(
    client: &ChatClient,
    cache: &Cache<Entry>,
    record: &Record,
    job: &Job,
    base: &Path,
    template: &Template,
    args: &Args,
    prompt_id: &str,
    validation_retries: &AtomicU64,
    stop: &AtomicBool,
) -> Outcome {
    let body = match request_body(record, base, template, args) {
        Ok(body) => body,
        Err(err) => return Outcome::Failed(format!("{err:#}")),
    };
    let mut invalid = None;
    for ask in 1..=2 {
        if ask == 2 {
            validation_retries.fetch_add(1, Ordering::SeqCst);
        }
        let completion = match client.complete(&body) {
            Ok(c) => c,
            Err(err) => {
                if stops_the_run(&err) {
                    stop.store(true, Ordering::SeqCst);
                }
                let hint = match err {
                    EndpointError::Status { status: 400, .. } if !args.no_audio => {
                        " (an endpoint without `input_audio` refuses the audio part: try --no-audio)"
                    }
                    _ => "",
                };
                return Outcome::Failed(match invalid {
                    Some(first) => format!("{first}; then {err}{hint}"),
                    None => format!("{err}{hint}"),
                });
            }
        };
        match validate::validate(
            &completion,
            record.emotion.as_deref().unwrap_or_default(),
            args.max_chars,
        ) {
            Ok(rationale) => {
                let entry = Entry {
                    key: job.key.clone(),
                    id: record.id.clone(),
                    model: args.model.clone(),
                    prompt: prompt_id.to_string(),
                    rationale,
                    usage: completion.usage,
                };
                return match cache.insert(entry.clone()) {
                    Ok(()) => Outcome::Written(entry),
                    Err(err) => {
                        stop.store(true, Ordering::SeqCst);
                        Outcome::Failed(err.to_string())
                    }
                };
            }
            Err(why) => invalid = Some(why),
        }
    }
    Outcome::Failed(match invalid {
        Some(why) => format!("invalid answer twice: {why}"),
        None => "no answer".into(),
    })
}

/// Errors every later request would repeat: a spent budget, a wrong key, URL or model.
fn stops_the_run(err: &EndpointError) -> bool {
    matches!(
        err,
        EndpointError::BudgetSpent { .. }
            | EndpointError::Status {
                status: 401 | 403 | 404,
                ..
            }
    )
}

/// The request body of `record`: one user message with the rendered prompt, the sampled frames
/// and the audio.
fn request_body(record: &Record, base: &Path, template: &Template, args: &Args) -> Result<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let video = manifest::resolve(base, &record.video);
    let frames: Vec<Vec<u8>> = if args.no_frames {
        Vec::new()
    } else if inputs::is_video_file(&video) {
        // The frames the student sees (sampled and sized as for training), a few of them.
        let sampled = crate::data::video::read_video(&video, &args.video.options()?)?;
        sample_evenly(&sampled.frames, args.max_frames)
            .iter()
            .map(media::png_bytes)
            .collect::<Result<_>>()
            .with_context(|| format!("video {}", video.display()))?
    } else {
        let paths = media::frame_paths(&video)?;
        if paths.is_empty() {
            bail!("video {}: no PNG frames", video.display());
        }
        let mut frames = Vec::new();
        for path in sample_evenly(&paths, args.max_frames) {
            let bytes = read_file(&path, "frame")?;
            if !bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
                bail!("frame {}: not a PNG file", path.display());
            }
            frames.push(bytes);
        }
        frames
    };
    let audio = if args.no_audio {
        None
    } else {
        let path = inputs::record_audio_path(record, base)?;
        let bytes = read_file(&path, "audio")?;
        if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WAVE" {
            Some(bytes)
        } else {
            // Any other audio (or a video's own track), decoded to 16 kHz mono WAV.
            let audio = media::read_audio(&path, Limits::default().max_audio_seconds)?;
            Some(media::wav_bytes(&audio).with_context(|| format!("audio {}", path.display()))?)
        }
    };
    let attached = Attached {
        frames: frames.len(),
        audio: audio.is_some(),
    };
    let mut content = vec![json!({"type": "text", "text": template.render(record, attached)})];
    for bytes in &frames {
        content.push(json!({
            "type": "image_url",
            "image_url": {"url": format!("data:image/png;base64,{}", b64.encode(bytes))}
        }));
    }
    if let Some(bytes) = audio {
        content.push(json!({
            "type": "input_audio",
            "input_audio": {"data": b64.encode(&bytes), "format": "wav"}
        }));
    }
    let body = json!({
        "model": args.model,
        "messages": [{"role": "user", "content": content}],
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
    });
    Ok(body.to_string())
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .with_context(|| format!("{what} {}: cannot read", path.display()))?;
    Ok(bytes)
}

/// At most `k` of `items`, evenly spaced, first and last included: item
/// `round(i · (n - 1) / (k - 1))` for `i` in `0..k` (the middle one when `k` is 1).
pub fn sample_evenly<T: Clone>(items: &[T], k: usize) -> Vec<T> {
    let n = items.len();
    if k == 0 || n == 0 {
        return Vec::new();
    }
    if n <= k {
        return items.to_vec();
    }
    if k == 1 {
        return vec![items[n / 2].clone()];
    }
    (0..k)
        .map(|i| items[(i * (n - 1) + (k - 1) / 2) / (k - 1)].clone())
        .collect()
}

/// Refuses OUT == IN (even through another spelling) and an existing OUT without `--force`,
/// before any request is paid for.
fn check_paths(args: &Args) -> Result<()> {
    let same = match (args.manifest.canonicalize(), absolute_target(&args.out)) {
        (Ok(a), Some(b)) => a == b,
        _ => args.manifest == args.out,
    };
    if same {
        bail!(
            "--out {} is the input manifest; the input is never modified, choose another file",
            args.out.display()
        );
    }
    if args.out.exists() && !args.force {
        bail!(
            "{} already exists; pass --force to replace it",
            args.out.display()
        );
    }
    Ok(())
}

/// `path` made absolute through its (existing) parent directory.
fn absolute_target(path: &Path) -> Option<PathBuf> {
    if let Ok(p) = path.canonicalize() {
        return Some(p);
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Some(parent.canonicalize().ok()?.join(path.file_name()?))
}

/// `path` with `suffix` appended to its file name.
fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Reads every line of the manifest as a record; a bad line is an error naming it (run
/// `omniopsd data check` for the full list).
fn read_manifest(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading manifest {}", path.display()))?;
    let mut records = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: Record = serde_json::from_str(line).with_context(|| {
            format!(
                "{}:{}: not a manifest record (omniopsd data check lists every problem)",
                path.display(),
                index + 1
            )
        })?;
        records.push(record);
    }
    Ok(records)
}

fn print_summary(s: &Summary, summary_path: &Path) {
    println!(
        "rationale: {} of {} samples needed one: {} from the cache, {} written, {} failed",
        s.needed,
        s.samples,
        s.cached,
        s.written,
        s.failed.len()
    );
    let tokens = if s.usage_reported > 0 {
        format!(
            "; tokens: {} prompt, {} completion ({} answers reported usage)",
            s.prompt_tokens, s.completion_tokens, s.usage_reported
        )
    } else {
        "; tokens: not reported by the endpoint".to_string()
    };
    println!(
        "requests: {} sent ({} retries after 429/5xx/timeouts, {} re-asks after invalid answers){tokens}",
        s.requests, s.retries, s.validation_retries
    );
    for f in s.failed.iter().take(20) {
        println!("failed {}: {}", f.id, f.reason);
    }
    if s.failed.len() > 20 {
        println!("... and {} more", s.failed.len() - 20);
    }
    println!(
        "wrote {} (summary {}, cache {})",
        s.out.display(),
        summary_path.display(),
        s.cache.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_sampled_evenly_with_both_ends() {
        let items: Vec<usize> = (0..20).collect();
        assert_eq!(sample_evenly(&items, 5), [0, 5, 10, 14, 19]);
        assert_eq!(sample_evenly(&items, 2), [0, 19]);
        assert_eq!(sample_evenly(&items, 1), [10]);
        assert_eq!(sample_evenly(&items[..3], 8), [0, 1, 2]);
        assert!(sample_evenly(&items, 0).is_empty());
        let got = sample_evenly(&items, 8);
        assert_eq!(got.len(), 8);
        assert!(got.windows(2).all(|w| w[0] < w[1]));
    }
}
