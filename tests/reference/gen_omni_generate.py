"""Greedy-generation fixture for the Qwen2.5-Omni thinker (models/thinker/tests/thinker_generate.rs).

Loads the tiny thinker `tests/reference/omni_tiny/` (made by gen_omni.py), rebuilds the two
prompts of `omni_thinker.safetensors` (A: audio + image + video; B: a video with its audio
track interleaved + a second clip) from the committed fixtures (waveforms -> Whisper log-mel,
pixel patches and grids as stored), and generates 64 tokens greedily twice:

* transformers' `generate` (do_sample=False, min_new_tokens=max_new_tokens=64, KV cache);
* a plain loop without cache: a full forward over prompt + tokens so far, argmax of the last row.

Both must agree (asserted); their ids go to `omni_generate.safetensors` as f32, with the
smallest top-1 / top-2 logit gap met on the way (how robust the comparison is).

Run from the repository root, with a Python that has torch, transformers and safetensors
(tests/reference/README.md: how to make one): python3 tests/reference/gen_omni_generate.py
"""

import os

import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5OmniThinkerForConditionalGeneration, WhisperFeatureExtractor

HERE = os.path.dirname(os.path.abspath(__file__))
NEW = 64

torch.manual_seed(0)
model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
    os.path.join(HERE, "omni_tiny"), torch_dtype=torch.float32, attn_implementation="eager"
).eval()
audio = load_file(os.path.join(HERE, "omni_audio.safetensors"))
vision = load_file(os.path.join(HERE, "omni_vision.safetensors"))
thinker = load_file(os.path.join(HERE, "omni_thinker.safetensors"))

fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400)


def mel(wave):
    f = fe(wave.numpy(), sampling_rate=16000, padding="max_length", return_attention_mask=True,
           return_tensors="pt")
    valid = int(f["attention_mask"][0].sum())
    return f["input_features"][0][:, :valid]


def feats_batch(mels):
    x = torch.zeros(len(mels), 128, 3000)
    mask = torch.zeros(len(mels), 3000, dtype=torch.long)
    for i, m in enumerate(mels):
        x[i, :, : m.shape[1]] = m
        mask[i, : m.shape[1]] = 1
    return x, mask


m1, m2 = mel(audio["waveform"]), mel(audio["waveform2"])
vid_grid = vision["video_grid_thw"].long()
img_grid = vision["image_grid_thw"].long()
out = {}
for name, mels, use_aiv, spg in (("a", [m1], False, 1.0), ("b", [m1, m2], True, 2.0)):
    ids = thinker[f"ids_{name}"].long()[None]
    x, fmask = feats_batch(mels)
    media = dict(input_features=x, feature_attention_mask=fmask,
                 pixel_values_videos=vision["video_pixel_values"], video_grid_thw=vid_grid,
                 video_second_per_grid=torch.tensor([spg]), use_audio_in_video=use_aiv)
    if name == "a":
        media.update(pixel_values=vision["image_pixel_values"], image_grid_thw=img_grid)
    with torch.no_grad():
        # The prompt's logits must still be the committed ones: same model, same inputs.
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **media).logits[0]
        assert torch.allclose(logits, thinker[f"logits_{name}"], atol=1e-5), name
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **media,
                             do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
                             use_cache=True)[0, ids.shape[1]:]
        seq, gap = ids, float("inf")
        for _ in range(NEW):
            last = model(input_ids=seq, attention_mask=torch.ones_like(seq), **media).logits[0, -1]
            top = torch.topk(last, 2).values
            gap = min(gap, float(top[0] - top[1]))
            seq = torch.cat([seq, last.argmax().view(1, 1)], dim=1)
        loop = seq[0, ids.shape[1]:]
    assert torch.equal(gen, loop), (name, gen.tolist(), loop.tolist())
    out[f"gen_{name}"] = gen.float().contiguous()
    out[f"min_gap_{name}"] = torch.tensor([gap])
    print(name, "ids", gen.tolist()[:12], "... min top-2 gap", gap)
save_file(out, os.path.join(HERE, "omni_generate.safetensors"))
