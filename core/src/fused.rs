//! The distillation losses of [`crate::divergence`] computed chunk by chunk from the student's
//! final hidden states and LM-head weight, with exact analytic gradients, so that no
//! `[N·R, V]` tensor ever exists (the idea of Liger-Kernel's fused linear cross-entropy,
//! Hsu et al. 2024, applied to distillation divergences).

use alloc::vec::Vec;

use burn::tensor::{
    backend::{AutodiffBackend, Backend},
    ElementConversion, IndexingUpdateOp, Int, Tensor,
};

use crate::divergence::{
    jsd_log_weights, log_softmax_rows, logaddexp, logsumexp_rows, top_k_members, Divergence,
    LossConfig, LossConfigError, Reduction, TopK,
};

/// Where the teacher's next-token distribution comes from.
#[derive(Clone, Debug)]
pub enum TeacherInput<B: Backend> {
    /// Teacher final hidden states `[N, R, H]` and its LM head `[V, H]`; the teacher's
    /// log-probabilities are made chunk by chunk alongside the student's.
    Hidden {
        /// `[N, R, H]`, aligned with the student by position within the response.
        hidden: Tensor<B, 3>,
        /// `[V, H]`.
        weight: Tensor<B, 2>,
    },
    /// Teacher logits `[N, R, V]` (small vocabularies, tests).
    Logits(Tensor<B, 3>),
}

/// The sampled responses the loss is evaluated on.
#[derive(Clone, Debug)]
pub struct ResponseBatch<B: Backend> {
    /// Sampled response tokens `[N, R]`.
    pub tokens: Tensor<B, 2, Int>,
    /// `[N, R]`, 1.0 on valid response tokens, 0.0 on padding.
    pub mask: Tensor<B, 2>,
    /// `[N, R]` log-probability of each sampled token under the behaviour policy (used by
    /// [`crate::divergence::Divergence::SampledReverseKl`]).
    pub behaviour_logp: Tensor<B, 2>,
}

/// Scalar metrics of one loss evaluation.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossStats {
    /// The reduced loss.
    pub loss: f32,
    /// Mean per-token divergence over valid tokens (for the sampled-token mode, the
    /// single-sample estimate `log p_S(y) − log p_T(y)`).
    pub mean_divergence: f32,
    /// Mean over valid tokens of the student's entropy `−Σ_v p_S log p_S` at the loss
    /// temperature.
    pub student_entropy: f32,
    /// Fraction of valid tokens whose importance ratio exceeded `ratio_clip` (sampled-token
    /// mode; 0 otherwise).
    pub clip_fraction: f32,
    /// Number of valid (unmasked) tokens.
    pub valid_tokens: usize,
}

/// Loss gradients with respect to the student's hidden states and LM head.
#[derive(Clone, Debug)]
pub struct LossGrads<B: Backend> {
    /// `∂L/∂hidden`, `[N, R, H]`.
    pub grad_hidden: Tensor<B, 3>,
    /// `∂L/∂W`, `[V, H]`.
    pub grad_weight: Tensor<B, 2>,
    /// Loss value and metrics.
    pub stats: LossStats,
}

/// Why the fused loss cannot be evaluated on these inputs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FusedLossError {
    /// The [`LossConfig`] is outside its domain.
    #[error(transparent)]
    Config(#[from] LossConfigError),
    /// `chunk_rows` is 0.
    #[error("fused loss: chunk_rows must be >= 1, found 0")]
    ZeroChunkRows,
    /// A tensor's shape disagrees with the student hidden states / LM head.
    #[error("fused loss: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// Which input.
        tensor: &'static str,
        /// Shape implied by `hidden` `[N, R, H]` and `weight` `[V, H]`.
        expected: Vec<usize>,
        /// Shape received.
        found: Vec<usize>,
    },
    /// A valid (unmasked) response token id is outside `[0, V)`.
    #[error(
        "fused loss: batch.tokens holds id {found} at a valid position, vocabulary size is {vocab}"
    )]
    TokenOutOfRange {
        /// The offending id (the smallest or largest seen).
        found: i64,
        /// `V`.
        vocab: usize,
    },
}

/// Exact loss and analytic gradients w.r.t. student `hidden` `[N, R, H]` and LM head `weight`
/// `[V, H]`, processing `chunk_rows` of the `N·R` rows at a time and never materialising
/// `[N·R, V]` (peak extra memory is `O(chunk_rows · V + V · H)`).
///
/// For each chunk, with `z = h Wᵀ / τ`, row weight `w_r` (from the mask and the
/// [`Reduction`]) and per-row divergence `D_r(z_r)`, the loss is `L = Σ_r w_r D_r` and
/// `G = w_r ∂D_r/∂z_r / τ`, `∂L/∂h = G W`, `∂L/∂W = Σ_chunks Gᵀ h`. `∂D/∂z` is derived in
/// closed form through the log-softmax Jacobian, `∂D/∂z = g − p Σ_v g_v` with
/// `g = ∂D/∂log p_S` (plus the top-k/tail bucket chain rule), and equals autodiff of
/// [`crate::divergence::loss_from_logits`] to f32 rounding (tested).
///
/// Padded rows (mask ≤ 0.5) have their hidden states, teacher rows, tokens and behaviour
/// log-probs replaced by zeros before use, so their content (even NaN) changes nothing.
///
/// # Panics
/// Where [`try_fused_loss_and_grads`] returns an error.
pub fn fused_loss_and_grads<B: Backend>(
    hidden: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    teacher: TeacherInput<B>,
    batch: &ResponseBatch<B>,
    cfg: &LossConfig,
    chunk_rows: usize,
) -> LossGrads<B> {
    match try_fused_loss_and_grads(hidden, weight, teacher, batch, cfg, chunk_rows) {
        Ok(grads) => grads,
        Err(e) => panic!("{e}"),
    }
}

/// [`fused_loss_and_grads`] returning an error instead of panicking on a bad config, a zero
/// `chunk_rows`, mismatched shapes or out-of-range tokens.
pub fn try_fused_loss_and_grads<B: Backend>(
    hidden: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    teacher: TeacherInput<B>,
    batch: &ResponseBatch<B>,
    cfg: &LossConfig,
    chunk_rows: usize,
) -> Result<LossGrads<B>, FusedLossError> {
    let core = fused_core(hidden, weight, teacher, batch, cfg, chunk_rows, true)?;
    Ok(LossGrads {
        grad_hidden: core.grad_hidden,
        grad_weight: core
            .grad_weight
            .expect("fused_core computes the head's gradient when asked to"),
        stats: core.stats,
    })
}

/// What [`fused_core`] returns: the gradients, `∂L/∂W` only when asked for, and the loss as
/// a tensor.
struct CoreOutput<B: Backend> {
    grad_hidden: Tensor<B, 3>,
    grad_weight: Option<Tensor<B, 2>>,
    stats: LossStats,
    loss: Tensor<B, 1>,
}

fn check_shape(
    tensor: &'static str,
    found: &[usize],
    expected: &[usize],
) -> Result<(), FusedLossError> {
    if found == expected {
        Ok(())
    } else {
        Err(FusedLossError::Shape {
            tensor,
            expected: expected.to_vec(),
            found: found.to_vec(),
        })
    }
}

fn scalar<B: Backend>(x: Tensor<B, 1>) -> f32 {
    x.into_scalar().elem::<f32>()
}

/// Per-chunk result: per-row divergence `[c, 1]`, `∂D/∂z` `[c, V]`, student entropy `[c, 1]`,
/// and (sampled-token mode) the clipped-ratio indicator `[c, 1]`.
struct RowTerms<B: Backend> {
    divergence: Tensor<B, 2>,
    grad_z: Tensor<B, 2>,
    entropy: Tensor<B, 2>,
    clipped: Option<Tensor<B, 2>>,
    /// The value whose weighted sum is the loss (`D` or `−ρ·A`).
    objective: Tensor<B, 2>,
}

/// The chunked loss; `weight_grad = false` skips `∂L/∂W` (a frozen head, as under LoRA): no
/// `[V, H]` accumulator and no `Gᵀh` products.
fn fused_core<B: Backend>(
    hidden: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    teacher: TeacherInput<B>,
    batch: &ResponseBatch<B>,
    cfg: &LossConfig,
    chunk_rows: usize,
    weight_grad: bool,
) -> Result<CoreOutput<B>, FusedLossError> {
    cfg.validate()?;
    if chunk_rows == 0 {
        return Err(FusedLossError::ZeroChunkRows);
    }
    let [n, r, h] = hidden.dims();
    let [v, hw] = weight.dims();
    check_shape("weight", &[v, hw], &[v, h])?;
    check_shape("batch.tokens", &batch.tokens.dims(), &[n, r])?;
    check_shape("batch.mask", &batch.mask.dims(), &[n, r])?;
    check_shape(
        "batch.behaviour_logp",
        &batch.behaviour_logp.dims(),
        &[n, r],
    )?;
    let rows = n * r;
    let device = hidden.device();
    let tau = cfg.temperature;

    let valid = batch.mask.clone().greater_elem(0.5);
    let valid_f = valid.clone().float();
    let valid_tokens = scalar(valid_f.clone().sum()) as usize;
    let row_weight = match cfg.reduction {
        Reduction::Token => valid_f.clone().div_scalar((valid_tokens.max(1)) as f32),
        Reduction::Sequence => {
            let per_seq = valid_f.clone().sum_dim(1);
            let sequences = scalar(per_seq.clone().greater_elem(0.0).float().sum()).max(1.0);
            valid_f
                .clone()
                .div(per_seq.clamp_min(1.0).mul_scalar(sequences))
        }
    }
    .reshape([rows, 1]);
    let valid_rows = valid.reshape([rows, 1]);
    let invalid_rows = valid_rows.clone().bool_not();

    let tokens = batch
        .tokens
        .clone()
        .reshape([rows, 1])
        .mask_fill(invalid_rows.clone(), 0);
    if matches!(cfg.divergence, Divergence::SampledReverseKl { .. }) && rows > 0 {
        let lo = tokens.clone().min().into_scalar().elem::<i64>();
        let hi = tokens.clone().max().into_scalar().elem::<i64>();
        for found in [lo, hi] {
            if found < 0 || found >= v as i64 {
                return Err(FusedLossError::TokenOutOfRange { found, vocab: v });
            }
        }
    }
    let behaviour = batch
        .behaviour_logp
        .clone()
        .reshape([rows, 1])
        .mask_fill(invalid_rows.clone(), 0.0);

    enum Teacher<B: Backend> {
        Hidden(Tensor<B, 2>, Tensor<B, 2>),
        Logits(Tensor<B, 2>),
    }
    let teacher = match teacher {
        TeacherInput::Hidden {
            hidden: th,
            weight: tw,
        } => {
            let [tn, tr, th_dim] = th.dims();
            check_shape("teacher.hidden", &[tn, tr], &[n, r])?;
            check_shape("teacher.weight", &tw.dims(), &[v, th_dim])?;
            Teacher::Hidden(th.reshape([rows, th_dim]), tw)
        }
        TeacherInput::Logits(tl) => {
            check_shape("teacher.logits", &tl.dims(), &[n, r, v])?;
            Teacher::Logits(tl.reshape([rows, v]))
        }
    };

    let h2 = hidden.reshape([rows, h]);
    let mut loss = Tensor::<B, 1>::zeros([1], &device);
    let mut divergence_sum = Tensor::<B, 1>::zeros([1], &device);
    let mut entropy_sum = Tensor::<B, 1>::zeros([1], &device);
    let mut clipped_sum = Tensor::<B, 1>::zeros([1], &device);
    // ∂L/∂W in vocabulary slices, each sized like one `[chunk_rows, V]` chunk.
    let vocab_slice = (chunk_rows.saturating_mul(v) / h.max(1)).clamp(1, v.max(1));
    let mut grad_weight: Vec<Tensor<B, 2>> = Vec::new();
    let mut grad_hidden = Vec::with_capacity(rows.div_ceil(chunk_rows));

    let mut start = 0;
    while start < rows {
        let len = chunk_rows.min(rows - start);
        let invalid = invalid_rows.clone().narrow(0, start, len);
        let w = row_weight.clone().narrow(0, start, len);
        let h_c = h2
            .clone()
            .narrow(0, start, len)
            .mask_fill(invalid.clone().expand([len, h]), 0.0);
        // Logits as `(W hᵀ)ᵀ` rather than `h Wᵀ`: backends that need contiguous matmul operands
        // (NdArray) would otherwise copy the whole transposed `[H, V]` head for every chunk,
        // while `hᵀ` is small.
        let z = lm_logits(h_c.clone(), weight.clone()).div_scalar(tau);
        let t = match &teacher {
            Teacher::Hidden(th, tw) => {
                let th_dim = th.dims()[1];
                lm_logits(
                    th.clone()
                        .narrow(0, start, len)
                        .mask_fill(invalid.clone().expand([len, th_dim]), 0.0),
                    tw.clone(),
                )
            }
            Teacher::Logits(tl) => tl
                .clone()
                .narrow(0, start, len)
                .mask_fill(invalid.clone().expand([len, v]), 0.0),
        }
        .div_scalar(tau);

        let terms = match cfg.divergence {
            Divergence::SampledReverseKl { ratio_clip } => sampled_terms(
                z,
                t,
                tokens.clone().narrow(0, start, len),
                behaviour.clone().narrow(0, start, len),
                ratio_clip,
            ),
            divergence => match cfg.top_k {
                Some(top) if top.k < v => top_k_terms(z, t, top, divergence, cfg.kl_clip),
                _ => full_terms(z, t, divergence, cfg.kl_clip),
            },
        };

        loss = loss.add(terms.objective.mul(w.clone()).sum());
        divergence_sum = divergence_sum.add(terms.divergence.mask_fill(invalid.clone(), 0.0).sum());
        entropy_sum = entropy_sum.add(terms.entropy.mask_fill(invalid.clone(), 0.0).sum());
        if let Some(clipped) = terms.clipped {
            clipped_sum = clipped_sum.add(clipped.mask_fill(invalid, 0.0).sum());
        }
        let g = terms.grad_z.mul(w.div_scalar(tau));
        grad_hidden.push(g.clone().matmul(weight.clone()));
        if !weight_grad {
            start += len;
            continue;
        }
        // ∂L/∂W += Gᵀ h, one vocabulary slice at a time, each added into its own accumulator:
        // a full `[V, H]` product per chunk would double the peak memory, and the addition
        // happens in place (backends mutate uniquely-owned tensors). Writing slices into one
        // `[V, H]` tensor instead would copy all of it per slice on backends whose
        // `slice_assign` is not in place (Flex 0.21).
        let mut previous = core::mem::take(&mut grad_weight).into_iter();
        let mut v0 = 0;
        while v0 < v {
            let vs = vocab_slice.min(v - v0);
            let partial = g.clone().narrow(1, v0, vs).transpose().matmul(h_c.clone());
            grad_weight.push(match previous.next() {
                Some(acc) => acc.add(partial),
                None => partial,
            });
            v0 += vs;
        }
        start += len;
    }

    let grad_weight = weight_grad.then(|| match grad_weight.len() {
        0 => Tensor::zeros([v, h], &device),
        1 => grad_weight.remove(0),
        _ => Tensor::cat(grad_weight, 0),
    });
    let grad_hidden = if grad_hidden.is_empty() {
        Tensor::zeros([n, r, h], &device)
    } else {
        Tensor::cat(grad_hidden, 0).reshape([n, r, h])
    };
    let denom = valid_tokens.max(1) as f32;
    let stats = LossStats {
        loss: scalar(loss.clone()),
        mean_divergence: scalar(divergence_sum) / denom,
        student_entropy: scalar(entropy_sum) / denom,
        clip_fraction: scalar(clipped_sum) / denom,
        valid_tokens,
    };
    Ok(CoreOutput {
        grad_hidden,
        grad_weight,
        stats,
        loss,
    })
}

/// Logits `[c, V] = (W hᵀ)ᵀ` for hidden rows `h` `[c, H]` and head `W` `[V, H]`, made
/// row-major again by the reshape: row reductions over a column-major `[c, V]` view would sum
/// the vocabulary sequentially (O(V·ε) rounding) instead of lane-wise. `W hᵀ` rather than
/// `h Wᵀ`, because backends that need contiguous matmul operands (NdArray) would copy the
/// whole transposed head on every call.
pub fn lm_logits<B: Backend>(h: Tensor<B, 2>, weight: Tensor<B, 2>) -> Tensor<B, 2> {
    let [c, _] = h.dims();
    let v = weight.dims()[0];
    weight.matmul(h.transpose()).transpose().reshape([c, v])
}

/// `κ(f) = 1[|f| ≤ c]`: where the clamp passes the gradient (as `torch.clamp`).
fn clip_pass<B: Backend>(f: &Tensor<B, 2>, kl_clip: Option<f32>) -> Option<Tensor<B, 2>> {
    kl_clip.map(|c| f.clone().abs().lower_equal_elem(c).float())
}

fn clip_value<B: Backend>(f: Tensor<B, 2>, kl_clip: Option<f32>) -> Tensor<B, 2> {
    match kl_clip {
        Some(c) => f.clamp(-c, c),
        None => f,
    }
}

fn times_pass<B: Backend>(x: Tensor<B, 2>, pass: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
    match pass {
        Some(k) => x.mul(k),
        None => x,
    }
}

/// Per-row divergence `[c, 1]` and `g = ∂D/∂ls` `[c, W]`, treating each entry of the student
/// log-distribution `ls` as an independent variable (the Jacobian of the normalisation is
/// applied by the caller). With `p = e^ls`, `q = e^lq`, `κ` the clip pass-through:
/// - forward KL: `D = Σ clip(q (lq − ls))`, `g = −κ q`;
/// - reverse KL: `D = Σ clip(p (ls − lq))`, `g = κ p (ls − lq + 1)`;
/// - JSD(β): `lm = logaddexp(ls + ln(1−β), lq + ln β)`, `r = (1−β) p / m = e^{ls + ln(1−β) − lm}`,
///   `D = β Σ clip(q (lq − lm)) + (1−β) Σ clip(p (ls − lm))`,
///   `g = −β κ_T q r + (1−β) κ_S p (ls − lm + 1 − r)`.
fn base_with_grad<B: Backend>(
    ls: Tensor<B, 2>,
    lq: Tensor<B, 2>,
    divergence: Divergence,
    kl_clip: Option<f32>,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let p = ls.clone().exp();
    let q = lq.clone().exp();
    if kl_clip.is_none() {
        return base_with_grad_unclipped(ls, lq, p, q, divergence);
    }
    match divergence {
        Divergence::ForwardKl | Divergence::Jsd { beta: 0.0 } => {
            let f = q.clone().mul(lq.sub(ls));
            let pass = clip_pass(&f, kl_clip);
            let d = clip_value(f, kl_clip).sum_dim(1);
            (d, times_pass(q.neg(), pass))
        }
        Divergence::ReverseKl | Divergence::Jsd { beta: 1.0 } => {
            let diff = ls.sub(lq);
            let f = p.clone().mul(diff.clone());
            let pass = clip_pass(&f, kl_clip);
            let d = clip_value(f, kl_clip).sum_dim(1);
            (d, times_pass(p.mul(diff.add_scalar(1.0)), pass))
        }
        Divergence::Jsd { beta } => {
            let (log_1m_beta, log_beta) = jsd_log_weights(beta);
            let ls_w = ls.clone().add_scalar(log_1m_beta);
            let lm = logaddexp(ls_w.clone(), lq.clone().add_scalar(log_beta));
            let ratio = ls_w.sub(lm.clone()).exp();
            let f_teacher = q.clone().mul(lq.sub(lm.clone()));
            let ls_minus_lm = ls.sub(lm);
            let f_student = p.clone().mul(ls_minus_lm.clone());
            let pass_teacher = clip_pass(&f_teacher, kl_clip);
            let pass_student = clip_pass(&f_student, kl_clip);
            let d = clip_value(f_teacher, kl_clip)
                .mul_scalar(beta)
                .add(clip_value(f_student, kl_clip).mul_scalar(1.0 - beta))
                .sum_dim(1);
            let g_teacher = times_pass(q.mul(ratio.clone()).mul_scalar(-beta), pass_teacher);
            let g_student = times_pass(
                p.mul(ls_minus_lm.add_scalar(1.0).sub(ratio))
                    .mul_scalar(1.0 - beta),
                pass_student,
            );
            (d, g_teacher.add(g_student))
        }
        Divergence::SampledReverseKl { .. } => {
            unreachable!("sampled-token mode is handled by sampled_terms")
        }
    }
}

/// [`base_with_grad`] without the point-wise clip, in the forms that lose least to f32
/// rounding. The caller projects `g` as `g − p Σ g`, which is unchanged by adding `c·p` to `g`
/// (`Σ p = 1`), so terms that are such a shift are left out rather than cancelled in
/// rounding: the `+1` of reverse KL, and for JSD the identity `β q r + (1−β) p r = r m =
/// (1−β) p` folds the three terms into one:
/// - forward KL: `g = p − q` (the shift of `−q` by `p`);
/// - reverse KL: `g = p (ls − lq)`;
/// - JSD(β): `g = (1−β) p (ls − lm)`.
fn base_with_grad_unclipped<B: Backend>(
    ls: Tensor<B, 2>,
    lq: Tensor<B, 2>,
    p: Tensor<B, 2>,
    q: Tensor<B, 2>,
    divergence: Divergence,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    match divergence {
        Divergence::ForwardKl | Divergence::Jsd { beta: 0.0 } => {
            let d = q.clone().mul(lq.sub(ls)).sum_dim(1);
            (d, p.sub(q))
        }
        Divergence::ReverseKl | Divergence::Jsd { beta: 1.0 } => {
            let f = p.clone().mul(ls.sub(lq));
            (f.clone().sum_dim(1), f)
        }
        Divergence::Jsd { beta } => {
            let (log_1m_beta, log_beta) = jsd_log_weights(beta);
            let lm = logaddexp(
                ls.clone().add_scalar(log_1m_beta),
                lq.clone().add_scalar(log_beta),
            );
            let f_teacher = q.mul(lq.sub(lm.clone()));
            let f_student = p.mul(ls.sub(lm));
            let d = f_teacher
                .mul_scalar(beta)
                .add(f_student.clone().mul_scalar(1.0 - beta))
                .sum_dim(1);
            (d, f_student.mul_scalar(1.0 - beta))
        }
        Divergence::SampledReverseKl { .. } => {
            unreachable!("sampled-token mode is handled by sampled_terms")
        }
    }
}

/// Full-vocabulary divergence: `∂D/∂z = g − p Σ_v g_v`.
fn full_terms<B: Backend>(
    z: Tensor<B, 2>,
    t: Tensor<B, 2>,
    divergence: Divergence,
    kl_clip: Option<f32>,
) -> RowTerms<B> {
    let ls = log_softmax_rows(z);
    let lq = log_softmax_rows(t);
    let p = ls.clone().exp();
    let entropy = p.clone().mul(ls.clone()).sum_dim(1).neg();
    let (d, g) = base_with_grad(ls, lq, divergence, kl_clip);
    let grad_z = g.clone().sub(p.mul(g.sum_dim(1)));
    RowTerms {
        divergence: d.clone(),
        grad_z,
        entropy,
        clipped: None,
        objective: d,
    }
}

/// Top-k divergence on the student's top-k entries `S` (see [`TopK`]).
/// Without tail (`ls' = log_softmax(z_S)`): `∂D/∂z_i = g_i − p'_i Σ g` for `i ∈ S`, 0 elsewhere.
/// With tail (`ls'_i = ls_i` for `i ∈ S`, `ls'_tail = lse(z_{∉S}) − lse(z)`):
/// `∂D/∂z_i = −p_i Σ g + (i ∈ S ? g_i : e^{z_i − lse(z_{∉S})} g_tail)`.
fn top_k_terms<B: Backend>(
    z: Tensor<B, 2>,
    t: Tensor<B, 2>,
    top: TopK,
    divergence: Divergence,
    kl_clip: Option<f32>,
) -> RowTerms<B> {
    let [len, v] = z.dims();
    let k = top.k;
    let device = z.device();
    let ls_full = log_softmax_rows(z.clone());
    let p = ls_full.clone().exp();
    let entropy = p.clone().mul(ls_full.clone()).sum_dim(1).neg();
    let (idx, members) = top_k_members(z.clone(), k);
    let scatter = |values: Tensor<B, 2>| {
        Tensor::<B, 2>::zeros([len, v], &device).scatter(
            1,
            idx.clone(),
            values,
            IndexingUpdateOp::Add,
        )
    };
    let (d, grad_z) = if !top.tail {
        let zk = z.gather(1, idx.clone());
        let tk = t.gather(1, idx.clone());
        let ls = log_softmax_rows(zk);
        let lq = log_softmax_rows(tk);
        let pk = ls.clone().exp();
        let (d, g) = base_with_grad(ls, lq, divergence, kl_clip);
        let gk = g.clone().sub(pk.mul(g.sum_dim(1)));
        (d, scatter(gk))
    } else {
        let lse_z = logsumexp_rows(z.clone());
        let lse_t = logsumexp_rows(t.clone());
        let z_rest = z.mask_fill(members.clone(), f32::NEG_INFINITY);
        let lse_z_rest = logsumexp_rows(z_rest.clone());
        let lse_t_rest = logsumexp_rows(t.clone().mask_fill(members, f32::NEG_INFINITY));
        let ls = Tensor::cat(
            alloc::vec![
                ls_full.gather(1, idx.clone()),
                lse_z_rest.clone().sub(lse_z)
            ],
            1,
        );
        let lq = Tensor::cat(
            alloc::vec![
                t.sub(lse_t.clone()).gather(1, idx.clone()),
                lse_t_rest.sub(lse_t)
            ],
            1,
        );
        let (d, g) = base_with_grad(ls, lq, divergence, kl_clip);
        let g_sum = g.clone().sum_dim(1);
        let g_top = g.clone().narrow(1, 0, k);
        let g_tail = g.narrow(1, k, 1);
        let rest_share = z_rest.sub(lse_z_rest).exp();
        let grad_z = scatter(g_top).add(rest_share.mul(g_tail)).sub(p.mul(g_sum));
        (d, grad_z)
    };
    RowTerms {
        divergence: d.clone(),
        grad_z,
        entropy,
        clipped: None,
        objective: d,
    }
}

/// Sampled-token mode: `ls_y = z_y − lse(z)`, `lt_y = t_y − lse(t)`, `A = lt_y − ls_y`,
/// `ρ = exp(ls_y − log p_behaviour)`, objective `−min(ρ, clip)·A`,
/// `∂/∂z = −A ρ 1[ρ ≤ clip] (e_y − p)`.
fn sampled_terms<B: Backend>(
    z: Tensor<B, 2>,
    t: Tensor<B, 2>,
    tokens: Tensor<B, 2, Int>,
    behaviour: Tensor<B, 2>,
    ratio_clip: f32,
) -> RowTerms<B> {
    let ls_full = log_softmax_rows(z);
    let p = ls_full.clone().exp();
    let entropy = p.clone().mul(ls_full.clone()).sum_dim(1).neg();
    let ls_y = ls_full.gather(1, tokens.clone());
    let lt_y = log_softmax_rows(t).gather(1, tokens.clone());
    let advantage = lt_y.sub(ls_y.clone());
    let ratio = ls_y.sub(behaviour).exp();
    let clipped = ratio.clone().greater_elem(ratio_clip).float();
    let objective = ratio
        .clone()
        .clamp_max(ratio_clip)
        .mul(advantage.clone())
        .neg();
    let coef = advantage
        .clone()
        .mul(ratio)
        .mul(clipped.clone().neg().add_scalar(1.0))
        .neg();
    let grad_z = p
        .mul(coef.clone().neg())
        .scatter(1, tokens, coef, IndexingUpdateOp::Add);
    RowTerms {
        divergence: advantage.neg(),
        grad_z,
        entropy,
        clipped: Some(clipped),
        objective,
    }
}

/// The loss as an autodiff node.
#[derive(Clone, Debug)]
pub struct FusedLoss<B: AutodiffBackend> {
    /// A scalar `[1]` whose value is the loss and whose gradient w.r.t. `hidden` and `weight`
    /// is exactly the loss gradient.
    pub surrogate: Tensor<B, 1>,
    /// Loss value and metrics.
    pub stats: LossStats,
}

/// Autodiff entry point: `surrogate.backward()` yields exactly the loss gradients for every
/// parameter upstream of `hidden` and `weight`.
///
/// `surrogate = S − sg(S) + L` with `S = ⟨hidden, G_h⟩ + ⟨weight, G_W⟩`, where `G_h`, `G_W`
/// are the detached analytic gradients from [`fused_loss_and_grads`] and `sg` is
/// stop-gradient, so its value is `L` and its gradients are `G_h`, `G_W`.
///
/// ```
/// use burn::backend::{Autodiff, NdArray};
/// use burn::tensor::{Int, Tensor, TensorData};
/// use omniopsd_core::divergence::{loss_from_logits, LossConfig};
/// use omniopsd_core::fused::{fused_distillation, lm_logits, ResponseBatch, TeacherInput};
///
/// type Cpu = NdArray<f32>;
/// type B = Autodiff<Cpu>;
/// let device = Default::default();
/// let values = |n: usize, k: usize| -> Vec<f32> {
///     (0..n).map(|i| ((i * k % 11) as f32 - 5.0) / 5.0).collect()
/// };
/// // 2 sampled responses of 3 tokens, hidden size 4, vocabulary 10.
/// let hidden = Tensor::<B, 3>::from_data(TensorData::new(values(24, 7), [2, 3, 4]), &device)
///     .require_grad();
/// let head = Tensor::<B, 2>::from_data(TensorData::new(values(40, 3), [10, 4]), &device)
///     .require_grad();
/// let teacher_hidden = Tensor::<Cpu, 3>::from_data(TensorData::new(values(24, 5), [2, 3, 4]), &device);
/// let batch = ResponseBatch::<Cpu> {
///     tokens: Tensor::<Cpu, 2, Int>::from_ints([[1, 2, 3], [4, 5, 0]], &device),
///     mask: Tensor::from_floats([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], &device),
///     behaviour_logp: Tensor::zeros([2, 3], &device),
/// };
/// let cfg = LossConfig::default();
/// let teacher = TeacherInput::Hidden { hidden: teacher_hidden.clone(), weight: head.clone().inner() };
/// // Two rows of the 6 at a time: only [2, 10] logits ever exist.
/// let loss = fused_distillation::<B>(hidden.clone(), head.clone(), teacher, &batch, &cfg, 2);
/// assert_eq!(loss.stats.valid_tokens, 5);
///
/// // The same loss from full logits.
/// let logits = |h: Tensor<Cpu, 3>| lm_logits(h.reshape([6, 4]), head.clone().inner()).reshape([2, 3, 10]);
/// let reference = loss_from_logits(
///     logits(hidden.clone().inner()),
///     logits(teacher_hidden),
///     batch.tokens.clone(),
///     batch.mask.clone(),
///     batch.behaviour_logp.clone(),
///     &cfg,
/// )
/// .into_scalar();
/// assert!((loss.stats.loss - reference).abs() <= 1e-5 * reference.abs().max(1.0));
///
/// // Its gradient reaches everything upstream of the hidden states and the LM head.
/// let grads = loss.surrogate.backward();
/// assert_eq!(hidden.grad(&grads).unwrap().dims(), [2, 3, 4]);
/// assert_eq!(head.grad(&grads).unwrap().dims(), [10, 4]);
/// ```
///
/// # Panics
/// Where [`try_fused_distillation`] returns an error.
pub fn fused_distillation<B: AutodiffBackend>(
    hidden: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    teacher: TeacherInput<B::InnerBackend>,
    batch: &ResponseBatch<B::InnerBackend>,
    cfg: &LossConfig,
    chunk_rows: usize,
) -> FusedLoss<B> {
    match try_fused_distillation(hidden, weight, teacher, batch, cfg, chunk_rows) {
        Ok(loss) => loss,
        Err(e) => panic!("{e}"),
    }
}

/// [`fused_distillation`] returning an error instead of panicking.
pub fn try_fused_distillation<B: AutodiffBackend>(
    hidden: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    teacher: TeacherInput<B::InnerBackend>,
    batch: &ResponseBatch<B::InnerBackend>,
    cfg: &LossConfig,
    chunk_rows: usize,
) -> Result<FusedLoss<B>, FusedLossError> {
    try_fused_distillation_with_head(hidden, weight, true, teacher, batch, cfg, chunk_rows)
}

/// [`try_fused_distillation`], where `head_grad = false` leaves out the LM head's gradient:
/// for a frozen head (the base under LoRA adapters, [`crate::PolicyModel::lm_head_trainable`])
/// it saves a `[V, H]` tensor per call held until the backward pass, and the `Gᵀh` products.
/// The loss and the gradient of everything upstream of `hidden` are the same, bit for bit;
/// `weight` gets no gradient through this loss even if it requires one.
pub fn try_fused_distillation_with_head<B: AutodiffBackend>(
    hidden: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    head_grad: bool,
    teacher: TeacherInput<B::InnerBackend>,
    batch: &ResponseBatch<B::InnerBackend>,
    cfg: &LossConfig,
    chunk_rows: usize,
) -> Result<FusedLoss<B>, FusedLossError> {
    let weight_grad = head_grad;
    let core = fused_core(
        hidden.clone().inner(),
        weight.clone().inner(),
        teacher,
        batch,
        cfg,
        chunk_rows,
        weight_grad,
    )?;
    let mut linear = hidden.mul(Tensor::from_inner(core.grad_hidden)).sum();
    if let Some(grad_weight) = core.grad_weight {
        linear = linear.add(weight.mul(Tensor::from_inner(grad_weight)).sum());
    }
    let surrogate = linear
        .clone()
        .sub(linear.detach())
        .add(Tensor::from_inner(core.loss));
    Ok(FusedLoss {
        surrogate,
        stats: core.stats,
    })
}
