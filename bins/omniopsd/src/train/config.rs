//! The training configuration: one TOML file, every knob of the method, unknown keys refused.
//!
//! Every table is `deny_unknown_fields`, so a misspelt knob (`lerning_rate`) is an error that
//! names the key instead of a silently ignored setting. Every field has a default, so the
//! empty file is the embedded default run; the resolved config (defaults filled in) is written
//! to `runs/<name>/config.toml` and is itself a valid config.
//!
//! Invariant: this file is the whole way from TOML to the trainers' configs. Each section has
//! one conversion into its library type ([`OpsdSection::trainer`] into the core's
//! [`OpsdConfig`], [`TrainConfig::warmup_sft`] / [`OpsdSection::label_sft`] into the SFT
//! trainer's, `[model]` through [`super::tiny::check`] into the decoder's config), and a
//! section's range checks are that library type's own `validate`, its errors renamed to TOML
//! keys by [`KNOBS`]; only knobs no library type holds (corpus, batch sizes, evaluation,
//! checkpoints) are checked here. A knob is: its field and default below, its line in the
//! conversion, its row in [`KNOBS`] (key, core field, `--help` text).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use omniopsd_core::divergence::{Divergence, LossConfig, Reduction, TopK};
use omniopsd_core::rollout::RolloutConfig;
use omniopsd_core::sampling::SamplingConfig;
use omniopsd_core::step::{AdamWSettings, LossScaling, LrDecay, LrSchedule, OpsdConfig, StepError};
use omniopsd_core::teacher::TeacherMode;
use serde::{Deserialize, Serialize};

use omniopsd_core::sft::{SftConfig, SftError};
use omniopsd_decoder::LoraConfig;

/// The whole configuration. Each field is a top-level key or a `[section]`; what a key does
/// is its row in [`KNOBS`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub name: String,
    pub runs_dir: PathBuf,
    pub device: DeviceNames,
    /// Burn's activation checkpointing for every training phase.
    pub activation_checkpointing: ActivationCheckpointing,
    /// The type the trained model's projections compute in.
    pub precision: Precision,
    pub seeds: Vec<u64>,
    pub methods: Vec<Method>,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub warmup: WarmupConfig,
    pub opsd: OpsdSection,
    pub eval: EvalConfig,
    pub checkpoint: CheckpointConfig,
    /// `[lora]`: the method phases train LoRA adapters on a frozen model instead of every
    /// weight (absent: full fine-tuning).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSection>,
    /// `[cluster]`: this machine is one node of a multi-node data-parallel run (absent: it
    /// trains alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterSection>,
}

/// `device`: one device, or a list for data parallelism (`["cuda:0", "cuda:1"]`, or
/// `["cpu", "cpu"]` for two CPU replicas).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DeviceNames {
    /// `device = "cpu"`.
    One(String),
    /// `device = ["cuda:0", "cuda:1"]`.
    Many(Vec<String>),
}

impl DeviceNames {
    /// `--device`'s value: names separated by commas (`cuda:0,cuda:1`).
    pub fn from_flag(value: &str) -> Self {
        let names: Vec<String> = value.split(',').map(|n| n.trim().to_string()).collect();
        match <[String; 1]>::try_from(names) {
            Ok([one]) => DeviceNames::One(one),
            Err(names) => DeviceNames::Many(names),
        }
    }

    /// The names, in order.
    pub fn names(&self) -> Vec<&str> {
        match self {
            DeviceNames::One(name) => vec![name.as_str()],
            DeviceNames::Many(names) => names.iter().map(String::as_str).collect(),
        }
    }

    /// Each name as a device of this build, one backend for all, checked against this
    /// machine (`omniopsd_backends::check_devices`); errors name the `device` key.
    pub fn specs(&self) -> Result<Vec<omniopsd_backends::DeviceSpec>> {
        let names = self.names();
        if names.is_empty() {
            bail!("device: must name at least one device");
        }
        let specs = names
            .iter()
            .map(|n| n.parse().map_err(|e| anyhow!("`device`: {e}")))
            .collect::<Result<Vec<omniopsd_backends::DeviceSpec>>>()?;
        omniopsd_backends::check_devices(&specs).map_err(|e| anyhow!("`device`: {e}"))?;
        Ok(specs)
    }
}

impl std::fmt::Display for DeviceNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.names().join(","))
    }
}

/// `[cluster]`: one node of a multi-node run, every key required. Every node runs
/// `omniopsd train` with the same config but for `rank` and `address` (or the flags
/// `--node-rank` / `--node-address`), after `omniopsd orchestrator --port P` has started on
/// the host `orchestrator` names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Machines taking part, each with the same number of devices.
    pub nodes: u32,
    /// This machine's index, `0 .. nodes`.
    pub rank: u32,
    /// The orchestrator, `ws://HOST:PORT`.
    pub orchestrator: String,
    /// This machine as the others reach it, `ws://HOST:PORT`; the port is where it serves
    /// its tensors to the other nodes.
    pub address: String,
    /// Seconds the first all-reduces over every node may take once all have joined, before
    /// the run stops with an error rather than wait forever.
    #[serde(default = "default_cluster_timeout")]
    pub timeout: u64,
}

fn default_cluster_timeout() -> u64 {
    60
}

impl ClusterSection {
    /// Checks the ranges and the addresses; returns this node's data-service port.
    pub fn check(&self) -> Result<u16> {
        if self.nodes < 2 {
            bail!("cluster.nodes: must be >= 2 (a run on one machine needs no [cluster])");
        }
        if self.rank >= self.nodes {
            bail!(
                "cluster.rank: must be below cluster.nodes ({}), found {}",
                self.nodes,
                self.rank
            );
        }
        if self.timeout == 0 {
            bail!("cluster.timeout: must be at least 1 second");
        }
        ws_port("cluster.orchestrator", &self.orchestrator)?;
        ws_port("cluster.address", &self.address)
    }
}

/// The port of a `ws://HOST:PORT` address, or an error naming `key`.
fn ws_port(key: &str, address: &str) -> Result<u16> {
    let what = || {
        anyhow!(
            "{key}: must be ws://HOST:PORT (a WebSocket address with its port), found {address:?}"
        )
    };
    let rest = address.strip_prefix("ws://").ok_or_else(what)?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = authority.rsplit_once(':').ok_or_else(what)?;
    if host.is_empty() {
        return Err(what());
    }
    port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(what)
}

/// What the autodiff graph keeps for the backward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActivationCheckpointing {
    /// Every operation's saved state is kept until the backward pass.
    None,
    /// Burn's `BalancedCheckpointing`: outputs of memory-bound operations (element-wise,
    /// reshapes, norms) are recomputed in the backward pass, compute-bound ones (products)
    /// kept. Same numbers, less activation memory, a little more time.
    Balanced,
}

/// Mixed precision: the type the decoder's projections (attention q/k/v/o, MLP, LoRA
/// adapters) compute in. The weights stay f32 (master weights, updated by AdamW in f32, with
/// f32 moments); embeddings, norms, rotary, attention softmax, the residual stream and the
/// loss stay f32 too ([`omniopsd_decoder::Qwen2Model::with_compute`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precision {
    #[serde(rename = "f32")]
    F32,
    #[serde(rename = "bf16-mixed")]
    Bf16Mixed,
    #[serde(rename = "f16-mixed")]
    F16Mixed,
}

impl Precision {
    /// The config value.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16Mixed => "bf16-mixed",
            Precision::F16Mixed => "f16-mixed",
        }
    }

    /// Dynamic loss scaling (PyTorch `GradScaler`'s defaults) for f16, whose narrow
    /// exponent range flushes small gradients to zero; `None` for f32 and bf16.
    pub fn loss_scaling(self) -> Option<LossScaling> {
        (self == Precision::F16Mixed).then(LossScaling::default)
    }

    /// The compute type of the projections; `None` for f32.
    pub fn compute(self) -> Option<burn::tensor::FloatDType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16Mixed => Some(burn::tensor::FloatDType::BF16),
            Precision::F16Mixed => Some(burn::tensor::FloatDType::F16),
        }
    }
}

/// `[lora]`: PEFT's `LoraConfig` keys. The adapters are new in every method phase (PEFT's
/// initialisation, `B = 0`, seeded by the phase's seed) on the warm-up weights, which stay
/// frozen; the `frozen` teacher is then those weights with the adapters off, `ema` a second
/// adapter set, `live` the current adapters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    /// Rank `r`.
    pub r: usize,
    /// `α`: the scaling is `α / r` (`α / √r` with `use_rslora`).
    pub lora_alpha: f64,
    /// Dropout on each adapter's input during training, in [0, 1). Above 0 it draws from the
    /// backend's random stream, which checkpoints do not hold: a resumed run then departs
    /// from an uninterrupted one.
    pub lora_dropout: f64,
    /// Projections that get adapters: any of q_proj, k_proj, v_proj, o_proj, gate_proj,
    /// up_proj, down_proj.
    pub target_modules: Vec<String>,
    /// Rank-stabilised scaling `α / √r`.
    pub use_rslora: bool,
}

impl Default for LoraSection {
    /// r 16, α 32, no dropout, all seven projections.
    fn default() -> Self {
        Self {
            r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.0,
            target_modules: omniopsd_decoder::LORA_TARGETS
                .iter()
                .map(|t| t.to_string())
                .collect(),
            use_rslora: false,
        }
    }
}

impl LoraSection {
    /// The decoder's adapter settings.
    pub fn config(&self) -> LoraConfig {
        LoraConfig {
            r: self.r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules: self.target_modules.clone(),
            use_rslora: self.use_rslora,
            placement: Default::default(),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            name: "default".into(),
            runs_dir: "runs".into(),
            device: DeviceNames::One("cpu".into()),
            activation_checkpointing: ActivationCheckpointing::None,
            precision: Precision::F32,
            seeds: vec![0, 1, 2],
            methods: vec![
                Method::Opsd,
                Method::OpsdNoPrivileged,
                Method::OpsdLabelPrivileged,
                Method::LabelSft,
            ],
            data: DataConfig::default(),
            model: ModelConfig::default(),
            warmup: WarmupConfig::default(),
            opsd: OpsdSection::default(),
            eval: EvalConfig::default(),
            checkpoint: CheckpointConfig::default(),
            lora: None,
            cluster: None,
        }
    }
}

/// A row of the ablation table; each differs from `opsd` in exactly one respect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// The method: the teacher is the same model with the rationale in context.
    Opsd,
    /// Ablation: the teacher sees exactly the student's context (plain self-distillation).
    OpsdNoPrivileged,
    /// Ablation: the teacher's privileged block is the gold label only, no rationale.
    OpsdLabelPrivileged,
    /// Ablation: supervised fine-tuning on the gold labels with the same update budget.
    LabelSft,
}

impl Method {
    /// The name used in configs, reports and file names.
    pub fn name(self) -> &'static str {
        match self {
            Method::Opsd => "opsd",
            Method::OpsdNoPrivileged => "opsd-no-privileged",
            Method::OpsdLabelPrivileged => "opsd-label-privileged",
            Method::LabelSft => "label-sft",
        }
    }
}

/// What to do with a manifest line that fails validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadSamplePolicy {
    /// Stop with the list of problems.
    Error,
    /// Leave the sample out, and list it in the log and the report.
    Skip,
}

/// `[data]`: where the samples come from (keys `data.*` in [`KNOBS`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<PathBuf>,
    pub cache_dir: PathBuf,
    pub synth_n: usize,
    pub synth_seed: u64,
    pub max_audio_seconds: f64,
    pub max_frames: usize,
    pub video: crate::data::video::VideoOptions,
    pub on_bad_sample: BadSamplePolicy,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            manifest: None,
            cache_dir: ".omniopsd-cache".into(),
            synth_n: 480,
            synth_seed: 0,
            max_audio_seconds: 30.0,
            max_frames: 64,
            video: Default::default(),
            on_bad_sample: BadSamplePolicy::Error,
        }
    }
}

/// `[model]`: an HF checkpoint directory, or the embedded tiny omni model's sizes (keys
/// `model.*` in [`KNOBS`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
    pub init_seed: u64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            dir: None,
            vocab_size: 384,
            hidden_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            intermediate_size: 128,
            init_seed: 0,
        }
    }
}

/// `[warmup]`: supervised answers given the rationale in context (keys `warmup.*` in
/// [`KNOBS`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmupConfig {
    pub steps: u64,
    pub batch_size: usize,
    pub learning_rate: f64,
}

impl Default for WarmupConfig {
    fn default() -> Self {
        Self {
            steps: 300,
            batch_size: 8,
            learning_rate: 5e-3,
        }
    }
}

/// Divergence between teacher and student next-token distributions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DivergenceName {
    /// KL(teacher ‖ student).
    ForwardKl,
    /// KL(student ‖ teacher).
    ReverseKl,
    /// Generalized JSD(β) as TRL's GKD defines it.
    Jsd,
    /// Sampled-token reverse KL as a policy gradient with a clipped importance ratio.
    SampledReverseKl,
}

/// How per-token losses are averaged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReductionName {
    /// Mean over all valid tokens of the batch.
    Token,
    /// Mean per sequence, then over sequences.
    Sequence,
}

/// Which weights the teacher uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TeacherName {
    /// The current student weights, detached.
    Live,
    /// A snapshot of the weights when OPSD starts.
    Frozen,
    /// An exponential moving average of the student (`ema_rate`).
    Ema,
}

/// Learning-rate decay after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecayName {
    /// Stays at the peak.
    Constant,
    /// Half-cosine to `min_lr_ratio · peak`.
    Cosine,
    /// Straight line to `min_lr_ratio · peak`.
    Linear,
}

/// `[opsd]`: every knob of the core's OPSD trainer (keys `opsd.*` in [`KNOBS`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpsdSection {
    pub steps: u64,
    pub batch_size: usize,
    pub grad_accumulation: usize,
    pub samples_per_prompt: usize,
    pub max_new_tokens: usize,
    pub temperature: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    pub top_p: f32,
    pub divergence: DivergenceName,
    pub beta: f32,
    pub ratio_clip: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_top_k: Option<usize>,
    pub loss_top_k_tail: bool,
    pub reduction: ReductionName,
    pub loss_temperature: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_clip: Option<f32>,
    pub teacher: TeacherName,
    pub ema_rate: f32,
    pub learning_rate: f64,
    pub lr_warmup_steps: u64,
    pub lr_decay: DecayName,
    pub min_lr_ratio: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f32>,
    pub adam_beta1: f32,
    pub adam_beta2: f32,
    pub adam_epsilon: f32,
    pub weight_decay: f32,
    pub updates_per_rollout: usize,
    pub chunk_rows: usize,
}

impl Default for OpsdSection {
    fn default() -> Self {
        Self {
            steps: 30,
            batch_size: 1,
            grad_accumulation: 4,
            samples_per_prompt: 4,
            max_new_tokens: 24,
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            divergence: DivergenceName::Jsd,
            beta: 0.5,
            ratio_clip: 2.0,
            loss_top_k: None,
            loss_top_k_tail: true,
            reduction: ReductionName::Token,
            loss_temperature: 1.0,
            kl_clip: None,
            teacher: TeacherName::Frozen,
            ema_rate: 0.1,
            learning_rate: 5e-4,
            lr_warmup_steps: 5,
            lr_decay: DecayName::Cosine,
            min_lr_ratio: 0.1,
            max_grad_norm: Some(1.0),
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 0.0,
            updates_per_rollout: 1,
            chunk_rows: 1024,
        }
    }
}

/// `[eval]`: held-out evaluation (keys `eval.*` in [`KNOBS`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    pub every: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_samples: Option<usize>,
    pub max_new_tokens: usize,
    pub batch_size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mer_data: Option<PathBuf>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every: 10,
            max_samples: None,
            max_new_tokens: 24,
            batch_size: 8,
            mer_data: None,
        }
    }
}

/// `[checkpoint]`: checkpointing (keys `checkpoint.*` in [`KNOBS`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    pub every: u64,
    pub keep_last: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every: 20,
            keep_last: 2,
        }
    }
}

/// One config key: its TOML name, the field it sets in the core's [`OpsdConfig`] (the path
/// [`omniopsd_core::FieldError`] names; empty where no core type holds it), and its line in
/// `omniopsd train --help`.
pub struct Knob {
    /// TOML key.
    pub key: &'static str,
    /// Path of the core field it becomes, or "".
    pub core: &'static str,
    /// One line of help.
    pub help: &'static str,
}

const fn knob(key: &'static str, core: &'static str, help: &'static str) -> Knob {
    Knob { key, core, help }
}

/// Every config key, in the order `omniopsd train --help` lists them: the one place a key
/// is documented (the section structs' fields are the keys, their defaults are the `Default`
/// impls).
pub const KNOBS: &[Knob] = &[
    knob(
        "name",
        "",
        "run name: outputs go to runs_dir/name/ (NAME-2, NAME-3… when taken)",
    ),
    knob(
        "runs_dir",
        "",
        "parent directory of runs",
    ),
    knob(
        "device",
        "",
        "cpu | ndarray | flex | cuda | cuda:N, or a list for data parallelism ([\"cuda:0\", \
         \"cuda:1\"]; [\"cpu\", \"cpu\"]: CPU replicas, at most one per core): each device \
         rolls out and scores its share of every update, gradients summed before AdamW",
    ),
    knob(
        "activation_checkpointing",
        "",
        "none | balanced: recompute memory-bound operations in the backward pass (same \
         numbers, less activation memory)",
    ),
    knob(
        "precision",
        "",
        "f32 | bf16-mixed | f16-mixed: the projections compute in bf16 / f16 on casts of f32 \
         master weights (AdamW, norms, softmax and the loss stay f32; f16 with dynamic loss \
         scaling); needs device flex or cuda",
    ),
    knob(
        "seeds",
        "",
        "one training per seed; the report gives mean ± sd",
    ),
    knob(
        "methods",
        "",
        "opsd | opsd-no-privileged | opsd-label-privileged | label-sft (the ablation rows)",
    ),
    knob(
        "data.manifest",
        "",
        "JSONL manifest; absent: the synthetic corpus (data.synth_n, data.synth_seed)",
    ),
    knob(
        "data.cache_dir",
        "",
        "where the synthetic corpus is generated on first use",
    ),
    knob(
        "data.synth_n",
        "",
        "samples in the synthetic corpus (>= 10)",
    ),
    knob(
        "data.synth_seed",
        "",
        "seed of the synthetic corpus",
    ),
    knob(
        "data.max_audio_seconds",
        "",
        "longest audio accepted, in seconds",
    ),
    knob(
        "data.max_frames",
        "",
        "most frames accepted per directory of frames",
    ),
    knob(
        "data.video.fps",
        "",
        "frames sampled per second of a video file (qwen-omni-utils' FPS = 2)",
    ),
    knob(
        "data.video.min_frames",
        "",
        "fewest frames sampled from a video file (4)",
    ),
    knob(
        "data.video.max_frames",
        "",
        "most frames sampled from a video file (768)",
    ),
    knob(
        "data.video.min_pixels",
        "",
        "fewest pixels per resized video frame (128·28²)",
    ),
    knob(
        "data.video.max_pixels",
        "",
        "most pixels per resized video frame (768·28²)",
    ),
    knob(
        "data.video.total_pixels",
        "",
        "pixel budget of all frames of a video together (128000·28²·0.9)",
    ),
    knob(
        "data.on_bad_sample",
        "",
        "\"error\" stops on the first invalid line, \"skip\" leaves it out and reports it",
    ),
    knob(
        "model.dir",
        "",
        "HF checkpoint (Qwen2.5-Omni thinker or Qwen2); absent: the embedded tiny omni model",
    ),
    knob(
        "model.vocab_size",
        "",
        "embedded model: tokenizer vocabulary, trained on the corpus",
    ),
    knob(
        "model.hidden_size",
        "",
        "embedded model: hidden size",
    ),
    knob(
        "model.num_hidden_layers",
        "",
        "embedded model: decoder layers",
    ),
    knob(
        "model.num_attention_heads",
        "",
        "embedded model: attention heads",
    ),
    knob(
        "model.num_key_value_heads",
        "",
        "embedded model: key/value heads (GQA)",
    ),
    knob(
        "model.intermediate_size",
        "",
        "embedded model: SwiGLU inner size",
    ),
    knob(
        "model.init_seed",
        "",
        "embedded model: seed of the random init (the run seed is added)",
    ),
    knob(
        "warmup.steps",
        "",
        "SFT updates with the rationale in context before OPSD (0 skips)",
    ),
    knob(
        "warmup.batch_size",
        "",
        "samples per warm-up update (one in memory at a time)",
    ),
    knob(
        "warmup.learning_rate",
        "",
        "peak LR of the warm-up (schedule shape and AdamW from [opsd])",
    ),
    knob(
        "lora.r",
        "",
        "with a [lora] table: LoRA rank (the method phases train adapters, not every weight)",
    ),
    knob("lora.lora_alpha", "", "LoRA α: scaling α/r (α/√r with lora.use_rslora)"),
    knob("lora.lora_dropout", "", "dropout on the adapters' input in training, in [0, 1)"),
    knob(
        "lora.target_modules",
        "",
        "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj (any of)",
    ),
    knob("lora.use_rslora", "", "rank-stabilised scaling α/√r"),
    knob(
        "opsd.steps",
        "schedule.total_steps",
        "optimizer updates of every method (label-sft included)",
    ),
    knob(
        "opsd.batch_size",
        "",
        "prompts per micro-batch: their rollouts' teacher scores and student graphs are in \
         memory at once, one backward pass each micro-batch (label-sft: examples)",
    ),
    knob(
        "opsd.grad_accumulation",
        "",
        "micro-batches accumulated into one update (batch_size × grad_accumulation prompts \
         per update; memory does not grow with it unless updates_per_rollout > 1, which keeps \
         the teacher scores of every prompt of the update)",
    ),
    knob(
        "opsd.samples_per_prompt",
        "rollout.samples_per_prompt",
        "G rollouts per prompt",
    ),
    knob(
        "opsd.max_new_tokens",
        "rollout.max_new_tokens",
        "longest sampled answer",
    ),
    knob(
        "opsd.temperature",
        "rollout.sampling.temperature",
        "rollout sampling temperature (0 = greedy)",
    ),
    knob(
        "opsd.top_k",
        "rollout.sampling.top_k",
        "rollout sampling top-k (absent: none)",
    ),
    knob(
        "opsd.top_p",
        "rollout.sampling.top_p",
        "rollout nucleus mass",
    ),
    knob(
        "opsd.divergence",
        "",
        "jsd | forward_kl | reverse_kl | sampled_reverse_kl (per-token, to the teacher)",
    ),
    knob(
        "opsd.beta",
        "loss.divergence.beta",
        "JSD mixture weight in [0, 1] (0 = forward KL, 1 = reverse KL, as TRL's GKD)",
    ),
    knob(
        "opsd.ratio_clip",
        "loss.divergence.ratio_clip",
        "importance-ratio clamp of sampled_reverse_kl",
    ),
    knob(
        "opsd.loss_top_k",
        "loss.top_k.k",
        "restrict the divergence to the student's top-k tokens (absent: full vocabulary)",
    ),
    knob(
        "opsd.loss_top_k_tail",
        "",
        "with opsd.loss_top_k, keep the remaining mass in one tail bucket",
    ),
    knob(
        "opsd.reduction",
        "",
        "token (mean over all valid tokens) | sequence (per sequence, then over sequences)",
    ),
    knob(
        "opsd.loss_temperature",
        "loss.temperature",
        "temperature of both distributions in the loss",
    ),
    knob(
        "opsd.kl_clip",
        "loss.kl_clip",
        "clip each per-token, per-entry KL term (absent: none)",
    ),
    knob(
        "opsd.teacher",
        "",
        "frozen (weights OPSD starts from) | ema (opsd.ema_rate) | live (current student)",
    ),
    knob(
        "opsd.ema_rate",
        "teacher.rate",
        "weight of the student in each EMA blend of the teacher",
    ),
    knob(
        "opsd.learning_rate",
        "learning_rate",
        "peak LR",
    ),
    knob(
        "opsd.lr_warmup_steps",
        "",
        "linear LR warm-up updates",
    ),
    knob(
        "opsd.lr_decay",
        "",
        "cosine | linear | constant, down to opsd.min_lr_ratio · peak",
    ),
    knob(
        "opsd.min_lr_ratio",
        "schedule.min_lr_ratio",
        "floor of the LR decay, as a fraction of the peak",
    ),
    knob(
        "opsd.max_grad_norm",
        "max_grad_norm",
        "global gradient-norm clip (absent: none)",
    ),
    knob(
        "opsd.adam_beta1",
        "adamw.beta_1/beta_2",
        "AdamW β₁",
    ),
    knob(
        "opsd.adam_beta2",
        "",
        "AdamW β₂",
    ),
    knob(
        "opsd.adam_epsilon",
        "adamw.epsilon",
        "AdamW ε",
    ),
    knob(
        "opsd.weight_decay",
        "adamw.weight_decay",
        "AdamW decoupled weight decay",
    ),
    knob(
        "opsd.updates_per_rollout",
        "updates_per_rollout",
        ">1 reuses a rollout off-policy; only with divergence = sampled_reverse_kl, whose importance ratio corrects it",
    ),
    knob(
        "opsd.chunk_rows",
        "chunk_rows",
        "rows per chunk of the fused loss (bounds the [rows, V] memory)",
    ),
    knob(
        "cluster.nodes",
        "",
        "with a [cluster] table: machines of a multi-node run, each with the same device list",
    ),
    knob(
        "cluster.rank",
        "",
        "this machine's index in 0..nodes (flag --node-rank)",
    ),
    knob(
        "cluster.orchestrator",
        "",
        "ws://HOST:PORT of `omniopsd orchestrator --port PORT`",
    ),
    knob(
        "cluster.address",
        "",
        "ws://HOST:PORT: this machine as the others reach it, PORT serving its tensors (flag \
         --node-address)",
    ),
    knob(
        "cluster.timeout",
        "",
        "seconds the first all-reduces over all nodes may take once every node has joined \
         (default 60); past it the run stops with an error instead of waiting forever",
    ),
    knob(
        "eval.every",
        "",
        "held-out evaluation every N updates and at the end (HIT, WAF, F_s)",
    ),
    knob(
        "eval.max_samples",
        "",
        "held-out samples evaluated (absent: all)",
    ),
    knob(
        "eval.max_new_tokens",
        "",
        "longest generated answer in evaluation",
    ),
    knob(
        "eval.batch_size",
        "",
        "held-out samples decoded together in one batch (answers equal to one at a time up to f32 rounding)",
    ),
    knob(
        "eval.mer_data",
        "",
        "MER-UniBench scoring data directory replacing the shipped copy (absent: shipped)",
    ),
    knob(
        "checkpoint.every",
        "",
        "checkpoint every N updates (0: only at the end and on Ctrl-C)",
    ),
    knob(
        "checkpoint.keep_last",
        "",
        "checkpoints kept per training; older ones are deleted once a newer one is safe",
    ),
];

/// The knob table as `omniopsd train --help` shows it.
pub fn knobs_help() -> String {
    let mut s = String::from(
        "Config keys (TOML; all optional, unknown keys are errors; the resolved file is runs/NAME/config.toml):\n",
    );
    for k in KNOBS {
        s.push_str(&format!("  {:<26} {}\n", k.key, k.help));
    }
    s.pop();
    s
}

/// A core config error as the TOML key it came from: `opsd.beta: must be in [0, 1], found 1.5`.
fn opsd_error(e: &StepError) -> anyhow::Error {
    let Some(f) = e.field_error() else {
        return anyhow!("[opsd]: {e}");
    };
    // `rollout.logp_temperature` is set from `loss_temperature` too.
    let field = match f.field.as_str() {
        "rollout.logp_temperature" => "loss.temperature",
        other => other,
    };
    match KNOBS.iter().find(|k| k.core == field) {
        Some(k) => anyhow!("{}: {}", k.key, f.problem),
        None => anyhow!("[opsd] ({}): {}", f.field, f.problem),
    }
}

/// A core error of the warm-up's [`SftConfig`] as the TOML key it came from. The warm-up
/// owns its budget and peak rate; everything else it shares with `[opsd]` (see
/// [`TrainConfig::warmup_sft`]), so those fields are renamed as `[opsd]`'s are.
fn warmup_error(e: &SftError) -> anyhow::Error {
    let Some(f) = e.field_error() else {
        return anyhow!("[warmup]: {e}");
    };
    let key = match f.field.as_str() {
        "learning_rate" => "warmup.learning_rate",
        "schedule.total_steps" => "warmup.steps",
        other => match KNOBS.iter().find(|k| k.core == other) {
            Some(k) => k.key,
            None => return anyhow!("[warmup] ({}): {}", f.field, f.problem),
        },
    };
    anyhow!("{key}: {}", f.problem)
}

impl OpsdSection {
    /// The core trainer's configuration: the one conversion of `[opsd]`. `stop_token` ends
    /// rollouts; `seed` keys the sampler.
    pub fn trainer(&self, stop_token: u32, seed: u64) -> OpsdConfig {
        let divergence = match self.divergence {
            DivergenceName::ForwardKl => Divergence::ForwardKl,
            DivergenceName::ReverseKl => Divergence::ReverseKl,
            DivergenceName::Jsd => Divergence::Jsd { beta: self.beta },
            DivergenceName::SampledReverseKl => Divergence::SampledReverseKl {
                ratio_clip: self.ratio_clip,
            },
        };
        OpsdConfig {
            rollout: RolloutConfig {
                sampling: SamplingConfig {
                    temperature: self.temperature,
                    top_k: self.top_k,
                    top_p: self.top_p,
                },
                samples_per_prompt: self.samples_per_prompt,
                max_new_tokens: self.max_new_tokens,
                stop_tokens: vec![stop_token],
                // Padding is masked out, so any in-vocabulary id does.
                pad_token: stop_token,
                logp_temperature: self.loss_temperature,
            },
            loss: LossConfig {
                divergence,
                top_k: self.loss_top_k.map(|k| TopK {
                    k,
                    tail: self.loss_top_k_tail,
                }),
                reduction: match self.reduction {
                    ReductionName::Token => Reduction::Token,
                    ReductionName::Sequence => Reduction::Sequence,
                },
                temperature: self.loss_temperature,
                kl_clip: self.kl_clip,
            },
            teacher: match self.teacher {
                TeacherName::Live => TeacherMode::Live,
                TeacherName::Frozen => TeacherMode::Frozen,
                TeacherName::Ema => TeacherMode::Ema {
                    rate: self.ema_rate,
                },
            },
            adamw: self.adamw(),
            learning_rate: self.learning_rate,
            // Saturating: `validate` refuses a product past u64 naming both keys, and this
            // conversion must not panic before it can.
            schedule: self.schedule(self.steps.saturating_mul(self.updates_per_rollout as u64)),
            max_grad_norm: self.max_grad_norm,
            updates_per_rollout: self.updates_per_rollout,
            chunk_rows: self.chunk_rows,
            micro_batch: self.batch_size,
            seed,
            // Set from the top-level `precision` (TrainConfig::opsd_trainer).
            loss_scaling: None,
        }
    }

    /// The `label-sft` ablation's configuration: OPSD's budget, peak rate and optimizer.
    pub fn label_sft(&self) -> SftConfig {
        SftConfig {
            micro_batch: self.batch_size,
            ..self.sft(self.learning_rate, self.steps)
        }
    }

    /// A supervised phase of `steps` updates at `learning_rate` with OPSD's schedule shape,
    /// optimizer and clipping.
    fn sft(&self, learning_rate: f64, steps: u64) -> SftConfig {
        SftConfig {
            learning_rate,
            schedule: self.schedule(steps),
            adamw: self.adamw(),
            max_grad_norm: self.max_grad_norm,
            micro_batch: 1,
            loss_scaling: None,
        }
    }

    fn adamw(&self) -> AdamWSettings {
        AdamWSettings {
            beta_1: self.adam_beta1,
            beta_2: self.adam_beta2,
            epsilon: self.adam_epsilon,
            weight_decay: self.weight_decay,
        }
    }

    fn schedule(&self, total_steps: u64) -> LrSchedule {
        LrSchedule {
            warmup_steps: self.lr_warmup_steps.min(total_steps),
            decay: match self.lr_decay {
                DecayName::Constant => LrDecay::Constant,
                DecayName::Cosine => LrDecay::Cosine,
                DecayName::Linear => LrDecay::Linear,
            },
            total_steps,
            min_lr_ratio: self.min_lr_ratio,
        }
    }
}

impl TrainConfig {
    /// Parses TOML; unknown keys and wrong types are errors naming the key and position.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let cfg: TrainConfig =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("config {origin}: {e}"))?;
        cfg.validate().with_context(|| format!("config {origin}"))?;
        Ok(cfg)
    }

    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Self> {
        let cfg = Self::read(path)?;
        cfg.validate()
            .with_context(|| format!("config {}", path.display()))?;
        Ok(cfg)
    }

    /// Reads and parses a TOML file without [`Self::validate`] (for a caller that changes
    /// keys first and validates after).
    pub fn read(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    /// The warm-up's configuration: `[warmup]`'s budget and peak rate, with OPSD's schedule
    /// shape, optimizer and clipping.
    pub fn warmup_sft(&self) -> SftConfig {
        SftConfig {
            loss_scaling: self.precision.loss_scaling(),
            ..self.opsd.sft(self.warmup.learning_rate, self.warmup.steps)
        }
    }

    /// The `label-sft` ablation's configuration ([`OpsdSection::label_sft`] with the loss
    /// scaling `precision` asks for).
    pub fn label_sft(&self) -> SftConfig {
        SftConfig {
            loss_scaling: self.precision.loss_scaling(),
            ..self.opsd.label_sft()
        }
    }

    /// The OPSD trainer's configuration ([`OpsdSection::trainer`] with the loss scaling
    /// `precision` asks for).
    pub fn opsd_trainer(&self, stop_token: u32, seed: u64) -> OpsdConfig {
        OpsdConfig {
            loss_scaling: self.precision.loss_scaling(),
            ..self.opsd.trainer(stop_token, seed)
        }
    }

    /// The resolved configuration as TOML (re-parses to the same value).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).context("serializing the resolved config")
    }

    /// Checks ranges the types cannot express; names the offending key. `[opsd]` and
    /// `[model]` are checked by the core's and the decoder's own `validate`.
    pub fn validate(&self) -> Result<()> {
        self.validate_knobs()?;
        let devices = self
            .device
            .names()
            .iter()
            .map(|n| n.parse().map_err(|e| anyhow!("`device`: {e}")))
            .collect::<Result<Vec<omniopsd_backends::DeviceSpec>>>()?;
        if devices.is_empty() {
            bail!("device: must be a name or a non-empty list");
        }
        self.check_precision(devices[0])
    }

    /// Whether `device` computes in the configured precision.
    pub fn check_precision(&self, device: omniopsd_backends::DeviceSpec) -> Result<()> {
        if self.precision != Precision::F32 && device == omniopsd_backends::DeviceSpec::NdArray {
            bail!(
                "precision: \"{}\" needs a backend with half-precision tensors, and device \
                 \"{}\" (Burn's NdArray) has none; use device \"flex\" (a build with \
                 --features flex) or \"cuda\"",
                self.precision.name(),
                self.device
            );
        }
        Ok(())
    }

    /// Every check of [`Self::validate`] but the device's: whether this build has it, and
    /// whether it computes in the configured precision (`omniopsd plan` plans for devices
    /// this build may not have).
    pub fn validate_knobs(&self) -> Result<()> {
        fn need(ok: bool, key: &str, what: &str) -> Result<()> {
            if ok {
                Ok(())
            } else {
                bail!("{key}: must be {what}")
            }
        }
        let valid_name = !self.name.is_empty()
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !self.name.starts_with('.');
        need(
            valid_name,
            "name",
            "non-empty, of letters, digits, '-', '_', '.'",
        )?;
        need(!self.seeds.is_empty(), "seeds", "a non-empty list")?;
        need(!self.methods.is_empty(), "methods", "a non-empty list")?;
        need(self.data.synth_n >= 10, "data.synth_n", ">= 10")?;
        need(
            self.data.max_audio_seconds > 0.0,
            "data.max_audio_seconds",
            "> 0",
        )?;
        need(self.data.max_frames >= 1, "data.max_frames", ">= 1")?;
        self.data.video.check("data.video.")?;
        super::tiny::check(&self.model)?;
        need(self.warmup.batch_size >= 1, "warmup.batch_size", ">= 1")?;
        if self.warmup.steps > 0 {
            self.warmup_sft().validate().map_err(|e| warmup_error(&e))?;
        }
        let o = &self.opsd;
        need(o.steps >= 1, "opsd.steps", ">= 1")?;
        need(o.batch_size >= 1, "opsd.batch_size", ">= 1")?;
        need(o.grad_accumulation >= 1, "opsd.grad_accumulation", ">= 1")?;
        need(
            o.batch_size.checked_mul(o.grad_accumulation).is_some(),
            "opsd.grad_accumulation",
            "small enough that opsd.batch_size × opsd.grad_accumulation (the episodes of an \
             update) fits in 64 bits",
        )?;
        need(
            o.steps.checked_mul(o.updates_per_rollout as u64).is_some(),
            "opsd.steps",
            "small enough that opsd.steps × opsd.updates_per_rollout (the updates of the LR \
             schedule) fits in 64 bits",
        )?;
        self.opsd
            .trainer(0, 0)
            .validate()
            .map_err(|e| opsd_error(&e))?;
        need(self.eval.every >= 1, "eval.every", ">= 1")?;
        need(self.eval.max_new_tokens >= 1, "eval.max_new_tokens", ">= 1")?;
        need(self.eval.batch_size >= 1, "eval.batch_size", ">= 1")?;
        need(
            self.checkpoint.keep_last >= 1,
            "checkpoint.keep_last",
            ">= 1",
        )?;
        let nodes = match &self.cluster {
            Some(cluster) => {
                cluster.check()?;
                cluster.nodes as usize
            }
            None => 1,
        };
        // Every device gets the same share of an update's examples.
        let shares = self.device.names().len().saturating_mul(nodes);
        if shares > 1 {
            let per_update = o.batch_size.saturating_mul(o.grad_accumulation);
            if !per_update.is_multiple_of(shares) {
                bail!(
                    "opsd.batch_size × opsd.grad_accumulation: the {per_update} prompts of an \
                     update must split evenly over the {shares} devices{}",
                    if nodes > 1 {
                        " (device list × cluster.nodes)"
                    } else {
                        " of `device`"
                    }
                );
            }
            if self.warmup.steps > 0 && !self.warmup.batch_size.is_multiple_of(shares) {
                bail!(
                    "warmup.batch_size: the {} examples of a warm-up update must split evenly \
                     over the {shares} devices{}",
                    self.warmup.batch_size,
                    if nodes > 1 {
                        " (device list × cluster.nodes)"
                    } else {
                        " of `device`"
                    }
                );
            }
        }
        if let Some(lora) = &self.lora {
            lora.config()
                .validate()
                .map_err(|(key, reason)| anyhow!("lora.{key}: {reason}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(
            TrainConfig::from_toml("", "t").unwrap(),
            TrainConfig::default()
        );
    }

    #[test]
    fn resolved_config_round_trips() {
        let mut cfg = TrainConfig::default();
        cfg.opsd.top_k = Some(20);
        cfg.data.manifest = Some("data/m.jsonl".into());
        let text = cfg.to_toml().unwrap();
        assert_eq!(TrainConfig::from_toml(&text, "t").unwrap(), cfg);
    }

    #[test]
    fn unknown_top_level_key_is_an_error_naming_it() {
        let err = TrainConfig::from_toml("lerning_rate = 1.0\n", "t").unwrap_err();
        assert!(format!("{err:#}").contains("lerning_rate"), "{err:#}");
    }

    #[test]
    fn unknown_nested_key_is_an_error_naming_it() {
        let err = TrainConfig::from_toml("[opsd]\nbeta = 0.3\ntopk = 5\n", "t").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("topk"), "{msg}");
    }

    #[test]
    fn out_of_range_knob_is_an_error_naming_it() {
        let err = TrainConfig::from_toml("[opsd]\nbeta = 1.5\n", "t").unwrap_err();
        assert!(format!("{err:#}").contains("opsd.beta"), "{err:#}");
        let err = TrainConfig::from_toml("device = \"tpu\"\n", "t").unwrap_err();
        assert!(format!("{err:#}").contains("tpu"), "{err:#}");
    }

    #[test]
    fn methods_parse_by_name() {
        let cfg = TrainConfig::from_toml("methods = [\"opsd\", \"label-sft\"]\n", "t").unwrap();
        assert_eq!(cfg.methods, vec![Method::Opsd, Method::LabelSft]);
        assert!(TrainConfig::from_toml("methods = [\"magic\"]\n", "t").is_err());
    }

    fn error(toml: &str) -> String {
        format!("{:#}", TrainConfig::from_toml(toml, "t").unwrap_err())
    }

    #[test]
    fn batch_size_is_the_micro_batch_and_accumulation_multiplies_the_update() {
        let cfg = TrainConfig::from_toml(
            "[opsd]
batch_size = 3
grad_accumulation = 5
",
            "t",
        )
        .unwrap();
        // Every OPSD method and label-sft hold `batch_size` prompts at once; the warm-up one.
        assert_eq!(cfg.opsd.trainer(0, 0).micro_batch, 3);
        assert_eq!(cfg.opsd.label_sft().micro_batch, 3);
        assert_eq!(cfg.warmup_sft().micro_batch, 1);
        // The default holds one prompt and accumulates four: the update of the old default
        // (4 prompts per update, each its own backward pass), bit for bit.
        let d = OpsdSection::default();
        assert_eq!((d.batch_size, d.grad_accumulation), (1, 4));
        assert!(error(
            "[opsd]
batch_size = 0
"
        )
        .contains("opsd.batch_size"));
    }

    #[test]
    fn core_range_errors_name_the_toml_key() {
        let msg = error("[opsd]\nbeta = 1.5\n");
        assert!(
            msg.contains("opsd.beta: must be in [0, 1], found 1.5"),
            "{msg}"
        );
        assert!(error("[opsd]\ntop_p = 0.0\n").contains("opsd.top_p: must be"));
        assert!(
            error("[opsd]\nloss_temperature = 0.0\n").contains("opsd.loss_temperature: must be")
        );
        assert!(error("[opsd]\nloss_top_k = 0\n").contains("opsd.loss_top_k: must be"));
        assert!(
            error("[opsd]\nteacher = \"ema\"\nema_rate = 2.0\n").contains("opsd.ema_rate: must be")
        );
        assert!(error("[opsd]\nlearning_rate = -1.0\n").contains("opsd.learning_rate: must be"));
        assert!(error("[opsd]\nadam_epsilon = 0.0\n").contains("opsd.adam_epsilon: must be"));
        assert!(error("[opsd]\nlr_warmup_steps = 30\n").contains("opsd.steps: must be"));
        assert!(error("[opsd]\nchunk_rows = 0\n").contains("opsd.chunk_rows: must be"));
        assert!(error("[opsd]\nupdates_per_rollout = 2\n")
            .contains("opsd.updates_per_rollout: must be 1 unless"));
        assert!(TrainConfig::from_toml(
            "[opsd]\nupdates_per_rollout = 2\ndivergence = \"sampled_reverse_kl\"\n",
            "t"
        )
        .is_ok());
    }

    #[test]
    fn budgets_whose_products_overflow_are_errors_naming_the_key() {
        let msg = error(
            "[opsd]\nsteps = 9223372036854775807\nupdates_per_rollout = 3\n\
             divergence = \"sampled_reverse_kl\"\n",
        );
        assert!(
            msg.contains(
                "opsd.steps: must be small enough that opsd.steps × opsd.updates_per_rollout"
            ),
            "{msg}"
        );
        let msg = error("[opsd]\nbatch_size = 9223372036854775807\ngrad_accumulation = 3\n");
        assert!(
            msg.contains("opsd.grad_accumulation: must be small enough that opsd.batch_size × opsd.grad_accumulation"),
            "{msg}"
        );
    }

    #[test]
    fn model_sizes_are_checked_by_the_decoder_naming_the_key() {
        let msg = error("[model]\nnum_key_value_heads = 3\n");
        assert!(msg.contains("model.num_key_value_heads"), "{msg}");
        assert!(error("[model]\nhidden_size = 0\n").contains("model.hidden_size"));
    }

    /// Every key of a config with every optional key set, as `section.key`.
    fn keys(value: &toml::Value, prefix: &str, out: &mut Vec<String>) {
        if let toml::Value::Table(t) = value {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                if v.is_table() {
                    keys(v, &key, out);
                } else {
                    out.push(key);
                }
            }
        }
    }

    #[test]
    fn knobs_list_every_key_once_and_nothing_else() {
        let mut cfg = TrainConfig::default();
        cfg.data.manifest = Some("m.jsonl".into());
        cfg.model.dir = Some("ckpt".into());
        cfg.opsd.top_k = Some(5);
        cfg.opsd.loss_top_k = Some(5);
        cfg.opsd.kl_clip = Some(1.0);
        cfg.eval.max_samples = Some(3);
        cfg.eval.mer_data = Some("mer".into());
        cfg.lora = Some(LoraSection::default());
        cfg.cluster = Some(ClusterSection {
            nodes: 2,
            rank: 1,
            orchestrator: "ws://10.0.0.1:3000".into(),
            address: "ws://10.0.0.2:3001".into(),
            timeout: 60,
        });
        let value: toml::Value = toml::from_str(&cfg.to_toml().unwrap()).unwrap();
        let mut found = Vec::new();
        keys(&value, "", &mut found);
        found.sort();
        let mut listed: Vec<String> = KNOBS.iter().map(|k| k.key.to_string()).collect();
        listed.sort();
        assert_eq!(found, listed);
        assert!(TrainConfig::from_toml(&cfg.to_toml().unwrap(), "t").is_ok());
    }

    #[test]
    fn device_is_a_name_or_a_list_and_round_trips() {
        let one = TrainConfig::from_toml("device = \"cpu\"\n", "t").unwrap();
        assert_eq!(one.device, DeviceNames::One("cpu".into()));
        let two = TrainConfig::from_toml("device = [\"cpu\", \"cpu\"]\n", "t").unwrap();
        assert_eq!(two.device.names(), ["cpu", "cpu"]);
        assert_eq!(
            TrainConfig::from_toml(&two.to_toml().unwrap(), "t").unwrap(),
            two
        );
        assert_eq!(
            DeviceNames::from_flag("cuda:0, cuda:1").names(),
            ["cuda:0", "cuda:1"]
        );
        assert_eq!(
            DeviceNames::from_flag("flex"),
            DeviceNames::One("flex".into())
        );
        assert!(error("device = []\n").contains("device"));
        assert!(error("device = [\"cpu\", \"tpu\"]\n").contains("tpu"));
        assert!(error("device = 3\n").contains("device"));
    }

    #[test]
    fn an_update_must_split_evenly_over_the_devices() {
        let two = "device = [\"cpu\", \"cpu\"]\n";
        let msg = error(&format!(
            "{two}[opsd]\nbatch_size = 3\ngrad_accumulation = 1\n"
        ));
        assert!(
            msg.contains("opsd.batch_size × opsd.grad_accumulation") && msg.contains("2 devices"),
            "{msg}"
        );
        let msg = error(&format!("{two}[warmup]\nbatch_size = 3\n"));
        assert!(msg.contains("warmup.batch_size"), "{msg}");
        // A skipped warm-up has no batch to split.
        assert!(TrainConfig::from_toml(
            &format!("{two}[warmup]\nsteps = 0\nbatch_size = 3\n"),
            "t"
        )
        .is_ok());
    }

    #[test]
    fn cluster_keys_are_all_required_and_checked() {
        let table = |body: &str| format!("[cluster]\n{body}");
        let full =
            "nodes = 2\nrank = 1\norchestrator = \"ws://h:3000\"\naddress = \"ws://g:3001\"\n";
        let cfg = TrainConfig::from_toml(&table(full), "t").unwrap();
        assert_eq!(cfg.cluster.as_ref().unwrap().check().unwrap(), 3001);
        assert!(error(&table("nodes = 2\nrank = 0\n")).contains("orchestrator"));
        let bad = |from: &str, to: &str| error(&table(&full.replace(from, to)));
        assert!(bad("nodes = 2", "nodes = 1").contains("cluster.nodes"));
        assert!(bad("rank = 1", "rank = 2").contains("cluster.rank"));
        assert!(bad("ws://h:3000", "http://h:3000").contains("cluster.orchestrator"));
        assert!(bad("ws://g:3001", "ws://g").contains("cluster.address"));
        assert_eq!(cfg.cluster.as_ref().unwrap().timeout, 60, "the default");
        assert!(error(&table(&format!("{full}timeout = 0\n"))).contains("cluster.timeout"));
        // Two nodes of one CPU device: a warm-up batch of 8 and updates of 4 split in two.
        assert!(bad("nodes = 2", "nodes = 3").contains("split evenly"));
    }

    #[test]
    fn warmup_range_errors_are_the_cores_naming_the_toml_key() {
        let msg = error("[warmup]\nlearning_rate = 0.0\n");
        assert!(
            msg.contains("warmup.learning_rate: must be a finite number > 0, found 0"),
            "{msg}"
        );
        // A decaying schedule needs more updates than its LR warm-up.
        let msg = error("[warmup]\nsteps = 3\n[opsd]\nlr_warmup_steps = 3\n");
        assert!(msg.contains("warmup.steps: must be >"), "{msg}");
        // Shared with [opsd]: reported under the key that set it.
        assert!(error("[opsd]\nadam_epsilon = -1.0\n").contains("opsd.adam_epsilon: must be"));
        // A skipped warm-up has no schedule to check.
        assert!(TrainConfig::from_toml("[warmup]\nsteps = 0\n", "t").is_ok());
    }

    #[test]
    fn lora_table_reads_with_peft_defaults_and_refuses_bad_values_naming_the_key() {
        let cfg = TrainConfig::from_toml("[lora]\nr = 4\n", "t").unwrap();
        let lora = cfg.lora.clone().unwrap().config();
        assert_eq!(
            (lora.r, lora.lora_alpha, lora.target_modules.len()),
            (4, 32.0, 7)
        );
        assert_eq!(
            TrainConfig::from_toml(&cfg.to_toml().unwrap(), "t").unwrap(),
            cfg
        );
        assert!(TrainConfig::from_toml("", "t").unwrap().lora.is_none());
        for (toml, key) in [
            ("[lora]\nr = 0\n", "lora.r"),
            ("[lora]\nlora_alpha = 0.0\n", "lora.lora_alpha"),
            ("[lora]\nlora_alpha = -1.0\n", "lora.lora_alpha"),
            (
                "[lora]\ntarget_modules = [\"q_proj\", \"qkv\"]\n",
                "lora.target_modules",
            ),
            ("[lora]\nlora_dropout = 1.0\n", "lora.lora_dropout"),
            ("[lora]\nrank = 4\n", "rank"),
        ] {
            let msg = error(toml);
            assert!(msg.contains(key), "{toml}: {msg}");
        }
    }

    #[test]
    fn every_core_field_has_one_knob() {
        let cores: Vec<&str> = KNOBS
            .iter()
            .map(|k| k.core)
            .filter(|c| !c.is_empty())
            .collect();
        let mut unique = cores.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), cores.len(), "{cores:?}");
        let help = knobs_help();
        assert!(
            help.contains("opsd.beta") && help.contains("checkpoint.every"),
            "{help}"
        );
    }
}
