//! The training configuration: one TOML file, every knob of the method, unknown keys refused.
//!
//! Every table is `deny_unknown_fields`, so a misspelt knob (`lerning_rate`) is an error that
//! names the key instead of a silently ignored setting. Every field has a default, so the
//! empty file is the embedded default run; the resolved config (defaults filled in) is written
//! to `runs/<name>/config.toml` and is itself a valid config.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The whole configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Run name: outputs go to `<runs_dir>/<name>/`.
    pub name: String,
    /// Parent directory of runs.
    pub runs_dir: PathBuf,
    /// Device: `cpu`, `ndarray`, `flex`, `cuda`, `cuda:N` (see `omniopsd_backends::DeviceSpec`).
    pub device: String,
    /// One full training per seed; the report gives mean ± sd over them.
    pub seeds: Vec<u64>,
    /// Methods to run (the ablation table's rows): `opsd` (rationale-privileged),
    /// `opsd-no-privileged`, `opsd-label-privileged`, `label-sft`.
    pub methods: Vec<Method>,
    /// Where the samples come from.
    pub data: DataConfig,
    /// The model and its tokenizer.
    pub model: ModelConfig,
    /// The warm-up SFT phase that teaches reading evidence in context.
    pub warmup: WarmupConfig,
    /// The OPSD phase: every knob of the core trainer.
    pub opsd: OpsdSection,
    /// Held-out evaluation.
    pub eval: EvalConfig,
    /// Checkpointing.
    pub checkpoint: CheckpointConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            name: "default".into(),
            runs_dir: "runs".into(),
            device: "cpu".into(),
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

/// Data source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A JSONL manifest; absent: the synthetic corpus, generated on first use into `cache_dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<PathBuf>,
    /// Where the synthetic corpus is cached.
    pub cache_dir: PathBuf,
    /// Samples in the synthetic corpus.
    pub synth_n: usize,
    /// Seed of the synthetic corpus.
    pub synth_seed: u64,
    /// Longest audio accepted, in seconds.
    pub max_audio_seconds: f64,
    /// Most frames accepted per video.
    pub max_frames: usize,
    /// What to do with an invalid sample.
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
            on_bad_sample: BadSamplePolicy::Error,
        }
    }
}

/// The model: an HF checkpoint directory, or the embedded tiny omni model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// HF checkpoint directory (Qwen2 or Qwen2.5-Omni thinker); absent: the embedded tiny
    /// model, randomly initialised and given a tokenizer trained on the corpus.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Tokenizer vocabulary size (embedded model only).
    pub vocab_size: usize,
    /// Hidden size (embedded model only).
    pub hidden_size: usize,
    /// Decoder layers (embedded model only).
    pub num_hidden_layers: usize,
    /// Attention heads (embedded model only).
    pub num_attention_heads: usize,
    /// Key/value heads for GQA (embedded model only).
    pub num_key_value_heads: usize,
    /// SwiGLU inner size (embedded model only).
    pub intermediate_size: usize,
    /// Seed of the random initialisation (embedded model only; the run seed is added).
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

/// The warm-up: supervised answers given the rationale in context.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmupConfig {
    /// Optimizer updates (0 skips the warm-up).
    pub steps: u64,
    /// Samples per update.
    pub batch_size: usize,
    /// Peak learning rate.
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

/// Every knob of the core's OPSD trainer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpsdSection {
    /// Optimizer updates of the OPSD phase (and of `label-sft`, the same budget).
    pub steps: u64,
    /// Prompts (episodes) per micro-batch.
    pub batch_size: usize,
    /// Micro-batches whose gradients are accumulated into one update.
    pub grad_accumulation: usize,
    /// `G`: responses sampled per prompt.
    pub samples_per_prompt: usize,
    /// Longest response, stop token included.
    pub max_new_tokens: usize,
    /// Sampling temperature (0 = greedy).
    pub temperature: f32,
    /// Sampling top-k (absent: all tokens).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// Nucleus sampling mass.
    pub top_p: f32,
    /// The divergence.
    pub divergence: DivergenceName,
    /// JSD mixture weight β in [0, 1] (0 = forward KL, 1 = reverse KL, as TRL).
    pub beta: f32,
    /// Importance-ratio clamp of `sampled_reverse_kl`.
    pub ratio_clip: f32,
    /// Restrict the divergence to the student's top-k tokens (absent: full vocabulary).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_top_k: Option<usize>,
    /// With `loss_top_k`, keep the remaining mass in one tail bucket.
    pub loss_top_k_tail: bool,
    /// Loss reduction.
    pub reduction: ReductionName,
    /// Loss temperature (separate from the sampling temperature).
    pub loss_temperature: f32,
    /// Point-wise clip of each (token, vocabulary entry) KL term (absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_clip: Option<f32>,
    /// Teacher weights. Default `frozen` (the weights OPSD starts from): on the embedded
    /// default a `live` teacher drifts with the student and the answer format collapses
    /// within 20 updates at this learning rate, while a frozen one improves steadily.
    pub teacher: TeacherName,
    /// EMA rate when `teacher = "ema"`.
    pub ema_rate: f32,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Linear warm-up updates of the schedule.
    pub lr_warmup_steps: u64,
    /// Decay after warm-up.
    pub lr_decay: DecayName,
    /// Floor of the decay as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// Global gradient-norm clip (absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f32>,
    /// AdamW β₁.
    pub adam_beta1: f32,
    /// AdamW β₂.
    pub adam_beta2: f32,
    /// AdamW ε.
    pub adam_epsilon: f32,
    /// AdamW decoupled weight decay.
    pub weight_decay: f32,
    /// Updates per rollout (>1 is off-policy; the ratio clip corrects).
    pub updates_per_rollout: usize,
    /// Rows per chunk of the fused loss.
    pub chunk_rows: usize,
}

impl Default for OpsdSection {
    fn default() -> Self {
        Self {
            steps: 30,
            batch_size: 4,
            grad_accumulation: 1,
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

/// Held-out evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Evaluate every this many updates (and at the end).
    pub every: u64,
    /// Held-out samples evaluated (absent: all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_samples: Option<usize>,
    /// Longest generated answer.
    pub max_new_tokens: usize,
    /// A directory of MER-UniBench scoring data (format.csv, synonym.xlsx, wheel1..5.xlsx)
    /// replacing the copy shipped inside the binary (absent: the shipped copy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mer_data: Option<PathBuf>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every: 10,
            max_samples: None,
            max_new_tokens: 24,
            mer_data: None,
        }
    }
}

/// Checkpointing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Save every this many updates (0: only at the end and on Ctrl-C).
    pub every: u64,
    /// Checkpoints kept per training (older ones are deleted after a newer one is safe).
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
        let text = fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// The resolved configuration as TOML (re-parses to the same value).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).context("serializing the resolved config")
    }

    /// Checks ranges the types cannot express; names the offending key.
    pub fn validate(&self) -> Result<()> {
        fn need(ok: bool, key: &str, what: &str) -> Result<()> {
            if ok {
                Ok(())
            } else {
                bail!("`{key}` must be {what}")
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
        self.device
            .parse::<omniopsd_backends::DeviceSpec>()
            .map_err(|e| anyhow::anyhow!("`device`: {e}"))?;
        need(self.data.synth_n >= 10, "data.synth_n", ">= 10")?;
        need(
            self.data.max_audio_seconds > 0.0,
            "data.max_audio_seconds",
            "> 0",
        )?;
        need(self.data.max_frames >= 1, "data.max_frames", ">= 1")?;
        let m = &self.model;
        need(m.vocab_size >= 64, "model.vocab_size", ">= 64")?;
        need(m.hidden_size >= 8, "model.hidden_size", ">= 8")?;
        need(m.num_hidden_layers >= 1, "model.num_hidden_layers", ">= 1")?;
        need(
            m.num_attention_heads >= 1 && m.hidden_size % m.num_attention_heads == 0,
            "model.num_attention_heads",
            ">= 1 and divide model.hidden_size",
        )?;
        need(
            m.num_key_value_heads >= 1 && m.num_attention_heads % m.num_key_value_heads == 0,
            "model.num_key_value_heads",
            ">= 1 and divide model.num_attention_heads",
        )?;
        need(m.intermediate_size >= 1, "model.intermediate_size", ">= 1")?;
        need(self.warmup.batch_size >= 1, "warmup.batch_size", ">= 1")?;
        need(
            self.warmup.learning_rate > 0.0 && self.warmup.learning_rate.is_finite(),
            "warmup.learning_rate",
            "a finite number > 0",
        )?;
        let o = &self.opsd;
        need(o.steps >= 1, "opsd.steps", ">= 1")?;
        need(o.batch_size >= 1, "opsd.batch_size", ">= 1")?;
        need(o.grad_accumulation >= 1, "opsd.grad_accumulation", ">= 1")?;
        need(o.samples_per_prompt >= 1, "opsd.samples_per_prompt", ">= 1")?;
        need(o.max_new_tokens >= 1, "opsd.max_new_tokens", ">= 1")?;
        need(
            o.temperature.is_finite() && o.temperature >= 0.0,
            "opsd.temperature",
            "a finite number >= 0",
        )?;
        need(o.top_k != Some(0), "opsd.top_k", ">= 1")?;
        need(o.top_p > 0.0 && o.top_p <= 1.0, "opsd.top_p", "in (0, 1]")?;
        need((0.0..=1.0).contains(&o.beta), "opsd.beta", "in [0, 1]")?;
        need(o.ratio_clip > 0.0, "opsd.ratio_clip", "> 0")?;
        need(o.loss_top_k != Some(0), "opsd.loss_top_k", ">= 1")?;
        need(o.loss_temperature > 0.0, "opsd.loss_temperature", "> 0")?;
        need(o.kl_clip.is_none_or(|c| c > 0.0), "opsd.kl_clip", "> 0")?;
        need(
            o.ema_rate > 0.0 && o.ema_rate <= 1.0,
            "opsd.ema_rate",
            "in (0, 1]",
        )?;
        need(
            o.learning_rate > 0.0 && o.learning_rate.is_finite(),
            "opsd.learning_rate",
            "a finite number > 0",
        )?;
        need(
            (0.0..=1.0).contains(&o.min_lr_ratio),
            "opsd.min_lr_ratio",
            "in [0, 1]",
        )?;
        need(
            o.lr_decay == DecayName::Constant || o.steps > o.lr_warmup_steps,
            "opsd.steps",
            "> opsd.lr_warmup_steps for a decaying schedule",
        )?;
        need(
            o.max_grad_norm.is_none_or(|c| c > 0.0),
            "opsd.max_grad_norm",
            "> 0",
        )?;
        need(
            (0.0..1.0).contains(&o.adam_beta1) && (0.0..1.0).contains(&o.adam_beta2),
            "opsd.adam_beta1/adam_beta2",
            "in [0, 1)",
        )?;
        need(o.adam_epsilon > 0.0, "opsd.adam_epsilon", "> 0")?;
        need(o.weight_decay >= 0.0, "opsd.weight_decay", ">= 0")?;
        need(
            o.updates_per_rollout >= 1,
            "opsd.updates_per_rollout",
            ">= 1",
        )?;
        need(o.chunk_rows >= 1, "opsd.chunk_rows", ">= 1")?;
        need(self.eval.every >= 1, "eval.every", ">= 1")?;
        need(self.eval.max_new_tokens >= 1, "eval.max_new_tokens", ">= 1")?;
        need(
            self.checkpoint.keep_last >= 1,
            "checkpoint.keep_last",
            ">= 1",
        )?;
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
}
