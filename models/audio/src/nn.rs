//! The few layers the audio tower needs, besides `omniopsd_checkpoint::Linear`.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};
use omniopsd_checkpoint::Weights;

use crate::Error;

/// `y = (x − E[x]) / √(Var[x] + ε) · γ + β` over the last axis, biased variance
/// (PyTorch `nn.LayerNorm`, ε = 1e-5).
#[derive(Module, Debug)]
pub(crate) struct LayerNorm<B: Backend> {
    weight: Param<Tensor<B, 1>>,
    bias: Param<Tensor<B, 1>>,
    eps: f64,
}

impl<B: Backend> LayerNorm<B> {
    pub fn load(w: &Weights, dim: usize, device: &B::Device) -> Result<Self, Error> {
        Ok(Self {
            weight: w.param("weight", [dim], device)?,
            bias: w.param("bias", [dim], device)?,
            eps: 1e-5,
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let (var, mean) = x.clone().var_mean_bias(D - 1);
        let x = (x - mean) / (var + self.eps).sqrt();
        x * self.weight.val().unsqueeze() + self.bias.val().unsqueeze()
    }
}
