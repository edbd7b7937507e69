#!/usr/bin/env python3
"""Writes the markdown report of scripts/gpu-check.sh from its JSON outputs: golden checks
(`check-goldens --json`), and per model `bench paired --json` (ours) beside
scripts/peer/hf_paired.py (transformers) on the same device, checkpoint and workload.

usage: gpu_report.py --out REPORT.md --goldens G.json... --pair NAME OURS.json PEER.json ... [--header TEXT]
"""

import argparse
import json
import os

# Issue 10's transformers figures (H100 80GB, transformers 5.17, bf16, eager, forward hook), for
# reference beside the peer measured in this run.
ISSUE_FIGURES = {
    "qwen2-vl-2b": (4.58, 2.32, 28.7, 7950),
    "qwen2.5-0.5b": (3.80, 2.35, 34.5, 8820),
    "llama-3.2-1b": (3.34, 1.64, 38.9, 15940),
    "smollm2-135m": (3.26, 1.88, 40.0, 12000),
}
# HBM bandwidth, GB/s, for the decode floor (weights bytes / bandwidth per step).
BANDWIDTH = {"H100": 3350.0, "H200": 4800.0}


def load(p):
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"error": f"{p}: {e}"}


def mib(b):
    return "-" if b is None else f"{b / 2**20:,.0f}"


def workload(o):
    return f"{o.get('prompt_tokens', '?')} ({o.get('image_tokens', 0)})"


def same_ids(o, p):
    """Like for like: both sides hash their prompt ids the same way (sha256 of the ids joined by ",")."""
    a, b = o.get("prompt_hash"), p.get("prompt_hash")
    if not a or not b:
        return "?"
    return "yes" if a == b and o.get("image_grid_thw") == p.get("image_grid_thw") else f"NO ({a} vs {b})"


def ratio(num, den, fmt="{:.2f}×"):
    if not num or not den:
        return "-"
    return fmt.format(num / den)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--goldens", nargs="*", default=[])
    ap.add_argument("--pair", nargs=3, action="append", default=[], metavar=("NAME", "OURS", "PEER"))
    ap.add_argument("--header", default="")
    ap.add_argument("--gpu-name", default="")
    ap.add_argument("--bandwidth-gbs", type=float, default=0.0)
    a = ap.parse_args()
    bw = a.bandwidth_gbs or next((v for k, v in BANDWIDTH.items() if k in a.gpu_name), 0.0)
    L = ["# miniwob-steer GPU check", ""]
    if a.header:
        L += [a.header, ""]
    L += ["## Golden comparisons", ""]
    ok_all = True
    for g in a.goldens:
        r = load(g)
        if "error" in r:
            L += [f"- {r['error']}", ""]
            ok_all = False
            continue
        rows = r["rows"]
        failed = [x for x in rows if not x["passed"]]
        ok_all &= not failed
        L += [f"### {r['device']} {r['dtype']}: {len(rows)} checks, {len(failed)} failed", "",
              "| model | checks | failed | worst rel_err (f32 limit 1e-4) | worst cosine (limit 0.99) |", "|---|---|---|---|---|"]
        models = []
        for x in rows:
            if x["model"] not in models:
                models.append(x["model"])
        for m in models:
            xs = [x for x in rows if x["model"] == m]
            rel = [x["value"] for x in xs if x["metric"] == "rel_err"]
            cos = [x["value"] for x in xs if x["metric"] == "cosine"]
            L.append(f"| {m} | {len(xs)} | {sum(not x['passed'] for x in xs)} | "
                     f"{max(rel):.2e} | " if rel else f"| {m} | {len(xs)} | {sum(not x['passed'] for x in xs)} | - | ")
            L[-1] += f"{min(cos):.5f} |" if cos else "- |"
        for x in failed:
            L.append(f"\nFAILED {x['model']} {x['check']}: {x['metric']} = {x['value']} (needs {x['limit']}) {x['detail']}")
        for s in r.get("skipped", []):
            L.append(f"\nskipped: {s}")
        L.append("")
    L += ["## Speed: one paired exp12 episode, ours vs transformers, same device, weights and workload", ""]
    pairs = [(n, load(o), load(p)) for n, o, p in a.pair]
    if pairs:
        o0 = next((o for _, o, _ in pairs if "error" not in o), {})
        L += [f"Workload: {o0.get('new_tokens', '?')} new tokens per row "
              f"(baseline + steered), hook at the auto layer (`last` positions), dtype {o0.get('dtype', '?')}, "
              f"median of {o0.get('reps', '?')}. Prompt: fixed text ids for text models; for Qwen2-VL the screenshot "
              "workload (a picture through each side's image processor, the chat template, filler text ids), the vision "
              "tower running in every prefill. Same ids = both sides' `prompt_hash` agree. "
              "Speed-up = transformers time / ours (or ours tokens/s / transformers).", ""]
        L += ["| model | prompt tokens (image tokens) | same ids | ours sequential s | ours batched s | transformers sequential s | transformers batched s | "
              "transformers sequential / ours sequential | transformers sequential / ours batched (target ≥ 10×) | "
              "decode tok/s b1 ours / transformers | prefill tok/s ours / transformers | all-layer extraction ms ours / transformers |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for n, o, p in pairs:
            if "error" in o or "error" in p:
                L.append(f"| {n} | {o.get('error', '')} {p.get('error', '')} | | | | | | | | | | |")
                continue
            L.append(
                f"| {n} | {workload(o)} | {same_ids(o, p)} | {o['sequential_s']:.3f} | {o['batched_s']:.3f} | {p['sequential_s']:.3f} | {p['batched_s']:.3f} | "
                f"{ratio(p['sequential_s'], o['sequential_s'])} | {ratio(p['sequential_s'], o['batched_s'])} | "
                f"{o['decode_tok_s_b1']:.1f} / {p['decode_tok_s_b1']:.1f} = {ratio(o['decode_tok_s_b1'], p['decode_tok_s_b1'])} | "
                f"{o['prefill_tok_s']:,.0f} / {p['prefill_tok_s']:,.0f} = {ratio(o['prefill_tok_s'], p['prefill_tok_s'])} | "
                f"{o['extract_s'] * 1e3:.1f} / {p['extract_s'] * 1e3:.1f} = {ratio(p['extract_s'], o['extract_s'])} |")
        L.append("")
        if bw:
            L += [f"Decode against the memory-bandwidth floor ({bw:,.0f} GB/s; floor = resident weight bytes / bandwidth per step):", "",
                  "| model | weights MiB | floor ms/step | ours ms/step (b1) | ours / floor (target ≤ 3×) |", "|---|---|---|---|---|"]
            for n, o, p in pairs:
                if "error" in o or not o.get("weights_bytes"):
                    continue
                floor = o["weights_bytes"] / (bw * 1e9) * 1e3
                step = 1e3 / o["decode_tok_s_b1"]
                L.append(f"| {n} | {mib(o['weights_bytes'])} | {floor:.3f} | {step:.3f} | {step / floor:.2f}× |")
            L.append("")
        L += ["Peak device memory (MiB; ours: the CUDA memory pool's high-water mark, transformers: "
              "torch.cuda.max_memory_allocated; both include the weights):", "",
              "| model | weights ours / transformers | batch 1 ours / transformers | batch 2 ours / transformers | extraction ours / transformers |",
              "|---|---|---|---|---|"]
        for n, o, p in pairs:
            if "error" in o or "error" in p:
                continue
            L.append(f"| {n} | {mib(o['weights_bytes'])} / {mib(p['weights_bytes'])} | {mib(o['peak_bytes_b1'])} / {mib(p['peak_bytes_b1'])} | "
                     f"{mib(o['peak_bytes_b2'])} / {mib(p['peak_bytes_b2'])} | {mib(o['peak_bytes_extract'])} / {mib(p['peak_bytes_extract'])} |")
        L.append("")
        L += ["Issue 10's transformers figures (H100 80GB) for reference: " + "; ".join(
            f"{k}: sequential {v[0]} s, batched {v[1]} s, decode {v[2]} tok/s, prefill {v[3]:,} tok/s" for k, v in ISSUE_FIGURES.items()), ""]
        L += ["Implementations: " + "; ".join(sorted({o.get('implementation', '?') for _, o, _ in pairs} | {p.get('implementation', '?') for _, _, p in pairs})), ""]
    L.append(f"Goldens: {'all passed' if ok_all else 'FAILURES above'}.")
    text = "\n".join(L) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
