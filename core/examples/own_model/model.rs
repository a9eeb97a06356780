//! The model a user brings: a causal "bag of words" language model, written with plain Burn
//! modules, nothing from this project but the [`PolicyModel`] trait it implements.
//!
//! Position `t` sees its own token's embedding `x_t` and the mean `c_t` of the embeddings of
//! every token up to it; a two-layer MLP mixes them into the hidden state
//! `h_t = x_t + W_down · gelu(W_up · [x_t; c_t])`, and the LM head is the embedding matrix
//! (tied). The mean makes the hidden state depend on the whole context, so a privileged block
//! in the teacher's context changes the teacher's predictions; the running sum of the
//! embeddings is the whole decoding cache.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use omniopsd_core::PolicyModel;

/// Embedding + MLP causal LM over token-id prompts (`Vec<u32>`, never empty).
#[derive(Module, Debug)]
pub struct BagOfWords<B: Backend> {
    embed: Embedding<B>,
    up: Linear<B>,
    down: Linear<B>,
}

/// Decoding state of `n` sequences: the sum of the embeddings seen so far, `[n, width]`.
#[derive(Clone, Debug)]
pub struct BagCache<B: Backend> {
    sum: Tensor<B, 2>,
    len: usize,
}

impl<B: Backend> BagOfWords<B> {
    /// Burn's default initialisation (seed the backend first for reproducible weights).
    pub fn new(vocab: usize, width: usize, device: &B::Device) -> Self {
        Self {
            embed: EmbeddingConfig::new(vocab, width).init(device),
            up: LinearConfig::new(2 * width, 4 * width).init(device),
            down: LinearConfig::new(4 * width, width).init(device),
        }
    }

    /// The hidden state of a token with embedding `x` after a context of mean embedding
    /// `context` (same shape, width last).
    fn mix<const D: usize>(&self, x: Tensor<B, D>, context: Tensor<B, D>) -> Tensor<B, D> {
        let both = Tensor::cat(vec![x.clone(), context], D - 1);
        x + self.down.forward(gelu(self.up.forward(both)))
    }

    /// Hidden states `[n, T, width]` of every position of `ids: [n, T]`.
    fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let t = ids.dims()[1];
        let x = self.embed.forward(ids);
        // Row s averages positions 0..=s: the causal running mean as one matmul.
        let rows: Vec<f32> = (0..t)
            .flat_map(|s| (0..t).map(move |j| if j <= s { 1.0 / (s + 1) as f32 } else { 0.0 }))
            .collect();
        let mean = Tensor::<B, 2>::from_data(TensorData::new(rows, [t, t]), &x.device());
        let context = mean.unsqueeze_dim::<3>(0).matmul(x.clone());
        self.mix(x, context)
    }

    /// `prompt` repeated for `n` sequences, `[n, P]`.
    fn repeat(&self, prompt: &[u32], n: usize) -> Tensor<B, 2, Int> {
        let ids: Vec<i64> = (0..n)
            .flat_map(|_| prompt.iter().map(|&t| i64::from(t)))
            .collect();
        let device = self.embed.weight.val().device();
        Tensor::from_data(TensorData::new(ids, [n, prompt.len()]), &device)
    }
}

impl<B: Backend> PolicyModel<B> for BagOfWords<B> {
    type Prompt = Vec<u32>;
    type Cache = BagCache<B>;

    fn prefill(&self, prompt: &Vec<u32>, n: usize) -> (Tensor<B, 2>, BagCache<B>) {
        let p = prompt.len();
        let x = self.embed.forward(self.repeat(prompt, n));
        let width = x.dims()[2];
        let sum = x.clone().sum_dim(1).reshape([n, width]);
        let last = x.narrow(1, p - 1, 1).reshape([n, width]);
        let hidden = self.mix(last, sum.clone().div_scalar(p as f32));
        (hidden, BagCache { sum, len: p })
    }

    fn decode(&self, tokens: Tensor<B, 1, Int>, cache: &mut BagCache<B>) -> Tensor<B, 2> {
        let n = tokens.dims()[0];
        let x = self.embed.forward(tokens.reshape([n, 1]));
        let x = x.clone().reshape([n, x.dims()[2]]);
        cache.sum = cache.sum.clone() + x.clone();
        cache.len += 1;
        self.mix(x, cache.sum.clone().div_scalar(cache.len as f32))
    }

    fn response_hidden(&self, prompt: &Vec<u32>, response: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [n, r] = response.dims();
        let ids = Tensor::cat(vec![self.repeat(prompt, n), response], 1);
        self.forward(ids).narrow(1, prompt.len() - 1, r)
    }

    fn lm_head(&self) -> Tensor<B, 2> {
        self.embed.weight.val()
    }
}
