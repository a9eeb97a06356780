//! The few layers the audio tower needs, stored in the checkpoint's layout (weights
//! `[out, in]`, PyTorch's `nn.Linear`), so loading is a straight copy.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};
use omniopsd_checkpoint::Weights;

use crate::Error;

/// `y = x Wᵀ + b` (PyTorch `nn.Linear`).
#[derive(Module, Debug)]
pub(crate) struct Linear<B: Backend> {
    weight: Param<Tensor<B, 2>>,
    bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Linear<B> {
    pub fn load(
        w: &Weights,
        d_in: usize,
        d_out: usize,
        bias: bool,
        device: &B::Device,
    ) -> Result<Self, Error> {
        Ok(Self {
            weight: w.param("weight", [d_out, d_in], device)?,
            bias: if bias {
                Some(w.param("bias", [d_out], device)?)
            } else {
                None
            },
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let y = x.matmul(self.weight.val().transpose().unsqueeze());
        match &self.bias {
            Some(b) => y + b.val().unsqueeze(),
            None => y,
        }
    }
}

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
