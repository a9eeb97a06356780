//! Sampler laws: Philox known answers, top-k / top-p set sizes, greedy limit, frequencies.

use omniopsd_core::sampling::{
    filtered_distribution, log_softmax_at, philox4x32_10, sample, uniform, SamplingConfig,
    SamplingError,
};
use proptest::prelude::*;

fn cfg(temperature: f32, top_k: Option<usize>, top_p: f32) -> SamplingConfig {
    SamplingConfig {
        temperature,
        top_k,
        top_p,
    }
}

/// Probabilities of `softmax(logits / τ)` in `f64`, computed independently of the crate.
fn softmax(logits: &[f32], tau: f64) -> Vec<f64> {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits
        .iter()
        .map(|l| ((*l as f64 - m) / tau).exp())
        .collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

/// Logits drawn from a small grid so that ties happen often.
fn logits_strategy() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec((-8i32..8).prop_map(|v| v as f32 * 0.5), 1..40)
}

#[test]
fn philox_matches_random123_known_answers() {
    // Random123 kat_vectors, "philox4x32 10" lines: counter[4] key[2] -> output[4].
    assert_eq!(
        philox4x32_10([0; 4], [0; 2]),
        [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
    );
    assert_eq!(
        philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
        [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
    );
    assert_eq!(
        philox4x32_10(
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0]
        ),
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
    );
}

#[test]
fn uniform_draws_are_in_unit_interval_with_mean_one_half() {
    let n = 20_000;
    let draws: Vec<f64> = (0..n).map(|i| uniform(7, 3, i, 11)).collect();
    assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
    let mean = draws.iter().sum::<f64>() / n as f64;
    // Standard error of the mean of U(0,1) over 20k draws is 0.002.
    assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
    assert_ne!(uniform(7, 3, 0, 0), uniform(8, 3, 0, 0));
    assert_ne!(uniform(7, 3, 0, 0), uniform(7, 4, 0, 0));
    assert_ne!(uniform(7, 3, 0, 0), uniform(7, 3, 1, 0));
    assert_ne!(uniform(7, 3, 0, 0), uniform(7, 3, 0, 1));
}

proptest! {
    #[test]
    fn top_k_keeps_exactly_k_most_likely(logits in logits_strategy(), k in 1usize..50) {
        let dist = filtered_distribution(&logits, &cfg(1.0, Some(k), 1.0)).unwrap();
        prop_assert_eq!(dist.len(), k.min(logits.len()));
        let kept_min = dist.iter().map(|(i, _)| logits[*i as usize]).fold(f32::INFINITY, f32::min);
        for (i, l) in logits.iter().enumerate() {
            if !dist.iter().any(|(j, _)| *j as usize == i) {
                prop_assert!(*l <= kept_min, "dropped {} > kept {}", l, kept_min);
            }
        }
        let total: f64 = dist.iter().map(|(_, p)| p).sum();
        prop_assert!((total - 1.0).abs() < 1e-12);
    }

    #[test]
    fn top_p_keeps_minimal_set_reaching_p(logits in logits_strategy(), p in 0.05f32..1.0, tau in 0.3f32..2.0) {
        let dist = filtered_distribution(&logits, &cfg(tau, None, p)).unwrap();
        let probs = softmax(&logits, tau as f64);
        let mut sorted = probs.clone();
        sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
        let kept: Vec<f64> = dist.iter().map(|(i, _)| probs[*i as usize]).collect();
        let mass: f64 = kept.iter().sum();
        // The kept tokens are a most-likely-first prefix ...
        for (a, b) in kept.iter().zip(&sorted) {
            prop_assert!((a - b).abs() < 1e-12);
        }
        // ... whose mass reaches p, and which would not without its last token.
        prop_assert!(mass >= p as f64 - 1e-9, "mass {} < p {}", mass, p);
        prop_assert!(mass - kept[kept.len() - 1] < p as f64 + 1e-9);
    }

    #[test]
    fn top_k_then_top_p_applies_p_to_renormalised_top_k(logits in logits_strategy(), k in 1usize..10, p in 0.05f32..1.0) {
        let dist = filtered_distribution(&logits, &cfg(1.0, Some(k), p)).unwrap();
        let top_k = filtered_distribution(&logits, &cfg(1.0, Some(k), 1.0)).unwrap();
        let mut mass = 0.0;
        let mut expected = top_k.len();
        for (n, (_, q)) in top_k.iter().enumerate() {
            mass += q;
            if mass >= p as f64 { expected = n + 1; break; }
        }
        prop_assert_eq!(dist.len(), expected);
        for (a, b) in dist.iter().zip(&top_k) {
            prop_assert_eq!(a.0, b.0);
        }
    }

    #[test]
    fn temperature_zero_sampling_is_argmax(logits in logits_strategy(), u in 0.0f64..1.0) {
        let choice = sample(&logits, &cfg(0.0, None, 1.0), u).unwrap();
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let first = logits.iter().position(|l| *l == max).unwrap();
        prop_assert_eq!(choice.token as usize, first);
        prop_assert_eq!(choice.sample_logp, 0.0);
    }

    #[test]
    fn vanishing_temperature_sampling_is_argmax(
        logits in prop::collection::vec(-4.0f32..4.0, 2..30), gap in 0.05f32..1.0, u in 0.0f64..1.0,
    ) {
        // Make the maximum unique by `gap`: at τ = 1e-4 every other token has probability
        // below exp(-gap / τ) <= exp(-500).
        let mut logits = logits;
        let best = logits.len() / 2;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        logits[best] = max + gap;
        let choice = sample(&logits, &cfg(1e-4, None, 1.0), u).unwrap();
        prop_assert_eq!(choice.token as usize, best);
    }

    #[test]
    fn log_softmax_at_matches_direct_formula(logits in prop::collection::vec(-20.0f32..20.0, 1..30), tau in 0.1f32..3.0) {
        let probs = softmax(&logits, tau as f64);
        for (i, p) in probs.iter().enumerate() {
            prop_assert!((log_softmax_at(&logits, tau, i) - p.ln()).abs() < 1e-9);
        }
    }
}

#[test]
fn top_p_over_a_large_vocabulary_matches_a_full_sort() {
    // 50k logits: the nucleus search only sorts tokens above (1 - p) / V, which must give the
    // same set as sorting the whole vocabulary.
    let v = 50_000u32;
    for (seed, p, spread) in [(1u64, 0.9f32, 3.0f64), (2, 0.5, 0.2), (3, 0.99, 8.0)] {
        let logits: Vec<f32> = (0..v)
            .map(|i| ((uniform(seed, 0, i, 0) - 0.5) * 2.0 * spread) as f32)
            .collect();
        let dist = filtered_distribution(&logits, &cfg(1.0, None, p)).unwrap();
        let probs = softmax(&logits, 1.0);
        let mut order: Vec<usize> = (0..v as usize).collect();
        order.sort_by(|a, b| probs[*b].partial_cmp(&probs[*a]).unwrap().then(a.cmp(b)));
        let mut mass = 0.0;
        let mut want = 0;
        while mass < p as f64 {
            mass += probs[order[want]];
            want += 1;
        }
        assert_eq!(dist.len(), want, "p = {p}");
        for (got, idx) in dist.iter().zip(&order) {
            assert_eq!(got.0 as usize, *idx);
        }
    }
}

#[test]
fn sampled_frequencies_follow_the_filtered_distribution() {
    let logits = [1.0f32, 0.2, -0.5, 2.0, 0.0, -3.0];
    let config = cfg(0.8, Some(4), 0.95);
    let dist = filtered_distribution(&logits, &config).unwrap();
    let n = 40_000;
    let mut counts = [0usize; 6];
    for i in 0..n {
        let c = sample(&logits, &config, uniform(1, 2, i, 0)).unwrap();
        counts[c.token as usize] += 1;
        let p = dist.iter().find(|(t, _)| *t == c.token).unwrap().1;
        assert!((c.sample_logp - p.ln()).abs() < 1e-12);
    }
    for (token, count) in counts.iter().enumerate() {
        let p = dist
            .iter()
            .find(|(t, _)| *t as usize == token)
            .map_or(0.0, |x| x.1);
        let freq = *count as f64 / n as f64;
        // 5 standard errors of a binomial proportion over 40k draws is at most 0.0125.
        assert!((freq - p).abs() < 0.0125, "token {token}: {freq} vs {p}");
    }
}

#[test]
fn masked_logits_are_never_sampled() {
    let logits = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0];
    for i in 0..200 {
        let c = sample(&logits, &SamplingConfig::default(), uniform(0, 0, i, 0)).unwrap();
        assert!(c.token == 1 || c.token == 3);
    }
}

#[test]
fn bad_logits_are_errors_naming_the_index() {
    let c = SamplingConfig::default();
    assert_eq!(
        sample(&[], &c, 0.5).unwrap_err(),
        SamplingError::EmptyLogits
    );
    match sample(&[0.0, f32::NAN], &c, 0.5).unwrap_err() {
        SamplingError::NonFiniteLogit { index, .. } => assert_eq!(index, 1),
        e => panic!("unexpected {e:?}"),
    }
    assert!(matches!(
        sample(&[f32::INFINITY], &c, 0.5).unwrap_err(),
        SamplingError::NonFiniteLogit { index: 0, .. }
    ));
    assert_eq!(
        sample(&[f32::NEG_INFINITY; 3], &c, 0.5).unwrap_err(),
        SamplingError::NoCandidate { vocab: 3 }
    );
}

#[test]
fn bad_sampling_config_is_rejected_with_the_field_name() {
    let field = |c: SamplingConfig| match c.validate().unwrap_err() {
        SamplingError::Config { field, .. } => field,
        e => panic!("unexpected {e:?}"),
    };
    assert_eq!(field(cfg(-1.0, None, 1.0)), "temperature");
    assert_eq!(field(cfg(f32::NAN, None, 1.0)), "temperature");
    assert_eq!(field(cfg(1.0, Some(0), 1.0)), "top_k");
    assert_eq!(field(cfg(1.0, None, 0.0)), "top_p");
    assert_eq!(field(cfg(1.0, None, 1.5)), "top_p");
    let msg = cfg(1.0, None, 1.5).validate().unwrap_err().to_string();
    assert!(msg.contains("top_p") && msg.contains("1.5"), "{msg}");
    assert!(sample(&[0.0, 1.0], &cfg(1.0, None, 2.0), 0.5).is_err());
}
