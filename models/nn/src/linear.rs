//! PyTorch `nn.Linear`, with a streaming path for products of a few rows and an optional
//! low-rank adapter in PEFT's layout.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Distribution, FloatDType, Tensor, TensorData};

use omniopsd_backends::rows::{product, Layout};

use omniopsd_checkpoint::{Error, Weights};

/// `y = x Wᵀ + b` (PyTorch `nn.Linear`), plus `s · (dropout(x) Aᵀ) Bᵀ` when a
/// [`LoraAdapter`] is attached. The weight is kept as `Wᵀ`, `[d_in, d_out]`, contiguous:
/// backends that need contiguous matmul operands (NdArray) would otherwise copy a transposed
/// `W` on every call. Loading and [`Linear::weight`] convert from and to the checkpoint's
/// `[d_out, d_in]`.
///
/// With a compute type ([`Linear::with_compute`], mixed precision), the products run in that
/// type on casts of the input and of the weights, which stay in the backend's float type
/// (the f32 master weights an optimizer updates); the result is cast back to the input's
/// type before the bias is added. Gradients flow back through the casts into the master
/// weights' own type.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    weight_t: Param<Tensor<B, 2>>,
    bias: Option<Param<Tensor<B, 1>>>,
    lora: Option<LoraAdapter<B>>,
    /// The type the products run in; `None`: the backend's float type.
    compute: Option<FloatDType>,
}

/// A low-rank adapter (LoRA, Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
/// Models"), as PEFT's `lora.Linear` computes it: `Δy = s · B(A(dropout(x)))` with
/// `A = lora_A.weight` `[r, d_in]`, `B = lora_B.weight` `[d_out, r]` and
/// `s = lora_alpha / r`, or `lora_alpha / √r` with rsLoRA (Kalajdzievski 2023).
///
/// Dropout applies only on an autodiff backend (training); the inner backend (rollouts,
/// teacher scoring, inference) runs it as the identity, as PEFT in `eval()` mode. Like
/// `A` and `B`, it is stored transposed (`Aᵀ` `[d_in, r]`, `Bᵀ` `[r, d_out]`) so both products
/// take contiguous operands.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    a_t: Param<Tensor<B, 2>>,
    b_t: Param<Tensor<B, 2>>,
    scaling: f64,
    dropout: f64,
}

/// `m` `[rows, cols]` transposed, as a contiguous tensor (read through the host, once).
fn transposed<B: Backend>(
    m: Tensor<B, 2>,
    name: &str,
    file: &str,
    device: &B::Device,
) -> Result<Tensor<B, 2>, Error> {
    let [rows, cols] = m.dims();
    let values = m
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| Error::Export {
            file: file.into(),
            reason: format!("reading `{name}`: {e:?}"),
        })?;
    let mut out = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    Ok(Tensor::from_data(
        TensorData::new(out, [cols, rows]),
        device,
    ))
}

impl<B: Backend> LoraAdapter<B> {
    /// An adapter from `a` `[r, d_in]` and `b` `[d_out, r]` (PEFT's `lora_A.weight`,
    /// `lora_B.weight`), scaling `s` and dropout probability `p` on its input. Both become
    /// trainable parameters.
    pub fn new(a: Tensor<B, 2>, b: Tensor<B, 2>, scaling: f64, dropout: f64) -> Self {
        let a_t = a.transpose();
        let b_t = b.transpose();
        // `transpose` is a strided view; materialise it contiguously once.
        let contiguous = |t: Tensor<B, 2>| {
            let device = t.device();
            Tensor::<B, 2>::from_data(t.into_data(), &device)
        };
        Self {
            a_t: Param::from_tensor(contiguous(a_t)),
            b_t: Param::from_tensor(contiguous(b_t)),
            scaling,
            dropout,
        }
    }

    /// Reads `lora_A.weight` `[r, d_in]` and `lora_B.weight` `[d_out, r]` under `w` (a
    /// PEFT adapter file viewed at the wrapped layer's name). A tensor of another shape is
    /// refused naming it, the file, and both shapes.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        w: &Weights,
        d_in: usize,
        d_out: usize,
        rank: usize,
        scaling: f64,
        dropout: f64,
        device: &B::Device,
    ) -> Result<Self, Error> {
        let a = w
            .pp("lora_A")
            .tensor::<B, 2>("weight", [rank, d_in], device)?;
        let b = w
            .pp("lora_B")
            .tensor::<B, 2>("weight", [d_out, rank], device)?;
        let file = w.prefix().to_string();
        Ok(Self {
            a_t: Param::from_tensor(transposed(a, "lora_A.weight", &file, device)?),
            b_t: Param::from_tensor(transposed(b, "lora_B.weight", &file, device)?),
            scaling,
            dropout,
        })
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.a_t.dims()[1]
    }

    /// `s`, the factor on `B A x`.
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// The dropout probability on the adapter's input during training.
    pub fn dropout(&self) -> f64 {
        self.dropout
    }

    /// `A` `[r, d_in]`, as PEFT stores `lora_A.weight`.
    pub fn lora_a(&self) -> Tensor<B, 2> {
        self.a_t.val().transpose()
    }

    /// `B` `[d_out, r]`, as PEFT stores `lora_B.weight`.
    pub fn lora_b(&self) -> Tensor<B, 2> {
        self.b_t.val().transpose()
    }

    /// The parameter holding `Aᵀ` `[d_in, r]` (its id keys gradients and optimizer state).
    pub fn a_t_param(&self) -> &Param<Tensor<B, 2>> {
        &self.a_t
    }

    /// The parameter holding `Bᵀ` `[r, d_out]`.
    pub fn b_t_param(&self) -> &Param<Tensor<B, 2>> {
        &self.b_t
    }

    /// `s · (dropout(x) Aᵀ) Bᵀ` for `x` `[rows, d_in]`, the products in `compute` when set
    /// (the result in that type too).
    fn delta(&self, x: Tensor<B, 2>, compute: Option<FloatDType>) -> Tensor<B, 2> {
        let x = if self.dropout > 0.0 && B::ad_enabled(&x.device()) {
            let keep = 1.0 - self.dropout;
            let mask = x.random_like(Distribution::Bernoulli(keep));
            x * mask * (1.0 / keep)
        } else {
            x
        };
        let cast = |t: Tensor<B, 2>| match compute {
            Some(dtype) => t.cast(dtype),
            None => t,
        };
        cast(x)
            .matmul(cast(self.a_t.val()))
            .mul_scalar(self.scaling)
            .matmul(cast(self.b_t.val()))
    }
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
        Ok(Self {
            weight_t: Param::from_tensor(transposed(weight, "weight", w.prefix(), device)?),
            bias: if bias {
                Some(w.param("bias", [d_out], device)?)
            } else {
                None
            },
            lora: None,
            compute: None,
        })
    }

    /// A layer from `weight` `[d_out, d_in]` (PyTorch's layout) and an optional `bias`
    /// `[d_out]`, both trainable.
    pub fn new(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        let device = weight.device();
        let weight_t = Tensor::from_data(weight.transpose().into_data(), &device);
        Self {
            weight_t: Param::from_tensor(weight_t),
            bias: bias.map(Param::from_tensor),
            lora: None,
            compute: None,
        }
    }

    /// The layer with its products in `compute` (`None`: the backend's float type), for
    /// mixed precision; the parameters are untouched.
    pub fn with_compute(self, compute: Option<FloatDType>) -> Self {
        Self { compute, ..self }
    }

    /// The type the products run in, if not the backend's float type.
    pub fn compute(&self) -> Option<FloatDType> {
        self.compute
    }

    /// Input width `d_in`.
    pub fn d_in(&self) -> usize {
        self.weight_t.dims()[0]
    }

    /// Output width `d_out`.
    pub fn d_out(&self) -> usize {
        self.weight_t.dims()[1]
    }

    /// The weight `[d_out, d_in]`, as the checkpoint stores it.
    pub fn weight(&self) -> Tensor<B, 2> {
        self.weight_t.val().transpose()
    }

    /// The bias `[d_out]`, if the layer has one.
    pub fn bias(&self) -> Option<Tensor<B, 1>> {
        self.bias.as_ref().map(Param::val)
    }

    /// The attached adapter, if any.
    pub fn adapter(&self) -> Option<&LoraAdapter<B>> {
        self.lora.as_ref()
    }

    /// Attaches `adapter` (replacing any) and freezes the base weight and bias: they no longer
    /// require gradients, so an optimizer keeps no state for them. An adapter made for other
    /// widths (`A` not `[r, d_in]` or `B` not `[d_out, r]`) is refused, naming the tensor and
    /// both shapes.
    pub fn with_adapter(self, adapter: LoraAdapter<B>) -> Result<Self, Error> {
        let (d_in, d_out, r) = (self.d_in(), self.d_out(), adapter.rank());
        let check = |name: &str, expected: [usize; 2], found: [usize; 2]| {
            if expected == found {
                Ok(())
            } else {
                Err(Error::Shape {
                    file: "<adapter>".into(),
                    tensor: name.into(),
                    expected: expected.to_vec(),
                    found: found.to_vec(),
                })
            }
        };
        check("lora_A.weight", [r, d_in], adapter.lora_a().dims())?;
        check("lora_B.weight", [d_out, r], adapter.lora_b().dims())?;
        Ok(Self {
            weight_t: self.weight_t.set_require_grad(false),
            bias: self.bias.map(|b| b.set_require_grad(false)),
            lora: Some(adapter),
            compute: self.compute,
        })
    }

    /// The same layer without its adapter: the base `x Wᵀ + b`. The weight tensors are
    /// shared with `self` (Burn tensors are reference-counted), not copied.
    pub fn without_adapter(&self) -> Self {
        Self {
            weight_t: self.weight_t.clone(),
            bias: self.bias.clone(),
            lora: None,
            compute: self.compute,
        }
    }

    /// The adapter merged into the weight, `W + s·B·A` (PEFT's `merge_and_unload`), with no
    /// adapter left; without an adapter, the layer itself.
    pub fn merged(self) -> Self {
        let Some(lora) = self.lora else {
            return self;
        };
        // Wᵀ + s·Aᵀ·Bᵀ = (W + s·B·A)ᵀ, in the stored layout.
        let delta = lora
            .a_t
            .val()
            .matmul(lora.b_t.val())
            .mul_scalar(lora.scaling);
        Self {
            weight_t: self.weight_t.map(|w| w + delta),
            bias: self.bias,
            lora: None,
            compute: self.compute,
        }
    }

    /// Applies the layer over the last axis of `x`.
    ///
    /// The leading axes are folded into rows first, so forward and backward are each one
    /// `[rows, in] × [in, out]` product instead of a batch of small ones followed by a sum
    /// over the batch for the weight gradient. A few rows (a decode step) on a host backend
    /// go through [`omniopsd_backends::rows`] where it applies; the adapter's two thin
    /// products run on the backend's matmul.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mut dims = x.dims();
        let inputs = dims[D - 1];
        let rows = x.shape().num_elements() / inputs.max(1);
        let x = x.reshape([rows, inputs]);
        let adapter_input = self.lora.as_ref().map(|_| x.clone());
        let master = x.dtype();
        let y = match self.compute {
            Some(dtype) => x
                .cast(dtype)
                .matmul(self.weight_t.val().cast(dtype))
                .cast(master),
            None => match product(x, self.weight_t.val(), Layout::InOut) {
                Ok(y) => y,
                Err((x, w)) => x.matmul(w),
            },
        };
        let y = match &self.bias {
            Some(b) => y + b.val().unsqueeze(),
            None => y,
        };
        let y = match (&self.lora, adapter_input) {
            (Some(lora), Some(x)) => match self.compute {
                Some(dtype) => y + lora.delta(x, Some(dtype)).cast(master),
                None => y + lora.delta(x, None),
            },
            _ => y,
        };
        dims[D - 1] = y.dims()[1];
        y.reshape(dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::module::AutodiffModule;
    use burn::optim::GradientsParams;

    type B = NdArray<f32>;
    type A = Autodiff<B>;

    fn seq<Bk: Backend, const D: usize>(shape: [usize; D], seed: f32) -> Tensor<Bk, D> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (i as f32 * 0.37 + seed).sin() * 0.5)
            .collect();
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    fn values<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
    }

    /// `x Wᵀ + b + s · (x Aᵀ) Bᵀ` computed on the host in f64, `x` `[n, i]`.
    fn by_hand(
        x: &[f32],
        w: &[f32],
        b: &[f32],
        a: &[f32],
        bb: &[f32],
        s: f64,
        (n, i, o, r): (usize, usize, usize, usize),
    ) -> Vec<f32> {
        let mut out = vec![0f32; n * o];
        for row in 0..n {
            let xa: Vec<f64> = (0..r)
                .map(|k| {
                    (0..i)
                        .map(|j| x[row * i + j] as f64 * a[k * i + j] as f64)
                        .sum()
                })
                .collect();
            for c in 0..o {
                let base: f64 = (0..i)
                    .map(|j| x[row * i + j] as f64 * w[c * i + j] as f64)
                    .sum::<f64>()
                    + b[c] as f64;
                let delta: f64 = (0..r).map(|k| xa[k] * bb[c * r + k] as f64).sum();
                out[row * o + c] = (base + s * delta) as f32;
            }
        }
        out
    }

    fn layer<Bk: Backend>(scaling: f64, dropout: f64) -> Linear<Bk> {
        let (i, o, r) = (6, 5, 3);
        Linear::new(seq([o, i], 0.1), Some(seq([o], 0.2)))
            .with_adapter(LoraAdapter::new(
                seq([r, i], 0.3),
                seq([o, r], 0.4),
                scaling,
                dropout,
            ))
            .unwrap()
    }

    #[test]
    fn adapter_adds_the_scaled_low_rank_product() {
        let (n, i, o, r) = (4, 6, 5, 3);
        let lin = layer::<B>(2.5, 0.0);
        let x = seq::<B, 3>([2, 2, i], 0.5);
        let y = values(lin.forward(x.clone()));
        let expected = by_hand(
            &values(x),
            &values(seq::<B, 2>([o, i], 0.1)),
            &values(seq::<B, 1>([o], 0.2)),
            &values(seq::<B, 2>([r, i], 0.3)),
            &values(seq::<B, 2>([o, r], 0.4)),
            2.5,
            (n, i, o, r),
        );
        let err = y
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-5, "{err}");
        assert_eq!(
            values(lin.adapter().unwrap().lora_a()),
            values(seq::<B, 2>([r, i], 0.3))
        );
        assert_eq!(
            values(lin.adapter().unwrap().lora_b()),
            values(seq::<B, 2>([o, r], 0.4))
        );
    }

    #[test]
    fn without_adapter_is_the_base_and_merged_equals_the_adapted_layer() {
        let lin = layer::<B>(2.5, 0.0);
        let x = seq::<B, 2>([3, 6], 0.9);
        let base = Linear::<B>::new(seq([5, 6], 0.1), Some(seq([5], 0.2)));
        assert_eq!(
            values(lin.without_adapter().forward(x.clone())),
            values(base.forward(x.clone()))
        );
        let adapted = values(lin.forward(x.clone()));
        let merged = lin.merged();
        assert!(merged.adapter().is_none());
        let err = values(merged.forward(x))
            .iter()
            .zip(&adapted)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-5, "{err}");
    }

    #[test]
    fn only_the_adapter_gets_gradients() {
        let lin = layer::<A>(2.0, 0.0);
        let loss = lin.forward(seq::<A, 2>([3, 6], 0.7)).powi_scalar(2).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &lin);
        let lora = lin.adapter().unwrap();
        assert!(grads.get::<B, 2>(lora.a_t_param().id).is_some());
        assert!(grads.get::<B, 2>(lora.b_t_param().id).is_some());
        assert!(grads.get::<B, 2>(lin.weight_t.id).is_none());
        assert!(grads.get::<B, 1>(lin.bias.as_ref().unwrap().id).is_none());
        assert_eq!(grads.len(), 2);
    }

    #[test]
    fn dropout_applies_in_training_only() {
        let x = seq::<A, 2>([64, 6], 0.7);
        let lin = layer::<A>(2.0, 0.5);
        // Inner backend (inference, rollouts, teacher): the identity, every call the same.
        let inner = lin.valid();
        let xi = x.clone().inner();
        assert_eq!(
            values(inner.forward(xi.clone())),
            values(inner.forward(xi.clone()))
        );
        assert_eq!(
            values(inner.forward(xi.clone())),
            values(layer::<B>(2.0, 0.0).forward(xi))
        );
        // Autodiff backend (training): half the adapter's inputs dropped, so the output moves.
        let trained = values(lin.forward(x.clone()));
        let eval = values(layer::<A>(2.0, 0.0).forward(x));
        assert_ne!(trained, eval);
    }

    #[test]
    fn adapter_for_other_widths_is_refused_naming_the_tensor_and_shapes() {
        let base = Linear::<B>::new(seq([5, 6], 0.1), None);
        let err = base
            .with_adapter(LoraAdapter::new(
                seq([3, 7], 0.3),
                seq([5, 3], 0.4),
                1.0,
                0.0,
            ))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lora_A.weight") && err.contains("[3, 6]") && err.contains("[3, 7]"),
            "{err}"
        );
    }
}
