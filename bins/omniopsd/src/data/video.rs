//! Video files and compressed audio through FFmpeg's `ffprobe` and `ffmpeg` programs, run as
//! subprocesses (no libav linking), sampled the way Qwen2.5-Omni's own preprocessing samples
//! them (`qwen-omni-utils`' `fetch_video`).
//!
//! For a video of `total` frames at `video_fps` frames a second:
//! 1. frame count (`smart_nframes`): `n = total / video_fps · fps`, clamped to
//!    `[ceil₂(min_frames), floor₂(min(max_frames, total))]` and to `total`, then floored to the
//!    frame factor 2 (the temporal patch); fewer than 2 frames is an error;
//! 2. frame indices: `torch.linspace(0, total − 1, n).round()` (float32, half to even);
//! 3. frame size (`smart_resize` with the video budget): `max_pixels' = min(max_pixels,
//!    max(min(VIDEO_MAX_PIXELS, total_pixels / n · 2), ⌊1.05 · min_pixels⌋))`, then the
//!    nearest multiples of 28 (at least 28), scaled down (floor) above `max_pixels'` or up
//!    (ceil) below `min_pixels`;
//! 4. time base: the sampled frames' rate `sample_fps = n / total · video_fps`, so one temporal
//!    patch spans `second_per_grid = 2 / sample_fps` seconds of TMRoPE time.
//!
//! Only the sampled frames leave FFmpeg (its `select` filter on the decoded frame number), as
//! raw RGB on a pipe, and each is resized as it arrives: memory holds `n` frames at the target
//! size, never the video at its own resolution. The resize is Pillow's bicubic
//! (`omniopsd_vision::resize_bicubic`); `qwen-omni-utils` resizes with torchvision's
//! antialiased bicubic, which differs by a few levels of 255 (tests/reference/gen_video.py
//! measures it).
//!
//! Audio (a file of any rate and channel count, or a video's own track) is decoded to 16 kHz
//! mono f32 (channels averaged, resampled with SoX's resampler when this FFmpeg has it, as
//! librosa's default `soxr_hq` does).

use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::media::{Audio, Frame, MAX_FRAME_PIXELS, SAMPLE_RATE};

/// `qwen-omni-utils`' `IMAGE_FACTOR`: frame sides are multiples of `patch · merge` = 28.
pub const IMAGE_FACTOR: usize = 28;
/// `FRAME_FACTOR`: frame counts are multiples of the temporal patch.
pub const FRAME_FACTOR: usize = 2;
/// `VIDEO_MAX_PIXELS`: the per-frame ceiling the total budget is clamped to.
pub const VIDEO_MAX_PIXELS: usize = 768 * 28 * 28;
/// `MAX_RATIO`: the longest side may be at most 200 times the shortest.
pub const MAX_RATIO: f64 = 200.0;

/// Environment variables naming the programs (default: `ffmpeg` / `ffprobe` on `PATH`).
pub const FFMPEG_ENV: &str = "OMNIOPSD_FFMPEG";
/// See [`FFMPEG_ENV`].
pub const FFPROBE_ENV: &str = "OMNIOPSD_FFPROBE";

/// Video file extensions read through FFmpeg.
pub const VIDEO_EXTENSIONS: [&str; 5] = ["mp4", "avi", "mkv", "webm", "mov"];

/// How frames are sampled and sized: `qwen-omni-utils`' `fetch_video` keys, with its defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VideoOptions {
    /// Frames sampled per second of video (`fps`, `FPS` = 2).
    pub fps: f64,
    /// Fewest frames sampled (`min_frames`, `FPS_MIN_FRAMES` = 4).
    pub min_frames: usize,
    /// Most frames sampled (`max_frames`, `FPS_MAX_FRAMES` = 768).
    pub max_frames: usize,
    /// Fewest pixels per resized frame (`min_pixels`, `VIDEO_MIN_PIXELS` = 128·28²).
    pub min_pixels: usize,
    /// Most pixels per resized frame (`max_pixels`; only lowers the budget below
    /// `VIDEO_MAX_PIXELS` = 768·28², as in `fetch_video`).
    pub max_pixels: usize,
    /// Pixel budget of all frames together (`total_pixels`, `VIDEO_TOTAL_PIXELS` =
    /// 128000·28²·0.9).
    pub total_pixels: usize,
}

impl Default for VideoOptions {
    fn default() -> Self {
        Self {
            fps: 2.0,
            min_frames: 4,
            max_frames: 768,
            min_pixels: 128 * 28 * 28,
            max_pixels: VIDEO_MAX_PIXELS,
            total_pixels: 90_316_800,
        }
    }
}

impl VideoOptions {
    /// Range checks; the error names the knob as `prefix` + its key.
    pub fn check(&self, prefix: &str) -> Result<()> {
        if !(self.fps.is_finite() && self.fps > 0.0) {
            bail!("{prefix}fps is {}, expected a positive number", self.fps);
        }
        if self.max_frames < FRAME_FACTOR {
            bail!(
                "{prefix}max_frames is {}, expected at least {FRAME_FACTOR}",
                self.max_frames
            );
        }
        if self.min_frames > self.max_frames {
            bail!(
                "{prefix}min_frames ({}) is above {prefix}max_frames ({})",
                self.min_frames,
                self.max_frames
            );
        }
        if self.min_pixels == 0 || self.max_pixels == 0 || self.total_pixels == 0 {
            bail!("{prefix}min_pixels, max_pixels and total_pixels must be positive");
        }
        Ok(())
    }
}

fn floor_by(x: f64, factor: usize) -> usize {
    ((x / factor as f64).floor() * factor as f64) as usize
}

fn ceil_by(x: f64, factor: usize) -> usize {
    ((x / factor as f64).ceil() * factor as f64) as usize
}

/// How many of `total` frames at `video_fps` are sampled (`smart_nframes`, module doc step 1).
pub fn sample_count(total: usize, video_fps: f64, opts: &VideoOptions) -> Result<usize> {
    if total == 0 {
        bail!("no video frames");
    }
    if !(video_fps.is_finite() && video_fps > 0.0) {
        bail!("frame rate {video_fps} is not a positive number");
    }
    let min_frames = ceil_by(opts.min_frames as f64, FRAME_FACTOR) as f64;
    let max_frames = floor_by(opts.max_frames.min(total) as f64, FRAME_FACTOR) as f64;
    let wanted = total as f64 / video_fps * opts.fps;
    let n = floor_by(
        wanted.max(min_frames).min(max_frames).min(total as f64),
        FRAME_FACTOR,
    );
    if n < FRAME_FACTOR || n > total {
        bail!(
            "{total} frame(s): a video needs at least {FRAME_FACTOR} frames to sample \
             {FRAME_FACTOR} or more"
        );
    }
    Ok(n)
}

/// The sampled frame numbers: `torch.linspace(0, total − 1, n).round()`, computed as torch's
/// CPU kernel computes it in float32: `step = (total − 1) / (n − 1)` rounded to f32, then
/// `step · i` for the first half and `end − step · (n − 1 − i)` for the rest, each with one
/// rounding (a fused multiply-add, as the compiled kernel does), rounded half to even.
/// Checked against torch 2.15 for every `n` up to 768 and `total` up to 10⁶ (0 differences);
/// plain f32 arithmetic differs by one frame in about 0.5 % of the long clips.
pub fn sample_indices(total: usize, n: usize) -> Vec<usize> {
    if n == 1 {
        return vec![0];
    }
    let end = (total - 1) as f32;
    let step = end / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            let x = if i < half {
                step * i as f32
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            };
            x.round_ties_even().clamp(0.0, end) as usize
        })
        .collect()
}

/// `qwen-omni-utils`' `smart_resize`: `(height, width)` as multiples of `factor` (at least
/// `factor`), area within `[min_pixels, max_pixels]` as far as rounding allows.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: f64,
    max_pixels: f64,
) -> Result<(usize, usize)> {
    if height == 0 || width == 0 {
        bail!("empty frame size {width}x{height}");
    }
    let (h, w) = (height as f64, width as f64);
    if h.max(w) / h.min(w) > MAX_RATIO {
        bail!("frame size {width}x{height}: aspect ratio above {MAX_RATIO}");
    }
    let f = factor as f64;
    let round_by = |x: f64| (x / f).round_ties_even() * f;
    let mut h_bar = f.max(round_by(h));
    let mut w_bar = f.max(round_by(w));
    if h_bar * w_bar > max_pixels {
        let beta = (h * w / max_pixels).sqrt();
        h_bar = (h / beta / f).floor() * f;
        w_bar = (w / beta / f).floor() * f;
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    if h_bar < f || w_bar < f {
        bail!(
            "frame size {width}x{height} resizes to nothing under a budget of {max_pixels} pixels"
        );
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// The size `n` sampled frames of `height × width` are resized to (module doc step 3).
pub fn frame_size(
    height: usize,
    width: usize,
    n: usize,
    opts: &VideoOptions,
) -> Result<(usize, usize)> {
    let min_pixels = opts.min_pixels as f64;
    let budget = (VIDEO_MAX_PIXELS as f64)
        .min(opts.total_pixels as f64 / n as f64 * FRAME_FACTOR as f64)
        .max((min_pixels * 1.05).floor());
    let max_pixels = (opts.max_pixels as f64).min(budget);
    smart_resize(height, width, IMAGE_FACTOR, min_pixels, max_pixels)
}

/// What `ffprobe` says about a media file.
#[derive(Clone, Debug, PartialEq)]
pub struct Probe {
    /// The first video stream, if any.
    pub video: Option<VideoStream>,
    /// The first audio stream, if any.
    pub audio: Option<AudioStream>,
    /// The container's duration in seconds, when known.
    pub duration: Option<f64>,
}

/// The first video stream of a file.
#[derive(Clone, Debug, PartialEq)]
pub struct VideoStream {
    /// Codec name (`h264`, `mjpeg`, …).
    pub codec: String,
    /// Width in pixels (before any rotation metadata, which is ignored as decord and
    /// torchvision ignore it).
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Average frame rate as torchcodec measures it from a scan of the packets (without
    /// decoding): `frames / (max(pts + duration) − min(pts))`; the header's
    /// `avg_frame_rate` when the packets carry no timestamps.
    pub fps: f64,
    /// Frames in the stream: its packets, counted.
    pub frames: usize,
}

/// The first audio stream of a file.
#[derive(Clone, Debug, PartialEq)]
pub struct AudioStream {
    /// Codec name.
    pub codec: String,
    /// Samples per second.
    pub sample_rate: u32,
    /// Channels.
    pub channels: u32,
    /// Duration in seconds, when known.
    pub duration: Option<f64>,
}

/// The sampling of one video: which frames, at what size, on what time base.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Decoded frame numbers to keep, ascending.
    pub indices: Vec<usize>,
    /// `(height, width)` every kept frame is resized to.
    pub size: (usize, usize),
    /// Frames a second of the kept frames (`sample_fps`).
    pub sample_fps: f64,
}

impl Plan {
    /// Plans the sampling of `stream` with `opts` (module doc steps 1–4).
    pub fn new(stream: &VideoStream, opts: &VideoOptions) -> Result<Self> {
        let n = sample_count(stream.frames, stream.fps, opts)?;
        let size = frame_size(stream.height, stream.width, n, opts)?;
        Ok(Self {
            indices: sample_indices(stream.frames, n),
            size,
            sample_fps: n as f64 / stream.frames as f64 * stream.fps,
        })
    }
}

/// A program of FFmpeg's: its name on `PATH` unless `env` names another.
fn program(name: &str, env: &str) -> PathBuf {
    std::env::var_os(env)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Runs `cmd`, mapping a missing program to how to install it.
fn spawn(mut cmd: Command, name: &str, env: &str, file: &Path) -> Result<std::process::Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().map_err(|err| {
        let program = cmd.get_program().to_string_lossy().into_owned();
        if err.kind() == ErrorKind::NotFound {
            anyhow!(
                "{} needs FFmpeg, but the program `{program}` was not found. Install FFmpeg \
                 (Debian/Ubuntu: `sudo apt-get install ffmpeg`; macOS: `brew install ffmpeg`; \
                 conda: `conda install -c conda-forge ffmpeg`), or set {env} to the `{name}` \
                 program. 16 kHz mono WAV files and directories of PNG frames need no FFmpeg.",
                file.display()
            )
        } else {
            anyhow!("{}: cannot run `{program}`: {err}", file.display())
        }
    })
}

/// Whether `ffmpeg` and `ffprobe` can be run (tests use this to say why they need them).
pub fn available() -> bool {
    [("ffmpeg", FFMPEG_ENV), ("ffprobe", FFPROBE_ENV)]
        .iter()
        .all(|(name, env)| {
            Command::new(program(name, env))
                .arg("-version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

/// The last lines of a program's error output, for an error message.
fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(3);
    lines[start..].join(" | ")
}

fn number(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// `"30000/1001"` → 29.97; `0/0` and garbage → `None`.
fn rate(v: &serde_json::Value) -> Option<f64> {
    let s = v.as_str()?;
    let (num, den) = s.split_once('/')?;
    let (num, den): (f64, f64) = (num.trim().parse().ok()?, den.trim().parse().ok()?);
    let r = num / den;
    (r.is_finite() && r > 0.0).then_some(r)
}

/// Probes `path` with `ffprobe` (streams, codecs, frame counts by counting packets); `what`
/// (`video`, `audio`) starts every error, before the path.
pub fn probe(path: &Path, what: &str) -> Result<Probe> {
    match std::fs::metadata(path) {
        Err(_) => bail!("{what} {}: no such file", path.display()),
        Ok(m) if !m.is_file() => bail!("{what} {}: not a file", path.display()),
        Ok(m) if m.len() == 0 => bail!("{what} {}: empty file (0 bytes)", path.display()),
        Ok(_) => {}
    }
    let out = run_ffprobe(
        path,
        what,
        &[
            "-show_entries",
            "stream=codec_type,codec_name,width,height,avg_frame_rate,r_frame_rate,time_base,\
             sample_rate,channels,duration:format=duration",
            "-of",
            "json",
        ],
    )?;
    let json: serde_json::Value = serde_json::from_slice(&out)
        .with_context(|| format!("{what} {}: unreadable ffprobe output", path.display()))?;
    let mut probe = Probe {
        video: None,
        audio: None,
        duration: json.pointer("/format/duration").and_then(number),
    };
    let streams = json
        .get("streams")
        .and_then(|s| s.as_array())
        .cloned()
        .unwrap_or_default();
    for s in &streams {
        let text = |k: &str| s.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
        let num = |k: &str| s.get(k).and_then(number);
        match text("codec_type").as_str() {
            "video" if probe.video.is_none() => {
                let header_fps = s
                    .get("avg_frame_rate")
                    .and_then(rate)
                    .or_else(|| s.get("r_frame_rate").and_then(rate));
                let time_base = s.get("time_base").and_then(rate);
                let scan = scan_packets(path, what)?;
                let fps = match (scan.span, time_base) {
                    (Some((begin, end)), Some(tb)) if end > begin => {
                        // In i128: the file's timestamps may be any i64.
                        scan.packets as f64 / ((i128::from(end) - i128::from(begin)) as f64 * tb)
                    }
                    _ => header_fps.unwrap_or(0.0),
                };
                probe.video = Some(VideoStream {
                    codec: text("codec_name"),
                    width: num("width").unwrap_or(0.0) as usize,
                    height: num("height").unwrap_or(0.0) as usize,
                    fps,
                    frames: scan.packets,
                });
            }
            "audio" if probe.audio.is_none() => {
                probe.audio = Some(AudioStream {
                    codec: text("codec_name"),
                    sample_rate: num("sample_rate").unwrap_or(0.0) as u32,
                    channels: num("channels").unwrap_or(0.0) as u32,
                    duration: num("duration"),
                });
            }
            _ => {}
        }
    }
    Ok(probe)
}

/// Runs `ffprobe -v error ARGS PATH` and returns its output.
fn run_ffprobe(path: &Path, what: &str, args: &[&str]) -> Result<Vec<u8>> {
    let mut cmd = Command::new(program("ffprobe", FFPROBE_ENV));
    cmd.args(["-v", "error"]).args(args).arg(path);
    let child = spawn(cmd, "ffprobe", FFPROBE_ENV, path)?;
    let out = child
        .wait_with_output()
        .with_context(|| format!("{what} {}: running ffprobe", path.display()))?;
    if !out.status.success() {
        bail!(
            "{what} {}: not a readable media file (ffprobe: {})",
            path.display(),
            tail(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// The first video stream's packets: how many, and `(min pts, max(pts + duration))` in the
/// stream's time base when every packet has both.
struct PacketScan {
    packets: usize,
    span: Option<(i64, i64)>,
}

fn scan_packets(path: &Path, what: &str) -> Result<PacketScan> {
    let out = run_ffprobe(
        path,
        what,
        &[
            "-select_streams",
            "v:0",
            "-show_entries",
            "packet=pts,duration",
            "-of",
            "csv=p=0",
        ],
    )?;
    Ok(packet_span(&String::from_utf8_lossy(&out)))
}

/// [`PacketScan`] of `ffprobe`'s `pts,duration` lines. The span is kept only when every packet
/// has both and `pts + duration` fits in i64 (the numbers are the file's, so any i64 occurs).
fn packet_span(text: &str) -> PacketScan {
    let mut packets = 0;
    let mut span: Option<(i64, i64)> = None;
    let mut timed = true;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        packets += 1;
        let mut fields = line.split(',').map(|f| f.trim().parse::<i64>().ok());
        let (pts, duration) = (fields.next().flatten(), fields.next().flatten());
        match pts
            .zip(duration)
            .and_then(|(p, d)| Some((p, p.checked_add(d)?)))
        {
            Some((pts, end)) => {
                let (begin, last) = span.unwrap_or((pts, end));
                span = Some((begin.min(pts), last.max(end)));
            }
            None => timed = false,
        }
    }
    PacketScan {
        packets,
        span: span.filter(|_| timed),
    }
}

/// A video file's sampled frames, each resized to the plan's size, and the plan.
#[derive(Clone, Debug)]
pub struct Sampled {
    /// The kept frames, at `plan.size`, in time order.
    pub frames: Vec<Frame>,
    /// How they were chosen.
    pub plan: Plan,
}

/// Probes `path`, refuses what cannot be sampled (no video stream, frames above
/// [`MAX_FRAME_PIXELS`], fewer than two frames), and plans its sampling.
pub fn plan_video(path: &Path, opts: &VideoOptions) -> Result<(Probe, Plan)> {
    let probe = probe(path, "video")?;
    let stream = probe
        .video
        .as_ref()
        .ok_or_else(|| anyhow!("video {}: the file has no video stream", path.display()))?;
    let pixels = stream.width as u64 * stream.height as u64;
    if pixels == 0 {
        bail!(
            "video {}: the video stream ({}) has no frame size",
            path.display(),
            stream.codec
        );
    }
    if pixels > MAX_FRAME_PIXELS {
        bail!(
            "video {}: {}x{} pixels a frame, more than the {MAX_FRAME_PIXELS} a frame may have \
             (scale the video down first)",
            path.display(),
            stream.width,
            stream.height
        );
    }
    let plan = Plan::new(stream, opts).with_context(|| {
        format!(
            "video {} ({}, {}x{}, {} frames at {:.3} fps)",
            path.display(),
            stream.codec,
            stream.width,
            stream.height,
            stream.frames,
            stream.fps
        )
    })?;
    Ok((probe, plan))
}

/// Decodes the planned frames of `path` (only those, through FFmpeg's `select` filter) and
/// resizes each to the plan's size as it arrives on the pipe.
pub fn read_video(path: &Path, opts: &VideoOptions) -> Result<Sampled> {
    let (probe, plan) = plan_video(path, opts)?;
    let Some(stream) = probe.video else {
        bail!("video {}: the file has no video stream", path.display());
    };
    let frames = decode_frames(path, &stream, &plan, true)?;
    Ok(Sampled { frames, plan })
}

/// Checks that the planned frames of `path` decode, as [`read_video`] would decode them,
/// without keeping them (what `data check` needs: its memory stays at one frame).
pub fn check_video(path: &Path, opts: &VideoOptions) -> Result<Plan> {
    let (probe, plan) = plan_video(path, opts)?;
    let Some(stream) = probe.video else {
        bail!("video {}: the file has no video stream", path.display());
    };
    decode_frames(path, &stream, &plan, false)?;
    Ok(plan)
}

/// Decodes the planned frames; with `keep`, resizes each to the plan's size and returns them,
/// without, only counts them.
fn decode_frames(path: &Path, stream: &VideoStream, plan: &Plan, keep: bool) -> Result<Vec<Frame>> {
    let mut unique = plan.indices.clone();
    unique.dedup();
    let select: Vec<String> = unique.iter().map(|i| format!("eq(n\\,{i})")).collect();
    let mut cmd = Command::new(program("ffmpeg", FFMPEG_ENV));
    cmd.args(["-v", "error", "-nostdin", "-noautorotate", "-i"])
        .arg(path)
        .args(["-map", "0:v:0", "-an", "-sn", "-vf"])
        .arg(format!("select='{}'", select.join("+")))
        // Every selected frame exactly once, whatever its timestamp.
        .args(["-vsync", "0", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]);
    let mut child = spawn(cmd, "ffmpeg", FFMPEG_ENV, path)?;
    let mut stdout = child.stdout.take().context("ffmpeg's output pipe")?;
    let mut stderr = child.stderr.take().context("ffmpeg's error pipe")?;
    // Drain stderr beside the frames, so a chatty decoder cannot block on a full pipe.
    let errors = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let (w, h) = (stream.width, stream.height);
    let (th, tw) = plan.size;
    let mut raw = vec![0u8; w * h * 3];
    let mut decoded = Vec::with_capacity(if keep { unique.len() } else { 0 });
    let mut count = 0;
    let mut read_error = None;
    while count < unique.len() {
        match read_full(&mut stdout, &mut raw) {
            Ok(true) => count += 1,
            Ok(false) => break,
            Err(err) => {
                read_error = Some(err);
                break;
            }
        }
        if !keep {
            continue;
        }
        let frame = omniopsd_vision::Frame {
            width: w,
            height: h,
            rgb: &raw,
        };
        let rgb = if (th, tw) == (h, w) {
            raw.clone()
        } else {
            omniopsd_vision::resize_bicubic(&frame, th, tw)
                .with_context(|| format!("video {}: resizing a frame", path.display()))?
        };
        decoded.push(Frame {
            width: tw as u32,
            height: th as u32,
            rgb,
        });
    }
    // Whatever is left (a frame size change mid-stream) is not ours to read.
    drop(stdout);
    let status = child
        .wait()
        .with_context(|| format!("video {}: waiting for ffmpeg", path.display()))?;
    let errors = errors.join().unwrap_or_default();
    if let Some(err) = read_error {
        return Err(err)
            .with_context(|| format!("video {}: reading ffmpeg's frames", path.display()));
    }
    if count < unique.len() {
        bail!(
            "video {}: truncated or corrupt: {} of the {} sampled frames decoded (the stream \
             announces {} frames){}",
            path.display(),
            count,
            unique.len(),
            stream.frames,
            if errors.is_empty() {
                String::new()
            } else {
                format!("; ffmpeg: {}", tail(&errors))
            }
        );
    }
    if !status.success() && status.code().is_some() {
        bail!(
            "video {}: ffmpeg failed after decoding the sampled frames: {}",
            path.display(),
            tail(&errors)
        );
    }
    if !keep {
        return Ok(Vec::new());
    }
    // Indices are distinct (n ≤ total spaces them at least one frame apart); the mapping only
    // keeps a repeated one, should there be any, aligned with its decoded frame.
    let mut frames = Vec::with_capacity(plan.indices.len());
    let mut at = 0;
    for &i in &plan.indices {
        while unique[at] != i {
            at += 1;
        }
        frames.push(decoded[at].clone());
    }
    Ok(frames)
}

/// Fills `buf` from `r`; `Ok(false)` when the stream ended before a byte of it.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(k) => filled += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    if filled == 0 {
        Ok(false)
    } else if filled < buf.len() {
        bail!("a frame ended after {filled} of its {} bytes", buf.len())
    } else {
        Ok(true)
    }
}

/// Whether this FFmpeg was built with SoX's resampler (librosa's default is `soxr_hq`).
fn has_soxr() -> bool {
    static SOXR: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SOXR.get_or_init(|| {
        Command::new(program("ffmpeg", FFMPEG_ENV))
            .args(["-hide_banner", "-version"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--enable-libsoxr"))
    })
}

/// The first audio stream of `path` (an audio file, or a video's own track) as 16 kHz mono
/// f32: channels averaged, resampled. At most `max_seconds` are accepted: a longer stream is
/// refused, and decoding stops reading past the limit.
pub fn read_audio(path: &Path, max_seconds: f64) -> Result<Audio> {
    let probe = probe(path, "audio")?;
    let Some(stream) = probe.audio else {
        bail!(
            "audio {}: the file has no audio track{}",
            path.display(),
            if probe.video.is_some() {
                " (a video without sound needs a separate `audio` file)"
            } else {
                ""
            }
        );
    };
    if let Some(seconds) = stream.duration.or(probe.duration) {
        if seconds > max_seconds {
            bail!(
                "audio {}: {seconds:.2} s long, longer than the limit of {max_seconds} s",
                path.display()
            );
        }
    }
    let mut cmd = Command::new(program("ffmpeg", FFMPEG_ENV));
    cmd.args(["-v", "error", "-nostdin", "-i"])
        .arg(path)
        .args(["-map", "0:a:0", "-vn", "-sn"]);
    if stream.channels > 1 {
        // The mean of the channels, as librosa's to_mono; FFmpeg's own down-mix weighs them
        // by layout instead.
        let weight = 1.0 / f64::from(stream.channels);
        let terms: Vec<String> = (0..stream.channels)
            .map(|c| format!("{weight}*c{c}"))
            .collect();
        cmd.arg("-af");
        let mut filter = format!("pan=mono|c0={}", terms.join("+"));
        if has_soxr() {
            filter.push_str(",aresample=resampler=soxr");
        }
        cmd.arg(filter);
    } else if has_soxr() {
        cmd.args(["-af", "aresample=resampler=soxr"]);
    }
    cmd.args(["-ac", "1", "-ar"])
        .arg(SAMPLE_RATE.to_string())
        .args(["-f", "f32le", "-"]);
    let mut child = spawn(cmd, "ffmpeg", FFMPEG_ENV, path)?;
    let stdout = child.stdout.take().context("ffmpeg's output pipe")?;
    let mut stderr = child.stderr.take().context("ffmpeg's error pipe")?;
    let errors = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let limit = sample_bytes_limit(max_seconds);
    let mut bytes = Vec::new();
    stdout
        .take(limit.saturating_add(4))
        .read_to_end(&mut bytes)
        .with_context(|| format!("audio {}: reading ffmpeg's samples", path.display()))?;
    let too_long = bytes.len() as u64 > limit;
    if too_long {
        let _ = child.kill();
    }
    let status = child
        .wait()
        .with_context(|| format!("audio {}: waiting for ffmpeg", path.display()))?;
    let errors = errors.join().unwrap_or_default();
    if too_long {
        bail!(
            "audio {}: longer than the limit of {max_seconds} s",
            path.display()
        );
    }
    if !status.success() {
        bail!(
            "audio {}: truncated, corrupt or unsupported ({} audio): ffmpeg: {}",
            path.display(),
            stream.codec,
            tail(&errors)
        );
    }
    let samples: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if samples.is_empty() {
        bail!(
            "audio {}: no samples decoded ({} audio)",
            path.display(),
            stream.codec
        );
    }
    if let Some(at) = samples.iter().position(|s| !s.is_finite()) {
        bail!(
            "audio {}: decoded sample {at} is not finite",
            path.display()
        );
    }
    Ok(Audio {
        sample_rate: SAMPLE_RATE,
        samples,
    })
}

/// Bytes of f32 samples at [`SAMPLE_RATE`] in `max_seconds` (a flag or config value, so any
/// f64): saturating, where a plain product would overflow for a limit of 10¹⁵ s or more.
fn sample_bytes_limit(max_seconds: f64) -> u64 {
    ((max_seconds * f64::from(SAMPLE_RATE)).ceil() as u64).saturating_mul(4)
}

/// Whether `path` names a video file (by extension) rather than a directory of frames.
pub fn is_video_file(path: &Path) -> bool {
    !path.is_dir()
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| VIDEO_EXTENSIONS.iter().any(|v| e.eq_ignore_ascii_case(v)))
}

/// For tests that need FFmpeg (this crate's and `tests/ffmpeg`): true when it is here;
/// without it, false (the test is skipped, said on stderr) on a developer's machine, a failure
/// where `OMNIOPSD_REQUIRE_FFMPEG=1` or `CI` is set (`.ci/run` sets the first), so CI cannot
/// skip them.
///
/// # Panics
/// When FFmpeg is missing and the environment requires it: that is the test's failure.
#[doc(hidden)]
pub fn required_in_tests() -> bool {
    if available() {
        return true;
    }
    let set =
        |name: &str| std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    assert!(
        !(set("OMNIOPSD_REQUIRE_FFMPEG") || set("CI")),
        "this test needs the ffmpeg and ffprobe programs (apt-get install ffmpeg), which \
         OMNIOPSD_REQUIRE_FFMPEG or CI requires"
    );
    eprintln!("skipped: no ffmpeg/ffprobe (install FFmpeg to run this test)");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_frames_a_second_of_a_four_second_25_fps_clip_are_eight() {
        let opts = VideoOptions::default();
        assert_eq!(sample_count(100, 25.0, &opts).unwrap(), 8);
        // Short clips are raised to min_frames, odd counts floored to the temporal patch.
        assert_eq!(sample_count(30, 30.0, &opts).unwrap(), 4);
        assert_eq!(sample_count(75, 25.0, &opts).unwrap(), 6);
        // Never more than the clip holds.
        assert_eq!(sample_count(3, 30.0, &opts).unwrap(), 2);
        assert!(sample_count(1, 30.0, &opts).is_err());
        assert!(sample_count(0, 30.0, &opts).is_err());
        // Long clips are capped at max_frames.
        assert_eq!(sample_count(100_000, 25.0, &opts).unwrap(), 768);
    }

    #[test]
    fn indices_are_torch_linspace_rounded_half_to_even() {
        assert_eq!(sample_indices(100, 8), [0, 14, 28, 42, 57, 71, 85, 99]);
        // 9 · 1/2 = 4.5 rounds to 4 (even), as torch.round does.
        assert_eq!(sample_indices(10, 3), [0, 4, 9]);
        assert_eq!(sample_indices(4, 4), [0, 1, 2, 3]);
        // Where the second half's `end − step·k` rounds differently once or twice: torch
        // 2.15 gives 17303 at position 184 of linspace(0, 29999, 320).round().
        assert_eq!(sample_indices(30_000, 320)[184], 17_303);
        assert_eq!(sample_indices(30_000, 358)[211], 17_731);
    }

    #[test]
    fn small_frames_grow_to_the_video_minimum_and_large_ones_shrink_to_the_budget() {
        let opts = VideoOptions::default();
        let (h, w) = frame_size(48, 64, 8, &opts).unwrap();
        assert_eq!((h % 28, w % 28), (0, 0));
        assert!(h * w >= opts.min_pixels, "{h}x{w}");
        let (h, w) = frame_size(1080, 1920, 8, &opts).unwrap();
        assert!(h * w <= VIDEO_MAX_PIXELS, "{h}x{w}");
        // Many frames share the total budget: 768 frames get 2 · total / 768 pixels each.
        let (h, w) = frame_size(1080, 1920, 768, &opts).unwrap();
        assert!(h * w <= opts.total_pixels * 2 / 768, "{h}x{w}");
        assert!(h * w > VIDEO_MAX_PIXELS / 4, "{h}x{w}");
        // ... but never under ⌊1.05 · min_pixels⌋.
        let tight = VideoOptions {
            total_pixels: 1,
            ..VideoOptions::default()
        };
        let (h, w) = frame_size(1080, 1920, 768, &tight).unwrap();
        assert!(h * w <= (opts.min_pixels as f64 * 1.05) as usize, "{h}x{w}");
    }

    #[test]
    fn packet_timestamps_whose_end_overflows_drop_the_span_instead_of_panicking() {
        let scan = packet_span("0,512\n512,512\n\n1024,512\n");
        assert_eq!((scan.packets, scan.span), (3, Some((0, 1536))));
        let scan = packet_span("0,512\n9223372036854775807,512\n");
        assert_eq!((scan.packets, scan.span), (2, None));
        let scan = packet_span("-9223372036854775808,1\n9223372036854775806,1\n");
        assert_eq!(scan.span, Some((i64::MIN, i64::MAX)));
        let scan = packet_span("0,512\nN/A,512\n");
        assert_eq!((scan.packets, scan.span), (2, None));
    }

    #[test]
    fn an_audio_length_limit_of_any_size_is_a_byte_count() {
        assert_eq!(sample_bytes_limit(30.0), 30 * 16_000 * 4);
        assert_eq!(sample_bytes_limit(1e300), u64::MAX);
        assert_eq!(sample_bytes_limit(f64::INFINITY), u64::MAX);
        assert_eq!(sample_bytes_limit(f64::NAN), 0);
    }
}
