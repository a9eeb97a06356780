//! Media files of a manifest: audio files, directories of PNG video frames, and (through
//! [`super::video`], which drives FFmpeg) video files.
//!
//! A 16 kHz mono WAV and PNG frames are read here, in process, so the embedded default needs
//! no FFmpeg; any other audio goes through FFmpeg to 16 kHz mono. Reading validates what the
//! models assume (sample rate, channel count, frame sizes), so a bad file is reported with its
//! path and what was expected instead of reaching a tensor.

use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use omniopsd_checkpoint::atomic::write_atomic;

/// The sample rate every audio encoder of the project consumes (Whisper's feature extractor).
pub const SAMPLE_RATE: u32 = 16_000;

/// Mono audio, samples in `[-1, 1]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Audio {
    /// Samples per second.
    pub sample_rate: u32,
    /// The waveform.
    pub samples: Vec<f32>,
}

impl Audio {
    /// Length in seconds.
    pub fn seconds(&self) -> f64 {
        self.samples.len() as f64 / f64::from(self.sample_rate)
    }
}

/// One RGB video frame, row-major, 3 bytes a pixel.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width · height · 3` bytes.
    pub rgb: Vec<u8>,
}

/// Writes 16-bit PCM mono at [`SAMPLE_RATE`], whole or not at all.
pub fn write_wav(path: &Path, samples: &[i16]) -> Result<()> {
    let bytes = mono_i16_wav(samples.iter().copied(), SAMPLE_RATE, samples.len())
        .with_context(|| format!("encoding WAV file {}", path.display()))?;
    Ok(write_atomic(path, &bytes)?)
}

/// A mono 16-bit PCM WAV file of `samples` at `rate` Hz, in memory (`len`: the sample count,
/// for the buffer): the one WAV encoder of the project.
fn mono_i16_wav(
    samples: impl Iterator<Item = i16>,
    rate: u32,
    len: usize,
) -> hound::Result<Vec<u8>> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut bytes = Cursor::new(Vec::with_capacity(44 + 2 * len));
    let mut writer = hound::WavWriter::new(&mut bytes, spec)?;
    for s in samples {
        writer.write_sample(s)?;
    }
    writer.finalize()?;
    Ok(bytes.into_inner())
}

/// Reads a mono WAV file (16/24/32-bit integer or 32-bit float PCM) and checks that it is
/// sampled at `expected_rate`, holds at least one sample and at most `max_seconds`.
pub fn read_wav(path: &Path, expected_rate: u32, max_seconds: f64) -> Result<Audio> {
    let mut reader = hound::WavReader::open(path)
        .with_context(|| format!("audio {}: not a readable WAV file", path.display()))?;
    let spec = reader.spec();
    if spec.sample_rate != expected_rate {
        bail!(
            "audio {}: sample rate {} Hz, expected {} Hz",
            path.display(),
            spec.sample_rate,
            expected_rate
        );
    }
    if spec.channels != 1 {
        bail!(
            "audio {}: {} channels, expected 1 (mono)",
            path.display(),
            spec.channels
        );
    }
    let frames = reader.duration();
    let seconds = f64::from(frames) / f64::from(spec.sample_rate);
    if seconds > max_seconds {
        bail!(
            "audio {}: {:.2} s long, longer than the limit of {} s",
            path.display(),
            seconds,
            max_seconds
        );
    }
    let samples: Vec<f32> = match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Float, 32) => reader
            .samples::<f32>()
            .collect::<Result<_, _>>()
            .with_context(|| format!("audio {}: corrupt sample data", path.display()))?,
        (hound::SampleFormat::Int, bits @ (8 | 16 | 24 | 32)) => {
            let scale = 1.0 / (1u64 << (bits - 1)) as f32;
            reader
                .samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<Result<_, _>>()
                .with_context(|| format!("audio {}: corrupt sample data", path.display()))?
        }
        (format, bits) => bail!(
            "audio {}: unsupported sample format {format:?} with {bits} bits",
            path.display()
        ),
    };
    if samples.is_empty() {
        bail!("audio {}: no samples", path.display());
    }
    if let Some(at) = samples.iter().position(|s| !s.is_finite()) {
        bail!(
            "audio {}: sample {at} is {} (a float WAV must hold finite samples)",
            path.display(),
            samples[at]
        );
    }
    if samples.len() != frames as usize {
        bail!(
            "audio {}: header announces {} samples but the file holds {}",
            path.display(),
            frames,
            samples.len()
        );
    }
    Ok(Audio {
        sample_rate: spec.sample_rate,
        samples,
    })
}

/// Whether `path` is a WAV file that [`read_wav`] takes as it is: a readable header at
/// [`SAMPLE_RATE`], one channel.
fn is_plain_wav(path: &Path) -> bool {
    let is_wav = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("wav"));
    is_wav
        && hound::WavReader::open(path)
            .is_ok_and(|r| r.spec().sample_rate == SAMPLE_RATE && r.spec().channels == 1)
}

/// Any audio file (WAV at any rate and channel count, MP3, FLAC, M4A/AAC, Ogg, …) or a video
/// file's own sound track, as [`SAMPLE_RATE`] mono of at most `max_seconds`. A 16 kHz mono
/// WAV is read in process; everything else is decoded, down-mixed and resampled by FFmpeg.
pub fn read_audio(path: &Path, max_seconds: f64) -> Result<Audio> {
    if is_plain_wav(path) {
        read_wav(path, SAMPLE_RATE, max_seconds)
    } else {
        super::video::read_audio(path, max_seconds)
    }
}

/// 16-bit PCM mono WAV bytes of `audio` (samples clipped to `[-1, 1]`).
pub fn wav_bytes(audio: &Audio) -> Result<Vec<u8>> {
    let samples = audio
        .samples
        .iter()
        .map(|s| (s.clamp(-1.0, 1.0) * 32767.0).round() as i16);
    mono_i16_wav(samples, audio.sample_rate, audio.samples.len()).context("encoding WAV")
}

/// PNG bytes of an RGB frame.
pub fn png_bytes(frame: &Frame) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, frame.width, frame.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().context("encoding PNG")?;
    writer
        .write_image_data(&frame.rgb)
        .context("encoding PNG")?;
    writer.finish().context("encoding PNG")?;
    Ok(out)
}

/// Writes an 8-bit RGB PNG, whole or not at all.
pub fn write_png(path: &Path, frame: &Frame) -> Result<()> {
    let bytes = png_bytes(frame).with_context(|| format!("PNG file {}", path.display()))?;
    Ok(write_atomic(path, &bytes)?)
}

/// The most pixels a PNG frame may hold (4096 x 4096): its header alone decides the decode
/// buffer, so a tiny file must not be able to claim gigabytes.
pub const MAX_FRAME_PIXELS: u64 = 4096 * 4096;

/// Reads a PNG (8-bit gray, gray+alpha, RGB or RGBA; palettes expanded) as RGB.
pub fn read_png(path: &Path) -> Result<Frame> {
    let file =
        fs::File::open(path).with_context(|| format!("frame {}: cannot open", path.display()))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder
        .read_info()
        .with_context(|| format!("frame {}: not a readable PNG file", path.display()))?;
    let (width, height) = (reader.info().width, reader.info().height);
    if u64::from(width) * u64::from(height) > MAX_FRAME_PIXELS {
        bail!(
            "frame {}: {width}x{height} pixels, more than the {MAX_FRAME_PIXELS} a frame may \
             have (resize the frames first; the vision processor shrinks them anyway)",
            path.display()
        );
    }
    let size = reader
        .output_buffer_size()
        .with_context(|| format!("frame {}: image too large", path.display()))?;
    let mut buf = vec![0u8; size];
    let info = reader
        .next_frame(&mut buf)
        .with_context(|| format!("frame {}: corrupt PNG data", path.display()))?;
    buf.truncate(info.buffer_size());
    let pixels = (info.width as usize) * (info.height as usize);
    let rgb = match info.color_type {
        png::ColorType::Rgb => buf,
        png::ColorType::Rgba => buf
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        png::ColorType::Grayscale => buf.iter().flat_map(|g| [*g, *g, *g]).collect(),
        png::ColorType::GrayscaleAlpha => buf
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        png::ColorType::Indexed => {
            bail!("frame {}: palette image was not expanded", path.display())
        }
    };
    if rgb.len() != pixels * 3 {
        bail!(
            "frame {}: {} bytes of pixel data for a {}x{} image",
            path.display(),
            rgb.len(),
            info.width,
            info.height
        );
    }
    Ok(Frame {
        width: info.width,
        height: info.height,
        rgb,
    })
}

/// The `*.png` files of a frame directory, sorted by name (frame order).
pub fn frame_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = fs::read_dir(dir)
        .with_context(|| format!("video {}: not a readable directory", dir.display()))?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("video {}: listing", dir.display()))?;
        let path = entry.path();
        let is_png = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("png"));
        if is_png {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// Borrowed views of `frames` in the vision processor's input type.
pub fn vision_frames(frames: &[Frame]) -> Vec<omniopsd_vision::Frame<'_>> {
    frames
        .iter()
        .map(|f| omniopsd_vision::Frame {
            width: f.width as usize,
            height: f.height as usize,
            rgb: &f.rgb,
        })
        .collect()
}

/// Reads every frame of a video directory; all frames must share one size, and there must be
/// between 1 and `max_frames` of them.
pub fn read_frames(dir: &Path, max_frames: usize) -> Result<Vec<Frame>> {
    let paths = frame_paths(dir)?;
    if paths.is_empty() {
        bail!("video {}: no PNG frames", dir.display());
    }
    if paths.len() > max_frames {
        bail!(
            "video {}: {} frames, more than the limit of {}",
            dir.display(),
            paths.len(),
            max_frames
        );
    }
    let mut frames = Vec::with_capacity(paths.len());
    for path in &paths {
        let frame = read_png(path)?;
        if let Some(first) = frames.first() {
            let first: &Frame = first;
            if (first.width, first.height) != (frame.width, frame.height) {
                bail!(
                    "frame {}: size {}x{} differs from the first frame's {}x{}",
                    path.display(),
                    frame.width,
                    frame.height,
                    first.width,
                    first.height
                );
            }
        }
        frames.push(frame);
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32 (ISO-HDLC), as PNG chunks carry it.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn a_png_header_claiming_gigapixels_is_refused_before_decoding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.png");
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend(50_000u32.to_be_bytes());
        ihdr.extend(40_000u32.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]);
        let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
        bytes.extend(13u32.to_be_bytes());
        bytes.extend(&ihdr);
        bytes.extend(crc32(&ihdr).to_be_bytes());
        // The header is read up to the first data chunk: a few bytes of one, never decoded.
        let idat = b"IDAT\x78\x9c\x03\x00\x00\x00\x00\x01";
        bytes.extend(((idat.len() - 4) as u32).to_be_bytes());
        bytes.extend(idat);
        bytes.extend(crc32(idat).to_be_bytes());
        fs::write(&path, &bytes).unwrap();
        let err = format!("{:#}", read_png(&path).unwrap_err());
        assert!(
            err.contains("huge.png") && err.contains("50000x40000"),
            "{err}"
        );
    }

    #[test]
    fn a_float_wav_holding_nan_names_the_file_and_the_sample() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nan.wav");
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: SAMPLE_RATE,
            bits_per_sample: 32,
            sample_format: hound::SampleFormat::Float,
        };
        let mut writer = hound::WavWriter::create(&path, spec).unwrap();
        for s in [0.1, -0.2, f32::NAN, 0.3] {
            writer.write_sample(s).unwrap();
        }
        writer.finalize().unwrap();
        let err = format!("{:#}", read_wav(&path, SAMPLE_RATE, 30.0).unwrap_err());
        assert!(
            err.contains("nan.wav") && err.contains("sample 2 is NaN"),
            "{err}"
        );
    }
}
