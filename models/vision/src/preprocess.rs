//! Frames → the Qwen2-VL processor's flattened pixel patches.
//!
//! Reference: transformers `Qwen2VLImageProcessor` / `Qwen2VLVideoProcessor` as
//! `Qwen2_5OmniProcessor` uses them. For frames of `H × W` RGB pixels:
//! 1. `smart_resize`: the target size is the nearest multiple of `patch · merge` (28) per side,
//!    scaled down (floor) if the area exceeds `max_pixels`, up (ceil) if below `min_pixels`;
//! 2. resize to that size with Pillow's bicubic filter (`Image.resize(…, BICUBIC)`, Keys cubic
//!    with `a = −0.5`, support widened by the scale when shrinking, separable horizontal then
//!    vertical passes in 22-bit fixed point, each rounded to u8), bit-exact with
//!    `Qwen2VLImageProcessorPil`. The torchvision backend's antialiased bicubic differs from
//!    Pillow by a few u8 levels at most; frames already at the target size are not resampled;
//! 3. `v = (x / 255 − mean_c) / std_c` with the CLIP mean and std;
//! 4. a video's frame count is padded to a multiple of `temporal_patch_size` by repeating the
//!    last frame; an image is one frame repeated `temporal_patch_size` times;
//! 5. patches of `temporal_patch_size × patch × patch` pixels, ordered
//!    `(t, h/merge, w/merge, merge_h, merge_w)` so every `merge²` consecutive patches form one
//!    2×2 block of the merger, each flattened as `(channel, t, y, x)`.

use crate::Error;

/// CLIP's per-channel mean (`OPENAI_CLIP_MEAN`).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's per-channel standard deviation (`OPENAI_CLIP_STD`).
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// One RGB frame, `height × width × 3` bytes, row-major.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    pub width: usize,
    pub height: usize,
    pub rgb: &'a [u8],
}

/// The processor settings (`preprocessor_config.json` / `video_preprocessor_config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessorConfig {
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl ProcessorConfig {
    /// Qwen2.5-Omni's image processor: 14-pixel patches, 2 frames per temporal patch,
    /// 2×2 merge, 56²…28²·1280 pixels.
    pub fn qwen2_5_omni_image() -> Self {
        Self {
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }

    /// Qwen2.5-Omni's video settings: 128·28² … 768·28² pixels per frame.
    pub fn qwen2_5_omni_video() -> Self {
        Self {
            min_pixels: 128 * 28 * 28,
            max_pixels: 768 * 28 * 28,
            ..Self::qwen2_5_omni_image()
        }
    }
}

impl ProcessorConfig {
    fn validate(&self) -> Result<(), Error> {
        let (p, m, tps) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        if p == 0 || m == 0 || tps == 0 {
            return Err(Error::Processor(format!(
                "patch_size, merge_size and temporal_patch_size must be positive, found {p}, {m}, {tps}"
            )));
        }
        // The sizes may come from a checkpoint's `video_preprocessor_config.json`: products
        // that overflow are refused here rather than wrapped into a wrong patch layout.
        let factor = p.checked_mul(m);
        let patch_dim = [3, tps, p, p]
            .iter()
            .try_fold(1usize, |acc, &n| acc.checked_mul(n));
        if factor.is_none() || patch_dim.is_none() {
            return Err(Error::Processor(format!(
                "patch_size {p}, merge_size {m} and temporal_patch_size {tps} overflow the \
                 patch arithmetic (patch_size · merge_size, 3 · temporal_patch_size · patch_size²)"
            )));
        }
        if self.image_std.contains(&0.0) {
            return Err(Error::Processor(format!(
                "image_std must be non-zero, found {:?}",
                self.image_std
            )));
        }
        Ok(())
    }
}

/// Flattened patches of one image or video and their grid.
#[derive(Clone, Debug, PartialEq)]
pub struct PixelPatches {
    /// `[t · h · w, 3 · temporal_patch_size · patch²]`, row-major.
    pub data: Vec<f32>,
    /// `[t, h, w]` in patches (`image_grid_thw` / `video_grid_thw`).
    pub grid_thw: [usize; 3],
    /// Values per patch row.
    pub patch_dim: usize,
}

/// The `(height, width)` the processor resizes a `height × width` frame to: multiples of
/// `factor` with area in `[min_pixels, max_pixels]`, aspect ratio kept as far as rounding
/// allows (transformers `smart_resize`). Errors on an empty frame or aspect ratio above 200.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize), Error> {
    if height == 0 || width == 0 {
        return Err(Error::EmptyFrame { height, width });
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        return Err(Error::AspectRatio { height, width });
    }
    // Python's round() rounds half to even.
    let round = |x: f64| x.round_ties_even();
    let mut h_bar = round(h / f) * f;
    let mut w_bar = round(w / f) * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// Patches of a still image (one frame, repeated over the temporal patch).
pub fn preprocess_image(frame: &Frame, cfg: &ProcessorConfig) -> Result<PixelPatches, Error> {
    cfg.validate()?;
    let repeated = vec![*frame; cfg.temporal_patch_size];
    patchify(&repeated, 1, cfg)
}

/// Patches of a video's frames (all the same size), padded to a multiple of
/// `temporal_patch_size` frames by repeating the last.
pub fn preprocess_video(frames: &[Frame], cfg: &ProcessorConfig) -> Result<PixelPatches, Error> {
    cfg.validate()?;
    let last = frames.last().ok_or(Error::NoFrames)?;
    let mut padded = frames.to_vec();
    while padded.len() % cfg.temporal_patch_size != 0 {
        padded.push(*last);
    }
    patchify(&padded, padded.len() / cfg.temporal_patch_size, cfg)
}

fn patchify(frames: &[Frame], grid_t: usize, cfg: &ProcessorConfig) -> Result<PixelPatches, Error> {
    let (p, m, tps) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    let first = &frames[0];
    let (height, width) = smart_resize(
        first.height,
        first.width,
        p * m,
        cfg.min_pixels,
        cfg.max_pixels,
    )?;
    for (index, f) in frames.iter().enumerate() {
        if f.rgb.len() != f.width * f.height * 3 {
            return Err(Error::FrameBytes {
                index,
                expected: f.width * f.height * 3,
                found: f.rgb.len(),
            });
        }
        if (f.height, f.width) != (first.height, first.width) {
            return Err(Error::FrameSize {
                index,
                expected: (first.height, first.width),
                found: (f.height, f.width),
            });
        }
    }
    let resized = frames
        .iter()
        .map(|f| {
            Ok(if (f.height, f.width) == (height, width) {
                std::borrow::Cow::Borrowed(f.rgb)
            } else {
                std::borrow::Cow::Owned(resize_bicubic(f, height, width)?)
            })
        })
        .collect::<Result<Vec<std::borrow::Cow<[u8]>>, Error>>()?;
    let (gh, gw) = (height / p, width / p);
    let patch_dim = 3 * tps * p * p;
    let mut data = Vec::with_capacity(grid_t * gh * gw * patch_dim);
    let scale = 1.0f32 / 255.0;
    for t in 0..grid_t {
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                        for c in 0..3 {
                            for tt in 0..tps {
                                let rgb = &resized[t * tps + tt];
                                for y in y0..y0 + p {
                                    for x in x0..x0 + p {
                                        let v = rgb[(y * width + x) * 3 + c] as f32 * scale;
                                        data.push((v - cfg.image_mean[c]) / cfg.image_std[c]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(PixelPatches {
        data,
        grid_thw: [grid_t, gh, gw],
        patch_dim,
    })
}

/// Pillow's fixed-point precision for 8-bit resampling (`PRECISION_BITS = 32 − 8 − 2`).
const PRECISION_BITS: u32 = 22;

/// Keys' cubic convolution kernel with `a = −0.5` (Pillow's `bicubic_filter`):
/// `(a+2)|x|³ − (a+3)|x|² + 1` for `|x| < 1`, `a|x|³ − 5a|x|² + 8a|x| − 4a` for `|x| < 2`.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis: per output index the
/// first input index and the fixed-point weights of the inputs it reads.
fn axis_coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C casts truncate toward zero; clamping to the image makes that a floor here.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let weights: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic((x as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let scaled = w * (1u32 << PRECISION_BITS) as f64;
                    (if w < 0.0 { scaled - 0.5 } else { scaled + 0.5 }) as i32
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

/// `Σ v·k` in fixed point, rounded and clipped to a byte (Pillow's `clip8`).
fn fixed_dot(values: impl Iterator<Item = u8>, weights: &[i32]) -> u8 {
    let acc = values
        .zip(weights)
        .fold(1i64 << (PRECISION_BITS - 1), |acc, (v, &k)| {
            acc + v as i64 * k as i64
        });
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an RGB frame with Pillow's bicubic filter, bit-exact with
/// `PIL.Image.resize((width, height), Image.BICUBIC)`: a horizontal pass (skipped when the
/// width is unchanged) then a vertical pass (skipped when the height is unchanged).
///
/// Errors on an empty source or target size, or a buffer that is not `width · height · 3` bytes.
pub fn resize_bicubic(frame: &Frame, height: usize, width: usize) -> Result<Vec<u8>, Error> {
    let (in_h, in_w) = (frame.height, frame.width);
    if in_h == 0 || in_w == 0 {
        return Err(Error::EmptyFrame {
            height: in_h,
            width: in_w,
        });
    }
    if height == 0 || width == 0 {
        return Err(Error::EmptyFrame { height, width });
    }
    if frame.rgb.len() != in_h * in_w * 3 {
        return Err(Error::FrameBytes {
            index: 0,
            expected: in_h * in_w * 3,
            found: frame.rgb.len(),
        });
    }
    let horizontal: std::borrow::Cow<[u8]> = if width == in_w {
        std::borrow::Cow::Borrowed(frame.rgb)
    } else {
        let coeffs = axis_coeffs(in_w, width);
        let mut out = Vec::with_capacity(in_h * width * 3);
        for y in 0..in_h {
            let row = &frame.rgb[y * in_w * 3..(y + 1) * in_w * 3];
            for (xmin, k) in &coeffs {
                for c in 0..3 {
                    out.push(fixed_dot((0..k.len()).map(|i| row[(xmin + i) * 3 + c]), k));
                }
            }
        }
        std::borrow::Cow::Owned(out)
    };
    if height == in_h {
        return Ok(horizontal.into_owned());
    }
    let coeffs = axis_coeffs(in_h, height);
    let mut out = Vec::with_capacity(height * width * 3);
    for (ymin, k) in &coeffs {
        for x in 0..width * 3 {
            out.push(fixed_dot(
                (0..k.len()).map(|i| horizontal[(ymin + i) * width * 3 + x]),
                k,
            ));
        }
    }
    Ok(out)
}
