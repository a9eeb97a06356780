//! `omniopsd plan` and the check `train` runs before loading the model: the memory one OPSD
//! update of a config needs on its device, term by term ([`omniopsd_decoder::memory`]), against
//! what the device has.
//!
//! Invariant: the plan is arithmetic on the config and the decoder's `config.json`; nothing
//! here loads a weight or allocates on a device. `train` and `plan` print the same table.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use omniopsd_backends::DeviceSpec;
use omniopsd_checkpoint::Checkpoint;
use omniopsd_decoder::memory::{MemoryPlan, StepShape, TeacherWeights};
use omniopsd_decoder::Qwen2Config;

use super::config::{ActivationCheckpointing, DeviceNames, Precision, TeacherName, TrainConfig};

/// `omniopsd plan`.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// Training config (TOML); without it, the embedded default.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Device to plan for, overriding the config's `device`: cpu, ndarray, flex, cuda, cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// Student prompt tokens to plan for: media placeholders, subtitle and template (`train`
    /// checks with its samples' longest).
    #[arg(long, default_value_t = 1024)]
    pub prompt_tokens: usize,
    /// Extra tokens of the teacher's prompt: the privileged block (rationale).
    #[arg(long, default_value_t = 256)]
    pub privileged_tokens: usize,
    /// The device's usable memory in GiB, instead of what it reports (free GPU memory, or
    /// the CPU's available memory).
    #[arg(long, value_name = "GIB")]
    pub device_memory: Option<f64>,
    /// Print the plan as JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// How `train` checks its plan: the memory to plan against (`None`: ask the device), and
/// whether a plan that does not fit stops the run.
#[derive(Clone, Copy, Debug)]
pub struct MemoryCheck {
    /// Usable bytes, overriding the device's report.
    pub limit: Option<u64>,
    /// Stop when the plan exceeds the memory (`--no-memory-check` turns it off).
    pub enforce: bool,
}

/// Runs `omniopsd plan`: prints the plan; exit 1 when it does not fit.
pub fn run(args: PlanArgs) -> Result<()> {
    let mut cfg = match &args.config {
        Some(path) => TrainConfig::read(path)?,
        None => TrainConfig::default(),
    };
    if let Some(device) = &args.device {
        cfg.device = DeviceNames::from_flag(device);
    }
    // A plan may be made for a device this build does not have (a GPU run planned on a
    // laptop): the device's name and its precision are checked, not its backend.
    cfg.validate_knobs().context("config")?;
    let device = first_device(&cfg)?;
    cfg.check_precision(device).context("config")?;
    let limit = match device.family().compiled() {
        true => memory_limit(device, gib_to_bytes(args.device_memory)?),
        false => gib_to_bytes(args.device_memory)?,
    };
    let decoder = decoder_config(&cfg)?;
    let shape = step_shape(&cfg, args.prompt_tokens, args.privileged_tokens);
    let plan = decoder.memory_plan(&shape);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json(&plan, &shape, device, limit))?
        );
    } else {
        println!("{}", table(&cfg, &decoder, &plan, &shape, device, limit));
    }
    match limit {
        Some(bytes) if plan.peak > bytes => bail!(
            "the plan's peak ({}) exceeds {device}'s memory ({}): see the plan above for \
             the knobs (opsd.batch_size, opsd.samples_per_prompt, opsd.max_new_tokens, \
             opsd.chunk_rows, [lora], activation_checkpointing)",
            gib(plan.peak),
            gib(bytes)
        ),
        _ => Ok(()),
    }
}

/// `--device-memory GIB` in bytes; it must be a positive number.
pub fn gib_to_bytes(gib: Option<f64>) -> Result<Option<u64>> {
    match gib {
        None => Ok(None),
        Some(g) if g.is_finite() && g > 0.0 => Ok(Some((g * (1u64 << 30) as f64) as u64)),
        Some(g) => bail!("--device-memory: a positive number of GiB, not {g}"),
    }
}

/// The first of the config's devices (each of several holds the same replica and the same
/// share of an update), whether or not this build has its backend.
fn first_device(cfg: &TrainConfig) -> Result<DeviceSpec> {
    let names = cfg.device.names();
    let first = names
        .first()
        .ok_or_else(|| anyhow!("device: must name at least one device"))?;
    DeviceSpec::parse_name(first).map_err(|e| anyhow!("`device`: {e}"))
}

/// The memory to plan against: the override, or what the device reports.
fn memory_limit(device: DeviceSpec, limit: Option<u64>) -> Option<u64> {
    limit.or_else(|| omniopsd_backends::device_memory(device))
}

/// Checks the plan of `cfg` with the run's longest prompts before the model is loaded: a plan
/// over the device's memory stops the run with the table, unless `check.enforce` is off (then
/// the table is a warning).
pub fn check_before_loading(
    cfg: &TrainConfig,
    decoder: &Qwen2Config,
    prompt: usize,
    privileged: usize,
    check: MemoryCheck,
    quiet: bool,
) -> Result<()> {
    let device = first_device(cfg)?;
    let limit = memory_limit(device, check.limit);
    let shape = step_shape(cfg, prompt, privileged);
    let plan = decoder.memory_plan(&shape);
    let Some(bytes) = limit else {
        return Ok(());
    };
    if plan.peak <= bytes {
        return Ok(());
    }
    let table = table(cfg, decoder, &plan, &shape, device, limit);
    if !check.enforce {
        if !quiet {
            eprintln!("{table}\nwarning: the plan exceeds the device's memory; training anyway (--no-memory-check)");
        }
        return Ok(());
    }
    bail!(
        "{table}\nthe memory plan's peak ({}) exceeds {device}'s memory ({}): lower \
         opsd.batch_size, opsd.samples_per_prompt, opsd.max_new_tokens or opsd.chunk_rows, \
         train [lora] adapters, set activation_checkpointing = \"balanced\", or pass \
         --no-memory-check to train anyway",
        gib(plan.peak),
        gib(bytes)
    )
}

/// The trained decoder's config: the checkpoint's (read without weights), or the embedded
/// model's from `[model]`.
pub fn decoder_config(cfg: &TrainConfig) -> Result<Qwen2Config> {
    match &cfg.model.dir {
        Some(dir) => match Checkpoint::open(dir) {
            Ok(ckpt) => Ok(omniopsd_thinker::decoder_config(&ckpt)
                .with_context(|| format!("{}: the text decoder's config", dir.display()))?),
            // A plan needs no weights: a directory with only `config.json` (a model not yet
            // downloaded) is planned from it.
            Err(_) if dir.join("config.json").is_file() => config_only(&dir.join("config.json")),
            Err(e) => Err(e.into()),
        },
        None => super::tiny::decoder_config(&cfg.model),
    }
}

/// The text decoder's config from a `config.json` alone: a Qwen2.5-Omni config's thinker
/// `text_config` (with the thinker's `tie_word_embeddings`), or a `Qwen2ForCausalLM`'s root.
fn config_only(path: &std::path::Path) -> Result<Qwen2Config> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let thinker = json.get("thinker_config").unwrap_or(&json);
    let mut decoder: Qwen2Config = match thinker.get("text_config") {
        Some(t) => serde_json::from_value(t.clone())
            .with_context(|| format!("{}: text_config", path.display()))?,
        None => {
            serde_json::from_value(json.clone()).with_context(|| format!("{}", path.display()))?
        }
    };
    if thinker.get("text_config").is_some() {
        decoder.tie_word_embeddings = thinker
            .get("tie_word_embeddings")
            .and_then(|t| t.as_bool())
            .unwrap_or(false);
    }
    decoder
        .validate()
        .map_err(|(key, problem)| anyhow!("{}: {key}: {problem}", path.display()))?;
    Ok(decoder)
}

/// One device's part of an OPSD update of `cfg` with prompts of `prompt` tokens and
/// `privileged` more for the teacher: with data parallelism each device takes an equal share
/// of the update's prompts, `opsd.batch_size` of them in memory at once.
pub fn step_shape(cfg: &TrainConfig, prompt: usize, privileged: usize) -> StepShape {
    let o = &cfg.opsd;
    let nodes = cfg.cluster.as_ref().map_or(1, |c| c.nodes as usize);
    let devices = cfg.device.names().len().max(1) * nodes.max(1);
    let per_device = (o.batch_size * o.grad_accumulation).div_ceil(devices);
    StepShape {
        prompt,
        privileged,
        group: o.samples_per_prompt,
        new_tokens: o.max_new_tokens,
        micro_batch: o.batch_size,
        grad_accumulation: per_device.div_ceil(o.batch_size.max(1)),
        chunk_rows: o.chunk_rows,
        lora: cfg.lora.as_ref().map(|l| l.config()),
        teacher: match o.teacher {
            TeacherName::Live => TeacherWeights::Live,
            TeacherName::Frozen => TeacherWeights::Frozen,
            TeacherName::Ema => TeacherWeights::Ema,
        },
        compute_bytes: match cfg.precision {
            Precision::F32 => 4,
            Precision::Bf16Mixed | Precision::F16Mixed => 2,
        },
        checkpointing: cfg.activation_checkpointing == ActivationCheckpointing::Balanced,
    }
}

/// Bytes as GiB with two decimals, or MiB with one below a GiB.
fn gib(bytes: u64) -> String {
    let b = bytes as f64;
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

/// Millions of parameters.
fn millions(n: u64) -> String {
    format!("{:.1} M", n as f64 / 1e6)
}

/// The plan as a markdown table, with what it was computed for and the verdict.
pub fn table(
    cfg: &TrainConfig,
    decoder: &Qwen2Config,
    plan: &MemoryPlan,
    s: &StepShape,
    device: DeviceSpec,
    limit: Option<u64>,
) -> String {
    let training = match &s.lora {
        Some(l) => format!("LoRA r={} on {}", l.r, l.target_modules.join(", ")),
        None => "full fine-tune".into(),
    };
    let model = match &cfg.model.dir {
        Some(dir) => dir.display().to_string(),
        None => "embedded tiny model".into(),
    };
    let mut out = vec![
        format!(
            "Memory plan of one OPSD update on {device}{}: {model} (hidden {}, {} layers, vocabulary {}), {training}, {} teacher, precision {}, activation checkpointing {}",
            match cfg.device.names().len() {
                1 => String::new(),
                n => format!(" (each of {n} data-parallel devices)"),
            },
            decoder.hidden_size,
            decoder.num_hidden_layers,
            decoder.vocab_size,
            match s.teacher {
                TeacherWeights::Live => "live",
                TeacherWeights::Frozen => "frozen",
                TeacherWeights::Ema => "ema",
            },
            cfg.precision.name(),
            if s.checkpointing { "balanced" } else { "none" },
        ),
        format!(
            "G = {} responses of {} tokens after a prompt of {} tokens (+{} privileged); {} episode(s) per backward pass, {} accumulated per update; chunk_rows {}",
            s.group, s.new_tokens, s.prompt, s.privileged, s.micro_batch, s.grad_accumulation, s.chunk_rows
        ),
        String::new(),
        "| term | size |".into(),
        "|---|---:|".into(),
    ];
    let rows: [(&str, String); 12] = [
        (
            "parameters (trainable)",
            format!(
                "{} ({})",
                millions(plan.params),
                millions(plan.trainable_params)
            ),
        ),
        ("weights (f32)", gib(plan.weights)),
        ("gradients (f32, trainable)", gib(plan.gradients)),
        ("AdamW moments (f32)", gib(plan.optimizer)),
        ("teacher's own weights", gib(plan.teacher)),
        ("activations per backward pass", gib(plan.activations)),
        ("fused loss buffers", gib(plan.loss)),
        ("rollout: KV cache and sampling", gib(plan.rollout)),
        ("teacher forward (no graph)", gib(plan.teacher_forward)),
        ("backward and AdamW temporaries", gib(plan.update)),
        (
            "**peak**",
            format!("**{}** ({})", gib(plan.peak), plan.phase.name()),
        ),
        (
            "device memory",
            match limit {
                Some(bytes) => gib(bytes),
                None => "unknown (--device-memory GIB)".into(),
            },
        ),
    ];
    for (term, size) in rows {
        out.push(format!("| {term} | {size} |"));
    }
    out.push(String::new());
    out.push(match limit {
        Some(bytes) if plan.peak > bytes => format!(
            "does not fit: the peak is {:.0}% of the device's memory",
            100.0 * plan.peak as f64 / bytes as f64
        ),
        Some(bytes) => format!(
            "fits: the peak is {:.0}% of the device's memory",
            100.0 * plan.peak as f64 / bytes as f64
        ),
        None => "the device's memory is unknown: give --device-memory GIB".into(),
    });
    out.push(
        "(live bytes, calibrated against counted allocations on the CPU; a GPU allocator's \
         pools hold more)"
            .into(),
    );
    out.join("\n")
}

/// The plan as JSON (bytes).
fn json(
    plan: &MemoryPlan,
    s: &StepShape,
    device: DeviceSpec,
    limit: Option<u64>,
) -> serde_json::Value {
    serde_json::json!({
        "device": device.to_string(),
        "device_memory_bytes": limit,
        "fits": limit.map(|b| plan.peak <= b),
        "shape": {
            "prompt": s.prompt, "privileged": s.privileged, "group": s.group,
            "new_tokens": s.new_tokens, "micro_batch": s.micro_batch,
            "grad_accumulation": s.grad_accumulation, "chunk_rows": s.chunk_rows,
            "lora_rank": s.lora.as_ref().map(|l| l.r), "checkpointing": s.checkpointing,
            "compute_bytes": s.compute_bytes,
        },
        "params": plan.params,
        "trainable_params": plan.trainable_params,
        "weights_bytes": plan.weights,
        "gradients_bytes": plan.gradients,
        "optimizer_bytes": plan.optimizer,
        "teacher_bytes": plan.teacher,
        "activations_bytes": plan.activations,
        "loss_bytes": plan.loss,
        "rollout_bytes": plan.rollout,
        "teacher_forward_bytes": plan.teacher_forward,
        "update_bytes": plan.update,
        "peak_bytes": plan.peak,
        "peak_phase": plan.phase.name(),
    })
}
