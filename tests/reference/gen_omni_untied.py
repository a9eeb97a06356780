"""Reference fixture for the LM-head tying rule of Qwen2.5-Omni checkpoints (models/thinker).

transformers ties each model's head by that model's own config: the thinker's head follows
`thinker_config.tie_word_embeddings`, never `thinker_config.text_config.tie_word_embeddings`.
The two differ in what transformers 5 writes for an untied thinker: the text config's flag
defaults to true, the thinker's to false. This script builds such a model without hub access:
a tiny random-weight full `Qwen2_5OmniForConditionalGeneration` (thinker only, no talker), text
config left at its tie default, thinker untied, and saves it with `save_pretrained` into
`omni_full_untied/` (config under `thinker_config`, tensors under `thinker.`, among them
`thinker.lm_head.weight`). It then reloads the directory with `from_pretrained`, so the
reference is what transformers computes from the files, and writes `omni_untied.safetensors`:
two text prompts (ids stored as f32) and the thinker's logits for each.

Run from anywhere with a Python that has torch and transformers 5.24:
    python tests/reference/gen_omni_untied.py [OUTPUT_DIR]
OUTPUT_DIR defaults to the directory of this script.
"""

import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

OUT = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
MODEL_DIR = os.path.join(OUT, "omni_full_untied")

torch.manual_seed(17)

TEXT_HIDDEN = 32
VOCAB = 256

thinker = dict(
    audio_config=dict(
        num_mel_bins=128,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=32,
        d_model=16,
        n_window=8,
        output_dim=TEXT_HIDDEN,
        max_source_positions=1500,
    ),
    vision_config=dict(
        depth=1,
        hidden_size=16,
        hidden_act="silu",
        intermediate_size=32,
        num_heads=2,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        out_hidden_size=TEXT_HIDDEN,
        fullatt_block_indexes=[0],
    ),
    # No `tie_word_embeddings` here: the text config keeps its default (true).
    text_config=dict(
        vocab_size=VOCAB,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
    ),
    audio_token_index=240,
    image_token_index=241,
    video_token_index=242,
    audio_start_token_id=243,
    audio_end_token_id=244,
    vision_start_token_id=245,
    vision_end_token_id=246,
    user_token_id=247,
    tie_word_embeddings=False,
)
config = Qwen2_5OmniConfig(thinker_config=thinker, enable_audio_output=False)
config.thinker_config._attn_implementation = "eager"
config.thinker_config.text_config._attn_implementation = "eager"
model = Qwen2_5OmniForConditionalGeneration(config).eval().float()
with torch.no_grad():
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 0.08)
        elif "norm" in name or "ln_" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        else:
            p.normal_(0.0, 0.05)
model.save_pretrained(MODEL_DIR, safe_serialization=True)

# The saved directory has the shape this fixture is about.
with open(os.path.join(MODEL_DIR, "config.json")) as f:
    saved = json.load(f)
assert saved["thinker_config"]["tie_word_embeddings"] is False, saved["thinker_config"]
assert saved["thinker_config"]["text_config"]["tie_word_embeddings"] is True
with safe_open(os.path.join(MODEL_DIR, "model.safetensors"), "pt") as f:
    names = set(f.keys())
    assert "thinker.lm_head.weight" in names and "thinker.model.embed_tokens.weight" in names, sorted(names)
    assert not torch.equal(f.get_tensor("thinker.lm_head.weight"), f.get_tensor("thinker.model.embed_tokens.weight"))

# The class's own `from_pretrained` also wants the talker's speaker file (`spk_dict.pt`); the
# weights load through the base implementation, the same path without that step.
loaded = (
    super(Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniForConditionalGeneration)
    .from_pretrained(MODEL_DIR, attn_implementation="eager")
    .eval()
    .float()
)
head = loaded.thinker.lm_head.weight
embed = loaded.thinker.get_input_embeddings().weight
assert head.data_ptr() != embed.data_ptr() and not torch.equal(head, embed), "transformers tied the head"

prompts = {
    "a": [11, 12, 13, 14, 15, 100, 7, 8, 200, 9, 33, 34],
    "b": [1, 2, 3, 250, 99, 5],
}
out = {}
for name, ids in prompts.items():
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = loaded.thinker(input_ids=x, attention_mask=torch.ones_like(x)).logits[0]
        # With the embeddings as the head the logits would be far from these.
        tied = loaded.thinker.model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state[0] @ embed.T
    assert (tied - logits).abs().max() > 0.1 * logits.abs().max()
    out[f"ids_{name}"] = x[0].float().contiguous()
    out[f"logits_{name}"] = logits.contiguous()
save_file(out, os.path.join(OUT, "omni_untied.safetensors"))

print(json.dumps({"dir": MODEL_DIR, "tensors": len(names),
                  "bytes": os.path.getsize(os.path.join(MODEL_DIR, "model.safetensors"))}))
