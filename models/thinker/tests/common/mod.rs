//! Fixtures shared by the thinker's parity tests: the tiny checkpoint and the two prompts of
//! `tests/reference/gen_omni.py` built from raw media.

#![allow(dead_code)]

use std::path::PathBuf;

use burn::backend::NdArray;
use burn::tensor::Tensor;
use omniopsd_audio::{FeatureExtractor, LogMel, SAMPLING_RATE};
use omniopsd_checkpoint::Checkpoint;
use omniopsd_core::PolicyModel;
use omniopsd_thinker::{MediaInput, Thinker, ThinkerConfig};
use omniopsd_vision::{preprocess_image, preprocess_video, Frame, PixelPatches, ProcessorConfig};

pub type B = NdArray<f32>;

pub fn reference_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/reference"
    ))
}

pub fn read<const D: usize>(file: &str, name: &str, shape: [usize; D]) -> Vec<f32> {
    let ckpt = Checkpoint::open_file(&reference_dir().join(file)).unwrap();
    ckpt.weights()
        .tensor::<B, D>(name, shape, &Default::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .into_data()
        .to_vec::<f32>()
        .unwrap()
}

/// `max|a − ref| / max|ref|`.
pub fn rel_err(a: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(a.len(), reference.len());
    let scale = reference.iter().map(|x| x.abs()).fold(0.0, f32::max);
    a.iter()
        .zip(reference)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

/// The logits of final hidden states `[n, hidden]`, `[n, vocab]` flattened.
pub fn logits(model: &Thinker<B>, hidden: Tensor<B, 2>) -> Vec<f32> {
    hidden
        .matmul(model.lm_head().transpose())
        .into_data()
        .to_vec::<f32>()
        .unwrap()
}

pub fn thinker() -> Thinker<B> {
    let ckpt = Checkpoint::open(&reference_dir().join("omni_tiny")).unwrap();
    Thinker::from_checkpoint(&ckpt, &Default::default()).expect("thinker loads")
}

pub fn mel(name: &str, len: usize) -> LogMel {
    FeatureExtractor::qwen2_5_omni()
        .extract(&read("omni_audio.safetensors", name, [len]), SAMPLING_RATE)
        .unwrap()
}

pub fn processor() -> ProcessorConfig {
    ProcessorConfig {
        max_pixels: 28 * 28 * 64,
        ..ProcessorConfig::qwen2_5_omni_image()
    }
}

pub fn image() -> PixelPatches {
    let rgb: Vec<u8> = read("omni_vision.safetensors", "image", [84, 112, 3])
        .iter()
        .map(|&v| v as u8)
        .collect();
    preprocess_image(
        &Frame {
            width: 112,
            height: 84,
            rgb: &rgb,
        },
        &processor(),
    )
    .unwrap()
}

pub fn video() -> PixelPatches {
    let rgb: Vec<u8> = read("omni_vision.safetensors", "video", [3, 56, 112, 3])
        .iter()
        .map(|&v| v as u8)
        .collect();
    let per = 56 * 112 * 3;
    let frames: Vec<Frame> = (0..3)
        .map(|i| Frame {
            width: 112,
            height: 56,
            rgb: &rgb[i * per..(i + 1) * per],
        })
        .collect();
    preprocess_video(&frames, &processor()).unwrap()
}

/// Token ids of prompt A: text, audio, text, image, text, video, text (one placeholder per
/// media item, before expansion).
pub fn prompt_a_ids(cfg: &ThinkerConfig) -> Vec<u32> {
    [
        vec![11, 12, 13],
        vec![
            cfg.audio_start_token_id,
            cfg.audio_token_index,
            cfg.audio_end_token_id,
        ],
        vec![21, 22],
        vec![
            cfg.vision_start_token_id,
            cfg.image_token_index,
            cfg.vision_end_token_id,
        ],
        vec![31],
        vec![
            cfg.vision_start_token_id,
            cfg.video_token_index,
            cfg.vision_end_token_id,
        ],
        vec![41, 42, 43],
    ]
    .concat()
}

/// Token ids of prompt B: text, video (its audio interleaved), text, audio, text.
pub fn prompt_b_ids(cfg: &ThinkerConfig) -> Vec<u32> {
    [
        vec![11, 12, 13],
        vec![
            cfg.vision_start_token_id,
            cfg.video_token_index,
            cfg.vision_end_token_id,
        ],
        vec![21, 22],
        vec![
            cfg.audio_start_token_id,
            cfg.audio_token_index,
            cfg.audio_end_token_id,
        ],
        vec![51, 52],
    ]
    .concat()
}

/// Prompt A: text, audio, text, image, text, video (no audio), text.
pub fn prompt_a(cfg: &ThinkerConfig) -> (Vec<u32>, Vec<MediaInput>) {
    let ids = prompt_a_ids(cfg);
    let media = vec![
        MediaInput::Audio(mel("waveform", 20_800)),
        MediaInput::Image(image()),
        MediaInput::Video {
            patches: video(),
            second_per_grid: 1.0,
            audio: None,
        },
    ];
    (ids, media)
}

/// Prompt B: text, a video with its audio track interleaved, text, a second clip, text.
pub fn prompt_b(cfg: &ThinkerConfig) -> (Vec<u32>, Vec<MediaInput>) {
    let ids = prompt_b_ids(cfg);
    let media = vec![
        MediaInput::Video {
            patches: video(),
            second_per_grid: 2.0,
            audio: Some(mel("waveform", 20_800)),
        },
        MediaInput::Audio(mel("waveform2", 7_000)),
    ];
    (ids, media)
}
