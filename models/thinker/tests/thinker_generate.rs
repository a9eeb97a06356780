//! Thinker greedy generation with audio + video equals transformers' `generate` (64 tokens,
//! fixture from `tests/reference/gen_omni_generate.py`), with the KV cache and without.

mod common;

use common::*;

fn generated(name: &str) -> Vec<u32> {
    read("omni_generate.safetensors", name, [64])
        .iter()
        .map(|&v| v as u32)
        .collect()
}

#[test]
fn greedy_64_tokens_with_audio_image_and_video_equal_transformers_generate() {
    let model = thinker();
    let (ids, media) = prompt_a(&model.config);
    let prompt = model.prompt(&ids, &media).unwrap();
    let expected = generated("gen_a");
    let cached = model
        .decoder
        .generate_greedy(&prompt, 64, true, &[])
        .unwrap();
    assert_eq!(cached, expected, "with KV cache");
    let uncached = model
        .decoder
        .generate_greedy(&prompt, 64, false, &[])
        .unwrap();
    assert_eq!(uncached, expected, "without cache");
}

#[test]
fn greedy_64_tokens_with_audio_interleaved_in_video_equal_transformers_generate() {
    let model = thinker();
    let (ids, media) = prompt_b(&model.config);
    let prompt = model.prompt(&ids, &media).unwrap();
    let expected = generated("gen_b");
    let cached = model
        .decoder
        .generate_greedy(&prompt, 64, true, &[])
        .unwrap();
    assert_eq!(cached, expected, "with KV cache");
    let uncached = model
        .decoder
        .generate_greedy(&prompt, 64, false, &[])
        .unwrap();
    assert_eq!(uncached, expected, "without cache");
}
