"""Reference fixture for a PEFT LoRA adapter on a Qwen2.5-Omni thinker, towers included
(models/thinker/tests/lora.rs, issue 16).

A PEFT adapter on the tiny thinker tests/reference/omni_tiny (see gen_omni.py) with listed
targets that PEFT matches in the decoder and in both towers, as it does on a real thinker:
`q_proj` and `v_proj` (decoder and audio attention), `o_proj` (decoder), `down_proj` (decoder
and vision MLP), `fc1` (audio MLP), `q` (vision attention) and `mlp.0` (the vision merger).
r 4, lora_alpha 8, lora_B drawn from N(0, 0.2^2) so that it matters; saved with
`PeftModel.save_pretrained` to tests/reference/lora_omni/ (transformers 5 names its modules
`model.language_model.*`, `model.audio_tower.*`, `model.visual.*`, and PEFT saves those).

A second adapter, tests/reference/lora_omni_all/, is PEFT's `target_modules="all-linear"`,
which PEFT resolves to the shortest distinguishing names of every linear layer but the head
(`audio_tower.proj`, `attn.proj`, `mlp.0`, …: 57 modules on this thinker) and saves resolved.

tests/reference/lora_omni_ref.safetensors, for prompt `a` of gen_omni.py (audio + image +
video), in f32 with eager attention, each adapter reloaded from its saved files:

* `logits_a` [75, 256]: the thinker's logits with lora_omni;
* `decoder_only_logits_a`: the same with the towers' adapters switched off (their lora_B
  zeroed), so a loader that skips the towers fails the first check and passes this one;
* `all.logits_a`: the logits with lora_omni_all.

If tests/reference/lora_omni_saved_by_rust/ exists (written by the Rust test
`writes_the_rust_saved_thinker_adapter_fixture` in models/thinker/tests/lora.rs: the decoder
part of lora_omni saved as training saves a thinker's adapters, its config a pattern naming
the decoder's projections), PEFT loads it with no missing tensor, puts adapters on the
decoder only, and computes `decoder_only_logits_a` from it.

The generator asserts that its inputs, rebuilt from omni_audio/omni_vision/omni_thinker
.safetensors, give omni_thinker's `logits_a` without the adapter (so the fixture shares
gen_omni.py's prompt), and that the adapter and its tower part each move the logits.

Run from the repository root with a Python that has torch, transformers, peft and safetensors
(tests/reference/README.md: how to make one): python3 tests/reference/gen_omni_lora.py
"""

import os
import shutil

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5OmniThinkerForConditionalGeneration

HERE = os.path.dirname(os.path.abspath(__file__))
BASE = os.path.join(HERE, "omni_tiny")
OUT_DIR = os.path.join(HERE, "lora_omni")
OUT_ALL = os.path.join(HERE, "lora_omni_all")
RUST_SAVED = os.path.join(HERE, "lora_omni_saved_by_rust")
OUT_REF = os.path.join(HERE, "lora_omni_ref.safetensors")
BASE_NAME = "tests/reference/omni_tiny"
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj", "fc1", "q", "mlp.0"]
B_STD = 0.2
TOWERS = ("audio_tower.", "visual.")


def load_base():
    return Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
        BASE, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def prompt_a_inputs():
    """gen_omni.py's prompt `a` from its committed fixtures."""
    audio = load_file(os.path.join(HERE, "omni_audio.safetensors"))
    vision = load_file(os.path.join(HERE, "omni_vision.safetensors"))
    thinker = load_file(os.path.join(HERE, "omni_thinker.safetensors"))
    mask = audio["attention_mask"].long()
    mel = audio["mel_pad_value"].repeat(1, mask.numel())
    mel[:, : audio["mel_head"].shape[1]] = audio["mel_head"]
    ids = thinker["ids_a"].long()[None]
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        input_features=mel[None],
        feature_attention_mask=mask[None],
        pixel_values=vision["image_pixel_values"],
        image_grid_thw=vision["image_grid_thw"].long(),
        pixel_values_videos=vision["video_pixel_values"],
        video_grid_thw=vision["video_grid_thw"].long(),
        video_second_per_grid=torch.tensor([1.0]),
        use_audio_in_video=False,
    )
    return kwargs, thinker["logits_a"]


def make_adapter(targets, out_dir):
    """A PEFT LoRA (r 4, alpha 8) on the tiny thinker with lora_B from N(0, B_STD^2),
    saved to `out_dir` as PEFT saves it; returns it reloaded from those files."""
    torch.manual_seed(0)
    model = get_peft_model(
        load_base(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
    )
    g = torch.Generator().manual_seed(1000)
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
    reloaded = PeftModel.from_pretrained(load_base(), out_dir).eval()
    for (name, a), (_, b) in zip(model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(a, b), name
    return reloaded


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def main():
    kwargs, base_ref = prompt_a_inputs()
    with torch.no_grad():
        base_logits = load_base()(**kwargs).logits[0]
    err = rel(base_logits, base_ref)
    assert err < 1e-5, f"rebuilt prompt a gives gen_omni's logits only to {err}"

    reloaded = make_adapter(TARGETS, OUT_DIR)
    lora = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    tower = [n for n in lora if any(f".{t}" in n for t in TOWERS)]
    assert any("audio_tower" in n for n in tower) and any("visual" in n for n in tower), tower
    assert any("merger.mlp.0" in n for n in tower), tower
    with torch.no_grad():
        logits = reloaded(**kwargs).logits[0]
        for n in tower:
            if "lora_B" in n:
                lora[n].zero_()
        decoder_only = reloaded(**kwargs).logits[0]
    moved, towers = rel(logits, base_logits), rel(logits, decoder_only)
    assert moved > 1e-2 and towers > 1e-2, (moved, towers)
    print(f"adapter moves the logits by {moved:.3g} (relative), its tower part by {towers:.3g}")
    print(f"{len(lora) // 2} adapted modules, {len(tower) // 2} of them in the towers")

    everything = make_adapter("all-linear", OUT_ALL)
    n_all = sum(1 for n, _ in everything.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        all_logits = everything(**kwargs).logits[0]
    print(f"all-linear: {n_all} adapted modules, logits moved by {rel(all_logits, base_logits):.3g}")
    save_file(
        {
            "logits_a": logits.contiguous(),
            "decoder_only_logits_a": decoder_only.contiguous(),
            "all.logits_a": all_logits.contiguous(),
        },
        OUT_REF,
    )
    if os.path.isdir(RUST_SAVED):
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rust = PeftModel.from_pretrained(load_base(), RUST_SAVED).eval()
        missing = [w for w in caught if "missing adapter keys" in str(w.message)]
        assert not missing, missing[0].message
        adapted = [n for n, _ in rust.named_parameters() if "lora_A" in n]
        assert adapted and all(".language_model." in n for n in adapted), adapted
        with torch.no_grad():
            err = rel(rust(**kwargs).logits[0], decoder_only)
        assert err < 1e-6, err
        print(f"{os.path.basename(RUST_SAVED)}: PEFT loads it onto {len(adapted)} decoder "
              f"modules only, no missing tensor; logits {err:.2g} from the decoder part's")
    else:
        print(f"{os.path.basename(RUST_SAVED)}: absent; run the Rust test, then this script again")
    total = os.path.getsize(OUT_REF) + sum(
        os.path.getsize(os.path.join(d, f)) for d in (OUT_DIR, OUT_ALL) for f in os.listdir(d)
    )
    print(f"fixtures: {total} bytes")
    assert total < 600_000, total


if __name__ == "__main__":
    main()
