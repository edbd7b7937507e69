#!/usr/bin/env python3
"""A seeded random peft-format LoRA adapter for a model's shapes, for benchmarks and demos (no
training): adapter_config.json + adapter_model.safetensors, every decoder projection targeted.

  random_lora.py --layers 24 --hidden 896 --heads 14 --kv-heads 2 --head-dim 64 \
      --intermediate 4864 --rank 8 --seed 0 --out /tmp/lora-0.5b      # qwen-coder-0.5b

Needs numpy and safetensors (the goldens venv).
"""
import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

p = argparse.ArgumentParser()
for k in ["layers", "hidden", "heads", "kv-heads", "head-dim", "intermediate", "rank", "seed"]:
    p.add_argument(f"--{k}", type=int, required=k not in ("rank", "seed"), default={"rank": 8, "seed": 0}.get(k))
p.add_argument("--alpha", type=float, default=16.0)
p.add_argument("--out", required=True)
a = p.parse_args()
rng = np.random.default_rng(a.seed)
q, kv, h, im, r = a.heads * a.head_dim, a.kv_heads * a.head_dim, a.hidden, a.intermediate, a.rank
shapes = {
    "self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, q),
    "mlp.gate_proj": (im, h), "mlp.up_proj": (im, h), "mlp.down_proj": (h, im),
}
t = {}
for layer in range(a.layers):
    for mod, (out, inp) in shapes.items():
        k = f"base_model.model.model.layers.{layer}.{mod}"
        t[f"{k}.lora_A.weight"] = (rng.standard_normal((r, inp)) / np.sqrt(inp)).astype(np.float32)
        t[f"{k}.lora_B.weight"] = (rng.standard_normal((out, r)) * 0.01).astype(np.float32)
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
save_file(t, out / "adapter_model.safetensors")
cfg = {"peft_type": "LORA", "r": r, "lora_alpha": a.alpha, "bias": "none", "use_dora": False, "use_rslora": False,
       "fan_in_fan_out": False, "modules_to_save": None,
       "target_modules": sorted(m.split(".")[-1] for m in shapes)}
(out / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
print(f"wrote {out}: {len(t) // 2} LoRA pairs, rank {r}")
