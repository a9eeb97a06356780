//! Qwen2.5-Omni audio encoder in Burn.
//!
//! Two stages, mirroring transformers' `Qwen2_5OmniProcessor` + `Qwen2_5OmniAudioEncoder`:
//! - [`FeatureExtractor`]: 16 kHz mono samples → 128-bin Whisper log-mel features
//!   ([`LogMel`]), padded to 30 s with a feature attention mask;
//! - [`AudioEncoder`]: the Whisper-style tower (conv stem with GELU, sinusoidal positions,
//!   transformer layers attending within `2·n_window`-frame chunks, stride-2 average pooling,
//!   `ln_post`, projection into the thinker's hidden size). One output row per two frames
//!   after the stem: `((frames − 1) / 2 + 1) / 2` rows per clip.
//!
//! Reference checkpoint: `Qwen/Qwen2.5-Omni-7B` (`thinker.audio_tower.*`).

mod encoder;
mod fft;
mod mel;

pub use encoder::{output_lengths, AudioEncoder, AudioEncoderConfig};
pub use mel::{FeatureExtractor, LogMel, SAMPLING_RATE};

/// Errors from feature extraction and the audio tower.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The clip's sampling rate is not the one the model was trained on; resample first.
    #[error("audio sampling rate: expected {expected} Hz, found {found} Hz (resample to {expected} Hz mono)")]
    SampleRate { expected: u32, found: u32 },
    /// A clip with no samples.
    #[error("audio clip is empty (0 samples)")]
    EmptyAudio,
    /// NaN or infinity in the waveform.
    #[error("audio sample {index} is not finite ({value})")]
    NonFiniteSample { index: usize, value: f32 },
    /// Features whose shape does not fit the tower.
    #[error("audio features: {what}: expected {expected}, found {found}")]
    FeatureShape {
        what: &'static str,
        expected: String,
        found: String,
    },
    /// A configuration the tower cannot run.
    #[error("audio_config.{field}: {reason}")]
    Config { field: &'static str, reason: String },
    /// Reading the checkpoint failed (missing tensor, wrong shape, bad file…).
    #[error(transparent)]
    Checkpoint(#[from] omniopsd_checkpoint::Error),
}
