//! Prompts of different lengths decoded in one batch (`Qwen2Model::generate_batch`,
//! `forward_padded`) against transformers 5's left-padded batch on the tiny checkpoints
//! (fixture: `tests/reference/gen_batch_generate.py`, prompts of 27, 12 and 5 tokens).
//! Tolerances: padded logits at real positions relative error (`max|Δ| / max|ref|`) ≤ 1e-5
//! (measured 0.9e-6–1.8e-6); greedy ids identical (the fixture's smallest top-1/top-2 gap,
//! 2e-3, is far above f32 rounding); a batch's prefill states are each prompt's own exactly
//! (each prompt is prefilled alone; only the decode steps are batched).

mod common;

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use omniopsd_checkpoint::Checkpoint;
use omniopsd_core::PolicyModel;
use omniopsd_decoder::{argmax_first, Error, KvCache, Qwen2Model, TokenPrompt};

use common::{reference, rel_err, MODELS};

type B = NdArray<f32>;

fn model(dir: &str) -> Qwen2Model<B> {
    let ckpt = Checkpoint::open(&reference().join(dir)).unwrap();
    Qwen2Model::from_checkpoint(&ckpt, &Default::default()).expect("loads")
}

fn batch_fixture(name: &str) -> (Vec<f32>, Vec<usize>) {
    Checkpoint::open_file(&reference().join("qwen2_batch_ref.safetensors"))
        .unwrap()
        .read_f32(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The fixture's prompts without their padding, and the padded width.
fn prompts(key: &str) -> (Vec<TokenPrompt>, usize) {
    let (ids, shape) = batch_fixture(&format!("{key}.ids"));
    let (mask, _) = batch_fixture(&format!("{key}.mask"));
    let width = shape[1];
    let prompts = ids
        .chunks(width)
        .zip(mask.chunks(width))
        .map(|(ids, mask)| {
            let real = ids.iter().zip(mask).filter(|(_, &m)| m == 1.0);
            TokenPrompt::new(real.map(|(&t, _)| t as u32).collect())
        })
        .collect();
    (prompts, width)
}

fn rows(values: &[f32], width: usize) -> Vec<Vec<u32>> {
    values
        .chunks(width)
        .map(|r| r.iter().map(|&v| v as u32).collect())
        .collect()
}

fn greedy(m: &Qwen2Model<B>, prompts: &[&TokenPrompt], n: usize, stop: &[u32]) -> Vec<Vec<u32>> {
    m.generate_batch(prompts, n, stop, |_, _, logits| {
        Ok::<_, Error>(argmax_first(logits))
    })
    .unwrap()
}

#[test]
fn padded_forward_matches_transformers_at_every_real_position() {
    for (key, dir) in MODELS {
        let m = model(dir);
        let (ids, [n, t]) = {
            let (v, s) = batch_fixture(&format!("{key}.ids"));
            (v, [s[0], s[1]])
        };
        let (mask, _) = batch_fixture(&format!("{key}.mask"));
        let (reference, shape) = batch_fixture(&format!("{key}.logits"));
        let vocab = shape[2];
        let pads: Vec<usize> = mask
            .chunks(t)
            .map(|r| r.iter().take_while(|&&v| v == 0.0).count())
            .collect();
        // Padding at position 0 (any value: it is masked), tokens from 0 as `generate` has them.
        let mut positions = Vec::with_capacity(n * t);
        for &pad in &pads {
            positions.extend((0..t).map(|i| i.saturating_sub(pad) as i64));
        }
        let positions: Vec<i64> = positions.iter().cycle().take(3 * n * t).copied().collect();
        let device = Default::default();
        let ids: Vec<i64> = ids.iter().map(|&v| v as i64).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, t]), &device);
        let positions =
            Tensor::<B, 3, Int>::from_data(TensorData::new(positions, [3, n, t]), &device);
        let mut cache = KvCache::new();
        let hidden = m.forward_padded(m.embed(ids), positions, Some(&mut cache), &pads);
        let logits = m.logits(hidden).into_data().to_vec::<f32>().unwrap();
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for (b, &pad) in pads.iter().enumerate() {
            let real = (b * t + pad) * vocab..(b + 1) * t * vocab;
            ours.extend_from_slice(&logits[real.clone()]);
            theirs.extend_from_slice(&reference[real]);
        }
        let err = rel_err(&ours, &theirs);
        eprintln!("{dir} padded batch logits rel err {err:e}");
        assert!(err <= 1e-5, "{dir}: {err}");
        assert!(
            logits.iter().all(|v| v.is_finite()),
            "{dir}: padding rows stay finite"
        );
    }
}

#[test]
fn a_batch_of_different_lengths_decodes_as_transformers_and_as_each_prompt_alone() {
    for (key, dir) in MODELS {
        let m = model(dir);
        let (prompts, _) = prompts(key);
        let (gen, shape) = batch_fixture(&format!("{key}.gen"));
        let expected = rows(&gen, shape[1]);
        let refs: Vec<&TokenPrompt> = prompts.iter().collect();
        assert_eq!(greedy(&m, &refs, 64, &[]), expected, "{dir}: the batch");
        for (p, e) in prompts.iter().zip(&expected) {
            assert_eq!(
                &m.generate_greedy(p, 64, true, &[]).unwrap(),
                e,
                "{dir}: alone"
            );
        }
        // Order within the batch does not matter.
        let reversed: Vec<&TokenPrompt> = prompts.iter().rev().collect();
        let mut back = greedy(&m, &reversed, 64, &[]);
        back.reverse();
        assert_eq!(back, expected, "{dir}: reversed batch");
    }
}

#[test]
fn a_sequence_that_stops_leaves_the_batch_and_the_others_continue_unchanged() {
    let (key, dir) = MODELS[0];
    let m = model(dir);
    let (prompts, _) = prompts(key);
    let (gen, shape) = batch_fixture(&format!("{key}.gen"));
    let full = rows(&gen, shape[1]);
    // A stop token the shortest prompt's answer meets early, so its sequence leaves first.
    let stop = full[2][3];
    let refs: Vec<&TokenPrompt> = prompts.iter().collect();
    let got = greedy(&m, &refs, 64, &[stop]);
    for (row, (g, f)) in got.iter().zip(&full).enumerate() {
        let end = f.iter().position(|&t| t == stop).map_or(f.len(), |i| i + 1);
        assert_eq!(g, &f[..end], "{dir}: row {row}");
    }
    assert!(got[2].len() <= 4, "the shortest answer stopped early");
    assert!(got.iter().any(|g| g.len() > got[2].len()), "others went on");
}

#[test]
fn a_batch_prefill_gives_each_prompt_exactly_its_own_last_state() {
    for (key, dir) in MODELS {
        let m = model(dir);
        let (prompts, _) = prompts(key);
        let refs: Vec<&TokenPrompt> = prompts.iter().collect();
        let (last, _) = m.prefill_batch(&refs);
        let last = last.into_data().to_vec::<f32>().unwrap();
        let h = last.len() / prompts.len();
        for (b, p) in prompts.iter().enumerate() {
            let (alone, _) = PolicyModel::prefill(&m, p, 1);
            let alone = alone.into_data().to_vec::<f32>().unwrap();
            assert_eq!(&last[b * h..(b + 1) * h], &alone[..], "{dir} row {b}");
        }
    }
}

#[test]
fn a_bad_prompt_in_a_batch_is_an_error_before_any_work() {
    let m = model(MODELS[0].1);
    let good = TokenPrompt::new(vec![1, 2, 3]);
    let empty = TokenPrompt::new(vec![]);
    let err = m
        .generate_batch(&[&good, &empty], 4, &[], |_, _, l| {
            Ok::<_, Error>(argmax_first(l))
        })
        .unwrap_err();
    assert!(err.to_string().contains("no tokens"), "{err}");
    // An empty batch, or no tokens asked, is no work and no error.
    assert_eq!(greedy(&m, &[], 4, &[]), Vec::<Vec<u32>>::new());
    assert_eq!(greedy(&m, &[&good], 0, &[]), vec![Vec::<u32>::new()]);
}
