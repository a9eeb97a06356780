"""Benchmark answers/s: several prompts of different lengths per forward pass
(`omniopsd predict --batch-size`, `Qwen2Model::generate_batch`) against transformers'
`generate` on the same left-padded batches and the same weights, on CPU (issue 14, part 4).

The script
1. builds the random-init `Qwen2ForCausalLM` of `decode.py` (hidden 256, 4 layers, 4 heads,
   2 KV heads, intermediate 1024, vocab 32,000; `--shape 0.5b` for Qwen2.5-0.5B's text shape:
   hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab 151,936) and saves it
   with `save_pretrained`;
2. draws `--prompts` prompts with lengths uniform in [`--min-len`, `--max-len`] (random ids);
3. for each batch size of `--batches`: times transformers decoding the whole set in order,
   that many prompts per `generate` call (left-padded with an attention mask, greedy,
   `min_new_tokens = max_new_tokens = --new-tokens`, KV cache, eager attention, f32), and the
   Rust example `batch_decode` doing the same with `generate_batch` (prefills included on
   both sides);
4. prints per batch size the median answers/s of both over `--repeats` runs, the ratio
   ours/PyTorch, the speed-up over batch 1 of each, and how many answers agree token for token
   (random weights have near-ties, so a few may part late; the tests hold exact agreement on
   fixtures with clear greedy paths).

Threads: as decode.py (`--threads` for both; `--backend flex` for Burn's multi-threaded Flex
backend, ndarray runs on one thread).

Python: `--python PYTHON`, else $OMNIOPSD_PYTHON, else this interpreter; see decode.py's help
for making a virtual environment with torch, transformers and safetensors.

Run from the repository root: python3 benches/compare/predict.py [--prompts 32]
    [--batches 1,4,8,16] [--new-tokens 24] [--repeats 3] [--python PYTHON]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode  # noqa: E402  (the shared model builder, Python finder and example runner)

SHAPES = {
    "small": decode.SMALL,
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                 num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 tie_word_embeddings=True),
}


def torch_run(model, prompts, new_tokens, batch):
    """Seconds to decode every prompt, `batch` per left-padded `generate`, and the ids."""
    import torch

    start = time.perf_counter()
    out_ids = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            width = max(len(p) for p in chunk)
            x = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            out = model.generate(
                x,
                attention_mask=mask,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
            )
            out_ids.extend(out[:, width:].tolist())
    return time.perf_counter() - start, out_ids


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog=decode.VENV_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--batches", default="1,4,8,16",
                        help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--backend", choices=("ndarray", "flex"), default="ndarray",
                        help="Burn CPU backend of the Rust side")
    decode.add_python_arg(parser)
    args = parser.parse_args()
    decode.ensure_python(args.python)
    import torch

    batches = [int(b) for b in args.batches.split(",")]
    if any(b < 1 for b in batches) or not 1 <= args.min_len <= args.max_len:
        parser.error("batch sizes must be >= 1 and 1 <= --min-len <= --max-len")
    if args.repeats < 3:
        parser.error("--repeats must be at least 3 (the table reports medians)")
    flags = ("--features", "flex") if args.backend == "flex" else ()
    torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]

    with tempfile.TemporaryDirectory(prefix="omniopsd-predict-") as tmp:
        model_dir = os.path.join(tmp, "qwen2")
        model = decode.build_model(model_dir, args.seed, shape)
        gen = torch.Generator().manual_seed(args.seed + 1)
        lengths = torch.randint(args.min_len, args.max_len + 1, (args.prompts,), generator=gen)
        prompts = [
            torch.randint(1, shape["vocab_size"], (int(n),), generator=gen).tolist()
            for n in lengths
        ]
        prompts_file = os.path.join(tmp, "prompts.json")
        with open(prompts_file, "w") as f:
            json.dump([{"ids": p} for p in prompts], f)
        print(f"torch {torch.__version__}, {args.threads} thread(s); Rust: release build, "
              f"{args.backend} backend; shape {args.shape}; {args.prompts} prompts of "
              f"{args.min_len}-{args.max_len} tokens, {args.new_tokens} new tokens each, "
              f"median of {args.repeats}", flush=True)
        rows = []
        for b in batches:
            cmd = ["--model", model_dir, "--prompts", prompts_file, "--new-tokens",
                   str(args.new_tokens), "--repeats", str(args.repeats), "--batch", str(b)]
            (ours,) = decode.run_example("batch_decode", cmd, args.threads, flags)
            torch_run(model, prompts[:b], 2, b)  # warm-up, as the Rust side does
            runs = [torch_run(model, prompts, args.new_tokens, b) for _ in range(args.repeats)]
            t_ids = runs[0][1]
            rows.append({
                "batch": b,
                "ours": args.prompts / statistics.median(ours["seconds"]),
                "torch": args.prompts / statistics.median(r[0] for r in runs),
                "agree": sum(a == t for a, t in zip(ours["ids"], t_ids)),
            })
            print(f"batch {b}: ours {rows[-1]['ours']:.2f} answers/s, "
                  f"PyTorch {rows[-1]['torch']:.2f}", flush=True)

    base = rows[0]
    print()
    print("| batch | ours answers/s | PyTorch answers/s | ours/PyTorch | ours vs first row "
          "| PyTorch vs first row | answers agreeing |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['ours']:.2f} | {r['torch']:.2f} | "
              f"{r['ours'] / r['torch']:.2f} | {r['ours'] / base['ours']:.2f}x | "
              f"{r['torch'] / base['torch']:.2f}x | {r['agree']}/{args.prompts} |")


if __name__ == "__main__":
    main()
