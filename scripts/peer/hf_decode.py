#!/usr/bin/env python3
"""The Python peer of `miniwob-steer bench decode`: transformers f32, eager attention, a steering
forward hook on decoder layer L (the exp12 way), greedy decode with the KV cache.

Same workload as the Rust side: a prompt of exactly --prompt-tokens tokens built by repeating one
sentence, --new-tokens decode steps, one untimed warm-up then --reps timed runs (median reported).
Prints one JSON line: {"prefill_tok_s": ..., "decode_tok_s": ..., "threads": ...}.
"""

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

BASE = "The quick brown fox jumps over the lazy dog while the web agent clicks the submit button. "


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf")
    ap.add_argument("--model-dir")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--coeff", type=float, default=4.0)
    ap.add_argument("--hook", choices=["none", "steer", "zero"], default="none")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.gguf:
        import os

        d, f = os.path.split(a.gguf)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, attn_implementation="eager")
    else:
        tok = AutoTokenizer.from_pretrained(a.model_dir)
        model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids = []
    while len(ids) < a.prompt_tokens:
        ids += tok(BASE, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ids[: a.prompt_tokens]])

    g = torch.Generator().manual_seed(0)
    v = torch.randn(model.config.hidden_size, generator=g)
    v = v / v.norm()
    coeff = {"none": None, "steer": a.coeff, "zero": 0.0}[a.hook]

    def hook(m, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[:, -1] += coeff * v  # exp12: last prompt position, then every generated one
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    if coeff is not None:
        model.model.layers[a.layer].register_forward_hook(hook)

    pre, dec = [], []
    with torch.no_grad():
        for rep in range(a.reps + 1):
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t_pre = time.perf_counter() - t0
            past = out.past_key_values
            t1 = time.perf_counter()
            for _ in range(a.new_tokens):
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t_dec = time.perf_counter() - t1
            if rep > 0:
                pre.append(a.prompt_tokens / t_pre)
                dec.append(a.new_tokens / t_dec)
    print(json.dumps({"prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec), "threads": a.threads}))


if __name__ == "__main__":
    main()
