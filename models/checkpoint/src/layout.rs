//! Which of the Hugging Face directory layouts a checkpoint has, decided once when it is
//! opened from `config.json`'s keys and the tensor names.

use std::collections::BTreeMap;
use std::path::Path;

use crate::Error;

/// How a checkpoint nests the model it holds. Everything that reads a checkpoint starts from
/// [`crate::Checkpoint::model_weights`] and [`crate::Checkpoint::model_config`], which point
/// at the model's own level; what lies inside (which sub-objects and tensor prefixes belong to
/// which part) is for the model crates to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Config at the root and no `text_config` in it, tensors at the root: a text-only causal
    /// LM (`Qwen2ForCausalLM`: `model.*`, `lm_head.weight`).
    CausalLm,
    /// Config at the root with the text model's under `text_config`, tensors at the root: a
    /// multimodal model saved on its own (`Qwen2_5OmniThinkerForConditionalGeneration`:
    /// `model.*`, `audio_tower.*`, `visual.*`, `lm_head.weight`).
    Thinker,
    /// The same model nested as the `thinker` part of a larger one: its config is
    /// `thinker_config`, its tensors are those under `thinker.`; the other parts
    /// (`talker.*`, `token2wav.*`) are not read (`Qwen2_5OmniForConditionalGeneration`).
    Full,
}

/// The config key and tensor prefix of the nested model in [`Layout::Full`].
pub(crate) const NESTED_CONFIG: &str = "thinker_config";
pub(crate) const NESTED_PREFIX: &str = "thinker";

impl Layout {
    /// Reads the layout off `config` (the parsed `config.json` at `file`) and the tensor names.
    pub(crate) fn detect<V>(
        file: &Path,
        config: &serde_json::Value,
        tensors: &BTreeMap<String, V>,
    ) -> Result<Self, Error> {
        if let Some(nested) = config.get(NESTED_CONFIG) {
            if !nested.is_object() {
                return Err(Error::Layout {
                    file: file.to_path_buf(),
                    reason: format!("`{NESTED_CONFIG}` is not a JSON object"),
                });
            }
            let prefix = format!("{NESTED_PREFIX}.");
            if !tensors.keys().any(|name| name.starts_with(&prefix)) {
                return Err(Error::Layout {
                    file: file.to_path_buf(),
                    reason: format!(
                        "`{NESTED_CONFIG}` describes a nested model but no tensor name starts with `{prefix}`"
                    ),
                });
            }
            Ok(Layout::Full)
        } else if config.get("text_config").is_some() {
            Ok(Layout::Thinker)
        } else {
            Ok(Layout::CausalLm)
        }
    }

    /// Whether the checkpoint holds a multimodal model (the two thinker layouts).
    pub fn is_multimodal(self) -> bool {
        !matches!(self, Layout::CausalLm)
    }
}
