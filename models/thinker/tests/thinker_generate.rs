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
