//! Video files and compressed audio against Qwen2.5-Omni's own preprocessing
//! (`qwen-omni-utils` 0.0.9 reading through torchcodec, librosa, transformers'
//! `WhisperFeatureExtractor`) on the fixtures of `tests/reference/gen_video.py`.
//!
//! Tolerances (measured errors in tests/reference/README.md):
//! - frame counts, frame indices, resized sizes: exact; `sample_fps` to 1e-9 relative;
//! - resized pixels (u8): mean |Δ| ≤ 0.5 and max |Δ| ≤ 64 levels per clip (measured: mean
//!   0.11–0.14, max 12–22). The two sides convert YUV to RGB with different swscale settings
//!   (FFmpeg's program vs torchcodec) and resize with different bicubics (Pillow's vs
//!   torchvision's antialiased), so single pixels on sharp edges of the test pattern differ
//!   by tens of levels while the mean stays a tenth of a level;
//! - 16 kHz sample counts: within 8 samples (measured: equal, or 1 short for AAC in a video);
//!   valid log-mel frames within 1 (measured: equal);
//! - log-mel (Whisper-normalised, about [-1.5, 1.5]): max |Δ| ≤ 0.06 over every fifth valid
//!   frame (measured: 6e-5–0.008 for audio files, 0.010–0.020 for video tracks, which
//!   librosa reads through audioread as 16-bit PCM).
//!
//! These tests need the `ffmpeg` and `ffprobe` programs: without them they are skipped with a
//! notice, and fail where `OMNIOPSD_REQUIRE_FFMPEG=1` or `CI` is set (as in `.ci/run`).

mod ffmpeg;

use std::collections::BTreeMap;
use std::path::PathBuf;

use omniopsd_audio::FeatureExtractor;
use omniopsd_cli::data::media;
use omniopsd_cli::data::video::{self, VideoOptions};
use safetensors::SafeTensors;
use serde_json::Value;

fn media_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/reference/media"
    ))
}

fn reference() -> Value {
    let text = std::fs::read_to_string(media_dir().join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference.json parses")
}

fn tensors() -> Vec<u8> {
    std::fs::read(media_dir().join("reference.safetensors")).expect("reference.safetensors")
}

fn small_budget(reference: &Value) -> VideoOptions {
    VideoOptions {
        min_pixels: reference["small_budget"]["min_pixels"].as_u64().unwrap() as usize,
        max_pixels: reference["small_budget"]["max_pixels"].as_u64().unwrap() as usize,
        ..VideoOptions::default()
    }
}

fn videos(reference: &Value) -> BTreeMap<String, Value> {
    reference["videos"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[test]
fn frame_counts_indices_sizes_and_time_base_match_qwen_omni_utils() {
    if !ffmpeg::required() {
        return;
    }
    let reference = reference();
    for (name, entry) in videos(&reference) {
        let path = media_dir().join(&name);
        for (budget, opts) in [
            ("default", VideoOptions::default()),
            ("small", small_budget(&reference)),
        ] {
            let want = &entry[budget];
            let (probe, plan) = video::plan_video(&path, &opts).unwrap();
            let stream = probe.video.unwrap();
            let at = format!("{name} ({budget} budget)");
            assert_eq!(
                stream.frames as u64,
                want["total_frames"].as_u64().unwrap(),
                "{at}"
            );
            let fps = want["video_fps"].as_f64().unwrap();
            assert!(
                (stream.fps - fps).abs() <= 1e-9 * fps,
                "{at}: {} vs {fps}",
                stream.fps
            );
            let indices: Vec<usize> = want["indices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(plan.indices, indices, "{at}");
            let size = (
                want["size"][0].as_u64().unwrap() as usize,
                want["size"][1].as_u64().unwrap() as usize,
            );
            assert_eq!(plan.size, size, "{at}");
            let sample_fps = want["sample_fps"].as_f64().unwrap();
            assert!(
                (plan.sample_fps - sample_fps).abs() <= 1e-9 * sample_fps,
                "{at}: {} vs {sample_fps}",
                plan.sample_fps
            );
        }
    }
}

#[test]
fn sampled_frames_match_fetch_video_pixels() {
    if !ffmpeg::required() {
        return;
    }
    let reference = reference();
    let bytes = tensors();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let opts = small_budget(&reference);
    for name in videos(&reference).keys() {
        let want = st.tensor(&format!("frames/{name}")).unwrap();
        let sampled = video::read_video(&media_dir().join(name), &opts).unwrap();
        let shape = want.shape();
        assert_eq!(sampled.frames.len(), shape[0], "{name}");
        let got: Vec<u8> = sampled.frames.iter().flat_map(|f| f.rgb.clone()).collect();
        assert_eq!(
            (
                sampled.frames[0].height as usize,
                sampled.frames[0].width as usize
            ),
            (shape[1], shape[2]),
            "{name}"
        );
        let diffs: Vec<u32> = got
            .iter()
            .zip(want.data())
            .map(|(a, b)| u32::from(a.abs_diff(*b)))
            .collect();
        assert_eq!(diffs.len(), want.data().len());
        let max = *diffs.iter().max().unwrap();
        let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
        eprintln!("{name}: pixels mean |Δ| {mean:.3}, max |Δ| {max}");
        assert!(mean <= 0.5 && max <= 64, "{name}: mean {mean}, max {max}");
    }
}

#[test]
fn audio_files_and_video_tracks_match_librosa_and_whisper_features() {
    if !ffmpeg::required() {
        return;
    }
    let reference = reference();
    let bytes = tensors();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let stride = reference["mel_stride"].as_u64().unwrap() as usize;
    let mut sources: Vec<(String, Value)> = videos(&reference)
        .into_iter()
        .map(|(k, v)| (k, v["audio"].clone()))
        .collect();
    sources.extend(
        reference["audio"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    let extractor = FeatureExtractor::qwen2_5_omni();
    for (name, want) in sources {
        let audio = media::read_audio(&media_dir().join(&name), 30.0).unwrap();
        let samples = want["samples"].as_u64().unwrap() as f64;
        let off = (audio.samples.len() as f64 - samples).abs();
        let mel = extractor
            .extract(&audio.samples, audio.sample_rate)
            .unwrap();
        let valid = want["valid_frames"].as_u64().unwrap() as usize;
        let reference_mel = st.tensor(&format!("mel/{name}")).unwrap();
        let cols = reference_mel.shape()[1];
        let values: Vec<f32> = reference_mel
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mut max = 0f32;
        for m in 0..mel.n_mels {
            for c in 0..cols {
                let t = c * stride;
                if t < mel.valid_frames.min(valid) {
                    max = max.max((mel.get(m, t) - values[m * cols + c]).abs());
                }
            }
        }
        eprintln!(
            "{name}: {} samples vs {samples}, valid frames {} vs {valid}, log-mel max |Δ| {max:.5}",
            audio.samples.len(),
            mel.valid_frames
        );
        assert!(
            off <= 8.0,
            "{name}: {} vs {samples} samples",
            audio.samples.len()
        );
        assert!(mel.valid_frames.abs_diff(valid) <= 1, "{name}");
        assert!(max <= 0.06, "{name}: log-mel max |Δ| {max}");
    }
}

// ---- manifests with video files, through `omniopsd data check` ----

fn omniopsd(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_omniopsd"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the omniopsd binary runs")
}

/// A manifest line for `video` (and `audio`, when given), valid in every other field.
fn line(id: &str, video: &str, audio: Option<&str>) -> String {
    let mut record = serde_json::json!({
        "id": id, "split": "train", "video": video, "subtitle": "I am fine.",
        "emotion": "sad", "sentiment": -1.0, "openset": ["sad"],
        "rationale": "Audio: low pitch. Visual: downcast eyes. Text: flat. So: sad.",
    });
    if let Some(audio) = audio {
        record["audio"] = audio.into();
    }
    record.to_string()
}

/// Runs `data check` on `lines` in `dir`; returns (success, stdout + stderr).
fn check(dir: &std::path::Path, lines: &[String], env: &[(&str, &str)]) -> (bool, String) {
    let manifest = dir.join("manifest.jsonl");
    std::fs::write(&manifest, lines.join("\n") + "\n").unwrap();
    let out = omniopsd(&["data", "check", manifest.to_str().unwrap()], env);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("panicked"), "{text}");
    (out.status.success(), text)
}

fn ffmpeg_make(args: &[&str]) {
    let status = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-y"])
        .args(args)
        .status()
        .expect("ffmpeg runs");
    assert!(status.success(), "ffmpeg {args:?}");
}

/// The problem `data check` reports for line `n`.
fn problem_on(text: &str, n: usize) -> String {
    let tag = format!("manifest.jsonl:{n}: ");
    text.lines()
        .filter(|l| l.contains(&tag))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn video_files_with_their_own_track_or_a_separate_audio_file_pass_data_check() {
    if !ffmpeg::required() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for name in ["clip_h264.mp4", "clip_vp9.webm", "tone.mp3"] {
        std::fs::copy(media_dir().join(name), dir.path().join(name)).unwrap();
    }
    let lines = [
        line("a", "clip_h264.mp4", None),
        line("b", "clip_vp9.webm", Some("tone.mp3")),
    ];
    let (ok, text) = check(dir.path(), &lines, &[]);
    assert!(ok, "{text}");
    assert!(text.contains("2 samples, all valid"), "{text}");
}

#[test]
fn bad_video_files_are_reported_with_their_line_and_file_and_no_panic() {
    if !ffmpeg::required() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let clip = std::fs::read(media_dir().join("clip_h264.mp4")).unwrap();
    // 1: truncated (an MP4 keeps its index at the end: cut, it is unreadable).
    std::fs::write(d.join("truncated.mp4"), &clip[..clip.len() * 2 / 3]).unwrap();
    // 2: no audio track, and no `audio` field.
    ffmpeg_make(&[
        "-i",
        media_dir().join("clip_h264.mp4").to_str().unwrap(),
        "-an",
        "-c",
        "copy",
        d.join("silent.mp4").to_str().unwrap(),
    ]);
    // 3: zero-length file; 4: a clip of one frame (two are needed for a temporal patch).
    std::fs::write(d.join("empty.mp4"), b"").unwrap();
    ffmpeg_make(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=64x48:rate=25",
        "-frames:v",
        "1",
        "-c:v",
        "mjpeg",
        d.join("one_frame.avi").to_str().unwrap(),
    ]);
    // 5: garbage under a video name (no codec FFmpeg knows).
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(d.join("garbage.mkv"), garbage).unwrap();
    // 6: frames larger than MAX_FRAME_PIXELS: refused from the header, before decoding.
    ffmpeg_make(&[
        "-f",
        "lavfi",
        "-i",
        "color=c=gray:s=5000x3600:r=5:d=0.4",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        d.join("huge.mp4").to_str().unwrap(),
    ]);
    // 8: a readable header over corrupt frame data (an MJPEG AVI zeroed from a third on).
    let mut corrupt = std::fs::read(media_dir().join("clip_mjpeg.avi")).unwrap();
    let n = corrupt.len();
    corrupt[n / 3..n - 4000].fill(0);
    std::fs::write(d.join("corrupt.avi"), corrupt).unwrap();
    // 7: a missing file.
    let lines = [
        line("truncated", "truncated.mp4", None),
        line("silent", "silent.mp4", None),
        line("empty", "empty.mp4", None),
        line("one", "one_frame.avi", Some("silent.mp4")),
        line("garbage", "garbage.mkv", None),
        line("huge", "huge.mp4", None),
        line("missing", "gone.mp4", None),
        line("corrupt", "corrupt.avi", Some("silent.mp4")),
    ];
    let (ok, text) = check(d, &lines, &[]);
    assert!(!ok, "{text}");
    let expect = [
        (1, "truncated.mp4", "not a readable media file"),
        (2, "silent.mp4", "no audio track"),
        (3, "empty.mp4", "empty file"),
        (4, "one_frame.avi", "at least 2 frames"),
        (5, "garbage.mkv", "not a readable media file"),
        (6, "huge.mp4", "5000x3600"),
        (7, "gone.mp4", "no such file"),
        // Found while decoding the sampled frames: fewer come out than were asked for.
        (8, "corrupt.avi", "truncated or corrupt"),
    ];
    // The unreadable videos of lines 1, 3, 5 and 7 are reported once, not again as audio.
    for n in [1, 3, 5, 7] {
        assert_eq!(problem_on(&text, n).lines().count(), 1, "line {n}:\n{text}");
    }
    for (n, file, what) in expect {
        let p = problem_on(&text, n);
        assert!(
            p.contains(file) && p.contains(what),
            "line {n}: {p}\n{text}"
        );
    }
    // One frame silent.mp4 as the audio of line 4 also has no sound: said on line 4 too.
    assert!(problem_on(&text, 4).contains("no audio track"), "{text}");
    assert!(text.contains("8 of 8 lines"), "{text}");
}

#[test]
fn without_ffmpeg_a_video_file_says_how_to_install_it_and_wav_with_frames_needs_none() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::copy(media_dir().join("clip_h264.mp4"), d.join("clip.mp4")).unwrap();
    let missing = d.join("no-such-program");
    let env = [
        ("OMNIOPSD_FFMPEG", missing.to_str().unwrap()),
        ("OMNIOPSD_FFPROBE", missing.to_str().unwrap()),
    ];
    let (ok, text) = check(d, &[line("a", "clip.mp4", None)], &env);
    assert!(!ok, "{text}");
    let p = problem_on(&text, 1);
    assert!(
        p.contains("clip.mp4")
            && p.contains("needs FFmpeg")
            && p.contains("apt-get install ffmpeg"),
        "{p}\n{text}"
    );
    // The synthetic corpus (16 kHz WAV, PNG frames) is read without FFmpeg.
    let corpus = d.join("synth");
    let out = omniopsd(
        &[
            "data",
            "synth",
            "--quiet",
            "--out",
            corpus.to_str().unwrap(),
            "--n",
            "10",
        ],
        &env,
    );
    assert!(out.status.success());
    let out = omniopsd(
        &[
            "data",
            "check",
            corpus.join("manifest.jsonl").to_str().unwrap(),
        ],
        &env,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_record_with_a_video_file_takes_its_track_and_the_sampled_frames_time_base() {
    if !ffmpeg::required() {
        return;
    }
    use omniopsd_cli::data::manifest::{Limits, Record};
    use omniopsd_cli::inputs::{record_media, video_processor};
    let reference = reference();
    let name = "clip_mjpeg.avi";
    let record: Record = serde_json::from_str(&line("a", name, None)).unwrap();
    let limits = Limits {
        video: small_budget(&reference),
        ..Limits::default()
    };
    let media = record_media(&record, &media_dir(), &limits, &video_processor()).unwrap();
    let want = &reference["videos"][name];
    // second_per_grid_ts = temporal_patch_size / sample_fps, not frames / audio seconds.
    let sample_fps = want["small"]["sample_fps"].as_f64().unwrap();
    assert!((media.second_per_grid - 2.0 / sample_fps).abs() < 1e-9);
    let size = &want["small"]["size"];
    let (h, w) = (size[0].as_u64().unwrap(), size[1].as_u64().unwrap());
    assert_eq!(
        media.patches.grid_thw,
        [2, h as usize / 14, w as usize / 14],
        "4 frames at the sampled size, not widened by the processor's minimum"
    );
    let valid = want["audio"]["valid_frames"].as_u64().unwrap() as usize;
    assert_eq!(media.mel.valid_frames, valid, "the video's own track");
}
