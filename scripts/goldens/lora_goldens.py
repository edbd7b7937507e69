#!/usr/bin/env python3
"""Seeded PEFT LoRA adapters on the tiny decoders and their transformers + peft logits
(tests/lora.rs).

For tiny-qwen2 (QKV bias, tied head) and tiny-llama (llama3 rope, untied head) this writes two
adapters to tests/fixtures/tiny-lora/<model>-<adapter>/ (what `save_pretrained` writes:
adapter_config.json, adapter_model.safetensors):

  attn   q/k/v/o_proj, r = 4, lora_alpha = 8
  all    every projection, r = 2, lora_alpha = 16, rsLoRA, rank_pattern {down_proj: 3},
         alpha_pattern {q_proj: 4}

peft initialises lora_B to zero (an adapter that changes nothing); here every lora_A and lora_B
is drawn from a seeded normal so that each adapter moves the logits by about as much as a layer.

reference.safetensors: `input_ids.{i}` (three prompts of different lengths), and per model and
adapter (`base` = no adapter) `{model}.{adapter}.logits.{i}` (every position, f32) and
`{model}.{adapter}.greedy.{i}` (8 greedy tokens after the prompt).

Run: scripts/goldens/venv.sh && target/py/bin/python scripts/goldens/lora_goldens.py
"""

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "tiny-lora"
NEW_TOKENS = 8

ADAPTERS = {
    "attn": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "all": dict(
        r=2,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"down_proj": 3},
        alpha_pattern={"q_proj": 4},
    ),
}


def prompts():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 96, (n,), generator=g) for n in (5, 9, 12)]


def randomize_lora(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in**0.5))


def run(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0].float()
        greedy = model.generate(
            input_ids=ids[None],
            attention_mask=torch.ones_like(ids[None]),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )[0, len(ids) :]
    return logits.contiguous(), greedy.to(torch.int64).contiguous()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    ref = {}
    ps = prompts()
    for i, p in enumerate(ps):
        ref[f"input_ids.{i}"] = p.to(torch.int64)
    for seed, model_name in enumerate(["tiny-qwen2", "tiny-llama"]):
        src = FIX / model_name
        base = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32, attn_implementation="eager").eval()
        for i, p in enumerate(ps):
            ref[f"{model_name}.base.logits.{i}"], ref[f"{model_name}.base.greedy.{i}"] = run(base, p)
        for j, (adapter, kw) in enumerate(ADAPTERS.items()):
            model = AutoModelForCausalLM.from_pretrained(
                src, torch_dtype=torch.float32, attn_implementation="eager"
            ).eval()
            model = get_peft_model(model, LoraConfig(lora_dropout=0.0, bias="none", **kw)).eval()
            randomize_lora(model, 100 + 10 * seed + j)
            d = OUT / f"{model_name}-{adapter}"
            model.save_pretrained(d)
            # A relative base path and no model card: the fixture is the same on any machine.
            (d / "README.md").unlink(missing_ok=True)
            c = json.loads((d / "adapter_config.json").read_text())
            c["base_model_name_or_path"] = f"tests/fixtures/{model_name}"
            (d / "adapter_config.json").write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
            for i, p in enumerate(ps):
                ref[f"{model_name}.{adapter}.logits.{i}"], ref[f"{model_name}.{adapter}.greedy.{i}"] = run(model, p)
            print(model_name, adapter, "max |Δlogit| vs base:",
                  max(float((ref[f"{model_name}.{adapter}.logits.{i}"] - ref[f"{model_name}.base.logits.{i}"]).abs().max()) for i in range(len(ps))))
    save_file(ref, OUT / "reference.safetensors")
    import peft, transformers

    (OUT / "versions.json").write_text(
        json.dumps({"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
