//! The two normalisations of the Qwen2.5-Omni family, over the last axis.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};
use omniopsd_checkpoint::{Error, Weights};

/// `y = x / √(mean(x²) + ε) · γ` over the last axis (transformers' `Qwen2RMSNorm`; the
/// decoder takes ε from `rms_norm_eps`, the vision tower has it fixed at 1e-6).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    weight: Param<Tensor<B, 1>>,
    eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// Reads `weight` `[dim]` under `w`.
    pub fn load(w: &Weights, dim: usize, eps: f64, device: &B::Device) -> Result<Self, Error> {
        Ok(Self {
            weight: w.param("weight", [dim], device)?,
            eps,
        })
    }

    /// The scale `γ` `[dim]`, as the checkpoint stores it.
    pub fn weight(&self) -> Tensor<B, 1> {
        self.weight.val()
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let rms = (x.clone().powi_scalar(2).mean_dim(D - 1) + self.eps).sqrt();
        x / rms * self.weight.val().unsqueeze()
    }
}

/// `y = (x − E[x]) / √(Var[x] + ε) · γ + β` over the last axis, biased variance (PyTorch
/// `nn.LayerNorm`).
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    weight: Param<Tensor<B, 1>>,
    bias: Param<Tensor<B, 1>>,
    eps: f64,
}

impl<B: Backend> LayerNorm<B> {
    /// Reads `weight` and `bias` `[dim]` under `w`.
    pub fn load(w: &Weights, dim: usize, eps: f64, device: &B::Device) -> Result<Self, Error> {
        Ok(Self {
            weight: w.param("weight", [dim], device)?,
            bias: w.param("bias", [dim], device)?,
            eps,
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let (var, mean) = x.clone().var_mean_bias(D - 1);
        let x = (x - mean) / (var + self.eps).sqrt();
        x * self.weight.val().unsqueeze() + self.bias.val().unsqueeze()
    }
}
