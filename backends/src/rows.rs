//! Products with few rows on the host: `y = x · w` or `y = x · wᵀ` where `x` has
//! [`MIN_ROWS`]..=[`MAX_ROWS`] rows, as in every decode step of a rollout group (its `G`
//! hidden rows meet each weight matrix and the LM head once per token).
//!
//! Such a product reads the whole weight to do little arithmetic on it, so its speed is the
//! rate at which it streams the weight. On Flex, the `gemm` crate packs operands and picks
//! microkernels made for large `m`, which stream the weight well below the core's read
//! bandwidth at 2–8 rows. The kernels here keep every partial sum in registers, read each
//! weight element once, in the layout it is stored in, and prefetch ahead of the reads:
//! - [`Layout::InOut`]: `w` is `[k, n]` (a `Linear` kept as `Wᵀ`); register tiles of rows ×
//!   up to 96 columns go down panels of 16 rows of `w`;
//! - [`Layout::OutIn`]: `w` is `[n, k]` (an embedding matrix used as the LM head); each
//!   output is a dot product of a weight row with every row of `x`, one weight row at a time
//!   for `k` ≤ 512 and a few side by side for longer rows.
//!
//! Only f32, contiguous operands on Flex, on CPUs with AVX-512F, take this path (checked at
//! run time); anything else is handed back for the backend's own matmul. `OMNIOPSD_ROWS=off`
//! in the environment hands every product back too (read once per process), so an A/B of the
//! kernels is two runs of the same benchmark (`benches/compare/compare.py --rows-kernels off`).
//! The sums run in a
//! different order than a GEMM's, so results differ from it by f32 rounding, and are the same
//! from run to run.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// The fewest rows `x` may have for the kernels here. A single row is a matrix–vector
/// product, which `gemm` already streams at this core's bandwidth (its own GEMV paths).
pub const MIN_ROWS: usize = 2;
/// The most rows `x` may have for the kernels here; larger products go to the backend.
pub const MAX_ROWS: usize = 8;

/// How the weight operand is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `w` is `[k, n]`: `y = x · w`.
    InOut,
    /// `w` is `[n, k]`: `y = x · wᵀ`.
    OutIn,
}

/// `y [m, n]` from `x [m, k]` and `w` stored as `layout` says, if a kernel here applies to
/// this backend, CPU and shape; otherwise `Err((x, w))`, untouched, for the caller's general
/// product.
#[allow(clippy::result_large_err)]
pub fn product<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    layout: Layout,
) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
    #[cfg(feature = "flex")]
    {
        if (MIN_ROWS..=MAX_ROWS).contains(&x.dims()[0]) && simd::available() && enabled() {
            return flex::product(x, w, layout);
        }
    }
    let _ = layout;
    Err((x, w))
}

/// Whether [`product`] may use the kernels: not when `OMNIOPSD_ROWS` is `off` (or `0`,
/// `false`), read once per process.
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| !crate::switched_off("OMNIOPSD_ROWS"))
}

/// `y = x · w` (`layout` `InOut`, `w` `[k, n]`) or `y = x · wᵀ` (`OutIn`, `w` `[n, k]`) on
/// row-major slices, for [`MIN_ROWS`] ≤ `m = x.len() / k` ≤ [`MAX_ROWS`] rows. Returns
/// `None` where the CPU lacks AVX-512F or the shapes do not fit (`y` is then untouched).
pub fn product_slices(
    x: &[f32],
    w: &[f32],
    k: usize,
    n: usize,
    layout: Layout,
    y: &mut [f32],
) -> Option<()> {
    if k == 0 || n == 0 || x.len() % k != 0 {
        return None;
    }
    let m = x.len() / k;
    if !(MIN_ROWS..=MAX_ROWS).contains(&m)
        || w.len() != k * n
        || y.len() != m * n
        || !simd::available()
    {
        return None;
    }
    simd::product(x, w, m, k, n, layout, y)
}

#[cfg(feature = "flex")]
mod flex {
    use core::any::Any;

    use burn::tensor::backend::Backend;
    use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
    use burn_flex::FlexTensor;

    use super::Layout;

    /// The f32 elements of a contiguous Flex tensor.
    fn values(t: &dyn Any) -> Option<&[f32]> {
        let t = t.downcast_ref::<FlexTensor>()?;
        if t.dtype() != DType::F32 {
            return None;
        }
        let (start, end) = t.layout().contiguous_offsets()?;
        t.storage::<f32>().get(start..end)
    }

    #[allow(clippy::result_large_err)]
    pub(super) fn product<B: Backend>(
        x: Tensor<B, 2>,
        w: Tensor<B, 2>,
        layout: Layout,
    ) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
        let [m, k] = x.dims();
        let [a, b] = w.dims();
        let n = match layout {
            Layout::InOut => b,
            Layout::OutIn => a,
        };
        let (xp, wp) = match (x.into_primitive(), w.into_primitive()) {
            (TensorPrimitive::Float(xp), TensorPrimitive::Float(wp)) => (xp, wp),
            (xp, wp) => return Err((Tensor::from_primitive(xp), Tensor::from_primitive(wp))),
        };
        // Allocated only for tensors the kernels can read (an autodiff tensor cannot be).
        let mut y = Vec::new();
        let done = match (values(&xp), values(&wp)) {
            (Some(xs), Some(ws)) => {
                y.resize(m * n, 0f32);
                super::product_slices(xs, ws, k, n, layout, &mut y)
            }
            _ => None,
        };
        let back = |xp, wp| {
            (
                Tensor::from_primitive(TensorPrimitive::Float(xp)),
                Tensor::from_primitive(TensorPrimitive::Float(wp)),
            )
        };
        if done.is_none() {
            return Err(back(xp, wp));
        }
        let out: Box<dyn Any> = Box::new(FlexTensor::from_data(TensorData::new(y, [m, n])));
        match out.downcast::<B::FloatTensorPrimitive>() {
            Ok(out) => Ok(Tensor::from_primitive(TensorPrimitive::Float(*out))),
            // `values` matched, so the primitive is a FlexTensor; kept total regardless.
            Err(_) => Err(back(xp, wp)),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use core::arch::x86_64::*;

    use super::Layout;

    /// Whether this CPU runs the AVX-512F kernels (checked once by std, then cached).
    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
    }

    /// Dispatches on the row count so every kernel's tile is a compile-time size.
    pub(super) fn product(
        x: &[f32],
        w: &[f32],
        m: usize,
        k: usize,
        n: usize,
        layout: Layout,
        y: &mut [f32],
    ) -> Option<()> {
        let (x, w, y) = (x.as_ptr(), w.as_ptr(), y.as_mut_ptr());
        // SAFETY: the caller checked AVX-512F and that x is m×k, w is k×n and y is m×n.
        unsafe {
            match (layout, m) {
                (Layout::InOut, 2) => in_out::<2, 8>(x, w, k, n, y),
                (Layout::InOut, 3) => in_out::<3, 6>(x, w, k, n, y),
                (Layout::InOut, 4) => in_out::<4, 6>(x, w, k, n, y),
                (Layout::InOut, 5) => in_out::<5, 4>(x, w, k, n, y),
                (Layout::InOut, 6) => in_out::<6, 4>(x, w, k, n, y),
                (Layout::InOut, 7) => in_out::<7, 3>(x, w, k, n, y),
                (Layout::InOut, 8) => in_out::<8, 3>(x, w, k, n, y),
                // Short weight rows (k ≤ 512, the LM head of a small model): one row at a
                // time, so the weight is one sequential stream (2× faster at k = 256 than
                // several rows side by side, which the prefetchers follow poorly).
                (Layout::OutIn, 2..=8) if k <= 512 => match m {
                    2 => out_in::<2, 1>(x, w, k, n, y),
                    3 => out_in::<3, 1>(x, w, k, n, y),
                    4 => out_in::<4, 1>(x, w, k, n, y),
                    5 => out_in::<5, 1>(x, w, k, n, y),
                    6 => out_in::<6, 1>(x, w, k, n, y),
                    7 => out_in::<7, 1>(x, w, k, n, y),
                    _ => out_in::<8, 1>(x, w, k, n, y),
                },
                // Longer rows: several side by side, each `x` vector serving them all.
                (Layout::OutIn, 2) => out_in::<2, 8>(x, w, k, n, y),
                (Layout::OutIn, 3) => out_in::<3, 4>(x, w, k, n, y),
                (Layout::OutIn, 4) => out_in::<4, 4>(x, w, k, n, y),
                (Layout::OutIn, 5) => out_in::<5, 2>(x, w, k, n, y),
                (Layout::OutIn, 6) => out_in::<6, 2>(x, w, k, n, y),
                (Layout::OutIn, 7) => out_in::<7, 2>(x, w, k, n, y),
                (Layout::OutIn, 8) => out_in::<8, 2>(x, w, k, n, y),
                _ => return None,
            }
        }
        Some(())
    }

    /// The lanes `0..len` of a 16-lane vector (`len` ≤ 16).
    fn mask(len: usize) -> __mmask16 {
        if len >= 16 {
            0xffff
        } else {
            ((1u32 << len) - 1) as __mmask16
        }
    }

    /// Rows of `w` per panel in [`in_out`].
    const PANEL: usize = 16;
    /// How many strips ahead along a row of `w` [`in_out`] prefetches into L1.
    const AHEAD_STRIPS: usize = 4;
    /// Panels up to this many elements also have the next panel prefetched into L2.
    const NEAR_PANEL: usize = 1 << 17;

    /// `y = x · w`, `w` `[k, n]`, one panel of [`PANEL`] rows of `w` at a time: across the
    /// panel, strips of `16·V` columns keep `M × V` partial sums in registers while they go
    /// down its rows, and add them to `y` once per panel. Each strip prefetches its rows a few
    /// strips ahead (and the next panel's, if the panel fits in L2): without that, reads that
    /// jump a row between strips leave the hardware prefetchers behind (3× slower at 8 rows).
    #[target_feature(enable = "avx512f")]
    unsafe fn in_out<const M: usize, const V: usize>(
        x: *const f32,
        w: *const f32,
        k: usize,
        n: usize,
        y: *mut f32,
    ) {
        let far = PANEL * n <= NEAR_PANEL;
        let mut k0 = 0;
        while k0 < k {
            let k1 = (k0 + PANEL).min(k);
            let mut j = 0;
            while j < n {
                let mut masks = [0; V];
                for (c, m) in masks.iter_mut().enumerate() {
                    *m = mask(n.saturating_sub(j + 16 * c));
                }
                let mut acc = [[_mm512_setzero_ps(); V]; M];
                if k0 > 0 {
                    for r in 0..M {
                        for c in 0..V {
                            let at = y.wrapping_add(r * n + j + 16 * c);
                            acc[r][c] = _mm512_maskz_loadu_ps(masks[c], at);
                        }
                    }
                }
                for kk in k0..k1 {
                    let row = w.add(kk * n + j);
                    let ahead = row.wrapping_add(16 * V * AHEAD_STRIPS) as *const i8;
                    let below = row.wrapping_add(PANEL * n) as *const i8;
                    for line in 0..V {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line));
                        if far {
                            _mm_prefetch::<_MM_HINT_T1>(below.wrapping_add(64 * line));
                        }
                    }
                    let mut wv = [_mm512_setzero_ps(); V];
                    for c in 0..V {
                        wv[c] = _mm512_maskz_loadu_ps(masks[c], row.wrapping_add(16 * c));
                    }
                    for r in 0..M {
                        let xr = _mm512_set1_ps(*x.add(r * k + kk));
                        for c in 0..V {
                            acc[r][c] = _mm512_fmadd_ps(xr, wv[c], acc[r][c]);
                        }
                    }
                }
                for r in 0..M {
                    for c in 0..V {
                        let at = y.wrapping_add(r * n + j + 16 * c);
                        _mm512_mask_storeu_ps(at, masks[c], acc[r][c]);
                    }
                }
                j += 16 * V;
            }
            k0 = k1;
        }
    }

    /// `y = x · wᵀ`, `w` `[n, k]`: `J` outputs at a time, each a dot product of a contiguous
    /// weight row with every row of `x`, summed lane-wise along `k`; the `M × J ≤ 16` sums are
    /// then reduced together by [`reduce16`] (one reduction per sum cost as much as a quarter
    /// of the products at `k` = 256).
    #[target_feature(enable = "avx512f")]
    unsafe fn out_in<const M: usize, const J: usize>(
        x: *const f32,
        w: *const f32,
        k: usize,
        n: usize,
        y: *mut f32,
    ) {
        const { assert!(M * J <= 16, "reduce16 takes 16 sums") };
        let mut j = 0;
        while j < n {
            let outs = J.min(n - j);
            let mut acc = [[_mm512_setzero_ps(); J]; M];
            let mut kk = 0;
            while kk < k {
                let lanes = mask(k - kk);
                let mut wv = [_mm512_setzero_ps(); J];
                for c in 0..J {
                    // Rows past `n` load nothing (mask 0), so their sums stay zero.
                    let live = if c < outs { lanes } else { 0 };
                    let at = w.wrapping_add((j + c) * k + kk);
                    wv[c] = _mm512_maskz_loadu_ps(live, at);
                    if J == 1 {
                        // One short row at a time (k ≤ 512): the same place two rows ahead.
                        _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(2 * k) as *const i8);
                    } else {
                        // Rows side by side (k > 512): the same place a few groups ahead into
                        // L2, and this row a few lines ahead into L1. Each row of a
                        // hidden-1,024 head is a 4 KiB page, which the hardware prefetchers
                        // do not cross; prefetching two groups ahead into L1 alone made the
                        // 8-row head 25–30% slower.
                        _mm_prefetch::<_MM_HINT_T1>(
                            at.wrapping_add(AHEAD_GROUPS * J * k) as *const i8
                        );
                        _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(16 * AHEAD_LINES) as *const i8);
                    }
                }
                for r in 0..M {
                    let xv = _mm512_maskz_loadu_ps(lanes, x.add(r * k + kk));
                    for c in 0..J {
                        acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
                    }
                }
                kk += 16;
            }
            let mut all = [_mm512_setzero_ps(); 16];
            for r in 0..M {
                all[r * J..(r + 1) * J].copy_from_slice(&acc[r]);
            }
            let mut sums = [0f32; 16];
            _mm512_storeu_ps(sums.as_mut_ptr(), reduce16(all));
            for r in 0..M {
                for c in 0..outs {
                    *y.add(r * n + j + c) = sums[REDUCED_LANE[r * J + c]];
                }
            }
            j += J;
        }
    }

    /// Groups of weight rows [`out_in`] prefetches ahead into L2 (rows side by side).
    const AHEAD_GROUPS: usize = 4;
    /// Cache lines ahead in the same weight row [`out_in`] prefetches into L1 (rows side by
    /// side).
    const AHEAD_LINES: usize = 4;

    /// Where [`reduce16`] leaves the sum of its `i`-th vector.
    const REDUCED_LANE: [usize; 16] = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];

    /// The 16 horizontal sums of `v` in one vector (lane `REDUCED_LANE[i]` holds `Σ v[i]`), by
    /// a butterfly: pairs of vectors are folded halves onto halves (256-bit, then 128-bit
    /// halves by `shuffle_f32x4`, then within 128-bit lanes by unpacks), so 16 sums take 15
    /// adds and 30 shuffles instead of 16 separate reductions of about 8 steps each.
    #[target_feature(enable = "avx512f")]
    unsafe fn reduce16(v: [__m512; 16]) -> __m512 {
        let mut halves = [_mm512_setzero_ps(); 8];
        for (i, h) in halves.iter_mut().enumerate() {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            *h = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
            );
        }
        let mut quarters = [_mm512_setzero_ps(); 4];
        for (i, q) in quarters.iter_mut().enumerate() {
            let (a, b) = (halves[2 * i], halves[2 * i + 1]);
            *q = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
            );
        }
        let mut pairs = [_mm512_setzero_ps(); 2];
        for (i, p) in pairs.iter_mut().enumerate() {
            let (a, b) = (quarters[2 * i], quarters[2 * i + 1]);
            *p = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        }
        let (a, b) = (_mm512_castps_pd(pairs[0]), _mm512_castps_pd(pairs[1]));
        _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
        )
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    use super::Layout;

    pub(super) fn available() -> bool {
        false
    }

    pub(super) fn product(
        _: &[f32],
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: Layout,
        _: &mut [f32],
    ) -> Option<()> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in [-1, 1) from a fixed LCG, so the test needs no RNG crate.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Every row count, ragged `k` and `n` (tails of the 16-lane vectors and 48-column strips),
    /// both layouts, against an f64 reference: max |error| ≤ 1e-5 · (1 + Σ|xᵢwᵢ|).
    #[test]
    fn products_match_f64_reference() {
        if !simd::available() {
            eprintln!("no AVX-512F on this CPU: the kernels are not used here");
            return;
        }
        // `k` past 512 takes the OutIn kernels that read several weight rows side by side.
        for &(k, n) in &[
            (1, 1),
            (7, 5),
            (16, 48),
            (33, 97),
            (256, 130),
            (100, 17),
            (600, 37),
            (1030, 9),
        ] {
            for m in MIN_ROWS..=MAX_ROWS {
                let x = values(m * k, (m * 31 + k) as u64);
                let w = values(k * n, (n * 7 + k) as u64);
                for layout in [Layout::InOut, Layout::OutIn] {
                    let mut y = vec![f32::NAN; m * n];
                    product_slices(&x, &w, k, n, layout, &mut y).expect("kernel applies");
                    for r in 0..m {
                        for o in 0..n {
                            let (mut sum, mut abs) = (0f64, 0f64);
                            for i in 0..k {
                                let wi = match layout {
                                    Layout::InOut => w[i * n + o],
                                    Layout::OutIn => w[o * k + i],
                                };
                                let t = f64::from(x[r * k + i]) * f64::from(wi);
                                sum += t;
                                abs += t.abs();
                            }
                            let err = (f64::from(y[r * n + o]) - sum).abs();
                            assert!(
                                err <= 1e-5 * (1.0 + abs),
                                "{layout:?} m={m} k={k} n={n} [{r},{o}]: {} vs {sum}",
                                y[r * n + o]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_declined() {
        let mut y = vec![0f32; 9 * 2];
        assert!(product_slices(&[0.0; 9 * 3], &[0.0; 6], 3, 2, Layout::InOut, &mut y).is_none());
        let mut y = vec![0f32; 2];
        assert!(product_slices(&[0.0; 3], &[0.0; 6], 3, 2, Layout::OutIn, &mut y).is_none());
        let mut y = vec![0f32; 4];
        assert!(product_slices(&[0.0; 6], &[0.0; 5], 3, 2, Layout::OutIn, &mut y).is_none());
        assert!(product_slices(&[0.0; 7], &[0.0; 6], 3, 2, Layout::OutIn, &mut y).is_none());
        assert!(product_slices(&[], &[], 0, 2, Layout::InOut, &mut y).is_none());
    }
}

/// The Flex glue: which tensors take the kernels, and that what they return equals Flex's
/// own matmul.
#[cfg(all(test, feature = "flex"))]
mod flex_tests {
    use burn::tensor::{Distribution, Tensor, TensorData, Tolerance};

    use super::*;

    type F = burn::backend::Flex<f32>;

    #[test]
    fn flex_products_equal_matmul_and_decline_what_does_not_fit() {
        if !simd::available() {
            return;
        }
        let device = Default::default();
        let (k, n) = (70, 130);
        let w_in_out = Tensor::<F, 2>::random([k, n], Distribution::Default, &device);
        let w_out_in = Tensor::<F, 2>::random([n, k], Distribution::Default, &device);
        for m in MIN_ROWS..=MAX_ROWS {
            let x = Tensor::<F, 2>::random([m, k], Distribution::Default, &device);
            let want = x.clone().matmul(w_in_out.clone()).into_data();
            let got = product(x.clone(), w_in_out.clone(), Layout::InOut)
                .unwrap_or_else(|_| panic!("m = {m}: InOut declined"));
            got.into_data()
                .assert_approx_eq::<f32>(&want, Tolerance::rel_abs(1e-5, 1e-5));
            let want = x.clone().matmul(w_out_in.clone().transpose()).into_data();
            let got = product(x, w_out_in.clone(), Layout::OutIn)
                .unwrap_or_else(|_| panic!("m = {m}: OutIn declined"));
            got.into_data()
                .assert_approx_eq::<f32>(&want, Tolerance::rel_abs(1e-5, 1e-5));
        }
        // One row, too many rows, and a transposed (non-contiguous) weight go back untouched.
        for (m, w) in [
            (1, w_in_out.clone()),
            (MAX_ROWS + 1, w_in_out.clone()),
            (3, w_out_in.clone().transpose()),
        ] {
            let x =
                Tensor::<F, 2>::from_data(TensorData::new(vec![0.5f32; m * k], [m, k]), &device);
            let (x_back, w_back) = product(x.clone(), w.clone(), Layout::InOut)
                .err()
                .unwrap_or_else(|| panic!("m = {m}: should have been declined"));
            x_back.into_data().assert_eq(&x.into_data(), true);
            w_back.into_data().assert_eq(&w.into_data(), true);
        }
        // Autodiff tensors (the student while it trains) go back too, graph intact.
        type A = burn::backend::Autodiff<F>;
        let w = Tensor::<A, 2>::from_data(w_in_out.into_data(), &device).require_grad();
        let x = Tensor::<A, 2>::from_data(TensorData::new(vec![0.5f32; 3 * k], [3, k]), &device);
        let (x, w_back) = product(x, w.clone(), Layout::InOut)
            .err()
            .unwrap_or_else(|| panic!("an autodiff tensor should have been declined"));
        let grads = x.matmul(w_back).sum().backward();
        let grad = w.grad(&grads).expect("the weight is still in the graph");
        grad.into_data().assert_approx_eq::<f32>(
            &TensorData::new(vec![1.5f32; k * n], [k, n]),
            Tolerance::rel_abs(1e-6, 1e-6),
        );
    }
}
