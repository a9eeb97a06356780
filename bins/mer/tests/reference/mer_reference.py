"""Independent MER-UniBench scorer (pandas + numpy + scikit-learn) and random test cases.

Re-implements MER-UniBench's scoring rules (label normalisation, F_s, HIT, WAF) the way
AffectGPT's wheel.py does (pandas reading of format.csv / synonym.xlsx / wheelN.xlsx, sorted lookup,
set-based F_s and HIT per wheel, scikit-learn weighted F1), draws random predictions with
tricky labels (case, whitespace, neutral, fear, multi-word, hyphenated, unknown words, JSON
lists and bracketed strings), and writes them with the scores to random_predictions.jsonl and
random_expected.json for bins/mer/tests/benchmark_data.rs.

Run from the repository root, with a Python that has pandas, numpy, scikit-learn and openpyxl
(tests/reference/README.md: how to make one): python3 bins/mer/tests/reference/mer_reference.py
The wheel data is read from the copy this crate ships (bins/mer/data), the one the Rust
scorer compiles in.
"""

import json
import os
import random
import re

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..", "data")


def string_to_list(s):
    if isinstance(s, list):
        return s
    if s == "":
        return []
    if not isinstance(s, str) and pd.isna(s):
        return []
    if s[0] == "[":
        s = s[1:]
    if s[-1:] == "]":
        s = s[:-1]
    return [i.strip() for i in re.split("['\",]", s) if i.strip() not in ["", ","]]


def load():
    df = pd.read_csv(os.path.join(ROOT, "format.csv"))
    format_map = {}
    for raw, fmt in zip(df["name"], df["format"]):
        raw = "" if pd.isna(raw) else raw
        fmt = "" if pd.isna(fmt) else fmt
        for item in string_to_list(fmt):
            format_map.setdefault(item, []).append(raw)
        format_map.setdefault(raw, []).append(raw)
    syn = pd.read_excel(os.path.join(ROOT, "synonym.xlsx"))
    synonym_map = {}
    for k in range(1, 9):
        for _, row in syn.iterrows():
            word = row[f"word_run{k}"].strip().lower()
            synonym_map.setdefault(word, set()).add(word)
            for s in string_to_list(row[f"synonym_run{k}"]):
                synonym_map.setdefault(s.strip().lower(), set()).add(word)
    wheels = []
    for n in range(1, 6):
        d = pd.read_excel(os.path.join(ROOT, f"wheel{n}.xlsx"))
        l1 = l2 = l3 = ""
        tree = {}
        for _, row in d.iterrows():
            if not pd.isna(row["level1"]):
                l1 = row["level1"]
            if not pd.isna(row["level2"]):
                l2 = row["level2"]
            if not pd.isna(row["level3"]):
                l3 = row["level3"]
            l1, l2, l3 = l1.lower().strip(), l2.lower().strip(), l3.lower().strip()
            tree.setdefault(l1, {}).setdefault(l2, []).append(l3)
        m = {}
        for a in tree:
            m[a] = a
            for b in tree[a]:
                m[b] = a
                for c in tree[a][b]:
                    m[c] = a
        wheels.append(m)
    return format_map, synonym_map, wheels


def map_label(label, format_map, synonym_map, wheel):
    if label not in format_map:
        return None
    words = sorted(w for name in format_map[label] for w in synonym_map.get(name, ()))
    for w in words:
        if w in wheel:
            return wheel[w]
    return None


def mapped(labels, tables, wheel):
    format_map, synonym_map, _ = tables
    out = set()
    for x in string_to_list(labels):
        y = map_label(x.lower().strip(), format_map, synonym_map, wheel)
        if y is not None:
            out.add(y)
    return out


def score(rows, tables):
    wheels = tables[2]
    by = {}
    for r in rows:
        by.setdefault(r["dataset"], []).append(r)
    res = {}
    for name, rs in sorted(by.items()):
        if name == "OV-MERD+":
            per = []
            for w in wheels:
                P, R = [], []
                for r in rs:
                    g = mapped(r["gt"], tables, w)
                    if not g:
                        continue
                    p = mapped(r["pred"], tables, w)
                    if not p:
                        P.append(0.0)
                        R.append(0.0)
                        continue
                    P.append(len(g & p) / len(p))
                    R.append(len(g & p) / len(g))
                pp, rr = np.mean(P), np.mean(R)
                per.append([2 * pp * rr / (pp + rr), pp, rr])
            a = np.mean(per, axis=0)
            res[name] = dict(metric="F_s", score=a[0] * 100, precision=a[1] * 100, recall=a[2] * 100)
        elif name in ("MER2023", "MER2024", "IEMOCAP", "MELD"):
            per = []
            for w in wheels:
                hits = []
                for r in rs:
                    g = mapped(r["gt"], tables, w)
                    if not g:
                        continue
                    hits.append(len(g & mapped(r["pred"], tables, w)))
                per.append(np.mean(hits))
            res[name] = dict(metric="HIT", score=float(np.mean(per)) * 100)
        else:
            y, yp = [], []
            for r in rs:
                if r["gt"] == 0:
                    continue
                p = r["pred"].lower().strip() if isinstance(r["pred"], str) else ""
                v = 1 if p == "positive" else (-1 if p == "negative" else 0)
                y.append(int(r["gt"] > 0))
                yp.append(int(v > 0))
            res[name] = dict(
                metric="WAF",
                score=f1_score(y, yp, average="weighted") * 100,
                accuracy=accuracy_score(y, yp) * 100,
            )
    return {
        "datasets": {k: {kk: float(vv) if not isinstance(vv, str) else vv for kk, vv in v.items()} for k, v in res.items()},
        "mean": float(np.mean([v["score"] for v in res.values()])),
    }


def main():
    tables = load()
    format_map = tables[0]
    rng = random.Random(7)
    vocab = sorted(k for k in format_map if k)
    tricky = ["neutral", "fear", "FEAR", " Fear ", "self-protection", "look after", "at fault",
              "self-conscious", "Self-Assured", "happy", "sad", "angry", "worried", "surprise",
              "no-such-emotion", "情绪", "joy", "anger", "  Judgments "]

    def label():
        x = rng.choice(vocab) if rng.random() < 0.6 else rng.choice(tricky)
        r = rng.random()
        if r < 0.2:
            x = x.upper()
        elif r < 0.35:
            x = "  " + x + "\t"
        return x

    def labels_value(k):
        items = [label() for _ in range(k)]
        r = rng.random()
        if r < 0.3:
            return items
        if r < 0.6:
            return "[" + ", ".join(items) + "]"
        if r < 0.8:
            return ",".join(items)
        return "[" + ", ".join("'" + i + "'" for i in items) + "]"

    rows = []
    for i in range(60):
        rows.append({"dataset": "OV-MERD+", "id": f"ov{i}", "gt": labels_value(rng.randint(1, 4)),
                     "pred": labels_value(rng.randint(0, 5))})
    basic = {"MER2023": ["happy", "angry", "worried", "sad", "surprise", "neutral"],
             "MER2024": ["happy", "angry", "worried", "sad", "surprise", "neutral"],
             "IEMOCAP": ["happiness", "anger", "sadness", "neutral", "frustrated", "excited"],
             "MELD": ["joy", "anger", "sadness", "fear", "surprise", "disgust", "neutral"]}
    for name, gts in basic.items():
        for i in range(50):
            rows.append({"dataset": name, "id": f"{name}-{i}", "gt": rng.choice(gts),
                         "pred": labels_value(rng.randint(0, 3))})
    for name in ["CMU-MOSI", "CMU-MOSEI", "CH-SIMS", "CH-SIMS-v2"]:
        for i in range(40):
            gt = round(rng.uniform(-3, 3), 1) if rng.random() > 0.1 else 0.0
            pred = rng.choice(["positive", "negative", "neutral", " Positive ", "NEGATIVE", "", "unclear"])
            rows.append({"dataset": name, "id": f"{name}-{i}", "gt": gt, "pred": pred})
    rng.shuffle(rows)
    with open(os.path.join(HERE, "random_predictions.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(os.path.join(HERE, "random_expected.json"), "w") as f:
        json.dump(score(rows, tables), f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
