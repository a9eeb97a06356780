//! The project's one general-purpose random generator and one string hash, for everything
//! outside the sampler (which uses the counter-based Philox stream of [`crate::sampling`]):
//! synthetic corpora, random weight initialisation, batch orders.
//!
//! Both are fully specified integer algorithms, so a seed gives the same values on every
//! platform and with every version of every dependency; the tests pin outputs bit for bit.
//!
//! ```
//! use omniopsd_core::rng::{fnv1a64, SplitMix64};
//!
//! // A stream per (seed, tensor name), independent of the order tensors are drawn in.
//! let mut rng = SplitMix64::new(7, fnv1a64(b"model.embed_tokens.weight"));
//! let x = rng.uniform();
//! assert!((0.0..1.0).contains(&x));
//! ```

// Without std, `f64::ln`/`sqrt`/`cos` come from libm through this trait.
#[cfg(not(feature = "std"))]
#[allow(unused_imports)]
use num_traits::Float;

/// SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number generators", 2014):
/// a 64-bit counter advanced by the golden-ratio increment and passed through a mixing
/// function. Tiny, fast and fully specified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A stream keyed by `(seed, stream)`: the state `seed ^ stream · 0xD1B54A32D192ED03`
    /// (an odd multiplier that spreads consecutive stream ids over the state space), with the
    /// first output discarded.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut s = Self(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        s.next_u64();
        s
    }

    /// The generator with raw state `state`: its first output is the reference SplitMix64's
    /// first output for that seed (`from_state(0)` gives `0xE220A8397B1DCDAF`).
    pub const fn from_state(state: u64) -> Self {
        Self(state)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `(0, 1]` with 53 random bits: never 0, so its logarithm is finite
    /// (Box–Muller radii).
    pub fn uniform_nonzero(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform index in `0..n` (0 when `n = 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }

    /// One element of a non-empty slice.
    ///
    /// # Panics
    /// When `items` is empty.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// A standard normal draw (Box–Muller, cosine branch; the first uniform floored at
    /// `1e-12` so the logarithm is finite).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-12);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (core::f64::consts::TAU * u2).cos()
    }
}

/// FNV-1a, 64 bits (Fowler, Noll & Vo): offset basis `0xCBF29CE484222325`, prime
/// `0x100000001B3`. Turns a name into a stream id.
pub const fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        h = (h ^ bytes[i] as u64).wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values were produced by the implementations this module replaces
    // (bins/omniopsd/src/data/synth.rs, benches/src/init.rs, `name_stream` in
    // bins/omniopsd/src/train/omni.rs); `from_state(0)` and `fnv1a64(b"a")` are also the
    // algorithms' published reference values.

    #[test]
    fn splitmix64_outputs_are_pinned() {
        let mut r = SplitMix64::from_state(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        let mut r = SplitMix64::new(0, 0);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(r.next_u64(), 0x06c4_5d18_8009_454f);
        assert_eq!(r.next_u64(), 0xf88b_b8a8_724c_81ec);
        let mut r = SplitMix64::new(42, 7);
        assert_eq!(r.next_u64(), 0x1dce_b68a_1771_c478);
        assert_eq!(r.next_u64(), 0x7a28_5204_fe46_4db5);
        assert_eq!(r.uniform().to_bits(), 0x3fe9_36c0_3595_ab59);
        assert_eq!(r.below(10), 4);
        assert_eq!(r.normal().to_bits(), 0x3fc4_5fda_5c3d_fbac);
        let mut r = SplitMix64::from_state(1_234_567);
        assert_eq!(r.next_u64(), 0x599e_d017_fb08_fc85);
        assert_eq!(r.next_u64(), 0x2c73_f084_5854_0fa5);
    }

    #[test]
    fn uniforms_stay_in_their_intervals() {
        let mut r = SplitMix64::from_state(3);
        for _ in 0..10_000 {
            let mut a = r.clone();
            let u = r.uniform();
            let v = a.uniform_nonzero();
            assert!((0.0..1.0).contains(&u) && v > 0.0 && v <= 1.0);
            // Same bits, shifted by one ulp of 2^-53.
            assert_eq!(v, u + 1.0 / (1u64 << 53) as f64);
        }
        assert_eq!(r.below(0), 0);
    }

    #[test]
    fn fnv1a64_outputs_are_pinned() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"model.embed_tokens.weight"), 0xa88f_d795_d5c6_d156);
        assert_eq!(fnv1a64(b"warmup"), 0x3300_6b31_fe16_64a5);
    }
}
