"""Reference for decoding prompts of different lengths in one batch (issue 14, part 4): what
transformers 5 does with a left-padded batch, on the tiny Qwen2 checkpoints that
`gen_qwen2.py` wrote (it must have run first; this script only reads them).

For each checkpoint (prefix `a.` for tests/reference/qwen2_tiny, `b.` for
tests/reference/qwen2_tiny_tied_bf16) and the batch of three prompts (prompt 1 of
qwen2_prompts.json, prompt 0, and the first five ids of prompt 0: 27, 12 and 5 tokens), left-padded
with id 0 to the longest, writes to tests/reference/qwen2_batch_ref.safetensors:

* `{p}ids` [3, T] and `{p}mask` [3, T] (1 = token, 0 = padding), as the tokenizer's
  `padding_side="left"` lays them out;
* `{p}logits` [3, T, V]: one forward of the padded batch with that attention mask and the
  position ids `generate` uses for it (`cumsum(mask) - 1`, padding at 1); only the rows of real
  tokens are meaningful;
* `{p}gen` [3, 64]: greedy `generate` of exactly 64 new tokens for the padded batch
  (`do_sample=False`, `min_new_tokens = max_new_tokens = 64`, KV cache), asserted here to equal
  each prompt's own unpadded `generate`, so a Rust batch must reproduce both;
* `{p}gen.min_gap` [1]: the smallest top-1 minus top-2 logit gap along those greedy paths.

Every tensor is stored as f32 (ids too). All arithmetic is f32 with eager attention (model B's
bf16 weights are upcast exactly, as `gen_qwen2.py` does).

Run from the repository root, with a Python that has torch, transformers and safetensors
(tests/reference/README.md: how to make one): python3 tests/reference/gen_batch_generate.py
"""

import json
import os

import torch
from safetensors.torch import save_file
from transformers import Qwen2ForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = (("a.", "qwen2_tiny"), ("b.", "qwen2_tiny_tied_bf16"))
OUT = os.path.join(HERE, "qwen2_batch_ref.safetensors")
NEW_TOKENS = 64
PAD = 0


def prompts():
    with open(os.path.join(HERE, "qwen2_prompts.json")) as f:
        p = json.load(f)
    return [p["prompt1"]["ids"], p["prompt0"]["ids"], p["prompt0"]["ids"][:5]]


def left_pad(batch):
    width = max(len(ids) for ids in batch)
    ids = [[PAD] * (width - len(x)) + list(x) for x in batch]
    mask = [[0] * (width - len(x)) + [1] * len(x) for x in batch]
    return torch.tensor(ids), torch.tensor(mask)


def greedy(model, ids, mask):
    out = model.generate(
        ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        use_cache=True,
        pad_token_id=PAD,
    )
    return out[:, ids.shape[1]:]


def min_gap(model, batch):
    gaps = []
    with torch.no_grad():
        for ids in batch:
            seq = list(ids)
            for _ in range(NEW_TOKENS):
                logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
                top = torch.topk(logits, 2).values
                gaps.append(float(top[0] - top[1]))
                seq.append(int(torch.argmax(logits)))
    return min(gaps)


def main():
    batch = prompts()
    ids, mask = left_pad(batch)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    tensors = {}
    for prefix, name in MODELS:
        model = Qwen2ForCausalLM.from_pretrained(
            os.path.join(HERE, name), dtype=torch.float32, attn_implementation="eager"
        ).eval()
        with torch.no_grad():
            logits = model(
                ids, attention_mask=mask, position_ids=positions, use_cache=False
            ).logits
        gen = greedy(model, ids, mask)
        for row, prompt in enumerate(batch):
            x = torch.tensor([prompt])
            alone = greedy(model, x, torch.ones_like(x))[0]
            assert torch.equal(alone, gen[row]), f"{name}: row {row} differs from its own generate"
        gap = min_gap(model, batch)
        print(f"{name}: batch of {len(batch)} equals each alone; min greedy gap {gap:.4g}")
        tensors[f"{prefix}ids"] = ids.float()
        tensors[f"{prefix}mask"] = mask.float()
        tensors[f"{prefix}logits"] = logits.float()
        tensors[f"{prefix}gen"] = gen.float()
        tensors[f"{prefix}gen.min_gap"] = torch.tensor([gap], dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, OUT)


if __name__ == "__main__":
    main()
