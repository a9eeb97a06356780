//! Parity with transformers 5.24 (`WhisperFeatureExtractor` + `Qwen2_5OmniAudioEncoder`) on
//! the fixtures written by `tests/reference/gen_omni.py`: a tiny random-weight thinker
//! checkpoint and reference features / tower outputs. Tolerances: log-mel ≤ 1e-4 absolute,
//! tower output relative error (max |Δ| / max |ref|) ≤ 1e-4, all in f32.

use std::path::PathBuf;

use burn::backend::NdArray;
use burn::tensor::{Tensor, TensorData};
use omniopsd_audio::{
    output_lengths, AudioEncoder, AudioEncoderConfig, Error, FeatureExtractor, SAMPLING_RATE,
};
use omniopsd_checkpoint::Checkpoint;

type B = NdArray<f32>;

fn reference_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/reference"
    ))
}

fn fixture() -> Checkpoint {
    Checkpoint::open_file(&reference_dir().join("omni_audio.safetensors")).expect("audio fixture")
}

/// The tower of the checkpoint in `dir`, found where a thinker keeps it: `audio_tower.*` and
/// `audio_config` at the model's level of the checkpoint.
fn tower(dir: &str) -> AudioEncoder<B> {
    let ckpt = Checkpoint::open(&reference_dir().join(dir)).expect("omni checkpoint");
    let config = ckpt
        .model_config()
        .get("audio_config")
        .expect("audio_config");
    let config = AudioEncoderConfig::from_config(&config).expect("audio_config parses");
    AudioEncoder::load(
        &ckpt.model_weights().pp("audio_tower"),
        &config,
        &Default::default(),
    )
    .expect("audio tower loads")
}

fn model() -> AudioEncoder<B> {
    tower("omni_tiny")
}

fn read<const D: usize>(ckpt: &Checkpoint, name: &str, shape: [usize; D]) -> Vec<f32> {
    ckpt.weights()
        .tensor::<B, D>(name, shape, &Default::default())
        .unwrap_or_else(|e| panic!("fixture tensor {name}: {e}"))
        .into_data()
        .to_vec::<f32>()
        .expect("f32 data")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn rel_err(a: &[f32], reference: &[f32]) -> f32 {
    let scale = reference.iter().map(|x| x.abs()).fold(0.0, f32::max);
    max_abs_diff(a, reference) / scale
}

fn tensor2(data: Vec<f32>, shape: [usize; 2]) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(data, shape), &Default::default())
}

#[test]
fn log_mel_matches_whisper_feature_extractor() {
    let fx = fixture();
    let wave = read(&fx, "waveform", [20_800]);
    let mel = FeatureExtractor::qwen2_5_omni()
        .extract(&wave, SAMPLING_RATE)
        .expect("features");
    assert_eq!(
        (mel.n_mels, mel.n_frames, mel.valid_frames),
        (128, 3000, 130)
    );

    let head = read(&fx, "mel_head", [128, 136]);
    let ours: Vec<f32> = (0..128)
        .flat_map(|m| (0..136).map(move |t| (m, t)))
        .map(|(m, t)| mel.get(m, t))
        .collect();
    let err = max_abs_diff(&ours, &head);
    eprintln!("log-mel max abs err (valid frames + 6 padded): {err:e}");
    assert!(err <= 1e-4, "log-mel max abs err {err}");

    // Every padded frame holds the silence value of the reference's last frame.
    let pad = read(&fx, "mel_pad_value", [128, 1]);
    let tail: Vec<f32> = (0..128).map(|m| mel.get(m, 2999)).collect();
    assert!(max_abs_diff(&tail, &pad) <= 1e-4);

    let mask = read(&fx, "attention_mask", [3000]);
    let ours: Vec<f32> = mel
        .attention_mask()
        .iter()
        .map(|&b| b as u8 as f32)
        .collect();
    assert_eq!(ours, mask);
}

#[test]
fn log_mel_of_a_short_clip_matches_reference() {
    let fx = fixture();
    let wave = read(&fx, "waveform2", [7_000]);
    let mel = FeatureExtractor::qwen2_5_omni()
        .extract(&wave, SAMPLING_RATE)
        .expect("features");
    assert_eq!(mel.valid_frames, 44);
    let err = max_abs_diff(&mel.valid_features(), &read(&fx, "mel2_valid", [128, 44]));
    eprintln!("short clip log-mel max abs err: {err:e}");
    assert!(err <= 1e-4, "log-mel max abs err {err}");
}

#[test]
fn audio_tower_matches_transformers_on_reference_features() {
    let fx = fixture();
    let head = read(&fx, "mel_head", [128, 136]);
    let valid: Vec<f32> = (0..128)
        .flat_map(|m| head[m * 136..m * 136 + 130].to_vec())
        .collect();
    let out = model()
        .forward(tensor2(valid, [128, 130]), &[130])
        .expect("forward");
    assert_eq!(out.dims(), [output_lengths(130), 64]);
    let err = rel_err(
        &out.into_data().to_vec::<f32>().unwrap(),
        &read(&fx, "tower_out", [32, 64]),
    );
    eprintln!("audio tower rel err: {err:e}");
    assert!(err <= 1e-4, "audio tower rel err {err}");
}

#[test]
fn audio_tower_matches_transformers_on_two_concatenated_clips() {
    let fx = fixture();
    let head = read(&fx, "mel_head", [128, 136]);
    let second = read(&fx, "mel2_valid", [128, 44]);
    let both: Vec<f32> = (0..128)
        .flat_map(|m| {
            let mut row = head[m * 136..m * 136 + 130].to_vec();
            row.extend_from_slice(&second[m * 44..(m + 1) * 44]);
            row
        })
        .collect();
    let out = model()
        .forward(tensor2(both, [128, 174]), &[130, 44])
        .expect("forward");
    assert_eq!(out.dims(), [43, 64]);
    let err = rel_err(
        &out.into_data().to_vec::<f32>().unwrap(),
        &read(&fx, "tower_out_batch", [43, 64]),
    );
    eprintln!("audio tower (2 clips) rel err: {err:e}");
    assert!(err <= 1e-4, "audio tower rel err {err}");
}

#[test]
fn waveform_to_embeddings_end_to_end_matches_transformers() {
    let fx = fixture();
    let wave = read(&fx, "waveform", [20_800]);
    let mel = FeatureExtractor::qwen2_5_omni()
        .extract(&wave, SAMPLING_RATE)
        .unwrap();
    let out = model().encode(&mel, &Default::default()).expect("encode");
    let err = rel_err(
        &out.into_data().to_vec::<f32>().unwrap(),
        &read(&fx, "tower_out", [32, 64]),
    );
    eprintln!("audio end-to-end rel err: {err:e}");
    assert!(err <= 1e-4, "audio end-to-end rel err {err}");
}

#[test]
fn clip_longer_than_thirty_seconds_is_truncated() {
    let fx = FeatureExtractor::qwen2_5_omni();
    let n = fx.n_samples();
    let long: Vec<f32> = (0..n + 16_000)
        .map(|i| ((i as f32 * 0.013).sin() * 0.3) + ((i % 97) as f32 - 48.0) * 1e-3)
        .collect();
    let a = fx.extract(&long, SAMPLING_RATE).unwrap();
    let b = fx.extract(&long[..n], SAMPLING_RATE).unwrap();
    assert_eq!(a.valid_frames, 3000);
    assert_eq!(a, b);
}

#[test]
fn wrong_sample_rate_is_rejected() {
    let err = FeatureExtractor::qwen2_5_omni()
        .extract(&[0.0; 441], 44_100)
        .unwrap_err();
    assert!(matches!(
        err,
        Error::SampleRate {
            expected: 16_000,
            found: 44_100
        }
    ));
    assert!(err.to_string().contains("44100"));
}

#[test]
fn empty_audio_is_rejected() {
    let err = FeatureExtractor::qwen2_5_omni()
        .extract(&[], SAMPLING_RATE)
        .unwrap_err();
    assert!(matches!(err, Error::EmptyAudio));
}

#[test]
fn non_finite_sample_is_rejected_with_its_index() {
    let mut wave = vec![0.1f32; 1000];
    wave[417] = f32::NAN;
    let err = FeatureExtractor::qwen2_5_omni()
        .extract(&wave, SAMPLING_RATE)
        .unwrap_err();
    assert!(matches!(err, Error::NonFiniteSample { index: 417, .. }));
}

#[test]
fn features_with_wrong_bin_count_or_lengths_are_rejected() {
    let m = model();
    let err = m
        .forward(tensor2(vec![0.0; 80 * 10], [80, 10]), &[10])
        .unwrap_err();
    assert!(err.to_string().contains("mel bins"), "{err}");
    let err = m
        .forward(tensor2(vec![0.0; 128 * 10], [128, 10]), &[4, 5])
        .unwrap_err();
    assert!(err.to_string().contains("feature_lens"), "{err}");
    let err = m
        .forward(tensor2(vec![0.0; 128 * 10], [128, 10]), &[10, 0])
        .unwrap_err();
    assert!(matches!(err, Error::FeatureShape { .. }));
}

#[test]
fn placeholder_count_follows_the_processor_formula() {
    // _get_feat_extract_output_lengths: ((n - 1) // 2 + 1 - 2) // 2 + 1
    for (frames, tokens) in [(1, 0), (2, 0), (3, 1), (130, 32), (44, 11), (3000, 750)] {
        assert_eq!(output_lengths(frames), tokens, "frames {frames}");
    }
}

#[test]
fn full_omni_checkpoint_with_thinker_prefix_loads_the_same_tower() {
    let full = tower("omni_full_layout");
    let fx = fixture();
    let head = read(&fx, "mel_head", [128, 136]);
    let valid: Vec<f32> = (0..128)
        .flat_map(|m| head[m * 136..m * 136 + 130].to_vec())
        .collect();
    let out = full.forward(tensor2(valid, [128, 130]), &[130]).unwrap();
    let err = rel_err(
        &out.into_data().to_vec::<f32>().unwrap(),
        &read(&fx, "tower_out", [32, 64]),
    );
    assert!(err <= 1e-4, "rel err {err}");
}

#[test]
fn clip_too_short_for_one_audio_token_is_rejected() {
    let mel = FeatureExtractor::qwen2_5_omni()
        .extract(&[0.1; 300], SAMPLING_RATE)
        .unwrap();
    assert_eq!(mel.valid_frames, 2);
    let err = model().encode(&mel, &Default::default()).unwrap_err();
    assert!(err.to_string().contains(">= 3"), "{err}");
}

#[test]
fn inconsistent_log_mel_buffer_is_rejected() {
    let mut mel = FeatureExtractor::qwen2_5_omni()
        .extract(&[0.1; 1600], SAMPLING_RATE)
        .unwrap();
    mel.data.truncate(10);
    let err = model().encode(&mel, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("log-mel buffer"), "{err}");
}

#[test]
fn a_window_whose_chunk_length_overflows_is_refused_at_load() {
    // Both keys come from config.json, so `max_source_positions` bounds nothing by itself.
    let ckpt = Checkpoint::open(&reference_dir().join("omni_tiny")).unwrap();
    let view = ckpt.model_config().get("audio_config").unwrap();
    let mut config = AudioEncoderConfig::from_config(&view).unwrap();
    config.max_source_positions = usize::MAX;
    config.n_window = usize::MAX / 2 + 1;
    let err = AudioEncoder::<B>::load(
        &ckpt.model_weights().pp("audio_tower"),
        &config,
        &Default::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Config {
                field: "n_window",
                ..
            }
        ),
        "{err}"
    );
}
