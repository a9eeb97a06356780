"""WAF reference cases from scikit-learn, for bins/mer/tests/metrics_reference.rs.

MER-UniBench's WAF is scikit-learn's f1_score(y_true, y_pred, average="weighted") over the
binarised sentiment (gt > 0, pred > 0) of the samples with gt != 0, plus accuracy_score.
This script draws small random cases (including one-class and all-wrong ones), binarises them
exactly like that and writes the inputs and scikit-learn's answers to waf_cases.json.

Run from the repository root, with a Python that has scikit-learn (tests/reference/README.md:
how to make one): python3 bins/mer/tests/reference/waf_sklearn.py
"""

import json
import os
import random
import warnings

import sklearn
from sklearn.metrics import accuracy_score, f1_score

WORDS = ["positive", "negative", "neutral", " Positive ", "NEGATIVE", "", "unknown"]


def value(word):
    w = word.lower().strip()
    return 1 if w == "positive" else (-1 if w == "negative" else 0)


def case(gt, pred):
    kept = [(g, p) for g, p in zip(gt, pred) if g != 0]
    y_true = [int(g > 0) for g, _ in kept]
    y_pred = [int(value(p) > 0) for _, p in kept]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        waf = f1_score(y_true, y_pred, average="weighted")
    return {
        "gt": gt,
        "pred": pred,
        "waf": float(waf),
        "accuracy": float(accuracy_score(y_true, y_pred)),
    }


def main():
    rng = random.Random(20250311)
    cases = [
        case([1.0, 2.0, -1.0], ["positive", "positive", "positive"]),
        case([1.0, 2.0, 3.0], ["negative", "neutral", ""]),
        case([-1.0, -2.0], ["negative", "negative"]),
        case([0.5, -0.5, 0.0, 1.5], ["neutral", "negative", "positive", "Positive"]),
    ]
    for _ in range(40):
        n = rng.randint(1, 30)
        gt = [round(rng.uniform(-3, 3), 1) if rng.random() > 0.15 else 0.0 for _ in range(n)]
        if all(g == 0 for g in gt):
            gt[0] = 1.2
        pred = [rng.choice(WORDS) for _ in range(n)]
        cases.append(case(gt, pred))
    out = {"sklearn_version": sklearn.__version__, "cases": cases}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "waf_cases.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
