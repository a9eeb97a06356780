"""Reference fixtures for video files and compressed audio (bins/omniopsd/tests/video.rs).

Makes small media files with the `ffmpeg` program under tests/reference/media/ (a moving test
pattern with a sine-tone soundtrack, in the containers and codecs datasets ship: mp4/h264+aac,
avi/mjpeg+mp3, mkv/vp9+opus, webm/vp9+opus, mov/h264+aac; audio alone as mp3, flac, ogg, m4a
and a 44.1 kHz stereo WAV), then runs Qwen2.5-Omni's own preprocessing on them,
`qwen-omni-utils` 0.0.9 (`fetch_video`, which reads through torchcodec here, and
`process_audio_info`, librosa at 16 kHz), and writes:

* media/reference.json: per video and per pixel budget, the frame count and fps the decoder
  reports, the sampled frame indices, the resized size and `sample_fps`; per audio source, the
  16 kHz sample count and the number of valid log-mel frames;
* media/reference.safetensors: the resized frames (uint8, T x H x W x 3) under the small
  budget `min_pixels = 4·28²`, `max_pixels = 12·28²` (so the fixture stays small), and every
  fifth valid frame of each clip's WhisperFeatureExtractor log-mel (float32, 128 x k), as the
  Qwen2.5-Omni processor calls the extractor (padding="max_length").

Needs the ffmpeg program and a Python with torch, torchvision, torchcodec, transformers,
librosa, soundfile, safetensors and qwen-omni-utils (tests/reference/README.md: how to make
one; add `pip install torchvision torchcodec librosa soundfile qwen-omni-utils`). Run from
the repository root with that Python: python3 tests/reference/gen_video.py
"""

import json
import os
import subprocess

import numpy as np
import torch
from safetensors.numpy import save_file
from transformers import WhisperFeatureExtractor

os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "torchcodec")
from qwen_omni_utils.v2_5.audio_process import process_audio_info  # noqa: E402
from qwen_omni_utils.v2_5.vision_process import fetch_video  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "media")
SMALL = {"min_pixels": 4 * 28 * 28, "max_pixels": 12 * 28 * 28}
MEL_STRIDE = 5

# name, size, fps, seconds, video codec args, audio source args, audio codec args
VIDEOS = [
    ("clip_h264.mp4", "64x48", 25, 2.0,
     ["-c:v", "libx264", "-preset", "veryslow", "-crf", "30", "-pix_fmt", "yuv420p"],
     "sine=frequency=440:sample_rate=44100", ["-ac", "2", "-c:a", "aac", "-b:a", "32k"]),
    ("clip_mjpeg.avi", "80x60", 30, 1.5,
     ["-c:v", "mjpeg", "-q:v", "8", "-pix_fmt", "yuvj420p"],
     "sine=frequency=330:sample_rate=22050", ["-ac", "1", "-c:a", "libmp3lame", "-b:a", "32k"]),
    ("clip_vp9.mkv", "96x54", 24, 2.0,
     ["-c:v", "libvpx-vp9", "-b:v", "60k", "-pix_fmt", "yuv420p"],
     "sine=frequency=550:sample_rate=48000", ["-ac", "2", "-c:a", "libopus", "-b:a", "24k"]),
    ("clip_vp9.webm", "72x40", 20, 1.5,
     ["-c:v", "libvpx-vp9", "-b:v", "60k", "-pix_fmt", "yuv420p"],
     "sine=frequency=250:sample_rate=48000", ["-ac", "1", "-c:a", "libopus", "-b:a", "24k"]),
    ("clip_h264.mov", "160x90", 15, 2.0,
     ["-c:v", "libx264", "-preset", "veryslow", "-crf", "32", "-pix_fmt", "yuv420p"],
     "sine=frequency=660:sample_rate=48000", ["-ac", "1", "-c:a", "aac", "-b:a", "32k"]),
]

# Two channels of different tones, so a wrong down-mix shows.
STEREO = "aevalsrc=0.5*sin(2*PI*440*t)|0.3*sin(2*PI*587*t)+0.1*sin(2*PI*97*t):s=44100:d={d}"
AUDIO = [
    ("tone.mp3", 1.5, ["-c:a", "libmp3lame", "-b:a", "48k"]),
    ("tone.flac", 1.0, ["-c:a", "flac", "-sample_fmt", "s16"]),
    ("tone.ogg", 1.5, ["-c:a", "libvorbis", "-q:a", "0"]),
    ("tone.m4a", 1.5, ["-c:a", "aac", "-b:a", "32k"]),
    ("tone.wav", 0.25, ["-c:a", "pcm_s16le"]),
]


def ffmpeg(*args):
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


def make_media():
    os.makedirs(OUT, exist_ok=True)
    for name, size, fps, secs, vargs, asrc, aargs in VIDEOS:
        ffmpeg(
            "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={fps}:duration={secs}",
            "-f", "lavfi", "-i", f"{asrc}:duration={secs}",
            *vargs, *aargs, "-shortest", "-map_metadata", "-1", "-fflags", "+bitexact",
            os.path.join(OUT, name),
        )
    for name, secs, aargs in AUDIO:
        ffmpeg("-f", "lavfi", "-i", STEREO.format(d=secs), *aargs, "-map_metadata", "-1",
               os.path.join(OUT, name))


def log_mel(wave):
    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160,
                                 chunk_length=30, n_fft=400)
    feats = fe(wave, sampling_rate=16000, padding="max_length", return_attention_mask=True,
               return_tensors="np")
    valid = int(feats["attention_mask"][0].sum())
    mel = feats["input_features"][0][:, :valid]
    return np.ascontiguousarray(mel[:, ::MEL_STRIDE].astype(np.float32)), valid


def main():
    make_media()
    reference = {"mel_stride": MEL_STRIDE, "small_budget": SMALL, "videos": {}, "audio": {}}
    tensors = {}
    for name, *_ in VIDEOS:
        path = os.path.join(OUT, name)
        entry = {}
        for budget, extra in [("default", {}), ("small", SMALL)]:
            (video, meta), sample_fps = fetch_video(
                {"type": "video", "video": path, **extra},
                return_video_sample_fps=True, return_video_metadata=True,
            )
            t, _, h, w = video.shape
            entry[budget] = {
                "indices": [int(i) for i in meta["frames_indices"]],
                "total_frames": int(meta["total_num_frames"]),
                "video_fps": float(meta["fps"]),
                "sample_fps": float(sample_fps),
                "size": [int(h), int(w)],
            }
            if budget == "small":
                frames = video.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
                tensors[f"frames/{name}"] = np.ascontiguousarray(frames.numpy())
        conv = [{"role": "user", "content": [{"type": "video", "video": path}]}]
        wave = process_audio_info(conv, use_audio_in_video=True)[0]
        mel, valid = log_mel(wave)
        tensors[f"mel/{name}"] = mel
        entry["audio"] = {"samples": int(len(wave)), "valid_frames": valid}
        reference["videos"][name] = entry
    for name, *_ in AUDIO:
        path = os.path.join(OUT, name)
        conv = [{"role": "user", "content": [{"type": "audio", "audio": path}]}]
        wave = process_audio_info(conv, use_audio_in_video=False)[0]
        mel, valid = log_mel(wave)
        tensors[f"mel/{name}"] = mel
        reference["audio"][name] = {"samples": int(len(wave)), "valid_frames": valid}
    save_file(tensors, os.path.join(OUT, "reference.safetensors"))
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(reference, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print(f"wrote {len(os.listdir(OUT))} files, {total} bytes, to {OUT}")


if __name__ == "__main__":
    main()
