//! The embedded omni model and its inputs: a randomly initialised Qwen2.5-Omni thinker
//! checkpoint sized by [`ModelConfig`], a corpus record's media as thinker inputs, and prompts
//! in Qwen2.5-Omni's chat layout for the student and the privileged teacher.
//!
//! The checkpoint is the bare-thinker layout transformers writes for
//! `Qwen2_5OmniThinkerForConditionalGeneration.save_pretrained` (`model.*`, `lm_head.weight`,
//! `audio_tower.*`, `visual.*`), initialised as its `_init_weights` does: `N(0, 0.02)` for
//! linear, convolution and embedding weights, zero biases, unit norm weights. The towers are
//! tiny and fixed (audio: 2 Whisper layers of width 32; vision: 2 ViT blocks of width 32); the
//! decoder takes its sizes from the config and its vocabulary from the corpus tokenizer.
//!
//! A record's video and audio become one video-with-audio input (Qwen2.5-Omni's
//! `use_audio_in_video`): the thinker interleaves frame tokens and audio tokens in 2-second
//! chunks of TMRoPE time. Manifests carry no frame rate; the frames are taken as sampled
//! uniformly over the audio clip (the synthetic corpus draws them from the onset to the apex of
//! the utterance), so `fps = frames / audio seconds`.

use std::fs;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::{backend::Backend, TensorData};
use omniopsd_audio::{FeatureExtractor, LogMel};
use omniopsd_thinker::MediaInput;
use omniopsd_vision::{preprocess_video, PixelPatches, ProcessorConfig};
use serde_json::json;
use tokenizers::Tokenizer;

use super::config::ModelConfig;
use super::eval::{self, Privileged};
use super::tokenizer::{
    self, AUDIO, AUDIO_BOS, AUDIO_EOS, IMAGE, IM_END, SPECIALS, VIDEO, VISION_BOS, VISION_EOS,
};
use crate::data::manifest::{resolve, Limits, Record};
use crate::data::media;
use crate::data::synth::SplitMix64;

/// `initializer_range` of every sub-config: the standard deviation of the random weights.
pub const INITIALIZER_RANGE: f64 = 0.02;

/// The audio tower: Whisper-style, 128 mel bins in, `d_model` 32, 2 layers of 4 heads,
/// attention within chunks of `2 · n_window` = 16 mel frames.
const AUDIO_MEL_BINS: usize = 128;
const AUDIO_D_MODEL: usize = 32;
const AUDIO_LAYERS: usize = 2;
const AUDIO_HEADS: usize = 4;
const AUDIO_FFN: usize = 64;
const AUDIO_N_WINDOW: usize = 8;

/// The vision tower: 14-pixel patches over 2 frames, 2 blocks of width 32 with 4 heads,
/// 56-pixel attention windows except in block 1, which attends over the whole frame; 2×2 merge.
const VISION_DEPTH: usize = 2;
const VISION_HIDDEN: usize = 32;
const VISION_HEADS: usize = 4;
const VISION_INTERMEDIATE: usize = 64;
const VISION_PATCH: usize = 14;
const VISION_MERGE: usize = 2;
const VISION_TEMPORAL: usize = 2;
const VISION_WINDOW: usize = 56;
const VISION_FULL_ATTENTION: [usize; 1] = [1];

/// The system turn of every prompt.
pub const SYSTEM_PROMPT: &str =
    "You judge how a speaker feels from the voice, the face and the words.";

/// The token that ends an answer: the assistant turn's `<|im_end|>`, where rollouts stop.
pub const STOP_TOKEN: u32 = IM_END;

/// M-RoPE's split of the `head_dim / 2` rotary frequency pairs over the (time, height, width)
/// position rows, in Qwen2.5-Omni's proportions (`[16, 24, 24]` of 64 pairs): a quarter for
/// time, the rest halved between height and width (`[2, 3, 3]` for `head_dim` 16).
pub fn mrope_section(head_dim: usize) -> [usize; 3] {
    let pairs = head_dim / 2;
    let t = pairs / 4;
    let h = (pairs - t) / 2;
    [t, h, pairs - t - h]
}

/// How a tensor of the checkpoint starts (transformers `PreTrainedModel._init_weights`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Init {
    /// `N(0, initializer_range²)`: linear, convolution and embedding weights.
    Normal,
    /// Biases.
    Zeros,
    /// Norm scales.
    Ones,
}

/// The thinker's tensors, named and shaped as in a bare-thinker checkpoint.
struct Spec(Vec<(String, Vec<usize>, Init)>);

impl Spec {
    fn normal(&mut self, name: String, shape: Vec<usize>) {
        self.0.push((name, shape, Init::Normal));
    }

    fn linear(&mut self, prefix: &str, d_in: usize, d_out: usize, bias: bool) {
        self.normal(format!("{prefix}.weight"), vec![d_out, d_in]);
        if bias {
            self.0
                .push((format!("{prefix}.bias"), vec![d_out], Init::Zeros));
        }
    }

    fn rms_norm(&mut self, prefix: &str, dim: usize) {
        self.0
            .push((format!("{prefix}.weight"), vec![dim], Init::Ones));
    }

    fn layer_norm(&mut self, prefix: &str, dim: usize) {
        self.rms_norm(prefix, dim);
        self.0
            .push((format!("{prefix}.bias"), vec![dim], Init::Zeros));
    }
}

/// Every tensor `Qwen2_5OmniThinkerForConditionalGeneration` holds for these sizes.
fn thinker_spec(cfg: &ModelConfig, vocab: usize) -> Spec {
    let h = cfg.hidden_size;
    let kv = cfg.num_key_value_heads * (h / cfg.num_attention_heads);
    let mut s = Spec(Vec::new());

    s.normal("model.embed_tokens.weight".into(), vec![vocab, h]);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        s.rms_norm(&format!("{p}.input_layernorm"), h);
        s.linear(&format!("{p}.self_attn.q_proj"), h, h, true);
        s.linear(&format!("{p}.self_attn.k_proj"), h, kv, true);
        s.linear(&format!("{p}.self_attn.v_proj"), h, kv, true);
        s.linear(&format!("{p}.self_attn.o_proj"), h, h, false);
        s.rms_norm(&format!("{p}.post_attention_layernorm"), h);
        s.linear(
            &format!("{p}.mlp.gate_proj"),
            h,
            cfg.intermediate_size,
            false,
        );
        s.linear(&format!("{p}.mlp.up_proj"), h, cfg.intermediate_size, false);
        s.linear(
            &format!("{p}.mlp.down_proj"),
            cfg.intermediate_size,
            h,
            false,
        );
    }
    s.rms_norm("model.norm", h);
    s.linear("lm_head", h, vocab, false);

    let d = AUDIO_D_MODEL;
    s.normal("audio_tower.audio_bos_eos_token.weight".into(), vec![2, h]);
    s.normal(
        "audio_tower.conv1.weight".into(),
        vec![d, AUDIO_MEL_BINS, 3],
    );
    s.0.push(("audio_tower.conv1.bias".into(), vec![d], Init::Zeros));
    s.normal("audio_tower.conv2.weight".into(), vec![d, d, 3]);
    s.0.push(("audio_tower.conv2.bias".into(), vec![d], Init::Zeros));
    for i in 0..AUDIO_LAYERS {
        let p = format!("audio_tower.layers.{i}");
        s.linear(&format!("{p}.self_attn.q_proj"), d, d, true);
        s.linear(&format!("{p}.self_attn.k_proj"), d, d, false);
        s.linear(&format!("{p}.self_attn.v_proj"), d, d, true);
        s.linear(&format!("{p}.self_attn.out_proj"), d, d, true);
        s.layer_norm(&format!("{p}.self_attn_layer_norm"), d);
        s.linear(&format!("{p}.fc1"), d, AUDIO_FFN, true);
        s.linear(&format!("{p}.fc2"), AUDIO_FFN, d, true);
        s.layer_norm(&format!("{p}.final_layer_norm"), d);
    }
    s.layer_norm("audio_tower.ln_post", d);
    s.linear("audio_tower.proj", d, h, true);

    let v = VISION_HIDDEN;
    s.normal(
        "visual.patch_embed.proj.weight".into(),
        vec![v, 3, VISION_TEMPORAL, VISION_PATCH, VISION_PATCH],
    );
    for i in 0..VISION_DEPTH {
        let p = format!("visual.blocks.{i}");
        s.rms_norm(&format!("{p}.norm1"), v);
        s.rms_norm(&format!("{p}.norm2"), v);
        for name in ["q", "k", "v", "proj"] {
            s.linear(&format!("{p}.attn.{name}"), v, v, true);
        }
        s.linear(&format!("{p}.mlp.gate_proj"), v, VISION_INTERMEDIATE, true);
        s.linear(&format!("{p}.mlp.up_proj"), v, VISION_INTERMEDIATE, true);
        s.linear(&format!("{p}.mlp.down_proj"), VISION_INTERMEDIATE, v, true);
    }
    let merged = v * VISION_MERGE * VISION_MERGE;
    s.rms_norm("visual.merger.ln_q", v);
    s.linear("visual.merger.mlp.0", merged, merged, true);
    s.linear("visual.merger.mlp.2", merged, h, true);
    s
}

/// The thinker `config.json`, key for key as transformers 5.24 saves it.
fn thinker_config(cfg: &ModelConfig, vocab: usize, user_token: u32) -> serde_json::Value {
    let head_dim = cfg.hidden_size / cfg.num_attention_heads;
    json!({
        "architectures": ["Qwen2_5OmniThinkerForConditionalGeneration"],
        "audio_config": {
            "activation_dropout": 0.0,
            "activation_function": "gelu",
            "attention_dropout": 0.0,
            "d_model": AUDIO_D_MODEL,
            "dropout": 0.0,
            "encoder_attention_heads": AUDIO_HEADS,
            "encoder_ffn_dim": AUDIO_FFN,
            "encoder_layers": AUDIO_LAYERS,
            "initializer_range": INITIALIZER_RANGE,
            "max_source_positions": 1500,
            "model_type": "qwen2_5_omni_audio_encoder",
            "n_window": AUDIO_N_WINDOW,
            "num_mel_bins": AUDIO_MEL_BINS,
            "output_dim": cfg.hidden_size,
            "scale_embedding": false
        },
        "audio_end_token_id": AUDIO_EOS,
        "audio_start_token_id": AUDIO_BOS,
        "audio_token_index": AUDIO,
        "dtype": "float32",
        "image_token_index": IMAGE,
        "initializer_range": INITIALIZER_RANGE,
        "model_type": "qwen2_5_omni_thinker",
        "position_id_per_seconds": 25,
        "seconds_per_chunk": 2,
        "text_config": {
            "attention_dropout": 0.0,
            "bos_token_id": null,
            "eos_token_id": STOP_TOKEN,
            "hidden_act": "silu",
            "hidden_size": cfg.hidden_size,
            "initializer_range": INITIALIZER_RANGE,
            "intermediate_size": cfg.intermediate_size,
            "layer_types": vec!["full_attention"; cfg.num_hidden_layers],
            "max_position_embeddings": 32768,
            "max_window_layers": 28,
            "model_type": "qwen2_5_omni_text",
            "num_attention_heads": cfg.num_attention_heads,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_key_value_heads": cfg.num_key_value_heads,
            "pad_token_id": null,
            "rms_norm_eps": 1e-06,
            "rope_parameters": {
                "mrope_section": mrope_section(head_dim),
                "rope_theta": 1000000.0,
                "rope_type": "default"
            },
            "sliding_window": null,
            "tie_word_embeddings": false,
            "use_cache": true,
            "use_sliding_window": false,
            "vocab_size": vocab
        },
        "tie_word_embeddings": false,
        "transformers_version": "5.24.0",
        "user_token_id": user_token,
        "video_token_index": VIDEO,
        "vision_config": {
            "depth": VISION_DEPTH,
            "fullatt_block_indexes": VISION_FULL_ATTENTION,
            "hidden_act": "silu",
            "hidden_size": VISION_HIDDEN,
            "in_channels": 3,
            "initializer_range": INITIALIZER_RANGE,
            "intermediate_size": VISION_INTERMEDIATE,
            "model_type": "qwen2_5_omni_vision_encoder",
            "num_heads": VISION_HEADS,
            "out_hidden_size": cfg.hidden_size,
            "patch_size": VISION_PATCH,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"},
            "spatial_merge_size": VISION_MERGE,
            "temporal_patch_size": VISION_TEMPORAL,
            "window_size": VISION_WINDOW
        },
        "vision_end_token_id": VISION_EOS,
        "vision_start_token_id": VISION_BOS
    })
}

/// Checks the decoder sizes the embedded model is built from; errors name the config key.
fn check_model_config(cfg: &ModelConfig) -> Result<()> {
    for (key, value) in [
        ("hidden_size", cfg.hidden_size),
        ("num_hidden_layers", cfg.num_hidden_layers),
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_key_value_heads", cfg.num_key_value_heads),
        ("intermediate_size", cfg.intermediate_size),
    ] {
        if value == 0 {
            bail!("model.{key} is 0, expected a positive number");
        }
    }
    if cfg.hidden_size % cfg.num_attention_heads != 0 {
        bail!(
            "model.num_attention_heads = {} does not divide model.hidden_size = {}",
            cfg.num_attention_heads,
            cfg.hidden_size
        );
    }
    let head_dim = cfg.hidden_size / cfg.num_attention_heads;
    if head_dim % 2 != 0 || head_dim < 8 {
        bail!(
            "model.hidden_size / model.num_attention_heads = {head_dim}: rotary positions over \
             (time, height, width) need an even head size of at least 8"
        );
    }
    if cfg.num_attention_heads % cfg.num_key_value_heads != 0 {
        bail!(
            "model.num_key_value_heads = {} does not divide model.num_attention_heads = {}",
            cfg.num_key_value_heads,
            cfg.num_attention_heads
        );
    }
    Ok(())
}

/// A stream id per tensor name (FNV-1a), so a tensor's values depend only on the seed, its
/// name and its size, not on which other tensors the checkpoint holds.
fn name_stream(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes a complete Qwen2.5-Omni thinker checkpoint into `dir` (created if absent):
/// `config.json`, `model.safetensors` (f32) and `tokenizer.json`. The decoder takes its sizes
/// from `cfg` and its vocabulary from `tokenizer`, whose special tokens must hold the ids of
/// [`SPECIALS`]; weights are drawn from a SplitMix64 stream keyed by `(seed, tensor name)`
/// with Box–Muller normals. `B` only instantiates `omniopsd_checkpoint::save_safetensors`;
/// the bytes written do not depend on it.
pub fn write_tiny_omni<B: Backend>(
    dir: &Path,
    cfg: &ModelConfig,
    tokenizer: &Tokenizer,
    seed: u64,
) -> Result<()> {
    check_model_config(cfg)?;
    for (id, token) in SPECIALS.iter().enumerate() {
        if tokenizer.token_to_id(token) != Some(id as u32) {
            bail!(
                "tokenizer: special token {token} has id {:?}, expected {id}",
                tokenizer.token_to_id(token)
            );
        }
    }
    let vocab = tokenizer.get_vocab_size(true);
    // Only the talker reads `user_token_id`; this checkpoint has none, but the key keeps the
    // config in the shape transformers writes.
    let user_token = tokenizer::encode(tokenizer, "user")?
        .first()
        .copied()
        .ok_or_else(|| anyhow!("tokenizer: `user` encodes to no token"))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    let config = serde_json::to_string_pretty(&thinker_config(cfg, vocab, user_token))
        .context("serializing config.json")?;
    let config_path = dir.join("config.json");
    super::run_dir::write_file_atomic(&config_path, config.as_bytes())
        .with_context(|| format!("writing {}", config_path.display()))?;

    let std = INITIALIZER_RANGE;
    let tensors: Vec<(String, TensorData)> = thinker_spec(cfg, vocab)
        .0
        .into_iter()
        .map(|(name, shape, init)| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = match init {
                Init::Zeros => vec![0.0; n],
                Init::Ones => vec![1.0; n],
                Init::Normal => {
                    let mut rng = SplitMix64::new(seed, name_stream(&name));
                    (0..n).map(|_| (std * rng.normal()) as f32).collect()
                }
            };
            (name, TensorData::new(values, shape))
        })
        .collect();
    omniopsd_checkpoint::save_safetensors::<B>(
        &dir.join("model.safetensors"),
        &tensors,
        omniopsd_checkpoint::Dtype::F32,
    )?;
    tokenizer::save(tokenizer, &dir.join("tokenizer.json"))
}

/// A record's media prepared for the thinker: the frames' pixel patches, the audio track's
/// log-mel features, and the time base that interleaves them.
#[derive(Clone, Debug)]
pub struct RecordMedia {
    /// The video's patches (frames padded to an even count by repeating the last).
    pub patches: PixelPatches,
    /// Seconds per temporal patch: `temporal_patch_size / fps`.
    pub second_per_grid: f64,
    /// The audio track's log-mel features.
    pub mel: LogMel,
}

/// Qwen2.5-Omni's video processor settings (real checkpoints; the embedded model keeps small frames).
pub fn video_processor() -> ProcessorConfig {
    ProcessorConfig::qwen2_5_omni_video()
}

/// Reads and preprocesses a record's frames and WAV with `processor`; every error names the
/// record and the file.
pub fn record_media(
    record: &Record,
    base: &Path,
    limits: &Limits,
    processor: &ProcessorConfig,
) -> Result<RecordMedia> {
    let id = &record.id;
    let video_dir = resolve(base, &record.video);
    let frames = media::read_frames(&video_dir, limits.max_frames)
        .with_context(|| format!("sample `{id}`"))?;
    let views = media::vision_frames(&frames);
    let patches = preprocess_video(&views, processor)
        .with_context(|| format!("sample `{id}`: video {}", video_dir.display()))?;

    let wav = resolve(base, &record.audio);
    let audio = media::read_wav(&wav, media::SAMPLE_RATE, limits.max_audio_seconds)
        .with_context(|| format!("sample `{id}`"))?;
    let mel = FeatureExtractor::qwen2_5_omni()
        .extract(&audio.samples, audio.sample_rate)
        .with_context(|| format!("sample `{id}`: audio {}", wav.display()))?;
    let fps = frames.len() as f64 / audio.seconds();
    Ok(RecordMedia {
        second_per_grid: processor.temporal_patch_size as f64 / fps,
        patches,
        mel,
    })
}

impl RecordMedia {
    /// The thinker input: one video with its audio track interleaved.
    pub fn into_input(self) -> MediaInput {
        MediaInput::Video {
            patches: self.patches,
            second_per_grid: self.second_per_grid,
            audio: Some(self.mel),
        }
    }
}

/// The id of a chat or media token in `tk` (the embedded tokenizer's fixed ids, or a real
/// Qwen2.5-Omni tokenizer's); an error names the token when the tokenizer lacks it.
pub fn special(tk: &Tokenizer, token: &str) -> Result<u32> {
    tk.token_to_id(token).ok_or_else(|| {
        anyhow!("tokenizer has no `{token}` token (a Qwen2.5-Omni chat tokenizer is required)")
    })
}

/// The token that ends an answer in `tk`: `<|im_end|>`.
pub fn stop_token(tk: &Tokenizer) -> Result<u32> {
    special(tk, "<|im_end|>")
}

/// The view a prompt is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// Media and subtitle only.
    Student,
    /// The student's context plus a privileged block.
    Teacher(Privileged),
}

/// Prompt token ids in Qwen2.5-Omni's chat layout:
///
/// ```text
/// <|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n
/// <|im_start|>user\n<|vision_bos|><|VIDEO|><|vision_eos|>{student text}{privileged block}<|im_end|>\n
/// <|im_start|>assistant\n
/// ```
///
/// The single `<|VIDEO|>` is the placeholder the thinker expands into the record's
/// interleaved frame and audio tokens (`<|audio_bos|>` … `<|audio_eos|>`). Each text piece is
/// tokenized on its own, so the teacher's ids are the student's with the block's ids inserted
/// before `<|im_end|>`, and both end with the same assistant header.
pub fn prompt_ids(tk: &Tokenizer, record: &Record, view: View) -> Result<Vec<u32>> {
    chat_ids(tk, record, view, true)
}

/// [`prompt_ids`] for a text-only model (a `Qwen2ForCausalLM` checkpoint): the same chat
/// layout without the video block, so the student has the subtitle alone.
pub fn text_prompt_ids(tk: &Tokenizer, record: &Record, view: View) -> Result<Vec<u32>> {
    chat_ids(tk, record, view, false)
}

fn chat_ids(tk: &Tokenizer, record: &Record, view: View, video: bool) -> Result<Vec<u32>> {
    let text = |s: &str| tokenizer::encode(tk, s);
    let (im_start, im_end) = (special(tk, "<|im_start|>")?, special(tk, "<|im_end|>")?);
    let mut ids = vec![im_start];
    ids.extend(text(&format!("system\n{SYSTEM_PROMPT}"))?);
    ids.push(im_end);
    ids.extend(text("\n")?);
    ids.push(im_start);
    ids.extend(text("user\n")?);
    if video {
        ids.extend([
            special(tk, "<|vision_bos|>")?,
            special(tk, "<|VIDEO|>")?,
            special(tk, "<|vision_eos|>")?,
        ]);
    }
    ids.extend(text(&eval::student_text(record))?);
    if let View::Teacher(kind) = view {
        ids.extend(text(&eval::privileged_text(record, kind))?);
    }
    ids.extend(assistant_header(tk)?);
    Ok(ids)
}

/// `<|im_end|>\n<|im_start|>assistant\n`: closes the user turn and opens the answer.
pub fn assistant_header(tk: &Tokenizer) -> Result<Vec<u32>> {
    let mut ids = vec![special(tk, "<|im_end|>")?];
    ids.extend(tokenizer::encode(tk, "\n")?);
    ids.push(special(tk, "<|im_start|>")?);
    ids.extend(tokenizer::encode(tk, "assistant\n")?);
    Ok(ids)
}

/// The gold answer's ids, `eval::answer(record)` then [`STOP_TOKEN`].
pub fn answer_ids(tk: &Tokenizer, record: &Record) -> Result<Vec<u32>> {
    let mut ids = tokenizer::encode(tk, &eval::answer(record))?;
    ids.push(stop_token(tk)?);
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synth::{self, SynthConfig};
    use burn::backend::NdArray;
    use omniopsd_checkpoint::Checkpoint;

    type B = NdArray<f32>;

    struct Corpus {
        dir: tempfile::TempDir,
        records: Vec<Record>,
        tk: Tokenizer,
    }

    fn corpus() -> Corpus {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SynthConfig {
            n: 3,
            ..SynthConfig::default()
        };
        let records = synth::synthesize(dir.path(), &cfg, |_| {}).unwrap();
        let texts: Vec<String> = records
            .iter()
            .flat_map(|r| {
                [
                    eval::student_text(r),
                    eval::privileged_text(r, Privileged::Rationale),
                    eval::answer(r),
                ]
            })
            .chain([SYSTEM_PROMPT.to_string()])
            .collect();
        let tk = tokenizer::train(&texts, 384).unwrap();
        Corpus { dir, records, tk }
    }

    fn tiny() -> ModelConfig {
        ModelConfig {
            hidden_size: 32,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            intermediate_size: 48,
            ..ModelConfig::default()
        }
    }

    #[test]
    fn mrope_section_splits_head_pairs_like_qwen2_5_omni() {
        assert_eq!(mrope_section(128), [16, 24, 24]);
        assert_eq!(mrope_section(16), [2, 3, 3]);
        assert_eq!(mrope_section(8).iter().sum::<usize>(), 4);
    }

    #[test]
    fn written_checkpoint_loads_in_both_towers_with_hf_init() {
        let c = corpus();
        let out = tempfile::tempdir().unwrap();
        let cfg = tiny();
        write_tiny_omni::<B>(out.path(), &cfg, &c.tk, 7).unwrap();
        let ckpt = Checkpoint::open(out.path()).unwrap();
        assert!(ckpt.tokenizer_path().is_some());
        let dev = Default::default();
        let thinker = omniopsd_thinker::Thinker::<B>::from_checkpoint(&ckpt, &dev).unwrap();
        assert_eq!(thinker.audio.output_dim(), cfg.hidden_size);
        assert_eq!(thinker.visual.output_dim(), cfg.hidden_size);

        let json = ckpt.config_json();
        let vocab = c.tk.get_vocab_size(true) as u64;
        assert_eq!(json["text_config"]["vocab_size"], vocab);
        assert_eq!(json["video_token_index"], u64::from(VIDEO));
        assert_eq!(json["audio_start_token_id"], u64::from(AUDIO_BOS));
        assert_eq!(
            json["text_config"]["rope_parameters"]["mrope_section"],
            json!([2, 3, 3])
        );

        let (embed, shape) = ckpt.read_f32("model.embed_tokens.weight").unwrap();
        assert_eq!(shape, [vocab as usize, cfg.hidden_size]);
        let n = embed.len() as f64;
        let mean = embed.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let sd = (embed
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        assert!(mean.abs() < 0.002, "mean {mean}");
        assert!((sd - INITIALIZER_RANGE).abs() < 0.002, "sd {sd}");
        let (bias, _) = ckpt
            .read_f32("model.layers.0.self_attn.q_proj.bias")
            .unwrap();
        assert!(bias.iter().all(|&v| v == 0.0));
        let (norm, _) = ckpt.read_f32("visual.blocks.1.norm2.weight").unwrap();
        assert!(norm.iter().all(|&v| v == 1.0));
        assert!(ckpt
            .tensor_names()
            .any(|t| t == "audio_tower.audio_bos_eos_token.weight"));
    }

    #[test]
    fn written_weights_depend_only_on_the_seed() {
        let c = corpus();
        let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        for (d, seed) in dirs.iter().zip([1, 1, 2]) {
            write_tiny_omni::<B>(d.path(), &tiny(), &c.tk, seed).unwrap();
        }
        let bytes = |d: &tempfile::TempDir| fs::read(d.path().join("model.safetensors")).unwrap();
        assert_eq!(bytes(&dirs[0]), bytes(&dirs[1]));
        assert_ne!(bytes(&dirs[0]), bytes(&dirs[2]));
    }

    #[test]
    fn write_refuses_sizes_the_decoder_cannot_run() {
        let c = corpus();
        let out = tempfile::tempdir().unwrap();
        let bad = ModelConfig {
            num_key_value_heads: 3,
            ..tiny()
        };
        let err = write_tiny_omni::<B>(out.path(), &bad, &c.tk, 0).unwrap_err();
        assert!(
            format!("{err:#}").contains("model.num_key_value_heads"),
            "{err:#}"
        );
    }

    #[test]
    fn write_refuses_a_tokenizer_without_the_chat_specials() {
        let bare = Tokenizer::new(tokenizers::models::bpe::BPE::default());
        let out = tempfile::tempdir().unwrap();
        let err = write_tiny_omni::<B>(out.path(), &tiny(), &bare, 0).unwrap_err();
        assert!(format!("{err:#}").contains("<|pad|>"), "{err:#}");
        assert!(!out.path().join("model.safetensors").exists());
    }

    #[test]
    fn media_of_a_synth_record_is_one_even_frame_grid_and_its_audio() {
        let c = corpus();
        let r = &c.records[0];
        let m = record_media(r, c.dir.path(), &Limits::default(), &video_processor()).unwrap();
        // 4 frames of 56x56, scaled up to the video processor's minimum of 128·28² pixels.
        assert_eq!(m.patches.grid_thw, [2, 24, 24]);
        assert_eq!(m.patches.patch_dim, 3 * 2 * 14 * 14);
        let wav =
            media::read_wav(&resolve(c.dir.path(), &r.audio), media::SAMPLE_RATE, 30.0).unwrap();
        assert_eq!(m.mel.valid_frames, wav.samples.len().div_ceil(160));
        assert!((m.second_per_grid - 2.0 * wav.seconds() / 4.0).abs() < 1e-12);
    }

    #[test]
    fn odd_frame_counts_are_padded_by_repeating_the_last_frame() {
        let c = corpus();
        let r = &c.records[1];
        let frames_dir = resolve(c.dir.path(), &r.video);
        fs::remove_file(frames_dir.join("003.png")).unwrap();
        let m = record_media(r, c.dir.path(), &Limits::default(), &video_processor()).unwrap();
        let wav =
            media::read_wav(&resolve(c.dir.path(), &r.audio), media::SAMPLE_RATE, 30.0).unwrap();
        assert!(
            (m.second_per_grid - 2.0 * wav.seconds() / 3.0).abs() < 1e-12,
            "three frames read"
        );
        assert_eq!(m.patches.grid_thw[0], 2);
        // Patch rows of the second temporal patch hold frame 2 twice: the two 14x14 time
        // slices of every channel are equal.
        let per_t = m.patches.grid_thw[1] * m.patches.grid_thw[2];
        let row = &m.patches.data[per_t * m.patches.patch_dim..][..m.patches.patch_dim];
        let slice = 14 * 14;
        for ch in 0..3 {
            let base = ch * 2 * slice;
            assert_eq!(row[base..base + slice], row[base + slice..base + 2 * slice]);
        }
    }

    fn media_error(edit: impl Fn(&Path, &Record)) -> String {
        let c = corpus();
        let r = &c.records[2];
        edit(c.dir.path(), r);
        let err =
            record_media(r, c.dir.path(), &Limits::default(), &video_processor()).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(&r.id), "{msg}");
        msg
    }

    #[test]
    fn missing_wav_is_an_error_naming_record_and_file() {
        let msg = media_error(|base, r| fs::remove_file(resolve(base, &r.audio)).unwrap());
        assert!(msg.contains(".wav"), "{msg}");
    }

    #[test]
    fn corrupt_png_is_an_error_naming_record_and_frame() {
        let msg = media_error(|base, r| {
            fs::write(
                resolve(base, &r.video).join("001.png"),
                b"\x89PNG\r\n\x1a\nbroken",
            )
            .unwrap()
        });
        assert!(msg.contains("001.png"), "{msg}");
    }

    #[test]
    fn wrong_sample_rate_is_an_error_naming_record_file_and_rates() {
        let msg = media_error(|base, r| {
            let spec = hound::WavSpec {
                channels: 1,
                sample_rate: 8_000,
                bits_per_sample: 16,
                sample_format: hound::SampleFormat::Int,
            };
            let mut w = hound::WavWriter::create(resolve(base, &r.audio), spec).unwrap();
            for i in 0..8_000 {
                w.write_sample(((i % 50) * 100) as i16).unwrap();
            }
            w.finalize().unwrap();
        });
        assert!(msg.contains(".wav") && msg.contains("8000 Hz"), "{msg}");
    }

    #[test]
    fn thinker_loads_the_written_checkpoint_and_lays_out_both_prompts() {
        let c = corpus();
        let out = tempfile::tempdir().unwrap();
        let cfg = ModelConfig::default();
        write_tiny_omni::<B>(out.path(), &cfg, &c.tk, 3).unwrap();
        let dev = Default::default();
        let ckpt = Checkpoint::open(out.path()).unwrap();
        let thinker = omniopsd_thinker::Thinker::<B>::from_checkpoint(&ckpt, &dev).unwrap();
        let r = &c.records[0];
        let media = vec![
            record_media(r, c.dir.path(), &Limits::default(), &video_processor())
                .unwrap()
                .into_input(),
        ];
        let MediaInput::Video {
            patches,
            audio: Some(mel),
            ..
        } = &media[0]
        else {
            panic!("expected one video with its audio track, got {media:?}");
        };
        let video_rows = thinker.visual.output_rows(patches.grid_thw);
        let audio_rows = omniopsd_thinker::audio_tokens(mel.valid_frames);

        let student = prompt_ids(&c.tk, r, View::Student).unwrap();
        let teacher = prompt_ids(&c.tk, r, View::Teacher(Privileged::Rationale)).unwrap();
        let encoded = thinker.encode_media(&media).unwrap();
        let s = thinker.prompt_encoded(&student, &encoded).unwrap();
        let t = thinker.prompt_encoded(&teacher, &encoded).unwrap();
        assert_eq!(thinker.prompt(&student, &media).unwrap(), s);
        let count = |ids: &[u32], tok: u32| ids.iter().filter(|&&x| x == tok).count();
        assert_eq!(count(&s.ids, VIDEO), video_rows);
        assert_eq!(count(&s.ids, AUDIO), audio_rows);
        // One placeholder became bos + video + audio + eos.
        assert_eq!(s.ids.len(), student.len() - 1 + video_rows + audio_rows + 2);
        let bos = s.ids.iter().position(|&x| x == VISION_BOS).unwrap();
        assert_eq!(s.ids[bos + 1], AUDIO_BOS);
        let eos = s.ids.iter().position(|&x| x == VISION_EOS).unwrap();
        assert_eq!(s.ids[eos - 1], AUDIO_EOS);
        let inserts = s.inserts.as_ref().unwrap();
        assert_eq!(inserts.slots.len(), video_rows + audio_rows);
        assert_eq!(inserts.rows.len(), inserts.slots.len() * cfg.hidden_size);

        // The teacher sees the student's context, then the block: same ids and positions up
        // to the end of the student text.
        let block = t.ids.len() - s.ids.len();
        let header = assistant_header(&c.tk).unwrap().len();
        let shared = s.ids.len() - header;
        assert_eq!(t.ids[..shared], s.ids[..shared]);
        assert_eq!(t.ids[shared + block..], s.ids[shared..]);
        let (sp, tp) = (s.positions.as_ref().unwrap(), t.positions.as_ref().unwrap());
        for row in 0..3 {
            assert_eq!(tp.rows[row][..shared], sp.rows[row][..shared]);
        }
        let hidden = thinker.forward(&s).into_data().to_vec::<f32>().unwrap();
        assert!(hidden.iter().all(|v| v.is_finite()));
    }

    fn chat_text(r: &Record, block: &str) -> String {
        format!(
            "<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n\
             <|vision_bos|><|VIDEO|><|vision_eos|>{}{block}<|im_end|>\n<|im_start|>assistant\n",
            eval::student_text(r)
        )
    }

    #[test]
    fn prompt_ids_decode_to_the_chat_layout() {
        let c = corpus();
        let r = &c.records[0];
        let student = prompt_ids(&c.tk, r, View::Student).unwrap();
        assert_eq!(c.tk.decode(&student, false).unwrap(), chat_text(r, ""));
        // Tokenizing the whole chat string gives the same ids: the pieces meet at specials.
        assert_eq!(
            tokenizer::encode(&c.tk, &chat_text(r, "")).unwrap(),
            student
        );
        let teacher = prompt_ids(&c.tk, r, View::Teacher(Privileged::Rationale)).unwrap();
        let block = eval::privileged_text(r, Privileged::Rationale);
        assert_eq!(c.tk.decode(&teacher, false).unwrap(), chat_text(r, &block));
        assert_eq!(student.iter().filter(|&&t| t == VIDEO).count(), 1);
    }

    #[test]
    fn teacher_prompt_is_student_prompt_with_the_block_before_the_assistant_header() {
        let c = corpus();
        let r = &c.records[1];
        let student = prompt_ids(&c.tk, r, View::Student).unwrap();
        let header = assistant_header(&c.tk).unwrap();
        assert!(student.ends_with(&header));
        let body = &student[..student.len() - header.len()];
        for kind in [Privileged::Rationale, Privileged::Label, Privileged::None] {
            let teacher = prompt_ids(&c.tk, r, View::Teacher(kind)).unwrap();
            let block = tokenizer::encode(&c.tk, &eval::privileged_text(r, kind)).unwrap();
            let expected: Vec<u32> = [body, &block, &header].concat();
            assert_eq!(teacher, expected, "{kind:?}");
        }
        assert_eq!(
            prompt_ids(&c.tk, r, View::Teacher(Privileged::None)).unwrap(),
            student
        );
    }

    #[test]
    fn answer_ids_are_the_gold_line_then_the_stop_token() {
        let c = corpus();
        let r = &c.records[2];
        let ids = answer_ids(&c.tk, r).unwrap();
        assert_eq!(ids.last(), Some(&STOP_TOKEN));
        assert_eq!(ids.iter().filter(|&&t| t == STOP_TOKEN).count(), 1);
        assert_eq!(
            c.tk.decode(&ids, false).unwrap(),
            format!("{}<|im_end|>", eval::answer(r))
        );
    }
}
