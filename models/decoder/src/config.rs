//! `config.json` of a Qwen2 / Qwen2.5 decoder, key for key.

use serde::{Deserialize, Serialize};

/// Serde mirror of transformers' `Qwen2Config` (and of `text_config` inside a Qwen2.5-Omni
/// thinker config). Field names are the HF keys. The five shape keys are required: HF would
/// silently default them to a 7B model, which only fails later, tensor by tensor.
///
/// RoPE settings come in two spellings: transformers ≥ 5 writes `rope_parameters`
/// (`rope_type`, `rope_theta`, `mrope_section`); older checkpoints write a top-level
/// `rope_theta` and `rope_scaling` (`type` / `rope_type`, `mrope_section`). Both are read;
/// [`Qwen2Config::rope_theta`] and [`Qwen2Config::mrope_section`] resolve them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Qwen2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// GQA key/value heads; HF default: `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    #[serde(default = "defaults::rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Legacy spelling of `rope_parameters.rope_theta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// Legacy spelling of `rope_parameters`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
}

/// `rope_parameters` / `rope_scaling`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// Older spelling of `rope_type`; real configs often carry both.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// Rotary frequency pairs given to the temporal, height and width position rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mrope_section: Option<Vec<usize>>,
}

/// A token id or a list of them (`eos_token_id` is either in HF configs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

mod defaults {
    pub fn hidden_act() -> String {
        "silu".into()
    }
    pub fn rms_norm_eps() -> f64 {
        1e-6
    }
    pub fn max_position_embeddings() -> usize {
        32_768
    }
}

/// HF's default RoPE base when neither spelling gives one.
const DEFAULT_ROPE_THETA: f64 = 10_000.0;

impl Qwen2Config {
    /// Key/value heads (HF default: one per attention head).
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head size `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    fn rope(&self) -> Option<&RopeParameters> {
        self.rope_parameters.as_ref().or(self.rope_scaling.as_ref())
    }

    /// The RoPE base θ.
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .or(self.rope_scaling.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(DEFAULT_ROPE_THETA)
    }

    /// The M-RoPE split of the `head_dim / 2` frequencies over (temporal, height, width)
    /// position rows; 1-D RoPE is the split `[head_dim / 2, 0, 0]` with equal rows.
    pub fn mrope_section(&self) -> Vec<usize> {
        self.rope()
            .and_then(|r| r.mrope_section.clone())
            .unwrap_or_else(|| vec![self.head_dim() / 2, 0, 0])
    }

    /// The stop tokens named by `eos_token_id`.
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// Checks what this implementation can run; the error names the key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err((key, "must be positive".into()));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err((
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err((
                "hidden_size",
                format!("head dimension {} must be even for RoPE", self.head_dim()),
            ));
        }
        if self.num_attention_heads % self.kv_heads() != 0 {
            return Err((
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.kv_heads(),
                    self.num_attention_heads
                ),
            ));
        }
        if self.hidden_act != "silu" {
            return Err((
                "hidden_act",
                format!("`{}` is not supported (Qwen2 uses `silu`)", self.hidden_act),
            ));
        }
        if !(self.rms_norm_eps > 0.0) {
            return Err(("rms_norm_eps", "must be positive".into()));
        }
        if !(self.rope_theta() > 0.0) {
            return Err(("rope_theta", "must be positive".into()));
        }
        if let Some(kind) = self
            .rope()
            .and_then(|r| r.rope_type.as_deref().or(r.kind.as_deref()))
        {
            if !matches!(kind, "default" | "mrope") {
                return Err((
                    "rope_parameters.rope_type",
                    format!("`{kind}` is not supported (default and mrope are)"),
                ));
            }
        }
        let section = self.mrope_section();
        // Summed with overflow checked: the entries are the file's, and a wrapped sum could
        // pass the comparison.
        let sum = section
            .iter()
            .try_fold(0usize, |acc, &n| acc.checked_add(n));
        if section.len() != 3 || sum != Some(self.head_dim() / 2) {
            return Err((
                "rope_parameters.mrope_section",
                format!(
                    "{section:?} must have 3 entries summing to head_dim / 2 = {}",
                    self.head_dim() / 2
                ),
            ));
        }
        if self.use_sliding_window {
            return Err((
                "use_sliding_window",
                "sliding-window attention is not supported".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `config.json` of `Qwen/Qwen2.5-0.5B-Instruct`, as published.
    const QWEN2_5_0_5B: &str = r#"{
      "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
      "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
      "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
      "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
      "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
      "sliding_window": 32768, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
      "transformers_version": "4.43.1", "use_cache": true, "use_sliding_window": false,
      "vocab_size": 151936}"#;

    /// `thinker_config.text_config` of `Qwen/Qwen2.5-Omni-7B` (rope keys as published: both
    /// `rope_type` and `type`).
    const OMNI_TEXT: &str = r#"{
      "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
      "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
      "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
      "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": false,
      "vocab_size": 152064, "tie_word_embeddings": false, "hidden_act": "silu"}"#;

    #[test]
    fn published_qwen2_5_config_parses_with_its_rope_and_gqa() {
        let c: Qwen2Config = serde_json::from_str(QWEN2_5_0_5B).unwrap();
        c.validate().unwrap();
        assert_eq!((c.head_dim(), c.kv_heads()), (64, 2));
        assert_eq!(c.rope_theta(), 1e6);
        assert_eq!(c.mrope_section(), vec![32, 0, 0]);
        assert_eq!(c.eos_ids(), vec![151645]);
        assert!(c.tie_word_embeddings);
    }

    #[test]
    fn published_omni_text_config_parses_with_both_rope_type_spellings() {
        let c: Qwen2Config = serde_json::from_str(OMNI_TEXT).unwrap();
        c.validate().unwrap();
        assert_eq!(c.head_dim(), 128);
        assert_eq!(c.mrope_section(), vec![16, 24, 24]);
        assert_eq!(c.rope_theta(), 1e6);
    }

    #[test]
    fn mrope_section_entries_whose_sum_overflows_are_refused_naming_the_key() {
        let json = OMNI_TEXT.replace("[16, 24, 24]", "[18446744073709551615, 1, 64]");
        let c: Qwen2Config = serde_json::from_str(&json).unwrap();
        let (key, reason) = c.validate().unwrap_err();
        assert_eq!(key, "rope_parameters.mrope_section");
        assert!(reason.contains("summing to head_dim / 2 = 64"), "{reason}");
    }

    #[test]
    fn unsupported_rope_type_is_refused_naming_the_key() {
        let json = OMNI_TEXT.replace("\"rope_type\": \"default\"", "\"rope_type\": \"yarn\"");
        let c: Qwen2Config = serde_json::from_str(&json).unwrap();
        let (key, reason) = c.validate().unwrap_err();
        assert_eq!(key, "rope_parameters.rope_type");
        assert!(reason.contains("yarn"), "{reason}");
    }
}
