"""Reference fixtures for the Qwen2.5-Omni crates (models/audio, models/vision, models/thinker).

Builds a tiny random-weight `Qwen2_5OmniThinkerForConditionalGeneration` from a config (no hub
access), saves it with `save_pretrained` under tests/reference/omni_tiny/ (bare thinker layout),
copies its towers into tests/reference/omni_full_layout/ (full-model layout: `thinker_config`,
`thinker.`-prefixed tensors, an unused `talker.` tensor), and writes reference outputs:

* omni_audio.safetensors: deterministic waveforms, their WhisperFeatureExtractor log-mel (as
  the Qwen2.5-Omni processor calls it: padding="max_length", attention mask), and the audio
  tower output for one clip and for two clips concatenated;
* omni_vision.safetensors: RGB frames at a smart_resize size (an image and a 3-frame video),
  the processors' pixel patches and grids, and the vision tower outputs;
* omni_resize.safetensors: patches of synthetic frames that need resizing (Pillow bicubic via
  `Qwen2VLImageProcessorPil`), the frames being regenerated in Rust from the same formula;
* omni_thinker.safetensors: two expanded prompts (audio + image + video; a video with its
  audio interleaved + a second clip), their `get_rope_index` positions and deltas, and the
  thinker's logits.

Every fixture tensor is stored as f32 (masks, grids, ids and u8 pixels too) so one reader
serves all. torchvision is not installed here, so the video patches use the video processor's
recipe written out below (checked against the image processor on a still clip).

Run from the repository root, with a Python that has torch, transformers and safetensors
(tests/reference/README.md: how to make one): python3 tests/reference/gen_omni.py
"""

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import (
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    WhisperFeatureExtractor,
)

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_MODEL = os.path.join(HERE, "omni_tiny")

torch.manual_seed(0)
np.random.seed(0)

TEXT_HIDDEN = 64

config = Qwen2_5OmniThinkerConfig(
    audio_config=dict(
        num_mel_bins=128,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=64,
        d_model=32,
        n_window=8,
        output_dim=TEXT_HIDDEN,
        max_source_positions=1500,
    ),
    vision_config=dict(
        depth=4,
        hidden_size=32,
        hidden_act="silu",
        intermediate_size=64,
        num_heads=4,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        out_hidden_size=TEXT_HIDDEN,
        fullatt_block_indexes=[1, 3],
    ),
    text_config=dict(
        vocab_size=256,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        tie_word_embeddings=False,
    ),
    audio_token_index=240,
    image_token_index=241,
    video_token_index=242,
    audio_start_token_id=243,
    audio_end_token_id=244,
    vision_start_token_id=245,
    vision_end_token_id=246,
    user_token_id=247,
)
config._attn_implementation = "eager"
model = Qwen2_5OmniThinkerForConditionalGeneration(config).eval().float()
# Random init uses small std; widen it so every block changes its input noticeably.
with torch.no_grad():
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 0.08)
        elif "norm" in name or "ln_" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        else:
            p.normal_(0.0, 0.05)
model.save_pretrained(OUT_MODEL, safe_serialization=True)

# The full Qwen2.5-Omni layout (`thinker_config`, `thinker.`-prefixed tensors, other
# components present but unused), with only the two towers to stay small.
full_dir = os.path.join(HERE, "omni_full_layout")
os.makedirs(full_dir, exist_ok=True)
state = model.state_dict()
full = {f"thinker.{k}": v.contiguous() for k, v in state.items() if k.startswith(("audio_tower.", "visual."))}
if not full:
    full = {f"thinker.{k.replace('model.', '', 1)}": v.contiguous() for k, v in state.items()
            if k.startswith(("model.audio_tower.", "model.visual."))}
full["talker.codec_head.weight"] = torch.zeros(4, 4)
save_file(full, os.path.join(full_dir, "model.safetensors"))
with open(os.path.join(OUT_MODEL, "config.json")) as f:
    thinker_json = json.load(f)
with open(os.path.join(full_dir, "config.json"), "w") as f:
    json.dump({"architectures": ["Qwen2_5OmniForConditionalGeneration"], "model_type": "qwen2_5_omni",
               "thinker_config": thinker_json, "talker_config": {}, "token2wav_config": {}}, f, indent=2)

# ---------------------------------------------------------------- audio
fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400)
n = 20_800  # 1.3 s, not a multiple of the hop, so the attention-mask rounding is exercised
t = np.arange(n, dtype=np.float64) / 16000.0
rng = np.random.default_rng(1)
wave = (
    0.4 * np.sin(2 * np.pi * (220.0 * t + 300.0 * t * t))
    + 0.2 * np.sin(2 * np.pi * 1234.5 * t)
    + 0.05 * rng.standard_normal(n)
).astype(np.float32)
feats = fe(wave, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt")
mel = feats["input_features"][0]  # [128, 3000]
mask = feats["attention_mask"][0]  # [3000]
valid = int(mask.sum())
# The padded tail is one constant (log-mel of silence after the dynamic-range clamp); keep a
# few padded frames to check it without committing the whole 128 x 3000 matrix.
keep = valid + 6
with torch.no_grad():
    audio_out = model.model.audio_tower(mel[:, :valid], feature_lens=torch.tensor([valid])).last_hidden_state
# A second, longer clip exercises several attention chunks and an odd length after the stem.
n2 = 7_000
wave2 = (0.3 * np.cos(2 * np.pi * 440.0 * t[:n2]) + 0.1 * rng.standard_normal(n2)).astype(np.float32)
feats2 = fe(wave2, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt")
valid2 = int(feats2["attention_mask"][0].sum())
mel2 = feats2["input_features"][0][:, :valid2]
with torch.no_grad():
    batch_in = torch.cat([mel[:, :valid], mel2], dim=1)
    audio_out_batch = model.model.audio_tower(batch_in, feature_lens=torch.tensor([valid, valid2])).last_hidden_state
save_file(
    {
        "waveform": torch.from_numpy(wave).contiguous(),
        "waveform2": torch.from_numpy(wave2).contiguous(),
        "mel_head": mel[:, :keep].contiguous(),
        "mel2_valid": mel2.contiguous(),
        "mel_pad_value": mel[:, -1:].contiguous(),
        "attention_mask": mask.to(torch.float32).contiguous(),
        "tower_out": audio_out.contiguous(),
        "tower_out_batch": audio_out_batch.contiguous(),
    },
    os.path.join(HERE, "omni_audio.safetensors"),
)

# ---------------------------------------------------------------- vision
img_proc = Qwen2VLImageProcessorPil(
    min_pixels=56 * 56, max_pixels=28 * 28 * 64, patch_size=14, temporal_patch_size=2, merge_size=2
)
# Frames already at a smart_resize size (multiples of 28) so resizing is the identity.
image = rng.integers(0, 256, size=(84, 112, 3), dtype=np.uint8)
video = rng.integers(0, 256, size=(3, 56, 112, 3), dtype=np.uint8)  # 3 frames: the last is repeated
img = img_proc(images=[image], do_resize=False, return_tensors="pt")


def video_patches(frames, patch=14, merge=2, tps=2):
    """Qwen2VLVideoProcessor's rescale/normalise/patchify (its torchvision backend is not
    installed here): pad the frame count to a multiple of `tps` by repeating the last frame,
    then [grid_t, tps, C, gh/m, m, p, gw/m, m, p] -> [grid_t, gh/m, gw/m, m, m, C, tps, p, p]."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    x = (x - mean) / std
    if pad := -x.shape[0] % tps:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)], dim=0)
    t, c, h, w = x.shape
    gt, gh, gw = t // tps, h // patch, w // patch
    x = x.reshape(gt, tps, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, c * tps * patch * patch)
    return x, torch.tensor([[gt, gh, gw]])


vid_pixels, vid_grid = video_patches(video)
vid = {"pixel_values_videos": vid_pixels, "video_grid_thw": vid_grid}
# The video recipe agrees with the image processor on a still clip (an image is a 2-frame video).
still, _ = video_patches(image[None])
assert torch.allclose(still, img["pixel_values"].float(), atol=1e-6)
with torch.no_grad():
    img_out = model.model.visual(img["pixel_values"], grid_thw=img["image_grid_thw"]).pooler_output
    vid_out = model.model.visual(vid["pixel_values_videos"], grid_thw=vid["video_grid_thw"]).pooler_output
save_file(
    {
        "image": torch.from_numpy(image).float().contiguous(),
        "video": torch.from_numpy(video).float().contiguous(),
        "image_pixel_values": img["pixel_values"].float().contiguous(),
        "image_grid_thw": img["image_grid_thw"].float().contiguous(),
        "video_pixel_values": vid["pixel_values_videos"].float().contiguous(),
        "video_grid_thw": vid["video_grid_thw"].float().contiguous(),
        "image_tower_out": img_out.contiguous(),
        "video_tower_out": vid_out.contiguous(),
    },
    os.path.join(HERE, "omni_vision.safetensors"),
)

# Resizing: Pillow bicubic through the PIL image processor, on synthetic frames that Rust
# regenerates from the same formula (sharp wrap-around edges exercise clipping).
def synthetic(h, w):
    y, x, c = np.meshgrid(np.arange(h), np.arange(w), np.arange(3), indexing="ij")
    return ((x * x * 3 + y * 7 + c * 85 + (x * y) % 23 * 5) % 256).astype(np.uint8)


resize_out = {}
for name, (h, w, max_px) in {"up": (50, 70, 28 * 28 * 64), "down": (120, 200, 28 * 28 * 16),
                             "tiny": (150, 200, 56 * 56)}.items():
    proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=max_px, patch_size=14,
                                    temporal_patch_size=2, merge_size=2)
    out = proc(images=[synthetic(h, w)], return_tensors="pt")
    resize_out[f"{name}_pixel_values"] = out["pixel_values"].float().contiguous()
    resize_out[f"{name}_grid_thw"] = out["image_grid_thw"].float().contiguous()
save_file(resize_out, os.path.join(HERE, "omni_resize.safetensors"))

# ---------------------------------------------------------------- thinker
# Token sequences as the chat template + Qwen2_5OmniProcessor produce them (placeholders
# expanded), TMRoPE position ids from `get_rope_index`, and logits of the whole thinker.
from types import SimpleNamespace

from transformers import Qwen2_5OmniProcessor

AUD, IMG, VID = config.audio_token_index, config.image_token_index, config.video_token_index
A_BOS, A_EOS = config.audio_start_token_id, config.audio_end_token_id
V_BOS, V_EOS = config.vision_start_token_id, config.vision_end_token_id
n_audio1 = (valid - 1) // 2 + 1
n_audio1 = (n_audio1 - 2) // 2 + 1
n_audio2 = ((valid2 - 1) // 2 + 1 - 2) // 2 + 1
img_grid = img["image_grid_thw"]
vid_grid = vid["video_grid_thw"]
n_img = int(img_grid.prod()) // 4
n_vid = int(vid_grid.prod()) // 4

# The processor's audio-in-video interleaving, called on a stand-in `self` (no tokenizer here).
fake = SimpleNamespace(audio_bos_token="<A_BOS>", audio_eos_token="<A_EOS>", video_token="<V>",
                       audio_token="<A>", video_processor=SimpleNamespace(merge_size=2))
fake.get_chunked_index = lambda idx, n: Qwen2_5OmniProcessor.get_chunked_index(fake, idx, n)
SPG_B = 2.0  # seconds per temporal grid (fps 1 with 2 frames per grid): t positions 0, 50
placeholder = Qwen2_5OmniProcessor.replace_video_with_audio_token(
    fake, {"video_grid_thw": vid_grid, "video_second_per_grid": [SPG_B]}, 0,
    {"num_audio_tokens": [n_audio1]}, 0, position_id_per_seconds=25, seconds_per_chunk=2.0)
tok = {"<A_BOS>": A_BOS, "<A_EOS>": A_EOS, "<V>": VID, "<A>": AUD}
interleaved = [tok[t] for t in __import__("re").findall(r"<A_BOS>|<A_EOS>|<V>|<A>", placeholder)]

text1 = [11, 12, 13]
text2 = [21, 22]
seq_a = (text1 + [A_BOS] + [AUD] * n_audio1 + [A_EOS] + text2 + [V_BOS] + [IMG] * n_img + [V_EOS]
         + [31] + [V_BOS] + [VID] * n_vid + [V_EOS] + [41, 42, 43])
seq_b = (text1 + [V_BOS] + interleaved + [V_EOS] + text2 + [A_BOS] + [AUD] * n_audio2 + [A_EOS] + [51, 52])

def feats_batch(mels):
    x = torch.zeros(len(mels), 128, 3000)
    mask = torch.zeros(len(mels), 3000, dtype=torch.long)
    for i, m in enumerate(mels):
        x[i, :, : m.shape[1]] = m
        mask[i, : m.shape[1]] = 1
    return x, mask

thinker_out = {}
for name, seq, mels, use_aiv, spg in (
    ("a", seq_a, [mel[:, :valid]], False, 1.0),
    ("b", seq_b, [mel[:, :valid], mel2], True, SPG_B),
):
    ids = torch.tensor([seq])
    x, fmask = feats_batch(mels)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=x,
                  feature_attention_mask=fmask, pixel_values_videos=vid["pixel_values_videos"],
                  video_grid_thw=vid_grid, video_second_per_grid=torch.tensor([spg]),
                  use_audio_in_video=use_aiv)
    if name == "a":
        kwargs.update(pixel_values=img["pixel_values"], image_grid_thw=img_grid)
    with torch.no_grad():
        pos, delta = model.model.get_rope_index(
            ids, img_grid if name == "a" else None, vid_grid, torch.ones_like(ids), use_aiv,
            fmask.sum(-1), torch.tensor([spg]))
        logits = model(**kwargs).logits[0]
    thinker_out[f"ids_{name}"] = ids[0].float()
    thinker_out[f"positions_{name}"] = pos[:, 0, :].float().contiguous()
    thinker_out[f"rope_delta_{name}"] = delta.reshape(1).float()
    thinker_out[f"logits_{name}"] = logits.contiguous()
save_file(thinker_out, os.path.join(HERE, "omni_thinker.safetensors"))

print(json.dumps({"audio_valid_frames": valid, "audio_out": list(audio_out.shape),
                  "image_grid": img["image_grid_thw"].tolist(), "video_grid": vid["video_grid_thw"].tolist(),
                  "img_out": list(img_out.shape), "vid_out": list(vid_out.shape)}))
