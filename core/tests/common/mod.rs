//! A tiny causal language model for the core's tests: token + position embeddings, one
//! single-head causal self-attention layer with a residual, and an untied LM head.
//!
//! It implements [`PolicyModel`] twice over — teacher-forced (`response_hidden`) and with a real
//! key/value cache (`prefill` + `decode`) — so the tests can check that the two paths agree.
#![allow(dead_code)]

use burn::module::{Module, Param};
use burn::tensor::activation::softmax;
use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};
use omniopsd_core::sampling::uniform;
use omniopsd_core::PolicyModel;

pub type Cpu = burn::backend::NdArray<f32>;
pub type Train = burn::backend::Autodiff<Cpu>;

/// Largest prompt + response length the position table covers.
pub const MAX_POSITIONS: usize = 64;

#[derive(Module, Debug)]
pub struct Toy<B: Backend> {
    pub embed: Param<Tensor<B, 2>>,
    pub pos: Param<Tensor<B, 2>>,
    pub wq: Param<Tensor<B, 2>>,
    pub wk: Param<Tensor<B, 2>>,
    pub wv: Param<Tensor<B, 2>>,
    pub wo: Param<Tensor<B, 2>>,
    pub head: Param<Tensor<B, 2>>,
    /// `[1]`, normally 1. The hidden state gets `0 · sqrt(probe)` added: nothing in the forward
    /// pass, but with `probe = 0` the gradient is `0 · ∞ = NaN` while the loss stays finite.
    pub probe: Param<Tensor<B, 1>>,
}

/// The key/value cache of [`Toy`]: keys and values `[n, t, H]` of every position so far.
#[derive(Clone, Debug)]
pub struct ToyCache<B: Backend> {
    keys: Tensor<B, 3>,
    values: Tensor<B, 3>,
    len: usize,
}

fn init<B: Backend, const D: usize>(
    seed: u64,
    stream: u64,
    shape: [usize; D],
    scale: f32,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|i| (uniform(seed, stream, i as u32, 0) as f32 * 2.0 - 1.0) * scale)
        .collect();
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}

impl<B: Backend> Toy<B> {
    /// Deterministic weights from `seed` (uniform in `±scale`, scaled per matrix).
    pub fn new(vocab: usize, hidden: usize, seed: u64, device: &B::Device) -> Self {
        let s = 1.0 / (hidden as f32).sqrt();
        Self {
            embed: init(seed, 1, [vocab, hidden], 1.0, device),
            pos: init(seed, 2, [MAX_POSITIONS, hidden], 0.5, device),
            wq: init(seed, 3, [hidden, hidden], 2.0 * s, device),
            wk: init(seed, 4, [hidden, hidden], 2.0 * s, device),
            wv: init(seed, 5, [hidden, hidden], s, device),
            wo: init(seed, 6, [hidden, hidden], s, device),
            head: init(seed, 7, [vocab, hidden], 2.0, device),
            probe: Param::from_tensor(Tensor::ones([1], device)),
        }
    }

    pub fn vocab(&self) -> usize {
        self.embed.val().dims()[0]
    }

    fn device(&self) -> B::Device {
        self.embed.val().device()
    }

    /// `embed[ids] + pos[start..start + T]` for `ids: [n, T]`.
    fn embed(&self, ids: Tensor<B, 2, Int>, start: usize) -> Tensor<B, 3> {
        let [n, t] = ids.dims();
        let h = self.embed.val().dims()[1];
        let tokens = self
            .embed
            .val()
            .select(0, ids.reshape([n * t]))
            .reshape([n, t, h]);
        let pos = self.pos.val().narrow(0, start, t).unsqueeze_dim::<3>(0);
        tokens + pos
    }

    /// Attention output + residual for queries `x: [n, t, H]` against cached keys/values
    /// `[n, s, H]`; `mask: [t, s]` is true where a query may not look.
    fn attend(
        &self,
        x: Tensor<B, 3>,
        keys: Tensor<B, 3>,
        values: Tensor<B, 3>,
        mask: Option<Tensor<B, 2, Bool>>,
    ) -> Tensor<B, 3> {
        let h = x.dims()[2];
        let q = x.clone().matmul(self.wq.val().unsqueeze_dim::<3>(0));
        let mut scores = q.matmul(keys.swap_dims(1, 2)).div_scalar((h as f32).sqrt());
        if let Some(mask) = mask {
            let [n, t, s] = scores.dims();
            scores = scores.mask_fill(mask.unsqueeze_dim::<3>(0).expand([n, t, s]), -1e9);
        }
        let att = softmax(scores, 2);
        let out = att
            .matmul(values)
            .matmul(self.wo.val().unsqueeze_dim::<3>(0));
        let probe = self.probe.val().sqrt().mul_scalar(0.0).reshape([1, 1, 1]);
        x + out + probe
    }

    fn keys_values(&self, x: &Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        (
            x.clone().matmul(self.wk.val().unsqueeze_dim::<3>(0)),
            x.clone().matmul(self.wv.val().unsqueeze_dim::<3>(0)),
        )
    }

    /// Hidden states of every position of `ids: [n, T]` (teacher forcing, causal mask).
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let t = ids.dims()[1];
        let x = self.embed(ids, 0);
        let (k, v) = self.keys_values(&x);
        let mask = Tensor::<B, 2, Bool>::tril_mask([t, t], 0, &self.device());
        self.attend(x, k, v, Some(mask))
    }

    fn prompt_ids(&self, prompt: &[u32], n: usize) -> Tensor<B, 2, Int> {
        let ids: Vec<i64> = (0..n)
            .flat_map(|_| prompt.iter().map(|t| i64::from(*t)))
            .collect();
        Tensor::from_data(TensorData::new(ids, [n, prompt.len()]), &self.device())
    }
}

impl<B: Backend> PolicyModel<B> for Toy<B> {
    type Prompt = Vec<u32>;
    type Cache = ToyCache<B>;

    fn prefill(&self, prompt: &Vec<u32>, n: usize) -> (Tensor<B, 2>, ToyCache<B>) {
        let p = prompt.len();
        let x = self.embed(self.prompt_ids(prompt, n), 0);
        let (keys, values) = self.keys_values(&x);
        let mask = Tensor::<B, 2, Bool>::tril_mask([p, p], 0, &self.device());
        let hidden = self.attend(x, keys.clone(), values.clone(), Some(mask));
        let h = hidden.dims()[2];
        let last = hidden.narrow(1, p - 1, 1).reshape([n, h]);
        (
            last,
            ToyCache {
                keys,
                values,
                len: p,
            },
        )
    }

    fn decode(&self, tokens: Tensor<B, 1, Int>, cache: &mut ToyCache<B>) -> Tensor<B, 2> {
        let n = tokens.dims()[0];
        let x = self.embed(tokens.reshape([n, 1]), cache.len);
        let (k, v) = self.keys_values(&x);
        cache.keys = Tensor::cat(vec![cache.keys.clone(), k], 1);
        cache.values = Tensor::cat(vec![cache.values.clone(), v], 1);
        cache.len += 1;
        let h = x.dims()[2];
        self.attend(x, cache.keys.clone(), cache.values.clone(), None)
            .reshape([n, h])
    }

    fn response_hidden(&self, prompt: &Vec<u32>, response: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [n, r] = response.dims();
        let p = prompt.len();
        let ids = Tensor::cat(vec![self.prompt_ids(prompt, n), response], 1);
        self.forward(ids).narrow(1, p - 1, r)
    }

    fn lm_head(&self) -> Tensor<B, 2> {
        self.head.val()
    }
}

/// Reads a float tensor back as `f32` values.
pub fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

/// Reads an int tensor back as `i64` values.
pub fn ints<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().into_vec::<i64>().unwrap()
}

/// Every float parameter of `toy`, flattened, in declaration order.
pub fn params<B: Backend>(toy: &Toy<B>) -> Vec<Vec<f32>> {
    vec![
        values(toy.embed.val()),
        values(toy.pos.val()),
        values(toy.wq.val()),
        values(toy.wk.val()),
        values(toy.wv.val()),
        values(toy.wo.val()),
        values(toy.head.val()),
        values(toy.probe.val()),
    ]
}

/// Bit patterns of every parameter, for exact equality.
pub fn param_bits<B: Backend>(toy: &Toy<B>) -> Vec<Vec<u32>> {
    params(toy)
        .into_iter()
        .map(|p| p.into_iter().map(f32::to_bits).collect())
        .collect()
}
