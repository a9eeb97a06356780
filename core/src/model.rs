//! The contract between the algorithm and an architecture.
//!
//! `models/` crates implement [`PolicyModel`]; the core drives rollout and scoring through it
//! and applies the LM head itself (in chunks, see [`crate::fused`]; per decode step through
//! [`PolicyModel::step_logits`]), which is why the model returns final hidden states rather
//! than logits.

use burn::tensor::{backend::Backend, Int, Tensor};

/// A causal language model the core can roll out and score.
///
/// Positions line up as in any causal LM: the hidden state at position `t` predicts token
/// `t + 1`. For a prompt of length `P` and a response `y` of length `R`, the state that
/// predicts `y[r]` is the one after `prompt ++ y[..r]`.
pub trait PolicyModel<B: Backend> {
    /// Everything the model conditions on before the response: token ids and, for omni-modal
    /// models, media features. The core never looks inside; it only hands prompts back.
    type Prompt;
    /// Decoding state for a batch of sequences that share one prompt (a KV cache).
    type Cache;

    /// Runs `prompt` for `n` parallel sequences and returns the final hidden state of the last
    /// prompt position, `[n, H]`, with the cache to continue from.
    fn prefill(&self, prompt: &Self::Prompt, n: usize) -> (Tensor<B, 2>, Self::Cache);

    /// Appends one token to each of the `n` sequences (`tokens: [n]`) and returns their final
    /// hidden states, `[n, H]`.
    fn decode(&self, tokens: Tensor<B, 1, Int>, cache: &mut Self::Cache) -> Tensor<B, 2>;

    /// Teacher forcing: for `response: [n, R]` after `prompt`, the hidden states that predict
    /// each response token, `[n, R, H]` (row `r` is the state after `prompt ++ response[..r]`).
    /// Padding after a sequence's end may hold any token; causality keeps it from affecting
    /// the valid positions.
    fn response_hidden(&self, prompt: &Self::Prompt, response: Tensor<B, 2, Int>) -> Tensor<B, 3>;

    /// The LM-head weight `[V, H]` (the embedding matrix when tied).
    fn lm_head(&self) -> Tensor<B, 2>;

    /// Whether [`PolicyModel::lm_head`] is trained, i.e. takes a gradient. The default, `true`,
    /// is always correct; a model whose head is frozen (the base under LoRA adapters) returns
    /// `false`, and the trainer's fused loss then skips `∂L/∂W` (a `[V, H]` tensor per episode
    /// and its products). Returning `false` for a head that is trained would leave it without
    /// a gradient.
    fn lm_head_trainable(&self) -> bool {
        true
    }

    /// Logits `[n, V]` of the hidden states `[n, H]` of one decode step, under
    /// [`PolicyModel::lm_head`]. The default is [`crate::fused::lm_logits`]; a model may use a
    /// faster product for these few rows, equal to it up to f32 rounding.
    fn step_logits(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        crate::fused::lm_logits(hidden, self.lm_head())
    }
}
