//! `omniopsd eval-mer`: score predictions on MER-UniBench exactly as the benchmark does.
//!
//! Policy decided here: where the report goes (stdout, or `--out` written atomically and never
//! over an existing file without `--force`), where the LLM extraction cache lives (next to the
//! predictions unless `--llm-cache`), and that a missing `--llm-url`/`--llm-model` is an error.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use omniopsd_mer::{
    extract::apply_structured, parse_predictions, ApiKey, EmotionWheels, ExtractMode,
    ExtractionSummary, LlmConfig, LlmExtractor, Report, RetryPolicy, Sampling,
};

/// How free-form answers become label lists before scoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExtractArg {
    /// Score `pred` as written (a label list, or a sentiment word on sentiment sets).
    None,
    /// Take the last `<answer>...</answer>` block, else a trailing `[...]` list.
    Structured,
    /// Run the benchmark's LLM extraction prompts on an OpenAI-compatible endpoint.
    Llm,
}

impl From<ExtractArg> for ExtractMode {
    fn from(arg: ExtractArg) -> Self {
        match arg {
            ExtractArg::None => ExtractMode::None,
            ExtractArg::Structured => ExtractMode::Structured,
            ExtractArg::Llm => ExtractMode::Llm,
        }
    }
}

/// Score model answers on MER-UniBench (F_s, HIT, WAF and their nine-dataset mean).
///
/// The mean is the MER-UniBench score only when all nine datasets are present and defined;
/// otherwise it is the mean of the defined ones and the report says which are left out.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory with the benchmark's format.csv, synonym.xlsx and wheel1.xlsx .. wheel5.xlsx,
    /// replacing the copy shipped inside this binary (default: the shipped copy).
    #[arg(long, value_name = "DIR")]
    pub wheel_dir: Option<PathBuf>,
    /// Predictions: one JSON object a line with `dataset`, `id`, `gt`, `pred`.
    #[arg(long, value_name = "FILE.jsonl")]
    pub predictions: PathBuf,
    /// Print the JSON report instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write the report to this file (atomically) instead of stdout.
    #[arg(long, value_name = "REPORT")]
    pub out: Option<PathBuf>,
    /// Replace an existing --out file.
    #[arg(long, requires = "out")]
    pub force: bool,
    /// Extraction step for free-form answers.
    #[arg(long, value_enum, default_value = "none")]
    pub extract: ExtractArg,
    /// OpenAI-compatible endpoint: base URL (http://host:8000/v1) or the full
    /// /chat/completions URL. Required with --extract llm.
    #[arg(long, value_name = "URL")]
    pub llm_url: Option<String>,
    /// Model name the endpoint serves (the benchmark uses Qwen2.5-7B-Instruct).
    #[arg(long, value_name = "NAME")]
    pub llm_model: Option<String>,
    /// API key sent as `Authorization: Bearer KEY`.
    #[arg(long, value_name = "KEY")]
    pub llm_api_key: Option<String>,
    /// Environment variable holding the API key instead (keeps it out of the process list).
    #[arg(long, value_name = "VAR", conflicts_with = "llm_api_key")]
    pub llm_api_key_env: Option<String>,
    /// Extraction cache (JSONL); default: the predictions path + `.llm-cache.jsonl`.
    #[arg(long, value_name = "FILE")]
    pub llm_cache: Option<PathBuf>,
    /// Sampling temperature (benchmark: 0.7).
    #[arg(long, default_value_t = 0.7)]
    pub llm_temperature: f64,
    /// Nucleus sampling top-p (benchmark: 0.8).
    #[arg(long, default_value_t = 0.8)]
    pub llm_top_p: f64,
    /// Maximum new tokens (benchmark: 512).
    #[arg(long, default_value_t = 512)]
    pub llm_max_tokens: u32,
    /// vLLM repetition penalty (benchmark: 1.05).
    #[arg(long, default_value_t = 1.05)]
    pub llm_repetition_penalty: f64,
    /// Leave `repetition_penalty` out of requests (for servers that reject it).
    #[arg(long)]
    pub llm_no_repetition_penalty: bool,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub llm_concurrency: usize,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 300)]
    pub llm_timeout_secs: u64,
}

/// Runs `eval-mer`.
pub fn run(args: Args) -> anyhow::Result<()> {
    // Refuse early, before any (possibly paid) extraction work.
    if let Some(out) = &args.out {
        if out.exists() && !args.force {
            bail!(
                "{} already exists; pass --force to replace it",
                out.display()
            );
        }
    }

    let wheels = EmotionWheels::load_or_shipped(args.wheel_dir.as_deref()).with_context(|| {
        match &args.wheel_dir {
            Some(dir) => format!("loading wheel data from {}", dir.display()),
            None => "loading the shipped wheel data".to_string(),
        }
    })?;
    let bytes = std::fs::read(&args.predictions)
        .with_context(|| format!("reading predictions {}", args.predictions.display()))?;
    let mut samples = parse_predictions(&bytes, &args.predictions.display().to_string())?;

    let extraction = match args.extract {
        ExtractArg::None => ExtractionSummary::None,
        ExtractArg::Structured => apply_structured(&mut samples),
        ExtractArg::Llm => {
            let config = llm_config(&args)?;
            let cache = config.cache.clone();
            LlmExtractor::new(config)
                .with_context(|| format!("opening extraction cache {}", cache.display()))?
                .apply(&mut samples)?
        }
    };

    let report = Report::evaluate(&wheels, &samples, extraction);
    let text = if args.json {
        report.to_json()
    } else {
        report.to_table()
    };
    match &args.out {
        Some(out) => {
            // Checked again now that the work is done: without --force an existing report is
            // never replaced, even one that appeared during a long extraction.
            if out.exists() && !args.force {
                bail!(
                    "{} already exists; pass --force to replace it",
                    out.display()
                );
            }
            omniopsd_checkpoint::atomic::write_atomic(out, text.as_bytes())?;
            eprintln!("wrote {}", out.display());
        }
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(text.as_bytes())?;
            stdout.flush()?;
        }
    }
    Ok(())
}

fn llm_config(args: &Args) -> anyhow::Result<LlmConfig> {
    let Some(url) = args.llm_url.clone() else {
        bail!("--extract llm needs --llm-url (an OpenAI-compatible endpoint)");
    };
    let Some(model) = args.llm_model.clone() else {
        bail!("--extract llm needs --llm-model (the model name the endpoint serves)");
    };
    let cache = args.llm_cache.clone().unwrap_or_else(|| {
        let mut name = args.predictions.as_os_str().to_owned();
        name.push(".llm-cache.jsonl");
        PathBuf::from(name)
    });
    let api_key = match &args.llm_api_key_env {
        Some(var) => match std::env::var(var) {
            Ok(value) if !value.trim().is_empty() => Some(ApiKey::new(value.trim())),
            _ => bail!(
                "--llm-api-key-env {var}: the environment variable {var} is not set (or is empty)"
            ),
        },
        None => args.llm_api_key.clone().map(ApiKey::new),
    };
    Ok(LlmConfig {
        url,
        model,
        api_key,
        sampling: Sampling {
            temperature: args.llm_temperature,
            top_p: args.llm_top_p,
            max_tokens: args.llm_max_tokens,
            repetition_penalty: (!args.llm_no_repetition_penalty)
                .then_some(args.llm_repetition_penalty),
        },
        timeout: Duration::from_secs(args.llm_timeout_secs),
        retry: RetryPolicy::default(),
        concurrency: args.llm_concurrency.max(1),
        cache,
    })
}
