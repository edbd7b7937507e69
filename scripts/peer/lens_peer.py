#!/usr/bin/env python3
"""The Python peer of `lens index` / `lens bench` (docs/lens.md, "Speed and scale").

  index: transformers (f32, eager) over a corpus, the same reservoir rule as src/interp/index.rs
         (splitmix64, per-token cap, positions >= min), L2-normalise, f16 rows written to one file
         per layer. Prints {"occurrences", "slots", "secs", "tokens_per_s"}.
  query: brute-force torch matmul over an index written by `lens bench` / `lens index`
         (np.memmap, f16 rows converted per chunk like the Rust side), top-k per layer, merged
         across layers; compares ids with the Rust top-k (`lens bench --dump`). Prints
         {"vision_tokens_per_s", "same_topk", "max_score_diff"}.
"""

import argparse
import json
import os
import time

import numpy as np
import torch

MASK = (1 << 64) - 1


class SplitMix64:
    def __init__(self, seed):
        self.s = seed & MASK

    def next(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & MASK
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)


def cmd_index(a):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if a.gguf:
        d, f = os.path.split(a.gguf)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, attn_implementation="eager")
    else:
        from transformers import PreTrainedTokenizerFast, Qwen2VLForConditionalGeneration

        tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(a.model_dir, "tokenizer.json"), pad_token="<|endoftext|>")
        model = Qwen2VLForConditionalGeneration.from_pretrained(a.model_dir, dtype=torch.float32).model.language_model
    model.eval()
    layers = [int(x) for x in a.layers.split(",")]
    sents = [l.strip() for l in open(a.corpus) if l.strip()][: a.max_sentences]
    os.makedirs(a.out, exist_ok=True)
    files = [open(os.path.join(a.out, f"py-layer-{k}.f16"), "w+b") for k in range(len(layers))]
    rng, counts, slots_of, n_slots, occ = SplitMix64(a.seed), {}, {}, 0, 0
    keys = {}
    t0 = time.perf_counter()
    for b in range(0, len(sents), a.batch):
        chunk = sents[b : b + a.batch]
        ids = [tok(s)["input_ids"] for s in chunk]
        L = max(len(x) for x in ids)
        pad = tok.pad_token_id or 0
        inp = torch.tensor([[pad] * (L - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in ids])
        with torch.no_grad():
            hs = model(input_ids=inp, attention_mask=mask, output_hidden_states=True).hidden_states
        # hidden_states[l + 1] = blocks.l.hook_resid_post (l < L - 1).
        sel = [hs[l + 1].float().numpy() for l in layers]
        for r, x in enumerate(ids):
            off = L - len(x)
            for p in range(a.min_position, len(x)):
                tid = x[p]
                key = keys.get(tid)
                if key is None:
                    key = keys[tid] = tok.decode([tid])
                occ += 1
                n = counts.get(key, 0)
                if n < a.per_token:
                    slot = n_slots
                    n_slots += 1
                    slots_of.setdefault(key, []).append(slot)
                else:
                    j = rng.next() % (n + 1)
                    slot = slots_of[key][j] if j < a.per_token else None
                counts[key] = n + 1
                if slot is None:
                    continue
                for f, s in zip(files, sel):
                    v = s[r, off + p]
                    f.seek(slot * v.size * 2)
                    f.write((v / np.linalg.norm(v)).astype(np.float16).tobytes())
    for f in files:
        f.close()
    secs = time.perf_counter() - t0
    print(json.dumps({"occurrences": occ, "slots": n_slots, "secs": secs, "tokens_per_s": occ / secs,
                      "threads": torch.get_num_threads()}))


def cmd_query(a):
    from safetensors.numpy import load_file

    meta = json.load(open(os.path.join(a.index, "index.json")))
    n, h = meta["slots"], meta["hidden"]
    dump = load_file(a.dump)
    q = torch.from_numpy(dump["queries"].astype(np.float32))
    q = q / q.norm(dim=1, keepdim=True)
    k = dump["slot"].shape[1]
    t0 = time.perf_counter()
    best_s, best_i = None, None
    for li in range(len(meta["hook_points"])):
        m = np.memmap(os.path.join(a.index, f"layer-{li}.f16"), dtype=np.float16, mode="r", shape=(n, h))
        for s in range(0, n, a.chunk):
            rows = torch.from_numpy(np.asarray(m[s : s + a.chunk]).astype(np.float32))
            sc = q @ rows.T
            v, i = sc.topk(min(k, sc.shape[1]), dim=1)
            i = i + s + li * n
            if best_s is None:
                best_s, best_i = v, i
            else:
                v2, j = torch.cat([best_s, v], 1).topk(k, dim=1)
                best_i = torch.cat([best_i, i], 1).gather(1, j)
                best_s = v2
    secs = time.perf_counter() - t0
    flat = dump["layer"].astype(np.int64) * n + dump["slot"].astype(np.int64)
    same = bool((best_i.numpy() == flat).all())
    print(json.dumps({"queries": int(q.shape[0]), "secs": secs, "vision_tokens_per_s": q.shape[0] / secs,
                      "same_topk": same, "max_score_diff": float((best_s.numpy() - dump["score"]).__abs__().max()),
                      "threads": torch.get_num_threads()}))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("index")
    i.add_argument("--gguf")
    i.add_argument("--model-dir")
    i.add_argument("--corpus", required=True)
    i.add_argument("--layers", required=True)
    i.add_argument("--per-token", type=int, default=20)
    i.add_argument("--min-position", type=int, default=2)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--batch", type=int, default=8)
    i.add_argument("--max-sentences", type=int)
    i.add_argument("--out", required=True)
    q = sub.add_parser("query")
    q.add_argument("--index", required=True)
    q.add_argument("--dump", required=True)
    q.add_argument("--chunk", type=int, default=16384)
    for p in (i, q):
        p.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    {"index": cmd_index, "query": cmd_query}[a.cmd](a)


if __name__ == "__main__":
    main()
