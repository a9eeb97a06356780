//! Seeded next-token sampling: temperature, top-k, top-p, and a counter-based random stream.
//!
//! Everything here runs on the host on one row of logits at a time, in `f64`, so a rollout
//! depends only on the logits and the seed, never on the backend's random number generator or
//! on how rows are batched: the same seed gives the same tokens on every backend whose logits
//! agree.
//!
//! The filters follow the order of Hugging Face `generate` (`TemperatureLogitsWarper`, then
//! `TopKLogitsWarper`, then `TopPLogitsWarper`): divide the logits by the temperature, keep the
//! `k` most likely tokens, renormalise, keep the smallest prefix of the remaining tokens (most
//! likely first) whose mass reaches `p`, renormalise, draw.

use alloc::vec::Vec;
use core::cmp::Ordering;
// Without std, `f64::exp`/`ln`/`cos`/`sqrt` come from libm through this trait.
#[cfg(not(feature = "std"))]
#[allow(unused_imports)]
use num_traits::Float;

/// Weyl increments of the Philox key schedule (Salmon et al. 2011, table 2).
const PHILOX_W: [u32; 2] = [0x9E37_79B9, 0xBB67_AE85];
/// Philox-4x32 round multipliers (Salmon et al. 2011, table 2).
const PHILOX_M: [u32; 2] = [0xD251_1F53, 0xCD9E_8D57];

/// Philox-4x32-10, the counter-based generator of Salmon, Moraes, Dror & Shaw, "Parallel
/// Random Numbers: As Easy as 1, 2, 3" (SC 2011), as in Random123.
///
/// A pure function of `(counter, key)`: each of the ten rounds maps
/// `(c0, c1, c2, c3) -> (hi(M1·c2) ^ c1 ^ k0, lo(M1·c2), hi(M0·c0) ^ c3 ^ k1, lo(M0·c0))` and
/// the key is bumped by the Weyl constants between rounds. Being counter-based, the draw for
/// any (sequence, position) is computed directly, so rollouts are reproducible regardless of
/// batching and the generator's whole state is the seed plus a counter.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(PHILOX_W[0]);
            k[1] = k[1].wrapping_add(PHILOX_W[1]);
        }
        let p0 = u64::from(PHILOX_M[0]) * u64::from(c[0]);
        let p1 = u64::from(PHILOX_M[1]) * u64::from(c[2]);
        c = [
            ((p1 >> 32) as u32) ^ c[1] ^ k[0],
            p1 as u32,
            ((p0 >> 32) as u32) ^ c[3] ^ k[1],
            p0 as u32,
        ];
    }
    c
}

/// The uniform draw in `[0, 1)` for one sampling decision.
///
/// `seed` is the Philox key; the counter is `(row, position, stream_lo, stream_hi)`, where
/// `stream` names one rollout (the trainer uses its running episode count), `row` the sample
/// within the rollout and `position` the response position. The double is built from the top
/// 53 bits of the first two output words, so it is exact and strictly below 1.
pub fn uniform(seed: u64, stream: u64, row: u32, position: u32) -> f64 {
    let out = philox4x32_10(
        [row, position, stream as u32, (stream >> 32) as u32],
        [seed as u32, (seed >> 32) as u32],
    );
    let bits = ((u64::from(out[0]) << 32) | u64::from(out[1])) >> 11;
    bits as f64 * (1.0 / (1u64 << 53) as f64)
}

/// How one next token is drawn from logits.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingConfig {
    /// Softmax temperature `τ`: tokens are drawn from `softmax(logits / τ)`. `0` means greedy
    /// (argmax, lowest index on ties).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (lowest index first among equal logits).
    /// `None` keeps all.
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability mass
    /// (after top-k) is at least `p`. `1.0` keeps all.
    pub top_p: f32,
}

impl Default for SamplingConfig {
    /// Plain ancestral sampling at temperature 1, which is what on-policy distillation
    /// assumes: the student is trained on its own distribution.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
        }
    }
}

impl SamplingConfig {
    /// Checks the knobs: `temperature` finite and `>= 0`, `top_k >= 1`, `top_p` in `(0, 1]`.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplingError::Config {
                field: "temperature",
                expected: "a finite number >= 0",
                found: self.temperature,
            });
        }
        if self.top_k == Some(0) {
            return Err(SamplingError::Config {
                field: "top_k",
                expected: "None or >= 1",
                found: 0.0,
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::Config {
                field: "top_p",
                expected: "a number in (0, 1]",
                found: self.top_p,
            });
        }
        Ok(())
    }
}

/// Errors of the sampler.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// A sampling knob is out of range.
    #[error("sampling config: `{field}` must be {expected}, found {found}")]
    Config {
        /// The field name in [`SamplingConfig`].
        field: &'static str,
        /// What the field must be.
        expected: &'static str,
        /// The value found.
        found: f32,
    },
    /// The logits row is empty.
    #[error("logits row is empty (vocabulary size 0)")]
    EmptyLogits,
    /// A logit is NaN or `+inf` (`-inf` is allowed: it masks a token).
    #[error("logit at vocabulary index {index} is {value}: expected finite or -inf")]
    NonFiniteLogit {
        /// Vocabulary index of the offending logit.
        index: usize,
        /// Its value.
        value: f32,
    },
    /// Every logit is `-inf`, so no token can be drawn.
    #[error("all {vocab} logits are -inf: no token can be sampled")]
    NoCandidate {
        /// Vocabulary size.
        vocab: usize,
    },
}

impl SamplingError {
    /// The out-of-range field of a [`SamplingConfig`], if this is a config error.
    pub fn field_error(&self) -> Option<crate::FieldError> {
        match self {
            Self::Config {
                field,
                expected,
                found,
            } => Some(crate::FieldError::out_of_range(field, expected, found)),
            _ => None,
        }
    }
}

/// One drawn token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Choice {
    /// Vocabulary index of the token.
    pub token: u32,
    /// `log q(token)` under the filtered, renormalised distribution it was drawn from
    /// (`0` for greedy decoding).
    pub sample_logp: f64,
}

fn check_logits(logits: &[f32]) -> Result<(), SamplingError> {
    if logits.is_empty() {
        return Err(SamplingError::EmptyLogits);
    }
    if let Some((index, &value)) = logits
        .iter()
        .enumerate()
        .find(|(_, v)| v.is_nan() || **v == f32::INFINITY)
    {
        return Err(SamplingError::NonFiniteLogit { index, value });
    }
    if logits.iter().all(|v| *v == f32::NEG_INFINITY) {
        return Err(SamplingError::NoCandidate {
            vocab: logits.len(),
        });
    }
    Ok(())
}

/// Greedy choice: the largest logit, the lowest index among ties.
fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate().skip(1) {
        if *v > logits[best] {
            best = i;
        }
    }
    best
}

/// Most likely first, lowest index first among equals: the order every filter uses.
fn by_probability(a: &(u32, f64), b: &(u32, f64)) -> Ordering {
    b.1.partial_cmp(&a.1)
        .unwrap_or(Ordering::Equal)
        .then(a.0.cmp(&b.0))
}

/// The distribution a token is drawn from: `(token, probability)` pairs, probabilities
/// renormalised to sum to 1, zero-probability tokens left out.
///
/// With top-k or top-p active the pairs are sorted most likely first (ties: lowest index
/// first); otherwise they are in vocabulary order. Greedy (`temperature == 0`) yields the
/// single argmax with probability 1. The draw in [`sample`] walks the pairs in this order.
///
/// `p_i = exp((l_i - max l) / τ) / Σ_j exp((l_j - max l) / τ)`, computed in `f64`.
pub fn filtered_distribution(
    logits: &[f32],
    cfg: &SamplingConfig,
) -> Result<Vec<(u32, f64)>, SamplingError> {
    cfg.validate()?;
    check_logits(logits)?;
    if cfg.temperature == 0.0 {
        return Ok(alloc::vec![(argmax(logits) as u32, 1.0)]);
    }
    let tau = f64::from(cfg.temperature);
    let max = f64::from(logits[argmax(logits)]);
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, ((f64::from(*l) - max) / tau).exp()))
        .filter(|(_, p)| *p > 0.0)
        .collect();
    normalise(&mut probs);

    if let Some(k) = cfg.top_k {
        if k < probs.len() {
            probs.select_nth_unstable_by(k - 1, by_probability);
            probs.truncate(k);
        }
        probs.sort_unstable_by(by_probability);
        normalise(&mut probs);
    }
    if cfg.top_p < 1.0 {
        probs = nucleus(probs, f64::from(cfg.top_p), cfg.top_k.is_some());
        normalise(&mut probs);
    }
    Ok(probs)
}

fn normalise(probs: &mut [(u32, f64)]) {
    let total: f64 = probs.iter().map(|(_, p)| p).sum();
    for (_, p) in probs.iter_mut() {
        *p /= total;
    }
}

/// The smallest most-likely-first prefix of `probs` (normalised) whose mass is `>= p`.
///
/// Sorting the whole vocabulary for every token would dominate a rollout over a 150k
/// vocabulary, so the sort is restricted to tokens above `c = (1 - p) / V`: the tokens at or
/// below `c` hold at most `V·c = 1 - p` of the mass, so those above hold at least `p` and the
/// minimal prefix lies among them. If rounding breaks that bound, everything is sorted.
fn nucleus(mut probs: Vec<(u32, f64)>, p: f64, sorted: bool) -> Vec<(u32, f64)> {
    if !sorted {
        let cutoff = (1.0 - p) / probs.len() as f64;
        let candidates: Vec<(u32, f64)> =
            probs.iter().copied().filter(|(_, q)| *q > cutoff).collect();
        let mass: f64 = candidates.iter().map(|(_, q)| q).sum();
        if mass >= p {
            probs = candidates;
        }
        probs.sort_unstable_by(by_probability);
    }
    let mut mass = 0.0;
    let mut keep = probs.len();
    for (i, (_, q)) in probs.iter().enumerate() {
        mass += q;
        if mass >= p {
            keep = i + 1;
            break;
        }
    }
    probs.truncate(keep);
    probs
}

/// Draws one token by inverting the cumulative distribution of [`filtered_distribution`] at
/// `u` (a uniform draw in `[0, 1)`, see [`uniform`]).
pub fn sample(logits: &[f32], cfg: &SamplingConfig, u: f64) -> Result<Choice, SamplingError> {
    let dist = filtered_distribution(logits, cfg)?;
    let mut cumulative = 0.0;
    // The last candidate absorbs the rounding slack of the cumulative sum.
    let mut chosen = dist[dist.len() - 1];
    for entry in &dist {
        cumulative += entry.1;
        if u < cumulative {
            chosen = *entry;
            break;
        }
    }
    Ok(Choice {
        token: chosen.0,
        sample_logp: chosen.1.ln(),
    })
}

/// `log softmax(logits / τ)[token]` over the full, unfiltered vocabulary, in `f64`:
/// `(l_y - m)/τ - ln Σ_j exp((l_j - m)/τ)` with `m = max l`.
///
/// This is the behaviour log-probability the rollout reports; it is the same quantity the
/// loss computes for the student at loss temperature `τ`, so the importance ratio of the
/// sampled-token loss starts at 1 on the first update after a rollout.
pub fn log_softmax_at(logits: &[f32], temperature: f32, token: usize) -> f64 {
    let tau = f64::from(temperature);
    let max = f64::from(logits[argmax(logits)]);
    let sum: f64 = logits
        .iter()
        .map(|l| ((f64::from(*l) - max) / tau).exp())
        .sum();
    (f64::from(logits[token]) - max) / tau - sum.ln()
}
