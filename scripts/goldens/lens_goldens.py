#!/usr/bin/env python3
"""Goldens for `src/interp/` (tests/interp_goldens.rs): image-position hidden states of every
layer of the committed tiny Qwen2-VL (tests/fixtures/tiny-qwen2-vl, loaded, not regenerated) on
two aspect ratios, and numpy brute-force references for the three lenses.

Writes tests/fixtures/lens/:

  hidden.safetensors   per image `<img>.`: input_ids, image_positions (where <|image_pad|> sits),
                       grid_thw, rope_hw [n, 2] (M-RoPE row/col ids of the image tokens minus the
                       image's start), hs.{j} [n, hidden] = transformers `output_hidden_states[j]` at
                       the image positions (hs.0 = hook_embed, hs.j = blocks.{j-1}.hook_resid_post
                       for j < L, hs.L = hook_final_norm: transformers norms its last entry),
                       resid_post_last (blocks.{L-1}.hook_resid_post, by a forward hook),
                       logits [n, vocab] (the model's own logits at those positions)
  index.safetensors    the contextual index built here from CORPUS: layer.{hook} [slots, hidden] f16
                       (L2-normalised), slot_token_id, slot_sentence, slot_position (i64)
  lens.json            per image, per query layer: the top-K of the embedding lens, the logit lens
                       and the contextual lens (cross-layer merge), ids and scores, numpy f32;
                       the corpus, the reservoir rule's parameters

The reservoir rule (the same in src/interp/index.rs): corpus lines in order, token positions >= 2
in order; the key is the token's decoded string; the first PER_TOKEN occurrences of a key take new
slots (slot ids count up in order of allocation); occurrence n >= PER_TOKEN draws
j = splitmix64() % (n + 1) from one generator seeded with SEED for the whole corpus and
replaces the key's j-th slot when j < PER_TOKEN.

Run: /tmp/wt24py/bin/python scripts/goldens/lens_goldens.py (or target/py after venv.sh)
"""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerFast, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "tests" / "fixtures" / "tiny-qwen2-vl"
OUT = ROOT / "tests" / "fixtures" / "lens"
K = 5
PER_TOKEN = 2
MIN_POSITION = 2
SEED = 7
TEXT = "Describe the picture."
# Index layers (TransformerLens names) of the 3-layer tiny model.
INDEX_LAYERS = [0, 1, 2]
CORPUS = [
    "Click on the button.",
    "Select the checkbox and press submit.",
    "Enter the text into the field.",
    "The screenshot shows the task area.",
    "Click on the link and select the option.",
    "What is in the image? Describe the picture.",
    "Press the submit button on the page.",
    "Type the text into the field and click submit.",
]
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


def topk(scores, k):
    # Highest score first, ties by the lower index (np.lexsort: last key is primary).
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return [int(i) for i in order], [float(scores[i]) for i in order]


def rms_norm(x, w, eps):
    x = x.astype(np.float32)
    var = (x * x).mean(-1, keepdims=True)
    return (x / np.sqrt(var + eps)).astype(np.float32) * w


def main():
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    cfg_json = json.loads((MODEL / "config.json").read_text())
    tmpl = json.loads((MODEL / "chat_template.json").read_text())["chat_template"]
    tok = PreTrainedTokenizerFast(tokenizer_file=str(MODEL / "tokenizer.json"), eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", chat_template=tmpl)
    model = Qwen2VLForConditionalGeneration.from_pretrained(MODEL, torch_dtype=torch.float32).eval()
    image_id = cfg_json["image_token_id"]
    n_layers = model.config.text_config.num_hidden_layers
    eps = model.config.text_config.rms_norm_eps
    lm = model.model.language_model
    E = lm.embed_tokens.weight.detach().numpy().astype(np.float32)
    norm_w = lm.norm.weight.detach().numpy().astype(np.float32)
    head = model.lm_head.weight.detach().numpy().astype(np.float32)
    improc = Qwen2VLImageProcessorPil()

    # --- contextual index over the corpus (text backbone, transformers hidden states) ---
    rng = SplitMix64(SEED)
    counts, slots_of = {}, {}
    slot_meta = []  # (token_id, sentence, position)
    vecs = {l: [] for l in INDEX_LAYERS}
    for si, sent in enumerate(CORPUS):
        ids = torch.tensor([tok(sent)["input_ids"]])
        with torch.no_grad():
            out = lm(input_ids=ids, output_hidden_states=True)
        hs = out.hidden_states  # hs[l+1] = blocks.l.hook_resid_post for l < L-1
        last = None
        if n_layers - 1 in INDEX_LAYERS:
            cap = {}
            h = lm.layers[n_layers - 1].register_forward_hook(lambda m, a, o: cap.__setitem__("x", o[0] if isinstance(o, tuple) else o))
            with torch.no_grad():
                lm(input_ids=ids)
            h.remove()
            last = cap["x"][0].numpy()
        for p in range(MIN_POSITION, ids.shape[1]):
            tid = int(ids[0, p])
            key = tok.decode([tid])
            n = counts.get(key, 0)
            if n < PER_TOKEN:
                slot = len(slot_meta)
                slot_meta.append(None)
                for l in INDEX_LAYERS:
                    vecs[l].append(None)
                slots_of.setdefault(key, []).append(slot)
            else:
                j = rng.next() % (n + 1)
                slot = slots_of[key][j] if j < PER_TOKEN else None
            counts[key] = n + 1
            if slot is None:
                continue
            slot_meta[slot] = (tid, si, p)
            for l in INDEX_LAYERS:
                v = last[p] if l == n_layers - 1 else hs[l + 1][0, p].numpy()
                v = v.astype(np.float32)
                vecs[l][slot] = (v / np.linalg.norm(v)).astype(np.float16)
    index = {f"layer.blocks.{l}.hook_resid_post": torch.from_numpy(np.stack(vecs[l])) for l in INDEX_LAYERS}
    index["slot_token_id"] = torch.tensor([m[0] for m in slot_meta], dtype=torch.int64)
    index["slot_sentence"] = torch.tensor([m[1] for m in slot_meta], dtype=torch.int64)
    index["slot_position"] = torch.tensor([m[2] for m in slot_meta], dtype=torch.int64)
    save_file(index, OUT / "index.safetensors")
    replaced = sum(max(0, c - PER_TOKEN) for c in counts.values())
    print("index", len(slot_meta), "slots,", sum(counts.values()), "occurrences,", replaced, "past the reservoir")

    # --- image-position hidden states, two aspect ratios ---
    En = E / np.linalg.norm(E, axis=1, keepdims=True)
    stacked = [vecs[l] for l in INDEX_LAYERS]
    flat = np.concatenate([np.stack(s).astype(np.float32) for s in stacked], 0)
    n_slots = len(slot_meta)
    hidden, lens = {}, {}
    for name in ["wide", "tall"]:
        img = Image.open(MODEL / "images" / f"{name}.png").convert("RGB")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TEXT}]}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        px = improc(images=[img], return_tensors="pt")
        grid = px["image_grid_thw"][0]
        text = text.replace("<|image_pad|>", "<|image_pad|>" * int(grid.prod() // 4))
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        mm = (ids == image_id).to(torch.int32)
        cap = {}
        h = lm.layers[n_layers - 1].register_forward_hook(lambda m, a, o: cap.__setitem__("x", o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            model.model.rope_deltas = None
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                        pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"], output_hidden_states=True)
            pos, _ = model.model.get_rope_index(ids, mm, image_grid_thw=px["image_grid_thw"])
        h.remove()
        where = torch.nonzero(ids[0] == image_id)[:, 0]
        s = f"{name}."
        hidden[s + "input_ids"] = ids[0].to(torch.int64)
        hidden[s + "image_positions"] = where.to(torch.int64)
        hidden[s + "grid_thw"] = grid.to(torch.int64)
        hw = pos[1:, 0, where].T
        hidden[s + "rope_hw"] = (hw - hw.min(0).values).to(torch.int64).contiguous()
        for j, t in enumerate(out.hidden_states):
            hidden[s + f"hs.{j}"] = t[0, where].contiguous()
        hidden[s + "resid_post_last"] = cap["x"][0, where].contiguous()
        hidden[s + "logits"] = out.logits[0, where].contiguous()
        # Lens references on exactly these vectors.
        queries = {f"blocks.{l}.hook_resid_post": hidden[s + f"hs.{l + 1}"].numpy() for l in range(n_layers - 1)}
        queries[f"blocks.{n_layers - 1}.hook_resid_post"] = hidden[s + "resid_post_last"].numpy()
        queries["hook_embed"] = hidden[s + "hs.0"].numpy()
        per = {}
        for hook, Q in queries.items():
            emb, logit, ctx = [], [], []
            for q in Q.astype(np.float32):
                qn = q / np.linalg.norm(q)
                emb.append(topk(En @ qn, K))
                logit.append(topk(head @ rms_norm(q, norm_w, eps), K))
                ids_, sc = topk(flat @ qn, K)
                ctx.append([[INDEX_LAYERS[i // n_slots], i % n_slots, x] for i, x in zip(ids_, sc)])
            per[hook] = {"embedding": emb, "logit": logit, "contextual": ctx}
        lens[name] = per
        print(name, "seq", ids.shape[1], "grid", grid.tolist(), "image tokens", len(where))
    save_file(hidden, OUT / "hidden.safetensors")
    import transformers
    (OUT / "lens.json").write_text(json.dumps({
        "k": K, "per_token": PER_TOKEN, "min_position": MIN_POSITION, "seed": SEED, "text": TEXT,
        "index_layers": INDEX_LAYERS, "corpus": CORPUS,
        "slot_keys": [tok.decode([m[0]]) for m in slot_meta],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__},
        "lens": lens,
    }) + "\n")


if __name__ == "__main__":
    main()
