//! The Qwen2.5-Omni thinker: audio and vision towers feeding the Qwen2 decoder, as
//! transformers' `Qwen2_5OmniThinkerForConditionalGeneration`.
//!
//! `embeds = E[ids]`, then placeholder rows are replaced in order by the towers' outputs
//! (audio rows for `<|AUDIO|>` tokens, including a video's interleaved track, image rows for
//! `<|IMAGE|>`, video rows for `<|VIDEO|>`), and the decoder runs on those embeddings with the
//! TMRoPE ids of [`rope_index`]. Decoded tokens continue at id `index + delta`.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use omniopsd_audio::{AudioEncoder, LogMel};
use omniopsd_checkpoint::Checkpoint;
use omniopsd_core::PolicyModel;
use omniopsd_decoder::{KvCache, Qwen2Config, Qwen2Model};
use omniopsd_vision::{PixelPatches, VisionEncoder};

use crate::{expand_prompt, rope_index, Error, Media, Positions, ThinkerConfig};

/// One media input of a prompt, in order of its placeholder.
#[derive(Clone, Debug)]
pub enum MediaInput {
    Audio(LogMel),
    Image(PixelPatches),
    /// A video's patches, seconds per temporal patch (`temporal_patch_size / fps`), and its
    /// audio track when interleaved with the frames.
    Video {
        patches: PixelPatches,
        second_per_grid: f64,
        audio: Option<LogMel>,
    },
}

impl MediaInput {
    fn layout(&self) -> Media {
        match self {
            MediaInput::Audio(mel) => Media::Audio {
                frames: mel.valid_frames,
            },
            MediaInput::Image(p) => Media::Image {
                grid_thw: p.grid_thw,
            },
            MediaInput::Video {
                patches,
                second_per_grid,
                audio,
            } => Media::Video {
                grid_thw: patches.grid_thw,
                second_per_grid: *second_per_grid,
                audio_frames: audio.as_ref().map(|a| a.valid_frames),
            },
        }
    }
}

/// A prompt ready for the decoder: expanded token ids, their TMRoPE ids, and the input
/// embeddings with media rows merged in (`[1, P, H]`). Built once by [`Thinker::prompt`],
/// reused for every rollout and scoring call.
#[derive(Clone, Debug)]
pub struct ThinkerPrompt<B: Backend> {
    pub ids: Vec<u32>,
    pub positions: Positions,
    pub embeds: Tensor<B, 3>,
}

/// Decoding state: the decoder's KV cache and the next sequence index.
pub struct ThinkerCache<B: Backend> {
    kv: KvCache<B>,
    next: usize,
    delta: i64,
}

/// Errors from loading or running the thinker.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Layout(#[from] Error),
    #[error(transparent)]
    Audio(#[from] omniopsd_audio::Error),
    #[error(transparent)]
    Vision(#[from] omniopsd_vision::Error),
    #[error(transparent)]
    Decoder(#[from] omniopsd_decoder::Error),
    #[error(transparent)]
    Checkpoint(#[from] omniopsd_checkpoint::Error),
    /// A token id outside the vocabulary.
    #[error("prompt token {index} is {id}, outside the vocabulary of {vocab}")]
    TokenId { index: usize, id: u32, vocab: usize },
}

/// The thinker: towers, decoder, and the prompt-layout config.
#[derive(Debug)]
pub struct Thinker<B: Backend> {
    pub audio: AudioEncoder<B>,
    pub visual: VisionEncoder<B>,
    pub decoder: Qwen2Model<B>,
    pub config: ThinkerConfig,
    vocab_size: usize,
    device: B::Device,
}

impl<B: Backend> Thinker<B> {
    /// Loads a Qwen2.5-Omni checkpoint, full-model layout (`thinker.*`, talker and token2wav
    /// ignored) or a bare thinker.
    pub fn from_checkpoint(ckpt: &Checkpoint, device: &B::Device) -> Result<Self, ModelError> {
        let root_json = ckpt.config_json();
        let config = ThinkerConfig::from_json(root_json)?;
        let thinker_json = root_json.get("thinker_config").unwrap_or(root_json);
        let text = thinker_json.get("text_config").ok_or(Error::Config {
            field: "text_config",
            reason: "missing".into(),
        })?;
        let text_cfg: Qwen2Config =
            serde_json::from_value(text.clone()).map_err(|e| Error::Config {
                field: "text_config",
                reason: e.to_string(),
            })?;
        let root = ckpt.weights();
        let weights = if root.contains("thinker.model.embed_tokens.weight") {
            root.pp("thinker")
        } else {
            root
        };
        Ok(Self {
            audio: AudioEncoder::from_checkpoint(ckpt, device)?,
            visual: VisionEncoder::from_checkpoint(ckpt, device)?,
            decoder: Qwen2Model::load(&weights, &text_cfg, device)?,
            config,
            vocab_size: text_cfg.vocab_size,
            device: device.clone(),
        })
    }

    /// Lays out a prompt: `ids` as the chat template tokenizes it (one placeholder token per
    /// media item), `media` in placeholder order. Encodes the media and merges the rows.
    pub fn prompt(
        &self,
        ids: &[u32],
        media: &[MediaInput],
    ) -> Result<ThinkerPrompt<B>, ModelError> {
        let layout: Vec<Media> = media.iter().map(MediaInput::layout).collect();
        let ids = expand_prompt(ids, &layout, &self.config)?;
        if let Some((index, &id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= self.vocab_size)
        {
            return Err(ModelError::TokenId {
                index,
                id,
                vocab: self.vocab_size,
            });
        }
        let positions = rope_index(&ids, &layout, &self.config)?;

        let (mut audio, mut image, mut video) = (Vec::new(), Vec::new(), Vec::new());
        for item in media {
            match item {
                MediaInput::Audio(mel) => audio.push(self.audio.encode(mel, &self.device)?),
                MediaInput::Image(p) => image.push(self.visual.encode(p, &self.device)?),
                MediaInput::Video {
                    patches,
                    audio: track,
                    ..
                } => {
                    video.push(self.visual.encode(patches, &self.device)?);
                    if let Some(mel) = track {
                        audio.push(self.audio.encode(mel, &self.device)?);
                    }
                }
            }
        }
        let p = ids.len();
        let text = self
            .decoder
            .embed(int_ids::<B>(&ids, &self.device).reshape([1, p]));
        let hidden = text.dims()[2];
        // One table (text rows, then audio, image and video rows) and a gather index that
        // takes each placeholder's row from its modality in order.
        let mut table = vec![text.reshape([p, hidden])];
        let mut index: Vec<i64> = (0..p as i64).collect();
        let mut offset = p;
        for (token, rows) in [
            (self.config.audio_token_index, audio),
            (self.config.image_token_index, image),
            (self.config.video_token_index, video),
        ] {
            let n: usize = rows.iter().map(|r| r.dims()[0]).sum();
            let slots: Vec<usize> = (0..p).filter(|&i| ids[i] == token).collect();
            if slots.len() != n {
                return Err(Error::Layout {
                    index: slots.first().copied().unwrap_or(0),
                    reason: format!(
                        "{} placeholder tokens for token id {token} but the encoders produced {n} rows",
                        slots.len()
                    ),
                }
                .into());
            }
            for (k, &slot) in slots.iter().enumerate() {
                index[slot] = (offset + k) as i64;
            }
            offset += n;
            table.extend(rows);
        }
        let embeds = Tensor::cat(table, 0)
            .select(
                0,
                Tensor::from_data(TensorData::new(index, [p]), &self.device),
            )
            .reshape([1, p, hidden]);
        Ok(ThinkerPrompt {
            ids,
            positions,
            embeds,
        })
    }

    /// Final hidden states `[1, P, H]` of a prompt, no cache (for logits parity and scoring).
    pub fn forward(&self, prompt: &ThinkerPrompt<B>) -> Tensor<B, 3> {
        let pos = positions_tensor::<B>(&prompt.positions.rows, 1, &self.device);
        self.decoder
            .forward_embeds(prompt.embeds.clone(), pos, None)
    }
}

fn int_ids<B: Backend>(ids: &[u32], device: &B::Device) -> Tensor<B, 1, Int> {
    let v: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(v, [ids.len()]), device)
}

/// `[3, n, T]` position ids, the same rows for each of the `n` sequences.
fn positions_tensor<B: Backend>(
    rows: &[Vec<i64>; 3],
    n: usize,
    device: &B::Device,
) -> Tensor<B, 3, Int> {
    let t = rows[0].len();
    let data: Vec<i64> = rows
        .iter()
        .flat_map(|r| std::iter::repeat_n(r.iter().copied(), n).flatten())
        .collect();
    Tensor::from_data(TensorData::new(data, [3, n, t]), device)
}

impl<B: Backend> PolicyModel<B> for Thinker<B> {
    type Prompt = ThinkerPrompt<B>;
    type Cache = ThinkerCache<B>;

    fn prefill(&self, prompt: &Self::Prompt, n: usize) -> (Tensor<B, 2>, Self::Cache) {
        let [_, p, h] = prompt.embeds.dims();
        let mut cache = ThinkerCache {
            kv: KvCache::new(),
            next: p,
            delta: prompt.positions.delta,
        };
        let pos = positions_tensor::<B>(&prompt.positions.rows, n, &self.device);
        let hidden = self.decoder.forward_embeds(
            prompt.embeds.clone().repeat_dim(0, n),
            pos,
            Some(&mut cache.kv),
        );
        (hidden.narrow(1, p - 1, 1).reshape([n, h]), cache)
    }

    fn decode(&self, tokens: Tensor<B, 1, Int>, cache: &mut Self::Cache) -> Tensor<B, 2> {
        let n = tokens.dims()[0];
        let embeds = self.decoder.embed(tokens.reshape([n, 1]));
        let id = cache.next as i64 + cache.delta;
        let pos = Tensor::from_data(TensorData::new(vec![id; 3 * n], [3, n, 1]), &self.device);
        let hidden = self
            .decoder
            .forward_embeds(embeds, pos, Some(&mut cache.kv));
        cache.next += 1;
        let h = hidden.dims()[2];
        hidden.reshape([n, h])
    }

    fn response_hidden(&self, prompt: &Self::Prompt, response: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [n, r] = response.dims();
        let [_, p, h] = prompt.embeds.dims();
        let embeds = Tensor::cat(
            vec![
                prompt.embeds.clone().repeat_dim(0, n),
                self.decoder.embed(response),
            ],
            1,
        );
        let rows: [Vec<i64>; 3] = std::array::from_fn(|k| {
            let mut row = prompt.positions.rows[k].clone();
            row.extend((0..r as i64).map(|i| p as i64 + i + prompt.positions.delta));
            row
        });
        let pos = positions_tensor::<B>(&rows, n, &self.device);
        let hidden = self.decoder.forward_embeds(embeds, pos, None);
        hidden.narrow(1, p - 1, r).reshape([n, r, h])
    }

    fn lm_head(&self) -> Tensor<B, 2> {
        self.decoder.lm_head_weight()
    }
}
