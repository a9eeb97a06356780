"""The side-by-side performance suite: this project against PyTorch on the same Qwen2 weights,
same thread count, one table of ratios (ours / PyTorch; above 1 is ours faster or leaner).

Workloads, for each model shape × vocabulary (random-init `Qwen2ForCausalLM` built and saved
by transformers, loaded by both sides):
1. one OPSD train step (train_step.py): G = 4 rollouts of 32 tokens from a 64-token prompt,
   the teacher on the prompt + 64 privileged tokens under no-grad, generalized JSD β = 0.5
   over the full vocabulary, backward, AdamW; response tokens per second, and each side's
   model FLOP/s (`omniopsd_benches::flops`) as a share of the f32 matrix-product peak
   measured here (MFU);
2. greedy decode with the KV cache (decode.py's timing: after the prefill and first token),
   batch 1 and 8, a 128-token prompt, 64 new tokens; tokens per second over all sequences,
   and the greedy prefix both sides agree on (first sequence);
3. the distillation loss forward + backward (loss.py) for each hidden size at vocabulary
   151,936 and 2,048 response rows: ours chunked (128 rows) against PyTorch's naive full
   logits; peak resident memory and time, loss and gradients compared.

Shapes: `h256` = hidden 256, 4 layers, 4 heads, 2 KV heads, intermediate 1,024, untied head;
`h1024` = hidden 1,024, 8 layers, 8 heads, 2 KV heads, intermediate 2,816, tied head (the
Qwen2.5-0.5B layout, fewer layers). PyTorch runs eager mode with its default attention
(SDPA), f32; ours the Rust release build on `--backend` (Flex by default; NdArray available).
Each number is the median over `--repeats` after a warm-up. `torch.set_num_threads` and
`RAYON_NUM_THREADS` both get `--threads`.

Allocator: our binaries keep freed large buffers in the heap (glibc `M_MMAP_MAX = 0`,
`M_TRIM_THRESHOLD` 2 GiB; `omniopsd_backends::keep_freed_memory`), which saves every large
intermediate from being page-faulted in again. PyTorch gains from the same setting, so by
default (`--torch-allocator same`) the script re-runs itself with the equivalent
`MALLOC_MMAP_MAX_` / `MALLOC_TRIM_THRESHOLD_` environment and both sides allocate alike;
`--torch-allocator default` measures PyTorch with glibc's defaults instead, and
`--our-allocator default` ours (`OMNIOPSD_KEEP_FREED=off`). Workload 3's
PyTorch side always runs with glibc's defaults (its 18 GiB naive loss does not fit in 23 GiB
with heap retention).

A/B switches for our side, each a second run of the same suite: `--rows-kernels off` hands
every few-row product back to the backend's matmul (`OMNIOPSD_ROWS=off`, see
`omniopsd_backends::rows`), `--our-allocator default` as above.

Python: `--python`, else $OMNIOPSD_PYTHON, else the one running this script; it needs torch,
transformers and safetensors (decode.py's `ensure_python`; `--help` says how to make a virtual
environment with them). CI does not run this.

Run from the repository root: python3 benches/compare/compare.py [--threads 1] [--repeats 3]
    [--shapes h256,h1024] [--vocabs 151936,512] [--workloads 1,2,3] [--json results.json]
    [--rows-kernels on|off] [--our-allocator keep-freed|default] [--python PYTHON]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode  # noqa: E402
import loss  # noqa: E402
import train_step  # noqa: E402

SHAPES = {
    "h256": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "h1024": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
}
DECODE_PROMPT, DECODE_NEW, LOSS_ROWS, LOSS_VOCAB, LOSS_CHUNK = 128, 64, 2048, 151936, 128


def matmul_peak(args, flags):
    """The f32 matrix-product rate (FLOP/s) of `--threads` threads here: the faster of ours
    (the `peak` example, 1,024³ and 2,048³) and PyTorch's (`torch.mm` at 2,048³), the
    denominator of the train step's MFU."""
    import time

    import torch

    ours = max(r["tflops"] for r in decode.run_example(
        "peak", ["--sizes", "1024,2048", "--repeats", "3"], args.threads, flags)) * 1e12
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(3):
        torch.mm(a, b)
    theirs = 3 * 2 * 2048**3 / (time.perf_counter() - start)
    return max(ours, theirs)


def train_row(model, model_dir, vocab, args, flags, peak):
    """(ours, PyTorch) response tokens/s, and a note with both sides' model FLOP/s and MFU
    (the same FLOP count, `omniopsd_benches::flops`, for both)."""
    report = train_step.rust_steps(model_dir, args.repeats + 1, args.threads, flags)
    ours = statistics.median(report["step_seconds"][1:])
    theirs = statistics.median(train_step.torch_steps(model, vocab, args.repeats + 1)[1:])
    tokens = train_step.GROUP * train_step.NEW
    flops = report["step_flops"]["total"]
    note = (f"model {flops / ours / 1e9:.1f} vs {flops / theirs / 1e9:.1f} GFLOP/s = MFU "
            f"{100 * flops / ours / peak:.0f}% vs {100 * flops / theirs / peak:.0f}% of "
            f"{peak / 1e9:.0f} GFLOP/s (f32 matmul peak)")
    return tokens / ours, tokens / theirs, note


def decode_rows(model_dir, vocab, args, flags):
    import torch
    from transformers import Qwen2ForCausalLM

    # Reloaded: the train step has moved the in-memory weights away from the saved ones.
    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = train_step.ids(1000, DECODE_PROMPT, vocab)
    prompts = os.path.join(model_dir, "decode-prompts.json")
    with open(prompts, "w") as f:
        json.dump([{"context": DECODE_PROMPT, "ids": ids}], f)
    model.eval()
    rows = []
    for batch in (1, 8):
        rust = decode.rust_runs(model_dir, prompts, DECODE_NEW, args.repeats, args.threads,
                                extra=("--batch", str(batch)), flags=flags)[DECODE_PROMPT]
        ours = statistics.median(batch * (DECODE_NEW - 1) / s for s in rust["decode_seconds"])
        rates, t_ids = decode.torch_runs(model, ids, DECODE_NEW, args.repeats, batch)
        agree = next((i for i, (a, b) in enumerate(zip(rust["ids"], t_ids)) if a != b),
                     len(t_ids))
        rows.append((batch, ours, statistics.median(rates), agree))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog=decode.VENV_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", choices=("flex", "ndarray"), default="flex")
    parser.add_argument("--shapes", default="h256,h1024")
    parser.add_argument("--vocabs", default="151936,512")
    parser.add_argument("--workloads", default="1,2,3")
    parser.add_argument("--json", help="also write every measurement here")
    parser.add_argument("--torch-allocator", choices=("same", "default"), default="same",
                        help="PyTorch's glibc allocator settings: as ours, or glibc's defaults")
    parser.add_argument("--our-allocator", choices=("keep-freed", "default"),
                        default="keep-freed",
                        help="ours: keep freed buffers in the heap, or glibc's defaults")
    parser.add_argument("--rows-kernels", choices=("on", "off"), default="on",
                        help="ours: the few-row AVX-512 products (omniopsd_backends::rows)")
    decode.add_python_arg(parser)
    args = parser.parse_args()
    decode.ensure_python(args.python)
    import torch

    # Inherited by every Rust example this script runs.
    if args.rows_kernels == "off":
        os.environ["OMNIOPSD_ROWS"] = "off"
    if args.our_allocator == "default":
        os.environ["OMNIOPSD_KEEP_FREED"] = "off"

    if args.torch_allocator == "same" and os.environ.get("MALLOC_MMAP_MAX_") != "0":
        env = dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2**31 - 1))
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    shapes = args.shapes.split(",")
    if unknown := [s for s in shapes if s not in SHAPES]:
        parser.error(f"unknown shape(s) {unknown}; known: {', '.join(SHAPES)}")
    vocabs = [int(v) for v in args.vocabs.split(",")]
    workloads = {int(w) for w in args.workloads.split(",")}
    flags = ("--features", "flex") if args.backend == "flex" else ()
    torch.set_num_threads(args.threads)

    # Workload 3 first, while this process is small: with the allocator settings above, the
    # heap that workloads 1-2 free stays resident here, and PyTorch's naive H=1,024 loss
    # (18 GiB) no longer fits beside it in 23 GiB.
    loss_table = []
    loss_rows = []
    if 3 in workloads:
        for shape in shapes:
            h = SHAPES[shape]["hidden_size"]
            r = loss.compare(LOSS_ROWS, h, LOSS_VOCAB, LOSS_CHUNK, args.repeats, args.threads,
                             flags)
            loss_rows.append(r)
            name = f"{LOSS_ROWS} rows × H={h} × V={LOSS_VOCAB}"
            note = f"loss rel. diff {r['loss_rel']:.1e}, grad {r['grad_rel']:.1e}"
            loss_table.append(("3 loss fwd+bwd, time", name, "s", 1 / r["ours_s"],
                               1 / r["torch_s"], f"ours {r['ours_s']:.2f} s, PyTorch "
                               f"{r['torch_s']:.2f} s; " + note))
            loss_table.append(("3 loss fwd+bwd, peak memory", name, "GiB",
                               1 / r["ours_peak"], 1 / r["torch_peak"],
                               f"ours {r['ours_peak'] / 2**30:.3f} GiB = "
                               f"{100 * r['ours_peak'] / r['torch_peak']:.1f}% of PyTorch's "
                               f"{r['torch_peak'] / 2**30:.3f} GiB"))
            print(f"loss {name}: {note}", flush=True)

    table = []  # (workload, model, unit, ours, torch, note)
    peak = matmul_peak(args, flags) if 1 in workloads else None
    for shape in shapes:
        for vocab in vocabs:
            name = f"{shape} V={vocab}"
            if not workloads & {1, 2}:
                continue
            with tempfile.TemporaryDirectory(prefix="omniopsd-compare-") as tmp:
                model = train_step.build(tmp, vocab, SHAPES[shape])
                if 1 in workloads:
                    ours, theirs, note = train_row(model, tmp, vocab, args, flags, peak)
                    table.append(("1 OPSD train step", name, "tok/s", ours, theirs, note))
                    print(f"train step {name}: ours {ours:.1f} tok/s, PyTorch {theirs:.1f}",
                          flush=True)
                if 2 in workloads:
                    for batch, ours, theirs, agree in decode_rows(tmp, vocab, args, flags):
                        table.append((f"2 decode, batch {batch}", name, "tok/s", ours, theirs,
                                      f"greedy {agree}/{DECODE_NEW} agree"))
                        print(f"decode batch {batch} {name}: ours {ours:.1f} tok/s, "
                              f"PyTorch {theirs:.1f}", flush=True)
                del model
    table += loss_table

    print(f"\nours: Rust release, {args.backend} backend; PyTorch {torch.__version__} eager f32, "
          f"{args.torch_allocator} allocator settings; {args.threads} thread(s) each; "
          f"{os.cpu_count()} CPU(s); median of {args.repeats}\n")
    print("| workload | model | ours | PyTorch | ours/PyTorch | notes |")
    print("|---|---|---:|---:|---:|---|")
    for workload, name, unit, ours, theirs, note in table:
        if unit in ("s", "GiB"):
            # Stored as reciprocals so the ratio reads "higher is better" like the others.
            o, t = (1 / ours, 1 / theirs)
            o, t = (o / 2**30, t / 2**30) if unit == "GiB" else (o, t)
            print(f"| {workload} | {name} | {o:.3f} {unit} | {t:.3f} {unit} | "
                  f"{ours / theirs:.2f} | {note} |")
        else:
            print(f"| {workload} | {name} | {ours:.1f} {unit} | {theirs:.1f} {unit} | "
                  f"{ours / theirs:.2f} | {note} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": args.backend, "threads": args.threads,
                       "torch_allocator": args.torch_allocator,
                       "torch": torch.__version__, "repeats": args.repeats,
                       "rows": [dict(zip(("workload", "model", "unit", "ours", "torch", "note"),
                                         row)) for row in table],
                       "loss": loss_rows}, f, indent=1)


if __name__ == "__main__":
    main()
