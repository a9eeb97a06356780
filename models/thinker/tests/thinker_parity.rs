//! Thinker logits parity with transformers 5.24 (`Qwen2_5OmniThinkerForConditionalGeneration`)
//! on the tiny checkpoint of `tests/reference/gen_omni.py`, from raw media (waveforms, RGB
//! frames) through the Rust feature extractor, processors, towers, embedding merge, TMRoPE and
//! decoder. Tolerance: relative error (max |Δ| / max |ref|) ≤ 1e-4 in f32. Also checks the
//! `PolicyModel` paths agree (cached decode = teacher forcing = full forward).

use burn::tensor::{Int, Tensor, TensorData};
use omniopsd_core::PolicyModel;
use omniopsd_thinker::ModelError;

mod common;

use common::*;

#[test]
fn thinker_logits_match_transformers_with_audio_image_and_video() {
    let model = thinker();
    let (ids, media) = prompt_a(&model.config);
    let prompt = model.prompt(&ids, &media).expect("prompt");
    assert_eq!(prompt.ids.len(), 75);
    let hidden = model.forward(&prompt).reshape([75, 64]);
    let err = rel_err(
        &logits(&model, hidden),
        &read("omni_thinker.safetensors", "logits_a", [75, 256]),
    );
    eprintln!("thinker logits (audio+image+video) rel err: {err:e}");
    assert!(err <= 1e-4, "rel err {err}");
}

#[test]
fn thinker_logits_match_transformers_with_audio_interleaved_in_video() {
    let model = thinker();
    let (ids, media) = prompt_b(&model.config);
    let prompt = model.prompt(&ids, &media).expect("prompt");
    assert_eq!(prompt.ids.len(), 72);
    let hidden = model.forward(&prompt).reshape([72, 64]);
    let err = rel_err(
        &logits(&model, hidden),
        &read("omni_thinker.safetensors", "logits_b", [72, 256]),
    );
    eprintln!("thinker logits (audio in video) rel err: {err:e}");
    assert!(err <= 1e-4, "rel err {err}");
}

#[test]
fn cached_decode_and_teacher_forcing_reproduce_the_reference_logits() {
    let model = thinker();
    let (mut ids, media) = prompt_a(&model.config);
    let response = ids.split_off(ids.len() - 3);
    let prompt = model.prompt(&ids, &media).unwrap();
    let reference = read("omni_thinker.safetensors", "logits_a", [75, 256]);
    let tail = &reference[71 * 256..74 * 256];

    let resp = Tensor::<B, 2, Int>::from_data(
        TensorData::new(
            response.iter().map(|&t| t as i64).collect::<Vec<_>>(),
            [1, 3],
        ),
        &Default::default(),
    );
    let forced = model.response_hidden(&prompt, resp.repeat_dim(0, 2));
    let forced0 = forced.clone().narrow(0, 0, 1).reshape([3, 64]);
    let err = rel_err(&logits(&model, forced0), tail);
    eprintln!("teacher-forced logits rel err: {err:e}");
    assert!(err <= 1e-4, "teacher forcing rel err {err}");

    let (first, mut cache) = model.prefill(&prompt, 2);
    let mut rows = vec![first];
    for &t in &response[..2] {
        let tok = Tensor::<B, 1, Int>::from_data(
            TensorData::new(vec![t as i64; 2], [2]),
            &Default::default(),
        );
        rows.push(model.decode(tok, &mut cache));
    }
    let decoded: Tensor<B, 3> = Tensor::stack(rows, 1);
    let err = rel_err(
        &decoded.into_data().to_vec::<f32>().unwrap(),
        &forced.into_data().to_vec::<f32>().unwrap(),
    );
    eprintln!("cached decode vs teacher forcing hidden rel err: {err:e}");
    assert!(err <= 1e-4, "decode vs forcing rel err {err}");
}

#[test]
fn prompt_with_token_outside_vocabulary_is_rejected() {
    let model = thinker();
    let err = model.prompt(&[1, 2, 9999], &[]).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::TokenId {
                index: 2,
                id: 9999,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn prompt_with_missing_media_is_rejected() {
    let model = thinker();
    let (ids, mut media) = prompt_a(&model.config);
    media.pop();
    assert!(model.prompt(&ids, &media).is_err());
}
