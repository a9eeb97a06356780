//! Random initialisation of a checkpoint, as transformers' `_init_weights` does for the Qwen
//! family: every projection, convolution and embedding from `N(0, std²)` (`std` is the
//! config's `initializer_range`), biases 0, norm scales 1.
//!
//! A model lists its tensors with the layer helpers ([`RandomInit::linear`],
//! [`RandomInit::rms_norm`], …) and [`RandomInit::draw`] fills them. Each normal tensor has
//! its own SplitMix64 stream keyed by `(seed, FNV-1a of its name)`, so its values depend only
//! on the seed, its name and its size, never on which other tensors the checkpoint holds or
//! in which order they are listed.

use burn::tensor::TensorData;
use omniopsd_core::rng::{fnv1a64, SplitMix64};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fill {
    Normal,
    Zeros,
    Ones,
}

/// The named tensors of a randomly initialised checkpoint, listed layer by layer.
#[derive(Clone, Debug, Default)]
pub struct RandomInit {
    tensors: Vec<(String, Vec<usize>, Fill)>,
}

impl RandomInit {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// A tensor drawn from `N(0, std²)` (weights, embeddings, convolution kernels).
    pub fn normal(&mut self, name: impl Into<String>, shape: Vec<usize>) {
        self.tensors.push((name.into(), shape, Fill::Normal));
    }

    /// A tensor of zeros (biases).
    pub fn zeros(&mut self, name: impl Into<String>, shape: Vec<usize>) {
        self.tensors.push((name.into(), shape, Fill::Zeros));
    }

    /// `nn.Linear(d_in, d_out)` at `prefix`: `weight [d_out, d_in]` normal, `bias [d_out]`
    /// zeros when present.
    pub fn linear(&mut self, prefix: &str, d_in: usize, d_out: usize, bias: bool) {
        self.normal(format!("{prefix}.weight"), vec![d_out, d_in]);
        if bias {
            self.zeros(format!("{prefix}.bias"), vec![d_out]);
        }
    }

    /// An RMSNorm at `prefix`: `weight [dim]` ones.
    pub fn rms_norm(&mut self, prefix: &str, dim: usize) {
        self.tensors
            .push((format!("{prefix}.weight"), vec![dim], Fill::Ones));
    }

    /// A LayerNorm at `prefix`: `weight [dim]` ones, `bias [dim]` zeros.
    pub fn layer_norm(&mut self, prefix: &str, dim: usize) {
        self.rms_norm(prefix, dim);
        self.zeros(format!("{prefix}.bias"), vec![dim]);
    }

    /// Tensors listed so far.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether nothing is listed.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The tensors' values: normals scaled by `std` from the stream of `(seed, name)`
    /// ([`SplitMix64::normal`]), in the order they were listed.
    pub fn draw(self, std: f64, seed: u64) -> Vec<(String, TensorData)> {
        self.tensors
            .into_iter()
            .map(|(name, shape, fill)| {
                let n: usize = shape.iter().product();
                let values = match fill {
                    Fill::Zeros => vec![0.0; n],
                    Fill::Ones => vec![1.0; n],
                    Fill::Normal => normals(n, std, seed, &name),
                };
                (name, TensorData::new(values, shape))
            })
            .collect()
    }
}

fn normals(n: usize, std: f64, seed: u64, name: &str) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed, fnv1a64(name.as_bytes()));
    (0..n).map(|_| (std * rng.normal()) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &(String, TensorData)) -> Vec<f32> {
        t.1.clone().into_vec::<f32>().unwrap()
    }

    #[test]
    fn normals_are_pinned_bit_for_bit() {
        // The embedded model's checkpoint (and so the README's table) depends on these bits.
        let bits: Vec<u32> = normals(5, 0.02, 7, "model.embed_tokens.weight")
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert_eq!(bits, PINNED);
    }

    const PINNED: [u32; 5] = [0xbc917fbd, 0xbc937a55, 0xbc269035, 0xbba472f4, 0xbcaa99bd];

    #[test]
    fn normals_have_the_asked_spread_and_depend_only_on_seed_and_name() {
        let a = normals(200_001, 0.02, 7, "w");
        let mean = a.iter().map(|x| *x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 2e-4, "{mean}");
        assert!((var.sqrt() - 0.02).abs() < 2e-4, "{}", var.sqrt());
        assert_eq!(a, normals(200_001, 0.02, 7, "w"));
        assert_ne!(a[..8], normals(8, 0.02, 8, "w")[..]);
        assert_ne!(a[..8], normals(8, 0.02, 7, "v")[..]);
    }

    #[test]
    fn layers_get_hf_init_and_values_do_not_depend_on_listing_order() {
        let mut a = RandomInit::new();
        a.linear("fc", 3, 4, true);
        a.layer_norm("ln", 4);
        let mut b = RandomInit::new();
        b.layer_norm("ln", 4);
        b.normal("other", vec![7]);
        b.linear("fc", 3, 4, true);
        let a = a.draw(0.5, 1);
        let b = b.draw(0.5, 1);
        let names: Vec<&str> = a.iter().map(|t| t.0.as_str()).collect();
        assert_eq!(names, ["fc.weight", "fc.bias", "ln.weight", "ln.bias"]);
        assert_eq!(a[0].1.shape.to_vec(), [4, 3]);
        assert_eq!(values(&a[0]), values(&b[3]));
        assert_eq!(values(&a[1]), vec![0.0; 4]);
        assert_eq!(values(&a[2]), vec![1.0; 4]);
        assert_eq!(values(&a[3]), vec![0.0; 4]);
    }
}
