//! Memory plan of a training step: what an OPSD update of a [`Qwen2Config`] decoder holds on
//! its device, term by term, and the peak over the step's phases.
//!
//! The terms, in bytes (weights, gradients and AdamW moments are f32 under every precision:
//! mixed precision keeps f32 master weights):
//! - **weights**: every parameter, LoRA adapters included;
//! - **gradients**: one f32 per trainable parameter (all of them, or the adapters under LoRA);
//! - **optimizer**: AdamW's two moments per trainable parameter;
//! - **teacher**: a `frozen` or `ema` teacher's own copy of what the student trains (the whole
//!   decoder in a full fine-tune; under LoRA the base is shared, so a `frozen` teacher is the
//!   base with the adapters off and costs nothing, an `ema` one a second adapter set);
//! - **activations**: what the student's autodiff graph keeps for the backward pass, per
//!   episode of a micro-batch (the prompt once, `G` responses after it);
//! - **loss**: the fused chunked loss's transient `[c, V]` buffers (`c` = `min(chunk_rows,
//!   G·N)`) and its `∂L/∂W` when the head trains;
//! - **rollout**: the sampling KV cache of `G` sequences and the decode step's buffers;
//! - **update**: the backward pass's and AdamW's temporaries, sized by the largest trainable
//!   tensor.
//!
//! The phases of a step run one after the other, so the peak is the persistent part (weights,
//! teacher, optimizer, and gradients accumulated over earlier micro-batches) plus the largest
//! phase. The activation and loss coefficients were calibrated by counting allocations on the
//! CPU (NdArray, `benches/examples/plan_check.rs` prints estimate against measurement) and
//! hold there within 15% (`benches/tests/memory_plan.rs`); a GPU allocator's pools hold more
//! than the live bytes counted here.

use crate::{LoraConfig, Qwen2Config};

/// The teacher's weights, as the trainer's `teacher` setting names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TeacherWeights {
    /// The current student, detached: no copy.
    Live,
    /// A snapshot taken when training starts.
    Frozen,
    /// A moving average of what the student trains.
    Ema,
}

/// One OPSD update's shape and training setup.
#[derive(Clone, Debug)]
pub struct StepShape {
    /// Student prompt tokens (media placeholders included).
    pub prompt: usize,
    /// Extra tokens of the teacher's prompt (the privileged block).
    pub privileged: usize,
    /// Responses sampled per prompt (`G`).
    pub group: usize,
    /// Tokens per response (`N`, the rollout's `max_new_tokens`).
    pub new_tokens: usize,
    /// Episodes in one backward pass.
    pub micro_batch: usize,
    /// Micro-batches per update (their gradients accumulate).
    pub grad_accumulation: usize,
    /// Rows of the fused loss per chunk.
    pub chunk_rows: usize,
    /// LoRA adapters on a frozen base, or `None` for a full fine-tune.
    pub lora: Option<LoraConfig>,
    /// The teacher's weights.
    pub teacher: TeacherWeights,
    /// Bytes of the projections' compute type (4: f32; 2: bf16 / f16 mixed precision).
    pub compute_bytes: usize,
    /// Burn's balanced activation checkpointing.
    pub checkpointing: bool,
}

/// A phase of the step, the one whose memory is the peak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Sampling the responses.
    Rollout,
    /// The teacher's forward pass over its prompt and the responses.
    Teacher,
    /// The student's forward pass and the fused loss.
    StudentLoss,
    /// The backward pass and AdamW.
    BackwardUpdate,
}

impl Phase {
    /// Its name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Rollout => "rollout",
            Phase::Teacher => "teacher scoring",
            Phase::StudentLoss => "student forward + loss",
            Phase::BackwardUpdate => "backward + AdamW",
        }
    }
}

/// The plan: each term in bytes (parameter counts where named so), the peak and its phase.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    /// Every parameter of the decoder (adapters included).
    pub params: u64,
    /// Parameters the optimizer updates.
    pub trainable_params: u64,
    /// f32 weights.
    pub weights: u64,
    /// f32 gradients of the trainable parameters.
    pub gradients: u64,
    /// AdamW moments.
    pub optimizer: u64,
    /// The teacher's own weights.
    pub teacher: u64,
    /// The student graph of one micro-batch.
    pub activations: u64,
    /// The fused loss's transient buffers (one episode).
    pub loss: u64,
    /// Rollout KV cache and sampling buffers.
    pub rollout: u64,
    /// The teacher forward's transient memory.
    pub teacher_forward: u64,
    /// Backward and optimizer temporaries.
    pub update: u64,
    /// The largest phase's total.
    pub peak: u64,
    /// The phase of the peak.
    pub phase: Phase,
}

/// f32 values the student graph keeps per layer: per row (`h` and `I` terms), per attention
/// score, and per repeated key/value row of the response pass. Calibrated on NdArray by least
/// squares over 13–18 shapes each (`benches/examples/plan_check.rs`): without checkpointing,
/// and with Burn's balanced checkpointing (memory-bound operations recomputed), which keeps
/// less in a full fine-tune than under LoRA, whose adapters' products keep their inputs.
const KEPT: [f64; 4] = [15.1, 4.4, 3.5, 2.1];
const KEPT_BALANCED_FULL: [f64; 4] = [12.1, 1.3, 1.3, 2.9];
const KEPT_BALANCED_LORA: [f64; 4] = [16.7, 4.1, 2.3, 1.1];
/// `[c, V]` f32 buffers alive at once inside the fused loss (logits and log-softmax of both
/// sides, their exponentials, the divergence's terms and its gradient).
const LOSS_BUFFERS: f64 = 9.0;

impl Qwen2Config {
    /// Parameters of the decoder: embeddings, layers, final norm, and the head when untied.
    pub fn param_count(&self) -> u64 {
        let (v, h, i) = (
            self.vocab_size as u64,
            self.hidden_size as u64,
            self.intermediate_size as u64,
        );
        let kvd = (self.kv_heads() * self.head_dim()) as u64;
        let layer = (h * h + h) + 2 * (h * kvd + kvd) + h * h + 3 * h * i + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers as u64 * layer + h + head
    }

    /// `(d_in, d_out)` of a projection named as PEFT names it.
    fn projection(&self, name: &str) -> Option<(u64, u64)> {
        let (h, i) = (self.hidden_size as u64, self.intermediate_size as u64);
        let kvd = (self.kv_heads() * self.head_dim()) as u64;
        Some(match name {
            "q_proj" | "o_proj" => (h, h),
            "k_proj" | "v_proj" => (h, kvd),
            "gate_proj" | "up_proj" => (h, i),
            "down_proj" => (i, h),
            _ => return None,
        })
    }

    /// Adapter parameters of `lora` over every layer (`r·(d_in + d_out)` per projection).
    pub fn lora_param_count(&self, lora: &LoraConfig) -> u64 {
        let per_layer: u64 = lora
            .target_modules
            .iter()
            .filter_map(|t| self.projection(t))
            .map(|(i, o)| lora.r as u64 * (i + o))
            .sum();
        per_layer * self.num_hidden_layers as u64
    }

    /// Elements of the largest trainable tensor.
    fn largest_trainable(&self, lora: Option<&LoraConfig>) -> u64 {
        let (v, h, i) = (
            self.vocab_size as u64,
            self.hidden_size as u64,
            self.intermediate_size as u64,
        );
        match lora {
            None => (v * h).max(h * i),
            Some(l) => l.r as u64 * h.max(i),
        }
    }

    /// The memory plan of one OPSD update of shape `s` (see the module docs).
    pub fn memory_plan(&self, s: &StepShape) -> MemoryPlan {
        const F32: u64 = 4;
        let (v, h, i) = (
            self.vocab_size as f64,
            self.hidden_size as f64,
            self.intermediate_size as f64,
        );
        let layers = self.num_hidden_layers as f64;
        let heads = self.num_attention_heads as f64;
        let kvd = (self.kv_heads() * self.head_dim()) as f64;
        let (p, q, g) = (s.prompt as f64, s.privileged as f64, s.group.max(1) as f64);
        let n = s.new_tokens.max(1) as f64;
        let bytes = |floats: f64| (floats * F32 as f64).ceil() as u64;

        let base_params = self.param_count();
        let adapters = s.lora.as_ref().map_or(0, |l| self.lora_param_count(l));
        let params = base_params + adapters;
        let trainable_params = if s.lora.is_some() {
            adapters
        } else {
            base_params
        };
        let weights = params * F32;
        let gradients = trainable_params * F32;
        let optimizer = 2 * trainable_params * F32;
        let teacher = match (s.teacher, s.lora.is_some()) {
            (TeacherWeights::Live, _) | (TeacherWeights::Frozen, true) => 0,
            (TeacherWeights::Frozen | TeacherWeights::Ema, false) => base_params * F32,
            (TeacherWeights::Ema, true) => adapters * F32,
        };
        let head_trains = s.lora.is_none();

        // The student graph: the prompt once, then G·(N−1) response rows attending to the
        // prompt and the responses so far (the first response token comes from the prompt's
        // last state).
        let r = n - 1.0;
        let ctx = p + r;
        let rows = p + g * r;
        let scores = heads * (p * p + g * r * ctx);
        let k = match (s.checkpointing, s.lora.is_some()) {
            (false, _) => KEPT,
            (true, false) => KEPT_BALANCED_FULL,
            (true, true) => KEPT_BALANCED_LORA,
        };
        let per_layer = k[0] * rows * h + k[1] * rows * i + k[2] * scores + k[3] * g * ctx * h;
        let mut episode = layers * per_layer * F32 as f64;
        if s.compute_bytes < F32 as usize {
            // The half-precision casts of each projection's input and weight that its
            // product keeps for the backward pass.
            let linear = (base_params - v as u64 * h as u64) as f64;
            episode += s.compute_bytes as f64 * (layers * rows * (6.0 * h + i) + linear);
        }
        let activations = (episode * s.micro_batch.max(1) as f64).ceil() as u64;

        // The fused loss: one chunk's [c, V] buffers, or, when the head trains, its ∂L/∂W
        // with the product that folds it into the surrogate; earlier chunks' ∂L/∂W slices
        // accumulate beside the buffers.
        let rows_loss = g * n;
        let c = (s.chunk_rows.max(1) as f64).min(rows_loss);
        let head_grad = if head_trains { v * h } else { 0.0 };
        let accumulated = if rows_loss > c { head_grad } else { 0.0 };
        let loss = bytes((LOSS_BUFFERS * c * v + accumulated).max(2.0 * c * v + 2.0 * head_grad));

        // Rollout: the KV cache of G sequences, the decode step's logits and probabilities,
        // the transposed head a contiguous product copies (CPU backends), and one layer's
        // transient work over the prompt.
        let kv_cache = layers * 2.0 * kvd * g * (p + n);
        let prompt_layer = p * (4.0 * h + 3.0 * i) + 2.0 * heads * p * p;
        let rollout = bytes(kv_cache + 3.0 * g * v + v * h + prompt_layer);

        // The teacher's forward: no graph, so one layer's work at a time over its prompt and
        // the responses, beside its KV cache.
        let tp = p + q;
        let t_rows = tp + g * r;
        let t_scores = heads * (tp * tp + g * r * (tp + r));
        let teacher_forward = bytes(
            layers * 2.0 * kvd * (tp + g * (tp + n))
                + 0.5 * (t_rows * (4.0 * h + 3.0 * i) + 2.0 * t_scores),
        );

        // Backward: the graph and the head's ∂L/∂W at its start, the gradients (twice while
        // one micro-batch's are added to the accumulated ones) and two temporaries of the
        // largest tensor by its end; AdamW's temporaries are the same size.
        let largest = self.largest_trainable(s.lora.as_ref()) * F32;
        let accumulating = if s.grad_accumulation > 1 {
            gradients
        } else {
            0
        };
        let graph_end =
            activations + s.micro_batch.max(1) as u64 * bytes(head_grad) + bytes(2.0 * rows * i);
        let update = graph_end.max(gradients + 2 * largest);

        let persistent = weights + teacher + optimizer;
        let phases = [
            (Phase::Rollout, persistent + accumulating + rollout),
            (Phase::Teacher, persistent + accumulating + teacher_forward),
            (
                Phase::StudentLoss,
                persistent
                    + accumulating
                    + activations
                    + loss
                    + (s.micro_batch.max(1) as u64 - 1) * bytes(head_grad),
            ),
            (Phase::BackwardUpdate, persistent + accumulating + update),
        ];
        let (phase, peak) =
            phases.into_iter().fold(
                (Phase::Rollout, 0),
                |best, (ph, b)| if b > best.1 { (ph, b) } else { best },
            );
        MemoryPlan {
            params,
            trainable_params,
            weights,
            gradients,
            optimizer,
            teacher,
            activations,
            loss,
            rollout,
            teacher_forward,
            update,
            peak,
            phase,
        }
    }
}
