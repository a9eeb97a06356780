"""Reference fixtures for LoRA adapters in PEFT's format (models/nn, models/decoder, issue 16).

Two adapters are made with PEFT on the tiny checkpoint tests/reference/qwen2_tiny (see
gen_qwen2.py), each with a non-zero `lora_B` (PEFT initialises B to zero, which would make every
test pass with the adapter ignored), and saved with `PeftModel.save_pretrained` as PEFT writes
them (adapter_config.json + adapter_model.safetensors; the README model card is dropped):

* tests/reference/lora_qv/: r 4, lora_alpha 8 (scaling 2), lora_dropout 0.05, targets q_proj and
  v_proj;
* tests/reference/lora_all_rslora/: r 4, lora_alpha 8, use_rslora (scaling 8 / sqrt(4) = 4),
  lora_dropout 0, targets all seven projections;
* tests/reference/lora_pattern/: PEFT's finer placement with a pattern: `target_modules` a
  regular expression with a lookahead (q/o/up/down projections outside layer 2), an excluded
  module, and `rank_pattern` / `alpha_pattern`;
* tests/reference/lora_layers/: listed targets with a dotted suffix (`self_attn.k_proj`) on
  layers 0 and 2 only (`layers_to_transform`, `layers_pattern`), rsLoRA with a per-module rank.

tests/reference/lora_ref.safetensors holds, for each adapter (prefix `qv.` / `all.`), computed
in f32 with eager attention by transformers + PEFT, adapter reloaded from its saved files with
`PeftModel.from_pretrained`, in eval mode (dropout off):

* `score.prompt_ids` [P], `score.response_ids` [R], `score.logprobs` [R]: per-token
  `log_softmax(logits[P - 1 + r])[response[r]]`;
* `base.score.logprobs` [R] (no prefix): the same with no adapter, and the generator asserts
  each adapter moves them by more than 1e-2, so a loader that ignores the adapter fails;
* `gen{0,1}.prompt_ids`, `gen{0,1}` [32]: greedy `generate` (do_sample=False, exactly 32 new
  tokens), equal to a plain argmax loop, and `gen{0,1}.min_gap` [1], the smallest top-1 minus
  top-2 logit gap along the path;
* `all.` only: `grad.<key>` for every tensor `<key>` of adapter_model.safetensors (PEFT's names,
  e.g. `grad.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`): the gradient of
  `sum_r score.logprobs[r]` with respect to it (PyTorch autograd; base weights frozen, as PEFT
  freezes them).

Ids are stored as f32 so one reader serves all.

If tests/reference/lora_saved_by_rust/ exists (written by the Rust test
`writes_the_rust_saved_adapter_fixture` in models/decoder/tests/lora.rs, a re-save of
lora_all_rslora by `Qwen2Model::save_adapter`), it is loaded with `PeftModel.from_pretrained`
and every LoRA parameter must equal lora_all_rslora's exactly, and the log-probs must match:
proof that PEFT reads what the Rust side writes.

Run from the repository root with a Python that has torch, transformers, peft and safetensors
(tests/reference/README.md: how to make one): python3 tests/reference/gen_lora.py
"""

import json
import os
import shutil

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoTokenizer, Qwen2ForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
BASE = os.path.join(HERE, "qwen2_tiny")
OUT_REF = os.path.join(HERE, "lora_ref.safetensors")
RUST_SAVED = os.path.join(HERE, "lora_saved_by_rust")
# What the saved configs name as their base: the repository path, not this machine's.
BASE_NAME = "tests/reference/qwen2_tiny"

NEW_TOKENS = 32
MIN_GAP = 2e-3
B_STD = 0.2

ADAPTERS = [
    (
        "qv",
        "lora_qv",
        dict(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]),
    ),
    (
        "all",
        "lora_all_rslora",
        dict(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            use_rslora=True,
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        ),
    ),
    (
        "pattern",
        "lora_pattern",
        dict(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=r"^(?!.*layers\.2\.).*\.(?:q_proj|o_proj|up_proj|down_proj)$",
            exclude_modules=["model.layers.0.mlp.up_proj"],
            # No two keys match one module: PEFT writes the config with sorted keys, so the
            # order a trainer gave them (the first match decides) does not survive a save.
            rank_pattern={"o_proj": 2, r"layers\.1\.mlp\.up_proj": 6, r"mlp\.down_proj": 3},
            alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3, "down_proj": 20},
        ),
    ),
    (
        "layers",
        "lora_layers",
        dict(
            r=4,
            lora_alpha=16,
            lora_dropout=0.0,
            use_rslora=True,
            target_modules=["self_attn.k_proj", "v_proj", "gate_proj"],
            layers_to_transform=[0, 2],
            layers_pattern="layers",
            rank_pattern={"gate_proj": 8},
        ),
    ),
]

PROMPT0 = "The woman looked happy."
PROMPT1_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Oh no! What emotion is this?"},
]
SCORE_PROMPT_MESSAGES = [{"role": "user", "content": "Describe the emotion of the speaker."}]
SCORE_RESPONSE = "The voice is soft and shaking: the emotion is sadness.<|im_end|>"


def load_base():
    return Qwen2ForCausalLM.from_pretrained(
        BASE, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def chat_prompt(tok, messages):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def response_logprobs(model, prompt, response):
    logits = model(torch.tensor([prompt + response]), use_cache=False).logits[0]
    p = len(prompt)
    logp = torch.log_softmax(logits[p - 1 : p - 1 + len(response)], dim=-1)
    return logp[torch.arange(len(response)), torch.tensor(response)]


def greedy(model, ids):
    """Greedy NEW_TOKENS tokens by generate and by an argmax loop (asserted equal), with the
    smallest top-1/top-2 logit gap along the path."""
    x = torch.tensor([ids])
    out = model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        pad_token_id=0,
    )[0, len(ids):].tolist()
    seq = list(ids)
    gaps = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
            top = torch.topk(logits, 2).values
            gaps.append(float(top[0] - top[1]))
            seq.append(int(torch.argmax(logits)))
    assert seq[len(ids):] == out, "generate differs from a plain argmax loop"
    return out, min(gaps)


def make_adapter(kwargs, seed, out_dir):
    """A PEFT LoRA on a fresh base with lora_B drawn from N(0, B_STD²) (seeded), saved to
    `out_dir` as PEFT saves it; returns the adapter reloaded from those files."""
    torch.manual_seed(seed)
    model = get_peft_model(load_base(), LoraConfig(task_type="CAUSAL_LM", **kwargs))
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(B_STD * torch.randn(p.shape, generator=g))
    model.peft_config["default"].base_model_name_or_path = BASE_NAME
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir)
    readme = os.path.join(out_dir, "README.md")
    if os.path.isfile(readme):
        os.remove(readme)
    reloaded = PeftModel.from_pretrained(load_base(), out_dir, is_trainable=True).eval()
    for (name, a), (_, b) in zip(model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(a, b), name
    return reloaded


def lora_params(model):
    """LoRA parameters under the names adapter_model.safetensors gives them."""
    return {
        name.replace(".default", ""): p for name, p in model.named_parameters() if "lora_" in name
    }


def main():
    tok = AutoTokenizer.from_pretrained(BASE)
    prompts = {
        "gen0": tok(PROMPT0)["input_ids"],
        "gen1": tok(chat_prompt(tok, PROMPT1_MESSAGES))["input_ids"],
    }
    sp = tok(chat_prompt(tok, SCORE_PROMPT_MESSAGES))["input_ids"]
    sr = tok(SCORE_RESPONSE)["input_ids"]
    out = {}
    with torch.no_grad():
        base_logp = response_logprobs(load_base(), sp, sr)
    out["base.score.logprobs"] = base_logp

    models = {}
    for key, dirname, kwargs in ADAPTERS:
        out_dir = os.path.join(HERE, dirname)
        for seed in range(100):
            model = make_adapter(kwargs, seed, out_dir)
            paths = {name: greedy(model, ids) for name, ids in prompts.items()}
            gap = min(g for _, g in paths.values())
            if gap >= MIN_GAP:
                break
        else:
            raise RuntimeError(f"{key}: no seed below 100 gives a clear greedy path")
        print(f"{dirname}: seed {seed}, min greedy gap {gap:.4g}")
        models[key] = model
        for name, ids in prompts.items():
            tokens, g = paths[name]
            out[f"{key}.{name}.prompt_ids"] = torch.tensor(ids, dtype=torch.float32)
            out[f"{key}.{name}"] = torch.tensor(tokens, dtype=torch.float32)
            out[f"{key}.{name}.min_gap"] = torch.tensor([g], dtype=torch.float32)

        for name, p in model.named_parameters():
            assert p.requires_grad == ("lora_" in name), name
        model.zero_grad()
        logp = response_logprobs(model, sp, sr)
        moved = float((logp.detach() - base_logp).abs().max())
        assert moved > 1e-2, f"{key}: the adapter moves the log-probs by only {moved}"
        print(f"{key}: adapter moves the response log-probs by up to {moved:.3g}")
        out[f"{key}.score.prompt_ids"] = torch.tensor(sp, dtype=torch.float32)
        out[f"{key}.score.response_ids"] = torch.tensor(sr, dtype=torch.float32)
        out[f"{key}.score.logprobs"] = logp.detach()
        if key == "all":
            logp.sum().backward()
            for name, p in lora_params(model).items():
                assert p.grad is not None and float(p.grad.abs().max()) > 0, name
                out[f"{key}.grad.{name}"] = p.grad.detach().clone()
            for name, p in model.named_parameters():
                assert "lora_" in name or p.grad is None, f"{name} got a gradient"

    save_file({k: v.float().contiguous() for k, v in sorted(out.items())}, OUT_REF)

    if os.path.isdir(RUST_SAVED):
        with open(os.path.join(RUST_SAVED, "adapter_config.json")) as f:
            config = json.load(f)
        assert config["peft_type"] == "LORA" and config["use_rslora"], config
        rust = PeftModel.from_pretrained(load_base(), RUST_SAVED).eval()
        want = lora_params(models["all"])
        got = lora_params(rust)
        assert sorted(want) == sorted(got), (sorted(want), sorted(got))
        for name in want:
            assert torch.equal(want[name], got[name]), name
        with torch.no_grad():
            err = float((response_logprobs(rust, sp, sr) - out["all.score.logprobs"]).abs().max())
        assert err == 0.0, err
        print(f"{os.path.basename(RUST_SAVED)}: PEFT loads it; every LoRA tensor equal, log-probs equal")
    else:
        print(f"{os.path.basename(RUST_SAVED)}: absent; run the Rust test, then this script again")

    total = 0
    for root in [HERE] + [os.path.join(HERE, d) for _, d, _ in ADAPTERS] + [RUST_SAVED]:
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if os.path.isfile(path) and (root != HERE or name.startswith("lora")):
                size = os.path.getsize(path)
                total += size
                print(f"{size:>8}  {os.path.relpath(path, HERE)}")
    assert total < 1_000_000, f"LoRA fixtures take {total} bytes"


if __name__ == "__main__":
    main()
