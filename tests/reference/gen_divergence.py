"""Golden vectors for omniopsd-core's divergences (core/src/divergence.rs, core/src/fused.rs).

Independent reference: PyTorch autograd in float64, and TRL's
`GKDTrainer.generalized_jsd_loss` (trl.experimental.gkd) for every full-vocabulary
forward-KL / reverse-KL / JSD value (TRL's beta=0 and beta=1 special cases are the KL
endpoints). The remaining modes (point-wise clip, top-k with/without tail bucket, sampled-token
policy gradient, per-sequence reduction) have no TRL counterpart and are written out here in
plain torch from their definitions in the crate docs.

Reduction mapping: TRL `reduction="batchmean"` with `labels` (-100 on padding) divides the
summed point-wise JSD by the number of valid tokens, i.e. our `Reduction::Token`. TRL
`reduction="none"` returns the point-wise [N, R, V] terms; their sum over V is our per-token
divergence, which we reduce ourselves for `Reduction::Sequence`.

Output: tests/reference/divergence_golden.json (inputs as float32-representable values,
loss, per-token divergence, gradient of the loss w.r.t. the student logits).

Run from the repository root, with a Python that has torch and trl (tests/reference/README.md:
how to make one): python3 tests/reference/gen_divergence.py
"""

import json
import math
import os

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.gkd import GKDTrainer

trl_jsd = GKDTrainer.generalized_jsd_loss
DT = torch.float64


def f32(t):
    """Rounds to float32-representable values so that Rust reads exactly the same inputs."""
    return t.to(torch.float32).to(DT)


def make_inputs(seed, n, r, v, scale, agree=None):
    """Random logits at `scale`; with `agree`, the teacher is the student plus noise of that
    scale (peaked, mostly agreeing distributions: the hard case for gradient precision)."""
    g = torch.Generator().manual_seed(seed)
    student = f32(torch.randn(n, r, v, generator=g, dtype=DT) * scale)
    teacher = f32(torch.randn(n, r, v, generator=g, dtype=DT) * scale)
    if agree is not None:
        teacher = f32(student + torch.randn(n, r, v, generator=g, dtype=DT) * agree)
    tokens = torch.randint(0, v, (n, r), generator=g)
    lengths = [r, max(r - 2, 1)] + [0] * (n - 2)  # last sequence(s) fully padded
    mask = torch.zeros(n, r, dtype=DT)
    for i, ln in enumerate(lengths[:n]):
        mask[i, :ln] = 1.0
    # behaviour log-probs: the student's own log-prob at T=1 perturbed, so that some
    # importance ratios exceed the clip and some do not
    s_logp = torch.log_softmax(student, -1).gather(-1, tokens[..., None])[..., 0]
    behaviour = f32(s_logp + torch.randn(n, r, generator=g, dtype=DT) * 0.6)
    return dict(student=student, teacher=teacher, tokens=tokens, mask=mask, behaviour=behaviour)


def reduce(per_token, mask, reduction):
    valid = mask > 0.5
    vals = torch.where(valid, per_token, torch.zeros_like(per_token))
    if reduction == "token":
        return vals.sum() / valid.sum().clamp_min(1)
    counts = valid.sum(-1)
    per_seq = vals.sum(-1) / counts.clamp_min(1)
    return per_seq.sum() / (counts > 0).sum().clamp_min(1)


def pointwise(ls, lq, divergence, beta, clip):
    """Point-wise terms [.., W] of the divergence between normalised log-distributions."""
    c = (lambda x: x.clamp(-clip, clip)) if clip is not None else (lambda x: x)
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return c(lq.exp() * (lq - ls))
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return c(ls.exp() * (ls - lq))
    b = torch.tensor(beta, dtype=ls.dtype)
    lm = torch.logsumexp(torch.stack([ls + torch.log1p(-b), lq + torch.log(b)]), dim=0)
    return beta * c(lq.exp() * (lq - lm)) + (1 - beta) * c(ls.exp() * (ls - lm))


def trl_beta(divergence, beta):
    return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(divergence, beta)


def top_k_logprobs(z, t, k, tail):
    idx = torch.topk(z.detach(), k, dim=-1).indices
    zk, tk = z.gather(-1, idx), t.gather(-1, idx)
    if not tail:
        return torch.log_softmax(zk, -1), torch.log_softmax(tk, -1)
    member = torch.zeros_like(z, dtype=torch.bool).scatter(-1, idx, True)
    out = []
    for x, xk in ((z, zk), (t, tk)):
        lse = torch.logsumexp(x, -1, keepdim=True)
        rest = torch.logsumexp(x.masked_fill(member, -math.inf), -1, keepdim=True)
        out.append(torch.cat([xk - lse, rest - lse], -1))
    return out[0], out[1]


def case(inputs, cfg, check=True):
    """The loss and its gradient for `cfg` in the inputs' dtype; `check` asserts that the
    float64 torch forms equal TRL's (off for the float32 comparison run)."""
    s = inputs["student"].clone().requires_grad_(True)
    t = inputs["teacher"]
    mask = inputs["mask"]
    tau = cfg["temperature"]
    div = cfg["divergence"]
    per_token = None
    if div == "sampled_reverse_kl":
        tok = inputs["tokens"][..., None]
        sl = torch.log_softmax(s / tau, -1).gather(-1, tok)[..., 0]
        tl = torch.log_softmax(t / tau, -1).gather(-1, tok)[..., 0]
        adv = (tl - sl).detach()
        ratio = torch.exp(sl - inputs["behaviour"]).clamp(max=cfg["ratio_clip"])
        loss = -reduce(ratio * adv, mask, cfg["reduction"])
        valid = mask > 0.5
        raw = torch.exp(sl - inputs["behaviour"]).detach()
        cfg["expect_clip_fraction"] = float(((raw > cfg["ratio_clip"]) & valid).sum() / valid.sum())
    else:
        beta = cfg.get("beta")
        top = cfg.get("top_k")
        clip = cfg.get("kl_clip")
        if top is None and clip is None:
            # TRL itself: point-wise terms, summed over the vocabulary
            pw = trl_jsd(s, t, labels=None, beta=trl_beta(div, beta), temperature=tau, reduction="none")
            per_token = pw.sum(-1)
            ours = pointwise(
                torch.log_softmax(s / tau, -1), torch.log_softmax(t / tau, -1), div, beta, None
            ).sum(-1)
            assert not check or torch.allclose(per_token, ours, atol=1e-12), "torch reference disagrees with TRL"
        elif top is not None and top["k"] < s.shape[-1] and clip is None:
            # TRL on the k(+1)-way log-distributions (already normalised and temperature-scaled,
            # so TRL's log_softmax at temperature 1 leaves them unchanged)
            ls, lq = top_k_logprobs(s / tau, t / tau, top["k"], top["tail"])
            per_token = trl_jsd(ls, lq, labels=None, beta=trl_beta(div, beta), temperature=1.0, reduction="none").sum(-1)
        else:
            if top is not None and top["k"] < s.shape[-1]:
                ls, lq = top_k_logprobs(s / tau, t / tau, top["k"], top["tail"])
            else:
                ls, lq = torch.log_softmax(s / tau, -1), torch.log_softmax(t / tau, -1)
            per_token = pointwise(ls, lq, div, beta, clip).sum(-1)
            if clip is not None:
                raw = pointwise(ls, lq, div, beta, None)
                assert not torch.allclose(raw.sum(-1), per_token), "clip inactive: pick a smaller kl_clip"
        loss = reduce(per_token, mask, cfg["reduction"])
        if cfg["reduction"] == "token" and top is None and clip is None:
            labels = torch.where(mask > 0.5, inputs["tokens"], torch.full_like(inputs["tokens"], -100))
            trl_loss = trl_jsd(s, t, labels=labels, beta=trl_beta(div, beta), temperature=tau, reduction="batchmean")
            assert not check or torch.allclose(loss, trl_loss, atol=1e-12), "Token reduction != TRL batchmean"
    loss.backward()
    out = dict(config=cfg, loss=float(loss.detach()), grad_student=s.grad.flatten().tolist())
    if per_token is not None:
        out["per_token"] = per_token.detach().flatten().tolist()
    return out


def peaked_case(inputs, cfg):
    """`case`, plus the error of PyTorch's float32 autograd of the same loss:
    max |g32 - g64| / max |g64|, the f32-rounding yardstick the Rust test holds its fused
    gradient to."""
    out = case(inputs, dict(cfg))
    as32 = {k: (v.to(torch.float32) if v.is_floating_point() else v) for k, v in inputs.items()}
    g32 = torch.tensor(case(as32, dict(cfg), check=False)["grad_student"], dtype=DT)
    g64 = torch.tensor(out["grad_student"], dtype=DT)
    out["torch_f32_grad_error"] = float((g32 - g64).abs().max() / g64.abs().max())
    return out


def main():
    n, r, v = 3, 4, 11
    sets = {"a": make_inputs(1, n, r, v, 2.5), "b": make_inputs(2, n, r, v, 1.0)}
    cases = []
    kinds = [("forward_kl", None), ("reverse_kl", None)] + [("jsd", b) for b in (0.0, 0.1, 0.5, 0.9, 1.0)]
    for name, inp in sets.items():
        for div, beta in kinds:
            for reduction in ("token", "sequence"):
                for tau in (1.0, 2.0):
                    cfg = dict(inputs=name, divergence=div, beta=beta, reduction=reduction, temperature=tau)
                    cases.append(case(inp, cfg))
    inp = sets["a"]
    for div, beta in (("forward_kl", None), ("reverse_kl", None), ("jsd", 0.5), ("jsd", 0.2)):
        for k, tail in ((3, False), (3, True), (1, True), (v, False)):
            for tau in (1.0, 1.5):
                cfg = dict(inputs="a", divergence=div, beta=beta, reduction="token", temperature=tau, top_k=dict(k=k, tail=tail))
                cases.append(case(inp, cfg))
        for clip in (0.05, 0.3):
            cfg = dict(inputs="a", divergence=div, beta=beta, reduction="sequence", temperature=1.0, kl_clip=clip)
            cases.append(case(inp, cfg))
        cfg = dict(inputs="a", divergence=div, beta=beta, reduction="token", temperature=1.3, kl_clip=0.05, top_k=dict(k=4, tail=True))
        cases.append(case(inp, cfg))
    # Peaked rows (logit scale 12, V = 257, a teacher that mostly agrees): issue 17's case,
    # where an f32 gradient loses precision unless the maximum is subtracted first.
    peaked = make_inputs(12, 1, 3, 257, 12.0, agree=3.0)
    for div, beta in (("forward_kl", None), ("reverse_kl", None), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)):
        for tau in (1.0, 2.0):
            cfg = dict(inputs="peaked", divergence=div, beta=beta, reduction="token", temperature=tau)
            cases.append(peaked_case(peaked, cfg))
        cfg = dict(inputs="peaked", divergence=div, beta=beta, reduction="token", temperature=1.0, top_k=dict(k=8, tail=True))
        cases.append(peaked_case(peaked, cfg))
    for name, inp in sets.items():
        for ratio_clip in (2.0, 1.2):
            for reduction in ("token", "sequence"):
                for tau in (1.0, 1.5):
                    cfg = dict(inputs=name, divergence="sampled_reverse_kl", ratio_clip=ratio_clip, reduction=reduction, temperature=tau)
                    cases.append(case(inp, cfg))
    doc = dict(
        generator="tests/reference/gen_divergence.py",
        reference="torch float64 autograd; TRL GKDTrainer.generalized_jsd_loss (trl.experimental.gkd)",
        shape=[n, r, v],  # of every input set without its own `shape`
        inputs={
            name: dict(
                student=inp["student"].flatten().tolist(),
                teacher=inp["teacher"].flatten().tolist(),
                tokens=inp["tokens"].flatten().tolist(),
                mask=inp["mask"].flatten().tolist(),
                behaviour_logp=inp["behaviour"].flatten().tolist(),
            )
            for name, inp in sets.items()
        }
        | {
            "peaked": dict(
                shape=list(peaked["student"].shape),
                student=peaked["student"].flatten().tolist(),
                teacher=peaked["teacher"].flatten().tolist(),
                tokens=peaked["tokens"].flatten().tolist(),
                mask=peaked["mask"].flatten().tolist(),
                behaviour_logp=peaked["behaviour"].flatten().tolist(),
            )
        },
        cases=cases,
    )
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "divergence_golden.json")
    with open(path, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
    print(f"wrote {len(cases)} cases to {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
