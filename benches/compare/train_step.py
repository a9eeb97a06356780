"""One OPSD training step, this project vs PyTorch, on the same Qwen2 weights.

For each configuration (hidden 256, 4 layers, 4 heads, 2 KV heads, intermediate 1,024;
vocabulary 32,000 and 512) the script

1. builds a random-init `Qwen2ForCausalLM` with transformers and saves it;
2. times PyTorch doing a faithful OPSD step: `generate` G = 4 samples of exactly 32 tokens
   from a 64-token student prompt (temperature 1), the teacher (same weights, `no_grad`) on the
   privileged prompt (student prompt + 64 tokens) followed by the sampled response, the
   student forward on prompt + response, TRL's generalized JSD (β = 0.5) over the full
   vocabulary on the response positions, `backward`, `torch.optim.AdamW.step`;
3. times the same step in Rust (`cargo run --release -p omniopsd-benches --example
   train_step`: the core's `OpsdTrainer` on Burn's NdArray backend, which is built here
   without its multi-threads feature, so both sides use one thread);
4. prints response tokens per second (G·32 per step; median over the steps after a warm-up)
   and the ratio ours / PyTorch.

Python: as decode.py (`--python`, else $OMNIOPSD_PYTHON, else the one running this script).
Run from the repository root: python3 benches/compare/train_step.py [--steps 4] [--python PYTHON]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import VENV_HELP, add_python_arg, ensure_python, run_example  # noqa: E402

PROMPT, PRIVILEGED, GROUP, NEW = 64, 64, 4, 32
# Cargo flags of the Rust side's backend (`--backend flex` adds `--features flex`).
BACKEND_FLAGS = ()


def ids(start, length, vocab):
    """The Rust example's deterministic ids."""
    return [1 + (i * 7919) % (vocab - 1) for i in range(start, start + length)]


def build(out_dir, vocab, shape=None, dtype=None):
    """A random-init `Qwen2ForCausalLM` saved to `out_dir`: hidden 256, 4 layers, 4 heads,
    2 KV heads, untied, unless `shape` (Qwen2Config keywords) says otherwise; in `dtype`
    (a torch dtype, default f32) from the save on."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = shape or dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2,
                          tie_word_embeddings=False)
    config = Qwen2Config(**dict(shape, vocab_size=vocab))
    model = Qwen2ForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out_dir)
    return model


def generalized_jsd(student_logits, teacher_logits, beta=0.5):
    """TRL's `GKDTrainer.generalized_jsd_loss` (temperature 1, mean over tokens)."""
    import torch
    import torch.nn.functional as F

    s = F.log_softmax(student_logits, dim=-1)
    t = F.log_softmax(teacher_logits, dim=-1)
    m = torch.logsumexp(torch.stack([s + torch.log(torch.tensor(1 - beta)),
                                     t + torch.log(torch.tensor(beta))]), dim=0)
    kl_t = F.kl_div(m, t, reduction="none", log_target=True)
    kl_s = F.kl_div(m, s, reduction="none", log_target=True)
    return (beta * kl_t + (1 - beta) * kl_s).sum(-1).mean()


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def with_lora(model, rank):
    """`model` wrapped by PEFT with rank-`rank` adapters (alpha 2·rank, no dropout) on all seven
    projections and the base frozen: the Rust example's `--lora`."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                        target_modules=LORA_TARGETS)
    return get_peft_model(model, config)


def torch_steps(model, vocab, steps, shape=None, device="cpu", autocast=None):
    """Seconds of each of `steps` PyTorch steps; `shape` = (prompt, privileged, group, new),
    default the module's; on a CUDA `device` each step ends with a synchronize. AdamW takes
    the parameters that need gradients (all of them, or the adapters under PEFT). `autocast`
    (a torch dtype) runs the forward passes under `torch.autocast` in it, the mixed precision
    of an f32 model; the loss is taken on f32 logits."""
    import contextlib

    import torch

    def mixed():
        if autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device, dtype=autocast)

    prompt, privileged, group, new = shape or (PROMPT, PRIVILEGED, GROUP, NEW)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    student = torch.tensor([ids(0, prompt, vocab)] * group, device=device)
    teacher = torch.tensor([ids(0, prompt, vocab) + ids(prompt, privileged, vocab)] * group,
                           device=device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.no_grad(), mixed():
            out = model.generate(student, attention_mask=torch.ones_like(student), do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                                 min_new_tokens=new, pad_token_id=0)
            response = out[:, prompt:]
            t_logits = model(torch.cat([teacher, response], 1)).logits[:, prompt + privileged - 1:-1]
        with mixed():
            s_logits = model(torch.cat([student, response], 1)).logits[:, prompt - 1:-1]
        loss = generalized_jsd(s_logits.float(), t_logits.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def rust_steps(model_dir, steps, threads, flags=None):
    """The Rust example's report of `steps` steps: `step_seconds` of each, `step_flops` (model
    FLOPs by pass) and more (`flags`: cargo flags, default `--backend`'s)."""
    flags = BACKEND_FLAGS if flags is None else flags
    args = ["--model", model_dir, "--steps", str(steps), "--prompt", str(PROMPT),
            "--privileged", str(PRIVILEGED), "--group", str(GROUP), "--new", str(NEW)]
    return run_example("train_step", args, threads, flags)[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=VENV_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", choices=("ndarray", "flex"), default="ndarray",
                        help="Burn CPU backend of the Rust side")
    add_python_arg(parser)
    args = parser.parse_args()
    ensure_python(args.python)
    import torch

    global BACKEND_FLAGS
    BACKEND_FLAGS = ("--features", "flex") if args.backend == "flex" else ()
    torch.set_num_threads(args.threads)
    tokens = GROUP * NEW
    rows = []
    for vocab in (32000, 512):
        with tempfile.TemporaryDirectory(prefix="omniopsd-step-") as tmp:
            model = build(tmp, vocab)
            ours = rust_steps(tmp, args.steps + 1, args.threads)["step_seconds"][1:]
            theirs = torch_steps(model, vocab, args.steps + 1)[1:]
        rows.append((vocab, tokens / statistics.median(ours), tokens / statistics.median(theirs)))
    print(f"\nours on {args.backend}; torch {torch.__version__}, {args.threads} thread(s); G={GROUP} x {NEW} new tokens, "
          f"prompt {PROMPT} (+{PRIVILEGED} privileged); median of {args.steps} steps after a warm-up")
    print("| vocab | ours tok/s | PyTorch tok/s | ours/PyTorch |")
    print("|---:|---:|---:|---:|")
    for vocab, o, t in rows:
        print(f"| {vocab} | {o:.1f} | {t:.1f} | {o / t:.2f} |")


if __name__ == "__main__":
    main()
