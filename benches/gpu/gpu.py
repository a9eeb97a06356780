"""The OPSD train step on CUDA in bf16 at 0.5B scale: tokens/s and model FLOPs utilisation,
ours against PyTorch on the same weights. Runs on the GPU machine (no cargo there); run.sh
builds the binaries here and calls this there.

1. The card: `nvidia-smi`'s name and clocks; its measured bf16 peak, a 8192³ bf16 product in
   PyTorch (cuBLAS; 3 warm-ups, then the mean of 10 timed by CUDA events), and the same
   product in Burn (`peak`: its CUDA backend's matmul).
2. The weights: a random-init `Qwen2ForCausalLM` of `qwen2.5-0.5b.json` (Qwen2.5-0.5B's
   shapes: hidden 896, 24 layers, 14 heads, 2 KV heads, vocabulary 151,936, tied), saved in
   bf16 by transformers, read by both sides (if transformers fails, ours runs on its own
   random init, `train_step --random`, and the ratio is left out).
3. PyTorch's faithful OPSD step (`benches/compare/train_step.py`'s, model and AdamW in bf16)
   and ours (`train_step`: Burn's CUDA backend with bf16 as its float type), each a warm-up
   and `--steps` timed steps of G = 8 responses of 128 tokens, prompt 256 (+256 privileged).
4. MFU = model FLOP/s (`omniopsd_benches::flops`, the same count for both sides) / the
   measured PyTorch peak.
5. Peak GPU memory of each step: PyTorch's `max_memory_allocated` (its tensors) and
   `max_memory_reserved` (its caching allocator's hold); ours, the most `nvidia-smi` saw the
   card use above its idle level while `train_step` ran (sampled every 0.2 s: the allocator's
   hold, since Burn's CUDA pool keeps what it frees).

`--precision bf16-mixed` runs both sides in mixed precision instead of pure bf16: f32 master
weights (the bf16 checkpoint upcast), products in bf16 (PyTorch: `torch.autocast`; ours:
`train_step --precision bf16-mixed`, Burn's `Cuda<f32>` with the projections computing in
bf16), AdamW in f32.

`--lora R` runs the LoRA step instead of the full one: rank-R adapters (alpha 2R) on all seven
projections, base frozen, AdamW on the adapters; PyTorch's side through PEFT. `--config` takes
the model shapes (`qwen2.5-omni-3b.json`, `qwen2.5-omni-7b.json`: the Qwen2.5-Omni thinkers'
text decoders). `--skip-peak` leaves out stage 1's products when an earlier run measured them.

Writes gpu.json (after every stage) and gpu.md to `--out` (default .gpu/out) and prints the
markdown. The Rust stages get time limits (Burn's peak 2 min, our step 6 min 20 s) cut to
what is left of `--budget` (560 s), and run.sh bounds the whole script, so a run takes under
10 minutes; a stage that fails or overruns is reported and the others still run.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "compare"))
CONFIG = os.path.join(HERE, "qwen2.5-0.5b.json")
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta",
              "tie_word_embeddings", "initializer_range")


DEADLINE = [time.monotonic() + 560]


def text(x):
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def json_lines(out):
    lines = []
    for line in text(out).splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass
    return [l for l in lines if isinstance(l, dict)]


def cuda_env():
    """The environment of the Rust binaries: Burn's CUDA runtime loads libcuda and NVRTC at
    run time, so the toolkit's library folders and those PyTorch's wheels bring go on
    LD_LIBRARY_PATH (for them only: PyTorch keeps its own)."""
    import glob
    import site

    dirs = ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
    for packages in site.getsitepackages():
        dirs += sorted(glob.glob(os.path.join(packages, "nvidia", "*", "lib")))
    dirs = [d for d in dirs if os.path.isdir(d)]
    old = os.environ.get("LD_LIBRARY_PATH")
    return dict(os.environ, LD_LIBRARY_PATH=":".join(dirs + ([old] if old else [])))


def run(cmd, limit):
    """The JSON objects `cmd` printed, or [{"error": ...}] with the end of its output; it gets
    `limit` seconds, or what is left before the deadline if that is less."""
    timeout = max(10, min(limit, DEADLINE[0] - time.monotonic()))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cuda_env())
    except subprocess.TimeoutExpired as e:
        # What it finished before the limit, then the error.
        tail = (text(e.stderr) + text(e.stdout))[-2000:]
        error = {"error": f"{cmd[0]}: not done within {timeout:.0f} s; last output: {tail}"}
        return json_lines(e.stdout) + [error]
    except OSError as e:
        return [{"error": f"{cmd[0]}: {e}"}]
    lines = json_lines(out.stdout)
    if out.returncode != 0 or not lines:
        return [{"error": f"{cmd[0]} exit {out.returncode}: {(out.stderr or out.stdout)[-2000:]}"}]
    return lines


class MemoryWatch:
    """The most memory `nvidia-smi` reports in use on GPU 0, sampled every 0.2 s from `start`
    to `stop`, above what it reported at `start`."""

    def __init__(self):
        self.base = self.peak = self.used()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)

    @staticmethod
    def used():
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                "-i", "0"], capture_output=True, text=True, timeout=10)
            return float(q.stdout.split()[0]) * 2**20
        except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
            return None

    def watch(self):
        while not self.done.wait(0.2):
            used = self.used()
            if used is not None and (self.peak is None or used > self.peak):
                self.peak = used

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()

    def bytes(self):
        return None if self.base is None or self.peak is None else self.peak - self.base


def card():
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,clocks.max.sm,memory.total,driver_version",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        return q.stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi: {e}"


def torch_peak(n=8192, repeats=50):
    """bf16 `n³` products in PyTorch: a second of warm-up (the clocks ramp up), then
    `repeats` timed by CUDA events."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    warm = time.perf_counter()
    while time.perf_counter() - warm < 1.0:
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / repeats
    return {"n": n, "seconds_per_product": seconds, "tflops": 2 * n**3 / seconds / 1e12}


def markdown(result, steps):
    """The report: tokens/s, model TFLOP/s and MFU of each side that ran."""
    shape = result["shape"]
    ours = result.get("ours", {"error": "did not run"})
    burn = [p for p in result.get("burn_peak", []) if "tflops" in p]
    if "tflops" in result.get("torch_peak", {}):
        peak, source = result["torch_peak"]["tflops"], "PyTorch 8192³"
    elif burn:
        peak, source = max(p["tflops"] for p in burn), "Burn's matmul"
    else:
        peak, source = float("nan"), "no peak measured"
    peak *= 1e12
    tokens = shape["group"] * shape["new"]
    rows = []  # (side, tokens/s, model FLOP/s or None)
    flops = ours["step_flops"]["total"] if "step_flops" in ours else None
    if flops is not None:
        o = statistics.median(ours["step_seconds"][1:])
        rows.append((f"ours (Burn CUDA, {result.get('precision', 'bf16')})", tokens / o, flops / o))
    if "torch_step_seconds" in result:
        t = statistics.median(result["torch_step_seconds"][1:])
        rows.append((f"PyTorch {result.get('torch')} eager ({result.get('precision', 'bf16')})",
                     tokens / t,
                     None if flops is None else flops / t))
    what = f"LoRA r={result['lora']} (base frozen)" if result.get("lora") else "full fine-tune"
    md = [f"OPSD train step ({what}) on {result['card']}; {result['model']}, G={shape['group']} x "
          f"{shape['new']} tokens, prompt {shape['prompt']} (+{shape['privileged']} privileged); "
          f"median of {steps} steps after a warm-up; MFU against the measured bf16 peak "
          f"{peak / 1e12:.0f} TFLOP/s ({source})",
          "", "| side | tokens/s | model TFLOP/s | MFU | peak GPU memory |", "|---|---:|---:|---:|---|"]
    gib = lambda b: "–" if b is None else f"{b / 2**30:.1f} GiB"
    memory = {"ours": gib(ours.get("peak_memory_bytes")),
              "torch": (f"{gib(result.get('torch_peak_allocated'))} allocated, "
                        f"{gib(result.get('torch_peak_reserved'))} reserved")}
    for name, tps, fps in rows:
        mem = memory["ours" if name.startswith("ours") else "torch"]
        if fps is None:  # our step did not run, so no FLOP count
            md.append(f"| {name} | {tps:.1f} | – | – | {mem} |")
        else:
            md.append(f"| {name} | {tps:.1f} | {fps / 1e12:.2f} | {100 * fps / peak:.2f}% | {mem} |")
    if len(rows) == 2:
        md.append(f"\nours/PyTorch tokens/s: {rows[0][1] / rows[1][1]:.2f}")
    failures = [("ours", ours.get("error")), ("PyTorch", result.get("torch_error")),
                ("PyTorch peak", result.get("torch_peak", {}).get("error"))]
    failures += [("Burn peak", p["error"]) for p in result.get("burn_peak", []) if "error" in p]
    for side, err in failures:
        if err:
            md.append(f"\n{side} failed: {err}")
    if burn:
        md.append("\nBurn's bf16 matmul: "
                  + ", ".join(f"{p['n']}³ {p['tflops']:.0f} TFLOP/s" for p in burn))
    return "\n".join(md)


def save(result, out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu.json"), "w") as f:
        json.dump(result, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bin", default=os.path.join(os.path.dirname(os.path.dirname(HERE)), ".gpu"),
                        help="folder of the CUDA builds of the examples (run.sh build)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(HERE)),
                                                      ".gpu", "out"),
                        help="folder for gpu.json and gpu.md")
    parser.add_argument("--budget", type=float, default=560, help="seconds for the whole run")
    parser.add_argument("--config", default=CONFIG, help="the model's config.json")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--privileged", type=int, default=256)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--lora", type=int, default=0, help="adapter rank (0: full fine-tune)")
    parser.add_argument("--precision", choices=("bf16", "bf16-mixed"), default="bf16",
                        help="pure bf16, or f32 master weights with bf16 products")
    parser.add_argument("--skip-peak", action="store_true", help="leave out the matmul peaks")
    parser.add_argument("--burn-peak-limit", type=float, default=120,
                        help="seconds for Burn's matmul peak (its kernels are tuned on first use)")
    parser.add_argument("--peak-tflops", type=float,
                        help="with --skip-peak: the bf16 peak an earlier run measured, for MFU")
    args = parser.parse_args()
    DEADLINE[0] = time.monotonic() + args.budget
    args.steps = max(1, args.steps)
    shape = (args.prompt, args.privileged, args.group, args.new)
    result = {"card": card(), "model": os.path.basename(args.config),
              "shape": dict(zip(("prompt", "privileged", "group", "new"), shape)), "lora": args.lora,
              "precision": args.precision}
    print("card:", result["card"], flush=True)

    try:
        import torch

        result["torch"] = torch.__version__
    except ImportError as e:
        torch = None
        result["torch_peak"] = {"error": f"ImportError: {e}"}
    if torch is not None and args.skip_peak:
        result["torch_peak"] = ({"tflops": args.peak_tflops, "source": "--peak-tflops"}
                                if args.peak_tflops else {"error": "skipped (--skip-peak)"})
    elif torch is not None:
        try:
            result["torch_peak"] = torch_peak()
        except Exception as e:  # MFU then uses Burn's peak
            result["torch_peak"] = {"error": f"{type(e).__name__}: {e}"}
    print("torch peak:", result["torch_peak"], flush=True)
    save(result, args.out)
    if not args.skip_peak:
        result["burn_peak"] = run([os.path.join(args.bin, "peak"), "--sizes", "4096,8192",
                                   "--repeats", "20"], args.burn_peak_limit)
        print("burn peak:", result["burn_peak"], flush=True)
    save(result, args.out)

    config = json.load(open(args.config))
    work = tempfile.mkdtemp(prefix="omniopsd-gpu-")
    weights = ["--random", args.config]
    model = None
    try:
        if torch is None:
            raise RuntimeError("no torch")
        from train_step import build, torch_steps, with_lora

        start = time.perf_counter()
        # Initialised on the GPU: a 7B random init on the CPU takes minutes of the budget.
        with torch.device("cuda"):
            model = build(work, config["vocab_size"], {k: config[k] for k in SHAPE_KEYS},
                          torch.bfloat16)
        result["build_seconds"] = time.perf_counter() - start
        weights = ["--model", work]
        mixed = args.precision == "bf16-mixed"
        model = model.to("cuda", dtype=torch.float32 if mixed else torch.bfloat16)
        if args.lora:
            model = with_lora(model, args.lora)
        torch.cuda.reset_peak_memory_stats()
        result["torch_step_seconds"] = torch_steps(model, config["vocab_size"], args.steps + 1,
                                                   shape, "cuda",
                                                   torch.bfloat16 if mixed else None)
        result["torch_peak_allocated"] = torch.cuda.max_memory_allocated()
        result["torch_peak_reserved"] = torch.cuda.max_memory_reserved()
    except Exception as e:  # the Rust side still runs, on its own weights if need be
        result["torch_error"] = f"{type(e).__name__}: {e}"
    finally:
        del model
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
    print("torch step:", result.get("torch_step_seconds", result.get("torch_error")), flush=True)
    save(result, args.out)

    with MemoryWatch() as watch:
        result["ours"] = run([os.path.join(args.bin, "train_step"), *weights,
                              "--steps", str(args.steps + 1), "--prompt", str(args.prompt),
                              "--privileged", str(args.privileged), "--group", str(args.group),
                              "--new", str(args.new), "--lora", str(args.lora),
                              "--precision", "bf16-mixed" if args.precision == "bf16-mixed"
                              else "native"], 380)[0]
    result["ours"]["peak_memory_bytes"] = watch.bytes()
    print("ours:", result["ours"], flush=True)
    save(result, args.out)

    md = markdown(result, args.steps)
    print(md)
    with open(os.path.join(args.out, "gpu.md"), "w") as f:
        f.write(md + "\n")


if __name__ == "__main__":
    main()
