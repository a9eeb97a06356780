//! Rollouts through the toy model: determinism, stop tokens and masks, and agreement of the
//! KV-cache decode path with teacher forcing.

mod common;

use burn::tensor::{activation::log_softmax, Int, Tensor, TensorData};
use common::{ints, values, Cpu, Toy};
use omniopsd_core::rollout::{rollout, RolloutConfig, RolloutError};
use omniopsd_core::sampling::{SamplingConfig, SamplingError};
use omniopsd_core::PolicyModel;
use proptest::prelude::*;

const VOCAB: usize = 12;
const HIDDEN: usize = 8;

fn toy() -> Toy<Cpu> {
    Toy::new(VOCAB, HIDDEN, 42, &Default::default())
}

fn config(g: usize, max_new: usize, stop: Vec<u32>) -> RolloutConfig {
    RolloutConfig {
        sampling: SamplingConfig::default(),
        samples_per_prompt: g,
        max_new_tokens: max_new,
        stop_tokens: stop,
        pad_token: 0,
        logp_temperature: 1.0,
    }
}

fn prompt() -> Vec<u32> {
    vec![3, 1, 4, 1, 5]
}

/// Teacher-forced log-probabilities `[G, R, V]` of the response at temperature `tau`.
fn forced_logp(
    model: &Toy<Cpu>,
    prompt: &Vec<u32>,
    tokens: Tensor<Cpu, 2, Int>,
    tau: f32,
) -> Vec<f32> {
    let hidden = model.response_hidden(prompt, tokens);
    let logits = hidden.matmul(model.lm_head().transpose().unsqueeze_dim::<3>(0));
    values(log_softmax(logits.div_scalar(tau), 2))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn same_seed_gives_same_rollout(seed in any::<u64>(), stream in any::<u64>()) {
        let model = toy();
        let cfg = config(3, 6, vec![]);
        let a = rollout(&model, &prompt(), &cfg, seed, stream).unwrap();
        let b = rollout(&model, &prompt(), &cfg, seed, stream).unwrap();
        prop_assert_eq!(&a.responses, &b.responses);
        prop_assert_eq!(ints(a.tokens), ints(b.tokens));
        prop_assert_eq!(values(a.behaviour_logp), values(b.behaviour_logp));
    }

    #[test]
    fn stop_token_ends_sequence_and_mask_covers_exactly_through_it(seed in any::<u64>()) {
        let model = toy();
        let stop = vec![2u32, 5, 7, 9];
        let max_new = 8;
        let cfg = RolloutConfig { pad_token: 11, ..config(4, max_new, stop.clone()) };
        let out = rollout(&model, &prompt(), &cfg, seed, 0).unwrap();
        let r = out.width();
        prop_assert_eq!(r, out.responses.iter().map(Vec::len).max().unwrap());
        let tokens = ints(out.tokens);
        let mask = values(out.mask);
        let logp = values(out.behaviour_logp);
        for (g, resp) in out.responses.iter().enumerate() {
            let first_stop = resp.iter().position(|t| stop.contains(t));
            match first_stop {
                Some(i) => {
                    prop_assert_eq!(i + 1, resp.len(), "sequence continues after its stop token");
                    prop_assert!(out.stopped[g]);
                }
                None => {
                    prop_assert_eq!(resp.len(), max_new);
                    prop_assert!(!out.stopped[g]);
                }
            }
            for t in 0..r {
                let valid = t < resp.len();
                prop_assert_eq!(mask[g * r + t], if valid { 1.0 } else { 0.0 });
                if valid {
                    prop_assert_eq!(tokens[g * r + t], i64::from(resp[t]));
                    prop_assert!(logp[g * r + t] < 0.0);
                } else {
                    prop_assert_eq!(tokens[g * r + t], 11);
                    prop_assert_eq!(logp[g * r + t], 0.0);
                }
            }
        }
    }
}

#[test]
fn different_seeds_give_different_rollouts() {
    let model = toy();
    let cfg = config(4, 8, vec![]);
    let base = rollout(&model, &prompt(), &cfg, 1, 0).unwrap().responses;
    let other_seed = rollout(&model, &prompt(), &cfg, 2, 0).unwrap().responses;
    let other_stream = rollout(&model, &prompt(), &cfg, 1, 1).unwrap().responses;
    assert_ne!(base, other_seed);
    assert_ne!(base, other_stream);
    // The G samples of one rollout differ from each other too.
    assert!(base.iter().any(|r| *r != base[0]));
}

#[test]
fn each_sequence_depends_only_on_its_own_row_not_on_g() {
    // Counter-based draws: row g uses uniform(seed, stream, g, t) whatever G is.
    let model = toy();
    let four = rollout(&model, &prompt(), &config(4, 6, vec![2]), 5, 1).unwrap();
    let two = rollout(&model, &prompt(), &config(2, 6, vec![2]), 5, 1).unwrap();
    assert_eq!(&four.responses[..2], &two.responses[..]);
}

#[test]
fn rollout_returns_g_rows_of_at_most_max_new_tokens() {
    let model = toy();
    let out = rollout(&model, &prompt(), &config(5, 7, vec![]), 3, 0).unwrap();
    assert_eq!(out.tokens.dims(), [5, 7]);
    assert_eq!(out.mask.dims(), [5, 7]);
    assert_eq!(out.behaviour_logp.dims(), [5, 7]);
    assert_eq!(out.valid_tokens(), 35);
    assert!(out.stopped.iter().all(|s| !s));
}

#[test]
fn kv_cache_decode_equals_teacher_forced_hidden_states() {
    let model = toy();
    let p = prompt();
    let g = 3;
    let response: Vec<i64> = vec![1, 7, 2, 9, 0, 4, 4, 6, 11, 3, 5, 8, 2, 2, 10];
    let r = response.len() / g;
    let tokens = Tensor::<Cpu, 2, Int>::from_data(
        TensorData::new(response.clone(), [g, r]),
        &Default::default(),
    );
    let forced = values(model.response_hidden(&p, tokens));

    let (mut hidden, mut cache) = model.prefill(&p, g);
    let mut decoded = vec![0.0f32; g * r * HIDDEN];
    for t in 0..r {
        let h = values(hidden.clone());
        for row in 0..g {
            let dst = (row * r + t) * HIDDEN;
            decoded[dst..dst + HIDDEN].copy_from_slice(&h[row * HIDDEN..(row + 1) * HIDDEN]);
        }
        let step: Vec<i64> = (0..g).map(|row| response[row * r + t]).collect();
        let step =
            Tensor::<Cpu, 1, Int>::from_data(TensorData::new(step, [g]), &Default::default());
        hidden = model.decode(step, &mut cache);
    }
    let max_diff = forced
        .iter()
        .zip(&decoded)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        max_diff < 1e-5,
        "decode vs teacher forcing: max |diff| = {max_diff}"
    );
}

#[test]
fn behaviour_logp_equals_teacher_forced_log_softmax_at_logp_temperature() {
    let model = toy();
    let p = prompt();
    for tau in [1.0f32, 0.7] {
        let cfg = RolloutConfig {
            logp_temperature: tau,
            sampling: SamplingConfig {
                temperature: 1.3,
                top_k: Some(6),
                top_p: 0.9,
            },
            ..config(4, 6, vec![3])
        };
        let out = rollout(&model, &p, &cfg, 9, 0).unwrap();
        let r = out.width();
        let logp = forced_logp(&model, &p, out.tokens.clone(), tau);
        let behaviour = values(out.behaviour_logp.clone());
        let mask = values(out.mask.clone());
        for (g, resp) in out.responses.iter().enumerate() {
            for (t, tok) in resp.iter().enumerate() {
                let want = logp[(g * r + t) * VOCAB + *tok as usize];
                let got = behaviour[g * r + t];
                assert!(
                    (want - got).abs() < 1e-5,
                    "τ={tau} g={g} t={t}: {got} vs {want}"
                );
                assert_eq!(mask[g * r + t], 1.0);
            }
        }
    }
}

#[test]
fn greedy_rollout_follows_teacher_forced_argmax() {
    let model = toy();
    let p = prompt();
    let cfg = RolloutConfig {
        sampling: SamplingConfig {
            temperature: 0.0,
            top_k: None,
            top_p: 1.0,
        },
        ..config(2, 8, vec![])
    };
    let out = rollout(&model, &p, &cfg, 0, 0).unwrap();
    assert_eq!(out.responses[0], out.responses[1], "greedy rows must agree");
    let logp = forced_logp(&model, &p, out.tokens.clone(), 1.0);
    let r = out.width();
    for t in 0..r {
        let row = &logp[t * VOCAB..(t + 1) * VOCAB];
        let best = (0..VOCAB).fold(0, |b, i| if row[i] > row[b] { i } else { b });
        assert_eq!(out.responses[0][t] as usize, best, "position {t}");
    }
    assert!(out.sample_logp.iter().flatten().all(|l| *l == 0.0));
}

#[test]
fn nan_logits_are_an_error_naming_row_and_position() {
    let model = toy();
    let device = Default::default();
    let mut poisoned = toy();
    poisoned.head =
        burn::module::Param::from_tensor(Tensor::full([VOCAB, HIDDEN], f32::NAN, &device));
    let err = rollout(&poisoned, &prompt(), &config(2, 4, vec![]), 0, 0).unwrap_err();
    match &err {
        RolloutError::Logits {
            row,
            position,
            source,
        } => {
            assert_eq!((*row, *position), (0, 0));
            assert!(matches!(source, SamplingError::NonFiniteLogit { .. }));
        }
        e => panic!("unexpected {e:?}"),
    }
    assert!(
        err.to_string().contains("sample 0, response position 0"),
        "{err}"
    );
    drop(model);
}

#[test]
fn bad_rollout_config_is_rejected_with_the_field_name() {
    let model = toy();
    let field = |cfg: RolloutConfig| match rollout(&model, &prompt(), &cfg, 0, 0).unwrap_err() {
        RolloutError::Config { field, .. } => field,
        e => panic!("unexpected {e:?}"),
    };
    assert_eq!(field(config(0, 4, vec![])), "samples_per_prompt");
    let msg = config(2, 0, vec![]).validate().unwrap_err().to_string();
    assert!(
        msg.contains("max_new_tokens") && msg.contains("found 0"),
        "{msg}"
    );
    assert_eq!(field(config(2, 0, vec![])), "max_new_tokens");
    assert_eq!(
        field(RolloutConfig {
            logp_temperature: 0.0,
            ..config(2, 4, vec![])
        }),
        "logp_temperature"
    );
    let bad_sampling = RolloutConfig {
        sampling: SamplingConfig {
            temperature: 1.0,
            top_k: Some(0),
            top_p: 1.0,
        },
        ..config(2, 4, vec![])
    };
    assert!(matches!(
        rollout(&model, &prompt(), &bad_sampling, 0, 0).unwrap_err(),
        RolloutError::Sampling(SamplingError::Config { field: "top_k", .. })
    ));
}
