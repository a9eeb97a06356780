//! Prompt layout parity with transformers 5.24 (`Qwen2_5OmniProcessor` placeholder expansion,
//! `get_rope_index`) on the fixtures of `tests/reference/gen_omni.py`: exact integer equality.

mod common;

use common::{read, reference_dir};
use omniopsd_thinker::{expand_prompt, rope_index, Error, Media, ThinkerConfig};

fn config() -> ThinkerConfig {
    let text = std::fs::read_to_string(reference_dir().join("omni_tiny/config.json")).unwrap();
    ThinkerConfig::from_json(&serde_json::from_str(&text).unwrap()).expect("thinker config")
}

/// Integer fixture `name` of `omni_thinker.safetensors` (stored as f32), `shape` elements.
fn ints<const D: usize>(name: &str, shape: [usize; D]) -> Vec<i64> {
    read("omni_thinker.safetensors", name, shape)
        .into_iter()
        .map(|v| v as i64)
        .collect()
}

fn read_positions(name: &str, len: usize) -> [Vec<i64>; 3] {
    let flat = ints(name, [3, len]);
    std::array::from_fn(|r| flat[r * len..(r + 1) * len].to_vec())
}

/// Prompt A as the chat template writes it: text, an audio clip (130 frames), text, an image
/// (grid 1×6×8), a token, a video without audio (grid 2×4×8, 1 s per grid), text.
fn prompt_a(cfg: &ThinkerConfig) -> (Vec<u32>, Vec<Media>) {
    let ids = common::prompt_a_ids(cfg);
    let media = vec![
        Media::Audio { frames: 130 },
        Media::Image {
            grid_thw: [1, 6, 8],
        },
        Media::Video {
            grid_thw: [2, 4, 8],
            second_per_grid: 1.0,
            audio_frames: None,
        },
    ];
    (ids, media)
}

/// Prompt B: a video (2 s per grid) with its 130-frame audio track interleaved, then a
/// standalone 44-frame clip.
fn prompt_b(cfg: &ThinkerConfig) -> (Vec<u32>, Vec<Media>) {
    let ids = common::prompt_b_ids(cfg);
    let media = vec![
        Media::Video {
            grid_thw: [2, 4, 8],
            second_per_grid: 2.0,
            audio_frames: Some(130),
        },
        Media::Audio { frames: 44 },
    ];
    (ids, media)
}

#[test]
fn placeholders_expand_like_the_processor() {
    let cfg = config();
    let (ids, media) = prompt_a(&cfg);
    let expanded: Vec<i64> = expand_prompt(&ids, &media, &cfg)
        .unwrap()
        .iter()
        .map(|&t| t as i64)
        .collect();
    assert_eq!(expanded, ints("ids_a", [75]));
}

#[test]
fn video_with_audio_interleaves_in_two_second_chunks_like_the_processor() {
    let cfg = config();
    let (ids, media) = prompt_b(&cfg);
    let expanded: Vec<i64> = expand_prompt(&ids, &media, &cfg)
        .unwrap()
        .iter()
        .map(|&t| t as i64)
        .collect();
    assert_eq!(expanded, ints("ids_b", [72]));
}

#[test]
fn tmrope_positions_match_get_rope_index_for_audio_image_video() {
    let cfg = config();
    let (ids, media) = prompt_a(&cfg);
    let expanded = expand_prompt(&ids, &media, &cfg).unwrap();
    let pos = rope_index(&expanded, &media, &cfg).unwrap();
    assert_eq!(pos.rows, read_positions("positions_a", 75));
    assert_eq!(vec![pos.delta], ints("rope_delta_a", [1]));
}

#[test]
fn tmrope_positions_match_get_rope_index_for_audio_in_video() {
    let cfg = config();
    let (ids, media) = prompt_b(&cfg);
    let expanded = expand_prompt(&ids, &media, &cfg).unwrap();
    let pos = rope_index(&expanded, &media, &cfg).unwrap();
    assert_eq!(pos.rows, read_positions("positions_b", 72));
    assert_eq!(vec![pos.delta], ints("rope_delta_b", [1]));
}

#[test]
fn text_only_positions_are_sequential_with_zero_delta() {
    let cfg = config();
    let pos = rope_index(&[5, 6, 7, 8], &[], &cfg).unwrap();
    for row in &pos.rows {
        assert_eq!(row, &vec![0, 1, 2, 3]);
    }
    assert_eq!(pos.delta, 0);
}

#[test]
fn placeholder_run_of_wrong_length_is_rejected() {
    let cfg = config();
    let (ids, media) = prompt_a(&cfg);
    let mut expanded = expand_prompt(&ids, &media, &cfg).unwrap();
    let first_audio = expanded
        .iter()
        .position(|&t| t == cfg.audio_token_index)
        .unwrap();
    expanded.remove(first_audio);
    let err = rope_index(&expanded, &media, &cfg).unwrap_err();
    assert!(matches!(err, Error::Layout { .. }), "{err}");
    assert!(err.to_string().contains("expected 32"), "{err}");
}

#[test]
fn media_count_or_kind_mismatch_is_rejected() {
    let cfg = config();
    let (ids, mut media) = prompt_a(&cfg);
    media.pop();
    assert!(matches!(
        expand_prompt(&ids, &media, &cfg),
        Err(Error::MediaCount { .. })
    ));
    let (ids, mut media) = prompt_a(&cfg);
    media.swap(0, 1);
    let err = expand_prompt(&ids, &media, &cfg).unwrap_err();
    assert!(err.to_string().contains("audio placeholder"), "{err}");
    let (ids, mut media) = prompt_a(&cfg);
    media.push(Media::Audio { frames: 10 });
    assert!(matches!(
        expand_prompt(&ids, &media, &cfg),
        Err(Error::MediaCount { .. })
    ));
}

#[test]
fn grid_not_divisible_by_merge_size_is_rejected() {
    let cfg = config();
    let ids = [
        cfg.vision_start_token_id,
        cfg.image_token_index,
        cfg.vision_end_token_id,
    ];
    let err = expand_prompt(
        &ids,
        &[Media::Image {
            grid_thw: [1, 3, 4],
        }],
        &cfg,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Media { kind: "image", .. }), "{err}");
}

#[test]
fn a_video_time_base_far_past_any_position_saturates_instead_of_overflowing() {
    // A frame rate from a file can make `second_per_grid` anything; the ids then lie past
    // every `max_position_embeddings`, which the decoder's length check refuses.
    let cfg = config();
    for audio_frames in [None, Some(130)] {
        let media = [Media::Video {
            grid_thw: [4, 4, 8],
            second_per_grid: 1e30,
            audio_frames,
        }];
        let ids = [
            5,
            cfg.vision_start_token_id,
            cfg.video_token_index,
            cfg.vision_end_token_id,
            6,
        ];
        let expanded = expand_prompt(&ids, &media, &cfg).unwrap();
        let pos = rope_index(&expanded, &media, &cfg).unwrap();
        assert_eq!(pos.rows[0].iter().max(), Some(&i64::MAX));
        assert!(pos.delta > 0);
    }
}

#[test]
fn position_rates_giving_less_than_one_id_per_chunk_are_refused() {
    let text = std::fs::read_to_string(reference_dir().join("omni_tiny/config.json")).unwrap();
    for (rate, chunk) in [(0.01, 2.0), (25.0, 0.01), (1e308, 1e308)] {
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json["position_id_per_seconds"] = serde_json::json!(rate);
        json["seconds_per_chunk"] = serde_json::json!(chunk);
        let err = ThinkerConfig::from_json(&json).unwrap_err();
        assert!(
            matches!(err, Error::Config { field, .. } if field.contains("position_id_per_seconds")),
            "{rate} x {chunk}: {err}"
        );
    }
}
