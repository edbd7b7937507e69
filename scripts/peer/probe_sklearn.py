#!/usr/bin/env python3
"""scikit-learn peer for `probe sweep` (issue 21): per hook point, StandardScaler + multinomial
LogisticRegression on exactly the rows our head trained on (`split.train` of the head file that
`probe sweep --out DIR` saved under DIR/heads/), test accuracy on its `split.test`, beside our
linear head's test accuracy from DIR/sweep.json. Dev-only (not in the tests).

    target/py/bin/python scripts/peer/probe_sklearn.py --features FEATS --sweep DIR [--C 1.0]

The same objective on our side (an L2-penalised multinomial logistic regression trained to
convergence, no early stopping): `probe sweep --val-split 0 --weight-decay 0 --l2 1/(C*n_train)
--batch-size n_train --epochs 500 --lr 0.01`; this script prints that `--l2`.

Requires scikit-learn (scripts/peer/requirements.txt) and safetensors + numpy.
"""
import argparse, json, os, sys, time

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler


def load_features(d, hook):
    man = json.load(open(os.path.join(d, "manifest.json")))
    xs, ys = [], []
    for s in man["shards"]:
        t = load_file(os.path.join(d, s["file"]))
        xs.append(t[hook].astype(np.float32))
        ys.append(t["labels"])
    return np.concatenate(xs), np.concatenate(ys), man


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", required=True)
    ap.add_argument("--sweep", required=True, help="the `probe sweep --out` directory")
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument("--max-iter", type=int, default=2000)
    a = ap.parse_args()
    ours = {r["hook_point"]: r for r in json.load(open(os.path.join(a.sweep, "sweep.json")))}
    print(f"| hook point | ours (linear head) | scikit-learn LogisticRegression (C={a.C}) | difference (points) | sklearn fit s |")
    print("|---|---|---|---|---|")
    worst = 0.0
    first = None
    for hook, r in ours.items():
        head = os.path.join(a.sweep, "heads", f"{hook}.safetensors")
        with safe_open(head, "np") as f:
            train, test = f.get_tensor("split.train"), f.get_tensor("split.test")
        if first is None:
            first = len(train)
        x, y, _ = load_features(a.features, hook)
        sc = StandardScaler().fit(x[train])
        t0 = time.time()
        clf = LogisticRegression(C=a.C, max_iter=a.max_iter).fit(sc.transform(x[train]), y[train])
        secs = time.time() - t0
        acc = float((clf.predict(sc.transform(x[test])) == y[test]).mean())
        mine = r["test"]["accuracy"]
        d = 100 * (mine - acc)
        worst = max(worst, abs(d))
        print(f"| {hook} | {100 * mine:.1f}% | {100 * acc:.1f}% | {d:+.1f} | {secs:.2f} |")
    print(f"\n{first} training rows: our equivalent objective is --l2 {1.0 / (a.C * first):.6g}")
    print(f"largest |difference|: {worst:.1f} points over {len(ours)} hook points")


if __name__ == "__main__":
    sys.exit(main())
