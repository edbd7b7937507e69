#!/usr/bin/env python3
"""Protocol references from transformers loading the real Qwen2.5-Coder-0.5B GGUF (dequantized, f32):
greedy decoding with a repetition penalty, and contrastive (CAA) steering vectors built two ways.

Writes tests/fixtures/qwen2/protocol.json:

* repetition_penalty: for each prompt of tests/fixtures/qwen2/logits.json (its chat-rendered `ids`),
  the greedy continuation of `max_new_tokens` tokens with transformers' `repetition_penalty`
  (`greedy`) and without it (`greedy_plain`). transformers' penalty (RepetitionPenaltyLogitsProcessor)
  looks at every id seen so far, prompt included: each distinct such id's logit is divided by the
  penalty when positive and multiplied by it when negative, then the argmax is taken. No other logits
  processor and no stop: the generation config is built explicitly (greedy, no eos, no top-k/top-p/
  temperature, exactly `max_new_tokens` tokens), and every continuation is re-derived by a
  hand-written greedy loop that applies only the penalty, which must agree token for token.
* caa: the `accuracy` pair of experiments/prompt_pairs.toml appended to 4 short web-task texts
  (`base + "\\n\\n" + instruction`, chat template, generation prompt). For every prompt, the greedy
  16-token response (no penalty), cut before the first chat end token (<|im_end|>, <|endoftext|>:
  where the harness's generation stops), its text (`decode(skip_special_tokens=True).strip()`) and
  that text's ids (`tok(text, add_special_tokens=True)`, no chat template). Then the last-token
  activation at layer 12 of each sequence, as `resid_pre` (input of decoder layer 12 =
  hidden_states[12]) and `resid_post` (output of decoder layer 12 = hidden_states[13], before the
  final norm; checked against forward hooks on model.model.layers[12]), for the methods `prompt`
  (sequences = the prompt ids) and `response-text` (sequences = the response-text ids). Vector: the
  mean over pairs of positive - negative (float64), its norm, and the unit direction (7 decimals).

The tokenizer fix of smollm2_tokenizer.py (NFC for qwen2) applies.

Run: target/py/bin/python scripts/goldens/protocol_goldens.py
"""

import json
import math
import os
import sys
import tomllib
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_tokenizer import fix_qwen2  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HOME = Path(os.environ.get("MINIWOB_STEER_HOME", Path.home() / ".cache" / "miniwob-steer"))
GGUF = HOME / "models" / "qwen-coder-0.5b" / "qwen2.5-coder-0.5b-instruct.gguf"

PENALTY = 1.1
PENALTY_TOKENS = 24
LAYER = 12
RESPONSE_TOKENS = 16
PAIR = "accuracy"

# Short web-agent tasks with a tiny element list, written for this fixture.
BASES = [
    'Task: press the button that says "Save".\nPage elements:\n<button ref=2>Discard</button>\n<button ref=7>Save</button>',
    'Task: tick the checkbox next to "Remember me".\nPage elements:\n<label ref=1>Username</label>\n<input ref=5 type="checkbox"> Remember me\n<a ref=9>Forgot password?</a>',
    'Task: open the link to the pricing page.\nPage elements:\n<a ref=11>Home</a>\n<a ref=12>Pricing</a>\n<a ref=13>Contact</a>',
    'Task: type "blue" into the colour field.\nPage elements:\n<span ref=3>Favourite colour</span>\n<input ref=6 type="text">\n<button ref=8>Next</button>',
]


# <|endoftext|>, <|im_end|>: the stop tokens of Qwen2.5 (Tokenizer::stop_token_ids on the Rust side).
STOP_IDS = (151643, 151645)

def greedy_config(new_tokens, penalty):
    # Everything that could add a logits processor or a stop is set explicitly off.
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=new_tokens,
        min_new_tokens=None,
        repetition_penalty=penalty,
        temperature=None,
        top_k=None,
        top_p=None,
        min_p=None,
        typical_p=None,
        no_repeat_ngram_size=None,
        bad_words_ids=None,
        eos_token_id=None,
        pad_token_id=0,
        bos_token_id=None,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        stop_strings=None,
    )


def generate(model, ids, new_tokens, penalty):
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=greedy_config(new_tokens, penalty))
    cont = out[0, len(ids):].tolist()
    assert len(cont) == new_tokens, f"generate gave {len(cont)} tokens, not {new_tokens}"
    check = manual_greedy(model, ids, new_tokens, penalty)
    assert cont == check, f"generate {cont} != hand-written greedy {check} (penalty {penalty})"
    return cont


def manual_greedy(model, ids, new_tokens, penalty):
    """Greedy with only the repetition penalty, transformers' formula, over prompt + generated ids."""
    seen = list(ids)
    past = None
    step = torch.tensor([ids])
    cont = []
    with torch.no_grad():
        for _ in range(new_tokens):
            out = model(input_ids=step, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].clone()
            if penalty != 1.0:
                idx = torch.tensor(sorted(set(seen)))
                s = logits[idx]
                logits[idx] = torch.where(s < 0, s * penalty, s / penalty)
            nxt = int(torch.argmax(logits))
            cont.append(nxt)
            seen.append(nxt)
            step = torch.tensor([[nxt]])
    return cont


def last_token_states(model, ids):
    """(resid_pre, resid_post) of layer LAYER at the last token, float64; checked against hooks."""
    hooked = {}
    layer = model.model.layers[LAYER]
    h1 = layer.register_forward_pre_hook(
        lambda m, args, kwargs: hooked.__setitem__("pre", (args[0] if args else kwargs["hidden_states"])[0, -1].clone()),
        with_kwargs=True,
    )
    h2 = layer.register_forward_hook(
        lambda m, a, out: hooked.__setitem__("post", (out[0] if isinstance(out, tuple) else out)[0, -1].clone())
    )
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
    finally:
        h1.remove()
        h2.remove()
    hs = out.hidden_states
    assert len(hs) == model.config.num_hidden_layers + 1
    pre, post = hs[LAYER][0, -1], hs[LAYER + 1][0, -1]
    assert torch.equal(pre, hooked["pre"]), "hidden_states[L] is not the input of layer L"
    assert torch.equal(post, hooked["post"]), "hidden_states[L+1] is not the raw output of layer L"
    return pre.double(), post.double()


def vector(pos, neg):
    m = torch.stack([p - n for p, n in zip(pos, neg)]).mean(0)
    norm = float(m.norm())
    d = m / norm
    assert all(math.isfinite(v) for v in d.tolist()) and math.isfinite(norm)
    return {"direction": [round(v, 7) for v in d.tolist()], "norm": norm}, d


def main():
    if not GGUF.exists():
        sys.exit(f"missing {GGUF}: run scripts/setup.sh first")
    torch.set_num_threads(int(os.environ.get("GOLDEN_THREADS", "4")))
    tok = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    fix_qwen2(tok)
    model = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    print(f"GGUF generation_config: {model.generation_config.to_diff_dict()}")

    # --- repetition penalty ---
    logits_doc = json.loads((ROOT / "tests" / "fixtures" / "qwen2" / "logits.json").read_text())
    prompts = [c["ids"] for c in logits_doc["cases"]]
    new_tokens = PENALTY_TOKENS
    while True:
        cases = []
        for ids in prompts:
            cases.append({
                "ids": ids,
                "greedy": generate(model, ids, new_tokens, PENALTY),
                "greedy_plain": generate(model, ids, new_tokens, 1.0),
            })
        changed = [i for i, c in enumerate(cases) if c["greedy"] != c["greedy_plain"]]
        if changed or new_tokens >= 40:
            break
        print(f"penalty changed nothing at {new_tokens} tokens; retrying with 40")
        new_tokens = 40
    if not changed:
        sys.exit("repetition penalty changed no continuation even at 40 tokens")
    for i, c in enumerate(cases):
        first = next((k for k, (a, b) in enumerate(zip(c["greedy"], c["greedy_plain"])) if a != b), None)
        where = "identical" if first is None else f"differs from token {first}"
        print(f"penalty case {i}: {where}\n  penalty: {tok.decode(c['greedy'])!r}\n  plain:   {tok.decode(c['greedy_plain'])!r}")

    # --- CAA ---
    pairs_toml = tomllib.loads((ROOT / "experiments" / "prompt_pairs.toml").read_text())
    pair = next(p for p in pairs_toml["pair"] if p["name"] == PAIR)
    pairs = []
    states = {("prompt", s): ([], []) for s in ("pre", "post")}
    states.update({("response-text", s): ([], []) for s in ("pre", "post")})
    for base in BASES:
        entry = {}
        for side in ("positive", "negative"):
            content = base + "\n\n" + pair[side]
            text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False).input_ids
            resp = generate(model, ids, RESPONSE_TOKENS, 1.0)
            # The harness stops a response at the chat's end tokens; greedy decoding up to the
            # first one is the same with or without the stop.
            stop = next((k for k, t in enumerate(resp) if t in STOP_IDS), len(resp))
            resp = resp[:stop]
            resp_text = tok.decode(resp, skip_special_tokens=True).strip()
            text_ids = tok(resp_text, add_special_tokens=True).input_ids
            assert text_ids, f"empty response text for {content!r}"
            entry[f"{side}_ids"] = ids
            entry[f"{side}_response"] = resp
            entry[f"{side}_response_text"] = resp_text
            entry[f"{side}_text_ids"] = text_ids
            k = 0 if side == "positive" else 1
            for method, seq in (("prompt", ids), ("response-text", text_ids)):
                pre, post = last_token_states(model, seq)
                states[(method, "pre")][k].append(pre)
                states[(method, "post")][k].append(post)
            print(f"caa {side}: {resp_text!r}")
        pairs.append({k: entry[k] for k in (
            "positive_ids", "negative_ids", "positive_response", "negative_response",
            "positive_response_text", "negative_response_text", "positive_text_ids", "negative_text_ids")})
    vectors, dirs = {}, {}
    for method in ("prompt", "response-text"):
        for s in ("post", "pre"):
            key = f"{method}/resid_{s}"
            vectors[key], dirs[key] = vector(*states[(method, s)])
            assert len(vectors[key]["direction"]) == model.config.hidden_size
            print(f"{key}: norm {vectors[key]['norm']:.6f}")
    for a, b in (("prompt/resid_post", "prompt/resid_pre"), ("prompt/resid_post", "response-text/resid_post")):
        print(f"cos({a}, {b}) = {float(dirs[a] @ dirs[b]):.6f}")

    doc = {
        "generator": "scripts/goldens/protocol_goldens.py",
        "gguf": GGUF.name,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "repetition_penalty": {"penalty": PENALTY, "max_new_tokens": new_tokens, "cases": cases},
        "caa": {"layer": LAYER, "response_tokens": RESPONSE_TOKENS, "pairs": pairs, "vectors": vectors},
    }
    out = ROOT / "tests" / "fixtures" / "qwen2" / "protocol.json"
    out.write_text(json.dumps(doc, ensure_ascii=False) + "\n")
    print(f"penalty changed {len(changed)}/{len(cases)} continuations (cases {changed}); wrote {out}")


if __name__ == "__main__":
    main()
