//! Model FLOPs of one OPSD step on a Qwen2 decoder, for throughput in FLOP/s and model FLOPs
//! utilisation (MFU).
//!
//! The count is the work the algorithm needs, whatever an implementation recomputes: every
//! matrix product of the decoder (projections, SwiGLU, the LM head) at 2 FLOPs per
//! multiply–add, and causal attention at `4 · keys · heads · head_dim` per token and layer
//! (`QKᵀ` and `AV`). Norms, rotary embedding, softmax, the divergence and the optimiser are
//! left out, as in the usual MFU convention (they are under 1% at 0.5B scale).
//!
//! One step over a prompt of `P` tokens, a privileged prompt of `P + Q` tokens and a group
//! of `G` responses of `T` tokens, each prompt run once and shared by the group, as
//! `OpsdTrainer::step` does:
//! - rollout: the student prompt, then `T − 1` decode steps of `G` tokens; `G · T` LM-head
//!   rows;
//! - teacher: the privileged prompt, then the `G` responses teacher-forced (`T − 1` inputs);
//! - student: the rollout's forward again with its graph, and its backward at twice the
//!   forward's FLOPs (gradients of the inputs and of the weights); with the base frozen
//!   (LoRA, [`StepFlops::frozen_base`]) once the forward's (gradients of the inputs only; the
//!   adapters' own products, `2·r·(d_in + d_out)` per token and projection, are left out:
//!   under 1% at rank 64 and width 2048).

use omniopsd_decoder::Qwen2Config;

/// The shape of one OPSD step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepShape {
    /// Student prompt tokens (`P`).
    pub prompt: usize,
    /// Tokens the privileged prompt adds (`Q`).
    pub privileged: usize,
    /// Responses per prompt (`G`).
    pub group: usize,
    /// Tokens per response (`T`).
    pub new: usize,
}

/// Model FLOPs of one step, by pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepFlops {
    /// Student sampling its responses (no graph).
    pub rollout: f64,
    /// Teacher scoring them under the privileged prompt (no graph).
    pub teacher: f64,
    /// Student forward with its graph, and backward.
    pub student: f64,
}

impl StepFlops {
    /// All three passes.
    pub fn total(&self) -> f64 {
        self.rollout + self.teacher + self.student
    }

    /// The same step with the base weights frozen (LoRA): the student's backward computes no
    /// weight gradients, so the student pass is its forward twice instead of three times.
    pub fn frozen_base(self) -> Self {
        Self {
            student: self.student * 2.0 / 3.0,
            ..self
        }
    }
}

/// FLOPs of one token through the decoder's projections and SwiGLU (no attention, no head).
pub fn token_matmul_flops(cfg: &Qwen2Config) -> f64 {
    let h = cfg.hidden_size as f64;
    let q = (cfg.num_attention_heads * cfg.head_dim()) as f64;
    let kv = (cfg.kv_heads() * cfg.head_dim()) as f64;
    let i = cfg.intermediate_size as f64;
    let layer = 2.0 * (h * q + 2.0 * h * kv + q * h + 3.0 * h * i);
    layer * cfg.num_hidden_layers as f64
}

/// Attention FLOPs of the tokens at positions `from..to` (each attends to itself and every
/// earlier position), over all layers.
pub fn attention_flops(cfg: &Qwen2Config, from: usize, to: usize) -> f64 {
    // Σ_{c = from}^{to − 1} (c + 1) keys.
    let keys = (to * (to + 1) - from * (from + 1)) as f64 / 2.0;
    let per_key = 4.0 * (cfg.num_attention_heads * cfg.head_dim()) as f64;
    keys * per_key * cfg.num_hidden_layers as f64
}

/// Forward FLOPs of a prefix of `prefix` tokens run once, then `rows` sequences of `tokens`
/// more tokens each on top of it, with `head_rows` rows through the LM head.
pub fn forward_flops(
    cfg: &Qwen2Config,
    prefix: usize,
    rows: usize,
    tokens: usize,
    head_rows: usize,
) -> f64 {
    let matmul = token_matmul_flops(cfg) * (prefix + rows * tokens) as f64;
    let attention = attention_flops(cfg, 0, prefix)
        + rows as f64 * attention_flops(cfg, prefix, prefix + tokens);
    let head = 2.0 * (cfg.hidden_size * cfg.vocab_size) as f64 * head_rows as f64;
    matmul + attention + head
}

/// Model FLOPs of one OPSD step of `shape` (see the module documentation).
pub fn opsd_step_flops(cfg: &Qwen2Config, shape: StepShape) -> StepFlops {
    let StepShape {
        prompt,
        privileged,
        group,
        new,
    } = shape;
    let inputs = new.saturating_sub(1);
    let student = forward_flops(cfg, prompt, group, inputs, group * new);
    StepFlops {
        rollout: student,
        teacher: forward_flops(cfg, prompt + privileged, group, inputs, group * new),
        student: 3.0 * student,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Qwen2Config {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_hand_counted_step() {
        // h = 4, 2 heads of 2, 1 KV head, I = 8, 1 layer, V = 10.
        let cfg = config(
            r#"{"vocab_size": 10, "hidden_size": 4, "intermediate_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}"#,
        );
        // q 4·4, k and v 4·2 each, o 4·4, gate/up/down 3·4·8 = 16 + 16 + 16 + 96 = 144 MACs.
        assert_eq!(token_matmul_flops(&cfg), 288.0);
        // Positions 0, 1, 2 see 1 + 2 + 3 keys, 4 · 4 FLOPs each.
        assert_eq!(attention_flops(&cfg, 0, 3), 96.0);
        assert_eq!(attention_flops(&cfg, 3, 3), 0.0);
        // P = 2, Q = 1, G = 2, T = 3: each response feeds 2 tokens at positions P, P + 1.
        let shape = StepShape {
            prompt: 2,
            privileged: 1,
            group: 2,
            new: 3,
        };
        let f = opsd_step_flops(&cfg, shape);
        let head = 2.0 * 4.0 * 10.0 * 6.0;
        let rollout = 288.0 * 6.0 + 16.0 * (1.0 + 2.0) + 2.0 * 16.0 * (3.0 + 4.0) + head;
        let teacher = 288.0 * 7.0 + 16.0 * (1.0 + 2.0 + 3.0) + 2.0 * 16.0 * (4.0 + 5.0) + head;
        assert_eq!(f.rollout, rollout);
        assert_eq!(f.teacher, teacher);
        assert_eq!(f.student, 3.0 * rollout);
        assert_eq!(f.total(), 4.0 * rollout + teacher);
    }

    #[test]
    fn qwen2_5_0_5b_is_about_a_billion_flops_per_token() {
        // Qwen2.5-0.5B's shapes (benches/gpu/qwen2.5-0.5b.json): 494M parameters, of which
        // 136M the tied embedding; 2 FLOPs per weight per token through the decoder + head.
        let cfg: Qwen2Config = serde_json::from_str(include_str!("../gpu/qwen2.5-0.5b.json"))
            .expect("the benchmark's 0.5B config parses");
        let per_token = token_matmul_flops(&cfg) + 2.0 * (896 * 151_936) as f64;
        assert!((per_token / 2.0 - 494.0e6).abs() < 2.0e6, "{per_token}");
    }
}
