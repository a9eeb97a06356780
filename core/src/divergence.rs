//! Per-token divergences between the teacher's and the student's next-token distributions.
//!
//! Everything here works on logits `[N, R, V]` (N sequences, R response positions, V vocabulary
//! entries) and is computed in f32 with log-softmax / logsumexp, never with `log(softmax)`.
//! The fused, memory-bounded version of the same losses is in [`crate::fused`].

use alloc::format;
use alloc::vec;

use burn::tensor::{activation::log_softmax, backend::Backend, IndexingUpdateOp, Int, Tensor};

/// Which divergence between teacher `T` and student `S` next-token distributions is minimised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Divergence {
    /// Forward KL, `KL(T ‖ S) = Σ_v p_T(v) (log p_T(v) − log p_S(v))` (mode covering).
    ForwardKl,
    /// Reverse KL, `KL(S ‖ T) = Σ_v p_S(v) (log p_S(v) − log p_T(v))` (mode seeking).
    ReverseKl,
    /// Generalized Jensen–Shannon divergence exactly as TRL's GKD `generalized_jsd_loss`
    /// (Agarwal et al. 2024, "On-Policy Distillation of Language Models", Eq. 1):
    /// `M = β·p_T + (1−β)·p_S` (mixture formed in log space with logsumexp),
    /// `JSD_β = β·KL(T ‖ M) + (1−β)·KL(S ‖ M)`.
    /// `beta` weights the **teacher** side. `beta = 0` is special-cased to forward KL and
    /// `beta = 1` to reverse KL, as in TRL; these are the limits of `JSD_β / β` (β → 0) and
    /// `JSD_β / (1 − β)` (β → 1), since `JSD_β` itself tends to 0 at both ends.
    Jsd {
        /// Teacher weight of the mixture, in `[0, 1]`.
        beta: f32,
    },
    /// Reverse KL estimated on the sampled tokens only, as a policy gradient:
    /// advantage `A_t = log p_T(y_t) − log p_S(y_t)` (detached), importance ratio
    /// `ρ_t = exp(log p_θ(y_t) − log p_behaviour(y_t))` clamped to at most `ratio_clip`,
    /// loss `= −reduce(ρ_t · A_t)`. Its gradient is the score-function estimate of
    /// `∇ KL(S ‖ T)`.
    SampledReverseKl {
        /// Upper clamp of the importance ratio (default 2.0).
        ratio_clip: f32,
    },
}

impl Default for Divergence {
    fn default() -> Self {
        Divergence::Jsd { beta: 0.5 }
    }
}

/// How the masked per-token values are reduced to one scalar.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reduction {
    /// Mean over all valid tokens of the batch: `Σ_{n,r} m·d / Σ_{n,r} m`.
    #[default]
    Token,
    /// Mean per sequence over its valid tokens, then mean over the sequences that have at
    /// least one valid token.
    Sequence,
}

/// Restrict the divergence to the student's `k` most likely tokens (per position).
///
/// Without `tail`, both distributions are renormalised over those `k` tokens. With `tail`, a
/// `(k+1)`-th bucket holds the remaining mass of each distribution (unnormalised top-k
/// probabilities plus `1 − Σ top-k`). The base divergence is then applied to these
/// `k`- or `(k+1)`-way distributions. `k ≥ V` is the full distribution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopK {
    /// Number of student tokens kept, at least 1.
    pub k: usize,
    /// Whether to add a bucket with the rest of the mass.
    pub tail: bool,
}

/// Everything that defines the distillation loss.
#[derive(Clone, Debug, PartialEq)]
pub struct LossConfig {
    /// The divergence to minimise.
    pub divergence: Divergence,
    /// Optional top-k restriction; ignored by [`Divergence::SampledReverseKl`].
    pub top_k: Option<TopK>,
    /// How per-token values become a scalar.
    pub reduction: Reduction,
    /// Loss temperature `τ`: both logits are divided by it before the log-softmax. Separate
    /// from the sampling temperature. Default 1.0.
    pub temperature: f32,
    /// Optional point-wise clip `c`: each per-(token, vocabulary-entry) KL term
    /// `a_v (log a_v − log b_v)` is clamped to `[−c, c]` before summing over the vocabulary
    /// (for JSD, both KL terms against the mixture). Ignored by
    /// [`Divergence::SampledReverseKl`].
    pub kl_clip: Option<f32>,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            divergence: Divergence::default(),
            top_k: None,
            reduction: Reduction::Token,
            temperature: 1.0,
            kl_clip: None,
        }
    }
}

/// A [`LossConfig`] field outside its domain.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LossConfigError {
    /// `Divergence::Jsd { beta }` with beta outside `[0, 1]` or not finite.
    #[error("loss config: divergence.beta must be in [0, 1], found {0}")]
    Beta(f32),
    /// `Divergence::SampledReverseKl { ratio_clip }` not finite or not > 0.
    #[error("loss config: divergence.ratio_clip must be finite and > 0, found {0}")]
    RatioClip(f32),
    /// `temperature` not finite or not > 0.
    #[error("loss config: temperature must be finite and > 0, found {0}")]
    Temperature(f32),
    /// `top_k.k` is 0.
    #[error("loss config: top_k.k must be >= 1, found 0")]
    TopKZero,
    /// `kl_clip` not finite or not > 0.
    #[error("loss config: kl_clip must be finite and > 0, found {0}")]
    KlClip(f32),
}

impl LossConfigError {
    /// The out-of-range field as its path in [`LossConfig`].
    pub fn field_error(&self) -> crate::FieldError {
        let (field, problem) = match *self {
            Self::Beta(b) => ("divergence.beta", format!("must be in [0, 1], found {b}")),
            Self::RatioClip(c) => (
                "divergence.ratio_clip",
                format!("must be finite and > 0, found {c}"),
            ),
            Self::Temperature(t) => ("temperature", format!("must be finite and > 0, found {t}")),
            Self::TopKZero => ("top_k.k", "must be >= 1, found 0".into()),
            Self::KlClip(c) => ("kl_clip", format!("must be finite and > 0, found {c}")),
        };
        crate::FieldError::new(field, problem)
    }
}

impl LossConfig {
    /// Checks every field's domain: `beta ∈ [0, 1]`, `ratio_clip > 0`, `temperature > 0`,
    /// `k ≥ 1`, `kl_clip > 0` (all finite).
    pub fn validate(&self) -> Result<(), LossConfigError> {
        match self.divergence {
            Divergence::Jsd { beta } if !(0.0..=1.0).contains(&beta) => {
                return Err(LossConfigError::Beta(beta))
            }
            Divergence::SampledReverseKl { ratio_clip }
                if !(ratio_clip.is_finite() && ratio_clip > 0.0) =>
            {
                return Err(LossConfigError::RatioClip(ratio_clip))
            }
            _ => {}
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(LossConfigError::Temperature(self.temperature));
        }
        if let Some(TopK { k: 0, .. }) = self.top_k {
            return Err(LossConfigError::TopKZero);
        }
        if let Some(c) = self.kl_clip {
            if !(c.is_finite() && c > 0.0) {
                return Err(LossConfigError::KlClip(c));
            }
        }
        Ok(())
    }
}

/// Per-token divergence `[N, R]` from student and teacher logits `[N, R, V]`, for the
/// distribution-matching kinds (forward/reverse KL, JSD, with top-k, clip and temperature as
/// configured). Differentiable w.r.t. `student_logits` on an autodiff backend; the teacher is
/// detached.
///
/// With `τ` the loss temperature, `log p_S = log_softmax(s / τ)` and
/// `log p_T = log_softmax(t / τ)` (TRL's `generalized_jsd_loss` convention: no `τ²` factor).
///
/// # Panics
/// If `cfg` does not pass [`LossConfig::validate`], if it is
/// [`Divergence::SampledReverseKl`] (use [`sampled_token_loss`] or [`loss_from_logits`]), or
/// if the shapes differ.
pub fn per_token_divergence<B: Backend>(
    student_logits: Tensor<B, 3>,
    teacher_logits: Tensor<B, 3>,
    cfg: &LossConfig,
) -> Tensor<B, 2> {
    if let Err(e) = cfg.validate() {
        panic!("per_token_divergence: {e}");
    }
    let [n, r, v] = student_logits.dims();
    let teacher_dims = teacher_logits.dims();
    assert!(
        teacher_dims == [n, r, v],
        "per_token_divergence: teacher_logits shape {teacher_dims:?} differs from student_logits {:?}",
        [n, r, v]
    );
    let tau = cfg.temperature;
    let z = student_logits.reshape([n * r, v]).div_scalar(tau);
    let t = teacher_logits.reshape([n * r, v]).div_scalar(tau).detach();
    let (ls, lq) = match cfg.top_k {
        Some(top) if top.k < v => top_k_log_probs(z, t, top),
        _ => (log_softmax(z, 1), log_softmax(t, 1)),
    };
    base_divergence(ls, lq, cfg.divergence, cfg.kl_clip).reshape([n, r])
}

/// The full distillation loss from logits, for every [`Divergence`] kind: the unchunked
/// reference the fused path ([`crate::fused`]) must equal. Distribution-matching kinds reduce
/// [`per_token_divergence`]; [`Divergence::SampledReverseKl`] gathers
/// `log_softmax(s / τ)[y]` and `log_softmax(t / τ)[y]` at `tokens` and calls
/// [`sampled_token_loss`]. Shapes: logits `[N, R, V]`, `tokens`, `mask`, `behaviour_logp`
/// `[N, R]`. Padded positions may hold any token id; they are read as token 0.
///
/// # Panics
/// As [`per_token_divergence`], or if a valid token id is outside `[0, V)`.
pub fn loss_from_logits<B: Backend>(
    student_logits: Tensor<B, 3>,
    teacher_logits: Tensor<B, 3>,
    tokens: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
    behaviour_logp: Tensor<B, 2>,
    cfg: &LossConfig,
) -> Tensor<B, 1> {
    match cfg.divergence {
        Divergence::SampledReverseKl { ratio_clip } => {
            if let Err(e) = cfg.validate() {
                panic!("loss_from_logits: {e}");
            }
            let [n, r, v] = student_logits.dims();
            let tau = cfg.temperature;
            let invalid = mask.clone().lower_equal_elem(0.5);
            let tokens = tokens.mask_fill(invalid, 0).reshape([n * r, 1]);
            let logp_at = |logits: Tensor<B, 3>| {
                log_softmax(logits.reshape([n * r, v]).div_scalar(tau), 1)
                    .gather(1, tokens.clone())
                    .reshape([n, r])
            };
            let student_logp = logp_at(student_logits);
            let teacher_logp = logp_at(teacher_logits.detach());
            sampled_token_loss(
                student_logp,
                behaviour_logp,
                teacher_logp,
                mask,
                ratio_clip,
                cfg.reduction,
            )
        }
        _ => reduce(
            per_token_divergence(student_logits, teacher_logits, cfg),
            mask,
            cfg.reduction,
        ),
    }
}

/// Masked reduction of per-token values `[N, R]` to a scalar `[1]`. `mask` is 1.0 on valid
/// response tokens and 0.0 on padding (entries > 0.5 count as valid); padded entries are
/// selected away (not multiplied), so even non-finite values there do not reach the result.
///
/// - [`Reduction::Token`]: `Σ_{n,r} m·d / max(1, Σ_{n,r} m)`.
/// - [`Reduction::Sequence`]: `mean_{n : c_n > 0} (Σ_r m·d / c_n)` with `c_n = Σ_r m`.
///
/// No valid token gives 0.
pub fn reduce<B: Backend>(
    per_token: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    reduction: Reduction,
) -> Tensor<B, 1> {
    let valid = mask.greater_elem(0.5);
    let counts = valid.clone().float();
    let values = per_token.mask_fill(valid.bool_not(), 0.0);
    match reduction {
        Reduction::Token => values.sum().div(counts.sum().clamp_min(1.0)),
        Reduction::Sequence => {
            let per_seq_count = counts.sum_dim(1);
            let per_seq_mean = values.sum_dim(1).div(per_seq_count.clone().clamp_min(1.0));
            let sequences = per_seq_count.greater_elem(0.0).float().sum();
            per_seq_mean.sum().div(sequences.clamp_min(1.0))
        }
    }
}

/// Sampled-token reverse KL as a policy gradient (see [`Divergence::SampledReverseKl`]):
/// `A = teacher_logp − student_logp` (detached), `ρ = min(exp(student_logp − behaviour_logp),
/// ratio_clip)`, loss `= −reduce(ρ·A)`. All inputs `[N, R]`; only `student_logp` carries
/// gradient: `∂loss/∂student_logp = −w·ρ·A` where unclipped (the score-function estimate of
/// `∇ KL(S ‖ T)` at `ρ = 1`), 0 where clipped. Padded entries are replaced by 0 before use,
/// so their content never reaches the loss or its gradient.
pub fn sampled_token_loss<B: Backend>(
    student_logp: Tensor<B, 2>,
    behaviour_logp: Tensor<B, 2>,
    teacher_logp: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    ratio_clip: f32,
    reduction: Reduction,
) -> Tensor<B, 1> {
    let invalid = mask.clone().lower_equal_elem(0.5);
    let student_logp = student_logp.mask_fill(invalid.clone(), 0.0);
    let behaviour_logp = behaviour_logp.detach().mask_fill(invalid.clone(), 0.0);
    let teacher_logp = teacher_logp.detach().mask_fill(invalid, 0.0);
    let advantage = teacher_logp - student_logp.clone().detach();
    let ratio = (student_logp - behaviour_logp).exp().clamp_max(ratio_clip);
    reduce(ratio.mul(advantage).neg(), mask, reduction)
}

/// Row-wise `logsumexp` of `[rows, W]`, `[rows, 1]`, shifted by the detached row maximum
/// (the shift cancels in value and gradient). Entries may be `−∞` as long as one per row is
/// finite.
pub(crate) fn logsumexp_rows<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let max = x.clone().detach().max_dim(1);
    x.sub(max.clone()).exp().sum_dim(1).log().add(max)
}

/// Row-wise `log_softmax` of `[rows, W]`, as PyTorch computes it: `(x − max) − log Σ e^{x − max}`
/// with the detached row maximum. Subtracting the maximum first keeps the result exact to
/// f32 rounding of `log Σ` (≈ 1 ulp), where `x − logsumexp(x)` would lose `ulp(max x)`: at
/// logit scale 12 that is ~200× more on peaked rows.
pub(crate) fn log_softmax_rows<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let max = x.clone().detach().max_dim(1);
    let shifted = x.sub(max);
    let log_sum = shifted.clone().exp().sum_dim(1).log();
    shifted.sub(log_sum)
}

/// Element-wise `log(exp(a) + exp(b))`, shifted by the detached element-wise maximum.
pub(crate) fn logaddexp<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    let max = a.clone().max_pair(b.clone()).detach();
    a.sub(max.clone())
        .exp()
        .add(b.sub(max.clone()).exp())
        .log()
        .add(max)
}

/// `ln(1 − β)` and `ln β`, as TRL (`torch.log1p(-beta)`, `torch.log(beta)`), in f64 then f32.
pub(crate) fn jsd_log_weights(beta: f32) -> (f32, f32) {
    let beta = beta as f64;
    (
        num_traits::Float::ln_1p(-beta) as f32,
        num_traits::Float::ln(beta) as f32,
    )
}

/// Boolean `[rows, V]` membership of the student's top-`k` entries and their indices
/// `[rows, k]`.
pub(crate) fn top_k_members<B: Backend>(
    z: Tensor<B, 2>,
    k: usize,
) -> (Tensor<B, 2, Int>, Tensor<B, 2, burn::tensor::Bool>) {
    let [rows, v] = z.dims();
    let device = z.device();
    // `argtopk` is not implemented by every backend (NdArray 0.21 lacks it); a descending
    // argsort is.
    let idx = z.detach().argsort_descending(1).narrow(1, 0, k);
    let members = Tensor::<B, 2>::zeros([rows, v], &device)
        .scatter(
            1,
            idx.clone(),
            Tensor::ones([rows, k], &device),
            IndexingUpdateOp::Add,
        )
        .greater_elem(0.5);
    (idx, members)
}

/// The `k`- or `(k+1)`-way log-distributions of [`TopK`] for scaled logits `z` (student) and
/// `t` (teacher), `[rows, V]`, with `k < V`. Without tail: `log_softmax` over the student's
/// top-k entries of each. With tail: the full log-probabilities of those entries plus
/// `log Σ_{v ∉ top-k} p(v)`, computed as a logsumexp over the complement (not `log(1 − Σ)`,
/// which cancels catastrophically when the tail is small).
pub(crate) fn top_k_log_probs<B: Backend>(
    z: Tensor<B, 2>,
    t: Tensor<B, 2>,
    top: TopK,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let (idx, members) = top_k_members(z.clone(), top.k);
    let zk = z.clone().gather(1, idx.clone());
    let tk = t.clone().gather(1, idx);
    if !top.tail {
        return (log_softmax(zk, 1), log_softmax(tk, 1));
    }
    let with_tail = |x: Tensor<B, 2>, xk: Tensor<B, 2>| {
        let lse = logsumexp_rows(x.clone());
        let lse_rest = logsumexp_rows(x.mask_fill(members.clone(), f32::NEG_INFINITY));
        Tensor::cat(vec![xk.sub(lse.clone()), lse_rest.sub(lse)], 1)
    };
    (with_tail(z, zk), with_tail(t, tk))
}

/// Row-wise divergence `[rows]` between normalised log-distributions `ls` (student) and `lq`
/// (teacher), `[rows, W]`, with the optional point-wise clip applied to each KL term.
pub(crate) fn base_divergence<B: Backend>(
    ls: Tensor<B, 2>,
    lq: Tensor<B, 2>,
    divergence: Divergence,
    kl_clip: Option<f32>,
) -> Tensor<B, 1> {
    let clip = |x: Tensor<B, 2>| match kl_clip {
        Some(c) => x.clamp(-c, c),
        None => x,
    };
    let rows = ls.dims()[0];
    let per_row = match divergence {
        Divergence::ForwardKl | Divergence::Jsd { beta: 0.0 } => {
            clip(lq.clone().exp().mul(lq.sub(ls))).sum_dim(1)
        }
        Divergence::ReverseKl | Divergence::Jsd { beta: 1.0 } => {
            clip(ls.clone().exp().mul(ls.sub(lq))).sum_dim(1)
        }
        Divergence::Jsd { beta } => {
            let (log_1m_beta, log_beta) = jsd_log_weights(beta);
            let lm = logaddexp(
                ls.clone().add_scalar(log_1m_beta),
                lq.clone().add_scalar(log_beta),
            );
            let kl_teacher = clip(lq.clone().exp().mul(lq.sub(lm.clone())));
            let kl_student = clip(ls.clone().exp().mul(ls.sub(lm)));
            kl_teacher
                .mul_scalar(beta)
                .add(kl_student.mul_scalar(1.0 - beta))
                .sum_dim(1)
        }
        Divergence::SampledReverseKl { .. } => {
            panic!("per_token_divergence: SampledReverseKl has no per-token distribution divergence; use sampled_token_loss")
        }
    };
    per_row.reshape([rows])
}
