//! The Qwen2.5-Omni thinker: audio and vision towers feeding the Qwen2 decoder, as
//! transformers' `Qwen2_5OmniThinkerForConditionalGeneration`.
//!
//! `embeds = E[ids]`, then placeholder rows are replaced in order by the towers' outputs
//! (audio rows for `<|AUDIO|>` tokens, including a video's interleaved track, image rows for
//! `<|IMAGE|>`, video rows for `<|VIDEO|>`), and the decoder runs on those embeddings with the
//! TMRoPE ids of [`rope_index`]. Decoded tokens continue at id `index + delta`.
//!
//! A prompt is encoded once into a backend-independent [`TokenPrompt`] (expanded ids, TMRoPE
//! rows, the towers' output rows): the decoder is the trained part, and the autodiff student
//! and the inner-backend teacher share the prompt.

use burn::module::Module;
use burn::tensor::{backend::Backend, Int, Tensor};
use omniopsd_audio::{AudioEncoder, AudioEncoderConfig, LogMel};
use omniopsd_checkpoint::{Checkpoint, ConfigView, Weights};
use omniopsd_core::PolicyModel;
use omniopsd_decoder::{
    DecoderCache, EmbeddingInserts, PromptPositions, Qwen2Config, Qwen2Model, TokenPrompt,
};
use omniopsd_vision::{PixelPatches, VisionEncoder, VisionEncoderConfig};

use crate::{expand_prompt, rope_index, Error, Media, ThinkerConfig};

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

/// The towers' output rows for a prompt's media, in placeholder order per modality.
#[derive(Clone, Debug)]
pub struct EncodedMedia<B: Backend> {
    layout: Vec<Media>,
    audio: Vec<Tensor<B, 2>>,
    image: Vec<Tensor<B, 2>>,
    video: Vec<Tensor<B, 2>>,
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

/// The thinker's own level of a checkpoint: its tensors and its config object. A thinker
/// nests its parts as transformers' `Qwen2_5OmniThinkerForConditionalGeneration` saves them:
/// the text decoder at `model.*` + `lm_head.weight` with `text_config`, the towers at
/// `audio_tower.*` / `audio_config` and `visual.*` / `vision_config`.
fn thinker_level(ckpt: &Checkpoint) -> Result<(Weights<'_>, ConfigView<'_>), Error> {
    if !ckpt.layout().is_multimodal() {
        return Err(Error::Config {
            field: "text_config",
            reason: "missing (not a Qwen2.5-Omni thinker config)".into(),
        });
    }
    Ok((ckpt.model_weights(), ckpt.model_config()))
}

/// The thinker's prompt-layout config at its level: type errors first, named with their full
/// key path in the file (`thinker_config.audio_token_index`), then the derived checks.
fn read_thinker_config(config: &ConfigView) -> Result<ThinkerConfig, ModelError> {
    let thinker: ThinkerConfig = config.deserialize()?;
    Ok(thinker.complete(config.json())?)
}

/// The thinker's text decoder from its level: `text_config` for the shapes, the thinker's
/// own `tie_word_embeddings` for the head.
fn load_text_decoder<B: Backend>(
    weights: &Weights,
    config: &ConfigView,
    thinker: &ThinkerConfig,
    device: &B::Device,
) -> Result<Qwen2Model<B>, ModelError> {
    let mut text = Qwen2Config::from_config(&config.get("text_config")?)?;
    text.tie_word_embeddings = thinker.tie_word_embeddings;
    Ok(Qwen2Model::load(weights, &text, device)?)
}

/// The text decoder of any checkpoint the project reads: a `Qwen2ForCausalLM`, or the
/// thinker's decoder of a Qwen2.5-Omni checkpoint (towers not loaded).
pub fn load_decoder<B: Backend>(
    ckpt: &Checkpoint,
    device: &B::Device,
) -> Result<Qwen2Model<B>, ModelError> {
    if !ckpt.layout().is_multimodal() {
        return Ok(Qwen2Model::from_checkpoint(ckpt, device)?);
    }
    let (weights, config) = thinker_level(ckpt)?;
    let thinker = read_thinker_config(&config)?;
    load_text_decoder(&weights, &config, &thinker, device)
}

/// The config of the text decoder [`load_decoder`] would load, read without any weight (for
/// memory plans): a `Qwen2ForCausalLM`'s root config, or the thinker's `text_config` with the
/// thinker's own `tie_word_embeddings`.
pub fn decoder_config(ckpt: &Checkpoint) -> Result<Qwen2Config, ModelError> {
    if !ckpt.layout().is_multimodal() {
        return Ok(Qwen2Config::from_config(&ckpt.model_config())?);
    }
    let (_, config) = thinker_level(ckpt)?;
    let thinker = read_thinker_config(&config)?;
    let mut text = Qwen2Config::from_config(&config.get("text_config")?)?;
    text.tie_word_embeddings = thinker.tie_word_embeddings;
    Ok(text)
}

impl<B: Backend> Thinker<B> {
    /// Loads a Qwen2.5-Omni checkpoint, full-model layout (`thinker.*`, talker and token2wav
    /// ignored) or a bare thinker.
    pub fn from_checkpoint(ckpt: &Checkpoint, device: &B::Device) -> Result<Self, ModelError> {
        let (weights, config) = thinker_level(ckpt)?;
        let thinker = read_thinker_config(&config)?;
        let decoder = load_text_decoder(&weights, &config, &thinker, device)?;
        let audio_config = AudioEncoderConfig::from_config(&config.get("audio_config")?)?;
        let vision_config = VisionEncoderConfig::from_config(&config.get("vision_config")?)?;
        Ok(Self {
            audio: AudioEncoder::load(&weights.pp("audio_tower"), &audio_config, device)?,
            visual: VisionEncoder::load(&weights.pp("visual"), &vision_config, device)?,
            vocab_size: decoder.config().vocab_size,
            decoder,
            config: thinker,
            device: device.clone(),
        })
    }

    /// Attaches a PEFT adapter made for this thinker, on the decoder's projections and the
    /// towers' linear layers alike, wherever its config places adapters (PEFT matches a
    /// listed `q_proj` in the audio tower as in the decoder); `base_prefix` is the thinker's
    /// tensor prefix in its checkpoint (`Checkpoint::model_weights().prefix()`: empty for a
    /// bare thinker, `thinker` in a full Qwen2.5-Omni checkpoint). Both namings PEFT has
    /// saved under are read: transformers 4's, the checkpoint's own (`model.layers`,
    /// `audio_tower`, `visual`), and transformers 5's (`model.language_model.layers`,
    /// `model.audio_tower`, `model.visual`), told apart by the file's tensor names; target
    /// patterns are matched against the names of the same naming. Every base weight is
    /// frozen. A tensor of the file that no adapted module reads (an adapter on a convolution,
    /// or made for another layout) is refused naming it.
    pub fn with_adapter(
        self,
        adapter: &omniopsd_decoder::PeftAdapter,
        base_prefix: &str,
    ) -> Result<Self, ModelError> {
        let root = omniopsd_decoder::peft_prefix(base_prefix);
        let v5 = [
            "model.language_model.",
            "model.audio_tower.",
            "model.visual.",
        ]
        .iter()
        .any(|part| {
            let under = format!("{root}.{part}");
            adapter
                .weights()
                .tensor_names()
                .any(|n| n.starts_with(&under))
        });
        let full = |name: String| match base_prefix {
            "" => name,
            prefix => format!("{prefix}.{name}"),
        };
        let (text, audio_at, visual_at) = match v5 {
            true => ("model.language_model.", "model.audio_tower", "model.visual"),
            false => ("model.", "audio_tower", "visual"),
        };
        let mut used = std::collections::BTreeSet::new();
        let decoder = self.decoder.attach_adapter(
            adapter,
            |name| {
                let below = name.strip_prefix("model.").unwrap_or(name);
                full(format!("{text}{below}"))
            },
            &mut used,
        )?;
        let audio = self.audio.no_grad().map_linears(|name, lin| {
            adapter.attach(&full(format!("{audio_at}.{name}")), lin, &mut used)
        })?;
        let visual = self.visual.no_grad().map_linears(|name, lin| {
            adapter.attach(&full(format!("{visual_at}.{name}")), lin, &mut used)
        })?;
        adapter.check_all_used(
            &used,
            &format!(
                "the thinker's decoder projections and tower linear layers under `{root}` \
                 (named as transformers {} names them)",
                if v5 { 5 } else { 4 }
            ),
        )?;
        Ok(Self {
            audio,
            visual,
            decoder,
            ..self
        })
    }

    /// Lays out a prompt: `ids` as the chat template tokenizes it (one placeholder token per
    /// media item), `media` in placeholder order. Encodes the media and merges the rows.
    pub fn prompt(&self, ids: &[u32], media: &[MediaInput]) -> Result<TokenPrompt, ModelError> {
        self.prompt_encoded(ids, &self.encode_media(media)?)
    }

    /// Runs the towers once over `media`; several prompts over the same media (a student's
    /// and its privileged teacher's) then share the result through [`Self::prompt_encoded`].
    pub fn encode_media(&self, media: &[MediaInput]) -> Result<EncodedMedia<B>, ModelError> {
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
        Ok(EncodedMedia {
            layout: media.iter().map(MediaInput::layout).collect(),
            audio,
            image,
            video,
        })
    }

    /// [`Self::prompt`] with media already encoded.
    pub fn prompt_encoded(
        &self,
        ids: &[u32],
        encoded: &EncodedMedia<B>,
    ) -> Result<TokenPrompt, ModelError> {
        let layout = &encoded.layout;
        let ids = expand_prompt(ids, layout, &self.config)?;
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
        let positions = rope_index(&ids, layout, &self.config)?;
        let (audio, image, video) = (&encoded.audio, &encoded.image, &encoded.video);
        let p = ids.len();
        let width = self.decoder.config().hidden_size;
        let mut slots = Vec::new();
        let mut rows = Vec::new();
        // Placeholder rows of each modality in order: audio (including videos' tracks),
        // then images, then videos, as the thinker's masked_scatter fills them.
        for (token, encoded) in [
            (self.config.audio_token_index, audio),
            (self.config.image_token_index, image),
            (self.config.video_token_index, video),
        ] {
            let n: usize = encoded.iter().map(|r| r.dims()[0]).sum();
            let at: Vec<usize> = (0..p).filter(|&i| ids[i] == token).collect();
            if at.len() != n {
                return Err(Error::Layout {
                    index: at.first().copied().unwrap_or(0),
                    reason: format!(
                        "{} placeholder tokens for token id {token} but the encoders produced {n} rows",
                        at.len()
                    ),
                }
                .into());
            }
            slots.extend(at);
            for block in encoded {
                let values = block
                    .clone()
                    .into_data()
                    .convert::<f32>()
                    .into_vec::<f32>()
                    .map_err(|e| Error::Layout {
                        index: 0,
                        reason: format!("reading encoder output: {e:?}"),
                    })?;
                rows.extend(values);
            }
        }
        let prompt = TokenPrompt {
            ids,
            positions: Some(PromptPositions {
                rows: positions.rows,
                delta: positions.delta,
            }),
            inserts: (!slots.is_empty()).then_some(EmbeddingInserts { slots, rows, width }),
        };
        self.decoder.check_prompt(&prompt)?;
        Ok(prompt)
    }

    /// Final hidden states `[1, P, H]` of a prompt, no cache (for logits parity and scoring).
    pub fn forward(&self, prompt: &TokenPrompt) -> Tensor<B, 3> {
        self.decoder.forward_prompt(prompt)
    }
}

impl<B: Backend> PolicyModel<B> for Thinker<B> {
    type Prompt = TokenPrompt;
    type Cache = DecoderCache<B>;

    fn prefill(&self, prompt: &TokenPrompt, n: usize) -> (Tensor<B, 2>, DecoderCache<B>) {
        self.decoder.prefill(prompt, n)
    }

    fn decode(&self, tokens: Tensor<B, 1, Int>, cache: &mut DecoderCache<B>) -> Tensor<B, 2> {
        self.decoder.decode(tokens, cache)
    }

    fn response_hidden(&self, prompt: &TokenPrompt, response: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.decoder.response_hidden(prompt, response)
    }

    fn lm_head(&self) -> Tensor<B, 2> {
        self.decoder.lm_head_weight()
    }

    fn lm_head_trainable(&self) -> bool {
        self.decoder.lm_head_trainable()
    }

    fn step_logits(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        self.decoder.step_logits(hidden)
    }
}
