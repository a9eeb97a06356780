"""Decode tokens/s with a KV cache: omniopsd's Qwen2 decoder (Burn, ndarray or flex) against
transformers' `generate` on CPU, on the same weights (issue 6, "Benchmark").

The script
1. builds a random-init `Qwen2ForCausalLM` from a config (hidden 256, 4 layers, 4 heads, 2 KV
   heads, intermediate 1024, vocab 32000; no hub access) and saves it with `save_pretrained`
   to a temporary directory, with prompts of 0, 512 and 2048 tokens of context (0 means a
   single-token prompt: nothing to attend to but itself);
2. times transformers: greedy `generate` (`do_sample=False`, `use_cache=True`,
   `min_new_tokens = max_new_tokens = N`, eager attention, f32) with a streamer that stamps
   each new token, so decode time = stamp of token N − stamp of token 1 (prefill excluded);
3. runs the Rust side, `cargo run --release -p omniopsd-benches --example decode`, which times
   the same thing: after the prefill and first token, N − 1 steps of cached decode + LM head +
   host argmax (what `Qwen2Model::generate_greedy` does per token);
4. prints, per context, the median over `--repeats` runs of decode tokens/s for both, their
   ratio ours/PyTorch, ms per token, and how many greedy tokens agree.

Threads: Burn's ndarray backend is compiled in this workspace without its `multi-threads`
feature (burn is a `default-features = false` dependency), so on `--backend ndarray` ours
runs on one thread; `--backend flex` (Burn's Flex CPU backend) uses rayon, capped by
`RAYON_NUM_THREADS`. `torch.set_num_threads` and `RAYON_NUM_THREADS` both get `--threads`.

Python: the one given with `--python`, else $OMNIOPSD_PYTHON, else the one running this
script (`python3` on PATH); the script re-runs itself under the first two. It needs torch,
transformers and safetensors; a virtual environment with them, set up once from the
repository root:

    python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors

(add `--index-url https://download.pytorch.org/whl/cpu` before `torch` for the smaller
CPU-only build), then `--python .venv/bin/python` or `export OMNIOPSD_PYTHON=.venv/bin/python`.

Run from the repository root: python3 benches/compare/decode.py [--repeats 3] [--new-tokens 64]
    [--python PYTHON]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The environment variable naming the Python to run the benches under.
PYTHON_ENV = "OMNIOPSD_PYTHON"
# Set in the re-run process, so it checks its imports instead of re-running again.
REEXEC_ENV = "OMNIOPSD_BENCH_REEXEC"
VENV_HELP = (
    "set up a virtual environment once, from the repository root:\n"
    "    python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors\n"
    f"then pass --python .venv/bin/python (or export {PYTHON_ENV}=.venv/bin/python)"
)
CONTEXTS = (0, 512, 2048)
# Cargo flags of the Rust side's backend (`--backend flex` adds `--features flex`).
BACKEND_FLAGS = ()


def add_python_arg(parser):
    """The `--python` flag every bench script takes (see `ensure_python`)."""
    parser.add_argument(
        "--python",
        default=os.environ.get(PYTHON_ENV),
        help=f"Python with torch and transformers to run under (default: ${PYTHON_ENV}, "
        "else this interpreter); to make one: python3 -m venv .venv && "
        ".venv/bin/pip install torch transformers safetensors",
    )


def ensure_python(python=None):
    """Makes sure torch and transformers can be imported: re-runs this script once under
    `python` (`--python`, else $OMNIOPSD_PYTHON) when one is named, and checks the imports
    in the interpreter that ends up running it."""
    if python and not os.environ.get(REEXEC_ENV):
        if not (os.path.isfile(python) and os.access(python, os.X_OK)):
            found = shutil.which(python)
            if found is None:
                sys.exit(f"--python {python}: no such program")
            python = found
        # The re-run process and its children (loss.py's PyTorch side) check, not re-run.
        env = dict(os.environ, **{REEXEC_ENV: "1"})
        os.execve(python, [python] + sys.argv, env)
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        sys.exit(f"{sys.executable} cannot import torch / transformers ({e}); " + VENV_HELP)


# The decode table's model: hidden 256, 4 layers, 4 heads, 2 KV heads, vocab 32,000.
SMALL = dict(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def build_model(out_dir, seed, shape=SMALL):
    """A random-init `Qwen2ForCausalLM` of `shape` (Qwen2Config keywords), saved to `out_dir`
    and reloaded from it in f32 with eager attention."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        **shape,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float().eval()
    model.save_pretrained(out_dir)
    return Qwen2ForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()


class Stamps:
    """A `generate` streamer: the first `put` is the prompt, each later one a new token."""

    def __init__(self):
        self.times = []
        self.calls = 0

    def put(self, value):
        if self.calls > 0:
            self.times.append(time.perf_counter())
        self.calls += 1

    def end(self):
        pass


def torch_runs(model, ids, new_tokens, repeats, batch=1):
    """Greedy `generate` of `batch` copies of the prompt: decode tokens/s (all sequences) of
    each repeat, and the ids of the first sequence."""
    import torch

    x = torch.tensor([ids] * batch)
    kwargs = dict(
        attention_mask=torch.ones_like(x),
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
    )
    with torch.no_grad():
        model.generate(x, max_new_tokens=4, min_new_tokens=4, **kwargs)
        rates, out_ids = [], None
        for _ in range(repeats):
            stamps = Stamps()
            out = model.generate(
                x,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                streamer=stamps,
                **kwargs,
            )
            assert len(stamps.times) == new_tokens, len(stamps.times)
            rates.append(batch * (new_tokens - 1) / (stamps.times[-1] - stamps.times[0]))
            out_ids = out[0, len(ids):].tolist()
    return rates, out_ids


def run_example(name, args, threads, flags):
    """Runs `benches/examples/NAME.rs` (release, cargo `flags`) on `threads` rayon threads and
    returns the JSON objects it printed, one per line."""
    cmd = ["cargo", "run", "--release", "--quiet", "-p", "omniopsd-benches", *flags,
           "--example", name, "--", *args]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return [json.loads(l) for l in map(str.strip, out.stdout.splitlines()) if l.startswith("{")]


def rust_runs(model_dir, prompts_file, new_tokens, repeats, threads, extra=(), flags=None):
    """The Rust example's JSON line per prompt, keyed by context (`extra`: more example flags,
    such as `--batch 8`; `flags`: cargo flags, default the `--backend` ones)."""
    args = ["--model", model_dir, "--prompts", prompts_file, "--new-tokens", str(new_tokens),
            "--repeats", str(repeats), *extra]
    flags = BACKEND_FLAGS if flags is None else flags
    return {r["context"]: r for r in run_example("decode", args, threads, flags)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=VENV_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=("ndarray", "flex"), default="ndarray",
                        help="Burn CPU backend of the Rust side")
    add_python_arg(parser)
    args = parser.parse_args()
    ensure_python(args.python)
    import torch

    global BACKEND_FLAGS
    BACKEND_FLAGS = ("--features", "flex") if args.backend == "flex" else ()
    if args.repeats < 3:
        parser.error("--repeats must be at least 3 (the table reports medians)")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="omniopsd-decode-") as tmp:
        model_dir = os.path.join(tmp, "qwen2")
        model = build_model(model_dir, args.seed)
        gen = torch.Generator().manual_seed(args.seed + 1)
        prompts = [
            {
                "context": c,
                "ids": torch.randint(1, 32000, (max(c, 1),), generator=gen).tolist(),
            }
            for c in CONTEXTS
        ]
        prompts_file = os.path.join(tmp, "prompts.json")
        with open(prompts_file, "w") as f:
            json.dump(prompts, f)

        print(f"torch {torch.__version__}, {args.threads} thread(s); Rust: release build, "
              f"{args.backend} backend; {args.new_tokens} new tokens, median of {args.repeats}",
              flush=True)
        rust = rust_runs(model_dir, prompts_file, args.new_tokens, args.repeats, args.threads)
        rows = []
        for p in prompts:
            c = p["context"]
            t_rates, t_ids = torch_runs(model, p["ids"], args.new_tokens, args.repeats)
            r = rust[c]
            r_rates = [(args.new_tokens - 1) / s for s in r["decode_seconds"]]
            steps = r["step_seconds"]
            agree = next(
                (i for i, (a, b) in enumerate(zip(r["ids"], t_ids)) if a != b), len(t_ids)
            )
            rows.append({
                "context": c,
                "ours": statistics.median(r_rates),
                "torch": statistics.median(t_rates),
                "ours_prefill_s": statistics.median(r["prefill_seconds"]),
                "first_steps_ms": 1e3 * statistics.median(steps[:8]),
                "last_steps_ms": 1e3 * statistics.median(steps[-8:]),
                "agree": agree,
            })

    n = args.new_tokens
    print()
    print("| context | ours tok/s | PyTorch tok/s | ours/PyTorch | ours ms/tok | PyTorch ms/tok "
          "| ours ms/tok first 8 → last 8 steps | ours prefill s | greedy prefix agreeing |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['context']} | {r['ours']:.1f} | {r['torch']:.1f} | "
            f"{r['ours'] / r['torch']:.2f} | {1e3 / r['ours']:.2f} | {1e3 / r['torch']:.2f} | "
            f"{r['first_steps_ms']:.2f} → {r['last_steps_ms']:.2f} | "
            f"{r['ours_prefill_s']:.2f} | {r['agree']}/{n} |"
        )


if __name__ == "__main__":
    main()
