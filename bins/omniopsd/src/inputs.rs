//! The thinker's media inputs from files: audio as log-mel features, a video (a file or a
//! directory of frames) as pixel patches, a corpus record as one video with its audio track
//! interleaved.
//!
//! Invariant: `omniopsd train`, `score`/`generate`, `data check` and `rationale` read and
//! preprocess media only through these functions and [`crate::data::media`] /
//! [`crate::data::video`], so a checkpoint sees the same features at inference as in
//! training. Every error names the file (and, for a record, the sample).
//!
//! A record's video and audio become one video-with-audio input (Qwen2.5-Omni's
//! `use_audio_in_video`): the thinker interleaves frame tokens and audio tokens in 2-second
//! chunks of TMRoPE time. A video file is sampled as `qwen-omni-utils` samples it, and its time
//! base is the sampled frames' rate (`second_per_grid_ts = 2 / sample_fps`); without a separate
//! `audio` its own sound track is the audio. A directory of frames carries no frame rate: its
//! frames are taken as sampled uniformly over the audio clip (the synthetic corpus draws them
//! from the onset to the apex of the utterance), so `fps = frames / audio seconds`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use omniopsd_audio::{FeatureExtractor, LogMel};
use omniopsd_thinker::MediaInput;
use omniopsd_vision::{preprocess_video, PixelPatches, ProcessorConfig};

use crate::data::manifest::{resolve, Limits, Record};
use crate::data::media;
use crate::data::video::{self, VideoOptions};

/// An audio file (or a video file's sound track) of at most `max_seconds` as Qwen2.5-Omni's
/// log-mel features, and its length in seconds.
pub fn audio_features(path: &Path, max_seconds: f64) -> Result<(LogMel, f64)> {
    let audio = media::read_audio(path, max_seconds)?;
    let mel = FeatureExtractor::qwen2_5_omni()
        .extract(&audio.samples, audio.sample_rate)
        .with_context(|| format!("audio {}", path.display()))?;
    Ok((mel, audio.seconds()))
}

/// At most `max_frames` PNG frames of `dir` (file-name order) as `processor`'s pixel patches
/// (frames padded to an even count by repeating the last), and the number of frames read.
pub fn video_patches(
    dir: &Path,
    max_frames: usize,
    processor: &ProcessorConfig,
) -> Result<(PixelPatches, usize)> {
    let frames = media::read_frames(dir, max_frames)?;
    let views = media::vision_frames(&frames);
    let patches =
        preprocess_video(&views, processor).with_context(|| format!("video {}", dir.display()))?;
    Ok((patches, frames.len()))
}

/// Whether a manifest's or a flag's `video` names a video file (any existing regular file, or a
/// path with a video extension) rather than a directory of frames.
pub fn is_video_file(path: &Path) -> bool {
    path.is_file() || (!path.is_dir() && video::is_video_file(path))
}

/// A video's frames as pixel patches.
#[derive(Clone, Debug)]
pub struct VideoPatches {
    /// The patches (frames padded to an even count by repeating the last).
    pub patches: PixelPatches,
    /// Frames read.
    pub frames: usize,
    /// For a video file, the rate of the sampled frames; a directory of frames has none.
    pub sample_fps: Option<f64>,
}

/// A video file sampled and resized as `qwen-omni-utils`' `fetch_video` does (with `opts`),
/// then patched by `processor` (whose pixel bounds are widened to the sampled size, so the
/// frames are not resized twice, as the Qwen2.5-Omni processor leaves them).
pub fn video_file_patches(
    path: &Path,
    opts: &VideoOptions,
    processor: &ProcessorConfig,
) -> Result<VideoPatches> {
    let sampled = video::read_video(path, opts)?;
    let (h, w) = sampled.plan.size;
    let processor = ProcessorConfig {
        min_pixels: processor.min_pixels.min(h * w),
        max_pixels: processor.max_pixels.max(h * w),
        ..processor.clone()
    };
    let views = media::vision_frames(&sampled.frames);
    let patches = preprocess_video(&views, &processor)
        .with_context(|| format!("video {}", path.display()))?;
    Ok(VideoPatches {
        patches,
        frames: sampled.frames.len(),
        sample_fps: Some(sampled.plan.sample_fps),
    })
}

/// A video file or a directory of PNG frames (at most `limits.max_frames` of them) as patches.
pub fn read_video(
    path: &Path,
    limits: &Limits,
    processor: &ProcessorConfig,
) -> Result<VideoPatches> {
    if is_video_file(path) {
        video_file_patches(path, &limits.video, processor)
    } else {
        let (patches, frames) = video_patches(path, limits.max_frames, processor)?;
        Ok(VideoPatches {
            patches,
            frames,
            sample_fps: None,
        })
    }
}

/// Where a record's audio comes from: its `audio` file, or else its video file's own track.
pub fn record_audio_path(record: &Record, base: &Path) -> Result<PathBuf> {
    let video = resolve(base, &record.video);
    match &record.audio {
        Some(audio) => Ok(resolve(base, audio)),
        None if is_video_file(&video) => Ok(video),
        None => bail!(
            "field `audio` is absent and video {} is a directory of frames, which has no sound \
             track (give an `audio` file, or a video file with sound)",
            video.display()
        ),
    }
}

/// The frame-sampling knobs of `qwen-omni-utils`' `fetch_video`, as command-line flags.
#[derive(Clone, Debug, Args)]
pub struct VideoArgs {
    /// Video files: frames sampled per second (qwen-omni-utils' `fps`).
    #[arg(long, default_value_t = VideoOptions::default().fps)]
    pub video_fps: f64,
    /// Video files: fewest frames sampled (`min_frames`).
    #[arg(long, default_value_t = VideoOptions::default().min_frames)]
    pub video_min_frames: usize,
    /// Video files: most frames sampled (`max_frames`).
    #[arg(long, default_value_t = VideoOptions::default().max_frames)]
    pub video_max_frames: usize,
    /// Video files: fewest pixels per resized frame (`min_pixels`).
    #[arg(long, default_value_t = VideoOptions::default().min_pixels)]
    pub video_min_pixels: usize,
    /// Video files: most pixels per resized frame (`max_pixels`; at most 768·28²).
    #[arg(long, default_value_t = VideoOptions::default().max_pixels)]
    pub video_max_pixels: usize,
    /// Video files: pixel budget of all sampled frames together (`total_pixels`).
    #[arg(long, default_value_t = VideoOptions::default().total_pixels)]
    pub video_total_pixels: usize,
}

impl VideoArgs {
    /// The options, range-checked.
    pub fn options(&self) -> Result<VideoOptions> {
        let opts = VideoOptions {
            fps: self.video_fps,
            min_frames: self.video_min_frames,
            max_frames: self.video_max_frames,
            min_pixels: self.video_min_pixels,
            max_pixels: self.video_max_pixels,
            total_pixels: self.video_total_pixels,
        };
        opts.check("--video-")?;
        Ok(opts)
    }
}

/// A record's media prepared for the thinker: the frames' pixel patches, the audio track's
/// log-mel features, and the time base that interleaves them.
#[derive(Clone, Debug)]
pub struct RecordMedia {
    /// The video's patches (frames padded to an even count by repeating the last).
    pub patches: PixelPatches,
    /// Seconds per temporal patch: `temporal_patch_size / fps`.
    pub second_per_grid: f64,
    /// The audio track's log-mel features.
    pub mel: LogMel,
}

/// Qwen2.5-Omni's video processor settings (real checkpoints; the embedded model keeps small
/// frames, see [`crate::train::tiny::video_processor`]).
pub fn video_processor() -> ProcessorConfig {
    ProcessorConfig::qwen2_5_omni_video()
}

/// The file a checkpoint directory keeps its video processor settings in.
pub const VIDEO_PROCESSOR_FILE: &str = "video_preprocessor_config.json";

/// The video processor of the checkpoint in `dir`: its `video_preprocessor_config.json` (as
/// transformers writes it; `omniopsd train` writes one beside every student), else
/// Qwen2.5-Omni's video settings. Keys absent from the file keep Qwen2.5-Omni's values; a
/// present key of the wrong type or value is an error naming the file and the key.
pub fn processor_for(dir: &Path) -> Result<ProcessorConfig> {
    let path = dir.join(VIDEO_PROCESSOR_FILE);
    let mut cfg = video_processor();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(cfg),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let size = |key: &str, into: &mut usize| -> Result<()> {
        if let Some(v) = json.get(key) {
            *into = v
                .as_u64()
                .filter(|&n| n > 0)
                .and_then(|n| usize::try_from(n).ok())
                .with_context(|| {
                    format!(
                        "{}: `{key}` must be a positive integer, found {v}",
                        path.display()
                    )
                })?;
        }
        Ok(())
    };
    size("patch_size", &mut cfg.patch_size)?;
    size("temporal_patch_size", &mut cfg.temporal_patch_size)?;
    size("merge_size", &mut cfg.merge_size)?;
    size("min_pixels", &mut cfg.min_pixels)?;
    size("max_pixels", &mut cfg.max_pixels)?;
    for (key, into) in [
        ("image_mean", &mut cfg.image_mean),
        ("image_std", &mut cfg.image_std),
    ] {
        if let Some(v) = json.get(key) {
            let values: Option<Vec<f32>> = v.as_array().filter(|a| a.len() == 3).map(|a| {
                a.iter()
                    .filter_map(|x| x.as_f64())
                    .map(|x| x as f32)
                    .collect()
            });
            match values {
                Some(vs) if vs.len() == 3 && vs.iter().all(|x| x.is_finite()) => {
                    into.copy_from_slice(&vs)
                }
                _ => bail!(
                    "{}: `{key}` must be a list of 3 numbers, found {v}",
                    path.display()
                ),
            }
        }
    }
    // Frames larger than the readers take are refused anyway; bounding the sizes here keeps
    // a wrong file from driving allocations.
    let most = crate::data::media::MAX_FRAME_PIXELS;
    if cfg.max_pixels as u64 > most {
        bail!(
            "{}: `max_pixels` {} is above the {most} pixels a frame may have",
            path.display(),
            cfg.max_pixels
        );
    }
    if cfg.temporal_patch_size > 16 || cfg.patch_size > 64 || cfg.merge_size > 8 {
        bail!(
            "{}: `patch_size` {}, `temporal_patch_size` {} or `merge_size` {} is beyond any \
             Qwen vision processor (at most 64, 16, 8)",
            path.display(),
            cfg.patch_size,
            cfg.temporal_patch_size,
            cfg.merge_size
        );
    }
    if cfg.min_pixels > cfg.max_pixels {
        bail!(
            "{}: `min_pixels` {} is above `max_pixels` {}",
            path.display(),
            cfg.min_pixels,
            cfg.max_pixels
        );
    }
    Ok(cfg)
}

/// `processor` as `video_preprocessor_config.json` holds it.
pub fn processor_json(processor: &ProcessorConfig) -> serde_json::Value {
    serde_json::json!({
        "patch_size": processor.patch_size,
        "temporal_patch_size": processor.temporal_patch_size,
        "merge_size": processor.merge_size,
        "min_pixels": processor.min_pixels,
        "max_pixels": processor.max_pixels,
        "image_mean": processor.image_mean,
        "image_std": processor.image_std,
    })
}

/// Reads and preprocesses a record's video and audio with `processor`; every error names the
/// record and the file.
pub fn record_media(
    record: &Record,
    base: &Path,
    limits: &Limits,
    processor: &ProcessorConfig,
) -> Result<RecordMedia> {
    let id = &record.id;
    let video = read_video(&resolve(base, &record.video), limits, processor)
        .with_context(|| format!("sample `{id}`"))?;
    let audio = record_audio_path(record, base).with_context(|| format!("sample `{id}`"))?;
    let (mel, seconds) = audio_features(&audio, limits.max_audio_seconds)
        .with_context(|| format!("sample `{id}`"))?;
    let fps = video.sample_fps.unwrap_or(video.frames as f64 / seconds);
    Ok(RecordMedia {
        second_per_grid: processor.temporal_patch_size as f64 / fps,
        patches: video.patches,
        mel,
    })
}

impl RecordMedia {
    /// The thinker input: one video with its audio track interleaved.
    pub fn into_input(self) -> MediaInput {
        MediaInput::Video {
            patches: self.patches,
            second_per_grid: self.second_per_grid,
            audio: Some(self.mel),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::prompt::tests::corpus;
    use std::fs;

    #[test]
    fn a_checkpoints_video_processor_file_is_read_and_checked_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(processor_for(dir.path()).unwrap(), video_processor());
        let file = dir.path().join(VIDEO_PROCESSOR_FILE);
        let tiny = crate::train::tiny::video_processor();
        fs::write(&file, processor_json(&tiny).to_string()).unwrap();
        assert_eq!(processor_for(dir.path()).unwrap(), tiny);
        fs::write(&file, r#"{"min_pixels": 3136}"#).unwrap();
        assert_eq!(processor_for(dir.path()).unwrap().min_pixels, 3136);
        for (json, key) in [
            (r#"{"min_pixels": "many"}"#, "`min_pixels`"),
            (r#"{"image_std": [1, 2]}"#, "`image_std`"),
            (r#"{"max_pixels": 99999999999}"#, "`max_pixels`"),
            (
                r#"{"temporal_patch_size": 1000000}"#,
                "`temporal_patch_size`",
            ),
            (
                r#"{"min_pixels": 900000, "max_pixels": 1000}"#,
                "`min_pixels`",
            ),
        ] {
            fs::write(&file, json).unwrap();
            let err = format!("{:#}", processor_for(dir.path()).unwrap_err());
            assert!(
                err.contains(key) && err.contains(VIDEO_PROCESSOR_FILE),
                "{json}: {err}"
            );
        }
    }

    #[test]
    fn media_of_a_synth_record_is_one_even_frame_grid_and_its_audio() {
        let c = corpus();
        let r = &c.records[0];
        let m = record_media(r, c.dir.path(), &Limits::default(), &video_processor()).unwrap();
        // 4 frames of 56x56, scaled up to the video processor's minimum of 128·28² pixels.
        assert_eq!(m.patches.grid_thw, [2, 24, 24]);
        assert_eq!(m.patches.patch_dim, 3 * 2 * 14 * 14);
        let wav = media::read_wav(
            &record_audio_path(r, c.dir.path()).unwrap(),
            media::SAMPLE_RATE,
            30.0,
        )
        .unwrap();
        assert_eq!(m.mel.valid_frames, wav.samples.len().div_ceil(160));
        assert!((m.second_per_grid - 2.0 * wav.seconds() / 4.0).abs() < 1e-12);
    }

    #[test]
    fn odd_frame_counts_are_padded_by_repeating_the_last_frame() {
        let c = corpus();
        let r = &c.records[1];
        let frames_dir = resolve(c.dir.path(), &r.video);
        fs::remove_file(frames_dir.join("003.png")).unwrap();
        let m = record_media(r, c.dir.path(), &Limits::default(), &video_processor()).unwrap();
        let wav = media::read_wav(
            &record_audio_path(r, c.dir.path()).unwrap(),
            media::SAMPLE_RATE,
            30.0,
        )
        .unwrap();
        assert!(
            (m.second_per_grid - 2.0 * wav.seconds() / 3.0).abs() < 1e-12,
            "three frames read"
        );
        assert_eq!(m.patches.grid_thw[0], 2);
        // Patch rows of the second temporal patch hold frame 2 twice: the two 14x14 time
        // slices of every channel are equal.
        let per_t = m.patches.grid_thw[1] * m.patches.grid_thw[2];
        let row = &m.patches.data[per_t * m.patches.patch_dim..][..m.patches.patch_dim];
        let slice = 14 * 14;
        for ch in 0..3 {
            let base = ch * 2 * slice;
            assert_eq!(row[base..base + slice], row[base + slice..base + 2 * slice]);
        }
    }

    fn media_error(edit: impl Fn(&Path, &Record)) -> String {
        let c = corpus();
        let r = &c.records[2];
        edit(c.dir.path(), r);
        let err =
            record_media(r, c.dir.path(), &Limits::default(), &video_processor()).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(&r.id), "{msg}");
        msg
    }

    #[test]
    fn missing_wav_is_an_error_naming_record_and_file() {
        let msg =
            media_error(|base, r| fs::remove_file(record_audio_path(r, base).unwrap()).unwrap());
        assert!(msg.contains(".wav"), "{msg}");
    }

    #[test]
    fn corrupt_png_is_an_error_naming_record_and_frame() {
        let msg = media_error(|base, r| {
            fs::write(
                resolve(base, &r.video).join("001.png"),
                b"\x89PNG\r\n\x1a\nbroken",
            )
            .unwrap()
        });
        assert!(msg.contains("001.png"), "{msg}");
    }

    #[test]
    fn an_8_khz_wav_is_resampled_to_16_khz() {
        if !crate::data::video::required_in_tests() {
            return;
        }
        let c = corpus();
        let r = &c.records[2];
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 8_000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let path = record_audio_path(r, c.dir.path()).unwrap();
        let mut w = hound::WavWriter::create(&path, spec).unwrap();
        for i in 0..8_000 {
            w.write_sample(((i % 50) * 100) as i16).unwrap();
        }
        w.finalize().unwrap();
        let m = record_media(r, c.dir.path(), &Limits::default(), &video_processor()).unwrap();
        // One second: 16 000 samples, 100 log-mel frames of 160 samples.
        assert_eq!(m.mel.valid_frames, 100);
        assert!(
            (m.second_per_grid - 2.0 / 4.0).abs() < 1e-9,
            "4 frames over 1 s"
        );
    }

    #[test]
    fn a_frame_directory_without_audio_is_an_error_naming_record_and_directory() {
        let c = corpus();
        let r = Record {
            audio: None,
            ..c.records[0].clone()
        };
        let err =
            record_media(&r, c.dir.path(), &Limits::default(), &video_processor()).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&r.id) && msg.contains(&r.video) && msg.contains("no sound track"),
            "{msg}"
        );
    }
}
