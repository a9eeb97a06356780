//! The few layers the vision tower needs, besides `omniopsd_checkpoint::Linear`.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};
use omniopsd_checkpoint::Weights;

use crate::Error;

/// `y = x / √(mean(x²) + ε) · γ` over the last axis (Qwen2 RMSNorm, ε = 1e-6).
#[derive(Module, Debug)]
pub(crate) struct RmsNorm<B: Backend> {
    weight: Param<Tensor<B, 1>>,
    eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn load(w: &Weights, dim: usize, device: &B::Device) -> Result<Self, Error> {
        Ok(Self {
            weight: w.param("weight", [dim], device)?,
            eps: 1e-6,
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let ms = x.clone().powi_scalar(2).mean_dim(D - 1);
        x / (ms + self.eps).sqrt() * self.weight.val().unsqueeze()
    }
}
