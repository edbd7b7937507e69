#!/usr/bin/env python3
"""Tokenizer and chat-template references for tests/tokenizer.rs, from transformers.

Writes, for each GGUF found under $MINIWOB_STEER_HOME/models (default ~/.cache/miniwob-steer):
  tests/fixtures/smollm2/{tokens,chat}.json   from SmolLM2-135M-Instruct.Q4_1.gguf (required)
  tests/fixtures/qwen2/{tokens,chat}.json     from qwen2.5-coder-0.5b-instruct.gguf (if present)

The tokenizer is transformers' own GGUF loader (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`),
with one correction each, so that the reference is the tokenizer the model was trained with:

* smollm: transformers' loader has no split regex for `pre = smollm` and falls back to GPT-2's
  ByteLevel regex. SmolLM2's published tokenizer.json (and llama.cpp's `smollm` pre-tokenizer) first
  split every digit on its own (`Digits(individual_digits=True)`), then apply ByteLevel. The two only
  differ on whitespace right before a digit ("x  1": GPT-2 regex gives `Ġ|Ġ1`, SmolLM2 gives `ĠĠ|1`).
* qwen2: Qwen2's published tokenizer (and transformers' `Qwen2Tokenizer`) NFC-normalises the text;
  the GGUF loader does not. This only matters for text that is not already NFC.

Where the stock GGUF loader disagrees, the entry also carries `ids_transformers_gguf`, to document it.

Run: target/py/bin/python scripts/goldens/smollm2_tokenizer.py
"""

import json
import os
import sys
from pathlib import Path

from tokenizers import normalizers, pre_tokenizers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
HOME = Path(os.environ.get("MINIWOB_STEER_HOME", Path.home() / ".cache" / "miniwob-steer"))

TEXTS = [
    "Hello",
    " Hello world",
    "Hello world!",
    "12345 and 3.14",
    "x  1, y\t2,   345",
    "def f(x):\n    if x:\n\treturn [x, 'y']\n    return None\n",
    "\n\n",
    "  leading and trailing spaces  ",
    "line one\r\nline two\n\n\nthree",
    "Grüße, 世界! 🙂 naïve café",
    "cafe\u0301 (combining accent)",
    "don't I'll we've THEY'RE it's",
    "<|im_start|>user",
    "<|im_start|>user\nClick the button.<|im_end|>\n<|im_start|>assistant\n",
    '<div id="wrap"><button ref=12>Submit</button></div> click(ref=12)',
    "",
    "a" * 300,
    "<tool_call>\n{\"name\": \"click\"}\n</tool_call>",
]

CHATS = [
    [{"role": "system", "content": "You are a web agent."}, {"role": "user", "content": "Click the OK button."}],
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "  Say 'bye'.\n"},
    ],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Grüße 🙂"},
        {"role": "assistant", "content": "click(ref=3)"},
        {"role": "user", "content": "<b>next</b>"},
    ],
]


def fix_smollm(tok):
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )


def fix_qwen2(tok):
    tok.backend_tokenizer.normalizer = normalizers.NFC()


def write(name: str, gguf: Path, fix):
    stock = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    fix(tok)
    out = ROOT / "tests" / "fixtures" / name
    out.mkdir(parents=True, exist_ok=True)
    tokens = []
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        entry = {
            "text": text,
            "ids": ids,
            "ids_special": tok(text, add_special_tokens=True)["input_ids"],
            "decoded": tok.decode(ids, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
        }
        stock_ids = stock(text, add_special_tokens=False)["input_ids"]
        if stock_ids != ids:
            entry["ids_transformers_gguf"] = stock_ids
        tokens.append(entry)
    meta = {
        "gguf": gguf.name,
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "special_tokens": {t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens},
    }
    (out / "tokens.json").write_text(json.dumps({"meta": meta, "cases": tokens}, ensure_ascii=False, indent=1) + "\n")
    chats = []
    for messages in CHATS:
        for agp in (True, False):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp)
            chats.append({"messages": messages, "add_generation_prompt": agp, "text": text})
    (out / "chat.json").write_text(json.dumps(chats, ensure_ascii=False, indent=1) + "\n")
    differ = sum("ids_transformers_gguf" in t for t in tokens)
    print(f"{name}: {len(tokens)} texts ({differ} where the stock GGUF loader differs), {len(chats)} chats -> {out}")


def main():
    smollm = HOME / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not smollm.exists():
        sys.exit(f"missing {smollm}: run scripts/setup.sh first")
    write("smollm2", smollm, fix_smollm)
    qwen = HOME / "models" / "qwen-coder-0.5b" / "qwen2.5-coder-0.5b-instruct.gguf"
    if qwen.exists():
        write("qwen2", qwen, fix_qwen2)
    else:
        print(f"skipping qwen2: no {qwen}")


if __name__ == "__main__":
    main()
