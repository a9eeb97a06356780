"""Workload 3: the distillation loss, forward + backward, peak memory and time. PyTorch's naive
path (full `[N·R, V]` student and teacher logits, TRL's generalized JSD β = 0.5 over the
vocabulary, token-mean over the valid positions, `backward`) against this project's chunked
fused loss (`cargo run --release -p omniopsd-benches --example loss`), on identical inputs.

Inputs need no shared random generator: element i of a tensor is a·sin(c·i + φ) in f64 (student
hidden c = 0.7071, φ = 0, a = 1; teacher hidden c = 0.5773, φ = 1, a = 1; head c = 0.3183,
φ = 2, a = 2/√H), token k is (k·7919) mod V, and the last quarter of each 256-row sequence is
padding, as `Problem::deterministic` in benches/src/lib.rs builds them. Both sides write their
gradients (w.r.t. the student hidden states and the head) as raw f32 files into one temporary
directory, and the table reports, per gradient, the largest element-wise difference relative to
the largest |element| of PyTorch's (max |ours - theirs| / max |theirs|), so a wrong element
cannot hide in a sum.

Peak memory, both sides the same way: resident set high-water mark (`VmHWM`, reset through
/proc/self/clear_refs just before the work) minus the resident size before it. Each side runs
in its own fresh process. Linux only.

Python: as decode.py (`--python`, else $OMNIOPSD_PYTHON, else the one running this script).
Run from the repository root: python3 benches/compare/loss.py [--rows 2048] [--vocab 151936]
    [--python PYTHON]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import VENV_HELP, add_python_arg, ensure_python, run_example  # noqa: E402


def status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def wave(length, c, phase, a):
    import torch

    i = torch.arange(length, dtype=torch.float64)
    return (a * torch.sin(c * i + phase)).float()


def torch_side(rows, hidden, vocab, repeats, threads, grads_out):
    """Runs in a child process (see `main`): prints one JSON line."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    r = min(256, rows)
    n = -(-rows // r)
    h_s = wave(n * r * hidden, 0.7071, 0.0, 1.0).reshape(n, r, hidden)
    h_t = wave(n * r * hidden, 0.5773, 1.0, 1.0).reshape(n, r, hidden)
    w = wave(vocab * hidden, 0.3183, 2.0, 2.0 / hidden ** 0.5).reshape(vocab, hidden)
    mask = (torch.arange(r) < r - r // 4).float().expand(n, r)
    beta = 0.5

    def step():
        hs = h_s.clone().requires_grad_()
        ws = w.clone().requires_grad_()
        s = F.log_softmax(hs @ ws.T, dim=-1)
        with torch.no_grad():
            t = F.log_softmax(h_t @ w.T, dim=-1)
        m = torch.logsumexp(torch.stack([s + torch.log(torch.tensor(1 - beta)),
                                         t + torch.log(torch.tensor(beta))]), dim=0)
        kl_t = F.kl_div(m, t, reduction="none", log_target=True)
        kl_s = F.kl_div(m, s, reduction="none", log_target=True)
        per_token = (beta * kl_t + (1 - beta) * kl_s).sum(-1)
        loss = (per_token * mask).sum() / mask.sum()
        loss.backward()
        return loss.item(), hs.grad, ws.grad

    rss_before = status_bytes("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = time.perf_counter()
    loss, g_h, g_w = step()
    seconds = [time.perf_counter() - start]
    peak = status_bytes("VmHWM:") - rss_before
    g_h.contiguous().numpy().tofile(os.path.join(grads_out, "grad_hidden.f32"))
    g_w.contiguous().numpy().tofile(os.path.join(grads_out, "grad_weight.f32"))
    del g_h, g_w
    for _ in range(1, repeats):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"loss": loss, "peak_rss_bytes": peak, "seconds": seconds}))


def run_torch(rows, hidden, vocab, repeats, threads, grads_out):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--rows", str(rows),
           "--hidden", str(hidden), "--vocab", str(vocab), "--repeats", str(repeats),
           "--threads", str(threads), "--grads-out", grads_out]
    # glibc's default allocator: with `compare.py`'s heap-retention settings inherited, the
    # ~18 GiB naive loss fragments the heap past this machine's memory (killed at 23 GiB).
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_ours(rows, hidden, vocab, chunk, repeats, threads, grads_out, backend_flags=()):
    args = ["--rows", str(rows), "--hidden", str(hidden), "--vocab", str(vocab),
            "--chunk", str(chunk), "--repeats", str(repeats), "--grads-out", grads_out]
    return run_example("loss", args, threads, backend_flags)[0]


def elementwise_error(ours_path, theirs_path, block=1 << 22):
    """max |ours - theirs| / max |theirs| over two raw f32 files, element by element, read in
    blocks (the head's gradient is V·H floats)."""
    import numpy as np

    a = np.memmap(ours_path, dtype="<f4", mode="r")
    b = np.memmap(theirs_path, dtype="<f4", mode="r")
    if a.shape != b.shape:
        raise RuntimeError(f"{ours_path}: {a.size} elements, PyTorch's has {b.size}")
    diff = scale = 0.0
    for start in range(0, a.size, block):
        x = a[start:start + block].astype(np.float64)
        y = b[start:start + block].astype(np.float64)
        diff = max(diff, float(np.max(np.abs(x - y))))
        scale = max(scale, float(np.max(np.abs(y))))
    return diff / max(scale, 1e-30)


def compare(rows, hidden, vocab, chunk, repeats, threads, backend_flags=()):
    """One row of workload 3: both sides and their ratios."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="omniopsd-loss-") as tmp:
        ours_dir, theirs_dir = os.path.join(tmp, "ours"), os.path.join(tmp, "torch")
        os.mkdir(ours_dir)
        os.mkdir(theirs_dir)
        ours = run_ours(rows, hidden, vocab, chunk, repeats, threads, ours_dir, backend_flags)
        theirs = run_torch(rows, hidden, vocab, repeats, threads, theirs_dir)
        grad_err = {name: elementwise_error(os.path.join(ours_dir, f"{name}.f32"),
                                            os.path.join(theirs_dir, f"{name}.f32"))
                    for name in ("grad_hidden", "grad_weight")}
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-30)  # noqa: E731
    return {
        "rows": rows, "hidden": hidden, "vocab": vocab, "chunk": chunk,
        "ours_peak": ours["peak_rss_bytes"], "ours_heap": ours["peak_heap_bytes"],
        "torch_peak": theirs["peak_rss_bytes"],
        "ours_s": statistics.median(ours["seconds"]),
        "torch_s": statistics.median(theirs["seconds"]),
        "loss_rel": rel(ours["loss"], theirs["loss"]),
        "grad_rel": max(grad_err.values()),
        "grad_hidden_rel": grad_err["grad_hidden"], "grad_weight_rel": grad_err["grad_weight"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=VENV_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048, help="N·R response rows")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk", type=int, default=128, help="rows per chunk (ours)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", choices=("ndarray", "flex"), default="flex")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grads-out", help=argparse.SUPPRESS)
    add_python_arg(parser)
    args = parser.parse_args()
    ensure_python(args.python)
    if args.child:
        torch_side(args.rows, args.hidden, args.vocab, args.repeats, args.threads, args.grads_out)
        return
    flags = ("--features", "flex") if args.backend == "flex" else ()
    r = compare(args.rows, args.hidden, args.vocab, args.chunk, args.repeats, args.threads, flags)
    print(format_table([r]))


def format_table(rows):
    gib = lambda b: b / 2 ** 30  # noqa: E731
    out = ["| N·R × H × V | ours peak GiB (heap) | PyTorch naive peak GiB | ours/naive memory "
           "| ours s | PyTorch s | ours/PyTorch speed | loss rel. diff | grad max diff / max abs |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(
            f"| {r['rows']} × {r['hidden']} × {r['vocab']} | {gib(r['ours_peak']):.3f} "
            f"({gib(r['ours_heap']):.3f}) | {gib(r['torch_peak']):.3f} | "
            f"{100 * r['ours_peak'] / r['torch_peak']:.1f}% | {r['ours_s']:.2f} | "
            f"{r['torch_s']:.2f} | {r['torch_s'] / r['ours_s']:.2f}× | {r['loss_rel']:.1e} | "
            f"{r['grad_rel']:.1e} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
