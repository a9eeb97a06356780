//! Qwen2.5-Omni vision encoder (the Qwen2.5-VL ViT) in Burn.
//!
//! - [`preprocess_image`] / [`preprocess_video`]: RGB frames → normalised `2×14×14` pixel
//!   patches in the processor's order, with their `[t, h, w]` grid;
//! - [`VisionEncoder`]: patch embedding (a stride-equals-kernel Conv3d, i.e. a linear map),
//!   2-D rotary positions, RMSNorm blocks with windowed attention (full attention at
//!   `fullatt_block_indexes`), SwiGLU MLPs, and the 2×2 patch merger into the thinker's hidden
//!   size. One output row per `merge²` patches.
//!
//! Reference checkpoint: `Qwen/Qwen2.5-Omni-7B` (`thinker.visual.*`).

mod encoder;
mod preprocess;

pub use encoder::{VisionEncoder, VisionEncoderConfig};
pub use preprocess::{
    preprocess_image, preprocess_video, resize_bicubic, smart_resize, Frame, PixelPatches,
    ProcessorConfig, CLIP_MEAN, CLIP_STD,
};

/// Errors from frame preprocessing and the vision tower.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A video with no frames.
    #[error("video has no frames")]
    NoFrames,
    /// A frame with zero width or height.
    #[error("frame is empty ({height}x{width} pixels)")]
    EmptyFrame { height: usize, width: usize },
    /// `smart_resize` refuses extreme aspect ratios, as the reference does.
    #[error("frame {height}x{width}: aspect ratio must be at most 200")]
    AspectRatio { height: usize, width: usize },
    /// A frame's byte buffer does not hold `width · height · 3` bytes.
    #[error("frame {index}: expected {expected} RGB bytes, found {found}")]
    FrameBytes {
        index: usize,
        expected: usize,
        found: usize,
    },
    /// A video frame whose size differs from the first frame's.
    #[error("frame {index}: expected {}x{} pixels (HxW, like frame 0), found {}x{}", expected.0, expected.1, found.0, found.1)]
    FrameSize {
        index: usize,
        expected: (usize, usize),
        found: (usize, usize),
    },
    /// Unusable processor settings.
    #[error("vision processor: {0}")]
    Processor(String),
    /// Patches or grids whose shape does not fit the tower.
    #[error("vision input: {what}: expected {expected}, found {found}")]
    InputShape {
        what: &'static str,
        expected: String,
        found: String,
    },
    /// A configuration the tower cannot run.
    #[error("vision_config.{field}: {reason}")]
    Config { field: &'static str, reason: String },
    /// Reading the checkpoint failed (missing tensor, wrong shape, bad file…).
    #[error(transparent)]
    Checkpoint(#[from] omniopsd_checkpoint::Error),
}
