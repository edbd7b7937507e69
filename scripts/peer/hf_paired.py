#!/usr/bin/env python3
"""The transformers peer of `miniwob-steer bench paired` (src/cli/bench/paired.rs): the same workload on
the same checkpoint, device and dtype, measured the same way, printed as one JSON object with
the same keys.

Workload (the model decides which, as on the Rust side):
- text: a prompt of --prompt-tokens (default 400) fixed token ids (`workload_ids`, identical to
  the Rust side);
- vlm (a Qwen2-VL checkpoint): the picture `workload_image` (--image-size, default 320x420:
  grid 1x30x22, 165 image tokens) through Qwen2VLImageProcessorPil, the checkpoint's chat template
  for one user turn (the image, then an empty text) with the image pads expanded (what
  Qwen2VLProcessor does; it cannot be built without torchvision), and the token ids of
  `VLM_FILLER` cycled into the text slot after <|vision_end|> up to --prompt-tokens in all
  (default 487). pixel_values, image_grid_thw and mm_token_type_ids go with every call, so every
  generate and forward runs the vision tower. `prompt_hash` must equal the Rust side's.
A steering forward hook on decoder layer L adding coeff * v at the last position of every
forward (the last prompt token, then every generated token: exp12's `last`), --new-tokens new
tokens per row with stop tokens disabled (min_new_tokens), greedy, eager attention (as measured
in issue 10) unless --attn says otherwise.
- sequential paired episode: baseline row (no hook) then steered row, batch 1 each, model.generate;
- batched paired episode: one batch of 2 rows, coefficients [0, coeff];
- decode tokens/s at batch 1 (steered; a manual KV-cache loop) and prefill tokens/s (one forward);
- all-layer extraction: one forward with output_hidden_states=True;
- peak memory per workload: torch.cuda.max_memory_allocated (weights included); null on the CPU.
One untimed warm-up, then --reps timed runs; medians.
"""

import argparse
import hashlib
import json
import os
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def workload_ids(n):
    return [1000 + (i * 7919) % 20000 for i in range(n)]


# The VLM workload (src/models/workload.rs: VLM_FILLER, workload_image, vlm_workload).
VLM_FILLER = "Click the button labelled Submit, then type the name into the text field and press Enter. "


def workload_image(w, h):
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    arr = np.stack([(7 * x + 13 * y) % 256, (3 * x + 5 * y + 100) % 256, (x * y) % 256], -1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def vlm_workload(model_dir, cfg, prompt_tokens, w, h):
    """input_ids, mm_token_type_ids, pixel_values and image_grid_thw of the VLM workload (batch 1)."""
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil

    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(model_dir, "tokenizer.json"))
    ct = os.path.join(model_dir, "chat_template.json")
    if os.path.exists(ct):
        with open(ct) as f:
            template = json.load(f)["chat_template"]
    else:
        with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
            template = json.load(f)["chat_template"]
    pre = os.path.join(model_dir, "preprocessor_config.json")
    improc = Qwen2VLImageProcessorPil.from_pretrained(model_dir) if os.path.exists(pre) else Qwen2VLImageProcessorPil()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ""}]}]
    text = tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    px = improc(images=[workload_image(w, h)], return_tensors="pt")
    grid = px["image_grid_thw"]
    parts = text.split("<|image_pad|>")
    assert len(parts) == 2, text
    text = parts[0] + "<|image_pad|>" * int(grid[0].prod() // improc.merge_size**2) + parts[1]
    base = tok(text, add_special_tokens=False)["input_ids"]
    end = cfg.vision_end_token_id
    assert base.count(end) == 1, "the rendered one-image prompt must hold exactly one <|vision_end|>"
    at = base.index(end) + 1
    n_text = prompt_tokens - len(base)
    if n_text < 0:
        raise SystemExit(f"hf_paired.py: --prompt-tokens {prompt_tokens} is below the {len(base)} tokens of the "
                         f"chat template and the {w}x{h} image alone")
    filler = tok(VLM_FILLER, add_special_tokens=False)["input_ids"]
    ids = base[:at] + [filler[i % len(filler)] for i in range(n_text)] + base[at:]
    return ids, px["pixel_values"], grid


def prompt_hash(ids):
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]


def decoder_layers(model, n):
    for name, mod in model.named_modules():
        if name.endswith("layers") and isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return mod
    raise SystemExit(f"hf_paired.py: no ModuleList of {n} decoder layers found in {type(model).__name__}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--attn", default="eager")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="default 400 (text), 487 (VLM, in all)")
    ap.add_argument("--image-size", default="320x420", help="the VLM workload's picture, WIDTHxHEIGHT")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--layer", type=int, default=-1, help="decoder layer (default: 50%% depth, the auto layer)")
    ap.add_argument("--coeff", type=float, default=4.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
    cuda = dev.type == "cuda"
    cfg = AutoConfig.from_pretrained(a.model_dir)
    if cfg.model_type == "qwen2_vl":
        from transformers import Qwen2VLForConditionalGeneration as Cls
    else:
        Cls = AutoModelForCausalLM
    model = Cls.from_pretrained(a.model_dir, dtype=dtype, attn_implementation=a.attn).to(dev).eval()
    text_cfg = getattr(cfg, "text_config", None) or cfg
    n_layers = text_cfg.num_hidden_layers
    layer = a.layer if a.layer >= 0 else n_layers // 2
    layers = decoder_layers(model, n_layers)
    if cuda:
        torch.cuda.synchronize()
    weights_bytes = torch.cuda.memory_allocated(dev) if cuda else None

    g = torch.Generator().manual_seed(0)
    v = torch.randn(text_cfg.hidden_size, generator=g)
    v = (v / v.norm()).to(dev, dtype)
    coeffs = None  # None: hook does nothing; else a [batch] tensor

    def hook(m, args, out):
        if coeffs is None:
            return out
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[:, -1] += coeffs[:, None].to(h.dtype) * v
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    layers[layer].register_forward_hook(hook)
    vlm = cfg.model_type == "qwen2_vl"
    image = {}
    if vlm:
        iw, ih = (int(x) for x in a.image_size.lower().split("x"))
        ids, pixel_values, grid = vlm_workload(a.model_dir, cfg, a.prompt_tokens or 487, iw, ih)
        image = {"image_size": [iw, ih], "image_grid_thw": grid[0].tolist()}
    else:
        ids = workload_ids(a.prompt_tokens or 400)
    ids1 = torch.tensor([ids], device=dev)
    n_prompt = ids1.shape[1]
    # Everything a call needs besides input_ids, per batch size: the images ride along (the
    # vision tower runs in every prefill), as transformers' generate and forward take them.
    extra = {1: {}, 2: {}}
    if vlm:
        mm = (ids1 == cfg.image_token_id).to(torch.int32)
        px = pixel_values.to(dev, dtype)
        extra = {b: {"pixel_values": torch.cat([px] * b), "image_grid_thw": grid.repeat(b, 1).to(dev),
                     "mm_token_type_ids": mm.repeat(b, 1)} for b in (1, 2)}
    image_tokens = int((ids1 == cfg.image_token_id).sum()) if vlm else 0
    ids2 = ids1.repeat(2, 1)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def gen(ids):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                             min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0, **extra[ids.shape[0]])
        assert out.shape[1] == ids.shape[1] + a.new_tokens, out.shape

    def timed(f):
        f()
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        ts = []
        for _ in range(max(a.reps, 1)):
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts), (torch.cuda.max_memory_allocated(dev) if cuda else None)

    def sequential():
        nonlocal coeffs
        coeffs = None
        gen(ids1)
        coeffs = torch.tensor([a.coeff], device=dev)
        gen(ids1)

    def batched():
        nonlocal coeffs
        coeffs = torch.tensor([0.0, a.coeff], device=dev)
        gen(ids2)

    with torch.no_grad():
        seq_s, peak_b1 = timed(sequential)
        bat_s, peak_b2 = timed(batched)
        coeffs = torch.tensor([a.coeff], device=dev)
        pre, dec = [], []
        for rep in range(max(a.reps, 1) + 1):
            sync()
            t0 = time.perf_counter()
            out = model(ids1, use_cache=True, **extra[1])
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            nxt.tolist()
            t_pre = time.perf_counter() - t0
            past = out.past_key_values
            t1 = time.perf_counter()
            for _ in range(a.new_tokens):
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                nxt.tolist()
            t_dec = time.perf_counter() - t1
            if rep > 0:
                pre.append(n_prompt / t_pre)
                dec.append(a.new_tokens / t_dec)
        coeffs = None

        def extract():
            out = model(ids1, output_hidden_states=True, **extra[1])
            assert len(out.hidden_states) == n_layers + 1

        ext_s, peak_ext = timed(extract)
    r = {
        "implementation": f"transformers {__import__('transformers').__version__} (torch {torch.__version__}, {a.attn})",
        "model": a.model_dir, "device": str(dev), "dtype": a.dtype, "layers": n_layers, "layer": layer,
        "hook_point": f"blocks.{layer}.hook_resid_post", "coeff": a.coeff, "workload": "vlm" if vlm else "text",
        "prompt_tokens": n_prompt, "image_tokens": image_tokens, "image_size": image.get("image_size"),
        "image_grid_thw": image.get("image_grid_thw"), "prompt_hash": prompt_hash(ids),
        "new_tokens": a.new_tokens, "reps": max(a.reps, 1), "sequential_s": seq_s, "batched_s": bat_s,
        "decode_tok_s_b1": statistics.median(dec), "prefill_tok_s": statistics.median(pre), "extract_s": ext_s,
        "weights_bytes": weights_bytes, "peak_bytes_b1": peak_b1, "peak_bytes_b2": peak_b2,
        "peak_bytes_extract": peak_ext, "threads": a.threads,
    }
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
