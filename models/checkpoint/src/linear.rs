//! The one layer every architecture crate loads the same way: PyTorch `nn.Linear`, kept in the
//! checkpoint's `[out, in]` layout so loading is a straight copy.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

use crate::Weights;

/// `y = x Wᵀ + b` (PyTorch `nn.Linear`).
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    weight: Param<Tensor<B, 2>>,
    bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Linear<B> {
    /// Reads `weight` `[d_out, d_in]` and, if `bias`, `bias` `[d_out]` under `w`.
    pub fn load(
        w: &Weights,
        d_in: usize,
        d_out: usize,
        bias: bool,
        device: &B::Device,
    ) -> Result<Self, crate::Error> {
        Ok(Self {
            weight: w.param("weight", [d_out, d_in], device)?,
            bias: if bias {
                Some(w.param("bias", [d_out], device)?)
            } else {
                None
            },
        })
    }

    /// The weight `[d_out, d_in]`.
    pub fn weight(&self) -> Tensor<B, 2> {
        self.weight.val()
    }

    /// The bias `[d_out]`, if the layer has one.
    pub fn bias(&self) -> Option<Tensor<B, 1>> {
        self.bias.as_ref().map(Param::val)
    }

    /// Applies the layer over the last axis of `x`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let y = x.matmul(self.weight.val().transpose().unsqueeze());
        match &self.bias {
            Some(b) => y + b.val().unsqueeze(),
            None => y,
        }
    }
}
