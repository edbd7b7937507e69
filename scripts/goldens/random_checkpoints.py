#!/usr/bin/env python3
"""Seeded random-weight checkpoints with the exact configs of the registry's models, in the
Hugging Face layout (config.json + model.safetensors + tokenizer.json + tokenizer_config.json
[+ preprocessor_config.json and chat_template.json for Qwen2-VL]), for speed work at real shapes
without downloads (the cost of a forward does not depend on the weight values). Not committed:
written into a cache directory (default ~/.cache/miniwob-steer/random).

Configs: the published config.json of each checkpoint (values reproduced below; only the
generation-irrelevant `transformers_version` is dropped). Weights: bf16 (the published dtype),
N(0, initializer_range) for matrices and embeddings, ones for norm weights, small N(0, 0.02)
biases; each tensor seeded from (--seed, its name), so a file does not depend on iteration order.
Tied embeddings are not written as lm_head (as in the published files). Qwen2-VL is written in
the flat Hub layout (`model.layers.*`, `visual.*`).

Tokenizer: synthetic, NOT the real vocabulary (documented in docs/cuda.md): a byte-level BPE
with the 256 byte symbols, no merges, filler tokens up to the real tokenizer's size, and the
model's special tokens at their real ids (Qwen <|im_start|>=151644 …, <|vision_start|>=151652,
<|image_pad|>=151655; Llama-3 <|begin_of_text|>=128000, <|eot_id|>=128009; SmolLM2
<|im_start|>=1, <|im_end|>=2), with the family's chat template. Text tokenizes to one token per
byte; the speed workloads use fixed token ids anyway (`bench paired`, scripts/peer/hf_paired.py).

Usage: random_checkpoints.py [--out DIR] [--models a,b|all] [--seed N] [--force]
Prints one line per model: `<name>\t<dir>`.
"""

import argparse
import hashlib
import json
import os
import sys

QWEN_SPECIAL = {
    151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151646: "<|object_ref_start|>",
    151647: "<|object_ref_end|>", 151648: "<|box_start|>", 151649: "<|box_end|>", 151650: "<|quad_start|>",
    151651: "<|quad_end|>", 151652: "<|vision_start|>", 151653: "<|vision_end|>", 151654: "<|vision_pad|>",
    151655: "<|image_pad|>", 151656: "<|video_pad|>", 151657: "<tool_call>", 151658: "</tool_call>",
    151659: "<|fim_prefix|>", 151660: "<|fim_middle|>", 151661: "<|fim_suffix|>", 151662: "<|fim_pad|>",
    151663: "<|repo_name|>", 151664: "<|file_sep|>",
}
LLAMA_SPECIAL = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128006: "<|start_header_id|>",
                 128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>", 128010: "<|python_tag|>"}
LLAMA_SPECIAL.update({i: f"<|reserved_special_token_{i - 128000}|>" for i in range(128002, 128256) if i not in LLAMA_SPECIAL})
SMOL_SPECIAL = {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"}

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

QWEN25_COMMON = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 32768, "max_window_layers": 21,
    "model_type": "qwen2", "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}

MODELS = {
    # Qwen/Qwen2.5-0.5B-Instruct
    "qwen2.5-0.5b": dict(config={**QWEN25_COMMON, "hidden_size": 896, "intermediate_size": 4864,
                                 "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2},
                         special=QWEN_SPECIAL, tok_vocab=151665, template=CHATML,
                         bos=None, eos="<|im_end|>", pad="<|endoftext|>"),
    # Qwen/Qwen2.5-1.5B-Instruct
    "qwen2.5-1.5b": dict(config={**QWEN25_COMMON, "hidden_size": 1536, "intermediate_size": 8960,
                                 "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2},
                         special=QWEN_SPECIAL, tok_vocab=151665, template=CHATML,
                         bos=None, eos="<|im_end|>", pad="<|endoftext|>"),
    # meta-llama/Llama-3.2-1B-Instruct
    "llama-3.2-1b": dict(config={
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072,
        "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
        "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 128256},
        special=LLAMA_SPECIAL, tok_vocab=128256, template=LLAMA3,
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None),
    # HuggingFaceTB/SmolLM2-135M-Instruct
    "smollm2-135m": dict(config={
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
        "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "model_type": "llama",
        "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None,
        "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 49152},
        special=SMOL_SPECIAL, tok_vocab=49152, template=CHATML,
        bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>"),
    # Qwen/Qwen2-VL-2B-Instruct
    "qwen2-vl-2b": dict(config={
        "architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
        "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 32768,
        "max_window_layers": 28, "model_type": "qwen2_vl", "num_attention_heads": 12, "num_hidden_layers": 28,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                          "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                          "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": 151936},
        special=QWEN_SPECIAL, tok_vocab=151665, template=None,
        bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        preprocessor={"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                      "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                      "image_std": [0.26862954, 0.26130258, 0.27577711],
                      "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}),
}

# Qwen2-VL's chat template (chat_template.json of the checkpoint), images as
# <|vision_start|><|image_pad|><|vision_end|>.
QWEN2VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_tokenizer(out, spec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import AddedToken

    special = spec["special"]
    vocab = {}
    byte_ids = [i for i in range(spec["tok_vocab"]) if i not in special][:256]
    for i, ch in zip(byte_ids, bytes_to_unicode()):
        vocab[ch] = i
    for i in range(spec["tok_vocab"]):
        if i in special:
            vocab[special[i]] = i
        elif i not in byte_ids:
            vocab[f"<|synthetic_{i}|>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(special[i], special=True, normalized=False) for i in sorted(special)])
    assert tok.get_vocab_size() == spec["tok_vocab"], (tok.get_vocab_size(), spec["tok_vocab"])
    for i, s in special.items():
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s), i)
    tok.save(os.path.join(out, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": spec["config"]["max_position_embeddings"],
           "bos_token": spec["bos"], "eos_token": spec["eos"], "pad_token": spec["pad"],
           "clean_up_tokenization_spaces": False,
           "synthetic": "random_checkpoints.py: byte-level, no merges; special tokens at the real ids"}
    template = spec["template"] or QWEN2VL_TEMPLATE
    cfg["chat_template"] = template
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if spec.get("preprocessor"):
        with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
            json.dump(spec["preprocessor"], f, indent=2)
        with open(os.path.join(out, "chat_template.json"), "w") as f:
            json.dump({"chat_template": QWEN2VL_TEMPLATE}, f, indent=2)


def hub_name(name, model_type):
    # transformers 5 nests Qwen2-VL as model.language_model.* / model.visual.*; the Hub files are flat.
    if model_type == "qwen2_vl":
        if name.startswith("model.language_model."):
            return "model." + name[len("model.language_model."):]
        if name.startswith("model.visual."):
            return "visual." + name[len("model.visual."):]
    return name


def write_weights(out, spec, seed):
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = spec["config"]
    config = AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k != "architectures"})
    with torch.device("meta"):
        if cfg_dict["model_type"] == "qwen2_vl":
            from transformers import Qwen2VLForConditionalGeneration

            model = Qwen2VLForConditionalGeneration(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = cfg_dict.get("tie_word_embeddings", False)
    std = cfg_dict.get("initializer_range", 0.02)
    tensors = {}
    for name, shape in shapes.items():
        hub = hub_name(name, cfg_dict["model_type"])
        if tied and hub == "lm_head.weight":
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(hashlib.sha256(hub.encode()).hexdigest()[:8], 16))
        is_norm = len(shape) == 1 and ("norm" in hub or ".ln_" in hub)
        if is_norm:
            t = torch.ones(shape, dtype=torch.bfloat16) if hub.endswith(".weight") else torch.zeros(shape, dtype=torch.bfloat16)
        elif len(shape) == 1:
            t = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=g).to(torch.bfloat16)
        else:
            t = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=g).to(torch.bfloat16)
        tensors[hub] = t.contiguous()
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() for t in tensors.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.expanduser("~/.cache/miniwob-steer/random"))
    ap.add_argument("--models", default="all", help="comma-separated names or all: " + ",".join(MODELS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rewrite existing directories")
    a = ap.parse_args()
    names = list(MODELS) if a.models == "all" else [m.strip() for m in a.models.split(",") if m.strip()]
    for n in names:
        if n not in MODELS:
            sys.exit(f"random_checkpoints.py: unknown model {n!r}; expected one of {', '.join(MODELS)}")
    for n in names:
        spec = MODELS[n]
        out = os.path.join(a.out, f"{n}-random-seed{a.seed}")
        done = os.path.join(out, ".complete")
        if os.path.exists(done) and not a.force:
            print(f"{n}\t{out}")
            continue
        os.makedirs(out, exist_ok=True)
        cfg = dict(spec["config"])
        cfg["_random_weights"] = f"scripts/goldens/random_checkpoints.py --seed {a.seed}: NOT the published weights"
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        write_tokenizer(out, spec)
        params = write_weights(out, spec, a.seed)
        open(done, "w").write(f"{params}\n")
        print(f"{n}: {params / 1e6:.1f}M parameters written to {out}", file=sys.stderr)
        print(f"{n}\t{out}")


if __name__ == "__main__":
    main()
