//! A small mixed-radix FFT, enough for Whisper's 400-point frames (400 = 2⁴·5²).
//!
//! Decimation in time over the prime factors of `n`: `X[k] = Σ_r W_n^{rk} · FFT_{n/p}(x[r::p])[k mod n/p]`
//! for each factor `p` (Cooley & Tukey 1965, generalised to any radix). Every size the
//! feature extractor needs factors into small primes, so the cost is `O(n · Σ p)` per frame.

/// A complex number in f64; the spectrogram is accumulated in double precision so the only
/// rounding that matters is the final cast to f32.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Complex {
    pub re: f64,
    pub im: f64,
}

impl Complex {
    fn mul(self, o: Complex) -> Complex {
        Complex {
            re: self.re * o.re - self.im * o.im,
            im: self.re * o.im + self.im * o.re,
        }
    }
    fn add(self, o: Complex) -> Complex {
        Complex {
            re: self.re + o.re,
            im: self.im + o.im,
        }
    }
}

/// A planned forward FFT of one length: twiddles `W_n^j = e^{-2πij/n}` and the radix sequence.
#[derive(Clone, Debug)]
pub(crate) struct Fft {
    n: usize,
    twiddles: Vec<Complex>,
    factors: Vec<usize>,
}

impl Fft {
    /// Plans an FFT of length `n >= 1`.
    pub fn new(n: usize) -> Self {
        let twiddles = (0..n)
            .map(|j| {
                let angle = -2.0 * core::f64::consts::PI * j as f64 / n as f64;
                Complex {
                    re: angle.cos(),
                    im: angle.sin(),
                }
            })
            .collect();
        let mut factors = Vec::new();
        let mut rest = n;
        let mut p = 2;
        while rest > 1 {
            while rest % p == 0 {
                factors.push(p);
                rest /= p;
            }
            p += 1;
            if p * p > rest && rest > 1 {
                factors.push(rest);
                break;
            }
        }
        Self {
            n,
            twiddles,
            factors,
        }
    }

    /// `X[k] = Σ_j x[j] e^{-2πijk/n}` for `k < n`.
    pub fn forward(&self, input: &[Complex]) -> Vec<Complex> {
        debug_assert_eq!(input.len(), self.n);
        let mut out = vec![Complex::default(); self.n];
        self.recurse(input, 1, &mut out, 0);
        out
    }

    /// FFT of `input[0], input[stride], …` (`n / stride` points) into `out`, using the factors
    /// from `depth` on. `stride` also scales the twiddle index: `W_{n/stride}^j = W_n^{j·stride}`.
    fn recurse(&self, input: &[Complex], stride: usize, out: &mut [Complex], depth: usize) {
        let len = out.len();
        if len == 1 {
            out[0] = input[0];
            return;
        }
        let p = self.factors[depth];
        let m = len / p;
        // Sub-transforms of each residue class r: out[r*m .. (r+1)*m] = FFT_m(x[r::p]).
        let mut subs = vec![Complex::default(); len];
        for r in 0..p {
            self.recurse(
                &input[r * stride..],
                stride * p,
                &mut subs[r * m..(r + 1) * m],
                depth + 1,
            );
        }
        for (k, slot) in out.iter_mut().enumerate() {
            let mut acc = Complex::default();
            for r in 0..p {
                let tw = self.twiddles[(r * k * stride) % self.n];
                acc = acc.add(subs[r * m + k % m].mul(tw));
            }
            *slot = acc;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_dft(x: &[Complex]) -> Vec<Complex> {
        let n = x.len();
        (0..n)
            .map(|k| {
                x.iter()
                    .enumerate()
                    .fold(Complex::default(), |acc, (j, v)| {
                        let a = -2.0 * core::f64::consts::PI * (j * k) as f64 / n as f64;
                        acc.add(v.mul(Complex {
                            re: a.cos(),
                            im: a.sin(),
                        }))
                    })
            })
            .collect()
    }

    #[test]
    fn fft_matches_naive_dft_for_mixed_radix_lengths() {
        for n in [1usize, 2, 3, 7, 12, 25, 49, 400] {
            let x: Vec<Complex> = (0..n)
                .map(|j| Complex {
                    re: ((j * 7 + 3) % 11) as f64 - 5.0,
                    im: ((j * 5 + 1) % 13) as f64 * 0.25,
                })
                .collect();
            let fast = Fft::new(n).forward(&x);
            let slow = naive_dft(&x);
            for (a, b) in fast.iter().zip(&slow) {
                assert!(
                    (a.re - b.re).abs() < 1e-8 * n as f64 && (a.im - b.im).abs() < 1e-8 * n as f64,
                    "n={n}: {a:?} vs {b:?}"
                );
            }
        }
    }
}
