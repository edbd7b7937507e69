#!/usr/bin/env python3
"""Logit and greedy-continuation references from transformers loading the real GGUFs (dequantized,
f32), for tests/gguf_goldens.rs.

Writes tests/fixtures/<name>/logits.json for each GGUF present under $MINIWOB_STEER_HOME/models:
  smollm2  SmolLM2-135M-Instruct.Q4_1.gguf   (required)
  qwen2    qwen2.5-coder-0.5b-instruct.gguf  (if present)
  qwen2-1.5b  qwen2.5-coder-1.5b-instruct-q4_k_m.gguf  (if present; fetched on request)

Per chat prompt: the prompt ids (from the model's chat template, rendered by transformers), the
top-64 last-position logits, the logits at 512 fixed random vocabulary ids (so a cosine over a fixed
sample of the vocabulary can be checked without committing full-vocabulary vectors), and the greedy
continuation (`NEW_TOKENS` tokens, no stop). For qwen2 (qwen2-1.5b) also the layer-12 (14) output (the point
`blocks.12.hook_resid_post`, captured with a forward hook) of the first prompt, every position.

The tokenizer fixes of smollm2_tokenizer.py apply: the ids come from the corrected tokenizer, so the
Rust side can be checked on exactly the same inputs.

Run: target/py/bin/python scripts/goldens/gguf_goldens.py [smollm2 qwen2 qwen2-1.5b]
"""

import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_tokenizer import fix_qwen2, fix_smollm  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HOME = Path(os.environ.get("MINIWOB_STEER_HOME", Path.home() / ".cache" / "miniwob-steer"))
TOP_K = 64
SAMPLE = 512

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    'You see: <button ref=4>Submit</button> <input ref=5 type="text">. Task: click the Submit button. Answer with one action like `click ref=N`.',
    "List three colors.",
]


def write(name, gguf, fix, new_tokens, hidden_layer=None):
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    fix(tok)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(7)
    sample_ids = torch.randperm(vocab, generator=g)[:SAMPLE].sort().values
    cases = []
    for i, prompt in enumerate(PROMPTS):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        hidden = {}
        hook = None
        if hidden_layer is not None and i == 0:
            hook = model.model.layers[hidden_layer].register_forward_hook(
                lambda m, a, out: hidden.__setitem__("h", (out[0] if isinstance(out, tuple) else out)[0].clone())
            )
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        if hook is not None:
            hook.remove()
        top = torch.topk(logits, TOP_K)
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        cont = gen[0, ids.shape[1]:].tolist()
        case = {
            "prompt": prompt,
            "text": text,
            "ids": ids[0].tolist(),
            "top_ids": top.indices.tolist(),
            "top_logits": [round(x, 5) for x in top.values.tolist()],
            "sample_ids": sample_ids.tolist(),
            "sample_logits": [round(x, 5) for x in logits[sample_ids].tolist()],
            "greedy": cont,
            "greedy_text": tok.decode(cont),
        }
        if "h" in hidden:
            case["hidden_layer"] = hidden_layer
            case["hidden"] = [[round(x, 5) for x in row] for row in hidden["h"].tolist()]
        cases.append(case)
        print(f"{name}: {prompt[:40]!r} -> {tok.decode(cont)!r}")
    out = ROOT / "tests" / "fixtures" / name
    out.mkdir(parents=True, exist_ok=True)
    import transformers

    doc = {"gguf": gguf.name, "transformers": transformers.__version__, "torch": torch.__version__, "cases": cases}
    (out / "logits.json").write_text(json.dumps(doc, ensure_ascii=False) + "\n")


def main():
    # `gguf_goldens.py [NAME...]` regenerates only the named fixtures (smollm2, qwen2, qwen2-1.5b).
    only = set(sys.argv[1:])
    torch.set_num_threads(2)
    models = [
        ("smollm2", "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf", fix_smollm, 12, None),
        ("qwen2", "qwen-coder-0.5b/qwen2.5-coder-0.5b-instruct.gguf", fix_qwen2, 16, 12),
        # The 1.5B is fetched on request (scripts/setup.sh --models qwen-coder-1.5b); layer 14 is
        # its auto layer, the steering point of Qwen2-VL-2B's same-shaped text tower.
        ("qwen2-1.5b", "qwen-coder-1.5b/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", fix_qwen2, 16, 14),
    ]
    for name, rel, fix, new_tokens, layer in models:
        if only and name not in only:
            continue
        path = HOME / "models" / rel
        if not path.exists():
            if name == "smollm2":
                sys.exit(f"missing {path}: run scripts/setup.sh first")
            print(f"skipping {name}: no {path}")
            continue
        write(name, path, fix, new_tokens=new_tokens, hidden_layer=layer)


if __name__ == "__main__":
    main()
