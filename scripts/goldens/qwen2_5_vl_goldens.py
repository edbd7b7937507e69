#!/usr/bin/env python3
"""Tiny seeded random Qwen2.5-VL vision tower and its transformers references
(tests/qwen2_5_vl_goldens.rs).

Writes tests/fixtures/tiny-qwen2.5-vl/:

  config.json                 a Qwen2_5_VLConfig (transformers-5 layout) whose vision_config is
                              the tiny tower; the text part is never loaded by the Rust side
  model.safetensors           the vision tower only, under Hub names (`visual.*`), plus one decoy
                              language-model tensor that the loader must ignore
  preprocessor_config.json    Qwen2VLImageProcessorPil with patch 4, merge 2, min_pixels 64
  images/*.png                the source images
  reference.safetensors       per sample `<s>.`: pixel_values, grid_thw, window_index,
                              cu_window_seqlens, pre_merge (last_hidden_state, window order),
                              vision_out (merger output, image order)

The tower: depth 3 with block 1 full attention (`fullatt_block_indexes = [1]`) and blocks 0 and
2 windowed, hidden 32, 4 heads (head_dim 8), SwiGLU MLP 48 wide, RMSNorm, patch 4, merge 2,
window_size 16 (a window of 2x2 merged tokens), out_hidden_size 48. Samples: `tall` (32x16 px
(HxW), merged grid 4x2: exactly two windows), `wide` (24x40 px, merged grid 3x5: six windows,
four of them partial), and `both` (the two images in one call).

Run: scripts/goldens/venv.sh && target/py/bin/python scripts/goldens/qwen2_5_vl_goldens.py
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil
from transformers.vision_utils import get_vision_window_index

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen2_vl_goldens import make_image, randomize  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "tiny-qwen2.5-vl"
SEED = 2525

VISION = dict(
    depth=3,
    hidden_size=32,
    intermediate_size=48,
    num_heads=4,
    in_channels=3,
    patch_size=4,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=16,
    fullatt_block_indexes=[1],
    out_hidden_size=48,
    hidden_act="silu",
)
TEXT = dict(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 4]))


def main():
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "images").mkdir(exist_ok=True)
    cfg = Qwen2_5_VLConfig(text_config=TEXT, vision_config=VISION, image_token_id=5, video_token_id=6,
                           vision_start_token_id=3, vision_end_token_id=4)
    cfg._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval().to(torch.float32)
    randomize(model, SEED)
    visual = model.model.visual
    cfg.save_pretrained(OUT)
    tensors = {f"visual.{k}": v.contiguous() for k, v in visual.state_dict().items()}
    tensors["model.language_model.embed_tokens.weight"] = torch.zeros(4, 4)  # a decoy: never read
    save_file(tensors, OUT / "model.safetensors")

    improc = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                      size={"shortest_edge": 64, "longest_edge": 64 * 64})
    improc.save_pretrained(OUT)
    imgs = {"tall": make_image(32, 16, SEED + 1), "wide": make_image(24, 40, SEED + 2)}
    for k, im in imgs.items():
        im.save(OUT / "images" / f"{k}.png")
    ref = {}
    samples = {"tall": ["tall"], "wide": ["wide"], "both": ["tall", "wide"]}
    for name, which in samples.items():
        px = improc(images=[imgs[w] for w in which], return_tensors="pt")
        pv, grid = px["pixel_values"].to(torch.float32), px["image_grid_thw"]
        with torch.no_grad():
            out = visual(pv, grid_thw=grid)
        win, cu = get_vision_window_index(grid, spatial_merge_size=2, window_size=16, patch_size=4)
        ref[f"{name}.pixel_values"] = pv
        ref[f"{name}.grid_thw"] = grid.to(torch.int64)
        ref[f"{name}.window_index"] = win.to(torch.int64)
        ref[f"{name}.cu_window_seqlens"] = cu.to(torch.int64)
        ref[f"{name}.pre_merge"] = out.last_hidden_state
        ref[f"{name}.vision_out"] = out.pooler_output
        print(name, "grid", grid.tolist(), "windows", cu.tolist(), "out", tuple(out.pooler_output.shape))
    save_file({k: v.contiguous() for k, v in ref.items()}, OUT / "reference.safetensors")
    import transformers

    (OUT / "versions.json").write_text(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__}) + "\n")


if __name__ == "__main__":
    main()
