//! PyTorch `nn.Linear`, with a streaming path for products of a few rows.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor, TensorData};

use omniopsd_backends::rows::{product, Layout};

use omniopsd_checkpoint::{Error, Weights};

/// `y = x Wᵀ + b` (PyTorch `nn.Linear`). The weight is kept as `Wᵀ`, `[d_in, d_out]`,
/// contiguous: backends that need contiguous matmul operands (NdArray) would otherwise copy a
/// transposed `W` on every call. Loading and [`Linear::weight`] convert from and to the
/// checkpoint's `[d_out, d_in]`.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    weight_t: Param<Tensor<B, 2>>,
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
    ) -> Result<Self, Error> {
        let weight = w.tensor::<B, 2>("weight", [d_out, d_in], device)?;
        let values = weight
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| Error::Export {
                file: w.prefix().into(),
                reason: format!("reading `weight`: {e:?}"),
            })?;
        let mut transposed = vec![0f32; values.len()];
        for o in 0..d_out {
            for i in 0..d_in {
                transposed[i * d_out + o] = values[o * d_in + i];
            }
        }
        Ok(Self {
            weight_t: Param::from_tensor(Tensor::from_data(
                TensorData::new(transposed, [d_in, d_out]),
                device,
            )),
            bias: if bias {
                Some(w.param("bias", [d_out], device)?)
            } else {
                None
            },
        })
    }

    /// The weight `[d_out, d_in]`, as the checkpoint stores it.
    pub fn weight(&self) -> Tensor<B, 2> {
        self.weight_t.val().transpose()
    }

    /// The bias `[d_out]`, if the layer has one.
    pub fn bias(&self) -> Option<Tensor<B, 1>> {
        self.bias.as_ref().map(Param::val)
    }

    /// Applies the layer over the last axis of `x`.
    ///
    /// The leading axes are folded into rows first, so forward and backward are each one
    /// `[rows, in] × [in, out]` product instead of a batch of small ones followed by a sum
    /// over the batch for the weight gradient. A few rows (a decode step) on a host backend
    /// go through [`omniopsd_backends::rows`] where it applies.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mut dims = x.dims();
        let inputs = dims[D - 1];
        let rows = x.shape().num_elements() / inputs.max(1);
        let y = match product(
            x.reshape([rows, inputs]),
            self.weight_t.val(),
            Layout::InOut,
        ) {
            Ok(y) => y,
            Err((x, w)) => x.matmul(w),
        };
        let y = match &self.bias {
            Some(b) => y + b.val().unsqueeze(),
            None => y,
        };
        dims[D - 1] = y.dims()[1];
        y.reshape(dims)
    }
}
