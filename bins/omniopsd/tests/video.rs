//! Video files and compressed audio against Qwen2.5-Omni's own preprocessing
//! (`qwen-omni-utils` 0.0.9 reading through torchcodec, librosa, transformers'
//! `WhisperFeatureExtractor`) on the fixtures of `tests/reference/gen_video.py`.
//!
//! Tolerances (measured errors in tests/reference/README.md):
//! - frame counts, frame indices, resized sizes: exact; `sample_fps` to 1e-9 relative;
//! - resized pixels (u8): mean |Δ| ≤ 0.5 and max |Δ| ≤ 64 levels per clip (measured: mean
//!   0.11–0.14, max 12–22). The two sides convert YUV to RGB with different swscale settings
//!   (FFmpeg's program vs torchcodec) and resize with different bicubics (Pillow's vs
//!   torchvision's antialiased), so single pixels on sharp edges of the test pattern differ
//!   by tens of levels while the mean stays a tenth of a level;
//! - 16 kHz sample counts: within 8 samples (measured: equal, or 1 short for AAC in a video);
//!   valid log-mel frames within 1 (measured: equal);
//! - log-mel (Whisper-normalised, about [-1.5, 1.5]): max |Δ| ≤ 0.06 over every fifth valid
//!   frame (measured: 6e-5–0.008 for audio files, 0.010–0.020 for video tracks, which
//!   librosa reads through audioread as 16-bit PCM).
//!
//! These tests need the `ffmpeg` and `ffprobe` programs and FAIL without them; set
//! `OMNIOPSD_SKIP_FFMPEG_TESTS=1` to skip them on a machine without FFmpeg.

mod ffmpeg;

use std::collections::BTreeMap;
use std::path::PathBuf;

use omniopsd_audio::FeatureExtractor;
use omniopsd_cli::data::media;
use omniopsd_cli::data::video::{self, VideoOptions};
use safetensors::SafeTensors;
use serde_json::Value;

fn media_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/reference/media"
    ))
}

fn reference() -> Value {
    let text = std::fs::read_to_string(media_dir().join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference.json parses")
}

fn tensors() -> Vec<u8> {
    std::fs::read(media_dir().join("reference.safetensors")).expect("reference.safetensors")
}

fn small_budget(reference: &Value) -> VideoOptions {
    VideoOptions {
        min_pixels: reference["small_budget"]["min_pixels"].as_u64().unwrap() as usize,
        max_pixels: reference["small_budget"]["max_pixels"].as_u64().unwrap() as usize,
        ..VideoOptions::default()
    }
}

fn videos(reference: &Value) -> BTreeMap<String, Value> {
    reference["videos"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[test]
fn frame_counts_indices_sizes_and_time_base_match_qwen_omni_utils() {
    if !ffmpeg::required() {
        return;
    }
    let reference = reference();
    for (name, entry) in videos(&reference) {
        let path = media_dir().join(&name);
        for (budget, opts) in [
            ("default", VideoOptions::default()),
            ("small", small_budget(&reference)),
        ] {
            let want = &entry[budget];
            let (probe, plan) = video::plan_video(&path, &opts).unwrap();
            let stream = probe.video.unwrap();
            let at = format!("{name} ({budget} budget)");
            assert_eq!(
                stream.frames as u64,
                want["total_frames"].as_u64().unwrap(),
                "{at}"
            );
            let fps = want["video_fps"].as_f64().unwrap();
            assert!(
                (stream.fps - fps).abs() <= 1e-9 * fps,
                "{at}: {} vs {fps}",
                stream.fps
            );
            let indices: Vec<usize> = want["indices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(plan.indices, indices, "{at}");
            let size = (
                want["size"][0].as_u64().unwrap() as usize,
                want["size"][1].as_u64().unwrap() as usize,
            );
            assert_eq!(plan.size, size, "{at}");
            let sample_fps = want["sample_fps"].as_f64().unwrap();
            assert!(
                (plan.sample_fps - sample_fps).abs() <= 1e-9 * sample_fps,
                "{at}: {} vs {sample_fps}",
                plan.sample_fps
            );
        }
    }
}

#[test]
fn sampled_frames_match_fetch_video_pixels() {
    if !ffmpeg::required() {
        return;
    }
    let reference = reference();
    let bytes = tensors();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let opts = small_budget(&reference);
    for name in videos(&reference).keys() {
        let want = st.tensor(&format!("frames/{name}")).unwrap();
        let sampled = video::read_video(&media_dir().join(name), &opts).unwrap();
        let shape = want.shape();
        assert_eq!(sampled.frames.len(), shape[0], "{name}");
        let got: Vec<u8> = sampled.frames.iter().flat_map(|f| f.rgb.clone()).collect();
        assert_eq!(
            (
                sampled.frames[0].height as usize,
                sampled.frames[0].width as usize
            ),
            (shape[1], shape[2]),
            "{name}"
        );
        let diffs: Vec<u32> = got
            .iter()
            .zip(want.data())
            .map(|(a, b)| u32::from(a.abs_diff(*b)))
            .collect();
        assert_eq!(diffs.len(), want.data().len());
        let max = *diffs.iter().max().unwrap();
        let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
        eprintln!("{name}: pixels mean |Δ| {mean:.3}, max |Δ| {max}");
        assert!(mean <= 0.5 && max <= 64, "{name}: mean {mean}, max {max}");
    }
}

#[test]
fn audio_files_and_video_tracks_match_librosa_and_whisper_features() {
    if !ffmpeg::required() {
        return;
    }
    let reference = reference();
    let bytes = tensors();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let stride = reference["mel_stride"].as_u64().unwrap() as usize;
    let mut sources: Vec<(String, Value)> = videos(&reference)
        .into_iter()
        .map(|(k, v)| (k, v["audio"].clone()))
        .collect();
    sources.extend(
        reference["audio"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    let extractor = FeatureExtractor::qwen2_5_omni();
    for (name, want) in sources {
        let audio = media::read_audio(&media_dir().join(&name), 30.0).unwrap();
        let samples = want["samples"].as_u64().unwrap() as f64;
        let off = (audio.samples.len() as f64 - samples).abs();
        let mel = extractor
            .extract(&audio.samples, audio.sample_rate)
            .unwrap();
        let valid = want["valid_frames"].as_u64().unwrap() as usize;
        let reference_mel = st.tensor(&format!("mel/{name}")).unwrap();
        let cols = reference_mel.shape()[1];
        let values: Vec<f32> = reference_mel
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mut max = 0f32;
        for m in 0..mel.n_mels {
            for c in 0..cols {
                let t = c * stride;
                if t < mel.valid_frames.min(valid) {
                    max = max.max((mel.get(m, t) - values[m * cols + c]).abs());
                }
            }
        }
        eprintln!(
            "{name}: {} samples vs {samples}, valid frames {} vs {valid}, log-mel max |Δ| {max:.5}",
            audio.samples.len(),
            mel.valid_frames
        );
        assert!(
            off <= 8.0,
            "{name}: {} vs {samples} samples",
            audio.samples.len()
        );
        assert!(mel.valid_frames.abs_diff(valid) <= 1, "{name}");
        assert!(max <= 0.06, "{name}: log-mel max |Δ| {max}");
    }
}
