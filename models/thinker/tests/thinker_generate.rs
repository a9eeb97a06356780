//! Thinker greedy generation with audio + video equals transformers' `generate` (64 tokens,
//! fixture from `tests/reference/gen_omni_generate.py`), with the KV cache and without.
//!
//! Prompt A has one near-tie on the way (top-2 logit gap 3.6e-6 at step 62, our logit error
//! there 7e-7), so a backend with another summation order could flip its last two ids; the
//! fixture stores the smallest gap (`min_gap_a`, `min_gap_b`) to tell that from a real bug.

mod common;

use common::*;
use omniopsd_thinker::{MediaInput, Thinker, ThinkerConfig};

/// Generates 64 tokens greedily with and without the cache and checks both against `name`.
fn check(build: fn(&ThinkerConfig) -> (Vec<u32>, Vec<MediaInput>), name: &str) {
    let model: Thinker<B> = thinker();
    let (ids, media) = build(&model.config);
    let prompt = model.prompt(&ids, &media).unwrap();
    let expected: Vec<u32> = read("omni_generate.safetensors", name, [64])
        .iter()
        .map(|&v| v as u32)
        .collect();
    for use_cache in [true, false] {
        let ids = model
            .decoder
            .generate_greedy(&prompt, 64, use_cache, &[])
            .unwrap();
        assert_eq!(ids, expected, "{name}, use_cache = {use_cache}");
    }
}

#[test]
fn greedy_64_tokens_with_audio_image_and_video_equal_transformers_generate() {
    check(prompt_a, "gen_a");
}

#[test]
fn greedy_64_tokens_with_audio_interleaved_in_video_equal_transformers_generate() {
    check(prompt_b, "gen_b");
}

/// Prompts A and B (audio, image and video; audio interleaved in video: media rows inserted,
/// M-RoPE positions with their own offsets, 10+ tokens apart in length) decoded in one
/// left-padded batch give each its own transformers `generate` ids.
#[test]
fn a_batch_of_two_media_prompts_equals_each_prompts_transformers_generate() {
    let model: Thinker<B> = thinker();
    let mut prompts = Vec::new();
    let mut expected = Vec::new();
    type Build = fn(&ThinkerConfig) -> (Vec<u32>, Vec<MediaInput>);
    for (build, name) in [(prompt_a as Build, "gen_a"), (prompt_b, "gen_b")] {
        let (ids, media) = build(&model.config);
        prompts.push(model.prompt(&ids, &media).unwrap());
        let gen: Vec<u32> = read("omni_generate.safetensors", name, [64])
            .iter()
            .map(|&v| v as u32)
            .collect();
        expected.push(gen);
    }
    assert_ne!(
        prompts[0].ids.len(),
        prompts[1].ids.len(),
        "the batch needs padding"
    );
    for order in [[0, 1], [1, 0]] {
        let batch: Vec<_> = order.iter().map(|&i| &prompts[i]).collect();
        let got = model
            .decoder
            .generate_batch(&batch, 64, &[], |_, _, logits| {
                Ok::<_, omniopsd_decoder::Error>(omniopsd_decoder::argmax_first(logits))
            })
            .unwrap();
        for (row, &i) in order.iter().enumerate() {
            assert_eq!(got[row], expected[i], "prompt {i} in batch order {order:?}");
        }
    }
}
