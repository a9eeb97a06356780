//! The thinker's `config.json` keys that shape prompts and positions.

use serde::Deserialize;

use crate::Error;

/// Serde mirror of the Qwen2.5-Omni thinker config's prompt-layout keys (verbatim names, HF
/// defaults). Spatial merge size comes from `vision_config.spatial_merge_size`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ThinkerConfig {
    #[serde(default = "defaults::audio_token_index")]
    pub audio_token_index: u32,
    #[serde(default = "defaults::image_token_index")]
    pub image_token_index: u32,
    #[serde(default = "defaults::video_token_index")]
    pub video_token_index: u32,
    #[serde(default = "defaults::audio_start_token_id")]
    pub audio_start_token_id: u32,
    #[serde(default = "defaults::audio_end_token_id")]
    pub audio_end_token_id: u32,
    #[serde(default = "defaults::vision_start_token_id")]
    pub vision_start_token_id: u32,
    #[serde(default = "defaults::vision_end_token_id")]
    pub vision_end_token_id: u32,
    #[serde(default = "defaults::position_id_per_seconds")]
    pub position_id_per_seconds: f64,
    #[serde(default = "defaults::seconds_per_chunk")]
    pub seconds_per_chunk: f64,
    /// Whether the LM head is tied to the embeddings. The thinker's own flag governs its
    /// head, not `text_config.tie_word_embeddings` (transformers ties per model, each by its
    /// own config; Qwen2.5-Omni's text config defaults to `true`, the thinker's to `false`).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(skip)]
    pub spatial_merge_size: usize,
}

mod defaults {
    pub fn audio_token_index() -> u32 {
        151_646
    }
    pub fn image_token_index() -> u32 {
        151_655
    }
    pub fn video_token_index() -> u32 {
        151_656
    }
    pub fn audio_start_token_id() -> u32 {
        151_647
    }
    pub fn audio_end_token_id() -> u32 {
        151_648
    }
    pub fn vision_start_token_id() -> u32 {
        151_652
    }
    pub fn vision_end_token_id() -> u32 {
        151_653
    }
    pub fn position_id_per_seconds() -> f64 {
        25.0
    }
    pub fn seconds_per_chunk() -> f64 {
        2.0
    }
}

impl ThinkerConfig {
    /// Reads the thinker's config object: the root of a thinker `config.json`, or
    /// `thinker_config` of a full Qwen2.5-Omni one.
    pub fn from_json(thinker: &serde_json::Value) -> Result<Self, Error> {
        let cfg: Self = serde_json::from_value(thinker.clone()).map_err(|e| Error::Config {
            field: "thinker_config",
            reason: e.to_string(),
        })?;
        cfg.complete(thinker)
    }

    /// The checks and derived values beyond the keys' types: `spatial_merge_size` from
    /// `vision_config`, positive position rates. `thinker` is the object `self` was read from.
    pub fn complete(mut self, thinker: &serde_json::Value) -> Result<Self, Error> {
        self.spatial_merge_size = match thinker
            .get("vision_config")
            .and_then(|v| v.get("spatial_merge_size"))
        {
            None => 2,
            Some(v) => v.as_u64().filter(|&m| m > 0).ok_or_else(|| Error::Config {
                field: "vision_config.spatial_merge_size",
                reason: format!("expected a positive integer, found {v}"),
            })? as usize,
        };
        // Finite, and at least one position id per chunk: a chunk of zero ids would split
        // the interleaved video and audio at every token.
        let per_chunk = self.position_id_per_seconds * self.seconds_per_chunk;
        if !(self.position_id_per_seconds > 0.0
            && self.seconds_per_chunk > 0.0
            && per_chunk.is_finite()
            && per_chunk >= 1.0)
        {
            return Err(Error::Config {
                field: "position_id_per_seconds / seconds_per_chunk",
                reason: format!(
                    "must be positive and finite with a product of at least 1 (position ids \
                     per chunk), found {} and {}",
                    self.position_id_per_seconds, self.seconds_per_chunk
                ),
            });
        }
        Ok(self)
    }

    /// Position ids per chunk of interleaved audio and video (`25 · 2 = 50`); at least 1 once
    /// [`Self::complete`] has accepted the config.
    pub fn tokens_per_chunk(&self) -> usize {
        (self.position_id_per_seconds * self.seconds_per_chunk) as usize
    }
}
