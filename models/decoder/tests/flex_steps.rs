//! Decode steps on Flex, where a rollout group's few rows go through the kernels of
//! `omniopsd_backends::rows` (the projections and the LM head), against transformers' logits
//! for the same positions (`tests/reference/gen_qwen2.py`). Tolerance as in `parity.rs`:
//! `max|Δ| / max|ref|` ≤ 1e-4. Run with `--features flex`.
#![cfg(feature = "flex")]

mod common;

use burn::tensor::{Int, Tensor, TensorData};
use omniopsd_checkpoint::Checkpoint;
use omniopsd_core::PolicyModel;
use omniopsd_decoder::{Qwen2Model, TokenPrompt};

use common::{fixture, ids, reference, rel_err, MODELS};

type F = burn::backend::Flex<f32>;

/// For a group of `g` copies of each fixture prompt: prefill all but its last `steps` tokens,
/// then decode those tokens one step at a time; every step's `step_logits` (all `g` rows)
/// must equal the reference logits at that position.
#[test]
fn group_decode_steps_match_transformers_logits() {
    let device = Default::default();
    for (key, dir) in MODELS {
        let ckpt = Checkpoint::open(&reference().join(dir)).unwrap();
        let model = Qwen2Model::<F>::from_checkpoint(&ckpt, &device).expect("loads");
        for prompt in ["prompt0", "prompt1"] {
            let ids = ids(&format!("{key}.{prompt}.ids"));
            let want = fixture(&format!("{key}.{prompt}.logits")).0;
            let vocab = want.len() / ids.len();
            let steps = 4.min(ids.len() - 1);
            let start = ids.len() - steps;
            for g in [2, 4, 8] {
                let (mut hidden, mut cache) =
                    model.prefill(&TokenPrompt::new(ids[..start].to_vec()), g);
                for position in start - 1..ids.len() {
                    let got = model
                        .step_logits(hidden.clone())
                        .into_data()
                        .to_vec::<f32>()
                        .unwrap();
                    let row = &want[position * vocab..(position + 1) * vocab];
                    for (r, logits) in got.chunks(vocab).enumerate() {
                        let err = rel_err(logits, row);
                        assert!(
                            err <= 1e-4,
                            "{dir} {prompt} g={g} position {position} row {r}: rel err {err:e}"
                        );
                    }
                    if position + 1 < ids.len() {
                        let next = vec![i64::from(ids[position + 1]); g];
                        let tokens =
                            Tensor::<F, 1, Int>::from_data(TensorData::new(next, [g]), &device);
                        hidden = model.decode(tokens, &mut cache);
                    }
                }
            }
        }
    }
}
