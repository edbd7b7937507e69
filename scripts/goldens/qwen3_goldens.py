#!/usr/bin/env python3
"""Tiny seeded random Qwen3 and its transformers references (tests/qwen3_goldens.rs).

Writes tests/fixtures/tiny-qwen3/ in the layout of make_goldens.py (config.json,
model.safetensors, reference.safetensors with input_ids, hook_embed, resid_post.{i}, final_norm,
logits, steered_logits, greedy_ids, ...: the decoder goldens' `check_tiny` reads it), plus:

  tokenizer.json, tokenizer_config.json, chat_template.jinja
        a byte-level BPE trained here (384 ids) with Qwen's special tokens at ids 0..6
        (<|endoftext|>, <|im_start|>, <|im_end|>, <|vision_start|>, <|vision_end|>,
        <|image_pad|>, <|video_pad|>) and <think> / </think> as added (non-special) tokens 384 /
        385, as in Qwen3's vocabulary; the Qwen3 chat template (Qwen/Qwen3-4B's
        tokenizer_config.json, tools branch included)
  renders.json  per conversation and `enable_thinking` (absent, true, false): the text
        transformers' apply_chat_template renders and its token ids

The model: 3 layers, hidden 32, 4 query / 2 kv heads, head_dim 16 (explicit, != hidden / heads),
per-head q/k RMSNorm, no QKV bias, tied embeddings, vocab 392 (padded past the tokenizer like the
real checkpoints). The same directory is the language model of the tiny graft
(scripts/goldens/graft_goldens.py).

Run: scripts/goldens/venv.sh && target/py/bin/python scripts/goldens/qwen3_goldens.py
"""

import json
import sys
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_goldens as mg  # noqa: E402
from qwen2_vl_goldens import build_tokenizer as qwen2_vl_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "tiny-qwen3"
SEED = 3303
TOK_VOCAB = 384
MODEL_VOCAB = 392
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen/Qwen3-4B's chat template (tokenizer_config.json `chat_template`).
QWEN3_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

CORPUS = [
    "You are a web agent. Complete the task on the web page below by answering with actions.",
    "Actions (one per line, nothing else): click ref=N, type ref=N text=\"TEXT\", select ref=N option=\"TEXT\".",
    "What does the highlighted button say? Which element holds the text? What is the task instruction?",
    "Click on the button. Select the checkbox. Enter the text into the field and press submit.",
    "Let me think about the screenshot first. The answer is the button labelled OK.",
    "system user assistant You are a helpful assistant. Describe the picture. What is in the image?",
] * 4

CONVERSATIONS = {
    "user": [{"role": "user", "content": "What does the highlighted button say?"}],
    "system_user": [
        {"role": "system", "content": "You are a web agent."},
        {"role": "user", "content": "Click on the button."},
    ],
    "multi_turn_think": [
        {"role": "system", "content": "You are a web agent."},
        {"role": "user", "content": "What is the task instruction?"},
        {"role": "assistant", "content": "<think>\nThe page says it.\n</think>\n\nClick the OK button."},
        {"role": "user", "content": "Which element holds the text OK?"},
    ],
    "answered": [
        {"role": "user", "content": "What is in the image?"},
        {"role": "assistant", "content": "<think>\nA button.\n</think>\n\nA button labelled OK."},
    ],
}


def build_tokenizer():
    tok = qwen2_vl_tokenizer(TOK_VOCAB, SPECIALS, CORPUS)
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False), AddedToken("</think>", special=False, normalized=False)])
    return tok


def main():
    torch.set_num_threads(1)
    mg.VOCAB = TOK_VOCAB  # prompt ids are drawn below the tokenizer's size
    mg.COMMON["vocab_size"] = MODEL_VOCAB
    mg.OUT = OUT.parent
    extra = dict(
        num_hidden_layers=3,
        head_dim=16,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=False,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    )
    mg.make(OUT.name, Qwen3Config, Qwen3ForCausalLM, extra, SEED)

    tok = build_tokenizer()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN3_TEMPLATE
    )
    hf.save_pretrained(OUT)
    renders = []
    for name, msgs in CONVERSATIONS.items():
        for think in (None, True, False):
            gen = msgs[-1]["role"] == "user"
            kw = {} if think is None else {"enable_thinking": think}
            text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **kw)
            ids = hf(text, add_special_tokens=False)["input_ids"]
            renders.append(dict(name=name, messages=msgs, add_generation_prompt=gen, enable_thinking=think, text=text, ids=ids))
    (OUT / "renders.json").write_text(json.dumps(renders, indent=1) + "\n")
    import transformers

    (OUT / "versions.json").write_text(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__}) + "\n")
    print(f"wrote {OUT}: {len(renders)} renders, tokenizer {len(hf)} ids")


if __name__ == "__main__":
    main()
