"""The OPSD train step on CUDA in bf16 at 0.5B scale: tokens/s and model FLOPs utilisation,
ours against PyTorch on the same weights. Runs on the GPU machine (no cargo there); run.sh
builds the binaries here and calls this there.

1. The card: `nvidia-smi`'s name and clocks; its measured bf16 peak, a 8192³ bf16 product in
   PyTorch (cuBLAS; 3 warm-ups, then the mean of 10 timed by CUDA events), and the same
   product in Burn (`peak`: its CUDA backend's matmul).
2. The weights: a random-init `Qwen2ForCausalLM` of `qwen2.5-0.5b.json` (Qwen2.5-0.5B's
   shapes: hidden 896, 24 layers, 14 heads, 2 KV heads, vocabulary 151,936, tied), saved in
   f32 by transformers, read by both sides (if transformers fails, ours runs on its own
   random init, `train_step --random`, and the ratio is left out).
3. PyTorch's faithful OPSD step (`benches/compare/train_step.py`'s, model and AdamW in bf16)
   and ours (`train_step`: Burn's CUDA backend with bf16 as its float type), each a warm-up
   and `--steps` timed steps of G = 8 responses of 128 tokens, prompt 256 (+256 privileged).
4. MFU = model FLOP/s (`omniopsd_benches::flops`, the same count for both sides) / the
   measured PyTorch peak.

Writes gpu.json and gpu.md to `--out` (default $OUT) and prints the markdown. Each stage has
its own time limit (Burn's peak 2 min, our step 6 min 20 s), so the whole run fits one
10-minute device call; a stage that fails or overruns is reported and the others still run.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "compare"))
CONFIG = os.path.join(HERE, "qwen2.5-0.5b.json")
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta",
              "tie_word_embeddings", "initializer_range")


def run(cmd, timeout):
    """The JSON lines `cmd` printed, or {"error": ...} with the end of its output."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"error": f"{cmd[0]}: no result within {timeout} s"}]
    lines = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode != 0 or not lines:
        return [{"error": f"{cmd[0]} exit {out.returncode}: {(out.stderr or out.stdout)[-2000:]}"}]
    return lines


def card():
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,clocks.max.sm,memory.total,driver_version",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        return q.stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi: {e}"


def torch_peak(n=8192):
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 10
    return {"n": n, "seconds_per_product": seconds, "tflops": 2 * n**3 / seconds / 1e12}


def markdown(result, steps):
    """The report: tokens/s, model TFLOP/s and MFU of each side that ran."""
    shape = result["shape"]
    ours = result["ours"]
    burn = [p for p in result["burn_peak"] if "tflops" in p]
    if "tflops" in result["torch_peak"]:
        peak, source = result["torch_peak"]["tflops"], "PyTorch 8192³"
    elif burn:
        peak, source = max(p["tflops"] for p in burn), "Burn's matmul"
    else:
        peak, source = float("nan"), "no peak measured"
    peak *= 1e12
    tokens = shape["group"] * shape["new"]
    rows = []
    if "step_flops" in ours:
        flops = ours["step_flops"]["total"]
        o = statistics.median(ours["step_seconds"][1:])
        rows.append(("ours (Burn CUDA, bf16)", tokens / o, flops / o))
        if "torch_step_seconds" in result:
            t = statistics.median(result["torch_step_seconds"][1:])
            rows.append((f"PyTorch {result['torch']} eager (bf16)", tokens / t, flops / t))
    md = [f"OPSD train step on {result['card']}; Qwen2.5-0.5B shapes, G={shape['group']} x "
          f"{shape['new']} tokens, prompt {shape['prompt']} (+{shape['privileged']} privileged); "
          f"median of {steps} steps after a warm-up; MFU against the measured bf16 peak "
          f"{peak / 1e12:.0f} TFLOP/s ({source})",
          "", "| side | tokens/s | model TFLOP/s | MFU |", "|---|---:|---:|---:|"]
    for name, tps, fps in rows:
        md.append(f"| {name} | {tps:.1f} | {fps / 1e12:.2f} | {100 * fps / peak:.2f}% |")
    if len(rows) == 2:
        md.append(f"\nours/PyTorch tokens/s: {rows[0][1] / rows[1][1]:.2f}")
    for key in ("error", "torch_error"):
        err = ours.get(key) if key == "error" else result.get(key)
        if err:
            md.append(f"\n{'ours' if key == 'error' else 'PyTorch'} failed: {err}")
    if burn:
        md.append("\nBurn's bf16 matmul: "
                  + ", ".join(f"{p['n']}³ {p['tflops']:.0f} TFLOP/s" for p in burn))
    return "\n".join(md)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bin", default=os.path.join(os.path.dirname(os.path.dirname(HERE)), ".gpu"),
                        help="folder of the CUDA builds of the examples (run.sh build)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--privileged", type=int, default=256)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new", type=int, default=128)
    args = parser.parse_args()
    shape = (args.prompt, args.privileged, args.group, args.new)
    result = {"card": card(), "shape": dict(zip(("prompt", "privileged", "group", "new"), shape))}
    print("card:", result["card"], flush=True)

    import torch

    result["torch"] = torch.__version__
    try:
        result["torch_peak"] = torch_peak()
    except Exception as e:  # MFU then uses Burn's peak
        result["torch_peak"] = {"error": f"{type(e).__name__}: {e}"}
    print("torch peak:", result["torch_peak"], flush=True)
    result["burn_peak"] = run([os.path.join(args.bin, "peak"), "--sizes", "4096,8192",
                               "--repeats", "10"], 120)
    print("burn peak:", result["burn_peak"], flush=True)

    config = json.load(open(CONFIG))
    work = tempfile.mkdtemp(prefix="omniopsd-gpu-")
    weights = ["--random", CONFIG]
    try:
        from train_step import build, torch_steps

        start = time.perf_counter()
        model = build(work, config["vocab_size"], {k: config[k] for k in SHAPE_KEYS})
        result["build_seconds"] = time.perf_counter() - start
        weights = ["--model", work]
        model = model.to("cuda", dtype=torch.bfloat16)
        times = torch_steps(model, config["vocab_size"], args.steps + 1, shape, "cuda")
        result["torch_step_seconds"] = times
        del model
        torch.cuda.empty_cache()
    except Exception as e:  # the Rust side still runs on its own weights
        result["torch_error"] = f"{type(e).__name__}: {e}"
    print("torch step:", result.get("torch_step_seconds", result.get("torch_error")), flush=True)

    ours = run([os.path.join(args.bin, "train_step"), *weights, "--steps", str(args.steps + 1),
                "--prompt", str(args.prompt), "--privileged", str(args.privileged),
                "--group", str(args.group), "--new", str(args.new)], 380)[0]
    result["ours"] = ours
    print("ours:", ours, flush=True)

    text = markdown(result, args.steps)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "gpu.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
