#!/usr/bin/env python3
"""The torch reference for two training steps of the tiny graft (tests/graft_goldens.rs).

The hybrid: the tiny Qwen2.5-VL vision tower (tests/fixtures/tiny-qwen2.5-vl, merger width 48)
feeding the tiny Qwen3 (tests/fixtures/tiny-qwen3, hidden 32) through Linear(48 -> 32). One
sample (the `tall` image, a prompt, a response with a think block that --strip-think removes),
rendered the way `graft train --strip-think` renders it: the user turn
`<|vision_start|><|image_pad|><|vision_end|>` + prompt through Qwen3's chat template with
`enable_thinking=False` (which closes an empty think block), the pad repeated once per merged
vision token, then `answer<|im_end|>` as the target (the script checks that this is exactly
what the template renders for the whole conversation). Loss: mean cross-entropy on the target
tokens. Optimiser: torch.optim.AdamW (lr 1e-3, betas 0.9/0.999, eps 1e-8, weight decay 0.01)
after torch.nn.utils.clip_grad_norm_ (max norm CLIP, smaller than the first step's norm so the
clipping acts). Two steps on the same sample, so the second update depends on the moments.

Writes tests/fixtures/tiny-graft/:
  sample.jsonl                 the sample ({image, prompt, response}; image relative to the file)
  adapter.init.safetensors     the initial adapter (adapter.weight [32, 48], adapter.bias [32])
  reference.safetensors        input_ids, loss_mask, image_features, per step s (1, 2): loss.s,
                               grad_norm.s, grad.weight.s / grad.bias.s (after clipping),
                               weight.s / bias.s (after the update)
  settings.json                lr, clip, betas, eps, weight decay, strip_think

Run: scripts/goldens/venv.sh && target/py/bin/python scripts/goldens/graft_goldens.py
(after qwen3_goldens.py and qwen2_5_vl_goldens.py)
"""

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2VLImageProcessorPil, Qwen3ForCausalLM
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
VISION = FIX / "tiny-qwen2.5-vl"
LM = FIX / "tiny-qwen3"
OUT = FIX / "tiny-graft"
SEED = 2323
LR = 1e-3
CLIP = 0.5
BETAS = (0.9, 0.999)
EPS = 1e-8
WD = 0.01
PROMPT = "What does the highlighted button say?"
RESPONSE = "<think>\nThe button in the screenshot is labelled OK.\n</think>\n\nOK"
ANSWER = "OK"


def main():
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copy(VISION / "images" / "tall.png", OUT / "tall.png")
    (OUT / "sample.jsonl").write_text(json.dumps({"image": "tall.png", "prompt": PROMPT, "response": RESPONSE}) + "\n")

    vcfg = Qwen2_5_VLConfig.from_pretrained(VISION).vision_config
    vcfg._attn_implementation = "eager"
    visual = Qwen2_5_VisionTransformerPretrainedModel(vcfg).eval()
    sd = {k[len("visual."):]: v for k, v in load_file(VISION / "model.safetensors").items() if k.startswith("visual.")}
    visual.load_state_dict(sd)
    lm = Qwen3ForCausalLM.from_pretrained(LM, attn_implementation="eager", dtype=torch.float32).eval()
    for p in list(visual.parameters()) + list(lm.parameters()):
        p.requires_grad_(False)
    tok = PreTrainedTokenizerFast.from_pretrained(LM)
    improc = Qwen2VLImageProcessorPil.from_pretrained(VISION)

    px = improc(images=[Image.open(OUT / "tall.png").convert("RGB")], return_tensors="pt")
    pv, grid = px["pixel_values"].to(torch.float32), px["image_grid_thw"]
    with torch.no_grad():
        feats = visual(pv, grid_thw=grid).pooler_output
    n_img = int(grid.prod()) // 4
    content = "<|vision_start|><|image_pad|><|vision_end|>" + PROMPT
    user = [{"role": "user", "content": content}]
    prompt_text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": ANSWER}], tokenize=False)
    assert full == prompt_text + ANSWER + "<|im_end|>\n", (full, prompt_text)
    expanded = prompt_text.replace("<|image_pad|>", "<|image_pad|>" * n_img)
    p_ids = tok(expanded, add_special_tokens=False)["input_ids"]
    t_ids = tok(ANSWER + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + t_ids])
    P, L = len(p_ids), ids.shape[1]
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert int((ids == image_id).sum()) == n_img

    g = torch.Generator().manual_seed(SEED)
    adapter = torch.nn.Linear(feats.shape[1], lm.config.hidden_size)
    with torch.no_grad():
        a = 1.0 / feats.shape[1] ** 0.5
        adapter.weight.copy_((torch.rand(adapter.weight.shape, generator=g) * 2 - 1) * a)
        adapter.bias.copy_(0.1 * torch.randn(adapter.bias.shape, generator=g))
    save_file({"adapter.weight": adapter.weight.detach().clone(), "adapter.bias": adapter.bias.detach().clone()},
              OUT / "adapter.init.safetensors")
    opt = torch.optim.AdamW(adapter.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    mask = (ids == image_id)
    ref = {"input_ids": ids[0], "loss_mask": torch.tensor([0] * P + [1] * (L - P), dtype=torch.int64), "image_features": feats}
    for step in (1, 2):
        img = adapter(feats)
        emb = lm.model.embed_tokens(ids)
        emb = emb.masked_scatter(mask[..., None], img)
        logits = lm(inputs_embeds=emb).logits
        loss = F.cross_entropy(logits[0, P - 1:L - 1], ids[0, P:L])
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(adapter.parameters(), CLIP)
        if step == 1:
            assert norm > CLIP, f"the first step's norm {norm} does not exceed the clip {CLIP}"
        ref[f"loss.{step}"] = loss.detach().reshape(1)
        ref[f"grad_norm.{step}"] = norm.detach().reshape(1)
        ref[f"grad.weight.{step}"] = adapter.weight.grad.detach().clone()
        ref[f"grad.bias.{step}"] = adapter.bias.grad.detach().clone()
        opt.step()
        ref[f"weight.{step}"] = adapter.weight.detach().clone()
        ref[f"bias.{step}"] = adapter.bias.detach().clone()
        print(f"step {step}: loss {loss.item():.6f}, grad norm {norm.item():.6f}")
    save_file({k: v.contiguous() for k, v in ref.items()}, OUT / "reference.safetensors")
    (OUT / "settings.json").write_text(json.dumps(
        {"lr": LR, "clip": CLIP, "beta1": BETAS[0], "beta2": BETAS[1], "eps": EPS, "weight_decay": WD, "strip_think": True}) + "\n")


if __name__ == "__main__":
    main()
