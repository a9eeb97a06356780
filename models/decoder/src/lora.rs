//! LoRA adapters on the decoder's projections, in PEFT's format.
//!
//! A PEFT adapter directory (`PeftModel.save_pretrained`) holds `adapter_config.json` (a
//! `LoraConfig`: `r`, `lora_alpha`, `lora_dropout`, `target_modules`, `use_rslora`, …) and
//! `adapter_model.safetensors`, whose tensors are the wrapped module's name under
//! `base_model.model.` with `lora_A.weight` `[r, d_in]` / `lora_B.weight` `[d_out, r]` after it:
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` for a `Qwen2ForCausalLM`,
//! and the same for a Qwen2.5-Omni thinker (its text model is also `model`), or
//! `base_model.model.thinker.model.layers…` for a full Qwen2.5-Omni model. The decoder
//! therefore names its adapters by its own tensor prefix in the base checkpoint.
//!
//! Only what this implementation computes exactly is accepted: LoRA (optionally rsLoRA) on any
//! of the seven projections of the decoder layers, placed as PEFT places it (a list of names,
//! a pattern, excluded modules, a subset of layers, per-module ranks and alphas: see
//! [`Placement`]). DoRA, trained biases, `modules_to_save`, adapters on other modules and the
//! like are refused with the key that asks for them, rather than loaded into something PEFT
//! would compute differently.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use omniopsd_checkpoint::Checkpoint;
use omniopsd_core::rng::{fnv1a64, SplitMix64};
use omniopsd_nn::{Linear, LoraAdapter};
use serde_json::{json, Map, Value};

use crate::placement::{OrderedPatterns, Placement};
use crate::{Error, Qwen2Model};

/// The projections an adapter may wrap, in the order of a decoder layer.
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The last name segments of the Qwen2.5-Omni towers' linear layers, which a PEFT adapter
/// loaded on a thinker may also wrap (`audio_tower.layers.0.fc1`, `visual.blocks.0.attn.q`,
/// `visual.merger.mlp.0`; the vision MLP's `gate_proj`/`up_proj`/`down_proj` are in
/// [`LORA_TARGETS`]). Adapters made here stay on the decoder.
pub const TOWER_LINEARS: [&str; 9] = ["out_proj", "fc1", "fc2", "proj", "q", "k", "v", "0", "2"];

/// File names of a PEFT adapter directory.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The adapter's weights, as PEFT writes them with `safe_serialization` (its default).
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The LoRA settings, named as PEFT's `LoraConfig` names them (and as `adapter_config.json`
/// stores them).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` of `A` `[r, d_in]` and `B` `[d_out, r]`.
    pub r: usize,
    /// `α`: the scaling is `α / r`, or `α / √r` with rsLoRA.
    pub lora_alpha: f64,
    /// Dropout probability on each adapter's input during training, in `[0, 1)`.
    pub lora_dropout: f64,
    /// Which projections get adapters (of [`LORA_TARGETS`]; read from PEFT, also dotted
    /// suffixes such as `mlp.down_proj`); empty when `placement` has a target pattern.
    pub target_modules: Vec<String>,
    /// Rank-stabilised scaling `α / √r` (Kalajdzievski 2023) instead of `α / r`.
    pub use_rslora: bool,
    /// PEFT's finer placement (patterns, excluded modules, layers, per-module ranks and
    /// alphas), as read from `adapter_config.json`; empty for adapters made here.
    pub placement: Placement,
}

impl LoraConfig {
    /// `α / r`, or `α / √r` with rsLoRA (PEFT's `LoraLayer.update_layer`).
    pub fn scaling(&self) -> f64 {
        self.scaling_of(self.r, self.lora_alpha)
    }

    fn scaling_of(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// The rank and scaling of the adapter on the module named `key` (its full name in the
    /// base model, `model.layers.0.self_attn.q_proj`), or `None` when PEFT puts no adapter
    /// there. The error names the config key whose pattern does not compile.
    pub fn place(&self, key: &str) -> Result<Option<(usize, f64)>, (&'static str, String)> {
        if !self.placement.targets(&self.target_modules, key)? {
            return Ok(None);
        }
        let (r, alpha) = self.placement.rank_alpha(key, self.r, self.lora_alpha)?;
        Ok(Some((r, self.scaling_of(r, alpha))))
    }

    /// This config for adapters on a Qwen2.5-Omni thinker's decoder alone: its listed
    /// projections become one pattern that matches them in the decoder's layers only, under
    /// transformers 4's and 5's names (`model.layers…`, `model.language_model.layers…`) below
    /// `thinker_prefix` (empty for a bare thinker, `thinker` in a full Qwen2.5-Omni model).
    /// PEFT matches a listed `q_proj` in the audio tower too and would put a fresh adapter
    /// there; with the pattern it puts adapters where this model has them. A config that
    /// already has a pattern is returned as it is.
    pub fn on_thinker_decoder(&self, thinker_prefix: &str) -> Self {
        if self.placement.target_pattern.is_some() {
            return self.clone();
        }
        let targets: Vec<&str> = LORA_TARGETS
            .iter()
            .copied()
            .filter(|t| {
                self.target_modules
                    .iter()
                    .any(|m| m.rsplit('.').next() == Some(*t))
            })
            .collect();
        let prefix = match thinker_prefix {
            "" => String::new(),
            p => format!("{}\\.", p.replace('.', "\\.")),
        };
        let mut config = self.clone();
        config.placement.target_pattern = Some(format!(
            r"^{prefix}model\.(?:language_model\.)?layers\.\d+\.(?:self_attn|mlp)\.(?:{})$",
            targets.join("|")
        ));
        config.target_modules.clear();
        config
    }

    /// The targets in words, for errors.
    pub fn describe_targets(&self) -> String {
        match &self.placement.target_pattern {
            Some(p) => format!("pattern {p:?}"),
            None => self.target_modules.join(", "),
        }
    }

    /// Whether the projection `module` (`q_proj`, …) gets an adapter.
    pub fn targets(&self, module: &str) -> bool {
        self.target_modules.iter().any(|t| t == module)
    }

    /// Checks a config made here (the `[lora]` table): the settings, and targets that are
    /// projection names; the error names the key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        self.validate_settings()?;
        if self.target_modules.is_empty() {
            return Err((
                "target_modules",
                format!("names no module; choose from {}", LORA_TARGETS.join(", ")),
            ));
        }
        if let Some(unknown) = self
            .target_modules
            .iter()
            .find(|t| !LORA_TARGETS.contains(&t.as_str()))
        {
            return Err((
                "target_modules",
                format!(
                    "`{unknown}` is not a projection of the decoder; choose from {}",
                    LORA_TARGETS.join(", ")
                ),
            ));
        }
        if !self.placement.is_plain() {
            return Err((
                "target_modules",
                "patterns, excluded modules, layer subsets and per-module ranks are read from \
                 PEFT adapters, not made here"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Checks a config read from PEFT: the settings, listed targets that end in the name of a
    /// linear layer adapted here (`q_proj`, `self_attn.q_proj`, a tower's `fc1`), and the
    /// placement's patterns.
    fn validate_read(&self) -> Result<(), (&'static str, String)> {
        self.validate_settings()?;
        if self.target_modules.is_empty() && self.placement.target_pattern.is_none() {
            return Err((
                "target_modules",
                format!("names no module; choose from {}", LORA_TARGETS.join(", ")),
            ));
        }
        if let Some(unknown) = self.target_modules.iter().find(|t| {
            let last = t.rsplit('.').next().unwrap_or_default();
            !LORA_TARGETS.contains(&last) && !TOWER_LINEARS.contains(&last)
        }) {
            return Err((
                "target_modules",
                format!(
                    "`{unknown}` is not a linear layer adapted here (adapters on other modules \
                     are not supported); the decoder's projections are {}, and a thinker's \
                     towers add {}",
                    LORA_TARGETS.join(", "),
                    TOWER_LINEARS.join(", ")
                ),
            ));
        }
        self.placement.check_patterns()
    }

    /// Rank, alpha and dropout.
    fn validate_settings(&self) -> Result<(), (&'static str, String)> {
        if self.r == 0 {
            return Err(("r", "the rank must be at least 1".into()));
        }
        if !(self.lora_alpha > 0.0 && self.lora_alpha.is_finite()) {
            return Err((
                "lora_alpha",
                format!("must be a positive number, found {}", self.lora_alpha),
            ));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err((
                "lora_dropout",
                format!("must be in [0, 1), found {}", self.lora_dropout),
            ));
        }
        Ok(())
    }

    /// Reads `adapter_config.json` as PEFT writes it; `file` names it in errors. Settings that
    /// would make PEFT compute something this implementation does not are refused naming
    /// their key. `rank_pattern` and `alpha_pattern` are taken in the (sorted) order of the
    /// parsed object; [`Self::from_peft_text`] keeps the file's order, which PEFT follows.
    pub fn from_peft_json(file: &Path, json: &Value) -> Result<Self, Error> {
        Self::read_peft(file, json, None)
    }

    /// [`Self::from_peft_json`] of the file's text, with the patterns in the file's order.
    pub fn from_peft_text(file: &Path, text: &str) -> Result<Self, Error> {
        let invalid = |e: serde_json::Error| {
            Error::Checkpoint(omniopsd_checkpoint::Error::InvalidJson {
                file: file.to_path_buf(),
                reason: e.to_string(),
            })
        };
        let json: Value = serde_json::from_str(text).map_err(invalid)?;
        // Only an object has patterns to order; anything else is refused by `read_peft`.
        let ordered =
            match json.is_object() {
                true => Some(serde_json::from_str::<OrderedPatterns>(text).map_err(|e| {
                    Error::Config {
                        file: file.to_path_buf(),
                        key: "rank_pattern".into(),
                        reason: format!("expected objects of pattern: value ({e})"),
                    }
                })?),
                false => None,
            };
        Self::read_peft(file, &json, ordered)
    }

    fn read_peft(
        file: &Path,
        json: &Value,
        ordered: Option<OrderedPatterns>,
    ) -> Result<Self, Error> {
        let err = |key: &str, reason: String| Error::Config {
            file: file.to_path_buf(),
            key: key.into(),
            reason,
        };
        let obj = json
            .as_object()
            .ok_or_else(|| err("", "expected a JSON object".into()))?;
        match obj.get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            other => {
                return Err(err(
                    "peft_type",
                    format!("expected \"LORA\", found {}", show(other.map(|s| json!(s)))),
                ))
            }
        }
        refuse_unsupported(obj).map_err(|(key, reason)| err(key, reason))?;
        let r = obj.get("r").and_then(Value::as_u64).ok_or_else(|| {
            err(
                "r",
                format!(
                    "expected a whole number, found {}",
                    show(obj.get("r").cloned())
                ),
            )
        })?;
        let lora_alpha = obj
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| {
                err(
                    "lora_alpha",
                    format!(
                        "expected a number, found {}",
                        show(obj.get("lora_alpha").cloned())
                    ),
                )
            })?;
        let lora_dropout = match obj.get("lora_dropout") {
            None | Some(Value::Null) => 0.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| err("lora_dropout", format!("expected a number, found {v}")))?,
        };
        let use_rslora = match obj.get("use_rslora") {
            None | Some(Value::Null) => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| err("use_rslora", format!("expected true or false, found {v}")))?,
        };
        let mut placement =
            Placement::from_json(obj, ordered).map_err(|(key, reason)| err(key, reason))?;
        let target_modules = match obj.get("target_modules") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        err(
                            "target_modules",
                            format!("expected module names, found {v}"),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
            // PEFT's shorthand for every linear layer but the output head, which it turns
            // into their last name segments: the decoder's seven projections, and on a
            // thinker its towers' linear layers too.
            Some(Value::String(s)) if s.eq_ignore_ascii_case("all-linear") => LORA_TARGETS
                .iter()
                .chain(&TOWER_LINEARS)
                .map(|t| t.to_string())
                .collect(),
            Some(Value::String(s)) => {
                placement.target_pattern = Some(s.clone());
                vec![]
            }
            other => {
                return Err(err(
                    "target_modules",
                    format!(
                        "expected a list of module names, found {}",
                        show(other.cloned())
                    ),
                ))
            }
        };
        let config = Self {
            r: usize::try_from(r).unwrap_or(usize::MAX),
            lora_alpha,
            lora_dropout,
            target_modules,
            use_rslora,
            placement,
        };
        config
            .validate_read()
            .map_err(|(key, reason)| err(key, reason))?;
        Ok(config)
    }

    /// `adapter_config.json` for this config, with PEFT's keys and the defaults PEFT writes
    /// for everything this implementation does not use, so `PeftModel.from_pretrained` (and
    /// `LoraConfig.from_pretrained`) read it as the same adapter.
    pub fn to_peft_json(&self, base_model_name_or_path: Option<&str>) -> Value {
        // Projections in layer order, then any dotted suffixes read from PEFT.
        let mut targets: Vec<&str> = LORA_TARGETS
            .iter()
            .copied()
            .filter(|t| self.targets(t))
            .collect();
        targets.extend(
            self.target_modules
                .iter()
                .map(String::as_str)
                .filter(|t| !LORA_TARGETS.contains(t)),
        );
        targets.dedup();
        let targets = match &self.placement.target_pattern {
            Some(p) => json!(p),
            None => json!(targets),
        };
        let mut value = json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": base_model_name_or_path,
            "bias": "none",
            "exclude_modules": null,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": self.lora_alpha,
            "lora_bias": false,
            "lora_dropout": self.lora_dropout,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": self.use_rslora,
        });
        if let Value::Object(obj) = &mut value {
            self.placement.write_json(obj);
        }
        value
    }
}

/// `null` for an absent key, the JSON text otherwise.
fn show(v: Option<Value>) -> String {
    v.map_or_else(|| "nothing".into(), |v| v.to_string())
}

/// PEFT settings that change what is computed or which tensors exist, and the value each
/// must have here.
fn refuse_unsupported(obj: &Map<String, Value>) -> Result<(), (&'static str, String)> {
    let off = |v: &Value| match v {
        Value::Null | Value::Bool(false) => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    };
    const MUST_BE_OFF: [(&str, &str); 9] = [
        ("use_dora", "DoRA adapters"),
        ("use_qalora", "QA-LoRA adapters"),
        ("lora_bias", "trained LoRA biases"),
        ("fan_in_fan_out", "Conv1D-layout (fan_in_fan_out) weights"),
        ("layer_replication", "layer replication"),
        (
            "modules_to_save",
            "fully trained extra modules (modules_to_save)",
        ),
        (
            "target_parameters",
            "adapters on parameters (target_parameters)",
        ),
        ("trainable_token_indices", "trainable token embeddings"),
        ("alora_invocation_tokens", "activated LoRA (aLoRA)"),
    ];
    for (key, what) in MUST_BE_OFF {
        if let Some(v) = obj.get(key).filter(|v| !off(v)) {
            return Err((key, format!("{v}: {what} are not supported")));
        }
    }
    match obj.get("bias") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "none" => {}
        Some(v) => {
            return Err((
                "bias",
                format!("{v}: trained biases are not supported (only \"none\")"),
            ))
        }
    }
    Ok(())
}

/// An opened PEFT adapter directory: its config and its validated safetensors file.
pub struct PeftAdapter {
    dir: PathBuf,
    config: LoraConfig,
    weights: Checkpoint,
}

impl PeftAdapter {
    /// Opens `dir`: reads and checks `adapter_config.json`, and validates the header of
    /// `adapter_model.safetensors` (values are read when attached).
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let io = |file: PathBuf, source: std::io::Error| {
            Error::Checkpoint(omniopsd_checkpoint::Error::Io { file, source })
        };
        if !dir.is_dir() {
            return Err(io(
                dir.to_path_buf(),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "adapter directory does not exist or is not a directory",
                ),
            ));
        }
        let config_path = dir.join(ADAPTER_CONFIG);
        let bytes = std::fs::read(&config_path).map_err(|e| io(config_path.clone(), e))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            Error::Checkpoint(omniopsd_checkpoint::Error::InvalidJson {
                file: config_path.clone(),
                reason: e.to_string(),
            })
        })?;
        let config = LoraConfig::from_peft_text(&config_path, &text)?;
        let weights_path = dir.join(ADAPTER_WEIGHTS);
        if !weights_path.is_file() && dir.join("adapter_model.bin").is_file() {
            return Err(Error::Adapter {
                file: dir.join("adapter_model.bin"),
                reason: "pickled adapters are not read; save it with \
                         `save_pretrained(..., safe_serialization=True)` (PEFT's default)"
                    .into(),
            });
        }
        let weights = Checkpoint::open_file(&weights_path)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weights,
        })
    }

    /// The adapter's settings.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The adapter directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The validated tensors of `adapter_model.safetensors`.
    pub fn weights(&self) -> &Checkpoint {
        &self.weights
    }

    /// `lin`, the module named `key` in the base model (`model.layers.0.self_attn.q_proj`,
    /// `audio_tower.layers.0.fc1`), with the adapter PEFT put there, or unchanged where PEFT
    /// put none; the names of the tensors read go into `used`. A missing tensor, or one of
    /// another shape, is refused naming it.
    pub fn attach<B: Backend>(
        &self,
        key: &str,
        lin: Linear<B>,
        used: &mut BTreeSet<String>,
    ) -> Result<Linear<B>, Error> {
        let placed = self
            .config
            .place(key)
            .map_err(|(k, reason)| Error::Config {
                file: self.dir.join(ADAPTER_CONFIG),
                key: k.into(),
                reason,
            })?;
        let Some((r, scaling)) = placed else {
            return Ok(lin);
        };
        let view = self.weights.weights().pp(format!("base_model.model.{key}"));
        used.insert(format!("{}.lora_A.weight", view.prefix()));
        used.insert(format!("{}.lora_B.weight", view.prefix()));
        let device = lin.weight().device();
        let a = LoraAdapter::load(
            &view,
            lin.d_in(),
            lin.d_out(),
            r,
            scaling,
            self.config.lora_dropout,
            &device,
        )?;
        lin.with_adapter(a).map_err(Error::from)
    }

    /// Refuses a file with tensors outside `used` (adapters on modules this model does not
    /// adapt), naming the first; `modules` says which modules were tried.
    pub fn check_all_used(&self, used: &BTreeSet<String>, modules: &str) -> Result<(), Error> {
        let unused = unused_tensors(self, used);
        let Some(first) = unused.first() else {
            return Ok(());
        };
        Err(Error::Adapter {
            file: self.dir.join(ADAPTER_WEIGHTS),
            reason: format!(
                "tensor `{first}`{} is not a `lora_A` / `lora_B` of {modules} that the \
                 adapter's targets ({}) select (adapters on other modules, or made for a base \
                 with another layout, are not supported)",
                if unused.len() > 1 {
                    format!(" (and {} more)", unused.len() - 1)
                } else {
                    String::new()
                },
                self.config.describe_targets(),
            ),
        })
    }
}

/// PEFT's name prefix for the module at `base_prefix` (the decoder's tensor prefix in its base
/// checkpoint: empty for a `Qwen2ForCausalLM` or a bare thinker, `thinker` in a full
/// Qwen2.5-Omni checkpoint).
pub fn peft_prefix(base_prefix: &str) -> String {
    if base_prefix.is_empty() {
        "base_model.model".into()
    } else {
        format!("base_model.model.{base_prefix}")
    }
}

/// PEFT's default initialisation of a new adapter, from a seeded stream per tensor name:
/// `A` from `kaiming_uniform_(a=√5)`, i.e. `U(−1/√d_in, 1/√d_in)`, and `B = 0`, so a new
/// adapter leaves the model's outputs unchanged.
pub(crate) fn init_adapter<B: Backend>(
    name: &str,
    d_in: usize,
    d_out: usize,
    config: &LoraConfig,
    seed: u64,
    device: &B::Device,
) -> LoraAdapter<B> {
    let mut rng = SplitMix64::new(seed, fnv1a64(format!("{name}.lora_A.weight").as_bytes()));
    let bound = 1.0 / (d_in as f64).sqrt();
    let a: Vec<f32> = (0..config.r * d_in)
        .map(|_| rng.range(-bound, bound) as f32)
        .collect();
    let a = Tensor::from_data(TensorData::new(a, [config.r, d_in]), device);
    let b = Tensor::zeros([d_out, config.r], device);
    LoraAdapter::new(a, b, config.scaling(), config.lora_dropout)
}

/// Tensor names of `adapter` not in `used`, sorted.
pub(crate) fn unused_tensors(adapter: &PeftAdapter, used: &BTreeSet<String>) -> Vec<String> {
    adapter
        .weights
        .tensor_names()
        .filter(|n| !used.contains(*n))
        .map(str::to_string)
        .collect()
}

impl<B: Backend> Qwen2Model<B> {
    /// The settings of the attached adapters, `None` without adapters.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// Every attached adapter with the name of the projection it wraps, below the decoder's
    /// prefix (`model.layers.0.self_attn.q_proj`), in layer order.
    pub fn adapters(&self) -> Vec<(String, &LoraAdapter<B>)> {
        self.projections()
            .into_iter()
            .filter_map(|(name, _, lin)| lin.adapter().map(|a| (name, a)))
            .collect()
    }

    /// New adapters on the projections `config` targets, initialised as PEFT does (`A`
    /// uniform, `B = 0`, from a stream per tensor name keyed by `seed`), so the model computes
    /// what it did before. Every other weight is frozen (no gradient, so no optimizer state):
    /// the adapters are the only trainable parameters.
    pub fn with_new_adapters(self, config: &LoraConfig, seed: u64) -> Result<Self, Error> {
        config.validate().map_err(|(key, reason)| Error::Config {
            file: PathBuf::from("LoRA settings"),
            key: key.into(),
            reason,
        })?;
        let device = self.lm_head_weight().device();
        let mut model = self.no_grad().map_projections(|name, short, lin| {
            if !config.targets(short) {
                return Ok(lin);
            }
            let width = lin.d_in().min(lin.d_out());
            if config.r > width {
                // `B·A` has rank at most min(d_in, d_out): a larger r only adds parameters.
                return Err(Error::Config {
                    file: PathBuf::from("LoRA settings"),
                    key: "r".into(),
                    reason: format!(
                        "{} exceeds min(d_in, d_out) = {width} of `{name}`",
                        config.r
                    ),
                });
            }
            let adapter = init_adapter(name, lin.d_in(), lin.d_out(), config, seed, &device);
            lin.with_adapter(adapter).map_err(Error::from)
        })?;
        model.lora = Some(config.clone());
        Ok(model)
    }

    /// Attaches a PEFT adapter made for this decoder; `base_prefix` is the decoder's tensor
    /// prefix in its base checkpoint (`Checkpoint::model_weights().prefix()`), which PEFT's
    /// names carry. Every other weight is frozen. A tensor of another shape (an adapter made
    /// for another base) is refused naming it and both shapes; a missing one naming it; a
    /// tensor the decoder has no place for (an adapter on another module) naming it.
    pub fn with_adapter(self, adapter: &PeftAdapter, base_prefix: &str) -> Result<Self, Error> {
        let mut used = BTreeSet::new();
        let model = self.attach_adapter(
            adapter,
            |name| match base_prefix {
                "" => name.to_string(),
                prefix => format!("{prefix}.{name}"),
            },
            &mut used,
        )?;
        adapter.check_all_used(
            &used,
            &format!(
                "the decoder's projections under `{}`",
                peft_prefix(base_prefix)
            ),
        )?;
        Ok(model)
    }

    /// [`Self::with_adapter`] with the full name PEFT knows each projection by given by `key`
    /// (from the decoder's own `model.layers.0.self_attn.q_proj`; a Qwen2.5-Omni thinker in
    /// transformers 5 calls it `model.language_model.layers.0…`), and without the check that
    /// every tensor of the file was used (a model with more adapted parts, the thinker's
    /// towers, makes it once for all); the tensors read go into `used`.
    pub fn attach_adapter(
        self,
        adapter: &PeftAdapter,
        key: impl Fn(&str) -> String,
        used: &mut BTreeSet<String>,
    ) -> Result<Self, Error> {
        let mut model = self
            .no_grad()
            .map_projections(|name, _, lin| adapter.attach(&key(name), lin, used))?;
        model.lora = Some(adapter.config().clone());
        Ok(model)
    }

    /// The base model: the same decoder with no adapters, sharing every base weight with
    /// `self` (Burn tensors are reference-counted; nothing is copied). This is the `frozen`
    /// teacher of LoRA training.
    pub fn without_adapters(&self) -> Self {
        let mut model = self
            .clone()
            .map_projections(|_, _, lin| Ok::<_, std::convert::Infallible>(lin.without_adapter()))
            .unwrap_or_else(|never| match never {});
        model.lora = None;
        model
    }

    /// This model's base weights with `other`'s adapters (and settings): how a LoRA EMA
    /// teacher loaded from a checkpoint is put back on the student's base, so the base is held
    /// once. `other` must be a decoder of the same shape (layers and widths); the error names
    /// what differs.
    pub fn with_adapters_of(&self, other: &Self) -> Result<Self, Error> {
        let theirs = other.projections();
        let ours = self.config().num_hidden_layers;
        if theirs.len() != 7 * ours {
            return Err(Error::Adapter {
                file: PathBuf::from("model.layers"),
                reason: format!(
                    "{} layers here, {} in the model the adapters come from",
                    ours,
                    other.config().num_hidden_layers
                ),
            });
        }
        let mut index = 0;
        let mut model = self.clone().map_projections(|name, _, lin| {
            let Some((their_name, _, their_lin)) = theirs.get(index) else {
                return Err(Error::Adapter {
                    file: PathBuf::from(name),
                    reason: "the model the adapters come from has fewer layers".into(),
                });
            };
            index += 1;
            let base = lin.without_adapter();
            match their_lin.adapter() {
                None if name == their_name => Ok(base),
                Some(a) if name == their_name => base.with_adapter(a.clone()).map_err(Error::from),
                _ => Err(Error::Adapter {
                    file: PathBuf::from(name),
                    reason: format!("the other model has `{their_name}` here"),
                }),
            }
        })?;
        model.lora = other.lora.clone();
        Ok(model)
    }

    /// The adapters merged into the weights (`W + s·B·A`, PEFT's `merge_and_unload`): a plain
    /// decoder that computes what the adapted one does.
    pub fn merge_adapters(self) -> Self {
        let mut model = self
            .map_projections(|_, _, lin| Ok::<_, std::convert::Infallible>(lin.merged()))
            .unwrap_or_else(|never| match never {});
        model.lora = None;
        model
    }

    /// The adapters' tensors under PEFT's names (`base_model.model.<base_prefix>.model.layers.0
    /// .self_attn.q_proj.lora_A.weight`), `A` `[r, d_in]` and `B` `[d_out, r]`.
    pub fn adapter_tensors(&self, base_prefix: &str) -> Vec<(String, TensorData)> {
        let root = peft_prefix(base_prefix);
        self.adapters()
            .into_iter()
            .flat_map(|(name, a)| {
                [
                    (
                        format!("{root}.{name}.lora_A.weight"),
                        a.lora_a().into_data(),
                    ),
                    (
                        format!("{root}.{name}.lora_B.weight"),
                        a.lora_b().into_data(),
                    ),
                ]
            })
            .collect()
    }

    /// Writes the adapters as PEFT does (`adapter_config.json`, `adapter_model.safetensors`
    /// in f32), so `PeftModel.from_pretrained(base, dir)` loads them; `base_prefix` as in
    /// [`Self::with_adapter`], `base_model_name_or_path` recorded in the config. Each file is
    /// replaced atomically. A model without adapters is refused.
    pub fn save_adapter(
        &self,
        dir: &Path,
        base_prefix: &str,
        base_model_name_or_path: Option<&str>,
    ) -> Result<(), Error> {
        let config = self.lora.as_ref().ok_or_else(|| Error::Adapter {
            file: dir.to_path_buf(),
            reason: "the model has no LoRA adapters to save".into(),
        })?;
        self.save_adapter_as(dir, base_prefix, base_model_name_or_path, config)
    }

    /// [`Self::save_adapter`] with `config` written as the adapter's config (the same
    /// adapters placed differently for PEFT: [`LoraConfig::on_thinker_decoder`]).
    pub fn save_adapter_as(
        &self,
        dir: &Path,
        base_prefix: &str,
        base_model_name_or_path: Option<&str>,
        config: &LoraConfig,
    ) -> Result<(), Error> {
        if self.lora.is_none() {
            return Err(Error::Adapter {
                file: dir.to_path_buf(),
                reason: "the model has no LoRA adapters to save".into(),
            });
        }
        let io = |file: &Path, source: std::io::Error| {
            Error::Checkpoint(omniopsd_checkpoint::Error::Io {
                file: file.to_path_buf(),
                source,
            })
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        omniopsd_checkpoint::save_safetensors::<B>(
            &dir.join(ADAPTER_WEIGHTS),
            &self.adapter_tensors(base_prefix),
            omniopsd_checkpoint::Dtype::F32,
        )?;
        let path = dir.join(ADAPTER_CONFIG);
        let mut text = serde_json::to_string_pretty(&config.to_peft_json(base_model_name_or_path))
            .map_err(|e| Error::Adapter {
                file: path.clone(),
                reason: e.to_string(),
            })?;
        text.push('\n');
        omniopsd_checkpoint::atomic::write_atomic(&path, text.as_bytes())
            .map_err(|e| io(&e.path, e.source))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peft_json(edit: impl FnOnce(&mut Value)) -> Value {
        let mut v = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.05,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            use_rslora: false,
            placement: Placement::default(),
        }
        .to_peft_json(None);
        edit(&mut v);
        v
    }

    fn parse_err(edit: impl FnOnce(&mut Value)) -> String {
        LoraConfig::from_peft_json(Path::new("adapter_config.json"), &peft_json(edit))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn own_json_reads_back_to_the_same_config() {
        let c = LoraConfig::from_peft_json(Path::new("a.json"), &peft_json(|_| {})).unwrap();
        assert_eq!(c.r, 4);
        assert_eq!(c.scaling(), 2.0);
        assert!(c.targets("q_proj") && c.targets("v_proj") && !c.targets("k_proj"));
    }

    #[test]
    fn a_thinker_decoder_config_matches_its_projections_only_under_both_namings() {
        let c = LoraConfig::from_peft_json(Path::new("a.json"), &peft_json(|_| {})).unwrap();
        for (prefix, at) in [("", ""), ("thinker", "thinker.")] {
            let d = c.on_thinker_decoder(prefix);
            for key in [
                format!("{at}model.layers.3.self_attn.q_proj"),
                format!("{at}model.language_model.layers.3.self_attn.v_proj"),
            ] {
                assert_eq!(d.place(&key).unwrap(), Some((4, 2.0)), "{key}");
            }
            for key in [
                format!("{at}model.layers.3.self_attn.k_proj"),
                format!("{at}audio_tower.layers.0.self_attn.q_proj"),
                format!("{at}model.audio_tower.layers.0.self_attn.v_proj"),
                "other.model.layers.0.self_attn.q_proj".to_string(),
            ] {
                assert_eq!(d.place(&key).unwrap(), None, "{key}");
            }
            // It reads back from its own JSON as the same config.
            let back = LoraConfig::from_peft_json(Path::new("b.json"), &d.to_peft_json(None));
            assert_eq!(back.unwrap(), d);
        }
    }

    #[test]
    fn all_linear_is_every_projection_and_a_string_otherwise_a_pattern() {
        let path = Path::new("a.json");
        let all = peft_json(|v| v["target_modules"] = json!("all-linear"));
        let c = LoraConfig::from_peft_json(path, &all).unwrap();
        assert_eq!(
            c.target_modules.len(),
            LORA_TARGETS.len() + TOWER_LINEARS.len()
        );
        assert!(c.place("model.layers.1.mlp.up_proj").unwrap().is_some());
        assert!(c.place("audio_tower.layers.0.fc2").unwrap().is_some());
        assert!(c.place("lm_head").unwrap().is_none());
        let pattern = peft_json(|v| v["target_modules"] = json!(r".*\.q_proj"));
        let c = LoraConfig::from_peft_json(path, &pattern).unwrap();
        assert!(c.target_modules.is_empty());
        assert_eq!(
            c.place("model.layers.0.self_attn.q_proj").unwrap(),
            Some((4, 2.0))
        );
        assert_eq!(c.place("model.layers.0.self_attn.k_proj").unwrap(), None);
        assert_eq!(c.to_peft_json(None)["target_modules"], json!(r".*\.q_proj"));
    }

    #[test]
    fn rslora_scales_by_the_square_root_of_the_rank() {
        let c = LoraConfig {
            r: 16,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: vec!["q_proj".into()],
            use_rslora: true,
            placement: Placement::default(),
        };
        assert_eq!(c.scaling(), 2.0);
    }

    #[test]
    fn rank_zero_alpha_not_positive_and_unknown_targets_are_refused_naming_the_key() {
        let e = parse_err(|v| v["r"] = json!(0));
        assert!(e.contains("`r`") && e.contains("at least 1"), "{e}");
        for alpha in [json!(0), json!(-2.0)] {
            let e = parse_err(|v| v["lora_alpha"] = alpha);
            assert!(e.contains("`lora_alpha`") && e.contains("positive"), "{e}");
        }
        let e = parse_err(|v| v["target_modules"] = json!(["q_proj", "lm_head"]));
        assert!(
            e.contains("`target_modules`") && e.contains("lm_head"),
            "{e}"
        );
        let e = parse_err(|v| v["target_modules"] = json!("(q_proj"));
        assert!(
            e.contains("`target_modules`") && e.contains("not a regular expression"),
            "{e}"
        );
        let e = parse_err(|v| v["rank_pattern"] = json!({"q_proj": 0}));
        assert!(e.contains("`rank_pattern`") && e.contains("q_proj"), "{e}");
        let e = parse_err(|v| v["alpha_pattern"] = json!({"q_proj": -1.0}));
        assert!(e.contains("`alpha_pattern`"), "{e}");
        let e = parse_err(|v| v["lora_dropout"] = json!(1.0));
        assert!(e.contains("`lora_dropout`"), "{e}");
    }

    #[test]
    fn peft_features_computed_differently_are_refused_naming_the_key() {
        for (key, value) in [
            ("use_dora", json!(true)),
            ("layer_replication", json!([[0, 1]])),
            ("modules_to_save", json!(["lm_head"])),
            ("bias", json!("all")),
            ("peft_type", json!("IA3")),
        ] {
            let e = parse_err(|v| v[key] = value);
            assert!(e.contains(&format!("`{key}`")), "{key}: {e}");
        }
    }
}
