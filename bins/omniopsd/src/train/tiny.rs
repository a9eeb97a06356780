//! The embedded tiny omni model: what `omniopsd train` starts from when `model.dir` is absent.
//!
//! Invariant: everything that exists only for the embedded model is made here, from
//! `[model]` and the corpus: its tokenizer (byte-level BPE trained on the template's texts),
//! its randomly initialised Qwen2.5-Omni thinker checkpoint, its size rules and its video
//! processor. Both are written into the run directory once, so a resumed run starts from the
//! very same files; nothing here depends on the backend.
//!
//! The checkpoint is the bare-thinker layout transformers writes for
//! `Qwen2_5OmniThinkerForConditionalGeneration.save_pretrained` (`model.*`, `lm_head.weight`,
//! `audio_tower.*`, `visual.*`), initialised as its `_init_weights` does: `N(0, 0.02)` for
//! linear, convolution and embedding weights, zero biases, unit norm weights. The towers are
//! tiny and fixed (audio: 2 Whisper layers of width 32; vision: 2 ViT blocks of width 32); the
//! decoder takes its sizes from the config and its vocabulary from the corpus tokenizer.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::backend::Backend;
use omniopsd_decoder::Qwen2Config;
use omniopsd_vision::ProcessorConfig;
use serde_json::json;
use tokenizers::Tokenizer;

use super::config::{ModelConfig, TrainConfig};
use super::prompt;
use super::run_dir::RunDir;
use super::tokenizer::{
    self, AUDIO, AUDIO_BOS, AUDIO_EOS, IMAGE, IM_END, SPECIALS, VIDEO, VISION_BOS, VISION_EOS,
};
use crate::data::manifest::Record;
use omniopsd_nn::RandomInit;

/// The tokenizer and the checkpoint directory training starts from: `model.dir` and its
/// tokenizer, or the embedded model, made on first use in the run directory (`tokenizer.json`
/// trained on the corpus texts, `init/` initialised with `model.init_seed`).
pub fn prepare(
    cfg: &TrainConfig,
    run: &RunDir,
    records: &[Record],
) -> Result<(Tokenizer, PathBuf)> {
    let load = |path: &Path| omniopsd_decoder::load_tokenizer(path).map_err(|e| anyhow!("{e}"));
    if let Some(dir) = &cfg.model.dir {
        return Ok((load(&dir.join("tokenizer.json"))?, dir.clone()));
    }
    let path = run.root.join("tokenizer.json");
    let tk = if path.is_file() {
        load(&path)?
    } else {
        let tk = tokenizer::train(&prompt::template_texts(records), cfg.model.vocab_size)?;
        tokenizer::save(&tk, &path)?;
        tk
    };
    let dir = run.root.join("init");
    if !dir.join("model.safetensors").is_file() {
        write_tiny_omni::<burn::backend::NdArray<f32>>(&dir, &cfg.model, &tk, cfg.model.init_seed)?;
    }
    Ok((tk, dir))
}

/// The embedded model's video processor: Qwen2.5-Omni's upsamples small frames to at least
/// 128·28² pixels; the embedded model is trained from scratch on 56×56 faces, so its
/// processor keeps them at their size (8 video tokens instead of 288 per sample).
pub fn video_processor() -> ProcessorConfig {
    ProcessorConfig {
        min_pixels: 56 * 56,
        ..crate::inputs::video_processor()
    }
}

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

/// Every tensor `Qwen2_5OmniThinkerForConditionalGeneration` holds for these sizes.
fn thinker_spec(cfg: &ModelConfig, vocab: usize) -> RandomInit {
    let h = cfg.hidden_size;
    let kv = cfg.num_key_value_heads * (h / cfg.num_attention_heads);
    let mut s = RandomInit::new();

    s.normal("model.embed_tokens.weight", vec![vocab, h]);
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
    s.normal("audio_tower.audio_bos_eos_token.weight", vec![2, h]);
    s.normal("audio_tower.conv1.weight", vec![d, AUDIO_MEL_BINS, 3]);
    s.zeros("audio_tower.conv1.bias", vec![d]);
    s.normal("audio_tower.conv2.weight", vec![d, d, 3]);
    s.zeros("audio_tower.conv2.bias", vec![d]);
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
        "visual.patch_embed.proj.weight",
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

/// The decoder's `text_config` for these sizes, key for key as transformers 5.24 saves it.
fn text_config(cfg: &ModelConfig, vocab: usize) -> serde_json::Value {
    let head_dim = cfg
        .hidden_size
        .checked_div(cfg.num_attention_heads)
        .unwrap_or(0);
    json!({
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
    })
}

/// The thinker `config.json`, key for key as transformers 5.24 saves it.
fn thinker_config(cfg: &ModelConfig, vocab: usize, user_token: u32) -> serde_json::Value {
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
        "text_config": text_config(cfg, vocab),
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

/// The embedded model's decoder config from `[model]` (for memory plans).
pub fn decoder_config(cfg: &ModelConfig) -> Result<Qwen2Config> {
    serde_json::from_value(text_config(cfg, cfg.vocab_size))
        .context("the embedded model's text_config")
}

/// Checks `[model]` for the embedded model: its decoder config through the decoder's own
/// `validate` (errors name the `model.*` key), plus what only the embedded model needs.
pub fn check(cfg: &ModelConfig) -> Result<()> {
    let decoder: Qwen2Config = serde_json::from_value(text_config(cfg, cfg.vocab_size))
        .context("the embedded model's text_config")?;
    decoder
        .validate()
        .map_err(|(key, problem)| anyhow!("model.{key}: {problem}"))?;
    if cfg.vocab_size < 64 {
        bail!(
            "model.vocab_size: must be >= 64 (the tokenizer's specials and byte alphabet), got {}",
            cfg.vocab_size
        );
    }
    let head_dim = cfg.hidden_size / cfg.num_attention_heads;
    if head_dim < 8 {
        bail!(
            "model.hidden_size / model.num_attention_heads = {head_dim}: rotary positions over \
             (time, height, width) need an even head size of at least 8"
        );
    }
    Ok(())
}

/// Writes a complete Qwen2.5-Omni thinker checkpoint into `dir` (created if absent):
/// `config.json`, `model.safetensors` (f32) and `tokenizer.json`. The decoder takes its sizes
/// from `cfg` and its vocabulary from `tokenizer`, whose special tokens must hold the ids of
/// [`SPECIALS`]; weights are HF-style random ([`RandomInit`]) from `seed`. `B` only instantiates `omniopsd_checkpoint::save_safetensors`;
/// the bytes written do not depend on it.
pub fn write_tiny_omni<B: Backend>(
    dir: &Path,
    cfg: &ModelConfig,
    tokenizer: &Tokenizer,
    seed: u64,
) -> Result<()> {
    check(cfg)?;
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
    omniopsd_checkpoint::atomic::write_atomic(&config_path, config.as_bytes())?;

    let tensors = thinker_spec(cfg, vocab).draw(INITIALIZER_RANGE, seed);
    omniopsd_checkpoint::save_safetensors::<B>(
        &dir.join("model.safetensors"),
        &tensors,
        omniopsd_checkpoint::Dtype::F32,
    )?;
    tokenizer::save(tokenizer, &dir.join("tokenizer.json"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::manifest::Limits;
    use crate::inputs::{record_media, video_processor};
    use crate::train::prompt::tests::corpus;
    use crate::train::prompt::{assistant_header, prompt_ids, Privileged, View};
    use burn::backend::NdArray;
    use omniopsd_checkpoint::Checkpoint;
    use omniopsd_thinker::MediaInput;

    type B = NdArray<f32>;

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
}
