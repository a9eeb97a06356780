//! Laws of the logits-level divergences (`omniopsd_core::divergence`), checked with proptest on
//! NdArray: KL ≥ 0 and zero iff the distributions are equal, JSD bounds and symmetry, the
//! β → 0 / β → 1 limits, masking, top-k with k = V, temperature, clip and config validation.

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use omniopsd_core::divergence::{
    loss_from_logits, per_token_divergence, reduce, sampled_token_loss, Divergence, LossConfig,
    LossConfigError, Reduction, TopK,
};
use proptest::prelude::*;

type Cpu = NdArray<f32>;

fn t3(data: &[f32], shape: [usize; 3]) -> Tensor<Cpu, 3> {
    Tensor::from_data(TensorData::new(data.to_vec(), shape), &Default::default())
}

fn t2(data: &[f32], shape: [usize; 2]) -> Tensor<Cpu, 2> {
    Tensor::from_data(TensorData::new(data.to_vec(), shape), &Default::default())
}

fn values<const D: usize>(x: Tensor<Cpu, D>) -> Vec<f32> {
    x.into_data().to_vec().expect("f32 tensor")
}

fn cfg(divergence: Divergence) -> LossConfig {
    LossConfig {
        divergence,
        ..LossConfig::default()
    }
}

fn per_token(s: &[f32], t: &[f32], shape: [usize; 3], cfg: &LossConfig) -> Vec<f32> {
    values(per_token_divergence(t3(s, shape), t3(t, shape), cfg))
}

/// `(shape, student logits, teacher logits)` with `[N, R, V]` small and logits in ±`scale`.
fn logits_pair(scale: f32) -> impl Strategy<Value = ([usize; 3], Vec<f32>, Vec<f32>)> {
    (1usize..3, 1usize..4, 2usize..9).prop_flat_map(move |(n, r, v)| {
        let len = n * r * v;
        (
            Just([n, r, v]),
            prop::collection::vec(-scale..scale, len),
            prop::collection::vec(-scale..scale, len),
        )
    })
}

fn softmax_rows(x: &[f32], v: usize) -> Vec<f64> {
    x.chunks(v)
        .flat_map(|row| {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let exps: Vec<f64> = row.iter().map(|&z| (z as f64 - max).exp()).collect();
            let sum: f64 = exps.iter().sum();
            exps.into_iter().map(move |e| e / sum)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn kl_is_nonnegative_and_zero_exactly_when_distributions_are_equal(
        (shape, s, t) in logits_pair(4.0),
        shift in -3.0f32..3.0,
    ) {
        let v = shape[2];
        let p = softmax_rows(&s, v);
        let q = softmax_rows(&t, v);
        for divergence in [Divergence::ForwardKl, Divergence::ReverseKl] {
            let c = cfg(divergence);
            let d = per_token(&s, &t, shape, &c);
            for (row, &value) in d.iter().enumerate() {
                prop_assert!(value >= -1e-6, "{divergence:?} = {value} < 0");
                let gap = (0..v).map(|i| (p[row * v + i] - q[row * v + i]).abs()).fold(0.0, f64::max);
                if gap > 0.05 {
                    prop_assert!(value > 1e-5, "{divergence:?} = {value} for distributions {gap} apart");
                }
            }
            // Same distribution from shifted logits: divergence 0.
            let shifted: Vec<f32> = s.iter().map(|x| x + shift).collect();
            for value in per_token(&s, &shifted, shape, &c) {
                prop_assert!(value.abs() <= 1e-5, "{divergence:?}(p, p) = {value}");
            }
        }
    }

    #[test]
    fn jsd_lies_in_zero_to_binary_entropy_of_beta_and_is_symmetric_at_one_half(
        (shape, s, t) in logits_pair(6.0),
        beta in 0.01f32..0.99,
    ) {
        let b = beta as f64;
        let bound = -(b * b.ln() + (1.0 - b) * (1.0 - b).ln());
        prop_assert!(bound <= std::f64::consts::LN_2 + 1e-12);
        for value in per_token(&s, &t, shape, &cfg(Divergence::Jsd { beta })) {
            prop_assert!(value >= -1e-6 && (value as f64) <= bound + 1e-5, "JSD_{beta} = {value} outside [0, {bound}]");
        }
        let half = cfg(Divergence::Jsd { beta: 0.5 });
        let st = per_token(&s, &t, shape, &half);
        let ts = per_token(&t, &s, shape, &half);
        for (a, b) in st.iter().zip(&ts) {
            prop_assert!((a - b).abs() <= 2e-6, "JSD_0.5 asymmetric: {a} vs {b}");
        }
    }

    #[test]
    fn jsd_scaled_by_beta_tends_to_the_kl_endpoints(
        (shape, s, t) in logits_pair(1.5),
    ) {
        let forward = per_token(&s, &t, shape, &cfg(Divergence::ForwardKl));
        let reverse = per_token(&s, &t, shape, &cfg(Divergence::ReverseKl));
        // The special-cased endpoints are exactly the KL divergences.
        prop_assert_eq!(&per_token(&s, &t, shape, &cfg(Divergence::Jsd { beta: 0.0 })), &forward);
        prop_assert_eq!(&per_token(&s, &t, shape, &cfg(Divergence::Jsd { beta: 1.0 })), &reverse);
        // JSD_β / β → KL(T‖S) as β → 0 and JSD_β / (1 − β) → KL(S‖T) as β → 1, with an O(β) gap.
        let gap = |beta: f32, towards_zero: bool| -> f32 {
            let jsd = per_token(&s, &t, shape, &cfg(Divergence::Jsd { beta }));
            let (scale, target) = if towards_zero { (beta, &forward) } else { (1.0 - beta, &reverse) };
            jsd.iter().zip(target).map(|(j, k)| (j / scale - k).abs()).fold(0.0, f32::max)
        };
        for towards_zero in [true, false] {
            let at = |distance: f32| if towards_zero { gap(distance, true) } else { gap(1.0 - distance, false) };
            let (coarse, fine, finest) = (at(0.1), at(0.01), at(0.001));
            let kl_max = if towards_zero { &forward } else { &reverse }.iter().cloned().fold(0.0, f32::max);
            // Linear convergence: each tenfold step towards the endpoint shrinks the gap about tenfold.
            prop_assert!(fine <= 0.25 * coarse + 2e-3, "gap does not shrink: {coarse} -> {fine}");
            prop_assert!(finest <= 0.25 * fine + 2e-3, "gap does not shrink: {fine} -> {finest}");
            prop_assert!(finest <= 0.02 * kl_max.max(1.0) + 2e-3, "gap {finest} at 0.1% from the endpoint, KL {kl_max}");
        }
    }

    #[test]
    fn padding_content_never_changes_the_loss(
        (shape, s, t) in logits_pair(4.0),
        junk in prop::collection::vec(-50.0f32..50.0, 64),
        lengths in prop::collection::vec(0usize..4, 2),
        kind in 0usize..4,
        sequence in any::<bool>(),
    ) {
        let [n, r, v] = shape;
        let mask: Vec<f32> = (0..n * r).map(|i| if i % r < lengths[i / r % lengths.len()].min(r) { 1.0 } else { 0.0 }).collect();
        let scramble = |x: &[f32], nan: bool| -> Vec<f32> {
            x.iter().enumerate().map(|(i, &val)| {
                if mask[i / v] > 0.5 { val } else if nan { f32::NAN } else { junk[i % junk.len()] }
            }).collect()
        };
        let divergence = [Divergence::ForwardKl, Divergence::ReverseKl, Divergence::Jsd { beta: 0.3 }, Divergence::SampledReverseKl { ratio_clip: 2.0 }][kind];
        let c = LossConfig {
            divergence,
            reduction: if sequence { Reduction::Sequence } else { Reduction::Token },
            ..LossConfig::default()
        };
        let tokens: Vec<i64> = (0..n * r).map(|i| (i % v) as i64).collect();
        let behaviour = vec![-1.0f32; n * r];
        let loss = |s: &[f32], t: &[f32], tok: &[i64], beh: &[f32]| -> f32 {
            let device = Default::default();
            values(loss_from_logits(
                t3(s, shape),
                t3(t, shape),
                Tensor::<Cpu, 2, Int>::from_data(TensorData::new(tok.to_vec(), [n, r]), &device),
                t2(&mask, [n, r]),
                t2(beh, [n, r]),
                &c,
            ))[0]
        };
        let clean = loss(&s, &t, &tokens, &behaviour);
        prop_assert!(clean.is_finite());
        let padded_tokens: Vec<i64> = tokens.iter().enumerate().map(|(i, &x)| if mask[i] > 0.5 { x } else { 10_000 }).collect();
        let padded_behaviour: Vec<f32> = behaviour.iter().enumerate().map(|(i, &x)| if mask[i] > 0.5 { x } else { f32::NAN }).collect();
        prop_assert_eq!(loss(&scramble(&s, false), &scramble(&t, false), &padded_tokens, &padded_behaviour), clean);
        prop_assert_eq!(loss(&scramble(&s, true), &scramble(&t, true), &padded_tokens, &padded_behaviour), clean);
    }

    #[test]
    fn top_k_with_k_at_least_vocabulary_equals_the_full_divergence(
        (shape, s, t) in logits_pair(4.0),
        tail in any::<bool>(),
        extra in 0usize..3,
        kind in 0usize..3,
    ) {
        let divergence = [Divergence::ForwardKl, Divergence::ReverseKl, Divergence::Jsd { beta: 0.7 }][kind];
        let full = per_token(&s, &t, shape, &cfg(divergence));
        let top = per_token(&s, &t, shape, &LossConfig { top_k: Some(TopK { k: shape[2] + extra, tail }), ..cfg(divergence) });
        for (a, b) in full.iter().zip(&top) {
            prop_assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn loss_temperature_divides_both_logits(
        (shape, s, t) in logits_pair(4.0),
        tau in 0.3f32..3.0,
    ) {
        let c = LossConfig { temperature: tau, ..LossConfig::default() };
        let scaled = |x: &[f32]| x.iter().map(|z| z / tau).collect::<Vec<_>>();
        let a = per_token(&s, &t, shape, &c);
        let b = per_token(&scaled(&s), &scaled(&t), shape, &LossConfig::default());
        for (x, y) in a.iter().zip(&b) {
            prop_assert!((x - y).abs() <= 1e-5, "{x} vs {y}");
        }
    }

    #[test]
    fn point_wise_clip_bounds_the_divergence_and_is_inactive_when_large(
        (shape, s, t) in logits_pair(6.0),
        clip in 0.01f32..0.2,
    ) {
        let v = shape[2] as f32;
        for divergence in [Divergence::ForwardKl, Divergence::ReverseKl] {
            let clipped = per_token(&s, &t, shape, &LossConfig { kl_clip: Some(clip), ..cfg(divergence) });
            for value in &clipped {
                prop_assert!(value.abs() <= clip * v + 1e-5, "{value} beyond V·c");
            }
            let loose = per_token(&s, &t, shape, &LossConfig { kl_clip: Some(1e6), ..cfg(divergence) });
            prop_assert_eq!(loose, per_token(&s, &t, shape, &cfg(divergence)));
        }
    }
}

#[test]
fn token_reduction_is_the_mean_over_valid_tokens_and_sequence_reduction_the_mean_of_sequence_means()
{
    let values = t2(
        &[
            1.0, 2.0, 3.0, 100.0, 10.0, 20.0, 30.0, 40.0, 7.0, 8.0, 9.0, 10.0,
        ],
        [3, 4],
    );
    let mask = t2(
        &[1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [3, 4],
    );
    let token = super_values(reduce(values.clone(), mask.clone(), Reduction::Token));
    let sequence = super_values(reduce(values, mask, Reduction::Sequence));
    assert!((token - 16.0 / 4.0).abs() < 1e-6, "token mean {token}");
    // Sequence means 2 and 10; the empty third sequence is skipped.
    assert!((sequence - 6.0).abs() < 1e-6, "sequence mean {sequence}");
}

fn super_values(x: Tensor<Cpu, 1>) -> f32 {
    values(x)[0]
}

#[test]
fn reduce_of_an_all_padding_batch_is_zero() {
    let values = t2(&[f32::NAN, 5.0], [1, 2]);
    let mask = t2(&[0.0, 0.0], [1, 2]);
    for reduction in [Reduction::Token, Reduction::Sequence] {
        assert_eq!(
            super_values(reduce(values.clone(), mask.clone(), reduction)),
            0.0
        );
    }
}

#[test]
fn sampled_token_loss_clamps_the_ratio_and_uses_the_advantage() {
    // ratio e^{0.5} ≈ 1.65 (kept) and e^{2} ≈ 7.39 (clamped to 2); A = -1 and +0.5.
    let student = t2(&[-1.0, -2.0], [1, 2]);
    let behaviour = t2(&[-1.5, -4.0], [1, 2]);
    let teacher = t2(&[-2.0, -1.5], [1, 2]);
    let mask = t2(&[1.0, 1.0], [1, 2]);
    let loss = super_values(sampled_token_loss(
        student,
        behaviour,
        teacher,
        mask,
        2.0,
        Reduction::Token,
    ));
    let expected = -(0.5f32.exp() * -1.0 + 2.0 * 0.5) / 2.0;
    assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
}

#[test]
fn default_config_is_jsd_half_token_reduction_unit_temperature_and_valid() {
    let c = LossConfig::default();
    assert_eq!(c.divergence, Divergence::Jsd { beta: 0.5 });
    assert_eq!(c.top_k, None);
    assert_eq!(c.reduction, Reduction::Token);
    assert_eq!(c.temperature, 1.0);
    assert_eq!(c.kl_clip, None);
    assert_eq!(c.validate(), Ok(()));
}

#[test]
fn validate_rejects_each_out_of_domain_field() {
    let base = LossConfig::default();
    let cases = [
        (
            LossConfig {
                divergence: Divergence::Jsd { beta: 1.5 },
                ..base.clone()
            },
            LossConfigError::Beta(1.5),
        ),
        (
            LossConfig {
                divergence: Divergence::Jsd { beta: -0.1 },
                ..base.clone()
            },
            LossConfigError::Beta(-0.1),
        ),
        (
            LossConfig {
                divergence: Divergence::SampledReverseKl { ratio_clip: 0.0 },
                ..base.clone()
            },
            LossConfigError::RatioClip(0.0),
        ),
        (
            LossConfig {
                temperature: 0.0,
                ..base.clone()
            },
            LossConfigError::Temperature(0.0),
        ),
        (
            LossConfig {
                temperature: f32::INFINITY,
                ..base.clone()
            },
            LossConfigError::Temperature(f32::INFINITY),
        ),
        (
            LossConfig {
                top_k: Some(TopK { k: 0, tail: true }),
                ..base.clone()
            },
            LossConfigError::TopKZero,
        ),
        (
            LossConfig {
                kl_clip: Some(-1.0),
                ..base.clone()
            },
            LossConfigError::KlClip(-1.0),
        ),
    ];
    for (c, expected) in cases {
        assert_eq!(c.validate(), Err(expected.clone()), "{c:?}");
        assert!(!expected.to_string().is_empty());
    }
    let nan = LossConfig {
        divergence: Divergence::Jsd { beta: f32::NAN },
        ..base
    };
    assert!(matches!(nan.validate(), Err(LossConfigError::Beta(b)) if b.is_nan()));
}

#[test]
#[should_panic(expected = "temperature must be finite and > 0")]
fn per_token_divergence_panics_with_the_config_error_on_an_invalid_config() {
    let c = LossConfig {
        temperature: -1.0,
        ..LossConfig::default()
    };
    let x = t3(&[0.0, 1.0], [1, 1, 2]);
    per_token_divergence(x.clone(), x, &c);
}

#[test]
#[should_panic(expected = "use sampled_token_loss")]
fn per_token_divergence_refuses_the_sampled_token_mode() {
    let c = cfg(Divergence::SampledReverseKl { ratio_clip: 2.0 });
    let x = t3(&[0.0, 1.0], [1, 1, 2]);
    per_token_divergence(x.clone(), x, &c);
}

#[test]
#[should_panic(expected = "teacher_logits shape [1, 1, 3] differs from student_logits [1, 1, 2]")]
fn per_token_divergence_names_both_shapes_when_they_differ() {
    per_token_divergence(
        t3(&[0.0, 1.0], [1, 1, 2]),
        t3(&[0.0, 1.0, 2.0], [1, 1, 3]),
        &LossConfig::default(),
    );
}
