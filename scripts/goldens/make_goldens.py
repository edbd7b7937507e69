#!/usr/bin/env python3
"""Tiny seeded random decoders and their transformers references (tests/decoder_goldens.rs).

For each family (llama, qwen2, gemma, gemma2) this builds a small random model (3-4 layers, GQA,
f32, eager attention) with a fixed seed and writes to tests/fixtures/tiny-<family>/:

  config.json, model.safetensors      the model, as transformers saves it
  reference.safetensors               input_ids, hook_embed, resid_post.{i}, final_norm, logits,
                                      steer_layer, steer_alpha, steer_vector, steered_logits,
                                      greedy_ids, greedy_steered_ids

Activations are captured with forward hooks on the decoder layers (not `output_hidden_states`,
whose last entry is normed in transformers 5): `resid_post.{i}` is the output of decoder layer i,
the same point as `blocks.{i}.hook_resid_post`; `hook_embed` is the input of layer 0 (after
Gemma's sqrt(hidden) scale); `final_norm` is the output of the final norm.

Steering is a forward hook on layer L that adds alpha * v to the layer output: at every position
for `steered_logits`, and at the last prompt position plus every generated one (the exp12
`last` setting) for `greedy_steered_ids`.

Run: scripts/goldens/venv.sh && target/py/bin/python scripts/goldens/make_goldens.py
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures"
VOCAB = 96
NEW_TOKENS = 8

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILIES = {
    # Llama-3 style: llama3 rope scaling, untied head.
    "tiny-llama": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            num_hidden_layers=3,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    # Qwen2: QKV bias, tied embeddings.
    "tiny-qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(num_hidden_layers=3, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
    ),
    # Gemma: norm +1, sqrt(hidden) embedding scale, GELU-tanh, head_dim != hidden/heads.
    "tiny-gemma": (
        GemmaConfig,
        GemmaForCausalLM,
        dict(num_hidden_layers=3, head_dim=16, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh"),
    ),
    # Gemma2: post-norms, soft-capping, alternating sliding window (shorter than the prompt).
    "tiny-gemma2": (
        Gemma2Config,
        Gemma2ForCausalLM,
        dict(
            num_hidden_layers=4,
            head_dim=16,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=16,
            sliding_window=4,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=10.0,
        ),
    ),
}


def randomize(model, seed):
    """Weights large enough that layers matter and greedy choices are not near-ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                # Llama/Qwen2 multiply by w, Gemma by (1 + w): random either way.
                base = 0.0 if "gemma" in type(model).__name__.lower() else 1.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                # Small embeddings, so that in tied models the layers (not the input token's own
                # embedding) decide the next token and greedy runs do not just repeat it.
                # Gemma multiplies them by sqrt(hidden) first.
                scale = 0.2 / model.config.hidden_size**0.5 if "gemma" in type(model).__name__.lower() else 0.2
                p.copy_(scale * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in**0.5))


def layer_output(out):
    return out[0] if isinstance(out, tuple) else out


def with_layer_output(out, new):
    return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new


def make(name, cfg_cls, model_cls, extra, seed):
    torch.manual_seed(seed)
    cfg = cfg_cls(**COMMON, **extra)
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).eval().to(torch.float32)
    randomize(model, seed)
    layers = model.model.layers
    n = len(layers)

    g = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(3, VOCAB, (1, 11), generator=g)
    steer_layer = 1
    steer_alpha = 3.0
    v = torch.randn(cfg.hidden_size, generator=g)
    steer_vector = v / v.norm()

    caps = {}
    hooks = [layers[0].register_forward_pre_hook(lambda m, args, kwargs: caps.__setitem__("hook_embed", (args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True)]
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(lambda m, a, out, i=i: caps.__setitem__(f"resid_post.{i}", layer_output(out).clone())))
    hooks.append(model.model.norm.register_forward_hook(lambda m, a, out: caps.__setitem__("final_norm", out.clone())))
    with torch.no_grad():
        logits = model(input_ids).logits
    for h in hooks:
        h.remove()

    def steer_hook(mode):
        def hook(m, a, out):
            h = layer_output(out)
            add = steer_alpha * steer_vector.to(h.dtype)
            if mode == "all" or h.shape[1] == 1:
                h = h + add
            else:  # "last": the last prompt position at prefill; every decode step adds anyway
                h = h.clone()
                h[:, -1] = h[:, -1] + add
            return with_layer_output(out, h)

        return hook

    h = layers[steer_layer].register_forward_hook(steer_hook("all"))
    with torch.no_grad():
        steered_logits = model(input_ids).logits
    h.remove()

    gen_kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        greedy = model.generate(input_ids, **gen_kwargs)[0, input_ids.shape[1]:]
        h = layers[steer_layer].register_forward_hook(steer_hook("last"))
        greedy_steered = model.generate(input_ids, **gen_kwargs)[0, input_ids.shape[1]:]
        h.remove()

    out = OUT / name
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for junk in ("generation_config.json",):
        (out / junk).unlink(missing_ok=True)
    ref = {
        "input_ids": input_ids[0].to(torch.int64),
        "hook_embed": caps["hook_embed"],
        "final_norm": caps["final_norm"],
        "logits": logits,
        "steered_logits": steered_logits,
        "steer_layer": torch.tensor([steer_layer], dtype=torch.int64),
        "steer_alpha": torch.tensor([steer_alpha], dtype=torch.float32),
        "steer_vector": steer_vector,
        "greedy_ids": greedy.to(torch.int64),
        "greedy_steered_ids": greedy_steered.to(torch.int64),
    }
    for i in range(n):
        ref[f"resid_post.{i}"] = caps[f"resid_post.{i}"]
    save_file({k: t.contiguous() for k, t in ref.items()}, out / "reference.safetensors")
    changed = (greedy != greedy_steered).any().item()
    print(f"{name}: {n} layers, greedy {greedy.tolist()}, steered {greedy_steered.tolist()} (differs: {changed})")


def main():
    torch.set_num_threads(1)
    manifest = {"torch": torch.__version__}
    import transformers

    manifest["transformers"] = transformers.__version__
    for seed, (name, (cfg_cls, model_cls, extra)) in enumerate(FAMILIES.items(), start=1234):
        make(name, cfg_cls, model_cls, extra, seed)
    (OUT / "tiny-versions.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
