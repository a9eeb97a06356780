//! Whisper log-mel features, as `WhisperFeatureExtractor` computes them for Qwen2.5-Omni.
//!
//! Reference: transformers `models/whisper/feature_extraction_whisper.py` (torch path) called
//! by `Qwen2_5OmniProcessor` with `padding="max_length"`, `truncation=True`,
//! `return_attention_mask=True`. Recipe, for 16 kHz mono samples `x`:
//!
//! 1. truncate or zero-pad `x` to `chunk_length · sampling_rate` = 480 000 samples;
//! 2. STFT with `n_fft = 400`, `hop = 160`, a periodic Hann window `w[i] = ½ − ½cos(2πi/400)`,
//!    centred frames (reflect padding of 200 samples each side), dropping the last frame:
//!    3 000 frames;
//! 3. power spectrum `P[k, t] = |X[k, t]|²` for `k ≤ 200`, mel energies `M = Fᵀ P` with a
//!    128-filter Slaney-scale, Slaney-normalised triangular bank on 0–8 kHz;
//! 4. `L = log10(max(M, 1e-10))`, `L = max(L, max(L) − 8)` over the whole padded matrix,
//!    then `(L + 4) / 4`.
//!
//! The feature attention mask marks frame `t` valid when sample `160·t` lies inside the
//! (truncated) input, so `ceil(len / 160)` frames are valid.

use crate::fft::{Complex, Fft};
use crate::Error;

/// The sampling rate every Qwen2.5-Omni audio input must have.
pub const SAMPLING_RATE: u32 = 16_000;

/// A Whisper-style log-mel feature extractor (Qwen2.5-Omni uses 128 mel bins).
#[derive(Clone, Debug)]
pub struct FeatureExtractor {
    feature_size: usize,
    sampling_rate: u32,
    hop_length: usize,
    n_fft: usize,
    n_samples: usize,
    /// `[n_freq, feature_size]`, row-major: `filters[k * feature_size + m]`.
    filters: Vec<f64>,
    window: Vec<f64>,
    fft: Fft,
}

/// Log-mel features of one clip, padded to the extractor's fixed length.
#[derive(Clone, Debug, PartialEq)]
pub struct LogMel {
    /// Mel bins (rows).
    pub n_mels: usize,
    /// Frames (columns), always `nb_max_frames` (3 000 for 30 s chunks).
    pub n_frames: usize,
    /// Frames covered by the input; the rest is padding (`feature_attention_mask` zeros).
    pub valid_frames: usize,
    /// `[n_mels, n_frames]`, row-major.
    pub data: Vec<f32>,
}

impl LogMel {
    /// The value at mel bin `mel`, frame `frame`.
    pub fn get(&self, mel: usize, frame: usize) -> f32 {
        self.data[mel * self.n_frames + frame]
    }

    /// The processor's `feature_attention_mask`: `true` for the first `valid_frames` frames.
    pub fn attention_mask(&self) -> Vec<bool> {
        (0..self.n_frames).map(|t| t < self.valid_frames).collect()
    }

    /// The features the audio tower consumes: the valid frames only, `[n_mels, valid_frames]`
    /// row-major (what `get_audio_features` selects with the attention mask).
    pub fn valid_features(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.n_mels * self.valid_frames);
        for m in 0..self.n_mels {
            let row = &self.data[m * self.n_frames..m * self.n_frames + self.valid_frames];
            out.extend_from_slice(row);
        }
        out
    }
}

impl FeatureExtractor {
    /// Whisper's extractor with `feature_size` mel bins and its other defaults: 16 kHz,
    /// hop 160, `n_fft` 400, 30 s chunks.
    pub fn new(feature_size: usize) -> Self {
        let sampling_rate = SAMPLING_RATE;
        let n_fft = 400;
        let n_freq = 1 + n_fft / 2;
        let window = (0..n_fft)
            .map(|i| 0.5 - 0.5 * (2.0 * core::f64::consts::PI * i as f64 / n_fft as f64).cos())
            .collect();
        Self {
            feature_size,
            sampling_rate,
            hop_length: 160,
            n_fft,
            n_samples: 30 * sampling_rate as usize,
            filters: mel_filter_bank(n_freq, feature_size, 0.0, 8000.0, sampling_rate),
            window,
            fft: Fft::new(n_fft),
        }
    }

    /// The Qwen2.5-Omni configuration: 128 mel bins.
    pub fn qwen2_5_omni() -> Self {
        Self::new(128)
    }

    /// Samples per padded clip (480 000).
    pub fn n_samples(&self) -> usize {
        self.n_samples
    }

    /// Frames per padded clip (3 000).
    pub fn nb_max_frames(&self) -> usize {
        self.n_samples / self.hop_length
    }

    /// Valid frames for `len` input samples: `min(ceil(len / hop), nb_max_frames)`.
    pub fn valid_frames(&self, len: usize) -> usize {
        len.div_ceil(self.hop_length).min(self.nb_max_frames())
    }

    /// Log-mel features of mono `samples` recorded at `sampling_rate` Hz.
    ///
    /// Errors: a sampling rate other than 16 kHz, an empty clip, or a non-finite sample.
    pub fn extract(&self, samples: &[f32], sampling_rate: u32) -> Result<LogMel, Error> {
        if sampling_rate != self.sampling_rate {
            return Err(Error::SampleRate {
                expected: self.sampling_rate,
                found: sampling_rate,
            });
        }
        if samples.is_empty() {
            return Err(Error::EmptyAudio);
        }
        if let Some(index) = samples.iter().position(|s| !s.is_finite()) {
            return Err(Error::NonFiniteSample {
                index,
                value: samples[index],
            });
        }
        let len = samples.len().min(self.n_samples);
        let signal = &samples[..len];
        let n_frames = self.nb_max_frames();
        let n_freq = 1 + self.n_fft / 2;
        let half = (self.n_fft / 2) as isize;
        let total = self.n_samples as isize;

        // Sample `s` of the zero-padded clip, with torch.stft's reflect padding at both ends.
        let padded = |s: isize| -> f64 {
            let idx = if s < 0 {
                -s
            } else if s >= total {
                2 * (total - 1) - s
            } else {
                s
            };
            signal.get(idx as usize).copied().unwrap_or(0.0) as f64
        };

        let mut log_spec = vec![0.0f64; self.feature_size * n_frames];
        let mut frame = vec![Complex::default(); self.n_fft];
        let mut power = vec![0.0f64; n_freq];
        for t in 0..n_frames {
            let start = (t * self.hop_length) as isize - half;
            let mut silent = true;
            for (i, slot) in frame.iter_mut().enumerate() {
                let v = padded(start + i as isize) * self.window[i];
                silent &= v == 0.0;
                *slot = Complex { re: v, im: 0.0 };
            }
            if silent {
                // Most of a short clip's 30 s window is padding: log10(1e-10) without the FFT.
                for m in 0..self.feature_size {
                    log_spec[m * n_frames + t] = -10.0;
                }
                continue;
            }
            let spectrum = self.fft.forward(&frame);
            for (p, x) in power.iter_mut().zip(&spectrum) {
                *p = x.re * x.re + x.im * x.im;
            }
            for m in 0..self.feature_size {
                let energy: f64 = power
                    .iter()
                    .enumerate()
                    .map(|(k, p)| p * self.filters[k * self.feature_size + m])
                    .sum();
                log_spec[m * n_frames + t] = energy.max(1e-10).log10();
            }
        }
        let max = log_spec.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let data = log_spec
            .iter()
            .map(|&l| ((l.max(max - 8.0) + 4.0) / 4.0) as f32)
            .collect();
        Ok(LogMel {
            n_mels: self.feature_size,
            n_frames,
            valid_frames: self.valid_frames(len),
            data,
        })
    }
}

/// Hz → mel on the Slaney scale: linear `3f/200` below 1 kHz, logarithmic above,
/// `15 + ln(f/1000) · 27/ln(6.4)` (Slaney's Auditory Toolbox; librosa `htk=False`).
fn hertz_to_mel(freq: f64) -> f64 {
    if freq >= 1000.0 {
        15.0 + (freq / 1000.0).ln() * (27.0 / 6.4f64.ln())
    } else {
        3.0 * freq / 200.0
    }
}

/// Inverse of [`hertz_to_mel`].
fn mel_to_hertz(mel: f64) -> f64 {
    if mel >= 15.0 {
        1000.0 * ((6.4f64.ln() / 27.0) * (mel - 15.0)).exp()
    } else {
        200.0 * mel / 3.0
    }
}

/// Triangular mel filters `[n_freq, n_mels]` (row-major), centres equally spaced in mel between
/// `f_min` and `f_max`, each scaled by `2 / (f_{m+2} − f_m)` so it has roughly constant energy
/// (Slaney normalisation), as transformers' `audio_utils.mel_filter_bank`.
fn mel_filter_bank(n_freq: usize, n_mels: usize, f_min: f64, f_max: f64, sr: u32) -> Vec<f64> {
    let mel_min = hertz_to_mel(f_min);
    let mel_max = hertz_to_mel(f_max);
    let edges: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hertz(mel_min + (mel_max - mel_min) * i as f64 / (n_mels + 1) as f64))
        .collect();
    let nyquist = (sr / 2) as f64;
    let mut filters = vec![0.0; n_freq * n_mels];
    for k in 0..n_freq {
        let f = nyquist * k as f64 / (n_freq - 1) as f64;
        for m in 0..n_mels {
            let down = (f - edges[m]) / (edges[m + 1] - edges[m]);
            let up = (edges[m + 2] - f) / (edges[m + 2] - edges[m + 1]);
            let enorm = 2.0 / (edges[m + 2] - edges[m]);
            filters[k * n_mels + m] = down.min(up).max(0.0) * enorm;
        }
    }
    filters
}
