#!/usr/bin/env python3
"""Tiny seeded random Qwen2-VL and its transformers references (tests/qwen2_vl_goldens.rs).

Writes tests/fixtures/tiny-qwen2-vl/:

  config.json                 transformers-5 (nested) layout, as save_pretrained writes it
  config.hub.json             the same model in the flat Hub layout (rope_scaling: mrope, in_chans, ...)
  model.safetensors           weights (transformers-5 names: model.visual.*, model.language_model.*)
  tokenizer.json, tokenizer_config.json, chat_template.json
                              a byte-level BPE trained here (384 ids) with the Qwen2-VL special
                              tokens at ids 0..6, and the Qwen2-VL-2B-Instruct chat template
  images/*.png                source images (seeded smooth patterns + noise)
  reference.safetensors       per sample `<s>.`: input_ids, mm_token_type_ids, pixel_values,
                              grid_thw, position_ids [3, seq], rope_delta, vision_out (merger
                              output), vision_pre_merge, hook_embed, resid_post.{i}, final_norm,
                              logits [seq, vocab], greedy_ids (transformers generate, KV cache)

Image processor: Qwen2VLImageProcessorPil (the PIL backend; transformers 5.17 has no other
slow one), bicubic. Samples: `two` (two images, 56x112 and 84x56 (HxW), aspect ratios 1:2 and
3:2, sizes multiples of 28 so no resampling happens), `resized` (one 61x97 image: smart_resize
to 56x84, PIL bicubic), `text` (text only). Activations are captured with forward hooks on the
decoder layers: `resid_post.{i}` is the output of decoder layer i (`blocks.{i}.hook_resid_post`).

Run: scripts/goldens/venv.sh && target/py/bin/pip install pillow==13.0.0 &&
     target/py/bin/python scripts/goldens/qwen2_vl_goldens.py
"""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "tiny-qwen2-vl"
SEED = 4242
VOCAB = 384
NEW_TOKENS = 6
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen/Qwen2-VL-2B-Instruct's chat template (chat_template.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "You are a web agent. Complete the task on the web page below by answering with actions.",
    "Actions (one per line, nothing else): click ref=N, type ref=N text=\"TEXT\", select ref=N option=\"TEXT\".",
    "N is the ref number of an element in the list below. Answer with the action line(s) only.",
    "Click on the button. Select the checkbox. Enter the text into the field and press submit.",
    "The screenshot shows the task area with every element outlined and labelled with its ref.",
    "system user assistant You are a helpful assistant. Describe the picture. What is in the image?",
] * 4


def build_tokenizer(vocab=VOCAB, specials=SPECIALS, corpus=CORPUS):
    """A byte-level BPE trained on `corpus` with `specials` at ids 0.. (also qwen3_goldens.py)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() <= vocab, tok.get_vocab_size()
    for i, s in enumerate(specials):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def randomize(model, seed):
    """Weights large enough that every layer matters and greedy choices are not near-ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name or "ln_q" in name:
                if name.endswith("bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 2 else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in**0.5))


def make_image(h, w, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = []
    for c in range(3):
        fy, fx, ph = rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.3), rng.uniform(0, 6.28)
        v = 127 + 90 * np.sin(fy * y + fx * x + ph) + rng.normal(0, 20, (h, w))
        chans.append(v)
    arr = np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def expand_and_encode(hf_tok, improc, text, images, image_id):
    """What Qwen2VLProcessor does (it cannot be built here: its video processor needs
    torchvision): each <|image_pad|> becomes grid_t*grid_h*grid_w/merge^2 pads, then tokenize;
    mm_token_type_ids marks the image pads with 1."""
    enc = {}
    if images:
        px = improc(images=images, return_tensors="pt")
        enc["pixel_values"] = px["pixel_values"]
        enc["image_grid_thw"] = px["image_grid_thw"]
        parts = text.split("<|image_pad|>")
        assert len(parts) == len(images) + 1
        out = parts[0]
        for grid, rest in zip(px["image_grid_thw"], parts[1:]):
            out += "<|image_pad|>" * int(grid.prod() // improc.merge_size**2) + rest
        text = out
    input_ids = torch.tensor([hf_tok(text, add_special_tokens=False)["input_ids"]])
    enc["input_ids"] = input_ids
    enc["attention_mask"] = torch.ones_like(input_ids)
    enc["mm_token_type_ids"] = (input_ids == image_id).to(torch.int32)
    return enc


def main():
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "images").mkdir(exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(OUT / "tokenizer.json"))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_file=str(OUT / "tokenizer.json"),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    ids = {s: i for i, s in enumerate(SPECIALS)}

    text_cfg = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        # head_dim 16 -> 8 frequencies split t/h/w as 2/3/3 (the 2B: 64 -> 16/24/24).
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision_cfg = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=4, in_channels=3,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    cfg = Qwen2VLConfig(
        text_config=text_cfg,
        vision_config=vision_cfg,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    torch.manual_seed(SEED)
    model = Qwen2VLForConditionalGeneration(cfg).eval().to(torch.float32)
    randomize(model, SEED)
    model.save_pretrained(OUT, safe_serialization=True)
    (OUT / "generation_config.json").unlink(missing_ok=True)

    # The flat layout of the Hub's Qwen2-VL checkpoints (transformers 4.x).
    hub = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        **{k: v for k, v in text_cfg.items() if k != "rope_parameters"},
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "hidden_act": "silu",
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 3,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_start|>"] + 1,
        "vision_config": {
            "depth": 2, "embed_dim": 32, "mlp_ratio": 4, "num_heads": 4, "in_chans": 3, "hidden_size": 64,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        },
    }
    (OUT / "config.hub.json").write_text(json.dumps(hub, indent=2) + "\n")
    (OUT / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2TokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    (OUT / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")

    improc = Qwen2VLImageProcessorPil()
    imgs = {"wide": make_image(56, 112, SEED + 1), "tall": make_image(84, 56, SEED + 2), "odd": make_image(61, 97, SEED + 3)}
    for k, im in imgs.items():
        im.save(OUT / "images" / f"{k}.png")
    samples = {
        "two": ([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "Click on the button."},
            {"type": "image"}, {"type": "text", "text": "What is in the image?"}]}], ["wide", "tall"]),
        "resized": ([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "Describe the picture."}]}], ["odd"]),
        "text": ([{"role": "user", "content": "Select the checkbox and press submit."}], []),
    }
    layers = model.model.language_model.layers
    ref = {}
    prompts = {}
    for name, (messages, img_names) in samples.items():
        text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts[name] = {"messages": messages, "images": img_names, "text": text}
        images = [Image.open(OUT / "images" / f"{k}.png").convert("RGB") for k in img_names] or None
        enc = expand_and_encode(hf_tok, improc, text, images, ids["<|image_pad|>"])
        caps = {}
        hooks = [layers[0].register_forward_pre_hook(
            lambda m, args, kwargs: caps.__setitem__("hook_embed", (args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True)]
        for i, layer in enumerate(layers):
            hooks.append(layer.register_forward_hook(
                lambda m, a, out, i=i: caps.__setitem__(f"resid_post.{i}", (out[0] if isinstance(out, tuple) else out).clone())))
        hooks.append(model.model.language_model.norm.register_forward_hook(
            lambda m, a, out: caps.__setitem__("final_norm", out.clone())))
        kw = {k: v for k, v in enc.items()}
        with torch.no_grad():
            model.model.rope_deltas = None
            out = model(**kw)
        for h in hooks:
            h.remove()
        s = ref
        s[f"{name}.input_ids"] = enc["input_ids"][0].to(torch.int64)
        if "mm_token_type_ids" in enc:
            s[f"{name}.mm_token_type_ids"] = enc["mm_token_type_ids"][0].to(torch.int64)
        with torch.no_grad():
            if images:
                pos, delta = model.model.get_rope_index(
                    enc["input_ids"], enc["mm_token_type_ids"], image_grid_thw=enc["image_grid_thw"])
                vis = model.model.visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"])
                s[f"{name}.pixel_values"] = enc["pixel_values"].to(torch.float32)
                s[f"{name}.grid_thw"] = enc["image_grid_thw"].to(torch.int64)
                s[f"{name}.vision_out"] = vis.pooler_output
                s[f"{name}.vision_pre_merge"] = vis.last_hidden_state
            else:
                seq = enc["input_ids"].shape[1]
                pos = torch.arange(seq).view(1, 1, -1).expand(3, 1, -1)
                delta = torch.zeros(1, 1, dtype=torch.int64)
        s[f"{name}.position_ids"] = pos[:, 0].to(torch.int64).contiguous()
        s[f"{name}.rope_delta"] = delta.reshape(1).to(torch.int64)
        s[f"{name}.hook_embed"] = caps["hook_embed"][0]
        for i in range(len(layers)):
            s[f"{name}.resid_post.{i}"] = caps[f"resid_post.{i}"][0]
        s[f"{name}.final_norm"] = caps["final_norm"][0]
        s[f"{name}.logits"] = out.logits[0]
        with torch.no_grad():
            model.model.rope_deltas = None
            gen = model.generate(**kw, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=ids["<|endoftext|>"])
        s[f"{name}.greedy_ids"] = gen[0, enc["input_ids"].shape[1]:].to(torch.int64)
        print(name, "seq", enc["input_ids"].shape[1], "grid", enc.get("image_grid_thw"), "delta", delta.tolist(),
              "greedy", s[f"{name}.greedy_ids"].tolist())
    save_file({k: t.contiguous() for k, t in ref.items()}, OUT / "reference.safetensors")
    import transformers, PIL
    (OUT / "prompts.json").write_text(json.dumps(prompts, indent=1) + "\n")
    (OUT / "versions.json").write_text(json.dumps({
        "torch": torch.__version__, "transformers": transformers.__version__, "pillow": PIL.__version__,
        "image_processor": type(improc).__name__}, indent=1) + "\n")


if __name__ == "__main__":
    main()
